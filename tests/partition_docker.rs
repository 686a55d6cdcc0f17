//! A real network partition: three `fleetmq` nodes as Docker containers, each on two private
//! networks: `cluster` (Raft and node-to-node gRPC, addressed by container name) and `clients`
//! (MQTT and HTTP, which this test reaches from the host). Cutting C off the cluster network
//! isolates it from A and B while its clients still reach it, which SIGSTOP cannot show.
//!
//! The image is built `FROM scratch` out of the test's own `fleetmq` binary and the shared
//! libraries it links (nothing is pulled). Without a working Docker engine the test says so and
//! returns; CI machines have one.
//!
//! What it checks:
//! - on the minority (C alone) a persistent CONNECT is refused with CONNACK 3 ("server
//!   unavailable"), not left unanswered, while clean sessions still connect and exchange QoS 1
//!   messages there (their home node, C, is reachable);
//! - the majority (A, B) keeps accepting and delivering QoS 1 messages to a persistent session;
//! - after healing, C catches up, the persistent session resumes on C with session present and
//!   every message acknowledged to the publisher, before, during and after the partition, has
//!   reached the subscriber.
mod common;
mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use support::*;

const V3: bool = false;

/// Runs a docker command; its stdout, or `Err` with stderr.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[track_caller]
fn must(args: &[&str]) -> String {
    docker(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Builds the image from the test binary and its libraries; returns its tag.
fn build_image(prefix: &str) -> String {
    let ctx = tempfile::tempdir().expect("tempdir");
    let root = ctx.path().join("rootfs");
    std::fs::create_dir_all(&root).expect("rootfs");
    let bin = env!("CARGO_BIN_EXE_fleetmq");
    std::fs::copy(bin, root.join("fleetmq")).expect("copy binary");
    let ldd = Command::new("ldd").arg(bin).output().expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().expect("lib dir")).expect("lib dir");
        std::fs::copy(lib, &to).unwrap_or_else(|e| panic!("copy {lib}: {e}"));
    }
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [\"/fleetmq\"]\n",
    )
    .expect("Dockerfile");
    let tag = format!("{prefix}:test");
    let out = Command::new("docker")
        .args(["build", "-q", "-t", &tag])
        .arg(ctx.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker build");
    assert!(
        out.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tag
}

/// Containers and networks of one test run, removed on drop (also when the test panics).
struct Lab {
    prefix: String,
    image: String,
    containers: Vec<String>,
    networks: Vec<String>,
}

impl Lab {
    fn new() -> Lab {
        let prefix = format!("fmqtest{}", std::process::id());
        let image = build_image(&prefix);
        let mut lab = Lab {
            prefix,
            image,
            containers: Vec::new(),
            networks: Vec::new(),
        };
        for net in ["cluster", "clients"] {
            let name = lab.net(net);
            must(&["network", "create", &name]);
            lab.networks.push(name);
        }
        lab
    }

    fn net(&self, which: &str) -> String {
        format!("{}-{which}", self.prefix)
    }

    fn name(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// Starts node `node` (id `id`) joining `join` (node names); returns its client-side
    /// MQTT and HTTP addresses.
    fn start(&mut self, node: &str, id: u64, join: &[&str]) -> (SocketAddr, SocketAddr) {
        let name = self.name(node);
        // Peers reach each other by an alias that exists only on the cluster network: Docker
        // resolves container *names* on every network they share, and the peers would find
        // each other again over the clients network.
        let alias = self.alias(node);
        let advertise = format!("{alias}:7000");
        let id = id.to_string();
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            &self.networks[0],
            "--network-alias",
            &alias,
            &self.image,
            "--node-id",
            &id,
            "--grpc-addr",
            "0.0.0.0:7000",
            "--advertise-addr",
            &advertise,
            "--data-dir",
            "/data",
            "--anonymous-tenant",
            ANON_TENANT,
            "--cluster-secret",
            CLUSTER_SECRET,
            "--log",
            "info,openraft=warn",
        ];
        let joins: Vec<String> = join
            .iter()
            .map(|j| format!("{}:7000", self.alias(j)))
            .collect();
        for j in &joins {
            args.push("--join");
            args.push(j);
        }
        must(&args);
        self.containers.push(name.clone());
        must(&["network", "connect", &self.networks[1], &name]);
        let ip = must(&[
            "inspect",
            "-f",
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                self.networks[1]
            ),
            &name,
        ]);
        let mqtt: SocketAddr = format!("{ip}:1883").parse().expect("mqtt addr");
        let http: SocketAddr = format!("{ip}:8080").parse().expect("http addr");
        (mqtt, http)
    }

    fn alias(&self, node: &str) -> String {
        format!("{}-raft", self.name(node))
    }

    fn partition(&self, node: &str) {
        must(&["network", "disconnect", &self.networks[0], &self.name(node)]);
    }

    fn heal(&self, node: &str) {
        must(&[
            "network",
            "connect",
            "--alias",
            &self.alias(node),
            &self.networks[0],
            &self.name(node),
        ]);
    }

    fn logs(&self, node: &str) -> String {
        let out = Command::new("docker")
            .args(["logs", "--tail", "40", &self.name(node)])
            .output();
        match out {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => e.to_string(),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        for n in &self.networks {
            let _ = docker(&["network", "rm", n]);
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

/// A gauge's value (its samples summed), or `None` while the node does not answer HTTP.
fn gauge(http: SocketAddr, name: &str) -> Option<f64> {
    if std::net::TcpStream::connect_timeout(&http, Duration::from_millis(500)).is_err() {
        return None;
    }
    let text = http_get(http, "/metrics").1;
    Some(metric_sum(&text, &format!("{name} ")) + metric_sum(&text, &format!("{name}{{")))
}

/// Waits until `f` holds, at most `secs`; panics with `what` and C's log otherwise.
fn wait_for(lab: &Lab, secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        if Instant::now() > deadline {
            panic!(
                "{what} within {secs} s\n--- A ---\n{}\n--- C ---\n{}",
                lab.logs("a"),
                lab.logs("c")
            );
        }
        sleep(Duration::from_millis(200));
    }
}

/// Connects, retrying refusals for up to `secs`.
fn connect_retrying(addr: SocketAddr, id: &str, persistent: bool, secs: u64) -> (Client, bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match try_login(addr, id, V3, !persistent, None, None, None) {
            Ok(r) => return r,
            Err(code) if Instant::now() < deadline => {
                eprintln!("{id}: CONNACK {code:#04x} on {addr}, retrying");
                sleep(Duration::from_millis(300));
            }
            Err(code) => panic!("{id}: no successful CONNACK on {addr} ({code:#04x})"),
        }
    }
}

/// Receives (acknowledging) until every payload of `want` is in `seen`, at most `secs`.
fn receive_into(c: &mut Client, seen: &mut HashSet<Vec<u8>>, want: &[Vec<u8>], secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while want.iter().any(|w| !seen.contains(w)) && Instant::now() < deadline {
        for m in c.receive_acking(1, 1) {
            seen.insert(m.payload.clone());
        }
    }
    let missing: Vec<String> = want
        .iter()
        .filter(|w| !seen.contains(*w))
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but never delivered: {missing:?}"
    );
}

#[test]
fn partitioned_node_refuses_durable_writes_and_converges_after_healing() {
    if let Err(e) = docker(&["info", "--format", "{{.ServerVersion}}"]) {
        eprintln!("SKIPPED: no Docker engine here ({e})");
        return;
    }
    let mut lab = Lab::new();
    let (a_mqtt, a_http) = lab.start("a", 1, &[]);
    wait_for(&lab, 30, "A up", || {
        gauge(a_http, "fleetmq_cluster_members").is_some()
    });
    let (b_mqtt, b_http) = lab.start("b", 2, &["a"]);
    let (c_mqtt, c_http) = lab.start("c", 3, &["a", "b"]);
    for (http, who) in [(a_http, "A"), (b_http, "B"), (c_http, "C")] {
        wait_for(&lab, 60, &format!("{who} sees three members"), || {
            gauge(http, "fleetmq_cluster_members") == Some(3.0)
        });
    }

    // Before: a persistent subscriber on A, a publisher on B.
    let (mut sub, _) = connect_retrying(a_mqtt, "pt-sub", true, 20);
    sub.sub_ok("pt/#", 1);
    let mut publ = connect_retrying(b_mqtt, "pt-pub", false, 20).0;
    let before = payloads("before", 20);
    publ.publish_many("pt/x", &before, 1);
    let mut seen = HashSet::new();
    receive_into(&mut sub, &mut seen, &before, 20);

    lab.partition("c");
    // C notices (heartbeats fail) and then is its own home node for every device.
    wait_for(&lab, 30, "C marks A and B down", || {
        gauge(c_http, "fleetmq_cluster_peers_down") == Some(2.0)
    });

    // Minority: a durable write (persistent session) gets a clear refusal, not silence.
    let started = Instant::now();
    match try_login(
        c_mqtt,
        "pt-minority-persistent",
        V3,
        false,
        None,
        None,
        None,
    ) {
        Err(3) => {}
        Err(code) => panic!("persistent CONNECT on the minority: CONNACK {code:#04x}, wanted 3"),
        Ok(_) => panic!("persistent CONNECT on the minority was accepted"),
    }
    eprintln!(
        "minority refused the persistent CONNECT after {:?}",
        started.elapsed()
    );
    // ...while clean sessions still work there, QoS 1 included.
    let mut iso_sub = connect_retrying(c_mqtt, "pt-iso-sub", false, 20).0;
    iso_sub.sub_ok("iso/#", 1);
    let mut iso_pub = connect_retrying(c_mqtt, "pt-iso-pub", false, 20).0;
    let iso = payloads("iso", 5);
    iso_pub.publish_many("iso/x", &iso, 1);
    let mut iso_seen = HashSet::new();
    receive_into(&mut iso_sub, &mut iso_seen, &iso, 10);

    // Majority: still accepts and delivers QoS 1 to the persistent session.
    let during = payloads("during", 20);
    publ.publish_many("pt/x", &during, 1);
    receive_into(&mut sub, &mut seen, &during, 20);

    lab.heal("c");
    wait_for(&lab, 60, "C sees its peers again and catches up", || {
        let (Some(down), Some(applied_c), Some(applied_a)) = (
            gauge(c_http, "fleetmq_cluster_peers_down"),
            gauge(c_http, "fleetmq_raft_applied_index"),
            gauge(a_http, "fleetmq_raft_applied_index"),
        ) else {
            return false;
        };
        down == 0.0 && applied_c >= applied_a
    });

    // The persistent session moves to the healed node and everything acknowledged is there.
    drop(sub);
    let (mut sub, present) = connect_retrying(c_mqtt, "pt-sub", true, 20);
    assert!(
        present,
        "pt-sub resumed on C after healing without its session"
    );
    let after = payloads("after", 10);
    publ.publish_many("pt/x", &after, 1);
    let all: Vec<Vec<u8>> = before
        .iter()
        .chain(&during)
        .chain(&after)
        .cloned()
        .collect();
    receive_into(&mut sub, &mut seen, &all, 30);
    // And the healed node takes durable writes again.
    let (_, present) = connect_retrying(c_mqtt, "pt-minority-persistent", true, 20);
    assert!(!present, "the refused session was never created");
}
