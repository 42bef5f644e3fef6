//! Configuration of one embedded Raft member.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ha_core::KvLimits;

use crate::data::command::NodeId;
use crate::error::RaftBackendError;
use crate::net::network::FaultInjector;
use crate::net::tls::RaftTls;

/// The shortest session TTL the Raft backend accepts: a TTL must cover a Raft leader
/// failover (election timeout plus a round trip) with room to spare.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// How one member of a Raft group runs. Build with [`RaftNodeConfig::new`] and the
/// `with_*` methods.
#[derive(Clone)]
pub struct RaftNodeConfig {
    /// This node's id, unique in the group.
    pub id: NodeId,
    /// Where to listen for peers and clients.
    pub listen: SocketAddr,
    /// The address peers and clients use to reach this node (default: `listen`).
    pub advertise: Option<String>,
    /// The initial voters, id → address, this node included. A node started with its
    /// own id in here bootstraps the group with exactly these voters, once; a node not in
    /// here waits to be added as a learner.
    pub peers: BTreeMap<NodeId, String>,
    /// The sled database directory.
    pub data_dir: PathBuf,
    /// The group's identity; a data dir or a peer from another cluster is refused.
    pub cluster_id: String,
    /// How often the Raft leader tells followers it is alive (and what is committed).
    pub heartbeat_interval: Duration,
    /// How long one peer RPC may take: an AppendEntries, a vote, one round of
    /// leadership confirmation. `None`: a third of the shortest election timeout, so a
    /// slow link (longer RTT) is tuned by raising the election timeout alone. Kept
    /// apart from the heartbeat, which only sets how often the leader speaks.
    pub rpc_timeout: Option<Duration>,
    /// Raft election timeout range (each node draws once in it).
    pub election_timeout: (Duration, Duration),
    /// How long one client operation may wait for a leader or a peer.
    pub request_timeout: Duration,
    /// sled page cache size in bytes.
    pub cache_capacity: u64,
    /// Build a snapshot (and purge the log behind it) after this many entries.
    pub snapshot_every: u64,
    /// Size limits of the guarded store; writes beyond them are refused before they
    /// reach the log.
    pub kv_limits: KvLimits,
    /// TLS on the Raft port (peers and clients). Required to listen on anything but a
    /// loopback address, unless `insecure` is set.
    pub tls: Option<RaftTls>,
    /// A bearer token that admits clients to the client API (`authorization: Bearer
    /// <token>`), for clients without a certificate. Peers always need certificates.
    pub client_token: Option<String>,
    /// A bearer token that admits clients and may also change the membership (`ha
    /// member`). Without it, only node certificates may (needs TLS, like the client token).
    pub admin_token: Option<String>,
    /// Allows listening on a non-loopback address without TLS: anyone who reaches the
    /// port can then join the group's traffic and make itself ACTIVE. Logged as a warning.
    pub insecure: bool,
    /// Keep the Raft leader off the member whose in-process coordinator is an
    /// election's ACTIVE: a leader hosting one hands its leadership to a caught-up voter
    /// that hosts none, so one crash costs one TTL, not an election and a TTL. Moves only
    /// in a group of three voters; see docs/backends/raft.md ("Placement").
    pub placement: bool,
    /// The feature level this member serves (see docs/backends/raft.md, "Feature
    /// levels"): this binary's, [`FEATURE_LEVEL`](crate::FEATURE_LEVEL), unless a test
    /// of a mixed group starts it lower to stand for an older version.
    pub feature_level: u32,
    /// Test-only network faults shared by the nodes of a test group.
    pub faults: Option<Arc<FaultInjector>>,
}

impl std::fmt::Debug for RaftNodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNodeConfig")
            .field("id", &self.id)
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("peers", &self.peers)
            .field("data_dir", &self.data_dir)
            .field("cluster_id", &self.cluster_id)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("rpc_timeout", &self.effective_rpc_timeout())
            .field("election_timeout", &self.election_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("snapshot_every", &self.snapshot_every)
            .field("kv_limits", &self.kv_limits)
            .field("tls", &self.tls.is_some())
            .field("client_token", &self.client_token.as_ref().map(|_| "***"))
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .field("insecure", &self.insecure)
            .field("placement", &self.placement)
            .field("feature_level", &self.feature_level)
            .finish_non_exhaustive()
    }
}

/// The largest gRPC message each service of a node decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MessageLimits {
    /// Peer messages: a 4 MiB AppendEntries, or one entry carrying the largest
    /// compare-and-set (two values, base64, in JSON), or a snapshot chunk.
    pub(crate) peer: usize,
    /// Client requests: the largest guarded write or leader value, and room.
    pub(crate) client: usize,
}

impl RaftNodeConfig {
    /// The message limits for this configuration's value limits.
    pub(crate) fn message_limits(&self) -> MessageLimits {
        let value = self.kv_limits.max_value_bytes;
        let key = self.kv_limits.max_key_bytes;
        MessageLimits {
            peer: (16 << 20).max(value.saturating_mul(4).saturating_add(1 << 20)),
            client: (4 << 20).max(
                value
                    .saturating_mul(2)
                    .saturating_add(key)
                    .saturating_add(256 << 10),
            ),
        }
    }

    /// A node with default timings: heartbeat 50 ms, election timeout 250–500 ms, RPC
    /// timeout 83 ms (a third of the shortest election timeout),
    /// request timeout 5 s, 16 MiB sled cache, a snapshot every 1000 entries. A Raft
    /// leader change must fit well inside the session TTL (TTL ≥ 3× failover).
    pub fn new(
        id: NodeId,
        listen: SocketAddr,
        peers: BTreeMap<NodeId, String>,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            id,
            listen,
            advertise: None,
            peers,
            data_dir: data_dir.into(),
            cluster_id: "ha".to_owned(),
            heartbeat_interval: Duration::from_millis(50),
            rpc_timeout: None,
            election_timeout: (Duration::from_millis(250), Duration::from_millis(500)),
            request_timeout: Duration::from_secs(5),
            cache_capacity: 16 << 20,
            snapshot_every: 1000,
            kv_limits: KvLimits::default(),
            tls: None,
            client_token: None,
            admin_token: None,
            insecure: false,
            placement: false,
            feature_level: crate::data::level::FEATURE_LEVEL,
            faults: None,
        }
    }

    /// Serves feature level `level` instead of this binary's: for tests that stand a
    /// member of an older version in a group (1 ..= [`FEATURE_LEVEL`](crate::FEATURE_LEVEL)).
    #[doc(hidden)]
    pub fn with_feature_level(mut self, level: u32) -> Self {
        self.feature_level = level;
        self
    }

    /// Turns placement on or off (default off; `ha node` turns it on): see
    /// [`placement`](Self::placement).
    pub fn with_placement(mut self, placement: bool) -> Self {
        self.placement = placement;
        self
    }

    /// Sets the guarded store's size limits.
    pub fn with_kv_limits(mut self, kv_limits: KvLimits) -> Self {
        self.kv_limits = kv_limits;
        self
    }

    /// Sets the cluster id.
    pub fn with_cluster_id(mut self, cluster_id: impl Into<String>) -> Self {
        self.cluster_id = cluster_id.into();
        self
    }

    /// Sets the advertised address.
    pub fn with_advertise(mut self, advertise: impl Into<String>) -> Self {
        self.advertise = Some(advertise.into());
        self
    }

    /// Sets heartbeat and election timeout range.
    pub fn with_timing(mut self, heartbeat: Duration, election: (Duration, Duration)) -> Self {
        self.heartbeat_interval = heartbeat;
        self.election_timeout = election;
        self
    }

    /// Timings for links whose round trip takes `rtt` (a WAN, a cellular uplink): an RPC
    /// timeout of `2·rtt + 60 ms` (a round trip, a queued one, and a disk flush), an
    /// election timeout of at least three RPC timeouts (never below 250 ms) up to twice
    /// that, and a heartbeat a sixth of the shortest election timeout (at least 50 ms).
    /// `rtt = 0` gives about the defaults. docs/backends/raft.md says how to choose.
    pub fn with_timing_for_rtt(mut self, rtt: Duration) -> Self {
        let rpc = rtt * 2 + Duration::from_millis(60);
        let election_min = (rpc * 3).max(Duration::from_millis(250));
        self.election_timeout = (election_min, election_min * 2);
        self.heartbeat_interval = (election_min / 6).max(Duration::from_millis(50));
        self.rpc_timeout = Some(rpc);
        self
    }

    /// Sets how long one peer RPC (replication, a vote, a leadership confirmation) may
    /// take; by default a third of the shortest election timeout.
    pub fn with_rpc_timeout(mut self, rpc_timeout: Duration) -> Self {
        self.rpc_timeout = Some(rpc_timeout);
        self
    }

    /// How long one peer RPC may take: the one set, or a third of the shortest election
    /// timeout, and never less than the heartbeat interval.
    pub fn effective_rpc_timeout(&self) -> Duration {
        self.rpc_timeout
            .unwrap_or(self.election_timeout.0 / 3)
            .max(self.heartbeat_interval)
    }

    /// Sets the per-operation timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets how many entries pass between snapshots.
    pub fn with_snapshot_every(mut self, entries: u64) -> Self {
        self.snapshot_every = entries;
        self
    }

    /// Turns on TLS for peers and clients.
    pub fn with_tls(mut self, tls: RaftTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Admits clients that send this bearer token.
    pub fn with_client_token(mut self, token: impl Into<String>) -> Self {
        self.client_token = Some(token.into());
        self
    }

    /// Admits clients that send this bearer token and lets them change the membership.
    pub fn with_admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = Some(token.into());
        self
    }

    /// Allows a non-loopback listen address without TLS (see [`Self::insecure`]).
    pub fn with_insecure(mut self, insecure: bool) -> Self {
        self.insecure = insecure;
        self
    }

    /// Installs a test fault injector.
    pub fn with_faults(mut self, faults: Arc<FaultInjector>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// The address others reach this node at.
    pub fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    pub(crate) fn validate(&self) -> Result<(), RaftBackendError> {
        let bad = |reason: String| Err(RaftBackendError::Config(reason));
        if self.cluster_id.is_empty() || self.cluster_id.len() > 255 {
            return bad("cluster id must be 1..=255 bytes".into());
        }
        let (min, max) = self.election_timeout;
        if self.heartbeat_interval.is_zero() || min <= self.heartbeat_interval || max <= min {
            return bad(format!(
                "need 0 < heartbeat ({:?}) < election timeout min ({min:?}) < max ({max:?})",
                self.heartbeat_interval
            ));
        }
        let levels = crate::data::level::MIN_FEATURE_LEVEL..=crate::data::level::FEATURE_LEVEL;
        if !levels.contains(&self.feature_level) {
            return bad(format!(
                "feature level {} is not one this binary serves ({} to {})",
                self.feature_level,
                levels.start(),
                levels.end()
            ));
        }
        let rpc = self.effective_rpc_timeout();
        if rpc >= min {
            return bad(format!(
                "the RPC timeout ({rpc:?}) must be shorter than the election timeout min ({min:?})"
            ));
        }
        if !self.peers.is_empty() && !self.peers.contains_key(&self.id) {
            // Allowed: a node that joins later. But its peers map must not claim to
            // bootstrap a group it is not part of, which is what an id typo looks like.
            tracing::info!(
                node = self.id,
                "not among the initial voters; waiting to be added"
            );
        }
        if let Some(addr) = self.peers.get(&self.id) {
            if *addr != self.advertised() {
                return bad(format!(
                    "peers name node {} at {addr}, but it advertises {}",
                    self.id,
                    self.advertised()
                ));
            }
        }
        if self.snapshot_every == 0 {
            return bad("snapshot_every must be at least 1".into());
        }
        if self.tls.is_none() && !self.listen.ip().is_loopback() {
            if !self.insecure {
                return bad(format!(
                    "refusing to listen on {} without TLS: anyone who reaches the port could join the group and make itself ACTIVE; configure TLS (--cacert, --cert, --key naming node-<id>) or pass --insecure",
                    self.listen
                ));
            }
            tracing::warn!(
                node = self.id,
                listen = %self.listen,
                "listening without TLS on a non-loopback address (--insecure): anyone who reaches this port can join the group's traffic"
            );
        }
        if self.client_token.as_deref().is_some_and(str::is_empty)
            || self.admin_token.as_deref().is_some_and(str::is_empty)
        {
            return bad("a token must not be empty".into());
        }
        if (self.client_token.is_some() || self.admin_token.is_some()) && self.tls.is_none() {
            // Without TLS the peer service takes anyone's word for its node id, so a
            // token on the client API would only look like protection.
            return bad(
                "a client or admin token needs TLS (--cacert, --cert, --key): without it the port admits anyone anyway"
                    .into(),
            );
        }
        Ok(())
    }
}
