//! `ha bench`: how long a coordinator role is without an ACTIVE, and what keeping it costs,
//! measured on this machine. A benchmark, never a timed test: it prints tables and writes
//! JSON with the machine it ran on.
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
//! 5. **footprint**: idle RSS, start → STANDBY, disk and RSS after a long run of cycles.
//!
//! etcd scenarios need the `etcd` feature and an `etcd` binary; they are skipped (and said
//! so) without them, and fail when `CI` is set.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};

use crate::nodes::Group;
use crate::Exit;

mod load;
mod processes;
mod procfs;
#[cfg(feature = "etcd")]
mod reference;

/// What `ha bench` was asked for.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Few trials, one TTL: for CI, so the benchmark never rots.
    pub quick: bool,
    /// Where to write the JSON results.
    pub out: Option<PathBuf>,
    /// Campaign+resign cycles of the long run (default 1,000,000; quick 2,000).
    pub cycles: Option<u64>,
    /// Crash trials per process group and TTL (default 10; quick 2).
    pub crashes: Option<usize>,
    /// Handoff trials per process group, at the first TTL (default 60; quick 3).
    pub handoffs: Option<usize>,
    /// Only these scenarios (empty: all); see [`SCENARIOS`].
    pub only: Vec<String>,
}

/// The session TTL of the load scenarios.
const SESSION_TTL: Duration = Duration::from_secs(10);

/// The scenarios `--only` can pick.
pub const SCENARIOS: &[&str] = &[
    "memory",
    "processes",
    "throughput",
    "sessions",
    "elections",
    "endurance",
];

/// A wait before the crash of trial `trial`: a fraction of the renewal interval (TTL/3),
/// the fractions spread evenly over the trials (golden-ratio steps), so that crashes
/// land at every point of the holder's renewal cycle, as real ones do.
fn renewal_phase(ttl: Duration, trial: usize) -> Duration {
    (ttl / 3).mul_f64((trial as f64 * 0.618_033_988_75).fract())
}

impl BenchOptions {
    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
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

/// A table of rows that are not gap series: its title, columns, and for each row the
/// cells and the JSON.
struct Table {
    title: &'static str,
    columns: &'static [&'static str],
    rows: Vec<(Vec<String>, Value)>,
}

impl Table {
    fn new(title: &'static str, columns: &'static [&'static str]) -> Self {
        Self {
            title,
            columns,
            rows: Vec::new(),
        }
    }

    fn print(&self) {
        if self.rows.is_empty() {
            return;
        }
        println!("\n{}\n", self.title);
        println!("| {} |", self.columns.join(" | "));
        println!("|{}", "---|".repeat(self.columns.len()));
        for (cells, _) in &self.rows {
            println!("| {} |", cells.join(" | "));
        }
    }
}

/// `value` (a JSON number or array of numbers) printed with `digits` decimals.
fn cell(value: &Value, digits: usize) -> String {
    match value {
        Value::Number(n) => n
            .as_f64()
            .map_or_else(|| n.to_string(), |f| format!("{f:.digits$}")),
        Value::Array(items) => items
            .iter()
            .map(|v| cell(v, digits))
            .collect::<Vec<_>>()
            .join(" / "),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// Everything one run measured.
struct Report {
    gaps: Vec<Series>,
    /// Start → STANDBY times per backend, from every group; one series each at the end.
    start_to_standby: Vec<(&'static str, Vec<f64>)>,
    throughput: Table,
    sessions: Table,
    elections: Table,
    footprint: Table,
}

impl Report {
    fn footprint(&mut self, what: &str, backend: &str, value: String, json: Value) {
        self.footprint.rows.push((
            vec![what.to_owned(), backend.to_owned(), value],
            json!({ "what": what, "backend": backend, "value": json }),
        ));
    }

    /// What one group of process trials measured: its gap series, its start → STANDBY
    /// times, and (for the first group of a backend) the idle RSS of its processes.
    fn group_trials(
        &mut self,
        series: Vec<Series>,
        footprint: processes::Footprint,
        backend: &'static str,
        process: &str,
        first: bool,
    ) {
        self.gaps.extend(series);
        if first {
            let max_rss = footprint.idle_rss.iter().copied().max().unwrap_or(0);
            self.footprint(
                &format!("idle {process} RSS (max of 3)"),
                backend,
                format!("{:.1} MiB", procfs::mib(max_rss)),
                json!(footprint.idle_rss),
            );
        }
        self.start_to_standby
            .push((backend, footprint.start_to_standby_ms));
    }

    fn throughput_rows(&mut self, rows: Vec<Value>) {
        for row in rows {
            let cells = vec![
                cell(&row["backend"], 0).replace('"', ""),
                cell(&row["elections"], 0),
                cell(&row["cycles"], 0),
                cell(&row["cycles_per_s"], 0),
                cell(&row["cycle_p50_ms"], 2),
                cell(&row["cycle_p99_ms"], 2),
            ];
            self.throughput.rows.push((cells, row));
        }
    }
}

async fn bench(options: &BenchOptions) -> Result<()> {
    let machine = machine();
    println!("ha bench on {machine}");
    let quick = options.quick;
    let (ttls, crashes, handoffs): (&[u64], usize, usize) = if quick {
        (&[2], 2, 3)
    } else {
        (&[2, 5, 10], 10, 60)
    };
    let crashes = options.crashes.unwrap_or(crashes);
    let handoffs = options.handoffs.unwrap_or(handoffs);
    let mut report = Report {
        gaps: Vec::new(),
        start_to_standby: Vec::new(),
        throughput: Table::new(
            "Throughput: campaign+resign cycles, one candidate per election",
            &[
                "backend",
                "elections at once",
                "cycles",
                "cycles/s",
                "cycle p50 ms",
                "cycle p99 ms",
            ],
        ),
        sessions: Table::new(
            "Live sessions, each renewed every TTL/3 (per server: Raft members 1 / 2 / 3, or etcd)",
            &[
                "backend",
                "sessions",
                "TTL s",
                "renewals/s",
                "failed renewals",
                "CPU % of a core, idle",
                "CPU % of a core",
                "RSS MiB",
            ],
        ),
        elections: Table::new(
            "Many elections, three candidates each: all elected, then every leader resigns (64 at a time)",
            &[
                "backend",
                "elections",
                "all elected s",
                "all handed off s",
                "handoff p50 ms",
                "handoff p99 ms",
            ],
        ),
        footprint: Table::new("Footprint", &["what", "backend", "value"]),
    };
    if let Some(unknown) = options
        .only
        .iter()
        .find(|s| !SCENARIOS.contains(&s.as_str()))
    {
        return Err(anyhow!(
            "unknown scenario {unknown:?}; known: {}",
            SCENARIOS.join(", ")
        ));
    }
    if options.wants("memory") {
        report.gaps.push(memory_handoff(handoffs * 5).await?);
    }

    #[cfg(feature = "etcd")]
    let etcd = start_etcd(&mut report).await?;

    let process_ttls = if options.wants("processes") {
        ttls
    } else {
        &[]
    };
    for (index, ttl) in process_ttls.iter().enumerate() {
        let ttl = Duration::from_secs(*ttl);
        // Handoffs do not depend on the TTL: measure them once, on the first group.
        let handoff_trials = if index == 0 { handoffs } else { 0 };
        let (series, footprint) =
            processes::trials(Group::new(ttl)?, "raft", ttl, crashes, handoff_trials).await?;
        report.group_trials(
            series,
            footprint,
            "raft",
            "`ha node --active-standby`",
            index == 0,
        );
        #[cfg(feature = "etcd")]
        if let Some(etcd) = &etcd {
            let url = format!("etcd://{}/bench-ttl{}", etcd.endpoint, ttl.as_secs());
            let (series, footprint) = processes::trials(
                Group::on_backend(ttl, &url)?,
                "etcd",
                ttl,
                crashes,
                handoff_trials,
            )
            .await?;
            report.group_trials(series, footprint, "etcd", "`ha run`", index == 0);
            report.gaps.push(
                reference::measure(
                    &etcd.endpoint,
                    reference::Reference::LockCrash { ttl },
                    crashes,
                )
                .await?,
            );
            if handoff_trials > 0 {
                report.gaps.push(
                    reference::measure(
                        &etcd.endpoint,
                        reference::Reference::ElectHandoff,
                        handoff_trials,
                    )
                    .await?,
                );
            }
        }
    }
    for (backend, times) in std::mem::take(&mut report.start_to_standby) {
        let all = report
            .gaps
            .iter_mut()
            .find(|s| s.scenario == "start → STANDBY" && s.backend == backend);
        match all {
            Some(series) => series.gaps_ms.extend(times),
            None => report.gaps.push(Series {
                scenario: "start → STANDBY",
                backend,
                variant: "process restart, data kept".to_owned(),
                ttl: None,
                gaps_ms: times,
            }),
        }
    }

    let cycles = options
        .cycles
        .unwrap_or(if quick { 2_000 } else { 1_000_000 });
    let load = ["throughput", "sessions", "elections", "endurance"];
    if load.iter().any(|s| options.wants(s)) {
        let mut group = Group::new(SESSION_TTL)?;
        group.launch = crate::nodes::Launch::RaftMembers;
        group.narrated = false;
        for id in crate::nodes::NODES {
            group.start(id)?;
        }
        let backend = load::connect(&group.raft_url()).await?;
        let pids = crate::nodes::NODES
            .iter()
            .map(|id| group.pid(*id).map(i32::unsigned_abs))
            .collect::<Result<Vec<_>>>()?;
        load_scenarios(
            &mut report,
            options,
            &backend,
            "raft",
            "raft (3 ha node)",
            &pids,
        )
        .await?;
        let members = crate::nodes::NODES
            .iter()
            .zip(&pids)
            .map(|(id, pid)| (*pid, group.data_dir(*id)))
            .collect::<Vec<_>>();
        let row = if options.wants("endurance") {
            load::endurance(&backend, "raft", cycles, &members).await?
        } else {
            Value::Null
        };
        if !row.is_null() {
            report.footprint(
                &format!("after {cycles} campaign+resign cycles: sled disk per member"),
                "raft",
                format!("{} MiB", cell(&row["disk_mib_per_member"], 1)),
                row["disk_mib_per_member"].clone(),
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
            );
        }
        drop(backend);
        group.stop_all().await;
    }
    #[cfg(feature = "etcd")]
    if let Some(etcd) = &etcd {
        let backend = load::connect(&format!("etcd://{}/bench-load", etcd.endpoint)).await?;
        let pids = [etcd.pid()];
        load_scenarios(
            &mut report,
            options,
            &backend,
            "etcd",
            "etcd (1 server)",
            &pids,
        )
        .await?;
    }
    report.footprint(
        "`ha` binary (this build)",
        "-",
        std::env::current_exe()
            .and_then(std::fs::metadata)
            .map_or_else(
                |_| "?".to_owned(),
                |m| format!("{:.1} MiB", procfs::mib(m.len())),
            ),
        json!(std::env::current_exe()
            .and_then(std::fs::metadata)
            .map(|m| m.len())
            .ok()),
    );

    println!();
    println!(
        "| scenario | backend | variant | TTL | n | p50 ms | p90 ms | p99 ms | max ms | p99/TTL |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for s in &report.gaps {
        println!("{}", s.row());
    }
    for table in [
        &report.throughput,
        &report.sessions,
        &report.elections,
        &report.footprint,
    ] {
        table.print();
    }
    let tables = |t: &Table| {
        t.rows
            .iter()
            .map(|(_, json)| json.clone())
            .collect::<Vec<_>>()
    };
    let json_report = json!({
        "machine": machine,
        "quick": quick,
        "results": report.gaps.iter().map(Series::json).collect::<Vec<_>>(),
        "throughput": tables(&report.throughput),
        "sessions": tables(&report.sessions),
        "elections": tables(&report.elections),
        "footprint": tables(&report.footprint),
    });
    if let Some(path) = &options.out {
        let text = serde_json::to_string_pretty(&json_report)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// Throughput, sessions and elections on one backend, as `options` asks; `pids` are
/// its server processes.
async fn load_scenarios(
    report: &mut Report,
    options: &BenchOptions,
    backend: &Arc<dyn ha::Backend>,
    name: &str,
    servers: &str,
    pids: &[u32],
) -> Result<()> {
    let (duration, sessions, elections, window) = if options.quick {
        (Duration::from_secs(2), 500, 50, Duration::from_secs(4))
    } else {
        (
            Duration::from_secs(10),
            10_000,
            1_000,
            Duration::from_secs(30),
        )
    };
    if options.wants("throughput") {
        report.throughput_rows(load::throughput(backend, servers, &[1, 16], duration).await?);
    }
    if options.wants("sessions") {
        let row = load::sessions(backend, name, pids, sessions, SESSION_TTL, window).await?;
        session_row(report, row);
    }
    if options.wants("elections") {
        election_row(report, load::elections(backend, name, elections).await?);
    }
    Ok(())
}

fn session_row(report: &mut Report, row: Value) {
    let percent = |v: &Value| {
        let scaled: Vec<Value> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| json!(x.as_f64().unwrap_or(0.0) * 100.0))
                    .collect()
            })
            .unwrap_or_default();
        cell(&Value::Array(scaled), 1)
    };
    let cells = vec![
        cell(&row["backend"], 0).replace('"', ""),
        cell(&row["sessions"], 0),
        cell(&row["ttl_s"], 0),
        cell(&row["renewals_per_s"], 0),
        cell(&row["renewal_failures"], 0),
        percent(&row["idle_cpu_per_server"]),
        percent(&row["cpu_per_server"]),
        cell(&row["rss_mib_per_server"], 1),
    ];
    report.sessions.rows.push((cells, row));
}

fn election_row(report: &mut Report, row: Value) {
    let cells = vec![
        cell(&row["backend"], 0).replace('"', ""),
        cell(&row["elections"], 0),
        cell(&row["all_elected_s"], 2),
        cell(&row["all_handed_off_s"], 2),
        cell(&row["handoff_p50_ms"], 1),
        cell(&row["handoff_p99_ms"], 1),
    ];
    report.elections.rows.push((cells, row));
}

/// The private etcd the etcd scenarios share, with its footprint noted; `None` (said
/// loudly) when it cannot run here, an error under `CI`.
#[cfg(feature = "etcd")]
async fn start_etcd(report: &mut Report) -> Result<Option<ha::etcd::testing::Etcd>> {
    use ha::etcd::testing::{Etcd, StartError};
    let started = tokio::task::spawn_blocking(|| Etcd::try_start(None)).await?;
    let etcd = match started {
        Ok(etcd) => etcd,
        Err(StartError::NotInstalled) if std::env::var_os("CI").is_none() => {
            println!(
                "SKIPPED: the etcd scenarios (etcd is not installed; scripts/test.sh installs it)"
            );
            return Ok(None);
        }
        Err(error) => return Err(error.into()),
    };
    if ha::etcd::testing::find_binary("etcdctl").is_none() {
        return Err(anyhow!(
            "etcdctl is not installed (Debian package etcd-client); the references need it"
        ));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = procfs::rss_bytes(etcd.pid())?;
    report.footprint(
        "idle etcd server RSS",
        "etcd",
        format!("{:.1} MiB", procfs::mib(rss)),
        json!(rss),
    );
    let size = std::fs::metadata(etcd.binary())
        .map(|m| m.len())
        .unwrap_or(0);
    report.footprint(
        &format!("etcd binary ({})", etcd.binary().display()),
        "etcd",
        format!("{:.1} MiB", procfs::mib(size)),
        json!(size),
    );
    Ok(Some(etcd))
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
