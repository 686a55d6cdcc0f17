//! openraft log storage over `fleetmq_storage::LogStore`; entries are bincode-encoded.

// openraft fixes the error type of these traits; boxing it here would gain nothing.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use fleetmq_storage::LogStore;
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, StorageIOError, Vote};

use crate::type_config::{RaftStorageError, TypeConfig};

/// Entries kept in memory after they are appended. The state machine reads every entry back
/// right after it is committed; serving that from memory instead of decoding it from sled
/// was a noticeable share of the durable path's CPU.
const RECENT: usize = 64;

/// Raft log of one group.
#[derive(Clone)]
pub struct LogAdapter {
    store: LogStore,
    recent: Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>,
}

impl LogAdapter {
    /// Wraps a group's log store.
    pub fn new(store: LogStore) -> Self {
        Self {
            store,
            recent: Arc::default(),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry<TypeConfig>>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entries of `range` if all of them are in memory.
    fn cached<RB: RangeBounds<u64>>(&self, range: &RB) -> Option<Vec<Entry<TypeConfig>>> {
        let recent = self.recent();
        let first = *recent.keys().next()?;
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.checked_add(1)?,
            Bound::Unbounded => return None,
        };
        if start < first {
            return None;
        }
        let out: Vec<_> = recent
            .range((range.start_bound().cloned(), range.end_bound().cloned()))
            .map(|(_, e)| e.clone())
            .collect();
        // Only a contiguous run that reaches the requested end is a complete answer.
        let want_end = match range.end_bound() {
            Bound::Included(e) => Some(*e),
            Bound::Excluded(e) => e.checked_sub(1),
            Bound::Unbounded => recent.keys().next_back().copied(),
        };
        match (out.last(), want_end) {
            (Some(last), Some(end))
                if last.log_id.index == end && out.len() as u64 == end - start + 1 =>
            {
                Some(out)
            }
            _ => None,
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(bytes)
}

impl RaftLogReader<TypeConfig> for LogAdapter {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, RaftStorageError> {
        if let Some(entries) = self.cached(&range) {
            return Ok(entries);
        }
        let raw = self
            .store
            .range(range)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        raw.into_iter()
            .map(|(i, b)| decode(&b).map_err(|e| StorageIOError::read_log_at_index(i, &e).into()))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogAdapter {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        let purged: Option<LogId<u64>> = match self.store.read_purged() {
            Ok(Some(b)) => Some(decode(&b).map_err(|e| StorageIOError::read_logs(&e))?),
            Ok(None) => None,
            Err(e) => return Err(StorageIOError::read_logs(&e).into()),
        };
        let last = match self
            .store
            .last()
            .map_err(|e| StorageIOError::read_logs(&e))?
        {
            Some((i, b)) => {
                let entry: Entry<TypeConfig> =
                    decode(&b).map_err(|e| StorageIOError::read_log_at_index(i, &e))?;
                Some(entry.log_id)
            }
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), RaftStorageError> {
        let b = bincode::serialize(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.store
            .save_vote(&b)
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, RaftStorageError> {
        match self
            .store
            .read_vote()
            .map_err(|e| StorageIOError::read_vote(&e))?
        {
            Some(b) => Ok(Some(decode(&b).map_err(|e| StorageIOError::read_vote(&e))?)),
            None => Ok(None),
        }
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), RaftStorageError> {
        let b = bincode::serialize(&committed).map_err(|e| StorageIOError::write_logs(&e))?;
        self.store
            .save_committed(&b)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, RaftStorageError> {
        match self
            .store
            .read_committed()
            .map_err(|e| StorageIOError::read_logs(&e))?
        {
            Some(b) => Ok(decode(&b).map_err(|e| StorageIOError::read_logs(&e))?),
            None => Ok(None),
        }
    }

    /// One batch and one flush for everything openraft hands over at once; the entries count
    /// as persisted (and may be committed) only after that flush.
    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut raw = Vec::new();
        let mut kept = Vec::new();
        for entry in entries {
            let b = bincode::serialize(&entry)
                .map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            raw.push((entry.log_id.index, b));
            kept.push(entry);
        }
        match self.store.append(raw).await {
            Ok(()) => {
                {
                    let mut recent = self.recent();
                    for entry in kept {
                        recent.insert(entry.log_id.index, entry);
                    }
                    while recent.len() > RECENT {
                        recent.pop_first();
                    }
                }
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), RaftStorageError> {
        self.recent().retain(|i, _| *i < log_id.index);
        self.store
            .truncate(log_id.index)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        // A truncated suffix must not come back after a crash and be mistaken for agreed log.
        self.store
            .flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), RaftStorageError> {
        self.recent().retain(|i, _| *i > log_id.index);
        let b = bincode::serialize(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        self.store
            .purge(log_id.index, &b)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
