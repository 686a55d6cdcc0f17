//! Durable records and the commands that change them. These are plain data: the state machine
//! applies them deterministically, the Raft log carries them, and nothing here does I/O.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Identity of a session and of everything keyed by device: `(tenant, client/device identifier)`.
/// Shards are later chosen by a hash of this key, so every record that belongs to a device is
/// keyed by it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionKey {
    pub tenant: String,
    pub client_id: String,
}

impl SessionKey {
    /// Builds a key from its two parts.
    pub fn new(tenant: impl Into<String>, client_id: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            client_id: client_id.into(),
        }
    }
}

/// A subscription as a persistent session keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    /// The filter as the client sent it, including any `$share/<group>/` prefix.
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// MQTT 5 retain handling: 0 send on subscribe, 1 only if new, 2 never.
    pub retain_handling: u8,
    pub subscription_id: Option<u32>,
}

/// The durable part of a persistent session (clean start = false or session expiry > 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session expiry interval in seconds; `u32::MAX` means never.
    pub expiry_secs: u32,
    /// MQTT protocol level the session was last connected with (3, 4 or 5).
    pub protocol: u8,
    /// Wall-clock milliseconds when the last connection ended; `None` while connected.
    pub disconnected_at_ms: Option<u64>,
    pub subscriptions: Vec<SubscriptionRecord>,
}

/// Message attributes that MQTT 5 carries end to end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageProps {
    pub payload_format_indicator: Option<u8>,
    /// Absolute expiry time in wall-clock milliseconds (from Message Expiry Interval).
    pub expires_at_ms: Option<u64>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

/// An application message, stored once however many sessions it is queued for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: Bytes,
    /// QoS the publisher used.
    pub qos: u8,
    pub retain: bool,
    pub props: MessageProps,
    /// Identity of the publishing session, for no-local checks after a restart.
    pub publisher: Option<SessionKey>,
}

/// One target of a durable publish: a persistent session that must get the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub key: SessionKey,
    /// QoS the message is delivered with (min of publish QoS and granted QoS).
    pub qos: u8,
    /// RETAIN flag as it goes out to this subscriber (retain-as-published).
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
}

/// State of one queued delivery to a persistent session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryState {
    /// Not yet acknowledged: (re)send the PUBLISH.
    Pending,
    /// QoS 2 PUBREC received: only PUBREL may be (re)sent, never the PUBLISH again.
    Released,
}

/// A queued delivery as it is stored: the message by id, plus what is specific to this session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub msg_id: u64,
    pub qos: u8,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    pub state: DeliveryState,
}

/// A change to durable state. Applied in log order, deterministically, on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create a session or replace its settings. `fresh` discards any previous state
    /// (subscriptions, queue, inbound QoS 2 ids) first, as a clean start does.
    PutSession {
        key: SessionKey,
        record: SessionRecord,
        fresh: bool,
    },
    /// Remove a session and everything queued for it (expiry, or a clean start taking over).
    DeleteSession { key: SessionKey },
    /// Record the end of a connection (starts the expiry clock) or its start (`None`).
    SetDisconnected { key: SessionKey, at_ms: Option<u64> },
    /// Add or replace (same filter) a subscription.
    Subscribe {
        key: SessionKey,
        sub: SubscriptionRecord,
    },
    /// Remove a subscription by filter.
    Unsubscribe { key: SessionKey, filter: String },
    /// Store a message once and queue it for each target; optionally record the inbound QoS 2
    /// packet id of the publishing session in the same step, so that a retransmitted PUBLISH
    /// after a crash is recognised as a duplicate.
    Publish {
        message: StoredMessage,
        targets: Vec<Target>,
        inbound: Option<(SessionKey, u16)>,
    },
    /// QoS 2 PUBREC received for the delivery with this sequence number.
    Release { key: SessionKey, seq: u64 },
    /// Delivery finished (PUBACK for QoS 1, PUBCOMP for QoS 2) or dropped (expired, over limit).
    Ack { key: SessionKey, seq: u64 },
    /// Several deliveries of one session finished at once (acknowledgements that arrived
    /// together are committed as one command, not one each).
    AckMany { key: SessionKey, seqs: Vec<u64> },
    /// PUBREL received from the publishing session: forget its inbound QoS 2 packet id.
    InboundRelease { key: SessionKey, pid: u16 },
    /// Set (`Some`) or clear (`None`) the retained message of a topic in a tenant.
    SetRetained {
        tenant: String,
        topic: String,
        message: Option<StoredMessage>,
    },
    /// Store a directory entry (tenant, user, registration request, trusted certificate, node
    /// secret). With `create_only`, an existing entry is left alone and the answer is
    /// `Response::Exists`, so two nodes creating the same name cannot both win.
    PutEntry {
        space: Space,
        tenant: String,
        name: String,
        value: Vec<u8>,
        create_only: bool,
    },
    /// Remove one directory entry.
    DeleteEntry {
        space: Space,
        tenant: String,
        name: String,
    },
    /// Remove every entry of a tenant in a space (deleting a tenant).
    DeleteTenantEntries { space: Space, tenant: String },
    /// Store a message once and queue it for sessions no node holds in memory (their node
    /// died, or none took them yet), so a message to an offline persistent session is never
    /// lost with a node. Applied like `Publish`; a node that holds one of the targets by the
    /// time it applies this queues the delivery in memory too. (Appended last: variant indexes
    /// of older commands stay as they are in existing logs.)
    Enqueue {
        message: StoredMessage,
        targets: Vec<Target>,
    },
    /// Remove an expired session that no live node holds, only if its `Space::Holder` entry
    /// is still `holder` (`None`: absent). A node that claimed the session in between changed
    /// that entry first, so the session it loaded is never deleted under it (`Response::Kept`).
    ExpireSession {
        key: SessionKey,
        holder: Option<Vec<u8>>,
    },
    /// A publish that records the publisher's inbound QoS 2 id, applied in the publisher's
    /// shard. Each target is marked `true` when the proposing node delivers it from the answer
    /// (it holds the session, as for `Publish`) or `false` when the node holding it learns of
    /// it by applying (as for `Enqueue`). Targets of this shard are queued in this step; the
    /// others (`outbox`) are kept with the message until `OutboxDone`, so that their shards
    /// queue them exactly once (`EnqueueOnce`) even if the proposing node dies in between:
    /// the shard's leader redoes what is left. The answer is `Outboxed` (or
    /// `DuplicateInbound`, with nothing queued or kept).
    PublishOutbox {
        message: StoredMessage,
        inbound: (SessionKey, u16),
        targets: Vec<(Target, bool)>,
        /// The other shards' targets: the nodes holding those sessions learn of them by
        /// applying their shard's `EnqueueOnce`.
        outbox: Vec<Target>,
    },
    /// Targets of outbox entry `origin` = (group, id) of another shard, queued as `Enqueue`
    /// would (the node holding each session learns of it by applying this), unless that origin
    /// was applied here before (then nothing changes and every seq is `NO_SESSION_SEQ`).
    EnqueueOnce {
        origin: (u64, u64),
        message: StoredMessage,
        targets: Vec<Target>,
    },
    /// Every other shard has queued outbox entry `id` of this group: it goes.
    OutboxDone { id: u64 },
    /// The origins of `group` below id `below` will never be sent again (that group's outbox
    /// holds nothing older): their records here go.
    ForgetOrigins { group: u64, below: u64 },
    /// Device data changes (and consistent reads) of one tenant in one group: the
    /// Cumulocity data model of `domain`. Each op is answered in `Response::Device`.
    Device(crate::domain::DeviceBatch),
}

/// The kinds of directory entries. Values are opaque to storage (the node encodes them as
/// JSON so that adding a field never breaks old records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum Space {
    Tenant = 1,
    User = 2,
    DeviceRequest = 3,
    TrustedCert = 4,
    /// Cluster-wide settings and secrets (token signing key).
    Setting = 5,
    /// Which node holds a persistent session in memory (name: client id, value: node id as
    /// decimal text), so that others know whose sessions are orphaned when a node dies.
    Holder = 6,
}

/// One directory entry as read back: `(space, tenant, name, value)`.
pub type Entry = (Space, String, String, Vec<u8>);

/// What applying one command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Ok,
    /// For `Publish`: the queue sequence number assigned to each target, in target order.
    /// Sequence numbers are per session, strictly increasing, never reused.
    Published {
        seqs: Vec<u64>,
    },
    /// For `Publish` with `inbound`: that packet id was already recorded, nothing was queued.
    DuplicateInbound,
    /// For `PutEntry` with `create_only`: the entry already existed and was not changed.
    Exists,
    /// For `ExpireSession`: the holder changed, the session was kept.
    Kept,
    /// For `PublishOutbox`: the seqs of this shard's targets (in order) and the id of the
    /// outbox entry the other shards' targets wait in (0: none was needed).
    Outboxed {
        seqs: Vec<u64>,
        id: u64,
    },
    /// For `Device`: one outcome per op, in order.
    Device(Vec<crate::domain::Outcome>),
}

/// Everything a node needs to rebuild one persistent session after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredSession {
    pub key: SessionKey,
    pub record: SessionRecord,
    /// Queued deliveries in sequence order, each with its message.
    pub queue: Vec<(u64, QueueEntry, StoredMessage)>,
    /// Inbound QoS 2 packet ids still awaiting PUBREL.
    pub inbound_pids: Vec<u16>,
}
