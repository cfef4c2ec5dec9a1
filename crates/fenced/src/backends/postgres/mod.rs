#![doc = include_str!("README.md")]

mod config;
mod wait;

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::types::ToSql;
use tokio_postgres::types::Type;
use tokio_postgres::{Row, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{debug, warn};

use crate::backend::{
    AcquireRequest, Acquired, Backend, Binding, Capabilities, Confirm, Grant, HolderInfo, LockRef,
    Mode, Safety, SessionState, Watch,
};
use crate::backends::sql::{SqlMode, advisory_id};
use crate::error::{Cause, Error, ErrorKind, Operation, Result};
use crate::key::Key;
use crate::token::{FencingToken, OwnerId};
use crate::url::ensure_crypto_provider;

use config::PgConfig;
use wait::Notifier;

/// Opens the backend named by `url` (called by [`connect`](crate::connect)).
pub(crate) async fn open(url: &url::Url) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(PostgresBackend::from_url(url).await?))
}

/// The PostgreSQL backend (`postgres://`, `postgresql://`). Cheap to clone; clones share one
/// command connection (the dedicated session connection in session mode) and one listening
/// connection.
///
/// Usually built through [`connect`](crate::connect); see the [module docs](self) for the URL
/// parameters and for what each mode does and does not guarantee.
///
/// ```no_run
/// # async fn demo() -> fenced::Result<()> {
/// use fenced::backends::postgres::PostgresBackend;
/// let backend = PostgresBackend::connect("postgres://app:secret@db.internal/app?mode=session").await?;
/// let client = fenced::Client::new(backend);
/// let guard = client.lock("invoice:17").await?;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresBackend {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Arc<Connector>,
    /// The current command (or session) connection; `None` until needed again after a loss.
    conn: Mutex<Option<Arc<Conn>>>,
    /// Serializes opening connections, and in session mode the multi-statement acquisitions.
    connecting: tokio::sync::Mutex<()>,
    session_ops: tokio::sync::Mutex<()>,
    notifier: Notifier,
    /// Session mode: the state of the dedicated connection.
    state: watch::Sender<SessionState>,
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("config", &self.inner.connector.config)
            .field("notifier", &self.inner.notifier)
            .finish()
    }
}

type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// Opens connections and knows how to explain their errors.
pub(crate) struct Connector {
    pub(crate) config: PgConfig,
    tls: MakeRustlsConnect,
    sql: Sql,
}

/// One open connection. Each statement is prepared on first use and kept (the server then
/// plans it once); with `prepared_statements=false` statements are sent unnamed with their
/// parameter types instead (`query_typed`, still one round trip), for transaction-pooling
/// proxies that cannot keep prepared statements.
struct Conn {
    client: tokio_postgres::Client,
    /// SQL text → prepared statement; `None` when statements are sent unnamed.
    prepared: Option<Mutex<std::collections::HashMap<String, tokio_postgres::Statement>>>,
    /// Session mode: the random id written into the rows this connection holds.
    session: Option<i64>,
}

/// The SQL text of every statement, for one lock table.
struct Sql {
    schema: String,
    acquire: String,
    extend: String,
    release: String,
    holder: String,
    force: String,
    list: String,
    try_lock: String,
    take: String,
    mine: String,
    unlock_orphan: String,
}

/// `HolderInfo` columns of a row aliased `h`: token, owner, label, remaining ms, age ms.
const HOLDER_COLUMNS: &str = "h.token, h.owner, h.label, \
     GREATEST(0, EXTRACT(EPOCH FROM (h.expires_at - now())) * 1000)::float8, \
     GREATEST(0, EXTRACT(EPOCH FROM (now() - h.granted_at)) * 1000)::float8";

impl Sql {
    fn new(table: &str) -> Sql {
        let t = table;
        let seq = format!("{t}_tokens");
        let live = live("h");
        let lease = "now() + $4::float8 * interval '1 millisecond'";
        Sql {
            schema: schema_sql(t),
            // Lease mode: grant if free, expired, ours, or a session row whose session ended.
            acquire: format!(
                "WITH granted AS (\
                 INSERT INTO {t} AS l (lock_key, owner, token, label, expires_at, granted_at) \
                 VALUES ($1, $2, nextval('{seq}'), $3, {lease}, now()) \
                 ON CONFLICT (lock_key) DO UPDATE SET \
                 token = CASE WHEN l.owner = EXCLUDED.owner THEN l.token ELSE nextval('{seq}') END, \
                 granted_at = CASE WHEN l.owner = EXCLUDED.owner THEN l.granted_at ELSE now() END, \
                 owner = EXCLUDED.owner, label = EXCLUDED.label, expires_at = EXCLUDED.expires_at, \
                 session_id = NULL, lock_id = NULL \
                 WHERE l.owner IS NULL OR l.owner = EXCLUDED.owner OR NOT ({}) \
                 RETURNING l.token) \
                 SELECT true, token, NULL::text, NULL::text, NULL::float8, NULL::float8 FROM granted \
                 UNION ALL SELECT false, {HOLDER_COLUMNS} FROM {t} h \
                 WHERE h.lock_key = $1 AND NOT EXISTS (SELECT 1 FROM granted)",
                self::live("l")
            ),
            extend: format!(
                "UPDATE {t} SET expires_at = now() + $3::float8 * interval '1 millisecond' \
                 WHERE lock_key = $1 AND owner = $2 AND expires_at > now() \
                 AND session_id IS NOT DISTINCT FROM $4 RETURNING token"
            ),
            // Whoever knows the owner id may release (`fenced unlock`); only the holding
            // session itself can give its advisory lock back, another session's release leaves
            // it to that session's next renewal (see `not_held`).
            release: format!(
                "WITH old AS (SELECT lock_key, lock_id, session_id, expires_at > now() AS live FROM {t} \
                 WHERE lock_key = $1 AND owner = $2 FOR UPDATE) \
                 UPDATE {t} l SET owner = NULL, label = '', expires_at = now(), session_id = NULL, lock_id = NULL \
                 FROM old WHERE l.lock_key = old.lock_key \
                 RETURNING old.live, CASE WHEN old.session_id = $3 THEN pg_advisory_unlock(old.lock_id) END, \
                 CASE WHEN old.session_id = $3 THEN pg_advisory_unlock((old.lock_id >> 32)::int4, \
                 ((old.lock_id << 32) >> 32)::int4) END, pg_notify($4, '')::text"
            ),
            holder: format!("SELECT {HOLDER_COLUMNS} FROM {t} h WHERE h.lock_key = $1 AND {live}"),
            force: format!(
                "WITH old AS (SELECT {HOLDER_COLUMNS} FROM {t} h WHERE h.lock_key = $1 AND {live} FOR UPDATE OF h) \
                 UPDATE {t} l SET owner = NULL, label = '', expires_at = now(), session_id = NULL, lock_id = NULL \
                 FROM old WHERE l.lock_key = $1 RETURNING old.*, pg_notify($2, '')::text"
            ),
            list: format!(
                "SELECT h.lock_key, {HOLDER_COLUMNS} FROM {t} h \
                 WHERE starts_with(h.lock_key, $1) AND {live} ORDER BY h.lock_key COLLATE \"C\""
            ),
            // Session mode, step 1: take the advisory lock unless this session holds it already
            // (advisory locks are re-entrant per session). No row: held by this session.
            try_lock: "SELECT pg_try_advisory_lock($1) WHERE NOT EXISTS (\
                 SELECT 1 FROM pg_locks p WHERE p.locktype = 'advisory' AND p.granted \
                 AND p.pid = pg_backend_pid() AND p.classid::text::int8 = ($1 >> 32) & 4294967295 \
                 AND p.objid::text::int8 = $1 & 4294967295 AND p.objsubid = 1)"
                .to_owned(),
            // Session mode, step 2 (holding the advisory lock): write the row unless a lease-mode
            // holder's lease still runs. A session row of another session is stale: that
            // session no longer holds the advisory lock this one holds.
            take: format!(
                "INSERT INTO {t} AS l (lock_key, owner, token, label, expires_at, granted_at, session_id, lock_id) \
                 VALUES ($1, $2, nextval('{seq}'), $3, {lease}, now(), $6, $5) \
                 ON CONFLICT (lock_key) DO UPDATE SET token = nextval('{seq}'), granted_at = now(), \
                 owner = EXCLUDED.owner, label = EXCLUDED.label, expires_at = EXCLUDED.expires_at, \
                 session_id = EXCLUDED.session_id, lock_id = EXCLUDED.lock_id \
                 WHERE l.owner IS NULL OR l.expires_at <= now() \
                 OR (l.session_id IS NOT NULL AND l.session_id <> EXCLUDED.session_id) \
                 RETURNING l.token, pg_try_advisory_lock($7, $8)"
            ),
            // Session mode: the grants this session has under an advisory lock id.
            mine: format!(
                "SELECT lock_key, owner, token FROM {t} WHERE lock_id = $1 AND session_id = $2 \
                 AND owner IS NOT NULL"
            ),
            // Session mode: unlock an advisory lock this session holds without a row (a grant
            // broken by force_release, or an acquisition cut short between its two steps).
            unlock_orphan: format!(
                "SELECT pg_advisory_unlock($1) FROM pg_locks p WHERE p.locktype = 'advisory' AND p.granted \
                 AND p.pid = pg_backend_pid() AND p.classid::text::int8 = ($1 >> 32) & 4294967295 \
                 AND p.objid::text::int8 = $1 & 4294967295 AND p.objsubid = 1 \
                 AND NOT EXISTS (SELECT 1 FROM {t} WHERE lock_id = $1 AND session_id = $2 AND owner IS NOT NULL) \
                 UNION ALL SELECT pg_advisory_unlock($3, $4) FROM pg_locks p WHERE p.locktype = 'advisory' \
                 AND p.granted AND p.pid = pg_backend_pid() AND p.classid::text::int8 = ($1 >> 32) & 4294967295 \
                 AND p.objid::text::int8 = $1 & 4294967295 AND p.objsubid = 2 \
                 AND NOT EXISTS (SELECT 1 FROM {t} WHERE lock_id = $1 AND session_id = $2 AND owner IS NOT NULL)"
            ),
        }
    }
}

/// The condition "the row aliased `h` is held": it has an owner, its lease runs, and for a
/// session-mode row, its session still holds the advisory lock (`pg_locks` shows a bigint
/// advisory key as its high 32 bits in `classid` and its low 32 bits in `objid`).
fn live(h: &str) -> String {
    format!(
        "{h}.owner IS NOT NULL AND {h}.expires_at > now() AND ({h}.session_id IS NULL OR EXISTS (\
         SELECT 1 FROM pg_locks p WHERE p.locktype = 'advisory' AND p.granted AND p.database = \
         (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND p.classid::text::int8 = ({h}.lock_id >> 32) & 4294967295 \
         AND p.objid::text::int8 = {h}.lock_id & 4294967295 AND p.objsubid = 1))"
    )
}

/// The SQL that creates the lock table `table` and its token sequence `<table>_tokens`, for
/// running by hand when the application's database user may not create tables. fenced runs it
/// itself (under an advisory transaction lock, so concurrent first uses do not collide) when
/// the table is missing.
///
/// ```
/// let sql = fenced::backends::postgres::schema_sql("fenced_locks");
/// assert!(sql.contains("CREATE TABLE IF NOT EXISTS fenced_locks"));
/// assert!(sql.contains("CREATE SEQUENCE IF NOT EXISTS fenced_locks_tokens"));
/// ```
pub fn schema_sql(table: &str) -> String {
    format!(
        "CREATE SEQUENCE IF NOT EXISTS {table}_tokens;\n\
         CREATE TABLE IF NOT EXISTS {table} (\n  \
         lock_key text PRIMARY KEY,\n  \
         owner text,\n  \
         token bigint NOT NULL,\n  \
         label text NOT NULL DEFAULT '',\n  \
         expires_at timestamptz NOT NULL,\n  \
         granted_at timestamptz NOT NULL,\n  \
         session_id bigint,\n  \
         lock_id bigint\n);"
    )
}

/// A fencing condition for your own statements in the same database: true only while the
/// grant with the token in parameter `$token_param` still holds the key in parameter
/// `$key_param` (owner set, lease running, and for session mode its session alive). It locks
/// the lock row `FOR SHARE`, so no other client can take the lock over until your transaction
/// ends: a write guarded by it cannot land after the lock changed hands, even if the holder
/// paused past its lease.
///
/// Bind the key as `text` and the token as `bigint`
/// ([`FencingToken::get`](crate::FencingToken::get) `as i64`).
///
/// ```
/// use fenced::backends::postgres::fence_condition;
/// let sql = format!(
///     "UPDATE accounts SET balance = balance - $1 WHERE id = $2 AND {}",
///     fence_condition("fenced_locks", 3, 4)
/// );
/// assert!(sql.contains("lock_key = $3") && sql.contains("token = $4") && sql.contains("FOR SHARE"));
/// // Run it with the guard's key and token:
/// // client.execute(&sql, &[&amount, &account_id, &guard.key().as_str(), &(guard.token().get() as i64)])
/// // and treat "0 rows" as "the lock was lost: do not write".
/// ```
pub fn fence_condition(table: &str, key_param: usize, token_param: usize) -> String {
    format!(
        "EXISTS (SELECT 1 FROM {table} f WHERE f.lock_key = ${key_param}::text \
         AND f.token = ${token_param}::bigint AND {} FOR SHARE OF f)",
        live("f")
    )
}

/// The statements that let `user` use an existing lock table.
fn grant_sql(table: &str, user: &str) -> String {
    format!(
        "GRANT SELECT, INSERT, UPDATE ON {table} TO \"{user}\"; GRANT USAGE, SELECT ON SEQUENCE {table}_tokens TO \"{user}\";"
    )
}

fn tls_connector(config: &PgConfig) -> Result<MakeRustlsConnect> {
    ensure_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    if config.tls {
        match &config.tls_ca {
            Some((path, pem)) => {
                use rustls::pki_types::CertificateDer;
                use rustls::pki_types::pem::PemObject;
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let added = cert.ok().and_then(|c| roots.add(c).ok());
                    if added.is_none() {
                        return Err(crate::url::invalid(format!(
                            "the CA file tls_ca={} holds a certificate that cannot be used; check it is a PEM CA \
                             certificate",
                            path.display()
                        )));
                    }
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(tls))
}

impl Connector {
    /// Opens one connection, within the timeout.
    pub(crate) async fn raw_connect(
        &self,
    ) -> Result<(
        tokio_postgres::Client,
        tokio_postgres::Connection<Socket, TlsStream>,
    )> {
        let config = self.config.connection();
        match tokio::time::timeout(
            self.config.params.timeout * 2,
            config.connect(self.tls.clone()),
        )
        .await
        {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(e)) => Err(self.error(Operation::Connect, &e)),
            Err(_) => Err(self.timed_out(Operation::Connect)),
        }
    }

    fn scrub(&self, text: &str) -> String {
        match self.config.password.as_deref() {
            Some(password) if !password.is_empty() => text.replace(password, "***"),
            _ => text.to_owned(),
        }
    }

    fn timed_out(&self, operation: Operation) -> Error {
        Error::new(
            ErrorKind::Backend,
            operation,
            format!(
                "no reply from {} within {:?}; check that the server is running and reachable, or raise ?timeout=",
                self.config.redacted, self.config.params.timeout
            ),
        )
        .transient(true)
    }

    /// Maps a driver error to a fenced error with a message that says what to do.
    fn error(&self, operation: Operation, e: &tokio_postgres::Error) -> Error {
        let url = &self.config.redacted;
        let table = &self.config.params.table;
        let user = &self.config.user;
        let (kind, transient, message) = match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                match code {
                    "28P01" | "28000" => (
                        ErrorKind::Backend,
                        false,
                        format!(
                            "the server at {url} rejected the user name or password ({}); check the user and \
                             password in the URL",
                            db.message()
                        ),
                    ),
                    "3D000" => (
                        ErrorKind::InvalidConfig,
                        false,
                        format!(
                            "the database {:?} does not exist on {url}; create it (CREATE DATABASE \"{}\";) or \
                             fix the URL",
                            self.config.database, self.config.database
                        ),
                    ),
                    "42501" => (
                        ErrorKind::Backend,
                        false,
                        format!(
                            "the user {user:?} of {url} lacks a permission on the lock table {table} ({}); \
                             have an administrator run: {} {}",
                            db.message(),
                            schema_sql(table).replace('\n', " "),
                            grant_sql(table, user)
                        ),
                    ),
                    "42P01" => (
                        ErrorKind::Backend,
                        false,
                        format!(
                            "the lock table {table} is missing on {url} ({}); create it: {}",
                            db.message(),
                            schema_sql(table).replace('\n', " ")
                        ),
                    ),
                    _ if code.starts_with("08")
                        || code.starts_with("53")
                        || code.starts_with("57")
                        || code == "40001"
                        || code == "40P01"
                        || code == "55P03" =>
                    {
                        (
                            ErrorKind::Backend,
                            true,
                            format!(
                                "the server at {url} cannot serve locks right now ({code}: {}); retrying",
                                db.message()
                            ),
                        )
                    }
                    _ => (
                        ErrorKind::Backend,
                        false,
                        format!(
                            "the server at {url} answered with an error ({code}: {})",
                            db.message()
                        ),
                    ),
                }
            }
            None => {
                let text = e.to_string().to_ascii_lowercase();
                let source = std::error::Error::source(e)
                    .map(|s| s.to_string().to_ascii_lowercase())
                    .unwrap_or_default();
                if source.contains("certificate")
                    || source.contains("tls")
                    || source.contains("handshake")
                    || text.contains("tls")
                {
                    (
                        ErrorKind::Backend,
                        false,
                        format!(
                            "the TLS handshake with {url} failed; check the host name matches the server's \
                             certificate and trust its CA with ?tls_ca=/path/ca.pem"
                        ),
                    )
                } else if source.contains("refused") {
                    (
                        ErrorKind::Backend,
                        true,
                        format!("connection refused; check the server is running at {url}"),
                    )
                } else {
                    (
                        ErrorKind::Backend,
                        true,
                        format!(
                            "the connection to {url} failed or was lost; retrying may help, otherwise check the \
                             server is running and reachable"
                        ),
                    )
                }
            }
        };
        Error::new(kind, operation, message)
            .transient(transient)
            .with_source(Cause(self.scrub(&e.to_string())))
    }

    /// Creates the lock table and sequence if missing (serialized by an advisory transaction
    /// lock, so concurrent first uses do not collide).
    async fn ensure_schema(&self, client: &tokio_postgres::Client) -> Result<()> {
        let table = &self.config.params.table;
        // An unnamed statement: nothing prepared that a pooler could lose.
        let exists = client
            .query_typed(
                "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
                &[
                    (table, Type::TEXT),
                    (&format!("{table}_tokens"), Type::TEXT),
                ],
            )
            .await
            .map_err(|e| self.error(Operation::Connect, &e))?;
        if exists.first().is_some_and(|row| row.get::<_, bool>(0)) {
            return Ok(());
        }
        let guard = crate::backends::sql::key_hash("fenced schema", table) as i64;
        let created = client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({guard}); {} COMMIT;",
                self.sql.schema
            ))
            .await;
        if let Err(e) = created {
            // A failed statement leaves the transaction open and aborted.
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(self.error(Operation::Connect, &e));
        }
        Ok(())
    }
}

impl PostgresBackend {
    /// Connects to the database named by `url` (see the [module docs](self) for the
    /// parameters), creating the lock table on first use.
    ///
    /// Connecting is eager: an unreachable server, a wrong password, a missing database or a
    /// user that may neither use nor create the lock table fails here, with a message that says
    /// what to do (and never shows the password).
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::postgres::PostgresBackend::connect(
    ///     "postgres://app:secret@db.internal:5432/app?sslmode=verify-full&tls_ca=/etc/ssl/db-ca.pem",
    /// )
    /// .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future closes whatever it opened; no lock is taken by connecting.
    pub async fn connect(url: &str) -> Result<PostgresBackend> {
        let parsed = crate::url::parse(url)?;
        PostgresBackend::from_url(&parsed).await
    }

    pub(crate) async fn from_url(url: &url::Url) -> Result<PostgresBackend> {
        let config = PgConfig::from_url(url)?;
        let tls = tls_connector(&config)?;
        let sql = Sql::new(&config.params.table);
        let connector = Arc::new(Connector { config, tls, sql });
        let backend = PostgresBackend {
            inner: Arc::new(Inner {
                notifier: Notifier::start(connector.clone()),
                connector,
                conn: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                session_ops: tokio::sync::Mutex::new(()),
                state: watch::channel(SessionState::Connected).0,
            }),
        };
        backend.conn().await?;
        Ok(backend)
    }

    /// The mode of this backend (the `mode` URL parameter).
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// use fenced::backends::{postgres::PostgresBackend, sql::SqlMode};
    /// let backend = PostgresBackend::connect("postgres://app@db/app?mode=session").await?;
    /// assert_eq!(backend.mode(), SqlMode::Session);
    /// # Ok(()) }
    /// ```
    pub fn mode(&self) -> SqlMode {
        self.inner.connector.config.params.mode
    }

    /// The lock table (the `table` URL parameter, default `fenced_locks`).
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::postgres::PostgresBackend::connect("postgres://app@db/app").await?;
    /// assert_eq!(backend.table(), "fenced_locks");
    /// # Ok(()) }
    /// ```
    pub fn table(&self) -> &str {
        &self.inner.connector.config.params.table
    }

    /// How many release channels this backend listens to now (one per key that has a waiter
    /// in this process).
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::postgres::PostgresBackend::connect("postgres://app@db/app").await?;
    /// assert_eq!(backend.listening_channels(), 0);
    /// # Ok(()) }
    /// ```
    pub fn listening_channels(&self) -> usize {
        self.inner.notifier.listening()
    }

    /// The process id of the server backend behind the command connection (in session mode,
    /// the session that holds this client's advisory locks), as `pg_stat_activity` and
    /// `pg_locks` show it.
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::postgres::PostgresBackend::connect("postgres://app@db/app?mode=session").await?;
    /// println!("advisory locks held by pid {}", backend.server_pid().await?);
    /// # Ok(()) }
    /// ```
    pub async fn server_pid(&self) -> Result<i32> {
        let conn = self.conn().await?;
        let row = self
            .timed(
                Operation::Admin,
                conn.client.query_typed("SELECT pg_backend_pid()", &[]),
            )
            .await?;
        row.first()
            .map(|row| row.get(0))
            .ok_or_else(|| self.unexpected(Operation::Admin))
    }

    /// The current connection, opening one if there is none (or it broke).
    async fn conn(&self) -> Result<Arc<Conn>> {
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let _connecting = self.inner.connecting.lock().await;
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let connector = &self.inner.connector;
        let (client, connection) = connector.raw_connect().await?;
        let session = (connector.config.params.mode == SqlMode::Session).then(rand::random::<i64>);
        // The connection's own task; in session mode its end is the session's end.
        let state = self.inner.state.clone();
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "fenced: PostgreSQL connection closed");
            }
            if let Some(inner) = weak.upgrade() {
                let mut current = inner.conn.lock().unwrap_or_else(PoisonError::into_inner);
                if current
                    .as_ref()
                    .is_some_and(|c| c.session == session && c.client.is_closed())
                {
                    *current = None;
                }
            }
            if session.is_some() {
                state.send_replace(SessionState::Ended);
            }
        });
        connector.ensure_schema(&client).await?;
        if let Some(_id) = session {
            let ms = connector.config.params.session_timeout.as_millis();
            if let Err(e) = client
                .batch_execute(&format!("SET idle_session_timeout = {ms}"))
                .await
            {
                warn!(error = %connector.scrub(&e.to_string()), "fenced: cannot set idle_session_timeout (PostgreSQL 14 or later has it); a silent session's locks then end only when the server notices the connection is gone");
            }
        }
        let prepared = connector
            .config
            .prepared_statements
            .then(|| Mutex::new(std::collections::HashMap::new()));
        let conn = Arc::new(Conn {
            client,
            prepared,
            session,
        });
        *self
            .inner
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
        if session.is_some() {
            self.inner.state.send_replace(SessionState::Connected);
        }
        Ok(conn)
    }

    fn current(&self) -> Option<Arc<Conn>> {
        let current = self
            .inner
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        current.as_ref().filter(|c| !c.client.is_closed()).cloned()
    }

    /// Runs a request within the statement timeout, mapping errors.
    async fn timed<T>(
        &self,
        operation: Operation,
        request: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        let connector = &self.inner.connector;
        match tokio::time::timeout(connector.config.params.timeout, request).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(connector.error(operation, &e)),
            Err(_) => Err(connector.timed_out(operation)),
        }
    }

    async fn query(
        &self,
        operation: Operation,
        conn: &Conn,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>> {
        let Some(prepared) = &conn.prepared else {
            return self
                .timed(operation, conn.client.query_typed(sql, params))
                .await;
        };
        let cached = prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sql)
            .cloned();
        let statement = match cached {
            Some(statement) => statement,
            None => {
                let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
                let statement = self
                    .timed(operation, conn.client.prepare_typed(sql, &types))
                    .await?;
                prepared
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(sql.to_owned(), statement.clone());
                statement
            }
        };
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
        self.timed(operation, conn.client.query(&statement, &values))
            .await
    }

    fn sql(&self) -> &Sql {
        &self.inner.connector.sql
    }

    fn channel(&self, key: &Key) -> String {
        wait::channel(self.table(), key.as_str())
    }

    fn lock_id(&self, key: &Key) -> i64 {
        advisory_id(self.table(), key)
    }

    async fn acquire_lease(&self, conn: &Conn, request: &AcquireRequest<'_>) -> Result<Acquired> {
        let owner = request.owner.to_string();
        let rows = self
            .query(
                Operation::Acquire,
                conn,
                &self.sql().acquire,
                &[
                    (&request.key.as_str(), Type::TEXT),
                    (&owner, Type::TEXT),
                    (&request.label, Type::TEXT),
                    (&lease_ms(request.lease), Type::FLOAT8),
                ],
            )
            .await?;
        Ok(match rows.first() {
            Some(row) if row.get::<_, bool>(0) => {
                Acquired::Granted(Grant::new(token(row.get(1)), request.lease))
            }
            Some(row) => Acquired::Held(holder_from(row, 1)),
            None => Acquired::Held(HolderInfo::new()),
        })
    }

    async fn acquire_session(&self, conn: &Conn, request: &AcquireRequest<'_>) -> Result<Acquired> {
        let Some(session) = conn.session else {
            return Err(self.unexpected(Operation::Acquire));
        };
        let sql = self.sql();
        let id = self.lock_id(request.key);
        let presence = presence(id);
        let owner = request.owner.to_string();
        let tried = self
            .query(
                Operation::Acquire,
                conn,
                &sql.try_lock,
                &[(&id, Type::INT8)],
            )
            .await?;
        let newly = match tried.first() {
            Some(row) => {
                if !row.get::<_, bool>(0) {
                    // Another session holds the advisory lock: report the row's holder, but
                    // with no remaining lease when its lease has run out (the session may
                    // still be alive; waiters then re-check rather than spin).
                    let info = self.holder_of(conn, request.key).await?;
                    return Ok(Acquired::Held(info.unwrap_or_default()));
                }
                true
            }
            None => false,
        };
        if !newly {
            // This session already holds the advisory lock: a retry of this very grant, another
            // owner of this client, another key whose id collides, or an orphan.
            let rows = self
                .query(
                    Operation::Acquire,
                    conn,
                    &sql.mine,
                    &[(&id, Type::INT8), (&session, Type::INT8)],
                )
                .await?;
            if let Some(row) = rows.first() {
                let key: String = row.get(0);
                let holder: Option<String> = row.get(1);
                if key == request.key.as_str() && holder.as_deref() == Some(owner.as_str()) {
                    return Ok(Acquired::Granted(Grant::new(
                        token(row.get(2)),
                        request.lease,
                    )));
                }
                let mut info = self
                    .holder_of(conn, &key_or(request.key, &key))
                    .await?
                    .unwrap_or_default();
                if key != request.key.as_str() {
                    info.label = Some(format!(
                        "{} (key {key:?}, whose advisory lock id collides with this key's)",
                        info.label.unwrap_or_default()
                    ));
                }
                return Ok(Acquired::Held(info));
            }
        }
        let taken = self
            .query(
                Operation::Acquire,
                conn,
                &sql.take,
                &[
                    (&request.key.as_str(), Type::TEXT),
                    (&owner, Type::TEXT),
                    (&request.label, Type::TEXT),
                    (&lease_ms(request.lease), Type::FLOAT8),
                    (&id, Type::INT8),
                    (&session, Type::INT8),
                    (&presence.0, Type::INT4),
                    (&presence.1, Type::INT4),
                ],
            )
            .await;
        match taken {
            Ok(rows) if !rows.is_empty() => Ok(Acquired::Granted(Grant::new(
                token(rows[0].get(0)),
                request.lease,
            ))),
            other => {
                // A lease-mode holder's lease still runs (or the statement failed): give the
                // advisory lock back.
                self.unlock_orphan(conn, id, session).await;
                other?;
                let info = self.holder_of(conn, request.key).await?;
                Ok(Acquired::Held(info.unwrap_or_default()))
            }
        }
    }

    /// Session mode: unlocks the advisory lock `id` if this session holds it without a row.
    async fn unlock_orphan(&self, conn: &Conn, id: i64, session: i64) {
        if let Err(e) = self
            .query(
                Operation::Release,
                conn,
                &self.sql().unlock_orphan,
                &[
                    (&id, Type::INT8),
                    (&session, Type::INT8),
                    (&presence(id).0, Type::INT4),
                    (&presence(id).1, Type::INT4),
                ],
            )
            .await
        {
            debug!(error = %e, "fenced: could not give back an advisory lock");
        }
    }

    async fn holder_of(&self, conn: &Conn, key: &Key) -> Result<Option<HolderInfo>> {
        let rows = self
            .query(
                Operation::Admin,
                conn,
                &self.sql().holder,
                &[(&key.as_str(), Type::TEXT)],
            )
            .await?;
        Ok(rows.first().map(|row| holder_from(row, 0)))
    }

    fn unexpected(&self, operation: Operation) -> Error {
        Error::new(
            ErrorKind::Backend,
            operation,
            format!(
                "the PostgreSQL connection to {} is not in session mode; this is a bug in fenced",
                self.inner.connector.config.redacted
            ),
        )
    }

    /// A NotHeld answer with the current holder; in session mode also gives back an advisory
    /// lock left without a row (a grant broken by force_release).
    /// In session mode the caller holds `session_ops`.
    async fn not_held(&self, conn: &Conn, key: &Key) -> Result<Confirm> {
        if let Some(session) = conn.session {
            self.unlock_orphan(conn, self.lock_id(key), session).await;
        }
        Ok(Confirm::NotHeld(self.holder_of(conn, key).await?))
    }

    /// Session mode: serializes the operations that take or give back advisory locks, so
    /// "this session holds the advisory lock" and "this session has a row for it" are read and
    /// changed together.
    async fn serial(&self, conn: &Conn) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match conn.session {
            Some(_) => Some(self.inner.session_ops.lock().await),
            None => None,
        }
    }
}

/// The two-number advisory lock a session-mode holder also takes while it holds `id`: its
/// *presence*, on which waiters wait (shared) to learn when the holder's session ends. It lives
/// in the two-`int4` key space (`objsubid` 2 in `pg_locks`), apart from the lock itself
/// (`objsubid` 1), so a waiter's momentary shared lock never stands in the way of a grant.
pub(crate) fn presence(id: i64) -> (i32, i32) {
    ((id >> 32) as i32, id as i32)
}

fn key_or(fallback: &Key, text: &str) -> Key {
    Key::new(text).unwrap_or_else(|_| fallback.clone())
}

fn token(value: i64) -> FencingToken {
    FencingToken::new(u64::try_from(value).unwrap_or(0))
}

/// `token, owner, label, remaining ms, age ms` starting at column `at`.
fn holder_from(row: &Row, at: usize) -> HolderInfo {
    let mut info = HolderInfo::new();
    info.token = row.get::<_, Option<i64>>(at).map(token);
    info.owner = row
        .get::<_, Option<String>>(at + 1)
        .and_then(|s| s.parse::<OwnerId>().ok());
    info.label = row.get::<_, Option<String>>(at + 2);
    info.remaining = row
        .get::<_, Option<f64>>(at + 3)
        .map(|ms| Duration::from_micros((ms.max(0.0) * 1000.0) as u64));
    info.age = row
        .get::<_, Option<f64>>(at + 4)
        .map(|ms| Duration::from_micros((ms.max(0.0) * 1000.0) as u64));
    info
}

/// A lease in milliseconds for the server (whole microseconds are kept).
fn lease_ms(lease: Duration) -> f64 {
    lease.as_secs_f64() * 1000.0
}

#[async_trait]
impl Backend for PostgresBackend {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn capabilities(&self) -> Capabilities {
        let params = &self.inner.connector.config.params;
        match params.mode {
            SqlMode::Session => Capabilities::new(Safety::SingleServer, Binding::Session)
                .with_native_wait(true)
                .with_max_lease(Some(params.session_lease())),
            _ => Capabilities::new(Safety::SingleServer, Binding::Lease).with_native_wait(true),
        }
    }

    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Acquired> {
        if request.mode != Mode::Exclusive {
            return Err(Error::new(
                ErrorKind::Unsupported,
                Operation::Acquire,
                "the PostgreSQL backend supports exclusive locks only",
            ));
        }
        let conn = self.conn().await?;
        if conn.session.is_some() {
            let _serial = self.serial(&conn).await;
            self.acquire_session(&conn, request).await
        } else {
            self.acquire_lease(&conn, request).await
        }
    }

    async fn extend(&self, lock: &LockRef<'_>, lease: Duration) -> Result<Confirm> {
        let conn = self.conn().await?;
        let rows = self
            .query(
                Operation::Extend,
                &conn,
                &self.sql().extend,
                &[
                    (&lock.key.as_str(), Type::TEXT),
                    (&lock.owner.to_string(), Type::TEXT),
                    (&lease_ms(lease), Type::FLOAT8),
                    (&conn.session, Type::INT8),
                ],
            )
            .await?;
        if rows.is_empty() {
            let _serial = self.serial(&conn).await;
            return self.not_held(&conn, lock.key).await;
        }
        Ok(Confirm::Done)
    }

    async fn release(&self, lock: &LockRef<'_>) -> Result<Confirm> {
        let conn = self.conn().await?;
        let _serial = self.serial(&conn).await;
        let rows = self
            .query(
                Operation::Release,
                &conn,
                &self.sql().release,
                &[
                    (&lock.key.as_str(), Type::TEXT),
                    (&lock.owner.to_string(), Type::TEXT),
                    (&conn.session, Type::INT8),
                    (&self.channel(lock.key), Type::TEXT),
                ],
            )
            .await?;
        match rows.first() {
            Some(row) if row.get::<_, bool>(0) => Ok(Confirm::Done),
            // Ours, but the lease had run out: released all the same.
            Some(_) => Ok(Confirm::NotHeld(None)),
            None => self.not_held(&conn, lock.key).await,
        }
    }

    async fn watch(&self, key: &Key) -> Result<Box<dyn Watch>> {
        let notify = self.inner.notifier.watch(self.channel(key)).await?;
        Ok(match self.mode() {
            SqlMode::Session => Box::new(wait::SessionWatch::new(
                notify,
                self.inner.connector.clone(),
                self.lock_id(key),
            )),
            _ => notify,
        })
    }

    async fn holder(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let conn = self.conn().await?;
        self.holder_of(&conn, key).await
    }

    async fn force_release(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let conn = self.conn().await?;
        let rows = self
            .query(
                Operation::Admin,
                &conn,
                &self.sql().force,
                &[
                    (&key.as_str(), Type::TEXT),
                    (&self.channel(key), Type::TEXT),
                ],
            )
            .await?;
        Ok(rows.first().map(|row| holder_from(row, 0)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<HolderInfo>> {
        let conn = self.conn().await?;
        let rows = self
            .query(
                Operation::Admin,
                &conn,
                &self.sql().list,
                &[(&prefix, Type::TEXT)],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let key = Key::new(row.get::<_, String>(0)).ok()?;
                let mut info = holder_from(row, 1);
                info.key = Some(key);
                Some(info)
            })
            .collect())
    }

    fn session_state(&self) -> Option<watch::Receiver<SessionState>> {
        (self.mode() == SqlMode::Session).then(|| self.inner.state.subscribe())
    }
}
