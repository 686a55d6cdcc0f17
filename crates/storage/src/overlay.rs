//! Write staging for the state machine.
//!
//! `Pending` holds the writes of applied entries that are not in sled yet (write-back); an
//! `Overlay` holds the writes of the entry being applied, on top of `Pending` and the tree.
//! Applying to sled per entry made sled's copy-on-write node updates the broker's main cost;
//! staging lets a message that is published and acknowledged within a few entries cancel out
//! before it ever reaches sled. Nothing here weakens durability: the Raft log is flushed
//! before anything is acknowledged, and after a crash the entries after the persisted
//! last-applied marker are applied again from it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::error::Result;

/// One staged change of a key.
#[derive(Debug, Clone)]
pub(crate) enum Staged {
    /// Write this value.
    Put(Vec<u8>),
    /// Write this value; the key is known not to be in the tree (a new queue entry or
    /// message), so deleting it again needs no tree operation at all.
    Fresh(Vec<u8>),
    /// Remove the key from the tree.
    Del,
    /// Overlay only: drop the key's staged `Fresh` write from `Pending` (it never reached
    /// the tree, so there is nothing to remove there).
    Cancel,
}

impl Staged {
    pub(crate) fn value(&self) -> Option<&Vec<u8>> {
        match self {
            Staged::Put(v) | Staged::Fresh(v) => Some(v),
            Staged::Del | Staged::Cancel => None,
        }
    }
}

/// Entries to stage before writing them to sled in one batch.
const FLUSH_ENTRIES: usize = 64;
/// Staged keys at most before a write to sled.
const FLUSH_KEYS: usize = 50_000;
/// Oldest staged write kept back at most.
const FLUSH_AGE: Duration = Duration::from_millis(200);

/// Writes of applied entries not yet in the tree (they include the last-applied marker of the
/// newest of them, so writing them out is atomic with their marker).
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) writes: BTreeMap<Vec<u8>, Staged>,
    entries: usize,
    since: Instant,
    /// A write to sled failed: the staged writes are gone, so applying more would leave a gap
    /// behind a newer marker. Everything fails from then on; a restart replays the log.
    pub(crate) failed: bool,
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            writes: BTreeMap::new(),
            entries: 0,
            since: Instant::now(),
            failed: false,
        }
    }
}

impl Pending {
    /// Folds one entry's writes in.
    pub(crate) fn absorb(&mut self, writes: BTreeMap<Vec<u8>, Staged>) {
        if self.entries == 0 {
            self.since = Instant::now();
        }
        self.entries += 1;
        for (k, s) in writes {
            match s {
                Staged::Cancel => {
                    self.writes.remove(&k);
                }
                other => {
                    self.writes.insert(k, other);
                }
            }
        }
    }

    /// Whether it is time to write to sled.
    pub(crate) fn due(&self) -> bool {
        self.entries >= FLUSH_ENTRIES
            || self.writes.len() >= FLUSH_KEYS
            || self.since.elapsed() >= FLUSH_AGE
    }

    /// Moves everything into one sled batch (atomic with the marker inside it).
    pub(crate) fn take_batch(&mut self) -> Option<sled::Batch> {
        if self.writes.is_empty() {
            self.entries = 0;
            return None;
        }
        let mut batch = sled::Batch::default();
        for (k, s) in std::mem::take(&mut self.writes) {
            match s {
                Staged::Put(v) | Staged::Fresh(v) => batch.insert(k, v),
                Staged::Del => batch.remove(k),
                Staged::Cancel => {}
            }
        }
        self.entries = 0;
        Some(batch)
    }

    /// Forgets everything staged (a snapshot replaces the whole state).
    pub(crate) fn clear(&mut self) {
        self.writes.clear();
        self.entries = 0;
    }
}

/// Pending writes of one entry over `Pending` over a sled tree.
pub(crate) struct Overlay<'a> {
    tree: &'a sled::Tree,
    base: &'a BTreeMap<Vec<u8>, Staged>,
    writes: BTreeMap<Vec<u8>, Staged>,
}

impl<'a> Overlay<'a> {
    /// Starts an empty overlay over `base` (staged, unwritten entries) and `tree`.
    pub(crate) fn new(tree: &'a sled::Tree, base: &'a BTreeMap<Vec<u8>, Staged>) -> Self {
        Self {
            tree,
            base,
            writes: BTreeMap::new(),
        }
    }

    fn staged(&self, key: &[u8]) -> Option<&Staged> {
        match self.writes.get(key) {
            Some(s) => Some(s),
            None => self.base.get(key),
        }
    }

    /// Reads a key as it will be after the writes so far.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.staged(key) {
            Some(s) => Ok(s.value().cloned()),
            None => Ok(self.tree.get(key)?.map(|v| v.to_vec())),
        }
    }

    /// The first 8 bytes of a value as a little-endian u64, without copying the value
    /// (bincode puts a leading `u64` field there).
    pub(crate) fn peek_u64(&self, key: &[u8]) -> Result<Option<u64>> {
        fn first(v: &[u8]) -> Option<u64> {
            v.get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        }
        match self.staged(key) {
            Some(s) => Ok(s.value().and_then(|v| first(v))),
            None => Ok(self.tree.get(key)?.and_then(|v| first(&v))),
        }
    }

    /// Whether a key exists after the writes so far (no copy of the value).
    pub(crate) fn contains(&self, key: &[u8]) -> Result<bool> {
        match self.staged(key) {
            Some(s) => Ok(s.value().is_some()),
            None => Ok(self.tree.contains_key(key)?),
        }
    }

    /// Stages an insert or update.
    pub(crate) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        // A key first written by this or an earlier staged entry is still not in the tree.
        let fresh = matches!(self.staged(&key), Some(Staged::Fresh(_)));
        self.stage(key, value, fresh);
    }

    fn stage(&mut self, key: Vec<u8>, value: Vec<u8>, fresh: bool) {
        let staged = if fresh {
            Staged::Fresh(value)
        } else {
            Staged::Put(value)
        };
        self.writes.insert(key, staged);
    }

    /// Stages an insert of a key that cannot be in the tree yet (new seq, new message id).
    pub(crate) fn put_fresh(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let fresh = !matches!(self.staged(&key), Some(Staged::Put(_)) | Some(Staged::Del));
        self.stage(key, value, fresh);
    }

    /// Stages a removal.
    pub(crate) fn del(&mut self, key: Vec<u8>) {
        let staged = if matches!(self.staged(&key), Some(Staged::Fresh(_))) {
            Staged::Cancel
        } else {
            Staged::Del
        };
        self.writes.insert(key, staged);
    }

    /// All keys with `prefix` as they will be after the writes so far, in order.
    pub(crate) fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut keys = BTreeSet::new();
        for kv in self.tree.scan_prefix(prefix) {
            let (k, _) = kv?;
            keys.insert(k.to_vec());
        }
        for layer in [self.base, &self.writes] {
            for (k, s) in layer
                .range(prefix.to_vec()..)
                .take_while(|(k, _)| k.starts_with(prefix))
            {
                if s.value().is_some() {
                    keys.insert(k.clone());
                } else {
                    keys.remove(k);
                }
            }
        }
        Ok(keys.into_iter().collect())
    }

    /// Up to `limit` keys in `[start, end)` as they will be after the writes so far, in order.
    pub(crate) fn keys_in_range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>> {
        let mut keys = BTreeSet::new();
        // Staged deletions may hide tree keys, so read a little past the limit from the tree.
        let staged = self.base.len() + self.writes.len();
        for kv in self
            .tree
            .range(start.to_vec()..end.to_vec())
            .take(limit + staged)
        {
            let (k, _) = kv?;
            keys.insert(k.to_vec());
        }
        for layer in [self.base, &self.writes] {
            for (k, s) in layer.range(start.to_vec()..end.to_vec()) {
                if s.value().is_some() {
                    keys.insert(k.clone());
                } else {
                    keys.remove(k);
                }
            }
        }
        Ok(keys.into_iter().take(limit).collect())
    }

    /// The staged writes of this entry.
    pub(crate) fn into_writes(self) -> BTreeMap<Vec<u8>, Staged> {
        self.writes
    }
}
