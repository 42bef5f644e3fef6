//! `ha::connect(url)`: picks a backend from a URL, so the backend is configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ha_core::{Backend, Error, Result};

/// The URL schemes `ha` knows, with the Cargo feature each needs.
const SCHEMES: &[(&str, &str)] = &[("memory", "memory"), ("raft", "raft"), ("etcd", "etcd")];

/// Connects to the backend a URL names.
///
/// - `memory://` — a new in-process [`MemoryBackend`](crate::memory::MemoryBackend)
///   (feature `memory`); each call returns an independent one.
/// - `raft://host:port[,host:port...]` — an embedded Raft group (feature `raft`).
/// - `etcd://host:port[,host:port...][/prefix]` — an etcd cluster (feature `etcd`;
///   prefix default `ha`).
///
/// # Errors
/// `InvalidArgument` for a malformed URL or an unknown scheme, `FeatureDisabled` for a
/// known scheme whose backend is not compiled in, or the backend's connection error.
pub async fn connect(url: &str) -> Result<Arc<dyn Backend>> {
    connect_with(url, &ConnectOptions::default()).await
}

/// Credentials for [`connect_with`]: TLS files and secrets, as the CLI's `--cacert`,
/// `--cert`, `--key`, `--user` and the password or token from the environment or a file
/// give them. Secrets are never printed by `Debug`.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// The CA certificate (PEM file) that signs the servers' certificates. Turns TLS on.
    pub ca_file: Option<PathBuf>,
    /// This client's certificate (PEM file), for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// This client's private key (PEM file), for mutual TLS.
    pub key_file: Option<PathBuf>,
    /// etcd: the user name (auth enabled).
    pub user: Option<String>,
    /// etcd: the user's password.
    pub password: Option<String>,
    /// raft: a bearer token the nodes accept.
    pub token: Option<String>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl ConnectOptions {
    /// The client certificate and key, which come as a pair.
    #[cfg_attr(not(any(feature = "raft", feature = "etcd")), allow(dead_code))]
    fn identity(&self) -> Result<Option<(&Path, &Path)>> {
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Ok(Some((cert.as_path(), key.as_path()))),
            (None, None) => Ok(None),
            _ => Err(Error::InvalidArgument {
                what: "tls",
                reason: "a client certificate needs its key: give both --cert and --key".into(),
            }),
        }
    }
}

/// [`connect`] with TLS and credentials.
///
/// # Errors
/// As [`connect`]; `InvalidArgument` for unreadable certificate files, a certificate
/// without its key, or a user without a password; `Auth` when the server refuses the
/// credentials or cannot be trusted (the error says which).
// Without a network backend there is nothing to pass the credentials to.
#[cfg_attr(not(any(feature = "raft", feature = "etcd")), allow(unused_variables))]
pub async fn connect_with(url: &str, options: &ConnectOptions) -> Result<Arc<dyn Backend>> {
    let invalid = |reason: String| Error::InvalidArgument {
        what: "url",
        reason,
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        invalid(format!(
            "{url:?} has no scheme; expected memory://, raft://host:port,... or etcd://host:port,..."
        ))
    })?;
    let Some(&(scheme, feature)) = SCHEMES.iter().find(|(known, _)| *known == scheme) else {
        return Err(invalid(format!(
            "unknown scheme {scheme:?} in {url:?}; known schemes are memory, raft and etcd"
        )));
    };
    match scheme {
        #[cfg(feature = "memory")]
        "memory" => {
            if !rest.is_empty() && rest != "/" {
                return Err(invalid(format!(
                    "memory:// takes no host or path, got {rest:?}"
                )));
            }
            Ok(Arc::new(crate::memory::MemoryBackend::new()))
        }
        #[cfg(feature = "raft")]
        "raft" => {
            let endpoints: Vec<&str> = rest.trim_end_matches('/').split(',').collect();
            if endpoints.iter().any(|e| e.is_empty()) {
                return Err(invalid(format!(
                    "{url:?}: expected raft://host:port[,host:port...]"
                )));
            }
            let tls = match &options.ca_file {
                Some(ca) => Some(crate::raft::ClientTls::from_files(ca, options.identity()?)?),
                None => None,
            };
            let client_options = crate::raft::RaftClientOptions {
                tls,
                token: options.token.clone(),
                ..crate::raft::RaftClientOptions::default()
            };
            Ok(Arc::new(
                crate::raft::RaftClient::connect_with(endpoints, client_options).await?,
            ))
        }
        #[cfg(feature = "etcd")]
        "etcd" => {
            let config = etcd_config(url, options)?;
            Ok(Arc::new(crate::etcd::EtcdBackend::connect(config).await?))
        }
        _ => {
            let _ = rest;
            Err(Error::FeatureDisabled { scheme, feature })
        }
    }
}

/// The etcd configuration of an `etcd://` URL with `options` (TLS, user).
///
/// # Errors
/// `InvalidArgument` for a malformed URL, unreadable TLS files or a user without a
/// password.
#[cfg(feature = "etcd")]
pub fn etcd_config(url: &str, options: &ConnectOptions) -> Result<crate::etcd::EtcdConfig> {
    let invalid = |reason: String| Error::InvalidArgument {
        what: "url",
        reason,
    };
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| invalid(format!("{url:?} is not an etcd:// URL")))?;
    let (hosts, prefix) = match rest.split_once('/') {
        Some((hosts, prefix)) => (hosts, prefix.trim_end_matches('/')),
        None => (rest, ""),
    };
    let endpoints: Vec<&str> = hosts.split(',').collect();
    if endpoints.iter().any(|e| e.is_empty() || !e.contains(':')) {
        return Err(invalid(format!(
            "{url:?}: expected etcd://host:port[,host:port...][/prefix]"
        )));
    }
    let mut config = crate::etcd::EtcdConfig::new(endpoints);
    if !prefix.is_empty() {
        config = config.with_prefix(prefix);
    }
    if let Some(ca) = &options.ca_file {
        config = config.with_tls_files(ca, options.identity()?)?;
    }
    if let Some(user) = &options.user {
        let password = options
            .password
            .clone()
            .ok_or_else(|| Error::InvalidArgument {
                what: "argument",
                reason: format!(
                "etcd user {user:?} needs a password: set HA_ETCD_PASSWORD or pass --password-file"
            ),
            })?;
        config = config.with_user(user.clone(), password);
    }
    Ok(config)
}
