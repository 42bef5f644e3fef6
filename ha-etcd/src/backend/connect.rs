//! Connecting: checking the configuration, dialing, and telling a refused client
//! certificate from an unreachable server.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::ConnectOptions;
use ha_core::{Error, Result};

use crate::config::EtcdConfig;

use super::endpoints::Endpoints;
use super::EtcdBackend;

/// HTTP/2 pings on a connection with a stream open and nothing read for this long.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// etcd-client's options for `config`: timeouts, user, TLS.
pub(crate) fn connect_options(config: &EtcdConfig) -> ConnectOptions {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.connect_timeout)
        .with_timeout(config.request_timeout)
        // A member without a leader refuses requests at once and ends its streams, so
        // a member cut off from its peers is left like a dead one.
        .with_require_leader(true)
        // A backstop for a connection the probe does not cover. etcd (grpc-go) closes a
        // connection pinged more often than its --grpc-keepalive-min-time (5 s by
        // default) with GOAWAY "too_many_pings", or pinged at all without a stream, so
        // dead members are found by the probe (ha_core::endpoints), not by pings.
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(false);
    if let Some((user, password)) = &config.user {
        // etcd's auth tokens do not survive an etcd restart (simple tokens) or expire
        // (JWT): fetch a new one instead of failing every call after that.
        options = options
            .with_user(user.clone(), password.clone())
            .with_auto_token_refresh(true);
    }
    if let Some(tls) = &config.tls {
        let mut tls_options = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            tls_options = tls_options.identity(etcd_client::Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls_options);
    }
    options
}

impl EtcdBackend {
    /// Connects to etcd and checks it answers.
    ///
    /// # Errors
    /// `InvalidArgument` for no endpoints or a bad prefix, `Unavailable`/`Timeout` if etcd
    /// does not answer within the connect timeout.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(Error::InvalidArgument {
                what: "url",
                reason: "etcd needs at least one endpoint".into(),
            });
        }
        if config.prefix.is_empty() || config.prefix.ends_with('/') {
            return Err(Error::InvalidArgument {
                what: "argument",
                reason: format!(
                    "etcd prefix {:?} must be non-empty and not end with '/'",
                    config.prefix
                ),
            });
        }
        if config.user.is_some()
            && config.tls.is_none()
            && !config
                .endpoints
                .iter()
                .all(|e| ha_core::is_loopback_endpoint(e))
        {
            // A password in cleartext to another host is readable by anyone on the path.
            return Err(Error::InvalidArgument {
                what: "tls",
                reason: format!(
                    "refusing to send the etcd password without TLS to {:?}; configure TLS (--cacert) or use a loopback endpoint",
                    config.endpoints
                ),
            });
        }
        let options = connect_options(&config);
        let config = Arc::new(config);
        // etcd (Go) checks a client certificate after the TLS 1.3 handshake and then just
        // closes the connection; the client sees "connection closed", not an alert. With
        // TLS on, a connection closed (not refused) during connect means the certificate.
        let tls_refusal = |error: Error| match error {
            Error::Unavailable(reason)
                if config.tls.is_some() && closed_after_handshake(&reason) =>
            {
                let given = if config.tls.as_ref().is_some_and(|t| t.identity.is_some()) {
                    "the client certificate given (is it from etcd's client CA?)"
                } else {
                    "no client certificate (etcd runs with --client-cert-auth?)"
                };
                Error::Auth {
                    failure: ha_core::AuthFailure::ClientCertificate,
                    reason: format!(
                        "etcd closed the TLS connection during connect, with {given}: {reason}"
                    ),
                }
            }
            other => other,
        };
        // Every member is asked at once; the first to answer is used first.
        let endpoints = Endpoints::connect(Arc::clone(&config), options)
            .await
            .map_err(tls_refusal)?;
        Ok(Self {
            endpoints,
            config,
            keepers: Arc::default(),
            reuse_abandoned_streams: false,
            watches_opened: Arc::default(),
        })
    }
}

/// Whether a transport failure looks like a server that accepted the TCP connection and
/// then hung up (as etcd does on a refused client certificate), not one that could not
/// be reached at all.
fn closed_after_handshake(reason: &str) -> bool {
    let reason = reason.to_ascii_lowercase();
    let closed = ["canceled", "connection closed", "broken pipe"];
    // Not a refused certificate: unreachable, restarting, or not speaking TLS at all.
    let other = [
        "connection refused",
        "tcp connect",
        "timed out",
        "dns error",
        "no route",
        "reset",
        "corrupt",
        "invalidcontenttype",
        "invalid message",
    ];
    // tonic can report the hang-up with no source at all, a bare "transport error"; an
    // unreachable or non-TLS server comes with a cause ("tcp connect error", "corrupt
    // message").
    let bare = reason.trim() == "transport error";
    bare || closed.iter().any(|s| reason.contains(s)) && !other.iter().any(|s| reason.contains(s))
}

#[cfg(test)]
mod tests {
    use super::closed_after_handshake;

    #[test]
    fn a_hang_up_reads_as_closed_and_an_unreachable_server_does_not() {
        assert!(closed_after_handshake("transport error"));
        assert!(closed_after_handshake(
            "transport error: error trying to connect: connection closed via error"
        ));
        assert!(!closed_after_handshake(
            "transport error: tcp connect error: Connection refused (os error 111)"
        ));
        assert!(!closed_after_handshake(
            "transport error: received corrupt message of type InvalidContentType"
        ));
        assert!(!closed_after_handshake(
            "transport error: connection reset by peer"
        ));
    }
}
