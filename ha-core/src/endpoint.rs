//! What an endpoint string says about where its traffic goes.

/// Whether `endpoint` (`host:port`, `[v6]:port`, optionally with an `http://` or
/// `https://` scheme) names this host: `localhost`, 127.0.0.0/8 or `::1`. Credentials
/// may travel without TLS only to such an endpoint, where they never leave the machine.
pub fn is_loopback_endpoint(endpoint: &str) -> bool {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6)
    } else {
        authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host)
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_loopback_endpoint;

    #[test]
    fn only_this_host_is_loopback() {
        for yes in [
            "127.0.0.1:2379",
            "http://127.0.0.2:1",
            "localhost:7001",
            "[::1]:7001",
        ] {
            assert!(is_loopback_endpoint(yes), "{yes}");
        }
        for no in [
            "10.0.0.1:2379",
            "https://etcd.example:2379",
            "[::2]:1",
            "host",
            "",
        ] {
            assert!(!is_loopback_endpoint(no), "{no}");
        }
    }
}
