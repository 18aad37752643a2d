//! Limits: the byte-rate caps that keep patching from saturating a branch link or the WAN,
//! and the request and download caps that keep one agent from taking the relay.
//!
//! Byte caps are governor rate limiters counting cells of [`CELL`] bytes. A download takes
//! cells for each piece before sending it (pieces are at most one burst), so a throttled
//! client holds one piece in memory and waits without blocking anyone else. Everyone
//! sharing a cap waits in one FIFO queue (a tokio mutex is fair), so N backlogged
//! downloads each get about 1/N of it. Coalesced clients share one fill, so they spend
//! upstream budget once.
//!
//! The caps in force are rebuilt when a schedule window starts or ends (checked every
//! second against an injectable wall clock) and when the config is reloaded. A download
//! looks the caps up again for every piece, so new caps apply within a piece's time.

use std::collections::HashMap;
use std::fmt::Debug;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::stream;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::Frame;
use tokio::sync::Notify;
use tracing::info;

use crate::body::{ResponseBody, READ_CHUNK};
use crate::bundle::BundleId;
use crate::config::{Caps, LimitsConfig};
use crate::stats::Stats;
use crate::units::format_rate;

/// Bytes per governor cell.
pub const CELL: u64 = 1024;

/// Least burst of a byte cap, and how much of a cap a burst holds by default: enough that
/// timer granularity (about a millisecond) never costs throughput.
const MIN_BURST: u64 = 64 * 1024;
const DEFAULT_BURST_TIME: Duration = Duration::from_millis(50);

/// Retry-After for a refused download: long enough for a running download to progress.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(10);

/// Where the schedule reads the time; tests use [`ManualClock`].
pub trait WallClock: Send + Sync + Debug {
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock set by hand, for testing schedules without waiting for hours.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(now: DateTime<Utc>) -> Self {
        Self(Mutex::new(now))
    }

    pub fn set(&self, now: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }
}

impl WallClock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whose fill is asking for upstream budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// An agent is waiting for this bundle.
    OnDemand,
    /// Pre-staging: goes only when no on-demand fill wants the cap.
    Background,
}

/// A request or download the limits refuse, with when to come back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("too many requests from {client}; retry later")]
    RequestRate {
        client: IpAddr,
        retry_after: Duration,
    },
    #[error("too many downloads at this relay; retry later")]
    Downloads { retry_after: Duration },
    #[error("too many downloads from {client}; retry later")]
    ClientDownloads {
        client: IpAddr,
        retry_after: Duration,
    },
}

impl Refusal {
    /// Whole seconds for the Retry-After header (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        let after = match self {
            Self::RequestRate { retry_after, .. }
            | Self::Downloads { retry_after }
            | Self::ClientDownloads { retry_after, .. } => *retry_after,
        };
        after.as_secs() + u64::from(after.subsec_nanos() > 0).max(u64::from(after.is_zero()))
    }
}

/// One byte cap: a governor limiter and the FIFO queue in front of it.
#[derive(Debug)]
struct ByteLimiter {
    limiter: DefaultDirectRateLimiter,
    queue: tokio::sync::Mutex<()>,
    /// On-demand takers waiting or taking; background takers wait while this is non-zero.
    on_demand: AtomicUsize,
    on_demand_done: Notify,
    piece: usize,
}

/// A byte cap per client address.
#[derive(Debug)]
struct KeyedByteLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    piece: usize,
}

/// The limiters of the caps in force now.
#[derive(Debug, Default)]
struct Active {
    caps: Caps,
    downstream: Option<ByteLimiter>,
    per_client: Option<KeyedByteLimiter>,
    upstream: Option<ByteLimiter>,
}

/// All limits of one relay.
#[derive(Debug)]
pub struct Limits {
    config: RwLock<Arc<LimitsConfig>>,
    active: RwLock<Arc<Active>>,
    requests: RwLock<Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>>,
    downloads: Mutex<Downloads>,
    clock: Arc<dyn WallClock>,
    stats: Arc<Stats>,
}

#[derive(Debug, Default)]
struct Downloads {
    total: u32,
    per_client: HashMap<IpAddr, u32>,
}

/// A download slot, released when dropped (with the response body).
#[derive(Debug)]
pub struct DownloadPermit {
    limits: Arc<Limits>,
    /// The client counted against `max_downloads_per_client`; `None` when exempt.
    client: Option<IpAddr>,
}

impl Drop for DownloadPermit {
    fn drop(&mut self) {
        let mut downloads = self
            .limits
            .downloads
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        downloads.total = downloads.total.saturating_sub(1);
        let Some(client) = self.client else { return };
        if let Some(n) = downloads.per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                downloads.per_client.remove(&client);
            }
        }
    }
}

impl Limits {
    pub fn new(config: LimitsConfig, clock: Arc<dyn WallClock>, stats: Arc<Stats>) -> Arc<Self> {
        let limits = Arc::new(Self {
            config: RwLock::new(Arc::new(LimitsConfig::default())),
            active: RwLock::default(),
            requests: RwLock::default(),
            downloads: Mutex::default(),
            clock,
            stats,
        });
        limits.apply(config, false);
        limits
    }

    /// Applies a new `[limits]` section (at start and on reload). Running downloads pick
    /// the new caps up at their next piece.
    pub fn reconfigure(&self, config: LimitsConfig) {
        self.apply(config, true);
    }

    fn apply(&self, config: LimitsConfig, announce: bool) {
        let requests = config.requests_per_client.map(|(count, period)| {
            let count = NonZeroU32::new(count).unwrap_or(NonZeroU32::MIN);
            // More requests per period than nanoseconds in it: one per nanosecond.
            let each = (period / count.get()).max(Duration::from_nanos(1));
            let quota = Quota::with_period(each)
                .expect("the period is at least 1 ns")
                .allow_burst(count);
            Arc::new(RateLimiter::keyed(quota))
        });
        *self.requests.write().unwrap_or_else(|e| e.into_inner()) = requests;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        self.refresh_caps(true, announce);
    }

    /// Re-reads the clock and rebuilds the limiters if a schedule window started or ended.
    pub fn refresh(&self) {
        self.refresh_caps(false, true);
    }

    /// The lowest upstream cap in force at any time from `from` to `until` (looked at every
    /// 15 minutes, at most two weeks ahead); `None` when it is unlimited throughout. Used to
    /// plan deadlines conservatively across schedule windows.
    pub fn lowest_upstream_cap(&self, from: DateTime<Utc>, until: DateTime<Utc>) -> Option<u64> {
        let config = self
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let step = chrono::Duration::minutes(15);
        let until = until.min(from + chrono::Duration::days(14));
        let mut lowest = config.caps_at(from).upstream;
        let mut t = from;
        while t < until {
            t += step;
            lowest = match (lowest, config.caps_at(t.min(until)).upstream) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        lowest
    }

    /// The caps in force now.
    pub fn caps(&self) -> Caps {
        self.current().caps
    }

    fn refresh_caps(&self, force: bool, announce: bool) {
        let config = self
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let caps = config.caps_at(self.clock.now());
        if !force && caps == self.current().caps {
            return;
        }

        let burst = |rate: u64| config.burst.unwrap_or_else(|| default_burst(rate));
        let active = Active {
            caps,
            downstream: caps
                .downstream
                .map(|rate| ByteLimiter::new(rate, burst(rate))),
            per_client: caps
                .per_client
                .map(|rate| KeyedByteLimiter::new(rate, burst(rate))),
            upstream: caps
                .upstream
                .map(|rate| ByteLimiter::new(rate, burst(rate))),
        };
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(active);
        if !announce {
            return;
        }
        info!(limits.downstream = %format_rate(caps.downstream),
            limits.per_client = %format_rate(caps.per_client),
            limits.upstream = %format_rate(caps.upstream), "limits in force");
    }

    fn current(&self) -> Arc<Active> {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Checks the clock every second until `stop` resolves, so schedule windows take effect
    /// at their edges; also forgets idle per-client state.
    pub async fn run_schedule(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {
                    self.refresh();
                    self.forget_idle_clients();
                }
            }
        }
    }

    fn forget_idle_clients(&self) {
        if let Some(requests) = self
            .requests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            requests.retain_recent();
        }
        if let Some(per_client) = &self.current().per_client {
            per_client.limiter.retain_recent();
        }
    }

    /// Counts a request from `client` against `requests_per_client`.
    pub fn check_request(&self, client: IpAddr) -> Result<(), Refusal> {
        let requests = self
            .requests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(limiter) = requests else {
            return Ok(());
        };
        limiter.check_key(&client).map_err(|not_until| {
            Stats::bump(&self.stats.refused_rate);
            let retry_after = not_until.wait_time_from(limiter.clock().now());
            Refusal::RequestRate {
                client,
                retry_after,
            }
        })
    }

    /// Takes a download slot for `client`, or says why not. `client` is `None` for a
    /// client exempt from the per-client caps (a certified child relay): only
    /// `max_downloads` counts it.
    pub fn start_download(
        self: &Arc<Self>,
        client: Option<IpAddr>,
    ) -> Result<DownloadPermit, Refusal> {
        let config = self
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut downloads = self.downloads.lock().unwrap_or_else(|e| e.into_inner());
        let retry_after = BUSY_RETRY_AFTER;
        if config
            .max_downloads
            .is_some_and(|max| downloads.total >= max)
        {
            Stats::bump(&self.stats.refused_busy);
            return Err(Refusal::Downloads { retry_after });
        }
        if let Some(client) = client {
            let mine = downloads.per_client.get(&client).copied().unwrap_or(0);
            if config
                .max_downloads_per_client
                .is_some_and(|max| mine >= max)
            {
                Stats::bump(&self.stats.refused_busy);
                return Err(Refusal::ClientDownloads {
                    client,
                    retry_after,
                });
            }
            *downloads.per_client.entry(client).or_insert(0) += 1;
        }
        downloads.total += 1;
        Ok(DownloadPermit {
            limits: self.clone(),
            client,
        })
    }

    /// Waits until `bytes` may be pulled from upstream under the upstream cap.
    pub async fn take_upstream(&self, bytes: usize, priority: Priority) {
        let active = self.current();
        if let Some(upstream) = &active.upstream {
            for piece in pieces(bytes, upstream.piece) {
                upstream.take(piece, priority, &self.stats).await;
            }
        }
    }

    /// Waits until `bytes` may be sent to `client` under the downstream caps (`per_client`
    /// only when `capped`).
    async fn take_downstream(&self, client: IpAddr, capped: bool, bytes: usize) {
        let active = self.current();
        if let Some(per_client) = active.per_client.as_ref().filter(|_| capped) {
            per_client.take(client, bytes, &self.stats).await;
        }
        if let Some(downstream) = &active.downstream {
            downstream
                .take(bytes, Priority::OnDemand, &self.stats)
                .await;
        }
    }

    /// The largest piece a download may send at once under the caps in force.
    fn piece_size(&self) -> usize {
        let active = self.current();
        let down = active.downstream.as_ref().map_or(READ_CHUNK, |l| l.piece);
        let client = active.per_client.as_ref().map_or(READ_CHUNK, |l| l.piece);
        down.min(client)
    }

    /// Wraps a response body so it is sent under the downstream caps, holding `permit`
    /// (if any) until the body ends or is dropped.
    pub fn throttle(
        self: &Arc<Self>,
        body: ResponseBody,
        client: IpAddr,
        permit: Option<DownloadPermit>,
        bundle: Option<(BundleId, u64)>,
    ) -> ResponseBody {
        // A permit without a client is an exempt client's: no per-client cap either.
        let capped = permit.as_ref().is_none_or(|p| p.client.is_some());
        let state = Throttled {
            limits: self.clone(),
            client,
            capped,
            frames: BodyStream::new(body),
            rest: Bytes::new(),
            _permit: permit,
            bundle: bundle.map(|(id, _)| id),
            remaining: bundle.map_or(0, |(_, len)| len),
            finished: false,
        };
        let pieces = stream::unfold(state, |mut state| async move {
            let piece = state.next_piece().await?;
            Some((piece.map(Frame::data), state))
        });
        StreamBody::new(pieces).boxed()
    }
}

/// A response body on its way out under the caps.
struct Throttled {
    limits: Arc<Limits>,
    client: IpAddr,
    /// Whether the per-client cap applies (not to a certified child relay).
    capped: bool,
    frames: BodyStream<ResponseBody>,
    /// Bytes of the current frame not yet sent.
    rest: Bytes,
    _permit: Option<DownloadPermit>,
    /// The bundle downloaded, counted as completed or failed when the body is dropped.
    bundle: Option<BundleId>,
    /// Body bytes still to send; the download completed when it reaches zero (hyper stops
    /// polling a body once Content-Length bytes are out).
    remaining: u64,
    finished: bool,
}

impl Drop for Throttled {
    fn drop(&mut self) {
        if let Some(bundle) = self.bundle {
            self.limits
                .stats
                .download_ended(self.client, bundle, self.finished);
        }
    }
}

impl Throttled {
    async fn next_piece(&mut self) -> Option<std::io::Result<Bytes>> {
        use futures_util::StreamExt;
        while self.rest.is_empty() {
            let Some(frame) = self.frames.next().await else {
                self.finished = true;
                return None;
            };
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        self.rest = data;
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
        let len = self.rest.len().min(self.limits.piece_size());
        let piece = self.rest.split_to(len);
        self.limits
            .take_downstream(self.client, self.capped, len)
            .await;
        self.remaining = self.remaining.saturating_sub(len as u64);
        if self.remaining == 0 {
            self.finished = true;
        }
        self.limits
            .stats
            .bytes_out
            .fetch_add(len as u64, Ordering::Relaxed);
        Some(Ok(piece))
    }
}

impl ByteLimiter {
    fn new(rate: u64, burst: u64) -> Self {
        let (quota, piece) = byte_quota(rate, burst);
        Self {
            limiter: RateLimiter::direct(quota),
            queue: tokio::sync::Mutex::new(()),
            on_demand: AtomicUsize::new(0),
            on_demand_done: Notify::new(),
            piece,
        }
    }

    async fn take(&self, bytes: usize, priority: Priority, stats: &Stats) {
        let _queue = match priority {
            Priority::OnDemand => {
                self.on_demand.fetch_add(1, Ordering::SeqCst);
                self.queue.lock().await
            }
            Priority::Background => loop {
                let done = self.on_demand_done.notified();
                if self.on_demand.load(Ordering::SeqCst) == 0 {
                    break self.queue.lock().await;
                }
                done.await;
            },
        };
        let limiter = &self.limiter;
        wait_for_cells(|n| limiter.check_n(n), limiter.clock(), bytes, stats).await;
        if priority == Priority::OnDemand {
            self.on_demand.fetch_sub(1, Ordering::SeqCst);
            self.on_demand_done.notify_waiters();
        }
    }
}

impl KeyedByteLimiter {
    fn new(rate: u64, burst: u64) -> Self {
        let (quota, piece) = byte_quota(rate, burst);
        Self {
            limiter: RateLimiter::keyed(quota),
            piece,
        }
    }

    async fn take(&self, client: IpAddr, bytes: usize, stats: &Stats) {
        let limiter = &self.limiter;
        wait_for_cells(
            |n| limiter.check_key_n(&client, n),
            limiter.clock(),
            bytes,
            stats,
        )
        .await;
    }
}

/// Waits until `check` grants the cells for `bytes`, counting the time as throttled.
async fn wait_for_cells<F, E>(check: F, clock: &DefaultClock, bytes: usize, stats: &Stats)
where
    F: Fn(NonZeroU32) -> Result<Result<(), governor::NotUntil<E>>, governor::InsufficientCapacity>,
    E: governor::clock::Reference,
    DefaultClock: Clock<Instant = E>,
{
    let cells = (bytes as u64).div_ceil(CELL).max(1);
    let cells =
        NonZeroU32::new(u32::try_from(cells).unwrap_or(u32::MAX)).expect("at least one cell");
    loop {
        match check(cells) {
            Ok(Ok(())) => return,
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(clock.now());
                stats
                    .throttled_nanos
                    .fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
            }
            // Pieces are cut to fit the burst; should one not, let it through rather than
            // stall the download forever.
            Err(_) => return,
        }
    }
}

/// The governor quota for `rate` bytes/s with `burst` bytes, and the piece size.
///
/// A piece is about 10 ms of the cap (at least one cell, at most the burst and one read
/// chunk): small enough that downloads sharing a slow cap take turns often, so each gets
/// its share over a few seconds; large enough that a fast cap costs few wake-ups.
fn byte_quota(rate: u64, burst: u64) -> (Quota, usize) {
    let per_cell = Duration::from_nanos((1_000_000_000 * CELL / rate.max(1)).max(1));
    let burst_cells = (burst / CELL).max(1);
    let cells =
        NonZeroU32::new(u32::try_from(burst_cells).unwrap_or(u32::MAX)).expect("at least one cell");
    let quota = Quota::with_period(per_cell)
        .expect("period is at least 1 ns")
        .allow_burst(cells);
    let turn = (rate / 100 / CELL).max(1) * CELL;
    let piece = turn.min(burst_cells * CELL).min(READ_CHUNK as u64) as usize;
    (quota, piece)
}

fn default_burst(rate: u64) -> u64 {
    let share = rate as u128 * DEFAULT_BURST_TIME.as_nanos() / 1_000_000_000;
    (share as u64).max(MIN_BURST)
}

/// Splits `bytes` into pieces of at most `piece`.
fn pieces(bytes: usize, piece: usize) -> impl Iterator<Item = usize> {
    let piece = piece.max(1);
    (0..bytes.div_ceil(piece)).map(move |i| (bytes - i * piece).min(piece))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_upstream_cap_looks_across_schedule_windows() {
        use chrono::TimeZone;

        use crate::config::Window;

        let config = LimitsConfig {
            caps: Caps {
                upstream: Some(1_000_000),
                ..Caps::default()
            },
            schedule: vec![Window {
                days: 0b111_1111,
                from: 8 * 60,
                to: 18 * 60,
                downstream: None,
                per_client: None,
                upstream: Some(Some(100_000)),
            }],
            ..LimitsConfig::default()
        };
        let limits = Limits::new(config, Arc::new(SystemClock), Arc::default());
        let at = |h| Utc.with_ymd_and_hms(2026, 12, 7, h, 0, 0).unwrap();
        assert_eq!(
            limits.lowest_upstream_cap(at(1), at(5)),
            Some(1_000_000),
            "night only"
        );
        assert_eq!(
            limits.lowest_upstream_cap(at(1), at(9)),
            Some(100_000),
            "into the day"
        );
    }

    #[test]
    fn an_absurd_request_rate_does_not_panic() {
        let config = LimitsConfig {
            requests_per_client: Some((2_000_000_000, Duration::from_secs(1))),
            ..LimitsConfig::default()
        };
        let limits = Limits::new(config, Arc::new(SystemClock), Arc::default());
        assert!(limits.check_request(IpAddr::from([127, 0, 0, 1])).is_ok());
    }

    #[test]
    fn pieces_cover_the_bytes() {
        assert_eq!(pieces(10, 4).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(pieces(8, 4).collect::<Vec<_>>(), [4, 4]);
        assert_eq!(pieces(0, 4).count(), 0);
    }

    #[test]
    fn pieces_are_about_10ms_of_the_cap() {
        assert_eq!(byte_quota(125_000, 64 * 1024).1, 1024, "1 Mbit/s");
        assert_eq!(byte_quota(12_500_000, 625_000).1, 122 * 1024, "100 Mbit/s");
        assert_eq!(byte_quota(125_000_000, 6_250_000).1, READ_CHUNK, "1 Gbit/s");
        assert_eq!(
            byte_quota(125_000_000, 8192).1,
            8192,
            "never above the burst"
        );
    }

    #[test]
    fn default_burst_is_50ms_of_the_cap_but_at_least_64_kib() {
        assert_eq!(default_burst(125_000), 64 * 1024);
        assert_eq!(default_burst(125_000_000), 6_250_000);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let client = IpAddr::from([127, 0, 0, 1]);
        let refusal = |ms| Refusal::RequestRate {
            client,
            retry_after: Duration::from_millis(ms),
        };
        assert_eq!(refusal(0).retry_after_secs(), 1);
        assert_eq!(refusal(200).retry_after_secs(), 1);
        assert_eq!(refusal(1000).retry_after_secs(), 1);
        assert_eq!(refusal(1001).retry_after_secs(), 2);
    }

    #[tokio::test]
    async fn on_demand_takers_go_before_a_waiting_background_one() {
        let stats = Stats::default();
        // 100 KiB/s with a 10 KiB burst: each 10 KiB piece waits about 0.1 s.
        let limiter = Arc::new(ByteLimiter::new(100 * 1024, 10 * 1024));
        limiter.take(10 * 1024, Priority::OnDemand, &stats).await;

        let order = Arc::new(Mutex::new(Vec::new()));
        let spawn = |name: &'static str, priority| {
            let (limiter, order) = (limiter.clone(), order.clone());
            tokio::spawn(async move {
                limiter.take(10 * 1024, priority, &Stats::default()).await;
                order.lock().unwrap().push(name);
            })
        };
        let first = spawn("on-demand 1", Priority::OnDemand);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let background = spawn("background", Priority::Background);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = spawn("on-demand 2", Priority::OnDemand);
        for task in [first, background, second] {
            task.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["on-demand 1", "on-demand 2", "background"]
        );
    }
}
