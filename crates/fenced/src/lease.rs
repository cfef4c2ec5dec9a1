//! The state of one held lock, shared by its guard and its renewal watchdog.
//!
//! Deadlines are conservative: a grant or extension sent at instant `t` with lease `L` is assumed
//! to end at `t + L - drift`, where `drift = L/100 + 2ms`. The server started its lease after `t`,
//! so the server's expiry is never earlier than the client's deadline (allowing for clock-rate
//! differences up to 1%).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, warn};

use crate::backend::{Backend, Binding, Confirm, LockRef, SessionState};
use crate::error::{Error, Operation, Result};
use crate::guard::LostReason;
use crate::key::Key;
use crate::observe::{Holding, Scope, backend_error};
use crate::options::RetryPolicy;
use crate::token::{FencingToken, OwnerId};

/// The clock-drift allowance subtracted from every lease.
pub(crate) fn drift(lease: Duration) -> Duration {
    lease / 100 + Duration::from_millis(2)
}

#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Until when the lock is certainly held.
    deadline: Instant,
    /// When the last extension was sent.
    renewed_at: Instant,
    /// The lease used by extensions (changed by `extend`).
    lease: Duration,
    /// Whether the last grant or extension was shortened to end at the maximum hold time.
    capped: bool,
}

/// One held lock.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) key: Key,
    pub(crate) owner: OwnerId,
    pub(crate) token: FencingToken,
    pub(crate) label: String,
    pub(crate) granted_at: Instant,
    pub(crate) hold_limit: Option<Instant>,
    renew: bool,
    renew_every: Option<Duration>,
    retry: RetryPolicy,
    timing: Mutex<Timing>,
    /// Serializes extensions so the last one to complete is the last one the server applied.
    extending: tokio::sync::Mutex<()>,
    /// Wakes the watchdog when the timing changed.
    poke: Notify,
    lost: watch::Sender<Option<LostReason>>,
    /// Whether the server session the lock is bound to is suspended (connection lost).
    at_risk: watch::Sender<bool>,
    /// The session state of a session-bound backend, followed by the watchdog.
    session: Option<watch::Receiver<SessionState>>,
    /// The longest lease the backend can promise.
    max_lease: Option<Duration>,
    /// Whether the lock lives in a server session rather than a lease.
    session_bound: bool,
    /// The metric labels of this lock.
    scope: Scope,
    /// Counts this lock in the holders gauge until the lost signal fires (or this is dropped).
    holding: Holding,
}

/// Everything needed to build a [`Held`].
#[derive(Debug)]
pub(crate) struct HeldParts {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) key: Key,
    pub(crate) owner: OwnerId,
    pub(crate) token: FencingToken,
    pub(crate) label: String,
    /// When the granting request was sent.
    pub(crate) sent: Instant,
    /// The lease the server applied.
    pub(crate) lease: Duration,
    /// Whether `lease` was shortened to end at the maximum hold time.
    pub(crate) capped: bool,
    pub(crate) max_hold: Option<Duration>,
    pub(crate) renew: bool,
    pub(crate) renew_every: Option<Duration>,
    pub(crate) retry: RetryPolicy,
    pub(crate) scope: Scope,
}

impl Held {
    pub(crate) fn new(p: HeldParts) -> Arc<Held> {
        let (lost, _) = watch::channel(None);
        let session = p.backend.session_state();
        let at_risk = session
            .as_ref()
            .is_some_and(|s| *s.borrow() == SessionState::Suspended);
        let capabilities = p.backend.capabilities();
        Arc::new(Held {
            backend: p.backend,
            key: p.key,
            owner: p.owner,
            token: p.token,
            label: p.label,
            granted_at: p.sent,
            hold_limit: p.max_hold.map(|m| p.sent + m),
            renew: p.renew,
            renew_every: p.renew_every,
            retry: p.retry,
            timing: Mutex::new(Timing {
                deadline: p.sent + p.lease.saturating_sub(drift(p.lease)),
                renewed_at: p.sent,
                lease: p.lease,
                capped: p.capped,
            }),
            extending: tokio::sync::Mutex::new(()),
            poke: Notify::new(),
            lost,
            at_risk: watch::channel(at_risk).0,
            session,
            max_lease: capabilities.max_lease,
            session_bound: capabilities.binding == Binding::Session,
            holding: p.scope.holding(p.sent),
            scope: p.scope,
        })
    }

    fn timing(&self) -> Timing {
        *self.timing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.timing().deadline
    }

    pub(crate) fn lost_receiver(&self) -> watch::Receiver<Option<LostReason>> {
        self.lost.subscribe()
    }

    pub(crate) fn at_risk_receiver(&self) -> watch::Receiver<bool> {
        self.at_risk.subscribe()
    }

    pub(crate) fn is_at_risk(&self) -> bool {
        *self.at_risk.borrow()
    }

    pub(crate) fn lost_reason(&self) -> Option<LostReason> {
        *self.lost.borrow()
    }

    /// Fires the lost signal once; later calls keep the first reason.
    pub(crate) fn fire(&self, reason: LostReason) {
        let fired = self.lost.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
        if !fired {
            return;
        }
        self.holding.end(reason);
        if !matches!(reason, LostReason::Released | LostReason::Detached) {
            warn!(key = %self.key, token = self.token.get(), label = %self.label, %reason, "fenced: lock lost");
        }
    }

    fn lock_ref(&self) -> LockRef<'_> {
        LockRef::new(&self.key, &self.owner)
    }

    /// The lease to request now: `lease`, capped so the server never keeps the lock past the
    /// maximum hold time. `None` when the maximum hold time has passed.
    fn capped(&self, lease: Duration, now: Instant) -> Option<Duration> {
        match self.hold_limit {
            Some(limit) if now >= limit => None,
            Some(limit) => Some(lease.min(limit - now)),
            None => Some(lease),
        }
    }

    /// Extends the lease to `lease` (capped by the maximum hold time) and makes it the lease of
    /// later automatic renewals. Updates the deadline only after the server confirmed.
    pub(crate) async fn extend(&self, lease: Duration, operation: Operation) -> Result<()> {
        let lease = self.max_lease.map_or(lease, |max| lease.min(max));
        let _serial = self.extending.lock().await;
        if let Some(reason) = self.lost_reason() {
            return Err(Error::lost(operation, self.key.as_str(), reason));
        }
        let sent = Instant::now();
        let Some(applied) = self.capped(lease, sent) else {
            self.fire(LostReason::MaxHoldExceeded);
            return Err(Error::lost(
                operation,
                self.key.as_str(),
                LostReason::MaxHoldExceeded,
            ));
        };
        let span = debug_span!("fenced.extend", key = %self.key, token = self.token.get(), lease_ms = applied.as_millis() as u64);
        let reply = self
            .backend
            .extend(&self.lock_ref(), applied)
            .instrument(span)
            .await
            .map_err(|e| {
                let e = e.with_operation(operation).with_key(self.key.as_str());
                backend_error(self.backend.name(), e)
            })?;
        match reply {
            Confirm::Done => {
                {
                    let mut t = self.timing.lock().unwrap_or_else(PoisonError::into_inner);
                    t.deadline = sent + applied.saturating_sub(drift(applied));
                    t.renewed_at = sent;
                    t.lease = lease;
                    t.capped = applied < lease;
                }
                self.poke.notify_one();
                debug!(key = %self.key, token = self.token.get(), "fenced: lease extended");
                Ok(())
            }
            Confirm::NotHeld(holder) => {
                let reason = if holder.is_some() {
                    LostReason::TakenOver
                } else {
                    LostReason::NotHeld
                };
                self.fire(reason);
                Err(Error::lost(operation, self.key.as_str(), reason))
            }
        }
    }

    /// Releases on the server, retrying transient errors with backoff while the lease may still
    /// be valid. Returns the server's answer or the last error.
    pub(crate) async fn release(&self) -> Result<Confirm> {
        let span = debug_span!("fenced.release", key = %self.key, token = self.token.get());
        async {
            let mut attempt = 0;
            loop {
                match self.backend.release(&self.lock_ref()).await {
                    Ok(reply) => return Ok(reply),
                    Err(e) => {
                        let e = backend_error(
                            self.backend.name(),
                            e.with_operation(Operation::Release)
                                .with_key(self.key.as_str()),
                        );
                        let give_up = !e.is_transient()
                            || attempt >= self.retry.get_max_retries()
                            || Instant::now() >= self.deadline();
                        if give_up {
                            return Err(e);
                        }
                        debug!(error = %e, attempt, "fenced: retrying release");
                        tokio::time::sleep(self.retry.delay(attempt)).await;
                        attempt += 1;
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// A session-bound lock does not end with its lease on the server: once the lease ran out
    /// without renewal, release it so that it ends as on lease-bound backends (one attempt; if
    /// the server is unreachable, the session ends it).
    async fn end_session_lock(&self) {
        if !self.session_bound {
            return;
        }
        if let Err(e) = self.backend.release(&self.lock_ref()).await {
            debug!(key = %self.key, error = %e, "fenced: release after the lease ran out failed; the session ends the lock");
        }
    }

    /// Keeps trying to release in the background until the server answers or the lease is over.
    pub(crate) async fn release_in_background(self: Arc<Self>) {
        let mut attempt = 0;
        loop {
            match self.release().await {
                Ok(_) => return,
                Err(e) if Instant::now() < self.deadline() => {
                    debug!(error = %e, "fenced: background release failed, retrying");
                    tokio::time::sleep(self.retry.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => {
                    warn!(key = %self.key, error = %e, "fenced: background release gave up; the lock expires with its lease");
                    return;
                }
            }
        }
    }
}

/// Renews the lease every `renew_every` (lease/3 by default) and fires the lost signal when the
/// lock can no longer be assumed held. Runs until the lock is lost; the guard aborts it on
/// release or drop.
pub(crate) async fn watchdog(held: Arc<Held>) {
    let mut failures: u32 = 0;
    let mut retry_at: Option<Instant> = None;
    let mut session = held.session.clone();
    loop {
        if let Some(state) = session.as_mut().map(|s| *s.borrow_and_update()) {
            match state {
                SessionState::Ended => {
                    held.fire(LostReason::SessionEnded);
                    return;
                }
                SessionState::Suspended => {
                    if !held.at_risk.send_replace(true) {
                        warn!(key = %held.key, token = held.token.get(), "fenced: the session is suspended; the lock is at risk");
                    }
                }
                SessionState::Connected => {
                    if held.at_risk.send_replace(false) {
                        debug!(key = %held.key, "fenced: the session is back; the lock is kept");
                        // Confirm at once that the lock survived the disconnection.
                        retry_at = Some(Instant::now());
                    }
                }
            }
        }
        let now = Instant::now();
        let t = held.timing();
        if held.hold_limit.is_some_and(|limit| now >= limit) {
            held.fire(LostReason::MaxHoldExceeded);
            if let Ok(Confirm::Done) = held.release().await {
                debug!(key = %held.key, "fenced: released at maximum hold time");
            }
            return;
        }
        if now >= t.deadline {
            held.fire(if t.capped {
                LostReason::MaxHoldExceeded
            } else {
                LostReason::Expired
            });
            held.end_session_lock().await;
            return;
        }
        let renew_at = if held.renew {
            let every = held.renew_every.unwrap_or(t.lease / 3);
            retry_at.unwrap_or(t.renewed_at + every)
        } else {
            t.deadline
        };
        let mut wake = t.deadline.min(renew_at);
        if let Some(limit) = held.hold_limit {
            wake = wake.min(limit);
        }
        if now < wake {
            let session_changed = async {
                // A closed channel means the backend is gone: nothing more will change.
                let open = match session.as_mut() {
                    Some(s) => s.changed().await.is_ok(),
                    None => false,
                };
                if !open {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = held.poke.notified() => { retry_at = None; }
                _ = session_changed => {}
            }
            continue;
        }
        if !held.renew {
            continue;
        }
        let lease = t.lease;
        match tokio::time::timeout_at(t.deadline, held.extend(lease, Operation::Extend)).await {
            Ok(Ok(())) => {
                held.scope.renewed();
                failures = 0;
                retry_at = None;
            }
            Ok(Err(e)) if e.lost_reason().is_some() => {
                held.scope.renewal_failed();
                return;
            }
            Ok(Err(e)) => {
                held.scope.renewal_failed();
                warn!(key = %held.key, error = %e, failures, "fenced: renewal failed, retrying before the lease ends");
                retry_at = Some(Instant::now() + held.retry.delay(failures));
                failures += 1;
            }
            Err(_elapsed) => {
                held.scope.renewal_failed();
                held.fire(LostReason::Expired);
                held.end_session_lock().await;
                return;
            }
        }
    }
}
