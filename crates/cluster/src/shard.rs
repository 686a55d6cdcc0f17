//! Which Raft group a command belongs to, decided from plain values.
//!
//! Group 0 (the meta group) holds what is cluster-wide: membership, the directory (tenants,
//! users, registration requests, certificates, settings) and retained messages. Groups
//! `1..=S` are the session shards: every record keyed by a device — its session, queue,
//! inbound QoS 2 ids and holder entry — lives in the shard its `(tenant, client id)` hashes
//! to, so one command never needs two shards, except a publish whose targets hash to several.
//! Such a publish is split into one command per shard ([`route`]) and the answers are put
//! back together in the original target order ([`merge`]).
//!
//! The hash is FNV-1a over the encoded key, written out here rather than taken from std:
//! `DefaultHasher` may change between Rust releases, and every node of a cluster (of mixed
//! builds, during a rolling upgrade) must put a key in the same shard forever.

use std::collections::BTreeMap;

use fleetmq_storage::{Command, Response, SessionKey, Space, Target};

/// The meta group's id.
pub const META: u64 = 0;

/// The group of a device's records among `shards` session shards (0 shards: everything is in
/// the meta group, as in clusters created before shards existed).
pub fn group_of(key: &SessionKey, shards: u32) -> u64 {
    if shards == 0 {
        return META;
    }
    1 + fnv1a(key) % u64::from(shards)
}

fn fnv1a(key: &SessionKey) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h = OFFSET;
    // Length-prefixed, so ("a", "bc") and ("ab", "c") hash apart.
    for part in [key.tenant.as_bytes(), key.client_id.as_bytes()] {
        for b in (part.len() as u32).to_be_bytes().iter().chain(part.iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    }
    h
}

/// One command's part for one group.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub group: u64,
    pub cmd: Command,
    /// For a split publish: the positions in the original `targets` this part's targets had.
    pub positions: Vec<usize>,
}

/// Where a command goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Routed {
    /// Whole, to one group.
    One(u64, Command),
    /// Split; answers are merged by target position ([`merge`]).
    Many { parts: Vec<Part>, targets: usize },
    /// A `PublishOutbox`: first `cmd` in the publisher's shard `home` (its own targets at
    /// `local` positions, the rest moved to its outbox), then one `EnqueueOnce` per other
    /// shard (`foreign`, whose origin id is filled in from the first answer).
    Outbox {
        home: u64,
        cmd: Command,
        local: Vec<usize>,
        foreign: Vec<Part>,
        targets: usize,
    },
}

/// The group(s) a command goes to among `shards` session shards.
pub fn route(cmd: Command, shards: u32) -> Routed {
    let g = |k: &SessionKey| group_of(k, shards);
    // The usual publish: every target in one shard (always, without shards). It goes whole,
    // with no split map and no copy of the message.
    let single = match &cmd {
        Command::Publish {
            targets,
            inbound: None,
            ..
        }
        | Command::Enqueue { targets, .. } => one_group(targets, shards),
        _ => None,
    };
    if let Some(group) = single {
        return Routed::One(group, cmd);
    }
    match cmd {
        Command::PutSession { ref key, .. }
        | Command::DeleteSession { ref key }
        | Command::SetDisconnected { ref key, .. }
        | Command::Subscribe { ref key, .. }
        | Command::Unsubscribe { ref key, .. }
        | Command::Release { ref key, .. }
        | Command::Ack { ref key, .. }
        | Command::AckMany { ref key, .. }
        | Command::InboundRelease { ref key, .. }
        | Command::ExpireSession { ref key, .. } => Routed::One(g(key), cmd),
        Command::PutEntry {
            space: Space::Holder,
            ref tenant,
            ref name,
            ..
        }
        | Command::DeleteEntry {
            space: Space::Holder,
            ref tenant,
            ref name,
        } => Routed::One(g(&SessionKey::new(tenant.clone(), name.clone())), cmd),
        Command::DeleteTenantEntries {
            space: Space::Holder,
            ..
        } if shards > 0 => Routed::Many {
            parts: (1..=u64::from(shards))
                .map(|group| Part {
                    group,
                    cmd: cmd.clone(),
                    positions: Vec::new(),
                })
                .collect(),
            targets: 0,
        },
        // Device data names its group itself: the device's shard for SmartREST and JSON via
        // MQTT, the group in a record's id for REST calls by id.
        Command::Device(ref b) => {
            let g = if b.group <= u64::from(shards) {
                b.group
            } else {
                META
            };
            Routed::One(g, cmd)
        }
        Command::PutEntry { .. }
        | Command::DeleteEntry { .. }
        | Command::DeleteTenantEntries { .. }
        | Command::SetRetained { .. } => Routed::One(META, cmd),
        // With an inbound QoS 2 id, a publish goes through the publisher's shard's outbox,
        // so the id is recorded in the same step as every target is accounted for.
        Command::Publish {
            message,
            targets,
            inbound: Some(inbound),
        } => route(
            Command::PublishOutbox {
                message,
                inbound,
                targets: targets.into_iter().map(|t| (t, true)).collect(),
                outbox: Vec::new(),
            },
            shards,
        ),
        Command::Publish {
            message,
            targets,
            inbound: None,
        } => split(targets, shards, |targets| Command::Publish {
            message: message.clone(),
            targets,
            inbound: None,
        }),
        Command::PublishOutbox {
            message,
            inbound,
            targets,
            outbox,
        } => {
            let home = g(&inbound.0);
            let n = targets.len();
            let mut local = Vec::new();
            let mut mine = Vec::new();
            let mut foreign: Split = BTreeMap::new();
            for (i, (t, flag)) in targets.into_iter().enumerate() {
                let tg = g(&t.key);
                if tg == home {
                    local.push(i);
                    mine.push((t, flag));
                } else {
                    // Queued in another shard: the node holding the session delivers it when
                    // it applies that shard's `EnqueueOnce`, whoever proposed it, so a part
                    // whose answer is lost, or that the sweeper finishes, still reaches a
                    // connected client.
                    let e = foreign.entry(tg).or_default();
                    e.0.push(t);
                    e.1.push(i);
                }
            }
            let mut kept = outbox;
            kept.extend(foreign.values().flat_map(|(t, _)| t.iter().cloned()));
            let foreign = foreign
                .into_iter()
                .map(|(group, (targets, positions))| Part {
                    group,
                    cmd: Command::EnqueueOnce {
                        origin: (home, 0),
                        message: message.clone(),
                        targets,
                    },
                    positions,
                })
                .collect();
            Routed::Outbox {
                home,
                cmd: Command::PublishOutbox {
                    message,
                    inbound,
                    targets: mine,
                    outbox: kept,
                },
                local,
                foreign,
                targets: n,
            }
        }
        Command::EnqueueOnce { ref targets, .. } => {
            let group = targets.first().map(|t| g(&t.key)).unwrap_or(META);
            Routed::One(group, cmd)
        }
        // Proposed to their group directly (`Durable::propose_in`); never routed by content.
        Command::OutboxDone { .. } | Command::ForgetOrigins { .. } => Routed::One(META, cmd),
        Command::Enqueue { message, targets } => {
            split(targets, shards, |targets| Command::Enqueue {
                message: message.clone(),
                targets,
            })
        }
    }
}

/// The one group all `targets` are in (the meta group for none), or `None` when they span
/// several.
fn one_group(targets: &[Target], shards: u32) -> Option<u64> {
    let mut groups = targets.iter().map(|t| group_of(&t.key, shards));
    let first = groups.next().unwrap_or(META);
    groups.all(|g| g == first).then_some(first)
}

/// One command per group of the targets (`make` builds it from that group's targets); called
/// for targets in several groups (see `one_group`).
fn split(targets: Vec<Target>, shards: u32, make: impl Fn(Vec<Target>) -> Command) -> Routed {
    let n = targets.len();
    let by_group = split_targets(targets, shards);
    let parts = by_group
        .into_iter()
        .map(|(group, (targets, positions))| Part {
            group,
            cmd: make(targets),
            positions,
        })
        .collect();
    Routed::Many { parts, targets: n }
}

/// Targets by group, with their positions in the original command.
type Split = BTreeMap<u64, (Vec<Target>, Vec<usize>)>;

fn split_targets(targets: Vec<Target>, shards: u32) -> Split {
    let mut out: Split = BTreeMap::new();
    for (i, t) in targets.into_iter().enumerate() {
        let e = out.entry(group_of(&t.key, shards)).or_default();
        e.0.push(t);
        e.1.push(i);
    }
    out
}

/// Puts the answers of a split command back together: `Published` sequence numbers in the
/// original target order; `DuplicateInbound` if the inbound part said so; otherwise `Ok`.
pub fn merge(targets: usize, answers: Vec<(&[usize], Response)>) -> Response {
    let mut seqs = vec![0u64; targets];
    let mut published = false;
    for (positions, r) in answers {
        match r {
            Response::DuplicateInbound => return Response::DuplicateInbound,
            Response::Published { seqs: s } => {
                published = true;
                for (p, seq) in positions.iter().zip(s) {
                    if let Some(slot) = seqs.get_mut(*p) {
                        *slot = seq;
                    }
                }
            }
            _ => {}
        }
    }
    if published {
        Response::Published { seqs }
    } else {
        Response::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetmq_storage::{MessageProps, StoredMessage};

    fn msg() -> StoredMessage {
        StoredMessage {
            topic: "t".into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: 2,
            retain: false,
            props: MessageProps::default(),
            publisher: None,
        }
    }

    fn target(c: &str) -> Target {
        Target {
            key: SessionKey::new("t1", c),
            qos: 1,
            retain: false,
            subscription_ids: vec![],
        }
    }

    /// Client ids that land in distinct shards, found by search (the hash is fixed).
    fn in_distinct_shards(shards: u32, n: usize) -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for i in 0.. {
            let c = format!("c{i}");
            if seen.insert(group_of(&SessionKey::new("t1", &c), shards)) {
                out.push(c);
                if out.len() == n {
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn the_hash_is_fixed_and_spreads() {
        // Pinned: a change would move every device to another shard in a running cluster.
        assert_eq!(
            fnv1a(&SessionKey::new("t1", "dev-1")),
            0x6641_5c48_1d39_4288
        );
        let mut counts = [0usize; 8];
        for i in 0..8000 {
            let g = group_of(&SessionKey::new("t1", format!("dev-{i}")), 8);
            assert!((1..=8).contains(&g));
            counts[(g - 1) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread {counts:?}");
        }
        assert_eq!(group_of(&SessionKey::new("t1", "x"), 0), META);
        // The two halves of the key are kept apart.
        assert_ne!(
            fnv1a(&SessionKey::new("a", "bc")),
            fnv1a(&SessionKey::new("ab", "c"))
        );
    }

    #[test]
    fn device_records_go_to_the_device_shard_and_the_rest_to_meta() {
        let key = SessionKey::new("t1", "dev");
        let g = group_of(&key, 4);
        let cmd = Command::Ack {
            key: key.clone(),
            seq: 1,
        };
        assert_eq!(route(cmd.clone(), 4), Routed::One(g, cmd));
        let holder = Command::PutEntry {
            space: Space::Holder,
            tenant: "t1".into(),
            name: "dev".into(),
            value: b"1".to_vec(),
            create_only: false,
        };
        assert_eq!(route(holder.clone(), 4), Routed::One(g, holder));
        let user = Command::PutEntry {
            space: Space::User,
            tenant: "t1".into(),
            name: "dev".into(),
            value: b"1".to_vec(),
            create_only: false,
        };
        assert_eq!(route(user.clone(), 4), Routed::One(META, user));
        let drop_holders = Command::DeleteTenantEntries {
            space: Space::Holder,
            tenant: "t1".into(),
        };
        match route(drop_holders, 4) {
            Routed::Many { parts, .. } => {
                assert_eq!(
                    parts.iter().map(|p| p.group).collect::<Vec<_>>(),
                    vec![1, 2, 3, 4]
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_publish_splits_by_shard_and_merges_back_in_target_order() {
        let ids = in_distinct_shards(4, 3);
        let targets = vec![
            target(&ids[1]),
            target(&ids[2]),
            target(&ids[1]),
            target(&ids[0]),
        ];
        let cmd = Command::Publish {
            message: msg(),
            targets,
            inbound: None,
        };
        let Routed::Many { parts, targets: n } = route(cmd, 4) else {
            panic!("not split")
        };
        assert_eq!(n, 4);
        assert_eq!(parts.len(), 3);
        for p in &parts {
            let Command::Publish { targets, .. } = &p.cmd else {
                panic!("{:?}", p.cmd)
            };
            for t in targets {
                assert_eq!(group_of(&t.key, 4), p.group);
            }
        }
        let mut all: Vec<usize> = parts.iter().flat_map(|p| p.positions.clone()).collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3]);
        let answers: Vec<(&[usize], Response)> = parts
            .iter()
            .map(|p| {
                let seqs = p.positions.iter().map(|i| 100 + *i as u64).collect();
                (p.positions.as_slice(), Response::Published { seqs })
            })
            .collect();
        assert_eq!(
            merge(4, answers),
            Response::Published {
                seqs: vec![100, 101, 102, 103]
            }
        );
    }

    #[test]
    fn a_publish_with_an_inbound_id_goes_through_the_publisher_shard_outbox() {
        let ids = in_distinct_shards(4, 3);
        let publisher = SessionKey::new("t1", ids[0].clone());
        let cmd = Command::Publish {
            message: msg(),
            targets: vec![target(&ids[1]), target(&ids[0]), target(&ids[2])],
            inbound: Some((publisher.clone(), 7)),
        };
        let Routed::Outbox {
            home,
            cmd,
            local,
            foreign,
            targets,
        } = route(cmd, 4)
        else {
            panic!("no outbox")
        };
        assert_eq!(home, group_of(&publisher, 4));
        assert_eq!(targets, 3);
        assert_eq!(local, vec![1]);
        let Command::PublishOutbox {
            inbound,
            targets: mine,
            outbox,
            ..
        } = cmd
        else {
            panic!("{cmd:?}")
        };
        assert_eq!(inbound, (publisher, 7));
        assert_eq!(mine, vec![(target(&ids[0]), true)]);
        // The other shards' targets wait in the outbox and go out as EnqueueOnce.
        assert_eq!(outbox.len(), 2);
        assert_eq!(foreign.len(), 2);
        for p in &foreign {
            let Command::EnqueueOnce {
                origin, targets, ..
            } = &p.cmd
            else {
                panic!("{:?}", p.cmd)
            };
            assert_eq!(origin.0, home);
            assert_eq!(targets.len(), 1);
            assert_eq!(group_of(&targets[0].key, 4), p.group);
        }
        let mut all: Vec<usize> = foreign.iter().flat_map(|p| p.positions.clone()).collect();
        all.extend(local);
        all.sort();
        assert_eq!(all, vec![0, 1, 2]);
        let dup = vec![
            (&[0usize][..], Response::Published { seqs: vec![5] }),
            (&[][..], Response::DuplicateInbound),
        ];
        assert_eq!(merge(1, dup), Response::DuplicateInbound);
    }

    #[test]
    fn an_inbound_only_publish_goes_to_the_publisher_shard() {
        let publisher = SessionKey::new("t1", "pub");
        let cmd = Command::Publish {
            message: msg(),
            targets: vec![],
            inbound: Some((publisher.clone(), 1)),
        };
        match route(cmd, 4) {
            Routed::Outbox { home, foreign, .. } => {
                assert_eq!(home, group_of(&publisher, 4));
                assert!(foreign.is_empty());
            }
            other => panic!("{other:?}"),
        }
        // No shards: everything in the meta group.
        let cmd = Command::Publish {
            message: msg(),
            targets: vec![target("a"), target("b")],
            inbound: Some((publisher, 1)),
        };
        match route(cmd, 0) {
            Routed::Outbox {
                home,
                foreign,
                local,
                ..
            } => {
                assert_eq!(home, META);
                assert!(foreign.is_empty());
                assert_eq!(local, vec![0, 1]);
            }
            other => panic!("{other:?}"),
        }
    }
}
