//! `RaftClient`: the contract for a process that is not a member of the group, over the
//! client API of any member (which forwards to the leader). Replies name the Raft
//! leader and the client sends its next calls there; an endpoint that fails (no answer
//! within an attempt, a broken connection, a probe unanswered) is left for the one that
//! failed least recently and every stream on it is opened again there (see
//! `ha_core::endpoints`); watches resume after the last revision they saw.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ha_core::endpoints::{At, EndpointSet};
use ha_core::watch_buffer::{self, WATCH_BUFFER};
use ha_core::{
    Backend, Capabilities, ElectionName, Error, KvKey, KvLimits, KvWrite, KvWriteOutcome, Leader,
    LeaderKey, LeaderStream, Lease, LeaseId, Member, MemberStream, RecordLimits, Result, Role,
};
use tokio::time::{sleep, timeout_at, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::channel::{channel, BearerToken};
use crate::config::MIN_TTL;
use crate::proto;
use crate::proto::coordination_client::CoordinationClient;
use crate::wire::{
    from_status, key_from_proto, key_to_proto, kv_outcome_from_proto, kv_read_from_proto,
    kv_write_to_proto, leader_from_proto, member_from_proto, member_to_proto,
};
use ha_core::ClientTls;

mod held;
use held::{HeldChannels, HeldSlot};
mod keepalives;
use keepalives::CallFailure;
mod watch;

use watch::{follow_leader, follow_members};

/// The client API over one channel, with the bearer token (if any) on every call.
type Api = CoordinationClient<InterceptedService<Channel, BearerToken>>;

/// How a [`RaftClient`] connects: timeouts and credentials.
#[derive(Clone)]
pub struct RaftClientOptions {
    /// Time one call may take, retries across endpoints included.
    pub request_timeout: Duration,
    /// TLS towards the nodes (required when they run with TLS).
    pub tls: Option<ClientTls>,
    /// A bearer token the nodes accept (`RaftNodeConfig::client_token`), for a client
    /// without a certificate.
    pub token: Option<String>,
}

impl std::fmt::Debug for RaftClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftClientOptions")
            .field("request_timeout", &self.request_timeout)
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Default for RaftClientOptions {
    fn default() -> Self {
        Self {
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            tls: None,
            token: None,
        }
    }
}

/// Default time one call may take, retries across endpoints included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of a Raft group it is not a member of. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RaftClient {
    inner: Arc<ClientInner>,
    kv_limits: KvLimits,
}

#[derive(Debug)]
struct ClientInner {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    /// Per endpoint, index-aligned with `channels`: the connections of held calls.
    held: Vec<Arc<HeldChannels>>,
    /// Which endpoint is in use, which failed, and the timing from the TTLs.
    set: Arc<EndpointSet>,
    request_timeout: Duration,
    token: BearerToken,
    /// Where keepalives wait for their batch (see `keepalives.rs`).
    keepalives: Mutex<Option<tokio::sync::mpsc::UnboundedSender<keepalives::Waiter>>>,
}

/// Whether an attempt that timed out may be repeated on another endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repeat {
    /// Repeating changes nothing (reads, renewals, idempotent writes).
    Always,
    /// The attempt may have been applied and a repeat would report on that instead
    /// (registering: the repeat would find the id taken by the first).
    NotAfterTimeout,
}

/// Whether a failed call may succeed against another endpoint or later.
fn transient(status: &Status) -> bool {
    (matches!(
        status.code(),
        Code::Unavailable | Code::Cancelled | Code::Unknown
    ) || (status.code() == Code::DeadlineExceeded && status.details().is_empty()))
        && crate::tls::auth_error(status).is_none()
}

impl RaftClient {
    /// Connects to a group through any of `endpoints` (`host:port`). Succeeds once one
    /// endpoint accepts a connection.
    ///
    /// # Errors
    /// `InvalidArgument` for an empty list or a malformed address; `Unavailable` if no
    /// endpoint can be reached within `request_timeout`.
    pub async fn connect<I, S>(endpoints: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::connect_with_timeout(endpoints, DEFAULT_REQUEST_TIMEOUT).await
    }

    /// [`connect`](Self::connect) with a per-call timeout.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn connect_with_timeout<I, S>(endpoints: I, request_timeout: Duration) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let options = RaftClientOptions {
            request_timeout,
            ..RaftClientOptions::default()
        };
        Self::connect_with(endpoints, options).await
    }

    /// [`connect`](Self::connect) with TLS, a bearer token and a timeout.
    ///
    /// # Errors
    /// As [`connect`](Self::connect); `Auth` when TLS or the credentials are refused
    /// (the error says which side), `InvalidArgument` for a token that is not ASCII.
    pub async fn connect_with<I, S>(endpoints: I, options: RaftClientOptions) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let request_timeout = options.request_timeout;
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        let token = BearerToken::new(options.token.as_deref(), options.tls.is_some(), &endpoints)?;
        if endpoints.is_empty() {
            return Err(Error::InvalidArgument {
                what: "url",
                reason: "a raft:// URL needs at least one host:port".into(),
            });
        }
        let channels = endpoints
            .iter()
            .map(|endpoint| channel(endpoint, options.tls.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let held = endpoints
            .iter()
            .map(|endpoint| HeldChannels::new(endpoint, options.tls.as_ref()))
            .collect();
        let set = Arc::new(EndpointSet::new("raft", endpoints.clone(), request_timeout));
        let client = Self {
            inner: Arc::new(ClientInner {
                endpoints,
                channels,
                held,
                set,
                request_timeout,
                token,
                keepalives: Mutex::new(None),
            }),
            kv_limits: KvLimits::default(),
        };
        // Prove one endpoint is there: a read that every member can answer.
        let probe = ElectionName::new("ha-connect-probe")?;
        client.leader(&probe).await.map_err(|e| match e {
            Error::Unavailable(_) | Error::Timeout { .. } => Error::Unavailable(format!(
                "none of {:?} answered within {request_timeout:?}: {e}",
                client.inner.endpoints
            )),
            other => other,
        })?;
        client.inner.set.spawn_probe(
            Arc::downgrade(&client.inner),
            |inner: Arc<ClientInner>, slot| {
                let client = RaftClient {
                    inner,
                    kv_limits: KvLimits::default(),
                };
                Box::pin(async move { client.probe(slot).await })
            },
        );
        Ok(client)
    }

    /// A linearizable read on endpoint `slot`: a member cut off from the quorum cannot
    /// answer it, nor one whose connection went silent.
    async fn probe(&self, slot: usize) -> Result<()> {
        let mut api = self.api(self.inner.channels[slot].clone());
        let request = proto::ElectionRequest {
            election: "ha-probe".to_owned(),
        };
        match api.leader(request).await {
            Ok(_) => Ok(()),
            Err(status) if transient(&status) => Err(from_status(&status)),
            // Refused credentials or an odd answer: the member is there; calls will say.
            Err(_) => Ok(()),
        }
    }

    /// Sets the guarded store's size limits this client checks before sending; they
    /// should match the nodes' (`RaftNodeConfig::kv_limits`), which check again.
    pub fn with_kv_limits(mut self, kv_limits: KvLimits) -> Self {
        self.kv_limits = kv_limits;
        self
    }

    fn api(&self, channel: Channel) -> Api {
        CoordinationClient::with_interceptor(channel, self.inner.token.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// The endpoint in use, for a short call.
    fn client(&self) -> (At, Api) {
        let at = self.inner.set.in_use();
        (at, self.api(self.inner.channels[at.slot].clone()))
    }

    /// The endpoint in use, for a call that may stay open (see `held.rs`); the slot
    /// must live as long as the call.
    fn held_client(&self) -> Result<(At, Api, HeldSlot)> {
        let at = self.inner.set.in_use();
        let (channel, slot) = self.inner.held[at.slot].take()?;
        Ok((at, self.api(channel), slot))
    }

    /// Resolves once the endpoint of `at` has failed: a held call on it is abandoned.
    async fn failed_since(&self, at: At) {
        self.inner.set.failed_since(at).await;
    }

    /// Leaves the endpoint of `at` for another, `why` saying what it did.
    fn leave(&self, at: At, why: &str) {
        self.inner.set.leave(at, why);
    }

    /// Sends the next calls to the endpoint a reply names as the Raft leader, when the
    /// client knows it by that address.
    fn follow_hint(&self, metadata: &tonic::metadata::MetadataMap) {
        let Some(leader) = metadata
            .get(crate::service::LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        if let Some(index) = self.inner.endpoints.iter().position(|e| e == leader) {
            self.inner.set.prefer(index);
        }
    }

    /// Calls the endpoint in use, each attempt bounded by the attempt timeout, moving
    /// to another after a failure, until the request timeout passes. For calls that are
    /// safe to repeat.
    async fn call<T, F, Fut>(&self, call: F) -> Result<tonic::Response<T>>
    where
        F: FnMut(Api) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        self.call_status(Repeat::Always, call)
            .await
            .map_err(|failure| failure.error("request"))
    }

    /// [`call`](Self::call), failing with the last status itself; `repeat` says whether
    /// an attempt that timed out (and may have been applied) may be repeated.
    async fn call_status<T, F, Fut>(
        &self,
        repeat: Repeat,
        mut call: F,
    ) -> std::result::Result<tonic::Response<T>, CallFailure>
    where
        F: FnMut(Api) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.inner.request_timeout;
        loop {
            let (at, client) = self.client();
            let started = Instant::now();
            let attempt = deadline.min(started + self.inner.set.attempt_timeout());
            let status = match timeout_at(attempt, call(client)).await {
                Ok(Ok(reply)) => {
                    self.inner.set.observe(started.elapsed());
                    self.follow_hint(reply.metadata());
                    return Ok(reply);
                }
                Ok(Err(status)) => {
                    self.follow_hint(status.metadata());
                    status
                }
                Err(_) => {
                    // No answer in time: a dead, paused or cut-off member.
                    self.leave(at, "no answer within the attempt timeout");
                    if repeat == Repeat::Always && Instant::now() < deadline {
                        continue;
                    }
                    return Err(CallFailure::Timeout(self.inner.request_timeout));
                }
            };
            if !transient(&status) || Instant::now() >= deadline {
                return Err(CallFailure::Status(status));
            }
            self.leave(at, status.message());
            sleep(Duration::from_millis(50)).await;
        }
    }
}

#[async_trait]
impl Backend for RaftClient {
    fn name(&self) -> &'static str {
        "raft"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(MIN_TTL).with_kv_limits(self.kv_limits)
    }

    async fn register(&self, member: &Member, ttl: Duration) -> Result<Lease> {
        self.capabilities().check_ttl(ttl)?;
        RecordLimits::DEFAULT.check_member(member)?;
        self.inner.set.note_ttl(ttl);
        let request = proto::RegisterRequest {
            member: Some(member_to_proto(member)),
            ttl_ms: ttl.as_millis() as u64,
        };
        let reply = self
            .call_status(Repeat::NotAfterTimeout, |mut c| {
                let request = request.clone();
                async move { c.register(request).await }
            })
            .await
            .map_err(|failure| failure.error("register"))?
            .into_inner();
        Ok(Lease {
            id: LeaseId::new(reply.lease),
            ttl: Duration::from_millis(reply.ttl_ms),
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let result = self.queue_keep_alive(lease.get());
        // The call inside is bounded by the request timeout; this bounds the wait for
        // the batch to be sent too.
        let patience = self.inner.request_timeout + keepalives::PACE * 2;
        match tokio::time::timeout(patience, result).await {
            Ok(Ok(renewal)) => renewal,
            Ok(Err(_)) => Err(Error::Unavailable(
                "the keepalive batcher stopped (its runtime shut down)".into(),
            )),
            Err(_) => Err(Error::Timeout {
                operation: "keep_alive",
                after: patience,
            }),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.call(
            |mut c| async move { c.revoke(proto::LeaseRequest { lease: lease.get() }).await },
        )
        .await?;
        Ok(())
    }

    async fn campaign(
        &self,
        lease: LeaseId,
        election: &ElectionName,
        value: Bytes,
    ) -> Result<LeaderKey> {
        RecordLimits::DEFAULT.check_leader_value(&value)?;
        let request = proto::CampaignRequest {
            lease: lease.get(),
            election: election.as_str().to_owned(),
            value: value.to_vec(),
        };
        // No overall timeout: a campaign waits in line as long as it takes. A broken
        // connection, or an endpoint found dead while waiting, resumes the same
        // candidacy elsewhere (campaign is idempotent per lease and election, and the
        // abandoned call's withdrawal spares a resumed candidacy); dropping this future
        // cancels the call, and the serving node withdraws the candidacy.
        loop {
            let (at, mut client, _slot) = self.held_client()?;
            let reply = tokio::select! {
                biased;
                () = self.failed_since(at) => continue,
                reply = client.campaign(request.clone()) => reply,
            };
            match reply {
                Ok(reply) => {
                    self.follow_hint(reply.metadata());
                    return key_from_proto(reply.into_inner());
                }
                Err(status) if transient(&status) => {
                    self.leave(at, status.message());
                    sleep(Duration::from_millis(100)).await;
                }
                Err(status) => return Err(from_status(&status)),
            }
        }
    }

    async fn resign(&self, key: &LeaderKey) -> Result<()> {
        let request = key_to_proto(key);
        self.call(|mut c| {
            let request = request.clone();
            async move { c.resign(request).await }
        })
        .await?;
        Ok(())
    }

    async fn proclaim(&self, key: &LeaderKey, value: Bytes) -> Result<()> {
        RecordLimits::DEFAULT.check_leader_value(&value)?;
        let request = proto::ProclaimRequest {
            key: Some(key_to_proto(key)),
            value: value.to_vec(),
        };
        self.call(|mut c| {
            let request = request.clone();
            async move { c.proclaim(request).await }
        })
        .await?;
        Ok(())
    }

    async fn leader(&self, election: &ElectionName) -> Result<Option<Leader>> {
        let request = proto::ElectionRequest {
            election: election.as_str().to_owned(),
        };
        let reply = self
            .call(|mut c| {
                let request = request.clone();
                async move { c.leader(request).await }
            })
            .await?
            .into_inner();
        reply.leader.map(leader_from_proto).transpose()
    }

    async fn kv_write(&self, guard: &LeaderKey, write: KvWrite) -> Result<KvWriteOutcome> {
        self.kv_limits.check(&write)?;
        let request = kv_write_to_proto(guard, &write);
        // One attempt: a write that failed in transit may have been applied, and a retry
        // would report on that instead of on itself. The caller learns the outcome is
        // unknown; the next call goes to the next endpoint.
        let (at, mut client) = self.client();
        let timeout = self.inner.request_timeout;
        match tokio::time::timeout(timeout, client.kv_write(request)).await {
            Ok(Ok(reply)) => Ok(kv_outcome_from_proto(reply.into_inner())),
            Ok(Err(status)) => {
                if transient(&status) {
                    self.leave(at, status.message());
                }
                Err(from_status(&status))
            }
            Err(_) => {
                self.leave(at, "no answer to a guarded write");
                Err(Error::Timeout {
                    operation: "kv_write",
                    after: timeout,
                })
            }
        }
    }

    async fn kv_read(&self, election: &ElectionName, key: &KvKey) -> Result<Option<Bytes>> {
        self.kv_limits.check_key(key)?;
        let request = proto::KvReadRequest {
            election: election.as_str().to_owned(),
            key: key.as_str().to_owned(),
        };
        let reply = self
            .call(|mut c| {
                let request = request.clone();
                async move { c.kv_read(request).await }
            })
            .await?
            .into_inner();
        Ok(kv_read_from_proto(reply))
    }

    fn watch(&self, election: &ElectionName) -> LeaderStream {
        let (tx, rx) = watch_buffer::channel(WATCH_BUFFER);
        tokio::spawn(follow_leader(self.clone(), election.clone(), tx));
        // A reader that stopped reading gets `WatchLagged` after what was buffered (its
        // follower task ended) and watches again.
        rx.into_flat_stream()
    }

    async fn members(&self, role: &Role) -> Result<Vec<Member>> {
        let request = proto::RoleRequest {
            role: role.as_str().to_owned(),
        };
        let reply = self
            .call(|mut c| {
                let request = request.clone();
                async move { c.members(request).await }
            })
            .await?
            .into_inner();
        reply.members.into_iter().map(member_from_proto).collect()
    }

    fn watch_members(&self, role: &Role) -> MemberStream {
        let (tx, rx) = watch_buffer::channel(WATCH_BUFFER);
        tokio::spawn(follow_members(self.clone(), role.clone(), tx));
        rx.into_flat_stream()
    }
}
