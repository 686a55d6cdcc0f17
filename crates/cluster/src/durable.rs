//! The broker's entry point to durable state: open, propose (group-committed), recover.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetmq_storage::{
    Command, Entry, RecoveredSession, Response, Space, StateMachineStore, Storage, StoredMessage,
    MAX_COMMANDS_PER_ENTRY,
};
use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Config, RaftMetrics, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;

use crate::error::ClusterError;
use crate::grpc::client::{forward_write, Channels, GrpcNetwork};
use crate::grpc::RaftServer;
use crate::log_adapter::LogAdapter;
use crate::pb::node_service_client::NodeServiceClient;
use crate::pb::{JoinRequest, NodeInfo};
use crate::proposer::{self, Msg, Route};
use crate::sm_adapter::{Applied, SmAdapter};
use crate::type_config::{Batch, Raft};

/// The only group for now (it holds everything); shards get their own ids later.
pub const GROUP: u64 = 0;

/// Voters of the group at most; further members replicate as learners (they serve reads and
/// forward writes, but a write needs only a majority of these).
pub const MAX_VOTERS: usize = 3;

/// How long a joining node keeps asking its seeds before giving up.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `open` waits for leadership and recovery before giving up.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings for [`Durable::open`].
#[derive(Debug, Clone)]
pub struct DurableConfig {
    /// This node's Raft id; must stay the same across restarts of one data directory.
    pub node_id: u64,
    /// Directory of the node's sled database.
    pub data_dir: PathBuf,
    /// Commands per Raft entry at most (e.g. 4096); clamped to 1..=65536.
    pub max_batch: usize,
    /// Address other nodes will reach this node's Raft service at (stored in membership).
    pub advertise_addr: String,
    /// gRPC addresses of existing members to join through; empty: form a one-node cluster
    /// (only on an empty data directory; a member restarts from its own state).
    pub join: Vec<String>,
    /// The node's Raft gRPC service, which must be serving before `open` is called when the
    /// node joins or belongs to a cluster; `None` for a node that stays alone (tests).
    pub server: Option<RaftServer>,
    /// What outgoing node-to-node calls carry (the cluster secret; see `grpc::auth`).
    pub secret: crate::grpc::AddSecret,
    /// Mutual TLS for calls to peers (`None`: plaintext).
    pub tls: Option<crate::grpc::ClusterTls>,
}

/// Handle to the node's durable state; cheap to clone.
#[derive(Clone)]
pub struct Durable {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    raft: Raft,
    channels: Channels,
    storage: Storage,
    sm: StateMachineStore,
    applied: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Applied>>>,
    tx: mpsc::UnboundedSender<Msg>,
    closing: AtomicBool,
    batcher: Mutex<Option<JoinHandle<()>>>,
}

fn raft_config() -> Result<Config, ClusterError> {
    let config = Config {
        cluster_name: "fleetmq".to_string(),
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        // Snapshot every 4k entries and keep only a short tail, so the log (and sled, whose
        // memory grows with its size) does not grow
        // forever; with batching that is far more than 20k commands.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(4_000),
        // Entries are group-committed batches of up to thousands of commands: a few per
        // append keeps each RPC well under the gRPC message limit.
        max_payload_entries: 32,
        max_in_snapshot_log_to_keep: 200,
        purge_batch_size: 256,
        ..Default::default()
    };
    config
        .validate()
        .map_err(|e| ClusterError::Raft(e.to_string()))
}

impl Durable {
    /// Opens the data directory, starts Raft, initialises a one-member cluster on an empty
    /// directory, and returns once this node is leader and has applied its whole log, so that
    /// [`sessions`](Self::sessions) and [`retained`](Self::retained) see recovered state.
    pub async fn open(cfg: DurableConfig) -> Result<Durable, ClusterError> {
        Self::open_with(cfg, raft_config()?).await
    }

    async fn open_with(cfg: DurableConfig, config: Config) -> Result<Durable, ClusterError> {
        let storage = Storage::open(&cfg.data_dir)?;
        let log = LogAdapter::new(storage.log_store(GROUP)?);
        let sm = storage.state_machine(GROUP)?;
        let (applied_tx, applied_rx) = mpsc::unbounded_channel();
        let sm_adapter = SmAdapter::new(sm.clone(), storage.clone())
            .map_err(|e| ClusterError::Fatal(e.to_string()))?
            .with_observer(applied_tx);
        let channels = Channels::new(cfg.secret.clone(), cfg.tls.clone());
        let network = GrpcNetwork::new(GROUP, channels.clone());
        let raft = Raft::new(cfg.node_id, Arc::new(config), network, log, sm_adapter).await?;
        if let Some(server) = &cfg.server {
            server.add_group(GROUP, raft.clone());
        }

        if !raft.is_initialized().await? && !cfg.join.is_empty() {
            join(&cfg, &channels).await?;
        } else if !raft.is_initialized().await? {
            let members = BTreeMap::from([(
                cfg.node_id,
                BasicNode {
                    addr: cfg.advertise_addr.clone(),
                },
            )]);
            match raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(RaftError::Fatal(f)) => return Err(f.into()),
                Err(RaftError::APIError(e)) => return Err(ClusterError::Raft(e.to_string())),
            }
        }

        // A leader is known (this node, once elected, or the one that added it) and everything
        // in the local log is applied, so recovery below sees the state as of this start.
        raft.wait(Some(OPEN_TIMEOUT))
            .metrics(
                |m| {
                    m.current_leader.is_some()
                        && m.last_applied.map(|l| l.index) >= m.last_log_index
                },
                "a known leader and the whole local log applied",
            )
            .await
            .map_err(|e| ClusterError::Timeout(e.to_string()))?;

        let max_batch = cfg.max_batch.clamp(1, MAX_COMMANDS_PER_ENTRY);
        let (tx, rx) = mpsc::unbounded_channel();
        let route = Route {
            self_id: cfg.node_id,
            group: GROUP,
            channels: channels.clone(),
        };
        let batcher = tokio::spawn(proposer::run(raft.clone(), route, rx, max_batch));
        Ok(Durable {
            inner: Arc::new(Inner {
                id: cfg.node_id,
                raft,
                channels,
                storage,
                sm,
                applied: std::sync::Mutex::new(Some(applied_rx)),
                tx,
                closing: AtomicBool::new(false),
                batcher: Mutex::new(Some(batcher)),
            }),
        })
    }

    /// Proposes one command; resolves once it is committed (flushed) and applied.
    /// Commands are applied in the order their `propose`/`propose_nowait` calls happened.
    pub async fn propose(&self, cmd: Command) -> Result<Response, ClusterError> {
        self.propose_indexed(cmd).await.map(|(r, _)| r)
    }

    /// Like [`propose`](Self::propose), also returning the index of the entry it was
    /// committed in (to make other nodes wait until they have applied it).
    pub async fn propose_indexed(&self, cmd: Command) -> Result<(Response, u64), ClusterError> {
        fleetmq_storage::validate(&cmd).map_err(|e| ClusterError::InvalidCommand(e.to_string()))?;
        if self.inner.closing.load(Ordering::Acquire) {
            return Err(ClusterError::ShuttingDown);
        }
        let (tx, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Propose(cmd, Some(tx)))
            .map_err(|_| ClusterError::ShuttingDown)?;
        rx.await.map_err(|_| ClusterError::ShuttingDown)?
    }

    /// Proposes one command without waiting; same ordering as [`propose`](Self::propose).
    /// Failures are only logged, so use it where a lost command is harmless (e.g. acks).
    pub fn propose_nowait(&self, cmd: Command) {
        if let Err(e) = fleetmq_storage::validate(&cmd) {
            tracing::warn!(error = %e, "dropping invalid command");
            return;
        }
        if self.inner.closing.load(Ordering::Acquire)
            || self.inner.tx.send(Msg::Propose(cmd, None)).is_err()
        {
            tracing::debug!("proposal after shutdown dropped");
        }
    }

    /// All persistent sessions as last applied (call after `open` for recovery).
    pub fn sessions(&self) -> Result<Vec<RecoveredSession>, ClusterError> {
        Ok(self.inner.sm.sessions()?)
    }

    /// All retained messages as `(tenant, topic, message)`.
    pub fn retained(&self) -> Result<Vec<(String, String, StoredMessage)>, ClusterError> {
        Ok(self.inner.sm.retained()?)
    }

    /// One directory entry as last applied here.
    pub fn entry(
        &self,
        space: Space,
        tenant: &str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, ClusterError> {
        Ok(self.inner.sm.entry(space, tenant, name)?)
    }

    /// One persistent session as last applied here (to move it to this node).
    pub fn session(
        &self,
        key: &fleetmq_storage::SessionKey,
    ) -> Result<Option<RecoveredSession>, ClusterError> {
        Ok(self.inner.sm.session(key)?)
    }

    /// Every directory entry of a space as last applied: `(space, tenant, name, value)`.
    pub fn entries(&self, space: Space) -> Result<Vec<Entry>, ClusterError> {
        Ok(self.inner.sm.entries(space)?)
    }

    /// The stream of directory and retained commands this node applies (taken once).
    pub fn take_applied(&self) -> Option<mpsc::UnboundedReceiver<Applied>> {
        self.inner
            .applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.inner.id
    }

    /// The gRPC channels to other nodes, shared with Raft.
    pub fn channels(&self) -> &Channels {
        &self.inner.channels
    }

    /// The members of the cluster (voters and learners) as `(id, gRPC address)`, by id.
    pub fn members(&self) -> Vec<(u64, String)> {
        // Borrowed, not cloned: the metrics hold the replication map too.
        let rx = self.inner.raft.metrics();
        let m = rx.borrow();
        m.membership_config
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect()
    }

    /// How many members the cluster has (cheap: on the publish path).
    pub fn member_count(&self) -> usize {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .nodes()
            .count()
    }

    /// The voters of the group as this node last heard.
    pub fn voters(&self) -> std::collections::BTreeSet<u64> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// The leader of the group as this node last heard.
    pub fn leader(&self) -> Option<u64> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// The Raft metrics, when this node leads the group; `NotLeader` (naming the leader)
    /// otherwise: membership changes are the leader's.
    fn leader_metrics(&self) -> Result<RaftMetrics<u64, BasicNode>, ClusterError> {
        let m = self.inner.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.inner.id) {
            return Err(ClusterError::NotLeader {
                leader_id: m.current_leader,
                leader_addr: leader_addr(&m),
            });
        }
        Ok(m)
    }

    /// Adds a node as a learner (returning once it has caught up), then as a voter while the
    /// group has fewer than [`MAX_VOTERS`]. Only the leader can; others answer `NotLeader`.
    pub async fn add_node(&self, id: u64, addr: String) -> Result<(), ClusterError> {
        let raft = &self.inner.raft;
        let m = self.leader_metrics()?;
        let known = m
            .membership_config
            .nodes()
            .any(|(n, node)| *n == id && node.addr == addr);
        if !known {
            raft.add_learner(id, BasicNode { addr }, true)
                .await
                .map_err(membership_err)?;
        }
        let voters: std::collections::BTreeSet<u64> = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if voters.len() < MAX_VOTERS && !voters.contains(&id) {
            let mut next = voters;
            next.insert(id);
            raft.change_membership(next, false)
                .await
                .map_err(membership_err)?;
        }
        Ok(())
    }

    /// Removes a node from the group (it leaves the cluster). A learner takes the place of a
    /// leaving voter while there are fewer than [`MAX_VOTERS`]. Only the leader can; others
    /// answer `NotLeader`. Removing a node that is not a member is a no-op.
    pub async fn remove_node(&self, id: u64) -> Result<(), ClusterError> {
        let raft = &self.inner.raft;
        let m = self.leader_metrics()?;
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let all: Vec<u64> = membership.nodes().map(|(n, _)| *n).collect();
        if !all.contains(&id) {
            return Ok(());
        }
        if voters.contains(&id) {
            let mut next = voters.clone();
            next.remove(&id);
            if next.len() < MAX_VOTERS {
                if let Some(l) = all.iter().find(|n| **n != id && !voters.contains(n)) {
                    next.insert(*l);
                }
            }
            if next.is_empty() {
                return Err(ClusterError::Raft("the last voter cannot leave".into()));
            }
            // retain = false: the leaving voter is dropped, not kept as a learner.
            raft.change_membership(next, false)
                .await
                .map_err(membership_err)?;
        } else {
            raft.change_membership(
                openraft::ChangeMembers::RemoveNodes(std::collections::BTreeSet::from([id])),
                false,
            )
            .await
            .map_err(membership_err)?;
        }
        Ok(())
    }

    /// On the leader: puts live learners in the places of voters in `dead` and promotes
    /// learners while there are fewer than [`MAX_VOTERS`] voters (see [`crate::rebalance`]).
    /// Replaced voters stay as learners. True when the membership changed; elsewhere a no-op.
    pub async fn rebalance_voters(
        &self,
        dead: &std::collections::BTreeSet<u64>,
    ) -> Result<bool, ClusterError> {
        let raft = &self.inner.raft;
        let (voters, learners) = {
            let rx = raft.metrics();
            let m = rx.borrow();
            if m.current_leader != Some(self.inner.id) {
                return Ok(false);
            }
            let membership = m.membership_config.membership();
            if membership.get_joint_config().len() > 1 {
                return Ok(false); // a change is under way
            }
            let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
            let learners = membership.learner_ids().collect();
            (voters, learners)
        };
        let Some(next) = crate::rebalance::plan_voters(&voters, &learners, dead, MAX_VOTERS) else {
            return Ok(false);
        };
        tracing::warn!(?voters, ?next, ?dead, "replacing voters");
        // retain = true: a replaced voter stays a learner and catches up when it returns.
        raft.change_membership(next, true)
            .await
            .map_err(membership_err)?;
        Ok(true)
    }

    /// Waits until this node has applied everything the leader had committed when this was
    /// called, so that reads of the local state machine see every acknowledged write (used
    /// before a session moves here from another node).
    pub async fn read_barrier(&self) -> Result<(), ClusterError> {
        // Retried through a failover (an election takes a few hundred milliseconds).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match self.read_barrier_once().await {
                Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    async fn read_barrier_once(&self) -> Result<(), ClusterError> {
        let raft = &self.inner.raft;
        let empty = Batch(Arc::new(Vec::new()));
        let remote_leader = {
            let rx = raft.metrics();
            let m = rx.borrow();
            match m.current_leader {
                Some(l) if l == self.inner.id => None,
                Some(_) => leader_addr(&m),
                None => {
                    return Err(ClusterError::Unavailable("no leader known".into()));
                }
            }
        };
        let index = match remote_leader {
            None => {
                // client_write returns once applied here: nothing more to wait for.
                raft.client_write(empty).await.map_err(|e| match e {
                    RaftError::APIError(e) => ClusterError::from(&e),
                    RaftError::Fatal(f) => f.into(),
                })?;
                return Ok(());
            }
            Some(addr) => {
                match forward_write(&self.inner.channels, &addr, GROUP, &empty, OPEN_TIMEOUT).await
                {
                    Ok(Ok(r)) => r.log_id.index,
                    Ok(Err(RaftError::APIError(e))) => return Err(ClusterError::from(&e)),
                    Ok(Err(RaftError::Fatal(f))) => return Err(ClusterError::Raft(f.to_string())),
                    Err(s) => return Err(ClusterError::Unavailable(s.message().to_string())),
                }
            }
        };
        raft.wait(Some(OPEN_TIMEOUT))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map_err(|e| ClusterError::Timeout(e.to_string()))?;
        Ok(())
    }

    /// The index of the last entry applied here.
    pub fn applied_index(&self) -> u64 {
        self.inner
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map(|l| l.index)
            .unwrap_or(0)
    }

    /// Waits (at most `timeout`) until this node has applied `index`; false on timeout.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        if self.applied_index() >= index {
            return true;
        }
        self.inner
            .raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "applied index")
            .await
            .is_ok()
    }

    /// Current Raft metrics (leadership, log and applied index), for health checks.
    pub fn raft_metrics(&self) -> RaftMetrics<u64, BasicNode> {
        self.inner.raft.metrics().borrow().clone()
    }

    /// Builds a snapshot now (and purges the log behind it), instead of waiting for the
    /// snapshot policy; for operations and tests. Returns before the snapshot is done.
    pub async fn trigger_snapshot(&self) -> Result<(), ClusterError> {
        Ok(self.inner.raft.trigger().snapshot().await?)
    }

    /// Answers every proposal queued so far, refuses new ones, stops Raft and flushes sled.
    pub async fn shutdown(&self) -> Result<(), ClusterError> {
        self.inner.closing.store(true, Ordering::Release);
        let Some(batcher) = self.inner.batcher.lock().await.take() else {
            return Ok(()); // already shut down
        };
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.inner.tx.send(Msg::Shutdown(ack_tx)).is_ok() {
            let _ = ack_rx.await;
        }
        if let Err(e) = batcher.await {
            tracing::error!(error = %e, "raft batcher task failed");
        }
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| ClusterError::Fatal(e.to_string()))?;
        // Staged state-machine writes go to sled before the final flush, so the next start
        // does not have to re-apply them from the log (it could, but this is faster).
        self.inner.sm.write_back()?;
        self.inner.storage.flush().await?;
        Ok(())
    }
}

/// The advertised address of the leader the metrics name, if it is known and a member.
pub(crate) fn leader_addr(m: &RaftMetrics<u64, BasicNode>) -> Option<String> {
    let l = m.current_leader?;
    m.membership_config
        .nodes()
        .find(|(n, _)| **n == l)
        .map(|(_, n)| n.addr.clone())
}

fn membership_err<E: std::fmt::Display>(e: RaftError<u64, E>) -> ClusterError {
    match e {
        RaftError::APIError(e) => ClusterError::Raft(e.to_string()),
        RaftError::Fatal(f) => f.into(),
    }
}

/// Asks the seeds, in turn, to add this node, until one succeeds or `JOIN_TIMEOUT` passes.
/// Any member will do: one that is not the leader passes the request on.
async fn join(cfg: &DurableConfig, channels: &Channels) -> Result<(), ClusterError> {
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    let me = NodeInfo {
        node_id: cfg.node_id,
        advertise_addr: cfg.advertise_addr.clone(),
        mqtt_addr: String::new(),
    };
    loop {
        for seed in &cfg.join {
            let channel = match channels.get(seed) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%seed, error = %e, "bad seed address");
                    continue;
                }
            };
            let mut client = NodeServiceClient::new(channel)
                .max_decoding_message_size(crate::grpc::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(crate::grpc::MAX_MESSAGE_BYTES);
            let req = JoinRequest {
                node: Some(me.clone()),
            };
            match tokio::time::timeout(OPEN_TIMEOUT, client.join(req)).await {
                Ok(Ok(reply)) => {
                    let r = reply.into_inner();
                    tracing::info!(%seed, members = r.members.len(), leader = r.leader_id, "joined the cluster");
                    return Ok(());
                }
                Ok(Err(status)) => {
                    tracing::warn!(%seed, error = %status.message(), "join refused; retrying")
                }
                Err(_) => tracing::warn!(%seed, "join timed out; retrying"),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ClusterError::Timeout(format!(
                "no seed of {:?} let this node join",
                cfg.join
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetmq_storage::SessionRecord;

    fn key() -> fleetmq_storage::SessionKey {
        fleetmq_storage::SessionKey::new("t", "c")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshot_purges_log_and_restart_recovers_from_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = DurableConfig {
            node_id: 7,
            data_dir: dir.path().to_path_buf(),
            max_batch: 16,
            advertise_addr: "n7:7070".into(),
            join: Vec::new(),
            server: None,
            secret: Default::default(),
            tls: None,
        };
        let config = Config {
            max_in_snapshot_log_to_keep: 0,
            purge_batch_size: 1,
            ..raft_config().expect("config")
        };
        let d = Durable::open_with(cfg.clone(), config).await.expect("open");
        let record = SessionRecord {
            expiry_secs: 60,
            protocol: 4,
            disconnected_at_ms: None,
            subscriptions: vec![],
        };
        d.propose(Command::PutSession {
            key: key(),
            record,
            fresh: true,
        })
        .await
        .expect("put");
        for i in 0..20 {
            d.propose(Command::SetDisconnected {
                key: key(),
                at_ms: Some(i),
            })
            .await
            .expect("set");
        }
        let last = d.raft_metrics().last_applied;
        d.trigger_snapshot().await.expect("trigger");
        d.inner
            .raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.snapshot == last && m.purged == last,
                "snapshot and purge",
            )
            .await
            .expect("snapshot built and log purged");
        d.shutdown().await.expect("shutdown");
        drop(d);

        let d = Durable::open(cfg).await.expect("reopen");
        let s = d.sessions().expect("sessions");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].record.disconnected_at_ms, Some(19));
        let r = d
            .propose(Command::SetDisconnected {
                key: key(),
                at_ms: None,
            })
            .await;
        assert_eq!(r.expect("after purge"), Response::Ok);
        d.shutdown().await.expect("shutdown");
    }
}
