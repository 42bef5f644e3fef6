//! Operating an embedded group from the command line, with real processes: `ha node
//! --join`, `ha member`, `ha status`. A wiped member is replaced and failover still
//! works through the new one; the group grows 3 -> 5 and shrinks 5 -> 3 under campaign
//! traffic with the history checker running; changes that would lose quorum or clash
//! with the group are refused and change nothing. Every process is stopped by PID.

#![cfg(all(feature = "cli", feature = "raft"))]

#[path = "support/participant.rs"]
mod participant;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ha_core::testing::history::{History, Record};
use ha_testkit::{free_ports, Processes};
use participant::{unix_us, Supervised};
use serde_json::Value;
use tokio::process::Command;
use tokio::time::sleep;

const HA: &str = env!("CARGO_BIN_EXE_ha");
const CLUSTER: &str = "membership-test";

/// Members of one test's group, by node id, stopped by PID when it ends.
struct Group {
    addresses: BTreeMap<u64, String>,
    dirs: BTreeMap<u64, tempfile::TempDir>,
    procs: Processes,
}

impl Group {
    /// Addresses for ids `1..=n`; the first `initial` bootstrap the group.
    fn new(n: u64) -> Self {
        let addresses = (1..=n)
            .zip(free_ports(n as usize))
            .map(|(id, port)| (id, format!("127.0.0.1:{port}")))
            .collect();
        let dirs = (1..=n)
            .map(|id| (id, tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))))
            .collect();
        Self {
            addresses,
            dirs,
            procs: Processes::new(),
        }
    }

    fn url(&self, ids: &[u64]) -> String {
        let list: Vec<&str> = ids.iter().map(|id| self.addresses[id].as_str()).collect();
        format!("raft://{}", list.join(","))
    }

    fn node_command(&self, id: u64, extra: &[&str]) -> Command {
        let mut command = Command::new(HA);
        command
            .args([
                "node",
                "--id",
                &id.to_string(),
                "--listen",
                &self.addresses[&id],
            ])
            .arg("--data")
            .arg(self.dirs[&id].path())
            .args(["--json", "--election-timeout-ms", "400,800"])
            .args(extra)
            .env("RUST_LOG", "warn,openraft=off,sled=off");
        command
    }

    /// Starts the bootstrap voters `ids` with `extra` flags.
    fn bootstrap(&mut self, ids: &[u64], extra: &[&str]) {
        let peers: Vec<String> = ids
            .iter()
            .map(|id| format!("{id}={}", self.addresses[id]))
            .collect();
        let peers = peers.join(",");
        for id in ids {
            let mut flags = vec!["--cluster", CLUSTER, "--peers", &peers];
            flags.extend(extra);
            let command = self.node_command(*id, &flags);
            self.procs
                .spawn(*id, command)
                .unwrap_or_else(|e| panic!("spawn node {id}: {e}"));
        }
    }

    /// Starts node `id` joining through `via`, and waits for its `joined` event.
    async fn join(&mut self, id: u64, via: &[u64], extra: &[&str]) -> String {
        let url = self.url(via);
        let mut flags = vec!["--cluster", CLUSTER, "--join", &url];
        flags.extend(extra);
        let command = self.node_command(id, &flags);
        self.procs
            .spawn(id, command)
            .unwrap_or_else(|e| panic!("spawn node {id}: {e}"));
        let line = self
            .procs
            .expect("joined", Duration::from_secs(60), |l| {
                l.from == id && (l.is("joined") || l.is("join_failed"))
            })
            .await;
        assert!(
            line.is("joined"),
            "node {id} could not join: {:?}\n{}",
            line.text,
            self.procs.stderr_tail(id)
        );
        line.json["reason"].as_str().unwrap_or_default().to_owned()
    }

    async fn leader_known(&mut self) {
        self.procs
            .expect("a Raft leader", Duration::from_secs(20), |l| {
                l.is("raft_leader")
            })
            .await;
    }
}

/// One `ha` command to completion, bounded: its exit code, stdout and stderr.
async fn ha(args: &[&str]) -> (i32, String, String) {
    let mut command = Command::new(HA);
    command.args(args).env("RUST_LOG", "off").kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("ha {args:?} ran for over 60 s"))
        .unwrap_or_else(|e| panic!("ha {args:?}: {e}"));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Voters and learners as `ha member list --json` reports them.
async fn members(url: &str) -> (Vec<u64>, Vec<u64>) {
    let (code, out, err) = ha(&["member", "list", "--backend", url, "--json"]).await;
    assert_eq!(code, 0, "ha member list: {err}");
    let list: Vec<Value> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let of = |kind: &str| {
        list.iter()
            .filter(|m| m["kind"] == kind)
            .filter_map(|m| m["id"].as_u64())
            .collect::<Vec<_>>()
    };
    (of("voter"), of("learner"))
}

/// Waits until `ha status` through `url` sees a quorum with exactly `voters`.
async fn until_voters(url: &str, voters: &[u64]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, _) = ha(&["status", "--backend", url, "--json"]).await;
        let status: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let seen: Vec<u64> = status["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["kind"] == "voter")
            .filter_map(|m| m["id"].as_u64())
            .collect();
        if code == 0 && seen == voters {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "no quorum of voters {voters:?} within 20 s; last status (exit {code}): {out}"
        );
        sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_member_is_replaced_and_failover_still_works() {
    let mut group = Group::new(4);
    let coordinator = [
        "--active-standby",
        "--role",
        "replaced",
        "--ttl",
        "3s",
        "--recampaign",
    ];
    group.bootstrap(&[1, 2, 3], &coordinator);
    let first = group
        .procs
        .expect("an ACTIVE", Duration::from_secs(30), |l| l.is("elected"))
        .await;
    let active = first.from;
    let victim = (1..=3).find(|id| *id != active).unwrap_or(1);
    let survivor = (1..=3)
        .find(|id| *id != active && *id != victim)
        .unwrap_or(1);

    // The victim's device dies for good: its data is gone.
    group.procs.kill(victim).await;
    let wiped = group.dirs[&victim].path().to_path_buf();
    std::fs::remove_dir_all(&wiped).unwrap_or_else(|e| panic!("{e}"));
    let url = group.url(&[active, survivor]);
    let (code, _, err) = ha(&["member", "remove", &victim.to_string(), "--backend", &url]).await;
    assert_eq!(code, 0, "remove the dead member: {err}");

    let kind = group.join(4, &[active, survivor], &coordinator).await;
    assert_eq!(kind, "voter");
    let mut expected = vec![active, survivor, 4];
    expected.sort_unstable();
    assert_eq!(members(&url).await, (expected.clone(), vec![]));
    let status = until_voters(&group.url(&[4]), &expected).await;
    let new_member = status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["id"] == 4)
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(new_member["status"]["cluster_id"], CLUSTER, "{new_member}");

    // Two voters of three are left once the ACTIVE dies: every commit from here on
    // needs the new member.
    let since = Instant::now();
    group.procs.kill(active).await;
    let next = group
        .procs
        .expect("a new ACTIVE", Duration::from_secs(30), |l| {
            l.is("elected") && l.seen >= since
        })
        .await;
    assert!(
        next.token() > first.token(),
        "token went from {} to {}",
        first.token(),
        next.token()
    );
    group.procs.stop_all(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_grows_to_five_and_shrinks_to_three_under_campaign_traffic() {
    let mut group = Group::new(5);
    group.bootstrap(&[1, 2, 3], &[]);
    group.leader_known().await;
    let everyone = group.url(&[1, 2, 3, 4, 5]);
    let history = Arc::new(History::new());
    let epoch = unix_us();
    let now = || unix_us().saturating_sub(epoch);
    let participants: Vec<Supervised> = (1..=3)
        .map(|p| {
            let backend = everyone.clone();
            let command: participant::MakeCommand = Arc::new(move || {
                let mut command = Command::new(HA);
                command
                    .args(["elect", "grow", &format!("p{p}"), "--json"])
                    .args(["--print-every-ms", "50", "--ttl", "3"])
                    .args(["--backend", &backend, "--id", &p.to_string()]);
                command
            });
            Supervised::start(p, command, epoch, Arc::clone(&history))
        })
        .collect();
    let step = |what: &str| {
        history.record(Record::Fault {
            at: now(),
            what: what.to_owned(),
        })
    };
    let churn = tokio_util::sync::CancellationToken::new();
    let changes = async {
        sleep(Duration::from_secs(3)).await;
        step("node 4 joins");
        assert_eq!(group.join(4, &[1, 2, 3], &[]).await, "voter");
        step("node 5 joins");
        assert_eq!(group.join(5, &[1, 2, 3], &[]).await, "voter");
        until_voters(&group.url(&[1]), &[1, 2, 3, 4, 5]).await;
        sleep(Duration::from_secs(2)).await;
        for id in [1u64, 2] {
            step(&format!("node {id} removed"));
            // Through the node being removed: it answers itself if it leads (and steps
            // down once the change is committed), or names the leader.
            let url = group.url(&[id]);
            let (code, out, err) =
                ha(&["member", "remove", &id.to_string(), "--backend", &url]).await;
            assert_eq!(code, 0, "remove node {id}: {out} {err}");
            group.procs.stop(id, Duration::from_secs(10)).await;
            sleep(Duration::from_secs(1)).await;
        }
        until_voters(&group.url(&[3, 4, 5]), &[3, 4, 5]).await;
        sleep(Duration::from_secs(3)).await;
        churn.cancel();
    };
    let ((), resigns) = tokio::join!(changes, resign_leaders(&participants, &churn));
    history.record(Record::Healed { at: now() });
    sleep(Duration::from_secs(8)).await;
    for p in participants {
        p.stop().await;
    }
    group.procs.stop_all(Duration::from_secs(10)).await;
    let report = history.assert_ok(
        Some(Duration::from_secs(8)),
        0,
        "cargo test --all-features --test membership the_group_grows",
    );
    eprintln!("grow and shrink: {report:?}, {resigns} resigns");
    assert!(resigns >= 5, "only {resigns} resigns: no campaign traffic");
}

/// Campaign traffic: every 700 ms the leading participant resigns (SIGTERM) and campaigns
/// again when restarted, until `stop`; returns how many resigned.
async fn resign_leaders(
    participants: &[Supervised],
    stop: &tokio_util::sync::CancellationToken,
) -> u32 {
    let mut resigns = 0;
    while resigns < 200 {
        tokio::select! {
            () = sleep(Duration::from_millis(700)) => {}
            () = stop.cancelled() => return resigns,
        }
        for p in participants.iter().filter(|p| p.is_leading()) {
            if let Some(pid) = p.pid() {
                participant::signal(pid, "TERM");
                resigns += 1;
            }
        }
    }
    resigns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_would_lose_quorum_or_clash_are_refused_and_change_nothing() {
    let mut group = Group::new(5);
    group.bootstrap(&[1, 2, 3], &[]);
    group.leader_known().await;
    let url = group.url(&[1, 2]);
    until_voters(&url, &[1, 2, 3]).await;
    group.procs.kill(3).await;
    sleep(Duration::from_secs(1)).await;

    // With node 3 down, removing 1 or 2 leaves two voters of which one is reachable.
    for id in ["1", "2"] {
        let (code, _, err) = ha(&["member", "remove", id, "--backend", &url]).await;
        assert_eq!(code, 7, "remove {id} was not refused: {err}");
        assert!(err.contains("would lose quorum"), "{err}");
    }
    let (code, _, err) = ha(&["member", "remove", "9", "--backend", &url]).await;
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("not a member"), "{err}");

    // A node of another cluster.
    let other = group.node_command(4, &["--cluster", "another", "--join", &url]);
    group
        .procs
        .spawn(4, other)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = group
        .procs
        .wait_exit(4, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(7), "{}", group.procs.stderr_tail(4));
    assert!(
        group.procs.stderr_tail(4).contains("cluster id mismatch"),
        "{}",
        group.procs.stderr_tail(4)
    );

    // A node advertising an address that is node 1's.
    let taken = &group.addresses[&1].clone();
    let imposter = group.node_command(
        5,
        &["--cluster", CLUSTER, "--advertise", taken, "--join", &url],
    );
    group
        .procs
        .spawn(5, imposter)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = group
        .procs
        .wait_exit(5, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(7), "{}", group.procs.stderr_tail(5));
    assert!(
        group.procs.stderr_tail(5).contains("is already node 1's"),
        "{}",
        group.procs.stderr_tail(5)
    );

    // `ha member add` names a node that is not the one at the address.
    let (code, _, err) = ha(&["member", "add", &format!("4={taken}"), "--backend", &url]).await;
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("is node 1, not node 4"), "{err}");

    // The data dir of another node.
    let mut stolen = Command::new(HA);
    stolen
        .args(["node", "--id", "4", "--listen", &group.addresses[&4]])
        .arg("--data")
        .arg(group.dirs[&3].path())
        .args(["--cluster", CLUSTER, "--join", &url])
        .env("RUST_LOG", "off");
    group
        .procs
        .spawn(6, stolen)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = group
        .procs
        .wait_exit(6, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(4));
    assert!(
        group.procs.stderr_tail(6).contains("belongs to"),
        "{}",
        group.procs.stderr_tail(6)
    );

    assert_eq!(members(&url).await, (vec![1, 2, 3], vec![]));
    let (code, _, err) = ha(&["status", "--backend", &url]).await;
    assert_eq!(code, 0, "2 of 3 voters are a quorum: {err}");
    group.procs.kill(2).await;
    sleep(Duration::from_secs(2)).await;
    let (code, out, _) = ha(&["status", "--backend", &url]).await;
    assert_eq!(code, 4, "1 of 3 voters is no quorum: {out}");
    group.procs.stop_all(Duration::from_secs(10)).await;
}
