//! A candidate's wait for its turn: a read of the queue, then a watch for deletions on
//! the endpoint in use, abandoned for a fresh read when the backend leaves that endpoint.

use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use ha_core::{ElectionName, Error, FencingToken, LeaseId, Result};
use tokio::time::{sleep, timeout, Instant};
use tracing::debug;

use crate::error::map;
use crate::keys;

use super::endpoints::RETRY;
use super::EtcdBackend;

/// How long a wait rides out an etcd that answers nothing (a restart) before failing.
const OUTAGE: Duration = Duration::from_secs(30);

impl EtcdBackend {
    /// Waits until the candidacy `token` (key `own`) heads the election.
    pub(super) async fn wait_for_turn(
        &self,
        lease: LeaseId,
        election: &ElectionName,
        own: &str,
        token: i64,
    ) -> Result<()> {
        let prefix = keys::election_prefix(self.prefix(), election);
        let mut unreachable_since: Option<Instant> = None;
        loop {
            let (revision, candidates) = match self.candidates(election).await {
                Ok(read) => {
                    unreachable_since = None;
                    read
                }
                Err(e) if e.is_retryable() => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > OUTAGE {
                        return Err(e);
                    }
                    debug!(election = %election, error = %e, "etcd unreachable while campaigning, retrying");
                    sleep(RETRY).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !candidates.iter().any(|kv| kv.key() == own.as_bytes()) {
                return if self.lease_alive(lease).await? {
                    Err(Error::NotLeader {
                        election: election.clone(),
                        current: candidates
                            .first()
                            .map(|kv| FencingToken::new(kv.create_revision() as u64)),
                    })
                } else {
                    Err(Error::LeaseExpired { lease })
                };
            }
            if candidates
                .first()
                .is_some_and(|kv| kv.create_revision() == token)
            {
                return Ok(());
            }
            // Wait for any deletion in the election after the read: our predecessor's (our
            // turn may have come) or our own (our lease died).
            let conn = match self.endpoints.current().await {
                Ok(conn) => conn,
                Err(e) => {
                    debug!(election = %election, error = %e, "no etcd endpoint to watch on, retrying");
                    sleep(RETRY).await;
                    continue;
                }
            };
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let mut client = conn.client.clone();
            let within = self.endpoints.attempt_timeout();
            self.count_watch_opened();
            let opened = match timeout(within, client.watch(prefix.as_str(), Some(options))).await {
                Ok(opened) => opened.map_err(map),
                Err(_) => Err(Error::Timeout {
                    operation: "watch",
                    after: within,
                }),
            };
            let mut watch = match opened {
                Ok(watch) => watch,
                Err(e) => {
                    debug!(election = %election, error = %e, "campaign watch failed, retrying");
                    if !self.endpoints.moved_after(&conn, &e) {
                        sleep(RETRY).await;
                    }
                    continue;
                }
            };
            loop {
                let message = tokio::select! {
                    biased;
                    // The endpoint was left (dead, paused, cut off): read again elsewhere.
                    () = self.endpoints.failed_since(&conn) => break,
                    message = watch.message() => message,
                };
                match message {
                    Ok(Some(response)) => {
                        if response.canceled() {
                            let reason = response.cancel_reason();
                            self.endpoints.after_cancel(&conn, reason).await;
                            break;
                        }
                        if response.compact_revision() > 0 {
                            break;
                        }
                        if response
                            .events()
                            .iter()
                            .any(|e| e.event_type() == EventType::Delete)
                        {
                            break;
                        }
                    }
                    Ok(None) => {
                        sleep(RETRY).await;
                        break;
                    }
                    Err(e) => {
                        if !self.endpoints.moved_after(&conn, &map(e)) {
                            sleep(RETRY).await;
                        }
                        break;
                    }
                }
            }
        }
    }
}
