//! The [`Backend`] trait every lock store implements, and the types it speaks.
//!
//! A backend does four small things atomically on its server: grant a lock if free, extend it,
//! release it (both owner-checked), and optionally tell waiters that a key changed. Everything
//! else — waiting loops, renewal, retries, cancellation handling, the lost-lock signal — lives in
//! the [`Client`](crate::Client), once for all backends.
//!
//! The request types carry a [`Mode`] so that shared/read modes, semaphore permits and reentrancy
//! can be added later without changing the trait: a backend that does not support a mode answers
//! [`ErrorKind::Unsupported`].

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Operation, Result};
use crate::key::Key;
use crate::token::{FencingToken, OwnerId};

/// How strong a backend's mutual exclusion is, from weakest to strongest reach.
///
/// Every level is lease-based or session-based; none survives every fault on its own. Pair the
/// lock with the [`FencingToken`] at the resource for safety under pauses and partitions.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Safety {
    /// Locks exist inside one process only.
    InProcess,
    /// Locks are shared by the processes of one machine through a local file. Survives process
    /// crashes; not shared across machines.
    SingleMachine,
    /// One server holds the locks (for example a single Redis node). A server restart without
    /// persistence, or a failover to an asynchronously replicated copy, can grant a lock twice.
    SingleServer,
    /// A majority of independent lease-based servers must grant each lock (Redlock). Survives
    /// the loss of a minority of them; relies on bounded clock drift and on a restarted server
    /// staying away for the longest lease.
    Quorum,
    /// A consensus system (etcd, ZooKeeper) holds the locks; survives minority failures.
    Consensus,
}

/// Whether a lock lives as long as a lease (renewed by the watchdog) or as long as a session.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Binding {
    /// The lock expires unless renewed before its lease runs out.
    Lease,
    /// The lock lives as long as a server session or connection.
    Session,
}

/// What a backend can do. The client and the conformance suite only use what is declared here,
/// so a backend never fakes a feature.
///
/// ```
/// use fenced::{Capabilities, Safety, Binding};
/// let caps = Capabilities::new(Safety::SingleServer, Binding::Lease).with_native_wait(true);
/// assert!(caps.fencing);
/// assert!(caps.native_wait);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Grants carry fencing tokens that strictly increase per key.
    pub fencing: bool,
    /// Waiters are woken by the server (pub/sub, watch, notify) instead of backing off.
    pub native_wait: bool,
    /// Lease- or session-bound.
    pub binding: Binding,
    /// The safety level.
    pub safety: Safety,
    /// The longest key (bytes) this backend stores.
    pub max_key_len: usize,
    /// The longest lease this backend can promise, when it has a limit: the client shortens every
    /// grant and extension to it, so a guard's [deadline](crate::LockGuard::deadline) is never
    /// later than the server's. Session-bound backends set their session timeout here.
    pub max_lease: Option<Duration>,
    /// Waiters keep a place in a server-side FIFO queue between attempts (see
    /// [`AcquireRequest::queue`]); the client releases a waiting owner's place when it stops
    /// waiting.
    pub queue: bool,
}

impl Capabilities {
    /// Capabilities with fencing on, no native waiting and the crate-wide key limit.
    pub fn new(safety: Safety, binding: Binding) -> Self {
        Capabilities {
            fencing: true,
            native_wait: false,
            binding,
            safety,
            max_key_len: crate::key::MAX_KEY_LEN,
            max_lease: None,
            queue: false,
        }
    }

    /// Sets `native_wait`.
    pub fn with_native_wait(mut self, native: bool) -> Self {
        self.native_wait = native;
        self
    }

    /// Sets `max_key_len`.
    pub fn with_max_key_len(mut self, len: usize) -> Self {
        self.max_key_len = len;
        self
    }

    /// Sets `max_lease`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use fenced::{Binding, Capabilities, Safety};
    /// let caps = Capabilities::new(Safety::Consensus, Binding::Session)
    ///     .with_max_lease(Some(Duration::from_secs(10)));
    /// assert_eq!(caps.max_lease, Some(Duration::from_secs(10)));
    /// ```
    pub fn with_max_lease(mut self, max: Option<Duration>) -> Self {
        self.max_lease = max;
        self
    }

    /// Sets `queue`.
    pub fn with_queue(mut self, queue: bool) -> Self {
        self.queue = queue;
        self
    }
}

/// The state of the server session a session-bound backend's locks live in (see
/// [`Backend::session_state`]).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// Connected; the session is alive.
    Connected,
    /// The connection is lost but the session may still be alive on the server: locks are
    /// *at risk* (see [`LockGuard::is_at_risk`](crate::LockGuard::is_at_risk)) until the
    /// connection comes back (then they are kept) or the session ends.
    Suspended,
    /// The session ended (expired or closed): every lock bound to it is gone.
    Ended,
}

/// The way a lock is held. Only [`Mode::Exclusive`] exists today; shared modes and permits will be
/// added as new variants.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// One holder at a time.
    #[default]
    Exclusive,
}

/// One acquisition attempt, as the client sends it to a backend.
#[non_exhaustive]
#[derive(Debug, Clone, Copy)]
pub struct AcquireRequest<'a> {
    /// The key to lock.
    pub key: &'a Key,
    /// The owner of this grant. The same owner id is reused for retries of one acquisition, so
    /// a backend must treat "already held by this owner" as granted (the reply of an earlier
    /// attempt may have been lost).
    pub owner: &'a OwnerId,
    /// How long the backend keeps the lock without renewal.
    pub lease: Duration,
    /// A label for humans.
    pub label: &'a str,
    /// How the lock is held.
    pub mode: Mode,
    /// The caller will wait for this key if the lock is not granted now: it holds a
    /// [`Watch`] on the key and retries with the same owner. A backend with a server-side queue
    /// ([`Capabilities::queue`]) keeps the request's place between attempts; when `false` (a
    /// single try) it must leave nothing behind. Other backends ignore it.
    pub queue: bool,
}

impl<'a> AcquireRequest<'a> {
    /// An exclusive-mode request.
    pub fn new(key: &'a Key, owner: &'a OwnerId, lease: Duration, label: &'a str) -> Self {
        AcquireRequest {
            key,
            owner,
            lease,
            label,
            mode: Mode::Exclusive,
            queue: false,
        }
    }

    /// Sets [`queue`](AcquireRequest::queue).
    pub fn with_queue(mut self, queue: bool) -> Self {
        self.queue = queue;
        self
    }
}

/// A reference to a held lock: the key and the owner that holds it.
#[non_exhaustive]
#[derive(Debug, Clone, Copy)]
pub struct LockRef<'a> {
    /// The locked key.
    pub key: &'a Key,
    /// The owner that holds it.
    pub owner: &'a OwnerId,
}

impl<'a> LockRef<'a> {
    /// A reference to `key` held by `owner`.
    pub fn new(key: &'a Key, owner: &'a OwnerId) -> Self {
        LockRef { key, owner }
    }
}

/// A granted lock.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The fencing token of this grant.
    pub token: FencingToken,
    /// The lease the server applied (may be shorter than requested, never longer).
    pub lease: Duration,
}

impl Grant {
    /// A grant.
    pub fn new(token: FencingToken, lease: Duration) -> Self {
        Grant { token, lease }
    }
}

/// What a backend knows about the current holder of a key.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HolderInfo {
    /// The holder's owner id.
    pub owner: Option<OwnerId>,
    /// The holder's fencing token.
    pub token: Option<FencingToken>,
    /// The holder's label.
    pub label: Option<String>,
    /// How long the holder's lease still runs, as the server sees it.
    pub remaining: Option<Duration>,
    /// The locked key (set by [`Backend::list`]).
    pub key: Option<Key>,
    /// How long the current grant has been held, as the server sees it.
    pub age: Option<Duration>,
    /// How many waiters the backend knows of (for example, clients subscribed to the key's
    /// release notifications). `None` when the backend cannot tell.
    pub waiters: Option<u64>,
}

impl HolderInfo {
    /// Holder information; fill the public fields you know.
    pub fn new() -> Self {
        Self::default()
    }
}

impl fmt::Display for HolderInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.label {
            Some(label) => write!(f, "held by {label:?}")?,
            None => f.write_str("held by another owner")?,
        }
        if let Some(token) = self.token {
            write!(f, " (token {token})")?;
        }
        if let Some(remaining) = self.remaining {
            write!(f, ", lease ends in {remaining:.1?}")?;
        }
        Ok(())
    }
}

/// The answer to an acquisition attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The lock is now held by the requesting owner.
    Granted(Grant),
    /// Another owner holds it.
    Held(HolderInfo),
}

/// The answer to an owner-checked operation (extend, release).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    /// Done: the owner held the lock.
    Done,
    /// The owner does not hold the lock (it expired, was deleted, or another owner holds it;
    /// `Some` carries that holder). Nothing was changed.
    NotHeld(Option<HolderInfo>),
}

/// A subscription to changes of one key, created **before** the acquisition attempt it guards so
/// that no release can slip between the attempt and the wait (no lost wake-up).
#[async_trait]
pub trait Watch: Send + fmt::Debug {
    /// Resolves when the key may have changed since the watch was created or since the previous
    /// call returned. Spurious wake-ups are allowed (after a reconnect, for example); missed ones
    /// are not.
    ///
    /// # Cancel safety
    /// Must be cancel safe: a change that happens while no `changed()` future is being polled is
    /// reported by the next call.
    async fn changed(&mut self) -> Result<()>;
}

/// A lock store. Implement the required methods; the [`Client`](crate::Client) adds waiting,
/// renewal, retries and cancellation handling on top.
///
/// Every method must be atomic on the server and owner-checked where it says so. Return
/// transient failures (I/O, timeouts) as [`Error`]s marked [`transient`](Error::transient) so the
/// client retries them.
///
/// # Cancel safety
/// The client may drop any of these futures at any await point (a caller's timeout, a dropped
/// task). An implementation must leave the server in a state that one of the owner-checked
/// operations can clean up: an acquisition cut short may have granted the lock (the client then
/// releases it by owner id), and an extension or release cut short may or may not have happened.
/// Never keep local state that claims an operation happened before the server confirmed it.
/// The client never drops an `acquire` call half-way: when the caller's future is dropped, its
/// clean-up first runs the call to its end, then releases. So a backend whose requests may be
/// applied out of order (separate streams, pooled connections) does not see the clean-up's
/// release overtake the grant it is meant to undo.
///
/// ```
/// # async fn demo() -> fenced::Result<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use fenced::{AcquireRequest, Acquired, Backend, Key, OwnerId};
/// let backend: Arc<dyn Backend> = Arc::new(fenced::backends::memory::MemoryBackend::isolated());
/// let key = Key::new("order:42")?;
/// let owner = OwnerId::random();
/// let request = AcquireRequest::new(&key, &owner, Duration::from_secs(10), "doc example");
/// assert!(matches!(backend.acquire(&request).await?, Acquired::Granted(_)));
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and metrics (`"redis"`).
    fn name(&self) -> &'static str;

    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// Rejects keys this backend cannot store safely (beyond the crate-wide [`Key`] rules).
    /// Called before any I/O. The default accepts keys up to
    /// [`Capabilities::max_key_len`].
    fn check_key(&self, key: &Key) -> Result<()> {
        let max = self.capabilities().max_key_len;
        if key.as_str().len() > max {
            return Err(Error::new(
                ErrorKind::InvalidKey,
                Operation::Validate,
                format!(
                    "the {} backend stores keys of at most {max} bytes, this one has {}; use a shorter key",
                    self.name(),
                    key.as_str().len()
                ),
            )
            .with_key(key.as_str()));
        }
        Ok(())
    }

    /// Grants the lock to `request.owner` if it is free, expired, or already held by that same
    /// owner (then the lease is refreshed and the same token returned). Otherwise reports the
    /// holder, with its remaining lease when known.
    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Acquired>;

    /// Sets the lease of a lock held by `lock.owner` to exactly `lease` from now. Owner-checked:
    /// never touches a lock held by another owner.
    async fn extend(&self, lock: &LockRef<'_>, lease: Duration) -> Result<Confirm>;

    /// Releases a lock held by `lock.owner` and wakes waiters. Owner-checked: never touches a
    /// lock held by another owner.
    async fn release(&self, lock: &LockRef<'_>) -> Result<Confirm>;

    /// Subscribes to changes of `key`. Backends without native waiting keep the default, which
    /// returns a watch that wakes up with exponential backoff (10 ms doubling to 1 s).
    async fn watch(&self, key: &Key) -> Result<Box<dyn Watch>> {
        let _ = key;
        Ok(Box::new(BackoffWatch::default()))
    }

    /// The current holder of `key`, if any (for status and diagnostics). Not owner-checked.
    async fn holder(&self, key: &Key) -> Result<Option<HolderInfo>>;

    /// Administrative break of a lock whatever its owner; returns what was broken. The fencing
    /// counter is kept, so the next grant still gets a higher token.
    async fn force_release(&self, key: &Key) -> Result<Option<HolderInfo>>;

    /// The state of the server session this backend's locks are bound to, for session-bound
    /// backends ([`Binding::Session`]); `None` (the default) for backends without one. Guards
    /// follow it: [`SessionState::Suspended`] marks them at risk, [`SessionState::Ended`] fires
    /// their lost signal with [`LostReason::SessionEnded`](crate::LostReason::SessionEnded).
    fn session_state(&self) -> Option<tokio::sync::watch::Receiver<SessionState>> {
        None
    }

    /// Every currently held lock whose key starts with `prefix` (all locks for `""`), with
    /// [`HolderInfo::key`] set, sorted by key. For status displays; not owner-checked and not a
    /// consistent snapshot on every backend. The default answers
    /// [`ErrorKind::Unsupported`].
    async fn list(&self, prefix: &str) -> Result<Vec<HolderInfo>> {
        let _ = prefix;
        Err(Error::new(
            ErrorKind::Unsupported,
            Operation::Admin,
            format!("the {} backend cannot list its locks", self.name()),
        ))
    }

    /// Conditions that weaken this backend's guarantees right now, in sentences for an
    /// operator (`fenced status` prints them), given `max_lease`: the longest lease the
    /// store's clients use. Empty when there is nothing to report (the default).
    async fn warnings(&self, max_lease: Duration) -> Result<Vec<String>> {
        let _ = max_lease;
        Ok(Vec::new())
    }
}

/// The fallback [`Watch`]: resolves after an exponentially growing delay (10 ms, doubling, at
/// most 1 s, with jitter). Used by backends that cannot notify.
#[derive(Debug, Default)]
pub struct BackoffWatch {
    attempt: u32,
}

#[async_trait]
impl Watch for BackoffWatch {
    async fn changed(&mut self) -> Result<()> {
        let cap = Duration::from_millis(10)
            .saturating_mul(1 << self.attempt.min(7))
            .min(Duration::from_secs(1));
        self.attempt += 1;
        tokio::time::sleep(cap / 2 + crate::options::jitter(cap / 2)).await;
        Ok(())
    }
}

/// A shared backend is a backend (so wrappers such as
/// [`Counting`](crate::layers::Counting) can wrap a client's `Arc<dyn Backend>`).
#[async_trait]
impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn check_key(&self, key: &Key) -> Result<()> {
        (**self).check_key(key)
    }
    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Acquired> {
        (**self).acquire(request).await
    }
    async fn extend(&self, lock: &LockRef<'_>, lease: Duration) -> Result<Confirm> {
        (**self).extend(lock, lease).await
    }
    async fn release(&self, lock: &LockRef<'_>) -> Result<Confirm> {
        (**self).release(lock).await
    }
    async fn watch(&self, key: &Key) -> Result<Box<dyn Watch>> {
        (**self).watch(key).await
    }
    async fn holder(&self, key: &Key) -> Result<Option<HolderInfo>> {
        (**self).holder(key).await
    }
    async fn force_release(&self, key: &Key) -> Result<Option<HolderInfo>> {
        (**self).force_release(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<HolderInfo>> {
        (**self).list(prefix).await
    }
    async fn warnings(&self, max_lease: Duration) -> Result<Vec<String>> {
        (**self).warnings(max_lease).await
    }
    fn session_state(&self) -> Option<tokio::sync::watch::Receiver<SessionState>> {
        (**self).session_state()
    }
}
