//! Health beacons: every `[beacon] interval` a relay writes a signed JSON beacon (who it
//! is, how it is, what it did since the last one) to its beacon outbox, which is forwarded
//! up like reports: to `[monitor] url`, or to the parents, which check and forward it.
//!
//! A beacon is signed with a BLAKE3 keyed hash of its body under the 32-byte key from
//! `[beacon] key_file`, sent in `X-Patchrelay-Signature`. A receiver refuses a beacon
//! without a signature (401), with a wrong one (403), with a sequence number not above the
//! last it saw from that relay (409), or with a timestamp further than `max_skew` ahead of
//! its own clock (400). Sequence numbers are kept on disk at both ends: a sender's keep
//! growing across restarts, and a receiver remembers the last one per relay (see
//! [`SeqStore`]), so it takes a beacon however late it comes (it waited in a queue; a
//! replay would repeat a sequence) and refuses replays after a restart too. A receiver
//! without a state directory (tests) also refuses beacons older than `max_skew`. The
//! outbox keeps at most [`MAX_OUTBOX`] beacons: when a receiver is away for long, the
//! oldest beacons go first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::admin;
use crate::body::ResponseBody;
use crate::config::Config;
use crate::health::{self, UpstreamState};
use crate::reports::{self, SIGNATURE_HEADER};

mod seqs;
use crate::server::{require_method, ApiError, AppState};
pub use seqs::{SeqError, SeqStore};

/// Most beacons waiting in an outbox.
pub const MAX_OUTBOX: usize = 1000;
const MAX_BODY: usize = 1024 * 1024;

/// One beacon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Beacon {
    pub relay: String,
    pub site: String,
    /// The URL this relay is reached at (for the monitor's own health checks).
    pub url: String,
    pub version: String,
    pub seq: u64,
    pub sent_at: DateTime<Utc>,
    pub uptime_seconds: u64,
    pub parents: Vec<String>,
    /// The first parent currently answering, if any.
    pub parent_in_use: Option<String>,
    pub cache_bytes: u64,
    pub cache_bundles: u64,
    pub upstream: Vec<UpstreamState>,
    pub ready: bool,
    pub failed: Vec<String>,
    pub degraded: Vec<String>,
    pub since_last: Counters,
}

/// What happened since the previous beacon.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Responses by status class ("2xx", "4xx", ...).
    pub requests: BTreeMap<String, u64>,
    pub bytes_out: u64,
    /// Distinct agent addresses that started a download.
    pub agents: u64,
    /// Downloads by bundle id.
    pub downloads: BTreeMap<String, Downloads>,
    pub integrity_failures: u64,
    /// Integrity failures by bundle id (fills and scrub).
    #[serde(default)]
    pub integrity: BTreeMap<String, u64>,
}

/// Downloads of one bundle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Downloads {
    pub completed: u64,
    pub failed: u64,
}

/// Writes this relay's beacons.
#[derive(Debug)]
pub struct BeaconSender {
    state: Arc<AppState>,
    site: String,
    url: String,
    parents: Vec<String>,
    interval: Duration,
    outbox: PathBuf,
    started: Instant,
    /// Totals at the previous beacon, to send differences.
    last: (BTreeMap<u16, u64>, u64, u64),
}

impl BeaconSender {
    pub fn new(
        config: &Config,
        addr: SocketAddr,
        state: &Arc<AppState>,
        _key: [u8; 32],
        outbox: &Path,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(outbox)?;
        Ok(Self {
            state: state.clone(),
            site: config.relay.site.clone(),
            url: config.relay.advertise_url.as_ref().map_or_else(
                || {
                    let scheme = if config.relay.tls.is_some() {
                        "https"
                    } else {
                        "http"
                    };
                    format!("{scheme}://{addr}")
                },
                |u| u.as_str().to_string(),
            ),
            parents: config
                .upstream
                .parents
                .iter()
                .map(|p| p.as_str().to_string())
                .collect(),
            interval: config.beacon.interval,
            outbox: outbox.to_path_buf(),
            started: Instant::now(),
            last: Default::default(),
        })
    }

    /// Writes a beacon every interval until the task is dropped.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let beacon = self.build().await;
            let outbox = self.outbox.clone();
            let written = tokio::task::spawn_blocking(move || store(&outbox, &beacon)).await;
            if let Ok(Err(e)) | Err(e) = written.map_err(std::io::Error::other) {
                warn!(error = %e, "cannot write a beacon");
            }
        }
    }

    async fn build(&mut self) -> Beacon {
        let stats = &self.state.stats;
        let readiness = health::readiness(&self.state).await;
        let statuses = stats
            .statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let bytes_out = stats.bytes_out.load(Ordering::Relaxed);
        let integrity = stats.integrity_failures.load(Ordering::Relaxed);

        let mut requests = BTreeMap::new();
        for (code, total) in &statuses {
            let before = self.last.0.get(code).copied().unwrap_or(0);
            *requests.entry(format!("{}xx", code / 100)).or_insert(0) += total - before;
        }
        let activity = stats.take_activity();
        let downloads = activity
            .downloads
            .into_iter()
            .map(|(id, (completed, failed))| (id.to_string(), Downloads { completed, failed }))
            .collect();
        let since_last = Counters {
            requests,
            bytes_out: bytes_out - self.last.1,
            agents: activity.agents.len() as u64,
            downloads,
            integrity_failures: integrity - self.last.2,
            integrity: activity
                .integrity
                .into_iter()
                .map(|(id, n)| (id.to_string(), n))
                .collect(),
        };
        self.last = (statuses, bytes_out, integrity);

        let parent_in_use = readiness
            .upstream
            .iter()
            .find(|u| u.consecutive_failures == 0 && u.last_success_seconds_ago.is_some())
            .filter(|u| self.parents.contains(&u.url))
            .map(|u| u.url.clone());
        Beacon {
            relay: self.state.relay_id.clone(),
            site: self.site.clone(),
            url: self.url.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            seq: 0,
            sent_at: Utc::now(),
            uptime_seconds: self.started.elapsed().as_secs(),
            parents: self.parents.clone(),
            parent_in_use,
            cache_bytes: self.state.cache.used_bytes(),
            cache_bundles: self.state.cache.bundle_count(),
            upstream: readiness.upstream,
            ready: readiness.ready,
            failed: readiness.failed,
            degraded: readiness.degraded,
            since_last,
        }
    }
}

/// Gives `beacon` the next sequence number (kept in the outbox's `seq` file) and writes
/// it to the outbox, dropping the oldest beacons beyond [`MAX_OUTBOX`].
fn store(outbox: &Path, beacon: &Beacon) -> std::io::Result<()> {
    let seq_file = outbox.join("seq");
    let last: u64 = match std::fs::read_to_string(&seq_file) {
        Ok(text) => text.trim().parse().unwrap_or(0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    // Never below the clock in milliseconds: if the seq file is lost (a wiped cache dir),
    // numbering still continues above what receivers have seen.
    let now_ms = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
    let seq = last.saturating_add(1).max(now_ms);
    let beacon = Beacon {
        seq,
        ..beacon.clone()
    };
    reports::write_durably(&seq_file, seq.to_string().as_bytes())?;

    let body = serde_json::to_vec(&beacon).map_err(std::io::Error::other)?;
    push_bounded(outbox, &body)
}

/// Adds a beacon body to an outbox, dropping the oldest beyond [`MAX_OUTBOX`].
fn push_bounded(outbox: &Path, body: &[u8]) -> std::io::Result<()> {
    reports::write_file(outbox, body)?;
    let files = reports::list_files(outbox)?;
    if files.len() > MAX_OUTBOX {
        let dropped = files.len() - MAX_OUTBOX;
        for old in &files[..dropped] {
            let _ = std::fs::remove_file(old);
        }
        warn!(dropped, "beacon outbox full; dropped the oldest beacons");
    }
    Ok(())
}

/// A sequence refused (409) or not recorded (500).
fn seq_error(e: SeqError) -> ApiError {
    match e {
        SeqError::Old { .. } | SeqError::TooManyRelays => ApiError::Conflict(e.to_string()),
        SeqError::Io { .. } => ApiError::Internal(e.to_string()),
    }
}

/// Checks a received beacon body: its signature under `key` (401 without one, 403 when
/// wrong), its JSON, its timestamp against this clock (400 beyond `max_skew`) and its
/// relay id. The sequence check is the receiver's, since it keeps the last ones seen.
///
/// With `accept_late`, a beacon older than `max_skew` passes (one ahead of the clock
/// still does not): for a receiver that keeps every relay's last sequence durably (the
/// monitor, and relays with their [`SeqStore`]), so an old beacon can only be one that
/// waited in a queue, never a replay.
pub fn decode(
    key: &[u8; 32],
    signature: Option<&str>,
    body: &[u8],
    max_skew: Duration,
    accept_late: bool,
) -> Result<Beacon, ApiError> {
    let signature = signature.ok_or(ApiError::Unsigned)?;
    if !reports::verify(key, body, signature) {
        return Err(ApiError::BadSignature);
    }

    let beacon: Beacon =
        serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("beacon: {e}")))?;
    let age = Utc::now() - beacon.sent_at;
    let skew = if accept_late && age > chrono::TimeDelta::zero() {
        chrono::TimeDelta::zero()
    } else {
        age.abs()
    };
    if skew.to_std().unwrap_or(Duration::MAX) > max_skew {
        let why = format!(
            "beacon timestamp is {}s away from this receiver's clock",
            skew.num_seconds()
        );
        return Err(ApiError::BadRequest(why));
    }
    let name_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if beacon.relay.is_empty() || beacon.relay.len() > 64 || !beacon.relay.chars().all(name_ok) {
        return Err(ApiError::BadRequest(
            "beacon: `relay` is not a relay id".into(),
        ));
    }
    Ok(beacon)
}

/// Largest beacon body a receiver reads.
pub const MAX_BEACON_BODY: usize = MAX_BODY;

/// `POST /v1/beacons`: checks a child's beacon and queues it for the next hop up.
pub async fn receive(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    require_method(request.method(), Method::POST)?;
    let Some(key) = state.beacon_key else {
        return Err(ApiError::NoRoute {
            path: "/v1/beacons (beacons are off)".into(),
        });
    };
    let signature = request
        .headers()
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = crate::server::read_body(request, "the beacon body", MAX_BODY).await?;
    // Where the sequences seen are kept on disk, a late beacon is one that waited in a
    // queue below (this relay's or a child's parent was away), not a replay.
    let beacon = decode(
        &key,
        signature.as_deref(),
        &body,
        state.beacon_max_skew,
        state.beacon_seqs.is_durable(),
    )?;
    // A late beacon sent before this receiver's memory of sequences began (its state was
    // wiped, say) could be a replay it cannot recognize.
    let remembered = state.beacon_seqs.remembers_since();
    let skew = chrono::TimeDelta::from_std(state.beacon_max_skew).unwrap_or_default();
    if remembered.is_some_and(|since| beacon.sent_at < since - skew) {
        let why = format!(
            "beacon {} from {} was sent before this receiver's sequence memory begins",
            beacon.seq, beacon.relay
        );
        return Err(ApiError::Conflict(why));
    }

    // The checks and writes in the blocking pool, since the sequence log is synced. The
    // sequence is recorded only once the beacon is stored: a sender whose beacon could not
    // be stored retries, and must not then be told (409) that it was delivered.
    let (outbox, seqs) = (state.beacon_outbox.clone(), state.beacon_seqs.clone());
    let (relay, seq) = (beacon.relay.clone(), beacon.seq);
    tokio::task::spawn_blocking(move || {
        seqs.check(&relay, seq).map_err(seq_error)?;
        if let Some(outbox) = outbox {
            push_bounded(&outbox, &body)
                .map_err(|e| ApiError::Internal(format!("beacon outbox: {e}")))?;
        }
        seqs.record(&relay, seq).map_err(seq_error)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let mut response = admin::json(&serde_json::json!({ "accepted": beacon.seq }))?;
    *response.status_mut() = StatusCode::ACCEPTED;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(sent_at: DateTime<Utc>) -> (Vec<u8>, String) {
        let body = serde_json::to_vec(&serde_json::json!({
            "relay": "child", "site": "lyon", "url": "http://127.0.0.1:1", "version": "0.1.0",
            "seq": 1, "sent_at": sent_at, "uptime_seconds": 5, "parents": [],
            "parent_in_use": null, "cache_bytes": 0, "cache_bundles": 0, "upstream": [],
            "ready": true, "failed": [], "degraded": [],
            "since_last": {"requests": {}, "bytes_out": 0, "agents": 0, "downloads": {},
                           "integrity_failures": 0}
        }))
        .unwrap();
        let signature = reports::sign(&[5; 32], &body);
        (body, signature)
    }

    #[test]
    fn a_late_beacon_passes_only_where_sequences_are_durable_and_none_from_the_future() {
        let skew = Duration::from_secs(300);
        let decode_at = |minutes: i64, accept_late: bool| {
            let (body, signature) = signed(Utc::now() + chrono::Duration::minutes(minutes));
            decode(&[5; 32], Some(&signature), &body, skew, accept_late)
        };
        assert!(decode_at(0, false).is_ok());
        assert!(
            decode_at(-10, false).is_err(),
            "a relay refuses a late beacon"
        );
        assert!(decode_at(-10, true).is_ok(), "the monitor takes it");
        assert!(
            decode_at(10, true).is_err(),
            "a beacon from the future is refused"
        );
    }
}
