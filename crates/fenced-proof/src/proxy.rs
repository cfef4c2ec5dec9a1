//! A loopback TCP proxy that injects network faults on command.
//!
//! [`FaultProxy`] sits between lock clients and a real server. Clients connect to
//! [`FaultProxy::addr`]; every accepted connection is forwarded to the upstream address given to
//! [`FaultProxy::start`], or the one set later by [`FaultProxy::set_upstream`] (a failover to
//! another server). [`FaultProxy::set`] switches the [`Fault`] for all connections, open and new,
//! at once.
//!
//! Faults never drop bytes from the middle of a stream: a partition holds them, as TCP would keep
//! retransmitting them, and delivers them in order once it is lifted. The only way a connection
//! loses data is [`Fault::Reset`], which ends it with a TCP RST on both sides.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// How many bytes each direction of a connection holds (read but not yet delivered) before the
/// proxy stops reading from that side. One read chunk may come on top.
const HELD_BYTES_PER_DIRECTION: usize = 4 << 20;

/// Size of one read from a socket.
const CHUNK: usize = 64 << 10;

/// A direction of traffic through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// The network fault the proxy applies. Set it with [`FaultProxy::set`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward everything as soon as it is read.
    #[default]
    None,
    /// Every chunk is delivered this long after it was read, in both directions, order kept.
    ///
    /// A round trip through the proxy therefore takes at least twice this. The delay is measured
    /// from the read, so lowering it (or setting [`Fault::None`]) releases queued chunks at once.
    Latency(Duration),
    /// Nothing is forwarded in either direction. Bytes are held (as TCP would retransmit them) and
    /// delivered in order when the fault is lifted; end-of-stream is held likewise. New
    /// connections are accepted, but their upstream connect waits until the fault is lifted.
    Partition,
    /// Like [`Fault::Partition`] but only this direction is held; the other flows. New
    /// connections are connected upstream at once.
    OneWay(Direction),
    /// Every open connection is closed with a TCP RST on both sides now; while set, new
    /// connections are reset as soon as they are accepted.
    ///
    /// Open connections are reset even if another fault replaces this one right away.
    Reset,
}

/// Counters of a [`FaultProxy`], read with [`FaultProxy::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyStats {
    /// Client connections accepted, including those reset on accept.
    pub accepted: u64,
    /// Client connections currently being served (accepted and not yet closed).
    pub open: u64,
    /// Bytes forwarded to the upstream server (client to server). A chunk counts as soon as its
    /// write starts, so this is never less than what the server has read.
    pub bytes_up: u64,
    /// Bytes forwarded to clients (server to client), counted like `bytes_up`.
    pub bytes_down: u64,
    /// Connections the proxy closed with a TCP RST: by [`Fault::Reset`], on accept while it was
    /// set, or because the other side of the connection failed (was reset, or its upstream
    /// connect failed).
    pub resets: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    resets: AtomicU64,
}

impl Counters {
    fn bytes(&self, direction: Direction) -> &AtomicU64 {
        match direction {
            Direction::Up => &self.bytes_up,
            Direction::Down => &self.bytes_down,
        }
    }
}

/// What the connection tasks watch.
#[derive(Clone, Copy, Debug)]
struct State {
    fault: Fault,
    /// Where new connections are forwarded.
    upstream: SocketAddr,
    /// How many times [`Fault::Reset`] has been set; a connection accepted at an older count is
    /// reset even if the fault has changed since.
    reset_count: u64,
}

/// A loopback TCP proxy that forwards connections to one upstream address and injects the
/// [`Fault`] currently set.
///
/// Dropping it stops accepting and closes every connection.
///
/// ```
/// use fenced_proof::proxy::{Fault, FaultProxy};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// use tokio::net::{TcpListener, TcpStream};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// // An upstream server that says hello.
/// let server = TcpListener::bind("127.0.0.1:0").await?;
/// let upstream = server.local_addr()?;
/// tokio::spawn(async move {
///     while let Ok((mut conn, _)) = server.accept().await {
///         conn.write_all(b"hello").await.ok();
///     }
/// });
///
/// let proxy = FaultProxy::start(upstream).await?;
/// proxy.set(Fault::Partition);
/// let mut client = TcpStream::connect(proxy.addr()).await?;
/// // Nothing flows while partitioned ...
/// let mut buf = [0; 5];
/// let read = tokio::time::timeout(std::time::Duration::from_millis(50), client.read_exact(&mut buf));
/// assert!(read.await.is_err());
/// // ... and the held bytes arrive once the partition heals.
/// proxy.set(Fault::None);
/// client.read_exact(&mut buf).await?;
/// assert_eq!(&buf, b"hello");
/// assert_eq!(proxy.stats().accepted, 1);
/// # Ok(())
/// # }
/// ```
pub struct FaultProxy {
    addr: SocketAddr,
    state: watch::Sender<State>,
    counters: Arc<Counters>,
    accept_task: JoinHandle<()>,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream())
            .field("fault", &self.fault())
            .field("stats", &self.stats())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards every accepted connection to `upstream`.
    ///
    /// Must be called within a Tokio runtime; the proxy runs on tasks of that runtime.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (state, state_rx) = watch::channel(State {
            fault: Fault::None,
            upstream,
            reset_count: 0,
        });
        let counters = Arc::new(Counters::default());
        let accept_task = tokio::spawn(accept_loop(listener, state_rx, Arc::clone(&counters)));
        Ok(FaultProxy {
            addr,
            state,
            counters,
            accept_task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream address new connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.state.borrow().upstream
    }

    /// Forwards new connections to `upstream` from now on (a failover: the clients keep their
    /// address, the server behind it changes). Open connections stay with the server they were
    /// made to, and end when it closes them.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.state.send_modify(|state| state.upstream = upstream);
    }

    /// Sets the fault; it takes effect at once for open and new connections.
    pub fn set(&self, fault: Fault) {
        self.state.send_modify(|state| {
            state.fault = fault;
            if fault == Fault::Reset {
                state.reset_count += 1;
            }
        });
    }

    /// The fault currently set.
    pub fn fault(&self) -> Fault {
        self.state.borrow().fault
    }

    /// A snapshot of the proxy's counters.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        ProxyStats {
            accepted: c.accepted.load(Ordering::SeqCst),
            open: c.open.load(Ordering::SeqCst),
            bytes_up: c.bytes_up.load(Ordering::SeqCst),
            bytes_down: c.bytes_down.load(Ordering::SeqCst),
            resets: c.resets.load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the connection tasks; aborting it aborts them and closes their
        // sockets.
        self.accept_task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: watch::Receiver<State>,
    counters: Arc<Counters>,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(_) => {
                // Out of descriptors or an aborted handshake: back off a little, then go on.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        counters.accepted.fetch_add(1, Ordering::SeqCst);
        let now = *state.borrow();
        if now.fault == Fault::Reset {
            reset(&client);
            counters.resets.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        counters.open.fetch_add(1, Ordering::SeqCst);
        let open = OpenGuard(Arc::clone(&counters));
        connections.spawn(serve(
            client,
            now.upstream,
            state.clone(),
            now.reset_count,
            open,
        ));
    }
}

/// Counts a connection as open while it lives, also when its task is aborted.
struct OpenGuard(Arc<Counters>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sets `SO_LINGER` to zero so that closing the socket sends a RST. With a zero timeout the close
/// does not block.
fn reset(stream: &TcpStream) {
    // If this fails the socket is already broken; closing it is the best that can be done.
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Serves one client connection until both directions are done or it is reset.
async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    state: watch::Receiver<State>,
    reset_count: u64,
    open: OpenGuard,
) {
    let counters = Arc::clone(&open.0);
    let connected = tokio::select! {
        connected = connect_upstream(upstream, state.clone()) => connected,
        () = reset_ordered(state.clone(), reset_count) => None,
    };
    let Some(mut server) = connected else {
        reset(&client);
        counters.resets.fetch_add(1, Ordering::SeqCst);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);

    let finished = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = pump(
            client_read,
            server_write,
            Direction::Up,
            state.clone(),
            &counters,
        );
        let down = pump(
            server_read,
            client_write,
            Direction::Down,
            state.clone(),
            &counters,
        );
        tokio::select! {
            done = async { tokio::try_join!(up, down) } => done.is_ok(),
            () = reset_ordered(state, reset_count) => false,
        }
    };
    if !finished {
        reset(&client);
        reset(&server);
        counters.resets.fetch_add(1, Ordering::SeqCst);
    }
    drop(open);
}

/// Connects to the upstream server once no partition prevents it.
async fn connect_upstream(
    upstream: SocketAddr,
    mut state: watch::Receiver<State>,
) -> Option<TcpStream> {
    loop {
        let fault = state.borrow_and_update().fault;
        match fault {
            Fault::Partition | Fault::Reset => changed(&mut state).await,
            Fault::None | Fault::Latency(_) | Fault::OneWay(_) => break,
        }
    }
    TcpStream::connect(upstream).await.ok()
}

/// Returns once a reset has been ordered after the connection was accepted.
async fn reset_ordered(mut state: watch::Receiver<State>, reset_count: u64) {
    while state.borrow_and_update().reset_count == reset_count {
        changed(&mut state).await;
    }
}

/// Waits for the state to change; if the proxy is gone, waits until the task is aborted.
async fn changed(state: &mut watch::Receiver<State>) {
    if state.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

enum Chunk {
    Data {
        read_at: Instant,
        bytes: Vec<u8>,
        /// Returns the bytes to the direction's budget once delivered.
        _held: OwnedSemaphorePermit,
    },
    End {
        read_at: Instant,
    },
}

/// Forwards one direction: reads chunks from `from` while the budget allows, and delivers them to
/// `to` when the fault lets them through. End of stream is forwarded as a half-close.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    direction: Direction,
    state: watch::Receiver<State>,
    counters: &Counters,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(HELD_BYTES_PER_DIRECTION));

    let read = async move {
        let mut buf = vec![0; CHUNK];
        loop {
            let n = from.read(&mut buf).await?;
            let read_at = Instant::now();
            if n == 0 {
                // The receiver only goes away when the whole connection does.
                let _ = tx.send(Chunk::End { read_at });
                return Ok::<_, io::Error>(());
            }
            let held = Arc::clone(&budget)
                .acquire_many_owned(u32::try_from(n).unwrap_or(u32::MAX))
                .await
                .map_err(io::Error::other)?;
            let chunk = Chunk::Data {
                read_at,
                bytes: buf[..n].to_vec(),
                _held: held,
            };
            if tx.send(chunk).is_err() {
                return Ok(());
            }
        }
    };

    let deliver = async move {
        let mut state = state;
        while let Some(chunk) = rx.recv().await {
            match chunk {
                Chunk::Data { read_at, bytes, .. } => {
                    deliverable(read_at, direction, &mut state).await;
                    // Counted before the write, so that the count is never behind what the
                    // peer has read; the connection is reset if the write fails.
                    counters
                        .bytes(direction)
                        .fetch_add(bytes.len() as u64, Ordering::SeqCst);
                    to.write_all(&bytes).await?;
                }
                Chunk::End { read_at } => {
                    deliverable(read_at, direction, &mut state).await;
                    to.shutdown().await?;
                    break;
                }
            }
        }
        Ok::<_, io::Error>(())
    };

    tokio::try_join!(read, deliver).map(|_| ())
}

/// Waits until something read at `read_at` may be delivered in `direction`.
async fn deliverable(read_at: Instant, direction: Direction, state: &mut watch::Receiver<State>) {
    loop {
        let fault = state.borrow_and_update().fault;
        match fault {
            Fault::None => return,
            Fault::OneWay(held) if held != direction => return,
            Fault::Latency(delay) => {
                // A delay too long to represent is never over.
                let Some(at) = read_at.checked_add(delay) else {
                    changed(state).await;
                    continue;
                };
                if Instant::now() >= at {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = changed(state) => {}
                }
            }
            // Held; on Reset the connection is about to be closed.
            Fault::Partition | Fault::OneWay(_) | Fault::Reset => changed(state).await,
        }
    }
}
