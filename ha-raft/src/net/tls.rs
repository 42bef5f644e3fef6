//! TLS and authentication on the Raft port, which carries both the peer protocol and
//! the client API.
//!
//! - Every node presents a certificate from the cluster CA whose DNS names include
//!   `node-<id>` ([`node_name`]); peers dial each other expecting that name, and a node
//!   accepts a peer message that says it is from node `n` only over a connection whose
//!   client certificate names `node-n`.
//! - Clients present any certificate from the cluster CA, or a bearer token configured
//!   on the nodes ([`RaftNodeConfig::client_token`](crate::RaftNodeConfig)).

use std::path::Path;
use std::sync::Arc;

use ha_core::{ClientTls, Error};
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::data::command::NodeId;
use crate::error::RaftBackendError;

/// The DNS name a node's certificate must carry: `node-<id>`.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}")
}

/// A node's TLS material, PEM: the cluster CA, its certificate (naming `node-<id>` and
/// the host names or addresses it is reached at) and its private key.
#[derive(Clone)]
pub struct RaftTls {
    /// The cluster CA certificate(s).
    pub ca_pem: Vec<u8>,
    /// This node's certificate chain.
    pub cert_pem: Vec<u8>,
    /// This node's private key.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for RaftTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaftTls { .. }")
    }
}

/// Reads a PEM file, naming it in the error.
pub(crate) fn read_pem(what: &str, path: &Path) -> Result<Vec<u8>, RaftBackendError> {
    ha_core::read_pem(what, path).map_err(|e| match e {
        Error::InvalidArgument { reason, .. } => RaftBackendError::Config(reason),
        other => RaftBackendError::Config(other.to_string()),
    })
}

impl RaftTls {
    /// Reads the CA, certificate and key from PEM files.
    ///
    /// # Errors
    /// `Config` naming the file that is missing or not PEM.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, RaftBackendError> {
        Ok(Self {
            ca_pem: read_pem("CA certificate", ca)?,
            cert_pem: read_pem("certificate", cert)?,
            key_pem: read_pem("private key", key)?,
        })
    }

    /// The server side: this node's identity; client certificates from the cluster CA
    /// are verified when presented, and optional (clients may use a token instead; peer
    /// messages are refused without one).
    pub(crate) fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(true)
    }

    /// The client side towards peer `to`: its certificate must name `node-<to>`.
    pub(crate) fn peer_client_config(&self, to: NodeId) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(node_name(to))
    }
}

/// Whether a verified client certificate chain names node `id`.
pub(crate) fn names_node(certs: &[CertificateDer<'static>], id: NodeId) -> bool {
    let Some(leaf) = certs.first() else {
        return false;
    };
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(node_name(id)) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// Who may use the client API of a node, and who may change its group's membership.
#[derive(Clone)]
pub(crate) struct ClientAuth {
    /// TLS is on: a client certificate verified against the cluster CA admits.
    pub(crate) tls: bool,
    /// A bearer token that admits.
    pub(crate) token: Option<Arc<str>>,
    /// A bearer token that admits and may also change the membership.
    pub(crate) admin_token: Option<Arc<str>>,
}

/// Compares without an early exit, so the time taken does not tell how much matched.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

fn matches(given: &str, token: Option<&Arc<str>>) -> bool {
    token.is_some_and(|token| same_secret(given.as_bytes(), token.as_bytes()))
}

impl ClientAuth {
    /// The interceptor of the client and admin APIs.
    pub(crate) fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.tls && request.peer_certs().is_some_and(|certs| !certs.is_empty()) {
            return Ok(request);
        }
        if self.token.is_some() || self.admin_token.is_some() {
            return match bearer(request.metadata()) {
                Some(given)
                    if matches(given, self.token.as_ref())
                        || matches(given, self.admin_token.as_ref()) =>
                {
                    Ok(request)
                }
                Some(_) => Err(Status::unauthenticated("wrong bearer token")),
                None => Err(Status::unauthenticated(
                    "this node requires a client certificate from the cluster CA or a bearer token",
                )),
            };
        }
        if self.tls {
            return Err(Status::unauthenticated(
                "this node requires a client certificate from the cluster CA",
            ));
        }
        Ok(request)
    }

    /// Whether a request may change the membership: without TLS anyone may (the port
    /// admits anyone anyway, and listens on loopback only unless `insecure`); with it, a
    /// certificate naming `node-<id>` of a member or of the node the change is about, or
    /// the admin token.
    pub(crate) fn may_change_membership<T>(
        &self,
        request: &Request<T>,
        nodes: impl IntoIterator<Item = NodeId>,
    ) -> Result<(), Status> {
        if !self.tls {
            return Ok(());
        }
        if bearer(request.metadata()).is_some_and(|given| matches(given, self.admin_token.as_ref()))
        {
            return Ok(());
        }
        if let Some(certs) = request.peer_certs() {
            if nodes.into_iter().any(|id| names_node(&certs, id)) {
                return Ok(());
            }
        }
        Err(Status::permission_denied(
            "membership changes need a node certificate (naming node-<id> of a member, or of the node being added) or the admin token",
        ))
    }
}

/// tonic's client TLS settings for the shared material.
pub(crate) fn client_config(tls: &ClientTls) -> ClientTlsConfig {
    let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
    match &tls.identity {
        Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
        None => config,
    }
}

/// Recognizes an authentication failure in an error's text and its sources.
pub(crate) fn auth_error(error: &(dyn std::error::Error + 'static)) -> Option<Error> {
    let text = ha_core::error_chain(error);
    ha_core::auth_failure_in(&text).map(|failure| Error::Auth {
        failure,
        reason: text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_core::AuthFailure;

    #[test]
    fn secrets_compare_fully() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
    }

    #[test]
    fn failures_are_named() {
        let e = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        assert!(matches!(
            auth_error(&e),
            Some(Error::Auth {
                failure: AuthFailure::UntrustedServer,
                ..
            })
        ));
    }
}
