//! Backups and recovery. A snapshot file holds the group's whole state as of a
//! linearizable read (`ha snapshot save`); a new group's data dirs are built from one
//! (`ha snapshot restore`); and a member that survived the loss of its quorum becomes a
//! single-voter group from its own data (`ha node --force-new-group`). All three end in
//! the same place: a data dir whose snapshot is the state, whose log is empty up to the
//! state's last entry, and whose membership is the new voters. New entries take indexes
//! after that entry, and new lease ids and fencing tokens are above both it and the
//! state's last id: tokens never go back.
//!
//! The file: one JSON line, the [`SnapshotHeader`], then the state's bytes, which the
//! header's length and CRC-32 cover.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{LogId, RaftLogReader};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::admin::AdminError;
use crate::command::NodeId;
use crate::config::RaftNodeConfig;
use crate::error::RaftBackendError;
use crate::image::{write_image, GroupImage};
use crate::state::State;
use crate::storage::{open_db, Identity, LogStore, StateMachineStore};

/// The format name a snapshot file's header carries. `/2` states carry `last_id`, which
/// a version reading only `/1` would drop (and then hand out ids again).
pub const SNAPSHOT_FORMAT: &str = "ha-raft-snapshot/2";

/// The formats this version reads: `/1` states have no `last_id`, and every id in them
/// is at most their last log index.
const READABLE_FORMATS: [&str; 2] = ["ha-raft-snapshot/1", SNAPSHOT_FORMAT];
/// The largest state a snapshot file may hold.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;
/// The longest header line read.
const MAX_HEADER_BYTES: u64 = 64 << 10;
/// State bytes per streamed message.
pub(crate) const CHUNK_BYTES: usize = 1 << 20;

/// What a snapshot file says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// Always [`SNAPSHOT_FORMAT`].
    pub format: String,
    /// The cluster id of the group it was taken from.
    pub cluster_id: String,
    /// The last log entry the state includes.
    pub last_log_id: LogId<NodeId>,
    /// The node that served it.
    pub taken_by: NodeId,
    /// When, in milliseconds since the Unix epoch.
    pub taken_at_unix_ms: u64,
    /// The length of the state that follows the header.
    pub state_bytes: u64,
    /// The CRC-32 (IEEE) of those bytes.
    pub crc32: u32,
    /// Sessions (leases) in the state.
    pub sessions: usize,
    /// Elections with at least one candidate.
    pub elections: usize,
    /// Keys across the guarded stores.
    pub keys: usize,
}

impl SnapshotHeader {
    /// The log index the state is as of: new tokens start above it (and above every
    /// token in the state).
    pub fn index(&self) -> u64 {
        self.last_log_id.index
    }

    /// The Raft term of that entry.
    pub fn term(&self) -> u64 {
        self.last_log_id.leader_id.term
    }

    /// The header of `state` (JSON, as snapshots hold it) as of `last_log_id`.
    pub(crate) fn describe(
        cluster_id: &str,
        taken_by: NodeId,
        last_log_id: LogId<NodeId>,
        state: &State,
        bytes: &[u8],
    ) -> Self {
        Self {
            format: SNAPSHOT_FORMAT.to_owned(),
            cluster_id: cluster_id.to_owned(),
            last_log_id,
            taken_by,
            taken_at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            state_bytes: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
            sessions: state.leases.len(),
            elections: state.elections.values().filter(|q| !q.is_empty()).count(),
            keys: state.kv.values().map(BTreeMap::len).sum(),
        }
    }
}

/// Why a backup or a recovery failed. Nothing was changed unless the variant says so.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// Reading or writing a file failed.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The file is not a snapshot of this format, or its state does not decode.
    #[error("{path} is not an ha snapshot: {reason}")]
    NotASnapshot {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The state's bytes differ from what the header says: the file is damaged.
    #[error("{path} fails its checksum: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Length or CRC, expected and found.
        reason: String,
    },
    /// The state is larger than a snapshot may be.
    #[error("a snapshot of {bytes} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// Its size.
        bytes: u64,
        /// [`MAX_SNAPSHOT_BYTES`].
        limit: u64,
    },
    /// The snapshot is of another cluster than the one asked for.
    #[error("the snapshot is of cluster {found:?}, not {expected:?} (pass --allow-other-cluster to restore it as {expected:?})")]
    OtherCluster {
        /// In the file.
        found: String,
        /// Asked for.
        expected: String,
    },
    /// The data dir to build already holds something.
    #[error("{dir} is not empty; a restore builds a new data dir")]
    DataDirNotEmpty {
        /// The directory.
        dir: PathBuf,
    },
    /// The node is not among the voters it is to be restored as one of.
    #[error("node {id} is not in the peers {peers:?}")]
    NotAPeer {
        /// The node.
        id: NodeId,
        /// The voters given.
        peers: Vec<NodeId>,
    },
    /// The data dir holds no state to recover.
    #[error("{dir} holds no Raft state to recover")]
    NothingToRecover {
        /// The directory.
        dir: PathBuf,
    },
    /// The data dir could not be opened or written (another group's, a node still
    /// running on it, a storage failure).
    #[error(transparent)]
    Storage(#[from] RaftBackendError),
    /// The group did not serve the snapshot.
    #[error(transparent)]
    Admin(#[from] AdminError),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Writes a snapshot file as its parts arrive: to `FILE.partial`, renamed to `FILE`
/// only once the length and checksum match the header and the bytes are on disk.
pub(crate) struct SnapshotWriter {
    path: PathBuf,
    partial: PathBuf,
    file: std::fs::File,
    header: SnapshotHeader,
    crc: crc32fast::Hasher,
    written: u64,
}

impl SnapshotWriter {
    pub(crate) fn create(path: &Path, header: SnapshotHeader) -> Result<Self, BackupError> {
        if !READABLE_FORMATS.contains(&header.format.as_str()) {
            return Err(BackupError::NotASnapshot {
                path: path.to_path_buf(),
                reason: format!("the group sent format {:?}", header.format),
            });
        }
        if header.state_bytes > MAX_SNAPSHOT_BYTES {
            return Err(BackupError::TooLarge {
                bytes: header.state_bytes,
                limit: MAX_SNAPSHOT_BYTES,
            });
        }
        let mut name = path.as_os_str().to_owned();
        name.push(".partial");
        let partial = PathBuf::from(name);
        let mut file = std::fs::File::create(&partial).map_err(io(&partial))?;
        let mut line = serde_json::to_vec(&header).map_err(|e| BackupError::Io {
            path: partial.clone(),
            reason: e.to_string(),
        })?;
        line.push(b'\n');
        file.write_all(&line).map_err(io(&partial))?;
        Ok(Self {
            path: path.to_path_buf(),
            partial,
            file,
            header,
            crc: crc32fast::Hasher::new(),
            written: 0,
        })
    }

    pub(crate) fn write(&mut self, chunk: &[u8]) -> Result<(), BackupError> {
        self.written += chunk.len() as u64;
        if self.written > self.header.state_bytes {
            return Err(self.damaged(format!(
                "more than the {} bytes announced arrived",
                self.header.state_bytes
            )));
        }
        self.crc.update(chunk);
        self.file.write_all(chunk).map_err(io(&self.partial))
    }

    pub(crate) fn finish(self) -> Result<SnapshotHeader, BackupError> {
        if self.written != self.header.state_bytes {
            let reason = format!(
                "{} of {} bytes arrived",
                self.written, self.header.state_bytes
            );
            return Err(self.damaged(reason));
        }
        let crc = self.crc.clone().finalize();
        if crc != self.header.crc32 {
            let reason = format!("CRC {crc:08x}, the header says {:08x}", self.header.crc32);
            return Err(self.damaged(reason));
        }
        self.file.sync_all().map_err(io(&self.partial))?;
        std::fs::rename(&self.partial, &self.path).map_err(io(&self.path))?;
        Ok(self.header.clone())
    }

    fn damaged(&self, reason: String) -> BackupError {
        let _ = std::fs::remove_file(&self.partial);
        BackupError::Damaged {
            path: self.path.clone(),
            reason,
        }
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        // A transfer that did not finish leaves no partial file behind.
        if self.partial.exists() && !self.path.exists() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Reads and checks a snapshot file: its header, its length and checksum, and that
/// its state decodes. Returns the header and the state's bytes.
///
/// # Errors
/// `Io`, `NotASnapshot`, `Damaged` or `TooLarge`, naming the file.
pub fn read_snapshot_file(path: &Path) -> Result<(SnapshotHeader, Vec<u8>), BackupError> {
    let not_a_snapshot = |reason: String| BackupError::NotASnapshot {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    (&mut reader)
        .take(MAX_HEADER_BYTES)
        .read_until(b'\n', &mut line)
        .map_err(io(path))?;
    if line.last() != Some(&b'\n') {
        return Err(not_a_snapshot(format!(
            "no header line in its first {MAX_HEADER_BYTES} bytes"
        )));
    }
    let header: SnapshotHeader =
        serde_json::from_slice(&line).map_err(|e| not_a_snapshot(format!("header: {e}")))?;
    if !READABLE_FORMATS.contains(&header.format.as_str()) {
        return Err(not_a_snapshot(format!(
            "format {:?}, this version reads {READABLE_FORMATS:?}",
            header.format
        )));
    }
    if header.state_bytes > MAX_SNAPSHOT_BYTES {
        return Err(BackupError::TooLarge {
            bytes: header.state_bytes,
            limit: MAX_SNAPSHOT_BYTES,
        });
    }
    let mut state = Vec::new();
    // One byte more than announced, to tell a longer file from an exact one.
    (&mut reader)
        .take(header.state_bytes + 1)
        .read_to_end(&mut state)
        .map_err(io(path))?;
    let damaged = |reason: String| BackupError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    if state.len() as u64 != header.state_bytes {
        return Err(damaged(format!(
            "{} state bytes where the header says {}",
            if state.len() as u64 > header.state_bytes {
                "more".to_owned()
            } else {
                state.len().to_string()
            },
            header.state_bytes
        )));
    }
    let crc = crc32fast::hash(&state);
    if crc != header.crc32 {
        return Err(damaged(format!(
            "CRC {crc:08x}, the header says {:08x}",
            header.crc32
        )));
    }
    serde_json::from_slice::<State>(&state)
        .map_err(|e| not_a_snapshot(format!("the state does not decode: {e}")))?;
    Ok((header, state))
}

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

async fn force_in(db: &sled::Db, config: &RaftNodeConfig) -> Result<ForcedGroup, BackupError> {
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

impl crate::node::NodeInner {
    /// The group's state as of a linearizable read, encoded, with its header.
    pub(crate) async fn snapshot_image(&self) -> Result<(SnapshotHeader, Vec<u8>), AdminError> {
        let unavailable = |e: ha_core::Error| AdminError::Unavailable(e.to_string());
        let index = self.read_index().await.map_err(unavailable)?;
        let image = self
            .read_at(index, |machine| {
                let last = machine.last_applied?;
                Some(serde_json::to_vec(&machine.state).map(|bytes| {
                    let header = SnapshotHeader::describe(
                        self.cluster_id(),
                        self.config.id,
                        last,
                        &machine.state,
                        &bytes,
                    );
                    (header, bytes)
                }))
            })
            .await
            .map_err(unavailable)?;
        match image {
            None => Err(AdminError::Unavailable(
                "the group has applied nothing yet".into(),
            )),
            Some(Err(e)) => Err(AdminError::Raft(format!("encode the state: {e}"))),
            Some(Ok((header, bytes))) if header.state_bytes > MAX_SNAPSHOT_BYTES => {
                Err(AdminError::InvalidArgument(format!(
                    "the state is {} bytes, over the snapshot limit of {MAX_SNAPSHOT_BYTES}",
                    bytes.len()
                )))
            }
            Some(Ok((header, bytes))) => Ok((header, bytes)),
        }
    }
}

/// Drops a database on a blocking thread: sled flushes and unlocks it there.
async fn release(db: sled::Db) {
    if let Err(e) = tokio::task::spawn_blocking(move || drop(db)).await {
        warn!(error = %e, "releasing a data dir");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_for(state: &[u8]) -> SnapshotHeader {
        let parsed: State = serde_json::from_slice(state).unwrap_or_default();
        SnapshotHeader::describe(
            "c",
            1,
            LogId::new(openraft::CommittedLeaderId::new(3, 1), 42),
            &parsed,
            state,
        )
    }

    fn write_file(path: &Path, state: &[u8]) -> SnapshotHeader {
        let mut writer = SnapshotWriter::create(path, header_for(state))
            .unwrap_or_else(|e| panic!("create: {e}"));
        for chunk in state.chunks(7) {
            writer.write(chunk).unwrap_or_else(|e| panic!("write: {e}"));
        }
        writer.finish().unwrap_or_else(|e| panic!("finish: {e}"))
    }

    #[test]
    fn a_written_file_reads_back_and_a_flipped_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("s.snap");
        let state = serde_json::to_vec(&State::default()).unwrap_or_else(|e| panic!("encode: {e}"));
        let header = write_file(&path, &state);
        let (read, bytes) = read_snapshot_file(&path).unwrap_or_else(|e| panic!("read: {e}"));
        assert_eq!((read, bytes), (header, state));
        let mut raw = std::fs::read(&path).unwrap_or_else(|e| panic!("raw: {e}"));
        let last = raw.len() - 2;
        raw[last] ^= 0x20;
        std::fs::write(&path, &raw).unwrap_or_else(|e| panic!("damage: {e}"));
        let error = read_snapshot_file(&path)
            .err()
            .unwrap_or_else(|| panic!("damaged: no error"));
        assert!(matches!(error, BackupError::Damaged { .. }), "{error}");
        raw.push(b' ');
        std::fs::write(&path, &raw).unwrap_or_else(|e| panic!("lengthen: {e}"));
        assert!(matches!(
            read_snapshot_file(&path),
            Err(BackupError::Damaged { .. })
        ));
        std::fs::write(&path, b"not a snapshot at all").unwrap_or_else(|e| panic!("garbage: {e}"));
        assert!(matches!(
            read_snapshot_file(&path),
            Err(BackupError::NotASnapshot { .. })
        ));
    }

    #[test]
    fn a_short_transfer_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("s.snap");
        let state = serde_json::to_vec(&State::default()).unwrap_or_else(|e| panic!("encode: {e}"));
        let mut writer = SnapshotWriter::create(&path, header_for(&state))
            .unwrap_or_else(|e| panic!("create: {e}"));
        writer
            .write(&state[..2])
            .unwrap_or_else(|e| panic!("write: {e}"));
        let error = writer
            .finish()
            .err()
            .unwrap_or_else(|| panic!("short: no error"));
        assert!(matches!(error, BackupError::Damaged { .. }), "{error}");
        assert_eq!(
            std::fs::read_dir(dir.path())
                .unwrap_or_else(|e| panic!("ls: {e}"))
                .count(),
            0
        );
    }

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
