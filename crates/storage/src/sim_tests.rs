//! Seeded simulation of the durable session state machine through crashes.
//!
//! One publisher and two persistent subscribers drive a `StateMachineStore` with the commands
//! a broker proposes for them (QoS 1/2 publish, QoS 2 retransmit, PUBREL, PUBACK / PUBREC /
//! PUBCOMP, late duplicate acknowledgements, session resume and clean start), interleaved with
//! checkpoints and crashes. A model of what the broker has acknowledged is kept next to the
//! store and compared with what the store recovers after every crash and checkpoint:
//!
//! 1. A QoS 1/2 message whose publish was applied (acknowledged to the publisher) stays in a
//!    persistent subscriber's queue until the subscriber's acknowledgement is applied, whatever
//!    crashes happen in between.
//! 2. QoS 2 once: a retransmitted PUBLISH whose inbound packet id is recorded is answered
//!    `DuplicateInbound` and queues nothing, also across a crash; a delivery in `Released`
//!    state comes back `Released` (resend PUBREL), never `Pending` (a second PUBLISH).
//! 3. The sequence numbers of one session's deliveries are unique and strictly increasing,
//!    also across a clean start (so a late acknowledgement can never hit a newer delivery).
//!
//! Crash model: `apply` stages writes in memory (`overlay.rs`) and writes them to sled in one
//! batch together with the last-applied marker of the newest staged entry, when due or on
//! `write_back`. A crash loses the staged writes. The Raft log still has those entries
//! (openraft flushes the log before anything is acknowledged; here it is `Sim::log`), and on
//! restart the entries after the persisted marker are applied again. The simulation does
//! exactly that: drop the state machine without `write_back` (now and then sled as well),
//! open it again, read the marker, replay, and require the replay to answer as the first
//! application did. Dropping sled flushes what was already written to the tree, so this crash
//! never loses a sled write the way a power cut can. That case is covered all the same,
//! assuming sled recovers a prefix of its atomic batches: every batch carries its marker, so a
//! lost tail of batches just means an older marker, i.e. the same state as fewer write-backs,
//! followed by a longer replay.
//!
//! Which entries a crash loses also depends on time (`Pending::due` writes back after 200 ms),
//! but the recovered state does not: that is what marker plus replay guarantees and checks.
//!
//! Run one seed alone, printing every log entry:
//! `SIM_SEED=<seed> cargo test -p fleetmq-storage sim_ -- --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::records::*;
use crate::{StateMachineStore, Storage, StorageError, NO_SESSION_SEQ};

const SEEDS: std::ops::Range<u64> = 0..20;
const STEPS: usize = 300;
/// Inbound packet ids of the publisher: few, so that released ids are soon used again.
const PIDS: std::ops::RangeInclusive<u16> = 1..=6;
/// Proposals in one log entry at most (the Raft adapter batches what arrives together).
const MAX_BATCH: usize = 4;
const TENANT: &str = "sim";
const PUBLISHER: &str = "pub";
/// Subscribers with the QoS their subscription was granted.
const SUBSCRIBERS: [(&str, u8); 2] = [("s1", 1), ("s2", 2)];

fn key(client: &str) -> SessionKey {
    SessionKey::new(TENANT, client)
}

/// splitmix64: a few lines, no dependency, and the same sequence on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (the modulo bias is irrelevant here); `n` must not be 0.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.below(items.len())])
    }
}

/// Where a failure happened; every assertion message starts with it so that it reproduces.
#[derive(Clone, Copy)]
struct At {
    seed: u64,
    step: usize,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {} step {}", self.seed, self.step)
    }
}

/// One queued delivery as the model expects to recover it (everything but the message id).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Delivery {
    qos: u8,
    retain: bool,
    subscription_ids: Vec<u32>,
    state: DeliveryState,
    message: StoredMessage,
}

/// What the store must hold: the effect of every applied log entry, never rolled back.
#[derive(Default)]
struct Model {
    /// Per subscriber: applied deliveries not finished yet, by seq.
    queues: BTreeMap<String, BTreeMap<u64, Delivery>>,
    /// Per subscriber: the highest seq ever handed out.
    last_seq: BTreeMap<String, u64>,
    /// Per subscriber: seqs that were queued and are gone, for late duplicate acknowledgements.
    finished: BTreeMap<String, Vec<u64>>,
    /// Inbound QoS 2 packet ids of the publisher that the store has recorded.
    inbound: BTreeSet<u16>,
}

/// A QoS 2 message as the publishing client tracks it until PUBCOMP.
struct Inflight {
    publish: Command,
    /// PUBREC received: the publish (or a retransmit of it) was applied.
    pubrec: bool,
    /// PUBREL sent: the client never sends this PUBLISH again.
    pubrel_sent: bool,
}

/// A log entry with the answers its first application gave.
struct LogEntry {
    cmds: Vec<Command>,
    responses: Vec<Response>,
}

struct Db {
    storage: Storage,
    sm: StateMachineStore,
}

impl Db {
    /// Opens the database, waiting while a dropped handle still holds its file lock: sled's
    /// background I/O threads can keep the file for a moment after the last handle is gone
    /// (sled's own tests block on the lock for the same reason).
    fn open(path: &Path, at: At) -> Db {
        let deadline = Instant::now() + Duration::from_secs(10);
        let storage = loop {
            match Storage::open(path) {
                Ok(storage) => break storage,
                Err(StorageError::Sled(sled::Error::Io(e)))
                    if e.to_string().contains("could not acquire lock")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("{at}: opening the database: {e}"),
            }
        };
        let sm = storage
            .state_machine(0)
            .unwrap_or_else(|e| panic!("{at}: opening the state machine: {e}"));
        Db { storage, sm }
    }
}

struct Sim {
    seed: u64,
    rng: Rng,
    dir: tempfile::TempDir,
    /// `None` only for the moment of a crash: sled must be closed before it can be reopened.
    db: Option<Db>,
    /// The Raft log: durable, entry `i` has log index `i + 1`.
    log: Vec<LogEntry>,
    /// Proposals not yet in the log; a crash drops them (nobody was answered for them).
    batch: Vec<Command>,
    model: Model,
    /// The publishing client's QoS 2 messages by packet id.
    inflight: BTreeMap<u16, Inflight>,
    /// Log index up to which a checkpoint made everything durable.
    durable: usize,
    next_msg: u64,
    verbose: bool,
}

impl Sim {
    fn new(seed: u64, verbose: bool) -> Sim {
        let at = At { seed, step: 0 };
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path(), at);
        let mut sim = Sim {
            seed,
            rng: Rng(seed),
            dir,
            db: Some(db),
            log: Vec::new(),
            batch: Vec::new(),
            model: Model::default(),
            inflight: BTreeMap::new(),
            durable: 0,
            next_msg: 0,
            verbose,
        };
        sim.batch.push(Command::PutSession {
            key: key(PUBLISHER),
            record: session_record(None),
            fresh: true,
        });
        for (i, (name, granted)) in SUBSCRIBERS.iter().enumerate() {
            sim.batch.push(Command::PutSession {
                key: key(name),
                record: session_record(Some((i as u32 + 1, *granted))),
                fresh: true,
            });
        }
        sim.commit(at);
        sim
    }

    fn sm(&self) -> &StateMachineStore {
        &self.db.as_ref().expect("database is open").sm
    }

    fn step(&mut self, at: At) {
        match self.rng.below(100) {
            // Weighted so that subscribers about keep up and queues stay short.
            0..=14 => self.publish(1, None),
            15..=29 => self.publish_qos2(at),
            30..=36 => self.retransmit(),
            37..=46 => self.pubrel(),
            47..=86 => self.subscriber_ack(),
            87..=89 => self.late_ack(),
            90..=91 => self.resume(),
            92 => self.clean_start(),
            93..=95 => self.checkpoint(at),
            // Most crashes keep the sled handle (see `crash`): reopening sled costs ~10 ms.
            _ => {
                let reopen = self.rng.percent(25);
                self.crash(at, reopen);
            }
        }
        // The adapter commits what it has batched now and then; a full batch always.
        if !self.batch.is_empty() && (self.batch.len() >= MAX_BATCH || self.rng.percent(60)) {
            self.commit(at);
        }
    }

    /// Proposes a new publish; for QoS 2 the client has just sent PUBLISH with `pid`.
    fn publish(&mut self, qos: u8, pid: Option<u16>) {
        self.next_msg += 1;
        let message = StoredMessage {
            topic: format!("sim/{}", self.next_msg % 4),
            payload: Bytes::from(format!("seed {} msg {}", self.seed, self.next_msg)),
            qos,
            retain: false,
            props: MessageProps::default(),
            publisher: Some(key(PUBLISHER)),
        };
        // Mostly both subscribers match, sometimes only one.
        let matched: Vec<usize> = match self.rng.below(4) {
            0 => vec![0],
            1 => vec![1],
            _ => vec![0, 1],
        };
        let targets = matched
            .into_iter()
            .map(|i| {
                let (name, granted) = SUBSCRIBERS[i];
                Target {
                    key: key(name),
                    qos: qos.min(granted),
                    retain: false,
                    subscription_ids: vec![i as u32 + 1],
                }
            })
            .collect();
        let cmd = match pid {
            // Now and then as the command that queues for sessions no node holds; the store
            // must treat it like a publish.
            None if self.rng.percent(20) => Command::Enqueue { message, targets },
            _ => Command::Publish {
                message,
                targets,
                inbound: pid.map(|p| (key(PUBLISHER), p)),
            },
        };
        if let Some(pid) = pid {
            self.inflight.insert(
                pid,
                Inflight {
                    publish: cmd.clone(),
                    pubrec: false,
                    pubrel_sent: false,
                },
            );
        }
        self.batch.push(cmd);
    }

    fn publish_qos2(&mut self, at: At) {
        let free: Vec<u16> = PIDS.filter(|p| !self.inflight.contains_key(p)).collect();
        match self.rng.pick(&free) {
            Some(pid) => {
                // The client only reuses an id after PUBCOMP, which comes after the store
                // forgot it; a fresh id being recorded already would make this a duplicate.
                assert!(
                    !self.model.inbound.contains(&pid),
                    "{at}: pid {pid} is free for the client but recorded by the store"
                );
                self.publish(2, Some(pid));
            }
            // Every id in flight: the client cannot send a new QoS 2 message before a PUBCOMP.
            None => self.pubrel(),
        }
    }

    /// The client sends a QoS 2 PUBLISH again (DUP): it has not sent PUBREL for it, so either
    /// no PUBREC came yet or it was lost with a connection or a crash.
    fn retransmit(&mut self) {
        let candidates: Vec<u16> = self
            .inflight
            .iter()
            .filter(|(_, f)| !f.pubrel_sent)
            .map(|(pid, _)| *pid)
            .collect();
        if let Some(pid) = self.rng.pick(&candidates) {
            self.batch.push(self.inflight[&pid].publish.clone());
        }
    }

    /// PUBREL after PUBREC (possibly again, if PUBCOMP has not come yet).
    fn pubrel(&mut self) {
        let candidates: Vec<u16> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.pubrec)
            .map(|(pid, _)| *pid)
            .collect();
        if let Some(pid) = self.rng.pick(&candidates) {
            if let Some(f) = self.inflight.get_mut(&pid) {
                f.pubrel_sent = true;
            }
            self.batch.push(Command::InboundRelease {
                key: key(PUBLISHER),
                pid,
            });
        }
    }

    /// A subscriber answers deliveries it got (from the recovered, i.e. applied, queue): PUBACK
    /// for QoS 1, PUBREC for a pending QoS 2 one, PUBCOMP for a released one.
    fn subscriber_ack(&mut self) {
        let (name, _) = SUBSCRIBERS[self.rng.below(SUBSCRIBERS.len())];
        let queue = self.model.queues.get(name).cloned().unwrap_or_default();
        if queue.is_empty() {
            return;
        }
        let k = key(name);
        if self.rng.percent(35) {
            // Acknowledgements that arrived together, committed as one command.
            let finishable: Vec<u64> = queue
                .iter()
                .filter(|(_, d)| d.qos < 2 || d.state == DeliveryState::Released)
                .map(|(seq, _)| *seq)
                .take(1 + self.rng.below(4))
                .collect();
            if !finishable.is_empty() {
                self.batch.push(Command::AckMany {
                    key: k,
                    seqs: finishable,
                });
            }
            return;
        }
        let seqs: Vec<u64> = queue.keys().copied().collect();
        let seq = seqs[self.rng.below(seqs.len())];
        let cmd = if queue[&seq].qos == 2 && queue[&seq].state == DeliveryState::Pending {
            Command::Release { key: k, seq }
        } else {
            Command::Ack { key: k, seq }
        };
        self.batch.push(cmd);
    }

    /// A duplicate PUBACK / PUBREC / PUBCOMP for a delivery that is already gone: it must
    /// change nothing (and, with seqs never reused, can never hit a newer delivery).
    fn late_ack(&mut self) {
        let (name, _) = SUBSCRIBERS[self.rng.below(SUBSCRIBERS.len())];
        let finished = self.model.finished.get(name).cloned().unwrap_or_default();
        if let Some(seq) = self.rng.pick(&finished) {
            let k = key(name);
            let cmd = if self.rng.percent(50) {
                Command::Release { key: k, seq }
            } else {
                Command::Ack { key: k, seq }
            };
            self.batch.push(cmd);
        }
    }

    /// A client reconnects to its persistent session: nothing it had may be dropped.
    fn resume(&mut self) {
        let clients = [PUBLISHER, SUBSCRIBERS[0].0, SUBSCRIBERS[1].0];
        let client = clients[self.rng.below(clients.len())];
        self.batch.push(Command::PutSession {
            key: key(client),
            record: session_record(None),
            fresh: false,
        });
    }

    /// A subscriber connects with clean start: its queue goes, its seqs must not come back.
    /// (Only subscribers: the model of the publishing client would have to forget its ids at
    /// once, while the store forgets them only when the entry is applied.)
    fn clean_start(&mut self) {
        let i = self.rng.below(SUBSCRIBERS.len());
        let (name, granted) = SUBSCRIBERS[i];
        self.batch.push(Command::PutSession {
            key: key(name),
            record: session_record(Some((i as u32 + 1, granted))),
            fresh: true,
        });
    }

    /// Appends the batch to the log as one entry and applies it, as the Raft adapter does.
    fn commit(&mut self, at: At) {
        let cmds = std::mem::take(&mut self.batch);
        let index = self.log.len() as u64 + 1;
        let responses = self
            .sm()
            .apply(index, &cmds, Some((&index.to_be_bytes(), None)))
            .unwrap_or_else(|e| panic!("{at}: applying entry {index}: {e}"));
        if self.verbose {
            eprintln!("{at}: entry {index}: {cmds:?}\n  -> {responses:?}");
        }
        assert_eq!(
            responses.len(),
            cmds.len(),
            "{at}: entry {index}: one response per command"
        );
        for (cmd, response) in cmds.iter().zip(&responses) {
            self.observe(at, index, cmd, response);
        }
        self.log.push(LogEntry { cmds, responses });
    }

    /// Checks one applied command's response against the model and advances the model.
    fn observe(&mut self, at: At, index: u64, cmd: &Command, response: &Response) {
        let (message, targets, inbound) = match cmd {
            Command::Publish {
                message,
                targets,
                inbound,
            } => (message, targets, inbound.as_ref()),
            Command::Enqueue { message, targets } => (message, targets, None),
            _ => {
                assert_eq!(
                    response,
                    &Response::Ok,
                    "{at}: entry {index}: {cmd:?} answered"
                );
                self.observe_other(cmd);
                return;
            }
        };
        if let Some((_, pid)) = inbound {
            // PUBREC goes back for a first copy and a duplicate alike.
            if let Some(f) = self.inflight.get_mut(pid) {
                f.pubrec = true;
            }
            if self.model.inbound.contains(pid) {
                assert_eq!(
                    response,
                    &Response::DuplicateInbound,
                    "{at}: entry {index}: retransmit of recorded QoS 2 pid {pid} was queued again"
                );
                return;
            }
            self.model.inbound.insert(*pid);
        }
        let Response::Published { seqs } = response else {
            panic!("{at}: entry {index}: publish answered {response:?}");
        };
        assert_eq!(
            seqs.len(),
            targets.len(),
            "{at}: entry {index}: one seq per target"
        );
        for (target, seq) in targets.iter().zip(seqs) {
            let name = target.key.client_id.clone();
            assert_ne!(
                *seq, NO_SESSION_SEQ,
                "{at}: entry {index}: {name} exists but got no delivery"
            );
            let last = self.model.last_seq.entry(name.clone()).or_default();
            assert!(
                *seq > *last,
                "{at}: entry {index}: {name} got seq {seq} after seq {last}"
            );
            *last = *seq;
            let delivery = Delivery {
                qos: target.qos,
                retain: target.retain,
                subscription_ids: target.subscription_ids.clone(),
                state: DeliveryState::Pending,
                message: message.clone(),
            };
            self.model
                .queues
                .entry(name)
                .or_default()
                .insert(*seq, delivery);
        }
    }

    fn observe_other(&mut self, cmd: &Command) {
        match cmd {
            Command::Release { key, seq } => {
                let queue = self.model.queues.entry(key.client_id.clone()).or_default();
                if let Some(d) = queue.get_mut(seq) {
                    d.state = DeliveryState::Released;
                }
            }
            Command::Ack { key, seq } => self.finish(&key.client_id, *seq),
            Command::AckMany { key, seqs } => {
                for seq in seqs {
                    self.finish(&key.client_id, *seq);
                }
            }
            Command::InboundRelease { pid, .. } => {
                // PUBCOMP: the client is done with the id, the store has forgotten it.
                self.model.inbound.remove(pid);
                self.inflight.remove(pid);
            }
            Command::PutSession {
                key, fresh: true, ..
            } if key.client_id != PUBLISHER => {
                let gone = self.model.queues.remove(&key.client_id).unwrap_or_default();
                self.model
                    .finished
                    .entry(key.client_id.clone())
                    .or_default()
                    .extend(gone.into_keys());
            }
            Command::PutSession { .. } => {}
            other => unreachable!("the simulation does not propose {other:?}"),
        }
    }

    fn finish(&mut self, client: &str, seq: u64) {
        let queue = self.model.queues.entry(client.to_owned()).or_default();
        if queue.remove(&seq).is_some() {
            self.model
                .finished
                .entry(client.to_owned())
                .or_default()
                .push(seq);
        }
    }

    /// Everything applied so far is written and flushed: a later crash may not go behind it.
    fn checkpoint(&mut self, at: At) {
        let db = self.db.as_ref().expect("database is open");
        db.sm
            .write_back()
            .unwrap_or_else(|e| panic!("{at}: write_back: {e}"));
        db.storage
            .flush_blocking()
            .unwrap_or_else(|e| panic!("{at}: flush: {e}"));
        self.durable = self.log.len();
        self.check(at, "at a checkpoint");
    }

    /// Drops the state machine without `write_back` and replays the log after the marker.
    ///
    /// With `reopen`, sled is closed and opened again from disk too. Without, the state machine
    /// is opened again over the same sled handle: the staged writes are all the state machine
    /// keeps in memory, and a closed sled keeps every tree write anyway (see the module
    /// comment), so for the state machine both are the same crash; the full one also checks
    /// that the persisted state reads back from disk.
    fn crash(&mut self, at: At, reopen: bool) {
        // Proposals that are not in the log die with the node; nobody got an answer for them
        // (a client retransmits; see `retransmit`).
        self.batch.clear();
        let db = match self.db.take() {
            Some(db) if !reopen => {
                let sm = db
                    .storage
                    .state_machine(0)
                    .unwrap_or_else(|e| panic!("{at}: opening the state machine: {e}"));
                Db {
                    storage: db.storage,
                    sm,
                }
            }
            old => {
                drop(old);
                Db::open(self.dir.path(), at)
            }
        };
        let marker = db
            .sm
            .last_applied_raw()
            .unwrap_or_else(|e| panic!("{at}: reading the marker: {e}"))
            .map(|raw| {
                let bytes: [u8; 8] = raw.as_slice().try_into().expect("marker is a u64");
                u64::from_be_bytes(bytes) as usize
            })
            .unwrap_or(0);
        assert!(
            (self.durable..=self.log.len()).contains(&marker),
            "{at}: persisted marker {marker} outside checkpoint {}..=last applied {}",
            self.durable,
            self.log.len()
        );
        for (i, entry) in self.log.iter().enumerate().skip(marker) {
            let index = i as u64 + 1;
            let replayed = db
                .sm
                .apply(index, &entry.cmds, Some((&index.to_be_bytes(), None)))
                .unwrap_or_else(|e| panic!("{at}: replaying entry {index}: {e}"));
            assert_eq!(
                replayed, entry.responses,
                "{at}: replaying entry {index} (marker was {marker}) answered differently"
            );
        }
        if self.verbose {
            eprintln!(
                "{at}: crash (reopen: {reopen}): marker {marker}, replayed {} entries",
                self.log.len() - marker
            );
        }
        self.db = Some(db);
        self.check(at, "after a crash and replay");
    }

    /// Compares the recovered sessions with the model.
    fn check(&self, at: At, when: &str) {
        let sm = self.sm();
        let sessions: BTreeMap<String, RecoveredSession> = sm
            .sessions()
            .unwrap_or_else(|e| panic!("{at}: reading sessions {when}: {e}"))
            .into_iter()
            .map(|s| (s.key.client_id.clone(), s))
            .collect();
        for (name, _) in SUBSCRIBERS {
            let session = sessions
                .get(name)
                .unwrap_or_else(|| panic!("{at}: session {name} is gone {when}"));
            let seqs: Vec<u64> = session.queue.iter().map(|(seq, _, _)| *seq).collect();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "{at}: {name}'s queue is not in strictly increasing seq order {when}: {seqs:?}"
            );
            let actual: BTreeMap<u64, Delivery> = session
                .queue
                .iter()
                .map(|(seq, entry, message)| {
                    let delivery = Delivery {
                        qos: entry.qos,
                        retain: entry.retain,
                        subscription_ids: entry.subscription_ids.clone(),
                        state: entry.state,
                        message: message.clone(),
                    };
                    (*seq, delivery)
                })
                .collect();
            let empty = BTreeMap::new();
            let expected = self.model.queues.get(name).unwrap_or(&empty);
            for (seq, want) in expected {
                let Some(got) = actual.get(seq) else {
                    panic!("{at}: {name} lost delivery {seq} {when}: {want:?}");
                };
                assert!(
                    !(want.state == DeliveryState::Released && got.state == DeliveryState::Pending),
                    "{at}: {name}'s delivery {seq} is pending again {when}, although PUBREC was \
                     applied: its PUBLISH would go out twice"
                );
                assert_eq!(got, want, "{at}: {name}'s delivery {seq} {when}");
            }
            let extra: Vec<&u64> = actual
                .keys()
                .filter(|seq| !expected.contains_key(seq))
                .collect();
            assert!(
                extra.is_empty(),
                "{at}: {name} has deliveries {extra:?} {when}, finished or never queued"
            );
        }
        let publisher = sessions
            .get(PUBLISHER)
            .unwrap_or_else(|| panic!("{at}: the publisher's session is gone {when}"));
        let pids: BTreeSet<u16> = publisher.inbound_pids.iter().copied().collect();
        assert_eq!(
            pids, self.model.inbound,
            "{at}: recorded inbound QoS 2 ids {when}"
        );
        sm.verify_refcounts()
            .unwrap_or_else(|e| panic!("{at}: refcounts {when}: {e}"));
    }

    /// Every client finishes everything; then no message may be left in the store.
    fn drain(&mut self, at: At) {
        for (name, _) in SUBSCRIBERS {
            let queue = self.model.queues.get(name).cloned().unwrap_or_default();
            for (seq, d) in &queue {
                if d.qos == 2 && d.state == DeliveryState::Pending {
                    self.batch.push(Command::Release {
                        key: key(name),
                        seq: *seq,
                    });
                }
            }
            self.batch.push(Command::AckMany {
                key: key(name),
                seqs: queue.keys().copied().collect(),
            });
        }
        for pid in self.model.inbound.clone() {
            self.batch.push(Command::InboundRelease {
                key: key(PUBLISHER),
                pid,
            });
        }
        self.commit(at);
        self.check(at, "after draining");
        assert!(
            self.model.queues.values().all(BTreeMap::is_empty) && self.model.inbound.is_empty(),
            "{at}: the model did not drain"
        );
        let sm = self.sm();
        sm.write_back()
            .unwrap_or_else(|e| panic!("{at}: write_back: {e}"));
        let left = sm.tree.scan_prefix([crate::state_machine::MESSAGE]).count();
        assert_eq!(left, 0, "{at}: messages left after every delivery finished");
    }
}

fn session_record(subscription: Option<(u32, u8)>) -> SessionRecord {
    SessionRecord {
        expiry_secs: u32::MAX,
        protocol: 5,
        disconnected_at_ms: None,
        subscriptions: subscription
            .map(|(id, qos)| SubscriptionRecord {
                filter: "sim/#".into(),
                qos,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
                subscription_id: Some(id),
            })
            .into_iter()
            .collect(),
    }
}

fn run(seed: u64, verbose: bool) {
    let mut sim = Sim::new(seed, verbose);
    for step in 1..=STEPS {
        sim.step(At { seed, step });
    }
    let end = At {
        seed,
        step: STEPS + 1,
    };
    if !sim.batch.is_empty() {
        sim.commit(end);
    }
    sim.crash(end, true);
    sim.drain(end);
}

#[test]
fn sim_sessions_survive_crashes_without_loss_or_duplicates() {
    match std::env::var("SIM_SEED") {
        Ok(seed) => run(seed.parse().expect("SIM_SEED is a u64"), true),
        Err(_) => {
            for seed in SEEDS {
                run(seed, false);
            }
        }
    }
}
