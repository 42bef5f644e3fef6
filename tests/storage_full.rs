//! A full disk under a Raft member: three `ha node` processes on loopback, node 1 with
//! its data dir on a small tmpfs of its own (`ha_testkit::SmallDisk`) and the shortest
//! election timeout, so that it leads. A writer commits guarded writes through the group
//! while the tmpfs fills. Node 1 must stop with a storage error that says the disk is
//! full (exit 4) instead of going on as a member that cannot write, while the other two
//! go on acknowledging writes. After the space is freed node 1 restarts from the same
//! data dir, catches up, and every acknowledged write is read back with node 1 in the
//! quorum (node 2 stopped). Every process is stopped by PID; the tmpfs goes with its
//! mount namespace. Needs root for the mount namespace; under `CI` its absence fails.

#![cfg(all(feature = "cli", feature = "raft"))]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ha_core::{Backend, ElectionName, Member, Role, ServerId, Session};
use ha_testkit::{small_disk_for_test, Processes, SmallDisk};
use tokio::process::Command;
use tokio::time::{sleep, timeout, Instant};

const HA: &str = env!("CARGO_BIN_EXE_ha");
/// Room for node 1's fresh data dir with some to spare; the filler then leaves only
/// `LEFT` of it.
const DISK: u64 = 96 * 1024 * 1024;
const LEFT: u64 = 3 * 1024 * 1024;
const VALUE: usize = 64 * 1024;
const NODES: u64 = 3;

/// The three `ha node` processes, stopped by PID when the test ends.
struct Group {
    ports: BTreeMap<u64, u16>,
    dirs: BTreeMap<u64, tempfile::TempDir>,
    disk: SmallDisk,
    procs: Processes,
}

impl Group {
    fn peers(&self) -> String {
        self.ports
            .iter()
            .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn url(&self, ids: &[u64]) -> String {
        let endpoints: Vec<String> = ids
            .iter()
            .map(|id| format!("127.0.0.1:{}", self.ports[id]))
            .collect();
        format!("raft://{}", endpoints.join(","))
    }

    fn spawn(&mut self, id: u64) {
        let mut command = if id == 1 {
            let mut command = Command::from(self.disk.command(HA));
            command
                .arg("node")
                .arg("--data")
                .arg(self.disk.mount_point().join("data"))
                // It leads: the others wait five times longer before an election.
                .args(["--election-timeout-ms", "600,1200"]);
            command
        } else {
            let mut command = Command::new(HA);
            command
                .arg("node")
                .arg("--data")
                .arg(self.dirs[&id].path().join("data"))
                .args(["--election-timeout-ms", "3000,6000"]);
            command
        };
        command
            .args(["--id", &id.to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[&id])])
            .args(["--peers", &self.peers()])
            // 64 KiB writes on a busy debug build: room for each RPC.
            .args(["--rpc-timeout-ms", "500"])
            .args(["--cluster", "storage-full", "--insecure", "--json"])
            .env("RUST_LOG", "warn");
        self.procs
            .spawn(id, command)
            .unwrap_or_else(|e| panic!("spawn ha node {id}: {e}"));
    }

    /// The leader node `id` last reported in its current run.
    fn last_leader(&self, id: u64) -> Option<u64> {
        self.procs
            .last(id, |l| l.is("raft_leader"))
            .and_then(|l| l.number("node"))
    }

    /// Waits until every running node last reported `wanted`'s leadership (any leader
    /// among `wanted`).
    async fn wait_for_leader(&self, wanted: &[u64], within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let seen: Vec<Option<u64>> = self
                .procs
                .ids()
                .iter()
                .map(|id| self.last_leader(*id))
                .collect();
            if let Some(Some(leader)) = seen.first() {
                if wanted.contains(leader) && seen.iter().all(|s| *s == Some(*leader)) {
                    return *leader;
                }
            }
            if Instant::now() > deadline {
                let stderr: Vec<String> = self
                    .procs
                    .ids()
                    .iter()
                    .map(|id| self.procs.stderr_tail(*id))
                    .collect();
                panic!(
                    "no agreed leader among {wanted:?} within {within:?}: nodes report {seen:?}; stderr: {stderr:?}"
                );
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, then reap.
    async fn kill(&mut self, id: u64) {
        self.procs.kill(id).await;
    }
}

/// Commits guarded writes, one per call, keeping a session and a leadership across
/// failures; remembers each acknowledged one.
struct Writer {
    backend: Arc<dyn Backend>,
    election: ElectionName,
    held: Option<(Session, ha_core::Leadership)>,
    acked: BTreeMap<String, u8>,
    next: u64,
}

impl Writer {
    async fn new(url: &str) -> Self {
        Self {
            backend: ha::connect(url)
                .await
                .unwrap_or_else(|e| panic!("connect {url}: {e}")),
            election: ElectionName::new("storage-full").unwrap_or_else(|e| panic!("{e}")),
            held: None,
            acked: BTreeMap::new(),
            next: 0,
        }
    }

    /// One attempt: true when the write was acknowledged.
    async fn write(&mut self) -> bool {
        if self.held.as_ref().is_none_or(|(_, l)| !l.is_valid()) {
            self.held = None;
            let member = Member::new(
                ServerId::new(100),
                Role::new("writer").unwrap_or_else(|e| panic!("{e}")),
                "127.0.0.1:1",
            );
            let Ok(session) = Session::builder(Arc::clone(&self.backend), member)
                .ttl(Duration::from_secs(4))
                .register()
                .await
            else {
                return false;
            };
            let Ok(Ok(leadership)) = timeout(
                Duration::from_secs(10),
                session.campaign(&self.election, "writer"),
            )
            .await
            else {
                return false;
            };
            self.held = Some((session, leadership));
        }
        let Some((_, leadership)) = &self.held else {
            return false;
        };
        self.next += 1;
        let key = format!("k{:06}", self.next);
        let fill = (self.next % 251) as u8;
        match timeout(
            Duration::from_secs(10),
            leadership.put(&key, vec![fill; VALUE]),
        )
        .await
        {
            Ok(Ok(())) => {
                self.acked.insert(key, fill);
                true
            }
            _ => false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_disk_fills_stops_and_after_a_restart_nothing_acknowledged_is_lost() {
    let Some(disk) = small_disk_for_test(DISK) else {
        return;
    };
    let ports = (1..=NODES)
        .zip(ha_testkit::free_ports(NODES as usize))
        .collect();
    let dirs = (2..=NODES)
        .map(|id| (id, tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))))
        .collect();
    let mut group = Group {
        ports,
        dirs,
        disk,
        procs: Processes::new(),
    };
    for id in 1..=NODES {
        group.spawn(id);
    }
    // Every voter of a new group calls an election at once, so the first leader is
    // anyone's; node 1, with the short election timeout, wins the next one.
    let mut leader = group
        .wait_for_leader(&[1, 2, 3], Duration::from_secs(30))
        .await;
    for _ in 0..5 {
        if leader == 1 {
            break;
        }
        let killed = leader;
        group.kill(killed).await;
        let others: Vec<u64> = (1..=NODES).filter(|id| *id != killed).collect();
        leader = group
            .wait_for_leader(&others, Duration::from_secs(30))
            .await;
        group.spawn(killed);
        group
            .wait_for_leader(&[leader], Duration::from_secs(30))
            .await;
    }
    assert_eq!(leader, 1, "node 1 never led");
    let mut writer = Writer::new(&group.url(&[1, 2, 3])).await;
    for _ in 0..200 {
        if writer.acked.len() >= 5 {
            break;
        }
        writer.write().await;
    }
    assert!(writer.acked.len() >= 5, "the group acknowledged no writes");

    group.disk.fill(LEFT).unwrap_or_else(|e| panic!("{e}"));
    // Writes go on until node 1 has stopped and 20 more are acknowledged without it.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut exit = None;
    let mut after_exit = 0;
    for _ in 0..5_000 {
        if Instant::now() > deadline || after_exit >= 20 {
            break;
        }
        let acked = writer.write().await;
        if exit.is_none() {
            exit = group.procs.try_exit(1).unwrap_or_else(|e| panic!("{e}"));
        } else if acked {
            after_exit += 1;
        }
    }
    let stderr = group.procs.stderr_tail(1);
    let Some(status) = exit else {
        panic!(
            "node 1 went on running on a full disk ({} bytes free, {} writes acknowledged, leaders reported {:?}); stderr: {stderr}",
            group.disk.free().unwrap_or(0),
            writer.acked.len(),
            (1..=NODES).map(|id| group.last_leader(id)).collect::<Vec<_>>()
        );
    };
    // Its stderr is read to the end once the process is gone.
    sleep(Duration::from_millis(200)).await;
    let stderr = group.procs.stderr_tail(1);
    assert_eq!(
        status.code(),
        Some(4),
        "node 1 exited with {status}; stderr: {stderr}"
    );
    assert!(
        stderr.contains("storage") && stderr.contains("No space left on device"),
        "node 1 did not say its disk is full: {stderr}"
    );
    assert!(
        after_exit >= 20,
        "nodes 2 and 3 acknowledged only {after_exit} writes after node 1 stopped"
    );
    group.kill(1).await;
    let survivor = group
        .wait_for_leader(&[2, 3], Duration::from_secs(30))
        .await;
    eprintln!(
        "node 1 stopped on a full disk; node {survivor} leads; {} writes acknowledged",
        writer.acked.len()
    );

    group.disk.unfill().unwrap_or_else(|e| panic!("{e}"));
    group.spawn(1);
    // Node 1 is back when it reports the group's leader; then node 2 goes, and every
    // read needs node 1.
    let deadline = Instant::now() + Duration::from_secs(30);
    while group.last_leader(1).is_none() {
        assert!(
            Instant::now() < deadline,
            "node 1 did not rejoin after the restart"
        );
        sleep(Duration::from_millis(20)).await;
    }
    // Let it catch up before its help is needed for a quorum.
    sleep(Duration::from_secs(2)).await;
    group.kill(2).await;
    let leader = group
        .wait_for_leader(&[1, 3], Duration::from_secs(30))
        .await;
    eprintln!("node 2 stopped; node {leader} leads nodes 1 and 3");
    let reader: Arc<dyn Backend> = ha::connect(&group.url(&[1, 3]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut missing = Vec::new();
    for (key, fill) in &writer.acked {
        let key_name = ha_core::KvKey::new(key.as_str()).unwrap_or_else(|e| panic!("{e}"));
        let mut read = None;
        for _ in 0..50 {
            match timeout(
                Duration::from_secs(10),
                reader.kv_read(&writer.election, &key_name),
            )
            .await
            {
                Ok(Ok(value)) => {
                    read = Some(value);
                    break;
                }
                _ => sleep(Duration::from_millis(200)).await,
            }
        }
        let Some(value) = read else {
            panic!("no read of {key} answered with nodes 1 and 3");
        };
        if value.as_deref() != Some(&vec![*fill; VALUE][..]) {
            missing.push(key.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "acknowledged writes lost after the restart: {missing:?}"
    );
    for id in [1, 3] {
        group.kill(id).await;
    }
}
