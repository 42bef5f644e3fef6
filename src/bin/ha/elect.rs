//! `ha elect`, `ha elect --listen`, `ha leader`, `ha members`: the etcdctl-style commands,
//! on any backend.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ha::{Backend, ElectionName, LeaderEvent, Member, Role, RoleState, ServerId, Session};
use tokio::sync::watch;

use crate::output::{Event, Printer};
use crate::{shutdown_signal, Common, Exit};

/// Prints why a command failed and picks the exit code.
pub fn fail(context: &str, error: &ha::Error) -> Exit {
    eprintln!("ha: {context}: {error}");
    Exit::of(error)
}

/// Connects to `--backend`.
pub async fn connect(common: &Common) -> Result<Arc<dyn Backend>, Exit> {
    let options = common.security.options().map_err(|e| {
        eprintln!("ha: {e}");
        Exit::Usage
    })?;
    ha::connect_with(&common.backend, &options)
        .await
        .map_err(|e| fail(&format!("cannot connect to {}", common.backend), &e))
}

fn election_name(name: &str) -> Result<ElectionName, Exit> {
    ElectionName::new(name).map_err(|e| fail("bad election", &e))
}

/// What `ha elect <election> <value>` campaigns with.
pub struct Candidate {
    /// The value published while leading.
    pub value: String,
    /// The role to register in (default: the election's name).
    pub role: Option<String>,
    /// Print `leading` this often while the leadership is valid.
    pub print_every: Option<Duration>,
    /// Where to serve /metrics, /healthz and /role.
    pub metrics_addr: Option<SocketAddr>,
}

/// `ha elect <election> <value>`: campaign, hold until a signal, resign.
pub async fn campaign(election: &str, candidate: &Candidate, common: &Common) -> Exit {
    let (role_state, watched) = watch::channel(RoleState::Starting);
    if let Some(addr) = candidate.metrics_addr {
        if let Err(e) = crate::http::serve(addr, watched).await {
            eprintln!("ha: cannot serve metrics on {addr}: {e}");
            return Exit::Usage;
        }
    }
    let exit = match campaign_inner(election, candidate, common, &role_state).await {
        Ok(exit) | Err(exit) => exit,
    };
    role_state.send_replace(RoleState::Stopped);
    exit
}

async fn campaign_inner(
    election: &str,
    candidate: &Candidate,
    common: &Common,
    role_state: &watch::Sender<RoleState>,
) -> Result<Exit, Exit> {
    let (value, print_every) = (candidate.value.as_str(), candidate.print_every);
    let printer = Printer::new(common.json);
    let election = election_name(election)?;
    let role = Role::new(candidate.role.as_deref().unwrap_or(election.as_str()))
        .map_err(|e| fail("bad role", &e))?;
    let backend = connect(common).await?;
    let server_id = ServerId::new(common.server_id());
    let member = Member::new(server_id, role, value);
    let session = Session::builder(Arc::clone(&backend), member)
        .ttl(common.ttl())
        .register()
        .await
        .map_err(|e| fail("cannot register", &e))?;
    printer.print(
        &Event::new("registered")
            .election(&election)
            .server_id(Some(server_id))
            .lease(session.lease()),
    );
    role_state.send_replace(RoleState::Standby);
    if let Ok(Some(leader)) = backend.leader(&election).await {
        printer.print(&Event::new("standby").leader(&leader));
    }
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let leadership = tokio::select! {
        () = &mut signal => {
            close(session).await;
            return Ok(Exit::Clean);
        }
        reason = session.lost() => {
            printer.print(&Event::new("lost").election(&election).server_id(Some(server_id)).reason(reason));
            return Ok(Exit::Lost);
        }
        won = session.campaign(&election, value.to_owned()) => won.map_err(|e| fail("campaign failed", &e))?,
    };
    printer.print(
        &Event::new("elected")
            .election(&election)
            .value(value.as_bytes())
            .token(leadership.token())
            .server_id(Some(server_id)),
    );
    let token = leadership.token();
    role_state.send_replace(RoleState::Active { token, ready: true });
    let heartbeat = async {
        let Some(every) = print_every.filter(|d| !d.is_zero()) else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(every).await;
            // Checked and printed in one step: a line means "valid at this instant".
            if leadership.is_valid() {
                printer.print(
                    &Event::new("leading")
                        .election(&election)
                        .token(token)
                        .server_id(Some(server_id)),
                );
            }
        }
    };
    tokio::select! {
        () = heartbeat => unreachable!("the heartbeat never ends"),
        () = &mut signal => {
            if let Err(e) = leadership.resign().await {
                eprintln!("ha: resign failed (the leadership ends with the session): {e}");
            }
            printer.print(&Event::new("resigned").election(&election).token(token).server_id(Some(server_id)));
            close(session).await;
            Ok(Exit::Clean)
        }
        reason = leadership.lost() => {
            printer.print(&Event::new("lost").election(&election).token(leadership.token())
                .server_id(Some(server_id)).reason(reason));
            Ok(Exit::Lost)
        }
    }
}

async fn close(session: Session) {
    if let Err(e) = session.close().await {
        eprintln!("ha: revoke failed (the lease ends by its TTL): {e}");
    }
}

/// `ha elect --listen <election>`: print every leader change until a signal.
pub async fn listen(election: &str, common: &Common) -> Exit {
    let printer = Printer::new(common.json);
    let election = match election_name(election) {
        Ok(election) => election,
        Err(exit) => return exit,
    };
    let backend = match connect(common).await {
        Ok(backend) => backend,
        Err(exit) => return exit,
    };
    let mut events = backend.watch(&election);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => return Exit::Clean,
            event = events.next() => match event {
                Some(Ok(LeaderEvent::Elected(leader))) => printer.print(&Event::new("leader").leader(&leader)),
                Some(Ok(LeaderEvent::Vacant)) => printer.print(&Event::new("vacant").election(&election)),
                Some(Err(e)) => return fail("watch failed", &e),
                None => {
                    eprintln!("ha: the watch ended");
                    return Exit::Unavailable;
                }
            }
        }
    }
}

/// `ha leader <election>`: print the current leader, or `vacant`.
pub async fn leader(election: &str, common: &Common) -> Exit {
    let printer = Printer::new(common.json);
    let election = match election_name(election) {
        Ok(election) => election,
        Err(exit) => return exit,
    };
    let backend = match connect(common).await {
        Ok(backend) => backend,
        Err(exit) => return exit,
    };
    match backend.leader(&election).await {
        Ok(Some(leader)) => printer.print(&Event::new("leader").leader(&leader)),
        Ok(None) => printer.print(&Event::new("vacant").election(&election)),
        Err(e) => return fail("cannot read the leader", &e),
    }
    Exit::Clean
}

/// `ha members <role>`: print each live member of the role.
pub async fn members(role: &str, common: &Common) -> Exit {
    let printer = Printer::new(common.json);
    let role = match Role::new(role) {
        Ok(role) => role,
        Err(e) => return fail("bad role", &e),
    };
    let backend = match connect(common).await {
        Ok(backend) => backend,
        Err(exit) => return exit,
    };
    match backend.members(&role).await {
        Ok(members) => {
            for member in members {
                printer.print(
                    &Event::new("member")
                        .server_id(Some(member.server_id))
                        .value(member.address.as_bytes()),
                );
            }
            Exit::Clean
        }
        Err(e) => fail("cannot list members", &e),
    }
}
