//! Errors of the cluster layer, split into fatal (stop using this node's durable state) and
//! retryable (try again, possibly elsewhere).

use openraft::error::{ClientWriteError, Fatal};
use openraft::BasicNode;

/// An error from proposing or opening durable state.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The local database failed. Fatal.
    #[error("storage: {0}")]
    Storage(#[from] fleetmq_storage::StorageError),
    /// Raft stopped because of a storage error or a panic. Fatal.
    #[error("raft fatal: {0}")]
    Fatal(String),
    /// This node is not the leader of the group. Retryable at `leader_id`.
    #[error("not the leader (leader: {leader_id:?} at {leader_addr:?})")]
    NotLeader {
        /// Current leader, if known.
        leader_id: Option<u64>,
        /// Its advertised address, if known.
        leader_addr: Option<String>,
    },
    /// Shutdown has begun; the proposal was not submitted. Retryable on another node.
    #[error("shutting down")]
    ShuttingDown,
    /// Waiting for leadership or recovery took too long. Retryable.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The group has no reachable leader (a partition, or a majority of its replicas down):
    /// the write was refused, not lost. Retryable.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The command can never be applied (a key too long for the encoding). Not retryable.
    #[error("invalid command: {0}")]
    InvalidCommand(String),
    /// Raft refused an operation in a way this layer does not expect (e.g. membership).
    #[error("raft: {0}")]
    Raft(String),
}

impl ClusterError {
    /// True when the same request may succeed later or on another node.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NotLeader { .. } | Self::ShuttingDown | Self::Timeout(_) | Self::Unavailable(_)
        )
    }

    /// True when this node's durable state can no longer be used.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Storage(_) | Self::Fatal(_))
    }
}

impl From<Fatal<u64>> for ClusterError {
    fn from(e: Fatal<u64>) -> Self {
        match e {
            Fatal::Stopped => Self::ShuttingDown,
            other => Self::Fatal(other.to_string()),
        }
    }
}

impl From<&ClientWriteError<u64, BasicNode>> for ClusterError {
    fn from(e: &ClientWriteError<u64, BasicNode>) -> Self {
        match e {
            ClientWriteError::ForwardToLeader(f) => Self::NotLeader {
                leader_id: f.leader_id,
                leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()),
            },
            ClientWriteError::ChangeMembershipError(c) => Self::Raft(c.to_string()),
        }
    }
}
