//! The conformance suite on the ZooKeeper backend, against the server named by
//! `FENCED_TEST_ZK_URL` (`scripts/test` starts it), plus the checks only a queue of
//! `EPHEMERAL_SEQUENTIAL` nodes has: FIFO order, one wake-up per release with 100 waiters, the
//! node created without a reply, key escaping, session expiry and bad URLs. Without the server
//! every check fails, none skips.
#![cfg(feature = "zookeeper")]

use fenced_testkit::{Harness, require_env};

fenced_testkit::conformance_tests!(harness());

fn harness() -> Harness {
    Harness::new(
        require_env("FENCED_TEST_ZK_URL"),
        env!("CARGO_BIN_EXE_fenced-conformance-worker"),
    )
}

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fenced::backends::zookeeper::{ZooKeeperBackend, escape};
use fenced::layers::{CallCounts, Counting};
use fenced::{
    AcquireRequest, Acquired, Backend, Client, ErrorKind, Key, LockOptions, LostReason, OwnerId,
};
use fenced_testkit::{connect, unique_key, within};
use tokio::net::{TcpListener, TcpStream};

fn url() -> String {
    require_env("FENCED_TEST_ZK_URL")
}

/// The test server with a 2 s session timeout: crashed holders are freed fast.
fn fast_url() -> String {
    require_env("FENCED_TEST_ZK_FAST_URL")
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `zk://host:port` of `url`, without parameters.
fn address(url: &str) -> String {
    let rest = url.strip_prefix("zk://").expect("zk:// URL");
    rest.split(['/', '?']).next().expect("host").to_owned()
}

async fn backend(url: &str) -> ZooKeeperBackend {
    match ZooKeeperBackend::connect(url).await {
        Ok(b) => b,
        Err(e) => panic!("cannot connect to {}: {e}", fenced::redact(url)),
    }
}

/// Polls `fut` once and drops it; `true` if it was still pending (cut short).
async fn poll_once<F: std::future::Future>(fut: F) -> bool {
    let mut fut = Box::pin(fut);
    std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx).is_pending())).await
}

/// Waits until `n` nodes are in the queue of `key`.
async fn until_queued(backend: &ZooKeeperBackend, key: &Key, n: usize) {
    within(30, "waiters queuing", async {
        while backend.queue(key).await.expect("queue").len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Waiters are granted in the order they arrived, with increasing tokens, each in its own
/// client (its own session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_fairness() {
    let key = unique_key("zk-fifo");
    let observer = backend(&url()).await;
    let k = Key::new(&key).unwrap();
    let holder = connect(&url()).await;
    let guard = holder.lock(&key).await.expect("acquire");
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let waiters = 8;
    for i in 0..waiters {
        let client = connect(&url()).await;
        let (key, order) = (key.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let options = LockOptions::new().wait(secs(60));
            let guard = client.lock_with(&key, &options).await.expect("waiter");
            order
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((i, guard.token()));
            guard.release().await.expect("release");
        }));
        // Arrival order: the next waiter starts once this one has its place in the queue.
        until_queued(&observer, &k, i + 2).await;
    }
    guard.release().await.expect("release");
    for task in tasks {
        within(60, "waiters finishing", task).await.expect("task");
    }
    let order = order.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let arrived: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        arrived,
        (0..waiters).collect::<Vec<_>>(),
        "not granted in arrival order"
    );
    assert!(
        order.windows(2).all(|w| w[0].1 < w[1].1),
        "tokens not increasing: {order:?}"
    );
    assert!(order[0].1 > guard_token_floor(&order), "tokens");
}

fn guard_token_floor(order: &[(usize, fenced::FencingToken)]) -> fenced::FencingToken {
    fenced::FencingToken::new(order[0].1.get() - 1)
}

/// 100 waiters, each in its own client: every release wakes one waiter, counted as watch
/// wake-ups delivered (a herd would deliver about 100 per release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_release_wakes_one_waiter() {
    let key = unique_key("zk-herd");
    let k = Key::new(&key).unwrap();
    let observer = backend(&url()).await;
    let holder = connect(&url()).await;
    let guard = holder.lock(&key).await.expect("acquire");
    let waiters = 100usize;
    let mut counts: Vec<Arc<CallCounts>> = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..waiters {
        let counting = Counting::new(backend(&url()).await);
        counts.push(counting.counts());
        let client = Client::from_arc(Arc::new(counting), LockOptions::new());
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let guard = client
                .lock_with(&key, &LockOptions::new().wait(secs(120)))
                .await
                .expect("waiter");
            guard.release().await.expect("release");
        }));
    }
    until_queued(&observer, &k, waiters + 1).await;
    // Every waiter sits in `changed()` on its predecessor before the first release.
    within(30, "waiters watching", async {
        while counts
            .iter()
            .map(|c| c.watch.load(Ordering::SeqCst))
            .sum::<u64>()
            < waiters as u64
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let before: u64 = counts
        .iter()
        .map(|c| c.wakeups.load(Ordering::SeqCst))
        .sum();
    assert_eq!(before, 0, "waiters woke while the holder held the lock");
    guard.release().await.expect("release");
    within(120, "all waiters acquiring in turn", async {
        for task in tasks {
            task.await.expect("waiter task");
        }
    })
    .await;
    let wakeups: u64 = counts
        .iter()
        .map(|c| c.wakeups.load(Ordering::SeqCst))
        .sum();
    // 100 releases (the holder's and 99 waiters'); the last waiter's release wakes nobody.
    // Allow a few wake-ups of waiters whose predecessor was gone when they armed the watch.
    assert!(
        wakeups <= waiters as u64 + 5,
        "{wakeups} wake-ups for {waiters} releases: releases wake many waiters"
    );
    assert!(
        wakeups >= waiters as u64 - 5,
        "{wakeups} wake-ups: waiters were not woken by watches"
    );
    assert!(
        observer.queue(&k).await.expect("queue").is_empty(),
        "nodes left behind"
    );
}

/// A create whose reply never arrived (the request was sent, then the acquisition was dropped):
/// the node exists under a name the backend never learned. The next acquisition by that owner
/// reuses it, and a release by that owner deletes it; no orphan stays in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_without_reply_is_found() {
    let b = backend(&url()).await;
    let lease = secs(10);

    // Reused by the retry: the owner's only node, granted once.
    let key = Key::new(unique_key("zk-lost-reply")).unwrap();
    let other = connect(&url()).await;
    let guard = other.lock(key.as_str()).await.expect("holder");
    let owner = OwnerId::random();
    let request = AcquireRequest::new(&key, &owner, lease, "lost reply").with_queue(true);
    // Polled once: the create request is sent, then the future is dropped.
    assert!(
        poll_once(b.acquire(&request)).await,
        "the acquisition was not cut short"
    );
    until_queued(&b, &key, 2).await;
    let queue = b.queue(&key).await.expect("queue");
    assert_eq!(queue[1].1, owner, "the orphan is this owner's node");
    let orphan = queue[1].0.clone();
    let reply = b.acquire(&request).await.expect("retry");
    assert!(matches!(reply, Acquired::Held(_)), "{reply:?}");
    let queue = b.queue(&key).await.expect("queue");
    assert_eq!(queue.len(), 2, "the retry created a second node: {queue:?}");
    assert_eq!(queue[1].0, orphan, "the retry did not reuse the node");
    guard.release().await.expect("release");
    let granted = match b.acquire(&request).await.expect("retry") {
        Acquired::Granted(grant) => grant,
        other => panic!("the retry was not granted: {other:?}"),
    };
    let queue = b.queue(&key).await.expect("queue");
    assert_eq!(queue.len(), 1, "{queue:?}");
    assert_eq!(queue[0].0, orphan);
    let holder = b.holder(&key).await.expect("holder").expect("held");
    assert_eq!(holder.token, Some(granted.token));
    assert_eq!(holder.owner, Some(owner));
    let reply = b
        .release(&fenced::LockRef::new(&key, &owner))
        .await
        .expect("release");
    assert_eq!(reply, fenced::Confirm::Done);
    assert!(b.queue(&key).await.expect("queue").is_empty());

    // Deleted by a release: behind a holder, cut, then the waiter gives up.
    let guard = other.lock(key.as_str()).await.expect("holder");
    let owner = OwnerId::random();
    let request = AcquireRequest::new(&key, &owner, lease, "lost reply").with_queue(true);
    assert!(
        poll_once(b.acquire(&request)).await,
        "the acquisition was not cut short"
    );
    until_queued(&b, &key, 2).await;
    let reply = b
        .release(&fenced::LockRef::new(&key, &owner))
        .await
        .expect("release");
    assert!(
        matches!(reply, fenced::Confirm::NotHeld(Some(_))),
        "{reply:?}"
    );
    let queue = b.queue(&key).await.expect("queue");
    assert_eq!(queue.len(), 1, "the orphan is still queued: {queue:?}");
    assert_ne!(queue[0].1, owner);
    guard.release().await.expect("release");

    // The same through the client: acquisitions cut at random points while another client
    // holds the key leave no node behind once they returned or were dropped.
    let holder = other.lock(key.as_str()).await.expect("holder");
    let client = Client::new(b.clone());
    for i in 0..20u64 {
        let limit = Duration::from_micros(i * 250);
        let _ = tokio::time::timeout(
            limit,
            client.lock_with(key.as_str(), &LockOptions::new().wait(secs(5))),
        )
        .await;
    }
    within(10, "cut acquisitions leaving the queue", async {
        while b.queue(&key).await.expect("queue").len() > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    holder.release().await.expect("release");
}

/// Keys with `/`, `%`, dots, characters ZooKeeper refuses in names and other Unicode are stored
/// under one node each and come back unchanged from `holder` and `list`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_round_trip() {
    let b = backend(&url()).await;
    let client = Client::new(b.clone());
    let base = unique_key("zk-keys");
    let suffixes = [
        "/",
        "a/b/c",
        "%",
        "%2F",
        ".",
        "..",
        "\u{e000}\u{f8ff}",
        "\u{fff0}\u{fffd}",
        "ü 漢字 🔒",
        " ",
    ];
    let mut guards = Vec::new();
    for suffix in suffixes {
        let key = format!("{base}{suffix}");
        let guard = client
            .lock(&key)
            .await
            .unwrap_or_else(|e| panic!("{key:?}: {e}"));
        let path = b.key_path(guard.key());
        assert_eq!(path, format!("/fenced/{}", escape(&key)));
        let holder = client.holder(&key).await.expect("holder").expect("held");
        assert_eq!(holder.token, Some(guard.token()), "{key:?}");
        guards.push(guard);
    }
    let mut listed: Vec<String> = client
        .list(&base)
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.key.expect("key").as_str().to_owned())
        .collect();
    listed.sort();
    let mut expected: Vec<String> = suffixes.iter().map(|s| format!("{base}{s}")).collect();
    expected.sort();
    assert_eq!(listed, expected);
    for guard in guards {
        guard.release().await.expect("release");
    }
    assert!(client.list(&base).await.expect("list").is_empty());
}

/// A chroot that does not exist, wrong credentials and unreachable servers fail at connect time
/// with clear messages that never show the password; nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_fail_clearly() {
    let host = address(&url());
    let chroot = format!("/{}", unique_key("no-such-chroot").replace(':', "-"));
    let e = fenced::connect(&format!("zk://{host}{chroot}"))
        .await
        .expect_err("missing chroot");
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");

    // A prefix created with credentials is closed to other identities.
    let prefix = format!("auth-{:016x}", rand_u64());
    let good = format!("zk://fenced:right-pass@{host}?prefix={prefix}");
    let owner = connect(&good).await;
    let key = unique_key("zk-auth");
    let guard = owner.lock(&key).await.expect("acquire with credentials");
    for (bad, secret) in [
        (
            format!("zk://fenced:wrong-pass-xyz@{host}?prefix={prefix}"),
            "wrong-pass-xyz",
        ),
        (format!("zk://{host}?prefix={prefix}"), "right-pass"),
    ] {
        let e = fenced::connect(&bad)
            .await
            .expect_err("wrong credentials accepted");
        assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
        let text = e.to_string();
        assert!(text.contains("denied"), "{text}");
        assert!(!text.contains(secret), "{text}");
        assert!(!e.is_transient(), "{e}");
    }
    assert_eq!(
        owner.holder(&key).await.expect("holder").map(|h| h.token),
        Some(Some(guard.token())),
        "the failed connections touched the lock"
    );
    guard.release().await.expect("release");

    // Nothing listens on this port.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let e = fenced::connect(&format!("zk://u:hidden-pw@127.0.0.1:{port}?timeout=2s"))
        .await
        .expect_err("unreachable server");
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.is_transient());
    assert!(!e.to_string().contains("hidden-pw"), "{e}");
    assert!(e.to_string().contains(&port.to_string()), "{e}");

    for bad in [
        format!("zk://{host}?session_timeout=1ms"),
        format!("zk://{host}?nope=1"),
        format!("zk://{host}/a//b"),
        format!("zk://{host},,{host}"),
    ] {
        let e = fenced::connect(&bad).await.expect_err("bad URL accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}: {e}");
    }
}

fn rand_u64() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ u64::from(std::process::id()) << 32
}

/// Several hosts in the URL (here the same server twice) and a chroot that exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_list_and_chroot() {
    let host = address(&url());
    let chroot_name = format!("chroot-{:016x}", rand_u64());
    // Create the chroot through a backend whose prefix is that name.
    let maker = backend(&format!("zk://{host}?prefix={chroot_name}")).await;
    let client = connect(&format!("zk://{host},{host}/{chroot_name}?prefix=app")).await;
    let key = unique_key("zk-chroot");
    let guard = client.lock(&key).await.expect("acquire under the chroot");
    let listed = client.list("").await.expect("list");
    assert!(
        listed
            .iter()
            .any(|i| i.key.as_ref().map(|k| k.as_str()) == Some(key.as_str()))
    );
    guard.release().await.expect("release");
    drop(maker);
}

/// A holder process killed with -9: its session expires (2 s here) and a waiter gets the lock
/// with a higher token (the conformance check, on the short-session URL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_holder_session_expires() {
    fenced_testkit::suite::crashed_holder_expires(&fenced_testkit::Harness::new(
        fast_url(),
        env!("CARGO_BIN_EXE_fenced-conformance-worker"),
    ))
    .await;
}

/// A loopback TCP proxy that can cut every connection and refuse new ones.
struct Proxy {
    port: u16,
    open: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(tokio::sync::watch::channel(0u64).0);
        let (o, g) = (open.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let target = target.clone();
                let mut cut = g.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            open,
            generation,
        }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// Losing the connection marks the lock at risk; reconnecting within the session keeps it.
/// Staying away past the session timeout loses it, and another client gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_marks_at_risk_then_session_decides() {
    let proxy = Proxy::start(address(&url())).await;
    let through = format!(
        "zk://127.0.0.1:{}?session_timeout=4s&timeout=1s",
        proxy.port
    );
    let client = connect(&through).await;
    let key = unique_key("zk-at-risk");
    let guard = client.lock(&key).await.expect("acquire");
    let signal = guard.lost_signal();
    assert!(!guard.is_at_risk());

    proxy.cut();
    assert!(within(10, "at risk after the cut", signal.at_risk_changed()).await);
    assert!(guard.is_at_risk());
    proxy.restore();
    assert!(!within(10, "safe after reconnecting", signal.at_risk_changed()).await);
    assert!(!guard.is_lost(), "{:?}", signal.reason());
    let other = connect(&url()).await;
    assert!(
        other.try_lock(&key).await.expect("try_lock").is_none(),
        "the lock was not kept"
    );

    proxy.cut();
    let reason = within(20, "lost after the session timeout", guard.lost()).await;
    assert!(
        matches!(
            reason,
            LostReason::Expired | LostReason::SessionEnded | LostReason::NotHeld
        ),
        "{reason:?}"
    );
    let next = within(
        30,
        "another client acquiring",
        other.lock_with(&key, &LockOptions::new().wait(secs(30))),
    )
    .await
    .expect("acquire after expiry");
    assert!(next.token() > guard.token());
    proxy.restore();
    next.release().await.expect("release");
    // The backend opened a new session: the client works again.
    let again = within(
        30,
        "locking on a new session",
        client.lock_with(&key, &LockOptions::new().wait(secs(20))),
    )
    .await
    .expect("acquire on a new session");
    // The old guard's release neither succeeds nor touches the new holder.
    let err = guard
        .release()
        .await
        .expect_err("release of an expired lock succeeded");
    assert_eq!(err.kind(), ErrorKind::Lost, "{err}");
    again
        .release()
        .await
        .expect("the new holder still holds the lock");
}
