//! Building data dirs from a snapshot file (`ha snapshot restore`), and the last resort
//! after a lost quorum: a member's own data as a single-voter group
//! (`ha node --force-new-group`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::RaftLogReader;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::file::{io, read_snapshot_file, BackupError, SnapshotHeader};
use crate::config::RaftNodeConfig;
use crate::data::command::NodeId;
use crate::error::RaftBackendError;
use crate::store::db::{open_db, release, Db, Identity};
use crate::store::image::{write_image, GroupImage};
use crate::store::sled_machine::StateMachineStore;
use crate::store::sled_store::LogStore;

/// How to build a data dir from a snapshot file.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The data dir to create (absent or empty).
    pub data_dir: PathBuf,
    /// The node it is for.
    pub id: NodeId,
    /// The new group's voters, id → address (the node among them).
    pub peers: BTreeMap<NodeId, String>,
    /// The new group's cluster id; `None`: the snapshot's.
    pub cluster_id: Option<String>,
    /// Restore a snapshot of another cluster id as `cluster_id`.
    pub allow_other_cluster: bool,
}

/// Builds a data dir for one voter of a new group from a snapshot file. Run it for
/// every voter with the same file and peers, then start each with `ha node` as usual:
/// the voters elect a leader among themselves and continue from the snapshot.
///
/// # Errors
/// The file's errors from [`read_snapshot_file`], `OtherCluster`, `NotAPeer`,
/// `DataDirNotEmpty`, or `Storage`. The data dir is not created unless all checks pass.
pub async fn restore(file: &Path, options: &RestoreOptions) -> Result<SnapshotHeader, BackupError> {
    let (header, state) = read_snapshot_file(file)?;
    let cluster_id = options
        .cluster_id
        .clone()
        .unwrap_or_else(|| header.cluster_id.clone());
    if cluster_id != header.cluster_id && !options.allow_other_cluster {
        return Err(BackupError::OtherCluster {
            found: header.cluster_id,
            expected: cluster_id,
        });
    }
    if !options.peers.contains_key(&options.id) {
        return Err(BackupError::NotAPeer {
            id: options.id,
            peers: options.peers.keys().copied().collect(),
        });
    }
    let dir = &options.data_dir;
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::DataDirNotEmpty { dir: dir.clone() });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(dir)(e)),
    }
    let identity = Identity {
        cluster_id,
        node_id: options.id,
    };
    let db = open_db(dir, &identity, 4 << 20).await?;
    let image = GroupImage {
        state: &state,
        last_log_id: header.last_log_id,
        voters: &options.peers,
        term: header.term(),
    };
    let written = write_image(&db, options.id, &image);
    release(db).await;
    written?;
    info!(
        node = options.id,
        index = header.index(),
        dir = %dir.display(),
        "data dir restored from a snapshot"
    );
    Ok(header)
}

/// What [`force_new_group`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForcedGroup {
    /// False when the node already was the only voter (a restart with the flag left
    /// on): nothing was rewritten.
    pub changed: bool,
    /// The last entry kept: every entry this node held, committed or not.
    pub last_index: u64,
    /// The members dropped from the membership, id → address.
    pub dropped: BTreeMap<NodeId, String>,
}

/// Makes a node's data dir that of a single-voter group: its state (the snapshot and
/// every entry in its log, including entries the group may never have committed), with
/// itself as the only voter. The last resort after losing a quorum for good: entries
/// only the lost members held are gone, and the lost members must never run again with
/// their old data dirs (two of them would still form a quorum of the old group). Call
/// before [`RaftNode::start`](crate::RaftNode::start) with the same configuration.
///
/// # Errors
/// `Storage` (another group's data dir, a node still running on it), or
/// `NothingToRecover` for a data dir without state.
pub async fn force_new_group(config: &RaftNodeConfig) -> Result<ForcedGroup, BackupError> {
    let identity = Identity {
        cluster_id: config.cluster_id.clone(),
        node_id: config.id,
    };
    let db = open_db(&config.data_dir, &identity, config.cache_capacity).await?;
    let forced = force_in(&db, config).await;
    release(db).await;
    forced
}

async fn force_in(db: &Db, config: &RaftNodeConfig) -> Result<ForcedGroup, BackupError> {
    let storage = |e: openraft::StorageError<NodeId>| RaftBackendError::Storage(e.to_string());
    let mut log = LogStore::new(db)?;
    let mut sm = StateMachineStore::new(db)?;
    let applied = sm.lock().last_applied;
    let from = applied.map_or(0, |l| l.index + 1);
    let entries = log.try_get_log_entries(from..).await.map_err(storage)?;
    let last_log_id = entries
        .last()
        .map(|e| e.log_id)
        .or(applied)
        .ok_or_else(|| BackupError::NothingToRecover {
            dir: config.data_dir.clone(),
        })?;
    // Like etcd's --force-new-cluster, everything this member holds counts as
    // committed: it is the only copy of the group left.
    sm.apply(entries).await.map_err(storage)?;
    let (state, membership) = {
        let machine = sm.lock();
        let state = serde_json::to_vec(&machine.state)
            .map_err(|e| RaftBackendError::Storage(e.to_string()))?;
        (state, machine.last_membership.membership().clone())
    };
    let mut members: BTreeMap<NodeId, String> = membership
        .nodes()
        .map(|(id, node)| (*id, node.addr.clone()))
        .collect();
    let only_voter = membership.voter_ids().eq([config.id]) && members.len() == 1;
    if only_voter {
        return Ok(ForcedGroup {
            changed: false,
            last_index: last_log_id.index,
            dropped: BTreeMap::new(),
        });
    }
    members.remove(&config.id);
    let vote_term = log
        .read_vote()
        .await
        .map_err(storage)?
        .map_or(0, |v| v.leader_id.term);
    let voters = BTreeMap::from([(config.id, config.advertised())]);
    let image = GroupImage {
        state: &state,
        last_log_id,
        voters: &voters,
        term: vote_term,
    };
    drop((log, sm));
    write_image(db, config.id, &image)?;
    warn!(
        node = config.id,
        index = last_log_id.index,
        dropped = ?members.keys().collect::<Vec<_>>(),
        "forced a new single-voter group from this node's data"
    );
    Ok(ForcedGroup {
        changed: true,
        last_index: last_log_id.index,
        dropped: members,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::file::tests::write_file;
    use crate::data::state::State;

    #[tokio::test]
    async fn restore_refuses_another_cluster_and_a_used_dir() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("s.snap");
        let state = serde_json::to_vec(&State::default()).unwrap_or_else(|e| panic!("encode: {e}"));
        write_file(&path, &state);
        let mut options = RestoreOptions {
            data_dir: dir.path().join("data"),
            id: 1,
            peers: BTreeMap::from([(1, "127.0.0.1:1".to_owned())]),
            cluster_id: Some("other".into()),
            allow_other_cluster: false,
        };
        let error = restore(&path, &options)
            .await
            .err()
            .unwrap_or_else(|| panic!("other cluster: no error"));
        assert!(matches!(error, BackupError::OtherCluster { .. }), "{error}");
        options.id = 2;
        options.cluster_id = None;
        let error = restore(&path, &options)
            .await
            .err()
            .unwrap_or_else(|| panic!("not a peer: no error"));
        assert!(matches!(error, BackupError::NotAPeer { .. }), "{error}");
        assert!(!options.data_dir.exists(), "nothing was created");
        options.id = 1;
        restore(&path, &options)
            .await
            .unwrap_or_else(|e| panic!("restore: {e}"));
        let error = restore(&path, &options)
            .await
            .err()
            .unwrap_or_else(|| panic!("used: no error"));
        assert!(
            matches!(error, BackupError::DataDirNotEmpty { .. }),
            "{error}"
        );
    }
}
