//! A keepalive reply must be credited to the request it answers. Between a real etcd and
//! the client sits a byte-level proxy (`ha_testkit::Proxy`) that holds one reply and then
//! stops passing anything the client sends: etcd hears no more renewals, so the lease ends
//! on etcd's schedule, and the client must have fenced itself by then.

mod common;

use common::EtcdExt;

use std::sync::Arc;
use std::time::Duration;

use ha_core::{Backend, ElectionName, Member, Role, ServerId, Session};
use ha_etcd::EtcdBackend;
use ha_testkit::{Direction, Fault, Proxy};
use tokio::time::{sleep, sleep_until, timeout, Instant};

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

async fn proxied(etcd: &common::Etcd) -> (Proxy, ha_etcd::EtcdConfig) {
    let upstream = etcd
        .endpoint()
        .parse()
        .unwrap_or_else(|e| panic!("etcd endpoint: {e}"));
    let proxy = Proxy::start(upstream)
        .await
        .unwrap_or_else(|e| panic!("proxy: {e}"));
    let mut config = etcd.config();
    config.endpoints = vec![proxy.addr().to_string()];
    (proxy, config)
}

/// A renewal reaches etcd, its reply is held past the caller's timeout, then etcd hears
/// nothing more and the reply is released. Returns what the next renewal, which etcd
/// never received, came back with.
async fn next_renewal_after_an_abandoned_one(
    etcd: &common::Etcd,
    mutant: bool,
) -> Result<ha_core::Result<Duration>, tokio::time::error::Elapsed> {
    let (proxy, config) = proxied(etcd).await;
    let mut backend = EtcdBackend::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    if mutant {
        backend = backend.with_stale_keepalive_mutant();
    }
    let lease = backend
        .register(&member(1), Duration::from_secs(6))
        .await
        .unwrap_or_else(|e| panic!("register: {e}"));
    backend
        .keep_alive(lease.id)
        .await
        .unwrap_or_else(|e| panic!("first keepalive: {e}"));

    // The round reaches etcd, its reply is held, and the caller gives up on it (as the
    // session does after its request timeout).
    proxy.set(Direction::ToClient, Fault::Hold);
    let abandoned = timeout(Duration::from_millis(500), backend.keep_alive(lease.id)).await;
    assert!(abandoned.is_err(), "the held round answered: {abandoned:?}");

    // From now on etcd hears nothing; the held reply arrives.
    proxy.set(Direction::ToServer, Fault::Drop);
    proxy.set(Direction::ToClient, Fault::Pass);
    sleep(Duration::from_millis(200)).await;
    timeout(Duration::from_secs(3), backend.keep_alive(lease.id)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_an_abandoned_round_is_never_credited_to_the_next() {
    let Some(etcd) = common::Etcd::start() else {
        return;
    };
    let next = next_renewal_after_an_abandoned_one(&etcd, false).await;
    assert!(
        !matches!(next, Ok(Ok(_))),
        "a renewal etcd never received was acknowledged (the abandoned round's reply): {next:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stale_stream_mutant_is_caught() {
    let Some(etcd) = common::Etcd::start() else {
        return;
    };
    let next = next_renewal_after_an_abandoned_one(&etcd, true).await;
    assert!(
        matches!(next, Ok(Ok(_))),
        "with abandoned streams reused, the stale reply should have acknowledged a renewal \
         etcd never received (the proxy scenario no longer catches the hole): {next:?}"
    );
}

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One session through the proxy leads; its next renewal reaches etcd but the reply is
/// held for 2.6 s (longer than the session's TTL/3 request timeout), and from just after
/// that renewal on nothing the client sends gets through. A second session, connected directly, is
/// elected once etcd expires the first lease. Returns whether the first still called
/// itself valid at that moment, and how long it stayed valid after.
async fn stale_reply_scenario() -> (bool, Duration) {
    // The scenario times a held reply against the session's request timeout: run alone,
    // not beside this binary's other etcd tests.
    let _alone = ONE_AT_A_TIME.lock().await;
    let etcd = match common::Etcd::start() {
        Some(etcd) => etcd,
        None => return (false, Duration::ZERO),
    };
    let ttl = Duration::from_secs(6);
    let (proxy, config) = proxied(&etcd).await;
    let through_proxy = EtcdBackend::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connect through the proxy: {e}"));
    // The second client, connected directly, in the same election.
    let direct: Arc<dyn Backend> = {
        let mut config = etcd.config();
        config.prefix = through_proxy.prefix().to_owned();
        Arc::new(
            EtcdBackend::connect(config)
                .await
                .unwrap_or_else(|e| panic!("connect: {e}")),
        )
    };
    let a = Session::builder(Arc::new(through_proxy), member(1))
        .ttl(ttl)
        .register()
        .await
        .unwrap_or_else(|e| panic!("register a: {e}"));
    let leading = a
        .campaign(&election(), "a")
        .await
        .unwrap_or_else(|e| panic!("campaign a: {e}"));
    // Wait for one renewal to complete, so the keepalive stream is open and the next
    // renewal is a message on it. Then hold what etcd sends; the next bytes the client
    // sends are that renewal. Once they are through, etcd hears nothing more.
    let registered = a.deadline();
    while a.deadline() == registered {
        assert!(
            registered.elapsed() < ttl,
            "the first renewal did not complete"
        );
        sleep(Duration::from_millis(10)).await;
    }
    sleep(Duration::from_millis(100)).await;
    proxy.set(Direction::ToClient, Fault::Hold);
    let before = proxy.traffic(Direction::ToServer).forwarded;
    let held_at = Instant::now();
    while proxy.traffic(Direction::ToServer).forwarded == before {
        assert!(
            held_at.elapsed() < ttl,
            "the session sent no renewal within its TTL"
        );
        sleep(Duration::from_millis(2)).await;
    }
    let renewed = Instant::now();
    sleep(Duration::from_millis(300)).await;
    proxy.set(Direction::ToServer, Fault::Drop);
    sleep_until(renewed + Duration::from_millis(2600)).await;
    proxy.set(Direction::ToClient, Fault::Pass);

    let b = Session::builder(direct, member(2))
        .ttl(ttl)
        .register()
        .await
        .unwrap_or_else(|e| panic!("register b: {e}"));
    let next = timeout(3 * ttl, b.campaign(&election(), "b"))
        .await
        .unwrap_or_else(|_| panic!("b was not elected within {:?}", 3 * ttl))
        .unwrap_or_else(|e| panic!("campaign b: {e}"));
    let valid_at_election = leading.is_valid();
    let elected = Instant::now();
    while leading.is_valid() && elected.elapsed() < 2 * ttl {
        sleep(Duration::from_millis(5)).await;
    }
    let overlap = if valid_at_election {
        elected.elapsed()
    } else {
        Duration::ZERO
    };
    assert!(next.token() > leading.token());
    assert!(!leading.is_valid(), "a never fenced itself");
    (valid_at_election, overlap)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_etcd_stopped_hearing_is_fenced_before_anyone_else_is_elected() {
    let (valid, overlap) = stale_reply_scenario().await;
    assert!(
        !valid,
        "the old leader called itself valid for {overlap:?} after the next one was elected"
    );
}
