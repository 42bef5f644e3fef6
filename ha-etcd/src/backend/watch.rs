//! Watch followers: an election's head and a role's members, followed through etcd
//! watches that resume after their last revision, on whichever endpoint the backend
//! uses: a watch on an endpoint the backend left is abandoned and resumed on the next.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{EventType, KeyValue, WatchOptions};
use ha_core::watch_buffer::WatchSender;
use ha_core::Error;
use ha_core::{ElectionName, LeaderEvent, Member, MemberEvent, Result, Role};
use tokio::time::{sleep, timeout};
use tracing::debug;

use crate::error::map;
use crate::keys;

use super::endpoints::{Conn, RETRY};
use super::{EtcdBackend, MemberRecord};

/// The head of a set of candidate keys: (token, value, lease).
pub(super) fn head(candidates: &BTreeMap<i64, KeyValue>) -> Option<&KeyValue> {
    candidates.values().next()
}

/// What an [`EventFeed`] yields next.
enum Feed {
    /// The events of one watch response, in revision order.
    Events(Vec<etcd_client::Event>),
    /// The history after the feed's revision was compacted away: re-read.
    Compacted,
    /// The consumer went away.
    Closed,
}

/// A watch of a key prefix from a revision on that reconnects after a broken stream or
/// a move to another endpoint, resuming after the last event it delivered, so nothing
/// is lost or repeated.
struct EventFeed {
    backend: EtcdBackend,
    prefix: String,
    next: i64,
    watch: Option<(Conn, etcd_client::WatchStream)>,
}

impl EventFeed {
    /// A feed of every change after revision `after`.
    fn new(backend: EtcdBackend, prefix: String, after: i64) -> Self {
        Self {
            backend,
            prefix,
            next: after + 1,
            watch: None,
        }
    }

    /// A watch from `next` on the endpoint in use; `None` (after a pause) if it failed.
    async fn open(&self) -> Option<(Conn, etcd_client::WatchStream)> {
        let endpoints = &self.backend.endpoints;
        let Ok(conn) = endpoints.current().await else {
            sleep(RETRY).await;
            return None;
        };
        let options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(self.next);
        let mut client = conn.client.clone();
        let within = endpoints.attempt_timeout();
        self.backend.count_watch_opened();
        let opened = match timeout(within, client.watch(self.prefix.as_str(), Some(options))).await
        {
            Ok(opened) => opened.map_err(map),
            Err(_) => Err(Error::Timeout {
                operation: "watch",
                after: within,
            }),
        };
        match opened {
            Ok(watch) => Some((conn, watch)),
            Err(e) => {
                if !endpoints.moved_after(&conn, &e) {
                    sleep(RETRY).await;
                }
                None
            }
        }
    }

    /// The next batch of events; gives up only when the consumer of `tx` is gone.
    async fn next<T>(&mut self, tx: &WatchSender<T>) -> Feed {
        loop {
            let (conn, mut watch) = match self.watch.take() {
                Some(open) => open,
                None => {
                    let opened = tokio::select! {
                        _ = tx.closed() => return Feed::Closed,
                        opened = self.open() => opened,
                    };
                    match opened {
                        Some(open) => open,
                        None => continue,
                    }
                }
            };
            let message = tokio::select! {
                biased;
                _ = tx.closed() => return Feed::Closed,
                // The endpoint was left (dead, paused, cut off): resume on the next.
                () = self.backend.endpoints.failed_since(&conn) => continue,
                message = watch.message() => message,
            };
            match message {
                Ok(Some(response)) if response.compact_revision() > 0 => return Feed::Compacted,
                Ok(Some(response)) if response.canceled() => {
                    // Reopened from `next`.
                    let endpoints = &self.backend.endpoints;
                    endpoints
                        .after_cancel(&conn, response.cancel_reason())
                        .await;
                }
                Ok(Some(response)) => {
                    self.watch = Some((conn, watch));
                    let events = response.events().to_vec();
                    if let Some(last) = events
                        .iter()
                        .filter_map(|e| e.kv())
                        .map(|kv| kv.mod_revision())
                        .max()
                    {
                        self.next = self.next.max(last + 1);
                    }
                    if !events.is_empty() {
                        return Feed::Events(events);
                    }
                }
                Ok(None) => sleep(RETRY).await,
                Err(e) => {
                    if !self.backend.endpoints.moved_after(&conn, &map(e)) {
                        sleep(RETRY).await;
                    }
                }
            }
        }
    }
}

/// Follows an election: reads all candidates, then applies every watch event in order,
/// reporting the head after each one that changes it. On compaction it re-reads.
pub(super) async fn follow_election(
    backend: EtcdBackend,
    election: ElectionName,
    tx: WatchSender<Result<LeaderEvent>>,
) {
    let prefix = keys::election_prefix(backend.prefix(), &election);
    let mut reported: Option<Option<(i64, Vec<u8>)>> = None;
    let mut failures = 0u32;
    'reread: loop {
        let (revision, list) = match backend.candidates(&election).await {
            Ok(read) => read,
            Err(e) if e.is_retryable() && failures < 100 => {
                failures += 1;
                sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => {
                let _ = tx.offer(Err(e));
                return;
            }
        };
        let mut candidates: BTreeMap<i64, KeyValue> = list
            .into_iter()
            .map(|kv| (kv.create_revision(), kv))
            .collect();
        let mut feed = EventFeed::new(backend.clone(), prefix.clone(), revision);
        if !report(&backend, &election, &candidates, &mut reported, &tx).await {
            return;
        }
        loop {
            let events = match feed.next(&tx).await {
                Feed::Events(events) => events,
                Feed::Compacted => {
                    debug!(election = %election, "watch compacted, re-reading");
                    continue 'reread;
                }
                Feed::Closed => return,
            };
            failures = 0;
            for event in &events {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => {
                        candidates.insert(kv.create_revision(), kv.clone());
                    }
                    EventType::Delete => {
                        candidates.retain(|_, c| c.key() != kv.key());
                    }
                }
                if !report(&backend, &election, &candidates, &mut reported, &tx).await {
                    return;
                }
            }
        }
    }
}

/// Sends the head if it differs from the last one sent; false if the receiver is gone.
async fn report(
    backend: &EtcdBackend,
    election: &ElectionName,
    candidates: &BTreeMap<i64, KeyValue>,
    reported: &mut Option<Option<(i64, Vec<u8>)>>,
    tx: &WatchSender<Result<LeaderEvent>>,
) -> bool {
    let current = head(candidates).map(|kv| (kv.create_revision(), kv.value().to_vec()));
    if reported.as_ref() == Some(&current) {
        return true;
    }
    *reported = Some(current);
    let event = match head(candidates) {
        None => Ok(LeaderEvent::Vacant),
        Some(kv) => backend
            .leader_of(election, kv)
            .await
            .map(LeaderEvent::Elected),
    };
    tx.offer(event)
}

/// Follows a role's member records: a snapshot, then joins and leaves; on compaction the
/// difference between the old and a fresh snapshot.
pub(super) async fn follow_members(
    backend: EtcdBackend,
    role: Role,
    tx: WatchSender<Result<MemberEvent>>,
) {
    let prefix = keys::role_prefix(backend.prefix(), &role);
    let mut known: Option<BTreeMap<Vec<u8>, Member>> = None;
    'reread: loop {
        let read = backend.read_prefix(prefix.clone()).await;
        let response = match read {
            Ok(response) => response,
            Err(e) => {
                if e.is_retryable() {
                    sleep(Duration::from_millis(200)).await;
                    continue;
                }
                let _ = tx.offer(Err(e));
                return;
            }
        };
        let revision = response.header().map_or(0, |h| h.revision());
        let mut fresh = BTreeMap::new();
        for kv in response.kvs() {
            match MemberRecord::decode(kv) {
                Ok(member) => {
                    fresh.insert(kv.key().to_vec(), member);
                }
                Err(e) => {
                    let _ = tx.offer(Err(e));
                    return;
                }
            }
        }
        let mut events = Vec::new();
        match &known {
            None => {
                let mut members: Vec<Member> = fresh.values().cloned().collect();
                members.sort_by_key(|m| m.server_id);
                events.push(MemberEvent::Snapshot(members));
            }
            Some(old) => events.extend(MemberEvent::changes(old, &fresh)),
        }
        for event in events {
            if !tx.offer(Ok(event)) {
                return;
            }
        }
        let mut members = fresh;
        let mut feed = EventFeed::new(backend.clone(), prefix.clone(), revision);
        loop {
            let events = match feed.next(&tx).await {
                Feed::Events(events) => events,
                Feed::Compacted => {
                    known = Some(members);
                    continue 'reread;
                }
                Feed::Closed => return,
            };
            for event in &events {
                let Some(kv) = event.kv() else { continue };
                let out = match event.event_type() {
                    EventType::Put => match MemberRecord::decode(kv) {
                        Ok(member) => {
                            members.insert(kv.key().to_vec(), member.clone());
                            Ok(MemberEvent::Joined(member))
                        }
                        Err(e) => Err(e),
                    },
                    EventType::Delete => match members.remove(kv.key()) {
                        Some(member) => Ok(MemberEvent::Left(member)),
                        None => continue,
                    },
                };
                if !tx.offer(out) {
                    return;
                }
            }
        }
    }
}
