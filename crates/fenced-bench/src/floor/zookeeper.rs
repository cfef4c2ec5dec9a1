//! The ZooKeeper floor: one session per process; acquire = create an `EPHEMERAL_SEQUENTIAL` node
//! under the key's parent node (a persistent node, created once per process and key) and list
//! the parent's children to check that it is the lowest; release = delete it. In handoff mode a
//! waiter sets an exists-watch on the node just ahead of its own, and lists the children again
//! when the watch fires: one release wakes one waiter, FIFO.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use zookeeper_client as zk;

use crate::locker::{Locker, WAIT};

/// The node under the chroot that holds the floor's key nodes.
const ROOT: &str = "/fenced-floor";

/// A held floor lock: the path of its node.
#[derive(Debug)]
pub(crate) struct ZkHeld {
    path: String,
}

/// The bare ZooKeeper operations on one session.
pub(crate) struct ZkFloor {
    client: zk::Client,
    handoff: bool,
    /// Key nodes this process has created (or found existing).
    parents: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for ZkFloor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkFloor")
            .field("session", &self.client.session_id())
            .field("handoff", &self.handoff)
            .finish_non_exhaustive()
    }
}

/// `key` as one node name: `%` and `/` percent-encoded.
fn node_name(key: &str) -> String {
    key.replace('%', "%25").replace('/', "%2F")
}

/// The sequence number of a lock node named `lock-<sequence>`.
fn sequence(name: &str) -> Option<i64> {
    name.strip_prefix("lock-")?.parse().ok()
}

impl ZkFloor {
    /// Connects to `zk://host:port[,host:port…][/chroot][?…]` (the query is ignored) with a
    /// session timeout of `lease`.
    pub(crate) async fn connect(
        url: &str,
        lease: Duration,
        handoff: bool,
    ) -> Result<ZkFloor, String> {
        let cluster = url
            .strip_prefix("zk://")
            .and_then(|rest| rest.split('?').next())
            .filter(|hosts| !hosts.is_empty() && !hosts.contains('@'))
            .ok_or_else(|| format!("{url}: the ZooKeeper floor takes zk://host:port[/chroot]"))?;
        let connect = zk::Client::connector()
            .with_session_timeout(lease)
            .with_fail_eagerly()
            .connect(cluster);
        let client = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| format!("no session with {url} within 10 s"))?
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        Ok(ZkFloor {
            client,
            handoff,
            parents: Mutex::new(HashSet::new()),
        })
    }

    /// Creates `ROOT` and `dir` (persistent, empty) unless this process did so already.
    async fn parent(&self, dir: &str) -> Result<(), String> {
        if self
            .parents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(dir)
        {
            return Ok(());
        }
        let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        for path in [ROOT, dir] {
            match self.client.create(path, b"", &options).await {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(e) => return Err(format!("create {path}: {e}")),
            }
        }
        self.parents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(dir.to_owned());
        Ok(())
    }

    /// The node just ahead of `mine` under `dir`, `None` when `mine` is the lowest.
    async fn predecessor(&self, dir: &str, mine: i64) -> Result<Option<String>, String> {
        let names = self
            .client
            .list_children(dir)
            .await
            .map_err(|e| format!("list {dir}: {e}"))?;
        let ahead = names
            .into_iter()
            .filter_map(|name| sequence(&name).map(|s| (s, name)))
            .filter(|&(s, _)| s < mine)
            .max_by_key(|&(s, _)| s);
        Ok(ahead.map(|(_, name)| format!("{dir}/{name}")))
    }

    async fn delete(&self, path: &str) -> Result<(), String> {
        self.client
            .delete(path, None)
            .await
            .map_err(|e| format!("delete {path}: {e}"))
    }
}

impl Locker for ZkFloor {
    type Held = ZkHeld;

    async fn acquire(&self, key: &str) -> Result<ZkHeld, String> {
        let deadline = Instant::now() + WAIT;
        let dir = format!("{ROOT}/{}", node_name(key));
        self.parent(&dir).await?;
        let options = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
        let (_, created) = self
            .client
            .create(&format!("{dir}/lock-"), b"", &options)
            .await
            .map_err(|e| format!("create in {dir}: {e}"))?;
        let mine = created.into_i64();
        let path = format!("{dir}/lock-{created}");
        loop {
            let Some(ahead) = self.predecessor(&dir, mine).await? else {
                return Ok(ZkHeld { path });
            };
            if !self.handoff {
                self.delete(&path).await?;
                return Err(format!("{key} is held (unexpected outside handoff mode)"));
            }
            let (stat, watcher) = self
                .client
                .check_and_watch_stat(&ahead)
                .await
                .map_err(|e| format!("exists-watch {ahead}: {e}"))?;
            if stat.is_none() {
                // Gone between the listing and the watch: list again.
                continue;
            }
            if tokio::time::timeout_at(deadline, watcher.changed())
                .await
                .is_err()
            {
                self.delete(&path).await?;
                return Err(format!("still queued after waiting {WAIT:?}"));
            }
        }
    }

    async fn release(&self, held: ZkHeld) -> Result<(), String> {
        self.delete(&held.path).await
    }

    fn name(&self) -> &'static str {
        "floor"
    }

    fn version(&self) -> String {
        "zookeeper-client 0.11".to_owned()
    }

    fn settings(&self) -> String {
        let timeout = self.client.session_timeout().as_millis();
        let wait = if self.handoff {
            "waiting: an exists-watch on the node just ahead (check_and_watch_stat), and when it \
             fires getChildren again (FIFO, one release wakes one waiter, no timer)"
        } else {
            "no waiting (uncontended keys; a node that is not the lowest is deleted and counted \
             as an error)"
        };
        format!(
            "zookeeper floor: one zookeeper-client session per process shared by all tasks \
             (session timeout {timeout} ms: what the server granted of --lease-ms); per key a persistent parent \
             node /fenced-floor/<key> created once per process; acquire = create \
             EPHEMERAL_SEQUENTIAL <parent>/lock- + getChildren(parent), granted when its node is \
             the lowest; release = delete the node; {wait}; no fencing token check, no renewal, \
             no lost-lock signal; parent nodes are left in place"
        )
    }
}
