//! `ha status` and `ha member`: operating an embedded Raft group over its admin API,
//! from any machine that reaches a member (TLS and tokens as for any client).

use clap::{Args, Subcommand};
use ha::raft::{AdminError, MemberKind, MembershipChange, RaftAdmin, RaftClientOptions};

#[cfg(feature = "etcd")]
use crate::status_view::etcd_table;
use crate::status_view::{refused_everywhere, status_table, table};
use crate::{Exit, Security};

/// Which group to talk to, and how.
#[derive(Debug, Clone, Args)]
pub struct AdminTarget {
    /// The group: raft://host:port,... (any members; the others are found from them);
    /// `ha status` also takes etcd://host:port,...
    #[arg(long, env = "HA_BACKEND")]
    pub backend: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// How long one change may take to be carried out (seconds, or 10s, 500ms).
    #[arg(long, default_value_t = 10.0, value_parser = crate::parse_ttl)]
    pub request_timeout: f64,
    /// TLS (--cacert, and --cert/--key: a node certificate may change the membership)
    /// and the token (--token-file or HA_TOKEN: the admin token may).
    #[command(flatten)]
    pub security: Security,
}

/// `ha member` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum MemberAction {
    /// List the members: id, address, voter or learner, Raft state.
    List {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Add a member at ID=HOST:PORT (started with `ha node` and no --peers): as a
    /// learner, then, once it has caught up, as a voter.
    Add {
        /// ID=HOST:PORT.
        member: String,
        /// Keep it a learner (it replicates but does not vote).
        #[arg(long)]
        learner: bool,
        /// How long to wait for it to catch up before the promotion (seconds, or 1m).
        #[arg(long, default_value_t = 60.0, value_parser = crate::parse_ttl)]
        catch_up_timeout: f64,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Make a learner a voter (refused until it has caught up).
    Promote {
        /// The learner's node id.
        id: u64,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Take a member out of the group (refused when the voters left would have no
    /// reachable majority, or it is the last voter).
    Remove {
        /// The member's node id.
        id: u64,
        #[command(flatten)]
        target: AdminTarget,
    },
}

fn endpoints(url: &str) -> Result<Vec<String>, String> {
    let Some(rest) = url.strip_prefix("raft://") else {
        return Err(format!(
            "{url:?}: ha member and ha snapshot operate an embedded Raft group (raft://host:port,...); for etcd use etcdctl member and etcdctl snapshot"
        ));
    };
    let endpoints: Vec<String> = rest
        .trim_end_matches('/')
        .split(',')
        .map(str::to_owned)
        .collect();
    if endpoints.iter().any(|e| e.is_empty() || !e.contains(':')) {
        return Err(format!("{url:?}: expected raft://host:port[,host:port...]"));
    }
    Ok(endpoints)
}

pub fn connect(target: &AdminTarget) -> Result<RaftAdmin, (Exit, String)> {
    let usage = |reason: String| (Exit::Usage, reason);
    let endpoints = endpoints(&target.backend).map_err(usage)?;
    let options = target.security.options().map_err(usage)?;
    let identity = match (&options.cert_file, &options.key_file) {
        (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
        (None, None) => None,
        _ => return Err(usage("--cert and --key go together".into())),
    };
    let tls = match &options.ca_file {
        Some(ca) => {
            Some(ha::raft::ClientTls::from_files(ca, identity).map_err(|e| usage(e.to_string()))?)
        }
        None => None,
    };
    let options = RaftClientOptions {
        request_timeout: std::time::Duration::from_secs_f64(target.request_timeout),
        tls,
        token: options.token,
    };
    RaftAdmin::new(endpoints, options).map_err(|e| (exit_of(&e), e.to_string()))
}

/// The exit code for an admin error.
pub fn exit_of(error: &AdminError) -> Exit {
    match error {
        AdminError::Refused(_) => Exit::ChangeRefused,
        AdminError::Unauthorized(_) => Exit::Refused,
        AdminError::InvalidArgument(_) => Exit::Usage,
        _ => Exit::Unavailable,
    }
}

pub fn fail(what: &str, exit: Exit, reason: &str) -> Exit {
    eprintln!("ha {what}: {reason}");
    exit
}

/// `ha status`: every member's Raft state; exit 4 when no quorum answers.
pub async fn status(target: &AdminTarget) -> Exit {
    #[cfg(feature = "etcd")]
    if target.backend.starts_with("etcd://") {
        return etcd_status(target).await;
    }
    let admin = match connect(target) {
        Ok(admin) => admin,
        Err((exit, reason)) => return fail("status", exit, &reason),
    };
    let group = admin.group_status().await;
    if let Some(refused) = refused_everywhere(&group) {
        return fail("status", Exit::Refused, &refused);
    }
    if target.json {
        println!("{}", serde_json::to_string(&group).unwrap_or_default());
    } else {
        print!("{}", status_table(&group));
    }
    if group.quorum {
        Exit::Clean
    } else {
        eprintln!("ha status: no quorum answered (no Raft leader with a majority of voters)");
        Exit::Unavailable
    }
}

/// `ha status` on etcd: every member's own report, as `etcdctl endpoint status
/// --cluster` gives it; exit 4 when no majority of the voters names one leader.
#[cfg(feature = "etcd")]
async fn etcd_status(target: &AdminTarget) -> Exit {
    let config = target
        .security
        .options()
        .and_then(|options| ha::etcd_config(&target.backend, &options).map_err(|e| e.to_string()));
    let config = match config {
        Ok(config) => config.with_timeouts(
            std::time::Duration::from_secs(5),
            std::time::Duration::from_secs_f64(target.request_timeout),
        ),
        Err(reason) => return fail("status", Exit::Usage, &reason),
    };
    let cluster = match ha::etcd::cluster_status(&config).await {
        Ok(cluster) => cluster,
        Err(e) => return fail("status", Exit::of(&e), &e.to_string()),
    };
    if target.json {
        println!("{}", serde_json::to_string(&cluster).unwrap_or_default());
    } else {
        print!("{}", etcd_table(&cluster));
    }
    if cluster.quorum {
        Exit::Clean
    } else {
        eprintln!("ha status: no majority of the etcd voters answered naming one leader");
        Exit::Unavailable
    }
}

impl MemberAction {
    fn target(&self) -> &AdminTarget {
        match self {
            Self::List { target }
            | Self::Add { target, .. }
            | Self::Promote { target, .. }
            | Self::Remove { target, .. } => target,
        }
    }
}

/// `ha member ...`.
pub async fn member(action: &MemberAction) -> Exit {
    let target = action.target();
    let admin = match connect(target) {
        Ok(admin) => admin,
        Err((exit, reason)) => return fail("member", exit, &reason),
    };
    match action {
        MemberAction::List { .. } => list(&admin, target.json).await,
        MemberAction::Add {
            member,
            learner,
            catch_up_timeout,
            ..
        } => {
            let Some((id, address)) = member.split_once('=') else {
                return fail(
                    "member add",
                    Exit::Usage,
                    &format!("{member:?} is not ID=HOST:PORT"),
                );
            };
            let Ok(id) = id.trim().parse::<u64>() else {
                return fail(
                    "member add",
                    Exit::Usage,
                    &format!("{id:?} is not a node id"),
                );
            };
            let address = address.trim().to_owned();
            // The new node must run already: its own answer says which cluster it was
            // configured for, which the leader checks, and that ADDR is node ID.
            let (cluster_id, fresh, feature_level) = match admin.node_status(&address).await {
                Ok(status) if status.id == id => (
                    status.cluster_id,
                    status.last_log_index.is_none(),
                    status.feature_level,
                ),
                Ok(status) => {
                    let reason = format!("{address} is node {}, not node {id}", status.id);
                    return fail("member add", Exit::ChangeRefused, &reason);
                }
                Err(e) => {
                    let reason = format!("node {id} at {address} does not answer (start it with `ha node --id {id} --listen ... --data ...` and no --peers first): {e}");
                    return fail("member add", exit_of(&e), &reason);
                }
            };
            let add = MembershipChange::AddLearner {
                id,
                address,
                cluster_id,
                fresh,
                feature_level: Some(feature_level),
            };
            if let Err(exit) = change(&admin, &add, target.json).await {
                return exit;
            }
            if *learner {
                return Exit::Clean;
            }
            promote_when_caught_up(&admin, id, *catch_up_timeout, target.json).await
        }
        MemberAction::Promote { id, .. } => {
            match change(&admin, &MembershipChange::Promote { id: *id }, target.json).await {
                Ok(()) => Exit::Clean,
                Err(exit) => exit,
            }
        }
        MemberAction::Remove { id, .. } => match admin.remove(*id).await {
            Ok(removal) => {
                let how = if removal.left_on_its_own {
                    "resigned its role and left"
                } else {
                    "removed by the leader"
                };
                print_report(&removal.report, target.json, &format!("node {id} {how}"));
                Exit::Clean
            }
            Err(e) => fail("member remove", exit_of(&e), &e.to_string()),
        },
    }
}

async fn change(admin: &RaftAdmin, change: &MembershipChange, json: bool) -> Result<(), Exit> {
    match admin.change(change).await {
        Ok(report) => {
            let what = if report.changed {
                "changed"
            } else {
                "already so, nothing changed"
            };
            print_report(&report, json, what);
            Ok(())
        }
        Err(e) => Err(fail("member", exit_of(&e), &e.to_string())),
    }
}

fn print_report(report: &ha::raft::MembershipReport, json: bool, what: &str) {
    if json {
        println!("{}", serde_json::to_string(report).unwrap_or_default());
        return;
    }
    let ids = |m: &std::collections::BTreeMap<u64, String>| {
        m.keys().map(u64::to_string).collect::<Vec<_>>().join(",")
    };
    let learners = if report.learners.is_empty() {
        "none".to_owned()
    } else {
        ids(&report.learners)
    };
    println!(
        "{what}; voters: {}; learners: {learners}",
        ids(&report.voters)
    );
}

async fn promote_when_caught_up(admin: &RaftAdmin, id: u64, timeout: f64, json: bool) -> Exit {
    use ha::raft::MembershipRefusal::NotCaughtUp;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs_f64(timeout);
    loop {
        match admin.change(&MembershipChange::Promote { id }).await {
            Ok(report) => {
                println!(
                    "{}",
                    if json {
                        serde_json::to_string(&report).unwrap_or_default()
                    } else {
                        format!("node {id} is a voter")
                    }
                );
                return Exit::Clean;
            }
            Err(AdminError::Refused(NotCaughtUp { .. }))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => return fail("member add", exit_of(&e), &e.to_string()),
        }
    }
}

async fn list(admin: &RaftAdmin, json: bool) -> Exit {
    let group = admin.group_status().await;
    if let Some(refused) = refused_everywhere(&group) {
        return fail("member list", Exit::Refused, &refused);
    }
    if group.members.is_empty() {
        let reason = group
            .unreachable
            .values()
            .next()
            .cloned()
            .unwrap_or_else(|| "no member answered".to_owned());
        return fail("member list", Exit::Unavailable, &reason);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(&group.members).unwrap_or_default()
        );
        return Exit::Clean;
    }
    let mut rows = vec![["ID", "ADDRESS", "KIND", "STATE"].map(str::to_owned)];
    for m in &group.members {
        let kind = match m.kind {
            MemberKind::Voter => "voter",
            MemberKind::Learner => "learner",
            MemberKind::Outside => "outside",
        };
        let state = m
            .status
            .as_ref()
            .map_or_else(|| "unreachable".to_owned(), |s| s.state.clone());
        rows.push([m.id.to_string(), m.address.clone(), kind.to_owned(), state]);
    }
    print!("{}", table(&rows));
    Exit::Clean
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_raft_urls_are_taken() {
        assert_eq!(
            endpoints("raft://127.0.0.1:1,127.0.0.1:2/"),
            Ok(vec!["127.0.0.1:1".to_owned(), "127.0.0.1:2".to_owned()])
        );
        assert!(endpoints("etcd://127.0.0.1:2379").is_err_and(|e| e.contains("etcdctl")));
        assert!(endpoints("raft://").is_err());
        assert!(endpoints("raft://host").is_err());
    }
}
