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
        /// Node `node` asks the home to register connection `conn` of device `dev`.
        Register { dev: u64, node: u64, conn: u64 },
        /// The home told `node` to let go of `conn` (`reply` = the registration waiting on it).
        Takeover {
            dev: u64,
            node: u64,
            conn: u64,
            reply: Box<Step>,
        },
        /// Registration answered: connection `conn` on `node` attaches (if not fenced).
        Attach { dev: u64, node: u64, conn: u64 },
        /// The device's client closes connection `conn` (it gave up on it).
        Close { dev: u64, node: u64, conn: u64 },
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
        fences: Vec<Fences>,
        held: HashMap<(u64, u64), Held>,
        next_conn: Vec<u64>,
        /// The newest connection each device opened, and whether it is still open at the client.
        latest: HashMap<u64, (u64, u64, bool)>,
        queue: Vec<Step>,
        /// Every connection the client has closed: `(node, conn)`.
        closed: std::collections::HashSet<(u64, u64)>,
    }

    impl Sim {
        fn new(nodes: u64) -> Sim {
            Sim {
                nodes,
                registry: Registry::default(),
                fences: (0..nodes).map(|_| Fences::default()).collect(),
                held: HashMap::new(),
                // Per node, growing: as the broker's counter does.
                next_conn: (0..nodes).map(|n| 1_000 * (n + 1)).collect(),
                latest: HashMap::new(),
                queue: Vec::new(),
                closed: Default::default(),
            }
        }

        fn connect(&mut self, dev: u64, node: u64) {
            let conn = self.next_conn[node as usize];
            self.next_conn[node as usize] += 1;
            if let Some((n, c, true)) = self.latest.get(&dev).copied() {
                // A client opens a new connection after giving up on the old one.
                self.queue.push(Step::Close {
                    dev,
                    node: n,
                    conn: c,
                });
            }
            self.latest.insert(dev, (node, conn, true));
            self.queue.push(Step::Register { dev, node, conn });
        }

        fn run(&mut self, step: Step) {
            match step {
                Step::Register { dev, node, conn } => {
                    let attach = Step::Attach { dev, node, conn };
                    match self.registry.put(key(dev), Holder { node, conn }) {
                        Put::Takeover(prev) => self.queue.push(Step::Takeover {
                            dev,
                            node: prev.node,
                            conn: prev.conn,
                            reply: Box::new(attach),
                        }),
                        Put::Done => self.queue.push(attach),
                        // Waits at the home; tried again later.
                        Put::Busy => self.queue.push(Step::Register { dev, node, conn }),
                    }
                }
                Step::Takeover {
                    dev,
                    node,
                    conn,
                    reply,
                } => {
                    let h = self.held.entry((node, dev)).or_default();
                    let newest = (h.newest > 0).then_some(h.newest);
                    if self.fences[node as usize].on_takeover(&key(dev), conn, newest, 0) {
                        h.attached = None;
                    }
                    // The registration's answer goes back only after the old holder let go.
                    self.registry.takeover_done(&key(dev));
                    self.queue.push(*reply);
                }
                Step::Attach { dev, node, conn } => {
                    if self.closed.contains(&(node, conn)) {
                        return; // the client is gone: CONNACK goes nowhere
                    }
                    if !self.fences[node as usize].may_attach(&key(dev), conn) {
                        return; // refused: superseded before it attached
                    }
                    // A local takeover, as `Broker::attach` does it: the connection attaching
                    // last replaces the attached one.
                    let h = self.held.entry((node, dev)).or_default();
                    h.attached = Some(conn);
                    h.newest = h.newest.max(conn);
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
    }

    /// Devices connect and reconnect through random nodes while registrations, takeovers and
    /// attaches are delivered in random order. At every point no device has two live
    /// connections, and once the network is quiet a device whose last connect was not
    /// cancelled by a racing one is connected exactly once, through its newest connection.
    #[test]
    fn simulation_at_most_one_live_connection_per_device() {
        for seed in 0..300u64 {
            let mut rng = Rng(seed);
            let mut sim = Sim::new(3);
            let devices = 3;
            for step in 0..400 {
                if sim.queue.is_empty() || rng.below(3) == 0 {
                    let dev = rng.below(devices);
                    let node = rng.below(sim.nodes);
                    sim.connect(dev, node);
                } else {
                    let i = rng.below(sim.queue.len() as u64) as usize;
                    let s = sim.queue.swap_remove(i);
                    sim.run(s);
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
                    if h == (Holder { node, conn }) {
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
