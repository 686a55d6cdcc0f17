//! Codec micro-benchmarks: decoding an inbound PUBLISH and encoding an outbound one, the two
//! halves of every message the broker moves.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fleetmq_protocol::decode::frame;
use fleetmq_protocol::encode::{encode_publish, OutPublish};
use fleetmq_protocol::{Decoder, ProtocolVersion, PublishProps};

fn connect_v(level: u8) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 30];
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(&[0, 1, b'c']);
    let mut out = vec![0x10, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

fn publishes(level: u8, n: usize, payload: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let topic = b"devices/sensor-0001/temperature";
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic);
        body.extend_from_slice(&((i % 65535 + 1) as u16).to_be_bytes());
        if level == 5 {
            body.push(0);
        }
        body.extend(std::iter::repeat_n(b'x', payload));
        out.extend_from_slice(&frame(0x32, &body));
    }
    out
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_publish_qos1_64B");
    for level in [4u8, 5] {
        let stream = publishes(level, 1000, 64);
        g.throughput(Throughput::Elements(1000));
        g.bench_function(format!("v{level}_x1000"), |b| {
            b.iter_batched(
                || {
                    let mut d = Decoder::new(1 << 20);
                    let mut buf = BytesMut::from(&connect_v(level)[..]);
                    let _ = d.decode(&mut buf);
                    (d, BytesMut::from(&stream[..]))
                },
                |(mut d, mut buf)| {
                    let mut n = 0;
                    while let Ok(Some(_)) = d.decode(&mut buf) {
                        n += 1;
                    }
                    assert_eq!(n, 1000);
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_publish_64B");
    let payload = vec![b'x'; 64];
    let props = PublishProps::default();
    for (name, version) in [("v311", ProtocolVersion::V311), ("v5", ProtocolVersion::V5)] {
        g.throughput(Throughput::Elements(1000));
        g.bench_function(format!("{name}_x1000"), |b| {
            let mut buf = BytesMut::with_capacity(1 << 20);
            b.iter(|| {
                buf.clear();
                for i in 0..1000u16 {
                    let out = OutPublish {
                        topic: "devices/sensor-0001/temperature",
                        payload: &payload,
                        qos: 1,
                        retain: false,
                        dup: false,
                        pkid: i + 1,
                        props: Some(&props),
                        message_expiry: None,
                        subscription_ids: &[],
                        topic_alias: None,
                        alias_only: false,
                    };
                    encode_publish(version, &out, &mut buf);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
