//! The demo's three `ha node --active-standby` processes of this binary on loopback,
//! forming one embedded Raft group, and the narration of their event lines.

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

/// The node ids of the group.
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

/// The three processes, their temp dir and their event lines. Dropping it kills every
/// process still running (kill_on_drop) and removes the directory.
pub struct Group {
    /// Where the nodes keep their data.
    pub dir: tempfile::TempDir,
    ttl: Duration,
    /// Node id → Raft port.
    pub ports: BTreeMap<u64, u16>,
    /// The running processes.
    pub children: BTreeMap<u64, Child>,
    /// Every event line, in arrival order.
    pub events: mpsc::UnboundedReceiver<NodeEvent>,
    sender: mpsc::UnboundedSender<NodeEvent>,
    /// Whether the STANDBY log lines are echoed.
    pub show_standby_logs: Arc<AtomicBool>,
    started: Instant,
    /// The Raft leader the nodes last reported.
    pub raft_leader: Option<u64>,
}

impl Group {
    /// Picks ports and a temp dir; starts nothing.
    pub fn new(ttl: Duration) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ha-demo-")
            .tempdir()
            .context("cannot create a temp dir")?;
        // Bind all three before releasing any, so they are distinct.
        let listeners = NODES
            .iter()
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .context("cannot find free loopback ports")?;
        let mut ports = BTreeMap::new();
        for (id, listener) in NODES.iter().zip(&listeners) {
            ports.insert(*id, listener.local_addr()?.port());
        }
        drop(listeners);
        let (sender, events) = mpsc::unbounded_channel();
        Ok(Self {
            dir,
            ttl,
            ports,
            children: BTreeMap::new(),
            events,
            sender,
            show_standby_logs: Arc::new(AtomicBool::new(true)),
            started: Instant::now(),
            raft_leader: None,
        })
    }

    /// Prints a line with the time since the start.
    pub fn say(&self, line: &str) {
        println!("[{:6.2}s] {line}", self.started.elapsed().as_secs_f64());
    }

    /// Starts node `id` (again, from its data dir, after a stop); returns its pid.
    pub fn start(&mut self, id: u64) -> Result<u32> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let peers: Vec<String> = self
            .ports
            .iter()
            .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
            .collect();
        let mut child = Command::new(exe)
            .args(["node", "--id", &id.to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[&id])])
            .args(["--peers", &peers.join(",")])
            .arg("--data")
            .arg(self.dir.path().join(format!("node-{id}")))
            .args(["--json", "--active-standby", "--role", ROLE])
            .args(["--address", &format!("127.0.0.1:{}", 53100 + id)])
            .args(["--ttl", &format!("{}ms", self.ttl.as_millis())])
            .args(["--standby-log-interval", "1s"])
            .env("RUST_LOG", "info,openraft=off,sled=off")
            // The demo runs on loopback without TLS, whatever this shell exports.
            .env_remove("HA_CACERT")
            .env_remove("HA_CERT")
            .env_remove("HA_KEY")
            .env_remove("HA_TOKEN")
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

    /// Tracks the Raft leader and narrates an event.
    pub fn narrate(&mut self, event: &NodeEvent) {
        let node = event.node;
        let reason = || event.json["reason"].as_str().unwrap_or("?").to_owned();
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
            "lost" => self.say(&format!("node {node} lost the role ({})", reason())),
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
    /// still running 5 s later. All at once: stopped one by one, the last Raft member
    /// has no quorum left, so its resign and revoke could only time out.
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
