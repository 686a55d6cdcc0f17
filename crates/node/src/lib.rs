//! The fleetmq node: configuration, listeners, connection and session handling, routing,
//! HTTP (metrics, health) and the wiring to durable state.

pub mod broker;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod device;
pub mod http;
pub mod identity;
pub mod listeners;
pub mod message;
pub mod metrics;
pub mod quota;
pub mod realtime;
pub mod rest;
pub mod session;
pub mod tenant;
pub mod transport;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleetmq_cluster::{Durable, DurableConfig};
use tokio::net::TcpListener;

pub use config::{Cli, Config};

/// Starts a node and runs it until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    // tonic's TLS (the cluster port) builds its rustls configs with the process default
    // provider; ring is the one the rest of fleetmq uses. Already installed: fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let prometheus = metrics::install();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let fresh = !cluster::node_id::has_state(&cfg.data_dir);
    let node_id = cluster::node_id::resolve(&cfg.data_dir, cfg.node_id)?;
    let mut cfg = cfg;
    if cfg.ordinal == Some(0) && fresh && !cfg.join.is_empty() {
        cfg.join = first_pod_seeds(&cfg.join).await;
    }

    // The gRPC listener serves Raft from the start: a joining node must be reachable before
    // the leader can add it. The node service answers "unavailable" until the broker exists.
    let grpc = TcpListener::bind(cfg.grpc_addr)
        .await
        .with_context(|| format!("binding gRPC {}", cfg.grpc_addr))?;
    let grpc_addr = grpc.local_addr()?;
    let advertise_addr = advertise(&cfg, grpc_addr);
    let (add_secret, check_secret) =
        fleetmq_cluster::grpc::auth::from_secret(cfg.cluster_secret.as_deref())
            .context("--cluster-secret")?;
    if cfg.cluster_secret.is_none() && !cfg.join.is_empty() {
        tracing::warn!("no --cluster-secret: anyone who reaches the gRPC port can act as a member");
    }
    let cluster_tls = match &cfg.cluster_tls {
        None => None,
        Some((cert, key, ca)) => {
            let read = |p: &std::path::Path| {
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))
            };
            Some(
                fleetmq_cluster::grpc::ClusterTls::from_pem(&read(cert)?, &read(key)?, &read(ca)?)
                    .map_err(anyhow::Error::msg)
                    .context("--cluster-tls-*")?,
            )
        }
    };
    if cluster_tls.is_none() && !cfg.join.is_empty() {
        tracing::warn!("no --cluster-tls-*: node-to-node traffic is not encrypted");
    }
    let raft_server = fleetmq_cluster::grpc::RaftServer::new();
    let node_svc = cluster::service::NodeSvc::new();
    let mut grpc_shutdown = None::<tokio::sync::oneshot::Sender<()>>;
    let grpc_task = {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        grpc_shutdown.replace(tx);
        let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &cluster_tls {
            builder = builder
                .tls_config(tls.server())
                .context("cluster TLS for the gRPC server")?;
        }
        let router = builder
            .add_service(raft_server.clone().into_service(check_secret.clone()))
            .add_service(node_svc.clone().into_service(check_secret));
        tokio::spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await
            {
                tracing::error!(error = %e, "gRPC server failed");
            }
        })
    };

    let durable = Durable::open(DurableConfig {
        node_id,
        data_dir: cfg.data_dir.clone(),
        max_batch: cfg.raft_max_batch,
        advertise_addr: advertise_addr.clone(),
        join: cfg.join.clone(),
        server: Some(raft_server),
        secret: add_secret,
        tls: cluster_tls,
        shards: cfg.shards,
    })
    .await
    .context("opening durable state")?;
    let applied = durable.take_applied();
    let (dir, init) = identity::directory::Directory::open(
        durable.clone(),
        cfg.admin_password.as_deref(),
        cfg.bootstrap_password.as_deref(),
        cfg.anonymous_tenant.as_deref(),
    )
    .await
    .context("opening the directory")?;
    if let Some(pw) = init.generated_admin_password {
        // Printed once, on the console only (not through the log): the one time this secret
        // exists in clear outside the operator's hands.
        eprintln!(
            "fleetmq: first start: created tenant 'management' with user 'admin', password: {pw}\n\
             fleetmq: it is not shown again; set FLEETMQ_ADMIN_PASSWORD before the first start to choose it."
        );
    }
    let minute = |n: u32| n as f64 / 60.0;
    let auth = Arc::new(identity::auth::Auth::new(
        dir.clone(),
        identity::throttle::Budget {
            burst: cfg.login_ip_burst as f64,
            per_sec: minute(cfg.login_ip_per_minute),
        },
        identity::throttle::Budget {
            burst: cfg.login_tenant_burst as f64,
            per_sec: minute(cfg.login_tenant_per_minute),
        },
        cfg.anonymous_tenant.clone(),
    ));
    let cluster = cluster::Cluster::new(durable.clone()).context("loading the session index")?;
    let broker = broker::Broker::new(cfg.clone(), durable.clone(), auth.clone(), cluster.clone());
    if cluster.is_alone() {
        broker.restore(durable.sessions()?, durable.retained()?);
    } else {
        // In a cluster, sessions move to the node a device connects to (loaded from durable
        // state then); restoring them all here would make every node hold every session.
        broker.restore(Vec::new(), durable.retained()?);
    }
    if !cluster.is_alone() {
        // Caught up first: the log may say another node took a session since this one
        // stopped, and that record must not be deleted.
        durable
            .read_barrier()
            .await
            .context("catching up with the cluster")?;
        // After a restart this node holds no session in memory: off the record before peers
        // see it alive (the node service answers nobody yet), so they treat those sessions as
        // orphans and queue for them through Raft instead of forwarding here.
        for key in cluster.held_on_record() {
            if let Some(c) = cluster.release_command(&key) {
                durable
                    .propose(c)
                    .await
                    .context("releasing sessions held before the restart")?;
            }
        }
    }
    cluster.start(&broker);
    let dead_after = std::time::Duration::from_secs(cfg.dead_node_after_secs);
    cluster.spawn_orphan_expiry(std::time::Duration::from_secs(2), dead_after);
    cluster.spawn_voter_rebalancer(dead_after);
    node_svc.bind(broker.clone());
    if !cluster.is_alone() {
        cluster.wait_for_routes(Duration::from_secs(3)).await;
    }
    let hub = Arc::new(realtime::Hub::new());
    if let Some(rx) = applied {
        tokio::spawn(observe_applied(
            rx,
            dir.clone(),
            broker.clone(),
            hub.clone(),
        ));
    }
    tokio::spawn(device::retention_loop(broker.clone()));

    let bound = listeners::bind(&cfg, &dir).await?;
    let http = TcpListener::bind(cfg.http_addr)
        .await
        .with_context(|| format!("binding HTTP {}", cfg.http_addr))?;
    let http_addr = http.local_addr()?;
    tracing::info!(mqtt = %bound.mqtt_addr, %http_addr, grpc = %grpc_addr, advertise = %advertise_addr, ws = ?bound.ws_addr, tls = ?bound.tls_addr, wss = ?bound.wss_addr, data_dir = %cfg.data_dir.display(), node_id, members = durable.members().len(), "fleetmq listening");
    if cfg.print_addrs {
        let mut line = serde_json::json!({
            "mqtt": bound.mqtt_addr.to_string(),
            "http": http_addr.to_string(),
            "grpc": grpc_addr.to_string(),
            "node_id": node_id,
        });
        for (k, v) in [
            ("ws", bound.ws_addr),
            ("tls", bound.tls_addr),
            ("wss", bound.wss_addr),
        ] {
            if let Some(a) = v {
                line[k] = serde_json::Value::String(a.to_string());
            }
        }
        println!("{line}");
    }

    let ready = broker.ready.clone();
    let sampled = broker.clone();
    let http_state = http::HttpState {
        prometheus,
        ready: ready.clone(),
        sample: Some(Arc::new(move || {
            sampled.sample_tenant_metrics();
            sampled.cluster.sample_metrics();
        })),
    };
    let mut shutdown_rx = broker.shutdown.subscribe();
    let rest_state = Arc::new(rest::RestState {
        auth: auth.clone(),
        cluster: cluster.clone(),
        durable: broker.durable.clone(),
        realtime: hub,
    });
    let http_task = tokio::spawn(async move {
        // One fallback for the merged router (only one router may have one): unknown paths
        // and methods get the API's JSON error instead of an empty 404.
        let app = http::router(http_state)
            .merge(rest::routes(rest_state))
            .fallback(|| async { rest::ApiError::no_such_resource() });
        // Paths are normalised before routing: clients (the c8y-api Python package among
        // them) send `/alarm/alarms/` and `/alarm/alarms//<id>`.
        let app = axum::Router::new()
            .fallback_service(app)
            .layer(axum::middleware::map_request(rest::normalize_path));
        let _ = axum::serve(
            http,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = shutdown_rx.changed().await;
        })
        .await;
    });
    let accept_tasks = listeners::spawn(broker.clone(), dir.clone(), bound);

    wait_for_signal().await;
    tracing::info!("shutting down");
    ready.store(false, Ordering::Relaxed);
    let _ = broker.shutdown.send(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    broker.disconnect_all();
    // Give connection tasks a moment to send DISCONNECT 0x8B and finish committed work.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while broker.connections.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = http_task.await;
    if cfg.leave_on_shutdown && !cluster.is_alone() {
        // After the clients' state is committed: their sessions stay in Raft and, with this
        // node gone from the membership, count as orphans until they reconnect elsewhere.
        match cluster.leave().await {
            Ok(()) => tracing::info!("left the cluster"),
            Err(e) => tracing::error!(error = %e, "leaving the cluster failed"),
        }
    }
    durable.shutdown().await.context("closing durable state")?;
    if let Some(tx) = grpc_shutdown.take() {
        let _ = tx.send(());
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), grpc_task).await;
    tracing::info!("stopped");
    Ok(())
}

/// The address other nodes reach this node's gRPC listener at.
fn advertise(cfg: &Config, bound: std::net::SocketAddr) -> String {
    if let Some(a) = &cfg.advertise_addr {
        return a.clone();
    }
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    // Listening on all interfaces: the host name is what peers (containers, pods) resolve.
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "127.0.0.1".to_string());
    format!("{host}:{}", bound.port())
}

/// Feeds directory and retained-message changes applied through Raft (proposed on any node)
/// into this node's in-memory copies.
async fn observe_applied(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<fleetmq_cluster::Applied>,
    dir: Arc<identity::directory::Directory>,
    broker: Arc<broker::Broker>,
    hub: Arc<realtime::Hub>,
) {
    use fleetmq_cluster::Applied;
    while let Some(ev) = rx.recv().await {
        match ev {
            Applied::Commands { index, cmds, .. } => {
                use fleetmq_storage::{Command as C, Space};
                for (c, r) in &cmds {
                    match c {
                        C::SetRetained { .. } => broker.observe_retained(c),
                        C::PutSession { .. }
                        | C::DeleteSession { .. }
                        | C::SetDisconnected { .. }
                        | C::Subscribe { .. }
                        | C::Unsubscribe { .. } => broker.cluster.observe_session(c),
                        C::ExpireSession { key, .. } => {
                            if *r == fleetmq_storage::Response::Ok {
                                broker.cluster.observe_expired(key);
                            }
                        }
                        C::Enqueue { .. } | C::EnqueueOnce { .. } | C::PublishOutbox { .. } => {
                            broker.observe_enqueue(index, c, r)
                        }
                        C::Device(batch) => {
                            if let fleetmq_storage::Response::Device(o) = r {
                                hub.observe(batch, o);
                            }
                        }
                        C::PutEntry {
                            space: Space::Holder,
                            tenant,
                            name,
                            ..
                        }
                        | C::DeleteEntry {
                            space: Space::Holder,
                            tenant,
                            name,
                        } => broker.cluster.observe_holder(tenant, name),
                        _ => {
                            if let Err(e) = dir.observe(c) {
                                tracing::error!(error = %e, "mirroring a directory change failed");
                            }
                        }
                    }
                }
            }
            Applied::Snapshot { .. } => {
                if let Err(e) = dir.reload() {
                    tracing::error!(error = %e, "reloading the directory failed");
                }
                match broker.durable.retained() {
                    Ok(all) => broker.reload_retained(all),
                    Err(e) => tracing::error!(error = %e, "reloading retained messages failed"),
                }
                if let Err(e) = broker.cluster.reload_index() {
                    tracing::error!(error = %e, "reloading the persistent-session index failed");
                }
            }
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Parses flags/env/file, sets up logging and runs the node: the `fleetmq` binary's `main`.
/// StatefulSet pod 0 with an empty volume: the other pods' addresses if any of them answers
/// within 10 s (the cluster exists: join it), else none (first start: form it).
async fn first_pod_seeds(seeds: &[String]) -> Vec<String> {
    let me = config::host_name();
    let me = me.split('.').next().unwrap_or_default().to_string();
    let others: Vec<String> = seeds
        .iter()
        .filter(|s| s.split(['.', ':']).next() != Some(me.as_str()))
        .cloned()
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        for s in &others {
            let ok = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(s.as_str()),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            if ok {
                tracing::info!(seed = %s, "pod 0 with an empty volume: the cluster exists, joining it");
                return others;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tracing::info!("pod 0 with an empty volume and no other pod answering: forming the cluster");
    Vec::new()
}

/// `--drain-url`: `POST <base>/fleetmq/cluster/nodes/<this node>/drain` as management/admin
/// (password from `FLEETMQ_ADMIN_PASSWORD`); true when the node answered 2xx.
fn drain_self(base: &str, cli: &Cli) -> bool {
    use base64::Engine;
    use std::io::{Read, Write};
    let dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("./fleetmq-data"));
    let Some(id) = std::fs::read_to_string(dir.join("node-id"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        eprintln!("no node id in {}", dir.display());
        return false;
    };
    let password = std::env::var("FLEETMQ_ADMIN_PASSWORD").unwrap_or_default();
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("management/admin:{password}"));
    let Some(host) = base.strip_prefix("http://") else {
        return false;
    };
    let host = host.trim_end_matches('/');
    let Ok(mut s) = std::net::TcpStream::connect(host) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let req = format!(
        "POST /fleetmq/cluster/nodes/{id}/drain HTTP/1.0\r\nHost: {host}\r\nAuthorization: Basic {auth}\r\nContent-Length: 0\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.get(9) == Some(&b'2')
}

/// `--probe`: a minimal HTTP/1.0 GET over a plain socket (2 s), true on a 2xx status.
fn probe(url: &str) -> bool {
    use std::io::{Read, Write};
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let Ok(addrs) = std::net::ToSocketAddrs::to_socket_addrs(host) else {
        return false;
    };
    let timeout = Duration::from_secs(2);
    for addr in addrs {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
            continue;
        };
        let _ = s.set_read_timeout(Some(timeout));
        let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            continue;
        }
        let mut head = [0u8; 12];
        if s.read_exact(&mut head).is_ok() {
            // "HTTP/1.1 200"
            return head.get(9) == Some(&b'2');
        }
    }
    false
}

pub fn main_entry() -> anyhow::Result<()> {
    use clap::Parser;
    let cli = Cli::parse();
    if let Some(url) = &cli.probe {
        std::process::exit(if probe(url) { 0 } else { 1 });
    }
    if let Some(base) = &cli.drain_url {
        std::process::exit(if drain_self(base, &cli) { 0 } else { 1 });
    }
    let cfg = Config::resolve(cli)?;
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr: stdout carries only the --print-addrs line that scripts read.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cfg))
}
