//! Counters of what a relay has done, shared by the request path and the fills.
//!
//! Plain atomics, read as a [`StatsSnapshot`]. Tests use them to prove coalescing (one
//! upstream transfer however many clients); the metrics endpoint and beacons will read the
//! same counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters; every field only ever grows.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bundle requests served from a complete cached file.
    pub hits: AtomicU64,
    /// Bundle requests that started a fill.
    pub misses: AtomicU64,
    /// Bundle requests that joined a fill already running.
    pub joined: AtomicU64,
    /// Fills started (one per upstream transfer of a bundle, however many sources it used).
    pub fills_started: AtomicU64,
    /// Fills that ended with a verified bundle in the cache.
    pub fills_completed: AtomicU64,
    /// Fills that ended without one.
    pub fills_failed: AtomicU64,
    /// HTTP requests sent to parents or the origin.
    pub upstream_requests: AtomicU64,
    /// Times a fill left one source for the next.
    pub failovers: AtomicU64,
    /// Fills whose content did not hash to the requested id.
    pub integrity_failures: AtomicU64,
    /// Body bytes received from upstream.
    pub upstream_bytes: AtomicU64,
    /// Body bytes sent to clients.
    pub bytes_out: AtomicU64,
    /// Nanoseconds downloads and fills spent waiting for a byte cap.
    pub throttled_nanos: AtomicU64,
    /// Requests refused by `requests_per_client` (429).
    pub refused_rate: AtomicU64,
    /// Downloads refused by `max_downloads` or `max_downloads_per_client` (503).
    pub refused_busy: AtomicU64,
    /// Unix time of the last integrity failure (fill or scrub); 0 = never.
    pub last_integrity_failure: AtomicU64,
    /// Responses by HTTP status code.
    pub statuses: std::sync::Mutex<std::collections::BTreeMap<u16, u64>>,
    /// Agents and downloads since the last beacon.
    pub activity: std::sync::Mutex<Activity>,
}

/// Who downloaded what since the last beacon.
#[derive(Debug, Default)]
pub struct Activity {
    pub agents: std::collections::HashSet<std::net::IpAddr>,
    /// (completed, failed) downloads by bundle.
    pub downloads: std::collections::BTreeMap<crate::bundle::BundleId, (u64, u64)>,
    /// Integrity failures (fill or scrub) by bundle.
    pub integrity: std::collections::BTreeMap<crate::bundle::BundleId, u64>,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub joined: u64,
    pub fills_started: u64,
    pub fills_completed: u64,
    pub fills_failed: u64,
    pub upstream_requests: u64,
    pub failovers: u64,
    pub integrity_failures: u64,
    pub upstream_bytes: u64,
    pub bytes_out: u64,
    pub throttled_nanos: u64,
    pub refused_rate: u64,
    pub refused_busy: u64,
}

impl Stats {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Notes a download by `agent` of `bundle` that ended, `completed` or cut short.
    pub fn download_ended(
        &self,
        agent: std::net::IpAddr,
        bundle: crate::bundle::BundleId,
        completed: bool,
    ) {
        let mut activity = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        activity.agents.insert(agent);
        let entry = activity.downloads.entry(bundle).or_insert((0, 0));
        if completed {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
    }

    /// The activity since the last call, reset.
    pub fn take_activity(&self) -> Activity {
        std::mem::take(&mut *self.activity.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Counts a response with `status`.
    pub fn response(&self, status: u16) {
        let mut statuses = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
        *statuses.entry(status).or_insert(0) += 1;
    }

    /// Counts an integrity failure of `bundle` and notes when it happened.
    pub fn integrity_failure(&self, bundle: crate::bundle::BundleId) {
        Self::bump(&self.integrity_failures);
        let mut activity = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        *activity.integrity.entry(bundle).or_insert(0) += 1;
        drop(activity);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs());
        self.last_integrity_failure.store(now, Ordering::Relaxed);
    }

    /// Seconds since the last integrity failure, if there was one.
    pub fn since_integrity_failure(&self) -> Option<u64> {
        let at = self.last_integrity_failure.load(Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        (at > 0).then(|| now.saturating_sub(at))
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            hits: get(&self.hits),
            misses: get(&self.misses),
            joined: get(&self.joined),
            fills_started: get(&self.fills_started),
            fills_completed: get(&self.fills_completed),
            fills_failed: get(&self.fills_failed),
            upstream_requests: get(&self.upstream_requests),
            failovers: get(&self.failovers),
            integrity_failures: get(&self.integrity_failures),
            upstream_bytes: get(&self.upstream_bytes),
            bytes_out: get(&self.bytes_out),
            throttled_nanos: get(&self.throttled_nanos),
            refused_rate: get(&self.refused_rate),
            refused_busy: get(&self.refused_busy),
        }
    }
}
