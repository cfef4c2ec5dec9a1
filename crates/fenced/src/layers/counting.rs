//! [`Counting`]: counts the calls a client makes to its backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{
    AcquireRequest, Acquired, Backend, Capabilities, Confirm, HolderInfo, LockRef, Watch,
};
use crate::error::Result;
use crate::key::Key;

/// Call counters of a [`Counting`] backend.
#[derive(Debug, Default)]
pub struct CallCounts {
    /// `acquire` calls.
    pub acquire: AtomicU64,
    /// `extend` calls.
    pub extend: AtomicU64,
    /// `release` calls.
    pub release: AtomicU64,
    /// `watch` calls (subscriptions).
    pub watch: AtomicU64,
    /// Wake-ups delivered by watches (`Watch::changed` returning).
    pub wakeups: AtomicU64,
    /// `holder`, `force_release` and `list` calls.
    pub admin: AtomicU64,
}

impl CallCounts {
    /// The sum of all calls that reach the backend (everything but wake-ups).
    pub fn total(&self) -> u64 {
        [
            &self.acquire,
            &self.extend,
            &self.release,
            &self.watch,
            &self.admin,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// Wraps a backend and counts every call; used by the conformance suite to check that waiting
/// is notification-driven and that bad input causes no I/O.
///
/// ```
/// # async fn demo() -> fenced::Result<()> {
/// use std::sync::atomic::Ordering;
/// use fenced::layers::Counting;
/// let counting = Counting::new(fenced::backends::memory::MemoryBackend::isolated());
/// let counts = counting.counts();
/// let client = fenced::Client::new(counting);
/// client.lock("k").await?.release().await?;
/// assert_eq!(counts.acquire.load(Ordering::Relaxed), 1);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Counting<B> {
    inner: B,
    counts: Arc<CallCounts>,
}

impl<B: Backend> Counting<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Counting {
            inner,
            counts: Arc::default(),
        }
    }

    /// The shared counters.
    pub fn counts(&self) -> Arc<CallCounts> {
        self.counts.clone()
    }
}

#[derive(Debug)]
struct CountingWatch {
    inner: Box<dyn Watch>,
    counts: Arc<CallCounts>,
}

#[async_trait]
impl Watch for CountingWatch {
    async fn changed(&mut self) -> Result<()> {
        self.inner.changed().await?;
        self.counts.wakeups.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[async_trait]
impl<B: Backend> Backend for Counting<B> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn check_key(&self, key: &Key) -> Result<()> {
        self.inner.check_key(key)
    }
    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Acquired> {
        self.counts.acquire.fetch_add(1, Ordering::Relaxed);
        self.inner.acquire(request).await
    }
    async fn extend(&self, lock: &LockRef<'_>, lease: Duration) -> Result<Confirm> {
        self.counts.extend.fetch_add(1, Ordering::Relaxed);
        self.inner.extend(lock, lease).await
    }
    async fn release(&self, lock: &LockRef<'_>) -> Result<Confirm> {
        self.counts.release.fetch_add(1, Ordering::Relaxed);
        self.inner.release(lock).await
    }
    async fn watch(&self, key: &Key) -> Result<Box<dyn Watch>> {
        self.counts.watch.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.watch(key).await?;
        Ok(Box::new(CountingWatch {
            inner,
            counts: self.counts.clone(),
        }))
    }
    async fn holder(&self, key: &Key) -> Result<Option<HolderInfo>> {
        self.counts.admin.fetch_add(1, Ordering::Relaxed);
        self.inner.holder(key).await
    }
    async fn force_release(&self, key: &Key) -> Result<Option<HolderInfo>> {
        self.counts.admin.fetch_add(1, Ordering::Relaxed);
        self.inner.force_release(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<HolderInfo>> {
        self.counts.admin.fetch_add(1, Ordering::Relaxed);
        self.inner.list(prefix).await
    }
    async fn warnings(&self, max_lease: Duration) -> Result<Vec<String>> {
        self.counts.admin.fetch_add(1, Ordering::Relaxed);
        self.inner.warnings(max_lease).await
    }
    fn session_state(&self) -> Option<tokio::sync::watch::Receiver<crate::backend::SessionState>> {
        self.inner.session_state()
    }
}
