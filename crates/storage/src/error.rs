//! Errors of the storage layer.

/// Everything that can go wrong reading or writing the node's sled database.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// sled reported an I/O or corruption error.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value could not be (de)serialised.
    #[error("codec: {0}")]
    Codec(#[from] bincode::Error),
    /// A key or value on disk does not have the shape this code writes.
    #[error("corrupt data in {tree}: {what}")]
    Corrupt {
        /// Tree the bad record lives in.
        tree: String,
        /// What was wrong with it.
        what: String,
    },
    /// A string is longer than the u16 length prefix of the key encoding allows.
    #[error("string of {0} bytes is too long for a key (max 65535)")]
    KeyTooLong(usize),
    /// Staged state-machine writes could not be written earlier; the state machine refuses
    /// further work so that a restart re-applies the log from the last persisted marker.
    #[error("state machine write-back failed earlier; restart to recover from the log")]
    WriteBackFailed,
    /// One log entry carried more commands than message ids can distinguish.
    #[error("{0} commands in one entry; at most 65536 are allowed")]
    TooManyCommands(usize),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, StorageError>;
