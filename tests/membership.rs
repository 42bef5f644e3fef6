//! Operating an embedded group from the command line, with real processes: `ha node
//! --join`, `ha member`, `ha status`. A wiped member is replaced and failover still
//! works through the new one; the group grows 3 -> 5 and shrinks 5 -> 3 under campaign
//! traffic with the history checker running; changes that would lose quorum or clash
//! with the group are refused and change nothing. Every process is stopped by PID.

#![cfg(all(feature = "cli", feature = "raft"))]

#[path = "support/group.rs"]
mod group;
#[path = "support/participant.rs"]
mod participant;

use std::sync::Arc;
use std::time::{Duration, Instant};

use group::{coordinator, ha, members, until_voters, Group, CLUSTER, HA};
use ha_core::testing::history::{History, Record};
use participant::{unix_us, Supervised};
use serde_json::Value;
use tokio::process::Command;
use tokio::time::sleep;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_member_is_replaced_and_failover_still_works() {
    let mut group = Group::new(4);
    let coordinator = coordinator("replaced");
    group.bootstrap(&[1, 2, 3], &coordinator);
    let first = group.first_active().await;
    let active = first.from;
    let victim = (1..=3).find(|id| *id != active).unwrap_or(1);
    let survivor = (1..=3)
        .find(|id| *id != active && *id != victim)
        .unwrap_or(1);

    // The victim's device dies for good: its data is gone.
    group.procs.kill(victim).await;
    let wiped = group.dirs[&victim].path().to_path_buf();
    std::fs::remove_dir_all(&wiped).unwrap_or_else(|e| panic!("{e}"));
    let url = group.url(&[active, survivor]);
    let (code, _, err) = ha(&["member", "remove", &victim.to_string(), "--backend", &url]).await;
    assert_eq!(code, 0, "remove the dead member: {err}");

    let kind = group.join(4, &[active, survivor], &coordinator).await;
    assert_eq!(kind, "voter");
    let mut expected = vec![active, survivor, 4];
    expected.sort_unstable();
    assert_eq!(members(&url).await, (expected.clone(), vec![]));
    let status = until_voters(&group.url(&[4]), &expected).await;
    let new_member = status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["id"] == 4)
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(new_member["status"]["cluster_id"], CLUSTER, "{new_member}");

    // Two voters of three are left once the ACTIVE dies: every commit from here on
    // needs the new member.
    let since = Instant::now();
    group.procs.kill(active).await;
    let next = group
        .procs
        .expect("a new ACTIVE", Duration::from_secs(30), |l| {
            l.is("elected") && l.seen >= since
        })
        .await;
    assert!(
        next.token() > first.token(),
        "token went from {} to {}",
        first.token(),
        next.token()
    );
    group.procs.stop_all(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_grows_to_five_and_shrinks_to_three_under_campaign_traffic() {
    let mut group = Group::new(5);
    group.bootstrap(&[1, 2, 3], &[]);
    group.leader_known().await;
    let everyone = group.url(&[1, 2, 3, 4, 5]);
    let history = Arc::new(History::new());
    let epoch = unix_us();
    let now = || unix_us().saturating_sub(epoch);
    let participants: Vec<Supervised> = (1..=3)
        .map(|p| {
            let backend = everyone.clone();
            let command: participant::MakeCommand = Arc::new(move || {
                let mut command = Command::new(HA);
                command
                    .args(["elect", "grow", &format!("p{p}"), "--json"])
                    .args(["--print-every-ms", "50", "--ttl", "3"])
                    .args(["--backend", &backend, "--id", &p.to_string()]);
                command
            });
            Supervised::start(p, command, epoch, Arc::clone(&history))
        })
        .collect();
    let step = |what: &str| {
        history.record(Record::Fault {
            at: now(),
            what: what.to_owned(),
        })
    };
    let churn = tokio_util::sync::CancellationToken::new();
    let changes = async {
        sleep(Duration::from_secs(3)).await;
        step("node 4 joins");
        assert_eq!(group.join(4, &[1, 2, 3], &[]).await, "voter");
        step("node 5 joins");
        assert_eq!(group.join(5, &[1, 2, 3], &[]).await, "voter");
        until_voters(&group.url(&[1]), &[1, 2, 3, 4, 5]).await;
        sleep(Duration::from_secs(2)).await;
        for id in [1u64, 2] {
            step(&format!("node {id} removed"));
            // Through the node being removed: it leaves on its own (a leader steps down
            // once the change is committed) and stops; the others confirm it is out.
            let url = group.url(&[id]);
            let (code, out, err) =
                ha(&["member", "remove", &id.to_string(), "--backend", &url]).await;
            assert_eq!(code, 0, "remove node {id}: {out} {err}");
            group.procs.stop(id, Duration::from_secs(10)).await;
            sleep(Duration::from_secs(1)).await;
        }
        until_voters(&group.url(&[3, 4, 5]), &[3, 4, 5]).await;
        sleep(Duration::from_secs(3)).await;
        churn.cancel();
    };
    let ((), resigns) = tokio::join!(changes, resign_leaders(&participants, &churn));
    history.record(Record::Healed { at: now() });
    sleep(Duration::from_secs(8)).await;
    for p in participants {
        p.stop().await;
    }
    group.procs.stop_all(Duration::from_secs(10)).await;
    let report = history.assert_ok(
        Some(Duration::from_secs(8)),
        0,
        "cargo test --all-features --test membership the_group_grows",
    );
    eprintln!("grow and shrink: {report:?}, {resigns} resigns");
    assert!(resigns >= 5, "only {resigns} resigns: no campaign traffic");
}

/// Campaign traffic: every 700 ms the leading participant resigns (SIGTERM) and campaigns
/// again when restarted, until `stop`; returns how many resigned.
async fn resign_leaders(
    participants: &[Supervised],
    stop: &tokio_util::sync::CancellationToken,
) -> u32 {
    let mut resigns = 0;
    while resigns < 200 {
        tokio::select! {
            () = sleep(Duration::from_millis(700)) => {}
            () = stop.cancelled() => return resigns,
        }
        for p in participants.iter().filter(|p| p.is_leading()) {
            if let Some(pid) = p.pid() {
                participant::signal(pid, "TERM");
                resigns += 1;
            }
        }
    }
    resigns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_would_lose_quorum_or_clash_are_refused_and_change_nothing() {
    let mut group = Group::new(5);
    group.bootstrap(&[1, 2, 3], &[]);
    group.leader_known().await;
    let url = group.url(&[1, 2]);
    until_voters(&url, &[1, 2, 3]).await;
    group.procs.kill(3).await;
    sleep(Duration::from_secs(1)).await;

    // With node 3 down, removing 1 or 2 leaves two voters of which one is reachable.
    for id in ["1", "2"] {
        let (code, _, err) = ha(&["member", "remove", id, "--backend", &url]).await;
        assert_eq!(code, 7, "remove {id} was not refused: {err}");
        assert!(err.contains("would lose quorum"), "{err}");
    }
    let (code, _, err) = ha(&["member", "remove", "9", "--backend", &url]).await;
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("not a member"), "{err}");

    // A node of another cluster.
    let other = group.node_command(4, &["--cluster", "another", "--join", &url]);
    group
        .procs
        .spawn(4, other)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = group
        .procs
        .wait_exit(4, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(7), "{}", group.procs.stderr_tail(4));
    assert!(
        group.procs.stderr_tail(4).contains("cluster id mismatch"),
        "{}",
        group.procs.stderr_tail(4)
    );

    // A node advertising an address that is node 1's.
    let taken = &group.addresses[&1].clone();
    let imposter = group.node_command(
        5,
        &["--cluster", CLUSTER, "--advertise", taken, "--join", &url],
    );
    group
        .procs
        .spawn(5, imposter)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = group
        .procs
        .wait_exit(5, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(7), "{}", group.procs.stderr_tail(5));
    assert!(
        group.procs.stderr_tail(5).contains("is already node 1's"),
        "{}",
        group.procs.stderr_tail(5)
    );

    // `ha member add` names a node that is not the one at the address.
    let (code, _, err) = ha(&["member", "add", &format!("4={taken}"), "--backend", &url]).await;
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("is node 1, not node 4"), "{err}");

    // The data dir of another node.
    let mut stolen = Command::new(HA);
    stolen
        .args(["node", "--id", "4", "--listen", &group.addresses[&4]])
        .arg("--data")
        .arg(group.dirs[&3].path())
        .args(["--cluster", CLUSTER, "--join", &url])
        .env("RUST_LOG", "off");
    group
        .procs
        .spawn(6, stolen)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = group
        .procs
        .wait_exit(6, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(4));
    assert!(
        group.procs.stderr_tail(6).contains("belongs to"),
        "{}",
        group.procs.stderr_tail(6)
    );

    assert_eq!(members(&url).await, (vec![1, 2, 3], vec![]));
    let (code, _, err) = ha(&["status", "--backend", &url]).await;
    assert_eq!(code, 0, "2 of 3 voters are a quorum: {err}");
    group.procs.kill(2).await;
    sleep(Duration::from_secs(2)).await;
    let (code, out, _) = ha(&["status", "--backend", &url]).await;
    assert_eq!(code, 4, "1 of 3 voters is no quorum: {out}");
    group.procs.stop_all(Duration::from_secs(10)).await;
}
