//! Seeded fault schedules on a real network: three hosts, each a network namespace on a
//! private bridge (`ha_testkit::Lab`), each running an `ha node` member of one Raft group
//! and an `ha elect --print-every-ms` participant (restarted when it exits) that talks to
//! its own host's member. Faults lose packets silently (no RST): a random host, the Raft
//! leader's host or the ACTIVE's host cut off the bridge, a host whose link flaps, the
//! one link between the Raft leader and another host cut (each still reaches the
//! third), and one direction of such a link. The history checker checks every schedule
//! (one leader acting at a time, tokens in order, someone acting again after healing).
//! `HA_FAULT_RUNS=N` / `HA_FAULT_SEEDS=a,b` pick the seeds (CI runs 4). Needs root for
//! namespaces; under `CI` their absence fails.

#![cfg(all(feature = "cli", feature = "raft"))]

#[path = "support/participant.rs"]
mod participant;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ha_core::testing::history::{History, Record};
use ha_testkit::{Lab, Processes};
use participant::{unix_us, Supervised};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::sleep;

const HA: &str = env!("CARGO_BIN_EXE_ha");
const TTL: Duration = Duration::from_secs(3);
/// After healing: a Raft election (about 1 s), a stale lease (one TTL), a participant
/// restart, with room for a slow CI machine.
const LIVENESS: Duration = Duration::from_secs(15);
const STEPS: usize = 5;
const CONCURRENT: usize = 2;
const HOSTS: usize = 3;
const PORT: u16 = 7000;

/// One `ha node` per host, stopped by PID when the schedule ends.
struct Nodes {
    procs: Processes,
    _dirs: Vec<tempfile::TempDir>,
}

impl Nodes {
    fn start(lab: &Lab, cluster: &str) -> Self {
        let peers: Vec<String> = (1..=HOSTS)
            .map(|h| format!("{h}={}:{PORT}", lab.addr(h)))
            .collect();
        let mut procs = Processes::new();
        let mut dirs = Vec::new();
        for host in 1..=HOSTS {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let mut command = lab.tokio_command(host, HA);
            command
                .args(["node", "--id", &host.to_string()])
                .args(["--listen", &format!("{}:{PORT}", lab.addr(host))])
                .args(["--peers", &peers.join(",")])
                .arg("--data")
                .arg(dir.path().join("data"))
                .args(["--cluster", cluster, "--insecure", "--json"])
                .env("RUST_LOG", "off");
            procs
                .spawn(host as u64, command)
                .unwrap_or_else(|e| panic!("spawn ha node: {e}"));
            dirs.push(dir);
        }
        Self { procs, _dirs: dirs }
    }

    /// The Raft leader as the members last reported it (any member's newest report).
    fn raft_leader(&self) -> Option<usize> {
        let lines = self.procs.lines();
        let report = lines.iter().rev().find(|l| l.is("raft_leader"))?;
        report.number("node").map(|n| n as usize)
    }

    async fn stop(mut self) {
        self.procs.stop_all(Duration::from_secs(10)).await;
    }
}

async fn schedule(seed: u64) -> Option<Arc<History>> {
    let lab = ha_testkit::lab_for_test(HOSTS)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let history = Arc::new(History::new());
    let epoch = unix_us();
    let now = || unix_us().saturating_sub(epoch);
    let nodes = Nodes::start(&lab, &format!("netns-{seed}"));
    let lab = Arc::new(lab);
    let participants: BTreeMap<usize, Supervised> = (1..=HOSTS)
        .map(|host| {
            let lab = Arc::clone(&lab);
            let command: participant::MakeCommand = Arc::new(move || {
                let mut command = lab.tokio_command(host, HA);
                command
                    .args(["elect", "schedule", &format!("p{host}"), "--json"])
                    .args(["--print-every-ms", "50"])
                    .args(["--backend", &format!("raft://{}:{PORT}", lab.addr(host))])
                    .args([
                        "--id",
                        &host.to_string(),
                        "--ttl",
                        &TTL.as_secs().to_string(),
                    ]);
                command
            });
            let supervised = Supervised::start(host as u64, command, epoch, Arc::clone(&history));
            (host, supervised)
        })
        .collect();
    let fault = |what: String| history.record(Record::Fault { at: now(), what });
    sleep(Duration::from_secs(4)).await;
    for _ in 0..STEPS {
        sleep(Duration::from_millis(rng.random_range(500..2000))).await;
        let long = Duration::from_millis(rng.random_range(500..(TTL.as_millis() as u64 * 2)));
        let random = rng.random_range(1..=HOSTS);
        let kind = rng.random_range(0..6);
        if kind >= 4 {
            // One link of a pair: the Raft leader and another host lose each other and
            // still reach the third; or one host's packets to another are lost.
            let Some(leader) = nodes.raft_leader() else {
                continue;
            };
            let other = (leader + rng.random_range(0..HOSTS - 1)) % HOSTS + 1;
            if kind == 4 {
                fault(format!("the link between host {leader} (the Raft leader) and host {other} cut for {long:?}"));
                lab.cut_link(leader, other)
                    .unwrap_or_else(|e| panic!("{e}"));
            } else {
                fault(format!(
                    "host {other}'s packets to host {leader} (the Raft leader) lost for {long:?}"
                ));
                lab.cut_one_way(other, leader)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            sleep(long).await;
            lab.heal_link(leader, other)
                .unwrap_or_else(|e| panic!("{e}"));
            continue;
        }
        let (host, what) = match kind {
            0 => (Some(random), "a host".to_owned()),
            1 => (nodes.raft_leader(), "the Raft leader's host".to_owned()),
            2 => (
                participants
                    .iter()
                    .find(|(_, p)| p.is_leading())
                    .map(|(host, _)| *host),
                "the ACTIVE's host".to_owned(),
            ),
            _ => (Some(random), "a flapping link".to_owned()),
        };
        let Some(host) = host else { continue };
        if kind == 3 {
            fault(format!(
                "host {host}'s link flaps 4 times (250 ms down, 250 ms up)"
            ));
            for _ in 0..4 {
                lab.cut(host).unwrap_or_else(|e| panic!("{e}"));
                sleep(Duration::from_millis(250)).await;
                lab.heal(host).unwrap_or_else(|e| panic!("{e}"));
                sleep(Duration::from_millis(250)).await;
            }
        } else {
            fault(format!("host {host} ({what}) cut off for {long:?}"));
            lab.cut(host).unwrap_or_else(|e| panic!("{e}"));
            sleep(long).await;
            lab.heal(host).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    lab.heal_all().unwrap_or_else(|e| panic!("{e}"));
    history.record(Record::Healed { at: now() });
    sleep(LIVENESS + Duration::from_secs(1)).await;
    for (_, p) in participants {
        p.stop().await;
    }
    nodes.stop().await;
    drop(lab);
    Some(history)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_on_a_real_network_never_show_two_leaders() {
    let run = participant::Run {
        name: "raft on a real network",
        default_runs: 4,
        concurrent: CONCURRENT,
        liveness: LIVENESS,
        replay: "--test netns_schedules partitions",
        availability: false,
    };
    participant::run_schedules(run, schedule).await;
}
