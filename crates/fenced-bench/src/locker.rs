//! What the measured loops need of an implementation, and fenced's own.

use std::future::Future;
use std::time::Duration;

use fenced::{Client, LockGuard, LockOptions};

/// The longest wait of one acquisition (the protocol asks for at least 60 s).
pub(crate) const WAIT: Duration = Duration::from_secs(60);

/// One implementation under test: acquire (waiting up to [`WAIT`]) and release.
pub(crate) trait Locker: Send + Sync + 'static {
    /// A held lock.
    type Held: Send + 'static;

    /// Acquires `key`, waiting for it up to [`WAIT`] when it is held.
    fn acquire(&self, key: &str) -> impl Future<Output = Result<Self::Held, String>> + Send;

    /// Releases a held lock.
    fn release(&self, held: Self::Held) -> impl Future<Output = Result<(), String>> + Send;

    /// The implementation's name for the JSON line (`fenced` or `floor`).
    fn name(&self) -> &'static str;

    /// The implementation's version for the JSON line.
    fn version(&self) -> String;

    /// How it works, above all how it waits, for the JSON line's `settings`.
    fn settings(&self) -> String;
}

/// fenced as applications use it: one client, shared by every task of the process.
#[derive(Debug)]
pub(crate) struct FencedLocker {
    client: Client,
    options: LockOptions,
    backend: &'static str,
}

impl FencedLocker {
    /// Connects with [`fenced::connect`]; acquisitions use `lease`, the default renewal
    /// (every lease/3) and a wait of at most [`WAIT`].
    pub(crate) async fn connect(url: &str, lease: Duration) -> Result<FencedLocker, String> {
        let client = fenced::connect(url)
            .await
            .map_err(|e| format!("fenced::connect({url}): {e}"))?;
        let options = LockOptions::new().lease(lease).wait(WAIT);
        options.validate().map_err(|e| e.to_string())?;
        let backend = client.backend().name();
        Ok(FencedLocker {
            client,
            options,
            backend,
        })
    }
}

impl Locker for FencedLocker {
    type Held = LockGuard;

    async fn acquire(&self, key: &str) -> Result<LockGuard, String> {
        self.client
            .lock_with(key, &self.options)
            .await
            .map_err(|e| e.to_string())
    }

    async fn release(&self, held: LockGuard) -> Result<(), String> {
        held.release().await.map_err(|e| e.to_string())
    }

    fn name(&self) -> &'static str {
        "fenced"
    }

    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    fn settings(&self) -> String {
        let lease = self.options.get_lease().as_millis();
        let renew = self.options.get_renew_every().as_millis();
        let common = format!(
            "one fenced::Client per process shared by all tasks; lock_with(wait 60 s, lease {lease} ms), \
             the watchdog renews every {renew} ms (default lease/3); release() is owner-checked; \
             local waiters for a key queue FIFO in the client, so one waiter per process asks the store"
        );
        let how = match self.backend {
            "memory" => {
                "memory store: a mutex-protected map; waiting: the key's watch channel is bumped on \
                 release, or wake at the holder's lease end"
            }
            "sqlite" => {
                "sqlite: one connection per process in WAL mode, synchronous=FULL; each acquire and \
                 release is one BEGIN IMMEDIATE transaction (read the row, next token, write) run \
                 through spawn_blocking; waiting: a per-process thread polls PRAGMA data_version \
                 (2 ms after a change, doubling to 50 ms when quiet), releases in this process wake \
                 at once, or wake at the holder's lease end"
            }
            "redis" => {
                "redis: each acquire and release is one EVALSHA script on a multiplexed connection \
                 (acquire: HMGET, TIME, INCRBY x2, DEL, HSET, PEXPIRE; release: HMGET, DEL, \
                 PUBLISH); waiting: one pub/sub connection per process SUBSCRIBEs to the key's \
                 release channel, each message wakes the local queue's head, which runs the acquire \
                 script again; fallback wake at the holder's PTTL"
            }
            "redis-cluster" => {
                "redis-cluster: the redis backend's scripts on one cluster connection per process \
                 (redis-rs cluster-async, RESP3), each script call routed to the primary of its \
                 key's slot (a lock's names share the hash tag {key}); the release script \
                 SPUBLISHes instead of PUBLISH; waiting: the process SSUBSCRIBEs once per waited-on \
                 key on that primary (pushes on the same connection), each message wakes the local \
                 queue's head, which runs the acquire script again; fallback wake at the holder's \
                 PTTL"
            }
            "redlock" => {
                "redlock: one single-node Redis backend per node (its multiplexed connection, and \
                 a pub/sub connection once it waits); acquire runs the grant script on every node \
                 at once (node_timeout 100 ms each) and is decided by a majority (a second round \
                 only when the nodes' token counters differ); release runs the owner-checked \
                 release script on every node at once; renewal asks every node, a majority must \
                 confirm; waiting: each node's release notifications (pub/sub), a waiter wakes \
                 once n - quorum + 1 nodes notified, after a split vote a random delay of up to \
                 3 node timeouts"
            }
            "etcd" => {
                "etcd: one session lease per process kept alive in the background (a keep-alive \
                 every session_ttl/3, and one when a grant or renewal needs a fresher one); acquire \
                 = one txn (put the owner's queue key with the lease if absent, read it and the \
                 queue head), plus one range read for the predecessor when it has to wait; release \
                 = one txn (read the head, delete the key); waiting: a watch on the predecessor key \
                 only (FIFO, one wake per release), no timer; renewal = a keep-alive plus one txn \
                 per lock; the lease is capped at session_ttl (URL default 10 s)"
            }
            "zookeeper" => {
                "zookeeper: one session per process (URL session_timeout, default 10 s; the lease \
                 is capped at it); each key is a container node /fenced/<escaped key>; acquire = \
                 create EPHEMERAL_SEQUENTIAL lock-<owner>-<seq> (data: lease and label) + \
                 getChildren, granted when its node is the lowest (token = the node's czxid), else \
                 getData of the lowest node (holder info); release = delete the node; waiting: the \
                 node stays queued between attempts, the first failed attempt is retried at once \
                 (getChildren + getData), then an exists-watch on the predecessor node only (FIFO, \
                 one wake per release, no timer), each wake runs the attempt again (getChildren, and \
                 getData while not the lowest); renewal = an exists check of the node per lock; \
                 the server removes a key's emptied container node, and the next create that finds \
                 it gone creates it again (two more creates)"
            }
            _ => "",
        };
        format!("{common}; {how}")
    }
}
