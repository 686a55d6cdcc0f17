//! The one sled database of a node and the per-group stores it hands out.

use std::path::Path;

use crate::error::Result;
use crate::log_store::LogStore;
use crate::state_machine::StateMachineStore;

/// A node's sled database. Cheap to clone (sled handles are reference counted).
#[derive(Clone)]
pub struct Storage {
    db: sled::Db,
}

impl Storage {
    /// Opens (or creates) the database in `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Storage> {
        let db = sled::Config::new()
            .path(path.as_ref())
            // Modest cache: the broker keeps hot session state in memory itself.
            .cache_capacity(64 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Ok(Storage { db })
    }

    /// The Raft log store of `group`.
    pub fn log_store(&self, group: u64) -> Result<LogStore> {
        Ok(LogStore {
            db: self.db.clone(),
            log: self.db.open_tree(format!("raft/{group}/log"))?,
            meta: self.db.open_tree(format!("raft/{group}/meta"))?,
        })
    }

    /// The state machine store of `group`.
    pub fn state_machine(&self, group: u64) -> Result<StateMachineStore> {
        Ok(StateMachineStore {
            tree: self.db.open_tree(format!("sm/{group}"))?,
            snapshot_tree: self.db.open_tree(format!("sm/{group}/snapshot"))?,
            pending: Default::default(),
        })
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Same as [`flush`](Self::flush), for callers outside an async context.
    pub fn flush_blocking(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}
