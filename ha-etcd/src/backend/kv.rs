//! Guarded writes: the write and its guard (the writer still heads the election) in
//! one etcd transaction.

use bytes::Bytes;
use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse,
};
use ha_core::{Error, FencingToken, KvWrite, KvWriteOutcome, LeaderKey, Result};

use crate::error::map;
use crate::keys;

use super::{token_i64, EtcdBackend};

impl EtcdBackend {
    /// `kv_write` of the contract.
    pub(super) async fn guarded_write(
        &self,
        guard: &LeaderKey,
        write: KvWrite,
    ) -> Result<KvWriteOutcome> {
        self.config.kv_limits.check(&write)?;
        let prefix = self.prefix();
        let candidate = keys::candidate_key(prefix, &guard.election, guard.lease);
        let election = keys::election_prefix(prefix, &guard.election);
        let key = keys::kv_key(prefix, &guard.election, write.key());
        let token = token_i64(guard.token)?;
        // The guard, in the same transaction as the write: the writer's key exists with
        // its token as create revision, and no candidate key of the election is older,
        // so it heads the queue (etcd's range compare checks every key under the prefix).
        let guard_holds = vec![
            Compare::create_revision(candidate.as_str(), CompareOp::Equal, token),
            Compare::create_revision(election.as_str(), CompareOp::Greater, token - 1)
                .with_prefix(),
        ];
        let write_op = match &write {
            KvWrite::Put { value, .. } => TxnOp::put(
                key.as_str(),
                value.to_vec(),
                Some(PutOptions::new().with_prev_key()),
            ),
            KvWrite::Delete { .. } => {
                TxnOp::delete(key.as_str(), Some(DeleteOptions::new().with_prev_key()))
            }
            KvWrite::CompareAndSet { expected, new, .. } => {
                let matches = match expected {
                    Some(value) => Compare::value(key.as_str(), CompareOp::Equal, value.to_vec()),
                    None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                };
                let set = match new {
                    Some(value) => TxnOp::put(
                        key.as_str(),
                        value.to_vec(),
                        Some(PutOptions::new().with_prev_key()),
                    ),
                    None => TxnOp::delete(key.as_str(), Some(DeleteOptions::new().with_prev_key())),
                };
                TxnOp::txn(
                    Txn::new()
                        .when(vec![matches])
                        .and_then(vec![set])
                        .or_else(vec![TxnOp::get(key.as_str(), None)]),
                )
            }
        };
        let current_head = TxnOp::get(
            election.as_str(),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_limit(1),
            ),
        );
        let txn = Txn::new()
            .when(guard_holds)
            .and_then(vec![write_op])
            .or_else(vec![current_head]);
        // Never repeated: a repeat of an applied compare-and-set would read as a mismatch.
        let response = self
            .request_once("kv_write", |mut client| {
                let write = &write;
                async move {
                    client
                        .txn(txn)
                        .await
                        .map_err(|error| kv_error(error, write))
                }
            })
            .await?;
        let mut results = response.op_responses().into_iter();
        if !response.succeeded() {
            let current = match results.next() {
                Some(TxnOpResponse::Get(get)) => get
                    .kvs()
                    .first()
                    .map(|kv| FencingToken::new(kv.create_revision() as u64)),
                _ => None,
            };
            return Err(Error::NotLeader {
                election: guard.election.clone(),
                current,
            });
        }
        let outcome = match results.next() {
            Some(TxnOpResponse::Put(put)) => KvWriteOutcome {
                applied: true,
                previous: put.prev_key().map(|kv| Bytes::copy_from_slice(kv.value())),
            },
            Some(TxnOpResponse::Delete(delete)) => deleted(&delete),
            Some(TxnOpResponse::Txn(cas)) => {
                let applied = cas.succeeded();
                let previous = match cas.op_responses().into_iter().next() {
                    Some(TxnOpResponse::Put(put)) => {
                        put.prev_key().map(|kv| Bytes::copy_from_slice(kv.value()))
                    }
                    Some(TxnOpResponse::Delete(delete)) => deleted(&delete).previous,
                    Some(TxnOpResponse::Get(get)) => get
                        .kvs()
                        .first()
                        .map(|kv| Bytes::copy_from_slice(kv.value())),
                    _ => None,
                };
                KvWriteOutcome { applied, previous }
            }
            other => {
                return Err(Error::Backend {
                    backend: "etcd",
                    source: format!("unexpected transaction response {other:?}").into(),
                })
            }
        };
        Ok(outcome)
    }
}

/// A guarded delete's outcome: applied when a key was there.
fn deleted(delete: &etcd_client::DeleteResponse) -> KvWriteOutcome {
    let previous = delete
        .prev_kvs()
        .first()
        .map(|kv| Bytes::copy_from_slice(kv.value()));
    KvWriteOutcome {
        applied: delete.deleted() > 0,
        previous,
    }
}

/// Maps a failed guarded write: etcd's own request-size limit becomes `TooLarge`.
fn kv_error(error: etcd_client::Error, write: &KvWrite) -> Error {
    if let etcd_client::Error::GRpcStatus(status) = &error {
        if status.message().contains("request is too large") {
            let size = match write {
                KvWrite::Put { value, .. } => value.len(),
                KvWrite::Delete { .. } => 0,
                KvWrite::CompareAndSet { expected, new, .. } => {
                    expected.as_ref().map_or(0, Bytes::len) + new.as_ref().map_or(0, Bytes::len)
                }
            };
            return Error::TooLarge {
                what: "value",
                size,
                // etcd's --max-request-bytes default.
                limit: 3 << 19,
            };
        }
    }
    map(error)
}
