//! The deterministic state machine of one group, kept in the sled tree `sm/<group>`.
//!
//! Layout inside the tree (first byte is the record kind, then big-endian parts):
//!
//! | kind | key | value |
//! | --- | --- | --- |
//! | `0x00` meta | `0x00` + name | opaque bytes (last applied log id, last membership) |
//! | `0x01` session | session key | `SessionRecord` |
//! | `0x02` queue | session key + seq u64 | `QueueEntry` |
//! | `0x03` message | msg id u64 | `MessageSlot` (message + refcount) |
//! | `0x04` inbound QoS 2 pid | session key + pid u16 | empty |
//! | `0x05` retained | tenant + topic | `StoredMessage` |
//! | `0x06` next seq | session key | u64 |
//! | `0x07` directory entry | space u8 + tenant + name | opaque (JSON from the node) |
//! | `0x08` outbox | id u64 | `(StoredMessage, Vec<Target>)` for other shards |
//! | `0x09` seen origin | group u64 + id u64 | empty |
//! | `0x10`–`0x18` | device data | see `domain/apply.rs` |
//!
//! Every entry is applied as one `sled::Batch` together with the last-applied marker, so after a
//! crash either the whole entry and its marker are there or neither is, and replaying the log
//! from the marker on is exact.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StorageError};
use crate::keys;
use crate::overlay::{Overlay, Pending};
use crate::records::{
    Command, DeliveryState, QueueEntry, Response, SessionKey, SessionRecord, Space, StoredMessage,
    SubscriptionRecord, Target,
};

pub(crate) const SESSION: u8 = 0x01;
pub(crate) const QUEUE: u8 = 0x02;
pub(crate) const MESSAGE: u8 = 0x03;
pub(crate) const INBOUND: u8 = 0x04;
pub(crate) const RETAINED: u8 = 0x05;
pub(crate) const NEXT_SEQ: u8 = 0x06;
pub(crate) const ENTRY: u8 = 0x07;
pub(crate) const OUTBOX: u8 = 0x08;
pub(crate) const SEEN: u8 = 0x09;

pub(crate) const META_APPLIED: &[u8] = b"\x00last_applied";
pub(crate) const META_MEMBERSHIP: &[u8] = b"\x00membership";

/// Seq slot returned for a publish target whose session does not exist: nothing is queued for
/// it, but `Response::Published::seqs` keeps one slot per target so positions line up.
pub const NO_SESSION_SEQ: u64 = u64::MAX;

/// At most this many commands fit in one entry, because message ids are
/// `log_index << 16 | command_index`.
pub const MAX_COMMANDS_PER_ENTRY: usize = 1 << 16;

/// A message as stored: once, with the number of queue entries that point at it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MessageSlot {
    /// Must stay the first field: `unref` reads it from the first 8 bytes (bincode, fixint LE).
    pub(crate) refcount: u64,
    pub(crate) message: StoredMessage,
}

/// State machine of one Raft group over its sled tree.
#[derive(Clone)]
pub struct StateMachineStore {
    pub(crate) tree: sled::Tree,
    pub(crate) snapshot_tree: sled::Tree,
    /// Applied entries not yet written to `tree` (see `overlay.rs` for why this is safe).
    pub(crate) pending: std::sync::Arc<std::sync::Mutex<Pending>>,
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(bincode::serialize(v)?)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    Ok(bincode::deserialize(bytes)?)
}

pub(crate) fn tagged(tag: u8, key: &SessionKey) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(5 + key.tenant.len() + key.client_id.len() + 8);
    buf.push(tag);
    keys::put_session(&mut buf, key)?;
    Ok(buf)
}

fn queue_key(key: &SessionKey, seq: u64) -> Result<Vec<u8>> {
    let mut k = tagged(QUEUE, key)?;
    k.extend_from_slice(&keys::u64_key(seq));
    Ok(k)
}

fn inbound_key(key: &SessionKey, pid: u16) -> Result<Vec<u8>> {
    let mut k = tagged(INBOUND, key)?;
    k.extend_from_slice(&pid.to_be_bytes());
    Ok(k)
}

pub(crate) fn message_key(id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(MESSAGE);
    k.extend_from_slice(&keys::u64_key(id));
    k
}

pub(crate) fn outbox_key(id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(OUTBOX);
    k.extend_from_slice(&keys::u64_key(id));
    k
}

fn seen_key(group: u64, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(SEEN);
    k.extend_from_slice(&keys::u64_key(group));
    k.extend_from_slice(&keys::u64_key(id));
    k
}

fn retained_key(tenant: &str, topic: &str) -> Result<Vec<u8>> {
    let mut k = vec![RETAINED];
    keys::put_str(&mut k, tenant)?;
    keys::put_str(&mut k, topic)?;
    Ok(k)
}

pub(crate) fn entry_prefix(space: Space, tenant: Option<&str>) -> Result<Vec<u8>> {
    let mut k = vec![ENTRY, space as u8];
    if let Some(t) = tenant {
        keys::put_str(&mut k, t)?;
    }
    Ok(k)
}

pub(crate) fn entry_key(space: Space, tenant: &str, name: &str) -> Result<Vec<u8>> {
    let mut k = entry_prefix(space, Some(tenant))?;
    keys::put_str(&mut k, name)?;
    Ok(k)
}

/// Checks that every string in a command fits the key encoding, so a proposal that would fail
/// to apply can be refused before it enters the log.
pub fn validate(cmd: &Command) -> Result<()> {
    let mut scratch = Vec::new();
    let mut key = |k: &SessionKey| keys::put_session(&mut scratch, k);
    match cmd {
        Command::PutSession { key: k, .. }
        | Command::DeleteSession { key: k }
        | Command::SetDisconnected { key: k, .. }
        | Command::Subscribe { key: k, .. }
        | Command::Unsubscribe { key: k, .. }
        | Command::Release { key: k, .. }
        | Command::Ack { key: k, .. }
        | Command::AckMany { key: k, .. }
        | Command::InboundRelease { key: k, .. }
        | Command::ExpireSession { key: k, .. } => key(k),
        Command::Enqueue { targets, .. } => {
            for t in targets {
                key(&t.key)?;
            }
            Ok(())
        }
        Command::Publish {
            targets, inbound, ..
        } => {
            for t in targets {
                key(&t.key)?;
            }
            if let Some((k, _)) = inbound {
                key(k)?;
            }
            Ok(())
        }
        Command::PublishOutbox {
            inbound,
            targets,
            outbox,
            ..
        } => {
            for t in targets.iter().map(|(t, _)| t).chain(outbox) {
                key(&t.key)?;
            }
            key(&inbound.0)
        }
        Command::EnqueueOnce { targets, .. } => {
            for t in targets {
                key(&t.key)?;
            }
            Ok(())
        }
        Command::OutboxDone { .. } | Command::ForgetOrigins { .. } => Ok(()),
        Command::Device(b) => {
            keys::put_str(&mut Vec::new(), &b.tenant)?;
            for op in &b.ops {
                if let Err(why) = op.check() {
                    tracing::info!(why, "device op refused");
                    return Err(StorageError::KeyTooLong(crate::domain::MAX_KEY_TEXT + 1));
                }
            }
            Ok(())
        }
        Command::SetRetained { tenant, topic, .. } => retained_key(tenant, topic).map(|_| ()),
        Command::PutEntry {
            space,
            tenant,
            name,
            ..
        }
        | Command::DeleteEntry {
            space,
            tenant,
            name,
        } => entry_key(*space, tenant, name).map(|_| ()),
        Command::DeleteTenantEntries { space, tenant } => {
            entry_prefix(*space, Some(tenant)).map(|_| ())
        }
    }
}

impl StateMachineStore {
    /// Applies all commands of the log entry at `log_index` atomically, together with the
    /// opaque last-applied marker (and membership, if this entry changed it).
    ///
    /// The caller (the Raft adapter) skips entries at or below the last applied index; this
    /// function does not check, so a test can observe that data and marker land together.
    pub fn apply(
        &self,
        log_index: u64,
        cmds: &[Command],
        applied_meta: Option<(&[u8], Option<&[u8]>)>,
    ) -> Result<Vec<Response>> {
        if cmds.len() > MAX_COMMANDS_PER_ENTRY {
            return Err(StorageError::TooManyCommands(cmds.len()));
        }
        let mut pending = self.lock_pending();
        if pending.failed {
            return Err(StorageError::WriteBackFailed);
        }
        let mut ov = Overlay::new(&self.tree, &pending.writes);
        let mut out = Vec::with_capacity(cmds.len());
        for (i, cmd) in cmds.iter().enumerate() {
            let msg_id = (log_index << 16) | i as u64;
            out.push(apply_one(&mut ov, msg_id, cmd)?);
        }
        if let Some((applied, membership)) = applied_meta {
            ov.put(META_APPLIED.to_vec(), applied.to_vec());
            if let Some(m) = membership {
                ov.put(META_MEMBERSHIP.to_vec(), m.to_vec());
            }
        }
        let writes = ov.into_writes();
        pending.absorb(writes);
        if pending.due() {
            if let Some(batch) = pending.take_batch() {
                if let Err(e) = self.tree.apply_batch(batch) {
                    pending.failed = true;
                    return Err(e.into());
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding the lock cannot leave half-merged writes behind (absorb is
        // the only mutation), so a poisoned lock is still usable.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes every applied-but-staged entry to the tree (atomically with its last-applied
    /// marker). Reads and snapshots call this first; so does shutdown.
    pub fn write_back(&self) -> Result<()> {
        let mut pending = self.lock_pending();
        if pending.failed {
            return Err(StorageError::WriteBackFailed);
        }
        if let Some(batch) = pending.take_batch() {
            if let Err(e) = self.tree.apply_batch(batch) {
                pending.failed = true;
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Drops staged writes (before installing a snapshot, which replaces everything).
    pub(crate) fn discard_pending(&self) {
        self.lock_pending().clear();
    }

    /// Records last applied (and membership) for an entry without commands (blank, membership).
    pub fn set_applied(&self, last_applied: &[u8], membership: Option<&[u8]>) -> Result<()> {
        self.apply(0, &[], Some((last_applied, membership)))
            .map(|_| ())
    }
}

fn apply_one(ov: &mut Overlay<'_>, msg_id: u64, cmd: &Command) -> Result<Response> {
    match cmd {
        Command::PutSession { key, record, fresh } => put_session(ov, key, record, *fresh)?,
        Command::DeleteSession { key } => {
            drop_session_state(ov, key)?;
            ov.del(tagged(SESSION, key)?);
        }
        Command::ExpireSession { key, holder } => {
            let hk = entry_key(Space::Holder, &key.tenant, &key.client_id)?;
            if ov.get(&hk)?.as_deref() != holder.as_deref() {
                return Ok(Response::Kept);
            }
            drop_session_state(ov, key)?;
            ov.del(tagged(SESSION, key)?);
            ov.del(hk);
        }
        Command::SetDisconnected { key, at_ms } => {
            update_record(ov, key, |r| r.disconnected_at_ms = *at_ms)?;
        }
        Command::Subscribe { key, sub } => update_record(ov, key, |r| upsert_sub(r, sub))?,
        Command::Unsubscribe { key, filter } => {
            update_record(ov, key, |r| r.subscriptions.retain(|s| &s.filter != filter))?;
        }
        Command::Publish {
            message,
            targets,
            inbound,
        } => {
            return publish(ov, msg_id, message, targets.iter(), inbound.as_ref());
        }
        Command::Enqueue { message, targets } => {
            return publish(ov, msg_id, message, targets.iter(), None);
        }
        Command::PublishOutbox {
            message,
            inbound,
            targets,
            outbox,
        } => {
            let local = targets.iter().map(|(t, _)| t);
            let seqs = match publish(ov, msg_id, message, local, Some(inbound))? {
                Response::Published { seqs } => seqs,
                other => return Ok(other),
            };
            if outbox.is_empty() {
                return Ok(Response::Outboxed { seqs, id: 0 });
            }
            ov.put(outbox_key(msg_id), encode(&(message, outbox))?);
            return Ok(Response::Outboxed { seqs, id: msg_id });
        }
        Command::EnqueueOnce {
            origin,
            message,
            targets,
        } => {
            let k = seen_key(origin.0, origin.1);
            if ov.contains(&k)? {
                return Ok(Response::Published {
                    seqs: vec![NO_SESSION_SEQ; targets.len()],
                });
            }
            ov.put(k, Vec::new());
            return publish(ov, msg_id, message, targets.iter(), None);
        }
        Command::OutboxDone { id } => ov.del(outbox_key(*id)),
        Command::Device(batch) => {
            return Ok(Response::Device(crate::domain::apply::apply_batch(
                ov, batch,
            )?))
        }
        Command::ForgetOrigins { group, below } => {
            let mut prefix = vec![SEEN];
            prefix.extend_from_slice(&keys::u64_key(*group));
            for k in ov.keys_with_prefix(&prefix)? {
                let id = k.get(9..).and_then(keys::read_u64).unwrap_or(0);
                if id < *below {
                    ov.del(k);
                }
            }
        }
        Command::Release { key, seq } => {
            let k = queue_key(key, *seq)?;
            if let Some(v) = ov.get(&k)? {
                let mut entry: QueueEntry = decode(&v)?;
                entry.state = DeliveryState::Released;
                ov.put(k, encode(&entry)?);
            }
        }
        Command::Ack { key, seq } => ack(ov, key, *seq)?,
        Command::AckMany { key, seqs } => {
            for seq in seqs {
                ack(ov, key, *seq)?;
            }
        }
        Command::InboundRelease { key, pid } => ov.del(inbound_key(key, *pid)?),
        Command::SetRetained {
            tenant,
            topic,
            message,
        } => {
            let k = retained_key(tenant, topic)?;
            match message {
                Some(m) => ov.put(k, encode(m)?),
                None => ov.del(k),
            }
        }
        Command::PutEntry {
            space,
            tenant,
            name,
            value,
            create_only,
        } => {
            let k = entry_key(*space, tenant, name)?;
            if *create_only && ov.contains(&k)? {
                return Ok(Response::Exists);
            }
            ov.put(k, value.clone());
        }
        Command::DeleteEntry {
            space,
            tenant,
            name,
        } => ov.del(entry_key(*space, tenant, name)?),
        Command::DeleteTenantEntries { space, tenant } => {
            for k in ov.keys_with_prefix(&entry_prefix(*space, Some(tenant))?)? {
                ov.del(k);
            }
        }
    }
    Ok(Response::Ok)
}

/// `fresh` stores the record as given after dropping queue and inbound ids. Otherwise the
/// settings (expiry, protocol, disconnected_at) are replaced and the given subscriptions are
/// merged by filter into the existing ones, so a resumed session never loses a subscription
/// because the caller sent a record without them; removal is `Unsubscribe`'s job.
fn put_session(
    ov: &mut Overlay<'_>,
    key: &SessionKey,
    record: &SessionRecord,
    fresh: bool,
) -> Result<()> {
    let k = tagged(SESSION, key)?;
    let existing = if fresh { None } else { ov.get(&k)? };
    let stored = match existing {
        Some(v) => {
            let mut old: SessionRecord = decode(&v)?;
            old.expiry_secs = record.expiry_secs;
            old.protocol = record.protocol;
            old.disconnected_at_ms = record.disconnected_at_ms;
            for sub in &record.subscriptions {
                upsert_sub(&mut old, sub);
            }
            old
        }
        None => {
            if fresh {
                drop_session_state(ov, key)?;
            }
            record.clone()
        }
    };
    ov.put(k, encode(&stored)?);
    Ok(())
}

fn upsert_sub(record: &mut SessionRecord, sub: &SubscriptionRecord) {
    match record
        .subscriptions
        .iter_mut()
        .find(|s| s.filter == sub.filter)
    {
        Some(s) => *s = sub.clone(),
        None => record.subscriptions.push(sub.clone()),
    }
}

fn update_record(
    ov: &mut Overlay<'_>,
    key: &SessionKey,
    f: impl FnOnce(&mut SessionRecord),
) -> Result<()> {
    let k = tagged(SESSION, key)?;
    if let Some(v) = ov.get(&k)? {
        let mut record: SessionRecord = decode(&v)?;
        f(&mut record);
        ov.put(k, encode(&record)?);
    }
    Ok(())
}

/// Drops queue entries (releasing their message references) and inbound ids. The next_seq
/// counter is kept on purpose: seqs stay monotonic per key even across delete + recreate, so a
/// late Ack for an old delivery can never hit a new one. The cost is one small key per client
/// id ever seen.
fn drop_session_state(ov: &mut Overlay<'_>, key: &SessionKey) -> Result<()> {
    for k in ov.keys_with_prefix(&tagged(QUEUE, key)?)? {
        if let Some(v) = ov.get(&k)? {
            let entry: QueueEntry = decode(&v)?;
            unref(ov, entry.msg_id)?;
        }
        ov.del(k);
    }
    for k in ov.keys_with_prefix(&tagged(INBOUND, key)?)? {
        ov.del(k);
    }
    Ok(())
}

fn ack(ov: &mut Overlay<'_>, key: &SessionKey, seq: u64) -> Result<()> {
    let k = queue_key(key, seq)?;
    if let Some(v) = ov.get(&k)? {
        let entry: QueueEntry = decode(&v)?;
        ov.del(k);
        unref(ov, entry.msg_id)?;
    }
    Ok(())
}

fn unref(ov: &mut Overlay<'_>, msg_id: u64) -> Result<()> {
    let k = message_key(msg_id);
    // The refcount is the slot's first field, so the common case (last reference) deletes the
    // message without decoding or copying it.
    let Some(refcount) = ov.peek_u64(&k)? else {
        tracing::warn!(msg_id, "queue entry points at a missing message");
        return Ok(());
    };
    if refcount <= 1 {
        ov.del(k);
        return Ok(());
    }
    let Some(v) = ov.get(&k)? else {
        return Ok(());
    };
    let mut slot: MessageSlot = decode(&v)?;
    slot.refcount = refcount - 1;
    ov.put(k, encode(&slot)?);
    Ok(())
}

fn publish<'t>(
    ov: &mut Overlay<'_>,
    msg_id: u64,
    message: &StoredMessage,
    targets: impl ExactSizeIterator<Item = &'t Target>,
    inbound: Option<&(SessionKey, u16)>,
) -> Result<Response> {
    if let Some((key, pid)) = inbound {
        let k = inbound_key(key, *pid)?;
        if ov.contains(&k)? {
            return Ok(Response::DuplicateInbound);
        }
        ov.put(k, Vec::new());
    }
    let mut seqs = Vec::with_capacity(targets.len());
    let mut refs = 0u64;
    for t in targets {
        if !ov.contains(&tagged(SESSION, &t.key)?)? {
            seqs.push(NO_SESSION_SEQ);
            continue;
        }
        let seq = take_seq(ov, &t.key)?;
        let entry = QueueEntry {
            msg_id,
            qos: t.qos,
            retain: t.retain,
            subscription_ids: t.subscription_ids.clone(),
            state: DeliveryState::Pending,
        };
        ov.put_fresh(queue_key(&t.key, seq)?, encode(&entry)?);
        refs += 1;
        seqs.push(seq);
    }
    if refs > 0 {
        let slot = MessageSlot {
            refcount: refs,
            message: message.clone(),
        };
        ov.put_fresh(message_key(msg_id), encode(&slot)?);
    }
    Ok(Response::Published { seqs })
}

/// Returns the session's next seq (starting at 1) and advances the counter.
fn take_seq(ov: &mut Overlay<'_>, key: &SessionKey) -> Result<u64> {
    let k = tagged(NEXT_SEQ, key)?;
    let seq = match ov.get(&k)? {
        Some(v) => keys::read_u64(&v).ok_or_else(|| StorageError::Corrupt {
            tree: "sm".into(),
            what: "next_seq is not 8 bytes".into(),
        })?,
        None => 1,
    };
    ov.put(k, keys::u64_key(seq.saturating_add(1)).to_vec());
    Ok(seq)
}
