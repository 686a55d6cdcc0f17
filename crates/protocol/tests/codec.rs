//! Codec tests over plain bytes: spec examples, the quirks we patch around in mqttbytes, the
//! server encoders checked by decoding their output with mqttbytes, and an arbitrary-bytes
//! property test standing in for a fuzzer (no nightly toolchain for cargo-fuzz here).

use bytes::{Bytes, BytesMut};
use fleetmq_protocol::decode::frame;
use fleetmq_protocol::encode::{self, ConnAckProps, OutPublish};
use fleetmq_protocol::{DecodeError, Decoder, Incoming, ProtocolVersion, PublishProps};
use proptest::prelude::*;

fn connect(name: &[u8], level: u8, flags: u8, props: bool, rest: &[u8]) -> Vec<u8> {
    let mut body = (name.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(name);
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&30u16.to_be_bytes());
    if props {
        body.push(0);
    }
    body.extend_from_slice(rest);
    frame(0x10, &body)
}

fn client_id(id: &str) -> Vec<u8> {
    let mut v = (id.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(id.as_bytes());
    v
}

fn decode_all(dec: &mut Decoder, bytes: &[u8]) -> Result<Vec<Incoming>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(p) = dec.decode(&mut buf)? {
        out.push(p);
    }
    Ok(out)
}

fn connected(version: u8) -> Decoder {
    let mut d = Decoder::new(1 << 20);
    let c = match version {
        5 => connect(b"MQTT", 5, 0x02, true, &client_id("c")),
        _ => connect(b"MQTT", 4, 0x02, false, &client_id("c")),
    };
    decode_all(&mut d, &c).unwrap();
    d
}

#[test]
fn mqtt31_mqisdp_connect_is_accepted() {
    let mut d = Decoder::new(1 << 20);
    let p = decode_all(
        &mut d,
        &connect(b"MQIsdp", 3, 0x02, false, &client_id("old-client")),
    )
    .unwrap();
    match &p[0] {
        Incoming::Connect(c) => {
            assert_eq!(c.version, ProtocolVersion::V31);
            assert_eq!(c.client_id, "old-client");
            assert!(c.clean_start);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.version(), Some(ProtocolVersion::V31));
}

#[test]
fn unsupported_level_is_reported() {
    let mut d = Decoder::new(1 << 20);
    let e = decode_all(&mut d, &connect(b"MQTT", 6, 0x02, false, &client_id("c"))).unwrap_err();
    assert_eq!(e, DecodeError::UnsupportedProtocol(6));
    assert_eq!(e.reason_code(), 0x84);
}

#[test]
fn connect_reserved_flag_is_malformed() {
    let mut d = Decoder::new(1 << 20);
    let e = decode_all(&mut d, &connect(b"MQTT", 4, 0x03, false, &client_id("c"))).unwrap_err();
    assert!(matches!(e, DecodeError::Malformed(_)));
}

#[test]
fn first_packet_must_be_connect() {
    let mut d = Decoder::new(1 << 20);
    assert_eq!(
        decode_all(&mut d, &[0xC0, 0x00]).unwrap_err(),
        DecodeError::FirstPacketNotConnect
    );
}

#[test]
fn second_connect_is_a_protocol_error() {
    let mut d = connected(4);
    let e = decode_all(&mut d, &connect(b"MQTT", 4, 0x02, false, &client_id("c"))).unwrap_err();
    assert!(matches!(e, DecodeError::Protocol(_)));
}

#[test]
fn v5_disconnect_without_body_is_normal() {
    // mqttbytes 0.6 rejects this valid packet; the decoder must not.
    let mut d = connected(5);
    let p = decode_all(&mut d, &[0xE0, 0x00]).unwrap();
    assert!(matches!(&p[0], Incoming::Disconnect(x) if x.reason == 0));
}

#[test]
fn oversized_packet_is_refused_from_the_header_alone() {
    let mut d = Decoder::new(1 << 20);
    decode_all(&mut d, &connect(b"MQTT", 4, 0x02, false, &client_id("c"))).unwrap();
    d.set_max_packet_size(100);
    // Only the fixed header of a 10 000-byte PUBLISH: refused without waiting for the body.
    let e = decode_all(&mut d, &[0x30, 0x90, 0x4E]).unwrap_err();
    assert!(matches!(
        e,
        DecodeError::PacketTooLarge {
            size: 10_003,
            max: 100
        }
    ));
    assert_eq!(e.reason_code(), 0x95);
}

#[test]
fn five_byte_remaining_length_is_malformed() {
    let mut d = connected(4);
    let e = decode_all(&mut d, &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).unwrap_err();
    assert!(matches!(e, DecodeError::Malformed(_)));
}

#[test]
fn reserved_flags_and_qos3_are_malformed() {
    let mut d = connected(4);
    // SUBSCRIBE with flags 0000 instead of 0010.
    assert!(matches!(
        decode_all(&mut d, &frame(0x80, &[0, 1, 0, 1, b'a', 0])),
        Err(DecodeError::Malformed(_))
    ));
    let mut d = connected(4);
    assert!(matches!(
        decode_all(&mut d, &frame(0x36, &[0, 1, b'a', 0, 1])),
        Err(DecodeError::Malformed(_))
    ));
    let mut d = connected(4);
    // DUP on QoS 0.
    assert!(matches!(
        decode_all(&mut d, &frame(0x38, &[0, 1, b'a'])),
        Err(DecodeError::Malformed(_))
    ));
    let mut d = connected(4);
    // CONNACK is never sent by a client.
    assert!(matches!(
        decode_all(&mut d, &[0x20, 0x02, 0, 0]),
        Err(DecodeError::Protocol(_))
    ));
}

#[test]
fn reserved_subscription_option_bits_are_malformed() {
    // 3.1.1: options byte 0x05 (QoS 1 plus reserved bit 2).
    let mut d = connected(4);
    let e = decode_all(&mut d, &frame(0x82, &[0, 1, 0, 1, b'a', 0x05])).unwrap_err();
    assert!(matches!(e, DecodeError::Malformed(_)), "{e:?}");
    // 5.0: no-local (bit 2) is fine, bit 6 is reserved.
    let mut d = connected(5);
    assert!(decode_all(&mut d, &frame(0x82, &[0, 1, 0, 0, 1, b'a', 0x05])).is_ok());
    let mut d = connected(5);
    let e = decode_all(&mut d, &frame(0x82, &[0, 1, 0, 0, 1, b'a', 0x41])).unwrap_err();
    assert!(matches!(e, DecodeError::Malformed(_)), "{e:?}");
    // Second filter of several is checked too.
    let mut d = connected(4);
    let e = decode_all(
        &mut d,
        &frame(0x82, &[0, 1, 0, 1, b'a', 0x01, 0, 1, b'b', 0x80]),
    )
    .unwrap_err();
    assert!(matches!(e, DecodeError::Malformed(_)), "{e:?}");
}

#[test]
fn invalid_utf8_topic_is_malformed() {
    let mut d = connected(4);
    let e = decode_all(&mut d, &frame(0x30, &[0, 2, 0xC3, 0x28, b'x'])).unwrap_err();
    assert!(matches!(e, DecodeError::Malformed(_)));
}

#[test]
fn subscribe_without_filters_is_a_protocol_error() {
    let mut d = connected(4);
    assert!(matches!(
        decode_all(&mut d, &frame(0x82, &[0, 1])),
        Err(DecodeError::Protocol(_) | DecodeError::Malformed(_))
    ));
}

#[test]
fn packets_split_across_reads_decode_once_complete() {
    let mut d = connected(4);
    let publish = frame(0x32, &[0, 3, b'a', b'/', b'b', 0, 9, b'h', b'i']);
    let mut buf = BytesMut::new();
    for (i, byte) in publish.iter().enumerate() {
        buf.extend_from_slice(&[*byte]);
        let r = d.decode(&mut buf).unwrap();
        if i + 1 < publish.len() {
            assert!(r.is_none());
        } else {
            match r {
                Some(Incoming::Publish(p)) => {
                    assert_eq!(
                        (p.topic.as_str(), p.qos, p.pkid, &p.payload[..]),
                        ("a/b", 1, 9, &b"hi"[..])
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

#[test]
fn encoded_v5_publish_decodes_with_mqttbytes() {
    let props = PublishProps {
        payload_format_indicator: Some(1),
        response_topic: Some("resp/x".into()),
        correlation_data: Some(Bytes::from_static(b"cid")),
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("application/json".into()),
        ..PublishProps::default()
    };
    let out = OutPublish {
        topic: "a/b",
        payload: b"{}",
        qos: 2,
        retain: true,
        dup: true,
        pkid: 77,
        props: Some(&props),
        message_expiry: Some(30),
        subscription_ids: &[3, 300],
        topic_alias: Some(5),
        alias_only: false,
    };
    let mut buf = BytesMut::new();
    encode::encode_publish(ProtocolVersion::V5, &out, &mut buf);
    assert_eq!(buf.len(), encode::publish_len(ProtocolVersion::V5, &out));
    match mqttbytes::v5::read(&mut buf, 1 << 20).unwrap() {
        mqttbytes::v5::Packet::Publish(p) => {
            assert_eq!(p.topic, "a/b");
            assert_eq!(p.pkid, 77);
            assert!(p.dup && p.retain);
            let pp = p.properties.unwrap();
            assert_eq!(pp.message_expiry_interval, Some(30));
            assert_eq!(pp.subscription_identifiers, vec![3, 300]);
            assert_eq!(pp.topic_alias, Some(5));
            assert_eq!(pp.content_type.as_deref(), Some("application/json"));
            assert_eq!(pp.correlation_data.as_deref(), Some(&b"cid"[..]));
            assert_eq!(pp.user_properties, vec![("k".to_string(), "v".to_string())]);
            assert_eq!(&p.payload[..], b"{}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn encoded_v311_publish_decodes_with_mqttbytes() {
    let out = OutPublish {
        topic: "t",
        payload: &[7u8; 300],
        qos: 1,
        retain: false,
        dup: false,
        pkid: 1,
        props: None,
        message_expiry: None,
        subscription_ids: &[],
        topic_alias: None,
        alias_only: false,
    };
    let mut buf = BytesMut::new();
    encode::encode_publish(ProtocolVersion::V311, &out, &mut buf);
    match mqttbytes::v4::read(&mut buf, 1 << 20).unwrap() {
        mqttbytes::v4::Packet::Publish(p) => {
            assert_eq!((p.topic.as_str(), p.payload.len(), p.pkid), ("t", 300, 1))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn connack_carries_any_reason_code_and_properties() {
    let mut buf = BytesMut::new();
    let props = ConnAckProps {
        server_keep_alive: Some(5),
        assigned_client_id: Some("gen-1".into()),
        ..Default::default()
    };
    encode::encode_connack(ProtocolVersion::V5, true, 0x00, &props, &mut buf);
    match mqttbytes::v5::read(&mut buf, 1 << 20).unwrap() {
        mqttbytes::v5::Packet::ConnAck(a) => {
            assert!(a.session_present);
            let p = a.properties.unwrap();
            assert_eq!(p.server_keep_alive, Some(5));
            assert_eq!(p.assigned_client_identifier.as_deref(), Some("gen-1"));
        }
        other => panic!("{other:?}"),
    }
    let mut buf = BytesMut::new();
    encode::encode_connack(
        ProtocolVersion::V5,
        false,
        0x97,
        &ConnAckProps::default(),
        &mut buf,
    );
    assert_eq!(buf[3], 0x97, "reason code byte follows the ack flags");
    let mut buf = BytesMut::new();
    encode::encode_connack(
        ProtocolVersion::V311,
        false,
        0x86,
        &ConnAckProps::default(),
        &mut buf,
    );
    assert_eq!(
        &buf[..],
        &[0x20, 2, 0, 4],
        "bad credentials map to 3.1.1 code 4"
    );
}

#[test]
fn disconnect_is_v5_only() {
    let mut buf = BytesMut::new();
    encode::encode_disconnect(ProtocolVersion::V311, 0x8E, None, &mut buf);
    assert!(buf.is_empty());
    encode::encode_disconnect(ProtocolVersion::V5, 0x8E, Some("taken over"), &mut buf);
    match mqttbytes::v5::read(&mut buf, 1 << 20).unwrap() {
        mqttbytes::v5::Packet::Disconnect(d) => {
            assert_eq!(d.reason_code as u8, 0x8E);
            assert_eq!(
                d.properties.unwrap().reason_string.as_deref(),
                Some("taken over")
            );
        }
        other => panic!("{other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The decoder never panics and always makes progress or asks for more bytes, whatever
    /// a peer sends, before and after CONNECT, for every version.
    #[test]
    fn arbitrary_bytes_never_panic(version in prop_oneof![Just(0u8), Just(4u8), Just(5u8)], data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut d = match version { 0 => Decoder::new(4096), v => connected(v) };
        d.set_max_packet_size(4096);
        let mut buf = BytesMut::from(&data[..]);
        for _ in 0..600 {
            let before = buf.len();
            match d.decode(&mut buf) {
                Ok(Some(_)) => prop_assert!(buf.len() < before),
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// Mutations of valid packets (one byte flipped) never panic either.
    #[test]
    fn mutated_valid_packets_never_panic(pos in 0usize..64, byte in any::<u8>(), which in 0usize..4) {
        let valid: Vec<Vec<u8>> = vec![
            frame(0x32, &[0, 3, b'a', b'/', b'b', 0, 9, b'h', b'i']),
            frame(0x82, &[0, 1, 0, 3, b'a', b'/', b'#', 1]),
            frame(0x34, &[0, 1, b'x', 0, 2, 0x0B, 0x26, 0, 1, b'k', 0, 1, b'v', 0x01, 1, b'p']),
            frame(0xE0, &[0x04, 0x05, 0x11, 0, 0, 0, 10]),
        ];
        let mut data = valid[which].clone();
        if pos < data.len() { data[pos] = byte; }
        let mut d = connected(5);
        let mut buf = BytesMut::from(&data[..]);
        let _ = d.decode(&mut buf);
    }
}
