//! A private 3-member (or n-member) etcd cluster on loopback, for the tests that kill,
//! pause and restart members (the etcd leader among them) while sessions run.
//! `HA_ETCD_LOGS=DIR` keeps each member's log there (`<token>-<name>.log`, level info).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{find_binary, free_port, StartError, LISTEN_WITHIN};

/// One member: its ports and data dir outlive its process, so it restarts as itself.
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// The port its peers dial: its own, or a proxy's in front of it.
    advertised_peer_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// A running private etcd cluster; dropping it stops every member by PID.
#[derive(Debug)]
pub struct EtcdCluster {
    binary: PathBuf,
    token: String,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts a cluster of `size` members for a test, or returns `None` (outside CI,
    /// with a loud message) when etcd is not installed. Panics on any other failure,
    /// and under `CI` when etcd is missing.
    pub fn start(size: usize) -> Option<Self> {
        super::for_test(Self::try_start(size))
    }

    /// [`start`](Self::start), with member `i`'s peers dialing it at
    /// `advertised_peer_ports[i]` (a proxy the test puts in front of
    /// [`peer_port`](Self::peer_port)`(i)`, to cut the peer path alone).
    pub fn start_with_peer_ports(advertised_peer_ports: &[u16]) -> Option<Self> {
        super::for_test(Self::try_start_with(
            advertised_peer_ports.len(),
            Some(advertised_peer_ports),
        ))
    }

    /// Starts `size` members and waits until each accepts connections.
    ///
    /// # Errors
    /// No etcd binary, no ports or temp dirs, or a member that does not listen in time.
    pub fn try_start(size: usize) -> Result<Self, StartError> {
        Self::try_start_with(size, None)
    }

    fn try_start_with(size: usize, advertised: Option<&[u16]>) -> Result<Self, StartError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let binary = find_binary("etcd").ok_or(StartError::NotInstalled)?;
        let mut members = Vec::new();
        for i in 1..=size {
            let peer_port = free_port()?;
            members.push(Member {
                name: format!("m{i}"),
                client_port: free_port()?,
                peer_port,
                advertised_peer_port: advertised.map_or(peer_port, |ports| ports[i - 1]),
                dir: tempfile::tempdir()?,
                child: None,
            });
        }
        let token = format!(
            "ha-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut cluster = Self {
            binary,
            token,
            members,
        };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        for i in 0..size {
            cluster.wait_listening(i)?;
        }
        // A member that lost a port race exits at once (see `Etcd::try_start`).
        std::thread::sleep(Duration::from_millis(200));
        for member in &mut cluster.members {
            if let Some(child) = member.child.as_mut() {
                if !matches!(child.try_wait(), Ok(None)) {
                    return Err(StartError::Io(std::io::Error::other(format!(
                        "etcd member {} exited right after start (port taken?)",
                        member.name
                    ))));
                }
            }
        }
        Ok(cluster)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.advertised_peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) -> std::io::Result<()> {
        let initial = self.initial_cluster();
        let member = &self.members[i];
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let advertised = format!("http://127.0.0.1:{}", member.advertised_peer_port);
        // HA_ETCD_LOGS=DIR keeps each member's log (`<token>-<name>.log`) to read what a
        // replayed fault schedule did to the cluster.
        let logs = match std::env::var_os("HA_ETCD_LOGS") {
            Some(dir) => Some(std::fs::OpenOptions::new().create(true).append(true).open(
                std::path::Path::new(&dir).join(format!("{}-{}.log", self.token, member.name)),
            )?),
            None => None,
        };
        let child = Command::new(&self.binary)
            .arg(format!("--name={}", member.name))
            .arg(format!("--data-dir={}", member.dir.path().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={advertised}"))
            .arg(format!("--initial-cluster={initial}"))
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg(format!(
                "--log-level={}",
                if logs.is_some() { "info" } else { "error" }
            ))
            .stdout(Stdio::null())
            .stderr(match logs {
                Some(file) => Stdio::from(file),
                None => Stdio::null(),
            })
            .spawn()?;
        self.members[i].child = Some(child);
        Ok(())
    }

    fn wait_listening(&self, i: usize) -> Result<(), StartError> {
        let endpoint = self.endpoint(i);
        let deadline = Instant::now() + LISTEN_WITHIN;
        while std::net::TcpStream::connect(&endpoint).is_err() {
            if Instant::now() >= deadline {
                return Err(StartError::NotListening {
                    endpoint,
                    within: LISTEN_WITHIN,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Members in the cluster.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Member `i`'s client endpoint (0-based), `127.0.0.1:port`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// The port member `i` listens on for its peers (0-based).
    pub fn peer_port(&self, i: usize) -> u16 {
        self.members[i].peer_port
    }

    /// Every member's client endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s PID, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// The member that leads etcd's Raft now, as the members report it (`etcdctl
    /// endpoint status`, 2 s per member).
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            let status = tokio::process::Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={}", self.endpoint(i)))
                .args(["--command-timeout=2s", "endpoint", "status", "-w", "json"])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .output();
            let Ok(Ok(output)) = tokio::time::timeout(Duration::from_secs(3), status).await else {
                continue;
            };
            if output.status.success() && leads(&output.stdout) {
                return Some(i);
            }
        }
        None
    }

    /// Kills member `i` (SIGKILL) and reaps it; its data dir stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed member again from its data dir. Panics if it does not come back
    /// (a test fixture).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i)
            .unwrap_or_else(|e| panic!("restart etcd member {i}: {e}"));
        if let Err(error) = self.wait_listening(i) {
            panic!("{error}");
        }
    }

    /// Sends a signal (`STOP`, `CONT`) to member `i` by PID.
    pub fn signal(&self, i: usize, signal: &str) {
        if let Some(pid) = self.pid(i) {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Whether `etcdctl endpoint status -w json` says the member it asked is the leader.
fn leads(json: &[u8]) -> bool {
    let Ok(status) = serde_json::from_slice::<serde_json::Value>(json) else {
        return false;
    };
    let status = &status[0]["Status"];
    let (member, leader) = (&status["header"]["member_id"], &status["leader"]);
    member.is_u64() && member == leader
}
