//! openraft log storage over `fleetmq_storage::LogStore`; entries are bincode-encoded.

// openraft fixes the error type of these traits; boxing it here would gain nothing.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::RangeBounds;

use fleetmq_storage::LogStore;
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, StorageIOError, Vote};

use crate::type_config::{RaftStorageError, TypeConfig};

/// Raft log of one group.
#[derive(Clone)]
pub struct LogAdapter {
    store: LogStore,
}

impl LogAdapter {
    /// Wraps a group's log store.
    pub fn new(store: LogStore) -> Self {
        Self { store }
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
        for entry in entries {
            let b = bincode::serialize(&entry)
                .map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            raw.push((entry.log_id.index, b));
        }
        match self.store.append(raw).await {
            Ok(()) => {
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
        let b = bincode::serialize(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        self.store
            .purge(log_id.index, &b)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
