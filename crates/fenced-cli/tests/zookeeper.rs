//! Every `fenced` subcommand against the test ZooKeeper (`FENCED_TEST_ZK_URL`, started by
//! `scripts/test`). `fenced lock` refuses zk://: the lock would die with the command's session.
#![cfg(feature = "zookeeper")]

mod common;

use common::{fenced, stderr};
use fenced_testkit::{require_env, unique_key};

fn url() -> String {
    require_env("FENCED_TEST_ZK_URL")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_refuses_session_bound_urls() {
    let key = unique_key("cli-zk-lock");
    let out = fenced()
        .args(["lock", "--url", &url(), "--key", &key, "--lease", "1m"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("fenced run"), "{}", stderr(&out));
    let client = fenced::connect(&url()).await.unwrap();
    assert!(
        client.holder(&key).await.unwrap().is_none(),
        "a lock was left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_status_unlock_release_watch() {
    common::run_status_unlock_release_watch(&url(), "cli-zk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_exit_clearly() {
    let host = url()
        .trim_start_matches("zk://")
        .split(['/', '?'])
        .next()
        .unwrap()
        .to_owned();
    let out = fenced()
        .args([
            "status",
            "--url",
            &format!("zk://{host}/no-such-chroot-{}", std::process::id()),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    let out = fenced()
        .args([
            "run",
            "--url",
            "zk://u:pw-secret@127.0.0.1:1?timeout=1s",
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
