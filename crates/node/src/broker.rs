//! The broker's shared state and the rules that span sessions: attaching connections to
//! sessions (takeover, clean start, resume), routing a message to the sessions whose
//! subscriptions match, retained messages, wills, session expiry, and rebuilding everything
//! from durable state after a restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetmq_cluster::{ClusterError, Durable};
use fleetmq_protocol::topic::{parse_shared, TopicLimits};
use fleetmq_protocol::Will;
use fleetmq_storage::records::{
    Command, DeliveryState, RecoveredSession, Response, SessionKey, SessionRecord, StoredMessage,
    Target,
};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{oneshot, watch};

use crate::cluster::{Cluster, Registered};
use crate::config::Config;
use crate::identity::acl::{self, FilterClass, TopicClass};
use crate::identity::auth::Auth;
use crate::identity::records::TenantRec;
use crate::message::{now_ms, Message};
use crate::metrics::{self, Handles};
use crate::quota::Limits;
use crate::session::{Delivery, Enqueue, InflightState, Kick, Session, SessionState, SubOptions};
use crate::tenant::{SubKey, Tenant};

/// One session a message goes to, after overlapping subscriptions are merged.
#[derive(Debug, Clone)]
pub struct Match {
    pub session: Arc<Session>,
    pub qos: u8,
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// Whether this delivery must be committed before the publisher is acknowledged.
    pub durable: bool,
}

/// A routed message waiting for its durable commit (if any) before it is handed to sessions.
#[derive(Debug)]
pub struct Prepared {
    pub msg: Arc<Message>,
    pub matches: Vec<Match>,
    /// Taken by the device-API pipeline (a reserved upstream topic), not routed: the
    /// publisher is answered "success", not "no matching subscribers".
    pub device_api: bool,
    /// Subscribers on other nodes take it too (forwarded, or queued through Raft): not "no
    /// matching subscribers" either.
    pub remote: bool,
    /// Shared subscriptions another node was picked to serve: node to `<group>/<filter>`s
    /// (forward the message there with them).
    pub share_remote: std::collections::BTreeMap<u64, Vec<String>>,
    /// The shared-subscription groups (`<group>/<filter>`) this node or a picked node serves,
    /// listed only when the tenant has persistent members of shared groups (the others get
    /// the message through Raft: see `Broker::share_orphan_command`).
    pub shares_served: Vec<String>,
}

impl Prepared {
    /// Whether any target needs the message committed first.
    pub fn needs_commit(&self) -> bool {
        self.matches.iter().any(|m| m.durable)
    }
}

/// What `attach` hands a new connection.
pub struct Attached {
    pub session: Arc<Session>,
    pub tenant: Arc<Tenant>,
    pub session_present: bool,
    pub kick: oneshot::Receiver<Kick>,
}

/// Shared state of one node.
pub struct Broker {
    pub cfg: Config,
    pub metrics: Handles,
    pub durable: Durable,
    /// Logins and the directory (tenants, users, certificates).
    pub auth: Arc<Auth>,
    /// Routes, forwarding and the session registry shared with the other nodes.
    pub cluster: Arc<Cluster>,
    pub limits: TopicLimits,
    tenants: RwLock<HashMap<String, Arc<Tenant>>>,
    /// Sessions by key; the key lives once, inside the session (see `SessionMap`).
    sessions: Mutex<SessionMap>,
    /// Connections superseded by a takeover before they attached (locked inside `sessions`).
    fences: Mutex<crate::cluster::registry::Fences>,
    next_id: AtomicU64,
    /// Open connections, for the node's connection limit.
    pub connections: AtomicUsize,
    /// Set to true on SIGTERM/SIGINT; connection tasks watch it.
    pub shutdown: watch::Sender<bool>,
    /// Readiness as `/health/ready` reports it: false while starting, draining or stopping.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// Set by a drain: new CONNECTs are refused with 0x9C "use another server".
    pub draining: std::sync::atomic::AtomicBool,
}

impl Broker {
    /// A broker over an opened durable store.
    pub fn new(
        cfg: Config,
        durable: Durable,
        auth: Arc<Auth>,
        cluster: Arc<Cluster>,
    ) -> Arc<Broker> {
        let limits = TopicLimits {
            max_len: cfg.max_topic_length,
            max_levels: cfg.max_topic_levels,
        };
        let (shutdown, _) = watch::channel(false);
        Arc::new(Broker {
            cfg,
            metrics: Handles::new(),
            durable,
            auth,
            cluster,
            limits,
            tenants: RwLock::new(HashMap::new()),
            sessions: Mutex::new(SessionMap::default()),
            fences: Mutex::new(Default::default()),
            // Ids follow the clock (see `next_id`), so that connection ids of this node keep
            // growing across restarts: a late takeover aimed at a connection of the previous
            // run must not look newer than today's (see `cluster::registry`).
            next_id: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            shutdown,
            ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A process-unique id for sessions and connections: the clock in µs, or one more than
    /// the last id when the clock has not moved on. So ids grow on this node, across restarts
    /// too, and ids of two nodes compare as the times they were taken, as far as the clocks
    /// agree (a re-announced connection against a registered one: `cluster::registry`).
    pub fn next_id(&self) -> u64 {
        let now = now_us().max(1);
        let prev = self
            .next_id
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                Some(now.max(last.saturating_add(1)))
            })
            .unwrap_or_else(|last| last);
        now.max(prev.saturating_add(1))
    }

    /// The routing namespace of a tenant, created on first use.
    pub fn tenant(&self, name: &str) -> Arc<Tenant> {
        if let Some(t) = self.tenants.read().get(name) {
            return t.clone();
        }
        self.tenants
            .write()
            .entry(name.to_string())
            .or_insert_with(|| Tenant::new(name))
            .clone()
    }

    /// Sets the per-tenant usage gauges (connections, persistent sessions, subscriptions on
    /// this node). Called at scrape time, so the connection path pays nothing for them.
    pub fn sample_tenant_metrics(&self) {
        let tenants: Vec<Arc<Tenant>> = self.tenants.read().values().cloned().collect();
        for t in tenants {
            let u = &t.usage;
            metrics::tenant_usage(
                &t.name,
                u.connections.load(Ordering::Relaxed),
                u.sessions.load(Ordering::Relaxed),
                u.subscriptions.load(Ordering::Relaxed),
            );
        }
    }

    /// The effective limits of a tenant (its overrides over this node's defaults).
    pub fn tenant_limits(&self, t: &TenantRec) -> Limits {
        Limits::resolve(&self.cfg, &t.limits)
    }

    /// Whether a persistent session is held for `key` (a CONNECT resuming it creates none).
    pub fn has_persistent_session(&self, key: &SessionKey) -> bool {
        self.sessions
            .lock()
            .get(key)
            .is_some_and(|s| s.0.state.lock().persistent)
    }

    /// Whether a connection currently holds the session `key` (a new CONNECT for it is a
    /// takeover: it replaces a connection instead of adding one, so connection quotas must
    /// not refuse it).
    pub fn is_connected(&self, key: &SessionKey) -> bool {
        self.sessions
            .lock()
            .get(key)
            .is_some_and(|s| s.0.state.lock().conn.is_some())
    }

    /// Tells every connected client's task to close with DISCONNECT 0x8B.
    pub fn disconnect_all(&self) {
        let _ = self.shutdown.send(true);
        self.kick_all(Kick::Shutdown);
    }

    /// Drains the node: readiness goes false, new CONNECTs are refused with 0x9C, and every
    /// connected client is told (DISCONNECT 0x9C, MQTT 5) to use another server; sessions
    /// continue wherever the clients reconnect. Returns how many connections were told.
    pub fn drain_connections(&self) -> usize {
        self.ready.store(false, Ordering::Release);
        self.draining.store(true, Ordering::Release);
        self.kick_all(Kick::Drain)
    }

    fn kick_all(&self, why: Kick) -> usize {
        let sessions: Vec<Arc<Session>> =
            self.sessions.lock().iter().map(|b| b.0.clone()).collect();
        let mut told = 0;
        for s in sessions {
            if let Some(k) = s.state.lock().kick.take() {
                told += usize::from(k.send(why).is_ok());
            }
        }
        told
    }

    /// The sessions held in memory.
    pub fn session_keys(&self) -> Vec<SessionKey> {
        self.sessions
            .lock()
            .iter()
            .map(|b| b.0.key.clone())
            .collect()
    }

    /// Number of sessions held (for tests and health).
    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    // ----- sessions -------------------------------------------------------------------------

    /// Attaches a new connection to the session `key`, taking it over from any connection that
    /// holds it, and makes the session's durable record match the CONNECT. Returns once the
    /// durable change is committed, so CONNACK never promises a session that a crash forgets.
    pub async fn attach(
        self: &Arc<Self>,
        key: SessionKey,
        conn_id: u64,
        clean_start: bool,
        expiry_secs: u32,
        protocol: u8,
    ) -> Result<Attached, ClusterError> {
        let view = self.cluster.view_epoch();
        let home = self.claim(&key, conn_id, clean_start).await?;
        let tenant = self.tenant(&key.tenant);
        let persistent = expiry_secs > 0;
        let (kick_tx, kick_rx) = oneshot::channel();
        let mut kick_tx = Some(kick_tx);
        let mut old_will = None;
        let (session, present, was_persistent, subs) = {
            let mut map = self.sessions.lock();
            if !self
                .fences
                .lock()
                .may_attach(&(key.tenant.clone(), key.client_id.clone()), conn_id)
            {
                drop(map);
                // Superseded between the claim and here: what the claim loaded goes again.
                self.evict(&key.tenant, &key.client_id, conn_id, true).await;
                return Err(superseded());
            }
            if self.draining.load(Ordering::Acquire) {
                // The drain started while this CONNECT registered: it must not attach after
                // the drain let go of the sessions.
                drop(map);
                return Err(ClusterError::Unavailable(DRAINING.into()));
            }
            let existing = map.get(&key).map(|b| b.0.clone());
            // A newer connection of the device attached here while this one was registering:
            // the client has moved on, and this one must not kick it out.
            if existing
                .as_ref()
                .is_some_and(|old| old.state.lock().newest_conn > conn_id)
            {
                return Err(superseded());
            }
            let mut resumed = None;
            let mut was_persistent = false;
            if let Some(old) = existing {
                let mut st = old.state.lock();
                let resume = !clean_start && st.expiry_secs > 0;
                was_persistent = st.persistent;
                if let Some(k) = st.kick.take() {
                    let _ = k.send(Kick::TakenOver {
                        session_continues: resume,
                    });
                }
                st.conn = None;
                st.generation += 1;
                st.cancel_timers();
                let will = st.pending_will.take();
                if !resume {
                    old_will = will;
                }
                if resume {
                    st.conn = Some(conn_id);
                    st.home = home;
                    st.newest_conn = st.newest_conn.max(conn_id);
                    st.kick = kick_tx.take();
                    st.expiry_secs = expiry_secs;
                    if st.persistent != persistent {
                        track_persistent(&tenant, persistent);
                    }
                    st.persistent = persistent;
                    let subs: Vec<SubOptions> = st.subscriptions.values().cloned().collect();
                    drop(st);
                    resumed = Some((old.clone(), subs));
                } else {
                    let filters: Vec<String> = st.subscriptions.keys().cloned().collect();
                    st.reset();
                    st.ended = true;
                    drop(st);
                    if was_persistent {
                        track_persistent(&tenant, false);
                    }
                    self.remove_subscriptions(&tenant, &old, &filters);
                    map.remove(&key);
                    self.metrics.sessions.decrement(1.0);
                }
            }
            match resumed {
                Some((s, subs)) => (s, true, was_persistent, subs),
                None => {
                    let s = Session::new(self.next_id(), key.clone(), persistent, expiry_secs);
                    {
                        let mut st = s.state.lock();
                        st.conn = Some(conn_id);
                        st.home = home;
                        st.newest_conn = conn_id;
                        st.kick = kick_tx.take();
                        st.generation = 1;
                    }
                    map.replace(ByKey(s.clone()));
                    self.metrics.sessions.increment(1.0);
                    if persistent {
                        track_persistent(&tenant, true);
                    }
                    (s, false, was_persistent, Vec::new())
                }
            }
        };
        if let Some(msg) = old_will {
            // The previous session ends with this clean start: its delayed will is due now.
            self.publish_detached(tenant.clone(), msg);
        }
        if persistent {
            if !present {
                session.state.lock().durable_from = self.durable.applied_index_of(&key);
            }
            let record = SessionRecord {
                expiry_secs,
                protocol,
                disconnected_at_ms: None,
                subscriptions: subs,
            };
            let hold = self.cluster.hold_command(&key);
            self.durable
                .propose(Command::PutSession {
                    key,
                    record,
                    fresh: !present,
                })
                .await?;
            if let Some(h) = hold {
                self.durable.propose_nowait(h);
            }
        } else if was_persistent {
            self.durable.propose(Command::DeleteSession { key }).await?;
        }
        self.cluster.attached(view);
        Ok(Attached {
            session,
            tenant,
            session_present: present,
            kick: kick_rx,
        })
    }

    /// Releases a session whose CONNECT failed after `attach` placed it (a failed commit):
    /// it no longer counts as connected, so it can expire or be taken by the next CONNECT.
    pub fn abandon(&self, key: &SessionKey, conn_id: u64) {
        let session = self.sessions.lock().get(key).map(|b| b.0.clone());
        if let Some(session) = session {
            let mut st = session.state.lock();
            if st.conn == Some(conn_id) {
                st.conn = None;
                st.kick = None;
            }
        }
    }

    /// Detaches a connection that ended. Ends the session when its expiry is 0, otherwise
    /// starts its expiry clock. Returns false when the connection had already been taken over.
    pub fn detach(
        self: &Arc<Self>,
        tenant: &Arc<Tenant>,
        session: &Arc<Session>,
        conn_id: u64,
        expiry: Option<u32>,
    ) -> bool {
        let mut st = session.state.lock();
        if st.conn != Some(conn_id) {
            return false;
        }
        st.conn = None;
        st.kick = None;
        let changed = expiry.is_some_and(|e| e != st.expiry_secs);
        if let Some(e) = expiry {
            st.expiry_secs = e;
        }
        let expiry = st.expiry_secs;
        let generation = st.generation;
        if expiry > 0 && st.persistent {
            // Proposed under the session lock, so a resuming CONNECT's PutSession (proposed
            // after it takes this lock) is always applied after it, never before.
            let key = session.key.clone();
            let at_ms = Some(now_ms());
            self.durable.propose_nowait(if changed {
                // MQTT 5 DISCONNECT changed the expiry: make the new one durable too (only
                // v5 can do this; the stored subscriptions are kept by the merge).
                Command::PutSession {
                    key,
                    record: SessionRecord {
                        expiry_secs: expiry,
                        protocol: 5,
                        disconnected_at_ms: at_ms,
                        subscriptions: Vec::new(),
                    },
                    fresh: false,
                }
            } else {
                Command::SetDisconnected { key, at_ms }
            });
        }
        drop(st);
        if expiry == 0 {
            self.end_session(tenant, session, Some(generation));
            return true;
        }
        self.schedule_expiry(tenant.clone(), session.clone(), generation, expiry);
        true
    }

    fn schedule_expiry(
        self: &Arc<Self>,
        tenant: Arc<Tenant>,
        session: Arc<Session>,
        generation: u64,
        secs: u32,
    ) {
        if secs == u32::MAX {
            return;
        }
        let broker = self.clone();
        let task = session.clone();
        let handle = tokio::spawn(async move {
            let session = task;
            tokio::time::sleep(Duration::from_secs(secs as u64)).await;
            tracing::debug!(client = %session.key.client_id, "session expiry due");
            // end_session re-checks under the locks: a client may resume at this very moment.
            broker.end_session(&tenant, &session, Some(generation));
        });
        if let Some(old) = session
            .state
            .lock()
            .expiry_timer
            .replace(handle.abort_handle())
        {
            old.abort();
        }
    }

    /// Removes a session and everything it holds, in memory and durably. With `expected`, only
    /// if the session is still disconnected at that generation: checked under the map lock and
    /// the session lock (the order `attach` takes them), so a client resuming at the same
    /// moment keeps its session.
    fn end_session(
        self: &Arc<Self>,
        tenant: &Arc<Tenant>,
        session: &Arc<Session>,
        expected: Option<u64>,
    ) {
        let (filters, will) = {
            let mut map = self.sessions.lock();
            let mut st = session.state.lock();
            if let Some(generation) = expected {
                if st.conn.is_some() || st.generation != generation {
                    return;
                }
            }
            let filters: Vec<String> = st.subscriptions.keys().cloned().collect();
            st.reset();
            st.generation += 1;
            st.cancel_timers();
            st.ended = true;
            let will = st.pending_will.take();
            let persistent = st.persistent;
            let newest_conn = st.newest_conn;
            let home = st.home;
            drop(st);
            if map.get(&session.key).map(|s| s.0.id) == Some(session.id) {
                map.remove(&session.key);
                self.metrics.sessions.decrement(1.0);
                self.cluster.unregister(
                    &session.key.tenant,
                    &session.key.client_id,
                    newest_conn,
                    home,
                );
                if persistent {
                    track_persistent(tenant, false);
                    self.durable.propose_nowait(Command::DeleteSession {
                        key: session.key.clone(),
                    });
                    if let Some(r) = self.cluster.release_command(&session.key) {
                        self.durable.propose_nowait(r);
                    }
                }
            }
            (filters, will)
        };
        self.remove_subscriptions(tenant, session, &filters);
        if let Some(msg) = will {
            self.publish_detached(tenant.clone(), msg);
        }
    }

    // ----- subscriptions --------------------------------------------------------------------

    /// Adds (or replaces) a subscription. Returns whether it existed before. The filter has
    /// been validated by the caller.
    pub fn subscribe(&self, tenant: &Tenant, session: &Arc<Session>, opts: SubOptions) -> bool {
        let (share, inner) = split_share(&opts.filter);
        let key = SubKey {
            session: session.clone(),
            share,
        };
        let existed = session
            .state
            .lock()
            .subscriptions
            .insert(opts.filter.clone(), opts.clone())
            .is_some();
        // A downstream (device interface) filter matches only messages addressed to this
        // device (`send_downstream`), never the tenant's free-form publishes.
        if acl::classify_filter(&inner) != FilterClass::Downstream {
            // The route other nodes learn is the filter as subscribed: a shared one keeps its
            // group, so they can pick one node per group.
            let route = opts.filter.clone();
            if tenant.subs.write().insert(&inner, key, opts).is_none() {
                self.cluster.route_added(&tenant.name, &route);
            }
            if !existed {
                self.metrics.subscriptions.increment(1.0);
                tenant.usage.subscriptions.fetch_add(1, Ordering::Relaxed);
            }
        }
        existed
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&self, tenant: &Tenant, session: &Arc<Session>, filter: &str) -> bool {
        let existed = session.state.lock().subscriptions.remove(filter).is_some();
        if existed {
            self.remove_subscriptions(tenant, session, &[filter.to_string()]);
        }
        existed
    }

    fn remove_subscriptions(&self, tenant: &Tenant, session: &Arc<Session>, filters: &[String]) {
        if filters.is_empty() {
            return;
        }
        let mut trie = tenant.subs.write();
        for f in filters {
            let (share, inner) = split_share(f);
            if trie
                .remove(
                    &inner,
                    &SubKey {
                        session: session.clone(),
                        share,
                    },
                )
                .is_some()
            {
                self.cluster.route_removed(&tenant.name, f);
                self.metrics.subscriptions.decrement(1.0);
                tenant.usage.subscriptions.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    // ----- routing --------------------------------------------------------------------------

    /// Finds the sessions a message goes to: one entry per session at the highest granted QoS
    /// with all matching subscription identifiers (MQTT-3.3.5-1), one member per share group.
    pub fn route(&self, tenant: &Tenant, msg: &Arc<Message>, publisher: Option<u64>) -> Prepared {
        self.route_in(tenant, msg, publisher, None)
    }

    /// [`route`](Self::route), with the shared subscriptions decided cluster-wide: each
    /// matching group is served by one node, picked in turn among the nodes with members of
    /// it; `only_shares` (a forwarded message) names the groups this node was picked for.
    pub fn route_in(
        &self,
        tenant: &Tenant,
        msg: &Arc<Message>,
        publisher: Option<u64>,
        only_shares: Option<&[String]>,
    ) -> Prepared {
        let mut out: Vec<Match> = Vec::new();
        let mut share_remote: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
        if acl::classify_topic(&msg.topic) != TopicClass::Free {
            // Reserved topics never reach the tenant's trie (a `#` must not see another
            // device's SmartREST traffic); wills on them included.
            return Prepared {
                msg: msg.clone(),
                matches: out,
                device_api: true,
                remote: false,
                share_remote,
                shares_served: Vec::new(),
            };
        }
        // (group, filter, members): one pick per group and filter.
        type ShareGroup = (Arc<str>, String, Vec<(Arc<Session>, SubOptions)>);
        let mut shared: Vec<ShareGroup> = Vec::new();
        let mut group_index: HashMap<(Arc<str>, String), usize> = HashMap::new();
        tenant
            .subs
            .read()
            .for_each_match(&msg.topic, |filter, key, opts| {
                if opts.no_local && Some(key.session.id) == publisher {
                    return;
                }
                match &key.share {
                    None => out.push(Match {
                        session: key.session.clone(),
                        qos: msg.qos.min(opts.qos),
                        retain: opts.retain_as_published && msg.retain,
                        sub_ids: opts.subscription_id.into_iter().collect(),
                        durable: false,
                    }),
                    Some(group) => {
                        // Members of one group and filter usually come one after another; the
                        // index keeps many groups from making this quadratic.
                        let pos = match shared.last() {
                            Some((g, f, _)) if g == group && f == filter => Some(shared.len() - 1),
                            _ => group_index
                                .get(&(group.clone(), filter.to_string()))
                                .copied(),
                        };
                        let i = match pos {
                            Some(i) => i,
                            None => {
                                shared.push((group.clone(), filter.to_string(), Vec::new()));
                                group_index
                                    .insert((group.clone(), filter.to_string()), shared.len() - 1);
                                shared.len() - 1
                            }
                        };
                        if let Some(entry) = shared.get_mut(i) {
                            entry.2.push((key.session.clone(), opts.clone()));
                        }
                    }
                }
            });
        // Groups with members on other nodes: one node per group serves each message.
        let mut remote_shares = match only_shares {
            None => self.cluster.remote_shares(&tenant.name, &msg.topic),
            Some(_) => HashMap::new(),
        };
        let track_served =
            only_shares.is_none() && self.cluster.has_persistent_shares(&tenant.name);
        let mut shares_served = Vec::new();
        for (group, filter, members) in shared {
            if members.is_empty() {
                continue;
            }
            if track_served {
                shares_served.push(format!("{group}/{filter}"));
            }
            // One turn per message and group picks the node and then the member there, so
            // nodes and members alternate evenly.
            let mut turn = tenant.next_share();
            // Named only in a cluster with other members of shared groups (an allocation).
            let share_key = (only_shares.is_some() || !remote_shares.is_empty())
                .then(|| format!("{group}/{filter}"));
            match (only_shares, share_key) {
                (Some(only), Some(k)) if !only.contains(&k) => continue,
                (Some(_), _) | (None, None) => {}
                (None, Some(share_key)) => {
                    if let Some(nodes) = remote_shares.remove(&share_key) {
                        let mut candidates: Vec<u64> = nodes.into_iter().collect();
                        candidates.push(self.cluster.id);
                        let pick = candidates[turn % candidates.len()];
                        if pick != self.cluster.id {
                            share_remote.entry(pick).or_default().push(share_key);
                            continue;
                        }
                        turn /= candidates.len();
                    }
                }
            }
            let start = turn % members.len();
            // Prefer a member that is connected, so a shared message does not sit in the queue
            // of an offline session while others could take it.
            let pick = (0..members.len())
                .map(|i| &members[(start + i) % members.len()])
                .find(|(s, _)| s.state.lock().conn.is_some())
                .unwrap_or(&members[start]);
            out.push(Match {
                session: pick.0.clone(),
                qos: msg.qos.min(pick.1.qos),
                retain: pick.1.retain_as_published && msg.retain,
                sub_ids: pick.1.subscription_id.into_iter().collect(),
                durable: false,
            });
        }
        if out.len() > 1 {
            out.sort_unstable_by_key(|m| m.session.id);
            out.dedup_by(|later, kept| {
                if later.session.id != kept.session.id {
                    return false;
                }
                kept.qos = kept.qos.max(later.qos);
                kept.retain |= later.retain;
                kept.sub_ids.append(&mut later.sub_ids);
                true
            });
        }
        for m in &mut out {
            m.durable = m.qos > 0 && {
                let st = m.session.state.lock();
                st.persistent && st.queue.len() < self.cfg.max_queued_messages
            };
        }
        // Groups with no member here: one of the nodes that have some.
        for (share_key, nodes) in remote_shares {
            let nodes: Vec<u64> = nodes.into_iter().collect();
            if nodes.is_empty() {
                continue;
            }
            if track_served {
                shares_served.push(share_key.clone());
            }
            let pick = nodes[tenant.next_share() % nodes.len()];
            share_remote.entry(pick).or_default().push(share_key);
        }
        Prepared {
            msg: msg.clone(),
            matches: out,
            device_api: false,
            remote: false,
            share_remote,
            shares_served,
        }
    }

    /// The durable command for a prepared message, if any target needs one (or the publisher's
    /// inbound QoS 2 packet id must be recorded).
    pub fn publish_command(
        &self,
        prepared: &Prepared,
        publisher: Option<&SessionKey>,
        inbound: Option<(SessionKey, u16)>,
    ) -> Option<Command> {
        let targets: Vec<Target> = prepared
            .matches
            .iter()
            .filter(|m| m.durable)
            .map(|m| Target {
                key: m.session.key.clone(),
                qos: m.qos,
                retain: m.retain,
                subscription_ids: m.sub_ids.clone(),
            })
            .collect();
        if targets.is_empty() && inbound.is_none() {
            return None;
        }
        Some(Command::Publish {
            message: prepared.msg.to_stored(publisher.cloned()),
            targets,
            inbound,
        })
    }

    /// Hands a routed message to its sessions. `seqs` are the durable sequence numbers of the
    /// durable targets in order (from the commit's response).
    pub fn deliver(&self, prepared: Prepared, seqs: &[u64]) -> usize {
        let mut seqs = seqs.iter();
        let mut delivered = 0;
        for m in prepared.matches {
            let seq = if m.durable {
                seqs.next().copied().filter(|s| *s != u64::MAX)
            } else {
                None
            };
            if m.durable && seq.is_none() {
                continue;
            }
            let d = Delivery {
                msg: prepared.msg.clone(),
                qos: m.qos,
                retain: m.retain,
                sub_ids: m.sub_ids,
                seq,
                dup: false,
            };
            if self.enqueue(&m.session, d) {
                delivered += 1;
            }
        }
        delivered
    }

    /// Queues one delivery on a session and wakes its connection. Returns false if dropped.
    pub fn enqueue(&self, session: &Arc<Session>, d: Delivery) -> bool {
        let seq = d.seq;
        let outcome = session
            .state
            .lock()
            .enqueue(d, self.cfg.max_queued_messages);
        match outcome {
            Enqueue::Queued { wake } => {
                if wake {
                    session.notify.notify_one();
                }
                true
            }
            Enqueue::Full | Enqueue::Offline | Enqueue::Ended => {
                metrics::dropped(
                    match outcome {
                        Enqueue::Full => "queue_full",
                        Enqueue::Offline => "qos0_offline",
                        _ => "session_ended",
                    },
                    1,
                );
                if let Some(seq) = seq {
                    self.durable.propose_nowait(Command::Ack {
                        key: session.key.clone(),
                        seq,
                    });
                }
                false
            }
        }
    }

    /// Delivers a message addressed to one device (`s/dcr`, `s/dat`, `s/e`, ...) on the
    /// downstream subscriptions it holds, at the highest QoS it subscribed with. Not durable:
    /// such answers are produced again on the device's next request. Returns false if the
    /// device holds no matching subscription.
    pub fn send_downstream(
        &self,
        session: &Arc<Session>,
        topic: &str,
        payload: bytes::Bytes,
    ) -> bool {
        let qos = {
            let st = session.state.lock();
            // Only the device's downstream filters: a free-form `#` of the device is not a
            // subscription to what the platform sends it.
            st.subscriptions
                .values()
                .filter(|o| acl::classify_filter(&o.filter) == FilterClass::Downstream)
                .filter(|o| fleetmq_protocol::topic::matches(&o.filter, topic))
                .map(|o| o.qos)
                .max()
        };
        let Some(qos) = qos else {
            metrics::dropped("downstream_not_subscribed", 1);
            return false;
        };
        let msg = Message::new(
            topic.to_string(),
            payload,
            qos,
            false,
            fleetmq_protocol::PublishProps::default(),
        );
        self.enqueue(
            session,
            Delivery {
                msg,
                qos,
                retain: false,
                sub_ids: Vec::new(),
                seq: None,
                dup: false,
            },
        )
    }

    /// Updates the retained message of a topic; returns the durable command for it.
    pub fn retain(&self, tenant: &Tenant, msg: &Arc<Message>) -> Command {
        let mut retained = tenant.retained.write();
        if msg.payload.is_empty() {
            if retained.remove(&msg.topic).is_some() {
                self.metrics.retained.decrement(1.0);
            }
            Command::SetRetained {
                tenant: tenant.name.clone(),
                topic: msg.topic.clone(),
                message: None,
            }
        } else {
            if retained.insert(msg.topic.clone(), msg.clone()).is_none() {
                self.metrics.retained.increment(1.0);
            }
            Command::SetRetained {
                tenant: tenant.name.clone(),
                topic: msg.topic.clone(),
                message: Some(msg.to_stored(None)),
            }
        }
    }

    /// Publishes a message that has no connection waiting on it (a will): commit, then deliver.
    pub fn publish_detached(self: &Arc<Self>, tenant: Arc<Tenant>, msg: Arc<Message>) {
        // A will on a reserved topic is never retained: the retained set is the tenant's
        // free-form space, and a `#` must not read device traffic out of it (§1.10).
        let retain_cmd = (msg.retain && acl::classify_topic(&msg.topic) == TopicClass::Free)
            .then(|| self.retain(&tenant, &msg));
        let prepared = self.route(&tenant, &msg, None);
        if !prepared.device_api {
            let mut remote = self.cluster.remote_nodes(&tenant.name, &msg.topic);
            remote.extend(prepared.share_remote.keys());
            if !remote.is_empty() {
                tokio::spawn(self.cluster.forward(
                    &remote,
                    &prepared.share_remote,
                    &tenant.name,
                    &msg,
                ));
            }
        }
        let cmd = self.publish_command(&prepared, None, None);
        let (enqueue, share_enqueue) = if prepared.device_api || self.cluster.is_alone() {
            (None, None)
        } else {
            let served = &prepared.shares_served;
            (
                self.orphan_command(&tenant, &msg, None),
                self.share_orphan_command(&tenant, &msg, None, |k| served.iter().any(|s| s == k)),
            )
        };
        if retain_cmd.is_none() && cmd.is_none() && enqueue.is_none() && share_enqueue.is_none() {
            self.deliver(prepared, &[]);
            return;
        }
        let broker = self.clone();
        tokio::spawn(async move {
            if let Some(rc) = retain_cmd {
                broker.durable.propose_nowait(rc);
            }
            for e in [enqueue, share_enqueue].into_iter().flatten() {
                broker.durable.propose_nowait(e);
            }
            let seqs = match cmd {
                Some(c) => match broker.durable.propose(c).await {
                    Ok(Response::Published { seqs }) => seqs,
                    Ok(_) => Vec::new(),
                    Err(e) => {
                        tracing::error!(error = %e, "durable publish of a will failed");
                        return;
                    }
                },
                None => Vec::new(),
            };
            broker.deliver(prepared, &seqs);
        });
    }

    // ----- cluster ----------------------------------------------------------------------------

    /// Publishes a message another node forwarded: to this node's subscribers only (never
    /// forwarded again, and never retained again: the retained set is replicated). Persistent
    /// sessions got their QoS 1/2 copy through Raft from the publishing node (`Enqueue`, added
    /// here when applied), except through shared subscriptions, which that path skips: those
    /// are queued here. The proposal is made at the first poll, so futures polled in order
    /// commit in order.
    pub fn publish_forwarded(
        self: &Arc<Self>,
        tenant: &str,
        msg: Arc<Message>,
        shares: Vec<String>,
    ) -> impl std::future::Future<Output = Result<(), ClusterError>> + Send + 'static {
        let t = self.tenant(tenant);
        let mut prepared = self.route_in(&t, &msg, None, Some(&shares));
        prepared.matches.retain(|m| {
            if m.qos == 0 {
                return true;
            }
            let st = m.session.state.lock();
            !st.persistent
                || !st.subscriptions.keys().any(|f| {
                    !f.starts_with("$share/") && fleetmq_protocol::topic::matches(f, &msg.topic)
                })
        });
        let cmd = self.publish_command(&prepared, None, None);
        let broker = self.clone();
        async move {
            let seqs = match cmd {
                Some(c) => match broker.durable.propose(c).await? {
                    Response::Published { seqs } => seqs,
                    _ => Vec::new(),
                },
                None => Vec::new(),
            };
            broker.deliver(prepared, &seqs);
            Ok(())
        }
    }

    /// Before a connection attaches here: registers the device with its home node (which
    /// makes any other node holding the session let go of it) and, when the session lives in
    /// durable state but not in this node's memory, loads it (or deletes it on a clean start)
    /// after a read barrier, so nothing the other node committed is missed.
    async fn claim(
        self: &Arc<Self>,
        key: &SessionKey,
        conn_id: u64,
        clean_start: bool,
    ) -> Result<u64, ClusterError> {
        if self.cluster.is_alone() {
            return Ok(0);
        }
        let Registered { prev, home } = self
            .cluster
            .register(&key.tenant, &key.client_id, conn_id, clean_start)
            .await;
        self.check_fence(key, conn_id)?;
        if self.sessions.lock().get(key).is_some() {
            return Ok(home); // here already: a local takeover, `attach` does the rest
        }
        if prev.is_none() && !clean_start {
            // No node is on record (the home restarted, or a first connection since): make
            // sure no other node still holds the session in memory before it moves here.
            self.cluster
                .takeover_everywhere(&key.tenant, &key.client_id)
                .await;
        }
        if !clean_start {
            // On record as the holder before the session is read (and its routes announced):
            // from then on, publishers queue for it through Raft instead of as an orphan...
            if let Some(h) = self.cluster.hold_command(key) {
                self.durable.propose(h).await?;
            }
        }
        if prev.is_some() || !clean_start {
            self.durable.read_barrier_for(key).await?;
        }
        // ...and what was queued through Raft after this index is added when applied here.
        let from = self.durable.applied_index_of(key);
        let Some(rs) = self.durable.session(key)? else {
            return Ok(home);
        };
        if clean_start {
            self.durable
                .propose(Command::DeleteSession { key: key.clone() })
                .await?;
        } else if self.sessions.lock().get(key).is_none() {
            self.restore(vec![rs], Vec::new());
            if let Some(s) = self.sessions.lock().get(key) {
                s.0.state.lock().durable_from = from;
            }
            metrics::counter_session_moved();
        }
        Ok(home)
    }

    /// True when this node has the session in memory.
    pub fn holds(&self, key: &SessionKey) -> bool {
        self.sessions.lock().get(key).is_some()
    }

    /// Refuses a connection that a takeover (for a newer connection elsewhere) superseded
    /// while it registered, before it loads anything.
    fn check_fence(&self, key: &SessionKey, conn_id: u64) -> Result<(), ClusterError> {
        let mut fences = self.fences.lock();
        // Usually empty: no key to build. `attach` checks again under the sessions lock.
        if fences.is_empty()
            || fences.may_attach(&(key.tenant.clone(), key.client_id.clone()), conn_id)
        {
            return Ok(());
        }
        Err(superseded())
    }

    /// The durable command queueing a QoS 1/2 message for the matching persistent sessions
    /// this node does not hold (see `Cluster::orphan_targets`), if there are any.
    pub fn orphan_command(
        &self,
        tenant: &Tenant,
        msg: &Message,
        publisher: Option<&SessionKey>,
    ) -> Option<Command> {
        let targets = self.cluster.orphan_targets(
            &tenant.name,
            &msg.topic,
            msg.qos,
            msg.retain,
            publisher,
            |k| self.sessions.lock().get(k).is_some(),
        );
        enqueue_command(msg, publisher, targets)
    }

    /// The durable command queueing a QoS 1/2 message for one persistent member of each
    /// shared-subscription group that `skip` does not name (the groups a live node serves), if
    /// there are any: a group whose members' node died, or whose members no node holds, gets
    /// the message in one member's session instead of losing it.
    pub fn share_orphan_command(
        &self,
        tenant: &Tenant,
        msg: &Message,
        publisher: Option<&SessionKey>,
        skip: impl Fn(&str) -> bool,
    ) -> Option<Command> {
        if !self.cluster.has_persistent_shares(&tenant.name) {
            return None;
        }
        let targets = self.cluster.share_targets(
            &tenant.name,
            &msg.topic,
            msg.qos,
            msg.retain,
            tenant.next_share(),
            skip,
        );
        enqueue_command(msg, publisher, targets)
    }

    /// After forwarding to `failed` nodes failed: they count as down until they answer again.
    /// Persistent sessions do not depend on forwards (the publishing node queues for them
    /// through Raft); what is lost is live delivery to clean sessions there.
    pub fn forward_failed(&self, failed: &std::collections::BTreeSet<u64>) {
        self.cluster.mark_down(failed);
        metrics::dropped("forward_failed", failed.len() as u64);
    }

    /// A delivery queued through Raft for a session (by a node that thought it orphaned):
    /// added to the session if this node holds it and loaded it before that entry.
    /// Of a publish with the publisher's inbound id, only the targets marked `false`: the
    /// proposing node delivers the others itself.
    pub fn observe_enqueue(&self, index: u64, cmd: &Command, resp: &Response) {
        match (cmd, resp) {
            (Command::Enqueue { message, targets }, Response::Published { seqs })
            | (
                Command::EnqueueOnce {
                    message, targets, ..
                },
                Response::Published { seqs },
            ) => {
                self.deliver_applied(index, message, targets.iter().zip(seqs));
            }
            (
                Command::PublishOutbox {
                    message, targets, ..
                },
                Response::Outboxed { seqs, .. },
            ) => {
                let observed = targets
                    .iter()
                    .zip(seqs)
                    .filter(|((_, delivered), _)| !delivered)
                    .map(|((t, _), seq)| (t, seq));
                self.deliver_applied(index, message, observed);
            }
            _ => {}
        }
    }

    /// Queues an applied delivery for each `(target, seq)` this node holds and loaded before
    /// entry `index` (and has not got already).
    fn deliver_applied<'a>(
        &self,
        index: u64,
        message: &fleetmq_storage::StoredMessage,
        targets: impl Iterator<Item = (&'a Target, &'a u64)>,
    ) {
        let mut msg = None;
        for (t, seq) in targets {
            if *seq == fleetmq_storage::NO_SESSION_SEQ {
                continue;
            }
            let Some(session) = self.sessions.lock().get(&t.key).map(|b| b.0.clone()) else {
                continue;
            };
            {
                let st = session.state.lock();
                if st.durable_from >= index || st.has_seq(*seq) {
                    continue;
                }
            }
            let m = msg
                .get_or_insert_with(|| Message::from_stored(message.clone()))
                .clone();
            self.enqueue(
                &session,
                Delivery {
                    msg: m,
                    qos: t.qos,
                    retain: t.retain,
                    sub_ids: t.subscription_ids.clone(),
                    seq: Some(*seq),
                    dup: false,
                },
            );
        }
    }

    /// Delivers `msg` to the session of one device held here, if it is connected and has a
    /// plain subscription matching the topic: at the highest QoS granted, with every matching
    /// subscription id. In memory only (a persistent session gets its QoS 1/2 copy through
    /// Raft instead: `Cluster::push_to_device`). True when queued for the client.
    pub fn deliver_to_session(self: &Arc<Self>, key: &SessionKey, msg: &Arc<Message>) -> bool {
        let Some(session) = self.sessions.lock().get(key).map(|b| b.0.clone()) else {
            return false;
        };
        if msg.topic == crate::device::deliver::OPERATION_TOPIC {
            // An operation for the device: expanded here, where its subscriptions are known.
            return match serde_json::from_slice(&msg.payload) {
                Ok(op) => crate::device::deliver::to_session(self, &session, &op),
                Err(_) => false,
            };
        }
        let (qos, retain, sub_ids) = {
            let st = session.state.lock();
            if st.conn.is_none() {
                return false;
            }
            let mut best: Option<(u8, bool, Vec<u32>)> = None;
            for sub in st.subscriptions.values() {
                if sub.filter.starts_with("$share/")
                    || !fleetmq_protocol::topic::matches(&sub.filter, &msg.topic)
                {
                    continue;
                }
                let b = best.get_or_insert((0, false, Vec::new()));
                b.0 = b.0.max(msg.qos.min(sub.qos));
                b.1 |= sub.retain_as_published && msg.retain;
                b.2.extend(sub.subscription_id);
            }
            match best {
                Some(b) => b,
                None => return false,
            }
        };
        self.enqueue(
            &session,
            Delivery {
                msg: msg.clone(),
                qos,
                retain,
                sub_ids,
                seq: None,
                dup: false,
            },
        )
    }

    /// Every device connected here, with its newest connection: `(tenant, device, conn)`
    /// (re-announced to the devices' homes when the cluster's view changes).
    pub fn attached_connections(&self) -> Vec<(String, String, u64, u64)> {
        self.sessions
            .lock()
            .iter()
            .filter_map(|b| {
                let st = b.0.state.lock();
                st.conn.map(|c| {
                    (
                        b.0.key.tenant.to_string(),
                        b.0.key.client_id.to_string(),
                        c,
                        st.home,
                    )
                })
            })
            .collect()
    }

    /// Records `home` as the node holding the registry record of connection `conn`, if that
    /// connection is still the one attached.
    pub fn set_home(&self, tenant: &str, device: &str, conn: u64, home: u64) {
        let key = SessionKey::new(tenant, device);
        if let Some(s) = self.sessions.lock().get(&key) {
            let mut st = s.0.state.lock();
            if st.conn == Some(conn) {
                st.home = home;
            }
        }
    }

    /// Records this node as the holder of every persistent session it has in memory (those
    /// it took while it was alone have none on record).
    pub fn hold_all(&self) {
        let keys: Vec<SessionKey> = self
            .sessions
            .lock()
            .iter()
            .filter(|b| b.0.state.lock().persistent)
            .map(|b| b.0.key.clone())
            .collect();
        for key in keys {
            if let Some(c) = self.cluster.hold_command(&key) {
                self.durable.propose_nowait(c);
            }
        }
    }

    /// Lets go of a device's session because another node takes it over: its connection is
    /// closed (DISCONNECT 0x8E), its subscriptions leave this node's routes, and it leaves
    /// memory but not durable state. Returns once everything this node proposed for it is
    /// committed. False when the session is not here.
    pub async fn evict(
        self: &Arc<Self>,
        tenant: &str,
        device: &str,
        conn: u64,
        session_continues: bool,
    ) -> bool {
        let key = SessionKey::new(tenant, device);
        let (session, persistent, filters, will) = {
            let mut map = self.sessions.lock();
            let session = map.get(&key).map(|b| b.0.clone());
            let newest = session
                .as_ref()
                .map(|s| s.state.lock().newest_conn)
                .filter(|n| *n > 0);
            let fence = (tenant.to_string(), device.to_string());
            if !self
                .fences
                .lock()
                .on_takeover(&fence, conn, newest, now_ms())
            {
                ::metrics::counter!("fleetmq_cluster_stale_takeovers_total").increment(1);
                return false; // the device came back here since: the takeover is stale
            }
            let Some(session) = session else {
                return false;
            };
            let mut st = session.state.lock();
            // The session goes on on the new connection only if it was persistent and the new
            // one resumes it; otherwise it ends here (and the connection's will is due).
            let continues = session_continues && st.persistent && st.expiry_secs > 0;
            if let Some(k) = st.kick.take() {
                let _ = k.send(Kick::TakenOver {
                    session_continues: continues,
                });
            }
            st.conn = None;
            st.generation += 1;
            st.cancel_timers();
            // A delayed will of a disconnected session: cancelled when the session goes on
            // elsewhere, due now when it ends (a clean start took over).
            let will = st.pending_will.take().filter(|_| !continues);
            let filters: Vec<String> = st.subscriptions.keys().cloned().collect();
            st.reset();
            st.ended = true;
            let persistent = st.persistent;
            drop(st);
            map.remove(&key);
            (session, persistent, filters, will)
        };
        self.metrics.sessions.decrement(1.0);
        let t = self.tenant(tenant);
        if persistent {
            track_persistent(&t, false);
        }
        self.remove_subscriptions(&t, &session, &filters);
        if let Some(w) = will {
            self.publish_detached(t.clone(), w);
        }
        if persistent {
            // FIFO through the proposer: once this commits, so has everything before it.
            if let Err(e) = self
                .durable
                .propose(Command::SetDisconnected {
                    key,
                    at_ms: Some(now_ms()),
                })
                .await
            {
                tracing::warn!(error = %e, "committing a session handed to another node failed");
            }
        }
        true
    }

    /// Mirrors retained-message changes applied through Raft (made on any node).
    pub fn observe_retained(&self, cmd: &Command) {
        let Command::SetRetained {
            tenant,
            topic,
            message,
        } = cmd
        else {
            return;
        };
        let t = self.tenant(tenant);
        let mut retained = t.retained.write();
        match message {
            Some(m) => {
                if retained
                    .insert(topic.clone(), Message::from_stored(m.clone()))
                    .is_none()
                {
                    self.metrics.retained.increment(1.0);
                }
            }
            None => {
                if retained.remove(topic).is_some() {
                    self.metrics.retained.decrement(1.0);
                }
            }
        }
    }

    /// Reloads every retained message (after a snapshot was installed).
    pub fn reload_retained(&self, all: Vec<(String, String, StoredMessage)>) {
        for t in self.tenants.read().values() {
            let n = std::mem::take(&mut *t.retained.write()).len();
            self.metrics.retained.decrement(n as f64);
        }
        for (tenant, topic, m) in all {
            self.observe_retained(&Command::SetRetained {
                tenant,
                topic,
                message: Some(m),
            });
        }
    }

    // ----- wills ----------------------------------------------------------------------------

    /// A will on `s/us` goes into the device's SmartREST pipeline (§1.10: e.g. a
    /// `400,c8y_ConnectionEvent,...` raises an event); any other is published.
    fn publish_will(
        self: &Arc<Self>,
        tenant: Arc<Tenant>,
        session: &Arc<Session>,
        msg: Arc<Message>,
    ) {
        if matches!(
            acl::classify_topic(&msg.topic),
            TopicClass::Upstream(acl::Upstream::Static | acl::Upstream::Json)
        ) {
            let owner = format!("device_{}", session.key.client_id);
            if let Some(work) =
                crate::device::publish(self, session, &owner, &msg.topic, &msg.payload, 0)
            {
                let client = session.key.client_id.clone();
                tokio::spawn(async move {
                    if let Err(e) = work.await {
                        tracing::warn!(error = %e, client = %client, "will into the device API failed");
                    }
                });
            }
            return;
        }
        self.publish_detached(tenant, msg);
    }

    /// Publishes a will now (`session_ends`, or no delay) or after its delay, which the session
    /// expiry bounds: the pending will is published by whichever of the delay timer or the end
    /// of the session comes first, and dropped if the client resumes the session before.
    pub fn schedule_will(
        self: &Arc<Self>,
        tenant: Arc<Tenant>,
        session: Arc<Session>,
        will: Will,
        session_ends: bool,
    ) {
        let msg = Message::new(will.topic, will.payload, will.qos, will.retain, will.props);
        if session_ends || will.delay_secs == 0 {
            self.publish_will(tenant, &session, msg);
            return;
        }
        let generation = {
            let mut st = session.state.lock();
            st.pending_will = Some(msg);
            st.generation
        };
        let broker = self.clone();
        let task = session.clone();
        let handle = tokio::spawn(async move {
            let session = task;
            tokio::time::sleep(Duration::from_secs(will.delay_secs as u64)).await;
            let due = {
                let mut st = session.state.lock();
                st.will_timer = None;
                if st.generation == generation && st.conn.is_none() {
                    st.pending_will.take()
                } else {
                    None
                }
            };
            if let Some(msg) = due {
                broker.publish_will(tenant, &session, msg);
            }
        });
        if let Some(old) = session
            .state
            .lock()
            .will_timer
            .replace(handle.abort_handle())
        {
            old.abort();
        }
    }

    // ----- recovery -------------------------------------------------------------------------

    /// Rebuilds sessions, subscriptions, queues and retained messages from durable state.
    pub fn restore(
        self: &Arc<Self>,
        sessions: Vec<RecoveredSession>,
        retained: Vec<(String, String, StoredMessage)>,
    ) {
        let now = now_ms();
        for (tenant, topic, m) in retained {
            let msg = Message::from_stored(m);
            if msg.is_expired(now) {
                continue;
            }
            self.tenant(&tenant).retained.write().insert(topic, msg);
            self.metrics.retained.increment(1.0);
        }
        let mut messages: HashMap<u64, Arc<Message>> = HashMap::new();
        let mut restored = 0usize;
        let applied = self.durable.applied();
        for rs in sessions {
            let expiry = rs.record.expiry_secs;
            let elapsed_ms = rs
                .record
                .disconnected_at_ms
                .map(|t| now.saturating_sub(t))
                .unwrap_or(0);
            if expiry != u32::MAX && elapsed_ms >= expiry as u64 * 1000 {
                self.durable
                    .propose_nowait(Command::DeleteSession { key: rs.key });
                continue;
            }
            let tenant = self.tenant(&rs.key.tenant);
            let session = Session::new(self.next_id(), rs.key.clone(), true, expiry);
            {
                let mut st: parking_lot::MutexGuard<'_, SessionState> = session.state.lock();
                st.generation = 1;
                // Entries replayed before this point are in the recovered state already.
                st.durable_from = applied.get(self.durable.group_of(&rs.key));
                for pid in rs.inbound_pids {
                    st.inbound_qos2.insert(pid, true);
                }
                for (seq, entry, stored) in rs.queue {
                    let msg = messages
                        .entry(entry.msg_id)
                        .or_insert_with(|| Message::from_stored(stored))
                        .clone();
                    let d = Delivery {
                        msg,
                        qos: entry.qos,
                        retain: entry.retain,
                        sub_ids: entry.subscription_ids,
                        seq: Some(seq),
                        dup: true,
                    };
                    match entry.state {
                        DeliveryState::Pending
                            if st.queue.len() >= self.cfg.max_queued_messages =>
                        {
                            // Publishes committed just before a crash may exceed the bound (it is
                            // checked at routing time); enforce it again, as live routing would.
                            metrics::dropped("queue_full", 1);
                            self.durable.propose_nowait(Command::Ack {
                                key: rs.key.clone(),
                                seq,
                            });
                        }
                        DeliveryState::Pending => st.queue.push_back(d),
                        DeliveryState::Released => st.restore_inflight(
                            SessionState::pid_for_seq(seq),
                            d,
                            InflightState::AwaitComp,
                        ),
                    }
                }
            }
            for sub in rs.record.subscriptions {
                self.subscribe(&tenant, &session, sub);
            }
            track_persistent(&tenant, true);
            self.sessions.lock().replace(ByKey(session.clone()));
            self.metrics.sessions.increment(1.0);
            let remaining = if expiry == u32::MAX {
                u32::MAX
            } else {
                ((expiry as u64 * 1000 - elapsed_ms) / 1000) as u32
            };
            self.schedule_expiry(tenant, session, 1, remaining.max(1));
            restored += 1;
        }
        tracing::info!(sessions = restored, "restored persistent sessions");
    }
}

/// Counts a persistent session of a tenant in (`true`) or out (`false`).
fn track_persistent(tenant: &Tenant, added: bool) {
    if added {
        tenant.usage.sessions.fetch_add(1, Ordering::Relaxed);
    } else {
        tenant.usage.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A session stored in the session map under its own key, so the key's strings are not
/// kept twice for every connected device.
#[derive(Debug, Clone)]
pub struct ByKey(pub Arc<Session>);

impl std::borrow::Borrow<SessionKey> for ByKey {
    fn borrow(&self) -> &SessionKey {
        &self.0.key
    }
}
impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}
impl Eq for ByKey {}
impl std::hash::Hash for ByKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Must hash exactly like `SessionKey` for `Borrow` lookups to work.
        self.0.key.hash(state);
    }
}

/// All sessions of this node.
pub type SessionMap = std::collections::HashSet<ByKey>;

/// Splits `$share/<group>/<filter>` into its group and inner filter.
pub fn split_share(filter: &str) -> (Option<Arc<str>>, String) {
    match parse_shared(filter) {
        Ok(Some((group, inner))) => (Some(Arc::from(group)), inner.to_string()),
        _ => (None, filter.to_string()),
    }
}

/// Microseconds since the epoch (connection ids start there).
pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A `Publish` that records the publisher's inbound QoS 2 id, with the `Enqueue`s of the
/// same message, as one `PublishOutbox` (the publish targets first, in order, marked as
/// delivered by this node; the enqueued ones after them). Any other publish is returned as is.
pub fn with_outbox(publish: Command, orphan: Option<Command>, share: Option<Command>) -> Command {
    let Command::Publish {
        message,
        targets,
        inbound: Some(inbound),
    } = publish
    else {
        return publish;
    };
    let mut all: Vec<(Target, bool)> = targets.into_iter().map(|t| (t, true)).collect();
    for c in [orphan, share].into_iter().flatten() {
        if let Command::Enqueue { targets, .. } = c {
            all.extend(targets.into_iter().map(|t| (t, false)));
        }
    }
    Command::PublishOutbox {
        message,
        inbound,
        targets: all,
        outbox: Vec::new(),
    }
}

/// `Enqueue` of `msg` for durable `targets` on other nodes (none: no command).
fn enqueue_command(
    msg: &Message,
    publisher: Option<&SessionKey>,
    targets: Vec<fleetmq_storage::records::Target>,
) -> Option<Command> {
    if targets.is_empty() {
        return None;
    }
    metrics::orphan_deliveries(targets.len());
    Some(Command::Enqueue {
        message: msg.to_stored(publisher.cloned()),
        targets,
    })
}

/// The error `attach` answers while the node is drained (CONNACK 0x9C).
pub const DRAINING: &str = "the node is drained";

/// The error of a connection that another, newer one superseded before it attached.
fn superseded() -> ClusterError {
    ClusterError::Unavailable("the session was taken over by a newer connection".into())
}
