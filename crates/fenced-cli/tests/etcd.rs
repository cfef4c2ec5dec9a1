//! Every `fenced` subcommand against the test etcd (`FENCED_TEST_ETCD_URL`, started by
//! `scripts/test`). `fenced lock` keeps the lock after it exits: its session lasts the lease.
#![cfg(feature = "etcd")]

mod common;

use common::{fenced, stderr, stdout};
use fenced::LockOptions;
use fenced_testkit::{require_env, unique_key, within};
use tokio::io::{AsyncBufReadExt, BufReader};

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
    let url = url();
    let client = fenced::connect(&url).await.unwrap();
    let prefix = unique_key("cli-etcd");

    // run: the command sees the token; the lock is released afterwards.
    let key = format!("{prefix}/run");
    let out = fenced()
        .args([
            "run",
            "--url",
            &url,
            "--key",
            &key,
            "--",
            "sh",
            "-c",
            "echo \"$FENCED_TOKEN\"",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let token: u64 = stdout(&out).trim().parse().expect("token printed");
    assert!(token > 0);
    assert!(
        client.holder(&key).await.unwrap().is_none(),
        "run left the lock held"
    );

    // watch: sees a lock taken.
    let mut watch = fenced()
        .args([
            "watch",
            "--url",
            &url,
            "--prefix",
            &prefix,
            "--json",
            "--interval",
            "50ms",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    // status: a held lock with its label and token.
    let key = format!("{prefix}/held");
    let guard = client
        .lock_with(&key, &LockOptions::new().label("deploy by ci"))
        .await
        .unwrap();
    let out = fenced()
        .args(["status", "--url", &url, "--prefix", &prefix])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = stdout(&out);
    let row = table
        .lines()
        .find(|l| l.starts_with(&key))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("deploy by ci") && row.contains(&guard.token().to_string()),
        "{row}"
    );
    let event: serde_json::Value = serde_json::from_str(
        &within(30, "a watch event", lines.next_line())
            .await
            .unwrap()
            .expect("watch ended"),
    )
    .unwrap();
    assert_eq!(event["key"].as_str(), Some(key.as_str()), "{event}");
    assert_eq!(
        event["token"].as_u64(),
        Some(guard.token().get()),
        "{event}"
    );

    // unlock by owner id from another process: owner-checked.
    let stranger = fenced::OwnerId::random().to_string();
    let out = fenced()
        .args(["unlock", "--url", &url, "--key", &key, "--owner", &stranger])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(76), "{}", stderr(&out));
    let owner = guard.owner().to_string();
    let out = fenced()
        .args(["unlock", "--url", &url, "--key", &key, "--owner", &owner])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    within(10, "lost after unlock", guard.lost()).await;
    drop(guard);

    // release --force breaks a held lock and says what it broke.
    let guard = client.lock(&key).await.unwrap();
    let out = fenced()
        .args(["release", "--force", "--url", &url, &key])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        format!("{}{}", stdout(&out), stderr(&out)).contains(&guard.token().to_string()),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    within(10, "lost after the forced release", guard.lost()).await;
    assert!(client.holder(&key).await.unwrap().is_none());
    watch.start_kill().unwrap();
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
