//! Seeded fault schedules on a real network: three hosts, each a network namespace on a
//! private bridge (`ha_testkit::Lab`), each running an `ha node` member of one Raft group
//! and an `ha elect --print-every-ms` participant (restarted when it exits) that talks to
//! its own host's member. Faults lose packets silently (no RST): a random host, the Raft
//! leader's host or the ACTIVE's host cut off the bridge, a host whose link flaps, the
//! one link between the Raft leader and another host cut (each still reaches the
//! third), and one direction of such a link. The history checker checks every schedule
//! (one leader acting at a time, tokens in order, someone acting again after healing).
//!
//! A second family puts the participants on a fourth host that reaches every member
//! (`raft://` with all three), so each fault is one the group survives: a member cut
//! off (the Raft leader among them), the link between the Raft leader and a follower,
//! one direction of such a link. The availability oracle checks those too: the ACTIVE
//! keeps its role through them, and when the schedule resigns or kills it, the next is
//! elected within its bound.
//!
//! `HA_FAULT_RUNS=N` / `HA_FAULT_SEEDS=a,b` pick the seeds (CI runs 4 of the first
//! family, 3 of the second). Needs root for namespaces; under `CI` their absence fails.

#![cfg(all(feature = "cli", feature = "raft"))]

#[path = "support/participant.rs"]
mod participant;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ha_core::testing::history::{History, Record};
use ha_testkit::{Lab, Processes};
use participant::Disruption::{Kill, Resign};
use participant::{disrupt_leader, unix_us, Supervised};
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
    /// A member on each of hosts `1..=HOSTS`.
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

/// The two families run one after the other: at once, their processes would starve
/// each other on a 2-core machine (and a starved ACTIVE misses its keepalives).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_on_a_real_network_never_show_two_leaders() {
    let _alone = ONE_AT_A_TIME.lock().await;
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

/// The host the participants of the availability family run on.
const CLIENTS: usize = HOSTS + 1;
/// The availability family's TTL: the ACTIVE rides out a Raft leader change, which
/// takes up to 2 s with the default timing (docs/guarantees.md, promise 5).
const AVAILABLE_TTL: Duration = Duration::from_secs(4);

/// A fault the group survives, on the members' hosts only, with participants on a host
/// of their own; sometimes the ACTIVE is resigned or killed meanwhile.
async fn available_schedule(seed: u64) -> Option<Arc<History>> {
    let lab = ha_testkit::lab_for_test(CLIENTS)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let history = Arc::new(History::new());
    let epoch = unix_us();
    let now = || unix_us().saturating_sub(epoch);
    let nodes = Nodes::start(&lab, &format!("netns-available-{seed}"));
    let lab = Arc::new(lab);
    let url = format!(
        "raft://{}",
        (1..=HOSTS)
            .map(|h| format!("{}:{PORT}", lab.addr(h)))
            .collect::<Vec<_>>()
            .join(",")
    );
    let participants: BTreeMap<u64, Supervised> = (1..=3u64)
        .map(|id| {
            let (lab, url) = (Arc::clone(&lab), url.clone());
            let command: participant::MakeCommand = Arc::new(move || {
                let mut command = lab.tokio_command(CLIENTS, HA);
                command.args(participant::elect_args(id, &url, AVAILABLE_TTL));
                command
            });
            let supervised = Supervised::start(id, command, epoch, Arc::clone(&history));
            (id, supervised)
        })
        .collect();
    let fault = |what: String| history.record(Record::Fault { at: now(), what });
    // A resigned ACTIVE is replaced within TTL/3 (a dead member noticed) plus a Raft
    // election with room; a killed one within its TTL on top.
    let handover = AVAILABLE_TTL / 3 + Duration::from_secs(2);
    let failover = AVAILABLE_TTL + handover;
    sleep(Duration::from_secs(4)).await;
    for _ in 0..STEPS {
        // One fault at a time: a member that was cut off rejoins (its higher term costs
        // the group an election, openraft 0.9 has no pre-vote) and catches up first.
        let status = || {
            let mut command = lab.tokio_command(CLIENTS, HA);
            command.args(["status", "--backend", &url]);
            command
        };
        participant::until_healthy(status, Duration::from_secs(30)).await;
        sleep(Duration::from_millis(rng.random_range(500..1500))).await;
        let long =
            Duration::from_millis(rng.random_range(1000..(AVAILABLE_TTL.as_millis() as u64 * 2)));
        let leader = nodes.raft_leader().unwrap_or(1);
        let other = (leader + rng.random_range(0..HOSTS - 1)) % HOSTS + 1;
        let heal: Box<dyn Fn(&Lab)> = match rng.random_range(0..4) {
            0 => {
                fault(format!("host {other} (a follower) cut off for {long:?}"));
                lab.cut(other).unwrap_or_else(|e| panic!("{e}"));
                Box::new(move |lab| lab.heal(other).unwrap_or_else(|e| panic!("{e}")))
            }
            1 => {
                fault(format!(
                    "host {leader} (the Raft leader) cut off for {long:?}"
                ));
                lab.cut(leader).unwrap_or_else(|e| panic!("{e}"));
                Box::new(move |lab| lab.heal(leader).unwrap_or_else(|e| panic!("{e}")))
            }
            2 => {
                fault(format!("the link between host {leader} (the Raft leader) and host {other} cut for {long:?}"));
                lab.cut_link(leader, other)
                    .unwrap_or_else(|e| panic!("{e}"));
                Box::new(move |lab| {
                    lab.heal_link(leader, other)
                        .unwrap_or_else(|e| panic!("{e}"))
                })
            }
            _ => {
                let (from, to) = if rng.random_bool(0.5) {
                    (other, leader)
                } else {
                    (leader, other)
                };
                fault(format!(
                    "host {from}'s packets to host {to} lost for {long:?} (the Raft leader is {leader})"
                ));
                lab.cut_one_way(from, to).unwrap_or_else(|e| panic!("{e}"));
                Box::new(move |lab| lab.heal_link(from, to).unwrap_or_else(|e| panic!("{e}")))
            }
        };
        let disruption = rng.random_range(0..4u8);
        let disrupt_after = Duration::from_millis(rng.random_range(200..long.as_millis() as u64));
        sleep(disrupt_after).await;
        match disruption {
            0 | 1 => disrupt_leader(&participants, &history, now(), handover, Resign),
            2 => disrupt_leader(&participants, &history, now(), failover, Kill),
            _ => {}
        }
        sleep(long.saturating_sub(disrupt_after)).await;
        heal(&lab);
        if disruption <= 2 {
            participant::until_someone_leads(&participants, failover).await;
        }
    }
    lab.heal_all().unwrap_or_else(|e| panic!("{e}"));
    history.record(Record::Healed { at: now() });
    sleep(LIVENESS + Duration::from_secs(1)).await;
    history.record(Record::End { at: now() });
    for (_, p) in participants {
        p.stop().await;
    }
    nodes.stop().await;
    drop(lab);
    Some(history)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_the_group_survives_cost_no_role_on_a_real_network() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let run = participant::Run {
        name: "raft availability on a real network",
        default_runs: 3,
        concurrent: 1,
        liveness: LIVENESS,
        replay: "--test netns_schedules faults_the_group_survives",
        availability: true,
    };
    participant::run_schedules(run, available_schedule).await;
}
