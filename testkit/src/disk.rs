//! A size-limited disk for a test: a tmpfs mounted in a mount namespace of its own,
//! which a sleeping holder process keeps alive. Programs started through
//! [`SmallDisk::command`] see the tmpfs at [`SmallDisk::mount_point`]; the machine's own
//! mount table never holds it, and it goes away with the holder, which `Drop` kills by
//! PID, so a failed test leaves nothing mounted. The test process itself reaches the
//! files through `/proc/<holder>/root` (a multithreaded process cannot enter a mount
//! namespace).
//!
//! Needs root (CI runs as root) and util-linux (`unshare`, `nsenter`, `mount`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::LabError;

/// A tmpfs of a fixed size in a private mount namespace.
#[derive(Debug)]
pub struct SmallDisk {
    holder: Child,
    mount_point: PathBuf,
    // The empty directory the tmpfs covers inside the namespace.
    _under: tempfile::TempDir,
}

const FILLER: &str = "filler";

fn run(command: &mut Command) -> Result<(), LabError> {
    let shown = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError(format!("{shown}: {e} (is util-linux installed?)")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(LabError(format!(
            "{shown}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

impl SmallDisk {
    /// Mounts a tmpfs of `bytes` bytes in a new mount namespace.
    ///
    /// # Errors
    /// When the namespace or the mount cannot be made (not root); nothing is left behind.
    pub fn new(bytes: u64) -> Result<Self, LabError> {
        let under = tempfile::tempdir().map_err(|e| LabError(format!("temp dir: {e}")))?;
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| LabError(format!("unshare: {e} (is util-linux installed?)")))?;
        let mut disk = Self {
            holder,
            mount_point: under.path().to_path_buf(),
            _under: under,
        };
        disk.wait_for_namespace()?;
        let size = format!("size={bytes},mode=0700");
        run(disk
            .command("mount")
            .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
            .arg(&disk.mount_point))?;
        Ok(disk)
    }

    /// `unshare` execs `sleep` once the namespace exists; until then the holder's mount
    /// namespace is still the machine's, and a mount there would be global.
    fn wait_for_namespace(&mut self) -> Result<(), LabError> {
        let ours = std::fs::read_link("/proc/self/ns/mnt")
            .map_err(|e| LabError(format!("/proc/self/ns/mnt: {e}")))?;
        let theirs = format!("/proc/{}/ns/mnt", self.holder.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(status)) = self.holder.try_wait() {
                return Err(LabError(format!(
                    "unshare --mount exited ({status}): cannot make a mount namespace (not root?)"
                )));
            }
            let exec_done = std::fs::read_to_string(format!("/proc/{}/comm", self.holder.id()))
                .is_ok_and(|comm| comm.trim() == "sleep");
            if exec_done && std::fs::read_link(&theirs).is_ok_and(|ns| ns != ours) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError(
                    "unshare --mount made no namespace within 5 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Where the tmpfs is mounted, as programs from [`command`](Self::command) see it.
    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// The tmpfs as this process reaches it, through the holder's root.
    pub fn seen_from_here(&self) -> PathBuf {
        let relative = self
            .mount_point
            .strip_prefix("/")
            .unwrap_or(&self.mount_point);
        Path::new("/proc")
            .join(self.holder.id().to_string())
            .join("root")
            .join(relative)
    }

    /// A command that runs `program` inside the namespace. `nsenter` execs the program
    /// (no fork without a PID namespace), so the child's PID is the program's.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args(["--target", &self.holder.id().to_string(), "--mount", "--"])
            .arg(program);
        command
    }

    /// The same for tokio.
    pub fn tokio_command(&self, program: &str) -> tokio::process::Command {
        tokio::process::Command::from(self.command(program))
    }

    /// Free bytes on the tmpfs.
    ///
    /// # Errors
    /// When the file system cannot be read.
    pub fn free(&self) -> Result<u64, LabError> {
        let path = self.seen_from_here();
        let stat = rustix::fs::statvfs(&path)
            .map_err(|e| LabError(format!("statvfs {}: {e}", path.display())))?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Writes a filler file until at most `leave` bytes are free.
    ///
    /// # Errors
    /// When the filler cannot be written (other than by running out of space).
    pub fn fill(&self, leave: u64) -> Result<(), LabError> {
        let path = self.seen_from_here().join(FILLER);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| LabError(format!("{}: {e}", path.display())))?;
        let chunk = vec![0xa5_u8; 64 * 1024];
        loop {
            let free = self.free()?;
            if free <= leave {
                return Ok(());
            }
            let n = usize::try_from(free - leave).map_or(chunk.len(), |n| n.min(chunk.len()));
            match file.write_all(&chunk[..n]) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) => {
                    return Ok(())
                }
                Err(e) => return Err(LabError(format!("{}: {e}", path.display()))),
            }
        }
    }

    /// Removes the filler, freeing what [`fill`](Self::fill) took.
    ///
    /// # Errors
    /// When it cannot be removed.
    pub fn unfill(&self) -> Result<(), LabError> {
        let path = self.seen_from_here().join(FILLER);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(LabError(format!("{}: {e}", path.display()))),
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // The namespace, and the tmpfs with it, ends when its last process does; the
        // programs started in it are the test's to stop.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Makes a small disk for a test, or returns `None` (outside CI, with a loud message)
/// when this machine cannot make mount namespaces. Panics under `CI`: a test must never
/// skip silently.
pub fn small_disk_for_test(bytes: u64) -> Option<SmallDisk> {
    match SmallDisk::new(bytes) {
        Ok(disk) => Some(disk),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: cannot make a size-limited tmpfs ({e}); run as root");
            None
        }
        Err(e) => panic!("cannot make a size-limited tmpfs under CI: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_refuses_writes_until_it_is_unfilled_and_leaves_no_mount() {
        let Some(disk) = small_disk_for_test(4 * 1024 * 1024) else {
            return;
        };
        let total = disk.free().unwrap_or_else(|e| panic!("{e}"));
        assert!(total <= 4 * 1024 * 1024, "the tmpfs is {total} bytes");
        disk.fill(0).unwrap_or_else(|e| panic!("{e}"));
        let file = disk.seen_from_here().join("more");
        let written = std::fs::write(&file, vec![1_u8; 64 * 1024]);
        assert_eq!(
            written.map_err(|e| e.raw_os_error()),
            Err(Some(rustix::io::Errno::NOSPC.raw_os_error())),
            "a full tmpfs accepted a write"
        );
        disk.unfill().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&file, vec![1_u8; 64 * 1024]).unwrap_or_else(|e| panic!("{e}"));
        // Programs in the namespace see the same files.
        let listed = disk
            .command("ls")
            .arg(disk.mount_point())
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(String::from_utf8_lossy(&listed.stdout).contains("more"));
        let mount_point = disk.mount_point().to_path_buf();
        assert!(
            !std::fs::read_to_string("/proc/self/mounts")
                .unwrap_or_default()
                .contains(&mount_point.display().to_string()),
            "the tmpfs shows in this process's mount table"
        );
        drop(disk);
        assert!(!mount_point.exists(), "the mount point was left behind");
    }
}
