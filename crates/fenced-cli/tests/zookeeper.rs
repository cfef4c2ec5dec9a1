//! Every `fenced` subcommand against the test ZooKeeper (`FENCED_TEST_ZK_URL`, started by
//! `scripts/test`). `fenced lock` refuses zk://: the lock would die with the command's session.
#![cfg(feature = "zookeeper")]

mod common;

use common::{fenced, stderr, stdout};
use fenced::LockOptions;
use fenced_testkit::{require_env, unique_key, within};
use tokio::io::{AsyncBufReadExt, BufReader};

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
    let url = url();
    let client = fenced::connect(&url).await.unwrap();
    let prefix = unique_key("cli-zk");

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

    // watch: sees a lock taken and released.
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
    let out = fenced()
        .args([
            "unlock",
            "--url",
            &url,
            "--key",
            &key,
            "--owner",
            &fenced::OwnerId::random().to_string(),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(76), "{}", stderr(&out));
    let out = fenced()
        .args([
            "unlock",
            "--url",
            &url,
            "--key",
            &key,
            "--owner",
            &guard.owner().to_string(),
        ])
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
