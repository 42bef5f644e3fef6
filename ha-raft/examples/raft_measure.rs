//! Measures a 3-node Raft group on loopback with default timings: campaign latency
//! through the leader and through a follower, the time to a new Raft leader after the
//! leader node stops, and the on-disk size after many campaign/resign cycles.
//! A measurement, not a test: it asserts nothing and prints what it saw.
//!
//! Run: `cargo run --release -p ha-raft --example raft_measure -- [cycles]` (default 10000)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ha_core::{Backend, ElectionName, Member, Role, ServerId};
use ha_raft::{RaftNode, RaftNodeConfig};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<44} n={:<5} p50={:>9.3?} p90={:>9.3?} p99={:>9.3?} max={:>9.3?}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or_default()
    );
}

fn dir_size(path: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(_) => continue,
            };
            total += if meta.is_dir() {
                dir_size(&entry.path())
            } else {
                meta.len()
            };
        }
    }
    total
}

struct Cluster {
    peers: BTreeMap<u64, String>,
    dirs: BTreeMap<u64, tempfile::TempDir>,
    nodes: BTreeMap<u64, RaftNode>,
}

impl Cluster {
    async fn start() -> Result<Self, Box<dyn std::error::Error>> {
        let listeners: Vec<_> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let peers: BTreeMap<u64, String> = listeners
            .iter()
            .zip(1..)
            .map(|(l, id)| l.local_addr().map(|a| (id, a.to_string())))
            .collect::<Result<_, _>>()?;
        drop(listeners);
        let mut cluster = Self {
            peers,
            dirs: BTreeMap::new(),
            nodes: BTreeMap::new(),
        };
        for id in 1..=3 {
            cluster.dirs.insert(id, tempfile::tempdir()?);
        }
        let starts: Vec<_> = (1..=3)
            .map(|id| RaftNode::start(cluster.config(id)))
            .collect();
        for (id, node) in (1..=3).zip(futures::future::join_all(starts).await) {
            cluster.nodes.insert(id, node?);
        }
        cluster.agreed_leader(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    fn config(&self, id: u64) -> RaftNodeConfig {
        let listen = self.peers[&id].parse().unwrap_or_else(|e| panic!("{e}"));
        RaftNodeConfig::new(id, listen, self.peers.clone(), self.dirs[&id].path())
    }

    async fn agreed_leader(&self, within: Duration) -> Result<u64, String> {
        let deadline = Instant::now() + within;
        loop {
            let seen: Vec<Option<u64>> = self.nodes.values().map(|n| n.current_leader()).collect();
            if let Some(Some(leader)) = seen.first() {
                if seen.iter().all(|l| *l == Some(*leader)) && self.nodes.contains_key(leader) {
                    return Ok(*leader);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no agreed leader: {seen:?}"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cycles: usize = std::env::args().nth(1).map_or(Ok(10_000), |a| a.parse())?;
    let defaults = RaftNodeConfig::new(0, "127.0.0.1:0".parse()?, BTreeMap::new(), ".");
    println!(
        "3-node raft group on loopback, default timings (heartbeat {:?}, election {:?}-{:?}), {} cores",
        defaults.heartbeat_interval,
        defaults.election_timeout.0,
        defaults.election_timeout.1,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut cluster = Cluster::start().await?;
    let election = ElectionName::new("measure")?;
    let role = Role::new("measure")?;

    // Campaign latency, uncontested, through the leader and through a follower.
    let leader_id = cluster.agreed_leader(Duration::from_secs(10)).await?;
    let follower_id = (1..=3).find(|id| *id != leader_id).unwrap_or(1);
    for (name, id) in [
        ("campaign via leader", leader_id),
        ("campaign via follower", follower_id),
    ] {
        let backend: Arc<dyn Backend> = Arc::new(cluster.nodes[&id].clone());
        let lease = backend
            .register(
                &Member::new(ServerId::new(id), role.clone(), "x"),
                Duration::from_secs(60),
            )
            .await?;
        let mut campaign = Vec::new();
        let mut resign = Vec::new();
        for _ in 0..500 {
            let started = Instant::now();
            let key = backend.campaign(lease.id, &election, "v".into()).await?;
            campaign.push(started.elapsed());
            let started = Instant::now();
            backend.resign(&key).await?;
            resign.push(started.elapsed());
        }
        report(name, campaign);
        report(&name.replace("campaign", "resign"), resign);
        backend.revoke(lease.id).await?;
    }

    // Disk after many campaign/resign cycles (log purged behind snapshots).
    let backend: Arc<dyn Backend> = Arc::new(cluster.nodes[&leader_id].clone());
    let lease = backend
        .register(
            &Member::new(ServerId::new(99), role.clone(), "x"),
            Duration::from_secs(600),
        )
        .await?;
    let started = Instant::now();
    for i in 0..cycles {
        let key = backend
            .campaign(lease.id, &election, format!("cycle-{i}").into())
            .await?;
        backend.resign(&key).await?;
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sizes: Vec<String> = cluster
        .dirs
        .iter()
        .map(|(id, d)| {
            format!(
                "node {id}: {:.2} MiB",
                dir_size(d.path()) as f64 / 1048576.0
            )
        })
        .collect();
    println!(
        "{cycles} campaign/resign cycles in {took:.2?} ({:.0}/s); data dirs: {}",
        cycles as f64 / took.as_secs_f64(),
        sizes.join(", ")
    );
    backend.revoke(lease.id).await?;
    drop(backend);

    // New Raft leader after the leader node stops.
    let mut failovers = Vec::new();
    for _ in 0..5 {
        let old = cluster.agreed_leader(Duration::from_secs(30)).await?;
        let node = cluster.nodes.remove(&old).ok_or("leader vanished")?;
        let stopped = Instant::now();
        node.shutdown().await;
        drop(node);
        cluster.agreed_leader(Duration::from_secs(30)).await?;
        failovers.push(stopped.elapsed());
        let node = RaftNode::start(cluster.config(old)).await?;
        cluster.nodes.insert(old, node);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    report("new raft leader after the leader stops", failovers);
    for node in cluster.nodes.values() {
        node.shutdown().await;
    }
    Ok(())
}
