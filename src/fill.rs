//! Fills: one upstream transfer per missing bundle, however many requests want it.
//!
//! [`Fills::join`] is the single-flight point. The first request for a missing bundle
//! starts a fill task; every later request for it, until the fill ends, gets the same
//! [`Fill`]. The task belongs to no request, so a client hanging up never cancels a
//! transfer that others follow.
//!
//! The task writes the body into a temporary file and hashes it as it goes, publishing
//! progress on a `watch` channel. Requests follow by reading the shared file up to the
//! published length (see [`crate::body`]), so a slow client costs no memory and never
//! slows the fill. When a source fails or stalls, the task asks the next one for the rest
//! with a Range request. Only a body whose BLAKE3 hash equals the id is renamed into the
//! cache; otherwise every follower's body ends in an error, which makes the server abort
//! the connection instead of ending a short or corrupt response cleanly.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::bundle::BundleId;
use crate::cache::{Cache, Room, TempFile};
use crate::limits::{Limits, Priority};
use crate::stats::Stats;
use crate::upstream::{FetchError, Opened, Source, Upstream};

/// Bytes gathered from upstream before they are written out, unless the upstream pauses
/// first. Bounds a fill's memory whatever the bundle size.
const WRITE_CHUNK: usize = 256 * 1024;

/// Why a fill ended without a cached bundle.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    /// Every source answered that it does not have the bundle.
    #[error("no upstream has bundle {id}")]
    NotFound { id: BundleId },
    /// No source could deliver it; `timeout` when every failure was a timeout or stall.
    #[error("upstream failed for bundle {id}: {last}")]
    Upstream {
        id: BundleId,
        timeout: bool,
        last: String,
    },
    /// The relay has no parent and no origin to ask.
    #[error("bundle {id} is not cached and this relay has no upstream")]
    NoUpstream { id: BundleId },
    /// The complete body did not hash to the id.
    #[error("bundle {id} failed verification: content hashed to {actual}")]
    Integrity { id: BundleId, actual: String },
    /// Writing or committing the local copy failed.
    #[error("cache write failed for bundle {id}: {message}")]
    Local { id: BundleId, message: String },
    /// Every source that has it answered "later" (`503`/`429` with `Retry-After`); the
    /// bundle is held off on this relay for the shortest wait they asked for.
    #[error("every upstream asked to retry bundle {id} in {}s", retry_after.as_secs())]
    Busy { id: BundleId, retry_after: Duration },
}

/// Progress of a fill, as its followers see it.
#[derive(Debug, Clone, Default)]
pub struct FillState {
    /// Total length, once a source has announced it.
    pub total: Option<u64>,
    /// Bytes written to the file so far, from its start.
    pub written: u64,
    /// Set once when the fill ends: `Ok` means verified and committed.
    pub outcome: Option<Result<(), FillError>>,
    /// Set when the cache dir stopped taking writes mid-fill: the fill moved to this spill
    /// file (holding everything written so far), and followers read from it instead.
    pub spill: Option<Arc<File>>,
}

/// A running fill that requests can follow.
#[derive(Debug)]
pub struct Fill {
    pub id: BundleId,
    /// The file being written; stays readable after it is renamed into the cache.
    pub file: Arc<File>,
    state: watch::Receiver<FillState>,
    /// An agent waits for this fill: it takes upstream budget as on-demand. A background
    /// (pre-staging) fill becomes urgent when a request joins it.
    urgent: Arc<AtomicBool>,
}

impl Fill {
    /// A receiver of this fill's progress.
    pub fn subscribe(&self) -> watch::Receiver<FillState> {
        self.state.clone()
    }

    /// Waits until the bundle's length is known, or the fill has failed first.
    pub async fn total(&self) -> Result<u64, FillError> {
        let mut rx = self.state.clone();
        let state = rx
            .wait_for(|s| s.total.is_some() || s.outcome.is_some())
            .await
            .map_err(|_| self.vanished())?;
        match (&state.outcome, state.total) {
            (Some(Err(e)), _) => Err(e.clone()),
            (_, Some(total)) => Ok(total),
            (_, None) => Err(self.vanished()),
        }
    }

    /// Waits until the fill has verified and committed the bundle, or failed.
    pub async fn verified(&self) -> Result<(), FillError> {
        let mut rx = self.state.clone();
        let state = rx
            .wait_for(|s| s.outcome.is_some())
            .await
            .map_err(|_| self.vanished())?;
        state
            .outcome
            .clone()
            .unwrap_or_else(|| Err(self.vanished()))
    }

    fn vanished(&self) -> FillError {
        FillError::Local {
            id: self.id,
            message: "fill task ended unexpectedly".into(),
        }
    }
}

/// What [`Fills::join`] found.
#[derive(Debug)]
pub enum Joined {
    /// The bundle was committed to the cache meanwhile; serve it as a hit.
    Cached,
    /// Follow this fill; `started` when this call started it.
    Fill { fill: Arc<Fill>, started: bool },
    /// Starting it would exceed `[server] max_fills`; nothing was started.
    Busy { max: usize },
    /// Not fetched for this long: every source served corrupt bytes for it lately, or
    /// asked to be asked again later.
    HeldOff {
        retry_after: Duration,
        reason: HoldReason,
    },
}

/// Why a bundle is held off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HoldReason {
    /// Every source served bytes that failed verification.
    #[error("failed verification from every source")]
    Corrupt,
    /// Every source that has it answered `503`/`429` with a `Retry-After`.
    #[error("was refused by every upstream for now (503 with Retry-After)")]
    UpstreamBusy,
}

/// The first hold-off after a bundle failed verification from every source; it doubles
/// with each further failure, up to [`HOLD_OFF_MAX`].
const HOLD_OFF_FIRST: Duration = Duration::from_secs(10);
const HOLD_OFF_MAX: Duration = Duration::from_secs(300);

/// The hold-off after `failures` failures in a row (from 1): 10 s, 20 s, 40 s ... 5 min.
fn hold_off_delay(failures: u32) -> Duration {
    HOLD_OFF_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(8))
        .min(HOLD_OFF_MAX)
}

/// A bundle no source could deliver intact: when it may be fetched again.
#[derive(Debug, Clone, Copy)]
struct HoldOff {
    until: Instant,
    /// Verification failures in a row, each from every source.
    failures: u32,
    reason: HoldReason,
}

impl HoldOff {
    /// Over for longer than the longest hold-off: the next failure starts afresh.
    fn long_over(&self, now: Instant) -> bool {
        self.until + HOLD_OFF_MAX < now
    }
}

/// The registry of running fills.
#[derive(Debug)]
pub struct Fills {
    running: Mutex<HashMap<BundleId, Arc<Fill>>>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    cache: Arc<Cache>,
    upstream: Arc<Upstream>,
    limits: Arc<Limits>,
    stats: Arc<Stats>,
    /// Most fills running at once (`[server] max_fills`); 0 = no limit.
    max_fills: std::sync::atomic::AtomicUsize,
    /// Bundles that failed verification from every source lately. Without this, a parent
    /// that keeps corrupting a bundle would make every agent's request pull it over the
    /// WAN again.
    held_off: Mutex<HashMap<BundleId, HoldOff>>,
}

impl Fills {
    /// Sets the most fills that may run at once (0 = no limit).
    pub fn set_max_fills(&self, max: usize) {
        self.max_fills.store(max, Ordering::Relaxed);
    }

    pub fn new(
        cache: Arc<Cache>,
        upstream: Arc<Upstream>,
        limits: Arc<Limits>,
        stats: Arc<Stats>,
    ) -> Arc<Self> {
        Arc::new(Self {
            running: Mutex::default(),
            tasks: Mutex::default(),
            cache,
            upstream,
            limits,
            stats,
            max_fills: std::sync::atomic::AtomicUsize::new(0),
            held_off: Mutex::default(),
        })
    }

    /// How long `id` is still held off, and why.
    fn held_off(&self, id: &BundleId) -> Option<(Duration, HoldReason)> {
        let mut held = self
            .held_off
            .lock()
            .expect("hold-off lock is never poisoned");
        let hold = *held.get(id)?;
        let now = Instant::now();
        let left = hold.until.checked_duration_since(now);
        if hold.long_over(now) {
            held.remove(id);
        }
        left.map(|left| (left, hold.reason))
    }

    /// Holds `id` off for `wait` because its sources asked to be asked again later. A
    /// verification backoff under way keeps its count.
    fn defer(&self, id: BundleId, wait: Duration) {
        let mut held = self
            .held_off
            .lock()
            .expect("hold-off lock is never poisoned");
        let now = Instant::now();
        let failures = held
            .get(&id)
            .filter(|h| !h.long_over(now))
            .map_or(0, |h| h.failures);
        held.insert(
            id,
            HoldOff {
                until: now + wait,
                failures,
                reason: HoldReason::UpstreamBusy,
            },
        );
    }

    /// Holds `id` off after its sources all failed verification, longer each time.
    fn hold_off(&self, id: BundleId) -> Duration {
        let mut held = self
            .held_off
            .lock()
            .expect("hold-off lock is never poisoned");
        let now = Instant::now();
        let failures = held
            .get(&id)
            .filter(|h| !h.long_over(now))
            .map_or(1, |h| h.failures + 1);
        let delay = hold_off_delay(failures);
        held.insert(
            id,
            HoldOff {
                until: now + delay,
                failures,
                reason: HoldReason::Corrupt,
            },
        );
        delay
    }

    /// Joins the running fill of `id`, or starts one.
    ///
    /// The cache is checked again under the registry lock: a fill that finished after the
    /// caller's cache lookup has already renamed its file into place, and starting a
    /// second transfer for it would break the one-transfer promise.
    pub fn join(self: &Arc<Self>, id: BundleId) -> std::io::Result<Joined> {
        self.join_or_start(id, Sources::All, true)
    }

    /// Starts a background fill of `id` (pre-staging), or joins the running one. It takes
    /// upstream budget after on-demand fills, until a request joins it.
    pub fn prefetch(self: &Arc<Self>, id: BundleId) -> std::io::Result<Joined> {
        self.join_or_start(id, Sources::All, false)
    }

    fn join_or_start(
        self: &Arc<Self>,
        id: BundleId,
        sources: Sources,
        urgent: bool,
    ) -> std::io::Result<Joined> {
        let mut running = self
            .running
            .lock()
            .expect("fill registry lock is never poisoned");
        if let Some(fill) = running.get(&id) {
            if urgent {
                fill.urgent.store(true, Ordering::Relaxed);
            }
            return Ok(Joined::Fill {
                fill: fill.clone(),
                started: false,
            });
        }
        if self.cache.contains(&id) {
            return Ok(Joined::Cached);
        }
        if let Some((retry_after, reason)) = self.held_off(&id) {
            return Ok(Joined::HeldOff {
                retry_after,
                reason,
            });
        }
        let max = self.max_fills.load(Ordering::Relaxed);
        if max > 0 && running.len() >= max {
            return Ok(Joined::Busy { max });
        }

        let temp = self.cache.create_fill_file(&id)?;
        let (tx, rx) = watch::channel(FillState::default());
        let fill = Arc::new(Fill {
            id,
            file: temp.file().clone(),
            state: rx,
            urgent: Arc::new(AtomicBool::new(urgent)),
        });
        running.insert(id, fill.clone());
        drop(running);

        Stats::bump(&self.stats.fills_started);
        let registration = Registration {
            fills: self.clone(),
            fill: fill.clone(),
        };
        let task = tokio::spawn(self.clone().run(registration, temp, tx, sources));
        let mut tasks = self
            .tasks
            .lock()
            .expect("fill task list lock is never poisoned");
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
        Ok(Joined::Fill {
            fill,
            started: true,
        })
    }

    /// Whether there is any parent or origin to fill from.
    pub fn has_upstream(&self) -> bool {
        self.upstream.has_sources()
    }

    /// Number of fills running now.
    pub fn running(&self) -> usize {
        self.running
            .lock()
            .expect("fill registry lock is never poisoned")
            .len()
    }

    /// Stops every running fill; their temporary files are removed as the tasks drop.
    pub fn abort_all(&self) {
        for task in self
            .tasks
            .lock()
            .expect("fill task list lock is never poisoned")
            .drain(..)
        {
            task.abort();
        }
    }

    async fn run(
        self: Arc<Self>,
        registration: Registration,
        temp: TempFile,
        tx: watch::Sender<FillState>,
        sources: Sources,
    ) {
        let id = registration.fill.id;
        let started = Instant::now();
        let urgent = registration.fill.urgent.clone();
        let mut transfer = Transfer::new(id, &temp, &tx, &self.limits, &self.stats, urgent);
        let result = match self.fetch_all(&mut transfer, sources).await {
            Ok(()) => self.verify(&transfer),
            Err(e) => Err(e),
        };
        let last_source = transfer.last_source;
        let room = transfer.room;
        match result {
            Ok(()) => {
                let done = Verified {
                    temp,
                    room,
                    started,
                    last_source,
                };
                self.finish_verified(registration, done, &tx).await
            }
            Err(e) => self.finish_failed(registration, e, &tx),
        }
    }

    /// Releases the followers, then commits the file into the cache if it has room.
    async fn finish_verified(
        &self,
        registration: Registration,
        done: Verified,
        tx: &watch::Sender<FillState>,
    ) {
        let Verified {
            temp,
            room,
            started,
            last_source,
        } = done;
        // The bytes are verified, so followers may finish now. The commit (an fsync, slow
        // for a large bundle) runs while the fill is still registered, so requests arriving
        // meanwhile join it instead of starting a second transfer.
        let id = registration.fill.id;
        tx.send_modify(|s| s.outcome = Some(Ok(())));
        self.held_off
            .lock()
            .expect("hold-off lock is never poisoned")
            .remove(&id);
        Stats::bump(&self.stats.fills_completed);
        let bytes = tx.borrow().written;
        let seconds = started.elapsed().as_secs_f64();
        let rate_mib_s = bytes as f64 / seconds.max(1e-6) / (1024.0 * 1024.0);
        info!(bundle.id = %id, bytes, upstream.url = %last_source, seconds,
            rate_mib_s = format!("{rate_mib_s:.1}"), "fill complete");

        let Some(Room::Granted(reservation)) = room else {
            // Served pass-through: the temporary file goes when the last follower is done.
            drop(registration);
            return;
        };
        let cache = self.cache.clone();
        let committed = tokio::task::spawn_blocking(move || cache.commit(temp, &id)).await;
        drop(reservation);
        match committed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(bundle.id = %id, error = %e, "verified bundle could not be cached")
            }
            Err(e) => error!(bundle.id = %id, error = %e, "cache commit task failed"),
        }
        drop(registration);
    }

    /// Logs and announces a failed fill; after an integrity failure, refetches from the
    /// sources not caught serving corrupt bytes for this bundle, if any are left.
    fn finish_failed(
        self: &Arc<Self>,
        registration: Registration,
        error: FillError,
        tx: &watch::Sender<FillState>,
    ) {
        let id = registration.fill.id;
        Stats::bump(&self.stats.fills_failed);
        match &error {
            // Already logged at error level where it was detected.
            FillError::Integrity { .. } => {}
            FillError::NotFound { .. } => {
                debug!(bundle.id = %id, error = %error, "fill found nothing")
            }
            FillError::Busy { retry_after, .. } => {
                // Honour the parents' Retry-After here too, so this relay's agents do not
                // turn one refusal into a request to the parents each.
                self.defer(id, *retry_after);
                info!(bundle.id = %id, seconds = retry_after.as_secs(), "every upstream \
                    asked to retry later: not fetching this bundle until then");
            }
            _ => warn!(bundle.id = %id, error = %error, "fill failed"),
        }

        // Unregister before announcing the outcome: a request that sees the outcome and asks
        // again must start afresh, not rejoin the failed fill.
        drop(registration);
        let integrity = matches!(error, FillError::Integrity { .. });
        let retry = integrity && self.upstream.has_unpenalized_source(&id);
        if integrity && !retry {
            let delay = self.hold_off(id);
            warn!(bundle.id = %id, seconds = delay.as_secs(), "every source served corrupt \
                bytes for this bundle: not fetching it again for a while");
        }
        tx.send_modify(|s| s.outcome = Some(Err(error)));

        // Each refetch uses only unpenalized sources, and a failed one penalizes the sources
        // it used, so refetches end after at most one per source.
        if retry {
            info!(bundle.id = %id, "refetching from the next source after failed verification");
            if let Err(e) = self.join_or_start(id, Sources::Unpenalized, true) {
                error!(bundle.id = %id, error = %e, "cannot start refetch");
            }
        }
    }

    /// Pulls the whole body, failing over and resuming across sources. Returns when the
    /// file holds `total` bytes, or with why no source could finish it.
    async fn fetch_all(
        &self,
        transfer: &mut Transfer<'_>,
        which: Sources,
    ) -> Result<(), FillError> {
        let id = transfer.id;
        let sources = match which {
            Sources::All => self.upstream.sources(&id),
            Sources::Unpenalized => self.upstream.unpenalized_sources(&id),
        };
        if sources.is_empty() {
            return Err(FillError::NoUpstream { id });
        }

        let mut failures: Vec<FetchError> = Vec::new();
        let mut n = 0;
        while let Some(source) = sources.get(n) {
            match self.fetch_from(source, transfer).await {
                Ok(()) => return Ok(()),
                Err(CopyError::Local(e)) if !transfer.spill => {
                    // The cache dir stopped taking writes: move to a spill file and ask the
                    // same source for the rest.
                    self.cache.note_unwritable(&e);
                    transfer.move_to_spill().await.map_err(|e| {
                        error!(bundle.id = %id, error = %e, "cannot spill the fill either");
                        FillError::Local {
                            id,
                            message: e.to_string(),
                        }
                    })?;
                    continue;
                }
                Err(CopyError::Local(e)) => {
                    error!(bundle.id = %id, error = %e, "cannot write the fill");
                    return Err(FillError::Local {
                        id,
                        message: e.to_string(),
                    });
                }
                Err(CopyError::Source(e)) => {
                    // A 404 is an answer, and so is a parent relay's "retry later" (about
                    // this bundle, or its load at the moment); an origin's 503 is a
                    // failing origin.
                    let answered = matches!(
                        e,
                        FetchError::NotFound { .. }
                            | FetchError::Busy {
                                from_relay: true,
                                ..
                            }
                    );
                    if !answered {
                        self.upstream.record_failure(source.index, &e);
                    }
                    log_source_failure(&id, source, &e, transfer.written, n + 1 < sources.len());
                    failures.push(e);
                }
            }
            if n + 1 < sources.len() {
                Stats::bump(&self.stats.failovers);
                self.upstream.record_failover(source.index);
            }
            n += 1;
        }
        Err(summarize(id, &failures))
    }

    /// Copies what `source` has from the current offset on.
    async fn fetch_from(&self, source: &Source, t: &mut Transfer<'_>) -> Result<(), CopyError> {
        Stats::bump(&self.stats.upstream_requests);
        let opened = self
            .upstream
            .open(source, &t.id, t.written, t.total)
            .await?;
        t.last_source = source.label().to_string();
        if t.total.is_none() {
            t.total = Some(opened.total);
            t.tx.send_modify(|s| s.total = Some(opened.total));
        }
        if t.room.is_none() {
            t.room = Some(if t.spill {
                Room::Unwritable
            } else {
                self.reserve_room(t.id, opened.total).await?
            });
        }

        let before = t.written;
        let copied = t.copy_body(opened, self.upstream.stall_timeout()).await;
        if t.written > before || t.total == Some(0) {
            t.sources_used.push(source.index);
        }
        copied
    }

    /// Asks the cache for room for the bundle; a bundle that cannot have it is still
    /// fetched and served, just not kept.
    async fn reserve_room(&self, id: BundleId, bytes: u64) -> Result<Room, CopyError> {
        let cache = self.cache.clone();
        let room = tokio::task::spawn_blocking(move || cache.reserve(&id, bytes))
            .await
            .map_err(|e| CopyError::Local(std::io::Error::other(e)))?;
        match room {
            Room::Granted(_) => {}
            Room::TooLarge => warn!(bundle.id = %id, bytes,
                "bundle is larger than cache_max; serving it pass-through without caching"),
            Room::Unwritable => {}
            Room::Full => warn!(bundle.id = %id, bytes,
                "no room in the cache (the rest is pinned or being read); serving pass-through"),
        }
        Ok(room)
    }

    /// Checks the hash of everything the transfer wrote against the id.
    fn verify(&self, transfer: &Transfer<'_>) -> Result<(), FillError> {
        let id = transfer.id;
        let hash = transfer.hasher.finalize();
        if id.matches(&hash) {
            return Ok(());
        }

        self.stats.integrity_failure(id);
        for &source in &transfer.sources_used {
            self.upstream.penalize(source, &id);
        }
        error!(bundle.id = %id, upstream.url = %transfer.last_source, actual = %hash.to_hex(),
            "integrity failure: content does not match its id; nothing cached");
        Err(FillError::Integrity {
            id,
            actual: hash.to_hex().to_string(),
        })
    }
}

/// The state of one fill's transfer as it moves between sources.
struct Transfer<'a> {
    id: BundleId,
    file: Arc<File>,
    tx: &'a watch::Sender<FillState>,
    limits: &'a Limits,
    /// Set while an agent waits for this fill (see [`Fill`]).
    urgent: Arc<AtomicBool>,
    stats: &'a Stats,
    hasher: blake3::Hasher,
    written: u64,
    total: Option<u64>,
    /// Whether the cache has room to keep the bundle, decided once its length is known.
    room: Option<Room>,
    /// Writing to a spill file outside the cache: never kept.
    spill: bool,
    /// The fill's file in the cache's tmp/, unlinked early if the fill moves to a spill.
    temp: &'a TempFile,
    /// Sources that contributed bytes, blamed together if the hash does not match.
    sources_used: Vec<usize>,
    last_source: String,
}

impl<'a> Transfer<'a> {
    fn new(
        id: BundleId,
        temp: &'a TempFile,
        tx: &'a watch::Sender<FillState>,
        limits: &'a Limits,
        stats: &'a Stats,
        urgent: Arc<AtomicBool>,
    ) -> Self {
        Self {
            id,
            file: temp.file().clone(),
            tx,
            limits,
            urgent,
            stats,
            hasher: blake3::Hasher::new(),
            written: 0,
            total: None,
            room: None,
            spill: temp.is_spill(),
            temp,
            sources_used: Vec::new(),
            last_source: String::new(),
        }
    }

    /// Streams `opened` into the file until the body ends. Data is gathered up to
    /// [`WRITE_CHUNK`] and written whenever the upstream has nothing more ready, so followers
    /// see bytes as soon as they arrive without a write per network frame.
    async fn copy_body(&mut self, opened: Opened, stall: Duration) -> Result<(), CopyError> {
        let Opened {
            mut body,
            url,
            total,
        } = opened;
        let mut buf = BytesMut::with_capacity(WRITE_CHUNK);
        let mut ready: Option<Option<Result<Frame<Bytes>, hyper::Error>>> = None;

        loop {
            let next = match ready.take() {
                Some(next) => next,
                None => {
                    self.flush(&mut buf).await?;
                    match tokio::time::timeout(stall, body.frame()).await {
                        Ok(next) => next,
                        Err(_) => {
                            let offset = self.written;
                            let stalled = FetchError::Stalled {
                                url,
                                after: stall,
                                offset,
                            };
                            return Err(stalled.into());
                        }
                    }
                }
            };

            match next {
                None => {
                    self.flush(&mut buf).await?;
                    return self.check_complete(total, url);
                }
                Some(Err(e)) => {
                    // Bytes that arrived before the error are good; keep them for the resume.
                    self.flush(&mut buf).await?;
                    let message = format!("body: {e}");
                    return Err(FetchError::Transport { url, message }.into());
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.written + (buf.len() + data.len()) as u64 > total {
                            let message = "sent more bytes than its length".to_string();
                            return Err(FetchError::Protocol { url, message }.into());
                        }
                        // The WAN cap: not reading on holds the parent back through TCP.
                        let priority = if self.urgent.load(Ordering::Relaxed) {
                            Priority::OnDemand
                        } else {
                            Priority::Background
                        };
                        self.limits.take_upstream(data.len(), priority).await;
                        buf.extend_from_slice(&data);
                    }
                    if buf.len() >= WRITE_CHUNK {
                        self.flush(&mut buf).await?;
                    }
                    ready = next_frame_if_ready(&mut body);
                }
            }
        }
    }

    /// Continues the fill in an unnamed spill file outside the cache: copies what was
    /// written so far, points followers at it, and gives up the cache reservation (the
    /// bundle is served pass-through and not kept).
    async fn move_to_spill(&mut self) -> std::io::Result<()> {
        let (old, written) = (self.file.clone(), self.written);
        let spill = tokio::task::spawn_blocking(move || {
            let spill = tempfile::tempfile()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut offset = 0;
            while offset < written {
                let n = buf.len().min((written - offset) as usize);
                old.read_exact_at(&mut buf[..n], offset)?;
                spill.write_all_at(&buf[..n], offset)?;
                offset += n as u64;
            }
            Ok::<_, std::io::Error>(Arc::new(spill))
        })
        .await
        .map_err(std::io::Error::other)??;

        warn!(bundle.id = %self.id, bytes = written,
            "cache dir stopped taking writes mid-fill; continuing pass-through");
        self.tx.send_modify(|s| s.spill = Some(spill.clone()));
        // Give the full disk its space back now; readers of the old file keep their handle.
        self.temp.unlink();
        self.file = spill;
        self.spill = true;
        self.room = Some(Room::Unwritable);
        Ok(())
    }

    fn check_complete(&self, total: u64, url: String) -> Result<(), CopyError> {
        if self.written == total {
            return Ok(());
        }
        let message = format!("body ended at {} of {total} bytes", self.written);
        Err(FetchError::Transport { url, message }.into())
    }

    /// Writes and hashes the gathered bytes, then tells followers. On a write error the
    /// hash state is kept as it was, matching `written`.
    async fn flush(&mut self, buf: &mut BytesMut) -> Result<(), CopyError> {
        if buf.is_empty() {
            return Ok(());
        }
        let data = buf.split().freeze();
        let len = data.len() as u64;
        let offset = self.written;
        let file = self.file.clone();
        let mut hasher = std::mem::take(&mut self.hasher);

        let joined = tokio::task::spawn_blocking(move || {
            let written = file.write_all_at(&data, offset);
            if written.is_ok() {
                hasher.update(&data);
            }
            (hasher, written)
        })
        .await;
        let (hasher, written) = joined.map_err(|e| CopyError::Local(std::io::Error::other(e)))?;
        self.hasher = hasher;
        written.map_err(CopyError::Local)?;

        self.written += len;
        self.stats.upstream_bytes.fetch_add(len, Ordering::Relaxed);
        let written = self.written;
        self.tx.send_modify(|s| s.written = written);
        Ok(())
    }
}

/// A fill whose bytes hashed to its id, ready to be committed.
struct Verified {
    temp: TempFile,
    room: Option<Room>,
    started: Instant,
    last_source: String,
}

/// Why copying from one source stopped: the source's fault (try the next) or ours (stop).
enum CopyError {
    Source(FetchError),
    Local(std::io::Error),
}

impl From<FetchError> for CopyError {
    fn from(e: FetchError) -> Self {
        Self::Source(e)
    }
}

/// Which sources a fill may use.
#[derive(Debug, Clone, Copy)]
enum Sources {
    /// All, in the configured order (recently corrupt ones last).
    All,
    /// Only those not recently caught serving corrupt bytes for this bundle (refetches).
    Unpenalized,
}

/// A fill's entry in the registry, removed when this is dropped: when the fill ends, and
/// also if its task panics or is aborted, so a dead fill can never be joined.
struct Registration {
    fills: Arc<Fills>,
    fill: Arc<Fill>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut running = self.fills.running.lock().unwrap_or_else(|e| e.into_inner());
        // A refetch may already have registered a new fill under the same id.
        if running
            .get(&self.fill.id)
            .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
        {
            running.remove(&self.fill.id);
        }
    }
}

/// Polls the body once: the next frame if it is already here, `None` if we would wait.
fn next_frame_if_ready(body: &mut Incoming) -> Option<Option<Result<Frame<Bytes>, hyper::Error>>> {
    // Dropping a pending `frame()` future loses nothing: it only polls the body.
    body.frame().now_or_never()
}

fn log_source_failure(id: &BundleId, source: &Source, e: &FetchError, offset: u64, more: bool) {
    match (e, more) {
        (FetchError::NotFound { .. }, _) => {
            debug!(bundle.id = %id, upstream.url = %source.label(), "source does not have it");
        }
        (_, true) => warn!(bundle.id = %id, upstream.url = %source.label(), error = %e, offset,
            "upstream failed; failing over to the next source"),
        (_, false) => warn!(bundle.id = %id, upstream.url = %source.label(), error = %e, offset,
            "upstream failed; no source left"),
    }
}

/// One error for a fill that no source could finish.
fn summarize(id: BundleId, failures: &[FetchError]) -> FillError {
    if failures
        .iter()
        .all(|f| matches!(f, FetchError::NotFound { .. }))
    {
        return FillError::NotFound { id };
    }
    // Every source that has it said "later": the shortest wait any asked for.
    let waits: Option<Vec<Duration>> = failures
        .iter()
        .filter(|f| !matches!(f, FetchError::NotFound { .. }))
        .map(|f| match f {
            FetchError::Busy { retry_after, .. } => Some(*retry_after),
            _ => None,
        })
        .collect();
    if let Some(retry_after) = waits.and_then(|waits| waits.into_iter().min()) {
        return FillError::Busy { id, retry_after };
    }
    let last = failures
        .iter()
        .rev()
        .find(|f| !matches!(f, FetchError::NotFound { .. }))
        .map_or_else(String::new, ToString::to_string);
    let timeout = failures
        .iter()
        .filter(|f| !matches!(f, FetchError::NotFound { .. }))
        .all(FetchError::is_timeout);
    FillError::Upstream { id, timeout, last }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_off_after_corrupt_sources_doubles_up_to_five_minutes() {
        let delays: Vec<u64> = (1..=7).map(|n| hold_off_delay(n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(hold_off_delay(u32::MAX), HOLD_OFF_MAX);
    }
}
