//! Servers that a test starts (and kills) itself, from the Debian packages, on free loopback
//! ports with throwaway data directories. Shared by the test files that `mod support;` it; each
//! uses part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use fenced_testkit::within;
use tokio::process::{Child, Command};

/// A `redis-server` of the test's own (no persistence), killed when dropped.
pub(crate) struct RedisProcess {
    pub(crate) child: Child,
    pub(crate) port: u16,
}

impl RedisProcess {
    /// A plain server, or a replica of the server on `replica_of`.
    pub(crate) async fn start(dir: &Path, replica_of: Option<u16>) -> RedisProcess {
        let port = replica_of.map(|p| p.to_string());
        let mut extra = Vec::new();
        if let Some(port) = &port {
            extra = vec!["--replicaof", "127.0.0.1", port.as_str()];
        }
        RedisProcess::start_with(dir, &extra).await
    }

    /// A server with `extra` arguments after the defaults (`--cluster-enabled yes`, …).
    pub(crate) async fn start_with(dir: &Path, extra: &[&str]) -> RedisProcess {
        std::fs::create_dir_all(dir).expect("node dir");
        let port = fenced_proof::server::free_port().expect("free port");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}); scripts/test installs the Debian package")
            });
        let node = RedisProcess { child, port };
        within(20, "redis-server answering", async {
            while node.cli(&["PING"]).await.trim() != "PONG" {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        node
    }

    /// `redis-cli` against this server; its standard output.
    pub(crate) async fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .await
            .expect("redis-cli (Debian redis-tools)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `redis://127.0.0.1:<port>/0` followed by `query`.
    pub(crate) fn url(&self, query: &str) -> String {
        format!("redis://127.0.0.1:{}/0{query}", self.port)
    }
}

/// A `redis-sentinel` of the test's own that monitors the primary on `primary` under `name`
/// (quorum 2; down after 500 ms, failover timeout 2 s, so that failovers are quick), with its
/// config (which Sentinel rewrites), `extra` config lines (`tls-port …`) and log in `dir`;
/// killed when dropped. No password; `port` is its plain port.
pub(crate) async fn start_sentinel(
    dir: &Path,
    name: &str,
    primary: u16,
    extra: &[&str],
) -> RedisProcess {
    std::fs::create_dir_all(dir).expect("sentinel dir");
    let port = fenced_proof::server::free_port().expect("free port");
    let config = dir.join("sentinel.conf");
    std::fs::write(
        &config,
        format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {dir}/sentinel.log\n\
             sentinel resolve-hostnames no\nsentinel monitor {name} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {name} 500\nsentinel failover-timeout {name} 2000\n{}\n",
            extra.join("\n"),
            dir = dir.display()
        ),
    )
    .expect("sentinel.conf");
    let child = Command::new("redis-sentinel")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start redis-sentinel ({e}); scripts/test installs the Debian package")
        });
    let sentinel = RedisProcess { child, port };
    within(20, "redis-sentinel answering", async {
        while sentinel.cli(&["PING"]).await.trim() != "PONG" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    sentinel
}
