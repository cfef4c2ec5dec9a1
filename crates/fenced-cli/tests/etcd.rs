//! Every `fenced` subcommand against the test etcd (`FENCED_TEST_ETCD_URL`, started by
//! `scripts/test`). `fenced lock` keeps the lock after it exits: its session lasts the lease.
#![cfg(feature = "etcd")]

mod common;

use common::{fenced, stderr, stdout};
use fenced_testkit::{require_env, unique_key};

fn url() -> String {
    require_env("FENCED_TEST_ETCD_URL")
}

/// The URL without the test's short session (`fenced lock` sets its own).
fn plain_url() -> String {
    url().split('?').next().expect("url").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_outlives_the_command_then_unlock() {
    let url = plain_url();
    let client = fenced::connect(&url).await.unwrap();
    let key = unique_key("cli-etcd-lock");
    let out = fenced()
        .args([
            "lock",
            "--url",
            &url,
            "--key",
            &key,
            "--lease",
            "1m",
            "--label",
            "deploy by ci",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let (owner, token) = text.trim().split_once(' ').expect("OWNER TOKEN");
    let token: u64 = token.parse().unwrap();
    // The command has exited; its session keeps the lock for the lease.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let holder = client
        .holder(&key)
        .await
        .unwrap()
        .expect("still held after fenced lock exited");
    assert_eq!(holder.token.map(|t| t.get()), Some(token));
    assert_eq!(holder.label.as_deref(), Some("deploy by ci"));
    assert!(client.try_lock(&key).await.unwrap().is_none());

    let out = fenced()
        .args(["unlock", "--url", &url, "--key", &key, "--owner", owner])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(client.holder(&key).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_status_unlock_release_watch() {
    common::run_status_unlock_release_watch(&url(), "cli-etcd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_exit_clearly() {
    let out = fenced()
        .args(["status", "--url", "etcd://127.0.0.1:1?sesion_ttl=2s"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unknown parameter"),
        "{}",
        stderr(&out)
    );
    let out = fenced()
        .args([
            "run",
            "--url",
            "etcd://u:pw-secret@127.0.0.1:1?timeout=300ms",
            "--key",
            "k",
            "--",
            "true",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(!stderr(&out).contains("pw-secret"), "{}", stderr(&out));
}
