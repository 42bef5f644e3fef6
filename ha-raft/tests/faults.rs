//! Failures of a real 3-node group on loopback with real sled dirs: a node that hosts both
//! the Raft leader and the active candidate dies; the whole group restarts; the leader is
//! partitioned away; members are added and removed; the log is purged.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Group;
use ha_core::{Backend, ElectionName, Error, LossReason, Member, Role, ServerId, Session};
use tokio::time::Instant;

fn member(id: u64) -> Member {
    Member::new(
        ServerId::new(id),
        Role::new("rootcoord").unwrap_or_else(|e| panic!("{e}")),
        format!("127.0.0.1:{}", 53100 + id),
    )
}

fn election() -> ElectionName {
    ElectionName::new("rootcoord").unwrap_or_else(|e| panic!("{e}"))
}

async fn session(backend: Arc<dyn Backend>, id: u64, ttl: Duration) -> Session {
    Session::builder(backend, member(id))
        .ttl(ttl)
        .register()
        .await
        .unwrap_or_else(|e| panic!("register {id}: {e}"))
}

const TTL: Duration = Duration::from_secs(2);
const STANDBY_TTL: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_node_with_raft_leader_and_active_fails_over_and_it_rejoins() {
    let mut group = Group::start(3).await;
    let leader = group.leader().await;
    let follower = group.follower().await;
    let active = session(Arc::new(leader.clone()), 1, TTL).await;
    // The survivor's TTL must outlast a Raft leader change (TTL ≥ 3× failover).
    let standby = Arc::new(session(Arc::new(follower.clone()), 2, STANDBY_TTL).await);
    let old = active
        .campaign(&election(), "active")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let next = {
        let standby = Arc::clone(&standby);
        tokio::spawn(async move { standby.campaign(&election(), "standby").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!next.is_finished());

    let killed = leader.id();
    drop(leader);
    let killed_at = Instant::now();
    group.kill(killed).await;

    let new_leader = group.wait_for_leader().await;
    let raft_failover = killed_at.elapsed();
    assert_ne!(new_leader, killed);
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
    // The old lease gets a fresh TTL on the new leader: failover ≥ TTL after the kill.
    assert!(
        gap >= TTL,
        "standby elected {gap:?} after the kill, before the TTL"
    );
    assert!(gap < TTL + Duration::from_secs(8), "failover took {gap:?}");
    eprintln!(
        "measured: new raft leader {raft_failover:?} after kill; standby ACTIVE {gap:?} after kill (TTL {TTL:?})"
    );

    // The killed node comes back from its data dir and catches up.
    group.restart(killed).await;
    let rejoined = group.nodes[&killed].clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leader = rejoined.leader(&election()).await;
        if let Ok(Some(leader)) = leader {
            if leader.token() == took_over.token() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "restarted node did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop((active, old, took_over));
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_whole_group_loses_nothing_acknowledged() {
    let mut group = Group::start(3).await;
    let backend = group.backend(group.wait_for_leader().await);
    let lease = backend
        .register(&member(7), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let key = backend
        .campaign(lease.id, &election(), "before".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    backend
        .proclaim(&key, "acknowledged".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(backend);
    for id in 1..=3 {
        group.kill(id).await;
    }
    for id in 1..=3 {
        group.restart(id).await;
    }
    group.wait_for_leader().await;
    let backend = group.backend(1);
    let leader = backend
        .leader(&election())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("leadership lost across restart"));
    assert_eq!(leader.key, key);
    assert_eq!(leader.value_str(), Some("acknowledged"));
    assert_eq!(
        backend.members(&member(7).role).await.unwrap_or_default(),
        vec![member(7)]
    );
    // The lease was recovered: it can be renewed, and tokens keep increasing.
    backend
        .keep_alive(lease.id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let other = backend
        .register(&member(8), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    backend.resign(&key).await.unwrap_or_else(|e| panic!("{e}"));
    let next = backend
        .campaign(other.id, &election(), "after".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(next.token > key.token);
    drop(backend);
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_cannot_renew_its_holder_fences_and_the_majority_moves_on() {
    let group = Group::start(3).await;
    let leader = group.leader().await;
    let majority: Vec<u64> = group
        .peers
        .keys()
        .copied()
        .filter(|id| *id != leader.id())
        .collect();
    let follower = group.nodes[&majority[0]].clone();
    let minority_backend: Arc<dyn Backend> = Arc::new(leader.clone());
    let active = session(Arc::clone(&minority_backend), 1, TTL).await;
    // The survivor's TTL must outlast a Raft leader change (TTL ≥ 3× failover).
    let standby = Arc::new(session(Arc::new(follower.clone()), 2, STANDBY_TTL).await);
    let old = active
        .campaign(&election(), "active")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let next = {
        let standby = Arc::clone(&standby);
        tokio::spawn(async move {
            let l = standby.campaign(&election(), "standby").await;
            (Instant::now(), l)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    group.faults.partition(&[leader.id()], &majority);
    let cut_at = Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(10), old.lost())
        .await
        .unwrap_or_else(|_| panic!("the partitioned holder never fenced itself"));
    let fenced_at = Instant::now();
    assert_eq!(reason, LossReason::SelfFenced);
    assert!(
        fenced_at - cut_at < TTL,
        "fenced {:?} after the cut",
        fenced_at - cut_at
    );

    let (elected_at, leadership) = match tokio::time::timeout(Duration::from_secs(20), next).await {
        Ok(Ok((at, Ok(l)))) => (at, l),
        other => panic!(
            "majority did not elect the standby: {:?}",
            other.map(|r| r.map(|(_, l)| l.map(|l| l.token())))
        ),
    };
    assert!(
        elected_at > fenced_at,
        "the standby was elected before the old holder stopped"
    );
    assert!(leadership.token() > old.token());
    eprintln!(
        "measured: partitioned holder fenced {:?} after the cut; standby elected {:?} after the cut",
        fenced_at - cut_at,
        elected_at - cut_at
    );

    // The minority side can neither register nor campaign.
    match minority_backend.register(&member(9), TTL).await {
        Err(Error::Unavailable(_)) | Err(Error::Timeout { .. }) => {}
        other => panic!("register on the minority gave {other:?}"),
    }

    // Heal: the old leader rejoins as a follower and sees the new leadership.
    group.faults.heal();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(l)) = minority_backend.leader(&election()).await {
            if l.token() == leadership.token() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "healed node never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop((active, old, leadership, minority_backend));
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_joins_is_promoted_and_removed() {
    let group = Group::start(3).await;
    let leader = group.leader().await;
    let port = common::free_ports(1)[0];
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // Node 4 starts with the group's peer list, which does not name it: it waits.
    let config = common::test_config(1, &group.peers, dir.path());
    let config = ha_raft::RaftNodeConfig {
        id: 4,
        listen: addr.parse().unwrap_or_else(|e| panic!("{e}")),
        ..config
    };
    let learner = ha_raft::RaftNode::start(config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let backend = group.backend(leader.id());
    let lease = backend
        .register(&member(1), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    leader
        .add_learner(4, addr.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        learner.wait_for_leader(Duration::from_secs(10)).await.ok(),
        Some(leader.id())
    );
    // The learner serves linearizable reads of what was written before it joined.
    assert_eq!(
        learner.members(&member(1).role).await.unwrap_or_default(),
        vec![member(1)]
    );
    leader.promote(&[4]).await.unwrap_or_else(|e| panic!("{e}"));
    let voters: Vec<u64> = leader
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(voters, vec![1, 2, 3, 4]);
    leader.remove(&[4]).await.unwrap_or_else(|e| panic!("{e}"));
    let nodes: Vec<u64> = leader
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(nodes, vec![1, 2, 3]);
    backend
        .revoke(lease.id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    learner.shutdown().await;
    drop(backend);
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_purge_the_log_so_disk_stays_bounded() {
    let ports = common::free_ports(1);
    let peers: std::collections::BTreeMap<u64, String> = [(1, format!("127.0.0.1:{}", ports[0]))]
        .into_iter()
        .collect();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = common::test_config(1, &peers, dir.path()).with_snapshot_every(100);
    let node = ha_raft::RaftNode::start(config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    node.wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let lease = node
        .register(&member(1), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for round in 0..300 {
        let key = node
            .campaign(lease.id, &election(), format!("r{round}").into())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        node.resign(&key).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let purged = node.raft().metrics().borrow().purged.map(|l| l.index);
        if purged.is_some_and(|p| p >= 400) {
            break;
        }
        assert!(Instant::now() < deadline, "log not purged: {purged:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.shutdown().await;
}

/// A leader stopped on purpose (not killed) hands over before it goes: every follower
/// stores its last entry and learns that what came before is committed, in the leader's
/// own term. A resign it committed last thus reaches the next candidate at once, not
/// after the next Raft election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_on_purpose_leaves_every_follower_knowing_its_last_commit() {
    let mut group = Group::start(3).await;
    let leader = group.leader().await;
    let term = leader.raft().metrics().borrow().current_term;
    let lease = leader
        .register(&member(1), STANDBY_TTL)
        .await
        .unwrap_or_else(|e| panic!("register: {e}"));
    let written = lease.id.get();
    let stopped = leader.id();
    drop(leader);
    group.kill(stopped).await;
    for (id, node) in &group.nodes {
        let mut metrics = node.raft().metrics();
        let seen = tokio::time::timeout(
            Duration::from_secs(10),
            metrics.wait_for(|m| {
                m.last_applied.is_some_and(|l| l.index >= written)
                    && m.last_log_index.is_some_and(|i| i > written)
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("node {id} never applied the write"))
        .unwrap_or_else(|e| panic!("node {id}: {e}"))
        .clone();
        // Without a handover the next entry would be a new leader's, in a new term.
        assert_eq!(
            seen.current_term, term,
            "node {id} learned of the commit only after a new Raft election"
        );
    }
    group.shutdown().await;
}
