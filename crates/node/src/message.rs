//! An application message inside the broker, shared by every subscriber it goes to, and its
//! conversion to and from the durable record.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fleetmq_protocol::PublishProps;
use fleetmq_storage::records::{MessageProps, StoredMessage};

/// A message as routed: immutable once built, shared through `Arc` by all deliveries.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 properties to forward (no topic alias, no subscription identifiers).
    pub props: PublishProps,
    /// Absolute expiry in wall-clock ms, from Message Expiry Interval; survives restarts.
    pub expires_at_ms: Option<u64>,
    /// When the broker received it, for the publish-to-deliver latency histogram.
    pub received_at: Instant,
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Message {
    /// Builds a message from a PUBLISH (or will) body, resolving the expiry interval.
    pub fn new(
        topic: String,
        payload: Bytes,
        qos: u8,
        retain: bool,
        mut props: PublishProps,
    ) -> Arc<Message> {
        let expires_at_ms = props
            .message_expiry_interval
            .map(|s| now_ms() + s as u64 * 1000);
        props.topic_alias = None;
        props.subscription_ids.clear();
        props.message_expiry_interval = None;
        Arc::new(Message {
            topic,
            payload,
            qos,
            retain,
            props,
            expires_at_ms,
            received_at: Instant::now(),
        })
    }

    /// A copy whose payload has its own allocation. Payloads are zero-copy slices of the
    /// publisher's read buffer; a message that will be held for long (retained, queued for an
    /// offline session) must not keep that whole buffer alive.
    pub fn detached(&self) -> Arc<Message> {
        Arc::new(Message {
            topic: self.topic.clone(),
            payload: Bytes::copy_from_slice(&self.payload),
            qos: self.qos,
            retain: self.retain,
            props: self.props.clone(),
            expires_at_ms: self.expires_at_ms,
            received_at: self.received_at,
        })
    }

    /// Seconds left before expiry: `None` if it never expires, `Some(0)` if already expired.
    pub fn remaining_expiry(&self, now_ms: u64) -> Option<u32> {
        self.expires_at_ms
            .map(|at| (at.saturating_sub(now_ms).div_ceil(1000)).min(u32::MAX as u64) as u32)
    }

    /// Whether the message is past its expiry.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        matches!(self.expires_at_ms, Some(at) if at <= now_ms)
    }

    /// The durable form.
    pub fn to_stored(
        &self,
        publisher: Option<fleetmq_storage::records::SessionKey>,
    ) -> StoredMessage {
        StoredMessage {
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            props: MessageProps {
                payload_format_indicator: self.props.payload_format_indicator,
                expires_at_ms: self.expires_at_ms,
                content_type: self.props.content_type.clone(),
                response_topic: self.props.response_topic.clone(),
                correlation_data: self.props.correlation_data.clone(),
                user_properties: self.props.user_properties.clone(),
            },
            publisher,
        }
    }

    /// Rebuilds a message from its durable form after a restart.
    pub fn from_stored(m: StoredMessage) -> Arc<Message> {
        Arc::new(Message {
            topic: m.topic,
            payload: m.payload,
            qos: m.qos,
            retain: m.retain,
            props: PublishProps {
                payload_format_indicator: m.props.payload_format_indicator,
                message_expiry_interval: None,
                topic_alias: None,
                response_topic: m.props.response_topic,
                correlation_data: m.props.correlation_data,
                user_properties: m.props.user_properties,
                subscription_ids: Vec::new(),
                content_type: m.props.content_type,
            },
            expires_at_ms: m.props.expires_at_ms,
            received_at: Instant::now(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detached_payload_does_not_share_the_read_buffer() {
        let buffer = Bytes::from(vec![7u8; 65_536]);
        let slice = buffer.slice(100..164);
        let m = Message::new("t".into(), slice.clone(), 1, false, PublishProps::default());
        let d = m.detached();
        assert_eq!(d.payload, slice);
        assert_ne!(
            d.payload.as_ptr(),
            slice.as_ptr(),
            "copied, so the 64 KiB buffer can be freed"
        );
    }

    #[test]
    fn stored_round_trip_keeps_props_and_expiry() {
        let props = PublishProps {
            message_expiry_interval: Some(60),
            content_type: Some("text/plain".into()),
            user_properties: vec![("k".into(), "v".into())],
            topic_alias: Some(3),
            ..PublishProps::default()
        };
        let m = Message::new("a/b".into(), Bytes::from_static(b"x"), 1, true, props);
        assert_eq!(
            m.props.topic_alias, None,
            "aliases are per connection and never stored"
        );
        let back = Message::from_stored(m.to_stored(None));
        assert_eq!(back.expires_at_ms, m.expires_at_ms);
        assert_eq!(back.props.content_type.as_deref(), Some("text/plain"));
        let rem = back.remaining_expiry(now_ms()).unwrap();
        assert!((59..=60).contains(&rem));
        assert!(back.is_expired(now_ms() + 61_000));
    }
}
