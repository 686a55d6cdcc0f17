//! Every node's view of the persistent sessions of the whole cluster, mirrored from the Raft
//! log: their subscriptions (a trie per tenant) and which node holds each one in memory.
//!
//! It answers one question on the publish path: which persistent sessions that match this
//! topic does no live node hold? Those are *orphans* (their node died, or nobody loaded them
//! since a restart); the publishing node queues the message for them durably itself, so a
//! QoS 1/2 message to an offline session is never lost with a node. A plain value, no I/O.

use std::collections::HashMap;

use fleetmq_protocol::topic::parse_shared;
use fleetmq_protocol::trie::TopicTrie;
use fleetmq_storage::records::{Command, SessionKey, SessionRecord, SubscriptionRecord, Target};

/// Subscriptions and holders of persistent sessions.
#[derive(Default)]
pub struct DurableIndex {
    tenants: HashMap<String, TopicTrie<String, SubscriptionRecord>>,
    /// Shared subscriptions per tenant, by inner filter, keyed by `(group, client id)`.
    shares: HashMap<String, TopicTrie<(String, String), SubscriptionRecord>>,
    /// Each session's filters (as stored), to remove them.
    filters: HashMap<SessionKey, Vec<String>>,
    holders: HashMap<SessionKey, u64>,
    /// Every persistent session's expiry interval (seconds) and disconnection time (ms).
    expiry: HashMap<SessionKey, (u32, Option<u64>)>,
}

/// Whether a session that no live node holds has expired at `now_ms`: `expiry_secs` after it
/// disconnected, or, when it was still connected as its node went away, after the moment it
/// was first seen orphaned (`orphan_since_ms`).
pub fn expired(
    now_ms: u64,
    expiry_secs: u32,
    disconnected_at_ms: Option<u64>,
    orphan_since_ms: u64,
) -> bool {
    if expiry_secs == u32::MAX {
        return false;
    }
    let from = disconnected_at_ms.unwrap_or(orphan_since_ms);
    now_ms >= from.saturating_add(u64::from(expiry_secs) * 1_000)
}

impl DurableIndex {
    /// Adds (or replaces) a subscription of a session.
    fn subscribe(&mut self, key: &SessionKey, sub: &SubscriptionRecord) {
        let filters = self.filters.entry(key.clone()).or_default();
        if !filters.contains(&sub.filter) {
            filters.push(sub.filter.clone());
        }
        // A shared subscription is filed apart: a message goes to one member of its group,
        // and only when no live node serves the group (see `share_targets`).
        if let Ok(Some((group, inner))) = parse_shared(&sub.filter) {
            self.shares.entry(key.tenant.clone()).or_default().insert(
                inner,
                (group.to_string(), key.client_id.to_string()),
                sub.clone(),
            );
            return;
        }
        self.tenants.entry(key.tenant.clone()).or_default().insert(
            &sub.filter,
            key.client_id.clone(),
            sub.clone(),
        );
    }

    fn unsubscribe(&mut self, key: &SessionKey, filter: &str) {
        if let Some(fs) = self.filters.get_mut(key) {
            fs.retain(|f| f != filter);
        }
        if let Ok(Some((group, inner))) = parse_shared(filter) {
            if let Some(trie) = self.shares.get_mut(&key.tenant) {
                trie.remove(inner, &(group.to_string(), key.client_id.to_string()));
                if trie.is_empty() {
                    self.shares.remove(&key.tenant);
                }
            }
            return;
        }
        if let Some(trie) = self.tenants.get_mut(&key.tenant) {
            trie.remove(filter, &key.client_id);
            if trie.is_empty() {
                self.tenants.remove(&key.tenant);
            }
        }
    }

    fn drop_session(&mut self, key: &SessionKey) {
        for f in self.filters.remove(key).unwrap_or_default() {
            self.unsubscribe(key, &f);
        }
    }

    /// Loads one session as recovered from durable state.
    pub fn load(&mut self, key: &SessionKey, record: &SessionRecord) {
        self.drop_session(key);
        for s in &record.subscriptions {
            self.subscribe(key, s);
        }
        self.expiry
            .insert(key.clone(), (record.expiry_secs, record.disconnected_at_ms));
    }

    /// An `ExpireSession` was applied and removed the session.
    pub fn expired_session(&mut self, key: &SessionKey) {
        self.drop_session(key);
        self.holders.remove(key);
        self.expiry.remove(key);
    }

    /// Every persistent session as `(key, expiry secs, disconnected at ms, holder)`.
    pub fn sessions(&self) -> impl Iterator<Item = (&SessionKey, u32, Option<u64>, Option<u64>)> {
        self.expiry
            .iter()
            .map(|(k, (e, d))| (k, *e, *d, self.holders.get(k).copied()))
    }

    /// Mirrors one applied command (same rules as the state machine).
    pub fn observe(&mut self, cmd: &Command) {
        match cmd {
            Command::PutSession { key, record, fresh } => {
                if *fresh {
                    self.drop_session(key);
                }
                for s in &record.subscriptions {
                    self.subscribe(key, s);
                }
                self.expiry
                    .insert(key.clone(), (record.expiry_secs, record.disconnected_at_ms));
            }
            Command::DeleteSession { key } => {
                self.drop_session(key);
                self.holders.remove(key);
                self.expiry.remove(key);
            }
            Command::SetDisconnected { key, at_ms } => {
                if let Some(e) = self.expiry.get_mut(key) {
                    e.1 = *at_ms;
                }
            }
            Command::Subscribe { key, sub } => self.subscribe(key, sub),
            Command::Unsubscribe { key, filter } => self.unsubscribe(key, filter),
            _ => {}
        }
    }

    /// Records (or forgets) the node holding a session.
    pub fn set_holder(&mut self, key: SessionKey, node: Option<u64>) {
        match node {
            Some(n) => self.holders.insert(key, n),
            None => self.holders.remove(&key),
        };
    }

    /// The node holding a session, if any is on record.
    pub fn holder(&self, key: &SessionKey) -> Option<u64> {
        self.holders.get(key).copied()
    }

    /// The persistent sessions of `tenant` matching `topic` that `orphaned` says no live node
    /// holds, as durable targets (one per session: highest QoS, every subscription id).
    pub fn orphan_targets(
        &self,
        tenant: &str,
        topic: &str,
        qos: u8,
        retain: bool,
        publisher: Option<&SessionKey>,
        mut orphaned: impl FnMut(&SessionKey, Option<u64>) -> bool,
    ) -> Vec<Target> {
        let Some(trie) = self.tenants.get(tenant) else {
            return Vec::new();
        };
        let mut by_client: HashMap<String, Target> = HashMap::new();
        trie.for_each_match(topic, |_, client, sub| {
            let key = SessionKey::new(tenant, client.as_str());
            if sub.no_local && publisher == Some(&key) {
                return;
            }
            let q = qos.min(sub.qos);
            if q == 0 {
                return; // QoS 0 is not queued for offline sessions
            }
            let t = by_client.entry(client.clone()).or_insert_with(|| Target {
                key,
                qos: 0,
                retain: false,
                subscription_ids: Vec::new(),
            });
            t.qos = t.qos.max(q);
            t.retain |= sub.retain_as_published && retain;
            t.subscription_ids.extend(sub.subscription_id);
        });
        by_client
            .into_values()
            .filter(|t| orphaned(&t.key, self.holder(&t.key)))
            .collect()
    }

    /// True when `key` is a persistent session of the cluster.
    pub fn is_persistent(&self, key: &SessionKey) -> bool {
        self.expiry.contains_key(key)
    }

    /// True when some persistent session of `tenant` has a shared subscription.
    pub fn has_shares(&self, tenant: &str) -> bool {
        self.shares.contains_key(tenant)
    }

    /// True when some persistent session of any tenant has a shared subscription.
    pub fn has_any_shares(&self) -> bool {
        !self.shares.is_empty()
    }

    /// For each shared-subscription group (`"<group>/<filter>"`) with persistent members
    /// matching `topic` that `skip` does not name: one member, picked by `turn` among them in
    /// a stable order, as a durable target. QoS 0 is not queued.
    pub fn share_targets(
        &self,
        tenant: &str,
        topic: &str,
        qos: u8,
        retain: bool,
        turn: usize,
        skip: impl Fn(&str) -> bool,
    ) -> Vec<Target> {
        let Some(trie) = self.shares.get(tenant) else {
            return Vec::new();
        };
        let mut groups: std::collections::BTreeMap<String, Vec<(String, SubscriptionRecord)>> =
            Default::default();
        trie.for_each_match(topic, |filter, (group, client), sub| {
            let share_key = format!("{group}/{filter}");
            if !skip(&share_key) {
                groups
                    .entry(share_key)
                    .or_default()
                    .push((client.clone(), sub.clone()));
            }
        });
        groups
            .into_values()
            .filter_map(|mut members| {
                members.sort_by(|a, b| a.0.cmp(&b.0));
                let (client, sub) = members.get(turn % members.len().max(1))?;
                let q = qos.min(sub.qos);
                (q > 0).then(|| Target {
                    key: SessionKey::new(tenant, client.as_str()),
                    qos: q,
                    retain: sub.retain_as_published && retain,
                    subscription_ids: sub.subscription_id.into_iter().collect(),
                })
            })
            .collect()
    }

    /// Persistent sessions known.
    pub fn len(&self) -> usize {
        self.filters.len()
    }

    /// True when none are known.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(filter: &str, qos: u8) -> SubscriptionRecord {
        SubscriptionRecord {
            filter: filter.into(),
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: None,
        }
    }

    fn key(c: &str) -> SessionKey {
        SessionKey::new("t", c)
    }

    fn put(key: SessionKey, subs: Vec<SubscriptionRecord>, fresh: bool) -> Command {
        Command::PutSession {
            key,
            record: SessionRecord {
                expiry_secs: 60,
                protocol: 4,
                disconnected_at_ms: None,
                subscriptions: subs,
            },
            fresh,
        }
    }

    fn all(ix: &DurableIndex, topic: &str, qos: u8) -> Vec<Target> {
        let mut v = ix.orphan_targets("t", topic, qos, false, None, |_, _| true);
        v.sort_by(|a, b| a.key.client_id.cmp(&b.key.client_id));
        v
    }

    #[test]
    fn follows_the_state_machine_rules() {
        let mut ix = DurableIndex::default();
        ix.observe(&put(key("a"), vec![sub("x/#", 1)], true));
        ix.observe(&Command::Subscribe {
            key: key("b"),
            sub: sub("x/y", 2),
        });
        ix.observe(&put(key("b"), vec![sub("x/y", 2)], true));
        assert_eq!(all(&ix, "x/y", 2).len(), 2);
        // A resume (not fresh) keeps the old subscriptions and adds the record's.
        ix.observe(&put(key("a"), vec![sub("z", 1)], false));
        assert_eq!(all(&ix, "x/y", 1).len(), 2);
        assert_eq!(all(&ix, "z", 1).len(), 1);
        // A clean start (fresh) drops them.
        ix.observe(&put(key("a"), vec![], true));
        assert_eq!(all(&ix, "x/y", 1).len(), 1);
        ix.observe(&Command::Unsubscribe {
            key: key("b"),
            filter: "x/y".into(),
        });
        assert!(all(&ix, "x/y", 1).is_empty());
        ix.observe(&Command::DeleteSession { key: key("a") });
        assert!(all(&ix, "z", 1).is_empty());
    }

    #[test]
    fn overlapping_subscriptions_give_one_target_at_the_highest_qos() {
        let mut ix = DurableIndex::default();
        let mut s1 = sub("a/+", 1);
        s1.subscription_id = Some(7);
        let mut s2 = sub("a/#", 2);
        s2.subscription_id = Some(9);
        ix.observe(&put(key("c"), vec![s1, s2], true));
        let t = all(&ix, "a/b", 2);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].qos, 2);
        let mut ids = t[0].subscription_ids.clone();
        ids.sort();
        assert_eq!(ids, vec![7, 9]);
        assert_eq!(all(&ix, "a/b", 1)[0].qos, 1, "capped by the publish QoS");
        assert!(all(&ix, "a/b", 0).is_empty(), "QoS 0 is not queued");
    }

    #[test]
    fn only_orphans_are_targets() {
        let mut ix = DurableIndex::default();
        ix.observe(&put(key("held"), vec![sub("x", 1)], true));
        ix.observe(&put(key("dead"), vec![sub("x", 1)], true));
        ix.observe(&put(key("none"), vec![sub("x", 1)], true));
        ix.set_holder(key("held"), Some(1));
        ix.set_holder(key("dead"), Some(2));
        let live = [1u64];
        let mut t: Vec<String> = ix
            .orphan_targets("t", "x", 1, false, None, |_, h| {
                !h.is_some_and(|n| live.contains(&n))
            })
            .into_iter()
            .map(|t| t.key.client_id)
            .collect();
        t.sort();
        assert_eq!(t, vec!["dead".to_string(), "none".to_string()]);
    }

    #[test]
    fn no_local_and_shared_subscriptions_are_skipped() {
        let mut ix = DurableIndex::default();
        let mut nl = sub("x", 1);
        nl.no_local = true;
        ix.observe(&put(key("p"), vec![nl, sub("$share/g/x", 1)], true));
        let t = ix.orphan_targets("t", "x", 1, false, Some(&key("p")), |_, _| true);
        assert!(t.is_empty());
    }

    #[test]
    fn shared_subscriptions_give_one_member_per_group() {
        let mut ix = DurableIndex::default();
        ix.observe(&put(key("m1"), vec![sub("$share/g/x/#", 1)], true));
        ix.observe(&put(key("m2"), vec![sub("$share/g/x/#", 2)], true));
        ix.observe(&put(key("m3"), vec![sub("$share/h/x/+", 1)], true));
        assert!(ix.has_shares("t") && !ix.has_shares("other"));
        let pick = |ix: &DurableIndex, turn, skip: &[&str]| {
            let mut v: Vec<(String, u8)> = ix
                .share_targets("t", "x/y", 2, false, turn, |k| skip.contains(&k))
                .into_iter()
                .map(|t| (t.key.client_id.to_string(), t.qos))
                .collect();
            v.sort();
            v
        };
        // One member of each group; the turn walks the members of a group in a stable order.
        assert_eq!(pick(&ix, 0, &[]), vec![("m1".into(), 1), ("m3".into(), 1)]);
        assert_eq!(pick(&ix, 1, &[]), vec![("m2".into(), 2), ("m3".into(), 1)]);
        // A group some live node serves is skipped.
        assert_eq!(pick(&ix, 0, &["g/x/#"]), vec![("m3".into(), 1)]);
        // Not a plain subscriber, and gone with an unsubscribe or the session.
        assert!(ix
            .orphan_targets("t", "x/y", 1, false, None, |_, _| true)
            .is_empty());
        ix.observe(&Command::Unsubscribe {
            key: key("m3"),
            filter: "$share/h/x/+".into(),
        });
        ix.observe(&Command::DeleteSession { key: key("m1") });
        assert_eq!(pick(&ix, 0, &[]), vec![("m2".into(), 2)]);
        ix.observe(&Command::DeleteSession { key: key("m2") });
        assert!(!ix.has_shares("t"));
    }

    #[test]
    fn expiry_counts_from_disconnection_or_from_orphaning() {
        // Disconnected at 10 s with 5 s expiry: due at 15 s, whenever it was orphaned.
        assert!(!expired(14_999, 5, Some(10_000), 0));
        assert!(expired(15_000, 5, Some(10_000), 99_000));
        // Connected when its node went away (seen orphaned at 20 s): due at 25 s.
        assert!(!expired(24_999, 5, None, 20_000));
        assert!(expired(25_000, 5, None, 20_000));
        assert!(!expired(u64::MAX, u32::MAX, Some(0), 0), "never expires");
    }

    #[test]
    fn sessions_track_expiry_and_disconnection() {
        let mut ix = DurableIndex::default();
        let k = SessionKey::new("t", "c");
        ix.observe(&Command::PutSession {
            key: k.clone(),
            record: SessionRecord {
                expiry_secs: 60,
                protocol: 5,
                disconnected_at_ms: None,
                subscriptions: vec![sub("a/#", 1)],
            },
            fresh: true,
        });
        ix.observe(&Command::SetDisconnected {
            key: k.clone(),
            at_ms: Some(7),
        });
        ix.set_holder(k.clone(), Some(3));
        let all: Vec<_> = ix.sessions().collect();
        assert_eq!(all, vec![(&k, 60, Some(7), Some(3))]);
        ix.expired_session(&k);
        assert_eq!(ix.sessions().count(), 0);
        assert!(ix
            .orphan_targets("t", "a/b", 1, false, None, |_, _| true)
            .is_empty());
    }
}
