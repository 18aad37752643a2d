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
//! - *busy*: a request is being answered: no phase deadline (a rate-limited download may
//!   take hours);
//! - *idle*: the last response is done and nothing has arrived since: closed after
//!   `idle_timeout` without a write, so a response still draining to a slow client is never
//!   cut.
//!
//! In every phase, a write the socket has not taken for `send_timeout` (the client stopped
//! reading) ends the connection. The bytes counted are the socket's, beneath TLS, so the
//! tail of a response draining out of the TLS buffer counts as progress too.

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
    /// The socket took no byte for `send_timeout` while there was something to send.
    Send,
}

/// The phase and deadlines of one connection, shared by its IO, its service and its task.
#[derive(Debug)]
pub struct ConnClock {
    phase: Mutex<Phase>,
    /// Milliseconds from `start` to the last write, so writes need no lock.
    last_write_ms: AtomicU64,
    /// Since when (milliseconds from `start`, plus 1) a write has been waiting for the
    /// socket; 0 while none is.
    write_pending_ms: AtomicU64,
    start: Instant,
    header_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
    /// Woken when a phase with a deadline begins (idle after the last response, head after
    /// idling), so [`watch`] does not sleep past a deadline set after it went to sleep.
    changed: Notify,
}

impl ConnClock {
    /// The clock of a connection accepted now: in the head phase.
    pub fn new(timeouts: Timeouts) -> Arc<Self> {
        let start = Instant::now();
        Arc::new(Self {
            phase: Mutex::new(Phase::Head(start)),
            last_write_ms: AtomicU64::new(0),
            write_pending_ms: AtomicU64::new(0),
            start,
            header_timeout: timeouts.header,
            idle_timeout: timeouts.idle,
            send_timeout: timeouts.send,
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

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn on_write(&self) {
        self.last_write_ms
            .store(self.elapsed_ms(), Ordering::Relaxed);
        self.write_pending_ms.store(0, Ordering::Relaxed);
    }

    /// The socket would not take a write: the send clock runs from the first such refusal.
    fn on_write_pending(&self) {
        let since = self.elapsed_ms() + 1;
        let _ =
            self.write_pending_ms
                .compare_exchange(0, since, Ordering::Relaxed, Ordering::Relaxed);
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
            clock: self.clone(),
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

    /// When to look at the connection again: its phase's deadline or the send deadline,
    /// and at least every half send timeout (a write starts waiting without waking
    /// [`watch`], so a stuck client is found within one and a half send timeouts).
    fn next_check(&self, now: Instant) -> Instant {
        let mut at = now + self.send_timeout / 2;
        if let Some((phase_end, _)) = self.phase_deadline() {
            at = at.min(phase_end);
        }
        self.send_deadline().map_or(at, |send| at.min(send))
    }

    /// Which deadline has passed at `now`, if any.
    fn expired(&self, now: Instant) -> Option<Expired> {
        if self.send_deadline().is_some_and(|send| send <= now) {
            return Some(Expired::Send);
        }
        self.phase_deadline()
            .and_then(|(at, which)| (at <= now).then_some(which))
    }

    /// When the current phase runs out, and which deadline that is; `None` while busy.
    fn phase_deadline(&self) -> Option<(Instant, Expired)> {
        match *self.phase() {
            Phase::Head(since) => Some((since + self.header_timeout, Expired::Head)),
            Phase::Idle(since) => {
                let end = since.max(self.last_write()) + self.idle_timeout;
                Some((end, Expired::Idle))
            }
            Phase::Busy(_) => None,
        }
    }

    fn last_write(&self) -> Instant {
        self.start + Duration::from_millis(self.last_write_ms.load(Ordering::Relaxed))
    }

    fn send_deadline(&self) -> Option<Instant> {
        match self.write_pending_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(self.start + Duration::from_millis(since - 1) + self.send_timeout),
        }
    }
}

/// A connection's deadlines (from `[server]`).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
    pub send: Duration,
}

/// A request in flight; ends it when dropped.
#[derive(Debug)]
pub struct InFlight {
    clock: Arc<ConnClock>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.clock.request_done();
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
        let at = clock.next_check(Instant::now());
        tokio::select! {
            done = &mut connection => return Ok(done),
            _ = clock.changed.notified() => {}
            _ = tokio::time::sleep_until(at) => {
                // The phase may have moved on while this slept: look again.
                if let Some(which) = clock.expired(Instant::now()) {
                    return Err(which);
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

    fn note_write(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Ready(Ok(n)) if *n > 0 => self.clock.on_write(),
            Poll::Pending => self.clock.on_write_pending(),
            Poll::Ready(_) => {}
        }
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
        self.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&polled);
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
    const SEND: Duration = Duration::from_secs(30);

    fn clock() -> Arc<ConnClock> {
        ConnClock::new(Timeouts {
            header: HEAD,
            idle: IDLE,
            send: SEND,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_no_head_expires_after_the_header_timeout() {
        let clock = clock();
        let started = Instant::now();
        let ended = watch(std::future::pending::<()>(), &clock).await;
        assert_eq!(ended, Err(Expired::Head));
        assert_eq!(started.elapsed(), HEAD);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_after_a_response_is_bounded_by_the_idle_timeout_alone() {
        let clock = clock();
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
        let clock = clock();
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
        let clock = ConnClock::new(Timeouts {
            header: Duration::from_secs(30),
            idle: Duration::from_secs(1),
            send: SEND,
        });
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
        let clock = clock();
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
    async fn a_client_that_stops_reading_mid_download_is_cut_after_the_send_timeout() {
        let clock = clock();
        let stuck = {
            let clock = clock.clone();
            async move {
                let _request = clock.request_started();
                tokio::time::sleep(Duration::from_secs(5)).await;
                // The socket takes nothing more, from here on.
                clock.on_write_pending();
                std::future::pending::<()>().await
            }
        };
        let started = Instant::now();
        assert_eq!(watch(stuck, &clock).await, Err(Expired::Send));
        assert_eq!(started.elapsed(), Duration::from_secs(5) + SEND);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_download_that_makes_progress_is_never_cut() {
        let clock = clock();
        let slow = {
            let clock = clock.clone();
            async move {
                let _request = clock.request_started();
                for _ in 0..12 {
                    // Full socket buffer, then a little taken, again and again.
                    clock.on_write_pending();
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    clock.on_write();
                }
                "done"
            }
        };
        assert_eq!(watch(slow, &clock).await, Ok("done"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_by_itself_reports_its_output() {
        let clock = clock();
        assert_eq!(watch(async { 7 }, &clock).await, Ok(7));
    }
}
