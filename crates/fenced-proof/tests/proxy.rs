//! Tests of the loopback TCP fault proxy against an echo server.
//!
//! Timeouts here are either "must expire" checks (nothing may arrive while a fault holds it) or
//! guards against hangs; no test asserts an upper bound on how long anything takes.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use fenced_proof::proxy::{Direction, Fault, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

/// Bounds waits that must end, so that a bug fails the test instead of hanging it.
const GUARD: Duration = Duration::from_secs(60);
/// How long to watch for bytes that must not arrive.
const QUIET: Duration = Duration::from_millis(200);

/// What the echo server saw.
#[derive(Debug)]
enum Seen {
    /// A connection was accepted.
    Accepted,
    /// Bytes were received.
    Received(Vec<u8>),
    /// A connection ended: after echoing this many bytes, or with an error.
    Ended(Result<usize, ErrorKind>),
}

/// An upstream echo server that optionally greets each connection first and reports what it sees.
struct Echo {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl Echo {
    async fn start(greeting: &'static [u8]) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let _ = tx.send(Seen::Accepted);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let ended = echo(conn, greeting, &tx).await.map_err(|e| e.kind());
                    let _ = tx.send(Seen::Ended(ended));
                });
            }
        });
        Echo { addr, seen }
    }

    /// The next thing the server saw.
    async fn next(&mut self) -> Seen {
        timeout(GUARD, self.seen.recv()).await.unwrap().unwrap()
    }

    /// Asserts that the server sees nothing for a while.
    async fn quiet(&mut self) {
        if let Ok(seen) = timeout(QUIET, self.seen.recv()).await {
            panic!("the server saw {seen:?}");
        }
    }

    /// Reads what the server received until `n` bytes have come.
    async fn received(&mut self, n: usize) -> Vec<u8> {
        let mut all = Vec::new();
        while all.len() < n {
            match self.next().await {
                Seen::Received(bytes) => all.extend(bytes),
                other => panic!("expected bytes, the server saw {other:?}"),
            }
        }
        all
    }
}

async fn echo(
    mut conn: TcpStream,
    greeting: &[u8],
    seen: &mpsc::UnboundedSender<Seen>,
) -> std::io::Result<usize> {
    conn.write_all(greeting).await?;
    let mut buf = vec![0; 64 << 10];
    let mut total = 0;
    loop {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            conn.shutdown().await?;
            return Ok(total);
        }
        let _ = seen.send(Seen::Received(buf[..n].to_vec()));
        conn.write_all(&buf[..n]).await?;
        total += n;
    }
}

/// Deterministic bytes that are not a short repeating pattern.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Sends `data` through a new connection to the proxy while reading the echo, then half-closes
/// and reads to the end. Returns what came back.
async fn round_trip(proxy: &FaultProxy, data: &[u8]) -> Vec<u8> {
    let conn = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut read, mut write) = conn.into_split();
    let reader = tokio::spawn(async move {
        let mut back = Vec::new();
        read.read_to_end(&mut back).await.unwrap();
        back
    });
    write.write_all(data).await.unwrap();
    write.shutdown().await.unwrap();
    timeout(GUARD, reader).await.unwrap().unwrap()
}

/// Asserts that nothing can be read from `conn` for a while.
async fn nothing_arrives(conn: &mut TcpStream) {
    let mut buf = [0; 1];
    if let Ok(read) = timeout(QUIET, conn.read(&mut buf)).await {
        panic!("read {read:?} while the fault should hold it");
    }
}

/// An echo server, a proxy in front of it, and a client connection through it that has made one
/// exchange (so the upstream connection exists and the server has seen the bytes).
async fn warmed() -> (Echo, FaultProxy, TcpStream) {
    let mut server = Echo::start(b"").await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    conn.write_all(b"warm").await.unwrap();
    assert_eq!(read_n(&mut conn, 4).await, b"warm");
    assert!(matches!(server.next().await, Seen::Accepted));
    assert_eq!(server.received(4).await, b"warm");
    (server, proxy, conn)
}

async fn read_n(conn: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    timeout(GUARD, conn.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf
}

/// Waits until the proxy has no open connection (the count drops once both sides are closed).
async fn all_closed(proxy: &FaultProxy) {
    timeout(GUARD, async {
        while proxy.stats().open != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
}

async fn passes_through(fault: Fault) {
    let mut server = Echo::start(b"").await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    proxy.set(fault);
    assert_eq!(proxy.fault(), fault);
    let data = pattern(3 << 20);
    let back = round_trip(&proxy, &data).await;
    assert!(back == data, "the echo differs from what was sent");
    assert!(matches!(server.next().await, Seen::Accepted));
    all_closed(&proxy).await;
    let stats = proxy.stats();
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.open, 0);
    assert_eq!(stats.bytes_up, data.len() as u64);
    assert_eq!(stats.bytes_down, data.len() as u64);
    assert_eq!(stats.resets, 0);
    // The server saw the client's half-close and closed normally after echoing everything.
    let received = server.received(data.len()).await;
    assert!(received == data);
    assert!(matches!(server.next().await, Seen::Ended(Ok(n)) if n == data.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pass_unchanged_without_fault() {
    passes_through(Fault::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pass_unchanged_with_latency() {
    passes_through(Fault::Latency(Duration::from_millis(5))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_delays_each_direction() {
    let server = Echo::start(b"").await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    // One exchange first, so that the upstream connection exists.
    conn.write_all(b"warm").await.unwrap();
    assert_eq!(read_n(&mut conn, 4).await, b"warm");

    let delay = Duration::from_millis(150);
    proxy.set(Fault::Latency(delay));
    for _ in 0..3 {
        let start = Instant::now();
        conn.write_all(b"ping").await.unwrap();
        assert_eq!(read_n(&mut conn, 4).await, b"ping");
        let elapsed = start.elapsed();
        assert!(elapsed >= 2 * delay, "round trip took only {elapsed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifting_latency_delivers_queued_bytes() {
    let server = Echo::start(b"").await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    conn.write_all(b"warm").await.unwrap();
    assert_eq!(read_n(&mut conn, 4).await, b"warm");

    // Far longer than the guard: the bytes only come back because the latency is lifted.
    proxy.set(Fault::Latency(Duration::from_secs(3600)));
    conn.write_all(b"slow").await.unwrap();
    nothing_arrives(&mut conn).await;
    proxy.set(Fault::None);
    assert_eq!(read_n(&mut conn, 4).await, b"slow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_connection_does_not_hold_back_others() {
    let server = Echo::start(b"").await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    proxy.set(Fault::Latency(Duration::from_millis(20)));
    // One client sends far more than the proxy and the kernel buffers hold and never reads its
    // echo: its writes stall once every buffer on the way is full.
    let chunk = 1 << 20;
    let chunks = 1024;
    let stalled = TcpStream::connect(proxy.addr()).await.unwrap();
    let (_stalled_read, mut stalled_write) = stalled.into_split();
    let writer = tokio::spawn(async move {
        let buf = vec![7; chunk];
        for _ in 0..chunks {
            stalled_write.write_all(&buf).await?;
        }
        std::io::Result::Ok(())
    });
    tokio::time::sleep(QUIET).await;
    // Another connection is not held back by it.
    let data = pattern(100_000);
    assert!(round_trip(&proxy, &data).await == data);
    // The proxy stopped reading from the stalled client instead of buffering without bound.
    let stats = proxy.stats();
    assert!(stats.bytes_up < (chunk * chunks) as u64, "{stats:?}");
    assert!(!writer.is_finished());
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_holds_a_large_stream_then_releases_it_in_order() {
    let server = Echo::start(b"").await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    proxy.set(Fault::Partition);
    let data = pattern(16 << 20);
    let sent = data.clone();
    let addr = proxy.addr();
    let exchange = tokio::spawn(async move {
        let conn = TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = conn.into_split();
        let reader = tokio::spawn(async move {
            let mut back = Vec::new();
            read.read_to_end(&mut back).await.unwrap();
            back
        });
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
        reader.await.unwrap()
    });
    tokio::time::sleep(QUIET).await;
    let stats = proxy.stats();
    assert_eq!((stats.bytes_up, stats.bytes_down), (0, 0));
    assert!(!exchange.is_finished());
    proxy.set(Fault::None);
    let back = timeout(GUARD, exchange).await.unwrap().unwrap();
    assert!(back == data, "the echo differs from what was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_holds_everything_then_delivers_in_order() {
    let (mut server, proxy, mut conn) = warmed().await;
    let before = proxy.stats();

    proxy.set(Fault::Partition);
    conn.write_all(b"abc").await.unwrap();
    nothing_arrives(&mut conn).await;
    conn.write_all(b"def").await.unwrap();
    // A new connection is accepted by the proxy, but not connected upstream.
    let mut late = TcpStream::connect(proxy.addr()).await.unwrap();
    late.write_all(b"late").await.unwrap();
    nothing_arrives(&mut late).await;
    server.quiet().await;
    let during = proxy.stats();
    assert_eq!(during.accepted, 2);
    assert_eq!(during.open, 2);
    assert_eq!(during.bytes_up, before.bytes_up);
    assert_eq!(during.bytes_down, before.bytes_down);

    proxy.set(Fault::None);
    assert_eq!(read_n(&mut conn, 6).await, b"abcdef");
    assert_eq!(read_n(&mut late, 4).await, b"late");
    let after = proxy.stats();
    assert_eq!(after.bytes_up, before.bytes_up + 10);
    assert_eq!(after.bytes_down, before.bytes_down + 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_holds_a_half_close() {
    let (mut server, proxy, mut conn) = warmed().await;

    proxy.set(Fault::Partition);
    conn.write_all(b"last").await.unwrap();
    conn.shutdown().await.unwrap();
    server.quiet().await;
    proxy.set(Fault::None);
    let mut rest = Vec::new();
    timeout(GUARD, conn.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, b"last");
    assert_eq!(server.received(4).await, b"last");
    assert!(matches!(server.next().await, Seen::Ended(Ok(8))));
    all_closed(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_up_holds_only_client_to_server() {
    let mut server = Echo::start(b"hello").await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    proxy.set(Fault::OneWay(Direction::Up));
    // The connection is made upstream at once, and the server's greeting comes through.
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(read_n(&mut conn, 5).await, b"hello");
    assert!(matches!(server.next().await, Seen::Accepted));
    // The client's bytes are held: the server does not see them, so nothing is echoed.
    conn.write_all(b"up").await.unwrap();
    server.quiet().await;
    nothing_arrives(&mut conn).await;
    assert_eq!(proxy.stats().bytes_up, 0);
    assert_eq!(proxy.stats().bytes_down, 5);

    proxy.set(Fault::None);
    assert_eq!(server.received(2).await, b"up");
    assert_eq!(read_n(&mut conn, 2).await, b"up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_down_holds_only_server_to_client() {
    let mut server = Echo::start(b"hello").await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    proxy.set(Fault::OneWay(Direction::Down));
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(matches!(server.next().await, Seen::Accepted));
    // The greeting is held, but the client's bytes reach the server.
    nothing_arrives(&mut conn).await;
    conn.write_all(b"down").await.unwrap();
    assert_eq!(server.received(4).await, b"down");
    nothing_arrives(&mut conn).await;
    assert_eq!(proxy.stats().bytes_up, 4);
    assert_eq!(proxy.stats().bytes_down, 0);

    proxy.set(Fault::None);
    assert_eq!(read_n(&mut conn, 9).await, b"hellodown");
}

/// Reads from a connection the proxy has reset.
async fn read_after_reset(conn: &mut TcpStream) -> Result<usize, ErrorKind> {
    let mut buf = [0; 16];
    timeout(GUARD, conn.read(&mut buf))
        .await
        .unwrap()
        .map_err(|e| e.kind())
}

/// Connects to a proxy that resets new connections; returns how the reset showed.
async fn connect_after_reset(proxy: &FaultProxy) -> ErrorKind {
    match TcpStream::connect(proxy.addr()).await {
        Ok(mut conn) => read_after_reset(&mut conn).await.unwrap_err(),
        Err(e) => e.kind(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_closes_both_sides_with_rst() {
    let (mut server, proxy, mut conn) = warmed().await;

    proxy.set(Fault::Reset);
    // The RST is reported once, as ECONNRESET; after it the socket reads as closed and writes
    // fail with a broken pipe.
    assert_eq!(
        read_after_reset(&mut conn).await,
        Err(ErrorKind::ConnectionReset)
    );
    assert_eq!(read_after_reset(&mut conn).await, Ok(0));
    assert_eq!(
        conn.write_all(b"more").await.map_err(|e| e.kind()),
        Err(ErrorKind::BrokenPipe)
    );
    // The server's pending read fails the same way.
    assert!(matches!(
        server.next().await,
        Seen::Ended(Err(ErrorKind::ConnectionReset))
    ));

    // While Reset is set, a new connection is reset as soon as it is accepted, without an
    // upstream connection. On loopback the RST can arrive before the client's connect has
    // returned, and then the connect itself fails; otherwise the first read does.
    for _ in 0..10 {
        assert_eq!(
            connect_after_reset(&proxy).await,
            ErrorKind::ConnectionReset
        );
    }
    server.quiet().await;
    all_closed(&proxy).await;
    let stats = proxy.stats();
    assert_eq!(stats.accepted, 11);
    assert_eq!(stats.resets, 11);

    // Once lifted, new connections work again.
    proxy.set(Fault::None);
    let data = pattern(1000);
    assert!(round_trip(&proxy, &data).await == data);
    assert!(matches!(server.next().await, Seen::Accepted));
    assert_eq!(proxy.stats().resets, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brief_reset_still_resets_open_connections() {
    let (mut server, proxy, mut conn) = warmed().await;

    proxy.set(Fault::Reset);
    proxy.set(Fault::None);
    assert_eq!(
        read_after_reset(&mut conn).await,
        Err(ErrorKind::ConnectionReset)
    );
    assert!(matches!(
        server.next().await,
        Seen::Ended(Err(ErrorKind::ConnectionReset))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_reaches_connections_waiting_out_a_partition() {
    let mut server = Echo::start(b"").await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    proxy.set(Fault::Partition);
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    conn.write_all(b"held").await.unwrap();
    nothing_arrives(&mut conn).await;
    proxy.set(Fault::Reset);
    assert_eq!(
        read_after_reset(&mut conn).await,
        Err(ErrorKind::ConnectionReset)
    );
    // It never reached the server.
    server.quiet().await;
    assert_eq!(proxy.stats().resets, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_is_passed_upstream() {
    let (mut server, proxy, conn) = warmed().await;

    socket2::SockRef::from(&conn)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(conn);
    assert!(matches!(
        server.next().await,
        Seen::Ended(Err(ErrorKind::ConnectionReset))
    ));
    all_closed(&proxy).await;
    assert_eq!(proxy.stats().resets, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_connections_and_bytes() {
    let server = Echo::start(b"hi").await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    assert_eq!(proxy.stats(), Default::default());

    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(read_n(&mut a, 2).await, b"hi");
    assert_eq!(read_n(&mut b, 2).await, b"hi");
    a.write_all(&[1; 100]).await.unwrap();
    b.write_all(&[2; 30]).await.unwrap();
    assert_eq!(read_n(&mut a, 100).await, [1; 100]);
    assert_eq!(read_n(&mut b, 30).await, [2; 30]);
    let stats = proxy.stats();
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.open, 2);
    assert_eq!(stats.bytes_up, 130);
    assert_eq!(stats.bytes_down, 134);
    assert_eq!(stats.resets, 0);

    drop(a);
    drop(b);
    all_closed(&proxy).await;
    let stats = proxy.stats();
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.open, 0);
    assert!(format!("{proxy:?}").contains("accepted: 2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_proxy_closes_connections() {
    let server = Echo::start(b"").await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    let addr = proxy.addr();
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"warm").await.unwrap();
    assert_eq!(read_n(&mut conn, 4).await, b"warm");
    drop(proxy);
    let mut rest = Vec::new();
    timeout(GUARD, conn.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    // Nothing listens any more.
    let refused = TcpStream::connect(addr).await.map_err(|e| e.kind());
    assert_eq!(refused.err(), Some(ErrorKind::ConnectionRefused));
}

/// After `set_upstream`, new connections reach the new server; an open one stays with the server
/// it was made to.
#[tokio::test]
async fn set_upstream_moves_new_connections_only() {
    let (mut first, proxy, mut old_conn) = warmed().await;
    let mut second = Echo::start(b"").await;
    proxy.set_upstream(second.addr);
    assert_eq!(proxy.upstream(), second.addr);

    let mut new_conn = TcpStream::connect(proxy.addr()).await.unwrap();
    new_conn.write_all(b"new").await.unwrap();
    assert_eq!(read_n(&mut new_conn, 3).await, b"new");
    assert!(matches!(second.next().await, Seen::Accepted));
    assert_eq!(second.received(3).await, b"new");

    old_conn.write_all(b"old").await.unwrap();
    assert_eq!(read_n(&mut old_conn, 3).await, b"old");
    assert_eq!(first.received(3).await, b"old");
    second.quiet().await;
}
