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
        for _ in 0..3 {
            if let Some(node) = RedisProcess::try_start_with(dir, extra).await {
                return node;
            }
        }
        panic!(
            "redis-server did not start (3 attempts); see {}",
            dir.join("redis.log").display()
        )
    }

    /// A server with `extra` arguments on a free port, or `None` if it exited before answering
    /// (the port was taken in the meantime, say).
    pub(crate) async fn try_start_with(dir: &Path, extra: &[&str]) -> Option<RedisProcess> {
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
        let mut node = RedisProcess { child, port };
        within(20, "redis-server answering", async {
            while node.cli(&["PING"]).await.trim() != "PONG" {
                if node
                    .child
                    .try_wait()
                    .expect("redis-server status")
                    .is_some()
                {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some(())
        })
        .await?;
        Some(node)
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

/// One line of `CLUSTER NODES`: a node as some node of the cluster sees it.
#[derive(Debug, Clone)]
pub(crate) struct ClusterNode {
    pub(crate) id: String,
    pub(crate) port: u16,
    /// A primary (`master`); otherwise a replica of `primary_id`.
    pub(crate) primary: bool,
    pub(crate) primary_id: Option<String>,
    /// Marked failed (`fail`, or `fail?` by this node alone).
    pub(crate) failed: bool,
    /// The slots it serves (not those being migrated).
    pub(crate) slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    pub(crate) fn serves(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(first, last)| first <= slot && slot <= last)
    }
}

/// A Redis Cluster of the test's own: `primaries` primaries with `replicas` replicas each, on
/// loopback, created by `redis-cli --cluster create` and healthy (every node says
/// `cluster_state:ok`, agrees on the primaries and every replica's link is up) when `start`
/// returns. A short `cluster-node-timeout` (1 s) makes an automatic failover quick. No password.
/// Every node is killed when the cluster is dropped.
pub(crate) struct RedisCluster {
    /// The nodes still running (a killed node is removed).
    pub(crate) nodes: Vec<RedisProcess>,
    /// Every node ever started, for the URL's seeds.
    seeds: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub(crate) async fn start(primaries: usize, replicas: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        for n in 0..primaries * (1 + replicas) {
            let node_dir = dir.path().join(format!("node-{n}"));
            let config = node_dir.join("nodes.conf");
            let config = config.to_str().expect("UTF-8 temp dir");
            let mut started = None;
            for _ in 0..3 {
                // The bus port is chosen too: the default (port + 10000) may be taken or too high.
                let bus = fenced_proof::server::free_port().expect("free port");
                let _ = std::fs::remove_file(config);
                started = RedisProcess::try_start_with(
                    &node_dir,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        config,
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-port",
                        &bus.to_string(),
                        "--repl-diskless-sync-delay",
                        "0",
                    ],
                )
                .await;
                if started.is_some() {
                    break;
                }
            }
            nodes.push(started.unwrap_or_else(|| {
                panic!(
                    "cluster node {n} did not start (3 attempts); see {}",
                    node_dir.join("redis.log").display()
                )
            }));
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .await
            .expect("redis-cli (Debian redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let seeds = nodes.iter().map(|n| n.port).collect();
        let cluster = RedisCluster {
            nodes,
            seeds,
            _dir: dir,
        };
        within(30, "the new cluster healthy", async {
            while !cluster.healthy(primaries, primaries * replicas).await {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        cluster
    }

    /// Every running node says `cluster_state:ok`, sees `primaries` primaries with slots and
    /// `replicas` replicas, none failed, and every replica's link to its primary is up.
    pub(crate) async fn healthy(&self, primaries: usize, replicas: usize) -> bool {
        for node in &self.nodes {
            if !node
                .cli(&["CLUSTER", "INFO"])
                .await
                .contains("cluster_state:ok")
            {
                return false;
            }
            let view = self.view_of(node.port).await;
            let serving = view.iter().filter(|n| n.primary && !n.slots.is_empty());
            let following = view.iter().filter(|n| n.primary_id.is_some());
            if serving.count() != primaries
                || following.count() != replicas
                || view.iter().any(|n| n.failed)
            {
                return false;
            }
            let replication = node.cli(&["INFO", "replication"]).await;
            if replication.contains("role:slave") && !replication.contains("master_link_status:up")
            {
                return false;
            }
        }
        true
    }

    /// `redis+cluster://` with every node started as a seed, followed by `query`.
    pub(crate) fn url(&self, query: &str) -> String {
        let seeds: Vec<String> = self
            .seeds
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}{query}", seeds.join(","))
    }

    /// The running node on `port`.
    pub(crate) fn node(&self, port: u16) -> &RedisProcess {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no running node on port {port}"))
    }

    /// `redis-cli` against the node on `port`; its output, trimmed.
    pub(crate) async fn cli(&self, port: u16, args: &[&str]) -> String {
        self.node(port).cli(args).await.trim().to_owned()
    }

    /// The cluster as the node on `port` sees it (`CLUSTER NODES`).
    pub(crate) async fn view_of(&self, port: u16) -> Vec<ClusterNode> {
        let text = self.cli(port, &["CLUSTER", "NODES"]).await;
        text.lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 8 {
                    return None;
                }
                let address = fields[1].split('@').next()?;
                let flags: Vec<&str> = fields[2].split(',').collect();
                let slots = fields[8..]
                    .iter()
                    .filter(|range| !range.starts_with('['))
                    .filter_map(|range| {
                        let (first, last) = range.split_once('-').unwrap_or((range, range));
                        Some((first.parse().ok()?, last.parse().ok()?))
                    })
                    .collect();
                Some(ClusterNode {
                    id: fields[0].to_owned(),
                    port: address.rsplit_once(':')?.1.parse().ok()?,
                    primary: flags.contains(&"master"),
                    primary_id: (fields[3] != "-").then(|| fields[3].to_owned()),
                    failed: flags.contains(&"fail") || flags.contains(&"fail?"),
                    slots,
                })
            })
            .collect()
    }

    /// The slot of a key or channel name (`CLUSTER KEYSLOT`).
    pub(crate) async fn keyslot(&self, name: &str) -> u16 {
        let answer = self
            .cli(self.nodes[0].port, &["CLUSTER", "KEYSLOT", name])
            .await;
        answer
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {name} answered {answer:?}"))
    }

    /// The port of the primary serving `slot`, as the node on `asked` sees it.
    pub(crate) async fn owner_seen_by(&self, asked: u16, slot: u16) -> Option<u16> {
        self.view_of(asked)
            .await
            .iter()
            .find(|n| n.primary && !n.failed && n.serves(slot))
            .map(|n| n.port)
    }

    /// The port of the primary serving `slot`, once every running node agrees on it.
    pub(crate) async fn owner(&self, slot: u16) -> u16 {
        within(30, "the nodes agreeing on a slot's owner", async {
            loop {
                let mut seen = Vec::new();
                for node in &self.nodes {
                    seen.push(self.owner_seen_by(node.port, slot).await);
                }
                if let Some(Some(first)) = seen.first()
                    && seen.iter().all(|s| *s == Some(*first))
                {
                    return *first;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// Waits until every running node names `port` as the primary of `slot`.
    pub(crate) async fn wait_owner(&self, slot: u16, port: u16, what: &str) {
        within(30, what, async {
            loop {
                let mut agreed = true;
                for node in &self.nodes {
                    agreed &= self.owner_seen_by(node.port, slot).await == Some(port);
                }
                if agreed {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }

    /// The primaries serving slots (ports), as the first running node sees them.
    pub(crate) async fn primaries(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .view_of(self.nodes[0].port)
            .await
            .iter()
            .filter(|n| n.primary && !n.failed && !n.slots.is_empty())
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The node id of the node on `port` (`CLUSTER MYID`).
    pub(crate) async fn id(&self, port: u16) -> String {
        self.cli(port, &["CLUSTER", "MYID"]).await
    }

    /// The ports of the replicas of the primary on `port`.
    pub(crate) async fn replicas_of(&self, port: u16) -> Vec<u16> {
        let id = self.id(port).await;
        self.view_of(port)
            .await
            .iter()
            .filter(|n| n.primary_id.as_deref() == Some(id.as_str()))
            .map(|n| n.port)
            .collect()
    }

    /// The port of the (first) replica of the primary on `port`.
    pub(crate) async fn replica_of(&self, port: u16) -> u16 {
        let replicas = self.replicas_of(port).await;
        *replicas
            .first()
            .unwrap_or_else(|| panic!("the primary on {port} has no replica"))
    }

    /// The number of clients subscribed to the shard channel `channel` on the node on `port`
    /// (`PUBSUB SHARDNUMSUB`).
    pub(crate) async fn shard_subscribers(&self, port: u16, channel: &str) -> u64 {
        let answer = self.cli(port, &["PUBSUB", "SHARDNUMSUB", channel]).await;
        answer
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("PUBSUB SHARDNUMSUB on {port} answered {answer:?}"))
    }

    /// First step of moving `slot` from the primary on `from` to the one on `to`: `to` imports
    /// it, `from` migrates it (keys not moved yet stay readable on `from`; the others are
    /// answered with `ASK`).
    pub(crate) async fn begin_migration(&self, slot: u16, from: u16, to: u16) {
        let slot = slot.to_string();
        let (from_id, to_id) = (self.id(from).await, self.id(to).await);
        let importing = self
            .cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id])
            .await;
        assert_eq!(importing, "OK", "SETSLOT IMPORTING on {to}");
        let migrating = self
            .cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id])
            .await;
        assert_eq!(migrating, "OK", "SETSLOT MIGRATING on {from}");
    }

    /// Second step: `MIGRATE`s every key of `slot` from `from` to `to`; the names moved.
    pub(crate) async fn move_keys(&self, slot: u16, from: u16, to: u16) -> Vec<String> {
        let slot = slot.to_string();
        let keys = self
            .cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "1000"])
            .await;
        let keys: Vec<String> = keys.lines().map(str::to_owned).collect();
        if !keys.is_empty() {
            let to = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            let migrated = self.cli(from, &args).await;
            assert_eq!(migrated, "OK", "MIGRATE {keys:?}");
        }
        keys
    }

    /// Last step: `to` owns `slot` (`SETSLOT NODE` on `to`, then `from`, then every other
    /// primary), and every running node agrees.
    pub(crate) async fn finish_migration(&self, slot: u16, from: u16, to: u16) {
        let to_id = self.id(to).await;
        let mut order = vec![to, from];
        order.extend(
            self.primaries()
                .await
                .into_iter()
                .filter(|p| *p != to && *p != from),
        );
        for port in order {
            let set = self
                .cli(
                    port,
                    &["CLUSTER", "SETSLOT", &slot.to_string(), "NODE", &to_id],
                )
                .await;
            assert_eq!(set, "OK", "SETSLOT NODE on {port}");
        }
        self.wait_owner(slot, to, "every node naming the slot's new owner")
            .await;
    }

    /// Kills the node on `port` (SIGKILL) and forgets it.
    pub(crate) async fn kill(&mut self, port: u16) {
        kill_node(&mut self.nodes, port).await;
    }
}

/// Kills the node of `nodes` on `port` (SIGKILL) and removes it from the list.
pub(crate) async fn kill_node(nodes: &mut Vec<RedisProcess>, port: u16) {
    let at = nodes
        .iter()
        .position(|n| n.port == port)
        .unwrap_or_else(|| panic!("no running node on port {port}"));
    let mut node = nodes.remove(at);
    node.child.kill().await.expect("kill the node");
}
