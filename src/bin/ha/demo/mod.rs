//! `ha demo`: three `ha node --active-standby` processes of this binary on an embedded
//! Raft group (loopback, temp dirs), a SIGKILL of the ACTIVE with the measured takeover
//! gap, a restart, a SIGTERM of the next ACTIVE with the measured handoff gap, and a
//! cleanup of every process and directory.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::{timeout, Instant};

use crate::output::unix_us;
use crate::Exit;
use group::{Group, NODES, ROLE};

mod group;

/// Runs the demo; any failure is reported and exits with code 1. SIGINT/SIGTERM stop it
/// early; the processes and the temp dir are cleaned up either way (the group's drop).
pub async fn run(ttl: Duration) -> Exit {
    let outcome = tokio::select! {
        outcome = demo(ttl) => outcome,
        () = crate::shutdown_signal() => Err(anyhow!("interrupted; stopped every node")),
    };
    match outcome {
        Ok(()) => Exit::Clean,
        Err(error) => {
            eprintln!("ha demo failed: {error:#}");
            Exit::Failed
        }
    }
}

async fn demo(ttl: Duration) -> Result<()> {
    let mut group = Group::new(ttl)?;
    println!(
        "ha demo: three replicas of coordinator role '{ROLE}', each embedding a member of one Raft group"
    );
    println!(
        "         (no etcd; TTL {:.1} s; data in {})\n",
        ttl.as_secs_f64(),
        group.dir.path().display()
    );
    for id in NODES {
        let pid = group.start(id)?;
        group.say(&format!(
            "started node {id} (pid {pid}): ha node --id {id} --listen 127.0.0.1:{} --active-standby --role {ROLE}",
            group.ports[&id]
        ));
    }
    let first = group
        .wait_for("a first ACTIVE", Duration::from_secs(20), |e| {
            e.kind() == "proclaimed"
        })
        .await?;
    let active = first.node;
    let first_token = first.token();

    // Let the standbys log a little, as Milvus's do.
    let settle = Instant::now() + Duration::from_millis(2500);
    while let Ok(Some(event)) = timeout(
        settle.saturating_duration_since(Instant::now()),
        group.events.recv(),
    )
    .await
    {
        group.narrate(&event);
    }
    group.show_standby_logs.store(false, Ordering::Relaxed);

    // 1. Crash: SIGKILL the active.
    let also = if group.raft_leader == Some(active) {
        ", which also hosts the Raft leader"
    } else {
        ""
    };
    println!("\n--- crash: SIGKILL the ACTIVE (node {active}{also}) ---");
    let pid = group.pid(active)?;
    let killed_at = unix_us();
    kill(Pid::from_raw(pid), Signal::SIGKILL).context("SIGKILL failed")?;
    group.say(&format!("killed node {active} (pid {pid})"));
    if let Some(mut child) = group.children.remove(&active) {
        let _ = child.wait().await;
    }
    let next = group
        .wait_for("a takeover", ttl + Duration::from_secs(15), |e| {
            e.kind() == "elected" && e.node != active
        })
        .await?;
    let takeover = Duration::from_micros(next.at_unix_us().saturating_sub(killed_at));
    if next.token() <= first_token {
        bail!(
            "the fencing token did not increase: {first_token} then {}",
            next.token()
        );
    }
    let ready = group
        .wait_for("the new ACTIVE ready", Duration::from_secs(10), |e| {
            e.kind() == "proclaimed" && e.node == next.node
        })
        .await?;
    println!(
        "    takeover gap: {:.2} s from SIGKILL to node {} elected, ready after {:.2} s",
        takeover.as_secs_f64(),
        next.node,
        Duration::from_micros(ready.at_unix_us().saturating_sub(killed_at)).as_secs_f64()
    );
    println!(
        "    (the dead lease expires at most TTL = {:.1} s after its last keepalive; +~1 s when the",
        ttl.as_secs_f64()
    );
    println!("     killed process also hosted the Raft leader and the group elects a new one)");
    println!("    (Milvus's coordinator active-standby: 30-60 s)");

    // 2. The killed node comes back from its data dir, as a STANDBY.
    println!("\n--- restart node {active} from its data dir ---");
    group.start(active)?;
    group
        .wait_for(
            "the restarted node in STANDBY",
            Duration::from_secs(20),
            |e| e.kind() == "standby" && e.node == active,
        )
        .await?;

    // 3. Rolling restart: SIGTERM the active; it resigns and the next takes over at once.
    let leaving = next.node;
    let also = if group.raft_leader == Some(leaving) {
        ", which also hosts the Raft leader"
    } else {
        ""
    };
    println!("\n--- graceful stop: SIGTERM the ACTIVE (node {leaving}{also}) ---");
    let pid = group.pid(leaving)?;
    let termed_at = unix_us();
    kill(Pid::from_raw(pid), Signal::SIGTERM).context("SIGTERM failed")?;
    let after = group
        .wait_for("a handoff", Duration::from_secs(10), |e| {
            e.kind() == "elected" && e.node != leaving
        })
        .await?;
    let handoff = Duration::from_micros(after.at_unix_us().saturating_sub(termed_at));
    if after.token() <= next.token() {
        bail!(
            "the fencing token did not increase: {} then {}",
            next.token(),
            after.token()
        );
    }
    println!(
        "    handoff gap: {:.1} ms from SIGTERM to node {} elected (the old ACTIVE stopped, resigned and revoked first)",
        handoff.as_secs_f64() * 1000.0,
        after.node
    );
    if let Some(mut child) = group.children.remove(&leaving) {
        match timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(status)) => group.say(&format!("node {leaving} exited: {status}")),
            _ => {
                let _ = child.kill().await;
                bail!("node {leaving} did not exit within 10 s of SIGTERM");
            }
        }
    }
    group
        .wait_for("the new ACTIVE ready", Duration::from_secs(10), |e| {
            e.kind() == "proclaimed" && e.node == after.node
        })
        .await?;

    println!("\n--- cleanup ---");
    group.stop_all().await;
    let dir = group.dir.path().display().to_string();
    drop(group);
    println!("stopped every node and removed {dir}");
    println!(
        "\nsummary: crash takeover {:.2} s (TTL {:.1} s), graceful handoff {:.1} ms, fencing tokens {} -> {} -> {}",
        takeover.as_secs_f64(),
        ttl.as_secs_f64(),
        handoff.as_secs_f64() * 1000.0,
        first_token,
        next.token(),
        after.token()
    );
    Ok(())
}
