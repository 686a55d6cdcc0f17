//! The operator files in `deploy/` against the code: every metric the Grafana dashboard and the
//! Prometheus alert rules use is one fleetmq exports, the rules pass `promtool check rules`
//! (where Debian's prometheus package is installed), and what a node exports follows the
//! Prometheus naming conventions with bounded labels.
mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `fleetmq_*` names in a text (without the `_bucket`/`_sum`/`_count` of histograms).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("fleetmq_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let mut name = &text[start..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(n) = name.strip_suffix(suffix) {
                name = n;
            }
        }
        if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            out.insert(name.to_string());
        }
        i = end.max(start + 1);
    }
    out
}

/// Every metric name the code uses (string literals in `crates/`).
fn exported() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).expect("read");
                for line in text.lines().filter(|l| l.contains("\"fleetmq_")) {
                    out.extend(metric_names(line));
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&Path::new(ROOT).join("crates"), &mut out);
    out
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let known = exported();
    assert!(known.contains("fleetmq_connections"), "{known:?}");
    for file in [
        "deploy/grafana/fleetmq-dashboard.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(Path::new(ROOT).join(file)).expect(file);
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{file} uses no fleetmq metric");
        let unknown: Vec<&String> = used.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics fleetmq does not export: {unknown:?}"
        );
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/fleetmq-dashboard.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels
        .iter()
        .all(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty())));
}

#[test]
fn alert_rules_pass_promtool() {
    if !have("promtool") {
        eprintln!("SKIPPED: no promtool (apt-get install prometheus)");
        return;
    }
    let out = std::process::Command::new("promtool")
        .args([
            "check",
            "rules",
            &format!("{ROOT}/deploy/prometheus/alerts.yml"),
        ])
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn exported_metrics_follow_prometheus_conventions() {
    let node = Node::start();
    // Some traffic, so that counters and histograms have values and show.
    let mut c = Raw::connect(node.mqtt);
    c.send(&connect_v311("conv-1", true, 30));
    c.read_n(4);
    let text = node.metrics();
    let mut counters = 0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let (Some(name), Some(kind)) = (it.next(), it.next()) else {
            continue;
        };
        assert!(
            name.starts_with("fleetmq_"),
            "{name} lacks the fleetmq_ prefix"
        );
        match kind {
            "counter" => {
                counters += 1;
                assert!(
                    name.ends_with("_total"),
                    "counter {name} must end in _total"
                );
            }
            "histogram" | "summary" => assert!(
                name.ends_with("_seconds") || name.ends_with("_size") || name.ends_with("_bytes"),
                "{kind} {name}: base units (_seconds, _bytes) or a count (_size)"
            ),
            _ => assert!(
                !name.ends_with("_total"),
                "gauge {name} must not end in _total"
            ),
        }
    }
    assert!(counters > 5, "{text}");
    // Labels stay bounded: never a client id, a topic or a user.
    for bad in ["client=", "client_id=", "topic=", "user=", "device="] {
        assert!(
            !text.lines().any(|l| !l.starts_with('#') && l.contains(bad)),
            "a metric is labelled by {bad}"
        );
    }
}

#[test]
fn kubernetes_manifests_validate() {
    let file = format!("{ROOT}/deploy/k8s/fleetmq.yaml");
    let text = std::fs::read_to_string(&file).expect("manifest");
    // What the manifests must keep doing (docs/operations.md, Kubernetes).
    for must in [
        "kind: StatefulSet",
        "--node-id-from-hostname",
        "clusterIP: None",
        "publishNotReadyAddresses: true",
        "path: /health/ready",
        "--drain-url",
        "kind: PodDisruptionBudget",
        "kind: HorizontalPodAutoscaler",
        "volumeClaimTemplates",
    ] {
        assert!(text.contains(must), "deploy/k8s/fleetmq.yaml lost {must:?}");
    }
    if !have("kubernetes-validate") {
        eprintln!("SKIPPED: no kubernetes-validate (pip install kubernetes-validate)");
        return;
    }
    let out = std::process::Command::new("kubernetes-validate")
        .args(["--strict", &file])
        .output()
        .expect("kubernetes-validate");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert_eq!(all.matches("passed for resource").count(), 5, "{all}");
}

/// Kills a spawned node on drop.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `fleetmq` as the StatefulSet pod `host` (by host name) on fixed ports.
fn pod(host: &str, dir: &Path, http: u16, grpc: u16, join: &str) -> Proc {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fleetmq"))
        .env("HOSTNAME", host)
        .env("FLEETMQ_ADMIN_PASSWORD", "k8s-admin")
        .args(["--node-id-from-hostname", "--cluster-secret", "k8s-secret"])
        .args(["--data-dir", &dir.display().to_string()])
        .args(["--mqtt-addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0"])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--advertise-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--join", join])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn fleetmq");
    Proc(child)
}

/// The image's health check: `fleetmq --probe` on `/health/ready`.
fn ready(http: u16) -> bool {
    std::process::Command::new(env!("CARGO_BIN_EXE_fleetmq"))
        .args(["--probe", &format!("http://127.0.0.1:{http}/health/ready")])
        .status()
        .is_ok_and(|s| s.success())
}

/// The StatefulSet behaviour the manifests rely on: pod 0 with an empty volume forms the
/// cluster when no other pod answers (first start), pod 1 joins it, node ids follow the
/// ordinals, and the preStop command drains its own node.
#[test]
fn statefulset_pods_form_join_and_drain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h0, h1, g0, g1) = (free_port(), free_port(), free_port(), free_port());
    let seeds = format!("127.0.0.1:{g0},127.0.0.1:{g1}");
    let _p0 = pod("fleetmq-0", &dir.path().join("0"), h0, g0, &seeds);
    wait_until(40, "pod 0 forms the cluster", || ready(h0));
    let _p1 = pod("fleetmq-1", &dir.path().join("1"), h1, g1, &seeds);
    wait_until(40, "pod 1 joins", || ready(h1));
    for (d, want) in [("0", "1"), ("1", "2")] {
        let id = std::fs::read_to_string(dir.path().join(d).join("node-id")).expect("node-id");
        assert_eq!(id.trim(), want, "pod {d}");
    }
    let drained = std::process::Command::new(env!("CARGO_BIN_EXE_fleetmq"))
        .env("FLEETMQ_ADMIN_PASSWORD", "k8s-admin")
        .args(["--data-dir", &dir.path().join("1").display().to_string()])
        .args(["--drain-url", &format!("http://127.0.0.1:{h1}")])
        .status()
        .expect("drain");
    assert!(drained.success());
    // Draining: no longer ready (new clients go elsewhere).
    wait_until(10, "pod 1 not ready after its drain", || !ready(h1));
    let wrong = std::process::Command::new(env!("CARGO_BIN_EXE_fleetmq"))
        .env("FLEETMQ_ADMIN_PASSWORD", "wrong")
        .args(["--data-dir", &dir.path().join("0").display().to_string()])
        .args(["--drain-url", &format!("http://127.0.0.1:{h0}")])
        .status()
        .expect("drain");
    assert!(!wrong.success(), "a drain with a wrong password must fail");
}
