//! The one error type of the contract. Each backend maps its own errors onto it, so a
//! caller can tell "you lost" from "try again" from "you asked for something invalid"
//! without knowing which backend it runs on.

use std::time::Duration;

use crate::types::{ElectionName, FencingToken, LeaseId, Role, ServerId};

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `ha`, by what it means to the caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lease is gone (expired, revoked, or never existed): the session is over and
    /// anything bound to it (member record, candidacies, leadership) ended with it.
    #[error("lease {lease} expired or was revoked")]
    LeaseExpired {
        /// The lease that is gone.
        lease: LeaseId,
    },

    /// The caller is not (or no longer) the leader of the election.
    #[error("not the leader of election '{election}'{}", current_suffix(*.current))]
    NotLeader {
        /// The election in question.
        election: ElectionName,
        /// The current leader's token, when the backend knows it.
        current: Option<FencingToken>,
    },

    /// Another live session already registered this server ID in this role.
    #[error("server {server_id} is already registered in role '{role}'")]
    AlreadyRegistered {
        /// The role.
        role: Role,
        /// The duplicate server ID.
        server_id: ServerId,
    },

    /// The input is invalid; `reason` says how.
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// What was invalid (`ttl`, `role`, `url`, ...).
        what: &'static str,
        /// Why.
        reason: String,
    },

    /// Something is longer than its limit: a key or value of the guarded store
    /// ([`KvLimits`](crate::KvLimits)), a leader value, or a member's address or
    /// metadata ([`RecordLimits`](crate::RecordLimits)).
    #[error("{what} too large: {size} bytes, the limit is {limit}")]
    TooLarge {
        /// `key`, `value`, `leader value`, `address` or `metadata`.
        what: &'static str,
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },

    /// Authentication or authorization failed, in one direction or the other; `failure`
    /// says which, `reason` what the backend or the TLS layer reported.
    #[error("{failure}: {reason}")]
    Auth {
        /// Which check failed.
        failure: AuthFailure,
        /// The details.
        reason: String,
    },

    /// The URL names a backend this build does not include.
    #[error(
        "the {scheme}:// backend is not compiled in; enable the Cargo feature {feature:?} of `ha`"
    )]
    FeatureDisabled {
        /// The URL scheme.
        scheme: &'static str,
        /// The Cargo feature that enables it.
        feature: &'static str,
    },

    /// A watch stopped reading for so long that its buffer filled, and the backend ended
    /// it rather than grow without bound or skip events. Watch again (from the last
    /// revision seen, where the backend resumes).
    #[error("the watcher fell behind ({buffered} unread events) and was ended; watch again")]
    WatchLagged {
        /// The buffer it filled.
        buffered: usize,
    },

    /// The backend cannot be reached now; the operation may be retried.
    #[error("backend unavailable: {0}")]
    Unavailable(String),

    /// The operation did not finish in time; its outcome is unknown.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// Which operation.
        operation: &'static str,
        /// How long it was given.
        after: Duration,
    },

    /// The session or leadership was closed by its owner; nothing more can be done with it.
    #[error("{0} is closed")]
    Closed(&'static str),

    /// The activation of an [`ActiveStandby`](crate::ActiveStandby) returned an error or
    /// panicked; its leadership was resigned.
    #[error("the activation failed: {source}")]
    Activation {
        /// What the activation returned.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A backend-specific failure that fits no other variant.
    #[error("{backend} backend: {source}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// Which side of authentication failed; see [`Error::Auth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthFailure {
    /// The server's certificate is not signed by a CA this client trusts (wrong
    /// `--cacert`), or does not name the server that was dialled.
    UntrustedServer,
    /// The server refused this client's certificate, or requires one and none was given.
    ClientCertificate,
    /// The user name and password, or the bearer token, are wrong or missing.
    BadCredentials,
    /// The credentials are valid, but not for this operation (etcd RBAC, a peer
    /// certificate that does not name the node it claims to be).
    PermissionDenied,
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::UntrustedServer => "the server's certificate is not trusted (wrong CA?)",
            Self::ClientCertificate => {
                "the server refused our client certificate (missing, or from another CA)"
            }
            Self::BadCredentials => "wrong or missing credentials (user, password or token)",
            Self::PermissionDenied => "permission denied",
        })
    }
}

/// An error's message followed by those of all its sources, `: `-separated: TLS
/// failures arrive several sources deep inside transport errors.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Recognizes an authentication failure in an error message from a TLS stack (rustls),
/// a gRPC status or etcd, so backends report [`Error::Auth`] saying which side failed
/// instead of a bare "unavailable". `None` when the text shows no such failure.
pub fn auth_failure_in(text: &str) -> Option<AuthFailure> {
    let lower = text.to_ascii_lowercase();
    let any = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    if any(&[
        "unknownissuer",
        "invalid peer certificate",
        "notvalidforname",
        "certificate verify failed",
    ]) {
        Some(AuthFailure::UntrustedServer)
    } else if any(&[
        "certificaterequired",
        "certificate required",
        "badcertificate",
        "bad certificate",
        "unknownca",
        "unknown ca",
        "requires a client certificate",
    ]) {
        Some(AuthFailure::ClientCertificate)
    } else if any(&[
        "authentication failed",
        "invalid user id or password",
        "invalid auth token",
        "bearer token",
        "user name is empty",
    ]) {
        Some(AuthFailure::BadCredentials)
    } else if any(&["permission denied", "does not name node"]) {
        Some(AuthFailure::PermissionDenied)
    } else {
        None
    }
}

fn current_suffix(current: Option<FencingToken>) -> String {
    match current {
        Some(token) => format!(" (current leader's token is {token})"),
        None => String::new(),
    }
}

impl Error {
    /// Whether retrying the same call later may succeed (the backend was unreachable or
    /// slow), as opposed to an answer that will not change.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_) | Self::Timeout { .. } | Self::WatchLagged { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_happened() {
        let election = ElectionName::new("rootcoord").unwrap_or_else(|e| panic!("{e}"));
        let e = Error::NotLeader {
            election,
            current: Some(FencingToken::new(7)),
        };
        assert_eq!(
            e.to_string(),
            "not the leader of election 'rootcoord' (current leader's token is 7)"
        );
        assert_eq!(
            Error::LeaseExpired {
                lease: LeaseId::new(255)
            }
            .to_string(),
            "lease ff expired or was revoked"
        );
        assert!(Error::Unavailable("x".into()).is_retryable());
        assert!(!Error::Closed("session").is_retryable());
    }
}
