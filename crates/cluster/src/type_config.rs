//! The openraft type configuration shared by every group.

use std::io::Cursor;
use std::sync::Arc;

use fleetmq_storage::{Command, Response};
use serde::{Deserialize, Serialize};

/// The application data of one Raft entry: all commands one group commit collected. Shared
/// through `Arc` because openraft clones entries (and the log keeps recent ones in memory), and
/// a batch can hold thousands of messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch(pub Arc<Vec<Command>>);

openraft::declare_raft_types!(
    /// Type configuration of fleetmq's Raft groups.
    pub TypeConfig:
        D = Batch,
        R = Vec<Response>,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft instance of this configuration.
pub type Raft = openraft::Raft<TypeConfig>;

/// Raft's storage error for this configuration.
pub type RaftStorageError = openraft::StorageError<u64>;
