//! `ha-bench`: how long a coordinator role is without an ACTIVE, and what keeping it
//! costs, measured on this machine with the `ha` binary users run. A benchmark, never a
//! timed test: it prints tables and writes JSON with the machine it ran on. Not part of
//! the product: `cargo run --release -p ha-bench --features etcd`.
//!
//! Scenarios (docs/benchmarks.md explains each and holds a full run):
//! 1. **failover** (crash): three coordinator processes, `ha node --active-standby` on
//!    their own Raft group, or `ha run` on etcd; the ACTIVE is SIGKILLed; the gap runs
//!    from the kill to the next `elected` event. Raft splits by whether the killed process
//!    hosted the Raft leader. Reference: `etcdctl lock --ttl N` on the same etcd.
//! 2. **handoff** (graceful): the same groups, SIGTERM (the ACTIVE resigns); in-process on
//!    memory; reference: `etcdctl elect`, SIGINT.
//! 3. **throughput**: campaign+resign cycles per second, 1 and 16 elections at once.
//! 4. **scale**: live sessions (keepalive CPU and RSS of each server), and many elections
//!    of three candidates each.
//! 5. **footprint**: idle RSS, start → STANDBY, disk and RSS after a long run of cycles,
//!    the `ha` binary.
//! 6. **dead-member**: takeover when the member the STANDBY uses died silently, against
//!    the same with every member alive, on three `ha node` and on the 3-member etcd.
//!
//! etcd scenarios run on a private single member and a private 3-member cluster (the
//! like-for-like reference for the 3-replica Raft group; every table gives the ratio to
//! it), or on an external etcd (`--etcd-endpoints`). They need the `etcd` feature and an
//! `etcd` binary; they are skipped (and said so) without them, and fail when `CI` is set.

mod dead_member;
#[cfg(feature = "etcd")]
mod etcd_servers;
mod group;
mod load;
mod memory;
mod placement;
mod processes;
mod procfs;
#[cfg(feature = "etcd")]
mod reference;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

use group::{Group, Launch, NODES};
use report::{cell, Report};

/// The session TTL of the load scenarios.
const SESSION_TTL: Duration = Duration::from_secs(10);

/// The scenarios `--only` can pick.
const SCENARIOS: &[&str] = &[
    "memory",
    "processes",
    "throughput",
    "sessions",
    "elections",
    "endurance",
    "dead-member",
    "placement",
];

/// Measure failover (SIGKILL) and handoff (SIGTERM) gaps, throughput, scale and
/// footprint of `ha` on this machine and print tables (n, p50, p90, p99, max).
#[derive(Debug, Parser)]
#[command(name = "ha-bench", version)]
struct Options {
    /// Few trials and one TTL (2 s), as CI runs it.
    #[arg(long)]
    quick: bool,
    /// Write the results and the machine as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Campaign+resign cycles of the long run whose disk and memory are measured
    /// (default 1,000,000; with --quick 2,000).
    #[arg(long)]
    cycles: Option<u64>,
    /// Kills of each kind per configuration of the placement scenario (default 30; with
    /// --quick 2), and its rolling restarts of all three members (default 3; --quick 1).
    #[arg(long)]
    placement_kills: Option<usize>,
    /// Crash (SIGKILL) trials per process group and TTL (default 10; with --quick 2).
    #[arg(long)]
    crashes: Option<usize>,
    /// Handoff (SIGTERM) trials per process group, at the first TTL (default 60; with
    /// --quick 3).
    #[arg(long)]
    handoffs: Option<usize>,
    /// Only these scenarios, comma-separated: memory, processes (failover and handoff
    /// of process groups, with the etcdctl references), throughput, sessions,
    /// elections, endurance, dead-member, placement (three `ha node --active-standby`,
    /// TTL 2 s, placement off and on: kills of the ACTIVE's process, of the Raft leader's,
    /// rolling restarts).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The `ha` binary to measure. Default: built now, with this build's profile and
    /// features, when run by `cargo run`; else the `ha` beside this executable.
    #[arg(long, env = "HA_BIN")]
    ha: Option<PathBuf>,
    /// Run the etcd scenarios on this etcd (comma-separated `host:port`s) instead of
    /// the private single member and 3-member cluster.
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
}

impl Options {
    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }

    fn check(&self) -> Result<()> {
        match self.only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
            Some(unknown) => bail!(
                "unknown scenario {unknown:?}; known: {}",
                SCENARIOS.join(", ")
            ),
            None => Ok(()),
        }
    }
}

/// How many trials and how much load, from `--quick` and the overrides.
struct Plan {
    ttls: &'static [u64],
    crashes: usize,
    handoffs: usize,
    cycles: u64,
    throughput_for: Duration,
    sessions: usize,
    sessions_window: Duration,
    elections: usize,
}

impl Plan {
    fn of(options: &Options) -> Self {
        let quick = options.quick;
        Self {
            ttls: if quick { &[2] } else { &[2, 5, 10] },
            crashes: options.crashes.unwrap_or(if quick { 2 } else { 10 }),
            handoffs: options.handoffs.unwrap_or(if quick { 3 } else { 60 }),
            cycles: options
                .cycles
                .unwrap_or(if quick { 2_000 } else { 1_000_000 }),
            throughput_for: Duration::from_secs(if quick { 2 } else { 10 }),
            sessions: if quick { 500 } else { 10_000 },
            sessions_window: Duration::from_secs(if quick { 4 } else { 30 }),
            elections: if quick { 50 } else { 1_000 },
        }
    }
}

fn main() -> ExitCode {
    let options = Options::parse();
    // The load scenarios' clients run in this process: only warnings, or they would
    // drown the tables.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let outcome = tokio::runtime::Runtime::new()
        .context("cannot start the runtime")
        .and_then(|runtime| {
            runtime.block_on(async {
                tokio::select! {
                    outcome = run(&options) => outcome,
                    _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
                }
            })
        });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ha-bench failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: &Options) -> Result<()> {
    options.check()?;
    let ha = ha_binary(options.ha.as_deref())?;
    let machine = machine();
    println!("ha-bench on {machine}, measuring {}", ha.display());
    let plan = Plan::of(options);
    let mut report = Report::new(machine, options.quick);
    if options.wants("memory") {
        report.series(memory::handoffs(plan.handoffs * 5).await?);
    }
    #[cfg(feature = "etcd")]
    let etcd = etcd_servers::start(&mut report, &options.etcd_endpoints).await?;
    #[cfg(feature = "etcd")]
    report.compare_with(etcd.as_ref().and_then(etcd_servers::Servers::like_for_like));
    if options.wants("processes") {
        raft_processes(&mut report, &plan, &ha).await?;
        #[cfg(feature = "etcd")]
        if let Some(etcd) = &etcd {
            etcd_processes(&mut report, &plan, &ha, etcd).await?;
        }
    }
    let load = ["throughput", "sessions", "elections", "endurance"];
    if load.iter().any(|s| options.wants(s)) {
        raft_load(&mut report, options, &plan, &ha).await?;
        #[cfg(feature = "etcd")]
        for target in etcd.iter().flat_map(|e| &e.targets) {
            let backend = load::connect(&target.url("bench-load")).await?;
            let servers = Servers {
                name: target.name,
                pids: target.pids.clone(),
            };
            load_scenarios(&mut report, options, &plan, &backend, &servers).await?;
        }
    }
    if options.wants("placement") {
        let quick = options.quick;
        let kills = options
            .placement_kills
            .unwrap_or(if quick { 2 } else { 30 });
        let rounds = if quick { 1 } else { 3 };
        for on in [false, true] {
            let measured = placement::trials(&ha, on, kills, rounds).await?;
            report.series(measured.series);
            report.placement(measured.row);
        }
    }
    if options.wants("dead-member") {
        raft_dead_member(&mut report, &plan, &ha).await?;
        #[cfg(feature = "etcd")]
        if let Some(cluster) = etcd
            .iter()
            .flat_map(|e| &e.targets)
            .find(|t| t.endpoints.len() >= 3)
        {
            let proxies = ha_testkit::proxies_to(&cluster.endpoints).await?;
            let through: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
            let members = dead_member::Members {
                backend: cluster.name,
                direct: cluster.url("bench-dead-member"),
                proxied: format!("etcd://{}/bench-dead-member", through.join(",")),
                proxies: &proxies,
            };
            for series in dead_member::trials(&ha, &members, plan.crashes).await? {
                report.series(series);
            }
        }
    }
    binary_footprint(&mut report, &ha);
    report.print();
    if let Some(path) = &options.out {
        report.write(path)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// The `ha` binary to run: `explicit`; else, under `cargo run`, built now with this
/// build's profile and features (so a stale binary is never measured); else the one
/// beside this executable.
fn ha_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    let beside = std::env::current_exe()
        .context("cannot find this executable")?
        .with_file_name("ha");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "--quiet", "-p", "ha-coord", "--bin", "ha"]);
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        if cfg!(feature = "etcd") {
            build.args(["--features", "etcd"]);
        }
        let status = build.status().context("cannot run cargo build")?;
        if !status.success() {
            bail!("cargo build of the ha binary failed ({status})");
        }
    }
    if !beside.is_file() {
        bail!(
            "no ha binary at {}: build it (cargo build --release --bin ha --features etcd) or pass --ha PATH",
            beside.display()
        );
    }
    Ok(beside)
}

/// The machine: cores and kernel.
fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    json!({ "cores": cores, "kernel": kernel, "build": build })
}

/// Failover and handoff of three `ha node --active-standby` processes, per TTL; the
/// first group also gives the idle RSS. Handoffs do not depend on the TTL: measured on
/// the first group only.
async fn raft_processes(report: &mut Report, plan: &Plan, ha: &Path) -> Result<()> {
    for (index, ttl) in plan.ttls.iter().enumerate() {
        let ttl = Duration::from_secs(*ttl);
        let handoffs = if index == 0 { plan.handoffs } else { 0 };
        let group = Group::new(ha, ttl, Launch::RaftCoordinators)?;
        let (series, footprint) =
            processes::trials(group, "raft", ttl, plan.crashes, handoffs).await?;
        footprint.report(report, "raft", "`ha node --active-standby`", index == 0);
        series.into_iter().for_each(|s| report.series(s));
    }
    Ok(())
}

/// The same with three `ha run` processes on each etcd, and the etcdctl references on
/// the single member (or the external etcd).
#[cfg(feature = "etcd")]
async fn etcd_processes(
    report: &mut Report,
    plan: &Plan,
    ha: &Path,
    etcd: &etcd_servers::Servers,
) -> Result<()> {
    use reference::Reference;
    for target in &etcd.targets {
        for (index, ttl) in plan.ttls.iter().enumerate() {
            let ttl = Duration::from_secs(*ttl);
            let handoffs = if index == 0 { plan.handoffs } else { 0 };
            let url = target.url(&format!("bench-ttl{}", ttl.as_secs()));
            let group = Group::new(ha, ttl, Launch::Backend(url))?;
            let (series, footprint) =
                processes::trials(group, target.name, ttl, plan.crashes, handoffs).await?;
            footprint.report(report, target.name, "`ha run`", index == 0);
            series.into_iter().for_each(|s| report.series(s));
        }
    }
    if let Some(target) = etcd.reference() {
        let endpoints = target.etcdctl_endpoints();
        for (index, ttl) in plan.ttls.iter().enumerate() {
            let crash = Reference::LockCrash {
                ttl: Duration::from_secs(*ttl),
            };
            report.series(reference::measure(&endpoints, crash, plan.crashes).await?);
            if index == 0 && plan.handoffs > 0 {
                let handoff = Reference::ElectHandoff;
                report.series(reference::measure(&endpoints, handoff, plan.handoffs).await?);
            }
        }
    }
    Ok(())
}

/// Takeover with the STANDBY's member dead, on three bare `ha node` processes.
async fn raft_dead_member(report: &mut Report, plan: &Plan, ha: &Path) -> Result<()> {
    let mut group = Group::new(ha, dead_member::TTL, Launch::RaftMembers)?;
    for id in NODES {
        group.start(id)?;
    }
    let endpoints = group.endpoints();
    let proxies = ha_testkit::proxies_to(&endpoints).await?;
    let through: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
    let members = dead_member::Members {
        backend: "raft",
        direct: group.raft_url(),
        proxied: format!("raft://{}", through.join(",")),
        proxies: &proxies,
    };
    let series = dead_member::trials(ha, &members, plan.crashes).await;
    group.stop_all().await;
    series?.into_iter().for_each(|s| report.series(s));
    Ok(())
}

/// The load scenarios on three bare `ha node` processes, and the long run of cycles
/// whose disk and memory they show.
async fn raft_load(report: &mut Report, options: &Options, plan: &Plan, ha: &Path) -> Result<()> {
    let mut group = Group::new(ha, SESSION_TTL, Launch::RaftMembers)?;
    let mut pids = Vec::new();
    for id in NODES {
        pids.push(group.start(id)?);
    }
    let backend = load::connect(&group.raft_url()).await?;
    let servers = Servers {
        name: "raft",
        pids: pids.clone(),
    };
    load_scenarios(report, options, plan, &backend, &servers).await?;
    if options.wants("endurance") {
        let members: Vec<(u32, PathBuf)> = NODES
            .iter()
            .zip(&pids)
            .map(|(id, pid)| (*pid, group.data_dir(*id)))
            .collect();
        let row = load::endurance(&backend, "raft", plan.cycles, &members).await?;
        let cycles = plan.cycles;
        report.footprint(
            &format!("after {cycles} campaign+resign cycles: sled disk per member"),
            "raft",
            format!("{} MiB", cell(&row["disk_mib_per_member"], 1)),
            row["disk_mib_per_member"].clone(),
            None,
        );
        report.footprint(
            &format!("after {cycles} campaign+resign cycles: RSS per member"),
            "raft",
            format!(
                "{} MiB ({} cycles/s)",
                cell(&row["rss_mib_per_member"], 1),
                cell(&row["cycles_per_s"], 0)
            ),
            row,
            None,
        );
    }
    drop(backend);
    group.stop_all().await;
    Ok(())
}

/// The servers of a backend under load.
struct Servers {
    /// The backend's name in the tables and the JSON.
    name: &'static str,
    /// The server processes, whose CPU and memory are measured.
    pids: Vec<u32>,
}

/// Throughput, sessions and elections on one backend, as `options` asks.
async fn load_scenarios(
    report: &mut Report,
    options: &Options,
    plan: &Plan,
    backend: &Arc<dyn ha::Backend>,
    servers: &Servers,
) -> Result<()> {
    if options.wants("throughput") {
        let rows = load::throughput(backend, servers.name, &[1, 16], plan.throughput_for);
        report.throughput(rows.await?);
    }
    if options.wants("sessions") {
        let row = load::sessions(
            backend,
            servers.name,
            &servers.pids,
            plan.sessions,
            SESSION_TTL,
            plan.sessions_window,
        );
        report.sessions(row.await?);
    }
    if options.wants("elections") {
        report.elections(load::elections(backend, servers.name, plan.elections).await?);
    }
    Ok(())
}

/// The size of the `ha` binary measured.
fn binary_footprint(report: &mut Report, ha: &Path) {
    let what = format!("`ha` binary ({})", ha.display());
    match std::fs::metadata(ha) {
        Ok(meta) => report.footprint_bytes(&what, "raft", meta.len(), Some(report::BINARY)),
        Err(error) => report.footprint(&what, "raft", error.to_string(), Value::Null, None),
    }
}
