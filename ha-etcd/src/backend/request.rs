//! Unary requests on the endpoint in use: each attempt bounded, an endpoint that fails
//! left, and a request that is safe to repeat repeated once on the next endpoint.

use std::future::Future;

use etcd_client::Client;
use ha_core::{Error, Result};
use tokio::time::{timeout, Instant};

use super::EtcdBackend;

impl EtcdBackend {
    /// A request that may be sent twice (a read, or a write whose repeat changes
    /// nothing): an attempt within [`attempt_timeout`](super::endpoints::Endpoints::attempt_timeout)
    /// on the endpoint in use and, if that endpoint failed, one more on the next, so a
    /// dead member costs one attempt, never the whole call.
    pub(super) async fn request<T, F, Fut>(&self, operation: &'static str, mut send: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let conn = self.endpoints.current().await?;
            let within = self.endpoints.attempt_timeout();
            let started = Instant::now();
            let result = match timeout(within, send(conn.client.clone())).await {
                Ok(result) => {
                    self.endpoints.set().observe(started.elapsed());
                    result
                }
                Err(_) => Err(Error::Timeout {
                    operation,
                    after: within,
                }),
            };
            match result {
                Err(error) if self.endpoints.failed(&conn, &error) && attempts < 2 => {}
                other => return other,
            }
        }
    }

    /// A request that must not be repeated (its first attempt may have been applied):
    /// one attempt within the request timeout. An endpoint failure still moves every
    /// later call to another endpoint.
    pub(super) async fn request_once<T, Fut>(
        &self,
        operation: &'static str,
        send: impl FnOnce(Client) -> Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = Result<T>>,
    {
        let conn = self.endpoints.current().await?;
        let within = self.config.request_timeout;
        let result = match timeout(within, send(conn.client.clone())).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                operation,
                after: within,
            }),
        };
        if let Err(error) = &result {
            self.endpoints.failed(&conn, error);
        }
        result
    }
}
