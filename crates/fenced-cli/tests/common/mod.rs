//! Helpers shared by the CLI tests: the real `fenced` binary against real stores.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use fenced_testkit::{require_env, within};
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

    /// Every store shared between processes.
    pub fn all() -> Vec<Store> {
        vec![Store::sqlite(), Store::redis()]
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

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
