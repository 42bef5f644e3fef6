//! The keepalive task of a session: renewals every TTL/3 (TTL/15 while they fail),
//! the self-fence deadline moved forward by each acknowledged one, and the session
//! marked lost when the deadline passes first.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep_until, timeout, Instant};
use tracing::debug;

use crate::clock;
use crate::error::Error;

use super::{mutant, LossReason, SessionShared};

/// Renews the lease every TTL/3 and fences the session at its deadline. Times sent and
/// deadlines are on the suspend-aware clock (`clock`); waits are on tokio's, and a
/// resume from a host suspend wakes every wait so the deadline is checked at once.
pub(super) async fn keepalive_loop(shared: Arc<SessionShared>) {
    let ttl = shared.lease.ttl;
    let retry_every = (ttl / 15).max(Duration::from_millis(20));
    let mut resumed = clock::resumed();
    let mut next = Instant::now() + ttl / 3;
    loop {
        tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => return,
            _ = sleep_until(shared.fence_at()) => {}
            _ = resumed.changed() => {}
            _ = sleep_until(next) => {}
        }
        if shared.past_deadline() && !mutant::no_self_fence() {
            shared.lose(LossReason::SelfFenced);
            return;
        }
        let sent = clock::now();
        let mut attempt = std::pin::pin!(timeout(
            shared.request_timeout,
            shared.backend.keep_alive(shared.lease.id),
        ));
        let outcome = loop {
            tokio::select! {
                biased;
                _ = shared.cancel.cancelled() => return,
                _ = sleep_until(shared.fence_at()) => {}
                _ = resumed.changed() => {}
                outcome = &mut attempt => break outcome,
            }
            if shared.past_deadline() && !mutant::no_self_fence() {
                shared.lose(LossReason::SelfFenced);
                return;
            }
        };
        let failed = || {
            metrics::counter!("ha_keepalive_failures_total",
                "role" => shared.member.role.to_string(), "backend" => shared.backend.name())
            .increment(1);
        };
        match outcome {
            Ok(Ok(granted)) => {
                let granted = granted.min(ttl);
                let took = clock::now().saturating_duration_since(sent);
                metrics::histogram!("ha_keepalive_seconds", "backend" => shared.backend.name())
                    .record(took.as_secs_f64());
                shared.extend(sent, granted);
                next = clock::to_tokio(sent + granted / 3);
            }
            Ok(Err(Error::LeaseExpired { .. })) => {
                shared.lose(LossReason::LeaseExpired);
                return;
            }
            Ok(Err(error)) => {
                debug!(lease = %shared.lease.id, %error, "keepalive failed, retrying");
                failed();
                next = Instant::now() + retry_every;
            }
            Err(_) => {
                debug!(lease = %shared.lease.id, "keepalive timed out, retrying");
                failed();
                next = Instant::now() + retry_every;
            }
        }
        shared.report_time_left();
    }
}
