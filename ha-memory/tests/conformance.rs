//! The full ha-core conformance suite on the memory backend, in virtual time.

use std::sync::Arc;

use ha_core::testing::run_suite;
use ha_memory::MemoryBackend;

#[tokio::test(start_paused = true)]
async fn memory_backend_passes_the_conformance_suite() {
    let report = run_suite(|| async { Ok((Arc::new(MemoryBackend::new()) as _, ())) }).await;
    report.assert_passed();
    if std::env::var("HA_CASE").is_err() {
        assert_eq!(report.passed.len(), ha_core::testing::CASES.len());
    }
}
