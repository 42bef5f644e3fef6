//! `ha run -- CMD` (and `ha node --active-standby -- CMD`): the command runs only while
//! this replica is ACTIVE, in a process group of its own, and the whole group has been
//! stopped and reaped before the session's self-fence deadline, so before the lease can
//! end on the server and another replica start its own.
//!
//! Stopping: SIGTERM to the group, SIGKILL at the end of the grace period (`--kill-grace`)
//! or at the deadline minus [`kill_margin`], whichever comes first, then every process of
//! the group reaped. It starts when the time left to the deadline falls to the grace (the
//! keepalives are failing), on shutdown (SIGTERM/SIGINT to `ha`), and when the leadership
//! is lost (revoked, deposed).

pub mod child;
pub mod health;
pub mod ready;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clap::Args;
use ha::{Active, SessionOptions};
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::{sleep_until, Instant};

use crate::output::{Event, Printer};
use child::{Child, Ended};
use health::Health;
use ready::Probe;

/// The default grace between SIGTERM and SIGKILL, when the TTL allows it.
const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// `ha run` / `ha node --active-standby` flags of the supervised command.
#[derive(Debug, Clone, Args)]
pub struct ChildArgs {
    /// Time between SIGTERM and SIGKILL when the command must stop (default 5 s, or less
    /// when the TTL leaves less; seconds, or 500ms).
    #[arg(long, value_parser = parse_grace)]
    pub kill_grace: Option<f64>,
    /// The command is ready (and the leader value says `active`) once this HOST:PORT
    /// accepts a TCP connection.
    #[arg(long, value_name = "HOST:PORT")]
    pub ready_tcp: Option<String>,
    /// The command is ready once `GET URL` (http://) answers 2xx.
    #[arg(long, value_name = "URL")]
    pub ready_http: Option<String>,
    /// A command not ready within this is stopped and the role handed on.
    #[arg(long, default_value = "60s", value_parser = parse_grace)]
    pub ready_timeout: f64,
    /// Once ready, the command must keep accepting TCP connections on this HOST:PORT...
    #[arg(long, value_name = "HOST:PORT")]
    pub health_tcp: Option<String>,
    /// ... or keep answering `GET URL` (http://) with 2xx; after --health-failures
    /// failed tries in a row it is stopped and the role handed on (--recampaign: back
    /// in line).
    #[arg(long, value_name = "URL")]
    pub health_http: Option<String>,
    /// Time between health tries (seconds, or 500ms); one try may take as long, at
    /// most 1 s.
    #[arg(long, default_value = "1s", value_parser = crate::parse_seconds)]
    pub health_interval: f64,
    /// Failed health tries in a row that stop the command.
    #[arg(long, default_value_t = 3)]
    pub health_failures: u32,
    /// Give up campaigning after this long with exit code 6; 0 gives up as soon as
    /// another replica is seen holding the role.
    #[arg(long, value_parser = parse_grace)]
    pub timeout: Option<f64>,
    /// The command to supervise, after `--`; started when elected.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_grace(text: &str) -> Result<f64, String> {
    let seconds = crate::parse_seconds(text)?;
    if !(seconds.is_finite() && (0.0..=3600.0).contains(&seconds)) {
        return Err(format!("{seconds} s is outside [0, 3600]"));
    }
    Ok(seconds)
}

/// SIGKILL goes out this long before the self-fence deadline, so the group is reaped by
/// then: TTL/20, at most 200 ms.
pub fn kill_margin(ttl: Duration) -> Duration {
    (ttl / 20).min(Duration::from_millis(200))
}

/// The longest grace the TTL allows: the least time left to the deadline while renewals
/// succeed, less the kill margin and TTL/20 for the renewal's round trip. A longer one
/// would start stopping the command before every renewal.
pub fn max_grace(ttl: Duration) -> Duration {
    let options = SessionOptions {
        ttl,
        ..SessionOptions::default()
    };
    options
        .steady_time_left()
        .saturating_sub(kill_margin(ttl))
        .saturating_sub(ttl / 20)
}

/// Checks the command flags against the TTL, before anything registers: the probe and
/// the command to run, `None` without one, or what is wrong.
pub fn check(args: &ChildArgs, ttl: Duration) -> Result<Option<Checked>, String> {
    let probe = Probe::parse(args.ready_tcp.as_deref(), args.ready_http.as_deref())?;
    let health = Health::parse(
        args.health_tcp.as_deref(),
        args.health_http.as_deref(),
        args.health_interval,
        args.health_failures,
    )?;
    let Some(program) = args.command.first() else {
        if probe != Probe::Started || health.is_some() || args.kill_grace.is_some() {
            return Err(
                "--kill-grace, --ready-* and --health-* need a command after --".to_owned(),
            );
        }
        return Ok(None);
    };
    child::check_executable(program)?;
    let largest = max_grace(ttl);
    let grace = match args.kill_grace {
        Some(asked) => {
            let asked = Duration::from_secs_f64(asked);
            if asked > largest {
                return Err(format!(
                    "--kill-grace {asked:?} is longer than TTL {ttl:?} allows: at most {largest:?} (a longer grace needs a longer --ttl)"
                ));
            }
            asked
        }
        None => DEFAULT_GRACE.min(largest),
    };
    Ok(Some(Checked {
        argv: args.command.clone(),
        probe,
        grace,
        ready_timeout: Duration::from_secs_f64(args.ready_timeout),
        health,
    }))
}

/// A command and its flags, as [`check`] found them.
#[derive(Debug)]
pub struct Checked {
    argv: Vec<String>,
    probe: Probe,
    grace: Duration,
    ready_timeout: Duration,
    health: Option<Health>,
}

/// What to run and how, checked before registering.
#[derive(Debug)]
pub struct Plan {
    argv: Vec<String>,
    grace: Duration,
    ttl: Duration,
    probe: Probe,
    ready_timeout: Duration,
    health: Option<Health>,
    server_id: u64,
    role: String,
    election: String,
    printer: Printer,
    recampaign: bool,
    /// How the last child ended on its own (not stopped by us), for the exit code.
    exited_on_its_own: Mutex<Option<Ended>>,
}

impl Plan {
    /// The plan to run `command` for this replica.
    pub fn new(
        command: Checked,
        ttl: Duration,
        server_id: u64,
        role: &str,
        election: &str,
        printer: Printer,
        recampaign: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            argv: command.argv,
            grace: command.grace,
            ttl,
            probe: command.probe,
            ready_timeout: command.ready_timeout,
            health: command.health,
            server_id,
            role: role.to_owned(),
            election: election.to_owned(),
            printer,
            recampaign,
            exited_on_its_own: Mutex::new(None),
        })
    }

    /// How long before the deadline a stop starts: the grace, and never less than the
    /// kill margin (a grace of 0 would otherwise kill at the deadline itself).
    fn stop_lead(&self) -> Duration {
        self.grace.max(kill_margin(self.ttl))
    }

    /// How long the runtime waits for a stop: the grace, the reaping, a margin.
    pub fn stop_grace(&self) -> Duration {
        self.grace + Duration::from_secs(6)
    }

    /// How the last child ended on its own, if it did (and forgets it).
    pub fn take_exit(&self) -> Option<Ended> {
        self.lock().take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Ended>> {
        self.exited_on_its_own
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn event(&self, name: &'static str, active: &Active) -> Event {
        Event::new(name)
            .election(&self.election)
            .token(active.token())
            .server_id(Some(ha::ServerId::new(self.server_id)))
    }
}

/// Why the supervisor stopped the command.
#[derive(Debug, Clone, Copy)]
enum Why {
    Shutdown,
    Lost,
    Deadline,
    NotReady,
    Unhealthy,
    Exited,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::Lost => "leadership_lost",
            Self::Deadline => "self_fence_deadline",
            Self::NotReady => "not_ready",
            Self::Unhealthy => "unhealthy",
            Self::Exited => "exited",
        }
    }
}

/// Why the activation ended without the command's own exit.
#[derive(Debug, thiserror::Error)]
enum Stopped {
    #[error("cannot start {0}")]
    Spawn(String),
    #[error("the command was not ready within {0:?}")]
    NotReady(Duration),
    #[error("the command failed {0} health checks in a row")]
    Unhealthy(u32),
    #[error("the command was stopped before the self-fence deadline (the keepalives failed)")]
    Deadline,
}

/// The activation: runs the command while `active` lasts; see the module doc.
pub async fn supervise(active: Active, plan: Arc<Plan>) -> Result<(), ha::Error> {
    run(active, &plan)
        .await
        .map_err(|stopped| ha::Error::Activation {
            source: Box::new(stopped),
        })
}

async fn run(active: Active, plan: &Plan) -> Result<(), Stopped> {
    let token = active.token();
    let env = [
        ("HA_FENCING_TOKEN", token.get().to_string()),
        ("HA_ROLE", plan.role.clone()),
        ("HA_ELECTION", plan.election.clone()),
        ("HA_SERVER_ID", plan.server_id.to_string()),
        ("HA_LEASE", active.leadership().key().lease.to_string()),
    ];
    let mut child = match Child::spawn(&plan.argv, &env, plan.printer.is_json()) {
        Ok(child) => child,
        Err(error) => {
            let reason = format!("{}: {error}", plan.argv[0]);
            plan.printer
                .print(&plan.event("child_failed", &active).reason(&reason));
            return Err(Stopped::Spawn(reason));
        }
    };
    let mut started = plan.event("child_started", &active);
    started.pid = Some(child.pid());
    plan.printer.print(&started);
    metrics::gauge!("ha_child_running", "role" => plan.role.clone()).set(1.0);
    metrics::counter!("ha_child_starts_total", "role" => plan.role.clone()).increment(1);
    tracing::info!(pid = child.pid(), token = %token, "started the command");

    let ready_by = Instant::now() + plan.ready_timeout;
    let probe = plan.probe.wait();
    tokio::pin!(probe);
    let health = async {
        match &plan.health {
            Some(health) => health.failing().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(health);
    let mut failed_checks = 0;
    let mut ready = false;
    let mut forwarded = Forwarded::new();
    let why = loop {
        let stop_from = active.deadline().checked_sub(plan.stop_lead());
        tokio::select! {
            biased;
            ended = child.exited() => {
                if !plan.recampaign {
                    *plan.lock() = Some(ended);
                }
                break Why::Exited;
            }
            () = active.stopping().cancelled() => {
                break if active.is_valid() { Why::Shutdown } else { Why::Lost };
            }
            () = sleep_until(stop_from.unwrap_or_else(Instant::now)) => {
                // The deadline only moves forward: stop only if it did not move since.
                if active.deadline().checked_sub(plan.stop_lead()) <= Some(Instant::now()) {
                    break Why::Deadline;
                }
            }
            () = &mut probe, if !ready => {
                ready = true;
                // Proclaiming retries while the backend is unreachable: not here.
                let active = active.clone();
                tokio::spawn(async move { active.ready().await });
            }
            () = sleep_until(ready_by), if !ready => break Why::NotReady,
            failed = &mut health, if ready => {
                failed_checks = failed;
                break Why::Unhealthy;
            }
            signal = forwarded.next() => child.signal(signal),
        }
    };
    stop(&mut child, &active, plan, why).await;
    match why {
        Why::Exited if plan.recampaign => {
            // Back in line: resigning ends this leadership as a loss, which the loop
            // answers (with --recampaign) by campaigning again on the same session.
            if let Err(error) = active.leadership().resign().await {
                tracing::warn!(%error, "resign after the command exited failed");
            }
            active.stopping().cancelled().await;
            Ok(())
        }
        Why::Exited | Why::Shutdown | Why::Lost => Ok(()),
        Why::NotReady => {
            give_up(&active, plan.ttl).await;
            Err(Stopped::NotReady(plan.ready_timeout))
        }
        Why::Unhealthy => {
            give_up(&active, plan.ttl).await;
            Err(Stopped::Unhealthy(failed_checks))
        }
        Why::Deadline => {
            give_up(&active, plan.ttl).await;
            Err(Stopped::Deadline)
        }
    }
}

/// The command was stopped while the leadership may still hold (a keepalive got through
/// late, or it never became ready): the role is not held on with no command. Resigning
/// marks the leadership lost at once, so the loop reports a loss and, with
/// --recampaign, goes back in line; the resign itself is bounded by a request timeout
/// (TTL/3), as the backend may be what failed.
async fn give_up(active: &Active, ttl: Duration) {
    if active.is_valid() {
        let resign = active.leadership().resign();
        if let Ok(Err(error)) = tokio::time::timeout(ttl / 3, resign).await {
            tracing::warn!(%error, "resign after stopping the command failed");
        }
    }
}

/// Stops the group, reporting each step, and reports how it ended.
async fn stop(child: &mut Child, active: &Active, plan: &Plan, why: Why) {
    let deadline_kill = active
        .deadline()
        .checked_sub(kill_margin(plan.ttl))
        .unwrap_or_else(Instant::now);
    let kill_at = (Instant::now() + plan.grace).min(deadline_kill);
    let ended = child
        .stop(kill_at, |signal| {
            tracing::warn!(signal = %signal, why = why.as_str(), "stopping the command");
            plan.printer.print(
                &plan
                    .event("child_stopping", active)
                    .signal(signal.as_str())
                    .reason(why.as_str()),
            );
        })
        .await;
    let mut line = plan.event("child_exited", active);
    match ended {
        Ended::Code(code) => line.code = Some(code),
        Ended::Signal(signal) => {
            line = line.signal(Signal::try_from(signal).map_or("unknown", |s| s.as_str()));
        }
    }
    plan.printer.print(&line.reason(why.as_str()));
    metrics::gauge!("ha_child_running", "role" => plan.role.clone()).set(0.0);
}

/// SIGHUP, SIGUSR1 and SIGUSR2 to `ha`, passed on to the command's group.
struct Forwarded {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Forwarded {
    fn new() -> Self {
        let kinds = [
            (Signal::SIGHUP, SignalKind::hangup()),
            (Signal::SIGUSR1, SignalKind::user_defined1()),
            (Signal::SIGUSR2, SignalKind::user_defined2()),
        ];
        let streams = kinds
            .into_iter()
            .filter_map(|(sig, kind)| signal(kind).ok().map(|s| (sig, s)))
            .collect();
        Self { streams }
    }

    /// The next signal to forward (pending forever without any).
    async fn next(&mut self) -> Signal {
        let waits = self.streams.iter_mut().map(|(sig, stream)| {
            let sig = *sig;
            Box::pin(async move {
                stream.recv().await;
                sig
            })
        });
        let waits: Vec<_> = waits.collect();
        if waits.is_empty() {
            return std::future::pending().await;
        }
        futures::future::select_all(waits).await.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grace_fits_between_renewals() {
        // TTL 10 s: 9.8 − 0.5 (margin) − 3.33 (renewal) − 0.2 (kill) − 0.5 (round trip).
        let ten = max_grace(Duration::from_secs(10));
        assert!(
            ten > DEFAULT_GRACE && ten < Duration::from_secs(6),
            "{ten:?}"
        );
        let two = max_grace(Duration::from_secs(2));
        assert!(
            two > Duration::from_millis(900) && two < Duration::from_millis(1100),
            "{two:?}"
        );
        assert_eq!(
            kill_margin(Duration::from_secs(2)),
            Duration::from_millis(100)
        );
    }
}
