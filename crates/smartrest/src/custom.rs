//! Custom template collections (c8y-mqtt.md §7): request templates (`10`) that turn a short
//! line into a platform request, response templates (`11`) that pick values out of JSON (an
//! operation, a GET answer) into lines. Pure: the node stores collections as managed objects
//! (`c8y_SmartRest2Template`, the shape c8ydm creates over REST) and runs the requests.

use serde_json::{json, Map, Value};

use crate::record::{encode_line, Record};
use crate::templates::SmartError;

/// The fragment a collection's managed object holds (§7.4).
pub const FRAGMENT: &str = "com_cumulocity_model_smartrest_csv_CsvSmartRestTemplate";
/// The external ID type naming a collection by its X-ID (§7.4, §9).
pub const XID_TYPE: &str = "c8y_SmartRest2DeviceIdentifier";

/// A custom value of a request template: where it goes, its type, a fixed value (empty: the
/// device supplies it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomValue {
    pub path: String,
    pub ty: String,
    pub value: String,
}

/// A request template (`10`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTemplate {
    pub msg_id: String,
    pub method: String,
    pub api: String,
    pub response: bool,
    pub by_id: bool,
    pub external_id_type: String,
    /// The fixed-position values of the method and api (type, time, ...), empty where the
    /// device supplies them.
    pub mandatory: Vec<String>,
    pub custom: Vec<CustomValue>,
}

/// A response template (`11`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseTemplate {
    pub msg_id: String,
    pub base: String,
    pub condition: String,
    pub pattern: Vec<String>,
}

/// A template collection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collection {
    pub requests: Vec<RequestTemplate>,
    pub responses: Vec<ResponseTemplate>,
}

fn bad(id: &str, text: &str) -> SmartError {
    SmartError {
        code: 41,
        template: id.to_string(),
        text: text.to_string(),
    }
}

/// How many fixed-position values a method and api take (§7.2).
fn mandatory_count(method: &str, api: &str) -> Option<usize> {
    Some(match (method, api) {
        ("POST", "MEASUREMENT") => 2,
        ("POST", "EVENT") => 3,
        ("POST", "ALARM") => 5,
        ("POST", "INVENTORY") => 0,
        ("GET", "INVENTORY") => 0,
        ("PUT", "INVENTORY") => 0,
        ("PUT", "ALARM") => 1,
        ("PUT", "OPERATION") => 1,
        _ => return None,
    })
}

const TYPES: [&str; 9] = [
    "STRING",
    "DATE",
    "NUMBER",
    "INTEGER",
    "UNSIGNED",
    "FLAG",
    "SEVERITY",
    "ALARMSTATUS",
    "OPERATIONSTATUS",
];

fn customs(id: &str, rest: &[String]) -> Result<Vec<CustomValue>, SmartError> {
    let mut out = Vec::new();
    for c in rest.chunks(3) {
        let path = c.first().cloned().unwrap_or_default();
        if path.is_empty() {
            if c.iter().all(String::is_empty) {
                continue;
            }
            return Err(bad(id, "Bad request template definition"));
        }
        let ty = c
            .get(1)
            .filter(|t| !t.is_empty())
            .map(|t| t.to_ascii_uppercase())
            .unwrap_or_else(|| "STRING".into());
        if !TYPES.contains(&ty.as_str()) {
            return Err(bad(id, &format!("Bad value type: {ty}")));
        }
        out.push(CustomValue {
            path,
            ty,
            value: c.get(2).cloned().unwrap_or_default(),
        });
    }
    Ok(out)
}

impl Collection {
    /// A collection from its `10` / `11` lines (an `s/ut/<X-ID>` payload).
    pub fn from_lines(records: &[Record]) -> Result<Collection, SmartError> {
        let mut c = Collection::default();
        for r in records {
            let a = r.args();
            let id = a.first().cloned().unwrap_or_default();
            match r.template() {
                "10" => {
                    let method = a.get(1).map(|s| s.to_ascii_uppercase()).unwrap_or_default();
                    let api = a.get(2).map(|s| s.to_ascii_uppercase()).unwrap_or_default();
                    if id.is_empty() {
                        return Err(bad(
                            &id,
                            "Not a valid message identifier for template creation",
                        ));
                    }
                    let Some(n) = mandatory_count(&method, &api) else {
                        return Err(bad(&id, "Bad request template definition"));
                    };
                    let response = a.get(3).is_some_and(|v| v.eq_ignore_ascii_case("true"))
                        || (method == "GET" && a.get(3).is_none_or(|v| v.is_empty()));
                    let mut rest: Vec<String> = a.get(4..).unwrap_or(&[]).to_vec();
                    let (by_id, ext) = match (method.as_str(), api.as_str()) {
                        ("GET" | "PUT", "INVENTORY") => {
                            let by = rest.first().is_some_and(|v| v.eq_ignore_ascii_case("true"));
                            let ty = rest.get(1).cloned().unwrap_or_default();
                            rest.drain(..rest.len().min(2));
                            (by, ty)
                        }
                        ("POST", "INVENTORY") => {
                            let ty = rest.first().cloned().unwrap_or_default();
                            rest.drain(..rest.len().min(1));
                            (false, ty)
                        }
                        _ => (false, String::new()),
                    };
                    let mut mandatory: Vec<String> = rest.iter().take(n).cloned().collect();
                    mandatory.resize(n, String::new());
                    let custom = customs(&id, rest.get(n..).unwrap_or(&[]))?;
                    if c.requests.iter().any(|t| t.msg_id == id) {
                        return Err(bad(&id, "Duplicate message identifiers are not allowed"));
                    }
                    c.requests.push(RequestTemplate {
                        msg_id: id,
                        method,
                        api,
                        response,
                        by_id,
                        external_id_type: ext,
                        mandatory,
                        custom,
                    });
                }
                "11" => {
                    if id.is_empty() {
                        return Err(bad(
                            &id,
                            "Not a valid message identifier for template creation",
                        ));
                    }
                    if c.responses.iter().any(|t| t.msg_id == id) {
                        return Err(bad(&id, "Duplicate message identifiers are not allowed"));
                    }
                    let pattern: Vec<String> = a
                        .get(3..)
                        .unwrap_or(&[])
                        .iter()
                        .filter(|p| !p.is_empty())
                        .cloned()
                        .collect();
                    if pattern.is_empty() {
                        return Err(bad(&id, "Bad response template definition"));
                    }
                    c.responses.push(ResponseTemplate {
                        msg_id: id,
                        base: a.get(1).cloned().unwrap_or_default(),
                        condition: a.get(2).cloned().unwrap_or_default(),
                        pattern,
                    });
                }
                other => {
                    return Err(bad(other, "Bad request template definition"));
                }
            }
        }
        if c.requests.is_empty() && c.responses.is_empty() {
            return Err(bad("", "Bad request template definition"));
        }
        Ok(c)
    }

    /// The REST form of the collection's fragment (§7.4, as c8ydm writes it).
    pub fn to_json(&self) -> Value {
        let req: Vec<Value> = self
            .requests
            .iter()
            .map(|t| {
                json!({
                    "msgId": t.msg_id, "name": t.msg_id, "method": t.method, "api": t.api,
                    "response": t.response, "byId": t.by_id,
                    "externalIdType": t.external_id_type,
                    "mandatoryValues": t.mandatory,
                    "customValues": t.custom.iter().map(|c| json!({"path": c.path, "type": c.ty, "value": c.value})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let resp: Vec<Value> = self
            .responses
            .iter()
            .map(|t| {
                json!({"msgId": t.msg_id, "name": t.msg_id, "base": t.base,
                    "condition": t.condition, "pattern": t.pattern})
            })
            .collect();
        json!({"requestTemplates": req, "responseTemplates": resp})
    }

    /// A collection from its REST fragment (`None` if it is not one).
    pub fn from_json(v: &Value) -> Option<Collection> {
        let s = |o: &Value, k: &str| -> String {
            match o.get(k) {
                Some(Value::String(x)) => x.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            }
        };
        let b = |o: &Value, k: &str| match o.get(k) {
            Some(Value::Bool(x)) => *x,
            Some(Value::String(x)) => x.eq_ignore_ascii_case("true"),
            _ => false,
        };
        let mut c = Collection::default();
        for t in v.get("requestTemplates")?.as_array()? {
            let method = s(t, "method").to_ascii_uppercase();
            let api = s(t, "api").to_ascii_uppercase();
            let n = mandatory_count(&method, &api)?;
            let mut mandatory: Vec<String> = t
                .get("mandatoryValues")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|x| x.as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default();
            mandatory.resize(n, String::new());
            let custom = t
                .get("customValues")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|c| CustomValue {
                            path: s(c, "path"),
                            ty: {
                                let ty = s(c, "type").to_ascii_uppercase();
                                if ty.is_empty() {
                                    "STRING".into()
                                } else {
                                    ty
                                }
                            },
                            value: s(c, "value"),
                        })
                        .collect()
                })
                .unwrap_or_default();
            c.requests.push(RequestTemplate {
                msg_id: s(t, "msgId"),
                response: b(t, "response") || (method == "GET" && t.get("response").is_none()),
                method,
                api,
                by_id: b(t, "byId"),
                external_id_type: s(t, "externalIdType"),
                mandatory,
                custom,
            });
        }
        for t in v
            .get("responseTemplates")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            c.responses.push(ResponseTemplate {
                msg_id: s(t, "msgId"),
                base: s(t, "base"),
                condition: s(t, "condition"),
                pattern: t
                    .get("pattern")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|p| p.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        Some(c)
    }

    /// The request template of a message id.
    pub fn request(&self, msg_id: &str) -> Option<&RequestTemplate> {
        self.requests.iter().find(|t| t.msg_id == msg_id)
    }
}

/// Which managed object a GET / PUT INVENTORY usage line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Id(String),
    External { kind: String, id: String },
}

/// What a usage line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// POST MEASUREMENT / EVENT / ALARM: a new record of the addressed device.
    Create {
        api: String,
        doc: Map<String, Value>,
    },
    /// POST INVENTORY: a new managed object, with an external ID unless it was left empty.
    CreateObject {
        doc: Map<String, Value>,
        external: Option<(String, String)>,
    },
    /// GET INVENTORY.
    Get { target: Target },
    /// PUT INVENTORY.
    Update {
        target: Target,
        set: Map<String, Value>,
    },
    /// PUT ALARM: the open alarm of a type.
    UpdateAlarm {
        kind: String,
        set: Map<String, Value>,
    },
    /// PUT OPERATION: the oldest EXECUTING (else PENDING) operation with a fragment.
    UpdateOperation {
        fragment: String,
        set: Map<String, Value>,
    },
}

fn args_err(id: &str, text: impl Into<String>) -> SmartError {
    SmartError {
        code: 45,
        template: id.to_string(),
        text: text.into(),
    }
}

/// Sets a dotted JSON path (`$.` prefix allowed) in `doc`.
pub fn set_path(doc: &mut Map<String, Value>, path: &str, value: Value) {
    let path = path.strip_prefix("$.").unwrap_or(path);
    let mut parts: Vec<&str> = path.split('.').filter(|p| !p.is_empty()).collect();
    let Some(last) = parts.pop() else { return };
    let mut cur = doc;
    for p in parts {
        let next = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !next.is_object() {
            *next = Value::Object(Map::new());
        }
        let Some(m) = next.as_object_mut() else {
            return;
        };
        cur = m;
    }
    cur.insert(last.to_string(), value);
}

/// A value of a type from its text (`None`: not of that type).
fn typed(ty: &str, v: &str, now: &str) -> Option<Value> {
    let num = |v: &str| -> Option<Value> {
        if let Ok(i) = v.parse::<i64>() {
            return Some(json!(i));
        }
        v.parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
    };
    Some(match ty {
        "NUMBER" => num(v.trim())?,
        "INTEGER" => json!(v.trim().parse::<i64>().ok()?),
        "UNSIGNED" => json!(v.trim().parse::<u64>().ok()?),
        "FLAG" => json!({}),
        "DATE" if v.is_empty() => json!(now),
        "SEVERITY" => {
            let s = v.to_ascii_uppercase();
            ["CRITICAL", "MAJOR", "MINOR", "WARNING"]
                .contains(&s.as_str())
                .then(|| json!(s))?
        }
        "ALARMSTATUS" => {
            let s = v.to_ascii_uppercase();
            ["ACTIVE", "ACKNOWLEDGED", "CLEARED"]
                .contains(&s.as_str())
                .then(|| json!(s))?
        }
        "OPERATIONSTATUS" => {
            let s = v.to_ascii_uppercase();
            ["PENDING", "EXECUTING", "SUCCESSFUL", "FAILED"]
                .contains(&s.as_str())
                .then(|| json!(s))?
        }
        _ => json!(v),
    })
}

/// Applies a request template to a usage line (its fields after the message id), with
/// server time `now` for empty times.
pub fn apply_request(t: &RequestTemplate, r: &Record, now: &str) -> Result<Request, SmartError> {
    let id = t.msg_id.as_str();
    let mut args = r.args().iter();
    let mut next = || args.next().cloned().unwrap_or_default();
    let mut doc = Map::new();
    let mut fixed = Vec::with_capacity(t.mandatory.len());
    let target = |by_id: bool, ext: &str, next: &mut dyn FnMut() -> String| {
        if by_id {
            Target::Id(next())
        } else if ext.is_empty() {
            let kind = next();
            Target::External { kind, id: next() }
        } else {
            Target::External {
                kind: ext.to_string(),
                id: next(),
            }
        }
    };
    let inv_target = match (t.method.as_str(), t.api.as_str()) {
        ("GET" | "PUT", "INVENTORY") => Some(target(t.by_id, &t.external_id_type, &mut next)),
        _ => None,
    };
    let new_external = if (t.method.as_str(), t.api.as_str()) == ("POST", "INVENTORY") {
        let x = next();
        let kind = if t.external_id_type.is_empty() {
            next()
        } else {
            t.external_id_type.clone()
        };
        (!x.is_empty()).then(|| {
            (
                if kind.is_empty() {
                    "c8y_Serial".to_string()
                } else {
                    kind
                },
                x,
            )
        })
    } else {
        None
    };
    for m in &t.mandatory {
        fixed.push(if m.is_empty() { next() } else { m.clone() });
    }
    for c in &t.custom {
        let raw = if c.ty == "FLAG" {
            String::new()
        } else if c.value.is_empty() {
            next()
        } else {
            c.value.clone()
        };
        if raw.is_empty() && !matches!(c.ty.as_str(), "FLAG" | "DATE") {
            continue;
        }
        let v = typed(&c.ty, &raw, now)
            .ok_or_else(|| args_err(id, format!("Value is not a {}: {raw}", c.ty)))?;
        set_path(&mut doc, &c.path, v);
    }
    let time = |v: &str| {
        if v.is_empty() {
            now.to_string()
        } else {
            v.to_string()
        }
    };
    let need = |v: &str, what: &str| -> Result<String, SmartError> {
        if v.is_empty() {
            Err(args_err(id, format!("Mandatory field {what} is missing")))
        } else {
            Ok(v.to_string())
        }
    };
    match (t.method.as_str(), t.api.as_str()) {
        ("POST", "MEASUREMENT") => {
            doc.insert("type".into(), json!(need(&fixed[0], "type")?));
            doc.insert("time".into(), json!(time(&fixed[1])));
            Ok(Request::Create {
                api: "MEASUREMENT".into(),
                doc,
            })
        }
        ("POST", "EVENT") => {
            doc.insert("type".into(), json!(need(&fixed[0], "type")?));
            doc.insert("text".into(), json!(need(&fixed[1], "text")?));
            doc.insert("time".into(), json!(time(&fixed[2])));
            Ok(Request::Create {
                api: "EVENT".into(),
                doc,
            })
        }
        ("POST", "ALARM") => {
            doc.insert("type".into(), json!(need(&fixed[0], "type")?));
            doc.insert("text".into(), json!(need(&fixed[1], "text")?));
            let status = if fixed[2].is_empty() {
                "ACTIVE"
            } else {
                &fixed[2]
            };
            doc.insert(
                "status".into(),
                typed("ALARMSTATUS", status, now)
                    .ok_or_else(|| args_err(id, format!("Value is not a ALARMSTATUS: {status}")))?,
            );
            let sev = need(&fixed[3], "severity")?;
            doc.insert(
                "severity".into(),
                typed("SEVERITY", &sev, now)
                    .ok_or_else(|| args_err(id, format!("Value is not a SEVERITY: {sev}")))?,
            );
            doc.insert("time".into(), json!(time(&fixed[4])));
            Ok(Request::Create {
                api: "ALARM".into(),
                doc,
            })
        }
        ("POST", "INVENTORY") => Ok(Request::CreateObject {
            doc,
            external: new_external,
        }),
        ("GET", "INVENTORY") => Ok(Request::Get {
            target: inv_target.unwrap_or(Target::Id(String::new())),
        }),
        ("PUT", "INVENTORY") => Ok(Request::Update {
            target: inv_target.unwrap_or(Target::Id(String::new())),
            set: doc,
        }),
        ("PUT", "ALARM") => Ok(Request::UpdateAlarm {
            kind: need(&fixed[0], "type")?,
            set: doc,
        }),
        ("PUT", "OPERATION") => Ok(Request::UpdateOperation {
            fragment: need(&fixed[0], "fragment")?,
            set: doc,
        }),
        _ => Err(args_err(id, "Bad request template definition")),
    }
}

/// Evaluates a small JSONPath (`$`, `.key`, `key[*]`, `key[n]`) against `v`.
pub fn json_path<'a>(v: &'a Value, path: &str) -> Vec<&'a Value> {
    let p = path.trim();
    let p = p.strip_prefix('$').unwrap_or(p);
    let p = p.strip_prefix('.').unwrap_or(p);
    let mut cur: Vec<&Value> = vec![v];
    if p.is_empty() {
        return cur;
    }
    for seg in p.split('.') {
        let (key, index) = match seg.find('[') {
            Some(i) => (
                &seg[..i],
                Some(seg[i..].trim_start_matches('[').trim_end_matches(']')),
            ),
            None => (seg, None),
        };
        let mut next = Vec::new();
        for c in cur {
            let base = if key.is_empty() { Some(c) } else { c.get(key) };
            let Some(b) = base else { continue };
            match index {
                None => next.push(b),
                Some("*") => {
                    if let Some(a) = b.as_array() {
                        next.extend(a.iter());
                    }
                }
                Some(n) => {
                    if let Some(x) = n.parse::<usize>().ok().and_then(|i| b.get(i)) {
                        next.push(x);
                    }
                }
            }
        }
        cur = next;
    }
    cur
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn join(base: &str, path: &str) -> String {
    let b = base.trim().trim_start_matches('$').trim_start_matches('.');
    let p = path.trim().trim_start_matches('$').trim_start_matches('.');
    match (b.is_empty(), p.is_empty()) {
        (true, _) => p.to_string(),
        (false, true) => b.to_string(),
        (false, false) => format!("{b}.{p}"),
    }
}

/// The lines of every response template whose condition holds in `v`:
/// `<msgId>[,<target>],<values...>` (the target for operations, none for request answers).
pub fn response_lines(
    responses: &[ResponseTemplate],
    v: &Value,
    target: Option<&str>,
) -> Vec<String> {
    let mut out = Vec::new();
    for t in responses {
        if !t.condition.is_empty() && json_path(v, &join(&t.base, &t.condition)).is_empty() {
            continue;
        }
        let mut fields = vec![t.msg_id.clone()];
        if let Some(x) = target {
            fields.push(x.to_string());
        }
        let mut any = false;
        for p in &t.pattern {
            let found = json_path(v, &join(&t.base, p));
            if found.is_empty() {
                fields.push(String::new());
            } else {
                any = true;
                fields.extend(found.into_iter().map(text));
            }
        }
        // A template without condition matches anything, but says nothing when nothing of it
        // is there.
        if any || !t.condition.is_empty() {
            out.push(encode_line(&fields));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::parse_records;

    fn coll(s: &str) -> Collection {
        Collection::from_lines(&parse_records(s).unwrap()).unwrap()
    }

    #[test]
    fn the_documented_measurement_template_with_and_without_time() {
        let c =
            coll("10,999,POST,MEASUREMENT,,c8y_MyMeasurement,,c8y_MyMeasurement.M.value,NUMBER,");
        let t = c.request("999").unwrap();
        for (line, time) in [
            (
                "999,2016-06-22T17:03:14.000+02:00,25",
                "2016-06-22T17:03:14.000+02:00",
            ),
            ("999,,25", "NOW"),
        ] {
            let r = &parse_records(line).unwrap()[0];
            let Request::Create { api, doc } = apply_request(t, r, "NOW").unwrap() else {
                panic!()
            };
            assert_eq!(api, "MEASUREMENT");
            assert_eq!(doc["type"], "c8y_MyMeasurement");
            assert_eq!(doc["time"], time);
            assert_eq!(doc["c8y_MyMeasurement"]["M"]["value"], 25);
        }
        let r = &parse_records("999,,warm").unwrap()[0];
        let e = apply_request(t, r, "NOW").unwrap_err();
        assert_eq!(e.line(), "45,999,Value is not a NUMBER: warm");
    }

    #[test]
    fn the_documented_operation_update_template() {
        let c = coll("10,999,PUT,OPERATION,,c8y_MyOperation,status,OPERATIONSTATUS,SUCCESSFUL,c8y_Fragment.val,NUMBER,");
        let r = &parse_records("999,24").unwrap()[0];
        match apply_request(c.request("999").unwrap(), r, "NOW").unwrap() {
            Request::UpdateOperation { fragment, set } => {
                assert_eq!(fragment, "c8y_MyOperation");
                assert_eq!(set["status"], "SUCCESSFUL");
                assert_eq!(set["c8y_Fragment"]["val"], 24);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn inventory_targets_by_id_by_fixed_type_and_by_given_type() {
        let c = coll("10,1,GET,INVENTORY,,true\n10,2,GET,INVENTORY,,false,c8y_Serial\n10,3,PUT,INVENTORY,,false,,c8y_Note,STRING,");
        let get = |id: &str, line: &str| {
            apply_request(
                c.request(id).unwrap(),
                &parse_records(line).unwrap()[0],
                "NOW",
            )
            .unwrap()
        };
        assert_eq!(
            get("1", "1,42"),
            Request::Get {
                target: Target::Id("42".into())
            }
        );
        assert_eq!(
            get("2", "2,dev1"),
            Request::Get {
                target: Target::External {
                    kind: "c8y_Serial".into(),
                    id: "dev1".into()
                }
            }
        );
        let Request::Update { target, set } = get("3", "3,c8y_Serial,dev1,hello") else {
            panic!()
        };
        assert_eq!(
            target,
            Target::External {
                kind: "c8y_Serial".into(),
                id: "dev1".into()
            }
        );
        assert_eq!(set["c8y_Note"], "hello");
        assert!(c.request("1").unwrap().response, "GET answers by default");
    }

    #[test]
    fn response_templates_match_operations_and_expand_lists() {
        let c = coll("11,111,,c8y_Command,c8y_Command.text\n11,112,,c8y_Restart,c8y_Restart\n11,113,$.c8y_Soft,,list[*].name");
        let op = json!({"id": "5", "c8y_Command": {"text": "ls, -l"}});
        assert_eq!(
            response_lines(&c.responses, &op, Some("dev1")),
            vec!["111,dev1,\"ls, -l\""]
        );
        let soft = json!({"c8y_Soft": {"list": [{"name": "a"}, {"name": "b"}]}});
        assert_eq!(
            response_lines(&c.responses, &soft, Some("d")),
            vec!["113,d,a,b"]
        );
    }

    #[test]
    fn bad_definitions_are_refused_with_41() {
        for (text, want) in [
            ("10,1,POST,NOPE,,x", "41,1,Bad request template definition"),
            (
                "10,1,POST,EVENT,,t,x,,a.b,WEIRD,",
                "41,1,Bad value type: WEIRD",
            ),
            (
                "10,1,POST,EVENT,,t,x\n10,1,POST,EVENT,,t,y",
                "41,1,Duplicate message identifiers are not allowed",
            ),
            ("11,5,,c", "41,5,Bad response template definition"),
        ] {
            let e = Collection::from_lines(&parse_records(text).unwrap()).unwrap_err();
            assert_eq!(e.line(), want, "{text}");
        }
    }

    #[test]
    fn rest_json_round_trips() {
        let c = coll("10,999,POST,MEASUREMENT,,c8y_M,,c8y_M.v.value,NUMBER,\n11,111,,c8y_Command,c8y_Command.text");
        assert_eq!(Collection::from_json(&c.to_json()).unwrap(), c);
    }
}
