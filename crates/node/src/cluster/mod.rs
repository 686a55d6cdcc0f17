//! This node's part in the cluster, apart from Raft: the route table shared with the other
//! nodes, publish forwarding, the session registry of the devices this node is home for, and
//! liveness of peers.
//!
//! The durable state (directory, sessions, retained messages) is one Raft group replicated to
//! every node (see `fleetmq_cluster::Durable`); this module moves what is *not* durable:
//! - **routes**: each node announces the filters it has subscribers for; an announcement is
//!   acknowledged by every live peer before the SUBACK that caused it is sent;
//! - **forwarding**: a publish is sent, in batches per peer, to the nodes with a matching
//!   route, and a QoS 1/2 publish is acknowledged once those nodes have committed it;
//! - **registry**: the home node of a `(tenant, device)` (rendezvous hash over the live
//!   members) knows which node holds its session and tells that node to let go when another
//!   one takes it over.

pub mod convert;
pub mod durable_index;
pub mod node_id;
pub mod placement;
pub mod registry;
pub mod routes;
pub mod service;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use fleetmq_cluster::pb::node_service_client::NodeServiceClient;
use fleetmq_cluster::pb::{self, RouteChange, RouteUpdate};
use fleetmq_cluster::{ClusterError, Durable, Progress};
use fleetmq_storage::records::{Command, SessionKey, Space, Target};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};

use crate::broker::Broker;
use crate::message::Message;
use durable_index::DurableIndex;
use registry::{Holder, Put, Registry, Restore, ANY_CONNECTION};
use routes::{LocalRoutes, RemoteRoutes, Route};

/// How long one node-to-node call may take before the peer counts as unreachable.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a route update is repeated to a peer that had not caught up with the sender's
/// log (each waits up to 1.5 s there).
const LAGGING_RETRIES: usize = 3;
/// Route heartbeats: a peer that misses one is marked down (and skipped as a home node).
const HEARTBEAT: Duration = Duration::from_millis(500);
/// Messages per forwarded batch at most.
const FORWARD_BATCH: usize = 512;
/// Devices per `Restore` call at most.
pub(crate) const RESTORE_BATCH: usize = 2048;

enum RouteMsg {
    Change(Route, bool),
    /// Answer once every live peer has the changes so far and has applied this Raft index.
    Flush(oneshot::Sender<()>, Progress),
}

/// What became of a message pushed to one device ([`Cluster::push_to_device`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Pushed {
    /// Handed to the device's connection (QoS 0, or a clean session).
    Delivered,
    /// Committed to the device's persistent session: it reaches the device now if it is
    /// connected, or when it reconnects, on whichever node.
    Queued,
    /// The device has no session that takes it (not connected, or not subscribed to a
    /// filter matching the topic); nothing was kept.
    NotDelivered,
}

/// One member as [`Cluster::nodes_view`] shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub id: u64,
    /// Its gRPC address.
    pub address: String,
    /// A voter of the Raft group (else a learner).
    pub voter: bool,
    /// Answering this node's calls.
    pub live: bool,
    /// The Raft leader, as this node last heard.
    pub leader: bool,
    /// The node that answered.
    pub this_node: bool,
}

/// What [`Cluster::register`] found out.
#[derive(Debug, Clone, Copy)]
pub struct Registered {
    /// The node that held the device before and has let go of it, if another one.
    pub prev: Option<u64>,
    /// The home node that recorded the registration (0: none answered).
    pub home: u64,
}

struct Fwd {
    msg: pb::Message,
    done: Option<oneshot::Sender<bool>>,
}

/// The cluster services of one node.
pub struct Cluster {
    /// This node's id.
    pub id: u64,
    durable: Durable,
    local: Mutex<LocalRoutes>,
    remote: RwLock<RemoteRoutes>,
    /// Whether `remote` holds any shared-subscription route (kept with every change to it).
    remote_has_shares: std::sync::atomic::AtomicBool,
    /// Whether the index holds any persistent session's shared subscription (kept with every
    /// change to it), so a publish takes no index lock for shared groups otherwise.
    any_persistent_shares: std::sync::atomic::AtomicBool,
    route_tx: mpsc::UnboundedSender<RouteMsg>,
    /// Route changes announced, and those sent to every live peer: equal when nothing waits.
    announced: AtomicU64,
    acked: Arc<AtomicU64>,
    route_rx: Mutex<Option<mpsc::UnboundedReceiver<RouteMsg>>>,
    forwarders: Mutex<HashMap<u64, mpsc::UnboundedSender<Fwd>>>,
    /// Home-node registry: which node holds the session of a device homed here.
    registry: Mutex<Registry>,
    /// Peers that failed their last call, and since when (for replacing dead voters).
    down: RwLock<HashMap<u64, std::time::Instant>>,
    /// Persistent sessions of the cluster: subscriptions and holders (from the Raft log).
    index: RwLock<DurableIndex>,
    broker: OnceLock<Weak<Broker>>,
    /// Bumped whenever the homes of devices may have changed under this node's connections
    /// (the live members changed, or a peer restarted with an empty registry); each bump
    /// wakes the task that re-announces them (see [`Registry::restore`]).
    view_epoch: AtomicU64,
    restore_wake: tokio::sync::Notify,
    /// Ended sessions to take off their homes' records, by home (sent in batches).
    unregisters: Mutex<HashMap<u64, Vec<(String, String, u64)>>>,
    unregister_wake: tokio::sync::Notify,
    /// Woken whenever a takeover the registry asked for is over (see `registry_put`).
    takeovers_finished: tokio::sync::Notify,
    /// The drain of this node, once started: its outcome when done.
    drained: Mutex<Option<tokio::sync::watch::Receiver<Option<Result<u32, String>>>>>,
    /// This process's start (wall clock, µs), sent with route updates so peers can tell a
    /// restart.
    incarnation: u64,
}

impl Cluster {
    /// The cluster services over an opened durable store; call [`start`](Self::start) once the
    /// broker exists.
    pub fn new(durable: Durable) -> Result<Arc<Cluster>, ClusterError> {
        let (route_tx, route_rx) = mpsc::unbounded_channel();
        let index = build_index(&durable)?;
        Ok(Arc::new(Cluster {
            id: durable.node_id(),
            durable,
            local: Mutex::new(LocalRoutes::default()),
            remote: RwLock::new(RemoteRoutes::default()),
            remote_has_shares: std::sync::atomic::AtomicBool::new(false),
            any_persistent_shares: std::sync::atomic::AtomicBool::new(index.has_any_shares()),
            route_tx,
            announced: AtomicU64::new(0),
            acked: Arc::new(AtomicU64::new(0)),
            route_rx: Mutex::new(Some(route_rx)),
            forwarders: Mutex::new(HashMap::new()),
            registry: Mutex::new(Registry::default()),
            down: RwLock::new(HashMap::new()),
            index: RwLock::new(index),
            broker: OnceLock::new(),
            view_epoch: AtomicU64::new(0),
            restore_wake: tokio::sync::Notify::new(),
            unregisters: Mutex::new(HashMap::new()),
            unregister_wake: tokio::sync::Notify::new(),
            takeovers_finished: tokio::sync::Notify::new(),
            drained: Mutex::new(None),
            // The same clock as connection ids (`forget_before` compares the two).
            incarnation: crate::broker::now_us().max(1),
        }))
    }

    /// Binds the broker and starts the route broadcaster.
    pub fn start(self: &Arc<Self>, broker: &Arc<Broker>) {
        let _ = self.broker.set(Arc::downgrade(broker));
        if let Some(rx) = self.route_rx.lock().take() {
            tokio::spawn(run_routes(self.clone(), rx));
            tokio::spawn(run_restores(self.clone()));
            tokio::spawn(run_unregisters(self.clone()));
        }
    }

    fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.get().and_then(Weak::upgrade)
    }

    /// Other members as `(id, gRPC address)`.
    pub fn peers(&self) -> Vec<(u64, String)> {
        self.durable
            .members()
            .into_iter()
            .filter(|(id, _)| *id != self.id)
            .collect()
    }

    /// True when this node is the only member.
    pub fn is_alone(&self) -> bool {
        self.durable.member_count() <= 1
    }

    fn addr_of(&self, node: u64) -> Option<String> {
        self.durable
            .members()
            .into_iter()
            .find(|(id, _)| *id == node)
            .map(|(_, a)| a)
    }

    /// A node-service client for `addr` over the shared channels (`None`: bad address).
    pub fn client(
        &self,
        addr: &str,
    ) -> Option<NodeServiceClient<fleetmq_cluster::grpc::PeerChannel>> {
        match self.durable.channels().get(addr) {
            Ok(c) => Some(
                NodeServiceClient::new(c)
                    .max_decoding_message_size(fleetmq_cluster::grpc::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(fleetmq_cluster::grpc::MAX_MESSAGE_BYTES),
            ),
            Err(e) => {
                tracing::warn!(%addr, error = %e, "bad peer address");
                None
            }
        }
    }

    fn mark(&self, node: u64, up: bool) {
        let changed = {
            let mut down = self.down.write();
            if up {
                down.remove(&node).is_some()
            } else {
                // The first failure starts the clock; later ones keep it.
                let fresh = !down.contains_key(&node);
                down.entry(node).or_insert_with(std::time::Instant::now);
                fresh
            }
        };
        if changed {
            tracing::info!(node, up, "peer liveness changed");
            // Down then up within one heartbeat round shows no change of the live set at the
            // round's end; every transition counts (a restarted home lost its registry).
            self.view_changed(if up { "a peer is up" } else { "a peer is down" });
        }
    }

    /// Peers down for longer than `after`, as this node sees them.
    pub fn dead_nodes(&self, after: Duration) -> BTreeSet<u64> {
        self.down
            .read()
            .iter()
            .filter(|(_, t)| t.elapsed() >= after)
            .map(|(n, _)| *n)
            .collect()
    }

    /// Starts the task that, while this node leads the group, expires persistent sessions no
    /// live node holds (their node died or left; a holder runs its own expiry timers): every
    /// `every`, an expired orphan is removed with `ExpireSession`, conditional on its holder
    /// entry, so a node claiming it at that moment keeps it.
    pub fn spawn_orphan_expiry(self: &Arc<Self>, every: Duration, dead_after: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut since: HashMap<SessionKey, u64> = HashMap::new();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(c) = weak.upgrade() else { return };
                if c.is_alone() || c.durable.leader() != Some(c.id) {
                    since.clear();
                    continue;
                }
                for cmd in c.expired_orphans(&mut since, dead_after) {
                    match c.durable.propose(cmd).await {
                        Ok(fleetmq_storage::Response::Ok) => {
                            metrics::counter!("fleetmq_cluster_orphans_expired_total").increment(1)
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "expiring an orphaned session failed");
                            break;
                        }
                    }
                }
            }
        });
    }

    /// `ExpireSession` commands for the orphans that are due; `since` keeps when each was first
    /// seen orphaned (those no longer orphaned leave it).
    fn expired_orphans(
        &self,
        since: &mut HashMap<SessionKey, u64>,
        dead_after: Duration,
    ) -> Vec<Command> {
        let now = crate::message::now_ms();
        let members: HashSet<u64> = self.durable.members().iter().map(|(id, _)| *id).collect();
        // Dead, not just missed a heartbeat: a node cut off for a moment keeps its sessions
        // (and one cut off for longer lets go of any that expired when it hears of it).
        let down = self.dead_nodes(dead_after);
        let broker = self.broker();
        let in_memory = |k: &SessionKey| broker.as_ref().is_some_and(|b| b.holds(k));
        let index = self.index.read();
        let mut orphans = HashSet::new();
        let mut due = Vec::new();
        for (key, expiry, disconnected, holder) in index.sessions() {
            let gone = match holder {
                None => true,
                Some(h) if h == self.id => false,
                Some(h) => !members.contains(&h) || down.contains(&h),
            };
            if !gone || in_memory(key) {
                continue;
            }
            orphans.insert(key.clone());
            let first = *since.entry(key.clone()).or_insert(now);
            if durable_index::expired(now, expiry, disconnected, first) {
                due.push(Command::ExpireSession {
                    key: key.clone(),
                    holder: holder.map(|h| h.to_string().into_bytes()),
                });
            }
        }
        since.retain(|k, _| orphans.contains(k));
        due
    }

    /// Starts the task that, while this node leads the group, puts live learners in the
    /// places of voters down for longer than `dead_after` and promotes learners to keep three
    /// voters (see `fleetmq_cluster::rebalance`). Zero disables it.
    pub fn spawn_voter_rebalancer(self: &Arc<Self>, dead_after: Duration) {
        if dead_after.is_zero() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(c) = weak.upgrade() else { return };
                let dead = c.dead_nodes(dead_after);
                // The shard leaders (anywhere) replace dead voters and spread leaderships
                // from what this node sees.
                c.durable
                    .set_liveness(dead.clone(), c.down.read().keys().copied().collect());
                if c.durable.leader() != Some(c.id) {
                    continue;
                }
                match c.durable.rebalance_voters(&dead).await {
                    Ok(true) => {
                        metrics::counter!("fleetmq_cluster_voter_changes_total").increment(1)
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "replacing voters failed; retrying"),
                }
            }
        });
    }

    /// Members believed alive (this node included).
    pub fn live_members(&self) -> Vec<u64> {
        let down = self.down.read();
        self.durable
            .members()
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| *id == self.id || !down.contains_key(id))
            .collect()
    }

    /// Sets the cluster gauges (sampled when /metrics is scraped), per Raft group.
    pub fn sample_metrics(&self) {
        let mut led = 0u64;
        for (gid, m) in self.durable.group_metrics() {
            let group = gid.to_string();
            let g =
                |name: &'static str, v: f64| metrics::gauge!(name, "group" => group.clone()).set(v);
            g("fleetmq_raft_term", m.current_term as f64);
            g(
                "fleetmq_raft_leader_id",
                m.current_leader.unwrap_or(0) as f64,
            );
            let leading = m.current_leader == Some(self.id);
            led += u64::from(leading);
            g("fleetmq_raft_is_leader", if leading { 1.0 } else { 0.0 });
            let last = m.last_log_index.unwrap_or(0);
            let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
            g("fleetmq_raft_last_log_index", last as f64);
            g("fleetmq_raft_applied_index", applied as f64);
            g(
                "fleetmq_raft_apply_lag",
                last.saturating_sub(applied) as f64,
            );
            let voters = m.membership_config.membership().voter_ids().count();
            g("fleetmq_raft_voters", voters as f64);
            let is_voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == self.id);
            g("fleetmq_raft_is_voter", if is_voter { 1.0 } else { 0.0 });
            // Replication lag per follower, as the leader sees it (absent on followers).
            if let Some(rep) = &m.replication {
                for (node, matched) in rep {
                    let lag = last.saturating_sub(matched.map(|l| l.index).unwrap_or(0));
                    metrics::gauge!("fleetmq_raft_replication_lag", "group" => group.clone(), "peer" => node.to_string())
                        .set(lag as f64);
                }
            }
        }
        metrics::gauge!("fleetmq_cluster_groups_led").set(led as f64);
        metrics::gauge!("fleetmq_cluster_shards").set(f64::from(self.durable.shards()));
        let members = self.durable.members().len();
        metrics::gauge!("fleetmq_cluster_members").set(members as f64);
        metrics::gauge!("fleetmq_cluster_peers_down").set(self.down.read().len() as f64);
        metrics::gauge!("fleetmq_cluster_routes").set(self.remote.read().len() as f64);
        metrics::gauge!("fleetmq_cluster_local_routes").set(self.local.lock().len() as f64);
        metrics::gauge!("fleetmq_cluster_registry_entries").set(self.registry.lock().len() as f64);
    }

    // ----- routes ---------------------------------------------------------------------------

    /// A local subscriber for `filter` was added; announces the route if it is new.
    pub fn route_added(&self, tenant: &str, filter: &str) {
        if self.local.lock().add(tenant, filter) {
            self.announced.fetch_add(1, Ordering::AcqRel);
            let _ = self
                .route_tx
                .send(RouteMsg::Change((tenant.into(), filter.into()), true));
        }
    }

    /// A local subscriber for `filter` was removed; withdraws the route with the last one.
    pub fn route_removed(&self, tenant: &str, filter: &str) {
        if self.local.lock().remove(tenant, filter) {
            self.announced.fetch_add(1, Ordering::AcqRel);
            let _ = self
                .route_tx
                .send(RouteMsg::Change((tenant.into(), filter.into()), false));
        }
    }

    /// A future that resolves once every route change made so far has reached every live
    /// peer (or the peer failed), to await before a SUBACK; `None` when nothing is pending.
    pub fn routes_pending(&self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        // Alone, there is nobody to tell (a node that joins later gets the full table).
        if self.is_alone()
            || self.acked.load(Ordering::Acquire) >= self.announced.load(Ordering::Acquire)
        {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let _ = self.route_tx.send(RouteMsg::Flush(tx, Progress::default()));
        Some(async move {
            let _ = rx.await;
        })
    }

    /// Resolves once every live peer has the route changes made so far and has applied the
    /// Raft entry `index` (a persistent subscription committed there): awaited before the
    /// SUBACK, so that a publish anywhere after it queues for the new subscription.
    pub fn sync_peers(
        &self,
        index: Progress,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let rx = (!self.is_alone()).then(|| {
            let (tx, rx) = oneshot::channel();
            let _ = self.route_tx.send(RouteMsg::Flush(tx, index));
            rx
        });
        async move {
            if let Some(rx) = rx {
                let _ = rx.await;
            }
        }
    }

    /// The other live nodes with a subscriber for `topic`. A node believed down gets
    /// nothing forwarded: its persistent sessions count as orphans instead (see
    /// [`orphan_targets`](Self::orphan_targets)), so they get the message through Raft.
    pub fn remote_nodes(&self, tenant: &str, topic: &str) -> BTreeSet<u64> {
        let remote = self.remote.read();
        if remote.is_empty() {
            return BTreeSet::new();
        }
        let mut nodes = remote.nodes_for(tenant, topic);
        drop(remote);
        let down = self.down.read();
        if !down.is_empty() {
            nodes.retain(|n| !down.contains_key(n));
        }
        nodes
    }

    /// The shared subscriptions other live nodes have members of that match `topic`:
    /// `<group>/<filter>` to those nodes.
    pub fn remote_shares(&self, tenant: &str, topic: &str) -> HashMap<String, BTreeSet<u64>> {
        // On every publish: no lock unless some peer announced a shared subscription.
        if !self.remote_has_shares.load(Ordering::Acquire) {
            return HashMap::new();
        }
        let remote = self.remote.read();
        let mut shares = remote.shares_for(tenant, topic);
        drop(remote);
        let down = self.down.read();
        if !down.is_empty() {
            for nodes in shares.values_mut() {
                nodes.retain(|n| !down.contains_key(n));
            }
            shares.retain(|_, n| !n.is_empty());
        }
        shares
    }

    /// Waits (at most `timeout`) until every live peer has sent its routes: a node that just
    /// started knows no route, and a publish it accepted before would miss every subscriber
    /// elsewhere. Peers send them with their next heartbeat.
    pub async fn wait_for_routes(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let missing: Vec<u64> = {
                let remote = self.remote.read();
                let down = self.down.read();
                self.peers()
                    .into_iter()
                    .map(|(id, _)| id)
                    .filter(|id| !down.contains_key(id) && !remote.heard_from(*id))
                    .collect()
            };
            if missing.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(?missing, "starting without the routes of some peers");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a message to one device, as a service pushing it would. A persistent session
    /// subscribed to the topic gets a QoS 1/2 message through Raft (`Enqueue` for it alone),
    /// wherever it is and whether or not it is connected. Otherwise the message goes to the
    /// device's home, which passes it to the node holding the connection
    /// (`NodeService.Deliver`), and the session takes it if it is subscribed.
    pub async fn push_to_device(
        self: &Arc<Self>,
        tenant: &str,
        device: &str,
        msg: Arc<Message>,
    ) -> Result<Pushed, ClusterError> {
        let key = SessionKey::new(tenant, device);
        if msg.qos > 0 {
            let targets = {
                let index = self.index.read();
                if index.is_persistent(&key) {
                    Some(index.orphan_targets(
                        tenant,
                        &msg.topic,
                        msg.qos,
                        msg.retain,
                        None,
                        |k, _| *k == key,
                    ))
                } else {
                    None
                }
            };
            match targets {
                // Not subscribed at QoS 1/2: the connected session may still take it at QoS 0.
                Some(t) if t.is_empty() => {}
                Some(targets) => {
                    self.durable
                        .propose(Command::Enqueue {
                            message: msg.to_stored(None),
                            targets,
                        })
                        .await?;
                    return Ok(Pushed::Queued);
                }
                None => {}
            }
        }
        let m = convert::message_to_pb(tenant, &msg);
        let home = if self.is_alone() {
            self.id
        } else {
            match placement::preference(tenant, device, &self.live_members())
                .into_iter()
                .next()
            {
                Some(h) => h,
                None => self.id,
            }
        };
        let delivered = if home == self.id {
            self.deliver_at_home(&key, m).await
        } else {
            self.deliver_call(home, &key, m, false).await
        };
        Ok(if delivered {
            Pushed::Delivered
        } else {
            Pushed::NotDelivered
        })
    }

    /// At the device's home: delivers here, or passes the message to the node on record.
    pub async fn deliver_at_home(&self, key: &SessionKey, m: pb::Message) -> bool {
        let holder = if self.is_alone() {
            Some(self.id)
        } else {
            self.registry
                .lock()
                .get(&(key.tenant.to_string(), key.client_id.to_string()))
                .map(|h| h.node)
        };
        match holder {
            Some(node) if node == self.id => self.deliver_here(key, m),
            Some(node) => self.deliver_call(node, key, m, true).await,
            None => false,
        }
    }

    /// Delivers to the session held here, if it takes the message.
    pub fn deliver_here(&self, key: &SessionKey, m: pb::Message) -> bool {
        let (Some(broker), Some((_, msg))) = (self.broker(), convert::message_from_pb(m)) else {
            return false;
        };
        broker.deliver_to_session(key, &msg)
    }

    async fn deliver_call(
        &self,
        node: u64,
        key: &SessionKey,
        m: pb::Message,
        at_holder: bool,
    ) -> bool {
        let Some(mut client) = self.addr_of(node).and_then(|a| self.client(&a)) else {
            return false;
        };
        let req = pb::DeliverRequest {
            key: Some(pb::SessionKey {
                tenant: key.tenant.to_string(),
                device_id: key.client_id.to_string(),
            }),
            message: Some(m),
            at_holder,
        };
        match tokio::time::timeout(RPC_TIMEOUT * 2, client.deliver(req)).await {
            Ok(Ok(r)) => r.into_inner().delivered,
            Ok(Err(e)) => {
                tracing::debug!(node, error = %e.message(), "deliver failed");
                false
            }
            Err(_) => {
                self.mark(node, false);
                false
            }
        }
    }

    /// The topic rules of this node (for topics that arrive other than by MQTT).
    pub fn topic_limits(&self) -> fleetmq_protocol::topic::TopicLimits {
        match self.broker() {
            Some(b) => b.limits.clone(),
            None => Default::default(),
        }
    }

    /// Every member as this node sees it (for operators).
    /// Every Raft group's voters and leader as this node sees them (see `Durable::layout`).
    pub fn groups_view(&self) -> Vec<(u64, BTreeSet<u64>, Option<u64>)> {
        self.durable.layout()
    }

    pub fn nodes_view(&self) -> Vec<NodeView> {
        let voters = self.durable.voters();
        let leader = self.durable.leader();
        let down = self.down.read();
        self.durable
            .members()
            .into_iter()
            .map(|(id, address)| NodeView {
                id,
                address,
                voter: voters.contains(&id),
                live: id == self.id || !down.contains_key(&id),
                leader: leader == Some(id),
                this_node: id == self.id,
            })
            .collect()
    }

    /// Drains member `node` (this one, or another through `NodeService.Drain`). `None`: no
    /// such member.
    pub async fn drain_node(self: &Arc<Self>, node: u64) -> Option<Result<u32, ClusterError>> {
        if node == self.id {
            return Some(self.drain().await);
        }
        let addr = self.addr_of(node)?;
        let Some(mut client) = self.client(&addr) else {
            return Some(Err(ClusterError::Unavailable(format!(
                "bad address {addr}"
            ))));
        };
        let req = pb::DrainRequest {
            reason_code: u32::from(fleetmq_protocol::reason::v5::USE_ANOTHER_SERVER),
        };
        // Waiting for the clients to go and for the membership change takes seconds.
        Some(
            match tokio::time::timeout(RPC_TIMEOUT * 15, client.drain(req)).await {
                Ok(Ok(r)) => Ok(r.into_inner().connections_closed),
                Ok(Err(e)) => Err(ClusterError::Unavailable(e.message().to_string())),
                Err(_) => Err(ClusterError::Timeout("drain".into())),
            },
        )
    }

    /// Drains this node: readiness goes false, new CONNECTs get 0x9C "use another server",
    /// connected clients get DISCONNECT 0x9C (MQTT 5) and reconnect through the load balancer
    /// to other nodes, where their sessions continue; then the sessions leave this node's
    /// memory (what they proposed committed first) and the node leaves the membership, so a
    /// learner takes its place as a voter. The process keeps running until it is stopped.
    /// Returns how many connections were told to go.
    pub async fn drain(self: &Arc<Self>) -> Result<u32, ClusterError> {
        // One drain per node, in its own task: a caller that gives up (its request timed out)
        // must not leave the node half drained, and a second call waits for the same result.
        let mut rx = {
            let mut slot = self.drained.lock();
            match &*slot {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    let cluster = self.clone();
                    tokio::spawn(async move {
                        let r = cluster.drain_now().await.map_err(|e| e.to_string());
                        if r.is_err() {
                            // A failed drain may be asked for again (not answered forever
                            // with this error).
                            *cluster.drained.lock() = None;
                        }
                        let _ = tx.send(Some(r));
                    });
                    *slot = Some(rx.clone());
                    rx
                }
            }
        };
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ClusterError::Unavailable("the drain stopped".into()))?
            .clone();
        match outcome {
            Some(Ok(n)) => Ok(n),
            Some(Err(e)) => Err(ClusterError::Unavailable(e)),
            None => Err(ClusterError::Unavailable("the drain stopped".into())),
        }
    }

    async fn drain_now(&self) -> Result<u32, ClusterError> {
        use futures_util::StreamExt;
        let Some(broker) = self.broker() else {
            return Err(ClusterError::Unavailable(
                "the node is still starting".into(),
            ));
        };
        let told = broker.drain_connections();
        tracing::warn!(
            connections = told,
            "draining: clients told to use another server"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while broker.connections.load(Ordering::Relaxed) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Sessions without a connection (persistent ones) go too: no expiry timer of theirs
        // may fire here once they continue elsewhere. A CONNECT that was registering when the
        // drain began is refused when it tries to attach, so this ends.
        for _ in 0..10 {
            let keys = broker.session_keys();
            if keys.is_empty() {
                break;
            }
            futures_util::stream::iter(keys)
                .for_each_concurrent(64, |key| {
                    let broker = broker.clone();
                    async move {
                        broker
                            .evict(&key.tenant, &key.client_id, ANY_CONNECTION, true)
                            .await;
                    }
                })
                .await;
        }
        if !self.is_alone() {
            self.leave().await?;
        }
        metrics::counter!("fleetmq_cluster_drains_total").increment(1);
        Ok(u32::try_from(told).unwrap_or(u32::MAX))
    }

    /// Leaves the cluster: asks the leader (possibly this node) to remove this node from the
    /// membership, retrying through an election for a few seconds.
    pub async fn leave(&self) -> Result<(), ClusterError> {
        // Its shards go to other voters first, so none waits for an election.
        self.durable.hand_over_leaderships().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let result = match self.durable.remove_node(self.id).await {
                Err(ClusterError::NotLeader {
                    leader_addr: Some(addr),
                    ..
                }) => match self.client(&addr) {
                    Some(mut c) => {
                        match tokio::time::timeout(
                            RPC_TIMEOUT * 2,
                            c.leave(pb::LeaveRequest { node_id: self.id }),
                        )
                        .await
                        {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err(e)) => Err(ClusterError::Unavailable(e.message().to_string())),
                            Err(_) => Err(ClusterError::Timeout("leave".into())),
                        }
                    }
                    None => Err(ClusterError::Unavailable(format!("bad address {addr}"))),
                },
                other => other,
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "leave not done yet; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    // ----- persistent sessions across nodes ---------------------------------------------------

    /// Rebuilds the persistent-session index from the state machine (after a snapshot was
    /// installed: the commands it replaced were never observed here).
    pub fn reload_index(&self) -> Result<(), ClusterError> {
        let index = build_index(&self.durable)?;
        self.any_persistent_shares
            .store(index.has_any_shares(), Ordering::Release);
        *self.index.write() = index;
        Ok(())
    }

    /// Mirrors an applied session command into the index.
    pub fn observe_session(&self, cmd: &Command) {
        let mut index = self.index.write();
        index.observe(cmd);
        self.any_persistent_shares
            .store(index.has_any_shares(), Ordering::Release);
    }

    /// An `ExpireSession` removed a session. Should this node still hold it (it was cut off
    /// from the leader for longer than the session's expiry), it lets go of it too: the client
    /// reconnects to a fresh session instead of one that no longer exists durably.
    pub fn observe_expired(&self, key: &SessionKey) {
        {
            let mut index = self.index.write();
            index.expired_session(key);
            self.any_persistent_shares
                .store(index.has_any_shares(), Ordering::Release);
        }
        if let Some(b) = self.broker() {
            if b.holds(key) {
                tracing::warn!(client = %key.client_id, "a session held here expired in the cluster");
                let key = key.clone();
                // Not awaited here: the apply observer must not wait on a commit.
                tokio::spawn(async move {
                    b.evict(&key.tenant, &key.client_id, ANY_CONNECTION, false)
                        .await;
                });
            }
        }
    }

    /// Mirrors an applied holder entry (re-read, as the directory does).
    pub fn observe_holder(&self, tenant: &str, client: &str) {
        let node = match self.durable.entry(Space::Holder, tenant, client) {
            Ok(v) => v.as_deref().and_then(parse_holder),
            Err(e) => {
                tracing::error!(error = %e, "reading a session holder failed");
                return;
            }
        };
        self.index
            .write()
            .set_holder(SessionKey::new(tenant, client), node);
    }

    /// Records durably that this node holds a persistent session (skipped when on record).
    pub fn hold_command(&self, key: &SessionKey) -> Option<Command> {
        if self.is_alone() || self.index.read().holder(key) == Some(self.id) {
            return None;
        }
        Some(Command::PutEntry {
            space: Space::Holder,
            tenant: key.tenant.clone(),
            name: key.client_id.clone(),
            value: self.id.to_string().into_bytes(),
            create_only: false,
        })
    }

    /// Forgets durably that a session is held (it ended).
    pub fn release_command(&self, key: &SessionKey) -> Option<Command> {
        if self.is_alone() {
            return None;
        }
        Some(Command::DeleteEntry {
            space: Space::Holder,
            tenant: key.tenant.clone(),
            name: key.client_id.clone(),
        })
    }

    /// Sessions this node is on record as holding (to release after a restart: it holds
    /// none in memory then).
    pub fn held_on_record(&self) -> Vec<SessionKey> {
        match self.durable.entries(Space::Holder) {
            Ok(v) => v
                .into_iter()
                .filter(|(_, _, _, v)| parse_holder(v) == Some(self.id))
                .map(|(_, t, c, _)| SessionKey::new(t, c))
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "reading session holders failed");
                Vec::new()
            }
        }
    }

    /// The persistent sessions matching `topic` that this node does not hold (`held_here`
    /// says which it has in memory): wherever they are (on another node, or nowhere since
    /// their node died), a QoS 1/2 message reaches them through Raft. The node holding one
    /// adds it when it applies the entry; forwards serve only clean sessions. So no
    /// persistent session's message depends on a forward, a route, or a node staying up.
    pub fn orphan_targets(
        &self,
        tenant: &str,
        topic: &str,
        qos: u8,
        retain: bool,
        publisher: Option<&SessionKey>,
        held_here: impl Fn(&SessionKey) -> bool,
    ) -> Vec<Target> {
        if qos == 0 || self.is_alone() {
            return Vec::new();
        }
        let index = self.index.read();
        if index.is_empty() {
            return Vec::new();
        }
        index.orphan_targets(tenant, topic, qos, retain, publisher, |key, _| {
            !held_here(key)
        })
    }

    /// True when some persistent session of `tenant` has a shared subscription (so a
    /// publish must say which groups it served: see [`share_targets`](Self::share_targets)).
    pub fn has_persistent_shares(&self, tenant: &str) -> bool {
        // On every publish: no index lock unless some tenant has such members at all.
        self.any_persistent_shares.load(Ordering::Acquire)
            && !self.is_alone()
            && self.index.read().has_shares(tenant)
    }

    /// Durable targets for the shared-subscription groups with persistent members that no
    /// live node served (`served` names those it did, as `"<group>/<filter>"`): one member
    /// per group, so that a message for a group whose members' node died, or whose members
    /// are all offline with no node holding them, waits in one member's session instead of
    /// being lost.
    pub fn share_targets(
        &self,
        tenant: &str,
        topic: &str,
        qos: u8,
        retain: bool,
        turn: usize,
        served: impl Fn(&str) -> bool,
    ) -> Vec<Target> {
        if qos == 0 || self.is_alone() {
            return Vec::new();
        }
        self.index
            .read()
            .share_targets(tenant, topic, qos, retain, turn, served)
    }

    /// Marks peers down after a failed forward (the next heartbeat marks them up again).
    pub fn mark_down(&self, nodes: &BTreeSet<u64>) {
        for n in nodes {
            self.mark(*n, false);
        }
    }

    /// Applies a route update from a peer once this node has applied as much of the log as
    /// the sender had; returns the sequence now held for it, and whether this node had not
    /// caught up with the sender's log in time (`lagging`: applied anyway).
    pub async fn apply_routes(&self, u: RouteUpdate) -> (u64, bool) {
        // It talks, so it is up: forwarding to it resumes before this node's next heartbeat.
        self.mark(u.node_id, true);
        let lagging = !self
            .durable
            .wait_applied(&progress_of(&u), RPC_TIMEOUT * 3 / 4)
            .await;
        if lagging {
            // Applied anyway (routes must not stall on a lagging group), but a publish here
            // right now could miss a persistent subscription the sender just committed.
            metrics::counter!("fleetmq_cluster_route_apply_lagged_total").increment(1);
            tracing::warn!(from = u.node_id, "route update ahead of this node's log");
        }
        let changes = u
            .changes
            .into_iter()
            .map(|c| ((c.tenant, c.filter), c.added));
        let (r, len, restarted) = {
            let mut remote = self.remote.write();
            let restarted = remote.restarted(u.node_id, u.incarnation);
            let r = remote.apply_from(u.node_id, u.incarnation, u.sequence, u.full, changes);
            self.remote_has_shares
                .store(remote.has_shares(), Ordering::Release);
            (r, remote.len(), restarted)
        };
        if restarted {
            // Its connections from before the restart are gone, and so is its registry: the
            // records here naming them go, and this node's connections homed there are
            // announced to it again.
            self.registry.lock().forget_before(u.node_id, u.incarnation);
            self.view_changed("a peer restarted");
        }
        metrics::gauge!("fleetmq_cluster_routes").set(len as f64);
        match r {
            routes::Applied::Yes(s) | routes::Applied::Gap(s) => (s, lagging),
        }
    }

    // ----- forwarding -----------------------------------------------------------------------

    /// Sends a message to the nodes in `nodes`; the future resolves to the nodes that did not
    /// take it (unreachable, or their commit failed).
    pub fn forward(
        &self,
        nodes: &BTreeSet<u64>,
        shares: &BTreeMap<u64, Vec<String>>,
        tenant: &str,
        msg: &Message,
    ) -> impl std::future::Future<Output = BTreeSet<u64>> + Send + 'static {
        let m = convert::message_to_pb(tenant, msg);
        let mut waits = Vec::with_capacity(nodes.len());
        let mut failed = BTreeSet::new();
        for &node in nodes {
            let Some(tx) = self.forwarder(node) else {
                failed.insert(node);
                continue;
            };
            let (done, rx) = oneshot::channel();
            let mut msg = m.clone();
            if let Some(s) = shares.get(&node) {
                msg.share_groups = s.clone();
            }
            if tx
                .send(Fwd {
                    msg,
                    done: Some(done),
                })
                .is_ok()
            {
                waits.push((node, rx));
            } else {
                failed.insert(node);
            }
        }
        async move {
            for (node, rx) in waits {
                if !matches!(rx.await, Ok(true)) {
                    failed.insert(node);
                }
            }
            failed
        }
    }

    fn forwarder(&self, node: u64) -> Option<mpsc::UnboundedSender<Fwd>> {
        let mut map = self.forwarders.lock();
        if let Some(tx) = map.get(&node) {
            if !tx.is_closed() {
                return Some(tx.clone());
            }
        }
        let addr = self.addr_of(node)?;
        let client = self.client(&addr)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_forwarder(self.id, node, client, rx));
        map.insert(node, tx.clone());
        Some(tx)
    }

    // ----- session registry -----------------------------------------------------------------

    /// Tells the device's home node that this node now holds its session (connection
    /// `conn`). Returns the node that held it before, which has let go of it, if another one,
    /// and the home that answered. Tries the next node in the key's preference when the home
    /// is unreachable, and gives up (`home` = 0) when none answers: a connection never waits
    /// on an unreachable node.
    pub async fn register(
        &self,
        tenant: &str,
        device: &str,
        conn: u64,
        clean_start: bool,
    ) -> Registered {
        let prefs = placement::preference(tenant, device, &self.live_members());
        for home in prefs.into_iter().take(3) {
            if home == self.id {
                let prev = self
                    .registry_put(tenant, device, self.id, conn, clean_start)
                    .await;
                return Registered { prev, home };
            }
            let Some(addr) = self.addr_of(home) else {
                continue;
            };
            let Some(mut client) = self.client(&addr) else {
                continue;
            };
            let req = pb::RegisterRequest {
                key: Some(pb::SessionKey {
                    tenant: tenant.into(),
                    device_id: device.into(),
                }),
                node_id: self.id,
                connection_id: conn,
                clean_start,
            };
            match tokio::time::timeout(RPC_TIMEOUT, client.register(req)).await {
                Ok(Ok(r)) => {
                    self.mark(home, true);
                    let prev = r.into_inner().previous_node_id;
                    return Registered {
                        prev: (prev != 0 && prev != self.id).then_some(prev),
                        home,
                    };
                }
                Ok(Err(e)) => {
                    tracing::warn!(home, error = %e.message(), "register refused");
                    self.mark(home, false);
                }
                Err(_) => {
                    tracing::warn!(home, "register timed out");
                    self.mark(home, false);
                }
            }
        }
        Registered {
            prev: None,
            home: 0,
        }
    }

    /// The session of the device ended on this node (newest connection `conn`): tells its
    /// home, without waiting, so the registry does not keep every client id ever seen.
    pub fn unregister(&self, tenant: &str, device: &str, conn: u64, home: u64) {
        if self.is_alone() {
            return;
        }
        // The home it registered with; else the one it would register with now.
        let home = match home {
            0 => match placement::preference(tenant, device, &self.live_members())
                .into_iter()
                .next()
            {
                Some(h) => h,
                None => return,
            },
            h => h,
        };
        if home == self.id {
            self.registry_remove(tenant, device, self.id, conn);
            return;
        }
        // Batched per home (`Restore.forget`): a storm of disconnections makes a few calls,
        // not one task and one call per session.
        self.unregisters.lock().entry(home).or_default().push((
            tenant.to_string(),
            device.to_string(),
            conn,
        ));
        self.unregister_wake.notify_one();
    }

    /// The current view epoch: taken before a connection registers, and handed back to
    /// [`attached`](Self::attached) once it has attached.
    pub fn view_epoch(&self) -> u64 {
        self.view_epoch.load(Ordering::Acquire)
    }

    /// A connection attached after registering with the home it saw at view epoch `seen`.
    /// Should the view have changed since, the home it registered with may have lost (or
    /// never been) its record, and the other connections were re-announced without it: it is
    /// re-announced now.
    pub fn attached(&self, seen: u64) {
        if seen != self.view_epoch() {
            self.restore_wake.notify_one();
        }
    }

    /// Devices may have new homes, or a home lost its records: re-announce every connection.
    fn view_changed(&self, why: &str) {
        self.view_epoch.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(
            why,
            "cluster view changed; re-announcing connections to their homes"
        );
        self.restore_wake.notify_one();
    }

    /// Home-node side of a re-announced connection (see [`Registry::restore`]). True when a
    /// newer connection on another node supersedes it (its node closes it); a newer one takes
    /// over an older one on record, as a registration does.
    pub fn registry_restore(
        self: &Arc<Self>,
        tenant: &str,
        device: &str,
        node: u64,
        conn: u64,
    ) -> bool {
        let key = (tenant.to_string(), device.to_string());
        let outcome = self
            .registry
            .lock()
            .restore(key.clone(), Holder { node, conn });
        match outcome {
            Restore::Kept => false,
            Restore::Superseded => {
                metrics::counter!("fleetmq_cluster_restores_superseded_total").increment(1);
                true
            }
            Restore::Takeover(prev) => {
                metrics::counter!("fleetmq_cluster_restores_superseded_total").increment(1);
                let cluster = self.clone();
                let (tenant, device) = key.clone();
                tokio::spawn(async move {
                    cluster
                        .takeover_on(prev.node, &tenant, &device, prev.conn, true)
                        .await;
                    cluster.takeover_finished(&key);
                });
                false
            }
        }
    }

    /// Re-announces every connection attached here to its home (one call per home and
    /// [`RESTORE_BATCH`] devices), takes the records away from homes that are no longer the
    /// devices' homes, and closes the connections a newer one elsewhere supersedes. False when
    /// a home did not answer (the pass is tried again).
    async fn restore_all(self: &Arc<Self>) -> bool {
        let Some(broker) = self.broker() else {
            return true;
        };
        let mut all_answered = true;
        let live = self.live_members();
        type Conn = (String, String, u64);
        let mut by_home: HashMap<u64, Vec<Conn>> = HashMap::new();
        let mut old_homes: HashMap<Conn, u64> = HashMap::new();
        for (tenant, device, conn, old_home) in broker.attached_connections() {
            let Some(home) = placement::preference(&tenant, &device, &live)
                .into_iter()
                .next()
            else {
                continue;
            };
            if old_home != 0 && old_home != home {
                old_homes.insert((tenant.clone(), device.clone(), conn), old_home);
            }
            by_home
                .entry(home)
                .or_default()
                .push((tenant, device, conn));
        }
        let mut superseded = Vec::new();
        let mut restored = Vec::new();
        for (home, devices) in by_home {
            for chunk in devices.chunks(RESTORE_BATCH) {
                if home == self.id {
                    for (t, d, c) in chunk {
                        if self.registry_restore(t, d, self.id, *c) {
                            superseded.push((t.clone(), d.clone(), *c));
                        } else {
                            restored.push((t.clone(), d.clone(), *c, home));
                        }
                    }
                    continue;
                }
                match self.restore_call(home, chunk, &[]).await {
                    Some(sup) => {
                        let sup: HashSet<u32> = sup.into_iter().collect();
                        for (i, (t, d, c)) in chunk.iter().enumerate() {
                            if sup.contains(&(i as u32)) {
                                superseded.push((t.clone(), d.clone(), *c));
                            } else {
                                restored.push((t.clone(), d.clone(), *c, home));
                            }
                        }
                    }
                    None => {
                        self.mark(home, false);
                        all_answered = false;
                        break;
                    }
                }
            }
        }
        metrics::counter!("fleetmq_cluster_restored_connections_total")
            .increment(restored.len() as u64);
        // Records at the old homes go (each only if it still names this node's connection),
        // so a home does not keep every device that ever moved away from it; only once the
        // new home has the record, so the device is never on record nowhere.
        let mut moved: HashMap<u64, Vec<Conn>> = HashMap::new();
        for (t, d, c, home) in restored {
            broker.set_home(&t, &d, c, home);
            let conn = (t, d, c);
            if let Some(old) = old_homes.remove(&conn) {
                moved.entry(old).or_default().push(conn);
            }
        }
        for (old, devices) in moved {
            for chunk in devices.chunks(RESTORE_BATCH) {
                if old == self.id {
                    for (t, d, c) in chunk {
                        self.registry_remove(t, d, self.id, *c);
                    }
                } else if self.restore_call(old, &[], chunk).await.is_none() {
                    break;
                }
            }
        }
        for (t, d, c) in superseded {
            tracing::info!(tenant = %t, device = %d, "a newer connection elsewhere supersedes this one");
            broker.evict(&t, &d, c, true).await;
        }
        all_answered
    }

    /// One `Restore` call: `entries` re-announced to `home`, `forget` taken away from it.
    /// The positions of superseded entries, or `None` when the call failed.
    async fn restore_call(
        &self,
        home: u64,
        entries: &[(String, String, u64)],
        forget: &[(String, String, u64)],
    ) -> Option<Vec<u32>> {
        let mut client = self.addr_of(home).and_then(|a| self.client(&a))?;
        let to_pb = |list: &[(String, String, u64)]| {
            list.iter()
                .map(|(t, d, c)| pb::RestoreEntry {
                    key: Some(pb::SessionKey {
                        tenant: t.clone(),
                        device_id: d.clone(),
                    }),
                    connection_id: *c,
                })
                .collect()
        };
        let req = pb::RestoreRequest {
            node_id: self.id,
            entries: to_pb(entries),
            forget: to_pb(forget),
        };
        match tokio::time::timeout(RPC_TIMEOUT, client.restore(req)).await {
            Ok(Ok(r)) => Some(r.into_inner().superseded),
            Ok(Err(e)) => {
                tracing::debug!(home, error = %e.message(), "restore failed");
                None
            }
            Err(_) => {
                tracing::debug!(home, "restore timed out");
                None
            }
        }
    }

    /// A takeover the registry asked for is over: the device is free for the next one, and
    /// registrations waiting on it try again.
    fn takeover_finished(&self, key: &(String, String)) {
        self.registry.lock().takeover_done(key);
        self.takeovers_finished.notify_waiters();
    }

    /// Home-node side of an unregistration (see [`Registry::remove`]).
    pub fn registry_remove(&self, tenant: &str, device: &str, node: u64, conn: u64) {
        let key = (tenant.to_string(), device.to_string());
        self.registry.lock().remove(&key, Holder { node, conn });
    }

    /// Home-node side of a registration: records `node` as the holder and makes the previous
    /// holder (another node) let go first. Returns the previous holder if another node.
    pub async fn registry_put(
        &self,
        tenant: &str,
        device: &str,
        node: u64,
        conn: u64,
        clean_start: bool,
    ) -> Option<u64> {
        let key = (tenant.to_string(), device.to_string());
        // A takeover of the device under way finishes first (bounded by its RPC timeout), so
        // that a third connection never attaches while the first is still live.
        let deadline = tokio::time::Instant::now() + RPC_TIMEOUT * 3;
        let prev = loop {
            // Armed before the check, so a takeover finishing in between still wakes it.
            let finished = self.takeovers_finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            match self.registry.lock().put(key.clone(), Holder { node, conn }) {
                Put::Done => return None,
                Put::Takeover(prev) => break prev,
                Put::Busy if tokio::time::Instant::now() < deadline => {}
                Put::Busy => {
                    tracing::warn!(
                        tenant,
                        device,
                        "registration waited too long for a takeover"
                    );
                    return None;
                }
            }
            let _ = tokio::time::timeout_at(deadline, finished).await;
        };
        // Clears the busy mark even when this call is dropped (its caller timed out).
        struct Done<'a>(&'a Cluster, &'a (String, String));
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.takeover_finished(self.1);
            }
        }
        let _done = Done(self, &key);
        self.takeover_on(prev.node, tenant, device, prev.conn, !clean_start)
            .await;
        Some(prev.node)
    }

    /// Makes `node` close its connection `conn` for the device (or any, with
    /// [`ANY_CONNECTION`]) and drop the session from memory (after committing what it had
    /// proposed). An unreachable node is assumed dead.
    pub async fn takeover_on(
        &self,
        node: u64,
        tenant: &str,
        device: &str,
        conn: u64,
        session_continues: bool,
    ) {
        if node == self.id {
            if let Some(b) = self.broker() {
                b.evict(tenant, device, conn, session_continues).await;
            }
            return;
        }
        let Some(addr) = self.addr_of(node) else {
            return;
        };
        let Some(mut client) = self.client(&addr) else {
            return;
        };
        let req = pb::TakeoverRequest {
            key: Some(pb::SessionKey {
                tenant: tenant.into(),
                device_id: device.into(),
            }),
            connection_id: conn,
            session_continues,
        };
        match tokio::time::timeout(RPC_TIMEOUT * 2, client.takeover(req)).await {
            Ok(Ok(_)) => self.mark(node, true),
            Ok(Err(e)) => {
                tracing::warn!(node, error = %e.message(), "takeover failed; assuming the node lost the session")
            }
            Err(_) => {
                tracing::warn!(node, "takeover timed out; assuming the node is gone");
                self.mark(node, false);
            }
        }
    }

    /// Makes every other live node let go of the device's session (used when the registry has
    /// no entry for it, e.g. after its home node restarted).
    pub async fn takeover_everywhere(&self, tenant: &str, device: &str) {
        let live: Vec<u64> = self
            .live_members()
            .into_iter()
            .filter(|n| *n != self.id)
            .collect();
        let calls = live
            .iter()
            .map(|n| self.takeover_on(*n, tenant, device, ANY_CONNECTION, true));
        futures_util::future::join_all(calls).await;
    }
}

/// Re-announces this node's connections whenever the view changes (debounced: a burst of
/// changes, as when a node restarts, makes one pass).
async fn run_restores(cluster: Arc<Cluster>) {
    // After a pass with a failed call (say, the home was still starting), another pass
    // follows without waiting for a change of view: the peer may be marked down and up again
    // within one heartbeat round, which no view change shows. Backs off to 30 s.
    let mut retry: Option<Duration> = None;
    loop {
        // A wake-up while a pass runs is kept as a permit: the next pass follows.
        match retry {
            None => cluster.restore_wake.notified().await,
            Some(after) => {
                tokio::select! {
                    _ = cluster.restore_wake.notified() => {}
                    _ = tokio::time::sleep(after) => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        retry = if cluster.restore_all().await {
            None
        } else {
            Some(retry.map_or(Duration::from_millis(500), |d| {
                (d * 2).min(Duration::from_secs(30))
            }))
        };
    }
}

/// Sends the queued unregistrations, one call per home and [`RESTORE_BATCH`] devices; what
/// piles up during a call goes in the next one. A failed call is not retried: the records it
/// meant to remove name connections that are gone, which a later registration of the device
/// replaces (the takeover it causes finds nothing).
async fn run_unregisters(cluster: Arc<Cluster>) {
    loop {
        cluster.unregister_wake.notified().await;
        let batches = std::mem::take(&mut *cluster.unregisters.lock());
        let calls = batches.into_iter().map(|(home, devices)| {
            let cluster = cluster.clone();
            async move {
                for chunk in devices.chunks(RESTORE_BATCH) {
                    if cluster.restore_call(home, &[], chunk).await.is_none() {
                        break;
                    }
                }
            }
        });
        futures_util::future::join_all(calls).await;
    }
}

/// Sends route changes to every peer, in order, and heartbeats; answers flush waiters once
/// the changes before them have been acknowledged (or the peer failed).
async fn run_routes(cluster: Arc<Cluster>, mut rx: mpsc::UnboundedReceiver<RouteMsg>) {
    let mut seq: u64 = 0;
    let mut processed: u64 = 0;
    // Sessions taken while this node was alone have no holder on record: published once a
    // peer appears, so the newcomer does not take them for orphans.
    let mut holders_published = false;
    let probing: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let mut last_live: Vec<u64> = Vec::new();
    let mut last_members: HashSet<u64> = HashSet::new();
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => Some(m),
                None => return,
            },
            _ = tick.tick() => None,
        };
        let mut changes = Vec::new();
        let mut waiters = Vec::new();
        let take = |m: RouteMsg, changes: &mut Vec<RouteChange>, waiters: &mut Vec<_>| match m {
            RouteMsg::Change((tenant, filter), added) => changes.push(RouteChange {
                tenant,
                filter,
                share_group: String::new(),
                added,
            }),
            RouteMsg::Flush(tx, index) => waiters.push((tx, index)),
        };
        if let Some(m) = first {
            take(m, &mut changes, &mut waiters);
            while let Ok(m) = rx.try_recv() {
                take(m, &mut changes, &mut waiters);
            }
        }
        if !changes.is_empty() {
            seq += 1;
            processed += changes.len() as u64;
        }
        let peers = cluster.peers();
        if !holders_published && !peers.is_empty() {
            if let Some(b) = cluster.broker() {
                b.hold_all();
                holders_published = true;
            }
        }
        // Routes, registry records and liveness of nodes that left the membership go.
        {
            let mut members: HashSet<u64> = peers.iter().map(|(id, _)| *id).collect();
            members.insert(cluster.id);
            if members != last_members {
                // Only on a change: the registry holds a record per connected device.
                cluster.registry.lock().retain_members(&members);
                cluster.down.write().retain(|n, _| members.contains(n));
                last_members = members.clone();
            }
            let mut remote = cluster.remote.write();
            for n in remote.nodes() {
                if !members.contains(&n) {
                    remote.drop_node(n);
                }
            }
            cluster
                .remote_has_shares
                .store(remote.has_shares(), Ordering::Release);
        }
        let mut min_index = Progress::default();
        for (_, p) in &waiters {
            min_index.merge(p);
        }
        // A peer already known down is probed in the background with the full table, never
        // awaited here: a SUBACK on this side of a partition must not wait out its timeouts.
        // Whatever it misses meanwhile reaches it in that full table (or, later, through the
        // gap check), so skipping it loses no route.
        let (peers, down): (Vec<_>, Vec<_>) = {
            let known_down = cluster.down.read();
            peers
                .into_iter()
                .partition(|(node, _)| !known_down.contains_key(node))
        };
        for (node, addr) in down {
            if probing.lock().insert(node) {
                let cluster = cluster.clone();
                let probing = probing.clone();
                tokio::spawn(async move {
                    if let Some(mut client) = cluster.client(&addr) {
                        if send_full(&cluster, &mut client, node, seq).await {
                            cluster.mark(node, true);
                        }
                    }
                    probing.lock().remove(&node);
                });
            }
        }
        let sends = peers.into_iter().map(|(node, addr)| {
            let cluster = cluster.clone();
            let changes = changes.clone();
            let min_index = min_index.clone();
            async move { send_routes(&cluster, node, &addr, seq, changes, &min_index).await }
        });
        futures_util::future::join_all(sends).await;
        cluster.acked.store(processed, Ordering::Release);
        let live = cluster.live_members();
        if live != last_live {
            cluster.view_changed("live members changed");
            last_live = live;
        }
        for (w, _) in waiters {
            let _ = w.send(());
        }
    }
}

/// One update (or heartbeat) to one peer, followed by the full table if the peer has a gap.
async fn send_routes(
    cluster: &Cluster,
    node: u64,
    addr: &str,
    seq: u64,
    changes: Vec<RouteChange>,
    min_index: &Progress,
) {
    let Some(mut client) = cluster.client(addr) else {
        return;
    };
    let mut applied = cluster.durable.applied();
    applied.merge(min_index);
    let update = RouteUpdate {
        node_id: cluster.id,
        sequence: seq,
        changes,
        full: false,
        applied_index: applied.get(0),
        incarnation: cluster.incarnation,
        group_applied: applied.0,
    };
    // The repeat for a lagging peer (below): the same update without its changes, built
    // before the update is sent away rather than by copying the changes for every peer.
    let heartbeat = RouteUpdate {
        node_id: update.node_id,
        sequence: update.sequence,
        changes: Vec::new(),
        full: false,
        applied_index: update.applied_index,
        incarnation: update.incarnation,
        group_applied: update.group_applied.clone(),
    };
    let mut ack = match tokio::time::timeout(RPC_TIMEOUT, client.update_routes(update)).await {
        Ok(Ok(a)) => a.into_inner(),
        Ok(Err(e)) => {
            tracing::debug!(node, error = %e.message(), "route update failed");
            cluster.mark(node, false);
            return;
        }
        Err(_) => {
            cluster.mark(node, false);
            return;
        }
    };
    cluster.mark(node, true);
    // The peer had not applied this node's log as far as the update said: ask again (as a
    // heartbeat, so nothing is applied twice), a few times, so that a SUBACK waiting on this
    // round does not go out while the peer could still miss the new subscription.
    for _ in 0..LAGGING_RETRIES {
        if !(ack.lagging && ack.sequence == seq) {
            break;
        }
        match tokio::time::timeout(RPC_TIMEOUT, client.update_routes(heartbeat.clone())).await {
            Ok(Ok(a)) => ack = a.into_inner(),
            _ => break,
        }
    }
    if ack.sequence == seq {
        return;
    }
    // The peer restarted or missed an update: send everything, replacing what it has. A
    // restarted peer lost its registry too.
    cluster.view_changed("a peer restarted or missed route updates");
    if !send_full(cluster, &mut client, node, seq).await {
        tracing::debug!(node, "full route update failed");
        cluster.mark(node, false);
    }
}

/// Sends this node's whole route table to `node` as of sequence `seq` (or later: the table
/// is read at sending time, and a later incremental change re-applies harmlessly).
async fn send_full(
    cluster: &Cluster,
    client: &mut NodeServiceClient<fleetmq_cluster::grpc::PeerChannel>,
    node: u64,
    seq: u64,
) -> bool {
    let all = cluster.local.lock().all();
    metrics::counter!("fleetmq_cluster_route_full_syncs_total").increment(1);
    let applied = cluster.durable.applied();
    let full = RouteUpdate {
        node_id: cluster.id,
        sequence: seq,
        changes: all
            .into_iter()
            .map(|(tenant, filter)| RouteChange {
                tenant,
                filter,
                share_group: String::new(),
                added: true,
            })
            .collect(),
        full: true,
        applied_index: applied.get(0),
        incarnation: cluster.incarnation,
        group_applied: applied.0,
    };
    let ok = matches!(
        tokio::time::timeout(RPC_TIMEOUT, client.update_routes(full)).await,
        Ok(Ok(_))
    );
    if !ok {
        tracing::debug!(node, "full route update failed");
    }
    ok
}

/// Sends queued messages to one peer in batches, one batch in flight at a time (so messages
/// from one publisher keep their order).
async fn run_forwarder(
    from: u64,
    node: u64,
    mut client: NodeServiceClient<fleetmq_cluster::grpc::PeerChannel>,
    mut rx: mpsc::UnboundedReceiver<Fwd>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < FORWARD_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let mut dones = Vec::with_capacity(batch.len());
        let messages = batch
            .into_iter()
            .map(|f| {
                dones.push(f.done);
                f.msg
            })
            .collect();
        let started = std::time::Instant::now();
        let req = pb::ForwardBatch {
            from_node_id: from,
            messages,
        };
        let ok = match tokio::time::timeout(RPC_TIMEOUT * 2, client.forward(req)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::warn!(node, error = %e.message(), "forwarding failed");
                false
            }
            Err(_) => {
                tracing::warn!(node, "forwarding timed out");
                false
            }
        };
        metrics::histogram!("fleetmq_cluster_forward_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("fleetmq_cluster_forwarded_messages_total", "result" => if ok { "ok" } else { "error" })
            .increment(dones.len() as u64);
        for d in dones.into_iter().flatten() {
            let _ = d.send(ok);
        }
    }
}

/// The persistent-session index as the state machine holds it now.
fn build_index(durable: &Durable) -> Result<DurableIndex, ClusterError> {
    let mut index = DurableIndex::default();
    for rs in durable.sessions()? {
        index.load(&rs.key, &rs.record);
    }
    for (_, tenant, client, v) in durable.entries(Space::Holder)? {
        if let Some(n) = parse_holder(&v) {
            index.set_holder(SessionKey::new(tenant, client), Some(n));
        }
    }
    Ok(index)
}

/// A holder entry's value: the node id as decimal text.
fn parse_holder(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// How far the sender of a route update had applied each group (an older node sends only the
/// meta group's index).
fn progress_of(u: &RouteUpdate) -> Progress {
    if u.group_applied.is_empty() {
        Progress::at(0, u.applied_index)
    } else {
        Progress(u.group_applied.clone())
    }
}
