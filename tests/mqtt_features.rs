//! MQTT features end to end against the real binary: QoS levels in both directions, exactly
//! once, retained messages (and their persistence), wills, takeover, overlapping
//! subscriptions, keep-alive enforcement, and the mosquitto command-line clients over MQTT
//! 3.1, 3.1.1 and 5. MQTT 5-only features are in `mqtt_v5.rs`.
mod common;
mod mqtt_util;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mqtt_util::*;
use rumqttc::v5::mqttbytes::v5::Packet as P5;
use rumqttc::QoS as Q4;

fn q4(n: u8) -> Q4 {
    match n {
        0 => Q4::AtMostOnce,
        1 => Q4::AtLeastOnce,
        _ => Q4::ExactlyOnce,
    }
}

// ----- QoS ---------------------------------------------------------------------------------

/// Every publish QoS to every subscription QoS over 3.1.1: delivered at min(pub, granted), with
/// topic and payload intact.
#[tokio::test]
async fn qos_matrix_v311() {
    let node = Node::start();
    let mut subs = Vec::new();
    for s in 0..3u8 {
        let mut c = V4::connect(V4::opts(node.port(), &format!("qm4-sub{s}"))).await;
        let ack = c.sub("qm/#", q4(s)).await;
        assert_eq!(
            ack.return_codes,
            vec![rumqttc::SubscribeReasonCode::Success(q4(s))]
        );
        subs.push(c);
    }
    let publ = V4::connect(V4::opts(node.port(), "qm4-pub")).await;
    for p in 0..3u8 {
        publ.client
            .publish(format!("qm/p{p}"), q4(p), false, format!("payload-{p}"))
            .await
            .unwrap();
    }
    for (s, c) in subs.iter_mut().enumerate() {
        let mut got = HashMap::new();
        for _ in 0..3 {
            let m = c.expect_publish().await;
            got.insert(m.topic.clone(), m);
        }
        for p in 0..3u8 {
            let m = got
                .get(&format!("qm/p{p}"))
                .unwrap_or_else(|| panic!("sub{s} missing qm/p{p}: {got:?}"));
            assert_eq!(m.qos, q4(p.min(s as u8)), "pub {p} sub {s}");
            assert_eq!(&m.payload[..], format!("payload-{p}").as_bytes());
            assert!(!m.retain);
        }
        assert!(c.publish_within(Duration::from_millis(200)).await.is_none());
    }
}

/// The same matrix over MQTT 5 with rumqttc's v5 client.
#[tokio::test]
async fn qos_matrix_v5() {
    let node = Node::start();
    let mut subs = Vec::new();
    for s in 0..3u8 {
        let mut c = V5::connect(V5::opts(node.port(), &format!("qm5-sub{s}"))).await;
        let ack = c.sub("qm/#", qos(s)).await;
        assert_eq!(
            ack.return_codes,
            vec![rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(
                qos(s)
            )]
        );
        subs.push(c);
    }
    let publ = V5::connect(V5::opts(node.port(), "qm5-pub")).await;
    for p in 0..3u8 {
        publ.client
            .publish(format!("qm/p{p}"), qos(p), false, format!("payload-{p}"))
            .await
            .unwrap();
    }
    for (s, c) in subs.iter_mut().enumerate() {
        let mut got = HashMap::new();
        for _ in 0..3 {
            let m = c.publish_within(WAIT).await.expect("publish");
            got.insert(topic(&m), m);
        }
        for p in 0..3u8 {
            let m = got
                .get(&format!("qm/p{p}"))
                .unwrap_or_else(|| panic!("sub{s} missing qm/p{p}: {got:?}"));
            assert_eq!(qn(m.qos), p.min(s as u8), "pub {p} sub {s}");
            assert_eq!(&m.payload[..], format!("payload-{p}").as_bytes());
        }
        assert!(c.publish_within(Duration::from_millis(200)).await.is_none());
    }
}

/// 200 QoS 2 messages over 3.1.1: each delivered exactly once, at QoS 2, in order.
#[tokio::test]
async fn qos2_exactly_once_v311() {
    let node = Node::start();
    let mut sub = V4::connect(V4::opts(node.port(), "eo4-sub")).await;
    sub.sub("eo/t", Q4::ExactlyOnce).await;
    let publ = V4::connect(V4::opts(node.port(), "eo4-pub")).await;
    let n = 200;
    let c = publ.client.clone();
    tokio::spawn(async move {
        for i in 0..n {
            c.publish("eo/t", Q4::ExactlyOnce, false, format!("{i}"))
                .await
                .unwrap();
        }
    });
    let mut got = Vec::new();
    for _ in 0..n {
        let m = sub.expect_publish().await;
        assert_eq!(m.qos, Q4::ExactlyOnce);
        assert!(!m.dup);
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "every message once, in order");
    assert!(
        sub.publish_within(Duration::from_millis(500))
            .await
            .is_none(),
        "no duplicate after the last"
    );
}

/// 200 QoS 2 messages to a scripted MQTT 5 subscriber that acks by hand: exactly once, and
/// the broker's PUBREL follows each PUBREC.
#[tokio::test]
async fn qos2_exactly_once_v5() {
    let node = Node::start();
    let mut sub = C5::connect(node.mqtt, "eo5-sub").await;
    sub.sub("eo/t", qos(2)).await;
    let publ = V5::connect(V5::opts(node.port(), "eo5-pub")).await;
    let n = 200;
    let c = publ.client.clone();
    tokio::spawn(async move {
        for i in 0..n {
            c.publish("eo/t", qos(2), false, format!("{i}"))
                .await
                .unwrap();
        }
    });
    let mut got = Vec::new();
    for _ in 0..n {
        let m = sub.expect_publish().await;
        assert_eq!(qn(m.qos), 2);
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
    sub.assert_silent(Duration::from_millis(500), "after 200 QoS 2 messages")
        .await;
}

// ----- retained ----------------------------------------------------------------------------

/// A retained message reaches a later subscriber with the retain flag; a live copy to an
/// existing subscriber has it cleared (3.1.1); an empty retained payload clears it.
#[tokio::test]
async fn retained_then_cleared_v311() {
    let node = Node::start();
    let mut early = V4::connect(V4::opts(node.port(), "ret-early")).await;
    early.sub("ret/t", Q4::AtLeastOnce).await;
    let publ = V4::connect(V4::opts(node.port(), "ret-pub")).await;
    publ.client
        .publish("ret/t", Q4::AtLeastOnce, true, "kept")
        .await
        .unwrap();
    let live = early.expect_publish().await;
    assert_eq!(&live.payload[..], b"kept");
    assert!(
        !live.retain,
        "live delivery to an existing subscription must not carry retain"
    );

    let mut late = V4::connect(V4::opts(node.port(), "ret-late")).await;
    late.sub("ret/t", Q4::AtLeastOnce).await;
    let m = late.expect_publish().await;
    assert_eq!(m.topic, "ret/t");
    assert_eq!(&m.payload[..], b"kept");
    assert!(m.retain, "retained copy must carry retain");
    assert_eq!(m.qos, Q4::AtLeastOnce);

    publ.client
        .publish("ret/t", Q4::AtLeastOnce, true, "")
        .await
        .unwrap();
    // The clearing message itself is delivered to live subscribers; wait for it so the clear
    // has been applied before the next subscriber comes.
    let clear = early.expect_publish().await;
    assert!(clear.payload.is_empty());
    let mut after = V4::connect(V4::opts(node.port(), "ret-after")).await;
    after.sub("ret/t", Q4::AtLeastOnce).await;
    assert!(
        after
            .publish_within(Duration::from_millis(500))
            .await
            .is_none(),
        "cleared retained message must not be delivered"
    );
}

/// A wildcard subscription gets every matching retained message and only those.
#[tokio::test]
async fn retained_wildcard() {
    let node = Node::start();
    let publ = V4::connect(V4::opts(node.port(), "rw-pub")).await;
    for (t, p) in [
        ("rw/a", "1"),
        ("rw/b/c", "2"),
        ("rw", "3"),
        ("other/x", "4"),
    ] {
        publ.client
            .publish(t, Q4::AtLeastOnce, true, p)
            .await
            .unwrap();
    }
    // A QoS 1 round trip on the same connection orders the retained writes before we subscribe.
    let mut probe = V4::connect(V4::opts(node.port(), "rw-probe")).await;
    probe.sub("rw-done", Q4::AtLeastOnce).await;
    publ.client
        .publish("rw-done", Q4::AtLeastOnce, false, "x")
        .await
        .unwrap();
    probe.expect_publish().await;

    let mut sub = V4::connect(V4::opts(node.port(), "rw-sub")).await;
    sub.sub("rw/#", Q4::AtLeastOnce).await;
    let mut got = Vec::new();
    while let Some(m) = sub.publish_within(Duration::from_millis(700)).await {
        assert!(m.retain);
        got.push((m.topic, String::from_utf8(m.payload.to_vec()).unwrap()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("rw".to_string(), "3".to_string()),
            ("rw/a".to_string(), "1".to_string()),
            ("rw/b/c".to_string(), "2".to_string()),
        ]
    );
}

/// Retained messages are persisted: they survive a kill -9 and restart; a cleared one stays
/// cleared.
#[tokio::test]
async fn retained_survive_restart() {
    let mut node = Node::start();
    {
        let publ = V4::connect(V4::opts(node.port(), "rr-pub")).await;
        let mut probe = V4::connect(V4::opts(node.port(), "rr-probe")).await;
        probe.sub("rr/#", Q4::AtLeastOnce).await;
        for (t, p) in [("rr/keep", "k"), ("rr/gone", "g"), ("rr/gone", "")] {
            publ.client
                .publish(t, Q4::AtLeastOnce, true, p)
                .await
                .unwrap();
            // PUBACK is sent after the retained write is committed; wait for delivery so the
            // publisher has its ack before the kill.
            probe.expect_publish().await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.restart();
    let mut sub = V4::connect(V4::opts(node.port(), "rr-sub")).await;
    sub.sub("rr/#", Q4::AtLeastOnce).await;
    let m = sub.expect_publish().await;
    assert_eq!(m.topic, "rr/keep");
    assert_eq!(&m.payload[..], b"k");
    assert!(m.retain);
    assert!(
        sub.publish_within(Duration::from_millis(500))
            .await
            .is_none(),
        "a cleared retained message came back after restart"
    );
}

// ----- wills -------------------------------------------------------------------------------

fn will_opts(port: u16, id: &str, topic: &str, payload: &str) -> rumqttc::MqttOptions {
    let mut o = V4::opts(port, id);
    o.set_last_will(rumqttc::LastWill::new(
        topic,
        payload,
        Q4::AtLeastOnce,
        false,
    ));
    o
}

/// A client whose TCP connection drops without DISCONNECT has its will published.
#[tokio::test]
async fn will_on_abnormal_disconnect_v311() {
    let node = Node::start();
    let mut watcher = V4::connect(V4::opts(node.port(), "w-watch")).await;
    watcher.sub("will/#", Q4::AtLeastOnce).await;
    let dying = V4::connect(will_opts(node.port(), "w-dying", "will/dying", "gone")).await;
    // Dropping the event loop closes the socket with no DISCONNECT.
    dying.task.abort();
    let m = watcher.expect_publish().await;
    assert_eq!(m.topic, "will/dying");
    assert_eq!(&m.payload[..], b"gone");
    assert_eq!(m.qos, Q4::AtLeastOnce);
}

/// A raw 3.1.1 CONNECT with a will; the socket is shut down without DISCONNECT.
#[test]
fn will_on_socket_shutdown_raw() {
    let node = Node::start();
    let mut watcher = Raw::connect(node.mqtt);
    watcher.send(&connect_v311("rw-watch", true, 30));
    assert_eq!(watcher.read_n(4), [0x20, 2, 0, 0]);
    // SUBSCRIBE pid 1, "will/raw" QoS 0.
    let mut sub = vec![0, 1, 0, 8];
    sub.extend_from_slice(b"will/raw");
    sub.push(0);
    watcher.send(&frame(0x82, &sub));
    assert_eq!(watcher.read_n(5), [0x90, 3, 0, 1, 0]);

    let mut dying = Raw::connect(node.mqtt);
    // CONNECT 3.1.1, flags: clean + will flag, will QoS 0.
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x06, 0, 30];
    for s in ["rw-dying", "will/raw", "bye"] {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    dying.send(&frame(0x10, &body));
    assert_eq!(dying.read_n(4), [0x20, 2, 0, 0]);
    dying.s.shutdown(std::net::Shutdown::Both).unwrap();

    // PUBLISH QoS 0: 0x30, len, topic, payload.
    let mut want = vec![0, 8];
    want.extend_from_slice(b"will/raw");
    want.extend_from_slice(b"bye");
    assert_eq!(watcher.read_n(2 + want.len()), frame(0x30, &want));
}

/// A clean DISCONNECT discards the will.
#[tokio::test]
async fn no_will_on_clean_disconnect() {
    let node = Node::start();
    let mut watcher = V4::connect(V4::opts(node.port(), "nw-watch")).await;
    watcher.sub("will/#", Q4::AtLeastOnce).await;
    let polite = V4::connect(will_opts(node.port(), "nw-polite", "will/polite", "x")).await;
    polite.client.disconnect().await.unwrap();
    // The event loop ends once DISCONNECT is written.
    let _ = tokio::time::timeout(WAIT, polite.task).await;
    assert!(
        watcher
            .publish_within(Duration::from_millis(1000))
            .await
            .is_none(),
        "will published after a clean DISCONNECT"
    );
}

// ----- takeover ----------------------------------------------------------------------------

/// A second 3.1.1 connection with the same client id closes the first, and the first's will
/// is published because its (clean) session does not continue.
#[tokio::test]
async fn takeover_v311_closes_first_and_fires_will() {
    let node = Node::start();
    let mut watcher = V4::connect(V4::opts(node.port(), "to4-watch")).await;
    watcher.sub("will/#", Q4::AtLeastOnce).await;
    let mut first = Raw311::v311(node.mqtt, "to4-dup", Some(("will/to4", "first"))).await;
    let second = V4::connect(V4::opts(node.port(), "to4-dup")).await;
    assert!(
        first.closed_within(Duration::from_secs(5)).await,
        "first connection still open after takeover"
    );
    let m = watcher.expect_publish().await;
    assert_eq!(m.topic, "will/to4");
    assert_eq!(&m.payload[..], b"first");
    // The new connection works.
    second
        .client
        .publish("x", Q4::AtMostOnce, false, "y")
        .await
        .unwrap();
}

/// A tiny raw 3.1.1 client over tokio for the takeover test.
struct Raw311 {
    s: tokio::net::TcpStream,
}

impl Raw311 {
    async fn v311(addr: std::net::SocketAddr, id: &str, will: Option<(&str, &str)>) -> Raw311 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let flags = 0x02 | if will.is_some() { 0x04 | 0x08 } else { 0 };
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 30];
        let mut strs = vec![id];
        if let Some((t, p)) = will {
            strs.push(t);
            strs.push(p);
        }
        for x in strs {
            body.extend_from_slice(&(x.len() as u16).to_be_bytes());
            body.extend_from_slice(x.as_bytes());
        }
        s.write_all(&frame(0x10, &body)).await.unwrap();
        let mut ack = [0u8; 4];
        tokio::time::timeout(WAIT, s.read_exact(&mut ack))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack, [0x20, 2, 0, 0]);
        Raw311 { s }
    }

    async fn closed_within(&mut self, dur: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        let deadline = tokio::time::Instant::now() + dur;
        loop {
            match tokio::time::timeout_at(deadline, self.s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// MQTT 5 takeover: the first connection gets DISCONNECT 0x8E and its will is published.
#[tokio::test]
async fn takeover_v5_disconnect_8e_and_will() {
    let node = Node::start();
    let mut watcher = C5::connect(node.mqtt, "to5-watch").await;
    watcher.sub("will/#", qos(1)).await;
    let mut o = Opts::clean();
    o.will = Some(will5("will/to5", "first", None));
    let (mut first, _) = C5::connect_with(node.mqtt, "to5-dup", o).await;
    let _second = C5::connect(node.mqtt, "to5-dup").await;
    let before_close = first
        .wait_closed(Duration::from_secs(5))
        .await
        .expect("first connection must be closed");
    assert!(
        before_close.iter().any(|p| matches!(p, P5::Disconnect(d)
            if d.reason_code == rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::SessionTakenOver)),
        "expected DISCONNECT 0x8E, got {before_close:?}"
    );
    let raw = first.raw_disconnects.last().expect("raw DISCONNECT");
    assert_eq!((raw[0], raw[2]), (0xE0, 0x8E), "bytes {raw:02x?}");
    let m = watcher.expect_publish().await;
    assert_eq!(topic(&m), "will/to5");
    assert_eq!(&m.payload[..], b"first");
}

// ----- overlapping subscriptions -------------------------------------------------------------

/// `a/+` at QoS 1 and `a/#` at QoS 2 on one client: one copy, at QoS 2 (MQTT-3.3.5-1).
#[tokio::test]
async fn overlapping_subscriptions_one_copy_v311() {
    let node = Node::start();
    let mut sub = V4::connect(V4::opts(node.port(), "ov-sub")).await;
    sub.sub("a/+", Q4::AtLeastOnce).await;
    sub.sub("a/#", Q4::ExactlyOnce).await;
    let publ = V4::connect(V4::opts(node.port(), "ov-pub")).await;
    publ.client
        .publish("a/b", Q4::ExactlyOnce, false, "once")
        .await
        .unwrap();
    let m = sub.expect_publish().await;
    assert_eq!(m.qos, Q4::ExactlyOnce);
    assert_eq!(&m.payload[..], b"once");
    assert!(
        sub.publish_within(Duration::from_millis(500))
            .await
            .is_none(),
        "second copy for overlapping subscriptions"
    );
}

/// The same with MQTT 5 subscription identifiers: the one copy carries both.
#[tokio::test]
async fn overlapping_subscriptions_carry_both_ids_v5() {
    let node = Node::start();
    let mut sub = C5::connect(node.mqtt, "ov5-sub").await;
    sub.subscribe(vec![filter("a/+", qos(1), false, false, 0)], Some(7))
        .await;
    sub.subscribe(vec![filter("a/#", qos(2), false, false, 0)], Some(9))
        .await;
    let mut publ = C5::connect(node.mqtt, "ov5-pub").await;
    publ.publish("a/b", qos(2), false, "once", None).await;
    let m = sub.expect_publish().await;
    assert_eq!(qn(m.qos), 2);
    assert_eq!(sub_ids(&m), vec![7, 9]);
    sub.assert_silent(Duration::from_millis(500), "second copy")
        .await;
    // A topic only one filter matches carries only that filter's id.
    publ.publish("a/b/c", qos(1), false, "deep", None).await;
    let m = sub.expect_publish().await;
    assert_eq!(sub_ids(&m), vec![9]);
    assert_eq!(qn(m.qos), 1);
}

// ----- keep-alive --------------------------------------------------------------------------

/// Keep-alive 1 s and silence: closed after about 1.5 s (3.1.1, no DISCONNECT packet).
#[test]
fn keep_alive_enforced_v311() {
    let node = Node::start();
    let mut c = Raw::connect(node.mqtt);
    let t0 = Instant::now();
    c.send(&connect_v311("ka4", true, 1));
    assert_eq!(c.read_n(4), [0x20, 2, 0, 0]);
    let (closed, bytes) = c.closed();
    let dt = t0.elapsed();
    assert!(closed, "still open after {dt:?}");
    assert!(bytes.is_empty(), "3.1.1 gets no DISCONNECT: {bytes:02x?}");
    assert!(
        dt >= Duration::from_millis(1200) && dt <= Duration::from_millis(3500),
        "closed after {dt:?}, want ~1.5 s"
    );
}

/// MQTT 5: the keep-alive close carries DISCONNECT 0x8D.
#[test]
fn keep_alive_enforced_v5() {
    let node = Node::start();
    let mut c = Raw::connect(node.mqtt);
    let t0 = Instant::now();
    c.send(&connect_v5("ka5", true, 1));
    let ack = c.read_n(2);
    assert_eq!(ack[0], 0x20);
    let rest = c.read_n(ack[1] as usize);
    assert_eq!(rest[1], 0, "CONNACK reason");
    let (closed, bytes) = c.closed();
    let dt = t0.elapsed();
    assert!(closed, "still open after {dt:?}");
    assert!(
        dt >= Duration::from_millis(1200) && dt <= Duration::from_millis(3500),
        "closed after {dt:?}, want ~1.5 s"
    );
    assert!(
        bytes.len() >= 3 && bytes[0] == 0xE0 && bytes[2] == 0x8D,
        "expected DISCONNECT 0x8D, got {bytes:02x?}"
    );
}

/// PINGREQ every 0.5 s keeps a keep-alive-1 connection open for 3 s.
#[test]
fn pings_keep_connection_alive() {
    let node = Node::start();
    let mut c = Raw::connect(node.mqtt);
    c.send(&connect_v311("ka-ping", true, 1));
    assert_eq!(c.read_n(4), [0x20, 2, 0, 0]);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(500));
        c.send(&[0xC0, 0]);
        assert_eq!(c.read_n(2), [0xD0, 0], "PINGRESP after {:?}", t0.elapsed());
    }
}

// ----- mosquitto command-line clients ------------------------------------------------------

fn mosquitto_round_trip(node: &Node, version: &str, tag: &str) {
    let port = node.port().to_string();
    let topic = format!("mosq/{tag}");
    let subs_before = node.metric("fleetmq_subscriptions ");
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", version])
        .args(["-t", &topic, "-q", "1", "-C", "1", "-W", "15", "-v"])
        .args(["-i", &format!("{tag}-sub")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    wait_until(10, "mosquitto_sub subscribed", || {
        node.metric("fleetmq_subscriptions ") > subs_before
    });
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", version])
        .args(["-t", &topic, "-q", "1", "-m", &format!("hello {tag}")])
        .args(["-i", &format!("{tag}-pub")])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success(), "mosquitto_pub -V {version} failed");
    let out = sub.wait_with_output().expect("mosquitto_sub output");
    assert!(
        out.status.success(),
        "mosquitto_sub -V {version}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{topic} hello {tag}")
    );
    // The subscriber's clean session ends after it disconnects; wait so the next round's
    // baseline is not stale.
    wait_until(10, "mosquitto_sub session gone", || {
        node.metric("fleetmq_subscriptions ") <= subs_before
    });
}

/// mosquitto_pub / mosquitto_sub with MQTT 3.1 (`MQIsdp`), 3.1.1 and 5.
#[test]
fn mosquitto_clients_all_versions() {
    if !have("mosquitto_pub") || !have("mosquitto_sub") {
        eprintln!("note: mosquitto clients not installed; skipping (.ci/run installs them)");
        return;
    }
    let node = Node::start();
    mosquitto_round_trip(&node, "mqttv31", "v31");
    mosquitto_round_trip(&node, "mqttv311", "v311");
    mosquitto_round_trip(&node, "mqttv5", "v5");
}

/// mosquitto_pub -r over 3.1 stores a retained message that a 3.1 subscriber then gets.
#[test]
fn mosquitto_v31_retained() {
    if !have("mosquitto_pub") {
        eprintln!("note: mosquitto clients not installed; skipping (.ci/run installs them)");
        return;
    }
    let node = Node::start();
    let port = node.port().to_string();
    let st = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv31",
            "-q",
            "1",
            "-r",
        ])
        .args(["-t", "mosq31/ret", "-m", "stay"])
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv31", "-q", "1"])
        .args(["-t", "mosq31/#", "-C", "1", "-W", "10", "-v"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "mosq31/ret stay"
    );
}

/// `--max-subscriptions` caps one session's subscriptions: the filters past the cap get the
/// SUBACK failure code (3.1.1: 0x80) while the others are granted, and re-subscribing to a
/// filter the session already has is not counted twice.
#[tokio::test]
async fn subscription_quota_per_session() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, SubscribeFilter, SubscribeReasonCode};
    let node = Node::start_with(&["--max-subscriptions", "2"]);
    let (c, mut el) = AsyncClient::new(MqttOptions::new("quota", "127.0.0.1", node.port()), 10);
    c.subscribe_many(vec![
        SubscribeFilter::new("quota/a".into(), Q4::AtLeastOnce),
        SubscribeFilter::new("quota/b".into(), Q4::AtLeastOnce),
        SubscribeFilter::new("quota/c".into(), Q4::AtLeastOnce),
        SubscribeFilter::new("quota/a".into(), Q4::AtMostOnce),
    ])
    .await
    .unwrap();
    let codes = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::SubAck(a)) = el.poll().await.unwrap() {
                return a.return_codes;
            }
        }
    })
    .await
    .expect("SUBACK");
    assert_eq!(
        codes,
        vec![
            SubscribeReasonCode::Success(Q4::AtLeastOnce),
            SubscribeReasonCode::Success(Q4::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(Q4::AtMostOnce),
        ]
    );
}
