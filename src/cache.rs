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
//! All methods here are blocking; async callers run them on the blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::bundle::BundleId;

/// A cache directory opened for use.
#[derive(Debug)]
pub struct Cache {
    objects: PathBuf,
    tmp: PathBuf,
    pins: PathBuf,
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
    path: PathBuf,
    file: Arc<File>,
    committed: bool,
}

impl TempFile {
    /// The open file, shared with the requests that follow the fill.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Cache {
    /// Creates the layout under `root` if needed.
    pub fn open(root: &Path) -> Result<Self, CacheError> {
        let cache = Self {
            objects: root.join("objects"),
            tmp: root.join("tmp"),
            pins: root.join("pins"),
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
    /// and counts what is cached.
    pub fn open_for_serving(root: &Path) -> Result<(Self, CacheSummary), CacheError> {
        let cache = Self::open(root)?;
        let swept_temp_files = cache.sweep_tmp().map_err(|source| CacheError {
            path: cache.tmp.clone(),
            source,
        })?;
        let (bundles, bytes) = cache.count().map_err(|source| CacheError {
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

    /// Opens cached bundle `id`, with its length; `None` when it is not cached.
    pub fn open_bundle(&self, id: &BundleId) -> io::Result<Option<(File, u64)>> {
        match File::open(self.object_path(id)) {
            Ok(file) => {
                let len = file.metadata()?.len();
                Ok(Some((file, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
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
            path,
            file: Arc::new(file),
            committed: false,
        })
    }

    /// Makes a fully written and verified temporary file the cached copy of `id`.
    ///
    /// The data is synced before the rename and the directory after it, so that after a
    /// power cut the object is either absent or complete.
    pub fn commit(&self, mut temp: TempFile, id: &BundleId) -> io::Result<()> {
        temp.file.sync_all()?;
        let dest = self.object_path(id);
        let dir = dest
            .parent()
            .expect("object paths always have a fan-out directory");
        fs::create_dir_all(dir)?;
        fs::rename(&temp.path, &dest)?;
        temp.committed = true;
        File::open(dir)?.sync_all()
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

    /// Whether `id` is pinned.
    pub fn is_pinned(&self, id: &BundleId) -> bool {
        self.pins.join(id.to_string()).is_file()
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

    fn count(&self) -> io::Result<(u64, u64)> {
        let (mut bundles, mut bytes) = (0, 0);
        for fan in fs::read_dir(&self.objects)? {
            let fan = fan?;
            if !fan.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(fan.path())? {
                let meta = entry?.metadata()?;
                if meta.is_file() {
                    bundles += 1;
                    bytes += meta.len();
                }
            }
        }
        Ok((bundles, bytes))
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
        let (cache, summary) = Cache::open_for_serving(dir.path()).unwrap();
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

        let (_, summary) = Cache::open_for_serving(dir.path()).unwrap();
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
