//! Loopback ports and the wall clock the processes of one test share.

use std::time::{SystemTime, UNIX_EPOCH};

/// Ports are picked below the kernel's ephemeral range (32768-60999 on Linux), which
/// outgoing connections take their source ports from: a node stopped and restarted on
/// its port by a test could otherwise find a client's connection holding it.
const RANGE: std::ops::Range<u16> = 20_000..32_700;

/// The next port to try, shared by every test of the process; it starts at a place
/// drawn from the clock and the PID, so test processes running at once rarely meet.
static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);

fn candidate() -> u16 {
    use std::sync::atomic::Ordering;
    let width = u32::from(RANGE.end - RANGE.start);
    let seed = (unix_us() as u32).wrapping_mul(2_654_435_761) ^ std::process::id();
    let _ = NEXT.compare_exchange(u32::MAX, seed % width, Ordering::Relaxed, Ordering::Relaxed);
    let step = NEXT.fetch_add(1, Ordering::Relaxed);
    RANGE.start + (step % width) as u16
}

/// `n` distinct free loopback ports below the ephemeral range, each checked by binding
/// it. Another process can still take one before the test binds it; the etcd fixture
/// restarts on that race.
///
/// # Panics
/// When loopback has no free port in the range (a test cannot go on without one).
pub fn free_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(n);
    let mut tries = 0;
    while ports.len() < n {
        tries += 1;
        assert!(
            tries <= usize::from(RANGE.end - RANGE.start),
            "no free loopback port in {RANGE:?}"
        );
        let port = candidate();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() && !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

/// One free loopback port.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// Microseconds since the Unix epoch: the clock every process of a run shares.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
