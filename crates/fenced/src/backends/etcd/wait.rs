//! Waiting on etcd: each waiter watches only its predecessor's key for deletion.
//!
//! An acquisition that has to wait leaves its own key in the lock's queue and records, per lock
//! key and owner, its *predecessor* — the queued key with the highest create revision below its
//! own — together with the revision of the read that found it. [`EtcdWatch::changed`] watches
//! that one key for a delete event from the revision after that read, so a deletion between the
//! read and the watch is delivered too (no lost wake-up), and the release of a lock wakes only
//! the next waiter in line (no herd). Expiries count as deletions: etcd deletes a key whose
//! session lease ended, which wakes its successor.
//!
//! If several tasks of one backend queue on the same lock at once, the watch covers all their
//! predecessors by watching the lock's whole queue for deletions (a rare case: the client lets
//! one task per key wait remotely). A watch that fails (connection lost, compacted revision)
//! reports a change after a short backoff, so the waiter re-checks instead of sleeping forever.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{EventType, WatchClient, WatchFilterType, WatchOptions, WatchStream};

use crate::backend::Watch;
use crate::error::Result;
use crate::key::Key;
use crate::token::OwnerId;

/// The key one waiter waits on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Predecessor {
    /// The etcd key to watch.
    pub(crate) key: Vec<u8>,
    /// The lock's queue prefix, for the rare case of several local waiters on one lock.
    pub(crate) queue: Vec<u8>,
    /// The revision at which the predecessor was seen; events after it are watched.
    pub(crate) seen_at: i64,
    /// The create revision of the waiter's own entry: its place in the queue.
    pub(crate) mine: i64,
}

/// What one waiter watches: a single key, or (several local waiters) a whole queue.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    key: Vec<u8>,
    range: bool,
    from: i64,
}

/// The predecessors of this backend's waiting owners, and a count of delivered delete events.
#[derive(Debug, Default)]
pub(crate) struct Waits {
    map: Mutex<HashMap<Key, HashMap<OwnerId, Predecessor>>>,
    events: AtomicU64,
}

impl Waits {
    /// Records that `owner` waits on `predecessor` for `key`.
    pub(crate) fn set(&self, key: &Key, owner: OwnerId, predecessor: Predecessor) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(key.clone())
            .or_default()
            .insert(owner, predecessor);
    }

    /// The create revision of `owner`'s queued entry for `key`, if it waits.
    pub(crate) fn place(&self, key: &Key, owner: &OwnerId) -> Option<i64> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(key)?.get(owner).map(|p| p.mine)
    }

    /// Forgets what `owner` waited on for `key`.
    pub(crate) fn clear(&self, key: &Key, owner: &OwnerId) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(owners) = map.get_mut(key) {
            owners.remove(owner);
            if owners.is_empty() {
                map.remove(key);
            }
        }
    }

    /// The delete events delivered to this backend's watches so far.
    pub(crate) fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    fn target(&self, key: &Key) -> Option<Target> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let owners = map.get(key)?;
        let mut preds = owners.values();
        let first = preds.next()?;
        match preds.next() {
            None => Some(Target {
                key: first.key.clone(),
                range: false,
                from: first.seen_at + 1,
            }),
            Some(_) => Some(Target {
                key: first.queue.clone(),
                range: true,
                from: owners.values().map(|p| p.seen_at).min().unwrap_or(0) + 1,
            }),
        }
    }
}

/// The [`Watch`] of the etcd backend.
pub(crate) struct EtcdWatch {
    client: WatchClient,
    waits: Arc<Waits>,
    key: Key,
    current: Option<(Target, WatchStream)>,
    failures: u32,
}

impl fmt::Debug for EtcdWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdWatch")
            .field("key", &self.key)
            .field(
                "watching",
                &self
                    .current
                    .as_ref()
                    .map(|(t, _)| String::from_utf8_lossy(&t.key).into_owned()),
            )
            .finish()
    }
}

impl EtcdWatch {
    pub(crate) fn new(client: WatchClient, waits: Arc<Waits>, key: Key) -> Self {
        EtcdWatch {
            client,
            waits,
            key,
            current: None,
            failures: 0,
        }
    }

    /// Reports a change after a backoff that grows with consecutive failures (10 ms to 1 s).
    async fn back_off(&mut self) -> Result<()> {
        self.current = None;
        let delay = Duration::from_millis(10)
            .saturating_mul(1 << self.failures.min(7))
            .min(Duration::from_secs(1));
        self.failures += 1;
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

#[async_trait]
impl Watch for EtcdWatch {
    async fn changed(&mut self) -> Result<()> {
        let Some(target) = self.waits.target(&self.key) else {
            // Nothing queued by this backend for the key (a single try): re-check with backoff.
            return self.back_off().await;
        };
        if self.current.as_ref().map(|(t, _)| t) != Some(&target) {
            let mut options = WatchOptions::new()
                .with_start_revision(target.from)
                .with_filters([WatchFilterType::NoPut]);
            if target.range {
                options = options.with_prefix();
            }
            match self.client.watch(target.key.clone(), Some(options)).await {
                Ok(stream) => self.current = Some((target, stream)),
                Err(e) => {
                    tracing::debug!(error = %e, "fenced: etcd watch failed; re-checking");
                    return self.back_off().await;
                }
            }
        }
        let (_, stream) = self.current.as_mut().expect("watch is open");
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    if response.canceled() {
                        // Compacted past the revision, or refused: re-check.
                        return self.back_off().await;
                    }
                    let deletes = response
                        .events()
                        .iter()
                        .filter(|e| e.event_type() == EventType::Delete)
                        .count() as u64;
                    if deletes > 0 {
                        self.waits.events.fetch_add(deletes, Ordering::Relaxed);
                        self.failures = 0;
                        self.current = None;
                        return Ok(());
                    }
                }
                Ok(None) | Err(_) => return self.back_off().await,
            }
        }
    }
}
