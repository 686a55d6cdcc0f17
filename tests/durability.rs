//! Durability: what a client was promised (PUBACK, PUBREC, CONNACK session-present, SUBACK) holds
//! across reconnects, `kill -9` and restart, and graceful shutdown. Every test runs its own node
//! and drives it with byte-level clients so packet ids, DUP and withheld acks are exact.
mod common;
mod support;

use std::collections::HashMap;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use support::*;

/// Receives until every payload in `want` was seen (acking as a client does), then keeps
/// listening for `linger` to catch duplicates. Bounded by `secs`.
fn collect_all(c: &mut Client, want: &[Vec<u8>], secs: u64, linger: Duration) -> Vec<Msg> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut got: Vec<Msg> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < want.len() && Instant::now() < deadline {
        for m in c.receive_acking(1, 1) {
            seen.insert(m.payload.clone());
            got.push(m);
        }
    }
    let end = Instant::now() + linger;
    while Instant::now() < end {
        let more = c.receive_acking(1, 1);
        if more.is_empty() {
            break;
        }
        got.extend(more);
    }
    got
}

fn count_by_payload(got: &[Msg]) -> HashMap<Vec<u8>, usize> {
    let mut m = HashMap::new();
    for g in got {
        *m.entry(g.payload.clone()).or_insert(0) += 1;
    }
    m
}

/// Both a 3.1.1 (clean_session=false) and a 5.0 (clean_start=false, expiry 3600) session go
/// offline subscribed at `qos`; 200 messages are acknowledged to the publisher; the node is
/// killed with SIGKILL and restarted; both sessions resume and get every message.
fn offline_queue_survives_kill9(qos: u8) {
    const N: usize = 200;
    let mut node = Node::start();
    let filter = format!("dur/q{qos}/#");
    let ids = [
        (false, format!("dur{qos}-v4")),
        (true, format!("dur{qos}-v5")),
    ];
    for (v5, id) in &ids {
        let (mut c, present) = Client::persistent(node.mqtt, id, *v5);
        assert!(!present, "{id}: fresh session must not be present");
        c.sub_ok(&filter, qos);
        c.disconnect();
    }
    let want = payloads("m", N);
    let mut p = Client::clean(node.mqtt, "dur-pub", true);
    p.publish_many(&format!("dur/q{qos}/x"), &want, qos);
    drop(p);

    node.kill9();
    node.restart();

    for (v5, id) in &ids {
        let (mut c, present) = Client::persistent(node.mqtt, id, *v5);
        assert!(present, "{id}: session must survive kill -9");
        let got = collect_all(&mut c, &want, 30, Duration::from_millis(500));
        let counts = count_by_payload(&got);
        let missing: Vec<String> = want
            .iter()
            .filter(|w| !counts.contains_key(*w))
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        assert!(
            missing.is_empty(),
            "{id}: {} of {N} acknowledged messages lost: {missing:?}",
            missing.len()
        );
        assert_eq!(counts.len(), N, "{id}: unexpected payloads");
        // Order of first delivery follows publish order (ordered topic, MQTT 4.6).
        let mut firsts = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for m in &got {
            assert_eq!(m.qos, qos, "{id}: delivered QoS");
            if seen.insert(m.payload.clone()) {
                firsts.push(m.payload.clone());
            } else {
                assert!(
                    qos == 1 && m.dup,
                    "{id}: duplicate {} without DUP or at QoS 2",
                    m.text()
                );
            }
        }
        assert_eq!(firsts, want, "{id}: delivery order");
        if qos == 2 {
            assert!(
                counts.values().all(|&n| n == 1),
                "{id}: QoS 2 delivered more than once"
            );
        }
    }
}

#[test]
fn qos1_offline_queue_survives_kill9_v4_and_v5() {
    offline_queue_survives_kill9(1);
}

#[test]
fn qos2_offline_queue_survives_kill9_exactly_once_v4_and_v5() {
    offline_queue_survives_kill9(2);
}

/// Inbound QoS 2: PUBLISH pid 7 → PUBREC, connection lost before PUBREL, the client resends
/// the PUBLISH with DUP, then PUBREL. The message is routed once. Afterwards pid 7 is free.
fn inbound_qos2_resend(restart: bool, v5: bool) {
    let mut node = Node::start();
    let (mut s, _) = Client::persistent(node.mqtt, "in2-sub", false);
    s.sub_ok("in2/#", 2);
    s.disconnect();

    let (mut p, _) = Client::persistent(node.mqtt, "in2-pub", v5);
    p.send(&publish_packet(v5, b"in2/a", 2, 7, false, b"once"));
    let rec = p.expect(PUBREC, "first PUBREC");
    assert_eq!(rec.pid(), 7);
    drop(p); // no PUBREL

    if restart {
        node.kill9();
        node.restart();
    }

    let (mut p, present) = Client::persistent(node.mqtt, "in2-pub", v5);
    assert!(present, "publisher session present");
    p.send(&publish_packet(v5, b"in2/a", 2, 7, true, b"once"));
    let rec = p.expect(PUBREC, "PUBREC for the resent PUBLISH");
    assert_eq!(rec.pid(), 7);
    if v5 {
        assert!(
            rec.body.get(2).copied().unwrap_or(0) < 0x80,
            "PUBREC must not refuse the retransmission: {rec:?}"
        );
    }
    p.send(&ack_packet(PUBREL, 7));
    let comp = p.expect(PUBCOMP, "PUBCOMP");
    assert_eq!(comp.pid(), 7);
    assert_eq!(comp.body.get(2).copied().unwrap_or(0), 0, "PUBCOMP reason");
    // pid 7 is released: the same id now carries a new message.
    p.send(&publish_packet(v5, b"in2/a", 2, 7, false, b"next"));
    assert_eq!(p.expect(PUBREC, "PUBREC next").pid(), 7);
    p.send(&ack_packet(PUBREL, 7));
    assert_eq!(p.expect(PUBCOMP, "PUBCOMP next").pid(), 7);

    let (mut s, present) = Client::persistent(node.mqtt, "in2-sub", false);
    assert!(present);
    let want = vec![b"once".to_vec(), b"next".to_vec()];
    let got = collect_all(&mut s, &want, 10, Duration::from_millis(700));
    let counts = count_by_payload(&got);
    assert_eq!(counts.get(&b"once"[..]), Some(&1), "once: {got:?}");
    assert_eq!(counts.get(&b"next"[..]), Some(&1), "next: {got:?}");
    assert_eq!(got.len(), 2, "{got:?}");
}

#[test]
fn inbound_qos2_resend_after_reconnect_routes_once() {
    inbound_qos2_resend(false, true);
}

#[test]
fn inbound_qos2_resend_after_kill9_routes_once() {
    inbound_qos2_resend(true, false);
}

/// Outbound QoS 2: the subscriber sends PUBREC and goes away before PUBCOMP. On return the
/// broker continues with PUBREL and never sends the PUBLISH again.
fn outbound_qos2_pubrel_resumes(restart: bool) {
    let mut node = Node::start();
    let (mut s, _) = Client::persistent(node.mqtt, "out2-sub", false);
    s.sub_ok("out2/#", 2);
    let mut p = Client::clean(node.mqtt, "out2-pub", false);
    p.publish("out2/a", b"x", 2);
    let m = parse_publish(&s.expect(PUBLISH, "delivery"), false);
    assert_eq!((m.qos, m.text().as_str()), (2, "x"));
    s.send(&ack_packet(PUBREC, m.pid));
    let _ = s.raw.s.shutdown(std::net::Shutdown::Write);
    // Let the broker take the PUBREC (and commit the release) before the connection goes.
    sleep(Duration::from_millis(300));
    if restart {
        node.kill9();
        node.restart();
    }
    drop(s);

    for round in 0..2 {
        let (mut s, present) = Client::persistent(node.mqtt, "out2-sub", false);
        assert!(present, "round {round}: present");
        let first = s.expect(PUBREL, "PUBREL after reconnect");
        assert_eq!(first.pid(), m.pid, "PUBREL for the same packet id");
        if round == 1 {
            // Withheld PUBCOMP the first time: the PUBREL is repeated, still no PUBLISH.
            s.send(&ack_packet(PUBCOMP, m.pid));
        }
        let rest = s.drain(Duration::from_millis(700));
        assert!(
            rest.iter().all(|p| p.kind() != PUBLISH),
            "round {round}: PUBLISH sent again after PUBREC: {rest:?}"
        );
        drop(s);
        sleep(Duration::from_millis(200));
    }
    // Completed: nothing left for the session.
    let (mut s, _) = Client::persistent(node.mqtt, "out2-sub", false);
    let rest = s.drain(Duration::from_millis(500));
    assert!(rest.is_empty(), "after PUBCOMP nothing is resent: {rest:?}");
}

#[test]
fn outbound_qos2_pubrel_resumes_after_reconnect() {
    outbound_qos2_pubrel_resumes(false);
}

#[test]
fn outbound_qos2_pubrel_resumes_after_kill9() {
    outbound_qos2_pubrel_resumes(true);
}

#[test]
fn unacked_qos1_redelivered_with_dup_same_pid_after_reconnect_and_kill9() {
    let mut node = Node::start();
    let (mut s, _) = Client::persistent(node.mqtt, "inf1", false);
    s.sub_ok("inf1/#", 1);
    let mut p = Client::clean(node.mqtt, "inf1-pub", false);
    let want = payloads("i", 3);
    p.publish_many("inf1/a", &want, 1);
    let first: Vec<Msg> = (0..3)
        .map(|_| parse_publish(&s.expect(PUBLISH, "first delivery"), false))
        .collect();
    assert!(first.iter().all(|m| !m.dup), "first delivery has no DUP");
    assert_eq!(
        first.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(),
        want
    );
    let pids: Vec<u16> = first.iter().map(|m| m.pid).collect();
    drop(s); // no PUBACK

    let check = |s: &mut Client, when: &str| {
        let again: Vec<Msg> = (0..3)
            .map(|_| parse_publish(&s.expect(PUBLISH, when), false))
            .collect();
        for (m, w) in again.iter().zip(&want) {
            assert!(m.dup, "{when}: redelivery must carry DUP: {m:?}");
            assert_eq!(&m.payload, w, "{when}: order");
        }
        assert_eq!(
            again.iter().map(|m| m.pid).collect::<Vec<_>>(),
            pids,
            "{when}: same packet ids"
        );
    };
    let (mut s, present) = Client::persistent(node.mqtt, "inf1", false);
    assert!(present);
    check(&mut s, "after reconnect");
    drop(s);

    sleep(Duration::from_millis(100));
    node.kill9();
    node.restart();
    let (mut s, present) = Client::persistent(node.mqtt, "inf1", false);
    assert!(present);
    check(&mut s, "after kill -9");
    for pid in &pids {
        s.send(&ack_packet(PUBACK, *pid));
    }
    assert!(s.drain(Duration::from_millis(300)).is_empty());
    drop(s);
    // The PUBACKs are durable too: after another crash nothing comes back.
    sleep(Duration::from_millis(300));
    node.kill9();
    node.restart();
    let (mut s, present) = Client::persistent(node.mqtt, "inf1", false);
    assert!(present);
    let rest = s.drain(Duration::from_millis(700));
    assert!(rest.is_empty(), "acknowledged messages came back: {rest:?}");
}

#[test]
fn subscriptions_of_persistent_sessions_survive_kill9() {
    let mut node = Node::start();
    for (v5, id) in [(false, "keep4"), (true, "keep5")] {
        let (mut c, _) = Client::persistent(node.mqtt, id, v5);
        c.sub_ok(&format!("keep/{id}/#"), 1);
        c.disconnect();
    }
    node.kill9();
    node.restart();
    for (v5, id) in [(false, "keep4"), (true, "keep5")] {
        let (mut c, present) = Client::persistent(node.mqtt, id, v5);
        assert!(present, "{id}");
        let mut p = Client::clean(node.mqtt, "keep-pub", false);
        p.publish(&format!("keep/{id}/x"), b"after", 1);
        let got = c.receive_acking(1, 10);
        assert_eq!(got.len(), 1, "{id}: publish after restart must reach it");
        assert_eq!(got[0].text(), "after");
        assert_eq!(got[0].topic, format!("keep/{id}/x"));
    }
}

#[test]
fn clean_start_discards_stored_session_durably() {
    let mut node = Node::start();
    for (v5, id) in [(false, "cs4"), (true, "cs5")] {
        let (mut c, _) = Client::persistent(node.mqtt, id, v5);
        c.sub_ok(&format!("cs/{id}/#"), 1);
        c.disconnect();
    }
    let mut p = Client::clean(node.mqtt, "cs-pub", false);
    for id in ["cs4", "cs5"] {
        p.publish_many(&format!("cs/{id}/x"), &payloads("old", 3), 1);
    }
    drop(p);

    // 3.1.1 clean session ends the session; 5.0 clean start with expiry starts a new one.
    let c4 = Client::connect(node.mqtt, "cs4", false, true, None);
    let c5 = Client::connect(node.mqtt, "cs5", true, true, Some(3600));
    for (id, (mut c, present)) in [("cs4", c4), ("cs5", c5)] {
        assert!(!present, "{id}: clean start must not resume");
        let old = c.drain(Duration::from_millis(700));
        assert!(
            old.is_empty(),
            "{id}: old queued messages delivered: {old:?}"
        );
        c.disconnect();
    }
    sleep(Duration::from_millis(200));
    node.kill9();
    node.restart();

    let (mut c4, present4) = Client::persistent(node.mqtt, "cs4", false);
    assert!(!present4, "cs4: discarded session came back after restart");
    let (mut c5, present5) = Client::persistent(node.mqtt, "cs5", true);
    assert!(present5, "cs5: the new (empty) persistent session is kept");
    let mut p = Client::clean(node.mqtt, "cs-pub", false);
    p.publish("cs/cs4/y", b"new", 1);
    p.publish("cs/cs5/y", b"new", 1);
    for (id, c) in [("cs4", &mut c4), ("cs5", &mut c5)] {
        let got = c.drain(Duration::from_millis(700));
        assert!(
            got.is_empty(),
            "{id}: old messages or old subscription survived a clean start: {got:?}"
        );
    }
}

#[test]
fn session_expiry_removes_session_durably() {
    let mut node = Node::start();
    // exp-a expires while the node runs; exp-b's expiry clock must keep running across a
    // restart that happens right after it disconnected.
    for (id, expiry) in [("exp-a", 1u32), ("exp-b", 3)] {
        let (mut c, _) = Client::connect(node.mqtt, id, true, false, Some(expiry));
        c.sub_ok(&format!("exp/{id}"), 1);
        c.disconnect();
    }
    let mut p = Client::clean(node.mqtt, "exp-pub", false);
    p.publish("exp/exp-a", b"q", 1);
    p.publish("exp/exp-b", b"q", 1);
    drop(p);
    sleep(Duration::from_millis(2000));
    node.kill9();
    node.restart();
    let (mut a, present) = Client::connect(node.mqtt, "exp-a", true, false, Some(3600));
    assert!(!present, "exp-a: expired session came back after restart");
    assert!(a.drain(Duration::from_millis(500)).is_empty());
    sleep(Duration::from_millis(1800));
    let (mut b, present) = Client::connect(node.mqtt, "exp-b", true, false, Some(3600));
    assert!(
        !present,
        "exp-b: session outlived its expiry across a restart"
    );
    assert!(b.drain(Duration::from_millis(500)).is_empty());
    a.disconnect();
    b.disconnect();
    // The removal is durable.
    sleep(Duration::from_millis(200));
    node.kill9();
    node.restart();
    let (_c, present) = Client::connect(node.mqtt, "exp-a", true, false, Some(3600));
    assert!(
        present,
        "exp-a's new persistent session (expiry 3600) is present"
    );
}

#[test]
fn sigterm_sends_0x8b_exits_0_and_keeps_sessions() {
    let mut node = Node::start();
    let (mut off, _) = Client::persistent(node.mqtt, "gs-off", false);
    off.sub_ok("gs/#", 1);
    off.disconnect();
    let mut p = Client::clean(node.mqtt, "gs-pub", false);
    let want = payloads("g", 5);
    p.publish_many("gs/a", &want, 1);
    drop(p);
    let (mut on, _) = Client::persistent(node.mqtt, "gs-on", true);
    on.sub_ok("gs-on/#", 1);

    let status = node.sigterm();
    let d = on
        .recv(Duration::from_secs(5))
        .expect("DISCONNECT on shutdown");
    assert_eq!(
        disconnect_reason(&d),
        Some(0x8B),
        "server shutting down: {d:?}"
    );
    assert!(on.raw.closed().0, "connection closed after DISCONNECT");
    assert!(status.success(), "exit status {status:?}");

    node.restart();
    let (mut off, present) = Client::persistent(node.mqtt, "gs-off", false);
    assert!(present, "gs-off survives graceful shutdown");
    let got = off.receive_acking(5, 10);
    assert_eq!(
        got.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(),
        want,
        "queued messages after graceful shutdown"
    );
    let (mut on, present) = Client::persistent(node.mqtt, "gs-on", true);
    assert!(present, "gs-on survives graceful shutdown");
    let mut p = Client::clean(node.mqtt, "gs-pub", false);
    p.publish("gs-on/x", b"y", 1);
    assert_eq!(on.receive_acking(1, 10).len(), 1, "gs-on subscription kept");
}

#[test]
fn raft_metrics_and_health() {
    let node = Node::start();
    let (live, _) = node.http_get("/health/live");
    assert_eq!(live, 200);
    let (ready, body) = node.http_get("/health/ready");
    assert_eq!(ready, 200, "{body}");
    let (mut s, _) = Client::persistent(node.mqtt, "met-sub", false);
    s.sub_ok("met/#", 1);
    s.disconnect();
    let before = node.metric("fleetmq_raft_commit_seconds_count");
    let mut p = Client::clean(node.mqtt, "met-pub", false);
    p.publish("met/a", b"durable", 1);
    let text = node.metrics();
    let after = metric_sum(&text, "fleetmq_raft_commit_seconds_count");
    assert!(
        after > before && after > 0.0,
        "commit count {before} -> {after}"
    );
    assert!(
        metric_sum(&text, "fleetmq_raft_batch_size_count") > 0.0,
        "fleetmq_raft_batch_size missing:\n{text}"
    );
}

/// A device that reconnects over and over to a persistent session with an expiry and a delayed
/// will must not leave a sleeping timer behind per disconnect (the complaint about brokers
/// whose memory grows under connection storms).
#[test]
fn reconnect_storm_leaves_no_timers_behind() {
    let node = Node::start();
    let baseline = node.metric("fleetmq_runtime_tasks");
    for i in 0..60 {
        let mut raw = Raw::connect(node.mqtt);
        // v5, clean start 0, session expiry 3600 s, will with delay 600 s.
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0b0000_0100, 0, 60];
        body.extend_from_slice(&[5, 0x11, 0, 0, 0x0E, 0x10]); // session expiry 3600
        body.extend_from_slice(&[0, 5]);
        body.extend_from_slice(b"storm");
        body.extend_from_slice(&[5, 0x18, 0, 0, 0x02, 0x58]); // will delay 600
        body.extend_from_slice(&[0, 3]);
        body.extend_from_slice(b"w/s");
        body.extend_from_slice(&[0, 1, b'x']);
        raw.send(&frame(0x10, &body));
        let ack = raw.read_n(4);
        assert_eq!(ack.first(), Some(&0x20), "CONNACK on round {i}: {ack:?}");
        // Drop without DISCONNECT: the will is armed with its delay, expiry starts.
        drop(raw);
    }
    // Let the last disconnect be processed.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let after = node.metric("fleetmq_runtime_tasks");
    assert!(
        after < baseline + 10.0,
        "tasks grew from {baseline} to {after} over 60 reconnects: timers are piling up"
    );
}

/// An MQTT 5 DISCONNECT that shortens the session expiry is durable: after kill -9 and a
/// restart past the new expiry, the session is gone (it would have lived an hour otherwise).
#[test]
fn expiry_changed_on_disconnect_survives_restart() {
    fn connect(clean: bool) -> Vec<u8> {
        let flags = if clean { 0x02 } else { 0x00 };
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, flags, 0, 60];
        body.extend_from_slice(&[5, 0x11, 0, 0, 0x0E, 0x10]); // session expiry 3600
        body.extend_from_slice(&[0, 6]);
        body.extend_from_slice(b"shrink");
        frame(0x10, &body)
    }
    let mut node = Node::start();
    let mut raw = Raw::connect(node.mqtt);
    raw.send(&connect(true));
    assert_eq!(raw.read_n(4).first(), Some(&0x20));
    // DISCONNECT reason 0 with Session Expiry Interval 1.
    raw.send(&[0xE0, 0x07, 0x00, 0x05, 0x11, 0, 0, 0, 1]);
    let _ = raw.closed();
    std::thread::sleep(std::time::Duration::from_millis(300));
    node.kill9();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    node.restart();
    let mut raw = Raw::connect(node.mqtt);
    raw.send(&connect(false));
    let ack = raw.read_n(4);
    assert_eq!(ack.first(), Some(&0x20), "{ack:?}");
    assert_eq!(
        ack.get(2),
        Some(&0),
        "session must have expired (present flag): {ack:?}"
    );
}
