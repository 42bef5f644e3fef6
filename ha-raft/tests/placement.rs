//! Placement: in a group of three with placement on, a Raft leader whose process hosts
//! an election's ACTIVE hands its leadership to a voter that hosts none, once, and the
//! group then holds still; a crash of the ACTIVE's process leaves the Raft leader
//! alive. A group of two never moves. Margins are generous: these check behaviour, the
//! timings are ha-bench's.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::Group;
use ha_core::{Backend, ElectionName, LeaseId, Member, Role, ServerId};
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};

const TTL: Duration = Duration::from_secs(5);

fn election() -> ElectionName {
    named("placement")
}

fn named(name: &str) -> ElectionName {
    ElectionName::new(name).unwrap_or_else(|e| panic!("{e}"))
}

/// A session of node `id`'s process that campaigns and is kept alive every TTL/5 for
/// at most two minutes; returns its lease and the keepalive task.
async fn campaign_on(group: &Group, id: u64) -> (LeaseId, JoinHandle<()>) {
    campaign_in(group, id, &election()).await
}

/// [`campaign_on`] in `election`.
async fn campaign_in(group: &Group, id: u64, election: &ElectionName) -> (LeaseId, JoinHandle<()>) {
    let backend: Arc<dyn Backend> = group.backend(id);
    let role = Role::new("coord").unwrap_or_else(|e| panic!("{e}"));
    let member = Member::new(ServerId::new(id), role, "x");
    let lease = backend
        .register(&member, TTL)
        .await
        .unwrap_or_else(|e| panic!("register on {id}: {e}"))
        .id;
    backend
        .campaign(lease, election, Bytes::from_static(b"active"))
        .await
        .unwrap_or_else(|e| panic!("campaign on {id}: {e}"));
    let keep = Arc::clone(&backend);
    let task = tokio::spawn(async move {
        for _ in 0..600 {
            sleep(TTL / 5).await;
            if keep.keep_alive(lease).await.is_err() {
                return;
            }
        }
    });
    (lease, task)
}

/// The Raft leader and term, once every running node agrees on them.
async fn leader_and_term(group: &Group) -> (u64, u64) {
    let leader = group.wait_for_leader().await;
    let term = group.nodes[&leader].raft().metrics().borrow().current_term;
    (leader, term)
}

/// Placement moves across the running nodes.
async fn moves(group: &Group) -> u64 {
    let mut moves = 0;
    for node in group.nodes.values() {
        moves += node.status().await.placement_moves;
    }
    moves
}

/// Waits up to 30 s for a Raft leader other than `not`.
async fn leader_other_than(group: &Group, not: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (leader, _) = leader_and_term(group).await;
        if leader != not {
            return leader;
        }
        assert!(
            Instant::now() < deadline,
            "the Raft leader stayed on node {not}, the ACTIVE's, for 30 s"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// Checks for `long` that neither the leader nor its term changes.
async fn holds_still(group: &Group, leader: u64, term: u64, long: Duration) {
    let deadline = Instant::now() + long;
    while Instant::now() < deadline {
        assert_eq!(
            leader_and_term(group).await,
            (leader, term),
            "the Raft leadership moved again"
        );
        sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_moves_off_the_active_once_and_survives_its_crash() {
    let mut group = Group::start_with(3, |config| config.with_placement(true)).await;
    let (first, _) = leader_and_term(&group).await;
    let (_lease, keepalive) = campaign_on(&group, first).await;
    let status = group.nodes[&first].status().await;
    assert_eq!(status.active_here, vec![election().to_string()]);
    assert!(status.placement);

    let moved_to = leader_other_than(&group, first).await;
    let (leader, term) = leader_and_term(&group).await;
    assert_eq!(leader, moved_to);
    assert_eq!(moves(&group).await, 1, "one move");
    // Several leader leases and election timeouts: no move back, no election.
    holds_still(&group, leader, term, Duration::from_secs(4)).await;
    assert_eq!(moves(&group).await, 1, "no churn");
    let status = group.nodes[&leader].status().await;
    assert!(status.active_here.is_empty(), "{status:?}");

    // The ACTIVE's process crashes: the Raft leader lives on, in the same term.
    keepalive.abort();
    group.kill(first).await;
    holds_still(&group, leader, term, Duration::from_secs(3)).await;
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_two_never_moves() {
    let group = Group::start_with(2, |config| config.with_placement(true)).await;
    let (leader, term) = leader_and_term(&group).await;
    let (_lease, keepalive) = campaign_on(&group, leader).await;
    holds_still(&group, leader, term, Duration::from_secs(4)).await;
    assert_eq!(moves(&group).await, 0);
    keepalive.abort();
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_placement_the_leader_stays_with_the_active() {
    let group = Group::start(3).await;
    let (leader, term) = leader_and_term(&group).await;
    let (_lease, keepalive) = campaign_on(&group, leader).await;
    holds_still(&group, leader, term, Duration::from_secs(3)).await;
    assert!(!group.nodes[&leader].status().await.placement);
    keepalive.abort();
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_active_on_every_member_the_leader_stays() {
    let group = Group::start_with(3, |config| config.with_placement(true)).await;
    let mut keepalives = Vec::new();
    for id in 1..=3 {
        let (_lease, task) = campaign_in(&group, id, &named(&format!("own-{id}"))).await;
        keepalives.push(task);
    }
    // Past the leader's settling time (two 0.8 s leases), while every ACTIVE exists.
    sleep(Duration::from_secs(2)).await;
    let (leader, term) = leader_and_term(&group).await;
    let before = moves(&group).await;
    // Every voter refuses: no election is called, however long the leader looks.
    holds_still(&group, leader, term, Duration::from_secs(4)).await;
    assert_eq!(moves(&group).await, before);
    for id in 1..=3 {
        let here = group.nodes[&id].status().await.active_here;
        assert_eq!(here, vec![format!("own-{id}")], "node {id}");
    }
    keepalives.iter().for_each(JoinHandle::abort);
    group.shutdown().await;
}
