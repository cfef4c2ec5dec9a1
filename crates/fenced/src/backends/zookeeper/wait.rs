//! How ZooKeeper waiters are woken: each waiter watches only the node just ahead of its own in
//! the key's queue (its predecessor), so one release wakes one waiter.
//!
//! A waiter's place is its own `EPHEMERAL_SEQUENTIAL` node, created by its first acquisition
//! attempt and kept between attempts (the client asks for that with
//! [`AcquireRequest::queue`](crate::AcquireRequest::queue)). Each attempt records the
//! predecessor it saw; [`ZkWatch::changed`] then sets an exists-watch on that node, which the
//! server checks and arms in one request: a predecessor already gone wakes the waiter at once, so
//! a release between the attempt and the wait is never missed. The server fires the watch when
//! the predecessor is deleted (released, broken, or its session ended).
//!
//! If several acquisitions of one backend wait on the same key, the watch arms one watch per
//! predecessor and wakes on the first (a spurious wake-up for the others, never a missed one).
//! Without a queued node of this backend (a watch used on its own), it watches the current
//! holder's node. Connection problems make `changed` return after a short backoff, so the caller
//! re-checks rather than fails.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use tracing::debug;

use super::Inner;
use crate::backend::Watch;
use crate::error::Result;
use crate::key::Key;

/// One waiter's subscription to a key's queue.
pub(crate) struct ZkWatch {
    pub(super) inner: Arc<Inner>,
    pub(super) key: Key,
    /// Consecutive failures, for the backoff.
    pub(super) failures: u32,
}

impl fmt::Debug for ZkWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkWatch").field("key", &self.key).finish()
    }
}

#[async_trait]
impl Watch for ZkWatch {
    async fn changed(&mut self) -> Result<()> {
        match self.arm_and_wait().await {
            Ok(()) => {
                self.failures = 0;
                Ok(())
            }
            Err(e) => {
                // Wake the caller after a backoff: it re-checks, and its own retry policy
                // decides when a persistent failure becomes an error.
                debug!(key = %self.key, error = %e, "fenced: zookeeper watch failed; re-checking after a backoff");
                let cap = Duration::from_millis(20)
                    .saturating_mul(1 << self.failures.min(6))
                    .min(Duration::from_secs(1));
                self.failures += 1;
                tokio::time::sleep(cap / 2 + crate::options::jitter(cap / 2)).await;
                Ok(())
            }
        }
    }
}

impl ZkWatch {
    async fn arm_and_wait(&mut self) -> Result<()> {
        let session = self.inner.session();
        let dir = self.inner.dir(&self.key);
        let mut targets: Vec<String> = self
            .inner
            .predecessors(&self.key, session.id)
            .into_iter()
            .map(|name| format!("{dir}/{name}"))
            .collect();
        if targets.is_empty() {
            let children = self.inner.children(&session, &dir).await?;
            match children.first() {
                Some(holder) => targets.push(format!("{dir}/{}", holder.name)),
                // Free now: let the caller try.
                None => return Ok(()),
            }
        }
        let mut watchers = Vec::with_capacity(targets.len());
        for path in &targets {
            match self.inner.exists_and_watch(&session, path).await? {
                Some(watcher) => watchers.push(watcher),
                // Already gone: the caller's next attempt may succeed.
                None => return Ok(()),
            }
        }
        let mut set = tokio::task::JoinSet::new();
        for watcher in watchers {
            set.spawn(watcher.changed());
        }
        // The first event wakes this waiter; dropping the set drops the other watchers.
        if let Some(Ok(event)) = set.join_next().await {
            self.inner.watch_events.fetch_add(1, Ordering::Relaxed);
            debug!(key = %self.key, ?event.event_type, "fenced: zookeeper watch fired");
        }
        Ok(())
    }
}
