//! `fenced run` end to end, on the embedded SQLite backend (shared between processes) and Redis.

use std::process::Stdio;
use std::time::Duration;

use fenced::LockOptions;
use fenced_testkit::{require_env, unique_key, within};
use tokio::process::Command;

fn fenced() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fenced"));
    cmd.env_remove("FENCED_URL").kill_on_drop(true);
    cmd
}

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}/locks.db", dir.path().display())
}

/// Waits until `key` has a holder (the process under test acquired it).
async fn until_held(url: &str, key: &str) -> fenced::HolderInfo {
    let client = fenced::connect(url).await.expect("connect");
    within(30, "the lock being held", async {
        loop {
            if let Some(holder) = client.holder(key).await.expect("holder") {
                return holder;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn runs_the_command_with_the_token_and_propagates_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let key = unique_key("cli-run");
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
            "echo \"$FENCED_KEY $FENCED_TOKEN $FENCED_OWNER\"; exit 7",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{stdout}");
    assert_eq!(fields[0], key);
    let token: u64 = fields[1].parse().expect("token is a number");
    assert!(token > 0);
    assert!(fields[2].parse::<fenced::OwnerId>().is_ok());

    // The lock was released after the command: the next run gets a higher token at once.
    let out = fenced()
        .args([
            "run",
            "--url",
            &url,
            "--key",
            &key,
            "--wait",
            "0",
            "--",
            "sh",
            "-c",
            "echo $FENCED_TOKEN",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let next: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(next > token);
}

#[tokio::test]
async fn held_lock_gives_exit_75_and_sigterm_is_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let key = unique_key("cli-held");
    let holder = fenced()
        .args([
            "run",
            "--url",
            &url,
            "--key",
            &key,
            "--label",
            "nightly on host-a",
            "--",
            "sleep",
            "60",
        ])
        .spawn()
        .unwrap();
    let info = until_held(&url, &key).await;
    assert_eq!(info.label.as_deref(), Some("nightly on host-a"));

    let out = fenced()
        .args([
            "run", "--url", &url, "--key", &key, "--wait", "0", "--", "true",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(75));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nightly on host-a"), "{stderr}");

    // SIGTERM to fenced reaches the command; fenced releases and exits with 128 + 15.
    let pid = holder.id().unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = within(
        30,
        "fenced exiting after SIGTERM",
        holder.wait_with_output(),
    )
    .await
    .unwrap()
    .status;
    assert_eq!(status.code(), Some(143));
    let client = fenced::connect(&url).await.unwrap();
    assert!(
        client.holder(&key).await.unwrap().is_none(),
        "lock left behind"
    );
}

#[tokio::test]
async fn lost_lock_stops_the_command_with_exit_79() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let key = unique_key("cli-lost");
    let child = fenced()
        .args([
            "run", "--url", &url, "--key", &key, "--lease", "1s", "--grace", "5s", "--", "sleep",
            "60",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    until_held(&url, &key).await;
    let admin = fenced::connect(&url).await.unwrap();
    admin.force_release(&key).await.unwrap();
    let thief = admin
        .lock_with(&key, &LockOptions::new().wait(Duration::from_secs(10)))
        .await
        .unwrap();
    let out = within(30, "fenced stopping the command", child.wait_with_output())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(79));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lost"), "{stderr}");
    thief
        .release()
        .await
        .expect("the new holder's lock was untouched");
}

#[tokio::test]
async fn usage_and_configuration_errors_have_their_codes() {
    let out = fenced().args(["run", "--key", "k"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(64), "missing command");
    let out = fenced()
        .args(["run", "--key", "k", "--wait", "soon", "--", "true"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "bad duration");
    let out = fenced()
        .args(["run", "--url", "memory://", "--key", "", "--", "true"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "empty key");
    let out = fenced()
        .args([
            "run",
            "--url",
            "gopher://x:secret@host",
            "--key",
            "k",
            "--",
            "true",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "unknown scheme");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("secret"));
    let out = fenced()
        .args([
            "run",
            "--url",
            "memory://",
            "--key",
            "k",
            "--",
            "/nonexistent/command",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(127), "command not found");
    let out = fenced().arg("--help").output().await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("fenced run --key"));
}

#[tokio::test]
async fn redis_wrong_password_is_an_auth_failure_and_is_not_printed() {
    let url = require_env("FENCED_TEST_REDIS_URL");
    let parsed = url::Url::parse(&url).unwrap();
    let bad = format!(
        "redis://:not-the-password-1234@{}:{}/0",
        parsed.host_str().unwrap(),
        parsed.port().unwrap()
    );
    let out = fenced()
        .args(["run", "--url", &bad, "--key", "k", "--", "true"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{stderr}");
    assert!(!stderr.contains("not-the-password-1234"), "{stderr}");

    let out = fenced()
        .env("FENCED_URL", &url)
        .args([
            "run",
            "--key",
            &unique_key("cli-redis"),
            "--",
            "sh",
            "-c",
            "test -n \"$FENCED_TOKEN\"",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
