//! Channels from a process outside the group to its members, shared by the client API
//! (`RaftClient`) and the admin API (`RaftAdmin`): the endpoint checks, TLS, pings, and
//! the bearer token on every call.

use std::time::Duration;

use ha_core::{ClientTls, Error, Result};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

/// How often an idle connection to a node is pinged, and how long a ping may go
/// unanswered before the connection counts as dead (its streams then fail over).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub(crate) struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(***)"
        } else {
            "BearerToken(None)"
        })
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl BearerToken {
    /// The token to send to `endpoints`, refused without TLS unless every endpoint is
    /// on loopback: a token in cleartext to another host is readable by anyone on the
    /// path (and the nodes refuse tokens without TLS anyway).
    ///
    /// # Errors
    /// `InvalidArgument` naming `tls` or `token`.
    pub(crate) fn new(token: Option<&str>, tls: bool, endpoints: &[String]) -> Result<Self> {
        let Some(token) = token else {
            return Ok(Self(None));
        };
        if !tls && !endpoints.iter().all(|e| ha_core::is_loopback_endpoint(e)) {
            return Err(Error::InvalidArgument {
                what: "tls",
                reason: format!(
                    "refusing to send the bearer token without TLS to {endpoints:?}; configure TLS (--cacert) or use a loopback endpoint"
                ),
            });
        }
        let mut value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            Error::InvalidArgument {
                what: "token",
                reason: "a bearer token must be printable ASCII".into(),
            }
        })?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

/// A lazily connected channel to one member at `endpoint` (`host:port`).
///
/// # Errors
/// `InvalidArgument` for a malformed address or TLS settings.
pub(crate) fn channel(endpoint: &str, tls: Option<&ClientTls>) -> Result<Channel> {
    if endpoint.is_empty() || endpoint.contains('/') || !endpoint.contains(':') {
        return Err(Error::InvalidArgument {
            what: "url",
            reason: format!("{endpoint:?} is not host:port"),
        });
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut channel = Endpoint::from_shared(format!("{scheme}://{endpoint}"))
        .map_err(|e| Error::InvalidArgument {
            what: "url",
            reason: format!("{endpoint:?}: {e}"),
        })?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        // A watch or a waiting campaign is a stream that may carry nothing for hours;
        // over a connection that went silent (a dead host, a black-holing link) it
        // would wait forever. Pings find such a connection.
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        channel = channel
            .tls_config(crate::net::tls::client_config(tls))
            .map_err(|e| Error::InvalidArgument {
                what: "tls",
                reason: e.to_string(),
            })?;
    }
    Ok(channel.connect_lazy())
}
