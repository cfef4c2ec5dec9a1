//! `fenced` against the test PostgreSQL (`FENCED_TEST_PG_URL`, started by `scripts/test`) in
//! session mode, and PostgreSQL's bad URLs. Lease mode runs in every shared-store CLI test
//! (`common::Store::all`). `fenced lock` refuses session mode: the lock would die with the
//! command's connection.
#![cfg(feature = "postgres")]

mod common;

use common::{assert_exit, fenced, stderr};
use fenced_testkit::{require_env, unique_key};

fn session_url() -> String {
    format!(
        "{}?mode=session&session_timeout=3s&timeout=1s",
        require_env("FENCED_TEST_PG_URL")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_refuses_session_mode() {
    let key = unique_key("cli-pg-lock");
    let out = fenced()
        .args([
            "lock",
            "--url",
            &session_url(),
            "--key",
            &key,
            "--lease",
            "1m",
        ])
        .output()
        .await
        .unwrap();
    assert_exit(&out, 64, "fenced lock in session mode");
    assert!(stderr(&out).contains("fenced run"), "{}", stderr(&out));
    let client = fenced::connect(&session_url()).await.expect("connect");
    assert!(
        client.holder(&key).await.unwrap().is_none(),
        "a lock was left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_status_unlock_release_watch_in_session_mode() {
    common::run_status_unlock_release_watch(&session_url(), "cli-pg-session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_exit_clearly() {
    let url = require_env("FENCED_TEST_PG_URL");
    let parsed = url::Url::parse(&url).unwrap();
    let password = parsed.password().unwrap().to_owned();
    let (host, port) = (parsed.host_str().unwrap(), parsed.port().unwrap());
    for (bad, code, says) in [
        (
            format!("postgres://fenced:not-the-password@{host}:{port}/fenced_test"),
            77,
            "password",
        ),
        (
            format!("postgres://fenced:{password}@{host}:{port}/no_such_db"),
            64,
            "does not exist",
        ),
        (
            format!("postgres://fenced:{password}@{host}:{port}/fenced_test?mode=sessions"),
            64,
            "mode=",
        ),
        (
            format!("postgres://fenced:{password}@{host}:1/fenced_test"),
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
