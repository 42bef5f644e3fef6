//! The conformance suite on every backend compiled into the facade, reached through
//! `ha::connect`, as a user would.

#[cfg(feature = "memory")]
#[tokio::test(start_paused = true)]
async fn memory_url_passes_the_conformance_suite() {
    ha::testing::run_suite(|| async { Ok((ha::connect("memory://").await?, ())) })
        .await
        .assert_passed();
}
