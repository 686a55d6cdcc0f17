//! The device data model over plain values and a temporary database.

use serde_json::Value;

use super::*;
use crate::records::{Command, Response};
use crate::{StateMachineStore, Storage};

struct T {
    _dir: tempfile::TempDir,
    sm: StateMachineStore,
    index: u64,
}

impl T {
    fn new() -> T {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = Storage::open(dir.path()).expect("open");
        let sm = st.state_machine(3).expect("sm");
        T {
            _dir: dir,
            sm,
            index: 0,
        }
    }

    fn apply(&mut self, b: DeviceBatch) -> Vec<Outcome> {
        self.index += 1;
        match self
            .sm
            .apply(self.index, &[Command::Device(b)], None)
            .expect("apply")
            .pop()
        {
            Some(Response::Device(o)) => o,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn batch(&self, now_ms: u64, device: Option<&str>, ops: Vec<DeviceOp>) -> DeviceBatch {
        DeviceBatch {
            tenant: "t1".into(),
            group: 3,
            now: format!("2026-11-30T00:00:{:02}.000Z", now_ms / 1000 % 60),
            now_ms,
            owner: format!("device_{}", device.unwrap_or("d1")),
            quiet: false,
            device: device.map(str::to_string),
            ops,
        }
    }

    /// As the connection of device `serial` would send it.
    fn run_as(&mut self, serial: &str, ops: Vec<DeviceOp>) -> Vec<Outcome> {
        let b = self.batch(1000 * (self.index + 1), Some(serial), ops);
        self.apply(b)
    }

    fn run_at(&mut self, now_ms: u64, ops: Vec<DeviceOp>) -> Vec<Outcome> {
        let b = self.batch(now_ms, None, ops);
        self.apply(b)
    }

    fn run(&mut self, ops: Vec<DeviceOp>) -> Vec<Outcome> {
        self.run_at(1_000 * self.index, ops)
    }

    fn one(&mut self, op: DeviceOp) -> Outcome {
        self.run(vec![op]).pop().expect("one outcome")
    }
}

fn dev(s: &str) -> Source {
    Source::Device { serial: s.into() }
}

fn done(o: &Outcome) -> Doc {
    match o {
        Outcome::Done(s) => Doc::from_json(s).expect("doc"),
        other => panic!("expected Done, got {other:?}"),
    }
}

fn many(o: &Outcome) -> Vec<Doc> {
    match o {
        Outcome::Many(v) => v.iter().map(|s| Doc::from_json(s).expect("doc")).collect(),
        other => panic!("expected Many, got {other:?}"),
    }
}

#[test]
fn a_device_is_created_once_and_its_ids_name_the_group() {
    let mut t = T::new();
    let o = t.one(DeviceOp::CreateDevice {
        source: dev("d1"),
        name: Some("Pump".into()),
        kind: None,
    });
    let d = done(&o);
    assert_eq!(group_of_id(d.id), 3);
    assert_eq!(d.str("name"), Some("Pump"));
    assert_eq!(d.str("type"), Some("c8y_MQTTDevice"));
    assert!(d.body.contains_key("c8y_IsDevice") && d.body.contains_key(AGENT));
    assert_eq!(
        t.one(DeviceOp::CreateDevice {
            source: dev("d1"),
            name: None,
            kind: None
        }),
        Outcome::Exists
    );
    assert_eq!(
        t.sm.device_external("t1", SERIAL, "d1").unwrap(),
        Some(d.id)
    );
    // Another tenant's d1 is another device.
    assert_eq!(t.sm.device_external("t2", SERIAL, "d1").unwrap(), None);
}

#[test]
fn data_for_an_unknown_child_creates_it_under_the_device() {
    let mut t = T::new();
    let src = Source::Child {
        serial: "d1".into(),
        child: "c1".into(),
    };
    let m = done(&t.one(DeviceOp::Measurement {
        source: src,
        doc: r#"{"type":"c8y_Temp","c8y_Temp":{"T":{"value":21.5,"unit":"C"}}}"#.into(),
    }));
    let root =
        t.sm.device_external("t1", SERIAL, "d1")
            .unwrap()
            .expect("root");
    let child =
        t.sm.device_external("t1", SERIAL, "c1")
            .unwrap()
            .expect("child");
    assert_eq!(m.parent, Some(child));
    let r = t.sm.device_object("t1", root).unwrap().unwrap();
    assert_eq!(r.children, vec![child]);
    let c = t.sm.device_object("t1", child).unwrap().unwrap();
    assert_eq!(c.str("type"), Some("c8y_MQTTChildDevice"));
    assert!(!c.body.contains_key(AGENT));
    let got =
        t.sm.device_records(
            RecordKind::Measurement,
            "t1",
            Some(child),
            false,
            |_| true,
            10,
        )
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["c8y_Temp"]["T"]["value"], Value::from(21.5));
}

#[test]
fn a_repeated_active_alarm_counts_up_and_a_cleared_one_starts_over() {
    let mut t = T::new();
    let raise = |text: &str| DeviceOp::Alarm {
        source: dev("d1"),
        doc: format!(r#"{{"type":"hot","severity":"MAJOR","text":"{text}"}}"#),
    };
    let a1 = done(&t.one(raise("one")));
    let a2 = done(&t.one(raise("two")));
    assert_eq!(a1.id, a2.id);
    assert_eq!(a2.body["count"], Value::from(2));
    assert_eq!(a2.str("text"), Some("two"));
    let cleared = done(&t.one(DeviceOp::AlarmChange {
        source: dev("d1"),
        kind: "hot".into(),
        severity: None,
        status: Some("CLEARED".into()),
        remove: vec![],
        set: None,
    }));
    assert_eq!(cleared.str("status"), Some("CLEARED"));
    let a3 = done(&t.one(raise("three")));
    assert_ne!(a3.id, a1.id);
    assert_eq!(a3.body["count"], Value::from(1));
    assert!(matches!(
        t.one(DeviceOp::AlarmChange {
            source: dev("d1"),
            kind: "cold".into(),
            severity: Some("MINOR".into()),
            status: None,
            remove: vec![],
            set: None,
        }),
        Outcome::NotFound(_)
    ));
}

#[test]
fn an_operation_for_a_child_goes_to_the_agent_and_moves_through_its_states() {
    let mut t = T::new();
    let child = done(&t.one(DeviceOp::CreateChild {
        parent: dev("d1"),
        child: "c1".into(),
        name: None,
        kind: None,
        is_device: true,
    }));
    let op = done(&t.one(DeviceOp::Operation {
        device: child.id,
        doc: r#"{"description":"run","c8y_Command":{"text":"ls"}}"#.into(),
    }));
    assert_eq!(op.str("status"), Some("PENDING"));
    assert_eq!(op.agent.as_ref().map(|a| a.1.as_str()), Some("d1"));
    assert_eq!(op.target.as_deref(), Some("c1"));
    assert_eq!(
        many(&t.one(DeviceOp::Pending { source: dev("d1") })).len(),
        1
    );
    // Status updates address the child (s/us/c1); on the root they find nothing.
    let csrc = Source::Child {
        serial: "d1".into(),
        child: "c1".into(),
    };
    let exec = |src: Source| DeviceOp::OperationStatus {
        source: src,
        select: OpSelect::Oldest {
            fragment: "c8y_Command".into(),
            from: "PENDING".into(),
        },
        to: "EXECUTING".into(),
        reason: None,
        params: vec![],
        set: None,
    };
    assert!(matches!(t.one(exec(dev("d1"))), Outcome::NotFound(_)));
    let e = many(&t.one(exec(csrc.clone())));
    assert_eq!(e[0].str("status"), Some("EXECUTING"));
    let s = many(&t.one(DeviceOp::OperationStatus {
        source: csrc.clone(),
        select: OpSelect::Oldest {
            fragment: "c8y_Command".into(),
            from: "EXECUTING".into(),
        },
        to: "SUCCESSFUL".into(),
        reason: None,
        params: vec!["file1\nfile2".into()],
        set: None,
    }));
    assert_eq!(
        s[0].body["c8y_Command"]["result"],
        Value::from("file1\nfile2")
    );
    assert!(many(&t.one(DeviceOp::Pending { source: dev("d1") })).is_empty());
    // Finished is final.
    assert!(matches!(
        t.one(DeviceOp::OperationStatus {
            source: csrc,
            select: OpSelect::Id(op.id),
            to: "FAILED".into(),
            reason: Some("late".into()),
            params: vec![],
            set: None,
        }),
        Outcome::Invalid(_)
    ));
    let stored =
        t.sm.device_record(RecordKind::Operation, "t1", op.id)
            .unwrap()
            .unwrap();
    assert_eq!(stored.str("status"), Some("SUCCESSFUL"));
}

#[test]
fn by_id_status_changes_only_touch_the_devices_own_operations() {
    let mut t = T::new();
    let d1 = many(&t.one(DeviceOp::Describe { source: dev("d1") })).remove(0);
    t.one(DeviceOp::Describe { source: dev("d2") });
    let op = done(&t.one(DeviceOp::Operation {
        device: d1.id,
        doc: r#"{"c8y_Restart":{}}"#.into(),
    }));
    let by = |src: Source, to: &str| DeviceOp::OperationStatus {
        source: src,
        select: OpSelect::Id(op.id),
        to: to.into(),
        reason: Some("broken".into()),
        params: vec![],
        set: None,
    };
    assert!(matches!(
        t.one(by(dev("d2"), "FAILED")),
        Outcome::NotFound(_)
    ));
    let f = many(&t.one(by(dev("d1"), "FAILED")));
    assert_eq!(f[0].str("failureReason"), Some("broken"));
}

#[test]
fn retention_removes_old_measurements_and_events_only() {
    let mut t = T::new();
    for i in 0..5u64 {
        t.run_at(
            i * 1000,
            vec![
                DeviceOp::Measurement {
                    source: dev("d1"),
                    doc: r#"{"type":"m","m":{"s":{"value":1}}}"#.into(),
                },
                DeviceOp::Event {
                    source: dev("d1"),
                    doc: r#"{"type":"e","text":"x"}"#.into(),
                },
            ],
        );
    }
    t.one(DeviceOp::Alarm {
        source: dev("d1"),
        doc: r#"{"type":"a","severity":"MINOR","text":"x"}"#.into(),
    });
    let pruned = t.run_at(
        10_000,
        vec![DeviceOp::Prune {
            before_ms: 2500,
            limit: 100,
        }],
    );
    assert_eq!(pruned, vec![Outcome::Done("6".into())]);
    let count = |t: &T, k| {
        t.sm.device_records(k, "t1", None, false, |_| true, 100)
            .unwrap()
            .len()
    };
    assert_eq!(count(&t, RecordKind::Measurement), 2);
    assert_eq!(count(&t, RecordKind::Event), 2);
    assert_eq!(count(&t, RecordKind::Alarm), 1);
    let root = t.sm.device_external("t1", SERIAL, "d1").unwrap().unwrap();
    assert_eq!(
        t.sm.device_records(RecordKind::Event, "t1", Some(root), true, |_| true, 100)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn replicas_applying_the_same_batches_hold_the_same_bytes() {
    let batches = vec![
        vec![DeviceOp::CreateDevice {
            source: dev("d1"),
            name: None,
            kind: None,
        }],
        vec![
            DeviceOp::Update {
                source: dev("d1"),
                set: r#"{"c8y_SupportedOperations":["c8y_Restart"]}"#.into(),
                remove: vec![],
                if_absent: false,
            },
            DeviceOp::Alarm {
                source: dev("d1"),
                doc: r#"{"type":"a","severity":"MINOR","text":"x"}"#.into(),
            },
        ],
    ];
    let mut a = T::new();
    let mut b = T::new();
    for ops in batches {
        assert_eq!(a.run(ops.clone()), b.run(ops));
    }
    assert_eq!(
        a.sm.snapshot_bytes().unwrap(),
        b.sm.snapshot_bytes().unwrap()
    );
}

#[test]
fn a_bad_document_is_refused_and_changes_nothing() {
    let mut t = T::new();
    assert!(matches!(
        t.one(DeviceOp::Measurement {
            source: dev("d1"),
            doc: "[1,2]".into(),
        }),
        Outcome::Invalid(_)
    ));
    assert_eq!(t.sm.device_external("t1", SERIAL, "d1").unwrap(), None);
}

#[test]
fn a_device_cannot_reach_into_another_devices_data() {
    let mut t = T::new();
    t.run_as("d1", vec![DeviceOp::Describe { source: dev("d1") }]);
    let a = t.run_as(
        "d1",
        vec![DeviceOp::Alarm {
            source: dev("d1"),
            doc: r#"{"type":"hot","severity":"MAJOR","text":"x"}"#.into(),
        }],
    );
    let alarm = done(&a[0]);
    // d2 addressing d1 as its "child", by id, or through d1's alarm: nothing found, nothing changed.
    let d1 = t.sm.device_external("t1", SERIAL, "d1").unwrap().unwrap();
    let o = t.run_as(
        "d2",
        vec![
            DeviceOp::Measurement {
                source: Source::Child {
                    serial: "d2".into(),
                    child: "d1".into(),
                },
                doc: r#"{"type":"m"}"#.into(),
            },
            DeviceOp::Update {
                source: Source::Id(d1),
                set: r#"{"hacked":true}"#.into(),
                remove: vec![],
                if_absent: false,
            },
            DeviceOp::RecordUpdate {
                kind: RecordKind::Alarm,
                id: alarm.id,
                set: r#"{"status":"CLEARED"}"#.into(),
            },
        ],
    );
    assert!(o.iter().all(|x| matches!(x, Outcome::NotFound(_))), "{o:?}");
    let obj = t.sm.device_object("t1", d1).unwrap().unwrap();
    assert!(!obj.body.contains_key("hacked"));
    assert!(t
        .sm
        .device_records(RecordKind::Measurement, "t1", Some(d1), false, |_| true, 10)
        .unwrap()
        .is_empty());
    assert_eq!(
        t.sm.device_record(RecordKind::Alarm, "t1", alarm.id)
            .unwrap()
            .unwrap()
            .str("status"),
        Some("ACTIVE")
    );
    // The platform (no device) may.
    let o = t.one(DeviceOp::RecordUpdate {
        kind: RecordKind::Alarm,
        id: alarm.id,
        set: r#"{"status":"CLEARED"}"#.into(),
    });
    assert_eq!(done(&o).str("status"), Some("CLEARED"));
}

#[test]
fn a_reopened_alarm_is_the_open_one_again() {
    let mut t = T::new();
    let raise = || DeviceOp::Alarm {
        source: dev("d1"),
        doc: r#"{"type":"hot","severity":"MAJOR","text":"x"}"#.into(),
    };
    let a = done(&t.one(raise()));
    let set = |s: &str| DeviceOp::RecordUpdate {
        kind: RecordKind::Alarm,
        id: a.id,
        set: format!(r#"{{"status":"{s}","type":"other"}}"#),
    };
    t.one(set("CLEARED"));
    t.one(set("ACTIVE"));
    let again = done(&t.one(raise()));
    assert_eq!(again.id, a.id, "counted on the reopened alarm");
    assert_eq!(again.body["count"], Value::from(2));
    assert_eq!(again.str("type"), Some("hot"), "type cannot change");
    assert!(matches!(t.one(set("WEIRD")), Outcome::Invalid(_)));
}

#[test]
fn connection_status_survives_proposals_in_either_order() {
    let mut t = T::new();
    t.one(DeviceOp::Describe { source: dev("d1") });
    let conn = |c: u64, up: bool| DeviceOp::Connection {
        source: dev("d1"),
        conn: c,
        connected: up,
    };
    let status = |t: &T| {
        let id = t.sm.device_external("t1", SERIAL, "d1").unwrap().unwrap();
        t.sm.device_object("t1", id)
            .unwrap()
            .unwrap()
            .body
            .get("c8y_Connection")
            .and_then(|c| c["status"].as_str())
            .map(str::to_string)
    };
    // The end of connection 5 committed before its start: it stays disconnected.
    t.one(conn(5, false));
    t.one(conn(5, true));
    assert_eq!(status(&t), None);
    t.one(conn(7, true));
    assert_eq!(status(&t).as_deref(), Some("CONNECTED"));
    // An older connection ending (a takeover) does not undo the newer one.
    t.one(conn(6, false));
    t.one(conn(6, true));
    assert_eq!(status(&t).as_deref(), Some("CONNECTED"));
    t.one(conn(7, false));
    assert_eq!(status(&t).as_deref(), Some("DISCONNECTED"));
}

#[test]
fn a_child_without_the_agent_fragment_gets_no_pending_operations() {
    let mut t = T::new();
    let child = done(&t.one(DeviceOp::CreateChild {
        parent: dev("d1"),
        child: "c1".into(),
        name: None,
        kind: None,
        is_device: true,
    }));
    t.one(DeviceOp::Operation {
        device: child.id,
        doc: r#"{"c8y_Restart":{}}"#.into(),
    });
    assert!(many(&t.one(DeviceOp::Pending { source: dev("c1") })).is_empty());
    assert_eq!(
        many(&t.one(DeviceOp::Pending { source: dev("d1") })).len(),
        1
    );
}

#[test]
fn overlong_key_texts_are_refused_before_proposing() {
    let long = "x".repeat(MAX_KEY_TEXT + 1);
    let op = DeviceOp::Alarm {
        source: dev("d1"),
        doc: format!(r#"{{"type":"{long}","severity":"MAJOR","text":"x"}}"#),
    };
    assert!(op.check().is_err());
    let cmd = Command::Device(DeviceBatch {
        tenant: "t1".into(),
        group: 3,
        now: String::new(),
        now_ms: 0,
        owner: String::new(),
        quiet: false,
        device: None,
        ops: vec![op],
    });
    assert!(crate::validate(&cmd).is_err());
    assert!(DeviceOp::Describe {
        source: Source::Child {
            serial: "d".into(),
            child: long
        }
    }
    .check()
    .is_err());
}
