//! Takeover with a dead member: an ACTIVE and a STANDBY (`ha elect`) on a 3-member
//! backend (three bare `ha node`, or a 3-member etcd), the STANDBY reaching each member
//! through a proxy. In each trial the member carrying the STANDBY's calls dies silently
//! (no RST, no FIN: ha-testkit's `Proxy::die`), and a second later the ACTIVE resigns
//! (SIGTERM) or is killed (SIGKILL); the gap runs from the signal to the STANDBY's
//! `elected`. The same trials with every member alive give the baseline.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Result};
use ha_testkit::{Direction, Processes, Proxy, Signal};
use tokio::process::Command;

use crate::report::Series;

/// The TTL of the two processes.
pub const TTL: Duration = Duration::from_secs(6);
/// From the death of the member to the ACTIVE's signal.
const DEAD_FOR: Duration = Duration::from_secs(1);

/// The backend's members: where the ACTIVE connects directly, and the proxies in front
/// of each for the STANDBY.
pub struct Members<'a> {
    /// raft, or etcd (3 members).
    pub backend: &'static str,
    /// The URL with every member's own address.
    pub direct: String,
    /// The URL with the proxies' addresses.
    pub proxied: String,
    /// The proxies, in the URL's order.
    pub proxies: &'a [Proxy],
}

/// `trials` of each of the four variants (resign or kill, a member dead or not).
pub async fn trials(ha: &Path, members: &Members<'_>, trials: usize) -> Result<Vec<Series>> {
    println!(
        "{}, TTL {} s: {trials} trials each of resign and kill, with the standby's member dead and without",
        members.backend,
        TTL.as_secs()
    );
    let mut series = Vec::new();
    for (scenario, signal) in [("handoff", Signal::TERM), ("failover", Signal::KILL)] {
        for dead in [true, false] {
            let mut gaps_ms = Vec::new();
            for trial in 0..trials {
                let gap = one(ha, members, signal, dead, trial).await?;
                println!(
                    "  {scenario}{}: {gap:.1} ms",
                    if dead { ", standby's member dead" } else { "" }
                );
                gaps_ms.push(gap);
            }
            series.push(Series {
                scenario: if dead {
                    if signal == Signal::TERM {
                        "handoff, a member dead"
                    } else {
                        "failover, a member dead"
                    }
                } else if signal == Signal::TERM {
                    "handoff, ha elect"
                } else {
                    "failover, ha elect"
                },
                backend: members.backend,
                variant: format!(
                    "{} of the ACTIVE{}",
                    if signal == Signal::TERM {
                        "SIGTERM"
                    } else {
                        "SIGKILL"
                    },
                    if dead {
                        ", the STANDBY's member dead 1 s before (no RST, no FIN)"
                    } else {
                        ", every member alive"
                    }
                ),
                ttl: Some(TTL),
                gaps_ms,
            });
        }
    }
    Ok(series)
}

/// One trial: the gap in ms.
async fn one(
    ha: &Path,
    members: &Members<'_>,
    signal: Signal,
    dead: bool,
    trial: usize,
) -> Result<f64> {
    // An election of its own: a killed ACTIVE's lease holds the last one for a TTL.
    let election = format!(
        "dead-member-{}-{}-{dead}-{trial}",
        std::process::id(),
        signal.as_raw()
    );
    let mut procs = Processes::new();
    let elect = |id: u64, url: &str| {
        let mut command = Command::new(ha);
        command
            .args(["elect", &election, &format!("p{id}"), "--json"])
            .args(["--id", &id.to_string()])
            .args(["--ttl", &TTL.as_secs().to_string(), "--backend", url])
            .env("RUST_LOG", "off");
        command
    };
    procs.spawn(1, elect(1, &members.direct))?;
    procs
        .wait_for("the ACTIVE", Duration::from_secs(30), |l| {
            l.from == 1 && l.is("elected")
        })
        .await
        .map_err(|e| anyhow!("{e}"))?;
    procs.spawn(2, elect(2, &members.proxied))?;
    procs
        .wait_for("the STANDBY", Duration::from_secs(30), |l| {
            l.from == 2 && l.is("registered")
        })
        .await
        .map_err(|e| anyhow!("{e}"))?;
    // The standby's calls all go to the member in use: the busiest proxy over a renewal.
    let before: Vec<u64> = forwarded(members.proxies);
    tokio::time::sleep(TTL / 3 + Duration::from_millis(700)).await;
    let after = forwarded(members.proxies);
    let member = (0..before.len())
        .max_by_key(|&i| after[i] - before[i])
        .unwrap_or(0);
    if dead {
        members.proxies[member].die();
        tokio::time::sleep(DEAD_FOR).await;
    }
    if signal == Signal::KILL {
        // Anywhere in the ACTIVE's renewal cycle, as real crashes are.
        tokio::time::sleep(crate::processes::renewal_phase(TTL, trial)).await;
    }
    let sent = procs.signal(1, signal)?;
    let elected = procs
        .wait_for("the STANDBY elected", TTL * 4, |l| {
            l.from == 2 && l.is("elected")
        })
        .await;
    procs.stop_all(Duration::from_secs(10)).await;
    members.proxies[member].revive();
    let elected = elected.map_err(|e| anyhow!("{e}"))?;
    Ok(elected.at_unix_us().saturating_sub(sent) as f64 / 1000.0)
}

fn forwarded(proxies: &[Proxy]) -> Vec<u64> {
    proxies
        .iter()
        .map(|p| p.traffic(Direction::ToServer).forwarded)
        .collect()
}
