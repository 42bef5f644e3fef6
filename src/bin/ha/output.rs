//! What `ha` prints: one event per line, as JSON (`--json`) or as readable text.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One event line. `event` is one of registered, standby, elected, proclaimed, lost,
/// resigned, leader, vacant, member, stopped, node_ready, raft_leader, and for a
/// supervised command child_started, child_stopping, child_exited, child_failed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Event {
    /// What happened.
    pub event: &'static str,
    /// The election.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub election: Option<String>,
    /// The leader's (or this candidate's) value, or a member's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The fencing token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    /// The server id the event is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_id: Option<u64>,
    /// Why a leadership or session ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A lease id (hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// The Raft node id (node events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// The supervised command's PID (`child_started`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The signal sent to the command's group, or the one that killed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// The command's exit code (`child_exited`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Wall-clock time of the event, in microseconds since the Unix epoch.
    pub at_unix_us: u64,
}

/// Microseconds since the Unix epoch, now.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Event {
    /// A new event stamped now.
    pub fn new(event: &'static str) -> Self {
        Self {
            event,
            at_unix_us: unix_us(),
            ..Self::default()
        }
    }

    /// Sets the election.
    pub fn election(mut self, election: impl ToString) -> Self {
        self.election = Some(election.to_string());
        self
    }

    /// Sets the value, decoded as UTF-8 (lossy).
    pub fn value(mut self, value: &[u8]) -> Self {
        self.value = Some(String::from_utf8_lossy(value).into_owned());
        self
    }

    /// Sets the token.
    pub fn token(mut self, token: ha::FencingToken) -> Self {
        self.token = Some(token.get());
        self
    }

    /// Sets the server id.
    pub fn server_id(mut self, server_id: Option<ha::ServerId>) -> Self {
        self.server_id = server_id.map(ha::ServerId::get);
        self
    }

    /// Sets the reason.
    pub fn reason(mut self, reason: impl ToString) -> Self {
        self.reason = Some(reason.to_string());
        self
    }

    /// Sets the lease.
    pub fn lease(mut self, lease: ha::LeaseId) -> Self {
        self.lease = Some(lease.to_string());
        self
    }

    // Only `ha node` (the raft feature) reports a Raft leader.
    #[cfg_attr(not(feature = "raft"), allow(dead_code))]
    /// Sets the Raft node id.
    pub fn node(mut self, node: u64) -> Self {
        self.node = Some(node);
        self
    }

    /// Sets the signal.
    pub fn signal(mut self, signal: &str) -> Self {
        self.signal = Some(signal.to_owned());
        self
    }

    /// Fills in the leader's fields from a leader record.
    pub fn leader(self, leader: &ha::Leader) -> Self {
        self.election(&leader.key.election)
            .value(&leader.value)
            .token(leader.token())
            .server_id(leader.server_id)
    }

    fn text(&self) -> String {
        let mut line = self.event.to_owned();
        let mut field = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                line.push_str(&format!(" {name}={value}"));
            }
        };
        field("election", self.election.clone());
        field("token", self.token.map(|t| t.to_string()));
        field("server_id", self.server_id.map(|s| s.to_string()));
        field("node", self.node.map(|s| s.to_string()));
        field("pid", self.pid.map(|s| s.to_string()));
        field("signal", self.signal.clone());
        field("code", self.code.map(|s| s.to_string()));
        field("lease", self.lease.clone());
        field("reason", self.reason.clone());
        field("value", self.value.as_ref().map(|v| format!("{v:?}")));
        line
    }
}

/// Prints events to stdout, one per line, flushed at once (other processes read them).
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    json: bool,
}

impl Printer {
    /// A printer in JSON or text mode.
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    /// Whether it prints JSON lines.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Prints one event.
    pub fn print(&self, event: &Event) {
        let line = if self.json {
            serde_json::to_string(event).unwrap_or_else(|e| {
                format!("{{\"event\":\"error\",\"reason\":{:?}}}", e.to_string())
            })
        } else {
            event.text()
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}
