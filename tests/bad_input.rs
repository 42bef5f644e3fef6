//! The bad inputs a user can hand the library, in one table: each is a typed error that
//! says what was wrong, never a panic. Backend-specific ones live next to their backend:
//! malformed and unreachable URLs in `tests/connect.rs`; garbage on the Raft port, a
//! wrong cluster id, foreign and corrupted sled dirs in `ha-raft/tests/bad_input.rs`.

use std::sync::Arc;
use std::time::Duration;

use ha::{Backend, ElectionName, Error, LeaderKey, Member, Role, ServerId, Session};

fn role() -> Role {
    Role::new("rootcoord").unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn names_are_validated_with_the_rule_they_break() {
    let long = "x".repeat(256);
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        (&long, "255"),
        ("a\0b", "control"),
        ("a/b", "/"),
        ("tab\there", "control"),
    ];
    for (name, says) in cases {
        for result in [
            Role::new(*name).map(|_| ()),
            ElectionName::new(*name).map(|_| ()),
        ] {
            match result {
                Err(Error::InvalidArgument { reason, .. }) => {
                    assert!(
                        reason.contains(says),
                        "{name:?}: {reason:?} should mention {says:?}"
                    )
                }
                other => panic!("{name:?} gave {other:?}"),
            }
        }
    }
    assert!(
        Role::new("x".repeat(255)).is_ok(),
        "255 bytes is the limit, inclusive"
    );
}

#[tokio::test(start_paused = true)]
async fn ttls_outside_the_bounds_name_the_ttl() {
    let backend: Arc<dyn Backend> = Arc::new(ha::memory::MemoryBackend::new());
    let floor = backend.capabilities().min_ttl;
    for ttl in [
        Duration::ZERO,
        floor.saturating_sub(Duration::from_millis(1)),
        ha::MAX_TTL + Duration::from_secs(1),
    ] {
        let member = Member::new(ServerId::new(1), role(), "a");
        let result = Session::builder(Arc::clone(&backend), member)
            .ttl(ttl)
            .register()
            .await;
        assert!(
            matches!(result, Err(Error::InvalidArgument { what: "ttl", .. })),
            "ttl {ttl:?}: {result:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn duplicate_ids_foreign_keys_and_stale_leaderships_are_refused() {
    let backend: Arc<dyn Backend> = Arc::new(ha::memory::MemoryBackend::new());
    let election = ElectionName::new("rootcoord").unwrap_or_else(|e| panic!("{e}"));
    let a = Session::builder(
        Arc::clone(&backend),
        Member::new(ServerId::new(1), role(), "a"),
    )
    .ttl(Duration::from_secs(5))
    .register()
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // The same server id in the same role while the first is alive.
    let duplicate = Session::builder(
        Arc::clone(&backend),
        Member::new(ServerId::new(1), role(), "b"),
    )
    .register()
    .await;
    assert!(
        matches!(duplicate, Err(Error::AlreadyRegistered { .. })),
        "{duplicate:?}"
    );

    // Resign or proclaim of a key nobody holds: resign is a no-op, proclaim NotLeader.
    let leadership = a
        .campaign(&election, "a")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let forged = LeaderKey {
        election: election.clone(),
        lease: ha::LeaseId::new(0xdead),
        token: ha::FencingToken::new(leadership.token().get() + 100),
    };
    assert!(
        backend.resign(&forged).await.is_ok(),
        "resigning what is gone is cleanup"
    );
    assert!(matches!(
        backend.proclaim(&forged, "x".into()).await,
        Err(Error::NotLeader { .. })
    ));

    // Proclaim after the leadership ended, and campaign after the session closed.
    leadership.resign().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        leadership.proclaim("late").await,
        Err(Error::NotLeader { .. })
    ));
    a.close().await.unwrap_or_else(|e| panic!("{e}"));

    // Keepalive and campaign on a lease that is gone.
    let gone = ha::LeaseId::new(0xdead);
    assert!(matches!(
        backend.keep_alive(gone).await,
        Err(Error::LeaseExpired { .. })
    ));
    assert!(matches!(
        backend.campaign(gone, &election, "x".into()).await,
        Err(Error::LeaseExpired { .. })
    ));
}
