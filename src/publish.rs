//! Publishing: adding local files to a relay's cache as bundles, the way a root relay
//! receives new patches.
//!
//! A file is hashed while it is copied into the cache's temporary directory, then renamed
//! into place; the rename is the only step a running relay can observe, so it serves
//! either nothing or the whole verified bundle. Published bundles are pinned.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::bundle::BundleId;
use crate::cache::Cache;

const COPY_CHUNK: usize = 1024 * 1024;

/// A file that is now a bundle in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: BundleId,
    pub bytes: u64,
    /// The cache already held this bundle (the copy was discarded; the pin was still set).
    pub already_cached: bool,
}

/// Why a file could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path}: cannot write into the cache: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Copies `path` into `cache` as a pinned bundle. `progress` is called with the bytes
/// copied so far.
pub fn publish_file(
    cache: &Cache,
    path: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Published, PublishError> {
    let read_err = |source| PublishError::Read {
        path: path.to_path_buf(),
        source,
    };
    let write_err = |source| PublishError::Write {
        path: path.to_path_buf(),
        source,
    };

    let mut input = File::open(path).map_err(read_err)?;
    if !input.metadata().map_err(read_err)?.is_file() {
        return Err(PublishError::NotAFile {
            path: path.to_path_buf(),
        });
    }

    // The temporary file's name needs an id before the content is known; the placeholder
    // only names the file and is never trusted.
    let placeholder = BundleId::of(path.as_os_str().as_encoded_bytes());
    let temp = cache.create_temp(&placeholder).map_err(write_err)?;
    let mut output = temp.file().as_ref();
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut bytes = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        output.write_all(&buf[..n]).map_err(write_err)?;
        hasher.update(&buf[..n]);
        bytes += n as u64;
        progress(bytes);
    }

    let id = BundleId::from_hash(hasher.finalize());
    let already_cached = cache.contains(&id);
    if !already_cached {
        cache.commit(temp, &id).map_err(write_err)?;
    }
    cache.pin(&id).map_err(write_err)?;
    Ok(Published {
        id,
        bytes,
        already_cached,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_pins_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let file = dir.path().join("kb5031356.msu");
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&file, &content).unwrap();

        let mut last = 0;
        let published = publish_file(&cache, &file, &mut |n| last = n).unwrap();
        assert_eq!(published.id, BundleId::of(&content));
        assert_eq!(published.bytes, content.len() as u64);
        assert!(!published.already_cached);
        assert_eq!(last, content.len() as u64);
        assert_eq!(
            std::fs::read(cache.object_path(&published.id)).unwrap(),
            content
        );
        assert!(cache.is_pinned(&published.id));

        let again = publish_file(&cache, &file, &mut |_| {}).unwrap();
        assert!(again.already_cached);
        assert_eq!(
            std::fs::read_dir(dir.path().join("cache/tmp"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn missing_file_and_directory_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let err = publish_file(&cache, &dir.path().join("nope"), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("nope: cannot read"), "{err}");
        let err = publish_file(&cache, dir.path(), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
