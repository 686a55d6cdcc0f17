//! The transports a device can use (§1.1, §1.5, §1.6): MQTT over TLS with a password, mutual
//! TLS with certificate auto-registration and tenant binding, device tokens over MQTT, MQTT
//! over WebSocket and secure WebSocket, and reloading the server certificate without a
//! restart. Real sockets, real clients, the real `fleetmq` binary.
mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    SerialNumber,
};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Upper bound for any single wait.
const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(800);

// ---------------------------------------------------------------------------------------------
// Certificates

/// A certificate with its key.
struct Issued {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Issued {
    fn pem(&self) -> String {
        self.cert.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key.serialize_der()).into()
    }
}

fn dn(cn: &str, org: &str) -> rcgen::DistinguishedName {
    let mut d = rcgen::DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d.push(DnType::OrganizationName, org);
    d
}

/// A self-signed CA.
fn make_ca(cn: &str) -> Issued {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = dn(cn, "fleetmq tests");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Issued {
        cert: p.self_signed(&key).unwrap(),
        key,
    }
}

/// A server certificate for `localhost` and 127.0.0.1; `org` and `serial` make it
/// recognisable.
fn make_server(ca: &Issued, org: &str, serial: u64) -> Issued {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.distinguished_name = dn("localhost", org);
    p.serial_number = Some(SerialNumber::from(serial));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Issued {
        cert: p.signed_by(&key, &ca.cert, &ca.key).unwrap(),
        key,
    }
}

/// A device (client) certificate with subject CN `cn`.
fn make_device(ca: &Issued, cn: &str) -> Issued {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = dn(cn, "fleetmq devices");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Issued {
        cert: p.signed_by(&key, &ca.cert, &ca.key).unwrap(),
        key,
    }
}

/// Server certificate files in a temp directory owned by the test (not by the node).
struct ServerFiles {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl ServerFiles {
    fn write(server_ca: &Issued, server: &Issued) -> ServerFiles {
        let dir = tempfile::tempdir().unwrap();
        let files = ServerFiles {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            ca: dir.path().join("ca.pem"),
            _dir: dir,
        };
        std::fs::write(&files.ca, server_ca.pem()).unwrap();
        files.replace(server_ca, server);
        files
    }

    /// Overwrites the certificate (with its CA) and the key in place.
    fn replace(&self, server_ca: &Issued, server: &Issued) {
        std::fs::write(&self.key, server.key.serialize_pem()).unwrap();
        std::fs::write(&self.cert, server.pem() + &server_ca.pem()).unwrap();
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.to_str().unwrap().into(),
            "--tls-key".into(),
            self.key.to_str().unwrap().into(),
        ]
    }
}

fn tls_node(files: &ServerFiles) -> Node {
    let flags = files.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = Node::start_secure_with(&flags);
    assert!(
        node.tls.is_some(),
        "node has no TLS listener; log:\n{}",
        node.log()
    );
    assert!(
        node.wss.is_some(),
        "node has no WSS listener; log:\n{}",
        node.log()
    );
    node
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration trusting `server_ca`, presenting `client` (leaf only) if given.
fn client_config(server_ca: &Issued, client: Option<&Issued>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(server_ca.der()).unwrap();
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match client {
        Some(c) => builder
            .with_client_auth_cert(vec![c.der()], c.key_der())
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

// ---------------------------------------------------------------------------------------------
// REST

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// One REST call (blocking; run off the async workers). Returns status and JSON body.
fn rest(
    node: &Node,
    method: &str,
    path: &str,
    auth: (&str, &str),
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("http://{}{}", node.http, path);
    let header = format!("Basic {}", b64(&format!("{}:{}", auth.0, auth.1)));
    tokio::task::block_in_place(|| {
        let req = ureq::request(method, &url)
            .set("Authorization", &header)
            .set("Accept", "application/json")
            .timeout(WAIT);
        let result = match body {
            Some(b) => req.set("Content-Type", "application/json").send_json(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    })
}

struct Tenant {
    id: String,
    domain: String,
    /// `<id>/admin`.
    admin: String,
    admin_pw: String,
}

fn create_tenant(node: &Node, domain: &str) -> Tenant {
    let admin_pw = format!("pw-{domain}-123");
    let (status, body) = rest(
        node,
        "POST",
        "/tenant/tenants",
        ("management/admin", ADMIN_PW),
        Some(json!({"company": domain.to_uppercase(), "domain": domain,
                    "adminName": "admin", "adminPass": admin_pw})),
    );
    assert_eq!(status, 201, "create tenant {domain}: {body}");
    let id = body["id"].as_str().expect("tenant id").to_string();
    Tenant {
        admin: format!("{id}/admin"),
        id,
        domain: domain.to_string(),
        admin_pw,
    }
}

impl Tenant {
    fn auth(&self) -> (&str, &str) {
        (&self.admin, &self.admin_pw)
    }

    /// `<id>/<user>`.
    fn login(&self, user: &str) -> String {
        format!("{}/{}", self.id, user)
    }
}

/// Creates a user; `role` None lets the name decide (`device_*` → device).
fn create_user(node: &Node, t: &Tenant, name: &str, pw: &str, role: Option<&str>) {
    let mut body = json!({"userName": name, "password": pw});
    if let Some(r) = role {
        body["fleetmqRole"] = json!(r);
    }
    let (status, resp) = rest(
        node,
        "POST",
        &format!("/user/{}/users", t.id),
        t.auth(),
        Some(body),
    );
    assert_eq!(status, 201, "create user {name} in {}: {resp}", t.id);
}

fn upload_ca(node: &Node, t: &Tenant, ca: &Issued, auto_registration: bool) {
    let (status, resp) = rest(
        node,
        "POST",
        &format!("/tenant/tenants/{}/trusted-certificates", t.id),
        t.auth(),
        Some(
            json!({"name": format!("ca-{}", t.domain), "certInPemFormat": ca.pem(),
                    "status": "ENABLED", "autoRegistrationEnabled": auto_registration}),
        ),
    );
    assert_eq!(status, 201, "upload CA to {}: {resp}", t.id);
}

/// Status of `GET /user/<tenant>/users/<name>` as that tenant's admin.
fn user_status(node: &Node, t: &Tenant, name: &str) -> u16 {
    rest(
        node,
        "GET",
        &format!("/user/{}/users/{}", t.id, name),
        t.auth(),
        None,
    )
    .0
}

// ---------------------------------------------------------------------------------------------
// rumqttc clients

#[derive(Debug)]
enum Ev {
    ConnAck(ConnectReturnCode),
    SubAck(Vec<SubscribeReasonCode>),
    Msg(String, Vec<u8>),
    Closed(String),
}

/// A connected rumqttc client whose event loop runs in a task and reports over a channel.
/// It never reconnects, so a refused or dropped connection shows up as `Closed`.
struct Mqtt {
    name: String,
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Ev>,
    backlog: VecDeque<Ev>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn options(
    id: &str,
    host: &str,
    port: u16,
    creds: Option<(&str, &str)>,
    transport: Transport,
) -> MqttOptions {
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(transport);
    o.set_max_packet_size(64 * 1024, 64 * 1024);
    if let Some((u, p)) = creds {
        o.set_credentials(u, p);
    }
    o
}

fn tcp_opts(node: &Node, id: &str, user: &str, pw: &str) -> MqttOptions {
    options(
        id,
        "127.0.0.1",
        node.port(),
        Some((user, pw)),
        Transport::Tcp,
    )
}

fn tls_opts(
    node: &Node,
    id: &str,
    creds: Option<(&str, &str)>,
    cfg: Arc<ClientConfig>,
) -> MqttOptions {
    let port = node.tls.expect("tls listener").port();
    options(
        id,
        "127.0.0.1",
        port,
        creds,
        Transport::tls_with_config(TlsConfiguration::Rustls(cfg)),
    )
}

fn ws_opts(node: &Node, id: &str, user: &str, pw: &str) -> MqttOptions {
    let port = node.ws.expect("ws listener").port();
    options(
        id,
        &format!("ws://127.0.0.1:{port}/mqtt"),
        port,
        Some((user, pw)),
        Transport::Ws,
    )
}

fn wss_opts(node: &Node, id: &str, user: &str, pw: &str, cfg: Arc<ClientConfig>) -> MqttOptions {
    let port = node.wss.expect("wss listener").port();
    options(
        id,
        &format!("wss://127.0.0.1:{port}/mqtt"),
        port,
        Some((user, pw)),
        Transport::wss_with_config(TlsConfiguration::Rustls(cfg)),
    )
}

impl Mqtt {
    /// Connects; Err carries what happened instead of an accepted CONNACK.
    async fn connect(name: &str, opts: MqttOptions) -> Result<Mqtt, String> {
        let (client, mut el) = AsyncClient::new(opts, 64);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(c))) => Ev::ConnAck(c.code),
                    Ok(Event::Incoming(Packet::SubAck(s))) => Ev::SubAck(s.return_codes),
                    Ok(Event::Incoming(Packet::Publish(p))) => Ev::Msg(p.topic, p.payload.to_vec()),
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Ev::Closed(format!("{e:?}")));
                        return;
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        let first = tokio::time::timeout(WAIT, rx.recv()).await;
        match first {
            Ok(Some(Ev::ConnAck(ConnectReturnCode::Success))) => Ok(Mqtt {
                name: name.to_string(),
                client,
                rx,
                backlog: VecDeque::new(),
                task,
            }),
            other => {
                task.abort();
                Err(format!("{name}: no accepted CONNACK: {other:?}"))
            }
        }
    }

    /// Retries `connect` until accepted or `WAIT` passed (for settings that apply shortly
    /// after a REST call, like an uploaded CA).
    async fn connect_retry(name: &str, make: impl Fn() -> MqttOptions) -> Mqtt {
        let deadline = Instant::now() + WAIT;
        loop {
            match Mqtt::connect(name, make()).await {
                Ok(m) => return m,
                Err(e) if Instant::now() > deadline => panic!("{e} (retried for {WAIT:?})"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn next(&mut self, until: tokio::time::Instant) -> Option<Ev> {
        if let Some(e) = self.backlog.pop_front() {
            return Some(e);
        }
        tokio::time::timeout_at(until, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        let until = tokio::time::Instant::now() + WAIT;
        let mut kept = VecDeque::new();
        loop {
            match self.next(until).await {
                Some(Ev::SubAck(codes)) => {
                    assert!(
                        codes
                            .iter()
                            .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
                        "{}: SUBSCRIBE {filter} refused: {codes:?}",
                        self.name
                    );
                    break;
                }
                Some(Ev::Closed(e)) => {
                    panic!("{}: closed while subscribing {filter}: {e}", self.name)
                }
                Some(e) => kept.push_back(e),
                None => panic!("{}: no SUBACK for {filter}", self.name),
            }
        }
        kept.extend(self.backlog.drain(..));
        self.backlog = kept;
    }

    async fn publish(&self, topic: &str, qos: QoS, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, qos, false, payload.into())
            .await
            .unwrap();
    }

    /// The payload of the next message on `topic` (others are skipped).
    async fn recv_on(&mut self, topic: &str) -> Vec<u8> {
        let until = tokio::time::Instant::now() + WAIT;
        loop {
            match self.next(until).await {
                Some(Ev::Msg(t, p)) if t == topic => return p,
                Some(Ev::Closed(e)) => {
                    panic!("{}: closed while waiting on {topic}: {e}", self.name)
                }
                Some(_) => {}
                None => panic!("{}: nothing on {topic} within {WAIT:?}", self.name),
            }
        }
    }

    /// The first message on each of `topics`, in whatever order they arrive.
    async fn recv_topics(&mut self, topics: &[&str]) -> std::collections::HashMap<String, Vec<u8>> {
        let until = tokio::time::Instant::now() + WAIT;
        let mut got = std::collections::HashMap::new();
        while got.len() < topics.len() {
            match self.next(until).await {
                Some(Ev::Msg(t, p)) if topics.contains(&t.as_str()) => {
                    got.entry(t).or_insert(p);
                }
                Some(Ev::Closed(e)) => {
                    panic!("{}: closed while waiting on {topics:?}: {e}", self.name)
                }
                Some(_) => {}
                None => panic!(
                    "{}: only {:?} of {topics:?} arrived within {WAIT:?}",
                    self.name,
                    got.keys().collect::<Vec<_>>()
                ),
            }
        }
        got
    }

    /// Fails if any message arrives within `QUIET`.
    async fn expect_quiet(&mut self, why: &str) {
        let until = tokio::time::Instant::now() + QUIET;
        while let Some(e) = self.next(until).await {
            if let Ev::Msg(t, p) = e {
                panic!(
                    "{}: unexpected message on {t}: {:?} ({why})",
                    self.name,
                    String::from_utf8_lossy(&p)
                );
            }
        }
    }

    /// Sends DISCONNECT and waits (bounded) for the connection to end.
    async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Some(e) = self.next(until).await {
            if matches!(e, Ev::Closed(_)) {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw MQTT over TLS (byte-level CONNACK checks)

/// A CONNECT (3.1.1 when `version` is 4, 5.0 when 5) with clean session, keep-alive 30.
fn connect_packet(version: u8, client_id: &str, user: Option<&str>, pass: Option<&str>) -> Vec<u8> {
    let mut flags = 0x02;
    if user.is_some() {
        flags |= 0x80;
    }
    if pass.is_some() {
        flags |= 0x40;
    }
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', version, flags, 0, 30];
    if version == 5 {
        body.push(0);
    }
    for field in [Some(client_id), user, pass].into_iter().flatten() {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    frame(0x10, &body)
}

async fn tls_stream(
    addr: SocketAddr,
    server_ca: &Issued,
    client: Option<&Issued>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(client_config(server_ca, client));
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("TCP connect timed out"))??;
    tokio::time::timeout(
        WAIT,
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// Reads one MQTT packet: (first byte, body).
async fn read_packet<S: AsyncRead + Unpin>(s: &mut S) -> Result<(u8, Vec<u8>), String> {
    let read = async {
        let byte1 = s
            .read_u8()
            .await
            .map_err(|e| format!("reading packet: {e}"))?;
        let mut len = 0usize;
        for i in 0..4 {
            let b = s
                .read_u8()
                .await
                .map_err(|e| format!("reading length: {e}"))?;
            len |= ((b & 0x7f) as usize) << (7 * i);
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body)
            .await
            .map_err(|e| format!("reading body: {e}"))?;
        Ok((byte1, body))
    };
    tokio::time::timeout(WAIT, read)
        .await
        .map_err(|_| "no packet within 10 s".to_string())?
}

/// Sends `connect` over a fresh TLS connection; Ok(CONNACK body) or Err when the handshake
/// or the connection failed before any CONNACK.
async fn raw_connack(
    addr: SocketAddr,
    server_ca: &Issued,
    client: Option<&Issued>,
    connect: &[u8],
) -> Result<Vec<u8>, String> {
    let mut s = tls_stream(addr, server_ca, client)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    s.write_all(connect)
        .await
        .map_err(|e| format!("write: {e}"))?;
    s.flush().await.map_err(|e| format!("flush: {e}"))?;
    let (byte1, body) = read_packet(&mut s).await?;
    if byte1 != 0x20 {
        return Err(format!(
            "expected CONNACK, got packet {byte1:#04x} {body:?}"
        ));
    }
    Ok(body)
}

/// The return/reason code of a CONNACK body (second byte in 3.1.1 and 5.0).
fn code(connack: &[u8]) -> u8 {
    connack[1]
}

// ---------------------------------------------------------------------------------------------
// Shared fixture for the certificate tests

struct Mtls {
    _files: ServerFiles,
    server_ca: Issued,
    node: Node,
    a: Tenant,
    b: Tenant,
    ca_a: Issued,
    ca_b: Issued,
}

/// A TLS node, tenants A (`acme`) and B (`bravo`); CA_B uploaded to B without
/// auto-registration, then CA_A uploaded to A with it (B first, so once CA_A is in force
/// CA_B is too).
fn mtls_fixture() -> Mtls {
    let server_ca = make_ca("fleetmq test server CA");
    let files = ServerFiles::write(&server_ca, &make_server(&server_ca, "fleetmq server", 1));
    let node = tls_node(&files);
    let a = create_tenant(&node, "acme");
    let b = create_tenant(&node, "bravo");
    let ca_a = make_ca("Acme device CA");
    let ca_b = make_ca("Bravo device CA");
    upload_ca(&node, &b, &ca_b, false);
    upload_ca(&node, &a, &ca_a, true);
    Mtls {
        _files: files,
        server_ca,
        node,
        a,
        b,
        ca_a,
        ca_b,
    }
}

impl Mtls {
    /// rumqttc over TLS presenting `cert`, no username.
    fn cert_opts(&self, id: &str, cert: &Issued) -> MqttOptions {
        tls_opts(
            &self.node,
            id,
            None,
            client_config(&self.server_ca, Some(cert)),
        )
    }

    /// A normal user of `t` subscribed to `#` over plain TCP.
    async fn watcher(&self, t: &Tenant, name: &str) -> Mqtt {
        create_user(&self.node, t, "watcher", "watch-pw-1", Some("user"));
        let mut w = Mqtt::connect(
            name,
            tcp_opts(&self.node, name, &t.login("watcher"), "watch-pw-1"),
        )
        .await
        .unwrap();
        w.subscribe("#").await;
        w
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_password() {
    let ca = make_ca("fleetmq test server CA");
    let files = ServerFiles::write(&ca, &make_server(&ca, "fleetmq server", 1));
    let node = tls_node(&files);
    let t = create_tenant(&node, "acme");
    create_user(&node, &t, "device_dev1", "pw", None);
    let login = t.login("device_dev1");

    let mut dev = Mqtt::connect(
        "dev1",
        tls_opts(
            &node,
            "dev1",
            Some((&login, "pw")),
            client_config(&ca, None),
        ),
    )
    .await
    .unwrap();
    dev.subscribe("x/y").await;
    dev.publish("x/y", QoS::AtLeastOnce, "over-tls").await;
    assert_eq!(dev.recv_on("x/y").await, b"over-tls");

    // A wrong password over TLS is refused like over TCP.
    let bad = Mqtt::connect(
        "dev1-bad",
        tls_opts(
            &node,
            "dev1",
            Some((&login, "wrong")),
            client_config(&ca, None),
        ),
    )
    .await;
    assert!(bad.is_err(), "wrong password accepted over TLS");

    if !have("mosquitto_pub") {
        eprintln!("mosquitto_pub not installed: skipping the mosquitto part");
        return;
    }
    // mosquitto_pub connects as dev1 too, which would take over (and disconnect) the rumqttc
    // dev1 connection; a normal user of the tenant watches the topic instead.
    dev.disconnect().await;
    create_user(&node, &t, "watcher", "watch-pw-1", Some("user"));
    let mut watcher = Mqtt::connect(
        "watcher",
        tls_opts(
            &node,
            "watcher",
            Some((&t.login("watcher"), "watch-pw-1")),
            client_config(&ca, None),
        ),
    )
    .await
    .unwrap();
    watcher.subscribe("x/y").await;
    let port = node.tls.unwrap().port().to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("mosquitto_pub")
            .args([
                "--cafile",
                files.ca.to_str().unwrap(),
                "-h",
                "127.0.0.1",
                "-p",
                &port,
            ])
            .args([
                "-u", &login, "-P", "pw", "-i", "dev1", "-t", "x/y", "-m", "hello",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("mosquitto_pub did not finish within 20 s")
    .unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(watcher.recv_on("x/y").await, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_auto_registration_and_tenant_binding() {
    let f = mtls_fixture();
    let tls = f.node.tls.unwrap();
    let mut watch_a = f.watcher(&f.a, "watch-a").await;
    let mut watch_b = f.watcher(&f.b, "watch-b").await;

    // Auto-registration: CN=devA1 from CA_A, no username, ClientId d:devA1.
    let dev_a1 = make_device(&f.ca_a, "devA1");
    assert_eq!(
        user_status(&f.node, &f.a, "device_devA1"),
        404,
        "exists before connecting"
    );
    let dev = Mqtt::connect_retry("devA1", || f.cert_opts("d:devA1", &dev_a1)).await;
    assert_eq!(
        user_status(&f.node, &f.a, "device_devA1"),
        200,
        "not auto-registered in A"
    );
    assert_eq!(
        user_status(&f.node, &f.b, "device_devA1"),
        404,
        "registered in B"
    );

    dev.publish("devices/devA1/temp", QoS::AtLeastOnce, "21.5")
        .await;
    assert_eq!(watch_a.recv_on("devices/devA1/temp").await, b"21.5");
    watch_b
        .expect_quiet("tenant B must not see tenant A's device")
        .await;
    dev.disconnect().await;

    // The certificate decides the tenant, whatever the username says.
    let mut with_user = f.cert_opts("d:devA1", &dev_a1);
    with_user.set_credentials(f.b.login("someone"), "not-a-password");
    let dev = Mqtt::connect("devA1 with B username", with_user)
        .await
        .expect(
            "certificate login with a foreign username must still be judged on the certificate",
        );
    dev.publish("devices/devA1/temp", QoS::AtLeastOnce, "22.5")
        .await;
    assert_eq!(watch_a.recv_on("devices/devA1/temp").await, b"22.5");
    watch_b
        .expect_quiet("the username named tenant B, but the certificate is A's")
        .await;
    assert_eq!(user_status(&f.node, &f.b, "device_devA1"), 404);
    assert_eq!(user_status(&f.node, &f.b, "someone"), 404);
    dev.disconnect().await;

    // CA_B is trusted but does not auto-register: devB9 is unknown → 5 / 0x87.
    let dev_b9 = make_device(&f.ca_b, "devB9");
    let deadline = Instant::now() + WAIT;
    let connack = loop {
        match raw_connack(
            tls,
            &f.server_ca,
            Some(&dev_b9),
            &connect_packet(4, "d:devB9", None, None),
        )
        .await
        {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("devB9 (CA_B) got no CONNACK: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(connack, vec![0, 5], "devB9 over 3.1.1");
    let connack = raw_connack(
        tls,
        &f.server_ca,
        Some(&dev_b9),
        &connect_packet(5, "d:devB9", None, None),
    )
    .await
    .unwrap();
    assert_eq!(code(&connack), 0x87, "devB9 over 5.0: {connack:?}");
    assert_eq!(
        user_status(&f.node, &f.b, "device_devB9"),
        404,
        "devB9 registered in B"
    );
    assert_eq!(
        user_status(&f.node, &f.a, "device_devB9"),
        404,
        "devB9 registered in A"
    );

    // CN devA2 but ClientId device part devA3 → 5 / 0x87, and nothing registered.
    let dev_a2 = make_device(&f.ca_a, "devA2");
    let connack = raw_connack(
        tls,
        &f.server_ca,
        Some(&dev_a2),
        &connect_packet(4, "d:devA3", None, None),
    )
    .await
    .unwrap();
    assert_eq!(connack, vec![0, 5], "CN/ClientId mismatch over 3.1.1");
    let connack = raw_connack(
        tls,
        &f.server_ca,
        Some(&dev_a2),
        &connect_packet(5, "d:devA3", None, None),
    )
    .await
    .unwrap();
    assert_eq!(
        code(&connack),
        0x87,
        "CN/ClientId mismatch over 5.0: {connack:?}"
    );
    for name in ["device_devA2", "device_devA3"] {
        assert_eq!(
            user_status(&f.node, &f.a, name),
            404,
            "{name} registered after a CN mismatch"
        );
    }

    // A certificate from a CA nobody uploaded: the handshake fails, there is no CONNACK.
    let rogue_ca = make_ca("Acme device CA"); // same name as CA_A, different key
    let rogue = make_device(&rogue_ca, "devA1");
    let result = raw_connack(
        tls,
        &f.server_ca,
        Some(&rogue),
        &connect_packet(4, "d:devA1", None, None),
    )
    .await;
    assert!(
        result.is_err(),
        "a certificate of an unknown CA got a CONNACK: {result:?}"
    );

    // No certificate on the TLS port: password login works.
    create_user(&f.node, &f.a, "device_pw1", "pw-1", None);
    let pw = Mqtt::connect(
        "pw1",
        tls_opts(
            &f.node,
            "pw1",
            Some((&f.a.login("device_pw1"), "pw-1")),
            client_config(&f.server_ca, None),
        ),
    )
    .await
    .expect("password login on the TLS port without a client certificate");
    pw.publish("devices/pw1/x", QoS::AtLeastOnce, "pw").await;
    assert_eq!(watch_a.recv_on("devices/pw1/x").await, b"pw");
    let connack = raw_connack(
        tls,
        &f.server_ca,
        None,
        &connect_packet(4, "pw1b", Some(&f.a.login("device_pw1")), Some("wrong")),
    )
    .await
    .unwrap();
    assert_eq!(connack, vec![0, 4], "wrong password without certificate");
}

/// The payload (claims) of a JWT, unverified.
fn jwt_claims(jwt: &str) -> Value {
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWT: {jwt}");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[1].trim_end_matches('='))
        .unwrap_or_else(|e| panic!("JWT payload is not base64url: {e}: {jwt}"));
    serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("JWT payload is not JSON: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_token_over_mqtt() {
    let f = mtls_fixture();
    let dev_a1 = make_device(&f.ca_a, "devA1");
    let mut dev = Mqtt::connect_retry("devA1", || f.cert_opts("d:devA1", &dev_a1)).await;
    dev.subscribe("s/dat").await;
    dev.subscribe("s/e").await;
    dev.publish("s/uat", QoS::AtMostOnce, Vec::new()).await;
    let msg = String::from_utf8(dev.recv_on("s/dat").await).unwrap();
    let jwt = msg
        .strip_prefix("71,")
        .unwrap_or_else(|| panic!("s/dat message is not 71,<JWT>: {msg:?}"));
    let claims = jwt_claims(jwt);
    assert_eq!(claims["iss"], json!(f.a.domain), "iss: {claims}");
    assert_eq!(claims["sub"], json!("device_devA1"), "sub: {claims}");
    assert_eq!(claims["ten"], json!(f.a.id), "ten: {claims}");
    let iat = claims["iat"]
        .as_u64()
        .unwrap_or_else(|| panic!("iat: {claims}"));
    let exp = claims["exp"]
        .as_u64()
        .unwrap_or_else(|| panic!("exp: {claims}"));
    assert!(exp > iat, "exp {exp} <= iat {iat}");
    dev.expect_quiet("a certificate device gets only 71 on s/dat")
        .await;

    // The token authenticates the device on the REST API (Bearer), as Cumulocity's does.
    let url = format!("http://{}/user/currentUser", f.node.http);
    let me: serde_json::Value = ureq::get(&url)
        .set("Authorization", &format!("Bearer {jwt}"))
        .call()
        .expect("Bearer token accepted")
        .into_json()
        .expect("JSON");
    assert_eq!(me["userName"], json!("device_devA1"), "{me}");
    let forged = format!("{jwt}x");
    match ureq::get(&url)
        .set("Authorization", &format!("Bearer {forged}"))
        .call()
    {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("a tampered token must get 401, got {other:?}"),
    }

    // A password device gets the Cumulocity error on s/e and no token.
    create_user(&f.node, &f.a, "device_pw1", "pw-1", None);
    let mut pw = Mqtt::connect(
        "pw1",
        tls_opts(
            &f.node,
            "pw1",
            Some((&f.a.login("device_pw1"), "pw-1")),
            client_config(&f.server_ca, None),
        ),
    )
    .await
    .unwrap();
    pw.subscribe("s/e").await;
    pw.subscribe("s/dat").await;
    pw.publish("s/uat", QoS::AtMostOnce, Vec::new()).await;
    let err = String::from_utf8(pw.recv_on("s/e").await).unwrap();
    assert_eq!(
        err,
        "41,,MqttAuth: Cannot publish token for device that do not use certificate authentication"
    );
    pw.expect_quiet("a password device must get no token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_secure_websocket() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::{self, Message};

    let ca = make_ca("fleetmq test server CA");
    let files = ServerFiles::write(&ca, &make_server(&ca, "fleetmq server", 1));
    let node = tls_node(&files);
    let t = create_tenant(&node, "acme");
    for u in ["alice", "bob", "carol"] {
        create_user(&node, &t, u, &format!("{u}-pw"), Some("user"));
    }
    // Raw WebSocket handshakes.
    let port = node.ws.unwrap().port();
    let handshake = |path: &str, protocol: Option<&str>| {
        let mut req = format!("ws://127.0.0.1:{port}{path}")
            .into_client_request()
            .unwrap();
        if let Some(p) = protocol {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
        }
        async move {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, tcp))
                .await
                .expect("WebSocket handshake timed out")
        }
    };
    match handshake("/other", Some("mqtt")).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert!(
                resp.status().is_client_error(),
                "path /other: {}",
                resp.status()
            )
        }
        Ok(_) => panic!("WebSocket upgrade on /other was accepted"),
        Err(e) => panic!("path /other: unexpected error {e}"),
    }
    match handshake("/mqtt", Some("foo")).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert!(
                resp.status().is_client_error(),
                "subprotocol foo: {}",
                resp.status()
            )
        }
        Ok((_, resp)) => panic!("subprotocol foo accepted: {:?}", resp.headers()),
        Err(e) => panic!("subprotocol foo: unexpected error {e}"),
    }
    let (mut sock, resp) = handshake("/mqtt", Some("mqtt"))
        .await
        .expect("upgrade on /mqtt");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("mqtt"),
        "selected subprotocol: {:?}",
        resp.headers()
    );
    // MQTT flows over it: CONNECT in one binary message, CONNACK back.
    let connect = connect_packet(4, "raw-ws", Some(&t.login("alice")), Some("alice-pw"));
    sock.send(Message::Binary(connect.into())).await.unwrap();
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + WAIT;
    while got.len() < 4 {
        match tokio::time::timeout_at(until, sock.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => got.extend_from_slice(&b),
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "no CONNACK over raw WebSocket: {other:?} (got {got:?}); node log:\n{}",
                node.log()
            ),
        }
    }
    assert_eq!(got, vec![0x20, 0x02, 0x00, 0x00]);

    let mut ws = match Mqtt::connect(
        "ws",
        ws_opts(&node, "alice-ws", &t.login("alice"), "alice-pw"),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => panic!("{e}\nnode log:\n{}", node.log()),
    };
    let mut wss = Mqtt::connect(
        "wss",
        wss_opts(
            &node,
            "bob-wss",
            &t.login("bob"),
            "bob-pw",
            client_config(&ca, None),
        ),
    )
    .await
    .unwrap();
    let mut tcp = Mqtt::connect(
        "tcp",
        tcp_opts(&node, "carol-tcp", &t.login("carol"), "carol-pw"),
    )
    .await
    .unwrap();
    let mut tls = Mqtt::connect(
        "tls",
        tls_opts(
            &node,
            "carol-tls",
            Some((&t.login("carol"), "carol-pw")),
            client_config(&ca, None),
        ),
    )
    .await
    .unwrap();
    for c in [&mut ws, &mut wss, &mut tcp, &mut tls] {
        c.subscribe("chat/#").await;
    }
    // Every client publishes once; every client receives all four.
    let topics = ["chat/ws", "chat/wss", "chat/tcp", "chat/tls"];
    for (c, topic) in [&ws, &wss, &tcp, &tls].into_iter().zip(topics) {
        c.publish(topic, QoS::AtLeastOnce, format!("from {topic}"))
            .await;
    }
    for c in [&mut ws, &mut wss, &mut tcp, &mut tls] {
        let got = c.recv_topics(&topics).await;
        for topic in topics {
            assert_eq!(
                got[topic],
                format!("from {topic}").into_bytes(),
                "{} on {topic}",
                c.name
            );
        }
    }
    // A wrong password over WebSocket is refused.
    assert!(Mqtt::connect(
        "ws-bad",
        ws_opts(&node, "alice-ws2", &t.login("alice"), "nope")
    )
    .await
    .is_err());
}

/// The leaf certificate a fresh TLS connection is shown.
async fn presented_cert(addr: SocketAddr, ca: &Issued) -> Result<Vec<u8>, String> {
    let s = tls_stream(addr, ca, None)
        .await
        .map_err(|e| e.to_string())?;
    let certs = s
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no peer certificate")?;
    Ok(certs[0].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_reload() {
    let ca = make_ca("fleetmq test server CA");
    let one = make_server(&ca, "fleetmq reload ONE", 1001);
    let two = make_server(&ca, "fleetmq reload TWO", 1002);
    let files = ServerFiles::write(&ca, &one);
    let mut node = tls_node(&files);
    let tls = node.tls.unwrap();
    let t = create_tenant(&node, "acme");
    create_user(&node, &t, "carol", "carol-pw", Some("user"));

    assert_eq!(
        presented_cert(tls, &ca).await.unwrap(),
        one.der().to_vec(),
        "initial certificate"
    );
    // An MQTT session on the old certificate.
    let mut old = tls_stream(tls, &ca, None).await.unwrap();
    old.write_all(&connect_packet(
        4,
        "old-conn",
        Some(&t.login("carol")),
        Some("carol-pw"),
    ))
    .await
    .unwrap();
    assert_eq!(read_packet(&mut old).await.unwrap(), (0x20, vec![0, 0]));

    files.replace(&ca, &two);
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    loop {
        let seen = presented_cert(tls, &ca).await;
        if seen.as_deref() == Ok(two.der().as_ref()) {
            break;
        }
        if Instant::now() > deadline {
            let which = match &seen {
                Ok(d) if d == one.der().as_ref() => "still certificate ONE".to_string(),
                Ok(_) => "an unknown certificate".to_string(),
                Err(e) => format!("error {e}"),
            };
            panic!("certificate TWO not presented within {WAIT:?}: {which} (previous {last:?})");
        }
        last = Some(seen.map(|d| d.len()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(node.is_running(), "node exited");
    assert_eq!(node.tls.unwrap(), tls, "TLS address changed");

    // The old connection still works: PINGREQ → PINGRESP, and it still sees certificate ONE.
    assert_eq!(
        old.get_ref().1.peer_certificates().unwrap()[0].as_ref(),
        one.der().as_ref()
    );
    old.write_all(&[0xC0, 0x00]).await.unwrap();
    assert_eq!(read_packet(&mut old).await.unwrap(), (0xD0, vec![]));
    // And a new session over the new certificate logs in.
    let connack = raw_connack(
        tls,
        &ca,
        None,
        &connect_packet(4, "new-conn", Some(&t.login("carol")), Some("carol-pw")),
    )
    .await
    .unwrap();
    assert_eq!(connack, vec![0, 0]);
}
