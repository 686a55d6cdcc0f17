//! Group commit: many proposals become one Raft entry, so one log flush serves them all.
//!
//! One batcher task takes the first queued proposal, drains whatever else is already queued (up
//! to `max_batch`), and submits it as one entry with `client_write_ff`. It does not wait for the
//! commit: the receiver goes to a bounded FIFO read by one responder task, so up to
//! `MAX_IN_FLIGHT` entries are in Raft at once while the next batch fills. Entries are submitted
//! and answered strictly in order, so responses come back in proposal order.

use std::time::{Duration, Instant};

use fleetmq_storage::{Command, Response};
use openraft::error::ClientWriteError;
use openraft::raft::ClientWriteResponse;
use openraft::BasicNode;
use tokio::sync::{mpsc, oneshot};

use crate::error::ClusterError;
use crate::grpc::client::{forward_write, Channels};
use crate::type_config::{Batch, Raft, TypeConfig};

/// How long a follower waits for a leader to be known before refusing a proposal, and for the
/// leader to answer a forwarded one.
const LEADER_WAIT: Duration = Duration::from_secs(3);
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a follower keeps retrying a proposal while the leader it knew is unreachable
/// (an election takes a few hundred milliseconds; a minority partition never ends one).
const FAILOVER_WINDOW: Duration = Duration::from_secs(5);
/// How long a leader waits for a majority to commit a proposal before refusing it.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where proposals go when this node is not the leader of its group.
#[derive(Clone)]
pub(crate) struct Route {
    pub self_id: u64,
    pub group: u64,
    pub channels: Channels,
}

/// Entries submitted to Raft and not yet answered, at most (at least 2: the FIFO between
/// batcher and responder holds `MAX_IN_FLIGHT - 1`). Measured with the persistent QoS 1
/// fan-in bench: 2 gave ~102k msg/s, 4 ~95–104k, 12 ~76k — fewer entries in flight means
/// bigger batches, and per-entry costs (log append, apply, flush) dominate.
pub(crate) const MAX_IN_FLIGHT: usize = 2;

/// Where the outcome of one command goes; `None` for fire-and-forget proposals.
/// The answer carries the index of the Raft entry the command was committed in.
pub(crate) type Reply = Option<oneshot::Sender<Result<(Response, u64), ClusterError>>>;

/// Messages to the batcher.
// Shutdown is sent once; boxing Command would cost an allocation per proposal instead.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Msg {
    /// A command to commit.
    Propose(Command, Reply),
    /// Stop after everything queued before this message has been answered.
    Shutdown(oneshot::Sender<()>),
}

type WriteResult = Result<ClientWriteResponse<TypeConfig>, ClientWriteError<u64, BasicNode>>;

/// The result of a submitted entry: still in local Raft, or already answered by the leader.
enum Pending {
    Local(oneshot::Receiver<WriteResult>),
    Done(Result<ClientWriteResponse<TypeConfig>, ClusterError>),
}

/// One submitted entry awaiting its result.
struct InFlight {
    rx: Pending,
    replies: Vec<Reply>,
    started: Instant,
}

/// Runs the batcher until the channel closes or a shutdown message arrives.
pub(crate) async fn run(
    raft: Raft,
    route: Route,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    max_batch: usize,
) {
    let (flight_tx, flight_rx) = mpsc::channel::<InFlight>(MAX_IN_FLIGHT - 1);
    let responder = tokio::spawn(respond(flight_rx));
    let mut shutdown_ack = None;
    while shutdown_ack.is_none() {
        let (cmd, reply) = match rx.recv().await {
            Some(Msg::Propose(c, r)) => (c, r),
            Some(Msg::Shutdown(ack)) => {
                shutdown_ack = Some(ack);
                break;
            }
            None => break,
        };
        let mut cmds = vec![cmd];
        let mut replies = vec![reply];
        while cmds.len() < max_batch {
            match rx.try_recv() {
                Ok(Msg::Propose(c, r)) => {
                    cmds.push(c);
                    replies.push(r);
                }
                Ok(Msg::Shutdown(ack)) => {
                    shutdown_ack = Some(ack);
                    break;
                }
                Err(_) => break,
            }
        }
        submit(&raft, &route, cmds, replies, &flight_tx).await;
    }
    // Anything still queued after the shutdown message is refused (the senders see a closed
    // channel), and the responder finishes the entries already in Raft.
    rx.close();
    drop(flight_tx);
    if let Err(e) = responder.await {
        tracing::error!(error = %e, "raft responder task failed");
    }
    if let Some(ack) = shutdown_ack {
        let _ = ack.send(());
    }
}

/// The leader of the group as this node sees it, waiting up to `LEADER_WAIT` during an
/// election: `Ok(None)` when it is this node, `Ok(Some(addr))` for another node.
async fn leader(raft: &Raft, route: &Route) -> Result<Option<String>, ClusterError> {
    let deadline = Instant::now() + LEADER_WAIT;
    loop {
        let found = {
            let rx = raft.metrics();
            let m = rx.borrow();
            match m.current_leader {
                Some(l) if l == route.self_id => Some(None),
                Some(_) => crate::durable::leader_addr(&m).map(Some),
                None => None,
            }
        };
        if let Some(f) = found {
            return Ok(f);
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::NotLeader {
                leader_id: None,
                leader_addr: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends the batch to the leader and waits for its answer: one forwarded entry at a time, so
/// that the leader applies this node's proposals in the order they were made.
async fn forward(route: &Route, addr: &str, batch: &Batch) -> Pending {
    let started = Instant::now();
    let result = forward_write(&route.channels, addr, route.group, batch, FORWARD_TIMEOUT).await;
    metrics::histogram!("fleetmq_raft_forward_seconds").record(started.elapsed().as_secs_f64());
    Pending::Done(match result {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(openraft::error::RaftError::APIError(e))) => Err(ClusterError::from(&e)),
        Ok(Err(openraft::error::RaftError::Fatal(f))) => {
            Err(ClusterError::Raft(format!("leader at {addr} failed: {f}")))
        }
        Err(status) => {
            metrics::counter!("fleetmq_raft_forward_errors_total").increment(1);
            Err(ClusterError::Unavailable(format!(
                "leader at {addr} unreachable: {}",
                status.message()
            )))
        }
    })
}

async fn submit(
    raft: &Raft,
    route: &Route,
    cmds: Vec<Command>,
    replies: Vec<Reply>,
    flight_tx: &mpsc::Sender<InFlight>,
) {
    metrics::histogram!("fleetmq_raft_batch_size").record(cmds.len() as f64);
    metrics::counter!("fleetmq_raft_proposals_total").increment(cmds.len() as u64);
    let started = Instant::now();
    let batch = Batch(std::sync::Arc::new(cmds));
    // A leader that died or stepped down is retried until a new one is known (bounded), so a
    // failover delays proposals instead of failing them; order is kept, as this task does
    // nothing else meanwhile.
    let retry_until = Instant::now() + FAILOVER_WINDOW;
    let leader = loop {
        match leader(raft, route).await {
            Ok(Some(addr)) => match forward(route, &addr, &batch).await {
                Pending::Done(Err(e)) if e.is_retryable() && Instant::now() < retry_until => {
                    tracing::debug!(error = %e, "leader unreachable; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                done => break Ok(Some(done)),
            },
            other => break other.map(|_| None),
        }
    };
    let pending = match leader {
        Err(e) => Pending::Done(Err(e)),
        Ok(Some(done)) => done,
        Ok(None) => match raft.client_write_ff(batch).await {
            Ok(rx) => Pending::Local(rx),
            Err(fatal) => {
                let stopped = matches!(fatal, openraft::error::Fatal::Stopped);
                Pending::Done(Err(if stopped {
                    ClusterError::ShuttingDown
                } else {
                    ClusterError::Fatal(fatal.to_string())
                }))
            }
        },
    };
    // Blocks while MAX_IN_FLIGHT entries are pending: that is when batches grow.
    if let Err(mpsc::error::SendError(f)) = flight_tx
        .send(InFlight {
            rx: pending,
            replies,
            started,
        })
        .await
    {
        fail_all(f.replies, || ClusterError::ShuttingDown);
    }
}

async fn respond(mut flight_rx: mpsc::Receiver<InFlight>) {
    while let Some(f) = flight_rx.recv().await {
        let result = match f.rx {
            // A leader cut off from its majority never commits: the proposal is refused after
            // a while (it may still commit later, if the majority comes back first).
            Pending::Local(rx) => match tokio::time::timeout(COMMIT_TIMEOUT, rx).await {
                Ok(Ok(Ok(resp))) => Ok(resp),
                Ok(Ok(Err(e))) => Err(ClusterError::from(&e)),
                // Raft dropped the responder: it is shutting down or stopped on a fatal error.
                Ok(Err(_)) => Err(ClusterError::ShuttingDown),
                Err(_) => {
                    metrics::counter!("fleetmq_raft_commit_timeouts_total").increment(1);
                    Err(ClusterError::Unavailable(
                        "no majority: the write was not committed in time".into(),
                    ))
                }
            },
            Pending::Done(r) => r,
        };
        metrics::histogram!("fleetmq_raft_commit_seconds")
            .record(f.started.elapsed().as_secs_f64());
        match result {
            Ok(resp) => {
                if resp.data.len() != f.replies.len() {
                    let msg = format!(
                        "entry {} answered {} responses for {} commands",
                        resp.log_id,
                        resp.data.len(),
                        f.replies.len()
                    );
                    tracing::error!("{msg}");
                    fail_all(f.replies, || ClusterError::Raft(msg.clone()));
                    continue;
                }
                let index = resp.log_id.index;
                for (reply, r) in f.replies.into_iter().zip(resp.data) {
                    if let Some(tx) = reply {
                        let _ = tx.send(Ok((r, index)));
                    }
                }
            }
            Err(e) => {
                // Callers need to know whether to retry, not the exact variant.
                let msg = e.to_string();
                let (retryable, fatal) = (e.is_retryable(), e.is_fatal());
                fail_all(f.replies, || {
                    if fatal {
                        ClusterError::Fatal(msg.clone())
                    } else if retryable {
                        ClusterError::Unavailable(msg.clone())
                    } else {
                        ClusterError::Raft(msg.clone())
                    }
                });
            }
        }
    }
}

fn fail_all(replies: Vec<Reply>, err: impl Fn() -> ClusterError) {
    let mut dropped = 0usize;
    for reply in replies {
        match reply {
            Some(tx) => {
                let _ = tx.send(Err(err()));
            }
            None => dropped += 1,
        }
    }
    if dropped > 0 {
        tracing::warn!(dropped, error = %err(), "fire-and-forget proposals failed");
    }
}
