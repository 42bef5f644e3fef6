//! A bounded channel from a backend to one watcher. A watcher that stops reading must
//! not grow the backend's memory without bound, and must not be skipped either (clause
//! 8): when its buffer is full it is ended instead, and told so, as etcd ends a slow
//! watcher. The reader drains what was buffered, then learns it
//! [`lagged`](WatchReceiver::lagged) and subscribes again (from its last revision, where
//! the backend keeps history; from the current state otherwise).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

/// Unread events one watcher may have before it is ended.
pub const WATCH_BUFFER: usize = 256;

/// A bounded watch channel with room for `capacity` unread events.
pub fn channel<T>(capacity: usize) -> (WatchSender<T>, WatchReceiver<T>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let lagged = Arc::new(AtomicBool::new(false));
    (
        WatchSender {
            tx,
            lagged: Arc::clone(&lagged),
        },
        WatchReceiver { rx, lagged },
    )
}

/// The backend's end.
#[derive(Debug)]
pub struct WatchSender<T> {
    tx: mpsc::Sender<T>,
    lagged: Arc<AtomicBool>,
}

impl<T> WatchSender<T> {
    /// Hands `event` to the watcher without waiting. `false` means the watcher is gone
    /// or was just ended for falling behind: drop this sender.
    pub fn offer(&self, event: T) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lagged.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Waits until the watcher stops listening.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Whether the watcher stopped listening (its receiver was dropped).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The watcher's end.
#[derive(Debug)]
pub struct WatchReceiver<T> {
    rx: mpsc::Receiver<T>,
    lagged: Arc<AtomicBool>,
}

impl<T> WatchReceiver<T> {
    /// The next event; `None` once the sender is gone and everything buffered was read.
    pub async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await
    }

    /// After [`recv`](Self::recv) returned `None`: whether the watcher was ended for
    /// falling behind, rather than because the backend went away.
    pub fn lagged(&self) -> bool {
        self.lagged.load(Ordering::Acquire)
    }

    /// A stream of the events, then one [`Error::WatchLagged`](crate::Error::WatchLagged)
    /// if the watcher was ended for falling behind.
    pub fn into_stream(self) -> futures::stream::BoxStream<'static, crate::Result<T>>
    where
        T: Send + 'static,
    {
        use futures::StreamExt;
        futures::stream::unfold(Some(self), |receiver| async move {
            let mut receiver = receiver?;
            match receiver.recv().await {
                Some(event) => Some((Ok(event), Some(receiver))),
                None if receiver.lagged() => Some((
                    Err(crate::Error::WatchLagged {
                        buffered: receiver.rx.max_capacity(),
                    }),
                    None,
                )),
                None => None,
            }
        })
        .boxed()
    }
}

impl<T: Send + 'static> WatchReceiver<crate::Result<T>> {
    /// [`into_stream`](Self::into_stream) for a channel that carries results (a
    /// follower task's events and errors): one flat stream of them.
    pub fn into_flat_stream(self) -> futures::stream::BoxStream<'static, crate::Result<T>> {
        use futures::StreamExt;
        self.into_stream()
            .map(|item| item.and_then(|event| event))
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn a_full_watcher_is_ended_after_what_it_buffered_and_told_it_lagged() {
        let (tx, rx) = channel(2);
        assert!(tx.offer(1));
        assert!(tx.offer(2));
        assert!(!tx.offer(3), "a third event fit a buffer of two");
        drop(tx);
        let events: Vec<_> = rx.into_stream().collect().await;
        assert!(matches!(
            events[..],
            [Ok(1), Ok(2), Err(crate::Error::WatchLagged { buffered: 2 })]
        ));
    }

    #[tokio::test]
    async fn a_sender_dropped_without_lag_just_ends_the_stream() {
        let (tx, rx) = channel::<u8>(2);
        assert!(tx.offer(1));
        drop(tx);
        let events: Vec<_> = rx.into_stream().collect().await;
        assert!(matches!(events[..], [Ok(1)]));
    }
}
