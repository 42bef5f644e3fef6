//! Placement between real processes: three `ha node --active-standby` members on
//! loopback (placement is on by default). The Raft leader moves off the ACTIVE's
//! process; a SIGKILL of that process then leaves the Raft leader alive (no survivor
//! reports another), and a rolling restart (SIGTERM, start again, one member after
//! another) loses no role and hands the role over at most once per restarted ACTIVE.
//! Margins are generous; the timings are ha-bench's. Every process is stopped by PID.

#![cfg(all(feature = "cli", feature = "raft"))]

use std::collections::BTreeMap;
use std::time::Duration;

use ha_testkit::{Line, Processes, Signal};
use tokio::process::Command;
use tokio::time::Instant;

const NODES: [u64; 3] = [1, 2, 3];

/// Three members, and what their lines said.
struct Members {
    peers: BTreeMap<u64, String>,
    dirs: BTreeMap<u64, tempfile::TempDir>,
    procs: Processes,
    /// The Raft leader each running member last reported.
    leader_seen: BTreeMap<u64, u64>,
    /// The member whose `proclaimed` came last, until it loses, resigns or stops.
    active: Option<u64>,
    elected: usize,
    lost: Vec<String>,
}

impl Members {
    fn start() -> Self {
        let peers = NODES
            .into_iter()
            .zip(ha_testkit::free_ports(3))
            .map(|(id, port)| (id, format!("127.0.0.1:{port}")))
            .collect();
        let dirs = NODES
            .into_iter()
            .map(|id| (id, tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))))
            .collect();
        let mut members = Self {
            peers,
            dirs,
            procs: Processes::new(),
            leader_seen: BTreeMap::new(),
            active: None,
            elected: 0,
            lost: Vec::new(),
        };
        for id in NODES {
            members.spawn(id);
        }
        members
    }

    fn spawn(&mut self, id: u64) {
        let peers: Vec<String> = self
            .peers
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect();
        let mut command = Command::new(env!("CARGO_BIN_EXE_ha"));
        command
            .args(["node", "--id", &id.to_string()])
            .args(["--listen", &self.peers[&id], "--peers", &peers.join(",")])
            .arg("--data")
            .arg(self.dirs[&id].path())
            .args(["--cluster", "placement-test", "--active-standby"])
            .args(["--role", "coord", "--ttl", "2s", "--recampaign", "--json"])
            .args(["--address", &format!("127.0.0.1:{}", 54100 + id)])
            .env("RUST_LOG", "off");
        self.leader_seen.remove(&id);
        self.procs
            .spawn(id, command)
            .unwrap_or_else(|e| panic!("spawn node {id}: {e}"));
    }

    fn read(&mut self, line: &Line) {
        let node = line.from;
        match line.event() {
            "raft_leader" => {
                if let Some(leader) = line.number("node") {
                    self.leader_seen.insert(node, leader);
                }
            }
            "proclaimed" => self.active = Some(node),
            "elected" => self.elected += 1,
            "lost" | "resigned" | "stopped" if self.active == Some(node) => self.active = None,
            _ => {}
        }
        if line.is("lost") {
            self.lost.push(format!("node {node}: {}", line.text));
        }
    }

    /// Reads lines until `done` holds, for at most `within`; panics with `what` then.
    async fn until(&mut self, what: &str, within: Duration, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {what} within {within:?}");
            if let Some(line) = self.procs.next(left.min(Duration::from_millis(100))).await {
                self.read(&line);
            }
        }
    }

    /// Reads every line for `long`.
    async fn watch(&mut self, long: Duration) {
        let deadline = Instant::now() + long;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Some(line) = self.procs.next(left).await {
                self.read(&line);
            }
        }
    }

    /// The Raft leader every running member reports, if they agree.
    fn agreed_leader(&self) -> Option<u64> {
        let running = self.procs.ids();
        let first = *self.leader_seen.get(running.first()?)?;
        running
            .iter()
            .all(|id| self.leader_seen.get(id) == Some(&first))
            .then_some(first)
            .filter(|leader| running.contains(leader))
    }

    /// Waits for an ACTIVE and an agreed Raft leader on another member.
    async fn placed(&mut self) -> (u64, u64) {
        self.until(
            "ACTIVE apart from the Raft leader",
            Duration::from_secs(30),
            |m| matches!((m.active, m.agreed_leader()), (Some(a), Some(l)) if a != l),
        )
        .await;
        let active = self.active.unwrap_or_else(|| panic!("no ACTIVE"));
        let leader = self.agreed_leader().unwrap_or_else(|| panic!("no leader"));
        (active, leader)
    }
}

/// `ha status` of the group: its text and its JSON.
async fn status(members: &Members) -> (String, serde_json::Value) {
    let url = format!(
        "raft://{}",
        members
            .peers
            .values()
            .cloned()
            .collect::<Vec<_>>()
            .join(",")
    );
    let run = |json: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ha"));
        command.args(["status", "--backend", &url]);
        if json {
            command.arg("--json");
        }
        command.env("RUST_LOG", "off").kill_on_drop(true);
        async move {
            let output = tokio::time::timeout(Duration::from_secs(30), command.output())
                .await
                .unwrap_or_else(|_| panic!("ha status hung"))
                .unwrap_or_else(|e| panic!("ha status: {e}"));
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
    };
    let text = run(false).await;
    let json = serde_json::from_str(&run(true).await).unwrap_or(serde_json::Value::Null);
    (text, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_of_the_active_process_leaves_the_raft_leader_alive() {
    let mut members = Members::start();
    let (active, leader) = members.placed().await;
    // `ha status` says where the ACTIVE is, and that the leader's member has none.
    let (text, json) = status(&members).await;
    assert!(
        text.contains("placement: on; no ACTIVE on the Raft leader's member"),
        "{text}"
    );
    let listed = json["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 3, "{json}");
    for member in &listed {
        let id = member["id"].as_u64();
        let here = member["status"]["active_here"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(
            here,
            usize::from(id == Some(active)),
            "node {id:?}: {member}"
        );
        assert_eq!(member["status"]["placement"], true, "{member}");
    }
    assert_ne!(active, leader);
    for round in 0..3 {
        let (active, leader) = members.placed().await;
        let elected = members.elected;
        members.procs.kill(active).await;
        members
            .until("new ACTIVE", Duration::from_secs(20), |m| {
                m.elected > elected
            })
            .await;
        // Up to the new election nobody saw another Raft leader: it did not die.
        let unchanged = |members: &Members| {
            members
                .leader_seen
                .iter()
                .filter(|(id, _)| **id != active)
                .all(|(_, seen)| *seen == leader)
        };
        assert!(
            unchanged(&members),
            "round {round}: the Raft leader changed after the crash of node {active}: {:?}",
            members.leader_seen
        );
        members.watch(Duration::from_secs(1)).await;
        // Afterwards it moves only off a new ACTIVE elected on its member.
        let new_active = members.active;
        assert!(
            unchanged(&members) || new_active == Some(leader),
            "round {round}: the Raft leader moved without an ACTIVE on it: {:?}, ACTIVE {new_active:?}",
            members.leader_seen
        );
        members.spawn(active);
    }
    assert!(members.lost.is_empty(), "roles lost: {:?}", members.lost);
    members.procs.stop_all(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_hands_over_once_per_active_and_loses_nothing() {
    let mut members = Members::start();
    members.placed().await;
    let elected = members.elected;
    let mut restarted_actives = 0;
    for id in NODES {
        members.placed().await;
        if members.active == Some(id) {
            restarted_actives += 1;
        }
        members
            .procs
            .signal(id, Signal::TERM)
            .unwrap_or_else(|e| panic!("SIGTERM {id}: {e}"));
        members
            .procs
            .wait_exit(id, Duration::from_secs(15))
            .await
            .unwrap_or_else(|e| panic!("node {id} did not stop: {e}"));
        members.spawn(id);
        members
            .until(
                "the restarted member's leader",
                Duration::from_secs(30),
                |m| m.leader_seen.contains_key(&id),
            )
            .await;
        members.watch(Duration::from_secs(2)).await;
    }
    members.placed().await;
    assert!(members.lost.is_empty(), "roles lost: {:?}", members.lost);
    let handovers = members.elected - elected;
    assert!(
        handovers <= restarted_actives,
        "{handovers} handovers for {restarted_actives} restarted ACTIVEs"
    );
    members.procs.stop_all(Duration::from_secs(5)).await;
}
