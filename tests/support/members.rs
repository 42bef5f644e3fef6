//! Three `ha node --active-standby` members on loopback, started and stopped by PID, and
//! what their JSON lines say: the Raft leader each reports, the ACTIVE, elections and
//! lost roles; `ha status` of the group. Shared by tests/placement_processes.rs and
//! tests/upgrade_processes.rs.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use ha_testkit::{Line, Processes, Signal};
use tokio::process::Command;
use tokio::time::Instant;

/// The members' node ids.
pub const NODES: [u64; 3] = [1, 2, 3];

/// Three members, and what their lines said.
pub struct Members {
    pub peers: BTreeMap<u64, String>,
    pub dirs: BTreeMap<u64, tempfile::TempDir>,
    pub procs: Processes,
    /// The Raft leader each running member last reported.
    pub leader_seen: BTreeMap<u64, u64>,
    /// The member whose `proclaimed` came last, until it loses, resigns or stops.
    pub active: Option<u64>,
    pub elected: usize,
    pub lost: Vec<String>,
    /// `--feature-level` of a member started to stand for an older version.
    pub levels: BTreeMap<u64, u32>,
    /// Another `ha` binary (an older release) for a member, instead of this build's.
    pub binaries: BTreeMap<u64, std::path::PathBuf>,
}

impl Members {
    /// Starts the three members.
    pub fn start() -> Self {
        Self::start_at(BTreeMap::new())
    }

    /// Starts the three members, those in `levels` at a lower feature level.
    pub fn start_at(levels: BTreeMap<u64, u32>) -> Self {
        Self::start_with(levels, BTreeMap::new())
    }

    /// Starts the three members, those in `binaries` from another `ha` binary.
    pub fn start_with(
        levels: BTreeMap<u64, u32>,
        binaries: BTreeMap<u64, std::path::PathBuf>,
    ) -> Self {
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
            levels,
            binaries,
        };
        for id in NODES {
            members.spawn(id);
        }
        members
    }

    /// Starts member `id` (again) from its data dir.
    pub fn spawn(&mut self, id: u64) {
        let peers: Vec<String> = self
            .peers
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect();
        let binary = self
            .binaries
            .get(&id)
            .cloned()
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_ha").into());
        let mut command = Command::new(binary);
        command
            .args(["node", "--id", &id.to_string()])
            .args(["--listen", &self.peers[&id], "--peers", &peers.join(",")])
            .arg("--data")
            .arg(self.dirs[&id].path())
            .args(["--cluster", "placement-test", "--active-standby"])
            .args(["--role", "coord", "--ttl", "2s", "--recampaign", "--json"])
            .args(["--address", &format!("127.0.0.1:{}", 54100 + id)])
            .env("RUST_LOG", "off");
        if let Some(level) = self.levels.get(&id) {
            command.args(["--feature-level", &level.to_string()]);
        }
        self.leader_seen.remove(&id);
        self.procs
            .spawn(id, command)
            .unwrap_or_else(|e| panic!("spawn node {id}: {e}"));
    }

    pub fn read(&mut self, line: &Line) {
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

    /// SIGTERMs member `id` and waits (bounded) until it exits.
    pub async fn stop(&mut self, id: u64) {
        self.procs
            .signal(id, Signal::TERM)
            .unwrap_or_else(|e| panic!("SIGTERM {id}: {e}"));
        self.procs
            .wait_exit(id, Duration::from_secs(15))
            .await
            .unwrap_or_else(|e| panic!("node {id} did not stop: {e}"));
    }

    /// Once an ACTIVE is placed, stops member `id` (SIGTERM), starts it again as
    /// `levels` and `binaries` now say, and waits (bounded) until it reports a Raft
    /// leader. Whether its coordinator was the ACTIVE when it was stopped.
    pub async fn restart(&mut self, id: u64) -> bool {
        self.placed().await;
        let was_active = self.active == Some(id);
        self.stop(id).await;
        self.spawn(id);
        self.until(
            "the restarted member's leader",
            Duration::from_secs(30),
            |m| m.leader_seen.contains_key(&id),
        )
        .await;
        was_active
    }

    /// After a rolling restart: no role was lost, and the role moved at most once per
    /// restarted ACTIVE (`elected_before`: elections counted before it).
    pub fn check_handovers(&self, elected_before: usize, restarted_actives: usize) {
        assert!(self.lost.is_empty(), "roles lost: {:?}", self.lost);
        let handovers = self.elected - elected_before;
        assert!(
            handovers <= restarted_actives,
            "{handovers} handovers for {restarted_actives} restarted ACTIVEs"
        );
    }

    /// Starts member `id` and waits (bounded) for it to exit on its own, as a refused
    /// start does: its exit status and the tail of its stderr.
    pub async fn refused_start(&mut self, id: u64) -> (std::process::ExitStatus, String) {
        self.spawn(id);
        let exit = self
            .procs
            .wait_exit(id, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("node {id} did not exit: {e}"));
        (exit, self.procs.stderr_tail(id))
    }

    /// Reads lines until `done` holds, for at most `within`; panics with `what` then.
    pub async fn until(&mut self, what: &str, within: Duration, done: impl Fn(&Self) -> bool) {
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
    pub async fn watch(&mut self, long: Duration) {
        let deadline = Instant::now() + long;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Some(line) = self.procs.next(left).await {
                self.read(&line);
            }
        }
    }

    /// The Raft leader every running member reports, if they agree.
    pub fn agreed_leader(&self) -> Option<u64> {
        let running = self.procs.ids();
        let first = *self.leader_seen.get(running.first()?)?;
        running
            .iter()
            .all(|id| self.leader_seen.get(id) == Some(&first))
            .then_some(first)
            .filter(|leader| running.contains(leader))
    }

    /// Waits for an ACTIVE and an agreed Raft leader on another member.
    pub async fn placed(&mut self) -> (u64, u64) {
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
pub async fn status(members: &Members) -> (String, serde_json::Value) {
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
