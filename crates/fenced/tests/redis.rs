//! The Redis backend against a real server. `scripts/test` starts one and exports
//! `FENCED_TEST_REDIS_URL` and `FENCED_TEST_REDISS_URL`; without them these tests fail (they
//! never skip silently).
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use fenced::backends::redis::RedisBackend;
use fenced::{Backend, Client, ErrorKind, Key, LockOptions, LostReason};
use tokio::time::{Instant, timeout};

fn env_url(name: &str) -> String {
    match std::env::var(name) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{name} is not set: these tests need a real Redis server; run scripts/test, which starts Redis \
             and sets it (or run scripts/servers and export what it prints)"
        ),
    }
}

fn redis_url() -> String {
    env_url("FENCED_TEST_REDIS_URL")
}

/// A URL with `params` appended (the test URL has no query of its own).
fn with_params(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

/// The password of a test URL.
fn password(url: &str) -> String {
    url::Url::parse(url)
        .unwrap()
        .password()
        .expect("the test URL has a password")
        .to_owned()
}

/// A unique prefix per test, so tests running in parallel never share keys or channels.
fn prefix(test: &str) -> String {
    format!("fenced-test-{test}-{}", rand::random::<u32>())
}

async fn backend(test: &str) -> RedisBackend {
    RedisBackend::connect(&with_params(
        &redis_url(),
        &format!("prefix={}", prefix(test)),
    ))
    .await
    .expect("connect to FENCED_TEST_REDIS_URL")
}

/// A plain connection for raw commands behind the backend's back.
async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn numsub(conn: &mut redis::aio::MultiplexedConnection, channel: &str) -> i64 {
    let reply: (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(conn)
        .await
        .unwrap();
    reply.1
}

/// Waits until `channel` has `n` subscribers on the server.
async fn wait_numsub(
    conn: &mut redis::aio::MultiplexedConnection,
    channel: &str,
    n: i64,
    what: &str,
) {
    let start = Instant::now();
    while numsub(conn, channel).await != n {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `check` every 10 ms until it is true, failing after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn lock_and_release_round_trip() {
    let backend = backend("basic").await;
    let client = Client::new(backend.clone());
    let guard = client.lock("order:42").await.unwrap();
    let holder = client.holder("order:42").await.unwrap().unwrap();
    assert_eq!(holder.token, Some(guard.token()));
    assert_eq!(holder.owner, Some(guard.owner()));
    assert!(holder.remaining.unwrap() <= Duration::from_secs(30));
    assert!(client.try_lock("order:42").await.unwrap().is_none());
    guard.release().await.unwrap();
    assert!(client.holder("order:42").await.unwrap().is_none());
    assert_eq!(backend.name(), "redis");
    assert!(backend.capabilities().native_wait);
}

#[tokio::test]
async fn tls_connects_with_the_given_ca() {
    let url = env_url("FENCED_TEST_REDISS_URL");
    let client = fenced::connect(&url).await.expect("rediss:// with tls_ca");
    let guard = client.lock("tls").await.unwrap();
    guard.release().await.unwrap();

    // Without the private CA the server's certificate is not trusted: a clear, final error.
    let (without_ca, _) = url.split_once('?').unwrap();
    let e = fenced::connect(without_ca).await.unwrap_err();
    let text = e.to_string();
    assert_eq!(e.kind(), ErrorKind::Backend, "{text}");
    assert!(!e.is_transient(), "{text}");
    assert!(text.contains("tls_ca"), "{text}");
    assert!(!text.contains(&password(&url)), "{text}");
}

#[tokio::test]
async fn wrong_password_is_clear_and_redacted() {
    let url = redis_url();
    let real = password(&url);
    let wrong = url.replace(&real, "not-the-password-417");
    let e = fenced::connect(&wrong).await.unwrap_err();
    let text = e.to_string();
    assert_eq!(e.kind(), ErrorKind::Backend, "{text}");
    assert!(!e.is_transient(), "{text}");
    assert!(text.contains("check the password"), "{text}");
    assert!(text.contains(":***@"), "{text}");
    for secret in [&real, "not-the-password-417"] {
        assert!(!text.contains(secret), "{text}");
        assert!(!format!("{e:?}").contains(secret));
    }

    // No password at all: the server's NOAUTH becomes advice to add one.
    let none = url.replace(&format!(":{real}@"), "");
    let e = fenced::connect(&none).await.unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("requires a password"), "{e}");

    // The backend's Debug output never shows the password either.
    let backend = backend("debug").await;
    assert!(!format!("{backend:?}").contains(&real));
}

#[tokio::test]
async fn keys_with_braces_and_percent_round_trip() {
    let backend = backend("escape").await;
    let client = Client::new(backend.clone());
    let mut conn = raw().await;
    let keys = [
        "{", "}", "%", "%7B", "%7D", "%25", "{a}", "a{b}c", "{}{}", "x%7By",
    ];
    let mut guards = Vec::new();
    for key in keys {
        let guard = client
            .try_lock(key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{key:?} collided with another key"));
        let names = backend.key_names(&Key::new(key).unwrap());
        for name in [&names.lock, &names.fence, &names.channel] {
            // The hash tag (first `{` to the next `}`) is the same for every name of one key.
            let open = name.find('{').unwrap();
            let close = open + name[open..].find('}').unwrap();
            assert_eq!(
                &name[open + 1..close],
                &names.lock[open + 1..close],
                "{name}"
            );
            assert!(close > open + 1, "{name}: empty hash tag");
        }
        let owner: Option<String> = redis::cmd("HGET")
            .arg(&names.lock)
            .arg("owner")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(owner, Some(guard.owner().to_string()), "{key:?}");
        guards.push((key, guard));
    }
    for (key, guard) in guards {
        let holder = client.holder(key).await.unwrap().unwrap();
        assert_eq!(holder.owner, Some(guard.owner()), "{key:?}");
        guard.release().await.unwrap();
    }
}

#[tokio::test]
async fn fence_counter_outlives_the_lock() {
    let backend = backend("fence").await;
    let client = Client::new(backend.clone());
    let names = backend.key_names(&Key::new("job").unwrap());
    let mut conn = raw().await;

    let first = client.lock("job").await.unwrap();
    let token = first.token().get();
    first.release().await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&names.lock)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "the lock hash is deleted on release");
    let fence: u64 = redis::cmd("GET")
        .arg(&names.fence)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(fence, token);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&names.fence)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ttl, -1, "the fence key never expires");

    let second = client.lock("job").await.unwrap();
    assert!(second.token().get() > token);
    let broken = client.force_release("job").await.unwrap().unwrap();
    assert_eq!(broken.token, Some(second.token()));
    let third = client.lock("job").await.unwrap();
    assert!(
        third.token() > second.token(),
        "force release keeps the counter"
    );
    third.release().await.unwrap();
    drop(second);
}

#[tokio::test]
async fn a_lost_fence_counter_does_not_reissue_tokens() {
    // What a restart without persistence or a failover to a lagging replica does to the counter.
    let backend = backend("fence-lost").await;
    let client = Client::new(backend.clone());
    let names = backend.key_names(&Key::new("job").unwrap());
    let mut conn = raw().await;
    let mut last = 0;
    for _ in 0..3 {
        let guard = client.lock("job").await.unwrap();
        assert!(guard.token().get() > last);
        last = guard.token().get();
        guard.release().await.unwrap();
        let _: i64 = redis::cmd("DEL")
            .arg(&names.fence)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // Many grants in a row still count up one by one past the clock.
    let mut tokens = Vec::new();
    for _ in 0..50 {
        let guard = client.try_lock("job").await.unwrap().unwrap();
        tokens.push(guard.token().get());
        guard.release().await.unwrap();
    }
    assert!(tokens[0] > last);
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}

#[tokio::test]
async fn deleting_the_lock_behind_the_holders_back_fires_lost() {
    let backend = backend("lost").await;
    let client = Client::new(backend.clone());
    let options = LockOptions::new().lease(Duration::from_millis(600));
    let guard = client.lock_with("victim", &options).await.unwrap();
    let names = backend.key_names(guard.key());
    let mut conn = raw().await;
    let deleted: i64 = redis::cmd("DEL")
        .arg(&names.lock)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let reason = timeout(Duration::from_secs(2), guard.lost())
        .await
        .expect("lost() fires at the next renewal");
    assert_eq!(reason, LostReason::NotHeld);
    let e = guard.release().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Lost);
}

#[tokio::test]
async fn taken_over_lock_fires_lost_with_the_new_holder() {
    let backend = backend("takeover").await;
    let client = Client::new(backend.clone());
    let options = LockOptions::new().lease(Duration::from_millis(600));
    let guard = client.lock_with("k", &options).await.unwrap();
    client.force_release("k").await.unwrap();
    let thief = client.try_lock("k").await.unwrap().unwrap();
    assert!(thief.token() > guard.token());
    let reason = timeout(Duration::from_secs(2), guard.lost()).await.unwrap();
    assert_eq!(reason, LostReason::TakenOver);
    thief.release().await.unwrap();
}

/// Counts the SUBSCRIBE commands naming `channel` that the server processes (via MONITOR).
async fn count_subscribes(
    channel: String,
) -> (
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    use futures_core::Stream;
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let monitor = redis::Client::open(redis_url())
        .unwrap()
        .get_async_monitor()
        .await
        .unwrap();
    let mut stream = monitor.into_on_message::<String>();
    let seen = count.clone();
    let task = tokio::spawn(async move {
        while let Some(line) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut stream).poll_next(cx)).await
        {
            let lower = line.to_ascii_lowercase();
            if lower.contains("\"subscribe\"") && line.contains(&channel) {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    // Make sure MONITOR is active before the test starts counting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    (task, count)
}

#[tokio::test]
async fn one_subscribe_per_key_however_many_waiters() {
    let backend = backend("numsub").await;
    let holder = Client::new(backend.clone());
    let key = "contended";
    let channel = backend.key_names(&Key::new(key).unwrap()).channel;
    let mut conn = raw().await;
    let (monitor, subscribes) = count_subscribes(channel.clone()).await;

    let guard = holder.lock(key).await.unwrap();
    // Separate clients over one backend: each client queues its own waiters, so each of these
    // waits remotely, and they share one subscription.
    let shared: Arc<dyn Backend> = Arc::new(backend.clone());
    let mut waiters = Vec::new();
    for _ in 0..5 {
        let client = Client::from_arc(shared.clone(), LockOptions::new());
        waiters.push(tokio::spawn(async move {
            let guard = client.lock(key).await.unwrap();
            let token = guard.token();
            guard.release().await.unwrap();
            token
        }));
    }
    wait_numsub(&mut conn, &channel, 1, "the waiters subscribed").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(backend.subscribed_channels(), 1);
    assert_eq!(numsub(&mut conn, &channel).await, 1);

    guard.release().await.unwrap();
    // The guard is far shorter than the 30 s lease: the waiters were woken by the release.
    for waiter in waiters {
        timeout(Duration::from_secs(10), waiter)
            .await
            .expect("waiters were not woken by the release")
            .unwrap();
    }
    wait_numsub(&mut conn, &channel, 0, "the last waiter unsubscribed").await;
    // The channel stayed subscribed while any waiter waited (the others keep waiting after each
    // hand-off), so one SUBSCRIBE served all five.
    assert_eq!(subscribes.load(std::sync::atomic::Ordering::SeqCst), 1);
    monitor.abort();
}

#[tokio::test]
async fn one_subscribe_for_concurrent_watches_of_a_key() {
    let backend = backend("watches").await;
    let key = Key::new("watched").unwrap();
    let channel = backend.key_names(&key).channel;
    let (monitor, subscribes) = count_subscribes(channel.clone()).await;
    let mut watches = Vec::new();
    for _ in 0..10 {
        watches.push(backend.watch(&key).await.unwrap());
    }
    let more = futures_join(&backend, &key, 10).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(subscribes.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(watches);
    drop(more);
    let mut conn = raw().await;
    wait_numsub(&mut conn, &channel, 0, "unsubscribed").await;
    monitor.abort();
}

/// `n` watches created concurrently.
async fn futures_join(backend: &RedisBackend, key: &Key, n: usize) -> Vec<Box<dyn fenced::Watch>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let backend = backend.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(
            async move { backend.watch(&key).await.unwrap() },
        ));
    }
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_watch_wakes_on_release() {
    let backend = backend("wake").await;
    let client = Client::new(backend.clone());
    let key = Key::new("k").unwrap();
    let guard = client.lock("k").await.unwrap();
    let mut watch = backend.watch(&key).await.unwrap();
    guard.release().await.unwrap();
    timeout(Duration::from_secs(2), watch.changed())
        .await
        .expect("woken by the release")
        .unwrap();
}

/// Creates a Redis user allowed only `permissions` on the keys and channels under `prefix`, and
/// returns its name, its password and the test server's URL logging in as it.
async fn acl_user(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    permissions: &str,
) -> (String, String, url::Url) {
    let user = format!("fenced-test-{}", rand::random::<u32>());
    let secret = format!("pw-{:016x}", rand::random::<u64>());
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{secret}"))
        .arg(format!("~{prefix}:*"))
        .arg(format!("&{prefix}:*"))
        .arg(permissions.split_whitespace().collect::<Vec<_>>())
        .query_async(conn)
        .await
        .unwrap();
    let mut url = url::Url::parse(&redis_url()).unwrap();
    url.set_username(&user).unwrap();
    url.set_password(Some(&secret)).unwrap();
    (user, secret, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_reconnect_resubscribes_and_waiters_still_wake() {
    // The waiter connects as a Redis user of its own, so that `CLIENT KILL USER` cuts only its
    // pub/sub connection and no other test's. The user has exactly the permissions the backend
    // docs list, which this test checks too.
    let prefix = prefix("reconnect");
    let mut conn = raw().await;
    let (user, _, mut url) = acl_user(
        &mut conn,
        &prefix,
        "+evalsha +eval +script|load +ping +subscribe +unsubscribe +select +hmget +hset +incrby \
             +time +del +pexpire +pttl +publish +scan +pubsub|numsub",
    )
    .await;
    url.set_query(Some(&format!("prefix={prefix}")));
    let backend = RedisBackend::connect(url.as_str())
        .await
        .expect("connect as a user with the documented permissions");
    // The holder uses another backend (the default user): only the waiter's backend waits on
    // the pub/sub connection that gets killed.
    let holder = Client::new(
        RedisBackend::connect(&with_params(&redis_url(), &format!("prefix={prefix}")))
            .await
            .unwrap(),
    );
    let waiter = Client::new(backend.clone());
    let key = "reconnect";
    let channel = backend.key_names(&Key::new(key).unwrap()).channel;
    let long = LockOptions::new().lease(Duration::from_secs(30));

    for round in 0..2 {
        let guard = holder.lock_with(key, &long).await.unwrap();
        let guard_token = guard.token();
        let task = {
            let waiter = waiter.clone();
            tokio::spawn(async move { waiter.lock(key).await.map(|g| g.token()) })
        };
        wait_numsub(&mut conn, &channel, 1, "the waiter subscribed").await;
        // The documented permissions cover the status commands too.
        let listed = waiter.list("").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].token, Some(guard_token));
        assert_eq!(listed[0].waiters, Some(1));
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("USER")
            .arg(&user)
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(killed, 1, "the waiter's pub/sub connection");
        if round == 1 {
            // Round 1: wait for the resubscription first, then release normally.
            wait_numsub(&mut conn, &channel, 1, "resubscribed after the kill").await;
        }
        // Round 0: release while the subscription is gone; the message is lost, and the
        // waiter must be woken by the re-check after the reconnect.
        guard.release().await.unwrap();
        let token = timeout(Duration::from_secs(10), task)
            .await
            .expect("the waiter woke well before the 30 s lease")
            .unwrap()
            .unwrap();
        assert!(token > guard_token, "round {round}");
        // The waiter's guard was dropped at the end of its task, which releases in the background.
        eventually(Duration::from_secs(5), "the waiter's lock released", || {
            let holder = holder.clone();
            async move { holder.holder(key).await.unwrap().is_none() }
        })
        .await;
    }
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_degrades_to_backoff_when_subscribing_fails() {
    // A user that may publish but not subscribe: the watch cannot be confirmed, so waiting falls
    // back to re-checking with backoff instead of failing the lock.
    let prefix = prefix("degraded");
    let mut conn = raw().await;
    let (user, _, mut url) = acl_user(
        &mut conn,
        &prefix,
        "+evalsha +eval +script|load +ping +select +hmget +hset +incrby +time +del +pexpire +pttl \
             +publish",
    )
    .await;
    url.set_query(Some(&format!("prefix={prefix}&timeout=300ms")));
    let waiter = Client::new(RedisBackend::connect(url.as_str()).await.unwrap());
    let holder = Client::new(
        RedisBackend::connect(&with_params(&redis_url(), &format!("prefix={prefix}")))
            .await
            .unwrap(),
    );
    let long = LockOptions::new().lease(Duration::from_secs(30));
    let guard = holder.lock_with("k", &long).await.unwrap();
    let held_token = guard.token();
    let task = tokio::spawn(async move {
        let guard = waiter
            .lock_with("k", &LockOptions::new().wait(Duration::from_secs(20)))
            .await?;
        let token = guard.token();
        guard.release().await?;
        Ok::<_, fenced::Error>(token)
    });
    // Longer than the subscription timeout, so the waiter is in its degraded wait.
    tokio::time::sleep(Duration::from_millis(800)).await;
    guard.release().await.unwrap();
    let token = timeout(Duration::from_secs(5), task)
        .await
        .expect("the waiter re-checked well before the 30 s lease ended")
        .unwrap()
        .unwrap();
    assert!(token > held_token);
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// A backend whose prefix (the `prefix` URL parameter) is `prefix`, percent-encoded in the URL.
async fn backend_with_prefix(prefix: &str) -> RedisBackend {
    let encoded: String = prefix
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let backend = RedisBackend::connect(&with_params(&redis_url(), &format!("prefix={encoded}")))
        .await
        .expect("connect to FENCED_TEST_REDIS_URL");
    assert_eq!(backend.prefix(), prefix);
    backend
}

fn listed_keys(listed: &[fenced::HolderInfo]) -> Vec<&str> {
    listed
        .iter()
        .map(|info| info.key.as_ref().expect("list sets the key").as_str())
        .collect()
}

#[tokio::test]
async fn list_escapes_glob_characters_and_decodes_keys() {
    // Glob metacharacters in the backend's own prefix too; a second backend whose prefix the
    // unescaped pattern would match holds a key that must not show up.
    let n = rand::random::<u32>();
    let backend = backend_with_prefix(&format!("fenced-test-list[*]?\\-{n}")).await;
    let decoy = backend_with_prefix(&format!("fenced-test-list*X-{n}")).await;
    let client = Client::new(backend.clone());
    let keys = [
        "job:",
        "job:1",
        "job:1 x",
        "job:{2}",
        "job:%7B",
        "job:%",
        "job:*",
        "job:?",
        "job:[a]",
        "job:a",
        "job:\\",
        "job:}:lock",
        "job:x}:fence",
        "jobs",
        "other:1",
    ];
    let mut guards = Vec::new();
    for key in keys {
        guards.push(client.lock(key).await.unwrap());
    }
    let decoy_guard = Client::new(decoy.clone()).lock("job:1").await.unwrap();
    let list = |prefix: &'static str| {
        let backend = backend.clone();
        async move { backend.list(prefix).await.unwrap() }
    };

    let mut expected: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| k.starts_with("job:"))
        .collect();
    expected.sort_unstable();
    let all = list("job:").await;
    assert_eq!(listed_keys(&all), expected);
    for (info, guard) in all.iter().zip(expected.iter().map(|k| {
        guards
            .iter()
            .find(|g| g.key().as_str() == *k)
            .expect("a guard per key")
    })) {
        assert_eq!(info.owner, Some(guard.owner()));
        assert_eq!(info.token, Some(guard.token()));
    }
    // Each of these would match more keys if the prefix were not escaped (as a key, then as a
    // glob), or fewer if escaped keys were not decoded.
    assert_eq!(listed_keys(&list("job:*").await), ["job:*"]);
    assert_eq!(listed_keys(&list("job:?").await), ["job:?"]);
    assert_eq!(listed_keys(&list("job:[a]").await), ["job:[a]"]);
    assert_eq!(listed_keys(&list("job:\\").await), ["job:\\"]);
    assert_eq!(listed_keys(&list("job:%").await), ["job:%", "job:%7B"]);
    assert_eq!(listed_keys(&list("job:{").await), ["job:{2}"]);
    assert_eq!(listed_keys(&list("job:}").await), ["job:}:lock"]);
    assert_eq!(listed_keys(&list("job:1").await), ["job:1", "job:1 x"]);
    assert_eq!(list("").await.len(), keys.len());
    assert!(list("job:nothing").await.is_empty());
    assert_eq!(listed_keys(&decoy.list("").await.unwrap()), ["job:1"]);

    // Names under the prefix that fenced did not write as lock hashes are skipped: a hash
    // without an owner (as a lock released between SCAN and the read looks) and a name whose
    // escaping fenced cannot have written.
    let mut conn = raw().await;
    let p = backend.prefix().to_owned();
    for name in [
        format!("{p}:{{job:ghost}}:lock"),
        format!("{p}:{{job:%zz}}:lock"),
    ] {
        let _: i64 = redis::cmd("HSET")
            .arg(&name)
            .arg("something")
            .arg("else")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(list("job:").await.len(), expected.len());

    // Released keys go; their fence keys stay and are never listed.
    for guard in guards {
        guard.release().await.unwrap();
    }
    decoy_guard.release().await.unwrap();
    assert!(list("").await.is_empty());
    let fences: Vec<String> = redis::cmd("KEYS")
        .arg(format!(
            "{}:*:fence",
            p.replace(['[', ']', '*', '?', '\\'], "?")
        ))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(fences.len() >= keys.len(), "{fences:?}");

    // A key under the prefix of another type is someone else's data: a clear error.
    let _: () = redis::cmd("SET")
        .arg(format!("{p}:{{job:string}}:lock"))
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let e = backend.list("job:").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(
        e.to_string().contains("another program uses this prefix"),
        "{e}"
    );
}

#[tokio::test]
async fn list_walks_the_whole_keyspace_in_steps() {
    let backend = backend("list-many").await;
    let owner = fenced::OwnerId::random();
    let count = 1200; // more than one SCAN step of 500
    let mut keys: Vec<String> = (0..count).map(|i| format!("many:{i}")).collect();
    for key in &keys {
        let key = Key::new(key).unwrap();
        let reply = backend
            .acquire(&fenced::AcquireRequest::new(
                &key,
                &owner,
                Duration::from_secs(60),
                "many",
            ))
            .await
            .unwrap();
        assert!(matches!(reply, fenced::Acquired::Granted(_)));
    }
    let listed = backend.list("many:").await.unwrap();
    keys.sort_unstable();
    assert_eq!(listed_keys(&listed), keys);
    assert!(listed.iter().all(|i| i.owner == Some(owner)));
    for key in &keys {
        backend
            .force_release(&Key::new(key).unwrap())
            .await
            .unwrap();
    }
    assert!(backend.list("").await.unwrap().is_empty());
}

#[tokio::test]
async fn age_is_measured_by_the_server_from_the_grant() {
    let backend = backend("age").await;
    let key = Key::new("aged").unwrap();
    let names = backend.key_names(&key);
    let owner = fenced::OwnerId::random();
    let mut conn = raw().await;
    let request = fenced::AcquireRequest::new(&key, &owner, Duration::from_secs(30), "aged");
    let before = Instant::now();
    assert!(matches!(
        backend.acquire(&request).await.unwrap(),
        fenced::Acquired::Granted(_)
    ));
    let age = backend.holder(&key).await.unwrap().unwrap().age.unwrap();
    assert!(age <= before.elapsed(), "{age:?}");

    // The grant time is the server's, in microseconds; move it 5 s back.
    let granted: i64 = redis::cmd("HGET")
        .arg(&names.lock)
        .arg("granted")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    assert!(granted <= secs * 1_000_000 + micros);
    let _: i64 = redis::cmd("HSET")
        .arg(&names.lock)
        .arg("granted")
        .arg(granted - 5_000_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    // A renewal and a retried acquire by the same owner keep the grant.
    assert_eq!(
        backend
            .extend(&fenced::LockRef::new(&key, &owner), Duration::from_secs(30))
            .await
            .unwrap(),
        fenced::Confirm::Done
    );
    assert!(matches!(
        backend.acquire(&request).await.unwrap(),
        fenced::Acquired::Granted(_)
    ));
    let age = backend.holder(&key).await.unwrap().unwrap().age.unwrap();
    assert!(age >= Duration::from_secs(5), "{age:?}");
    assert!(age <= Duration::from_secs(5) + before.elapsed(), "{age:?}");
    // Other owners see it too.
    let other = fenced::OwnerId::random();
    match backend
        .acquire(&fenced::AcquireRequest::new(
            &key,
            &other,
            Duration::from_secs(30),
            "x",
        ))
        .await
        .unwrap()
    {
        fenced::Acquired::Held(info) => assert!(info.age.unwrap() >= Duration::from_secs(5)),
        granted => panic!("{granted:?}"),
    }
    match backend
        .release(&fenced::LockRef::new(&key, &other))
        .await
        .unwrap()
    {
        fenced::Confirm::NotHeld(Some(info)) => {
            assert!(info.age.unwrap() >= Duration::from_secs(5))
        }
        c => panic!("{c:?}"),
    }

    // A grant time in the future (the server's clock was set back) reads as 0, not as garbage.
    let _: i64 = redis::cmd("HSET")
        .arg(&names.lock)
        .arg("granted")
        .arg(granted + 3_600_000_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        backend.holder(&key).await.unwrap().unwrap().age,
        Some(Duration::ZERO)
    );
    // A lock written by a version that stored no grant time has an unknown age.
    let _: i64 = redis::cmd("HDEL")
        .arg(&names.lock)
        .arg("granted")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(backend.holder(&key).await.unwrap().unwrap().age, None);
    assert_eq!(backend.list("").await.unwrap()[0].age, None);
    let broken = backend.force_release(&key).await.unwrap().unwrap();
    assert_eq!(broken.owner, Some(owner));
    assert_eq!(broken.age, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_count_subscribed_clients_not_tasks() {
    let backend = backend("waiters").await;
    let prefix = backend.prefix().to_owned();
    let key = "busy";
    let holder = Client::new(backend.clone());
    let guard = holder.lock(key).await.unwrap();
    let waiters = || {
        let holder = holder.clone();
        async move { holder.holder(key).await.unwrap().unwrap().waiters }
    };
    assert_eq!(waiters().await, Some(0));

    // Two more backends (two service instances): three tasks wait on one, one on the other.
    let url = with_params(&redis_url(), &format!("prefix={prefix}"));
    let mut tasks = Vec::new();
    for tasks_on_client in [3, 1] {
        let client = Client::new(RedisBackend::connect(&url).await.unwrap());
        for _ in 0..tasks_on_client {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let guard = client.lock(key).await.unwrap();
                guard.release().await.unwrap();
            }));
        }
    }
    eventually(Duration::from_secs(10), "both clients counted", || async {
        waiters().await == Some(2)
    })
    .await;
    let listed = holder.list("").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].waiters, Some(2));
    let broken = holder.force_release(key).await.unwrap().unwrap();
    assert_eq!(broken.waiters, Some(2));
    for task in tasks {
        timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }
    drop(guard);

    // Once nobody waits, a new holder has none.
    let again = holder.lock(key).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the waiters unsubscribed",
        || async { waiters().await == Some(0) },
    )
    .await;
    again.release().await.unwrap();
}

#[tokio::test]
async fn a_user_without_scan_or_numsub_gets_clear_answers() {
    // The permissions of the documented ACL line except the two used only for status: holder
    // still works (without a waiter count), list fails with a message naming the problem.
    let prefix = prefix("acl-list");
    let mut conn = raw().await;
    let (user, secret, mut url) = acl_user(
        &mut conn,
        &prefix,
        "+evalsha +eval +script|load +ping +subscribe +unsubscribe +select +hmget +hset +incrby \
             +time +del +pexpire +pttl +publish",
    )
    .await;
    url.set_query(Some(&format!("prefix={prefix}")));
    let client = fenced::connect(url.as_str()).await.unwrap();
    let guard = client.lock("k").await.unwrap();
    let info = client.holder("k").await.unwrap().unwrap();
    assert_eq!(info.token, Some(guard.token()));
    assert!(info.age.is_some());
    assert_eq!(info.waiters, None);
    let e = client.list("").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.to_string().contains("lacks a permission"), "{e}");
    assert!(!e.to_string().contains(&secret), "{e}");
    let broken = client.force_release("k").await.unwrap().unwrap();
    assert_eq!(broken.waiters, None);
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut conn)
        .await
        .unwrap();
    drop(guard);
}
