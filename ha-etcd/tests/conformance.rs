//! The full ha-core conformance suite against a real etcd server.

mod common;

use common::EtcdExt;

use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_backend_passes_the_conformance_suite() {
    let Some(etcd) = common::Etcd::start() else {
        return;
    };
    let report =
        ha_core::testing::run_suite(|| async { Ok((Arc::new(etcd.backend().await?) as _, ())) })
            .await;
    report.assert_passed();
}
