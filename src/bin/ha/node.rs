//! `ha node`: one member of an embedded Raft group as a process of its own, optionally
//! with an ActiveStandby coordinator on it; it bootstraps a group (`--peers`) or joins
//! a running one (`--join`), and exports its Raft state as metrics and `/status`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ha::raft::{JoinOutcome, RaftAdmin, RaftClientOptions, RaftNode, RaftNodeConfig};
use ha::{Backend, ServerId};

use crate::coordinator::drive;
use crate::elect::fail;
use crate::output::{Event, Printer};
use crate::{http, shutdown_signal, supervise, Exit};

/// `ha node`: one embedded Raft member, optionally with a coordinator on it.
pub async fn node(args: crate::NodeArgs) -> Exit {
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
    let peers = match parse_peers(&args.peers) {
        Ok(peers) => peers,
        Err(reason) => {
            eprintln!("ha node: --peers: {reason}");
            return Exit::Usage;
        }
    };
    let join = match join_client(&args, &peers) {
        Ok(join) => join,
        Err(reason) => {
            eprintln!("ha node: {reason}");
            return Exit::Usage;
        }
    };
    let mut config = RaftNodeConfig::new(args.id, args.listen, peers, &args.data);
    if let Some(advertise) = &args.advertise {
        config = config.with_advertise(advertise.as_str());
    }
    if let Some(cluster) = &args.cluster {
        config = config.with_cluster_id(cluster.as_str());
    }
    config = node_timing(config, &args).with_placement(!args.no_placement);
    if let Some(level) = args.feature_level {
        config = config.with_feature_level(level);
    }
    match node_security(&args) {
        Ok(apply) => config = apply(config),
        Err(e) => {
            eprintln!("ha node: {e}");
            return Exit::Usage;
        }
    }
    if args.force_new_group {
        match ha::raft::force_new_group(&config).await {
            Ok(forced) => {
                let reason = if forced.changed {
                    format!(
                        "kept every entry up to index {}, dropped members {:?}",
                        forced.last_index,
                        forced.dropped.keys().collect::<Vec<_>>()
                    )
                } else {
                    "already the only voter; nothing changed".to_owned()
                };
                printer.print(&Event::new("forced_new_group").node(args.id).reason(reason));
            }
            Err(e) => {
                eprintln!("ha node: --force-new-group: {e}");
                return Exit::Unavailable;
            }
        }
    }
    let node = match RaftNode::start(config).await {
        Ok(node) => node,
        Err(e) if refused_by_version(&e) => {
            // Refused, nothing changed: like a refused membership change, not an outage.
            eprintln!("ha node: cannot start node {}: {e}", args.id);
            return Exit::ChangeRefused;
        }
        Err(e) => return fail(&format!("cannot start node {}", args.id), &e),
    };
    printer.print(&Event::new("node_ready").node(args.id));
    let leader_task = tokio::spawn(print_raft_leaders(node.clone(), printer));
    let metrics_task = tokio::spawn(export_raft_metrics(node.clone()));
    http::set_status_source(status_source(node.clone()));
    if let Some(join) = &join {
        let joined = tokio::select! {
            joined = node.join(join, !args.learner, Duration::from_secs_f64(args.join_timeout)) => Some(joined),
            () = shutdown_signal() => None,
        };
        let failed = match joined {
            Some(Ok(outcome)) => {
                let kind = match outcome {
                    JoinOutcome::Voter => "voter",
                    JoinOutcome::Learner => "learner",
                };
                printer.print(&Event::new("joined").node(args.id).reason(kind));
                None
            }
            Some(Err(e)) => {
                printer.print(&Event::new("join_failed").node(args.id).reason(&e));
                eprintln!("ha node: node {} could not join: {e}", args.id);
                Some(crate::admin::exit_of(&e))
            }
            None => Some(Exit::Clean),
        };
        if let Some(exit) = failed {
            leader_task.abort();
            metrics_task.abort();
            node.shutdown().await;
            return exit;
        }
    }
    // SIGINT/SIGTERM, or `ha member remove` of this node: either way the coordinator
    // resigns first.
    let stop = {
        let signal = shutdown_signal();
        let leave = node.leave_requested();
        async move {
            tokio::select! {
                () = signal => {}
                () = leave => {}
            }
        }
    };
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
                stop,
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
                    stop.await;
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
    if (args.leave_on_stop || node.is_leaving()) && exit == Exit::Clean {
        leave(&node, &args, printer).await;
    }
    leader_task.abort();
    metrics_task.abort();
    node.shutdown().await;
    exit
}

/// `--leave-on-stop`: asks the Raft leader, through this node, to remove it. The
/// coordinator has resigned by now; a leader removing itself steps down once the
/// change commits, and the voters left elect one of their own.
async fn leave(node: &RaftNode, args: &crate::NodeArgs, printer: Printer) {
    let admin = match admin_client(args, vec![node.address()]) {
        Ok(admin) => admin,
        Err(reason) => {
            printer.print(&Event::new("leave_failed").node(args.id).reason(&reason));
            return;
        }
    };
    let change = ha::raft::MembershipChange::Remove { id: args.id };
    match admin.change(&change).await {
        Ok(_) => printer.print(&Event::new("left").node(args.id)),
        Err(e) => {
            eprintln!("ha node: node {} could not leave the group: {e}", args.id);
            printer.print(&Event::new("leave_failed").node(args.id).reason(&e));
        }
    }
}

/// `ID=HOST:PORT` pairs, as `--peers` takes them.
pub fn parse_peers(pairs: &[String]) -> Result<BTreeMap<u64, String>, String> {
    let mut peers = BTreeMap::new();
    for pair in pairs {
        let (id, addr) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not ID=HOST:PORT"))?;
        let id = id
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("{id:?} is not a node id"))?;
        peers.insert(id, addr.trim().to_owned());
    }
    Ok(peers)
}

/// Whether `error` refuses a binary too old for what the data dir holds: a newer format,
/// or a group feature level above the one it serves.
fn refused_by_version(error: &ha::Error) -> bool {
    matches!(
        error,
        ha::Error::Backend { source, .. }
            if matches!(
                source.downcast_ref::<ha::raft::RaftBackendError>(),
                Some(
                    ha::raft::RaftBackendError::NewerDataDir { .. }
                        | ha::raft::RaftBackendError::BelowGroupLevel { .. }
                )
            )
    )
}

/// Prints `raft_leader` whenever the leader this node knows changes (none once its core
/// has failed), as `RaftNode::current_leader` tells.
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
fn node_timing(mut config: RaftNodeConfig, args: &crate::NodeArgs) -> RaftNodeConfig {
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
fn node_security(
    args: &crate::NodeArgs,
) -> Result<impl FnOnce(RaftNodeConfig) -> RaftNodeConfig, String> {
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
    let admin_token = security.admin_token()?;
    let insecure = args.insecure;
    Ok(move |mut config: RaftNodeConfig| {
        if let Some(tls) = tls {
            config = config.with_tls(tls);
        }
        if let Some(token) = token {
            config = config.with_client_token(token);
        }
        if let Some(token) = admin_token {
            config = config.with_admin_token(token);
        }
        config.with_insecure(insecure)
    })
}

/// The admin client `--join` asks through, with this node's TLS identity (its node
/// certificate may add itself) or the admin token.
fn join_client(
    args: &crate::NodeArgs,
    peers: &BTreeMap<u64, String>,
) -> Result<Option<RaftAdmin>, String> {
    let Some(url) = &args.join else {
        if args.learner {
            return Err("--learner needs --join".into());
        }
        return Ok(None);
    };
    if !peers.is_empty() {
        return Err("--join and --peers exclude each other: --peers bootstraps a new group, --join enters a running one".into());
    }
    let endpoints = url
        .strip_prefix("raft://")
        .ok_or_else(|| format!("--join {url:?}: expected raft://host:port[,host:port...]"))?;
    let endpoints: Vec<String> = endpoints
        .trim_end_matches('/')
        .split(',')
        .map(str::to_owned)
        .collect();
    admin_client(args, endpoints)
        .map(Some)
        .map_err(|e| format!("--join: {e}"))
}

/// An admin client with this node's TLS identity (its node certificate may change
/// the membership) or the admin token.
fn admin_client(args: &crate::NodeArgs, endpoints: Vec<String>) -> Result<RaftAdmin, String> {
    let security = &args.security;
    let tls = match (&security.cacert, &security.cert, &security.key) {
        (Some(ca), Some(cert), Some(key)) => Some(
            ha::raft::ClientTls::from_files(ca, Some((cert.as_path(), key.as_path())))
                .map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    let options = RaftClientOptions {
        tls,
        token: security.admin_token()?,
        ..RaftClientOptions::default()
    };
    RaftAdmin::new(endpoints, options).map_err(|e| e.to_string())
}

/// Exports this node's Raft state as gauges: on every change, and each second for the
/// followers' lag (which moves with every write).
async fn export_raft_metrics(node: RaftNode) {
    let mut changes = node.raft().metrics();
    loop {
        let status = node.status().await;
        metrics::gauge!("ha_raft_term").set(status.term as f64);
        metrics::gauge!("ha_raft_is_leader").set(if status.state == "leader" { 1.0 } else { 0.0 });
        metrics::gauge!("ha_raft_applied_index").set(status.applied_index.unwrap_or(0) as f64);
        metrics::gauge!("ha_raft_last_log_index").set(status.last_log_index.unwrap_or(0) as f64);
        metrics::gauge!("ha_raft_voters").set(status.voters.len() as f64);
        metrics::gauge!("ha_raft_data_dir_bytes").set(status.data_dir_bytes as f64);
        metrics::gauge!("ha_raft_active_here").set(status.active_here.len() as f64);
        metrics::counter!("ha_raft_placement_moves_total").absolute(status.placement_moves);
        metrics::gauge!("ha_raft_feature_level").set(f64::from(status.feature_level));
        metrics::gauge!("ha_raft_group_level").set(f64::from(status.group_level));
        for (peer, progress) in &status.peers {
            if let Some(lag) = progress.lag {
                metrics::gauge!("ha_raft_lag_entries", "peer" => peer.to_string()).set(lag as f64);
            }
        }
        let changed = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
        if matches!(changed, Ok(Err(_))) {
            return;
        }
    }
}

/// `/status` of `--metrics-addr`: what `ha status` asks each member for.
fn status_source(node: RaftNode) -> http::StatusSource {
    Arc::new(move || {
        let node = node.clone();
        Box::pin(async move { serde_json::to_value(node.status().await).unwrap_or_default() })
    })
}
