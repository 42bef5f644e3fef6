//! The etcds the etcd scenarios run on: a private single member and a private 3-member
//! cluster on loopback (the like-for-like reference for a 3-replica Raft group: three
//! fsyncs per write), or one external etcd given by `--etcd-endpoints`.

use std::time::Duration;

use anyhow::{bail, Result};
use ha_testkit::etcd::{find_binary, Etcd, EtcdCluster, StartError};

use crate::procfs;
use crate::report::{Report, BINARY, IDLE_SERVER};

/// The single private member's name in every table.
pub const SINGLE: &str = "etcd (1 member)";
/// The private 3-member cluster's name in every table.
pub const CLUSTER: &str = "etcd (3 members)";
/// An external etcd's name in every table.
pub const EXTERNAL: &str = "etcd (external)";

/// One etcd the scenarios run on.
pub struct Target {
    /// Its name in the tables and the JSON: [`SINGLE`], [`CLUSTER`] or [`EXTERNAL`].
    pub name: &'static str,
    /// Its client endpoints, `host:port`.
    pub endpoints: Vec<String>,
    /// Its server processes, whose CPU and memory are measured; none when external.
    pub pids: Vec<u32>,
}

impl Target {
    /// An `etcd://` URL of every endpoint, keys under `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://{}/{prefix}", self.endpoints.join(","))
    }

    /// The endpoints as etcdctl's `--endpoints` takes them.
    pub fn etcdctl_endpoints(&self) -> String {
        self.endpoints.join(",")
    }
}

/// The etcds of this run; the private ones stop (by PID) when this is dropped.
pub struct Servers {
    /// What the scenarios run on, the like-for-like reference last.
    pub targets: Vec<Target>,
    _single: Option<Etcd>,
    _cluster: Option<EtcdCluster>,
}

impl Servers {
    /// The target the Raft group is compared with: the 3-member cluster, or the
    /// external etcd.
    pub fn like_for_like(&self) -> Option<&'static str> {
        self.targets.last().map(|t| t.name)
    }

    /// The etcdctl references run on the single member (or the external etcd): etcd's
    /// own client at its best.
    pub fn reference(&self) -> Option<&Target> {
        self.targets.first()
    }
}

/// `external` endpoints if given; else a private single member and 3-member cluster,
/// with their footprint noted. `None` (said loudly) when etcd cannot run here, an
/// error under `CI`.
pub async fn start(report: &mut Report, external: &[String]) -> Result<Option<Servers>> {
    if find_binary("etcdctl").is_none() {
        if std::env::var_os("CI").is_none() {
            println!("SKIPPED: the etcd scenarios (etcdctl is not installed; scripts/test.sh installs it)");
            return Ok(None);
        }
        bail!("etcdctl is not installed (Debian package etcd-client); the references need it");
    }
    if !external.is_empty() {
        return Ok(Some(Servers {
            targets: vec![Target {
                name: EXTERNAL,
                endpoints: external.to_vec(),
                pids: Vec::new(),
            }],
            _single: None,
            _cluster: None,
        }));
    }
    let started = tokio::task::spawn_blocking(|| {
        Etcd::try_start(None).and_then(|one| Ok((one, EtcdCluster::try_start(3)?)))
    })
    .await?;
    let (single, cluster) = match started {
        Ok(both) => both,
        Err(StartError::NotInstalled) if std::env::var_os("CI").is_none() => {
            println!(
                "SKIPPED: the etcd scenarios (etcd is not installed; scripts/test.sh installs it)"
            );
            return Ok(None);
        }
        Err(error) => return Err(error.into()),
    };
    let cluster_pids: Vec<u32> = (0..cluster.size()).filter_map(|i| cluster.pid(i)).collect();
    // Let both settle (the cluster elects its leader) before anything is measured.
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.footprint_bytes(
        "idle etcd server RSS",
        SINGLE,
        procfs::rss_bytes(single.pid())?,
        Some(IDLE_SERVER),
    );
    let cluster_rss = cluster_pids
        .iter()
        .map(|p| procfs::rss_bytes(*p))
        .collect::<Result<Vec<_>>>()?;
    report.footprint_bytes(
        "idle etcd server RSS (max of 3)",
        CLUSTER,
        cluster_rss.iter().copied().max().unwrap_or(0),
        Some(IDLE_SERVER),
    );
    let size = std::fs::metadata(single.binary())
        .map(|m| m.len())
        .unwrap_or(0);
    report.footprint_bytes(
        &format!("etcd binary ({})", single.binary().display()),
        CLUSTER,
        size,
        Some(BINARY),
    );
    Ok(Some(Servers {
        targets: vec![
            Target {
                name: SINGLE,
                endpoints: vec![single.endpoint().to_owned()],
                pids: vec![single.pid()],
            },
            Target {
                name: CLUSTER,
                endpoints: cluster.endpoints(),
                pids: cluster_pids,
            },
        ],
        _single: Some(single),
        _cluster: Some(cluster),
    }))
}
