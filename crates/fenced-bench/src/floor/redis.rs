//! The Redis floor: `SET key owner NX PX lease` to acquire and a compare-and-delete script
//! (`EVALSHA`) to release, on one multiplexed connection. In handoff mode the release script
//! also `PUBLISH`es, and one pub/sub connection per process wakes one local waiter per message.
//!
//! On a Redis Cluster (`redis+cluster://host:port,…`) the same commands go through redis-rs's
//! async cluster connection, which sends each one to the primary of its key's slot (latency and
//! throughput modes only).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Script, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Owners;
use crate::locker::{Locker, WAIT};

/// Deletes `KEYS[1]` if it holds `ARGV[1]`.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                       return redis.call('DEL', KEYS[1]) else return 0 end";

/// Deletes `KEYS[1]` if it holds `ARGV[1]` and announces it on the channel `ARGV[2]`.
const RELEASE_PUBLISH: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                               redis.call('DEL', KEYS[1]) redis.call('PUBLISH', ARGV[2], '') \
                               return 1 else return 0 end";

/// A held floor lock: the key and the owner value.
#[derive(Debug)]
pub(crate) struct RedisHeld {
    key: String,
    owner: String,
}

/// The bare Redis operations on one connection: a multiplexed connection to one server, or a
/// cluster connection.
pub(crate) struct RedisFloor<C = MultiplexedConnection> {
    conn: C,
    /// The connection, for `settings`.
    connection: &'static str,
    release: Script,
    /// In handoff mode: woken once per release message.
    released: Option<Arc<Notify>>,
    lease_ms: u64,
    owners: Owners,
}

impl<C> std::fmt::Debug for RedisFloor<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisFloor")
            .field("connection", &self.connection)
            .field("lease_ms", &self.lease_ms)
            .finish_non_exhaustive()
    }
}

/// The release channel of `key`.
fn channel(key: &str) -> String {
    format!("{key}:released")
}

/// The lease in whole milliseconds, for `PX`.
fn millis(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(u64::MAX)
}

impl RedisFloor {
    /// Connects; with `handoff_key`, also subscribes to that key's release channel.
    pub(crate) async fn connect(
        url: &str,
        lease: Duration,
        handoff_key: Option<String>,
    ) -> Result<RedisFloor, String> {
        let client = redis::Client::open(url).map_err(|e| format!("{url}: {e}"))?;
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        let released = match handoff_key {
            Some(key) => {
                let mut pubsub = client
                    .get_async_pubsub()
                    .await
                    .map_err(|e| format!("pub/sub connection to {url}: {e}"))?;
                pubsub
                    .subscribe(channel(&key))
                    .await
                    .map_err(|e| format!("SUBSCRIBE: {e}"))?;
                let notify = Arc::new(Notify::new());
                let wake = notify.clone();
                let mut stream = pubsub.into_on_message();
                tokio::spawn(async move {
                    use futures_core::Stream as _;
                    while std::future::poll_fn(|cx| std::pin::Pin::new(&mut stream).poll_next(cx))
                        .await
                        .is_some()
                    {
                        wake.notify_one();
                    }
                });
                Some(notify)
            }
            None => None,
        };
        let source = if released.is_some() {
            RELEASE_PUBLISH
        } else {
            RELEASE
        };
        Ok(RedisFloor {
            conn,
            connection: "one multiplexed connection per process",
            release: Script::new(source),
            released,
            lease_ms: millis(lease),
            owners: Owners::new(),
        })
    }
}

impl RedisFloor<ClusterConnection> {
    /// Connects to the Redis Cluster named by `url` (`redis+cluster://[user:pass@]host:port,…`,
    /// the hosts being seed nodes).
    pub(crate) async fn connect_cluster(
        url: &str,
        lease: Duration,
    ) -> Result<RedisFloor<ClusterConnection>, String> {
        let rest = url
            .strip_prefix("redis+cluster://")
            .ok_or_else(|| format!("{url} is not a redis+cluster:// URL"))?;
        let (credentials, hosts) = match rest.rsplit_once('@') {
            Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
            None => (String::new(), rest),
        };
        let seeds: Vec<String> = hosts
            .trim_end_matches('/')
            .split(',')
            .map(|host| format!("redis://{credentials}{host}"))
            .collect();
        let client =
            redis::cluster::ClusterClient::new(seeds).map_err(|e| format!("{url}: {e}"))?;
        let conn = client
            .get_async_connection()
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        Ok(RedisFloor {
            conn,
            connection: "one cluster connection per process (redis-rs cluster-async: each \
                         command goes to the primary of its key's slot)",
            release: Script::new(RELEASE),
            released: None,
            lease_ms: millis(lease),
            owners: Owners::new(),
        })
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisFloor<C> {
    /// One `SET key owner NX PX lease`: whether it was granted.
    async fn try_set(&self, key: &str, owner: &str) -> Result<bool, String> {
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("SET")
            .arg(key)
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(self.lease_ms)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("SET NX: {e}"))?;
        Ok(matches!(reply, Value::Okay) || matches!(&reply, Value::SimpleString(s) if s == "OK"))
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> Locker for RedisFloor<C> {
    type Held = RedisHeld;

    async fn acquire(&self, key: &str) -> Result<RedisHeld, String> {
        let owner = self.owners.next();
        let deadline = Instant::now() + WAIT;
        loop {
            let Some(released) = &self.released else {
                if self.try_set(key, &owner).await? {
                    return Ok(RedisHeld {
                        key: key.to_owned(),
                        owner,
                    });
                }
                return Err(format!("{key} is held (unexpected outside handoff mode)"));
            };
            // Registered before the attempt, so a message in between is not missed.
            let notified = released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.try_set(key, &owner).await? {
                return Ok(RedisHeld {
                    key: key.to_owned(),
                    owner,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("still held after waiting {WAIT:?}"));
            }
            // Without a message, try again when a lease could have run out.
            let fallback = now + Duration::from_millis(self.lease_ms);
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(fallback.min(deadline)) => {}
            }
        }
    }

    async fn release(&self, held: RedisHeld) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let mut invocation = self.release.key(&held.key);
        invocation.arg(&held.owner);
        if self.released.is_some() {
            invocation.arg(channel(&held.key));
        }
        let deleted: i64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| format!("release script: {e}"))?;
        if deleted == 1 {
            Ok(())
        } else {
            Err("not held by this owner".to_owned())
        }
    }

    fn name(&self) -> &'static str {
        "floor"
    }

    fn version(&self) -> String {
        "redis-rs 1.8".to_owned()
    }

    fn settings(&self) -> String {
        let (lease, connection) = (self.lease_ms, self.connection);
        match self.released {
            None => format!(
                "redis floor: {connection}; acquire = SET key owner NX PX {lease}; release = \
                 EVALSHA of GET + compare + DEL; no fencing token, no renewal"
            ),
            Some(_) => format!(
                "redis floor: {connection}; acquire = SET key owner NX PX {lease}; release = \
                 EVALSHA of GET + compare + DEL + PUBLISH; waiting: one pub/sub connection per \
                 process SUBSCRIBEs to the key's channel at start, each message wakes one local \
                 waiter (Notify::notify_one), which retries SET NX; fallback retry after the lease; \
                 no FIFO (a releasing task may take the lock again at once); no fencing token, no \
                 renewal"
            ),
        }
    }
}
