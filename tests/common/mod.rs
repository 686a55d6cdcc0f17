//! Test harness: runs the real `fleetmq` binary on 127.0.0.1 with port 0 and a temporary data
//! directory, reads the bound addresses from its `--print-addrs` line, and can kill -9,
//! SIGTERM and restart it on the same data directory and port.
#![allow(dead_code)]

pub use fleetmq_protocol::decode::frame;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Password of `management/admin` in every test node.
pub const ADMIN_PW: &str = "test-admin-pw";
/// Password of `management/devicebootstrap` in every test node.
pub const BOOTSTRAP_PW: &str = "test-bootstrap-pw";
/// The tenant `Node::start` admits clients without credentials into.
pub const ANON_TENANT: &str = "public";
/// The `--cluster-secret` of test clusters.
pub const CLUSTER_SECRET: &str = "test-cluster-secret";

/// A running node (or one that was stopped and can be restarted).
pub struct Node {
    child: Option<Child>,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    /// MQTT over WebSocket (always on).
    pub ws: Option<SocketAddr>,
    /// MQTT over TLS and secure WebSocket (with `start_tls`).
    pub tls: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    /// gRPC (Raft and node-to-node) address: the `"grpc"` key of `--print-addrs`, or the fixed
    /// address a cluster node was started with (`start_cluster`).
    pub grpc: Option<SocketAddr>,
    /// Cluster node id (`start_cluster`); `None` for a single node started with the defaults.
    pub node_id: Option<u64>,
    dir: tempfile::TempDir,
    args: Vec<String>,
    starts: u32,
    /// What `--grpc-addr` gets: `127.0.0.1:0`, or a fixed port that survives restarts.
    grpc_bind: String,
    /// How long to wait for the `--print-addrs` line (a joining node prints it only once it
    /// has joined and caught up).
    startup: Duration,
}

impl Node {
    /// Starts a node that admits clients without credentials into tenant `public` (for the
    /// MQTT protocol tests, which are not about logins).
    pub fn start() -> Node {
        Node::start_with(&[])
    }

    /// Like `start`, with extra flags.
    pub fn start_with(args: &[&str]) -> Node {
        let mut all = vec!["--anonymous-tenant", ANON_TENANT];
        all.extend_from_slice(args);
        Node::start_secure_with(&all)
    }

    /// Starts a node as a production one runs: credentials required.
    pub fn start_secure() -> Node {
        Node::start_secure_with(&[])
    }

    /// Like `start_secure`, with extra flags.
    pub fn start_secure_with(args: &[&str]) -> Node {
        Node::launch(
            args.iter().map(|s| s.to_string()).collect(),
            None,
            None,
            Duration::from_secs(30),
        )
    }

    /// Starts one member of a cluster that admits clients without credentials into tenant
    /// `public` (like `start_with`): node id `node_id`, gRPC on the fixed `127.0.0.1:grpc_port`
    /// (pick it with `free_port`; it stays the same across `restart`), `--join` for every
    /// address in `join` (none: the node forms a new cluster on its empty data directory), then
    /// `args`. Returns once the node printed its addresses, i.e. after it has joined and caught
    /// up. A restart passes the same flags again (the `--join` ones included).
    pub fn start_cluster(node_id: u64, grpc_port: u16, join: &[SocketAddr], args: &[&str]) -> Node {
        let mut all = vec!["--anonymous-tenant", ANON_TENANT];
        all.extend_from_slice(args);
        Node::start_cluster_secure(node_id, grpc_port, join, &all)
    }

    /// Like `start_cluster`, without the anonymous tenant (credentials required).
    pub fn start_cluster_secure(
        node_id: u64,
        grpc_port: u16,
        join: &[SocketAddr],
        args: &[&str],
    ) -> Node {
        let mut all = vec!["--node-id".to_string(), node_id.to_string()];
        for j in join {
            all.push("--join".to_string());
            all.push(j.to_string());
        }
        all.extend(args.iter().map(|s| s.to_string()));
        // Every test cluster authenticates its node-to-node calls, as a production one should.
        if !args.contains(&"--cluster-secret") {
            all.push("--cluster-secret".to_string());
            all.push(CLUSTER_SECRET.to_string());
        }
        let grpc: SocketAddr = ([127, 0, 0, 1], grpc_port).into();
        Node::launch(all, Some(grpc), Some(node_id), Duration::from_secs(60))
    }

    fn launch(
        args: Vec<String>,
        grpc: Option<SocketAddr>,
        node_id: Option<u64>,
        startup: Duration,
    ) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut node = Node {
            child: None,
            mqtt: "127.0.0.1:0".parse().unwrap(),
            http: "127.0.0.1:0".parse().unwrap(),
            ws: None,
            tls: None,
            wss: None,
            grpc,
            node_id,
            dir,
            args,
            starts: 0,
            grpc_bind: grpc.map_or_else(|| "127.0.0.1:0".to_string(), |g| g.to_string()),
            startup,
        };
        node.spawn("127.0.0.1:0", "127.0.0.1:0");
        node
    }

    /// The gRPC address other nodes `--join` (panics for a node that did not report one).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.expect("node has no known gRPC address")
    }

    /// The node's temporary directory (for certificates a test writes).
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The node's log of its latest start.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{}.log", self.starts)))
            .unwrap_or_default()
    }

    fn spawn(&mut self, mqtt: &str, http: &str) {
        self.starts += 1;
        let log = std::fs::File::create(self.dir.path().join(format!("node-{}.log", self.starts)))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetmq"));
        cmd.arg("--mqtt-addr")
            .arg(mqtt)
            .arg("--http-addr")
            .arg(http)
            .arg("--grpc-addr")
            .arg(&self.grpc_bind)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--ws-addr")
            .arg("127.0.0.1:0")
            .arg("--tls-addr")
            .arg("127.0.0.1:0")
            .arg("--wss-addr")
            .arg("127.0.0.1:0")
            .arg("--print-addrs")
            .args(&self.args)
            .env("FLEETMQ_LOG", "info,openraft=warn")
            .env("FLEETMQ_ADMIN_PASSWORD", ADMIN_PW)
            .env("FLEETMQ_BOOTSTRAP_PASSWORD", BOOTSTRAP_PW)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("spawn fleetmq");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = rx.recv_timeout(self.startup).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("fleetmq did not print its addresses; log:\n{}", self.log())
        });
        let v: serde_json::Value = serde_json::from_str(&line).expect("addrs json");
        self.mqtt = v["mqtt"].as_str().unwrap().parse().unwrap();
        self.http = v["http"].as_str().unwrap().parse().unwrap();
        let opt = |k: &str| v[k].as_str().map(|a| a.parse().unwrap());
        self.ws = opt("ws");
        self.tls = opt("tls");
        self.wss = opt("wss");
        if let Some(g) = opt("grpc") {
            self.grpc = Some(g);
        }
        self.child = Some(child);
    }

    /// MQTT port.
    pub fn port(&self) -> u16 {
        self.mqtt.port()
    }

    /// kill -9: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit.
    pub fn sigterm(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe_kill(c.id(), 15);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("fleetmq did not exit on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again on the same data directory, the same MQTT port and (for a cluster node)
    /// the same gRPC port, with the same flags.
    pub fn restart(&mut self) {
        self.kill9();
        let mqtt = format!("127.0.0.1:{}", self.mqtt.port());
        let mut ports = vec![mqtt.clone()];
        if !self.grpc_bind.ends_with(":0") {
            ports.push(self.grpc_bind.clone());
        }
        for port in &ports {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                // The old socket may linger briefly; retry until the port is free.
                if std::net::TcpListener::bind(port).is_ok() || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.spawn(&mqtt, "127.0.0.1:0");
    }

    /// Sends signal `sig` (a name as `kill -s` takes it: "STOP", "CONT", "TERM", ...) to the
    /// running process without waiting for anything; false if no process runs or `kill` failed.
    /// SIGSTOP freezes the node (its sockets stay open, nothing answers) until SIGCONT.
    pub fn signal(&self, sig: &str) -> bool {
        match self.child.as_ref() {
            Some(c) => Command::new("kill")
                .arg("-s")
                .arg(sig)
                .arg(c.id().to_string())
                .status()
                .map(|s| s.success())
                .unwrap_or(false),
            None => false,
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// GET a path on the HTTP port; returns (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path)
    }

    /// The Prometheus text.
    pub fn metrics(&self) -> String {
        self.http_get("/metrics").1
    }

    /// Sum of all samples of a metric whose line starts with `prefix` (name plus optional
    /// label text, e.g. `fleetmq_protocol_errors_total{reason="malformed"`).
    pub fn metric(&self, prefix: &str) -> f64 {
        metric_sum(&self.metrics(), prefix)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Minimal HTTP/1.0 GET, to avoid an HTTP client dependency in tests.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("http connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released), for an
/// address a node must keep across restarts and that other nodes are told before it starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Sums metric samples whose line starts with `prefix`.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Waits until `f` is true or panics after `secs`.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// Whether a program is on PATH (mosquitto clients are installed by .ci/run).
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A raw TCP connection for byte-level tests.
pub struct Raw {
    pub s: TcpStream,
}

impl Raw {
    /// Connects to the node's MQTT port.
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw { s }
    }

    /// Writes bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write");
    }

    /// Reads until `n` bytes arrived or the peer closed/timeout; returns what came.
    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match self.s.read(&mut out[got..]) {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
        out.truncate(got);
        out
    }

    /// True when the server closed the connection (EOF) within the read timeout, after
    /// draining whatever it sent first; returns the drained bytes too.
    pub fn closed(&mut self) -> (bool, Vec<u8>) {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return (true, all),
                Ok(k) => all.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (true, all),
                Err(_) => return (false, all),
            }
        }
    }
}

/// A 3.1.1 CONNECT packet with a client id, clean session and keep-alive.
pub fn connect_v311(client_id: &str, clean: bool, keep_alive: u16) -> Vec<u8> {
    let mut body = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        if clean { 0x02 } else { 0x00 },
    ];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    frame(0x10, &body)
}

/// A 5.0 CONNECT with no properties.
pub fn connect_v5(client_id: &str, clean: bool, keep_alive: u16) -> Vec<u8> {
    let mut body = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        5,
        if clean { 0x02 } else { 0x00 },
    ];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.push(0); // properties
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    frame(0x10, &body)
}

/// Path to a scratch file inside the test's temp dir.
pub fn scratch(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// One REST call with Basic auth `user:password` to `path` on the node (or to a full
/// `http://` URL, e.g. a collection's `next` link). Any status is returned with the JSON body
/// (`Null` when there is none or it is not JSON).
pub fn rest(
    node: &Node,
    method: &str,
    path: &str,
    user: &str,
    password: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    use base64::Engine;
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    );
    let url = if path.starts_with("http://") {
        path.to_string()
    } else {
        format!("http://{}{path}", node.http)
    };
    let req = ureq::request(method, &url)
        .set("Authorization", &auth)
        .timeout(Duration::from_secs(30));
    let result = match body {
        Some(b) => req
            .set("Content-Type", "application/json")
            .send_string(&b.to_string()),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path} on {}: {e}", node.http),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}
