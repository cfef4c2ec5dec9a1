//! The conformance suite on the PostgreSQL backend in both modes, against the server named by
//! `FENCED_TEST_PG_URL`, plus PostgreSQL's own checks. `scripts/test` starts the server; without
//! it every check fails, none skips.
#![cfg(feature = "postgres")]

use std::time::Duration;

use fenced::backends::postgres::PostgresBackend;
use fenced::{Client, ErrorKind, LockOptions, LostReason};
use fenced_testkit::{require_env, unique_key, within};

fn url() -> String {
    require_env("FENCED_TEST_PG_URL")
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

async fn backend(url: &str) -> PostgresBackend {
    match PostgresBackend::connect(url).await {
        Ok(b) => b,
        Err(e) => panic!("cannot connect to {}: {e}", fenced::redact(url)),
    }
}

/// psql as the superuser of the test server (as the `postgres` system user when run as root).
fn psql(sql: &str) -> String {
    let admin = require_env("FENCED_TEST_PG_ADMIN");
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let mut command = if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", "psql"]);
        c
    } else {
        std::process::Command::new("psql")
    };
    command
        .args(admin.split_whitespace())
        .args(["-X", "-A", "-t", "-d", "fenced_test", "-c", sql]);
    let out = command.output().expect("psql runs");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Tokens keep increasing for one key across lease-mode and session-mode clients and across a
/// forced release (the row, and so the counter, stays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_increase_across_modes_and_forced_release() {
    let key = unique_key("pg-tokens");
    let lease = fenced_testkit::connect(&url()).await;
    let session = fenced_testkit::connect(&session_url()).await;
    let mut tokens = Vec::new();
    for round in 0..3 {
        let g = lease.lock(&key).await.expect("lease acquire");
        tokens.push(g.token());
        g.release().await.expect("release");
        let g = session.lock(&key).await.expect("session acquire");
        tokens.push(g.token());
        if round == 1 {
            let broken = lease.force_release(&key).await.expect("force");
            assert_eq!(broken.and_then(|h| h.token), Some(g.token()));
            assert_eq!(
                within(30, "lost after force_release", g.lost()).await,
                LostReason::NotHeld
            );
        } else {
            g.release().await.expect("release");
        }
    }
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens not increasing: {tokens:?}"
    );
}

/// A lease-mode holder excludes session-mode clients and the other way round; in session mode
/// a second owner in the same client (same connection, where advisory locks are re-entrant) is
/// refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_exclude_each_other_and_advisory_locks_do_not_reenter() {
    let key = unique_key("pg-modes");
    let lease = fenced_testkit::connect(&url()).await;
    let session = fenced_testkit::connect(&session_url()).await;
    let g = lease.lock(&key).await.expect("lease acquire");
    assert!(session.try_lock(&key).await.expect("try").is_none());
    g.release().await.expect("release");
    let g = session.lock(&key).await.expect("session acquire");
    assert!(lease.try_lock(&key).await.expect("try").is_none());
    assert!(
        session.try_lock(&key).await.expect("try").is_none(),
        "the same session granted the key twice"
    );
    let waiter = {
        let (session, key) = (session.clone(), key.clone());
        tokio::spawn(async move {
            session
                .lock_with(&key, &LockOptions::new().wait(Duration::from_secs(30)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiter.is_finished(),
        "a waiter of the same session was granted"
    );
    let first = g.token();
    g.release().await.expect("release");
    let second = within(30, "waiter of the same session", waiter)
        .await
        .expect("task")
        .expect("waiter acquire");
    assert!(second.token() > first);
    second.release().await.expect("release");
}

/// When the server ends a session-mode client's connection, its guards report the lock lost
/// and another session takes the key at once (the advisory lock went with the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_session_fires_lost_and_frees_the_key() {
    let key = unique_key("pg-session-end");
    let b = backend(&session_url()).await;
    let pid = b.server_pid().await.expect("pid");
    let holder = Client::new(b);
    let g = holder.lock(&key).await.expect("acquire");
    let first = g.token();
    assert_eq!(
        psql(&format!("SELECT pg_terminate_backend({pid})")),
        "t",
        "terminate"
    );
    let reason = within(30, "lost after the session ended", g.lost()).await;
    assert!(
        matches!(reason, LostReason::SessionEnded | LostReason::NotHeld),
        "{reason:?}"
    );
    let other = fenced_testkit::connect(&session_url()).await;
    let next = other
        .try_lock(&key)
        .await
        .expect("try")
        .expect("the key is free once the session ended");
    assert!(next.token() > first);
    next.release().await.expect("release");
    // The holder's client opens a new session for new locks.
    let again = holder
        .lock(unique_key("pg-after-end"))
        .await
        .expect("new session");
    again.release().await.expect("release");
}

/// Keys full of SQL-special characters and keys of the largest size are stored as given and
/// listed as given; nothing is interpreted as SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_special_and_long_keys_round_trip() {
    let prefix = unique_key("pg-odd");
    let keys = [
        format!("{prefix}:'; DROP TABLE fenced_locks; --"),
        format!("{prefix}:\\\"%_*?$1 \u{e9}\u{1f512}"),
        format!("{prefix}:{}", "k".repeat(512 - prefix.len() - 1)),
    ];
    for url in [url(), session_url()] {
        let client = fenced_testkit::connect(&url).await;
        let mut guards = Vec::new();
        for key in &keys {
            guards.push(client.lock(key).await.expect("acquire"));
            let holder = client.holder(key).await.expect("holder").expect("held");
            assert_eq!(holder.token, Some(guards.last().expect("guard").token()));
        }
        let listed: Vec<String> = client
            .list(&prefix)
            .await
            .expect("list")
            .into_iter()
            .filter_map(|h| h.key.map(|k| k.as_str().to_owned()))
            .collect();
        let mut expected = keys.to_vec();
        expected.sort();
        assert_eq!(listed, expected);
        for g in guards {
            g.release().await.expect("release");
        }
    }
    assert_eq!(psql("SELECT count(*) > 0 FROM fenced_locks"), "t");
}

/// Bad URLs and credentials fail at connect with a message that says what to do and never
/// shows the password; a user that may not create the lock table is told the SQL to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_explained() {
    let good = url::Url::parse(&url()).expect("url");
    let password = good.password().expect("password").to_owned();
    let at = |user: &str, pw: &str, port: u16, db: &str| {
        format!(
            "postgres://{user}:{pw}@{}:{port}/{db}",
            good.host_str().expect("host")
        )
    };
    let port = good.port().expect("port");
    let cases = [
        (
            at("fenced", "not-the-password", port, "fenced_test"),
            ErrorKind::Backend,
            "password",
        ),
        (
            at("fenced", &password, port, "no_such_db"),
            ErrorKind::InvalidConfig,
            "CREATE DATABASE",
        ),
        (
            format!("{}?tabel=x", url()),
            ErrorKind::InvalidConfig,
            "unknown parameter",
        ),
        (
            format!("{}?table=x;y", url()),
            ErrorKind::InvalidConfig,
            "table",
        ),
        (
            at("fenced", &password, 1, "fenced_test"),
            ErrorKind::Backend,
            "refused",
        ),
        (
            require_env("FENCED_TEST_PG_LIMITED_URL"),
            ErrorKind::Backend,
            "CREATE TABLE IF NOT EXISTS fenced_locks",
        ),
        (
            require_env("FENCED_TEST_PG_TLS_URL")
                .split("&tls_ca")
                .next()
                .expect("url")
                .to_owned(),
            ErrorKind::Backend,
            "TLS",
        ),
    ];
    for (bad, kind, says) in cases {
        let e = PostgresBackend::connect(&bad)
            .await
            .expect_err("a bad URL connected");
        let text = format!("{e} {:?}", std::error::Error::source(&e));
        assert_eq!(e.kind(), kind, "{bad}: {text}");
        assert!(text.contains(says), "{says}: {text}");
        assert!(!text.contains(&password), "{text}");
        assert!(!text.contains("not-the-password"), "{text}");
    }
    let limited = PostgresBackend::connect(&require_env("FENCED_TEST_PG_LIMITED_URL"))
        .await
        .expect_err("limited user");
    assert!(limited.to_string().contains("GRANT"), "{limited}");
    assert!(!limited.is_transient());
}

/// TLS with the server's own CA, checked against the host name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let client = fenced_testkit::connect(&require_env("FENCED_TEST_PG_TLS_URL")).await;
    let g = client
        .lock(unique_key("pg-tls"))
        .await
        .expect("acquire over TLS");
    g.release().await.expect("release");
}

/// The fencing condition guards the caller's own writes in the same database: the holder's
/// write lands; once the lock changed hands, the old holder's write changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_condition_rejects_a_former_holders_write() {
    use fenced::backends::postgres::fence_condition;
    let key = unique_key("pg-fence");
    let table = format!("fence_demo_{:x}", rand_suffix());
    psql(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, balance int); INSERT INTO {table} VALUES (1, 0); \
         GRANT ALL ON {table} TO fenced"
    ));
    let sql = format!(
        "UPDATE {table} SET balance = balance + $1 WHERE id = 1 AND {}",
        fence_condition("fenced_locks", 2, 3)
    );
    // The application's own connection, as it would write its data.
    let (app, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
        .await
        .expect("app connects");
    tokio::spawn(connection);
    let app = &app;
    let write = |guard: &fenced::LockGuard, amount: i32| {
        let (sql, key, token) = (
            sql.clone(),
            guard.key().as_str().to_owned(),
            guard.token().get() as i64,
        );
        async move {
            app.execute(&sql, &[&amount, &key, &token])
                .await
                .expect("update")
        }
    };
    for mode_url in [url(), session_url()] {
        let a = fenced_testkit::connect(&mode_url).await;
        let b = fenced_testkit::connect(&mode_url).await;
        let old = a.lock(&key).await.expect("acquire");
        assert_eq!(write(&old, 1).await, 1);
        a.force_release(&key).await.expect("force");
        let new = b.lock(&key).await.expect("acquire");
        assert_eq!(
            write(&old, 100).await,
            0,
            "the former holder's write landed"
        );
        assert_eq!(write(&new, 10).await, 1);
        let released = write(&new, 1000);
        new.release().await.expect("release");
        assert_eq!(released.await, 0, "a released grant's write landed");
    }
    assert_eq!(
        psql(&format!("SELECT balance FROM {table} WHERE id = 1")),
        "22"
    );
    psql(&format!("DROP TABLE {table}"));
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id())
}

/// Session mode: when the holder's session ends without a release (no notification is sent),
/// a waiter is granted at once, while the dead holder's row still shows lease left (compared
/// on the database's clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_waiter_is_granted_when_the_holder_session_ends() {
    let key = unique_key("pg-session-gone");
    let long = format!(
        "{}?mode=session&session_timeout=60s",
        require_env("FENCED_TEST_PG_URL")
    );
    let b = backend(&long).await;
    let pid = b.server_pid().await.expect("pid");
    let holder = Client::new(b);
    let g = holder.lock(&key).await.expect("acquire");
    let waiter_client = fenced_testkit::connect(&long).await;
    let waiter = {
        let key = key.clone();
        tokio::spawn(async move {
            waiter_client
                .lock_with(&key, &LockOptions::new().wait(Duration::from_secs(120)))
                .await
        })
    };
    // The waiter waits on the holder's presence lock: the two-int4 advisory key made of the
    // high and low halves of the key's advisory id.
    let id =
        fenced::backends::sql::advisory_id("fenced_locks", &fenced::Key::new(&key).expect("key"));
    let (class, object) = ((id as u64 >> 32) as u32, id as u32);
    within(30, "waiter watching", async {
        while psql(&format!(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND mode = 'ShareLock' AND objsubid = 2 AND classid::text::int8 = {class} \
             AND objid::text::int8 = {object}"
        )) == "0"
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let dead_until = psql(&format!(
        "SELECT expires_at FROM fenced_locks WHERE lock_key = '{key}'"
    ));
    psql(&format!("SELECT pg_terminate_backend({pid})"));
    let next = within(120, "waiter granted", waiter)
        .await
        .expect("task")
        .expect("waiter acquire");
    assert!(next.token() > g.token());
    assert_eq!(
        psql(&format!(
            "SELECT granted_at < '{dead_until}'::timestamptz FROM fenced_locks WHERE lock_key = '{key}'"
        )),
        "t",
        "the waiter was granted only when the dead holder's lease ended, not when its session ended"
    );
    next.release().await.expect("release");
}

/// Lease mode through PgBouncer in transaction pooling mode (`FENCED_TEST_PG_POOLED_URL`, with
/// `prepared_statements=false`): every operation is one statement, so locks work although each
/// may run on another server connection. Notifications do not cross such a pooler (`LISTEN`
/// needs a session), so the checks where waiters hand a lock on quickly are left out here:
/// through the pooler, waiters wake when leases end.
mod pooled {
    fenced_testkit::conformance_tests!(@tests fenced_testkit::Harness::new(
        fenced_testkit::require_env("FENCED_TEST_PG_POOLED_URL"),
        env!("CARGO_BIN_EXE_fenced-conformance-worker")
    );
        basics,
        fencing_tokens_increase,
        crashed_holder_expires,
        renewal_keeps_lock,
        lost_on_delete_cancels_work,
        lost_on_takeover,
        non_owner_release_rejected,
        cancel_safety,
        cancelled_acquisitions_leave_nothing,
        list_shows_holders
    );
}
