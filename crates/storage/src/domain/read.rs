//! Reads of the device data model as applied on this node (the REST side).

use super::apply::{
    bysrc_prefix, last_message_key, obj_key, parse_doc, rec_key, trailing_id, xid_key, OBJ, REC,
};
use super::{Doc, RecordKind};
use crate::error::Result;
use crate::keys;
use crate::state_machine::StateMachineStore;

impl StateMachineStore {
    /// One key as applied: the staged (not yet written back) value if there is one, else the
    /// tree's. Point reads go through here rather than forcing a write-back: the device
    /// pipeline reads on every message, and a write-back per message would undo the batching
    /// of `overlay.rs`.
    fn get_applied(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        {
            let pending = self.lock_pending();
            if let Some(s) = pending.writes.get(key) {
                return Ok(s.value().cloned());
            }
        }
        // Written back in between: then the tree has it (or something newer).
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    /// One managed object.
    pub fn device_object(&self, tenant: &str, id: u64) -> Result<Option<Doc>> {
        match self.get_applied(&obj_key(tenant, id)?)? {
            Some(v) => Ok(Some(parse_doc(&v)?)),
            None => Ok(None),
        }
    }

    /// The object an external ID points at.
    pub fn device_external(&self, tenant: &str, kind: &str, external: &str) -> Result<Option<u64>> {
        Ok(self
            .get_applied(&xid_key(tenant, kind, external)?)?
            .and_then(|v| keys::read_u64(&v)))
    }

    /// When the object last sent something (a measurement, event, alarm or heartbeat).
    pub fn device_last_message(&self, tenant: &str, id: u64) -> Result<Option<String>> {
        Ok(self
            .get_applied(&last_message_key(tenant, id)?)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Managed objects of a tenant in id order that `keep` accepts, at most `max`.
    pub fn device_objects(
        &self,
        tenant: &str,
        mut keep: impl FnMut(&Doc) -> bool,
        max: usize,
    ) -> Result<Vec<Doc>> {
        self.write_back()?;
        let mut p = vec![OBJ];
        keys::put_str(&mut p, tenant)?;
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&p) {
            let (_, v) = kv?;
            let d = parse_doc(&v)?;
            if keep(&d) {
                out.push(d);
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// One measurement, event, alarm or operation.
    pub fn device_record(&self, kind: RecordKind, tenant: &str, id: u64) -> Result<Option<Doc>> {
        match self.get_applied(&rec_key(kind, tenant, id)?)? {
            Some(v) => Ok(Some(parse_doc(&v)?)),
            None => Ok(None),
        }
    }

    /// Records of a kind (of one source, if given) in id order, newest first with `revert`,
    /// that `keep` accepts, at most `max`.
    pub fn device_records(
        &self,
        kind: RecordKind,
        tenant: &str,
        source: Option<u64>,
        revert: bool,
        mut keep: impl FnMut(&Doc) -> bool,
        max: usize,
    ) -> Result<Vec<Doc>> {
        self.write_back()?;
        let mut out = Vec::new();
        let prefix = match source {
            Some(src) => bysrc_prefix(kind, tenant, src)?,
            None => {
                let mut p = vec![REC, kind.tag()];
                keys::put_str(&mut p, tenant)?;
                p
            }
        };
        let iter = self.tree.scan_prefix(&prefix);
        let iter: Box<dyn Iterator<Item = _>> = if revert {
            Box::new(iter.rev())
        } else {
            Box::new(iter)
        };
        for kv in iter {
            let (k, v) = kv?;
            let d = if source.is_some() {
                let Some(id) = trailing_id(&k) else { continue };
                match self.tree.get(rec_key(kind, tenant, id)?)? {
                    Some(v) => parse_doc(&v)?,
                    None => continue,
                }
            } else {
                parse_doc(&v)?
            };
            if keep(&d) {
                out.push(d);
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }
}
