//! What a SmartREST static line asks for (c8y-mqtt.md §4): a change of the device's data
//! ([`DeviceOp`]) with how to answer its outcome, an answer that needs no data (600, 602),
//! or an `s/e` error. Pure: the pipeline proposes the ops and sends the answers.

use fleetmq_smartrest::custom::set_path;
use fleetmq_smartrest::templates::all_ids;
use fleetmq_smartrest::{check, encode_line, Mode, Record};
use fleetmq_storage::domain::{DeviceOp, OpSelect, RecordKind, Source};
use serde_json::{json, Map, Value};

/// How the outcome of an op is answered to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Then {
    /// Errors only (`s/e`).
    Quiet,
    /// `100`: `41,100,Device already existing` when it was there.
    Created,
    /// `123`: `124,<id>` on `s/ds`.
    MoId,
    /// `105`: `106,<children...>` on `s/ds`.
    Children,
    /// `500`: the PENDING operations again.
    Deliver,
    /// JSON via MQTT: failures on `error` with this message id.
    Json { mid: u16 },
    /// `s/ut/<X-ID>`: `20,<X-ID>,<id>` on `s/dt` when created, `41` on `s/e` when it
    /// existed.
    TemplatesCreated { xid: String },
    /// A custom request template with `response=true`: the collection's response templates
    /// over the resulting object, on `topic`.
    Respond {
        topic: String,
        collection: std::sync::Arc<fleetmq_smartrest::custom::Collection>,
    },
}

/// One step of a SmartREST message.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // a few per message, short-lived
pub enum Step {
    /// Commit `op`; answer its outcome as `then` says, errors naming `template`.
    Op {
        op: DeviceOp,
        then: Then,
        template: String,
    },
    /// Send `payload` on `topic` (`s/ds`) now.
    Reply {
        topic: &'static str,
        payload: String,
    },
    /// Send this `s/e` line.
    Error(String),
    /// Send this JSON error on `error` (JSON via MQTT).
    JsonError(String),
    /// A measurement, event or alarm in a mode that does not store it (`t/`, `c/`): passed on
    /// to real-time processing only.
    Unstored { kind: &'static str },
}

/// A measurement, event or alarm op as its transient (`t/`) form: notified, not stored.
pub fn transient(op: DeviceOp) -> Option<DeviceOp> {
    let (kind, source, doc) = match op {
        DeviceOp::Measurement { source, doc } => (RecordKind::Measurement, source, doc),
        DeviceOp::Event { source, doc } => (RecordKind::Event, source, doc),
        DeviceOp::Alarm { source, doc } => (RecordKind::Alarm, source, doc),
        _ => return None,
    };
    Some(DeviceOp::Transient { kind, source, doc })
}

/// The version `601` reports.
pub const PLATFORM_VERSION: &str = env!("CARGO_PKG_VERSION");

fn arg(r: &Record, i: usize) -> Option<&str> {
    r.arg(i).filter(|s| !s.is_empty())
}

/// A number as JSON: integers stay integers (`25`, not `25.0`).
fn number(v: &str) -> Value {
    let v = v.trim();
    if let Ok(i) = v.parse::<i64>() {
        return json!(i);
    }
    v.parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(Value::Number)
        .unwrap_or_else(|| json!(v))
}

/// An object of the fields given (empty ones left out).
fn fields(r: &Record, names: &[&str], numeric: &[&str]) -> Map<String, Value> {
    let mut m = Map::new();
    for (i, n) in names.iter().enumerate() {
        if let Some(v) = arg(r, i) {
            let v = if numeric.contains(n) {
                number(v)
            } else {
                json!(v)
            };
            m.insert((*n).to_string(), v);
        }
    }
    m
}

fn list(r: &Record, from: usize) -> Vec<Value> {
    r.args()
        .iter()
        .skip(from)
        .filter(|s| !s.is_empty())
        .map(|s| json!(s))
        .collect()
}

fn update(source: &Source, set: Value) -> DeviceOp {
    DeviceOp::Update {
        source: source.clone(),
        set: set.to_string(),
        remove: Vec::new(),
        if_absent: false,
    }
}

fn series(value: &str, unit: Option<&str>) -> Value {
    let mut s = Map::new();
    s.insert("value".into(), number(value));
    if let Some(u) = unit.filter(|u| !u.is_empty()) {
        s.insert("unit".into(), json!(u));
    }
    Value::Object(s)
}

fn with_time(mut doc: Map<String, Value>, time: Option<&str>) -> Map<String, Value> {
    if let Some(t) = time {
        doc.insert("time".into(), json!(t));
    }
    doc
}

fn typed(ty: &str, v: Option<&str>) -> Value {
    match (ty.to_ascii_uppercase().as_str(), v) {
        (_, None) => Value::Null,
        ("NUMBER" | "INTEGER" | "UNSIGNED", Some(v)) => number(v),
        ("BOOLEAN", Some(v)) => json!(v.eq_ignore_ascii_case("true")),
        (_, Some(v)) => json!(v),
    }
}

/// The steps of the static-template lines of one PUBLISH on `<mode>/us[/<child>]`.
pub fn steps(records: &[Record], source: &Source, serial: &str, mode: Mode) -> Vec<Step> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let s = step(r, source, serial, mode);
        // 402 also moves the device (before its location event, in the same batch).
        if r.template() == "402" && !matches!(s, Step::Error(_)) {
            let pos = fields(
                r,
                &["lat", "lng", "alt", "accuracy"],
                &["lat", "lng", "alt", "accuracy"],
            );
            out.push(Step::Op {
                op: update(source, json!({ "c8y_Position": pos })),
                then: Then::Quiet,
                template: "402".into(),
            });
        }
        out.push(s);
    }
    out
}

fn step(r: &Record, source: &Source, serial: &str, mode: Mode) -> Step {
    let t = match check(r) {
        Ok(t) => t,
        Err(e) => return Step::Error(e.line()),
    };
    let id = r.template().to_string();
    let op = |op: DeviceOp| Step::Op {
        op,
        then: Then::Quiet,
        template: id.clone(),
    };
    let stored = matches!(mode, Mode::Persistent | Mode::Quiescent);
    let data = |kind: &'static str, op: DeviceOp| {
        if stored {
            Step::Op {
                op,
                then: Then::Quiet,
                template: id.clone(),
            }
        } else if mode == Mode::Transient {
            match transient(op) {
                Some(op) => Step::Op {
                    op,
                    then: Then::Quiet,
                    template: id.clone(),
                },
                None => Step::Unstored { kind },
            }
        } else {
            Step::Unstored { kind }
        }
    };
    let src = source.clone();
    match t.id {
        100 => {
            let (name, kind) = (arg(r, 0).map(str::to_string), arg(r, 1).map(str::to_string));
            let op = match source {
                Source::Child { serial, child } => DeviceOp::CreateChild {
                    parent: Source::Device {
                        serial: serial.clone(),
                    },
                    child: child.clone(),
                    name,
                    kind,
                    is_device: true,
                },
                _ => DeviceOp::CreateDevice {
                    source: Source::Device {
                        serial: serial.to_string(),
                    },
                    name,
                    kind,
                },
            };
            Step::Op {
                op,
                then: Then::Created,
                template: id,
            }
        }
        101 => op(DeviceOp::CreateChild {
            parent: src,
            child: arg(r, 0).unwrap_or_default().to_string(),
            name: arg(r, 1).map(str::to_string),
            kind: arg(r, 2).map(str::to_string),
            is_device: !arg(r, 3).is_some_and(|v| v.eq_ignore_ascii_case("false")),
        }),
        102 => op(DeviceOp::CreateService {
            parent: src,
            xid: arg(r, 0).unwrap_or_default().into(),
            service_type: arg(r, 1).unwrap_or_default().into(),
            name: arg(r, 2).unwrap_or_default().into(),
            status: arg(r, 3).unwrap_or_default().into(),
        }),
        104 => op(update(&src, json!({"status": arg(r, 0)}))),
        105 => Step::Op {
            op: DeviceOp::Describe { source: src },
            then: Then::Children,
            template: id,
        },
        107 => op(DeviceOp::Update {
            source: src,
            set: "{}".into(),
            remove: r.args().iter().filter(|a| !a.is_empty()).cloned().collect(),
            if_absent: false,
        }),
        110 => op(update(
            &src,
            json!({"c8y_Hardware": fields(r, &["serialNumber", "model", "revision"], &[])}),
        )),
        111 => op(update(
            &src,
            json!({"c8y_Mobile": fields(r, &["imei", "iccid", "imsi", "mcc", "mnc", "lac", "cellId"], &[])}),
        )),
        112 => op(update(
            &src,
            json!({"c8y_Position": fields(r, &["lat", "lng", "alt", "accuracy"], &["lat", "lng", "alt", "accuracy"])}),
        )),
        113 => op(update(
            &src,
            json!({"c8y_Configuration": fields(r, &["config"], &[])}),
        )),
        114 => op(update(&src, json!({"c8y_SupportedOperations": list(r, 0)}))),
        115 => op(update(
            &src,
            json!({"c8y_Firmware": fields(r, &["name", "version", "url"], &[])}),
        )),
        116 => {
            let items: Vec<Value> = r
                .args()
                .chunks(3)
                .filter(|c| c.iter().any(|v| !v.is_empty()))
                .map(|c| {
                    json!({"name": c.first(), "version": c.get(1), "url": c.get(2).cloned().unwrap_or_default()})
                })
                .collect();
            op(update(&src, json!({"c8y_SoftwareList": items})))
        }
        117 => op(DeviceOp::Update {
            source: src,
            set: json!({"c8y_RequiredAvailability":
                fields(r, &["responseInterval"], &["responseInterval"])})
            .to_string(),
            remove: Vec::new(),
            if_absent: true,
        }),
        118 => op(update(&src, json!({"c8y_SupportedLogs": list(r, 0)}))),
        119 => op(update(
            &src,
            json!({"c8y_SupportedConfigurations": list(r, 0)}),
        )),
        120 => {
            let ty = arg(r, 0).unwrap_or_default();
            let mut f = Map::new();
            f.insert("name".into(), json!(arg(r, 2).unwrap_or(ty)));
            f.insert("type".into(), json!(ty));
            f.insert("url".into(), json!(arg(r, 1)));
            if let Some(tm) = arg(r, 3) {
                f.insert("time".into(), json!(tm));
            }
            op(update(
                &src,
                json!({ format!("c8y_Configuration_{ty}"): f }),
            ))
        }
        121 => {
            let mut f = Map::new();
            f.insert(
                "profileExecuted".into(),
                json!(arg(r, 0).is_some_and(|v| v.eq_ignore_ascii_case("true"))),
            );
            if let Some(p) = arg(r, 1) {
                f.insert("profileId".into(), json!(p));
            }
            op(update(&src, json!({ "c8y_Profile": f })))
        }
        122 => op(update(
            &src,
            json!({"c8y_Agent": fields(r, &["name", "version", "url", "maintainer"], &[])}),
        )),
        123 => Step::Op {
            op: DeviceOp::Describe { source: src },
            then: Then::MoId,
            template: id,
        },
        125 => op(update(&src, json!({}))),
        140..=142 => {
            let width = if t.id == 142 { 2 } else { 4 };
            let items: Vec<Value> = r
                .args()
                .chunks(width)
                .filter(|c| c.iter().any(|v| !v.is_empty()))
                .map(|c| {
                    let mut m = Map::new();
                    m.insert("name".into(), json!(c.first()));
                    m.insert("version".into(), json!(c.get(1)));
                    if width == 4 {
                        m.insert(
                            "softwareType".into(),
                            json!(c.get(2).cloned().unwrap_or_default()),
                        );
                        m.insert("url".into(), json!(c.get(3).cloned().unwrap_or_default()));
                    }
                    Value::Object(m)
                })
                .collect();
            if t.id == 140 {
                op(update(&src, json!({ "c8y_SoftwareList": items })))
            } else {
                op(DeviceOp::ListEdit {
                    source: src,
                    fragment: "c8y_SoftwareList".into(),
                    items: Value::Array(items).to_string(),
                    remove: t.id == 142,
                })
            }
        }
        143 | 150 => {
            let frag = if t.id == 143 {
                "c8y_SupportedSoftwareTypes"
            } else {
                "c8y_RemoteAccessSupportedProtocols"
            };
            let l = list(r, 0);
            // An empty list removes the fragment (§4.1).
            let v = if l.is_empty() { Value::Null } else { json!(l) };
            op(update(&src, json!({ frag: v })))
        }
        200 => {
            let frag = arg(r, 0).unwrap_or_default();
            let ser = arg(r, 1).unwrap_or_default();
            let mut doc = Map::new();
            doc.insert("type".into(), json!(frag));
            doc.insert(
                frag.into(),
                json!({ ser: series(arg(r, 2).unwrap_or("0"), arg(r, 3)) }),
            );
            let doc = with_time(doc, arg(r, 4));
            data(
                "measurement",
                DeviceOp::Measurement {
                    source: src,
                    doc: Value::Object(doc).to_string(),
                },
            )
        }
        201 => {
            let mut doc = Map::new();
            doc.insert("type".into(), json!(arg(r, 0)));
            for q in r.args().get(2..).unwrap_or(&[]).chunks(4) {
                let (Some(f), Some(s), Some(v)) = (
                    q.first().filter(|x| !x.is_empty()),
                    q.get(1).filter(|x| !x.is_empty()),
                    q.get(2).filter(|x| !x.is_empty()),
                ) else {
                    continue;
                };
                let entry = doc
                    .entry(f.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(m) = entry.as_object_mut() {
                    m.insert(s.clone(), series(v, q.get(3).map(String::as_str)));
                }
            }
            let doc = with_time(doc, arg(r, 1));
            data(
                "measurement",
                DeviceOp::Measurement {
                    source: src,
                    doc: Value::Object(doc).to_string(),
                },
            )
        }
        210..=212 => {
            let (ty, body, time) = match t.id {
                210 => {
                    let mut m = Map::new();
                    if let Some(v) = arg(r, 0) {
                        m.insert("rssi".into(), series(v, Some("dBm")));
                    }
                    if let Some(v) = arg(r, 1) {
                        m.insert("ber".into(), series(v, Some("%")));
                    }
                    ("c8y_SignalStrength", Value::Object(m), arg(r, 2))
                }
                211 => (
                    "c8y_TemperatureMeasurement",
                    json!({"T": series(arg(r, 0).unwrap_or("0"), Some("C"))}),
                    arg(r, 1),
                ),
                _ => (
                    "c8y_Battery",
                    json!({"level": series(arg(r, 0).unwrap_or("0"), Some("%"))}),
                    arg(r, 1),
                ),
            };
            let mut doc = Map::new();
            doc.insert("type".into(), json!(ty));
            doc.insert(ty.into(), body);
            data(
                "measurement",
                DeviceOp::Measurement {
                    source: src,
                    doc: Value::Object(with_time(doc, time)).to_string(),
                },
            )
        }
        301..=304 => {
            let severity = ["CRITICAL", "MAJOR", "MINOR", "WARNING"][usize::from(t.id - 301)];
            let ty = arg(r, 0).unwrap_or_default();
            let text = arg(r, 1)
                .map(str::to_string)
                .unwrap_or_else(|| format!("Alarm of type {ty} raised"));
            let mut doc = Map::new();
            doc.insert("type".into(), json!(ty));
            doc.insert("text".into(), json!(text));
            doc.insert("severity".into(), json!(severity));
            data(
                "alarm",
                DeviceOp::Alarm {
                    source: src,
                    doc: Value::Object(with_time(doc, arg(r, 2))).to_string(),
                },
            )
        }
        305..=307 => op(DeviceOp::AlarmChange {
            source: src,
            kind: arg(r, 0).unwrap_or_default().into(),
            severity: (t.id == 305).then(|| arg(r, 1).unwrap_or_default().to_ascii_uppercase()),
            status: (t.id == 306).then(|| "CLEARED".to_string()),
            remove: if t.id == 307 {
                r.args()
                    .iter()
                    .skip(1)
                    .filter(|a| !a.is_empty())
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            },
            set: None,
        }),
        400 => {
            let mut doc = Map::new();
            doc.insert("type".into(), json!(arg(r, 0)));
            doc.insert("text".into(), json!(arg(r, 1)));
            data(
                "event",
                DeviceOp::Event {
                    source: src,
                    doc: Value::Object(with_time(doc, arg(r, 2))).to_string(),
                },
            )
        }
        401 | 402 => {
            let pos = fields(
                r,
                &["lat", "lng", "alt", "accuracy"],
                &["lat", "lng", "alt", "accuracy"],
            );
            let mut doc = Map::new();
            doc.insert("type".into(), json!("c8y_LocationUpdate"));
            doc.insert("text".into(), json!("Location updated"));
            doc.insert("c8y_Position".into(), Value::Object(pos.clone()));
            data(
                "event",
                DeviceOp::Event {
                    source: src,
                    doc: Value::Object(with_time(doc, arg(r, 4))).to_string(),
                },
            )
        }
        407 => op(DeviceOp::EventClear {
            source: src,
            kind: arg(r, 0).unwrap_or_default().into(),
            remove: r
                .args()
                .iter()
                .skip(1)
                .filter(|a| !a.is_empty())
                .cloned()
                .collect(),
        }),
        408 => {
            let mut doc = Map::new();
            doc.insert("type".into(), json!("c8y_ParameterUpdate"));
            doc.insert(
                "text".into(),
                json!(arg(r, 0).unwrap_or("Device parameters updated")),
            );
            for tr in r.args().get(3..).unwrap_or(&[]).chunks(3) {
                let Some(path) = tr.first().filter(|p| !p.is_empty()) else {
                    continue;
                };
                let ty = tr.get(1).map(String::as_str).unwrap_or("STRING");
                let v = tr.get(2).map(String::as_str).filter(|v| !v.is_empty());
                set_path(&mut doc, path, typed(ty, v));
            }
            data(
                "event",
                DeviceOp::Event {
                    source: src,
                    doc: Value::Object(with_time(doc, arg(r, 1))).to_string(),
                },
            )
        }
        500 => Step::Op {
            op: DeviceOp::Pending { source: src },
            then: Then::Deliver,
            template: id,
        },
        501..=507 => {
            let a0 = arg(r, 0).unwrap_or_default().to_string();
            let by_id = || a0.parse::<u64>().ok();
            let (select, to, reason, params) = match t.id {
                501 => (
                    OpSelect::Oldest {
                        fragment: a0.clone(),
                        from: "PENDING".into(),
                    },
                    "EXECUTING",
                    None,
                    vec![],
                ),
                502 => (
                    OpSelect::Oldest {
                        fragment: a0.clone(),
                        from: "EXECUTING".into(),
                    },
                    "FAILED",
                    arg(r, 1),
                    vec![],
                ),
                503 => (
                    OpSelect::Oldest {
                        fragment: a0.clone(),
                        from: "EXECUTING".into(),
                    },
                    "SUCCESSFUL",
                    None,
                    r.args().get(1..).unwrap_or(&[]).to_vec(),
                ),
                504..=506 => {
                    let Some(n) = by_id() else {
                        return Step::Error(encode_line(&[
                            "45",
                            &id,
                            &format!("Value is not a NUMBER: {a0}"),
                        ]));
                    };
                    match t.id {
                        504 => (OpSelect::Id(n), "EXECUTING", None, vec![]),
                        505 => (OpSelect::Id(n), "FAILED", arg(r, 1), vec![]),
                        _ => (
                            OpSelect::Id(n),
                            "SUCCESSFUL",
                            None,
                            r.args().get(1..).unwrap_or(&[]).to_vec(),
                        ),
                    }
                }
                _ => (
                    OpSelect::AllExecuting {
                        fragment: arg(r, 0).map(str::to_string),
                    },
                    "FAILED",
                    arg(r, 1),
                    vec![],
                ),
            };
            op(DeviceOp::OperationStatus {
                source: src,
                select,
                to: to.into(),
                reason: reason.map(|s| s.chars().take(500).collect()),
                params,
                set: None,
            })
        }
        600 => Step::Reply {
            topic: "s/ds",
            payload: encode_line(&["601", PLATFORM_VERSION]),
        },
        602 => {
            let mut f = vec!["603".to_string()];
            f.extend(all_ids().iter().map(|i| i.to_string()));
            Step::Reply {
                topic: "s/ds",
                payload: encode_line(&f),
            }
        }
        _ => Step::Error(encode_line(&[
            "40",
            &id,
            "No static template for this message id",
        ])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetmq_smartrest::parse_records;
    use proptest::prelude::*;

    fn dev() -> Source {
        Source::Device {
            serial: "d1".into(),
        }
    }

    fn plan(text: &str, mode: Mode) -> Vec<Step> {
        steps(&parse_records(text).unwrap(), &dev(), "d1", mode)
    }

    fn doc_of(s: &Step) -> serde_json::Value {
        match s {
            Step::Op {
                op: DeviceOp::Measurement { doc, .. } | DeviceOp::Event { doc, .. },
                ..
            } => serde_json::from_str(doc).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn measurement_templates_give_cumulocity_series() {
        let s = plan(
            "200,c8y_T,T,21.5,C\n211,25\n210,-70,\n212,80,2026-01-01T00:00:00Z",
            Mode::Persistent,
        );
        assert_eq!(
            doc_of(&s[0])["c8y_T"]["T"],
            json!({"value": 21.5, "unit": "C"})
        );
        assert_eq!(
            doc_of(&s[1])["c8y_TemperatureMeasurement"]["T"]["value"],
            25
        );
        let sig = doc_of(&s[2]);
        assert_eq!(sig["c8y_SignalStrength"]["rssi"]["value"], -70);
        assert!(sig["c8y_SignalStrength"].get("ber").is_none());
        assert_eq!(doc_of(&s[3])["time"], "2026-01-01T00:00:00Z");
    }

    #[test]
    fn a_402_moves_the_device_and_records_the_event() {
        let s = plan("402,52.1,13.4,,,", Mode::Persistent);
        assert!(
            matches!(&s[0], Step::Op { op: DeviceOp::Update { set, .. }, .. } if set.contains("c8y_Position"))
        );
        assert_eq!(doc_of(&s[1])["type"], "c8y_LocationUpdate");
    }

    #[test]
    fn modes_decide_storing() {
        assert!(matches!(
            &plan("200,a,b,1", Mode::Transient)[0],
            Step::Op {
                op: DeviceOp::Transient { .. },
                ..
            }
        ));
        assert!(matches!(
            &plan("200,a,b,1", Mode::Cep)[0],
            Step::Unstored { .. }
        ));
        assert!(matches!(
            &plan("200,a,b,1", Mode::Quiescent)[0],
            Step::Op {
                op: DeviceOp::Measurement { .. },
                ..
            }
        ));
        // Inventory lines are processed in every mode.
        assert!(matches!(
            &plan("114,c8y_Restart", Mode::Cep)[0],
            Step::Op {
                op: DeviceOp::Update { .. },
                ..
            }
        ));
    }

    #[test]
    fn operation_ids_must_be_numbers() {
        assert_eq!(
            plan("504,abc", Mode::Persistent)[0],
            Step::Error("45,504,Value is not a NUMBER: abc".into())
        );
        assert_eq!(
            plan("999", Mode::Persistent)[0],
            Step::Error("40,999,No static template for this message id".into())
        );
    }

    proptest! {
        #[test]
        fn any_records_plan_without_panicking(s in "([0-9]{3}(,[a-z0-9.\"]{0,5}){0,9}\n){1,4}") {
            if let Ok(r) = parse_records(&s) {
                for mode in [Mode::Persistent, Mode::Transient, Mode::Quiescent, Mode::Cep] {
                    let _ = steps(&r, &dev(), "d1", mode);
                }
            }
        }

        #[test]
        fn any_json_plans_without_panicking(topic in "(t/)?(measurement/measurements|event/events|alarm/alarms|inventory/managedObjects)/(create|createBulk|update|delete)(/[a-z0-9]{1,3})?", body in "\\PC{0,40}") {
            if let Some(t) = super::super::json::JsonTopic::parse(&topic) {
                let _ = super::super::json::steps(&t, body.as_bytes(), "d1", 1);
            }
        }
    }
}
