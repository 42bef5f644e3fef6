//! For backends: a campaign future dropped before it wins must withdraw its candidacy
//! (contract clause 4), and a `Drop` cannot await, so the guard hands the withdrawal to
//! the runtime.

use futures::future::BoxFuture;
use futures::FutureExt;

/// Spawns its withdrawal on the current tokio runtime when dropped while armed.
#[must_use = "dropping the guard at once withdraws at once"]
pub struct WithdrawOnDrop {
    withdrawal: Option<BoxFuture<'static, ()>>,
}

impl std::fmt::Debug for WithdrawOnDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithdrawOnDrop")
            .field("armed", &self.withdrawal.is_some())
            .finish()
    }
}

impl WithdrawOnDrop {
    /// Arms the guard with `withdrawal`, which runs only if the guard is dropped armed
    /// (it should log its own failure: nobody is left to return it to).
    pub fn new(withdrawal: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        Self {
            withdrawal: Some(withdrawal.boxed()),
        }
    }

    /// The campaign won, or its candidacy is gone already: nothing to withdraw.
    pub fn disarm(&mut self) {
        self.withdrawal = None;
    }
}

impl Drop for WithdrawOnDrop {
    fn drop(&mut self) {
        if let Some(withdrawal) = self.withdrawal.take() {
            // Without a runtime (a process tearing down) the candidacy ends with its lease.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(withdrawal);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn withdraws_only_when_dropped_armed() {
        let ran = Arc::new(AtomicUsize::new(0));
        let guard = |ran: &Arc<AtomicUsize>| {
            let ran = Arc::clone(ran);
            WithdrawOnDrop::new(async move {
                ran.fetch_add(1, Ordering::SeqCst);
            })
        };
        drop(guard(&ran));
        let mut disarmed = guard(&ran);
        disarmed.disarm();
        drop(disarmed);
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
