//! A leader stopped on purpose hands its leadership to a caught-up voter: the group has
//! a new leader sooner than any follower's own election could give one (the leader
//! lease plus the shortest election timeout after the last heartbeat). A stop that
//! stands for a crash hands nothing over, and the followers elect on their own.

mod common;

use std::time::Duration;

use common::Group;
use tokio::time::Instant;

/// The soonest a follower elects on its own after the leader's last heartbeat: its
/// lease (the longest election timeout) plus the shortest election timeout.
const UNAIDED: Duration = Duration::from_millis(800 + 400);

/// Waits for a leader among `group`'s running nodes other than `old`; returns it and
/// its term.
async fn next_leader(group: &Group, old: u64) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for node in group.nodes.values() {
            let metrics = node.raft().metrics().borrow().clone();
            if metrics.state.is_leader() && metrics.id != old {
                return (metrics.id, metrics.current_term);
            }
        }
        assert!(Instant::now() < deadline, "no new leader within 30 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A leader that has led for over a second (longer than its 0.8 s lease: only then does
/// it grant its vote), and its term.
async fn settled_leader(group: &Group) -> (u64, u64) {
    for _ in 0..20 {
        let leader = group.wait_for_leader().await;
        let term = group.nodes[&leader].raft().metrics().borrow().current_term;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = group.wait_for_leader().await;
        if now == leader && group.nodes[&now].raft().metrics().borrow().current_term == term {
            return (leader, term);
        }
    }
    panic!("the leader kept changing for 20 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stops_hands_leadership_over_at_once() {
    let mut group = Group::start(3).await;
    for round in 0..3 {
        let (old, term) = settled_leader(&group).await;
        let node = group
            .nodes
            .remove(&old)
            .unwrap_or_else(|| panic!("no node {old}"));
        let stopped = Instant::now();
        let stop = tokio::spawn(async move { node.shutdown().await });
        let (new, new_term) = next_leader(&group, old).await;
        let gap = stopped.elapsed();
        stop.await.unwrap_or_else(|e| panic!("shutdown: {e}"));
        assert_eq!(new_term, term + 1, "round {round}: one election, at once");
        assert!(
            gap < UNAIDED,
            "round {round}: node {new} led {gap:?} after node {old} stopped; without a \
             handover no follower can lead before {UNAIDED:?}"
        );
        group.restart(old).await;
    }
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_standing_for_a_crash_hands_nothing_over() {
    let mut group = Group::start(3).await;
    let (old, _) = settled_leader(&group).await;
    let stopped = Instant::now();
    group.kill(old).await;
    let (_, _) = next_leader(&group, old).await;
    // The followers waited out their lease: the crash path is untouched.
    assert!(
        stopped.elapsed() >= Duration::from_millis(400),
        "a new leader {:?} after a crash-like stop",
        stopped.elapsed()
    );
    group.shutdown().await;
}
