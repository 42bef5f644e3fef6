//! `ha run` and `ha node [--active-standby]`: an ActiveStandby coordinator driven from the
//! command line, its events printed, its metrics and probes served.

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
        .shutdown_on(shutdown_signal());
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

/// `ha node`: one embedded Raft member, optionally with a coordinator on it.
#[cfg(feature = "raft")]
pub async fn node(args: crate::NodeArgs) -> Exit {
    use ha::raft::{RaftNode, RaftNodeConfig};
    use std::collections::BTreeMap;

    let printer = Printer::new(args.json);
    // A bad command fails before the node starts, as before `ha run` registers.
    let child = &args.coordinator.child;
    if !child.command.is_empty() && !args.active_standby {
        eprintln!("ha node: a command after -- needs --active-standby");
        return Exit::Usage;
    }
    let command = match supervise::check(child, Duration::from_secs_f64(args.ttl)) {
        Ok(command) => command,
        Err(reason) => {
            eprintln!("ha node: {reason}");
            return Exit::Usage;
        }
    };
    let mut peers = BTreeMap::new();
    for pair in &args.peers {
        let Some((id, addr)) = pair.split_once('=') else {
            eprintln!("ha node: --peers: {pair:?} is not ID=HOST:PORT");
            return Exit::Usage;
        };
        let Ok(id) = id.trim().parse::<u64>() else {
            eprintln!("ha node: --peers: {id:?} is not a node id");
            return Exit::Usage;
        };
        peers.insert(id, addr.trim().to_owned());
    }
    let mut config = RaftNodeConfig::new(args.id, args.listen, peers, &args.data);
    if let Some(advertise) = &args.advertise {
        config = config.with_advertise(advertise.as_str());
    }
    if let Some(cluster) = &args.cluster {
        config = config.with_cluster_id(cluster.as_str());
    }
    config = node_timing(config, &args);
    match node_security(&args) {
        Ok(apply) => config = apply(config),
        Err(e) => {
            eprintln!("ha node: {e}");
            return Exit::Usage;
        }
    }
    let node = match RaftNode::start(config).await {
        Ok(node) => node,
        Err(e) => return fail(&format!("cannot start node {}", args.id), &e),
    };
    printer.print(&Event::new("node_ready").node(args.id));
    let leader_task = tokio::spawn(print_raft_leaders(node.clone(), printer));
    let serve = async {
        if args.active_standby {
            let backend: Arc<dyn Backend> = Arc::new(node.clone());
            drive(
                backend,
                &args.coordinator,
                command,
                Duration::from_secs_f64(args.ttl),
                ServerId::new(args.id),
                printer,
            )
            .await
        } else {
            let (_, state) = tokio::sync::watch::channel(ha::RoleState::Standby);
            let served = match args.coordinator.metrics_addr {
                Some(addr) => http::serve(addr, state).await.map_err(|e| {
                    eprintln!("ha: cannot serve metrics on {addr}: {e}");
                    Exit::Usage
                }),
                None => Ok(()),
            };
            match served {
                Ok(()) => {
                    shutdown_signal().await;
                    Exit::Clean
                }
                Err(exit) => exit,
            }
        }
    };
    // A node whose Raft core stopped (a full disk) cannot vote, lead or serve: exit, so
    // that a supervisor restarts it once the cause is fixed, instead of looking alive.
    let exit = tokio::select! {
        exit = serve => exit,
        failure = node.failed() => {
            printer.print(&Event::new("node_failed").node(args.id).reason(&failure));
            eprintln!("ha node: node {} stopped: {failure}", args.id);
            Exit::Unavailable
        }
    };
    leader_task.abort();
    node.shutdown().await;
    exit
}

/// Prints `raft_leader` whenever the leader this node knows changes (none once its core
/// has failed), as `RaftNode::current_leader` tells.
#[cfg(feature = "raft")]
async fn print_raft_leaders(node: ha::raft::RaftNode, printer: Printer) {
    let mut metrics = node.raft().metrics();
    let mut known = None;
    loop {
        metrics.borrow_and_update();
        let leader = node.current_leader();
        if leader != known {
            known = leader;
            if let Some(leader) = leader {
                printer.print(&Event::new("raft_leader").node(leader));
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// The Raft timings from `--rtt-ms`, then the single-value flags over it.
#[cfg(feature = "raft")]
fn node_timing(
    mut config: ha::raft::RaftNodeConfig,
    args: &crate::NodeArgs,
) -> ha::raft::RaftNodeConfig {
    let ms = Duration::from_millis;
    if let Some(rtt) = args.rtt_ms {
        config = config.with_timing_for_rtt(ms(rtt));
    }
    let heartbeat = args.heartbeat_ms.map_or(config.heartbeat_interval, ms);
    let election = args
        .election_timeout_ms
        .map_or(config.election_timeout, |(min, max)| (ms(min), ms(max)));
    config = config.with_timing(heartbeat, election);
    if let Some(rpc) = args.rpc_timeout_ms {
        config = config.with_rpc_timeout(ms(rpc));
    }
    config
}

/// TLS, the client token and `--insecure` of `ha node`, as a change to its configuration.
#[cfg(feature = "raft")]
fn node_security(
    args: &crate::NodeArgs,
) -> Result<impl FnOnce(ha::raft::RaftNodeConfig) -> ha::raft::RaftNodeConfig, String> {
    let security = &args.security;
    let tls = match (&security.cacert, &security.cert, &security.key) {
        (Some(ca), Some(cert), Some(key)) => Some(
            ha::raft::RaftTls::from_files(ca, cert, key).map_err(|e| e.to_string())?,
        ),
        (None, None, None) => None,
        _ => {
            return Err(
                "TLS needs all three of --cacert (the cluster CA), --cert and --key (this node's certificate naming node-<id>)"
                    .to_owned(),
            )
        }
    };
    if security.user.is_some() || security.password_file.is_some() {
        // HA_ETCD_USER may be exported for other commands; it means nothing here.
        eprintln!(
            "ha node: ignoring --user / --password-file (HA_ETCD_USER): they are for etcd clients"
        );
    }
    let token = security.token()?;
    let insecure = args.insecure;
    Ok(move |mut config: ha::raft::RaftNodeConfig| {
        if let Some(tls) = tls {
            config = config.with_tls(tls);
        }
        if let Some(token) = token {
            config = config.with_client_token(token);
        }
        config.with_insecure(insecure)
    })
}
