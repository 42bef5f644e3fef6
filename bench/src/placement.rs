//! Placement (issue 30): three `ha node --active-standby` processes, TTL 2 s, with
//! placement off (`--no-placement`, the code before it) and on, in one run:
//! - SIGKILL of the ACTIVE's process: the gap to the next `elected`, whatever the
//!   process hosted (and how often it hosted the Raft leader);
//! - SIGKILL of the Raft leader's process while the ACTIVE lives elsewhere: whether the
//!   ACTIVE kept its role (no `lost`, no `elected` anywhere) through the TTL and more;
//! - a rolling restart (SIGTERM, start again, each member in turn): handovers per
//!   restarted ACTIVE, roles lost, and the longest keepalive stall a session on another
//!   member saw (a probe renewing every 20 ms through `raft://` on that member).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use ha::{Member, Role, ServerId};
use ha_testkit::Signal;
use serde_json::{json, Value};

use crate::group::{Group, Launch, NODES};
use crate::processes::renewal_phase;
use crate::report::Series;

/// The TTL the targets are set at.
pub const TTL: Duration = Duration::from_secs(2);
/// After a trial's steady state is back: time for placement to move the Raft leader
/// (a leadership is two leader leases old before it moves) and for a member to catch up.
const SETTLE: Duration = Duration::from_millis(2500);
/// How long a restarted member may take to be a STANDBY again (an old lease of its
/// own may have to expire first).
const RESTARTED_WITHIN: Duration = Duration::from_secs(32);
/// How long the ACTIVE must keep its role after the Raft leader's process is killed.
const KEEP_FOR: Duration = Duration::from_secs(4);

/// What one configuration (placement off or on) measured.
pub struct Measured {
    /// Gaps of the ACTIVE-process kills.
    pub series: Series,
    /// The table row of the other two scenarios.
    pub row: Value,
}

/// `kills` of each kind and `rounds` of rolling restarts, with placement `on` or off.
pub async fn trials(ha: &Path, on: bool, kills: usize, rounds: usize) -> Result<Measured> {
    let label = if on { "placement on" } else { "placement off" };
    println!("raft, TTL 2 s, {label}: {kills} kills of the ACTIVE, {kills} of the Raft leader, {rounds} rolling restarts");
    let mut group = Group::new(ha, TTL, Launch::RaftCoordinators)?;
    group.extra_args = vec!["--recampaign".to_owned()];
    if !on {
        group.extra_args.push("--no-placement".to_owned());
    }
    group.start_all().await?;

    let mut gaps = Vec::new();
    let mut hosted_leader = 0;
    for trial in 0..kills {
        let (active, token) = steady(&mut group).await?;
        tokio::time::sleep(renewal_phase(TTL, trial)).await;
        if group.seen.raft_leader == Some(active) {
            hosted_leader += 1;
        }
        let sent = group.signal(active, Signal::KILL)?;
        let next = group
            .next_elected(active, token, TTL + Duration::from_secs(20))
            .await?;
        gaps.push(next.at_unix_us().saturating_sub(sent) as f64 / 1000.0);
        group.restart(active, RESTARTED_WITHIN).await?;
    }
    println!("  ACTIVE kills: {hosted_leader} of {kills} also killed the Raft leader");

    let (mut kept, mut leader_kills, mut together) = (0, 0, 0);
    for _ in 0..kills {
        let (active, _) = steady(&mut group).await?;
        let Some(leader) = group.seen.raft_leader.filter(|l| *l != active) else {
            together += 1;
            continue;
        };
        let (elected, lost) = (group.seen.elected, group.seen.losses.len());
        group.signal(leader, Signal::KILL)?;
        group.read_for(KEEP_FOR).await;
        leader_kills += 1;
        if group.seen.elected == elected
            && group.seen.losses.len() == lost
            && group.seen.ready_active.is_some_and(|(a, _)| a == active)
        {
            kept += 1;
        } else {
            println!("  the ACTIVE (node {active}) did not keep its role when the Raft leader (node {leader}) was killed");
        }
        group.restart(leader, RESTARTED_WITHIN).await?;
    }

    let (mut handovers, mut restarted_actives, mut stalls) = (0, 0, Vec::new());
    let lost_before = group.seen.losses.len();
    for _ in 0..rounds {
        for id in NODES {
            let (active, _) = steady(&mut group).await?;
            restarted_actives += usize::from(active == id);
            let probe_on = NODES.into_iter().find(|n| *n != id).unwrap_or(1);
            let probe = Probe::start(&group.endpoint(probe_on)).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let elected = group.seen.elected;
            group.signal(id, Signal::TERM)?;
            group.reap(id).await;
            group.restart(id, RESTARTED_WITHIN).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            stalls.push(probe.stop().await?);
            handovers += group.seen.elected - elected;
        }
    }
    let lost = group.seen.losses.len() - lost_before;
    group.stop_all().await;
    let stall_max = stalls.iter().copied().fold(0.0, f64::max);
    println!(
        "  Raft leader kills: kept {kept} of {leader_kills} ({together} skipped: the leader was on the ACTIVE's member); \
         rolling restarts: {handovers} handovers for {restarted_actives} restarted ACTIVEs, {lost} roles lost, \
         longest keepalive stall {stall_max:.1} ms"
    );
    Ok(Measured {
        series: Series {
            scenario: "failover",
            backend: "raft",
            variant: format!("SIGKILL of the ACTIVE's process, {label} ({hosted_leader} of {kills} with the Raft leader)"),
            ttl: Some(TTL),
            gaps_ms: gaps,
        },
        row: json!({
            "placement": label,
            "leader_kills": leader_kills,
            "kept": kept,
            "together": together,
            "restarts": rounds * NODES.len(),
            "restarted_actives": restarted_actives,
            "handovers": handovers,
            "lost": lost,
            "stall_max_ms": stall_max,
            "stalls_ms": stalls,
        }),
    })
}

/// Waits for a ready ACTIVE with all three members running, then `SETTLE`.
async fn steady(group: &mut Group) -> Result<(u64, u64)> {
    group.ready_active(Duration::from_secs(30)).await?;
    group.read_for(SETTLE).await;
    group.ready_active(Duration::from_secs(30)).await
}

/// A session renewed every 20 ms through one member; measures the longest time from a
/// renewal's first attempt to its success.
struct Probe {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<f64>>,
}

impl Probe {
    async fn start(endpoint: &str) -> Result<Self> {
        let backend = crate::load::connect(&format!("raft://{endpoint}")).await?;
        let role = Role::new("probe").map_err(|e| anyhow::anyhow!("{e}"))?;
        let member = Member::new(ServerId::new(900), role, "probe");
        let lease = backend.register(&member, TTL).await?.id;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut longest = Duration::ZERO;
            let mut pending: Option<Instant> = None;
            // At most a minute of renewals, whatever happens.
            for _ in 0..3000 {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let since = *pending.get_or_insert_with(Instant::now);
                let renewed = tokio::time::timeout(TTL, backend.keep_alive(lease)).await;
                if matches!(renewed, Ok(Ok(_))) {
                    longest = longest.max(since.elapsed());
                    pending = None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = backend.revoke(lease).await;
            Ok(longest.as_secs_f64() * 1000.0)
        });
        Ok(Self { stop, task })
    }

    async fn stop(self) -> Result<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}
