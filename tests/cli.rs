//! The `ha` binary as users run it: real processes, real sockets, real signals.
//!
//! - raft: three `ha node --active-standby` processes; SIGKILL the ACTIVE → a STANDBY is
//!   ACTIVE within TTL + 2 s; restart it; SIGTERM the next ACTIVE → handoff within 1 s;
//!   fencing tokens increase.
//! - etcd: three `ha run` processes on a real etcd: the same, and exclusive mode.
//! - `ha demo` runs to completion; bad usage exits with 2.
//!
//! Every process is started with kill_on_drop and stopped by PID at the end.

#![cfg(all(feature = "cli", feature = "raft"))]

#[path = "support/http.rs"]
mod http;

use std::collections::BTreeMap;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use ha_testkit::{free_port, Line, Processes, Signal};
use http::http_get;
use tokio::process::Command;
use tokio::time::timeout;

const HA: &str = env!("CARGO_BIN_EXE_ha");
const TTL: Duration = Duration::from_secs(2);

/// Free loopback ports for nodes 1..=3 and the `--peers` value naming them.
fn three_node_ports() -> (BTreeMap<u64, u16>, String) {
    let ports: BTreeMap<u64, u16> = (1..=3).map(|id| (id, free_port())).collect();
    let peers = ports
        .iter()
        .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    (ports, peers)
}

/// Runs `ha` with `args` to completion (killed if it outlives `within`).
async fn run_ha(args: &[&str], within: Duration) -> std::process::Output {
    let run = Command::new(HA)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    timeout(within, run)
        .await
        .unwrap_or_else(|_| panic!("ha {args:?} did not finish within {within:?}"))
        .unwrap_or_else(|e| panic!("run ha {args:?}: {e}"))
}

/// The test's process set; every stderr line is echoed, so a failing run shows why.
fn processes() -> Processes {
    let mut procs = Processes::new();
    procs.echo_stderr(true);
    procs
}

/// Starts `ha args` as process `id`.
fn start(procs: &mut Processes, id: u64, args: &[String]) {
    let mut command = Command::new(HA);
    command
        .args(args)
        .env("RUST_LOG", "warn,openraft=off,sled=off");
    procs
        .spawn(id, command)
        .unwrap_or_else(|e| panic!("spawn ha {args:?}: {e}"));
}

/// Sends `signal` to process `id`; the unix time (µs) just before.
fn signal(procs: &Processes, id: u64, signal: Signal) -> u64 {
    procs
        .signal(id, signal)
        .unwrap_or_else(|e| panic!("{signal:?} to {id}: {e}"))
}

async fn exit_status(procs: &mut Processes, id: u64, within: Duration) -> ExitStatus {
    procs
        .wait_exit(id, within)
        .await
        .unwrap_or_else(|e| panic!("process {id}: {e}"))
}

/// Every line printed was a JSON event; then SIGTERM everything left (SIGKILL after 10 s).
async fn stop_all(procs: &mut Processes) {
    if let Some(line) = procs.lines().iter().find(|l| l.json.is_null()) {
        panic!(
            "process {} printed a non-JSON line {:?}",
            line.from, line.text
        );
    }
    procs.stop_all(Duration::from_secs(10)).await;
}

/// The first ready ACTIVE (seen now or earlier) and its token.
async fn first_active(procs: &mut Processes) -> (u64, u64) {
    if let Some(line) = procs.lines().iter().find(|l| l.is("proclaimed")) {
        return (line.from, line.token());
    }
    let line = procs
        .expect("a first ACTIVE", Duration::from_secs(30), |l| {
            l.is("proclaimed")
        })
        .await;
    (line.from, line.token())
}

/// The crash-then-graceful scenario on three coordinator processes. `restart` brings the
/// killed process back before the graceful step (the Raft group needs it for quorum).
async fn crash_then_handoff(procs: &mut Processes, restart: impl Fn(&mut Processes, u64)) {
    let (active, t1) = first_active(procs).await;

    // Crash: kill -9 the active.
    let killed_at = signal(procs, active, Signal::KILL);
    let status = exit_status(procs, active, Duration::from_secs(10)).await;
    assert!(!status.success());
    let next = procs
        .expect("a takeover", TTL + Duration::from_secs(20), |l| {
            l.is("elected") && l.from != active
        })
        .await;
    let (successor, t2) = (next.from, next.token());
    let gap = Duration::from_micros(next.at_unix_us().saturating_sub(killed_at));
    eprintln!("crash takeover gap {gap:?} at TTL {TTL:?}");
    assert!(
        gap <= TTL + Duration::from_secs(2),
        "takeover took {gap:?}, more than TTL + 2 s"
    );
    assert!(t2 > t1, "tokens increase: {t1} then {t2}");
    procs
        .expect("the successor ready", Duration::from_secs(10), |l| {
            l.is("proclaimed") && l.from == successor
        })
        .await;

    restart(procs, active);

    // Graceful: SIGTERM the active; it stops, resigns, revokes, exits 0.
    let termed_at = signal(procs, successor, Signal::TERM);
    let after = procs
        .expect("a handoff", Duration::from_secs(10), |l| {
            l.is("elected") && l.from != successor
        })
        .await;
    let t3 = after.token();
    let gap = Duration::from_micros(after.at_unix_us().saturating_sub(termed_at));
    eprintln!("graceful handoff gap {gap:?}");
    assert!(gap < Duration::from_secs(1), "handoff took {gap:?}");
    assert!(t3 > t2, "tokens increase: {t2} then {t3}");
    let status = exit_status(procs, successor, Duration::from_secs(15)).await;
    assert!(
        status.success(),
        "SIGTERM must end in a clean exit, got {status}"
    );
    let resigned = |l: &Line| l.from == successor && l.is("resigned") && l.token() == t2;
    if !procs.lines().iter().any(resigned) {
        procs
            .expect("the successor's resign", Duration::from_secs(10), resigned)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_nodes_fail_over_on_kill_and_hand_over_on_sigterm() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (ports, peers) = three_node_ports();
    let metrics: BTreeMap<u64, u16> = (1..=3).map(|id| (id, free_port())).collect();
    let args = |id: u64| -> Vec<String> {
        vec![
            "node".into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{}", metrics[&id]),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", ports[&id]),
            "--peers".into(),
            peers.clone(),
            "--data".into(),
            dir.path().join(id.to_string()).display().to_string(),
            "--active-standby".into(),
            "--ttl".into(),
            TTL.as_secs().to_string(),
            "--json".into(),
        ]
    };
    let mut procs = processes();
    for id in 1..=3 {
        start(&mut procs, id, &args(id));
    }

    // The probes: /role is 200 on the ready ACTIVE only, /metrics counts the election.
    let active = first_active(&mut procs).await.0;
    for id in 1..=3 {
        let (status, body) = http_get(metrics[&id], "/role").await;
        if id == active {
            assert_eq!((status, body.trim()), (200, "active"), "node {id}");
        } else {
            assert_eq!(status, 503, "node {id}: {body}");
        }
        assert_eq!(http_get(metrics[&id], "/healthz").await.0, 200);
    }
    // The first keepalive goes out TTL/3 after registering: poll (bounded) until it shows.
    let mut text = String::new();
    for _ in 0..50 {
        text = http_get(metrics[&active], "/metrics").await.1;
        if text.contains("ha_keepalive_seconds_bucket") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for metric in [
        "ha_elections_won_total",
        "ha_active{",
        "ha_keepalive_seconds_bucket",
        "ha_fencing_token{",
        "ha_self_fence_seconds_left{",
        "ha_keepalive_failures_total{",
    ] {
        assert!(
            text.contains(metric),
            "{metric} missing from /metrics:\n{text}"
        );
    }
    crash_then_handoff(&mut procs, |procs, id| start(procs, id, &args(id))).await;
    stop_all(&mut procs).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_coordinators_fail_over_on_kill_and_hand_over_on_sigterm() {
    let Some(etcd) = ha_testkit::etcd::Etcd::start() else {
        return;
    };
    let backend = format!("etcd://{}/ha-cli-{}", etcd.endpoint, std::process::id());
    let args = |id: u64| -> Vec<String> {
        [
            "run",
            "--backend",
            &backend,
            "--role",
            "rootcoord",
            "--id",
            &id.to_string(),
            "--ttl",
            &TTL.as_secs().to_string(),
            "--json",
        ]
        .map(String::from)
        .to_vec()
    };
    let mut procs = processes();
    for id in 1..=3 {
        start(&mut procs, id, &args(id));
    }
    crash_then_handoff(&mut procs, |_, _| {}).await;

    // Exclusive mode: a second instance of a live role is refused with exit code 3.
    let exclusive = |id: u64| -> Vec<String> {
        [
            "run",
            "--backend",
            &backend,
            "--role",
            "querycoord",
            "--exclusive",
            "--id",
            &id.to_string(),
            "--ttl",
            "2",
            "--json",
        ]
        .map(String::from)
        .to_vec()
    };
    start(&mut procs, 10, &exclusive(10));
    procs
        .expect(
            "the exclusive instance ACTIVE",
            Duration::from_secs(20),
            |l| l.from == 10 && l.is("proclaimed"),
        )
        .await;
    start(&mut procs, 11, &exclusive(11));
    let status = exit_status(&mut procs, 11, Duration::from_secs(20)).await;
    assert_eq!(
        status.code(),
        Some(3),
        "a second exclusive instance exits with 3"
    );
    stop_all(&mut procs).await;
}

#[tokio::test]
async fn the_demo_runs_to_completion() {
    let output = run_ha(&["demo"], Duration::from_secs(120)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "ha demo failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in ["takeover gap", "handoff gap", "removed", "summary"] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }
}

#[tokio::test]
async fn bad_usage_exits_with_2_and_says_what_was_wrong() {
    let cases: &[&[&str]] = &[
        &["elect", "bad/name", "v"],
        &["elect", "rootcoord"],
        &["leader", "rootcoord", "--backend", "nosuch://x"],
        &["leader", "rootcoord", "--backend", "raft://"],
        &["run", "--ttl", "0"],
        &["run", "--ttl", "10x"],
        &["run", "--ttl", "2h"],
        &["run", "--role", ""],
        &["node", "--id", "1"],
        &[
            "node",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:1",
            "--data",
            "/nonexistent/ha",
            "--election-timeout-ms",
            "400,200",
        ],
        &[
            "node",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:1",
            "--data",
            "/nonexistent/ha",
            "--election-timeout-ms",
            "300",
        ],
        &["frobnicate"],
    ];
    for args in cases {
        let output = run_ha(args, Duration::from_secs(30)).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "ha {args:?}: {stderr}");
        assert!(!stderr.trim().is_empty(), "ha {args:?} said nothing");
        assert!(
            !stderr.contains("panicked"),
            "ha {args:?} panicked: {stderr}"
        );
    }
}

#[tokio::test]
async fn memory_backend_elect_prints_json_and_resigns_on_sigterm() {
    let mut procs = processes();
    start(
        &mut procs,
        1,
        &[
            "elect",
            "rootcoord",
            "10.0.0.1:53100",
            "--backend",
            "memory://",
            "--id",
            "7",
            "--json",
        ]
        .map(String::from),
    );
    let elected = procs
        .expect("elected", Duration::from_secs(20), |l| l.is("elected"))
        .await;
    assert_eq!(elected.json["server_id"], 7);
    assert_eq!(elected.json["value"], "10.0.0.1:53100");
    assert_eq!(elected.json["election"], "rootcoord");
    signal(&procs, 1, Signal::TERM);
    procs
        .expect("resigned", Duration::from_secs(20), |l| l.is("resigned"))
        .await;
    let status = exit_status(&mut procs, 1, Duration::from_secs(20)).await;
    assert!(status.success(), "{status}");
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn an_unreachable_backend_exits_with_4() {
    let url = format!("etcd://127.0.0.1:{}", free_port());
    for args in [
        vec!["leader", "rootcoord"],
        vec!["run", "--role", "rootcoord"],
    ] {
        let args = [args.as_slice(), &["--backend", &url]].concat();
        let output = run_ha(&args, Duration::from_secs(60)).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "ha {args:?}: {stderr}");
        assert!(stderr.contains("unavailable"), "ha {args:?}: {stderr}");
    }
}

/// A CA and certificates for the TLS test: (ca, [(cert, key) for nodes 1..=3], client).
fn test_pki(dir: &std::path::Path) -> (String, Vec<(String, String)>, (String, String)) {
    let ca = ha_core::testing::pki::Ca::new("ha cli test CA");
    let write = |name: String, body: String| {
        let path = dir.join(&name);
        std::fs::write(&path, body).unwrap_or_else(|e| panic!("{e}"));
        path.display().to_string()
    };
    let leaf = |name: &str| {
        let (cert, key) = ca.leaf(name, &[name]);
        (
            write(format!("{name}.pem"), cert),
            write(format!("{name}-key.pem"), key),
        )
    };
    let nodes = (1..=3).map(|id| leaf(&format!("node-{id}"))).collect();
    let client = leaf("client-operator");
    (write("ca.pem".into(), ca.pem()), nodes, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_nodes_over_tls_admit_certified_clients_and_the_token_only() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (ca, nodes, client) = test_pki(dir.path());
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "t0ken\n").unwrap_or_else(|e| panic!("{e}"));
    let wrong_token = dir.path().join("wrong-token");
    std::fs::write(&wrong_token, "guess\n").unwrap_or_else(|e| panic!("{e}"));
    let token_file = token_file.display().to_string();
    let wrong_token = wrong_token.display().to_string();
    let (ports, peers) = three_node_ports();
    let mut procs = processes();
    for id in 1..=3u64 {
        let (cert, key) = &nodes[(id - 1) as usize];
        let args: Vec<String> = [
            "node",
            "--id",
            &id.to_string(),
            "--listen",
            &format!("127.0.0.1:{}", ports[&id]),
            "--peers",
            &peers,
            "--data",
            &dir.path().join(format!("data{id}")).display().to_string(),
            "--cacert",
            &ca,
            "--cert",
            cert,
            "--key",
            key,
            "--token-file",
            &token_file,
            "--active-standby",
            "--ttl",
            "2",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        start(&mut procs, id, &args);
    }
    let active = first_active(&mut procs).await;
    let backend = format!("raft://127.0.0.1:{},127.0.0.1:{}", ports[&1], ports[&2]);
    let leader = |extra: &[&str]| {
        let mut args = vec![
            "leader",
            "rootcoord",
            "--backend",
            backend.as_str(),
            "--json",
            "--cacert",
            ca.as_str(),
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ha(&refs, Duration::from_secs(30)).await
    };
    // A client certificate from the cluster CA reads the leader: the ACTIVE's token.
    let ok = run(leader(&["--cert", &client.0, "--key", &client.1])).await;
    let text = String::from_utf8_lossy(&ok.stdout).to_string();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{text} {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(text.contains(&format!("\"token\":{}", active.1)), "{text}");
    // The token admits too; a wrong token and no credentials exit 5 and say why.
    let ok = run(leader(&["--token-file", &token_file])).await;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (what, extra, says) in [
        (
            "wrong token",
            vec!["--token-file", wrong_token.as_str()],
            "credentials",
        ),
        ("no credentials", vec![], "certificate"),
    ] {
        let out = run(leader(&extra)).await;
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(5), "{what}: {err}");
        assert!(err.contains(says), "{what}: {err}");
    }
    stop_all(&mut procs).await;

    // Secure by default: a non-loopback address without TLS is refused (exit 2).
    let out = run_ha(
        &[
            "node",
            "--id",
            "1",
            "--listen",
            "10.255.255.1:7001",
            "--peers",
            "1=10.255.255.1:7001",
            "--data",
            &dir.path().join("refused").display().to_string(),
        ],
        Duration::from_secs(30),
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("without TLS") && err.contains("--insecure"),
        "{err}"
    );
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_status_on_etcd_lists_every_member_and_exits_4_without_quorum() {
    let cluster = tokio::task::spawn_blocking(|| ha_testkit::etcd::EtcdCluster::start(3))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let Some(mut cluster) = cluster else {
        return;
    };
    let backend = format!("etcd://{}", cluster.endpoints().join(","));
    let status = |json: bool| {
        let backend = backend.clone();
        async move {
            let mut args = vec!["status", "--backend", backend.as_str()];
            if json {
                args.push("--json");
            }
            run_ha(&args, Duration::from_secs(30)).await
        }
    };
    // The cluster may still be electing a leader (its first, or after a kill).
    let until_exit = |code: i32, json: bool| {
        let status = &status;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let output = status(json).await;
                if output.status.code() == Some(code) {
                    return output;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no exit {code} within 20 s: {}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    // A member is listed without a client URL until it has started.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let json = loop {
        let listed = until_exit(0, true).await;
        let json: serde_json::Value =
            serde_json::from_slice(&listed.stdout).unwrap_or_else(|e| panic!("{e}"));
        let started = json["members"]
            .as_array()
            .is_some_and(|m| m.len() == 3 && m.iter().all(|m| !m["status"].is_null()));
        if started || std::time::Instant::now() >= deadline {
            break json;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let members = json["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 3, "{json}");
    let leader = json["leader"].as_u64().unwrap_or(0);
    assert!(members.iter().any(|m| m["id"] == leader), "{json}");
    assert!(
        members
            .iter()
            .all(|m| m["status"]["raft_term"].as_u64() > Some(0)),
        "{json}"
    );

    cluster.kill(0);
    let output = until_exit(0, false).await;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        text.contains("unreachable"),
        "two of three still lead: {text}"
    );
    cluster.kill(1);
    let output = until_exit(4, false).await;
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no majority"),
        "one of three is no quorum: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A data dir written by a newer binary: `ha node` names both formats, exits 7 and
/// changes nothing in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_node_refuses_a_newer_data_dir_untouched() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let format = dir.path().join("ha-format");
    std::fs::write(&format, "9\n").unwrap_or_else(|e| panic!("{e}"));
    let listen = format!("127.0.0.1:{}", free_port());
    let output = ha_node_alone(dir.path(), &listen, &[]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("format 9") && stderr.contains("formats 1 to"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|e| e.map(|e| e.file_name()).unwrap_or_default())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("ha-format")]);
    assert_eq!(std::fs::read_to_string(&format).unwrap_or_default(), "9\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_node_below_the_groups_feature_level_exits_7() {
    // A data dir whose group recorded this version's level, written through the library.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let listen = format!("127.0.0.1:{}", free_port());
    let peers = BTreeMap::from([(1, listen.clone())]);
    let config = ha::raft::RaftNodeConfig::new(
        1,
        listen.parse().unwrap_or_else(|e| panic!("{e}")),
        peers,
        dir.path(),
    );
    let node = ha::raft::RaftNode::start(config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let recorded = dir.path().join("ha-group-level");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&recorded)
        .unwrap_or_default()
        .trim()
        != ha::raft::FEATURE_LEVEL.to_string()
    {
        assert!(tokio::time::Instant::now() < deadline, "no level recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await;

    let before = files_of(dir.path());
    let older = (ha::raft::FEATURE_LEVEL - 1).to_string();
    let output = ha_node_alone(dir.path(), &listen, &["--feature-level", &older]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the group's feature level is {} and this member serves {older}",
            ha::raft::FEATURE_LEVEL
        )),
        "{stderr}"
    );
    assert!(
        before == files_of(dir.path()),
        "the refused start changed the data dir"
    );
}

/// `ha node` as the only voter of a group on `dir`, run to its exit (a refused start).
async fn ha_node_alone(
    dir: &std::path::Path,
    listen: &str,
    extra: &[&str],
) -> std::process::Output {
    let data = dir.to_string_lossy().into_owned();
    let peers = format!("1={listen}");
    let mut args = vec![
        "node", "--id", "1", "--listen", listen, "--peers", &peers, "--data", &data,
    ];
    args.extend_from_slice(extra);
    run_ha(&args, Duration::from_secs(30)).await
}

/// Every file under `dir` and its bytes.
fn files_of(dir: &std::path::Path) -> BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{e}")) {
            let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
                files.insert(path, bytes);
            }
        }
    }
    files
}
