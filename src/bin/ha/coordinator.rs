//! `ha run` and the coordinator of `ha node --active-standby`: an ActiveStandby
//! coordinator driven from the command line, its events printed, its metrics and probes
//! served.

use std::sync::Arc;
use std::time::Duration;

use ha::{
    Active, ActiveStandby, Backend, CoordinatorEvent, ElectionName, LossPolicy, Outcome, Role,
    ServerId,
};

use crate::elect::{connect, fail};
use crate::output::{Event, Printer};
use crate::{http, shutdown_signal, supervise, Common, CoordinatorArgs, Exit};

/// `ha run`: the coordinator on `--backend`.
pub async fn run(args: &CoordinatorArgs, common: &Common) -> Exit {
    let command = match supervise::check(&args.child, common.ttl()) {
        Ok(command) => command,
        Err(reason) => {
            eprintln!("ha run: {reason}");
            return Exit::Usage;
        }
    };
    let backend = match connect(common).await {
        Ok(backend) => backend,
        Err(exit) => return exit,
    };
    let server_id = ServerId::new(common.server_id());
    drive(
        backend,
        args,
        command,
        common.ttl(),
        server_id,
        Printer::new(common.json),
        shutdown_signal(),
    )
    .await
}

/// The activation of a command-line coordinator: it holds the role, reports ready at
/// once, and serves nothing but its probes until it is stopped.
async fn hold(active: Active) -> Result<(), ha::Error> {
    active.ready().await?;
    active.stopping().cancelled().await;
    Ok(())
}

/// Runs the coordinator loop until SIGINT/SIGTERM or a loss, printing its events; with
/// a command after `--` (`command`, as [`supervise::check`] found it), the command runs
/// while this replica is ACTIVE.
pub async fn drive(
    backend: Arc<dyn Backend>,
    args: &CoordinatorArgs,
    command: Option<supervise::Checked>,
    ttl: Duration,
    server_id: ServerId,
    printer: Printer,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Exit {
    let role = match Role::new(args.role.as_str()) {
        Ok(role) => role,
        Err(e) => return fail("bad role", &e),
    };
    let election = match &args.election {
        Some(name) => match ElectionName::new(name.as_str()) {
            Ok(election) => election,
            Err(e) => return fail("bad election", &e),
        },
        None => ElectionName::from_role(&role),
    };
    let plan = command.map(|command| {
        supervise::Plan::new(
            command,
            ttl,
            server_id.get(),
            role.as_str(),
            election.as_str(),
            printer,
            args.recampaign,
        )
    });
    if plan.is_some() {
        if let Err(error) = supervise::child::become_subreaper() {
            eprintln!("ha: cannot reap what the command leaves behind: {error}");
            return Exit::Failed;
        }
    }
    let builder = ActiveStandby::builder(backend, role, server_id)
        .address(args.address.as_str())
        .election(election.clone())
        .ttl(ttl)
        .standby_log_interval(Duration::from_secs_f64(args.standby_log_interval))
        .on_loss(if args.recampaign {
            LossPolicy::Recampaign
        } else {
            LossPolicy::Exit
        })
        .enabled(!args.exclusive)
        .stop_grace(plan.as_ref().map_or(Duration::ZERO, |p| p.stop_grace()))
        .shutdown_on(stop);
    let mut events = builder.subscribe();
    let state = builder.watch_state();
    if let Some(addr) = args.metrics_addr {
        if let Err(e) = http::serve(addr, state).await {
            eprintln!("ha: cannot serve metrics on {addr}: {e}");
            return Exit::Usage;
        }
    }
    let coordinator = match &plan {
        Some(plan) => {
            let plan = Arc::clone(plan);
            builder.spawn(move |active| supervise::supervise(active, Arc::clone(&plan)))
        }
        None => builder.spawn(hold),
    };
    let me = Some(server_id);
    let give_up_at = args
        .child
        .timeout
        .filter(|t| *t > 0.0)
        .map(|t| tokio::time::Instant::now() + Duration::from_secs_f64(t));
    let mut elected = false;
    let mut timed_out = false;
    loop {
        let received = tokio::select! {
            // Events first: an election already queued wins over a timer that fired.
            biased;
            received = events.recv() => received,
            () = sleep_until_some(give_up_at), if !elected && !timed_out => {
                timed_out = true;
                coordinator.shutdown();
                continue;
            }
        };
        let event = match received {
            Ok(event) => event,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                eprintln!("ha: {n} events were not printed (output too slow)");
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        };
        match &event {
            CoordinatorEvent::Elected { .. } => elected = true,
            // --timeout 0: one try, so give up once another replica is seen leading.
            CoordinatorEvent::Standby {
                leader: Some(leader),
            } if args.child.timeout == Some(0.0)
                && !elected
                && !timed_out
                && leader.server_id != me =>
            {
                timed_out = true;
                coordinator.shutdown();
            }
            _ => {}
        }
        let line = match event {
            CoordinatorEvent::Registered { lease, .. } => {
                Event::new("registered").lease(lease).server_id(me)
            }
            CoordinatorEvent::Standby { leader } => {
                let line = Event::new("standby").election(&election).server_id(me);
                match leader {
                    Some(leader) => line.value(&leader.value),
                    None => line,
                }
            }
            CoordinatorEvent::Elected { token } => Event::new("elected")
                .election(&election)
                .token(token)
                .server_id(me)
                .value(args.address.as_bytes()),
            CoordinatorEvent::Ready { token } => Event::new("proclaimed")
                .election(&election)
                .token(token)
                .server_id(me)
                .value(args.address.as_bytes()),
            CoordinatorEvent::Lost { token, reason } => Event::new("lost")
                .election(&election)
                .token(token)
                .server_id(me)
                .reason(reason),
            CoordinatorEvent::SessionLost { reason } => Event::new("lost")
                .election(&election)
                .server_id(me)
                .reason(reason),
            CoordinatorEvent::Resigned { token } => Event::new("resigned")
                .election(&election)
                .token(token)
                .server_id(me),
            CoordinatorEvent::Stopped => Event::new("stopped").server_id(me),
            _ => continue,
        };
        printer.print(&line);
        if line.event == "stopped" {
            break;
        }
    }
    let outcome = coordinator.wait().await;
    if timed_out {
        eprintln!("ha: not elected within --timeout; gave up");
        return Exit::Timeout;
    }
    match outcome {
        Ok(Outcome::Finished) => match plan.and_then(|p| p.take_exit()) {
            Some(ended) => Exit::Child(ended.exit_code()),
            None => Exit::Clean,
        },
        Ok(Outcome::Lost(_)) => Exit::Lost,
        Ok(_) => Exit::Clean,
        Err(e) => fail("the coordinator stopped", &e),
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
