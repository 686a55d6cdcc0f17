//! openraft's network for one Raft group over gRPC. Connections to a peer are shared by all
//! groups of the node (`Channels`): HTTP/2 multiplexes their RPCs on one TCP connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use super::auth::AddSecret;
use super::convert::{decode, encode};
use crate::pb::raft_service_client::RaftServiceClient;
use crate::pb::RaftRequest;
use crate::type_config::TypeConfig;
use tonic::service::interceptor::InterceptedService;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A channel to a peer whose calls carry the cluster secret.
pub type PeerChannel = InterceptedService<Channel, AddSecret>;

/// Lazily connected gRPC channels to peers, by advertised address.
#[derive(Debug, Clone, Default)]
pub struct Channels {
    /// A std mutex: the critical section is a map lookup, never held across an await.
    inner: Arc<std::sync::Mutex<HashMap<String, Channel>>>,
    secret: AddSecret,
    /// Mutual TLS to peers (`None`: plaintext HTTP/2).
    tls: Option<super::ClusterTls>,
}

impl Channels {
    /// Channels whose calls carry `secret` (see [`super::auth`]), over TLS when `tls` is set.
    pub fn new(secret: AddSecret, tls: Option<super::ClusterTls>) -> Channels {
        Channels {
            inner: Default::default(),
            secret,
            tls,
        }
    }

    /// The channel to `addr` (`host:port`), created on first use.
    pub fn get(&self, addr: &str) -> Result<PeerChannel, tonic::transport::Error> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(InterceptedService::new(c.clone(), self.secret.clone()));
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.client())?;
        }
        let channel = endpoint.connect_lazy();
        map.insert(addr.to_string(), channel.clone());
        Ok(InterceptedService::new(channel, self.secret.clone()))
    }
}

/// The network of one group.
#[derive(Debug, Clone)]
pub struct GrpcNetwork {
    group: u64,
    channels: Channels,
}

impl GrpcNetwork {
    /// The network of `group`, over the node's shared channels.
    pub fn new(group: u64, channels: Channels) -> GrpcNetwork {
        GrpcNetwork { group, channels }
    }
}

/// A client for one peer of one group.
#[derive(Debug, Clone)]
pub struct GrpcClient {
    group: u64,
    target: u64,
    addr: String,
    client: Option<RaftServiceClient<PeerChannel>>,
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = GrpcClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> GrpcClient {
        let client = match self.channels.get(&node.addr) {
            Ok(c) => Some(
                RaftServiceClient::new(c)
                    .max_decoding_message_size(super::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(super::MAX_MESSAGE_BYTES),
            ),
            Err(e) => {
                tracing::warn!(target, addr = %node.addr, error = %e, "bad peer address");
                None
            }
        };
        GrpcClient {
            group: self.group,
            target,
            addr: node.addr.clone(),
            client,
        }
    }
}

/// Which RPC to make.
#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl GrpcClient {
    /// Sends one RPC and decodes the peer's `Result`: transport failures become
    /// `Unreachable` (openraft backs off) or `Network`; the peer's Raft error comes back as
    /// `RemoteError`.
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.as_mut() else {
            let e = std::io::Error::other(format!("bad address {:?}", self.addr));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        };
        let payload = encode(req).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        let request = RaftRequest {
            group: self.group,
            payload,
        };
        let ttl = option.hard_ttl();
        let call = async {
            match rpc {
                Rpc::Append => client.append_entries(request).await,
                Rpc::Vote => client.vote(request).await,
                Rpc::Snapshot => client.install_snapshot(request).await,
            }
        };
        let reply = match tokio::time::timeout(ttl, call).await {
            Err(_) => {
                return Err(RPCError::Timeout(Timeout {
                    action: match rpc {
                        Rpc::Append => openraft::network::RPCTypes::AppendEntries,
                        Rpc::Vote => openraft::network::RPCTypes::Vote,
                        Rpc::Snapshot => openraft::network::RPCTypes::InstallSnapshot,
                    },
                    id: 0,
                    target: self.target,
                    timeout: ttl,
                }))
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Ok(Err(status)) => return Err(RPCError::Network(NetworkError::new(&status))),
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, RaftError<u64, E>> =
            decode(&reply.payload).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for GrpcClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}

/// The outcome of a proposal forwarded to the leader.
pub type ForwardedWrite = Result<
    openraft::raft::ClientWriteResponse<TypeConfig>,
    RaftError<u64, openraft::error::ClientWriteError<u64, BasicNode>>,
>;

/// Sends a batch of commands to the leader at `addr` to propose in `group`. A transport error
/// is a `tonic::Status`; the leader's answer (which may itself be "not the leader") is the
/// `Ok` value.
pub async fn forward_write(
    channels: &Channels,
    addr: &str,
    group: u64,
    batch: &crate::type_config::Batch,
    timeout: Duration,
) -> Result<ForwardedWrite, tonic::Status> {
    let channel = channels
        .get(addr)
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = RaftServiceClient::new(channel)
        .max_decoding_message_size(super::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(super::MAX_MESSAGE_BYTES);
    let request = RaftRequest {
        group,
        payload: encode(batch)?,
    };
    let reply = tokio::time::timeout(timeout, client.client_write(request))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("forwarded proposal timed out"))??;
    decode(&reply.into_inner().payload)
}
