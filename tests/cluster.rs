//! The cluster against real processes: three `fleetmq` nodes on loopback, A forming the cluster
//! and B and C joining it over gRPC (`--node-id`, `--grpc-addr`, `--join`), driven by byte-level
//! MQTT clients (`support::Client`) and the REST API. What one node accepts must hold on every
//! node:
//!
//! - the directory is replicated: a tenant created over REST on B and a user created on C log
//!   in over MQTT on A; a password changed on A is changed on C; tenants stay isolated across
//!   nodes;
//! - publishes are forwarded: a subscriber on one node gets what is published on another (QoS 0
//!   and 1, one copy each), and no longer after it unsubscribed;
//! - retained messages set, replaced and cleared on one node are what a new subscriber on any
//!   node gets;
//! - a client id is connected once in the cluster: connecting on another node takes the session
//!   over (MQTT 5 DISCONNECT 0x8E, 3.1.1 close) and only the new connection remains;
//! - a persistent session (3.1.1 clean_session=false, 5 session expiry) resumes on another node
//!   with session present and its queued messages, also after its node was killed with SIGKILL,
//!   and the killed node rejoins after a restart.
//!
//! Every node admits clients without credentials into tenant `public` (`Node::start_cluster`),
//! so only the directory test logs in. Replication is asynchronous where the contract allows it:
//! those checks retry within `REPLICATION`. Subscriptions are cluster-wide before their SUBACK,
//! so publishes right after a SUBACK are never retried. Every wait is bounded.
mod common;
mod support;

use std::collections::HashSet;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use support::*;

const V3: bool = false;
const V5: bool = true;
const UNSUBACK: u8 = 11;
/// How long replicated state (directory, retained messages) may take to show on another node.
const REPLICATION: Duration = Duration::from_secs(10);

// ----- cluster and helpers -----------------------------------------------------------------------

/// Three nodes: A (id 1) forms the cluster on its empty data directory, B (id 2) joins A, C
/// (id 3) joins naming A and B (`--join` is repeatable). Each gRPC port is picked right before
/// its node starts, so it is fixed across `restart` and distinct from the running nodes' ports.
/// `start_cluster` returns only after the node has joined and caught up.
fn cluster3(args: &[&str]) -> [Node; 3] {
    let a = Node::start_cluster(1, free_port(), &[], args);
    let b = Node::start_cluster(2, free_port(), &[a.grpc_addr()], args);
    let c = Node::start_cluster(3, free_port(), &[a.grpc_addr(), b.grpc_addr()], args);
    [a, b, c]
}

/// PUBLISHes received until `idle` passes without a packet, acknowledged (QoS 1). Any other
/// packet fails the test.
fn drain_msgs(c: &mut Client, idle: Duration) -> Vec<Msg> {
    let mut v = Vec::new();
    while let Some(p) = c.recv(idle) {
        assert_eq!(p.kind(), PUBLISH, "unexpected packet {p:?}");
        let m = parse_publish(&p, c.v5);
        if m.qos == 1 {
            c.send(&ack_packet(PUBACK, m.pid));
        }
        v.push(m);
    }
    v
}

/// Waits up to `secs` for `n` PUBLISHes, then listens until 500 ms pass without one (to catch
/// duplicates and strays); returns (topic, payload, QoS) of everything, sorted.
fn receive_sorted(c: &mut Client, n: usize, secs: u64) -> Vec<(String, String, u8)> {
    let mut got = c.receive_acking(n, secs);
    got.extend(drain_msgs(c, Duration::from_millis(500)));
    let mut v: Vec<_> = got
        .iter()
        .map(|m| (m.topic.clone(), m.text(), m.qos))
        .collect();
    v.sort();
    v
}

/// Asserts no PUBLISH arrives within `dur`.
#[track_caller]
fn assert_silent(c: &mut Client, dur: Duration, what: &str) {
    let got = drain_msgs(c, dur);
    assert!(
        got.is_empty(),
        "{what}: expected nothing, got {:?}",
        got.iter().map(|m| (&m.topic, m.text())).collect::<Vec<_>>()
    );
}

/// UNSUBSCRIBE one filter and wait for the UNSUBACK.
fn unsubscribe(c: &mut Client, filter: &str) {
    let pid = c.take_pid();
    let mut body = pid.to_be_bytes().to_vec();
    if c.v5 {
        body.push(0);
    }
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    c.send(&frame(0xA2, &body));
    let a = c.expect(UNSUBACK, "UNSUBACK");
    assert_eq!(a.pid(), pid);
}

/// Subscribes to one filter; returns the reason codes and the PUBLISHes (retained messages)
/// that came before the SUBACK, acknowledged.
fn subscribe_collect(c: &mut Client, filter: &str, qos: u8) -> (Vec<u8>, Vec<Msg>) {
    let pid = c.take_pid();
    let v5 = c.v5;
    c.send(&subscribe_packet(v5, pid, filter.as_bytes(), qos));
    let mut early = Vec::new();
    loop {
        let p = c
            .recv(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no SUBACK for {filter}"));
        match p.kind() {
            SUBACK => {
                assert_eq!(p.pid(), pid);
                let skip = if v5 { 3 } else { 2 };
                return (p.body[skip..].to_vec(), early);
            }
            PUBLISH => {
                let m = parse_publish(&p, v5);
                if m.qos == 1 {
                    c.send(&ack_packet(PUBACK, m.pid));
                }
                early.push(m);
            }
            other => panic!("unexpected packet type {other} waiting for SUBACK: {p:?}"),
        }
    }
}

/// Publishes with the RETAIN flag at QoS 1 and waits for the PUBACK.
fn publish_retained(c: &mut Client, topic: &str, payload: &[u8]) {
    let pid = c.take_pid();
    let mut p = publish_packet(c.v5, topic.as_bytes(), 1, pid, false, payload);
    p[0] |= 0x01;
    c.send(&p);
    let ack = c.expect(PUBACK, "PUBACK of a retained message");
    assert_eq!(ack.pid(), pid);
}

/// What a brand-new subscriber to `filter` on `node` gets right away: retained messages as
/// (payload, retain flag). Waits up to 2 s for a first one, then 300 ms for more.
fn fresh_subscriber_view(node: &Node, id: &str, filter: &str) -> Vec<(String, bool)> {
    let mut c = Client::clean(node.mqtt, id, V3);
    let (codes, mut got) = subscribe_collect(&mut c, filter, 1);
    assert_eq!(codes, vec![1], "SUBACK for {filter}");
    if got.is_empty() {
        got.extend(c.receive_acking(1, 2));
    }
    got.extend(drain_msgs(&mut c, Duration::from_millis(300)));
    c.disconnect();
    got.iter().map(|m| (m.text(), m.retain)).collect()
}

/// Waits (within `REPLICATION`) until a new subscriber to `filter` on `node` gets exactly the
/// retained payloads `want` (each with RETAIN set) and nothing else.
#[track_caller]
fn assert_retained_view(node: &Node, filter: &str, want: &[&str], what: &str) {
    let want: Vec<(String, bool)> = want.iter().map(|w| (w.to_string(), true)).collect();
    let deadline = Instant::now() + REPLICATION;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let id = format!("ret-view-{}-{attempt}", node.port());
        let got = fresh_subscriber_view(node, &id, filter);
        if got == want {
            return;
        }
        if Instant::now() > deadline {
            panic!("{what}: a new subscriber to {filter} got {got:?}, wanted {want:?}");
        }
        sleep(Duration::from_millis(200));
    }
}

/// Connects without credentials, retrying refusals and missing CONNACKs for up to `secs` (a
/// cluster that just lost a node may have to elect a leader first). `persistent`: 3.1.1
/// clean_session=false, or 5 clean_start=false with expiry 3600. Returns session-present.
/// Fails the test with the node's log when no CONNACK 0 came.
fn connect_within(node: &Node, id: &str, v5: bool, persistent: bool, secs: u64) -> (Client, bool) {
    match try_connect_within(node.mqtt, id, v5, persistent, secs) {
        Ok(r) => r,
        Err(e) => panic!(
            "{id}: no successful CONNACK on {} in {secs} s ({e}); its log ends:\n{}",
            node.mqtt,
            log_tail(node)
        ),
    }
}

/// Receives until every payload of `want` came (acknowledging each), bounded by `secs`, then
/// listens 500 ms more for duplicates. Asserts none is missing or unexpected, first deliveries
/// are in publish order, all at QoS 1, and a repeat carries DUP.
#[track_caller]
fn assert_receives_all(c: &mut Client, want: &[Vec<u8>], secs: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut got: Vec<Msg> = Vec::new();
    let mut seen = HashSet::new();
    while seen.len() < want.len() && Instant::now() < deadline {
        for m in c.receive_acking(1, 1) {
            seen.insert(m.payload.clone());
            got.push(m);
        }
    }
    got.extend(drain_msgs(c, Duration::from_millis(500)));
    let missing: Vec<String> = want
        .iter()
        .filter(|w| !got.iter().any(|m| &m.payload == *w))
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {} acknowledged messages missing: {missing:?}",
        missing.len(),
        want.len()
    );
    let mut firsts = Vec::new();
    let mut once = HashSet::new();
    for m in &got {
        assert!(want.contains(&m.payload), "{what}: unexpected {m:?}");
        assert_eq!(m.qos, 1, "{what}: delivered QoS of {}", m.text());
        if once.insert(m.payload.clone()) {
            firsts.push(m.payload.clone());
        } else {
            assert!(m.dup, "{what}: {} delivered twice without DUP", m.text());
        }
    }
    assert_eq!(firsts, want, "{what}: order of first delivery");
}

/// Logs in with a clean session, retrying refusals within `REPLICATION` (the user may not have
/// reached `node` yet; the tests that use this raise the failed-login budget).
fn login_within(node: &Node, id: &str, v5: bool, user: &str, password: &str) -> Client {
    let deadline = Instant::now() + REPLICATION;
    loop {
        match try_login(
            node.mqtt,
            id,
            v5,
            true,
            None,
            Some(user),
            Some(password.as_bytes()),
        ) {
            Ok((c, _)) => return c,
            Err(code) if Instant::now() < deadline => {
                eprintln!("{user} on {}: CONNACK {code:#04x}, retrying", node.mqtt);
                sleep(Duration::from_millis(200));
            }
            Err(code) => panic!(
                "{user} never logged in on {}: CONNACK {code:#04x}",
                node.mqtt
            ),
        }
    }
}

/// MQTT 5: DISCONNECT 0x8E (Session taken over) then close; 3.1.1: closed without a byte.
#[track_caller]
fn assert_taken_over(c: &mut Client, what: &str) {
    if c.v5 {
        let p = c
            .recv(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{what}: no DISCONNECT (connection left open or closed)"));
        assert_eq!(
            disconnect_reason(&p),
            Some(0x8E),
            "{what}: wanted DISCONNECT 0x8E, got {p:?}"
        );
    }
    c.raw
        .s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (closed, left) = c.raw.closed();
    assert!(closed, "{what}: the old connection was not closed");
    assert!(
        left.is_empty(),
        "{what}: unexpected bytes before close: {left:02x?}"
    );
}

// ----- 1. directory ------------------------------------------------------------------------------

/// A tenant created over REST on B and a user created by that tenant's administrator on C log
/// in over MQTT on A (and everywhere); wrong passwords stay refused; the tenant's messages
/// cross nodes but never reach another tenant; a password changed on A changes on C.
#[test]
fn three_nodes_share_the_directory() {
    // The failed logins while waiting for a password change must never be throttled.
    let [a, b, c] = cluster3(&["--login-ip-burst", "100"]);
    const MGMT: &str = "management/admin";
    let t_admin_pw = "Adm-acme-7q!";

    // B printed its addresses only after catching up: the management administrator created
    // on A's first start works on B at once.
    let (status, v) = rest(
        &b,
        "POST",
        "/tenant/tenants",
        MGMT,
        ADMIN_PW,
        Some(json!({
            "company": "Acme Inc",
            "domain": "acme",
            "adminName": "admin",
            "adminPass": t_admin_pw,
        })),
    );
    assert_eq!(status, 201, "create tenant on B: {v}");
    let tid = v["id"].as_str().expect("tenant id").to_string();
    let t_admin = format!("{tid}/admin");

    // The tenant reaches A, and its administrator reaches C (polled as management/admin, so
    // the waiting costs no failed logins).
    wait_until(REPLICATION.as_secs(), &format!("tenant {tid} on A"), || {
        rest(
            &a,
            "GET",
            &format!("/tenant/tenants/{tid}"),
            MGMT,
            ADMIN_PW,
            None,
        )
        .0 == 200
    });
    wait_until(REPLICATION.as_secs(), &format!("{t_admin} on C"), || {
        rest(
            &c,
            "GET",
            &format!("/user/{tid}/users/admin"),
            MGMT,
            ADMIN_PW,
            None,
        )
        .0 == 200
    });
    // The tenant administrator's password (hashed on B) works on C.
    let (status, v) = rest(
        &c,
        "POST",
        &format!("/user/{tid}/users"),
        &t_admin,
        t_admin_pw,
        Some(json!({ "userName": "alice", "password": "pw-alice-1", "fleetmqRole": "user" })),
    );
    assert_eq!(status, 201, "create user on C as the tenant admin: {v}");

    // alice logs in on A (and B) once the user got there.
    let alice = format!("{tid}/alice");
    let mut alice_a = login_within(&a, "alice-sub", V5, &alice, "pw-alice-1");
    login_within(&b, "alice-probe", V3, &alice, "pw-alice-1").disconnect();
    // Everywhere, by tenant id and by domain; a wrong password is refused on every node.
    for n in [&a, &b, &c] {
        Client::login(n.mqtt, "alice-probe", V3, &alice, "pw-alice-1").disconnect();
        Client::login(n.mqtt, "alice-probe", V3, "acme/alice", "pw-alice-1").disconnect();
        assert_eq!(
            try_login(
                n.mqtt,
                "alice-probe",
                V3,
                true,
                None,
                Some(&alice),
                Some(b"pw-wrong")
            )
            .err(),
            Some(4),
            "wrong password on {}",
            n.mqtt
        );
    }

    // The tenant's messages cross nodes; the anonymous tenant's `#` on B never sees them.
    alice_a.sub_ok("dir/#", 1);
    let mut anon_b = Client::clean(b.mqtt, "anon-watch", V3);
    anon_b.sub_ok("#", 1);
    let mut alice_c = Client::login(c.mqtt, "alice-pub", V3, &alice, "pw-alice-1");
    alice_c.publish("dir/x", b"hello from C", 1);
    assert_eq!(
        receive_sorted(&mut alice_a, 1, 10),
        vec![("dir/x".to_string(), "hello from C".to_string(), 1)],
        "alice on A"
    );
    assert_silent(
        &mut anon_b,
        Duration::from_millis(500),
        "another tenant on B",
    );

    // A password changed on A: the old one stops working on C, the new one works there.
    let (status, v) = rest(
        &a,
        "PUT",
        &format!("/user/{tid}/users/alice"),
        MGMT,
        ADMIN_PW,
        Some(json!({ "password": "pw-alice-2" })),
    );
    assert!(
        (200..300).contains(&status),
        "change password on A: {status} {v}"
    );
    let deadline = Instant::now() + REPLICATION;
    loop {
        match try_login(
            c.mqtt,
            "alice-probe",
            V3,
            true,
            None,
            Some(&alice),
            Some(b"pw-alice-1"),
        ) {
            Err(4) => break,
            Ok((cl, _)) if Instant::now() < deadline => {
                cl.disconnect();
                sleep(Duration::from_millis(200));
            }
            Ok(_) => panic!("old password still accepted on C after the change on A"),
            Err(code) => panic!("old password on C: CONNACK {code:#04x}, wanted 4"),
        }
    }
    Client::login(c.mqtt, "alice-probe", V3, &alice, "pw-alice-2").disconnect();
}

// ----- 2. forwarding -----------------------------------------------------------------------------

/// Persistent subscribers on the publisher's node and on two others, all matching: QoS 1 and
/// QoS 2 from a clean publisher and QoS 2 from a persistent one (whose inbound packet id is
/// recorded) reach every one of them. The local one is queued by the publish itself, the
/// others through their shards, in one PUBLISH; losing either part loses messages silently
/// after the PUBACK/PUBREC.
#[test]
fn persistent_subscribers_here_and_elsewhere_all_get_every_message() {
    let [a, b, c] = cluster3(&[]);
    let mut subs = Vec::new();
    for (node, id, v5) in [
        (&a, "mix-sub-a", V3),
        (&b, "mix-sub-b", V5),
        (&c, "mix-sub-c", V3),
    ] {
        let (mut s, present) = Client::persistent(node.mqtt, id, v5);
        assert!(!present, "{id}: new");
        // Granted QoS 1: deliveries are acknowledged with PUBACK (what the checker reads);
        // the QoS 2 publishes still take the inbound-id path on the publishing side.
        s.sub_ok("mix/#", 1);
        subs.push((id, s));
    }
    let mut clean = Client::clean(a.mqtt, "mix-pub-clean", V5);
    let (mut durable, _) = Client::persistent(a.mqtt, "mix-pub-durable", V3);
    let mut want = Vec::new();
    for i in 0..5 {
        let p = format!("clean-q1-{i}");
        clean.publish("mix/t", p.as_bytes(), 1);
        want.push(p.into_bytes());
        let p = format!("clean-q2-{i}");
        clean.publish("mix/t", p.as_bytes(), 2);
        want.push(p.into_bytes());
        let p = format!("durable-q2-{i}");
        durable.publish("mix/t", p.as_bytes(), 2);
        want.push(p.into_bytes());
    }
    for (id, s) in &mut subs {
        assert_receives_all(s, &want, 15, id);
    }
}

/// Subscribers on A, B and C; a publisher on C sends QoS 0 and QoS 1: each subscriber gets one
/// copy of each at its QoS. After A unsubscribes, publishes from C (and from another client on
/// A) still reach B and C but no longer A.
#[test]
fn publish_on_one_node_reaches_a_subscriber_on_another() {
    let [a, b, c] = cluster3(&[]);
    let mut sub_a = Client::clean(a.mqtt, "fwd-sub-a", V3);
    let mut sub_b = Client::clean(b.mqtt, "fwd-sub-b", V5);
    let mut sub_c = Client::clean(c.mqtt, "fwd-sub-c", V3);
    for s in [&mut sub_a, &mut sub_b, &mut sub_c] {
        s.sub_ok("fwd/#", 1);
    }

    // No wait after the SUBACKs: subscriptions are cluster-wide before them.
    let mut pub_c = Client::clean(c.mqtt, "fwd-pub-c", V5);
    pub_c.publish("fwd/q0", b"zero", 0);
    pub_c.publish("fwd/q1", b"one", 1);
    let want = vec![
        ("fwd/q0".to_string(), "zero".to_string(), 0),
        ("fwd/q1".to_string(), "one".to_string(), 1),
    ];
    for (s, name) in [(&mut sub_a, "A"), (&mut sub_b, "B"), (&mut sub_c, "C")] {
        assert_eq!(
            receive_sorted(s, 2, 10),
            want,
            "subscriber on {name}: one copy of each, at the published QoS"
        );
    }

    unsubscribe(&mut sub_a, "fwd/#");
    pub_c.publish("fwd/after", b"after", 1);
    let mut pub_a = Client::clean(a.mqtt, "fwd-pub-a", V3);
    pub_a.publish("fwd/rev", b"rev", 1);
    let want = vec![
        ("fwd/after".to_string(), "after".to_string(), 1),
        ("fwd/rev".to_string(), "rev".to_string(), 1),
    ];
    assert_eq!(receive_sorted(&mut sub_b, 2, 10), want, "subscriber on B");
    assert_eq!(receive_sorted(&mut sub_c, 2, 10), want, "subscriber on C");
    // B's copies came, so A's would have by now.
    assert_silent(
        &mut sub_a,
        Duration::from_secs(1),
        "unsubscribed subscriber on A",
    );
}

// ----- 3. retained -------------------------------------------------------------------------------

/// A retained message set on A is what a new subscriber gets on every node; replaced on C, the
/// new value alone; cleared on B, nothing anywhere.
#[test]
fn retained_message_is_consistent_across_nodes() {
    let [a, b, c] = cluster3(&[]);
    let nodes = [(&a, "A"), (&b, "B"), (&c, "C")];

    let mut pa = Client::clean(a.mqtt, "ret-pub-a", V3);
    publish_retained(&mut pa, "ret/x", b"v1");
    for (n, name) in nodes {
        assert_retained_view(n, "ret/#", &["v1"], &format!("set on A, seen on {name}"));
    }

    let mut pc = Client::clean(c.mqtt, "ret-pub-c", V5);
    publish_retained(&mut pc, "ret/x", b"v2");
    for (n, name) in nodes {
        assert_retained_view(
            n,
            "ret/#",
            &["v2"],
            &format!("replaced on C, seen on {name}"),
        );
    }

    let mut pb = Client::clean(b.mqtt, "ret-pub-b", V3);
    publish_retained(&mut pb, "ret/x", b"");
    for (n, name) in nodes {
        assert_retained_view(n, "ret/#", &[], &format!("cleared on B, seen on {name}"));
    }
}

// ----- 4. takeover -------------------------------------------------------------------------------

/// One MQTT 5 client id connects on A, then B, then C: each earlier connection gets DISCONNECT
/// 0x8E and is closed. One 3.1.1 client id connects on C, then A: the first is closed. The
/// surviving connections receive what other nodes publish, and the nodes count exactly them.
#[test]
fn takeover_across_nodes_leaves_exactly_one_connection() {
    let [a, b, c] = cluster3(&[]);

    let mut on_a = Client::clean(a.mqtt, "to5", V5);
    let mut on_b = Client::clean(b.mqtt, "to5", V5);
    assert_taken_over(&mut on_a, "to5 on A after connecting on B");
    let mut on_c = Client::clean(c.mqtt, "to5", V5);
    assert_taken_over(&mut on_b, "to5 on B after connecting on C");
    on_c.sub_ok("to/5", 1);

    let mut old = Client::clean(c.mqtt, "to4", V3);
    let mut new = Client::clean(a.mqtt, "to4", V3);
    assert_taken_over(&mut old, "to4 on C after connecting on A");
    new.sub_ok("to/4", 1);

    // The survivors receive from the other nodes, one copy each.
    {
        let mut pb = Client::clean(b.mqtt, "to-pub-b", V3);
        pb.publish("to/5", b"for to5", 1);
        pb.publish("to/4", b"for to4", 1);
    }
    assert_eq!(
        receive_sorted(&mut on_c, 1, 10),
        vec![("to/5".to_string(), "for to5".to_string(), 1)],
        "to5 on C"
    );
    assert_eq!(
        receive_sorted(&mut new, 1, 10),
        vec![("to/4".to_string(), "for to4".to_string(), 1)],
        "to4 on A"
    );

    // Only those two connections are left: to4 on A, to5 on C (the publisher is gone).
    let counts = || [&a, &b, &c].map(|n| n.metric("fleetmq_connections"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while counts() != [1.0, 0.0, 1.0] && Instant::now() < deadline {
        sleep(Duration::from_millis(100));
    }
    assert_eq!(
        counts(),
        [1.0, 0.0, 1.0],
        "open MQTT connections on A, B, C"
    );
}

/// One client id connects through A, B and C at the same moment, ten times over: the home
/// runs one takeover at a time (the others wait for it), and when the dust settles exactly one
/// connection of the device is open in the cluster.
#[test]
fn simultaneous_connects_on_three_nodes_leave_one_connection() {
    let [a, b, c] = cluster3(&[]);
    let nodes = [a.mqtt, b.mqtt, c.mqtt];
    let mut kept = Vec::new();
    for round in 0..10 {
        let id = format!("race-{round}");
        let racers: Vec<_> = nodes
            .iter()
            .map(|addr| {
                let (addr, id) = (*addr, id.clone());
                std::thread::spawn(move || try_login(addr, &id, V5, true, None, None, None))
            })
            .collect();
        for r in racers {
            // A connection superseded while it registered is refused (0x88); the others are
            // accepted and then taken over, all but one.
            if let Ok((client, _)) = r.join().expect("racer") {
                kept.push(client);
            }
        }
    }
    let counts = || [&a, &b, &c].map(|n| n.metric("fleetmq_connections"));
    wait_until(15, "one connection per client id", || {
        counts().iter().sum::<f64>() == 10.0
    });
    sleep(Duration::from_millis(500));
    assert_eq!(
        counts().iter().sum::<f64>(),
        10.0,
        "open connections on A, B, C: {:?}",
        counts()
    );
    drop(kept);
}

/// A service pushes messages to single devices through C's REST API. A clean session
/// connected on A gets its message through its home and A; a persistent session that is
/// offline gets a QoS 1 message when it reconnects, on B; a device not subscribed to the topic,
/// or not connected, gets nothing and the answer says so.
#[test]
fn a_service_pushes_messages_to_single_devices_on_other_nodes() {
    const MGMT: &str = "management/admin";
    let [a, b, c] = cluster3(&[]);
    let push = |device: &str, topic: &str, payload: &str, qos: u8| {
        let (status, v) = rest(
            &c,
            "POST",
            &format!("/fleetmq/devices/{device}/messages?tenant={ANON_TENANT}"),
            MGMT,
            ADMIN_PW,
            Some(json!({ "topic": topic, "payload": payload, "qos": qos })),
        );
        assert_eq!(status, 200, "push to {device}: {v}");
        v["result"].as_str().unwrap_or_default().to_string()
    };

    // Several clean devices on A (their homes spread over the three nodes), and one that is
    // subscribed to something else.
    let mut clean: Vec<Client> = (0..6)
        .map(|i| {
            let mut cl = Client::clean(a.mqtt, &format!("push-{i}"), V5);
            cl.sub_ok(&format!("cmd/push-{i}"), 1);
            cl
        })
        .collect();
    let mut other = Client::clean(a.mqtt, "push-other", V3);
    other.sub_ok("elsewhere/#", 1);
    for (i, cl) in clean.iter_mut().enumerate() {
        let id = format!("push-{i}");
        assert_eq!(
            push(&id, &format!("cmd/{id}"), &format!("hello {i}"), 1),
            "delivered"
        );
        assert_eq!(
            receive_sorted(cl, 1, 10),
            vec![(format!("cmd/{id}"), format!("hello {i}"), 1)],
            "{id} on A"
        );
    }
    assert_eq!(push("push-other", "cmd/push-other", "x", 1), "notDelivered");
    assert_silent(&mut other, Duration::from_millis(500), "push-other");
    assert_eq!(push("nobody", "cmd/nobody", "x", 0), "notDelivered");

    // A persistent session subscribed on B, offline: the message waits for it.
    let (mut p, _) = Client::persistent(b.mqtt, "push-p", V5);
    p.sub_ok("cmd/push-p", 1);
    p.disconnect();
    assert_eq!(push("push-p", "cmd/push-p", "while away", 1), "queued");
    let (mut p, present) = Client::persistent(a.mqtt, "push-p", V5);
    assert!(present, "push-p's session");
    assert_eq!(
        receive_sorted(&mut p, 1, 10),
        vec![("cmd/push-p".to_string(), "while away".to_string(), 1)],
        "push-p after reconnecting on A"
    );
}

/// A home node keeps its registry in memory only. After C is killed and restarted, A
/// re-announces the connections it holds to their homes, so C knows again which of them it is
/// home for; new connections of the same devices through B then take every one of them over
/// (without the re-announcement, those homed at C would stay open on A: two live connections
/// for one device).
#[test]
fn a_restarted_home_learns_the_connections_it_lost() {
    let [a, b, mut c] = cluster3(&[]);
    let ids: Vec<String> = (0..24).map(|i| format!("rh-{i}")).collect();
    let mut on_a: Vec<Client> = ids.iter().map(|id| Client::clean(a.mqtt, id, V5)).collect();
    let homed_at_c = c.metric("fleetmq_cluster_registry_entries");
    assert!(
        homed_at_c > 0.0,
        "no test device is homed at C; pick other ids"
    );

    c.restart();
    // A re-announces all of them in one call per home. (Not compared with the count before:
    // on a loaded machine a peer that misses heartbeats changes the homes for a moment.)
    wait_until(20, "C's registry holds devices again", || {
        c.metric("fleetmq_cluster_registry_entries") > 0.0
    });

    let mut on_b: Vec<Client> = ids.iter().map(|id| Client::clean(b.mqtt, id, V5)).collect();
    for (old, id) in on_a.iter_mut().zip(&ids) {
        assert_taken_over(old, &format!("{id} on A after connecting on B"));
    }
    on_b[0].sub_ok("rh/0", 1);
    let counts = || [&a, &b, &c].map(|n| n.metric("fleetmq_connections"));
    wait_until(10, "every device connected once, through B", || {
        counts() == [0.0, 24.0, 0.0]
    });
}

/// An operator drains C through A's REST API: C's client is told to use another server
/// (DISCONNECT 0x9C), C stops being ready, refuses new clients with 0x9C and leaves the
/// membership; the client's persistent session continues on B with every message published
/// before, during and after the drain.
#[test]
fn a_drained_node_hands_its_clients_to_the_others() {
    const MGMT: &str = "management/admin";
    let [a, b, c] = cluster3(&[]);
    let (mut sub, _) = Client::persistent(c.mqtt, "dr-sub", V5);
    sub.sub_ok("dr/#", 1);
    let mut publ = Client::clean(a.mqtt, "dr-pub", V3);
    let before = payloads("dr-before", 10);
    publ.publish_many("dr/x", &before, 1);
    assert_receives_all(&mut sub, &before, 10, "dr-sub on C before the drain");

    // Only management administrators may drain.
    let (status, _) = rest(
        &a,
        "POST",
        "/fleetmq/cluster/nodes/3/drain",
        MGMT,
        "wrong-password",
        None,
    );
    assert_eq!(status, 401, "a drain with a wrong password");
    let (status, v) = rest(
        &a,
        "POST",
        "/fleetmq/cluster/nodes/9/drain",
        MGMT,
        ADMIN_PW,
        None,
    );
    assert_eq!(status, 404, "drain of a node that is not a member: {v}");

    let (status, v) = rest(
        &a,
        "POST",
        "/fleetmq/cluster/nodes/3/drain",
        MGMT,
        ADMIN_PW,
        None,
    );
    assert_eq!(status, 200, "drain of C: {v}");
    assert_eq!(v["connectionsClosed"], 1, "{v}");
    let p = sub
        .recv(Duration::from_secs(10))
        .expect("dr-sub got no DISCONNECT from the drained node");
    assert_eq!(disconnect_reason(&p), Some(0x9C), "{p:?}");

    assert_eq!(
        c.http_get("/health/ready").0,
        503,
        "a drained node is not ready"
    );
    match try_login(c.mqtt, "dr-late", V5, true, None, None, None) {
        Err(code) => assert_eq!(code, 0x9C, "CONNECT to a drained node"),
        Ok(_) => panic!("a drained node accepted a new client"),
    }
    let (status, v) = rest(&a, "GET", "/fleetmq/cluster/nodes", MGMT, ADMIN_PW, None);
    assert_eq!(status, 200, "{v}");
    let ids: Vec<u64> = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_u64())
        .collect();
    assert_eq!(ids, vec![1, 2], "members after the drain: {v}");

    // Published while the client is away, then it comes back through B.
    let after = payloads("dr-after", 10);
    publ.publish_many("dr/x", &after, 1);
    let (mut sub, present) = Client::persistent(b.mqtt, "dr-sub", V5);
    assert!(present, "dr-sub's session continues on B");
    assert_receives_all(&mut sub, &after, 20, "dr-sub on B after the drain");
}

// ----- 5. persistent session on another node -----------------------------------------------------

/// 3.1.1 (clean_session=false) and 5 (expiry 3600) sessions subscribe at QoS 1 on A and go
/// offline; 20 messages are published at QoS 1 on C; the clients reconnect on B: session
/// present, every message in order, and the subscription still routes what A publishes.
#[test]
fn persistent_session_resumes_on_another_node() {
    let [a, b, c] = cluster3(&[]);
    let ids = [(V3, "ps-v4"), (V5, "ps-v5")];
    for (v5, id) in ids {
        let (mut s, present) = Client::persistent(a.mqtt, id, v5);
        assert!(!present, "{id}: a new session is not present");
        s.sub_ok("ps/#", 1);
        s.disconnect();
    }

    let want = payloads("ps-m", 20);
    let mut pc = Client::clean(c.mqtt, "ps-pub-c", V3);
    pc.publish_many("ps/t", &want, 1);

    let mut resumed = Vec::new();
    for (v5, id) in ids {
        let (mut s, present) = Client::persistent(b.mqtt, id, v5);
        assert!(present, "{id}: session started on A must be present on B");
        assert_receives_all(&mut s, &want, 20, &format!("{id} resumed on B"));
        resumed.push((id, s));
    }

    let mut pa = Client::clean(a.mqtt, "ps-pub-a", V5);
    pa.publish("ps/live", b"live", 1);
    for (id, s) in &mut resumed {
        assert_eq!(
            receive_sorted(s, 1, 10),
            vec![("ps/live".to_string(), "live".to_string(), 1)],
            "{id}: the subscription moved to B with the session"
        );
    }
}

// ----- 6. persistent session after kill -9 of its node -------------------------------------------

/// Persistent sessions subscribe on A and go offline; 20 QoS 1 messages are published and
/// PUBACKed on C; A is killed with SIGKILL. On B the sessions resume (present) with every
/// message, and the two remaining nodes keep routing. A restarted on its data directory and
/// gRPC port rejoins and serves again.
#[test]
fn persistent_session_survives_kill_of_its_node() {
    let [mut a, b, c] = cluster3(&[]);
    let ids = [(V3, "k9-v4"), (V5, "k9-v5")];
    for (v5, id) in ids {
        let (mut s, present) = Client::persistent(a.mqtt, id, v5);
        assert!(!present, "{id}: a new session is not present");
        s.sub_ok("k9/#", 1);
        s.disconnect();
    }

    let want = payloads("k9-m", 20);
    {
        let mut pc = Client::clean(c.mqtt, "k9-pub-c", V5);
        pc.publish_many("k9/t", &want, 1);
    }
    a.kill9();

    // A may have been the leader: allow an election before the CONNACK.
    let mut resumed = Vec::new();
    for (v5, id) in ids {
        let (mut s, present) = connect_within(&b, id, v5, true, 30);
        assert!(present, "{id}: session must survive kill -9 of A");
        assert_receives_all(
            &mut s,
            &want,
            20,
            &format!("{id} resumed on B after kill -9 of A"),
        );
        resumed.push((id, s));
    }

    // B and C still form a majority and route between them.
    let mut pc = connect_within(&c, "k9-pub-c2", V3, false, 30).0;
    pc.publish("k9/live", b"live", 1);
    for (id, s) in &mut resumed {
        assert_eq!(
            receive_sorted(s, 1, 10),
            vec![("k9/live".to_string(), "live".to_string(), 1)],
            "{id}: live message on B from C with A down"
        );
    }

    // A comes back on the same data directory and gRPC port and serves again.
    a.restart();
    let mut back = connect_within(&a, "k9-back", V3, false, 30).0;
    back.sub_ok("back/#", 1);
    let mut pb = Client::clean(b.mqtt, "k9-pub-b", V3);
    pb.publish("back/x", b"welcome back", 1);
    assert_eq!(
        receive_sorted(&mut back, 1, 10),
        vec![("back/x".to_string(), "welcome back".to_string(), 1)],
        "subscriber on the restarted A"
    );
}

// ----- 7. kill -9 mid-stream ---------------------------------------------------------------------

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

const NODE_NAMES: [&str; 3] = ["A", "B", "C"];
const STREAM_Q1: &str = "stream/q1";
const STREAM_Q2: &str = "stream/q2";
/// The stream's two persistent subscribers: (filter, QoS, MQTT 5, client id). S1 is 3.1.1
/// clean_session=false at QoS 1, S2 is 5 with session expiry 3600 at QoS 2.
const STREAM_SUBS: [(&str, u8, bool, &str); 2] =
    [(STREAM_Q1, 1, V3, "kill-s1"), (STREAM_Q2, 2, V5, "kill-s2")];

/// One PUBLISH a stream subscriber received.
#[derive(Debug, Clone)]
struct Delivery {
    topic: String,
    text: String,
    qos: u8,
    pid: u16,
    dup: bool,
    /// False for a QoS 2 retransmission: DUP set and the same packet id and payload still
    /// awaiting their PUBREL, which a client answers with PUBREC again without delivering
    /// anything (MQTT 4.3.3). Every other PUBLISH is a new delivery to the application.
    new: bool,
    /// Which connection of the subscriber it came on (1 = the first).
    conn: u32,
}

/// What a stream subscriber received over all its connections, and the client side of its
/// session: the QoS 2 packet ids answered with PUBREC and not yet released, kept across
/// reconnects as a real client keeps them.
#[derive(Default)]
struct StreamLog {
    got: Vec<Delivery>,
    awaiting_rel: HashMap<u16, Vec<u8>>,
    /// Protocol oddities (QoS 0 deliveries, unexpected packets, a packet id reused while it
    /// awaits PUBREL).
    odd: Vec<String>,
    conn: u32,
    last_packet: Option<Instant>,
}

/// Locks a log even if a reader thread panicked holding it (the panic is reported apart).
fn lock(log: &Mutex<StreamLog>) -> MutexGuard<'_, StreamLog> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

impl StreamLog {
    /// Records one packet and answers it as a client does: PUBACK; PUBREC; PUBCOMP on PUBREL.
    /// Write errors are ignored: the node may have just been killed.
    fn handle(&mut self, c: &mut Client, p: Pkt) {
        use std::io::Write as _;
        self.last_packet = Some(Instant::now());
        match p.kind() {
            PUBLISH => {
                let m = parse_publish(&p, c.v5);
                let mut new = true;
                match m.qos {
                    1 => {
                        let _ = c.raw.s.write_all(&ack_packet(PUBACK, m.pid));
                    }
                    2 => {
                        match self.awaiting_rel.get(&m.pid) {
                            Some(prev) if *prev == m.payload => new = !m.dup,
                            Some(prev) => self.odd.push(format!(
                                "conn {}: packet id {} reused for {:?} while {:?} awaits PUBREL",
                                self.conn,
                                m.pid,
                                m.text(),
                                String::from_utf8_lossy(prev)
                            )),
                            None => {}
                        }
                        self.awaiting_rel.insert(m.pid, m.payload.clone());
                        let _ = c.raw.s.write_all(&ack_packet(PUBREC, m.pid));
                    }
                    _ => self.odd.push(format!(
                        "conn {}: QoS 0 delivery of {:?} on {}",
                        self.conn,
                        m.text(),
                        m.topic
                    )),
                }
                self.got.push(Delivery {
                    text: m.text(),
                    topic: m.topic,
                    qos: m.qos,
                    pid: m.pid,
                    dup: m.dup,
                    new,
                    conn: self.conn,
                });
            }
            PUBREL => {
                self.awaiting_rel.remove(&p.pid());
                let _ = c.raw.s.write_all(&ack_packet(PUBCOMP, p.pid()));
            }
            k => self.odd.push(format!(
                "conn {}: unexpected packet type {k}: {p:?}",
                self.conn
            )),
        }
    }
}

/// Reads a stream subscriber on its own thread, until its connection closes (returns `None`)
/// or `stop` is set (returns the still-open client). Bounded at 120 s.
fn spawn_stream_reader(
    mut c: Client,
    log: Arc<Mutex<StreamLog>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Option<Client>> {
    std::thread::spawn(move || {
        let hard_stop = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::SeqCst) && Instant::now() < hard_stop {
            let t0 = Instant::now();
            match c.recv(Duration::from_millis(300)) {
                Some(p) => lock(&log).handle(&mut c, p),
                // A read that gives up well before its timeout met EOF or a reset.
                None if t0.elapsed() < Duration::from_millis(200) => return None,
                None => {}
            }
        }
        Some(c)
    })
}

/// Joins reader threads; returns the clients still connected, by subscriber index. A reader
/// that panicked, or (with `expect_open`) whose connection closed, is noted.
fn join_stream_readers(
    readers: Vec<(usize, JoinHandle<Option<Client>>)>,
    expect_open: Option<&str>,
    notes: &mut Vec<String>,
) -> [Option<Client>; 2] {
    let mut out = [None, None];
    for (i, h) in readers {
        let id = STREAM_SUBS[i].3;
        match h.join() {
            Ok(Some(c)) => out[i] = Some(c),
            Ok(None) => {
                if let Some(name) = expect_open {
                    notes.push(format!("{id}: connection to {name} closed while draining"));
                }
            }
            Err(_) => notes.push(format!("{id}: reader thread panicked")),
        }
    }
    out
}

/// Like `connect_within` (without credentials, retrying for up to `secs`), but returns what
/// went wrong instead of panicking, and survives a refused TCP connect.
fn try_connect_within(
    addr: SocketAddr,
    id: &str,
    v5: bool,
    persistent: bool,
    secs: u64,
) -> Result<(Client, bool), String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let expiry = (persistent && v5).then_some(3600);
        let err = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                match try_login_on(Raw { s }, id, v5, !persistent, expiry, None, None) {
                    Ok(r) => return Ok(r),
                    Err(code) => format!("CONNACK {code:#04x}"),
                }
            }
            Err(e) => format!("TCP connect: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(format!("{id} on {addr}: {err}"));
        }
        eprintln!("{id}: {err} on {addr}, retrying");
        sleep(Duration::from_millis(250));
    }
}

/// Waits up to 10 s for the acknowledgement `kind` of `pid`, skipping anything else; false
/// on silence or a closed connection.
fn await_ack(c: &mut Client, kind: u8, pid: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match c.recv(left) {
            Some(p) if p.kind() == kind && p.body.len() >= 2 && p.pid() == pid => return true,
            Some(p) => eprintln!("stream publisher: skipping {p:?} awaiting type {kind} of {pid}"),
            None => return false,
        }
    }
}

/// The stream's publisher: 3.1.1 with a persistent session on one node, one flow at a time.
/// A flow that gets no acknowledgement (closed connection, or 10 s of silence) resumes on a
/// new connection to the same node: the PUBLISH again with DUP and the same packet id, or the
/// PUBREL once PUBREC came (MQTT 4.4). Three attempts per message.
struct StreamPublisher {
    addr: SocketAddr,
    id: String,
    c: Option<Client>,
    next_pid: u16,
    reconnects: u32,
}

impl StreamPublisher {
    fn new(addr: SocketAddr, id: String) -> StreamPublisher {
        let mut p = StreamPublisher {
            addr,
            id,
            c: None,
            next_pid: 1,
            reconnects: 0,
        };
        p.connect();
        p
    }

    /// (Re)connects, retrying for up to 30 s; the old connection is closed first.
    fn connect(&mut self) {
        self.c = None;
        match try_connect_within(self.addr, &self.id, V3, true, 30) {
            Ok((c, present)) => {
                if self.reconnects > 0 && !present {
                    eprintln!("{}: session not present after reconnecting", self.id);
                }
                self.c = Some(c);
            }
            Err(e) => eprintln!("{}: {e}", self.id),
        }
    }

    /// Publishes one message; true once it is acknowledged (PUBACK, or PUBREC then PUBCOMP).
    /// `kill` is killed right after the first PUBLISH was written, before its acknowledgement.
    fn publish(
        &mut self,
        topic: &str,
        qos: u8,
        payload: &[u8],
        mut kill: Option<&mut Node>,
    ) -> bool {
        use std::io::Write as _;
        let pid = self.next_pid;
        self.next_pid = if pid == u16::MAX { 1 } else { pid + 1 };
        let mut dup = false;
        let mut got_rec = false;
        for attempt in 0..3 {
            if attempt > 0 {
                self.reconnects += 1;
                eprintln!(
                    "{}: no acknowledgement for {:?} (pid {pid}), reconnecting to {}",
                    self.id,
                    String::from_utf8_lossy(payload),
                    self.addr
                );
                self.connect();
            }
            let Some(c) = self.c.as_mut() else { continue };
            let packet = if got_rec {
                ack_packet(PUBREL, pid)
            } else {
                publish_packet(false, topic.as_bytes(), qos, pid, dup, payload)
            };
            let sent = c.raw.s.write_all(&packet).is_ok();
            dup = true;
            if let Some(n) = kill.take() {
                n.kill9();
            }
            if !sent {
                continue;
            }
            if qos == 1 {
                if await_ack(c, PUBACK, pid) {
                    return true;
                }
                continue;
            }
            if !got_rec {
                if !await_ack(c, PUBREC, pid) {
                    continue;
                }
                got_rec = true;
                if c.raw.s.write_all(&ack_packet(PUBREL, pid)).is_err() {
                    continue;
                }
            }
            if await_ack(c, PUBCOMP, pid) {
                return true;
            }
        }
        if let Some(n) = kill.take() {
            n.kill9();
        }
        false
    }
}

/// Reconnects stream subscriber `i` with clean_session=false (5: clean_start=false, expiry
/// 3600) on `node`, retrying up to 30 s while the cluster recovers. A session that is not
/// present is noted (the round fails) and subscribed again, so later rounds still test.
fn resume_stream_sub(
    node: &Node,
    name: &str,
    i: usize,
    log: &Mutex<StreamLog>,
    notes: &mut Vec<String>,
) -> Option<Client> {
    let (topic, qos, v5, id) = STREAM_SUBS[i];
    match try_connect_within(node.mqtt, id, v5, true, 30) {
        Ok((mut c, present)) => {
            lock(log).conn += 1;
            if !present {
                notes.push(format!("{id}: session not present on {name}"));
                let codes = c.subscribe(topic, qos);
                if codes != [qos] {
                    notes.push(format!("{id}: subscribing again on {name}: {codes:?}"));
                }
            }
            Some(c)
        }
        Err(e) => {
            notes.push(format!("{id}: could not resume on {name}: {e}"));
            None
        }
    }
}

/// Waits up to 30 s until `node` completes a CONNECT and a SUBSCRIBE (clean session): it
/// serves MQTT and reaches its peers (a SUBACK waits for every live peer).
fn probe_ready(node: &Node) -> Result<(), String> {
    use std::io::Write as _;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let err = match try_connect_within(node.mqtt, "kill-probe", V3, false, 30) {
            Ok((mut c, _)) => {
                let pid = c.take_pid();
                let _ = c
                    .raw
                    .s
                    .write_all(&subscribe_packet(false, pid, b"kill-probe/#", 1));
                match c.recv(Duration::from_secs(10)) {
                    Some(p) if p.kind() == SUBACK && p.body.get(2) == Some(&1) => {
                        c.disconnect();
                        return Ok(());
                    }
                    other => format!("SUBSCRIBE answered with {other:?}"),
                }
            }
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(err);
        }
        sleep(Duration::from_millis(250));
    }
}

/// Waits until every payload acknowledged in the round reached its subscriber and both were
/// silent for `idle`, or `cap` passed.
fn wait_stream_drained(
    logs: &[Arc<Mutex<StreamLog>>; 2],
    acked: &[Vec<String>; 2],
    idle: Duration,
    cap: Duration,
) {
    let start = Instant::now();
    loop {
        let now = Instant::now();
        let mut complete = true;
        let mut quiet = true;
        for (log, acked) in logs.iter().zip(acked) {
            let l = lock(log);
            let seen: HashSet<&str> = l.got.iter().map(|d| d.text.as_str()).collect();
            complete &= acked.iter().all(|a| seen.contains(a.as_str()));
            let last = l.last_packet.map_or(start, |t| t.max(start));
            quiet &= now.duration_since(last) >= idle;
        }
        if (complete && quiet) || now.duration_since(start) >= cap {
            return;
        }
        sleep(Duration::from_millis(100));
    }
}

/// One round of the stream: who was killed, published from, resumed on, and what happened.
struct StreamRound {
    r: usize,
    v: usize,
    p: usize,
    m: usize,
    /// The sequence number whose PUBLISH was on the wire when V was killed.
    kill_seq: Option<usize>,
    /// Payloads published, and those acknowledged, per subscriber (index into `STREAM_SUBS`).
    published: [Vec<String>; 2],
    acked: [Vec<String>; 2],
    /// Anything else that failed the round (a session not present, a subscriber that could
    /// not reconnect, a publish never acknowledged by the live publisher node).
    notes: Vec<String>,
}

impl StreamRound {
    /// The round's counts over everything received so far: (passed, report). S1: every
    /// acknowledged QoS 1 payload received at least once. S2: every acknowledged QoS 2 payload
    /// received, and no payload of the round delivered as new more than once.
    fn verdict(&self, logs: &[Arc<Mutex<StreamLog>>; 2]) -> (bool, String) {
        fn some(v: &[String]) -> String {
            let mut s = v.iter().take(12).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > 12 {
                s.push_str(&format!(", ... ({} in all)", v.len()));
            }
            s
        }
        let prefix = format!("{}:", self.r);
        let mut ok = self.notes.is_empty();
        let mut report = format!(
            "round {} (killed {}, publisher on {}, resumed on {}, kill at seq {:?}):",
            self.r, NODE_NAMES[self.v], NODE_NAMES[self.p], NODE_NAMES[self.m], self.kill_seq
        );
        for (i, (topic, qos, _, id)) in STREAM_SUBS.iter().enumerate() {
            let l = lock(&logs[i]);
            let mine: Vec<&Delivery> = l
                .got
                .iter()
                .filter(|d| d.text.starts_with(&prefix))
                .collect();
            let mut all: HashMap<&str, Vec<&Delivery>> = HashMap::new();
            let mut stray = Vec::new();
            for d in &mine {
                all.entry(d.text.as_str()).or_default().push(d);
                if d.topic != *topic || d.qos != *qos || !self.published[i].contains(&d.text) {
                    stray.push(format!("{} on {} at QoS {}", d.text, d.topic, d.qos));
                }
            }
            let lost: Vec<String> = self.acked[i]
                .iter()
                .filter(|a| !all.contains_key(a.as_str()))
                .cloned()
                .collect();
            let copies: usize = all.values().map(|v| v.len() - 1).sum();
            let retransmitted = mine.iter().filter(|d| !d.new).count();
            let mut dups: Vec<String> = Vec::new();
            if *qos == 2 {
                for (text, ds) in &all {
                    if ds.iter().filter(|d| d.new).count() > 1 {
                        let how: Vec<String> = ds
                            .iter()
                            .map(|d| {
                                let dup = if d.dup { " DUP" } else { "" };
                                let new = if d.new { "" } else { " (retransmission)" };
                                format!("conn {} pid {}{dup}{new}", d.conn, d.pid)
                            })
                            .collect();
                        dups.push(format!("{text} [{}]", how.join("; ")));
                    }
                }
                dups.sort();
            }
            ok &= lost.is_empty() && dups.is_empty() && stray.is_empty();
            report.push_str(&format!(
                "\n  {id} {topic} QoS {qos}: published {} acknowledged {} received {} lost {} \
                 duplicated {} (extra copies {copies}, QoS 2 retransmissions {retransmitted})",
                self.published[i].len(),
                self.acked[i].len(),
                all.len(),
                lost.len(),
                dups.len(),
            ));
            if !lost.is_empty() {
                report.push_str(&format!("\n    lost: {}", some(&lost)));
            }
            if !dups.is_empty() {
                report.push_str(&format!("\n    delivered twice as new: {}", some(&dups)));
            }
            if !stray.is_empty() {
                report.push_str(&format!("\n    unexpected: {}", some(&stray)));
            }
        }
        for n in &self.notes {
            report.push_str(&format!("\n  note: {n}"));
        }
        report.push_str(if ok { "\n  => ok" } else { "\n  => FAILED" });
        (ok, report)
    }
}

/// Ten rounds of: two persistent subscribers (3.1.1 QoS 1 on `stream/q1`, 5 QoS 2 on
/// `stream/q2`) connected to node V, a publisher on another node P sending a numbered stream
/// to both topics, V killed with SIGKILL mid-stream while P keeps publishing, the subscribers
/// resuming (session present) on a third node M (or P) and draining, V restarted. Every
/// message acknowledged to the publisher reaches S1 at least once and S2 exactly once. V, P
/// and M rotate so each node is killed three or four times; the counts of every round are
/// printed before the verdict.
#[test]
fn kill_9_mid_stream_loses_no_acknowledged_message() {
    const ROUNDS: usize = 10;
    /// Acknowledged messages of a round before V is killed, and publishes after.
    const BEFORE_KILL: usize = 40;
    const AFTER_KILL: usize = 40;
    /// Silence that ends a drain once everything acknowledged arrived, and its cap otherwise.
    const IDLE: Duration = Duration::from_secs(2);
    const DRAIN_CAP: Duration = Duration::from_secs(20);
    let started = Instant::now();
    let mut nodes = cluster3(&[]);
    let logs: [Arc<Mutex<StreamLog>>; 2] = Default::default();

    // The sessions are new on A and subscribe there; later rounds only resume them.
    let mut conns: [Option<Client>; 2] = [None, None];
    for (i, (topic, qos, v5, id)) in STREAM_SUBS.into_iter().enumerate() {
        let (mut c, present) = Client::persistent(nodes[0].mqtt, id, v5);
        assert!(!present, "{id}: a new session is not present");
        c.sub_ok(topic, qos);
        lock(&logs[i]).conn = 1;
        conns[i] = Some(c);
    }

    let mut rounds: Vec<StreamRound> = Vec::new();
    // The subscribers' node: this round's victim; the next round's is where they moved.
    let mut v = 0;
    for r in 0..ROUNDS {
        let m = (v + 1) % 3;
        let p = if r % 2 == 0 { (v + 2) % 3 } else { m };
        let mut rd = StreamRound {
            r,
            v,
            p,
            m,
            kill_seq: None,
            published: Default::default(),
            acked: Default::default(),
            notes: Vec::new(),
        };
        eprintln!(
            "round {r} at {:.1?}: subscribers on {} (to be killed), publisher on {}, resume on {}",
            started.elapsed(),
            NODE_NAMES[v],
            NODE_NAMES[p],
            NODE_NAMES[m]
        );

        // The subscribers read and acknowledge on their own threads while the stream runs.
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for i in 0..2 {
            let c = match conns[i].take() {
                Some(c) => Some(c),
                None => resume_stream_sub(&nodes[v], NODE_NAMES[v], i, &logs[i], &mut rd.notes),
            };
            if let Some(c) = c {
                readers.push((i, spawn_stream_reader(c, logs[i].clone(), stop.clone())));
            }
        }

        // The stream, alternately QoS 1 to stream/q1 and QoS 2 to stream/q2, payload
        // "round:seq". V dies with a PUBLISH on the wire once BEFORE_KILL were acknowledged.
        let mut publ = StreamPublisher::new(nodes[p].mqtt, format!("kill-pub-{r}"));
        let mut seq = 0;
        let mut after_kill = 0;
        loop {
            let killed = rd.kill_seq.is_some();
            if killed && after_kill >= AFTER_KILL {
                break;
            }
            let i = seq % 2;
            let (topic, qos, _, _) = STREAM_SUBS[i];
            let payload = format!("{r}:{seq}");
            let kill_now = !killed && rd.acked[0].len() + rd.acked[1].len() >= BEFORE_KILL;
            let victim = if kill_now { Some(&mut nodes[v]) } else { None };
            let ok = publ.publish(topic, qos, payload.as_bytes(), victim);
            if kill_now {
                nodes[v].kill9(); // no-op: the publisher killed it already
                rd.kill_seq = Some(seq);
                eprintln!(
                    "round {r}: killed {} at {:.1?} with {payload} on the wire",
                    NODE_NAMES[v],
                    started.elapsed()
                );
            }
            if rd.kill_seq.is_some() {
                after_kill += 1;
            }
            rd.published[i].push(payload.clone());
            if ok {
                rd.acked[i].push(payload);
            } else {
                rd.notes.push(format!(
                    "{payload} never acknowledged by {} (live), stream stopped",
                    NODE_NAMES[p]
                ));
                break;
            }
            seq += 1;
        }
        if rd.kill_seq.is_none() {
            nodes[v].kill9();
            rd.kill_seq = Some(seq);
        }
        drop(publ);
        stop.store(true, Ordering::SeqCst);
        // Connections to the dead V: closed, or dropped here.
        drop(join_stream_readers(readers, None, &mut rd.notes));

        // Resume both sessions on M (an election may be under way) and drain.
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for (i, log) in logs.iter().enumerate() {
            if let Some(c) = resume_stream_sub(&nodes[m], NODE_NAMES[m], i, log, &mut rd.notes) {
                readers.push((i, spawn_stream_reader(c, log.clone(), stop.clone())));
            }
        }
        wait_stream_drained(&logs, &rd.acked, IDLE, DRAIN_CAP);
        stop.store(true, Ordering::SeqCst);
        conns = join_stream_readers(readers, Some(NODE_NAMES[m]), &mut rd.notes);

        // V comes back (same data directory, node id and gRPC port) before the next round.
        if r + 1 < ROUNDS {
            nodes[v].restart();
            if let Err(e) = probe_ready(&nodes[v]) {
                rd.notes
                    .push(format!("restarted {} not ready: {e}", NODE_NAMES[v]));
            }
        }
        eprintln!("{}", rd.verdict(&logs).1);
        rounds.push(rd);
        v = m;
    }

    // The verdicts again over everything received (a late duplicate counts for its round).
    eprintln!("==== all rounds, {:.1?} in ====", started.elapsed());
    let mut failed = Vec::new();
    for rd in &rounds {
        let (ok, report) = rd.verdict(&logs);
        eprintln!("{report}");
        if !ok {
            failed.push(rd.r);
        }
    }
    let mut odd = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        let l = lock(log);
        let id = STREAM_SUBS[i].3;
        odd.extend(l.odd.iter().map(|o| format!("{id}: {o}")));
        odd.extend(
            l.got
                .iter()
                .filter(|d| !(0..ROUNDS).any(|r| d.text.starts_with(&format!("{r}:"))))
                .map(|d| format!("{id}: unexpected {:?} on {}", d.text, d.topic)),
        );
    }
    for o in &odd {
        eprintln!("odd: {o}");
    }
    assert!(
        failed.is_empty() && odd.is_empty(),
        "rounds failed: {failed:?}; protocol oddities: {odd:?} (reports above)"
    );
}

// ----- 8. minority partition ---------------------------------------------------------------------

/// A gauge's value on `node`: its samples with or without labels, summed (0 when absent).
fn gauge(node: &Node, name: &str) -> f64 {
    let text = node.metrics();
    metric_sum(&text, &format!("{name} ")) + metric_sum(&text, &format!("{name}{{"))
}

/// Waits until gauge `name` on `node` is `want`, until `deadline`; the last value seen if not.
fn gauge_by(node: &Node, name: &str, want: f64, deadline: Instant) -> Result<(), f64> {
    loop {
        let v = gauge(node, name);
        if v == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(v);
        }
        sleep(Duration::from_millis(100));
    }
}

/// Waits up to `secs` until gauge `name` on `node` (called `who`) is `want`.
#[track_caller]
fn wait_gauge(node: &Node, who: &str, name: &str, want: f64, secs: u64) {
    if let Err(v) = gauge_by(node, name, want, Instant::now() + Duration::from_secs(secs)) {
        panic!("{name} on {who} is {v} after {secs} s, wanted {want}");
    }
}

/// The end of a node's log, for failure messages.
fn log_tail(node: &Node) -> String {
    let log = node.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Nodes frozen with SIGSTOP (their sockets stay open, nothing answers). Dropping the guard
/// sends SIGCONT, also when the test panics, so no process stays stopped.
struct Frozen<'a>(Vec<(&'a Node, &'static str)>);

impl<'a> Frozen<'a> {
    fn freeze(nodes: &[(&'a Node, &'static str)]) -> Frozen<'a> {
        let mut f = Frozen(Vec::new());
        for &(n, name) in nodes {
            // Kept before the signal: a node it may have reached gets SIGCONT in any case.
            f.0.push((n, name));
            assert!(n.signal("STOP"), "SIGSTOP to {name} failed");
        }
        f
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        for (n, name) in self.0.drain(..) {
            if !n.signal("CONT") {
                eprintln!("SIGCONT to {name} failed");
            }
        }
    }
}

/// B and C are frozen with SIGSTOP, leaving A a minority of one. Once A marked them down, A
/// still serves what needs no Raft commit (clean sessions: CONNECT, SUBSCRIBE, QoS 0 and 1
/// publishes between them), and refuses a persistent CONNECT with CONNACK "server
/// unavailable" (3.1.1: 3, 5: 0x88) instead of leaving it unanswered. After SIGCONT, writes
/// work again: a persistent session connects on A and gets a QoS 1 message published on C,
/// and a tenant and a retained message written before the partition are there on B and C.
#[test]
fn minority_refuses_durable_writes_and_heals() {
    const MGMT: &str = "management/admin";
    let [a, b, c] = cluster3(&[]);

    // Written before the partition, through A: a tenant and a retained message.
    let (status, v) = rest(
        &a,
        "POST",
        "/tenant/tenants",
        MGMT,
        ADMIN_PW,
        Some(json!({
            "company": "Before Partition Ltd",
            "domain": "beforepartition",
            "adminName": "admin",
            "adminPass": "Adm-before-9k!",
        })),
    );
    assert_eq!(status, 201, "create tenant on A: {v}");
    let tid = v["id"].as_str().expect("tenant id").to_string();
    let mut pa = Client::clean(a.mqtt, "mh-ret-pub", V3);
    publish_retained(&mut pa, "mh/ret/x", b"before partition");
    pa.disconnect();
    eprintln!(
        "before the partition: Raft leader per A is node {}",
        gauge(&a, "fleetmq_raft_leader_id{group=\"0\"}")
    );

    let frozen = Frozen::freeze(&[(&b, "B"), (&c, "C")]);
    let frozen_at = Instant::now();
    // Heartbeats every 500 ms, a failed call (2 s RPC timeout) marks a peer down.
    wait_gauge(&a, "A", "fleetmq_cluster_peers_down", 2.0, 10);
    eprintln!("A marked B and C down after {:.1?}", frozen_at.elapsed());

    // Clean sessions need no Raft: connect, subscribe and publish QoS 0 and 1 on A.
    let mut sub = connect_within(&a, "mh-clean-sub", V3, false, 10).0;
    sub.sub_ok("mh/minority/#", 1);
    let mut publ = connect_within(&a, "mh-clean-pub", V3, false, 10).0;
    publ.publish("mh/minority/q0", b"zero", 0);
    publ.publish("mh/minority/q1", b"one", 1);
    assert_eq!(
        receive_sorted(&mut sub, 2, 10),
        vec![
            ("mh/minority/q0".to_string(), "zero".to_string(), 0),
            ("mh/minority/q1".to_string(), "one".to_string(), 1),
        ],
        "clean subscriber on the minority node A"
    );

    // A persistent session needs a commit: refused with a CONNACK, within 20 s (the
    // proposal is retried for 5 s without a reachable leader), never left hanging.
    let attempts: Vec<_> = [(V3, "mh-durable-v4", 3u8), (V5, "mh-durable-v5", 0x88u8)]
        .into_iter()
        .map(|(v5, id, want)| {
            let addr = a.mqtt;
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut raw = Raw::connect(addr);
                raw.send(&connect_packet(id, v5, false, v5.then_some(3600)));
                let ack = read_packet(&mut raw, Duration::from_secs(20));
                (id, want, ack, t0.elapsed())
            })
        })
        .collect();
    for h in attempts {
        let (id, want, ack, took) = h.join().expect("CONNECT thread panicked");
        let ack = ack.unwrap_or_else(|| {
            let how = if took < Duration::from_secs(19) {
                "closed without a CONNACK"
            } else {
                "no CONNACK within 20 s"
            };
            panic!(
                "{id}: persistent CONNECT on the minority node A: {how} after {took:.1?}, \
                 wanted CONNACK {want:#04x} (server unavailable)"
            )
        });
        assert_eq!(ack.kind(), CONNACK, "{id}: {ack:?}");
        assert_eq!(
            ack.body.get(1).copied(),
            Some(want),
            "{id}: persistent CONNECT on the minority node A answered {ack:?} after {took:.1?}, \
             wanted return code {want:#04x} (server unavailable)"
        );
        eprintln!("{id}: refused with {want:#04x} after {took:.1?}");
    }

    // Heal: SIGCONT (the guard), then every node sees every peer up again.
    drop(frozen);
    for (n, name) in [(&a, "A"), (&b, "B"), (&c, "C")] {
        wait_gauge(n, name, "fleetmq_cluster_peers_down", 0.0, 20);
    }

    // Writes work again: the session refused before connects (persistent) on A, subscribes,
    // and gets a QoS 1 message published on C.
    let (mut durable, _) = connect_within(&a, "mh-durable-v4", V3, true, 20);
    durable.sub_ok("mh/heal/#", 1);
    let mut pc = connect_within(&c, "mh-heal-pub", V3, false, 20).0;
    pc.publish("mh/heal/x", b"after heal", 1);
    assert_eq!(
        receive_sorted(&mut durable, 1, 10),
        vec![("mh/heal/x".to_string(), "after heal".to_string(), 1)],
        "persistent subscriber on A after the partition healed, publisher on C"
    );

    // What was written before the partition is still there on the nodes that were frozen.
    for (n, name) in [(&b, "B"), (&c, "C")] {
        assert_retained_view(
            n,
            "mh/ret/#",
            &["before partition"],
            &format!("retained message set on A before the partition, read on {name}"),
        );
        wait_until(
            REPLICATION.as_secs(),
            &format!("tenant {tid} (created before the partition) on {name}"),
            || {
                rest(
                    n,
                    "GET",
                    &format!("/tenant/tenants/{tid}"),
                    MGMT,
                    ADMIN_PW,
                    None,
                )
                .0 == 200
            },
        );
    }
}

// ----- 9. join of a fourth node, graceful leave ---------------------------------------------------

/// `cluster3` plus D (id 4) joining A; C and D run with `--leave-on-shutdown` (on SIGTERM
/// they leave the membership, close their clients and exit 0).
fn cluster4_with_leavers() -> [Node; 4] {
    let leave: &[&str] = &["--leave-on-shutdown"];
    let a = Node::start_cluster(1, free_port(), &[], &[]);
    let b = Node::start_cluster(2, free_port(), &[a.grpc_addr()], &[]);
    let c = Node::start_cluster(3, free_port(), &[a.grpc_addr(), b.grpc_addr()], leave);
    let d = Node::start_cluster(4, free_port(), &[a.grpc_addr()], leave);
    [a, b, c, d]
}

/// What one subscriber of the leave test received over all its connections.
#[derive(Default)]
struct LeaveLog {
    /// (connection number, message), in arrival order.
    got: Vec<(u32, Msg)>,
    /// (connection number, reason) of every DISCONNECT the server sent.
    disconnects: Vec<(u32, u8)>,
    /// Any other packet.
    other: Vec<String>,
    conn: u32,
}

fn lock_leave(log: &Mutex<LeaveLog>) -> MutexGuard<'_, LeaveLog> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads a subscriber on its own thread, acknowledging QoS 1, until the server closes the
/// connection (returns true) or `stop` is set (false). Bounded at 120 s.
fn spawn_leave_reader(
    mut c: Client,
    log: Arc<Mutex<LeaveLog>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<bool> {
    std::thread::spawn(move || {
        use std::io::Write as _;
        let conn = {
            let mut l = lock_leave(&log);
            l.conn += 1;
            l.conn
        };
        let hard_stop = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::SeqCst) && Instant::now() < hard_stop {
            let t0 = Instant::now();
            match c.recv(Duration::from_millis(300)) {
                Some(p) => {
                    let mut l = lock_leave(&log);
                    match p.kind() {
                        PUBLISH => {
                            let m = parse_publish(&p, c.v5);
                            if m.qos == 1 {
                                let _ = c.raw.s.write_all(&ack_packet(PUBACK, m.pid));
                            }
                            l.got.push((conn, m));
                        }
                        DISCONNECT => l
                            .disconnects
                            .push((conn, disconnect_reason(&p).unwrap_or(0))),
                        _ => l.other.push(format!("conn {conn}: {p:?}")),
                    }
                }
                // A read that gives up well before its timeout met EOF or a reset.
                None if t0.elapsed() < Duration::from_millis(200) => return true,
                None => {}
            }
        }
        false
    })
}

/// D (id 4) joins a three-node cluster as a fourth member (a learner: still 3 voters) and
/// routes both ways. Then a publisher on B streams 200 QoS 1 messages to two persistent
/// subscribers on C (3.1.1 clean_session=false, 5 with session expiry), and C, started with
/// `--leave-on-shutdown`, gets SIGTERM halfway: it exits 0, the MQTT 5 subscriber gets
/// DISCONNECT 0x8B first, the subscribers resume on D (session present) and get every
/// message B acknowledged (at least once), and the membership shrinks to 3 with 3 voters (D
/// promoted).
#[test]
fn fourth_node_joins_and_a_node_leaves_gracefully() {
    const TOPIC: &str = "leave/stream";
    const TOTAL: usize = 200;
    /// Acknowledged messages before C gets SIGTERM.
    const HALF: usize = 100;
    let [a, b, mut c, d] = cluster4_with_leavers();

    // D is a member everywhere; a learner, so A still has 3 voters.
    for (n, name) in [(&a, "A"), (&d, "D")] {
        wait_gauge(n, name, "fleetmq_cluster_members", 4.0, 10);
    }
    wait_gauge(&a, "A", "fleetmq_raft_voters{group=\"0\"}", 3.0, 10);

    // D routes both ways: a persistent subscriber on D gets what A publishes, a subscriber on
    // A what D publishes.
    let (mut sub_d, present) = Client::persistent(d.mqtt, "j4-sub-d", V3);
    assert!(!present, "j4-sub-d: a new session is not present");
    sub_d.sub_ok("j4/to-d/#", 1);
    let mut sub_a = Client::clean(a.mqtt, "j4-sub-a", V5);
    sub_a.sub_ok("j4/to-a/#", 1);
    let mut pub_a = Client::clean(a.mqtt, "j4-pub-a", V3);
    pub_a.publish("j4/to-d/x", b"from A", 1);
    let mut pub_d = Client::clean(d.mqtt, "j4-pub-d", V5);
    pub_d.publish("j4/to-a/x", b"from D", 1);
    let got = receive_sorted(&mut sub_d, 1, 10);
    assert_eq!(
        got,
        vec![("j4/to-d/x".to_string(), "from A".to_string(), 1)],
        "persistent subscriber on D, publisher on A"
    );
    assert_eq!(
        receive_sorted(&mut sub_a, 1, 10),
        vec![("j4/to-a/x".to_string(), "from D".to_string(), 1)],
        "subscriber on A, publisher on D"
    );
    for cl in [sub_d, sub_a, pub_a, pub_d] {
        cl.disconnect();
    }

    // The session shards rebalance onto D: of the 4 shards x 3 voters, D holds 3 seats and
    // leads one shard, as each of A, B and C (leaderships move once a shard is quiet for 1 s).
    let shards = gauge(&a, "fleetmq_cluster_shards") as u64;
    assert_eq!(shards, 4, "the default shard count");
    let seats_d = || -> f64 {
        (1..=shards)
            .map(|g| gauge(&d, &format!("fleetmq_raft_is_voter{{group=\"{g}\"}}")))
            .sum()
    };
    let leaders = || -> Vec<u64> {
        let mut l: Vec<u64> = (1..=shards)
            .map(|g| gauge(&a, &format!("fleetmq_raft_leader_id{{group=\"{g}\"}}")) as u64)
            .collect();
        l.sort();
        l
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while seats_d() != 3.0 || leaders() != vec![1, 2, 3, 4] {
        assert!(
            Instant::now() < deadline,
            "after 30 s D holds {} shard seats (want 3) and the shard leaders are {:?} (want one \
             each); shard changes:\n{}",
            seats_d(),
            leaders(),
            [&a, &b, &c, &d]
                .iter()
                .flat_map(|n| n.log().lines().map(str::to_string).collect::<Vec<_>>())
                .filter(|l| l.contains("shard"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        sleep(Duration::from_millis(200));
    }

    // Two persistent subscribers on C, read on their own threads.
    let subs = [(V3, "leave-s4"), (V5, "leave-s5")];
    let logs: [Arc<Mutex<LeaveLog>>; 2] = Default::default();
    let stop_c = Arc::new(AtomicBool::new(false));
    let mut readers_c = Vec::new();
    for ((v5, id), log) in subs.iter().zip(&logs) {
        let (mut s, present) = Client::persistent(c.mqtt, id, *v5);
        assert!(!present, "{id}: a new session is not present");
        s.sub_ok(TOPIC, 1);
        readers_c.push(spawn_leave_reader(s, log.clone(), stop_c.clone()));
    }

    // The stream from B: one QoS 1 flow at a time (resent with DUP on a new connection when
    // unacknowledged), slower in its second half so that it spans C's leave. Bounded at 90 s.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let publisher = {
        let acked = acked.clone();
        let addr = b.mqtt;
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut p = StreamPublisher::new(addr, "leave-pub".to_string());
            let mut published = Vec::new();
            let mut unacked = Vec::new();
            for i in 0..TOTAL {
                if Instant::now() >= deadline {
                    break;
                }
                let payload = format!("lv-{i}");
                published.push(payload.clone());
                if p.publish(TOPIC, 1, payload.as_bytes(), None) {
                    acked
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(payload);
                } else {
                    unacked.push(payload);
                }
                sleep(Duration::from_millis(if i < HALF { 5 } else { 25 }));
            }
            (published, unacked)
        })
    };
    let n_acked = || acked.lock().unwrap_or_else(|e| e.into_inner()).len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while n_acked() < HALF {
        assert!(
            Instant::now() < deadline && !publisher.is_finished(),
            "only {} of the first {HALF} messages were acknowledged by B",
            n_acked()
        );
        sleep(Duration::from_millis(5));
    }

    // SIGTERM to C mid-stream: it leaves the cluster and exits 0.
    let mut failures: Vec<String> = Vec::new();
    eprintln!("SIGTERM to C with {} of {TOTAL} acknowledged", n_acked());
    let status = c.sigterm();
    let exited = Instant::now();
    eprintln!("C exited with {status} ({} acknowledged so far)", n_acked());
    if !status.success() {
        failures.push(format!(
            "C (--leave-on-shutdown) exited with {status} on SIGTERM; end of its log:\n{}",
            log_tail(&c)
        ));
    }
    // The process is gone: its connections are closed.
    let until = Instant::now() + Duration::from_secs(5);
    while readers_c.iter().any(|h| !h.is_finished()) && Instant::now() < until {
        sleep(Duration::from_millis(20));
    }
    stop_c.store(true, Ordering::SeqCst);
    for h in readers_c {
        h.join().expect("reader on C panicked");
    }
    for ((v5, id), log) in subs.iter().zip(&logs) {
        let l = lock_leave(log);
        if l.got.is_empty() {
            failures.push(format!("{id}: nothing received on C before its SIGTERM"));
        }
        let want: Vec<(u32, u8)> = if *v5 { vec![(1, 0x8B)] } else { vec![] };
        if l.disconnects != want {
            failures.push(format!(
                "{id} on C: server DISCONNECT reasons {:02x?}, wanted {want:02x?} (5: 0x8B \
                 server shutting down; 3.1.1: closed without one)",
                l.disconnects
            ));
        }
    }

    // The subscribers resume on D.
    let stop_d = Arc::new(AtomicBool::new(false));
    let mut readers_d = Vec::new();
    for ((v5, id), log) in subs.iter().zip(&logs) {
        let (s, present) = connect_within(&d, id, *v5, true, 30);
        if !present {
            failures.push(format!("{id}: session not present on D after C left"));
        }
        readers_d.push(spawn_leave_reader(s, log.clone(), stop_d.clone()));
    }

    // The membership shrank to A, B and D within 10 s of C's exit, D a voter now.
    let by = exited + Duration::from_secs(10);
    for (n, name) in [(&a, "A"), (&d, "D")] {
        if let Err(v) = gauge_by(n, "fleetmq_cluster_members", 3.0, by) {
            failures.push(format!(
                "fleetmq_cluster_members on {name} is {v} 10 s after C left, wanted 3"
            ));
        }
    }
    if let Err(v) = gauge_by(&a, "fleetmq_raft_voters{group=\"0\"}", 3.0, by) {
        failures.push(format!(
            "fleetmq_raft_voters on A is {v} 10 s after C left, wanted 3 (D promoted)"
        ));
    }
    // Every shard has three voters again, none of them C, and C leads nothing.
    if let Err(v) = gauge_by(&a, "fleetmq_raft_voters", 3.0 * (shards + 1) as f64, by) {
        failures.push(format!(
            "voters over all groups on A: {v} 10 s after C left, wanted {}",
            3 * (shards + 1)
        ));
    }
    for g in 1..=shards {
        let l = gauge(&a, &format!("fleetmq_raft_leader_id{{group=\"{g}\"}}"));
        if l == 3.0 || l == 0.0 {
            failures.push(format!("shard {g} is led by {l} after C left"));
        }
    }

    // Every acknowledged message reaches both subscribers (on C or D), at least once.
    let (published, unacked) = publisher.join().expect("publisher thread panicked");
    let acked: Vec<String> = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if published.len() < TOTAL {
        failures.push(format!(
            "publisher on B stopped at its deadline after {} of {TOTAL}",
            published.len()
        ));
    }
    if !unacked.is_empty() {
        failures.push(format!(
            "B never acknowledged {} publishes during C's graceful leave: {:?}",
            unacked.len(),
            unacked
        ));
    }
    let received_all = |log: &Mutex<LeaveLog>| {
        let l = lock_leave(log);
        let seen: HashSet<&str> = l
            .got
            .iter()
            .map(|(_, m)| m.payload.as_slice())
            .map(|p| std::str::from_utf8(p).unwrap_or(""))
            .collect();
        acked.iter().all(|a| seen.contains(a.as_str()))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logs.iter().all(|l| received_all(l)) && Instant::now() < deadline {
        sleep(Duration::from_millis(100));
    }
    // A little longer, for stray packets.
    sleep(Duration::from_millis(500));
    stop_d.store(true, Ordering::SeqCst);
    for h in readers_d {
        h.join().expect("reader on D panicked");
    }

    let published: HashSet<&str> = published.iter().map(String::as_str).collect();
    for ((_, id), log) in subs.iter().zip(&logs) {
        let l = lock_leave(log);
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut stray = Vec::new();
        let mut on_d = 0;
        for (conn, m) in &l.got {
            *seen.entry(m.text()).or_default() += 1;
            if *conn > 1 {
                on_d += 1;
            }
            if m.topic != TOPIC || m.qos != 1 || !published.contains(m.text().as_str()) {
                stray.push(format!(
                    "conn {conn}: {:?} on {} at QoS {}",
                    m.text(),
                    m.topic,
                    m.qos
                ));
            }
        }
        let lost: Vec<&String> = acked.iter().filter(|a| !seen.contains_key(*a)).collect();
        let copies: usize = seen.values().map(|n| n - 1).sum();
        eprintln!(
            "{id}: published {} acknowledged {} received {} ({} on D, extra copies {copies}) \
             lost {}",
            published.len(),
            acked.len(),
            seen.len(),
            on_d,
            lost.len()
        );
        if !lost.is_empty() {
            failures.push(format!(
                "{id}: {} of {} acknowledged messages never received: {:?}",
                lost.len(),
                acked.len(),
                lost
            ));
        }
        if !stray.is_empty() {
            failures.push(format!("{id}: unexpected deliveries: {stray:?}"));
        }
        if !l.other.is_empty() {
            failures.push(format!("{id}: unexpected packets: {:?}", l.other));
        }
        // Only C's shutdown may send a DISCONNECT (connection 1).
        if l.disconnects.iter().any(|(conn, _)| *conn > 1) {
            failures.push(format!("{id}: DISCONNECT on D: {:02x?}", l.disconnects));
        }
    }
    assert!(
        failures.is_empty(),
        "graceful leave of C:\n- {}",
        failures.join("\n- ")
    );
}

/// An MQTT 5 PUBACK says "no matching subscribers" (0x10) only when no node has one: a
/// subscriber on another node, clean or persistent, makes it 0x00.
#[test]
fn puback_reason_counts_subscribers_on_other_nodes() {
    let [a, _b, c] = cluster3(&[]);
    let mut clean = Client::clean(a.mqtt, "rc-clean", V3);
    clean.sub_ok("rc/clean", 1);
    let (mut persistent, _) = Client::persistent(a.mqtt, "rc-persistent", V3);
    persistent.sub_ok("rc/persistent", 1);
    drop(persistent); // offline: its messages go through Raft

    let mut publisher = Client::clean(c.mqtt, "rc-pub", V5);
    let mut next_pid = 0u16;
    let mut reason = |topic: &str| {
        next_pid += 1;
        let pid = next_pid;
        publisher.send(&publish_packet(true, topic.as_bytes(), 1, pid, false, b"x"));
        let ack = publisher.expect(PUBACK, "PUBACK");
        assert_eq!(ack.pid(), pid);
        // v5 PUBACK: packet id, then the reason code (absent means 0x00).
        ack.body.get(2).copied().unwrap_or(0)
    };
    assert_eq!(reason("rc/clean"), 0x00, "clean subscriber on A");
    assert_eq!(
        reason("rc/persistent"),
        0x00,
        "offline persistent subscriber on A"
    );
    assert_eq!(reason("rc/nobody"), 0x10, "no subscriber anywhere");
}

// ----- 11. a dead voter is replaced ----------------------------------------------------------------

/// Four nodes, A B C voting and D a learner, with `--dead-node-after 2`. C is killed with
/// SIGKILL: within seconds the leader makes D a voter in C's place. Then B is killed too: with
/// the original voters that would leave A alone of three (no majority, no durable write), but
/// A and D are two of the three voters {A, B, D}, so a persistent session still connects and
/// gets a QoS 1 message through Raft. C restarts and catches up as a learner.
#[test]
fn a_dead_voter_is_replaced_by_a_learner() {
    let args: &[&str] = &["--dead-node-after", "2"];
    let a = Node::start_cluster(1, free_port(), &[], args);
    let mut b = Node::start_cluster(2, free_port(), &[a.grpc_addr()], args);
    let mut c = Node::start_cluster(3, free_port(), &[a.grpc_addr()], args);
    let d = Node::start_cluster(4, free_port(), &[a.grpc_addr()], args);
    wait_gauge(&d, "D", "fleetmq_cluster_members", 4.0, 10);
    wait_gauge(&a, "A", "fleetmq_raft_voters{group=\"0\"}", 3.0, 10);
    assert_eq!(
        gauge(&d, "fleetmq_raft_is_voter{group=\"0\"}"),
        0.0,
        "D starts as a learner"
    );

    // A persistent session with a subscription, written while all four run.
    let (mut s, _) = connect_within(&a, "dv-sub", V3, true, 10);
    s.sub_ok("dv/#", 1);
    drop(s);

    c.kill9();
    wait_gauge(&d, "D", "fleetmq_raft_is_voter{group=\"0\"}", 1.0, 30);
    wait_gauge(&a, "A", "fleetmq_raft_voters{group=\"0\"}", 3.0, 10);
    // The session shards too: with C dead, A, B and D are the voters of every one of them.
    let layout = |n: &Node| {
        rest(
            n,
            "GET",
            "/fleetmq/cluster/nodes",
            "management/admin",
            ADMIN_PW,
            None,
        )
        .1
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let groups = layout(&a)["groups"].clone();
        let all = groups.as_array().cloned().unwrap_or_default();
        if all.len() == 5 && all.iter().all(|g| g["voters"] == json!([1, 2, 4])) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "30 s after C's kill the groups on A are {groups}"
        );
        sleep(Duration::from_millis(200));
    }

    let before = layout(&d);
    b.kill9();
    // A and D: two of the three voters. Durable writes work (after an election if B led).
    let Ok((mut p, _)) = try_connect_within(d.mqtt, "dv-pub", V3, true, 20) else {
        panic!(
            "dv-pub: no CONNACK 0 on D with A and D alive; groups before B's kill: {}\nnow on A: {}\nnow on D: {}",
            before["groups"],
            layout(&a)["groups"],
            layout(&d)["groups"]
        );
    };
    p.publish("dv/x", b"after two kills", 1);
    let (mut s, present) = connect_within(&a, "dv-sub", V3, true, 20);
    assert!(
        present,
        "dv-sub: the session written before the kills is present"
    );
    assert_receives_all(&mut s, &[b"after two kills".to_vec()], 10, "dv-sub on A");

    // C comes back as a learner and catches up with what was written without it.
    c.restart();
    wait_gauge(&c, "C", "fleetmq_raft_is_voter{group=\"0\"}", 0.0, 20);
    let deadline = Instant::now() + REPLICATION;
    let want = gauge(&a, "fleetmq_raft_applied_index");
    while gauge(&c, "fleetmq_raft_applied_index") < want {
        assert!(
            Instant::now() < deadline,
            "C did not catch up:\n{}",
            log_tail(&c)
        );
        sleep(Duration::from_millis(100));
    }
}

// ----- 12. the registry forgets ended sessions ------------------------------------------------------

/// The home registry does not keep every client id it has seen: 200 clean sessions connect
/// and disconnect through A (their homes spread over A, B and C), and the registry entries of
/// the three nodes come back to the one client still connected. Without unregistration they
/// would stay at about 200, growing with every new client id (a connection storm's memory).
#[test]
fn registry_forgets_ended_sessions() {
    let [a, b, c] = cluster3(&[]);
    let _stays = Client::clean(b.mqtt, "rg-stays", V5);
    for i in 0..200 {
        let id = format!("rg-{i}");
        let cl = Client::clean(a.mqtt, &id, i % 2 == 0);
        cl.disconnect();
    }
    let total = || {
        [&a, &b, &c]
            .iter()
            .map(|n| gauge(n, "fleetmq_cluster_registry_entries"))
            .sum::<f64>()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while total() != 1.0 {
        assert!(
            Instant::now() < deadline,
            "registry entries stay at {} (wanted 1)",
            total()
        );
        sleep(Duration::from_millis(200));
    }
}

// ----- 13. sessions of a dead node expire ----------------------------------------------------------

/// A persistent session whose node was killed expires on time although no node holds it: two
/// MQTT 5 sessions on B, one with a 2 s expiry and one with an hour; B is killed with SIGKILL.
/// Some seconds later the short one is gone (a new connection on A finds no session) and the
/// long one is still there (session present, with its subscription).
#[test]
fn sessions_of_a_dead_node_expire_on_time() {
    // A node counts as dead (its sessions as orphans) 2 s after it stops answering.
    let [a, mut b, _c] = cluster3(&["--dead-node-after", "2"]);
    let (mut short, _) = Client::connect(b.mqtt, "ex-short", V5, false, Some(2));
    short.sub_ok("ex/short", 1);
    let (mut long, _) = Client::connect(b.mqtt, "ex-long", V5, false, Some(3600));
    long.sub_ok("ex/long", 1);
    b.kill9();
    // Down is noticed within a heartbeat, dead 2 s later, the expiry runs 2 s from then,
    // and the leader sweeps every 2 s.
    sleep(Duration::from_secs(9));
    let (_, present) = connect_within(&a, "ex-long", V5, true, 20);
    assert!(present, "the hour-long session expired with its node");
    let (_, present) = connect_within(&a, "ex-short", V5, true, 20);
    assert!(
        !present,
        "the 2 s session of the killed node was still there after 9 s"
    );
}

// ----- 14. shared subscriptions across nodes ---------------------------------------------------------

/// Every message to a shared subscription goes to one member in the whole cluster, and the
/// members on different nodes take turns: group `g1` has a member on A and one on B; 40 QoS 1
/// messages published on C (no member there) and 40 on A (a member there) each reach exactly
/// one of them, and each member gets a fair part. Before, every node with a member delivered
/// its own copy.
#[test]
fn shared_subscription_delivers_once_across_nodes() {
    let [a, b, c] = cluster3(&[]);
    let mut ma = Client::clean(a.mqtt, "sh-member-a", V3);
    ma.sub_ok("$share/g1/sh/#", 1);
    let mut mb = Client::clean(b.mqtt, "sh-member-b", V5);
    mb.sub_ok("$share/g1/sh/#", 1);
    for (node, name) in [(&c, "C"), (&a, "A")] {
        let mut p = Client::clean(node.mqtt, &format!("sh-pub-{name}"), V5);
        let want = payloads(&format!("from-{name}"), 40);
        p.publish_many("sh/x", &want, 1);
        let got_a = drain_msgs(&mut ma, Duration::from_millis(1500));
        let got_b = drain_msgs(&mut mb, Duration::from_millis(500));
        let mut all: Vec<Vec<u8>> = got_a
            .iter()
            .chain(&got_b)
            .map(|m| m.payload.clone())
            .collect();
        all.sort();
        let mut expected = want.clone();
        expected.sort();
        assert_eq!(
            all,
            expected,
            "published on {name}: member A got {}, member B got {}; wanted each message once",
            got_a.len(),
            got_b.len()
        );
        assert!(
            got_a.len() >= 8 && got_b.len() >= 8,
            "published on {name}: unbalanced, A got {} and B got {}",
            got_a.len(),
            got_b.len()
        );
    }
}

// ----- 15. wills on a takeover across nodes ------------------------------------------------------------

/// The only member of a shared group is a persistent session on B, and B is killed. What A's
/// publisher gets acknowledged meanwhile waits in that session through Raft: right after the
/// kill (the forward to B fails and A falls back), and once B is known down (no live node
/// serves the group). The member resumes on C and gets every message.
#[test]
fn persistent_shared_member_loses_nothing_when_its_node_dies() {
    let [a, mut b, c] = cluster3(&[]);
    let (mut m, _) = Client::persistent(b.mqtt, "psh-member", V5);
    m.sub_ok("$share/g/psh/#", 1);
    let mut p = Client::clean(a.mqtt, "psh-pub", V3);
    let before = payloads("psh-before", 10);
    p.publish_many("psh/x", &before, 1);
    assert_receives_all(&mut m, &before, 10, "member on B");
    drop(m);

    b.kill9();
    let at_once = payloads("psh-at-once", 10);
    p.publish_many("psh/x", &at_once, 1);
    wait_until(20, "A marks B down", || {
        gauge(&a, "fleetmq_cluster_peers_down") == 1.0
    });
    let later = payloads("psh-later", 10);
    p.publish_many("psh/x", &later, 1);

    let (mut m, present) = Client::persistent(c.mqtt, "psh-member", V5);
    assert!(present, "the member's session resumes on C");
    let want: Vec<Vec<u8>> = at_once.iter().chain(&later).cloned().collect();
    assert_receives_all(&mut m, &want, 20, "member on C after B died");
}

/// An MQTT 5 CONNECT with session expiry 60 s and a QoS 0 will delayed by 30 s (longer than
/// the test looks, so only a session that ends publishes it).
fn connect_with_delayed_will(id: &str, clean: bool, will_payload: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5];
    body.push(if clean { 0x02 } else { 0x00 } | 0x04); // will flag, will QoS 0
    body.extend_from_slice(&0u16.to_be_bytes());
    body.extend_from_slice(&[5, 0x11]);
    body.extend_from_slice(&60u32.to_be_bytes());
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    body.extend_from_slice(&[5, 0x18]);
    body.extend_from_slice(&30u32.to_be_bytes());
    let topic = format!("wl/{id}");
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&(will_payload.len() as u16).to_be_bytes());
    body.extend_from_slice(will_payload.as_bytes());
    frame(0x10, &body)
}

fn connect_will_client(node: &Node, id: &str, clean: bool, payload: &str) -> Raw {
    let mut raw = Raw::connect(node.mqtt);
    raw.send(&connect_with_delayed_will(id, clean, payload));
    let ack = read_packet(&mut raw, Duration::from_secs(10)).expect("CONNACK");
    assert_eq!(ack.kind(), CONNACK, "{id}: {ack:?}");
    assert_eq!(ack.body[1], 0, "{id}: refused {ack:?}");
    raw
}

/// A clean start on B takes over a session with a delayed will on A: the old session ends, so
/// its will is published now, whether its connection was still open or already gone (the will
/// waiting for its delay). A resuming connection instead cancels the will, as on one node.
#[test]
fn will_of_a_session_ended_by_a_takeover_on_another_node() {
    let [a, b, c] = cluster3(&[]);
    let mut watcher = Client::clean(c.mqtt, "wl-watch", V5);
    watcher.sub_ok("wl/#", 0);

    // Connected on A, taken over by a clean start on B.
    let _w1 = connect_will_client(&a, "wl-1", false, "gone-1");
    let _w1b = connect_will_client(&b, "wl-1", true, "unused");
    // Disconnected on A (the will waits for its delay), then a clean start on B.
    let w2 = connect_will_client(&a, "wl-2", false, "gone-2");
    drop(w2);
    sleep(Duration::from_millis(500));
    let _w2b = connect_will_client(&b, "wl-2", true, "unused");
    let got: Vec<String> = drain_msgs(&mut watcher, Duration::from_secs(3))
        .iter()
        .map(|m| m.text())
        .collect();
    assert!(
        got.contains(&"gone-1".to_string()),
        "no will of the connected session: {got:?}"
    );
    assert!(
        got.contains(&"gone-2".to_string()),
        "no will of the waiting session: {got:?}"
    );

    // Disconnected on A, resumed on B: the session continues and its will is cancelled.
    let w3 = connect_will_client(&a, "wl-3", false, "gone-3");
    drop(w3);
    sleep(Duration::from_millis(500));
    let _w3b = connect_will_client(&b, "wl-3", false, "unused");
    let got: Vec<String> = drain_msgs(&mut watcher, Duration::from_secs(2))
        .iter()
        .map(|m| m.text())
        .collect();
    assert!(
        got.is_empty(),
        "a resumed session's will was published: {got:?}"
    );
}

// ----- 16. the cluster secret ---------------------------------------------------------------------------

/// A `fleetmq` process (node id 9) that tries to join `a` with `args`, logging to a file in
/// `dir`; the caller kills it.
fn spawn_intruder(
    a: &Node,
    dir: &std::path::Path,
    args: &[&str],
) -> (std::process::Child, std::path::PathBuf) {
    let log_path = dir.join("intruder.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fleetmq"))
        .args(["--node-id", "9", "--join", &a.grpc_addr().to_string()])
        .args(args)
        .args(["--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--grpc-addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0"])
        .args(["--tls-addr", "127.0.0.1:0", "--wss-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("FLEETMQ_LOG", "info,openraft=warn")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn intruder");
    (child, log_path)
}

/// A cluster CA and certificates it signs for 127.0.0.1 (server and client use), as PEM files
/// in `dir`: `(ca, [(cert, key)])`.
fn cluster_pki(dir: &std::path::Path, name: &str, nodes: usize) -> (String, Vec<(String, String)>) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(vec![]).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} cluster CA"));
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let write = |file: String, text: String| {
        let path = dir.join(file);
        std::fs::write(&path, text).expect("write PEM");
        path.to_string_lossy().into_owned()
    };
    let ca_path = write(format!("{name}-ca.pem"), ca.pem());
    let certs = (0..nodes)
        .map(|i| {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut p =
                rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
            p.subject_alt_names
                .push(rcgen::SanType::IpAddress(std::net::IpAddr::from([
                    127, 0, 0, 1,
                ])));
            p.distinguished_name
                .push(rcgen::DnType::CommonName, format!("{name} node {i}"));
            p.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &ca, &ca_key).expect("sign");
            (
                write(format!("{name}-{i}.pem"), cert.pem()),
                write(format!("{name}-{i}.key"), key.serialize_pem()),
            )
        })
        .collect();
    (ca_path, certs)
}

/// With `--cluster-tls-*` the members talk mutual TLS: two nodes form a cluster and a message
/// crosses it; a node whose certificate another CA signed, and a node without TLS, cannot
/// join.
#[test]
fn members_talk_mutual_tls_and_refuse_other_certificates() {
    let pki = tempfile::tempdir().expect("tempdir");
    let (ca, certs) = cluster_pki(pki.path(), "ours", 2);
    let (other_ca, other) = cluster_pki(pki.path(), "theirs", 1);
    let tls = |cert: &(String, String), ca: &str| -> Vec<String> {
        vec![
            "--cluster-tls-cert".into(),
            cert.0.clone(),
            "--cluster-tls-key".into(),
            cert.1.clone(),
            "--cluster-tls-ca".into(),
            ca.to_string(),
        ]
    };
    let args_a = tls(&certs[0], &ca);
    let args_b = tls(&certs[1], &ca);
    let a = Node::start_cluster(
        1,
        free_port(),
        &[],
        &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let b = Node::start_cluster(
        2,
        free_port(),
        &[a.grpc_addr()],
        &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for (n, who) in [(&a, "A"), (&b, "B")] {
        assert_eq!(
            gauge(n, "fleetmq_cluster_members"),
            2.0,
            "members seen by {who}"
        );
    }
    let mut sub = Client::clean(a.mqtt, "tls-sub", V5);
    sub.sub_ok("tls/#", 1);
    let mut p = Client::clean(b.mqtt, "tls-pub", V3);
    p.publish("tls/x", b"over tls", 1);
    assert_eq!(
        receive_sorted(&mut sub, 1, 10),
        vec![("tls/x".to_string(), "over tls".to_string(), 1)]
    );

    let foreign = tls(&other[0], &other_ca);
    let foreign: Vec<&str> = foreign.iter().map(String::as_str).collect();
    for (args, what) in [
        (&foreign[..], "a certificate of another CA"),
        (&[][..], "no TLS"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut with_secret = vec!["--cluster-secret", CLUSTER_SECRET];
        with_secret.extend_from_slice(args);
        let (mut intruder, log_path) = spawn_intruder(&a, dir.path(), &with_secret);
        sleep(Duration::from_secs(4));
        let _ = intruder.kill();
        let _ = intruder.wait();
        assert_eq!(
            gauge(&a, "fleetmq_cluster_members"),
            2.0,
            "a node with {what} became a member:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
}

/// A node with the wrong `--cluster-secret` cannot join: the member refuses its calls
/// (`Unauthenticated`, counted), the intruder never becomes a member, and it says why.
#[test]
fn a_node_with_the_wrong_cluster_secret_cannot_join() {
    let a = Node::start_cluster(1, free_port(), &[], &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut intruder, log_path) =
        spawn_intruder(&a, dir.path(), &["--cluster-secret", "not-the-secret"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let refused = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("wrong or missing cluster secret") {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        sleep(Duration::from_millis(200));
    };
    let _ = intruder.kill();
    let _ = intruder.wait();
    assert!(
        refused,
        "the intruder's join was not refused for its secret:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    assert_eq!(
        gauge(&a, "fleetmq_cluster_members"),
        1.0,
        "the intruder became a member"
    );
    assert!(
        gauge(&a, "fleetmq_cluster_unauthenticated_calls_total") >= 1.0,
        "refused calls are not counted"
    );
}
