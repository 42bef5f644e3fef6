//! Backup and disaster recovery of an embedded group, with real processes: a snapshot
//! saved from a running group restores a new group (on new data dirs and addresses)
//! whose guarded store holds what was written and whose tokens continue above the
//! old ones; a survivor of a lost quorum becomes a single-voter group with
//! `--force-new-group`, new members join it and the coordinators resume; a member
//! started with `--leave-on-stop` hands its role over and leaves on SIGTERM, and one
//! removed with `ha member remove` while ACTIVE does the same. Every
//! process is stopped by PID.

#![cfg(all(feature = "cli", feature = "raft"))]

#[path = "support/group.rs"]
mod group;

use std::time::{Duration, Instant};

use bytes::Bytes;
use group::{coordinator, ha, members, until_voters, Group, CLUSTER};
use ha::{Backend, ElectionName, KvKey, KvWrite, Member, Role, ServerId};
use serde_json::Value;

/// Registers, campaigns in `election` (alone, so at once) and returns the token.
async fn campaign(backend: &dyn Backend, election: &str) -> (ha::LeaderKey, u64) {
    let role = Role::new(election).unwrap_or_else(|e| panic!("{e}"));
    let member = Member::new(ServerId::new(7), role, "test");
    let lease = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match backend.register(&member, Duration::from_secs(10)).await {
                Ok(lease) => return lease,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no session within 20 s"));
    let name = ElectionName::new(election).unwrap_or_else(|e| panic!("{e}"));
    let key = tokio::time::timeout(
        Duration::from_secs(20),
        backend.campaign(lease.id, &name, Bytes::from_static(b"v")),
    )
    .await
    .unwrap_or_else(|_| panic!("no leadership within 20 s"))
    .unwrap_or_else(|e| panic!("campaign: {e}"));
    let token = key.token.get();
    (key, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_a_new_group_whose_store_and_tokens_continue() {
    let mut group = Group::new(6);
    group.bootstrap(&[1, 2, 3], &[]);
    group.leader_known().await;
    let old = group.url(&[1, 2, 3]);
    let backend = ha::connect(&old).await.unwrap_or_else(|e| panic!("{e}"));
    let (key, before) = campaign(&*backend, "backup").await;
    let config = KvKey::new("config").unwrap_or_else(|e| panic!("{e}"));
    let write = KvWrite::Put {
        key: config.clone(),
        value: Bytes::from_static(b"before the backup"),
    };
    backend
        .kv_write(&key, write)
        .await
        .unwrap_or_else(|e| panic!("guarded write: {e}"));
    backend
        .revoke(key.lease)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(backend);

    let files = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let file = files.path().join("group.snap");
    let file_arg = file.to_string_lossy().into_owned();
    let (code, out, err) = ha(&["snapshot", "save", &file_arg, "--backend", &old, "--json"]).await;
    assert_eq!(code, 0, "ha snapshot save: {err}");
    let header: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(header["cluster_id"], CLUSTER, "{header}");
    assert_eq!(header["keys"], 1, "{header}");
    let (code, _, err) = ha(&["snapshot", "status", &file_arg]).await;
    assert_eq!(code, 0, "ha snapshot status: {err}");

    // The whole group is lost.
    group.procs.stop_all(Duration::from_secs(10)).await;
    for id in 1..=3 {
        std::fs::remove_dir_all(group.dirs[&id].path()).unwrap_or_else(|e| panic!("{e}"));
    }

    let peers: Vec<String> = (4..=6)
        .map(|id| format!("{id}={}", group.addresses[&id]))
        .collect();
    let peers = peers.join(",");
    let restore = |id: u64, file: &str, extra: &[&str]| {
        let data = group.dirs[&id].path().to_string_lossy().into_owned();
        let mut args: Vec<String> = ["snapshot", "restore", file, "--data", &data]
            .into_iter()
            .map(str::to_owned)
            .collect();
        args.extend([
            "--id".to_owned(),
            id.to_string(),
            "--peers".to_owned(),
            peers.clone(),
        ]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ha(&args).await
        }
    };
    // Bad input first: nothing may be created by any of these.
    let mut damaged = std::fs::read(&file).unwrap_or_else(|e| panic!("{e}"));
    let last = damaged.len() - 3;
    damaged[last] ^= 0x01;
    let damaged_file = files.path().join("damaged.snap");
    std::fs::write(&damaged_file, damaged).unwrap_or_else(|e| panic!("{e}"));
    let (code, _, err) = restore(4, &damaged_file.to_string_lossy(), &[]).await;
    assert_eq!(code, 2, "a damaged file: {err}");
    assert!(err.contains("fails its checksum"), "{err}");
    let (code, _, err) = restore(4, &file_arg, &["--cluster", "another"]).await;
    assert_eq!(code, 7, "another cluster's snapshot: {err}");
    assert!(err.contains("is of cluster"), "{err}");
    assert_eq!(
        std::fs::read_dir(group.dirs[&4].path()).map_or(0, Iterator::count),
        0,
        "a refused restore created nothing"
    );

    for id in 4..=6 {
        let (code, _, err) = restore(id, &file_arg, &[]).await;
        assert_eq!(code, 0, "restore node {id}: {err}");
    }
    let (code, _, err) = restore(4, &file_arg, &[]).await;
    assert_eq!(code, 7, "a restore over a used data dir: {err}");

    group.bootstrap(&[4, 5, 6], &[]);
    let new = group.url(&[4, 5, 6]);
    until_voters(&new, &[4, 5, 6]).await;
    let backend = ha::connect(&new).await.unwrap_or_else(|e| panic!("{e}"));
    let name = ElectionName::new("backup").unwrap_or_else(|e| panic!("{e}"));
    let read = backend
        .kv_read(&name, &config)
        .await
        .unwrap_or_else(|e| panic!("read: {e}"));
    assert_eq!(read.as_deref(), Some(&b"before the backup"[..]));
    let (_, after) = campaign(&*backend, "backup").await;
    let index = header["last_log_id"]["index"].as_u64().unwrap_or(u64::MAX);
    assert!(
        after > index && index >= before,
        "tokens: {before} before the backup, snapshot at {index}, {after} after the restore"
    );
    drop(backend);
    group.procs.stop_all(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_of_a_lost_quorum_forms_a_new_group_that_others_join() {
    let mut group = Group::new(5);
    let coordinator = coordinator("forced");
    group.bootstrap(&[1, 2, 3], &coordinator);
    let first = group.first_active().await;
    let survivor = (1..=3).find(|id| *id != first.from).unwrap_or(1);
    for id in (1..=3).filter(|id| *id != survivor) {
        group.procs.kill(id).await;
        std::fs::remove_dir_all(group.dirs[&id].path()).unwrap_or_else(|e| panic!("{e}"));
    }
    let url = group.url(&[survivor]);
    let (code, _, _) = ha(&["status", "--backend", &url]).await;
    assert_eq!(code, 4, "one voter of three is no quorum");

    group.procs.stop(survivor, Duration::from_secs(10)).await;
    let since = Instant::now();
    let peers: Vec<String> = (1..=3)
        .map(|id| format!("{id}={}", group.addresses[&id]))
        .collect();
    let peers = peers.join(",");
    // The flags it ran with, plus the one that forces the new group.
    let mut flags = vec!["--cluster", CLUSTER, "--peers", &peers, "--force-new-group"];
    flags.extend(coordinator);
    let command = group.node_command(survivor, &flags);
    group
        .procs
        .spawn(survivor, command)
        .unwrap_or_else(|e| panic!("{e}"));
    let forced = group
        .procs
        .expect("forced_new_group", Duration::from_secs(20), |l| {
            l.from == survivor && l.is("forced_new_group")
        })
        .await;
    assert!(forced.text.contains("dropped members"), "{}", forced.text);
    let resumed = group
        .procs
        .expect("the survivor ACTIVE", Duration::from_secs(30), |l| {
            l.from == survivor && l.is("elected") && l.seen >= since
        })
        .await;
    assert!(resumed.token() > first.token());

    for id in [4, 5] {
        let kind = group.join(id, &[survivor], &coordinator).await;
        assert_eq!(kind, "voter", "node {id}");
    }
    let mut voters = vec![survivor, 4, 5];
    voters.sort_unstable();
    until_voters(&group.url(&[4]), &voters).await;
    assert_eq!(members(&group.url(&[5])).await, (voters, vec![]));

    // The new group carries a failover on its own.
    let since = Instant::now();
    group.procs.kill(survivor).await;
    let next = group
        .procs
        .expect("a new ACTIVE", Duration::from_secs(30), |l| {
            l.is("elected") && l.seen >= since
        })
        .await;
    assert!(next.token() > resumed.token());
    group.procs.stop_all(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_leaving_on_purpose_hand_over_their_role_first() {
    let mut group = Group::new(4);
    let flags = [
        "--active-standby",
        "--role",
        "leaving",
        "--ttl",
        "5s",
        "--leave-on-stop",
    ];
    group.bootstrap(&[1, 2, 3, 4], &flags);
    let first = group.first_active().await;

    // SIGTERM with --leave-on-stop.
    let leaving = first.from;
    let since = Instant::now();
    group.procs.stop(leaving, Duration::from_secs(20)).await;
    let second = group
        .procs
        .expect("a new ACTIVE", Duration::from_secs(20), |l| {
            l.is("elected") && l.seen >= since
        })
        .await;
    assert!(second.token() > first.token());
    // Handed over, not expired: well inside the 5 s TTL.
    let moved = second.seen.duration_since(since);
    assert!(
        moved < Duration::from_secs(4),
        "the role moved after {moved:?}"
    );
    // The role first, then the group.
    let left = group
        .procs
        .expect("left", Duration::from_secs(5), |l| {
            l.from == leaving && (l.is("left") || l.is("leave_failed"))
        })
        .await;
    assert!(left.is("left"), "{}", left.text);
    let mut rest: Vec<u64> = (1..=4).filter(|id| *id != leaving).collect();
    until_voters(&group.url(&rest), &rest).await;

    // `ha member remove` of the member that is ACTIVE now.
    let removed = second.from;
    let since = Instant::now();
    let url = group.url(&rest);
    let (code, out, err) = ha(&["member", "remove", &removed.to_string(), "--backend", &url]).await;
    assert_eq!(code, 0, "ha member remove {removed}: {err}");
    assert!(out.contains("resigned its role and left"), "{out}");
    let third = group
        .procs
        .expect("a third ACTIVE", Duration::from_secs(20), |l| {
            l.is("elected") && l.seen >= since
        })
        .await;
    assert!(third.token() > second.token());
    let moved = third.seen.duration_since(since);
    assert!(
        moved < Duration::from_secs(4),
        "the role moved after {moved:?}"
    );
    let status = group
        .procs
        .wait_exit(removed, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(0), "the removed member stops cleanly");
    rest.retain(|id| *id != removed);
    assert_eq!(members(&group.url(&rest)).await, (rest.clone(), vec![]));
    group.procs.stop_all(Duration::from_secs(10)).await;
}
