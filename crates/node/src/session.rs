//! Session state: subscriptions, the outbound queue, QoS 1/2 messages in flight and inbound
//! QoS 2 packet ids. Pure data and rules; the connection task drives it and the broker shares it
//! behind a mutex. It outlives connections: a persistent session keeps queueing while offline.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use fleetmq_storage::records::{SessionKey, SubscriptionRecord};
use tokio::sync::{oneshot, Notify};

use crate::message::Message;

/// Why a connection is told to close by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// A newer connection took the session; `session_continues` is true when the new
    /// connection resumes the session (its will must then wait for the delay, or not fire).
    TakenOver { session_continues: bool },
    /// The node is shutting down: DISCONNECT 0x8B, no will, the session continues.
    Shutdown,
    /// The node is drained (it hands its clients to the other nodes): DISCONNECT 0x9C "use
    /// another server", no will, the session continues wherever the client reconnects.
    Drain,
}

/// One message on its way to this session's client.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// Effective QoS: min(publish QoS, granted QoS).
    pub qos: u8,
    /// RETAIN flag as sent.
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// Durable queue sequence number (persistent sessions, QoS > 0). Also fixes the packet id,
    /// so that a redelivery after a crash reuses the packet id the client may have seen.
    pub seq: Option<u64>,
    /// Set on redelivery.
    pub dup: bool,
}

/// Where a QoS 1/2 delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitAck,
    /// PUBREC received; the durable Release is being committed before PUBREL goes out.
    Releasing,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitComp,
}

/// A delivery that has a packet id.
#[derive(Debug, Clone)]
pub struct Inflight {
    pub delivery: Delivery,
    pub state: InflightState,
    /// Send order, so that redelivery after reconnect keeps the original order.
    pub order: u64,
}

/// What the connection did with the head of the queue in [`SessionState::take_sendable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    /// Written to the client.
    Sent,
    /// Discarded without sending (expired, too large for the client).
    Dropped,
    /// Not taken: the write budget of this pass is spent.
    Stop,
}

/// Result of queueing a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueue {
    /// Queued; `wake` is true if the connection must be notified (queue was empty).
    Queued { wake: bool },
    /// Dropped: the queue is at its bound.
    Full,
    /// Dropped: QoS 0 to a client that is not connected.
    Offline,
    /// Dropped: the session ended (expired, or replaced by a clean start) after the message
    /// was routed to it.
    Ended,
}

/// Hash state with no per-map random keys: 16 bytes less in each of a session's maps, which
/// matters at a million idle sessions. Keys are the session's own packet ids and filters, so a
/// client that picks colliding keys only slows down itself.
pub type FixedState = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// A session-private map (see [`FixedState`]).
pub type SmallMap<K, V> = HashMap<K, V, FixedState>;

/// Subscription options as the session keeps them.
pub type SubOptions = SubscriptionRecord;

/// Mutable state of a session.
#[derive(Debug)]
pub struct SessionState {
    pub persistent: bool,
    /// Session expiry interval in seconds (u32::MAX: never).
    pub expiry_secs: u32,
    pub subscriptions: SmallMap<String, SubOptions>,
    pub queue: VecDeque<Delivery>,
    pub inflight: SmallMap<u16, Inflight>,
    /// Inbound QoS 2 packet ids awaiting PUBREL; `true` once the message is committed (a
    /// retransmission is acknowledged only then).
    pub inbound_qos2: SmallMap<u16, bool>,
    /// The connection currently attached, if any.
    pub conn: Option<u64>,
    /// The newest connection ever attached here (0: none): a takeover aimed at an older one
    /// is stale (see `cluster::registry::Fences`).
    pub newest_conn: u64,
    /// The node this node registered (or re-announced) the attached connection with as the
    /// device's home (0: none, e.g. while alone): where to unregister it, and where to take
    /// the record away from when the home moves.
    pub home: u64,
    pub kick: Option<oneshot::Sender<Kick>>,
    /// Bumped on every connect; delayed wills and expiry timers check it to see if they are stale.
    pub generation: u64,
    /// A will waiting for its delay; published when the delay ends or the session ends,
    /// dropped when the client reconnects to the session first.
    pub pending_will: Option<Arc<Message>>,
    /// The running session-expiry and delayed-will timers. Aborted when the client comes back,
    /// so a device that reconnects every few seconds does not pile up sleeping tasks (each of
    /// which would also keep the session's memory alive until its deadline).
    pub expiry_timer: Option<tokio::task::AbortHandle>,
    /// Set when the session is over (expired, or discarded by a clean start); a message routed
    /// to it just before is dropped instead of being queued on a dead object.
    pub ended: bool,
    pub will_timer: Option<tokio::task::AbortHandle>,
    /// The Raft index this session's in-memory state reflects: deliveries queued through Raft
    /// for it at a later index (`Enqueue`, by another node) are added when applied here.
    pub durable_from: u64,
    /// The default template collection of the attached connection's ClientId
    /// (`d:<id>:<X-ID>`, §7.3): its responses go to `s/dd`.
    pub default_xid: Option<String>,
    next_pid: u16,
    next_order: u64,
}

impl SessionState {
    /// Fresh state.
    pub fn new(persistent: bool, expiry_secs: u32) -> Self {
        SessionState {
            persistent,
            expiry_secs,
            subscriptions: SmallMap::default(),
            queue: VecDeque::new(),
            inflight: SmallMap::default(),
            inbound_qos2: SmallMap::default(),
            default_xid: None,
            conn: None,
            newest_conn: 0,
            home: 0,
            kick: None,
            generation: 0,
            pending_will: None,
            expiry_timer: None,
            ended: false,
            durable_from: 0,
            will_timer: None,
            next_pid: 1,
            next_order: 0,
        }
    }

    /// Adds a delivery, honouring the queue bound and the offline rule for QoS 0.
    pub fn enqueue(&mut self, d: Delivery, max_queued: usize) -> Enqueue {
        if self.ended {
            return Enqueue::Ended;
        }
        if self.conn.is_none() && d.qos == 0 {
            return Enqueue::Offline;
        }
        if self.queue.len() >= max_queued {
            return Enqueue::Full;
        }
        let wake = self.queue.is_empty();
        self.queue.push_back(d);
        Enqueue::Queued { wake }
    }

    /// The packet id a durable delivery uses: derived from its sequence number so that it is
    /// the same after a restart without writing the assignment down.
    pub fn pid_for_seq(seq: u64) -> u16 {
        (seq % 65_535) as u16 + 1
    }

    fn allocate_pid(&mut self) -> Option<u16> {
        for _ in 0..65_535 {
            let pid = self.next_pid;
            self.next_pid = if self.next_pid == u16::MAX {
                1
            } else {
                self.next_pid + 1
            };
            if !self.inflight.contains_key(&pid) {
                return Some(pid);
            }
        }
        None
    }

    /// Takes the next deliveries that may be sent now, up to `window` messages in flight.
    /// QoS 0 deliveries come out with pid 0 and are not tracked. Stops (keeping order) when the
    /// head's packet id is still in use. `out` sees the head of the queue before it is taken:
    /// `Emit::Sent` takes it (tracked in flight for QoS > 0), `Emit::Dropped` discards it
    /// (expired, too large for the client), `Emit::Stop` leaves it queued and ends the pass
    /// (the caller's write budget is spent).
    pub fn take_sendable(&mut self, window: usize, mut out: impl FnMut(u16, &Delivery) -> Emit) {
        while let Some((qos, seq)) = self.queue.front().map(|f| (f.qos, f.seq)) {
            let pid = if qos == 0 {
                0
            } else {
                if self.inflight.len() >= window {
                    break;
                }
                match seq {
                    Some(seq) => {
                        let pid = Self::pid_for_seq(seq);
                        if self.inflight.contains_key(&pid) {
                            break;
                        }
                        pid
                    }
                    None => match self.allocate_pid() {
                        Some(pid) => pid,
                        None => break,
                    },
                }
            };
            let emit = match self.queue.front() {
                Some(front) => out(pid, front),
                None => break,
            };
            match emit {
                Emit::Stop => break,
                Emit::Dropped => {
                    self.queue.pop_front();
                }
                Emit::Sent => {
                    let Some(d) = self.queue.pop_front() else {
                        break;
                    };
                    if qos > 0 {
                        self.restore_inflight(pid, d, InflightState::AwaitAck);
                    }
                }
            }
        }
    }

    /// Inflight entries in original send order, for redelivery after a reconnect.
    pub fn inflight_in_order(&self) -> Vec<(u16, Inflight)> {
        let mut v: Vec<(u16, Inflight)> =
            self.inflight.iter().map(|(p, i)| (*p, i.clone())).collect();
        v.sort_by_key(|(_, i)| i.order);
        v
    }

    /// Tracks a delivery as in flight under `pid`, after those already in flight (sending it,
    /// or placing a recovered one after a restart).
    /// True when a durable delivery with this sequence number is queued or in flight.
    pub fn has_seq(&self, seq: u64) -> bool {
        self.queue.iter().any(|d| d.seq == Some(seq))
            || self.inflight.values().any(|i| i.delivery.seq == Some(seq))
    }

    pub fn restore_inflight(&mut self, pid: u16, d: Delivery, state: InflightState) {
        let order = self.next_order;
        self.next_order += 1;
        self.inflight.insert(
            pid,
            Inflight {
                delivery: d,
                state,
                order,
            },
        );
    }

    /// Stops the expiry and delayed-will timers (the client is back, or the session ended).
    pub fn cancel_timers(&mut self) {
        if let Some(t) = self.expiry_timer.take() {
            t.abort();
        }
        if let Some(t) = self.will_timer.take() {
            t.abort();
        }
    }

    /// Clears everything a clean start discards.
    pub fn reset(&mut self) {
        self.subscriptions.clear();
        self.queue.clear();
        self.inflight.clear();
        self.inbound_qos2.clear();
    }
}

/// A session shared between the broker (routing into it) and its connection task.
#[derive(Debug)]
pub struct Session {
    /// Process-unique id: identity in the subscription trie and for no-local.
    pub id: u64,
    pub key: SessionKey,
    pub state: parking_lot::Mutex<SessionState>,
    /// Wakes the connection task when the queue goes from empty to non-empty.
    pub notify: Notify,
}

impl Session {
    /// A new, unconnected session.
    pub fn new(id: u64, key: SessionKey, persistent: bool, expiry_secs: u32) -> Arc<Session> {
        Arc::new(Session {
            id,
            key,
            state: parking_lot::Mutex::new(SessionState::new(persistent, expiry_secs)),
            notify: Notify::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use fleetmq_protocol::PublishProps;

    fn d(qos: u8, seq: Option<u64>) -> Delivery {
        Delivery {
            msg: Message::new(
                "t".into(),
                Bytes::new(),
                qos,
                false,
                PublishProps::default(),
            ),
            qos,
            retain: false,
            sub_ids: vec![],
            seq,
            dup: false,
        }
    }

    #[test]
    fn qos0_is_not_queued_offline_but_qos1_is() {
        let mut s = SessionState::new(true, 100);
        assert_eq!(s.enqueue(d(0, None), 10), Enqueue::Offline);
        assert_eq!(s.enqueue(d(1, Some(1)), 10), Enqueue::Queued { wake: true });
        assert_eq!(
            s.enqueue(d(1, Some(2)), 10),
            Enqueue::Queued { wake: false }
        );
    }

    #[test]
    fn an_ended_session_takes_nothing() {
        let mut s = SessionState::new(true, 100);
        s.conn = Some(1);
        s.ended = true;
        assert_eq!(s.enqueue(d(1, Some(7)), 10), Enqueue::Ended);
        assert!(s.queue.is_empty());
    }

    #[test]
    fn queue_bound_drops_new_messages() {
        let mut s = SessionState::new(false, 0);
        s.conn = Some(1);
        for i in 0..3 {
            assert!(
                matches!(s.enqueue(d(1, None), 3), Enqueue::Queued { .. }),
                "{i}"
            );
        }
        assert_eq!(s.enqueue(d(1, None), 3), Enqueue::Full);
    }

    #[test]
    fn window_limits_inflight_and_qos0_passes() {
        let mut s = SessionState::new(false, 0);
        s.conn = Some(1);
        for _ in 0..5 {
            s.enqueue(d(1, None), 100);
        }
        s.enqueue(d(0, None), 100);
        let mut sent = vec![];
        s.take_sendable(2, |pid, _| {
            sent.push(pid);
            Emit::Sent
        });
        assert_eq!(sent, vec![1, 2]);
        assert_eq!(s.inflight.len(), 2);
        s.inflight.remove(&1);
        sent.clear();
        s.take_sendable(2, |pid, _| {
            sent.push(pid);
            Emit::Sent
        });
        assert_eq!(sent, vec![3]);
    }

    #[test]
    fn durable_pid_follows_seq_and_waits_for_collision() {
        let mut s = SessionState::new(true, 10);
        s.conn = Some(1);
        s.enqueue(d(1, Some(0)), 100);
        s.enqueue(d(1, Some(65_535)), 100); // same pid as seq 0
        let mut sent = vec![];
        s.take_sendable(100, |pid, _| {
            sent.push(pid);
            Emit::Sent
        });
        assert_eq!(sent, vec![1], "second must wait until pid 1 is free");
        s.inflight.remove(&1);
        s.take_sendable(100, |pid, _| {
            sent.push(pid);
            Emit::Sent
        });
        assert_eq!(sent, vec![1, 1]);
    }

    #[test]
    fn stop_leaves_the_head_queued_and_dropped_discards_it() {
        let mut s = SessionState::new(false, 0);
        s.conn = Some(1);
        for _ in 0..4 {
            s.enqueue(d(0, None), 100);
        }
        let mut n = 0;
        s.take_sendable(10, |_, _| {
            n += 1;
            if n <= 2 {
                Emit::Sent
            } else {
                Emit::Stop
            }
        });
        assert_eq!(
            s.queue.len(),
            2,
            "a stopped pass must not lose the messages it did not send"
        );
        s.take_sendable(10, |_, _| Emit::Dropped);
        assert!(s.queue.is_empty());
        assert!(s.inflight.is_empty());
    }

    #[test]
    fn allocator_skips_pids_in_use() {
        let mut s = SessionState::new(false, 0);
        s.conn = Some(1);
        s.restore_inflight(1, d(1, None), InflightState::AwaitAck);
        s.enqueue(d(2, None), 10);
        let mut sent = vec![];
        s.take_sendable(10, |pid, _| {
            sent.push(pid);
            Emit::Sent
        });
        assert_eq!(sent, vec![2]);
        let order: Vec<u16> = s.inflight_in_order().into_iter().map(|(p, _)| p).collect();
        assert_eq!(order, vec![1, 2]);
    }
}
