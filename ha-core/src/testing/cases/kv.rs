//! Clause 10: the guarded store.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::election::forged_keys;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::kv::{KvKey, KvWrite};
use crate::testing::util::{
    election, eventually, expiry_grace, register, settle, short_ttl, spawn_campaign, test_member,
    won, PROMPT,
};
use crate::types::{ElectionName, FencingToken, LeaderKey};

// ---- clause 10: the guarded store ---------------------------------------------------

fn kv_key(key: &str) -> KvKey {
    KvKey::new(key).unwrap_or_else(|e| panic!("{e}"))
}

fn put(key: &str, value: &str) -> KvWrite {
    KvWrite::Put {
        key: kv_key(key),
        value: Bytes::copy_from_slice(value.as_bytes()),
    }
}

pub(super) async fn read_str(
    b: &Arc<dyn Backend>,
    e: &ElectionName,
    key: &str,
) -> Result<Option<String>> {
    Ok(b.kv_read(e, &kv_key(key))
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Fails the case unless `result` is `NotLeader` of election `e`; returns its token.
fn expect_not_leader<T: std::fmt::Debug>(
    result: Result<T>,
    e: &ElectionName,
    what: &str,
) -> Option<FencingToken> {
    match result {
        Err(Error::NotLeader { election, current }) => {
            assert_eq!(&election, e, "{what}: NotLeader names the wrong election");
            current
        }
        other => panic!("{what} gave {other:?}, expected NotLeader"),
    }
}

pub(super) async fn kv_leader_writes_and_everyone_reads(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-basic");
    let leader = register(&b, 1).await?;
    let _reader = register(&b, 2).await?;
    let key = b.campaign(leader.id, &e, "a".into()).await?;
    assert_eq!(read_str(&b, &e, "config").await?, None);
    let first = b.kv_write(&key, put("config", "v1")).await?;
    assert!(first.applied);
    assert_eq!(first.previous, None);
    let second = b.kv_write(&key, put("config", "v2")).await?;
    assert_eq!(second.previous.as_deref(), Some(&b"v1"[..]));
    // A reader needs no leadership (and no session).
    assert_eq!(read_str(&b, &e, "config").await?.as_deref(), Some("v2"));
    b.kv_write(&key, put("segments/7/state", "sealed")).await?;
    assert_eq!(
        read_str(&b, &e, "segments/7/state").await?.as_deref(),
        Some("sealed")
    );
    let deleted = b
        .kv_write(
            &key,
            KvWrite::Delete {
                key: kv_key("config"),
            },
        )
        .await?;
    assert!(deleted.applied);
    assert_eq!(deleted.previous.as_deref(), Some(&b"v2"[..]));
    let again = b
        .kv_write(
            &key,
            KvWrite::Delete {
                key: kv_key("config"),
            },
        )
        .await?;
    assert!(
        !again.applied,
        "deleting an absent key reports it was absent"
    );
    assert_eq!(read_str(&b, &e, "config").await?, None);
    Ok(())
}

pub(super) async fn kv_compare_and_set_swaps_only_on_match(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-cas");
    let lease = register(&b, 1).await?;
    let key = b.campaign(lease.id, &e, "a".into()).await?;
    let cas = |expected: Option<&'static str>, new: Option<&'static str>| KvWrite::CompareAndSet {
        key: kv_key("counter"),
        expected: expected.map(|v| Bytes::from_static(v.as_bytes())),
        new: new.map(|v| Bytes::from_static(v.as_bytes())),
    };
    // Create only if absent.
    assert!(b.kv_write(&key, cas(None, Some("1"))).await?.applied);
    let taken = b.kv_write(&key, cas(None, Some("x"))).await?;
    assert!(!taken.applied);
    assert_eq!(taken.previous.as_deref(), Some(&b"1"[..]));
    // Swap on match; a stale expectation reports the current value.
    assert!(b.kv_write(&key, cas(Some("1"), Some("2"))).await?.applied);
    let stale = b.kv_write(&key, cas(Some("1"), Some("3"))).await?;
    assert!(!stale.applied);
    assert_eq!(stale.previous.as_deref(), Some(&b"2"[..]));
    assert_eq!(read_str(&b, &e, "counter").await?.as_deref(), Some("2"));
    // Delete on match.
    assert!(b.kv_write(&key, cas(Some("2"), None)).await?.applied);
    assert_eq!(read_str(&b, &e, "counter").await?, None);
    Ok(())
}

pub(super) async fn kv_write_after_resign_is_not_leader(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-resign");
    let a = register(&b, 1).await?;
    let c = register(&b, 2).await?;
    let old = b.campaign(a.id, &e, "a".into()).await?;
    b.kv_write(&old, put("k", "old")).await?;
    b.resign(&old).await?;
    // Rejected while nobody leads...
    expect_not_leader(
        b.kv_write(&old, put("k", "stale")).await,
        &e,
        "write after resign",
    );
    // ...and once another leads, the rejection names the new token.
    let new = b.campaign(c.id, &e, "c".into()).await?;
    let current = expect_not_leader(
        b.kv_write(&old, put("k", "stale")).await,
        &e,
        "write after a new leader",
    );
    assert_eq!(current, Some(new.token));
    assert_eq!(read_str(&b, &e, "k").await?.as_deref(), Some("old"));
    Ok(())
}

pub(super) async fn kv_write_after_lease_loss_is_not_leader(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-lease-loss");
    let ttl = short_ttl(&*b);
    let lease = b.register(&test_member(1), ttl).await?;
    let key = b.campaign(lease.id, &e, "a".into()).await?;
    b.kv_write(&key, put("k", "before")).await?;
    // No keepalives: the lease expires by its TTL.
    let backend = Arc::clone(&b);
    let e2 = e.clone();
    eventually(
        "lease expiry empties the election",
        ttl + expiry_grace(&*b),
        || {
            let backend = Arc::clone(&backend);
            let e = e2.clone();
            async move { matches!(backend.leader(&e).await, Ok(None)) }
        },
    )
    .await;
    expect_not_leader(
        b.kv_write(&key, put("k", "after")).await,
        &e,
        "write after lease expiry",
    );
    // And after an explicit revoke.
    let revoked = register(&b, 2).await?;
    let key2 = b.campaign(revoked.id, &e, "c".into()).await?;
    b.revoke(revoked.id).await?;
    expect_not_leader(
        b.kv_write(&key2, put("k", "after revoke")).await,
        &e,
        "write after revoke",
    );
    assert_eq!(read_str(&b, &e, "k").await?.as_deref(), Some("before"));
    Ok(())
}

pub(super) async fn kv_write_with_foreign_key_is_not_leader(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-forged");
    let a = register(&b, 1).await?;
    let c = register(&b, 2).await?;
    let key = b.campaign(a.id, &e, "a".into()).await?;
    // A waiting candidate's lease cannot write either.
    let _waiting = spawn_campaign(&b, &c, &e, "c");
    settle().await;
    let forged = forged_keys(&key, c.id, election("kv-elsewhere"));
    for forged in forged {
        expect_not_leader(
            b.kv_write(&forged, put("k", "forged")).await,
            &forged.election,
            "write with a forged key",
        );
    }
    assert_eq!(read_str(&b, &e, "k").await?, None);
    assert_eq!(read_str(&b, &election("kv-elsewhere"), "k").await?, None);
    Ok(())
}

pub(super) async fn kv_new_leader_reads_old_leaders_last_write(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-takeover");
    let a = register(&b, 1).await?;
    let c = register(&b, 2).await?;
    let old = b.campaign(a.id, &e, "a".into()).await?;
    let next = spawn_campaign(&b, &c, &e, "c");
    settle().await;
    for i in 0..20 {
        b.kv_write(&old, put("meta", &format!("v{i}"))).await?;
    }
    // The old leader dies: its lease is revoked, the standby takes over.
    b.revoke(a.id).await?;
    let new = won(next).await?;
    assert!(new.token > old.token);
    assert_eq!(read_str(&b, &e, "meta").await?.as_deref(), Some("v19"));
    // The new leader continues from there; the old one is shut out.
    b.kv_write(&new, put("meta", "v20")).await?;
    expect_not_leader(
        b.kv_write(&old, put("meta", "v19-stale")).await,
        &e,
        "the old leader's write",
    );
    assert_eq!(read_str(&b, &e, "meta").await?.as_deref(), Some("v20"));
    Ok(())
}

pub(super) async fn kv_concurrent_stale_and_fresh_writers_only_fresh_lands(
    b: Arc<dyn Backend>,
) -> Result<()> {
    let e = election("kv-race");
    let a = register(&b, 1).await?;
    let c = register(&b, 2).await?;
    let old = b.campaign(a.id, &e, "a".into()).await?;
    let next = spawn_campaign(&b, &c, &e, "c");
    settle().await;
    // The stale writer keeps writing across the handover, as an old active that has not
    // noticed would; it stops at its first rejection or after 200 writes.
    let stale = {
        let (b, old) = (Arc::clone(&b), old.clone());
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            for i in 0..200 {
                match b.kv_write(&old, put("owner", &format!("stale-{i}"))).await {
                    Ok(_) => accepted.push(i),
                    Err(Error::NotLeader { .. }) => return (accepted, true),
                    Err(other) => panic!("stale write {i} gave {other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (accepted, false)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.resign(&old).await?;
    let new = won(next).await?;
    // From here on, the fresh leader's writes land and no stale write can.
    let fresh = {
        let (b, new) = (Arc::clone(&b), new.clone());
        tokio::spawn(async move {
            for i in 0..20 {
                b.kv_write(&new, put("owner", &format!("fresh-{i}")))
                    .await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, Error>(())
        })
    };
    let (accepted, rejected) = match tokio::time::timeout(PROMPT * 3, stale).await {
        Ok(Ok(result)) => result,
        other => panic!("stale writer did not finish: {other:?}"),
    };
    assert!(rejected, "the stale writer was never rejected");
    match tokio::time::timeout(PROMPT * 3, fresh).await {
        Ok(Ok(result)) => result?,
        other => panic!("fresh writer did not finish: {other:?}"),
    }
    assert_eq!(
        read_str(&b, &e, "owner").await?.as_deref(),
        Some("fresh-19")
    );
    // Even now, with the fresh leader done, a stale write is refused.
    let current = expect_not_leader(
        b.kv_write(&old, put("owner", "stale-late")).await,
        &e,
        "a late stale write",
    );
    assert_eq!(current, Some(new.token));
    assert!(accepted.len() < 200, "{accepted:?}");
    Ok(())
}

pub(super) async fn kv_namespaces_are_per_election(b: Arc<dyn Backend>) -> Result<()> {
    let (one, two) = (election("kv-one"), election("kv-two"));
    let lease = register(&b, 1).await?;
    let k1 = b.campaign(lease.id, &one, "a".into()).await?;
    let k2 = b.campaign(lease.id, &two, "a".into()).await?;
    b.kv_write(&k1, put("k", "one")).await?;
    b.kv_write(&k2, put("k", "two")).await?;
    assert_eq!(read_str(&b, &one, "k").await?.as_deref(), Some("one"));
    assert_eq!(read_str(&b, &two, "k").await?.as_deref(), Some("two"));
    // Leading one election does not let a key write into another.
    expect_not_leader(
        b.kv_write(
            &LeaderKey {
                election: election("kv-three"),
                ..k1.clone()
            },
            put("k", "three"),
        )
        .await,
        &election("kv-three"),
        "a write into an election not led",
    );
    // The store outlives the leaderships and the session.
    b.revoke(lease.id).await?;
    assert_eq!(read_str(&b, &one, "k").await?.as_deref(), Some("one"));
    Ok(())
}

pub(super) async fn kv_sizes_over_the_limits_are_too_large(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-limits");
    let limits = b.capabilities().kv_limits;
    let lease = register(&b, 1).await?;
    let key = b.campaign(lease.id, &e, "a".into()).await?;
    let long_key = "k".repeat(limits.max_key_bytes + 1);
    match b.kv_write(&key, put(&long_key, "v")).await {
        Err(Error::TooLarge {
            what: "key",
            size,
            limit,
        }) => {
            assert_eq!(
                (size, limit),
                (limits.max_key_bytes + 1, limits.max_key_bytes)
            );
        }
        other => panic!("an over-long key gave {other:?}"),
    }
    match b.kv_read(&e, &kv_key(&long_key)).await {
        Err(Error::TooLarge { what: "key", .. }) => {}
        other => panic!("reading an over-long key gave {other:?}"),
    }
    let big = KvWrite::Put {
        key: kv_key("big"),
        value: Bytes::from(vec![b'x'; limits.max_value_bytes + 1]),
    };
    match b.kv_write(&key, big).await {
        Err(Error::TooLarge {
            what: "value",
            size,
            ..
        }) => {
            assert_eq!(size, limits.max_value_bytes + 1);
        }
        other => panic!("an over-long value gave {other:?}"),
    }
    // At the limits exactly, it fits.
    let exact = KvWrite::Put {
        key: kv_key(&"k".repeat(limits.max_key_bytes)),
        value: Bytes::from(vec![b'x'; limits.max_value_bytes]),
    };
    b.kv_write(&key, exact).await?;
    let back = b
        .kv_read(&e, &kv_key(&"k".repeat(limits.max_key_bytes)))
        .await?;
    assert_eq!(back.map(|v| v.len()), Some(limits.max_value_bytes));
    assert!(matches!(
        KvKey::new(""),
        Err(Error::InvalidArgument { what: "key", .. })
    ));
    Ok(())
}
