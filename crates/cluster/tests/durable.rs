//! End-to-end tests of a one-member node's durable groups (meta and four shards) on a
//! temporary directory.

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use fleetmq_cluster::{Durable, DurableConfig};
use fleetmq_storage::*;

fn cfg(dir: &Path) -> DurableConfig {
    DurableConfig {
        node_id: 1,
        data_dir: dir.to_path_buf(),
        max_batch: 4096,
        advertise_addr: "127.0.0.1:7070".into(),
        join: Vec::new(),
        server: None,
        secret: Default::default(),
        tls: None,
        // Sharded, so a publish to several sessions is split and recovered across groups.
        shards: 4,
    }
}

fn key(c: &str) -> SessionKey {
    SessionKey::new("t1", c)
}

fn msg(topic: &str) -> StoredMessage {
    StoredMessage {
        topic: topic.into(),
        payload: Bytes::from_static(b"payload"),
        qos: 2,
        retain: false,
        props: MessageProps::default(),
        publisher: Some(key("pub")),
    }
}

fn put(c: &str) -> Command {
    Command::PutSession {
        key: key(c),
        record: SessionRecord {
            expiry_secs: 3600,
            protocol: 5,
            disconnected_at_ms: None,
            subscriptions: vec![],
        },
        fresh: true,
    }
}

fn publish(targets: &[&str]) -> Command {
    Command::Publish {
        message: msg("a/b"),
        targets: targets
            .iter()
            .map(|c| Target {
                key: key(c),
                qos: 2,
                retain: false,
                subscription_ids: vec![],
            })
            .collect(),
        inbound: None,
    }
}

async fn scenario(d: &Durable) {
    assert_eq!(d.propose(put("a")).await.expect("put"), Response::Ok);
    let sub = SubscriptionRecord {
        filter: "a/#".into(),
        qos: 2,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
        subscription_id: Some(3),
    };
    let r = d
        .propose(Command::Subscribe { key: key("a"), sub })
        .await
        .expect("sub");
    assert_eq!(r, Response::Ok);
    let p = Command::Publish {
        message: msg("a/b"),
        targets: vec![Target {
            key: key("a"),
            qos: 2,
            retain: false,
            subscription_ids: vec![3],
        }],
        inbound: Some((key("pub"), 9)),
    };
    // Queued as seq 1 either way; the answer names it only when "a" is in the publisher's
    // shard (otherwise the node holding "a" learns it by applying the other shard's entry).
    let same_shard = d.group_of(&key("a")) == d.group_of(&key("pub"));
    let seq = if same_shard { 1 } else { NO_SESSION_SEQ };
    assert_eq!(
        d.propose(p.clone()).await.expect("pub"),
        Response::Published { seqs: vec![seq] }
    );
    let queued = d.session(&key("a")).expect("read").expect("a").queue;
    assert_eq!(
        queued.iter().map(|(s, _, _)| *s).collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(d.propose(p).await.expect("dup"), Response::DuplicateInbound);
    assert_eq!(
        d.propose(publish(&["a"])).await.expect("pub"),
        Response::Published { seqs: vec![2] }
    );
    let r = d
        .propose(Command::Release {
            key: key("a"),
            seq: 1,
        })
        .await
        .expect("rel");
    assert_eq!(r, Response::Ok);
    let r = d
        .propose(Command::Ack {
            key: key("a"),
            seq: 2,
        })
        .await
        .expect("ack");
    assert_eq!(r, Response::Ok);
    let r = d
        .propose(Command::SetRetained {
            tenant: "t1".into(),
            topic: "r".into(),
            message: Some(msg("r")),
        })
        .await
        .expect("retain");
    assert_eq!(r, Response::Ok);
}

fn check_scenario(d: &Durable) {
    let sessions = d.sessions().expect("sessions");
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(s.record.subscriptions.len(), 1);
    assert_eq!(s.queue.len(), 1);
    assert_eq!(s.queue[0].0, 1);
    assert_eq!(s.queue[0].1.state, DeliveryState::Released);
    assert_eq!(s.queue[0].2, msg("a/b"));
    assert_eq!(
        d.retained().expect("retained"),
        vec![("t1".into(), "r".into(), msg("r"))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propose_shutdown_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let d = Durable::open(cfg(dir.path())).await.expect("open");
    eprintln!("fresh open took {:?}", started.elapsed());
    scenario(&d).await;
    check_scenario(&d);
    d.shutdown().await.expect("shutdown");
    assert!(matches!(
        d.propose(put("x")).await,
        Err(fleetmq_cluster::ClusterError::ShuttingDown)
    ));
    drop(d);

    let started = Instant::now();
    let d = Durable::open(cfg(dir.path())).await.expect("reopen");
    eprintln!("reopen took {:?}", started.elapsed());
    check_scenario(&d);
    // Seqs continue after a restart.
    assert_eq!(
        d.propose(publish(&["a"])).await.expect("pub"),
        Response::Published { seqs: vec![3] }
    );
    d.shutdown().await.expect("shutdown");
}

#[test]
fn crash_without_shutdown_keeps_acknowledged_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let d = Durable::open(cfg(dir.path())).await.expect("open");
        scenario(&d).await;
        // Queued but never awaited: may or may not survive, must not break recovery.
        for _ in 0..100 {
            d.propose_nowait(publish(&["a"]));
        }
    });
    // Dropping the runtime aborts every task mid-flight: no shutdown, no final flush by us.
    rt.shutdown_background();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // The old sled instance may still be releasing its file lock for a moment.
        let mut attempt = 0;
        let d = loop {
            match Durable::open(cfg(dir.path())).await {
                Ok(d) => break d,
                Err(e) if attempt < 50 => {
                    attempt += 1;
                    eprintln!("reopen attempt {attempt}: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("reopen failed: {e}"),
            }
        };
        let sessions = d.sessions().expect("sessions");
        assert_eq!(sessions.len(), 1);
        let s = &sessions[0];
        assert_eq!(s.queue[0].0, 1);
        assert_eq!(s.queue[0].1.state, DeliveryState::Released);
        assert!(
            s.queue.iter().all(|(seq, _, _)| *seq != 2),
            "acked delivery came back"
        );
        assert_eq!(d.retained().expect("retained").len(), 1);
        d.shutdown().await.expect("shutdown");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_batches_proposals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Durable::open(cfg(dir.path())).await.expect("open");
    d.propose(put("a")).await.expect("put");
    let before = d.raft_metrics().last_log_index.unwrap_or(0);
    let started = Instant::now();
    for i in 0..10_000u64 {
        d.propose_nowait(Command::SetDisconnected {
            key: key("a"),
            at_ms: Some(i),
        });
    }
    let r = d
        .propose(Command::SetDisconnected {
            key: key("a"),
            at_ms: Some(424_242),
        })
        .await;
    assert_eq!(r.expect("final"), Response::Ok);
    let entries = d.raft_metrics().last_log_index.unwrap_or(0) - before;
    eprintln!(
        "10001 proposals in {entries} entries, {:?}",
        started.elapsed()
    );
    assert!(entries < 1_000, "{entries} entries for 10001 proposals");
    let s = d.sessions().expect("sessions");
    assert_eq!(s[0].record.disconnected_at_ms, Some(424_242));
    d.shutdown().await.expect("shutdown");
}

/// A QoS 2 publish whose proposer stopped after its first step (as if its node died right
/// after the publisher's shard committed it) is finished by that shard's leader: queued once
/// in the target's shard, the outbox emptied, and the PUBLISH sent again is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_outbox_entry_is_finished_by_the_shard_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Durable::open(cfg(dir.path())).await.expect("open");
    let publisher = key("pub");
    let other = (0..)
        .map(|i| format!("sub{i}"))
        .find(|c| d.group_of(&key(c)) != d.group_of(&publisher))
        .expect("a client in another shard");
    d.propose(put("pub")).await.expect("put pub");
    d.propose(put(&other)).await.expect("put sub");
    let target = Target {
        key: key(&other),
        qos: 2,
        retain: false,
        subscription_ids: vec![],
    };
    // Only the first step: `propose_nowait` leaves the rest to the shard's leader.
    d.propose_nowait(Command::PublishOutbox {
        message: msg("a/b"),
        inbound: (publisher.clone(), 5),
        targets: vec![(target.clone(), true)],
        outbox: vec![],
    });
    let queued = |d: &Durable| {
        d.session(&key(&other))
            .expect("read")
            .map(|s| s.queue.len())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while queued(&d) == 0 {
        assert!(
            Instant::now() < deadline,
            "the outbox entry was not finished in 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Two more sweeps: still one copy.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert_eq!(queued(&d), 1, "queued exactly once");
    let again = Command::Publish {
        message: msg("a/b"),
        targets: vec![target],
        inbound: Some((publisher, 5)),
    };
    assert_eq!(
        d.propose(again).await.expect("dup"),
        Response::DuplicateInbound
    );
    assert_eq!(queued(&d), 1, "the retransmission queued nothing");
    d.shutdown().await.expect("shutdown");
}
