//! The formats of every ha-raft release, pinned by fixtures under
//! `tests/fixtures/<version>/`, each written by `write_fixtures` below from the code of
//! that version (run with `HA_WRITE_FIXTURES=1 cargo test -p ha-raft --test formats --
//! --ignored`; it never overwrites): the data dirs of a 3-member group holding sessions,
//! two elections with tokens, a queue, guarded keys and batched entries (from 0.2.0 on,
//! the recorded feature level); a snapshot file as `ha snapshot save` writes it; its log
//! entries and peer messages as JSON (`expected.json` says what they hold). Every later
//! version must read them all: the tests here open each with the current code.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::Group;
use ha_core::{Backend, ElectionName, KvKey, KvWrite, Member, Role, ServerId};
use ha_raft::testing::{
    Command, CommandResult, ElectRequest, LevelReport, MemberRecord, PeerFailure, Renewal,
    WireError,
};
use ha_raft::{RaftAdmin, RaftClientOptions, RaftNode, RaftNodeConfig, TypeConfig};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{Entry, EntryPayload, Vote};
use serde_json::{json, Value};

/// The versions whose formats fixtures pin, oldest first; `write_fixtures` adds this
/// build's (`CARGO_PKG_VERSION`) once, and later versions keep every one.
const VERSIONS: [&str; 2] = ["0.1.0", "0.2.0"];
const CLUSTER: &str = "test-cluster";
const TTL: Duration = Duration::from_secs(60);

fn fixtures(version: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(version)
}

fn name(s: &str) -> ElectionName {
    ElectionName::new(s).unwrap_or_else(|e| panic!("{e}"))
}

fn key(s: &str) -> KvKey {
    KvKey::new(s).unwrap_or_else(|e| panic!("{e}"))
}

fn member(id: u64, role: &str) -> Member {
    Member::new(
        ServerId::new(id),
        Role::new(role).unwrap_or_else(|e| panic!("{e}")),
        format!("10.0.0.{id}:19530"),
    )
    .with_metadata("zone", format!("z{}", id % 2))
}

/// Every entry of a data dir's log, in order.
async fn log_entries(dir: &Path, node: u64) -> Vec<Entry<TypeConfig>> {
    common::log_entries(dir, CLUSTER, node).await
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{e}")) {
        let entry = entry.unwrap_or_else(|e| panic!("{e}"));
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes the fixtures; run by hand with HA_WRITE_FIXTURES=1"]
async fn write_fixtures() {
    if std::env::var_os("HA_WRITE_FIXTURES").is_none() {
        return;
    }
    let out = fixtures(env!("CARGO_PKG_VERSION"));
    assert!(
        !out.exists(),
        "{} exists: fixtures are never rewritten",
        out.display()
    );
    let mut group = Group::start(3).await;
    let leader = group.wait_for_leader().await;
    let backend: Arc<dyn Backend> = group.backend(leader);
    let register = |id: u64, role: &'static str| {
        let backend = Arc::clone(&backend);
        async move {
            backend
                .register(&member(id, role), TTL)
                .await
                .unwrap_or_else(|e| panic!("register {id}: {e}"))
                .id
        }
    };
    let (a, b, c) = (
        register(1, "coord").await,
        register(2, "coord").await,
        register(3, "coord").await,
    );
    let campaign = |lease, election: &'static str, value: &'static str| {
        let backend = Arc::clone(&backend);
        async move {
            backend
                .campaign(lease, &name(election), Bytes::from_static(value.as_bytes()))
                .await
                .unwrap_or_else(|e| panic!("campaign: {e}"))
        }
    };
    let first = campaign(a, "fixture-one", "active:10.0.0.1:19530").await;
    let second = {
        // In line behind the first: the campaign returns only once it leads.
        let backend = Arc::clone(&backend);
        tokio::spawn(async move {
            let _ = backend
                .campaign(b, &name("fixture-one"), Bytes::from_static(b"standby"))
                .await;
        })
    };
    let other = campaign(c, "fixture-two", "active:10.0.0.3:19530").await;
    let writes = [
        ("config/x", Bytes::from_static(b"1")),
        ("binary", Bytes::from_static(&[0, 1, 2, 255])),
    ];
    for (k, v) in &writes {
        backend
            .kv_write(
                &first,
                KvWrite::Put {
                    key: key(k),
                    value: v.clone(),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("kv_write: {e}"));
    }
    // Commands proposed together share an entry: a batch.
    let batch: Vec<_> = (100..116).map(|id| register(id, "batch")).collect();
    let leases = futures::future::join_all(batch).await;
    for lease in leases.iter().step_by(2) {
        backend
            .revoke(*lease)
            .await
            .unwrap_or_else(|e| panic!("revoke: {e}"));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Every member has applied (and recorded) the group's feature level.
    for node in group.nodes.values() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while node.status().await.group_level != ha_raft::FEATURE_LEVEL {
            assert!(tokio::time::Instant::now() < deadline, "no level recorded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("{e}"));
    let endpoints: Vec<String> = group.peers.values().cloned().collect();
    let admin =
        RaftAdmin::new(endpoints, RaftClientOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    admin
        .save_snapshot(&out.join("snapshot.hasnap"))
        .await
        .unwrap_or_else(|e| panic!("save: {e}"));
    second.abort();
    let expected = json!({
        "cluster_id": CLUSTER,
        "elections": {
            "fixture-one": { "token": first.token.get(), "value": "active:10.0.0.1:19530", "in_line": 1 },
            "fixture-two": { "token": other.token.get(), "value": "active:10.0.0.3:19530", "in_line": 0 },
        },
        "kv": { "fixture-one": { "config/x": [49], "binary": [0, 1, 2, 255] } },
        "coord_members": 3,
        "batch_members": leases.len() / 2,
        "group_level": ha_raft::FEATURE_LEVEL,
    });
    // Kept past the group's shutdown, which would delete them.
    let dirs = std::mem::take(&mut group.dirs);
    group.shutdown().await;
    for (id, dir) in &dirs {
        copy_dir(dir.path(), &out.join(format!("data/node-{id}")));
    }
    // Read from a copy: opening a sled dir writes to it.
    let copy = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    copy_dir(&out.join("data/node-1"), copy.path());
    let entries = log_entries(copy.path(), 1).await;
    let batched = entries
        .iter()
        .filter(|e| matches!(&e.payload, EntryPayload::Normal(Command::Batch(_))))
        .count();
    assert!(batched > 0, "no batched entry in the log");
    let lines: Vec<String> = entries
        .iter()
        .map(|e| serde_json::to_string(e).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    std::fs::write(out.join("log-entries.jsonl"), lines.join("\n") + "\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut expected = expected;
    expected["log_entries"] = json!(entries.len());
    expected["batched_entries"] = json!(batched);
    let ids = leases.iter().chain([&a, &b, &c]).map(|l| l.get());
    expected["highest_id"] = json!(ids.chain([first.token.get(), other.token.get()]).max());
    std::fs::write(
        out.join("peer-messages.json"),
        serde_json::to_string_pretty(&peer_messages(&entries)).unwrap_or_default() + "\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        out.join("expected.json"),
        serde_json::to_string_pretty(&expected).unwrap_or_default() + "\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// One of each peer message as the wire carries it (the payload of a `PeerRequest` or
/// `PeerReply`), built from the fixture's own entries.
fn peer_messages(entries: &[Entry<TypeConfig>]) -> Value {
    let last = entries.last().map(|e| e.log_id);
    let vote = Vote::new_committed(2, 1);
    let batch = entries
        .iter()
        .find(|e| matches!(&e.payload, EntryPayload::Normal(Command::Batch(_))))
        .cloned();
    let append = AppendEntriesRequest::<TypeConfig> {
        vote,
        prev_log_id: entries.first().map(|e| e.log_id),
        entries: batch.into_iter().collect(),
        leader_commit: last,
    };
    let propose = Command::Register {
        member: MemberRecord::from(&member(9, "coord")),
        ttl_ms: 10_000,
    };
    let renewals: Vec<Renewal> = vec![Ok(10_000), Err(WireError::LeaseExpired(4))];
    let proposed: Result<(u64, CommandResult), PeerFailure> = Ok((
        19,
        CommandResult::Registered {
            lease: 19,
            ttl_ms: 10_000,
        },
    ));
    json!({
        "requests": {
            "vote": VoteRequest::new(Vote::new(3, 2), last),
            "append_entries": append,
            "propose": propose,
            "keep_alive_batch": vec![4_u64, 5],
            "read_index": (),
            "elect": ElectRequest { caught_up_to: 17, unless_hosting_active: true },
            "feature_level": (),
        },
        "replies": {
            "feature_level": LevelReport { serves: ha_raft::FEATURE_LEVEL },
            "keep_alive_batch": Ok::<_, PeerFailure>(renewals),
            "propose": proposed,
            "not_leader": Err::<(), _>(PeerFailure::NotLeader),
        },
    })
}

/// Checks a started node against `expected.json`, and that new tokens continue above
/// the fixture's.
async fn check_state(node: &RaftNode, expected: &Value) {
    let mut highest = 0;
    for (election, want) in expected["elections"].as_object().into_iter().flatten() {
        let leader = node
            .leader(&name(election))
            .await
            .unwrap_or_else(|e| panic!("{election}: {e}"))
            .unwrap_or_else(|| panic!("{election} has no leader"));
        assert_eq!(
            Some(leader.key.token.get()),
            want["token"].as_u64(),
            "{election}"
        );
        assert_eq!(
            leader.value.as_ref(),
            want["value"].as_str().unwrap_or("").as_bytes()
        );
        highest = highest.max(leader.key.token.get());
    }
    for (election, keys) in expected["kv"].as_object().into_iter().flatten() {
        for (k, want) in keys.as_object().into_iter().flatten() {
            let got = node
                .kv_read(&name(election), &key(k))
                .await
                .unwrap_or_else(|e| panic!("kv_read {k}: {e}"))
                .unwrap_or_else(|| panic!("{k} is gone"));
            let want: Vec<u8> = serde_json::from_value(want.clone()).unwrap_or_default();
            assert_eq!(got.as_ref(), want.as_slice(), "{election}/{k}");
        }
    }
    let coord = Role::new("coord").unwrap_or_else(|e| panic!("{e}"));
    let members = node.members(&coord).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        Some(members.len() as u64),
        expected["coord_members"].as_u64()
    );
    let lease = node
        .register(&member(7, "coord"), TTL)
        .await
        .unwrap_or_else(|e| panic!("register: {e}"))
        .id;
    let highest = highest.max(expected["highest_id"].as_u64().unwrap_or(0));
    assert!(
        lease.get() > highest,
        "a new lease id {lease:?} not above {highest}"
    );
    let key = node
        .campaign(lease, &name("fixture-new"), Bytes::from_static(b"new"))
        .await
        .unwrap_or_else(|e| panic!("campaign: {e}"));
    assert!(
        key.token.get() > highest,
        "token {} not above {highest}",
        key.token.get()
    );
    eprintln!(
        "checked: highest fixture token {highest}, new lease {lease:?}, new token {}",
        key.token.get()
    );
}

/// Node `id` as a single-member group on a free port over `dir`.
fn config_for(id: u64, dir: &Path) -> RaftNodeConfig {
    let port = ha_testkit::free_ports(1)[0];
    let addr = format!("127.0.0.1:{port}");
    let peers = BTreeMap::from([(id, addr)]);
    common::test_config(id, &peers, dir).with_cluster_id(CLUSTER)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dirs_of_every_version_start_with_their_state() {
    for version in VERSIONS {
        let expected = read_json(&fixtures(version).join("expected.json"));
        for id in 1..=3 {
            let temp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let dir = temp.path().join(format!("node-{id}"));
            copy_dir(&fixtures(version).join(format!("data/node-{id}")), &dir);
            // The fixture's peers listened on ports of the run that wrote it: continue
            // as a group of one, keeping every entry.
            let config = config_for(id, &dir);
            ha_raft::force_new_group(&config)
                .await
                .unwrap_or_else(|e| panic!("{version} node {id}: force_new_group: {e}"));
            let node = RaftNode::start(config)
                .await
                .unwrap_or_else(|e| panic!("{version} node {id}: start over the fixture: {e}"));
            check_state(&node, &expected).await;
            // 0.1.0 recorded no feature level; its only member serves this version's.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while node.status().await.group_level != ha_raft::FEATURE_LEVEL {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{version} node {id}: the group level was not recorded: {:?}",
                    node.status().await
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            node.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_files_of_every_version_restore() {
    for version in VERSIONS {
        let expected = read_json(&fixtures(version).join("expected.json"));
        let temp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = temp.path().join("node-1");
        let config = config_for(1, &dir);
        let options = ha_raft::RestoreOptions {
            data_dir: dir.clone(),
            id: 1,
            peers: config.peers.clone(),
            cluster_id: None,
            allow_other_cluster: false,
        };
        ha_raft::restore(&fixtures(version).join("snapshot.hasnap"), &options)
            .await
            .unwrap_or_else(|e| panic!("{version}: restore: {e}"));
        let node = RaftNode::start(config)
            .await
            .unwrap_or_else(|e| panic!("{version}: start over the restored dir: {e}"));
        check_state(&node, &expected).await;
        if let Some(level) = expected["group_level"].as_u64() {
            assert_eq!(
                u64::from(node.status().await.group_level),
                level,
                "{version}"
            );
        }
        node.shutdown().await;
    }
}

#[test]
fn the_log_entries_of_every_version_decode() {
    for version in VERSIONS {
        let expected = read_json(&fixtures(version).join("expected.json"));
        let path = fixtures(version).join("log-entries.jsonl");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        let entries: Vec<Entry<TypeConfig>> = text
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{version}: {line}: {e}"))
            })
            .collect();
        assert_eq!(Some(entries.len() as u64), expected["log_entries"].as_u64());
        let count = |what: fn(&Command) -> bool| {
            entries
                .iter()
                .filter(|e| matches!(&e.payload, EntryPayload::Normal(c) if what(c)))
                .count() as u64
        };
        let batched = count(|c| matches!(c, Command::Batch(_)));
        assert_eq!(
            Some(batched),
            expected["batched_entries"].as_u64(),
            "{version}"
        );
        // From 0.2.0 on, the group's level is recorded in the log.
        let recorded = count(|c| matches!(c, Command::SetLevel { .. }));
        assert_eq!(recorded > 0, expected["group_level"].is_u64(), "{version}");
        // Each decodes to what encodes to the same JSON: nothing was dropped on the way.
        for (line, entry) in text.lines().zip(&entries) {
            let again = serde_json::to_value(entry).unwrap_or_default();
            let first: Value = serde_json::from_str(line).unwrap_or_default();
            assert_eq!(again, first, "{version}");
        }
    }
}

/// Decodes `value` as `T` and checks that it encodes back to the same JSON.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(what: &str, value: &Value) {
    let decoded: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{what} does not decode: {e}"));
    let again = serde_json::to_value(&decoded).unwrap_or_default();
    assert_eq!(&again, value, "{what} changed on the way through");
}

/// Round-trips every message a fixture holds, by kind; a kind without a decoder here
/// fails, so a message added to the fixtures cannot go unchecked.
#[test]
fn the_peer_messages_of_every_version_decode() {
    for version in VERSIONS {
        let messages = read_json(&fixtures(version).join("peer-messages.json"));
        for (kind, value) in messages["requests"].as_object().into_iter().flatten() {
            let what = format!("{version} request {kind}");
            match kind.as_str() {
                "vote" => round_trip::<VoteRequest<u64>>(&what, value),
                "append_entries" => round_trip::<AppendEntriesRequest<TypeConfig>>(&what, value),
                "propose" => round_trip::<Command>(&what, value),
                "keep_alive_batch" => round_trip::<Vec<u64>>(&what, value),
                "read_index" | "feature_level" => round_trip::<()>(&what, value),
                "elect" => round_trip::<ElectRequest>(&what, value),
                other => panic!("{version}: no decoder for request {other}"),
            }
        }
        for (kind, value) in messages["replies"].as_object().into_iter().flatten() {
            let what = format!("{version} reply {kind}");
            match kind.as_str() {
                "keep_alive_batch" => round_trip::<Result<Vec<Renewal>, PeerFailure>>(&what, value),
                "propose" => round_trip::<Result<(u64, CommandResult), PeerFailure>>(&what, value),
                "not_leader" => round_trip::<Result<(), PeerFailure>>(&what, value),
                "feature_level" => round_trip::<LevelReport>(&what, value),
                other => panic!("{version}: no decoder for reply {other}"),
            }
        }
        // The batch inside the AppendEntries is one entry of several commands.
        let append: AppendEntriesRequest<TypeConfig> =
            serde_json::from_value(messages["requests"]["append_entries"].clone())
                .unwrap_or_else(|e| panic!("{e}"));
        assert!(append
            .entries
            .iter()
            .any(|e| matches!(&e.payload, EntryPayload::Normal(Command::Batch(c)) if c.len() > 1)));
    }
}

/// Every file under `dir` with its bytes.
fn snapshot_of(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{e}")) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if path.is_dir() {
            files.extend(snapshot_of(&path));
        } else {
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
            files.insert(path, bytes);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_0_1_0_is_upgraded_in_place_and_a_newer_one_refused_untouched() {
    let temp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = temp.path().join("node-1");
    copy_dir(&fixtures("0.1.0").join("data/node-1"), &dir);
    assert!(
        !dir.join("ha-format").exists(),
        "0.1.0 wrote no format file"
    );
    let config = config_for(1, &dir);
    ha_raft::force_new_group(&config)
        .await
        .unwrap_or_else(|e| panic!("force_new_group: {e}"));
    let node = RaftNode::start(config.clone())
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    node.shutdown().await;
    let recorded = std::fs::read_to_string(dir.join("ha-format")).unwrap_or_default();
    assert_eq!(
        recorded.trim(),
        ha_raft::DATA_DIR_FORMAT.to_string(),
        "upgraded in place"
    );

    // A format from the future: refused by name, and not a byte changed.
    std::fs::write(dir.join("ha-format"), "9\n").unwrap_or_else(|e| panic!("{e}"));
    let before = snapshot_of(&dir);
    let refused = RaftNode::start(config).await;
    let Err(error) = refused else {
        panic!("a newer data dir must be refused");
    };
    let text = error.to_string();
    assert!(
        text.contains("format 9") && text.contains(&format!("1 to {}", ha_raft::DATA_DIR_FORMAT)),
        "{text}"
    );
    assert_eq!(
        snapshot_of(&dir),
        before,
        "the refused data dir was changed"
    );
}
