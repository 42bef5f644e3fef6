//! How to reach etcd and where in its keyspace `ha` lives.

use std::time::Duration;

use ha_core::KvLimits;

/// etcd's shortest lease TTL with its default election timing (1.5 s, rounded up).
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// Connection settings for [`EtcdBackend`](crate::EtcdBackend).
#[derive(Clone)]
pub struct EtcdConfig {
    /// `host:port` of each etcd member (a scheme may be given: `http://host:port`).
    pub endpoints: Vec<String>,
    /// Key prefix every `ha` key lives under (default `ha`).
    pub prefix: String,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// How long one request may take.
    pub request_timeout: Duration,
    /// User name and password, for etcd with auth enabled.
    pub user: Option<(String, String)>,
    /// TLS: the CA that signed etcd's certificate, and optionally this client's
    /// certificate and key (for etcd started with `--client-cert-auth`). PEM.
    pub tls: Option<EtcdTls>,
    /// Size limits of the guarded store. etcd itself refuses requests above its
    /// `--max-request-bytes` (1.5 MiB by default), which must leave room for a
    /// compare-and-set carrying two values of the largest size.
    pub kv_limits: KvLimits,
}

/// etcd's client TLS material: the same as every backend's.
pub type EtcdTls = ha_core::ClientTls;

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .field("tls", &self.tls.as_ref().map(|t| t.identity.is_some()))
            .finish()
    }
}

impl EtcdConfig {
    /// Settings for these endpoints with prefix `ha` and 5 s timeouts.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: "ha".to_owned(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            user: None,
            tls: None,
            kv_limits: KvLimits::default(),
        }
    }

    /// Sets the guarded store's size limits.
    pub fn with_kv_limits(mut self, kv_limits: KvLimits) -> Self {
        self.kv_limits = kv_limits;
        self
    }

    /// Sets the key prefix (no trailing `/`).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets both timeouts.
    pub fn with_timeouts(mut self, connect: Duration, request: Duration) -> Self {
        self.connect_timeout = connect;
        self.request_timeout = request;
        self
    }

    /// Connects over TLS, trusting `ca_pem`, presenting `identity` (certificate and key,
    /// PEM) when given. Endpoints without a scheme then use `https://`.
    pub fn with_tls(
        mut self,
        ca_pem: impl Into<Vec<u8>>,
        identity: Option<(Vec<u8>, Vec<u8>)>,
    ) -> Self {
        self.tls = Some(EtcdTls {
            ca_pem: ca_pem.into(),
            identity,
        });
        self
    }

    /// [`with_tls`](Self::with_tls) from PEM files.
    ///
    /// # Errors
    /// `InvalidArgument` (`what = "tls"`) naming the file that is missing or not PEM.
    pub fn with_tls_files(
        mut self,
        ca: impl AsRef<std::path::Path>,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> ha_core::Result<Self> {
        self.tls = Some(EtcdTls::from_files(ca.as_ref(), identity)?);
        Ok(self)
    }

    /// Authenticates as `user`.
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((user.into(), password.into()));
        self
    }
}
