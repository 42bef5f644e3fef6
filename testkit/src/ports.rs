//! Loopback ports and the wall clock the processes of one test share.

use std::time::{SystemTime, UNIX_EPOCH};

/// `n` distinct free loopback ports: all bound at once (so none repeats), noted, and
/// released. Another process can still take one before the test binds it; the etcd
/// fixture restarts on that race.
///
/// # Panics
/// When loopback has no free port (a test cannot go on without one).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
        })
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
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
