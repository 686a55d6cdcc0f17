//! A tenant's routing namespace: its subscription trie and its retained messages. Every topic,
//! subscription and retained message lives in exactly one tenant, so a `#` in one tenant never
//! sees another.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fleetmq_protocol::topic::matches;
use fleetmq_protocol::trie::TopicTrie;
use parking_lot::RwLock;

use crate::message::Message;
use crate::session::{Session, SubOptions};

/// Identity of one subscription in the trie: the session, plus the share group for
/// `$share/<group>/<filter>` (a session may hold both a plain and a shared subscription on the
/// same filter).
#[derive(Debug, Clone)]
pub struct SubKey {
    pub session: Arc<Session>,
    pub share: Option<Arc<str>>,
}

impl PartialEq for SubKey {
    fn eq(&self, other: &Self) -> bool {
        self.session.id == other.session.id && self.share == other.share
    }
}
impl Eq for SubKey {}
impl Hash for SubKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.session.id.hash(state);
        self.share.hash(state);
    }
}

/// Routing state of one tenant.
#[derive(Default)]
pub struct Tenant {
    pub name: String,
    pub subs: RwLock<TopicTrie<SubKey, SubOptions>>,
    /// Retained messages by topic; ordered so a filter's literal prefix narrows the scan.
    pub retained: RwLock<BTreeMap<String, Arc<Message>>>,
    /// Round-robin cursor for shared subscription groups.
    pub share_cursor: AtomicUsize,
    /// Connections, sessions, subscriptions and inbound rate of the tenant on this node.
    pub usage: crate::quota::Usage,
}

impl Tenant {
    /// An empty namespace.
    pub fn new(name: &str) -> Arc<Tenant> {
        Arc::new(Tenant {
            name: name.to_string(),
            ..Tenant::default()
        })
    }

    /// Retained messages whose topic matches `filter`.
    pub fn retained_matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let retained = self.retained.read();
        let wildcard = filter.find(['+', '#']);
        match wildcard {
            None => retained.get(filter).cloned().into_iter().collect(),
            Some(at) => {
                // Without the trailing '/', so `a/#` also finds the parent topic `a`.
                let prefix = filter[..at].trim_end_matches('/');
                retained
                    .range(prefix.to_string()..)
                    .take_while(|(t, _)| t.starts_with(prefix))
                    .filter(|(t, _)| matches(filter, t))
                    .map(|(_, m)| m.clone())
                    .collect()
            }
        }
    }

    /// Next value of the shared-subscription cursor.
    pub fn next_share(&self) -> usize {
        self.share_cursor.fetch_add(1, Ordering::Relaxed)
    }
}
