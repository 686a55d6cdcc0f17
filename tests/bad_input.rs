//! Bad input and limits: every malformed or forbidden packet closes only the connection that
//! sent it (with the MQTT 5 reason the spec gives), is counted in
//! `fleetmq_protocol_errors_total{reason=...}`, and leaves the node, an already-connected
//! subscriber and a stored persistent session untouched. Each test runs its own node.
mod common;
mod support;

use std::io::Write;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use support::*;

const ANY_V5_MALFORMED: &[u8] = &[0x81];

/// A node plus the bystanders that bad input must not disturb.
struct Fixture {
    node: Node,
    /// Connected for the whole test, subscribed to `health/#`.
    healthy: Client,
    /// Long-lived publisher for health probes.
    probe: Client,
    probes: u32,
    cases: u32,
}

const STORED: usize = 3;

impl Fixture {
    fn new(args: &[&str]) -> Fixture {
        let node = Node::start_with(args);
        let (mut stored, _) = Client::persistent(node.mqtt, "stored", false);
        stored.sub_ok("stored/#", 1);
        stored.disconnect();
        let mut healthy = Client::clean(node.mqtt, "healthy", true);
        healthy.sub_ok("health/#", 1);
        let mut probe = Client::clean(node.mqtt, "probe", false);
        probe.publish_many("stored/x", &payloads("st", STORED), 1);
        Fixture {
            node,
            healthy,
            probe,
            probes: 0,
            cases: 0,
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.node.mqtt
    }

    /// The node runs and the connected subscriber still gets a fresh message.
    fn check_healthy(&mut self, case: &str) {
        assert!(self.node.is_running(), "{case}: node died");
        self.probes += 1;
        let payload = format!("probe-{}", self.probes);
        self.probe.publish("health/p", payload.as_bytes(), 1);
        let got = self.healthy.receive_acking(1, 10);
        assert_eq!(
            got.first().map(|m| m.text()),
            Some(payload),
            "{case}: healthy subscriber did not get the probe"
        );
    }

    /// The stored persistent session still holds exactly its messages.
    fn check_stored(&mut self) {
        let (mut c, present) = Client::persistent(self.addr(), "stored", false);
        assert!(present, "stored session lost");
        let got = c.receive_acking(STORED + 1, 3);
        assert_eq!(
            got.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(),
            payloads("st", STORED),
            "stored session's messages changed"
        );
    }

    fn errors(&self, labels: &[&str]) -> f64 {
        let text = self.node.metrics();
        labels
            .iter()
            .map(|l| {
                metric_sum(
                    &text,
                    &format!("fleetmq_protocol_errors_total{{reason=\"{l}\"}}"),
                )
            })
            .sum()
    }

    /// Opens a connection (after a CONNECT of `version` when given), sends `bytes` and checks
    /// the connection is closed: with a DISCONNECT whose reason is in `reasons` on MQTT 5,
    /// silently on 3.1.1 and before CONNECT (then `reply`, if given, must be all that came).
    fn reject(
        &mut self,
        case: &str,
        version: Option<bool>,
        bytes: &[u8],
        reasons: &[u8],
        labels: &[&str],
        reply: Option<&[u8]>,
    ) {
        self.cases += 1;
        let before = self.errors(labels);
        let mut raw = Raw::connect(self.addr());
        if let Some(v5) = version {
            raw.send(&connect_packet(
                &format!("bad-{}", self.cases),
                v5,
                true,
                None,
            ));
            let ack = read_packet(&mut raw, Duration::from_secs(5)).expect("CONNACK");
            assert_eq!((ack.kind(), ack.body[1]), (CONNACK, 0), "{case}: CONNACK");
        }
        let _ = raw.s.write_all(bytes);
        let started = Instant::now();
        if version == Some(true) {
            let d = read_packet(&mut raw, Duration::from_secs(5))
                .unwrap_or_else(|| panic!("{case}: no DISCONNECT"));
            let reason = disconnect_reason(&d);
            assert!(
                reason.is_some_and(|r| reasons.contains(&r)),
                "{case}: wanted DISCONNECT with one of {reasons:02x?}, got {d:?}"
            );
        }
        raw.s
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (closed, rest) = raw.closed();
        assert!(closed, "{case}: connection not closed");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{case}: closed only after {:?}",
            started.elapsed()
        );
        match (version, reply) {
            (_, Some(r)) => assert_eq!(rest, r, "{case}: reply before close"),
            (Some(false), None) | (None, None) => {
                assert!(rest.is_empty(), "{case}: unexpected bytes {rest:02x?}")
            }
            (Some(true), None) => assert!(rest.is_empty(), "{case}: bytes after DISCONNECT"),
        }
        wait_until(
            5,
            &format!("{case}: protocol error metric {labels:?}"),
            || self.errors(labels) > before,
        );
        self.check_healthy(case);
    }

    /// Same case on 3.1.1 (silent close) and 5.0 (DISCONNECT with `reasons`).
    fn reject_both(&mut self, case: &str, v4: &[u8], v5: &[u8], reasons: &[u8], labels: &[&str]) {
        self.reject(
            &format!("{case} (3.1.1)"),
            Some(false),
            v4,
            &[],
            labels,
            None,
        );
        self.reject(
            &format!("{case} (5.0)"),
            Some(true),
            v5,
            reasons,
            labels,
            None,
        );
    }
}

fn str_bytes(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

#[test]
fn malformed_packets_close_only_the_sender() {
    let mut f = Fixture::new(&[]);
    let m = &["malformed"];

    // Remaining length with a fifth byte.
    let five = [0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
    f.reject_both(
        "remaining length of 5 bytes",
        &five,
        &five,
        ANY_V5_MALFORMED,
        m,
    );

    let mut q3 = str_bytes(b"a/b");
    q3.extend_from_slice(&[0, 1, b'x']);
    let q3v5 = {
        let mut b = str_bytes(b"a/b");
        b.extend_from_slice(&[0, 1, 0, b'x']);
        b
    };
    f.reject_both(
        "PUBLISH QoS 3",
        &frame(0x36, &q3),
        &frame(0x36, &q3v5),
        ANY_V5_MALFORMED,
        m,
    );

    let mut s4 = subscribe_packet(false, 1, b"a/b", 0);
    s4[0] = 0x80;
    let mut s5 = subscribe_packet(true, 1, b"a/b", 0);
    s5[0] = 0x80;
    f.reject_both(
        "SUBSCRIBE reserved flags 0000",
        &s4,
        &s5,
        ANY_V5_MALFORMED,
        m,
    );

    f.reject_both(
        "invalid UTF-8 in topic",
        &publish_packet(false, b"a/\xC3\x28", 0, 0, false, b"x"),
        &publish_packet(true, b"a/\xC3\x28", 0, 0, false, b"x"),
        ANY_V5_MALFORMED,
        m,
    );
    f.reject_both(
        "invalid UTF-8 in SUBSCRIBE filter",
        &subscribe_packet(false, 1, b"\xFF/#", 0),
        &subscribe_packet(true, 1, b"\xFF/#", 0),
        ANY_V5_MALFORMED,
        m,
    );
    // MQTT-1.5.4-2: a string containing U+0000 makes the packet malformed.
    f.reject_both(
        "NUL in topic",
        &publish_packet(false, b"a/\0b", 0, 0, false, b"x"),
        &publish_packet(true, b"a/\0b", 0, 0, false, b"x"),
        ANY_V5_MALFORMED,
        m,
    );
    f.reject_both(
        "NUL in SUBSCRIBE filter",
        &subscribe_packet(false, 1, b"a/\0/#", 0),
        &subscribe_packet(true, 1, b"a/\0/#", 0),
        ANY_V5_MALFORMED,
        m,
    );

    // v5 property id that does not exist (0x7F), and one not allowed in PUBLISH (0x11).
    for (case, props) in [
        ("unknown v5 property id", vec![2u8, 0x7F, 0]),
        (
            "session expiry property in PUBLISH",
            vec![5, 0x11, 0, 0, 0, 1],
        ),
    ] {
        let mut b = str_bytes(b"a/b");
        b.extend_from_slice(&props);
        b.push(b'x');
        f.reject(
            case,
            Some(true),
            &frame(0x30, &b),
            ANY_V5_MALFORMED,
            m,
            None,
        );
    }

    // Truncated strings: the length prefix runs past the end of the packet.
    let trunc = frame(0x30, &[0, 50, b'a', b'b', b'c']);
    f.reject_both(
        "truncated topic length",
        &trunc,
        &trunc,
        ANY_V5_MALFORMED,
        m,
    );
    f.reject_both(
        "truncated SUBSCRIBE filter",
        &frame(0x82, &[0, 1, 0, 40, b'a', 0]),
        &frame(0x82, &[0, 1, 0, 0, 40, b'a', 0]),
        ANY_V5_MALFORMED,
        m,
    );
    // CONNECT whose client id length runs past the packet: closed before any session.
    let mut c = connect_packet("abc", true, true, None);
    let n = c.len();
    c[n - 5] = 0;
    c[n - 4] = 90;
    f.reject("truncated CONNECT client id", None, &c, &[], m, None);
    // v5 CONNECT with a property id that does not exist.
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 0, 2, 0x7F, 0];
    body.extend_from_slice(&str_bytes(b"badprop"));
    f.reject(
        "unknown property in CONNECT",
        None,
        &frame(0x10, &body),
        &[],
        m,
        None,
    );

    f.check_stored();
}

#[test]
fn protocol_violations_close_only_the_sender() {
    let mut f = Fixture::new(&[]);

    f.reject(
        "first packet PINGREQ",
        None,
        &[0xC0, 0x00],
        &[],
        &["first_packet_not_connect"],
        None,
    );
    // An HTTP request on the MQTT port: must be refused from its first byte, not after the
    // connect timeout (10 s here) while waiting for a "body" of 69 bytes.
    f.reject(
        "garbage before CONNECT",
        None,
        b"GET / HTTP/1.1\r\n\r\n",
        &[],
        &["first_packet_not_connect", "malformed", "protocol_error"],
        None,
    );
    f.reject_both(
        "second CONNECT",
        &connect_packet("again", false, true, None),
        &connect_packet("again", true, true, None),
        &[0x82],
        &["protocol_error"],
    );
    // Level 6 does not exist: CONNACK "unacceptable protocol version" (0x01), then close.
    let mut c6 = connect_packet("lvl6", false, true, None);
    c6[8] = 6;
    f.reject(
        "protocol level 6",
        None,
        &c6,
        &[],
        &["unsupported_protocol"],
        Some(&[0x20, 0x02, 0x00, 0x01]),
    );
    for topic in [&b"a/+/b"[..], b"a/#", b"+"] {
        f.reject_both(
            &format!(
                "wildcard in PUBLISH topic {}",
                String::from_utf8_lossy(topic)
            ),
            &publish_packet(false, topic, 1, 1, false, b"x"),
            &publish_packet(true, topic, 1, 1, false, b"x"),
            &[0x90],
            &["topic_name_invalid"],
        );
    }
    f.reject_both(
        "DUP on QoS 0 PUBLISH",
        &publish_packet(false, b"a/b", 0, 0, true, b"x"),
        &publish_packet(true, b"a/b", 0, 0, true, b"x"),
        &[0x81, 0x82],
        &["malformed", "protocol_error"],
    );
    f.reject_both(
        "packet id 0 on QoS 1 PUBLISH",
        &publish_packet(false, b"a/b", 1, 0, false, b"x"),
        &publish_packet(true, b"a/b", 1, 0, false, b"x"),
        &[0x81, 0x82],
        &["malformed", "protocol_error"],
    );
    f.reject_both(
        "packet id 0 on SUBSCRIBE",
        &subscribe_packet(false, 0, b"a/b", 0),
        &subscribe_packet(true, 0, b"a/b", 0),
        &[0x81, 0x82],
        &["malformed", "protocol_error"],
    );
    let mut unsub = vec![0xA2, 0x05, 0x00, 0x00];
    unsub.extend_from_slice(&str_bytes(b"a"));
    let mut unsub5 = vec![0xA2, 0x06, 0x00, 0x00, 0x00];
    unsub5.extend_from_slice(&str_bytes(b"a"));
    f.reject_both(
        "packet id 0 on UNSUBSCRIBE",
        &unsub,
        &unsub5,
        &[0x81, 0x82],
        &["malformed", "protocol_error"],
    );
    f.reject_both(
        "PUBREL with reserved flags 0000",
        &[0x60, 0x02, 0x00, 0x01],
        &[0x60, 0x02, 0x00, 0x01],
        ANY_V5_MALFORMED,
        &["malformed"],
    );
    // AUTH without an authentication method in CONNECT (MQTT 5: protocol error); not a
    // 3.1.1 packet at all.
    f.reject(
        "AUTH (5.0)",
        Some(true),
        &[0xF0, 0x00],
        &[0x82],
        &["auth_unsupported", "protocol_error"],
        None,
    );
    f.reject(
        "AUTH (3.1.1)",
        Some(false),
        &[0xF0, 0x00],
        &[],
        &["malformed", "protocol_error"],
        None,
    );
    // A packet only a server sends.
    f.reject_both(
        "CONNACK from client",
        &[0x20, 0x02, 0x00, 0x00],
        &[0x20, 0x03, 0x00, 0x00, 0x00],
        &[0x82],
        &["protocol_error"],
    );
    // Garbage after CONNECT: reserved packet type 0, and text whose first byte reads as a
    // PUBREL with bad flags and a remaining length larger than what follows.
    f.reject_both(
        "packet type 0",
        &[0x00, 0x00],
        &[0x00, 0x00],
        ANY_V5_MALFORMED,
        &["malformed"],
    );
    f.reject_both(
        "text after CONNECT",
        b"hello world\r\n",
        b"hello world\r\n",
        &[0x81, 0x82],
        &["malformed", "protocol_error"],
    );
    f.check_stored();
}

#[test]
fn connection_without_connect_is_closed_after_connect_timeout() {
    let mut f = Fixture::new(&["--connect-timeout-secs", "1"]);
    let before = f.errors(&["connect_timeout"]);
    let mut idle = Raw::connect(f.addr());
    let t = Instant::now();
    let (closed, rest) = idle.closed();
    assert!(closed, "idle connection not closed");
    assert!(rest.is_empty());
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "closed after {took:?}, connect timeout is 1 s"
    );
    wait_until(5, "connect_timeout metric", || {
        f.errors(&["connect_timeout"]) > before
    });
    // A half-sent CONNECT does not extend the deadline either.
    let c = connect_packet("slow", false, true, None);
    let mut slow = Raw::connect(f.addr());
    slow.send(&c[..5]);
    let t = Instant::now();
    assert!(slow.closed().0, "partial CONNECT not closed");
    assert!(t.elapsed() < Duration::from_secs(4));
    f.check_healthy("connect timeout");
    f.check_stored();
}

#[test]
fn packet_larger_than_max_packet_size_is_refused_from_its_header() {
    let mut f = Fixture::new(&["--max-packet-size", "1024"]);
    // Only the fixed header and a few bytes of a 100 000-byte PUBLISH are sent: the refusal
    // must come without waiting for the body.
    let mut head = vec![0x30, 0xA0, 0x8D, 0x06]; // remaining length 100 000
    head.extend_from_slice(&str_bytes(b"big"));
    f.reject_both(
        "oversized PUBLISH header",
        &head,
        &head,
        &[0x95],
        &["packet_too_large"],
    );
    // A whole packet of 1025 bytes.
    let over = |v5: bool| {
        let overhead = publish_packet(v5, b"big/x", 1, 1, false, b"").len() + 1; // +1 varint byte
        publish_packet(v5, b"big/x", 1, 1, false, &vec![b'x'; 1025 - overhead])
    };
    assert_eq!(over(false).len(), 1025);
    assert_eq!(over(true).len(), 1025);
    f.reject_both(
        "1025-byte PUBLISH",
        &over(false),
        &over(true),
        &[0x95],
        &["packet_too_large"],
    );
    // Exactly at the limit is fine.
    let overhead = publish_packet(false, b"health/p", 1, 1, false, b"").len() + 1;
    let payload = vec![b'y'; 1024 - overhead];
    let at = publish_packet(false, b"health/p", 1, 1, false, &payload);
    assert_eq!(at.len(), 1024);
    f.probe.send(&at);
    assert_eq!(f.probe.expect(PUBACK, "1024-byte PUBLISH").pid(), 1);
    let got = f.healthy.receive_acking(1, 10);
    assert_eq!(got.first().map(|m| m.payload.len()), Some(payload.len()));
    f.check_stored();
}

#[test]
fn topic_length_and_level_limits() {
    let mut f = Fixture::new(&["--max-topic-length", "32", "--max-topic-levels", "4"]);
    let long = "t/".to_string() + &"x".repeat(31); // 33 bytes
    let deep = "a/b/c/d/e"; // 5 levels
    for (case, topic) in [("topic too long", long.as_str()), ("too many levels", deep)] {
        f.reject_both(
            &format!("PUBLISH: {case}"),
            &publish_packet(false, topic.as_bytes(), 0, 0, false, b"x"),
            &publish_packet(true, topic.as_bytes(), 0, 0, false, b"x"),
            &[0x90],
            &["topic_name_invalid"],
        );
        for v5 in [false, true] {
            let mut c = Client::clean(f.addr(), &format!("lim-{v5}"), v5);
            let codes = c.subscribe(topic, 1);
            assert_eq!(
                codes,
                vec![if v5 { 0x8F } else { 0x80 }],
                "SUBSCRIBE {case} (v5={v5})"
            );
            // Refusing the filter does not end the connection.
            c.sub_ok("ok/#", 1);
            c.disconnect();
        }
    }
    // At the limits: 32 bytes, 4 levels.
    let at_len = "health/".to_string() + &"z".repeat(25);
    assert_eq!(at_len.len(), 32);
    for topic in [at_len.as_str(), "health/b/c/d"] {
        f.probe.publish(topic, b"edge", 1);
        let got = f.healthy.receive_acking(1, 10);
        assert_eq!(got.first().map(|m| m.topic.as_str()), Some(topic));
    }
    f.check_healthy("topic limits");
    f.check_stored();
}

#[test]
fn receive_maximum_exceeded_disconnects_0x93() {
    let mut f = Fixture::new(&["--receive-maximum", "5"]);
    // CONNACK announces it.
    let mut raw = Raw::connect(f.addr());
    raw.send(&connect_packet("rm", true, true, None));
    let ack = read_packet(&mut raw, Duration::from_secs(5)).unwrap();
    assert!(
        ack.body.windows(3).any(|w| w == [0x21, 0x00, 0x05]),
        "CONNACK lacks Receive Maximum 5: {ack:?}"
    );
    drop(raw);

    // Within the limit, releasing as it goes: fine.
    let mut ok = Client::clean(f.addr(), "rm-ok", true);
    for round in 0..2 {
        let mut out = Vec::new();
        for pid in 1..=5u16 {
            out.extend(publish_packet(true, b"rm/a", 2, pid, false, b"x"));
        }
        ok.send(&out);
        for pid in 1..=5u16 {
            assert_eq!(ok.expect(PUBREC, "PUBREC").pid(), pid, "round {round}");
        }
        for pid in 1..=5u16 {
            ok.send(&ack_packet(PUBREL, pid));
            assert_eq!(ok.expect(PUBCOMP, "PUBCOMP").pid(), pid);
        }
    }

    // Six unreleased QoS 2 PUBLISHes: five PUBRECs, then DISCONNECT 0x93.
    let before = f.errors(&["receive_maximum_exceeded"]);
    let mut c = Client::clean(f.addr(), "rm-bad", true);
    let mut out = Vec::new();
    for pid in 1..=6u16 {
        out.extend(publish_packet(true, b"rm/a", 2, pid, false, b"x"));
    }
    c.send(&out);
    for pid in 1..=5u16 {
        assert_eq!(c.expect(PUBREC, "PUBREC within window").pid(), pid);
    }
    let d = c.recv(Duration::from_secs(5)).expect("DISCONNECT");
    assert_eq!(disconnect_reason(&d), Some(0x93), "{d:?}");
    assert!(c.raw.closed().0);
    wait_until(5, "receive_maximum_exceeded metric", || {
        f.errors(&["receive_maximum_exceeded"]) > before
    });
    f.check_healthy("receive maximum");
    f.check_stored();
}

#[test]
fn queued_messages_are_bounded() {
    let mut f = Fixture::new(&["--max-queued-messages", "10"]);
    for id in ["qb-mem", "qb-dur"] {
        let (mut c, _) = Client::persistent(f.addr(), id, false);
        c.sub_ok("qb/#", 1);
        c.disconnect();
    }
    let before = f
        .node
        .metric("fleetmq_messages_dropped_total{reason=\"queue_full\"}");
    let mut p = Client::clean(f.addr(), "qb-pub", false);
    p.publish_many("qb/x", &payloads("q", 50), 1);
    let dropped = f
        .node
        .metric("fleetmq_messages_dropped_total{reason=\"queue_full\"}")
        - before;
    assert!(
        dropped >= 80.0,
        "queue_full drops: {dropped} (2 sessions × 40)"
    );

    let (mut c, present) = Client::persistent(f.addr(), "qb-mem", false);
    assert!(present);
    let got = c.receive_acking(50, 3);
    assert_eq!(got.len(), 10, "exactly the bound is delivered: {got:?}");
    let mut distinct: Vec<_> = got.iter().map(|m| m.payload.clone()).collect();
    distinct.dedup();
    assert_eq!(distinct.len(), 10);
    drop(c);

    // The dropped ones are gone durably as well.
    sleep(Duration::from_millis(300));
    f.node.kill9();
    f.node.restart();
    let (mut c, present) = Client::persistent(f.addr(), "qb-dur", false);
    assert!(present);
    let got = c.receive_acking(50, 3);
    assert_eq!(got.len(), 10, "after restart: {got:?}");
    let (mut c, _) = Client::persistent(f.addr(), "qb-mem", false);
    let rest = c.drain(Duration::from_millis(500));
    assert!(rest.is_empty(), "acked messages came back: {rest:?}");
    // The fixture's healthy subscriber died with the node; check the stored session only.
    f.check_stored();
}

#[test]
fn connection_limit_refuses_with_quota_exceeded() {
    // healthy + probe are two; one more fills the limit.
    let mut f = Fixture::new(&["--max-connections", "3"]);
    // The fixture's setup connection ("stored") must have left the count.
    sleep(Duration::from_millis(200));
    let third = Client::clean(f.addr(), "third", false);
    let metric = "fleetmq_connects_total{result=\"connection_limit\"}";
    let before = f.node.metric(metric);
    for v5 in [true, false] {
        let mut raw = Raw::connect(f.addr());
        raw.send(&connect_packet(&format!("fourth-{v5}"), v5, true, None));
        let ack = read_packet(&mut raw, Duration::from_secs(5)).expect("CONNACK");
        assert_eq!(ack.kind(), CONNACK);
        assert_eq!(
            ack.body[1],
            if v5 { 0x97 } else { 0x03 },
            "refusal code (v5={v5}): {ack:?}"
        );
        assert_eq!(ack.body[0] & 1, 0, "no session present on refusal");
        assert!(raw.closed().0, "refused connection closed");
    }
    assert!(f.node.metric(metric) >= before + 2.0);
    f.check_healthy("connection limit");
    third.disconnect();
    // A slot frees up once a client leaves.
    let mut joined = None;
    wait_until(5, "a slot after a disconnect", || {
        let mut raw = Raw::connect(f.node.mqtt);
        raw.send(&connect_packet("later", false, true, None));
        match read_packet(&mut raw, Duration::from_secs(5)) {
            Some(a) if a.body[1] == 0 => {
                joined = Some(raw);
                true
            }
            _ => false,
        }
    });
    drop(joined);
    sleep(Duration::from_millis(100));
    f.check_stored();
}

/// xorshift64*: a seeded generator without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One random input: either raw bytes, or a frame with a plausible first byte and a correct
/// remaining length around a random body (to reach the body decoders).
fn random_input(rng: &mut Rng) -> Vec<u8> {
    let len = 1 + rng.below(64) as usize;
    let body: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    if rng.below(2) == 0 {
        return body;
    }
    let byte1 = match rng.below(8) {
        0 => 0x30 | (rng.below(16) as u8 & 0x0b), // PUBLISH, QoS 0..1, any DUP/RETAIN
        1 => 0x34,                                // PUBLISH QoS 2
        2 => 0x82,                                // SUBSCRIBE
        3 => 0xA2,                                // UNSUBSCRIBE
        4 => 0x40 | (rng.below(4) as u8 * 0x10),  // PUBACK..PUBCOMP-ish
        5 => 0xE0,                                // DISCONNECT
        6 => 0x62,                                // PUBREL
        _ => rng.next() as u8,
    };
    frame(byte1, &body)
}

#[test]
fn random_bytes_never_hurt_the_node() {
    let mut f = Fixture::new(&[]);
    let addr = f.addr();
    let before = f.errors(&[
        "malformed",
        "protocol_error",
        "packet_too_large",
        "topic_name_invalid",
        "first_packet_not_connect",
        "auth_unsupported",
        "topic_alias_invalid",
        "topic_alias_unknown",
    ]);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = Rng(0x5EED_0000_0000_0001 + t * 0x9E37_79B9);
                for i in 0..50 {
                    let input = random_input(&mut rng);
                    let mut raw = Raw::connect(addr);
                    let v5 = i % 2 == 0;
                    raw.send(&connect_packet(&format!("fz-{t}-{i}"), v5, true, None));
                    let ack = read_packet(&mut raw, Duration::from_secs(5)).expect("CONNACK");
                    assert_eq!(ack.body[1], 0);
                    let _ = raw.s.write_all(&input);
                    // Either the broker closes, or it waits for more: do not wait long.
                    raw.s
                        .set_read_timeout(Some(Duration::from_millis(150)))
                        .unwrap();
                    let _ = raw.closed();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("fuzz thread");
    }
    assert!(f.node.is_running(), "node died under random input");
    let after = f.errors(&[
        "malformed",
        "protocol_error",
        "packet_too_large",
        "topic_name_invalid",
        "first_packet_not_connect",
        "auth_unsupported",
        "topic_alias_invalid",
        "topic_alias_unknown",
    ]);
    assert!(after > before, "random input was never refused?");
    f.check_healthy("after 200 random inputs");
    f.check_stored();
}
