//! What the device-data endpoints share (c8y-mqtt.md §11): committing `DeviceOp`s in the
//! right group, reading every group's applied state, filters, and Cumulocity's JSON shapes
//! with `self` links.
//!
//! Writes by id go to the group in the id; reads first wait until this node has applied what
//! the groups' leaders had committed (`read_barrier_group`), so a read on any node sees every
//! acknowledged write.

use std::collections::HashMap;

use fleetmq_storage::domain::{group_of_id, DeviceOp, Doc, Outcome, RecordKind};
use fleetmq_storage::{Response, StateMachineStore};
use serde_json::{json, Map, Value};

use super::{Api, ApiError, Caller, RestState};
use crate::identity::records::Role;

/// Who may use the data API: the tenant's administrators and users (not the bootstrap user,
/// not device users, which talk MQTT).
pub fn allowed(c: &Caller) -> Result<(), ApiError> {
    match c.id.role {
        Role::Admin | Role::User => Ok(()),
        Role::Device | Role::Bootstrap => Err(ApiError::forbidden(
            "devices use the MQTT device API; this API is for platform users",
        )),
    }
}

/// Parses a managed-object / record id and finds its group (404 if no group of this cluster
/// could hold it).
pub fn id_group(s: &RestState, api: Api, raw: &str) -> Result<(u64, u64), ApiError> {
    let id: u64 = raw
        .trim()
        .parse()
        .map_err(|_| ApiError::not_found(api, format!("Finding object with ID {raw} failed")))?;
    let g = group_of_id(id);
    if s.durable.device_store(g).is_none() {
        return Err(ApiError::not_found(
            api,
            format!("Finding object with ID {raw} failed"),
        ));
    }
    Ok((id, g))
}

/// Commits `ops` in `group` for the caller's tenant; one outcome per op.
pub async fn commit(
    s: &RestState,
    c: &Caller,
    group: u64,
    ops: Vec<DeviceOp>,
) -> Result<Vec<Outcome>, ApiError> {
    for op in &ops {
        op.check().map_err(ApiError::bad_request)?;
    }
    let cmd = crate::device::batch(&c.tenant().id, group, &c.id.user, None, false, ops);
    match s.durable.propose(cmd).await {
        Ok(Response::Device(o)) => Ok(o),
        Ok(_) => Err(ApiError::internal("unexpected storage answer")),
        Err(e) => {
            tracing::warn!(error = %e, "REST: device data not committed");
            Err(ApiError::unavailable(format!("storage unavailable: {e}")))
        }
    }
}

/// One op's outcome as a document, or its REST error.
pub fn doc_of(api: Api, o: Outcome) -> Result<Doc, ApiError> {
    match o {
        Outcome::Done(j) => Doc::from_json(&j).ok_or_else(|| ApiError::internal("bad document")),
        Outcome::Many(v) => v
            .first()
            .and_then(|j| Doc::from_json(j))
            .ok_or_else(|| ApiError::not_found(api, "nothing matched")),
        Outcome::NotFound(m) => Err(ApiError::not_found(api, m)),
        Outcome::Invalid(m) => Err(ApiError::unprocessable(api, m)),
        Outcome::Exists => Err(ApiError::duplicate(api, "already exists")),
    }
}

/// Waits until this node has applied every group's committed writes (all groups, or one).
pub async fn barrier(s: &RestState, group: Option<u64>) -> Result<(), ApiError> {
    let groups = match group {
        Some(g) => vec![g],
        None => s.durable.device_groups(),
    };
    let waits = groups.into_iter().map(|g| s.durable.read_barrier_group(g));
    futures_util::future::try_join_all(waits)
        .await
        .map_err(|e| ApiError::unavailable(format!("storage unavailable: {e}")))?;
    Ok(())
}

/// The store of a group (it exists: checked by `id_group` or from `device_groups`).
pub fn store(s: &RestState, g: u64) -> Result<StateMachineStore, ApiError> {
    s.durable
        .device_store(g)
        .ok_or_else(|| ApiError::internal("no such group"))
}

/// Storage read errors as REST errors.
pub fn read_err(e: fleetmq_storage::StorageError) -> ApiError {
    tracing::error!(error = %e, "REST: reading device data failed");
    ApiError::internal("reading device data failed")
}

/// A JSON request body that must be an object.
pub fn object(raw: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!("invalid JSON body: {e}"))),
    }
}

/// Items a listing reads at most to serve one page (`currentPage * pageSize + 1`): deeper
/// pages are refused rather than loading a tenant's whole history into memory.
pub const MAX_PAGED_ITEMS: usize = 100_000;

/// How many items to read for a page: one more than the page ends at, so the collection knows
/// whether there is a `next` page.
pub fn page_reach(page: &super::Page) -> Result<usize, ApiError> {
    let end = page.current.saturating_mul(page.size);
    if end > MAX_PAGED_ITEMS {
        return Err(ApiError::bad_request(format!(
            "currentPage * pageSize must be at most {MAX_PAGED_ITEMS}; narrow the query (source, type, dateFrom, dateTo)"
        )));
    }
    Ok(end + 1)
}

/// A listing's URL with its filters (not its paging), for the `self`/`next`/`prev` links.
pub fn listing_url(base: &str, path: &str, q: &HashMap<String, String>) -> String {
    let mut keys: Vec<&String> = q
        .keys()
        .filter(|k| !matches!(k.as_str(), "pageSize" | "currentPage"))
        .collect();
    keys.sort();
    let mut query = form_urlencoded::Serializer::new(String::new());
    for k in keys {
        query.append_pair(k, &q[k]);
    }
    let query = query.finish();
    let mut url = format!("{base}/{path}");
    if !query.is_empty() {
        url.push('?');
        url.push_str(&query);
    }
    url
}

/// Parses an ISO 8601 time as Cumulocity writes it (also `+0100` offsets without a colon).
pub fn time_ms(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z")
        .ok()
        .map(|t| t.timestamp_millis())
}

/// The query filters of a record listing.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub source: Option<u64>,
    pub kind: Option<String>,
    pub fragment: Option<String>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub status: Vec<String>,
    pub severity: Vec<String>,
    pub agent: Option<String>,
    pub revert: bool,
}

impl Filter {
    /// From the query (`source`/`deviceId`, `type`, `fragmentType`/`valueFragmentType`,
    /// `dateFrom`, `dateTo`, `status`, `severity`, `agentId`, `revert`).
    pub fn from_query(q: &HashMap<String, String>) -> Result<Filter, ApiError> {
        let list = |k: &str| -> Vec<String> {
            q.get(k)
                .map(|v| {
                    v.split(',')
                        .map(|x| x.trim().to_ascii_uppercase())
                        .filter(|x| !x.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        let date = |k: &str| -> Result<Option<i64>, ApiError> {
            match q.get(k) {
                None => Ok(None),
                Some(v) => time_ms(v)
                    .map(Some)
                    .ok_or_else(|| ApiError::bad_request(format!("{k} is not an ISO 8601 time"))),
            }
        };
        let source = match q.get("source").or_else(|| q.get("deviceId")) {
            None => None,
            Some(v) => Some(
                v.trim()
                    .parse()
                    .map_err(|_| ApiError::bad_request("source must be a managed object id"))?,
            ),
        };
        Ok(Filter {
            source,
            kind: q.get("type").cloned(),
            fragment: q
                .get("fragmentType")
                .or_else(|| q.get("valueFragmentType"))
                .cloned(),
            from: date("dateFrom")?,
            to: date("dateTo")?,
            status: list("status"),
            severity: list("severity"),
            agent: q.get("agentId").cloned(),
            revert: q.get("revert").is_some_and(|v| v == "true"),
        })
    }

    /// Whether a record passes.
    pub fn keep(&self, d: &Doc) -> bool {
        if let Some(k) = &self.kind {
            if d.str("type") != Some(k.as_str()) {
                return false;
            }
        }
        if let Some(f) = &self.fragment {
            if !d.body.contains_key(f) {
                return false;
            }
        }
        if !self.status.is_empty()
            && !d
                .str("status")
                .is_some_and(|s| self.status.iter().any(|x| x == s))
        {
            return false;
        }
        if !self.severity.is_empty()
            && !d
                .str("severity")
                .is_some_and(|s| self.severity.iter().any(|x| x == s))
        {
            return false;
        }
        if let Some(a) = &self.agent {
            if d.str("agentId") != Some(a.as_str()) {
                return false;
            }
        }
        if self.from.is_some() || self.to.is_some() {
            let t = d
                .str("time")
                .or_else(|| d.str("creationTime"))
                .and_then(time_ms);
            let Some(t) = t else { return false };
            if self.from.is_some_and(|f| t < f) || self.to.is_some_and(|x| t >= x) {
                return false;
            }
        }
        true
    }
}

/// Records of a kind from every group (or the source's), filtered, in time order (newest
/// first with `revert`), at most `max`.
pub async fn list_records(
    s: &RestState,
    c: &Caller,
    kind: RecordKind,
    f: &Filter,
    max: usize,
) -> Result<Vec<Doc>, ApiError> {
    let groups = match f.source {
        Some(src) => {
            let g = group_of_id(src);
            if s.durable.device_store(g).is_none() {
                return Ok(Vec::new());
            }
            vec![g]
        }
        None => s.durable.device_groups(),
    };
    barrier(
        s,
        if groups.len() == 1 {
            Some(groups[0])
        } else {
            None
        },
    )
    .await?;
    let tenant = &c.tenant().id;
    let mut out = Vec::new();
    for g in groups {
        let st = store(s, g)?;
        out.extend(
            st.device_records(kind, tenant, f.source, f.revert, |d| f.keep(d), max)
                .map_err(read_err)?,
        );
    }
    let key = |d: &Doc| {
        (
            d.str("time")
                .or_else(|| d.str("creationTime"))
                .and_then(time_ms)
                .unwrap_or_default(),
            d.id,
        )
    };
    out.sort_by_key(key);
    if f.revert {
        out.reverse();
    }
    out.truncate(max);
    Ok(out)
}

/// The path of each record kind.
pub fn path(kind: RecordKind) -> &'static str {
    match kind {
        RecordKind::Measurement => "measurement/measurements",
        RecordKind::Event => "event/events",
        RecordKind::Alarm => "alarm/alarms",
        RecordKind::Operation => "devicecontrol/operations",
    }
}

/// A record as the API shows it: its body with `self` links.
pub fn render_record(base: &str, kind: RecordKind, d: &Doc) -> Value {
    let mut b = d.body.clone();
    b.insert(
        "self".into(),
        json!(format!("{base}/{}/{}", path(kind), d.id)),
    );
    if let Some(Value::Object(src)) = b.get_mut("source") {
        if let Some(id) = src.get("id").and_then(Value::as_str).map(str::to_string) {
            src.insert(
                "self".into(),
                json!(format!("{base}/inventory/managedObjects/{id}")),
            );
        }
    }
    Value::Object(b)
}

fn reference(base: &str, id: u64) -> Value {
    json!({"managedObject": {"id": id.to_string(),
        "self": format!("{base}/inventory/managedObjects/{id}")}})
}

/// A managed object as the API shows it: with `self`, child and parent references and the
/// availability its last message gives.
pub fn render_object(base: &str, d: &Doc, last_message: Option<String>) -> Value {
    let mut b = d.body.clone();
    let me = format!("{base}/inventory/managedObjects/{}", d.id);
    b.insert("self".into(), json!(me));
    b.insert(
        "childDevices".into(),
        json!({"self": format!("{me}/childDevices"),
            "references": d.children.iter().map(|c| reference(base, *c)).collect::<Vec<_>>()}),
    );
    b.insert(
        "childAdditions".into(),
        json!({"self": format!("{me}/childAdditions"),
            "references": d.additions.iter().map(|c| reference(base, *c)).collect::<Vec<_>>()}),
    );
    b.insert(
        "deviceParents".into(),
        json!({"self": format!("{me}/deviceParents"),
            "references": d.parent.iter().map(|p| reference(base, *p)).collect::<Vec<_>>()}),
    );
    if let Some(a) = availability(&b, last_message, chrono::Utc::now().timestamp_millis()) {
        b.insert("c8y_Availability".into(), a);
    }
    Value::Object(b)
}

/// `c8y_Availability` (§1.11): MAINTENANCE when the required response interval is 0 or less;
/// AVAILABLE while the device is connected or its last message is younger than the interval
/// (without an interval: once it sent anything); UNAVAILABLE otherwise.
pub fn availability(b: &Map<String, Value>, last: Option<String>, now_ms: i64) -> Option<Value> {
    let connected = b
        .get("c8y_Connection")
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some("CONNECTED");
    let interval = b
        .get("c8y_RequiredAvailability")
        .and_then(|r| r.get("responseInterval"))
        .and_then(Value::as_i64);
    let fresh = |minutes: i64| {
        last.as_deref()
            .and_then(time_ms)
            .is_some_and(|t| now_ms - t <= minutes.saturating_mul(60_000))
    };
    let status = match interval {
        Some(i) if i <= 0 => "MAINTENANCE",
        Some(i) if connected || fresh(i) => "AVAILABLE",
        Some(_) => "UNAVAILABLE",
        None if connected || last.is_some() => "AVAILABLE",
        None => return None,
    };
    let mut a = Map::new();
    if let Some(t) = last {
        a.insert("lastMessage".into(), json!(t));
    }
    a.insert("status".into(), json!(status));
    Some(Value::Object(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn availability_follows_connection_interval_and_last_message() {
        let t = |s: &str| Some(s.to_string());
        let now = time_ms("2026-11-30T12:00:00Z").unwrap();
        let st = |b: Value, last: Option<String>| {
            availability(&body(b), last, now).map(|a| a["status"].as_str().unwrap().to_string())
        };
        let req = |i: i64| json!({"c8y_RequiredAvailability": {"responseInterval": i}});
        assert_eq!(
            st(req(0), t("2026-11-30T11:59:00Z")).as_deref(),
            Some("MAINTENANCE")
        );
        assert_eq!(
            st(req(5), t("2026-11-30T11:58:00Z")).as_deref(),
            Some("AVAILABLE")
        );
        assert_eq!(
            st(req(5), t("2026-11-30T11:50:00Z")).as_deref(),
            Some("UNAVAILABLE")
        );
        let mut connected = req(5);
        connected["c8y_Connection"] = json!({"status": "CONNECTED"});
        assert_eq!(st(connected, None).as_deref(), Some("AVAILABLE"));
        assert_eq!(st(json!({}), None), None);
    }
}
