//! The clock the self-fence deadline runs on: tokio's, plus the time the host spent
//! suspended.
//!
//! tokio's clock (CLOCK_MONOTONIC on Linux) stops while the host is suspended, but the
//! lease owner's clock runs on: a session that counted on tokio's clock alone would wake
//! from a suspend longer than its TTL still calling itself valid while another holder was
//! elected. So the deadline is kept on tokio's clock plus the suspended time since this
//! process first asked (CLOCK_BOOTTIME − CLOCK_MONOTONIC). The suspended part stays zero
//! under tokio's paused test clock, unless a test injects some
//! (`testing::suspend_host`). A VM paused by its hypervisor usually stops both clocks;
//! that case is covered by fencing tokens, not by the deadline (docs/guarantees.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How often a watcher looks for a resume, so sessions fence at once after one.
const RESUME_CHECK: Duration = Duration::from_millis(250);

/// The suspend-aware now: tokio's clock plus the time suspended since the first call.
pub(crate) fn now() -> Instant {
    Instant::now() + suspended()
}

/// The tokio instant at which the suspend-aware clock reaches `at`, if the host does not
/// suspend again before.
pub(crate) fn to_tokio(at: Instant) -> Instant {
    let suspended = suspended();
    at.checked_sub(suspended).unwrap_or(at)
}

/// Time the host spent suspended since this process first asked.
fn suspended() -> Duration {
    static AT_START: OnceLock<Duration> = OnceLock::new();
    let now = host_suspended();
    let at_start = *AT_START.get_or_init(|| now);
    now.saturating_sub(at_start) + Duration::from_nanos(INJECTED.load(Ordering::Relaxed))
}

/// CLOCK_BOOTTIME − CLOCK_MONOTONIC: all the time the host has spent suspended.
#[cfg(target_os = "linux")]
fn host_suspended() -> Duration {
    use rustix::time::{clock_gettime, ClockId};
    let nanos = |t: rustix::time::Timespec| {
        Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_nsec).unwrap_or(0),
        )
    };
    // Monotonic first: a suspend between the two readings then shows, not hides.
    let monotonic = nanos(clock_gettime(ClockId::Monotonic));
    let boot = nanos(clock_gettime(ClockId::Boottime));
    boot.saturating_sub(monotonic)
}

/// Elsewhere the monotonic clock is all there is.
#[cfg(not(target_os = "linux"))]
fn host_suspended() -> Duration {
    Duration::ZERO
}

/// Suspended time a test pretends the host spent.
static INJECTED: AtomicU64 = AtomicU64::new(0);

/// Test seam: adds `duration` to the time the host spent suspended, as if it had just
/// resumed.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn inject_suspend(duration: Duration) {
    let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
    INJECTED.fetch_add(nanos, Ordering::Relaxed);
    resumed_sender().send_modify(|n| *n = n.wrapping_add(1));
}

fn resumed_sender() -> &'static watch::Sender<u64> {
    static RESUMED: OnceLock<watch::Sender<u64>> = OnceLock::new();
    RESUMED.get_or_init(|| watch::channel(0).0)
}

/// Changes when the host resumed from a suspend. Watched by every session's keepalive
/// task, so it fences at once instead of at its next timer, which tokio would fire only
/// after the suspended time has passed again.
pub(crate) fn resumed() -> watch::Receiver<u64> {
    ensure_watcher();
    resumed_sender().subscribe()
}

/// One watcher task per process while any runtime serves it; a watcher that died with
/// its runtime is replaced by the next session that asks.
fn ensure_watcher() {
    static ALIVE: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>> =
        std::sync::Mutex::new(None);
    let mut alive = ALIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if alive.as_ref().is_some_and(|task| !task.is_finished()) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    *alive = Some(runtime.spawn(async {
        let mut last = host_suspended();
        loop {
            tokio::time::sleep(RESUME_CHECK).await;
            let now = host_suspended();
            if now > last + RESUME_CHECK / 5 {
                resumed_sender().send_modify(|n| *n = n.wrapping_add(1));
            }
            last = now;
        }
    }));
}
