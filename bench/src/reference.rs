//! etcd's own Go concurrency client through `etcdctl`, the reference for our etcd
//! client: `etcdctl lock --ttl N` for crashes (its session TTL can be set; `etcdctl
//! elect` always uses 60 s) and `etcdctl elect` for graceful handoffs
//! (SIGINT makes it resign). Each holds until signalled and prints a line when it gets
//! the lock or leadership; the gap runs from the signal to the next holder's first line,
//! stamped when this process reads it.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ha_testkit::{signal_pid, unix_us, Signal};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::time::timeout;

use crate::processes::renewal_phase;
use crate::report::Series;

/// Which etcdctl command stands in for a coordinator.
#[derive(Debug, Clone, Copy)]
pub enum Reference {
    /// `etcdctl lock --ttl N`, the holder SIGKILLed.
    LockCrash {
        /// The session TTL.
        ttl: Duration,
    },
    /// `etcdctl elect`, the holder SIGINTed (it resigns).
    ElectHandoff,
}

/// One etcdctl process and when it printed its first line.
struct Contender {
    child: Child,
    acquired: oneshot::Receiver<u64>,
}

impl Contender {
    fn spawn(endpoints: &str, reference: Reference, trial: usize) -> Result<Self> {
        let mut command = Command::new("etcdctl");
        command.arg(format!("--endpoints={endpoints}"));
        match reference {
            Reference::LockCrash { ttl } => command
                .arg("lock")
                .arg(format!("--ttl={}", ttl.as_secs().max(1)))
                .arg(format!("bench-lock-{}", ttl.as_secs())),
            Reference::ElectHandoff => command
                .arg("elect")
                .arg("bench-elect")
                .arg(format!("candidate-{trial}")),
        };
        let mut child = command
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start etcdctl (Debian package etcd-client)")?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("etcdctl has no stdout"))?;
        let (sender, acquired) = oneshot::channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            if let Ok(Some(_)) = lines.next_line().await {
                let _ = sender.send(unix_us());
            }
            // Keep reading so the pipe never fills.
            while let Ok(Some(_)) = lines.next_line().await {}
        });
        Ok(Self { child, acquired })
    }

    fn signal(&self, signal: Signal) -> Result<u64> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow!("etcdctl exited early"))?;
        let at = unix_us();
        signal_pid(pid, signal).with_context(|| format!("{signal:?} to etcdctl"))?;
        Ok(at)
    }

    async fn reap(mut self) {
        if timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// `trials` takeovers of `reference` on the etcd at `endpoints` (comma-separated).
pub async fn measure(endpoints: &str, reference: Reference, trials: usize) -> Result<Series> {
    let (signal, patience, variant, scenario, ttl) = match reference {
        Reference::LockCrash { ttl } => (
            Signal::KILL,
            ttl + Duration::from_secs(20),
            "etcdctl lock --ttl, holder SIGKILLed",
            "failover",
            Some(ttl),
        ),
        Reference::ElectHandoff => (
            Signal::INT,
            Duration::from_secs(20),
            "etcdctl elect, holder SIGINTed",
            "handoff",
            None,
        ),
    };
    println!("etcdctl reference: {variant}, {trials} trials");
    let mut holder = Contender::spawn(endpoints, reference, 0)?;
    timeout(Duration::from_secs(20), &mut holder.acquired)
        .await
        .context("the first etcdctl did not get the lock within 20 s")?
        .context("the first etcdctl exited")?;
    let mut gaps = Vec::new();
    for trial in 1..=trials {
        let mut next = Contender::spawn(endpoints, reference, trial)?;
        // Let it queue behind the holder (its key created, its watch open).
        tokio::time::sleep(Duration::from_millis(500)).await;
        if next.acquired.try_recv().is_ok() {
            bail!("etcdctl {trial} got the lock while another held it");
        }
        // A crash lands anywhere between two renewals of the holder's lease. Without
        // this the kill came a fixed time after the holder got the lock, so always at
        // the same point of its renewal cycle: a phase-locked gap (p50 1.52 s at TTL
        // 2 s, 3.51 s at 5 s, 10.01 s at 10 s).
        if let Reference::LockCrash { ttl } = reference {
            tokio::time::sleep(renewal_phase(ttl, trial)).await;
        }
        let sent = holder.signal(signal)?;
        let at = timeout(patience, &mut next.acquired)
            .await
            .with_context(|| format!("no etcdctl takeover within {patience:?}"))?
            .context("the waiting etcdctl exited")?;
        gaps.push(at.saturating_sub(sent) as f64 / 1000.0);
        holder.reap().await;
        holder = next;
    }
    let _ = holder.signal(Signal::INT);
    holder.reap().await;
    Ok(Series {
        scenario,
        backend: "etcd (reference)",
        variant: variant.to_owned(),
        ttl,
        gaps_ms: gaps,
    })
}
