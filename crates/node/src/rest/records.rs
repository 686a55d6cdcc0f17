//! Measurements, events and alarms (c8y-mqtt.md §11.4): create (one or a bulk collection),
//! list with filters and paging, read, update (events, alarms), delete (measurements,
//! events).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use fleetmq_storage::domain::{group_of_id, DeviceOp, RecordKind, Source};
use serde_json::{json, Map, Value};

use super::data::{self, allowed, barrier, commit, doc_of, id_group, object, read_err, store};
use super::{json, no_content, Api, ApiError, Caller, Page, RestState};

type R = Result<Response, ApiError>;

/// The REST names of a record kind: `(api, media, collection media, collection key)`.
fn names(kind: RecordKind) -> (Api, &'static str, &'static str, &'static str) {
    match kind {
        RecordKind::Measurement => (
            Api::Measurement,
            "measurement",
            "measurementCollection",
            "measurements",
        ),
        RecordKind::Event => (Api::Event, "event", "eventCollection", "events"),
        RecordKind::Alarm => (Api::Alarm, "alarm", "alarmCollection", "alarms"),
        RecordKind::Operation => (
            Api::DeviceControl,
            "operation",
            "operationCollection",
            "operations",
        ),
    }
}

const SEVERITIES: [&str; 4] = ["CRITICAL", "MAJOR", "MINOR", "WARNING"];

/// Checks a new record's mandatory fields; returns its source id and the body without
/// `source`.
fn validate(
    kind: RecordKind,
    mut b: Map<String, Value>,
) -> Result<(u64, Map<String, Value>), ApiError> {
    let (api, ..) = names(kind);
    let source = b
        .remove("source")
        .and_then(|s| s.get("id").cloned())
        .and_then(|v| {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.as_u64().map(|n| n.to_string()))
        })
        .ok_or_else(|| {
            ApiError::unprocessable(api, "Following mandatory fields should be included: source")
        })?;
    let source: u64 = source
        .parse()
        .map_err(|_| ApiError::unprocessable(api, "source.id must be a managed object id"))?;
    let mandatory: &[&str] = match kind {
        RecordKind::Measurement => &["type"],
        RecordKind::Event => &["type", "text"],
        RecordKind::Alarm => &["type", "text", "severity"],
        RecordKind::Operation => &[],
    };
    let missing: Vec<&str> = mandatory
        .iter()
        .copied()
        .filter(|k| b.get(*k).and_then(Value::as_str).is_none_or(str::is_empty))
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::unprocessable(
            api,
            format!(
                "Following mandatory fields should be included: {}",
                missing.join(",")
            ),
        ));
    }
    if let Some(t) = b.get("time").and_then(Value::as_str) {
        if data::time_ms(t).is_none() {
            return Err(ApiError::unprocessable(
                api,
                format!("time is not an ISO 8601 time: {t}"),
            ));
        }
    }
    if kind == RecordKind::Alarm {
        let sev = b
            .get("severity")
            .and_then(Value::as_str)
            .map(str::to_ascii_uppercase)
            .unwrap_or_default();
        if !SEVERITIES.contains(&sev.as_str()) {
            return Err(ApiError::unprocessable(
                api,
                format!("Unknown severity {sev}"),
            ));
        }
        b.insert("severity".into(), json!(sev));
    }
    Ok((source, b))
}

fn create_op(kind: RecordKind, source: u64, b: Map<String, Value>) -> DeviceOp {
    let source = Source::Id(source);
    let doc = Value::Object(b).to_string();
    match kind {
        RecordKind::Measurement => DeviceOp::Measurement { source, doc },
        RecordKind::Event => DeviceOp::Event { source, doc },
        _ => DeviceOp::Alarm { source, doc },
    }
}

/// `POST` of one record, or of `{"<key>": [...]}` (the collection media type).
pub async fn create(s: &RestState, c: &Caller, kind: RecordKind, raw: &[u8]) -> R {
    allowed(c)?;
    let (api, media, coll_media, key) = names(kind);
    let mut body = object(raw)?;
    let bulk = match body.remove(key) {
        Some(Value::Array(items)) => Some(items),
        Some(_) => return Err(ApiError::bad_request(format!("{key} must be an array"))),
        None => None,
    };
    let items: Vec<Map<String, Value>> = match &bulk {
        Some(items) => items
            .iter()
            .map(|v| match v {
                Value::Object(m) => Ok(m.clone()),
                _ => Err(ApiError::bad_request(format!(
                    "every item of {key} must be an object"
                ))),
            })
            .collect::<Result<_, _>>()?,
        None => vec![body],
    };
    // Validate everything first: a bad item stores nothing.
    let mut by_group: Vec<(u64, Vec<(usize, DeviceOp)>)> = Vec::new();
    for (i, m) in items.into_iter().enumerate() {
        let (src, b) = validate(kind, m)?;
        let g = group_of_id(src);
        if s.durable.device_store(g).is_none() {
            return Err(ApiError::unprocessable(
                api,
                format!("No managed object {src}"),
            ));
        }
        match by_group.iter_mut().find(|(x, _)| *x == g) {
            Some((_, ops)) => ops.push((i, create_op(kind, src, b))),
            None => by_group.push((g, vec![(i, create_op(kind, src, b))])),
        }
    }
    // Every source must exist before anything is stored, so a bulk with an unknown source
    // stores none of it (a commit failing halfway still can: storage errors are 503s).
    for (g, ops) in &by_group {
        data::barrier(s, Some(*g)).await?;
        let st = data::store(s, *g)?;
        for (_, op) in ops {
            let src = match op {
                DeviceOp::Measurement { source, .. }
                | DeviceOp::Event { source, .. }
                | DeviceOp::Alarm { source, .. } => source,
                _ => continue,
            };
            if let Source::Id(id) = src {
                if st
                    .device_object(&c.tenant().id, *id)
                    .map_err(data::read_err)?
                    .is_none()
                {
                    return Err(ApiError::unprocessable(
                        api,
                        format!("No managed object {id}"),
                    ));
                }
            }
        }
    }
    let total: usize = by_group.iter().map(|(_, o)| o.len()).sum();
    let mut out: Vec<Option<Value>> = vec![None; total];
    for (g, ops) in by_group {
        let (idx, ops): (Vec<usize>, Vec<DeviceOp>) = ops.into_iter().unzip();
        let outcomes = commit(s, c, g, ops).await?;
        for (i, o) in idx.into_iter().zip(outcomes) {
            let d = doc_of(api, o)?;
            out[i] = Some(data::render_record(&c.base, kind, &d));
        }
    }
    let out: Vec<Value> = out.into_iter().flatten().collect();
    if bulk.is_some() {
        Ok(json(StatusCode::CREATED, coll_media, &json!({ key: out })))
    } else {
        let one = out.into_iter().next().unwrap_or(Value::Null);
        Ok(json(StatusCode::CREATED, media, &one))
    }
}

/// `GET` of a filtered, paged listing.
pub async fn list(s: &RestState, c: &Caller, kind: RecordKind, q: &HashMap<String, String>) -> R {
    allowed(c)?;
    let (_, _, coll_media, key) = names(kind);
    let page = Page::from_query(q)?;
    let f = data::Filter::from_query(q)?;
    let max = data::page_reach(&page)?;
    let docs = data::list_records(s, c, kind, &f, max).await?;
    let items: Vec<Value> = docs
        .iter()
        .map(|d| data::render_record(&c.base, kind, d))
        .collect();
    let url = data::listing_url(&c.base, data::path(kind), q);
    Ok(page.collection(coll_media, key, &url, items))
}

/// `GET .../{id}`.
pub async fn get_one(s: &RestState, c: &Caller, kind: RecordKind, raw: &str) -> R {
    allowed(c)?;
    let (api, media, ..) = names(kind);
    let (id, g) = id_group(s, api, raw)?;
    barrier(s, Some(g)).await?;
    let d = store(s, g)?
        .device_record(kind, &c.tenant().id, id)
        .map_err(read_err)?
        .ok_or_else(|| ApiError::not_found(api, format!("Finding object with ID {raw} failed")))?;
    Ok(json(
        StatusCode::OK,
        media,
        &data::render_record(&c.base, kind, &d),
    ))
}

/// `PUT .../{id}`: alarms take `text`, `status`, `severity` and custom fragments.
pub async fn update(s: &RestState, c: &Caller, kind: RecordKind, raw_id: &str, raw: &[u8]) -> R {
    allowed(c)?;
    let (api, media, ..) = names(kind);
    let (id, g) = id_group(s, api, raw_id)?;
    let mut set = object(raw)?;
    if kind == RecordKind::Alarm {
        if let Some(v) = set
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_ascii_uppercase)
        {
            if !["ACTIVE", "ACKNOWLEDGED", "CLEARED"].contains(&v.as_str()) {
                return Err(ApiError::unprocessable(
                    api,
                    format!("Unknown alarm status {v}"),
                ));
            }
            set.insert("status".into(), json!(v));
        }
        if let Some(v) = set
            .get("severity")
            .and_then(Value::as_str)
            .map(str::to_ascii_uppercase)
        {
            if !SEVERITIES.contains(&v.as_str()) {
                return Err(ApiError::unprocessable(
                    api,
                    format!("Unknown severity {v}"),
                ));
            }
            set.insert("severity".into(), json!(v));
        }
        set.remove("type");
    }
    let op = DeviceOp::RecordUpdate {
        kind,
        id,
        set: Value::Object(set).to_string(),
    };
    let mut o = commit(s, c, g, vec![op]).await?;
    let d = doc_of(api, o.remove(0))?;
    Ok(json(
        StatusCode::OK,
        media,
        &data::render_record(&c.base, kind, &d),
    ))
}

/// `DELETE .../{id}`.
pub async fn delete(s: &RestState, c: &Caller, kind: RecordKind, raw_id: &str) -> R {
    allowed(c)?;
    let (api, ..) = names(kind);
    let (id, g) = id_group(s, api, raw_id)?;
    let mut o = commit(s, c, g, vec![DeviceOp::RecordDelete { kind, id }]).await?;
    doc_of(api, o.remove(0))?;
    Ok(no_content())
}

/// Handlers per kind, for the router.
macro_rules! kind_handlers {
    ($m:ident, $kind:expr) => {
        pub mod $m {
            use super::*;
            use crate::rest::{St, P};

            pub async fn create(State(s): St, c: Caller, raw: Bytes) -> R {
                super::create(&s, &c, $kind, &raw).await
            }
            pub async fn list(
                State(s): St,
                c: Caller,
                Query(q): Query<HashMap<String, String>>,
            ) -> R {
                super::list(&s, &c, $kind, &q).await
            }
            pub async fn get_one(State(s): St, c: Caller, P(id): P<String>) -> R {
                super::get_one(&s, &c, $kind, &id).await
            }
            pub async fn update(State(s): St, c: Caller, P(id): P<String>, raw: Bytes) -> R {
                super::update(&s, &c, $kind, &id, &raw).await
            }
            pub async fn delete(State(s): St, c: Caller, P(id): P<String>) -> R {
                super::delete(&s, &c, $kind, &id).await
            }
        }
    };
}

kind_handlers!(measurements, RecordKind::Measurement);
kind_handlers!(events, RecordKind::Event);
kind_handlers!(alarms, RecordKind::Alarm);
