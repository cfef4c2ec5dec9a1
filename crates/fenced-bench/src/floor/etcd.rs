//! The etcd floor: one lease per process (kept alive in the background), acquire = one
//! transaction `if create_revision(key) == 0 then put(key, owner, lease)`, release = one
//! transaction `if value(key) == owner then delete(key)`. In handoff mode a waiter whose put
//! failed watches the key for its deletion from the revision of its failed attempt, then tries
//! again: the minimal watch-based wake (every waiter of the process watches the same key).

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchFilterType, WatchOptions,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Owners;
use crate::locker::{Locker, WAIT};

/// A held floor lock: the key and the owner value.
#[derive(Debug)]
pub(crate) struct EtcdHeld {
    key: String,
    owner: String,
}

/// The bare etcd operations on one client.
pub(crate) struct EtcdFloor {
    client: Client,
    lease: i64,
    ttl: i64,
    handoff: bool,
    owners: Owners,
    keeper: JoinHandle<()>,
}

impl std::fmt::Debug for EtcdFloor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdFloor")
            .field("lease", &self.lease)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdFloor {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl EtcdFloor {
    /// Connects to `etcd://host:port` and grants the process's lease (the lease time rounded up
    /// to whole seconds, at least 2 s).
    pub(crate) async fn connect(
        url: &str,
        lease: Duration,
        handoff: bool,
    ) -> Result<EtcdFloor, String> {
        let endpoint = url
            .strip_prefix("etcd://")
            .and_then(|rest| rest.split(['/', '?']).next())
            .ok_or_else(|| format!("{url}: the etcd floor takes etcd://host:port"))?;
        let mut client = Client::connect([endpoint], None)
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        let ttl = i64::try_from(lease.as_secs() + u64::from(lease.subsec_nanos() > 0))
            .unwrap_or(i64::MAX)
            .max(2);
        let granted = client
            .lease_grant(ttl, None)
            .await
            .map_err(|e| format!("lease grant: {e}"))?;
        let id = granted.id();
        let mut leases = client.lease_client();
        let keeper = tokio::spawn(async move {
            let Ok((mut keeper, mut answers)) = leases.keep_alive(id).await else {
                return;
            };
            let every = Duration::from_secs(u64::try_from(ttl).unwrap_or(2)) / 3;
            loop {
                tokio::time::sleep(every).await;
                if keeper.keep_alive().await.is_err() || answers.message().await.is_err() {
                    return;
                }
            }
        });
        Ok(EtcdFloor {
            client,
            lease: id,
            ttl,
            handoff,
            owners: Owners::new(),
            keeper,
        })
    }

    /// One put-if-absent: `Ok(None)` when granted, else the revision at which it was held.
    async fn try_put(&self, key: &str, owner: &str) -> Result<Option<i64>, String> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                owner,
                Some(PutOptions::new().with_lease(self.lease)),
            )]);
        let answer = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| format!("txn: {e}"))?;
        if answer.succeeded() {
            Ok(None)
        } else {
            Ok(Some(answer.header().map_or(0, |h| h.revision())))
        }
    }
}

impl Locker for EtcdFloor {
    type Held = EtcdHeld;

    async fn acquire(&self, key: &str) -> Result<EtcdHeld, String> {
        let owner = self.owners.next();
        let deadline = Instant::now() + WAIT;
        loop {
            let Some(seen) = self.try_put(key, &owner).await? else {
                return Ok(EtcdHeld {
                    key: key.to_owned(),
                    owner,
                });
            };
            if !self.handoff {
                return Err(format!("{key} is held (unexpected outside handoff mode)"));
            }
            if Instant::now() >= deadline {
                return Err(format!("still held after waiting {WAIT:?}"));
            }
            let options = WatchOptions::new()
                .with_start_revision(seen + 1)
                .with_filters([WatchFilterType::NoPut]);
            let mut stream = self
                .client
                .clone()
                .watch(key, Some(options))
                .await
                .map_err(|e| format!("watch: {e}"))?;
            let deleted = async {
                while let Some(answer) =
                    stream.message().await.map_err(|e| format!("watch: {e}"))?
                {
                    if answer.canceled()
                        || answer
                            .events()
                            .iter()
                            .any(|e| e.event_type() == EventType::Delete)
                    {
                        break;
                    }
                }
                Ok::<(), String>(())
            };
            match tokio::time::timeout_at(deadline, deleted).await {
                Ok(result) => result?,
                Err(_) => return Err(format!("still held after waiting {WAIT:?}")),
            }
        }
    }

    async fn release(&self, held: EtcdHeld) -> Result<(), String> {
        let txn = Txn::new()
            .when([Compare::value(
                held.key.clone(),
                CompareOp::Equal,
                held.owner,
            )])
            .and_then([TxnOp::delete(held.key, None)]);
        let answer = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| format!("txn: {e}"))?;
        if answer.succeeded() {
            Ok(())
        } else {
            Err("not held by this owner".to_owned())
        }
    }

    fn name(&self) -> &'static str {
        "floor"
    }

    fn version(&self) -> String {
        "etcd-client 0.21".to_owned()
    }

    fn settings(&self) -> String {
        let ttl = self.ttl;
        let wait = if self.handoff {
            "waiting: a failed put opens a watch on the key for its deletion from the revision of \
             the failed attempt, then puts again (every waiter of the process watches the key, no \
             queue, no FIFO)"
        } else {
            "no waiting (uncontended keys)"
        };
        format!(
            "etcd floor: one client per process, one lease (TTL {ttl} s) kept alive in the background; \
             acquire = txn if create_revision(key) == 0 then put(key, owner, lease); release = txn if \
             value(key) == owner then delete(key); {wait}; no fencing check, no renewal of the lock \
             itself"
        )
    }
}
