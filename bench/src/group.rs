//! A group of three `ha` processes on loopback (ha-testkit's [`Processes`]) and what
//! their event lines say: which node hosts the Raft leader, which one is the ready
//! ACTIVE, which roles were lost. Each is an `ha node --active-standby` (one embedded
//! Raft group), a bare `ha node` (a Raft group that serves clients), or an `ha run`
//! coordinator on an external backend (etcd).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ha_testkit::{Line, Processes, Signal};
use tokio::process::Command;

/// The node ids of a group.
pub const NODES: [u64; 3] = [1, 2, 3];
/// The coordinator role the nodes run.
pub const ROLE: &str = "rootcoord";
/// How long a stopped group waits for SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What the processes of a group run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// `ha node --active-standby`: Raft members, each with a coordinator.
    RaftCoordinators,
    /// `ha node` alone: Raft members that serve clients, no coordinator.
    RaftMembers,
    /// `ha run --backend URL`: coordinators on an external backend.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    Backend(String),
}

/// What the event lines read so far say about the group.
#[derive(Debug, Default)]
pub struct Seen {
    /// The Raft leader the nodes last reported.
    pub raft_leader: Option<u64>,
    /// The ACTIVE whose `proclaimed` came last, (node, token), until it loses, resigns
    /// or stops.
    pub ready_active: Option<(u64, u64)>,
    /// Every `lost` event: "node N: reason".
    pub losses: Vec<String>,
    /// `elected` events read so far.
    pub elected: usize,
    /// Print every line read (HA_BENCH_VERBOSE).
    verbose: bool,
}

impl Seen {
    fn read(&mut self, line: &Line) {
        if self.verbose {
            println!("    node {}: {}", line.from, line.text);
        }
        let node = line.from;
        match line.event() {
            "proclaimed" => self.ready_active = Some((node, line.token())),
            // A new leadership starts; its holder is ready with its `proclaimed`.
            "elected" => {
                self.ready_active = None;
                self.elected += 1;
            }
            "lost" | "resigned" | "stopped"
                if self.ready_active.is_some_and(|(active, _)| active == node) =>
            {
                self.ready_active = None;
            }
            "raft_leader" => self.raft_leader = line.number("node"),
            _ => {}
        }
        if line.is("lost") {
            let reason = line.json["reason"].as_str().unwrap_or("?");
            self.losses.push(format!("node {node}: {reason}"));
        }
    }
}

/// Three processes, their temp dir, and what their lines said.
pub struct Group {
    procs: Processes,
    ha: PathBuf,
    dir: tempfile::TempDir,
    ttl: Duration,
    ports: BTreeMap<u64, u16>,
    launch: Launch,
    /// More flags for every process.
    pub extra_args: Vec<String>,
    /// What the lines read so far said.
    pub seen: Seen,
}

impl Group {
    /// Picks ports and a temp dir; starts nothing. `ha` is the binary to run.
    pub fn new(ha: &Path, ttl: Duration, launch: Launch) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ha-bench-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let ports = NODES.into_iter().zip(ha_testkit::free_ports(3)).collect();
        Ok(Self {
            procs: Processes::new(),
            ha: ha.to_owned(),
            dir,
            ttl,
            ports,
            launch,
            extra_args: Vec::new(),
            seen: Seen {
                verbose: std::env::var_os("HA_BENCH_VERBOSE").is_some(),
                ..Seen::default()
            },
        })
    }

    /// The `raft://` URL of the group's members.
    pub fn raft_url(&self) -> String {
        format!("raft://{}", self.endpoints().join(","))
    }

    /// The members' client addresses, `host:port`.
    pub fn endpoints(&self) -> Vec<String> {
        self.ports
            .values()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect()
    }

    /// Node `id`'s client address, `host:port`.
    pub fn endpoint(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.ports[&id])
    }

    /// Where node `id` keeps its Raft data.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    /// Starts node `id` (again, from its data dir, after a stop); returns its pid.
    pub fn start(&mut self, id: u64) -> Result<u32> {
        let mut command = Command::new(&self.ha);
        match &self.launch {
            Launch::RaftCoordinators | Launch::RaftMembers => {
                let peers: Vec<String> = self
                    .ports
                    .iter()
                    .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
                    .collect();
                command
                    .args(["node", "--id", &id.to_string()])
                    .args(["--listen", &format!("127.0.0.1:{}", self.ports[&id])])
                    .args(["--peers", &peers.join(",")])
                    .arg("--data")
                    .arg(self.data_dir(id));
            }
            Launch::Backend(url) => {
                command
                    .args(["run", "--id", &id.to_string()])
                    .args(["--backend", url]);
            }
        }
        if self.launch == Launch::RaftCoordinators {
            command.arg("--active-standby");
        }
        if self.launch != Launch::RaftMembers {
            command
                .args(["--role", ROLE])
                .args(["--address", &format!("127.0.0.1:{}", 53100 + id)])
                .args(["--ttl", &format!("{}ms", self.ttl.as_millis())]);
        }
        command
            .arg("--json")
            .args(&self.extra_args)
            .env("RUST_LOG", "warn,openraft=off,sled=off")
            // Loopback without TLS, whatever this shell exports.
            .env_remove("HA_CACERT")
            .env_remove("HA_CERT")
            .env_remove("HA_KEY")
            .env_remove("HA_TOKEN")
            .env_remove("HA_ETCD_USER");
        self.procs
            .spawn(id, command)
            .with_context(|| format!("cannot start {}", self.ha.display()))
    }

    /// Starts every node and waits for the first ACTIVE's `proclaimed`.
    pub async fn start_all(&mut self) -> Result<()> {
        for id in NODES {
            self.start(id)?;
        }
        self.wait_for("a first ACTIVE", Duration::from_secs(30), |l| {
            l.is("proclaimed")
        })
        .await?;
        Ok(())
    }

    /// Reads lines until one matches `pred`, noting what each says.
    pub async fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        mut pred: impl FnMut(&Line) -> bool,
    ) -> Result<Line> {
        let seen = &mut self.seen;
        let line = self
            .procs
            .wait_for(what, within, |line| {
                seen.read(line);
                pred(line)
            })
            .await?;
        Ok(line)
    }

    /// The ready ACTIVE as of every line printed so far, (node, token); waits up to
    /// `within` for one if there is none. Between two looks the ACTIVE can change
    /// without a signal from us: a session that self-fenced while the Raft leader moved
    /// hands the role on.
    pub async fn ready_active(&mut self, within: Duration) -> Result<(u64, u64)> {
        while let Some(line) = self.procs.next(Duration::ZERO).await {
            self.seen.read(&line);
        }
        if let Some(active) = self.seen.ready_active {
            return Ok(active);
        }
        let ready = self
            .wait_for("a ready ACTIVE", within, |l| l.is("proclaimed"))
            .await?;
        Ok((ready.from, ready.token()))
    }

    /// The first `elected` of a node other than `old`, whose token must be above `above`.
    pub async fn next_elected(&mut self, old: u64, above: u64, within: Duration) -> Result<Line> {
        let line = self
            .wait_for("a new leader", within, |l| l.is("elected") && l.from != old)
            .await?;
        if line.token() <= above {
            bail!(
                "the fencing token did not increase: {above} then {}",
                line.token()
            );
        }
        Ok(line)
    }

    /// The pid of a running node.
    pub fn pid(&self, id: u64) -> Result<u32> {
        self.procs
            .pid(id)
            .ok_or_else(|| anyhow!("node {id} is not running"))
    }

    /// Sends `signal` to node `id`; returns the unix time (µs) just before sending.
    pub fn signal(&self, id: u64, signal: Signal) -> Result<u64> {
        self.procs
            .signal(id, signal)
            .with_context(|| format!("{signal:?} to node {id}"))
    }

    /// Reaps a stopped node, starts it again and waits up to `within` for its
    /// `standby`; returns the unix time (µs) of the start and the `standby` line.
    pub async fn restart(&mut self, id: u64, within: Duration) -> Result<(u64, Line)> {
        self.reap(id).await;
        let spawned = ha_testkit::unix_us();
        self.start(id)?;
        let standby = self
            .wait_for("the restarted node in STANDBY", within, |l| {
                l.is("standby") && l.from == id
            })
            .await?;
        Ok((spawned, standby))
    }

    /// Reads (and notes) every line for `long`.
    pub async fn read_for(&mut self, long: Duration) {
        // No line matches, so the wait always runs out.
        let _ = self.wait_for("nothing", long, |_| false).await;
    }

    /// Reaps a stopped node (SIGKILL after 10 s), so it can be started again.
    pub async fn reap(&mut self, id: u64) {
        let _ = self.procs.wait_exit(id, Duration::from_secs(10)).await;
    }

    /// Stops every node at once (SIGTERM, SIGKILL after 5 s): stopped one by one, the
    /// last Raft member has no quorum left and its resign can only time out.
    pub async fn stop_all(&mut self) {
        self.procs.stop_all(STOP_GRACE).await;
    }
}
