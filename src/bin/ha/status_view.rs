//! What `ha status` prints: a group's members as a table, and a line each on its
//! leader and quorum, placement and feature level.

use ha::raft::{GroupStatus, MemberKind};

/// `ha status` of an etcd cluster.
#[cfg(feature = "etcd")]
pub(crate) fn etcd_table(cluster: &ha::etcd::EtcdClusterStatus) -> String {
    let mut rows = vec![[
        "ID",
        "NAME",
        "ENDPOINT",
        "KIND",
        "STATE",
        "TERM",
        "RAFT_INDEX",
        "APPLIED",
        "DB",
        "VERSION",
    ]
    .map(str::to_owned)];
    for m in &cluster.members {
        let kind = if m.learner { "learner" } else { "voter" }.to_owned();
        let row = match &m.status {
            Some(s) => [
                format!("{:x}", m.id),
                m.name.clone(),
                m.endpoint.clone(),
                kind,
                if s.leader == m.id {
                    "leader"
                } else {
                    "follower"
                }
                .to_owned(),
                s.raft_term.to_string(),
                s.raft_index.to_string(),
                s.raft_applied_index.to_string(),
                bytes(u64::try_from(s.db_size).unwrap_or(0)),
                s.version.clone(),
            ],
            None => {
                let mut row = [(); 10].map(|()| "-".to_owned());
                row[0] = format!("{:x}", m.id);
                row[1] = m.name.clone();
                row[2] = m.endpoint.clone();
                row[3] = kind;
                row[4] = "unreachable".to_owned();
                row
            }
        };
        rows.push(row);
    }
    let mut out = table(&rows);
    for m in &cluster.members {
        if let Some(error) = &m.error {
            out.push_str(&format!("member {:x}: {error}\n", m.id));
        }
        for error in m.status.iter().flat_map(|s| &s.errors) {
            out.push_str(&format!("member {:x} reports: {error}\n", m.id));
        }
    }
    let voters = cluster.members.iter().filter(|m| !m.learner);
    let answering = voters.clone().filter(|m| m.status.is_some()).count();
    out.push_str(&format!(
        "leader: {}; {answering} of {} voters answered; quorum: {}\n",
        cluster
            .leader
            .map_or_else(|| "none".to_owned(), |l| format!("{l:x}")),
        voters.count(),
        if cluster.quorum { "yes" } else { "no" }
    ));
    out
}

/// When no node answered and every one refused the credentials, that is the error.
pub(crate) fn refused_everywhere(group: &GroupStatus) -> Option<String> {
    let answered = group.members.iter().any(|m| m.status.is_some());
    let refusal = group
        .unreachable
        .values()
        .chain(group.members.iter().filter_map(|m| m.error.as_ref()))
        .find(|e| e.starts_with("not allowed"));
    (!answered).then_some(refusal.cloned()).flatten()
}

fn bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / MIB)
    } else {
        format!("{:.0} KiB", n as f64 / 1024.0)
    }
}

/// `ha status` of an embedded Raft group.
pub(crate) fn status_table(group: &GroupStatus) -> String {
    let dash = || "-".to_owned();
    let opt = |v: Option<u64>| v.map_or_else(dash, |v| v.to_string());
    let mut rows = vec![[
        "ID", "ADDRESS", "KIND", "STATE", "TERM", "LAST_LOG", "APPLIED", "LAG", "CONTACT", "DATA",
        "ACTIVE", "MOVES", "LEVEL", "VERSION",
    ]
    .map(str::to_owned)];
    for m in &group.members {
        let kind = match m.kind {
            MemberKind::Voter => "voter",
            MemberKind::Learner => "learner",
            MemberKind::Outside => "outside",
        };
        let row = match &m.status {
            Some(s) => [
                m.id.to_string(),
                m.address.clone(),
                kind.to_owned(),
                s.state.clone(),
                s.term.to_string(),
                opt(s.last_log_index),
                opt(s.applied_index),
                opt(m.lag),
                m.last_contact_ms.map_or_else(dash, |ms| format!("{ms}ms")),
                bytes(s.data_dir_bytes),
                if s.active_here.is_empty() {
                    dash()
                } else {
                    s.active_here.join(",")
                },
                if s.placement {
                    s.placement_moves.to_string()
                } else {
                    "off".to_owned()
                },
                s.feature_level.to_string(),
                s.version.clone(),
            ],
            None => [
                m.id.to_string(),
                m.address.clone(),
                kind.to_owned(),
                "unreachable".to_owned(),
                dash(),
                dash(),
                dash(),
                opt(m.lag),
                m.last_contact_ms.map_or_else(dash, |ms| format!("{ms}ms")),
                dash(),
                dash(),
                dash(),
                dash(),
                dash(),
            ],
        };
        rows.push(row);
    }
    let mut out = table(&rows);
    for m in &group.members {
        if let Some(error) = &m.error {
            out.push_str(&format!("node {}: {error}\n", m.id));
        }
    }
    for (address, error) in &group.unreachable {
        out.push_str(&format!("{address}: {error}\n"));
    }
    let voters = group.members.iter().filter(|m| m.kind == MemberKind::Voter);
    let answering = voters.clone().filter(|m| m.status.is_some()).count();
    out.push_str(&format!(
        "leader: {}; {answering} of {} voters answered; quorum: {}\n",
        group
            .leader
            .map_or_else(|| "none".to_owned(), |l| format!("node {l}")),
        voters.count(),
        if group.quorum { "yes" } else { "no" }
    ));
    out.push_str(&placement_line(group));
    out.push_str(&level_line(group));
    out
}

/// The group's feature level: recorded in the log, or the one its leader writes at
/// while members of a lower level remain.
fn level_line(group: &GroupStatus) -> String {
    let statuses = || group.members.iter().filter_map(|m| m.status.as_ref());
    let Some(recorded) = statuses().map(|s| s.group_level).max() else {
        return String::new();
    };
    let Some(lowest) = statuses().map(|s| s.feature_level).min() else {
        return String::new();
    };
    let writes_at = statuses()
        .find_map(|s| s.writes_at)
        .filter(|level| *level > 0);
    let highest = statuses().map(|s| s.feature_level).max().unwrap_or(lowest);
    if recorded > 0 && lowest >= recorded && highest <= recorded {
        return format!("feature level: {recorded} (recorded in the log)\n");
    }
    let writes = writes_at.map_or_else(
        || "not known yet".to_owned(),
        |level| format!("written at {level}"),
    );
    let recorded = if recorded > 0 {
        format!("recorded {recorded}")
    } else {
        "none recorded".to_owned()
    };
    format!(
        "feature level: {writes}, {recorded}; members serve {lowest} to {highest}; raised once every member serves it\n"
    )
}

/// Whether the Raft leader's member also hosts an ACTIVE (what placement avoids).
fn placement_line(group: &GroupStatus) -> String {
    let statuses = || {
        group
            .members
            .iter()
            .filter_map(|m| Some((m.id, m.status.as_ref()?)))
    };
    let Some(leader) = group.leader else {
        return String::new();
    };
    let on = statuses().any(|(_, s)| s.placement);
    let shared: Vec<&str> = statuses()
        .filter(|(id, _)| *id == leader)
        .flat_map(|(_, s)| s.active_here.iter().map(String::as_str))
        .collect();
    let state = if on { "on" } else { "off" };
    if shared.is_empty() {
        format!("placement: {state}; no ACTIVE on the Raft leader's member\n")
    } else {
        format!(
            "placement: {state}; the Raft leader's member (node {leader}) hosts the ACTIVE of {}\n",
            shared.join(", ")
        )
    }
}

/// Rows as left-aligned columns two spaces apart.
pub(crate) fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up() {
        let rows = [
            ["ID".to_owned(), "ADDRESS".to_owned()],
            ["10".to_owned(), "a".to_owned()],
        ];
        assert_eq!(table(&rows), "ID  ADDRESS\n10  a\n");
    }
}
