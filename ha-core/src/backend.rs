//! The backend trait: the small, object-safe contract every backend implements.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::error::{Error, Result};
use crate::kv::{KvKey, KvLimits, KvWrite, KvWriteOutcome};
use crate::limits::RecordLimits;
use crate::types::MAX_TTL;
use crate::types::{
    ElectionName, Leader, LeaderEvent, LeaderKey, Lease, LeaseId, Member, MemberEvent, Role,
};

/// A stream of election changes; see [`Backend::watch`].
pub type LeaderStream = BoxStream<'static, Result<LeaderEvent>>;

/// A stream of membership changes; see [`Backend::watch_members`].
pub type MemberStream = BoxStream<'static, Result<MemberEvent>>;

/// Leases, elections and member discovery, as one backend provides them.
///
/// Users rarely call this directly: [`Session`](crate::Session) and
/// [`Leadership`](crate::Leadership) build keepalives, self-fencing and handover on top
/// of it, once for every backend. The trait is object-safe, so a backend picked from
/// configuration is an `Arc<dyn Backend>`.
///
/// # Contract
///
/// Every backend keeps these clauses; the conformance suite in
/// [`testing`](crate#conformance-suite) has cases named after them.
///
/// 1. **register**: [`register`](Self::register) grants a lease with a TTL no shorter than
///    asked and publishes the member record, visible to [`members`](Self::members) while
///    the lease lives. A TTL below [`Capabilities::min_ttl`] or above
///    [`MAX_TTL`](crate::MAX_TTL) is `InvalidArgument`; a server ID already registered
///    in the role by a live lease is `AlreadyRegistered`.
/// 2. **keep_alive**: [`keep_alive`](Self::keep_alive) restarts the lease's TTL and returns
///    the TTL granted; on a lease that is gone it is `LeaseExpired`. A lease not kept
///    alive for its TTL expires.
/// 3. **revoke**: [`revoke`](Self::revoke) ends the lease now; its member record and every
///    candidacy bound to it vanish at once. Revoking a lease that is gone succeeds.
/// 4. **campaign**: [`campaign`](Self::campaign) enqueues a candidacy bound to the lease and
///    returns when it is first in line. The queue is FIFO by enqueue order. The returned
///    key carries the **fencing token**, which strictly increases across every
///    leadership of the election, ever. Campaigning again with the same lease in the
///    same election resumes the same candidacy (same token, value replaced), so a
///    campaign is safe to retry. If the lease is gone, or ends while waiting, it fails
///    with `LeaseExpired`. Dropping the future before it completes withdraws the
///    candidacy.
/// 5. **resign**: [`resign`](Self::resign) removes the candidacy; if it led, the next
///    candidate leads at once. Resigning a candidacy that is gone succeeds, so resign is
///    idempotent and retryable.
/// 6. **proclaim**: [`proclaim`](Self::proclaim) replaces the leader's value and keeps its
///    token; from a candidacy that does not lead (never did, or lost) it is `NotLeader`.
/// 7. **leader**: [`leader`](Self::leader) returns the current leader, read linearizably:
///    it reflects every change that completed before the call.
/// 8. **watch**: [`watch`](Self::watch) yields the current state first (`Elected` or
///    `Vacant`), then every change in order: each new leadership, each proclaimed value,
///    and `Vacant` whenever the election empties. It never skips a leadership nor
///    reorders changes, so the tokens of successive leaderships in it strictly
///    increase. Transient failures are retried inside the stream; an error item means
///    the stream cannot continue.
/// 9. **members**: [`members`](Self::members) lists the live members of a role, by server
///    ID; [`watch_members`](Self::watch_members) yields a snapshot, then every join and
///    leave in order.
/// 10. **guarded store**: each election has a key-value namespace.
///    [`kv_write`](Self::kv_write) applies a write only if the guard key leads its
///    election (it is the head of the queue, token and lease) at the moment the backend
///    applies the write, checked in the same atomic step; otherwise nothing changes and
///    it is `NotLeader` with the current leader's token if there is one. A key or value
///    beyond [`Capabilities::kv_limits`] is `TooLarge`. [`kv_read`](Self::kv_read) is
///    linearizable like `leader` and open to every caller, leader or not. The store
///    outlives leaderships and sessions: what one leader wrote, the next one reads.
#[async_trait]
pub trait Backend: Send + Sync + Debug + 'static {
    /// A short name for logs and errors (`memory`, `etcd`, `raft`).
    fn name(&self) -> &'static str;

    /// What this backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Starts a session: a lease with `ttl` and the member record bound to it (clause 1).
    async fn register(&self, member: &Member, ttl: Duration) -> Result<Lease>;

    /// Renews the lease and returns the TTL granted (clause 2).
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration>;

    /// Ends the lease and everything bound to it (clause 3).
    async fn revoke(&self, lease: LeaseId) -> Result<()>;

    /// Waits in line to lead `election` and returns the leadership's key (clause 4).
    async fn campaign(
        &self,
        lease: LeaseId,
        election: &ElectionName,
        value: Bytes,
    ) -> Result<LeaderKey>;

    /// Gives up a candidacy or leadership (clause 5).
    async fn resign(&self, key: &LeaderKey) -> Result<()>;

    /// Replaces the leader's value without a new election (clause 6).
    async fn proclaim(&self, key: &LeaderKey, value: Bytes) -> Result<()>;

    /// The current leader, if any (clause 7).
    async fn leader(&self, election: &ElectionName) -> Result<Option<Leader>>;

    /// Follows an election: current state, then every change (clause 8).
    fn watch(&self, election: &ElectionName) -> LeaderStream;

    /// The live members of a role, ordered by server ID (clause 9).
    async fn members(&self, role: &Role) -> Result<Vec<Member>>;

    /// Follows a role's members: a snapshot, then every join and leave (clause 9).
    fn watch_members(&self, role: &Role) -> MemberStream;

    /// Applies `write` to the store of `guard.election` if `guard` leads it (clause 10).
    async fn kv_write(&self, guard: &LeaderKey, write: KvWrite) -> Result<KvWriteOutcome>;

    /// Reads a key of an election's store, linearizably (clause 10).
    async fn kv_read(&self, election: &ElectionName, key: &KvKey) -> Result<Option<Bytes>>;
}

/// What a backend can do, so callers and the conformance suite can adapt to it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The shortest TTL the backend accepts.
    pub min_ttl: Duration,
    /// Whether the backend's clocks follow tokio's clock, so tests under
    /// `tokio::time::pause()` expire leases instantly and deterministically.
    pub virtual_time: bool,
    /// Size limits of the guarded store ([`Backend::kv_write`](Backend::kv_write)).
    pub kv_limits: KvLimits,
    /// Size limits of leader values and member records, the same on every backend.
    pub record_limits: RecordLimits,
}

impl Capabilities {
    /// Describes a backend with the given TTL floor and real time.
    pub const fn new(min_ttl: Duration) -> Self {
        Self {
            min_ttl,
            virtual_time: false,
            kv_limits: KvLimits {
                max_key_bytes: crate::kv::DEFAULT_MAX_KEY_BYTES,
                max_value_bytes: crate::kv::DEFAULT_MAX_VALUE_BYTES,
            },
            record_limits: RecordLimits::DEFAULT,
        }
    }

    /// Sets the guarded store's size limits.
    pub const fn with_kv_limits(mut self, kv_limits: KvLimits) -> Self {
        self.kv_limits = kv_limits;
        self
    }

    /// Marks the backend as following tokio's (pausable) clock.
    pub const fn with_virtual_time(mut self, virtual_time: bool) -> Self {
        self.virtual_time = virtual_time;
        self
    }

    /// Checks a requested TTL against this backend's floor and the global ceiling.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the TTL is below [`Self::min_ttl`] or above
    /// [`MAX_TTL`].
    pub fn check_ttl(&self, ttl: Duration) -> Result<()> {
        if ttl < self.min_ttl {
            return Err(Error::InvalidArgument {
                what: "ttl",
                reason: format!(
                    "{ttl:?} is below this backend's minimum of {:?}",
                    self.min_ttl
                ),
            });
        }
        if ttl > MAX_TTL {
            return Err(Error::InvalidArgument {
                what: "ttl",
                reason: format!("{ttl:?} is above the maximum of {MAX_TTL:?}"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::types::MAX_TTL;

    #[test]
    fn ttl_bounds() {
        let caps = Capabilities::new(Duration::from_secs(2));
        assert!(caps.check_ttl(Duration::from_secs(2)).is_ok());
        assert!(caps.check_ttl(MAX_TTL).is_ok());
        for bad in [
            Duration::ZERO,
            Duration::from_millis(1999),
            MAX_TTL + Duration::from_millis(1),
        ] {
            assert!(matches!(
                caps.check_ttl(bad),
                Err(Error::InvalidArgument { what: "ttl", .. })
            ));
        }
    }
}
