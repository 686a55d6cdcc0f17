//! Applying [`DeviceOp`]s to a group's state machine (deterministic: no clock, no randomness).
//!
//! Keys (tags after the session tags of `state_machine.rs`):
//!
//! | tag | key | value |
//! | --- | --- | --- |
//! | `0x10` object | tenant + id | `Doc` JSON |
//! | `0x11` external id | tenant + type + external id | object id u64 |
//! | `0x12` record | kind + tenant + id | `Doc` JSON |
//! | `0x13` by source | kind + tenant + source id + id | empty |
//! | `0x14` open alarm | tenant + source id + type | alarm id u64 |
//! | `0x15` agent's operations | tenant + agent id + id | empty |
//! | `0x16` next id | — | u64 |
//! | `0x17` last message | tenant + object id | ISO time text |
//! | `0x18` by time | kind + created ms + tenant + id | empty (retention) |

use serde_json::{json, Map, Value};

use super::{DeviceBatch, DeviceOp, Doc, OpSelect, Outcome, RecordKind, Source, AGENT, SERIAL};
use crate::error::{Result, StorageError};
use crate::keys;
use crate::overlay::Overlay;

pub(crate) const OBJ: u8 = 0x10;
pub(crate) const XID: u8 = 0x11;
pub(crate) const REC: u8 = 0x12;
pub(crate) const BYSRC: u8 = 0x13;
pub(crate) const OPEN_ALARM: u8 = 0x14;
pub(crate) const AGENT_OPS: u8 = 0x15;
pub(crate) const NEXT_ID: &[u8] = &[0x16];
pub(crate) const LAST_MESSAGE: u8 = 0x17;
pub(crate) const BYTIME: u8 = 0x18;

pub(crate) fn obj_key(tenant: &str, id: u64) -> Result<Vec<u8>> {
    let mut k = vec![OBJ];
    keys::put_str(&mut k, tenant)?;
    k.extend_from_slice(&id.to_be_bytes());
    Ok(k)
}

pub(crate) fn xid_key(tenant: &str, kind: &str, external: &str) -> Result<Vec<u8>> {
    let mut k = vec![XID];
    keys::put_str(&mut k, tenant)?;
    keys::put_str(&mut k, kind)?;
    keys::put_str(&mut k, external)?;
    Ok(k)
}

pub(crate) fn rec_key(kind: RecordKind, tenant: &str, id: u64) -> Result<Vec<u8>> {
    let mut k = vec![REC, kind.tag()];
    keys::put_str(&mut k, tenant)?;
    k.extend_from_slice(&id.to_be_bytes());
    Ok(k)
}

pub(crate) fn bysrc_prefix(kind: RecordKind, tenant: &str, source: u64) -> Result<Vec<u8>> {
    let mut k = vec![BYSRC, kind.tag()];
    keys::put_str(&mut k, tenant)?;
    k.extend_from_slice(&source.to_be_bytes());
    Ok(k)
}

fn open_alarm_key(tenant: &str, source: u64, kind: &str) -> Result<Vec<u8>> {
    let mut k = vec![OPEN_ALARM];
    keys::put_str(&mut k, tenant)?;
    k.extend_from_slice(&source.to_be_bytes());
    keys::put_str(&mut k, kind)?;
    Ok(k)
}

pub(crate) fn agent_ops_prefix(tenant: &str, agent: u64) -> Result<Vec<u8>> {
    let mut k = vec![AGENT_OPS];
    keys::put_str(&mut k, tenant)?;
    k.extend_from_slice(&agent.to_be_bytes());
    Ok(k)
}

pub(crate) fn last_message_key(tenant: &str, id: u64) -> Result<Vec<u8>> {
    let mut k = vec![LAST_MESSAGE];
    keys::put_str(&mut k, tenant)?;
    k.extend_from_slice(&id.to_be_bytes());
    Ok(k)
}

fn bytime_key(kind: RecordKind, ms: u64, tenant: &str, id: u64) -> Result<Vec<u8>> {
    let mut k = vec![BYTIME, kind.tag()];
    k.extend_from_slice(&ms.to_be_bytes());
    keys::put_str(&mut k, tenant)?;
    k.extend_from_slice(&id.to_be_bytes());
    Ok(k)
}

/// The id at the end of an index key.
pub(crate) fn trailing_id(k: &[u8]) -> Option<u64> {
    k.len()
        .checked_sub(8)
        .and_then(|at| keys::read_u64(&k[at..]))
}

fn not_below(child: &str, serial: &str) -> Outcome {
    Outcome::NotFound(format!("{child} is not a child device of {serial}"))
}

fn corrupt(what: &str) -> StorageError {
    StorageError::Corrupt {
        tree: "sm".into(),
        what: what.into(),
    }
}

pub(crate) fn parse_doc(bytes: &[u8]) -> Result<Doc> {
    serde_json::from_slice(bytes).map_err(|_| corrupt("device document"))
}

fn doc_json(d: &Doc) -> String {
    serde_json::to_string(d).unwrap_or_default()
}

/// The final operation statuses: nothing changes them any more.
fn is_final(status: &str) -> bool {
    matches!(status, "SUCCESSFUL" | "FAILED")
}

struct Ctx<'o, 'a> {
    ov: &'o mut Overlay<'a>,
    b: &'o DeviceBatch,
}

/// Applies a batch; every op has its own outcome, a storage error fails the whole entry.
pub(crate) fn apply_batch(ov: &mut Overlay<'_>, batch: &DeviceBatch) -> Result<Vec<Outcome>> {
    let mut c = Ctx { ov, b: batch };
    batch.ops.iter().map(|op| c.apply(op)).collect()
}

fn parse_object(text: &str) -> std::result::Result<Map<String, Value>, Outcome> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Outcome::Invalid("document is not a JSON object".into())),
    }
}

/// Merges `set` into `body`: a `null` value removes the fragment (§8).
fn merge(body: &mut Map<String, Value>, set: Map<String, Value>, if_absent: bool) {
    for (k, v) in set {
        if matches!(
            k.as_str(),
            "id" | "self" | "owner" | "creationTime" | "lastUpdated"
        ) {
            continue;
        }
        if v.is_null() {
            body.remove(&k);
        } else if !if_absent || !body.contains_key(&k) {
            body.insert(k, v);
        }
    }
}

/// Merges fields into a measurement, event or alarm: `null` removes one; what identifies the
/// record (id, source, type, creation time) never changes.
fn merge_record(body: &mut Map<String, Value>, set: Map<String, Value>) {
    for (k, v) in set {
        if matches!(
            k.as_str(),
            "id" | "self" | "source" | "type" | "creationTime"
        ) {
            continue;
        }
        if v.is_null() {
            body.remove(&k);
        } else {
            body.insert(k, v);
        }
    }
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(o) => return Ok(o),
        }
    };
}

impl Ctx<'_, '_> {
    fn t(&self) -> &str {
        &self.b.tenant
    }

    fn next_id(&mut self) -> Result<u64> {
        let n = match self.ov.get(NEXT_ID)? {
            Some(v) => keys::read_u64(&v).ok_or_else(|| corrupt("next id"))?,
            None => 1,
        };
        self.ov
            .put(NEXT_ID.to_vec(), (n + 1).to_be_bytes().to_vec());
        Ok((n << 8) | (self.b.group & 0xff))
    }

    fn object(&self, id: u64) -> Result<Option<Doc>> {
        match self.ov.get(&obj_key(self.t(), id)?)? {
            Some(v) => Ok(Some(parse_doc(&v)?)),
            None => Ok(None),
        }
    }

    fn put_object(&mut self, d: &Doc) -> Result<()> {
        let k = obj_key(self.t(), d.id)?;
        self.ov.put(k, doc_json(d).into_bytes());
        Ok(())
    }

    fn record(&self, kind: RecordKind, id: u64) -> Result<Option<Doc>> {
        match self.ov.get(&rec_key(kind, self.t(), id)?)? {
            Some(v) => Ok(Some(parse_doc(&v)?)),
            None => Ok(None),
        }
    }

    fn put_record(&mut self, kind: RecordKind, d: &Doc) -> Result<()> {
        let k = rec_key(kind, self.t(), d.id)?;
        self.ov.put(k, doc_json(d).into_bytes());
        Ok(())
    }

    fn lookup(&self, kind: &str, external: &str) -> Result<Option<u64>> {
        match self.ov.get(&xid_key(self.t(), kind, external)?)? {
            Some(v) => Ok(Some(
                keys::read_u64(&v).ok_or_else(|| corrupt("external id"))?,
            )),
            None => Ok(None),
        }
    }

    /// A new device managed object with its `c8y_Serial`, as SmartREST creates it (§3.3).
    fn new_device(
        &mut self,
        serial: &str,
        name: Option<&str>,
        kind: &str,
        parent: Option<u64>,
        is_device: bool,
    ) -> Result<Doc> {
        let id = self.next_id()?;
        let mut body = Map::new();
        body.insert("id".into(), json!(id.to_string()));
        let name = match name {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => format!("MQTT Device {serial}"),
        };
        body.insert("name".into(), json!(name));
        body.insert("type".into(), json!(kind));
        body.insert("owner".into(), json!(self.b.owner));
        body.insert("creationTime".into(), json!(self.b.now));
        body.insert("lastUpdated".into(), json!(self.b.now));
        if is_device {
            body.insert("c8y_IsDevice".into(), json!({}));
        }
        if parent.is_none() {
            body.insert(AGENT.into(), json!({}));
        }
        let d = Doc {
            id,
            body,
            parent,
            external: vec![(SERIAL.into(), serial.into())],
            created_ms: self.b.now_ms,
            ..Doc::default()
        };
        self.put_object(&d)?;
        let xk = xid_key(self.t(), SERIAL, serial)?;
        self.ov.put(xk, id.to_be_bytes().to_vec());
        if let Some(p) = parent {
            if let Some(mut pd) = self.object(p)? {
                if !pd.children.contains(&id) {
                    pd.children.push(id);
                }
                self.put_object(&pd)?;
            }
        }
        Ok(d)
    }

    /// The object a source names, creating devices that do not exist yet.
    fn resolve(&mut self, s: &Source) -> Result<std::result::Result<Doc, Outcome>> {
        match s {
            Source::Id(id) if !self.may_address(*id)? => Ok(Err(Outcome::NotFound(format!(
                "Managed object {id} not found"
            )))),
            Source::Id(id) => Ok(self
                .object(*id)?
                .ok_or_else(|| Outcome::NotFound(format!("Managed object {id} not found")))),
            Source::External { kind, external } => match self.lookup(kind, external)? {
                Some(id) if !self.may_address(id)? => Ok(Err(Outcome::NotFound(format!(
                    "External id {kind}/{external} not found"
                )))),
                Some(id) => Ok(self
                    .object(id)?
                    .ok_or_else(|| Outcome::NotFound(format!("Managed object {id} not found")))),
                None => Ok(Err(Outcome::NotFound(format!(
                    "External id {kind}/{external} not found"
                )))),
            },
            Source::Device { serial } => match self.lookup(SERIAL, serial)? {
                Some(id) => Ok(self
                    .object(id)?
                    .ok_or_else(|| Outcome::NotFound(format!("Managed object {id} not found")))),
                None => Ok(Ok(self.new_device(
                    serial,
                    None,
                    "c8y_MQTTDevice",
                    None,
                    true,
                )?)),
            },
            Source::Child { serial, child } => {
                if let Some(id) = self.lookup(SERIAL, child)? {
                    if !self.below(id, serial)? {
                        return Ok(Err(not_below(child, serial)));
                    }
                    return Ok(self.object(id)?.ok_or_else(|| {
                        Outcome::NotFound(format!("Managed object {id} not found"))
                    }));
                }
                let parent = match self.resolve(&Source::Device {
                    serial: serial.clone(),
                })? {
                    Ok(p) => p.id,
                    Err(o) => return Ok(Err(o)),
                };
                Ok(Ok(self.new_device(
                    child,
                    None,
                    "c8y_MQTTChildDevice",
                    Some(parent),
                    true,
                )?))
            }
        }
    }

    /// The id of the object a source names, creating devices like `resolve`, without reading
    /// the object (the hot path of measurements: the external-ID index is enough).
    fn resolve_id(&mut self, s: &Source) -> Result<std::result::Result<u64, Outcome>> {
        let found = match s {
            Source::Device { serial } => self.lookup(SERIAL, serial)?,
            Source::Child { child, serial } => match self.lookup(SERIAL, child)? {
                Some(id) if !self.below(id, serial)? => return Ok(Err(not_below(child, serial))),
                other => other,
            },
            Source::Id(_) | Source::External { .. } => None,
        };
        match found {
            Some(id) => Ok(Ok(id)),
            None => Ok(self.resolve(s)?.map(|d| d.id)),
        }
    }

    /// Whether object `id` is `root` or one of its descendants.
    fn below_id(&self, id: u64, root: u64) -> Result<bool> {
        let mut cur = Some(id);
        for _ in 0..16 {
            match cur {
                Some(c) if c == root => return Ok(true),
                Some(c) => cur = self.object(c)?.and_then(|d| d.parent),
                None => return Ok(false),
            }
        }
        Ok(false)
    }

    /// Whether object `id` is the device `serial` or one of its descendants.
    fn below(&self, id: u64, serial: &str) -> Result<bool> {
        let Some(root) = self.lookup(SERIAL, serial)? else {
            return Ok(false);
        };
        let mut cur = Some(id);
        for _ in 0..16 {
            match cur {
                Some(c) if c == root => return Ok(true),
                Some(c) => cur = self.object(c)?.and_then(|d| d.parent),
                None => return Ok(false),
            }
        }
        Ok(false)
    }

    /// Whether the sender of this batch may address object `id`: the platform may address
    /// anything; a device itself, its descendants and what its user owns.
    fn may_address(&self, id: u64) -> Result<bool> {
        let Some(serial) = &self.b.device else {
            return Ok(true);
        };
        if self.below(id, serial)? {
            return Ok(true);
        }
        Ok(self
            .object(id)?
            .is_some_and(|d| d.str("owner") == Some(self.b.owner.as_str())))
    }

    fn touch(&mut self, d: &mut Doc) {
        d.body.insert("lastUpdated".into(), json!(self.b.now));
    }

    fn heartbeat(&mut self, id: u64) -> Result<()> {
        let k = last_message_key(self.t(), id)?;
        self.ov.put(k, self.b.now.clone().into_bytes());
        Ok(())
    }

    fn apply(&mut self, op: &DeviceOp) -> Result<Outcome> {
        match op {
            DeviceOp::CreateDevice { source, name, kind } => {
                let Source::Device { serial } = source else {
                    return Ok(Outcome::Invalid("device creation needs a serial".into()));
                };
                if self.lookup(SERIAL, serial)?.is_some() {
                    return Ok(Outcome::Exists);
                }
                let kind = kind.as_deref().filter(|k| !k.is_empty());
                let d = self.new_device(
                    serial,
                    name.as_deref(),
                    kind.unwrap_or("c8y_MQTTDevice"),
                    None,
                    true,
                )?;
                Ok(Outcome::Done(doc_json(&d)))
            }
            DeviceOp::CreateChild {
                parent,
                child,
                name,
                kind,
                is_device,
            } => {
                let p = tri!(self.resolve(parent)?);
                if let Some(id) = self.lookup(SERIAL, child)? {
                    // Already there: link it if it has no parent yet (Cumulocity answers
                    // nothing); another device's child stays where it is.
                    let Some(mut cd) = self.object(id)? else {
                        return Ok(Outcome::Exists);
                    };
                    if cd.parent.is_none() && id != p.id && !self.below_id(p.id, id)? {
                        cd.parent = Some(p.id);
                        self.put_object(&cd)?;
                        let mut pd = p;
                        if !pd.children.contains(&id) {
                            pd.children.push(id);
                            self.put_object(&pd)?;
                        }
                    }
                    return Ok(Outcome::Exists);
                }
                let kind = kind.as_deref().filter(|k| !k.is_empty());
                let d = self.new_device(
                    child,
                    name.as_deref(),
                    kind.unwrap_or("c8y_MQTTChildDevice"),
                    Some(p.id),
                    *is_device,
                )?;
                Ok(Outcome::Done(doc_json(&d)))
            }
            DeviceOp::CreateService {
                parent,
                xid,
                service_type,
                name,
                status,
            } => {
                let p = tri!(self.resolve(parent)?);
                let fields = json!({"type": "c8y_Service", "name": name,
                    "serviceType": service_type, "status": status});
                if let Some(id) = self.lookup(SERIAL, xid)? {
                    let Some(mut d) = self.object(id)? else {
                        return Ok(Outcome::NotFound(format!("Managed object {id} not found")));
                    };
                    if d.parent != Some(p.id) {
                        return Ok(Outcome::Invalid(format!(
                            "{xid} exists and is not a service of this device"
                        )));
                    }
                    if let Value::Object(m) = fields {
                        merge(&mut d.body, m, false);
                    }
                    self.touch(&mut d);
                    self.put_object(&d)?;
                    return Ok(Outcome::Done(doc_json(&d)));
                }
                let id = self.next_id()?;
                let mut body = Map::new();
                body.insert("id".into(), json!(id.to_string()));
                body.insert("owner".into(), json!(self.b.owner));
                body.insert("creationTime".into(), json!(self.b.now));
                body.insert("lastUpdated".into(), json!(self.b.now));
                if let Value::Object(m) = fields {
                    merge(&mut body, m, false);
                }
                let d = Doc {
                    id,
                    body,
                    parent: Some(p.id),
                    external: vec![(SERIAL.into(), xid.clone())],
                    created_ms: self.b.now_ms,
                    ..Doc::default()
                };
                self.put_object(&d)?;
                let xk = xid_key(self.t(), SERIAL, xid)?;
                self.ov.put(xk, id.to_be_bytes().to_vec());
                let mut pd = p;
                pd.additions.push(id);
                self.put_object(&pd)?;
                Ok(Outcome::Done(doc_json(&d)))
            }
            DeviceOp::Update {
                source,
                set,
                remove,
                if_absent,
            } => {
                let set = tri!(parse_object(set));
                let mut d = tri!(self.resolve(source)?);
                let heartbeat = set.is_empty() && remove.is_empty();
                merge(&mut d.body, set, *if_absent);
                for f in remove {
                    if !matches!(f.as_str(), "id" | "owner" | "creationTime" | "lastUpdated") {
                        d.body.remove(f);
                    }
                }
                if heartbeat {
                    self.heartbeat(d.id)?;
                } else {
                    self.touch(&mut d);
                    self.put_object(&d)?;
                }
                Ok(Outcome::Done(doc_json(&d)))
            }
            DeviceOp::Measurement { source, doc } => {
                self.create_record(RecordKind::Measurement, source, doc)
            }
            DeviceOp::Event { source, doc } => self.create_record(RecordKind::Event, source, doc),
            DeviceOp::Alarm { source, doc } => self.alarm(source, doc),
            DeviceOp::AlarmChange {
                source,
                kind,
                severity,
                status,
                remove,
                set,
            } => {
                let set = match set {
                    Some(t) => Some(tri!(parse_object(t))),
                    None => None,
                };
                let src = tri!(self.resolve(source)?);
                let ok = open_alarm_key(self.t(), src.id, kind)?;
                let Some(id) = self.ov.get(&ok)?.and_then(|v| keys::read_u64(&v)) else {
                    return Ok(Outcome::NotFound(format!("No open alarm of type {kind}")));
                };
                let Some(mut a) = self.record(RecordKind::Alarm, id)? else {
                    return Ok(Outcome::NotFound(format!("Alarm {id} not found")));
                };
                if let Some(s) = severity {
                    a.body.insert("severity".into(), json!(s));
                }
                if let Some(s) = status {
                    a.body.insert("status".into(), json!(s));
                    if s == "CLEARED" {
                        self.ov.del(ok.clone());
                    }
                }
                for f in remove {
                    a.body.remove(f);
                }
                if let Some(set) = set {
                    let cleared = set.get("status").and_then(Value::as_str) == Some("CLEARED");
                    merge_record(&mut a.body, set);
                    if cleared {
                        self.ov.del(ok);
                    }
                }
                self.touch(&mut a);
                self.put_record(RecordKind::Alarm, &a)?;
                Ok(Outcome::Done(doc_json(&a)))
            }
            DeviceOp::EventClear {
                source,
                kind,
                remove,
            } => {
                let src = tri!(self.resolve(source)?);
                let p = bysrc_prefix(RecordKind::Event, self.t(), src.id)?;
                for k in self.ov.keys_with_prefix(&p)?.into_iter().rev() {
                    let Some(id) = trailing_id(&k) else { continue };
                    let Some(mut e) = self.record(RecordKind::Event, id)? else {
                        continue;
                    };
                    if e.str("type") == Some(kind.as_str()) {
                        for f in remove {
                            e.body.remove(f);
                        }
                        self.touch(&mut e);
                        self.put_record(RecordKind::Event, &e)?;
                        return Ok(Outcome::Done(doc_json(&e)));
                    }
                }
                Ok(Outcome::NotFound(format!("No event of type {kind}")))
            }
            DeviceOp::RecordUpdate { kind, id, set } => {
                let set = tri!(parse_object(set));
                let Some(mut r) = self.record(*kind, *id)? else {
                    return Ok(Outcome::NotFound(format!("{kind:?} {id} not found")));
                };
                if !self.may_address(r.parent.unwrap_or_default())? {
                    return Ok(Outcome::NotFound(format!("{kind:?} {id} not found")));
                }
                if *kind == RecordKind::Alarm {
                    if let Some(Value::String(st)) = set.get("status") {
                        if !matches!(st.as_str(), "ACTIVE" | "ACKNOWLEDGED" | "CLEARED") {
                            return Ok(Outcome::Invalid(format!("Unknown alarm status {st}")));
                        }
                        if let (Some(src), Some(ty)) = (r.parent, r.str("type")) {
                            let ok = open_alarm_key(self.t(), src, ty)?;
                            let holder = self.ov.get(&ok)?.and_then(|v| keys::read_u64(&v));
                            if st == "CLEARED" && holder == Some(*id) {
                                self.ov.del(ok);
                            } else if st != "CLEARED" && holder.is_none() {
                                // Reopened: it is the open alarm of its type again.
                                self.ov.put(ok, id.to_be_bytes().to_vec());
                            }
                        }
                    }
                }
                merge_record(&mut r.body, set);
                self.touch(&mut r);
                self.put_record(*kind, &r)?;
                Ok(Outcome::Done(doc_json(&r)))
            }
            DeviceOp::RecordDelete { kind, id } => {
                let Some(r) = self.record(*kind, *id)? else {
                    return Ok(Outcome::NotFound(format!("{kind:?} {id} not found")));
                };
                if !self.may_address(r.parent.unwrap_or_default())? {
                    return Ok(Outcome::NotFound(format!("{kind:?} {id} not found")));
                }
                self.drop_record(*kind, &r)?;
                Ok(Outcome::Done(doc_json(&r)))
            }
            DeviceOp::CreateObject { doc, external } => {
                let set = tri!(parse_object(doc));
                if let Some((kind, x)) = external {
                    if self.lookup(kind, x)?.is_some() {
                        return Ok(Outcome::Exists);
                    }
                }
                let id = self.next_id()?;
                let mut body = Map::new();
                body.insert("id".into(), json!(id.to_string()));
                body.insert("owner".into(), json!(self.b.owner));
                body.insert("creationTime".into(), json!(self.b.now));
                body.insert("lastUpdated".into(), json!(self.b.now));
                merge(&mut body, set, false);
                let d = Doc {
                    id,
                    body,
                    external: external.iter().cloned().collect(),
                    created_ms: self.b.now_ms,
                    ..Doc::default()
                };
                self.put_object(&d)?;
                if let Some((kind, x)) = external {
                    let xk = xid_key(self.t(), kind, x)?;
                    self.ov.put(xk, id.to_be_bytes().to_vec());
                }
                Ok(Outcome::Done(doc_json(&d)))
            }
            DeviceOp::DeleteObject { id } => {
                let Some(d) = self.object(*id)? else {
                    return Ok(Outcome::NotFound(format!("Managed object {id} not found")));
                };
                for (ty, x) in &d.external {
                    let k = xid_key(self.t(), ty, x)?;
                    self.ov.del(k);
                }
                if let Some(p) = d.parent {
                    if let Some(mut pd) = self.object(p)? {
                        pd.children.retain(|c| c != id);
                        pd.additions.retain(|c| c != id);
                        self.put_object(&pd)?;
                    }
                }
                // Its children and services become top-level objects (not deleted: their data
                // stays reachable); what only this object used goes.
                for c in d.children.iter().chain(d.additions.iter()) {
                    if let Some(mut cd) = self.object(*c)? {
                        cd.parent = None;
                        if !cd.body.contains_key(AGENT) {
                            cd.body.insert(AGENT.into(), json!({}));
                        }
                        self.put_object(&cd)?;
                    }
                }
                for k in self
                    .ov
                    .keys_with_prefix(&agent_ops_prefix(self.t(), *id)?)?
                {
                    self.ov.del(k);
                }
                let lm = last_message_key(self.t(), *id)?;
                self.ov.del(lm);
                let k = obj_key(self.t(), *id)?;
                self.ov.del(k);
                Ok(Outcome::Done(doc_json(&d)))
            }
            DeviceOp::AddExternalId { id, kind, external } => {
                let Some(mut d) = self.object(*id)? else {
                    return Ok(Outcome::NotFound(format!("Managed object {id} not found")));
                };
                if let Some(other) = self.lookup(kind, external)? {
                    return Ok(if other == *id {
                        Outcome::Done(doc_json(&d))
                    } else {
                        Outcome::Exists
                    });
                }
                let xk = xid_key(self.t(), kind, external)?;
                self.ov.put(xk, id.to_be_bytes().to_vec());
                d.external.push((kind.clone(), external.clone()));
                self.put_object(&d)?;
                Ok(Outcome::Done(doc_json(&d)))
            }
            DeviceOp::DeleteExternalId { kind, external } => {
                let Some(id) = self.lookup(kind, external)? else {
                    return Ok(Outcome::NotFound(format!(
                        "External id {kind}/{external} not found"
                    )));
                };
                let xk = xid_key(self.t(), kind, external)?;
                self.ov.del(xk);
                if let Some(mut d) = self.object(id)? {
                    d.external.retain(|(t, x)| !(t == kind && x == external));
                    self.put_object(&d)?;
                }
                Ok(Outcome::Done(String::new()))
            }
            DeviceOp::AddChild { parent, child } => {
                let (Some(mut p), Some(mut c)) = (self.object(*parent)?, self.object(*child)?)
                else {
                    return Ok(Outcome::NotFound("Managed object not found".into()));
                };
                if *parent == *child || self.below_id(*parent, *child)? {
                    return Ok(Outcome::Invalid("that would make a cycle".into()));
                }
                if let Some(old) = c.parent.filter(|o| o != parent) {
                    if let Some(mut od) = self.object(old)? {
                        od.children.retain(|x| x != child);
                        self.put_object(&od)?;
                    }
                }
                if !p.children.contains(child) {
                    p.children.push(*child);
                }
                c.parent = Some(*parent);
                self.put_object(&p)?;
                self.put_object(&c)?;
                Ok(Outcome::Done(doc_json(&c)))
            }
            DeviceOp::Operation { device, doc } => self.create_operation(*device, doc),
            DeviceOp::OperationStatus {
                source,
                select,
                to,
                reason,
                params,
                set,
            } => self.operation_status(source, select, to, reason.as_deref(), params, set),
            DeviceOp::Describe { source } => {
                let d = tri!(self.resolve(source)?);
                let mut out = vec![doc_json(&d)];
                for c in &d.children {
                    if let Some(cd) = self.object(*c)? {
                        out.push(doc_json(&cd));
                    }
                }
                Ok(Outcome::Many(out))
            }
            DeviceOp::ListEdit {
                source,
                fragment,
                items,
                remove,
            } => {
                let Ok(Value::Array(items)) = serde_json::from_str::<Value>(items) else {
                    return Ok(Outcome::Invalid("items are not a JSON array".into()));
                };
                let mut d = tri!(self.resolve(source)?);
                let mut list = match d.body.remove(fragment) {
                    Some(Value::Array(l)) => l,
                    _ => Vec::new(),
                };
                if *remove {
                    let key = |v: &Value| (v.get("name").cloned(), v.get("version").cloned());
                    list.retain(|x| !items.iter().any(|i| key(i) == key(x)));
                } else {
                    list.extend(items);
                }
                d.body.insert(fragment.clone(), Value::Array(list));
                self.touch(&mut d);
                self.put_object(&d)?;
                Ok(Outcome::Done(doc_json(&d)))
            }
            DeviceOp::Pending { source } => {
                let known = match source {
                    Source::Device { serial } => self.lookup(SERIAL, serial)?.is_some(),
                    Source::Child { child, .. } => self.lookup(SERIAL, child)?.is_some(),
                    Source::Id(_) | Source::External { .. } => true,
                };
                if !known {
                    return Ok(Outcome::Many(Vec::new()));
                }
                let d = tri!(self.resolve(source)?);
                // Only an agent receives operations: a child connecting with its own ClientId
                // does not get its gateway's.
                if !d.body.contains_key(AGENT) {
                    return Ok(Outcome::Many(Vec::new()));
                }
                let p = agent_ops_prefix(self.t(), d.id)?;
                let mut out = Vec::new();
                for k in self.ov.keys_with_prefix(&p)? {
                    let Some(id) = trailing_id(&k) else { continue };
                    if let Some(o) = self.record(RecordKind::Operation, id)? {
                        if o.str("status") == Some("PENDING") {
                            out.push(doc_json(&o));
                        }
                    }
                }
                Ok(Outcome::Many(out))
            }
            DeviceOp::Connection {
                source,
                conn,
                connected,
            } => {
                let known = match source {
                    Source::Device { serial } => self.lookup(SERIAL, serial)?.is_some(),
                    _ => true,
                };
                if !known {
                    return Ok(Outcome::NotFound("no such device".into()));
                }
                let mut d = tri!(self.resolve(source)?);
                // Connection ids grow with time, so the two proposals of one connection may
                // arrive in either order: a CONNECTED of a connection that already ended is
                // ignored, as is the end of one that was superseded.
                if *connected {
                    if d.ended.is_some_and(|e| e >= *conn) || d.link.is_some_and(|l| l > *conn) {
                        return Ok(Outcome::Many(Vec::new()));
                    }
                    d.link = Some(*conn);
                    d.body
                        .insert("c8y_Connection".into(), json!({"status": "CONNECTED"}));
                } else if d.link == Some(*conn) {
                    d.link = None;
                    d.ended = Some(*conn);
                    d.body
                        .insert("c8y_Connection".into(), json!({"status": "DISCONNECTED"}));
                } else {
                    d.ended = Some(d.ended.unwrap_or_default().max(*conn));
                    self.put_object(&d)?;
                    return Ok(Outcome::Many(Vec::new()));
                }
                self.put_object(&d)?;
                Ok(Outcome::Done(doc_json(&d)))
            }
            DeviceOp::Transient { kind, source, doc } => {
                let body = tri!(parse_object(doc));
                let src = tri!(self.resolve(source)?);
                let mut r = Doc {
                    body,
                    parent: Some(src.id),
                    created_ms: self.b.now_ms,
                    ..Doc::default()
                };
                r.body
                    .insert("source".into(), json!({"id": src.id.to_string()}));
                if !r.body.contains_key("time") {
                    r.body.insert("time".into(), json!(self.b.now));
                }
                if *kind == RecordKind::Alarm && !r.body.contains_key("status") {
                    r.body.insert("status".into(), json!("ACTIVE"));
                }
                Ok(Outcome::Done(doc_json(&r)))
            }
            DeviceOp::Prune { before_ms, limit } => {
                let mut removed = 0u32;
                for kind in [RecordKind::Measurement, RecordKind::Event] {
                    let start = vec![BYTIME, kind.tag()];
                    let mut end = start.clone();
                    end.extend_from_slice(&before_ms.to_be_bytes());
                    for k in self
                        .ov
                        .keys_in_range(&start, &end, (*limit - removed) as usize)?
                    {
                        let Some(rest) = k.get(10..) else { continue };
                        let Some((tenant, rest)) = keys::take_str(rest) else {
                            continue;
                        };
                        let Some(id) = keys::read_u64(rest) else {
                            continue;
                        };
                        let rk = rec_key(kind, &tenant, id)?;
                        match self.ov.get(&rk)? {
                            Some(v) => {
                                let r = parse_doc(&v)?;
                                let b = DeviceBatch {
                                    tenant,
                                    ..self.b.clone()
                                };
                                let mut other = Ctx {
                                    ov: &mut *self.ov,
                                    b: &b,
                                };
                                other.drop_record(kind, &r)?;
                            }
                            None => self.ov.del(k),
                        }
                        removed += 1;
                    }
                }
                Ok(Outcome::Done(removed.to_string()))
            }
        }
    }

    fn drop_record(&mut self, kind: RecordKind, r: &Doc) -> Result<()> {
        let k = rec_key(kind, self.t(), r.id)?;
        self.ov.del(k);
        if let Some(src) = r.parent {
            let mut ik = bysrc_prefix(kind, self.t(), src)?;
            ik.extend_from_slice(&r.id.to_be_bytes());
            self.ov.del(ik);
        }
        let tk = bytime_key(kind, r.created_ms, self.t(), r.id)?;
        self.ov.del(tk);
        Ok(())
    }

    fn index(&mut self, kind: RecordKind, source: u64, id: u64) -> Result<()> {
        let mut ik = bysrc_prefix(kind, self.t(), source)?;
        ik.extend_from_slice(&id.to_be_bytes());
        self.ov.put_fresh(ik, Vec::new());
        if matches!(kind, RecordKind::Measurement | RecordKind::Event) {
            let tk = bytime_key(kind, self.b.now_ms, self.t(), id)?;
            self.ov.put_fresh(tk, Vec::new());
        }
        Ok(())
    }

    fn new_record(&mut self, src: u64, mut body: Map<String, Value>) -> Result<Doc> {
        let id = self.next_id()?;
        body.insert("id".into(), json!(id.to_string()));
        body.insert("source".into(), json!({"id": src.to_string()}));
        body.insert("creationTime".into(), json!(self.b.now));
        if !body.contains_key("time") {
            body.insert("time".into(), json!(self.b.now));
        }
        Ok(Doc {
            id,
            body,
            parent: Some(src),
            created_ms: self.b.now_ms,
            ..Doc::default()
        })
    }

    fn create_record(&mut self, kind: RecordKind, source: &Source, doc: &str) -> Result<Outcome> {
        let body = tri!(parse_object(doc));
        let src = tri!(self.resolve_id(source)?);
        let mut r = self.new_record(src, body)?;
        if kind == RecordKind::Event {
            r.body.insert("lastUpdated".into(), json!(self.b.now));
        }
        let k = rec_key(kind, self.t(), r.id)?;
        let j = doc_json(&r);
        self.ov.put_fresh(k, j.clone().into_bytes());
        self.index(kind, src, r.id)?;
        self.heartbeat(src)?;
        Ok(Outcome::Done(j))
    }

    fn alarm(&mut self, source: &Source, doc: &str) -> Result<Outcome> {
        let mut body = tri!(parse_object(doc));
        let src = tri!(self.resolve_id(source)?);
        let Some(kind) = body.get("type").and_then(Value::as_str).map(str::to_string) else {
            return Ok(Outcome::Invalid("alarm without type".into()));
        };
        let status = body
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("ACTIVE")
            .to_string();
        self.heartbeat(src)?;
        let ok = open_alarm_key(self.t(), src, &kind)?;
        if status != "CLEARED" {
            if let Some(id) = self.ov.get(&ok)?.and_then(|v| keys::read_u64(&v)) {
                if let Some(mut a) = self.record(RecordKind::Alarm, id)? {
                    // A duplicate: count it, keep the first occurrence (§11.4).
                    let count = a.body.get("count").and_then(Value::as_u64).unwrap_or(1);
                    a.body.insert("count".into(), json!(count + 1));
                    for f in ["text", "severity", "time"] {
                        if let Some(v) = body.remove(f) {
                            a.body.insert(f.into(), v);
                        }
                    }
                    self.touch(&mut a);
                    self.put_record(RecordKind::Alarm, &a)?;
                    return Ok(Outcome::Done(doc_json(&a)));
                }
            }
        }
        body.insert("status".into(), json!(status));
        body.insert("count".into(), json!(1));
        let mut a = self.new_record(src, body)?;
        let first = a.body.get("time").cloned().unwrap_or(json!(self.b.now));
        a.body.insert("firstOccurrenceTime".into(), first);
        a.body.insert("lastUpdated".into(), json!(self.b.now));
        let k = rec_key(RecordKind::Alarm, self.t(), a.id)?;
        self.ov.put_fresh(k, doc_json(&a).into_bytes());
        self.index(RecordKind::Alarm, src, a.id)?;
        if status != "CLEARED" {
            self.ov.put(ok, a.id.to_be_bytes().to_vec());
        }
        Ok(Outcome::Done(doc_json(&a)))
    }

    /// The agent that receives `d`'s operations: `d` or its nearest ancestor with the agent
    /// fragment (§2.3), with that agent's `c8y_Serial`.
    fn agent_of(&self, d: &Doc) -> Result<Option<(u64, String)>> {
        let mut cur = Some(d.clone());
        let mut hops = 0;
        while let Some(x) = cur {
            if x.body.contains_key(AGENT) {
                let serial = x
                    .external
                    .iter()
                    .find(|(t, _)| t == SERIAL)
                    .map(|(_, s)| s.clone());
                return Ok(serial.map(|s| (x.id, s)));
            }
            hops += 1;
            if hops > 16 {
                break;
            }
            cur = match x.parent {
                Some(p) => self.object(p)?,
                None => None,
            };
        }
        Ok(None)
    }

    fn create_operation(&mut self, device: u64, doc: &str) -> Result<Outcome> {
        let mut body = tri!(parse_object(doc));
        let Some(d) = self.object(device)? else {
            return Ok(Outcome::NotFound(format!(
                "Managed object {device} not found"
            )));
        };
        let agent = self.agent_of(&d)?;
        for k in [
            "id",
            "self",
            "status",
            "creationTime",
            "failureReason",
            "deviceId",
        ] {
            body.remove(k);
        }
        let id = self.next_id()?;
        body.insert("id".into(), json!(id.to_string()));
        body.insert("deviceId".into(), json!(device.to_string()));
        if let Some(n) = d.str("name") {
            body.insert("deviceName".into(), json!(n));
        }
        body.insert("status".into(), json!("PENDING"));
        body.insert("creationTime".into(), json!(self.b.now));
        if let Some((aid, _)) = &agent {
            body.insert("agentId".into(), json!(aid.to_string()));
        }
        let target = d
            .external
            .iter()
            .find(|(t, _)| t == SERIAL)
            .map(|(_, s)| s.clone());
        let o = Doc {
            id,
            body,
            parent: Some(device),
            agent: agent.clone(),
            target,
            created_ms: self.b.now_ms,
            ..Doc::default()
        };
        let k = rec_key(RecordKind::Operation, self.t(), id)?;
        self.ov.put_fresh(k, doc_json(&o).into_bytes());
        self.index(RecordKind::Operation, device, id)?;
        if let Some((aid, _)) = agent {
            let mut ak = agent_ops_prefix(self.t(), aid)?;
            ak.extend_from_slice(&id.to_be_bytes());
            self.ov.put_fresh(ak, Vec::new());
        }
        Ok(Outcome::Done(doc_json(&o)))
    }

    fn operation_status(
        &mut self,
        source: &Source,
        select: &OpSelect,
        to: &str,
        reason: Option<&str>,
        params: &[String],
        set: &Option<String>,
    ) -> Result<Outcome> {
        if !matches!(to, "" | "PENDING" | "EXECUTING" | "SUCCESSFUL" | "FAILED") {
            return Ok(Outcome::Invalid(format!("Unknown operation status {to}")));
        }
        let set = match set {
            Some(s) => Some(tri!(parse_object(s))),
            None => None,
        };
        // REST selects by id alone; the device's own status updates also name the device.
        let dev = match (source, select) {
            (Source::Id(0), OpSelect::Id(_)) => None,
            _ => Some(tri!(self.resolve(source)?)),
        };
        let mut chosen: Vec<Doc> = Vec::new();
        match select {
            OpSelect::Id(id) => {
                let Some(o) = self.record(RecordKind::Operation, *id)? else {
                    return Ok(Outcome::NotFound(format!("Operation {id} not found")));
                };
                if let Some(d) = &dev {
                    // The device's own operation, or one it is the agent for (thin-edge's
                    // fallback reports a child's operation on the gateway's topic).
                    if o.parent != Some(d.id) && o.agent.as_ref().map(|a| a.0) != Some(d.id) {
                        return Ok(Outcome::NotFound(format!(
                            "Operation {id} is not an operation of this device"
                        )));
                    }
                }
                let now = o.str("status").unwrap_or("PENDING");
                if is_final(now) && now != to {
                    return Ok(Outcome::Invalid(format!("Operation {id} is already {now}")));
                }
                chosen.push(o);
            }
            OpSelect::Oldest { fragment, from } => {
                let Some(d) = &dev else {
                    return Ok(Outcome::Invalid("no device".into()));
                };
                self.operations_of(d.id, |o| {
                    let hit =
                        o.str("status") == Some(from.as_str()) && o.body.contains_key(fragment);
                    if hit {
                        chosen.push(o);
                    }
                    !hit
                })?;
                if chosen.is_empty() {
                    return Ok(Outcome::NotFound(format!(
                        "No {from} operation with fragment {fragment}"
                    )));
                }
            }
            OpSelect::OldestOpen { fragment } => {
                let Some(d) = &dev else {
                    return Ok(Outcome::Invalid("no device".into()));
                };
                let mut pending = None;
                self.operations_of(d.id, |o| {
                    if !o.body.contains_key(fragment) {
                        return true;
                    }
                    match o.str("status") {
                        Some("EXECUTING") => {
                            chosen.push(o);
                            false
                        }
                        Some("PENDING") if pending.is_none() => {
                            pending = Some(o);
                            true
                        }
                        _ => true,
                    }
                })?;
                if chosen.is_empty() {
                    chosen.extend(pending);
                }
                if chosen.is_empty() {
                    return Ok(Outcome::NotFound(format!(
                        "No EXECUTING or PENDING operation with fragment {fragment}"
                    )));
                }
            }
            OpSelect::AllExecuting { fragment } => {
                let Some(d) = &dev else {
                    return Ok(Outcome::Invalid("no device".into()));
                };
                self.operations_of(d.id, |o| {
                    let frag_ok = fragment
                        .as_deref()
                        .is_none_or(|f| f.is_empty() || o.body.contains_key(f));
                    if o.str("status") == Some("EXECUTING") && frag_ok {
                        chosen.push(o);
                    }
                    true
                })?;
            }
        }
        let mut out = Vec::new();
        for mut o in chosen {
            // A custom template may set the status among its fragments; empty keeps it.
            let to = match set
                .as_ref()
                .and_then(|m| m.get("status"))
                .and_then(Value::as_str)
            {
                Some(s) if to.is_empty() => s.to_string(),
                _ if to.is_empty() => o.str("status").unwrap_or("PENDING").to_string(),
                _ => to.to_string(),
            };
            let to = to.as_str();
            if !matches!(to, "PENDING" | "EXECUTING" | "SUCCESSFUL" | "FAILED") {
                return Ok(Outcome::Invalid(format!("Unknown operation status {to}")));
            }
            let now = o.str("status").unwrap_or("PENDING").to_string();
            if is_final(&now) && now != to {
                return Ok(Outcome::Invalid(format!(
                    "Operation {} is already {now}",
                    o.id
                )));
            }
            o.body.insert("status".into(), json!(to));
            if to == "FAILED" {
                o.body
                    .insert("failureReason".into(), json!(reason.unwrap_or("")));
            } else {
                o.body.remove("failureReason");
            }
            if let Some(s) = &set {
                for (k, v) in s.clone() {
                    if matches!(
                        k.as_str(),
                        "id" | "self" | "status" | "deviceId" | "creationTime" | "failureReason"
                    ) {
                        continue;
                    }
                    o.body.insert(k, v);
                }
            }
            if to == "SUCCESSFUL" && !params.is_empty() {
                self.side_effects(&mut o, params)?;
            }
            self.put_record(RecordKind::Operation, &o)?;
            if is_final(to) {
                if let Some((aid, _)) = &o.agent {
                    let mut ak = agent_ops_prefix(self.t(), *aid)?;
                    ak.extend_from_slice(&o.id.to_be_bytes());
                    // Finished operations are never sent again: out of the agent's index.
                    self.ov.del(ak);
                }
            }
            out.push(doc_json(&o));
        }
        Ok(Outcome::Many(out))
    }

    /// Visits the operations of a device, oldest first, while `visit` returns true.
    fn operations_of(&self, device: u64, mut visit: impl FnMut(Doc) -> bool) -> Result<()> {
        let p = bysrc_prefix(RecordKind::Operation, self.t(), device)?;
        for k in self.ov.keys_with_prefix(&p)? {
            let Some(id) = trailing_id(&k) else { continue };
            if let Some(o) = self.record(RecordKind::Operation, id)? {
                if !visit(o) {
                    break;
                }
            }
        }
        Ok(())
    }

    /// 503/506 parameters (§4.8).
    fn side_effects(&mut self, o: &mut Doc, params: &[String]) -> Result<()> {
        let first = params[0].clone();
        if let Some(Value::Object(c)) = o.body.get_mut("c8y_Command") {
            c.insert("result".into(), json!(first));
        } else if let Some(Value::Object(c)) = o.body.get_mut("c8y_LogfileRequest") {
            c.insert("file".into(), json!(first));
        } else if o.body.contains_key("c8y_RelayArray")
            || o.body.contains_key("c8y_CommunicationMode")
        {
            if let Some(dev) = o.parent {
                if let Some(mut d) = self.object(dev)? {
                    if o.body.contains_key("c8y_RelayArray") {
                        d.body.insert("c8y_RelayArray".into(), json!(params));
                    } else {
                        d.body
                            .insert("c8y_CommunicationMode".into(), json!({"mode": first}));
                    }
                    self.touch(&mut d);
                    self.put_object(&d)?;
                }
            }
        }
        Ok(())
    }
}
