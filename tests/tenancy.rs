//! Multi-tenancy against a real node over real sockets: logins (`<tenant>/<user>`) and the
//! CONNACK code of every refusal (§1.3, §1.7), the Cumulocity ClientId forms naming one
//! device session (§1.4), isolation of tenants, the ACL of the reserved device-interface
//! topics (§2.2, §2.4), per-topic-class packet size limits (§1.9), bootstrap over MQTT (§6.1),
//! failed-login throttling, per-tenant quotas and the anonymous tenant. Tenants and users are
//! set up through the REST API. Each test runs its own node.
mod common;
mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use serde_json::{json, Value};
use support::*;

const V3: bool = false;
const V5: bool = true;
const UNSUBACK: u8 = 11;

// ----- REST set-up ---------------------------------------------------------------------------------

/// One REST call with Basic auth; `Ok((status, body))` for 2xx, `Err((status, text))` else.
fn rest(
    node: &Node,
    method: &str,
    path: &str,
    user: &str,
    password: &str,
    body: Option<Value>,
) -> Result<(u16, Value), (u16, String)> {
    let url = format!("http://{}{path}", node.http);
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    );
    let req = ureq::request(method, &url)
        .set("Authorization", &auth)
        .timeout(Duration::from_secs(30));
    let result = match body {
        Some(b) => req
            .set("Content-Type", "application/json")
            .send_string(&b.to_string()),
        None => req.call(),
    };
    match result {
        Ok(r) => {
            let status = r.status();
            let text = r.into_string().unwrap_or_default();
            Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
        }
        Err(ureq::Error::Status(code, r)) => Err((code, r.into_string().unwrap_or_default())),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

/// A tenant created through REST, with its administrator `admin`.
struct Tenant {
    id: String,
    domain: String,
    admin_pw: String,
}

impl Tenant {
    /// `<tenant id>/<name>`, the MQTT and Basic username.
    fn user(&self, name: &str) -> String {
        format!("{}/{name}", self.id)
    }

    fn admin(&self) -> String {
        self.user("admin")
    }
}

/// `POST /tenant/tenants` as `management/admin`, with optional `fleetmqLimits`.
fn create_tenant(node: &Node, domain: &str, limits: Option<Value>) -> Tenant {
    let admin_pw = format!("Adm-{domain}-7q!");
    let mut body = json!({
        "company": format!("Company {domain}"),
        "domain": domain,
        "adminName": "admin",
        "adminPass": admin_pw,
    });
    if let Some(l) = limits {
        body["fleetmqLimits"] = l;
    }
    let (status, v) = rest(
        node,
        "POST",
        "/tenant/tenants",
        "management/admin",
        ADMIN_PW,
        Some(body),
    )
    .unwrap_or_else(|e| panic!("create tenant {domain}: {e:?}"));
    assert_eq!(status, 201, "create tenant {domain}: {v}");
    let id = v["id"].as_str().expect("tenant id").to_string();
    assert_ne!(id, domain, "tenant id is generated, not the domain");
    Tenant {
        id,
        domain: domain.to_string(),
        admin_pw,
    }
}

/// `POST /user/<tenant>/users` as the tenant's administrator (`role`: `fleetmqRole`; `None`
/// lets the name decide, i.e. `device_*` is a device).
fn add_user(node: &Node, t: &Tenant, name: &str, password: &str, role: Option<&str>) {
    let mut body = json!({ "userName": name, "password": password });
    if let Some(r) = role {
        body["fleetmqRole"] = r.into();
    }
    let (status, v) = rest(
        node,
        "POST",
        &format!("/user/{}/users", t.id),
        &t.admin(),
        &t.admin_pw,
        Some(body),
    )
    .unwrap_or_else(|e| panic!("create user {name} in {}: {e:?}", t.domain));
    assert_eq!(status, 201, "create user {name}: {v}");
}

/// The status of a new-device request, as the tenant administrator sees it.
fn request_status(node: &Node, t: &Tenant, id: &str) -> String {
    let (_, v) = rest(
        node,
        "GET",
        &format!("/devicecontrol/newDeviceRequests/{id}"),
        &t.admin(),
        &t.admin_pw,
        None,
    )
    .unwrap_or_else(|e| panic!("GET request {id}: {e:?}"));
    v["status"].as_str().unwrap_or_default().to_string()
}

// ----- MQTT helpers --------------------------------------------------------------------------------

/// The CONNACK code of a login (0 = accepted; the connection is then closed cleanly).
fn login_code(
    addr: SocketAddr,
    id: &str,
    v5: bool,
    user: Option<&str>,
    password: Option<&[u8]>,
) -> u8 {
    match try_login(addr, id, v5, true, None, user, password) {
        Ok((c, _)) => {
            c.disconnect();
            0
        }
        Err(code) => code,
    }
}

/// The code a refusal has in the client's protocol version.
fn rc(v5: bool, v3: u8, v5_code: u8) -> u8 {
    if v5 {
        v5_code
    } else {
        v3
    }
}

/// A PUBLISH with the RETAIN flag as given.
fn publish_retain(
    v5: bool,
    topic: &str,
    qos: u8,
    pid: u16,
    retain: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = publish_packet(v5, topic.as_bytes(), qos, pid, false, payload);
    if retain {
        p[0] |= 0x01;
    }
    p
}

/// A QoS 1 PUBLISH of exactly `total` bytes on the wire (fixed header included).
fn publish_of_size(v5: bool, topic: &str, pid: u16, total: usize) -> Vec<u8> {
    let fixed = 2 + topic.len() + 2 + usize::from(v5);
    let varint = |n: usize| match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    let vlen = (1..=4)
        .find(|&v| total > 1 + v && varint(total - 1 - v) == v)
        .expect("representable size");
    let payload_len = total - 1 - vlen - fixed;
    // SmartREST-looking lines, padded with empty lines.
    let line = b"200,c8y_Temperature,T,25\n";
    let mut payload: Vec<u8> = line.iter().copied().cycle().take(payload_len).collect();
    let keep = payload_len - payload_len % line.len();
    for b in &mut payload[keep..] {
        *b = b'\n';
    }
    let p = publish_packet(v5, topic.as_bytes(), 1, pid, false, &payload);
    assert_eq!(p.len(), total, "size arithmetic");
    p
}

/// Publishes at QoS 1 and returns the PUBACK reason code (0 for the 2-byte form), or `None`
/// when no PUBACK came (closed, DISCONNECT or timeout). PUBLISHes arriving meanwhile are
/// acknowledged and skipped.
fn puback_reason(c: &mut Client, topic: &str, payload: &[u8]) -> Option<u8> {
    let pid = c.take_pid();
    let v5 = c.v5;
    c.send(&publish_packet(
        v5,
        topic.as_bytes(),
        1,
        pid,
        false,
        payload,
    ));
    puback_for(c, pid)
}

fn puback_for(c: &mut Client, pid: u16) -> Option<u8> {
    loop {
        let p = c.recv(Duration::from_secs(5))?;
        match p.kind() {
            PUBACK => {
                assert_eq!(p.pid(), pid, "PUBACK for another packet id");
                return Some(p.body.get(2).copied().unwrap_or(0));
            }
            PUBLISH => {
                let m = parse_publish(&p, c.v5);
                if m.qos == 1 {
                    c.send(&ack_packet(PUBACK, m.pid));
                }
            }
            DISCONNECT => return None,
            other => panic!("unexpected packet type {other} waiting for PUBACK: {p:?}"),
        }
    }
}

/// A PUBACK reason that accepts the message: 0, or 0x10 "No matching subscribers" (MQTT 5).
#[track_caller]
fn assert_accepted(reason: Option<u8>, what: &str) {
    assert!(
        matches!(reason, Some(0x00 | 0x10)),
        "{what}: wanted PUBACK 0x00/0x10, got {reason:02x?}"
    );
}

/// The server closes the connection within a few seconds; returns what it sent before.
fn wait_closed(c: &mut Client) -> (bool, Vec<u8>) {
    c.raw
        .s
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    c.raw.closed()
}

/// Asserts the server refused what was just sent the way a version allows: MQTT 5 with a
/// DISCONNECT carrying `reason` and then a close; 3.1.1 by closing without a byte.
#[track_caller]
fn assert_disconnected(c: &mut Client, reason: u8, what: &str) {
    if c.v5 {
        let p = c
            .recv(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{what}: no DISCONNECT"));
        assert_eq!(
            disconnect_reason(&p),
            Some(reason),
            "{what}: wanted DISCONNECT {reason:#04x}, got {p:?}"
        );
    }
    let (closed, rest) = wait_closed(c);
    assert!(closed, "{what}: connection not closed");
    assert!(
        rest.is_empty(),
        "{what}: unexpected bytes before close: {rest:02x?}"
    );
}

/// Subscribes to one filter and returns its reason codes plus the PUBLISHes (retained
/// messages) that came before the SUBACK, acknowledged.
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

/// PUBLISHes received until `idle` passes without one (acknowledged).
fn drain_msgs(c: &mut Client, idle: Duration) -> Vec<Msg> {
    let mut v = Vec::new();
    while let Some(p) = c.recv(idle) {
        match p.kind() {
            PUBLISH => {
                let m = parse_publish(&p, c.v5);
                if m.qos == 1 {
                    c.send(&ack_packet(PUBACK, m.pid));
                }
                v.push(m);
            }
            other => panic!("unexpected packet type {other}: {p:?}"),
        }
    }
    v
}

/// Sum of the samples of metric `name` whose labels include all of `labels`.
fn metric_with(node: &Node, name: &str, labels: &[(&str, &str)]) -> f64 {
    let head = format!("{name}{{");
    node.metrics()
        .lines()
        .filter(|l| l.starts_with(&head))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// A TCP connection to `addr` from the local address `local` (e.g. 127.0.0.2).
fn connect_from(local: &str, addr: SocketAddr) -> Raw {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(format!("{local}:0").parse().unwrap())
            .expect("bind local address");
        let s = tokio::time::timeout(Duration::from_secs(5), sock.connect(addr))
            .await
            .expect("connect timeout")
            .expect("connect");
        s.into_std().expect("into_std")
    });
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_nodelay(true).unwrap();
    Raw { s }
}

/// A small deterministic generator (no dependency on a rand crate).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ----- 1. credentials ------------------------------------------------------------------------------

#[test]
fn credentials_decide_the_connack_code() {
    // A larger failed-login budget, so the handful of deliberate failures here is never
    // throttled (throttling has its own test).
    let mut node = Node::start_secure_with(&["--login-ip-burst", "100"]);
    let addr = node.mqtt;
    let t = create_tenant(&node, "acme", None);
    add_user(&node, &t, "device_X", "pw-dev-X", None);
    add_user(&node, &t, "alice", "pw-alice", Some("user"));
    let by_id = t.user("device_X");
    let by_domain = format!("{}/device_X", t.domain);
    let pw: &[u8] = b"pw-dev-X";

    for v5 in [V3, V5] {
        let ver = if v5 { "5.0" } else { "3.1.1" };
        // (case, client id, username, password, expected CONNACK code)
        type Case<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a [u8]>, u8);
        let cases: Vec<Case> = vec![
            ("no username", "X", None, None, rc(v5, 5, 0x87)),
            (
                "wrong password",
                "X",
                Some(&by_id),
                Some(b"pw-wrong"),
                rc(v5, 4, 0x86),
            ),
            (
                "unknown tenant",
                "X",
                Some("nosuchtenant/device_X"),
                Some(pw),
                rc(v5, 4, 0x86),
            ),
            (
                "username without '/'",
                "X",
                Some("device_X"),
                Some(pw),
                rc(v5, 4, 0x86),
            ),
            (
                "empty password",
                "X",
                Some(&by_id),
                Some(b""),
                rc(v5, 5, 0x87),
            ),
            ("correct, by tenant id", "X", Some(&by_id), Some(pw), 0),
            ("correct, by domain", "X", Some(&by_domain), Some(pw), 0),
            (
                "device user as another device",
                "Y",
                Some(&by_id),
                Some(pw),
                rc(v5, 5, 0x87),
            ),
            ("device user as d:X", "d:X", Some(&by_id), Some(pw), 0),
            (
                "device user as d:X:tpl",
                "d:X:tpl",
                Some(&by_id),
                Some(pw),
                0,
            ),
            (
                "ClientId a:b:c:d",
                "a:b:c:d",
                Some(&by_id),
                Some(pw),
                rc(v5, 2, 0x85),
            ),
            (
                "ClientId d::tpl",
                "d::tpl",
                Some(&by_id),
                Some(pw),
                rc(v5, 2, 0x85),
            ),
        ];
        for (what, id, user, password, want) in cases {
            let got = login_code(addr, id, v5, user, password);
            assert_eq!(
                got, want,
                "{ver} {what}: CONNACK {got:#04x}, wanted {want:#04x}"
            );
        }
        // A normal user is not bound to a device identifier.
        let alice = t.user("alice");
        assert_eq!(
            login_code(addr, "any-app-42", v5, Some(&alice), Some(b"pw-alice")),
            0,
            "{ver} normal user with a free ClientId"
        );
    }
    assert!(node.is_running());
}

// ----- 2. ClientId forms name one session ----------------------------------------------------------

/// The connection was taken over: MQTT 5 gets DISCONNECT 0x8E, then both are closed.
#[track_caller]
fn assert_taken_over(c: &mut Client, what: &str) {
    assert_disconnected(c, 0x8E, what);
}

#[test]
fn client_id_forms_are_one_device_session() {
    let node = Node::start_secure();
    let addr = node.mqtt;
    let t = create_tenant(&node, "acme", None);
    add_user(&node, &t, "device_dev1", "pw-dev1", None);
    add_user(&node, &t, "device_dev2", "pw-dev2", None);
    add_user(&node, &t, "feeder", "pw-feeder", Some("user"));
    let dev = t.user("device_dev1");
    let pw = "pw-dev1";

    // Takeover between the forms, across protocol versions.
    let mut c1 = Client::login(addr, "dev1", V5, &dev, pw);
    let mut c2 = Client::login(addr, "d:dev1", V5, &dev, pw);
    assert_taken_over(&mut c1, "dev1 by d:dev1");
    let mut c3 = Client::login(addr, "d:dev1:tpl", V5, &dev, pw);
    assert_taken_over(&mut c2, "d:dev1 by d:dev1:tpl");
    let mut c4 = Client::login(addr, "dev1", V3, &dev, pw);
    assert_taken_over(&mut c3, "d:dev1:tpl (5.0) by dev1 (3.1.1)");
    let mut c5 = Client::login(addr, "d:dev1:tpl", V3, &dev, pw);
    assert_taken_over(&mut c4, "dev1 (3.1.1) by d:dev1:tpl (3.1.1)");
    assert_eq!(
        puback_reason(&mut c5, "dev1/alive", b"x"),
        Some(0),
        "the winner works"
    );
    c5.disconnect();

    let mut feeder = Client::login(addr, "feeder", V3, &t.user("feeder"), "pw-feeder");
    for (v5, forms) in [
        (V3, ["dev1", "d:dev1", "d:dev1:tpl"]),
        (V5, ["d:dev1:tpl", "dev1", "d:dev1"]),
    ] {
        let ver = if v5 { "5.0" } else { "3.1.1" };
        let expiry = v5.then_some(3600);
        let login = |id: &str, clean: bool| {
            try_login(addr, id, v5, clean, expiry, Some(&dev), Some(pw.as_bytes()))
                .unwrap_or_else(|c| panic!("{ver} {id}: CONNACK {c:#04x}"))
        };
        // Start from nothing: a clean session that ends with its connection.
        let (c, _) = try_login(
            addr,
            forms[0],
            v5,
            true,
            None,
            Some(&dev),
            Some(pw.as_bytes()),
        )
        .unwrap();
        c.disconnect();
        let (mut c, present) = login(forms[0], false);
        assert!(
            !present,
            "{ver} {}: session present on a fresh start",
            forms[0]
        );
        c.sub_ok("dev1/cmd", 1);
        c.disconnect();
        let offline = format!("queued-{ver}");
        feeder.publish("dev1/cmd", offline.as_bytes(), 1);

        let (mut c, present) = login(forms[1], false);
        assert!(
            present,
            "{ver}: {} does not find the session of {}",
            forms[1], forms[0]
        );
        let got = c.receive_acking(1, 5);
        assert_eq!(
            got.iter().map(Msg::text).collect::<Vec<_>>(),
            vec![offline.clone()],
            "{ver}: message queued for {} not delivered to {}",
            forms[0],
            forms[1]
        );
        c.disconnect();

        let (mut c, present) = login(forms[2], false);
        assert!(present, "{ver}: {} does not find the session", forms[2]);
        let live = format!("live-{ver}");
        feeder.publish("dev1/cmd", live.as_bytes(), 1);
        let got = c.receive_acking(1, 5);
        assert_eq!(
            got.iter().map(Msg::text).collect::<Vec<_>>(),
            vec![live],
            "{ver}: subscription made as {} not active for {}",
            forms[0],
            forms[2]
        );
        c.disconnect();
        // Another device of the same tenant does not share it.
        let (c, present) = try_login(
            addr,
            "d:dev2",
            v5,
            false,
            expiry,
            Some(&t.user("device_dev2")),
            Some(b"pw-dev2"),
        )
        .unwrap();
        assert!(!present, "{ver}: dev2 found dev1's session");
        c.disconnect();
        let (c, _) = try_login(
            addr,
            "dev2",
            v5,
            true,
            None,
            Some(&t.user("device_dev2")),
            Some(b"pw-dev2"),
        )
        .unwrap();
        c.disconnect();
        // End dev1's session for the next round.
        let (c, _) = try_login(
            addr,
            forms[0],
            v5,
            true,
            None,
            Some(&dev),
            Some(pw.as_bytes()),
        )
        .unwrap();
        c.disconnect();
    }
}

// ----- 3. isolation --------------------------------------------------------------------------------

#[test]
fn tenants_are_isolated() {
    const DEVICES: usize = 3;
    const ROUNDS: usize = 150;
    const TOPICS: [&str; 5] = [
        "sensors/temp",
        "sensors/hum",
        "fleet/status",
        "a/b/c/d",
        "d1/events",
    ];

    let node = Node::start_secure();
    let addr = node.mqtt;
    let tenants = [
        create_tenant(&node, "tenant-a", None),
        create_tenant(&node, "tenant-b", None),
    ];
    for t in &tenants {
        for i in 1..=DEVICES {
            // Identical device ids, user names and passwords in both tenants.
            add_user(&node, t, &format!("device_d{i}"), &format!("pw-d{i}"), None);
        }
        add_user(&node, t, "watcher", "pw-watch", Some("user"));
    }
    // One `#` watcher per tenant, with the same ClientId in both tenants.
    let mut watchers: Vec<Client> = tenants
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let mut w = Client::login(addr, "watcher", k == 0, &t.user("watcher"), "pw-watch");
            w.sub_ok("#", 1);
            w
        })
        .collect();
    // All devices connected at once with identical ClientIds in both tenants.
    let mut devices: Vec<Vec<Client>> = tenants
        .iter()
        .map(|t| {
            (1..=DEVICES)
                .map(|i| {
                    Client::login(
                        addr,
                        &format!("d{i}"),
                        i % 2 == 0,
                        &t.user(&format!("device_d{i}")),
                        &format!("pw-d{i}"),
                    )
                })
                .collect()
        })
        .collect();

    let mut rng = Lcg(0x7E4A_2C01_D00D_5EED);
    let mut expected: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let mut retained: [BTreeMap<String, String>; 2] = [BTreeMap::new(), BTreeMap::new()];
    for n in 0..ROUNDS {
        let k = rng.below(2) as usize;
        let i = rng.below(DEVICES as u64) as usize;
        let topic = TOPICS[rng.below(TOPICS.len() as u64) as usize];
        let retain = rng.below(5) == 0;
        // Retained ones at QoS 1, so the last one per topic is known when its PUBACK is in.
        let qos = if retain { 1 } else { rng.below(2) as u8 };
        let tid = &tenants[k].id;
        let payload = format!("{tid}|d{}|{n}|{topic}", i + 1);
        let d = &mut devices[k][i];
        let pid = if qos > 0 { d.take_pid() } else { 0 };
        let v5 = d.v5;
        d.send(&publish_retain(
            v5,
            topic,
            qos,
            pid,
            retain,
            payload.as_bytes(),
        ));
        if qos == 1 {
            assert_eq!(puback_for(d, pid), Some(0), "PUBACK of {payload}");
        }
        expected[k].push(payload.clone());
        if retain {
            retained[k].insert(topic.to_string(), payload);
        }
        // Device-interface traffic now and then: never routed to the free-form space.
        if n % 10 == 0 {
            assert_eq!(
                puback_reason(d, "s/us", b"200,c8y_Temperature,T,25"),
                Some(0)
            );
            assert_eq!(
                puback_reason(
                    d,
                    "measurement/measurements/create",
                    br#"{"type":"c8y_T","c8y_T":{"T":{"value":25,"unit":"C"}}}"#
                ),
                Some(0)
            );
            assert_eq!(
                puback_reason(d, "t/us", b"200,c8y_Temperature,T,26"),
                Some(0)
            );
        }
    }
    // Retained only in A, on a topic B never uses.
    {
        let d = &mut devices[0][0];
        let pid = d.take_pid();
        let payload = format!("{}|only-a", tenants[0].id);
        let v5 = d.v5;
        d.send(&publish_retain(
            v5,
            "only-a/x",
            1,
            pid,
            true,
            payload.as_bytes(),
        ));
        assert_eq!(puback_for(d, pid), Some(0));
        expected[0].push(payload.clone());
        retained[0].insert("only-a/x".into(), payload);
    }
    // Every device is still connected: identical ClientIds in two tenants are two sessions.
    for (k, ds) in devices.iter_mut().enumerate() {
        for (i, d) in ds.iter_mut().enumerate() {
            assert_eq!(
                puback_reason(d, "s/us", b"400,c8y_Check,alive"),
                Some(0),
                "tenant {k} device d{} was disconnected",
                i + 1
            );
        }
    }

    for (k, w) in watchers.iter_mut().enumerate() {
        let other = &tenants[1 - k].id;
        let mut got: Vec<Msg> = w.receive_acking(expected[k].len(), 15);
        got.extend(drain_msgs(w, Duration::from_millis(700)));
        for m in &got {
            assert!(
                !m.text().contains(other.as_str()),
                "tenant {k}'s watcher got the other tenant's message {:?} on {}",
                m.text(),
                m.topic
            );
            assert!(
                !m.topic.starts_with("s/")
                    && !m.topic.starts_with("t/")
                    && !m.topic.starts_with("measurement/"),
                "device-interface publish routed to a `#` subscriber: {} {:?}",
                m.topic,
                m.text()
            );
        }
        let mut have: Vec<String> = got.iter().map(Msg::text).collect();
        let mut want = expected[k].clone();
        have.sort();
        want.sort();
        assert_eq!(
            have.len(),
            want.len(),
            "tenant {k}: watcher got {} messages, its tenant published {}",
            have.len(),
            want.len()
        );
        assert_eq!(have, want, "tenant {k}: watcher's messages differ");
    }

    // New subscribers see exactly their own tenant's retained messages.
    assert!(
        retained.iter().all(|r| r.len() >= 3),
        "the seed produced too few retained topics: {retained:?}"
    );
    for (k, t) in tenants.iter().enumerate() {
        let mut late = Client::login(addr, "late-watcher", k == 1, &t.user("watcher"), "pw-watch");
        let (codes, mut msgs) = subscribe_collect(&mut late, "#", 1);
        assert_eq!(codes, vec![1]);
        msgs.extend(drain_msgs(&mut late, Duration::from_millis(700)));
        let mut have: Vec<(String, String)> =
            msgs.iter().map(|m| (m.topic.clone(), m.text())).collect();
        have.sort();
        let want: Vec<(String, String)> = retained[k]
            .iter()
            .map(|(a, b)| (a.clone(), b.clone()))
            .collect();
        assert!(
            msgs.iter().all(|m| m.retain),
            "tenant {k}: retained flag missing"
        );
        assert_eq!(
            have, want,
            "tenant {k}: retained messages for a new `#` subscriber"
        );
        late.disconnect();
    }
    let mut late_b = Client::login(addr, "late-b", V3, &tenants[1].user("watcher"), "pw-watch");
    let (codes, early) = subscribe_collect(&mut late_b, "only-a/#", 1);
    assert_eq!(codes, vec![1]);
    assert!(early.is_empty(), "B got A's retained message: {early:?}");
    assert!(drain_msgs(&mut late_b, Duration::from_millis(500)).is_empty());
}

// ----- 4. ACL on reserved topics -------------------------------------------------------------------

const ALLOWED_PUBLISH: [(&str, &[u8]); 5] = [
    ("s/us", b"200,c8y_Temperature,T,25"),
    ("s/uc/x", b"100,x"),
    ("t/us", b"200,c8y_Temperature,T,25"),
    (
        "measurement/measurements/create",
        br#"{"type":"c8y_T","c8y_T":{"T":{"value":25}}}"#,
    ),
    ("sensors/free", b"free"),
];
const FORBIDDEN_PUBLISH: [&str; 5] = [
    "s/ds",
    "s/dcr",
    "s/e",
    "devicecontrol/notifications",
    "s/foo",
];
const FORBIDDEN_FILTERS: [&str; 3] = ["s/us", "t/#", "measurement/measurements/create"];
const ALLOWED_FILTERS: [&str; 6] = [
    "s/ds",
    "s/e",
    "s/dc/#",
    "error",
    "devicecontrol/notifications",
    "#",
];

#[test]
fn reserved_topics_acl() {
    let node = Node::start_secure();
    let addr = node.mqtt;
    let t = create_tenant(&node, "acl", None);
    add_user(&node, &t, "device_d1", "pw-d1", None);
    add_user(&node, &t, "watcher", "pw-watch", Some("user"));
    let dev = t.user("device_d1");
    let mut watcher = Client::login(addr, "watcher", V5, &t.user("watcher"), "pw-watch");
    watcher.sub_ok("#", 1);
    let mut mgmt = Client::login(addr, "mgmt-watcher", V3, "management/admin", ADMIN_PW);
    mgmt.sub_ok("#", 1);

    // MQTT 5: refused with PUBACK 0x87, the connection stays usable.
    let mut d = Client::login(addr, "d1", V5, &dev, "pw-d1");
    for (topic, payload) in ALLOWED_PUBLISH {
        assert_eq!(
            puback_reason(&mut d, topic, payload),
            Some(0),
            "5.0 publish {topic}"
        );
    }
    for topic in FORBIDDEN_PUBLISH {
        assert_eq!(
            puback_reason(&mut d, topic, b"x"),
            Some(0x87),
            "5.0 publish to {topic}"
        );
        assert_eq!(
            puback_reason(&mut d, "sensors/after", topic.as_bytes()),
            Some(0),
            "5.0 connection unusable after refused publish to {topic}"
        );
    }
    d.disconnect();

    // 3.1.1: allowed ones acknowledged, a forbidden one closes the connection.
    let mut d = Client::login(addr, "d1", V3, &dev, "pw-d1");
    for (topic, payload) in ALLOWED_PUBLISH {
        assert_eq!(
            puback_reason(&mut d, topic, payload),
            Some(0),
            "3.1.1 publish {topic}"
        );
    }
    d.disconnect();
    for topic in FORBIDDEN_PUBLISH {
        let mut d = Client::login(addr, "d1", V3, &dev, "pw-d1");
        let pid = d.take_pid();
        d.send(&publish_packet(
            false,
            topic.as_bytes(),
            1,
            pid,
            false,
            b"x",
        ));
        let (closed, rest) = wait_closed(&mut d);
        assert!(closed, "3.1.1 publish to {topic}: connection not closed");
        assert!(rest.is_empty(), "3.1.1 publish to {topic}: got {rest:02x?}");
    }

    // What was routed: exactly the free-form publishes.
    let mut got: Vec<String> = watcher
        .receive_acking(1 + FORBIDDEN_PUBLISH.len() + 1, 10)
        .iter()
        .map(|m| format!("{} {}", m.topic, m.text()))
        .collect();
    got.extend(
        drain_msgs(&mut watcher, Duration::from_millis(500))
            .iter()
            .map(|m| format!("{} {}", m.topic, m.text())),
    );
    let mut want = vec!["sensors/free free".to_string()];
    want.extend(
        FORBIDDEN_PUBLISH
            .iter()
            .map(|t| format!("sensors/after {t}")),
    );
    want.push("sensors/free free".into());
    got.sort();
    want.sort();
    assert_eq!(got, want, "free-form messages routed to the tenant's `#`");

    // Subscriptions.
    for v5 in [V3, V5] {
        let mut d = Client::login(addr, "d1", v5, &dev, "pw-d1");
        for f in FORBIDDEN_FILTERS {
            assert_eq!(
                d.subscribe(f, 1),
                vec![rc(v5, 0x80, 0x87)],
                "v5={v5} subscribe {f}"
            );
        }
        for f in ALLOWED_FILTERS {
            assert_eq!(d.subscribe(f, 1), vec![1], "v5={v5} subscribe {f}");
        }
        d.disconnect();
    }

    // The bootstrap user: s/ucr and s/dcr (and s/e) only.
    let boot = "management/devicebootstrap";
    let mut b = Client::login(addr, "boot-acl", V5, boot, BOOTSTRAP_PW);
    assert_eq!(
        puback_reason(&mut b, "s/ucr", b""),
        Some(0),
        "bootstrap publish s/ucr"
    );
    for topic in ["sensors/x", "s/us"] {
        assert_eq!(
            puback_reason(&mut b, topic, b"boot"),
            Some(0x87),
            "bootstrap publish {topic}"
        );
    }
    for (f, want) in [
        ("#", 0x87),
        ("s/ds", 0x87),
        ("sensors/#", 0x87),
        ("s/dcr", 1),
        ("s/e", 1),
    ] {
        assert_eq!(b.subscribe(f, 1), vec![want], "5.0 bootstrap subscribe {f}");
    }
    b.disconnect();
    let mut b = Client::login(addr, "boot-acl", V3, boot, BOOTSTRAP_PW);
    for (f, want) in [("#", 0x80), ("s/dcr", 1), ("s/e", 1)] {
        assert_eq!(
            b.subscribe(f, 1),
            vec![want],
            "3.1.1 bootstrap subscribe {f}"
        );
    }
    let pid = b.take_pid();
    b.send(&publish_packet(false, b"sensors/x", 1, pid, false, b"boot"));
    let (closed, rest) = wait_closed(&mut b);
    assert!(
        closed && rest.is_empty(),
        "3.1.1 bootstrap publish to a free-form topic"
    );
    let leaked = drain_msgs(&mut mgmt, Duration::from_millis(500));
    assert!(
        leaked.is_empty(),
        "bootstrap publishes were routed: {leaked:?}"
    );
    assert!(drain_msgs(&mut watcher, Duration::from_millis(200)).is_empty());
}

// ----- 5. packet size limits -----------------------------------------------------------------------

/// Sends a packet that the server refuses before reading all of it, writing from a thread so
/// that the DISCONNECT can be read while the write is still blocked.
fn send_huge(c: &mut Client, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
    let mut w = c.raw.s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    std::thread::spawn(move || {
        let _ = w.write_all(&bytes);
    })
}

#[test]
fn packet_size_limits_per_topic_class_and_tenant() {
    const KIB: usize = 1024;
    let mut node = Node::start_secure();
    let addr = node.mqtt;
    let a = create_tenant(&node, "size-a", None);
    let b = create_tenant(
        &node,
        "size-b",
        Some(json!({ "reservedPacketSize": 32768 })),
    );
    let c = create_tenant(&node, "size-c", Some(json!({ "reservedPacketSize": 4096 })));
    for t in [&a, &b, &c] {
        add_user(&node, t, "device_d1", "pw-d1", None);
        add_user(&node, t, "device_d2", "pw-d2", None);
        add_user(&node, t, "watcher", "pw-watch", Some("user"));
    }
    let mut watcher = Client::login(addr, "watcher", V5, &a.user("watcher"), "pw-watch");
    watcher.sub_ok("big/#", 1);
    // Connected throughout: keeps working whatever the others send.
    let mut bystander = Client::login(addr, "d2", V3, &a.user("device_d2"), "pw-d2");
    let mut pings = 0;
    let mut check_bystander = |watcher: &mut Client, what: &str| {
        pings += 1;
        let p = format!("ping-{pings}");
        bystander.publish("big/ping", p.as_bytes(), 1);
        let got = watcher.receive_acking(1, 10);
        assert_eq!(
            got.iter().map(Msg::text).collect::<Vec<_>>(),
            vec![p],
            "after {what}: the other client's message did not arrive"
        );
    };
    let login = |t: &Tenant, v5: bool| Client::login(addr, "d1", v5, &t.user("device_d1"), "pw-d1");

    for v5 in [V3, V5] {
        let ver = if v5 { "5.0" } else { "3.1.1" };
        let mut d = login(&a, v5);
        for size in [16_000, 16_384] {
            let pid = d.take_pid();
            d.send(&publish_of_size(v5, "s/us", pid, size));
            assert_eq!(
                puback_for(&mut d, pid),
                Some(0),
                "{ver} s/us of {size} bytes"
            );
        }
        for size in [600 * KIB, 1_048_576] {
            let pid = d.take_pid();
            d.send(&publish_of_size(v5, "big/x", pid, size));
            assert_eq!(
                puback_for(&mut d, pid),
                Some(0),
                "{ver} free-form of {size} bytes"
            );
            let got = watcher.receive_acking(1, 15);
            assert_eq!(
                got.len(),
                1,
                "{ver} free-form of {size} bytes not delivered"
            );
            assert_eq!(got[0].topic, "big/x");
        }
        // One byte over on s/us.
        let pid = d.take_pid();
        d.send(&publish_of_size(v5, "s/us", pid, 16_385));
        assert_disconnected(&mut d, 0x95, &format!("{ver} s/us of 16385 bytes"));
        check_bystander(&mut watcher, &format!("{ver} 16385 bytes on s/us"));

        // One byte over 1 MiB on a free-form topic.
        let mut d = login(&a, v5);
        let pid = d.take_pid();
        let writer = send_huge(&mut d, publish_of_size(v5, "big/x", pid, 1_048_577));
        assert_disconnected(&mut d, 0x95, &format!("{ver} free-form of 1048577 bytes"));
        writer.join().unwrap();
        check_bystander(&mut watcher, &format!("{ver} 1048577 bytes on big/x"));
    }
    assert!(
        metric_with(
            &node,
            "fleetmq_protocol_errors_total",
            &[("reason", "packet_too_large")]
        ) >= 4.0,
        "packet_too_large not counted"
    );
    assert!(
        metric_with(
            &node,
            "fleetmq_tenant_quota_exceeded_total",
            &[("tenant", &a.id), ("quota", "packet_size")]
        ) > 0.0,
        "packet_size quota not counted for {}",
        a.id
    );

    // Tenant overrides of the reserved limit: larger in B, smaller in C; the free-form limit
    // is untouched.
    for (t, limit) in [(&b, 32_768usize), (&c, 4_096)] {
        for v5 in [V3, V5] {
            let what = format!("{} v5={v5}", t.domain);
            let mut d = login(t, v5);
            for size in [limit.min(16_000), limit] {
                let pid = d.take_pid();
                d.send(&publish_of_size(v5, "s/us", pid, size));
                assert_eq!(puback_for(&mut d, pid), Some(0), "{what}: s/us of {size}");
            }
            let pid = d.take_pid();
            d.send(&publish_of_size(v5, "big/y", pid, 600 * KIB));
            assert_accepted(
                puback_for(&mut d, pid),
                &format!("{what}: free-form 600 KiB"),
            );
            let pid = d.take_pid();
            d.send(&publish_of_size(v5, "s/us", pid, limit + 1));
            assert_disconnected(&mut d, 0x95, &format!("{what}: s/us of {}", limit + 1));
        }
    }
    // B's larger limit is B's only: 20000 bytes on s/us is still too large in A.
    let mut d = login(&a, V5);
    let pid = d.take_pid();
    d.send(&publish_of_size(V5, "s/us", pid, 20_000));
    assert_disconnected(&mut d, 0x95, "A: s/us of 20000");
    check_bystander(&mut watcher, "the tenant override checks");
    assert!(node.is_running());
}

// ----- 6. bootstrap over MQTT ----------------------------------------------------------------------

/// Polls `s/ucr` (empty, QoS 0) every ~300 ms for `dur` (or until a message came, when
/// `stop_on_message`), returning what arrived.
fn poll_ucr(dev: &mut Client, dur: Duration, stop_on_message: bool) -> Vec<Msg> {
    let deadline = Instant::now() + dur;
    let mut got = Vec::new();
    while Instant::now() < deadline {
        let v5 = dev.v5;
        dev.send(&publish_packet(v5, b"s/ucr", 0, 0, false, b""));
        let tick = Instant::now() + Duration::from_millis(300);
        loop {
            let left = tick.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Some(p) = dev.recv(left) else { break };
            assert_eq!(p.kind(), PUBLISH, "unexpected packet while polling: {p:?}");
            let m = parse_publish(&p, v5);
            if m.qos == 1 {
                dev.send(&ack_packet(PUBACK, m.pid));
            }
            got.push(m);
        }
        if stop_on_message && !got.is_empty() {
            break;
        }
    }
    got
}

#[test]
fn bootstrap_over_mqtt() {
    let node = Node::start_secure();
    let addr = node.mqtt;
    let t = create_tenant(&node, "boot", None);
    add_user(&node, &t, "watcher", "pw-watch", Some("user"));
    let mut watcher = Client::login(addr, "watcher", V5, &t.user("watcher"), "pw-watch");
    watcher.sub_ok("#", 1);
    let boot = "management/devicebootstrap";

    for v5 in [V3, V5] {
        assert_eq!(
            login_code(
                addr,
                "boot-1",
                v5,
                Some(boot),
                Some(b"not-the-bootstrap-pw")
            ),
            rc(v5, 4, 0x86),
            "wrong bootstrap password"
        );
    }

    let (status, v) = rest(
        &node,
        "POST",
        "/devicecontrol/newDeviceRequests",
        &t.admin(),
        &t.admin_pw,
        Some(json!({ "id": "boot-1" })),
    )
    .expect("create newDeviceRequest");
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        request_status(&node, &t, "boot-1"),
        "WAITING_FOR_CONNECTION"
    );
    let accept = || {
        rest(
            &node,
            "PUT",
            "/devicecontrol/newDeviceRequests/boot-1",
            &t.admin(),
            &t.admin_pw,
            Some(json!({ "status": "ACCEPTED" })),
        )
    };
    assert_eq!(
        accept().err().map(|e| e.0),
        Some(422),
        "accepting before the device polled"
    );

    let mut dev = Client::login(addr, "boot-1", V3, boot, BOOTSTRAP_PW);
    dev.sub_ok("s/dcr", 1);
    let early = poll_ucr(&mut dev, Duration::from_millis(300), false);
    assert!(early.is_empty(), "got {early:?} before acceptance");
    wait_until(5, "request PENDING_ACCEPTANCE after the first poll", || {
        request_status(&node, &t, "boot-1") == "PENDING_ACCEPTANCE"
    });
    let early = poll_ucr(&mut dev, Duration::from_millis(1200), false);
    assert!(early.is_empty(), "got {early:?} on s/dcr before acceptance");

    let (status, v) = accept().expect("accept");
    assert_eq!(status, 200, "{v}");
    let got = poll_ucr(&mut dev, Duration::from_secs(10), true);
    assert_eq!(got.len(), 1, "credentials after acceptance: {got:?}");
    assert_eq!(got[0].topic, "s/dcr");
    let line = got[0].text();
    let parts: Vec<&str> = line.splitn(4, ',').collect();
    assert_eq!(parts.len(), 4, "{line}");
    assert_eq!(parts[0], "70", "{line}");
    assert_eq!(parts[1], t.id, "{line}");
    assert_eq!(parts[2], "device_boot-1", "{line}");
    let password = parts[3].to_string();
    assert!(password.len() >= 8, "weak password issued: {line}");
    dev.disconnect();

    let user = format!("{}/device_boot-1", t.id);
    let mut d = Client::login(addr, "boot-1", V3, &user, &password);
    assert_eq!(
        puback_reason(&mut d, "s/us", b"200,c8y_Temperature,T,25"),
        Some(0),
        "new device: s/us"
    );
    assert_eq!(
        puback_reason(&mut d, "boot-1/hello", b"hello from boot-1"),
        Some(0)
    );
    let got = watcher.receive_acking(1, 10);
    assert_eq!(
        got.iter()
            .map(|m| (m.topic.clone(), m.text()))
            .collect::<Vec<_>>(),
        vec![("boot-1/hello".to_string(), "hello from boot-1".to_string())]
    );
    d.disconnect();
    // The issued user is a device user bound to its identifier.
    assert_eq!(
        login_code(addr, "boot-2", V5, Some(&user), Some(password.as_bytes())),
        0x87,
        "issued device user as another device"
    );
}

// ----- 7. brute force ------------------------------------------------------------------------------

#[test]
fn failed_logins_are_throttled_per_address() {
    const LEGIT_PW: &str = "Legit-Dev-Pw-4471";
    const SECOND_PW: &str = "Second-Dev-Pw-9902";
    const ATTEMPTS: usize = 40;
    let node = Node::start_secure();
    let addr = node.mqtt;
    let t = create_tenant(&node, "brute", None);
    add_user(&node, &t, "device_legit", LEGIT_PW, None);
    add_user(&node, &t, "device_second", SECOND_PW, None);
    let legit = t.user("device_legit");
    let second = t.user("device_second");

    // The legitimate device logs in once: its credential is known from now on.
    Client::login(addr, "legit", V3, &legit, LEGIT_PW).disconnect();

    let guesses: Vec<String> = (0..ATTEMPTS)
        .map(|i| format!("Wrong-Guess-{i:02}-zx"))
        .collect();
    let started = Instant::now();
    let mut codes = Vec::new();
    for g in &guesses {
        match try_login(
            addr,
            "legit",
            V3,
            true,
            None,
            Some(&legit),
            Some(g.as_bytes()),
        ) {
            Ok(_) => panic!("wrong password {g} accepted"),
            Err(code) => codes.push(code),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "attack loop took {:?}",
        started.elapsed()
    );
    let bad = codes.iter().filter(|&&c| c == 4).count();
    assert!(codes.iter().all(|&c| c == 4 || c == 3), "codes: {codes:?}");
    assert!(
        codes[..10].iter().all(|&c| c == 4),
        "first ten not BAD_USERNAME_OR_PASSWORD: {codes:?}"
    );
    assert!(
        (10..=13).contains(&bad),
        "{bad} wrong-password answers before throttling: {codes:?}"
    );
    assert!(
        codes[ATTEMPTS - 10..].iter().all(|&c| c == 3),
        "not throttled at the end: {codes:?}"
    );
    assert_eq!(
        login_code(addr, "legit", V5, Some(&legit), Some(b"Wrong-Guess-v5-zx")),
        0x9F,
        "5.0 throttled login"
    );
    assert!(
        metric_with(
            &node,
            "fleetmq_auth_failures_total",
            &[("reason", "throttled")]
        ) > 0.0,
        "throttled logins not counted"
    );

    // The device that was connected before still gets in from the same address.
    for v5 in [V3, V5] {
        assert_eq!(
            login_code(addr, "legit", v5, Some(&legit), Some(LEGIT_PW.as_bytes())),
            0,
            "v5={v5}: legitimate device refused during the attack"
        );
    }
    // A device never seen before is throttled at the attacker's address ...
    assert_eq!(
        login_code(
            addr,
            "second",
            V3,
            Some(&second),
            Some(SECOND_PW.as_bytes())
        ),
        3,
        "new device from the throttled address"
    );
    // ... but not from another one: the throttle is per address, not a tenant lock-out.
    let raw = connect_from("127.0.0.2", addr);
    assert_eq!(raw.s.local_addr().unwrap().ip().to_string(), "127.0.0.2");
    let (c, _) = try_login_on(
        raw,
        "second",
        V3,
        true,
        None,
        Some(&second),
        Some(SECOND_PW.as_bytes()),
    )
    .unwrap_or_else(|code| panic!("new device from 127.0.0.2 refused with {code}"));
    c.disconnect();
    let raw = connect_from("127.0.0.2", addr);
    let (c, _) = try_login_on(
        raw,
        "second",
        V5,
        true,
        None,
        Some(&second),
        Some(SECOND_PW.as_bytes()),
    )
    .unwrap_or_else(|code| panic!("5.0 new device from 127.0.0.2 refused with {code:#04x}"));
    c.disconnect();

    // No secret in the log.
    let log = node.log();
    assert!(!log.is_empty(), "empty node log");
    let mut secrets: Vec<&str> = vec![
        LEGIT_PW,
        SECOND_PW,
        ADMIN_PW,
        &t.admin_pw,
        "Wrong-Guess-v5-zx",
    ];
    secrets.extend(guesses.iter().map(String::as_str));
    for s in secrets {
        assert!(!log.contains(s), "password {s:?} appears in the node log");
    }
}

// ----- 8. quotas -----------------------------------------------------------------------------------

#[test]
fn tenant_connection_quota() {
    let node = Node::start_secure_with(&["--tenant-max-connections", "2"]);
    let addr = node.mqtt;
    let a = create_tenant(&node, "conn-a", None);
    let b = create_tenant(&node, "conn-b", None);
    let c = create_tenant(&node, "conn-c", Some(json!({ "maxConnections": 3 })));
    for t in [&a, &b, &c] {
        add_user(&node, t, "u", "pw-u", Some("user"));
    }
    let login = |t: &Tenant, id: &str, v5: bool| {
        try_login(addr, id, v5, true, None, Some(&t.user("u")), Some(b"pw-u")).map(|(c, _)| c)
    };

    let a1 = login(&a, "a1", V3).expect("a1");
    let mut a2 = login(&a, "a2", V5).expect("a2");
    assert_eq!(
        login(&a, "a3", V5).err(),
        Some(0x97),
        "5.0 third connection of A"
    );
    assert_eq!(
        login(&a, "a3", V3).err(),
        Some(3),
        "3.1.1 third connection of A"
    );
    // Another tenant is not affected by A being full.
    let b1 = login(&b, "b1", V5).expect("B while A is full");
    let b2 = login(&b, "b2", V3).expect("B's second");
    assert_eq!(
        login(&b, "b3", V3).err(),
        Some(3),
        "B has the default quota too"
    );
    // The REST override applies to C only.
    let cs: Vec<Client> = (1..=3)
        .map(|i| {
            login(&c, &format!("c{i}"), i % 2 == 0).unwrap_or_else(|e| panic!("c{i}: {e:#04x}"))
        })
        .collect();
    assert_eq!(
        login(&c, "c4", V5).err(),
        Some(0x97),
        "C's fourth connection"
    );
    assert_eq!(login(&a, "a3", V5).err(), Some(0x97), "A still at 2");
    assert!(
        metric_with(
            &node,
            "fleetmq_tenant_quota_exceeded_total",
            &[("tenant", &a.id), ("quota", "connections")]
        ) > 0.0
    );
    // The refused ones did not take A's existing connections down.
    assert_accepted(
        puback_reason(&mut a2, "x/y", b"still here"),
        "A's existing connection",
    );
    // A freed slot can be used again.
    a1.disconnect();
    let mut a3 = None;
    wait_until(5, "A's freed connection slot", || {
        a3 = login(&a, "a3", V5).ok();
        a3.is_some()
    });
    for x in [b1, b2].into_iter().chain(cs) {
        x.disconnect();
    }
}

#[test]
fn connection_quota_counts_a_takeover_once() {
    // A device whose old connection is still open (e.g. half-dead behind NAT) reconnects with
    // its own ClientId while its tenant is at the connection quota: the new connection
    // replaces the old one, so the tenant does not grow and it must be accepted.
    let node = Node::start_secure_with(&["--tenant-max-connections", "2"]);
    let addr = node.mqtt;
    let a = create_tenant(&node, "conn-a", None);
    add_user(&node, &a, "device_d1", "pw-d1", None);
    add_user(&node, &a, "device_d2", "pw-d2", None);
    let _d1 = Client::login(addr, "d1", V3, &a.user("device_d1"), "pw-d1");
    let mut d2 = Client::login(addr, "d2", V5, &a.user("device_d2"), "pw-d2");
    let again = try_login(
        addr,
        "d:d2",
        V5,
        true,
        None,
        Some(&a.user("device_d2")),
        Some(b"pw-d2"),
    );
    let mut again = match again {
        Ok((c, _)) => c,
        Err(code) => {
            panic!("takeover at the tenant's connection quota refused with CONNACK {code:#04x}")
        }
    };
    assert_taken_over(&mut d2, "d2 by d:d2");
    assert_accepted(puback_reason(&mut again, "x/y", b"z"), "the new connection");
}

#[test]
fn tenant_subscription_quota() {
    let node = Node::start_secure_with(&["--tenant-max-subscriptions", "2"]);
    let addr = node.mqtt;
    let a = create_tenant(&node, "subs-a", None);
    let b = create_tenant(&node, "subs-b", None);
    for t in [&a, &b] {
        add_user(&node, t, "u", "pw-u", Some("user"));
    }
    let mut s5 = Client::login(addr, "s5", V5, &a.user("u"), "pw-u");
    let mut s3 = Client::login(addr, "s3", V3, &a.user("u"), "pw-u");
    assert_eq!(s5.subscribe("f/1", 1), vec![1]);
    assert_eq!(s3.subscribe("f/2", 1), vec![1]);
    assert_eq!(
        s5.subscribe("f/3", 1),
        vec![0x97],
        "5.0 third free-form filter"
    );
    assert_eq!(
        s3.subscribe("f/4", 1),
        vec![0x80],
        "3.1.1 third free-form filter"
    );
    // Subscribing again to a filter it already has is no new subscription.
    assert_eq!(
        s5.subscribe("f/1", 0),
        vec![0],
        "re-subscribe to a held filter"
    );
    // Downstream filters are not free-form subscriptions.
    assert_eq!(s3.subscribe("s/ds", 1), vec![1], "downstream filter");
    // Another tenant has its own count.
    let mut sb = Client::login(addr, "sb", V5, &b.user("u"), "pw-u");
    assert_eq!(sb.subscribe("f/1", 1), vec![1]);
    assert_eq!(sb.subscribe("f/2", 1), vec![1]);
    assert!(
        metric_with(
            &node,
            "fleetmq_tenant_quota_exceeded_total",
            &[("tenant", &a.id), ("quota", "subscriptions")]
        ) > 0.0
    );
    // The refused filter delivers nothing.
    let mut p = Client::login(addr, "p", V3, &a.user("u"), "pw-u");
    p.publish("f/3", b"nobody", 1);
    assert!(drain_msgs(&mut s5, Duration::from_millis(500)).is_empty());
    // Unsubscribing frees a slot.
    unsubscribe(&mut s5, "f/1");
    assert_eq!(s3.subscribe("f/4", 1), vec![1], "after UNSUBSCRIBE");
    assert_eq!(s5.subscribe("f/5", 1), vec![0x97], "full again");
    // So does the end of a clean session.
    s3.disconnect();
    let mut s6 = Client::login(addr, "s6", V5, &a.user("u"), "pw-u");
    let mut codes = Vec::new();
    wait_until(5, "slots freed by a closed clean session", || {
        codes = s6.subscribe("f/6", 1);
        codes == vec![1]
    });
}

#[test]
fn tenant_session_quota() {
    let node = Node::start_secure_with(&["--tenant-max-sessions", "1"]);
    let addr = node.mqtt;
    let a = create_tenant(&node, "sess-a", None);
    let b = create_tenant(&node, "sess-b", None);
    for t in [&a, &b] {
        add_user(&node, t, "u", "pw-u", Some("user"));
    }
    let ua = a.user("u");
    let login = |id: &str, v5: bool, clean: bool, expiry: Option<u32>| {
        try_login(addr, id, v5, clean, expiry, Some(&ua), Some(b"pw-u"))
    };
    let (p1, present) = login("p1", V3, false, None).expect("first persistent session");
    assert!(!present);
    p1.disconnect();
    assert_eq!(
        login("p2", V3, false, None).err(),
        Some(3),
        "3.1.1 second persistent session"
    );
    assert_eq!(
        login("p2", V5, true, Some(3600)).err(),
        Some(0x97),
        "5.0 second persistent session"
    );
    // Clean sessions still connect.
    login("c1", V3, true, None)
        .expect("3.1.1 clean session")
        .0
        .disconnect();
    login("c2", V5, true, None)
        .expect("5.0 clean session")
        .0
        .disconnect();
    // The existing persistent session can be resumed.
    let (p1, present) = login("p1", V3, false, None).expect("resume p1");
    assert!(present, "p1's session");
    p1.disconnect();
    // Another tenant has its own count.
    let (pb, _) = try_login(
        addr,
        "p1",
        V5,
        true,
        Some(3600),
        Some(&b.user("u")),
        Some(b"pw-u"),
    )
    .expect("B's persistent session");
    pb.disconnect();
    assert!(
        metric_with(
            &node,
            "fleetmq_tenant_quota_exceeded_total",
            &[("tenant", &a.id), ("quota", "sessions")]
        ) > 0.0
    );
    // Ending p1 frees the slot.
    login("p1", V3, true, None).expect("end p1").0.disconnect();
    let mut p2 = None;
    wait_until(5, "slot freed by the ended session", || {
        p2 = login("p2", V5, true, Some(3600)).ok();
        p2.is_some()
    });
}

#[test]
fn tenant_message_rate_delays_without_losing() {
    const N: usize = 60;
    let node = Node::start_secure_with(&["--tenant-messages-per-second", "20"]);
    let addr = node.mqtt;
    let a = create_tenant(&node, "rate-a", None);
    let b = create_tenant(&node, "rate-b", None);
    for t in [&a, &b] {
        add_user(&node, t, "u", "pw-u", Some("user"));
    }
    let mut sub = Client::login(addr, "sub", V5, &a.user("u"), "pw-u");
    sub.sub_ok("rate/#", 1);
    let mut pb = Client::login(addr, "pb", V5, &b.user("u"), "pw-u");
    let mut pa = Client::login(addr, "pa", V3, &a.user("u"), "pw-u");
    // Let both tenants' one-second buckets fill.
    std::thread::sleep(Duration::from_millis(1100));

    let want = payloads("m", N);
    let started = Instant::now();
    pa.publish_many("rate/x", &want, 1);
    let took = started.elapsed();
    // B is held to its own budget, not A's debt.
    let b_started = Instant::now();
    pb.publish_many("rate/b", &payloads("b", 15), 1);
    let b_took = b_started.elapsed();

    let got = sub.receive_acking(N, 15);
    assert_eq!(
        got.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(),
        want,
        "subscriber did not get all {N} messages in order"
    );
    assert!(
        took >= Duration::from_millis(1800),
        "{N} messages at 20/s went through in {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{N} messages took {took:?}");
    assert!(
        b_took < Duration::from_millis(700),
        "tenant B was slowed down by A: 15 messages took {b_took:?}"
    );
    assert!(
        metric_with(
            &node,
            "fleetmq_tenant_quota_exceeded_total",
            &[("tenant", &a.id), ("quota", "rate")]
        ) > 0.0,
        "rate quota not counted for {}",
        a.id
    );
}

// ----- 9. anonymous tenant -------------------------------------------------------------------------

#[test]
fn anonymous_clients_are_admitted_into_their_tenant_only() {
    let node = Node::start_secure_with(&["--anonymous-tenant", "pub"]);
    let addr = node.mqtt;
    let a = create_tenant(&node, "anon-a", None);
    add_user(&node, &a, "watcher", "pw-watch", Some("user"));
    // A user of tenant `pub`, created by the management administrator.
    let (status, v) = rest(
        &node,
        "POST",
        "/user/pub/users",
        "management/admin",
        ADMIN_PW,
        Some(json!({ "userName": "puser", "password": "pw-puser", "fleetmqRole": "user" })),
    )
    .expect("user in tenant pub");
    assert_eq!(status, 201, "{v}");

    let (mut anon_sub, _) =
        try_login(addr, "anon-sub", V3, true, None, None, None).expect("anonymous 3.1.1");
    anon_sub.sub_ok("#", 1);
    let (mut anon_pub, _) =
        try_login(addr, "anon-pub", V5, true, None, None, None).expect("anonymous 5.0");
    let mut puser = Client::login(addr, "puser", V5, "pub/puser", "pw-puser");
    puser.sub_ok("#", 1);
    let mut wa = Client::login(addr, "wa", V5, &a.user("watcher"), "pw-watch");
    wa.sub_ok("#", 1);
    let mut pa = Client::login(addr, "pa", V3, &a.user("watcher"), "pw-watch");

    anon_pub.publish("shared/topic", b"from-anonymous", 1);
    let ret = anon_pub.take_pid();
    anon_pub.send(&publish_retain(
        V5,
        "shared/retained",
        1,
        ret,
        true,
        b"anonymous-retained",
    ));
    assert_eq!(puback_for(&mut anon_pub, ret), Some(0));
    pa.publish("shared/topic", b"from-a", 1);

    let texts = |c: &mut Client, n: usize| {
        let mut v: Vec<String> = c.receive_acking(n, 5).iter().map(Msg::text).collect();
        v.extend(
            drain_msgs(c, Duration::from_millis(500))
                .iter()
                .map(Msg::text),
        );
        v.sort();
        v
    };
    let want_pub = vec![
        "anonymous-retained".to_string(),
        "from-anonymous".to_string(),
    ];
    assert_eq!(texts(&mut anon_sub, 2), want_pub, "anonymous subscriber");
    assert_eq!(texts(&mut puser, 2), want_pub, "user of tenant pub");
    assert_eq!(
        texts(&mut wa, 1),
        vec!["from-a".to_string()],
        "tenant A's watcher"
    );

    // A's new subscriber never sees the anonymous tenant's retained message.
    let mut late = Client::login(addr, "late", V3, &a.user("watcher"), "pw-watch");
    let (codes, early) = subscribe_collect(&mut late, "shared/#", 1);
    assert_eq!(codes, vec![1]);
    assert!(early.is_empty(), "A got pub's retained message: {early:?}");
    // Wrong credentials are still refused, not admitted anonymously.
    assert_eq!(
        login_code(addr, "x", V3, Some(&a.user("watcher")), Some(b"wrong")),
        4,
        "wrong password on a node with an anonymous tenant"
    );
}

/// A 3.1.1 CONNECT (clean session, no credentials) with a retained QoS 0 will.
fn connect_with_retained_will(id: &str, topic: &str, message: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02 | 0x04 | 0x20, 0, 30];
    for field in [id.as_bytes(), topic.as_bytes(), message] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field);
    }
    common::frame(0x10, &body)
}

#[test]
fn a_retained_will_on_a_reserved_topic_is_never_retained() {
    let node = Node::start();
    // Control: a retained will on a free-form topic is retained (so wills do fire here).
    // Then the same on a device topic: it must not land in the tenant's retained set, where
    // a `#` subscriber would read device traffic.
    for (id, topic) in [("will-free", "wills/free"), ("will-dev", "s/us")] {
        let mut c = common::Raw::connect(node.mqtt);
        c.send(&connect_with_retained_will(
            id,
            topic,
            b"400,c8y_ConnectionEvent,lost",
        ));
        assert_eq!(c.read_n(4), vec![0x20, 2, 0, 0], "CONNACK for {id}");
        drop(c); // no DISCONNECT: the will fires
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut sub = Client::clean(node.mqtt, "will-watch", false);
    sub.sub_ok("#", 0);
    let got: Vec<String> = sub
        .drain(Duration::from_millis(800))
        .iter()
        .filter(|p| p.kind() == 3)
        .map(|p| parse_publish(p, false).topic)
        .collect();
    assert_eq!(
        got,
        vec!["wills/free".to_string()],
        "retained messages seen by #"
    );
}
