//! The private etcd server every etcd test starts (`ha_testkit::etcd`), and the backend
//! settings that point at it.

#![allow(unused_imports, dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use ha_etcd::{EtcdBackend, EtcdConfig};
pub use ha_testkit::etcd::{Etcd, EtcdCluster, ServerTls};

/// The backend on a private server.
// Tests only, on one runtime: no Send bound needed on the future.
#[allow(async_fn_in_trait)]
pub trait EtcdExt {
    /// Settings for this server under a prefix no other caller uses (point `endpoints`
    /// elsewhere, at a proxy, to put faults between client and server).
    fn config(&self) -> EtcdConfig;

    /// A backend on this server under a prefix no other caller uses.
    async fn backend(&self) -> ha_core::Result<EtcdBackend>;
}

impl EtcdExt for Etcd {
    fn config(&self) -> EtcdConfig {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let prefix = format!(
            "ha-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        EtcdConfig::new([self.endpoint.clone()]).with_prefix(prefix)
    }

    async fn backend(&self) -> ha_core::Result<EtcdBackend> {
        EtcdBackend::connect(self.config()).await
    }
}
