//! `EtcdBackend`: the contract on etcd leases, transactions and watches.

mod campaign;
pub(crate) mod connect;
mod endpoints;
mod keepalive;
mod kv;
mod request;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
};
use ha_core::watch_buffer::{self, WATCH_BUFFER};
use ha_core::{
    Backend, Capabilities, ElectionName, Error, FencingToken, KvKey, KvWrite, KvWriteOutcome,
    Leader, LeaderKey, LeaderStream, Lease, LeaseId, Member, MemberStream, RecordLimits, Result,
    Role, ServerId, WithdrawOnDrop,
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::config::{EtcdConfig, MIN_TTL};
use crate::error::{is_lease_not_found, map, EtcdBackendError};
use crate::keys;

use endpoints::Endpoints;
use keepalive::Keeper;
use watch::{follow_election, follow_members};

/// A member record as stored in etcd.
#[derive(Debug, Serialize, Deserialize)]
struct MemberRecord {
    server_id: u64,
    role: String,
    address: String,
    metadata: BTreeMap<String, String>,
}

impl MemberRecord {
    fn of(member: &Member) -> Self {
        Self {
            server_id: member.server_id.get(),
            role: member.role.as_str().to_owned(),
            address: member.address.clone(),
            metadata: member.metadata.clone(),
        }
    }

    fn decode(kv: &KeyValue) -> Result<Member> {
        let corrupt = |reason: String| -> Error {
            Error::Backend {
                backend: "etcd",
                source: Box::new(EtcdBackendError::Corrupt {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    reason,
                }),
            }
        };
        let record: Self =
            serde_json::from_slice(kv.value()).map_err(|e| corrupt(e.to_string()))?;
        let mut member = Member::new(
            ServerId::new(record.server_id),
            Role::new(record.role)?,
            record.address,
        );
        member.metadata = record.metadata;
        Ok(member)
    }
}

/// The etcd backend. Cheap to clone.
#[derive(Clone)]
pub struct EtcdBackend {
    endpoints: Arc<Endpoints>,
    config: Arc<EtcdConfig>,
    keepers: Arc<Mutex<HashMap<i64, Arc<Keeper>>>>,
    /// Test-only mutant: keep a keepalive stream whose round was abandoned.
    reuse_abandoned_streams: bool,
    /// Watches opened (campaign waits and followers), for tests that look for spins.
    watches_opened: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("config", &self.config)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// etcd's lease ids and revisions are non-negative `i64`s; a larger one cannot be
/// ours (a crafted or corrupted key), and a plain cast would turn it negative.
fn lease_i64(lease: LeaseId) -> Result<i64> {
    i64::try_from(lease.get()).map_err(|_| Error::InvalidArgument {
        what: "lease",
        reason: format!("lease {lease} is above etcd's largest lease id (2^63 - 1)"),
    })
}

/// See [`lease_i64`].
fn token_i64(token: FencingToken) -> Result<i64> {
    i64::try_from(token.get()).map_err(|_| Error::InvalidArgument {
        what: "token",
        reason: format!("token {token} is above etcd's largest revision (2^63 - 1)"),
    })
}

fn lease_id(raw: i64) -> LeaseId {
    LeaseId::new(raw as u64)
}

impl EtcdBackend {
    /// The key prefix this backend lives under (its elections are at
    /// `<prefix>/election/<name>`, the name `etcdctl elect` takes).
    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }

    /// The candidates of an election, in queue (create revision) order, and the revision
    /// the read was taken at.
    async fn candidates(&self, election: &ElectionName) -> Result<(i64, Vec<KeyValue>)> {
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        let prefix = keys::election_prefix(self.prefix(), election);
        let response = self
            .request("get", |mut client| {
                let (prefix, options) = (prefix.clone(), options.clone());
                async move { client.get(prefix, Some(options)).await.map_err(map) }
            })
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok((revision, response.kvs().to_vec()))
    }

    /// The longest the member this backend talks to can be dead, paused or cut off
    /// from its peers before the backend notices and moves every call and stream to
    /// another: TTL/4 for the shortest TTL granted through it (at least 0.6 s, at most
    /// 1 s plus the request timeout), 3 s before any.
    pub fn dead_member_bound(&self) -> Duration {
        self.endpoints.set().detection_bound()
    }

    fn count_watch_opened(&self) {
        self.watches_opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Test seam: how many watches this backend opened (campaign waits and watch
    /// followers), so a test can tell a watch reopened once from one that spins.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn watches_opened(&self) -> u64 {
        self.watches_opened
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every key under `prefix` (a linearizable read).
    async fn read_prefix(&self, prefix: String) -> Result<etcd_client::GetResponse> {
        self.request("get", |mut client| {
            let prefix = prefix.clone();
            async move {
                let options = GetOptions::new().with_prefix();
                client.get(prefix, Some(options)).await.map_err(map)
            }
        })
        .await
    }

    /// The server id registered with `lease`, if it has a member record.
    async fn server_id_of(&self, lease: i64) -> Result<Option<ServerId>> {
        let response = self
            .read_prefix(keys::members_prefix(self.prefix()))
            .await?;
        Ok(response
            .kvs()
            .iter()
            .find(|kv| kv.lease() == lease)
            .and_then(|kv| MemberRecord::decode(kv).ok())
            .map(|m| m.server_id))
    }

    async fn leader_of(&self, election: &ElectionName, head: &KeyValue) -> Result<Leader> {
        Ok(Leader {
            key: LeaderKey {
                election: election.clone(),
                lease: lease_id(head.lease()),
                token: FencingToken::new(head.create_revision() as u64),
            },
            value: Bytes::copy_from_slice(head.value()),
            server_id: self.server_id_of(head.lease()).await?,
        })
    }

    async fn lease_alive(&self, lease: LeaseId) -> Result<bool> {
        let id = lease_i64(lease)?;
        let response = self
            .request("lease_time_to_live", |mut client| async move {
                client.lease_time_to_live(id, None).await.map_err(map)
            })
            .await?;
        Ok(response.ttl() > 0)
    }

    /// Deletes a candidate key if it is still the candidacy `token`.
    async fn delete_candidacy(&self, key: &str, token: i64) -> Result<()> {
        let txn = Txn::new()
            .when(vec![Compare::create_revision(key, CompareOp::Equal, token)])
            .and_then(vec![TxnOp::delete(key, None)]);
        self.request("txn", |mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await.map_err(map) }
        })
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(MIN_TTL).with_kv_limits(self.config.kv_limits)
    }

    async fn register(&self, member: &Member, ttl: Duration) -> Result<Lease> {
        self.capabilities().check_ttl(ttl)?;
        RecordLimits::DEFAULT.check_member(member)?;
        self.endpoints.set().note_ttl(ttl);
        let seconds = (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)) as i64;
        // Granted twice, the spare lease holds nothing and ends with its TTL.
        let grant = self
            .request("lease_grant", |mut client| async move {
                client.lease_grant(seconds, None).await.map_err(map)
            })
            .await?;
        let lease = grant.id();
        let key = keys::member_key(self.prefix(), &member.role, member.server_id);
        let record =
            serde_json::to_vec(&MemberRecord::of(member)).map_err(|e| Error::InvalidArgument {
                what: "member",
                reason: e.to_string(),
            })?;
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key.as_str(),
                record,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        // Not repeated: a repeat of an applied put would say the id is taken.
        let created = self
            .request_once("txn", |mut client| async move {
                client.txn(txn).await.map_err(map)
            })
            .await?;
        if !created.succeeded() {
            let _ = self.revoke(lease_id(lease)).await;
            return Err(Error::AlreadyRegistered {
                role: member.role.clone(),
                server_id: member.server_id,
            });
        }
        Ok(Lease {
            id: lease_id(lease),
            ttl: Duration::from_secs(grant.ttl().max(0) as u64),
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        self.renew(lease).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.keepers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&lease_i64(lease)?);
        let id = lease_i64(lease)?;
        self.request("revoke", |mut client| async move {
            match client.lease_revoke(id).await {
                Ok(_) => Ok(()),
                Err(e) if is_lease_not_found(&e) => Ok(()),
                Err(e) => Err(map(e)),
            }
        })
        .await
    }

    async fn campaign(
        &self,
        lease: LeaseId,
        election: &ElectionName,
        value: Bytes,
    ) -> Result<LeaderKey> {
        RecordLimits::DEFAULT.check_leader_value(&value)?;
        let key = keys::candidate_key(self.prefix(), election, lease);
        let put = PutOptions::new().with_lease(lease_i64(lease)?);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(key.as_str(), value.to_vec(), Some(put))])
            .or_else(vec![TxnOp::get(key.as_str(), None)]);
        // Create-if-absent, else read: a repeat finds the key the first attempt made.
        let response = self
            .request("campaign", |mut client| {
                let txn = txn.clone();
                async move {
                    client
                        .txn(txn)
                        .await
                        .map_err(|e| match is_lease_not_found(&e) {
                            true => Error::LeaseExpired { lease },
                            false => map(e),
                        })
                }
            })
            .await?;
        let token = if response.succeeded() {
            response.header().map_or(0, |h| h.revision())
        } else {
            // Our key exists: resume that candidacy with the new value.
            let existing = response.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => {
                    get.kvs().first().map(|kv| kv.create_revision())
                }
                _ => None,
            });
            let Some(token) = existing else {
                return Err(Error::Unavailable(
                    "candidate key vanished while campaigning".into(),
                ));
            };
            let update = Txn::new()
                .when(vec![Compare::create_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    token,
                )])
                .and_then(vec![TxnOp::put(
                    key.as_str(),
                    value.to_vec(),
                    Some(PutOptions::new().with_ignore_lease()),
                )]);
            self.request("txn", |mut client| {
                let update = update.clone();
                async move { client.txn(update).await.map_err(map) }
            })
            .await?;
            token
        };
        let mut guard = {
            let (backend, key) = (self.clone(), key.clone());
            WithdrawOnDrop::new(async move {
                if let Err(e) = backend.delete_candidacy(&key, token).await {
                    warn!(key, error = %e, "withdrawing a dropped campaign failed; it ends with its lease");
                }
            })
        };
        let outcome = self.wait_for_turn(lease, election, &key, token).await;
        if !matches!(
            outcome,
            Err(Error::Unavailable(_)) | Err(Error::Timeout { .. })
        ) {
            guard.disarm(); // won, or the key is already gone
        }
        outcome?;
        Ok(LeaderKey {
            election: election.clone(),
            lease,
            token: FencingToken::new(token as u64),
        })
    }

    async fn resign(&self, key: &LeaderKey) -> Result<()> {
        let candidate = keys::candidate_key(self.prefix(), &key.election, key.lease);
        self.delete_candidacy(&candidate, token_i64(key.token)?)
            .await
    }

    async fn proclaim(&self, key: &LeaderKey, value: Bytes) -> Result<()> {
        RecordLimits::DEFAULT.check_leader_value(&value)?;
        let (_, candidates) = self.candidates(&key.election).await?;
        let head = candidates.first();
        let candidate = keys::candidate_key(self.prefix(), &key.election, key.lease);
        let token = token_i64(key.token)?;
        let not_leader = || Error::NotLeader {
            election: key.election.clone(),
            current: head.map(|kv| FencingToken::new(kv.create_revision() as u64)),
        };
        // A head stays the head until its key is deleted, so guarding the write on our key's
        // create revision is enough once we have seen it at the head.
        if !head.is_some_and(|kv| kv.key() == candidate.as_bytes() && kv.create_revision() == token)
        {
            return Err(not_leader());
        }
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                candidate.as_str(),
                CompareOp::Equal,
                token,
            )])
            .and_then(vec![TxnOp::put(
                candidate.as_str(),
                value.to_vec(),
                Some(PutOptions::new().with_ignore_lease()),
            )]);
        let applied = self
            .request("txn", |mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await.map_err(map) }
            })
            .await?;
        if applied.succeeded() {
            Ok(())
        } else {
            Err(not_leader())
        }
    }

    async fn leader(&self, election: &ElectionName) -> Result<Option<Leader>> {
        let (_, candidates) = self.candidates(election).await?;
        match candidates.first() {
            Some(head) => Ok(Some(self.leader_of(election, head).await?)),
            None => Ok(None),
        }
    }

    fn watch(&self, election: &ElectionName) -> LeaderStream {
        let (tx, rx) = watch_buffer::channel(WATCH_BUFFER);
        tokio::spawn(follow_election(self.clone(), election.clone(), tx));
        rx.into_flat_stream()
    }

    async fn members(&self, role: &Role) -> Result<Vec<Member>> {
        let response = self
            .read_prefix(keys::role_prefix(self.prefix(), role))
            .await?;
        let mut members = response
            .kvs()
            .iter()
            .map(MemberRecord::decode)
            .collect::<Result<Vec<_>>>()?;
        members.sort_by_key(|m| m.server_id);
        Ok(members)
    }

    async fn kv_write(&self, guard: &LeaderKey, write: KvWrite) -> Result<KvWriteOutcome> {
        self.guarded_write(guard, write).await
    }

    async fn kv_read(&self, election: &ElectionName, key: &KvKey) -> Result<Option<Bytes>> {
        self.config.kv_limits.check_key(key)?;
        let key = keys::kv_key(self.prefix(), election, key);
        // etcd's default read is linearizable (a quorum read), which clause 10 asks for.
        let response = self
            .request("get", |mut client| {
                let key = key.clone();
                async move { client.get(key, None).await.map_err(map) }
            })
            .await?;
        Ok(response
            .kvs()
            .first()
            .map(|kv| Bytes::copy_from_slice(kv.value())))
    }

    fn watch_members(&self, role: &Role) -> MemberStream {
        let (tx, rx) = watch_buffer::channel(WATCH_BUFFER);
        tokio::spawn(follow_members(self.clone(), role.clone(), tx));
        rx.into_flat_stream()
    }
}
