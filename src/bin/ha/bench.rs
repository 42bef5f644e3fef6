//! `ha bench`: how long a coordinator role is without an ACTIVE, measured on this machine.
//! A benchmark, never a timed test: it prints tables (n, p50, p90, p99, max) and writes
//! JSON with the machine it ran on.
//!
//! Scenarios so far:
//! - **failover** (crash): three `ha node --active-standby` processes on an embedded Raft
//!   group; the ACTIVE is SIGKILLed; the gap runs from the kill to the next `elected`
//!   event. Split by whether the killed process also hosted the Raft leader. One row per
//!   TTL.
//! - **handoff** (graceful): the same group; the ACTIVE is SIGTERMed (it resigns); the gap
//!   runs to the next `elected`. And in-process on the memory backend, where the gap is
//!   `ActiveStandby::stop` → the other replica ACTIVE.
//!
//! Not yet: etcd and the `etcdctl lock`/`elect` references, throughput, 10,000 sessions,
//! footprint (docs/benchmarks.md lists them).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::nodes::Group;
use crate::Exit;

/// What `ha bench` was asked for.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Few trials, one TTL: for CI, so the benchmark never rots.
    pub quick: bool,
    /// Where to write the JSON results.
    pub out: Option<PathBuf>,
}

/// One measured series.
struct Series {
    scenario: &'static str,
    backend: &'static str,
    variant: String,
    ttl: Option<Duration>,
    gaps_ms: Vec<f64>,
}

/// n, p50, p90, p99, max of a series (nearest-rank percentiles).
fn summary(values: &[f64]) -> Option<(usize, f64, f64, f64, f64)> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = |p: f64| sorted[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    Some((n, rank(0.50), rank(0.90), rank(0.99), sorted[n - 1]))
}

impl Series {
    fn json(&self) -> Value {
        let stats = summary(&self.gaps_ms);
        json!({
            "scenario": self.scenario,
            "backend": self.backend,
            "variant": self.variant,
            "ttl_s": self.ttl.map(|t| t.as_secs_f64()),
            "gaps_ms": self.gaps_ms,
            "n": stats.map(|s| s.0),
            "p50_ms": stats.map(|s| s.1),
            "p90_ms": stats.map(|s| s.2),
            "p99_ms": stats.map(|s| s.3),
            "max_ms": stats.map(|s| s.4),
        })
    }

    fn row(&self) -> String {
        let ttl = self
            .ttl
            .map_or_else(|| "-".to_owned(), |t| format!("{:.0} s", t.as_secs_f64()));
        match summary(&self.gaps_ms) {
            Some((n, p50, p90, p99, max)) => {
                let per_ttl = self.ttl.map_or_else(
                    || "-".to_owned(),
                    |t| format!("{:.2}", p99 / (t.as_secs_f64() * 1000.0)),
                );
                format!(
                    "| {} | {} | {} | {ttl} | {n} | {p50:.1} | {p90:.1} | {p99:.1} | {max:.1} | {per_ttl} |",
                    self.scenario, self.backend, self.variant
                )
            }
            None => format!(
                "| {} | {} | {} | {ttl} | 0 | - | - | - | - | - |",
                self.scenario, self.backend, self.variant
            ),
        }
    }
}

/// The machine: cores and kernel.
fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    json!({ "cores": cores, "kernel": kernel, "build": if cfg!(debug_assertions) { "debug" } else { "release" } })
}

/// Runs the benchmark; exits 1 if a scenario failed.
pub async fn run(options: BenchOptions) -> Exit {
    let outcome = tokio::select! {
        outcome = bench(&options) => outcome,
        () = crate::shutdown_signal() => Err(anyhow!("interrupted")),
    };
    match outcome {
        Ok(()) => Exit::Clean,
        Err(error) => {
            eprintln!("ha bench failed: {error:#}");
            Exit::Failed
        }
    }
}

async fn bench(options: &BenchOptions) -> Result<()> {
    let machine = machine();
    println!("ha bench on {machine}");
    let (ttls, crashes, handoffs): (&[u64], usize, usize) = if options.quick {
        (&[2], 2, 3)
    } else {
        (&[2, 5, 10], 10, 20)
    };
    let mut series = Vec::new();
    series.push(memory_handoff(handoffs * 5).await?);
    for (index, ttl) in ttls.iter().enumerate() {
        let ttl = Duration::from_secs(*ttl);
        // Handoffs do not depend on the TTL: measure them once, on the first group.
        let handoff_trials = if index == 0 { handoffs } else { 0 };
        series.extend(raft_processes(ttl, crashes, handoff_trials).await?);
    }
    println!();
    println!(
        "| scenario | backend | variant | TTL | n | p50 ms | p90 ms | p99 ms | max ms | p99/TTL |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for s in &series {
        println!("{}", s.row());
    }
    let report = json!({
        "machine": machine,
        "quick": options.quick,
        "results": series.iter().map(Series::json).collect::<Vec<_>>(),
    });
    if let Some(path) = &options.out {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// Graceful handoff in one process on the memory backend: two replicas, the ACTIVE
/// stopped, the gap until the other is ACTIVE.
async fn memory_handoff(trials: usize) -> Result<Series> {
    use ha::{Active, ActiveStandby, Backend, Role, RoleState, ServerId};
    let backend: Arc<dyn Backend> = Arc::new(ha::memory::MemoryBackend::new());
    let role = Role::new("bench")?;
    let spawn = |id: u64| {
        ActiveStandby::builder(Arc::clone(&backend), role.clone(), ServerId::new(id))
            .ttl(Duration::from_secs(2))
            .spawn(|active: Active| async move {
                active.ready().await?;
                active.stopping().cancelled().await;
                Ok::<_, ha::Error>(())
            })
    };
    let is_active = |state: &RoleState| matches!(state, RoleState::Active { .. });
    let mut replicas = vec![spawn(1), spawn(2)];
    let mut gaps = Vec::new();
    for next_id in (3..).take(trials) {
        let Some(index) = wait_until(Duration::from_secs(10), || {
            replicas.iter().position(|r| is_active(&r.state()))
        })
        .await
        else {
            return Err(anyhow!("memory: no ACTIVE within 10 s"));
        };
        let leaving = replicas.remove(index);
        let mut other = replicas[0].watch_state();
        let started = Instant::now();
        leaving.shutdown();
        tokio::time::timeout(Duration::from_secs(10), other.wait_for(is_active))
            .await
            .context("memory: no handoff within 10 s")?
            .context("memory: the other replica stopped")?;
        gaps.push(started.elapsed().as_secs_f64() * 1000.0);
        let _ = leaving.wait().await;
        replicas.push(spawn(next_id));
    }
    for replica in replicas {
        let _ = replica.stop().await;
    }
    Ok(Series {
        scenario: "handoff",
        backend: "memory",
        variant: "in-process, ActiveStandby::stop".to_owned(),
        ttl: None,
        gaps_ms: gaps,
    })
}

/// Polls `check` every millisecond until it returns `Some`, for at most `within`.
async fn wait_until<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Crashes and graceful stops of the ACTIVE in a group of three `ha node` processes.
async fn raft_processes(ttl: Duration, crashes: usize, handoffs: usize) -> Result<Vec<Series>> {
    println!(
        "raft, TTL {} s: {crashes} crashes, {handoffs} handoffs",
        ttl.as_secs()
    );
    let mut group = Group::new(ttl)?;
    group.narrated = std::env::var_os("HA_BENCH_VERBOSE").is_some();
    // A STANDBY whose session self-fences while the Raft leader moves goes back in line
    // instead of exiting, as a production replica would be restarted.
    group.extra_args = vec!["--recampaign".to_owned()];
    group.show_standby_logs.store(false, Ordering::Relaxed);
    for id in crate::nodes::NODES {
        group.start(id)?;
    }
    let first = group
        .wait_for("a first ACTIVE", Duration::from_secs(30), |e| {
            e.kind() == "proclaimed"
        })
        .await?;
    let mut active = first.node;
    let mut token = first.token();
    let mut with_leader = Vec::new();
    let mut without_leader = Vec::new();
    let mut graceful = Vec::new();
    for trial in 0..crashes + handoffs {
        let crash = trial < crashes;
        let trial_started = Instant::now();
        let hosted_leader = group.raft_leader == Some(active);
        let sent = group.signal(
            active,
            if crash {
                Signal::SIGKILL
            } else {
                Signal::SIGTERM
            },
        )?;
        let within = ttl + Duration::from_secs(20);
        let next = group.next_elected(active, token, within).await?;
        let gap_ms = next.at_unix_us().saturating_sub(sent) as f64 / 1000.0;
        match (crash, hosted_leader) {
            (true, true) => with_leader.push(gap_ms),
            (true, false) => without_leader.push(gap_ms),
            (false, _) => graceful.push(gap_ms),
        }
        // Steady state before the next trial: the new ACTIVE ready, and the stopped node
        // back as a STANDBY (after a crash, once its old lease has expired).
        let stopped = active;
        token = next.token();
        // The elected node may lose the role before it is ready (its session can
        // self-fence while the Raft leader moves); wait for whichever ACTIVE is ready.
        let ready = group
            .wait_for("a ready ACTIVE", Duration::from_secs(30), |e| {
                e.kind() == "proclaimed" && e.token() >= token
            })
            .await?;
        active = ready.node;
        token = ready.token();
        group.reap(stopped).await;
        group.start(stopped)?;
        group
            .wait_for(
                "the restarted node in STANDBY",
                ttl + Duration::from_secs(30),
                |e| e.kind() == "standby" && e.node == stopped,
            )
            .await?;
        println!(
            "  trial {trial}: {} gap {gap_ms:.1} ms (trial took {:.1} s)",
            if crash { "crash" } else { "handoff" },
            trial_started.elapsed().as_secs_f64()
        );
    }
    group.stop_all().await;
    if !group.losses.is_empty() {
        println!(
            "  roles lost during the run besides the stopped ACTIVE: {}",
            group.losses.join(", ")
        );
    }
    let mut series = Vec::new();
    if crashes > 0 {
        series.push(Series {
            scenario: "failover",
            backend: "raft",
            variant: "SIGKILL, Raft leader survives".to_owned(),
            ttl: Some(ttl),
            gaps_ms: without_leader,
        });
        series.push(Series {
            scenario: "failover",
            backend: "raft",
            variant: "SIGKILL, Raft leader killed too".to_owned(),
            ttl: Some(ttl),
            gaps_ms: with_leader,
        });
    }
    if handoffs > 0 {
        series.push(Series {
            scenario: "handoff",
            backend: "raft",
            variant: "SIGTERM of ha node".to_owned(),
            ttl: Some(ttl),
            gaps_ms: graceful,
        });
    }
    Ok(series)
}
