//! etcd failures and how they map onto the contract's `Error`.

/// A failure of the etcd backend that fits no contract error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdBackendError {
    /// etcd-client reported an error.
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    /// A stored record does not decode.
    #[error("corrupt record at {key}: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
}

/// Which side of authentication failed, if this error says so.
fn auth_failure(error: &etcd_client::Error) -> Option<ha_core::AuthFailure> {
    use ha_core::AuthFailure;
    if let etcd_client::Error::GRpcStatus(status) = error {
        match status.code() {
            tonic::Code::Unauthenticated => {
                return Some(
                    ha_core::auth_failure_in(status.message())
                        .unwrap_or(AuthFailure::BadCredentials),
                )
            }
            tonic::Code::PermissionDenied => return Some(AuthFailure::PermissionDenied),
            _ => {}
        }
    }
    ha_core::auth_failure_in(&ha_core::error_chain(error))
}

/// Maps an etcd-client error onto the contract's error.
pub(crate) fn map(error: etcd_client::Error) -> ha_core::Error {
    use etcd_client::Error as E;
    if let Some(failure) = auth_failure(&error) {
        return ha_core::Error::Auth {
            failure,
            reason: ha_core::error_chain(&error),
        };
    }
    match &error {
        E::TransportError(_) | E::IoError(_) => {
            ha_core::Error::Unavailable(ha_core::error_chain(&error))
        }
        E::GRpcStatus(status) => match status.code() {
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => {
                ha_core::Error::Unavailable(status.message().to_owned())
            }
            tonic::Code::DeadlineExceeded => ha_core::Error::Timeout {
                operation: "etcd request",
                after: std::time::Duration::ZERO,
            },
            tonic::Code::InvalidArgument => ha_core::Error::InvalidArgument {
                what: "argument",
                reason: status.message().to_owned(),
            },
            _ => ha_core::Error::Backend {
                backend: "etcd",
                source: Box::new(EtcdBackendError::Client(error)),
            },
        },
        E::InvalidUri(_) | E::InvalidArgs(_) | E::EndpointError(_) => {
            ha_core::Error::InvalidArgument {
                what: "url",
                reason: error.to_string(),
            }
        }
        _ => ha_core::Error::Backend {
            backend: "etcd",
            source: Box::new(EtcdBackendError::Client(error)),
        },
    }
}

/// Whether etcd said the lease does not exist.
pub(crate) fn is_lease_not_found(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::NotFound || status.message().contains("lease not found")
        }
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("lease not found"),
        _ => false,
    }
}
