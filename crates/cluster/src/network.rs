//! Raft network for a group with one member: every peer is unreachable.
//!
//! The real transport (tonic gRPC to other nodes) comes with multi-node support in a later
//! issue; a one-member group never sends RPCs, so this only has to type-check and fail loudly.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;

use crate::type_config::TypeConfig;

/// Factory handing out clients that cannot reach anyone.
#[derive(Debug, Clone, Default)]
pub struct NoNetwork;

/// A client for `target` that always reports it unreachable.
#[derive(Debug, Clone)]
pub struct UnreachableClient {
    target: u64,
}

impl UnreachableClient {
    fn err<E: std::error::Error>(&self) -> RPCError<u64, BasicNode, E> {
        let io = std::io::Error::other(format!("no network to node {} yet", self.target));
        RPCError::Unreachable(Unreachable::new(&io))
    }
}

impl RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = UnreachableClient;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> Self::Network {
        UnreachableClient { target }
    }
}

impl RaftNetwork<TypeConfig> for UnreachableClient {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(self.err())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        Err(self.err())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(self.err())
    }
}
