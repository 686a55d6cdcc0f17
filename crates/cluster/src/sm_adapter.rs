//! openraft state machine over `fleetmq_storage::StateMachineStore`.

// openraft fixes the error type of these traits; boxing it here would gain nothing.
#![allow(clippy::result_large_err)]

use std::io::Cursor;

use fleetmq_storage::{StateMachineStore, Storage};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, SnapshotMeta, StorageIOError,
    StoredMembership,
};

use crate::type_config::{RaftStorageError, TypeConfig};

/// What a node's caches learn from its state machine: the commands it applied that other
/// nodes' in-memory state mirrors (directory, retained messages, persistent subscriptions and
/// holders, orphan deliveries), whoever proposed them, or that a snapshot replaced everything.
#[derive(Debug, Clone)]
pub enum Applied {
    /// Observed commands of one entry, in log order, with the entry's group and index and
    /// each command's response.
    Commands {
        group: u64,
        index: u64,
        cmds: Vec<(fleetmq_storage::Command, fleetmq_storage::Response)>,
    },
    /// A snapshot was installed in a group: reload every cache from the state machines.
    Snapshot { group: u64 },
}

/// Set by a node once anyone subscribed to real-time notifications: from then on the
/// observer also sees device-data commands (off, they cost nothing).
pub static OBSERVE_DEVICE_DATA: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// True for the commands other nodes' in-memory state mirrors.
fn observed(cmd: &fleetmq_storage::Command) -> bool {
    use fleetmq_storage::Command as C;
    if matches!(cmd, C::Device(_)) {
        return OBSERVE_DEVICE_DATA.load(std::sync::atomic::Ordering::Relaxed);
    }
    matches!(
        cmd,
        C::PutEntry { .. }
            | C::DeleteEntry { .. }
            | C::DeleteTenantEntries { .. }
            | C::SetRetained { .. }
            | C::PutSession { .. }
            | C::DeleteSession { .. }
            | C::Subscribe { .. }
            | C::Unsubscribe { .. }
            | C::Enqueue { .. }
            | C::PublishOutbox { .. }
            | C::EnqueueOnce { .. }
    )
}

type Membership = StoredMembership<u64, BasicNode>;
type Meta = SnapshotMeta<u64, BasicNode>;

fn read_err<E: std::error::Error + 'static>(e: E) -> RaftStorageError {
    StorageIOError::read_state_machine(&e).into()
}

fn write_err<E: std::error::Error + 'static>(e: E) -> RaftStorageError {
    StorageIOError::write_state_machine(&e).into()
}

/// State machine of one group. Keeps last applied / membership in memory as well, so the
/// idempotence check on replay does not read sled per entry.
pub struct SmAdapter {
    sm: StateMachineStore,
    storage: Storage,
    last_applied: Option<LogId<u64>>,
    membership: Membership,
    observer: Option<tokio::sync::mpsc::UnboundedSender<Applied>>,
    /// The group this state machine belongs to, named in what the observer is told.
    group: u64,
}

impl SmAdapter {
    /// Loads the applied state of `sm`.
    pub fn new(sm: StateMachineStore, storage: Storage) -> Result<Self, RaftStorageError> {
        let last_applied = match sm.last_applied_raw().map_err(read_err)? {
            Some(b) => bincode::deserialize(&b).map_err(read_err)?,
            None => None,
        };
        let membership = match sm.last_membership_raw().map_err(read_err)? {
            Some(b) => bincode::deserialize(&b).map_err(read_err)?,
            None => Membership::default(),
        };
        Ok(Self {
            sm,
            storage,
            last_applied,
            membership,
            observer: None,
            group: 0,
        })
    }

    /// Also reports applied directory and retained commands to `tx`.
    pub fn with_observer(
        mut self,
        group: u64,
        tx: tokio::sync::mpsc::UnboundedSender<Applied>,
    ) -> Self {
        self.observer = Some(tx);
        self.group = group;
        self
    }

    fn notify(&self, event: Applied) {
        if let Some(tx) = &self.observer {
            // The receiver is gone only while the node shuts down.
            let _ = tx.send(event);
        }
    }
}

impl RaftStateMachine<TypeConfig> for SmAdapter {
    type SnapshotBuilder = SnapshotCapture;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, Membership), RaftStorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    /// One sled batch per entry: commands plus the last-applied marker. Entries at or below
    /// the last applied index (replay after a crash) are skipped and answer an empty Vec.
    async fn apply<I>(
        &mut self,
        entries: I,
    ) -> Result<Vec<Vec<fleetmq_storage::Response>>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            if self.last_applied.is_some_and(|l| l.index >= log_id.index) {
                out.push(Vec::new());
                continue;
            }
            let applied = bincode::serialize(&Some(log_id)).map_err(write_err)?;
            let apply_err = |e: fleetmq_storage::StorageError| -> RaftStorageError {
                StorageIOError::apply(log_id, &e).into()
            };
            let resp = match entry.payload {
                EntryPayload::Blank => {
                    self.sm.set_applied(&applied, None).map_err(apply_err)?;
                    Vec::new()
                }
                EntryPayload::Normal(batch) => {
                    let resp = self
                        .sm
                        .apply(log_id.index, &batch.0, Some((&applied, None)))
                        .map_err(apply_err)?;
                    if self.observer.is_some() && batch.0.iter().any(observed) {
                        let cmds = batch
                            .0
                            .iter()
                            .zip(resp.iter())
                            .filter(|(c, _)| observed(c))
                            .map(|(c, r)| (c.clone(), r.clone()))
                            .collect();
                        self.notify(Applied::Commands {
                            group: self.group,
                            index: log_id.index,
                            cmds,
                        });
                    }
                    resp
                }
                EntryPayload::Membership(m) => {
                    let membership = Membership::new(Some(log_id), m);
                    let mb = bincode::serialize(&membership).map_err(write_err)?;
                    self.sm
                        .set_applied(&applied, Some(&mb))
                        .map_err(apply_err)?;
                    self.membership = membership;
                    Vec::new()
                }
            };
            self.last_applied = Some(log_id);
            out.push(resp);
        }
        Ok(out)
    }

    /// Captures the data right here: openraft calls this from the state machine task, so no
    /// apply runs concurrently, while `build_snapshot` runs in a separate task.
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotCapture {
            data: self.sm.snapshot_bytes().map_err(|e| e.to_string()),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            sm: self.sm.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, RaftStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), RaftStorageError> {
        let data = snapshot.into_inner();
        let snap_err = |e: fleetmq_storage::StorageError| -> RaftStorageError {
            StorageIOError::write_snapshot(Some(meta.signature()), &e).into()
        };
        self.sm.install_snapshot_bytes(&data).map_err(snap_err)?;
        // The snapshot's own markers should already say this; write them from `meta` so the
        // two can never disagree.
        let applied = bincode::serialize(&meta.last_log_id).map_err(write_err)?;
        let mb = bincode::serialize(&meta.last_membership).map_err(write_err)?;
        self.sm.set_applied(&applied, Some(&mb)).map_err(snap_err)?;
        let mbytes = bincode::serialize(meta).map_err(write_err)?;
        self.sm.save_snapshot(&mbytes, &data).map_err(snap_err)?;
        self.storage.flush().await.map_err(snap_err)?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.notify(Applied::Snapshot { group: self.group });
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        match self.sm.read_snapshot().map_err(read_err)? {
            Some((m, data)) => {
                let meta: Meta = bincode::deserialize(&m).map_err(read_err)?;
                Ok(Some(Snapshot {
                    meta,
                    snapshot: Box::new(Cursor::new(data)),
                }))
            }
            None => Ok(None),
        }
    }
}

/// A snapshot's data taken at `get_snapshot_builder` time, persisted when built.
pub struct SnapshotCapture {
    data: Result<Vec<u8>, String>,
    last_applied: Option<LogId<u64>>,
    membership: Membership,
    sm: StateMachineStore,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotCapture {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let data = match &self.data {
            Ok(d) => d.clone(),
            Err(e) => return Err(read_err(std::io::Error::other(e.clone()))),
        };
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}", l.leader_id, l.index),
            None => "empty".to_string(),
        };
        let meta = Meta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let mbytes = bincode::serialize(&meta).map_err(write_err)?;
        self.sm.save_snapshot(&mbytes, &data).map_err(|e| {
            RaftStorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e))
        })?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}
