//! Conversions between the broker's values and the cluster protobuf messages.

use std::sync::Arc;

use fleetmq_cluster::pb;
use fleetmq_storage::records::{MessageProps, StoredMessage};

use crate::message::Message;

/// A routed message as it is forwarded to another node.
pub fn message_to_pb(tenant: &str, m: &Message) -> pb::Message {
    pb::Message {
        tenant: tenant.to_string(),
        topic: m.topic.clone(),
        payload: m.payload.clone(),
        qos: m.qos as u32,
        retain: m.retain,
        payload_format_indicator: m.props.payload_format_indicator.map(u32::from),
        expires_at_ms: m.expires_at_ms,
        content_type: m.props.content_type.clone(),
        response_topic: m.props.response_topic.clone(),
        correlation_data: m.props.correlation_data.clone(),
        user_properties: m
            .props
            .user_properties
            .iter()
            .map(|(k, v)| pb::UserProperty {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        publisher: None,
        share_groups: Vec::new(),
    }
}

/// A forwarded message back into the broker's form; `None` when a field is out of range (a
/// peer of another version, or corruption): such a message is dropped and counted.
pub fn message_from_pb(m: pb::Message) -> Option<(String, Arc<Message>)> {
    let qos = u8::try_from(m.qos).ok().filter(|q| *q <= 2)?;
    let pfi = match m.payload_format_indicator {
        Some(v) => Some(u8::try_from(v).ok()?),
        None => None,
    };
    let stored = StoredMessage {
        topic: m.topic,
        payload: m.payload,
        qos,
        retain: m.retain,
        props: MessageProps {
            payload_format_indicator: pfi,
            expires_at_ms: m.expires_at_ms,
            content_type: m.content_type,
            response_topic: m.response_topic,
            correlation_data: m.correlation_data,
            user_properties: m
                .user_properties
                .into_iter()
                .map(|p| (p.key, p.value))
                .collect(),
        },
        publisher: None,
    };
    Some((m.tenant, Message::from_stored(stored)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use fleetmq_protocol::PublishProps;

    #[test]
    fn round_trip_keeps_every_field() {
        let props = PublishProps {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some("text/plain".into()),
            response_topic: Some("r/t".into()),
            correlation_data: Some(Bytes::from_static(b"c")),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        let m = Message::new("a/b".into(), Bytes::from_static(b"hi"), 1, true, props);
        let (tenant, back) = message_from_pb(message_to_pb("t1", &m)).expect("valid");
        assert_eq!(tenant, "t1");
        assert_eq!(back.topic, "a/b");
        assert_eq!(&back.payload[..], b"hi");
        assert_eq!((back.qos, back.retain), (1, true));
        assert_eq!(back.expires_at_ms, m.expires_at_ms);
        assert_eq!(back.props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(back.props.response_topic.as_deref(), Some("r/t"));
        assert_eq!(back.props.user_properties, vec![("k".into(), "v".into())]);
        assert_eq!(back.props.payload_format_indicator, Some(1));
    }

    #[test]
    fn out_of_range_qos_is_refused() {
        let m = Message::new("a".into(), Bytes::new(), 0, false, PublishProps::default());
        let mut p = message_to_pb("t", &m);
        p.qos = 3;
        assert!(message_from_pb(p).is_none());
    }
}
