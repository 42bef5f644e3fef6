//! The state machine store: the applied state in memory behind a lock, rebuilt on start
//! from the latest snapshot (kept in the `snapshot` tree), entries a member cannot apply
//! refused with a typed cause, and a raised group level recorded in the data dir.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::records;
use super::sled_store::{
    get_json, put_json, read_err, write_err, FatalCause, StorageResult, SNAPSHOT,
};
use crate::data::command::{CommandResult, NodeId, TypeConfig};
use crate::data::hub::{diff, Hub};
use crate::data::level::{command_name, recorded_by, required_level, FEATURE_LEVEL};
use crate::data::state::State;
use crate::error::RaftBackendError;

/// The latest snapshot as the `snapshot` tree holds it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoredSnapshot {
    pub(crate) meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    pub(crate) data: Vec<u8>,
}

/// The in-memory state machine with its watchers; what the node reads.
#[derive(Debug, Default)]
pub struct Machine {
    /// Leases, members, elections.
    pub state: State,
    /// Last applied log id.
    pub last_applied: Option<LogId<NodeId>>,
    /// Last applied membership.
    pub last_membership: StoredMembership<NodeId, openraft::BasicNode>,
    /// Watchers.
    pub hub: Hub,
}

impl Machine {
    /// The index of the last applied entry (0 if none).
    pub fn applied_index(&self) -> u64 {
        self.last_applied.map_or(0, |l| l.index)
    }
}

/// The state machine store: the applied state behind a lock, snapshots in sled.
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    shared: Arc<SmShared>,
}

#[derive(Debug)]
struct SmShared {
    machine: Mutex<Machine>,
    applied: watch::Sender<u64>,
    /// `None` after [`StateMachineStore::close`], so a stopped node releases its sled
    /// database (and the directory lock) even while handles to it remain.
    snapshots: Mutex<Option<sled::Tree>>,
    /// The data dir, where a raised group level is recorded (`store::records`), read
    /// at the next start before the database is opened. `None` in tests of the store.
    data_dir: Option<PathBuf>,
    /// The feature level this member serves.
    serves: u32,
    /// The group level recorded in this data dir when it was opened.
    recorded_at_open: u32,
    cause: FatalCause,
    /// One extra strong count per use of `snapshots` in progress: openraft builds
    /// snapshots in tasks of their own that outlive `Raft::shutdown`, and the node must
    /// not release the database under one of them (see `RaftNode::shutdown`).
    uses: Arc<()>,
}

/// The snapshot tree borrowed for one operation; counts as a use until dropped.
struct SnapshotTree {
    // Field order is drop order: the tree handle goes before the use ends.
    tree: sled::Tree,
    _use: Arc<()>,
}

impl StateMachineStore {
    /// The state machine of an opened database, restored from its latest snapshot,
    /// serving this binary's feature level.
    ///
    /// # Errors
    /// `Storage` or `Corrupt` if the snapshot cannot be read.
    pub fn new(db: &sled::Db) -> Result<Self, RaftBackendError> {
        Self::serving(db, FEATURE_LEVEL, None)
    }

    /// [`new`](Self::new) for a member serving feature level `serves`: an entry that
    /// needs more stops the Raft core with a typed cause instead of being applied. A
    /// raised group level is recorded in `data_dir` (if given) as well as in the state.
    ///
    /// # Errors
    /// `Storage` or `Corrupt` if the snapshot or the level record cannot be read.
    pub fn serving(
        db: &sled::Db,
        serves: u32,
        data_dir: Option<&Path>,
    ) -> Result<Self, RaftBackendError> {
        let snapshots = db
            .open_tree("snapshot")
            .map_err(|e| RaftBackendError::Storage(e.to_string()))?;
        let watermark = match data_dir {
            Some(dir) => records::group_level(dir)?,
            None => 0,
        };
        let mut machine = Machine::default();
        if let Some(stored) = get_json::<StoredSnapshot>(&snapshots, SNAPSHOT)
            .map_err(|e| RaftBackendError::Corrupt(format!("snapshot: {e}")))?
        {
            machine.state = serde_json::from_slice(&stored.data)
                .map_err(|e| RaftBackendError::Corrupt(format!("snapshot data: {e}")))?;
            machine.last_applied = stored.meta.last_log_id;
            machine.last_membership = stored.meta.last_membership;
            let restored = machine.applied_index();
            machine.hub.restored_at(restored);
        }
        let recorded_at_open = watermark.max(machine.state.level);
        let applied = watch::channel(machine.applied_index()).0;
        Ok(Self {
            shared: Arc::new(SmShared {
                machine: Mutex::new(machine),
                applied,
                snapshots: Mutex::new(Some(snapshots)),
                data_dir: data_dir.map(Path::to_path_buf),
                serves,
                recorded_at_open,
                cause: FatalCause::default(),
                uses: Arc::new(()),
            }),
        })
    }

    /// The feature level this member serves.
    pub fn serves(&self) -> u32 {
        self.shared.serves
    }

    /// The group's recorded feature level: the highest of what the data dir held when
    /// opened and what was applied since (0: none recorded).
    pub fn recorded_level(&self) -> u32 {
        self.shared.recorded_at_open.max(self.lock().state.level)
    }

    /// Where a typed cause of a stop is recorded; the log store reports to it too.
    pub fn fatal_cause(&self) -> FatalCause {
        self.shared.cause.clone()
    }

    /// Refuses an entry this member cannot apply, before anything of it is applied.
    fn check_level(
        &self,
        index: u64,
        command: &crate::data::command::Command,
    ) -> Result<(), RaftBackendError> {
        let needs = required_level(command);
        if needs <= self.shared.serves {
            return Ok(());
        }
        Err(self
            .shared
            .cause
            .record(RaftBackendError::UnsupportedCommand {
                index,
                command: command_name(command).to_owned(),
                needs,
                serves: self.shared.serves,
            }))
    }

    /// Records a raised group level in the data dir, synced, so a member below it
    /// refuses to start before its database is even opened.
    async fn record_level(&self, level: u32) -> StorageResult<()> {
        let Some(dir) = self.shared.data_dir.clone() else {
            return Ok(());
        };
        match tokio::task::spawn_blocking(move || records::raise_group_level(&dir, level)).await {
            Ok(recorded) => recorded.map_err(write_err),
            Err(join) => Err(write_err(std::io::Error::other(join))),
        }
    }

    /// Locks the machine for a read or a subscription.
    pub fn lock(&self) -> MutexGuard<'_, Machine> {
        self.shared
            .machine
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Follows the applied index.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.shared.applied.subscribe()
    }

    /// Releases the sled tree; later snapshot operations fail. Operations already under
    /// way finish; [`in_use`](Self::in_use) tells when they have.
    pub fn close(&self) {
        self.shared
            .snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Whether a snapshot operation (which holds the sled tree) is still under way.
    pub fn in_use(&self) -> bool {
        Arc::strong_count(&self.shared.uses) > 1
    }

    fn snapshots(&self) -> StorageResult<SnapshotTree> {
        let tree = self
            .shared
            .snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| read_err(std::io::Error::other("state machine store is closed")))?;
        Ok(SnapshotTree {
            tree,
            _use: Arc::clone(&self.shared.uses),
        })
    }

    fn notify_applied(&self, index: u64) {
        self.shared.applied.send_if_modified(|current| {
            if index > *current {
                *current = index;
                true
            } else {
                false
            }
        });
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (data, meta) = {
            let machine = self.lock();
            let data = serde_json::to_vec(&machine.state).map_err(read_err)?;
            let snapshot_id = match machine.last_applied {
                Some(last) => format!("{}-{}", last.leader_id, last.index),
                None => "empty".to_owned(),
            };
            let meta = SnapshotMeta {
                last_log_id: machine.last_applied,
                last_membership: machine.last_membership.clone(),
                snapshot_id,
            };
            (data, meta)
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        put_json(&self.snapshots()?.tree, SNAPSHOT, &stored).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<NodeId>>,
        StoredMembership<NodeId, openraft::BasicNode>,
    )> {
        let machine = self.lock();
        Ok((machine.last_applied, machine.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        // Every entry is checked before any is applied, and a raised level reaches the
        // data dir before the state: no snapshot can hold a level its dir does not.
        let mut raised = None;
        for entry in &entries {
            if let EntryPayload::Normal(command) = &entry.payload {
                if let Err(cause) = self.check_level(entry.log_id.index, command) {
                    return Err(StorageIOError::apply(entry.log_id, &cause).into());
                }
                raised = raised.max(recorded_by(command));
            }
        }
        if let Some(level) = raised.filter(|level| *level > self.recorded_level()) {
            self.record_level(level).await?;
            tracing::info!(level, "the group's feature level was raised");
        }
        let mut results = Vec::new();
        let last = {
            let mut machine = self.lock();
            for entry in entries {
                machine.last_applied = Some(entry.log_id);
                let result = match entry.payload {
                    EntryPayload::Blank => CommandResult::None,
                    EntryPayload::Normal(command) => {
                        let (result, changes) = machine.state.apply(entry.log_id.index, &command);
                        machine.hub.publish(entry.log_id.index, changes);
                        result
                    }
                    EntryPayload::Membership(membership) => {
                        machine.last_membership =
                            StoredMembership::new(Some(entry.log_id), membership);
                        CommandResult::None
                    }
                };
                results.push(result);
            }
            machine.applied_index()
        };
        self.notify_applied(last);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        let state: State = serde_json::from_slice(&stored.data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        if state.level > self.shared.serves {
            let cause = self.shared.cause.record(RaftBackendError::BelowGroupLevel {
                serves: self.shared.serves,
                group: state.level,
            });
            return Err(StorageIOError::read_snapshot(Some(meta.signature()), &cause).into());
        }
        if state.level > 0 {
            self.record_level(state.level).await?;
        }
        put_json(&self.snapshots()?.tree, SNAPSHOT, &stored).await?;
        let index = {
            let mut machine = self.lock();
            let changes = diff(&machine.state, &state);
            machine.state = state;
            machine.last_applied = meta.last_log_id;
            machine.last_membership = meta.last_membership.clone();
            let index = machine.applied_index();
            machine.hub.restored_at(index);
            machine.hub.publish(index, changes);
            index
        };
        self.notify_applied(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(
            get_json::<StoredSnapshot>(&self.snapshots()?.tree, SNAPSHOT)?.map(|stored| Snapshot {
                meta: stored.meta,
                snapshot: Box::new(Cursor::new(stored.data)),
            }),
        )
    }
}
