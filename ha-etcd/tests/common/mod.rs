//! A real etcd server for tests: its own free loopback ports and temp data dir, stopped by
//! PID when dropped. Without an `etcd` binary the tests fail when `CI` is set and say
//! loudly that they skipped otherwise.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ha_etcd::{EtcdBackend, EtcdConfig};

pub struct Etcd {
    child: Child,
    binary: String,
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
        .find(|candidate| std::path::Path::new(candidate).is_file())
}

fn spawn(binary: &str, endpoint: &str, peer_port: u16, dir: &std::path::Path) -> Child {
    let peer = format!("http://127.0.0.1:{peer_port}");
    Command::new(binary)
        .arg("--name=ha-test")
        .arg(format!("--data-dir={}", dir.display()))
        .arg(format!("--listen-client-urls=http://{endpoint}"))
        .arg(format!("--advertise-client-urls=http://{endpoint}"))
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
        let child = spawn(&binary, &endpoint, peer_port, dir.path());
        let etcd = Self {
            child,
            binary,
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
        self.child = spawn(
            &self.binary,
            &self.endpoint,
            self.peer_port,
            self.dir.path(),
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
        // A stopped process must be continued to die cleanly under SIGKILL's reaping.
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
