//! fleetmq's operator endpoints: `GET /fleetmq/cluster/nodes` (the members and every Raft
//! group's voters and leader, as the answering node sees them) and `POST /fleetmq/cluster/nodes/{id}/drain` (the node hands its clients to
//! the others and leaves the membership; see `Cluster::drain`). Management administrators only.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{ApiError, Caller, St, P};
use crate::rest::error::Api;

type R = Result<Response, ApiError>;

/// `GET /fleetmq/cluster/nodes`.
pub async fn nodes(axum::extract::State(s): St, c: Caller) -> R {
    c.require_management_admin()?;
    // Every Raft group as this node sees it: 0 is the meta group, 1..=S the session shards.
    let groups: Vec<_> = s
        .cluster
        .groups_view()
        .into_iter()
        .map(
            |(group, voters, leader)| json!({ "group": group, "voters": voters, "leader": leader }),
        )
        .collect();
    Ok(Json(json!({ "nodes": s.cluster.nodes_view(), "groups": groups })).into_response())
}

/// `POST /fleetmq/cluster/nodes/{id}/drain`: answers once the node has told its clients to go
/// and left the membership.
pub async fn drain(axum::extract::State(s): St, c: Caller, P(id): P<String>) -> R {
    c.require_management_admin()?;
    let Ok(node) = id.parse::<u64>() else {
        return Err(ApiError::bad_request("a node id is a number"));
    };
    tracing::warn!(node, by = %c.id.user, "REST: drain requested");
    match s.cluster.drain_node(node).await {
        None => Err(ApiError::not_found(
            Api::Cluster,
            format!("no member with id {node}"),
        )),
        Some(Ok(closed)) => Ok((
            StatusCode::OK,
            Json(json!({ "node": node, "connectionsClosed": closed })),
        )
            .into_response()),
        Some(Err(e)) => Err(ApiError::unavailable(format!("drain of node {node}: {e}"))),
    }
}
