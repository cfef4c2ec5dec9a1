//! [`LockGuard`]: a held lock, its fencing token, its lease, and its lost-lock signal.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::warn;

use crate::backend::Confirm;
use crate::error::{Error, Operation, Result};
use crate::key::Key;
use crate::lease::{Held, watchdog};
use crate::options::{MAX_LEASE, MIN_LEASE};
use crate::token::{FencingToken, OwnerId};

/// Why a lock can no longer be assumed held.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LostReason {
    /// Renewal did not succeed before the lease ran out (server unreachable, errors, or renewal
    /// off and the lease ended).
    Expired,
    /// The server says this owner no longer holds the lock and nobody else does: the key was
    /// deleted (administrative break, flush) or expired on the server.
    NotHeld,
    /// Another owner holds the lock now.
    TakenOver,
    /// The maximum hold time passed; the lock was released.
    MaxHoldExceeded,
    /// The server session the lock was bound to ended.
    SessionEnded,
    /// This holder released the lock (or dropped its guard).
    Released,
    /// The guard was detached with [`LockGuard::detach`]: the lock lives on without this guard.
    Detached,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Expired => "the lease ran out before it could be renewed",
            LostReason::NotHeld => "the lock was deleted or expired on the server",
            LostReason::TakenOver => "another owner holds the lock now",
            LostReason::MaxHoldExceeded => "the maximum hold time passed",
            LostReason::SessionEnded => "the session the lock was bound to ended",
            LostReason::Released => "the lock was released by this holder",
            LostReason::Detached => "the guard was detached from the lock",
        })
    }
}

/// A cloneable handle on a lock's lost-lock signal, to move into the tasks doing the work.
///
/// ```
/// # async fn demo(client: fenced::Client) -> fenced::Result<()> {
/// let guard = client.lock("order:42").await?;
/// let lost = guard.lost_signal();
/// let work = tokio::spawn(async move {
///     tokio::select! {
///         reason = lost.wait() => eprintln!("stopping: {reason}"),
///         _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => { /* work done */ }
///     }
/// });
/// let _ = work.await;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LostSignal {
    rx: watch::Receiver<Option<LostReason>>,
    risk: watch::Receiver<bool>,
}

impl LostSignal {
    /// Whether the lock can no longer be assumed held (including after release).
    pub fn is_lost(&self) -> bool {
        self.rx.borrow().is_some()
    }

    /// Why, once lost.
    pub fn reason(&self) -> Option<LostReason> {
        *self.rx.borrow()
    }

    /// Whether the lock is *at risk*: its backend lost the connection to the server session the
    /// lock is bound to, and cannot tell yet whether the session (and the lock) survives. It
    /// clears when the connection comes back within the session; if the session ends, the lost
    /// signal fires instead. Only session-bound backends (ZooKeeper) report it; on the others it
    /// is always `false`. Pause irreversible steps while it is set.
    pub fn is_at_risk(&self) -> bool {
        *self.risk.borrow()
    }

    /// Resolves when [`is_at_risk`](LostSignal::is_at_risk) changes, with the new value. Never
    /// resolves on backends that do not report it.
    ///
    /// ```
    /// # async fn demo(client: fenced::Client) -> fenced::Result<()> {
    /// let guard = client.lock("job:nightly").await?;
    /// let signal = guard.lost_signal();
    /// tokio::select! {
    ///     at_risk = signal.at_risk_changed() => eprintln!("at risk: {at_risk}"),
    ///     reason = signal.wait() => eprintln!("lost: {reason}"),
    ///     _ = async { /* the work */ } => {}
    /// }
    /// guard.release().await.ok();
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe; a change between two calls is seen by comparing with `is_at_risk` first.
    pub async fn at_risk_changed(&self) -> bool {
        let mut rx = self.risk.clone();
        let seen = *rx.borrow_and_update();
        loop {
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            let now = *rx.borrow_and_update();
            if now != seen {
                return now;
            }
        }
    }

    /// Resolves when the lock is lost or released.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it changes nothing; call again to keep waiting.
    pub async fn wait(&self) -> LostReason {
        let mut rx = self.rx.clone();
        loop {
            if let Some(reason) = *rx.borrow_and_update() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().unwrap_or(LostReason::Released);
            }
        }
    }
}

/// What the work inside [`Client::with_lock`](crate::Client::with_lock) gets to know about its lock.
#[derive(Debug, Clone)]
pub struct LockInfo {
    /// The key.
    pub key: Key,
    /// The fencing token of this grant: hand it to the resource.
    pub token: FencingToken,
    /// The owner id of this grant.
    pub owner: OwnerId,
    /// The lost-lock signal, to check before an irreversible step.
    pub lost: LostSignal,
}

/// A held lock. Release it with [`release`](LockGuard::release); dropping it releases in the
/// background, best effort.
///
/// While the guard lives, a watchdog task renews the lease every lease/3 (unless renewal is off)
/// and fires [`lost`](LockGuard::lost) when the lock can no longer be assumed held.
///
/// # Dropping without `release`
/// `Drop` stops renewal at once and spawns a release on the Tokio runtime that acquired the lock;
/// that task retries transient errors until the lease would have ended. If that runtime has shut
/// down, nothing is sent and the lock stays on the server until its lease runs out (at most one
/// lease, since renewal stopped with the runtime). No thread is blocked in `Drop`.
///
/// ```
/// # async fn demo() -> fenced::Result<()> {
/// let client = fenced::connect("memory://").await?;
/// let guard = client.lock("order:42").await?;
/// println!("token {} until {:?}", guard.token(), guard.deadline());
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[must_use = "if unused the lock is released again at once (in the background)"]
#[clippy::has_significant_drop]
pub struct LockGuard {
    held: Arc<Held>,
    watchdog: Option<JoinHandle<()>>,
    runtime: tokio::runtime::Handle,
    done: bool,
}

impl LockGuard {
    /// Starts the watchdog for a fresh grant. Must run inside a Tokio runtime.
    pub(crate) fn start(held: Arc<Held>) -> LockGuard {
        let runtime = tokio::runtime::Handle::current();
        let watchdog = Some(runtime.spawn(watchdog(held.clone())));
        LockGuard {
            held,
            watchdog,
            runtime,
            done: false,
        }
    }

    /// The locked key.
    pub fn key(&self) -> &Key {
        &self.held.key
    }

    /// The fencing token of this grant. Pass it to the resource and let it reject lower tokens.
    pub fn token(&self) -> FencingToken {
        self.held.token
    }

    /// The owner id of this grant (random, unguessable, unique to this grant).
    pub fn owner(&self) -> OwnerId {
        self.held.owner
    }

    /// The label stored with the lock.
    pub fn label(&self) -> &str {
        &self.held.label
    }

    /// When the lock was granted (the instant the granting request was sent).
    pub fn granted_at(&self) -> Instant {
        self.held.granted_at
    }

    /// Until when the lock is certainly held: the instant the last successful grant or extension
    /// was *sent*, plus its lease, minus a clock-drift allowance (lease/100 + 2 ms). Measured
    /// with the monotonic clock, so it is never later than the server's own expiry.
    pub fn deadline(&self) -> Instant {
        self.held.deadline()
    }

    /// Time left until [`deadline`](LockGuard::deadline) (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    /// Whether the lock is at risk: the connection to the server session it is bound to is lost
    /// and it is not known yet whether the session survives (see [`LostSignal::is_at_risk`]).
    /// Always `false` on backends without sessions.
    pub fn is_at_risk(&self) -> bool {
        self.held.is_at_risk()
    }

    /// Whether the lost signal has fired.
    pub fn is_lost(&self) -> bool {
        self.held.lost_reason().is_some()
    }

    /// Whether the lock can still be assumed held right now: the lost signal has not fired *and*
    /// the [`deadline`](LockGuard::deadline) has not passed. Unlike [`is_lost`](LockGuard::is_lost),
    /// it does not depend on the renewal task having run, so it is the check to make right
    /// before an action the lock protects. The check and the action are still two steps (a pause
    /// between them is possible), which is why the action should also carry the
    /// [fencing token](LockGuard::token).
    ///
    /// ```
    /// # async fn demo(client: fenced::Client) -> fenced::Result<()> {
    /// let guard = client.lock("order:42").await?;
    /// if guard.is_valid() {
    ///     // write, passing guard.token() to the resource
    /// }
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn is_valid(&self) -> bool {
        !self.is_lost() && Instant::now() < self.deadline()
    }

    /// A future that resolves when the lock can no longer be assumed held: renewal failed until
    /// the lease ran out, the key was deleted or taken by another owner, the session ended, or the
    /// maximum hold time passed. Independent of `self` (`'static`), so it can be moved into a
    /// `select!` next to the work.
    ///
    /// ```
    /// # async fn demo(client: fenced::Client) -> fenced::Result<()> {
    /// let guard = client.lock("job:nightly").await?;
    /// tokio::select! {
    ///     reason = guard.lost() => eprintln!("lock lost ({reason}); stopping"),
    ///     _ = async { /* the work */ } => {}
    /// }
    /// guard.release().await.ok();
    /// # Ok(()) }
    /// ```
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        let signal = self.lost_signal();
        async move { signal.wait().await }
    }

    /// A cloneable handle on the lost signal.
    pub fn lost_signal(&self) -> LostSignal {
        LostSignal {
            rx: self.held.lost_receiver(),
            risk: self.held.at_risk_receiver(),
        }
    }

    /// A cloneable summary (key, token, owner, lost signal) for the code doing the work.
    pub fn info(&self) -> LockInfo {
        LockInfo {
            key: self.held.key.clone(),
            token: self.held.token,
            owner: self.held.owner,
            lost: self.lost_signal(),
        }
    }

    /// Sets the lease to `lease` from now (capped by the maximum hold time), and uses `lease`
    /// for later automatic renewals. Fails with [`ErrorKind::Lost`](crate::ErrorKind::Lost) if
    /// the server says the lock is no longer held by this owner (and fires the lost signal).
    ///
    /// # Cancel safety
    /// Cancel safe: if dropped before the server answered, the local deadline is unchanged, which
    /// is never later than the server's.
    pub async fn extend(&self, lease: Duration) -> Result<()> {
        if !(MIN_LEASE..=MAX_LEASE).contains(&lease) {
            return Err(Error::invalid_config(format!(
                "lease {lease:?} is out of range; use between {MIN_LEASE:?} and {MAX_LEASE:?}"
            ))
            .with_key(self.held.key.as_str()));
        }
        self.held.extend(lease, Operation::Extend).await
    }

    /// Releases the lock on the server and wakes a waiter. Owner-checked: never deletes a lock
    /// another owner holds.
    ///
    /// Renewal stops first. Transient errors are retried with backoff while the lease may still
    /// be valid. Returns [`ErrorKind::Lost`](crate::ErrorKind::Lost) when the server says this
    /// owner no longer held the lock (it expired or was taken over: the critical section may
    /// have overlapped with another holder).
    ///
    /// # Cancel safety
    /// If the future is dropped before the server confirmed, the guard's state is not cleared:
    /// the drop path keeps retrying the release in the background (see the type docs). On an
    /// error, the same background release keeps trying until the lease ends.
    pub async fn release(mut self) -> Result<()> {
        if let Some(w) = self.watchdog.take() {
            w.abort();
        }
        match self.held.release().await {
            Ok(Confirm::Done) => {
                self.done = true;
                self.held.fire(LostReason::Released);
                Ok(())
            }
            Ok(Confirm::NotHeld(holder)) => {
                self.done = true;
                let reason = self.held.lost_reason().unwrap_or(if holder.is_some() {
                    LostReason::TakenOver
                } else {
                    LostReason::NotHeld
                });
                self.held.fire(reason);
                Err(Error::lost(
                    Operation::Release,
                    self.held.key.as_str(),
                    reason,
                ))
            }
            Err(e) => {
                warn!(
                    key = %self.held.key,
                    token = self.held.token.get(),
                    label = %self.held.label,
                    error = %e,
                    "fenced: release failed; retrying in the background until the lease ends"
                );
                Err(e)
            }
        }
    }
}

/// A lock left held on purpose by [`LockGuard::detach`]: nothing renews or releases it. It ends
/// when its lease runs out, or when [`Client::unlock`](crate::Client::unlock) is called with its
/// owner id.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DetachedLock {
    /// The key.
    pub key: Key,
    /// The owner id, needed to release it later.
    pub owner: OwnerId,
    /// The fencing token of the grant.
    pub token: FencingToken,
    /// Until when the lock is certainly held (see [`LockGuard::deadline`]).
    pub deadline: Instant,
}

impl LockGuard {
    /// Lets go of the guard without releasing the lock: renewal stops and nothing is sent to the
    /// server; the lock stays held until its lease ends or someone calls
    /// [`Client::unlock`](crate::Client::unlock) with the returned owner id. For shell scripts
    /// that take a lock in one command and release it in another.
    ///
    /// An associated function rather than a method, so that it is always deliberate.
    ///
    /// ```
    /// # async fn demo() -> fenced::Result<()> {
    /// use std::time::Duration;
    /// let client = fenced::connect("memory://detach-doc").await?;
    /// let guard = client.lock_with("deploy", &fenced::LockOptions::new().lease(Duration::from_secs(600))).await?;
    /// let detached = fenced::LockGuard::detach(guard);
    /// // ... later, possibly from another task:
    /// client.unlock("deploy", &detached.owner).await?;
    /// # Ok(()) }
    /// ```
    pub fn detach(mut guard: LockGuard) -> DetachedLock {
        if let Some(w) = guard.watchdog.take() {
            w.abort();
        }
        guard.done = true;
        guard.held.fire(LostReason::Detached);
        DetachedLock {
            key: guard.held.key.clone(),
            owner: guard.held.owner,
            token: guard.held.token,
            deadline: guard.held.deadline(),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(w) = self.watchdog.take() {
            w.abort();
        }
        if self.done {
            return;
        }
        self.held.fire(LostReason::Released);
        // Spawning on a runtime that has shut down drops the task without running it.
        drop(
            self.runtime
                .spawn(self.held.clone().release_in_background()),
        );
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.held.key)
            .field("token", &self.held.token)
            .field("owner", &self.held.owner)
            .field("label", &self.held.label)
            .field("deadline", &self.held.deadline())
            .field("lost", &self.held.lost_reason())
            .finish()
    }
}
