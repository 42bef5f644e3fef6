//! Why a Milvus 2.6 coordinator under `ha run` takes over in max(ha TTL, session TTL)
//! after a crash: the command keeps an etcd session of its own (a key bound to a lease
//! of its own, as MixCoord does, `examples/milvus/session_child.sh`) and waits for its
//! predecessor's key to vanish before it serves. Two `ha run` supervisors with TTL 2 s
//! on a real etcd; the ACTIVE's supervisor is SIGKILLed (its guard kills the command's
//! group). With a 6 s session TTL the next command serves about 6 s later; lowered to
//! the ha TTL, about 2 s. docs/operations.md quotes the measured numbers.

#![cfg(all(feature = "cli", feature = "etcd"))]

use std::path::Path;
use std::time::Duration;

use ha_testkit::{Processes, Signal};
use tokio::process::Command;

const HA: &str = env!("CARGO_BIN_EXE_ha");
const HA_TTL: &str = "2s";
const CHILD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/milvus/session_child.sh"
);

/// The unix time (µs) at which server `id`'s command first said it serves.
fn ready_at(log: &Path, id: u64) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            match fields[..] {
                ["ready", server, _, ns] if server == id.to_string() => ns.parse::<u64>().ok(),
                _ => None,
            }
        })
        .map(|ns| ns / 1000)
        .next()
}

/// Crashes the ACTIVE's supervisor and returns how long until the next command served.
async fn takeover_after_a_crash(session_ttl: u64) -> Option<Duration> {
    let etcd = tokio::task::spawn_blocking(ha_testkit::etcd::Etcd::start)
        .await
        .unwrap_or_else(|e| panic!("{e}"))?;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("ready.log");
    let url = format!("etcd://{}/milvus-{session_ttl}", etcd.endpoint());
    let mut procs = Processes::new();
    for id in [1u64, 2] {
        let mut command = Command::new(HA);
        command
            .args(["run", "--backend", &url, "--role", "mixcoord", "--json"])
            .args(["--ttl", HA_TTL, "--id", &id.to_string(), "--"])
            .args(["sh", CHILD, etcd.endpoint(), "by-dev/session/mixcoord"])
            .arg(session_ttl.to_string())
            .arg(&log)
            .env("RUST_LOG", "warn");
        procs
            .spawn(id, command)
            .unwrap_or_else(|e| panic!("spawn: {e}"));
    }
    let active = procs
        .expect("an ACTIVE", Duration::from_secs(30), |l| l.is("elected"))
        .await
        .from;
    let next = 3 - active;
    for _ in 0..100 {
        if ready_at(&log, active).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready_at(&log, active).is_some(),
        "the first command never served"
    );
    // A session renewed just now: the crash comes one renewal after it started.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let crashed = procs
        .signal(active, Signal::KILL)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut served = None;
    for _ in 0..300 {
        served = ready_at(&log, next);
        if served.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    procs.stop_all(Duration::from_secs(10)).await;
    let served = served.unwrap_or_else(|| panic!("the next command never served"));
    Some(Duration::from_micros(served.saturating_sub(crashed)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_with_a_session_of_its_own_serves_after_the_longer_ttl() {
    let Some(own_longer) = takeover_after_a_crash(6).await else {
        return;
    };
    let Some(own_lowered) = takeover_after_a_crash(2).await else {
        return;
    };
    eprintln!(
        "ha TTL {HA_TTL}: the next command served {own_longer:?} after the crash with a 6 s session, {own_lowered:?} with a 2 s one"
    );
    // The key lives 4-6 s after the crash (renewed every TTL/3), ha elects after ~2 s.
    assert!(
        own_longer >= Duration::from_secs(3) && own_longer <= Duration::from_secs(10),
        "{own_longer:?}"
    );
    assert!(
        own_lowered + Duration::from_secs(1) < own_longer,
        "{own_lowered:?} vs {own_longer:?}"
    );
}
