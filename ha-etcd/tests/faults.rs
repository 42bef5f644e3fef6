//! A real etcd server restarted under a watch and a campaign, and paused (SIGSTOP) longer
//! than a session's TTL.

mod common;

use common::EtcdExt;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ha_core::{Backend, ElectionName, LeaderEvent, LossReason, Member, Role, ServerId, Session};
use tokio::time::Instant;

fn member(id: u64) -> Member {
    Member::new(
        ServerId::new(id),
        Role::new("rootcoord").unwrap_or_else(|e| panic!("{e}")),
        format!("10.0.0.{id}:53100"),
    )
}

fn election() -> ElectionName {
    ElectionName::new("rootcoord").unwrap_or_else(|e| panic!("{e}"))
}

async fn session(backend: &Arc<dyn Backend>, id: u64, ttl: Duration) -> Session {
    Session::builder(Arc::clone(backend), member(id))
        .ttl(ttl)
        .register()
        .await
        .unwrap_or_else(|e| panic!("register {id}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_etcd_loses_no_change_and_campaigns_complete() {
    let Some(mut etcd) = common::Etcd::start() else {
        return;
    };
    let backend: Arc<dyn Backend> =
        Arc::new(etcd.backend().await.unwrap_or_else(|e| panic!("{e}")));
    let a = session(&backend, 1, Duration::from_secs(10)).await;
    let b = Arc::new(session(&backend, 2, Duration::from_secs(10)).await);
    let la = a
        .campaign(&election(), "a")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut events = backend.watch(&election());
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        Ok(Some(Ok(LeaderEvent::Elected(l)))) => assert_eq!(l.token(), la.token()),
        other => panic!("{other:?}"),
    }
    let next = {
        let b = Arc::clone(&b);
        tokio::spawn(async move { b.campaign(&election(), "b").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    tokio::task::block_in_place(|| etcd.restart(Duration::from_secs(1)));

    // The sessions outlived the outage; the handover after it reaches both the waiting
    // campaign and the watch.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match la.resign().await {
            Ok(()) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "resign never succeeded after the restart: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let lb = match tokio::time::timeout(Duration::from_secs(20), next).await {
        Ok(Ok(Ok(l))) => l,
        other => panic!(
            "campaign across the restart: {:?}",
            other.map(|r| r.map(|l| l.map(|l| l.token())))
        ),
    };
    assert!(lb.token() > la.token());
    assert!(
        a.is_valid() && b.is_valid(),
        "sessions must survive a 1 s etcd restart"
    );
    match tokio::time::timeout(Duration::from_secs(20), events.next()).await {
        Ok(Some(Ok(LeaderEvent::Elected(l)))) => assert_eq!(l.token(), lb.token()),
        other => panic!("watch across the restart: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_etcd_longer_than_the_ttl_fences_the_holder_before_the_next_leader() {
    let Some(etcd) = common::Etcd::start() else {
        return;
    };
    let backend: Arc<dyn Backend> =
        Arc::new(etcd.backend().await.unwrap_or_else(|e| panic!("{e}")));
    let ttl = Duration::from_secs(2);
    let a = session(&backend, 1, ttl).await;
    let b = Arc::new(session(&backend, 2, Duration::from_secs(10)).await);
    let la = a
        .campaign(&election(), "a")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let next = {
        let b = Arc::clone(&b);
        tokio::spawn(async move {
            let l = b.campaign(&election(), "b").await;
            (Instant::now(), l)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    etcd.signal("STOP");
    let stopped_at = Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(5), la.lost()).await;
    let lost_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd.signal("CONT");
    assert_eq!(
        reason.ok(),
        Some(LossReason::SelfFenced),
        "the holder did not fence itself while etcd was paused"
    );
    assert!(
        lost_at - stopped_at < ttl,
        "fenced {:?} after the pause began",
        lost_at - stopped_at
    );

    let (elected_at, lb) = match tokio::time::timeout(Duration::from_secs(20), next).await {
        Ok(Ok((at, Ok(l)))) => (at, l),
        other => panic!(
            "standby not elected: {:?}",
            other.map(|r| r.map(|(_, l)| l.map(|l| l.token())))
        ),
    };
    assert!(
        elected_at > lost_at,
        "the standby led before the old holder stopped"
    );
    assert!(lb.token() > la.token());
    eprintln!(
        "measured: holder fenced {:?} after etcd paused; standby elected {:?} after the pause began",
        lost_at - stopped_at,
        elected_at - stopped_at
    );
}
