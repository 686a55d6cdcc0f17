//! Operations as the agent's connection receives them (c8y-mqtt.md §4.7, §8, §12 item 9): one
//! `s/ds` message with the static line of each fragment that has a template, and the JSON on
//! `devicecontrol/notifications` (with `externalSource`). Each goes only to a connection
//! subscribed to its topic, at the QoS it subscribed with.

use std::sync::Arc;

use fleetmq_smartrest::custom::response_lines;
use fleetmq_smartrest::operation_lines;
use fleetmq_storage::domain::{Doc, SERIAL};
use serde_json::{json, Value};

use crate::broker::Broker;
use crate::cluster::Cluster;
use crate::message::Message;
use crate::session::Session;

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

/// The internal topic an operation travels under to the node holding its agent's
/// connection, which expands it into the downstream messages that connection subscribed to
/// (only it knows which `s/dc/<X-ID>` those are). Never a topic a client can use: `$` topics
/// are not matched by client filters.
pub const OPERATION_TOPIC: &str = "$fleetmq/operation";

/// Pushes a new operation to its agent, wherever in the cluster the agent is connected. A
/// device that is not connected gets it when it subscribes again or asks (`500`).
pub async fn push_operation(cluster: &Arc<Cluster>, tenant: &str, op: &Doc) -> bool {
    let Some((_, agent)) = &op.agent else {
        return false;
    };
    let Ok(doc) = serde_json::to_vec(op) else {
        return false;
    };
    let msg = Message::new(
        OPERATION_TOPIC.to_string(),
        bytes::Bytes::from(doc),
        2,
        false,
        fleetmq_protocol::PublishProps::default(),
    );
    match cluster.push_to_device(tenant, agent, msg).await {
        Ok(crate::cluster::Pushed::NotDelivered) => false,
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, op = op.id, "pushing an operation failed");
            false
        }
    }
}

/// Sends an operation to a session held here on every downstream channel it subscribed to:
/// `s/ds`, `devicecontrol/notifications`, and the response templates of each subscribed
/// `s/dc/<X-ID>` (and `s/dd` for the ClientId's default collection). Returns whether the
/// session is connected.
pub fn to_session(broker: &Arc<Broker>, session: &Arc<Session>, op: &Doc) -> bool {
    let (xids, default, connected) = {
        let st = session.state.lock();
        let xids: Vec<String> = st
            .subscriptions
            .keys()
            .filter_map(|f| f.strip_prefix("s/dc/"))
            .filter(|x| !x.contains(['+', '#', '/']))
            .map(str::to_string)
            .collect();
        let default = st
            .default_xid
            .clone()
            .filter(|_| st.subscriptions.contains_key("s/dd"));
        (xids, default, st.conn.is_some())
    };
    for (topic, payload) in operation_messages(op) {
        broker.send_downstream(session, topic, payload.into());
    }
    let target = op.target.as_deref().unwrap_or_default();
    let body = Value::Object(op.body.clone());
    let mut custom: Vec<(String, String)> =
        xids.into_iter().map(|x| (format!("s/dc/{x}"), x)).collect();
    if let Some(x) = default {
        custom.push(("s/dd".to_string(), x));
    }
    for (topic, xid) in custom {
        if let Some((_, c)) = super::custom::load(broker, &session.key.tenant, &xid) {
            let lines = response_lines(&c.responses, &body, Some(target));
            if !lines.is_empty() {
                broker.send_downstream(session, &topic, lines.join("\n").into());
            }
        }
    }
    connected
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
