//! Hosts on a private test network: each host is a network namespace with one veth
//! whose other end sits on a bridge inside a "switch" namespace of its own. Nothing is
//! added to the machine's own namespace, the addresses (10.213.N.0/24) exist only
//! inside these namespaces, and dropping the [`Lab`] deletes every namespace it made
//! (also when the test panics). Cutting a host detaches its veth from the bridge:
//! packets are silently lost, no RST, no FIN, as with a dead link or a crashed switch
//! port. Cutting one link of a pair (or one direction of it) leaves each host on the
//! switch and loses only what passes between the two.
//!
//! Needs root (CI runs as root) and `ip` from iproute2.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Why a network lab or a small disk could not be made.
#[derive(Debug)]
pub struct LabError(pub String);

impl std::fmt::Display for LabError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LabError {}

/// A switch and its hosts.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    subnet: u8,
    hosts: usize,
    made: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), LabError> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            LabError(format!(
                "ip {}: {e} (is iproute2 installed?)",
                args.join(" ")
            ))
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(LabError(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

impl Lab {
    /// Builds a switch and `hosts` hosts (1..=hosts, at 10.213.N.i/24).
    ///
    /// # Errors
    /// When namespaces cannot be made (not root, no iproute2); what was made is removed.
    pub fn new(hosts: usize) -> Result<Self, LabError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Short names: interface names are at most 15 bytes.
        let prefix = format!("ha{}x{n}", std::process::id() % 100_000);
        let subnet = ((std::process::id() + n * 7) % 250 + 1) as u8;
        let mut lab = Self {
            prefix,
            subnet,
            hosts,
            made: Vec::new(),
        };
        lab.build()?;
        Ok(lab)
    }

    fn switch(&self) -> String {
        format!("{}s", self.prefix)
    }

    /// The namespace of host `i`.
    pub fn namespace(&self, host: usize) -> String {
        format!("{}h{host}", self.prefix)
    }

    fn port(&self, host: usize) -> String {
        format!("{}p{host}", self.prefix)
    }

    /// Host `i`'s address.
    pub fn addr(&self, host: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, host as u8)
    }

    fn build(&mut self) -> Result<(), LabError> {
        let switch = self.switch();
        ip(&["netns", "add", &switch])?;
        self.made.push(switch.clone());
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for host in 1..=self.hosts {
            let ns = self.namespace(host);
            ip(&["netns", "add", &ns])?;
            self.made.push(ns.clone());
            let port = self.port(host);
            // Both ends are made inside the host's namespace, then one moves to the switch.
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
            ])?;
            ip(&["-n", &ns, "link", "set", &port, "netns", &switch])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &switch, "link", "set", &port, "up"])?;
            let cidr = format!("{}/24", self.addr(host));
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// A command that runs `program` inside host `i`'s namespace. `ip netns exec`
    /// execs the program, so the child's PID is the program's.
    pub fn command(&self, host: usize, program: &str) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace(host)])
            .arg(program);
        command
    }

    /// The same for tokio.
    pub fn tokio_command(&self, host: usize, program: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace(host)])
            .arg(program);
        command
    }

    /// Cuts host `i` off the switch: its packets, and those to it, are lost silently.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn cut(&self, host: usize) -> Result<(), LabError> {
        ip(&[
            "-n",
            &self.switch(),
            "link",
            "set",
            &self.port(host),
            "nomaster",
        ])
    }

    /// Puts host `i` back on the switch.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn heal(&self, host: usize) -> Result<(), LabError> {
        ip(&[
            "-n",
            &self.switch(),
            "link",
            "set",
            &self.port(host),
            "master",
            "br0",
        ])
    }

    /// Puts every host back on the switch and heals every cut link.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn heal_all(&self) -> Result<(), LabError> {
        for host in 1..=self.hosts {
            self.heal(host)?;
            ip(&[
                "-n",
                &self.namespace(host),
                "neigh",
                "flush",
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }

    /// Cuts the link between hosts `a` and `b` only, both ways; both still reach every
    /// other host. Each sends the other's packets to a hardware address no host has (a
    /// permanent neighbour entry), so the switch floods them to nobody who takes them:
    /// lost silently, as on a broken path (no RST, no ICMP).
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn cut_link(&self, a: usize, b: usize) -> Result<(), LabError> {
        self.cut_one_way(a, b)?;
        self.cut_one_way(b, a)
    }

    /// Loses what host `from` sends to host `to`, and nothing else (an asymmetric
    /// fault: `to` still reaches `from`, but TCP needs both ways, so connections between
    /// them stall).
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn cut_one_way(&self, from: usize, to: usize) -> Result<(), LabError> {
        // Locally administered; a veth's random address is this one by a 2^-46 chance.
        let nowhere = format!("02:00:5e:ff:{:02x}:{:02x}", from as u8, to as u8);
        ip(&[
            "-n",
            &self.namespace(from),
            "neigh",
            "replace",
            &self.addr(to).to_string(),
            "lladdr",
            &nowhere,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])
    }

    /// Heals the link between hosts `a` and `b` (both ways).
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn heal_link(&self, a: usize, b: usize) -> Result<(), LabError> {
        for (from, to) in [(a, b), (b, a)] {
            // `flush` and not `del`: after a one-way cut only one entry exists.
            ip(&[
                "-n",
                &self.namespace(from),
                "neigh",
                "flush",
                "to",
                &self.addr(to).to_string(),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }
}

impl Lab {
    /// Runs `f` on a thread of its own inside host `i`'s namespace (sockets it makes
    /// live there) and returns what it returned.
    ///
    /// # Errors
    /// When the namespace cannot be entered.
    pub fn in_host<T: Send + 'static>(
        &self,
        host: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, LabError> {
        let path = format!("/run/netns/{}", self.namespace(host));
        let thread = std::thread::spawn(move || -> Result<T, LabError> {
            let file = std::fs::File::open(&path).map_err(|e| LabError(format!("{path}: {e}")))?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| LabError(format!("setns {path}: {e}")))?;
            Ok(f())
        });
        thread
            .join()
            .map_err(|_| LabError("the thread in the namespace panicked".into()))?
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends inside it, and so both ends.
        for ns in self.made.drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

/// Builds a lab for a test, or returns `None` (outside CI, with a loud message) when
/// this machine cannot make network namespaces. Panics under `CI`: a test must never
/// skip silently.
pub fn lab_for_test(hosts: usize) -> Option<Lab> {
    match Lab::new(hosts) {
        Ok(lab) => Some(lab),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: cannot make network namespaces ({e}); run as root with iproute2");
            None
        }
        Err(e) => panic!("cannot make network namespaces under CI: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_reach_each_other_until_cut_and_again_after_heal() {
        let Some(lab) = lab_for_test(2) else {
            return;
        };
        let server = std::net::SocketAddr::from((lab.addr(2), 7000));
        let listener = lab
            .in_host(2, move || std::net::TcpListener::bind(server))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("bind in host 2: {e}"));
        let connects = |lab: &Lab| {
            lab.in_host(1, move || {
                std::net::TcpStream::connect_timeout(&server, std::time::Duration::from_millis(500))
                    .is_ok()
            })
            .unwrap_or_else(|e| panic!("{e}"))
        };
        assert!(
            connects(&lab),
            "hosts on one switch cannot reach each other"
        );
        lab.cut(2).unwrap_or_else(|e| panic!("{e}"));
        assert!(!connects(&lab), "a cut host still answered");
        lab.heal(2).unwrap_or_else(|e| panic!("{e}"));
        assert!(connects(&lab), "a healed host did not answer");
        drop(listener);
        let names: Vec<String> = (1..=2).map(|h| lab.namespace(h)).collect();
        drop(lab);
        assert_namespaces_gone(&names);
    }

    #[test]
    fn a_cut_link_loses_only_the_traffic_between_its_two_hosts() {
        let Some(lab) = lab_for_test(3) else {
            return;
        };
        let listeners: Vec<std::net::TcpListener> = (1..=3)
            .map(|host| {
                let addr = std::net::SocketAddr::from((lab.addr(host), 7000));
                lab.in_host(host, move || std::net::TcpListener::bind(addr))
                    .unwrap_or_else(|e| panic!("{e}"))
                    .unwrap_or_else(|e| panic!("bind in host {host}: {e}"))
            })
            .collect();
        let connects = |from: usize, to: usize| {
            let server = std::net::SocketAddr::from((lab.addr(to), 7000));
            lab.in_host(from, move || {
                std::net::TcpStream::connect_timeout(&server, std::time::Duration::from_millis(500))
                    .is_ok()
            })
            .unwrap_or_else(|e| panic!("{e}"))
        };
        lab.cut_link(1, 2).unwrap_or_else(|e| panic!("{e}"));
        assert!(!connects(1, 2), "1 reached 2 over a cut link");
        assert!(!connects(2, 1), "2 reached 1 over a cut link");
        assert!(
            connects(1, 3) && connects(3, 2),
            "a cut link cut other paths"
        );
        lab.heal_link(1, 2).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            connects(1, 2) && connects(2, 1),
            "a healed link did not carry"
        );
        lab.cut_one_way(1, 3).unwrap_or_else(|e| panic!("{e}"));
        assert!(!connects(1, 3), "a connection needs both ways");
        lab.heal_all().unwrap_or_else(|e| panic!("{e}"));
        assert!(connects(1, 3), "heal_all left a link cut");
        drop(listeners);
    }

    fn assert_namespaces_gone(names: &[String]) {
        let listed = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["netns", "list"])
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default(),
        )
        .into_owned();
        for name in names {
            assert!(
                !listed.contains(name.as_str()),
                "namespace {name} left behind"
            );
        }
    }
}
