//! A group whose links are slow (a WAN, a cellular uplink): every byte between members,
//! and between clients and members, crosses a real TCP proxy (`ha_testkit::Proxy`) that
//! delays it, so each round trip costs the configured RTT on top of loopback. Sessions
//! with TTL 3 s must keep their leadership, the Raft leader must keep its term, and
//! failover to a standby must still work.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ha_core::{Backend, ElectionName, Session};
use ha_raft::{RaftClient, RaftNode, RaftNodeConfig};
use ha_testkit::{Fault, Proxy};
use tokio::time::{sleep, timeout, Instant};

struct SlowGroup {
    rtt: Duration,
    nodes: BTreeMap<u64, RaftNode>,
    /// Each member's own address, behind its proxy.
    listen: BTreeMap<u64, std::net::SocketAddr>,
    /// Each member's slow link; dropping one would close its connections.
    _links: BTreeMap<u64, Proxy>,
    _dirs: Vec<tempfile::TempDir>,
}

impl SlowGroup {
    /// Three members; member `i` listens on a loopback port and is reached by peers and
    /// clients only through its proxy, which delays each direction by `rtt / 2`.
    async fn start(rtt: Duration, timing: impl Fn(RaftNodeConfig) -> RaftNodeConfig) -> Self {
        common::init_tracing();
        let ports = common::free_ports(3);
        let mut proxies = BTreeMap::new();
        let mut listen = BTreeMap::new();
        for (id, port) in (1..=3).zip(&ports) {
            let upstream: std::net::SocketAddr = format!("127.0.0.1:{port}")
                .parse()
                .unwrap_or_else(|e| panic!("{e}"));
            listen.insert(id, upstream);
            let proxy = Proxy::start(upstream)
                .await
                .unwrap_or_else(|e| panic!("proxy: {e}"));
            proxy.set_both(Fault::Delay(rtt / 2));
            proxies.insert(id, proxy);
        }
        let peers: BTreeMap<u64, String> = proxies
            .iter()
            .map(|(id, proxy)| (*id, proxy.addr().to_string()))
            .collect();
        let mut dirs = Vec::new();
        let mut starts = Vec::new();
        for (id, port) in (1..=3).zip(&ports) {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let listen = format!("127.0.0.1:{port}")
                .parse()
                .unwrap_or_else(|e| panic!("{e}"));
            let config = timing(
                RaftNodeConfig::new(id, listen, peers.clone(), dir.path())
                    .with_cluster_id("slow-links")
                    .with_advertise(peers[&id].clone())
                    .with_request_timeout(Duration::from_secs(5)),
            );
            dirs.push(dir);
            starts.push(async move {
                (
                    id,
                    RaftNode::start(config)
                        .await
                        .unwrap_or_else(|e| panic!("start node {id}: {e}")),
                )
            });
        }
        let nodes = futures::future::join_all(starts)
            .await
            .into_iter()
            .collect();
        let group = Self {
            rtt,
            nodes,
            listen,
            _links: proxies,
            _dirs: dirs,
        };
        group.wait_for_leader(Duration::from_secs(30)).await;
        group
    }

    async fn wait_for_leader(&self, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let leaders: Vec<Option<u64>> =
                self.nodes.values().map(|n| n.current_leader()).collect();
            if let Some(Some(leader)) = leaders.first() {
                if leaders.iter().all(|l| *l == Some(*leader)) {
                    return *leader;
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
            sleep(Duration::from_millis(20)).await;
        }
    }

    fn term(&self, id: u64) -> u64 {
        self.nodes[&id].raft().metrics().borrow().current_term
    }

    async fn shutdown(self) {
        for node in self.nodes.values() {
            node.shutdown().await;
        }
    }
}

fn election() -> ElectionName {
    ElectionName::new("slow").unwrap_or_else(|e| panic!("{e}"))
}

/// A leading session through a `raft://` client holds its role for `hold`; then a
/// standby on another member takes over when the leader's member is cut off. Checks the
/// Raft term did not move while the links were merely slow.
async fn hold_and_fail_over(group: SlowGroup, hold: Duration) {
    let ttl = Duration::from_secs(3);
    let raft_leader = group.wait_for_leader(Duration::from_secs(10)).await;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != raft_leader).collect();
    let (a_node, b_node) = (followers[0], followers[1]);
    let term = group.term(raft_leader);

    // The client has a slow link of its own to its member, so cutting it stands for
    // the client's host dying without touching the group's links.
    let client_link = Proxy::start(group.listen[&a_node])
        .await
        .unwrap_or_else(|e| panic!("proxy: {e}"));
    client_link.set_both(Fault::Delay(group.rtt / 2));
    let client = timeout(
        Duration::from_secs(20),
        RaftClient::connect([client_link.addr().to_string()]),
    )
    .await
    .unwrap_or_else(|_| panic!("the client did not connect within 20 s"))
    .unwrap_or_else(|e| panic!("connect: {e}"));
    let a = Session::builder(Arc::new(client), ha_core::testing::test_member(1))
        .ttl(ttl)
        .register()
        .await
        .unwrap_or_else(|e| panic!("register a: {e}"));
    let leading = a
        .campaign(&election(), "a")
        .await
        .unwrap_or_else(|e| panic!("campaign a: {e}"));
    let b_backend: Arc<dyn Backend> = Arc::new(group.nodes[&b_node].clone());
    let b = Session::builder(b_backend, ha_core::testing::test_member(2))
        .ttl(ttl)
        .register()
        .await
        .unwrap_or_else(|e| panic!("register b: {e}"));
    let standby = {
        let b = Arc::new(b);
        let waiting = Arc::clone(&b);
        (
            b,
            tokio::spawn(async move { waiting.campaign(&election(), "b").await }),
        )
    };

    let held_since = Instant::now();
    while held_since.elapsed() < hold {
        assert!(
            leading.is_valid(),
            "the leadership was lost after {:?} on merely slow links: {:?}",
            held_since.elapsed(),
            leading.loss_reason()
        );
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        group.term(raft_leader),
        term,
        "the Raft term moved while the links were merely slow (elections churned)"
    );
    assert_eq!(
        group.wait_for_leader(Duration::from_secs(1)).await,
        raft_leader
    );

    // Cut the client off: its keepalives stop, the lease expires on the Raft leader,
    // and the standby is elected, after the old leader stopped.
    client_link.set_both(Fault::Drop);
    let cut = Instant::now();
    let (b, waiting) = standby;
    let next = timeout(ttl * 4, waiting)
        .await
        .unwrap_or_else(|_| panic!("no failover within {:?}", ttl * 4))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("campaign b: {e}"));
    assert!(
        !leading.is_valid(),
        "the old leader was still valid when the standby was elected"
    );
    assert!(next.token() > leading.token());
    eprintln!("failover {:?} after the cut (TTL {ttl:?})", cut.elapsed());
    drop(next);
    drop(b);
    drop(a);
    drop(client_link);
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_70ms_rtt_with_the_default_heartbeat_and_a_longer_election_timeout_leaders_hold() {
    // The heartbeat stays at its default; only the election timeout is raised, as an
    // operator who read "raise the election timeout on slow links" would.
    let group = SlowGroup::start(Duration::from_millis(70), |config| {
        config.with_timing(
            Duration::from_millis(50),
            (Duration::from_millis(600), Duration::from_millis(1200)),
        )
    })
    .await;
    hold_and_fail_over(group, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_200ms_rtt_tuned_for_it_leaders_hold() {
    let rtt = Duration::from_millis(200);
    let group = SlowGroup::start(rtt, move |config| config.with_timing_for_rtt(rtt)).await;
    hold_and_fail_over(group, Duration::from_secs(10)).await;
}
