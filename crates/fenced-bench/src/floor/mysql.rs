//! The MySQL/MariaDB floor: the statements fenced sends, on bare mysql_async connections.
//!
//! Every statement runs on a connection of the calling task's own, taken from the process's idle
//! connections (a new one when none is idle) and put back after.
//!
//! Lease mode (the default): acquire = one upsert (`INSERT … ON DUPLICATE KEY UPDATE`) that takes
//! the key's row when it has no owner or its expiry (the database's clock) has passed, counting
//! the row's fencing token up and returning it in the reply (`LAST_INSERT_ID(token + 1)`);
//! release = one owner-checked `UPDATE`. MySQL has no notifications: in handoff mode one connection per
//! process looks at the key's row every 2 ms (the SQLite floor's interval) and wakes one local
//! waiter when it is free, and a release in this process wakes one local waiter at once.
//!
//! Session mode (`?mode=session`): `GET_LOCK(name, 0)` + `RELEASE_LOCK(name)`; the connection
//! stays with the held lock until its release (named locks are re-entrant within a connection, so
//! holders must not share one). In handoff mode the acquire is the blocking `GET_LOCK(name, 60)`,
//! so waiters queue in the server. No row, no token.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Owners, fnv1a};
use crate::locker::{Locker, WAIT};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS floor_locks (\
    lock_key VARBINARY(512) NOT NULL PRIMARY KEY, owner VARCHAR(64) NULL, \
    token BIGINT NOT NULL, expires_at DATETIME(6) NOT NULL) ENGINE=InnoDB";

/// Takes the row when it is free or expired (the assignments run left to right: the token and
/// the owner look at the old row, the expiry at the new owner). Changes the row only when it
/// grants, so the affected-row count says whether it did; the token comes back as the reply's
/// last insert id.
const TAKE: &str = "INSERT INTO floor_locks (lock_key, owner, token, expires_at) \
    VALUES (?, ?, LAST_INSERT_ID(1), UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND) \
    ON DUPLICATE KEY UPDATE \
    token = IF(owner IS NULL OR expires_at <= UTC_TIMESTAMP(6), LAST_INSERT_ID(token + 1), token), \
    owner = IF(owner IS NULL OR expires_at <= UTC_TIMESTAMP(6), VALUES(owner), owner), \
    expires_at = IF(owner = VALUES(owner), VALUES(expires_at), expires_at)";
/// Clears the row's owner if it is still ours.
const GIVE_BACK: &str = "UPDATE floor_locks SET owner = NULL WHERE lock_key = ? AND owner = ?";
/// Whether the row is free (handoff mode's poller).
const IS_FREE: &str = "SELECT owner IS NULL OR expires_at <= UTC_TIMESTAMP(6) FROM floor_locks \
    WHERE lock_key = ?";
/// The poll interval of handoff mode in lease mode.
const POLL: Duration = Duration::from_millis(2);

/// A held floor lock.
#[derive(Debug)]
pub(crate) enum MysqlHeld {
    /// Lease mode: the row's key and owner.
    Lease { key: String, owner: String },
    /// Session mode: the named lock and the connection holding it.
    Session { name: String, conn: Conn },
}

/// Handoff mode in lease mode: the key the poller watches and the local waiters.
#[derive(Debug, Default)]
struct Waiting {
    key: Mutex<Option<String>>,
    released: Notify,
}

#[derive(Debug)]
enum Kind {
    Lease { waiting: Option<Arc<Waiting>> },
    Session,
}

/// The bare MySQL operations.
#[derive(Debug)]
pub(crate) struct MysqlFloor {
    kind: Kind,
    opts: Opts,
    /// The process's idle connections.
    idle: Mutex<Vec<Conn>>,
    handoff: bool,
    lease_us: i64,
    owners: Owners,
}

/// `mysql://…[?mode=session]` → the connection settings without fenced's parameters, and
/// whether the URL asks for session mode.
fn parse(url: &str) -> Result<(Opts, bool), String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let session = query.split('&').any(|p| p == "mode=session");
    let base = match base.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => base.to_owned(),
    };
    let opts = Opts::from_url(&base).map_err(|e| format!("not a MySQL URL: {e}"))?;
    let opts = OptsBuilder::from_opts(opts)
        .prefer_socket(false)
        .stmt_cache_size(64);
    Ok((opts.into(), session))
}

fn sql_error(what: &str, e: &mysql_async::Error) -> String {
    format!("{what}: {e}")
}

/// The named lock of `key` (64 characters at most, whatever the key).
fn lock_name(key: &str) -> String {
    format!("floor:{:016x}", fnv1a(key))
}

impl MysqlFloor {
    /// Connects and creates the table (lease mode); in handoff mode also starts the poller.
    pub(crate) async fn connect(
        url: &str,
        lease: Duration,
        handoff: bool,
    ) -> Result<MysqlFloor, String> {
        let (opts, session) = parse(url)?;
        let kind = if session {
            Kind::Session
        } else {
            let mut conn = Conn::new(opts.clone())
                .await
                .map_err(|e| sql_error("connecting to MySQL", &e))?;
            conn.query_drop(SCHEMA)
                .await
                .map_err(|e| sql_error("creating floor_locks", &e))?;
            let waiting = if handoff {
                let waiting = Arc::new(Waiting::default());
                tokio::spawn(poll(conn, Arc::downgrade(&waiting)));
                Some(waiting)
            } else {
                None
            };
            Kind::Lease { waiting }
        };
        Ok(MysqlFloor {
            kind,
            opts,
            idle: Mutex::new(Vec::new()),
            handoff,
            lease_us: i64::try_from(lease.as_micros()).unwrap_or(i64::MAX),
            owners: Owners::new(),
        })
    }

    /// An idle connection, or a new one.
    async fn conn(&self) -> Result<Conn, String> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match idle {
            Some(c) => Ok(c),
            None => Conn::new(self.opts.clone())
                .await
                .map_err(|e| sql_error("connecting to MySQL", &e)),
        }
    }

    fn put_back(&self, conn: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
    }

    /// One attempt of the upsert; the token when it granted.
    async fn take(&self, key: &str, owner: &str) -> Result<Option<u64>, String> {
        let mut conn = self.conn().await?;
        conn.exec_drop(TAKE, (key.as_bytes(), owner, self.lease_us))
            .await
            .map_err(|e| sql_error("acquire upsert", &e))?;
        let token = (conn.affected_rows() > 0).then(|| conn.last_insert_id().unwrap_or(0));
        self.put_back(conn);
        Ok(token)
    }
}

/// Handoff mode: looks at the watched key's row every [`POLL`] and wakes one local waiter when
/// it is free. Ends with the floor.
async fn poll(mut conn: Conn, waiting: std::sync::Weak<Waiting>) {
    loop {
        tokio::time::sleep(POLL).await;
        let Some(waiting) = waiting.upgrade() else {
            return;
        };
        let key = waiting
            .key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(key) = key else { continue };
        if let Ok(Some(1)) = conn
            .exec_first::<i64, _, _>(IS_FREE, (key.as_bytes(),))
            .await
        {
            waiting.released.notify_one();
        }
    }
}

impl Locker for MysqlFloor {
    type Held = MysqlHeld;

    async fn acquire(&self, key: &str) -> Result<MysqlHeld, String> {
        match &self.kind {
            Kind::Session => {
                let mut conn = self.conn().await?;
                let name = lock_name(key);
                // Handoff: the server queues the waiters; the wait limit is the protocol's.
                let wait = if self.handoff { WAIT.as_secs() } else { 0 };
                let got: Option<i64> = conn
                    .exec_first(format!("SELECT GET_LOCK(?, {wait})"), (&name,))
                    .await
                    .map_err(|e| sql_error("GET_LOCK", &e))?
                    .flatten();
                if got == Some(1) {
                    Ok(MysqlHeld::Session { name, conn })
                } else {
                    self.put_back(conn);
                    Err(if self.handoff {
                        format!("still held after waiting {WAIT:?}")
                    } else {
                        format!("{key} is held (unexpected outside handoff mode)")
                    })
                }
            }
            Kind::Lease { waiting } => {
                let owner = self.owners.next();
                let deadline = Instant::now() + WAIT;
                loop {
                    let notified = waiting.as_ref().map(|w| w.released.notified());
                    tokio::pin!(notified);
                    // Registered before the attempt, so a wake-up in between is not missed.
                    if let Some(n) = notified.as_mut().as_pin_mut() {
                        n.enable();
                    }
                    if self.take(key, &owner).await?.is_some() {
                        return Ok(MysqlHeld::Lease {
                            key: key.to_owned(),
                            owner,
                        });
                    }
                    let (Some(n), Some(w)) = (notified.as_pin_mut(), waiting) else {
                        return Err(format!("{key} is held (unexpected outside handoff mode)"));
                    };
                    *w.key.lock().unwrap_or_else(PoisonError::into_inner) = Some(key.to_owned());
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(format!("still held after waiting {WAIT:?}"));
                    }
                    // Without a wake-up, try again when a lease could have run out.
                    let fallback = now + Duration::from_micros(self.lease_us.unsigned_abs());
                    tokio::select! {
                        _ = n => {}
                        _ = tokio::time::sleep_until(fallback.min(deadline)) => {}
                    }
                }
            }
        }
    }

    async fn release(&self, held: MysqlHeld) -> Result<(), String> {
        match (held, &self.kind) {
            (MysqlHeld::Session { name, mut conn }, _) => {
                let released: Option<i64> = conn
                    .exec_first("SELECT RELEASE_LOCK(?)", (&name,))
                    .await
                    .map_err(|e| sql_error("RELEASE_LOCK", &e))?
                    .flatten();
                self.put_back(conn);
                if released == Some(1) {
                    Ok(())
                } else {
                    Err("the connection did not hold the named lock".to_owned())
                }
            }
            (MysqlHeld::Lease { key, owner }, Kind::Lease { waiting }) => {
                let mut conn = self.conn().await?;
                conn.exec_drop(GIVE_BACK, (key.as_bytes(), &owner))
                    .await
                    .map_err(|e| sql_error("release update", &e))?;
                let done = conn.affected_rows();
                self.put_back(conn);
                if let Some(w) = waiting {
                    w.released.notify_one();
                }
                if done == 1 {
                    Ok(())
                } else {
                    Err("not held by this owner".to_owned())
                }
            }
            (MysqlHeld::Lease { .. }, Kind::Session) => {
                Err("a lease-mode lock on a session-mode floor".to_owned())
            }
        }
    }

    fn name(&self) -> &'static str {
        "floor"
    }

    fn version(&self) -> String {
        "mysql_async 0.37".to_owned()
    }

    fn settings(&self) -> String {
        let lease_ms = self.lease_us / 1000;
        match (&self.kind, self.handoff) {
            (Kind::Lease { .. }, false) => format!(
                "mysql floor, lease mode: one connection per concurrent statement (a per-process \
                 pool of idle connections); acquire = INSERT … ON DUPLICATE KEY UPDATE that takes the row when it has no owner or \
                 expired (expiry UTC_TIMESTAMP(6) + {lease_ms} ms, token = the row's counter + 1, \
                 returned as LAST_INSERT_ID); release = UPDATE … SET owner = NULL WHERE key and \
                 owner match; no renewal, no lost-lock signal"
            ),
            (Kind::Lease { .. }, true) => format!(
                "mysql floor, lease mode: one connection per concurrent statement (a per-process \
                 pool of idle connections); acquire = the expiry upsert ({lease_ms} ms, token = the row's counter + 1); release = the \
                 owner-checked UPDATE; waiting (MySQL has no notifications): one connection per \
                 process reads the key's row every 2 ms and wakes one local waiter when it is \
                 free, a release wakes one local waiter at once, each waiter retries the upsert; \
                 fallback retry after the lease; no FIFO; no renewal"
            ),
            (Kind::Session, false) => "mysql floor, session mode: one connection per \
                 concurrently held lock (a per-process pool; named locks are re-entrant within a \
                 connection); acquire = SELECT GET_LOCK(name, 0), release = SELECT \
                 RELEASE_LOCK(name), name = FNV-1a of the key; no row, no fencing token"
                .to_owned(),
            (Kind::Session, true) => "mysql floor, session mode: one connection per \
                 waiting or holding task (a per-process pool); acquire = SELECT GET_LOCK(name, \
                 60), which blocks in the server until granted (the server's own queue), release \
                 = SELECT RELEASE_LOCK(name); no row, no fencing token"
                .to_owned(),
        }
    }
}
