//! One `ha elect --print-every-ms` participant process, restarted whenever it exits
//! until the run stops, whose JSON lines feed the history checker. Shared by the fault
//! schedules that run participants as real processes. `HA_SCHEDULE_LOGS=DIR` keeps each
//! run's debug log there (`p<id>-<epoch>-<run>.log`), to read what a replayed seed did.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ha_core::testing::history::{CampaignOutcome, History, Record};
use ha_core::FencingToken;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::sleep;

pub use ha_testkit::unix_us;

/// Sends a signal by PID (`STOP`, `CONT`, `KILL`, `TERM`).
pub fn signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// `elect schedule p<id> --json --print-every-ms 50 --backend <backend> --id <id>
/// --ttl <ttl>`: a participant's arguments after the program.
pub fn elect_args(id: u64, backend: &str, ttl: Duration) -> Vec<String> {
    let id = id.to_string();
    [
        "elect",
        "schedule",
        &format!("p{id}"),
        "--json",
        "--print-every-ms",
        "50",
        "--backend",
        backend,
        "--id",
        &id,
        "--ttl",
        &ttl.as_secs_f64().to_string(),
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect()
}

/// What the schedule does to the ACTIVE.
#[derive(Debug, Clone, Copy)]
pub enum Disruption {
    /// SIGTERM: it resigns.
    Resign,
    /// SIGKILL.
    Kill,
}

/// SIGTERMs or SIGKILLs the participant that leads, recorded at `at` as a disruption
/// whose successor must come `within`; nothing if nobody leads.
pub fn disrupt_leader(
    participants: &std::collections::BTreeMap<u64, Supervised>,
    history: &History,
    at: u64,
    within: Duration,
    disruption: Disruption,
) {
    let (what, sent) = match disruption {
        Disruption::Resign => ("resigned (SIGTERM)", "TERM"),
        Disruption::Kill => ("killed (SIGKILL)", "KILL"),
    };
    let leading = participants
        .iter()
        .find(|(_, p)| p.is_leading())
        .and_then(|(id, p)| Some((*id, p.pid()?)));
    if let Some((id, pid)) = leading {
        history.record(Record::Disrupt {
            participant: id,
            at,
            what: format!("the ACTIVE {what}"),
            within,
        });
        signal(pid, sent);
    }
}

/// Waits (at most `within`) until some participant says it leads: the schedule lets a
/// vacancy it caused end before the next fault (a backend leader change during it
/// would grant the dead ACTIVE's lease a fresh TTL, as every new leader must).
pub async fn until_someone_leads(
    participants: &std::collections::BTreeMap<u64, Supervised>,
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline
        && !participants.values().any(Supervised::is_leading)
    {
        sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `ha status` (the command `status` builds, with `--json`) shows the
/// backend whole again after a fault: every member answering and caught up with one
/// leader (Raft: lag ≤ 5 entries, contact within 1 s; etcd: one leader named by every
/// member, applied indexes within 5). A fault the backend survives assumes the one
/// before it is over. Panics after `within`: a backend that does not recover from a
/// minority fault is itself an availability failure.
pub async fn until_healthy(status: impl Fn() -> Command, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        let mut command = status();
        command
            .arg("--json")
            .env("RUST_LOG", "off")
            .kill_on_drop(true);
        if let Ok(Ok(output)) =
            tokio::time::timeout(Duration::from_secs(10), command.output()).await
        {
            last = String::from_utf8_lossy(&output.stdout).into_owned();
            let json: Value = serde_json::from_str(&last).unwrap_or(Value::Null);
            if output.status.success() && healthy(&json) {
                return;
            }
        }
        sleep(Duration::from_millis(200)).await;
    }
    panic!("the backend did not recover within {within:?} after a fault; last status: {last}");
}

fn healthy(status: &Value) -> bool {
    let Some(members) = status["members"].as_array() else {
        return false;
    };
    let answering = members.iter().all(|m| m["status"].is_object());
    // Raft members say what kind they are; etcd's say whether they are learners.
    let raft = members.iter().any(|m| m.get("kind").is_some());
    if raft {
        return answering
            && status["quorum"] == true
            && members.iter().all(|m| {
                m["lag"].as_u64().is_some_and(|lag| lag <= 5)
                    && m["last_contact_ms"].as_u64().is_none_or(|ms| ms <= 1000)
            });
    }
    let leaders: Vec<&Value> = members.iter().map(|m| &m["status"]["leader"]).collect();
    let applied: Vec<u64> = members
        .iter()
        .filter_map(|m| m["status"]["raft_applied_index"].as_u64())
        .collect();
    answering
        && leaders.windows(2).all(|pair| pair[0] == pair[1])
        && applied.len() == members.len()
        && applied
            .iter()
            .max()
            .zip(applied.iter().min())
            .is_some_and(|(max, min)| max - min <= 5)
}

/// Builds the participant's command line, fresh for each restart.
pub type MakeCommand = Arc<dyn Fn() -> Command + Send + Sync>;

/// One participant process, restarted whenever it exits until the run stops.
pub struct Supervised {
    pid: Arc<Mutex<Option<u32>>>,
    /// The token it leads with, while it says it leads.
    leading: Arc<Mutex<Option<u64>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Supervised {
    /// Starts participant `id`; `epoch` is the run's time zero (unix µs).
    pub fn start(id: u64, command: MakeCommand, epoch: u64, history: Arc<History>) -> Self {
        let pid = Arc::new(Mutex::new(None));
        let leading = Arc::new(Mutex::new(None));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(supervise(
            id,
            command,
            epoch,
            history,
            Arc::clone(&pid),
            Arc::clone(&leading),
            stop.clone(),
        ));
        Self {
            pid,
            leading,
            stop,
            task,
        }
    }

    /// The running process's PID.
    pub fn pid(&self) -> Option<u32> {
        *self.pid.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether it said it was elected and has not said it lost since.
    pub fn is_leading(&self) -> bool {
        self.leading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Stops the process (SIGTERM, then SIGKILL after 10 s) and the restarts.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn supervise(
    id: u64,
    command: MakeCommand,
    epoch: u64,
    history: Arc<History>,
    pid_slot: Arc<Mutex<Option<u32>>>,
    leading: Arc<Mutex<Option<u64>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let set_leading = |token: Option<u64>| {
        *leading.lock().unwrap_or_else(|e| e.into_inner()) = token;
    };
    let mut runs = 0u32;
    while !stop.is_cancelled() {
        runs += 1;
        let mut command = command();
        // HA_SCHEDULE_LOGS=DIR keeps each run's debug log, to read a replayed seed.
        match std::env::var_os("HA_SCHEDULE_LOGS") {
            Some(dir) => {
                let path = std::path::Path::new(&dir).join(format!("p{id}-{epoch}-{runs}.log"));
                let log = std::fs::File::create(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                command
                    .env("RUST_LOG", "debug,h2=info,hyper=info,tower=info")
                    .stderr(log)
            }
            None => command
                .env("RUST_LOG", "off")
                .stderr(std::process::Stdio::null()),
        };
        let spawned = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child: Child = match spawned {
            Ok(child) => child,
            Err(e) => panic!("spawn ha: {e}"),
        };
        *pid_slot.lock().unwrap_or_else(|e| e.into_inner()) = child.id();
        let Some(stdout) = child.stdout.take() else {
            return;
        };
        let mut lines = BufReader::new(stdout).lines();
        let mut lease = 0u64;
        let mut started = unix_us().saturating_sub(epoch);
        loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(line)) => {
                        let Ok(json) = serde_json::from_str::<Value>(&line) else { continue };
                        let at = json["at_unix_us"].as_u64().unwrap_or(0).saturating_sub(epoch);
                        let token = FencingToken::new(json["token"].as_u64().unwrap_or(0));
                        match json["event"].as_str().unwrap_or("") {
                            "registered" => {
                                lease = json["lease"].as_str().and_then(|l| u64::from_str_radix(l, 16).ok()).unwrap_or(0);
                                started = at;
                            }
                            "elected" => {
                                set_leading(Some(token.get()));
                                history.record(Record::Campaign {
                                    participant: id, lease, started, at, outcome: CampaignOutcome::Won(token),
                                });
                            }
                            "leading" => history.record(Record::Acted { participant: id, token, at }),
                            "lost" | "resigned" if json["token"].is_u64() => {
                                set_leading(None);
                                let reason = json["reason"].as_str().unwrap_or("resigned").to_owned();
                                history.record(Record::Lost { participant: id, token, at, reason });
                            }
                            _ => {}
                        }
                    }
                    _ => break, // exited (or killed): restart below
                },
                () = stop.cancelled() => {
                    if let Some(pid) = child.id() {
                        signal(pid, "CONT");
                        signal(pid, "TERM");
                    }
                    if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                        let _ = child.kill().await;
                    }
                    return;
                }
            }
        }
        set_leading(None);
        let _ = child.wait().await;
        *pid_slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        tokio::select! {
            () = sleep(Duration::from_millis(200)) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// What one run of schedules checks: its name in the summary, the seeds, how many run
/// at once, the liveness bound, and the command that replays one seed.
pub struct Run<'a> {
    /// Printed before the totals.
    pub name: &'a str,
    /// Seeds when `HA_FAULT_*` says nothing.
    pub default_runs: u64,
    /// Schedules at once.
    pub concurrent: usize,
    /// Someone must act again within this after healing.
    pub liveness: Duration,
    /// `cargo test` arguments that select the test, for the replay line.
    pub replay: &'a str,
    /// Every fault of the schedule is one the backend survives and every disruption of
    /// a participant is recorded: run the availability oracle too.
    pub availability: bool,
}

/// Runs `schedule` for every seed, checks each history (panicking with the seed and a
/// replay command), and prints the totals. A schedule that returns `None` (a fixture
/// missing outside CI, which said so) ends the run without checks.
pub async fn run_schedules<F, Fut>(run: Run<'_>, schedule: F)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Option<Arc<History>>>,
{
    use futures::StreamExt;
    let seeds = ha_core::testing::history::fault_seeds(run.default_runs);
    let started = std::time::Instant::now();
    let schedule = &schedule;
    let results: Vec<(u64, Option<Arc<History>>)> = futures::stream::iter(seeds.clone())
        .map(|seed| async move { (seed, schedule(seed).await) })
        .buffer_unordered(run.concurrent)
        .collect()
        .await;
    let mut totals = ha_core::testing::history::Totals::default();
    for (seed, history) in &results {
        let Some(history) = history else {
            return;
        };
        let replay = format!(
            "HA_FAULT_SEEDS={seed} cargo test --all-features {}",
            run.replay
        );
        let report = if run.availability {
            history.assert_available(Some(run.liveness), *seed, &replay)
        } else {
            history.assert_ok(Some(run.liveness), *seed, &replay)
        };
        totals.add(&report);
    }
    eprintln!("{}: {totals}, in {:?}", run.name, started.elapsed());
    assert!(
        totals.leaderships >= seeds.len(),
        "the schedules elected almost nobody"
    );
}
