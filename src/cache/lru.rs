//! The cache's in-memory index: size and last access of every complete bundle, what is
//! in use, and the space promised to running fills; and the least-recently-used choice of
//! what to evict.
//!
//! Last access is also written to each object's mtime (on every hit), so recency survives
//! a restart: the index is rebuilt from the mtimes at start.

use std::collections::HashMap;
use std::time::SystemTime;

use crate::bundle::BundleId;

/// One complete bundle in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub size: u64,
    pub last_access: SystemTime,
}

/// The index; kept behind the cache's mutex.
#[derive(Debug, Default)]
pub struct Index {
    pub entries: HashMap<BundleId, Entry>,
    /// Sum of the sizes of `entries`.
    pub used: u64,
    /// Bytes promised to fills that are still running.
    pub reserved: u64,
    /// Responses currently reading each bundle.
    pub in_use: HashMap<BundleId, usize>,
}

impl Index {
    pub fn insert(&mut self, id: BundleId, entry: Entry) {
        if let Some(old) = self.entries.insert(id, entry) {
            self.used -= old.size;
        }
        self.used += entry.size;
    }

    pub fn remove(&mut self, id: &BundleId) -> Option<Entry> {
        let old = self.entries.remove(id)?;
        self.used -= old.size;
        Some(old)
    }

    /// Updates the last access of a bundle the index knows; `false` if it does not.
    pub fn touch_known(&mut self, id: &BundleId, now: SystemTime) -> bool {
        match self.entries.get_mut(id) {
            Some(entry) => {
                entry.last_access = now;
                true
            }
            None => false,
        }
    }

    pub fn touch(&mut self, id: BundleId, size: u64, now: SystemTime) {
        self.insert(
            id,
            Entry {
                size,
                last_access: now,
            },
        );
    }

    /// Bundles to evict, least recently used first, so that `needed` more bytes fit under
    /// `max`; `None` when even evicting every candidate would not make room. A bundle is a
    /// candidate unless `protected` says so or a response is reading it.
    pub fn victims(
        &self,
        needed: u64,
        max: u64,
        protected: impl Fn(&BundleId) -> bool,
    ) -> Option<Vec<(BundleId, Entry)>> {
        let mut free = max.saturating_sub(self.used + self.reserved);
        if free >= needed {
            return Some(Vec::new());
        }
        let mut candidates: Vec<(BundleId, Entry)> = self
            .entries
            .iter()
            .filter(|(id, _)| !protected(id) && !self.in_use.contains_key(*id))
            .map(|(id, entry)| (*id, *entry))
            .collect();
        candidates.sort_by_key(|(id, entry)| (entry.last_access, *id));

        let mut victims = Vec::new();
        for (id, entry) in candidates {
            if free >= needed {
                break;
            }
            free += entry.size;
            victims.push((id, entry));
        }
        (free >= needed).then_some(victims)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn index(entries: &[(&[u8], u64, u64)]) -> Index {
        let mut index = Index::default();
        for (name, size, time) in entries {
            index.insert(
                BundleId::of(name),
                Entry {
                    size: *size,
                    last_access: at(*time),
                },
            );
        }
        index
    }

    #[test]
    fn evicts_least_recently_used_first_and_only_what_is_needed() {
        let index = index(&[(b"a", 100, 30), (b"b", 100, 10), (b"c", 100, 20)]);
        let victims = index.victims(150, 400, |_| false).unwrap();
        let ids: Vec<_> = victims.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [BundleId::of(b"b")]);
        let victims = index.victims(250, 400, |_| false).unwrap();
        let ids: Vec<_> = victims.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [BundleId::of(b"b"), BundleId::of(b"c")]);
    }

    #[test]
    fn protected_and_in_use_bundles_are_skipped() {
        let mut index = index(&[(b"a", 100, 10), (b"b", 100, 20), (b"c", 100, 30)]);
        index.in_use.insert(BundleId::of(b"b"), 1);
        let pinned = BundleId::of(b"a");
        let victims = index.victims(100, 300, |id| *id == pinned).unwrap();
        let ids: Vec<_> = victims.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [BundleId::of(b"c")]);
        assert!(
            index.victims(200, 300, |id| *id == pinned).is_none(),
            "no room to make"
        );
    }

    #[test]
    fn reservations_count_as_used() {
        let mut index = index(&[(b"a", 100, 10)]);
        assert!(index.victims(100, 200, |_| false).unwrap().is_empty());
        index.reserved = 100;
        assert_eq!(index.victims(100, 200, |_| false).unwrap().len(), 1);
        index.remove(&BundleId::of(b"a"));
        assert_eq!(index.used, 0);
    }
}
