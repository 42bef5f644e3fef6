//! A group of three processes of this binary on loopback, with their event lines: what
//! `ha demo` narrates and `ha bench` measures. By default each is an `ha node
//! --active-standby` and together they form an embedded Raft group; a group can also run
//! bare Raft members, or `ha run` coordinators on an external backend (etcd).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use crate::output::unix_us;

/// The node ids of a group.
pub const NODES: [u64; 3] = [1, 2, 3];
/// The coordinator role the nodes run.
pub const ROLE: &str = "rootcoord";

/// One event line of a node, with the node it came from.
pub struct NodeEvent {
    /// The node that printed it.
    pub node: u64,
    /// The event.
    pub json: Value,
}

impl NodeEvent {
    /// The event's name.
    pub fn kind(&self) -> &str {
        self.json["event"].as_str().unwrap_or("")
    }
    /// Its fencing token (0 if none).
    pub fn token(&self) -> u64 {
        self.json["token"].as_u64().unwrap_or(0)
    }
    /// When the node printed it.
    pub fn at_unix_us(&self) -> u64 {
        self.json["at_unix_us"].as_u64().unwrap_or(0)
    }
}

/// What the processes of a group run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// `ha node --active-standby`: Raft members, each with a coordinator.
    RaftCoordinators,
    /// `ha node` alone: Raft members that serve clients, no coordinator.
    RaftMembers,
    /// `ha run --backend URL`: coordinators on an external backend.
    // Only the etcd scenarios of `ha bench` run coordinators on an external backend.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    Backend(String),
}

/// The three processes, their temp dir and their event lines. Dropping it kills every
/// process still running (kill_on_drop) and removes the directory.
pub struct Group {
    /// Where the nodes keep their data.
    pub dir: tempfile::TempDir,
    ttl: Duration,
    peers: String,
    /// Node id → Raft port.
    pub ports: BTreeMap<u64, u16>,
    /// The running processes.
    pub children: BTreeMap<u64, Child>,
    /// Every event line, in arrival order.
    pub events: mpsc::UnboundedReceiver<NodeEvent>,
    sender: mpsc::UnboundedSender<NodeEvent>,
    /// Whether the STANDBY log lines are echoed.
    pub show_standby_logs: Arc<AtomicBool>,
    /// Whether events are narrated on stdout (the demo) or not (the bench).
    pub narrated: bool,
    /// More `ha node` flags for every node.
    pub extra_args: Vec<String>,
    /// Every `lost` event seen: "node N: reason".
    pub losses: Vec<String>,
    started: Instant,
    /// The Raft leader the nodes last reported.
    pub raft_leader: Option<u64>,
    /// The ACTIVE whose `proclaimed` came last, (node, token), until it loses, resigns or
    /// stops, as far as the events narrated so far tell.
    pub ready_active: Option<(u64, u64)>,
    /// What each process runs.
    pub launch: Launch,
}

impl Group {
    /// Picks ports and a temp dir; starts nothing.
    pub fn new(ttl: Duration) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ha-demo-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let mut ports = BTreeMap::new();
        // Bind all three before releasing any, so they are distinct.
        let listeners = NODES
            .iter()
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .context("cannot find free loopback ports")?;
        for (id, listener) in NODES.iter().zip(&listeners) {
            ports.insert(*id, listener.local_addr()?.port());
        }
        drop(listeners);
        let peers = ports
            .iter()
            .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let (sender, events) = mpsc::unbounded_channel();
        Ok(Self {
            dir,
            ttl,
            peers,
            ports,
            children: BTreeMap::new(),
            events,
            sender,
            show_standby_logs: Arc::new(AtomicBool::new(true)),
            narrated: true,
            extra_args: Vec::new(),
            losses: Vec::new(),
            started: Instant::now(),
            raft_leader: None,
            ready_active: None,
            launch: Launch::RaftCoordinators,
        })
    }

    /// A group of `ha run` coordinators on an external backend.
    // Only the etcd scenarios of `ha bench` run coordinators on an external backend.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub fn on_backend(ttl: Duration, url: &str) -> Result<Self> {
        let mut group = Self::new(ttl)?;
        group.launch = Launch::Backend(url.to_owned());
        Ok(group)
    }

    /// The `raft://` URL of the group's members.
    pub fn raft_url(&self) -> String {
        let endpoints = self
            .ports
            .values()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect::<Vec<_>>();
        format!("raft://{}", endpoints.join(","))
    }

    /// Prints a line with the time since the start, if narrated.
    pub fn say(&self, line: &str) {
        if !self.narrated {
            return;
        }
        println!("[{:6.2}s] {line}", self.started.elapsed().as_secs_f64());
    }

    /// Starts node `id` (again, from its data dir, after a stop); returns its pid.
    pub fn start(&mut self, id: u64) -> Result<u32> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let port = self.ports[&id];
        let mut command = Command::new(exe);
        match &self.launch {
            Launch::RaftCoordinators | Launch::RaftMembers => {
                command
                    .args(["node", "--id", &id.to_string()])
                    .args(["--listen", &format!("127.0.0.1:{port}")])
                    .args(["--peers", &self.peers])
                    .arg("--data")
                    .arg(self.data_dir(id))
                    .arg("--json");
            }
            Launch::Backend(url) => {
                command
                    .args(["run", "--id", &id.to_string()])
                    .args(["--backend", url])
                    .arg("--json");
            }
        }
        if self.launch != Launch::RaftMembers {
            if matches!(self.launch, Launch::RaftCoordinators) {
                command.arg("--active-standby");
            }
            command
                .args(["--role", ROLE])
                .args(["--address", &format!("127.0.0.1:{}", 53100 + id)])
                .args(["--ttl", &self.ttl.as_secs_f64().to_string()])
                .args(["--standby-log-interval", "1"]);
        }
        let mut child = command
            .args(&self.extra_args)
            .env("RUST_LOG", "info,openraft=off,sled=off")
            // The demo runs on loopback without TLS, whatever this shell exports.
            .env_remove("HA_CACERT")
            .env_remove("HA_CERT")
            .env_remove("HA_KEY")
            .env_remove("HA_TOKEN")
            .env_remove("HA_ETCD_USER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start an `ha node` process")?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("node {id} exited at once"))?;
        if let Some(stdout) = child.stdout.take() {
            let sender = self.sender.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(json) = serde_json::from_str(&line) {
                        let _ = sender.send(NodeEvent { node: id, json });
                    }
                }
            });
        }
        if let Some(stderr) = child.stderr.take() {
            let show = Arc::clone(&self.show_standby_logs);
            let started = self.started;
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(at) = line.find("is in STANDBY") {
                        if show.load(Ordering::Relaxed) {
                            let start = line[..at].rfind(ROLE).unwrap_or(at);
                            println!(
                                "[{:6.2}s]   node {id} logs: {}",
                                started.elapsed().as_secs_f64(),
                                &line[start..]
                            );
                        }
                    } else if line.contains("ERROR") {
                        eprintln!("  node {id}: {line}");
                    }
                }
            });
        }
        self.children.insert(id, child);
        Ok(pid)
    }

    /// Where node `id` keeps its Raft data (Raft launches only).
    pub fn data_dir(&self, id: u64) -> std::path::PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    /// Waits for an event matching `pred`, narrating the interesting ones on the way.
    pub async fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        mut pred: impl FnMut(&NodeEvent) -> bool,
    ) -> Result<NodeEvent> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match timeout(left, self.events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => bail!("the event channel closed waiting for {what}"),
                Err(_) => bail!("waited {within:?} for {what} in vain"),
            };
            self.narrate(&event);
            if pred(&event) {
                return Ok(event);
            }
        }
    }

    /// The ready ACTIVE as of every event received so far, (node, token); waits up to
    /// `within` for one if there is none. Between two looks at the group the ACTIVE can
    /// change without a signal from us: a session that self-fenced while the Raft leader
    /// moved (TTL 2 s) hands the role on.
    pub async fn ready_active(&mut self, within: Duration) -> Result<(u64, u64)> {
        while let Ok(event) = self.events.try_recv() {
            self.narrate(&event);
        }
        if let Some(active) = self.ready_active {
            return Ok(active);
        }
        let ready = self
            .wait_for("a ready ACTIVE", within, |e| e.kind() == "proclaimed")
            .await?;
        Ok((ready.node, ready.token()))
    }

    /// Tracks the Raft leader and the ready ACTIVE, and narrates an event.
    pub fn narrate(&mut self, event: &NodeEvent) {
        let node = event.node;
        match event.kind() {
            "proclaimed" => self.ready_active = Some((node, event.token())),
            // A new leadership starts; its holder is ready with its `proclaimed`.
            "elected" => self.ready_active = None,
            "lost" | "resigned" | "stopped"
                if self.ready_active.is_some_and(|(active, _)| active == node) =>
            {
                self.ready_active = None;
            }
            _ => {}
        }
        match event.kind() {
            "raft_leader" => {
                let leader = event.json["node"].as_u64();
                if leader != self.raft_leader {
                    self.raft_leader = leader;
                    self.say(&format!(
                        "node {} is the Raft leader (reported by node {node})",
                        event.json["node"]
                    ));
                }
            }
            "standby" => self.say(&format!("node {node} is STANDBY")),
            "elected" => self.say(&format!(
                "node {node} is elected (token {}), activating",
                event.token()
            )),
            "proclaimed" => self.say(&format!(
                "node {node} is ACTIVE and ready (token {}); clients route to it",
                event.token()
            )),
            "lost" => {
                self.losses.push(format!(
                    "node {node}: {}",
                    event.json["reason"].as_str().unwrap_or("?")
                ));
                self.say(&format!(
                    "node {node} lost the role ({})",
                    event.json["reason"].as_str().unwrap_or("?")
                ));
            }
            "resigned" => self.say(&format!("node {node} resigned (token {})", event.token())),
            "stopped" => self.say(&format!("node {node} stopped")),
            _ => {}
        }
    }

    /// The pid of a running node.
    pub fn pid(&self, id: u64) -> Result<i32> {
        let pid = self
            .children
            .get(&id)
            .and_then(Child::id)
            .ok_or_else(|| anyhow!("node {id} is not running"))?;
        i32::try_from(pid).context("pid out of range")
    }

    /// Stops every process still running: SIGTERM to all at once, then SIGKILL to any
    /// still running 5 s later. All at once, as a whole group is shut down: stopped one
    /// by one, the last Raft member has no quorum left, so its resign and revoke can
    /// only time out (up to 2 × TTL/3) before it exits.
    pub async fn stop_all(&mut self) {
        for child in self.children.values() {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (id, child) in &mut self.children {
            let left = deadline.saturating_duration_since(Instant::now());
            if timeout(left, child.wait()).await.is_err() {
                eprintln!("  node {id} did not stop in 5 s; killing it");
                let _ = child.kill().await;
            }
        }
        self.children.clear();
    }
}

/// Sends `signal` to process `pid` (`whom` names it in the error); returns the unix time
/// (µs) just before sending, where a measured gap starts.
pub fn signal_stamped(pid: i32, signal: Signal, whom: &str) -> Result<u64> {
    let at = unix_us();
    kill(Pid::from_raw(pid), signal).with_context(|| format!("{signal} to {whom}"))?;
    Ok(at)
}

impl Group {
    /// Sends `signal` to node `id`; returns the unix time (µs) just before sending.
    pub fn signal(&self, id: u64, signal: Signal) -> Result<u64> {
        signal_stamped(self.pid(id)?, signal, &format!("node {id}"))
    }

    /// Waits for the first `elected` event of a node other than `old`, with a token above
    /// `above`; returns it.
    pub async fn next_elected(
        &mut self,
        old: u64,
        above: u64,
        within: Duration,
    ) -> Result<NodeEvent> {
        let event = self
            .wait_for("a new leader", within, |e| {
                e.kind() == "elected" && e.node != old
            })
            .await?;
        if event.token() <= above {
            bail!(
                "the fencing token did not increase: {above} then {}",
                event.token()
            );
        }
        Ok(event)
    }

    /// Reaps a stopped node's process (bounded), so it can be started again.
    pub async fn reap(&mut self, id: u64) {
        if let Some(mut child) = self.children.remove(&id) {
            if timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}
