//! `deploy/docker-compose.yml` as an operator runs it: images built offline
//! (`deploy/docker/build-image.sh` from this test's own binary, `deploy/prometheus/build-image.sh`
//! from Debian's `prometheus`), `docker-compose up -d`, all three nodes healthy and one cluster,
//! a subscriber on node 3 receiving what a device publishes on node 1, Prometheus scraping every
//! node, a fourth node added with `--scale` taking shard seats and leaving again when scaled
//! away, a stopped node not stopping the others, and everything torn down.
//!
//! Without Docker and docker-compose the test says so and returns; `.ci/run` installs
//! Prometheus when a Docker engine is there.
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The compose project of one test run; `down -v` on drop (also when the test panics).
struct Project {
    name: String,
    env: Vec<(String, String)>,
    /// Anonymous volumes of scaled replicas (compose keeps them when it scales a service down).
    volumes: Vec<String>,
}

impl Project {
    fn compose(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("docker-compose")
            .args([
                "-f",
                &format!("{ROOT}/deploy/docker-compose.yml"),
                "-p",
                &self.name,
            ])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .map_err(|e| format!("docker-compose {args:?}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "docker-compose {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn must(&self, args: &[&str]) -> String {
        self.compose(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn port(&self, var: &str) -> u16 {
        self.env
            .iter()
            .find(|(k, _)| k == var)
            .and_then(|(_, v)| v.parse().ok())
            .expect("port")
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self.compose(&["--profile", "scale", "down", "-v", "-t", "5"]);
        for v in &self.volumes {
            let _ = Command::new("docker")
                .args(["volume", "rm", "-f", v])
                .output();
        }
        for var in ["FLEETMQ_IMAGE", "PROMETHEUS_IMAGE"] {
            if let Some((_, tag)) = self.env.iter().find(|(k, _)| k == var) {
                let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
            }
        }
    }
}

fn http(port: u16, path: &str) -> Option<Value> {
    let auth = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "management/admin:compose-admin"
        )
    );
    let r = ureq::get(&format!("http://127.0.0.1:{port}{path}"))
        .set("Authorization", &auth)
        .timeout(Duration::from_secs(5))
        .call()
        .ok()?;
    r.into_json().ok()
}

fn wait<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn build(script: &str, tag: &str, env: &[(&str, &str)]) -> Result<(), String> {
    let out = Command::new(format!("{ROOT}/{script}"))
        .arg(tag)
        .envs(env.iter().copied())
        .output()
        .map_err(|e| format!("{script}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// One mosquitto_sub on `port` for `topic`, collecting what arrives within `secs`.
fn subscribe(port: u16, topic: &str, secs: u64) -> std::process::Child {
    Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-u",
            "management/admin",
        ])
        .args([
            "-P",
            "compose-admin",
            "-q",
            "1",
            "-t",
            topic,
            "-W",
            &secs.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub")
}

fn publish(port: u16, topic: &str, msg: &str) -> bool {
    Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-u",
            "management/admin",
        ])
        .args(["-P", "compose-admin", "-q", "1", "-t", topic, "-m", msg])
        .status()
        .is_ok_and(|s| s.success())
}

/// Publishes on node `from` until a subscriber on node `to` has the message.
fn crosses(from: u16, to: u16, topic: &str) {
    wait(30, &format!("a message from :{from} to :{to}"), || {
        let sub = subscribe(to, topic, 3);
        std::thread::sleep(Duration::from_millis(700));
        let sent = publish(from, topic, "hello");
        let out = sub.wait_with_output().ok()?;
        (sent && String::from_utf8_lossy(&out.stdout).contains("hello")).then_some(())
    });
}

#[test]
fn the_compose_cluster_runs_scales_and_is_scraped() {
    let docker = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    let compose = Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !docker || !compose || !have("mosquitto_pub") {
        eprintln!("SKIPPED: needs a Docker engine, docker-compose and mosquitto clients");
        return;
    }
    let run = format!("fmqc{}", std::process::id());
    let image = format!("{run}-fleetmq:test");
    build(
        "deploy/docker/build-image.sh",
        &image,
        &[("FLEETMQ_BIN", env!("CARGO_BIN_EXE_fleetmq"))],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let prom_image = format!("{run}-prometheus:test");
    let prometheus = build("deploy/prometheus/build-image.sh", &prom_image, &[]);
    if let Err(e) = &prometheus {
        eprintln!("no Prometheus image, its checks are skipped: {e}");
    }
    let mut env: Vec<(String, String)> = vec![
        ("FLEETMQ_IMAGE".into(), image.clone()),
        ("PROMETHEUS_IMAGE".into(), prom_image.clone()),
        ("FLEETMQ_ADMIN_PASSWORD".into(), "compose-admin".into()),
        ("FLEETMQ_CLUSTER_SECRET".into(), "compose-secret".into()),
    ];
    for var in [
        "FLEETMQ1_MQTT",
        "FLEETMQ1_HTTP",
        "FLEETMQ1_WS",
        "FLEETMQ2_MQTT",
        "FLEETMQ2_HTTP",
        "FLEETMQ2_WS",
        "FLEETMQ3_MQTT",
        "FLEETMQ3_HTTP",
        "FLEETMQ3_WS",
        "PROMETHEUS_PORT",
    ] {
        env.push((var.into(), free_port().to_string()));
    }
    let mut p = Project {
        name: run.clone(),
        env,
        volumes: Vec::new(),
    };
    let services: Vec<&str> = if prometheus.is_ok() {
        vec!["fleetmq1", "fleetmq2", "fleetmq3", "prometheus"]
    } else {
        vec!["fleetmq1", "fleetmq2", "fleetmq3"]
    };
    let mut up = vec!["up", "-d"];
    up.extend(&services);
    p.must(&up);

    // Healthy (the image's HEALTHCHECK runs `fleetmq --probe .../health/ready`) and one cluster.
    wait(90, "three healthy containers", || {
        let ps = p.compose(&["ps"]).ok()?;
        (ps.matches("(healthy)").count() == 3).then_some(())
    });
    let http1 = p.port("FLEETMQ1_HTTP");
    wait(60, "three live members", || {
        let v = http(http1, "/fleetmq/cluster/nodes")?;
        let live = v["nodes"]
            .as_array()?
            .iter()
            .filter(|n| n["live"] == true)
            .count();
        (live == 3).then_some(())
    });
    crosses(
        p.port("FLEETMQ1_MQTT"),
        p.port("FLEETMQ3_MQTT"),
        "compose/a",
    );

    if prometheus.is_ok() {
        let prom = p.port("PROMETHEUS_PORT");
        wait(60, "Prometheus scraping three nodes", || {
            let r = ureq::get(&format!("http://127.0.0.1:{prom}/api/v1/query?query=up"))
                .call()
                .ok()?
                .into_json::<Value>()
                .ok()?;
            let up = r["data"]["result"]
                .as_array()?
                .iter()
                .filter(|s| s["value"][1] == "1")
                .count();
            (up >= 3).then_some(())
        });
        let r: Value = ureq::get(&format!(
            "http://127.0.0.1:{prom}/api/v1/query?query=fleetmq_cluster_shards"
        ))
        .call()
        .expect("query")
        .into_json()
        .expect("json");
        assert_eq!(r["data"]["result"].as_array().map(Vec::len), Some(3), "{r}");
        // The alert rules are loaded (and none fires on a healthy cluster).
        let rules: Value = ureq::get(&format!("http://127.0.0.1:{prom}/api/v1/rules"))
            .call()
            .expect("rules")
            .into_json()
            .expect("json");
        let names: Vec<&str> = rules["data"]["groups"][0]["rules"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["name"].as_str()).collect())
            .unwrap_or_default();
        assert!(
            names.contains(&"FleetmqShardWithoutLeader") && names.contains(&"FleetmqNodeDown"),
            "{rules}"
        );
    }

    // A fourth node: joins, takes voter seats of some shards; scaled away, it leaves.
    p.must(&[
        "--profile",
        "scale",
        "up",
        "-d",
        "--no-recreate",
        "--scale",
        "fleetmq=1",
        "fleetmq",
    ]);
    let extra = wait(90, "a fourth member with shard seats", || {
        let v = http(http1, "/fleetmq/cluster/nodes")?;
        let named: Vec<u64> = v["nodes"]
            .as_array()?
            .iter()
            .filter_map(|n| n["id"].as_u64())
            .collect();
        let new = *named.iter().find(|id| **id > 3)?;
        let seats = v["groups"]
            .as_array()?
            .iter()
            .filter(|g| {
                g["voters"]
                    .as_array()
                    .is_some_and(|vs| vs.iter().any(|x| x.as_u64() == Some(new)))
            })
            .count();
        (named.len() == 4 && seats > 0).then_some(new)
    });
    for id in p
        .must(&["--profile", "scale", "ps", "-q", "fleetmq"])
        .split_whitespace()
    {
        let out = Command::new("docker")
            .args(["inspect", "-f", "{{range .Mounts}}{{.Name}} {{end}}", id])
            .output()
            .expect("docker inspect");
        p.volumes.extend(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_string),
        );
    }
    p.must(&[
        "--profile",
        "scale",
        "up",
        "-d",
        "--no-recreate",
        "--scale",
        "fleetmq=0",
        "fleetmq",
    ]);
    wait(60, "the fourth member gone", || {
        let v = http(http1, "/fleetmq/cluster/nodes")?;
        let ids: Vec<u64> = v["nodes"]
            .as_array()?
            .iter()
            .filter_map(|n| n["id"].as_u64())
            .collect();
        (!ids.contains(&extra) && ids.len() == 3).then_some(())
    });

    // One node stopped: the others keep serving.
    p.must(&["stop", "-t", "5", "fleetmq2"]);
    crosses(
        p.port("FLEETMQ1_MQTT"),
        p.port("FLEETMQ3_MQTT"),
        "compose/b",
    );
}
