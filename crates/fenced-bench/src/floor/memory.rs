//! The in-process floor: a `Mutex<HashMap>` of holders and a `Notify` for waiters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::locker::{Locker, WAIT};

/// A held floor lock: the key and the owner value.
#[derive(Debug)]
pub(crate) struct MemoryHeld {
    key: String,
    owner: u64,
}

#[derive(Debug, Clone, Copy)]
struct Holder {
    owner: u64,
    expires: Instant,
}

/// Holders by key, with a lease; a release wakes one waiter.
#[derive(Debug)]
pub(crate) struct MemoryFloor {
    held: Mutex<HashMap<String, Holder>>,
    released: Notify,
    lease: Duration,
    next: AtomicU64,
}

impl MemoryFloor {
    /// An empty store whose grants last `lease`.
    pub(crate) fn new(lease: Duration) -> MemoryFloor {
        MemoryFloor {
            held: Mutex::new(HashMap::new()),
            released: Notify::new(),
            lease,
            next: AtomicU64::new(0),
        }
    }
}

impl Locker for MemoryFloor {
    type Held = MemoryHeld;

    async fn acquire(&self, key: &str) -> Result<MemoryHeld, String> {
        let owner = self.next.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + WAIT;
        loop {
            // Registered before the attempt, so a release in between is not missed.
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let holder_ends = {
                let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                match held.get_mut(key) {
                    Some(h) if h.expires > now => h.expires,
                    Some(h) => {
                        *h = Holder {
                            owner,
                            expires: now + self.lease,
                        };
                        return Ok(MemoryHeld {
                            key: key.to_owned(),
                            owner,
                        });
                    }
                    None => {
                        held.insert(
                            key.to_owned(),
                            Holder {
                                owner,
                                expires: now + self.lease,
                            },
                        );
                        return Ok(MemoryHeld {
                            key: key.to_owned(),
                            owner,
                        });
                    }
                }
            };
            if Instant::now() >= deadline {
                return Err(format!("still held after waiting {WAIT:?}"));
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(holder_ends.min(deadline)) => {}
            }
        }
    }

    async fn release(&self, held: MemoryHeld) -> Result<(), String> {
        {
            let mut map = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            match map.get(&held.key) {
                Some(h) if h.owner == held.owner => {
                    map.remove(&held.key);
                }
                _ => return Err("not held by this owner".to_owned()),
            }
        }
        self.released.notify_one();
        Ok(())
    }

    fn name(&self) -> &'static str {
        "floor"
    }

    fn version(&self) -> String {
        "std Mutex<HashMap> + tokio Notify".to_owned()
    }

    fn settings(&self) -> String {
        format!(
            "memory floor: one std Mutex<HashMap<key, (owner, expiry)>> per process, lease {} ms, no \
             renewal, no fencing token; release removes the entry if the owner matches and calls \
             Notify::notify_one; waiting: register on the Notify, try, then sleep until notified or \
             the holder's expiry (no FIFO: a releasing task may take the lock again at once)",
            self.lease.as_millis()
        )
    }
}
