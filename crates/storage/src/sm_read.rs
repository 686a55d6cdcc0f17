//! Reads of the state machine for recovery, and its snapshots.

use std::collections::HashMap;

use crate::error::{Result, StorageError};
use crate::keys;
use crate::records::{
    Entry, QueueEntry, RecoveredSession, SessionKey, SessionRecord, Space, StoredMessage, Target,
};
use crate::state_machine::{
    decode, encode, entry_key, entry_prefix, message_key, tagged, MessageSlot, StateMachineStore,
    INBOUND, MESSAGE, META_APPLIED, META_MEMBERSHIP, OUTBOX, QUEUE, RETAINED, SESSION,
};

/// An unfinished outbox entry: `(id, message, targets in other shards)`.
pub type OutboxEntry = (u64, StoredMessage, Vec<Target>);

const SNAPSHOT_CURRENT: &[u8] = b"current";

fn corrupt(what: &str) -> StorageError {
    StorageError::Corrupt {
        tree: "sm".into(),
        what: what.into(),
    }
}

impl StateMachineStore {
    /// All persistent sessions with their queues (in seq order) and inbound QoS 2 ids.
    pub fn sessions(&self) -> Result<Vec<RecoveredSession>> {
        self.write_back()?;
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([SESSION]) {
            let (k, v) = kv?;
            let (key, rest) = keys::take_session(&k[1..]).ok_or_else(|| corrupt("session key"))?;
            if !rest.is_empty() {
                return Err(corrupt("session key has trailing bytes"));
            }
            let record: SessionRecord = decode(&v)?;
            out.push(self.recover(key, record)?);
        }
        Ok(out)
    }

    /// One session, if it exists.
    pub fn session(&self, key: &SessionKey) -> Result<Option<RecoveredSession>> {
        self.write_back()?;
        match self.tree.get(tagged(SESSION, key)?)? {
            Some(v) => Ok(Some(self.recover(key.clone(), decode(&v)?)?)),
            None => Ok(None),
        }
    }

    fn recover(&self, key: SessionKey, record: SessionRecord) -> Result<RecoveredSession> {
        let qp = tagged(QUEUE, &key)?;
        let mut queue = Vec::new();
        for kv in self.tree.scan_prefix(&qp) {
            let (k, v) = kv?;
            let seq = keys::read_u64(&k[qp.len()..]).ok_or_else(|| corrupt("queue seq"))?;
            let entry: QueueEntry = decode(&v)?;
            match self.tree.get(message_key(entry.msg_id))? {
                Some(m) => {
                    let slot: MessageSlot = decode(&m)?;
                    queue.push((seq, entry, slot.message));
                }
                // Recovery keeps going: one lost message must not make every session unusable.
                None => tracing::warn!(msg_id = entry.msg_id, seq, "queued message missing"),
            }
        }
        let ip = tagged(INBOUND, &key)?;
        let mut inbound_pids = Vec::new();
        for kv in self.tree.scan_prefix(&ip) {
            let (k, _) = kv?;
            inbound_pids.push(keys::read_u16(&k[ip.len()..]).ok_or_else(|| corrupt("pid"))?);
        }
        Ok(RecoveredSession {
            key,
            record,
            queue,
            inbound_pids,
        })
    }

    /// All retained messages as `(tenant, topic, message)`, ordered by tenant then topic.
    pub fn retained(&self) -> Result<Vec<(String, String, StoredMessage)>> {
        self.write_back()?;
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([RETAINED]) {
            let (k, v) = kv?;
            let (tenant, rest) = keys::take_str(&k[1..]).ok_or_else(|| corrupt("retained key"))?;
            let (topic, _) = keys::take_str(rest).ok_or_else(|| corrupt("retained key"))?;
            out.push((tenant, topic, decode(&v)?));
        }
        Ok(out)
    }

    /// Every directory entry of a space, grouped by tenant (key order: length-prefixed strings,
    /// so not alphabetical).
    pub fn entries(&self, space: Space) -> Result<Vec<Entry>> {
        self.write_back()?;
        let prefix = entry_prefix(space, None)?;
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let (tenant, rest) =
                keys::take_str(&k[prefix.len()..]).ok_or_else(|| corrupt("entry key"))?;
            let (name, _) = keys::take_str(rest).ok_or_else(|| corrupt("entry key"))?;
            out.push((space, tenant, name, v.to_vec()));
        }
        Ok(out)
    }

    /// The outbox entries not yet done: `(id, message, targets in other shards)`, by id.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>> {
        self.write_back()?;
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([OUTBOX]) {
            let (k, v) = kv?;
            let id = keys::read_u64(&k[1..]).ok_or_else(|| corrupt("outbox id"))?;
            let (message, targets): (StoredMessage, Vec<Target>) = decode(&v)?;
            out.push((id, message, targets));
        }
        Ok(out)
    }

    /// One directory entry, if present.
    pub fn entry(&self, space: Space, tenant: &str, name: &str) -> Result<Option<Vec<u8>>> {
        self.write_back()?;
        Ok(self
            .tree
            .get(entry_key(space, tenant, name)?)?
            .map(|v| v.to_vec()))
    }

    /// The opaque last-applied marker the cluster layer stored, if any.
    pub fn last_applied_raw(&self) -> Result<Option<Vec<u8>>> {
        self.write_back()?;
        Ok(self.tree.get(META_APPLIED)?.map(|v| v.to_vec()))
    }

    /// The opaque last-membership marker the cluster layer stored, if any.
    pub fn last_membership_raw(&self) -> Result<Option<Vec<u8>>> {
        self.write_back()?;
        Ok(self.tree.get(META_MEMBERSHIP)?.map(|v| v.to_vec()))
    }

    /// Every key/value of the state machine tree (including the meta markers), bincode-encoded.
    /// sled iteration is not a point-in-time view, so call this only while nothing applies.
    pub fn snapshot_bytes(&self) -> Result<Vec<u8>> {
        self.write_back()?;
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            pairs.push((k.to_vec(), v.to_vec()));
        }
        encode(&pairs)
    }

    /// Replaces the whole tree with a snapshot from [`snapshot_bytes`](Self::snapshot_bytes),
    /// in one batch so a crash leaves either the old or the new state.
    pub fn install_snapshot_bytes(&self, bytes: &[u8]) -> Result<()> {
        self.discard_pending();
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = decode(bytes)?;
        let mut batch = sled::Batch::default();
        for kv in self.tree.iter() {
            let (k, _) = kv?;
            batch.remove(k);
        }
        for (k, v) in pairs {
            batch.insert(k, v);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Keeps the latest built or received snapshot (opaque meta + data) so it survives restarts.
    pub fn save_snapshot(&self, meta: &[u8], data: &[u8]) -> Result<()> {
        self.snapshot_tree
            .insert(SNAPSHOT_CURRENT, encode(&(meta, data))?)?;
        Ok(())
    }

    /// The snapshot saved by [`save_snapshot`](Self::save_snapshot), as `(meta, data)`.
    pub fn read_snapshot(&self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        match self.snapshot_tree.get(SNAPSHOT_CURRENT)? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Consistency check: every stored message is referenced by exactly `refcount` queue
    /// entries and every queue entry points at a stored message.
    pub fn verify_refcounts(&self) -> Result<()> {
        self.write_back()?;
        let mut refs: HashMap<u64, u64> = HashMap::new();
        for kv in self.tree.scan_prefix([QUEUE]) {
            let (_, v) = kv?;
            let entry: QueueEntry = decode(&v)?;
            *refs.entry(entry.msg_id).or_default() += 1;
        }
        let mut seen = 0usize;
        for kv in self.tree.scan_prefix([MESSAGE]) {
            let (k, v) = kv?;
            let id = keys::read_u64(&k[1..]).ok_or_else(|| corrupt("message id"))?;
            let slot: MessageSlot = decode(&v)?;
            let actual = refs.get(&id).copied().unwrap_or(0);
            if actual != slot.refcount {
                return Err(corrupt(&format!(
                    "message {id} refcount {} but {actual} queue entries",
                    slot.refcount
                )));
            }
            seen += 1;
        }
        if seen != refs.len() {
            return Err(corrupt("queue entries point at missing messages"));
        }
        Ok(())
    }
}
