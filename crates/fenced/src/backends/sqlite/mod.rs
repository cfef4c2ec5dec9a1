#![doc = include_str!("README.md")]

mod config;
mod liveness;
mod wait;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tracing::debug;

use crate::backend::{
    AcquireRequest, Acquired, Backend, Binding, Capabilities, Confirm, Grant, HolderInfo, LockRef,
    Mode, Safety, Watch,
};
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::key::Key;
use crate::token::FencingToken;

use config::SqliteConfig;
use liveness::{Lease, Now, ProcessMark};
use wait::SharedFile;

/// `PRAGMA application_id` of fenced lock files ("FENC").
const APPLICATION_ID: i32 = 0x4645_4E43;
/// `PRAGMA user_version` of the schema this code writes. Files of older versions are migrated
/// when opened (see [`MIGRATIONS`]); files of newer versions are refused.
const SCHEMA_VERSION: i32 = 2;
/// Expired rows are swept after this many grants by one backend (and when a file is opened).
const SWEEP_EVERY: u32 = 128;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS fenced_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_token INTEGER NOT NULL CHECK (last_token >= 0),
    releases INTEGER NOT NULL
);
INSERT OR IGNORE INTO fenced_meta (id, last_token, releases) VALUES (1, 0, 0);
CREATE TABLE IF NOT EXISTS fenced_locks (
    key TEXT PRIMARY KEY NOT NULL,
    owner TEXT NOT NULL,
    token INTEGER NOT NULL,
    label TEXT NOT NULL,
    lease_ms INTEGER NOT NULL,
    clock TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    wall_expires_ms INTEGER NOT NULL,
    pid INTEGER,
    pid_start INTEGER,
    pid_ns TEXT,
    granted_ms INTEGER,
    wall_granted_ms INTEGER
) WITHOUT ROWID;
";

/// The steps that bring a file of schema version `from` to `from + 1`, in order. Each runs in the
/// transaction that opens the file, together with the new `user_version`, so a file is migrated
/// completely or not at all.
///
/// - 1 → 2: the time of the grant (`granted_ms` in the row's clock, `wall_granted_ms` in
///   wall-clock milliseconds), for [`HolderInfo::age`]. Rows written before stay `NULL`: their
///   age is unknown.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "ALTER TABLE fenced_locks ADD COLUMN granted_ms INTEGER;
     ALTER TABLE fenced_locks ADD COLUMN wall_granted_ms INTEGER;",
)];

/// The embedded backend: a lock file shared by the processes of one machine.
///
/// Cheap to clone; clones share one connection. Most programs use it through a URL
/// (`fenced::connect("sqlite:///var/lib/app/locks.db")`); see the [module docs](self) for what
/// it guarantees.
///
/// ```
/// # async fn demo() -> fenced::Result<()> {
/// use fenced::backends::sqlite::SqliteBackend;
/// let dir = tempfile::tempdir().unwrap();
/// let backend = SqliteBackend::open(dir.path().join("locks.db")).await?;
/// let a = fenced::Client::new(backend.clone());
/// let b = fenced::Client::new(backend); // or another process opening the same file
/// let guard = a.lock("report").await?;
/// assert!(b.try_lock("report").await?.is_none());
/// guard.release().await?;
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(demo()).unwrap();
/// ```
#[derive(Clone)]
pub struct SqliteBackend {
    inner: Arc<Inner>,
}

struct Inner {
    /// The canonical path of the database file.
    path: PathBuf,
    config: SqliteConfig,
    conn: Mutex<Connection>,
    file: Arc<SharedFile>,
    grants: AtomicU32,
}

impl fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.inner.path)
            .field("busy_timeout", &self.inner.config.busy_timeout)
            .field("release_on_exit", &self.inner.config.release_on_exit)
            .finish()
    }
}

impl SqliteBackend {
    /// Opens (creating it and its parent directory when missing) the lock file at `path`, with
    /// the default parameters (`busy_timeout=5s`, `release_on_exit=true`).
    ///
    /// Fails with [`ErrorKind::InvalidConfig`] when the directory cannot be created, the file is
    /// not writable, or it is not a fenced lock file; the message names the path.
    ///
    /// ```
    /// # async fn demo() -> fenced::Result<()> {
    /// use fenced::backends::sqlite::SqliteBackend;
    /// let dir = tempfile::tempdir().unwrap();
    /// let backend = SqliteBackend::open(dir.path().join("new/dir/locks.db")).await?;
    /// assert!(backend.path().ends_with("new/dir/locks.db"));
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(demo()).unwrap();
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future closes whatever it opened; no lock is taken by connecting.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::with_config(SqliteConfig::new(path.as_ref().to_owned())).await
    }

    /// Opens the lock file named by an `sqlite:` URL, with its parameters (`busy_timeout`,
    /// `release_on_exit`; see the [module docs](self)).
    ///
    /// ```
    /// # async fn demo() -> fenced::Result<()> {
    /// use fenced::backends::sqlite::SqliteBackend;
    /// let dir = tempfile::tempdir().unwrap();
    /// let url = format!("sqlite://{}/locks.db?busy_timeout=2s", dir.path().display());
    /// let backend = SqliteBackend::connect(&url).await?;
    /// let err = SqliteBackend::connect("sqlite:///tmp/x.db?colour=blue").await.unwrap_err();
    /// assert_eq!(err.kind(), fenced::ErrorKind::InvalidConfig);
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(demo()).unwrap();
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future closes whatever it opened; no lock is taken by connecting.
    pub async fn connect(url: &str) -> Result<Self> {
        let parsed = crate::url::parse(url)?;
        Self::from_url(&parsed).await
    }

    pub(crate) async fn from_url(url: &url::Url) -> Result<Self> {
        Self::with_config(SqliteConfig::from_url(url)?).await
    }

    async fn with_config(config: SqliteConfig) -> Result<Self> {
        let shown = config.path.display().to_string();
        let inner = tokio::task::spawn_blocking(move || open_file_retrying(config))
            .await
            .map_err(|e| join_error(Operation::Connect, &shown, e))??;
        debug!(path = %inner.path.display(), busy_timeout = ?inner.config.busy_timeout, "fenced: sqlite lock file open");
        Ok(SqliteBackend {
            inner: Arc::new(inner),
        })
    }

    /// The canonical path of the lock file.
    ///
    /// ```
    /// # async fn demo() -> fenced::Result<()> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let backend = fenced::backends::sqlite::SqliteBackend::open(dir.path().join("l.db")).await?;
    /// assert!(backend.path().is_absolute());
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `op` in one `BEGIN IMMEDIATE` transaction on a blocking thread. `op` gets the time
    /// taken once the write lock is held.
    async fn write<T, F>(&self, operation: Operation, key: &Key, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Ctx) -> rusqlite::Result<T> + Send + 'static,
    {
        self.transaction(TransactionBehavior::Immediate, operation, Some(key), op)
            .await
    }

    /// Runs `op` in one read transaction (`BEGIN DEFERRED`: a snapshot that does not hold up
    /// other connections' writes in WAL mode) on a blocking thread. `op` must not write.
    async fn read<T, F>(&self, operation: Operation, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Ctx) -> rusqlite::Result<T> + Send + 'static,
    {
        self.transaction(TransactionBehavior::Deferred, operation, None, op)
            .await
    }

    async fn transaction<T, F>(
        &self,
        behavior: TransactionBehavior,
        operation: Operation,
        key: Option<&Key>,
        op: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Ctx) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut conn = inner.conn.lock().unwrap_or_else(PoisonError::into_inner);
            let tx = conn.transaction_with_behavior(behavior)?;
            let ctx = Ctx::new(inner.config.release_on_exit);
            let out = op(&tx, &ctx)?;
            tx.commit()?;
            if ctx.freed.get() {
                // Wake this process's waiters at once rather than at the next poll.
                inner.file.poke();
            }
            Ok(out)
        })
        .await;
        let shown = self.inner.path.display().to_string();
        let error = match result {
            Ok(Ok(out)) => return Ok(out),
            Ok(Err(e)) => sql_error(operation, &shown, self.inner.config.busy_timeout, e),
            Err(e) => join_error(operation, &shown, e),
        };
        Err(match key {
            Some(key) => error.with_key(key.as_str()),
            None => error,
        })
    }
}

/// What every operation needs to judge rows, taken once the write lock is held.
struct Ctx {
    now: Now,
    me: Option<ProcessMark>,
    release_on_exit: bool,
    /// Set when the operation deleted a lock.
    freed: std::cell::Cell<bool>,
}

impl Ctx {
    fn new(release_on_exit: bool) -> Self {
        Ctx {
            now: liveness::now(),
            me: liveness::this_process(),
            release_on_exit,
            freed: std::cell::Cell::new(false),
        }
    }
}

/// One row of `fenced_locks`.
#[derive(Debug)]
struct Row {
    owner: String,
    token: i64,
    label: String,
    lease_ms: i64,
    clock: String,
    expires_ms: i64,
    wall_expires_ms: i64,
    process: Option<ProcessMark>,
    /// When the lock was granted, in milliseconds of `clock` (`NULL` in rows written before
    /// schema version 2).
    granted_ms: Option<i64>,
    /// When the lock was granted, in wall-clock milliseconds.
    wall_granted_ms: Option<i64>,
}

/// The columns [`Row::from_sql`] reads, in its order.
const ROW_COLUMNS: &str = "owner, token, label, lease_ms, clock, expires_ms, wall_expires_ms, \
                           pid, pid_start, pid_ns, granted_ms, wall_granted_ms";

/// Why a stored lock no longer counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gone {
    Expired,
    OtherBoot,
    HolderExited,
}

impl Row {
    fn load(conn: &Connection, key: &Key) -> rusqlite::Result<Option<Row>> {
        conn.prepare_cached(&format!(
            "SELECT {ROW_COLUMNS} FROM fenced_locks WHERE key = ?1"
        ))?
        .query_row([key.as_str()], |r| Row::from_sql(r, 0))
        .optional()
    }

    /// Reads the [`ROW_COLUMNS`] starting at column `at` of `r`.
    fn from_sql(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Row> {
        let pid: Option<i64> = r.get(at + 7)?;
        let start: Option<i64> = r.get(at + 8)?;
        let pid_ns: Option<String> = r.get(at + 9)?;
        Ok(Row {
            owner: r.get(at)?,
            token: r.get(at + 1)?,
            label: r.get(at + 2)?,
            lease_ms: r.get(at + 3)?,
            clock: r.get(at + 4)?,
            expires_ms: r.get(at + 5)?,
            wall_expires_ms: r.get(at + 6)?,
            process: match (pid, start, pid_ns) {
                (Some(pid), Some(start), Some(pid_ns)) => Some(ProcessMark { pid, start, pid_ns }),
                _ => None,
            },
            granted_ms: r.get(at + 10)?,
            wall_granted_ms: r.get(at + 11)?,
        })
    }

    /// How long ago the lock was granted, in whole milliseconds, by the same clock rules as
    /// expiry: the row's clock when it is ours, the wall clock otherwise. `None` for rows
    /// written before schema version 2.
    fn age_ms(&self, now: &Now) -> Option<i64> {
        let age = if self.clock == now.clock {
            now.ms.saturating_sub(self.granted_ms?)
        } else {
            now.wall_ms.saturating_sub(self.wall_granted_ms?)
        };
        Some(age.max(0))
    }

    /// The grant time to store when the row is rewritten with `now.clock`: unchanged in the same
    /// clock, carried over through the wall clock when the clock id changes (a renewal from
    /// another time namespace).
    fn granted_in(&self, now: &Now) -> Option<i64> {
        if self.clock == now.clock {
            self.granted_ms
        } else {
            let age = now.wall_ms.saturating_sub(self.wall_granted_ms?);
            Some(now.ms.saturating_sub(age))
        }
    }

    /// Remaining lease in milliseconds, or why the lock no longer counts.
    fn state(&self, ctx: &Ctx) -> std::result::Result<i64, Gone> {
        let left = match ctx
            .now
            .lease(&self.clock, self.expires_ms, self.wall_expires_ms)
        {
            Lease::Live(left) => left,
            Lease::Expired => return Err(Gone::Expired),
            Lease::OtherBoot => return Err(Gone::OtherBoot),
        };
        // A holder process that is gone frees its locks at once, but only when its pid can be
        // checked here: same boot, same pid namespace, and /proc usable on both sides.
        if let (Some(holder), Some(me)) = (&self.process, &ctx.me) {
            let checkable = holder.pid_ns == me.pid_ns && ctx.now.same_boot(&self.clock);
            if checkable && holder != me && liveness::process_gone(holder) {
                return Err(Gone::HolderExited);
            }
        }
        Ok(left)
    }

    fn token(&self) -> rusqlite::Result<FencingToken> {
        to_token(self.token)
    }

    fn info(&self, remaining_ms: i64, now: &Now) -> HolderInfo {
        let mut info = HolderInfo::new();
        info.owner = self.owner.parse().ok();
        info.token = u64::try_from(self.token).ok().map(FencingToken::new);
        info.label = Some(self.label.clone());
        let ms = remaining_ms.min(self.lease_ms).max(0);
        info.remaining = Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
        info.age = self
            .age_ms(now)
            .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
        // Waiters are per process (see wait.rs); nothing in the file counts them.
        info.waiters = None;
        info
    }

    /// The holder, when the lock still counts.
    fn live_info(&self, ctx: &Ctx) -> Option<HolderInfo> {
        self.state(ctx).ok().map(|left| self.info(left, &ctx.now))
    }
}

fn to_token(raw: i64) -> rusqlite::Result<FencingToken> {
    u64::try_from(raw)
        .map(FencingToken::new)
        .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, raw))
}

/// A lease in whole milliseconds, rounded up, bounded so that expiry arithmetic cannot overflow.
fn lease_ms(lease: Duration) -> i64 {
    let ms = lease.as_nanos().div_ceil(1_000_000);
    i64::try_from(ms).unwrap_or(i64::MAX).min(i64::MAX / 4)
}

/// The stored expiry (in the row's clock and the wall clock) of a lease starting now.
///
/// Clocks are read in whole milliseconds (rounded down), so one extra millisecond keeps the
/// stored lease at least as long as the requested one.
fn expiry(now: &Now, lease_ms: i64) -> (i64, i64) {
    (
        now.ms.saturating_add(lease_ms).saturating_add(1),
        now.wall_ms.saturating_add(lease_ms).saturating_add(1),
    )
}

/// The stored grant time (in the clock of `now`, and in the wall clock) of a lock granted now.
///
/// Clocks are read in whole milliseconds (rounded down), so one extra millisecond makes the
/// stored time no earlier than the real one: a reported age is never longer than the real age.
fn grant_time(now: &Now) -> (i64, i64) {
    (now.ms.saturating_add(1), now.wall_ms.saturating_add(1))
}

/// Sets the lease of the lock in `row` (held by its owner) to `lease_ms` from now, in this
/// process's clock; the token and the grant time stay.
fn refresh(
    conn: &Connection,
    key: &Key,
    row: &Row,
    ctx: &Ctx,
    lease_ms: i64,
) -> rusqlite::Result<()> {
    let (expires, wall_expires) = expiry(&ctx.now, lease_ms);
    conn.prepare_cached(
        "UPDATE fenced_locks SET lease_ms = ?2, clock = ?3, expires_ms = ?4, wall_expires_ms = ?5,
         granted_ms = ?6 WHERE key = ?1",
    )?
    .execute(params![
        key.as_str(),
        lease_ms,
        ctx.now.clock,
        expires,
        wall_expires,
        row.granted_in(&ctx.now),
    ])?;
    Ok(())
}

/// Issues the next token of the store-wide counter.
fn next_token(conn: &Connection) -> rusqlite::Result<FencingToken> {
    let raw: i64 = conn
        .prepare_cached(
            "UPDATE fenced_meta SET last_token = last_token + 1 WHERE id = 1 RETURNING last_token",
        )?
        .query_row([], |r| r.get(0))?;
    to_token(raw)
}

/// Deletes rows whose lease is over (not checking processes).
fn sweep(conn: &Connection, ctx: &Ctx) -> rusqlite::Result<usize> {
    let now = &ctx.now;
    let mut dead = Vec::new();
    {
        let mut stmt = conn
            .prepare_cached("SELECT key, clock, expires_ms, wall_expires_ms FROM fenced_locks")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let clock: String = r.get(1)?;
            if !matches!(now.lease(&clock, r.get(2)?, r.get(3)?), Lease::Live(_)) {
                dead.push(r.get::<_, String>(0)?);
            }
        }
    }
    for key in &dead {
        delete_row(conn, ctx, key)?;
    }
    Ok(dead.len())
}

/// Deletes the lock of `key` and counts the deletion (waiters watch that count).
fn delete_row(conn: &Connection, ctx: &Ctx, key: &str) -> rusqlite::Result<()> {
    let deleted = conn
        .prepare_cached("DELETE FROM fenced_locks WHERE key = ?1")?
        .execute([key])?;
    if deleted > 0 {
        ctx.freed.set(true);
        conn.prepare_cached("UPDATE fenced_meta SET releases = releases + 1 WHERE id = 1")?
            .execute([])?;
    }
    Ok(())
}

/// [`open_file`], retrying transient failures for up to `busy_timeout` (blocking).
///
/// Processes that open a new file at the same moment race: switching it to WAL mode and the
/// first schema transaction can answer `SQLITE_BUSY` at once, without waiting (SQLite skips
/// the busy handler where waiting could deadlock). Opening is idempotent, so it is retried.
fn open_file_retrying(config: SqliteConfig) -> Result<Inner> {
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(2);
    loop {
        match open_file(config.clone()) {
            Err(e) if e.is_transient() && started.elapsed() < config.busy_timeout => {
                std::thread::sleep(delay / 2 + crate::options::jitter(delay / 2));
                delay = (delay * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// Opens and prepares the file (blocking).
fn open_file(config: SqliteConfig) -> Result<Inner> {
    let invalid = |why: String| Error::new(ErrorKind::InvalidConfig, Operation::Connect, why);
    let path = std::path::absolute(&config.path).map_err(|e| {
        invalid(format!(
            "cannot resolve the lock file path {} ({e}); use an absolute path",
            config.path.display()
        ))
    })?;
    let shown = path.display().to_string();
    if path.is_dir() {
        return Err(invalid(format!(
            "{shown} is a directory; name a file inside it, like {}",
            path.join("locks.db").display()
        )));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            invalid(format!(
                "cannot create the directory {} for the lock file ({e}); create it yourself, \
                 fix its permissions, or choose another path",
                dir.display()
            ))
            .with_source(e)
        })?;
    }
    let sql = |e| sql_error(Operation::Connect, &shown, config.busy_timeout, e);
    // No SQLITE_OPEN_URI: the path is a plain file name.
    let mut conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql)?;
    conn.busy_timeout(config.busy_timeout).map_err(sql)?;
    if conn.is_readonly(rusqlite::MAIN_DB).map_err(sql)? {
        return Err(invalid(format!(
            "{shown} can only be opened read-only; make the file and its directory writable by this \
             user (every process taking locks writes to it)"
        )));
    }
    // Refuse foreign databases before changing anything in them. The three reads of the check
    // share one read transaction: another process may be initializing the file right now, and
    // reads from before and after its commit would look like a foreign database.
    {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(sql)?;
        check_identity(&tx, &shown, &sql)?;
        tx.commit().map_err(sql)?;
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(sql)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(invalid(format!(
            "{shown} cannot use SQLite's WAL mode (it stays in {mode:?} mode), which fenced needs; put \
             the lock file on a local file system"
        )));
    }
    // FULL: every commit is on disk before it is acknowledged, so the token counter never goes
    // backwards, even after a power loss.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql)?;
    {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        // Again inside the transaction: another process may have initialized it meanwhile.
        let version = check_identity(&tx, &shown, &sql)?;
        if version == 0 {
            tx.execute_batch(SCHEMA).map_err(sql)?;
            tx.pragma_update(None, "application_id", APPLICATION_ID)
                .map_err(sql)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(sql)?;
        } else if version < SCHEMA_VERSION {
            migrate(&tx, version).map_err(sql)?;
            debug!(path = %shown, from = version, to = SCHEMA_VERSION, "fenced: lock file schema upgraded");
        }
        let swept = sweep(&tx, &Ctx::new(config.release_on_exit)).map_err(sql)?;
        tx.commit().map_err(sql)?;
        if swept > 0 {
            debug!(path = %shown, swept, "fenced: removed expired locks");
        }
    }
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    let file = wait::shared_file(&path, config.busy_timeout);
    Ok(Inner {
        path,
        config,
        conn: Mutex::new(conn),
        file,
        grants: AtomicU32::new(0),
    })
}

/// Brings a file of schema version `from` (at least 1) to [`SCHEMA_VERSION`], inside the
/// caller's transaction.
fn migrate(conn: &Connection, from: i32) -> rusqlite::Result<()> {
    for (version, sql) in MIGRATIONS {
        if *version >= from {
            conn.execute_batch(sql)?;
        }
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
}

/// Fails when the file is some other application's database or has a newer schema; returns the
/// schema version (0 for a new file).
fn check_identity(
    conn: &Connection,
    shown: &str,
    sql: &dyn Fn(rusqlite::Error) -> Error,
) -> Result<i32> {
    let app: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(sql)?;
    let version: i32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql)?;
    let foreign_tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema
             WHERE name NOT LIKE 'fenced!_%' ESCAPE '!' AND name NOT LIKE 'sqlite!_%' ESCAPE '!'",
            [],
            |r| r.get(0),
        )
        .map_err(sql)?;
    let invalid = |why: String| {
        Err(Error::new(
            ErrorKind::InvalidConfig,
            Operation::Connect,
            why,
        ))
    };
    if app == 0 && (foreign_tables > 0 || version != 0) {
        return invalid(format!(
            "{shown} is an SQLite database of another application; give fenced a file of its own"
        ));
    }
    if app != 0 && app != APPLICATION_ID {
        return invalid(format!(
            "{shown} is an SQLite database of another application (application_id {app:#x}); give \
             fenced a file of its own"
        ));
    }
    if version > SCHEMA_VERSION {
        return invalid(format!(
            "{shown} was written by a newer version of fenced (schema {version}, this one knows up \
             to {SCHEMA_VERSION}); upgrade fenced in this program, or use another file"
        ));
    }
    Ok(version)
}

/// Maps an SQLite error to a fenced error that says what to do.
fn sql_error(
    operation: Operation,
    shown: &str,
    busy_timeout: Duration,
    e: rusqlite::Error,
) -> Error {
    use rusqlite::ErrorCode as C;
    let (kind, transient, message) = match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            C::DatabaseBusy | C::DatabaseLocked => (
                ErrorKind::Backend,
                true,
                format!(
                    "the lock file {shown} stayed locked by another connection for longer than busy_timeout \
                     ({busy_timeout:?}); retry, or raise busy_timeout in the URL (?busy_timeout=10s)"
                ),
            ),
            C::ReadOnly => (
                ErrorKind::InvalidConfig,
                false,
                format!(
                    "cannot write the lock file {shown}; make it and its directory writable by this user"
                ),
            ),
            C::PermissionDenied | C::CannotOpen | C::AuthorizationForStatementDenied => (
                ErrorKind::InvalidConfig,
                false,
                format!(
                    "cannot open the lock file {shown}; check that its directory exists and that this user \
                     may read and write both"
                ),
            ),
            C::NotADatabase => (
                ErrorKind::InvalidConfig,
                false,
                format!(
                    "{shown} is not an SQLite database; point the URL at a new file (fenced creates it) or \
                     at an existing fenced lock file"
                ),
            ),
            C::DatabaseCorrupt => (
                ErrorKind::Backend,
                false,
                format!(
                    "the lock file {shown} is corrupt; stop the programs using it and move it away (a new \
                     file starts its fencing tokens from 1 again, so also reset what your resources \
                     remember of old tokens)"
                ),
            ),
            C::DiskFull => (
                ErrorKind::Backend,
                true,
                format!("the disk holding the lock file {shown} is full; free some space"),
            ),
            C::SystemIoFailure | C::FileLockingProtocolFailed => (
                ErrorKind::Backend,
                true,
                format!(
                    "I/O error on the lock file {shown}; check the disk, and keep the file on a local file \
                     system"
                ),
            ),
            _ => (
                ErrorKind::Backend,
                false,
                format!("SQLite failed on the lock file {shown}"),
            ),
        },
        _ => (
            ErrorKind::Backend,
            false,
            format!(
                "the lock file {shown} holds data this version of fenced does not understand; check that \
                 only fenced writes to it"
            ),
        ),
    };
    Error::new(kind, operation, message)
        .with_source(e)
        .transient(transient)
}

fn join_error(operation: Operation, shown: &str, e: tokio::task::JoinError) -> Error {
    Error::new(
        ErrorKind::Backend,
        operation,
        format!("the operation on the lock file {shown} did not complete ({e}); retry it"),
    )
    .transient(e.is_cancelled())
}

fn unsupported_mode() -> Error {
    Error::new(
        ErrorKind::Unsupported,
        Operation::Acquire,
        "the sqlite backend supports exclusive locks only; use Mode::Exclusive",
    )
}

#[async_trait]
impl Backend for SqliteBackend {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Safety::SingleMachine, Binding::Lease).with_native_wait(true)
    }

    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Acquired> {
        if request.mode != Mode::Exclusive {
            return Err(unsupported_mode());
        }
        let key = request.key.clone();
        let owner = request.owner.to_string();
        let label = request.label.to_owned();
        let lease = request.lease;
        let sweep_now = self.inner.grants.load(Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1;
        let reply = self
            .write(Operation::Acquire, request.key, move |conn, ctx| {
                let ms = lease_ms(lease);
                let (expires, wall_expires) = expiry(&ctx.now, ms);
                if let Some(row) = Row::load(conn, &key)? {
                    match row.state(ctx) {
                        Ok(_) if row.owner == owner => {
                            // A retry by the same owner: refresh the lease, keep the token and
                            // the grant time.
                            refresh(conn, &key, &row, ctx, ms)?;
                            return Ok(Acquired::Granted(Grant::new(row.token()?, lease)));
                        }
                        Ok(left) => return Ok(Acquired::Held(row.info(left, &ctx.now))),
                        Err(gone) => {
                            debug!(key = %key, token = row.token, reason = ?gone, "fenced: taking over a lock that no longer counts");
                        }
                    }
                }
                let token = next_token(conn)?;
                let process = ctx.me.as_ref().filter(|_| ctx.release_on_exit);
                let (granted_ms, wall_granted_ms) = grant_time(&ctx.now);
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO fenced_locks
                     (key, owner, token, label, lease_ms, clock, expires_ms, wall_expires_ms, pid, pid_start, pid_ns,
                      granted_ms, wall_granted_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                )?
                .execute(params![
                    key.as_str(),
                    owner,
                    i64::try_from(token.get()).unwrap_or(i64::MAX),
                    label,
                    ms,
                    ctx.now.clock,
                    expires,
                    wall_expires,
                    process.map(|p| p.pid),
                    process.map(|p| p.start),
                    process.map(|p| p.pid_ns.as_str()),
                    granted_ms,
                    wall_granted_ms,
                ])?;
                if sweep_now {
                    sweep(conn, ctx)?;
                }
                Ok(Acquired::Granted(Grant::new(token, lease)))
            })
            .await?;
        if matches!(reply, Acquired::Granted(_)) {
            self.inner.grants.fetch_add(1, Ordering::Relaxed);
        }
        Ok(reply)
    }

    async fn extend(&self, lock: &LockRef<'_>, lease: Duration) -> Result<Confirm> {
        let key = lock.key.clone();
        let owner = lock.owner.to_string();
        self.write(Operation::Extend, lock.key, move |conn, ctx| {
            let Some(row) = Row::load(conn, &key)? else {
                return Ok(Confirm::NotHeld(None));
            };
            match row.state(ctx) {
                Ok(_) if row.owner == owner => {
                    refresh(conn, &key, &row, ctx, lease_ms(lease))?;
                    Ok(Confirm::Done)
                }
                Ok(left) => Ok(Confirm::NotHeld(Some(row.info(left, &ctx.now)))),
                Err(_) => Ok(Confirm::NotHeld(None)),
            }
        })
        .await
    }

    async fn release(&self, lock: &LockRef<'_>) -> Result<Confirm> {
        let key = lock.key.clone();
        let owner = lock.owner.to_string();
        self.write(Operation::Release, lock.key, move |conn, ctx| {
            let Some(row) = Row::load(conn, &key)? else {
                return Ok(Confirm::NotHeld(None));
            };
            match row.state(ctx) {
                Ok(_) if row.owner == owner => {
                    delete_row(conn, ctx, key.as_str())?;
                    Ok(Confirm::Done)
                }
                Ok(left) => Ok(Confirm::NotHeld(Some(row.info(left, &ctx.now)))),
                Err(_) => {
                    // Nobody holds it: tidy the row away.
                    delete_row(conn, ctx, key.as_str())?;
                    Ok(Confirm::NotHeld(None))
                }
            }
        })
        .await
    }

    async fn watch(&self, key: &Key) -> Result<Box<dyn Watch>> {
        let file = self.inner.file.clone();
        let owned = key.clone();
        let shown = self.inner.path.display().to_string();
        let busy = self.inner.config.busy_timeout;
        match tokio::task::spawn_blocking(move || file.subscribe(&owned)).await {
            Ok(Ok(watch)) => Ok(Box::new(watch)),
            Ok(Err(e)) => Err(sql_error(Operation::Wait, &shown, busy, e).with_key(key.as_str())),
            Err(e) => Err(join_error(Operation::Wait, &shown, e).with_key(key.as_str())),
        }
    }

    async fn holder(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let owned = key.clone();
        self.write(Operation::Admin, key, move |conn, ctx| {
            Ok(Row::load(conn, &owned)?.and_then(|row| row.live_info(ctx)))
        })
        .await
    }

    async fn force_release(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let owned = key.clone();
        self.write(Operation::Admin, key, move |conn, ctx| {
            let Some(row) = Row::load(conn, &owned)? else {
                return Ok(None);
            };
            delete_row(conn, ctx, owned.as_str())?;
            Ok(row.live_info(ctx))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<HolderInfo>> {
        let prefix = prefix.to_owned();
        self.read(Operation::Admin, move |conn, ctx| {
            // Keys compare as bytes (BINARY collation), so the keys starting with `prefix` are
            // the ones from `prefix` on, up to the first that does not start with it: a range
            // of the primary key, read in order.
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT key, {ROW_COLUMNS} FROM fenced_locks WHERE key >= ?1 ORDER BY key"
            ))?;
            let mut rows = stmt.query([prefix.as_str()])?;
            let mut held = Vec::new();
            while let Some(r) = rows.next()? {
                let name: String = r.get(0)?;
                if !name.starts_with(prefix.as_str()) {
                    break;
                }
                let Ok(key) = Key::new(&name) else {
                    debug!(key = %name.escape_debug(), "fenced: skipping a row whose key is not a valid key");
                    continue;
                };
                if let Some(mut info) = Row::from_sql(r, 1)?.live_info(ctx) {
                    info.key = Some(key);
                    held.push(info);
                }
            }
            Ok(held)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::token::OwnerId;

    const LEASE: Duration = Duration::from_secs(30);

    async fn open(dir: &tempfile::TempDir) -> SqliteBackend {
        SqliteBackend::open(dir.path().join("locks.db"))
            .await
            .unwrap()
    }

    fn raw(backend: &SqliteBackend) -> Connection {
        let conn = Connection::open(backend.path()).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn
    }

    fn key(k: &str) -> Key {
        Key::new(k).unwrap()
    }

    async fn acquire(b: &SqliteBackend, k: &Key, owner: &OwnerId, lease: Duration) -> Acquired {
        b.acquire(&AcquireRequest::new(k, owner, lease, "test"))
            .await
            .unwrap()
    }

    fn granted(reply: Acquired) -> FencingToken {
        match reply {
            Acquired::Granted(g) => g.token,
            Acquired::Held(h) => panic!("expected a grant, the lock is {h}"),
        }
    }

    fn held(reply: Acquired) -> HolderInfo {
        match reply {
            Acquired::Held(h) => h,
            Acquired::Granted(g) => panic!("expected Held, got {g:?}"),
        }
    }

    #[tokio::test]
    async fn acquire_extend_release_are_owner_checked() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&dir).await;
        let k = key("order:42");
        let (a, other) = (OwnerId::random(), OwnerId::random());

        let t1 = granted(acquire(&b, &k, &a, LEASE).await);
        // The same owner again (a retried request): same token, lease refreshed.
        assert_eq!(granted(acquire(&b, &k, &a, LEASE).await), t1);
        let h = held(acquire(&b, &k, &other, LEASE).await);
        assert_eq!(h.owner, Some(a));
        assert_eq!(h.token, Some(t1));
        assert_eq!(h.label.as_deref(), Some("test"));
        let remaining = h.remaining.unwrap();
        assert!(remaining <= LEASE && remaining > LEASE - Duration::from_secs(5));

        let theirs = LockRef::new(&k, &other);
        let mine = LockRef::new(&k, &a);
        match b.extend(&theirs, LEASE).await.unwrap() {
            Confirm::NotHeld(Some(h)) => assert_eq!(h.owner, Some(a)),
            c => panic!("{c:?}"),
        }
        match b.release(&theirs).await.unwrap() {
            Confirm::NotHeld(Some(h)) => assert_eq!(h.token, Some(t1)),
            c => panic!("{c:?}"),
        }
        assert_eq!(b.extend(&mine, LEASE).await.unwrap(), Confirm::Done);
        assert_eq!(b.holder(&k).await.unwrap().unwrap().owner, Some(a));
        assert_eq!(b.release(&mine).await.unwrap(), Confirm::Done);
        assert_eq!(b.release(&mine).await.unwrap(), Confirm::NotHeld(None));
        assert_eq!(
            b.extend(&mine, LEASE).await.unwrap(),
            Confirm::NotHeld(None)
        );
        assert_eq!(b.holder(&k).await.unwrap(), None);

        // Released rows are deleted.
        let rows: i64 = raw(&b)
            .query_row("SELECT count(*) FROM fenced_locks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);

        let t2 = granted(acquire(&b, &k, &other, LEASE).await);
        assert!(t2 > t1);
        let broken = b.force_release(&k).await.unwrap().unwrap();
        assert_eq!(broken.owner, Some(other));
        assert_eq!(broken.token, Some(t2));
        assert_eq!(b.force_release(&k).await.unwrap(), None);
    }

    #[tokio::test]
    async fn leases_expire() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&dir).await;
        let k = key("short");
        let (a, other) = (OwnerId::random(), OwnerId::random());
        let t1 = granted(acquire(&b, &k, &a, Duration::from_millis(100)).await);
        assert!(
            held(acquire(&b, &k, &other, LEASE).await)
                .remaining
                .unwrap()
                <= Duration::from_millis(100)
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(b.holder(&k).await.unwrap(), None);
        assert_eq!(
            b.extend(&LockRef::new(&k, &a), LEASE).await.unwrap(),
            Confirm::NotHeld(None)
        );
        // An expired lock re-acquired by its old owner gets a new token.
        let t2 = granted(acquire(&b, &k, &a, LEASE).await);
        assert!(t2 > t1);
    }

    #[tokio::test]
    async fn tokens_never_go_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let mut last = FencingToken::new(0);
        for round in 0..3 {
            let b = open(&dir).await;
            for i in 0..5 {
                let k = key(&format!("key-{}", i % 2));
                let owner = OwnerId::random();
                let t = granted(acquire(&b, &k, &owner, LEASE).await);
                assert!(t > last, "round {round}: {t} after {last}");
                last = t;
                assert_eq!(
                    b.release(&LockRef::new(&k, &owner)).await.unwrap(),
                    Confirm::Done
                );
            }
            let rows: i64 = raw(&b)
                .query_row("SELECT count(*) FROM fenced_locks", [], |r| r.get(0))
                .unwrap();
            assert_eq!(rows, 0, "all rows deleted");
            drop(b); // closed; the next round reopens the file
        }
        assert_eq!(last.get(), 15);
    }

    #[tokio::test]
    async fn rows_of_another_boot_have_expired() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&dir).await;
        let k = key("boot");
        let (a, other) = (OwnerId::random(), OwnerId::random());
        let t1 = granted(acquire(&b, &k, &a, LEASE).await);
        raw(&b)
            .execute(
                "UPDATE fenced_locks SET clock = 'boot:00000000-0000-0000-0000-000000000000/time:[1]', \
                 expires_ms = 9223372036854775000, wall_expires_ms = 9223372036854775000",
                [],
            )
            .unwrap();
        if liveness::now().clock.starts_with("boot:") {
            assert_eq!(b.holder(&k).await.unwrap(), None);
            assert!(granted(acquire(&b, &k, &other, LEASE).await) > t1);
        } else {
            // Without a boot id, the wall-clock expiry decides.
            held(acquire(&b, &k, &other, LEASE).await);
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn locks_of_exited_processes_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&dir).await;
        let k = key("crash");
        let (a, other) = (OwnerId::random(), OwnerId::random());
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let mark = liveness::mark_of(child.id()).unwrap();
        granted(acquire(&b, &k, &a, LEASE).await);
        let fake_holder = |mark: &ProcessMark| {
            raw(&b)
                .execute(
                    "UPDATE fenced_locks SET pid = ?1, pid_start = ?2, pid_ns = ?3",
                    params![mark.pid, mark.start, mark.pid_ns],
                )
                .unwrap();
        };
        fake_holder(&mark);
        // Alive: the lease decides.
        held(acquire(&b, &k, &other, LEASE).await);
        // Another pid namespace (a container sharing the file): never judged from here.
        fake_holder(&ProcessMark {
            pid_ns: "pid:[1]".into(),
            ..mark.clone()
        });
        child.kill().unwrap();
        // SIGKILL is delivered asynchronously: wait until the child is a zombie (not reaped).
        let stat = format!("/proc/{}/stat", child.id());
        let zombie = || {
            std::fs::read_to_string(&stat)
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                })
                .unwrap_or(false)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !zombie() {
            assert!(
                std::time::Instant::now() < deadline,
                "the killed child never became a zombie"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        held(acquire(&b, &k, &other, LEASE).await);
        // Same namespace, the process exited (a zombie until reaped): taken at once.
        fake_holder(&mark);
        assert_eq!(b.holder(&k).await.unwrap(), None);
        // Granted although the holder's 30 s lease still runs: only the liveness check frees it.
        let t = granted(acquire(&b, &k, &other, LEASE).await);
        assert!(t.get() > 0);
        child.wait().unwrap();

        // A pid now used by another process (a different start time) also counts as gone.
        b.force_release(&k).await.unwrap().unwrap();
        granted(acquire(&b, &k, &a, LEASE).await);
        let me = liveness::this_process().unwrap();
        fake_holder(&ProcessMark {
            start: me.start - 1,
            ..me.clone()
        });
        granted(acquire(&b, &k, &other, LEASE).await);

        // A live holder in this process keeps its lock.
        fake_holder(&me);
        held(acquire(&b, &k, &a, LEASE).await);
    }

    #[tokio::test]
    async fn release_on_exit_false_records_no_process() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}/locks.db?release_on_exit=false&busy_timeout=1s",
            dir.path().display()
        );
        let b = SqliteBackend::connect(&url).await.unwrap();
        granted(acquire(&b, &key("cli"), &OwnerId::random(), LEASE).await);
        let pid: Option<i64> = raw(&b)
            .query_row("SELECT pid FROM fenced_locks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(pid, None);
        let b = open(&dir).await;
        granted(acquire(&b, &key("lib"), &OwnerId::random(), LEASE).await);
        let pid: Option<i64> = raw(&b)
            .query_row("SELECT pid FROM fenced_locks WHERE key = 'lib'", [], |r| {
                r.get(0)
            })
            .unwrap();
        #[cfg(target_os = "linux")]
        assert_eq!(pid, Some(i64::from(std::process::id())));
        #[cfg(not(target_os = "linux"))]
        assert_eq!(pid, None);
    }

    #[tokio::test]
    async fn keys_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&dir).await;
        let owner = OwnerId::random();
        for k in [
            "{weird}/key with spaces:ü",
            "it's \"quoted\"; DROP TABLE fenced_locks; --",
            "%_",
        ] {
            let k = key(k);
            granted(acquire(&b, &k, &owner, LEASE).await);
            assert_eq!(b.holder(&k).await.unwrap().unwrap().owner, Some(owner));
        }
        assert_eq!(b.holder(&key("%")).await.unwrap(), None);
        assert_eq!(b.holder(&key("_")).await.unwrap(), None);
    }

    #[tokio::test]
    async fn expired_rows_are_swept_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&dir).await;
        for i in 0..3 {
            granted(
                acquire(
                    &b,
                    &key(&format!("k{i}")),
                    &OwnerId::random(),
                    Duration::from_millis(100),
                )
                .await,
            );
        }
        granted(acquire(&b, &key("kept"), &OwnerId::random(), LEASE).await);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let b = open(&dir).await;
        let keys: Vec<String> = raw(&b)
            .prepare("SELECT key FROM fenced_locks")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(keys, ["kept"]);
    }

    #[tokio::test]
    async fn bad_files_are_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let expect = |e: Error, needle: &str| {
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
            assert!(e.to_string().contains(needle), "{needle:?} not in: {e}");
        };

        // A directory.
        let e = SqliteBackend::open(dir.path()).await.unwrap_err();
        expect(e, "is a directory");

        // A parent that cannot be created.
        std::fs::write(dir.path().join("plain"), "x").unwrap();
        let e = SqliteBackend::open(dir.path().join("plain/locks.db"))
            .await
            .unwrap_err();
        expect(e, "cannot create the directory");

        // Not a database.
        let junk = dir.path().join("junk.db");
        std::fs::write(
            &junk,
            "this is a text file, certainly not an SQLite database ".repeat(20),
        )
        .unwrap();
        let e = SqliteBackend::open(&junk).await.unwrap_err();
        expect(e, "is not an SQLite database");

        // Another application's database is left untouched.
        let foreign = dir.path().join("app.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY)")
            .unwrap();
        let e = SqliteBackend::open(&foreign).await.unwrap_err();
        expect(e, "another application");
        let mode: String = Connection::open(&foreign)
            .unwrap()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");

        // A newer schema.
        let b = open(&dir).await;
        raw(&b).pragma_update(None, "user_version", 99).unwrap();
        let e = SqliteBackend::open(b.path()).await.unwrap_err();
        expect(e, "newer version of fenced");
    }

    /// Many processes creating the same new lock file at once all succeed (none mistakes a
    /// file another one is initializing for a foreign database).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_opens_agree() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("locks.db");
            let opens: Vec<_> = (0..8)
                .map(|_| {
                    let path = path.clone();
                    tokio::spawn(async move { SqliteBackend::open(&path).await })
                })
                .collect();
            for open in opens {
                open.await.unwrap().expect("a concurrent first open failed");
            }
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn read_only_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        if rustix::process::geteuid().is_root() {
            // File permissions do not stop root: run this very test again as `nobody`.
            let exe = std::env::current_exe().unwrap();
            let out = std::process::Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&exe)
                .args([
                    "--exact",
                    "backends::sqlite::tests::read_only_files_are_refused",
                ])
                .output()
                .expect("setpriv (util-linux) runs the test unprivileged");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("1 passed"),
                "unprivileged run failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = open(&dir).await.path().to_owned();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = SqliteBackend::open(&path).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
        assert!(e.to_string().contains("writable"), "{e}");
    }

    #[tokio::test]
    async fn a_busy_file_is_a_transient_error() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}/locks.db?busy_timeout=100ms",
            dir.path().display()
        );
        let b = SqliteBackend::connect(&url).await.unwrap();
        let blocker = raw(&b);
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let e = b
            .acquire(&AcquireRequest::new(
                &key("k"),
                &OwnerId::random(),
                LEASE,
                "t",
            ))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(e.is_transient(), "{e}");
        assert!(e.to_string().contains("busy_timeout"), "{e}");
        blocker.execute_batch("ROLLBACK").unwrap();
        granted(acquire(&b, &key("k"), &OwnerId::random(), LEASE).await);
    }

    async fn changed_within(watch: &mut Box<dyn Watch>, limit: Duration) -> bool {
        tokio::time::timeout(limit, watch.changed()).await.is_ok()
    }

    #[tokio::test]
    async fn waiters_wake_on_release_not_on_renewal() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&dir).await;
        let k = key("watched");
        let a = OwnerId::random();
        granted(acquire(&b, &k, &a, LEASE).await);
        let mut watch = b.watch(&k).await.unwrap();
        assert!(!changed_within(&mut watch, Duration::from_millis(100)).await);
        // Renewals and other keys change the file but not this key's holder.
        assert_eq!(
            b.extend(&LockRef::new(&k, &a), LEASE).await.unwrap(),
            Confirm::Done
        );
        granted(acquire(&b, &key("other"), &a, LEASE).await);
        assert!(!changed_within(&mut watch, Duration::from_millis(150)).await);
        // A release in this process wakes the watch (the guard is far shorter than the 30 s
        // lease, so the wake-up came from the release).
        assert_eq!(
            b.release(&LockRef::new(&k, &a)).await.unwrap(),
            Confirm::Done
        );
        assert!(changed_within(&mut watch, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn a_release_before_waiting_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&dir).await;
        let k = key("early");
        let a = OwnerId::random();
        granted(acquire(&b, &k, &a, LEASE).await);
        let mut watch = b.watch(&k).await.unwrap();
        b.release(&LockRef::new(&k, &a)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(changed_within(&mut watch, Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn waiters_wake_on_changes_by_other_connections() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&dir).await;
        let k = key("elsewhere");
        granted(acquire(&b, &k, &OwnerId::random(), LEASE).await);
        let mut watch = b.watch(&k).await.unwrap();
        // Let the poller slow down to its idle interval first.
        assert!(!changed_within(&mut watch, Duration::from_millis(300)).await);
        // A write by a connection this process's backends know nothing about, as another
        // process would make it.
        // The guard is far shorter than the 30 s lease, so the wake-up came from the change.
        raw(&b).execute("DELETE FROM fenced_locks", []).unwrap();
        assert!(changed_within(&mut watch, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn a_grant_and_release_between_two_polls_wakes_waiters() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&dir).await;
        let k = key("blink");
        // The key is free when the watch is created (the holder the waiter saw is gone)...
        let mut watch = b.watch(&k).await.unwrap();
        // ...then another process takes it and releases it again, all between two polls.
        raw(&b)
            .execute_batch(
                "BEGIN IMMEDIATE;
                 INSERT INTO fenced_locks (key, owner, token, label, lease_ms, clock, expires_ms, wall_expires_ms)
                 VALUES ('blink', 'x', 99, 'l', 1000, 'wall', 0, 0);
                 DELETE FROM fenced_locks WHERE key = 'blink';
                 UPDATE fenced_meta SET releases = releases + 1;
                 COMMIT;",
            )
            .unwrap();
        assert!(changed_within(&mut watch, Duration::from_secs(1)).await);
        // A grant alone does not wake: the waiter waits for that holder's release.
        granted(acquire(&b, &k, &OwnerId::random(), LEASE).await);
        assert!(!changed_within(&mut watch, Duration::from_millis(200)).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn clients_on_one_file_exclude_each_other() {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let dir = tempfile::tempdir().unwrap();
        // Two backends: two connections, as two processes would have.
        let clients = [
            crate::Client::new(open(&dir).await),
            crate::Client::new(open(&dir).await),
        ];
        let inside = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..8 {
            let client = clients[i % 2].clone();
            let (inside, last) = (inside.clone(), last.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    let guard = client.lock("shared").await.unwrap();
                    assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                    let token = guard.token().get();
                    assert!(
                        token > last.swap(token, Ordering::SeqCst),
                        "token went backwards"
                    );
                    tokio::task::yield_now().await;
                    inside.store(false, Ordering::SeqCst);
                    guard.release().await.unwrap();
                }
            }));
        }
        let started = Instant::now();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(last.load(Ordering::SeqCst), 80);
        // Waiters were woken by releases, not by lease ends (30 s).
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    /// The schema of version 1, exactly as fenced 0.1 wrote it.
    const SCHEMA_V1: &str = "
        CREATE TABLE IF NOT EXISTS fenced_meta (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            last_token INTEGER NOT NULL CHECK (last_token >= 0),
            releases INTEGER NOT NULL
        );
        INSERT OR IGNORE INTO fenced_meta (id, last_token, releases) VALUES (1, 0, 0);
        CREATE TABLE IF NOT EXISTS fenced_locks (
            key TEXT PRIMARY KEY NOT NULL,
            owner TEXT NOT NULL,
            token INTEGER NOT NULL,
            label TEXT NOT NULL,
            lease_ms INTEGER NOT NULL,
            clock TEXT NOT NULL,
            expires_ms INTEGER NOT NULL,
            wall_expires_ms INTEGER NOT NULL,
            pid INTEGER,
            pid_start INTEGER,
            pid_ns TEXT
        ) WITHOUT ROWID;
    ";

    fn user_version(conn: &Connection) -> i32 {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn version_1_files_are_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let old_owner = OwnerId::random();
        // A file as fenced 0.1 left it: WAL mode, schema 1, a live lock, 41 tokens issued. Its
        // connection stays open, as a program of the old version would keep it.
        let old = Connection::open(&path).unwrap();
        let _: String = old
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .unwrap();
        old.execute_batch(SCHEMA_V1).unwrap();
        old.pragma_update(None, "application_id", APPLICATION_ID)
            .unwrap();
        old.pragma_update(None, "user_version", 1).unwrap();
        // The statement fenced 0.1 grants with.
        const V1_INSERT: &str = "INSERT OR REPLACE INTO fenced_locks
             (key, owner, token, label, lease_ms, clock, expires_ms, wall_expires_ms, pid, pid_start, pid_ns)
             VALUES (?1, ?2, ?3, 'written by 0.1', 60000, ?4, ?5, ?6, NULL, NULL, NULL)";
        let v1_grant = |key: &str, token: i64| {
            let now = liveness::now();
            old.prepare_cached(V1_INSERT)
                .unwrap()
                .execute(params![
                    key,
                    old_owner.to_string(),
                    token,
                    now.clock,
                    now.ms + 60_000,
                    now.wall_ms + 60_000
                ])
                .unwrap();
        };
        v1_grant("old", 41);
        old.execute("UPDATE fenced_meta SET last_token = 41", [])
            .unwrap();

        let b = SqliteBackend::open(&path).await.unwrap();
        let conn = raw(&b);
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
        let columns: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('fenced_locks')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(columns.iter().any(|c| c == "granted_ms"), "{columns:?}");
        assert!(
            columns.iter().any(|c| c == "wall_granted_ms"),
            "{columns:?}"
        );

        // The old lock is kept, still held, with an unknown age.
        let old = b.holder(&key("old")).await.unwrap().unwrap();
        assert_eq!(old.owner, Some(old_owner));
        assert_eq!(old.token, Some(FencingToken::new(41)));
        assert_eq!(old.age, None);
        held(acquire(&b, &key("old"), &OwnerId::random(), LEASE).await);
        // Renewing it keeps the age unknown rather than inventing one.
        assert_eq!(
            b.extend(&LockRef::new(&key("old"), &old_owner), LEASE)
                .await
                .unwrap(),
            Confirm::Done
        );
        assert_eq!(b.holder(&key("old")).await.unwrap().unwrap().age, None);
        // The token counter goes on; new grants have an age.
        let t = granted(acquire(&b, &key("new"), &OwnerId::random(), LEASE).await);
        assert_eq!(t, FencingToken::new(42));
        // The old program, still running, goes on writing rows of its own kind.
        v1_grant("older", 43);
        let listed = b.list("").await.unwrap();
        let ages: Vec<(&str, bool)> = listed
            .iter()
            .map(|i| (i.key.as_ref().unwrap().as_str(), i.age.is_some()))
            .collect();
        assert_eq!(ages, [("new", true), ("old", false), ("older", false)]);
        drop(old);
        drop(b);

        // Opening the migrated file again changes nothing.
        let b = SqliteBackend::open(&path).await.unwrap();
        assert_eq!(user_version(&raw(&b)), SCHEMA_VERSION);
        assert_eq!(b.list("").await.unwrap().len(), 3);

        // New files are created at the current version directly.
        let fresh = open(&dir).await;
        assert_eq!(user_version(&raw(&fresh)), SCHEMA_VERSION);

        // A file of a newer schema is still refused, and left as it is.
        raw(&b)
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let e = SqliteBackend::open(&path).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
        assert!(e.to_string().contains("newer version of fenced"), "{e}");
        assert_eq!(user_version(&raw(&b)), SCHEMA_VERSION + 1);
    }

    #[tokio::test]
    async fn age_counts_from_the_grant_by_the_expiry_clock() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&dir).await;
        let (k, a) = (key("aged"), OwnerId::random());
        let before = Instant::now();
        granted(acquire(&b, &k, &a, LEASE).await);
        let age = b.holder(&k).await.unwrap().unwrap().age.unwrap();
        // Rounded so that it never exceeds the real age.
        assert!(age <= before.elapsed(), "{age:?}");

        // Pretend the grant was 5 s ago; a renewal and a retried acquire keep the grant time.
        raw(&b)
            .execute(
                "UPDATE fenced_locks SET granted_ms = granted_ms - 5000, wall_granted_ms = wall_granted_ms - 5000",
                [],
            )
            .unwrap();
        assert_eq!(
            b.extend(&LockRef::new(&k, &a), LEASE).await.unwrap(),
            Confirm::Done
        );
        granted(acquire(&b, &k, &a, LEASE).await);
        let age = b.holder(&k).await.unwrap().unwrap().age.unwrap();
        // Both ends are read in whole milliseconds: at most 2 ms short of the real age.
        assert!(
            age + Duration::from_millis(2) >= Duration::from_secs(5),
            "{age:?}"
        );
        assert!(age <= Duration::from_secs(5) + before.elapsed(), "{age:?}");

        // A row written in another clock (another time namespace, or a system without a boot
        // clock) is aged by the wall clock, like its expiry; renewing it from here carries the
        // grant time over into this process's clock.
        let in_wall = Instant::now();
        let now = liveness::now();
        let (_, wall_granted) = super::grant_time(&now);
        raw(&b)
            .execute(
                "UPDATE fenced_locks SET clock = 'wall', expires_ms = ?1, wall_expires_ms = ?1,
                 granted_ms = -123456789, wall_granted_ms = ?2",
                params![now.wall_ms + 60_000, wall_granted - 7_000],
            )
            .unwrap();
        let age = b.holder(&k).await.unwrap().unwrap().age.unwrap();
        assert!(
            age + Duration::from_millis(2) >= Duration::from_secs(7),
            "{age:?}"
        );
        assert!(age <= Duration::from_secs(7) + in_wall.elapsed(), "{age:?}");
        assert_eq!(
            b.extend(&LockRef::new(&k, &a), LEASE).await.unwrap(),
            Confirm::Done
        );
        let info = b.holder(&k).await.unwrap().unwrap();
        let age = info.age.unwrap();
        // Wall and boot clock readings differ by up to a millisecond of rounding each.
        assert!(
            age + Duration::from_millis(2) >= Duration::from_secs(7),
            "{age:?}"
        );
        assert!(
            age <= Duration::from_secs(7) + in_wall.elapsed() + Duration::from_millis(2),
            "{age:?}"
        );
        assert_eq!(info.waiters, None, "the file does not know its waiters");

        // The holder that other owners see carries the age too.
        let seen = held(acquire(&b, &k, &OwnerId::random(), LEASE).await);
        assert!(seen.age.unwrap() >= age);
        let broken = b.force_release(&k).await.unwrap().unwrap();
        assert!(broken.age.unwrap() >= age);
    }

    #[tokio::test]
    async fn list_reads_the_held_keys_under_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}/locks.db?busy_timeout=100ms",
            dir.path().display()
        );
        let b = SqliteBackend::connect(&url).await.unwrap();
        let owner = OwnerId::random();
        // `%` and `_` would be wildcards of LIKE; U+10FFFF sorts after every other character.
        for k in ["a", "a\u{10FFFF}", "a%", "a_", "ab", "b", "A", "`"] {
            granted(acquire(&b, &key(k), &owner, LEASE).await);
        }
        granted(acquire(&b, &key("a-short"), &owner, Duration::from_millis(50)).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let keys = |listed: Vec<HolderInfo>| -> Vec<String> {
            listed
                .into_iter()
                .map(|i| i.key.unwrap().as_str().to_owned())
                .collect()
        };
        // The expired lock is not listed; the order is the keys' byte order.
        assert_eq!(
            keys(b.list("a").await.unwrap()),
            ["a", "a%", "a_", "ab", "a\u{10FFFF}"]
        );
        assert_eq!(keys(b.list("a%").await.unwrap()), ["a%"]);
        assert_eq!(keys(b.list("a\u{10FFFF}").await.unwrap()), ["a\u{10FFFF}"]);
        assert_eq!(keys(b.list("").await.unwrap()).len(), 8);
        assert!(b.list("c").await.unwrap().is_empty());

        // A read: it does not wait for another connection's write transaction.
        let blocker = raw(&b);
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert_eq!(b.list("b").await.unwrap().len(), 1);
        blocker.execute_batch("ROLLBACK").unwrap();

        // Locks of exited holders are not listed either.
        #[cfg(target_os = "linux")]
        {
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let mark = liveness::mark_of(child.id());
            child.wait().unwrap();
            if let Some(mark) = mark {
                raw(&b)
                    .execute(
                        "UPDATE fenced_locks SET pid = ?1, pid_start = ?2, pid_ns = ?3 WHERE key = 'b'",
                        params![mark.pid, mark.start, mark.pid_ns],
                    )
                    .unwrap();
                assert!(b.list("b").await.unwrap().is_empty());
            }
        }
    }

    #[tokio::test]
    async fn connect_by_url() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub dir").join("locks.db");
        let encoded = format!("sqlite://{}", path.display()).replace(' ', "%20");
        let client = crate::connect(&encoded).await.unwrap();
        assert_eq!(client.backend().name(), "sqlite");
        assert_eq!(client.capabilities().safety, Safety::SingleMachine);
        let guard = client.lock("job").await.unwrap();
        assert!(path.exists());
        let second = crate::connect(&encoded).await.unwrap();
        let e = second
            .lock_with(
                "job",
                &crate::LockOptions::new().wait(Duration::from_millis(50)),
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAcquired);
        guard.release().await.unwrap();
        assert!(second.try_lock("job").await.unwrap().is_some());
    }
}
