//! Property tests on everything ha-raft decodes from the network or the disk: Raft RPC
//! payloads (JSON inside the Peer service's protobuf bytes), log entries, votes,
//! snapshots and the data dir's identity record. Random bytes and mutations of valid
//! encodings must give `Err` (or a value), never a panic; and whatever decodes must apply
//! to the state machine without a panic.

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{Entry, EntryPayload, LeaderId, LogId, Vote};
use proptest::prelude::*;

use ha_raft::testing::Identity;
use ha_raft::testing::State;
use ha_raft::testing::{Blob, Command, KvOp, MemberRecord};
use ha_raft::TypeConfig;

fn valid_entries() -> Vec<Vec<u8>> {
    let log_id = LogId::new(LeaderId::new(3, 1), 42);
    let commands = [
        Command::Register {
            member: MemberRecord {
                server_id: 7,
                role: "rootcoord".into(),
                address: "10.0.0.1:53100".into(),
                metadata: [("zone".to_owned(), "a".to_owned())].into(),
            },
            ttl_ms: 10_000,
        },
        Command::Campaign {
            lease: 42,
            election: "rootcoord".into(),
            value: b"active 10.0.0.1:53100".to_vec(),
        },
        Command::Resign {
            election: "rootcoord".into(),
            lease: 42,
            token: 43,
            attempt: None,
        },
        Command::Proclaim {
            election: "rootcoord".into(),
            lease: 42,
            token: 43,
            value: b"x".to_vec(),
        },
        Command::Expire { lease: 42 },
        Command::KvWrite {
            election: "rootcoord".into(),
            lease: 42,
            token: 43,
            op: KvOp::CompareAndSet {
                key: "segments/7".into(),
                expected: Some(Blob(b"growing".to_vec())),
                new: None,
            },
        },
    ];
    let mut encoded: Vec<Vec<u8>> = commands
        .into_iter()
        .map(|command| Entry::<TypeConfig> {
            log_id,
            payload: EntryPayload::Normal(command),
        })
        .filter_map(|entry| serde_json::to_vec(&entry).ok())
        .collect();
    let vote: Vote<u64> = Vote::new(3, 1);
    encoded.extend(serde_json::to_vec(&vote).ok());
    encoded.extend(serde_json::to_vec(&VoteRequest::<u64>::new(vote, Some(log_id))).ok());
    encoded.extend(
        serde_json::to_vec(&Identity {
            cluster_id: "prod".into(),
            node_id: 1,
        })
        .ok(),
    );
    encoded
}

/// Decodes `bytes` as everything the node reads; applies any command that decodes.
fn decode_all(bytes: &[u8]) {
    if let Ok(entry) = serde_json::from_slice::<Entry<TypeConfig>>(bytes) {
        if let EntryPayload::Normal(command) = &entry.payload {
            let mut state = State::default();
            let _ = state.apply(entry.log_id.index, command);
            let _ = state.apply(entry.log_id.index.wrapping_add(1), command);
        }
    }
    let _ = serde_json::from_slice::<Command>(bytes);
    let _ = serde_json::from_slice::<Vote<u64>>(bytes);
    let _ = serde_json::from_slice::<VoteRequest<u64>>(bytes);
    let _ = serde_json::from_slice::<AppendEntriesRequest<TypeConfig>>(bytes);
    let _ = serde_json::from_slice::<InstallSnapshotRequest<TypeConfig>>(bytes);
    let _ = serde_json::from_slice::<Identity>(bytes);
    if let Ok(state) = serde_json::from_slice::<State>(bytes) {
        let _ = state.head("rootcoord");
        let _ = state.members_of("rootcoord");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn mutated_valid_encodings_never_panic(
        which in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let valid = valid_entries();
        let mut bytes = valid[which.index(valid.len())].clone();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        decode_all(&bytes);
        let end = cut.index(bytes.len() + 1);
        decode_all(&bytes[..end]);
    }

    /// Any command at all (garbage names, huge TTLs, unknown leases) applies without a
    /// panic, in any order.
    #[test]
    fn arbitrary_commands_apply_without_panic(
        commands in proptest::collection::vec(
            prop_oneof![
                (any::<u64>(), ".{0,300}", any::<u64>()).prop_map(|(server_id, role, ttl_ms)| Command::Register {
                    member: MemberRecord { server_id, role, address: String::new(), metadata: Default::default() },
                    ttl_ms,
                }),
                any::<u64>().prop_map(|lease| Command::Revoke { lease }),
                any::<u64>().prop_map(|lease| Command::Expire { lease }),
                Just(Command::Handover),
                (any::<u64>(), ".{0,300}", proptest::collection::vec(any::<u8>(), 0..64))
                    .prop_map(|(lease, election, value)| Command::Campaign { lease, election, value }),
                (".{0,20}", any::<u64>(), any::<u64>())
                    .prop_map(|(election, lease, token)| Command::Resign { election, lease, token, attempt: None }),
                (".{0,20}", any::<u64>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..8))
                    .prop_map(|(election, lease, token, value)| Command::Proclaim { election, lease, token, value }),
                (".{0,4}", 0..8u64, 0..8u64, ".{0,8}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)), any::<bool>())
                    .prop_map(|(election, lease, token, key, value, cas)| Command::KvWrite {
                        election,
                        lease,
                        token,
                        op: match (cas, value) {
                            (true, value) => KvOp::CompareAndSet { key, expected: None, new: value.map(Blob) },
                            (false, Some(value)) => KvOp::Put { key, value: Blob(value) },
                            (false, None) => KvOp::Delete { key },
                        },
                    }),
            ],
            0..40,
        ),
        start in any::<u64>(),
    ) {
        let mut state = State::default();
        for (offset, command) in commands.iter().enumerate() {
            let _ = state.apply(start.wrapping_add(offset as u64), command);
        }
        let bytes = serde_json::to_vec(&state).unwrap_or_default();
        let back: State = serde_json::from_slice(&bytes).unwrap_or_default();
        prop_assert_eq!(back, state);
    }
}
