//! The backend's dedicated connection, owned by one background task (the actor): the named locks
//! of the holds of this backend live on it.
//!
//! - Lease mode: only the *bells* (see `wait.rs`): after a grant the holder's bell is taken here
//!   and given back on release, on a lost extension, or when the lease ended without renewal.
//! - Session mode: every acquire, extend and release runs here, on this one connection, so the
//!   row's `session_id` is `CONNECTION_ID()` and the session lock (`GET_LOCK`) is held by exactly
//!   the connection the row names. When the connection is lost, the [`SessionState`] becomes
//!   `Ended` and the holds are forgotten; the next request opens a new connection.
//!
//! Requests are sent over a channel and run to completion by the task even when the caller
//! stops waiting, so a cancelled caller never leaves a transaction half done or the local
//! record of holds out of step with the server.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, TxOpts};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Context, Row, bell_name, info_of, micros};
use crate::backend::{Acquired, Confirm, Grant, SessionState};
use crate::error::{Error, Operation, Result};
use crate::key::Key;
use crate::token::{FencingToken, OwnerId};

/// How long taking a bell may wait for a waiter that holds it for a moment.
const BELL_WAIT: &str = "0.25";

/// What one grant of this backend holds on the dedicated connection.
struct Hold {
    /// The named locks taken for it (the session lock and/or the bell).
    names: Vec<String>,
    /// When the lease ends by the local clock unless renewed; then the row is checked.
    until: Instant,
}

pub(crate) enum Request {
    /// Lease mode: take the bell of `key` for `owner` (or keep it until `until`); answers
    /// whether the bell is held.
    Bell {
        key: Key,
        owner: OwnerId,
        until: Instant,
        reply: oneshot::Sender<bool>,
    },
    /// Lease mode: give the bell back.
    Unbell { key: Key, owner: OwnerId },
    /// Lease mode: a renewal moved the lease's end (nothing happens without a bell).
    Touch {
        key: Key,
        owner: OwnerId,
        until: Instant,
    },
    /// Session mode: acquire.
    Acquire {
        key: Key,
        owner: OwnerId,
        lease: Duration,
        label: String,
        reply: oneshot::Sender<Result<Acquired>>,
    },
    /// Session mode: extend.
    Extend {
        key: Key,
        owner: OwnerId,
        lease: Duration,
        reply: oneshot::Sender<Result<Confirm>>,
    },
    /// Session mode: release.
    Release {
        key: Key,
        owner: OwnerId,
        reply: oneshot::Sender<Result<Confirm>>,
    },
}

/// The handle of the actor. Dropping it stops the task (the connection closes, and the server
/// frees its named locks).
pub(crate) struct Dedicated {
    tx: mpsc::UnboundedSender<Request>,
    /// The id (`CONNECTION_ID()`) of the current connection.
    id: Arc<AtomicU64>,
    state: watch::Receiver<SessionState>,
    task: JoinHandle<()>,
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Dedicated {
    /// Starts the actor with an already open connection (`session`: session mode).
    pub(crate) fn start(context: Arc<Context>, conn: Conn, conn_id: u64, session: bool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(SessionState::Connected);
        let id = Arc::new(AtomicU64::new(conn_id));
        let actor = Actor {
            context,
            conn: Some(conn),
            conn_id,
            id: id.clone(),
            holds: HashMap::new(),
            state: state_tx,
            session,
        };
        let task = tokio::spawn(actor.run(rx));
        Dedicated {
            tx,
            id,
            state,
            task,
        }
    }

    /// The id of the current (or last) dedicated connection.
    pub(crate) fn connection_id(&self) -> u64 {
        self.id.load(Ordering::Relaxed)
    }

    pub(crate) fn state(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    /// Sends a request; the task runs it to completion whether or not the answer is awaited.
    pub(crate) fn send(&self, request: Request) {
        let _ = self.tx.send(request);
    }

    /// Sends a request and awaits its answer.
    pub(crate) async fn ask<T>(
        &self,
        operation: Operation,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> Request,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.send(make(reply));
        answer.await.unwrap_or_else(|_| Err(stopped(operation)))
    }
}

fn stopped(operation: Operation) -> Error {
    Error::new(
        crate::error::ErrorKind::Backend,
        operation,
        "the MySQL backend's connection task stopped; create a new client",
    )
}

struct Actor {
    context: Arc<Context>,
    conn: Option<Conn>,
    conn_id: u64,
    id: Arc<AtomicU64>,
    holds: HashMap<(Key, OwnerId), Hold>,
    state: watch::Sender<SessionState>,
    session: bool,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        let ping_every = self.context.config.params.session_timeout / 3;
        let mut next_ping = Instant::now() + ping_every;
        loop {
            let next_check = self.holds.values().map(|h| h.until).min();
            let wake = match next_check {
                Some(at) if self.session => at.min(next_ping),
                Some(at) => at,
                None if self.session && self.conn.is_some() => next_ping,
                None => Instant::now() + Duration::from_secs(3600),
            };
            tokio::select! {
                request = rx.recv() => match request {
                    Some(request) => self.handle(request).await,
                    None => return,
                },
                () = tokio::time::sleep_until(wake) => {
                    if next_check.is_some_and(|at| at <= Instant::now()) {
                        self.check_expired().await;
                    }
                    if self.session && Instant::now() >= next_ping {
                        next_ping = Instant::now() + ping_every;
                        self.ping().await;
                    }
                }
            }
        }
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Bell {
                key,
                owner,
                until,
                reply,
            } => {
                let held = self.bell(key, owner, until).await;
                let _ = reply.send(held);
            }
            Request::Unbell { key, owner } => self.drop_hold(&key, &owner).await,
            Request::Touch { key, owner, until } => {
                if let Some(hold) = self.holds.get_mut(&(key, owner)) {
                    hold.until = hold.until.max(until);
                }
            }
            Request::Acquire {
                key,
                owner,
                lease,
                label,
                reply,
            } => {
                let result = self.acquire(key, owner, lease, &label).await;
                let _ = reply.send(result);
            }
            Request::Extend {
                key,
                owner,
                lease,
                reply,
            } => {
                let result = self.extend(key, owner, lease).await;
                let _ = reply.send(result);
            }
            Request::Release { key, owner, reply } => {
                let result = self.release(key, owner).await;
                let _ = reply.send(result);
            }
        }
    }

    /// The connection, opening a new one (a new session) if the last one was lost.
    async fn conn(&mut self, operation: Operation) -> Result<&mut Conn> {
        if self.conn.is_none() {
            let (conn, id) = self.context.open_dedicated(operation, self.session).await?;
            debug!(connection = id, "fenced: MySQL dedicated connection opened");
            self.conn = Some(conn);
            self.conn_id = id;
            self.id.store(id, Ordering::Relaxed);
            self.state.send_replace(SessionState::Connected);
        }
        self.conn.as_mut().ok_or_else(|| stopped(operation))
    }

    /// Runs `f` on the connection within the timeout. A timeout or a broken connection ends
    /// the session: the connection is dropped (the server then frees its named locks and rolls
    /// back an open transaction) and every hold is forgotten.
    async fn on_conn<T>(
        &mut self,
        operation: Operation,
        f: impl for<'c> FnOnce(
            &'c mut Conn,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = mysql_async::Result<T>> + Send + 'c>,
        >,
    ) -> Result<T> {
        let timeout = self.context.config.params.timeout;
        let conn = self.conn(operation).await?;
        match tokio::time::timeout(timeout, f(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                let fatal = e.is_fatal() || matches!(e, mysql_async::Error::Io(_));
                let error = self.context.error(operation, &e);
                if fatal {
                    self.lose_conn();
                }
                Err(error)
            }
            Err(_) => {
                self.lose_conn();
                Err(self.context.timed_out(operation))
            }
        }
    }

    fn lose_conn(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(conn);
            if self.session {
                warn!(
                    connection = self.conn_id,
                    "fenced: the MySQL session connection was lost; its locks are gone"
                );
                self.state.send_replace(SessionState::Ended);
            }
        }
        self.holds.clear();
    }

    async fn ping(&mut self) {
        if self.conn.is_some() {
            let _ = self
                .on_conn(Operation::Extend, |c| Box::pin(c.query_drop("DO 1")))
                .await;
        }
    }

    /// Lease mode: takes `key`'s bell for `owner`, or moves its check time.
    async fn bell(&mut self, key: Key, owner: OwnerId, until: Instant) -> bool {
        if let Some(hold) = self.holds.get_mut(&(key.clone(), owner)) {
            hold.until = hold.until.max(until);
            return !hold.names.is_empty();
        }
        let bell = bell_name(&self.context.config, &key);
        let got = self
            .on_conn(Operation::Acquire, {
                let bell = bell.clone();
                move |c| {
                    Box::pin(c.exec_first::<Option<i64>, _, _>(
                        format!("SELECT GET_LOCK(?, {BELL_WAIT})"),
                        (bell,),
                    ))
                }
            })
            .await;
        let held = matches!(got, Ok(Some(Some(1))));
        if held {
            self.holds.insert(
                (key, owner),
                Hold {
                    names: vec![bell],
                    until,
                },
            );
        }
        held
    }

    /// Forgets a hold and gives its named locks back.
    async fn drop_hold(&mut self, key: &Key, owner: &OwnerId) {
        let Some(hold) = self.holds.remove(&(key.clone(), *owner)) else {
            return;
        };
        self.release_names(hold.names).await;
    }

    async fn release_names(&mut self, names: Vec<String>) {
        if self.conn.is_none() || names.is_empty() {
            return;
        }
        let _ = self
            .on_conn(Operation::Release, move |c| {
                Box::pin(async move {
                    for name in names {
                        c.exec_drop("DO RELEASE_LOCK(?)", (name,)).await?;
                    }
                    Ok(())
                })
            })
            .await;
    }

    /// Holds whose local lease ended: kept if the row still says they hold the key (the local
    /// clock ran ahead of the server's), given back otherwise.
    async fn check_expired(&mut self) {
        let now = Instant::now();
        let due: Vec<(Key, OwnerId)> = self
            .holds
            .iter()
            .filter(|(_, h)| h.until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let table = self.context.config.params.table.clone();
        let session = self.session;
        for (key, owner) in due {
            let sql = format!(
                "SELECT TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at) FROM `{table}` \
                 WHERE lock_key = ? AND owner = ? AND expires_at > UTC_TIMESTAMP(6){}",
                if session {
                    " AND session_id = CONNECTION_ID()"
                } else {
                    " AND session_id IS NULL"
                }
            );
            let args = (key.as_str().as_bytes().to_vec(), owner.to_string());
            let left = self
                .on_conn(Operation::Extend, move |c| {
                    Box::pin(c.exec_first::<Option<i64>, _, _>(sql, args))
                })
                .await;
            match left {
                Ok(Some(Some(us))) if us > 0 => {
                    if let Some(hold) = self.holds.get_mut(&(key.clone(), owner)) {
                        hold.until = Instant::now() + Duration::from_micros(us.unsigned_abs());
                    }
                }
                Ok(_) => self.drop_hold(&key, &owner).await,
                // Try again a little later (a lost connection cleared every hold already).
                Err(_) => {
                    if let Some(hold) = self.holds.get_mut(&(key.clone(), owner)) {
                        hold.until = Instant::now() + Duration::from_secs(1);
                    }
                }
            }
        }
    }

    /// Session mode: the session lock of `key` (this connection's, whatever its owner), then
    /// the row, in one transaction.
    async fn acquire(
        &mut self,
        key: Key,
        owner: OwnerId,
        lease: Duration,
        label: &str,
    ) -> Result<Acquired> {
        let config = self.context.config.clone();
        let name = crate::backends::sql::lock_name(&config.database, &config.params.table, &key);
        let bell = bell_name(&config, &key);
        let sent = Instant::now();
        let ours = self.holds.contains_key(&(key.clone(), owner));
        if !ours {
            // GET_LOCK is re-entrant per connection: another owner of this backend holding the
            // same name (the same key, or one whose name collides) must not be granted too.
            let local = self.holds.values().any(|h| h.names.contains(&name));
            let got = if local {
                false
            } else {
                let (n, b) = (name.clone(), bell.clone());
                let got = self
                    .on_conn(Operation::Acquire, move |c| {
                        Box::pin(async move {
                            let got: Option<Option<i64>> =
                                c.exec_first("SELECT GET_LOCK(?, 0)", (n,)).await?;
                            if got != Some(Some(1)) {
                                return Ok(None);
                            }
                            let rang: Option<Option<i64>> = c
                                .exec_first(format!("SELECT GET_LOCK(?, {BELL_WAIT})"), (b,))
                                .await?;
                            Ok(Some(rang == Some(Some(1))))
                        })
                    })
                    .await?;
                match got {
                    Some(rang) => {
                        let mut names = vec![name.clone()];
                        if rang {
                            names.push(bell.clone());
                        }
                        self.holds.insert(
                            (key.clone(), owner),
                            Hold {
                                names,
                                until: sent + lease,
                            },
                        );
                        true
                    }
                    None => false,
                }
            };
            if !got {
                let info = self.read_holder(&key).await?;
                return Ok(Acquired::Held(info.unwrap_or_default()));
            }
        }
        let table = config.params.table.clone();
        let conn_id = self.conn_id;
        let (k, o, l) = (
            key.as_str().as_bytes().to_vec(),
            owner.to_string(),
            label.to_owned(),
        );
        let us = micros(lease);
        let outcome = self
            .on_conn(Operation::Acquire, move |c| {
                Box::pin(async move {
                    let mut tx = c.start_transaction(TxOpts::default()).await?;
                    tx.exec_drop(
                        format!(
                            "INSERT INTO `{table}` (lock_key) VALUES (?) ON DUPLICATE KEY UPDATE token = token"
                        ),
                        (k.clone(),),
                    )
                    .await?;
                    let row: Option<Row> = tx
                        .exec_first(super::select_for_update(&table), (k.clone(),))
                        .await?;
                    let row = row.unwrap_or_default();
                    let mine = row.live()
                        && row.owner.as_deref() == Some(o.as_str())
                        && row.session_id == Some(conn_id);
                    let outcome = if mine && ours {
                        tx.exec_drop(
                            format!(
                                "UPDATE `{table}` SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
                                 WHERE lock_key = ?"
                            ),
                            (us, k),
                        )
                        .await?;
                        Ok(row.token)
                    } else if !row.live() || row.session_id.is_some() {
                        // Free, expired, or the row of a session that no longer holds the session
                        // lock this connection holds now: stale.
                        tx.exec_drop(
                            format!(
                                "UPDATE `{table}` SET owner = ?, token = token + 1, label = ?, \
                                 session_id = CONNECTION_ID(), \
                                 expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, \
                                 granted_at = UTC_TIMESTAMP(6) WHERE lock_key = ?"
                            ),
                            (o, l, us, k),
                        )
                        .await?;
                        Ok(row.token + 1)
                    } else {
                        Err(row)
                    };
                    match outcome {
                        Ok(token) => {
                            tx.commit().await?;
                            Ok(Ok(token))
                        }
                        Err(row) => {
                            tx.rollback().await?;
                            Ok(Err(row))
                        }
                    }
                })
            })
            .await;
        match outcome {
            Ok(Ok(token)) => {
                if let Some(hold) = self.holds.get_mut(&(key, owner)) {
                    hold.until = sent + lease;
                }
                Ok(Acquired::Granted(Grant::new(
                    FencingToken::new(token.max(1).unsigned_abs()),
                    lease,
                )))
            }
            Ok(Err(row)) => {
                // Held by a lease-mode client: this connection keeps nothing for the key.
                self.drop_hold(&key, &owner).await;
                Ok(Acquired::Held(info_of(&row)))
            }
            Err(e) => {
                if !ours {
                    self.drop_hold(&key, &owner).await;
                }
                Err(e)
            }
        }
    }

    /// The holder of `key` read on this connection (so that a session row of this very
    /// connection counts as live).
    async fn read_holder(&mut self, key: &Key) -> Result<Option<crate::backend::HolderInfo>> {
        let sql = super::select_holder(&self.context.config.params.table);
        let k = key.as_str().as_bytes().to_vec();
        let row: Option<Row> = self
            .on_conn(Operation::Acquire, move |c| {
                Box::pin(c.exec_first(sql, (k,)))
            })
            .await?;
        Ok(row.filter(Row::live).map(|r| info_of(&r)))
    }

    async fn extend(&mut self, key: Key, owner: OwnerId, lease: Duration) -> Result<Confirm> {
        if !self.holds.contains_key(&(key.clone(), owner)) {
            return Ok(Confirm::NotHeld(None));
        }
        let sent = Instant::now();
        let sql = format!(
            "UPDATE `{}` SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND WHERE lock_key = ? \
             AND owner = ? AND session_id = CONNECTION_ID() AND expires_at > UTC_TIMESTAMP(6)",
            self.context.config.params.table
        );
        let args = (
            micros(lease),
            key.as_str().as_bytes().to_vec(),
            owner.to_string(),
        );
        let matched = self
            .on_conn(Operation::Extend, move |c| {
                Box::pin(async move {
                    c.exec_drop(sql, args).await?;
                    Ok(c.affected_rows())
                })
            })
            .await?;
        if matched == 1 {
            if let Some(hold) = self.holds.get_mut(&(key, owner)) {
                hold.until = sent + lease;
            }
            Ok(Confirm::Done)
        } else {
            self.drop_hold(&key, &owner).await;
            Ok(Confirm::NotHeld(None))
        }
    }

    async fn release(&mut self, key: Key, owner: OwnerId) -> Result<Confirm> {
        if !self.holds.contains_key(&(key.clone(), owner)) {
            return Ok(Confirm::NotHeld(None));
        }
        let sql = format!(
            "UPDATE `{}` SET owner = NULL, label = NULL, session_id = NULL, granted_at = NULL \
             WHERE lock_key = ? AND owner = ? AND session_id = CONNECTION_ID() AND expires_at > UTC_TIMESTAMP(6)",
            self.context.config.params.table
        );
        let args = (key.as_str().as_bytes().to_vec(), owner.to_string());
        let matched = self
            .on_conn(Operation::Release, move |c| {
                Box::pin(async move {
                    c.exec_drop(sql, args).await?;
                    Ok(c.affected_rows())
                })
            })
            .await?;
        // The row is free (or was not ours): give the session lock and the bell back.
        self.drop_hold(&key, &owner).await;
        Ok(if matched == 1 {
            Confirm::Done
        } else {
            Confirm::NotHeld(None)
        })
    }
}
