//! Node-to-node transport: a pool of gRPC channels, a fault layer for tests, and
//! openraft's `RaftNetwork` on top of them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::data::command::{NodeId, TypeConfig};
use crate::net::tls::RaftTls;
use crate::proto::peer_client::PeerClient;
use crate::proto::PeerRequest;

/// How long connecting to a peer may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The most bytes one AppendEntries carries, encoded. A larger batch is refused with
/// openraft's `PayloadTooLarge` before it is sent, and openraft splits it; one entry
/// alone always goes (the size limits keep it far below the peer message limit).
pub(crate) const MAX_APPEND_BYTES: usize = 4 << 20;

/// How many entries to send instead, when `entries` entries encode to `encoded` bytes
/// and that is over `budget`: `None` when the batch fits or is a single entry.
fn entries_hint(encoded: usize, entries: usize, budget: usize) -> Option<u64> {
    if encoded <= budget || entries <= 1 {
        return None;
    }
    // Scaled by the average entry size, and always fewer than now so it converges.
    let fit = (entries as u128 * budget as u128 / encoded as u128) as usize;
    Some(fit.clamp(1, entries - 1) as u64)
}

/// Test-only network faults between nodes of one process: partitions, delay, drops.
/// Off (all traffic passes) unless a test changes it. Share one injector between the
/// nodes of a test group; every peer RPC consults it at the sender.
#[derive(Debug, Default)]
pub struct FaultInjector {
    state: Mutex<FaultState>,
}

#[derive(Debug, Default)]
struct FaultState {
    blocked: HashSet<(NodeId, NodeId)>,
    delay: Duration,
    /// Drop one RPC in `drop_one_in` (0 = none), counted per injector.
    drop_one_in: u32,
    counter: u32,
}

/// Why the fault layer refused an RPC.
#[derive(Debug, thiserror::Error)]
#[error("fault injected: {0}")]
pub struct InjectedFault(&'static str);

impl FaultInjector {
    /// A new injector that lets everything through.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn with<T>(&self, f: impl FnOnce(&mut FaultState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Cuts all traffic, both ways, between every node in `a` and every node in `b`.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        self.with(|s| {
            for x in a {
                for y in b {
                    s.blocked.insert((*x, *y));
                    s.blocked.insert((*y, *x));
                }
            }
        });
    }

    /// Removes every partition, delay and drop.
    pub fn heal(&self) {
        self.with(|s| *s = FaultState::default());
    }

    /// Delays every RPC by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.with(|s| s.delay = delay);
    }

    /// Drops one RPC in every `n` (0 = none).
    pub fn drop_one_in(&self, n: u32) {
        self.with(|s| s.drop_one_in = n);
    }

    /// Applies the faults to one RPC from `from` to `to`: waits out the delay, or fails.
    pub async fn check(&self, from: NodeId, to: NodeId) -> Result<(), InjectedFault> {
        let (blocked, delay, dropped) = self.with(|s| {
            s.counter = s.counter.wrapping_add(1);
            let dropped = s.drop_one_in > 0 && s.counter % s.drop_one_in == 0;
            (s.blocked.contains(&(from, to)), s.delay, dropped)
        });
        if blocked {
            return Err(InjectedFault("partitioned"));
        }
        if dropped {
            return Err(InjectedFault("dropped"));
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }
}

/// Why a peer RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The RPC did not reach the peer (refused, partitioned, dropped before sending).
    #[error("peer {peer} unreachable: {reason}")]
    Unreachable {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The RPC may or may not have reached the peer.
    #[error("peer {peer}: {reason}")]
    Failed {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The peer refused the RPC (wrong cluster, bad payload).
    #[error("peer {peer} refused: {reason}")]
    Refused {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The peer does not know the RPC: it runs an older version.
    #[error("peer {peer} does not know this request (an older version): {reason}")]
    Unimplemented {
        /// The peer.
        peer: String,
        /// What it said.
        reason: String,
    },
}

/// The peer RPCs, by name.
#[derive(Debug, Clone, Copy)]
pub enum PeerRpc {
    /// openraft vote.
    Vote,
    /// openraft append entries.
    AppendEntries,
    /// openraft install snapshot.
    InstallSnapshot,
    /// A forwarded command.
    Propose,
    /// A forwarded batch of keepalives.
    KeepAliveBatch,
    /// A read index request.
    ReadIndex,
    /// The stopping leader asks a caught-up voter to call an election.
    Elect,
    /// The leader asks a member which feature level it serves.
    FeatureLevel,
}

/// Lazily connected channels to peers, shared by the Raft network and forwarding.
#[derive(Debug)]
pub struct PeerPool {
    me: NodeId,
    cluster_id: String,
    tls: Option<RaftTls>,
    channels: Mutex<HashMap<(NodeId, String), Channel>>,
    /// When each peer last answered an RPC, for the membership checks and `ha status`.
    contacts: Mutex<HashMap<NodeId, Instant>>,
    faults: Option<Arc<FaultInjector>>,
}

impl PeerPool {
    /// A pool for node `me` of cluster `cluster_id`; with `tls`, every peer must present
    /// a certificate naming the node it is dialled as.
    pub fn new(
        me: NodeId,
        cluster_id: String,
        tls: Option<RaftTls>,
        faults: Option<Arc<FaultInjector>>,
    ) -> Self {
        Self {
            me,
            cluster_id,
            tls,
            channels: Mutex::new(HashMap::new()),
            contacts: Mutex::new(HashMap::new()),
            faults,
        }
    }

    /// When peer `id` last answered an RPC from this node.
    pub fn last_contact(&self, id: NodeId) -> Option<Instant> {
        self.contacts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .copied()
    }

    fn channel(&self, to: NodeId, addr: &str) -> Result<Channel, PeerError> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = (to, addr.to_owned());
        if let Some(channel) = channels.get(&slot) {
            return Ok(channel.clone());
        }
        let refused = |reason: String| PeerError::Refused {
            peer: addr.to_owned(),
            reason,
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| refused(format!("bad address: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.peer_client_config(to))
                .map_err(|e| refused(format!("TLS configuration: {e}")))?;
        }
        let channel = endpoint.connect_lazy();
        channels.insert(slot, channel.clone());
        Ok(channel)
    }

    /// Sends one peer RPC with a JSON payload and decodes the JSON reply.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        to: NodeId,
        addr: &str,
        rpc: PeerRpc,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let payload = encode(addr, request)?;
        self.call_encoded(to, addr, rpc, payload, timeout).await
    }

    /// [`PeerPool::call`] with the payload already encoded.
    pub async fn call_encoded<Resp: DeserializeOwned>(
        &self,
        to: NodeId,
        addr: &str,
        rpc: PeerRpc,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let unreachable = |reason: String| PeerError::Unreachable {
            peer: addr.to_owned(),
            reason,
        };
        if let Some(faults) = &self.faults {
            faults
                .check(self.me, to)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        }
        let message = PeerRequest {
            cluster_id: self.cluster_id.clone(),
            from: self.me,
            payload,
        };
        let mut client = PeerClient::new(self.channel(to, addr)?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        let call = async {
            match rpc {
                PeerRpc::Vote => client.vote(request).await,
                PeerRpc::AppendEntries => client.append_entries(request).await,
                PeerRpc::InstallSnapshot => client.install_snapshot(request).await,
                PeerRpc::Propose => client.propose(request).await,
                PeerRpc::KeepAliveBatch => client.keep_alive_batch(request).await,
                PeerRpc::ReadIndex => client.read_index(request).await,
                PeerRpc::Elect => client.elect(request).await,
                PeerRpc::FeatureLevel => client.feature_level(request).await,
            }
        };
        let reply = match tokio::time::timeout(timeout, call).await {
            Err(_) => {
                return Err(PeerError::Failed {
                    peer: addr.to_owned(),
                    reason: format!("timed out after {timeout:?}"),
                })
            }
            Ok(Err(status)) => {
                return Err(match status.code() {
                    tonic::Code::Unavailable => unreachable(status.message().to_owned()),
                    tonic::Code::Unimplemented => PeerError::Unimplemented {
                        peer: addr.to_owned(),
                        reason: status.message().to_owned(),
                    },
                    tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::InvalidArgument => PeerError::Refused {
                        peer: addr.to_owned(),
                        reason: status.message().to_owned(),
                    },
                    _ => PeerError::Failed {
                        peer: addr.to_owned(),
                        reason: status.to_string(),
                    },
                })
            }
            Ok(Ok(reply)) => reply.into_inner(),
        };
        self.contacts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(to, Instant::now());
        serde_json::from_slice(&reply.payload).map_err(|e| PeerError::Refused {
            peer: addr.to_owned(),
            reason: format!("undecodable reply: {e}"),
        })
    }
}

fn encode<Req: Serialize>(addr: &str, request: &Req) -> Result<Vec<u8>, PeerError> {
    serde_json::to_vec(request).map_err(|e| PeerError::Refused {
        peer: addr.to_owned(),
        reason: format!("encode: {e}"),
    })
}

/// openraft's network factory over the pool.
#[derive(Debug, Clone)]
pub struct Network {
    pool: Arc<PeerPool>,
}

impl Network {
    /// A network over `pool`.
    pub fn new(pool: Arc<PeerPool>) -> Self {
        Self { pool }
    }
}

/// One peer, as openraft talks to it.
#[derive(Debug)]
pub struct Connection {
    pool: Arc<PeerPool>,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        Connection {
            pool: Arc::clone(&self.pool),
            target,
            addr: node.addr.clone(),
        }
    }
}

impl Connection {
    async fn raft_call<Req, Resp, E>(
        &self,
        rpc: PeerRpc,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload =
            encode(&self.addr, request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.raft_call_encoded(rpc, payload, option).await
    }

    async fn raft_call_encoded<Resp, E>(
        &self,
        rpc: PeerRpc,
        payload: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let reply: Result<Resp, RaftError<NodeId, E>> = self
            .pool
            .call_encoded(self.target, &self.addr, rpc, payload, option.hard_ttl())
            .await
            .map_err(|e| match e {
                PeerError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                _ => RPCError::Network(NetworkError::new(&e)),
            })?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let payload =
            encode(&self.addr, &rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if let Some(hint) = entries_hint(payload.len(), rpc.entries.len(), MAX_APPEND_BYTES) {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint),
            ));
        }
        self.raft_call_encoded(PeerRpc::AppendEntries, payload, &option)
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.raft_call(PeerRpc::InstallSnapshot, &rpc, &option)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.raft_call(PeerRpc::Vote, &rpc, &option).await
    }

    /// After an unreachable peer: 20 ms, doubling to 50 ms. openraft's default waits
    /// 500 ms from the first failure, so a follower that restarts in milliseconds heard
    /// from its leader only half a second later; the cap is how late a restarted
    /// follower can hear from it. A retry is one connect attempt.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(retry_intervals())
    }
}

/// The waits between replication retries to an unreachable peer.
fn retry_intervals() -> impl Iterator<Item = Duration> + Send + 'static {
    std::iter::successors(Some(Duration::from_millis(20)), |last| {
        Some((*last * 2).min(Duration::from_millis(50)))
    })
}

#[cfg(test)]
mod tests {
    use super::entries_hint;

    #[test]
    fn retries_start_at_20_ms_and_double_up_to_50_ms() {
        let waits: Vec<u64> = super::retry_intervals()
            .take(6)
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(waits, [20, 40, 50, 50, 50, 50]);
    }

    #[test]
    fn a_batch_over_the_budget_is_cut_by_its_average_entry_size_and_one_entry_always_goes() {
        assert_eq!(entries_hint(100, 10, 100), None);
        assert_eq!(entries_hint(1000, 1, 100), None);
        assert_eq!(entries_hint(1000, 10, 100), Some(1));
        assert_eq!(entries_hint(400, 100, 100), Some(25));
        // Just over the budget: still fewer than now, so the retry converges.
        assert_eq!(entries_hint(101, 10, 100), Some(9));
    }
}
