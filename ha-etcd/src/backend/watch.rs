//! Watch followers: an election's head and a role's members, followed through etcd
//! watches that resume after their last revision.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};
use ha_core::watch_buffer::WatchSender;
use ha_core::{ElectionName, LeaderEvent, Member, MemberEvent, Result, Role};
use tokio::time::sleep;
use tracing::debug;

use crate::keys;

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

/// A watch of a key prefix from a revision on that reconnects after a broken stream,
/// resuming after the last event it delivered, so nothing is lost or repeated.
struct EventFeed {
    client: Client,
    prefix: String,
    next: i64,
    watch: Option<etcd_client::WatchStream>,
}

impl EventFeed {
    /// A feed of every change after revision `after`.
    fn new(client: Client, prefix: String, after: i64) -> Self {
        Self {
            client,
            prefix,
            next: after + 1,
            watch: None,
        }
    }

    /// The next batch of events; gives up only when the consumer of `tx` is gone.
    async fn next<T>(&mut self, tx: &WatchSender<T>) -> Feed {
        loop {
            let mut watch = match self.watch.take() {
                Some(watch) => watch,
                None => {
                    let options = WatchOptions::new()
                        .with_prefix()
                        .with_prev_key()
                        .with_start_revision(self.next);
                    let opened = tokio::select! {
                        _ = tx.closed() => return Feed::Closed,
                        opened = self.client.watch(self.prefix.as_str(), Some(options)) => opened,
                    };
                    match opened {
                        Ok(watch) => watch,
                        Err(_) => {
                            sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    }
                }
            };
            let message = tokio::select! {
                _ = tx.closed() => return Feed::Closed,
                message = watch.message() => message,
            };
            match message {
                Ok(Some(response)) if response.compact_revision() > 0 => return Feed::Compacted,
                Ok(Some(response)) if response.canceled() => {} // reopen from `next`
                Ok(Some(response)) => {
                    self.watch = Some(watch);
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
                Ok(None) | Err(_) => sleep(Duration::from_millis(200)).await,
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
        let mut feed = EventFeed::new(backend.client.clone(), prefix.clone(), revision);
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
        let mut client = backend.client.clone();
        let read = backend
            .bounded(
                "get",
                client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
            )
            .await;
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
        let mut feed = EventFeed::new(backend.client.clone(), prefix.clone(), revision);
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
