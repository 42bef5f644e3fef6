//! Seeded fault schedules on a real etcd with participants as real processes
//! (`ha elect --print-every-ms`, restarted by a supervisor loop when they exit), each
//! checked by the history checker. Faults: a participant SIGSTOPped for up to twice the
//! TTL, kill -9, SIGTERM, an etcd restart, etcd paused (SIGSTOP). Each schedule has its
//! own etcd; several run at once. `HA_FAULT_RUNS=N` / `HA_FAULT_SEEDS=a,b` pick the seeds
//! (CI runs 20). Wall-clock time: a seed gives the same fault schedule, not the same
//! interleaving.

#![cfg(all(feature = "cli", feature = "etcd"))]

#[path = "../ha-etcd/tests/common/mod.rs"]
mod etcd_fixture;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use ha_core::testing::history::{fault_seeds, CampaignOutcome, History, Record, Totals};
use ha_core::FencingToken;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::sleep;

const HA: &str = env!("CARGO_BIN_EXE_ha");
const TTL: Duration = Duration::from_secs(2);
/// After healing: a stale lease lasts one TTL (+ etcd's 500 ms expiry check), a stopped
/// etcd needs a moment to serve again, and the supervisor restarts exited processes.
const LIVENESS: Duration = Duration::from_secs(12);
const STEPS: usize = 4;
const CONCURRENT: usize = 4;
const PARTICIPANTS: u64 = 3;

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// One participant process, restarted whenever it exits until the run stops.
struct Supervised {
    pid: Arc<Mutex<Option<u32>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Supervised {
    fn start(id: u64, backend: String, epoch: u64, history: Arc<History>) -> Self {
        let pid = Arc::new(Mutex::new(None));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(supervise(
            id,
            backend,
            epoch,
            history,
            Arc::clone(&pid),
            stop.clone(),
        ));
        Self { pid, stop, task }
    }

    fn pid(&self) -> Option<u32> {
        *self.pid.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn supervise(
    id: u64,
    backend: String,
    epoch: u64,
    history: Arc<History>,
    pid_slot: Arc<Mutex<Option<u32>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    while !stop.is_cancelled() {
        let spawned = Command::new(HA)
            .args([
                "elect",
                "schedule",
                &format!("p{id}"),
                "--json",
                "--print-every-ms",
                "50",
            ])
            .args([
                "--backend",
                &backend,
                "--id",
                &id.to_string(),
                "--ttl",
                &TTL.as_secs().to_string(),
            ])
            .env("RUST_LOG", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
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
                            "elected" => history.record(Record::Campaign {
                                participant: id, lease, started, at, outcome: CampaignOutcome::Won(token),
                            }),
                            "leading" => history.record(Record::Acted { participant: id, token, at }),
                            "lost" | "resigned" if json["token"].is_u64() => {
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
        let _ = child.wait().await;
        *pid_slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        tokio::select! {
            () = sleep(Duration::from_millis(200)) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn schedule(seed: u64) -> Option<Arc<History>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut etcd = tokio::task::spawn_blocking(etcd_fixture::Etcd::start)
        .await
        .unwrap_or_else(|e| panic!("{e}"))?;
    let backend = format!("etcd://{}/schedule-{seed}", etcd.endpoint);
    let history = Arc::new(History::new());
    let epoch = unix_us();
    let now = || unix_us().saturating_sub(epoch);
    let participants: BTreeMap<u64, Supervised> = (1..=PARTICIPANTS)
        .map(|id| {
            (
                id,
                Supervised::start(id, backend.clone(), epoch, Arc::clone(&history)),
            )
        })
        .collect();
    let fault = |what: String| history.record(Record::Fault { at: now(), what });
    sleep(Duration::from_secs(2)).await;
    for _ in 0..STEPS {
        sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        let p = rng.random_range(1..=PARTICIPANTS);
        let long = Duration::from_millis(rng.random_range(300..(TTL.as_millis() as u64 * 2)));
        let pid = participants[&p].pid();
        match rng.random_range(0..5) {
            0 => {
                if let Some(pid) = pid {
                    fault(format!("p{p} SIGSTOPped for {long:?}"));
                    signal(pid, "STOP");
                    sleep(long).await;
                    signal(pid, "CONT");
                }
            }
            1 => {
                if let Some(pid) = pid {
                    fault(format!("p{p} killed (-9)"));
                    signal(pid, "KILL");
                }
            }
            2 => {
                if let Some(pid) = pid {
                    fault(format!("p{p} SIGTERMed (resigns, exits, restarts)"));
                    signal(pid, "TERM");
                }
            }
            3 => {
                fault(format!("etcd restarted, down for {long:?}"));
                etcd = tokio::task::spawn_blocking(move || {
                    etcd.restart(long);
                    etcd
                })
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            }
            _ => {
                fault(format!("etcd SIGSTOPped for {long:?}"));
                etcd.signal("STOP");
                sleep(long).await;
                etcd.signal("CONT");
            }
        }
    }
    history.record(Record::Healed { at: now() });
    sleep(LIVENESS + Duration::from_secs(1)).await;
    for (_, p) in participants {
        p.stop().await;
    }
    drop(etcd);
    Some(history)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_fault_schedules_never_show_two_leaders() {
    let seeds = fault_seeds(20);
    let started = std::time::Instant::now();
    let results: Vec<(u64, Option<Arc<History>>)> = futures::stream::iter(seeds.clone())
        .map(|seed| async move { (seed, schedule(seed).await) })
        .buffer_unordered(CONCURRENT)
        .collect()
        .await;
    let mut totals = Totals::default();
    for (seed, history) in &results {
        let Some(history) = history else {
            return; // no etcd outside CI: the fixture said so loudly
        };
        let replay =
            format!("HA_FAULT_SEEDS={seed} cargo test --all-features --test etcd_schedules");
        totals.add(&history.assert_ok(Some(LIVENESS), *seed, &replay));
    }
    eprintln!("etcd: {totals}, in {:?}", started.elapsed());
    assert!(
        totals.leaderships >= seeds.len(),
        "the schedules elected almost nobody"
    );
}
