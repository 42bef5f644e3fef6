//! Raft log and state machine in one sled database per node; this file has the log
//! store and what both stores share, `sled_machine.rs` the state machine store.
//!
//! Trees: `logs` (big-endian u64 index → JSON entry), `meta` (vote, committed, last
//! purged log id, node and cluster identity), `snapshot` (the latest snapshot). Every
//! write that openraft must find after a crash is flushed before it is acknowledged.
//! The state machine itself lives in memory and is rebuilt on start from the snapshot;
//! openraft re-applies the committed log after it.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, PoisonError};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::{Deserialize, Serialize};

use crate::data::command::{NodeId, TypeConfig};
use crate::data::level::{undecodable_entry, UndecodableEntry};
use crate::error::RaftBackendError;

pub(super) type StorageResult<T> = Result<T, StorageError<NodeId>>;

pub(crate) const VOTE: &[u8] = b"vote";
pub(crate) const COMMITTED: &[u8] = b"committed";
pub(crate) const LAST_PURGED: &[u8] = b"last_purged";
pub(crate) const SNAPSHOT: &[u8] = b"snapshot";

/// The typed cause of a storage error that stops the Raft core (openraft keeps only the
/// error's text), shared by a member's log and state machine stores.
#[derive(Debug, Clone, Default)]
pub struct FatalCause(Arc<Mutex<Option<RaftBackendError>>>);

impl FatalCause {
    /// Records `cause` (the first one stays) and returns it for openraft's error.
    pub(super) fn record(&self, cause: RaftBackendError) -> RaftBackendError {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert_with(|| cause.clone());
        cause
    }

    /// The recorded cause, if any.
    pub fn get(&self) -> Option<RaftBackendError> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

pub(super) fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

pub(super) fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

/// Flushes a tree to disk on tokio's blocking pool.
///
/// Not `Tree::flush_async`: in sled 0.34 its future holds a read guard of sled's
/// process-wide concurrency lock across an await. When `apply_batch` then waits for that
/// lock's write side on every runtime worker, the future is never polled again and the
/// process deadlocks (sled#1308). Seen here as a hung Raft fault-schedule run with 48
/// databases in one process; a synchronous flush on a blocking thread holds no guard
/// across an await.
async fn flush(tree: &sled::Tree) -> std::io::Result<()> {
    let tree = tree.clone();
    match tokio::task::spawn_blocking(move || tree.flush()).await {
        Ok(flushed) => flushed.map(|_| ()).map_err(std::io::Error::other),
        Err(join) => Err(std::io::Error::other(join)),
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

pub(super) fn get_json<T: for<'de> Deserialize<'de>>(
    tree: &sled::Tree,
    key: &[u8],
) -> StorageResult<Option<T>> {
    match tree.get(key).map_err(read_err)? {
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(read_err),
        None => Ok(None),
    }
}

pub(super) async fn put_json<T: Serialize>(
    tree: &sled::Tree,
    key: &[u8],
    value: &T,
) -> StorageResult<()> {
    let bytes = serde_json::to_vec(value).map_err(write_err)?;
    tree.insert(key, bytes).map_err(write_err)?;
    flush(tree).await.map_err(write_err)?;
    Ok(())
}

/// The Raft log (and vote) in sled.
#[derive(Debug, Clone)]
pub struct LogStore {
    logs: sled::Tree,
    meta: sled::Tree,
    /// Shared by every clone (openraft hands clones to its replication tasks), so the
    /// owner can tell when the last one is gone and the database is released.
    alive: Arc<()>,
    cause: FatalCause,
}

impl LogStore {
    /// The log store of an opened database.
    ///
    /// # Errors
    /// `Storage` if the trees cannot be opened.
    pub fn new(db: &sled::Db) -> Result<Self, RaftBackendError> {
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| RaftBackendError::Storage(e.to_string()))
        };
        Ok(Self {
            logs: tree("logs")?,
            meta: tree("meta")?,
            alive: Arc::new(()),
            cause: FatalCause::default(),
        })
    }

    /// Reports why an entry does not decode to `cause` (the state machine's).
    pub fn reporting_to(mut self, cause: FatalCause) -> Self {
        self.cause = cause;
        self
    }

    /// Tells, through a weak handle, whether any clone of this store still exists.
    pub fn liveness(&self) -> std::sync::Weak<()> {
        Arc::downgrade(&self.alive)
    }

    /// The entry stored under `key`; one that does not decode is told apart as an
    /// unknown command (a newer ha wrote it) or corrupt bytes.
    fn decode(&self, key: &[u8], bytes: &[u8]) -> StorageResult<Entry<TypeConfig>> {
        serde_json::from_slice(bytes).map_err(|e| {
            let index = key.try_into().map(u64::from_be_bytes).unwrap_or_default();
            let cause = match undecodable_entry(bytes, &e) {
                UndecodableEntry::UnknownCommand(name) => {
                    RaftBackendError::UnknownCommand { index, name }
                }
                UndecodableEntry::Corrupt(reason) => {
                    RaftBackendError::Corrupt(format!("log entry {index}: {reason}"))
                }
            };
            StorageIOError::read_log_at_index(index, &self.cause.record(cause)).into()
        })
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.logs
            .range::<[u8; 8], _>((start, end))
            .map(|item| {
                item.map_err(read_err)
                    .and_then(|(k, v)| self.decode(&k, &v))
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = get_json(&self.meta, LAST_PURGED)?;
        let last = match self.logs.last().map_err(read_err)? {
            Some((key, bytes)) => Some(self.decode(&key, &bytes)?.log_id),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        put_json(&self.meta, VOTE, vote).await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        get_json(&self.meta, VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Written, not flushed: the commit index only lets a restart re-apply sooner, and
        // a stale one is safe (the entries are durable; the leader re-announces the
        // index). It changes on every commit, so flushing it doubled the fsyncs of
        // every write on every node (throughput).
        let bytes = serde_json::to_vec(&committed).map_err(write_err)?;
        self.meta.insert(COMMITTED, bytes).map_err(write_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(get_json::<Option<LogId<NodeId>>>(&self.meta, COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(write_err)?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        self.logs.apply_batch(batch).map_err(write_err)?;
        // Durable before acknowledged: openraft counts this entry towards a quorum as soon
        // as the callback fires.
        let flushed = flush(&self.logs).await;
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for key in self.logs.range(index_key(log_id.index)..).keys() {
            batch.remove(key.map_err(write_err)?);
        }
        self.logs.apply_batch(batch).map_err(write_err)?;
        flush(&self.logs).await.map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Record the purge point first: after a crash mid-purge the log state must not
        // claim entries that are half gone.
        put_json(&self.meta, LAST_PURGED, &log_id).await?;
        let mut batch = sled::Batch::default();
        for key in self.logs.range(..=index_key(log_id.index)).keys() {
            batch.remove(key.map_err(write_err)?);
        }
        self.logs.apply_batch(batch).map_err(write_err)?;
        flush(&self.logs).await.map_err(write_err)?;
        Ok(())
    }
}
