//! Encoding of server-to-client packets straight into a connection's write buffer. PUBLISH is
//! written by hand: it is the hot path, and building an `mqttbytes::Publish` per subscriber
//! would allocate the topic again for every delivery. The rarer packets with MQTT 5 property
//! sets (CONNACK, SUBACK, DISCONNECT) go through `mqttbytes`.

use bytes::{BufMut, BytesMut};
use mqttbytes::v5;

use crate::decode::{put_varint, varint_len};
use crate::packet::{ProtocolVersion, PublishProps};
use crate::reason::connack_v3_from_v5;

/// A PUBLISH on its way to one subscriber. Borrowed so that a message shared by many
/// subscribers is encoded without copying anything but into the socket buffer.
#[derive(Debug, Clone, Copy)]
pub struct OutPublish<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    /// MQTT 5 message properties (ignored for 3.1.x).
    pub props: Option<&'a PublishProps>,
    /// Remaining Message Expiry Interval, replacing the publisher's value.
    pub message_expiry: Option<u32>,
    pub subscription_ids: &'a [u32],
    /// A topic alias for this subscriber; with `alias_only` the topic is sent empty.
    pub topic_alias: Option<u16>,
    pub alias_only: bool,
}

fn string_len(s: &str) -> usize {
    2 + s.len()
}

fn put_string(buf: &mut BytesMut, s: &str) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

fn publish_props_len(p: &OutPublish<'_>) -> usize {
    let mut len = 0;
    if let Some(props) = p.props {
        if props.payload_format_indicator.is_some() {
            len += 2;
        }
        if let Some(t) = &props.response_topic {
            len += 1 + string_len(t);
        }
        if let Some(c) = &props.correlation_data {
            len += 1 + 2 + c.len();
        }
        for (k, v) in &props.user_properties {
            len += 1 + string_len(k) + string_len(v);
        }
        if let Some(c) = &props.content_type {
            len += 1 + string_len(c);
        }
    }
    if p.message_expiry.is_some() {
        len += 5;
    }
    if p.topic_alias.is_some() {
        len += 3;
    }
    for id in p.subscription_ids {
        len += 1 + varint_len(*id as usize);
    }
    len
}

/// Size on the wire of this PUBLISH, to honour the client's Maximum Packet Size before writing.
pub fn publish_len(version: ProtocolVersion, p: &OutPublish<'_>) -> usize {
    let remaining = publish_remaining_len(version, p);
    1 + varint_len(remaining) + remaining
}

fn publish_remaining_len(version: ProtocolVersion, p: &OutPublish<'_>) -> usize {
    let topic = if p.alias_only { "" } else { p.topic };
    let mut len = string_len(topic) + p.payload.len();
    if p.qos > 0 {
        len += 2;
    }
    if version.is_v5() {
        let props = publish_props_len(p);
        len += varint_len(props) + props;
    }
    len
}

/// Appends a PUBLISH to `buf`.
pub fn encode_publish(version: ProtocolVersion, p: &OutPublish<'_>, buf: &mut BytesMut) {
    let remaining = publish_remaining_len(version, p);
    buf.reserve(5 + remaining);
    let byte1 = 0x30 | ((p.dup as u8) << 3) | ((p.qos & 3) << 1) | (p.retain as u8);
    buf.put_u8(byte1);
    put_varint(buf, remaining as u32);
    put_string(buf, if p.alias_only { "" } else { p.topic });
    if p.qos > 0 {
        buf.put_u16(p.pkid);
    }
    if version.is_v5() {
        put_varint(buf, publish_props_len(p) as u32);
        if let Some(props) = p.props {
            if let Some(f) = props.payload_format_indicator {
                buf.put_u8(0x01);
                buf.put_u8(f);
            }
        }
        if let Some(e) = p.message_expiry {
            buf.put_u8(0x02);
            buf.put_u32(e);
        }
        if let Some(a) = p.topic_alias {
            buf.put_u8(0x23);
            buf.put_u16(a);
        }
        if let Some(props) = p.props {
            if let Some(t) = &props.response_topic {
                buf.put_u8(0x08);
                put_string(buf, t);
            }
            if let Some(c) = &props.correlation_data {
                buf.put_u8(0x09);
                buf.put_u16(c.len() as u16);
                buf.put_slice(c);
            }
            for (k, v) in &props.user_properties {
                buf.put_u8(0x26);
                put_string(buf, k);
                put_string(buf, v);
            }
        }
        for id in p.subscription_ids {
            buf.put_u8(0x0B);
            put_varint(buf, *id);
        }
        if let Some(props) = p.props {
            if let Some(c) = &props.content_type {
                buf.put_u8(0x03);
                put_string(buf, c);
            }
        }
    }
    buf.put_slice(p.payload);
}

/// Appends PUBACK (type 4), PUBREC (5), PUBREL (6) or PUBCOMP (7). MQTT 5 reason codes other
/// than success are sent; success is elided as the spec allows.
pub fn encode_ack(
    version: ProtocolVersion,
    packet_type: u8,
    pkid: u16,
    reason: u8,
    buf: &mut BytesMut,
) {
    let byte1 = (packet_type << 4) | if packet_type == 6 { 0b0010 } else { 0 };
    buf.put_u8(byte1);
    if version.is_v5() && reason != 0 {
        buf.put_u8(3);
        buf.put_u16(pkid);
        buf.put_u8(reason);
    } else {
        buf.put_u8(2);
        buf.put_u16(pkid);
    }
}

/// Appends PINGRESP.
pub fn encode_pingresp(buf: &mut BytesMut) {
    buf.put_slice(&[0xD0, 0x00]);
}

/// CONNACK properties the broker sends to MQTT 5 clients.
#[derive(Debug, Clone, Default)]
pub struct ConnAckProps {
    pub session_expiry: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<bool>,
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_id: Option<String>,
    pub topic_alias_maximum: Option<u16>,
    pub reason_string: Option<String>,
    pub wildcard_available: Option<bool>,
    pub subscription_ids_available: Option<bool>,
    pub shared_available: Option<bool>,
    pub server_keep_alive: Option<u16>,
}

/// Appends CONNACK. `code` is the MQTT 5 reason code; 3.1.x gets the mapped return code.
pub fn encode_connack(
    version: ProtocolVersion,
    session_present: bool,
    code: u8,
    props: &ConnAckProps,
    buf: &mut BytesMut,
) {
    if !version.is_v5() {
        buf.put_slice(&[0x20, 0x02, session_present as u8, connack_v3_from_v5(code)]);
        return;
    }
    let properties = v5::ConnAckProperties {
        session_expiry_interval: props.session_expiry,
        receive_max: props.receive_maximum,
        max_qos: props.maximum_qos,
        retain_available: props.retain_available.map(u8::from),
        max_packet_size: props.maximum_packet_size,
        assigned_client_identifier: props.assigned_client_id.clone(),
        topic_alias_max: props.topic_alias_maximum,
        reason_string: props.reason_string.clone(),
        user_properties: Vec::new(),
        wildcard_subscription_available: props.wildcard_available.map(u8::from),
        subscription_identifiers_available: props.subscription_ids_available.map(u8::from),
        shared_subscription_available: props.shared_available.map(u8::from),
        server_keep_alive: props.server_keep_alive,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    };
    // The CONNACK body is written by hand because mqttbytes' ConnectReturnCode enum cannot
    // carry every reason code; its property encoder is reused through a zero-code ConnAck.
    let ack = v5::ConnAck {
        session_present,
        code: v5::ConnectReturnCode::Success,
        properties: Some(properties),
    };
    let mut tmp = BytesMut::new();
    if ack.write(&mut tmp).is_ok() {
        // tmp = [0x20, len.., session_present, code, props..]; patch the code byte.
        if let Ok(Some(fh)) = crate::decode::parse_fixed_header(&tmp) {
            let code_at = fh.header_len + 1;
            if let Some(b) = tmp.get_mut(code_at) {
                *b = code;
            }
        }
        buf.extend_from_slice(&tmp);
    } else {
        buf.put_slice(&[0x20, 0x03, session_present as u8, code, 0x00]);
    }
}

/// Appends SUBACK with one return/reason code per filter.
pub fn encode_suback(version: ProtocolVersion, pkid: u16, codes: &[u8], buf: &mut BytesMut) {
    let props = if version.is_v5() { 1 } else { 0 };
    let remaining = 2 + props + codes.len();
    buf.put_u8(0x90);
    put_varint(buf, remaining as u32);
    buf.put_u16(pkid);
    if version.is_v5() {
        buf.put_u8(0);
    }
    buf.put_slice(codes);
}

/// Appends UNSUBACK; MQTT 5 carries one reason code per filter, 3.1.1 none.
pub fn encode_unsuback(version: ProtocolVersion, pkid: u16, codes: &[u8], buf: &mut BytesMut) {
    buf.put_u8(0xB0);
    if version.is_v5() {
        put_varint(buf, (3 + codes.len()) as u32);
        buf.put_u16(pkid);
        buf.put_u8(0);
        buf.put_slice(codes);
    } else {
        buf.put_u8(2);
        buf.put_u16(pkid);
    }
}

/// Appends an MQTT 5 DISCONNECT with a reason code and optional reason string. 3.1.x has no
/// server DISCONNECT, so nothing is written for it: the connection is simply closed.
pub fn encode_disconnect(
    version: ProtocolVersion,
    reason: u8,
    reason_string: Option<&str>,
    buf: &mut BytesMut,
) {
    if !version.is_v5() {
        return;
    }
    match reason_string {
        Some(s) => {
            let props = 1 + string_len(s);
            let remaining = 1 + varint_len(props) + props;
            buf.put_u8(0xE0);
            put_varint(buf, remaining as u32);
            buf.put_u8(reason);
            put_varint(buf, props as u32);
            buf.put_u8(0x1F);
            put_string(buf, s);
        }
        // The property length is written even when empty: the spec allows omitting it, but
        // some clients (rumqttc 0.25) fail to decode the 3-byte form.
        None => buf.put_slice(&[0xE0, 0x02, reason, 0x00]),
    }
}
