//! The conformance suite: one case per clause of the [`Backend`] contract, run against a
//! fresh backend each, so every backend is held to the same behaviour.
//!
//! A backend crate opts in with one test:
//!
//! ```rust,no_run
//! # use std::sync::Arc;
//! # fn my_backend() -> Arc<dyn ha_core::Backend> { unimplemented!() }
//! // #[tokio::test(start_paused = true)]
//! async fn conformance() {
//!     ha_core::testing::run_suite(|| async { Ok((my_backend(), ())) })
//!         .await
//!         .assert_passed();
//! }
//! ```
//!
//! The builder returns the backend and a guard that is dropped after the case (stop a
//! server, delete a temp dir). Cases that wait for a TTL use tokio's clock, so on a
//! backend with [`Capabilities::virtual_time`](crate::Capabilities) under
//! `tokio::time::pause()` they take no real time; on others they wait for real, with
//! generous margins. Set `HA_CASE=<substring>` to run only matching cases.

pub mod availability;
mod cases;
pub mod history;
pub mod participant;
#[cfg(feature = "testing")]
pub mod pki;
mod util;

/// Test-only switches that break the runtime on purpose, to show that the checks
/// catch the breakage. Never a public option: only with the `testing` feature.
#[doc(hidden)]
pub mod mutant {
    /// Turns self-fencing off (or back on) for every session in this process: sessions
    /// stay valid past their deadline until the backend says the lease is gone. The
    /// history checker must report a violation with this on.
    pub fn disable_self_fencing(disabled: bool) {
        crate::session::mutant::set_no_self_fence(disabled);
    }
}

/// Makes this process's sessions count `duration` of host suspend, as if the host had
/// just resumed from one (the lease owner's clock ran on meanwhile). For testing what a
/// suspend does under tokio's paused clock; process-wide, so a test that uses it runs
/// alone in its binary.
pub fn suspend_host(duration: Duration) {
    crate::clock::inject_suspend(duration);
}

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use crate::backend::Backend;
use crate::error::Result;

pub use cases::CASES;
pub use util::{eventually, next_event, test_member, test_role};

/// One conformance case.
#[derive(Clone, Copy)]
pub struct Case {
    /// Its name, which says what it checks.
    pub name: &'static str,
    /// The contract clause it checks (0 = the runtime on top of the contract).
    pub clause: u8,
    /// The check itself; it panics (assertions) or returns an error on failure.
    pub run: fn(Arc<dyn Backend>) -> BoxFuture<'static, Result<()>>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("clause", &self.clause)
            .finish()
    }
}

/// How long one case may take before it counts as failed (tokio's clock).
pub const CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// What a suite run found.
#[derive(Debug, Default)]
pub struct SuiteReport {
    /// Names of the cases that passed.
    pub passed: Vec<&'static str>,
    /// Names of the cases that failed, with why.
    pub failed: Vec<(&'static str, String)>,
}

impl SuiteReport {
    /// Panics with every failure listed unless all cases passed and at least one ran.
    pub fn assert_passed(&self) {
        if !self.failed.is_empty() || self.passed.is_empty() {
            let mut message = format!(
                "conformance: {} passed, {} failed\n",
                self.passed.len(),
                self.failed.len()
            );
            for (name, why) in &self.failed {
                message.push_str(&format!("  FAILED {name}: {why}\n"));
            }
            panic!("{message}");
        }
    }
}

/// Runs every case (or those matching `HA_CASE`) on a fresh backend from `make`.
pub async fn run_suite<F, Fut, G>(mut make: F) -> SuiteReport
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(Arc<dyn Backend>, G)>>,
{
    let filter = std::env::var("HA_CASE").ok();
    let mut report = SuiteReport::default();
    for case in CASES {
        if let Some(filter) = &filter {
            if !case.name.contains(filter.as_str()) {
                continue;
            }
        }
        let (backend, guard) = match make().await {
            Ok(made) => made,
            Err(error) => {
                report
                    .failed
                    .push((case.name, format!("could not build a backend: {error}")));
                continue;
            }
        };
        let name = backend.name();
        let started = tokio::time::Instant::now();
        let outcome = tokio::spawn(tokio::time::timeout(CASE_TIMEOUT, (case.run)(backend)))
            .map(|joined| match joined {
                Ok(Ok(Ok(()))) => Ok(()),
                Ok(Ok(Err(error))) => Err(format!("error: {error}")),
                Ok(Err(_)) => Err(format!("timed out after {CASE_TIMEOUT:?}")),
                Err(join) => Err(panic_message(join)),
            })
            .await;
        drop(guard);
        match outcome {
            Ok(()) => {
                eprintln!(
                    "conformance[{name}] {} ... ok ({:?})",
                    case.name,
                    started.elapsed()
                );
                report.passed.push(case.name);
            }
            Err(why) => {
                eprintln!("conformance[{name}] {} ... FAILED: {why}", case.name);
                report.failed.push((case.name, why));
            }
        }
    }
    report
}

fn panic_message(join: tokio::task::JoinError) -> String {
    match join.try_into_panic() {
        Ok(payload) => {
            if let Some(s) = payload.downcast_ref::<String>() {
                format!("panicked: {s}")
            } else if let Some(s) = payload.downcast_ref::<&str>() {
                format!("panicked: {s}")
            } else {
                "panicked".into()
            }
        }
        Err(join) => format!("task failed: {join}"),
    }
}
