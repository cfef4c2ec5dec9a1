//! The client's session: one etcd lease, kept alive by a background task, that every lock key
//! of the backend is written with.
//!
//! The task sends a keep-alive every third of the TTL (and at once when an extension asks for a
//! fresh one) and records, from each answer, until when the lease is certainly alive: the instant
//! the keep-alive was *sent* plus the TTL the server answered with. It publishes the
//! [`SessionState`]: `Connected` while keep-alives are answered, `Suspended` when one failed
//! but the lease may still be alive, `Ended` once the lease is gone (its TTL ran out without an
//! answered keep-alive, or it was revoked). After `Ended` it grants a new lease, so the backend
//! keeps working; locks of the old session are gone with it.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{LeaseClient, LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::backend::SessionState;

/// The lease of the current session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    /// The etcd lease id.
    pub(crate) id: i64,
    /// Until when the lease is certainly alive (the last answered keep-alive's send instant plus
    /// its TTL).
    pub(crate) valid_until: Instant,
}

struct Shared {
    ttl: Duration,
    timeout: Duration,
    lease: Mutex<Lease>,
    state: watch::Sender<SessionState>,
    /// Asks the task for a keep-alive now.
    refresh: Notify,
    /// Bumped after every keep-alive attempt (answered or not).
    attempts: watch::Sender<u64>,
}

/// The session of one backend. Dropping it stops the keep-alives (the lease then ends with its
/// TTL on the server).
pub(crate) struct Session {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lease = self.lease();
        f.debug_struct("Session")
            .field("lease", &format_args!("{:x}", lease.id))
            .field("ttl", &self.shared.ttl)
            .field("state", &*self.shared.state.borrow())
            .finish()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Session {
    /// Starts keeping `first` alive (a lease just granted with `ttl`, `granted_at` being when the
    /// grant was sent).
    pub(crate) fn start(
        lease_client: LeaseClient,
        first: i64,
        granted_at: Instant,
        ttl: Duration,
        timeout: Duration,
    ) -> Session {
        let shared = Arc::new(Shared {
            ttl,
            timeout,
            lease: Mutex::new(Lease {
                id: first,
                valid_until: granted_at + ttl,
            }),
            state: watch::channel(SessionState::Connected).0,
            refresh: Notify::new(),
            attempts: watch::channel(0).0,
        });
        let task = tokio::spawn(run(lease_client, shared.clone()));
        Session { shared, task }
    }

    /// The current lease.
    pub(crate) fn lease(&self) -> Lease {
        *self
            .shared
            .lease
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The TTL of the session's lease.
    pub(crate) fn ttl(&self) -> Duration {
        self.shared.ttl
    }

    /// The session state, for the guards.
    pub(crate) fn state(&self) -> watch::Receiver<SessionState> {
        self.shared.state.subscribe()
    }

    /// The current lease if the session is connected and the lease certainly lives until `until`;
    /// otherwise asks for a keep-alive at once and waits for it (at most a few, each within the
    /// request timeout). `None` when the lease cannot be confirmed that long.
    pub(crate) async fn alive_until(&self, until: Instant) -> Option<Lease> {
        for _ in 0..3 {
            let mut attempts = self.shared.attempts.subscribe();
            attempts.mark_unchanged();
            let lease = self.lease();
            if lease.valid_until >= until && *self.shared.state.borrow() == SessionState::Connected
            {
                return Some(lease);
            }
            self.shared.refresh.notify_one();
            if tokio::time::timeout(self.shared.timeout * 2, attempts.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
        None
    }

    /// Tells the task that the server no longer knows the lease (a write with it failed), so
    /// that it checks at once.
    pub(crate) fn suspect(&self) {
        self.shared.refresh.notify_one();
    }
}

/// The keep-alive loop.
async fn run(mut client: LeaseClient, shared: Arc<Shared>) {
    let every = shared.ttl / 3;
    let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
    let mut last_sent = Instant::now();
    let mut failures: u32 = 0;
    loop {
        let next = if failures > 0 {
            // Retry soon, but well within the TTL.
            last_sent + (shared.ttl / 20).min(Duration::from_millis(200)) * failures.min(4)
        } else {
            last_sent + every
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shared.refresh.notified() => {}
        }
        let id = shared
            .lease
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .id;
        let sent = Instant::now();
        last_sent = sent;
        let answer = tokio::time::timeout(
            shared.timeout,
            keep_alive(&mut client, &mut stream, id, shared.ttl.as_secs()),
        )
        .await;
        match answer {
            Ok(Ok(Some(ttl))) => {
                failures = 0;
                let mut lease = shared.lease.lock().unwrap_or_else(PoisonError::into_inner);
                lease.valid_until = sent + Duration::from_secs(ttl);
                drop(lease);
                shared.state.send_if_modified(|s| {
                    let changed = *s != SessionState::Connected;
                    *s = SessionState::Connected;
                    changed
                });
            }
            Ok(Ok(None)) => {
                // The server no longer knows the lease: the session (and its locks) ended.
                warn!(
                    lease = format_args!("{id:x}"),
                    "fenced: the etcd session lease ended (expired or revoked); starting a new session"
                );
                stream = None;
                shared.state.send_replace(SessionState::Ended);
                failures = renew(&mut client, &shared).await;
            }
            Ok(Err(e)) => {
                debug!(error = %e, "fenced: etcd keep-alive failed");
                stream = None;
                failures += 1;
                lapse(&shared, &mut client, &mut failures).await;
            }
            Err(_) => {
                debug!("fenced: etcd keep-alive timed out");
                stream = None;
                failures += 1;
                lapse(&shared, &mut client, &mut failures).await;
            }
        }
        shared.attempts.send_modify(|n| *n += 1);
    }
}

/// After a failed keep-alive: suspended while the lease may live, ended (then renewed) after.
async fn lapse(shared: &Shared, client: &mut LeaseClient, failures: &mut u32) {
    let valid_until = shared
        .lease
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .valid_until;
    if Instant::now() < valid_until {
        if shared.state.send_replace(SessionState::Suspended) != SessionState::Suspended {
            warn!(
                "fenced: etcd keep-alive failed; the session's locks are at risk until it answers again"
            );
        }
    } else {
        if shared.state.send_replace(SessionState::Ended) != SessionState::Ended {
            warn!(
                "fenced: no etcd keep-alive was answered within the session TTL; the session and its locks ended"
            );
        }
        *failures = renew(client, shared).await.max(1);
    }
}

/// Grants a new lease for a new session; returns the failure count for the loop (0 on success).
async fn renew(client: &mut LeaseClient, shared: &Shared) -> u32 {
    let sent = Instant::now();
    let ttl = shared.ttl.as_secs() as i64;
    match tokio::time::timeout(shared.timeout, client.grant(ttl, None)).await {
        Ok(Ok(granted)) => {
            *shared.lease.lock().unwrap_or_else(PoisonError::into_inner) = Lease {
                id: granted.id(),
                valid_until: sent + Duration::from_secs(granted.ttl().max(0) as u64),
            };
            shared.state.send_replace(SessionState::Connected);
            debug!(
                lease = format_args!("{:x}", granted.id()),
                "fenced: new etcd session"
            );
            0
        }
        Ok(Err(e)) => {
            debug!(error = %e, "fenced: granting a new etcd session lease failed");
            1
        }
        Err(_) => 1,
    }
}

/// One keep-alive on the stream (opened if needed): `Some(ttl)` when the lease lives, `None`
/// when the server does not know it.
async fn keep_alive(
    client: &mut LeaseClient,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    id: i64,
    ttl: u64,
) -> Result<Option<u64>, etcd_client::Error> {
    if stream.is_none() {
        // Opening the stream sends the first keep-alive and reads its answer.
        return match client.keep_alive(id).await {
            Ok(opened) => {
                // The client library read the first answer and checked that the lease lives; its
                // TTL is at least the one granted (the server may only raise it).
                *stream = Some(opened);
                Ok(Some(ttl))
            }
            Err(etcd_client::Error::LeaseKeepAliveError(message))
                if message.contains("not found") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        };
    }
    let (keeper, responses) = stream.as_mut().expect("stream is open");
    keeper.keep_alive().await?;
    next_ttl(responses).await
}

async fn next_ttl(responses: &mut LeaseKeepAliveStream) -> Result<Option<u64>, etcd_client::Error> {
    match responses.message().await? {
        Some(answer) if answer.ttl() > 0 => Ok(Some(answer.ttl() as u64)),
        Some(_) => Ok(None),
        None => Err(etcd_client::Error::LeaseKeepAliveError(
            "the keep-alive stream closed".to_owned(),
        )),
    }
}
