//! Device control (c8y-mqtt.md §11.1): operations created here are committed on the device's
//! shard, then pushed to the agent's connection wherever it is (`device::deliver`).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use fleetmq_storage::domain::{DeviceOp, OpSelect, RecordKind, Source};
use serde_json::Value;

use super::data::{self, allowed, commit, doc_of, id_group, object};
use super::records;
use super::{json, Api, ApiError, Caller, St, P};

type R = Result<Response, ApiError>;

/// `POST /devicecontrol/operations` `{"deviceId", "description"?, "<fragment>": {...}}` →
/// 201 with the PENDING operation; the agent gets it at once if connected and subscribed.
pub async fn create(State(s): St, c: Caller, raw: Bytes) -> R {
    allowed(&c)?;
    let body = object(&raw)?;
    let device = body
        .get("deviceId")
        .and_then(|v| {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.as_u64().map(|n| n.to_string()))
        })
        .ok_or_else(|| {
            ApiError::unprocessable(
                Api::DeviceControl,
                "Following mandatory fields should be included: deviceId",
            )
        })?;
    let (device, g) = id_group(&s, Api::DeviceControl, &device)?;
    let op = DeviceOp::Operation {
        device,
        doc: Value::Object(body).to_string(),
    };
    let mut o = commit(&s, &c, g, vec![op]).await?;
    let d = doc_of(Api::DeviceControl, o.remove(0))?;
    tracing::info!(tenant = %c.tenant().id, op = d.id, device, "REST: operation created");
    metrics::counter!("fleetmq_device_operations_created_total").increment(1);
    let cluster = s.cluster.clone();
    let tenant = c.tenant().id.clone();
    let pushed = d.clone();
    tokio::spawn(async move {
        crate::device::deliver::push_operation(&cluster, &tenant, &pushed).await;
    });
    Ok(json(
        StatusCode::CREATED,
        "operation",
        &data::render_record(&c.base, RecordKind::Operation, &d),
    ))
}

/// `GET /devicecontrol/operations?deviceId=&agentId=&status=&fragmentType=`.
pub async fn list(State(s): St, c: Caller, Query(q): Query<HashMap<String, String>>) -> R {
    records::list(&s, &c, RecordKind::Operation, &q).await
}

/// `GET /devicecontrol/operations/{id}`.
pub async fn get_one(State(s): St, c: Caller, P(id): P<String>) -> R {
    records::get_one(&s, &c, RecordKind::Operation, &id).await
}

/// `PUT /devicecontrol/operations/{id}` `{"status", "failureReason"?, fragments...}`.
pub async fn update(State(s): St, c: Caller, P(raw_id): P<String>, raw: Bytes) -> R {
    allowed(&c)?;
    let (id, g) = id_group(&s, Api::DeviceControl, &raw_id)?;
    let mut set = object(&raw)?;
    let status = set
        .remove("status")
        .and_then(|v| v.as_str().map(str::to_ascii_uppercase));
    let reason = set
        .remove("failureReason")
        .and_then(|v| v.as_str().map(str::to_string));
    let op = match status {
        Some(to) => DeviceOp::OperationStatus {
            source: Source::Id(0),
            select: OpSelect::Id(id),
            to,
            reason,
            params: Vec::new(),
            set: Some(Value::Object(set).to_string()),
        },
        None => DeviceOp::RecordUpdate {
            kind: RecordKind::Operation,
            id,
            set: Value::Object(set).to_string(),
        },
    };
    let mut o = commit(&s, &c, g, vec![op]).await?;
    let d = doc_of(Api::DeviceControl, o.remove(0))?;
    Ok(json(
        StatusCode::OK,
        "operation",
        &data::render_record(&c.base, RecordKind::Operation, &d),
    ))
}
