//! A Raft group of real nodes on 127.0.0.1 with real sled dirs, for tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ha_core::Backend;
use ha_raft::testing::{open_db, Identity, LogStore};
use ha_raft::{FaultInjector, RaftNode, RaftNodeConfig, TypeConfig};
use openraft::storage::RaftLogStorage;
use openraft::{Entry, RaftLogReader};

/// Logs to stderr when `RUST_LOG` is set (for debugging a failing test).
pub fn init_tracing() {
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

pub use ha_testkit::free_ports;

/// Timings for tests: quick elections, generous request timeouts.
pub fn test_config(
    id: u64,
    peers: &BTreeMap<u64, String>,
    dir: &std::path::Path,
) -> RaftNodeConfig {
    let listen = peers[&id].parse().unwrap_or_else(|e| panic!("{e}"));
    RaftNodeConfig::new(id, listen, peers.clone(), dir)
        .with_cluster_id("test-cluster")
        .with_timing(
            Duration::from_millis(100),
            (Duration::from_millis(400), Duration::from_millis(800)),
        )
        .with_request_timeout(Duration::from_secs(5))
}

/// The database of a stopped node's data dir.
pub async fn open_node_db(dir: &std::path::Path, cluster: &str, node: u64) -> sled::Db {
    let identity = Identity {
        cluster_id: cluster.to_owned(),
        node_id: node,
    };
    open_db(dir, &identity, 1 << 20)
        .await
        .unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
}

/// Every entry of a stopped node's log, in order.
pub async fn log_entries(
    dir: &std::path::Path,
    cluster: &str,
    node: u64,
) -> Vec<Entry<TypeConfig>> {
    let db = open_node_db(dir, cluster, node).await;
    let mut logs = LogStore::new(&db).unwrap_or_else(|e| panic!("{e}"));
    let mut reader = logs.get_log_reader().await;
    reader
        .try_get_log_entries(0..u64::MAX)
        .await
        .unwrap_or_else(|e| panic!("read the log: {e}"))
}

/// A change to every node's configuration.
pub type Tweak = Arc<dyn Fn(RaftNodeConfig) -> RaftNodeConfig + Send + Sync>;

/// A group of nodes; dropping it stops them in the background.
pub struct Group {
    pub peers: BTreeMap<u64, String>,
    pub nodes: BTreeMap<u64, RaftNode>,
    pub dirs: BTreeMap<u64, tempfile::TempDir>,
    pub faults: Arc<FaultInjector>,
    /// Applied to every node's configuration, at start and restart.
    tweak: Tweak,
}

impl Group {
    /// Starts `n` voters (ids 1..=n) and waits for a leader.
    pub async fn start(n: u64) -> Self {
        Self::start_with(n, |config| config).await
    }

    /// [`start`](Self::start) with each node's configuration passed through `tweak`.
    pub async fn start_with(
        n: u64,
        tweak: impl Fn(RaftNodeConfig) -> RaftNodeConfig + Send + Sync + 'static,
    ) -> Self {
        let tweak: Tweak = Arc::new(tweak);
        init_tracing();
        // Groups started at once in one process must not pick the same free ports (a
        // port is free again between `free_ports` and the node binding it): start one
        // group at a time.
        static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one_at_a_time = STARTING.lock().await;
        let ports = free_ports(n as usize);
        let peers: BTreeMap<u64, String> = (1..=n)
            .zip(ports)
            .map(|(id, port)| (id, format!("127.0.0.1:{port}")))
            .collect();
        let faults = FaultInjector::new();
        let mut group = Self {
            peers,
            nodes: BTreeMap::new(),
            dirs: BTreeMap::new(),
            faults,
            tweak,
        };
        for id in 1..=n {
            group
                .dirs
                .insert(id, tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")));
        }
        let starts: Vec<_> = (1..=n).map(|id| group.start_node(id)).collect();
        for (id, node) in futures::future::join_all(starts).await {
            group.nodes.insert(id, node);
        }
        group.wait_for_leader().await;
        group
    }

    fn start_node(&self, id: u64) -> impl std::future::Future<Output = (u64, RaftNode)> {
        let config = (self.tweak)(
            test_config(id, &self.peers, self.dirs[&id].path())
                .with_faults(Arc::clone(&self.faults)),
        );
        async move {
            let node = RaftNode::start(config)
                .await
                .unwrap_or_else(|e| panic!("start node {id}: {e}"));
            (id, node)
        }
    }

    /// Waits until every running node agrees on a leader; returns its id.
    pub async fn wait_for_leader(&self) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let leaders: Vec<Option<u64>> =
                self.nodes.values().map(|n| n.current_leader()).collect();
            if let Some(Some(leader)) = leaders.first() {
                if leaders.iter().all(|l| *l == Some(*leader)) && self.nodes.contains_key(leader) {
                    return *leader;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no agreed leader: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn leader(&self) -> RaftNode {
        let id = self.wait_for_leader().await;
        self.nodes[&id].clone()
    }

    pub async fn follower(&self) -> RaftNode {
        let leader = self.wait_for_leader().await;
        self.nodes
            .iter()
            .find(|(id, _)| **id != leader)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| panic!("no follower"))
    }

    pub fn backend(&self, id: u64) -> Arc<dyn Backend> {
        Arc::new(self.nodes[&id].clone())
    }

    /// Stops a node as abruptly as this process allows (its data dir stays): a leader
    /// hands no leadership over.
    pub async fn kill(&mut self, id: u64) {
        if let Some(node) = self.nodes.remove(&id) {
            node.shutdown_without_transfer().await;
        }
    }

    /// Starts a stopped node again from its data dir.
    pub async fn restart(&mut self, id: u64) {
        let (id, node) = self.start_node(id).await;
        self.nodes.insert(id, node);
    }

    pub async fn shutdown(mut self) {
        let nodes = std::mem::take(&mut self.nodes);
        for node in nodes.values() {
            node.shutdown().await;
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let nodes = std::mem::take(&mut self.nodes);
        let dirs = std::mem::take(&mut self.dirs);
        if nodes.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for node in nodes.values() {
                    node.shutdown().await;
                }
                drop(dirs);
            });
        }
    }
}
