//! State machine tests over plain values and a temporary database.

use bytes::Bytes;
use proptest::prelude::*;

use crate::records::*;
use crate::{StateMachineStore, Storage, NO_SESSION_SEQ};

fn open(dir: &tempfile::TempDir) -> (Storage, StateMachineStore) {
    let st = Storage::open(dir.path()).expect("open");
    let sm = st.state_machine(0).expect("sm");
    (st, sm)
}

fn key(c: &str) -> SessionKey {
    SessionKey::new("t1", c)
}

fn record() -> SessionRecord {
    SessionRecord {
        expiry_secs: 3600,
        protocol: 5,
        disconnected_at_ms: None,
        subscriptions: vec![],
    }
}

fn msg(topic: &str) -> StoredMessage {
    StoredMessage {
        topic: topic.into(),
        payload: Bytes::from_static(b"hello"),
        qos: 1,
        retain: false,
        props: MessageProps::default(),
        publisher: None,
    }
}

fn target(c: &str) -> Target {
    Target {
        key: key(c),
        qos: 1,
        retain: false,
        subscription_ids: vec![7],
    }
}

fn put(c: &str) -> Command {
    Command::PutSession {
        key: key(c),
        record: record(),
        fresh: false,
    }
}

fn publish(targets: &[&str]) -> Command {
    Command::Publish {
        message: msg("a/b"),
        targets: targets.iter().map(|c| target(c)).collect(),
        inbound: None,
    }
}

fn message_count(sm: &StateMachineStore) -> usize {
    sm.write_back().expect("write back");
    sm.tree.scan_prefix([crate::state_machine::MESSAGE]).count()
}

#[test]
fn publish_then_ack_before_write_back_never_reaches_the_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_st, sm) = open(&dir);
    sm.apply(1, &[put("a")], None).expect("apply");
    sm.apply(2, &[publish(&["a"])], None).expect("apply");
    sm.apply(
        3,
        &[Command::Ack {
            key: key("a"),
            seq: 1,
        }],
        None,
    )
    .expect("ack");
    assert_eq!(
        sm.tree.scan_prefix([crate::state_machine::MESSAGE]).count(),
        0,
        "staged, not yet written"
    );
    assert_eq!(
        message_count(&sm),
        0,
        "cancelled out: nothing written at all"
    );
    let sessions = sm.sessions().expect("sessions");
    assert!(sessions[0].queue.is_empty());
}

#[test]
fn publish_to_two_sessions_stores_once_and_acks_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_st, sm) = open(&dir);
    sm.apply(1, &[put("a"), put("b")], None).expect("apply");
    let r = sm
        .apply(2, &[publish(&["a", "b", "missing"])], None)
        .expect("apply");
    assert_eq!(
        r,
        vec![Response::Published {
            seqs: vec![1, 1, NO_SESSION_SEQ]
        }]
    );
    assert_eq!(message_count(&sm), 1);
    sm.verify_refcounts().expect("consistent");

    let sessions = sm.sessions().expect("sessions");
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[0].queue[0].1.msg_id, 2 << 16);
    assert_eq!(sessions[0].queue[0].2, msg("a/b"));

    sm.apply(
        3,
        &[Command::Ack {
            key: key("a"),
            seq: 1,
        }],
        None,
    )
    .expect("ack a");
    assert_eq!(message_count(&sm), 1);
    sm.apply(
        4,
        &[Command::Ack {
            key: key("b"),
            seq: 1,
        }],
        None,
    )
    .expect("ack b");
    assert_eq!(message_count(&sm), 0);
    sm.verify_refcounts().expect("consistent");
}

#[test]
fn commands_in_one_entry_see_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_st, sm) = open(&dir);
    let r = sm
        .apply(
            1,
            &[
                put("a"),
                publish(&["a"]),
                publish(&["a"]),
                Command::Ack {
                    key: key("a"),
                    seq: 1,
                },
                Command::Release {
                    key: key("a"),
                    seq: 2,
                },
            ],
            None,
        )
        .expect("apply");
    assert_eq!(r[1], Response::Published { seqs: vec![1] });
    assert_eq!(r[2], Response::Published { seqs: vec![2] });
    let s = sm.session(&key("a")).expect("read").expect("exists");
    assert_eq!(s.queue.len(), 1);
    assert_eq!(s.queue[0].0, 2);
    assert_eq!(s.queue[0].1.state, DeliveryState::Released);
    assert_eq!(message_count(&sm), 1);
    sm.verify_refcounts().expect("consistent");
}

#[test]
fn delete_session_drops_queue_refs_and_keeps_seq_monotonic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_st, sm) = open(&dir);
    sm.apply(
        1,
        &[put("a"), put("b"), publish(&["a", "b"]), publish(&["a"])],
        None,
    )
    .expect("a");
    sm.apply(2, &[Command::DeleteSession { key: key("a") }], None)
        .expect("delete");
    assert!(sm.session(&key("a")).expect("read").is_none());
    assert_eq!(message_count(&sm), 1);
    sm.verify_refcounts().expect("consistent");
    let r = sm
        .apply(3, &[put("a"), publish(&["a"])], None)
        .expect("again");
    assert_eq!(r[1], Response::Published { seqs: vec![3] });

    // A fresh PutSession drops the queue too, and still does not reuse seqs.
    let fresh = Command::PutSession {
        key: key("a"),
        record: record(),
        fresh: true,
    };
    let r = sm.apply(4, &[fresh, publish(&["a"])], None).expect("fresh");
    assert_eq!(r[1], Response::Published { seqs: vec![4] });
    assert_eq!(
        sm.session(&key("a"))
            .expect("read")
            .expect("exists")
            .queue
            .len(),
        1
    );
    sm.verify_refcounts().expect("consistent");
}

#[test]
fn duplicate_inbound_is_recognised_until_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_st, sm) = open(&dir);
    let p = |targets: Vec<Target>| Command::Publish {
        message: msg("x"),
        targets,
        inbound: Some((key("pub"), 42)),
    };
    sm.apply(1, &[put("a"), put("pub")], None).expect("put");
    let r = sm
        .apply(2, &[p(vec![]), p(vec![target("a")])], None)
        .expect("apply");
    assert_eq!(
        r,
        vec![
            Response::Published { seqs: vec![] },
            Response::DuplicateInbound
        ]
    );
    assert_eq!(message_count(&sm), 0);
    assert_eq!(
        sm.session(&key("pub")).expect("r").expect("s").inbound_pids,
        vec![42]
    );
    sm.apply(
        3,
        &[Command::InboundRelease {
            key: key("pub"),
            pid: 42,
        }],
        None,
    )
    .expect("rel");
    let r = sm.apply(4, &[p(vec![target("a")])], None).expect("apply");
    assert_eq!(r, vec![Response::Published { seqs: vec![1] }]);
}

#[test]
fn session_settings_and_subscriptions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_st, sm) = open(&dir);
    let sub = |f: &str, qos| SubscriptionRecord {
        filter: f.into(),
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
        subscription_id: None,
    };
    sm.apply(
        1,
        &[
            put("a"),
            Command::Subscribe {
                key: key("a"),
                sub: sub("x/#", 1),
            },
            Command::Subscribe {
                key: key("a"),
                sub: sub("y", 0),
            },
            Command::Subscribe {
                key: key("a"),
                sub: sub("x/#", 2),
            },
            Command::Unsubscribe {
                key: key("a"),
                filter: "y".into(),
            },
            Command::SetDisconnected {
                key: key("a"),
                at_ms: Some(99),
            },
            // A resumed session's PutSession keeps the subscriptions it does not mention.
            Command::PutSession {
                key: key("a"),
                record: SessionRecord {
                    expiry_secs: 10,
                    ..record()
                },
                fresh: false,
            },
        ],
        None,
    )
    .expect("apply");
    let s = sm.session(&key("a")).expect("read").expect("exists");
    assert_eq!(s.record.subscriptions, vec![sub("x/#", 2)]);
    assert_eq!(s.record.expiry_secs, 10);
    assert_eq!(s.record.disconnected_at_ms, None);
}

#[test]
fn data_and_last_applied_land_together_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (st, sm) = open(&dir);
        sm.apply(1, &[put("a"), publish(&["a"])], Some((b"L1", Some(b"M1"))))
            .expect("apply");
        let retained = Command::SetRetained {
            tenant: "t1".into(),
            topic: "r/1".into(),
            message: Some(msg("r/1")),
        };
        sm.apply(2, &[retained], Some((b"L2", None)))
            .expect("apply");
        assert_eq!(sm.last_applied_raw().expect("r"), Some(b"L2".to_vec()));
        assert_eq!(sm.last_membership_raw().expect("r"), Some(b"M1".to_vec()));
        st.flush_blocking().expect("flush");
    }
    let (_st, sm) = open(&dir);
    assert_eq!(sm.last_applied_raw().expect("r"), Some(b"L2".to_vec()));
    let s = sm.sessions().expect("sessions");
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].queue.len(), 1);
    assert_eq!(
        sm.retained().expect("r"),
        vec![("t1".into(), "r/1".into(), msg("r/1"))]
    );
    // A failing entry writes nothing, not even its last-applied marker.
    let too_many =
        vec![Command::DeleteSession { key: key("zz") }; crate::MAX_COMMANDS_PER_ENTRY + 1];
    assert!(sm.apply(3, &too_many, Some((b"L3", None))).is_err());
    assert_eq!(sm.last_applied_raw().expect("r"), Some(b"L2".to_vec()));
}

fn entry(space: Space, tenant: &str, name: &str, value: &[u8], create_only: bool) -> Command {
    Command::PutEntry {
        space,
        tenant: tenant.into(),
        name: name.into(),
        value: value.to_vec(),
        create_only,
    }
}

#[test]
fn directory_entries_create_only_replace_and_delete_by_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (st, sm) = open(&dir);
    let out = sm
        .apply(
            1,
            &[
                entry(Space::User, "t1", "alice", b"v1", true),
                entry(Space::User, "t1", "alice", b"v2", true),
                entry(Space::User, "t1", "bob", b"b", false),
                entry(Space::User, "t2", "alice", b"other", true),
                entry(Space::Tenant, "", "t1", b"tenant", true),
            ],
            Some((b"L1", None)),
        )
        .expect("apply");
    // The second create of the same name is refused and changes nothing.
    assert_eq!(out[1], Response::Exists);
    assert_eq!(
        sm.entry(Space::User, "t1", "alice").expect("r"),
        Some(b"v1".to_vec())
    );
    // A plain put replaces.
    sm.apply(
        2,
        &[entry(Space::User, "t1", "alice", b"v3", false)],
        Some((b"L2", None)),
    )
    .expect("apply");
    assert_eq!(
        sm.entry(Space::User, "t1", "alice").expect("r"),
        Some(b"v3".to_vec())
    );
    let users = sm.entries(Space::User).expect("r");
    let mut names: Vec<(String, String)> = users
        .iter()
        .map(|(_, t, n, _)| (t.clone(), n.clone()))
        .collect();
    // Key order is by length-prefixed strings, not alphabetical.
    names.sort();
    assert_eq!(
        names,
        vec![
            ("t1".into(), "alice".into()),
            ("t1".into(), "bob".into()),
            ("t2".into(), "alice".into())
        ]
    );
    // Spaces do not see each other, and deleting a tenant's users spares other tenants.
    assert_eq!(sm.entries(Space::Tenant).expect("r").len(), 1);
    sm.apply(
        3,
        &[Command::DeleteTenantEntries {
            space: Space::User,
            tenant: "t1".into(),
        }],
        Some((b"L3", None)),
    )
    .expect("apply");
    let left = sm.entries(Space::User).expect("r");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].1, "t2");
    sm.apply(
        4,
        &[Command::DeleteEntry {
            space: Space::User,
            tenant: "t2".into(),
            name: "alice".into(),
        }],
        Some((b"L4", None)),
    )
    .expect("apply");
    assert!(sm.entries(Space::User).expect("r").is_empty());
    st.flush_blocking().expect("flush");
}

#[test]
fn snapshot_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (st, sm) = open(&dir);
    sm.apply(1, &[put("a"), publish(&["a"])], Some((b"L1", None)))
        .expect("apply");
    let snap = sm.snapshot_bytes().expect("snap");
    sm.apply(2, &[put("b"), publish(&["a", "b"])], Some((b"L2", None)))
        .expect("apply");
    let other = st.state_machine(1).expect("sm1");
    other.apply(1, &[put("zzz")], None).expect("apply");
    other.install_snapshot_bytes(&snap).expect("install");
    assert_eq!(other.sessions().expect("s"), {
        let fresh = tempfile::tempdir().expect("tempdir");
        let (_s2, sm2) = open(&fresh);
        sm2.install_snapshot_bytes(&snap).expect("install");
        sm2.sessions().expect("s")
    });
    assert_eq!(other.sessions().expect("s").len(), 1);
    assert_eq!(other.last_applied_raw().expect("r"), Some(b"L1".to_vec()));
    other.save_snapshot(b"meta", &snap).expect("save");
    assert_eq!(
        other.read_snapshot().expect("r"),
        Some((b"meta".to_vec(), snap))
    );
}

fn arb_command() -> impl Strategy<Value = Command> {
    let client = prop::sample::select(vec!["a", "b", "c"]);
    let clients = prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "d"]), 0..4);
    prop_oneof![
        client.clone().prop_map(put),
        client.clone().prop_map(|c| Command::PutSession {
            key: key(c),
            record: record(),
            fresh: true
        }),
        client
            .clone()
            .prop_map(|c| Command::DeleteSession { key: key(c) }),
        clients.prop_map(|t| publish(&t)),
        (client.clone(), 1u64..8).prop_map(|(c, seq)| Command::Ack { key: key(c), seq }),
        (client, 1u64..8).prop_map(|(c, seq)| Command::Release { key: key(c), seq }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn refcounts_stay_consistent(entries in prop::collection::vec(prop::collection::vec(arb_command(), 1..6), 1..12)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_st, sm) = open(&dir);
        for (i, cmds) in entries.iter().enumerate() {
            sm.apply(i as u64 + 1, cmds, None).expect("apply");
            prop_assert!(sm.verify_refcounts().is_ok(), "{:?}", sm.verify_refcounts());
        }
    }
}

#[test]
fn message_slot_refcount_is_the_first_eight_bytes() {
    // unref reads the refcount without decoding the slot; this pins the encoding it relies on.
    let slot = crate::state_machine::MessageSlot {
        refcount: 0x0102_0304_0506_0708,
        message: msg("x"),
    };
    let bytes = crate::state_machine::encode(&slot).expect("encode");
    assert_eq!(&bytes[..8], &0x0102_0304_0506_0708u64.to_le_bytes());
}

#[test]
fn expire_session_only_while_its_holder_is_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_st, sm) = open(&dir);
    let holder = |v: &str| Command::PutEntry {
        space: Space::Holder,
        tenant: "t1".into(),
        name: "a".into(),
        value: v.as_bytes().to_vec(),
        create_only: false,
    };
    sm.apply(1, &[put("a"), holder("3"), publish(&["a"])], None)
        .expect("setup");
    // A node (2) claimed the session since the sweeper looked: it is kept.
    let stale = Command::ExpireSession {
        key: key("a"),
        holder: Some(b"2".to_vec()),
    };
    assert_eq!(
        sm.apply(2, &[stale], None).expect("stale"),
        [Response::Kept]
    );
    assert!(sm.session(&key("a")).expect("read").is_some());
    let absent = Command::ExpireSession {
        key: key("a"),
        holder: None,
    };
    assert_eq!(
        sm.apply(3, &[absent], None).expect("absent"),
        [Response::Kept]
    );
    // Still held by the dead node 3 as the sweeper saw: removed, with its queue and holder.
    let due = Command::ExpireSession {
        key: key("a"),
        holder: Some(b"3".to_vec()),
    };
    assert_eq!(sm.apply(4, &[due], None).expect("due"), [Response::Ok]);
    assert!(sm.session(&key("a")).expect("read").is_none());
    assert!(sm.entry(Space::Holder, "t1", "a").expect("read").is_none());
    assert_eq!(message_count(&sm), 0);
    sm.verify_refcounts().expect("consistent");
}

/// The cross-shard publish of a QoS 2 publisher: the publisher's shard records the inbound id,
/// queues its own targets and keeps the rest in its outbox; the other shard queues them once,
/// however often the outbox entry is sent; a duplicate PUBLISH changes nothing anywhere.
#[test]
fn outbox_entries_are_queued_once_in_other_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = Storage::open(dir.path()).expect("open");
    let home = st.state_machine(1).expect("sm 1");
    let other = st.state_machine(2).expect("sm 2");
    home.apply(1, &[put("pub"), put("a")], None).expect("put");
    other.apply(1, &[put("b")], None).expect("put");
    let po = Command::PublishOutbox {
        message: msg("x"),
        inbound: (key("pub"), 9),
        targets: vec![(target("a"), true)],
        outbox: vec![target("b")],
    };
    let r = home
        .apply(2, std::slice::from_ref(&po), None)
        .expect("outbox");
    let id = match &r[0] {
        Response::Outboxed { seqs, id } => {
            assert_eq!(seqs, &vec![1]);
            assert_ne!(*id, 0);
            *id
        }
        other => panic!("{other:?}"),
    };
    let pending = home.outbox().expect("outbox");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].0, id);
    assert_eq!(pending[0].2, vec![target("b")]);
    // The same PUBLISH again: a duplicate, no second outbox entry.
    let r = home.apply(3, &[po], None).expect("dup");
    assert_eq!(r[0], Response::DuplicateInbound);
    assert_eq!(home.outbox().expect("outbox").len(), 1);

    let once = Command::EnqueueOnce {
        origin: (1, id),
        message: msg("x"),
        targets: vec![target("b")],
    };
    let r = other
        .apply(2, std::slice::from_ref(&once), None)
        .expect("once");
    assert_eq!(r[0], Response::Published { seqs: vec![1] });
    // Sent again (a leader redoing it): nothing more is queued.
    let r = other
        .apply(3, std::slice::from_ref(&once), None)
        .expect("again");
    assert_eq!(
        r[0],
        Response::Published {
            seqs: vec![NO_SESSION_SEQ]
        }
    );
    let b = other.session(&key("b")).expect("read").expect("b");
    assert_eq!(b.queue.len(), 1);

    home.apply(4, &[Command::OutboxDone { id }], None)
        .expect("done");
    assert!(home.outbox().expect("outbox").is_empty());
    // Origins below a later id are forgotten; an origin at or above it is kept.
    other
        .apply(
            4,
            &[Command::ForgetOrigins {
                group: 1,
                below: id,
            }],
            None,
        )
        .expect("keep");
    let r = other
        .apply(5, std::slice::from_ref(&once), None)
        .expect("kept");
    assert_eq!(
        r[0],
        Response::Published {
            seqs: vec![NO_SESSION_SEQ]
        }
    );
    other
        .apply(
            6,
            &[Command::ForgetOrigins {
                group: 1,
                below: id + 1,
            }],
            None,
        )
        .expect("forget");
    other.write_back().expect("write back");
    assert_eq!(
        other.tree.scan_prefix([crate::state_machine::SEEN]).count(),
        0
    );
    other.verify_refcounts().expect("refcounts");
    home.verify_refcounts().expect("refcounts");
}
