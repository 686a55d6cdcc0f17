//! The broker's entry point to durable state: open, propose (group-committed), recover.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetmq_storage::{
    Command, Entry, RecoveredSession, Response, Space, StateMachineStore, Storage, StoredMessage,
    MAX_COMMANDS_PER_ENTRY, NO_SESSION_SEQ,
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
use crate::{placement, shard};

pub use crate::shard::META;

/// Session shards of a new cluster unless told otherwise (`--shards`).
pub const DEFAULT_SHARDS: u32 = 4;

/// Session shards at most: a group id must fit the top byte of a message id (`tag_msg_ids`),
/// and every group costs each node a Raft instance.
pub const MAX_SHARDS: u32 = 128;

/// The meta group's setting (`Space::Setting`, no tenant) holding the shard count.
pub const SHARDS_SETTING: &str = "raft.shards";

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
    /// Session shards when this node creates the cluster (ignored when it joins one or
    /// restarts: the count is fixed at creation, in the meta group's `raft.shards` setting).
    pub shards: u32,
}

/// How far a node has applied each group: the applied index by group id (0: meta,
/// `1..=S`: shards). Compared element-wise: a node has applied another's progress when it is
/// at or past it in every group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress(pub Vec<u64>);

impl Progress {
    /// The index in `group` (0 when unknown).
    pub fn get(&self, group: u64) -> u64 {
        self.0.get(group as usize).copied().unwrap_or(0)
    }

    /// Raises `group` to at least `index`.
    pub fn raise(&mut self, group: u64, index: u64) {
        let g = group as usize;
        if self.0.len() <= g {
            self.0.resize(g + 1, 0);
        }
        self.0[g] = self.0[g].max(index);
    }

    /// Raises every group to at least `other`'s.
    pub fn merge(&mut self, other: &Progress) {
        for (g, i) in other.0.iter().enumerate() {
            self.raise(g as u64, *i);
        }
    }

    /// Progress in one group only.
    pub fn at(group: u64, index: u64) -> Progress {
        let mut p = Progress::default();
        p.raise(group, index);
        p
    }
}

/// Handle to the node's durable state; cheap to clone.
#[derive(Clone)]
pub struct Durable {
    inner: Arc<Inner>,
}

/// One Raft group of this node: the meta group or a session shard.
struct Group {
    id: u64,
    raft: Raft,
    sm: StateMachineStore,
    tx: mpsc::UnboundedSender<Msg>,
    batcher: Mutex<Option<JoinHandle<()>>>,
}

struct Inner {
    id: u64,
    /// Session shards (groups `1..=shards`); 0 for a cluster created before shards.
    shards: u32,
    /// Group `g` at index `g`.
    groups: Vec<Group>,
    channels: Channels,
    storage: Storage,
    applied: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Applied>>>,
    closing: AtomicBool,
    /// Nodes down for a while (voters are replaced) and down at all (they lead nothing), as the
    /// node's liveness tracking last said (see [`Durable::set_liveness`]).
    liveness: std::sync::Mutex<(BTreeSet<u64>, BTreeSet<u64>)>,
    reconcilers: std::sync::Mutex<Vec<JoinHandle<()>>>,
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
    /// Opens the data directory, starts Raft for the meta group and every session shard,
    /// initialises a one-member cluster on an empty directory, and returns once every group
    /// has a leader and has applied its whole local log, so that
    /// [`sessions`](Self::sessions) and [`retained`](Self::retained) see recovered state.
    pub async fn open(cfg: DurableConfig) -> Result<Durable, ClusterError> {
        Self::open_with(cfg, raft_config()?).await
    }

    async fn open_with(cfg: DurableConfig, config: Config) -> Result<Durable, ClusterError> {
        let config = Arc::new(config);
        let storage = Storage::open(&cfg.data_dir)?;
        let (applied_tx, applied_rx) = mpsc::unbounded_channel();
        let channels = Channels::new(cfg.secret.clone(), cfg.tls.clone());
        let max_batch = cfg.max_batch.clamp(1, MAX_COMMANDS_PER_ENTRY);
        let start = |g: u64| {
            start_group(
                g,
                &cfg,
                &config,
                &storage,
                &channels,
                applied_tx.clone(),
                max_batch,
            )
        };
        let meta = start(META).await?;
        let initialized = meta.raft.is_initialized().await?;
        let forming = !initialized && cfg.join.is_empty();
        let me = || {
            BTreeMap::from([(
                cfg.node_id,
                BasicNode {
                    addr: cfg.advertise_addr.clone(),
                },
            )])
        };
        let offered = if !initialized && !cfg.join.is_empty() {
            Some(join(&cfg, &channels).await?)
        } else {
            if forming {
                initialize(&meta.raft, me()).await?;
            }
            None
        };
        wait_ready(&meta).await?;
        // The shard count is a setting of the meta group, written once by the node that creates
        // the cluster: every member, and every restart, reads the same number from its copy. A
        // cluster from before shards has none: 0, the meta group holds everything. A joining
        // node may not have applied the setting yet when its meta group first looks ready (the
        // metrics can run ahead of the log it receives): it waits for it when the seed named
        // a shard count.
        // A member that does not find it asks the meta leader for everything committed first
        // (a node that stopped during its first start may have a vote but not the log yet):
        // only then does a missing setting mean a cluster from before shards.
        if !forming && meta.sm.entry(Space::Setting, "", SHARDS_SETTING)?.is_none() {
            let deadline = tokio::time::Instant::now() + OPEN_TIMEOUT;
            loop {
                match barrier_once(&meta.raft, cfg.node_id, &channels, META).await {
                    Ok(()) => break,
                    Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let shards = match meta.sm.entry(Space::Setting, "", SHARDS_SETTING)? {
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
                .filter(|n| *n <= MAX_SHARDS)
                .ok_or_else(|| ClusterError::Fatal("the shard count setting is corrupt".into()))?,
            None if forming => {
                let cmd = Command::PutEntry {
                    space: Space::Setting,
                    tenant: String::new(),
                    name: SHARDS_SETTING.into(),
                    value: cfg.shards.min(MAX_SHARDS).to_string().into_bytes(),
                    create_only: true,
                };
                let (tx, rx) = oneshot::channel();
                meta.tx
                    .send(Msg::Propose(cmd, Some(tx)))
                    .map_err(|_| ClusterError::ShuttingDown)?;
                rx.await.map_err(|_| ClusterError::ShuttingDown)??;
                cfg.shards.min(MAX_SHARDS)
            }
            None => 0,
        };
        if let Some(o) = offered.filter(|o| *o != shards) {
            tracing::warn!(
                offered = o,
                shards,
                "the seed named another shard count; using the cluster's setting"
            );
        }
        // A shard is initialised by the node that creates the cluster, also when it stopped
        // between writing the setting and initialising its shards (it is still the only
        // member then); everywhere else a shard's leader adds the node.
        let alone = meta
            .raft
            .metrics()
            .borrow()
            .membership_config
            .nodes()
            .all(|(n, _)| *n == cfg.node_id);
        let mut groups = vec![meta];
        for g in 1..=u64::from(shards) {
            let group = start(g).await?;
            if alone && !group.raft.is_initialized().await? {
                initialize(&group.raft, me()).await?;
            }
            groups.push(group);
        }

        for g in &groups[1..] {
            wait_ready(g).await?;
        }
        if offered.is_some() {
            // A joining node is ready once every shard has as many voters as the cluster can
            // give it (the shard leaders promote the new member): until then a shard that had
            // two voters would stop at the next failure, and the node would join a cluster
            // that tolerates none.
            wait_full_voters(&groups, &cfg).await;
        }
        let inner = Arc::new(Inner {
            id: cfg.node_id,
            shards,
            groups,
            channels,
            storage,
            applied: std::sync::Mutex::new(Some(applied_rx)),
            closing: AtomicBool::new(false),
            liveness: Default::default(),
            reconcilers: Default::default(),
        });
        let tasks = (1..=u64::from(shards))
            .map(|g| tokio::spawn(reconcile_loop(Arc::downgrade(&inner), g)))
            .collect();
        *inner.reconcilers.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        Ok(Durable { inner })
    }

    /// The number of session shards (groups `1..=shards`; 0: the meta group holds everything).
    pub fn shards(&self) -> u32 {
        self.inner.shards
    }

    /// The group holding a device's records.
    pub fn group_of(&self, key: &fleetmq_storage::SessionKey) -> u64 {
        shard::group_of(key, self.inner.shards)
    }

    fn group(&self, g: u64) -> &Group {
        // Group ids come from `shard::route` over this node's own shard count.
        &self.inner.groups[g as usize]
    }

    /// Proposes one command; resolves once it is committed (flushed) and applied.
    /// Commands are applied in the order their `propose`/`propose_nowait` calls happened.
    pub async fn propose(&self, cmd: Command) -> Result<Response, ClusterError> {
        let routed = self.route(cmd)?;
        // The usual case, answered without building a `Progress` (an allocation per write).
        if let shard::Routed::One(g, cmd) = routed {
            return self.propose_in(g, cmd)?.await.map(|(r, _)| r);
        }
        self.propose_routed(routed).await.map(|(r, _)| r)
    }

    /// Proposes a single-group command now (it is queued before this returns, so commands
    /// proposed one after another are applied in that order) and returns the wait for it.
    pub fn propose_sent(
        &self,
        cmd: Command,
    ) -> Result<
        impl std::future::Future<Output = Result<Response, ClusterError>> + Send + 'static,
        ClusterError,
    > {
        match self.route(cmd)? {
            shard::Routed::One(g, cmd) => {
                let f = self.propose_in(g, cmd)?;
                Ok(async move { f.await.map(|(r, _)| r) })
            }
            _ => Err(ClusterError::InvalidCommand(
                "not a single-group command".into(),
            )),
        }
    }

    /// Validates `cmd` and decides its group(s).
    fn route(&self, cmd: Command) -> Result<shard::Routed, ClusterError> {
        fleetmq_storage::validate(&cmd).map_err(|e| ClusterError::InvalidCommand(e.to_string()))?;
        if self.inner.closing.load(Ordering::Acquire) {
            return Err(ClusterError::ShuttingDown);
        }
        Ok(shard::route(cmd, self.inner.shards))
    }

    /// Like [`propose`](Self::propose), also returning where it was committed (to make other
    /// nodes wait until they have applied it).
    ///
    /// A publish or enqueue whose targets live in several shards is split into one command
    /// per shard, committed concurrently; if one fails the whole call fails, and the client's
    /// retransmission (QoS 1) may queue the message again where it had succeeded. A publish
    /// that records the publisher's inbound QoS 2 id goes through the publisher's shard's
    /// outbox instead ([`propose_outbox`](Self::propose_outbox)): exactly once everywhere.
    pub async fn propose_indexed(
        &self,
        cmd: Command,
    ) -> Result<(Response, Progress), ClusterError> {
        let routed = self.route(cmd)?;
        self.propose_routed(routed).await
    }

    async fn propose_routed(
        &self,
        routed: shard::Routed,
    ) -> Result<(Response, Progress), ClusterError> {
        match routed {
            shard::Routed::One(g, cmd) => {
                let (r, i) = self.propose_in(g, cmd)?.await?;
                Ok((r, Progress::at(g, i)))
            }
            shard::Routed::Outbox {
                home,
                cmd,
                local,
                foreign,
                targets,
            } => {
                self.propose_outbox(home, cmd, local, foreign, targets)
                    .await
            }
            shard::Routed::Many { parts, targets } => {
                let mut waits = Vec::with_capacity(parts.len());
                let mut placed = Vec::with_capacity(parts.len());
                for p in parts {
                    waits.push(self.propose_in(p.group, p.cmd)?);
                    placed.push((p.group, p.positions));
                }
                let answers = futures_join(waits).await?;
                let mut progress = Progress::default();
                for ((g, _), (_, i)) in placed.iter().zip(&answers) {
                    progress.raise(*g, *i);
                }
                let merged = shard::merge(
                    targets,
                    placed
                        .iter()
                        .zip(answers)
                        .map(|((_, positions), (r, _))| (positions.as_slice(), r))
                        .collect(),
                );
                Ok((merged, progress))
            }
        }
    }

    /// A `PublishOutbox`: committed in the publisher's shard first (a duplicate stops
    /// there), then queued in the other shards (`EnqueueOnce`, idempotent), then marked done.
    /// Once the first commit is in, the message is the cluster's: if a later step fails, the
    /// home shard's leader finishes it (`sweep_outbox`), so the answer is still success. Only
    /// the home shard's targets get their seqs in the answer (the proposer delivers those it
    /// holds); the others' nodes deliver them as they apply their shard's `EnqueueOnce`.
    async fn propose_outbox(
        &self,
        home: u64,
        cmd: Command,
        local: Vec<usize>,
        foreign: Vec<shard::Part>,
        targets: usize,
    ) -> Result<(Response, Progress), ClusterError> {
        let (r, i) = self.propose_in(home, cmd)?.await?;
        let mut progress = Progress::at(home, i);
        let (home_seqs, id) = match r {
            Response::Outboxed { seqs, id } => (seqs, id),
            other => return Ok((other, progress)),
        };
        let mut seqs = vec![NO_SESSION_SEQ; targets];
        for (p, s) in local.iter().zip(home_seqs) {
            if let Some(slot) = seqs.get_mut(*p) {
                *slot = s;
            }
        }
        if id == 0 {
            return Ok((Response::Published { seqs }, progress));
        }
        let mut waits = Vec::with_capacity(foreign.len());
        let mut groups = Vec::with_capacity(foreign.len());
        for p in foreign {
            let mut cmd = p.cmd;
            if let Command::EnqueueOnce { origin, .. } = &mut cmd {
                *origin = (home, id);
            }
            waits.push(self.propose_in(p.group, cmd)?);
            groups.push(p.group);
        }
        // The other shards' targets stay `NO_SESSION_SEQ` in the answer: the node holding each
        // of those sessions delivers it when it applies the `EnqueueOnce` (this one too).
        match futures_join(waits).await {
            Ok(answers) => {
                for (g, (_, i)) in groups.iter().zip(answers) {
                    progress.raise(*g, i);
                }
                self.propose_to_nowait(home, Command::OutboxDone { id });
            }
            Err(e) => {
                tracing::warn!(group = home, id, error = %e, "queueing in other shards failed; the shard's leader finishes it");
            }
        }
        Ok((Response::Published { seqs }, progress))
    }

    /// Proposes to one group without waiting (commands that name their group themselves).
    fn propose_to_nowait(&self, g: u64, cmd: Command) {
        if self.group(g).tx.send(Msg::Propose(cmd, None)).is_err() {
            tracing::debug!("proposal after shutdown dropped");
        }
    }

    /// Queues `cmd` on group `g`'s batcher; the future resolves with its answer.
    fn propose_in(
        &self,
        g: u64,
        cmd: Command,
    ) -> Result<
        impl std::future::Future<Output = Result<(Response, u64), ClusterError>>,
        ClusterError,
    > {
        let (tx, rx) = oneshot::channel();
        self.group(g)
            .tx
            .send(Msg::Propose(cmd, Some(tx)))
            .map_err(|_| ClusterError::ShuttingDown)?;
        Ok(async move { rx.await.map_err(|_| ClusterError::ShuttingDown)? })
    }

    /// Proposes one command without waiting; same ordering as [`propose`](Self::propose).
    /// Failures are only logged, so use it where a lost command is harmless (e.g. acks).
    pub fn propose_nowait(&self, cmd: Command) {
        if let Err(e) = fleetmq_storage::validate(&cmd) {
            tracing::warn!(error = %e, "dropping invalid command");
            return;
        }
        if self.inner.closing.load(Ordering::Acquire) {
            tracing::debug!("proposal after shutdown dropped");
            return;
        }
        let parts = match shard::route(cmd, self.inner.shards) {
            shard::Routed::One(g, cmd) => vec![(g, cmd)],
            // The rest is finished by the home shard's leader from its outbox.
            shard::Routed::Outbox { home, cmd, .. } => vec![(home, cmd)],
            shard::Routed::Many { parts, .. } => {
                parts.into_iter().map(|p| (p.group, p.cmd)).collect()
            }
        };
        for (g, cmd) in parts {
            if self.group(g).tx.send(Msg::Propose(cmd, None)).is_err() {
                tracing::debug!("proposal after shutdown dropped");
            }
        }
    }

    /// All persistent sessions as last applied (call after `open` for recovery). Message ids
    /// carry their group in the top byte, so ids of different shards never collide.
    pub fn sessions(&self) -> Result<Vec<RecoveredSession>, ClusterError> {
        let mut out = Vec::new();
        for g in &self.inner.groups {
            let mut s = g.sm.sessions()?;
            for rs in &mut s {
                tag_msg_ids(g.id, rs);
            }
            out.extend(s);
        }
        Ok(out)
    }

    /// All retained messages as `(tenant, topic, message)`.
    pub fn retained(&self) -> Result<Vec<(String, String, StoredMessage)>, ClusterError> {
        Ok(self.group(META).sm.retained()?)
    }

    /// One directory entry as last applied here.
    pub fn entry(
        &self,
        space: Space,
        tenant: &str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, ClusterError> {
        let g = match space {
            Space::Holder => self.group_of(&fleetmq_storage::SessionKey::new(tenant, name)),
            _ => META,
        };
        Ok(self.group(g).sm.entry(space, tenant, name)?)
    }

    /// One persistent session as last applied here (to move it to this node).
    pub fn session(
        &self,
        key: &fleetmq_storage::SessionKey,
    ) -> Result<Option<RecoveredSession>, ClusterError> {
        let g = self.group_of(key);
        let mut s = self.group(g).sm.session(key)?;
        if let Some(rs) = &mut s {
            tag_msg_ids(g, rs);
        }
        Ok(s)
    }

    /// Every directory entry of a space as last applied: `(space, tenant, name, value)`.
    pub fn entries(&self, space: Space) -> Result<Vec<Entry>, ClusterError> {
        if space != Space::Holder {
            return Ok(self.group(META).sm.entries(space)?);
        }
        let mut out = Vec::new();
        for g in &self.inner.groups {
            out.extend(g.sm.entries(space)?);
        }
        Ok(out)
    }

    /// The groups that hold device data: the session shards, or group 0 without shards.
    pub fn device_groups(&self) -> Vec<u64> {
        if self.inner.shards == 0 {
            vec![META]
        } else {
            (1..=u64::from(self.inner.shards)).collect()
        }
    }

    /// The state machine of a group holding device data, for local reads (`None`: no such
    /// group here, e.g. a record id from another cluster).
    pub fn device_store(&self, group: u64) -> Option<fleetmq_storage::StateMachineStore> {
        let holds = if self.inner.shards == 0 {
            group == META
        } else {
            (1..=u64::from(self.inner.shards)).contains(&group)
        };
        if !holds {
            return None;
        }
        Some(self.group(group).sm.clone())
    }

    /// Waits until this node has applied what `group`'s leader had committed (REST reads of
    /// device data see every acknowledged write, whichever node took it).
    pub async fn read_barrier_group(&self, group: u64) -> Result<(), ClusterError> {
        self.read_barrier_of(group).await
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

    /// The members of the cluster (voters and learners of the meta group) as
    /// `(id, gRPC address)`, by id.
    pub fn members(&self) -> Vec<(u64, String)> {
        // Borrowed, not cloned: the metrics hold the replication map too.
        let rx = self.group(META).raft.metrics();
        let m = rx.borrow();
        m.membership_config
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect()
    }

    /// How many members the cluster has (cheap: on the publish path).
    pub fn member_count(&self) -> usize {
        self.group(META)
            .raft
            .metrics()
            .borrow()
            .membership_config
            .nodes()
            .count()
    }

    /// The voters of the meta group as this node last heard.
    pub fn voters(&self) -> BTreeSet<u64> {
        voters_of(&self.group(META).raft)
    }

    /// The leader of the meta group as this node last heard.
    pub fn leader(&self) -> Option<u64> {
        self.group(META).raft.metrics().borrow().current_leader
    }

    /// Every group's voters and leader as this node last heard: `(group, voters, leader)`.
    pub fn layout(&self) -> Vec<(u64, BTreeSet<u64>, Option<u64>)> {
        self.inner
            .groups
            .iter()
            .map(|g| {
                let rx = g.raft.metrics();
                let m = rx.borrow();
                (
                    g.id,
                    m.membership_config.membership().voter_ids().collect(),
                    m.current_leader,
                )
            })
            .collect()
    }

    /// Tells the shard reconcilers which nodes are down for long (`dead`: their voter seats go
    /// to others) and down at all (`down`: they are not given leaderships).
    pub fn set_liveness(&self, dead: BTreeSet<u64>, down: BTreeSet<u64>) {
        *self
            .inner
            .liveness
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = (dead, down);
    }

    /// Hands every shard this node leads to another live voter of it (a node about to leave
    /// does this first, so its shards do not stop for an election: ~0.4 s each instead of
    /// ~0.5-0.9 s, all at once). Best effort: a shard whose hand-over fails elects a leader
    /// the usual way once this node is gone.
    pub async fn hand_over_leaderships(&self) {
        let down = {
            let l = self
                .inner
                .liveness
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            l.0.union(&l.1).copied().collect::<BTreeSet<u64>>()
        };
        let moves = self.inner.groups[1..].iter().filter_map(|g| {
            let (target, addr) = {
                let rx = g.raft.metrics();
                let m = rx.borrow();
                if m.current_leader != Some(self.inner.id) {
                    return None;
                }
                let mem = m.membership_config.membership();
                let matched = |n: &u64| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(n).copied().flatten())
                        .map(|l| l.index)
                        .unwrap_or(0)
                };
                let t = mem
                    .voter_ids()
                    .filter(|n| *n != self.inner.id && !down.contains(n))
                    .max_by_key(|n| (matched(n), std::cmp::Reverse(*n)))?;
                let addr = mem.get_node(&t)?.addr.clone();
                (t, addr)
            };
            let inner = self.inner.clone();
            Some(async move {
                let raft = inner.groups[g.id as usize].raft.clone();
                if let Err(e) = transfer_leader(&inner, &raft, g.id, target, &addr).await {
                    tracing::warn!(group = g.id, to = target, error = %e, "handing a shard over failed");
                }
            })
        });
        futures_util::future::join_all(moves).await;
    }

    /// Starts an election for `group` on this node at once (the leader asked: it has stopped
    /// its heartbeats so that this node's vote requests are not refused for its lease).
    pub async fn elect(&self, group: u64) -> Result<(), ClusterError> {
        let g = self
            .inner
            .groups
            .get(group as usize)
            .ok_or_else(|| ClusterError::Raft(format!("no group {group}")))?;
        if !voters_of(&g.raft).contains(&self.inner.id) {
            return Err(ClusterError::Raft(format!(
                "node {} is not a voter of group {group}",
                self.inner.id
            )));
        }
        // The leader's lease on the other voters runs out 300 ms after its last heartbeat;
        // asking every 25 ms from then on makes this node the first candidate they accept.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(900);
        while tokio::time::Instant::now() < deadline {
            if g.raft.metrics().borrow().current_leader == Some(self.inner.id) {
                return Ok(());
            }
            g.raft.trigger().elect().await?;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(())
    }

    /// The Raft metrics, when this node leads the meta group; `NotLeader` (naming the
    /// leader) otherwise: membership changes are the leader's.
    fn leader_metrics(&self) -> Result<RaftMetrics<u64, BasicNode>, ClusterError> {
        let m = self.group(META).raft.metrics().borrow().clone();
        if m.current_leader != Some(self.inner.id) {
            return Err(ClusterError::NotLeader {
                leader_id: m.current_leader,
                leader_addr: leader_addr(&m),
            });
        }
        Ok(m)
    }

    /// Adds a node to the meta group as a learner (returning once it has caught up), then as a
    /// voter while the group has fewer than [`MAX_VOTERS`]. Only the leader can; others answer
    /// `NotLeader`. The shards follow the meta group's membership on their own.
    pub async fn add_node(&self, id: u64, addr: String) -> Result<(), ClusterError> {
        let raft = &self.group(META).raft;
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
        let voters = voters_of(raft);
        if voters.len() < MAX_VOTERS && !voters.contains(&id) {
            let mut next = voters;
            next.insert(id);
            raft.change_membership(next, false)
                .await
                .map_err(membership_err)?;
        }
        Ok(())
    }

    /// Removes a node from the meta group (it leaves the cluster; the shards follow). A
    /// learner takes the place of a leaving voter while there are fewer than [`MAX_VOTERS`].
    /// Only the leader can; others answer `NotLeader`. Removing a non-member is a no-op.
    pub async fn remove_node(&self, id: u64) -> Result<(), ClusterError> {
        let raft = &self.group(META).raft;
        let m = self.leader_metrics()?;
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
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
                openraft::ChangeMembers::RemoveNodes(BTreeSet::from([id])),
                false,
            )
            .await
            .map_err(membership_err)?;
        }
        Ok(())
    }

    /// On the meta group's leader: puts live learners in the places of voters in `dead` and
    /// promotes learners while there are fewer than [`MAX_VOTERS`] voters (see
    /// [`crate::rebalance`]). Replaced voters stay as learners. True when the membership
    /// changed; elsewhere a no-op.
    pub async fn rebalance_voters(&self, dead: &BTreeSet<u64>) -> Result<bool, ClusterError> {
        let raft = &self.group(META).raft;
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
            let voters: BTreeSet<u64> = membership.voter_ids().collect();
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

    /// Waits until this node has applied everything the leaders had committed when this was
    /// called, in every group, so that reads of the local state machines see every
    /// acknowledged write (used before a session moves here from another node).
    pub async fn read_barrier(&self) -> Result<(), ClusterError> {
        futures_join(
            self.inner
                .groups
                .iter()
                .map(|g| self.read_barrier_of(g.id))
                .collect(),
        )
        .await
        .map(|_| ())
    }

    /// [`read_barrier`](Self::read_barrier) for what one device's session needs: the meta
    /// group and the device's shard (a shard without a leader elsewhere does not hold it up).
    pub async fn read_barrier_for(
        &self,
        key: &fleetmq_storage::SessionKey,
    ) -> Result<(), ClusterError> {
        let g = self.group_of(key);
        if g == META {
            return self.read_barrier_of(META).await;
        }
        futures_util::future::try_join(self.read_barrier_of(META), self.read_barrier_of(g))
            .await
            .map(|_| ())
    }

    async fn read_barrier_of(&self, g: u64) -> Result<(), ClusterError> {
        // Retried through a failover (an election takes a few hundred milliseconds).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match self.read_barrier_once(g).await {
                Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    async fn read_barrier_once(&self, g: u64) -> Result<(), ClusterError> {
        barrier_once(&self.group(g).raft, self.inner.id, &self.inner.channels, g).await
    }

    /// The index of the last entry applied here in every group.
    pub fn applied(&self) -> Progress {
        Progress(
            self.inner
                .groups
                .iter()
                .map(|g| applied_of(&g.raft))
                .collect(),
        )
    }

    /// The index of the last entry applied here in the group holding `key`'s records.
    pub fn applied_index_of(&self, key: &fleetmq_storage::SessionKey) -> u64 {
        applied_of(&self.group(self.group_of(key)).raft)
    }

    /// Waits (at most `timeout`) until this node has applied `progress` in every group it
    /// has; false on timeout.
    pub async fn wait_applied(&self, progress: &Progress, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for g in &self.inner.groups {
            let index = progress.get(g.id);
            if index == 0 || applied_of(&g.raft) >= index {
                continue;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if g.raft
                .wait(Some(left))
                .applied_index_at_least(Some(index), "applied index")
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// Current Raft metrics of the meta group (leadership, log and applied index).
    pub fn raft_metrics(&self) -> RaftMetrics<u64, BasicNode> {
        self.group(META).raft.metrics().borrow().clone()
    }

    /// Current Raft metrics of every group, by group id.
    pub fn group_metrics(&self) -> Vec<(u64, RaftMetrics<u64, BasicNode>)> {
        self.inner
            .groups
            .iter()
            .map(|g| (g.id, g.raft.metrics().borrow().clone()))
            .collect()
    }

    /// Builds a snapshot of every group now (and purges the logs behind them), instead of
    /// waiting for the snapshot policy; for operations and tests. Returns before they are done.
    pub async fn trigger_snapshot(&self) -> Result<(), ClusterError> {
        for g in &self.inner.groups {
            g.raft.trigger().snapshot().await?;
        }
        Ok(())
    }

    /// Answers every proposal queued so far, refuses new ones, stops Raft and flushes sled.
    pub async fn shutdown(&self) -> Result<(), ClusterError> {
        self.inner.closing.store(true, Ordering::Release);
        for t in self
            .inner
            .reconcilers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        for g in &self.inner.groups {
            let Some(batcher) = g.batcher.lock().await.take() else {
                continue; // already shut down
            };
            let (ack_tx, ack_rx) = oneshot::channel();
            if g.tx.send(Msg::Shutdown(ack_tx)).is_ok() {
                let _ = ack_rx.await;
            }
            if let Err(e) = batcher.await {
                tracing::error!(error = %e, group = g.id, "raft batcher task failed");
            }
        }
        for g in &self.inner.groups {
            g.raft
                .shutdown()
                .await
                .map_err(|e| ClusterError::Fatal(e.to_string()))?;
            // Staged state-machine writes go to sled before the final flush, so the next start
            // does not have to re-apply them from the log (it could, but this is faster).
            g.sm.write_back()?;
        }
        self.inner.storage.flush().await?;
        Ok(())
    }
}

/// Starts Raft and the batcher of one group (its server registration included).
async fn start_group(
    g: u64,
    cfg: &DurableConfig,
    config: &Arc<Config>,
    storage: &Storage,
    channels: &Channels,
    applied_tx: mpsc::UnboundedSender<Applied>,
    max_batch: usize,
) -> Result<Group, ClusterError> {
    let log = LogAdapter::new(storage.log_store(g)?);
    let sm = storage.state_machine(g)?;
    let sm_adapter = SmAdapter::new(sm.clone(), storage.clone())
        .map_err(|e| ClusterError::Fatal(e.to_string()))?
        .with_observer(g, applied_tx);
    let network = GrpcNetwork::new(g, channels.clone());
    let raft = Raft::new(cfg.node_id, config.clone(), network, log, sm_adapter).await?;
    if let Some(server) = &cfg.server {
        server.add_group(g, raft.clone());
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let route = Route {
        self_id: cfg.node_id,
        group: g,
        channels: channels.clone(),
    };
    let batcher = tokio::spawn(proposer::run(raft.clone(), route, rx, max_batch));
    Ok(Group {
        id: g,
        raft,
        sm,
        tx,
        batcher: Mutex::new(Some(batcher)),
    })
}

/// One read barrier on group `g`: a no-op entry through its leader, then waiting until this
/// node has applied it.
async fn barrier_once(
    raft: &Raft,
    self_id: u64,
    channels: &Channels,
    g: u64,
) -> Result<(), ClusterError> {
    let empty = Batch(Arc::new(Vec::new()));
    let remote_leader = {
        let rx = raft.metrics();
        let m = rx.borrow();
        match m.current_leader {
            Some(l) if l == self_id => None,
            Some(_) => leader_addr(&m),
            None => {
                return Err(ClusterError::Unavailable(format!(
                    "group {g}: no leader known"
                )));
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
        Some(addr) => match forward_write(channels, &addr, g, &empty, OPEN_TIMEOUT).await {
            Ok(Ok(r)) => r.log_id.index,
            Ok(Err(RaftError::APIError(e))) => return Err(ClusterError::from(&e)),
            Ok(Err(RaftError::Fatal(f))) => return Err(ClusterError::Raft(f.to_string())),
            Err(s) => return Err(ClusterError::Unavailable(s.message().to_string())),
        },
    };
    raft.wait(Some(OPEN_TIMEOUT))
        .applied_index_at_least(Some(index), "read barrier")
        .await
        .map_err(|e| ClusterError::Timeout(e.to_string()))?;
    Ok(())
}

/// Waits (at most `OPEN_TIMEOUT`, then only logs) until every shard has min(3, members)
/// voters, as this node's replicas see them.
async fn wait_full_voters(groups: &[Group], cfg: &DurableConfig) {
    let deadline = tokio::time::Instant::now() + OPEN_TIMEOUT;
    loop {
        let members = groups[META as usize]
            .raft
            .metrics()
            .borrow()
            .membership_config
            .nodes()
            .count();
        let want = members.min(MAX_VOTERS);
        let short: Vec<u64> = groups[1..]
            .iter()
            .filter(|g| voters_of(&g.raft).len() < want)
            .map(|g| g.id)
            .collect();
        if short.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                node = cfg.node_id,
                ?short,
                want,
                "shards still short of voters; going on"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the group has a known leader (this node, once elected, or the one that added
/// it) and has applied its whole local log, so that recovery sees the state as of this start.
/// A joining node's shards get their leader once the shard leaders have added it.
async fn wait_ready(g: &Group) -> Result<(), ClusterError> {
    g.raft
        .wait(Some(OPEN_TIMEOUT))
        .metrics(
            |m| m.current_leader.is_some() && m.last_applied.map(|l| l.index) >= m.last_log_index,
            "a known leader and the whole local log applied",
        )
        .await
        .map_err(|e| ClusterError::Timeout(format!("group {}: {e}", g.id)))?;
    Ok(())
}

async fn initialize(raft: &Raft, members: BTreeMap<u64, BasicNode>) -> Result<(), ClusterError> {
    match raft.initialize(members).await {
        Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        Err(RaftError::Fatal(f)) => Err(f.into()),
        Err(RaftError::APIError(e)) => Err(ClusterError::Raft(e.to_string())),
    }
}

/// Message ids are `(log index << 16) | position` within one group; the top byte is free and
/// takes the group, so recovered sessions of different shards never share an id.
fn tag_msg_ids(g: u64, rs: &mut RecoveredSession) {
    for (_, entry, _) in &mut rs.queue {
        entry.msg_id = (entry.msg_id & ((1 << 56) - 1)) | (g << 56);
    }
}

fn voters_of(raft: &Raft) -> BTreeSet<u64> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

fn applied_of(raft: &Raft) -> u64 {
    raft.metrics()
        .borrow()
        .last_applied
        .map(|l| l.index)
        .unwrap_or(0)
}

/// Awaits all together, answers in order, failing with the first error.
async fn futures_join<F, T>(futs: Vec<F>) -> Result<Vec<T>, ClusterError>
where
    F: std::future::Future<Output = Result<T, ClusterError>>,
{
    futures_util::future::try_join_all(futs).await
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
/// Any member will do: one that is not the leader passes the request on. Returns the
/// cluster's shard count.
async fn join(cfg: &DurableConfig, channels: &Channels) -> Result<u32, ClusterError> {
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
                    tracing::info!(%seed, members = r.members.len(), leader = r.leader_id, shards = r.shards, "joined the cluster");
                    return Ok(r.shards);
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

/// How often each shard's leader compares its group with the plan.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// How long adding a member to a shard may take to catch up before the round gives up (the
/// next round goes on where it stopped: the learner is in the membership by then).
const ADD_LEARNER_TIMEOUT: Duration = Duration::from_secs(10);
/// A shard's leadership moves at most this often: each move stops its writes for about
/// 0.4 s (the old leader's lease must run out before the new one can be elected).
const TRANSFER_COOLDOWN: Duration = Duration::from_secs(5);
/// How far behind the leader's log a voter may be and still be handed the leadership.
const TRANSFER_MAX_LAG: u64 = 64;

/// While this node leads shard `g`: makes the shard's membership follow the meta group's
/// (every member replicates every shard), its voters and its leader follow the placement
/// plan. One change per round, so a failed step is simply retried next round.
async fn reconcile_loop(inner: std::sync::Weak<Inner>, g: u64) {
    let mut last_transfer = Quiet::default();
    let mut sweep = Sweep::default();
    for round in 0u64.. {
        tokio::time::sleep(RECONCILE_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.closing.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = reconcile(&inner, g, &mut last_transfer).await {
            tracing::debug!(group = g, error = %e, "shard membership step failed; retrying");
        }
        if round % SWEEP_EVERY_ROUNDS == 0 {
            let d = Durable { inner };
            if let Err(e) = d.sweep_outbox(g, &mut sweep).await {
                tracing::warn!(group = g, error = %e, "finishing outbox entries failed; retrying");
            }
        }
    }
}

/// When this shard last wrote, as its leader saw, and when its leadership last moved.
#[derive(Default)]
struct Quiet {
    last_log: u64,
    since: Option<tokio::time::Instant>,
    transferred: Option<tokio::time::Instant>,
}

impl Quiet {
    /// Notes the leader's last log index; true once it has not moved for `QUIET_FOR`.
    fn is_quiet(&mut self, last_log: u64) -> bool {
        let now = tokio::time::Instant::now();
        if self.since.is_none() || self.last_log != last_log {
            self.last_log = last_log;
            self.since = Some(now);
        }
        self.since
            .is_some_and(|t| now.duration_since(t) >= QUIET_FOR)
    }
}

/// A leadership moves only after the shard has had no write for this long: the move stops
/// its writes for about half a second, and a write acknowledged in that window might reach
/// another node's state later than that node's routes (see `docs/architecture.md`).
const QUIET_FOR: Duration = Duration::from_secs(1);

/// The outbox sweeper runs every this many reconcile rounds (2 s).
const SWEEP_EVERY_ROUNDS: u64 = 4;
/// Seen-origin records in the other shards are pruned at most this often.
const FORGET_EVERY: Duration = Duration::from_secs(10);
/// An origin is forgotten only this long after it was seen done: longer than a proposer can
/// still be retrying its `EnqueueOnce` (failover window, forward and commit timeouts).
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// What the outbox sweeper of one shard remembers between rounds.
#[derive(Default)]
struct Sweep {
    /// Entries pending at the last round: still pending now means their proposer is not
    /// finishing them (it died, or a shard refused), so this leader does.
    pending: BTreeSet<u64>,
    /// The last `below` sent to the other shards, and when.
    forgot: Option<(u64, tokio::time::Instant)>,
    /// Past `below` values with when they were seen: only one older than `FORGET_AFTER` is
    /// sent, so that no `EnqueueOnce` of an origin below it can still be on its way.
    history: std::collections::VecDeque<(tokio::time::Instant, u64)>,
}

impl Durable {
    /// On the leader of shard `g`: finishes outbox entries that stayed pending for a whole
    /// round (queues them in their shards, idempotently, then marks them done), and now and
    /// then tells the other shards which of this shard's origins they may forget.
    async fn sweep_outbox(&self, g: u64, sweep: &mut Sweep) -> Result<(), ClusterError> {
        let group = self.group(g);
        if group.raft.metrics().borrow().current_leader != Some(self.inner.id) {
            sweep.pending.clear();
            sweep.history.clear();
            sweep.forgot = None;
            return Ok(());
        }
        let applied = applied_of(&group.raft);
        let pending = group.sm.outbox()?;
        let now: BTreeSet<u64> = pending.iter().map(|(id, _, _)| *id).collect();
        for (id, message, targets) in pending {
            if !sweep.pending.contains(&id) {
                continue; // its proposer gets a round to finish it
            }
            // The node holding each session learns of it by applying, as for any part.
            let mut by_group: BTreeMap<u64, Vec<fleetmq_storage::Target>> = BTreeMap::new();
            for t in targets {
                by_group.entry(self.group_of(&t.key)).or_default().push(t);
            }
            let mut waits = Vec::with_capacity(by_group.len());
            for (tg, targets) in by_group {
                let cmd = Command::EnqueueOnce {
                    origin: (g, id),
                    message: message.clone(),
                    targets,
                };
                waits.push(self.propose_in(tg, cmd)?);
            }
            futures_join(waits).await?;
            self.propose_in(g, Command::OutboxDone { id })?.await?;
            metrics::counter!("fleetmq_cluster_outbox_finished_total").increment(1);
            tracing::info!(group = g, id, "finished an outbox entry its proposer left");
        }
        sweep.pending = now;
        // Every entry below the oldest pending one (or, with none, below anything not yet
        // applied here) is done and never sent again.
        let now_below = match sweep.pending.first() {
            Some(min) => *min,
            None => (applied + 1) << 16,
        };
        let now_at = tokio::time::Instant::now();
        sweep.history.push_back((now_at, now_below));
        // The newest value old enough to act on.
        let mut below = None;
        while let Some((at, b)) = sweep.history.front().copied() {
            if now_at.duration_since(at) < FORGET_AFTER {
                break;
            }
            below = Some(b);
            sweep.history.pop_front();
        }
        let Some(below) = below else {
            return Ok(());
        };
        let due = match sweep.forgot {
            None => true,
            Some((last, at)) => below > last && at.elapsed() >= FORGET_EVERY,
        };
        if due {
            for other in 1..=u64::from(self.inner.shards) {
                if other != g {
                    self.propose_to_nowait(other, Command::ForgetOrigins { group: g, below });
                }
            }
            sweep.forgot = Some((below, tokio::time::Instant::now()));
        }
        Ok(())
    }
}

async fn reconcile(inner: &Inner, g: u64, quiet: &mut Quiet) -> Result<(), ClusterError> {
    let raft = &inner.groups[g as usize].raft;
    let (nodes, voters, last_log, matched) = {
        let rx = raft.metrics();
        let m = rx.borrow();
        if m.current_leader != Some(inner.id) {
            return Ok(());
        }
        let mem = m.membership_config.membership();
        if mem.get_joint_config().len() > 1 {
            return Ok(()); // a change is under way
        }
        let matched: BTreeMap<u64, u64> = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(n, l)| (*n, l.map(|l| l.index).unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        (
            mem.nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect::<BTreeMap<u64, String>>(),
            mem.voter_ids().collect::<BTreeSet<u64>>(),
            m.last_log_index.unwrap_or(0),
            matched,
        )
    };
    let members: BTreeMap<u64, String> = inner.groups[META as usize]
        .raft
        .metrics()
        .borrow()
        .membership_config
        .nodes()
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect();
    if members.is_empty() {
        return Ok(());
    }
    // 1. Every member replicates every shard.
    for (id, addr) in &members {
        if nodes.get(id) != Some(addr) {
            tracing::info!(group = g, node = id, "adding a member to the shard");
            let add = raft.add_learner(*id, BasicNode { addr: addr.clone() }, true);
            tokio::time::timeout(ADD_LEARNER_TIMEOUT, add)
                .await
                .map_err(|_| ClusterError::Timeout(format!("node {id} catching up")))?
                .map_err(membership_err)?;
            return Ok(());
        }
    }
    let (dead, down) = inner
        .liveness
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let member_ids: BTreeSet<u64> = members.keys().copied().collect();
    let current: BTreeMap<u64, BTreeSet<u64>> = inner.groups[1..]
        .iter()
        .map(|gr| (gr.id, voters_of(&gr.raft)))
        .collect();
    // 2. Voters where the plan puts them (every shard leader computes the same plan).
    let plan = placement::plan_shard_voters(&member_ids, &dead, &current, MAX_VOTERS);
    let want = plan.get(&g).cloned().unwrap_or_default();
    // A leader losing its own seat commits the membership without itself and then steps
    // down (openraft does that once the change is committed); the new voters elect a leader.
    // An emulated transfer would not do here: under steady writes the appends keep the
    // followers' lease alive, and it would never succeed.
    if !want.is_empty() && want != voters {
        tracing::info!(group = g, ?voters, ?want, "moving shard voters");
        raft.change_membership(want, true)
            .await
            .map_err(membership_err)?;
        metrics::counter!("fleetmq_cluster_shard_voter_changes_total").increment(1);
        return Ok(());
    }
    // 3. Nodes that left the cluster leave the shard.
    let gone: BTreeSet<u64> = nodes
        .keys()
        .filter(|n| !members.contains_key(n) && !voters.contains(n))
        .copied()
        .collect();
    if !gone.is_empty() {
        raft.change_membership(openraft::ChangeMembers::RemoveNodes(gone), false)
            .await
            .map_err(membership_err)?;
        return Ok(());
    }
    // 4. The leadership where the plan puts it.
    let leaders: BTreeMap<u64, u64> = inner.groups[1..]
        .iter()
        .filter_map(|gr| {
            gr.raft
                .metrics()
                .borrow()
                .current_leader
                .map(|l| (gr.id, l))
        })
        .collect();
    let mut down = down;
    down.extend(dead.iter().copied());
    let target = placement::plan_leaders(&current, &leaders, &down)
        .get(&g)
        .copied();
    let Some(target) = target.filter(|t| *t != inner.id && voters.contains(t)) else {
        return Ok(());
    };
    if !quiet.is_quiet(last_log)
        || quiet
            .transferred
            .is_some_and(|t| t.elapsed() < TRANSFER_COOLDOWN)
        || matched.get(&target).copied().unwrap_or(0) + TRANSFER_MAX_LAG < last_log
    {
        return Ok(());
    }
    let Some(addr) = nodes.get(&target) else {
        return Ok(());
    };
    quiet.transferred = Some(tokio::time::Instant::now());
    tracing::info!(
        group = g,
        to = target,
        "handing the shard's leadership over"
    );
    transfer_leader(inner, raft, g, target, addr).await
}

/// openraft 0.9 has no leadership transfer; this emulates one. The leader stops its
/// heartbeats, so the other voters' leader lease (300 ms) runs out, and asks the target to
/// start an election at once: it becomes candidate before the others' own election timeouts
/// (lease + 150-300 ms) fire. Heartbeats are back on afterwards whatever happened.
async fn transfer_leader(
    inner: &Inner,
    raft: &Raft,
    g: u64,
    target: u64,
    addr: &str,
) -> Result<(), ClusterError> {
    raft.runtime_config().heartbeat(false);
    let asked = async {
        let channel = inner
            .channels
            .get(addr)
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        let mut client = NodeServiceClient::new(channel);
        let req = crate::pb::TransferLeaderRequest {
            group: g,
            to_node_id: target,
        };
        tokio::time::timeout(Duration::from_secs(2), client.transfer_leader(req))
            .await
            .map_err(|_| ClusterError::Timeout("transfer_leader".into()))?
            .map_err(|s| ClusterError::Unavailable(s.message().to_string()))?;
        Ok::<(), ClusterError>(())
    }
    .await;
    let me = inner.id;
    let moved = raft
        .wait(Some(Duration::from_millis(1500)))
        .metrics(|m| m.current_leader != Some(me), "leadership moved")
        .await
        .is_ok();
    raft.runtime_config().heartbeat(true);
    if moved {
        metrics::counter!("fleetmq_cluster_leader_transfers_total").increment(1);
    }
    asked
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
            shards: 0,
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
        d.inner.groups[0]
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

        // The old sled instance may still be releasing its file lock for a moment (its
        // background threads end after the drop; under load that can take a while).
        let mut attempt = 0;
        let d = loop {
            match Durable::open(cfg.clone()).await {
                Ok(d) => break d,
                Err(e) if attempt < 50 => {
                    attempt += 1;
                    eprintln!("reopen attempt {attempt}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
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
