//! Inventory and identity (c8y-mqtt.md §11.2, §11.3): managed objects, child devices and
//! external IDs.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use fleetmq_storage::domain::{group_of_id, DeviceOp, Doc, Source};
use fleetmq_storage::SessionKey;
use serde_json::{json, Value};

use super::data::{self, allowed, barrier, commit, doc_of, id_group, object, read_err, store};
use super::{json, no_content, Api, ApiError, Caller, Page, RestState, St, P};

type R = Result<Response, ApiError>;

fn show(s: &RestState, c: &Caller, d: &Doc) -> Result<Value, ApiError> {
    let st = store(s, group_of_id(d.id))?;
    let last = st
        .device_last_message(&c.tenant().id, d.id)
        .map_err(read_err)?;
    Ok(data::render_object(&c.base, d, last))
}

async fn load(s: &RestState, c: &Caller, raw: &str) -> Result<Doc, ApiError> {
    let (id, g) = id_group(s, Api::Inventory, raw)?;
    barrier(s, Some(g)).await?;
    store(s, g)?
        .device_object(&c.tenant().id, id)
        .map_err(read_err)?
        .ok_or_else(|| {
            ApiError::not_found(
                Api::Inventory,
                format!(
                    "Finding device data from database failed : No managedObject for id '{raw}'!"
                ),
            )
        })
}

/// `POST /inventory/managedObjects`: the new object goes to a group picked by its name (or
/// at random), since it has no device identifier yet.
pub async fn create(State(s): St, c: Caller, raw: Bytes) -> R {
    allowed(&c)?;
    let body = object(&raw)?;
    let seed = body
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:x}", rand::random::<u64>()));
    let g = s
        .durable
        .group_of(&SessionKey::new(c.tenant().id.clone(), seed));
    let doc = Value::Object(body).to_string();
    let mut o = commit(
        &s,
        &c,
        g,
        vec![DeviceOp::CreateObject {
            doc,
            external: None,
        }],
    )
    .await?;
    let d = doc_of(Api::Inventory, o.remove(0))?;
    Ok(json(
        StatusCode::CREATED,
        "managedObject",
        &show(&s, &c, &d)?,
    ))
}

/// `GET /inventory/managedObjects?type=&fragmentType=&owner=&ids=&text=`.
pub async fn list(State(s): St, c: Caller, Query(q): Query<HashMap<String, String>>) -> R {
    allowed(&c)?;
    let page = Page::from_query(&q)?;
    barrier(&s, None).await?;
    let ids: Option<Vec<u64>> = q
        .get("ids")
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    let keep = |d: &Doc| {
        q.get("type")
            .is_none_or(|t| d.str("type") == Some(t.as_str()))
            && q.get("fragmentType").is_none_or(|f| d.body.contains_key(f))
            && q.get("owner")
                .is_none_or(|o| d.str("owner") == Some(o.as_str()))
            && q.get("text")
                .is_none_or(|t| d.str("name").is_some_and(|n| n.contains(t.as_str())))
            && ids.as_ref().is_none_or(|l| l.contains(&d.id))
    };
    let max = data::page_reach(&page)?;
    let mut all = Vec::new();
    for g in s.durable.device_groups() {
        all.extend(
            store(&s, g)?
                .device_objects(&c.tenant().id, keep, max)
                .map_err(read_err)?,
        );
    }
    all.sort_by_key(|d| d.id);
    all.truncate(max);
    let items = all
        .iter()
        .map(|d| show(&s, &c, d))
        .collect::<Result<Vec<_>, _>>()?;
    let url = data::listing_url(&c.base, "inventory/managedObjects", &q);
    Ok(page.collection("managedObjectCollection", "managedObjects", &url, items))
}

/// `GET /inventory/managedObjects/{id}`.
pub async fn get_one(State(s): St, c: Caller, P(id): P<String>) -> R {
    allowed(&c)?;
    let d = load(&s, &c, &id).await?;
    Ok(json(StatusCode::OK, "managedObject", &show(&s, &c, &d)?))
}

/// `PUT /inventory/managedObjects/{id}`: merges fragments (`null` removes one; `{}` is a
/// heartbeat).
pub async fn update(State(s): St, c: Caller, P(id): P<String>, raw: Bytes) -> R {
    allowed(&c)?;
    let (id, g) = id_group(&s, Api::Inventory, &id)?;
    let set = object(&raw)?;
    let op = DeviceOp::Update {
        source: Source::Id(id),
        set: Value::Object(set).to_string(),
        remove: Vec::new(),
        if_absent: false,
    };
    let mut o = commit(&s, &c, g, vec![op]).await?;
    let d = doc_of(Api::Inventory, o.remove(0))?;
    Ok(json(StatusCode::OK, "managedObject", &show(&s, &c, &d)?))
}

/// `DELETE /inventory/managedObjects/{id}`.
pub async fn delete(State(s): St, c: Caller, P(id): P<String>) -> R {
    allowed(&c)?;
    let (id, g) = id_group(&s, Api::Inventory, &id)?;
    let mut o = commit(&s, &c, g, vec![DeviceOp::DeleteObject { id }]).await?;
    doc_of(Api::Inventory, o.remove(0))?;
    Ok(no_content())
}

/// `GET /inventory/managedObjects/{id}/childDevices`.
pub async fn children(State(s): St, c: Caller, P(id): P<String>, page: Page) -> R {
    allowed(&c)?;
    let d = load(&s, &c, &id).await?;
    let st = store(&s, group_of_id(d.id))?;
    let mut refs = Vec::new();
    for cid in &d.children {
        if let Some(cd) = st.device_object(&c.tenant().id, *cid).map_err(read_err)? {
            refs.push(json!({
                "self": format!("{}/inventory/managedObjects/{}/childDevices/{}", c.base, d.id, cid),
                "managedObject": show(&s, &c, &cd)?,
            }));
        }
    }
    let url = format!("{}/inventory/managedObjects/{}/childDevices", c.base, d.id);
    Ok(page.collection("managedObjectReferenceCollection", "references", &url, refs))
}

/// `POST /inventory/managedObjects/{id}/childDevices` `{"managedObject":{"id":"..."}}`.
/// Parent and child must be in one group (a device and the children it created always are).
pub async fn add_child(State(s): St, c: Caller, P(id): P<String>, raw: Bytes) -> R {
    allowed(&c)?;
    let (parent, g) = id_group(&s, Api::Inventory, &id)?;
    let body = object(&raw)?;
    let child_raw = body
        .get("managedObject")
        .and_then(|m| m.get("id"))
        .and_then(|v| {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.as_u64().map(|n| n.to_string()))
        })
        .ok_or_else(|| ApiError::missing("managedObject.id"))?;
    let (child, cg) = id_group(&s, Api::Inventory, &child_raw)?;
    if cg != g {
        return Err(ApiError::unprocessable(
            Api::Inventory,
            "parent and child are in different shards; create the child with 101 on the parent's topic",
        ));
    }
    let mut o = commit(&s, &c, g, vec![DeviceOp::AddChild { parent, child }]).await?;
    let d = doc_of(Api::Inventory, o.remove(0))?;
    Ok(json(
        StatusCode::CREATED,
        "managedObjectReference",
        &json!({"managedObject": show(&s, &c, &d)?}),
    ))
}

fn external_json(base: &str, kind: &str, external: &str, id: u64) -> Value {
    json!({
        "externalId": external,
        "type": kind,
        "self": format!("{base}/identity/externalIds/{kind}/{external}"),
        "managedObject": {"id": id.to_string(),
            "self": format!("{base}/inventory/managedObjects/{id}")},
    })
}

/// Finds an external ID: first in the group a device with that identifier would be in, then
/// in the others (objects created over REST and bound later).
async fn find_external(
    s: &RestState,
    c: &Caller,
    kind: &str,
    external: &str,
) -> Result<Option<(u64, u64)>, ApiError> {
    let tenant = c.tenant().id.clone();
    let first = s
        .durable
        .group_of(&SessionKey::new(tenant.clone(), external.to_string()));
    let mut groups = s.durable.device_groups();
    groups.sort_by_key(|g| *g != first);
    barrier(s, None).await?;
    for g in groups {
        if let Some(id) = store(s, g)?
            .device_external(&tenant, kind, external)
            .map_err(read_err)?
        {
            return Ok(Some((id, g)));
        }
    }
    Ok(None)
}

/// `GET /identity/externalIds/{type}/{externalId}`.
pub async fn external(State(s): St, c: Caller, P((kind, ext)): P<(String, String)>) -> R {
    allowed(&c)?;
    match find_external(&s, &c, &kind, &ext).await? {
        Some((id, _)) => Ok(json(
            StatusCode::OK,
            "externalId",
            &external_json(&c.base, &kind, &ext, id),
        )),
        None => Err(ApiError::not_found(
            Api::Identity,
            format!("External id not found; external id = ID [type={kind}, value={ext}]"),
        )),
    }
}

/// `DELETE /identity/externalIds/{type}/{externalId}`.
pub async fn delete_external(State(s): St, c: Caller, P((kind, ext)): P<(String, String)>) -> R {
    allowed(&c)?;
    let Some((_, g)) = find_external(&s, &c, &kind, &ext).await? else {
        return Err(ApiError::not_found(Api::Identity, "External id not found"));
    };
    let mut o = commit(
        &s,
        &c,
        g,
        vec![DeviceOp::DeleteExternalId {
            kind,
            external: ext,
        }],
    )
    .await?;
    match o.remove(0) {
        fleetmq_storage::domain::Outcome::NotFound(m) => Err(ApiError::not_found(Api::Identity, m)),
        _ => Ok(no_content()),
    }
}

/// `GET /identity/globalIds/{id}/externalIds`.
pub async fn externals_of(State(s): St, c: Caller, P(id): P<String>, page: Page) -> R {
    allowed(&c)?;
    let d = load(&s, &c, &id).await?;
    let items: Vec<Value> = d
        .external
        .iter()
        .map(|(k, x)| external_json(&c.base, k, x, d.id))
        .collect();
    let url = format!("{}/identity/globalIds/{}/externalIds", c.base, d.id);
    Ok(page.collection("externalIdCollection", "externalIds", &url, items))
}

/// `POST /identity/globalIds/{id}/externalIds` `{"type","externalId"}`.
pub async fn add_external(State(s): St, c: Caller, P(id): P<String>, raw: Bytes) -> R {
    allowed(&c)?;
    let (id, g) = id_group(&s, Api::Identity, &id)?;
    let body = object(&raw)?;
    let field = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .ok_or_else(|| ApiError::missing(k))
    };
    let (kind, external) = (field("type")?, field("externalId")?);
    if let Some((other, _)) = find_external(&s, &c, &kind, &external).await? {
        if other != id {
            return Err(ApiError::duplicate(
                Api::Identity,
                format!("External id {kind}/{external} is already bound to {other}"),
            ));
        }
    }
    let op = DeviceOp::AddExternalId {
        id,
        kind: kind.clone(),
        external: external.clone(),
    };
    let mut o = commit(&s, &c, g, vec![op]).await?;
    doc_of(Api::Identity, o.remove(0))?;
    Ok(json(
        StatusCode::CREATED,
        "externalId",
        &external_json(&c.base, &kind, &external, id),
    ))
}
