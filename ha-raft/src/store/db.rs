//! A data dir's database: opened for one node of one cluster (and refused for another),
//! and released. The rest of the crate names it as [`Db`], never as sled's type, so the
//! engine can change behind this folder.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::records;
use crate::data::command::NodeId;
use crate::error::RaftBackendError;

/// A node's database handle.
pub type Db = sled::Db;

const IDENTITY: &[u8] = b"identity";

/// The data dir format this binary writes, and the newest it reads. Format 1 is ha
/// 0.1.0's, which has no format file; format 2 records the format in one. Both hold the
/// same database, so 1 becomes 2 by writing the file.
pub const DATA_DIR_FORMAT: u32 = 2;
/// The format a data dir records: `None` if it has no format file (a new dir, or one
/// of ha 0.1.0). A newer format than this binary's is refused before anything is opened.
fn recorded_format(dir: &Path) -> Result<Option<u32>, RaftBackendError> {
    let found = records::read(dir, records::FORMAT_FILE)?;
    match found {
        Some(found) if found > DATA_DIR_FORMAT => Err(RaftBackendError::NewerDataDir {
            dir: dir.display().to_string(),
            found,
            supported: DATA_DIR_FORMAT,
        }),
        found => Ok(found),
    }
}

/// Which node of which cluster a data directory belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The cluster id every member shares.
    pub cluster_id: String,
    /// This node's id.
    pub node_id: NodeId,
}

/// How long opening waits for a database another handle still holds.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Creates a new data dir readable by its owner only (it holds the group's state and
/// the guarded store), and refuses an existing one that holds anything but sled's files.
fn prepare_dir(dir: &Path) -> Result<(), RaftBackendError> {
    use std::os::unix::fs::DirBuilderExt;
    let storage = |e: std::io::Error| records::storage_error(dir, &e);
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(storage);
        }
        Err(e) => return Err(storage(e)),
    };
    for entry in entries {
        let name = entry.map_err(storage)?.file_name();
        let name = name.to_string_lossy();
        let sled_file = matches!(&*name, "conf" | "db" | "blobs")
            || name.starts_with("snap.")
            || records::is_record(&name);
        if !sled_file {
            return Err(RaftBackendError::NotADataDir {
                dir: dir.display().to_string(),
                found: name.into_owned(),
            });
        }
    }
    Ok(())
}

/// Opens (or creates) a node's database and checks it belongs to `identity`.
/// Waits up to 5 s while another handle still holds its lock.
///
/// # Errors
/// `Storage` if sled cannot open it, `ForeignDataDir` if it holds another cluster's or
/// node's data, `NotADataDir` if it holds files that are not sled's, `NewerDataDir` if
/// it records a newer format (nothing is opened then), `Corrupt` if its identity record
/// or format file does not decode. A dir of format 1 (ha 0.1.0) is upgraded to
/// [`DATA_DIR_FORMAT`] in place.
pub async fn open_db(
    dir: &Path,
    identity: &Identity,
    cache_bytes: u64,
) -> Result<Db, RaftBackendError> {
    prepare_dir(dir)?;
    let format = recorded_format(dir)?;
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        .mode(sled::Mode::LowSpace);
    // A node stopped in this process a moment ago may still be releasing the database:
    // the last handle can sit in a flush on tokio's blocking pool after `shutdown`
    // returns. Another process holding it
    // (the lock is released when a process dies) gets the same bounded wait.
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    let db = loop {
        match config.open() {
            Ok(db) => break db,
            // sled reports a held lock as kind `Other` with this text (config.rs), not
            // as `WouldBlock`: matching the kind alone never retried.
            Err(sled::Error::Io(e))
                if (e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock"))
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                return Err(RaftBackendError::Storage(format!(
                    "open {}: {e}",
                    dir.display()
                )))
            }
        }
    };
    let meta = db
        .open_tree("meta")
        .map_err(|e| RaftBackendError::Storage(e.to_string()))?;
    match meta
        .get(IDENTITY)
        .map_err(|e| RaftBackendError::Storage(e.to_string()))?
    {
        Some(bytes) => {
            let found: Identity = serde_json::from_slice(&bytes)
                .map_err(|e| RaftBackendError::Corrupt(format!("identity record: {e}")))?;
            if &found != identity {
                return Err(RaftBackendError::ForeignDataDir {
                    dir: dir.display().to_string(),
                    found: format!("node {} of cluster {:?}", found.node_id, found.cluster_id),
                    expected: format!(
                        "node {} of cluster {:?}",
                        identity.node_id, identity.cluster_id
                    ),
                });
            }
        }
        None => {
            let bytes = serde_json::to_vec(identity)
                .map_err(|e| RaftBackendError::Corrupt(e.to_string()))?;
            meta.insert(IDENTITY, bytes)
                .map_err(|e| RaftBackendError::Storage(e.to_string()))?;
            db.flush()
                .map_err(|e| RaftBackendError::Storage(e.to_string()))?;
        }
    }
    if format != Some(DATA_DIR_FORMAT) {
        records::write(dir, records::FORMAT_FILE, DATA_DIR_FORMAT)?;
        let from = format.map_or_else(|| "1 (or new)".to_owned(), |f| f.to_string());
        info!(dir = %dir.display(), from, to = DATA_DIR_FORMAT, "data dir format recorded");
    }
    Ok(db)
}

/// Drops a node's last database handle, which makes sled flush and unlock the data
/// dir. On a thread of its own, waited for at most 5 s: every acknowledged write was
/// flushed already, and sled 0.34's teardown flush can fail to return when it races a
/// snapshot write; that must not hang the runtime's shutdown.
pub(crate) async fn release_within_5s(db: Db, node: NodeId) {
    let (released, done) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("sled-release-{node}"))
        .spawn(move || {
            drop(db);
            let _ = released.send(());
        });
    if let Err(e) = spawned {
        warn!(node, error = %e, "no thread to release the database on; released in place");
        return;
    }
    if tokio::time::timeout(Duration::from_secs(5), done)
        .await
        .is_err()
    {
        error!(
            node,
            "the database was not released within 5 s; its data dir stays locked"
        );
    }
}

/// Drops a database on a blocking thread: sled flushes and unlocks it there.
pub(crate) async fn release(db: Db) {
    if let Err(e) = tokio::task::spawn_blocking(move || drop(db)).await {
        warn!(error = %e, "releasing a data dir");
    }
}
