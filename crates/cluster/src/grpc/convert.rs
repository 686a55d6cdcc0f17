//! openraft messages in and out of the `RaftRequest`/`RaftReply` envelopes: bincode of the
//! openraft types (see proto/fleetmq/cluster/v1/raft.proto for why they are opaque).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Encodes an openraft message; a failure is a bug on this side, reported as `internal`.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, tonic::Status> {
    bincode::serialize(value).map_err(|e| tonic::Status::internal(format!("encoding: {e}")))
}

/// Decodes an openraft message; a failure means the peer sent garbage (or runs another
/// version), reported as `invalid_argument`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, tonic::Status> {
    bincode::deserialize(bytes)
        .map_err(|e| tonic::Status::invalid_argument(format!("decoding: {e}")))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use fleetmq_storage::{Command, SessionKey};
    use openraft::raft::{AppendEntriesRequest, VoteRequest};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    use super::*;
    use crate::type_config::{Batch, TypeConfig};

    #[test]
    fn append_entries_round_trip() {
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), 7),
            payload: EntryPayload::Normal(Batch(Arc::new(vec![Command::DeleteSession {
                key: SessionKey::new("t1", "dev1"),
            }]))),
        };
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 6)),
            entries: vec![entry],
            leader_commit: Some(LogId::new(CommittedLeaderId::new(3, 1), 6)),
        };
        let back: AppendEntriesRequest<TypeConfig> = decode(&encode(&req).unwrap()).unwrap();
        assert_eq!(back.vote, req.vote);
        assert_eq!(back.entries, req.entries);
        assert_eq!(back.leader_commit, req.leader_commit);
    }

    #[test]
    fn garbage_is_invalid_argument() {
        let err = decode::<VoteRequest<u64>>(&[1, 2, 3]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
