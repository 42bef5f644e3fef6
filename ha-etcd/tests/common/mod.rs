//! A real etcd server for tests: its own free loopback ports and temp data dir, stopped by
//! PID when dropped. Without an `etcd` binary the tests fail when `CI` is set and say
//! loudly that they skipped otherwise.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ha_etcd::{EtcdBackend, EtcdConfig};

/// Server-side TLS files: etcd then serves clients over https and requires a client
/// certificate signed by the CA.
#[derive(Clone)]
pub struct ServerTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Etcd {
    child: Child,
    binary: String,
    tls: Option<ServerTls>,
    pub endpoint: String,
    pub peer_port: u16,
    pub dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

fn find(binary: &str) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(|dir| format!("{dir}/{binary}"))
        .find(|candidate| Path::new(candidate).is_file())
}

fn spawn(
    binary: &str,
    endpoint: &str,
    peer_port: u16,
    dir: &Path,
    tls: Option<&ServerTls>,
) -> Child {
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
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn etcd: {e}"))
}

impl Etcd {
    /// Starts etcd, or returns `None` (outside CI) when it is not installed.
    pub fn start() -> Option<Self> {
        Self::start_with(None)
    }

    /// Starts etcd serving clients over TLS with client certificates required.
    pub fn start_tls(tls: ServerTls) -> Option<Self> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<ServerTls>) -> Option<Self> {
        let Some(binary) = find("etcd") else {
            if std::env::var_os("CI").is_some() {
                panic!("etcd is not installed but CI is set: install etcd-server (scripts/test.sh does)");
            }
            eprintln!("SKIPPED: etcd is not installed; run ./scripts/test.sh to install it");
            return None;
        };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (client_port, peer_port) = (free_port(), free_port());
        let endpoint = format!("127.0.0.1:{client_port}");
        let child = spawn(&binary, &endpoint, peer_port, dir.path(), tls.as_ref());
        let etcd = Self {
            child,
            binary,
            tls,
            endpoint,
            peer_port,
            dir,
        };
        etcd.wait_listening();
        Some(etcd)
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&self.endpoint).is_err() {
            assert!(Instant::now() < deadline, "etcd did not listen within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and starts it again on the same ports and data dir.
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
        );
        self.wait_listening();
    }

    /// Sends a signal (`STOP`, `CONT`) to the server by PID.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("kill: {e}"));
        assert!(status.success(), "kill -{signal} failed");
    }

    /// A backend on this server under a prefix no other test uses.
    pub async fn backend(&self) -> ha_core::Result<EtcdBackend> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let prefix = format!(
            "ha-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        EtcdBackend::connect(EtcdConfig::new([self.endpoint.clone()]).with_prefix(prefix)).await
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
