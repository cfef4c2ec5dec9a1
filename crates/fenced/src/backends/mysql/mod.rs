#![doc = include_str!("README.md")]

mod config;
mod session;
mod wait;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use mysql_async::prelude::{FromRow, Queryable};
use mysql_async::{Conn, FromRowError, Pool, PoolConstraints, PoolOpts, TxOpts};
use tokio::time::Instant;

use crate::backend::{
    AcquireRequest, Acquired, Backend, Binding, Capabilities, Confirm, Grant, HolderInfo, LockRef,
    Mode, Safety, SessionState, Watch,
};
use crate::backends::sql::{SqlMode, key_hash};
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::key::Key;
use crate::token::{FencingToken, OwnerId};
use crate::url::ensure_crypto_provider;

use config::MysqlConfig;
use session::{Dedicated, Request};
use wait::BellWatch;

/// Opens the backend named by `url` (called by [`connect`](crate::connect)).
pub(crate) async fn open(url: &url::Url) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(MysqlBackend::from_url(url).await?))
}

/// The MySQL / MariaDB backend (`mysql://`, `mariadb://`). Cheap to clone; clones share one
/// connection pool and one dedicated connection.
///
/// Usually built through [`connect`](crate::connect); see the [module docs](self) for the URL
/// parameters, the table and what this backend does and does not guarantee.
///
/// ```no_run
/// # async fn demo() -> fenced::Result<()> {
/// use fenced::backends::mysql::MysqlBackend;
/// let backend = MysqlBackend::connect("mysql://app:secret@db.internal:3306/app").await?;
/// let client = fenced::Client::new(backend);
/// let guard = client.lock("invoice:17").await?;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MysqlBackend {
    inner: Arc<Inner>,
}

struct Inner {
    context: Arc<Context>,
    /// Lease mode: bells; session mode: every lock operation.
    dedicated: Dedicated,
    wakeups: Arc<AtomicU64>,
}

/// The configuration, the pool and the error mapping, shared with the tasks.
pub(crate) struct Context {
    pub(crate) config: MysqlConfig,
    pool: Pool,
}

impl fmt::Debug for MysqlBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlBackend")
            .field("config", &self.inner.context.config)
            .finish()
    }
}

/// The `GET_LOCK` name of `key`'s bell (see the module docs): `fenced-bell:` and the same hash
/// as the session lock name, 28 characters.
pub(crate) fn bell_name(config: &MysqlConfig, key: &Key) -> String {
    format!(
        "fenced-bell:{:016x}",
        key_hash(
            &format!("{}.{}", config.database, config.params.table),
            key.as_str()
        )
    )
}

/// A lease in whole microseconds (at least 1).
pub(crate) fn micros(lease: Duration) -> u64 {
    u64::try_from(lease.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// The columns every read of a lock row selects (see [`Row`]).
const COLUMNS: &str = "lock_key, owner, token, label, session_id, expires_at > UTC_TIMESTAMP(6), \
     TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at), \
     TIMESTAMPDIFF(MICROSECOND, granted_at, UTC_TIMESTAMP(6))";

pub(crate) fn select_for_update(table: &str) -> String {
    format!("SELECT {COLUMNS} FROM `{table}` WHERE lock_key = ? FOR UPDATE")
}

pub(crate) fn select_holder(table: &str) -> String {
    format!("SELECT {COLUMNS} FROM `{table}` WHERE lock_key = ?")
}

/// One lock row as read with [`COLUMNS`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Row {
    key: Vec<u8>,
    owner: Option<String>,
    token: i64,
    label: Option<Vec<u8>>,
    session_id: Option<u64>,
    unexpired: Option<i64>,
    remaining_us: Option<i64>,
    age_us: Option<i64>,
}

impl Row {
    /// Held: an owner and an unexpired lease.
    pub(crate) fn live(&self) -> bool {
        self.owner.is_some() && self.unexpired == Some(1)
    }
}

impl FromRow for Row {
    fn from_row_opt(row: mysql_async::Row) -> std::result::Result<Self, FromRowError> {
        type Cols = (
            Vec<u8>,
            Option<String>,
            i64,
            Option<Vec<u8>>,
            Option<u64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
        );
        let (key, owner, token, label, session_id, unexpired, remaining_us, age_us) =
            Cols::from_row_opt(row)?;
        Ok(Row {
            key,
            owner,
            token,
            label,
            session_id,
            unexpired,
            remaining_us,
            age_us,
        })
    }
}

/// What a lock row says about its holder.
pub(crate) fn info_of(row: &Row) -> HolderInfo {
    let mut info = HolderInfo::new();
    info.owner = row.owner.as_deref().and_then(|o| o.parse().ok());
    info.token = u64::try_from(row.token)
        .ok()
        .filter(|t| *t > 0)
        .map(FencingToken::new);
    info.label = row
        .label
        .as_ref()
        .map(|l| String::from_utf8_lossy(l).into_owned());
    info.remaining = row
        .remaining_us
        .filter(|us| *us > 0)
        .map(|us| Duration::from_micros(us.unsigned_abs()));
    info.age = row
        .age_us
        .map(|us| Duration::from_micros(us.max(0).unsigned_abs()));
    info.key = std::str::from_utf8(&row.key)
        .ok()
        .and_then(|k| Key::new(k).ok());
    info
}

impl MysqlBackend {
    /// Connects to the database named by `url` (`mysql://user:password@host:3306/database`, see
    /// the [module docs](self) for the parameters), creates the lock table if it is missing and
    /// opens the dedicated connection.
    ///
    /// Connecting is eager: an unreachable server, a wrong password, a missing database or a user
    /// that may not create the table fails here, with a message that says what to do (and never
    /// shows the password).
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::mysql::MysqlBackend::connect(
    ///     "mysql://app:secret@db.internal/app?mode=session&session_timeout=20s",
    /// )
    /// .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future closes whatever it opened; no lock is taken by
    /// connecting (the table may have been created).
    pub async fn connect(url: &str) -> Result<MysqlBackend> {
        let parsed = crate::url::parse(url)?;
        MysqlBackend::from_url(&parsed).await
    }

    pub(crate) async fn from_url(url: &url::Url) -> Result<MysqlBackend> {
        let config = MysqlConfig::from_url(url)?;
        if config.tls {
            ensure_crypto_provider();
        }
        let pool_opts = PoolOpts::default()
            .with_constraints(PoolConstraints::new(0, 32).unwrap_or_default())
            .with_inactive_connection_ttl(Duration::from_secs(60))
            .with_reset_connection(false);
        let opts = mysql_async::OptsBuilder::from_opts(config.opts()).pool_opts(pool_opts);
        let pool = Pool::new(opts);
        let context = Arc::new(Context { config, pool });
        context.ensure_table().await?;
        let session = context.config.params.mode == SqlMode::Session;
        let (conn, id) = context.open_dedicated(Operation::Connect, session).await?;
        let dedicated = Dedicated::start(context.clone(), conn, id, session);
        Ok(MysqlBackend {
            inner: Arc::new(Inner {
                context,
                dedicated,
                wakeups: Arc::default(),
            }),
        })
    }

    /// The SQL that creates the lock table `table` (what the backend runs on first use, with
    /// `IF NOT EXISTS`): for a manual migration when the application's database user may not
    /// create tables.
    ///
    /// ```
    /// use fenced::backends::mysql::MysqlBackend;
    /// let sql = MysqlBackend::schema_sql("fenced_locks");
    /// assert!(sql.starts_with("CREATE TABLE IF NOT EXISTS `fenced_locks`"));
    /// assert!(sql.contains("lock_key VARBINARY(512) NOT NULL PRIMARY KEY"));
    /// ```
    pub fn schema_sql(table: &str) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS `{table}` (\n  \
             lock_key VARBINARY(512) NOT NULL PRIMARY KEY,\n  \
             owner CHAR(32) CHARACTER SET ascii NULL,\n  \
             token BIGINT NOT NULL DEFAULT 0,\n  \
             label VARBINARY(1024) NULL,\n  \
             session_id BIGINT UNSIGNED NULL,\n  \
             expires_at DATETIME(6) NULL,\n  \
             granted_at DATETIME(6) NULL\n\
             ) ENGINE=InnoDB"
        )
    }

    /// The lock table (the `table` URL parameter, default `fenced_locks`).
    pub fn table(&self) -> &str {
        &self.inner.context.config.params.table
    }

    /// The mode (the `mode` URL parameter).
    pub fn mode(&self) -> SqlMode {
        self.inner.context.config.params.mode
    }

    /// The session lock name (`GET_LOCK`, session mode) of `key`:
    /// [`sql::lock_name`](crate::backends::sql::lock_name) of this database and table.
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::mysql::MysqlBackend::connect("mysql://app:pw@db/app").await?;
    /// assert_eq!(backend.lock_name(&fenced::Key::new("order:42")?).len(), 23);
    /// # Ok(()) }
    /// ```
    pub fn lock_name(&self, key: &Key) -> String {
        let config = &self.inner.context.config;
        crate::backends::sql::lock_name(&config.database, &config.params.table, key)
    }

    /// The bell name (`GET_LOCK`) of `key`, held by its holder while it holds the lock so that
    /// waiters wake on release (see the module docs).
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::mysql::MysqlBackend::connect("mysql://app:pw@db/app").await?;
    /// assert!(backend.bell_name(&fenced::Key::new("order:42")?).starts_with("fenced-bell:"));
    /// # Ok(()) }
    /// ```
    pub fn bell_name(&self, key: &Key) -> String {
        bell_name(&self.inner.context.config, key)
    }

    /// The `CONNECTION_ID()` of the backend's dedicated connection (in session mode, the
    /// `session_id` its rows carry). For operators and tests, e.g. to `KILL` it.
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::mysql::MysqlBackend::connect("mysql://app:pw@db/app?mode=session").await?;
    /// println!("KILL {}", backend.connection_id());
    /// # Ok(()) }
    /// ```
    pub fn connection_id(&self) -> u64 {
        self.inner.dedicated.connection_id()
    }

    /// How many wake-ups this backend's watches have reported so far (a release wakes each
    /// client waiting on the key once; nothing runs while they wait).
    pub fn wakeups(&self) -> u64 {
        self.inner.wakeups.load(Ordering::Relaxed)
    }

    /// Runs `op` on a pooled connection in its own task, so that a caller that stops waiting
    /// never cuts a transaction short (it finishes, or is rolled back by the timeout).
    async fn pooled<T: Send + 'static>(
        &self,
        operation: Operation,
        op: impl for<'c> FnOnce(
            &'c mut Conn,
            Arc<Inner>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = mysql_async::Result<T>> + Send + 'c>,
        > + Send
        + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            let context = inner.context.clone();
            let work = async {
                let mut conn = context.pool.get_conn().await?;
                op(&mut conn, inner).await
            };
            match tokio::time::timeout(context.config.params.timeout, work).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) => Err(context.error(operation, &e)),
                Err(_) => Err(context.timed_out(operation)),
            }
        });
        task.await.unwrap_or_else(|e| {
            Err(Error::new(
                ErrorKind::Backend,
                operation,
                format!("a MySQL task failed: {e}"),
            ))
        })
    }

    /// Lease mode: one acquisition, in a transaction holding the row lock.
    async fn acquire_lease(&self, request: &AcquireRequest<'_>) -> Result<Acquired> {
        let (key, owner, lease) = (request.key.clone(), *request.owner, request.lease);
        let label = request.label.to_owned();
        let sent = Instant::now();
        let token = self
            .pooled(Operation::Acquire, move |c, inner| {
                Box::pin(async move {
                    let table = &inner.context.config.params.table;
                    let k = key.as_str().as_bytes().to_vec();
                    let o = owner.to_string();
                    let us = micros(lease);
                    let mut tx = c.start_transaction(TxOpts::default()).await?;
                    tx.exec_drop(
                        format!(
                            "INSERT INTO `{table}` (lock_key) VALUES (?) ON DUPLICATE KEY UPDATE token = token"
                        ),
                        (k.clone(),),
                    )
                    .await?;
                    let row: Row = tx
                        .exec_first(select_for_update(table), (k.clone(),))
                        .await?
                        .unwrap_or_default();
                    if row.live()
                        && row.owner.as_deref() == Some(o.as_str())
                        && row.session_id.is_none()
                    {
                        // A retry of this owner: the same grant, a fresh lease.
                        tx.exec_drop(
                            format!(
                                "UPDATE `{table}` SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
                                 WHERE lock_key = ?"
                            ),
                            (us, k),
                        )
                        .await?;
                        tx.commit().await?;
                        inner.dedicated.send(Request::Touch {
                            key,
                            owner,
                            until: sent + lease,
                        });
                        return Ok(Ok(row.token));
                    }
                    if row.live() {
                        tx.rollback().await?;
                        return Ok(Err(row));
                    }
                    // Free or expired: take the bell first (waiters that see this grant then
                    // find the bell held), then the row.
                    let (reply, rang) = tokio::sync::oneshot::channel();
                    inner.dedicated.send(Request::Bell {
                        key: key.clone(),
                        owner,
                        until: sent + lease,
                        reply,
                    });
                    let _ = rang.await;
                    let granted = async {
                        tx.exec_drop(
                            format!(
                                "UPDATE `{table}` SET owner = ?, token = token + 1, label = ?, session_id = NULL, \
                                 expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, \
                                 granted_at = UTC_TIMESTAMP(6) WHERE lock_key = ?"
                            ),
                            (o, label.into_bytes(), us, k),
                        )
                        .await?;
                        tx.commit().await
                    }
                    .await;
                    if let Err(e) = granted {
                        inner.dedicated.send(Request::Unbell { key, owner });
                        return Err(e);
                    }
                    Ok(Ok(row.token + 1))
                })
            })
            .await?;
        Ok(match token {
            Ok(token) => Acquired::Granted(Grant::new(
                FencingToken::new(token.max(1).unsigned_abs()),
                lease,
            )),
            Err(row) => Acquired::Held(info_of(&row)),
        })
    }

    /// An owner-checked single statement; answers whether it matched the row.
    async fn owner_checked(
        &self,
        operation: Operation,
        sql: String,
        args: mysql_async::Params,
    ) -> Result<bool> {
        self.pooled(operation, move |c, _| {
            Box::pin(async move {
                c.exec_drop(sql, args).await?;
                Ok(c.affected_rows() == 1)
            })
        })
        .await
    }

    /// Frees the row of `key` if `owner` holds it (whatever client it holds it through), then
    /// gives back this backend's bell for it (lease mode).
    async fn release_row(&self, key: &Key, owner: OwnerId) -> Result<Confirm> {
        let sql = format!(
            "UPDATE `{}` SET owner = NULL, label = NULL, session_id = NULL, granted_at = NULL \
             WHERE lock_key = ? AND owner = ? AND expires_at > UTC_TIMESTAMP(6)",
            self.table()
        );
        let args = (key.as_str().as_bytes().to_vec(), owner.to_string()).into();
        let done = self.owner_checked(Operation::Release, sql, args).await?;
        if self.mode() == SqlMode::Lease {
            // The row is free (or was not ours): ring the bell.
            self.inner.dedicated.send(Request::Unbell {
                key: key.clone(),
                owner,
            });
        }
        if done {
            Ok(Confirm::Done)
        } else {
            self.not_held(key).await
        }
    }

    /// The current holder of `key` after an owner check failed (for the caller's message).
    async fn not_held(&self, key: &Key) -> Result<Confirm> {
        Ok(Confirm::NotHeld(self.holder(key).await.unwrap_or(None)))
    }
}

#[async_trait]
impl Backend for MysqlBackend {
    fn name(&self) -> &'static str {
        "mysql"
    }

    fn capabilities(&self) -> Capabilities {
        let params = &self.inner.context.config.params;
        let caps = match params.mode {
            SqlMode::Lease => Capabilities::new(Safety::SingleServer, Binding::Lease),
            SqlMode::Session => Capabilities::new(Safety::SingleServer, Binding::Session)
                .with_max_lease(Some(params.session_lease())),
        };
        caps.with_native_wait(true).with_max_key_len(512)
    }

    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Acquired> {
        if request.mode != Mode::Exclusive {
            return Err(Error::new(
                ErrorKind::Unsupported,
                Operation::Acquire,
                "the mysql backend supports exclusive locks only",
            ));
        }
        match self.mode() {
            SqlMode::Lease => self.acquire_lease(request).await,
            SqlMode::Session => {
                let lease = request
                    .lease
                    .min(self.inner.context.config.params.session_lease());
                let (key, owner, label) = (
                    request.key.clone(),
                    *request.owner,
                    request.label.to_owned(),
                );
                self.inner
                    .dedicated
                    .ask(Operation::Acquire, |reply| Request::Acquire {
                        key,
                        owner,
                        lease,
                        label,
                        reply,
                    })
                    .await
            }
        }
    }

    async fn extend(&self, lock: &LockRef<'_>, lease: Duration) -> Result<Confirm> {
        let (key, owner) = (lock.key.clone(), *lock.owner);
        match self.mode() {
            SqlMode::Session => {
                let lease = lease.min(self.inner.context.config.params.session_lease());
                self.inner
                    .dedicated
                    .ask(Operation::Extend, |reply| Request::Extend {
                        key,
                        owner,
                        lease,
                        reply,
                    })
                    .await
            }
            SqlMode::Lease => {
                let sent = Instant::now();
                let sql = format!(
                    "UPDATE `{}` SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND WHERE lock_key = ? \
                     AND owner = ? AND session_id IS NULL AND expires_at > UTC_TIMESTAMP(6)",
                    self.table()
                );
                let args = (
                    micros(lease),
                    key.as_str().as_bytes().to_vec(),
                    owner.to_string(),
                )
                    .into();
                if self.owner_checked(Operation::Extend, sql, args).await? {
                    self.inner.dedicated.send(Request::Touch {
                        key,
                        owner,
                        until: sent + lease,
                    });
                    Ok(Confirm::Done)
                } else {
                    self.inner.dedicated.send(Request::Unbell {
                        key: key.clone(),
                        owner,
                    });
                    self.not_held(&key).await
                }
            }
        }
    }

    async fn release(&self, lock: &LockRef<'_>) -> Result<Confirm> {
        let (key, owner) = (lock.key.clone(), *lock.owner);
        match self.mode() {
            SqlMode::Session => {
                let confirm = self
                    .inner
                    .dedicated
                    .ask(Operation::Release, |reply| Request::Release {
                        key: key.clone(),
                        owner,
                        reply,
                    })
                    .await?;
                match confirm {
                    Confirm::Done => return Ok(Confirm::Done),
                    // Not held by this session: the owner id may hold it through another client
                    // (`fenced unlock`); that session gives its named locks back when its next
                    // renewal finds the row gone.
                    Confirm::NotHeld(_) => self.release_row(&key, owner).await,
                }
            }
            SqlMode::Lease => self.release_row(&key, owner).await,
        }
    }

    async fn watch(&self, key: &Key) -> Result<Box<dyn Watch>> {
        let bell = self.bell_name(key);
        let watch =
            BellWatch::start(self.inner.context.clone(), bell, self.inner.wakeups.clone()).await?;
        Ok(Box::new(watch))
    }

    async fn holder(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let sql = select_holder(self.table());
        let k = key.as_str().as_bytes().to_vec();
        let row: Option<Row> = self
            .pooled(Operation::Admin, move |c, _| {
                Box::pin(c.exec_first(sql, (k,)))
            })
            .await?;
        Ok(row.filter(Row::live).map(|r| info_of(&r)))
    }

    async fn force_release(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let table = self.table().to_owned();
        let k = key.as_str().as_bytes().to_vec();
        let row = self
            .pooled(Operation::Admin, move |c, _| {
                Box::pin(async move {
                    let mut tx = c.start_transaction(TxOpts::default()).await?;
                    let row: Option<Row> =
                        tx.exec_first(select_for_update(&table), (k.clone(),)).await?;
                    let row = row.filter(Row::live);
                    if row.is_some() {
                        // The row stays, with its token: the next grant gets a higher one.
                        tx.exec_drop(
                            format!(
                                "UPDATE `{table}` SET owner = NULL, label = NULL, session_id = NULL, \
                                 granted_at = NULL WHERE lock_key = ?"
                            ),
                            (k,),
                        )
                        .await?;
                    }
                    tx.commit().await?;
                    Ok(row)
                })
            })
            .await?;
        Ok(row.map(|r| info_of(&r)))
    }

    fn session_state(&self) -> Option<tokio::sync::watch::Receiver<SessionState>> {
        match self.mode() {
            SqlMode::Session => Some(self.inner.dedicated.state()),
            SqlMode::Lease => None,
        }
    }

    /// One range read on the primary key: `lock_key >= prefix` and its first bytes equal to
    /// the prefix (compared as bytes, so `%`, `_` and `\` are plain characters), held rows only,
    /// sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<HolderInfo>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM `{}` WHERE lock_key >= ? AND LEFT(lock_key, ?) = ? \
             AND owner IS NOT NULL AND expires_at > UTC_TIMESTAMP(6) ORDER BY lock_key",
            self.table()
        );
        let p = prefix.as_bytes().to_vec();
        let args = (p.clone(), p.len() as u64, p);
        let rows: Vec<Row> = self
            .pooled(Operation::Admin, move |c, _| Box::pin(c.exec(sql, args)))
            .await?;
        Ok(rows.iter().filter(|r| r.live()).map(info_of).collect())
    }
}

impl Context {
    /// Awaits one driver call within the timeout, mapping its errors.
    pub(crate) async fn timed<T>(
        &self,
        operation: Operation,
        call: impl std::future::Future<Output = mysql_async::Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.config.params.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.error(operation, &e)),
            Err(_) => Err(self.timed_out(operation)),
        }
    }

    /// A new connection outside the pool.
    pub(crate) async fn open_plain(&self, operation: Operation) -> Result<Conn> {
        self.timed(operation, Conn::new(self.config.opts())).await
    }

    /// The dedicated connection and its id; in session mode the server ends it after
    /// `session_timeout` of silence (`wait_timeout`, whole seconds, rounded up).
    pub(crate) async fn open_dedicated(
        &self,
        operation: Operation,
        session: bool,
    ) -> Result<(Conn, u64)> {
        let mut conn = self.open_plain(operation).await?;
        if session {
            let secs = self
                .config
                .params
                .session_timeout
                .as_millis()
                .div_ceil(1000);
            self.timed(
                operation,
                conn.query_drop(format!("SET SESSION wait_timeout = {secs}")),
            )
            .await?;
        }
        let id: Option<u64> = self
            .timed(operation, conn.query_first("SELECT CONNECTION_ID()"))
            .await?;
        Ok((conn, id.unwrap_or(0)))
    }

    /// Checks the connection and the table, creating the table if it is missing.
    async fn ensure_table(&self) -> Result<()> {
        let table = &self.config.params.table;
        let mut conn = self.timed(Operation::Connect, self.pool.get_conn()).await?;
        let probe = tokio::time::timeout(
            self.config.params.timeout,
            conn.query_drop(format!("SELECT lock_key FROM `{table}` LIMIT 0")),
        )
        .await;
        match probe {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(mysql_async::Error::Server(e))) if e.code == 1146 => {}
            Ok(Err(e)) => return Err(self.error(Operation::Connect, &e)),
            Err(_) => return Err(self.timed_out(Operation::Connect)),
        }
        self.timed(
            Operation::Connect,
            conn.query_drop(MysqlBackend::schema_sql(table)),
        )
        .await
    }

    fn timed_out(&self, operation: Operation) -> Error {
        Error::new(
            ErrorKind::Backend,
            operation,
            format!(
                "no reply from MySQL at {} within {:?}; check that the server is running and reachable, or \
                 raise ?timeout=",
                self.config.redacted, self.config.params.timeout
            ),
        )
        .transient(true)
    }

    /// What to run so that the user of the URL may use the lock table.
    fn permission_help(&self) -> String {
        let table = &self.config.params.table;
        format!(
            "run, as an administrator:\n{};\nor let the user create it:\nGRANT CREATE, SELECT, INSERT, UPDATE \
             ON `{}`.* TO '{}'@'%';\n(and GRANT SELECT, INSERT, UPDATE ON `{}`.`{table}` TO '{}'@'%'; once the \
             table exists)",
            MysqlBackend::schema_sql(table),
            self.config.database,
            self.config.user,
            self.config.database,
            self.config.user
        )
    }

    /// Maps a driver error to a fenced error with a message that says what to do.
    pub(crate) fn error(&self, operation: Operation, e: &mysql_async::Error) -> Error {
        let url = &self.config.redacted;
        let detail = self.config.scrub(&e.to_string());
        let (transient, message) = match e {
            mysql_async::Error::Server(s) => match s.code {
                1045 => (
                    false,
                    format!(
                        "MySQL at {url} rejected the user name or password; check the user and password in \
                         the URL"
                    ),
                ),
                1049 => (
                    false,
                    format!(
                        "the database {:?} does not exist on the MySQL server at {url}; create it (CREATE \
                         DATABASE `{}`) or fix the URL's path",
                        self.config.database, self.config.database
                    ),
                ),
                1044 => (
                    false,
                    format!(
                        "the database {:?} does not exist on the MySQL server at {url}, or its user may not use \
                         it; create it (CREATE DATABASE `{}`) and GRANT the user access to it, or fix the URL's path",
                        self.config.database, self.config.database
                    ),
                ),
                1142 | 1143 => (
                    false,
                    format!(
                        "the MySQL user of {url} lacks a permission on the lock table `{}` ({detail}); {}",
                        self.config.params.table,
                        self.permission_help()
                    ),
                ),
                1146 => (
                    false,
                    format!(
                        "the lock table `{}` is missing on {url}; {}",
                        self.config.params.table,
                        self.permission_help()
                    ),
                ),
                // Deadlock, lock wait timeout, too many connections, shutting down, killed.
                1213 | 1205 | 1040 | 1053 | 1927 | 1317 | 2013 | 2006 => (
                    true,
                    format!(
                        "MySQL at {url} could not serve the request right now ({detail}); retry"
                    ),
                ),
                _ => (false, format!("MySQL at {url} answered an error: {detail}")),
            },
            mysql_async::Error::Io(mysql_async::IoError::Tls(_)) => (
                false,
                format!(
                    "the TLS connection to MySQL at {url} failed ({detail}); check tls_ca and that the host \
                     name matches the server certificate"
                ),
            ),
            mysql_async::Error::Io(_) | mysql_async::Error::Driver(_) => (
                true,
                format!(
                    "cannot talk to MySQL at {url} ({detail}); check the server is running and reachable at \
                     that host and port"
                ),
            ),
            _ => (false, format!("MySQL at {url}: {detail}")),
        };
        Error::new(ErrorKind::Backend, operation, message).transient(transient)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_and_names() {
        let sql = MysqlBackend::schema_sql("locks");
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS `locks`"));
        assert!(sql.contains("token BIGINT NOT NULL"));
        assert_eq!(micros(Duration::from_nanos(10)), 1);
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
    }

    #[tokio::test]
    async fn refused_connection_is_transient_and_redacted() {
        let e = MysqlBackend::connect("mysql://u:hunter2@127.0.0.1:1/db?timeout=1s")
            .await
            .unwrap_err();
        let text = format!("{e} {e:?}");
        assert!(e.is_transient(), "{text}");
        assert!(text.contains("mysql://u:***@127.0.0.1:1/db"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
