//! The on-disk cache: where complete, verified bundles live, and where fills write.
//!
//! Layout under `cache_dir`:
//! - `objects/ab/abcd...` — one file per bundle, named by its id, fanned out by the first
//!   two hex characters. A file appears here only by an atomic rename after its content was
//!   hashed and matched its id, so anything found here is complete and verified.
//! - `tmp/` — files of fills and publishes in progress, named `<id>.<pid>.<seq>.part`.
//!   Nothing is ever served by path from here. A relay sweeps it at start, removing every
//!   file whose process is gone, so a crash mid-fill never surfaces a partial bundle while a
//!   `publish` running beside the relay keeps its file.
//! - `pins/` — an empty marker file per pinned bundle (published bundles are pinned), so
//!   eviction, when it exists, has a durable list of what it must never remove.
//!
//! With `cache_max` set, a fill first reserves room for its bundle, evicting the least
//! recently used complete bundles that are neither pinned nor being read (see
//! [`lru`]); a bundle that cannot get room is served pass-through and not kept.
//!
//! All methods here are blocking; async callers run them on the blocking pool.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tracing::info;

use crate::bundle::BundleId;

mod lru;
use lru::{Entry, Index};

/// A cache directory opened for use.
#[derive(Debug)]
pub struct Cache {
    root: PathBuf,
    objects: PathBuf,
    tmp: PathBuf,
    pins: PathBuf,
    /// `cache_max`: most bytes of complete bundles to keep; `None` = no bound.
    max: Option<u64>,
    /// Bundles pinned in the config (besides the markers in `pins/`).
    config_pins: HashSet<BundleId>,
    /// Bundles of the current manifest: pinned while they are in it.
    manifest_pins: Mutex<HashSet<BundleId>>,
    index: Mutex<Index>,
    disk: DiskHealth,
    /// Bundles evicted to make room, in all.
    pub evictions: AtomicU64,
    /// The bundle whose file this process gave the newest mtime of all, and that mtime
    /// (nanoseconds since 1970): hits on it need not write it again (see
    /// [`Cache::open_bundle`]).
    newest: Mutex<Option<(BundleId, u64)>>,
}

/// Whether the cache dir takes writes, and when that was last logged.
#[derive(Debug, Default)]
struct DiskHealth {
    degraded: AtomicBool,
    last_logged: Mutex<Option<std::time::Instant>>,
}

impl DiskHealth {
    /// Marks the cache dir unwritable; logs at most once a minute.
    fn failed(&self, dir: &Path, error: &io::Error) {
        self.degraded.store(true, Ordering::Relaxed);
        let mut last = self.last_logged.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60)) {
            tracing::error!(dir = %dir.display(), error = %error,
                "cache directory is not writable; serving pass-through without caching");
            *last = Some(std::time::Instant::now());
        }
    }

    /// Called after data really reached the disk (a commit, a synced probe block): an
    /// empty file can still be created on a full disk, so creating one proves nothing.
    fn recovered(&self) {
        if self.degraded.swap(false, Ordering::Relaxed) {
            info!("cache directory is writable again");
        }
    }
}

/// One complete bundle, as the admin API and `patchrelay cache ls` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheItem {
    pub id: BundleId,
    pub size: u64,
    pub last_access: SystemTime,
    pub pinned: bool,
}

/// How a serving cache is bounded.
#[derive(Debug, Clone, Default)]
pub struct CacheBounds {
    /// Most bytes of complete bundles to keep; `None` = no bound.
    pub max: Option<u64>,
    /// Bundles never to evict, from the config.
    pub pins: Vec<BundleId>,
}

/// Whether a fill may keep its bundle.
#[derive(Debug)]
pub enum Room {
    /// Room is set aside until the reservation is dropped.
    Granted(Reservation),
    /// The bundle is larger than `cache_max`.
    TooLarge,
    /// Everything evictable would not make room (the rest is pinned or being read).
    Full,
    /// The cache dir is not writable; the fill writes a spill file.
    Unwritable,
}

/// Space set aside for a running fill.
#[derive(Debug)]
pub struct Reservation {
    cache: Arc<Cache>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.cache.index().reserved -= self.bytes;
    }
}

/// A response reading a cached bundle; the bundle is not evicted while one exists.
#[derive(Debug)]
pub struct Lease {
    cache: Arc<Cache>,
    id: BundleId,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut index = self.cache.index();
        if let Some(n) = index.in_use.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                index.in_use.remove(&self.id);
            }
        }
    }
}

/// What [`Cache::open_bundle_nowait`] found.
#[derive(Debug)]
pub enum Lookup {
    /// The bundle, open, with its length.
    Opened(File, u64),
    NotCached,
    /// Finding out needs the disk: use [`Cache::open_bundle`] in the blocking pool.
    WouldBlock,
}

/// `at` in nanoseconds since 1970 (0 before it).
fn nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What [`Cache::open_for_serving`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheSummary {
    /// Complete bundles in the cache.
    pub bundles: u64,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Temporary files of interrupted fills that were removed.
    pub swept_temp_files: u64,
}

/// The cache directory could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("cache directory {path}: {source}")]
pub struct CacheError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// A fill's file in `tmp/`: removed when dropped unless it was committed.
#[derive(Debug)]
pub struct TempFile {
    /// `None` for a spill file: unnamed, outside the cache, never committed.
    path: Option<PathBuf>,
    file: Arc<File>,
    committed: bool,
}

impl TempFile {
    /// The open file, shared with the requests that follow the fill.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Removes the file's name now (the open file stays readable); used when a fill moves
    /// to a spill file, to give the space back at once.
    pub fn unlink(&self) {
        if let Some(path) = &self.path {
            let _ = fs::remove_file(path);
        }
    }

    /// Whether this is a spill file outside the cache (the cache dir was not writable):
    /// its fill is served pass-through and not kept.
    pub fn is_spill(&self) -> bool {
        self.path.is_none()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let (false, Some(path)) = (self.committed, &self.path) {
            let _ = fs::remove_file(path);
        }
    }
}

impl Cache {
    /// Creates the layout under `root` if needed.
    pub fn open(root: &Path) -> Result<Self, CacheError> {
        let cache = Self {
            root: root.to_path_buf(),
            objects: root.join("objects"),
            tmp: root.join("tmp"),
            pins: root.join("pins"),
            max: None,
            config_pins: HashSet::new(),
            manifest_pins: Mutex::default(),
            index: Mutex::default(),
            disk: DiskHealth::default(),
            evictions: AtomicU64::new(0),
            newest: Mutex::new(None),
        };
        for dir in [&cache.objects, &cache.tmp, &cache.pins] {
            fs::create_dir_all(dir).map_err(|source| CacheError {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(cache)
    }

    /// Opens the cache for a relay that is starting: removes leftovers of interrupted fills
    /// and indexes what is cached.
    pub fn open_for_serving(
        root: &Path,
        bounds: CacheBounds,
    ) -> Result<(Self, CacheSummary), CacheError> {
        let mut cache = Self::open(root)?;
        cache.max = bounds.max;
        cache.config_pins = bounds.pins.into_iter().collect();
        let swept_temp_files = cache.sweep_tmp().map_err(|source| CacheError {
            path: cache.tmp.clone(),
            source,
        })?;
        let (bundles, bytes) = cache.load_index().map_err(|source| CacheError {
            path: cache.objects.clone(),
            source,
        })?;
        Ok((
            cache,
            CacheSummary {
                bundles,
                bytes,
                swept_temp_files,
            },
        ))
    }

    /// Where bundle `id` lives once cached.
    pub fn object_path(&self, id: &BundleId) -> PathBuf {
        let hex = id.to_string();
        self.objects.join(&hex[..2]).join(hex)
    }

    /// Opens cached bundle `id`, with its length, and records the access; `None` when it
    /// is not cached. May wait for the disk: call it from the blocking pool.
    pub fn open_bundle(self: &Arc<Self>, id: &BundleId) -> io::Result<Option<(File, u64)>> {
        match File::open(self.object_path(id)) {
            Ok(file) => self.opened(id, file, false).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// [`Cache::open_bundle`] for the async threads: the path is looked up only in the
    /// kernel's caches (`openat2` with `RESOLVE_CACHED`), so the call never waits for the
    /// disk. [`Lookup::WouldBlock`] when the lookup needs the disk (or the kernel is older
    /// than 5.12): the caller then uses `open_bundle` in the blocking pool. A hit on a hot
    /// bundle thus costs no hand-off between threads.
    pub fn open_bundle_nowait(self: &Arc<Self>, id: &BundleId) -> io::Result<Lookup> {
        use rustix::fs::{openat2, Mode, OFlags, ResolveFlags, CWD};

        let path = self.object_path(id);
        let flags = OFlags::RDONLY | OFlags::CLOEXEC;
        match openat2(CWD, &path, flags, Mode::empty(), ResolveFlags::CACHED) {
            Ok(fd) => {
                let (file, len) = self.opened(id, File::from(fd), true)?;
                Ok(Lookup::Opened(file, len))
            }
            Err(rustix::io::Errno::NOENT) => Ok(Lookup::NotCached),
            // EAGAIN: not all in the caches; ENOSYS, EINVAL: no openat2 or no
            // RESOLVE_CACHED here. Anything else, the blocking open reports properly.
            Err(_) => Ok(Lookup::WouldBlock),
        }
    }

    /// The length of an opened bundle, with its access recorded: here, or with `nowait`
    /// (on an async thread) in the blocking pool when that means a write or a wait.
    fn opened(
        self: &Arc<Self>,
        id: &BundleId,
        file: File,
        nowait: bool,
    ) -> io::Result<(File, u64)> {
        let meta = file.metadata()?;
        let len = meta.len();

        // The mtime carries the order of last accesses across restarts. Only the order
        // matters, so a hit on the bundle with the newest mtime of all (a hot bundle hit
        // again and again) leaves it be and does not dirty the inode. The time is taken
        // under the lock, so the mtimes written follow the order of the hits. A failed
        // write costs only recency (the next hit writes again), so it fails no request.
        let mtime = meta.modified().map_or(0, nanos);
        let write_mtime = {
            let mut newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
            (*newest != Some((*id, mtime))).then(|| {
                let now = SystemTime::now();
                *newest = Some((*id, nanos(now)));
                now
            })
        };
        let now = write_mtime.unwrap_or_else(SystemTime::now);

        // Known bundles just get the new time. An unknown one (published while the relay
        // runs, or evicted or purged since the open) is added only if its file is still
        // there, so no ghost entry appears; the stat stays off common hits. On an async
        // thread, an index held by an eviction (which deletes files) is not waited for.
        let touched = if nowait {
            match self.index.try_lock() {
                Ok(mut index) => index.touch_known(id, now),
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().touch_known(id, now),
                Err(std::sync::TryLockError::WouldBlock) => false,
            }
        } else {
            self.touch(id, len, now);
            true
        };
        if touched && write_mtime.is_none() {
            return Ok((file, len));
        }

        let record = {
            let (cache, id, copy) = (self.clone(), *id, file.try_clone()?);
            move || {
                if let Some(at) = write_mtime {
                    let _ = copy.set_modified(at);
                }
                if !touched {
                    cache.touch(&id, len, now);
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if nowait => drop(runtime.spawn_blocking(record)),
            _ => record(),
        }
        Ok((file, len))
    }

    /// Records an access to `id` in the index.
    fn touch(&self, id: &BundleId, len: u64, now: SystemTime) {
        let mut index = self.index();
        if !index.touch_known(id, now) && self.object_path(id).is_file() {
            index.touch(*id, len, now);
        }
    }

    /// Whether bundle `id` is cached.
    pub fn contains(&self, id: &BundleId) -> bool {
        self.object_path(id).is_file()
    }

    /// Creates a new, empty temporary file for a fill of `id`.
    pub fn create_temp(&self, id: &BundleId) -> io::Result<TempFile> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = self
            .tmp
            .join(format!("{id}.{}.{seq}.part", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(TempFile {
            path: Some(path),
            file: Arc::new(file),
            committed: false,
        })
    }

    /// A temporary file for a fill of `id`: in the cache's `tmp/` when it is writable;
    /// otherwise an unnamed spill file in the system temp dir, so the relay keeps serving
    /// (pass-through, still coalescing and verifying) and reports itself degraded.
    pub fn create_fill_file(&self, id: &BundleId) -> io::Result<TempFile> {
        match self.create_temp(id) {
            Ok(temp) => Ok(temp),
            Err(e) => {
                self.disk.failed(&self.tmp, &e);
                let file = tempfile::tempfile()?;
                Ok(TempFile {
                    path: None,
                    file: Arc::new(file),
                    committed: false,
                })
            }
        }
    }

    /// Records that writing into the cache dir failed with `error` (degraded; logged at
    /// most once a minute).
    pub fn note_unwritable(&self, error: &io::Error) {
        self.disk.failed(&self.tmp, error);
    }

    /// Tries to write and sync a block in `tmp/` (the file is removed again); records the
    /// result as the disk health.
    pub fn probe_writable(&self) -> bool {
        let probe = self
            .create_temp(&BundleId::of(b"patchrelay write probe"))
            .and_then(|t| {
                use std::os::unix::fs::FileExt;
                t.file.write_all_at(&[0u8; 4096], 0)?;
                t.file.sync_all()
            });
        match probe {
            Ok(()) => {
                self.disk.recovered();
                true
            }
            Err(e) => {
                self.disk.failed(&self.tmp, &e);
                false
            }
        }
    }

    /// Whether the cache dir could not be written to at the last attempt.
    pub fn is_degraded(&self) -> bool {
        self.disk.degraded.load(Ordering::Relaxed)
    }

    /// Makes a fully written and verified temporary file the cached copy of `id`.
    ///
    /// The data is synced before the rename and the directory after it, so that after a
    /// power cut the object is either absent or complete.
    pub fn commit(&self, mut temp: TempFile, id: &BundleId) -> io::Result<()> {
        let Some(path) = temp.path.clone() else {
            return Err(io::Error::other("a spill file is never committed"));
        };
        temp.file.sync_all()?;
        let size = temp.file.metadata()?.len();
        // Its mtime, its last write, is now the newest (perhaps tied with another's).
        *self.newest.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let dest = self.object_path(id);
        let dir = dest
            .parent()
            .expect("object paths always have a fan-out directory");
        fs::create_dir_all(dir)?;
        fs::rename(&path, &dest)?;
        temp.committed = true;
        self.index().touch(*id, size, SystemTime::now());
        self.disk.recovered();
        File::open(dir)?.sync_all()
    }

    /// Marks bundle `id` as being read until the lease is dropped.
    pub fn lease(self: &Arc<Self>, id: BundleId) -> Lease {
        *self.index().in_use.entry(id).or_insert(0) += 1;
        Lease {
            cache: self.clone(),
            id,
        }
    }

    /// Sets aside `bytes` for a fill of `id`, evicting least recently used bundles if
    /// needed.
    pub fn reserve(self: &Arc<Self>, id: &BundleId, bytes: u64) -> Room {
        let Some(max) = self.max else {
            return Room::Granted(Reservation {
                cache: self.clone(),
                bytes: 0,
            });
        };
        if bytes > max {
            return Room::TooLarge;
        }

        let pinned = self.pinned_set();
        let mut index = self.index();
        let Some(victims) = index.victims(bytes, max, |v| pinned.contains(v) || v == id) else {
            return Room::Full;
        };
        for (victim, entry) in victims {
            match fs::remove_file(self.object_path(&victim)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    // Without this room the fill would pass cache_max: serve it through.
                    tracing::warn!(bundle.id = %victim, error = %e, "cannot evict");
                    return Room::Full;
                }
            }
            index.remove(&victim);
            self.evictions.fetch_add(1, Ordering::Relaxed);
            let idle = entry.last_access.elapsed().unwrap_or_default().as_secs();
            info!(bundle.id = %victim, bytes = entry.size, idle_seconds = idle, "evicted");
        }
        index.reserved += bytes;
        drop(index);
        Room::Granted(Reservation {
            cache: self.clone(),
            bytes,
        })
    }

    /// Every complete bundle the index knows of, most recently used first.
    pub fn list(&self) -> Vec<CacheItem> {
        let pinned = self.pinned_set();
        let index = self.index();
        let mut items: Vec<CacheItem> = index
            .entries
            .iter()
            .map(|(id, entry)| CacheItem {
                id: *id,
                size: entry.size,
                last_access: entry.last_access,
                pinned: pinned.contains(id),
            })
            .collect();
        items.sort_by_key(|item| std::cmp::Reverse((item.last_access, item.id)));
        items
    }

    /// Whether `id` is pinned by the config (which the admin API cannot undo).
    pub fn is_config_pinned(&self, id: &BundleId) -> bool {
        self.config_pins.contains(id)
    }

    /// Removes `id`'s pin marker; `false` when there was none.
    pub fn unpin(&self, id: &BundleId) -> io::Result<bool> {
        match fs::remove_file(self.pins.join(id.to_string())) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes bundle `id` from the cache; `false` when it was not cached. Responses
    /// already reading it finish from their open file.
    pub fn purge(&self, id: &BundleId) -> io::Result<bool> {
        let removed = match fs::remove_file(self.object_path(id)) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        self.index().remove(id);
        Ok(removed)
    }

    /// Re-hashes cached bundle `id`: `Ok(None)` when not cached, else whether its content
    /// still hashes to its id.
    pub fn verify(&self, id: &BundleId) -> io::Result<Option<bool>> {
        self.verify_paced(id, u64::MAX)
    }

    /// Re-hashes cached bundle `id` reading at most `rate` bytes per second: `Ok(None)`
    /// when it is not cached (any more), else whether it still matches its id.
    pub fn verify_paced(&self, id: &BundleId, rate: u64) -> io::Result<Option<bool>> {
        use std::io::Read;

        let mut file = match File::open(self.object_path(id)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let started = std::time::Instant::now();
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            done += n as u64;
            let due = std::time::Duration::from_secs_f64(done as f64 / rate.max(1) as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        Ok(Some(id.matches(&hasher.finalize())))
    }

    /// Moves bundle `id` out of the cache into `quarantine/`, where it is kept for
    /// inspection and never served. Returns where it went.
    pub fn quarantine(&self, id: &BundleId) -> io::Result<PathBuf> {
        let dir = self.root.join("quarantine");
        fs::create_dir_all(&dir)?;
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let dest = dir.join(format!("{id}.{stamp}"));
        fs::rename(self.object_path(id), &dest)?;
        self.index().remove(id);
        Ok(dest)
    }

    /// `cache_max`, if set.
    pub fn max_bytes(&self) -> Option<u64> {
        self.max
    }

    /// Bytes of complete bundles the index knows of.
    pub fn used_bytes(&self) -> u64 {
        self.index().used
    }

    /// Complete bundles the index knows of.
    pub fn bundle_count(&self) -> u64 {
        self.index().entries.len() as u64
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every pinned bundle: from the config and from the markers in `pins/`.
    fn pinned_set(&self) -> HashSet<BundleId> {
        let mut pinned = self.config_pins.clone();
        pinned.extend(self.manifest_pins().iter().copied());
        if let Ok(markers) = fs::read_dir(&self.pins) {
            let names = markers.filter_map(|m| m.ok()?.file_name().into_string().ok());
            pinned.extend(names.filter_map(|name| name.parse::<BundleId>().ok()));
        }
        pinned
    }

    /// Marks `id` as pinned: never to be evicted.
    pub fn pin(&self, id: &BundleId) -> io::Result<()> {
        let marker = self.pins.join(id.to_string());
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(marker)?;
        File::open(&self.pins)?.sync_all()
    }

    /// Whether `id` is pinned: by the config, the manifest or a marker.
    pub fn is_pinned(&self, id: &BundleId) -> bool {
        self.config_pins.contains(id)
            || self.manifest_pins().contains(id)
            || self.pins.join(id.to_string()).is_file()
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Pins exactly the bundles of `manifest` (unpinning those that left it).
    pub fn pin_manifest(&self, manifest: &crate::manifest::Manifest) {
        let ids = manifest.bundles.iter().map(|b| b.id).collect();
        *self.manifest_pins.lock().unwrap_or_else(|e| e.into_inner()) = ids;
    }

    fn manifest_pins(&self) -> MutexGuard<'_, HashSet<BundleId>> {
        self.manifest_pins.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sweep_tmp(&self) -> io::Result<u64> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.tmp)? {
            let path = entry?.path();
            if owner_is_alive(&path) {
                continue;
            }
            let result = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match result {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }

    /// Indexes the objects, their mtimes as last access; returns their count and bytes.
    fn load_index(&self) -> io::Result<(u64, u64)> {
        let mut index = Index::default();
        for fan in fs::read_dir(&self.objects)? {
            let fan = fan?;
            if !fan.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(fan.path())? {
                let entry = entry?;
                let meta = entry.metadata()?;
                let id = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<BundleId>().ok());
                let (Some(id), true) = (id, meta.is_file()) else {
                    continue;
                };
                let last_access = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                index.insert(
                    id,
                    Entry {
                        size: meta.len(),
                        last_access,
                    },
                );
            }
        }
        let counts = (index.entries.len() as u64, index.used);
        *self.index() = index;
        Ok(counts)
    }
}

/// Whether the process that named temporary file `path` (`<id>.<pid>.<seq>.part`) is
/// still running, other than this one. This process has only just started, so a file
/// with its own pid is a leftover of an earlier process that had the same pid.
fn owner_is_alive(path: &Path) -> bool {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let pid = name.split('.').nth(1).and_then(|p| p.parse::<u32>().ok());
    match pid {
        Some(pid) if pid != std::process::id() => Path::new(&format!("/proc/{pid}")).exists(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn uncommitted_temp_files_vanish_and_committed_ones_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, summary) = Cache::open_for_serving(dir.path(), CacheBounds::default()).unwrap();
        let cache = Arc::new(cache);
        assert_eq!(summary, CacheSummary::default());

        let id = BundleId::of(b"abc");
        let temp = cache.create_temp(&id).unwrap();
        temp.file().write_all_at(b"abc", 0).unwrap();
        drop(temp);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(cache.open_bundle(&id).unwrap().is_none());

        let temp = cache.create_temp(&id).unwrap();
        temp.file().write_all_at(b"abc", 0).unwrap();
        cache.commit(temp, &id).unwrap();
        let (_, len) = cache.open_bundle(&id).unwrap().expect("committed bundle");
        assert_eq!(len, 3);
        assert_eq!(fs::read(cache.object_path(&id)).unwrap(), b"abc");
    }

    #[test]
    fn a_hot_bundle_opens_without_the_disk_and_only_a_change_of_order_writes_mtimes() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, _) = Cache::open_for_serving(dir.path(), CacheBounds::default()).unwrap();
        let cache = Arc::new(cache);
        let id = BundleId::of(b"hot");
        let temp = cache.create_temp(&id).unwrap();
        temp.file().write_all_at(b"hot", 0).unwrap();
        cache.commit(temp, &id).unwrap();

        // Just written, so every path component is in the kernel's caches.
        match cache.open_bundle_nowait(&id).unwrap() {
            Lookup::Opened(_, len) => assert_eq!(len, 3),
            other => panic!("a hot bundle should open on the calling thread: {other:?}"),
        }
        let absent = BundleId::of(b"absent");
        assert!(!matches!(
            cache.open_bundle_nowait(&absent).unwrap(),
            Lookup::Opened(..)
        ));

        // A second bundle, committed later, has the newest mtime.
        let other = BundleId::of(b"other");
        let temp = cache.create_temp(&other).unwrap();
        temp.file().write_all_at(b"other", 0).unwrap();
        cache.commit(temp, &other).unwrap();
        let mtime = |id: &BundleId| {
            fs::metadata(cache.object_path(id))
                .unwrap()
                .modified()
                .unwrap()
        };

        // A hit on the older one writes its mtime: it is now the most recently used ...
        cache.open_bundle(&id).unwrap().unwrap();
        let after_hit = mtime(&id);
        assert!(
            after_hit > mtime(&other),
            "the order of accesses survives a restart"
        );
        // ... and hits on it again leave the newest mtime of all alone.
        cache.open_bundle(&id).unwrap().unwrap();
        assert_eq!(mtime(&id), after_hit);
        // A hit on the other writes again.
        cache.open_bundle(&other).unwrap().unwrap();
        assert!(mtime(&other) > after_hit);
    }

    #[test]
    fn open_for_serving_sweeps_leftovers_and_counts_bundles() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let id = BundleId::of(b"hello");
        let temp = cache.create_temp(&id).unwrap();
        temp.file().write_all_at(b"hello", 0).unwrap();
        cache.commit(temp, &id).unwrap();
        fs::write(dir.path().join("tmp/leftover.part"), b"partial").unwrap();
        fs::write(dir.path().join("tmp/other.part"), b"partial").unwrap();
        fs::write(
            dir.path().join(format!("tmp/{id}.4194305.0.part")),
            b"dead pid",
        )
        .unwrap();
        // pid 1 is always alive: a file of a running process (a publish) is left alone.
        fs::write(dir.path().join(format!("tmp/{id}.1.0.part")), b"in use").unwrap();

        let (_, summary) = Cache::open_for_serving(dir.path(), CacheBounds::default()).unwrap();
        assert_eq!(
            summary,
            CacheSummary {
                bundles: 1,
                bytes: 5,
                swept_temp_files: 3
            }
        );
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
    }

    #[test]
    fn pins_are_durable_markers() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let id = BundleId::of(b"p");
        assert!(!cache.is_pinned(&id));
        cache.pin(&id).unwrap();
        cache.pin(&id).unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        assert!(cache.is_pinned(&id));
    }
}
