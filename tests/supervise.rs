//! `ha run -- CMD` and `ha node --active-standby -- CMD` as users run them: real
//! supervisor processes on three `ha node` members (raft) and on a real etcd, each
//! supervising `sh` children that append "server token unix-ns" lines to one file.
//! The old ACTIVE's command must have stopped before the next one's starts: every
//! token's lines end before the next token's begin. Plus signals, grandchildren, exit
//! codes, --recampaign, --timeout, a supervisor cut off from its backend (a proxy that
//! drops its traffic), a command that ignores SIGTERM, and bad input. Every process is
//! stopped by PID.

#![cfg(all(feature = "cli", feature = "raft"))]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ha_testkit::{free_ports, Fault, Line, Processes, Proxy, Signal};
use tokio::process::Command;
use tokio::time::sleep;

const HA: &str = env!("CARGO_BIN_EXE_ha");
const TTL: &str = "2s";
const SECONDS: Duration = Duration::from_secs(1);

/// A command that appends a line every 20 ms; with `grandchild`, it first starts a
/// `sleep` in its group (which a parent-death signal on the command would not reach).
fn writer(log: &Path, grandchild: bool) -> Vec<String> {
    let spawn = if grandchild { "sleep 1000 & " } else { "" };
    let script = format!(
        "{spawn}while :; do echo \"$HA_SERVER_ID $HA_FENCING_TOKEN $(date +%s%N)\" >> {}; sleep 0.02; done",
        log.display()
    );
    vec!["sh".into(), "-c".into(), script]
}

/// `ha ARGS -- CMD` as process `id` of `procs`.
fn start(procs: &mut Processes, id: u64, args: &[String], cmd: &[String]) {
    let mut command = Command::new(HA);
    command
        .args(args)
        .arg("--")
        .args(cmd)
        .env("RUST_LOG", "warn,openraft=off,sled=off");
    procs
        .spawn(id, command)
        .unwrap_or_else(|e| panic!("spawn ha {args:?}: {e}"));
}

fn run_args(backend: &str, id: u64, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["run", "--backend", backend, "--role", "sup", "--ttl", TTL]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--id".into(), id.to_string(), "--json".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Whether any live process (not a zombie) is in process group `group`.
fn group_alive(group: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // Fields after the command name: state, ppid, pgrp, ...
        let Some(after) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
            return false;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        fields.first() != Some(&"Z") && fields.get(2) == Some(&group.to_string().as_str())
    })
}

async fn wait_group_gone(group: u32, within: Duration) {
    let deadline = Instant::now() + within;
    while group_alive(group) {
        assert!(
            Instant::now() < deadline,
            "process group {group} still runs {within:?} later"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// The lines of the log: (server, token, unix ns).
fn log_lines(log: &Path) -> Vec<(u64, u64, u128)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            Some((
                parts.next()?.parse().ok()?,
                parts.next()?.parse().ok()?,
                parts.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// Every token's lines end before the next token's begin; returns the tokens in order.
fn assert_one_at_a_time(log: &Path) -> Vec<u64> {
    let mut spans: BTreeMap<u64, (u64, u128, u128)> = BTreeMap::new();
    for (server, token, at) in log_lines(log) {
        let span = spans.entry(token).or_insert((server, at, at));
        assert_eq!(span.0, server, "token {token} written by two servers");
        span.1 = span.1.min(at);
        span.2 = span.2.max(at);
    }
    let spans: Vec<_> = spans.into_iter().collect();
    for pair in spans.windows(2) {
        let ((t1, (s1, _, last)), (t2, (s2, first, _))) = (pair[0], pair[1]);
        assert!(
            last < first,
            "the command of token {t1} (server {s1}) wrote {} ms after the command of token {t2} (server {s2}) started",
            (last - first) / 1_000_000
        );
    }
    spans.iter().map(|(token, _)| *token).collect()
}

async fn started(procs: &mut Processes, what: &str, pred: impl Fn(&Line) -> bool) -> Line {
    procs
        .expect(what, Duration::from_secs(30), |l| {
            l.is("child_started") && pred(l)
        })
        .await
}

fn pid(line: &Line) -> u32 {
    line.number("pid")
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("no pid in {}", line.text))
}

/// Three supervisors on `backend(id)`: SIGKILL of the ACTIVE's supervisor takes its
/// command and grandchild with it at once; SIGTERM of the next reaches its command,
/// which stops, and the third takes over at once; the supervisor exits 0.
async fn kill_then_term(backend: impl Fn(u64) -> String, log: &Path) {
    let mut procs = Processes::new();
    procs.echo_stderr(true);
    for id in 1..=3 {
        start(
            &mut procs,
            id,
            &run_args(&backend(id), id, &["--kill-grace", "500ms"]),
            &writer(log, true),
        );
    }
    let first = started(&mut procs, "a first command", |_| true).await;
    wait_for_line(log, first.token()).await;
    procs
        .signal(first.from, Signal::KILL)
        .unwrap_or_else(|e| panic!("{e}"));
    // The parent-death signal and the guard: command and grandchild go at once.
    wait_group_gone(pid(&first), 2 * SECONDS).await;
    let _ = procs.wait_exit(first.from, 10 * SECONDS).await;
    let second = started(&mut procs, "the next command", |l| l.from != first.from).await;
    assert!(second.token() > first.token());
    wait_for_line(log, second.token()).await;

    let termed = Instant::now();
    procs
        .signal(second.from, Signal::TERM)
        .unwrap_or_else(|e| panic!("{e}"));
    let stopping = procs
        .expect("SIGTERM to the command", 10 * SECONDS, |l| {
            l.is("child_stopping") && l.from == second.from
        })
        .await;
    assert_eq!(stopping.json["signal"], "SIGTERM");
    let third = started(&mut procs, "the third command", |l| {
        l.from != first.from && l.from != second.from
    })
    .await;
    let handover = termed.elapsed();
    eprintln!("SIGTERM to the next command's start: {handover:?}");
    assert!(handover < 5 * SECONDS, "handover took {handover:?}");
    assert!(third.token() > second.token());
    let status = procs.wait_exit(second.from, 10 * SECONDS).await;
    assert!(
        status.is_ok_and(|s| s.success()),
        "SIGTERM must end in exit 0"
    );
    assert!(
        !group_alive(pid(&second)),
        "the command left a process behind"
    );
    wait_for_line(log, third.token()).await;
    procs.stop_all(10 * SECONDS).await;
    wait_group_gone(pid(&third), 2 * SECONDS).await;
    let tokens = assert_one_at_a_time(log);
    assert!(tokens.len() >= 3, "tokens seen: {tokens:?}");
}

/// Waits (bounded) until the command of `token` has written a line.
async fn wait_for_line(log: &Path, token: u64) {
    let deadline = Instant::now() + 10 * SECONDS;
    while !log_lines(log).iter().any(|(_, t, _)| *t == token) {
        assert!(
            Instant::now() < deadline,
            "the command of token {token} wrote nothing"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// Three bare `ha node` members; their `raft://` endpoints.
fn raft_members(procs: &mut Processes, dir: &Path) -> Vec<String> {
    let ports = free_ports(3);
    let peers: Vec<String> = (1..=3)
        .zip(&ports)
        .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
        .collect();
    for (id, port) in (1..=3u64).zip(&ports) {
        let mut command = Command::new(HA);
        command
            .args(["node", "--id", &id.to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--peers", &peers.join(",")])
            .arg("--data")
            .arg(dir.join(format!("node-{id}")))
            .env("RUST_LOG", "error");
        procs
            .spawn(100 + id, command)
            .unwrap_or_else(|e| panic!("spawn ha node: {e}"));
    }
    ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_supervisors_stop_each_command_before_the_next_starts() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut members = Processes::new();
    let endpoints = raft_members(&mut members, dir.path());
    let log = dir.path().join("log");
    kill_then_term(
        |id| format!("raft://{}", endpoints[(id as usize - 1) % 3]),
        &log,
    )
    .await;
    members.stop_all(10 * SECONDS).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_supervisors_stop_each_command_before_the_next_starts() {
    let Some(etcd) = ha_testkit::etcd::Etcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("log");
    let url = format!("etcd://{}/sup-{}", etcd.endpoint, std::process::id());
    kill_then_term(|_| url.clone(), &log).await;
}

/// Each `ha node --active-standby -- CMD` runs its member and its command: SIGKILL of the
/// process hosting the ACTIVE takes its command with it, and the next command starts
/// after it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_a_command_hand_it_over_when_the_active_is_killed() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("log");
    let ports = free_ports(3);
    let peers: Vec<String> = (1..=3)
        .zip(&ports)
        .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
        .collect();
    let mut procs = Processes::new();
    procs.echo_stderr(true);
    let node = |procs: &mut Processes, id: u64| {
        let args: Vec<String> = [
            "node",
            "--id",
            &id.to_string(),
            "--listen",
            &format!("127.0.0.1:{}", ports[id as usize - 1]),
            "--peers",
            &peers.join(","),
            "--data",
            &dir.path().join(format!("node-{id}")).display().to_string(),
            "--active-standby",
            "--role",
            "sup",
            "--ttl",
            TTL,
            // A standby whose session self-fences while the Raft leader moves (it may
            // die with the ACTIVE) goes back in line instead of exiting.
            "--recampaign",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        start(procs, id, &args, &writer(&log, false));
    };
    for id in 1..=3 {
        node(&mut procs, id);
    }
    let first = started(&mut procs, "a first command", |_| true).await;
    wait_for_line(&log, first.token()).await;
    procs
        .signal(first.from, Signal::KILL)
        .unwrap_or_else(|e| panic!("{e}"));
    wait_group_gone(pid(&first), 2 * SECONDS).await;
    procs.kill(first.from).await;
    let second = started(&mut procs, "the next command", |l| l.from != first.from).await;
    assert!(second.token() > first.token());
    wait_for_line(&log, second.token()).await;
    procs.stop_all(10 * SECONDS).await;
    wait_group_gone(pid(&second), 2 * SECONDS).await;
    assert_eq!(assert_one_at_a_time(&log).len(), 2);
}

/// A supervisor whose every byte to and from the backend is held (a partition: nothing
/// arrives until it heals, as TCP retransmits nothing across it) stops its command
/// before its lease can end, so before the standby's command starts, and stays alive;
/// once the link heals it goes back in line (--recampaign).
/// Supervisor 1 reaches the backend at `upstream` through a proxy, supervisor 2 at
/// `direct`; `url` makes a backend URL of an endpoint.
async fn cut_off(upstream: &str, direct: &str, url: impl Fn(&str) -> String, log: &Path) {
    let upstream = upstream.parse().unwrap_or_else(|e| panic!("{e}"));
    let link = Proxy::start(upstream)
        .await
        .unwrap_or_else(|e| panic!("proxy: {e}"));
    let mut procs = Processes::new();
    procs.echo_stderr(true);
    let cut_off = run_args(&url(&link.addr().to_string()), 1, &["--recampaign"]);
    start(&mut procs, 1, &cut_off, &writer(log, false));
    let first = started(&mut procs, "the proxied supervisor's command", |_| true).await;
    let standby = run_args(&url(direct), 2, &[]);
    start(&mut procs, 2, &standby, &writer(log, false));
    procs
        .expect("the other supervisor in STANDBY", 30 * SECONDS, |l| {
            l.from == 2 && l.is("standby")
        })
        .await;

    link.set_both(Fault::Hold);
    let stopped = procs
        .expect("the cut-off command stopped", 10 * SECONDS, |l| {
            l.from == 1 && l.is("child_exited")
        })
        .await;
    assert_eq!(stopped.json["reason"], "self_fence_deadline");
    let second = started(&mut procs, "the standby's command", |l| l.from == 2).await;
    assert!(second.token() > first.token());
    assert!(
        procs.pid(1).is_some(),
        "the cut-off supervisor must stay alive"
    );
    assert!(!group_alive(pid(&first)));

    link.set_both(Fault::Pass);
    procs
        .expect("the cut-off supervisor back in line", 30 * SECONDS, |l| {
            l.from == 1 && l.is("standby")
        })
        .await;
    procs.stop_all(10 * SECONDS).await;
    assert_one_at_a_time(log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raft_supervisor_cut_off_from_its_backend_stops_its_command_first() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut members = Processes::new();
    let endpoints = raft_members(&mut members, dir.path());
    let url = |endpoint: &str| format!("raft://{endpoint}");
    cut_off(&endpoints[0], &endpoints[1], url, &dir.path().join("log")).await;
    members.stop_all(10 * SECONDS).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_supervisor_cut_off_from_its_backend_stops_its_command_first() {
    let Some(etcd) = ha_testkit::etcd::Etcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let prefix = format!("cut-{}", std::process::id());
    let url = |endpoint: &str| format!("etcd://{endpoint}/{prefix}");
    cut_off(&etcd.endpoint, &etcd.endpoint, url, &dir.path().join("log")).await;
}

/// The rest on the memory backend, in one supervisor process each.
async fn run_memory(extra: &[&str], cmd: &[&str], within: Duration) -> (Option<i32>, Vec<Line>) {
    let mut procs = Processes::new();
    let args = run_args("memory://", 7, extra);
    let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
    start(&mut procs, 1, &args, &cmd);
    let status = procs
        .wait_exit(1, within)
        .await
        .unwrap_or_else(|e| panic!("ha run {extra:?} -- {cmd:?}: {e}"));
    (status.code(), procs.lines())
}

#[tokio::test]
async fn the_commands_exit_code_passes_through_and_says_it_is_the_commands() {
    let (code, lines) = run_memory(&[], &["sh", "-c", "exit 7"], 20 * SECONDS).await;
    assert_eq!(code, Some(7));
    let exited = lines.iter().find(|l| l.is("child_exited"));
    assert_eq!(exited.map(|l| l.json["code"].clone()), Some(7.into()));
    let (code, _) = run_memory(&[], &["sh", "-c", "kill -9 $$"], 20 * SECONDS).await;
    assert_eq!(code, Some(128 + 9));
}

#[tokio::test]
async fn recampaign_starts_a_new_command_with_a_higher_token() {
    let mut procs = Processes::new();
    let args = run_args("memory://", 7, &["--recampaign"]);
    start(
        &mut procs,
        1,
        &args,
        &["sh".into(), "-c".into(), "sleep 0.2".into()],
    );
    let first = started(&mut procs, "a first command", |_| true).await;
    let second = started(&mut procs, "a second command", |_| true).await;
    assert!(
        second.token() > first.token(),
        "{} then {}",
        first.token(),
        second.token()
    );
    procs
        .signal(1, Signal::TERM)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = procs.wait_exit(1, 20 * SECONDS).await;
    assert!(status.is_ok_and(|s| s.success()));
}

#[tokio::test]
async fn a_command_that_ignores_sigterm_is_killed_after_the_grace() {
    let mut procs = Processes::new();
    let args = run_args("memory://", 7, &["--kill-grace", "300ms"]);
    let stubborn = "trap '' TERM; while :; do sleep 0.05; done";
    start(
        &mut procs,
        1,
        &args,
        &["sh".into(), "-c".into(), stubborn.into()],
    );
    let child = started(&mut procs, "the command", |_| true).await;
    // Time for the shell to set its trap.
    sleep(Duration::from_millis(300)).await;
    let termed = Instant::now();
    procs
        .signal(1, Signal::TERM)
        .unwrap_or_else(|e| panic!("{e}"));
    let killed = procs
        .expect("SIGKILL", 10 * SECONDS, |l| {
            l.is("child_stopping") && l.json["signal"] == "SIGKILL"
        })
        .await;
    assert!(
        termed.elapsed() >= Duration::from_millis(300),
        "killed before the grace"
    );
    let exited = procs
        .expect("its end", 10 * SECONDS, |l| l.is("child_exited"))
        .await;
    assert_eq!(exited.json["signal"], "SIGKILL", "{}", killed.text);
    let status = procs.wait_exit(1, 20 * SECONDS).await;
    assert!(status.is_ok_and(|s| s.success()));
    assert!(!group_alive(pid(&child)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_gives_up_campaigning_with_its_own_exit_code() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut members = Processes::new();
    let endpoints = raft_members(&mut members, dir.path());
    let url = format!("raft://{}", endpoints.join(","));
    let mut procs = Processes::new();
    // The holder's TTL outlasts a Raft leader change of the fresh group: at 2 s its
    // session could self-fence and hand the role to the one that should give up.
    let mut holder = run_args(&url, 1, &[]);
    let ttl = holder
        .iter()
        .position(|a| a == "--ttl")
        .unwrap_or_else(|| panic!("no --ttl in {holder:?}"));
    holder[ttl + 1] = "10s".to_owned();
    start(&mut procs, 1, &holder, &["sleep".into(), "1000".into()]);
    started(&mut procs, "the holder's command", |_| true).await;
    for timeout in ["1s", "0"] {
        let tried = Instant::now();
        start(
            &mut procs,
            2,
            &run_args(&url, 2, &["--timeout", timeout]),
            &["true".into()],
        );
        let status = procs.wait_exit(2, 30 * SECONDS).await;
        assert_eq!(
            status.ok().and_then(|s| s.code()),
            Some(6),
            "--timeout {timeout}"
        );
        eprintln!("--timeout {timeout}: gave up after {:?}", tried.elapsed());
    }
    procs.stop_all(10 * SECONDS).await;
    members.stop_all(10 * SECONDS).await;
}

#[tokio::test]
async fn a_missing_command_or_a_grace_the_ttl_cannot_hold_is_refused_before_registering() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let plain = dir.path().join("plain-file");
    std::fs::write(&plain, "not a program").unwrap_or_else(|e| panic!("{e}"));
    let plain = plain.display().to_string();
    let cases: [(&[&str], &[&str], &str); 3] = [
        (&[], &["no-such-command-anywhere"], "not found on PATH"),
        (&[], &[plain.as_str()], "not an executable"),
        (&["--kill-grace", "5s"], &["true"], "at most"),
    ];
    for (extra, cmd, says) in cases {
        let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        let mut command = std::process::Command::new(HA);
        command
            .args(run_args("raft://127.0.0.1:1", 7, extra))
            .arg("--")
            .args(&cmd);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{cmd:?}: {stderr}");
        assert!(stderr.contains(says), "{cmd:?}: {stderr}");
        assert!(
            output.stdout.is_empty(),
            "it registered: {:?}",
            output.stdout
        );
    }
}

#[tokio::test]
async fn sighup_and_sigusr1_reach_the_commands_group() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let got = dir.path().join("got");
    let script = format!(
        "trap 'echo HUP >> {0}' HUP; trap 'echo USR1 >> {0}' USR1; while :; do sleep 0.05; done",
        got.display()
    );
    let mut procs = Processes::new();
    start(
        &mut procs,
        1,
        &run_args("memory://", 7, &[]),
        &["sh".into(), "-c".into(), script],
    );
    started(&mut procs, "the command", |_| true).await;
    // Time for the shell to set its traps.
    sleep(Duration::from_millis(300)).await;
    for signal in [Signal::HUP, Signal::USR1] {
        procs.signal(1, signal).unwrap_or_else(|e| panic!("{e}"));
        sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + 10 * SECONDS;
    while std::fs::read_to_string(&got).unwrap_or_default() != "HUP\nUSR1\n" {
        assert!(
            Instant::now() < deadline,
            "the command got {:?}",
            std::fs::read_to_string(&got).unwrap_or_default()
        );
        sleep(Duration::from_millis(20)).await;
    }
    assert!(procs.pid(1).is_some(), "ha run must not die of SIGHUP");
    procs.stop(1, 10 * SECONDS).await;
}

#[tokio::test]
async fn a_command_never_ready_is_stopped_and_the_role_given_up() {
    let port = ha_testkit::free_port().to_string();
    let ready_tcp = format!("127.0.0.1:{port}");
    let extra = [
        "--ready-tcp",
        ready_tcp.as_str(),
        "--ready-timeout",
        "500ms",
    ];
    let (code, lines) = run_memory(&extra, &["sleep", "1000"], 20 * SECONDS).await;
    let stopped = lines.iter().find(|l| l.is("child_stopping"));
    assert_eq!(
        stopped.map(|l| l.json["reason"].clone()),
        Some("not_ready".into())
    );
    assert!(
        !lines.iter().any(|l| l.is("proclaimed")),
        "a command that never became ready was proclaimed active"
    );
    // Resigned by the supervisor: the loop reports it as the leadership's loss.
    let given_up = |l: &Line| l.is("lost") && l.json["reason"] == "resigned";
    assert!(lines.iter().any(given_up), "the role was not given up");
    assert_eq!(code, Some(3));
}
