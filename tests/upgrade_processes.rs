//! A rolling upgrade between real processes, without a second release: three `ha node
//! --active-standby` members start at feature level 2 (`--feature-level`, hidden, stands
//! for ha 0.1.0) and are restarted one after another at this version's level while
//! their coordinators renew. `ha status` shows each member's level and the group's; the
//! level is recorded once every member serves it, no role is lost on the way, and a
//! member restarted below the recorded level afterwards (a rollback) exits 7.

#![cfg(all(feature = "cli", feature = "raft"))]

#[path = "support/members.rs"]
mod members;

use std::collections::BTreeMap;
use std::time::Duration;

use ha_testkit::Signal;
use members::{status, Members, NODES};
use tokio::process::Command;
use tokio::time::Instant;

const OLD_LEVEL: u32 = 2;

/// Each member's LEVEL column, the lowest group level a member applied, and the
/// feature level line of `ha status` (and all its text).
async fn levels(members: &Members) -> (BTreeMap<u64, u64>, u64, String, String) {
    let (text, json) = status(members).await;
    let listed = json["members"].as_array().cloned().unwrap_or_default();
    let levels = listed
        .iter()
        .filter_map(|m| Some((m["id"].as_u64()?, m["status"]["feature_level"].as_u64()?)))
        .collect();
    let applied = listed
        .iter()
        .map(|m| m["status"]["group_level"].as_u64().unwrap_or(0))
        .min()
        .unwrap_or(0);
    let line = text
        .lines()
        .find(|line| line.starts_with("feature level:"))
        .unwrap_or_default()
        .to_owned();
    (levels, applied, line, text)
}

/// Waits (bounded) until `ha status` shows `line` and `expected` levels, and every
/// member applied group level `applied` or more.
async fn until_status(
    members: &mut Members,
    expected: &BTreeMap<u64, u64>,
    applied: u64,
    line: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (seen, seen_applied, seen_line, text) = levels(members).await;
        if seen == *expected && seen_applied >= applied && seen_line == line {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ha status never showed {expected:?} and {line:?}:\n{text}"
        );
        members.watch(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_keeps_the_role_and_records_the_level_once_every_member_serves_it() {
    let current = u64::from(ha::raft::FEATURE_LEVEL);
    let old = BTreeMap::from(NODES.map(|id| (id, OLD_LEVEL)));
    let mut members = Members::start_at(old.clone());
    members.placed().await;
    let mut expected: BTreeMap<u64, u64> = NODES.map(|id| (id, u64::from(OLD_LEVEL))).into();
    until_status(
        &mut members,
        &expected,
        0,
        "feature level: written at 2, none recorded; members serve 2 to 2; raised once every member serves it",
    )
    .await;
    let elected = members.elected;
    let mut restarted_actives = 0;
    for id in NODES {
        members.placed().await;
        if members.active == Some(id) {
            restarted_actives += 1;
        }
        members
            .procs
            .signal(id, Signal::TERM)
            .unwrap_or_else(|e| panic!("SIGTERM {id}: {e}"));
        members
            .procs
            .wait_exit(id, Duration::from_secs(15))
            .await
            .unwrap_or_else(|e| panic!("node {id} did not stop: {e}"));
        members.levels.remove(&id);
        members.spawn(id);
        members
            .until(
                "the upgraded member's leader",
                Duration::from_secs(30),
                |m| m.leader_seen.contains_key(&id),
            )
            .await;
        expected.insert(id, current);
        let (applied, line) = if id == NODES[NODES.len() - 1] {
            (
                current,
                format!("feature level: {current} (recorded in the log)"),
            )
        } else {
            (0, format!(
                "feature level: written at 2, none recorded; members serve 2 to {current}; raised once every member serves it"
            ))
        };
        until_status(&mut members, &expected, applied, &line).await;
    }
    members.placed().await;
    assert!(members.lost.is_empty(), "roles lost: {:?}", members.lost);
    let handovers = members.elected - elected;
    assert!(
        handovers <= restarted_actives,
        "{handovers} handovers for {restarted_actives} restarted ACTIVEs"
    );

    // A rollback of one member below the recorded level is refused; it starts again
    // at the current level.
    let (active, _) = members.placed().await;
    let id = NODES.into_iter().find(|id| *id != active).unwrap_or(1);
    members
        .procs
        .signal(id, Signal::TERM)
        .unwrap_or_else(|e| panic!("SIGTERM {id}: {e}"));
    members
        .procs
        .wait_exit(id, Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("node {id} did not stop: {e}"));
    let peers: Vec<String> = members
        .peers
        .iter()
        .map(|(id, addr)| format!("{id}={addr}"))
        .collect();
    let mut rollback = Command::new(env!("CARGO_BIN_EXE_ha"));
    rollback
        .args(["node", "--id", &id.to_string()])
        .args(["--listen", &members.peers[&id], "--peers", &peers.join(",")])
        .arg("--data")
        .arg(members.dirs[&id].path())
        .args(["--cluster", "placement-test", "--feature-level", "2"])
        .env("RUST_LOG", "off")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(30), rollback.output())
        .await
        .unwrap_or_else(|_| panic!("the rolled-back node hung"))
        .unwrap_or_else(|e| panic!("ha node: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains("feature level"), "{stderr}");
    members.spawn(id);
    until_status(
        &mut members,
        &NODES.map(|id| (id, current)).into(),
        current,
        &format!("feature level: {current} (recorded in the log)"),
    )
    .await;
    assert!(members.lost.is_empty(), "roles lost: {:?}", members.lost);
    members.procs.stop_all(Duration::from_secs(5)).await;
}
