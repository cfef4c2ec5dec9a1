//! The conformance suite on the etcd backend, against the server named by
//! `FENCED_TEST_ETCD_URL`, plus etcd's own checks: FIFO fairness, no herd with 100 waiters, the
//! waiter whose session ended while it waited (the regression Jepsen found in etcd's lock), the
//! transaction compare helper, and bad input. TLS and authentication use the second server named
//! by `FENCED_TEST_ETCDS_URL`. `scripts/test` starts both; without them every check fails, none
//! skips.
#![cfg(feature = "etcd")]

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fenced::backends::etcd::EtcdBackend;
use fenced::{Client, ErrorKind, LockOptions, LostReason};
use fenced_testkit::{Harness, require_env, unique_key, within};

fenced_testkit::conformance_tests!(Harness::from_env(
    "FENCED_TEST_ETCD_URL",
    env!("CARGO_BIN_EXE_fenced-conformance-worker")
));

fn url() -> String {
    require_env("FENCED_TEST_ETCD_URL")
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

async fn backend(url: &str) -> EtcdBackend {
    match EtcdBackend::connect(url).await {
        Ok(b) => b,
        Err(e) => panic!("cannot connect to {}: {e}", fenced::redact(url)),
    }
}

/// The number of clients waiting on `key`, as the holder's status reports it.
async fn waiters(client: &Client, key: &str) -> u64 {
    client
        .holder(key)
        .await
        .expect("holder")
        .and_then(|h| h.waiters)
        .unwrap_or(0)
}

async fn until_waiters(client: &Client, key: &str, n: u64) {
    within(60, "waiters queueing", async {
        while waiters(client, key).await != n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// `etcdctl` against the server of `url` (plain `etcd://` only).
fn etcdctl(url: &str, args: &[&str]) -> String {
    let endpoint = url
        .strip_prefix("etcd://")
        .and_then(|rest| rest.split(['/', '?']).next())
        .expect("an etcd:// URL");
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=http://{endpoint}"))
        .args(args)
        .output()
        .expect("etcdctl runs");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waiters are granted in the order they arrived, each in its own client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_granted_in_arrival_order() {
    let url = url();
    let key = unique_key("fifo");
    let admin = fenced_testkit::connect(&url).await;
    let holder = admin.lock(&key).await.expect("acquire");
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let client = fenced_testkit::connect(&url).await;
        let (queued, order) = (key.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let guard = client
                .lock_with(&queued, &LockOptions::new().wait(secs(60)))
                .await
                .expect("waiter acquire");
            order
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((i, guard.token()));
            guard.release().await.expect("release");
        }));
        // The next waiter arrives only once this one is queued.
        until_waiters(&admin, &key, i + 1).await;
    }
    holder.release().await.expect("release");
    for task in tasks {
        within(60, "waiters finishing", task).await.expect("task");
    }
    let order = order.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let arrived: Vec<u64> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        arrived,
        (0..6).collect::<Vec<_>>(),
        "grants out of arrival order"
    );
    assert!(order.windows(2).all(|w| w[0].1 < w[1].1));
}

/// With 100 waiters, each in its own client, one release wakes one waiter: the watch events
/// delivered equal the hand-offs, and no waiter is woken twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_release_wakes_one_of_100_waiters() {
    let url = url();
    let key = unique_key("herd100");
    let admin = fenced_testkit::connect(&url).await;
    let holder = admin.lock(&key).await.expect("acquire");
    let mut backends = Vec::new();
    let mut tasks = Vec::new();
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    for _ in 0..100 {
        let backend = backend(&url).await;
        let client = Client::new(backend.clone());
        backends.push(backend);
        let (key, mut go) = (key.clone(), go_rx.clone());
        tasks.push(tokio::spawn(async move {
            let guard = client
                .lock_with(&key, &LockOptions::new().wait(secs(120)))
                .await
                .expect("waiter acquire");
            // Hold until the check below has looked at the first hand-off.
            let _ = go.wait_for(|go| *go).await;
            guard.release().await.expect("release");
        }));
    }
    until_waiters(&admin, &key, 100).await;
    let events =
        |backends: &[EtcdBackend]| backends.iter().map(EtcdBackend::watch_events).sum::<u64>();
    assert_eq!(events(&backends), 0, "watch events before any release");

    holder.release().await.expect("release");
    // Exactly one waiter takes over; the 99 others stay asleep.
    within(30, "the first hand-off", async {
        while waiters(&admin, &key).await != 99 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        events(&backends),
        1,
        "one release woke more than one waiter"
    );

    go_tx.send_replace(true);
    for task in tasks {
        within(120, "waiters finishing", task).await.expect("task");
    }
    // 100 releases had a successor (the holder's and 99 waiters'); the last one had none.
    assert_eq!(events(&backends), 100);
    assert!(
        backends.iter().all(|b| b.watch_events() == 1),
        "a waiter was woken more than once"
    );
}

/// A waiter whose session lease ended while it waited is not told it holds the lock when its
/// predecessor leaves (the regression Jepsen found in etcd's lock recipe), and leaves nothing
/// behind: the next client gets the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_whose_session_ended_is_not_granted() {
    let url = url();
    let key = unique_key("jepsen");
    let admin = fenced_testkit::connect(&url).await;
    let holder = admin.lock(&key).await.expect("acquire");
    let waiter_backend = backend(&url).await;
    let waiter = {
        let client = Client::new(waiter_backend.clone());
        let key = key.clone();
        tokio::spawn(async move {
            client
                .lock_with(&key, &LockOptions::new().wait(secs(60)))
                .await
        })
    };
    until_waiters(&admin, &key, 1).await;
    let lease = format!("{:x}", waiter_backend.session_lease_id());
    etcdctl(&url, &["lease", "revoke", &lease]);
    until_waiters(&admin, &key, 0).await;
    holder.release().await.expect("release");
    let result = within(30, "the waiter answering", waiter)
        .await
        .expect("task");
    let err = result.expect_err("a waiter whose session ended was granted the lock");
    assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
    assert!(err.to_string().contains("session"), "{err}");
    // Nothing is left in the queue; the waiter's backend works again with a new session.
    assert!(admin.holder(&key).await.expect("holder").is_none());
    let again = within(
        30,
        "the waiter's client acquiring with its new session",
        Client::new(waiter_backend.clone()).lock_with(&key, &LockOptions::new().wait(secs(20))),
    )
    .await
    .expect("acquire with a new session");
    assert_ne!(
        format!("{:x}", waiter_backend.session_lease_id()),
        lease,
        "no new session"
    );
    again.release().await.expect("release");
}

/// A holder whose session lease is revoked learns it: `lost()` fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_session_fires_lost() {
    let url = url();
    let key = unique_key("revoked");
    let holder_backend = backend(&url).await;
    let client = Client::new(holder_backend.clone());
    let guard = client.lock(&key).await.expect("acquire");
    etcdctl(
        &url,
        &[
            "lease",
            "revoke",
            &format!("{:x}", holder_backend.session_lease_id()),
        ],
    );
    let reason = within(20, "lost() after the session was revoked", guard.lost()).await;
    assert!(
        matches!(reason, LostReason::SessionEnded | LostReason::NotHeld),
        "{reason:?}"
    );
    let other = fenced_testkit::connect(&url).await;
    let next = within(20, "acquire after the revoke", other.lock(&key))
        .await
        .expect("acquire");
    assert!(next.token() > guard.token());
    next.release().await.expect("release");
}

/// The compare from `owner_check` holds exactly while the guard holds the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_check_guards_a_callers_transaction() {
    use etcd_client::{Txn, TxnOp};
    let url = url();
    let key = unique_key("owner-check");
    let backend = backend(&url).await;
    let client = Client::new(backend.clone());
    let endpoint = url
        .strip_prefix("etcd://")
        .and_then(|rest| rest.split(['/', '?']).next())
        .expect("an etcd:// URL")
        .to_owned();
    let mut etcd = etcd_client::Client::connect([endpoint], None)
        .await
        .expect("etcd client");
    let data = format!("{key}/data");
    let guard = client.lock(&key).await.expect("acquire");
    let check = backend.owner_check(&guard);
    assert_eq!(check.create_revision as u64, guard.token().get());
    let write = |value: &'static str| {
        Txn::new()
            .when([check.compare()])
            .and_then([TxnOp::put(data.clone(), value, None)])
    };
    assert!(etcd.txn(write("first")).await.expect("txn").succeeded());
    guard.release().await.expect("release");
    assert!(
        !etcd.txn(write("stale")).await.expect("txn").succeeded(),
        "a released holder's compare still held"
    );
    let value = etcd.get(data.clone(), None).await.expect("get");
    assert_eq!(value.kvs()[0].value(), b"first");
    etcd.delete(data, None).await.expect("cleanup");
}

/// TLS with a private CA and user/password authentication work; wrong credentials, unreachable
/// endpoints and keys the user may not write fail clearly, without the password, and leave no
/// lock behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_auth_and_bad_input() {
    let secure = require_env("FENCED_TEST_ETCDS_URL");
    let client = fenced_testkit::connect(&secure).await;
    let key = unique_key("tls");
    let guard = client
        .lock(&key)
        .await
        .expect("acquire over TLS with a user");
    assert_eq!(client.list(&key).await.expect("list").len(), 1);
    guard.release().await.expect("release");

    let password = secure
        .split_once("fenced:")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(p, _)| p.to_owned())
        .expect("a password in the URL");
    let wrong = secure.replace(&password, "wrong-password");
    let e = fenced::connect(&wrong)
        .await
        .expect_err("wrong password accepted");
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(!e.is_transient(), "{e}");
    let text = format!("{e} {e:?}");
    assert!(text.contains("credentials"), "{text}");
    assert!(
        !text.contains("wrong-password") && !text.contains(&password),
        "{text}"
    );

    // Outside the user's permitted prefix nothing can be stored.
    let elsewhere = format!("{secure}&prefix=other");
    let other = fenced_testkit::connect(&elsewhere).await;
    let e = other
        .try_lock(&key)
        .await
        .expect_err("a key outside the permissions was stored");
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.to_string().contains("permission"), "{e}");
    assert!(!e.to_string().contains(&password), "{e}");

    // Plain etcd:// to a TLS server fails clearly.
    let plain = secure.replacen("etcds://", "etcd://", 1);
    let plain = plain
        .split_once("/?")
        .map(|(u, _)| u.to_owned())
        .expect("query");
    let e = fenced::connect(&format!("{plain}?timeout=500ms"))
        .await
        .expect_err("plain connection to a TLS server");
    assert!(!e.to_string().contains(&password), "{e}");

    // An unreachable endpoint.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let e = fenced::connect(&format!("etcd://127.0.0.1:{free}?timeout=300ms"))
        .await
        .expect_err("unreachable endpoint accepted");
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.is_transient());

    // Bad URLs.
    for (bad, expect) in [
        ("etcd://127.0.0.1:1?sesion_ttl=2s", "unknown parameter"),
        ("etcd://127.0.0.1:1?session_ttl=1500ms", "whole seconds"),
        ("etcd://127.0.0.1:1,:2", "host:port"),
    ] {
        let e = fenced::connect(bad).await.expect_err(bad);
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}: {e}");
        assert!(e.to_string().contains(expect), "{bad}: {e}");
    }
    assert!(client.list(&key).await.expect("list").is_empty());
}

/// A failover URL: an unreachable endpoint first, the live one second, works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_first_endpoint_fails_over() {
    let url = url();
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let live = url.strip_prefix("etcd://").expect("etcd URL");
    let client = fenced_testkit::connect(&format!("etcd://127.0.0.1:{free},{live}")).await;
    let key = unique_key("failover");
    for _ in 0..5 {
        let guard = within(30, "acquire", client.lock(&key))
            .await
            .expect("acquire");
        guard.release().await.expect("release");
    }
}
