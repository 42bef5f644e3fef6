//! Many elections of three candidates each through one `RaftClient`: every election gets
//! a leader, then every leader resigns at once and each election's next candidate takes
//! over (the bench's "elections" scenario, smaller; over real sockets).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::Group;
use futures::StreamExt;
use ha_core::{Backend, ElectionName, Member, Role, ServerId};
use ha_raft::RaftClient;
use tokio::time::timeout;

const ELECTIONS: u64 = 1000;

type Elected = (u64, ha_core::Result<ha_core::LeaderKey>);

async fn next(
    elected: &mut tokio::sync::mpsc::UnboundedReceiver<Elected>,
    phase: &str,
    seen: usize,
) -> (u64, ha_core::LeaderKey) {
    match timeout(Duration::from_secs(30), elected.recv()).await {
        Ok(Some((election, key))) => (
            election,
            key.unwrap_or_else(|e| panic!("election {election}: {e}")),
        ),
        Ok(None) => panic!("every candidate ended"),
        Err(_) => panic!("{phase}: no election came through within 30 s after {seen}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_election_hands_off_when_all_leaders_resign_at_once() {
    let group = Group::start(3).await;
    let endpoints: Vec<String> = group.nodes.values().map(|n| n.address()).collect();
    let client = RaftClient::connect(endpoints)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let role = Role::new("many").unwrap_or_else(|e| panic!("{e}"));
    let ttl = Duration::from_secs(60);
    let leases: Vec<_> = futures::stream::iter(0..ELECTIONS * 3)
        .map(|id| {
            let client = client.clone();
            let member = Member::new(ServerId::new(id), role.clone(), "");
            async move { client.register(&member, ttl).await }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(|lease| lease.unwrap_or_else(|e| panic!("register: {e}")).id)
        .collect();

    let (elected_tx, mut elected_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut candidates = tokio::task::JoinSet::new();
    for (index, lease) in leases.iter().enumerate() {
        let (client, elected_tx, lease) = (client.clone(), elected_tx.clone(), *lease);
        let election = ElectionName::new(format!("many-{}", index as u64 / 3))
            .unwrap_or_else(|e| panic!("{e}"));
        candidates.spawn(async move {
            let key = client
                .campaign(lease, &election, Bytes::from_static(b"c"))
                .await;
            let _ = elected_tx.send((index as u64 / 3, key));
        });
    }
    drop(elected_tx);
    let mut leaders = Vec::new();
    for seen in 0..ELECTIONS as usize {
        leaders.push(next(&mut elected_rx, "first leaders", seen).await);
    }
    let resigns = futures::stream::iter(leaders)
        .map(|(election, key)| {
            let client = client.clone();
            async move {
                client
                    .resign(&key)
                    .await
                    .unwrap_or_else(|e| panic!("resign {election}: {e}"))
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>();
    let collect_handoffs = async {
        let mut handed_off = Vec::new();
        for seen in 0..ELECTIONS as usize {
            handed_off.push(next(&mut elected_rx, "handoffs", seen).await.0);
        }
        handed_off
    };
    let (_, mut handed_off) = tokio::join!(resigns, collect_handoffs);
    handed_off.sort_unstable();
    handed_off.dedup();
    assert_eq!(handed_off.len() as u64, ELECTIONS, "every election once");
    candidates.abort_all();
    group.shutdown().await;
}
