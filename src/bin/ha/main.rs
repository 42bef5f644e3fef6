//! `ha`: elect, follow and run highly available coordinators from the command line, on
//! any backend (`memory://`, `raft://...`, `etcd://...`), and `ha demo`, the failover
//! demo on an embedded Raft group of three processes.

#[cfg(feature = "raft")]
mod admin;
#[cfg(feature = "raft")]
mod backup;
mod coordinator;
#[cfg(feature = "raft")]
mod demo;
mod elect;
mod http;
#[cfg(feature = "raft")]
mod node;
mod output;
mod status_view;
mod supervise;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Exit codes, as `ha --help` documents them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Finished cleanly (including a resign on SIGINT/SIGTERM).
    Clean,
    /// `ha demo` failed (it says why).
    Failed,
    /// Bad usage: an unknown flag, an invalid name, URL or TTL.
    Usage,
    /// The leadership or the session was lost (or another instance holds the role).
    Lost,
    /// The backend could not be reached.
    Unavailable,
    /// TLS or credentials were refused (wrong CA, missing client certificate, wrong
    /// password or token).
    Refused,
    /// `--timeout` passed before this replica was elected.
    Timeout,
    /// A membership change was refused: it would lose quorum, or it clashes with the
    /// group (another cluster, an address taken). Nothing changed.
    ChangeRefused,
    /// The supervised command exited on its own with this code (128 + N for signal N).
    Child(u8),
}

impl Exit {
    /// The exit code for an error from the library.
    pub fn of(error: &ha::Error) -> Self {
        use ha::Error as E;
        match error {
            E::InvalidArgument { .. } | E::FeatureDisabled { .. } => Self::Usage,
            E::LeaseExpired { .. }
            | E::NotLeader { .. }
            | E::AlreadyRegistered { .. }
            | E::Closed(_)
            | E::Activation { .. } => Self::Lost,
            E::Auth { .. } => Self::Refused,
            _ => Self::Unavailable,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(match exit {
            Exit::Clean => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::Lost => 3,
            Exit::Unavailable => 4,
            Exit::Refused => 5,
            Exit::Timeout => 6,
            Exit::ChangeRefused => 7,
            Exit::Child(code) => code,
        })
    }
}

const EXIT_CODES: &str = "\
Exit codes:
  0  clean: finished, or resigned on SIGINT/SIGTERM
  1  ha demo failed (it says why); ha snapshot: the file could not be read or written
  2  bad usage: unknown flag, invalid name, URL or TTL; a damaged or foreign snapshot file
  3  leadership or session lost, the activation failed, or the role is held by another
     instance (exclusive mode)
  4  backend unavailable; for ha node also: it could not start, or its Raft core
     stopped on a storage error (a full disk)
  5  refused: the server's certificate is not trusted, or it refused our certificate,
     user, password or token
  6  --timeout passed before this replica was elected
  7  ha member, ha node --join: the change was refused (it would lose quorum, or it
     clashes with the group: another cluster id, an address or id taken); ha snapshot
     restore: another cluster's snapshot, a data dir in use; nothing changed
With `-- CMD`, a command that exits on its own ends `ha run` with the command's code
(128 + N for signal N). A code can then be ours or the command's: the last event line
tells them apart (`child_exited` with `code` or `signal` means the command's).";

/// Highly available coordinators: one ACTIVE, hot STANDBYs, fencing tokens.
#[derive(Debug, Parser)]
#[command(name = "ha", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags every command that talks to a backend shares.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The backend: memory://, raft://host:port,... or etcd://host:port,...[/prefix].
    #[arg(long, env = "HA_BACKEND", default_value = "memory://")]
    pub backend: String,
    /// Session TTL: how long a crashed holder keeps the role (seconds, or 10s, 500ms).
    #[arg(long, default_value_t = 10.0, value_parser = parse_ttl)]
    pub ttl: f64,
    /// This process's server id, unique within the role (default: a random one; give a
    /// fixed one to replicas that restart in place).
    #[arg(long)]
    pub id: Option<u64>,
    /// Print one JSON object per line per event instead of text.
    #[arg(long)]
    pub json: bool,
    /// TLS and credentials.
    #[command(flatten)]
    pub security: Security,
}

/// TLS and credentials, for clients of etcd or of a Raft group, and for `ha node`.
#[derive(Debug, Clone, Args)]
pub struct Security {
    /// CA certificate (PEM) that signs the servers' certificates; turns TLS on.
    #[arg(long, env = "HA_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Certificate (PEM) for mutual TLS. For `ha node`: this node's certificate, which
    /// must name node-<id>.
    #[arg(long, env = "HA_CERT")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, env = "HA_KEY")]
    pub key: Option<PathBuf>,
    /// etcd user name; the password comes from HA_ETCD_PASSWORD or --password-file.
    #[arg(long, env = "HA_ETCD_USER")]
    pub user: Option<String>,
    /// File holding the etcd password (instead of the HA_ETCD_PASSWORD variable).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// File holding a bearer token for a Raft group (instead of the HA_TOKEN variable).
    /// For `ha node`: the token that admits clients without a certificate.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// For `ha node`: file holding the admin token (instead of HA_ADMIN_TOKEN), which
    /// admits clients and lets them change the membership (`ha member`); `--join`
    /// sends it too. Clients of `ha member` give it as their --token-file.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
}

impl Security {
    /// A secret from a file (trailing newline dropped) or an environment variable.
    fn secret(file: Option<&PathBuf>, variable: &str) -> Result<Option<String>, String> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
        }
        Ok(std::env::var(variable).ok().filter(|v| !v.is_empty()))
    }

    /// The bearer token: --token-file, else HA_TOKEN.
    pub fn token(&self) -> Result<Option<String>, String> {
        Self::secret(self.token_file.as_ref(), "HA_TOKEN")
    }

    /// The admin token: --admin-token-file, else HA_ADMIN_TOKEN.
    pub fn admin_token(&self) -> Result<Option<String>, String> {
        Self::secret(self.admin_token_file.as_ref(), "HA_ADMIN_TOKEN")
    }

    /// What `ha::connect_with` takes.
    pub fn options(&self) -> Result<ha::ConnectOptions, String> {
        Ok(ha::ConnectOptions {
            ca_file: self.cacert.clone(),
            cert_file: self.cert.clone(),
            key_file: self.key.clone(),
            user: self.user.clone(),
            password: Self::secret(self.password_file.as_ref(), "HA_ETCD_PASSWORD")?,
            token: self.token()?,
        })
    }
}

impl Common {
    /// The TTL as a duration.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs_f64(self.ttl)
    }

    /// The server id: `--id`, or a random one (not the PID: every container's is 1).
    pub fn server_id(&self) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        self.id.unwrap_or_else(|| {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u32(std::process::id());
            hasher.finish() >> 16 // 48 bits: readable, and collisions stay unlikely
        })
    }
}

/// Seconds as a bare number (`10`, `2.5`) or a duration with units (`10s`, `500ms`,
/// `1m 30s`), as Kubernetes and Consul users type them.
fn parse_seconds(text: &str) -> Result<f64, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return Ok(seconds);
    }
    humantime::parse_duration(text)
        .map(|d| d.as_secs_f64())
        .map_err(|e| {
            format!("{text:?} is neither a number of seconds nor a duration like 10s or 500ms: {e}")
        })
}

fn parse_ttl(text: &str) -> Result<f64, String> {
    let ttl = parse_seconds(text)?;
    if !(ttl.is_finite() && ttl > 0.0 && ttl <= 3600.0) {
        return Err(format!("{ttl} s is outside (0, 3600]"));
    }
    Ok(ttl)
}

fn parse_interval(text: &str) -> Result<f64, String> {
    let seconds = parse_seconds(text)?;
    if !(0.01..=86_400.0).contains(&seconds) {
        return Err(format!("{seconds} s is outside [0.01, 86400]"));
    }
    Ok(seconds)
}

/// Flags of the ActiveStandby coordinator (`run`, and `node --active-standby`).
#[derive(Debug, Clone, Args)]
pub struct CoordinatorArgs {
    /// The coordinator role (also the election, unless --election is given).
    #[arg(long, default_value = "rootcoord")]
    pub role: String,
    /// The election to campaign in (default: the role).
    #[arg(long)]
    pub election: Option<String>,
    /// The address published for clients while ACTIVE.
    #[arg(long, default_value = "")]
    pub address: String,
    /// After a loss, go back to STANDBY instead of exiting with code 3.
    #[arg(long)]
    pub recampaign: bool,
    /// Run as the single exclusive instance of the role (no standbys): refuse to start
    /// while another instance is alive.
    #[arg(long)]
    pub exclusive: bool,
    /// Time between "{role} is in STANDBY ..." log lines (0.01 to 86400 s; 30s, 1m).
    #[arg(long, default_value_t = 10.0, value_parser = parse_interval)]
    pub standby_log_interval: f64,
    /// Serve /metrics, /healthz and /role (200 only while ACTIVE) on this address.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// The supervised command and how it is started, probed and stopped.
    #[command(flatten)]
    pub child: supervise::ChildArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Campaign in an election with a value, print when elected, hold until SIGINT or
    /// SIGTERM, then resign. With --listen, print every leader change instead.
    Elect {
        /// The election.
        election: String,
        /// The value to publish while leading (required unless --listen).
        value: Option<String>,
        /// Follow the election's leader instead of campaigning.
        #[arg(long)]
        listen: bool,
        /// The role to register in (default: the election's name).
        #[arg(long)]
        role: Option<String>,
        /// While leading, print a `leading` event every this many milliseconds, and only
        /// while the leadership is valid (a heartbeat for monitors and history checks).
        #[arg(long)]
        print_every_ms: Option<u64>,
        /// Serve /metrics, /healthz and /role (200 only while elected) on this address.
        #[arg(long)]
        metrics_addr: Option<SocketAddr>,
        #[command(flatten)]
        common: Common,
    },
    /// Print the current leader of an election.
    Leader {
        /// The election.
        election: String,
        #[command(flatten)]
        common: Common,
    },
    /// Print the live members of a role.
    Members {
        /// The role.
        role: String,
        #[command(flatten)]
        common: Common,
    },
    /// Run an ActiveStandby coordinator of a role on the backend (an idle one that only
    /// holds the role and reports ready), until SIGINT/SIGTERM.
    Run {
        #[command(flatten)]
        coordinator: CoordinatorArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Run one member of an embedded Raft group, optionally with an ActiveStandby
    /// coordinator on it.
    Node(Box<NodeArgs>),
    /// Show every member of an embedded Raft group: id, address, voter or learner, Raft
    /// state, term, log and applied index, lag, last contact, data size, version. Exits
    /// 4 when no quorum answers. On etcd://, each etcd member's own report.
    #[cfg(feature = "raft")]
    Status(admin::AdminTarget),
    /// List, add, promote or remove members of an embedded Raft group.
    #[cfg(feature = "raft")]
    #[command(subcommand)]
    Member(admin::MemberAction),
    /// Back up an embedded Raft group's state, restore a new group from a backup, or
    /// check a backup file.
    #[cfg(feature = "raft")]
    #[command(subcommand)]
    Snapshot(backup::SnapshotAction),
    /// Start three `ha node` processes (embedded Raft, role rootcoord, TTL 3 s), kill the
    /// ACTIVE with SIGKILL and measure the takeover, then SIGTERM the next ACTIVE and
    /// measure the handoff; cleans up everything.
    Demo {
        /// Session TTL (seconds, or 3s, 1500ms).
        #[arg(long, default_value_t = 3.0, value_parser = parse_ttl)]
        ttl: f64,
    },
    /// Internal: SIGKILLs process group GROUP when its supervisor dies.
    #[command(hide = true)]
    Guard {
        /// The supervised command's process group.
        group: i32,
        /// The supervisor: a SIGTERM while it lives is not its death.
        parent: i32,
    },
}

/// `ha node` flags.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// This member's Raft node id.
    #[arg(long)]
    pub id: u64,
    /// The address to serve Raft and the client API on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Every voter of a new group: ID=HOST:PORT,ID=HOST:PORT,... (bootstraps it once).
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Join a running group through any of its members (raft://host:port,...): added
    /// as a learner, promoted to voter once caught up. A member that already joined
    /// restarts from its data dir; the flag may stay.
    #[arg(long, value_name = "URL")]
    pub join: Option<String>,
    /// With --join: stay a learner (replicates, does not vote).
    #[arg(long)]
    pub learner: bool,
    /// With --join: how long joining may take before the node gives up (seconds, 1m).
    #[arg(long, default_value_t = 120.0, value_parser = parse_ttl)]
    pub join_timeout: f64,
    /// The data directory (sled).
    #[arg(long)]
    pub data: PathBuf,
    /// The address peers and clients dial to reach this member (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// The cluster id, so members of different groups refuse each other.
    #[arg(long)]
    pub cluster: Option<String>,
    /// Tune the Raft timings for links with this round-trip time in milliseconds (a
    /// WAN, a cellular uplink): RPC timeout 2·RTT+60 ms, election timeout from 3 RPC
    /// timeouts (at least 250 ms) to twice that, heartbeat a sixth of it. The flags
    /// below override single values.
    #[arg(long, value_name = "MS")]
    pub rtt_ms: Option<u64>,
    /// How often the Raft leader sends heartbeats, in milliseconds (default 50).
    #[arg(long, value_name = "MS")]
    pub heartbeat_ms: Option<u64>,
    /// The Raft election timeout range in milliseconds, MIN,MAX (default 250,500).
    #[arg(long, value_name = "MIN,MAX", value_parser = parse_ms_range)]
    pub election_timeout_ms: Option<(u64, u64)>,
    /// How long one peer RPC (replication, a vote, a leadership confirmation) may take,
    /// in milliseconds (default: a third of the shortest election timeout).
    #[arg(long, value_name = "MS")]
    pub rpc_timeout_ms: Option<u64>,
    /// Last resort after losing a quorum for good: start as the only voter of a new
    /// group from this member's own data (every entry it holds is kept, entries only the
    /// lost members held are gone), then --join new members to it. The lost members
    /// must never run again with their old data dirs. Remove the flag once new members
    /// joined: a restart with it would drop them again.
    #[arg(long, conflicts_with = "join")]
    pub force_new_group: bool,
    /// On SIGINT/SIGTERM, leave the group: resign the coordinator role first, then ask
    /// the Raft leader to remove this member (refused, and the node just stops, when the
    /// voters left would have no reachable majority).
    #[arg(long)]
    pub leave_on_stop: bool,
    /// Also run an ActiveStandby coordinator on this member.
    #[arg(long)]
    pub active_standby: bool,
    /// Let the Raft leader stay on this member while its coordinator is ACTIVE. By
    /// default a Raft leader whose process hosts an ACTIVE hands its leadership to
    /// another caught-up voter (groups of three), so one crash costs one TTL.
    #[arg(long)]
    pub no_placement: bool,
    /// Serve this feature level instead of the binary's (tests of mixed versions only).
    #[arg(long, hide = true)]
    pub feature_level: Option<u32>,
    /// Session TTL with --active-standby (seconds, or 10s, 500ms).
    #[arg(long, default_value_t = 10.0, value_parser = parse_ttl)]
    pub ttl: f64,
    /// Print one JSON object per line per event instead of text.
    #[arg(long)]
    pub json: bool,
    /// Listen on a non-loopback address without TLS. Anyone who reaches the port can
    /// then join the group's traffic and make itself ACTIVE; use only on a network you
    /// trust completely.
    #[arg(long)]
    pub insecure: bool,
    /// TLS (--cacert, --cert, --key: the cluster CA and this node's certificate) and the
    /// client token (--token-file or HA_TOKEN).
    #[command(flatten)]
    pub security: Security,
    /// The coordinator's flags (with --active-standby).
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// Logs to stderr; `RUST_LOG` wins, else `info`.
fn init_logging() {
    use std::io::IsTerminal;
    let default = "info,openraft=warn,sled=warn";
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The guard of a supervised command's group runs no runtime: one thread, which
    // waits for the signal its start left blocked.
    if let Command::Guard { group, parent } = cli.command {
        return supervise::child::guard(group, parent);
    }
    init_logging();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(command(cli.command)).into(),
        Err(error) => {
            eprintln!("ha: cannot start the runtime: {error}");
            Exit::Failed.into()
        }
    }
}

async fn command(command: Command) -> Exit {
    match command {
        Command::Elect {
            election,
            value,
            listen,
            role,
            print_every_ms,
            metrics_addr,
            common,
        } => {
            if listen {
                elect::listen(&election, &common).await
            } else if let Some(value) = value {
                let candidate = elect::Candidate {
                    value,
                    role,
                    print_every: print_every_ms.map(std::time::Duration::from_millis),
                    metrics_addr,
                };
                elect::campaign(&election, &candidate, &common).await
            } else {
                eprintln!("ha elect: a value is required unless --listen is given");
                Exit::Usage
            }
        }
        Command::Leader { election, common } => elect::leader(&election, &common).await,
        Command::Members { role, common } => elect::members(&role, &common).await,
        Command::Run {
            coordinator,
            common,
        } => coordinator::run(&coordinator, &common).await,
        Command::Node(node) => node_command(*node).await,
        #[cfg(feature = "raft")]
        Command::Status(target) => admin::status(&target).await,
        #[cfg(feature = "raft")]
        Command::Member(action) => admin::member(&action).await,
        #[cfg(feature = "raft")]
        Command::Snapshot(action) => backup::snapshot(&action).await,
        Command::Demo { ttl } => demo_command(ttl).await,
        Command::Guard { .. } => Exit::Usage,
    }
}

#[cfg(feature = "raft")]
async fn node_command(node: NodeArgs) -> Exit {
    node::node(node).await
}

#[cfg(not(feature = "raft"))]
async fn node_command(_node: NodeArgs) -> Exit {
    eprintln!("ha node: this build has no Raft backend; enable the Cargo feature \"raft\"");
    Exit::Usage
}

#[cfg(feature = "raft")]
async fn demo_command(ttl: f64) -> Exit {
    demo::run(Duration::from_secs_f64(ttl)).await
}

#[cfg(not(feature = "raft"))]
async fn demo_command(_ttl: f64) -> Exit {
    eprintln!("ha demo: this build has no Raft backend; enable the Cargo feature \"raft\"");
    Exit::Usage
}

/// `MIN,MAX` in milliseconds, MIN below MAX. (clap's `num_args = 2` with a `,`
/// delimiter counts arguments before splitting them, and refused `200,400`.)
fn parse_ms_range(text: &str) -> Result<(u64, u64), String> {
    let (min, max) = text
        .split_once(',')
        .ok_or_else(|| format!("{text:?} is not MIN,MAX (two numbers of milliseconds)"))?;
    let number = |n: &str| {
        n.trim()
            .parse::<u64>()
            .map_err(|e| format!("{n:?} is not a number of milliseconds: {e}"))
    };
    let (min, max) = (number(min)?, number(max)?);
    if min == 0 || min >= max {
        return Err(format!(
            "MIN must be above 0 and below MAX, got {min},{max}"
        ));
    }
    Ok((min, max))
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: a future that a `select!` has not polled yet would
/// leave SIGTERM at its default action, and a SIGTERM right then would kill the process
/// without a resign.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (terminate, interrupt) {
            (Ok(mut terminate), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%error, "cannot handle SIGTERM or SIGINT; waiting for Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_interval, parse_ttl};

    #[test]
    fn durations_take_seconds_or_units() {
        assert_eq!(parse_ttl("10"), Ok(10.0));
        assert_eq!(parse_ttl("2.5"), Ok(2.5));
        assert_eq!(parse_ttl("10s"), Ok(10.0));
        assert_eq!(parse_ttl("1500ms"), Ok(1.5));
        assert_eq!(parse_ttl("1m 30s"), Ok(90.0));
        assert_eq!(parse_interval("30s"), Ok(30.0));
        for bad in ["", "0", "0s", "10x", "2h", "-1", "NaN"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} was taken as a TTL");
        }
    }
}
