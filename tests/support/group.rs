//! A group of `ha node` processes for the tests that operate one (tests/membership.rs,
//! tests/recovery.rs), and `ha` commands run to completion against it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ha_testkit::{free_ports, Processes};
use serde_json::Value;
use tokio::process::Command;
use tokio::time::sleep;

pub const HA: &str = env!("CARGO_BIN_EXE_ha");
pub const CLUSTER: &str = "membership-test";

/// Members of one test's group, by node id, stopped by PID when it ends.
pub struct Group {
    pub addresses: BTreeMap<u64, String>,
    pub dirs: BTreeMap<u64, tempfile::TempDir>,
    pub procs: Processes,
    /// The flags each bootstrap voter was started with, to restart it as itself.
    pub flags: BTreeMap<u64, Vec<String>>,
}

impl Group {
    /// Addresses for ids `1..=n`; the first `initial` bootstrap the group.
    pub fn new(n: u64) -> Self {
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
            flags: BTreeMap::new(),
        }
    }

    pub fn url(&self, ids: &[u64]) -> String {
        let list: Vec<&str> = ids.iter().map(|id| self.addresses[id].as_str()).collect();
        format!("raft://{}", list.join(","))
    }

    pub fn node_command(&self, id: u64, extra: &[&str]) -> Command {
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
    pub fn bootstrap(&mut self, ids: &[u64], extra: &[&str]) {
        let peers: Vec<String> = ids
            .iter()
            .map(|id| format!("{id}={}", self.addresses[id]))
            .collect();
        let peers = peers.join(",");
        for id in ids {
            let mut flags = vec!["--cluster", CLUSTER, "--peers", &peers];
            flags.extend(extra);
            let flags: Vec<String> = flags.into_iter().map(str::to_owned).collect();
            self.flags.insert(*id, flags);
            self.restart(*id);
        }
    }

    /// Starts bootstrap voter `id` again, as itself (its data dir and flags).
    pub fn restart(&mut self, id: u64) {
        let flags: Vec<&str> = self.flags[&id].iter().map(String::as_str).collect();
        let command = self.node_command(id, &flags);
        self.procs
            .spawn(id, command)
            .unwrap_or_else(|e| panic!("spawn node {id}: {e}"));
    }

    /// Starts node `id` joining through `via`, and waits for its `joined` event.
    pub async fn join(&mut self, id: u64, via: &[u64], extra: &[&str]) -> String {
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

    /// Waits for the first `elected` event: the ACTIVE's line.
    pub async fn first_active(&mut self) -> ha_testkit::Line {
        self.procs
            .expect("an ACTIVE", Duration::from_secs(30), |l| l.is("elected"))
            .await
    }

    pub async fn leader_known(&mut self) {
        self.procs
            .expect("a Raft leader", Duration::from_secs(20), |l| {
                l.is("raft_leader")
            })
            .await;
    }
}

/// `ha node` flags for an ActiveStandby coordinator of `role` (TTL 3 s) that campaigns
/// again after a loss.
pub fn coordinator(role: &'static str) -> [&'static str; 6] {
    [
        "--active-standby",
        "--role",
        role,
        "--ttl",
        "3s",
        "--recampaign",
    ]
}

/// One `ha` command to completion, bounded: its exit code, stdout and stderr.
pub async fn ha(args: &[&str]) -> (i32, String, String) {
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
pub async fn members(url: &str) -> (Vec<u64>, Vec<u64>) {
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
pub async fn until_voters(url: &str, voters: &[u64]) -> Value {
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
