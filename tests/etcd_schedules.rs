//! Seeded fault schedules on a real etcd with participants as real processes
//! (`ha elect --print-every-ms`, restarted by a supervisor loop when they exit), each
//! checked by the history checker. Each participant reaches etcd through a byte-level
//! proxy of its own. Faults: a participant SIGSTOPped for up to twice the TTL, kill -9,
//! SIGTERM, an etcd restart, etcd paused (SIGSTOP), a participant's replies held past its
//! request timeout and then its requests dropped, its link black-holed (then its
//! connections reset). Each schedule has its
//! own etcd; several run at once. `HA_FAULT_RUNS=N` / `HA_FAULT_SEEDS=a,b` pick the seeds
//! (CI runs 20, and 4 on a 3-member etcd cluster whose leader is killed, paused and
//! restarted). Wall-clock time: a seed gives the same fault schedule, not the same
//! interleaving.

#![cfg(all(feature = "cli", feature = "etcd"))]

#[path = "support/participant.rs"]
mod participant;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ha_core::testing::history::{History, Record};
use ha_testkit::{Direction, Fault};
use participant::{signal, unix_us, Supervised};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::process::Command;
use tokio::time::sleep;

const HA: &str = env!("CARGO_BIN_EXE_ha");
const TTL: Duration = Duration::from_secs(2);
/// After healing: a stale lease lasts one TTL (+ etcd's 500 ms expiry check), a stopped
/// etcd needs a moment to serve again, and the supervisor restarts exited processes.
const LIVENESS: Duration = Duration::from_secs(12);
const STEPS: usize = 4;
const CONCURRENT: usize = 4;
const PARTICIPANTS: u64 = 3;

/// The two tests run their schedules one after the other: at once, their processes
/// would starve each other on a 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One supervised `ha elect` participant per id, on the backend URL `backend(id)`.
fn participants(
    backend: impl Fn(u64) -> String,
    ttl: Duration,
    epoch: u64,
    history: &Arc<History>,
) -> BTreeMap<u64, Supervised> {
    (1..=PARTICIPANTS)
        .map(|id| {
            let backend = backend(id);
            let command: participant::MakeCommand = Arc::new(move || {
                let mut command = Command::new(HA);
                command
                    .args(["elect", "schedule", &format!("p{id}"), "--json"])
                    .args(["--print-every-ms", "50", "--backend", &backend])
                    .args(["--id", &id.to_string(), "--ttl", &ttl.as_secs().to_string()]);
                command
            });
            let supervised = Supervised::start(id, command, epoch, Arc::clone(history));
            (id, supervised)
        })
        .collect()
}

async fn schedule(seed: u64) -> Option<Arc<History>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut etcd = tokio::task::spawn_blocking(ha_testkit::etcd::Etcd::start)
        .await
        .unwrap_or_else(|e| panic!("{e}"))?;
    // Each participant reaches etcd through a byte-level proxy of its own.
    let upstream = etcd
        .endpoint()
        .parse()
        .unwrap_or_else(|e| panic!("etcd endpoint: {e}"));
    let mut links = BTreeMap::new();
    for id in 1..=PARTICIPANTS {
        let proxy = ha_testkit::Proxy::start(upstream)
            .await
            .unwrap_or_else(|e| panic!("proxy: {e}"));
        links.insert(id, proxy);
    }
    let history = Arc::new(History::new());
    let epoch = unix_us();
    let now = || unix_us().saturating_sub(epoch);
    let participants = participants(
        |id| format!("etcd://{}/schedule-{seed}", links[&id].addr()),
        TTL,
        epoch,
        &history,
    );
    let fault = |what: String| history.record(Record::Fault { at: now(), what });
    sleep(Duration::from_secs(2)).await;
    for _ in 0..STEPS {
        sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        let p = rng.random_range(1..=PARTICIPANTS);
        let long = Duration::from_millis(rng.random_range(300..(TTL.as_millis() as u64 * 2)));
        let pid = participants[&p].pid();
        match rng.random_range(0..7) {
            5 => {
                // A reply held past the request timeout, then a link that passes nothing
                // the participant sends: etcd stops hearing it while late replies arrive.
                let held = TTL / 3 + Duration::from_millis(300);
                let silent = TTL + Duration::from_millis(rng.random_range(500..2000));
                fault(format!(
                    "p{p}'s replies held {held:?}, then its requests dropped for {silent:?}"
                ));
                links[&p].set(Direction::ToClient, Fault::Hold);
                sleep(held).await;
                links[&p].set(Direction::ToServer, Fault::Drop);
                links[&p].set(Direction::ToClient, Fault::Pass);
                sleep(silent).await;
                links[&p].reset();
                links[&p].set_both(Fault::Pass);
            }
            6 => {
                fault(format!(
                    "p{p}'s link black-holed for {long:?}, then its connections reset"
                ));
                links[&p].set_both(Fault::Drop);
                sleep(long).await;
                links[&p].reset();
                links[&p].set_both(Fault::Pass);
            }
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
    let _alone = ONE_AT_A_TIME.lock().await;
    let run = participant::Run {
        name: "etcd",
        default_runs: 20,
        concurrent: CONCURRENT,
        liveness: LIVENESS,
        replay: "--test etcd_schedules etcd_fault",
        availability: false,
    };
    participant::run_schedules(run, schedule).await;
}

/// TTL on the 3-member cluster: an etcd leader election (about 1 s with etcd's default
/// timing) must fit inside it with room.
const CLUSTER_TTL: Duration = Duration::from_secs(3);
const CLUSTER_LIVENESS: Duration = Duration::from_secs(15);

/// The same participants on a 3-member etcd cluster, connected to every member: faults
/// kill, pause or restart etcd members, the etcd leader among them.
async fn cluster_schedule(seed: u64) -> Option<Arc<History>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = tokio::task::spawn_blocking(|| ha_testkit::etcd::EtcdCluster::start(3))
        .await
        .unwrap_or_else(|e| panic!("{e}"))?;
    let endpoints = cluster.endpoints().join(",");
    let history = Arc::new(History::new());
    let epoch = unix_us();
    let now = || unix_us().saturating_sub(epoch);
    let participants = participants(
        |_| format!("etcd://{endpoints}/cluster-{seed}"),
        CLUSTER_TTL,
        epoch,
        &history,
    );
    let fault = |what: String| history.record(Record::Fault { at: now(), what });
    sleep(Duration::from_secs(3)).await;
    for _ in 0..STEPS {
        sleep(Duration::from_millis(rng.random_range(500..2000))).await;
        let long =
            Duration::from_millis(rng.random_range(300..(CLUSTER_TTL.as_millis() as u64 * 2)));
        let random = rng.random_range(0..cluster.size());
        match rng.random_range(0..4) {
            0 | 1 => {
                let member = cluster.leader().await.unwrap_or(random);
                fault(format!(
                    "etcd leader (member {member}) killed, down for {long:?}"
                ));
                cluster.kill(member);
                sleep(long).await;
                cluster = tokio::task::spawn_blocking(move || {
                    cluster.restart(member);
                    cluster
                })
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            }
            2 => {
                let member = cluster.leader().await.unwrap_or(random);
                fault(format!(
                    "etcd leader (member {member}) SIGSTOPped for {long:?}"
                ));
                cluster.signal(member, "STOP");
                sleep(long).await;
                cluster.signal(member, "CONT");
            }
            _ => {
                let p = rng.random_range(1..=PARTICIPANTS);
                if let Some(pid) = participants[&p].pid() {
                    fault(format!("p{p} killed (-9)"));
                    signal(pid, "KILL");
                }
            }
        }
    }
    history.record(Record::Healed { at: now() });
    sleep(CLUSTER_LIVENESS + Duration::from_secs(1)).await;
    for (_, p) in participants {
        p.stop().await;
    }
    drop(cluster);
    Some(history)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_cluster_fault_schedules_never_show_two_leaders() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let run = participant::Run {
        name: "etcd cluster",
        default_runs: 4,
        concurrent: 2,
        liveness: CLUSTER_LIVENESS,
        replay: "--test etcd_schedules cluster",
        availability: false,
    };
    participant::run_schedules(run, cluster_schedule).await;
}
