//! The broker's entry point to durable state: open, propose (group-committed), recover.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetmq_storage::{
    Command, Entry, RecoveredSession, Response, Space, StateMachineStore, Storage, StoredMessage,
    MAX_COMMANDS_PER_ENTRY,
};
use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Config, RaftMetrics, ServerState, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;

use crate::error::ClusterError;
use crate::log_adapter::LogAdapter;
use crate::network::NoNetwork;
use crate::proposer::{self, Msg};
use crate::sm_adapter::SmAdapter;
use crate::type_config::Raft;

/// The only group for now; shards get their own ids later.
const GROUP: u64 = 0;

/// How long `open` waits for leadership and recovery before giving up.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings for [`Durable::open`].
#[derive(Debug, Clone)]
pub struct DurableConfig {
    /// This node's Raft id; must stay the same across restarts of one data directory.
    pub node_id: u64,
    /// Directory of the node's sled database.
    pub data_dir: PathBuf,
    /// Commands per Raft entry at most (e.g. 4096); clamped to 1..=65536.
    pub max_batch: usize,
    /// Address other nodes will reach this node's Raft service at (stored in membership).
    pub advertise_addr: String,
}

/// Handle to the node's durable state; cheap to clone.
#[derive(Clone)]
pub struct Durable {
    inner: Arc<Inner>,
}

struct Inner {
    raft: Raft,
    storage: Storage,
    sm: StateMachineStore,
    tx: mpsc::UnboundedSender<Msg>,
    closing: AtomicBool,
    batcher: Mutex<Option<JoinHandle<()>>>,
}

fn raft_config() -> Result<Config, ClusterError> {
    let config = Config {
        cluster_name: "fleetmq".to_string(),
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        // Snapshot every 4k entries and keep only a short tail, so the log (and sled, whose
        // memory grows with its size) does not grow
        // forever; with batching that is far more than 20k commands.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(4_000),
        max_in_snapshot_log_to_keep: 200,
        purge_batch_size: 256,
        ..Default::default()
    };
    config
        .validate()
        .map_err(|e| ClusterError::Raft(e.to_string()))
}

impl Durable {
    /// Opens the data directory, starts Raft, initialises a one-member cluster on an empty
    /// directory, and returns once this node is leader and has applied its whole log, so that
    /// [`sessions`](Self::sessions) and [`retained`](Self::retained) see recovered state.
    pub async fn open(cfg: DurableConfig) -> Result<Durable, ClusterError> {
        Self::open_with(cfg, raft_config()?).await
    }

    async fn open_with(cfg: DurableConfig, config: Config) -> Result<Durable, ClusterError> {
        let storage = Storage::open(&cfg.data_dir)?;
        let log = LogAdapter::new(storage.log_store(GROUP)?);
        let sm = storage.state_machine(GROUP)?;
        let sm_adapter = SmAdapter::new(sm.clone(), storage.clone())
            .map_err(|e| ClusterError::Fatal(e.to_string()))?;
        let raft = Raft::new(cfg.node_id, Arc::new(config), NoNetwork, log, sm_adapter).await?;

        if !raft.is_initialized().await? {
            let members = BTreeMap::from([(
                cfg.node_id,
                BasicNode {
                    addr: cfg.advertise_addr.clone(),
                },
            )]);
            match raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(RaftError::Fatal(f)) => return Err(f.into()),
                Err(RaftError::APIError(e)) => return Err(ClusterError::Raft(e.to_string())),
            }
        }

        let id = cfg.node_id;
        raft.wait(Some(OPEN_TIMEOUT))
            .metrics(
                |m| {
                    m.state == ServerState::Leader
                        && m.current_leader == Some(id)
                        && m.last_applied.map(|l| l.index) >= m.last_log_index
                },
                "leader with the whole log applied",
            )
            .await
            .map_err(|e| ClusterError::Timeout(e.to_string()))?;

        let max_batch = cfg.max_batch.clamp(1, MAX_COMMANDS_PER_ENTRY);
        let (tx, rx) = mpsc::unbounded_channel();
        let batcher = tokio::spawn(proposer::run(raft.clone(), rx, max_batch));
        Ok(Durable {
            inner: Arc::new(Inner {
                raft,
                storage,
                sm,
                tx,
                closing: AtomicBool::new(false),
                batcher: Mutex::new(Some(batcher)),
            }),
        })
    }

    /// Proposes one command; resolves once it is committed (flushed) and applied.
    /// Commands are applied in the order their `propose`/`propose_nowait` calls happened.
    pub async fn propose(&self, cmd: Command) -> Result<Response, ClusterError> {
        fleetmq_storage::validate(&cmd).map_err(|e| ClusterError::InvalidCommand(e.to_string()))?;
        if self.inner.closing.load(Ordering::Acquire) {
            return Err(ClusterError::ShuttingDown);
        }
        let (tx, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Propose(cmd, Some(tx)))
            .map_err(|_| ClusterError::ShuttingDown)?;
        rx.await.map_err(|_| ClusterError::ShuttingDown)?
    }

    /// Proposes one command without waiting; same ordering as [`propose`](Self::propose).
    /// Failures are only logged, so use it where a lost command is harmless (e.g. acks).
    pub fn propose_nowait(&self, cmd: Command) {
        if let Err(e) = fleetmq_storage::validate(&cmd) {
            tracing::warn!(error = %e, "dropping invalid command");
            return;
        }
        if self.inner.closing.load(Ordering::Acquire)
            || self.inner.tx.send(Msg::Propose(cmd, None)).is_err()
        {
            tracing::debug!("proposal after shutdown dropped");
        }
    }

    /// All persistent sessions as last applied (call after `open` for recovery).
    pub fn sessions(&self) -> Result<Vec<RecoveredSession>, ClusterError> {
        Ok(self.inner.sm.sessions()?)
    }

    /// All retained messages as `(tenant, topic, message)`.
    pub fn retained(&self) -> Result<Vec<(String, String, StoredMessage)>, ClusterError> {
        Ok(self.inner.sm.retained()?)
    }

    /// Every directory entry of a space as last applied: `(space, tenant, name, value)`.
    pub fn entries(&self, space: Space) -> Result<Vec<Entry>, ClusterError> {
        Ok(self.inner.sm.entries(space)?)
    }

    /// Current Raft metrics (leadership, log and applied index), for health checks.
    pub fn raft_metrics(&self) -> RaftMetrics<u64, BasicNode> {
        self.inner.raft.metrics().borrow().clone()
    }

    /// Builds a snapshot now (and purges the log behind it), instead of waiting for the
    /// snapshot policy; for operations and tests. Returns before the snapshot is done.
    pub async fn trigger_snapshot(&self) -> Result<(), ClusterError> {
        Ok(self.inner.raft.trigger().snapshot().await?)
    }

    /// Answers every proposal queued so far, refuses new ones, stops Raft and flushes sled.
    pub async fn shutdown(&self) -> Result<(), ClusterError> {
        self.inner.closing.store(true, Ordering::Release);
        let Some(batcher) = self.inner.batcher.lock().await.take() else {
            return Ok(()); // already shut down
        };
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.inner.tx.send(Msg::Shutdown(ack_tx)).is_ok() {
            let _ = ack_rx.await;
        }
        if let Err(e) = batcher.await {
            tracing::error!(error = %e, "raft batcher task failed");
        }
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| ClusterError::Fatal(e.to_string()))?;
        // Staged state-machine writes go to sled before the final flush, so the next start
        // does not have to re-apply them from the log (it could, but this is faster).
        self.inner.sm.write_back()?;
        self.inner.storage.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetmq_storage::SessionRecord;

    fn key() -> fleetmq_storage::SessionKey {
        fleetmq_storage::SessionKey::new("t", "c")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshot_purges_log_and_restart_recovers_from_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = DurableConfig {
            node_id: 7,
            data_dir: dir.path().to_path_buf(),
            max_batch: 16,
            advertise_addr: "n7:7070".into(),
        };
        let config = Config {
            max_in_snapshot_log_to_keep: 0,
            purge_batch_size: 1,
            ..raft_config().expect("config")
        };
        let d = Durable::open_with(cfg.clone(), config).await.expect("open");
        let record = SessionRecord {
            expiry_secs: 60,
            protocol: 4,
            disconnected_at_ms: None,
            subscriptions: vec![],
        };
        d.propose(Command::PutSession {
            key: key(),
            record,
            fresh: true,
        })
        .await
        .expect("put");
        for i in 0..20 {
            d.propose(Command::SetDisconnected {
                key: key(),
                at_ms: Some(i),
            })
            .await
            .expect("set");
        }
        let last = d.raft_metrics().last_applied;
        d.trigger_snapshot().await.expect("trigger");
        d.inner
            .raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.snapshot == last && m.purged == last,
                "snapshot and purge",
            )
            .await
            .expect("snapshot built and log purged");
        d.shutdown().await.expect("shutdown");
        drop(d);

        let d = Durable::open(cfg).await.expect("reopen");
        let s = d.sessions().expect("sessions");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].record.disconnected_at_ms, Some(19));
        let r = d
            .propose(Command::SetDisconnected {
                key: key(),
                at_ms: None,
            })
            .await;
        assert_eq!(r.expect("after purge"), Response::Ok);
        d.shutdown().await.expect("shutdown");
    }
}
