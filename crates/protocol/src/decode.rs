//! Framing and decoding of client packets: our own fixed-header checks (sizes, reserved flags,
//! packet types a server may receive), then `mqttbytes` for the bodies, then conversion into
//! [`crate::packet`]. MQTT 3.1 (`MQIsdp`) is rewritten to 3.1.1 before `mqttbytes` sees it
//! because `mqttbytes` 0.6 rejects it, and MQTT 5 packets with an empty body (DISCONNECT) are
//! handled here because `mqttbytes` 0.6 wrongly rejects them.

use bytes::{BufMut, Bytes, BytesMut};
use mqttbytes::{v4, v5};

use crate::error::{from_mqttbytes, DecodeError};
use crate::packet::*;

/// A parsed fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    pub byte1: u8,
    /// Length of the fixed header itself (1 + remaining-length bytes).
    pub header_len: usize,
    pub remaining_len: usize,
}

impl FixedHeader {
    /// Total bytes of the packet on the wire.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

/// Parses the fixed header at the start of `buf`; `Ok(None)` when more bytes are needed.
pub fn parse_fixed_header(buf: &[u8]) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut len: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(FixedHeader {
                byte1,
                header_len: 2 + i,
                remaining_len: len,
            }));
        }
    }
    Err(DecodeError::Malformed(
        "remaining length longer than 4 bytes",
    ))
}

/// Stateful decoder for one connection: knows the negotiated version after CONNECT.
#[derive(Debug, Clone)]
pub struct Decoder {
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
    last_size: usize,
}

impl Decoder {
    /// A decoder that accepts packets up to `max_packet_size` bytes (whole packet).
    pub fn new(max_packet_size: usize) -> Self {
        Self {
            version: None,
            max_packet_size,
            last_size: 0,
        }
    }

    /// The version negotiated by CONNECT, once seen.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// Size in bytes (fixed header included) of the packet `decode` returned last, so that a
    /// caller can apply a tighter limit to some packets (per topic class) after decoding.
    pub fn last_packet_size(&self) -> usize {
        self.last_size
    }

    /// Changes the size limit (e.g. after CONNECT chose a per-tenant limit).
    pub fn set_max_packet_size(&mut self, max: usize) {
        self.max_packet_size = max;
    }

    /// Decodes one packet from the front of `buf`, consuming its bytes. `Ok(None)` means more
    /// bytes are needed. Size is checked from the fixed header alone, so an oversized packet is
    /// refused before its body is buffered.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, DecodeError> {
        let Some(fh) = parse_fixed_header(buf)? else {
            return Ok(None);
        };
        let size = fh.frame_len();
        if size > self.max_packet_size {
            return Err(DecodeError::PacketTooLarge {
                size,
                max: self.max_packet_size,
            });
        }
        self.last_size = size;
        let packet_type = fh.byte1 >> 4;
        // Decided from the first byte, so garbage is refused before waiting for a "body".
        if self.version.is_none() && packet_type != 1 {
            return Err(DecodeError::FirstPacketNotConnect);
        }
        check_flags(packet_type, fh.byte1 & 0x0f)?;
        if buf.len() < size {
            return Ok(None);
        }
        let frame = buf.split_to(size);
        match self.version {
            None => {
                if packet_type != 1 {
                    return Err(DecodeError::FirstPacketNotConnect);
                }
                let connect = decode_connect(frame, fh)?;
                self.version = Some(connect.version);
                Ok(Some(Incoming::Connect(Box::new(connect))))
            }
            Some(version) => {
                if packet_type == 1 {
                    return Err(DecodeError::Protocol("second CONNECT"));
                }
                decode_after_connect(version, frame, fh).map(Some)
            }
        }
    }
}

/// Reserved flag bits and packet types a server must never receive (spec 2.1.3, 2.2.2).
fn check_flags(packet_type: u8, flags: u8) -> Result<(), DecodeError> {
    match packet_type {
        3 => {
            if (flags >> 1) & 0b11 == 3 {
                return Err(DecodeError::Malformed("PUBLISH with QoS 3"));
            }
            if flags & 0b1000 != 0 && (flags >> 1) & 0b11 == 0 {
                return Err(DecodeError::Malformed("DUP set on QoS 0 PUBLISH"));
            }
            Ok(())
        }
        6 | 8 | 10 => {
            if flags == 0b0010 {
                Ok(())
            } else {
                Err(DecodeError::Malformed("reserved flags must be 0010"))
            }
        }
        1 | 4 | 5 | 7 | 12 | 14 | 15 => {
            if flags == 0 {
                Ok(())
            } else {
                Err(DecodeError::Malformed("reserved flags must be 0"))
            }
        }
        2 | 9 | 11 | 13 => Err(DecodeError::Protocol(
            "server-to-client packet type sent by client",
        )),
        _ => Err(DecodeError::Malformed("packet type 0")),
    }
}

/// Reads protocol name and level from a CONNECT frame without consuming it.
fn peek_protocol(frame: &[u8], fh: FixedHeader) -> Result<(&[u8], u8, usize), DecodeError> {
    let body = frame
        .get(fh.header_len..)
        .ok_or(DecodeError::Malformed("short CONNECT"))?;
    let name_len = match body {
        [a, b, ..] => u16::from_be_bytes([*a, *b]) as usize,
        _ => return Err(DecodeError::Malformed("short CONNECT")),
    };
    let name = body
        .get(2..2 + name_len)
        .ok_or(DecodeError::Malformed("short CONNECT"))?;
    let level = *body
        .get(2 + name_len)
        .ok_or(DecodeError::Malformed("short CONNECT"))?;
    let flags = *body
        .get(3 + name_len)
        .ok_or(DecodeError::Malformed("short CONNECT"))?;
    if flags & 1 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag set"));
    }
    Ok((name, level, name_len))
}

fn decode_connect(frame: BytesMut, fh: FixedHeader) -> Result<Connect, DecodeError> {
    let (name, level, name_len) = peek_protocol(&frame, fh)?;
    match (name, level) {
        (b"MQTT", 4) => {
            let mut frame = frame;
            match v4::read(&mut frame, usize::MAX).map_err(from_mqttbytes)? {
                v4::Packet::Connect(c) => Ok(connect_from_v4(c, ProtocolVersion::V311)),
                _ => Err(DecodeError::Malformed("CONNECT")),
            }
        }
        (b"MQIsdp", 3) => {
            // Rewrite the variable header to "MQTT"/4; the rest of a 3.1 CONNECT is identical.
            let body_after = &frame[fh.header_len + 2 + name_len + 1..];
            let remaining = 2 + 4 + 1 + body_after.len();
            let mut rewritten = BytesMut::with_capacity(remaining + 5);
            rewritten.put_u8(0x10);
            put_varint(&mut rewritten, remaining as u32);
            rewritten.put_u16(4);
            rewritten.put_slice(b"MQTT");
            rewritten.put_u8(4);
            rewritten.put_slice(body_after);
            match v4::read(&mut rewritten, usize::MAX).map_err(from_mqttbytes)? {
                v4::Packet::Connect(c) => Ok(connect_from_v4(c, ProtocolVersion::V31)),
                _ => Err(DecodeError::Malformed("CONNECT")),
            }
        }
        (b"MQTT", 5) => {
            let mut frame = frame;
            match v5::read(&mut frame, usize::MAX).map_err(from_mqttbytes)? {
                v5::Packet::Connect(c) => connect_from_v5(c),
                _ => Err(DecodeError::Malformed("CONNECT")),
            }
        }
        (b"MQTT", l) | (b"MQIsdp", l) => Err(DecodeError::UnsupportedProtocol(l)),
        _ => Err(DecodeError::UnsupportedProtocol(0)),
    }
}

fn connect_from_v4(c: v4::Connect, version: ProtocolVersion) -> Connect {
    let (username, password) = match c.login {
        Some(l) => (Some(l.username), Some(Bytes::from(l.password.into_bytes()))),
        None => (None, None),
    };
    Connect {
        version,
        client_id: c.client_id,
        clean_start: c.clean_session,
        keep_alive: c.keep_alive,
        username,
        password,
        will: c.last_will.map(|w| Will {
            topic: w.topic,
            payload: w.message,
            qos: w.qos as u8,
            retain: w.retain,
            delay_secs: 0,
            props: PublishProps::default(),
        }),
        session_expiry: None,
        receive_maximum: None,
        maximum_packet_size: None,
        topic_alias_maximum: None,
        request_problem_info: None,
        request_response_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
    }
}

fn connect_from_v5(c: v5::Connect) -> Result<Connect, DecodeError> {
    let (username, password) = match c.login {
        Some(l) => (Some(l.username), Some(Bytes::from(l.password.into_bytes()))),
        None => (None, None),
    };
    let p = c.properties.unwrap_or(v5::ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    });
    if p.receive_maximum == Some(0) {
        return Err(DecodeError::Protocol("Receive Maximum 0"));
    }
    if p.max_packet_size == Some(0) {
        return Err(DecodeError::Protocol("Maximum Packet Size 0"));
    }
    let will = c.last_will.map(|w| {
        let (delay_secs, props) = match w.properties {
            Some(wp) => (
                wp.delay_interval.unwrap_or(0),
                PublishProps {
                    payload_format_indicator: wp.payload_format_indicator,
                    message_expiry_interval: wp.message_expiry_interval,
                    topic_alias: None,
                    response_topic: wp.response_topic,
                    correlation_data: wp.correlation_data,
                    user_properties: wp.user_properties,
                    subscription_ids: Vec::new(),
                    content_type: wp.content_type,
                },
            ),
            None => (0, PublishProps::default()),
        };
        Will {
            topic: w.topic,
            payload: w.message,
            qos: w.qos as u8,
            retain: w.retain,
            delay_secs,
            props,
        }
    });
    Ok(Connect {
        version: ProtocolVersion::V5,
        client_id: c.client_id,
        clean_start: c.clean_session,
        keep_alive: c.keep_alive,
        username,
        password,
        will,
        session_expiry: p.session_expiry_interval,
        receive_maximum: p.receive_maximum,
        maximum_packet_size: p.max_packet_size,
        topic_alias_maximum: p.topic_alias_max,
        request_problem_info: p.request_problem_info,
        request_response_info: p.request_response_info,
        user_properties: p.user_properties,
        authentication_method: p.authentication_method,
    })
}

fn decode_after_connect(
    version: ProtocolVersion,
    mut frame: BytesMut,
    fh: FixedHeader,
) -> Result<Incoming, DecodeError> {
    let packet_type = fh.byte1 >> 4;
    if packet_type == 8 {
        check_subscription_options(version, &frame, fh)?;
    }
    if !version.is_v5() {
        if packet_type == 15 {
            return Err(DecodeError::Malformed("AUTH is not an MQTT 3.1.1 packet"));
        }
        return match v4::read(&mut frame, usize::MAX).map_err(from_mqttbytes)? {
            v4::Packet::Publish(p) => Ok(Incoming::Publish(Publish {
                dup: p.dup,
                qos: p.qos as u8,
                retain: p.retain,
                topic: p.topic,
                pkid: p.pkid,
                payload: p.payload,
                props: PublishProps::default(),
            })),
            v4::Packet::PubAck(p) => Ok(Incoming::PubAck {
                pkid: p.pkid,
                reason: 0,
            }),
            v4::Packet::PubRec(p) => Ok(Incoming::PubRec {
                pkid: p.pkid,
                reason: 0,
            }),
            v4::Packet::PubRel(p) => Ok(Incoming::PubRel { pkid: p.pkid }),
            v4::Packet::PubComp(p) => Ok(Incoming::PubComp { pkid: p.pkid }),
            v4::Packet::Subscribe(s) => {
                check_list_packet(s.pkid, s.filters.len(), "SUBSCRIBE without filters")?;
                Ok(Incoming::Subscribe(Subscribe {
                    pkid: s.pkid,
                    filters: s
                        .filters
                        .into_iter()
                        .map(|f| SubscribeFilter {
                            filter: f.path,
                            qos: f.qos as u8,
                            no_local: false,
                            retain_as_published: false,
                            retain_handling: 0,
                        })
                        .collect(),
                    subscription_id: None,
                    user_properties: Vec::new(),
                }))
            }
            v4::Packet::Unsubscribe(u) => {
                check_list_packet(u.pkid, u.topics.len(), "UNSUBSCRIBE without filters")?;
                Ok(Incoming::Unsubscribe(Unsubscribe {
                    pkid: u.pkid,
                    filters: u.topics,
                }))
            }
            v4::Packet::PingReq => Ok(Incoming::PingReq),
            v4::Packet::Disconnect => Ok(Incoming::Disconnect(Disconnect {
                reason: 0,
                session_expiry: None,
            })),
            _ => Err(DecodeError::Protocol("unexpected packet type")),
        };
    }
    match packet_type {
        // mqttbytes 0.6 refuses a body-less v5 DISCONNECT, which means "normal disconnection".
        14 if fh.remaining_len == 0 => {
            return Ok(Incoming::Disconnect(Disconnect {
                reason: 0,
                session_expiry: None,
            }))
        }
        15 => return Ok(Incoming::Auth),
        _ => {}
    }
    match v5::read(&mut frame, usize::MAX).map_err(from_mqttbytes)? {
        v5::Packet::Publish(p) => {
            let props = match p.properties {
                Some(pp) => {
                    if pp.topic_alias == Some(0) {
                        return Err(DecodeError::Protocol("topic alias 0"));
                    }
                    if !pp.subscription_identifiers.is_empty() {
                        return Err(DecodeError::Protocol(
                            "subscription identifier in client PUBLISH",
                        ));
                    }
                    PublishProps {
                        payload_format_indicator: pp.payload_format_indicator,
                        message_expiry_interval: pp.message_expiry_interval,
                        topic_alias: pp.topic_alias,
                        response_topic: pp.response_topic,
                        correlation_data: pp.correlation_data,
                        user_properties: pp.user_properties,
                        subscription_ids: Vec::new(),
                        content_type: pp.content_type,
                    }
                }
                None => PublishProps::default(),
            };
            Ok(Incoming::Publish(Publish {
                dup: p.dup,
                qos: p.qos as u8,
                retain: p.retain,
                topic: p.topic,
                pkid: p.pkid,
                payload: p.payload,
                props,
            }))
        }
        v5::Packet::PubAck(p) => Ok(Incoming::PubAck {
            pkid: p.pkid,
            reason: p.reason as u8,
        }),
        v5::Packet::PubRec(p) => Ok(Incoming::PubRec {
            pkid: p.pkid,
            reason: p.reason as u8,
        }),
        v5::Packet::PubRel(p) => Ok(Incoming::PubRel { pkid: p.pkid }),
        v5::Packet::PubComp(p) => Ok(Incoming::PubComp { pkid: p.pkid }),
        v5::Packet::Subscribe(s) => {
            check_list_packet(s.pkid, s.filters.len(), "SUBSCRIBE without filters")?;
            let (subscription_id, user_properties) = match s.properties {
                Some(p) => {
                    let id = match p.id {
                        Some(0) => return Err(DecodeError::Protocol("subscription identifier 0")),
                        Some(id) if id > 268_435_455 => {
                            return Err(DecodeError::Malformed("subscription identifier too large"))
                        }
                        Some(id) => Some(id as u32),
                        None => None,
                    };
                    (id, p.user_properties)
                }
                None => (None, Vec::new()),
            };
            Ok(Incoming::Subscribe(Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| SubscribeFilter {
                        filter: f.path,
                        qos: f.qos as u8,
                        no_local: f.nolocal,
                        retain_as_published: f.preserve_retain,
                        retain_handling: match f.retain_forward_rule {
                            v5::RetainForwardRule::OnEverySubscribe => 0,
                            v5::RetainForwardRule::OnNewSubscribe => 1,
                            v5::RetainForwardRule::Never => 2,
                        },
                    })
                    .collect(),
                subscription_id,
                user_properties,
            }))
        }
        v5::Packet::Unsubscribe(u) => {
            check_list_packet(u.pkid, u.filters.len(), "UNSUBSCRIBE without filters")?;
            Ok(Incoming::Unsubscribe(Unsubscribe {
                pkid: u.pkid,
                filters: u.filters,
            }))
        }
        v5::Packet::PingReq => Ok(Incoming::PingReq),
        v5::Packet::Disconnect(d) => Ok(Incoming::Disconnect(Disconnect {
            reason: d.reason_code as u8,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        })),
        _ => Err(DecodeError::Protocol("unexpected packet type")),
    }
}

/// Reserved bits of each SUBSCRIBE option byte must be 0 (3.1.1: bits 2-7, MQTT-3.8.3-4;
/// 5.0: bits 6-7, MQTT-3.8.3-5); mqttbytes ignores them. Walks the raw payload; any length
/// problem is left to mqttbytes, which reports it as malformed.
fn check_subscription_options(
    version: ProtocolVersion,
    frame: &[u8],
    fh: FixedHeader,
) -> Result<(), DecodeError> {
    let reserved: u8 = if version.is_v5() {
        0b1100_0000
    } else {
        0b1111_1100
    };
    let Some(mut rest) = frame.get(fh.header_len + 2..) else {
        return Ok(());
    };
    if version.is_v5() {
        // Skip the properties: a variable byte integer length, then that many bytes.
        let mut len = 0usize;
        let mut used = 0usize;
        for (i, b) in rest.iter().take(4).enumerate() {
            len |= ((b & 0x7f) as usize) << (7 * i);
            used = i + 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let Some(r) = rest.get(used + len..) else {
            return Ok(());
        };
        rest = r;
    }
    while let [hi, lo, tail @ ..] = rest {
        let n = u16::from_be_bytes([*hi, *lo]) as usize;
        let Some(&options) = tail.get(n) else {
            return Ok(());
        };
        if options & reserved != 0 {
            return Err(DecodeError::Malformed(
                "reserved bits set in subscription options",
            ));
        }
        let Some(r) = tail.get(n + 1..) else {
            return Ok(());
        };
        rest = r;
    }
    Ok(())
}

/// SUBSCRIBE and UNSUBSCRIBE carry at least one filter (MQTT-3.8.3-3, 3.10.3-2) and a
/// non-zero packet id (MQTT-2.2.1-3; mqttbytes checks the id for PUBLISH only).
fn check_list_packet(pkid: u16, filters: usize, empty: &'static str) -> Result<(), DecodeError> {
    if filters == 0 {
        return Err(DecodeError::Protocol(empty));
    }
    if pkid == 0 {
        return Err(DecodeError::Malformed("packet identifier 0"));
    }
    Ok(())
}

/// Writes an MQTT variable byte integer.
pub fn put_varint(buf: &mut BytesMut, mut value: u32) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// Wraps a packet body in its fixed header (for tests, tools and the load generator).
pub fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut buf = BytesMut::with_capacity(body.len() + 5);
    buf.put_u8(byte1);
    put_varint(&mut buf, body.len() as u32);
    buf.put_slice(body);
    buf.to_vec()
}

/// Bytes an MQTT variable byte integer takes.
pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}
