//! The supervised command as a process group of its own: started with the role's
//! environment and a parent-death signal, signalled as a group, stopped with SIGTERM
//! then SIGKILL, and reaped with every process of its group before it counts as stopped.
//!
//! A parent-death signal reaches only the process it was set in, not what that process
//! starts. So beside the group runs a guard, `ha guard PGID` in a group of its own,
//! which gets SIGTERM when this process dies (blocked until it waits for it, so none is
//! missed during its start) and then SIGKILLs the whole group: a supervisor killed with
//! -9 takes its command's grandchildren with it too.

#![allow(unsafe_code)]

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::time::{sleep, timeout_at, Instant};

/// How the child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Ended {
    fn of(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Code(code),
            (None, Some(signal)) => Self::Signal(signal),
            (None, None) => Self::Code(1),
        }
    }

    /// The shell's convention: the code, or 128 + the signal.
    pub fn exit_code(self) -> u8 {
        let code = match self {
            Self::Code(code) => code,
            Self::Signal(signal) => 128 + signal,
        };
        u8::try_from(code.clamp(0, 255)).unwrap_or(1)
    }
}

/// The running child: the group leader, its group, and the group's guard.
pub struct Child {
    child: tokio::process::Child,
    pid: u32,
    ended: Option<Ended>,
    guard: Option<tokio::process::Child>,
    reaped: bool,
}

impl Child {
    /// Starts `argv` in a new process group, with `env` added, stdin closed and stdout and
    /// stderr inherited (stdout onto our stderr with `stdout_to_stderr`, so that our own
    /// stdout carries only event lines). It gets SIGKILL if this process dies first
    /// (PR_SET_PDEATHSIG): a supervisor killed with -9 takes its child with it.
    pub fn spawn(
        argv: &[String],
        env: &[(&str, String)],
        stdout_to_stderr: bool,
    ) -> io::Result<Self> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no command"))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .process_group(0);
        if stdout_to_stderr {
            use std::os::fd::AsFd;
            command.stdout(Stdio::from(std::io::stderr().as_fd().try_clone_to_owned()?));
        }
        on_parent_death(&mut command, Signal::SIGKILL, false);
        let child = command.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("the child exited at once"))?;
        let mut started = Self {
            child,
            pid,
            ended: None,
            guard: None,
            reaped: false,
        };
        // This very binary, even if the file was replaced since (an upgrade).
        let mut guard = Command::new("/proc/self/exe");
        guard
            .arg0("ha")
            .args(["guard", &pid.to_string(), &std::process::id().to_string()])
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        on_parent_death(&mut guard, Signal::SIGTERM, true);
        match guard.spawn() {
            Ok(guard) => started.guard = Some(guard),
            Err(error) => {
                // Without its guard the group could outlive us: not started, then.
                started.signal(Signal::SIGKILL);
                return Err(io::Error::other(format!("cannot start its guard: {error}")));
            }
        }
        Ok(started)
    }

    /// The group leader's PID (also the group's id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn group(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX))
    }

    /// Sends `signal` to every process of the group.
    pub fn signal(&self, signal: Signal) {
        // ESRCH: the group is gone already.
        let _ = killpg(self.group(), signal);
    }

    /// Resolves when the group leader exits (cancel-safe; it is reaped).
    pub async fn exited(&mut self) -> Ended {
        if let Some(ended) = self.ended {
            return ended;
        }
        let ended = match self.child.wait().await {
            Ok(status) => Ended::of(status),
            Err(_) => Ended::Code(1),
        };
        self.ended = Some(ended);
        ended
    }

    /// Stops the group: SIGTERM to all (reported only while the leader runs; after it
    /// exited, only what it left behind is stopped), SIGKILL to all at `kill_at` if
    /// anything is still there, and every process of the group reaped. Returns how the
    /// leader ended; each signal sent to the group goes to `report` as it is sent.
    pub async fn stop(&mut self, kill_at: Instant, mut report: impl FnMut(Signal)) -> Ended {
        if self.ended.is_none() {
            report(Signal::SIGTERM);
        }
        self.signal(Signal::SIGTERM);
        let leader = timeout_at(kill_at, self.exited()).await;
        let group_gone = leader.is_ok() && timeout_at(kill_at, self.reap_group()).await.is_ok();
        if !group_gone {
            report(Signal::SIGKILL);
            self.signal(Signal::SIGKILL);
        }
        // After SIGKILL the leader is gone within moments; one stuck in the kernel
        // (uninterruptible I/O) is reported as killed rather than waited for forever.
        let ended = match tokio::time::timeout(Duration::from_secs(5), self.exited()).await {
            Ok(ended) => ended,
            Err(_) => {
                tracing::error!(pid = self.pid, "the command did not exit 5 s after SIGKILL");
                Ended::Signal(Signal::SIGKILL as i32)
            }
        };
        // After SIGKILL the group is gone within moments; bounded all the same.
        self.reaped = tokio::time::timeout(Duration::from_secs(5), self.reap_group())
            .await
            .is_ok();
        if let Some(mut guard) = self.guard.take() {
            let _ = guard.kill().await;
        }
        ended
    }

    /// Waits until no process of the group is left. Call it once the leader is reaped:
    /// this process is the child subreaper, so what the child left behind comes to us
    /// and is reaped here too.
    async fn reap_group(&self) {
        let group = Pid::from_raw(-self.group().as_raw());
        loop {
            match waitpid(group, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(_) => continue,
                // None of ours left in it; one whose parent still lives is not ours yet.
                Err(Errno::ECHILD) if killpg(self.group(), None).is_err() => return,
                Err(_) => {}
            }
            sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // Dropped before a stop finished (the runtime gave up waiting): nothing of the
        // group may run on.
        if !self.reaped {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// `signal` for the process `command` starts when this process dies (PR_SET_PDEATHSIG),
/// and with `blocked` that signal blocked in it, so it stays pending until the process
/// waits for it. The kernel ties it to the spawning thread: spawn from a runtime worker
/// (they live as long as the runtime), never from a blocking-pool thread that may exit.
fn on_parent_death(command: &mut Command, signal: Signal, blocked: bool) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2),
    // sigprocmask(2) and getppid(2), all async-signal-safe; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if blocked {
                let mut set = nix::sys::signal::SigSet::empty();
                set.add(signal);
                nix::sys::signal::sigprocmask(
                    nix::sys::signal::SigmaskHow::SIG_BLOCK,
                    Some(&set),
                    None,
                )?;
            }
            nix::sys::prctl::set_pdeathsig(signal)?;
            // The parent may have died between fork and prctl: then no signal comes.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::other("the supervisor died during the start"));
            }
            Ok(())
        });
    }
}

/// `ha guard PGID PARENT`: waits for the SIGTERM its parent's death sends (blocked since
/// its start), then SIGKILLs group `PGID`. A SIGTERM while `PARENT` still lives (`pkill
/// ha`, a service manager signalling everything) is not that, and is ignored: the
/// parent stops the group itself, with its grace, and then kills the guard.
pub fn guard(group: i32, parent: i32) -> std::process::ExitCode {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(Signal::SIGTERM);
    if set.thread_block().is_err() {
        return std::process::ExitCode::FAILURE;
    }
    loop {
        if set.wait().is_err() {
            return std::process::ExitCode::FAILURE;
        }
        if nix::unistd::getppid().as_raw() != parent {
            break;
        }
    }
    let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
    std::process::ExitCode::SUCCESS
}

/// Makes this process the reaper of its orphaned descendants, so the processes a child
/// leaves behind can be waited for (and none outlives a stop unseen).
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Whether `program` can be started: a path to an executable file, or a name found as one
/// on `PATH`. Checked before registering, so a typo fails at once (exit 2).
pub fn check_executable(program: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &std::path::Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = std::path::Path::new(program);
        return if !path.exists() {
            Err(format!("{program}: no such file"))
        } else if executable(path) {
            Ok(())
        } else {
            Err(format!("{program}: not an executable file"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| executable(&dir.join(program))) {
        Ok(())
    } else {
        Err(format!("{program}: command not found on PATH"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(Ended::Code(7).exit_code(), 7);
        assert_eq!(Ended::Signal(9).exit_code(), 137);
        assert_eq!(Ended::Code(300).exit_code(), 255);
    }

    #[test]
    fn missing_and_non_executable_commands_are_named() {
        assert!(check_executable("sh").is_ok());
        assert!(check_executable("/bin/sh").is_ok());
        let missing = check_executable("no-such-command-here");
        assert!(missing.is_err_and(|e| e.contains("not found on PATH")));
        let dir = std::env::temp_dir();
        let not_exec = check_executable(&dir.display().to_string());
        assert!(not_exec.is_err_and(|e| e.contains("not an executable")));
    }
}
