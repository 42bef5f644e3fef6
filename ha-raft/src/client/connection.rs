//! A `RaftClient`'s connections: its options, one channel per endpoint over an
//! `EndpointSet`, and calls bounded per attempt, repeated on another endpoint when
//! safe, each reply's leader hint followed.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ha_core::endpoints::{At, EndpointSet};
use ha_core::{Backend, ElectionName, Error, KvLimits, Result};
use tokio::sync::oneshot;
use tokio::time::{sleep, timeout_at, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::net::channel::{channel, BearerToken};
use crate::net::wire::from_status;
use crate::proto;
use crate::proto::coordination_client::CoordinationClient;
use ha_core::ClientTls;

use super::held::{HeldChannels, HeldSlot};

/// The client API over one channel, with the bearer token (if any) on every call.
pub(super) type Api = CoordinationClient<InterceptedService<Channel, BearerToken>>;

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
    pub(super) inner: Arc<ClientInner>,
    pub(super) kv_limits: KvLimits,
}

#[derive(Debug)]
pub(super) struct ClientInner {
    pub(super) endpoints: Vec<String>,
    pub(super) channels: Vec<Channel>,
    /// Per endpoint, index-aligned with `channels`: the connections of held calls.
    pub(super) held: Vec<Arc<HeldChannels>>,
    /// Which endpoint is in use, which failed, and the timing from the TTLs.
    pub(super) set: Arc<EndpointSet>,
    pub(super) request_timeout: Duration,
    pub(super) token: BearerToken,
    /// Where keepalives wait for their batch (see `keepalives.rs`).
    pub(super) keepalives: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Waiter>>>,
}

/// Whether an attempt that timed out may be repeated on another endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Repeat {
    /// Repeating changes nothing (reads, renewals, idempotent writes).
    Always,
    /// The attempt may have been applied and a repeat would report on that instead
    /// (registering: the repeat would find the id taken by the first).
    NotAfterTimeout,
}

/// Whether a failed call may succeed against another endpoint or later.
pub(super) fn transient(status: &Status) -> bool {
    (matches!(
        status.code(),
        Code::Unavailable | Code::Cancelled | Code::Unknown
    ) || (status.code() == Code::DeadlineExceeded && status.details().is_empty()))
        && crate::net::tls::auth_error(status).is_none()
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

    pub(super) fn api(&self, channel: Channel) -> Api {
        CoordinationClient::with_interceptor(channel, self.inner.token.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// The endpoint in use, for a short call.
    pub(super) fn client(&self) -> (At, Api) {
        let at = self.inner.set.in_use();
        (at, self.api(self.inner.channels[at.slot].clone()))
    }

    /// The endpoint in use, for a call that may stay open (see `held.rs`); the slot
    /// must live as long as the call.
    pub(super) fn held_client(&self) -> Result<(At, Api, HeldSlot)> {
        let at = self.inner.set.in_use();
        let (channel, slot) = self.inner.held[at.slot].take()?;
        Ok((at, self.api(channel), slot))
    }

    /// Resolves once the endpoint of `at` has failed: a held call on it is abandoned.
    pub(super) async fn failed_since(&self, at: At) {
        self.inner.set.failed_since(at).await;
    }

    /// Leaves the endpoint of `at` for another, `why` saying what it did.
    pub(super) fn leave(&self, at: At, why: &str) {
        self.inner.set.leave(at, why);
    }

    /// Sends the next calls to the endpoint a reply names as the Raft leader, when the
    /// client knows it by that address.
    pub(super) fn follow_hint(&self, metadata: &tonic::metadata::MetadataMap) {
        let Some(leader) = metadata
            .get(crate::net::limits::LEADER_METADATA)
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
    pub(super) async fn call<T, F, Fut>(&self, call: F) -> Result<tonic::Response<T>>
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
    pub(super) async fn call_status<T, F, Fut>(
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

/// A keepalive waiting for its batch: the lease, and where its result goes.
pub(crate) type Waiter = (u64, oneshot::Sender<Result<Duration>>);

/// Why a whole call failed, kept so each waiter gets its own typed error.
#[derive(Debug)]
pub(crate) enum CallFailure {
    /// The last status a node answered.
    Status(Status),
    /// No answer within the client's request timeout.
    Timeout(Duration),
}

impl CallFailure {
    /// The error a caller sees.
    pub(crate) fn error(&self, operation: &'static str) -> Error {
        match self {
            Self::Status(status) => from_status(status),
            Self::Timeout(after) => Error::Timeout {
                operation,
                after: *after,
            },
        }
    }
}
