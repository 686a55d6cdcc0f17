//! The raw Raft log of one group: `raft/<group>/log` (index u64 BE → entry bytes) and
//! `raft/<group>/meta` (vote, committed, last purged). Values are opaque: the cluster crate
//! serialises openraft types into them.

use std::ops::RangeBounds;

use crate::error::{Result, StorageError};
use crate::keys;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

/// Log and hard state of one Raft group.
#[derive(Clone)]
pub struct LogStore {
    pub(crate) db: sled::Db,
    pub(crate) log: sled::Tree,
    pub(crate) meta: sled::Tree,
}

fn index_of(key: &[u8]) -> Result<u64> {
    keys::read_u64(key).ok_or_else(|| StorageError::Corrupt {
        tree: "raft log".into(),
        what: "index".into(),
    })
}

impl LogStore {
    /// Appends entries in one batch and flushes once: that flush is the group commit.
    pub async fn append<I: IntoIterator<Item = (u64, Vec<u8>)>>(&self, entries: I) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (index, bytes) in entries {
            batch.insert(&keys::u64_key(index), bytes);
        }
        self.log.apply_batch(batch)?;
        self.flush().await
    }

    /// Entries whose index lies in `range`, in index order.
    pub fn range<R: RangeBounds<u64>>(&self, range: R) -> Result<Vec<(u64, Vec<u8>)>> {
        let start = range.start_bound().map(|i| keys::u64_key(*i));
        let end = range.end_bound().map(|i| keys::u64_key(*i));
        let mut out = Vec::new();
        for kv in self.log.range::<[u8; 8], _>((start, end)) {
            let (k, v) = kv?;
            out.push((index_of(&k)?, v.to_vec()));
        }
        Ok(out)
    }

    /// The entry with the highest index, if any.
    pub fn last(&self) -> Result<Option<(u64, Vec<u8>)>> {
        match self.log.last()? {
            Some((k, v)) => Ok(Some((index_of(&k)?, v.to_vec()))),
            None => Ok(None),
        }
    }

    /// Removes every entry with index `>= since` (conflicting suffix).
    pub fn truncate(&self, since: u64) -> Result<()> {
        match self.last()? {
            Some((last, _)) if last >= since => self.remove_indices(since, last),
            _ => Ok(()),
        }
    }

    /// Records `purged` first, then removes every entry with index `<= upto`, so a crash in
    /// between leaves stale entries below the marker, never a gap above it.
    pub fn purge(&self, upto: u64, purged: &[u8]) -> Result<()> {
        self.meta.insert(PURGED, purged)?;
        let first = match self.log.first()? {
            Some((k, _)) => index_of(&k)?,
            None => return Ok(()),
        };
        if first > upto {
            return Ok(());
        }
        self.remove_indices(first, upto)
    }

    /// Removes `from..=to` by computing the keys: log indices are contiguous, and reading
    /// the entries just to learn their keys made purging the main cost of the durable path
    /// (large entries live in separate sled blob files).
    fn remove_indices(&self, from: u64, to: u64) -> Result<()> {
        let mut batch = sled::Batch::default();
        for index in from..=to {
            batch.remove(&keys::u64_key(index));
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }

    /// Stores the vote and flushes: a vote must never be forgotten after it was granted.
    pub async fn save_vote(&self, vote: &[u8]) -> Result<()> {
        self.meta.insert(VOTE, vote)?;
        self.flush().await
    }

    /// The stored vote.
    pub fn read_vote(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.meta.get(VOTE)?.map(|v| v.to_vec()))
    }

    /// Stores the committed marker (not flushed: it is an optimisation for faster restarts).
    pub fn save_committed(&self, committed: &[u8]) -> Result<()> {
        self.meta.insert(COMMITTED, committed)?;
        Ok(())
    }

    /// The stored committed marker.
    pub fn read_committed(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.meta.get(COMMITTED)?.map(|v| v.to_vec()))
    }

    /// The stored last-purged marker.
    pub fn read_purged(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.meta.get(PURGED)?.map(|v| v.to_vec()))
    }

    /// Makes everything written so far durable (the whole sled database).
    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }
}
