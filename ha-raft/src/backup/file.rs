//! The snapshot file: one JSON line, the [`SnapshotHeader`], then the state's bytes,
//! which the header's length and CRC-32 cover. Written crash-safely, read with every
//! size bounded.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use openraft::LogId;
use serde::{Deserialize, Serialize};

use crate::admin::AdminError;
use crate::data::command::NodeId;
use crate::data::state::State;
use crate::error::RaftBackendError;

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

pub(super) fn io(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
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

#[cfg(test)]
pub(crate) mod tests {
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

    pub(crate) fn write_file(path: &Path, state: &[u8]) -> SnapshotHeader {
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
}
