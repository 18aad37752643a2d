//! Agent reports: outcomes of installing a bundle, carried up the tree to the monitor
//! without losing one.
//!
//! `POST /v1/reports` takes a JSON array of reports. The whole batch is validated first (a
//! malformed report gets 400 naming what is wrong, and nothing of the batch is kept), then
//! written durably to the spool (write, fsync, rename, fsync the directory) before the
//! 202 answer. A sender task forwards spooled batches to `[monitor] url` or, without one,
//! to the first parent that takes them, which spools and forwards them in turn. A batch
//! leaves the spool only when the receiver acknowledged it with a 2xx; until then it is
//! retried with backoff, across restarts. Receivers drop report ids they have seen
//! recently, and the monitor dedupes by `report_id`, so a batch sent twice is harmless.

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::bundle::BundleId;

/// Header carrying the BLAKE3 keyed hash (hex) of a body sent between relays.
pub const SIGNATURE_HEADER: &str = "x-patchrelay-signature";

/// The signature of `body` under `key`.
pub fn sign(key: &[u8; 32], body: &[u8]) -> String {
    blake3::keyed_hash(key, body).to_hex().to_string()
}

/// Whether `signature` (hex) is `body`'s under `key`; compared in constant time.
pub fn verify(key: &[u8; 32], body: &[u8], signature: &str) -> bool {
    blake3::Hash::from_hex(signature.trim()).is_ok_and(|h| h == blake3::keyed_hash(key, body))
}

/// Largest `POST /v1/reports` body by default (`[server] max_report_body`).
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Most reports in one batch by default (`[server] max_report_batch`).
pub const MAX_BATCH: usize = 10_000;
/// Reports per spool file (and so per forwarded request): 500 reports of at most ~5 KiB
/// each stay well under [`MAX_BODY`].
const SPOOL_CHUNK: usize = 500;
/// Report ids remembered to drop duplicates before spooling.
const RECENT_IDS: usize = 200_000;

/// One agent's outcome for one bundle of one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub report_id: String,
    pub agent: String,
    pub deployment: String,
    pub bundle: String,
    pub outcome: Outcome,
    #[serde(default)]
    pub detail: String,
    pub at: DateTime<Utc>,
    /// The relay that took the report from the agent: set by that relay, kept by the
    /// ones above it. Tells the monitor which relay the agent uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Installed,
    Failed,
}

/// Why a batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("reports: {0}")]
    Invalid(String),
    #[error("reports: {count} in one batch, at most {max} are accepted")]
    TooMany { count: usize, max: usize },
    #[error("the report spool is full; retry later")]
    SpoolFull,
    #[error("cannot spool reports: {0}")]
    Io(#[from] io::Error),
}

/// Parses and checks a batch of at most `max_reports`; every error names the report (by
/// index) and the field.
pub fn parse_batch(body: &[u8], max_reports: usize) -> Result<Vec<Report>, ReportError> {
    let reports: Vec<Report> =
        serde_json::from_slice(body).map_err(|e| ReportError::Invalid(e.to_string()))?;
    if reports.len() > max_reports {
        return Err(ReportError::TooMany {
            count: reports.len(),
            max: max_reports,
        });
    }
    for (i, report) in reports.iter().enumerate() {
        let field = |name: &str, value: &str, max: usize| {
            if value.trim().is_empty() || value.len() > max {
                Err(ReportError::Invalid(format!(
                    "report {i}: field `{name}` must be 1 to {max} characters"
                )))
            } else {
                Ok(())
            }
        };
        field("report_id", &report.report_id, 128)?;
        field("agent", &report.agent, 256)?;
        field("deployment", &report.deployment, 256)?;
        if report.bundle.parse::<BundleId>().is_err() {
            return Err(ReportError::Invalid(format!(
                "report {i}: field `bundle` must be a bundle id (64 lowercase hex characters)"
            )));
        }
        if let Some(relay) = &report.relay {
            field("relay", relay, 64)?;
        }
        if report.detail.len() > 4096 {
            let msg = format!("report {i}: field `detail` must be at most 4096 characters");
            return Err(ReportError::Invalid(msg));
        }
    }
    Ok(reports)
}

/// The on-disk spool of report batches waiting to go up.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// Recently accepted report ids, oldest first, to drop duplicates.
    recent: Mutex<(HashSet<String>, VecDeque<String>)>,
    /// Batches refused because the spool was full.
    pub refused_full: AtomicU64,
}

impl Spool {
    /// Opens (creating) the spool directory; leftovers of interrupted writes are removed.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                fs::remove_file(&path)?;
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            recent: Mutex::default(),
            refused_full: AtomicU64::new(0),
        })
    }

    /// Durably adds the reports of `batch` not seen recently; returns how many were new.
    pub fn append(&self, batch: Vec<Report>) -> Result<usize, ReportError> {
        let fresh: Vec<Report> = {
            let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            batch
                .into_iter()
                .filter(|r| !recent.0.contains(&r.report_id))
                .collect()
        };
        if fresh.is_empty() {
            return Ok(0);
        }
        // Spool files of at most SPOOL_CHUNK reports (each at most ~5 KiB), so a forwarded
        // file always fits a receiver's body limit whatever the agents' batch size.
        let mut files = Vec::new();
        for chunk in fresh.chunks(SPOOL_CHUNK) {
            files.push(serde_json::to_vec(chunk).map_err(io::Error::other)?);
        }
        let bytes: u64 = files.iter().map(|f| f.len() as u64).sum();
        if self.used_bytes()? + bytes > self.max_bytes {
            self.refused_full.fetch_add(1, Ordering::Relaxed);
            error!(
                reports = fresh.len(),
                "report spool is full; refusing the batch (503)"
            );
            return Err(ReportError::SpoolFull);
        }
        for file in &files {
            write_file(&self.dir, file)?;
        }
        self.remember(&fresh);
        Ok(fresh.len())
    }

    fn remember(&self, reports: &[Report]) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        for report in reports {
            if recent.0.insert(report.report_id.clone()) {
                recent.1.push_back(report.report_id.clone());
            }
        }
        while recent.1.len() > RECENT_IDS {
            if let Some(old) = recent.1.pop_front() {
                recent.0.remove(&old);
            }
        }
    }

    /// Spooled batch files, oldest first.
    pub fn batches(&self) -> io::Result<Vec<PathBuf>> {
        list_files(&self.dir)
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reports waiting in the spool.
    pub fn pending(&self) -> io::Result<usize> {
        let mut count = 0;
        for batch in self.batches()? {
            let reports: Vec<Report> = serde_json::from_slice(&fs::read(&batch)?)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            count += reports.len();
        }
        Ok(count)
    }

    fn used_bytes(&self) -> io::Result<u64> {
        let mut used = 0;
        for batch in self.batches()? {
            used += fs::metadata(&batch).map_or(0, |m| m.len());
        }
        Ok(used)
    }
}

/// Durably writes `bytes` as the newest file of an outbox directory (write, fsync,
/// rename, fsync the directory), so a crash leaves the file whole or absent.
pub fn write_file(dir: &Path, bytes: &[u8]) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let name = format!("{nanos:024}-{seq:08}-{}", std::process::id());
    write_durably(&dir.join(format!("{name}.json")), bytes)
}

/// Writes `bytes` to `path` so that after a crash or power cut `path` holds either its old
/// content or all of the new: through `<path>.tmp`, synced, renamed over it, and the
/// directory synced.
pub fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = path.with_extension("tmp");
    fs::write(&temp, bytes)?;
    fs::File::open(&temp)?.sync_all()?;
    fs::rename(&temp, path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => fs::File::open(dir)?.sync_all(),
        _ => fs::File::open(".")?.sync_all(),
    }
}

/// The files of an outbox directory, oldest first.
pub fn list_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    Ok(files)
}

/// Sends the files of outbox `dir` up, oldest first, until the task is dropped. A file
/// is removed only after a receiver answered 2xx.
pub async fn forward(dir: PathBuf, target: Target) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let listed = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || list_files(&dir)).await
        };
        let files = match listed {
            Ok(Ok(files)) => files,
            Ok(Err(e)) => {
                warn!(error = %e, outbox = target.what, "cannot read an outbox");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        let Some(oldest) = files.first() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        match send_file(&target, oldest).await {
            Ok(Sent::Delivered) => match fs::remove_file(oldest) {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    // It would be sent again (receivers dedupe); do not spin on it.
                    error!(outbox = target.what, file = %oldest.display(), error = %e,
                        "delivered but cannot remove it from the outbox");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            },
            Ok(Sent::Refused(why)) => {
                if !set_aside(oldest, &why, target.what) {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
            Err(e) => {
                warn!(error = %e, outbox = target.what, retry_in_ms = backoff.as_millis() as u64,
                    "cannot forward; keeping it spooled");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Where an outbox goes: the monitor, or the parents in order.
#[derive(Debug, Clone)]
pub struct Target {
    /// Full URLs to POST to, tried in order.
    pub urls: Vec<String>,
    pub relay_id: String,
    /// Signs each body (`X-Patchrelay-Signature`) when set.
    pub key: Option<[u8; 32]>,
    /// "reports" or "beacons", for logs.
    pub what: &'static str,
    /// How to connect (plain, or `https://` verified by `[upstream] ca_file`).
    pub connector: crate::tls::Connector,
}

/// What became of one outbox file.
enum Sent {
    /// A receiver took it (2xx), or already had it (409: a beacon seen before).
    Delivered,
    /// Every receiver refused its content (4xx): retrying cannot help.
    Refused(String),
}

async fn send_file(target: &Target, batch: &Path) -> Result<Sent, String> {
    let body = match fs::read(batch) {
        Ok(body) => body,
        // An unreadable file would block the queue forever: set it aside.
        Err(e) => {
            return Ok(Sent::Refused(format!(
                "{}: cannot read: {e}",
                batch.display()
            )))
        }
    };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Full<bytes::Bytes>>(target.connector.clone());
    let mut last = String::from("no receiver configured");
    // Set aside only when every receiver refused the content; one that was merely away
    // may take it later.
    let mut refused_by_all = !target.urls.is_empty();
    for url in &target.urls {
        let mut request = http::Request::post(url)
            .header("content-type", "application/json")
            .header(crate::server::RELAY_HEADER, &target.relay_id);
        if let Some(key) = &target.key {
            request = request.header(SIGNATURE_HEADER, sign(key, &body));
        }
        let request = request
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
            .map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(Duration::from_secs(15), client.request(request)).await;
        match answer {
            Ok(Ok(response))
                if response.status().is_success() || response.status().as_u16() == 409 =>
            {
                tracing::debug!(receiver = %url, outbox = target.what, "forwarded");
                return Ok(Sent::Delivered);
            }
            Ok(Ok(response)) => {
                let status = response.status();
                last = format!("{url}: answered {status}");
                let retryable = [401, 403, 408, 429].contains(&status.as_u16());
                refused_by_all &= status.is_client_error() && !retryable;
            }
            Ok(Err(e)) => {
                last = format!("{url}: {e}");
                refused_by_all = false;
            }
            Err(_) => {
                last = format!("{url}: no answer");
                refused_by_all = false;
            }
        }
    }
    if refused_by_all {
        Ok(Sent::Refused(last))
    } else {
        Err(last)
    }
}

/// Takes a file every receiver refused off the queue, so it no longer blocks the files
/// behind it. Reports go to `rejected/` beside it (kept for an operator, never dropped
/// silently); beacons, which are expendable and go stale, are deleted. Returns whether
/// the file is off the queue.
fn set_aside(file: &Path, why: &str, what: &str) -> bool {
    let Some(dir) = file.parent() else {
        return false;
    };
    if what == "beacons" {
        warn!(file = %file.display(), error = %why, "receiver refused a beacon; dropped");
        return fs::remove_file(file).is_ok();
    }
    let rejected = dir.join("rejected");
    let moved = fs::create_dir_all(&rejected)
        .and_then(|()| fs::rename(file, rejected.join(file.file_name().unwrap_or_default())));
    match moved {
        Ok(()) => {
            error!(outbox = what, file = %file.display(), error = %why,
                "receiver refused this batch; set aside in rejected/");
            true
        }
        Err(e) => {
            error!(outbox = what, file = %file.display(), error = %e,
                "receiver refused this batch and it cannot be set aside");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: &str) -> serde_json::Value {
        serde_json::json!({
            "report_id": id, "agent": "pc-042", "deployment": "2026-12",
            "bundle": BundleId::of(b"kb").to_string(), "outcome": "installed",
            "detail": "", "at": "2026-12-08T07:00:00Z"
        })
    }

    #[test]
    fn a_bad_report_names_its_field_and_fails_the_batch() {
        let mut bad = report("r2");
        bad["outcome"] = "done".into();
        let body = serde_json::to_vec(&vec![report("r1"), bad]).unwrap();
        let err = parse_batch(&body, MAX_BATCH).unwrap_err().to_string();
        assert!(err.contains("unknown variant `done`"), "{err}");

        let mut no_agent = report("r3");
        no_agent["agent"] = "".into();
        let err =
            parse_batch(&serde_json::to_vec(&vec![no_agent]).unwrap(), MAX_BATCH).unwrap_err();
        assert!(err.to_string().contains("report 0: field `agent`"), "{err}");

        let mut bad_bundle = report("r4");
        bad_bundle["bundle"] = "kb123".into();
        let err =
            parse_batch(&serde_json::to_vec(&vec![bad_bundle]).unwrap(), MAX_BATCH).unwrap_err();
        assert!(err.to_string().contains("field `bundle`"), "{err}");
    }

    #[test]
    fn spool_keeps_batches_durably_drops_duplicates_and_has_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 2000).unwrap();
        let batch = parse_batch(
            &serde_json::to_vec(&vec![report("a"), report("b")]).unwrap(),
            MAX_BATCH,
        );
        assert_eq!(spool.append(batch.unwrap()).unwrap(), 2);
        let again = parse_batch(
            &serde_json::to_vec(&vec![report("b"), report("c")]).unwrap(),
            MAX_BATCH,
        );
        assert_eq!(
            spool.append(again.unwrap()).unwrap(),
            1,
            "b was seen already"
        );
        assert_eq!(spool.pending().unwrap(), 3);

        let reopened = Spool::open(dir.path(), 2000).unwrap();
        assert_eq!(reopened.batches().unwrap().len(), 2);
        let many: Vec<_> = (0..20).map(|i| report(&format!("x{i}"))).collect();
        let many = parse_batch(&serde_json::to_vec(&many).unwrap(), MAX_BATCH).unwrap();
        assert!(matches!(reopened.append(many), Err(ReportError::SpoolFull)));
        assert_eq!(reopened.refused_full.load(Ordering::Relaxed), 1);
    }
}
