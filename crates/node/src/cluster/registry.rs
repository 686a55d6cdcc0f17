//! The takeover protocol's decisions, free of I/O so that a seeded simulation can check them
//! (see the tests below): which node holds a device's session, and when a node lets go of it.
//!
//! The protocol: a node accepting a connection registers `(node, connection)` with the
//! device's home node ([`Registry::put`]); the home tells the previous holder on another node
//! to let go of that connection; only then does the new connection attach. Messages between
//! nodes are delayed and reordered, so a node also keeps [`Fences`]:
//! - a takeover aimed at an older connection than the one now attached is ignored (the device
//!   came back to this node in between: evicting would leave it with no connection at all);
//! - a takeover that arrives before its connection attached fences it, so that connection
//!   does not attach afterwards (it would be a second live connection).
//!
//! Connection ids come from one counter per node process, started from the clock (see
//! `Broker::new`), so ids of one node only grow, across restarts too.

use std::collections::HashMap;

/// `(tenant, device id)`.
pub type DeviceKey = (String, String);

/// A node and one of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub node: u64,
    pub conn: u64,
}

/// Connection id of a takeover that is not aimed at one connection (the home has no record
/// of the device, e.g. it restarted): whatever the node holds lets go.
pub const ANY_CONNECTION: u64 = 0;

/// What the home does with a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Recorded; no other node held the device.
    Done,
    /// Recorded; this holder on another node must let go first, then call
    /// [`Registry::takeover_done`].
    Takeover(Holder),
    /// A takeover for the device is still under way: try again once it is done (so a third
    /// connection cannot attach while the first is still live).
    Busy,
}

/// What the home does with a restored record (a node re-announcing a connection it holds,
/// after the home restarted or the device's home moved: see [`Registry::restore`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    /// On record now (or already).
    Kept,
    /// On record now; this holder on another node, an older connection, must let go first,
    /// then call [`Registry::takeover_done`].
    Takeover(Holder),
    /// Another node holds a newer connection of the device: the restoring node lets go.
    Superseded,
}

/// Home-node side: the holder of each device homed here.
#[derive(Debug, Default)]
pub struct Registry {
    holders: HashMap<DeviceKey, Holder>,
    busy: std::collections::HashSet<DeviceKey>,
}

impl Registry {
    /// Records `holder` as the device's holder, unless a takeover for it is under way. The
    /// previous holder is returned when it is on another node, which must let go of that
    /// connection (a previous connection on the same node is taken over by that node itself
    /// when the new one attaches).
    pub fn put(&mut self, key: DeviceKey, holder: Holder) -> Put {
        if self.busy.contains(&key) {
            return Put::Busy;
        }
        match self.holders.get(&key).copied() {
            Some(prev) if prev.node != holder.node => {
                self.holders.insert(key.clone(), holder);
                self.busy.insert(key);
                Put::Takeover(prev)
            }
            // Two registrations from one node can arrive out of order: the record keeps the
            // newer connection, which is the one a later takeover must be aimed at.
            Some(prev) if prev.conn > holder.conn => Put::Done,
            _ => {
                self.holders.insert(key, holder);
                Put::Done
            }
        }
    }

    /// Re-records a connection that `holder.node` already holds. A home that restarted, or
    /// became the device's home when membership or liveness changed, has no record of
    /// connections registered before; every node re-announces its attached connections then,
    /// and this settles a device that ended up live on two nodes meanwhile (a registration
    /// the home answered `Done` for lack of a record): the newer connection stays. Connection
    /// ids start from each node's clock, so across nodes "newer" is as good as the clocks.
    pub fn restore(&mut self, key: DeviceKey, holder: Holder) -> Restore {
        let prev = self.holders.get(&key).copied();
        if self.busy.contains(&key) {
            // The record is a registration taking over right now: newer than anything held.
            return if prev == Some(holder) {
                Restore::Kept
            } else {
                Restore::Superseded
            };
        }
        match prev {
            None => {
                self.holders.insert(key, holder);
                Restore::Kept
            }
            // Same node: it decides between its own connections (the newest attached).
            Some(p) if p.node == holder.node => {
                if holder.conn >= p.conn {
                    self.holders.insert(key, holder);
                }
                Restore::Kept
            }
            Some(p) if holder.conn > p.conn => {
                self.holders.insert(key.clone(), holder);
                self.busy.insert(key);
                Restore::Takeover(p)
            }
            Some(_) => Restore::Superseded,
        }
    }

    /// The takeover [`put`](Self::put) asked for has finished (or failed: the old holder is
    /// then assumed gone).
    pub fn takeover_done(&mut self, key: &DeviceKey) {
        self.busy.remove(key);
    }

    /// The session of `holder` ended: forgets the device unless a newer connection (or
    /// another node, or a takeover under way) is on record by now. True when forgotten.
    pub fn remove(&mut self, key: &DeviceKey, holder: Holder) -> bool {
        if self.busy.contains(key) {
            return false;
        }
        match self.holders.get(key) {
            Some(h) if h.node == holder.node && h.conn <= holder.conn => {
                self.holders.remove(key);
                true
            }
            _ => false,
        }
    }

    /// The device's holder on record.
    pub fn get(&self, key: &DeviceKey) -> Option<Holder> {
        self.holders.get(key).copied()
    }

    /// Forgets the devices held by nodes that are no longer members (their next connection is
    /// a first one as far as this home knows).
    pub fn retain_members(&mut self, members: &std::collections::HashSet<u64>) {
        self.holders.retain(|_, h| members.contains(&h.node));
    }

    /// `node` restarted at `since` (µs; connection ids are taken from the clock): its
    /// connections from before are gone, so their records go, unless a takeover of the
    /// device is under way.
    pub fn forget_before(&mut self, node: u64, since: u64) {
        let busy = &self.busy;
        self.holders
            .retain(|k, h| busy.contains(k) || h.node != node || h.conn >= since);
    }

    /// Devices on record.
    pub fn len(&self) -> usize {
        self.holders.len()
    }

    /// True when no device is on record.
    pub fn is_empty(&self) -> bool {
        self.holders.is_empty()
    }
}

/// Fences older than this are dropped once the table is large: a connection that has not
/// attached within it has long timed out at the client.
const FENCE_TTL_MS: u64 = 120_000;
/// Size above which old fences are pruned.
const FENCE_PRUNE_AT: usize = 4_096;

/// Node side: the newest connection of each device that a takeover was aimed at.
#[derive(Debug, Default)]
pub struct Fences {
    fenced: HashMap<DeviceKey, (u64, u64)>,
}

impl Fences {
    /// A takeover aimed at connection `conn` of the device arrived; `newest` is the newest
    /// connection this node attached to the device's session (if it has the session). True:
    /// let go of the session; false: ignore the takeover, it is stale.
    pub fn on_takeover(
        &mut self,
        key: &DeviceKey,
        conn: u64,
        newest: Option<u64>,
        now_ms: u64,
    ) -> bool {
        if conn == ANY_CONNECTION {
            return true;
        }
        if newest.is_some_and(|n| n > conn) {
            return false;
        }
        if self.fenced.len() >= FENCE_PRUNE_AT {
            self.fenced
                .retain(|_, (_, at)| now_ms.saturating_sub(*at) < FENCE_TTL_MS);
        }
        let e = self.fenced.entry(key.clone()).or_insert((conn, now_ms));
        if conn >= e.0 {
            *e = (conn, now_ms);
        }
        true
    }

    /// May connection `conn` attach to the device's session? False when a takeover aimed at
    /// it (or at a newer connection) already arrived.
    pub fn may_attach(&mut self, key: &DeviceKey, conn: u64) -> bool {
        match self.fenced.get(key) {
            Some((f, _)) if *f >= conn => false,
            Some(_) => {
                // Older than this connection: it can never matter again.
                self.fenced.remove(key);
                true
            }
            None => true,
        }
    }

    /// Fences held.
    pub fn len(&self) -> usize {
        self.fenced.len()
    }

    /// True when no fence is held.
    pub fn is_empty(&self) -> bool {
        self.fenced.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(d: u64) -> DeviceKey {
        ("t1".into(), format!("dev{d}"))
    }

    #[test]
    fn put_returns_the_holder_on_another_node_only() {
        let mut r = Registry::default();
        assert_eq!(r.put(key(1), Holder { node: 1, conn: 5 }), Put::Done);
        assert_eq!(r.put(key(1), Holder { node: 1, conn: 6 }), Put::Done);
        assert_eq!(
            r.put(key(1), Holder { node: 2, conn: 3 }),
            Put::Takeover(Holder { node: 1, conn: 6 })
        );
        assert_eq!(r.put(key(1), Holder { node: 3, conn: 1 }), Put::Busy);
        r.takeover_done(&key(1));
        assert_eq!(
            r.put(key(1), Holder { node: 3, conn: 1 }),
            Put::Takeover(Holder { node: 2, conn: 3 })
        );
        r.takeover_done(&key(1));
        // An ended session of an older holder does not remove the newer record.
        assert!(!r.remove(&key(1), Holder { node: 2, conn: 3 }));
        assert!(!r.remove(&key(1), Holder { node: 3, conn: 0 }));
        assert!(r.remove(&key(1), Holder { node: 3, conn: 1 }));
        assert!(r.is_empty());
        r.put(key(1), Holder { node: 3, conn: 1 });
        r.retain_members(&std::collections::HashSet::from([1, 2]));
        assert!(r.is_empty());
    }

    #[test]
    fn a_restarted_node_s_old_connections_are_forgotten() {
        let mut r = Registry::default();
        r.put(key(1), Holder { node: 2, conn: 50 });
        r.put(key(2), Holder { node: 2, conn: 150 });
        r.put(key(3), Holder { node: 3, conn: 10 });
        r.forget_before(2, 100);
        assert_eq!(r.get(&key(1)), None, "from before the restart");
        assert_eq!(r.get(&key(2)), Some(Holder { node: 2, conn: 150 }));
        assert_eq!(r.get(&key(3)), Some(Holder { node: 3, conn: 10 }));
    }

    #[test]
    fn restore_keeps_the_newer_connection() {
        let mut r = Registry::default();
        // Nothing on record (the home restarted): the holder is recorded as it is.
        assert_eq!(
            r.restore(key(1), Holder { node: 1, conn: 5 }),
            Restore::Kept
        );
        assert_eq!(r.get(&key(1)), Some(Holder { node: 1, conn: 5 }));
        // A newer connection on another node was registered meanwhile: the older one goes.
        assert_eq!(r.put(key(2), Holder { node: 2, conn: 9 }), Put::Done);
        assert_eq!(
            r.restore(key(2), Holder { node: 1, conn: 7 }),
            Restore::Superseded
        );
        assert_eq!(r.get(&key(2)), Some(Holder { node: 2, conn: 9 }));
        // An older one on record: the restored newer one takes over.
        assert_eq!(
            r.restore(key(2), Holder { node: 3, conn: 11 }),
            Restore::Takeover(Holder { node: 2, conn: 9 })
        );
        // While that takeover runs, anything else restored is older than the record.
        assert_eq!(
            r.restore(key(2), Holder { node: 1, conn: 12 }),
            Restore::Superseded
        );
        assert_eq!(
            r.restore(key(2), Holder { node: 3, conn: 11 }),
            Restore::Kept
        );
        r.takeover_done(&key(2));
        // Same node twice: the record keeps the newer, and nobody is told to let go.
        assert_eq!(
            r.restore(key(1), Holder { node: 1, conn: 4 }),
            Restore::Kept
        );
        assert_eq!(r.get(&key(1)), Some(Holder { node: 1, conn: 5 }));
    }

    #[test]
    fn stale_takeover_is_ignored_and_early_one_fences() {
        let mut f = Fences::default();
        // Newer connection 9 attached here: a takeover aimed at 4 is stale.
        assert!(!f.on_takeover(&key(1), 4, Some(9), 0));
        assert!(f.may_attach(&key(1), 10));
        // A takeover aimed at 12 before it attached: 12 may not attach, 13 may.
        assert!(f.on_takeover(&key(1), 12, Some(10), 0));
        assert!(!f.may_attach(&key(1), 12));
        assert!(f.may_attach(&key(1), 13));
        assert!(f.is_empty());
        assert!(f.on_takeover(&key(1), ANY_CONNECTION, Some(20), 0));
    }

    #[test]
    fn old_fences_are_pruned() {
        let mut f = Fences::default();
        for d in 0..FENCE_PRUNE_AT as u64 {
            f.on_takeover(&key(d), 1, None, 0);
        }
        f.on_takeover(&key(u64::MAX), 1, None, FENCE_TTL_MS + 1);
        assert_eq!(f.len(), 1);
    }

    // ----- seeded simulation ------------------------------------------------------------------

    /// splitmix64: a tiny deterministic generator, so a failing seed reproduces exactly.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// One step of the protocol, waiting in the network or in a node's task queue.
    #[derive(Debug, Clone)]
    enum Step {
        /// Node `node` asks the home to register connection `conn` of device `dev`; `seen` is
        /// the home incarnation the node knew of when it started, `retry` the incarnation
        /// that answered `Busy` (the home's own retry loop, which dies with it).
        Register {
            dev: u64,
            node: u64,
            conn: u64,
            seen: u64,
            retry: Option<u64>,
        },
        /// The home (incarnation `epoch`) told `node` to let go of `conn`; `reply` is the
        /// registration waiting on it, if any.
        Takeover {
            dev: u64,
            node: u64,
            conn: u64,
            epoch: u64,
            reply: Option<Box<Step>>,
        },
        /// Registration answered: connection `conn` on `node` attaches (if not fenced).
        Attach {
            dev: u64,
            node: u64,
            conn: u64,
            seen: u64,
        },
        /// The device's client closes connection `conn` (it gave up on it).
        Close { dev: u64, node: u64, conn: u64 },
        /// The home node restarts: its registry is empty.
        Restart,
        /// `node` learns that the home restarted and re-announces its attached connections.
        Notice { node: u64 },
        /// `node` re-announces its connection `conn` of `dev` to the home.
        Restore { dev: u64, node: u64, conn: u64 },
    }

    /// What one node holds of one device: the attached connection and the newest one ever.
    #[derive(Debug, Default, Clone, Copy)]
    struct Held {
        attached: Option<u64>,
        newest: u64,
    }

    struct Sim {
        nodes: u64,
        registry: Registry,
        /// The home's incarnation, and the one each node has noticed.
        epoch: u64,
        seen: Vec<u64>,
        fences: Vec<Fences>,
        held: HashMap<(u64, u64), Held>,
        /// One counter for every node: connection ids start from each node's clock.
        next_conn: u64,
        /// The newest connection each device opened, and whether it is still open at the client.
        latest: HashMap<u64, (u64, u64, bool)>,
        queue: Vec<Step>,
        /// Every connection the client has closed: `(node, conn)`.
        closed: std::collections::HashSet<(u64, u64)>,
        /// Connections closed by a takeover that a home sent just before it died (it arrives
        /// anyway): the client reconnects, and meanwhile the device may have no connection.
        hit_by_the_dead: std::collections::HashSet<(u64, u64)>,
        /// Restores that reached the home after their node had let go of the connection: the
        /// record then names a connection that is gone (harmless: a takeover aimed at it finds
        /// nothing), so it says nothing about which connection is live.
        stale_restores: std::collections::HashSet<(u64, u64)>,
        /// Print every step (`SIM_SEED=n` runs that seed alone, traced).
        trace: bool,
    }

    impl Sim {
        fn new(nodes: u64) -> Sim {
            Sim {
                nodes,
                registry: Registry::default(),
                epoch: 0,
                seen: vec![0; nodes as usize],
                fences: (0..nodes).map(|_| Fences::default()).collect(),
                held: HashMap::new(),
                next_conn: 1,
                latest: HashMap::new(),
                queue: Vec::new(),
                closed: Default::default(),
                hit_by_the_dead: Default::default(),
                stale_restores: Default::default(),
                trace: false,
            }
        }

        fn connect(&mut self, dev: u64, node: u64) {
            let conn = self.next_conn;
            self.next_conn += 1;
            if let Some((n, c, true)) = self.latest.get(&dev).copied() {
                // A client opens a new connection after giving up on the old one.
                self.queue.push(Step::Close {
                    dev,
                    node: n,
                    conn: c,
                });
            }
            self.latest.insert(dev, (node, conn, true));
            self.queue.push(Step::Register {
                dev,
                node,
                conn,
                seen: self.seen[node as usize],
                retry: None,
            });
        }

        /// `node` lets go of `conn` of `dev` unless it attached a newer connection since.
        fn let_go(&mut self, dev: u64, node: u64, conn: u64) {
            let h = self.held.entry((node, dev)).or_default();
            let newest = (h.newest > 0).then_some(h.newest);
            if self.fences[node as usize].on_takeover(&key(dev), conn, newest, 0) {
                h.attached = None;
            }
        }

        fn run(&mut self, step: Step) {
            if self.trace {
                eprintln!("{step:?}");
            }
            match step {
                Step::Register {
                    dev,
                    node,
                    conn,
                    seen,
                    retry,
                } => {
                    let attach = Step::Attach {
                        dev,
                        node,
                        conn,
                        seen,
                    };
                    if retry.is_some_and(|e| e != self.epoch) {
                        // The home died while this waited: the node's call fails, and the
                        // connection attaches without waiting on an unreachable node.
                        self.queue.push(attach);
                        return;
                    }
                    match self.registry.put(key(dev), Holder { node, conn }) {
                        Put::Takeover(prev) => self.queue.push(Step::Takeover {
                            dev,
                            node: prev.node,
                            conn: prev.conn,
                            epoch: self.epoch,
                            reply: Some(Box::new(attach)),
                        }),
                        Put::Done => self.queue.push(attach),
                        // Waits at the home; tried again later.
                        Put::Busy => self.queue.push(Step::Register {
                            dev,
                            node,
                            conn,
                            seen,
                            retry: Some(self.epoch),
                        }),
                    }
                }
                Step::Takeover {
                    dev,
                    node,
                    conn,
                    epoch,
                    reply,
                } => {
                    if epoch != self.epoch
                        && self.held.get(&(node, dev)).and_then(|h| h.attached) == Some(conn)
                    {
                        self.hit_by_the_dead.insert((node, conn));
                    }
                    self.let_go(dev, node, conn);
                    // The registration's answer goes back only after the old holder let go
                    // (or the home died, and the registering node's call failed).
                    if epoch == self.epoch {
                        self.registry.takeover_done(&key(dev));
                    }
                    if let Some(r) = reply {
                        self.queue.push(*r);
                    }
                }
                Step::Attach {
                    dev,
                    node,
                    conn,
                    seen,
                } => {
                    if self.closed.contains(&(node, conn)) {
                        return; // the client is gone: CONNACK goes nowhere
                    }
                    if !self.fences[node as usize].may_attach(&key(dev), conn) {
                        return; // refused: superseded before it attached
                    }
                    // A local takeover, as `Broker::attach` does it: a connection replaces the
                    // attached one unless a newer one attached here first.
                    let h = self.held.entry((node, dev)).or_default();
                    if h.newest > conn {
                        return;
                    }
                    h.attached = Some(conn);
                    h.newest = h.newest.max(conn);
                    // Registered with a home that has restarted since: announced again, as
                    // `Cluster::attached` does.
                    if seen != self.seen[node as usize] {
                        self.queue.push(Step::Restore { dev, node, conn });
                    }
                }
                Step::Close { dev, node, conn } => {
                    self.closed.insert((node, conn));
                    let h = self.held.entry((node, dev)).or_default();
                    if h.attached == Some(conn) {
                        h.attached = None;
                    }
                    if let Some(l) = self.latest.get_mut(&dev) {
                        if (l.0, l.1) == (node, conn) {
                            l.2 = false;
                        }
                    }
                }
                Step::Restart => {
                    self.registry = Registry::default();
                    self.epoch += 1;
                    for node in 0..self.nodes {
                        self.queue.push(Step::Notice { node });
                    }
                }
                Step::Notice { node } => {
                    self.seen[node as usize] = self.epoch;
                    let attached: Vec<(u64, u64)> = self
                        .held
                        .iter()
                        .filter(|((n, _), _)| *n == node)
                        .filter_map(|((_, d), h)| h.attached.map(|c| (*d, c)))
                        .collect();
                    for (dev, conn) in attached {
                        self.queue.push(Step::Restore { dev, node, conn });
                    }
                }
                Step::Restore { dev, node, conn } => {
                    if self.held.get(&(node, dev)).and_then(|h| h.attached) != Some(conn) {
                        self.stale_restores.insert((node, conn));
                    }
                    match self.registry.restore(key(dev), Holder { node, conn }) {
                        Restore::Kept => {}
                        Restore::Superseded => self.let_go(dev, node, conn),
                        Restore::Takeover(prev) => self.queue.push(Step::Takeover {
                            dev,
                            node: prev.node,
                            conn: prev.conn,
                            epoch: self.epoch,
                            reply: None,
                        }),
                    }
                }
            }
        }

        fn live(&self, dev: u64) -> Vec<(u64, u64)> {
            (0..self.nodes)
                .filter_map(|n| {
                    self.held
                        .get(&(n, dev))
                        .and_then(|h| h.attached)
                        .map(|c| (n, c))
                })
                .collect()
        }

        fn restarting(&self) -> bool {
            self.queue.iter().any(|s| {
                matches!(
                    s,
                    Step::Notice { .. } | Step::Restore { .. } | Step::Takeover { reply: None, .. }
                )
            }) || self.seen.iter().any(|e| *e != self.epoch)
        }
    }

    /// Devices connect and reconnect through random nodes while registrations, takeovers and
    /// attaches are delivered in random order, and the home restarts now and then (losing its
    /// registry; nodes re-announce what they hold). No device has two live connections,
    /// except from a home restart until the re-announcements and the takeovers they cause
    /// are through; once the network is quiet a device whose last connect was not cancelled
    /// by a racing one is connected exactly once, through its newest connection.
    #[test]
    fn simulation_at_most_one_live_connection_per_device() {
        let only: Option<u64> = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok());
        for seed in 0..300u64 {
            if only.is_some_and(|o| o != seed) {
                continue;
            }
            let mut rng = Rng(seed);
            let mut sim = Sim::new(3);
            sim.trace = only.is_some();
            let devices = 3;
            for step in 0..400 {
                if rng.below(60) == 0 {
                    sim.queue.push(Step::Restart);
                } else if sim.queue.is_empty() || rng.below(3) == 0 {
                    let dev = rng.below(devices);
                    let node = rng.below(sim.nodes);
                    sim.connect(dev, node);
                } else {
                    let i = rng.below(sim.queue.len() as u64) as usize;
                    let s = sim.queue.swap_remove(i);
                    sim.run(s);
                }
                if sim.restarting() {
                    continue;
                }
                for dev in 0..devices {
                    let live = sim.live(dev);
                    assert!(
                        live.len() <= 1,
                        "seed {seed} step {step}: device {dev} has live connections {live:?}"
                    );
                }
            }
            // Quiesce: deliver everything left, in random order.
            while !sim.queue.is_empty() {
                let i = rng.below(sim.queue.len() as u64) as usize;
                let s = sim.queue.swap_remove(i);
                sim.run(s);
            }
            for dev in 0..devices {
                let live = sim.live(dev);
                assert!(live.len() <= 1, "seed {seed}: device {dev}: {live:?}");
                if let (Some(&(node, conn, true)), Some(h)) =
                    (sim.latest.get(&dev), sim.registry.get(&key(dev)))
                {
                    // The home's record names the newest connection unless two connects
                    // raced; when it does, that connection is the one that is live.
                    if h == (Holder { node, conn })
                        && !sim.hit_by_the_dead.contains(&(node, conn))
                        && !sim.stale_restores.contains(&(node, conn))
                    {
                        assert_eq!(
                            live,
                            vec![(node, conn)],
                            "seed {seed}: device {dev}'s newest connection is not live"
                        );
                    }
                }
            }
        }
    }
}
