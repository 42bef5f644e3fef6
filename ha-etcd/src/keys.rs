//! The key layout. Elections use etcd's Go concurrency layout under
//! `<prefix>/election/<name>/`, so `etcdctl elect <prefix>/election/<name>` interoperates.

use ha_core::{ElectionName, KvKey, LeaseId, Role, ServerId};

/// `<prefix>/election/<name>/`: every candidate key of the election starts with this.
pub fn election_prefix(prefix: &str, election: &ElectionName) -> String {
    format!("{prefix}/election/{election}/")
}

/// `<prefix>/election/<name>/<lease id in lowercase hex>`: one lease's candidacy.
pub fn candidate_key(prefix: &str, election: &ElectionName, lease: LeaseId) -> String {
    format!("{}{lease}", election_prefix(prefix, election))
}

/// `<prefix>/kv/<election>/<key>`: one key of an election's guarded store. Outside the
/// election's candidate prefix, so store keys never look like candidates.
pub fn kv_key(prefix: &str, election: &ElectionName, key: &KvKey) -> String {
    format!("{prefix}/kv/{election}/{key}")
}

/// `<prefix>/member/`: all member records.
pub fn members_prefix(prefix: &str) -> String {
    format!("{prefix}/member/")
}

/// `<prefix>/member/<role>/`: the member records of one role.
pub fn role_prefix(prefix: &str, role: &Role) -> String {
    format!("{prefix}/member/{role}/")
}

/// `<prefix>/member/<role>/<server id>`: one member record, bound to its lease.
pub fn member_key(prefix: &str, role: &Role, server_id: ServerId) -> String {
    format!("{}{server_id}", role_prefix(prefix, role))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_etcd_concurrency() {
        let e = ElectionName::new("rootcoord").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            candidate_key("ha", &e, LeaseId::new(0x694d_7a1b_2c3d)),
            "ha/election/rootcoord/694d7a1b2c3d"
        );
        let r = Role::new("querycoord").unwrap_or_else(|e| panic!("{e}"));
        let k = KvKey::new("segments/7").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(kv_key("ha", &e, &k), "ha/kv/rootcoord/segments/7");
        assert_eq!(
            member_key("p", &r, ServerId::new(19)),
            "p/member/querycoord/19"
        );
    }
}
