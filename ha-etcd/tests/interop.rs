//! Interop with etcd's own Go election client, `etcdctl elect`, on a real etcd: the same
//! key layout means the same election. Every etcdctl process is stopped by PID.

mod common;

use common::EtcdExt;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ha_core::{Backend, ElectionName, LeaderEvent, Member, Role, ServerId, Session};

/// Stops the process by PID when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn etcdctl(endpoint: &str, args: &[&str]) -> Guard {
    let child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=http://{endpoint}"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn etcdctl (Debian package etcd-client): {e}"));
    Guard(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_elect_and_ha_share_one_election() {
    let Some(etcd) = common::Etcd::start() else {
        return;
    };
    let etcd_backend = etcd.backend().await.unwrap_or_else(|e| panic!("{e}"));
    let election = ElectionName::new("rootcoord").unwrap_or_else(|e| panic!("{e}"));
    let etcd_prefix = format!("{}/election/{election}", etcd_backend.prefix());
    let backend: Arc<dyn Backend> = Arc::new(etcd_backend);

    // etcdctl leads first.
    let _holder = etcdctl(&etcd.endpoint, &["elect", &etcd_prefix, "from-etcdctl"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let etcd_leader = loop {
        if let Ok(Some(leader)) = backend.leader(&election).await {
            break leader;
        }
        assert!(Instant::now() < deadline, "etcdctl never became leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(etcd_leader.value_str(), Some("from-etcdctl"));
    assert_eq!(etcd_leader.server_id, None, "etcdctl has no member record");
    let mut events = backend.watch(&election);
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        Ok(Some(Ok(LeaderEvent::Elected(seen)))) => assert_eq!(seen.key, etcd_leader.key),
        other => panic!("watch did not show etcdctl's leadership: {other:?}"),
    }

    // Ours waits behind it.
    let me = Member::new(
        ServerId::new(7),
        Role::new("rootcoord").unwrap_or_else(|e| panic!("{e}")),
        "10.0.0.7:53100",
    );
    let session = Arc::new(
        Session::builder(Arc::clone(&backend), me)
            .ttl(Duration::from_secs(10))
            .register()
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let ours = {
        let (session, election) = (Arc::clone(&session), election.clone());
        tokio::spawn(async move { session.campaign(&election, "from-ha").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!ours.is_finished(), "ours must wait while etcdctl leads");

    // Interrupt etcdctl: it resigns, ours leads.
    let status = Command::new("kill")
        .args(["-INT", &_holder.0.id().to_string()])
        .status()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success());
    let leadership = match tokio::time::timeout(Duration::from_secs(20), ours).await {
        Ok(Ok(Ok(leadership))) => leadership,
        other => panic!(
            "ours not elected after etcdctl resigned: {:?}",
            other.map(|r| r.map(|l| l.map(|l| l.token())))
        ),
    };
    assert!(leadership.token() > etcd_leader.token());
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        Ok(Some(Ok(LeaderEvent::Elected(seen)))) => assert_eq!(seen.value_str(), Some("from-ha")),
        other => panic!("watch did not show our leadership: {other:?}"),
    }

    // etcdctl sees ours.
    let mut listener = etcdctl(&etcd.endpoint, &["elect", "-l", &etcd_prefix]);
    let stdout = listener
        .0
        .stdout
        .take()
        .unwrap_or_else(|| panic!("no stdout"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == "from-ha" => break,
            Ok(_) => {}
            Err(_) => panic!("etcdctl elect -l never printed our value"),
        }
    }
    drop(listener);
    leadership.resign().await.unwrap_or_else(|e| panic!("{e}"));
}
