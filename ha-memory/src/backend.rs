//! `MemoryBackend`: the contract over [`State`], with tokio's clock for TTLs.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use ha_core::watch_buffer::{self, WatchReceiver, WATCH_BUFFER};
use ha_core::{
    Backend, Capabilities, ElectionName, Error, KvKey, KvLimits, KvWrite, KvWriteOutcome, Leader,
    LeaderKey, LeaderStream, Lease, LeaseId, Member, MemberStream, RecordLimits, Result, Role,
};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use crate::state::State;

/// The shortest TTL the memory backend accepts. Small, because time is usually virtual
/// here, but no smaller than what the runtime's keepalive schedule can honour.
pub const MIN_TTL: Duration = Duration::from_secs(1);

/// An in-process backend: the whole contract under one lock, TTLs on tokio's clock.
///
/// Under `tokio::time::pause()` a 10 s TTL expires as soon as every task is idle, so
/// failover tests are instant and deterministic. Single process only: two
/// `MemoryBackend`s share nothing; clone one to share it. The `*_fault` hooks simulate
/// what the network and the server can do to a session.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// Bumped after every change, to wake campaigns and the lease reaper.
    changed: watch::Sender<u64>,
    kv_limits: KvLimits,
    /// Unread events a watcher may have before it is ended.
    watch_buffer: usize,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
            kv_limits: KvLimits::default(),
            watch_buffer: WATCH_BUFFER,
        }
    }
}

impl Inner {
    /// Locks the state and first ends every lease whose TTL has passed, so each
    /// operation sees expiry exactly at the deadline, whether or not the reaper ran.
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let before = state.leases.len();
        state.expire_due(Instant::now());
        if state.leases.len() != before {
            // Campaigns waiting on an expired lease must wake, whoever expired it.
            self.notify();
        }
        state
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl MemoryBackend {
    /// A new, empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new, empty backend whose guarded store has these size limits.
    pub fn with_kv_limits(kv_limits: KvLimits) -> Self {
        Self {
            inner: Arc::new(Inner {
                kv_limits,
                ..Inner::default()
            }),
        }
    }

    /// A new, empty backend whose watchers are ended once `watch_buffer` events wait
    /// unread (default [`WATCH_BUFFER`]), for tests of slow watchers.
    pub fn with_watch_buffer(watch_buffer: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                watch_buffer,
                ..Inner::default()
            }),
        }
    }

    fn available(state: &State) -> Result<()> {
        if state.faults.unavailable {
            return Err(Error::Unavailable(
                "memory backend made unavailable by a fault hook".into(),
            ));
        }
        Ok(())
    }

    /// Runs a mutation under the lock and wakes everyone waiting on a change.
    fn mutate<T>(&self, f: impl FnOnce(&mut State, Instant) -> Result<T>) -> Result<T> {
        let result = {
            let mut state = self.inner.lock();
            Self::available(&state)?;
            f(&mut state, Instant::now())
        };
        self.inner.notify();
        result
    }

    // ---- fault hooks ----------------------------------------------------------------

    /// Ends a lease now, as if its TTL had passed.
    pub fn expire_lease_fault(&self, lease: LeaseId) {
        self.inner.lock().remove_lease(lease, Instant::now());
        self.inner.notify();
    }

    /// Makes `keep_alive` of one lease fail with `Unavailable` (a partition between
    /// that session and the server), or succeed again.
    pub fn fail_keep_alive_fault(&self, lease: LeaseId, fail: bool) {
        let mut state = self.inner.lock();
        if fail {
            state.faults.failing_keep_alives.insert(lease);
        } else {
            state.faults.failing_keep_alives.remove(&lease);
        }
    }

    /// Delays every watch notification sent from now on by `delay` (order is kept).
    pub fn notification_delay_fault(&self, delay: Duration) {
        self.inner.lock().faults.notification_delay = delay;
    }

    /// Makes every operation fail with `Unavailable` (the server is unreachable), or
    /// work again. Leases keep their deadlines and expire meanwhile.
    pub fn unavailable_fault(&self, unavailable: bool) {
        self.inner.lock().faults.unavailable = unavailable;
    }

    /// Makes `register` and `keep_alive` report `granted` as the TTL given (a server
    /// that claims more than it keeps, or a corrupt reply), while leases still end at
    /// the TTL asked. `None` reports the truth again.
    pub fn granted_ttl_fault(&self, granted: Option<Duration>) {
        self.inner.lock().faults.granted_ttl = granted;
    }

    /// Breaks the guarded store on purpose: writes are applied without checking that
    /// the writer leads, as a plain key-value store would. For showing that the history
    /// checker catches what the guard prevents; never set it otherwise.
    pub fn unguarded_writes_fault(&self, unguarded: bool) {
        self.inner.lock().faults.unguarded_writes = unguarded;
    }

    /// When the server will expire the lease unless it is renewed; `None` if it is gone.
    /// Lets tests check that a holder fences itself before this instant.
    pub fn lease_deadline(&self, lease: LeaseId) -> Option<Instant> {
        self.inner.lock().leases.get(&lease).map(|l| l.deadline)
    }

    fn start_reaper(&self, state: &mut State) {
        if !state.reaper_started {
            state.reaper_started = true;
            tokio::spawn(reaper(Arc::downgrade(&self.inner)));
        }
    }
}

/// Expires leases at their deadlines, so watchers and waiting campaigns see expiry
/// even when nobody calls the backend. Stops when the backend is dropped.
async fn reaper(inner: Weak<Inner>) {
    loop {
        let (mut changed, next) = {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let changed = inner.changed.subscribe();
            let next = inner.lock().leases.values().map(|l| l.deadline).min();
            (changed, next)
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    biased;
                    _ = sleep_until(deadline) => {}
                    result = changed.changed() => if result.is_err() { return },
                }
            }
            None => {
                if changed.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Withdraws a candidacy when the campaign future is dropped before it wins.
struct WithdrawOnDrop<'a> {
    backend: &'a MemoryBackend,
    key: Option<LeaderKey>,
}

impl Drop for WithdrawOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.backend
                .inner
                .lock()
                .remove_candidacy(&key, Instant::now());
            self.backend.inner.notify();
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(MIN_TTL)
            .with_virtual_time(true)
            .with_kv_limits(self.inner.kv_limits)
    }

    async fn register(&self, member: &Member, ttl: Duration) -> Result<Lease> {
        self.capabilities().check_ttl(ttl)?;
        RecordLimits::DEFAULT.check_member(member)?;
        self.mutate(|state, now| {
            if state
                .members
                .contains_key(&(member.role.clone(), member.server_id))
            {
                return Err(Error::AlreadyRegistered {
                    role: member.role.clone(),
                    server_id: member.server_id,
                });
            }
            self.start_reaper(state);
            let id = state.new_lease(member.clone(), ttl, now);
            Ok(Lease {
                id,
                ttl: state.faults.granted_ttl.unwrap_or(ttl),
            })
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let mut state = self.inner.lock();
        Self::available(&state)?;
        if state.faults.failing_keep_alives.contains(&lease) {
            return Err(Error::Unavailable(format!(
                "keepalive of lease {lease} dropped by a fault hook"
            )));
        }
        let now = Instant::now();
        let entry = state
            .leases
            .get_mut(&lease)
            .ok_or(Error::LeaseExpired { lease })?;
        entry.deadline = now + entry.ttl;
        let ttl = entry.ttl;
        Ok(state.faults.granted_ttl.unwrap_or(ttl))
        // No notify: a renewal changes nothing anyone waits on except the reaper's
        // next deadline, which only moves later.
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.mutate(|state, now| {
            state.remove_lease(lease, now);
            Ok(())
        })
    }

    async fn campaign(
        &self,
        lease: LeaseId,
        election: &ElectionName,
        value: Bytes,
    ) -> Result<LeaderKey> {
        RecordLimits::DEFAULT.check_leader_value(&value)?;
        let key = self.mutate(|state, now| {
            let existing = state
                .leases
                .get(&lease)
                .ok_or(Error::LeaseExpired { lease })?
                .candidacies
                .get(election)
                .copied();
            let token = match existing {
                Some(token) => token,
                None => {
                    let token = state.next_token();
                    if let Some(entry) = state.leases.get_mut(&lease) {
                        entry.candidacies.insert(election.clone(), token);
                    }
                    token
                }
            };
            let queue = &mut state.elections.entry(election.clone()).or_default().queue;
            queue.insert(token, crate::state::Candidate { lease, value });
            state.publish_leader(election, now);
            Ok(LeaderKey {
                election: election.clone(),
                lease,
                token,
            })
        })?;
        let mut guard = WithdrawOnDrop {
            backend: self,
            key: Some(key.clone()),
        };
        let mut changed = self.inner.changed.subscribe();
        loop {
            {
                let state = self.inner.lock();
                if !state.leases.contains_key(&lease) {
                    guard.key = None;
                    return Err(Error::LeaseExpired { lease });
                }
                let queue = state.elections.get(election).map(|e| &e.queue);
                match queue.and_then(|q| q.keys().next()) {
                    Some(head) if *head == key.token => {
                        guard.key = None;
                        return Ok(key);
                    }
                    _ if !queue.is_some_and(|q| q.contains_key(&key.token)) => {
                        guard.key = None;
                        return Err(Error::NotLeader {
                            election: election.clone(),
                            current: state.leader(election).map(|l| l.token()),
                        });
                    }
                    _ => {}
                }
            }
            if changed.changed().await.is_err() {
                return Err(Error::Unavailable("memory backend dropped".into()));
            }
        }
    }

    async fn resign(&self, key: &LeaderKey) -> Result<()> {
        self.mutate(|state, now| {
            state.remove_candidacy(key, now);
            Ok(())
        })
    }

    async fn proclaim(&self, key: &LeaderKey, value: Bytes) -> Result<()> {
        RecordLimits::DEFAULT.check_leader_value(&value)?;
        self.mutate(|state, now| {
            let leader = state.leader(&key.election);
            match leader {
                Some(leader) if leader.key == *key => {
                    if let Some(head) = state
                        .elections
                        .get_mut(&key.election)
                        .and_then(|e| e.queue.get_mut(&key.token))
                    {
                        head.value = value;
                    }
                    state.publish_leader(&key.election, now);
                    Ok(())
                }
                other => Err(Error::NotLeader {
                    election: key.election.clone(),
                    current: other.map(|l| l.token()),
                }),
            }
        })
    }

    async fn leader(&self, election: &ElectionName) -> Result<Option<Leader>> {
        let state = self.inner.lock();
        Self::available(&state)?;
        Ok(state.leader(election))
    }

    async fn kv_write(&self, guard: &LeaderKey, write: KvWrite) -> Result<KvWriteOutcome> {
        self.inner.kv_limits.check(&write)?;
        // Under the one lock: the guard is checked and the write applied in one step.
        self.mutate(|state, _| {
            match state.leader(&guard.election) {
                Some(leader) if leader.key == *guard => {}
                _ if state.faults.unguarded_writes => {}
                other => {
                    return Err(Error::NotLeader {
                        election: guard.election.clone(),
                        current: other.map(|l| l.token()),
                    })
                }
            }
            let slot = (guard.election.clone(), write.key().clone());
            let (next, outcome) = write.apply_to(state.kv.get(&slot));
            match next {
                Some(value) => state.kv.insert(slot, value),
                None => state.kv.remove(&slot),
            };
            Ok(outcome)
        })
    }

    async fn kv_read(&self, election: &ElectionName, key: &KvKey) -> Result<Option<Bytes>> {
        self.inner.kv_limits.check_key(key)?;
        let state = self.inner.lock();
        Self::available(&state)?;
        Ok(state.kv.get(&(election.clone(), key.clone())).cloned())
    }

    fn watch(&self, election: &ElectionName) -> LeaderStream {
        let (tx, rx) = watch_buffer::channel(self.inner.watch_buffer);
        self.inner
            .lock()
            .subscribe_leader(election, tx, Instant::now());
        delayed(rx)
    }

    async fn members(&self, role: &Role) -> Result<Vec<Member>> {
        let state = self.inner.lock();
        Self::available(&state)?;
        Ok(state.members(role))
    }

    fn watch_members(&self, role: &Role) -> MemberStream {
        let (tx, rx) = watch_buffer::channel(self.inner.watch_buffer);
        self.inner
            .lock()
            .subscribe_members(role, tx, Instant::now());
        delayed(rx)
    }
}

/// Turns a watcher's channel into a stream that delivers each event at its instant.
fn delayed<T: Send + 'static>(
    rx: WatchReceiver<(Instant, T)>,
) -> futures::stream::BoxStream<'static, Result<T>> {
    rx.into_stream()
        .then(|item| async move {
            let (at, event) = item?;
            if at > Instant::now() {
                sleep_until(at).await;
            }
            Ok(event)
        })
        .boxed()
}
