//! The members a backend talks to: one etcd client per endpoint, one endpoint in use at
//! a time, left on the first sign that it is dead, and a probe that finds a silent one.
//!
//! etcd-client balances one channel over every endpoint, and a member that went silent
//! (no RST, no FIN) stays "ready" in it: a reopened stream could land on it again and
//! wait there for ever. So each endpoint gets its own client, every call and stream goes
//! to the endpoint in use, and a failure there moves every later call, and every stream
//! opened before the move, to the member that failed least recently.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use ha_core::{Error, Result};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tracing::{debug, warn};

use crate::config::EtcdConfig;
use crate::error::map;

/// The probe's cadence and its patience when no lease was granted through the backend
/// (a watcher only): a dead member is found within their sum.
const IDLE_PROBE_EVERY: Duration = Duration::from_secs(1);
const IDLE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bounds of the TTL-derived probe. A timeout below this misreads a busy but healthy
/// member (a read waits for a heartbeat round) as a dead one.
const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
const MIN_PROBE_EVERY: Duration = Duration::from_millis(100);

/// One endpoint: its client once connected, and when it last failed.
struct Slot {
    endpoint: String,
    client: tokio::sync::Mutex<Option<Client>>,
    failed_at: Mutex<Option<Instant>>,
}

/// The endpoint in use, and how many times the backend moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InUse {
    slot: usize,
    /// Bumped on every move; a stream opened under an older generation is abandoned.
    generation: u64,
}

/// The client of the endpoint in use when it was picked.
#[derive(Clone)]
pub(crate) struct Conn {
    /// Calls and streams for this endpoint.
    pub(crate) client: Client,
    at: InUse,
}

impl Conn {
    /// The endpoint this connection talks to, by index.
    pub(crate) fn slot(&self) -> usize {
        self.at.slot
    }
}

/// Every endpoint of a backend, the one in use, and the probe's settings.
pub(crate) struct Endpoints {
    slots: Vec<Slot>,
    options: ConnectOptions,
    config: Arc<EtcdConfig>,
    in_use: watch::Sender<InUse>,
    /// The shortest TTL granted through this backend, in ms (0: none yet).
    shortest_ttl_ms: AtomicU64,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("in_use", &*self.in_use.borrow())
            .finish_non_exhaustive()
    }
}

/// Whether an error says the endpoint (not the request) failed: nothing came back, or
/// the member cannot serve (no leader, cut off from its peers).
pub(crate) fn is_endpoint_failure(error: &Error) -> bool {
    matches!(error, Error::Unavailable(_) | Error::Timeout { .. })
}

impl Endpoints {
    /// Clients for every endpoint of `config`, connected concurrently; the first to
    /// answer a status request is the one in use. Starts the probe.
    ///
    /// # Errors
    /// What the first endpoint said when none answered within the connect timeout.
    pub(crate) async fn connect(
        config: Arc<EtcdConfig>,
        options: ConnectOptions,
    ) -> Result<Arc<Self>> {
        let slots: Vec<Slot> = config
            .endpoints
            .iter()
            .map(|endpoint| Slot {
                endpoint: endpoint.clone(),
                client: tokio::sync::Mutex::new(None),
                failed_at: Mutex::new(None),
            })
            .collect();
        let endpoints = Arc::new(Self {
            slots,
            options,
            in_use: watch::channel(InUse {
                slot: 0,
                generation: 0,
            })
            .0,
            config,
            shortest_ttl_ms: AtomicU64::new(0),
        });
        // Every member at once: a dead one must not hold up the others.
        let (answered, mut results) = tokio::sync::mpsc::channel(endpoints.slots.len());
        for slot in 0..endpoints.slots.len() {
            let (endpoints, answered) = (Arc::clone(&endpoints), answered.clone());
            tokio::spawn(async move {
                let result = endpoints.first_answer(slot).await;
                let _ = answered.send((slot, result)).await;
            });
        }
        drop(answered);
        let mut first_error: Option<(usize, Error)> = None;
        while let Some((slot, result)) = results.recv().await {
            match result {
                Ok(()) => {
                    endpoints.in_use.send_replace(InUse {
                        slot,
                        generation: 0,
                    });
                    tokio::spawn(probe(Arc::downgrade(&endpoints)));
                    return Ok(endpoints);
                }
                Err(error) => {
                    endpoints.mark_failed(slot);
                    if first_error.as_ref().is_none_or(|(first, _)| slot < *first) {
                        first_error = Some((slot, error));
                    }
                }
            }
        }
        Err(first_error.map_or_else(
            || Error::Unavailable("etcd has no endpoints".into()),
            |(_, error)| error,
        ))
    }

    /// Connects endpoint `slot` and asks it for its status, within the connect timeout.
    async fn first_answer(&self, slot: usize) -> Result<()> {
        let within = self.config.connect_timeout;
        let unanswered = || {
            Error::Unavailable(format!(
                "etcd at {} did not answer within {within:?}",
                self.slots[slot].endpoint
            ))
        };
        let mut client = timeout(within, self.client_of(slot))
            .await
            .map_err(|_| unanswered())??;
        match timeout(within, client.status()).await {
            Ok(status) => status.map(drop).map_err(map),
            Err(_) => Err(unanswered()),
        }
    }

    /// Endpoint `slot`'s client, connecting it the first time (with a user, that asks
    /// the member for a token, so it is bounded by the caller).
    async fn client_of(&self, slot: usize) -> Result<Client> {
        let mut client = self.slots[slot].client.lock().await;
        if let Some(client) = client.as_ref() {
            return Ok(client.clone());
        }
        let endpoint = &self.slots[slot].endpoint;
        let connected = Client::connect([endpoint.as_str()], Some(self.options.clone()))
            .await
            .map_err(map)?;
        *client = Some(connected.clone());
        Ok(connected)
    }

    /// The endpoint's address, for logs and metric labels.
    pub(crate) fn endpoint(&self, slot: usize) -> &str {
        &self.slots[slot].endpoint
    }

    /// The client of the endpoint in use. A member that cannot be connected to (with a
    /// user: that gives no token in time) is left like any failed one.
    ///
    /// # Errors
    /// `Unavailable` when no endpoint could be connected to in one pass over all.
    pub(crate) async fn current(&self) -> Result<Conn> {
        let mut last = None;
        for _ in 0..self.slots.len() {
            let at = *self.in_use.borrow();
            match timeout(self.attempt_timeout(), self.client_of(at.slot)).await {
                Ok(Ok(client)) => return Ok(Conn { client, at }),
                Ok(Err(error)) if !is_endpoint_failure(&error) => return Err(error),
                Ok(Err(error)) => last = Some(error),
                Err(_) => {}
            }
            self.leave(at, "cannot connect");
        }
        Err(last.unwrap_or_else(|| {
            Error::Unavailable(format!(
                "no etcd endpoint of {:?} could be connected to",
                self.config.endpoints
            ))
        }))
    }

    /// Whether `conn`'s endpoint is still the one in use (nothing moved since).
    pub(crate) fn is_current(&self, conn: &Conn) -> bool {
        *self.in_use.borrow() == conn.at
    }

    /// Resolves once the backend has moved off `conn`'s endpoint: a stream on it is to
    /// be abandoned and opened again on the endpoint now in use.
    pub(crate) async fn moved(&self, conn: &Conn) {
        let mut in_use = self.in_use.subscribe();
        // The sender lives as long as `self`, so this only ends on a move.
        let _ = in_use.wait_for(|now| *now != conn.at).await;
    }

    /// Reports that `conn`'s endpoint failed with `error`: if it is still the one in
    /// use, every later call and every stream moves to another. Returns whether the
    /// error was an endpoint failure.
    pub(crate) fn failed(&self, conn: &Conn, error: &Error) -> bool {
        if !is_endpoint_failure(error) {
            return false;
        }
        self.leave(conn.at, &error.to_string());
        true
    }

    fn mark_failed(&self, slot: usize) {
        *self.slots[slot]
            .failed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        metrics::counter!(
            "ha_backend_endpoint_failures_total",
            "backend" => "etcd",
            "endpoint" => self.slots[slot].endpoint.clone()
        )
        .increment(1);
    }

    /// Leaves the endpoint in use at `at`, if it still is, for the one that failed
    /// least recently (never a failed one while another has not failed).
    fn leave(&self, at: InUse, why: &str) {
        let mut moved_to = None;
        self.in_use.send_if_modified(|now| {
            if *now != at {
                return false; // someone else moved already
            }
            self.mark_failed(at.slot);
            let n = self.slots.len();
            // Never back to the one that just failed: with one endpoint, stay there
            // (a new stream on a fresh generation still reconnects).
            let next = (1..n)
                .map(|step| (at.slot + step) % n)
                .min_by_key(|&slot| {
                    *self.slots[slot]
                        .failed_at
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                })
                .unwrap_or(at.slot);
            *now = InUse {
                slot: next,
                generation: at.generation + 1,
            };
            moved_to = Some(next);
            true
        });
        if let Some(next) = moved_to {
            warn!(
                backend = "etcd",
                from = self.endpoint(at.slot),
                to = self.endpoint(next),
                reason = why,
                "etcd endpoint failed, moving to another"
            );
            metrics::counter!(
                "ha_backend_reconnects_total",
                "backend" => "etcd",
                "endpoint" => self.endpoint(next).to_owned()
            )
            .increment(1);
        }
    }

    /// Notes a TTL granted through this backend: the probe and the attempt timeouts are
    /// sized from the shortest.
    pub(crate) fn note_ttl(&self, ttl: Duration) {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .shortest_ttl_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                (now == 0 || ms < now).then_some(ms)
            });
    }

    fn shortest_ttl(&self) -> Option<Duration> {
        match self.shortest_ttl_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// How long one attempt of a call that may go to another endpoint may take: TTL/6
    /// (at least 500 ms, at most the request timeout), so that an attempt and its retry
    /// fit in the session's TTL/3.
    pub(crate) fn attempt_timeout(&self) -> Duration {
        let cap = self.config.request_timeout;
        match self.shortest_ttl() {
            Some(ttl) => (ttl / 6).clamp(MIN_ATTEMPT_TIMEOUT.min(cap), cap),
            None => IDLE_PROBE_TIMEOUT.min(cap),
        }
    }

    /// How often the probe asks the endpoint in use: TTL/12, so a dead member is found
    /// within TTL/12 + TTL/6 = TTL/4 (at most 1 s + the attempt timeout).
    pub(crate) fn probe_every(&self) -> Duration {
        match self.shortest_ttl() {
            Some(ttl) => (ttl / 12).clamp(MIN_PROBE_EVERY, IDLE_PROBE_EVERY),
            None => IDLE_PROBE_EVERY,
        }
    }

    /// The longest a dead endpoint in use goes unnoticed: one probe interval plus one
    /// probe.
    pub(crate) fn detection_bound(&self) -> Duration {
        self.probe_every() + self.attempt_timeout()
    }
}

/// Asks the endpoint in use for a linearizable read every [`Endpoints::probe_every`];
/// one that does not answer in time, or has no leader, is left. Ends with the backend.
async fn probe(endpoints: Weak<Endpoints>) {
    loop {
        let Some(every) = endpoints.upgrade().map(|e| e.probe_every()) else {
            return;
        };
        tokio::time::sleep(every).await;
        let Some(endpoints) = endpoints.upgrade() else {
            return;
        };
        let Ok(conn) = endpoints.current().await else {
            continue;
        };
        let key = format!("{}/health", endpoints.config.prefix);
        let within = endpoints.attempt_timeout();
        let mut client = conn.client.clone();
        // A quorum read: a member cut off from its peers cannot answer it, one that
        // answers pings but lost its leader neither.
        let read = client.get(key, Some(GetOptions::new().with_count_only()));
        let outcome = match timeout(within, read).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(map(error)),
            Err(_) => Err(Error::Timeout {
                operation: "health probe",
                after: within,
            }),
        };
        match outcome {
            // A user without rights on the key still made the member reach its quorum.
            Ok(()) | Err(Error::Auth { .. }) => {}
            Err(error) => {
                debug!(backend = "etcd", endpoint = endpoints.endpoint(conn.slot()), error = %error, "health probe failed");
                endpoints.failed(&conn, &error);
            }
        }
    }
}
