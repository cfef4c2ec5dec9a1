//! `fenced` against the test PostgreSQL (`FENCED_TEST_PG_URL`) and MariaDB
//! (`FENCED_TEST_MYSQL_URL`), both started by `scripts/test`, in session mode, and their bad URLs.
//! Lease mode runs in every shared-store CLI test (`common::Store::all`). `fenced lock` refuses
//! session mode: the lock would die with the command's connection.
#![cfg(all(feature = "postgres", feature = "mysql"))]

mod common;

use common::{assert_exit, fenced, stderr};
use fenced_testkit::{require_env, unique_key};

/// One SQL store: its URL's variable, and the exit code of a URL naming a missing database.
struct Sql {
    var: &'static str,
    missing_database: i32,
}

const POSTGRES: Sql = Sql {
    var: "FENCED_TEST_PG_URL",
    missing_database: 64,
};
const MYSQL: Sql = Sql {
    var: "FENCED_TEST_MYSQL_URL",
    missing_database: 69,
};

fn session_url(sql: &Sql) -> String {
    format!(
        "{}?mode=session&session_timeout=3s&timeout=1s",
        require_env(sql.var)
    )
}

async fn lock_refuses_session_mode(sql: &Sql) {
    let key = unique_key("cli-sql-lock");
    let url = session_url(sql);
    let out = fenced()
        .args(["lock", "--url", &url, "--key", &key, "--lease", "1m"])
        .output()
        .await
        .unwrap();
    assert_exit(&out, 64, "fenced lock in session mode");
    assert!(stderr(&out).contains("fenced run"), "{}", stderr(&out));
    let client = fenced::connect(&url).await.expect("connect");
    assert!(
        client.holder(&key).await.unwrap().is_none(),
        "a lock was left behind"
    );
}

async fn bad_urls_exit_clearly(sql: &Sql) {
    let url = url::Url::parse(&require_env(sql.var)).unwrap();
    let (scheme, password) = (url.scheme().to_owned(), url.password().unwrap().to_owned());
    let (host, port) = (url.host_str().unwrap(), url.port().unwrap());
    let db = url.path().trim_start_matches('/').to_owned();
    for (bad, code, says) in [
        (
            format!("{scheme}://fenced:not-the-password@{host}:{port}/{db}"),
            77,
            "password",
        ),
        (
            format!("{scheme}://fenced:{password}@{host}:{port}/no_such_db"),
            sql.missing_database,
            "does not exist",
        ),
        (
            format!("{scheme}://fenced:{password}@{host}:{port}/{db}?mode=sessions"),
            64,
            "mode=",
        ),
        (
            format!("{scheme}://fenced:{password}@{host}:1/{db}"),
            69,
            "refused",
        ),
    ] {
        let out = fenced()
            .args(["status", "--url", &bad])
            .output()
            .await
            .unwrap();
        assert_exit(&out, code, &format!("status with a bad URL ({says})"));
        assert!(stderr(&out).contains(says), "{says}: {}", stderr(&out));
        assert!(!stderr(&out).contains(&password), "{}", stderr(&out));
        assert!(
            !stderr(&out).contains("not-the-password"),
            "{}",
            stderr(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_refuses_session_mode_postgres() {
    lock_refuses_session_mode(&POSTGRES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_refuses_session_mode_mysql() {
    lock_refuses_session_mode(&MYSQL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_status_unlock_release_watch_in_session_mode_postgres() {
    common::run_status_unlock_release_watch(&session_url(&POSTGRES), "cli-pg-session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_status_unlock_release_watch_in_session_mode_mysql() {
    common::run_status_unlock_release_watch(&session_url(&MYSQL), "cli-mysql-session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_exit_clearly_postgres() {
    bad_urls_exit_clearly(&POSTGRES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_exit_clearly_mysql() {
    bad_urls_exit_clearly(&MYSQL).await;
}
