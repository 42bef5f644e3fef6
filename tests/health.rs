//! A hung command must not hold the role: `ha run --health-http` on a three-member Raft
//! group, supervising a command (an `ha elect --metrics-addr` serving `/healthz`) that
//! stops answering while its process lives (SIGSTOP). Its supervisor stops it after
//! the failed checks and resigns, back in line with `--recampaign`, and the standby
//! takes over long before any lease would run out (the supervisor's session is fine).

#![cfg(all(feature = "cli", feature = "raft"))]

#[path = "support/group.rs"]
mod group;

use std::time::{Duration, Instant};

use ha_testkit::{free_port, signal_pid, Processes, Signal};
use tokio::process::Command;

const HA: &str = env!("CARGO_BIN_EXE_ha");
const TTL: Duration = Duration::from_secs(3);

/// `ha run` as process `id`, supervising an HTTP server on `port` that is ready and
/// healthy while `/healthz` answers 200.
fn supervisor(procs: &mut Processes, id: u64, url: &str, port: u16) {
    let healthz = format!("http://127.0.0.1:{port}/healthz");
    let mut command = Command::new(HA);
    command
        .args([
            "run",
            "--backend",
            url,
            "--role",
            "svc",
            "--json",
            "--recampaign",
        ])
        .args([
            "--id",
            &id.to_string(),
            "--ttl",
            &format!("{}s", TTL.as_secs()),
        ])
        .args(["--ready-http", &healthz, "--health-http", &healthz])
        .args(["--health-interval", "200ms", "--health-failures", "3"])
        .args(["--kill-grace", "300ms", "--"])
        .args([
            HA,
            "elect",
            "child",
            &format!("c{id}"),
            "--backend",
            "memory://",
        ])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn");
    procs
        .spawn(id, command)
        .unwrap_or_else(|e| panic!("spawn supervisor {id}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_stops_answering_is_stopped_and_the_role_handed_on() {
    let mut group = group::Group::new(3);
    group.bootstrap(&[1, 2, 3], &[]);
    group.leader_known().await;
    let url = group.url(&[1, 2, 3]);
    let mut procs = Processes::new();
    for id in [1, 2] {
        supervisor(&mut procs, id, &url, free_port());
    }
    let ready = procs
        .expect("a ready ACTIVE", Duration::from_secs(60), |l| {
            l.is("proclaimed")
        })
        .await;
    let (active, token) = (ready.from, ready.token());
    let standby = 3 - active;
    let child = procs
        .last(active, |l| l.is("child_started"))
        .and_then(|l| l.number("pid"))
        .unwrap_or_else(|| panic!("no child_started from {active}"));

    // The command hangs: its process lives, its port still accepts, nothing answers.
    let hung_at = Instant::now();
    signal_pid(child as u32, Signal::STOP).unwrap_or_else(|e| panic!("SIGSTOP: {e}"));
    let stopping = procs
        .expect("the hung command stopped", Duration::from_secs(20), |l| {
            l.from == active && l.is("child_stopping")
        })
        .await;
    assert_eq!(stopping.json["reason"], "unhealthy", "{}", stopping.text);
    let next = procs
        .expect("the standby elected", Duration::from_secs(20), |l| {
            l.from == standby && l.is("elected")
        })
        .await;
    let took = hung_at.elapsed();
    assert!(next.token() > token);
    assert!(
        took < TTL,
        "the standby took over {took:?} after the command hung: that is a lease running out, not a handover"
    );
    eprintln!("the standby took over {took:?} after the command hung");
    // The old command was gone before the new one started, and its supervisor is back
    // in line, not exited.
    let exited = procs
        .last(active, |l| l.is("child_exited"))
        .unwrap_or_else(|| panic!("the hung command was never reaped"));
    let started = procs
        .expect("the standby's command", Duration::from_secs(20), |l| {
            l.from == standby && l.is("child_started")
        })
        .await;
    assert!(exited.seen <= started.seen);
    assert!(
        matches!(procs.try_exit(active), Ok(None)),
        "the supervisor of the hung command exited instead of going back in line"
    );
    procs.stop_all(Duration::from_secs(10)).await;
    group.procs.stop_all(Duration::from_secs(10)).await;
}
