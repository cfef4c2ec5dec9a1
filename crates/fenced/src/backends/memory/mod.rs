#![doc = include_str!("README.md")]

mod config;
mod wait;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::backend::{
    AcquireRequest, Acquired, Backend, Binding, Capabilities, Confirm, Grant, HolderInfo, LockRef,
    Mode, Safety, Watch,
};
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::key::Key;
use crate::token::{FencingToken, OwnerId};

use config::MemoryConfig;
use wait::MemoryWatch;

/// The in-process backend. Cheap to clone; clones share the store.
///
/// ```
/// # async fn demo() -> fenced::Result<()> {
/// use fenced::backends::memory::MemoryBackend;
/// let a = fenced::Client::new(MemoryBackend::named("jobs"));
/// let b = fenced::connect("memory://jobs").await?; // same store as `a`
/// let guard = a.lock("report").await?;
/// assert!(b.try_lock("report").await?.is_none());
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    store: Arc<Store>,
}

#[derive(Debug)]
struct Store {
    name: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The last token issued by this store, for any key.
    last_token: u64,
    keys: HashMap<Key, Entry>,
}

#[derive(Debug)]
struct Entry {
    holder: Option<Holder>,
    releases: watch::Sender<u64>,
}

#[derive(Debug, Clone)]
struct Holder {
    owner: OwnerId,
    token: FencingToken,
    label: String,
    /// When this grant was made (kept when the same owner refreshes it).
    granted: Instant,
    expires: Instant,
}

impl Holder {
    /// What callers see of this holder; `waiters` is the number of live watches of the key.
    fn info(&self, now: Instant, waiters: usize) -> HolderInfo {
        let mut info = HolderInfo::new();
        info.owner = Some(self.owner);
        info.token = Some(self.token);
        info.label = Some(self.label.clone());
        info.remaining = Some(self.expires.saturating_duration_since(now));
        info.age = Some(now.saturating_duration_since(self.granted));
        info.waiters = Some(u64::try_from(waiters).unwrap_or(u64::MAX));
        info
    }
}

impl Entry {
    fn new() -> Self {
        Entry {
            holder: None,
            releases: watch::channel(0).0,
        }
    }

    /// The holder whose lease is still running.
    fn live_holder(&self, now: Instant) -> Option<&Holder> {
        self.holder.as_ref().filter(|h| h.expires > now)
    }

    /// The live holder's information, with the number of watches of this key as its waiters.
    fn live_info(&self, now: Instant) -> Option<HolderInfo> {
        self.live_holder(now)
            .map(|h| h.info(now, self.releases.receiver_count()))
    }

    fn notify(&self) {
        self.releases.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn removable(&self) -> bool {
        self.holder.is_none() && self.releases.receiver_count() == 0
    }
}

impl MemoryBackend {
    /// The process-wide store called `name` (created on first use, kept until the process ends).
    /// `memory://name` URLs connect to it.
    pub fn named(name: &str) -> Self {
        static STORES: OnceLock<Mutex<HashMap<String, Arc<Store>>>> = OnceLock::new();
        let mut stores = STORES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let store = stores
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Store::new(name)))
            .clone();
        MemoryBackend { store }
    }

    /// A private store shared only by clones of this backend.
    pub fn isolated() -> Self {
        MemoryBackend {
            store: Arc::new(Store::new("isolated")),
        }
    }

    pub(crate) fn from_url(url: &url::Url) -> Result<Self> {
        let config = MemoryConfig::from_url(url)?;
        Ok(MemoryBackend::named(&config.name))
    }

    /// The store's name.
    pub fn store_name(&self) -> &str {
        &self.store.name
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.store
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Store {
    fn new(name: &str) -> Self {
        Store {
            name: name.to_owned(),
            state: Mutex::new(State::default()),
        }
    }
}

impl State {
    /// Drops the entry of `key` when nobody holds or watches it.
    fn tidy(&mut self, key: &Key) {
        if self.keys.get(key).is_some_and(Entry::removable) {
            self.keys.remove(key);
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Safety::InProcess, Binding::Lease).with_native_wait(true)
    }

    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Acquired> {
        if request.mode != Mode::Exclusive {
            return Err(Error::new(
                ErrorKind::Unsupported,
                Operation::Acquire,
                "the memory backend supports exclusive locks only",
            ));
        }
        let now = Instant::now();
        let mut state = self.state();
        let next_token = state.last_token + 1;
        let entry = state
            .keys
            .entry(request.key.clone())
            .or_insert_with(Entry::new);
        if let Some(holder) = entry.live_holder(now) {
            if holder.owner != *request.owner {
                return Ok(Acquired::Held(
                    holder.info(now, entry.releases.receiver_count()),
                ));
            }
        }
        let token = match entry.holder.as_mut() {
            Some(h) if h.owner == *request.owner && h.expires > now => {
                h.expires = now + request.lease;
                h.token
            }
            _ => {
                entry.holder = Some(Holder {
                    owner: *request.owner,
                    token: FencingToken::new(next_token),
                    label: request.label.to_owned(),
                    granted: now,
                    expires: now + request.lease,
                });
                state.last_token = next_token;
                FencingToken::new(next_token)
            }
        };
        Ok(Acquired::Granted(Grant::new(token, request.lease)))
    }

    async fn extend(&self, lock: &LockRef<'_>, lease: Duration) -> Result<Confirm> {
        let now = Instant::now();
        let mut state = self.state();
        let Some(entry) = state.keys.get_mut(lock.key) else {
            return Ok(Confirm::NotHeld(None));
        };
        match entry.holder.as_mut() {
            Some(h) if h.expires > now && h.owner == *lock.owner => {
                h.expires = now + lease;
                Ok(Confirm::Done)
            }
            _ => Ok(Confirm::NotHeld(entry.live_info(now))),
        }
    }

    async fn release(&self, lock: &LockRef<'_>) -> Result<Confirm> {
        let now = Instant::now();
        let mut state = self.state();
        let Some(entry) = state.keys.get_mut(lock.key) else {
            return Ok(Confirm::NotHeld(None));
        };
        let reply = match &entry.holder {
            Some(h) if h.owner == *lock.owner => {
                let live = h.expires > now;
                entry.holder = None;
                entry.notify();
                if live {
                    Confirm::Done
                } else {
                    Confirm::NotHeld(None)
                }
            }
            _ => Confirm::NotHeld(entry.live_info(now)),
        };
        state.tidy(lock.key);
        Ok(reply)
    }

    async fn watch(&self, key: &Key) -> Result<Box<dyn Watch>> {
        let mut state = self.state();
        let entry = state.keys.entry(key.clone()).or_insert_with(Entry::new);
        let mut rx = entry.releases.subscribe();
        rx.mark_unchanged();
        Ok(Box::new(MemoryWatch { rx }))
    }

    async fn holder(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let now = Instant::now();
        let state = self.state();
        Ok(state.keys.get(key).and_then(|e| e.live_info(now)))
    }

    async fn force_release(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let now = Instant::now();
        let mut state = self.state();
        let Some(entry) = state.keys.get_mut(key) else {
            return Ok(None);
        };
        let broken = entry.live_info(now);
        entry.holder = None;
        entry.notify();
        state.tidy(key);
        Ok(broken)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<HolderInfo>> {
        let now = Instant::now();
        let state = self.state();
        let mut held: Vec<HolderInfo> = state
            .keys
            .iter()
            .filter(|(key, _)| key.as_str().starts_with(prefix))
            .filter_map(|(key, entry)| {
                let mut info = entry.live_info(now)?;
                info.key = Some(key.clone());
                Some(info)
            })
            .collect();
        drop(state);
        held.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    fn key(k: &str) -> Key {
        Key::new(k).unwrap()
    }

    async fn grant(b: &MemoryBackend, k: &Key, owner: &OwnerId, label: &str) -> FencingToken {
        match b
            .acquire(&AcquireRequest::new(k, owner, LEASE, label))
            .await
            .unwrap()
        {
            Acquired::Granted(g) => g.token,
            Acquired::Held(h) => panic!("expected a grant, the lock is {h}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn age_counts_from_the_grant_and_survives_renewal() {
        let b = MemoryBackend::isolated();
        let (k, a) = (key("job"), OwnerId::random());
        let token = grant(&b, &k, &a, "first").await;
        tokio::time::advance(Duration::from_secs(5)).await;
        // A retried acquire and an extension keep the grant, so its age goes on.
        assert_eq!(grant(&b, &k, &a, "first").await, token);
        assert_eq!(
            b.extend(&LockRef::new(&k, &a), LEASE).await.unwrap(),
            Confirm::Done
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let info = b.holder(&k).await.unwrap().unwrap();
        assert_eq!(info.age, Some(Duration::from_secs(7)));
        assert_eq!(info.remaining, Some(LEASE - Duration::from_secs(2)));
        let other = OwnerId::random();
        match b
            .acquire(&AcquireRequest::new(&k, &other, LEASE, "second"))
            .await
            .unwrap()
        {
            Acquired::Held(h) => assert_eq!(h.age, Some(Duration::from_secs(7))),
            Acquired::Granted(g) => panic!("{g:?}"),
        }
        // A new grant after the lease ran out starts from zero.
        tokio::time::advance(LEASE).await;
        grant(&b, &k, &other, "second").await;
        assert_eq!(
            b.holder(&k).await.unwrap().unwrap().age,
            Some(Duration::ZERO)
        );
        let broken = b.force_release(&k).await.unwrap().unwrap();
        assert_eq!(broken.owner, Some(other));
        assert_eq!(broken.age, Some(Duration::ZERO));
    }

    #[tokio::test]
    async fn waiters_are_the_live_watches_of_the_key() {
        let b = MemoryBackend::isolated();
        let (k, a) = (key("busy"), OwnerId::random());
        grant(&b, &k, &a, "holder").await;
        assert_eq!(b.holder(&k).await.unwrap().unwrap().waiters, Some(0));
        let first = b.watch(&k).await.unwrap();
        let second = b.watch(&k).await.unwrap();
        let elsewhere = b.watch(&key("other")).await.unwrap();
        assert_eq!(b.holder(&k).await.unwrap().unwrap().waiters, Some(2));
        drop(first);
        let listed = b.list("").await.unwrap();
        assert_eq!(listed.len(), 1, "watched but free keys are not listed");
        assert_eq!(listed[0].waiters, Some(1));
        drop((second, elsewhere));
        assert_eq!(b.holder(&k).await.unwrap().unwrap().waiters, Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn list_shows_live_holders_under_the_prefix_sorted() {
        let b = MemoryBackend::isolated();
        let owner = OwnerId::random();
        for k in ["b/2", "b/10", "a/1", "b/", "bb", "b/1 ü"] {
            grant(&b, &key(k), &owner, k).await;
        }
        let short = key("b/short");
        let request = AcquireRequest::new(&short, &owner, Duration::from_secs(1), "short");
        assert!(matches!(
            b.acquire(&request).await.unwrap(),
            Acquired::Granted(_)
        ));
        tokio::time::advance(Duration::from_secs(2)).await;
        let listed = b.list("b/").await.unwrap();
        let keys: Vec<&str> = listed
            .iter()
            .map(|i| i.key.as_ref().unwrap().as_str())
            .collect();
        // Sorted by the key's bytes; the expired lock is gone.
        assert_eq!(keys, ["b/", "b/1 ü", "b/10", "b/2"]);
        for info in &listed {
            assert_eq!(info.label.as_deref(), info.key.as_ref().map(Key::as_str));
            assert_eq!(info.owner, Some(owner));
            assert_eq!(info.age, Some(Duration::from_secs(2)));
        }
        assert_eq!(b.list("").await.unwrap().len(), 6);
        assert!(b.list("c").await.unwrap().is_empty());
    }
}
