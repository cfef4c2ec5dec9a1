//! How waiters are woken: the *bell* of a key, a MySQL named lock.
//!
//! MySQL has no LISTEN/NOTIFY, but a connection blocked in `GET_LOCK(name, timeout)` returns the
//! moment the connection holding `name` releases it or ends. So every holder holds its key's bell
//! ([`bell_name`](super::bell_name)) on a connection of its backend while it holds the lock —
//! taken *before* the grant commits, so no other client can see the grant without the bell — and
//! gives it back after the row is freed (on release, on a lost extension, when the lease ended
//! without renewal, or because its connection ended: a crashed holder rings too).
//!
//! A waiter's [`Watch`] owns one connection of its own, run by a task. When the client asks
//! whether the key changed, the task looks at `IS_USED_LOCK(bell)`, the connection id holding
//! the bell:
//!
//! - another value than last time (the holder changed, or left): a change, reported at once;
//! - the same holder: the task blocks in `GET_LOCK(bell, 60)`; when it gets the bell it gives it
//!   back at once and reports a change (after 60 s without, it looks again: one statement a
//!   minute, not a poll loop);
//! - nobody holds the bell (a holder that could not take it, for example a paused process's
//!   stale bell, or an older client): it reports nothing and does not spin; the client's own
//!   timer wakes the waiter when the holder's lease ends.
//!
//! The first look is taken when the watch is created, before the client's next attempt, so a
//! release between the two is seen. The client has one remote waiter per key (its other tasks
//! queue locally), so one connection per waited key and client; nothing runs while it waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use mysql_async::Conn;
use mysql_async::prelude::Queryable;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Context;
use crate::backend::Watch;
use crate::error::{Error, ErrorKind, Operation, Result};

/// How long one blocking `GET_LOCK` of a waiter lasts before it looks again.
const BLOCK_SECS: u32 = 60;

/// What the watch last knew about the bell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Just rang: whatever holds the bell now came after the client's last look.
    Unknown,
    /// Held by this connection id, or free (`None`).
    Holder(Option<u64>),
}

/// A waiter's subscription to one key's bell.
pub(crate) struct BellWatch {
    rings: watch::Receiver<u64>,
    /// (rings consumed by the caller, request number): asks the task to look.
    want: watch::Sender<(u64, u64)>,
    consumed: u64,
    requests: u64,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for BellWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BellWatch")
            .field("rings", &*self.rings.borrow())
            .finish()
    }
}

impl Drop for BellWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BellWatch {
    /// Opens the waiting connection and takes the first look at `bell`.
    pub(crate) async fn start(
        context: Arc<Context>,
        bell: String,
        wakeups: Arc<AtomicU64>,
    ) -> Result<BellWatch> {
        let mut conn = context.open_plain(Operation::Wait).await?;
        let first = context
            .timed(
                Operation::Wait,
                conn.exec_first::<Option<u64>, _, _>("SELECT IS_USED_LOCK(?)", (bell.clone(),)),
            )
            .await?
            .flatten();
        let (rings_tx, rings) = watch::channel(0u64);
        let (want, want_rx) = watch::channel((0u64, 0u64));
        let task = tokio::spawn(run(
            context,
            Some(conn),
            bell,
            Seen::Holder(first),
            rings_tx,
            want_rx,
            wakeups,
        ));
        Ok(BellWatch {
            rings,
            want,
            consumed: 0,
            requests: 0,
            task,
        })
    }
}

#[async_trait]
impl Watch for BellWatch {
    async fn changed(&mut self) -> Result<()> {
        let rung = *self.rings.borrow_and_update();
        if rung > self.consumed {
            self.consumed = rung;
            return Ok(());
        }
        self.requests += 1;
        self.want.send_replace((self.consumed, self.requests));
        if self.rings.changed().await.is_err() {
            return Err(Error::new(
                ErrorKind::Backend,
                Operation::Wait,
                "the MySQL waiting task stopped",
            )
            .transient(true));
        }
        self.consumed = *self.rings.borrow_and_update();
        Ok(())
    }
}

/// The waiting task: looks at the bell when asked, blocks on it while someone holds it.
async fn run(
    context: Arc<Context>,
    mut conn: Option<Conn>,
    bell: String,
    mut seen: Seen,
    rings: watch::Sender<u64>,
    mut want: watch::Receiver<(u64, u64)>,
    wakeups: Arc<AtomicU64>,
) {
    let mut handled = 0u64;
    let ring = |seen: &mut Seen, now: Seen| {
        *seen = now;
        wakeups.fetch_add(1, Ordering::Relaxed);
        rings.send_modify(|r| *r += 1);
    };
    loop {
        // Wait until the caller has taken every ring and asks again.
        let asked = want
            .wait_for(|(consumed, request)| *consumed == *rings.borrow() && *request > handled)
            .await
            .map(|w| w.1);
        let Ok(request) = asked else { return };
        handled = request;
        if conn.is_none() {
            match context.open_plain(Operation::Wait).await {
                Ok(c) => {
                    conn = Some(c);
                    // Releases may have been missed while disconnected.
                    ring(&mut seen, Seen::Unknown);
                }
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    ring(&mut seen, Seen::Unknown);
                }
            }
            continue;
        }
        let Some(c) = conn.as_mut() else { continue };
        match look(&context, c, &bell, seen).await {
            Ok(Look::Rang(now)) => ring(&mut seen, now),
            Ok(Look::Quiet(now)) => seen = now,
            Err(_) => {
                conn = None;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                ring(&mut seen, Seen::Unknown);
            }
        }
    }
}

enum Look {
    /// A change: report it; what the watch knows now.
    Rang(Seen),
    /// Nobody holds the bell, as before: wait for the client's timer.
    Quiet(Seen),
}

async fn look(
    context: &Context,
    c: &mut Conn,
    bell: &str,
    mut seen: Seen,
) -> mysql_async::Result<Look> {
    loop {
        let now: Option<u64> = tokio::time::timeout(
            context.config.params.timeout,
            c.exec_first::<Option<u64>, _, _>("SELECT IS_USED_LOCK(?)", (bell,)),
        )
        .await
        .map_err(|_| io_timeout())??
        .flatten();
        match (seen, now) {
            (Seen::Unknown, None) => return Ok(Look::Rang(Seen::Holder(None))),
            (Seen::Holder(before), now) if before != now => {
                return Ok(Look::Rang(Seen::Holder(now)));
            }
            (_, None) => return Ok(Look::Quiet(Seen::Holder(None))),
            (_, Some(holder)) => {
                let got: Option<Option<i64>> = c
                    .exec_first(format!("SELECT GET_LOCK(?, {BLOCK_SECS})"), (bell,))
                    .await?;
                if got == Some(Some(1)) {
                    c.exec_drop("DO RELEASE_LOCK(?)", (bell,)).await?;
                    return Ok(Look::Rang(Seen::Unknown));
                }
                seen = Seen::Holder(Some(holder));
            }
        }
    }
}

fn io_timeout() -> mysql_async::Error {
    mysql_async::Error::Io(mysql_async::IoError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer from MySQL",
    )))
}
