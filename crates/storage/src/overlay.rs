//! In-entry write overlay: the commands of one log entry read each other's writes from here
//! (refcounts, next_seq, queue keys) before everything goes to sled as one atomic batch.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::Result;

/// Pending writes of one entry over a sled tree. `None` marks a deletion.
pub(crate) struct Overlay<'a> {
    tree: &'a sled::Tree,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Overlay<'a> {
    /// Starts an empty overlay over `tree`.
    pub(crate) fn new(tree: &'a sled::Tree) -> Self {
        Self {
            tree,
            writes: BTreeMap::new(),
        }
    }

    /// Reads a key as it will be after the writes so far.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.tree.get(key)?.map(|v| v.to_vec())),
        }
    }

    /// Stages an insert.
    pub(crate) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    /// Stages a removal.
    pub(crate) fn del(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    /// All keys with `prefix` as they will be after the writes so far, in order.
    pub(crate) fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut keys = BTreeSet::new();
        for kv in self.tree.scan_prefix(prefix) {
            let (k, _) = kv?;
            keys.insert(k.to_vec());
        }
        for (k, v) in self
            .writes
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            if v.is_some() {
                keys.insert(k.clone());
            } else {
                keys.remove(k);
            }
        }
        Ok(keys.into_iter().collect())
    }

    /// Turns the staged writes into one sled batch.
    pub(crate) fn into_batch(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (k, v) in self.writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        batch
    }
}
