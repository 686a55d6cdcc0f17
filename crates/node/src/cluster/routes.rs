//! The cluster-wide route table: which other nodes have subscribers for which filters of a
//! tenant (`RemoteRoutes`), and the filters this node announces (`LocalRoutes`, reference
//! counted so that the thousandth subscriber of `a/#` does not announce it again).
//!
//! Both are plain values without I/O; the broadcaster and the gRPC service move changes.

use std::collections::{BTreeSet, HashMap, HashSet};

use fleetmq_protocol::trie::TopicTrie;

/// One route: a tenant's filter; a shared subscription's is the whole `$share/<group>/<filter>`
/// (the receiver files it under its group, see [`RemoteRoutes::shares_for`]).
pub type Route = (String, String);

/// A shared subscription's group and inner filter, as `<group>/<filter>` (the group has no
/// `/`, so the first one splits them).
pub type ShareKey = String;

/// Filters this node has subscribers for, with their subscriber counts.
#[derive(Default)]
pub struct LocalRoutes {
    counts: HashMap<Route, usize>,
}

impl LocalRoutes {
    /// Counts a subscription in; true when the route is new (announce it).
    pub fn add(&mut self, tenant: &str, filter: &str) -> bool {
        let c = self
            .counts
            .entry((tenant.to_string(), filter.to_string()))
            .or_insert(0);
        *c += 1;
        *c == 1
    }

    /// Counts a subscription out; true when it was the last one (withdraw the route).
    pub fn remove(&mut self, tenant: &str, filter: &str) -> bool {
        let key = (tenant.to_string(), filter.to_string());
        match self.counts.get_mut(&key) {
            Some(c) if *c > 1 => {
                *c -= 1;
                false
            }
            Some(_) => {
                self.counts.remove(&key);
                true
            }
            None => false,
        }
    }

    /// Every route, for a full update.
    pub fn all(&self) -> Vec<Route> {
        self.counts.keys().cloned().collect()
    }

    /// Number of distinct routes.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// Routes announced by other nodes: per tenant, a trie from filter to node ids.
#[derive(Default)]
pub struct RemoteRoutes {
    tenants: HashMap<String, TopicTrie<u64, ()>>,
    /// Shared subscriptions: per tenant, inner filter to `(node, group)`.
    shares: HashMap<String, TopicTrie<(u64, String), ()>>,
    /// Each node's routes, to drop them all when it leaves or sends a full table.
    by_node: HashMap<u64, HashSet<Route>>,
    /// Last applied update sequence per sending node.
    sequences: HashMap<u64, u64>,
    /// Each sending node's process incarnation, as last heard (see `apply_from`).
    incarnations: HashMap<u64, u64>,
    size: usize,
}

/// What the receiver did with an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied; the receiver is at this sequence.
    Yes(u64),
    /// Not applied: the receiver is at this other sequence and needs the full table.
    Gap(u64),
}

impl RemoteRoutes {
    /// True when an update from `incarnation` of `node` says the node restarted since it was
    /// last heard (0: an older node that does not say).
    pub fn restarted(&self, node: u64, incarnation: u64) -> bool {
        incarnation != 0
            && self
                .incarnations
                .get(&node)
                .is_some_and(|known| *known != incarnation)
    }

    /// [`apply`](Self::apply) for an update sent by process `incarnation` of `node` (its
    /// start time; 0 from an older node: unknown). A full table of the same incarnation older
    /// than what was applied since (a probe that arrived after newer changes) is ignored; an
    /// update from a new incarnation (the node restarted) voids the node's old routes, and an
    /// incremental one then asks for the full table.
    pub fn apply_from(
        &mut self,
        node: u64,
        incarnation: u64,
        sequence: u64,
        full: bool,
        changes: impl IntoIterator<Item = (Route, bool)>,
    ) -> Applied {
        if self.restarted(node, incarnation) {
            self.drop_node(node);
            if !full {
                self.incarnations.insert(node, incarnation);
                return Applied::Gap(0);
            }
        } else if full && incarnation != 0 && self.incarnations.get(&node) == Some(&incarnation) {
            let last = self.sequences.get(&node).copied().unwrap_or(0);
            if sequence < last {
                return Applied::Yes(last);
            }
        }
        let r = self.apply(node, sequence, full, changes);
        if incarnation != 0 {
            self.incarnations.insert(node, incarnation);
        }
        r
    }

    /// Applies an update from `node`: incremental changes only in sequence, a full table at
    /// any time (replacing that node's routes).
    pub fn apply(
        &mut self,
        node: u64,
        sequence: u64,
        full: bool,
        changes: impl IntoIterator<Item = (Route, bool)>,
    ) -> Applied {
        let last = self.sequences.get(&node).copied().unwrap_or(0);
        if full {
            self.drop_node(node);
        } else if sequence == last {
            // A heartbeat (no new changes) or a retransmission of an applied update; it also
            // tells that the sender is in sync with this node.
            self.sequences.insert(node, last);
            return Applied::Yes(last);
        } else if Some(sequence) != last.checked_add(1) {
            return Applied::Gap(last);
        }
        for (route, added) in changes {
            if added {
                self.insert(node, route);
            } else {
                self.remove(node, &route);
            }
        }
        self.sequences.insert(node, sequence);
        Applied::Yes(sequence)
    }

    fn insert(&mut self, node: u64, route: Route) {
        if !self.by_node.entry(node).or_default().insert(route.clone()) {
            return;
        }
        let (tenant, filter) = route;
        match fleetmq_protocol::topic::parse_shared(&filter) {
            Ok(Some((group, inner))) => {
                self.shares
                    .entry(tenant)
                    .or_default()
                    .insert(inner, (node, group.to_string()), ());
            }
            _ => {
                self.tenants
                    .entry(tenant)
                    .or_default()
                    .insert(&filter, node, ());
            }
        }
        self.size += 1;
    }

    fn remove(&mut self, node: u64, route: &Route) {
        let Some(set) = self.by_node.get_mut(&node) else {
            return;
        };
        if !set.remove(route) {
            return;
        }
        let (tenant, filter) = route;
        if let Ok(Some((group, inner))) = fleetmq_protocol::topic::parse_shared(filter) {
            if let Some(trie) = self.shares.get_mut(tenant) {
                trie.remove(inner, &(node, group.to_string()));
                if trie.is_empty() {
                    self.shares.remove(tenant);
                }
            }
        } else if let Some(trie) = self.tenants.get_mut(tenant) {
            trie.remove(filter, &node);
            if trie.is_empty() {
                self.tenants.remove(tenant);
            }
        }
        self.size -= 1;
    }

    /// Forgets every route of a node (it left the cluster or sent its full table).
    pub fn drop_node(&mut self, node: u64) {
        let routes: Vec<Route> = self
            .by_node
            .get(&node)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for r in &routes {
            self.remove(node, r);
        }
        self.by_node.remove(&node);
        self.sequences.remove(&node);
        self.incarnations.remove(&node);
    }

    /// True when an update from `node` has been applied since this node started (so its
    /// routes here are complete).
    pub fn heard_from(&self, node: u64) -> bool {
        self.sequences.contains_key(&node)
    }

    /// The nodes that have announced routes.
    pub fn nodes(&self) -> Vec<u64> {
        self.by_node.keys().copied().collect()
    }

    /// The nodes with a subscriber for `topic` in `tenant`.
    pub fn nodes_for(&self, tenant: &str, topic: &str) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        if let Some(trie) = self.tenants.get(tenant) {
            trie.for_each_match(topic, |_, node, _| {
                out.insert(*node);
            });
        }
        out
    }

    /// The shared subscriptions of other nodes matching `topic`: `<group>/<filter>` to the
    /// nodes with members, by id.
    pub fn shares_for(&self, tenant: &str, topic: &str) -> HashMap<ShareKey, BTreeSet<u64>> {
        let mut out: HashMap<ShareKey, BTreeSet<u64>> = HashMap::new();
        if let Some(trie) = self.shares.get(tenant) {
            trie.for_each_match(topic, |filter, (node, group), _| {
                out.entry(format!("{group}/{filter}"))
                    .or_default()
                    .insert(*node);
            });
        }
        out
    }

    /// True when some node announced a shared subscription.
    pub fn has_shares(&self) -> bool {
        !self.shares.is_empty()
    }

    /// Routes held, over all nodes and tenants.
    pub fn len(&self) -> usize {
        self.size
    }

    /// True when no other node has announced anything.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(t: &str, f: &str) -> Route {
        (t.into(), f.into())
    }

    #[test]
    fn local_routes_announce_first_and_withdraw_last() {
        let mut l = LocalRoutes::default();
        assert!(l.add("t", "a/#"));
        assert!(!l.add("t", "a/#"));
        assert!(l.add("u", "a/#"), "other tenant is another route");
        assert!(!l.remove("t", "a/#"));
        assert!(l.remove("t", "a/#"));
        assert!(!l.remove("t", "a/#"), "unknown route");
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn remote_routes_match_by_tenant_and_filter() {
        let mut rr = RemoteRoutes::default();
        assert_eq!(
            rr.apply(2, 1, false, [(r("t", "a/+"), true), (r("t", "b"), true)]),
            Applied::Yes(1)
        );
        assert_eq!(
            rr.apply(3, 1, false, [(r("t", "a/#"), true)]),
            Applied::Yes(1)
        );
        assert_eq!(rr.nodes_for("t", "a/x"), BTreeSet::from([2, 3]));
        assert_eq!(rr.nodes_for("t", "b"), BTreeSet::from([2]));
        assert!(rr.nodes_for("u", "a/x").is_empty(), "tenants are separate");
        assert_eq!(
            rr.apply(2, 2, false, [(r("t", "a/+"), false)]),
            Applied::Yes(2)
        );
        assert_eq!(rr.nodes_for("t", "a/x"), BTreeSet::from([3]));
        assert_eq!(rr.len(), 2);
    }

    #[test]
    fn a_late_full_table_is_ignored_and_a_restart_voids_the_routes() {
        let mut rr = RemoteRoutes::default();
        assert_eq!(
            rr.apply_from(2, 100, 1, true, [(r("t", "a"), true)]),
            Applied::Yes(1)
        );
        assert_eq!(
            rr.apply_from(2, 100, 2, false, [(r("t", "b"), true)]),
            Applied::Yes(2)
        );
        // A full table of sequence 1 arriving now (a slow probe) would drop "b": ignored.
        assert_eq!(
            rr.apply_from(2, 100, 1, true, [(r("t", "a"), true)]),
            Applied::Yes(2)
        );
        assert_eq!(rr.nodes_for("t", "b"), BTreeSet::from([2]));
        // Node 2 restarted (new incarnation): its routes go, and it is asked for its table.
        assert!(rr.restarted(2, 200) && !rr.restarted(2, 100) && !rr.restarted(3, 5));
        assert_eq!(rr.apply_from(2, 200, 1, false, []), Applied::Gap(0));
        assert!(rr.nodes_for("t", "a").is_empty() && rr.nodes_for("t", "b").is_empty());
        assert_eq!(
            rr.apply_from(2, 200, 1, true, [(r("t", "c"), true)]),
            Applied::Yes(1)
        );
        assert_eq!(rr.nodes_for("t", "c"), BTreeSet::from([2]));
    }

    #[test]
    fn a_gap_is_refused_and_a_full_table_replaces() {
        let mut rr = RemoteRoutes::default();
        rr.apply(2, 1, false, [(r("t", "x"), true)]);
        assert_eq!(
            rr.apply(2, 3, false, [(r("t", "y"), true)]),
            Applied::Gap(1)
        );
        assert!(rr.nodes_for("t", "y").is_empty());
        assert_eq!(rr.apply(2, 3, true, [(r("t", "y"), true)]), Applied::Yes(3));
        assert!(rr.nodes_for("t", "x").is_empty(), "full table replaced x");
        assert_eq!(rr.nodes_for("t", "y"), BTreeSet::from([2]));
        assert_eq!(rr.apply(2, 3, false, []), Applied::Yes(3), "heartbeat");
    }

    #[test]
    fn a_restarted_receiver_asks_for_the_full_table() {
        let mut rr = RemoteRoutes::default();
        assert_eq!(
            rr.apply(2, 5, false, [(r("t", "x"), true)]),
            Applied::Gap(0)
        );
    }

    #[test]
    fn dropping_a_node_removes_only_its_routes() {
        let mut rr = RemoteRoutes::default();
        rr.apply(2, 1, false, [(r("t", "x"), true)]);
        rr.apply(3, 1, false, [(r("t", "x"), true)]);
        rr.drop_node(2);
        assert_eq!(rr.nodes_for("t", "x"), BTreeSet::from([3]));
        assert_eq!(rr.len(), 1);
    }

    #[test]
    fn shared_routes_are_filed_by_group_not_as_plain_routes() {
        let mut rr = RemoteRoutes::default();
        rr.apply(
            2,
            1,
            false,
            [
                (r("t", "$share/g1/a/#"), true),
                (r("t", "$share/g2/a/+"), true),
                (r("t", "plain/#"), true),
            ],
        );
        rr.apply(3, 1, false, [(r("t", "$share/g1/a/#"), true)]);
        assert!(
            rr.nodes_for("t", "a/b").is_empty(),
            "shares are not plain routes"
        );
        let shares = rr.shares_for("t", "a/b");
        assert_eq!(shares.get("g1/a/#"), Some(&BTreeSet::from([2, 3])));
        assert_eq!(shares.get("g2/a/+"), Some(&BTreeSet::from([2])));
        rr.apply(2, 2, false, [(r("t", "$share/g1/a/#"), false)]);
        assert_eq!(
            rr.shares_for("t", "a/b").get("g1/a/#"),
            Some(&BTreeSet::from([3]))
        );
        rr.drop_node(3);
        assert!(!rr.shares_for("t", "a/b").contains_key("g1/a/#"));
        assert_eq!(rr.len(), 2);
    }
}
