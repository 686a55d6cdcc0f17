//! Custom template collections on the node (c8y-mqtt.md §7): creating one over MQTT
//! (`s/ut/<X-ID>`, answered on `s/dt`), running request templates (`s/uc/<X-ID>`, `s/ud` with
//! the ClientId's default X-ID) and response templates (`s/dc/<X-ID>`, `s/dd`).
//!
//! A collection is a managed object of type `c8y_SmartRest2Template` with external ID
//! `c8y_SmartRest2DeviceIdentifier` = X-ID, as c8ydm creates it over REST, so REST and MQTT
//! see the same collections. It lives in the group its X-ID hashes to.

use std::sync::Arc;

use fleetmq_smartrest::custom::{apply_request, Collection, Request, Target, FRAGMENT, XID_TYPE};
use fleetmq_smartrest::{encode_line, Mode, Record};
use fleetmq_storage::domain::{DeviceOp, OpSelect, Source};
use fleetmq_storage::SessionKey;
use serde_json::{json, Value};

use super::plan::{Step, Then};
use crate::broker::Broker;

/// The group a collection's object is created in.
pub fn group_of_xid(broker: &Broker, tenant: &str, xid: &str) -> u64 {
    broker
        .durable
        .group_of(&SessionKey::new(tenant.to_string(), format!("xid:{xid}")))
}

/// A collection as applied on this node: `(object id, collection)`.
pub fn load(broker: &Broker, tenant: &str, xid: &str) -> Option<(u64, Arc<Collection>)> {
    let d = &broker.durable;
    let first = group_of_xid(broker, tenant, xid);
    let mut groups = d.device_groups();
    groups.sort_by_key(|g| *g != first);
    for g in groups {
        let st = d.device_store(g)?;
        let Ok(Some(id)) = st.device_external(tenant, XID_TYPE, xid) else {
            continue;
        };
        let doc = st.device_object(tenant, id).ok().flatten()?;
        let c = doc.body.get(FRAGMENT).and_then(Collection::from_json)?;
        return Some((id, Arc::new(c)));
    }
    None
}

/// The op that creates a collection from its `10`/`11` lines.
pub fn create_op(xid: &str, c: &Collection) -> DeviceOp {
    DeviceOp::CreateObject {
        doc: json!({"name": xid, "type": "c8y_SmartRest2Template", FRAGMENT: c.to_json()})
            .to_string(),
        external: Some((XID_TYPE.to_string(), xid.to_string())),
    }
}

fn target_source(t: &Target) -> Result<Source, String> {
    match t {
        Target::Id(raw) => raw
            .trim()
            .parse()
            .map(Source::Id)
            .map_err(|_| format!("Value is not a NUMBER: {raw}")),
        Target::External { kind, id } => Ok(Source::External {
            kind: kind.clone(),
            external: id.clone(),
        }),
    }
}

/// The steps of the usage lines of one PUBLISH on `s/uc/<X-ID>` or `s/ud`; responses of
/// `response=true` templates go to `answer_topic` (`s/dc/<X-ID>` or `s/dd`).
pub fn steps(
    c: &Arc<Collection>,
    records: &[Record],
    source: &Source,
    mode: Mode,
    now: &str,
    answer_topic: &str,
) -> Vec<Step> {
    let stored = matches!(mode, Mode::Persistent | Mode::Quiescent);
    records
        .iter()
        .map(|r| {
            let id = r.template().to_string();
            let Some(t) = c.request(&id) else {
                return Step::Error(encode_line(&["40", &id, "No template for this message id"]));
            };
            let req = match apply_request(t, r, now) {
                Ok(q) => q,
                Err(e) => return Step::Error(e.line()),
            };
            let then = if t.response {
                Then::Respond {
                    topic: answer_topic.to_string(),
                    collection: c.clone(),
                }
            } else {
                Then::Quiet
            };
            let src = source.clone();
            let op = match req {
                Request::Create { api, doc } => {
                    let doc = Value::Object(doc).to_string();
                    let op = match api.as_str() {
                        "MEASUREMENT" => DeviceOp::Measurement { source: src, doc },
                        "EVENT" => DeviceOp::Event { source: src, doc },
                        _ => DeviceOp::Alarm { source: src, doc },
                    };
                    match mode {
                        _ if stored => op,
                        Mode::Transient => match super::plan::transient(op) {
                            Some(op) => op,
                            None => return Step::Unstored { kind: "data" },
                        },
                        _ => {
                            return Step::Unstored {
                                kind: match api.as_str() {
                                    "MEASUREMENT" => "measurement",
                                    "EVENT" => "event",
                                    _ => "alarm",
                                },
                            }
                        }
                    }
                }
                Request::CreateObject { doc, external } => DeviceOp::CreateObject {
                    doc: Value::Object(doc).to_string(),
                    external,
                },
                Request::Get { target } => match target_source(&target) {
                    Ok(s) => DeviceOp::Describe { source: s },
                    Err(e) => return Step::Error(encode_line(&["45", &id, &e])),
                },
                Request::Update { target, set } => match target_source(&target) {
                    Ok(s) => DeviceOp::Update {
                        source: s,
                        set: Value::Object(set).to_string(),
                        remove: Vec::new(),
                        if_absent: false,
                    },
                    Err(e) => return Step::Error(encode_line(&["45", &id, &e])),
                },
                Request::UpdateAlarm { kind, set } => DeviceOp::AlarmChange {
                    source: src,
                    kind,
                    severity: None,
                    status: None,
                    remove: Vec::new(),
                    set: Some(Value::Object(set).to_string()),
                },
                Request::UpdateOperation { fragment, mut set } => {
                    let reason = set
                        .remove("failureReason")
                        .and_then(|v| v.as_str().map(str::to_string));
                    DeviceOp::OperationStatus {
                        source: src,
                        select: OpSelect::OldestOpen { fragment },
                        to: String::new(),
                        reason,
                        params: Vec::new(),
                        set: Some(Value::Object(set).to_string()),
                    }
                }
            };
            Step::Op {
                op,
                then,
                template: id,
            }
        })
        .collect()
}
