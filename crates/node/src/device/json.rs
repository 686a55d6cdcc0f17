//! JSON via MQTT (c8y-mqtt.md §8): `[t/|q/|c/]<api>/<resource>/<action>[/<id>]` with REST
//! payloads; the source is the connection's device, or the child named in
//! `externalSource`. Errors go to `error` as `{"error", "message", "messageId"}` (§5.2).
//! Pure: the pipeline commits the ops.

use fleetmq_smartrest::Mode;
use fleetmq_storage::domain::{DeviceOp, RecordKind, Source, SERIAL};
use serde_json::{json, Map, Value};

use super::plan::{Step, Then};

/// A parsed JSON-via-MQTT topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonTopic {
    pub mode: Mode,
    pub api: String,
    pub resource: String,
    pub action: String,
    pub id: Option<String>,
}

impl JsonTopic {
    /// Parses `[t/|q/|c/][/]<api>/<resource>/<action>[/<id>]`.
    pub fn parse(topic: &str) -> Option<JsonTopic> {
        let (mode, rest) = match topic.split_once('/') {
            Some(("t", r)) => (Mode::Transient, r),
            Some(("q", r)) => (Mode::Quiescent, r),
            Some(("c", r)) => (Mode::Cep, r),
            _ => (Mode::Persistent, topic),
        };
        // The docs print update/delete topics with a leading `/`.
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        let l: Vec<&str> = rest.split('/').collect();
        match l.as_slice() {
            [api, res, action] => Some(JsonTopic {
                mode,
                api: (*api).into(),
                resource: (*res).into(),
                action: (*action).into(),
                id: None,
            }),
            [api, res, action, id] if !id.is_empty() => Some(JsonTopic {
                mode,
                api: (*api).into(),
                resource: (*res).into(),
                action: (*action).into(),
                id: Some((*id).into()),
            }),
            _ => None,
        }
    }
}

/// The `error` message for a failed JSON message.
pub fn error_payload(api: &str, code: &str, message: &str, message_id: u16) -> String {
    json!({"error": format!("{api}/{code}"), "message": message, "messageId": message_id})
        .to_string()
}

fn err(api: &str, code: &str, message: impl Into<String>, mid: u16) -> Step {
    Step::JsonError(error_payload(api, code, &message.into(), mid))
}

/// The steps of one JSON PUBLISH from device `serial`; `mid` is its packet id.
pub fn steps(topic: &JsonTopic, payload: &[u8], serial: &str, mid: u16) -> Vec<Step> {
    let api = topic.api.as_str();
    let kind = match (api, topic.resource.as_str()) {
        ("measurement", "measurements") => Some(RecordKind::Measurement),
        ("event", "events") => Some(RecordKind::Event),
        ("alarm", "alarms") => Some(RecordKind::Alarm),
        ("inventory", "managedObjects") => None,
        _ => return vec![err(api, "Not Found", "Unsupported endpoint", mid)],
    };
    let body: Option<Value> = if payload.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice(payload) {
            Ok(v) => Some(v),
            Err(e) => {
                return vec![err(
                    api,
                    "validationError",
                    format!("Invalid JSON: {e}"),
                    mid,
                )]
            }
        }
    };
    let device = Source::Device {
        serial: serial.to_string(),
    };
    let op = |op: DeviceOp| Step::Op {
        op,
        then: Then::Json { mid },
        template: api.to_string(),
    };
    let action = topic.action.as_str();
    match (kind, action, &topic.id, body) {
        (Some(k), "create", None, Some(Value::Object(m))) => {
            vec![create(k, m, serial, topic.mode, mid, api)]
        }
        (Some(k), "createBulk", None, Some(Value::Object(mut m))) => {
            let key = match k {
                RecordKind::Measurement => "measurements",
                RecordKind::Event => "events",
                _ => "alarms",
            };
            match m.remove(key) {
                Some(Value::Array(items)) => items
                    .into_iter()
                    .map(|i| match i {
                        Value::Object(m) => create(k, m, serial, topic.mode, mid, api),
                        _ => err(
                            api,
                            "validationError",
                            format!("every item of {key} must be an object"),
                            mid,
                        ),
                    })
                    .collect(),
                _ => vec![err(
                    api,
                    "validationError",
                    format!("{key} must be an array"),
                    mid,
                )],
            }
        }
        (
            Some(k @ (RecordKind::Event | RecordKind::Alarm)),
            "update",
            Some(id),
            Some(Value::Object(m)),
        ) => match id.parse::<u64>() {
            Ok(id) => vec![op(DeviceOp::RecordUpdate {
                kind: k,
                id,
                set: Value::Object(m).to_string(),
            })],
            Err(_) => vec![err(api, "Not Found", format!("No {api} with id {id}"), mid)],
        },
        (Some(k @ (RecordKind::Event | RecordKind::Measurement)), "delete", Some(id), None) => {
            match id.parse::<u64>() {
                Ok(id) => vec![op(DeviceOp::RecordDelete { kind: k, id })],
                Err(_) => vec![err(api, "Not Found", format!("No {api} with id {id}"), mid)],
            }
        }
        (None, "update", Some(xid), Some(Value::Object(m))) => {
            // The trailing id is the external ID of the device, a child or a service (§8).
            let source = if xid == serial {
                device
            } else {
                Source::Child {
                    serial: serial.to_string(),
                    child: xid.clone(),
                }
            };
            vec![op(DeviceOp::Update {
                source,
                set: Value::Object(m).to_string(),
                remove: Vec::new(),
                if_absent: false,
            })]
        }
        (None, "create", None, Some(Value::Object(m))) => {
            vec![op(DeviceOp::CreateObject {
                external: None,
                doc: Value::Object(m).to_string(),
            })]
        }
        (_, "create" | "createBulk" | "update", _, Some(_)) => {
            vec![err(
                api,
                "validationError",
                "the payload must be a JSON object",
                mid,
            )]
        }
        (_, "create" | "createBulk" | "update", _, None) => {
            vec![err(
                api,
                "validationError",
                "a JSON payload is required",
                mid,
            )]
        }
        _ => vec![err(
            api,
            "Not Found",
            format!("Unsupported action {action} on {api}/{}", topic.resource),
            mid,
        )],
    }
}

/// One record to create; `externalSource` names a child device.
fn create(
    kind: RecordKind,
    mut m: Map<String, Value>,
    serial: &str,
    mode: Mode,
    mid: u16,
    api: &str,
) -> Step {
    let stored = matches!(mode, Mode::Persistent | Mode::Quiescent);
    m.remove("source");
    let source = match m.remove("externalSource") {
        Some(Value::Object(x)) => {
            let ty = x.get("type").and_then(Value::as_str).unwrap_or(SERIAL);
            match x.get("externalId").and_then(Value::as_str) {
                Some(id) if ty == SERIAL && id != serial => Source::Child {
                    serial: serial.to_string(),
                    child: id.to_string(),
                },
                Some(_) if ty == SERIAL => Source::Device {
                    serial: serial.to_string(),
                },
                _ => {
                    return err(
                        api,
                        "validationError",
                        "externalSource needs externalId of type c8y_Serial",
                        mid,
                    )
                }
            }
        }
        _ => Source::Device {
            serial: serial.to_string(),
        },
    };
    let mandatory: &[&str] = match kind {
        RecordKind::Measurement => &["type"],
        RecordKind::Event => &["type", "text"],
        _ => &["type", "text", "severity"],
    };
    let missing: Vec<&str> = mandatory
        .iter()
        .copied()
        .filter(|k| m.get(*k).and_then(Value::as_str).is_none_or(str::is_empty))
        .collect();
    if !missing.is_empty() {
        return err(
            api,
            "validationError",
            format!(
                "Following mandatory fields should be included: {}",
                missing.join(",")
            ),
            mid,
        );
    }
    if kind == RecordKind::Alarm {
        let sev = m
            .get("severity")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_uppercase();
        if !["CRITICAL", "MAJOR", "MINOR", "WARNING"].contains(&sev.as_str()) {
            return err(
                api,
                "validationError",
                format!("Unknown severity {sev}"),
                mid,
            );
        }
        m.insert("severity".into(), json!(sev));
    }
    let doc = Value::Object(m).to_string();
    let op = match kind {
        RecordKind::Measurement => DeviceOp::Measurement { source, doc },
        RecordKind::Event => DeviceOp::Event { source, doc },
        _ => DeviceOp::Alarm { source, doc },
    };
    let op = match (stored, mode) {
        (true, _) => op,
        (false, Mode::Transient) => match super::plan::transient(op) {
            Some(op) => op,
            None => return Step::Unstored { kind: "data" },
        },
        (false, _) => {
            return Step::Unstored {
                kind: match kind {
                    RecordKind::Measurement => "measurement",
                    RecordKind::Event => "event",
                    _ => "alarm",
                },
            }
        }
    };
    Step::Op {
        op,
        then: Then::Json { mid },
        template: api.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> JsonTopic {
        JsonTopic::parse(s).expect("topic")
    }

    #[test]
    fn topics_with_modes_ids_and_a_leading_slash() {
        let x = t("t/measurement/measurements/create");
        assert_eq!(
            (x.mode, x.action.as_str(), x.id.as_deref()),
            (Mode::Transient, "create", None)
        );
        let x = t("/event/events/update/42");
        assert_eq!((x.api.as_str(), x.id.as_deref()), ("event", Some("42")));
        assert!(JsonTopic::parse("event/events").is_none());
    }

    #[test]
    fn external_source_names_a_child_and_source_is_ignored() {
        let s = steps(
            &t("measurement/measurements/create"),
            br#"{"source":{"id":"1"},"externalSource":{"externalId":"c1","type":"c8y_Serial"},"type":"m"}"#,
            "d1",
            7,
        );
        match &s[0] {
            Step::Op {
                op: DeviceOp::Measurement { source, doc },
                ..
            } => {
                assert_eq!(
                    *source,
                    Source::Child {
                        serial: "d1".into(),
                        child: "c1".into()
                    }
                );
                assert!(!doc.contains("source"), "{doc}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_fields_answer_the_documented_validation_error() {
        let s = steps(&t("alarm/alarms/create"), br#"{"type":"a"}"#, "d1", 3);
        let Step::JsonError(p) = &s[0] else {
            panic!("{s:?}")
        };
        let v: Value = serde_json::from_str(p).unwrap();
        assert_eq!(v["error"], "alarm/validationError");
        assert_eq!(
            v["message"],
            "Following mandatory fields should be included: text,severity"
        );
        assert_eq!(v["messageId"], 3);
    }

    #[test]
    fn a_bulk_gives_one_step_per_item_and_bad_json_an_error() {
        let s = steps(
            &t("event/events/createBulk"),
            br#"{"events":[{"type":"a","text":"x"},{"type":"b","text":"y"}]}"#,
            "d1",
            1,
        );
        assert_eq!(s.len(), 2);
        let s = steps(&t("event/events/create"), b"{not json", "d1", 1);
        assert!(matches!(&s[0], Step::JsonError(p) if p.contains("event/validationError")));
        let s = steps(&t("alarm/alarms/delete/5"), b"", "d1", 1);
        assert!(matches!(&s[0], Step::JsonError(p) if p.contains("alarm/Not Found")));
    }
}
