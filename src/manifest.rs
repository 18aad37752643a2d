//! The manifest of the current patch cycle: the bundles every relay of the tree should
//! hold, each with its size and an optional deadline.
//!
//! The root's manifest is set by `patchrelay publish --manifest` or the admin API; every
//! other relay keeps the copy it last fetched from its parent. Either way it lives in
//! `manifest.json` in the cache directory (written by an atomic rename), is read from
//! there for every `GET /v1/manifest`, and so survives restarts and is shared with a
//! `publish` run beside the relay.

use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::bundle::BundleId;

/// `GET /v1/manifest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Grows by one at every change at the root; children copy it.
    pub version: u64,
    pub bundles: Vec<ManifestEntry>,
}

/// One bundle of the cycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    #[serde(with = "id_text")]
    pub id: BundleId,
    pub size: u64,
    /// When the bundle must be ready at every relay, if there is a deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_by: Option<DateTime<Utc>>,
}

impl Manifest {
    /// Whether `id` is part of this cycle.
    pub fn contains(&self, id: &BundleId) -> bool {
        self.bundles.iter().any(|b| b.id == *id)
    }
}

/// Where a cache directory keeps its manifest.
pub fn path_in(cache_dir: &Path) -> PathBuf {
    cache_dir.join("manifest.json")
}

/// Reads the manifest kept in `cache_dir`; an empty one (version 0) if there is none.
pub fn load(cache_dir: &Path) -> io::Result<Manifest> {
    match std::fs::read(path_in(cache_dir)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Manifest::default()),
        Err(e) => Err(e),
    }
}

/// Replaces the manifest kept in `cache_dir` (write, sync, rename).
pub fn save(cache_dir: &Path, manifest: &Manifest) -> io::Result<()> {
    let path = path_in(cache_dir);
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = cache_dir.join(format!("manifest.json.{}.{seq}.tmp", std::process::id()));
    let bytes = serde_json::to_vec_pretty(manifest).map_err(io::Error::other)?;
    std::fs::write(&temp, bytes)?;
    std::fs::File::open(&temp)?.sync_all()?;
    std::fs::rename(&temp, &path)
}

/// Serializes a bundle id as its hex text.
mod id_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::bundle::BundleId;

    pub fn serialize<S: Serializer>(id: &BundleId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BundleId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_cache_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), Manifest::default());
        let manifest = Manifest {
            version: 3,
            bundles: vec![ManifestEntry {
                id: BundleId::of(b"kb"),
                size: 2,
                ready_by: Some("2026-12-08T06:00:00Z".parse().unwrap()),
            }],
        };
        save(dir.path(), &manifest).unwrap();
        assert_eq!(load(dir.path()).unwrap(), manifest);
        assert!(manifest.contains(&BundleId::of(b"kb")));
    }

    #[test]
    fn a_bad_id_in_a_manifest_is_an_error() {
        let bad = r#"{"version": 1, "bundles": [{"id": "nope", "size": 1}]}"#;
        assert!(serde_json::from_str::<Manifest>(bad).is_err());
    }
}
