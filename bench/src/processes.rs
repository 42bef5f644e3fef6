//! Crashes (SIGKILL) and graceful stops (SIGTERM) of the ACTIVE in a group of three
//! coordinator processes: `ha node --active-standby` on their own Raft group, or
//! `ha run` on etcd. The gap runs from the signal to the next `elected` event.

use std::time::{Duration, Instant};

use anyhow::Result;
use ha_testkit::Signal;

use crate::group::{Group, NODES};
use crate::procfs;
use crate::report::{Report, Series};

/// A wait before the crash of trial `trial`: a fraction of the renewal interval (TTL/3),
/// the fractions spread evenly over the trials (golden-ratio steps), so that crashes
/// land at every point of the holder's renewal cycle, as real ones do.
pub fn renewal_phase(ttl: Duration, trial: usize) -> Duration {
    (ttl / 3).mul_f64((trial as f64 * 0.618_033_988_75).fract())
}

/// The pause before a handoff's SIGTERM, as the etcdctl reference pauses.
const SETTLE: Duration = Duration::from_millis(500);

/// What one group of trials measured besides the gaps.
pub struct Footprint {
    /// Start of a process → its `standby` event, ms (restarts with their data kept).
    pub start_to_standby_ms: Vec<f64>,
    /// RSS of each process once the group is idle (one ACTIVE, two STANDBY), bytes.
    pub idle_rss: Vec<u64>,
}

impl Footprint {
    /// Into `report`: the start → STANDBY times, and for the first group of a backend
    /// the idle RSS of its processes.
    pub fn report(self, report: &mut Report, backend: &'static str, process: &str, first: bool) {
        if first {
            let max_rss = self.idle_rss.iter().copied().max().unwrap_or(0);
            report.footprint(
                &format!("idle {process} RSS (max of 3)"),
                backend,
                format!("{:.1} MiB", procfs::mib(max_rss)),
                serde_json::json!(self.idle_rss),
                // `ha node` is a server, as etcd is; `ha run` is etcd's client.
                (backend == "raft").then_some(crate::report::IDLE_SERVER),
            );
        }
        report.start_to_standby(backend, self.start_to_standby_ms);
    }
}

/// `crashes` SIGKILLs then `handoffs` SIGTERMs of the ACTIVE of `group`.
pub async fn trials(
    mut group: Group,
    backend: &'static str,
    ttl: Duration,
    crashes: usize,
    handoffs: usize,
) -> Result<(Vec<Series>, Footprint)> {
    println!(
        "{backend}, TTL {} s: {crashes} crashes, {handoffs} handoffs",
        ttl.as_secs()
    );
    // A STANDBY whose session self-fences while the Raft leader moves goes back in line
    // instead of exiting, as a production replica would be restarted.
    group.extra_args = vec!["--recampaign".to_owned()];
    group.start_all().await?;
    // Idle: the other two in STANDBY, nothing but keepalives and watches.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss = NODES
        .iter()
        .map(|id| procfs::rss_bytes(group.pid(*id)?))
        .collect::<Result<Vec<_>>>()?;
    let mut with_leader = Vec::new();
    let mut without_leader = Vec::new();
    let mut graceful_with_leader = Vec::new();
    let mut graceful_without_leader = Vec::new();
    let mut start_to_standby_ms = Vec::new();
    for trial in 0..crashes + handoffs {
        let crash = trial < crashes;
        let trial_started = Instant::now();
        let (active, token) = group.ready_active(Duration::from_secs(30)).await?;
        if crash {
            // Anywhere in the ACTIVE's renewal cycle: otherwise the kill follows its
            // election by about the same time in every trial, always at one phase.
            tokio::time::sleep(renewal_phase(ttl, trial)).await;
        } else {
            // Let the node restarted last queue up (its `standby` event comes before its
            // campaign is written), as the etcdctl reference waits: otherwise that write
            // races the resign in some trials and the gap measures both.
            tokio::time::sleep(SETTLE).await;
        }
        let hosted_leader = group.seen.raft_leader == Some(active);
        let sent = group.signal(active, if crash { Signal::KILL } else { Signal::TERM })?;
        let within = ttl + Duration::from_secs(20);
        let next = group.next_elected(active, token, within).await?;
        let gap_ms = next.at_unix_us().saturating_sub(sent) as f64 / 1000.0;
        match (crash, hosted_leader) {
            (true, true) => with_leader.push(gap_ms),
            (true, false) => without_leader.push(gap_ms),
            (false, true) => graceful_with_leader.push(gap_ms),
            (false, false) => graceful_without_leader.push(gap_ms),
        }
        // Steady state before the next trial: the new ACTIVE ready, and the stopped node
        // back as a STANDBY (after a crash, once its old lease has expired).
        let stopped = active;
        let elected = next.token();
        // The elected node may lose the role before it is ready (its session can
        // self-fence while the Raft leader moves); wait for whichever ACTIVE is ready.
        group
            .wait_for("a ready ACTIVE", Duration::from_secs(30), |l| {
                l.is("proclaimed") && l.token() >= elected
            })
            .await?;
        let (spawned, standby) = group
            .restart(stopped, ttl + Duration::from_secs(30))
            .await?;
        start_to_standby_ms.push(standby.at_unix_us().saturating_sub(spawned) as f64 / 1000.0);
        println!(
            "  trial {trial}: {} gap {gap_ms:.1} ms{} (trial took {:.1} s)",
            if crash { "crash" } else { "handoff" },
            if hosted_leader {
                ", the stopped process hosted the Raft leader"
            } else {
                ""
            },
            trial_started.elapsed().as_secs_f64()
        );
    }
    group.stop_all().await;
    if !group.seen.losses.is_empty() {
        println!(
            "  roles lost during the run besides the stopped ACTIVE: {}",
            group.seen.losses.join(", ")
        );
    }
    let series_of = |scenario, variant: &str, gaps_ms| Series {
        scenario,
        backend,
        variant: variant.to_owned(),
        ttl: Some(ttl),
        gaps_ms,
    };
    let mut series = Vec::new();
    let raft = backend == "raft";
    if crashes > 0 && raft {
        series.push(series_of(
            "failover",
            "SIGKILL, Raft leader survives",
            without_leader,
        ));
        series.push(series_of(
            "failover",
            "SIGKILL, Raft leader killed too",
            with_leader,
        ));
    } else if crashes > 0 {
        series.push(series_of("failover", "SIGKILL of ha run", without_leader));
    }
    if handoffs > 0 && raft {
        series.push(series_of(
            "handoff",
            "SIGTERM, Raft leader survives",
            graceful_without_leader,
        ));
        series.push(series_of(
            "handoff",
            "SIGTERM, Raft leader stopped too",
            graceful_with_leader,
        ));
    } else if handoffs > 0 {
        series.push(series_of(
            "handoff",
            "SIGTERM of ha run",
            graceful_without_leader,
        ));
    }
    Ok((
        series,
        Footprint {
            start_to_standby_ms,
            idle_rss,
        },
    ))
}
