//! The clock of one client connection: how long a client may take to send a request head
//! (`[server] header_timeout`, against slowloris clients), and how long a keep-alive
//! connection may sit idle between requests (`[server] idle_timeout`).
//!
//! hyper has a single timer for both (its header read timeout also runs while a keep-alive
//! connection waits for the next request), so the relay keeps its own. [`Metered`] notes the
//! bytes a connection reads and writes, [`ConnClock::request_started`] and the
//! [`Tracked`] response body note when a request begins and when its response is done, and
//! [`watch`] ends the connection at the deadline of the phase it is in:
//!
//! - *head*: from accepting the connection, or from the first byte after an idle spell, until
//!   a whole request head has arrived: at most `header_timeout`;
//! - *busy*: a request is being answered: no deadline here (downloads have their own stall
//!   and rate rules);
//! - *idle*: the last response is done and nothing has arrived since: closed after
//!   `idle_timeout` without a write, so a response still draining to a slow client is never
//!   cut.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// What the connection is doing, as far as its deadlines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head since this instant.
    Head(Instant),
    /// This many requests are being answered.
    Busy(usize),
    /// The last response ended at this instant and nothing has been read since.
    Idle(Instant),
}

/// Which deadline ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No whole request head within `header_timeout`.
    Head,
    /// Idle for `idle_timeout` after its last response.
    Idle,
}

/// The phase and deadlines of one connection, shared by its IO, its service and its task.
#[derive(Debug)]
pub struct ConnClock {
    phase: Mutex<Phase>,
    /// Milliseconds from `start` to the last write, so writes need no lock.
    last_write_ms: AtomicU64,
    start: Instant,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// Woken when a phase with a deadline begins (idle after the last response, head after
    /// idling), so [`watch`] does not sleep past a deadline set after it went to sleep.
    changed: Notify,
}

impl ConnClock {
    /// The clock of a connection accepted now: in the head phase.
    pub fn new(header_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        let start = Instant::now();
        Arc::new(Self {
            phase: Mutex::new(Phase::Head(start)),
            last_write_ms: AtomicU64::new(0),
            start,
            header_timeout,
            idle_timeout,
            changed: Notify::new(),
        })
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived: after an idle spell they begin the next request head.
    fn on_read(&self) {
        let mut phase = self.phase();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now());
            drop(phase);
            // The header deadline may come before the idle one [`watch`] sleeps to.
            self.changed.notify_one();
        }
    }

    fn on_write(&self) {
        let ms = self.start.elapsed().as_millis();
        self.last_write_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// A whole request head arrived; the request counts as in flight until the returned
    /// guard (moved into the response body by [`Tracked`]) is dropped.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        let mut phase = self.phase();
        *phase = match *phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Head(_) | Phase::Idle(_) => Phase::Busy(1),
        };
        InFlight {
            clock: Some(self.clone()),
        }
    }

    fn request_done(&self) {
        let mut phase = self.phase();
        match *phase {
            Phase::Busy(n) if n > 1 => *phase = Phase::Busy(n - 1),
            Phase::Busy(_) => {
                *phase = Phase::Idle(Instant::now());
                drop(phase);
                self.changed.notify_one();
            }
            Phase::Head(_) | Phase::Idle(_) => {}
        }
    }

    /// When the current phase runs out, and which deadline that is; `None` while busy.
    fn deadline(&self) -> Option<(Instant, Expired)> {
        match *self.phase() {
            Phase::Busy(_) => None,
            Phase::Head(since) => Some((since + self.header_timeout, Expired::Head)),
            Phase::Idle(since) => {
                let written =
                    self.start + Duration::from_millis(self.last_write_ms.load(Ordering::Relaxed));
                Some((since.max(written) + self.idle_timeout, Expired::Idle))
            }
        }
    }
}

/// A request in flight; ends it when dropped.
#[derive(Debug)]
pub struct InFlight {
    clock: Option<Arc<ConnClock>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(clock) = self.clock.take() {
            clock.request_done();
        }
    }
}

/// Drives `connection` until it ends or its clock runs out; then it is dropped, which
/// closes the socket. Returns its output, or the deadline that ended it.
pub async fn watch<C, T>(connection: C, clock: &ConnClock) -> Result<T, Expired>
where
    C: Future<Output = T>,
{
    tokio::pin!(connection);
    loop {
        let deadline = clock.deadline();
        tokio::select! {
            done = &mut connection => return Ok(done),
            _ = clock.changed.notified() => {}
            _ = tokio::time::sleep_until(deadline.map_or_else(Instant::now, |d| d.0)),
                if deadline.is_some() =>
            {
                // The phase may have moved on while this slept: look again.
                if let Some((at, which)) = clock.deadline() {
                    if at <= Instant::now() {
                        return Err(which);
                    }
                }
            }
        }
    }
}

/// A connection's stream, noting reads and writes on its [`ConnClock`].
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    clock: Arc<ConnClock>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, clock: Arc<ConnClock>) -> Self {
        Self { inner, clock }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.on_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            if n > 0 {
                self.clock.on_write();
            }
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            if n > 0 {
                self.clock.on_write();
            }
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that keeps its request in flight until hyper is done with it.
#[derive(Debug)]
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Self {
        Self {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: Duration = Duration::from_secs(2);
    const IDLE: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_no_head_expires_after_the_header_timeout() {
        let clock = ConnClock::new(HEAD, IDLE);
        let started = Instant::now();
        let ended = watch(std::future::pending::<()>(), &clock).await;
        assert_eq!(ended, Err(Expired::Head));
        assert_eq!(started.elapsed(), HEAD);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_after_a_response_is_bounded_by_the_idle_timeout_alone() {
        let clock = ConnClock::new(HEAD, IDLE);
        let request = clock.request_started();
        let finish = {
            let clock = clock.clone();
            async move {
                // A long download: busy, so neither deadline runs.
                tokio::time::sleep(Duration::from_secs(60)).await;
                clock.on_write();
                drop(request);
                std::future::pending::<()>().await
            }
        };
        let started = Instant::now();
        let ended = watch(finish, &clock).await;
        assert_eq!(ended, Err(Expired::Idle));
        assert_eq!(started.elapsed(), Duration::from_secs(60) + IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_byte_after_idling_starts_the_header_clock() {
        let clock = ConnClock::new(HEAD, IDLE);
        drop(clock.request_started());
        let slow_head = {
            let clock = clock.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                clock.on_read();
                std::future::pending::<()>().await
            }
        };
        let started = Instant::now();
        assert_eq!(watch(slow_head, &clock).await, Err(Expired::Head));
        assert_eq!(started.elapsed(), Duration::from_secs(5) + HEAD);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_idle_timeout_ends_a_connection_that_began_under_a_long_header_clock() {
        let clock = ConnClock::new(Duration::from_secs(30), Duration::from_secs(1));
        let one_request = {
            let clock = clock.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                drop(clock.request_started());
                std::future::pending::<()>().await
            }
        };
        let started = Instant::now();
        assert_eq!(watch(one_request, &clock).await, Err(Expired::Idle));
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_still_draining_is_not_idle() {
        let clock = ConnClock::new(HEAD, IDLE);
        drop(clock.request_started());
        let draining = {
            let clock = clock.clone();
            async move {
                // hyper flushes the tail of the response after the body is done.
                for _ in 0..3 {
                    tokio::time::sleep(Duration::from_secs(8)).await;
                    clock.on_write();
                }
                std::future::pending::<()>().await
            }
        };
        let started = Instant::now();
        assert_eq!(watch(draining, &clock).await, Err(Expired::Idle));
        assert_eq!(started.elapsed(), Duration::from_secs(24) + IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_by_itself_reports_its_output() {
        let clock = ConnClock::new(HEAD, IDLE);
        assert_eq!(watch(async { 7 }, &clock).await, Ok(7));
    }
}
