//! A real, private etcd server for tests and benchmarks: the `etcd` binary from `PATH`
//! on its own free loopback ports with a temp data dir, stopped by PID when dropped.
//!
//! Tests use [`Etcd::start`], which fails loudly under `CI` when etcd is missing and says
//! it skipped otherwise; tools use [`Etcd::try_start`], which returns typed errors.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod cluster;

pub use cluster::EtcdCluster;

/// Server-side TLS files: etcd then serves clients over https and requires a client
/// certificate signed by the CA.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The CA that signs client certificates.
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

/// Why a private etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No `etcd` binary on `PATH`.
    #[error(
        "etcd is not installed (no `etcd` on PATH); install etcd-server (scripts/test.sh does)"
    )]
    NotInstalled,
    /// Ports, temp dir or spawn failed.
    #[error("cannot start etcd: {0}")]
    Io(#[from] std::io::Error),
    /// It started but did not accept connections in time.
    #[error("etcd did not listen on {endpoint} within {within:?}")]
    NotListening {
        /// The client endpoint.
        endpoint: String,
        /// How long we waited.
        within: Duration,
    },
}

/// A running private etcd server.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    binary: PathBuf,
    tls: Option<ServerTls>,
    /// Flags given on top of the defaults, kept for restarts.
    extra: Vec<String>,
    /// The client endpoint, `127.0.0.1:port`.
    pub endpoint: String,
    /// The peer port (kept across restarts).
    pub peer_port: u16,
    /// The data dir.
    pub dir: tempfile::TempDir,
}

const LISTEN_WITHIN: Duration = Duration::from_secs(30);

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// What a test does with a start: go on, skip loudly when etcd is not installed (outside
/// CI), or panic (any other failure, and a missing etcd under `CI`).
fn for_test<T>(started: Result<T, StartError>) -> Option<T> {
    match started {
        Ok(started) => Some(started),
        Err(StartError::NotInstalled) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: etcd is not installed; run ./scripts/test.sh to install it");
            None
        }
        Err(error) => panic!("{error} (CI is set, so this fails)"),
    }
}

/// A program on `PATH` (`etcd`, `etcdctl`), if any.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn spawn(
    binary: &Path,
    endpoint: &str,
    peer_port: u16,
    dir: &Path,
    tls: Option<&ServerTls>,
    extra: &[String],
) -> std::io::Result<Child> {
    let peer = format!("http://127.0.0.1:{peer_port}");
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut command = Command::new(binary);
    if let Some(tls) = tls {
        command
            .arg(format!("--cert-file={}", tls.cert.display()))
            .arg(format!("--key-file={}", tls.key.display()))
            .arg(format!("--trusted-ca-file={}", tls.ca.display()))
            .arg("--client-cert-auth");
    }
    command
        .arg("--name=ha-test")
        .arg(format!("--data-dir={}", dir.display()))
        .arg(format!("--listen-client-urls={scheme}://{endpoint}"))
        .arg(format!("--advertise-client-urls={scheme}://{endpoint}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=ha-test={peer}"))
        .arg("--logger=zap")
        .arg("--log-level=error")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

impl Etcd {
    /// Starts etcd for a test, or returns `None` (outside CI, with a loud message) when
    /// it is not installed. Panics on any other failure, and when `CI` is set and etcd is
    /// missing: a test must never skip silently.
    pub fn start() -> Option<Self> {
        Self::start_for_test(None)
    }

    /// Like [`Etcd::start`], serving clients over TLS with client certificates required.
    pub fn start_tls(tls: ServerTls) -> Option<Self> {
        Self::start_for_test(Some(tls))
    }

    /// Like [`Etcd::start`], with `extra` flags (`--auth-token-ttl=2`), kept across
    /// restarts.
    pub fn start_with(extra: &[&str]) -> Option<Self> {
        for_test(Self::try_start_with(None, extra))
    }

    fn start_for_test(tls: Option<ServerTls>) -> Option<Self> {
        for_test(Self::try_start(tls))
    }

    /// Starts etcd and waits until it accepts connections.
    pub fn try_start(tls: Option<ServerTls>) -> Result<Self, StartError> {
        Self::try_start_with(tls, &[])
    }

    fn try_start_with(tls: Option<ServerTls>, extra: &[&str]) -> Result<Self, StartError> {
        let extra: Vec<String> = extra.iter().map(|&flag| flag.to_owned()).collect();
        let binary = find_binary("etcd").ok_or(StartError::NotInstalled)?;
        // A free port can be taken again between our probe and etcd's bind (tests start
        // servers in parallel); etcd then exits, and the port we saw answer is another
        // test's. So an etcd that died right after listening is started again on new
        // ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let dir = tempfile::tempdir()?;
            let (client_port, peer_port) = (free_port()?, free_port()?);
            let endpoint = format!("127.0.0.1:{client_port}");
            let child = spawn(
                &binary,
                &endpoint,
                peer_port,
                dir.path(),
                tls.as_ref(),
                &extra,
            )?;
            let mut etcd = Self {
                child,
                binary: binary.clone(),
                tls: tls.clone(),
                extra: extra.clone(),
                endpoint,
                peer_port,
                dir,
            };
            etcd.wait_listening()?;
            std::thread::sleep(Duration::from_millis(200));
            match etcd.child.try_wait() {
                Ok(None) => return Ok(etcd),
                _ if attempt < 5 => continue,
                _ => {
                    return Err(StartError::Io(std::io::Error::other(
                        "etcd exited right after start five times (ports taken?)",
                    )))
                }
            }
        }
    }

    fn wait_listening(&self) -> Result<(), StartError> {
        let deadline = Instant::now() + LISTEN_WITHIN;
        while std::net::TcpStream::connect(&self.endpoint).is_err() {
            if Instant::now() >= deadline {
                return Err(StartError::NotListening {
                    endpoint: self.endpoint.clone(),
                    within: LISTEN_WITHIN,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The client endpoint, `127.0.0.1:port`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The server's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The binary that runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Kills the server (SIGKILL) and starts it again on the same ports and data dir.
    /// Panics if it does not come back (a test fixture).
    pub fn restart(&mut self, down_for: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down_for);
        let tls = self.tls.clone();
        self.child = spawn(
            &self.binary,
            &self.endpoint,
            self.peer_port,
            self.dir.path(),
            tls.as_ref(),
            &self.extra,
        )
        .unwrap_or_else(|e| panic!("restart etcd: {e}"));
        if let Err(error) = self.wait_listening() {
            panic!("{error}");
        }
    }

    /// Sends a signal (`STOP`, `CONT`) to the server by PID. Panics if `kill` fails.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("kill: {e}"));
        assert!(status.success(), "kill -{signal} failed");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // A stopped process is continued first, so nothing is left paused.
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
