//! `ActiveStandby`: the coordinator loop every replica runs, the same on every backend.
//!
//! register → STANDBY (waiting in line, logging every 10 s) → campaign won → ACTIVE (the
//! user's activation runs with the leadership) → on loss: stop the activation and wait
//! for it, then exit or campaign again ([`LossPolicy`]). A shutdown stops the activation,
//! resigns and revokes, so a rolling restart hands over in milliseconds.

mod run;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{broadcast, watch};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, Instrument};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::leadership::Leadership;
use crate::session::{LossReason, SessionOptions};
use crate::types::{ElectionName, FencingToken, Leader, LeaseId, Member, Role, ServerId};

use run::run_loop;

/// An error an activation may return; anything that converts into it (including
/// `anyhow::Error`) works.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Default interval of the `"{role} is in STANDBY ..."` log line, as Milvus logs it.
pub const DEFAULT_STANDBY_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Capacity of the event channel; a subscriber that falls further behind sees `Lagged`.
const EVENT_CAPACITY: usize = 256;

/// What the coordinator does after it lost its leadership or its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossPolicy {
    /// Stop, and let the process supervisor restart the process (what Milvus does). The
    /// default: a process that lost its lease may hold stale state, and a restart is the
    /// simplest way to be sure it does not.
    #[default]
    Exit,
    /// Go back to STANDBY and campaign again, registering a new session if the old one
    /// is gone. For activations that rebuild all their state when they start.
    Recampaign,
}

/// Where a coordinator stands, published on a [`tokio::sync::watch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoleState {
    /// Registering its session.
    Starting,
    /// Registered and waiting in line behind the active.
    Standby,
    /// Leads the election. `ready` turns true when the activation reported ready (and
    /// the leader value says `active`); route clients only to a ready active.
    Active {
        /// The leadership's fencing token.
        token: FencingToken,
        /// Whether the activation reported ready.
        ready: bool,
    },
    /// The activation has stopped (leadership lost, shutdown, or it returned); the loop
    /// is resigning, revoking or deciding what comes next. Not active: do not route here.
    Stopping,
    /// The loop ended (shutdown, loss under [`LossPolicy::Exit`], or the activation
    /// returned).
    Stopped,
}

impl RoleState {
    /// Whether this is an active that reported ready: the only state clients should be
    /// routed to.
    pub fn is_ready_active(&self) -> bool {
        matches!(self, Self::Active { ready: true, .. })
    }

    /// A stable lower-case name, for logs, metrics and probes.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Standby => "standby",
            Self::Active { ready: false, .. } => "activating",
            Self::Active { ready: true, .. } => "active",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
        }
    }
}

/// How the coordinator loop ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Shutdown was requested: the activation was stopped, the leadership resigned and
    /// the session revoked.
    Shutdown,
    /// The leadership or the session was lost under [`LossPolicy::Exit`].
    Lost(LossReason),
    /// The activation returned `Ok(())`: the leadership was resigned and the session
    /// revoked.
    Finished,
}

/// Everything that happens to a coordinator, in order, for logs and tooling. The
/// [`RoleState`] watch coalesces; this channel does not (up to its capacity).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoordinatorEvent {
    /// A session was registered.
    Registered {
        /// Its lease.
        lease: LeaseId,
        /// The TTL the backend granted.
        ttl: Duration,
    },
    /// Waiting in line; `leader` is the active at that moment, if the backend said.
    Standby {
        /// The current leader, if any.
        leader: Option<Leader>,
    },
    /// The campaign was won; the activation starts now.
    Elected {
        /// The leadership's fencing token.
        token: FencingToken,
    },
    /// The activation reported ready and the leader value now says `active`.
    Ready {
        /// The leadership's fencing token.
        token: FencingToken,
    },
    /// The leadership ended without a resign; the activation was stopped first.
    Lost {
        /// The lost leadership's token.
        token: FencingToken,
        /// Why.
        reason: LossReason,
    },
    /// The leadership was resigned (shutdown, or the activation finished).
    Resigned {
        /// The resigned leadership's token.
        token: FencingToken,
    },
    /// The session was lost while in STANDBY.
    SessionLost {
        /// Why.
        reason: LossReason,
    },
    /// The loop ended.
    Stopped,
}

/// Whether an active is ready for clients, as published in its leader value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Elected, still starting (loading metadata, opening ports): do not route to it.
    Activating,
    /// Serving.
    Active,
}

impl Readiness {
    /// The leader value an [`ActiveStandby`] publishes: `"activating <address>"` or
    /// `"active <address>"` (plain text, so `etcdctl elect -l` shows it readably).
    pub fn leader_value(self, address: &str) -> Bytes {
        Bytes::from(format!("{} {address}", self.as_str()))
    }

    /// Reads a leader value written by [`leader_value`](Self::leader_value): the
    /// readiness and the address. `None` for values written by something else.
    pub fn parse(value: &[u8]) -> Option<(Self, &str)> {
        let text = std::str::from_utf8(value).ok()?;
        let (word, address) = text.split_once(' ').unwrap_or((text, ""));
        let readiness = match word {
            "activating" => Self::Activating,
            "active" => Self::Active,
            _ => return None,
        };
        Some((readiness, address))
    }

    /// `"activating"` or `"active"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Activating => "activating",
            Self::Active => "active",
        }
    }
}

/// What the activation is given: the leadership it runs under, and the way to report
/// readiness. The runtime cancels [`stopping`](Self::stopping) and then drops the
/// activation future when the leadership ends, and waits for that before it reports
/// STANDBY or stops.
#[derive(Debug, Clone)]
pub struct Active {
    leadership: Arc<Leadership>,
    stopping: CancellationToken,
    shared: Arc<Shared>,
}

impl Active {
    /// The fencing token: pass it with every write so stores can reject a deposed active.
    pub fn token(&self) -> FencingToken {
        self.leadership.token()
    }

    /// The leadership itself (`is_valid`, `lost`, `proclaim`).
    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    /// Whether the leadership still holds; no I/O. Check it before acting as active.
    pub fn is_valid(&self) -> bool {
        self.leadership.is_valid()
    }

    /// The session's self-fence deadline as of now; see [`Leadership::deadline`].
    pub fn deadline(&self) -> tokio::time::Instant {
        self.leadership.deadline()
    }

    /// Cancelled when the activation must stop (leadership lost or shutdown). Hand
    /// child tokens to tasks the activation spawns, so they stop with it.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader {
            election: self.leadership.election().clone(),
            current: None,
        }
    }

    /// Reports the activation ready: the leader value becomes `"active <address>"` and
    /// the role state `Active { ready: true }`. Call it once the coordinator serves.
    ///
    /// While the backend is unreachable (a Raft leader change, an etcd restart) it keeps
    /// trying for as long as the leadership holds.
    ///
    /// # Errors
    /// `NotLeader` if the leadership ended first, or the backend's non-retryable error.
    pub async fn ready(&self) -> Result<()> {
        let value = Readiness::Active.leader_value(&self.shared.config.address);
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.leadership.proclaim(value.clone()).await {
                Ok(()) => break,
                Err(_) if !self.is_valid() || self.stopping.is_cancelled() => {
                    return Err(self.not_leader());
                }
                Err(error) if error.is_retryable() => {
                    debug!(%error, "proclaiming ready failed, retrying");
                    tokio::select! {
                        biased;
                        () = sleep(backoff) => {}
                        () = self.stopping.cancelled() => return Err(self.not_leader()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(error) => return Err(error),
            }
        }
        let token = self.token();
        let still_active = self.is_valid() && !self.stopping.is_cancelled();
        let changed = self.shared.state.send_if_modified(|state| {
            let activating = still_active
                && matches!(state, RoleState::Active { token: t, ready: false } if *t == token);
            if activating {
                *state = RoleState::Active { token, ready: true };
            }
            activating
        });
        if changed {
            info!(token = %token, "ACTIVE is ready");
            self.shared.emit(CoordinatorEvent::Ready { token });
        }
        Ok(())
    }
}

/// The configuration a loop runs with.
#[derive(Debug)]
struct Config {
    backend: Arc<dyn Backend>,
    member: Member,
    election: ElectionName,
    address: String,
    session: SessionOptions,
    standby_log_interval: Duration,
    stop_grace: Duration,
    policy: LossPolicy,
    enabled: bool,
}

/// What the loop shares with its handle and with `Active`.
#[derive(Debug)]
struct Shared {
    config: Config,
    state: watch::Sender<RoleState>,
    events: broadcast::Sender<CoordinatorEvent>,
    shutdown: CancellationToken,
}

impl Shared {
    fn emit(&self, event: CoordinatorEvent) {
        // No subscriber is fine: events are for whoever listens.
        let _ = self.events.send(event);
    }

    fn set_state(&self, state: RoleState) {
        self.state.send_replace(state);
        let active = f64::from(u8::from(matches!(state, RoleState::Active { .. })));
        metrics::gauge!("ha_active", "role" => self.config.member.role.to_string(),
                        "election" => self.config.election.to_string())
        .set(active);
    }

    fn role_label(&self) -> String {
        self.config.member.role.to_string()
    }
}

/// Builds an [`ActiveStandby`]; see [`ActiveStandby::builder`].
pub struct ActiveStandbyBuilder {
    config: Config,
    shutdown_on: Option<BoxFuture<'static, ()>>,
    state: watch::Sender<RoleState>,
    events: broadcast::Sender<CoordinatorEvent>,
}

impl std::fmt::Debug for ActiveStandbyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveStandbyBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ActiveStandbyBuilder {
    /// The address clients use to reach this replica when it is active; it is published
    /// in the member record and the leader value.
    pub fn address(mut self, address: impl Into<String>) -> Self {
        let address = address.into();
        self.config.member.address.clone_from(&address);
        self.config.address = address;
        self
    }

    /// Adds a metadata entry to the member record (version, zone, ...).
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.member.metadata.insert(key.into(), value.into());
        self
    }

    /// Replaces all metadata of the member record.
    pub fn metadata_map(mut self, metadata: BTreeMap<String, String>) -> Self {
        self.config.member.metadata = metadata;
        self
    }

    /// The election to campaign in; default: the role's name (one active per role).
    pub fn election(mut self, election: ElectionName) -> Self {
        self.config.election = election;
        self
    }

    /// The session TTL (default [`DEFAULT_TTL`](crate::DEFAULT_TTL)): how long a crashed
    /// active holds the role before a standby takes over.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.session.ttl = ttl;
        self
    }

    /// All session options (TTL, drift bound, margin, request timeout).
    pub fn session_options(mut self, options: SessionOptions) -> Self {
        self.config.session = options;
        self
    }

    /// How often a STANDBY logs `"{role} is in STANDBY ..."` (default 10 s).
    pub fn standby_log_interval(mut self, every: Duration) -> Self {
        self.config.standby_log_interval = every;
        self
    }

    /// How long an activation may take to return after [`Active::stopping`] is
    /// cancelled by a shutdown or a loss before it is dropped (default zero: dropped at
    /// once). The loss is reported, and the role resigned, only once it has returned:
    /// an activation that stops something outside the process (a child it supervises)
    /// gets the time to do it. A loss at the self-fence deadline leaves no time: such an
    /// activation watches [`Active::deadline`] and stops before it.
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.config.stop_grace = grace;
        self
    }

    /// What to do after a loss (default [`LossPolicy::Exit`]).
    pub fn on_loss(mut self, policy: LossPolicy) -> Self {
        self.config.policy = policy;
        self
    }

    /// `true` (default): active-standby. `false`: a single exclusive active, as Milvus
    /// runs without active-standby: starting fails with `AlreadyRegistered` while
    /// another instance of the role is alive.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.config.enabled = enabled;
        self
    }

    /// Shuts down (stop the activation, resign, revoke) when `signal` completes, e.g.
    /// on SIGTERM.
    pub fn shutdown_on(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.shutdown_on = Some(signal.boxed());
        self
    }

    /// Follows the role state from before the loop starts.
    pub fn watch_state(&self) -> watch::Receiver<RoleState> {
        self.state.subscribe()
    }

    /// Receives every [`CoordinatorEvent`] from before the loop starts.
    pub fn subscribe(&self) -> broadcast::Receiver<CoordinatorEvent> {
        self.events.subscribe()
    }

    /// Starts the loop in the background. `activation` is called each time this replica
    /// becomes active, with the [`Active`] it runs under.
    pub fn spawn<F, Fut, E>(self, activation: F) -> ActiveStandby
    where
        F: FnMut(Active) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let span = info_span!(
            "active_standby",
            role = %self.config.member.role,
            server_id = %self.config.member.server_id,
            election = %self.config.election,
        );
        let shared = Arc::new(Shared {
            config: self.config,
            state: self.state,
            events: self.events,
            shutdown: CancellationToken::new(),
        });
        if let Some(signal) = self.shutdown_on {
            let shutdown = shared.shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    biased;
                    () = signal => shutdown.cancel(),
                    () = shutdown.cancelled() => {}
                }
            });
        }
        let task = tokio::spawn(run_loop(Arc::clone(&shared), activation).instrument(span));
        ActiveStandby {
            shared,
            task: Some(task),
        }
    }

    /// Runs the loop until it ends; see [`spawn`](Self::spawn).
    ///
    /// # Errors
    /// See [`ActiveStandby::wait`].
    pub async fn run<F, Fut, E>(self, activation: F) -> Result<Outcome>
    where
        F: FnMut(Active) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        self.spawn(activation).wait().await
    }
}

/// A running coordinator loop. Dropping it requests shutdown (the loop still stops its
/// activation, resigns and revokes in the background); [`stop`](Self::stop) requests it
/// and waits.
#[derive(Debug)]
pub struct ActiveStandby {
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<Result<Outcome>>>,
}

impl ActiveStandby {
    /// Starts building the loop of `role` for `server_id` on `backend`.
    pub fn builder(
        backend: Arc<dyn Backend>,
        role: Role,
        server_id: ServerId,
    ) -> ActiveStandbyBuilder {
        let election = ElectionName::from_role(&role);
        let (state, _) = watch::channel(RoleState::Starting);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        ActiveStandbyBuilder {
            config: Config {
                backend,
                member: Member::new(server_id, role, ""),
                election,
                address: String::new(),
                session: SessionOptions::default(),
                standby_log_interval: DEFAULT_STANDBY_LOG_INTERVAL,
                stop_grace: Duration::ZERO,
                policy: LossPolicy::default(),
                enabled: true,
            },
            shutdown_on: None,
            state,
            events,
        }
    }

    /// Where the coordinator stands now.
    pub fn state(&self) -> RoleState {
        *self.shared.state.borrow()
    }

    /// Follows the role state.
    pub fn watch_state(&self) -> watch::Receiver<RoleState> {
        self.shared.state.subscribe()
    }

    /// Receives the events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<CoordinatorEvent> {
        self.shared.events.subscribe()
    }

    /// Asks the loop to shut down; [`wait`](Self::wait) for it to finish.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Waits for the loop to end.
    ///
    /// # Errors
    /// The registration error (`AlreadyRegistered`, `InvalidArgument`, the backend's
    /// error), an error that ended the campaign, or `Activation` when the activation
    /// returned an error or panicked (the leadership was resigned first).
    pub async fn wait(mut self) -> Result<Outcome> {
        let Some(task) = self.task.take() else {
            return Err(Error::Closed("active-standby loop"));
        };
        match task.await {
            Ok(result) => result,
            Err(join) => Err(Error::Activation {
                source: format!("the coordinator loop failed: {join}").into(),
            }),
        }
    }

    /// Shuts down and waits: stop the activation, resign, revoke.
    ///
    /// # Errors
    /// As [`wait`](Self::wait).
    pub async fn stop(self) -> Result<Outcome> {
        self.shutdown();
        self.wait().await
    }
}

impl Drop for ActiveStandby {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.shared.shutdown.cancel();
        }
    }
}
