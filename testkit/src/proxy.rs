//! A byte-level TCP proxy between a client and one server, whose two directions can each
//! be delayed, held or silently dropped while the connections stay open.
//!
//! The faults act on bytes, not on messages: a held direction buffers what it reads and
//! lets it go, in order, when the hold ends, as a congested or stalled link would; a dropped
//! direction reads and discards, so neither end sees an error (no RST, no FIN), as a link
//! that black-holes packets would. Every test that uses it picks its own schedule; the proxy
//! itself is deterministic given the calls made on it.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

/// One direction of every connection through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Bytes the client sends to the server.
    ToServer,
    /// Bytes the server sends back to the client.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToServer => 0,
            Direction::ToClient => 1,
        }
    }
}

/// What a direction does with the bytes it reads from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward at once.
    Pass,
    /// Forward each chunk this long after it was read (order kept).
    Delay(Duration),
    /// Buffer until the direction is set to something else, then forward in order (or
    /// discard, if it is set to `Drop`).
    Hold,
    /// Read and discard; the connection stays open and nobody is told.
    Drop,
}

/// Counts of what crossed one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes written to the far end.
    pub forwarded: u64,
    /// Bytes read and discarded.
    pub dropped: u64,
}

/// Faults applied when the next chunk crosses a direction (that chunk still goes by the
/// faults in force before it), so a test can act right after a request is sent.
struct Trigger {
    on: Direction,
    then: Vec<(Direction, Fault)>,
}

struct Control {
    faults: Mutex<[Fault; 2]>,
    trigger: Mutex<Option<Trigger>>,
    changed: watch::Sender<()>,
    forwarded: [AtomicU64; 2],
    dropped: [AtomicU64; 2],
    connections: AtomicU64,
    /// The host behind the proxy is dead: new connections wait unaccepted.
    dead: AtomicBool,
}

impl Control {
    fn fault(&self, direction: Direction) -> Fault {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)[direction.index()]
    }

    fn set(&self, changes: &[(Direction, Fault)]) {
        {
            let mut faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
            for (direction, fault) in changes {
                faults[direction.index()] = *fault;
            }
        }
        self.changed.send_replace(());
    }

    /// The fault a chunk read now in `direction` meets, firing a trigger armed on it.
    fn admit(&self, direction: Direction) -> Fault {
        let fault = self.fault(direction);
        let fired = {
            let mut trigger = self.trigger.lock().unwrap_or_else(PoisonError::into_inner);
            match trigger.as_ref() {
                Some(armed) if armed.on == direction => trigger.take(),
                _ => None,
            }
        };
        if let Some(fired) = fired {
            self.set(&fired.then);
        }
        fault
    }
}

/// A listening proxy to one upstream address. Dropping it closes every connection.
pub struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    control: Arc<Control>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

/// One buffered chunk; `at` is `None` while it is held.
struct Chunk {
    bytes: Vec<u8>,
    at: Option<Instant>,
}

const CHUNK: usize = 64 * 1024;

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    ///
    /// # Errors
    /// When the listening socket cannot be bound.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().map_err(io::Error::other)?, upstream).await
    }

    /// Listens on `listen` (a loopback or test-namespace address) and forwards to
    /// `upstream`.
    ///
    /// # Errors
    /// When the listening socket cannot be bound.
    pub async fn start_on(listen: SocketAddr, upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let control = Arc::new(Control {
            faults: Mutex::new([Fault::Pass; 2]),
            trigger: Mutex::new(None),
            changed: watch::channel(()).0,
            forwarded: Default::default(),
            dropped: Default::default(),
            connections: AtomicU64::new(0),
            dead: AtomicBool::new(false),
        });
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            Arc::clone(&control),
            Arc::clone(&tasks),
        ));
        tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(accept);
        Ok(Self {
            addr,
            upstream,
            control,
            tasks,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets one direction's fault for every connection, open and future.
    pub fn set(&self, direction: Direction, fault: Fault) {
        self.control.set(&[(direction, fault)]);
    }

    /// Sets both directions at once (for a symmetric delay or a cut).
    pub fn set_both(&self, fault: Fault) {
        self.control
            .set(&[(Direction::ToServer, fault), (Direction::ToClient, fault)]);
    }

    /// When the next chunk crosses `on`, applies `then` (that chunk itself still goes by
    /// the faults in force before it). Replaces a trigger armed before.
    pub fn on_next_chunk(&self, on: Direction, then: &[(Direction, Fault)]) {
        *self
            .control
            .trigger
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Trigger {
            on,
            then: then.to_vec(),
        });
    }

    /// Whether a trigger armed with [`Proxy::on_next_chunk`] is still waiting.
    pub fn trigger_armed(&self) -> bool {
        self.control
            .trigger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// The fault in force on a direction.
    pub fn fault(&self, direction: Direction) -> Fault {
        self.control.fault(direction)
    }

    /// What crossed a direction so far, over all connections.
    pub fn traffic(&self, direction: Direction) -> Traffic {
        let i = direction.index();
        Traffic {
            forwarded: self.control.forwarded[i].load(Ordering::Relaxed),
            dropped: self.control.dropped[i].load(Ordering::Relaxed),
        }
    }

    /// Closes every open connection (new ones are still accepted), as a link that was
    /// down long enough for both ends to give up. Needed after `Drop`: discarded bytes
    /// leave a byte stream that neither end can parse again.
    pub fn reset(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        // The first task is the listener; the rest are connections.
        for task in tasks.iter().skip(1) {
            task.abort();
        }
        tasks.truncate(1);
    }

    /// The host behind the proxy dies silently, as one that lost power or its cable:
    /// open connections stay open and pass nothing either way (no RST, no FIN), and new
    /// ones complete the kernel's handshake but are never served, so a client learns
    /// nothing but silence.
    pub fn die(&self) {
        self.control.dead.store(true, Ordering::SeqCst);
        self.set_both(Fault::Drop);
    }

    /// The host comes back as one that rebooted: the connections open before are closed
    /// (its TCP state is gone), and new ones pass, the ones that waited unaccepted too.
    pub fn revive(&self) {
        self.reset();
        self.control.dead.store(false, Ordering::SeqCst);
        self.set_both(Fault::Pass);
    }

    /// Whether [`Proxy::die`] is in force.
    pub fn is_dead(&self) -> bool {
        self.control.dead.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.control.connections.load(Ordering::Relaxed)
    }
}

/// A proxy in front of each of `endpoints` (`host:port`), in their order.
///
/// # Errors
/// An endpoint that is not an address, or a socket that cannot be bound.
pub async fn proxies_to(endpoints: &[String]) -> io::Result<Vec<Proxy>> {
    let mut proxies = Vec::new();
    for endpoint in endpoints {
        let upstream = endpoint
            .parse()
            .map_err(|e| io::Error::other(format!("{endpoint}: {e}")))?;
        proxies.push(Proxy::start(upstream).await?);
    }
    Ok(proxies)
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    control: Arc<Control>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let mut changed = control.changed.subscribe();
    loop {
        // A dead host accepts nothing: connections wait in the kernel's backlog.
        while control.dead.load(Ordering::SeqCst) {
            if changed.changed().await.is_err() {
                return;
            }
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Re-check `dead` when a fault changes while waiting for a connection.
            _ = changed.changed() => continue,
        };
        let Ok((client, _)) = accepted else {
            continue;
        };
        control.connections.fetch_add(1, Ordering::Relaxed);
        let control = Arc::clone(&control);
        let connection = tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pump(
                client_read,
                server_write,
                Direction::ToServer,
                Arc::clone(&control),
            );
            let down = pump(server_read, client_write, Direction::ToClient, control);
            tokio::join!(up, down);
        });
        let mut tasks = tasks.lock().unwrap_or_else(PoisonError::into_inner);
        tasks.retain(|task| !task.is_finished());
        tasks.push(connection);
    }
}

/// Moves one direction: a reader that stamps each chunk with the fault it met, and a
/// writer that releases chunks in order at their time.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    direction: Direction,
    control: Arc<Control>,
) {
    let (queue, mut chunks) = mpsc::unbounded_channel::<Chunk>();
    let reader_control = Arc::clone(&control);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let at = match reader_control.admit(direction) {
                Fault::Drop => {
                    reader_control.dropped[direction.index()]
                        .fetch_add(n as u64, Ordering::Relaxed);
                    continue;
                }
                Fault::Pass => Some(Instant::now()),
                Fault::Delay(delay) => Some(Instant::now() + delay),
                Fault::Hold => None,
            };
            if queue
                .send(Chunk {
                    bytes: buf[..n].to_vec(),
                    at,
                })
                .is_err()
            {
                break;
            }
        }
    };
    let writer = async move {
        let mut changed = control.changed.subscribe();
        while let Some(chunk) = chunks.recv().await {
            let at = match chunk.at {
                Some(at) => Some(at),
                None => loop {
                    match control.fault(direction) {
                        Fault::Hold => {
                            if changed.changed().await.is_err() {
                                return;
                            }
                        }
                        Fault::Drop => break None,
                        Fault::Pass => break Some(Instant::now()),
                        Fault::Delay(delay) => break Some(Instant::now() + delay),
                    }
                },
            };
            let Some(at) = at else {
                control.dropped[direction.index()]
                    .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                continue;
            };
            sleep_until(at).await;
            if to.write_all(&chunk.bytes).await.is_err() {
                return;
            }
            control.forwarded[direction.index()]
                .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn read_some(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 1024];
        match tokio::time::timeout(within, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn passes_holds_releases_in_order_and_drops_silently() {
        let proxy = Proxy::start(echo_server().await)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut client = TcpStream::connect(proxy.addr())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        client
            .write_all(b"a")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read_some(&mut client, Duration::from_secs(5)).await,
            Some(b"a".to_vec())
        );

        proxy.set(Direction::ToClient, Fault::Hold);
        client
            .write_all(b"b")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read_some(&mut client, Duration::from_millis(300)).await,
            None
        );
        proxy.set(Direction::ToClient, Fault::Pass);
        assert_eq!(
            read_some(&mut client, Duration::from_secs(5)).await,
            Some(b"b".to_vec())
        );

        proxy.set(Direction::ToServer, Fault::Drop);
        client
            .write_all(b"c")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read_some(&mut client, Duration::from_millis(300)).await,
            None
        );
        assert_eq!(proxy.traffic(Direction::ToServer).dropped, 1);
        proxy.set(Direction::ToServer, Fault::Pass);
        client
            .write_all(b"d")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read_some(&mut client, Duration::from_secs(5)).await,
            Some(b"d".to_vec())
        );
    }

    #[tokio::test]
    async fn delays_each_chunk_and_fires_a_trigger_after_the_next_chunk() {
        let proxy = Proxy::start(echo_server().await)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut client = TcpStream::connect(proxy.addr())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        proxy.set_both(Fault::Delay(Duration::from_millis(100)));
        let started = Instant::now();
        client
            .write_all(b"x")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read_some(&mut client, Duration::from_secs(5)).await,
            Some(b"x".to_vec())
        );
        assert!(started.elapsed() >= Duration::from_millis(200));

        proxy.set_both(Fault::Pass);
        proxy.on_next_chunk(
            Direction::ToServer,
            &[
                (Direction::ToClient, Fault::Hold),
                (Direction::ToServer, Fault::Drop),
            ],
        );
        client
            .write_all(b"y")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // The triggering chunk reached the server; its echo is held.
        assert_eq!(
            read_some(&mut client, Duration::from_millis(300)).await,
            None
        );
        assert!(!proxy.trigger_armed());
        client
            .write_all(b"z")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        proxy.set(Direction::ToClient, Fault::Pass);
        assert_eq!(
            read_some(&mut client, Duration::from_secs(5)).await,
            Some(b"y".to_vec())
        );
        assert_eq!(
            read_some(&mut client, Duration::from_millis(300)).await,
            None
        );
    }

    #[tokio::test]
    async fn a_dead_host_is_silent_to_old_and_new_connections_until_it_revives() {
        let proxy = Proxy::start(echo_server().await)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut old = TcpStream::connect(proxy.addr())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        old.write_all(b"a").await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read_some(&mut old, Duration::from_secs(5)).await,
            Some(b"a".to_vec())
        );
        let accepted = proxy.connections();

        proxy.die();
        old.write_all(b"b").await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_some(&mut old, Duration::from_millis(300)).await, None);
        // The kernel completes the handshake; nobody serves the connection.
        let mut waiting = TcpStream::connect(proxy.addr())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        waiting
            .write_all(b"c")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read_some(&mut waiting, Duration::from_millis(300)).await,
            None
        );
        assert_eq!(proxy.connections(), accepted);

        proxy.revive();
        assert!(!proxy.is_dead());
        // The old connection is gone (a rebooted host), the waiting one is served.
        assert_eq!(read_some(&mut old, Duration::from_secs(5)).await, None);
        assert_eq!(
            read_some(&mut waiting, Duration::from_secs(5)).await,
            Some(b"c".to_vec())
        );
    }
}
