//! The last beacon sequence number seen from each relay, kept on disk so that a receiver
//! remembers them across restarts. With that, a receiver can take a beacon however late
//! it arrives (it can only be one that waited in a queue, never a replay) and never takes
//! a replay after a restart.
//!
//! The file is a log: a first line `#since <unix ms>` (when this memory began, since a
//! beacon sent long before it cannot be judged; `#` is never in a relay id), then `relay
//! seq` lines, appended and synced as beacons are recorded, and rewritten whole (the
//! highest sequence per relay) at start and whenever it holds twice as many lines as
//! relays. Lines that do not parse (a torn last line after a crash) are skipped; a torn
//! line reads as a lower number, which the highest-wins rule ignores. Call it from the
//! blocking pool: it writes and syncs files.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use tracing::warn;

/// Most relays whose last sequence a receiver remembers.
pub const MAX_RELAYS: usize = 100_000;

/// Lines the log may hold beyond twice the relays before it is rewritten.
const SLACK_LINES: usize = 1_000;

/// Why a sequence was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum SeqError {
    #[error("beacon {seq} from {relay} is replayed or old (last {last})")]
    Old { relay: String, seq: u64, last: u64 },
    #[error("too many relays known to this receiver")]
    TooManyRelays,
    #[error("cannot record the beacon sequence in {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Highest sequence per relay, in memory and (unless [`SeqStore::memory`]) in a file.
#[derive(Debug)]
pub struct SeqStore {
    inner: Mutex<Inner>,
    /// When this store's memory began; `None` for a memory-only store.
    since: Option<DateTime<Utc>>,
}

#[derive(Debug)]
struct Inner {
    seqs: HashMap<String, u64>,
    log: Option<Log>,
}

#[derive(Debug)]
struct Log {
    path: PathBuf,
    file: File,
    lines: usize,
    since: DateTime<Utc>,
    /// An append failed part-way: the file may end in a fragment, so it is rewritten
    /// before the next append.
    dirty: bool,
}

impl SeqStore {
    /// A store that forgets on restart (tests, and receivers without a state directory).
    pub fn memory() -> Self {
        Self {
            inner: Mutex::new(Inner {
                seqs: HashMap::new(),
                log: None,
            }),
            since: None,
        }
    }

    /// Opens (or creates) the log at `path` and compacts it.
    pub fn open(path: &Path) -> io::Result<Self> {
        let mut seqs = HashMap::new();
        let mut since = None;
        match std::fs::read(path) {
            Ok(bytes) => {
                for line in bytes.split(|&b| b == b'\n') {
                    let parsed = std::str::from_utf8(line).ok().and_then(|line| {
                        let (key, value) = line.split_once(' ')?;
                        Some((key, value.trim().parse::<i64>().ok()?))
                    });
                    match parsed {
                        Some(("#since", ms)) if since.is_none() => {
                            since = DateTime::from_timestamp_millis(ms);
                        }
                        Some((relay, seq)) if !relay.starts_with('#') && seq >= 0 => {
                            let last = seqs.entry(relay.to_string()).or_insert(0u64);
                            *last = (*last).max(seq as u64);
                        }
                        _ if line.is_empty() => {}
                        _ => warn!(path = %path.display(), "skipping a torn beacon sequence line"),
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // A log without its first line (lost, or older) remembers from now on.
        let since = since.unwrap_or_else(Utc::now);
        let log = rewrite(path, &seqs, since)?;
        Ok(Self {
            inner: Mutex::new(Inner {
                seqs,
                log: Some(log),
            }),
            since: Some(since),
        })
    }

    /// Whether the sequences survive a restart.
    pub fn is_durable(&self) -> bool {
        self.since.is_some()
    }

    /// Since when this store remembers every sequence it took: a late beacon sent well
    /// before it may be a replay it cannot recognize. `None` for a memory-only store.
    pub fn remembers_since(&self) -> Option<DateTime<Utc>> {
        self.since
    }

    /// Whether `seq` from `relay` is new: above the last one recorded.
    pub fn check(&self, relay: &str, seq: u64) -> Result<(), SeqError> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        check(&inner.seqs, relay, seq)
    }

    /// Records `seq` as the last from `relay`, on disk (synced) first.
    pub fn record(&self, relay: &str, seq: u64) -> Result<(), SeqError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        check(&inner.seqs, relay, seq)?;
        let Inner { seqs, log } = &mut *inner;
        let Some(log) = log else {
            seqs.insert(relay.to_string(), seq);
            return Ok(());
        };
        let io_error = |path: &Path, source| SeqError::Io {
            path: path.to_path_buf(),
            source,
        };
        if log.dirty {
            *log = rewrite(&log.path, seqs, log.since).map_err(|e| io_error(&log.path, e))?;
        }
        let appended = writeln!(log.file, "{relay} {seq}").and_then(|()| log.file.sync_data());
        if let Err(e) = appended {
            // Part of the line may be in the file: a fragment glued to the next line could
            // read as another relay's sequence, so the file is rewritten from memory first.
            log.dirty = true;
            return Err(io_error(&log.path, e));
        }
        log.lines += 1;
        seqs.insert(relay.to_string(), seq);
        if log.lines > 2 * seqs.len() + SLACK_LINES {
            *log = rewrite(&log.path, seqs, log.since).map_err(|e| io_error(&log.path, e))?;
        }
        Ok(())
    }
}

fn check(seqs: &HashMap<String, u64>, relay: &str, seq: u64) -> Result<(), SeqError> {
    let last = seqs.get(relay).copied();
    if last.is_none() && seqs.len() >= MAX_RELAYS {
        return Err(SeqError::TooManyRelays);
    }
    let last = last.unwrap_or(0);
    if seq <= last {
        return Err(SeqError::Old {
            relay: relay.to_string(),
            seq,
            last,
        });
    }
    Ok(())
}

/// Writes the highest sequence per relay to a new file, renames it over `path`, and opens
/// it for appending.
fn rewrite(path: &Path, seqs: &HashMap<String, u64>, since: DateTime<Utc>) -> io::Result<Log> {
    let mut text = String::with_capacity(seqs.len() * 32 + 32);
    text.push_str(&format!("#since {}\n", since.timestamp_millis()));
    for (relay, seq) in seqs {
        text.push_str(relay);
        text.push(' ');
        text.push_str(&seq.to_string());
        text.push('\n');
    }
    crate::reports::write_durably(path, text.as_bytes())?;
    let file = OpenOptions::new().append(true).open(path)?;
    Ok(Log {
        path: path.to_path_buf(),
        file,
        lines: seqs.len() + 1,
        since,
        dirty: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_survive_a_restart_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("beacon-seqs");
        let store = SeqStore::open(&path).unwrap();
        store.record("branch-1", 10).unwrap();
        store.record("branch-2", 7).unwrap();
        store.record("branch-1", 12).unwrap();
        assert!(matches!(
            store.record("branch-1", 12),
            Err(SeqError::Old { last: 12, .. })
        ));
        drop(store);

        // A crash mid-append leaves half a line.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        write!(file, "branch-2 9").unwrap();
        write!(file, "\nbranch-3 x").unwrap();
        file.write_all(b"\n\xff\xfe garbage\n").unwrap();
        drop(file);
        let since = SeqStore::open(&path).unwrap().remembers_since().unwrap();

        let store = SeqStore::open(&path).unwrap();
        assert_eq!(
            store.remembers_since(),
            Some(since),
            "the memory's start is kept"
        );
        assert!(
            store.check("branch-1", 12).is_err(),
            "a replay after a restart"
        );
        assert!(store.check("branch-1", 13).is_ok());
        assert!(store.check("branch-2", 9).is_err());
        assert!(store.check("branch-3", 1).is_ok());
        // Compacted at open: the `since` line, then one line per relay.
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(lines, 3);
    }

    #[test]
    fn the_log_is_rewritten_when_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("beacon-seqs");
        let store = SeqStore::open(&path).unwrap();
        for seq in 1..=3 * SLACK_LINES as u64 {
            store.record("only", seq).unwrap();
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= SLACK_LINES + 3, "{lines} lines for one relay");
        drop(store);
        let store = SeqStore::open(&path).unwrap();
        assert!(store.check("only", 3 * SLACK_LINES as u64).is_err());
    }

    #[test]
    fn a_memory_store_refuses_replays_too() {
        let store = SeqStore::memory();
        store.record("a", 1).unwrap();
        assert!(store.check("a", 1).is_err());
        assert!(store.check("a", 2).is_ok());
    }
}
