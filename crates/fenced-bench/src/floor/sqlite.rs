//! The SQLite floor: the insert-if-absent and owner-checked delete statements fenced needs,
//! each in its own transaction, on one bare rusqlite connection per process in WAL mode with
//! `synchronous=FULL` (as fenced), run inline on the calling task.
//!
//! Per acquire, one `BEGIN IMMEDIATE` transaction: an upsert that takes the key when it is
//! absent or expired, and, when it did, the next fencing token from a counter row. Per release,
//! one autocommit `DELETE ... WHERE key = ? AND owner = ?`. In handoff mode a thread polls
//! `PRAGMA data_version` every 2 ms (fenced's shortest poll interval) on its own connection and
//! wakes one waiter per change; releases in this process wake one waiter at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Owners;
use crate::locker::{Locker, WAIT};

/// How long a statement waits for another connection's write lock (fenced's default).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The poll interval of `PRAGMA data_version` in handoff mode.
const POLL: Duration = Duration::from_millis(2);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS floor_locks (
    key TEXT PRIMARY KEY NOT NULL,
    owner TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS floor_meta (id INTEGER PRIMARY KEY, last_token INTEGER NOT NULL);
INSERT OR IGNORE INTO floor_meta (id, last_token) VALUES (1, 0);
";

const TAKE: &str = "INSERT INTO floor_locks (key, owner, expires_ms) VALUES (?1, ?2, ?3)
    ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_ms = excluded.expires_ms
    WHERE floor_locks.expires_ms <= ?4";
const NEXT_TOKEN: &str =
    "UPDATE floor_meta SET last_token = last_token + 1 WHERE id = 1 RETURNING last_token";
const DELETE: &str = "DELETE FROM floor_locks WHERE key = ?1 AND owner = ?2";

/// A held floor lock.
#[derive(Debug)]
pub(crate) struct SqliteHeld {
    key: String,
    owner: String,
}

/// One connection per process, shared by all tasks behind a mutex.
#[derive(Debug)]
pub(crate) struct SqliteFloor {
    conn: Mutex<Connection>,
    released: Arc<Notify>,
    lease_ms: i64,
    owners: Owners,
    handoff: bool,
    stop: Arc<AtomicBool>,
}

impl Drop for SqliteFloor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn wall_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

fn busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Opens `path` in WAL mode with `synchronous=FULL` and creates the tables. Processes opening a
/// new file at once can get `SQLITE_BUSY` without waiting; opening is retried for a while.
fn open(path: &str) -> Result<Connection, String> {
    let started = std::time::Instant::now();
    loop {
        let attempt = (|| -> rusqlite::Result<Connection> {
            let conn = Connection::open(path)?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(rusqlite::Error::InvalidQuery);
            }
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA} COMMIT;"))?;
            Ok(conn)
        })();
        match attempt {
            Ok(conn) => return Ok(conn),
            Err(e) if busy(&e) && started.elapsed() < BUSY_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("opening {path}: {e}")),
        }
    }
}

impl SqliteFloor {
    /// Opens the file; in handoff mode also starts the `data_version` poller.
    pub(crate) fn open(path: &str, lease: Duration, handoff: bool) -> Result<SqliteFloor, String> {
        let conn = open(path)?;
        let released = Arc::new(Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        if handoff {
            let reader = open(path)?;
            let wake = released.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("floor-sqlite-poll".to_owned())
                .spawn(move || poll(&reader, &wake, &stop))
                .map_err(|e| format!("cannot start the poll thread: {e}"))?;
        }
        Ok(SqliteFloor {
            conn: Mutex::new(conn),
            released,
            lease_ms: i64::try_from(lease.as_millis()).unwrap_or(i64::MAX),
            owners: Owners::new(),
            handoff,
            stop,
        })
    }

    /// One acquire transaction: whether `owner` got `key`.
    fn try_take(&self, key: &str, owner: &str) -> rusqlite::Result<bool> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = wall_ms();
        let taken =
            tx.prepare_cached(TAKE)?
                .execute(params![key, owner, now + self.lease_ms, now])?;
        if taken == 1 {
            let _token: i64 = tx.prepare_cached(NEXT_TOKEN)?.query_row([], |r| r.get(0))?;
        }
        tx.commit()?;
        Ok(taken == 1)
    }
}

/// Wakes one waiter whenever another connection committed, until `stop`.
fn poll(reader: &Connection, wake: &Notify, stop: &AtomicBool) {
    let mut seen: Option<i64> = None;
    while !stop.load(Ordering::Relaxed) {
        match reader.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0)) {
            Ok(version) => {
                if seen.is_some_and(|s| s != version) {
                    wake.notify_one();
                }
                seen = Some(version);
            }
            Err(e) => eprintln!("floor: PRAGMA data_version failed: {e}"),
        }
        std::thread::sleep(POLL);
    }
}

impl Locker for SqliteFloor {
    type Held = SqliteHeld;

    async fn acquire(&self, key: &str) -> Result<SqliteHeld, String> {
        let owner = self.owners.next();
        let deadline = Instant::now() + WAIT;
        loop {
            // Registered before the attempt, so a wake-up in between is not missed.
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self
                .try_take(key, &owner)
                .map_err(|e| format!("acquire: {e}"))?
            {
                return Ok(SqliteHeld {
                    key: key.to_owned(),
                    owner,
                });
            }
            if !self.handoff {
                return Err(format!("{key} is held (unexpected outside handoff mode)"));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("still held after waiting {WAIT:?}"));
            }
            let fallback = now + Duration::from_millis(self.lease_ms.unsigned_abs());
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(fallback.min(deadline)) => {}
            }
        }
    }

    async fn release(&self, held: SqliteHeld) -> Result<(), String> {
        let deleted = {
            let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
            conn.prepare_cached(DELETE)
                .and_then(|mut s| s.execute(params![held.key, held.owner]))
                .map_err(|e| format!("release: {e}"))?
        };
        if deleted != 1 {
            return Err("not held by this owner".to_owned());
        }
        if self.handoff {
            self.released.notify_one();
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "floor"
    }

    fn version(&self) -> String {
        format!("rusqlite 0.41, SQLite {}", rusqlite::version())
    }

    fn settings(&self) -> String {
        let mut text = format!(
            "sqlite floor: one bare rusqlite connection per process (std Mutex, statements run \
             inline on the tokio worker, no spawn_blocking), WAL, synchronous=FULL, busy_timeout \
             5 s; acquire = BEGIN IMMEDIATE; INSERT .. ON CONFLICT DO UPDATE .. WHERE expired \
             (lease {} ms); if taken UPDATE .. RETURNING next token; COMMIT; release = autocommit \
             DELETE WHERE key AND owner; no renewal, no holder-process check",
            self.lease_ms
        );
        if self.handoff {
            text.push_str(
                "; waiting: a thread polls PRAGMA data_version every 2 ms (fixed) and wakes one \
                 waiter per change, a release in this process wakes one waiter at once, fallback \
                 retry after the lease; no FIFO (a releasing task may take the lock again at once)",
            );
        }
        text
    }
}
