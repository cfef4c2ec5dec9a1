//! The conformance suite on the MySQL / MariaDB backend in both modes, against the server named by
//! `FENCED_TEST_MYSQL_URL`, plus its own checks: tokens across modes and forced releases, a
//! killed session connection, the modes excluding each other, long and SQL-special keys, TLS and
//! bad input. `scripts/test` starts the server; without it every check fails, none skips.
#![cfg(feature = "mysql")]

use std::time::Duration;

use fenced::backends::mysql::MysqlBackend;
use fenced::{Client, ErrorKind, LockOptions, LostReason};
use fenced_testkit::{require_env, unique_key, within};

fn url() -> String {
    require_env("FENCED_TEST_MYSQL_URL")
}

/// The session-mode URL (a short session timeout keeps the crash checks quick).
fn session_url() -> String {
    format!("{}?mode=session&session_timeout=3s&timeout=1s", url())
}

mod lease {
    fenced_testkit::conformance_tests!(fenced_testkit::Harness::new(
        super::url(),
        env!("CARGO_BIN_EXE_fenced-conformance-worker")
    ));
}

mod session {
    fenced_testkit::conformance_tests!(fenced_testkit::Harness::new(
        super::session_url(),
        env!("CARGO_BIN_EXE_fenced-conformance-worker")
    ));
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

async fn backend(url: &str) -> MysqlBackend {
    match MysqlBackend::connect(url).await {
        Ok(b) => b,
        Err(e) => panic!("cannot connect to {}: {e}", fenced::redact(url)),
    }
}

/// The password in `url` (`mysql://user:PASSWORD@…`).
fn password_of(url: &str) -> String {
    url.split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, p)| p.to_owned())
        .expect("a password in the URL")
}

/// Runs `sql` with the `mariadb` client as the user of `url` (the password through the
/// environment, never on the command line).
fn mariadb(url: &str, sql: &str) -> String {
    let parsed = url::Url::parse(url).expect("url");
    let out = std::process::Command::new("mariadb")
        .env("MYSQL_PWD", password_of(url))
        .args(["--no-defaults", "-N", "-B", "--protocol=TCP"])
        .arg(format!("--host={}", parsed.host_str().expect("host")))
        .arg(format!("--port={}", parsed.port().expect("port")))
        .arg(format!("--user={}", parsed.username()))
        .arg(parsed.path().trim_start_matches('/'))
        .args(["-e", sql])
        .output()
        .expect("the mariadb client runs");
    assert!(
        out.status.success(),
        "mariadb {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Tokens strictly increase per key across lease-mode and session-mode clients and across forced
/// releases (the row, and its counter, stays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_increase_across_modes_and_forced_release() {
    let key = unique_key("modes-tokens");
    let lease = fenced_testkit::connect(&url()).await;
    let session = fenced_testkit::connect(&session_url()).await;
    let mut last = 0;
    for round in 0..3 {
        for client in [&lease, &session] {
            let guard = within(10, "acquire", client.lock(&key))
                .await
                .expect("acquire");
            assert!(guard.token().get() > last, "round {round}: token went back");
            last = guard.token().get();
            if round == 1 {
                let broken = client
                    .force_release(&key)
                    .await
                    .expect("force release")
                    .expect("it was held");
                assert_eq!(broken.token, Some(guard.token()));
                let reason = within(15, "lost after the forced release", guard.lost()).await;
                assert!(
                    matches!(reason, LostReason::NotHeld | LostReason::TakenOver),
                    "{reason:?}"
                );
            } else {
                guard.release().await.expect("release");
            }
        }
    }
    let row = mariadb(
        &url(),
        &format!("SELECT token, owner IS NULL FROM fenced_locks WHERE lock_key = '{key}'"),
    );
    assert_eq!(
        row.trim(),
        format!("{last}\t1"),
        "the row and its counter stay"
    );
}

/// A session-mode client and a lease-mode client never hold one key at once, and two owners in
/// one session-mode client (whose `GET_LOCK` is re-entrant) are not both granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_exclude_each_other_and_named_locks_do_not_reenter() {
    let key = unique_key("modes-exclude");
    let lease = fenced_testkit::connect(&url()).await;
    let session = fenced_testkit::connect(&session_url()).await;

    let held = session.lock(&key).await.expect("session acquire");
    assert!(lease.try_lock(&key).await.expect("try_lock").is_none());
    assert!(
        session.try_lock(&key).await.expect("try_lock").is_none(),
        "a second owner in the same session was granted"
    );
    let info = lease.holder(&key).await.expect("holder").expect("held");
    assert_eq!(info.owner, Some(held.owner()));
    held.release().await.expect("release");

    let held = lease.lock(&key).await.expect("lease acquire");
    assert!(session.try_lock(&key).await.expect("try_lock").is_none());
    // The session client waits and gets the key when the lease-mode holder releases.
    let waiter = {
        let (session, key) = (session.clone(), key.clone());
        tokio::spawn(async move {
            session
                .lock_with(&key, &LockOptions::new().wait(secs(30)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first = held.token();
    held.release().await.expect("release");
    let next = within(30, "the session waiter", waiter)
        .await
        .expect("task")
        .expect("acquire");
    assert!(next.token() > first);
    assert!(lease.try_lock(&key).await.expect("try_lock").is_none());
    next.release().await.expect("release");
}

/// A session-mode holder whose connection is killed on the server loses its lock (its lost
/// signal fires), and another session-mode client takes the key over at once; the killed
/// client's backend opens a new session for later locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_session_fires_lost_and_frees_the_key() {
    let key = unique_key("killed");
    let holder_backend = backend(&session_url()).await;
    let holder = Client::new(holder_backend.clone());
    let guard = holder.lock(&key).await.expect("acquire");
    let killed = holder_backend.connection_id();
    assert!(killed > 0);
    mariadb(&url(), &format!("KILL {killed}"));

    let reason = within(20, "lost() after the session was killed", guard.lost()).await;
    assert!(
        matches!(reason, LostReason::SessionEnded | LostReason::NotHeld),
        "{reason:?}"
    );
    let other = fenced_testkit::connect(&session_url()).await;
    let next = within(
        20,
        "another client acquiring",
        other.lock_with(&key, &LockOptions::new().wait(secs(15))),
    )
    .await
    .expect("acquire after the kill");
    assert!(next.token() > guard.token());
    let err = guard.release().await.expect_err("release of a lost lock");
    assert_eq!(err.kind(), ErrorKind::Lost);
    next.release().await.expect("release");

    // The killed client's backend works again, on a new connection.
    let again = within(20, "acquire on a new session", holder.lock(&key))
        .await
        .expect("acquire");
    assert_ne!(holder_backend.connection_id(), killed);
    again.release().await.expect("release");
}

/// Keys of 512 bytes and keys full of SQL-special characters round-trip through `holder` and
/// `list`, in both modes, and are compared byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_special_and_long_keys_round_trip() {
    for url in [url(), session_url()] {
        let client = fenced_testkit::connect(&url).await;
        let base = unique_key("special");
        let long = format!("{base}/{}", "é".repeat((512 - base.len() - 1) / 2));
        let long = format!("{long}{}", "x".repeat(512 - long.len()));
        assert_eq!(long.len(), 512);
        let keys = [
            format!("{base}/'\";\\%_--"),
            format!("{base}/' OR '1'='1"),
            format!("{base}/\\'); DROP TABLE fenced_locks; --"),
            format!("{base}/%"),
            format!("{base}/_"),
            format!("{base}/A"),
            format!("{base}/a"),
            long.clone(),
        ];
        let mut guards = Vec::new();
        for key in &keys {
            let guard = client
                .lock_with(key, &LockOptions::new().label("l'a\"b;%_\\"))
                .await
                .unwrap_or_else(|e| panic!("acquire {key:?}: {e}"));
            let info = client.holder(key).await.expect("holder").expect("held");
            assert_eq!(info.token, Some(guard.token()));
            assert_eq!(info.label.as_deref(), Some("l'a\"b;%_\\"));
            guards.push(guard);
        }
        let mut sorted = keys.to_vec();
        sorted.sort();
        let listed: Vec<String> = client
            .list(&format!("{base}/"))
            .await
            .expect("list")
            .into_iter()
            .map(|i| i.key.expect("key").as_str().to_owned())
            .collect();
        assert_eq!(listed, sorted, "{}", fenced::redact(&url));
        // `%` and `_` are plain characters in a prefix.
        let under_percent = client.list(&format!("{base}/%")).await.expect("list");
        assert_eq!(under_percent.len(), 1);
        let too_long = format!("{long}y");
        let e = client.try_lock(&too_long).await.expect_err("513-byte key");
        assert_eq!(e.kind(), ErrorKind::InvalidKey);
        for guard in guards {
            guard.release().await.expect("release");
        }
        assert!(client.list(&base).await.expect("list").is_empty());
    }
}

/// TLS with a private CA works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let tls = require_env("FENCED_TEST_MYSQL_TLS_URL");
    let client = fenced_testkit::connect(&tls).await;
    let key = unique_key("tls");
    let guard = client.lock(&key).await.expect("acquire over TLS");
    guard.release().await.expect("release");
}

/// Wrong password, missing database, unreachable server, a user that may not create the table
/// and bad parameters fail clearly; no message shows the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_explained() {
    let url = url();
    let password = password_of(&url);
    let check = |e: &fenced::Error, expect: &str| {
        let text = format!("{e} {e:?}");
        assert!(text.contains(expect), "{text}");
        assert!(!text.contains(&password), "{text}");
    };

    let wrong = url.replace(&password, "wrong-password");
    let e = fenced::connect(&wrong).await.expect_err("wrong password");
    assert_eq!(e.kind(), ErrorKind::Backend);
    assert!(!e.is_transient());
    check(&e, "user name or password");
    assert!(!e.to_string().contains("wrong-password"), "{e}");

    let missing = url.replace("/fenced_test", "/no_such_db");
    let e = fenced::connect(&missing)
        .await
        .expect_err("missing database");
    check(&e, "does not exist");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let unreachable =
        format!("mysql://fenced:{password}@127.0.0.1:{port}/fenced_test?timeout=500ms");
    let e = fenced::connect(&unreachable)
        .await
        .expect_err("unreachable");
    assert!(e.is_transient(), "{e}");
    check(&e, "running");

    let limited = require_env("FENCED_TEST_MYSQL_LIMITED_URL");
    let limited_password = password_of(&limited);
    let e = fenced::connect(&limited)
        .await
        .expect_err("may not create the table");
    assert!(!e.is_transient());
    check(&e, &MysqlBackend::schema_sql("fenced_locks"));
    check(&e, "GRANT CREATE");
    assert!(!e.to_string().contains(&limited_password), "{e}");

    for (bad, expect) in [
        (format!("{url}?tabel=x"), "unknown parameter"),
        (format!("{url}?mode=sessions"), "not a mode"),
        (format!("{url}?table=a;b"), "plain table name"),
        (format!("{url}?ssl=maybe"), "true or false"),
    ] {
        let e = fenced::connect(&bad).await.expect_err(&bad);
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
        check(&e, expect);
    }
}

/// In lease mode a release wakes a waiter of another client through the bell, long before the
/// holder's lease would have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_rings_the_bell() {
    let key = unique_key("bell");
    let holder = fenced_testkit::connect(&url()).await;
    let waiter_backend = backend(&url()).await;
    let waiter = Client::new(waiter_backend.clone());
    let guard = holder
        .lock_with(&key, &LockOptions::new().lease(secs(600)))
        .await
        .expect("acquire");
    let task = {
        let key = key.clone();
        tokio::spawn(async move {
            waiter
                .lock_with(&key, &LockOptions::new().wait(secs(600)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(waiter_backend.wakeups(), 0, "woken while nothing changed");
    guard.release().await.expect("release");
    // A 600 s lease: only the bell can wake the waiter within the guard.
    let next = within(30, "the waiter woken by the release", task)
        .await
        .expect("task")
        .expect("acquire");
    assert_eq!(waiter_backend.wakeups(), 1);
    next.release().await.expect("release");
}
