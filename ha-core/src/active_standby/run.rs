//! The loop behind [`ActiveStandby`](super::ActiveStandby): register, wait in line,
//! serve each won term with the activation, and end each session as the policy says.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{interval_at, sleep, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::error::{Error, Result};
use crate::leadership::Leadership;
use crate::session::{LossReason, Session, SessionState};
use crate::types::Leader;

use super::{
    Active, BoxError, Config, CoordinatorEvent, LossPolicy, Outcome, Readiness, RoleState, Shared,
};

/// How one session's life ended.
enum SessionEnd {
    Shutdown,
    Finished,
    Lost(LossReason),
    Failed(Error),
}

pub(super) async fn run_loop<F, Fut, E>(shared: Arc<Shared>, mut activation: F) -> Result<Outcome>
where
    F: FnMut(Active) -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: Into<BoxError> + Send + 'static,
{
    let _stopped = StoppedOnDrop(Arc::clone(&shared));
    let config = &shared.config;
    let mut first = true;
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    let result = loop {
        shared.set_state(RoleState::Starting);
        let registered = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => break Ok(Outcome::Shutdown),
            registered = register(config) => registered,
        };
        let session = match registered {
            Ok(session) => session,
            // The backend may still be starting (a Raft group electing its first
            // leader), and our own old lease (a restart, or a loss whose revoke failed)
            // holds our server id until its TTL: retry those, the first time for at
            // most a TTL and the request time.
            Err(error)
                if (error.is_retryable() || is_own_registration(config, &error))
                    && (!first
                        || started.elapsed() < config.session.ttl + Duration::from_secs(5)) =>
            {
                warn!(%error, "cannot register a new session, retrying");
                tokio::select! {
                    biased;
                    () = shared.shutdown.cancelled() => break Ok(Outcome::Shutdown),
                    () = sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(error) => break Err(error),
        };
        first = false;
        backoff = Duration::from_millis(100);
        shared.emit(CoordinatorEvent::Registered {
            lease: session.lease(),
            ttl: session.ttl(),
        });
        let end = serve_session(&shared, &session, &mut activation).await;
        match end {
            SessionEnd::Lost(reason) if config.policy == LossPolicy::Recampaign => {
                info!(reason = %reason, "registering again (loss policy: recampaign)");
                // Revoke first: the server may still hold the old lease (we fenced
                // ourselves before it expires), and it would refuse our server id.
                if let Err(error) = session.close().await {
                    debug!(%error, "revoke of the lost session failed");
                }
            }
            end => {
                if let Err(error) = session.close().await {
                    warn!(%error, "revoke failed; the lease ends by its TTL");
                }
                break match end {
                    SessionEnd::Shutdown => Ok(Outcome::Shutdown),
                    SessionEnd::Finished => Ok(Outcome::Finished),
                    SessionEnd::Lost(reason) => Ok(Outcome::Lost(reason)),
                    SessionEnd::Failed(error) => Err(error),
                };
            }
        }
    };
    match &result {
        Ok(outcome) => info!(?outcome, "stopped"),
        Err(error) => warn!(%error, "stopped"),
    }
    result
}

fn is_own_registration(config: &Config, error: &Error) -> bool {
    matches!(error, Error::AlreadyRegistered { server_id, .. } if *server_id == config.member.server_id)
}

/// Publishes `Stopped` when the loop ends, however it ends (a panic included), and
/// ends the `shutdown_on` watcher.
struct StoppedOnDrop(Arc<Shared>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.set_state(RoleState::Stopped);
        self.0.emit(CoordinatorEvent::Stopped);
        self.0.shutdown.cancel();
    }
}

/// Registers a session; in exclusive mode (`enabled = false`) fails if another member of
/// the role is alive.
async fn register(config: &Config) -> Result<Session> {
    let session = Session::builder(Arc::clone(&config.backend), config.member.clone())
        .options(config.session.clone())
        .register()
        .await?;
    if config.enabled {
        return Ok(session);
    }
    let members = match config.backend.members(&config.member.role).await {
        Ok(members) => members,
        Err(error) => {
            if let Err(revoke) = session.close().await {
                warn!(%revoke, "revoke after a failed exclusive check failed");
            }
            return Err(error);
        }
    };
    if let Some(other) = members
        .iter()
        .find(|m| m.server_id != config.member.server_id)
    {
        let error = Error::AlreadyRegistered {
            role: config.member.role.clone(),
            server_id: other.server_id,
        };
        if let Err(revoke) = session.close().await {
            warn!(%revoke, "revoke after a refused exclusive start failed");
        }
        return Err(error);
    }
    Ok(session)
}

/// STANDBY → ACTIVE → (loss) → STANDBY ... on one session.
async fn serve_session<F, Fut, E>(
    shared: &Arc<Shared>,
    session: &Session,
    activation: &mut F,
) -> SessionEnd
where
    F: FnMut(Active) -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: Into<BoxError> + Send + 'static,
{
    loop {
        let leadership = match wait_in_line(shared, session).await {
            Ok(leadership) => Arc::new(leadership),
            Err(end) => return end,
        };
        let span = info_span!("active", token = %leadership.token());
        let ended = activate(shared, &leadership, &span, activation).await;
        let ending = end_activation(shared, session, &leadership, ended).instrument(span);
        if let Some(end) = ending.await {
            return end;
        }
    }
}

/// Runs the activation for one won term until shutdown, the loss of the leadership or
/// its return; it has stopped, and the state says so, when this returns.
async fn activate<F, Fut, E>(
    shared: &Arc<Shared>,
    leadership: &Arc<Leadership>,
    span: &tracing::Span,
    activation: &mut F,
) -> ActiveEnd<E>
where
    F: FnMut(Active) -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: Into<BoxError> + Send + 'static,
{
    let token = leadership.token();
    shared.set_state(RoleState::Active {
        token,
        ready: false,
    });
    metrics::counter!("ha_elections_won_total", "role" => shared.role_label(),
                      "election" => shared.config.election.to_string())
    .increment(1);
    span.in_scope(|| info!("became ACTIVE, starting the activation"));
    shared.emit(CoordinatorEvent::Elected { token });

    let stopping = CancellationToken::new();
    let active = Active {
        leadership: Arc::clone(leadership),
        stopping: stopping.clone(),
        shared: Arc::clone(shared),
    };
    let mut running = tokio::spawn(activation(active).instrument(span.clone()));
    let ended = tokio::select! {
        biased;
        () = shared.shutdown.cancelled() => ActiveEnd::Shutdown,
        reason = leadership.lost() => ActiveEnd::Lost(reason),
        joined = &mut running => ActiveEnd::Returned(joined),
    };
    // Stop the activation, and wait until it has, before anything else is reported.
    stopping.cancel();
    if !matches!(ended, ActiveEnd::Returned(_)) {
        let grace = shared.config.stop_grace;
        if grace.is_zero() || tokio::time::timeout(grace, &mut running).await.is_err() {
            running.abort();
            let _ = (&mut running).await;
        }
    }
    // Not active from here on, before any I/O (resign, revoke, probes).
    shared.set_state(RoleState::Stopping);
    // An activation that returned because its leadership had just ended (ready()
    // said NotLeader before lost() fired) lost it; it did not finish or fail.
    match ended {
        ActiveEnd::Returned(_) if !leadership.is_valid() => {
            ActiveEnd::Lost(leadership.lost().await)
        }
        ended => ended,
    }
}

/// Reports how a term ended and resigns where it still can; `None` when the session
/// lives on and goes back in line (deposed, with [`LossPolicy::Recampaign`]).
async fn end_activation<E>(
    shared: &Shared,
    session: &Session,
    leadership: &Leadership,
    ended: ActiveEnd<E>,
) -> Option<SessionEnd>
where
    E: Into<BoxError> + Send + 'static,
{
    let config = &shared.config;
    let token = leadership.token();
    match ended {
        ActiveEnd::Lost(reason) => {
            let reason = refine_loss(session, reason).await;
            metrics::counter!("ha_leadership_lost_total", "role" => shared.role_label(),
                              "election" => config.election.to_string(),
                              "reason" => reason.as_str())
            .increment(1);
            warn!(reason = %reason, "leadership lost, activation stopped");
            shared.emit(CoordinatorEvent::Lost { token, reason });
            if config.policy == LossPolicy::Exit {
                return Some(SessionEnd::Lost(reason));
            }
            if let SessionState::Lost(session_reason) = session.state() {
                return Some(SessionEnd::Lost(session_reason));
            }
            // The session lives on (deposed): back in line on it.
            None
        }
        ActiveEnd::Shutdown => {
            resign(shared, leadership).await;
            Some(SessionEnd::Shutdown)
        }
        ActiveEnd::Returned(Ok(Ok(()))) => {
            info!("activation finished");
            resign(shared, leadership).await;
            Some(SessionEnd::Finished)
        }
        ActiveEnd::Returned(Ok(Err(error))) => {
            let source: BoxError = error.into();
            warn!(error = %source, "activation failed");
            resign(shared, leadership).await;
            Some(SessionEnd::Failed(Error::Activation { source }))
        }
        ActiveEnd::Returned(Err(join)) => {
            warn!(error = %join, "activation panicked");
            resign(shared, leadership).await;
            Some(SessionEnd::Failed(Error::Activation {
                source: format!("the activation panicked: {join}").into(),
            }))
        }
    }
}

/// A lease that expires usually shows first as a vacant election (the leader watch is
/// faster than the next keepalive). Once the activation is stopped, ask the backend
/// whether the lease is gone, so logs and metrics say `lease_expired`, not `deposed`.
async fn refine_loss(session: &Session, reason: LossReason) -> LossReason {
    if reason != LossReason::Deposed {
        return reason;
    }
    if let SessionState::Lost(session_reason) = session.state() {
        return session_reason;
    }
    let probe = tokio::time::timeout(
        Duration::from_secs(1).min(session.ttl() / 3),
        session.backend().keep_alive(session.lease()),
    );
    match probe.await {
        Ok(Err(Error::LeaseExpired { .. })) => LossReason::LeaseExpired,
        _ => reason,
    }
}

enum ActiveEnd<E> {
    Shutdown,
    Lost(LossReason),
    Returned(std::result::Result<std::result::Result<(), E>, tokio::task::JoinError>),
}

async fn resign(shared: &Shared, leadership: &Leadership) {
    let token = leadership.token();
    match leadership.resign().await {
        Ok(()) => info!("resigned"),
        Err(error) => warn!(%error, "resign failed; the leadership ends with the session"),
    }
    shared.emit(CoordinatorEvent::Resigned { token });
}

/// STANDBY: campaign, logging every interval while in line, until elected, the session
/// is lost, or shutdown.
async fn wait_in_line(
    shared: &Shared,
    session: &Session,
) -> std::result::Result<Leadership, SessionEnd> {
    let config = &shared.config;
    let role = &config.member.role;
    let mut backoff = Duration::from_millis(100);
    loop {
        if let SessionState::Lost(reason) = session.state() {
            shared.emit(CoordinatorEvent::SessionLost { reason });
            return Err(SessionEnd::Lost(reason));
        }
        shared.set_state(RoleState::Standby);
        let leader = current_leader(config).await;
        if config.enabled {
            info!(leader = %leader_id(leader.as_ref()), "{role} is in STANDBY ...");
        }
        shared.emit(CoordinatorEvent::Standby { leader });
        let value = Readiness::Activating.leader_value(&config.address);
        let campaign = session.campaign(&config.election, value);
        tokio::pin!(campaign);
        // Bounded so a zero or absurd interval cannot panic the loop.
        let every = config
            .standby_log_interval
            .clamp(Duration::from_millis(10), Duration::from_secs(86_400));
        let mut log_every = interval_at(Instant::now() + every, every);
        log_every.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let won = loop {
            tokio::select! {
                biased;
                () = shared.shutdown.cancelled() => return Err(SessionEnd::Shutdown),
                won = &mut campaign => break won,
                _ = log_every.tick(), if config.enabled => {
                    let leader = current_leader(config).await;
                    info!(leader = %leader_id(leader.as_ref()), "{role} is in STANDBY ...");
                }
            }
        };
        match won {
            Ok(leadership) => return Ok(leadership),
            Err(Error::LeaseExpired { .. }) => {
                let reason = match session.state() {
                    SessionState::Lost(reason) => reason,
                    SessionState::Alive => LossReason::LeaseExpired,
                };
                shared.emit(CoordinatorEvent::SessionLost { reason });
                return Err(SessionEnd::Lost(reason));
            }
            Err(error) => {
                if let SessionState::Lost(reason) = session.state() {
                    shared.emit(CoordinatorEvent::SessionLost { reason });
                    return Err(SessionEnd::Lost(reason));
                }
                if !error.is_retryable() {
                    return Err(SessionEnd::Failed(error));
                }
                warn!(%error, "campaign failed, retrying");
                tokio::select! {
                    biased;
                    () = shared.shutdown.cancelled() => return Err(SessionEnd::Shutdown),
                    () = sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The leader's server id for a log line, or `none`.
fn leader_id(leader: Option<&Leader>) -> String {
    leader
        .and_then(|l| l.server_id)
        .map_or_else(|| "none".to_owned(), |id| id.to_string())
}

/// The current leader for a log line or event: best effort, and never long (the campaign
/// is not polled meanwhile).
async fn current_leader(config: &Config) -> Option<Leader> {
    let lookup = config.backend.leader(&config.election);
    match tokio::time::timeout(Duration::from_secs(1), lookup).await {
        Ok(Ok(leader)) => leader,
        _ => None,
    }
}
