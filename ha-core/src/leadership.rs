//! `Leadership`: what a session holds after winning a campaign, and the watch that tells
//! it when it no longer does.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::kv::{CasOutcome, KvKey, KvWrite, KvWriteOutcome};
use crate::session::{LossReason, SessionShared, SessionState};
use crate::types::{ElectionName, FencingToken, LeaderEvent, LeaderKey};

/// The pause after a failed resign, doubling up to the second constant.
const RESIGN_RETRY_FIRST: Duration = Duration::from_millis(50);
const RESIGN_RETRY_MAX: Duration = Duration::from_millis(400);

/// The leadership of one election, held by a [`Session`](crate::Session).
///
/// It ends when the holder resigns, when the session is lost (lease expired, or the
/// self-fence deadline passed), or when the election shows another leader. Check
/// [`is_valid`](Self::is_valid) before acting as leader (it does no I/O), and stop
/// everything when [`lost`](Self::lost) resolves. Pass [`token`](Self::token) with every
/// write so that stores can reject a deposed leader.
///
/// Dropping a leadership that still holds resigns it in the background.
#[derive(Debug)]
pub struct Leadership {
    shared: Arc<LeadershipShared>,
    monitor: JoinHandle<()>,
}

#[derive(Debug)]
struct LeadershipShared {
    session: Arc<SessionShared>,
    key: LeaderKey,
    /// `None` while held; the first loss reason afterwards.
    lost: watch::Sender<Option<LossReason>>,
    cancel: CancellationToken,
}

impl LeadershipShared {
    fn lose(&self, reason: LossReason) -> bool {
        let changed = self.lost.send_if_modified(|lost| {
            if lost.is_none() {
                *lost = Some(reason);
                true
            } else {
                false
            }
        });
        if changed {
            self.cancel.cancel();
            self.token_gauge().set(0.0);
            let member = &self.session.member;
            if reason == LossReason::Resigned {
                info!(server_id = %member.server_id, role = %member.role,
                      election = %self.key.election, token = %self.key.token, "resigning");
            } else {
                warn!(server_id = %member.server_id, role = %member.role,
                      election = %self.key.election, token = %self.key.token,
                      reason = %reason, "leadership lost");
            }
        }
        changed
    }

    /// Marks the leadership lost when the backend's answer says it is over: `NotLeader`
    /// (deposed) or `LeaseExpired`, so `lost()` agrees with what the caller just learned.
    fn lose_on<T>(&self, result: &Result<T>) {
        match result {
            Err(Error::NotLeader { .. }) => {
                self.lose(LossReason::Deposed);
            }
            Err(Error::LeaseExpired { .. }) => {
                self.lose(LossReason::LeaseExpired);
            }
            _ => {}
        }
    }

    fn is_valid(&self) -> bool {
        self.lost.borrow().is_none() && self.session.is_valid()
    }

    /// `ha_fencing_token`: the token this process leads the election with, 0 while it
    /// does not.
    fn token_gauge(&self) -> metrics::Gauge {
        metrics::gauge!("ha_fencing_token",
            "role" => self.session.member.role.to_string(),
            "election" => self.key.election.to_string())
    }
}

impl Leadership {
    pub(crate) fn start(session: Arc<SessionShared>, key: LeaderKey) -> Self {
        let (lost, _) = watch::channel(None);
        let shared = Arc::new(LeadershipShared {
            session,
            key,
            lost,
            cancel: CancellationToken::new(),
        });
        info!(
            server_id = %shared.session.member.server_id,
            role = %shared.session.member.role,
            election = %shared.key.election,
            token = %shared.key.token,
            "elected"
        );
        shared.token_gauge().set(shared.key.token.get() as f64);
        let monitor = tokio::spawn(monitor(Arc::clone(&shared)));
        Self { shared, monitor }
    }

    /// The fencing token of this leadership: larger than every earlier leadership's.
    pub fn token(&self) -> FencingToken {
        self.shared.key.token
    }

    /// The election led.
    pub fn election(&self) -> &ElectionName {
        &self.shared.key.election
    }

    /// The leader key, as the backend knows it.
    pub fn key(&self) -> &LeaderKey {
        &self.shared.key
    }

    /// Whether this is still the leadership: not lost, not resigned, and the session is
    /// before its self-fence deadline. No I/O; cheap enough to call before every write.
    pub fn is_valid(&self) -> bool {
        self.shared.is_valid()
    }

    /// The session's self-fence deadline as of now (tokio's clock): the leadership ends
    /// by then unless a keepalive is acknowledged first. Work the holder must have
    /// stopped before another can lead (a child process) is stopped by this instant.
    pub fn deadline(&self) -> tokio::time::Instant {
        crate::clock::to_tokio(self.shared.session.deadline())
    }

    /// Why the leadership ended, if it has.
    pub fn loss_reason(&self) -> Option<LossReason> {
        *self.shared.lost.borrow()
    }

    /// Resolves when the leadership ends, with the reason. Stop acting as leader then:
    /// someone else may be elected soon.
    pub async fn lost(&self) -> LossReason {
        let mut rx = self.shared.lost.subscribe();
        loop {
            if let Some(reason) = *rx.borrow_and_update() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return LossReason::Closed;
            }
        }
    }

    /// Replaces the value published with this leadership (its address, its readiness)
    /// without a new election; the token stays.
    ///
    /// # Errors
    /// `NotLeader` when the leadership is no longer valid, or the backend's error. When
    /// the backend answers `NotLeader` or `LeaseExpired`, the leadership is over: it is
    /// marked lost (`Deposed` / `LeaseExpired`) before the error is returned, so
    /// [`lost`](Self::lost) agrees with what the caller just learned.
    pub async fn proclaim(&self, value: impl Into<Bytes>) -> Result<()> {
        if !self.is_valid() {
            return Err(Error::NotLeader {
                election: self.shared.key.election.clone(),
                current: None,
            });
        }
        let result = self
            .shared
            .session
            .backend
            .proclaim(&self.shared.key, value.into())
            .await;
        self.shared.lose_on(&result);
        result
    }

    /// Sets `key` in the election's guarded store to `value`, if this leadership is
    /// still the election's current one when the backend applies the write.
    ///
    /// # Errors
    /// `NotLeader` when the leadership is no longer valid here or no longer leads at the
    /// backend (the leadership is then marked lost, as with [`proclaim`](Self::proclaim));
    /// `InvalidArgument`/`TooLarge` for a bad key or value; `Timeout`/`Unavailable` when
    /// the outcome is unknown (the write may or may not have been applied).
    pub async fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<()> {
        let write = KvWrite::Put {
            key: KvKey::new(key)?,
            value: value.into(),
        };
        self.write(write).await.map(|_| ())
    }

    /// Removes `key` from the election's guarded store, under the same guard as
    /// [`put`](Self::put). Returns whether the key existed.
    ///
    /// # Errors
    /// As for [`put`](Self::put).
    pub async fn delete(&self, key: &str) -> Result<bool> {
        let write = KvWrite::Delete {
            key: KvKey::new(key)?,
        };
        self.write(write).await.map(|outcome| outcome.applied)
    }

    /// Sets `key` to `new` only if it holds `expected` now (`None` = absent), under the
    /// same guard as [`put`](Self::put).
    ///
    /// # Errors
    /// As for [`put`](Self::put). A value that differs is not an error but
    /// [`CasOutcome::Mismatch`] with the value the key holds.
    pub async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<Bytes>,
        new: impl Into<Bytes>,
    ) -> Result<CasOutcome> {
        let write = KvWrite::CompareAndSet {
            key: KvKey::new(key)?,
            expected,
            new: Some(new.into()),
        };
        let outcome = self.write(write).await?;
        Ok(if outcome.applied {
            CasOutcome::Swapped
        } else {
            CasOutcome::Mismatch {
                current: outcome.previous,
            }
        })
    }

    /// Reads `key` from the election's guarded store, linearizably. Reading needs no
    /// leadership; this is [`Session::get`](crate::Session::get) for the election led.
    ///
    /// # Errors
    /// `InvalidArgument`/`TooLarge` for a bad key, `Timeout`, or the backend's error.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let session = &self.shared.session;
        crate::kv::read(
            session.backend.as_ref(),
            session.request_timeout,
            &self.shared.key.election,
            key,
        )
        .await
    }

    /// Applies any guarded write (the general form of [`put`](Self::put),
    /// [`delete`](Self::delete) and [`compare_and_set`](Self::compare_and_set)).
    ///
    /// # Errors
    /// As for [`put`](Self::put).
    pub async fn write(&self, write: KvWrite) -> Result<KvWriteOutcome> {
        let shared = &self.shared;
        let session = &shared.session;
        // The backend checks the guard too; this local check keeps a leadership past
        // its self-fence deadline from even trying.
        if !self.is_valid() {
            return Err(Error::NotLeader {
                election: shared.key.election.clone(),
                current: None,
            });
        }
        session.backend.capabilities().kv_limits.check(&write)?;
        let result = match timeout(
            session.request_timeout,
            session.backend.kv_write(&shared.key, write),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                operation: "kv_write",
                after: session.request_timeout,
            }),
        };
        shared.lose_on(&result);
        result
    }

    /// Gives up the leadership so the next candidate takes over at once. The leadership
    /// is invalid from the moment this is called. Safe to call again after an error.
    ///
    /// # Errors
    /// The backend's last error after retries. The candidacy then still stands on the
    /// backend until it is resigned or the session ends.
    pub async fn resign(&self) -> Result<()> {
        self.shared.lose(LossReason::Resigned);
        resign_with_retries(&self.shared).await
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.monitor.abort();
        if !self.shared.lose(LossReason::Resigned) {
            return; // already lost or resigned
        }
        let shared = Arc::clone(&self.shared);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = resign_with_retries(&shared).await {
                    warn!(election = %shared.key.election, token = %shared.key.token, %error,
                          "resign on drop failed; the candidacy ends with its session");
                }
            });
        }
    }
}

/// Resigns on the backend, retrying what may pass later (an unreachable member, a
/// backend electing its own leader, which refuses writes at once) for up to one TTL:
/// the candidacy would end with the lease by then, and until the resign lands the next
/// candidate waits for that.
async fn resign_with_retries(shared: &LeadershipShared) -> Result<()> {
    let session = &shared.session;
    let give_up_at = Instant::now() + session.lease.ttl;
    let mut pause = RESIGN_RETRY_FIRST;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let within = session
            .request_timeout
            .min(give_up_at.saturating_duration_since(Instant::now()));
        let result = match timeout(within, session.backend.resign(&shared.key)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                operation: "resign",
                after: within,
            }),
        };
        match result {
            Err(error) if error.is_retryable() && Instant::now() + pause < give_up_at => {
                debug!(election = %shared.key.election, %error, attempt, "resign failed, retrying");
                sleep(pause).await;
                pause = (pause * 2).min(RESIGN_RETRY_MAX);
            }
            // A lease that is gone took the candidacy with it: resigned already.
            Err(Error::LeaseExpired { .. }) => return Ok(()),
            other => return other,
        }
    }
}

/// Ends the leadership when the session is lost or the election shows someone else.
async fn monitor(shared: Arc<LeadershipShared>) {
    let mut session_state = shared.session.subscribe();
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut events = shared.session.backend.watch(&shared.key.election);
        loop {
            tokio::select! {
                biased;
                _ = shared.cancel.cancelled() => return,
                changed = session_state.wait_for(|s| *s != SessionState::Alive) => {
                    let reason = match changed.as_deref() {
                        Ok(SessionState::Lost(reason)) => *reason,
                        _ => LossReason::Closed,
                    };
                    shared.lose(reason);
                    return;
                }
                event = events.next() => match event {
                    Some(Ok(LeaderEvent::Elected(leader))) if leader.key == shared.key => {
                        backoff = Duration::from_millis(50);
                    }
                    Some(Ok(_)) => {
                        shared.lose(LossReason::Deposed);
                        return;
                    }
                    Some(Err(error)) => {
                        debug!(election = %shared.key.election, %error, "leader watch failed, resubscribing");
                        break;
                    }
                    None => {
                        debug!(election = %shared.key.election, "leader watch ended, resubscribing");
                        break;
                    }
                }
            }
        }
        // The session deadline still fences us while the watch is down.
        tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => return,
            _ = sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
