//! Response bodies that stream a byte range of a bundle file, cached or still filling.
//!
//! A body reads the shared file with positioned reads on the blocking pool, one bounded
//! chunk at a time, so memory per download is a chunk whatever the bundle size or the
//! client's speed. Following a fill, it reads up to the length the fill has published and
//! waits for more.
//!
//! It never sends the bundle's final byte before the fill has verified the whole bundle,
//! and a failed fill ends the body in an error, which aborts the connection. So no client
//! ever holds a complete response of unverified bytes. A range that ends earlier in the
//! bundle is sent as soon as its bytes have arrived: a part of a bundle cannot be checked
//! against a hash of the whole, so waiting would delay it without making it safer.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use tokio::sync::watch;

use crate::cache::Lease;
use crate::fill::FillState;

/// The body type of every response the relay sends.
pub type ResponseBody = BoxBody<Bytes, io::Error>;

/// Size of one read from the bundle file (at most; less when a fill has written less).
/// Larger reads mean fewer hand-offs to the blocking pool per byte, at the cost of
/// memory per download.
pub const READ_CHUNK: usize = 256 * 1024;

/// Whether the file is complete or still being written by a fill.
#[derive(Debug)]
pub enum Progress {
    Complete,
    Live(watch::Receiver<FillState>),
}

/// An empty body (HEAD, 304).
pub fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body of `bytes` held in memory (error documents).
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Streams bytes `start..end` of `file`.
/// Streams bytes `start..end` of `file`, holding `lease` (which keeps the bundle from
/// eviction) until the body ends or is dropped.
pub fn file_range(
    file: Arc<File>,
    start: u64,
    end: u64,
    progress: Progress,
    lease: Lease,
) -> ResponseBody {
    let reader = RangeReader {
        file,
        pos: start,
        end,
        fresh: matches!(progress, Progress::Live(_)),
        progress,
        _lease: lease,
    };
    let chunks = stream::unfold(reader, |mut reader| async move {
        let chunk = reader.next_chunk().await?;
        Some((chunk.map(Frame::data), reader))
    });
    StreamBody::new(chunks).boxed()
}

struct RangeReader {
    file: Arc<File>,
    pos: u64,
    end: u64,
    /// The bytes were written by a fill during this response, so they are in the page
    /// cache: read them on the async thread (a read from memory), not through the
    /// blocking pool, whose hand-off costs more than the read.
    fresh: bool,
    progress: Progress,
    _lease: Lease,
}

impl RangeReader {
    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        if self.pos >= self.end {
            return None;
        }
        let limit = match self.available().await {
            Ok(limit) => limit,
            Err(e) => {
                // Stop after the error: the connection is aborted on the first one.
                self.end = self.pos;
                return Some(Err(e));
            }
        };

        let len = (limit - self.pos).min(READ_CHUNK as u64) as usize;
        let (file, pos) = (self.file.clone(), self.pos);
        let read = if self.fresh {
            read_chunk(&file, pos, len)
        } else if let Some(read) = read_chunk_if_in_memory(&file, pos, len) {
            read
        } else {
            // The pages have left memory: the read waits for the disk, off the async threads.
            tokio::task::spawn_blocking(move || read_chunk(&file, pos, len))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
        };

        match read {
            Ok(bytes) => {
                self.pos += bytes.len() as u64;
                Some(Ok(bytes))
            }
            Err(e) => {
                self.end = self.pos;
                Some(Err(e))
            }
        }
    }

    /// How far this body may read now; waits while the fill has nothing new for it.
    async fn available(&mut self) -> io::Result<u64> {
        let Progress::Live(rx) = &mut self.progress else {
            return Ok(self.end);
        };
        loop {
            let limit = {
                let state = rx.borrow_and_update();
                // The fill moved to a spill file holding all bytes so far: read from it.
                if let Some(spill) = &state.spill {
                    if !Arc::ptr_eq(spill, &self.file) {
                        self.file = spill.clone();
                    }
                }
                match &state.outcome {
                    Some(Ok(())) => None,
                    Some(Err(e)) => return Err(io::Error::other(e.to_string())),
                    // The bundle's final byte waits for verification (see the module docs).
                    None if state.total == Some(self.end) => Some(state.written.min(self.end - 1)),
                    None => Some(state.written.min(self.end)),
                }
            };
            match limit {
                None => {
                    self.progress = Progress::Complete;
                    return Ok(self.end);
                }
                Some(limit) if limit > self.pos => return Ok(limit),
                Some(_) => {}
            }
            if rx.changed().await.is_err() {
                return Err(io::Error::other("fill ended without an outcome"));
            }
        }
    }
}

/// Reads up to `len` bytes at `pos` on the calling (async) thread, but only what is in the
/// page cache (`RWF_NOWAIT`): never waits for the disk. `None` when nothing could be read
/// that way, so the caller reads through the blocking pool. A hot bundle then costs no
/// hand-off between threads per chunk.
fn read_chunk_if_in_memory(file: &File, pos: u64, len: usize) -> Option<io::Result<Bytes>> {
    use rustix::io::{preadv2, ReadWriteFlags};

    let mut buf = Pooled(pool_take());
    let read = {
        let mut slices = [io::IoSliceMut::new(&mut buf.0[..len])];
        preadv2(file, &mut slices, pos, ReadWriteFlags::NOWAIT)
    };
    match read {
        // Some of the range is in memory: send that much now.
        Ok(n) if n > 0 => {
            buf.0.truncate(n);
            Some(Ok(Bytes::from_owner(buf)))
        }
        // Not in memory (EAGAIN), not supported by this file system, or an early end of
        // file: the blocking read decides, and reports a real error.
        _ => None,
    }
}

/// Reads `len` bytes at `pos` into a pooled buffer.
fn read_chunk(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = Pooled(pool_take());
    file.read_exact_at(&mut buf.0[..len], pos)?;
    buf.0.truncate(len);
    Ok(Bytes::from_owner(buf))
}

/// Read buffers of [`READ_CHUNK`] bytes, initialized once and kept for reuse. A fresh
/// buffer this size comes from mmap and costs a page fault and a zeroed page per 4 KiB
/// (plus zeroing for `read_exact_at` and unmapping on free): more than the read itself.
/// At most [`POOL_MAX`] idle buffers (32 MiB) are kept.
static POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
const POOL_MAX: usize = 128;

fn pool_take() -> Vec<u8> {
    let reused = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
    reused.unwrap_or_else(|| vec![0u8; READ_CHUNK])
}

/// A pooled buffer handed to hyper inside a `Bytes`; back to the pool when hyper has
/// written and dropped it.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.0);
        if buf.capacity() != READ_CHUNK {
            return;
        }
        // Only a last, short chunk was truncated: this zeroes just its tail.
        buf.resize(READ_CHUNK, 0);
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(buf);
        }
    }
}
