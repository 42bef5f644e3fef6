//! One member of a 3-member backend dies silently under an ACTIVE and a STANDBY that
//! were given every member (issue 28, scenarios 1 and 2): an etcd cluster, and an
//! embedded Raft group of three `ha node` processes reached with `raft://`. The dead
//! member is a proxy in front of its client port that passes nothing either way and
//! serves no new connection, with no RST and no FIN: a host that lost power or its
//! cable. The backend survives a dead minority, so the role must neither stay vacant
//! nor fail over.

#![cfg(feature = "cli")]

#[path = "support/group.rs"]
mod group;
#[path = "support/http.rs"]
mod http;

use std::time::{Duration, Instant};

use ha_testkit::{Direction, Processes, Proxy, Signal};
use tokio::process::Command;
use tokio::time::sleep;

const HA: &str = env!("CARGO_BIN_EXE_ha");

/// The backend's members.
enum Members {
    #[cfg(feature = "etcd")]
    Etcd(ha_testkit::etcd::EtcdCluster),
    Raft(group::Group),
}

impl Members {
    fn endpoints(&self) -> Vec<String> {
        match self {
            #[cfg(feature = "etcd")]
            Self::Etcd(cluster) => cluster.endpoints(),
            Self::Raft(group) => group.addresses.values().cloned().collect(),
        }
    }
}

/// The members, a proxy in front of each member's client port, and the `ha elect`
/// processes.
struct Fixture {
    members: Members,
    proxies: Vec<Proxy>,
    procs: Processes,
    prefix: String,
}

impl Fixture {
    #[cfg(feature = "etcd")]
    async fn etcd(name: &str) -> Option<Self> {
        let cluster = tokio::task::spawn_blocking(|| ha_testkit::etcd::EtcdCluster::start(3))
            .await
            .unwrap_or_else(|e| panic!("{e}"))?;
        Some(Self::with(Members::Etcd(cluster), name).await)
    }

    /// Three `ha node` processes, no coordinators on them.
    async fn raft(name: &str) -> Self {
        let mut group = group::Group::new(3);
        group.bootstrap(&[1, 2, 3], &[]);
        group.leader_known().await;
        Self::with(Members::Raft(group), name).await
    }

    async fn with(members: Members, name: &str) -> Self {
        let proxies = ha_testkit::proxies_to(&members.endpoints())
            .await
            .unwrap_or_else(|e| panic!("proxy: {e}"));
        Self {
            members,
            proxies,
            procs: Processes::new(),
            prefix: format!("{name}-{}", std::process::id()),
        }
    }

    /// The backend URL of every member, directly or through the proxies.
    fn url(&self, through_proxies: bool) -> String {
        let endpoints: Vec<String> = if through_proxies {
            self.proxies.iter().map(|p| p.addr().to_string()).collect()
        } else {
            self.members.endpoints()
        };
        match &self.members {
            #[cfg(feature = "etcd")]
            Members::Etcd(_) => format!("etcd://{}/{}", endpoints.join(","), self.prefix),
            Members::Raft(_) => format!("raft://{}", endpoints.join(",")),
        }
    }

    /// `ha elect rootcoord <value>` as process `id`.
    fn elect(&mut self, id: u64, value: &str, ttl: Duration, through_proxies: bool) {
        self.elect_with_metrics(id, value, ttl, through_proxies, None);
    }

    /// [`elect`](Self::elect), serving `/metrics` on port `metrics` if given.
    fn elect_with_metrics(
        &mut self,
        id: u64,
        value: &str,
        ttl: Duration,
        through_proxies: bool,
        metrics: Option<u16>,
    ) {
        let mut command = Command::new(HA);
        command
            .args([
                "elect",
                "rootcoord",
                value,
                "--json",
                "--print-every-ms",
                "100",
            ])
            .args(["--id", &id.to_string()])
            .args(["--ttl", &ttl.as_secs().to_string()])
            .args(["--backend", &self.url(through_proxies)])
            .env("RUST_LOG", "ha=debug,ha_etcd=debug");
        if let Some(port) = metrics {
            command.args(["--metrics-addr", &format!("127.0.0.1:{port}")]);
        }
        self.procs
            .spawn(id, command)
            .unwrap_or_else(|e| panic!("spawn {value}: {e}"));
    }

    /// What each proxy forwarded in `direction` so far.
    fn forwarded(&self, direction: Direction) -> Vec<u64> {
        self.proxies
            .iter()
            .map(|p| p.traffic(direction).forwarded)
            .collect()
    }

    /// The live proxy that forwards the most in `direction` while `during` runs, and
    /// how much it forwarded.
    async fn busiest(
        &self,
        direction: Direction,
        during: impl std::future::Future,
    ) -> (usize, u64) {
        let before = self.forwarded(direction);
        during.await;
        let after = self.forwarded(direction);
        (0..self.proxies.len())
            .filter(|&i| !self.proxies[i].is_dead())
            .map(|i| (i, after[i] - before[i]))
            .max_by_key(|&(_, bytes)| bytes)
            .unwrap_or((0, 0))
    }

    /// Puts `value` at `key` under this test's prefix, on etcd member 0 directly.
    #[cfg(feature = "etcd")]
    async fn put(&self, key: &str, value: &str) {
        let output = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.members.endpoints()[0]))
            .args(["--command-timeout=5s", "put"])
            .arg(format!("{}/{key}", self.prefix))
            .arg(value)
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(Duration::from_secs(10), output).await {
            Ok(Ok(out)) if out.status.success() => {}
            other => panic!("etcdctl put: {other:?}"),
        }
    }

    /// The member that carries the standby's wait for its turn. On etcd: a large key
    /// put under the election (it queues behind the standby, so it never leads here)
    /// reaches the standby only on that watch. `RaftClient` sends everything to the
    /// endpoint in use, so that is the busiest.
    async fn standby_member(&self, ttl: Duration) -> usize {
        match &self.members {
            #[cfg(feature = "etcd")]
            Members::Etcd(_) => {
                let big = "x".repeat(8 * 1024);
                let probe = async {
                    self.put("election/rootcoord/~probe", &big).await;
                    sleep(Duration::from_millis(500)).await;
                };
                let (member, delivered) = self.busiest(Direction::ToClient, probe).await;
                assert!(delivered > 8 * 1024, "the probe reached B on no watch");
                member
            }
            Members::Raft(_) => {
                let window = sleep(ttl / 3 + Duration::from_millis(700));
                self.busiest(Direction::ToServer, window).await.0
            }
        }
    }

    async fn stop(mut self) {
        self.procs.stop_all(Duration::from_secs(10)).await;
        if let Members::Raft(group) = &mut self.members {
            group.procs.stop_all(Duration::from_secs(10)).await;
        }
    }
}

/// Scenario 1: the member carrying the STANDBY's wait for its turn dies; a second later
/// the ACTIVE resigns. The standby's session lives on through the other members, so
/// only the wait can miss the resign, and it must not: the standby takes over within
/// TTL/3 of the resign (asserted with a TTL of margin).
async fn a_standby_whose_member_died_takes_over(mut f: Fixture) {
    let ttl = Duration::from_secs(6);
    f.elect(1, "A", ttl, false);
    f.procs
        .expect("A elected", Duration::from_secs(30), |l| {
            l.from == 1 && l.is("elected")
        })
        .await;
    f.elect(2, "B", ttl, true);
    f.procs
        .expect("B registered", Duration::from_secs(30), |l| {
            l.from == 2 && l.is("registered")
        })
        .await;
    // B settles into its wait on one member.
    sleep(Duration::from_secs(2)).await;
    let member = f.standby_member(ttl).await;

    f.proxies[member].die();
    sleep(Duration::from_secs(1)).await;
    let resigned_at = Instant::now();
    f.procs
        .signal(1, Signal::TERM)
        .unwrap_or_else(|e| panic!("{e}"));
    let wait = f
        .procs
        .wait_for("B elected", Duration::from_secs(30), |l| {
            l.from == 2 && l.is("elected")
        })
        .await;
    let took = resigned_at.elapsed();
    if let Err(error) = wait {
        panic!("B was not elected within 30 s of A's resign with member {member} dead:\n{error}");
    }
    eprintln!("B took over {took:?} after the resign, member {member} dead");
    assert!(
        took <= ttl,
        "B took over {took:?} after the resign (bound TTL/3 = {:?})",
        ttl / 3
    );
    f.stop().await;
}

/// Scenario 2: the member carrying the ACTIVE's keepalives dies. Two members live, so
/// the ACTIVE must keep its role: no loss, and the standby never elected, for two TTLs
/// after each cut. Three cuts, one member at a time (the last revived first), each on
/// the member the ACTIVE uses then.
async fn an_active_whose_member_died_keeps_its_role(mut f: Fixture) {
    let ttl = Duration::from_secs(4);
    let metrics = ha_testkit::free_port();
    f.elect_with_metrics(1, "A", ttl, true, Some(metrics));
    let token = f
        .procs
        .expect("A elected", Duration::from_secs(30), |l| {
            l.from == 1 && l.is("elected")
        })
        .await
        .token();
    f.elect(2, "B", ttl, false);
    f.procs
        .expect("B registered", Duration::from_secs(30), |l| {
            l.from == 2 && l.is("registered")
        })
        .await;
    let mut dead: Option<usize> = None;
    for cut in 1..=3 {
        // A's keepalives (every TTL/3) are the only requests it sends while it leads.
        let (member, _) = f
            .busiest(
                Direction::ToServer,
                sleep(ttl / 3 + Duration::from_millis(700)),
            )
            .await;
        if let Some(previous) = dead.take() {
            f.proxies[previous].revive();
        }
        f.proxies[member].die();
        dead = Some(member);
        let failover = f
            .procs
            .wait_for("A lost or B elected", ttl * 2, |l| {
                (l.from == 1 && l.is("lost")) || (l.from == 2 && l.is("elected"))
            })
            .await;
        if let Ok(line) = failover {
            panic!(
                "cut {cut} (member {member} dead): a needless failover: {}\nA's stderr:\n{}",
                line.text,
                f.procs.stderr_tail(1)
            );
        }
        let leading = f.procs.last(1, |l| l.is("leading"));
        assert!(
            leading.is_some_and(|l| l.seen.elapsed() < Duration::from_secs(1)),
            "cut {cut}: A stopped saying it leads"
        );
    }
    // What warns before a loss, on A's /metrics: the token it leads with, the time left
    // before it would fence itself, and the endpoints it left and moved to.
    let text = http::http_get(metrics, "/metrics").await.1;
    let role = r#"role="rootcoord""#;
    let value = |metric: &str, labels: &[&str]| {
        http::sample(&text, metric, labels)
            .unwrap_or_else(|| panic!("no {metric} {labels:?} in /metrics:\n{text}"))
    };
    assert_eq!(value("ha_fencing_token", &[role]), token as f64);
    let left = value("ha_self_fence_seconds_left", &[role]);
    assert!(left > 0.0 && left <= ttl.as_secs_f64(), "{left} s left");
    assert!(value("ha_keepalive_failures_total", &[role]) >= 0.0);
    assert!(value("ha_backend_endpoint_failures_total", &[]) >= 1.0);
    assert!(value("ha_backend_reconnects_total", &[]) >= 1.0);
    f.stop().await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_standby_whose_member_died_takes_over_when_the_active_resigns() {
    if let Some(f) = Fixture::etcd("dead-standby-member").await {
        a_standby_whose_member_died_takes_over(f).await;
    }
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_an_active_whose_member_died_keeps_its_role() {
    if let Some(f) = Fixture::etcd("dead-active-member").await {
        an_active_whose_member_died_keeps_its_role(f).await;
    }
}

#[cfg(feature = "raft")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_a_standby_whose_member_died_takes_over_when_the_active_resigns() {
    a_standby_whose_member_died_takes_over(Fixture::raft("dead-standby-member").await).await;
}

#[cfg(feature = "raft")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_an_active_whose_member_died_keeps_its_role() {
    an_active_whose_member_died_keeps_its_role(Fixture::raft("dead-active-member").await).await;
}
