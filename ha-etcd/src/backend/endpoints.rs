//! The members a backend talks to: one etcd client per endpoint, one endpoint in use at
//! a time (`ha_core::endpoints` says when to leave it), and the probe that finds a
//! silent one.
//!
//! etcd-client balances one channel over every endpoint, and a member that went silent
//! (no RST, no FIN) stays "ready" in it: a reopened stream could land on it again and
//! wait there for good. So each endpoint gets its own client and every call and stream
//! goes to the endpoint in use.

use std::sync::Arc;

use etcd_client::{Client, ConnectOptions, GetOptions};
use ha_core::endpoints::{At, EndpointSet};
use ha_core::{Error, Result};
use tokio::time::timeout;

use crate::config::EtcdConfig;
use crate::error::map;

/// The pause before a watch or a read is tried again on an endpoint that failed it.
pub(crate) const RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// The client of an endpoint, and the endpoint as it was when picked.
#[derive(Clone)]
pub(crate) struct Conn {
    /// Calls and streams for this endpoint.
    pub(crate) client: Client,
    at: At,
}

/// Every endpoint of a backend, with its client once connected.
pub(crate) struct Endpoints {
    set: Arc<EndpointSet>,
    clients: Vec<tokio::sync::Mutex<Option<Client>>>,
    options: ConnectOptions,
    config: Arc<EtcdConfig>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("in_use", &self.set.in_use())
            .finish_non_exhaustive()
    }
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
        let set = EndpointSet::new("etcd", config.endpoints.clone(), config.request_timeout);
        let endpoints = Arc::new(Self {
            set: Arc::new(set),
            clients: config
                .endpoints
                .iter()
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            options,
            config,
        });
        // Every member at once: a dead one must not hold up the others.
        let (answered, mut results) = tokio::sync::mpsc::channel(endpoints.clients.len());
        for slot in 0..endpoints.clients.len() {
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
                    endpoints.set.start_at(slot);
                    let probe = |endpoints: Arc<Self>, slot| endpoints.probe(slot);
                    endpoints
                        .set
                        .spawn_probe(Arc::downgrade(&endpoints), move |e, slot| {
                            Box::pin(probe(e, slot))
                        });
                    return Ok(endpoints);
                }
                Err(error) => {
                    endpoints.set.mark_failed(slot);
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
                self.set.endpoint(slot)
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

    /// A quorum read on endpoint `slot`: a member cut off from its peers cannot answer
    /// it, nor one that answers pings but lost its leader.
    async fn probe(self: Arc<Self>, slot: usize) -> Result<()> {
        let mut client = self.client_of(slot).await?;
        let key = format!("{}/health", self.config.prefix);
        match client
            .get(key, Some(GetOptions::new().with_count_only()))
            .await
            .map_err(map)
        {
            // A user without rights on the key still made the member reach its quorum.
            Ok(_) | Err(Error::Auth { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Endpoint `slot`'s client, connecting it the first time (with a user, that asks
    /// the member for a token, so it is bounded by the caller).
    async fn client_of(&self, slot: usize) -> Result<Client> {
        let mut client = self.clients[slot].lock().await;
        if let Some(client) = client.as_ref() {
            return Ok(client.clone());
        }
        let endpoint = self.set.endpoint(slot);
        let connected = Client::connect([endpoint], Some(self.options.clone()))
            .await
            .map_err(map)?;
        *client = Some(connected.clone());
        Ok(connected)
    }

    /// The endpoints, the one in use, and the timing derived from the TTLs.
    pub(crate) fn set(&self) -> &EndpointSet {
        &self.set
    }

    /// The client of the endpoint in use. A member that cannot be connected to (with a
    /// user: that gives no token in time) is left like any failed one.
    ///
    /// # Errors
    /// `Unavailable` when no endpoint could be connected to in one pass over all.
    pub(crate) async fn current(&self) -> Result<Conn> {
        let mut last = None;
        for _ in 0..self.clients.len() {
            let at = self.set.in_use();
            let error = match timeout(self.set.attempt_timeout(), self.client_of(at.slot)).await {
                Ok(Ok(client)) => return Ok(Conn { client, at }),
                Ok(Err(error)) if !ha_core::endpoints::is_endpoint_failure(&error) => {
                    return Err(error)
                }
                Ok(Err(error)) => error,
                Err(_) => Error::Unavailable(format!(
                    "cannot connect to {} within {:?}",
                    self.set.endpoint(at.slot),
                    self.set.attempt_timeout()
                )),
            };
            self.set.failed(at, &error);
            last = Some(error);
        }
        Err(last.unwrap_or_else(|| {
            Error::Unavailable(format!(
                "no etcd endpoint of {:?} could be connected to",
                self.config.endpoints
            ))
        }))
    }

    /// Whether `conn`'s endpoint has not failed since it was picked.
    pub(crate) fn is_live(&self, conn: &Conn) -> bool {
        self.set.is_live(conn.at)
    }

    /// Resolves once `conn`'s endpoint has failed: a stream on it is to be abandoned and
    /// opened again on the endpoint in use.
    pub(crate) async fn failed_since(&self, conn: &Conn) {
        self.set.failed_since(conn.at).await;
    }

    /// Reports `error` from `conn`'s endpoint; see [`EndpointSet::failed`].
    pub(crate) fn failed(&self, conn: &Conn, error: &Error) -> bool {
        self.set.failed(conn.at, error)
    }

    /// Reports `error` like [`failed`](Self::failed); whether calls now go to another
    /// endpoint, so a retry need not wait (with one endpoint, or a failure that is not
    /// the endpoint's, it must: a member restarting refuses at once, and a retry at
    /// once would spin).
    pub(crate) fn moved_after(&self, conn: &Conn, error: &Error) -> bool {
        self.set.failed(conn.at, error) && self.set.in_use().slot != conn.at.slot
    }

    /// After etcd cancelled a watch on `conn`: a watch opened with a token etcd no
    /// longer knows (expired, or dropped by a restart) is cancelled with no error, and
    /// etcd-client fetches a new token only after an error, so fetch one here; for any
    /// other reason, pause before the watch is opened again.
    pub(crate) async fn after_cancel(&self, conn: &Conn, reason: &str) {
        let auth = reason.contains("auth token") || reason.contains("Unauthenticated");
        if !(auth && conn.client.refresh_token().await.is_ok()) {
            tokio::time::sleep(RETRY).await;
        }
    }

    /// How long one attempt of a repeatable call may take.
    pub(crate) fn attempt_timeout(&self) -> std::time::Duration {
        self.set.attempt_timeout()
    }
}
