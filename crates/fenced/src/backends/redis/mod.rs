#![doc = include_str!("README.md")]

mod config;
mod scripts;
#[cfg(feature = "redis-sentinel")]
mod sentinel;
mod wait;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::{RedisError, ServerErrorKind, Value};

use crate::backend::{
    AcquireRequest, Acquired, Backend, Binding, Capabilities, Confirm, Grant, HolderInfo, LockRef,
    Mode, Safety, Watch,
};
use crate::error::{Cause, Error, ErrorKind, Operation, Result};
use crate::key::Key;
use crate::token::{FencingToken, OwnerId};
use crate::url::ensure_crypto_provider;

use config::RedisConfig;
use wait::Notifier;

/// The Redis / Valkey backend: one server (`redis://`, `rediss://`) or, with the cargo feature
/// `redis-cluster`, a Redis Cluster (`redis+cluster://`, `rediss+cluster://`), or with the cargo
/// feature `redis-sentinel`, the primary that Sentinels name (`redis+sentinel://`,
/// `rediss+sentinel://`). Cheap to clone; clones share one command connection and one pub/sub
/// connection (on a cluster: one cluster connection, which also carries the sharded
/// subscriptions).
///
/// Usually built through [`connect`](crate::connect); see the [module docs](self) for the URL
/// parameters and for what this backend does and does not guarantee.
///
/// ```no_run
/// # async fn demo() -> fenced::Result<()> {
/// use fenced::backends::redis::RedisBackend;
/// let backend = RedisBackend::connect("redis://:secret@localhost:6379/0?prefix=billing").await?;
/// let client = fenced::Client::new(backend);
/// let guard = client.lock("invoice:17").await?;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    context: Arc<Context>,
    notifier: Notifier,
}

/// The command connection: one server through a connection manager, or a cluster connection,
/// which routes each command by its key's slot and follows `MOVED` and `ASK` redirections, or
/// the connection manager of the primary that the Sentinels name, replaced when it moves.
/// Everything else (scripts, key names, replies) is the same for all.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    #[cfg(feature = "redis-cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
    #[cfg(feature = "redis-sentinel")]
    Sentinel(sentinel::Primary),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
            #[cfg(feature = "redis-sentinel")]
            Conn::Sentinel(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "redis-sentinel")]
            Conn::Sentinel(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(conn) => conn.get_db(),
            #[cfg(feature = "redis-sentinel")]
            Conn::Sentinel(conn) => conn.get_db(),
        }
    }
}

/// What error messages need to know about the connection.
struct Context {
    config: RedisConfig,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &self.inner.context.config.redacted)
            .field("prefix", &self.inner.context.config.prefix)
            .field("timeout", &self.inner.context.config.timeout)
            .field("cluster", &self.is_cluster())
            .field("notifier", &self.inner.notifier)
            .finish()
    }
}

/// The Redis names used for one lock key.
///
/// ```no_run
/// # async fn demo() -> fenced::Result<()> {
/// use fenced::backends::redis::RedisBackend;
/// let backend = RedisBackend::connect("redis://localhost:6379").await?;
/// let names = backend.key_names(&fenced::Key::new("job{1}")?);
/// assert_eq!(names.lock, "fenced:{job%7B1%7D}:lock");
/// assert_eq!(names.fence, "fenced:{job%7B1%7D}:fence");
/// assert_eq!(names.channel, "fenced:{job%7B1%7D}:released");
/// # Ok(()) }
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RedisKeyNames {
    /// The hash holding the current grant (`owner`, `token`, `label`); it expires with the lease.
    pub lock: String,
    /// The fencing counter (`INCR`); it has no expiry and outlives the lock.
    pub fence: String,
    /// The pub/sub channel on which releases are announced.
    pub channel: String,
}

impl RedisBackend {
    /// Connects to the server named by `url` (`redis://…` or `rediss://…`; with the cargo
    /// feature `redis-cluster` also `redis+cluster://…` or `rediss+cluster://…`, with the cargo
    /// feature `redis-sentinel` also `redis+sentinel://…` or `rediss+sentinel://…`; see the
    /// [module docs](self) for the parameters).
    ///
    /// Connecting is eager: an unreachable server, a TLS problem or a wrong password fails here,
    /// with a message that says what to check (and never shows the password).
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::redis::RedisBackend::connect(
    ///     "rediss://app:secret@cache.internal:6380/0?tls_ca=/etc/ssl/cache-ca.pem&timeout=1s",
    /// )
    /// .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future closes whatever it opened; no lock is taken by connecting.
    pub async fn connect(url: &str) -> Result<RedisBackend> {
        #[cfg(feature = "redis-cluster")]
        if is_cluster_url(url) {
            return RedisBackend::from_cluster_str(url).await;
        }
        #[cfg(feature = "redis-sentinel")]
        if sentinel::is_sentinel_url(url) {
            return RedisBackend::from_sentinel_str(url).await;
        }
        let parsed = crate::url::parse(url)?;
        RedisBackend::from_url(&parsed).await
    }

    /// Connects as described by an already parsed URL.
    pub(crate) async fn from_url(url: &url::Url) -> Result<RedisBackend> {
        let config = RedisConfig::from_url(url)?;
        if config.tls {
            ensure_crypto_provider();
        }
        let context = Arc::new(Context { config });
        let client = context.client()?;
        let timeout = context.config.timeout;

        // The pub/sub connection first: it checks the address, TLS and the credentials once,
        // without the retries of the connection manager.
        let pubsub = open_pubsub(&client, &context).await?;
        let conn = open_manager(&client, &context).await?;

        let reconnect: wait::Connect = {
            let context = context.clone();
            Box::new(move || {
                let client = client.clone();
                let context = context.clone();
                Box::pin(async move {
                    open_pubsub(&client, &context)
                        .await
                        .map_err(|e| e.to_string())
                })
            })
        };
        let notifier = Notifier::start(pubsub, reconnect, timeout);
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                conn: Conn::Single(conn),
                context,
                notifier,
            }),
        })
    }

    /// Connects to the Redis Cluster named by `raw` (`redis+cluster://…`, `rediss+cluster://…`).
    #[cfg(feature = "redis-cluster")]
    pub(crate) async fn from_cluster_str(raw: &str) -> Result<RedisBackend> {
        let config = RedisConfig::from_cluster_str(raw)?;
        if config.tls {
            ensure_crypto_provider();
        }
        let seeds = config.cluster.clone().unwrap_or_default();
        let context = Arc::new(Context { config });
        let timeout = context.config.timeout;
        let (push_sender, pushes) = tokio::sync::mpsc::unbounded_channel();
        // RESP3: the sharded subscriptions' messages arrive as pushes on the command connection.
        let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(push_sender)
            .connection_timeout(timeout)
            .response_timeout(timeout);
        if let Some((_, pem)) = &context.config.tls_ca {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            });
        }
        let client = builder.build().map_err(|e| {
            Error::new(
                ErrorKind::InvalidConfig,
                Operation::Connect,
                format!(
                    "{} cannot be used: {}; check the URL (and the tls_ca file)",
                    context.config.redacted,
                    context.scrub(&e.to_string())
                ),
            )
        })?;
        let conn = match tokio::time::timeout(timeout, client.get_async_connection()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(context.error(Operation::Connect, &e)),
            Err(_) => return Err(context.timed_out(Operation::Connect)),
        };
        let notifier = Notifier::start_cluster(conn.clone(), pushes, timeout);
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                conn: Conn::Cluster(conn),
                context,
                notifier,
            }),
        })
    }

    /// Whether this backend talks to a Redis Cluster (`redis+cluster://`).
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::redis::RedisBackend::connect("redis://localhost").await?;
    /// assert!(!backend.is_cluster());
    /// # Ok(()) }
    /// ```
    pub fn is_cluster(&self) -> bool {
        match self.inner.conn {
            Conn::Single(_) => false,
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(_) => true,
            #[cfg(feature = "redis-sentinel")]
            Conn::Sentinel(_) => false,
        }
    }

    /// `'1'` for the scripts when releases are announced with `SPUBLISH` (cluster).
    fn sharded(&self) -> &'static str {
        if self.is_cluster() { "1" } else { "0" }
    }

    /// The key prefix (the `prefix` URL parameter, default `fenced`).
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::redis::RedisBackend::connect("redis://localhost?prefix=billing").await?;
    /// assert_eq!(backend.prefix(), "billing");
    /// # Ok(()) }
    /// ```
    pub fn prefix(&self) -> &str {
        &self.inner.context.config.prefix
    }

    /// The Redis key and channel names this backend uses for `key` (for operators and tests).
    /// See [`RedisKeyNames`].
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::redis::RedisBackend::connect("redis://localhost?prefix=app").await?;
    /// let names = backend.key_names(&fenced::Key::new("order:42")?);
    /// assert_eq!(names.fence, "app:{order:42}:fence");
    /// # Ok(()) }
    /// ```
    pub fn key_names(&self, key: &Key) -> RedisKeyNames {
        let base = format!("{}:{{{}}}", self.prefix(), escape(key.as_str()));
        RedisKeyNames {
            lock: format!("{base}:lock"),
            fence: format!("{base}:fence"),
            channel: format!("{base}:released"),
        }
    }

    /// How many release channels this backend is subscribed to right now (one per key that
    /// has at least one waiter in this process; on a cluster these are sharded subscriptions).
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::redis::RedisBackend::connect("redis://localhost").await?;
    /// assert_eq!(backend.subscribed_channels(), 0);
    /// # Ok(()) }
    /// ```
    pub fn subscribed_channels(&self) -> usize {
        self.inner.notifier.subscribed_channels()
    }

    /// Runs one script and returns its array reply.
    async fn run(
        &self,
        operation: Operation,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<Vec<Value>> {
        let context = &self.inner.context;
        let mut conn = self.inner.conn.clone();
        match tokio::time::timeout(
            context.config.timeout,
            invocation.invoke_async::<Value>(&mut conn),
        )
        .await
        {
            Ok(Ok(Value::Array(items))) => Ok(items),
            Ok(Ok(other)) => Err(context.unexpected(operation, &other)),
            Ok(Err(e)) => Err(context.error(operation, &e)),
            Err(_) => Err(context.timed_out(operation)),
        }
    }
}

/// `%` → `%25`, `{` → `%7B`, `}` → `%7D`: the escaped key contains no braces (so the hash tag
/// around it is exactly the key) and escaping is injective (so every key has its own names).
fn escape(key: &str) -> Cow<'_, str> {
    if !key.contains(['%', '{', '}']) {
        return Cow::Borrowed(key);
    }
    let mut out = String::with_capacity(key.len() + 8);
    for c in key.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Whether `raw` is a `redis+cluster://` or `rediss+cluster://` URL (case-insensitive scheme).
#[cfg(feature = "redis-cluster")]
fn is_cluster_url(raw: &str) -> bool {
    raw.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("redis+cluster")
            || scheme.eq_ignore_ascii_case("rediss+cluster")
    })
}

/// Opens the command connection (a connection manager, which reconnects) within the timeout.
async fn open_manager(client: &redis::Client, context: &Context) -> Result<ConnectionManager> {
    let timeout = context.config.timeout;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1));
    match tokio::time::timeout(
        timeout,
        ConnectionManager::new_with_config(client.clone(), manager_config),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(context.error(Operation::Connect, &e)),
        Err(_) => Err(context.timed_out(Operation::Connect)),
    }
}

/// Opens and checks (`PING`) a pub/sub connection within the timeout.
async fn open_pubsub(client: &redis::Client, context: &Context) -> Result<PubSub> {
    let open = async {
        let mut pubsub = client.get_async_pubsub().await?;
        // Without a password in the URL, a protected server answers the first command NOAUTH.
        pubsub.ping::<Value>().await?.extract_error()?;
        Ok::<_, RedisError>(pubsub)
    };
    match tokio::time::timeout(context.config.timeout, open).await {
        Ok(Ok(pubsub)) => Ok(pubsub),
        Ok(Err(e)) => Err(context.error(Operation::Connect, &e)),
        Err(_) => Err(context.timed_out(Operation::Connect)),
    }
}

impl Context {
    fn client(&self) -> Result<redis::Client> {
        self.client_at(&self.config.target)
    }

    /// A client for the server at `target`, a `redis://` URL (with the credentials).
    fn client_at(&self, target: &str) -> Result<redis::Client> {
        use redis::IntoConnectionInfo as _;
        let built = target.into_connection_info().and_then(|info| {
            // No `CLIENT SETINFO` on every connect: one round trip and two commands less.
            let settings = info.redis_settings().clone().set_skip_set_lib_name();
            let info = info.set_redis_settings(settings);
            match &self.config.tls_ca {
                Some((_, pem)) => redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem.clone()),
                    },
                ),
                None => redis::Client::open(info),
            }
        });
        built.map_err(|e| {
            Error::new(
                ErrorKind::InvalidConfig,
                Operation::Connect,
                format!(
                    "{} cannot be used: {}; check the URL (and the tls_ca file)",
                    self.config.redacted,
                    self.scrub(&e.to_string())
                ),
            )
        })
    }

    /// `text` with the password (and the Sentinels' password) replaced by `***`.
    fn scrub(&self, text: &str) -> String {
        let text = match self.config.password.as_deref() {
            Some(password) if !password.is_empty() => text.replace(password, "***"),
            _ => text.to_owned(),
        };
        #[cfg(feature = "redis-sentinel")]
        if let Some(password) = self
            .config
            .sentinel
            .as_ref()
            .and_then(|s| s.password.as_deref())
        {
            return text.replace(password, "***");
        }
        text
    }

    fn timed_out(&self, operation: Operation) -> Error {
        let url = &self.config.redacted;
        let timeout = self.config.timeout;
        Error::new(
            ErrorKind::Backend,
            operation,
            format!(
                "no reply from {url} within {timeout:?}; check that the server is running and reachable, that \
                 the URL's scheme matches the port (rediss:// for TLS), or raise ?timeout="
            ),
        )
        .transient(true)
    }

    fn unexpected(&self, operation: Operation, reply: &Value) -> Error {
        Error::new(
            ErrorKind::Backend,
            operation,
            format!(
                "unexpected reply from {}: {}; is this a Redis or Valkey server, and does anything else write \
                 keys under the prefix {:?}?",
                self.config.redacted,
                self.scrub(&format!("{reply:?}")),
                self.config.prefix
            ),
        )
    }

    /// Maps a `redis` error to a fenced error with a message that says what to do.
    fn error(&self, operation: Operation, e: &RedisError) -> Error {
        let url = &self.config.redacted;
        let prefix = &self.config.prefix;
        let code = server_code(e);
        let code = code.as_deref().unwrap_or("");
        let (kind, transient, message) = match e.kind() {
            redis::ErrorKind::AuthenticationFailed => (
                ErrorKind::Backend,
                false,
                format!(
                    "the server at {url} rejected the user name or password; check the password (and user) in \
                     the URL"
                ),
            ),
            _ if code == "WRONGPASS" => (
                ErrorKind::Backend,
                false,
                format!(
                    "the server at {url} rejected the user name or password; check the password (and user) in \
                     the URL"
                ),
            ),
            _ if code == "NOAUTH" => (
                ErrorKind::Backend,
                false,
                format!(
                    "the server at {url} requires a password; put it in the URL, as in \
                     redis://:PASSWORD@host:6379 (or redis://USER:PASSWORD@host:6379)"
                ),
            ),
            redis::ErrorKind::Server(ServerErrorKind::NoPerm) => (
                ErrorKind::Backend,
                false,
                format!(
                    "the Redis user of {url} lacks a permission; allow it the keys ~{prefix}:*, the channels \
                     &{prefix}:* and the commands listed in the fenced Redis backend docs"
                ),
            ),
            redis::ErrorKind::Server(
                ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::ClusterDown,
            ) => (
                ErrorKind::Backend,
                true,
                format!(
                    "the server at {url} cannot serve locks right now ({code}: loading its data, failing over, \
                     or a read-only replica); retry, and if it persists point the URL at the primary"
                ),
            ),
            redis::ErrorKind::Io if e.is_connection_refusal() => (
                ErrorKind::Backend,
                true,
                format!("connection refused; check the server is running at {url}"),
            ),
            redis::ErrorKind::Io if is_tls_failure(e) => (
                ErrorKind::Backend,
                false,
                format!(
                    "the TLS handshake with {url} failed; check the host name matches the server's certificate \
                     and trust its CA with ?tls_ca=/path/ca.pem"
                ),
            ),
            redis::ErrorKind::Io if e.to_string().contains("lookup address") => (
                ErrorKind::Backend,
                true,
                format!("cannot resolve the host name of {url}; check the host name and the DNS"),
            ),
            redis::ErrorKind::Io if e.is_timeout() => (
                ErrorKind::Backend,
                true,
                format!(
                    "timed out talking to {url}; check the server is reachable, or raise ?timeout="
                ),
            ),
            redis::ErrorKind::Io => (
                ErrorKind::Backend,
                true,
                format!(
                    "the connection to {url} failed; retrying may help, otherwise check the server is running \
                     and the scheme matches the port (rediss:// for TLS)"
                ),
            ),
            redis::ErrorKind::InvalidClientConfig => (
                ErrorKind::InvalidConfig,
                false,
                format!("{url} cannot be used; check the host, port and database number"),
            ),
            _ if code == "WRONGTYPE" => (
                ErrorKind::Backend,
                false,
                format!(
                    "a key under the prefix {prefix:?} on {url} holds data that fenced did not write; another \
                     program uses this prefix, so choose another with ?prefix="
                ),
            ),
            _ if e.detail().is_some_and(|d| d.contains("switch database"))
                || e.to_string().contains("switch database") =>
            {
                (
                    ErrorKind::InvalidConfig,
                    false,
                    format!(
                        "the server at {url} refused to select the database in the URL; use a database number \
                         the server has (default 0 to 15)"
                    ),
                )
            }
            _ => (
                ErrorKind::Backend,
                false,
                format!("the server at {url} answered with an error"),
            ),
        };
        Error::new(kind, operation, message)
            .transient(transient)
            .with_source(Cause(self.scrub(&e.to_string())))
    }
}

/// The server's error code (`NOAUTH`, `WRONGTYPE`, …), also for the first failure of a pipeline.
fn server_code(e: &RedisError) -> Option<String> {
    if let Some(code) = e.code() {
        return Some(code.to_owned());
    }
    let errors = e.clone().into_server_errors()?;
    errors.first().map(|(_, err)| err.code().to_owned())
}

/// Whether an I/O error is a TLS failure (bad certificate, wrong host name): not transient.
fn is_tls_failure(e: &RedisError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    [
        "certificate",
        "handshake",
        "tls",
        "unknownissuer",
        "notvalidforname",
    ]
    .iter()
    .any(|s| text.contains(s))
}

/// An integer in a script reply (Lua numbers arrive as integers, hash fields as strings).
fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `owner, token, label, pttl[, age[, waiters]]` as returned by the scripts.
fn holder_info(items: &[Value]) -> HolderInfo {
    let mut info = HolderInfo::new();
    info.owner = items
        .first()
        .and_then(text)
        .and_then(|s| s.parse::<OwnerId>().ok());
    info.token = items
        .get(1)
        .and_then(int)
        .and_then(|t| u64::try_from(t).ok())
        .map(FencingToken::new);
    info.label = items.get(2).and_then(text);
    info.remaining = items
        .get(3)
        .and_then(int)
        .and_then(|ms| u64::try_from(ms).ok())
        .map(Duration::from_millis);
    info.age = items
        .get(4)
        .and_then(int)
        .and_then(|ms| u64::try_from(ms).ok())
        .map(Duration::from_millis);
    info.waiters = items
        .get(5)
        .and_then(int)
        .and_then(|n| u64::try_from(n).ok());
    info
}

/// `%25` → `%`, `%7B` → `{`, `%7D` → `}`: the inverse of [`escape`]. `None` for text that
/// [`escape`] cannot have produced (a brace, or another `%` sequence), so only names fenced
/// wrote decode.
fn unescape(escaped: &str) -> Option<String> {
    if escaped.contains(['{', '}']) {
        return None;
    }
    let mut out = String::with_capacity(escaped.len());
    let mut rest = escaped;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest.get(at..at + 3)?;
        out.push(match code {
            "%25" => '%',
            "%7B" => '{',
            "%7D" => '}',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// `text` with the glob metacharacters of `SCAN MATCH` (`*`, `?`, `[`, `]`, `\`) escaped by a
/// backslash, so that the pattern matches `text` literally.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The `SCAN MATCH` pattern of the lock hashes of `backend_prefix` whose keys start with
/// `prefix`: the key prefix is escaped like a key, then glob metacharacters are escaped (in the
/// backend's prefix too). Fence keys (`…}:fence`) do not match.
fn lock_pattern(backend_prefix: &str, prefix: &str) -> String {
    format!(
        "{}:{{{}*}}:lock",
        glob_escape(backend_prefix),
        glob_escape(&escape(prefix))
    )
}

/// The primaries (host, port) named by a `CLUSTER SLOTS` reply, each once, in reply order:
/// every entry is `[first slot, last slot, [host, port, id, …] of the primary, replicas…]`.
/// `None` when the reply has another shape.
#[cfg_attr(not(feature = "redis-cluster"), allow(dead_code))]
fn primaries_of_slots(reply: &Value) -> Option<Vec<NodeAddr>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut primaries: Vec<NodeAddr> = Vec::new();
    for range in ranges {
        let Value::Array(range) = range else {
            return None;
        };
        let Some(Value::Array(node)) = range.get(2) else {
            return None;
        };
        let host = node.first().and_then(text).filter(|h| !h.is_empty())?;
        let port = node
            .get(1)
            .and_then(int)
            .and_then(|p| u16::try_from(p).ok())?;
        if !primaries.contains(&(host.clone(), port)) {
            primaries.push((host, port));
        }
    }
    Some(primaries)
}

/// How many keys one `SCAN` step asks the server to look at: each step is a short command,
/// however large the database.
const SCAN_COUNT: usize = 500;

/// A lease in whole milliseconds (rounded down: the server never keeps a lock longer than asked).
fn lease_ms(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        match self.inner.conn {
            Conn::Single(_) => "redis",
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(_) => "redis-cluster",
            #[cfg(feature = "redis-sentinel")]
            Conn::Sentinel(_) => "redis-sentinel",
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Safety::SingleServer, Binding::Lease).with_native_wait(true)
    }

    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Acquired> {
        if request.mode != Mode::Exclusive {
            return Err(Error::new(
                ErrorKind::Unsupported,
                Operation::Acquire,
                "the redis backend supports exclusive locks only",
            ));
        }
        let names = self.key_names(request.key);
        let ms = lease_ms(request.lease);
        let reply = self
            .run(
                Operation::Acquire,
                scripts::ACQUIRE
                    .key(&names.lock)
                    .key(&names.fence)
                    .arg(request.owner.to_string())
                    .arg(ms)
                    .arg(request.label),
            )
            .await?;
        match (reply.first().and_then(int), reply.get(1).and_then(int)) {
            (Some(1), Some(token)) if token > 0 => {
                self.replicated(request).await?;
                Ok(Acquired::Granted(Grant::new(
                    FencingToken::new(token.unsigned_abs()),
                    Duration::from_millis(ms),
                )))
            }
            (Some(0), _) => Ok(Acquired::Held(holder_info(&reply[1..]))),
            _ => Err(self
                .inner
                .context
                .unexpected(Operation::Acquire, &Value::Array(reply))),
        }
    }

    async fn extend(&self, lock: &LockRef<'_>, lease: Duration) -> Result<Confirm> {
        let names = self.key_names(lock.key);
        let reply = self
            .run(
                Operation::Extend,
                scripts::EXTEND
                    .key(&names.lock)
                    .arg(lock.owner.to_string())
                    .arg(lease_ms(lease)),
            )
            .await?;
        let confirm = self.confirm(Operation::Extend, reply)?;
        if confirm == Confirm::Done {
            // An extension the replicas do not have would be lost in a failover, and the lock
            // would end earlier than its holder believes: unconfirmed, the old deadline stands.
            if let Some(acked) = self.too_few_replicas(&names.lock).await? {
                let config = &self.inner.context.config;
                return Err(Error::new(
                    ErrorKind::Backend,
                    Operation::Extend,
                    format!(
                        "extension not confirmed (replication): {acked} of the {} replicas asked for \
                         (min_replicas) acknowledged it on {} within {:?}; the lock keeps its earlier deadline",
                        config.min_replicas, config.redacted, self.replica_wait()
                    ),
                )
                .transient(true)
                .with_key(lock.key.as_str()));
            }
        }
        Ok(confirm)
    }

    async fn release(&self, lock: &LockRef<'_>) -> Result<Confirm> {
        let names = self.key_names(lock.key);
        let reply = self
            .run(
                Operation::Release,
                scripts::RELEASE
                    .key(&names.lock)
                    .arg(lock.owner.to_string())
                    .arg(&names.channel)
                    .arg(self.sharded()),
            )
            .await?;
        self.confirm(Operation::Release, reply)
    }

    async fn watch(&self, key: &Key) -> Result<Box<dyn Watch>> {
        let channel = self.key_names(key).channel;
        Ok(Box::new(self.inner.notifier.watch(channel).await))
    }

    async fn holder(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let names = self.key_names(key);
        let reply = self
            .run(
                Operation::Admin,
                scripts::HOLDER
                    .key(&names.lock)
                    .arg(&names.channel)
                    .arg(self.sharded()),
            )
            .await?;
        self.found(reply)
    }

    async fn force_release(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let names = self.key_names(key);
        let reply = self
            .run(
                Operation::Admin,
                scripts::FORCE_RELEASE
                    .key(&names.lock)
                    .arg(&names.channel)
                    .arg(self.sharded()),
            )
            .await?;
        self.found(reply)
    }

    /// `SCAN`s the database for lock hashes under the prefix (never `KEYS`, which blocks the
    /// server), then reads each batch's holders with one pipeline of holder scripts. On a
    /// cluster, every primary is scanned in turn (`CLUSTER SLOTS` names them) and the holders
    /// are read one key at a time (the keys of a batch are in different slots).
    async fn list(&self, prefix: &str) -> Result<Vec<HolderInfo>> {
        let pattern = lock_pattern(self.prefix(), prefix);
        let mut held = Vec::new();
        for node in self.scan_nodes().await? {
            let mut cursor = String::from("0");
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(&cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT);
                let reply = self.scan_step(node.as_ref(), scan).await?;
                let (next, names) = self.scan_reply(reply)?;
                let keys: Vec<Key> = names
                    .iter()
                    .filter_map(|name| self.key_of_lock_name(name))
                    .filter(|key| key.as_str().starts_with(prefix))
                    .collect();
                if !keys.is_empty() {
                    held.extend(self.holders(keys).await?);
                }
                if next == "0" {
                    break;
                }
                cursor = next;
            }
        }
        // SCAN may return a key more than once.
        held.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        held.dedup_by(|a, b| a.key == b.key);
        Ok(held)
    }
}

/// A cluster node to send a command to: host and port.
type NodeAddr = (String, u16);

impl RedisBackend {
    /// The nodes `list` scans: `None` for the one server, or every primary of a cluster.
    async fn scan_nodes(&self) -> Result<Vec<Option<NodeAddr>>> {
        match &self.inner.conn {
            Conn::Single(_) => Ok(vec![None]),
            #[cfg(feature = "redis-sentinel")]
            Conn::Sentinel(_) => Ok(vec![None]),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(conn) => {
                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                let mut conn = conn.clone();
                let reply = self
                    .timed(
                        Operation::Admin,
                        conn.route_command(
                            redis::cmd("CLUSTER").arg("SLOTS").clone(),
                            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                        ),
                    )
                    .await?;
                let primaries = primaries_of_slots(&reply)
                    .ok_or_else(|| self.inner.context.unexpected(Operation::Admin, &reply))?;
                Ok(primaries.into_iter().map(Some).collect())
            }
        }
    }

    /// One `SCAN` step, on the one server or on the cluster node `node`.
    async fn scan_step(&self, node: Option<&NodeAddr>, scan: redis::Cmd) -> Result<Value> {
        match (&self.inner.conn, node) {
            #[cfg(feature = "redis-cluster")]
            (Conn::Cluster(conn), Some((host, port))) => {
                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                let mut conn = conn.clone();
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                self.timed(Operation::Admin, conn.route_command(scan, route))
                    .await
            }
            _ => {
                let mut conn = self.inner.conn.clone();
                self.timed(Operation::Admin, scan.query_async(&mut conn))
                    .await
            }
        }
    }

    /// `WAIT` for `wanted` replicas for at most `wait_ms`: on the one server, or on the primary
    /// that owns the slot of `lock` (the cluster connection keeps one connection per node, the
    /// one the grant went through).
    async fn wait_replicas(
        &self,
        lock: &str,
        wanted: u32,
        wait_ms: u64,
    ) -> redis::RedisResult<i64> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(wanted).arg(wait_ms);
        match &self.inner.conn {
            Conn::Single(conn) => {
                let _ = lock;
                wait.query_async::<i64>(&mut conn.clone()).await
            }
            #[cfg(feature = "redis-sentinel")]
            Conn::Sentinel(conn) => wait.query_async::<i64>(&mut conn.clone()).await,
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(conn) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(lock, SlotAddr::Master),
                ));
                match conn.clone().route_command(wait, route).await? {
                    Value::Int(n) => Ok(n),
                    other => Err(RedisError::from((
                        redis::ErrorKind::UnexpectedReturnType,
                        "WAIT did not answer with an integer",
                        format!("{other:?}"),
                    ))),
                }
            }
        }
    }

    /// The key whose lock hash is called `name`, or `None` when `name` is not such a name
    /// (written by another program under the prefix, or not UTF-8).
    fn key_of_lock_name(&self, name: &[u8]) -> Option<Key> {
        let escaped = std::str::from_utf8(name)
            .ok()?
            .strip_prefix(self.prefix())?
            .strip_prefix(":{")?
            .strip_suffix("}:lock")?;
        Key::new(unescape(escaped)?).ok()
    }

    /// The cursor and key names of a `SCAN` reply.
    fn scan_reply(&self, reply: Value) -> Result<(String, Vec<Vec<u8>>)> {
        if let Value::Array(items) = &reply {
            if let [cursor, Value::Array(names)] = items.as_slice() {
                let names: Option<Vec<Vec<u8>>> = names
                    .iter()
                    .map(|n| match n {
                        Value::BulkString(bytes) => Some(bytes.clone()),
                        _ => None,
                    })
                    .collect();
                if let (Some(cursor), Some(names)) = (text(cursor), names) {
                    return Ok((cursor, names));
                }
            }
        }
        Err(self.inner.context.unexpected(Operation::Admin, &reply))
    }

    /// The holders of `keys`, read by one pipeline: the holder script is loaded first (so the
    /// `EVALSHA`s after it cannot miss it), then run once per key. Keys released since the
    /// `SCAN` saw them are left out.
    async fn holders(&self, keys: Vec<Key>) -> Result<Vec<HolderInfo>> {
        if self.is_cluster() {
            let mut held = Vec::with_capacity(keys.len());
            for key in keys {
                if let Some(mut info) = self.holder(&key).await? {
                    info.key = Some(key);
                    held.push(info);
                }
            }
            return Ok(held);
        }
        let mut pipe = redis::pipe();
        pipe.cmd("SCRIPT")
            .arg("LOAD")
            .arg(&scripts::HOLDER.source)
            .ignore();
        for key in &keys {
            let names = self.key_names(key);
            pipe.cmd("EVALSHA")
                .arg(scripts::HOLDER.get_hash())
                .arg(1)
                .arg(&names.lock)
                .arg(&names.channel)
                .arg(self.sharded());
        }
        let mut conn = self.inner.conn.clone();
        let replies: Vec<Value> = self
            .timed(Operation::Admin, pipe.query_async(&mut conn))
            .await?;
        if replies.len() != keys.len() {
            return Err(self
                .inner
                .context
                .unexpected(Operation::Admin, &Value::Array(replies)));
        }
        let mut held = Vec::with_capacity(keys.len());
        for (key, reply) in keys.into_iter().zip(replies) {
            let items = match reply {
                Value::Array(items) => items,
                other => return Err(self.inner.context.unexpected(Operation::Admin, &other)),
            };
            if let Some(mut info) = self.found(items)? {
                info.key = Some(key);
                held.push(info);
            }
        }
        Ok(held)
    }

    /// Awaits one command or pipeline within the timeout, mapping its errors.
    async fn timed<T>(
        &self,
        operation: Operation,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        let context = &self.inner.context;
        match tokio::time::timeout(context.config.timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(context.error(operation, &e)),
            Err(_) => Err(context.timed_out(operation)),
        }
    }

    /// With `min_replicas`, waits (`WAIT`) until that many replicas have the grant just made on
    /// this connection; when fewer acknowledge in `replica_timeout`, gives the grant back and
    /// fails with "not acquired (replication)" (transient: the client may retry).
    async fn replicated(&self, request: &AcquireRequest<'_>) -> Result<()> {
        let lock = self.key_names(request.key).lock;
        let too_few = self.too_few_replicas(&lock).await;
        if matches!(too_few, Ok(None)) {
            return Ok(());
        }
        // Owner-checked, so it never touches another owner's lock; if it fails, the lease ends it.
        let _ = self
            .release(&LockRef::new(request.key, request.owner))
            .await;
        let config = &self.inner.context.config;
        let acked = too_few
            .map_err(|e| e.with_operation(Operation::Acquire))?
            .unwrap_or_default();
        Err(Error::new(
            ErrorKind::Backend,
            Operation::Acquire,
            format!(
                "not acquired (replication): {acked} of the {} replicas asked for (min_replicas) acknowledged \
                 the grant on {} within {:?}; the grant was given back. Check the replicas (INFO replication), \
                 or lower min_replicas",
                config.min_replicas, config.redacted, self.replica_wait()
            ),
        )
        .transient(true)
        .with_key(request.key.as_str()))
    }

    /// With `min_replicas`: `WAIT`s for that many replicas to have this connection's writes so
    /// far (on the node of `lock`'s slot); `None` when they do (or `min_replicas` is 0), else how
    /// many acknowledged within `replica_timeout` ("no answer" when the wait itself timed out).
    async fn too_few_replicas(&self, lock: &str) -> Result<Option<String>> {
        let config = &self.inner.context.config;
        if config.min_replicas == 0 {
            return Ok(None);
        }
        let wanted = config.min_replicas;
        let wait_ms = u64::try_from(self.replica_wait().as_millis()).unwrap_or(u64::MAX);
        let acked = tokio::time::timeout(
            self.replica_wait() + config.timeout,
            self.wait_replicas(lock, wanted, wait_ms),
        )
        .await;
        match acked {
            Ok(Ok(n)) if n >= i64::from(wanted) => Ok(None),
            Ok(Ok(n)) => Ok(Some(n.to_string())),
            Ok(Err(e)) => Err(self.inner.context.error(Operation::Admin, &e)),
            Err(_) => Ok(Some("no answer".to_owned())),
        }
    }

    /// How long a `WAIT` may take: `replica_timeout`, but at most 3/4 of `timeout`. `WAIT`
    /// blocks the connection it is sent on, whose replies the client awaits for at most
    /// `timeout`: a longer one would be cut, and the give-back of a refused grant would queue
    /// behind it, time out too and leave the grant until its lease ends.
    fn replica_wait(&self) -> Duration {
        let config = &self.inner.context.config;
        config.replica_timeout.min(config.timeout * 3 / 4)
    }

    /// Reads the reply of the extend and release scripts.
    fn confirm(&self, operation: Operation, reply: Vec<Value>) -> Result<Confirm> {
        match reply.first().and_then(int) {
            Some(1) => Ok(Confirm::Done),
            Some(0) => Ok(Confirm::NotHeld(None)),
            Some(2) => Ok(Confirm::NotHeld(Some(holder_info(&reply[1..])))),
            _ => Err(self
                .inner
                .context
                .unexpected(operation, &Value::Array(reply))),
        }
    }

    /// Reads the reply of the holder and force-release scripts.
    fn found(&self, reply: Vec<Value>) -> Result<Option<HolderInfo>> {
        match reply.first().and_then(int) {
            Some(0) => Ok(None),
            Some(1) => Ok(Some(holder_info(&reply[1..]))),
            _ => Err(self
                .inner
                .context
                .unexpected(Operation::Admin, &Value::Array(reply))),
        }
    }
}

/// One node's answer to a Redlock grant (see the Redlock backend).
#[cfg(feature = "redlock")]
#[derive(Debug)]
pub(crate) enum NodeGrant {
    /// Granted on this node (or refreshed for the same owner) with this node's token.
    Granted(u64),
    /// Held by another owner on this node.
    Held(HolderInfo),
}

/// The per-node steps of the Redlock backend, which runs a [`RedisBackend`] per node.
#[cfg(feature = "redlock")]
impl RedisBackend {
    /// Redlock's grant on this node (the same reply shape as [`Backend::acquire`]).
    pub(crate) async fn redlock_grant(&self, request: &AcquireRequest<'_>) -> Result<NodeGrant> {
        let names = self.key_names(request.key);
        let reply = self
            .run(
                Operation::Acquire,
                scripts::REDLOCK_ACQUIRE
                    .key(&names.lock)
                    .key(&names.fence)
                    .arg(request.owner.to_string())
                    .arg(lease_ms(request.lease))
                    .arg(request.label),
            )
            .await?;
        match (reply.first().and_then(int), reply.get(1).and_then(int)) {
            (Some(1), Some(token)) if token > 0 => Ok(NodeGrant::Granted(token.unsigned_abs())),
            (Some(0), _) => Ok(NodeGrant::Held(holder_info(&reply[1..]))),
            _ => Err(self
                .inner
                .context
                .unexpected(Operation::Acquire, &Value::Array(reply))),
        }
    }

    /// Redlock's second round on this node: sets the grant's token to `token` (and the counter
    /// to at least `token`) while `owner` still holds the lock here. `false` when it does not.
    pub(crate) async fn redlock_raise(
        &self,
        key: &Key,
        owner: &OwnerId,
        token: u64,
    ) -> Result<bool> {
        let names = self.key_names(key);
        let reply = self
            .run(
                Operation::Acquire,
                scripts::REDLOCK_RAISE
                    .key(&names.lock)
                    .key(&names.fence)
                    .arg(owner.to_string())
                    .arg(token),
            )
            .await?;
        match reply.first().and_then(int) {
            Some(1) => Ok(true),
            Some(0) => Ok(false),
            _ => Err(self
                .inner
                .context
                .unexpected(Operation::Acquire, &Value::Array(reply))),
        }
    }

    /// The server's uptime, from `INFO server` (for the Redlock restart check).
    pub(crate) async fn uptime(&self) -> Result<Duration> {
        let mut conn = self.inner.conn.clone();
        let info: String = self
            .timed(
                Operation::Admin,
                redis::cmd("INFO").arg("server").query_async(&mut conn),
            )
            .await?;
        info.lines()
            .find_map(|line| line.strip_prefix("uptime_in_seconds:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
            .ok_or_else(|| {
                self.inner
                    .context
                    .unexpected(Operation::Admin, &Value::SimpleString(info.clone()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_and_leaves_no_braces() {
        for key in [
            "plain",
            "{",
            "}",
            "%",
            "%7B",
            "{a}{b}",
            "%25{%}",
            "ü{ }%7D",
            "order:42/x",
        ] {
            let escaped = escape(key);
            assert!(!escaped.contains(['{', '}']), "{key}: {escaped}");
            assert_eq!(unescape(&escaped).as_deref(), Some(key), "{escaped}");
        }
        // Distinct keys get distinct names.
        assert_ne!(escape("{"), escape("%7B"));
        assert_ne!(escape("%25"), escape("%"));
        // Only what `escape` writes decodes: anything else is not a fenced name.
        for foreign in ["{", "a}b", "%", "%2", "%41", "%7b", "50%"] {
            assert_eq!(unescape(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn escaped_prefixes_are_prefixes_of_escaped_keys() {
        // What lets `list` match the escaped prefix: escaping maps each character on its own
        // and no escape sequence is the start of another, so `key` starts with `prefix` exactly
        // when escape(key) starts with escape(prefix).
        let samples = [
            "", "%", "{", "}", "%7", "%7B", "a", "a%", "a%2", "a{", "ab", "%25",
        ];
        for key in samples {
            for prefix in samples {
                assert_eq!(
                    escape(key).starts_with(&*escape(prefix)),
                    key.starts_with(prefix),
                    "key {key:?}, prefix {prefix:?}"
                );
            }
        }
    }

    #[test]
    fn glob_metacharacters_are_escaped() {
        assert_eq!(glob_escape("plain:key/1 x"), "plain:key/1 x");
        assert_eq!(glob_escape(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f");
        assert_eq!(glob_escape("{%}^-!"), "{%}^-!");
        assert_eq!(lock_pattern("fenced", ""), "fenced:{*}:lock");
        assert_eq!(lock_pattern("fenced", "job:"), "fenced:{job:*}:lock");
        assert_eq!(
            lock_pattern("app*", "a{*}%?[x]\\"),
            r"app\*:{a%7B\*%7D%25\?\[x\]\\*}:lock"
        );
    }

    #[test]
    fn replies_parse() {
        let items = [
            Value::BulkString(b"0123456789abcdef0123456789abcdef".to_vec()),
            Value::Int(7),
            Value::BulkString(b"worker".to_vec()),
            Value::Int(1500),
            Value::Int(250),
            Value::Int(3),
        ];
        let info = holder_info(&items);
        assert_eq!(info.token, Some(FencingToken::new(7)));
        assert_eq!(info.label.as_deref(), Some("worker"));
        assert_eq!(info.remaining, Some(Duration::from_millis(1500)));
        assert_eq!(info.age, Some(Duration::from_millis(250)));
        assert_eq!(info.waiters, Some(3));
        assert!(info.owner.is_some());
        // Older locks have no grant time; a user without PUBSUB NUMSUB gets no waiter count.
        let info = holder_info(&[
            Value::BulkString(b"0123456789abcdef0123456789abcdef".to_vec()),
            Value::Int(7),
            Value::BulkString(b"worker".to_vec()),
            Value::Int(1500),
            Value::Nil,
            Value::Nil,
        ]);
        assert_eq!((info.age, info.waiters), (None, None));
        let info = holder_info(&[
            Value::BulkString(b"junk".to_vec()),
            Value::Nil,
            Value::Nil,
            Value::Int(-1),
        ]);
        assert_eq!(info.owner, None);
        assert_eq!(info.remaining, None);
        assert_eq!(lease_ms(Duration::from_micros(1500)), 1);
        assert_eq!(lease_ms(Duration::from_secs(30)), 30_000);
    }

    #[test]
    fn cluster_slots_name_the_primaries() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("10.0.0.2", 7001),
            ]),
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(10999),
                node("10.0.0.1", 7000),
            ]),
        ]);
        assert_eq!(
            primaries_of_slots(&reply),
            Some(vec![
                ("10.0.0.1".to_owned(), 7000),
                ("10.0.0.2".to_owned(), 7001)
            ])
        );
        assert_eq!(primaries_of_slots(&Value::Int(1)), None);
        assert_eq!(
            primaries_of_slots(&Value::Array(vec![Value::Array(vec![Value::Int(0)])])),
            None
        );
    }

    #[tokio::test]
    async fn refused_connection_is_transient_and_redacted() {
        // Port 1 on loopback: nothing listens there.
        let e = RedisBackend::connect("redis://:hunter2@127.0.0.1:1/0?timeout=1s")
            .await
            .unwrap_err();
        let text = e.to_string();
        assert_eq!(e.kind(), ErrorKind::Backend, "{text}");
        assert!(e.is_transient(), "{text}");
        assert!(
            text.contains("check the server is running at redis://:***@127.0.0.1:1/0"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!format!("{e:?}").contains("hunter2"));
    }
}
