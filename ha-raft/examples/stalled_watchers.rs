//! Measures a node's resident memory while many watchers stop reading: 1,000 local
//! leader watches each read their first event and then nothing, while one election
//! changes 10,000 times. Each watcher's buffer is bounded (`WATCH_BUFFER`), so RSS
//! should stay flat once the buffers are full. A measurement, not a test.
//!
//! Run: `cargo run --release -p ha-raft --example stalled_watchers -- [watchers] [changes]`

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use ha_core::{Backend, ElectionName, Member, Role, ServerId};
use ha_raft::{RaftNode, RaftNodeConfig};

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let watchers: usize = args.next().map_or(Ok(1000), |a| a.parse())?;
    let changes: usize = args.next().map_or(Ok(10_000), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let peers: BTreeMap<u64, String> = [(1, addr.clone())].into_iter().collect();
    let node = RaftNode::start(RaftNodeConfig::new(1, addr.parse()?, peers, dir.path())).await?;
    while node.current_leader() != Some(1) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let election = ElectionName::new("stalled")?;
    let member = Member::new(ServerId::new(1), Role::new("r")?, "127.0.0.1:1");
    let lease = node.register(&member, Duration::from_secs(600)).await?;
    let key = node.campaign(lease.id, &election, "v0".into()).await?;
    let mut stalled = Vec::with_capacity(watchers);
    for _ in 0..watchers {
        let mut watch = node.watch(&election);
        let _ = watch.next().await;
        stalled.push(watch);
    }
    println!("{watchers} stalled watchers, {changes} changes of one election");
    println!("{:>8} {:>10}", "changes", "RSS MiB");
    println!("{:>8} {:>10.1}", 0, rss_mib());
    let step = (changes / 10).max(1);
    for i in 1..=changes {
        node.proclaim(&key, format!("value {i:>8} of the leader").into())
            .await?;
        if i % step == 0 {
            println!("{i:>8} {:>10.1}", rss_mib());
        }
    }
    drop(stalled);
    node.shutdown().await;
    Ok(())
}
