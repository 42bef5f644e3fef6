//! The ha-core runtime (Session, Leadership) on the memory backend, mostly in virtual
//! time, so the order of events can be asserted on the clock.

use std::sync::Arc;
use std::time::Duration;

use ha_core::{
    Backend, ElectionName, Error, LossReason, Member, Role, ServerId, Session, SessionState,
};
use ha_memory::MemoryBackend;
use tokio::time::Instant;

fn member(id: u64) -> Member {
    Member::new(
        ServerId::new(id),
        role(),
        format!("127.0.0.1:{}", 53100 + id),
    )
}

fn role() -> Role {
    Role::new("rootcoord").unwrap_or_else(|e| panic!("{e}"))
}

fn election() -> ElectionName {
    ElectionName::new("rootcoord").unwrap_or_else(|e| panic!("{e}"))
}

async fn session(backend: &MemoryBackend, id: u64, ttl: Duration) -> Session {
    Session::builder(Arc::new(backend.clone()), member(id))
        .ttl(ttl)
        .register()
        .await
        .unwrap_or_else(|e| panic!("register {id}: {e}"))
}

/// The heart of the design: with its keepalives cut off, the holder stops (lost() fires,
/// is_valid() is false) strictly before the server expires its lease, and the next
/// candidate is elected only after that.
#[tokio::test(start_paused = true)]
async fn self_fencing_happens_before_expiry_and_before_the_next_leader() {
    let backend = MemoryBackend::new();
    let ttl = Duration::from_secs(10);
    let a = session(&backend, 1, ttl).await;
    let b = Arc::new(session(&backend, 2, ttl).await);
    let leadership = a
        .campaign(&election(), "a")
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Let a few keepalives succeed first, so the deadline comes from a renewal.
    tokio::time::sleep(ttl).await;
    assert!(leadership.is_valid());

    let next = {
        let b = Arc::clone(&b);
        tokio::spawn(async move {
            let l = b.campaign(&election(), "b").await;
            (Instant::now(), l)
        })
    };
    backend.fail_keep_alive_fault(a.lease(), true);
    let server_expiry = backend
        .lease_deadline(a.lease())
        .unwrap_or_else(|| panic!("lease already gone"));
    let fence_deadline = a.deadline();
    assert!(
        fence_deadline < server_expiry,
        "self-fence deadline {fence_deadline:?} not before server expiry {server_expiry:?}"
    );

    let reason = leadership.lost().await;
    let lost_at = Instant::now();
    assert_eq!(reason, LossReason::SelfFenced);
    assert!(!leadership.is_valid());
    assert!(!a.is_valid());
    assert_eq!(a.state(), SessionState::Lost(LossReason::SelfFenced));
    assert!(lost_at >= fence_deadline);
    assert!(
        lost_at < server_expiry,
        "lost at {lost_at:?}, server expiry {server_expiry:?}"
    );
    // The lease is still alive on the server at that moment: nobody else leads yet.
    assert!(backend.lease_deadline(a.lease()).is_some());
    assert!(!next.is_finished());

    let (elected_at, l2) = next.await.unwrap_or_else(|e| panic!("{e}"));
    let l2 = l2.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        elected_at >= server_expiry,
        "second leader before the first lease expired"
    );
    assert!(l2.token() > leadership.token());
    // Margin between the old holder stopping and the new one starting.
    assert!(elected_at - lost_at >= Duration::from_millis(500));
}

/// A session that loses its lease while waiting in line surfaces LeaseExpired and its
/// candidacy is gone.
#[tokio::test(start_paused = true)]
async fn session_lost_while_campaigning_surfaces_lease_expired() {
    let backend = MemoryBackend::new();
    let ttl = Duration::from_secs(10);
    let holder = session(&backend, 1, ttl).await;
    let _held = holder
        .campaign(&election(), "h")
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Expired on the server.
    let waiter = session(&backend, 2, ttl).await;
    let lease = waiter.lease();
    let b2 = backend.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        b2.expire_lease_fault(lease);
    });
    match waiter.campaign(&election(), "w").await {
        Err(Error::LeaseExpired { lease: gone }) => assert_eq!(gone, lease),
        other => panic!("{:?}", other.map(|l| l.token())),
    }

    // Self-fenced while waiting (keepalives cut off): fails before the server expiry.
    let waiter = session(&backend, 3, ttl).await;
    backend.fail_keep_alive_fault(waiter.lease(), true);
    let server_expiry = backend
        .lease_deadline(waiter.lease())
        .unwrap_or_else(|| panic!("gone"));
    match waiter.campaign(&election(), "w").await {
        Err(Error::LeaseExpired { .. }) => {}
        other => panic!("{:?}", other.map(|l| l.token())),
    }
    assert!(Instant::now() < server_expiry);
    // Dropping the campaign withdrew the candidacy even though the lease still lives.
    let leader = backend
        .leader(&election())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(leader.and_then(|l| l.server_id), Some(ServerId::new(1)));
    drop(holder);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(backend.leader(&election()).await.ok().flatten(), None);
}

#[tokio::test(start_paused = true)]
async fn dropped_session_revokes_and_hands_over() {
    let backend = MemoryBackend::new();
    let ttl = Duration::from_secs(30);
    let a = session(&backend, 1, ttl).await;
    let b = session(&backend, 2, ttl).await;
    let la = a
        .campaign(&election(), "a")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let next = tokio::spawn(async move {
        let l = b.campaign(&election(), "b").await.map(|l| l.token());
        (Instant::now(), l, b)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lease = a.lease();
    drop(a);
    let (at, token, _b) = next.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(token.unwrap_or_else(|e| panic!("{e}")) > la.token());
    assert!(
        at - started < Duration::from_secs(1),
        "handover took {:?}",
        at - started
    );
    assert!(backend.lease_deadline(lease).is_none());
    assert_eq!(la.lost().await, LossReason::Closed);
}

#[tokio::test(start_paused = true)]
async fn dropped_leadership_resigns() {
    let backend = MemoryBackend::new();
    let ttl = Duration::from_secs(30);
    let a = session(&backend, 1, ttl).await;
    let b = session(&backend, 2, ttl).await;
    let la = a
        .campaign(&election(), "a")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let first = la.token();
    drop(la);
    let lb = b
        .campaign(&election(), "b")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(lb.token() > first);
    assert!(
        a.is_valid(),
        "dropping a leadership must not end its session"
    );
}

/// Resign stops the leader at once, even when the backend cannot be told; a retry
/// later hands over.
#[tokio::test(start_paused = true)]
async fn resign_invalidates_first_and_can_be_retried() {
    let backend = MemoryBackend::new();
    let ttl = Duration::from_secs(30);
    let a = session(&backend, 1, ttl).await;
    let la = a
        .campaign(&election(), "a")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    backend.unavailable_fault(true);
    match la.resign().await {
        Err(Error::Unavailable(_)) => {}
        other => panic!("resign during an outage gave {other:?}"),
    }
    assert!(!la.is_valid());
    match la.proclaim("x").await {
        Err(Error::NotLeader { .. }) => {}
        other => panic!("proclaim after resign gave {other:?}"),
    }
    backend.unavailable_fault(false);
    la.resign().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(backend.leader(&election()).await.ok().flatten(), None);
}

/// An outage of the whole backend longer than the TTL: the holder fences itself and
/// the session is lost for good, even though the server comes back.
#[tokio::test(start_paused = true)]
async fn outage_longer_than_ttl_fences_the_holder() {
    let backend = MemoryBackend::new();
    let ttl = Duration::from_secs(5);
    let a = session(&backend, 1, ttl).await;
    let la = a
        .campaign(&election(), "a")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    backend.unavailable_fault(true);
    let started = Instant::now();
    assert_eq!(la.lost().await, LossReason::SelfFenced);
    assert!(started.elapsed() < ttl);
    backend.unavailable_fault(false);
    tokio::time::sleep(ttl).await;
    assert!(!a.is_valid());
    assert_eq!(backend.leader(&election()).await.ok().flatten(), None);
}

/// A process paused longer than its TTL (GC, SIGSTOP) must not act on its old
/// leadership when it resumes, even before its keepalive task has run again:
/// `is_valid()` reads the clock itself. Real time, one thread that we block.
#[test]
fn is_valid_turns_false_at_the_deadline_even_if_no_task_ran() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    runtime.block_on(async {
        let backend = MemoryBackend::new();
        let a = Session::builder(Arc::new(backend.clone()), member(1))
            .ttl(Duration::from_secs(1))
            .register()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let la = a
            .campaign(&election(), "a")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(la.is_valid());
        // Block the only runtime thread past the deadline: no task can run.
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(a.state(), SessionState::Alive, "no task should have run");
        assert!(!a.is_valid());
        assert!(!la.is_valid());
    });
}

/// A server that reports a TTL far above the one asked (a bug, a corrupt reply, a
/// hostile proxy) must not stretch the deadline past the lease it really keeps, nor
/// overflow the clock.
#[tokio::test(start_paused = true)]
async fn a_granted_ttl_above_the_one_asked_is_capped() {
    let backend = MemoryBackend::new();
    let ttl = Duration::from_secs(5);
    backend.granted_ttl_fault(Some(Duration::from_secs(u64::MAX / 4)));
    let a = session(&backend, 1, ttl).await;
    let leadership = a
        .campaign(&election(), "a")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(ttl).await;
    assert!(leadership.is_valid());
    assert!(
        a.deadline() <= Instant::now() + ttl,
        "the deadline is {:?} away, beyond the TTL asked",
        a.deadline() - Instant::now()
    );
    backend.fail_keep_alive_fault(a.lease(), true);
    tokio::time::sleep(ttl).await;
    assert!(!leadership.is_valid(), "the session never fenced itself");
    assert_eq!(a.state(), SessionState::Lost(LossReason::SelfFenced));
}
