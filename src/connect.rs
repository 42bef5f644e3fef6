//! `ha::connect(url)`: picks a backend from a URL, so the backend is configuration.

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
            Ok(Arc::new(crate::raft::RaftClient::connect(endpoints).await?))
        }
        #[cfg(feature = "etcd")]
        "etcd" => {
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
            Ok(Arc::new(crate::etcd::EtcdBackend::connect(config).await?))
        }
        _ => {
            let _ = rest;
            Err(Error::FeatureDisabled { scheme, feature })
        }
    }
}
