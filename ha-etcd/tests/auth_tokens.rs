//! etcd auth tokens that expire or vanish while a candidate waits (the class of
//! etcd-io/etcd#17623): `auth enable`, a 2 s token TTL (`--auth-token-ttl`), and an
//! etcd restart, which drops every simple token. A campaign blocked for several token
//! TTLs still wins when the leader resigns, sessions keep their leases through both,
//! and a watch reopened with a token etcd no longer knows recovers instead of spinning.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::Etcd;
use futures::StreamExt;
use ha_core::{Backend, ElectionName, LeaderEvent, Member, Role, ServerId, Session};
use ha_etcd::{EtcdBackend, EtcdConfig};
use tokio::time::timeout;

const TOKEN_TTL: Duration = Duration::from_secs(2);

fn etcdctl(etcd: &Etcd, user: Option<&str>, args: &[&str]) {
    let mut command = Command::new("etcdctl");
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoint()));
    if let Some(user) = user {
        command.arg(format!("--user={user}"));
    }
    let output = command
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("etcdctl: {e}"));
    assert!(
        output.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn backend(etcd: &Etcd) -> EtcdBackend {
    let config = EtcdConfig::new([etcd.endpoint().to_owned()])
        .with_prefix("coord/tokens")
        .with_user("coordinator", "coordinator-pw");
    EtcdBackend::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

fn election() -> ElectionName {
    ElectionName::new("rootcoord").unwrap_or_else(|e| panic!("{e}"))
}

async fn session(backend: &Arc<dyn Backend>, id: u64) -> Session {
    let member = Member::new(
        ServerId::new(id),
        Role::new("rootcoord").unwrap_or_else(|e| panic!("{e}")),
        format!("10.0.0.{id}:53100"),
    );
    Session::builder(Arc::clone(backend), member)
        .ttl(Duration::from_secs(6))
        .register()
        .await
        .unwrap_or_else(|e| panic!("register {id}: {e}"))
}

/// The next leader the watch reports, within 15 s.
async fn next_leader(events: &mut ha_core::LeaderStream) -> ha_core::Leader {
    loop {
        match timeout(Duration::from_secs(15), events.next()).await {
            Ok(Some(Ok(LeaderEvent::Elected(leader)))) => return leader,
            Ok(Some(Ok(LeaderEvent::Vacant))) => continue,
            other => panic!("watch: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_outlives_expired_and_dropped_auth_tokens() {
    let Some(mut etcd) = Etcd::start_with(&[&format!("--auth-token-ttl={}", TOKEN_TTL.as_secs())])
    else {
        return;
    };
    etcdctl(&etcd, None, &["user", "add", "root:root-pw"]);
    etcdctl(&etcd, None, &["user", "grant-role", "root", "root"]);
    etcdctl(&etcd, None, &["user", "add", "coordinator:coordinator-pw"]);
    etcdctl(&etcd, None, &["role", "add", "coordinator"]);
    etcdctl(
        &etcd,
        None,
        &[
            "role",
            "grant-permission",
            "coordinator",
            "--prefix=true",
            "readwrite",
            "coord/",
        ],
    );
    etcdctl(
        &etcd,
        None,
        &["user", "grant-role", "coordinator", "coordinator"],
    );
    etcdctl(&etcd, None, &["auth", "enable"]);

    let a_backend: Arc<dyn Backend> = Arc::new(backend(&etcd).await);
    let b_backend: Arc<dyn Backend> = Arc::new(backend(&etcd).await);
    let watcher = backend(&etcd).await;
    let a = session(&a_backend, 1).await;
    let b = Arc::new(session(&b_backend, 2).await);
    let la = a
        .campaign(&election(), "a")
        .await
        .unwrap_or_else(|e| panic!("campaign a: {e}"));
    let mut events = watcher.watch(&election());
    assert_eq!(next_leader(&mut events).await.token(), la.token());
    let waiting = {
        let b = Arc::clone(&b);
        tokio::spawn(async move { b.campaign(&election(), "b").await })
    };

    // B waits for three token TTLs, then etcd restarts: every token it issued is gone.
    tokio::time::sleep(TOKEN_TTL * 3).await;
    tokio::task::block_in_place(|| etcd.restart(Duration::from_millis(500)));
    let opened = watcher.watches_opened();
    tokio::time::sleep(TOKEN_TTL * 2).await;
    // Reopened with the forgotten token (cancelled), then with a new one: not a spin.
    let reopened = watcher.watches_opened() - opened;
    assert!(
        reopened <= 4,
        "the watch was opened {reopened} times after etcd came back"
    );
    assert!(
        a.is_valid() && la.is_valid(),
        "A lost its lease to the tokens"
    );
    assert!(!waiting.is_finished(), "B's campaign ended while A led");

    la.resign()
        .await
        .unwrap_or_else(|e| panic!("resign after the tokens went: {e}"));
    let lb = timeout(Duration::from_secs(15), waiting)
        .await
        .unwrap_or_else(|_| panic!("B was not elected within 15 s of the resign"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("campaign b: {e}"));
    assert!(lb.token() > la.token());
    // The watch, reopened across the restart with a token etcd had forgotten, saw it.
    assert_eq!(next_leader(&mut events).await.token(), lb.token());
    assert!(b.is_valid(), "B's session did not survive the tokens");
    lb.resign().await.unwrap_or_else(|e| panic!("{e}"));
    let _ = a.close().await;
}
