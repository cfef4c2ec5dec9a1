//! [`Client`]: acquisition, waiting, retries and cancellation handling, once for every backend.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;
use tracing::{Instrument, Span, debug, debug_span, field, warn};

use crate::backend::{
    AcquireRequest, Acquired, Backend, Capabilities, Confirm, HolderInfo, LockRef, Watch,
};
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::guard::{LockGuard, LockInfo};
use crate::key::Key;
use crate::lease::{Held, HeldParts};
use crate::observe::{MetricNames, Scope, Waiting, backend_error};
use crate::options::{LockOptions, MAX_WAIT, Wait, jitter};
use crate::token::OwnerId;

/// When a holder's remaining lease is unknown, waiters re-check at least this often.
const BLIND_RECHECK: Duration = Duration::from_secs(1);

/// A lock client: cheap to clone (an `Arc` inside), shared by many tasks.
///
/// Build one from a URL with [`connect`](crate::connect) or [`Client::builder`], or wrap any
/// [`Backend`] with [`Client::new`].
///
/// Inside one client, waiters for the same key queue locally (FIFO) and only the first one talks
/// to the backend, so N local waiters cost the server as much as one.
///
/// ```
/// # async fn demo() -> fenced::Result<()> {
/// let client = fenced::connect("memory://").await?;
/// let guard = client.lock("order:42").await?;
/// // ... refund order 42, passing guard.token() to the payment service ...
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    defaults: LockOptions,
    gates: Gates,
    metric_names: MetricNames,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("backend", &self.inner.backend)
            .field("defaults", &self.inner.defaults)
            .field("metric_names", &self.inner.metric_names)
            .finish()
    }
}

impl Client {
    /// A client over `backend` with default [`LockOptions`].
    ///
    /// ```
    /// let client = fenced::Client::new(fenced::backends::memory::MemoryBackend::isolated());
    /// assert_eq!(client.backend().name(), "memory");
    /// ```
    pub fn new(backend: impl Backend) -> Client {
        Client::from_arc(Arc::new(backend), LockOptions::default())
    }

    /// A client over a shared backend with the given default options (validated on first use).
    pub fn from_arc(backend: Arc<dyn Backend>, defaults: LockOptions) -> Client {
        crate::observe::describe();
        Client {
            inner: Arc::new(Inner {
                backend,
                defaults,
                gates: Gates::default(),
                metric_names: MetricNames::default(),
            }),
        }
    }

    /// This client with another rule for the `lock` label of its metrics (see
    /// [`MetricNames`]). Clones made before keep their rule; both share the backend and the local
    /// queue of waiters.
    ///
    /// ```
    /// use fenced::{Client, MetricNames};
    /// let client = Client::new(fenced::backends::memory::MemoryBackend::isolated())
    ///     .with_metric_names(MetricNames::fixed("jobs")?);
    /// assert_eq!(client.metric_names().lock_name("order:42"), "jobs");
    /// # Ok::<(), fenced::Error>(())
    /// ```
    pub fn with_metric_names(self, names: MetricNames) -> Client {
        Client {
            inner: Arc::new(Inner {
                backend: self.inner.backend.clone(),
                defaults: self.inner.defaults.clone(),
                gates: self.inner.gates.clone(),
                metric_names: names,
            }),
        }
    }

    /// The rule naming locks in metrics when an acquisition does not set
    /// [`LockOptions::metric_name`].
    ///
    /// ```
    /// let client = fenced::Client::new(fenced::backends::memory::MemoryBackend::isolated());
    /// assert_eq!(client.metric_names().lock_name("order:42"), "order");
    /// ```
    pub fn metric_names(&self) -> &MetricNames {
        &self.inner.metric_names
    }

    /// A builder: URL, default options.
    ///
    /// ```
    /// # async fn demo() -> fenced::Result<()> {
    /// use std::time::Duration;
    /// let client = fenced::Client::builder()
    ///     .url("memory://")
    ///     .options(fenced::LockOptions::new().lease(Duration::from_secs(10)))
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> crate::url::ClientBuilder {
        crate::url::ClientBuilder::default()
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// The backend's capabilities.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.backend.capabilities()
    }

    /// The options used by [`lock`](Client::lock) and [`try_lock`](Client::try_lock).
    pub fn default_options(&self) -> &LockOptions {
        &self.inner.defaults
    }

    /// Acquires `key`, waiting as long as it takes, with the client's default options.
    ///
    /// Locks are not reentrant: a task that holds `key` and asks for it again waits for itself.
    ///
    /// # Cancel safety
    /// Dropping the future never leaves a lock held beyond its lease: if a grant may have
    /// happened while the future was pending, a release for this attempt's owner id is sent in
    /// the background (owner-checked, so it never touches another owner's lock).
    pub async fn lock(&self, key: impl AsRef<str>) -> Result<LockGuard> {
        self.lock_with(key, &self.inner.defaults).await
    }

    /// One attempt to acquire `key` with the client's default options: `Ok(None)` when another
    /// owner holds it.
    ///
    /// ```
    /// # async fn demo(client: fenced::Client) -> fenced::Result<()> {
    /// if let Some(guard) = client.try_lock("cache:refill").await? {
    ///     // refill the cache
    ///     guard.release().await?;
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// As for [`lock`](Client::lock).
    pub async fn try_lock(&self, key: impl AsRef<str>) -> Result<Option<LockGuard>> {
        let options = self.inner.defaults.clone().wait(Duration::ZERO);
        match self.lock_with(key, &options).await {
            Ok(guard) => Ok(Some(guard)),
            Err(e) if e.kind() == ErrorKind::NotAcquired => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Acquires `key` with `options`. Fails with [`ErrorKind::NotAcquired`] when the wait timeout
    /// elapses (naming the holder when known), and with a backend error when transient errors
    /// persist beyond the retry policy.
    ///
    /// Waiting is driven by the backend's notifications when it has them: the waiter subscribes
    /// *before* re-trying, then sleeps until a release notification or the holder's remaining
    /// lease, whichever comes first. It never polls at a fixed interval.
    ///
    /// ```
    /// # async fn demo(client: fenced::Client) -> fenced::Result<()> {
    /// use std::time::Duration;
    /// let options = fenced::LockOptions::new().wait(Duration::from_secs(5)).lease(Duration::from_secs(10));
    /// let guard = client.lock_with("order:42", &options).await?;
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// As for [`lock`](Client::lock).
    pub async fn lock_with(
        &self,
        key: impl AsRef<str>,
        options: &LockOptions,
    ) -> Result<LockGuard> {
        let key = Key::new(key.as_ref())?;
        options.validate()?;
        self.inner.backend.check_key(&key)?;
        let backend = self.inner.backend.name();
        let scope = Scope::new(
            backend,
            &self.inner.metric_names,
            options.get_metric_name(),
            &key,
        );
        let label = options.get_label().unwrap_or(default_label());
        let span = debug_span!(
            "fenced.acquire",
            key = %key,
            backend,
            label,
            outcome = field::Empty,
            token = field::Empty,
        );
        let acquiring = scope.acquiring();
        let result = self
            .acquire(key, options, scope)
            .instrument(span.clone())
            .await;
        acquiring.finish(&result);
        record_outcome(&span, &result);
        result
    }

    /// Runs `work` while holding `key`: acquires with `options`, runs the future, **cancels it if
    /// the lock is lost** (returning [`ErrorKind::Lost`]), and releases afterwards.
    ///
    /// `work` receives a [`LockInfo`] with the fencing token to pass to the resource. If the
    /// work finished but the release then fails, the work's output is still returned (the
    /// failure is logged; the lock expires with its lease).
    ///
    /// ```
    /// # async fn demo(client: fenced::Client) -> fenced::Result<()> {
    /// let refunded = client
    ///     .with_lock("order:42", &fenced::LockOptions::new(), |lock| async move {
    ///         // refund_once(order, lock.token).await
    ///         lock.token.get()
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// Dropping the future drops `work` and the guard, which releases in the background.
    pub async fn with_lock<F, Fut, T>(
        &self,
        key: impl AsRef<str>,
        options: &LockOptions,
        work: F,
    ) -> Result<T>
    where
        F: FnOnce(LockInfo) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.lock_with(key, options).await?;
        let lost = guard.lost();
        let work = work(guard.info());
        tokio::select! {
            biased;
            reason = lost => {
                let key = guard.key().as_str().to_owned();
                if let Err(e) = guard.release().await {
                    debug!(error = %e, "fenced: release after loss");
                }
                Err(Error::lost(Operation::Acquire, &key, reason))
            }
            out = work => {
                if let Err(e) = guard.release().await {
                    // The release itself logged the failure at warn.
                    debug!(error = %e, "fenced: work finished but the release failed");
                }
                Ok(out)
            }
        }
    }

    /// The current holder of `key`, if any.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn holder(&self, key: impl AsRef<str>) -> Result<Option<HolderInfo>> {
        let key = self.key(key.as_ref())?;
        self.inner
            .backend
            .holder(&key)
            .await
            .map_err(|e| self.failed(e.with_operation(Operation::Admin)))
    }

    /// Releases `key` if (and only if) `owner` holds it: for scripts that keep an owner id
    /// between commands. Fails with [`ErrorKind::NotOwner`] otherwise, touching nothing.
    ///
    /// # Cancel safety
    /// If dropped, the release may or may not have happened on the server; it never touched
    /// another owner's lock. Call it again to find out (`NotOwner` once released).
    pub async fn unlock(&self, key: impl AsRef<str>, owner: &OwnerId) -> Result<()> {
        let key = self.key(key.as_ref())?;
        match self.inner.backend.release(&LockRef::new(&key, owner)).await {
            Ok(Confirm::Done) => Ok(()),
            Ok(Confirm::NotHeld(holder)) => Err(Error::new(
                ErrorKind::NotOwner,
                Operation::Release,
                match holder {
                    Some(h) => format!("owner {owner} does not hold this lock, it is {h}; nothing was changed"),
                    None => format!("owner {owner} does not hold this lock (it is free or expired); nothing was changed"),
                },
            )
            .with_key(key.as_str())),
            Err(e) => Err(self.failed(
                e.with_operation(Operation::Release)
                    .with_key(key.as_str()),
            )),
        }
    }

    /// Administrative break of `key` whoever holds it; returns what was broken. The fencing
    /// counter is kept, so the broken holder's token can never be reissued.
    ///
    /// # Cancel safety
    /// If dropped, the break may or may not have happened on the server.
    pub async fn force_release(&self, key: impl AsRef<str>) -> Result<Option<HolderInfo>> {
        let key = self.key(key.as_ref())?;
        let broken =
            self.inner.backend.force_release(&key).await.map_err(|e| {
                self.failed(e.with_operation(Operation::Admin).with_key(key.as_str()))
            })?;
        if broken.is_some() {
            let names = &self.inner.metric_names;
            Scope::new(self.inner.backend.name(), names, None, &key).forced_release();
        }
        Ok(broken)
    }

    /// Every held lock whose key starts with `prefix` (`""` for all), sorted by key, with
    /// holder, token, remaining lease, age and waiters where the backend knows them. Works
    /// without holding anything.
    ///
    /// ```
    /// # async fn demo() -> fenced::Result<()> {
    /// let client = fenced::connect("memory://status-doc").await?;
    /// let guard = client.lock("order:42").await?;
    /// let held = client.list("order:").await?;
    /// assert_eq!(held[0].key.as_ref().map(|k| k.as_str()), Some("order:42"));
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn list(&self, prefix: &str) -> Result<Vec<HolderInfo>> {
        if prefix.len() > crate::key::MAX_KEY_LEN || prefix.chars().any(char::is_control) {
            return Err(Error::new(
                ErrorKind::InvalidKey,
                Operation::Validate,
                format!(
                    "the prefix must be at most {} bytes without control characters",
                    crate::key::MAX_KEY_LEN
                ),
            ));
        }
        self.inner
            .backend
            .list(prefix)
            .await
            .map_err(|e| self.failed(e.with_operation(Operation::Admin)))
    }

    /// Conditions that weaken the store's guarantees right now, as sentences for an operator,
    /// given `max_lease`, the longest lease this store's clients use (for example a Redlock
    /// node that restarted more recently than that: a lock it held may be granted twice).
    /// Empty when there is nothing to report; most backends never report anything.
    ///
    /// ```
    /// # async fn demo() -> fenced::Result<()> {
    /// use std::time::Duration;
    /// let client = fenced::connect("memory://warnings-doc").await?;
    /// for warning in client.warnings(Duration::from_secs(30)).await? {
    ///     eprintln!("warning: {warning}");
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn warnings(&self, max_lease: Duration) -> Result<Vec<String>> {
        self.inner
            .backend
            .warnings(max_lease)
            .await
            .map_err(|e| self.failed(e.with_operation(Operation::Admin)))
    }

    /// Counts a failed backend call in the metrics and hands the error back.
    fn failed(&self, e: Error) -> Error {
        backend_error(self.inner.backend.name(), e)
    }

    /// `key` validated by the crate-wide rules and by the backend, before any I/O.
    fn key(&self, key: &str) -> Result<Key> {
        let key = Key::new(key)?;
        self.inner.backend.check_key(&key)?;
        Ok(key)
    }

    async fn acquire(&self, key: Key, options: &LockOptions, scope: Scope) -> Result<LockGuard> {
        let backend = &self.inner.backend;
        let started = Instant::now();
        let deadline = match options.get_wait() {
            Wait::Forever => None,
            Wait::Timeout(d) => Some(started + d),
        };
        let try_once = options.get_wait() == Wait::Timeout(Duration::ZERO);
        let owner = OwnerId::random();
        let label = options
            .get_label()
            .map_or_else(|| default_label().to_owned(), str::to_owned);
        let capabilities = backend.capabilities();
        // A backend that cannot promise long leases (a session-bound one) gets shorter ones.
        let requested = capabilities
            .max_lease
            .map_or(options.get_lease(), |max| options.get_lease().min(max));
        let lease = options
            .get_max_hold()
            .map_or(requested, |m| m.min(requested));
        let request = AcquireRequest::new(&key, &owner, lease, &label).with_queue(!try_once);
        // On a queueing backend a waiter's place stays on the server between attempts.
        let queued = capabilities.queue && !try_once;

        // Counts this acquisition in the waiters gauge from the moment it has to wait until it
        // returns or is dropped.
        let mut waiting: Option<Waiting> = None;
        // Local FIFO queue: only the first local waiter for a key talks to the backend.
        let _gate = if try_once {
            None
        } else if let Some(gate) = self.inner.gates.try_enter(&key) {
            Some(gate)
        } else {
            waiting.get_or_insert_with(|| scope.waiting());
            match until(deadline, self.inner.gates.enter(&key)).await {
                Some(gate) => Some(gate),
                None => return Err(not_acquired(&key, None, started, false)),
            }
        };

        let mut in_flight = InFlight::new(backend.clone(), key.clone(), owner);
        let mut watch: Option<Box<dyn Watch>> = None;
        loop {
            let sent = Instant::now();
            in_flight.armed = true;
            let reply = self
                .attempt(&request, options, deadline, &mut in_flight)
                .await?;
            // A queued waiter's place is cleaned up if the wait ends without a grant.
            in_flight.armed = queued;
            let holder = match reply {
                Acquired::Granted(grant) => {
                    in_flight.armed = false;
                    debug!(token = grant.token.get(), "fenced: granted");
                    let held = Held::new(HeldParts {
                        backend: backend.clone(),
                        key: key.clone(),
                        owner,
                        token: grant.token,
                        label,
                        sent,
                        lease: grant.lease.min(lease),
                        capped: lease < requested,
                        max_hold: options.get_max_hold(),
                        renew: options.get_renew(),
                        renew_every: options.renew_every_setting(),
                        retry: options.get_retry(),
                        scope,
                    });
                    return Ok(LockGuard::start(held));
                }
                Acquired::Held(holder) => holder,
            };
            let now = Instant::now();
            if try_once || deadline.is_some_and(|d| now >= d) {
                in_flight.leave_queue().await;
                return Err(not_acquired(&key, Some(holder), started, try_once));
            }
            waiting.get_or_insert_with(|| scope.waiting());
            let Some(watch) = watch.as_mut() else {
                // Subscribe first, then retry at once: a release between the failed attempt and
                // the subscription is not missed.
                let w = match until(deadline, backend.watch(&key)).await {
                    Some(w) => w.map_err(|e| {
                        self.failed(e.with_operation(Operation::Wait).with_key(key.as_str()))
                    })?,
                    None => {
                        in_flight.leave_queue().await;
                        return Err(not_acquired(&key, Some(holder), started, false));
                    }
                };
                watch = Some(w);
                continue;
            };
            let remaining = holder.remaining.unwrap_or(BLIND_RECHECK);
            // Wake just after the holder's lease ends, spread a little so waiters do not collide.
            let mut wake = now + remaining + Duration::from_millis(1) + jitter(remaining / 50);
            if queued {
                // A queued waiter's watch also reports the expiry of the entry before it (the
                // server deletes it): only the deadline needs a timer.
                wake = deadline.unwrap_or(now + MAX_WAIT);
            }
            if let Some(d) = deadline {
                wake = wake.min(d);
            }
            tokio::select! {
                changed = watch.changed() => {
                    changed.map_err(|e| self.failed(e.with_operation(Operation::Wait).with_key(key.as_str())))?;
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// One acquisition attempt, retrying transient errors per the retry policy.
    async fn attempt(
        &self,
        request: &AcquireRequest<'_>,
        options: &LockOptions,
        deadline: Option<Instant>,
        in_flight: &mut InFlight,
    ) -> Result<Acquired> {
        let retry = options.get_retry();
        let mut attempt = 0;
        loop {
            let call = in_flight.call.insert(self.owned_acquire(request));
            let outcome = call.await;
            in_flight.call = None;
            match outcome {
                Ok(reply) => return Ok(reply),
                Err(e) => {
                    let e = self.failed(
                        e.with_operation(Operation::Acquire)
                            .with_key(request.key.as_str()),
                    );
                    if !e.is_transient() || attempt >= retry.get_max_retries() {
                        return Err(e);
                    }
                    let delay = retry.delay(attempt);
                    if deadline.is_some_and(|d| Instant::now() + delay >= d) {
                        return Err(e);
                    }
                    debug!(error = %e, attempt, "fenced: retrying acquire");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// One call of the backend's `acquire`, owning what it needs, so that a dropped acquisition
    /// can hand the call on to its clean-up ([`InFlight`]), which runs it to its end before it
    /// releases: a backend whose requests travel on separate streams or pooled connections
    /// could otherwise apply the grant *after* its clean-up, and leave it behind (until its
    /// lease ends; for ever on a session-bound backend whose session stays alive).
    fn owned_acquire(&self, request: &AcquireRequest<'_>) -> Call {
        let backend = self.inner.backend.clone();
        let (key, owner, label) = (
            request.key.clone(),
            *request.owner,
            request.label.to_owned(),
        );
        let (lease, mode, queue) = (request.lease, request.mode, request.queue);
        Box::pin(async move {
            let mut request = AcquireRequest::new(&key, &owner, lease, &label).with_queue(queue);
            request.mode = mode;
            backend.acquire(&request).await
        })
    }
}

/// A backend `acquire` call that owns its arguments.
type Call = Pin<Box<dyn Future<Output = Result<Acquired>> + Send>>;

/// Records the outcome (and the token of a grant) on the acquire span; failures other than "held
/// by someone else" are logged at warn with their cause.
fn record_outcome(span: &Span, result: &Result<LockGuard>) {
    match result {
        Ok(guard) => {
            span.record("outcome", "acquired");
            span.record("token", guard.token().get());
        }
        Err(e) if e.kind() == ErrorKind::NotAcquired => {
            span.record("outcome", "not_acquired");
        }
        Err(e) => {
            span.record("outcome", "error");
            warn!(parent: span, error = %e, "fenced: acquire failed");
        }
    }
}

/// Runs `fut` until `deadline` (if any); `None` when the deadline passed first.
async fn until<F: Future>(deadline: Option<Instant>, fut: F) -> Option<F::Output> {
    match deadline {
        None => Some(fut.await),
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
    }
}

fn not_acquired(key: &Key, holder: Option<HolderInfo>, started: Instant, try_once: bool) -> Error {
    let who = holder
        .as_ref()
        .map_or_else(|| "held by another owner".to_owned(), ToString::to_string);
    let message = if try_once {
        format!("{who}; try again later, or wait with lock_with(.., LockOptions::new().wait(..))")
    } else {
        format!(
            "{who}; gave up after waiting {:.1?}; wait longer, or find out why the holder keeps it",
            started.elapsed()
        )
    };
    Error::new(ErrorKind::NotAcquired, Operation::Acquire, message)
        .with_key(key.as_str())
        .with_holder(holder)
}

/// Sends a background release if an acquisition attempt may have been granted but its future was
/// dropped (or failed) before the grant was turned into a guard.
struct InFlight {
    backend: Arc<dyn Backend>,
    key: Key,
    owner: OwnerId,
    armed: bool,
    /// The backend call still running, if any: the clean-up waits for it.
    call: Option<Call>,
}

impl InFlight {
    fn new(backend: Arc<dyn Backend>, key: Key, owner: OwnerId) -> Self {
        InFlight {
            backend,
            key,
            owner,
            armed: false,
            call: None,
        }
    }
}

impl InFlight {
    /// Gives up a queued waiter's place on the server before reporting that the wait ended, so
    /// that nothing of it is left when the caller hears "not acquired". If this is cut short,
    /// `Drop` sends the release in the background.
    async fn leave_queue(&mut self) {
        if !self.armed {
            return;
        }
        let lock = LockRef::new(&self.key, &self.owner);
        match self.backend.release(&lock).await {
            Ok(_) => self.armed = false,
            Err(e) => {
                let e = backend_error(self.backend.name(), e.with_operation(Operation::Release));
                debug!(key = %self.key, error = %e, "fenced: leaving the wait queue failed; retrying in the background");
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backend = self.backend.clone();
        let key = self.key.clone();
        let owner = self.owner;
        let call = self.call.take();
        drop(runtime.spawn(async move {
            // The dropped attempt's request may still be on its way: finish it, then release.
            if let Some(call) = call {
                let _ = call.await;
            }
            if let Err(e) = backend.release(&LockRef::new(&key, &owner)).await {
                let e = backend_error(backend.name(), e.with_operation(Operation::Release));
                debug!(key = %key, error = %e, "fenced: release after cancelled acquire failed; the lease will expire");
            }
        }));
    }
}

/// Per-key FIFO gates of one client (clones share them).
#[derive(Default, Clone)]
struct Gates {
    map: Arc<Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>>,
}

struct Gate {
    map: Arc<Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>>,
    key: Key,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Gates {
    fn slot(&self, key: &Key) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= 1024 && map.len().is_power_of_two() {
            map.retain(|_, m| Arc::strong_count(m) > 1);
        }
        map.entry(key.clone()).or_default().clone()
    }

    fn gate(&self, key: &Key, guard: OwnedMutexGuard<()>) -> Gate {
        Gate {
            map: self.map.clone(),
            key: key.clone(),
            guard: Some(guard),
        }
    }

    /// The gate of `key` if no other local waiter is in it.
    fn try_enter(&self, key: &Key) -> Option<Gate> {
        let guard = self.slot(key).try_lock_owned().ok()?;
        Some(self.gate(key, guard))
    }

    async fn enter(&self, key: &Key) -> Gate {
        let guard = self.slot(key).lock_owned().await;
        self.gate(key, guard)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

/// `"<hostname> pid <pid>"`, computed once.
pub(crate) fn default_label() -> &'static str {
    static LABEL: OnceLock<String> = OnceLock::new();
    LABEL.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".to_owned());
        format!("{host} pid {}", std::process::id())
    })
}
