//! `ha demo`: three `ha node --active-standby` processes of this binary on an embedded
//! Raft group (loopback, temp dirs), a SIGKILL of the ACTIVE with the measured takeover
//! gap, a restart, a SIGTERM of the next ACTIVE with the measured handoff gap, and a
//! cleanup of every process and directory.

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
use crate::Exit;

const NODES: [u64; 3] = [1, 2, 3];
const ROLE: &str = "rootcoord";

/// Runs the demo; any failure is reported and exits with code 1. SIGINT/SIGTERM stop it
/// early; the processes and the temp dir are cleaned up either way (the group's drop).
pub async fn run(ttl: Duration) -> Exit {
    let outcome = tokio::select! {
        outcome = demo(ttl) => outcome,
        () = crate::shutdown_signal() => Err(anyhow!("interrupted; stopped every node")),
    };
    match outcome {
        Ok(()) => Exit::Clean,
        Err(error) => {
            eprintln!("ha demo failed: {error:#}");
            Exit::Failed
        }
    }
}

/// One event line of a node, with the node it came from.
struct NodeEvent {
    node: u64,
    json: Value,
}

impl NodeEvent {
    fn kind(&self) -> &str {
        self.json["event"].as_str().unwrap_or("")
    }
    fn token(&self) -> u64 {
        self.json["token"].as_u64().unwrap_or(0)
    }
    fn at_unix_us(&self) -> u64 {
        self.json["at_unix_us"].as_u64().unwrap_or(0)
    }
}

/// The three processes, their temp dir and their event lines. Dropping it kills every
/// process still running (kill_on_drop) and removes the directory.
struct Group {
    dir: tempfile::TempDir,
    ttl: Duration,
    peers: String,
    ports: BTreeMap<u64, u16>,
    children: BTreeMap<u64, Child>,
    events: mpsc::UnboundedReceiver<NodeEvent>,
    sender: mpsc::UnboundedSender<NodeEvent>,
    show_standby_logs: Arc<AtomicBool>,
    started: Instant,
    /// The Raft leader the nodes last reported.
    raft_leader: Option<u64>,
}

impl Group {
    fn new(ttl: Duration) -> Result<Self> {
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
            started: Instant::now(),
            raft_leader: None,
        })
    }

    fn say(&self, line: &str) {
        println!("[{:6.2}s] {line}", self.started.elapsed().as_secs_f64());
    }

    fn start(&mut self, id: u64) -> Result<u32> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let port = self.ports[&id];
        let mut child = Command::new(exe)
            .args(["node", "--id", &id.to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--peers", &self.peers])
            .arg("--data")
            .arg(self.dir.path().join(format!("node-{id}")))
            .args(["--active-standby", "--role", ROLE, "--json"])
            .args(["--address", &format!("127.0.0.1:{}", 53100 + id)])
            .args(["--ttl", &self.ttl.as_secs_f64().to_string()])
            .args(["--standby-log-interval", "1"])
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
    async fn wait_for(
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
                Err(_) => bail!("no {what} within {within:?}"),
            };
            self.narrate(&event);
            if pred(&event) {
                return Ok(event);
            }
        }
    }

    fn narrate(&mut self, event: &NodeEvent) {
        let node = event.node;
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
            "lost" => self.say(&format!(
                "node {node} lost the role ({})",
                event.json["reason"].as_str().unwrap_or("?")
            )),
            "resigned" => self.say(&format!("node {node} resigned (token {})", event.token())),
            "stopped" => self.say(&format!("node {node} stopped")),
            _ => {}
        }
    }

    fn pid(&self, id: u64) -> Result<i32> {
        let pid = self
            .children
            .get(&id)
            .and_then(Child::id)
            .ok_or_else(|| anyhow!("node {id} is not running"))?;
        i32::try_from(pid).context("pid out of range")
    }

    /// Stops every process still running: SIGTERM, then SIGKILL after 5 s.
    async fn stop_all(&mut self) {
        for (id, child) in &mut self.children {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            if timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                eprintln!("  node {id} did not stop in 5 s; killing it");
                let _ = child.kill().await;
            }
        }
        self.children.clear();
    }
}

async fn demo(ttl: Duration) -> Result<()> {
    let mut group = Group::new(ttl)?;
    println!(
        "ha demo: three replicas of coordinator role '{ROLE}', each embedding a member of one Raft group"
    );
    println!(
        "         (no etcd; TTL {:.1} s; data in {})\n",
        ttl.as_secs_f64(),
        group.dir.path().display()
    );
    for id in NODES {
        let pid = group.start(id)?;
        group.say(&format!(
            "started node {id} (pid {pid}): ha node --id {id} --listen 127.0.0.1:{} --active-standby --role {ROLE}",
            group.ports[&id]
        ));
    }
    let first = group
        .wait_for("a first ACTIVE", Duration::from_secs(20), |e| {
            e.kind() == "proclaimed"
        })
        .await?;
    let active = first.node;
    let first_token = first.token();

    // Let the standbys log a little, as Milvus's do.
    let settle = Instant::now() + Duration::from_millis(2500);
    while let Ok(Some(event)) = timeout(
        settle.saturating_duration_since(Instant::now()),
        group.events.recv(),
    )
    .await
    {
        group.narrate(&event);
    }
    group.show_standby_logs.store(false, Ordering::Relaxed);

    // 1. Crash: SIGKILL the active.
    let also = if group.raft_leader == Some(active) {
        ", which also hosts the Raft leader"
    } else {
        ""
    };
    println!("\n--- crash: SIGKILL the ACTIVE (node {active}{also}) ---");
    let pid = group.pid(active)?;
    let killed_at = unix_us();
    kill(Pid::from_raw(pid), Signal::SIGKILL).context("SIGKILL failed")?;
    group.say(&format!("killed node {active} (pid {pid})"));
    if let Some(mut child) = group.children.remove(&active) {
        let _ = child.wait().await;
    }
    let next = group
        .wait_for("a takeover", ttl + Duration::from_secs(15), |e| {
            e.kind() == "elected" && e.node != active
        })
        .await?;
    let takeover = Duration::from_micros(next.at_unix_us().saturating_sub(killed_at));
    if next.token() <= first_token {
        bail!(
            "the fencing token did not increase: {first_token} then {}",
            next.token()
        );
    }
    let ready = group
        .wait_for("the new ACTIVE ready", Duration::from_secs(10), |e| {
            e.kind() == "proclaimed" && e.node == next.node
        })
        .await?;
    println!(
        "    takeover gap: {:.2} s from SIGKILL to node {} elected, ready after {:.2} s",
        takeover.as_secs_f64(),
        next.node,
        Duration::from_micros(ready.at_unix_us().saturating_sub(killed_at)).as_secs_f64()
    );
    println!(
        "    (the dead lease expires at most TTL = {:.1} s after its last keepalive; +~1 s when the",
        ttl.as_secs_f64()
    );
    println!("     killed process also hosted the Raft leader and the group elects a new one)");
    println!("    (Milvus's coordinator active-standby: 30-60 s)");

    // 2. The killed node comes back from its data dir, as a STANDBY.
    println!("\n--- restart node {active} from its data dir ---");
    group.start(active)?;
    group
        .wait_for(
            "the restarted node in STANDBY",
            Duration::from_secs(20),
            |e| e.kind() == "standby" && e.node == active,
        )
        .await?;

    // 3. Rolling restart: SIGTERM the active; it resigns and the next takes over at once.
    let leaving = next.node;
    let also = if group.raft_leader == Some(leaving) {
        ", which also hosts the Raft leader"
    } else {
        ""
    };
    println!("\n--- graceful stop: SIGTERM the ACTIVE (node {leaving}{also}) ---");
    let pid = group.pid(leaving)?;
    let termed_at = unix_us();
    kill(Pid::from_raw(pid), Signal::SIGTERM).context("SIGTERM failed")?;
    let after = group
        .wait_for("a handoff", Duration::from_secs(10), |e| {
            e.kind() == "elected" && e.node != leaving
        })
        .await?;
    let handoff = Duration::from_micros(after.at_unix_us().saturating_sub(termed_at));
    if after.token() <= next.token() {
        bail!(
            "the fencing token did not increase: {} then {}",
            next.token(),
            after.token()
        );
    }
    println!(
        "    handoff gap: {:.1} ms from SIGTERM to node {} elected (the old ACTIVE stopped, resigned and revoked first)",
        handoff.as_secs_f64() * 1000.0,
        after.node
    );
    if let Some(mut child) = group.children.remove(&leaving) {
        match timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(status)) => group.say(&format!("node {leaving} exited: {status}")),
            _ => {
                let _ = child.kill().await;
                bail!("node {leaving} did not exit within 10 s of SIGTERM");
            }
        }
    }
    group
        .wait_for("the new ACTIVE ready", Duration::from_secs(10), |e| {
            e.kind() == "proclaimed" && e.node == after.node
        })
        .await?;

    println!("\n--- cleanup ---");
    group.stop_all().await;
    let dir = group.dir.path().display().to_string();
    drop(group);
    println!("stopped every node and removed {dir}");
    println!(
        "\nsummary: crash takeover {:.2} s (TTL {:.1} s), graceful handoff {:.1} ms, fencing tokens {} -> {} -> {}",
        takeover.as_secs_f64(),
        ttl.as_secs_f64(),
        handoff.as_secs_f64() * 1000.0,
        first_token,
        next.token(),
        after.token()
    );
    Ok(())
}
