//! Real processes: three `ha node` processes on loopback; the one hosting the Raft
//! leader (and the active's session) is killed with SIGKILL, the group fails over, and the
//! killed node restarts from its data dir and catches up. Every process is stopped by PID.

#![cfg(all(feature = "cli", feature = "raft"))]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ha::raft::RaftClient;
use ha_core::{Backend, ElectionName, LossReason, Member, Role, ServerId, Session};
use ha_testkit::Processes;
use tokio::process::Command;

/// Three `ha node` processes of one test, stopped by PID when it ends (the drop of
/// their `Processes`).
struct Nodes {
    peers: BTreeMap<u64, String>,
    dirs: BTreeMap<u64, tempfile::TempDir>,
    procs: Processes,
}

impl Nodes {
    fn start(n: u64) -> Self {
        let ports = ha_testkit::free_ports(n as usize);
        let peers: BTreeMap<u64, String> = (1..=n)
            .zip(ports)
            .map(|(id, port)| (id, format!("127.0.0.1:{port}")))
            .collect();
        let dirs = (1..=n)
            .map(|id| (id, tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))))
            .collect();
        let mut nodes = Self {
            peers,
            dirs,
            procs: Processes::new(),
        };
        for id in 1..=n {
            nodes.spawn(id);
        }
        nodes
    }

    fn spawn(&mut self, id: u64) {
        let peers = self
            .peers
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut command = Command::new(env!("CARGO_BIN_EXE_ha"));
        command
            .args(["node", "--id", &id.to_string()])
            .args(["--listen", &self.peers[&id], "--peers", &peers])
            .arg("--data")
            .arg(self.dirs[&id].path())
            .args(["--cluster", "process-test", "--json"])
            .env("RUST_LOG", "off");
        self.procs
            .spawn(id, command)
            .unwrap_or_else(|e| panic!("spawn node {id}: {e}"));
    }

    /// SIGKILL, then reap.
    async fn kill(&mut self, id: u64) {
        self.procs.kill(id).await;
    }

    /// The leader a running node last reported (`ha node --json` says
    /// `{"event":"raft_leader","node":N}` when the leader it knows changes), and when,
    /// at or after `since`.
    fn leader_seen(&self, id: u64, since: Instant) -> Option<(Instant, u64)> {
        self.procs.pid(id)?;
        let line = self
            .procs
            .last(id, |l| l.is("raft_leader") && l.seen >= since)?;
        Some((line.seen, line.number("node")?))
    }

    /// Waits until every running node reports the same leader (at or after `since`).
    async fn agreed_leader(&self, since: Instant) -> (Instant, u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let running = self.procs.ids();
            let seen: Vec<Option<(Instant, u64)>> = running
                .iter()
                .map(|id| self.leader_seen(*id, since))
                .collect();
            if let Some(Some((_, leader))) = seen.first() {
                if seen.iter().all(|s| s.map(|(_, l)| l) == Some(*leader))
                    && running.contains(leader)
                {
                    let first = seen
                        .iter()
                        .flatten()
                        .map(|(at, _)| *at)
                        .min()
                        .unwrap_or_else(Instant::now);
                    return (first, *leader);
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among the processes: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn member(id: u64) -> Member {
    Member::new(
        ServerId::new(id),
        Role::new("rootcoord").unwrap_or_else(|e| panic!("{e}")),
        format!("10.0.0.{id}:53100"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_process_hosting_raft_leader_and_active() {
    let started = Instant::now();
    let mut processes = Nodes::start(3);
    let (_, leader) = processes.agreed_leader(started).await;
    let election = ElectionName::new("rootcoord").unwrap_or_else(|e| panic!("{e}"));

    // The active talks only to the leader's process, so it dies with it.
    let active_backend: Arc<dyn Backend> = Arc::new(
        RaftClient::connect([processes.peers[&leader].clone()])
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let others: Vec<String> = processes
        .peers
        .iter()
        .filter(|(id, _)| **id != leader)
        .map(|(_, addr)| addr.clone())
        .collect();
    let standby_backend: Arc<dyn Backend> = Arc::new(
        RaftClient::connect(others)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let active = Session::builder(active_backend, member(1))
        .ttl(Duration::from_secs(2))
        .register()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let standby = Arc::new(
        Session::builder(standby_backend, member(2))
            .ttl(Duration::from_secs(10))
            .register()
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let old = active
        .campaign(&election, "active")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let next = {
        let (standby, election) = (Arc::clone(&standby), election.clone());
        tokio::spawn(async move { standby.campaign(&election, "standby").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!next.is_finished());

    let killed_at = Instant::now();
    processes.kill(leader).await;

    let (new_leader_at, new_leader) = processes.agreed_leader(killed_at).await;
    assert_ne!(new_leader, leader);
    let reason = tokio::time::timeout(Duration::from_secs(10), old.lost())
        .await
        .unwrap_or_else(|_| panic!("the old active never stopped"));
    assert_eq!(reason, LossReason::SelfFenced);
    let took_over = match tokio::time::timeout(Duration::from_secs(20), next).await {
        Ok(Ok(Ok(leadership))) => leadership,
        other => panic!(
            "standby not elected: {:?}",
            other.map(|r| r.map(|l| l.map(|l| l.token())))
        ),
    };
    let gap = killed_at.elapsed();
    assert!(took_over.token() > old.token());
    assert!(
        gap >= Duration::from_secs(2),
        "standby elected {gap:?} after the kill, before the TTL"
    );
    eprintln!(
        "measured (processes, SIGKILL): new raft leader {:?} after the kill; standby ACTIVE {gap:?} after the kill (TTL 2s)",
        new_leader_at - killed_at
    );

    // The killed node restarts from its data dir and serves the current leadership.
    let restarted_at = Instant::now();
    processes.spawn(leader);
    let deadline = Instant::now() + Duration::from_secs(30);
    while processes.leader_seen(leader, restarted_at).map(|(_, l)| l) != Some(new_leader) {
        assert!(
            Instant::now() < deadline,
            "the restarted node never saw leader {new_leader}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rejoined = RaftClient::connect([processes.peers[&leader].clone()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let seen = rejoined
        .leader(&election)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|l| l.token());
    assert_eq!(seen, Some(took_over.token()));
    drop((old, active, took_over));
}

/// kill -9 a random node while a client registers, campaigns and resigns, over and over
/// (`HA_CRASH_ROUNDS`, default 10; 100 by hand). After each restart every acknowledged
/// registration is still a member, no acknowledged resign comes back, and every new
/// token is above every acknowledged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_loses_nothing_acknowledged() {
    use rand::{Rng, SeedableRng};
    let rounds: u64 = std::env::var("HA_CRASH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let started = Instant::now();
    let mut processes = Nodes::start(3);
    processes.agreed_leader(started).await;
    let client: Arc<dyn Backend> = Arc::new(
        RaftClient::connect(processes.peers.values().cloned())
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let role = Role::new("crash").unwrap_or_else(|e| panic!("{e}"));
    let mut sessions: Vec<Session> = Vec::new();
    let mut highest_token = 0u64;
    let mut resigned: Vec<(ElectionName, u64)> = Vec::new();
    let mut next_id = 1u64;
    for round in 0..rounds {
        let victim = rng.random_range(1..=3u64);
        let kill_after = Duration::from_millis(rng.random_range(20..400));
        let traffic_until = Instant::now() + kill_after + Duration::from_millis(300);
        let mut killed = false;
        let mut k = 0;
        while Instant::now() < traffic_until || !killed {
            if !killed && Instant::now() >= traffic_until - Duration::from_millis(300) {
                processes.kill(victim).await;
                killed = true;
            }
            k += 1;
            let member = Member::new(ServerId::new(next_id), role.clone(), "x");
            let registered = tokio::time::timeout(
                Duration::from_secs(3),
                Session::builder(Arc::clone(&client), member)
                    .ttl(Duration::from_secs(60))
                    .register(),
            )
            .await;
            let Ok(Ok(session)) = registered else {
                continue;
            };
            next_id += 1;
            let election =
                ElectionName::new(format!("e{round}-{k}")).unwrap_or_else(|e| panic!("{e}"));
            let won =
                tokio::time::timeout(Duration::from_secs(3), session.campaign(&election, "v"))
                    .await;
            if let Ok(Ok(leadership)) = won {
                let token = leadership.token().get();
                assert!(
                    token > highest_token,
                    "round {round}: token {token} after {highest_token}"
                );
                highest_token = token;
                if leadership.resign().await.is_ok() {
                    resigned.push((election, token));
                }
            }
            sessions.push(session);
        }
        processes.spawn(victim);
        let since = Instant::now();
        processes
            .agreed_leader(since - Duration::from_secs(60))
            .await;

        // Every acknowledged registration whose session still lives is a member.
        let members = tokio::time::timeout(Duration::from_secs(10), client.members(&role))
            .await
            .unwrap_or_else(|_| panic!("members timed out"))
            .unwrap_or_else(|e| panic!("members: {e}"));
        for session in sessions.iter().filter(|s| s.is_valid()) {
            assert!(
                members
                    .iter()
                    .any(|m| m.server_id == session.member().server_id),
                "round {round}: acknowledged member {} is gone after the restart",
                session.member().server_id
            );
        }
        // No acknowledged resign came back.
        for (election, token) in resigned.iter().rev().take(5) {
            if let Ok(Some(leader)) = client.leader(election).await {
                assert_ne!(
                    leader.token().get(),
                    *token,
                    "round {round}: a resigned leadership is back"
                );
            }
        }
    }
    let valid = sessions.iter().filter(|s| s.is_valid()).count();
    eprintln!(
        "crash loop: {rounds} kill -9 rounds, {} acknowledged registrations ({valid} still valid), {} resigns, highest token {highest_token}, in {:?}",
        sessions.len(),
        resigned.len(),
        started.elapsed()
    );
    assert!(valid > 0 && !resigned.is_empty(), "the traffic did nothing");
}
