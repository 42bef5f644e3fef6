//! A rolling upgrade between real processes, without a second release: three `ha node
//! --active-standby` members start at feature level 2 (`--feature-level`, hidden, stands
//! for ha 0.1.0) and are restarted one after another at this version's level while
//! their coordinators renew. `ha status` shows each member's level and the group's; the
//! level is recorded once every member serves it, no role is lost on the way, and a
//! member restarted below the recorded level afterwards (a rollback) exits 7. An ignored
//! test runs the same upgrade from a real older release's binary (`HA_OLD_BINARY`).

#![cfg(all(feature = "cli", feature = "raft"))]

#[path = "support/members.rs"]
mod members;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::join_all;
use ha::raft::RaftClient;
use ha::{Backend, Member, Role, ServerId};
use members::{status, Members, NODES};
use tokio::time::{sleep, Instant};

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
    line: Option<&str>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (seen, seen_applied, seen_line, text) = levels(members).await;
        if seen == *expected && seen_applied >= applied && line.is_none_or(|l| seen_line == l) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ha status never showed {expected:?} and {line:?}:\n{text}"
        );
        members.watch(Duration::from_millis(300)).await;
    }
}

/// Sessions registered through a `RaftClient` while the group is upgraded, 8 at once
/// every 50 ms (bounded), so the leader batches; the ids of those acknowledged.
struct Load {
    task: tokio::task::JoinHandle<()>,
    acked: Arc<Mutex<BTreeSet<u64>>>,
    client: Arc<RaftClient>,
}

const LOAD_ROLE: &str = "load";

impl Load {
    async fn start(members: &Members) -> Self {
        let client = RaftClient::connect(members.peers.values().cloned())
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        let client = Arc::new(client);
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let role = Role::new(LOAD_ROLE).unwrap_or_else(|e| panic!("{e}"));
        let task = tokio::spawn({
            let (client, acked) = (Arc::clone(&client), Arc::clone(&acked));
            async move {
                for round in 0..2_000u64 {
                    let registers = (0..8).map(|i| {
                        let id = round * 8 + i;
                        let member = Member::new(ServerId::new(id), role.clone(), "l:1");
                        let client = Arc::clone(&client);
                        async move {
                            // Long enough to outlive the test; nothing renews them.
                            let ttl = Duration::from_secs(300);
                            client.register(&member, ttl).await.map(|_| id)
                        }
                    });
                    for id in join_all(registers).await.into_iter().flatten() {
                        acked
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(id);
                    }
                    sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Self {
            task,
            acked,
            client,
        }
    }

    /// Stops the load; every acknowledged session must be a member still.
    async fn check_nothing_lost(self) {
        self.task.abort();
        let _ = self.task.await;
        let acked = self
            .acked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        assert!(
            acked.len() >= 16,
            "only {} sessions acknowledged",
            acked.len()
        );
        let role = Role::new(LOAD_ROLE).unwrap_or_else(|e| panic!("{e}"));
        let present: BTreeSet<u64> = self
            .client
            .members(&role)
            .await
            .unwrap_or_else(|e| panic!("members: {e}"))
            .iter()
            .map(|m| m.server_id.get())
            .collect();
        let lost: Vec<_> = acked.difference(&present).collect();
        assert!(lost.is_empty(), "acknowledged sessions lost: {lost:?}");
        eprintln!(
            "{} sessions acknowledged during the upgrade, all present",
            acked.len()
        );
    }
}

/// Stops each member in turn (SIGTERM) and starts it again as this build at its level,
/// waiting for `ha status` to show it (and, with `lines`, the feature level line of each
/// step but the last, which must say the level is recorded and applied everywhere).
/// Checks that no role was lost, the role moved at most once per restarted ACTIVE, and
/// no session registered meanwhile (acknowledged) is missing.
async fn upgrade_one_by_one(members: &mut Members, expected: &mut BTreeMap<u64, u64>, lines: bool) {
    let current = u64::from(ha::raft::FEATURE_LEVEL);
    let elected = members.elected;
    let mut restarted_actives = 0;
    let load = Load::start(members).await;
    for id in NODES {
        members.levels.remove(&id);
        members.binaries.remove(&id);
        restarted_actives += usize::from(members.restart(id).await);
        expected.insert(id, current);
        let (applied, line) = if id == NODES[NODES.len() - 1] {
            (
                current,
                Some(format!("feature level: {current} (recorded in the log)")),
            )
        } else {
            (0, lines.then(|| format!(
                "feature level: written at 2, none recorded; members serve 2 to {current}; raised once every member serves it"
            )))
        };
        until_status(members, expected, applied, line.as_deref()).await;
    }
    members.placed().await;
    load.check_nothing_lost().await;
    members.check_handovers(elected, restarted_actives);
}

/// Stops (SIGTERM) a member whose coordinator is not the ACTIVE; its id.
async fn stop_a_standby(members: &mut Members) -> u64 {
    let (active, _) = members.placed().await;
    let id = NODES.into_iter().find(|id| *id != active).unwrap_or(1);
    members.stop(id).await;
    id
}

/// Starts member `id` as this build, waits until every member serves and applied this
/// version's level, checks no role was lost, and stops them all.
async fn start_current_and_stop_all(mut members: Members, id: u64) {
    let current = u64::from(ha::raft::FEATURE_LEVEL);
    members.spawn(id);
    until_status(
        &mut members,
        &NODES.map(|id| (id, current)).into(),
        current,
        Some(&format!("feature level: {current} (recorded in the log)")),
    )
    .await;
    assert!(members.lost.is_empty(), "roles lost: {:?}", members.lost);
    members.procs.stop_all(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_keeps_the_role_and_records_the_level_once_every_member_serves_it() {
    let old = BTreeMap::from(NODES.map(|id| (id, OLD_LEVEL)));
    let mut members = Members::start_at(old.clone());
    members.placed().await;
    let mut expected: BTreeMap<u64, u64> = NODES.map(|id| (id, u64::from(OLD_LEVEL))).into();
    until_status(
        &mut members,
        &expected,
        0,
        Some("feature level: written at 2, none recorded; members serve 2 to 2; raised once every member serves it"),
    )
    .await;
    upgrade_one_by_one(&mut members, &mut expected, true).await;

    // A rollback of one member below the recorded level is refused; it starts again
    // at the current level.
    let id = stop_a_standby(&mut members).await;
    members.levels.insert(id, OLD_LEVEL);
    let (exit, stderr) = members.refused_start(id).await;
    assert_eq!(exit.code(), Some(7), "{stderr}");
    assert!(stderr.contains("feature level"), "{stderr}");
    members.levels.remove(&id);
    start_current_and_stop_all(members, id).await;
}

/// The same rolling upgrade from a real older release: `HA_OLD_BINARY` names its `ha`
/// (built from the release's commit; docs/operations.md, "Upgrades and rollbacks").
/// Afterwards the old binary refuses an upgraded member's data dir, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs HA_OLD_BINARY, the ha binary of an older release"]
async fn a_rolling_upgrade_from_an_older_release() {
    let old: std::path::PathBuf = std::env::var_os("HA_OLD_BINARY")
        .unwrap_or_else(|| panic!("set HA_OLD_BINARY to an older release's ha binary"))
        .into();
    let mut members =
        Members::start_with(BTreeMap::new(), NODES.map(|id| (id, old.clone())).into());
    members.placed().await;
    // An older release reports no level: it serves 2.
    let mut expected: BTreeMap<u64, u64> = NODES.map(|id| (id, u64::from(OLD_LEVEL))).into();
    until_status(&mut members, &expected, 0, None).await;
    upgrade_one_by_one(&mut members, &mut expected, false).await;

    let id = stop_a_standby(&mut members).await;
    members.binaries.insert(id, old);
    let before = std::fs::read_dir(members.dirs[&id].path())
        .map(|entries| entries.count())
        .unwrap_or(0);
    let (exit, stderr) = members.refused_start(id).await;
    assert!(
        !exit.success() && stderr.contains("holds no ha-raft data"),
        "{exit}: {stderr}"
    );
    let after = std::fs::read_dir(members.dirs[&id].path())
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(before, after);
    members.binaries.remove(&id);
    start_current_and_stop_all(members, id).await;
}
