//! The node-to-node gRPC service (`NodeService` in proto/fleetmq/cluster/v1/node.proto):
//! membership, the session registry and takeover, route updates and forwarded publishes.
//!
//! It is served from the start (Raft needs the listener before the node has joined), so it
//! answers `unavailable` until the broker is bound.

use std::sync::{Arc, OnceLock};

use fleetmq_cluster::pb::node_service_server::{NodeService, NodeServiceServer};
use fleetmq_cluster::pb::{self, node_service_client::NodeServiceClient};
use fleetmq_cluster::ClusterError;
use tonic::{Request, Response, Status};

use crate::broker::Broker;

/// The service; cheap to clone.
#[derive(Clone, Default)]
pub struct NodeSvc {
    broker: Arc<OnceLock<Arc<Broker>>>,
}

impl NodeSvc {
    /// A service that answers `unavailable` until [`bind`](Self::bind).
    pub fn new() -> NodeSvc {
        NodeSvc::default()
    }

    /// Starts answering with this broker.
    pub fn bind(&self, broker: Arc<Broker>) {
        let _ = self.broker.set(broker);
    }

    /// The tonic service to add to a `Server`.
    pub fn into_service(
        self,
        check: fleetmq_cluster::grpc::CheckSecret,
    ) -> tonic::service::interceptor::InterceptedService<
        NodeServiceServer<NodeSvc>,
        fleetmq_cluster::grpc::CheckSecret,
    > {
        let server = NodeServiceServer::new(self)
            .max_decoding_message_size(fleetmq_cluster::grpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(fleetmq_cluster::grpc::MAX_MESSAGE_BYTES);
        tonic::service::interceptor::InterceptedService::new(server, check)
    }

    fn broker(&self) -> Result<&Arc<Broker>, Status> {
        self.broker
            .get()
            .ok_or_else(|| Status::unavailable("node is starting"))
    }
}

/// A client for the leader, to pass on a membership request this node cannot serve.
fn leader_client(
    broker: &Broker,
    addr: &str,
) -> Result<NodeServiceClient<fleetmq_cluster::grpc::PeerChannel>, Status> {
    broker
        .cluster
        .client(addr)
        .ok_or_else(|| Status::unavailable(format!("bad leader address {addr}")))
}

fn key_of(k: Option<pb::SessionKey>) -> Result<pb::SessionKey, Status> {
    k.ok_or_else(|| Status::invalid_argument("missing session key"))
}

#[tonic::async_trait]
impl NodeService for NodeSvc {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let broker = self.broker()?;
        let node = request
            .into_inner()
            .node
            .ok_or_else(|| Status::invalid_argument("missing node"))?;
        if node.node_id == 0 || node.advertise_addr.is_empty() {
            return Err(Status::invalid_argument("node id 0 or empty address"));
        }
        match broker
            .durable
            .add_node(node.node_id, node.advertise_addr.clone())
            .await
        {
            Ok(()) => {}
            Err(ClusterError::NotLeader {
                leader_addr: Some(addr),
                ..
            }) => {
                // Pass it on to the leader: the joining node may only know this member.
                let r = leader_client(broker, &addr)?
                    .join(pb::JoinRequest { node: Some(node) })
                    .await?;
                return Ok(r);
            }
            Err(e) => return Err(Status::unavailable(e.to_string())),
        }
        tracing::info!(node = node.node_id, addr = %node.advertise_addr, "node joined");
        let members = broker
            .durable
            .members()
            .into_iter()
            .map(|(id, addr)| pb::NodeInfo {
                node_id: id,
                advertise_addr: addr,
                mqtt_addr: String::new(),
            })
            .collect();
        Ok(Response::new(pb::JoinReply {
            members,
            leader_id: broker.durable.leader().unwrap_or(0),
            shards: broker.durable.shards(),
        }))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveReply>, Status> {
        let broker = self.broker()?;
        let id = request.into_inner().node_id;
        match broker.durable.remove_node(id).await {
            Ok(()) => {
                tracing::info!(node = id, "node left the cluster");
                Ok(Response::new(pb::LeaveReply {}))
            }
            Err(ClusterError::NotLeader {
                leader_addr: Some(addr),
                ..
            }) => {
                leader_client(broker, &addr)?
                    .leave(pb::LeaveRequest { node_id: id })
                    .await
            }
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        let broker = self.broker()?;
        let r = request.into_inner();
        let key = key_of(r.key)?;
        let prev = broker
            .cluster
            .registry_put(
                &key.tenant,
                &key.device_id,
                r.node_id,
                r.connection_id,
                r.clean_start,
            )
            .await;
        Ok(Response::new(pb::RegisterReply {
            previous_node_id: prev.unwrap_or(0),
        }))
    }

    async fn unregister(
        &self,
        request: Request<pb::UnregisterRequest>,
    ) -> Result<Response<pb::UnregisterReply>, Status> {
        let broker = self.broker()?;
        let r = request.into_inner();
        let key = key_of(r.key)?;
        broker
            .cluster
            .registry_remove(&key.tenant, &key.device_id, r.node_id, r.connection_id);
        Ok(Response::new(pb::UnregisterReply {}))
    }

    async fn restore(
        &self,
        request: Request<pb::RestoreRequest>,
    ) -> Result<Response<pb::RestoreReply>, Status> {
        let broker = self.broker()?;
        let r = request.into_inner();
        if r.entries.len() > super::RESTORE_BATCH || r.forget.len() > super::RESTORE_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {} entries per restore",
                super::RESTORE_BATCH
            )));
        }
        // Every key is checked before any is applied: a bad one refuses the whole call.
        let keys = |list: Vec<pb::RestoreEntry>| {
            list.into_iter()
                .map(|e| key_of(e.key).map(|k| (k, e.connection_id)))
                .collect::<Result<Vec<_>, Status>>()
        };
        let forget = keys(r.forget)?;
        let entries = keys(r.entries)?;
        for (key, conn) in forget {
            broker
                .cluster
                .registry_remove(&key.tenant, &key.device_id, r.node_id, conn);
        }
        let mut superseded = Vec::new();
        for (i, (key, conn)) in entries.into_iter().enumerate() {
            if broker
                .cluster
                .registry_restore(&key.tenant, &key.device_id, r.node_id, conn)
            {
                superseded.push(i as u32);
            }
        }
        Ok(Response::new(pb::RestoreReply { superseded }))
    }

    async fn takeover(
        &self,
        request: Request<pb::TakeoverRequest>,
    ) -> Result<Response<pb::TakeoverReply>, Status> {
        let broker = self.broker()?;
        let r = request.into_inner();
        let key = key_of(r.key)?;
        let closed = broker
            .evict(
                &key.tenant,
                &key.device_id,
                r.connection_id,
                r.session_continues,
            )
            .await;
        Ok(Response::new(pb::TakeoverReply { closed }))
    }

    async fn update_routes(
        &self,
        request: Request<pb::RouteUpdate>,
    ) -> Result<Response<pb::RouteAck>, Status> {
        let broker = self.broker()?;
        let (sequence, lagging) = broker.cluster.apply_routes(request.into_inner()).await;
        Ok(Response::new(pb::RouteAck { sequence, lagging }))
    }

    async fn forward(
        &self,
        request: Request<pb::ForwardBatch>,
    ) -> Result<Response<pb::ForwardAck>, Status> {
        let broker = self.broker()?;
        let batch = request.into_inner();
        let mut accepted = 0u32;
        let mut commits = Vec::with_capacity(batch.messages.len());
        for mut m in batch.messages {
            let shares = std::mem::take(&mut m.share_groups);
            match super::convert::message_from_pb(m) {
                Some((tenant, msg)) => {
                    commits.push(broker.publish_forwarded(&tenant, msg, shares));
                    accepted += 1;
                }
                None => {
                    tracing::warn!(
                        from = batch.from_node_id,
                        "malformed forwarded message dropped"
                    );
                    metrics::counter!("fleetmq_cluster_forward_rejected_total").increment(1);
                }
            }
        }
        // Proposals (persistent members of shared subscriptions only) were made in order
        // above; the reply waits for their commits.
        for r in futures_util::future::join_all(commits).await {
            if let Err(e) = r {
                return Err(Status::unavailable(format!("commit failed: {e}")));
            }
        }
        Ok(Response::new(pb::ForwardAck { accepted }))
    }

    async fn deliver(
        &self,
        request: Request<pb::DeliverRequest>,
    ) -> Result<Response<pb::DeliverReply>, Status> {
        let broker = self.broker()?;
        let r = request.into_inner();
        let key = key_of(r.key)?;
        let message = r
            .message
            .ok_or_else(|| Status::invalid_argument("missing message"))?;
        let key = fleetmq_storage::records::SessionKey::new(key.tenant, key.device_id);
        let delivered = if r.at_holder {
            broker.cluster.deliver_here(&key, message)
        } else {
            broker.cluster.deliver_at_home(&key, message).await
        };
        Ok(Response::new(pb::DeliverReply { delivered }))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderReply>, Status> {
        let broker = self.broker()?;
        let r = request.into_inner();
        if r.to_node_id != broker.durable.node_id() {
            return Err(Status::invalid_argument(format!(
                "this is node {}, not {}",
                broker.durable.node_id(),
                r.to_node_id
            )));
        }
        broker
            .durable
            .elect(r.group)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(pb::TransferLeaderReply {}))
    }

    async fn drain(
        &self,
        _request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainReply>, Status> {
        let broker = self.broker()?;
        match broker.cluster.drain().await {
            Ok(n) => Ok(Response::new(pb::DrainReply {
                connections_closed: n,
            })),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}
