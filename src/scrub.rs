//! Scrub: re-hashing cached bundles in the background to find bit rot before an agent
//! does.
//!
//! Every `scrub_interval` a pass reads every cached bundle at no more than `scrub_rate`
//! bytes per second, so it never competes with serving. A bundle whose content no
//! longer hashes to its id is quarantined (moved to `quarantine/` in the cache dir, never
//! served), counted as an integrity failure, logged at error level, and fetched again in
//! the background when the relay has an upstream.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, error, info, warn};

use crate::cache::Cache;
use crate::fill::Fills;
use crate::stats::Stats;

/// The scrub task of one relay.
#[derive(Debug)]
pub struct Scrub {
    pub cache: Arc<Cache>,
    pub fills: Arc<Fills>,
    pub stats: Arc<Stats>,
    /// Bytes per second.
    pub rate: u64,
    pub interval: Duration,
}

impl Scrub {
    /// Scrubs until the task is dropped. Rests first, so a restart does not re-read a
    /// large cache at once.
    pub async fn run(self) {
        loop {
            tokio::time::sleep(self.interval).await;
            self.pass().await;
        }
    }

    async fn pass(&self) {
        let items = self.cache.list();
        let (mut checked, mut bad) = (0u64, 0u64);
        for item in items {
            let (cache, id, rate) = (self.cache.clone(), item.id, self.rate);
            let verdict = tokio::task::spawn_blocking(move || cache.verify_paced(&id, rate)).await;
            match verdict {
                Ok(Ok(Some(true))) => checked += 1,
                Ok(Ok(None)) => {}
                Ok(Ok(Some(false))) => {
                    checked += 1;
                    bad += 1;
                    self.quarantine(item.id).await;
                }
                Ok(Err(e)) => warn!(bundle.id = %item.id, error = %e, "scrub cannot read bundle"),
                Err(e) => warn!(bundle.id = %item.id, error = %e, "scrub task failed"),
            }
        }
        if bad > 0 {
            info!(bundles = checked, corrupt = bad, "scrub pass done");
        } else {
            debug!(bundles = checked, "scrub pass done");
        }
    }

    async fn quarantine(&self, id: crate::bundle::BundleId) {
        self.stats.integrity_failure(id);
        let cache = self.cache.clone();
        match tokio::task::spawn_blocking(move || cache.quarantine(&id)).await {
            Ok(Ok(path)) => error!(bundle.id = %id, quarantine = %path.display(),
                "integrity failure: cached bundle no longer matches its id; quarantined"),
            Ok(Err(e)) => {
                error!(bundle.id = %id, error = %e, "corrupt bundle could not be quarantined");
                return;
            }
            Err(e) => {
                error!(bundle.id = %id, error = %e, "quarantine task failed");
                return;
            }
        }
        if self.fills.has_upstream() {
            if let Err(e) = self.fills.prefetch(id) {
                warn!(bundle.id = %id, error = %e, "cannot refetch the quarantined bundle");
            }
        }
    }
}
