//! The election watchdog: openraft draws its election timeout once per node, so a
//! split vote can repeat.

use std::sync::Weak;
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tracing::info;

use super::handle::Replica;

/// openraft draws its election timeout once per node, so a split vote can repeat; when
/// there has been no leader for 2× the maximum election timeout, call an election after
/// a random pause.
pub(crate) async fn watchdog(node: Weak<Replica>) {
    let mut leaderless_since: Option<Instant> = None;
    loop {
        let Some(inner) = node.upgrade() else { return };
        let max = inner.config.election_timeout.1;
        let shutdown = inner.shutdown.clone();
        let (leader, voter) = {
            let metrics = inner.raft.metrics();
            let metrics = metrics.borrow();
            let voter = metrics
                .membership_config
                .membership()
                .voter_ids()
                .any(|id| id == inner.config.id);
            (metrics.current_leader, voter)
        };
        drop(inner);
        if leader.is_some() || !voter {
            leaderless_since = None;
        } else {
            let since = *leaderless_since.get_or_insert_with(Instant::now);
            if since.elapsed() > max * 2 {
                let jitter = Duration::from_millis(rand::random_range(0..=max.as_millis() as u64));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = sleep(jitter) => {}
                }
                if let Some(inner) = node.upgrade() {
                    if inner.raft.metrics().borrow().current_leader.is_none() {
                        info!(
                            node = inner.config.id,
                            "no leader for a while, calling an election"
                        );
                        let _ = inner.raft.trigger().elect().await;
                    }
                }
                leaderless_since = None;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sleep(max / 2) => {}
        }
    }
}
