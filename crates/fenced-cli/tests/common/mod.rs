//! Helpers shared by the CLI tests: the real `fenced` binary against real stores.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use fenced::LockOptions;
use fenced_testkit::{require_env, within};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// The `fenced` binary, with no URL from the environment.
pub fn fenced() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fenced"));
    cmd.env_remove("FENCED_URL")
        .env_remove("FENCED_LOG")
        .kill_on_drop(true);
    cmd
}

/// A store the CLI tests run against: the embedded file (in a temp dir) or the test Redis.
pub struct Store {
    pub name: &'static str,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

impl Store {
    pub fn sqlite() -> Store {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/locks.db", dir.path().display());
        Store {
            name: "sqlite",
            url,
            _dir: Some(dir),
        }
    }

    pub fn redis() -> Store {
        Store {
            name: "redis",
            url: require_env("FENCED_TEST_REDIS_URL"),
            _dir: None,
        }
    }

    /// PostgreSQL in lease mode (`fenced lock` works with it: the row outlives the process).
    pub fn postgres() -> Store {
        Store {
            name: "postgres",
            url: require_env("FENCED_TEST_PG_URL"),
            _dir: None,
        }
    }

    /// MariaDB in lease mode.
    pub fn mysql() -> Store {
        Store {
            name: "mysql",
            url: require_env("FENCED_TEST_MYSQL_URL"),
            _dir: None,
        }
    }

    /// Redlock over the first three test nodes.
    pub fn redlock() -> Store {
        let url = require_env("FENCED_TEST_REDLOCK_URL");
        let (scheme, rest) = url.split_once("://").expect("a redlock:// URL");
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let nodes: Vec<&str> = rest[..end].split(',').take(3).collect();
        Store {
            name: "redlock",
            url: format!("{scheme}://{}{}", nodes.join(","), &rest[end..]),
            _dir: None,
        }
    }

    /// The primary that the test Sentinels monitor (`redis+sentinel://`).
    pub fn sentinel() -> Store {
        Store {
            name: "redis-sentinel",
            url: require_env("FENCED_TEST_REDIS_SENTINEL_URL"),
            _dir: None,
        }
    }

    /// Every store shared between processes whose locks can outlive the process.
    pub fn all() -> Vec<Store> {
        vec![
            Store::sqlite(),
            Store::redis(),
            Store::redlock(),
            Store::sentinel(),
            Store::postgres(),
            Store::mysql(),
        ]
    }

    pub async fn client(&self) -> fenced::Client {
        fenced::connect(&self.url).await.expect("connect")
    }
}

/// Waits until `key` has a holder; returns it.
pub async fn until_held(url: &str, key: &str) -> fenced::HolderInfo {
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

/// Sends `signal` to a child process.
pub fn send(child: &tokio::process::Child, signal: rustix::process::Signal) {
    let pid = child.id().expect("running child");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).expect("pid"),
        signal,
    )
    .expect("kill");
}

/// Asserts the command exited with `code`, showing `what` and its stderr otherwise.
pub fn assert_exit(out: &std::process::Output, code: i32, what: &str) {
    assert_eq!(out.status.code(), Some(code), "{what}: {}", stderr(out));
}

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `run`, `watch`, `status`, owner-checked `unlock` and `release --force` against the store at
/// `url`, for backends whose locks cannot outlive the `fenced lock` process the same way.
pub async fn run_status_unlock_release_watch(url: &str, name: &str) {
    let url = url.to_owned();
    let client = fenced::connect(&url).await.unwrap();
    let prefix = fenced_testkit::unique_key(name);

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
