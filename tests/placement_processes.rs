//! Placement between real processes: three `ha node --active-standby` members on
//! loopback (placement is on by default). The Raft leader moves off the ACTIVE's
//! process; a SIGKILL of that process then leaves the Raft leader alive (no survivor
//! reports another), and a rolling restart (SIGTERM, start again, one member after
//! another) loses no role and hands the role over at most once per restarted ACTIVE.
//! Margins are generous; the timings are ha-bench's. Every process is stopped by PID.

#![cfg(all(feature = "cli", feature = "raft"))]

#[path = "support/members.rs"]
mod members;

use std::time::Duration;

use members::{status, Members, NODES};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_of_the_active_process_leaves_the_raft_leader_alive() {
    let mut members = Members::start();
    let (active, leader) = members.placed().await;
    // `ha status` says where the ACTIVE is, and that the leader's member has none.
    let (text, json) = status(&members).await;
    assert!(
        text.contains("placement: on; no ACTIVE on the Raft leader's member"),
        "{text}"
    );
    let listed = json["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 3, "{json}");
    for member in &listed {
        let id = member["id"].as_u64();
        let here = member["status"]["active_here"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(
            here,
            usize::from(id == Some(active)),
            "node {id:?}: {member}"
        );
        assert_eq!(member["status"]["placement"], true, "{member}");
    }
    assert_ne!(active, leader);
    for round in 0..3 {
        let (active, leader) = members.placed().await;
        let elected = members.elected;
        members.procs.kill(active).await;
        members
            .until("new ACTIVE", Duration::from_secs(20), |m| {
                m.elected > elected
            })
            .await;
        // Up to the new election nobody saw another Raft leader: it did not die.
        let unchanged = |members: &Members| {
            members
                .leader_seen
                .iter()
                .filter(|(id, _)| **id != active)
                .all(|(_, seen)| *seen == leader)
        };
        assert!(
            unchanged(&members),
            "round {round}: the Raft leader changed after the crash of node {active}: {:?}",
            members.leader_seen
        );
        members.watch(Duration::from_secs(1)).await;
        // Afterwards it moves only off a new ACTIVE elected on its member.
        let new_active = members.active;
        assert!(
            unchanged(&members) || new_active == Some(leader),
            "round {round}: the Raft leader moved without an ACTIVE on it: {:?}, ACTIVE {new_active:?}",
            members.leader_seen
        );
        members.spawn(active);
    }
    assert!(members.lost.is_empty(), "roles lost: {:?}", members.lost);
    members.procs.stop_all(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_hands_over_once_per_active_and_loses_nothing() {
    let mut members = Members::start();
    members.placed().await;
    let elected = members.elected;
    let mut restarted_actives = 0;
    for id in NODES {
        restarted_actives += usize::from(members.restart(id).await);
        members.watch(Duration::from_secs(2)).await;
    }
    members.placed().await;
    members.check_handovers(elected, restarted_actives);
    members.procs.stop_all(Duration::from_secs(5)).await;
}
