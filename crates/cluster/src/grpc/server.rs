//! The node's Raft service: one tonic service for every Raft group the node holds, dispatching
//! each request to its group's `Raft` by the group id in the envelope.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::convert::{decode, encode};
use crate::pb::raft_service_server::{RaftService, RaftServiceServer};
use crate::pb::{RaftReply, RaftRequest};
use crate::type_config::{Batch, Raft, TypeConfig};

/// The Raft groups this node serves, by group id.
#[derive(Clone, Default)]
pub struct RaftServer {
    groups: Arc<RwLock<HashMap<u64, Raft>>>,
}

impl RaftServer {
    /// A server holding no group yet.
    pub fn new() -> RaftServer {
        RaftServer::default()
    }

    /// Serves `raft` as group `group` (replacing any previous instance).
    pub fn add_group(&self, group: u64, raft: Raft) {
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group, raft);
    }

    /// Stops serving a group (its replica moved away).
    pub fn remove_group(&self, group: u64) {
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
    }

    /// The tonic service to add to a `Server`.
    pub fn into_service(
        self,
        check: super::CheckSecret,
    ) -> tonic::service::interceptor::InterceptedService<
        RaftServiceServer<RaftServer>,
        super::CheckSecret,
    > {
        let server = RaftServiceServer::new(self)
            .max_decoding_message_size(super::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(super::MAX_MESSAGE_BYTES);
        tonic::service::interceptor::InterceptedService::new(server, check)
    }

    fn group(&self, group: u64) -> Result<Raft, Status> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
            // Not here (yet, or any more): the leader retries, and membership changes fix it.
            .ok_or_else(|| Status::not_found(format!("no replica of group {group} on this node")))
    }
}

impl RaftServer {
    /// Decodes the envelope, runs the call on the group's `Raft`, encodes its `Result`.
    async fn dispatch<Req, Fut, Out>(
        &self,
        request: Request<RaftRequest>,
        call: impl FnOnce(Raft, Req) -> Fut,
    ) -> Result<Response<RaftReply>, Status>
    where
        Req: DeserializeOwned,
        Fut: Future<Output = Out>,
        Out: Serialize,
    {
        let r = request.into_inner();
        let raft = self.group(r.group)?;
        let rpc: Req = decode(&r.payload)?;
        let result = call(raft, rpc).await;
        Ok(Response::new(RaftReply {
            payload: encode(&result)?,
        }))
    }
}

#[tonic::async_trait]
impl RaftService for RaftServer {
    async fn append_entries(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        self.dispatch(request, |raft, rpc: AppendEntriesRequest<TypeConfig>| async move {
            raft.append_entries(rpc).await
        })
        .await
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.dispatch(request, |raft, rpc: VoteRequest<u64>| async move {
            raft.vote(rpc).await
        })
        .await
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        self.dispatch(
            request,
            |raft, rpc: InstallSnapshotRequest<TypeConfig>| async move {
                raft.install_snapshot(rpc).await
            },
        )
        .await
    }

    async fn client_write(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        self.dispatch(request, |raft, batch: Batch| async move {
            raft.client_write(batch).await
        })
        .await
    }
}

impl std::fmt::Debug for RaftServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups: Vec<u64> = self
            .groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        f.debug_struct("RaftServer")
            .field("groups", &groups)
            .finish()
    }
}
