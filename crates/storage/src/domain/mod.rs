//! The Cumulocity device data model (§9, §11): managed objects with their external IDs,
//! measurements, events, alarms and operations, kept in the state machine of the group that
//! holds the device (its shard), so that a device's data changes commit with one Raft round in
//! one group and every replica applies them identically.
//!
//! The node turns SmartREST lines, JSON via MQTT and REST calls into [`DeviceOp`]s; applying
//! them here is deterministic: ids come from a counter in the state machine, times from the
//! command. Documents are Cumulocity-shaped JSON (`serde_json`), carried in commands as text
//! because commands are encoded with bincode, which cannot decode a `serde_json::Value`.
//!
//! Ids are `counter << 8 | group`, so the group holding a record follows from its id: REST
//! reads and writes by id go straight to the right shard on any node.

pub(crate) mod apply;
pub mod read;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// External ID type of a device's serial (§9).
pub const SERIAL: &str = "c8y_Serial";
/// The fragment that makes a managed object receive operations (§11.2).
pub const AGENT: &str = "com_cumulocity_model_Agent";

/// Longest text that becomes part of a key (a serial, an external ID, an alarm type). Keys
/// store strings with a u16 length; anything near that would fail the apply on every replica,
/// so longer values are refused before they are proposed.
pub const MAX_KEY_TEXT: usize = 1024;

fn key_text(what: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_KEY_TEXT {
        Err(format!("{what} longer than {MAX_KEY_TEXT} bytes"))
    } else {
        Ok(())
    }
}

impl Source {
    fn check(&self) -> Result<(), String> {
        match self {
            Source::Device { serial } => key_text("serial", serial),
            Source::Child { serial, child } => {
                key_text("serial", serial)?;
                key_text("child id", child)
            }
            Source::Id(_) => Ok(()),
            Source::External { kind, external } => {
                key_text("external id type", kind)?;
                key_text("external id", external)
            }
        }
    }
}

impl DeviceOp {
    /// Whether every text that becomes part of a key fits (`Err`: why not).
    pub fn check(&self) -> Result<(), String> {
        match self {
            DeviceOp::CreateDevice { source, .. }
            | DeviceOp::Update { source, .. }
            | DeviceOp::ListEdit { source, .. }
            | DeviceOp::Measurement { source, .. }
            | DeviceOp::Event { source, .. }
            | DeviceOp::EventClear { source, .. }
            | DeviceOp::Describe { source }
            | DeviceOp::Pending { source }
            | DeviceOp::Connection { source, .. }
            | DeviceOp::Transient { source, .. }
            | DeviceOp::OperationStatus { source, .. } => source.check(),
            DeviceOp::CreateChild { parent, child, .. } => {
                parent.check()?;
                key_text("child id", child)
            }
            DeviceOp::CreateService { parent, xid, .. } => {
                parent.check()?;
                key_text("service id", xid)
            }
            DeviceOp::Alarm { source, doc } => {
                source.check()?;
                let ty = serde_json::from_str::<serde_json::Value>(doc)
                    .ok()
                    .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::len))
                    .unwrap_or(0);
                if ty > MAX_KEY_TEXT {
                    return Err(format!("alarm type longer than {MAX_KEY_TEXT} bytes"));
                }
                Ok(())
            }
            DeviceOp::AlarmChange { source, kind, .. } => {
                source.check()?;
                key_text("alarm type", kind)
            }
            DeviceOp::AddExternalId { kind, external, .. }
            | DeviceOp::DeleteExternalId { kind, external } => {
                key_text("external id type", kind)?;
                key_text("external id", external)
            }
            DeviceOp::CreateObject {
                external: Some((kind, external)),
                ..
            } => {
                key_text("external id type", kind)?;
                key_text("external id", external)
            }
            _ => Ok(()),
        }
    }
}

/// The group a record with this id lives in.
pub fn group_of_id(id: u64) -> u64 {
    id & 0xff
}

/// Which managed object a device operation is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// The device with external ID `c8y_Serial` = `serial` (the connection's device); created
    /// when it does not exist yet (§3.3).
    Device { serial: String },
    /// The device `child` (its own `c8y_Serial`), created as a first-level child of `serial`
    /// when it does not exist yet (§2.3).
    Child { serial: String, child: String },
    /// A managed object by id; it must exist.
    Id(u64),
    /// A managed object by an external ID of any type; it must exist.
    External { kind: String, external: String },
}

/// Which operation(s) a status change is for (§4.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpSelect {
    /// The oldest operation of the device in status `from` carrying `fragment` (501–503).
    Oldest { fragment: String, from: String },
    /// One operation by id; it must belong to the device (504–506, REST).
    Id(u64),
    /// Every EXECUTING operation of the device, with `fragment` if given (507).
    AllExecuting { fragment: Option<String> },
    /// The oldest EXECUTING operation with `fragment`, else the oldest PENDING one (a custom
    /// PUT OPERATION template, §7.2).
    OldestOpen { fragment: String },
}

/// One change (or read) of a tenant's device data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceOp {
    /// `100`: create the device if absent (`Exists` otherwise).
    CreateDevice {
        source: Source,
        name: Option<String>,
        kind: Option<String>,
    },
    /// `101`: create a child device of `parent` if absent.
    CreateChild {
        parent: Source,
        child: String,
        name: Option<String>,
        kind: Option<String>,
        is_device: bool,
    },
    /// `102`: create (or update) a service of `parent`.
    CreateService {
        parent: Source,
        xid: String,
        service_type: String,
        name: String,
        status: String,
    },
    /// Merge fragments (JSON object text; a `null` value removes the fragment), remove the
    /// named fragments; with `if_absent`, only fragments not yet present are set (117).
    Update {
        source: Source,
        set: String,
        remove: Vec<String>,
        if_absent: bool,
    },
    /// Append items (JSON array text) to a list fragment, or remove the items whose `name`
    /// and `version` match (140–142's software list).
    ListEdit {
        source: Source,
        fragment: String,
        items: String,
        remove: bool,
    },
    /// A measurement (JSON object text without `source`).
    Measurement { source: Source, doc: String },
    /// An event.
    Event { source: Source, doc: String },
    /// An alarm; an open alarm of the same source and type counts up instead (§11.4).
    Alarm { source: Source, doc: String },
    /// Change the open alarm of a type (305–307).
    AlarmChange {
        source: Source,
        kind: String,
        severity: Option<String>,
        status: Option<String>,
        remove: Vec<String>,
        /// Fragments to merge (JSON object text), from a custom PUT ALARM template.
        set: Option<String>,
    },
    /// Remove fragments from the newest event of a type (407).
    EventClear {
        source: Source,
        kind: String,
        remove: Vec<String>,
    },
    /// REST `PUT /alarm/alarms/{id}` / `PUT /event/events/{id}`: merge fields.
    RecordUpdate {
        kind: RecordKind,
        id: u64,
        set: String,
    },
    /// REST `DELETE` of an event or measurement.
    RecordDelete { kind: RecordKind, id: u64 },
    /// REST `POST /inventory/managedObjects`, a custom POST INVENTORY template, an `s/ut`
    /// collection: a new object, with an external ID `(type, id)` in the same step
    /// (`Exists` if that ID is taken).
    CreateObject {
        doc: String,
        external: Option<(String, String)>,
    },
    /// REST `DELETE /inventory/managedObjects/{id}`.
    DeleteObject { id: u64 },
    /// REST `POST /identity/globalIds/{id}/externalIds`.
    AddExternalId {
        id: u64,
        kind: String,
        external: String,
    },
    /// REST `DELETE /identity/externalIds/{type}/{id}`.
    DeleteExternalId { kind: String, external: String },
    /// REST `POST .../childDevices`: link two objects of this group.
    AddChild { parent: u64, child: u64 },
    /// REST `POST /devicecontrol/operations`: a PENDING operation for `device`.
    Operation { device: u64, doc: String },
    /// A status change of operations (501–507, REST `PUT`); `set` merges fragments; an empty
    /// `to` keeps the status.
    OperationStatus {
        source: Source,
        select: OpSelect,
        to: String,
        reason: Option<String>,
        params: Vec<String>,
        set: Option<String>,
    },
    /// The managed object (resolving, and creating the device when absent, like any data),
    /// followed by its child devices: `Many([object, children...])`.
    Describe { source: Source },
    /// The PENDING operations of the agent (500, a downstream subscribe). A device that does
    /// not exist yet has none (and is not created by asking).
    Pending { source: Source },
    /// A measurement, event or alarm in transient mode (`t/`): not stored, only passed to
    /// real-time notifications (through the log so that every node's subscribers see it).
    Transient {
        kind: RecordKind,
        source: Source,
        doc: String,
    },
    /// The device's downstream connection (`c8y_Connection`, §1.11): CONNECTED when
    /// connection `conn` subscribed to a downstream topic; DISCONNECTED when that same
    /// connection ends (a later connection's CONNECTED is never undone by an older one's end).
    /// Only for devices that exist.
    Connection {
        source: Source,
        conn: u64,
        connected: bool,
    },
    /// Remove measurements and events created before `before_ms` (retention), at most `limit`.
    Prune { before_ms: u64, limit: u32 },
}

/// Kinds of records attached to a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum RecordKind {
    Measurement = 1,
    Event = 2,
    Alarm = 3,
    Operation = 4,
}

impl RecordKind {
    /// Its tag byte in keys.
    pub fn tag(self) -> u8 {
        self as u8
    }
}

/// What applying one [`DeviceOp`] gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Created or changed: the stored document (JSON text of [`Doc`]).
    Done(String),
    /// Several documents (alarms counted up, operations changed or pending).
    Many(Vec<String>),
    /// `CreateDevice` of an existing device, `AddExternalId` of a taken one.
    Exists,
    /// The addressed thing is not there (the text says what).
    NotFound(String),
    /// The request does not fit the data (a bad status change, a document that is not an
    /// object); the text says why.
    Invalid(String),
}

/// A stored record: the Cumulocity JSON body (with `id`, without `self` links) and the
/// relations fleetmq keeps beside it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Doc {
    pub id: u64,
    pub body: Map<String, Value>,
    /// Managed object: its parent device. Record: its source.
    #[serde(default)]
    pub parent: Option<u64>,
    #[serde(default)]
    pub children: Vec<u64>,
    #[serde(default)]
    pub additions: Vec<u64>,
    /// Managed object: its external IDs `(type, externalId)`.
    #[serde(default)]
    pub external: Vec<(String, String)>,
    /// Operation: the agent it is delivered to `(id, c8y_Serial)`.
    #[serde(default)]
    pub agent: Option<(u64, String)>,
    /// Operation: the `c8y_Serial` of the device it is for.
    #[serde(default)]
    pub target: Option<String>,
    /// Creation time in ms (retention).
    #[serde(default)]
    pub created_ms: u64,
    /// Managed object: the connection that last made it CONNECTED.
    #[serde(default)]
    pub link: Option<u64>,
    /// Managed object: the newest connection known to have ended.
    #[serde(default)]
    pub ended: Option<u64>,
}

impl Doc {
    /// Parses a stored document.
    pub fn from_json(s: &str) -> Option<Doc> {
        serde_json::from_str(s).ok()
    }

    /// A string field of the body.
    pub fn str(&self, k: &str) -> Option<&str> {
        self.body.get(k).and_then(Value::as_str)
    }
}

/// A batch of device operations of one tenant in one group, as proposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBatch {
    pub tenant: String,
    /// The group this batch is for (ids are made from it).
    pub group: u64,
    /// Server time of the proposal: ISO 8601 text and ms since the epoch.
    pub now: String,
    pub now_ms: u64,
    /// The user the created objects belong to (`device_<id>` for devices).
    pub owner: String,
    /// Quiescent processing (`q/`): stored, but no real-time notifications.
    pub quiet: bool,
    /// The serial of the device whose connection sent this batch (`None`: the platform, over
    /// REST). A device may only address itself, its descendants and objects its user owns
    /// (§7.2: "global or owned by the client").
    pub device: Option<String>,
    pub ops: Vec<DeviceOp>,
}

#[cfg(test)]
mod tests;
