//! The lessor's loop on the leader: expires leases whose deadline passed, by proposing
//! `Expire` for each.

use std::sync::Weak;
use std::time::Duration;

use ha_core::LeaseId;
use tokio::time::{sleep_until, Instant};
use tracing::info;

use super::handle::{Replica, Target};
use crate::data::command::Command;

/// Every live lease and its TTL, as this node has applied them, and the applied index
/// they are as of.
fn live_leases(replica: &Replica) -> (u64, Vec<(u64, Duration)>) {
    let machine = replica.sm.lock();
    let leases = machine
        .state
        .leases
        .iter()
        .map(|(id, l)| (*id, Duration::from_millis(l.ttl_ms)))
        .collect();
    (machine.applied_index(), leases)
}

/// Expires leases whose deadline passed, while this node leads. The lease set is scanned
/// only when it may have changed (an entry applied, a new term, a failed expiry) or the
/// earliest deadline seen at the last scan passed: renewals only move deadlines later,
/// so that deadline is never late, and 10,000 idle sessions cost no scans.
pub(crate) async fn expiry_loop(node: Weak<Replica>) {
    const TICK: Duration = Duration::from_millis(100);
    // Leadership changes wake the loop at once instead of at its next tick. Only the
    // server metrics (vote, state, leader, membership): the full metrics change on
    // every applied entry.
    let mut server = match node.upgrade() {
        Some(inner) => Some(inner.raft.server_metrics()),
        None => return,
    };
    // The term and applied index of the last scan, and the earliest deadline it left.
    let mut scanned: Option<(u64, u64)> = None;
    let mut next_due: Option<Instant> = None;
    loop {
        let Some(inner) = node.upgrade() else { return };
        let now = Instant::now();
        let wake = next_due
            .map_or(now + TICK, |d| d.min(now + TICK))
            .max(now + Duration::from_millis(5));
        let shutdown = inner.shutdown.clone();
        drop(inner);
        let core_stopped = {
            let changed = async {
                match server.as_mut() {
                    Some(metrics) => metrics.changed().await.is_err(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep_until(wake) => false,
                stopped = changed => stopped,
            }
        };
        if core_stopped {
            // The Raft core is gone: back to ticking alone.
            server = None;
        }
        let Some(inner) = node.upgrade() else { return };
        let Target::Me { term } = inner.target() else {
            inner.lessor.step_down();
            scanned = None;
            next_due = None;
            continue;
        };
        if inner.lessor.term() != Some(term) {
            // Apply everything committed in earlier terms before trusting the lease set.
            let confirmed = tokio::time::timeout(
                inner.config.request_timeout,
                inner.raft.ensure_linearizable(),
            )
            .await;
            if !matches!(confirmed, Ok(Ok(_))) {
                continue;
            }
            inner.lessor.lead(term);
        }
        let applied = inner.sm.lock().applied_index();
        let retry = inner.lessor.take_retry();
        if !retry
            && scanned == Some((term, applied))
            && next_due.is_none_or(|due| Instant::now() < due)
        {
            continue;
        }
        let (applied, leases) = live_leases(&inner);
        let due = inner.lessor.due(term, &leases);
        scanned = Some((term, applied));
        next_due = inner.lessor.next_deadline();
        for lease in due {
            let node = Weak::clone(&node);
            tokio::spawn(async move {
                let Some(inner) = node.upgrade() else { return };
                info!(node = inner.config.id, lease = %LeaseId::new(lease), "lease expired, revoking");
                if inner
                    .propose_local(Command::Expire { lease })
                    .await
                    .is_err()
                {
                    inner.lessor.expire_failed(lease);
                }
            });
        }
    }
}
