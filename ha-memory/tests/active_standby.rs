//! The `ActiveStandby` coordinator loop on the memory backend, in virtual time: every
//! transition, the order "activation stopped, then STANDBY reported", the shutdown
//! handover, the loss policies and the exclusive (non-active-standby) mode.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ha_core::{
    Active, ActiveStandby, ActiveStandbyBuilder, Backend, CoordinatorEvent, ElectionName, Error,
    LeaseId, LossPolicy, LossReason, Outcome, Readiness, Role, RoleState, ServerId,
};
use ha_memory::MemoryBackend;
use tokio::sync::{broadcast, watch};
use tokio::time::{timeout, Instant};

const TTL: Duration = Duration::from_secs(5);

fn role() -> Role {
    Role::new("rootcoord").unwrap_or_else(|e| panic!("{e}"))
}

fn election() -> ElectionName {
    ElectionName::from_role(&role())
}

fn builder(backend: &MemoryBackend, id: u64) -> ActiveStandbyBuilder {
    ActiveStandby::builder(Arc::new(backend.clone()), role(), ServerId::new(id))
        .address(format!("127.0.0.1:{}", 53100 + id))
        .ttl(TTL)
}

/// An activation that reports ready and then serves until it is stopped.
async fn serve(active: Active) -> Result<(), Error> {
    active.ready().await?;
    std::future::pending::<()>().await;
    Ok(())
}

async fn state_where(
    rx: &mut watch::Receiver<RoleState>,
    what: &str,
    pred: impl FnMut(&RoleState) -> bool,
) -> RoleState {
    let waited = timeout(Duration::from_secs(60), rx.wait_for(pred))
        .await
        .map(|state| state.map(|state| *state));
    match waited {
        Ok(Ok(state)) => state,
        Ok(Err(_)) => panic!("state channel closed waiting for {what}"),
        Err(_) => panic!("timed out waiting for {what}; state is {:?}", *rx.borrow()),
    }
}

async fn next_event(events: &mut broadcast::Receiver<CoordinatorEvent>) -> CoordinatorEvent {
    match timeout(Duration::from_secs(60), events.recv()).await {
        Ok(Ok(event)) => event,
        Ok(Err(e)) => panic!("event channel: {e}"),
        Err(_) => panic!("timed out waiting for an event"),
    }
}

async fn registered_lease(events: &mut broadcast::Receiver<CoordinatorEvent>) -> LeaseId {
    match next_event(events).await {
        CoordinatorEvent::Registered { lease, .. } => lease,
        other => panic!("expected Registered, got {other:?}"),
    }
}

fn active_token(state: RoleState) -> u64 {
    match state {
        RoleState::Active { token, .. } => token.get(),
        other => panic!("not active: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn standby_then_active_then_ready_with_the_leader_value_saying_so() {
    let backend = MemoryBackend::new();
    let a = builder(&backend, 1);
    let mut a_state = a.watch_state();
    let mut a_events = a.subscribe();
    assert_eq!(*a_state.borrow(), RoleState::Starting);

    // The activation holds back readiness until the test lets it go.
    let (go, go_rx) = watch::channel(false);
    let a = a.spawn(move |active: Active| {
        let mut go_rx = go_rx.clone();
        async move {
            let _ = go_rx.wait_for(|go| *go).await;
            serve(active).await
        }
    });
    registered_lease(&mut a_events).await;
    assert!(matches!(
        next_event(&mut a_events).await,
        CoordinatorEvent::Standby { leader: None }
    ));
    let token = match next_event(&mut a_events).await {
        CoordinatorEvent::Elected { token } => token,
        other => panic!("expected Elected, got {other:?}"),
    };
    let state = state_where(&mut a_state, "activating", |s| {
        matches!(s, RoleState::Active { ready: false, .. })
    })
    .await;
    assert_eq!(state.as_str(), "activating");
    let leader = backend
        .leader(&election())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("a leads"));
    assert_eq!(
        Readiness::parse(&leader.value),
        Some((Readiness::Activating, "127.0.0.1:53101")),
        "clients must not be routed to a half-started active"
    );

    // A second replica waits in line.
    let b = builder(&backend, 2);
    let mut b_state = b.watch_state();
    let b = b.spawn(serve);
    state_where(&mut b_state, "b standby", |s| *s == RoleState::Standby).await;

    go.send_replace(true);
    assert_eq!(
        next_event(&mut a_events).await,
        CoordinatorEvent::Ready { token }
    );
    assert!(a.state().is_ready_active());
    let leader = backend
        .leader(&election())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("a leads"));
    assert_eq!(
        Readiness::parse(&leader.value),
        Some((Readiness::Active, "127.0.0.1:53101"))
    );
    assert_eq!(leader.token(), token);

    // Still standby much later: the active keeps its lease.
    tokio::time::sleep(TTL * 4).await;
    assert_eq!(b.state(), RoleState::Standby);
    assert!(a.state().is_ready_active());

    assert_eq!(
        a.stop().await.unwrap_or_else(|e| panic!("{e}")),
        Outcome::Shutdown
    );
    assert_eq!(
        b.stop().await.unwrap_or_else(|e| panic!("{e}")),
        Outcome::Shutdown
    );
}

/// Records when the activation future was dropped (stopped), for order assertions.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn the_activation_is_stopped_before_standby_is_reported_and_the_next_takes_over() {
    let backend = MemoryBackend::new();
    let stopped = Arc::new(AtomicBool::new(false));
    let a = builder(&backend, 1).on_loss(LossPolicy::Recampaign);
    let mut a_state = a.watch_state();
    let mut a_events = a.subscribe();
    let flag = Arc::clone(&stopped);
    let a = a.spawn(move |active: Active| {
        let guard = DropFlag(Arc::clone(&flag));
        async move {
            let _guard = guard;
            serve(active).await
        }
    });
    let a_lease = registered_lease(&mut a_events).await;
    let first = active_token(state_where(&mut a_state, "a active", |s| s.is_ready_active()).await);

    // b's activation checks, when it starts, that a's activation has stopped.
    let b = builder(&backend, 2);
    let mut b_state = b.watch_state();
    let a_stopped_first = Arc::new(AtomicBool::new(false));
    let (a_flag, b_saw) = (Arc::clone(&stopped), Arc::clone(&a_stopped_first));
    let b = b.spawn(move |active: Active| {
        b_saw.store(a_flag.load(Ordering::SeqCst), Ordering::SeqCst);
        serve(active)
    });
    state_where(&mut b_state, "b standby", |s| *s == RoleState::Standby).await;

    // Cut a's keepalives: it fences itself, stops the activation, then reports STANDBY.
    backend.fail_keep_alive_fault(a_lease, true);
    let cut = Instant::now();
    let state = state_where(&mut a_state, "a no longer active", |s| {
        !matches!(s, RoleState::Active { .. })
    })
    .await;
    assert!(
        stopped.load(Ordering::SeqCst),
        "{state:?} was reported while the activation still ran"
    );
    let fenced_after = cut.elapsed();
    assert!(fenced_after < TTL, "fenced {fenced_after:?} after the cut");

    let second = active_token(state_where(&mut b_state, "b active", |s| s.is_ready_active()).await);
    assert!(second > first, "tokens increase: {first} then {second}");
    assert!(
        a_stopped_first.load(Ordering::SeqCst),
        "b's activation started while a's still ran"
    );

    // Under Recampaign, a registers a new session and waits in line behind b.
    let mut saw = Vec::new();
    loop {
        let event = next_event(&mut a_events).await;
        let done = matches!(event, CoordinatorEvent::Standby { .. })
            && saw
                .iter()
                .any(|e| matches!(e, CoordinatorEvent::Registered { .. }));
        saw.push(event);
        if done {
            break;
        }
    }
    assert!(
        saw.iter().any(|e| matches!(
            e,
            CoordinatorEvent::Lost { reason: LossReason::SelfFenced, token } if token.get() == first
        )),
        "events after the cut: {saw:?}"
    );
    assert!(saw
        .iter()
        .any(|e| matches!(e, CoordinatorEvent::Registered { lease, .. } if *lease != a_lease)));
    assert_eq!(a.state(), RoleState::Standby);

    a.stop().await.unwrap_or_else(|e| panic!("{e}"));
    b.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(start_paused = true)]
async fn exit_policy_stops_the_loop_with_the_loss_reason() {
    let backend = MemoryBackend::new();
    let a = builder(&backend, 1); // LossPolicy::Exit is the default
    let mut a_state = a.watch_state();
    let mut a_events = a.subscribe();
    let a = a.spawn(serve);
    let lease = registered_lease(&mut a_events).await;
    state_where(&mut a_state, "a active", |s| s.is_ready_active()).await;

    backend.expire_lease_fault(lease);
    let outcome = timeout(Duration::from_secs(60), a.wait())
        .await
        .unwrap_or_else(|_| panic!("the loop did not stop"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome, Outcome::Lost(LossReason::LeaseExpired));
    assert_eq!(*a_state.borrow(), RoleState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn exit_policy_also_stops_when_the_session_is_lost_in_standby() {
    let backend = MemoryBackend::new();
    let a = builder(&backend, 1).spawn(serve);
    let b = builder(&backend, 2);
    let mut b_events = b.subscribe();
    let b = b.spawn(serve);
    let lease = registered_lease(&mut b_events).await;
    backend.expire_lease_fault(lease);
    let outcome = timeout(Duration::from_secs(60), b.wait())
        .await
        .unwrap_or_else(|_| panic!("the loop did not stop"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome, Outcome::Lost(LossReason::LeaseExpired));
    assert!(
        matches!(a.state(), RoleState::Active { .. }),
        "a is untouched"
    );
    a.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_the_activation_resigns_and_revokes_so_the_standby_takes_over_at_once() {
    let backend = MemoryBackend::new();
    let stopped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stopped);
    let a = builder(&backend, 1);
    let mut a_state = a.watch_state();
    let mut a_events = a.subscribe();
    let a = a.spawn(move |active: Active| {
        let guard = DropFlag(Arc::clone(&flag));
        async move {
            let _guard = guard;
            serve(active).await
        }
    });
    let a_lease = registered_lease(&mut a_events).await;
    let first = active_token(state_where(&mut a_state, "a active", |s| s.is_ready_active()).await);
    let b = builder(&backend, 2);
    let mut b_state = b.watch_state();
    let b = b.spawn(serve);
    state_where(&mut b_state, "b standby", |s| *s == RoleState::Standby).await;

    // SIGTERM-like: the shutdown signal completes.
    let begun = Instant::now();
    a.shutdown();
    let second = active_token(state_where(&mut b_state, "b active", |s| s.is_ready_active()).await);
    assert!(second > first);
    assert!(
        begun.elapsed() < Duration::from_millis(100),
        "handover took {:?} of virtual time: it waited for a TTL",
        begun.elapsed()
    );
    assert_eq!(
        a.wait().await.unwrap_or_else(|e| panic!("{e}")),
        Outcome::Shutdown
    );
    assert!(stopped.load(Ordering::SeqCst));
    let mut tail = Vec::new();
    while let Ok(event) = a_events.try_recv() {
        tail.push(event);
    }
    assert!(
        tail.ends_with(&[
            CoordinatorEvent::Resigned {
                token: ha_core::FencingToken::new(first)
            },
            CoordinatorEvent::Stopped
        ]),
        "{tail:?}"
    );
    let members = backend
        .members(&role())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        members.iter().all(|m| m.server_id != ServerId::new(1)),
        "a's session was revoked: {members:?}"
    );
    assert!(backend.lease_deadline(a_lease).is_none());
    b.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(start_paused = true)]
async fn shutdown_on_a_signal_future() {
    let backend = MemoryBackend::new();
    let (signal, signal_rx) = tokio::sync::oneshot::channel::<()>();
    let a = builder(&backend, 1).shutdown_on(async move {
        let _ = signal_rx.await;
    });
    let mut a_state = a.watch_state();
    let running = tokio::spawn(a.run(serve));
    state_where(&mut a_state, "a active", |s| s.is_ready_active()).await;
    let _ = signal.send(());
    let outcome = running
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome, Outcome::Shutdown);
    assert_eq!(
        backend
            .leader(&election())
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        None
    );
}

#[tokio::test(start_paused = true)]
async fn an_activation_error_resigns_and_is_returned() {
    let backend = MemoryBackend::new();
    let a = builder(&backend, 1).spawn(|_active: Active| async {
        Err::<(), _>(std::io::Error::other("cannot load metadata"))
    });
    let b = builder(&backend, 2);
    let mut b_state = b.watch_state();
    let b = b.spawn(serve);
    match a.wait().await {
        Err(Error::Activation { source }) => {
            assert!(
                source.to_string().contains("cannot load metadata"),
                "{source}"
            );
        }
        other => panic!("expected Activation, got {other:?}"),
    }
    let begun = Instant::now();
    state_where(&mut b_state, "b active", |s| s.is_ready_active()).await;
    assert!(
        begun.elapsed() < TTL,
        "b waited for a TTL: a did not resign"
    );
    b.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_activation_is_an_activation_error_not_a_crash() {
    let backend = MemoryBackend::new();
    let a = builder(&backend, 1).spawn(|_active: Active| async {
        if std::hint::black_box(true) {
            panic!("boom");
        }
        Ok::<(), Error>(())
    });
    assert!(matches!(a.wait().await, Err(Error::Activation { .. })));
    assert_eq!(
        backend
            .leader(&election())
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        None,
        "the leadership was resigned"
    );
}

#[tokio::test(start_paused = true)]
async fn an_activation_that_returns_ok_finishes_the_loop() {
    let backend = MemoryBackend::new();
    let outcome = builder(&backend, 1)
        .run(|active: Active| async move { active.ready().await })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome, Outcome::Finished);
    assert!(backend
        .members(&role())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .is_empty());
}

#[tokio::test(start_paused = true)]
async fn disabled_active_standby_is_a_single_exclusive_active() {
    let backend = MemoryBackend::new();
    let a = builder(&backend, 1).enabled(false);
    let mut a_state = a.watch_state();
    let a = a.spawn(serve);
    state_where(&mut a_state, "a active", |s| s.is_ready_active()).await;

    let refused = builder(&backend, 2).enabled(false).run(serve).await;
    match refused {
        Err(Error::AlreadyRegistered { role: r, server_id }) => {
            assert_eq!(r, role());
            assert_eq!(
                server_id,
                ServerId::new(1),
                "the error names the live instance"
            );
        }
        other => panic!("expected AlreadyRegistered, got {other:?}"),
    }
    // The refused start left nothing behind, and a is untouched.
    let members = backend
        .members(&role())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(members.len(), 1, "{members:?}");
    assert!(a.state().is_ready_active());

    a.stop().await.unwrap_or_else(|e| panic!("{e}"));
    let c = builder(&backend, 3).enabled(false);
    let mut c_state = c.watch_state();
    let c = c.spawn(serve);
    state_where(&mut c_state, "c active once a is gone", |s| {
        s.is_ready_active()
    })
    .await;
    c.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(start_paused = true)]
async fn a_bad_ttl_is_a_typed_error_at_start() {
    let backend = MemoryBackend::new();
    let result = builder(&backend, 1).ttl(Duration::ZERO).run(serve).await;
    assert!(
        matches!(result, Err(Error::InvalidArgument { what: "ttl", .. })),
        "{result:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_handle_shuts_down_and_hands_over() {
    let backend = MemoryBackend::new();
    let a = builder(&backend, 1);
    let mut a_state = a.watch_state();
    let a = a.spawn(serve);
    state_where(&mut a_state, "a active", |s| s.is_ready_active()).await;
    let b = builder(&backend, 2);
    let mut b_state = b.watch_state();
    let b = b.spawn(serve);
    state_where(&mut b_state, "b standby", |s| *s == RoleState::Standby).await;
    let begun = Instant::now();
    drop(a);
    state_where(&mut b_state, "b active", |s| s.is_ready_active()).await;
    assert!(begun.elapsed() < Duration::from_millis(100));
    state_where(&mut a_state, "a stopped", |s| *s == RoleState::Stopped).await;
    b.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(start_paused = true)]
async fn a_zero_standby_log_interval_does_not_break_the_loop() {
    let backend = MemoryBackend::new();
    let a = builder(&backend, 1).standby_log_interval(Duration::ZERO);
    let mut a_state = a.watch_state();
    let a = a.spawn(serve);
    state_where(&mut a_state, "a active", |s| s.is_ready_active()).await;
    let b = builder(&backend, 2).standby_log_interval(Duration::ZERO);
    let mut b_state = b.watch_state();
    let b = b.spawn(serve);
    state_where(&mut b_state, "b standby", |s| *s == RoleState::Standby).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(b.state(), RoleState::Standby);
    a.stop().await.unwrap_or_else(|e| panic!("{e}"));
    state_where(&mut b_state, "b active", |s| s.is_ready_active()).await;
    b.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

/// An activation that gives up because ready() found its leadership gone lost the
/// leadership; it did not fail. Under Recampaign the loop goes on.
#[tokio::test(start_paused = true)]
async fn an_activation_ending_on_a_lost_leadership_is_a_loss_not_a_failure() {
    let backend = MemoryBackend::new();
    let a = builder(&backend, 1).on_loss(LossPolicy::Recampaign);
    let mut a_state = a.watch_state();
    let mut a_events = a.subscribe();
    let first = Arc::new(AtomicBool::new(true));
    let expire = backend.clone();
    let a = a.spawn(move |active: Active| {
        let (backend, first) = (expire.clone(), Arc::clone(&first));
        async move {
            if first.swap(false, Ordering::SeqCst) {
                // The lease dies while activating; ready() then hears NotLeader or
                // LeaseExpired from the backend before the leader watch says so.
                backend.expire_lease_fault(active.leadership().key().lease);
                active.ready().await?;
                unreachable!("ready() after the lease expired succeeded");
            }
            serve(active).await
        }
    });
    let mut saw = Vec::new();
    loop {
        let event = next_event(&mut a_events).await;
        let done = matches!(event, CoordinatorEvent::Ready { .. });
        saw.push(event);
        if done {
            break;
        }
    }
    assert!(
        saw.iter()
            .any(|e| matches!(e, CoordinatorEvent::Lost { .. })),
        "{saw:?}"
    );
    assert!(
        !saw.iter().any(|e| matches!(e, CoordinatorEvent::Stopped)),
        "{saw:?}"
    );
    state_where(&mut a_state, "a active again", |s| s.is_ready_active()).await;
    a.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(start_paused = true)]
async fn with_a_stop_grace_the_activation_finishes_its_cleanup_before_the_handover() {
    let backend = MemoryBackend::new();
    let cleaned = Arc::new(AtomicBool::new(false));
    let a = {
        let cleaned = Arc::clone(&cleaned);
        builder(&backend, 1)
            .stop_grace(Duration::from_secs(2))
            .spawn(move |active: Active| {
                let cleaned = Arc::clone(&cleaned);
                async move {
                    active.ready().await?;
                    // The deadline is a TTL ahead at most, and ahead of now.
                    let left = active.deadline() - Instant::now();
                    assert!(left > Duration::ZERO && left <= TTL, "{left:?}");
                    active.stopping().cancelled().await;
                    // Cleanup that takes a while (a child stopping), inside the grace.
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    cleaned.store(true, Ordering::SeqCst);
                    Ok::<_, Error>(())
                }
            })
    };
    let mut a_state = a.watch_state();
    state_where(&mut a_state, "a ready", RoleState::is_ready_active).await;
    let b = builder(&backend, 2).spawn(serve);
    let mut b_state = b.watch_state();
    state_where(&mut b_state, "b standby", |s| *s == RoleState::Standby).await;
    let stopped = Instant::now();
    a.shutdown();
    state_where(&mut b_state, "b active", |s| {
        matches!(s, RoleState::Active { .. })
    })
    .await;
    assert!(
        cleaned.load(Ordering::SeqCst),
        "b took over before a's cleanup"
    );
    assert!(stopped.elapsed() >= Duration::from_millis(1500));
    let _ = a.wait().await;

    // Beyond the grace the activation is dropped, as without one.
    let slow = builder(&backend, 3)
        .stop_grace(Duration::from_millis(200))
        .spawn(|active: Active| async move {
            active.ready().await?;
            active.stopping().cancelled().await;
            std::future::pending::<()>().await;
            Ok::<_, Error>(())
        });
    b.shutdown();
    let mut slow_state = slow.watch_state();
    state_where(&mut slow_state, "slow ready", RoleState::is_ready_active).await;
    let stopped = Instant::now();
    let outcome = timeout(Duration::from_secs(10), slow.stop()).await;
    assert!(matches!(outcome, Ok(Ok(Outcome::Shutdown))), "{outcome:?}");
    assert!(stopped.elapsed() < Duration::from_secs(1));
}
