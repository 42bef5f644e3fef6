//! `Session`: a registered member whose lease is kept alive in the background and which
//! fences itself, on the local monotonic clock, before the server can expire its lease.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backend::Backend;
use crate::clock;
use crate::error::{Error, Result};
use crate::leadership::Leadership;
use crate::types::{ElectionName, Lease, LeaseId, Member};

mod keepalive;
use keepalive::keepalive_loop;

/// The test-only mutant that turns self-fencing off (see `testing::mutant`).
pub(crate) mod mutant {
    #[cfg(any(test, feature = "testing"))]
    static NO_SELF_FENCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn set_no_self_fence(disabled: bool) {
        NO_SELF_FENCE.store(disabled, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether self-fencing is off; always false outside tests.
    pub(crate) fn no_self_fence() -> bool {
        #[cfg(any(test, feature = "testing"))]
        {
            NO_SELF_FENCE.load(std::sync::atomic::Ordering::SeqCst)
        }
        #[cfg(not(any(test, feature = "testing")))]
        {
            false
        }
    }
}

/// Default session TTL: how long the backend keeps a silent session alive.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// Default bound ρ on how much faster the server's clock may run than ours, as a
/// fraction (0.02 = 2 %). Real clocks drift by parts per million; 2 % also absorbs
/// a VM whose clock is slewed.
pub const DEFAULT_DRIFT: f64 = 0.02;

/// Why a session or a leadership ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LossReason {
    /// The backend said the lease is gone (expired or revoked by someone else).
    LeaseExpired,
    /// No keepalive was acknowledged in time: the session fenced itself on the local
    /// clock before the server could expire its lease.
    SelfFenced,
    /// The owner closed the session or dropped it.
    Closed,
    /// The leadership was resigned by its holder.
    Resigned,
    /// The election shows another leader (or none): the leader key was deleted behind
    /// the holder's back.
    Deposed,
}

impl LossReason {
    /// A stable lower-case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeaseExpired => "lease_expired",
            Self::SelfFenced => "self_fenced",
            Self::Closed => "closed",
            Self::Resigned => "resigned",
            Self::Deposed => "deposed",
        }
    }
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// The lease is alive and the self-fence deadline has not passed.
    Alive,
    /// The session is over; it never comes back (register a new one).
    Lost(LossReason),
}

/// How a session keeps itself alive and when it fences itself.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Requested TTL; the backend may grant more, never less.
    pub ttl: Duration,
    /// Bound ρ on relative clock-rate drift (see [`DEFAULT_DRIFT`]).
    pub drift: f64,
    /// Safety margin subtracted from the deadline: time the holder needs to notice and
    /// stop. `None` = TTL/20, at most 1 s.
    pub margin: Option<Duration>,
    /// Timeout of one keepalive or revoke request. `None` = TTL/3.
    pub request_timeout: Option<Duration>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            drift: DEFAULT_DRIFT,
            margin: None,
            request_timeout: None,
        }
    }
}

impl SessionOptions {
    /// The least time left to the self-fence deadline while every renewal succeeds: just
    /// before a renewal is due (TTL/3 after the last one was sent), TTL·(1−ρ) − margin −
    /// TTL/3, less the renewal's round trip. A holder that starts stopping work when
    /// the time left falls to its grace period needs a grace below this, or it would
    /// stop before every renewal.
    pub fn steady_time_left(&self) -> Duration {
        (self.ttl.mul_f64(1.0 - self.drift))
            .saturating_sub(self.margin_for(self.ttl))
            .saturating_sub(self.ttl / 3)
    }

    fn margin_for(&self, ttl: Duration) -> Duration {
        self.margin
            .unwrap_or_else(|| (ttl / 20).min(Duration::from_secs(1)))
    }

    fn request_timeout_for(&self, ttl: Duration) -> Duration {
        self.request_timeout.unwrap_or(ttl / 3)
    }

    fn validate(&self) -> Result<()> {
        if !(0.0..0.5).contains(&self.drift) {
            return Err(Error::InvalidArgument {
                what: "drift",
                reason: format!("{} is outside [0, 0.5)", self.drift),
            });
        }
        let margin = self.margin_for(self.ttl);
        if margin >= self.ttl.mul_f64(1.0 - self.drift) {
            return Err(Error::InvalidArgument {
                what: "margin",
                reason: format!(
                    "{margin:?} leaves no time to hold the lease with ttl {:?}",
                    self.ttl
                ),
            });
        }
        Ok(())
    }
}

/// Builds a [`Session`]; see [`Session::builder`].
#[derive(Debug)]
pub struct SessionBuilder {
    backend: Arc<dyn Backend>,
    member: Member,
    options: SessionOptions,
}

impl SessionBuilder {
    /// Sets the requested TTL (default [`DEFAULT_TTL`]).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options.ttl = ttl;
        self
    }

    /// Sets the clock-drift bound ρ (default [`DEFAULT_DRIFT`]).
    pub fn drift(mut self, drift: f64) -> Self {
        self.options.drift = drift;
        self
    }

    /// Sets the self-fence safety margin (default TTL/20, at most 1 s).
    pub fn margin(mut self, margin: Duration) -> Self {
        self.options.margin = Some(margin);
        self
    }

    /// Sets the timeout of one keepalive or revoke request (default TTL/3).
    pub fn request_timeout(mut self, request_timeout: Duration) -> Self {
        self.options.request_timeout = Some(request_timeout);
        self
    }

    /// Replaces all options at once.
    pub fn options(mut self, options: SessionOptions) -> Self {
        self.options = options;
        self
    }

    /// Registers the member and starts keeping its lease alive.
    ///
    /// # Errors
    /// `InvalidArgument` for a TTL outside the backend's bounds or bad fencing options,
    /// `AlreadyRegistered`, or the backend's error.
    pub async fn register(self) -> Result<Session> {
        Session::register(self.backend, self.member, self.options).await
    }
}

/// The state a session shares with its keepalive task and its leaderships.
#[derive(Debug)]
pub(crate) struct SessionShared {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) member: Member,
    pub(crate) lease: Lease,
    drift: f64,
    margin: Duration,
    pub(crate) request_timeout: Duration,
    deadline: Mutex<Instant>,
    state: watch::Sender<SessionState>,
    cancel: CancellationToken,
}

impl SessionShared {
    pub(crate) fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `ha_self_fence_seconds_left`: the time left before this process fences itself,
    /// as of the last keepalive attempt (every TTL/3, every TTL/15 while they fail; 0
    /// once the session is lost). It falling towards 0 warns of a loss.
    pub(crate) fn report_time_left(&self) {
        let left = match *self.state.borrow() {
            SessionState::Alive => self
                .fence_at()
                .saturating_duration_since(Instant::now())
                .as_secs_f64(),
            SessionState::Lost(_) => 0.0,
        };
        metrics::gauge!("ha_self_fence_seconds_left",
            "role" => self.member.role.to_string(), "backend" => self.backend.name())
        .set(left);
    }

    /// Moves the deadline forward after an acknowledged keepalive sent at `sent`.
    /// The server restarted the TTL no earlier than `sent`, so it cannot expire the
    /// lease before `sent + granted` by its clock; ours may run slow by ρ.
    fn extend(&self, sent: Instant, granted: Duration) {
        let candidate = sent
            + granted
                .mul_f64(1.0 - self.drift)
                .saturating_sub(self.margin);
        let mut deadline = self.deadline.lock().unwrap_or_else(PoisonError::into_inner);
        if candidate > *deadline {
            *deadline = candidate;
        }
    }

    pub(crate) fn state(&self) -> SessionState {
        *self.state.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<SessionState> {
        self.state.subscribe()
    }

    pub(crate) fn is_valid(&self) -> bool {
        self.state() == SessionState::Alive && (!self.past_deadline() || mutant::no_self_fence())
    }

    /// Whether the deadline passed, on the suspend-aware clock.
    fn past_deadline(&self) -> bool {
        clock::now() >= self.deadline()
    }

    /// The tokio instant of the self-fence deadline (if the host does not suspend
    /// before it), or (with the test-only mutant on) never.
    fn fence_at(&self) -> Instant {
        if mutant::no_self_fence() {
            Instant::now() + Duration::from_secs(86_400 * 365)
        } else {
            clock::to_tokio(self.deadline())
        }
    }

    /// Marks the session lost, once; later reasons do not overwrite the first.
    fn lose(&self, reason: LossReason) -> bool {
        let changed = self.state.send_if_modified(|state| {
            if *state == SessionState::Alive {
                *state = SessionState::Lost(reason);
                true
            } else {
                false
            }
        });
        if changed {
            self.cancel.cancel();
            self.report_time_left();
            match reason {
                LossReason::Closed => info!(
                    server_id = %self.member.server_id,
                    role = %self.member.role,
                    lease = %self.lease.id,
                    "session closed"
                ),
                _ => warn!(
                    server_id = %self.member.server_id,
                    role = %self.member.role,
                    lease = %self.lease.id,
                    reason = %reason,
                    "session lost"
                ),
            }
        }
        changed
    }

    pub(crate) fn lost_error(&self) -> Error {
        match self.state() {
            SessionState::Lost(LossReason::Closed) => Error::Closed("session"),
            _ => Error::LeaseExpired {
                lease: self.lease.id,
            },
        }
    }

    pub(crate) async fn wait_lost(&self) -> LossReason {
        let mut rx = self.subscribe();
        loop {
            if let SessionState::Lost(reason) = *rx.borrow_and_update() {
                return reason;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as `self`; this is unreachable in practice.
                return LossReason::Closed;
            }
        }
    }
}

/// A registered member with a live lease: the keepalive loop runs in the background
/// and the session fences itself when it can no longer prove its lease is alive.
///
/// The self-fence deadline is kept on the monotonic clock: the send time of the last
/// acknowledged keepalive + TTL·(1−ρ) − margin. The server restarted the TTL no earlier
/// than that send time, so when the deadline passes, the holder has stopped before the
/// server could hand anything it holds to someone else, even with the network down.
///
/// Dropping a session revokes its lease in the background; [`Session::close`] revokes and
/// waits.
#[derive(Debug)]
pub struct Session {
    shared: Arc<SessionShared>,
    keepalive: Option<JoinHandle<()>>,
}

impl Session {
    /// Starts building a session for `member` on `backend`.
    pub fn builder(backend: Arc<dyn Backend>, member: Member) -> SessionBuilder {
        SessionBuilder {
            backend,
            member,
            options: SessionOptions::default(),
        }
    }

    async fn register(
        backend: Arc<dyn Backend>,
        member: Member,
        options: SessionOptions,
    ) -> Result<Self> {
        backend.capabilities().check_ttl(options.ttl)?;
        options.validate()?;
        let sent = clock::now();
        let mut lease = backend.register(&member, options.ttl).await?;
        // The deadline never counts on more than was asked: a server that reports more
        // (a bug, a corrupt reply) would otherwise stretch it, up to never fencing.
        lease.ttl = lease.ttl.min(options.ttl);
        let (state, _) = watch::channel(SessionState::Alive);
        let shared = Arc::new(SessionShared {
            backend,
            member,
            lease,
            drift: options.drift,
            margin: options.margin_for(lease.ttl),
            request_timeout: options.request_timeout_for(lease.ttl),
            deadline: Mutex::new(sent),
            state,
            cancel: CancellationToken::new(),
        });
        shared.extend(sent, lease.ttl);
        info!(
            server_id = %shared.member.server_id,
            role = %shared.member.role,
            lease = %lease.id,
            ttl_ms = lease.ttl.as_millis() as u64,
            backend = shared.backend.name(),
            "registered"
        );
        shared.report_time_left();
        // Listed from the start, so a dashboard sees 0 rather than nothing.
        metrics::counter!("ha_keepalive_failures_total",
            "role" => shared.member.role.to_string(), "backend" => shared.backend.name())
        .increment(0);
        let keepalive = tokio::spawn(keepalive_loop(Arc::clone(&shared)));
        Ok(Self {
            shared,
            keepalive: Some(keepalive),
        })
    }

    /// The session's lease.
    pub fn lease(&self) -> LeaseId {
        self.shared.lease.id
    }

    /// The TTL the backend granted.
    pub fn ttl(&self) -> Duration {
        self.shared.lease.ttl
    }

    /// The registered member record.
    pub fn member(&self) -> &Member {
        &self.shared.member
    }

    /// The backend this session lives on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.shared.backend
    }

    /// Where the session stands now.
    pub fn state(&self) -> SessionState {
        self.shared.state()
    }

    /// Follows the session's state: `Alive`, then `Lost(reason)` once.
    pub fn watch_state(&self) -> watch::Receiver<SessionState> {
        self.shared.subscribe()
    }

    /// The instant (on tokio's clock) at which the session fences itself unless a
    /// keepalive is acknowledged first and the host does not suspend before: time
    /// suspended counts towards the deadline (CLOCK_BOOTTIME on Linux).
    pub fn deadline(&self) -> Instant {
        clock::to_tokio(self.shared.deadline())
    }

    /// Whether the session is alive and before its self-fence deadline. Local: no I/O,
    /// and it turns false at the deadline even if the keepalive task never ran.
    pub fn is_valid(&self) -> bool {
        self.shared.is_valid()
    }

    /// Resolves when the session is lost, with the reason.
    pub async fn lost(&self) -> LossReason {
        self.shared.wait_lost().await
    }

    /// Reads `key` from the guarded store of `election`, linearizably: the answer
    /// reflects every write acknowledged before the call. Any session may read, leader or
    /// not, so a standby can load the state it will take over.
    ///
    /// # Errors
    /// `InvalidArgument`/`TooLarge` for a bad key, `Timeout` after the request timeout,
    /// or the backend's error.
    pub async fn get(&self, election: &ElectionName, key: &str) -> Result<Option<Bytes>> {
        crate::kv::read(
            self.shared.backend.as_ref(),
            self.shared.request_timeout,
            election,
            key,
        )
        .await
    }

    /// Campaigns in `election` with `value` and waits in line until this session leads.
    ///
    /// # Errors
    /// `LeaseExpired` if the session is lost before or while waiting (the candidacy is
    /// withdrawn), `Closed` after [`close`](Self::close), or the backend's error.
    pub async fn campaign(
        &self,
        election: &ElectionName,
        value: impl Into<Bytes>,
    ) -> Result<Leadership> {
        let shared = &self.shared;
        if !shared.is_valid() {
            return Err(shared.lost_error());
        }
        debug!(
            server_id = %shared.member.server_id,
            role = %shared.member.role,
            election = %election,
            "campaigning"
        );
        let key = tokio::select! {
            biased;
            // Dropping the campaign future withdraws the candidacy (contract clause 4).
            key = shared.backend.campaign(shared.lease.id, election, value.into()) => key?,
            _ = shared.wait_lost() => return Err(shared.lost_error()),
        };
        Ok(Leadership::start(Arc::clone(shared), key))
    }

    /// Revokes the lease and waits for the backend to confirm. The session is invalid
    /// from the moment this is called.
    ///
    /// # Errors
    /// The backend's error if the revoke could not be delivered; the lease then ends by
    /// its TTL.
    pub async fn close(mut self) -> Result<()> {
        self.shared.lose(LossReason::Closed);
        if let Some(task) = self.keepalive.take() {
            let _ = task.await;
        }
        let shared = &self.shared;
        // Retried within the request timeout: a backend electing its own leader refuses
        // writes at once, and a revoke that lands frees the role sooner than the TTL.
        let give_up_at = Instant::now() + shared.request_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let within = give_up_at.saturating_duration_since(Instant::now());
            let result = match timeout(within, shared.backend.revoke(shared.lease.id)).await {
                Ok(result) => result,
                Err(_) => Err(Error::Timeout {
                    operation: "revoke",
                    after: shared.request_timeout,
                }),
            };
            match result {
                Err(error) if error.is_retryable() && Instant::now() + pause < give_up_at => {
                    debug!(lease = %shared.lease.id, %error, "revoke failed, retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(400));
                }
                other => return other,
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let Some(task) = self.keepalive.take() else {
            return; // closed
        };
        task.abort();
        self.shared.lose(LossReason::Closed);
        let shared = Arc::clone(&self.shared);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let revoked = timeout(
                    shared.request_timeout,
                    shared.backend.revoke(shared.lease.id),
                )
                .await;
                if !matches!(revoked, Ok(Ok(()))) {
                    warn!(lease = %shared.lease.id, "revoke on drop failed; the lease ends by its TTL");
                }
            });
        }
    }
}
