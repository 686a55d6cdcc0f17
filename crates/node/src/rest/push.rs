//! `POST /fleetmq/devices/{device}/messages`: a service pushes one message to one device (a
//! command, a downstream line). The device's persistent session keeps a QoS 1/2 message until
//! the device takes it, on whichever node it reconnects; a connected clean session gets it
//! from the node holding its connection (see `Cluster::push_to_device`). The device receives
//! it only on a topic it subscribed to. Administrators of the device's tenant, and management
//! administrators with `?tenant=<id>`.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{body, Api, ApiError, Caller, St, P};
use crate::message::Message;
use fleetmq_protocol::topic::validate_topic_name;

type R = Result<Response, ApiError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Push {
    topic: String,
    /// UTF-8 text.
    payload: String,
    #[serde(default = "one")]
    qos: u8,
    #[serde(default)]
    retain: bool,
}

fn one() -> u8 {
    1
}

/// `POST /fleetmq/devices/{device}/messages`: answers `{"result": "delivered" | "queued" |
/// "notDelivered"}`.
pub async fn push(
    State(s): St,
    c: Caller,
    P(device): P<String>,
    Query(q): Query<HashMap<String, String>>,
    raw: Bytes,
) -> R {
    c.require_admin()?;
    // `?tenant=` takes a tenant id or domain.
    let tenant = match q.get("tenant") {
        None => c.tenant().id.clone(),
        Some(t) => match s.auth.dir.resolve_tenant(t) {
            Some(rec) if c.may_admin(&rec.id) => rec.id.clone(),
            Some(_) => {
                return Err(ApiError::forbidden(
                    "only the device's tenant may push to it",
                ))
            }
            None => return Err(ApiError::not_found(Api::Tenant, format!("no tenant {t}"))),
        },
    };
    let req: Push = body(&raw)?;
    if req.qos > 2 {
        return Err(ApiError::bad_request("qos is 0, 1 or 2"));
    }
    validate_topic_name(&req.topic, &s.cluster.topic_limits())
        .map_err(|e| ApiError::bad_request(format!("topic: {e}")))?;
    let msg = Message::new(
        req.topic,
        Bytes::from(req.payload),
        req.qos,
        req.retain,
        Default::default(),
    );
    let pushed = s
        .cluster
        .push_to_device(&tenant, &device, msg)
        .await
        .map_err(|e| ApiError::unavailable(format!("push to {device}: {e}")))?;
    tracing::info!(%tenant, %device, ?pushed, by = %c.id.user, "REST: message pushed to a device");
    Ok(Json(json!({ "device": device, "result": pushed })).into_response())
}
