//! Real processes under test, known by an id: each one's stdout lines (JSON events, as
//! `ha --json` and the examples print them) collected in one log in arrival order, the
//! tail of its stderr kept, signals sent by PID, and every one stopped by PID: by
//! [`Processes::stop_all`], or by the drop (SIGKILL) when a test panics.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub use rustix::process::Signal;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

use crate::ports::unix_us;

/// Lines kept in the log; older ones are dropped (a test that waits reads them long
/// before). Bounds memory when a process prints for a long run and nobody waits.
const MAX_LINES: usize = 200_000;
/// The stderr kept per process: enough to say why it stopped.
const STDERR_TAIL: usize = 32 * 1024;

/// One stdout line of a process.
#[derive(Debug, Clone)]
pub struct Line {
    /// The id the process was started under.
    pub from: u64,
    /// Which start of process `from` printed it: 1 for the first, 2 after a restart...
    pub run: u32,
    /// When this process read it.
    pub seen: Instant,
    /// The line parsed as JSON; `Null` if it is not JSON.
    pub json: Value,
    /// The line as printed.
    pub text: String,
}

impl Line {
    /// Its `event` field ("" if none).
    pub fn event(&self) -> &str {
        self.json["event"].as_str().unwrap_or("")
    }

    /// Whether its `event` is `event`.
    pub fn is(&self, event: &str) -> bool {
        self.event() == event
    }

    /// A numeric field, if it has one.
    pub fn number(&self, field: &str) -> Option<u64> {
        self.json[field].as_u64()
    }

    /// Its fencing token; 0 (never a token) if it has none.
    pub fn token(&self) -> u64 {
        self.number("token").unwrap_or(0)
    }

    /// When the process printed it (`at_unix_us`); 0 if the line does not say.
    pub fn at_unix_us(&self) -> u64 {
        self.number("at_unix_us").unwrap_or(0)
    }
}

/// A wait that saw no matching line in time, with what it did see.
#[derive(Debug)]
pub struct WaitError {
    what: String,
    within: Duration,
    recent: Vec<String>,
    stderr: Vec<(u64, String)>,
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "no {} within {:?}; the last lines:",
            self.what, self.within
        )?;
        for line in &self.recent {
            writeln!(f, "  {line}")?;
        }
        for (id, tail) in &self.stderr {
            if !tail.is_empty() {
                writeln!(f, "stderr of {id} (tail):\n{tail}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for WaitError {}

#[derive(Default)]
struct Log {
    /// The absolute index of `lines[0]` (lines before it were dropped).
    first: usize,
    lines: VecDeque<Line>,
}

struct Running {
    child: Child,
}

/// The processes of one test (or benchmark scenario) and everything they printed.
pub struct Processes {
    running: BTreeMap<u64, Running>,
    /// How often each id was started.
    runs: BTreeMap<u64, u32>,
    /// The stderr tail of each id's last run, kept after it exits.
    stderr: BTreeMap<u64, Arc<Mutex<String>>>,
    log: Arc<Mutex<Log>>,
    arrived: Arc<Notify>,
    /// The absolute index of the next line [`Processes::next`] returns.
    cursor: usize,
    echo_stderr: bool,
}

impl Default for Processes {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Processes {
    /// None yet.
    pub fn new() -> Self {
        Self {
            running: BTreeMap::new(),
            runs: BTreeMap::new(),
            stderr: BTreeMap::new(),
            log: Arc::default(),
            arrived: Arc::new(Notify::new()),
            cursor: 0,
            echo_stderr: false,
        }
    }

    /// Also print every stderr line of processes started from now on (prefixed with
    /// their id), for tests whose failures the processes' logs explain.
    pub fn echo_stderr(&mut self, echo: bool) {
        self.echo_stderr = echo;
    }

    /// Starts `command` as process `id`, with stdin closed and stdout and stderr read
    /// here; returns its PID. An id whose process runs is refused; one that exited can
    /// be started again (its lines stay in the log).
    pub fn spawn(&mut self, id: u64, mut command: Command) -> io::Result<u32> {
        if self.running.contains_key(&id) {
            return Err(io::Error::other(format!("process {id} is already running")));
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other(format!("process {id} exited at once")))?;
        let run = self.runs.entry(id).or_default();
        *run += 1;
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(read_stdout(
                (id, *run),
                stdout,
                Arc::clone(&self.log),
                Arc::clone(&self.arrived),
            ));
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(err) = child.stderr.take() {
            tokio::spawn(read_stderr(id, err, Arc::clone(&stderr), self.echo_stderr));
        }
        self.stderr.insert(id, stderr);
        self.running.insert(id, Running { child });
        Ok(pid)
    }

    /// The ids of the processes started and not yet reaped.
    pub fn ids(&self) -> Vec<u64> {
        self.running.keys().copied().collect()
    }

    /// The PID of process `id`, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.running.get(&id).and_then(|r| r.child.id())
    }

    /// The last 32 KiB of what process `id` wrote to stderr in its last run (also after
    /// it exited; what it wrote last may take a moment to arrive).
    pub fn stderr_tail(&self, id: u64) -> String {
        self.stderr
            .get(&id)
            .map(|tail| lock(tail).clone())
            .unwrap_or_default()
    }

    /// Sends `signal` to process `id`; returns the unix time (µs) just before sending,
    /// where a measured gap starts.
    pub fn signal(&self, id: u64, signal: Signal) -> io::Result<u64> {
        let pid = self
            .pid(id)
            .ok_or_else(|| io::Error::other(format!("process {id} is not running")))?;
        let at = unix_us();
        signal_pid(pid, signal)?;
        Ok(at)
    }

    /// The next line after the last one returned (by this or by a wait), if one arrives
    /// within `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Line> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Registered before looking, so a line that lands in between still wakes us.
            let notify = Arc::clone(&self.arrived);
            let arrived = notify.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(line) = self.take_next() {
                return Some(line);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.take_next();
            }
        }
    }

    fn take_next(&mut self) -> Option<Line> {
        let log = lock(&self.log);
        self.cursor = self.cursor.max(log.first);
        let line = log.lines.get(self.cursor - log.first).cloned()?;
        self.cursor += 1;
        Some(line)
    }

    /// Reads lines in order until one matches `pred` (returned), for at most `within`.
    pub async fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        mut pred: impl FnMut(&Line) -> bool,
    ) -> Result<Line, WaitError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(line) if pred(&line) => return Ok(line),
                Some(_) => {}
                None => return Err(self.wait_error(what, within)),
            }
        }
    }

    /// [`Processes::wait_for`] for tests.
    ///
    /// # Panics
    /// With the last lines and the stderr tails, when no line matches in time.
    pub async fn expect(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl FnMut(&Line) -> bool,
    ) -> Line {
        match self.wait_for(what, within, pred).await {
            Ok(line) => line,
            Err(error) => panic!("{error}"),
        }
    }

    fn wait_error(&self, what: &str, within: Duration) -> WaitError {
        let recent = {
            let log = lock(&self.log);
            let skip = log.lines.len().saturating_sub(40);
            log.lines
                .iter()
                .skip(skip)
                .map(|l| format!("{}: {}", l.from, l.text))
                .collect()
        };
        WaitError {
            what: what.to_owned(),
            within,
            recent,
            stderr: self
                .stderr
                .keys()
                .map(|id| (*id, self.stderr_tail(*id)))
                .collect(),
        }
    }

    /// Every line still in the log, oldest first (whether or not a wait read it).
    pub fn lines(&self) -> Vec<Line> {
        lock(&self.log).lines.iter().cloned().collect()
    }

    /// The newest line of process `id`'s last run that matches `pred`.
    pub fn last(&self, id: u64, pred: impl Fn(&Line) -> bool) -> Option<Line> {
        let run = self.runs.get(&id).copied()?;
        lock(&self.log)
            .lines
            .iter()
            .rev()
            .find(|l| l.from == id && l.run == run && pred(l))
            .cloned()
    }

    /// Whether process `id` has exited, without waiting: its status if so (it is then
    /// reaped and its lines and stderr tail stay).
    pub fn try_exit(&mut self, id: u64) -> io::Result<Option<ExitStatus>> {
        let running = self
            .running
            .get_mut(&id)
            .ok_or_else(|| io::Error::other(format!("no process {id}")))?;
        let status = running.child.try_wait()?;
        if status.is_some() {
            self.running.remove(&id);
        }
        Ok(status)
    }

    /// Waits up to `within` for process `id` to exit and reaps it; SIGKILLs and reaps it
    /// and says so (`TimedOut`) if it does not.
    pub async fn wait_exit(&mut self, id: u64, within: Duration) -> io::Result<ExitStatus> {
        let mut running = self
            .running
            .remove(&id)
            .ok_or_else(|| io::Error::other(format!("no process {id}")))?;
        match tokio::time::timeout(within, running.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                let _ = running.child.kill().await;
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("process {id} did not exit within {within:?}"),
                ))
            }
        }
    }

    /// SIGKILL process `id`, then reap it.
    pub async fn kill(&mut self, id: u64) {
        if let Some(mut running) = self.running.remove(&id) {
            let _ = running.child.kill().await;
        }
    }

    /// SIGCONT and SIGTERM to process `id` (a stopped process gets the TERM too), then
    /// SIGKILL if it is still running after `grace`; reaped either way.
    pub async fn stop(&mut self, id: u64, grace: Duration) {
        let _ = self.signal(id, Signal::CONT);
        let _ = self.signal(id, Signal::TERM);
        let _ = self.wait_exit(id, grace).await;
    }

    /// [`Processes::stop`] for every process at once: a group shut down one by one
    /// loses its quorum before the last member has stopped.
    pub async fn stop_all(&mut self, grace: Duration) {
        for id in self.ids() {
            let _ = self.signal(id, Signal::CONT);
            let _ = self.signal(id, Signal::TERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        for id in self.ids() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let _ = self.wait_exit(id, left).await;
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for running in self.running.values_mut() {
            // kill_on_drop would too; saying it here makes the order explicit.
            let _ = running.child.start_kill();
        }
    }
}

/// Sends `signal` to process `pid`.
pub fn signal_pid(pid: u32, signal: Signal) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::other(format!("{pid} is not a process id")))?;
    rustix::process::kill_process(pid, signal).map_err(io::Error::from)
}

async fn read_stdout(
    (id, run): (u64, u32),
    stdout: impl AsyncRead + Unpin,
    log: Arc<Mutex<Log>>,
    arrived: Arc<Notify>,
) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(text)) = lines.next_line().await {
        let line = Line {
            from: id,
            run,
            seen: Instant::now(),
            json: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        };
        {
            let mut log = lock(&log);
            log.lines.push_back(line);
            if log.lines.len() > MAX_LINES {
                log.lines.pop_front();
                log.first += 1;
            }
        }
        arrived.notify_waiters();
    }
}

async fn read_stderr(
    id: u64,
    stderr: impl AsyncRead + Unpin,
    tail: Arc<Mutex<String>>,
    echo: bool,
) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if echo {
            eprintln!("[{id}] {line}");
        }
        let mut tail = lock(&tail);
        tail.push_str(&line);
        tail.push('\n');
        if tail.len() > 2 * STDERR_TAIL {
            let cut = tail.len() - STDERR_TAIL;
            let cut = (cut..tail.len())
                .find(|i| tail.is_char_boundary(*i))
                .unwrap_or(0);
            tail.drain(..cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[tokio::test]
    async fn lines_arrive_in_order_and_waits_see_each_once() {
        let mut procs = Processes::new();
        procs
            .spawn(
                1,
                sh(r#"echo '{"event":"a","token":3}'; echo not json; echo '{"event":"b"}'"#),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let a = procs
            .expect("a", Duration::from_secs(10), |l| l.is("a"))
            .await;
        assert_eq!((a.from, a.token()), (1, 3));
        let next = procs.next(Duration::from_secs(10)).await;
        assert_eq!(
            next.map(|l| (l.json.is_null(), l.text)),
            Some((true, "not json".into()))
        );
        procs
            .expect("b", Duration::from_secs(10), |l| l.is("b"))
            .await;
        let none = procs
            .wait_for("c", Duration::from_millis(200), |l| l.is("c"))
            .await;
        let error = none.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            error.contains("no c within") && error.contains("1: not json"),
            "{error}"
        );
        let status = procs.wait_exit(1, Duration::from_secs(10)).await;
        assert!(status.is_ok_and(|s| s.success()));
    }

    #[tokio::test]
    async fn a_restart_is_a_new_run_and_the_last_run_keeps_its_stderr() {
        let mut procs = Processes::new();
        let script = r#"echo '{"event":"up"}'; echo gone >&2"#;
        assert!(procs.spawn(1, sh(script)).is_ok());
        procs
            .expect("up", Duration::from_secs(10), |l| l.is("up"))
            .await;
        let exited = procs.wait_exit(1, Duration::from_secs(10)).await;
        assert!(exited.is_ok_and(|s| s.success()));
        assert_eq!(procs.last(1, |l| l.is("up")).map(|l| l.run), Some(1));
        assert!(procs.spawn(1, sh("exec sleep 30")).is_ok());
        assert!(
            procs.last(1, |l| l.is("up")).is_none(),
            "a line of the first run"
        );
        assert_eq!(procs.lines().len(), 1, "the log keeps every run's lines");
        assert!(matches!(procs.try_exit(1), Ok(None)));
        procs.kill(1).await;
        assert!(procs.try_exit(1).is_err(), "a reaped process is gone");
        assert!(procs.spawn(1, sh("echo last >&2; exit 3")).is_ok());
        let mut status = None;
        for _ in 0..200 {
            status = procs.try_exit(1).unwrap_or(None);
            if status.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(status.and_then(|s| s.code()), Some(3));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(procs.stderr_tail(1), "last\n");
    }

    #[tokio::test]
    async fn stop_all_terms_then_kills_what_ignores_it_and_keeps_stderr() {
        let mut procs = Processes::new();
        let polite = procs.spawn(1, sh("echo bye >&2; exec sleep 30"));
        let stubborn = procs.spawn(2, sh("trap '' TERM; echo ready; while :; do sleep 1; done"));
        assert!(polite.is_ok() && stubborn.is_ok());
        procs
            .expect("ready", Duration::from_secs(10), |l| l.text == "ready")
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(procs.stderr_tail(1), "bye\n");
        let started = Instant::now();
        procs.stop_all(Duration::from_millis(500)).await;
        assert!(procs.ids().is_empty());
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            procs.signal(1, Signal::TERM).is_err(),
            "a reaped process has no PID"
        );
    }
}
