//! Mixed versions in one group, without a second release: a member started at a lower
//! feature level (`RaftNodeConfig::with_feature_level`) stands for an older binary.
//! Level 1 applies one command per entry, level 2 batches too (ha 0.1.0), level 3 is
//! this version (see `data::level`). The group writes at its lowest member's level,
//! records a level of 3 once every member serves it, and refuses members below it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::Group;
use ha_core::{Backend, Member, Role, ServerId};
use ha_raft::testing::{Command, StateMachineStore};
use ha_raft::{
    AdminError, MembershipChange, MembershipRefusal, RaftBackendError, RaftNode, RaftNodeConfig,
    TypeConfig, FEATURE_LEVEL,
};
use openraft::storage::RaftStateMachine;
use openraft::{Entry, EntryPayload, LogId};
use tokio::time::{sleep, Instant};

const CLUSTER: &str = "test-cluster";

/// The level each node starts at; FEATURE_LEVEL unless set.
#[derive(Clone, Default)]
struct Levels(Arc<Mutex<BTreeMap<u64, u32>>>);

impl Levels {
    fn set(&self, id: u64, level: u32) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, level);
    }

    fn apply(&self, config: RaftNodeConfig) -> RaftNodeConfig {
        let level = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&config.id)
            .copied()
            .unwrap_or(FEATURE_LEVEL);
        config.with_feature_level(level)
    }
}

async fn start(levels: &Levels) -> Group {
    let levels = levels.clone();
    Group::start_with(3, move |config| levels.apply(config)).await
}

/// A group started at `levels` whose leader writes at `writes_at`, with 64 sessions
/// registered at once through the leader (server ids 1..=64).
async fn loaded_group(levels: &Levels, writes_at: u32) -> Group {
    let group = start(levels).await;
    wait_for_leader_status(&group, "the leader's level", |s| {
        s.writes_at == Some(writes_at)
    })
    .await;
    register_many(&group.leader().await, 1, 64).await;
    group
}

/// Registers `n` sessions at once through `node`, so its leader has commands to batch.
async fn register_many(node: &RaftNode, first_id: u64, n: u64) {
    let role = Role::new("worker").unwrap_or_else(|e| panic!("{e}"));
    let registers = (first_id..first_id + n).map(|id| {
        let member = Member::new(ServerId::new(id), role.clone(), format!("10.1.0.{id}:1"));
        async move { node.register(&member, Duration::from_secs(60)).await }
    });
    for result in futures::future::join_all(registers).await {
        result.unwrap_or_else(|e| panic!("register: {e}"));
    }
}

/// Every command in a data dir's log (the node must be stopped).
async fn commands_in(dir: &Path, id: u64) -> Vec<Command> {
    common::log_entries(dir, CLUSTER, id)
        .await
        .into_iter()
        .filter_map(|entry| match entry.payload {
            EntryPayload::Normal(command) => Some(command),
            _ => None,
        })
        .collect()
}

/// A follower's log, read while it is stopped once it holds the leader's last entry;
/// it is started again after.
async fn follower_log(group: &mut Group) -> Vec<Command> {
    let leader = group.wait_for_leader().await;
    let id = *group
        .nodes
        .keys()
        .find(|id| **id != leader)
        .unwrap_or_else(|| panic!("no follower"));
    let last = group.nodes[&leader].status().await.last_log_index;
    let deadline = Instant::now() + Duration::from_secs(20);
    while group.nodes[&id].status().await.last_log_index < last {
        assert!(Instant::now() < deadline, "node {id} never caught up");
        sleep(Duration::from_millis(20)).await;
    }
    group.kill(id).await;
    let commands = commands_in(group.dirs[&id].path(), id).await;
    group.restart(id).await;
    group.wait_for_leader().await;
    commands
}

fn batches(commands: &[Command]) -> usize {
    commands
        .iter()
        .filter(|c| matches!(c, Command::Batch(_)))
        .count()
}

fn level_records(commands: &[Command]) -> Vec<u32> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::SetLevel { level } => Some(*level),
            _ => None,
        })
        .collect()
}

/// Waits (bounded) until `done` holds for the leader's status.
async fn wait_for_leader_status(
    group: &Group,
    what: &str,
    done: impl Fn(&ha_raft::NodeStatus) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = group.leader().await.status().await;
        if done(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {status:?}");
        sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) until every running node has applied the group level `level`.
async fn wait_for_group_level(group: &Group, level: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in group.nodes.values() {
        loop {
            let status = node.status().await;
            if status.group_level == level {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never applied group level {level}: {status:?}",
                node.id()
            );
            sleep(Duration::from_millis(50)).await;
        }
    }
}

fn backend_error(error: &ha_core::Error) -> Option<&RaftBackendError> {
    match error {
        ha_core::Error::Backend { source, .. } => source.downcast_ref(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_level_1_member_keeps_batches_out_until_it_restarts_at_the_current_level() {
    let levels = Levels::default();
    levels.set(3, 1);
    let mut group = loaded_group(&levels, 1).await;
    let status = group.nodes[&3].status().await;
    assert_eq!(status.feature_level, 1);
    assert_ne!(
        status.state, "stopped",
        "the level-1 member applied everything"
    );
    assert_eq!(
        status.group_level, 0,
        "no level recorded while one member serves 1"
    );
    let log = follower_log(&mut group).await;
    assert_eq!(
        batches(&log),
        0,
        "a batch was written with a level-1 member"
    );
    assert!(level_records(&log).is_empty(), "{:?}", level_records(&log));

    // The member is upgraded: restarted at the current level.
    levels.set(3, FEATURE_LEVEL);
    group.kill(3).await;
    group.restart(3).await;
    wait_for_group_level(&group, FEATURE_LEVEL).await;
    let leader = group.leader().await;
    register_many(&leader, 1001, 64).await;
    let log = follower_log(&mut group).await;
    let records = level_records(&log);
    assert!(
        !records.is_empty() && records.iter().all(|level| *level == FEATURE_LEVEL),
        "{records:?}"
    );
    let recorded_at = log
        .iter()
        .position(|c| matches!(c, Command::SetLevel { .. }))
        .unwrap_or(0);
    assert!(
        batches(&log[recorded_at..]) > 0,
        "no batch after every member serves level {FEATURE_LEVEL}"
    );

    // A downgrade below the recorded level is refused, and changes nothing.
    let leader_id = group.wait_for_leader().await;
    let id = if leader_id == 2 { 1 } else { 2 };
    group.kill(id).await;
    let config = common::test_config(id, &group.peers, group.dirs[&id].path())
        .with_feature_level(FEATURE_LEVEL - 1);
    let refused = RaftNode::start(config)
        .await
        .err()
        .unwrap_or_else(|| panic!("a member below the group's level started"));
    assert!(
        matches!(
            backend_error(&refused),
            Some(RaftBackendError::BelowGroupLevel { serves, group })
                if *serves == FEATURE_LEVEL - 1 && *group == FEATURE_LEVEL
        ),
        "{refused}"
    );
    assert!(refused.to_string().contains("feature level"), "{refused}");
    group.restart(id).await;
    let members = group.nodes[&id]
        .members(&Role::new("worker").unwrap_or_else(|e| panic!("{e}")))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(members.len(), 128, "every session survived");
    group.shutdown().await;
}

/// Concurrent registrations through a node while a case runs (the suite's own calls are
/// mostly one at a time, which never fills a batch); stopped when dropped.
struct Load(tokio::task::JoinHandle<()>);

impl Load {
    fn through(node: RaftNode) -> Self {
        Self(tokio::spawn(async move {
            let role = Role::new("load").unwrap_or_else(|e| panic!("{e}"));
            for round in 0..400u64 {
                let registers = (0..8).map(|i| {
                    let member = Member::new(ServerId::new(round * 8 + i), role.clone(), "l:1");
                    let node = node.clone();
                    async move { node.register(&member, Duration::from_secs(5)).await }
                });
                // Errors are the case's business (a leader change); the load goes on.
                let _ = futures::future::join_all(registers).await;
                sleep(Duration::from_millis(50)).await;
            }
        }))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The conformance suite through a member of level 1, under concurrent load: had the
/// leader written a batch, that member would have stopped and the suite failed on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_a_level_1_member_passes_the_conformance_suite_through_it() {
    let report = ha_core::testing::run_suite(|| async {
        let levels = Levels::default();
        levels.set(3, 1);
        let group = start(&levels).await;
        let node = group.nodes[&3].clone();
        let load = Load::through(group.nodes[&1].clone());
        Ok((Arc::new(node) as Arc<dyn Backend>, (load, group)))
    })
    .await;
    report.assert_passed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_below_the_level_the_group_writes_at_is_refused_and_a_member_fed_a_batch_stops() {
    // Three members of ha 0.1.0's level: batches, nothing recorded.
    let levels = Levels::default();
    for id in 1..=3 {
        levels.set(id, 2);
    }
    let mut group = loaded_group(&levels, 2).await;
    assert!(
        batches(&follower_log(&mut group).await) > 0,
        "no batch written"
    );

    // A joiner that says it serves level 1 is refused, and so is one that does not say
    // (the library's `add_learner`): the leader asks it.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let port = ha_testkit::free_ports(1)[0];
    let address = format!("127.0.0.1:{port}");
    let listen = address.parse().unwrap_or_else(|e| panic!("{e}"));
    let config = RaftNodeConfig::new(4, listen, BTreeMap::new(), dir.path())
        .with_cluster_id(CLUSTER)
        .with_timing(
            Duration::from_millis(100),
            (Duration::from_millis(400), Duration::from_millis(800)),
        )
        .with_feature_level(1);
    let joiner = RaftNode::start(config)
        .await
        .unwrap_or_else(|e| panic!("start node 4: {e}"));
    let leader = group.leader().await;
    let refused = Err(AdminError::Refused(MembershipRefusal::BelowGroupLevel {
        id: 4,
        serves: 1,
        group: 2,
    }));
    for stated in [Some(1), None] {
        let join = MembershipChange::AddLearner {
            id: 4,
            address: address.clone(),
            cluster_id: CLUSTER.to_owned(),
            fresh: true,
            feature_level: stated,
        };
        assert_eq!(leader.change_membership(&join).await, refused, "{stated:?}");
    }
    let added = leader.add_learner(4, address.clone()).await;
    assert!(
        added
            .as_ref()
            .is_err_and(|e| e.to_string().contains("feature level 1")),
        "{added:?}"
    );
    joiner.shutdown().await;

    // A member restarted at level 1 over a log with batches (a downgrade before any
    // level was recorded) stops on the first with a typed cause, applying none of it.
    let leader_id = group.wait_for_leader().await;
    let id = if leader_id == 3 { 2 } else { 3 };
    group.kill(id).await;
    let config =
        common::test_config(id, &group.peers, group.dirs[&id].path()).with_feature_level(1);
    let failure = match RaftNode::start(config).await {
        Err(error) => backend_error(&error).cloned(),
        Ok(node) => {
            let failed = tokio::time::timeout(Duration::from_secs(20), node.failed()).await;
            node.shutdown().await;
            failed.ok()
        }
    };
    assert!(
        matches!(
            &failure,
            Some(RaftBackendError::UnsupportedCommand { command, needs: 2, serves: 1, .. })
                if command == "Batch"
        ),
        "{failure:?}"
    );
    levels.set(id, 2);
    group.restart(id).await;
    register_many(&group.leader().await, 1001, 4).await;
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_machine_below_a_command_s_level_refuses_it_before_applying() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let db = common::open_node_db(dir.path(), CLUSTER, 1).await;
    let mut sm = StateMachineStore::serving(&db, 1, None).unwrap_or_else(|e| panic!("{e}"));
    let entry = |index, command| Entry::<TypeConfig> {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(command),
    };
    let applied = sm
        .apply([entry(1, Command::Revoke { lease: 9 })])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(applied.len(), 1);
    let batch = Command::Batch(vec![Command::Revoke { lease: 9 }]);
    assert!(sm.apply([entry(2, batch)]).await.is_err());
    assert!(matches!(
        sm.fatal_cause().get(),
        Some(RaftBackendError::UnsupportedCommand {
            index: 2,
            needs: 2,
            serves: 1,
            ..
        })
    ));
    assert_eq!(sm.lock().applied_index(), 1, "nothing of the batch applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_of_a_newer_version_is_an_unknown_command_and_broken_bytes_are_corrupt() {
    for (payload, unknown) in [
        (
            serde_json::json!({"Normal": {"Rename": {"from": "a", "to": "b"}}}),
            true,
        ),
        (
            serde_json::json!({"Normal": {"Revoke": {"lease": "not a number"}}}),
            false,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let port = ha_testkit::free_ports(1)[0];
        let peers = BTreeMap::from([(1, format!("127.0.0.1:{port}"))]);
        let config = common::test_config(1, &peers, dir.path());
        let node = RaftNode::start(config.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        node.wait_for_leader(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        node.shutdown().await;

        // Append an entry after the last, as a newer leader would have replicated it.
        let db = common::open_node_db(dir.path(), CLUSTER, 1).await;
        let logs = db.open_tree("logs").unwrap_or_else(|e| panic!("{e}"));
        let (_, last) = logs
            .last()
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("empty log"));
        let mut entry: serde_json::Value =
            serde_json::from_slice(&last).unwrap_or_else(|e| panic!("{e}"));
        let index = entry["log_id"]["index"].as_u64().unwrap_or(0) + 1;
        entry["log_id"]["index"] = index.into();
        entry["payload"] = payload;
        let bytes = serde_json::to_vec(&entry).unwrap_or_else(|e| panic!("{e}"));
        logs.insert(index.to_be_bytes(), bytes)
            .unwrap_or_else(|e| panic!("{e}"));
        logs.flush().unwrap_or_else(|e| panic!("{e}"));
        drop(logs);
        drop(db);

        let error = RaftNode::start(config)
            .await
            .err()
            .unwrap_or_else(|| panic!("started over an entry it cannot read"));
        match backend_error(&error) {
            Some(RaftBackendError::UnknownCommand { index: at, name }) if unknown => {
                assert_eq!((*at, name.as_str()), (index, "Rename"));
                assert!(error.to_string().contains("newer ha"), "{error}");
            }
            Some(RaftBackendError::Corrupt(reason)) if !unknown => {
                assert!(reason.contains(&format!("log entry {index}")), "{reason}");
            }
            _ => panic!("unknown: {unknown}: {error}"),
        }
    }
}
