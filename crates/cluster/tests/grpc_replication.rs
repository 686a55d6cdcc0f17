//! Raft over the gRPC network on loopback: three replicas of one group, each with its own sled
//! database and its own tonic server, replicate a command, and elect a new leader that can
//! commit after the old one stops. (The cluster's multi-process tests come with membership;
//! this checks the transport and the envelope encoding against openraft itself.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleetmq_cluster::grpc::{Channels, GrpcNetwork, RaftServer};
use fleetmq_cluster::log_adapter::LogAdapter;
use fleetmq_cluster::sm_adapter::SmAdapter;
use fleetmq_cluster::{Batch, Raft};
use fleetmq_storage::{Command, SessionKey, SessionRecord, StateMachineStore, Storage};
use openraft::{BasicNode, Config, ServerState};
use tokio::sync::oneshot;

const GROUP: u64 = 7;

struct Replica {
    id: u64,
    raft: Raft,
    sm: StateMachineStore,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

async fn replica(id: u64, listener: tokio::net::TcpListener) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path()).unwrap();
    let log = LogAdapter::new(storage.log_store(GROUP).unwrap());
    let sm = storage.state_machine(GROUP).unwrap();
    let sm_adapter = SmAdapter::new(sm.clone(), storage.clone()).unwrap();
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 300,
        election_timeout_max: 600,
        ..Default::default()
    }
    .validate()
    .unwrap();
    // The replicas authenticate each other, as nodes started with --cluster-secret do.
    let (add, check) =
        fleetmq_cluster::grpc::auth::from_secret(Some("replication-test")).expect("secret");
    let network = GrpcNetwork::new(GROUP, Channels::new(add, None));
    let raft = Raft::new(id, Arc::new(config), network, log, sm_adapter)
        .await
        .unwrap();
    let server = RaftServer::new();
    server.add_group(GROUP, raft.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(server.into_service(check))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
    });
    Replica {
        id,
        raft,
        sm,
        stop: Some(stop),
        _dir: dir,
    }
}

fn put(client: &str) -> Command {
    Command::PutSession {
        key: SessionKey::new("t1", client),
        record: SessionRecord {
            expiry_secs: 60,
            protocol: 5,
            disconnected_at_ms: None,
            subscriptions: Vec::new(),
        },
        fresh: true,
    }
}

async fn leader_of(replicas: &[Replica]) -> u64 {
    let r = &replicas[0].raft;
    r.wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .unwrap();
    r.metrics().borrow().current_leader.unwrap()
}

async fn wait_applied(r: &Replica, index: u64) {
    r.raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.last_applied.map(|l| l.index) >= Some(index),
            "replicated and applied",
        )
        .await
        .unwrap_or_else(|e| panic!("replica {} did not apply {index}: {e}", r.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_replicate_and_fail_over_over_grpc() {
    let mut listeners = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        members.insert(
            id,
            BasicNode {
                addr: l.local_addr().unwrap().to_string(),
            },
        );
        listeners.push((id, l));
    }
    let mut replicas = Vec::new();
    for (id, l) in listeners {
        replicas.push(replica(id, l).await);
    }
    replicas[0].raft.initialize(members).await.unwrap();

    let leader = leader_of(&replicas).await;
    let lr = &replicas[(leader - 1) as usize];
    let written = lr
        .raft
        .client_write(Batch(Arc::new(vec![put("dev1")])))
        .await
        .unwrap();
    let index = written.log_id.index;
    for r in &replicas {
        wait_applied(r, index).await;
        let s = r.sm.session(&SessionKey::new("t1", "dev1")).unwrap();
        assert!(s.is_some(), "replica {} has the session", r.id);
    }

    // Stop the leader: its server goes away and its Raft shuts down. The other two elect a
    // new leader over gRPC votes and commit without it.
    let old = (leader - 1) as usize;
    if let Some(stop) = replicas[old].stop.take() {
        let _ = stop.send(());
    }
    replicas[old].raft.shutdown().await.unwrap();
    let survivors: Vec<&Replica> = replicas.iter().filter(|r| r.id != leader).collect();
    let new_leader = survivors[0]
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.current_leader.is_some_and(|l| l != leader),
            "a new leader",
        )
        .await
        .unwrap()
        .current_leader
        .unwrap();
    let nl = survivors.iter().find(|r| r.id == new_leader).unwrap();
    assert_eq!(
        nl.raft
            .wait(Some(Duration::from_secs(10)))
            .state(ServerState::Leader, "leader")
            .await
            .unwrap()
            .state,
        ServerState::Leader
    );
    let written = nl
        .raft
        .client_write(Batch(Arc::new(vec![put("dev2")])))
        .await
        .unwrap();
    for r in &survivors {
        wait_applied(r, written.log_id.index).await;
        assert!(r
            .sm
            .session(&SessionKey::new("t1", "dev2"))
            .unwrap()
            .is_some());
    }
    for r in survivors {
        r.raft.shutdown().await.unwrap();
    }
}
