//! Feature levels: what each member can apply, and what the leader may therefore write.
//!
//! Members of two versions replicate one log during a rolling upgrade. Each command
//! needs a level; a member serves one level (its binary's, or lower for tests of mixed
//! groups); the leader writes only what every member serves. Once every member serves
//! a level of 3 or more, the leader records it in the log with [`Command::SetLevel`]:
//! from then on a member below it refuses to start, and the level never goes back.
//!
//! | level | what it adds                      | served by        |
//! |-------|-----------------------------------|------------------|
//! | 1     | one command per entry             | tests only       |
//! | 2     | [`Command::Batch`] entries        | 0.1.0            |
//! | 3     | [`Command::SetLevel`] (recorded)  | this version     |

use serde::{Deserialize, Serialize};

use crate::data::command::Command;

/// The feature level this binary serves.
pub const FEATURE_LEVEL: u32 = 3;

/// The lowest level a member can be started at (for tests of mixed groups).
pub const MIN_FEATURE_LEVEL: u32 = 1;

/// The level of a member that does not report one: ha 0.1.0, which applies batches but
/// predates levels (its peer service answers `Unimplemented`).
pub const LEVEL_OF_UNVERSIONED: u32 = 2;

/// The first level that can be recorded in the log: [`Command::SetLevel`] is what it adds.
pub const FIRST_RECORDED_LEVEL: u32 = 3;

/// What a member tells the leader that asks for its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelReport {
    /// The level it serves.
    pub serves: u32,
}

/// The level a member must serve to apply `command`.
pub fn required_level(command: &Command) -> u32 {
    match command {
        Command::Batch(commands) => commands.iter().map(required_level).fold(2, u32::max),
        Command::SetLevel { level } => (*level).max(FIRST_RECORDED_LEVEL),
        _ => 1,
    }
}

/// The group level `command` records, if it records one (batches searched).
pub fn recorded_by(command: &Command) -> Option<u32> {
    match command {
        Command::SetLevel { level } => Some(*level),
        Command::Batch(commands) => commands.iter().filter_map(recorded_by).max(),
        _ => None,
    }
}

/// The command's name as the log spells it, for errors.
pub fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Register { .. } => "Register",
        Command::Revoke { .. } => "Revoke",
        Command::Expire { .. } => "Expire",
        Command::Campaign { .. } => "Campaign",
        Command::Resign { .. } => "Resign",
        Command::Proclaim { .. } => "Proclaim",
        Command::KvWrite { .. } => "KvWrite",
        Command::Handover => "Handover",
        Command::Batch(_) => "Batch",
        Command::SetLevel { .. } => "SetLevel",
    }
}

/// Every command name this binary knows, to tell an unknown command from corrupt bytes.
pub(crate) const COMMAND_NAMES: [&str; 10] = [
    "Register", "Revoke", "Expire", "Campaign", "Resign", "Proclaim", "KvWrite", "Handover",
    "Batch", "SetLevel",
];

/// Why an encoded log entry that does not decode cannot: a command this binary does not
/// know (written by a newer one), or bytes that are not an entry at all.
pub(crate) fn undecodable_entry(bytes: &[u8], error: &serde_json::Error) -> UndecodableEntry {
    let unknown = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|entry| unknown_command(entry.pointer("/payload/Normal")?));
    match unknown {
        Some(name) => UndecodableEntry::UnknownCommand(name),
        None => UndecodableEntry::Corrupt(error.to_string()),
    }
}

/// The outcome of [`undecodable_entry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UndecodableEntry {
    /// A well-formed entry whose command this binary does not know.
    UnknownCommand(String),
    /// Not a well-formed entry.
    Corrupt(String),
}

/// The first command name in `command` (externally tagged, batches searched) that this
/// binary does not know.
fn unknown_command(command: &serde_json::Value) -> Option<String> {
    let name = match command {
        serde_json::Value::String(name) => name.as_str(),
        serde_json::Value::Object(tagged) if tagged.len() == 1 => tagged.keys().next()?.as_str(),
        _ => return None,
    };
    if !COMMAND_NAMES.contains(&name) {
        return Some(name.chars().take(64).collect());
    }
    match command.pointer("/Batch") {
        Some(serde_json::Value::Array(inner)) => inner.iter().find_map(unknown_command),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(payload: &str) -> Vec<u8> {
        format!(r#"{{"log_id":{{"leader_id":{{"term":1,"node_id":1}},"index":5}},"payload":{{"Normal":{payload}}}}}"#)
            .into_bytes()
    }

    fn classify(bytes: &[u8]) -> UndecodableEntry {
        let error = serde_json::from_slice::<serde_json::Value>(b"{")
            .err()
            .unwrap_or_else(|| panic!("'{{' decoded"));
        undecodable_entry(bytes, &error)
    }

    #[test]
    fn a_command_of_a_newer_version_is_unknown_and_broken_bytes_are_corrupt() {
        assert_eq!(
            classify(&entry(r#"{"Rename":{"from":"a","to":"b"}}"#)),
            UndecodableEntry::UnknownCommand("Rename".into())
        );
        assert_eq!(
            classify(&entry(r#""Compact""#)),
            UndecodableEntry::UnknownCommand("Compact".into())
        );
        assert_eq!(
            classify(&entry(
                r#"{"Batch":[{"Revoke":{"lease":3}},{"Rename":{}}]}"#
            )),
            UndecodableEntry::UnknownCommand("Rename".into())
        );
        // A known command with a broken field, and bytes that are not JSON: corrupt.
        assert!(matches!(
            classify(&entry(r#"{"Revoke":{"lease":"x"}}"#)),
            UndecodableEntry::Corrupt(_)
        ));
        assert!(matches!(
            classify(b"\x00\x01garbage"),
            UndecodableEntry::Corrupt(_)
        ));
    }

    #[test]
    fn batches_need_level_2_and_a_recorded_level_at_least_3() {
        let revoke = Command::Revoke { lease: 1 };
        assert_eq!(required_level(&revoke), 1);
        assert_eq!(required_level(&Command::Batch(vec![revoke.clone()])), 2);
        assert_eq!(required_level(&Command::SetLevel { level: 3 }), 3);
        assert_eq!(required_level(&Command::SetLevel { level: 5 }), 5);
        assert_eq!(
            required_level(&Command::Batch(vec![
                revoke,
                Command::SetLevel { level: 4 }
            ])),
            4
        );
        assert_eq!(
            recorded_by(&Command::Batch(vec![Command::SetLevel { level: 3 }])),
            Some(3)
        );
        assert_eq!(recorded_by(&Command::Revoke { lease: 1 }), None);
        for name in COMMAND_NAMES {
            assert!(
                COMMAND_NAMES.iter().filter(|n| **n == name).count() == 1,
                "{name} twice"
            );
        }
    }

    /// `COMMAND_NAMES` and `command_name` list the same names, as the log spells them.
    #[test]
    fn the_known_names_are_the_log_s_names_of_every_command() {
        let member = crate::data::command::MemberRecord {
            server_id: 1,
            role: "r".into(),
            address: "a".into(),
            metadata: Default::default(),
        };
        let election = || "e".to_owned();
        let samples = [
            Command::Register { member, ttl_ms: 1 },
            Command::Revoke { lease: 1 },
            Command::Expire { lease: 1 },
            Command::Campaign {
                lease: 1,
                election: election(),
                value: vec![],
            },
            Command::Resign {
                election: election(),
                lease: 1,
                token: 1,
                attempt: None,
            },
            Command::Proclaim {
                election: election(),
                lease: 1,
                token: 1,
                value: vec![],
            },
            Command::KvWrite {
                election: election(),
                lease: 1,
                token: 1,
                op: crate::data::command::KvOp::Delete { key: "k".into() },
            },
            Command::Handover,
            Command::Batch(vec![]),
            Command::SetLevel { level: 3 },
        ];
        assert_eq!(samples.len(), COMMAND_NAMES.len());
        for command in &samples {
            let encoded = serde_json::to_value(command).unwrap_or_default();
            let tag = match &encoded {
                serde_json::Value::String(name) => name.clone(),
                other => other
                    .as_object()
                    .and_then(|o| o.keys().next().cloned())
                    .unwrap_or_default(),
            };
            assert_eq!(tag, command_name(command));
            assert!(COMMAND_NAMES.contains(&tag.as_str()), "{tag}");
        }
    }
}
