//! `examples/fenced_counter.rs` as users run it: three replica processes on a real
//! backend (three `ha node` processes for raft, a real etcd), while a seeded schedule
//! SIGKILLs, SIGSTOPs (up to twice the TTL) and SIGTERMs them and starts them again, and
//! SIGSTOPs a backend server (a Raft node, possibly the leader; etcd) up to twice the TTL.
//! Every accepted increment is a guarded write; the history checker's clause 3 must
//! find no value counted twice and no lower token above a higher one, the counter must
//! keep moving after the faults, and the stored value must hold every acknowledged
//! increment.
//!
//! Every process is started with kill_on_drop and stopped by PID at the end.

#![cfg(all(feature = "cli", feature = "raft"))]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ha_core::testing::history::{History, Record};
use ha_core::{ElectionName, FencingToken};
use ha_testkit::{free_port, Line, Processes, Signal};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::process::Command;
use tokio::time::{sleep, Instant};

const HA: &str = env!("CARGO_BIN_EXE_ha");
const TTL: Duration = Duration::from_secs(2);
const REPLICAS: u64 = 3;
const FAULTS: usize = 10;

/// The example binary. `cargo test` without a target filter builds the examples next to
/// the test executables (and `scripts/test.sh` builds them first); a filtered run
/// (`--test fenced_counter`) does not, so build them with the same features then.
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join("fenced_counter"))
        .unwrap_or_else(|| panic!("no target dir above {}", exe.display()));
    assert!(
        path.is_file(),
        "{} is missing: run cargo build --examples --all-features",
        path.display()
    );
    path
}

/// One increment, as a replica printed it: accepted, or refused by the guard.
#[derive(Debug, Clone, Copy)]
struct Increment {
    id: u64,
    token: u64,
    value: u64,
    at: u64,
    accepted: bool,
}

impl Increment {
    /// A replica's line; every line must be one.
    fn of(line: &Line) -> Self {
        let field = |name: &str| {
            line.number(name).unwrap_or_else(|| {
                panic!("replica {} printed {:?}: no {name}", line.from, line.text)
            })
        };
        Self {
            id: field("id"),
            token: field("token"),
            value: field("value"),
            at: field("at_unix_us"),
            accepted: line.is("increment"),
        }
    }
}

/// The replica processes and everything they printed.
struct Replicas {
    backend: String,
    procs: Processes,
}

impl Replicas {
    fn new(backend: String) -> Self {
        let mut procs = Processes::new();
        procs.echo_stderr(true);
        Self { backend, procs }
    }

    fn start(&mut self, id: u64) {
        let mut command = Command::new(example());
        command
            .args(["--backend", &self.backend, "--id", &id.to_string()])
            .args(["--ttl", &TTL.as_secs().to_string(), "--every-ms", "50"])
            .env("RUST_LOG", "error")
            .env("RUST_BACKTRACE", "0");
        self.procs
            .spawn(id, command)
            .unwrap_or_else(|e| panic!("spawn fenced_counter {id}: {e}"));
    }

    fn increments(&self) -> Vec<Increment> {
        self.procs.lines().iter().map(Increment::of).collect()
    }

    fn count(&self) -> usize {
        self.increments().iter().filter(|i| i.accepted).count()
    }

    /// Waits (bounded) until `more` increments were printed after `since`.
    async fn wait_for_progress(&self, since: usize, more: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.count() < since + more {
            assert!(
                Instant::now() < deadline,
                "the counter did not move within {within:?} ({} increments so far)",
                self.count()
            );
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs a seeded schedule of kills, pauses and graceful stops of replicas, and pauses
    /// of a backend server (`backend(n, signal)` sends `signal` to server `n`); every
    /// process is running again when it returns.
    async fn faults(&mut self, seed: u64, backend: &dyn Fn(usize, Signal)) {
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..FAULTS {
            sleep(Duration::from_millis(rng.random_range(300..1500))).await;
            let id = rng.random_range(1..=REPLICAS);
            if self.procs.pid(id).is_none() {
                continue;
            }
            match rng.random_range(0..4) {
                3 => {
                    let server = rng.random_range(0..3);
                    let pause =
                        Duration::from_millis(rng.random_range(200..(2 * TTL.as_millis() as u64)));
                    eprintln!("fault: SIGSTOP backend server {server} for {pause:?}");
                    backend(server, Signal::STOP);
                    sleep(pause).await;
                    backend(server, Signal::CONT);
                }
                0 => {
                    eprintln!("fault: SIGKILL replica {id}");
                    self.procs.kill(id).await;
                    sleep(Duration::from_millis(rng.random_range(0..1000))).await;
                    self.start(id);
                }
                1 => {
                    let pause =
                        Duration::from_millis(rng.random_range(200..(2 * TTL.as_millis() as u64)));
                    eprintln!("fault: SIGSTOP replica {id} for {pause:?}");
                    let _ = self.procs.signal(id, Signal::STOP);
                    sleep(pause).await;
                    let _ = self.procs.signal(id, Signal::CONT);
                }
                _ => {
                    eprintln!("fault: SIGTERM replica {id}");
                    self.procs.stop(id, Duration::from_secs(10)).await;
                    self.start(id);
                }
            }
        }
    }

    async fn stop_all(&mut self) {
        self.procs.stop_all(Duration::from_secs(10)).await;
    }

    /// Clause 3 of the history checker over every printed increment.
    fn check(&self, seed: u64) -> (u64, usize) {
        let increments = self.increments();
        let epoch = increments.iter().map(|i| i.at).min().unwrap_or(0);
        let history = History::new();
        for i in &increments {
            history.record(Record::Write {
                participant: i.id,
                token: FencingToken::new(i.token),
                at: i.at.saturating_sub(epoch),
                value: i.value,
                accepted: i.accepted,
            });
        }
        let refused = increments.iter().filter(|i| !i.accepted).count();
        let report = history.assert_ok(
            None,
            seed,
            "cargo test --all-features --test fenced_counter",
        );
        let tokens: std::collections::BTreeSet<u64> = increments
            .iter()
            .filter(|i| i.accepted)
            .map(|i| i.token)
            .collect();
        eprintln!(
            "{}: {} increments under {} leaderships, {refused} stale writes refused, 0 violations",
            self.backend,
            report.writes,
            tokens.len()
        );
        (
            increments
                .iter()
                .filter(|i| i.accepted)
                .map(|i| i.value)
                .max()
                .unwrap_or(0),
            tokens.len(),
        )
    }
}

/// Replicas on `backend_url` under the seeded faults; `backend` pauses and resumes a
/// backend server.
async fn run(backend_url: String, seed: u64, backend: &dyn Fn(usize, Signal)) {
    let mut replicas = Replicas::new(backend_url.clone());
    for id in 1..=REPLICAS {
        replicas.start(id);
    }
    replicas
        .wait_for_progress(0, 10, Duration::from_secs(30))
        .await;
    replicas.faults(seed, backend).await;
    // After the last fault, the counter moves again within a failover.
    let before = replicas.count();
    replicas
        .wait_for_progress(before, 10, TTL * 5 + Duration::from_secs(10))
        .await;
    replicas.stop_all().await;
    let (highest, leaderships) = replicas.check(seed);
    assert!(leaderships >= 2, "the faults never moved the leadership");
    // Nothing acknowledged is lost: the store holds at least the highest printed value.
    let backend = ha::connect(&backend_url)
        .await
        .unwrap_or_else(|e| panic!("connect {backend_url}: {e}"));
    let election = ElectionName::new("counter").unwrap_or_else(|e| panic!("{e}"));
    let key = ha_core::KvKey::new("counter").unwrap_or_else(|e| panic!("{e}"));
    let stored = backend
        .kv_read(&election, &key)
        .await
        .unwrap_or_else(|e| panic!("read the counter: {e}"))
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        stored >= highest,
        "the store holds {stored}, but {highest} was acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_counter_on_raft_never_goes_back_or_counts_twice() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let ports: BTreeMap<u64, u16> = (1..=3).map(|id| (id, free_port())).collect();
    let peers = ports
        .iter()
        .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Processes::new();
    nodes.echo_stderr(true);
    for (id, port) in &ports {
        let mut command = Command::new(HA);
        command
            .args(["node", "--id", &id.to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--peers", &peers])
            .arg("--data")
            .arg(dir.path().join(id.to_string()))
            .env("RUST_LOG", "error");
        nodes
            .spawn(*id, command)
            .unwrap_or_else(|e| panic!("spawn ha node: {e}"));
    }
    let url = format!(
        "raft://{}",
        ports
            .values()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let pause_node = |n: usize, signal: Signal| {
        let _ = nodes.signal(n as u64 + 1, signal);
    };
    run(url, 7, &pause_node).await;
    nodes.stop_all(Duration::from_secs(10)).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_counter_on_etcd_never_goes_back_or_counts_twice() {
    let Some(etcd) = ha_testkit::etcd::Etcd::start() else {
        return;
    };
    let pause_etcd = |_: usize, signal: Signal| {
        etcd.signal(if signal == Signal::STOP {
            "STOP"
        } else {
            "CONT"
        })
    };
    run(format!("etcd://{}", etcd.endpoint), 11, &pause_etcd).await;
    drop(etcd);
}
