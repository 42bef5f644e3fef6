//! `EtcdBackend`: the contract on etcd leases, transactions and watches.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use ha_core::{
    Backend, Capabilities, ElectionName, Error, FencingToken, KvKey, KvWrite, KvWriteOutcome,
    Leader, LeaderEvent, LeaderKey, LeaderStream, Lease, LeaseId, Member, MemberEvent,
    MemberStream, RecordLimits, Result, Role, ServerId,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{debug, warn};

use crate::config::{EtcdConfig, MIN_TTL};
use crate::error::{is_lease_not_found, map, EtcdBackendError};
use crate::keys;

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

/// One lease's keepalive stream; `None` once a round on it was abandoned or failed.
type Keeper = Arc<tokio::sync::Mutex<Option<(LeaseKeeper, LeaseKeepAliveStream)>>>;

/// One request and its reply on a lease's keepalive stream. etcd's replies carry no
/// request id, so a reply belongs to the oldest unanswered request: a round dropped
/// between send and reply (the caller's timeout) leaves its reply in the stream, where
/// the next round would read it and credit it to its own, later send time. Unless the
/// round completes, dropping it poisons the stream (the next call opens a new one).
struct KeepAliveRound<'a> {
    slot: &'a mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    keeper: &'a Keeper,
    keepers: &'a Mutex<HashMap<i64, Keeper>>,
    id: i64,
    /// The round got its reply (or its error) instead of being dropped mid-way.
    answered: bool,
    completed: bool,
    reuse_when_abandoned: bool,
}

impl KeepAliveRound<'_> {
    async fn run(&mut self, request_timeout: Duration, lease: LeaseId) -> Result<Duration> {
        let Some((sender, stream)) = self.slot.as_mut() else {
            return Err(Error::Unavailable("the keepalive stream was reset".into()));
        };
        let round = async {
            sender.keep_alive().await?;
            stream.message().await
        };
        match timeout(request_timeout, round).await {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {
                Ok(Duration::from_secs(response.ttl() as u64))
            }
            Ok(Ok(Some(_))) => Err(Error::LeaseExpired { lease }),
            Ok(Ok(None)) => Err(Error::Unavailable(
                "etcd closed the keepalive stream".into(),
            )),
            Ok(Err(e)) if is_lease_not_found(&e) => Err(Error::LeaseExpired { lease }),
            Ok(Err(e)) => Err(map(e)),
            Err(_) => Err(Error::Timeout {
                operation: "keep_alive",
                after: request_timeout,
            }),
        }
    }
}

impl Drop for KeepAliveRound<'_> {
    fn drop(&mut self) {
        if self.completed || (self.reuse_when_abandoned && !self.answered) {
            return;
        }
        *self.slot = None;
        let mut keepers = self.keepers.lock().unwrap_or_else(PoisonError::into_inner);
        if keepers
            .get(&self.id)
            .is_some_and(|cached| Arc::ptr_eq(cached, self.keeper))
        {
            keepers.remove(&self.id);
        }
    }
}

/// The etcd backend. Cheap to clone.
#[derive(Clone)]
pub struct EtcdBackend {
    client: Client,
    config: Arc<EtcdConfig>,
    keepers: Arc<Mutex<HashMap<i64, Keeper>>>,
    /// Test-only mutant: keep a keepalive stream whose round was abandoned.
    reuse_abandoned_streams: bool,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("config", &self.config)
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
    /// Connects to etcd and checks it answers.
    ///
    /// # Errors
    /// `InvalidArgument` for no endpoints or a bad prefix, `Unavailable`/`Timeout` if etcd
    /// does not answer within the connect timeout.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(Error::InvalidArgument {
                what: "url",
                reason: "etcd needs at least one endpoint".into(),
            });
        }
        if config.prefix.is_empty() || config.prefix.ends_with('/') {
            return Err(Error::InvalidArgument {
                what: "argument",
                reason: format!(
                    "etcd prefix {:?} must be non-empty and not end with '/'",
                    config.prefix
                ),
            });
        }
        if config.user.is_some()
            && config.tls.is_none()
            && !config
                .endpoints
                .iter()
                .all(|e| ha_core::is_loopback_endpoint(e))
        {
            // A password in cleartext to another host is readable by anyone on the path.
            return Err(Error::InvalidArgument {
                what: "tls",
                reason: format!(
                    "refusing to send the etcd password without TLS to {:?}; configure TLS (--cacert) or use a loopback endpoint",
                    config.endpoints
                ),
            });
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout);
        if let Some((user, password)) = &config.user {
            // etcd's auth tokens do not survive an etcd restart (simple tokens) or expire
            // (JWT): fetch a new one instead of failing every call after that.
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &config.tls {
            let mut tls_options = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                tls_options = tls_options.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls_options);
        }
        // etcd (Go) checks a client certificate after the TLS 1.3 handshake and then just
        // closes the connection; the client sees "connection closed", not an alert. With
        // TLS on, a connection closed (not refused) during connect means the certificate.
        let tls_refusal = |error: Error| match error {
            Error::Unavailable(reason)
                if config.tls.is_some() && closed_after_handshake(&reason) =>
            {
                let given = if config.tls.as_ref().is_some_and(|t| t.identity.is_some()) {
                    "the client certificate given (is it from etcd's client CA?)"
                } else {
                    "no client certificate (etcd runs with --client-cert-auth?)"
                };
                Error::Auth {
                    failure: ha_core::AuthFailure::ClientCertificate,
                    reason: format!(
                        "etcd closed the TLS connection during connect, with {given}: {reason}"
                    ),
                }
            }
            other => other,
        };
        let connect = Client::connect(config.endpoints.clone(), Some(options));
        let mut client = match timeout(config.connect_timeout, connect).await {
            Ok(client) => client.map_err(map).map_err(tls_refusal)?,
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "etcd at {:?} did not answer within {:?}",
                    config.endpoints, config.connect_timeout
                )))
            }
        };
        // etcd-client connects lazily; prove the cluster answers.
        match timeout(config.connect_timeout, client.status()).await {
            Ok(status) => {
                status.map_err(map).map_err(tls_refusal)?;
            }
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "etcd at {:?} did not answer within {:?}",
                    config.endpoints, config.connect_timeout
                )))
            }
        }
        Ok(Self {
            client,
            config: Arc::new(config),
            keepers: Arc::default(),
            reuse_abandoned_streams: false,
        })
    }

    /// Test-only mutant: keeps a keepalive stream after a round on it was abandoned, so
    /// the abandoned round's late reply answers the next one. The proxy tests must catch
    /// it (`tests/stale_keepalive.rs`).
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn with_stale_keepalive_mutant(mut self) -> Self {
        self.reuse_abandoned_streams = true;
        self
    }

    /// The lease's cached keepalive stream, opened if there is none.
    async fn keeper(&self, id: i64, lease: LeaseId) -> Result<Keeper> {
        let cached = self
            .keepers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned();
        if let Some(keeper) = cached {
            return Ok(keeper);
        }
        let mut client = self.client.clone();
        let opened = match timeout(self.config.request_timeout, client.lease_keep_alive(id)).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) if is_lease_not_found(&e) => return Err(Error::LeaseExpired { lease }),
            Ok(Err(e)) => return Err(map(e)),
            Err(_) => {
                return Err(Error::Timeout {
                    operation: "keep_alive",
                    after: self.config.request_timeout,
                })
            }
        };
        let keeper = Arc::new(tokio::sync::Mutex::new(Some(opened)));
        self.keepers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&keeper));
        Ok(keeper)
    }

    /// The key prefix this backend lives under (its elections are at
    /// `<prefix>/election/<name>`, the name `etcdctl elect` takes).
    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }

    /// Runs one request with the configured timeout.
    async fn bounded<T>(
        &self,
        operation: &'static str,
        request: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match timeout(self.config.request_timeout, request).await {
            Ok(result) => result.map_err(map),
            Err(_) => Err(Error::Timeout {
                operation,
                after: self.config.request_timeout,
            }),
        }
    }

    /// The candidates of an election, in queue (create revision) order, and the revision
    /// the read was taken at.
    async fn candidates(&self, election: &ElectionName) -> Result<(i64, Vec<KeyValue>)> {
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        let mut client = self.client.clone();
        let response = self
            .bounded(
                "get",
                client.get(
                    keys::election_prefix(self.prefix(), election),
                    Some(options),
                ),
            )
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok((revision, response.kvs().to_vec()))
    }

    /// The server id registered with `lease`, if it has a member record.
    async fn server_id_of(&self, lease: i64) -> Result<Option<ServerId>> {
        let mut client = self.client.clone();
        let response = self
            .bounded(
                "get",
                client.get(
                    keys::members_prefix(self.prefix()),
                    Some(GetOptions::new().with_prefix()),
                ),
            )
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
        let mut client = self.client.clone();
        let response = self
            .bounded(
                "lease_time_to_live",
                client.lease_time_to_live(lease_i64(lease)?, None),
            )
            .await?;
        Ok(response.ttl() > 0)
    }

    /// Deletes a candidate key if it is still the candidacy `token`.
    async fn delete_candidacy(&self, key: &str, token: i64) -> Result<()> {
        let txn = Txn::new()
            .when(vec![Compare::create_revision(key, CompareOp::Equal, token)])
            .and_then(vec![TxnOp::delete(key, None)]);
        let mut client = self.client.clone();
        self.bounded("txn", client.txn(txn)).await?;
        Ok(())
    }

    /// Waits until the candidacy `token` heads the election.
    async fn wait_for_turn(
        &self,
        lease: LeaseId,
        election: &ElectionName,
        own: &str,
        token: i64,
    ) -> Result<()> {
        // Ride out a short etcd outage (a restart); give up after this long without an answer.
        const OUTAGE: Duration = Duration::from_secs(30);
        let mut unreachable_since: Option<tokio::time::Instant> = None;
        loop {
            let (revision, candidates) = match self.candidates(election).await {
                Ok(read) => {
                    unreachable_since = None;
                    read
                }
                Err(e) if e.is_retryable() => {
                    let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > OUTAGE {
                        return Err(e);
                    }
                    debug!(election = %election, error = %e, "etcd unreachable while campaigning, retrying");
                    sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !candidates.iter().any(|kv| kv.key() == own.as_bytes()) {
                return if self.lease_alive(lease).await? {
                    Err(Error::NotLeader {
                        election: election.clone(),
                        current: candidates
                            .first()
                            .map(|kv| FencingToken::new(kv.create_revision() as u64)),
                    })
                } else {
                    Err(Error::LeaseExpired { lease })
                };
            }
            if candidates
                .first()
                .is_some_and(|kv| kv.create_revision() == token)
            {
                return Ok(());
            }
            // Wait for any deletion in the election after the read: our predecessor's (our
            // turn may have come) or our own (our lease died).
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let mut client = self.client.clone();
            let mut watch = match client
                .watch(
                    keys::election_prefix(self.prefix(), election),
                    Some(options),
                )
                .await
            {
                Ok(watch) => watch,
                Err(e) => {
                    debug!(error = %e, "campaign watch failed, retrying");
                    sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            loop {
                match watch.message().await {
                    Ok(Some(response)) => {
                        if response.canceled() || response.compact_revision() > 0 {
                            break;
                        }
                        if response
                            .events()
                            .iter()
                            .any(|e| e.event_type() == EventType::Delete)
                        {
                            break;
                        }
                    }
                    Ok(None) | Err(_) => {
                        sleep(Duration::from_millis(200)).await;
                        break;
                    }
                }
            }
        }
    }
}

/// Deletes a candidacy when the campaign future is dropped before it wins.
struct WithdrawOnDrop {
    backend: Option<EtcdBackend>,
    key: String,
    token: i64,
}

impl Drop for WithdrawOnDrop {
    fn drop(&mut self) {
        if let Some(backend) = self.backend.take() {
            let (key, token) = (std::mem::take(&mut self.key), self.token);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(e) = backend.delete_candidacy(&key, token).await {
                        warn!(key, error = %e, "withdrawing a dropped campaign failed; it ends with its lease");
                    }
                });
            }
        }
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
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let mut client = self.client.clone();
        let grant = self
            .bounded("lease_grant", client.lease_grant(seconds as i64, None))
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
        let created = self.bounded("txn", client.txn(txn)).await?;
        if !created.succeeded() {
            let _ = client.lease_revoke(lease).await;
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
        let id = lease_i64(lease)?;
        // A stream poisoned by an abandoned round while this call waited for it is
        // replaced once; the replacement is fresh, so a second pass always has a stream.
        for _ in 0..2 {
            let keeper = self.keeper(id, lease).await?;
            let mut slot = keeper.lock().await;
            if slot.is_none() {
                continue;
            }
            let mut round = KeepAliveRound {
                slot: &mut slot,
                keeper: &keeper,
                keepers: &self.keepers,
                id,
                answered: false,
                completed: false,
                reuse_when_abandoned: self.reuse_abandoned_streams,
            };
            let result = round.run(self.config.request_timeout, lease).await;
            round.answered = true;
            round.completed = result.is_ok();
            return result;
        }
        Err(Error::Unavailable(
            "the keepalive stream was reset twice while waiting for it".into(),
        ))
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.keepers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&lease_i64(lease)?);
        let mut client = self.client.clone();
        match timeout(
            self.config.request_timeout,
            client.lease_revoke(lease_i64(lease)?),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if is_lease_not_found(&e) => Ok(()),
            Ok(Err(e)) => Err(map(e)),
            Err(_) => Err(Error::Timeout {
                operation: "revoke",
                after: self.config.request_timeout,
            }),
        }
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
        let mut client = self.client.clone();
        let response = match timeout(self.config.request_timeout, client.txn(txn)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) if is_lease_not_found(&e) => return Err(Error::LeaseExpired { lease }),
            Ok(Err(e)) => return Err(map(e)),
            Err(_) => {
                return Err(Error::Timeout {
                    operation: "campaign",
                    after: self.config.request_timeout,
                })
            }
        };
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
            self.bounded("txn", client.txn(update)).await?;
            token
        };
        let mut guard = WithdrawOnDrop {
            backend: Some(self.clone()),
            key: key.clone(),
            token,
        };
        let outcome = self.wait_for_turn(lease, election, &key, token).await;
        if !matches!(
            outcome,
            Err(Error::Unavailable(_)) | Err(Error::Timeout { .. })
        ) {
            guard.backend = None; // won, or the key is already gone
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
        let mut client = self.client.clone();
        if self.bounded("txn", client.txn(txn)).await?.succeeded() {
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
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(follow_election(self.clone(), election.clone(), tx));
        UnboundedReceiverStream::new(rx).boxed()
    }

    async fn members(&self, role: &Role) -> Result<Vec<Member>> {
        let mut client = self.client.clone();
        let response = self
            .bounded(
                "get",
                client.get(
                    keys::role_prefix(self.prefix(), role),
                    Some(GetOptions::new().with_prefix()),
                ),
            )
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
        let mut client = self.client.clone();
        let response = match timeout(self.config.request_timeout, client.txn(txn)).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Err(kv_error(error, &write)),
            Err(_) => {
                return Err(Error::Timeout {
                    operation: "kv_write",
                    after: self.config.request_timeout,
                })
            }
        };
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

    async fn kv_read(&self, election: &ElectionName, key: &KvKey) -> Result<Option<Bytes>> {
        self.config.kv_limits.check_key(key)?;
        let mut client = self.client.clone();
        // etcd's default read is linearizable (a quorum read), which clause 10 asks for.
        let response = self
            .bounded(
                "get",
                client.get(keys::kv_key(self.prefix(), election, key), None),
            )
            .await?;
        Ok(response
            .kvs()
            .first()
            .map(|kv| Bytes::copy_from_slice(kv.value())))
    }

    fn watch_members(&self, role: &Role) -> MemberStream {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(follow_members(self.clone(), role.clone(), tx));
        UnboundedReceiverStream::new(rx).boxed()
    }
}

/// Whether a transport failure looks like a server that accepted the TCP connection and
/// then hung up (as etcd does on a refused client certificate), not one that could not
/// be reached at all.
fn closed_after_handshake(reason: &str) -> bool {
    let reason = reason.to_ascii_lowercase();
    let closed = ["canceled", "connection closed", "broken pipe"];
    // Not a refused certificate: unreachable, restarting, or not speaking TLS at all.
    let other = [
        "connection refused",
        "tcp connect",
        "timed out",
        "dns error",
        "no route",
        "reset",
        "corrupt",
        "invalidcontenttype",
        "invalid message",
    ];
    // tonic sometimes reports the hang-up with no source at all, a bare "transport error"
    // (seen once in a full test run). An unreachable or non-TLS server has come with a
    // cause every time we looked ("tcp connect error", "corrupt message").
    let bare = reason.trim() == "transport error";
    bare || closed.iter().any(|s| reason.contains(s)) && !other.iter().any(|s| reason.contains(s))
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

/// The head of a set of candidate keys: (token, value, lease).
fn head(candidates: &BTreeMap<i64, KeyValue>) -> Option<&KeyValue> {
    candidates.values().next()
}

/// What an [`EventFeed`] yields next.
enum Feed {
    /// The events of one watch response, in revision order.
    Events(Vec<etcd_client::Event>),
    /// The history after the feed's revision was compacted away: re-read.
    Compacted,
    /// The consumer went away.
    Closed,
}

/// A watch of a key prefix from a revision on that reconnects after a broken stream,
/// resuming after the last event it delivered, so nothing is lost or repeated.
struct EventFeed {
    client: Client,
    prefix: String,
    next: i64,
    watch: Option<etcd_client::WatchStream>,
}

impl EventFeed {
    /// A feed of every change after revision `after`.
    fn new(client: Client, prefix: String, after: i64) -> Self {
        Self {
            client,
            prefix,
            next: after + 1,
            watch: None,
        }
    }

    /// The next batch of events; gives up only when the consumer of `tx` is gone.
    async fn next<T>(&mut self, tx: &mpsc::UnboundedSender<T>) -> Feed {
        loop {
            let mut watch = match self.watch.take() {
                Some(watch) => watch,
                None => {
                    let options = WatchOptions::new()
                        .with_prefix()
                        .with_prev_key()
                        .with_start_revision(self.next);
                    let opened = tokio::select! {
                        _ = tx.closed() => return Feed::Closed,
                        opened = self.client.watch(self.prefix.as_str(), Some(options)) => opened,
                    };
                    match opened {
                        Ok(watch) => watch,
                        Err(_) => {
                            sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    }
                }
            };
            let message = tokio::select! {
                _ = tx.closed() => return Feed::Closed,
                message = watch.message() => message,
            };
            match message {
                Ok(Some(response)) if response.compact_revision() > 0 => return Feed::Compacted,
                Ok(Some(response)) if response.canceled() => {} // reopen from `next`
                Ok(Some(response)) => {
                    self.watch = Some(watch);
                    let events = response.events().to_vec();
                    if let Some(last) = events
                        .iter()
                        .filter_map(|e| e.kv())
                        .map(|kv| kv.mod_revision())
                        .max()
                    {
                        self.next = self.next.max(last + 1);
                    }
                    if !events.is_empty() {
                        return Feed::Events(events);
                    }
                }
                Ok(None) | Err(_) => sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// Follows an election: reads all candidates, then applies every watch event in order,
/// reporting the head after each one that changes it. On compaction it re-reads.
async fn follow_election(
    backend: EtcdBackend,
    election: ElectionName,
    tx: mpsc::UnboundedSender<Result<LeaderEvent>>,
) {
    let prefix = keys::election_prefix(backend.prefix(), &election);
    let mut reported: Option<Option<(i64, Vec<u8>)>> = None;
    let mut failures = 0u32;
    'reread: loop {
        let (revision, list) = match backend.candidates(&election).await {
            Ok(read) => read,
            Err(e) if e.is_retryable() && failures < 100 => {
                failures += 1;
                sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let mut candidates: BTreeMap<i64, KeyValue> = list
            .into_iter()
            .map(|kv| (kv.create_revision(), kv))
            .collect();
        let mut feed = EventFeed::new(backend.client.clone(), prefix.clone(), revision);
        if !report(&backend, &election, &candidates, &mut reported, &tx).await {
            return;
        }
        loop {
            let events = match feed.next(&tx).await {
                Feed::Events(events) => events,
                Feed::Compacted => {
                    debug!(election = %election, "watch compacted, re-reading");
                    continue 'reread;
                }
                Feed::Closed => return,
            };
            failures = 0;
            for event in &events {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => {
                        candidates.insert(kv.create_revision(), kv.clone());
                    }
                    EventType::Delete => {
                        candidates.retain(|_, c| c.key() != kv.key());
                    }
                }
                if !report(&backend, &election, &candidates, &mut reported, &tx).await {
                    return;
                }
            }
        }
    }
}

/// Sends the head if it differs from the last one sent; false if the receiver is gone.
async fn report(
    backend: &EtcdBackend,
    election: &ElectionName,
    candidates: &BTreeMap<i64, KeyValue>,
    reported: &mut Option<Option<(i64, Vec<u8>)>>,
    tx: &mpsc::UnboundedSender<Result<LeaderEvent>>,
) -> bool {
    let current = head(candidates).map(|kv| (kv.create_revision(), kv.value().to_vec()));
    if reported.as_ref() == Some(&current) {
        return true;
    }
    *reported = Some(current);
    let event = match head(candidates) {
        None => Ok(LeaderEvent::Vacant),
        Some(kv) => backend
            .leader_of(election, kv)
            .await
            .map(LeaderEvent::Elected),
    };
    tx.send(event).is_ok()
}

/// Follows a role's member records: a snapshot, then joins and leaves; on compaction the
/// difference between the old and a fresh snapshot.
async fn follow_members(
    backend: EtcdBackend,
    role: Role,
    tx: mpsc::UnboundedSender<Result<MemberEvent>>,
) {
    let prefix = keys::role_prefix(backend.prefix(), &role);
    let mut known: Option<BTreeMap<Vec<u8>, Member>> = None;
    'reread: loop {
        let mut client = backend.client.clone();
        let read = backend
            .bounded(
                "get",
                client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
            )
            .await;
        let response = match read {
            Ok(response) => response,
            Err(e) => {
                if e.is_retryable() {
                    sleep(Duration::from_millis(200)).await;
                    continue;
                }
                let _ = tx.send(Err(e));
                return;
            }
        };
        let revision = response.header().map_or(0, |h| h.revision());
        let mut fresh = BTreeMap::new();
        for kv in response.kvs() {
            match MemberRecord::decode(kv) {
                Ok(member) => {
                    fresh.insert(kv.key().to_vec(), member);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        let mut events = Vec::new();
        match &known {
            None => {
                let mut members: Vec<Member> = fresh.values().cloned().collect();
                members.sort_by_key(|m| m.server_id);
                events.push(MemberEvent::Snapshot(members));
            }
            Some(old) => {
                for (key, member) in old {
                    if fresh.get(key) != Some(member) {
                        events.push(MemberEvent::Left(member.clone()));
                    }
                }
                for (key, member) in &fresh {
                    if old.get(key) != Some(member) {
                        events.push(MemberEvent::Joined(member.clone()));
                    }
                }
            }
        }
        for event in events {
            if tx.send(Ok(event)).is_err() {
                return;
            }
        }
        let mut members = fresh;
        let mut feed = EventFeed::new(backend.client.clone(), prefix.clone(), revision);
        loop {
            let events = match feed.next(&tx).await {
                Feed::Events(events) => events,
                Feed::Compacted => {
                    known = Some(members);
                    continue 'reread;
                }
                Feed::Closed => return,
            };
            for event in &events {
                let Some(kv) = event.kv() else { continue };
                let out = match event.event_type() {
                    EventType::Put => match MemberRecord::decode(kv) {
                        Ok(member) => {
                            members.insert(kv.key().to_vec(), member.clone());
                            Ok(MemberEvent::Joined(member))
                        }
                        Err(e) => Err(e),
                    },
                    EventType::Delete => match members.remove(kv.key()) {
                        Some(member) => Ok(MemberEvent::Left(member)),
                        None => continue,
                    },
                };
                if tx.send(out).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::closed_after_handshake;

    #[test]
    fn a_hang_up_reads_as_closed_and_an_unreachable_server_does_not() {
        assert!(closed_after_handshake("transport error"));
        assert!(closed_after_handshake(
            "transport error: error trying to connect: connection closed via error"
        ));
        assert!(!closed_after_handshake(
            "transport error: tcp connect error: Connection refused (os error 111)"
        ));
        assert!(!closed_after_handshake(
            "transport error: received corrupt message of type InvalidContentType"
        ));
        assert!(!closed_after_handshake(
            "transport error: connection reset by peer"
        ));
    }
}
