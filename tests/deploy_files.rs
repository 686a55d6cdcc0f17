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
