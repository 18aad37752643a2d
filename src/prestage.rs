//! Pre-staging: a relay with parents follows its parent's manifest and fills, in the
//! background, the bundles of the patch cycle it lacks, so that on the day every agent is
//! served from its own site.
//!
//! Every `[prestage] interval` the relay fetches `GET /v1/manifest` from its first parent
//! that answers, keeps a copy (which its own children then fetch: the tree pre-stages from
//! the top down without the root knowing its children) and pins the manifest's bundles
//! until they leave it. It then fills what it lacks one bundle at a time, earliest
//! deadline first, as background fills: under the upstream cap and after on-demand fills.
//! Outside the configured window it waits, unless a bundle's deadline cannot wait: a
//! bundle starts once waiting another interval would leave less than twice its estimated
//! transfer time (at the upstream cap) before `ready_by`. A bundle that cannot be ready by
//! its deadline even starting now is flagged "at risk". Transfer times are estimated at
//! the lowest upstream cap the `[limits]` schedule sets before the deadline.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeDelta, Utc};
use tracing::{info, warn};

use crate::bundle::BundleId;
use crate::cache::Cache;
use crate::config::{PrestageConfig, TimeZone};
use crate::fill::{Fills, Joined};
use crate::limits::{Limits, WallClock};
use crate::manifest::{self, Manifest, ManifestEntry};
use crate::upstream::Upstream;

/// What pre-staging is doing, for tests now and health reports later.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrestageStatus {
    /// Version of the manifest followed.
    pub manifest_version: u64,
    /// Bundles whose background fill was started, in order.
    pub started: Vec<BundleId>,
    /// Bundles that cannot be ready by their deadline.
    pub at_risk: Vec<BundleId>,
}

/// The pre-staging task of one relay.
#[derive(Debug)]
pub struct Prestage {
    pub config: PrestageConfig,
    pub timezone: TimeZone,
    pub cache: Arc<Cache>,
    pub fills: Arc<Fills>,
    pub upstream: Arc<Upstream>,
    pub limits: Arc<Limits>,
    pub clock: Arc<dyn WallClock>,
    pub status: Arc<Mutex<PrestageStatus>>,
    /// Bundles of this manifest version the cache had no room to keep: not fetched again
    /// until the manifest changes (that would pull them over the WAN every interval).
    pub no_room: Mutex<(u64, HashSet<BundleId>)>,
}

impl Prestage {
    /// Polls and fills until the task is dropped.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let manifest = self.follow_parent().await;
            self.fill_missing(&manifest).await;
        }
    }

    /// Fetches the parent's manifest and adopts it if it changed; returns the manifest in
    /// force (the saved one when no parent answers).
    async fn follow_parent(&self) -> Manifest {
        let root = self.cache.root().to_path_buf();
        let saved = manifest::load(&root).unwrap_or_default();
        let fetched = match self.upstream.fetch_manifest().await {
            Ok(fetched) => fetched,
            Err(e) => {
                warn!(error = %e, "cannot fetch the parent's manifest; keeping the saved one");
                return saved;
            }
        };
        if fetched == saved {
            return saved;
        }

        let copy = fetched.clone();
        let write = tokio::task::spawn_blocking(move || manifest::save(&root, &copy)).await;
        if let Ok(Err(e)) | Err(e) = write.map_err(std::io::Error::other) {
            warn!(error = %e, "cannot save the manifest; following it in memory");
        }
        self.cache.pin_manifest(&fetched);
        info!(
            manifest.version = fetched.version,
            bundles = fetched.bundles.len(),
            "following a new manifest"
        );
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.manifest_version = fetched.version;
        fetched
    }

    /// Fills the bundles of `manifest` this relay lacks, earliest deadline first.
    async fn fill_missing(&self, manifest: &Manifest) {
        let skipped = {
            let mut no_room = self.no_room.lock().unwrap_or_else(|e| e.into_inner());
            if no_room.0 != manifest.version {
                *no_room = (manifest.version, HashSet::new());
            }
            no_room.1.clone()
        };
        let missing: Vec<ManifestEntry> = manifest
            .bundles
            .iter()
            .filter(|b| !self.cache.contains(&b.id) && !skipped.contains(&b.id))
            .cloned()
            .collect();
        let now = self.clock.now();
        let horizon = missing
            .iter()
            .filter_map(|e| e.ready_by)
            .max()
            .unwrap_or(now);
        let cap = self.limits.lowest_upstream_cap(now, horizon);
        let plan = plan(missing, now, cap);
        self.flag_at_risk(&plan);

        for step in plan {
            let in_window = self
                .config
                .window
                .as_ref()
                .is_none_or(|w| w.contains_time(self.timezone, self.clock.now()));
            // The next look is an interval away: start now if that would be too late.
            let next_look = self.clock.now() + self.config.interval;
            let must_start = step.latest_start.is_some_and(|t| next_look >= t);
            if !in_window && !must_start {
                continue;
            }
            self.fill_one(&step.entry).await;
            self.note_if_not_kept(&step.entry, manifest.version);
        }
    }

    /// Runs one background fill to its end.
    async fn fill_one(&self, entry: &ManifestEntry) {
        let fill = match self.fills.prefetch(entry.id) {
            Ok(Joined::Cached) => return,
            // Already running (an agent asked, or it is committing): wait for it.
            Ok(Joined::Fill {
                fill,
                started: false,
            }) => {
                let _ = fill.verified().await;
                return;
            }
            Ok(Joined::Fill {
                fill,
                started: true,
            }) => fill,
            // Every fill slot is taken, or every source corrupted it lately: the next
            // round tries again.
            Ok(Joined::Busy { .. } | Joined::HeldOff { .. }) => return,
            Err(e) => {
                warn!(bundle.id = %entry.id, error = %e, "cannot start a pre-staging fill");
                return;
            }
        };
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .started
            .push(entry.id);
        info!(bundle.id = %entry.id, bytes = entry.size, "pre-staging");
        if let Err(e) = fill.verified().await {
            warn!(bundle.id = %entry.id, error = %e, "pre-staging fill failed; retrying later");
        }
    }

    /// A fill that ended but left nothing in the cache found no room: remember it.
    fn note_if_not_kept(&self, entry: &ManifestEntry, version: u64) {
        let filling = self.fills.running() > 0;
        if self.cache.contains(&entry.id) || filling {
            return;
        }
        let mut no_room = self.no_room.lock().unwrap_or_else(|e| e.into_inner());
        if no_room.0 == version && no_room.1.insert(entry.id) {
            warn!(bundle.id = %entry.id, bytes = entry.size, manifest.version = version,
                "no room to keep this manifest bundle; not pre-staging it again this cycle");
        }
    }

    fn flag_at_risk(&self, plan: &[Step]) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        for step in plan.iter().filter(|s| s.at_risk) {
            if !status.at_risk.contains(&step.entry.id) {
                warn!(bundle.id = %step.entry.id, ready_by = ?step.entry.ready_by,
                    "at risk: cannot be ready by its deadline at the upstream cap");
                status.at_risk.push(step.entry.id);
            }
        }
    }
}

/// One planned background fill.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    entry: ManifestEntry,
    /// When this fill must start at the latest: its deadline less twice the time the fills
    /// up to it take at the upstream cap (the cap is a ceiling, not a promise, hence the
    /// margin; without a cap, the deadline itself); `None` without deadline.
    latest_start: Option<DateTime<Utc>>,
    /// Even starting now, it would be late.
    at_risk: bool,
}

/// How many times the estimated transfer time a fill with a deadline starts early.
const START_MARGIN: i32 = 2;

/// Orders `missing` earliest deadline first (bundles without one last, in manifest order)
/// and works out when each must start, given `cap` bytes/s upstream.
fn plan(mut missing: Vec<ManifestEntry>, now: DateTime<Utc>, cap: Option<u64>) -> Vec<Step> {
    missing.sort_by_key(|e| e.ready_by.map_or((1, DateTime::<Utc>::MAX_UTC), |t| (0, t)));
    // Without a cap the transfer time is unknown but short: plan it as none. Sizes come
    // from a parent, so the arithmetic saturates instead of trusting them.
    let transfer = |bytes: u64| match cap {
        None => Some(TimeDelta::zero()),
        Some(rate) => TimeDelta::try_milliseconds((bytes as f64 / rate as f64 * 1e3) as i64),
    };
    let mut queued = 0u64;
    missing
        .into_iter()
        .map(|entry| {
            queued = queued.saturating_add(entry.size);
            let needed = transfer(queued);
            let margin = needed.and_then(|d| d.checked_mul(START_MARGIN));
            let latest_start = match (entry.ready_by, margin) {
                (Some(t), Some(m)) => {
                    Some(t.checked_sub_signed(m).unwrap_or(DateTime::<Utc>::MIN_UTC))
                }
                (Some(_), None) => Some(DateTime::<Utc>::MIN_UTC),
                (None, _) => None,
            };
            let finish = needed.and_then(|d| now.checked_add_signed(d));
            let at_risk = match (entry.ready_by, finish) {
                (Some(deadline), Some(finish)) => finish > deadline,
                (Some(_), None) => true,
                (None, _) => false,
            };
            Step {
                entry,
                latest_start,
                at_risk,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &[u8], size: u64, ready_in: Option<i64>, now: DateTime<Utc>) -> ManifestEntry {
        ManifestEntry {
            id: BundleId::of(name),
            size,
            ready_by: ready_in.map(|s| now + chrono::Duration::seconds(s)),
        }
    }

    #[test]
    fn earliest_deadline_first_and_late_ones_flagged() {
        let now = Utc::now();
        let missing = vec![
            entry(b"none", 100, None, now),
            entry(b"later", 1000, Some(3600), now),
            entry(b"soon", 1000, Some(1), now),
        ];
        // 1000 B/s: "soon" needs 1 s and has 1 s; "later" needs 2 s in all.
        let steps = plan(missing, now, Some(1000));
        let order: Vec<_> = steps.iter().map(|s| s.entry.id).collect();
        assert_eq!(
            order,
            [
                BundleId::of(b"soon"),
                BundleId::of(b"later"),
                BundleId::of(b"none")
            ]
        );
        assert!(!steps[0].at_risk);
        assert_eq!(
            steps[1].latest_start,
            Some(now + chrono::Duration::seconds(3600 - 4)),
            "twice the 2 s the fills up to it take"
        );
        assert!(!steps[1].at_risk);
        assert_eq!(steps[2].latest_start, None);
    }

    #[test]
    fn a_deadline_the_cap_cannot_meet_is_at_risk() {
        let now = Utc::now();
        let missing = vec![
            entry(b"a", 5000, Some(2), now),
            entry(b"b", 100, Some(10), now),
        ];
        let steps = plan(missing, now, Some(1000));
        assert!(steps[0].at_risk, "5 s of transfer for a 2 s deadline");
        assert!(!steps[1].at_risk, "5.1 s for a 10 s deadline");
        let unlimited = plan(vec![entry(b"c", 5000, Some(-1), now)], now, None);
        let open = plan(vec![entry(b"d", 5000, Some(60), now)], now, None);
        let deadline = now + chrono::Duration::seconds(60);
        assert_eq!(
            open[0].latest_start,
            Some(deadline),
            "no cap: start by the deadline"
        );
        assert!(!open[0].at_risk);
        assert!(
            unlimited[0].at_risk,
            "a passed deadline is at risk whatever the cap"
        );
    }
}
