//! The subscription index: a trie over topic-filter levels that finds every
//! subscription matching a published topic name.
//!
//! Layout: each node has literal children, a separate `+` child and two leaf
//! slots — `exact` for filters ending at this node and `hash` for filters
//! ending in `/#` below it. Matching walks the topic's levels once and only
//! branches into `+` where such a subscription exists, so the cost is
//! proportional to the number of candidate paths, not to the number of
//! filters. Each leaf keeps its filter string, so matching never builds
//! strings, and the walk uses the borrowed `str::Split` iterator, so
//! `for_each_match` does not allocate.
//!
//! The trie expects filters that passed
//! [`validate_topic_filter`](crate::topic::validate_topic_filter): its depth
//! equals the number of filter levels, and matching, removal and drop
//! recurse over that depth, which the level limit keeps small.

use std::collections::HashMap;
use std::hash::Hash;

/// Up to this many entries, children and per-filter subscribers live in a
/// Vec: most levels (device ids, measurement names) have only a handful of
/// children and most filters one subscriber, and a linear scan of a few
/// items beats hashing while using far less memory than a HashMap.
const SMALL_MAX: usize = 8;

/// Literal children of a node, keyed by the level string.
///
/// The map uses std's SipHash (`RandomState`): levels come from clients, and
/// a keyed hash keeps one tenant from degrading lookups for everyone with
/// colliding topic levels.
enum Children<K, V> {
    Small(Vec<(Box<str>, Node<K, V>)>),
    Map(HashMap<Box<str>, Node<K, V>>),
}

impl<K, V> Children<K, V> {
    fn get(&self, level: &str) -> Option<&Node<K, V>> {
        match self {
            Children::Small(v) => v.iter().find(|(l, _)| &**l == level).map(|(_, n)| n),
            Children::Map(m) => m.get(level),
        }
    }

    fn get_mut(&mut self, level: &str) -> Option<&mut Node<K, V>> {
        match self {
            Children::Small(v) => v.iter_mut().find(|(l, _)| &**l == level).map(|(_, n)| n),
            Children::Map(m) => m.get_mut(level),
        }
    }

    fn get_or_insert(&mut self, level: &str) -> &mut Node<K, V> {
        if let Children::Small(v) = self {
            if v.len() >= SMALL_MAX && !v.iter().any(|(l, _)| &**l == level) {
                // Promote: the new child would exceed the inline budget.
                let map: HashMap<_, _> = std::mem::take(v).into_iter().collect();
                *self = Children::Map(map);
            }
        }
        match self {
            Children::Small(v) => {
                // Index lookup rather than `find` so the borrow checker
                // accepts the push on the miss path.
                match v.iter().position(|(l, _)| &**l == level) {
                    Some(i) => &mut v[i].1,
                    None => {
                        v.push((level.into(), Node::default()));
                        let last = v.len() - 1;
                        &mut v[last].1
                    }
                }
            }
            Children::Map(m) => m.entry(level.into()).or_default(),
        }
    }

    fn remove(&mut self, level: &str) {
        match self {
            Children::Small(v) => {
                if let Some(i) = v.iter().position(|(l, _)| &**l == level) {
                    v.swap_remove(i);
                }
                if v.is_empty() {
                    // Release the buffer so a drained node holds no heap.
                    *v = Vec::new();
                }
            }
            Children::Map(m) => {
                m.remove(level);
                // Demote at half the threshold (hysteresis, so a level
                // hovering around SMALL_MAX does not flip-flop) to give back
                // the map's high-water-mark capacity after churn.
                if m.len() <= SMALL_MAX / 2 {
                    let v: Vec<_> = std::mem::take(m).into_iter().collect();
                    *self = Children::Small(v);
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Children::Small(v) => v.is_empty(),
            Children::Map(m) => m.is_empty(),
        }
    }

    fn for_each(&self, mut f: impl FnMut(&Node<K, V>)) {
        match self {
            Children::Small(v) => v.iter().for_each(|(_, n)| f(n)),
            Children::Map(m) => m.values().for_each(f),
        }
    }
}

/// The subscribers of one filter, with the same small/large split as
/// [`Children`].
enum Entries<K, V> {
    Small(Vec<(K, V)>),
    Map(HashMap<K, V>),
}

impl<K: Eq + Hash, V> Entries<K, V> {
    fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self {
            Entries::Small(v) => {
                if let Some((_, old)) = v.iter_mut().find(|(k, _)| *k == key) {
                    return Some(std::mem::replace(old, value));
                }
                if v.len() < SMALL_MAX {
                    v.push((key, value));
                } else {
                    let mut map: HashMap<K, V> = std::mem::take(v).into_iter().collect();
                    map.insert(key, value);
                    *self = Entries::Map(map);
                }
                None
            }
            Entries::Map(m) => m.insert(key, value),
        }
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        match self {
            Entries::Small(v) => {
                let i = v.iter().position(|(k, _)| k == key)?;
                Some(v.swap_remove(i).1)
            }
            Entries::Map(m) => {
                let old = m.remove(key)?;
                if m.len() <= SMALL_MAX / 2 {
                    let v: Vec<_> = std::mem::take(m).into_iter().collect();
                    *self = Entries::Small(v);
                }
                Some(old)
            }
        }
    }

    fn get(&self, key: &K) -> Option<&V> {
        match self {
            Entries::Small(v) => v.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            Entries::Map(m) => m.get(key),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Entries::Small(v) => v.is_empty(),
            Entries::Map(m) => m.is_empty(),
        }
    }
}

impl<K, V> Entries<K, V> {
    fn for_each(&self, mut f: impl FnMut(&K, &V)) {
        match self {
            Entries::Small(v) => v.iter().for_each(|(k, v)| f(k, v)),
            Entries::Map(m) => m.iter().for_each(|(k, v)| f(k, v)),
        }
    }
}

/// All subscriptions to one filter. The filter string lives here, in the
/// node that ends it, so matches can report it without rebuilding it from
/// the path.
struct Leaf<K, V> {
    filter: Box<str>,
    entries: Entries<K, V>,
}

impl<K, V> Leaf<K, V> {
    fn visit(&self, f: &mut impl FnMut(&str, &K, &V)) {
        let filter = &*self.filter;
        self.entries.for_each(|k, v| f(filter, k, v));
    }
}

/// One filter level.
struct Node<K, V> {
    children: Children<K, V>,
    /// The `+` child, kept apart from literals so matching tries it without
    /// a lookup and a literal level named "+" can never collide with it.
    plus: Option<Box<Node<K, V>>>,
    /// Filters whose last level is exactly this node.
    exact: Option<Box<Leaf<K, V>>>,
    /// Filters `<path to this node>/#`: they match this node's level and
    /// everything below it.
    hash: Option<Box<Leaf<K, V>>>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            children: Children::Small(Vec::new()),
            plus: None,
            exact: None,
            hash: None,
        }
    }
}

impl<K, V> Node<K, V> {
    /// A node with nothing below it carries no information and is pruned.
    fn is_empty(&self) -> bool {
        self.exact.is_none()
            && self.hash.is_none()
            && self.plus.is_none()
            && self.children.is_empty()
    }

    fn count(&self) -> usize {
        let mut n = 1;
        if let Some(p) = &self.plus {
            n += p.count();
        }
        self.children.for_each(|c| n += c.count());
        n
    }

    /// Matches the remaining topic `levels` against the subtree at `self`.
    ///
    /// `levels` is a by-value `Split`, cloned where the walk branches; this
    /// keeps the whole match allocation-free.
    fn walk<'t>(&self, mut levels: std::str::Split<'t, char>, f: &mut impl FnMut(&str, &K, &V)) {
        match levels.next() {
            None => {
                // The topic ends here: filters ending here match, and so do
                // `here/#` filters because '#' also matches the parent level.
                if let Some(leaf) = &self.exact {
                    leaf.visit(f);
                }
                if let Some(leaf) = &self.hash {
                    leaf.visit(f);
                }
            }
            Some(level) => {
                if let Some(leaf) = &self.hash {
                    leaf.visit(f);
                }
                if let Some(plus) = &self.plus {
                    plus.walk(levels.clone(), f);
                }
                if let Some(child) = self.children.get(level) {
                    child.walk(levels, f);
                }
            }
        }
    }
}

impl<K: Eq + Hash, V> Node<K, V> {
    /// Removes `key` from the filter reached by `levels`, pruning every node
    /// left empty on the way back up.
    fn remove<'f>(
        &mut self,
        mut levels: impl Iterator<Item = &'f str>,
        hash: bool,
        key: &K,
    ) -> Option<V> {
        match levels.next() {
            None => {
                let slot = if hash {
                    &mut self.hash
                } else {
                    &mut self.exact
                };
                let leaf = slot.as_mut()?;
                let old = leaf.entries.remove(key)?;
                if leaf.entries.is_empty() {
                    *slot = None;
                }
                Some(old)
            }
            Some("+") => {
                let child = self.plus.as_deref_mut()?;
                let old = child.remove(levels, hash, key)?;
                if child.is_empty() {
                    self.plus = None;
                }
                Some(old)
            }
            Some(level) => {
                let child = self.children.get_mut(level)?;
                let old = child.remove(levels, hash, key)?;
                if child.is_empty() {
                    self.children.remove(level);
                }
                Some(old)
            }
        }
    }
}

/// Splits a filter into the levels leading to its node and whether it ends
/// in `#` (stored in that node's `hash` slot rather than as a level).
///
/// `"#"` has no path levels (it lives at the root); `"a/#"` has path `"a"`.
/// A `#` that is not the last level is invalid; it is treated as a literal
/// so an unvalidated filter cannot panic the trie.
fn split_filter(filter: &str) -> (impl Iterator<Item = &str>, bool) {
    let (path, hash) = if filter == "#" {
        (None, true)
    } else if let Some(p) = filter.strip_suffix("/#") {
        (Some(p), true)
    } else {
        (Some(filter), false)
    };
    (path.into_iter().flat_map(|p| p.split('/')), hash)
}

/// Subscription index mapping topic filters to subscribers.
///
/// `K` identifies a subscriber (e.g. a session id) and `V` carries the
/// subscription options. Each (filter, key) pair holds one value.
pub struct TopicTrie<K, V> {
    root: Node<K, V>,
    len: usize,
}

impl<K, V> Default for TopicTrie<K, V> {
    /// An empty trie.
    fn default() -> Self {
        TopicTrie {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<K, V> TopicTrie<K, V>
where
    K: Clone + Eq + Hash,
    V: Clone,
{
    /// Creates an empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribes `key` to `filter` with options `value`.
    ///
    /// Returns the previous value if `key` was already subscribed to this
    /// exact filter (a re-SUBSCRIBE replaces the options, MQTT-3.8.4-3).
    /// `filter` should have passed
    /// [`validate_topic_filter`](crate::topic::validate_topic_filter).
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let (path, hash) = split_filter(filter);
        let mut node = &mut self.root;
        for level in path {
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.get_or_insert(level)
            };
        }
        let slot = if hash {
            &mut node.hash
        } else {
            &mut node.exact
        };
        let leaf = slot.get_or_insert_with(|| {
            Box::new(Leaf {
                filter: filter.into(),
                entries: Entries::Small(Vec::new()),
            })
        });
        let old = leaf.entries.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Unsubscribes `key` from `filter`, returning its value if it was
    /// subscribed. Nodes left without subscriptions are freed, so memory
    /// tracks the live subscriptions rather than the history of churn.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let (path, hash) = split_filter(filter);
        let old = self.root.remove(path, hash, key)?;
        self.len -= 1;
        Some(old)
    }

    /// Returns the value stored for (`filter`, `key`), if any.
    pub fn get(&self, filter: &str, key: &K) -> Option<&V> {
        let (path, hash) = split_filter(filter);
        let mut node = &self.root;
        for level in path {
            node = if level == "+" {
                node.plus.as_deref()?
            } else {
                node.children.get(level)?
            };
        }
        let slot = if hash { &node.hash } else { &node.exact };
        slot.as_deref()?.entries.get(key)
    }

    /// Number of (filter, key) subscriptions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no subscriptions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of nodes below the root; 0 for an empty trie. Exposed so tests
    /// and metrics can check that removal really frees memory.
    pub fn node_count(&self) -> usize {
        self.root.count() - 1
    }

    /// Calls `f(filter, key, value)` for every subscription whose filter
    /// matches topic name `topic`, each exactly once, in unspecified order.
    ///
    /// Applies MQTT-4.7.2-1: a topic starting with `$` is not matched by
    /// filters starting with `+` or `#`. Does not allocate.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&str, &K, &V)) {
        let f = &mut f;
        let mut levels = topic.split('/');
        // `split` always yields at least one (possibly empty) level.
        let Some(first) = levels.next() else { return };
        let root = &self.root;
        // The '$' rule only concerns the root's wildcard slots; below the
        // first level '$' is an ordinary character.
        if !first.starts_with('$') {
            if let Some(leaf) = &root.hash {
                leaf.visit(f);
            }
            if let Some(plus) = &root.plus {
                plus.walk(levels.clone(), f);
            }
        }
        if let Some(child) = root.children.get(first) {
            child.walk(levels, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::matches;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn matched(t: &TopicTrie<u32, u32>, topic: &str) -> BTreeSet<(String, u32, u32)> {
        let mut out = BTreeSet::new();
        t.for_each_match(topic, |f, k, v| {
            // Each subscription must be reported exactly once.
            assert!(out.insert((f.to_string(), *k, *v)), "duplicate {f} {k}");
        });
        out
    }

    #[test]
    fn basic_insert_match_remove() {
        let mut t = TopicTrie::new();
        assert!(t.is_empty());
        assert_eq!(t.insert("sport/tennis/+", 1u32, 10u32), None);
        assert_eq!(t.insert("sport/#", 2, 20), None);
        assert_eq!(t.insert("#", 3, 30), None);
        assert_eq!(t.insert("sport/tennis/player1", 4, 40), None);
        assert_eq!(t.insert("sport/tennis/+", 1, 11), Some(10));
        assert_eq!(t.len(), 4);
        assert_eq!(t.get("sport/tennis/+", &1), Some(&11));
        assert_eq!(t.get("sport/tennis/+", &2), None);

        let m = matched(&t, "sport/tennis/player1");
        let mut keys: Vec<_> = m.iter().map(|(_, k, _)| *k).collect();
        keys.sort();
        assert_eq!(keys, vec![1, 2, 3, 4]);
        // '#' matches the parent level.
        let m = matched(&t, "sport");
        let mut keys: Vec<_> = m.iter().map(|(_, k, _)| *k).collect();
        keys.sort();
        assert_eq!(keys, vec![2, 3]);
        // '$' topics are not matched by a leading wildcard.
        assert!(matched(&t, "$SYS/x").is_empty());
        t.insert("$SYS/#", 5, 50);
        assert_eq!(matched(&t, "$SYS/x").len(), 1);

        assert_eq!(t.remove("sport/tennis/+", &9), None);
        assert_eq!(t.remove("nope/x", &1), None);
        assert_eq!(t.remove("sport/tennis/+", &1), Some(11));
        assert_eq!(t.remove("sport/#", &2), Some(20));
        assert_eq!(t.remove("#", &3), Some(30));
        assert_eq!(t.remove("sport/tennis/player1", &4), Some(40));
        assert_eq!(t.remove("$SYS/#", &5), Some(50));
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 0);
    }

    #[test]
    fn many_children_and_subscribers_promote_and_demote() {
        let mut t = TopicTrie::new();
        for i in 0..100u32 {
            t.insert(&format!("d/{i}"), i, i);
            t.insert("all/#", i, i);
        }
        assert_eq!(t.len(), 200);
        assert_eq!(matched(&t, "d/42").len(), 1);
        assert_eq!(matched(&t, "all").len(), 100);
        for i in 0..100u32 {
            assert_eq!(t.remove(&format!("d/{i}"), &i), Some(i));
            assert_eq!(t.remove("all/#", &i), Some(i));
            if i < 99 {
                assert_eq!(matched(&t, &format!("d/{}", i + 1)).len(), 1);
            }
        }
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 0);
    }

    #[test]
    fn literal_plus_and_hash_are_distinct_from_wildcards() {
        // Invalid filters must not panic; a non-final '#' is a literal.
        let mut t = TopicTrie::new();
        t.insert("a/#/b", 1u32, 1u32);
        t.insert("", 2, 2);
        assert_eq!(matched(&t, "a/x/b").len(), 0);
        assert_eq!(matched(&t, "").len(), 1);
        assert_eq!(t.remove("a/#/b", &1), Some(1));
        assert_eq!(t.remove("", &2), Some(2));
        assert_eq!(t.node_count(), 0);
    }

    /// Levels over a tiny alphabet so random filters and topics collide
    /// often, including empty levels and '$' levels.
    fn level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "$x", ""])
    }

    /// Any valid filter over the alphabet: levels from {a, b, $x, "", +},
    /// optionally followed by a final '#'.
    fn filter() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![level(), Just("+")], 0..4),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash || levels.is_empty() {
                    levels.push("#");
                }
                levels.join("/")
            })
            // A single empty level joins to "", which is not a valid filter.
            .prop_filter("empty filter", |f| !f.is_empty())
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn trie_agrees_with_reference_matcher(
            subs in prop::collection::vec((filter(), 0u32..3), 0..40),
            topics in prop::collection::vec(topic(), 1..20),
        ) {
            let mut t = TopicTrie::new();
            let mut model = std::collections::HashMap::new();
            for (i, (f, k)) in subs.iter().enumerate() {
                prop_assert!(crate::topic::validate_topic_filter(f, &Default::default()).is_ok());
                t.insert(f, *k, i as u32);
                model.insert((f.clone(), *k), i as u32);
            }
            prop_assert_eq!(t.len(), model.len());
            for topic in &topics {
                let expected: BTreeSet<_> = model
                    .iter()
                    .filter(|((f, _), _)| matches(f, topic))
                    .map(|((f, k), v)| (f.clone(), *k, *v))
                    .collect();
                prop_assert_eq!(matched(&t, topic), expected, "topic {:?}", topic);
            }
        }

        #[test]
        fn insert_remove_keeps_len_and_prunes(
            ops in prop::collection::vec((any::<bool>(), filter(), 0u32..3), 0..80),
        ) {
            let mut t = TopicTrie::new();
            let mut model = std::collections::HashMap::new();
            for (i, (ins, f, k)) in ops.iter().enumerate() {
                if *ins {
                    let old = t.insert(f, *k, i as u32);
                    prop_assert_eq!(old, model.insert((f.clone(), *k), i as u32));
                } else {
                    prop_assert_eq!(t.remove(f, k), model.remove(&(f.clone(), *k)));
                }
                prop_assert_eq!(t.len(), model.len());
                prop_assert_eq!(t.is_empty(), model.is_empty());
            }
            for ((f, k), v) in &model {
                prop_assert_eq!(t.get(f, k), Some(v));
            }
            for ((f, k), v) in model.drain() {
                prop_assert_eq!(t.remove(&f, &k), Some(v));
            }
            prop_assert!(t.is_empty());
            prop_assert_eq!(t.node_count(), 0);
        }
    }
}
