//! Operations as the agent's connection receives them (c8y-mqtt.md §4.7, §8, §12 item 9): one
//! `s/ds` message with the static line of each fragment that has a template, and the JSON on
//! `devicecontrol/notifications` (with `externalSource`). Each goes only to a connection
//! subscribed to its topic, at the QoS it subscribed with.

use std::sync::Arc;

use fleetmq_smartrest::operation_lines;
use fleetmq_storage::domain::{Doc, SERIAL};
use serde_json::{json, Value};

use crate::cluster::Cluster;
use crate::message::Message;

/// JSON operations' topic (§8).
pub const NOTIFICATIONS: &str = "devicecontrol/notifications";

/// `(topic, payload)` of each downstream message an operation becomes.
pub fn operation_messages(op: &Doc) -> Vec<(&'static str, String)> {
    let target = op.target.as_deref().unwrap_or_default();
    let body = Value::Object(op.body.clone());
    let mut out = Vec::with_capacity(2);
    let lines = operation_lines(target, &body);
    if !lines.is_empty() {
        out.push(("s/ds", lines.join("\n")));
    }
    let mut j = op.body.clone();
    j.insert(
        "externalSource".into(),
        json!({"externalId": target, "type": SERIAL}),
    );
    j.insert(
        "delivery".into(),
        json!({"log": [], "status": "PENDING", "time": op.body.get("creationTime")}),
    );
    out.push((NOTIFICATIONS, Value::Object(j).to_string()));
    out
}

/// Pushes a new operation to its agent, wherever in the cluster the agent is connected. A
/// device that is not connected gets it when it subscribes again or asks (`500`).
pub async fn push_operation(cluster: &Arc<Cluster>, tenant: &str, op: &Doc) -> usize {
    let Some((_, agent)) = &op.agent else {
        return 0;
    };
    let mut delivered = 0;
    for (topic, payload) in operation_messages(op) {
        // QoS 2 here means "at the QoS the device subscribed with" (the lower one wins).
        let msg = Message::new(
            topic.to_string(),
            bytes::Bytes::from(payload),
            2,
            false,
            fleetmq_protocol::PublishProps::default(),
        );
        match cluster.push_to_device(tenant, agent, msg).await {
            Ok(crate::cluster::Pushed::NotDelivered) => {}
            Ok(_) => delivered += 1,
            Err(e) => tracing::warn!(error = %e, op = op.id, "pushing an operation failed"),
        }
    }
    delivered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(body: Value) -> Doc {
        Doc {
            id: 259,
            body: body.as_object().cloned().unwrap_or_default(),
            agent: Some((3, "dev1".into())),
            target: Some("child1".into()),
            ..Doc::default()
        }
    }

    #[test]
    fn a_command_becomes_a_511_line_for_its_target_and_json() {
        let m = operation_messages(&op(json!({"id": "259", "status": "PENDING",
            "c8y_Command": {"text": "ls -l"}})));
        assert_eq!(m[0], ("s/ds", "511,child1,ls -l".to_string()));
        assert_eq!(m[1].0, NOTIFICATIONS);
        let j: Value = serde_json::from_str(&m[1].1).unwrap();
        assert_eq!(j["externalSource"]["externalId"], "child1");
        assert_eq!(j["c8y_Command"]["text"], "ls -l");
    }

    #[test]
    fn a_fragment_without_template_goes_as_json_only() {
        let m = operation_messages(&op(json!({"id": "1", "c8y_Custom": {"x": 1}})));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].0, NOTIFICATIONS);
    }
}
