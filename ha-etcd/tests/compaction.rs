//! A watcher cut off from etcd (through a TCP proxy the test controls) while leaders change:
//! without compaction it reports every change after reconnecting; after a compaction it
//! re-reads and reports the current leader, never an older one.

mod common;

use common::EtcdExt;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ha_core::{
    Backend, ElectionName, FencingToken, LeaderEvent, LeaderStream, Member, Role, ServerId,
};
use ha_etcd::{EtcdBackend, EtcdConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A loopback TCP proxy that can cut every connection and refuse new ones.
struct Proxy {
    addr: String,
    blocked: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .to_string();
        let blocked = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let (blocked2, generation2) = (Arc::clone(&blocked), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if blocked2.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let target = target.clone();
                let mut cut = generation2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            blocked,
            generation,
            task,
        }
    }

    fn cut(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn heal(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn next_leader(events: &mut LeaderStream) -> Option<FencingToken> {
    match tokio::time::timeout(Duration::from_secs(30), events.next()).await {
        Ok(Some(Ok(LeaderEvent::Elected(l)))) => Some(l.token()),
        Ok(Some(Ok(LeaderEvent::Vacant))) => None,
        other => panic!("no watch event: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_behind_a_cut_resumes_without_loss_and_survives_compaction() {
    let Some(etcd) = common::Etcd::start() else {
        return;
    };
    let direct = etcd.backend().await.unwrap_or_else(|e| panic!("{e}"));
    let proxy = Proxy::start(etcd.endpoint.clone()).await;
    let watcher = EtcdBackend::connect(
        EtcdConfig::new([proxy.addr.clone()])
            .with_prefix(direct.prefix())
            .with_timeouts(Duration::from_secs(2), Duration::from_secs(2)),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let election = ElectionName::new("rootcoord").unwrap_or_else(|e| panic!("{e}"));
    let role = Role::new("rootcoord").unwrap_or_else(|e| panic!("{e}"));
    let mut events = watcher.watch(&election);
    assert_eq!(next_leader(&mut events).await, None);

    let mut leases = Vec::new();
    for id in 1..=6 {
        let member = Member::new(ServerId::new(id), role.clone(), "x");
        leases.push(
            direct
                .register(&member, Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    let k1 = direct
        .campaign(leases[0].id, &election, "1".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(next_leader(&mut events).await, Some(k1.token));

    // Cut off: two handovers happen; after healing, both are reported, in order.
    proxy.cut();
    direct.resign(&k1).await.unwrap_or_else(|e| panic!("{e}"));
    let k2 = direct
        .campaign(leases[1].id, &election, "2".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    direct.resign(&k2).await.unwrap_or_else(|e| panic!("{e}"));
    let k3 = direct
        .campaign(leases[2].id, &election, "3".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.heal();
    let mut seen = Vec::new();
    while seen.last() != Some(&Some(k3.token)) {
        seen.push(next_leader(&mut events).await);
        assert!(seen.len() <= 4, "unexpected events: {seen:?}");
    }
    assert_eq!(
        seen,
        vec![None, Some(k2.token), None, Some(k3.token)],
        "a change was lost or reordered"
    );

    // Cut off again; changes, then a compaction past where the watch stands.
    proxy.cut();
    direct.resign(&k3).await.unwrap_or_else(|e| panic!("{e}"));
    let k4 = direct
        .campaign(leases[3].id, &election, "4".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    direct.resign(&k4).await.unwrap_or_else(|e| panic!("{e}"));
    let k5 = direct
        .campaign(leases[4].id, &election, "5".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut raw = etcd_client::Client::connect([etcd.endpoint.clone()], None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let revision = raw
        .get("compaction-probe", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .header()
        .map_or(0, |h| h.revision());
    raw.compact(revision, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.heal();
    // The history the watch needed is gone: it re-reads and reports the current leader.
    assert_eq!(next_leader(&mut events).await, Some(k5.token));
    // And it keeps following live changes.
    direct.resign(&k5).await.unwrap_or_else(|e| panic!("{e}"));
    let k6 = direct
        .campaign(leases[5].id, &election, "6".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut after = Vec::new();
    while after.last() != Some(&Some(k6.token)) {
        after.push(next_leader(&mut events).await);
        assert!(after.len() <= 2, "unexpected events: {after:?}");
    }
    assert_eq!(after, vec![None, Some(k6.token)]);
}
