//! Small helpers the cases share; public so backend crates can write their own tests in
//! the same style.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::task::JoinHandle;

use crate::backend::Backend;
use crate::error::Result;
use crate::types::{ElectionName, LeaderKey, Lease, Member, Role, ServerId};

/// How long a test waits for something that should happen promptly.
pub(crate) const PROMPT: Duration = Duration::from_secs(10);

/// The role every case registers in.
pub fn test_role() -> Role {
    Role::new("coord").unwrap_or_else(|e| panic!("{e}"))
}

/// A member of [`test_role`] with server ID `id`.
pub fn test_member(id: u64) -> Member {
    Member::new(
        ServerId::new(id),
        test_role(),
        format!("127.0.0.1:{}", 10_000 + id),
    )
    .with_metadata("case", "conformance")
}

pub(crate) fn election(name: &str) -> ElectionName {
    ElectionName::new(name).unwrap_or_else(|e| panic!("{e}"))
}

/// The TTL for sessions that must not expire during a case.
pub(crate) fn long_ttl(backend: &dyn Backend) -> Duration {
    backend.capabilities().min_ttl.max(Duration::from_secs(30))
}

/// The shortest TTL, for cases that wait for an expiry.
pub(crate) fn short_ttl(backend: &dyn Backend) -> Duration {
    backend.capabilities().min_ttl
}

/// Extra time past a TTL for the backend to notice the expiry (etcd checks every 500 ms).
pub(crate) fn expiry_grace(backend: &dyn Backend) -> Duration {
    if backend.capabilities().virtual_time {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(6)
    }
}

/// Registers member `id` with a TTL that outlives the case.
pub(crate) async fn register(backend: &Arc<dyn Backend>, id: u64) -> Result<Lease> {
    backend
        .register(&test_member(id), long_ttl(&**backend))
        .await
}

/// Waits for the next event of a watch, failing the case after 10 s.
pub async fn next_event<S, T>(events: &mut S) -> T
where
    S: Stream<Item = Result<T>> + Unpin,
{
    match tokio::time::timeout(PROMPT, events.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(error))) => panic!("watch failed: {error}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {PROMPT:?}"),
    }
}

/// Polls `check` every 20 ms until it returns true, failing the case after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a campaign in the background.
pub(crate) fn spawn_campaign(
    backend: &Arc<dyn Backend>,
    lease: &Lease,
    election: &ElectionName,
    value: &'static str,
) -> JoinHandle<Result<LeaderKey>> {
    let backend = Arc::clone(backend);
    let lease = lease.id;
    let election = election.clone();
    tokio::spawn(async move { backend.campaign(lease, &election, value.into()).await })
}

/// Waits for a background campaign to finish, failing the case after [`PROMPT`].
pub(crate) async fn won(handle: JoinHandle<Result<LeaderKey>>) -> Result<LeaderKey> {
    match tokio::time::timeout(PROMPT, handle).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => panic!("campaign task failed: {join}"),
        Err(_) => panic!("campaign did not finish within {PROMPT:?}"),
    }
}

/// Lets a background campaign reach the backend's queue. There is no API to observe
/// the queue, so this is a pause long enough for a loopback round trip many times over.
pub(crate) async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Fails the case if the background campaign has finished.
pub(crate) fn assert_waiting(handle: &JoinHandle<Result<LeaderKey>>, who: &str) {
    assert!(
        !handle.is_finished(),
        "{who} finished its campaign while it should wait"
    );
}
