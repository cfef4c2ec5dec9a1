//! Redis Sentinel (`redis+sentinel://`, `rediss+sentinel://`): the single-server backend against
//! the primary that the Sentinels name, following it when it moves.
//!
//! The command connection is a [`Primary`]: the connection manager of the current primary,
//! replaced when the primary moves. Everything sent through it — scripts, `WAIT`, `SCAN` — is what
//! the single-server backend sends. The primary is looked up through the Sentinels with the
//! `redis` crate's [`SentinelClient`], one per Sentinel, all at once (each skips a primary its
//! Sentinel flags as down and checks with `ROLE` that the node named is a primary; the first
//! primary found wins, so a Sentinel that does not answer delays nothing):
//!
//! - at connect;
//! - when a command fails in a way a failover explains (the connection broke or was refused, or
//!   the node answered `READONLY` or `MASTERDOWN`) and the node no longer answers `ROLE` as a
//!   primary (on a connection of its own): if the Sentinels name another primary, the backend
//!   moves to it, and a command that the old node refused or that could not be sent is sent
//!   once more, to the new one. A Sentinel that has not heard of the last failover yet still
//!   names the old primary, which stays writable until the Sentinels demote it, so a lookup never
//!   moves the backend away from a node that still serves as primary. Checks are at most one per
//!   [`LOOKUP_GAP`];
//! - when a Sentinel announces `+switch-master` for the name: a background task subscribes to it
//!   on one Sentinel at a time (a random one first, then the next one whenever that connection
//!   fails, which a `PING` every [`PING_EVERY`](super::wait::PING_EVERY) finds out) and moves to
//!   the announced address at once. A graceful failover leaves the old primary writable until the
//!   Sentinels turn it into a replica (some seconds later), so an error would come late. After
//!   subscribing, the task checks the primary as after a failed command, since an announcement
//!   may have been missed meanwhile.
//!
//! A move is checked before it is made (`ROLE` on the new node says primary). After it, the
//! pub/sub task drops its connection and subscribes again on the new primary, then wakes every
//! waiter so that each re-checks there: a release on the old primary may never reach the new one.

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, PubSubSink, PubSubStream};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, RedisConnectionInfo, RedisError, RedisResult, ServerErrorKind, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::config::{RedisConfig, SentinelConfig};
use super::wait::{self, Notifier, Reconnector};
use super::{Conn, Context, Inner, RedisBackend, open_manager, open_pubsub, server_code};
use crate::error::{Cause, Error, ErrorKind, Operation, Result};
use crate::url::ensure_crypto_provider;

/// After a lookup that found the same primary, the least time before a failed command may
/// cause another.
const LOOKUP_GAP: Duration = Duration::from_millis(100);
/// The reconnect backoff of the `+switch-master` subscription, after every Sentinel failed once.
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);

/// A node's address as the Sentinels name it.
type Address = (String, u16);

/// Whether `raw` is a `redis+sentinel://` or `rediss+sentinel://` URL (case-insensitive scheme).
pub(super) fn is_sentinel_url(raw: &str) -> bool {
    raw.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("redis+sentinel")
            || scheme.eq_ignore_ascii_case("rediss+sentinel")
    })
}

/// The command connection of a Sentinel backend (cheap to clone; clones share the primary).
#[derive(Clone)]
pub(super) struct Primary(Arc<Shared>);

struct Shared {
    context: Arc<Context>,
    /// The Sentinels' lookup, one at a time, and when the last one found the same primary.
    lookup: tokio::sync::Mutex<(Vec<SentinelClient>, Option<Instant>)>,
    current: Mutex<Current>,
    /// Tells the pub/sub task to move to the new primary.
    reconnector: OnceLock<Reconnector>,
    /// The `+switch-master` task, stopped with the backend.
    watcher: OnceLock<AbortOnDrop>,
}

/// The primary in use.
#[derive(Clone)]
struct Current {
    /// Counts moves, so that commands that failed on the same primary cause one lookup.
    generation: u64,
    address: Address,
    client: redis::Client,
    conn: ConnectionManager,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why the primary is looked up (or moved to).
enum Trigger {
    /// A command on this generation's primary failed in a way a failover explains.
    Failed(u64),
    /// A Sentinel announced this address as the new primary.
    Announced(Address),
    /// The `+switch-master` subscription was (re)made: announcements may have been missed.
    Resubscribed,
}

impl RedisBackend {
    /// Connects to the primary that the Sentinels named by `raw` (`redis+sentinel://…`,
    /// `rediss+sentinel://…`) monitor, and follows it.
    pub(crate) async fn from_sentinel_str(raw: &str) -> Result<RedisBackend> {
        let config = RedisConfig::from_sentinel_str(raw)?;
        if config.tls {
            ensure_crypto_provider();
        }
        let sentinel = match &config.sentinel {
            Some(sentinel) => sentinel.clone(),
            None => {
                return Err(crate::url::invalid(format!(
                    "{} names no Sentinels",
                    config.redacted
                )));
            }
        };
        let context = Arc::new(Context { config });
        let sentinels = sentinel_clients(&context, &sentinel)?;
        let mut lookup = lookup_clients(&context, &sentinel)?;

        let address = match find(&mut lookup, context.config.timeout).await {
            Ok(address) => address,
            Err(e) => return Err(diagnose(&context, &sentinel, &sentinels, &e).await),
        };
        let at_primary = |e: Error| at_primary(e, &address, &sentinel.master);
        let client = context
            .client_at(&node_url(&context, &address)?)
            .map_err(at_primary)?;
        // The pub/sub connection first: it checks the primary's address, TLS and the data nodes'
        // credentials once, without the retries of the connection manager.
        let pubsub = open_pubsub(&client, &context).await.map_err(at_primary)?;
        let conn = open_checked(&client, &context).await.map_err(at_primary)?;

        let shared = Arc::new(Shared {
            context: context.clone(),
            lookup: tokio::sync::Mutex::new((lookup, Some(Instant::now()))),
            current: Mutex::new(Current {
                generation: 0,
                address,
                client,
                conn,
            }),
            reconnector: OnceLock::new(),
            watcher: OnceLock::new(),
        });
        let reconnect: wait::Connect = {
            let shared = shared.clone();
            Box::new(move || {
                let shared = shared.clone();
                Box::pin(async move { shared.open_pubsub().await })
            })
        };
        let notifier = Notifier::start(pubsub, reconnect, context.config.timeout);
        let _ = shared.reconnector.set(notifier.reconnector());
        let watcher = tokio::spawn(watch(
            Arc::downgrade(&shared),
            sentinels,
            sentinel.master.clone(),
            context.config.timeout,
        ));
        let _ = shared.watcher.set(AbortOnDrop(watcher));
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                conn: Conn::Sentinel(Primary(shared)),
                context,
                notifier,
            }),
        })
    }
}

impl Primary {
    /// Runs `run` on the current primary's connection. When it fails in a way a failover
    /// explains, asks the Sentinels; a command that was surely not executed (refused by a
    /// replica, or not sent) runs once more on the new primary.
    async fn call<T, F, Fut>(&self, run: F) -> RedisResult<T>
    where
        F: Fn(ConnectionManager) -> Fut + Send,
        Fut: Future<Output = RedisResult<T>> + Send,
    {
        let (generation, conn) = {
            let current = self.0.current();
            (current.generation, current.conn)
        };
        let error = match run(conn).await {
            Err(e) if moved(&e) => e,
            other => return other,
        };
        match self.0.follow(Trigger::Failed(generation)).await {
            Ok(Some(conn)) if not_executed(&error) => run(conn).await,
            Ok(_) => Err(error),
            Err(problem) => {
                debug!(%problem, "fenced: redis sentinel lookup after a failed command");
                Err(error)
            }
        }
    }

    pub(super) fn get_db(&self) -> i64 {
        redis::aio::ConnectionLike::get_db(&self.0.current().conn)
    }
}

impl redis::aio::ConnectionLike for Primary {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        Box::pin(self.call(move |mut conn| async move { conn.req_packed_command(cmd).await }))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        Box::pin(self.call(move |mut conn| async move {
            conn.req_packed_commands(pipeline, offset, count).await
        }))
    }

    fn get_db(&self) -> i64 {
        Primary::get_db(self)
    }
}

impl Shared {
    fn current(&self) -> Current {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Looks the primary up (or takes the announced one) and moves to it if it is another.
    /// Returns the connection to use now when the primary changed since `trigger`'s.
    async fn follow(
        &self,
        trigger: Trigger,
    ) -> std::result::Result<Option<ConnectionManager>, String> {
        let mut lookup = self.lookup.lock().await;
        let (clients, last) = &mut *lookup;
        let current = self.current();
        let timeout = self.context.config.timeout;
        let address = match trigger {
            Trigger::Failed(generation) if generation != current.generation => {
                return Ok(Some(current.conn));
            }
            Trigger::Failed(_) if last.is_some_and(|at| at.elapsed() < LOOKUP_GAP) => {
                return Ok(None);
            }
            Trigger::Announced(address) => address,
            Trigger::Failed(_) | Trigger::Resubscribed => {
                *last = Some(Instant::now());
                // A Sentinel that has not heard of the last failover yet still names the old
                // primary, which stays writable until the Sentinels demote it: a lookup moves
                // the backend only away from a node that no longer serves as primary.
                if serves(&current.client, timeout).await {
                    return Ok(None);
                }
                let found = find(clients, timeout).await;
                *last = Some(Instant::now());
                found.map_err(|e| self.context.scrub(&e.to_string()))?
            }
        };
        if address == current.address {
            return Ok(None);
        }
        let master = self
            .context
            .config
            .sentinel
            .as_ref()
            .map_or("", |s| s.master.as_str());
        let client = self
            .context
            .client_at(&node_url(&self.context, &address).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let conn = open_checked(&client, &self.context)
            .await
            .map_err(|e| format!("{}:{}: {e}", address.0, address.1))?;
        let from = {
            let mut slot = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            let from = std::mem::replace(&mut slot.address, address.clone());
            slot.generation += 1;
            slot.client = client;
            slot.conn = conn.clone();
            from
        };
        info!(
            master,
            from = %format!("{}:{}", from.0, from.1),
            to = %format!("{}:{}", address.0, address.1),
            "fenced: the Redis primary moved (Sentinel); commands and subscriptions follow it"
        );
        if let Some(reconnector) = self.reconnector.get() {
            reconnector.reconnect();
        }
        Ok(Some(conn))
    }

    /// Opens the pub/sub connection on the current primary; when that fails, asks the
    /// Sentinels before the pub/sub task's next attempt.
    async fn open_pubsub(&self) -> std::result::Result<redis::aio::PubSub, String> {
        let current = self.current();
        match open_pubsub(&current.client, &self.context).await {
            Ok(pubsub) => Ok(pubsub),
            Err(e) => {
                if let Err(problem) = self.follow(Trigger::Failed(current.generation)).await {
                    debug!(%problem, "fenced: redis sentinel lookup after a failed subscription");
                }
                Err(e.to_string())
            }
        }
    }
}

/// Whether a failed command may mean that the primary moved: the connection broke or was
/// refused, or the node is a replica now.
fn moved(e: &RedisError) -> bool {
    e.is_io_error() || not_executed(e)
}

/// Whether a failed command surely did not run: refused by a replica, or never sent.
fn not_executed(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    ) || matches!(server_code(e).as_deref(), Some("READONLY" | "MASTERDOWN"))
        || e.is_connection_refusal()
}

/// Asks the Sentinels for the primary, within `timeout`: each through its own lookup client,
/// all at once, and the first primary found wins (so a Sentinel that hangs delays nothing). When
/// none is found, the error met on a primary that a Sentinel named is preferred to "not found",
/// as it says more.
async fn find(clients: &mut [SentinelClient], timeout: Duration) -> RedisResult<Address> {
    type Lookup<'a> =
        std::pin::Pin<Box<dyn Future<Output = RedisResult<redis::Client>> + Send + 'a>>;
    let mut lookups: Vec<Option<Lookup<'_>>> = clients
        .iter_mut()
        .map(|client| Some(Box::pin(client.async_get_client()) as Lookup<'_>))
        .collect();
    let mut failures: Vec<RedisError> = Vec::new();
    let race = std::future::poll_fn(|cx| {
        for slot in &mut lookups {
            let Some(lookup) = slot else { continue };
            if let std::task::Poll::Ready(result) = lookup.as_mut().poll(cx) {
                *slot = None;
                match result {
                    Ok(found) => return std::task::Poll::Ready(Some(found)),
                    Err(e) => failures.push(e),
                }
            }
        }
        if lookups.iter().all(Option::is_none) {
            std::task::Poll::Ready(None)
        } else {
            std::task::Poll::Pending
        }
    });
    let found = match tokio::time::timeout(timeout, race).await {
        Ok(Some(found)) => found,
        Ok(None) => {
            let named = failures
                .iter()
                .position(|e| e.kind() != redis::ErrorKind::MasterNameNotFoundBySentinel);
            let at = named.unwrap_or(0);
            return Err(if failures.is_empty() {
                RedisError::from((redis::ErrorKind::EmptySentinelList, "no Sentinel"))
            } else {
                failures.swap_remove(at)
            });
        }
        Err(_) => {
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the Sentinels gave no primary within {timeout:?}"),
            )));
        }
    };
    match found.get_connection_info().addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            Ok((host.clone(), *port))
        }
        other => Err(RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "the Sentinels named a primary that is not host:port",
            format!("{other:?}"),
        ))),
    }
}

/// The data nodes' URL (credentials, database) with the primary's address.
fn node_url(context: &Context, (host, port): &Address) -> Result<String> {
    let mut url = url::Url::parse(&context.config.target)
        .map_err(|_| crate::url::invalid(format!("{} cannot be used", context.config.redacted)))?;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    if url.set_host(Some(&host)).is_err() || url.set_port(Some(*port)).is_err() {
        return Err(Error::new(
            ErrorKind::Backend,
            Operation::Connect,
            format!(
                "the Sentinels of {} name the primary {host}:{port}, which is not an address fenced can \
                 connect to",
                context.config.redacted
            ),
        ));
    }
    Ok(url.into())
}

/// Whether a `ROLE` reply says primary.
fn is_primary(role: &Value) -> bool {
    match role {
        Value::Array(items) => matches!(
            items.first(),
            Some(Value::BulkString(role)) if role == b"master"
        ),
        _ => false,
    }
}

/// Whether `client`'s node answers `ROLE` as a primary within `timeout`, on a connection of
/// its own (the command connection may be the one that failed, or wait behind a `WAIT`).
async fn serves(client: &redis::Client, timeout: Duration) -> bool {
    let ask = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("ROLE").query_async::<Value>(&mut conn).await
    };
    matches!(tokio::time::timeout(timeout, ask).await, Ok(Ok(role)) if is_primary(&role))
}

/// Opens the command connection to `client`'s node and checks (`ROLE`) that it is a primary.
async fn open_checked(client: &redis::Client, context: &Context) -> Result<ConnectionManager> {
    let mut conn = open_manager(client, context).await?;
    let role = match tokio::time::timeout(
        context.config.timeout,
        redis::cmd("ROLE").query_async::<Value>(&mut conn),
    )
    .await
    {
        Ok(Ok(role)) => role,
        Ok(Err(e)) => return Err(context.error(Operation::Connect, &e)),
        Err(_) => return Err(context.timed_out(Operation::Connect)),
    };
    if is_primary(&role) {
        Ok(conn)
    } else {
        Err(Error::new(
            ErrorKind::Backend,
            Operation::Connect,
            "the node is not a primary (ROLE); a failover may be in progress",
        )
        .transient(true))
    }
}

/// `e` with the primary that it happened on (`e` keeps its kind, cause and whether it is
/// transient).
fn at_primary(e: Error, (host, port): &Address, master: &str) -> Error {
    let out = Error::new(
        e.kind(),
        e.operation(),
        format!(
            "the primary {host}:{port} that the Sentinels name for {master:?}: {}",
            e.message()
        ),
    )
    .transient(e.is_transient());
    match std::error::Error::source(&e) {
        Some(cause) => out.with_source(Cause(cause.to_string())),
        None => out,
    }
}

/// The Sentinels' address with TLS when the URL asks for it.
fn sentinel_addr(context: &Context, (host, port): &Address) -> ConnectionAddr {
    if context.config.tls {
        ConnectionAddr::TcpTls {
            host: host.clone(),
            port: *port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host.clone(), *port)
    }
}

/// The certificates to trust (`tls_ca`), for the `redis` crate.
fn certificates(context: &Context) -> Option<redis::TlsCertificates> {
    context
        .config
        .tls_ca
        .as_ref()
        .map(|(_, pem)| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.clone()),
        })
}

/// A client per Sentinel (for the `+switch-master` subscription and for [`diagnose`]).
fn sentinel_clients(
    context: &Context,
    sentinel: &SentinelConfig,
) -> Result<Vec<(Address, redis::Client)>> {
    let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
    if let Some(user) = &sentinel.user {
        settings = settings.set_username(user);
    }
    if let Some(password) = &sentinel.password {
        settings = settings.set_password(password);
    }
    sentinel
        .sentinels
        .iter()
        .map(|address| {
            use redis::IntoConnectionInfo as _;
            let built = sentinel_addr(context, address)
                .into_connection_info()
                .and_then(|info| {
                    let info = info.set_redis_settings(settings.clone());
                    match certificates(context) {
                        Some(certs) => redis::Client::build_with_tls(info, certs),
                        None => redis::Client::open(info),
                    }
                });
            built.map(|client| (address.clone(), client)).map_err(|e| {
                crate::url::invalid(format!(
                    "{} cannot be used: {}; check the URL (and the tls_ca file)",
                    context.config.redacted,
                    context.scrub(&e.to_string())
                ))
            })
        })
        .collect()
}

/// The `redis` crate's Sentinel clients that look the primary up, one per Sentinel.
fn lookup_clients(context: &Context, sentinel: &SentinelConfig) -> Result<Vec<SentinelClient>> {
    sentinel
        .sentinels
        .iter()
        .map(|address| lookup_client(context, sentinel, address))
        .collect()
}

/// The `redis` crate's Sentinel client that looks the primary up through the Sentinel at
/// `address`.
fn lookup_client(
    context: &Context,
    sentinel: &SentinelConfig,
    address: &Address,
) -> Result<SentinelClient> {
    use redis::IntoConnectionInfo as _;
    let invalid = |e: RedisError| {
        crate::url::invalid(format!(
            "{} cannot be used: {}; check the URL (and the tls_ca file)",
            context.config.redacted,
            context.scrub(&e.to_string())
        ))
    };
    let node = context
        .config
        .target
        .as_str()
        .into_connection_info()
        .map_err(invalid)?;
    let node = node.redis_settings();
    let addresses = [sentinel_addr(context, address)];
    let mut builder =
        SentinelClientBuilder::new(addresses, &sentinel.master, SentinelServerType::Master)
            .map_err(invalid)?
            .set_client_to_redis_db(node.db());
    if let Some(user) = node.username() {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = node.password() {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(user) = &sentinel.user {
        builder = builder.set_client_to_sentinel_username(user);
    }
    if let Some(password) = &sentinel.password {
        builder = builder.set_client_to_sentinel_password(password);
    }
    if context.config.tls {
        builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
        if let Some(certs) = certificates(context) {
            builder = builder
                .set_client_to_redis_certificates(certs.clone())
                .set_client_to_sentinel_certificates(certs);
        }
    }
    builder.build().map_err(invalid)
}

/// Why the lookup at connect failed, in words that say what to do: each Sentinel is asked
/// `SENTINEL get-master-addr-by-name` directly, which separates Sentinels that cannot be
/// reached (or refuse the Sentinel credentials) from a name they do not know and from a primary
/// that is down or refuses the data nodes' credentials.
async fn diagnose(
    context: &Context,
    sentinel: &SentinelConfig,
    sentinels: &[(Address, redis::Client)],
    failure: &RedisError,
) -> Error {
    let url = &context.config.redacted;
    let master = &sentinel.master;
    let timeout = context.config.timeout;
    let mut asks = tokio::task::JoinSet::new();
    for (index, (_, client)) in sentinels.iter().enumerate() {
        let client = client.clone();
        let master = master.clone();
        asks.spawn(async move {
            let ask = async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&master)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
            };
            (index, tokio::time::timeout(timeout, ask).await)
        });
    }
    let mut named = None;
    let mut unknown = 0;
    let mut problems: Vec<(usize, Option<RedisError>)> = Vec::new();
    while let Some(answer) = asks.join_next().await {
        match answer {
            Ok((_, Ok(Ok(Some(address))))) => named = Some(address),
            Ok((_, Ok(Ok(None)))) => unknown += 1,
            Ok((index, Ok(Err(e)))) => problems.push((index, Some(e))),
            Ok((index, Err(_))) => problems.push((index, None)),
            Err(_) => {}
        }
    }
    problems.sort_by_key(|(index, _)| *index);
    let list: Vec<String> = sentinel
        .sentinels
        .iter()
        .map(|(host, port)| format!("{host}:{port}"))
        .collect();
    let list = list.join(", ");

    if let Some(address) = named {
        // The name is known: the primary is the problem.
        if failure.kind() == redis::ErrorKind::MasterNameNotFoundBySentinel {
            return Error::new(
                ErrorKind::Backend,
                Operation::Connect,
                format!(
                    "the Sentinels of {url} know {master:?}, but flag its primary {}:{} as down or it does not \
                     answer as a primary (a failover may be in progress); retry, or check the data nodes",
                    address.0, address.1
                ),
            )
            .transient(true)
            .with_source(Cause(context.scrub(&failure.to_string())));
        }
        return at_primary(context.error(Operation::Connect, failure), &address, master);
    }
    if unknown > 0 {
        return Error::new(
            ErrorKind::InvalidConfig,
            Operation::Connect,
            format!(
                "no Sentinel of {url} monitors a primary named {master:?}; check the name in the URL's path \
                 (SENTINEL MASTERS on a Sentinel lists the names it monitors)"
            ),
        );
    }
    let detail = problems
        .iter()
        .find_map(|(_, e)| e.as_ref())
        .unwrap_or(failure);
    let cause = Cause(context.scrub(&detail.to_string()));
    if let Some(e) = problems
        .iter()
        .find_map(|(_, e)| e.as_ref().filter(|e| is_auth(e)))
    {
        let message = if sentinel.password.is_some() {
            format!(
                "the Sentinels of {url} refused sentinel_user/sentinel_password; Sentinels often take no \
                 password: remove sentinel_password, or give the one set with requirepass in sentinel.conf \
                 (the password before the hosts is the data nodes')"
            )
        } else {
            format!(
                "the Sentinels of {url} require a password; add ?sentinel_password=… (and sentinel_user=… for \
                 an ACL user): the password before the hosts is the data nodes'"
            )
        };
        return Error::new(ErrorKind::Backend, Operation::Connect, message)
            .with_source(Cause(context.scrub(&e.to_string())));
    }
    if problems
        .iter()
        .any(|(_, e)| e.as_ref().is_some_and(super::is_tls_failure))
    {
        return Error::new(
            ErrorKind::Backend,
            Operation::Connect,
            format!(
                "the TLS handshake with the Sentinels of {url} failed; check that their certificates name the \
                 addresses in the URL and trust their CA with ?tls_ca=/path/ca.pem"
            ),
        )
        .with_source(cause);
    }
    if let Some((index, _)) = problems.iter().find(|(_, e)| {
        e.as_ref().is_some_and(|e| {
            e.to_string()
                .to_ascii_lowercase()
                .contains("unknown command")
        })
    }) {
        let (host, port) = &sentinel.sentinels[*index];
        return Error::new(
            ErrorKind::InvalidConfig,
            Operation::Connect,
            format!(
                "{host}:{port} in {url} is not a Sentinel (it does not know the SENTINEL command); list the \
                 Sentinels' addresses (port 26379 by default), not the data nodes'"
            ),
        )
        .with_source(cause);
    }
    Error::new(
        ErrorKind::Backend,
        Operation::Connect,
        format!(
            "no Sentinel of {url} answered ({list}); check that they run and are reachable, that the URL lists \
             the Sentinels (port 26379 by default) and that its scheme matches (rediss+sentinel:// for TLS)"
        ),
    )
    .transient(true)
    .with_source(cause)
}

/// Whether `e` is a refused password (or a password given to a server that has none).
fn is_auth(e: &RedisError) -> bool {
    let text = e.to_string();
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(server_code(e).as_deref(), Some("WRONGPASS" | "NOAUTH"))
        || (text.contains("AUTH") && text.contains("password"))
}

/// The `+switch-master` task: listens on one Sentinel at a time, in turn, and moves the backend
/// to each announced primary of `master`. Ends when the backend is gone.
async fn watch(
    shared: Weak<Shared>,
    sentinels: Vec<(Address, redis::Client)>,
    master: String,
    timeout: Duration,
) {
    let mut failures: u32 = 0;
    // Backends start at different Sentinels, to spread the subscriptions.
    let start = rand::random_range(0..sentinels.len().max(1));
    for (address, client) in sentinels.iter().cycle().skip(start) {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            Ok::<_, RedisError>(pubsub)
        };
        let problem = match tokio::time::timeout(timeout, subscribed).await {
            Ok(Ok(pubsub)) => {
                let Some(backend) = shared.upgrade() else {
                    return;
                };
                if let Err(problem) = backend.follow(Trigger::Resubscribed).await {
                    debug!(%problem, "fenced: redis sentinel lookup after subscribing");
                }
                drop(backend);
                let (mut sink, mut stream) = pubsub.split();
                let started = Instant::now();
                let Some(problem) = listen(&shared, &master, &mut sink, &mut stream, timeout).await
                else {
                    return;
                };
                if started.elapsed() > RESUBSCRIBE_MAX {
                    failures = 0;
                }
                problem
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no reply within {timeout:?}"),
        };
        match shared.upgrade() {
            Some(backend) => debug!(
                sentinel = %format!("{}:{}", address.0, address.1),
                problem = %backend.context.scrub(&problem),
                "fenced: redis sentinel +switch-master subscription lost; trying the next Sentinel"
            ),
            None => return,
        }
        failures += 1;
        if failures as usize >= sentinels.len() {
            let delay = RESUBSCRIBE_MIN
                .saturating_mul(1 << (failures as usize - sentinels.len()).min(6))
                .min(RESUBSCRIBE_MAX);
            tokio::time::sleep(delay / 2 + crate::options::jitter(delay / 2)).await;
        }
    }
}

/// Serves one `+switch-master` subscription until it fails (`Some(why)`) or the backend is gone
/// (`None`).
async fn listen(
    shared: &Weak<Shared>,
    master: &str,
    sink: &mut PubSubSink,
    stream: &mut PubSubStream,
    timeout: Duration,
) -> Option<String> {
    let mut ping = tokio::time::interval(wait::PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.reset();
    loop {
        tokio::select! {
            message = wait::next_message(stream) => {
                let message = message?;
                let payload: String = message.get_payload().unwrap_or_default();
                // `<name> <old ip> <old port> <new ip> <new port>`
                let words: Vec<&str> = payload.split_whitespace().collect();
                let [name, _, _, host, port] = words.as_slice() else {
                    continue;
                };
                let (true, Ok(port)) = (*name == master, port.parse::<u16>()) else {
                    continue;
                };
                let backend = shared.upgrade()?;
                if let Err(problem) = backend.follow(Trigger::Announced(((*host).to_owned(), port))).await {
                    warn!(
                        master,
                        to = %format!("{host}:{port}"),
                        %problem,
                        "fenced: a Sentinel announced a new Redis primary, but it cannot be used yet; the next \
                         failed command looks it up again"
                    );
                }
            }
            _ = ping.tick() => {
                shared.upgrade()?;
                match tokio::time::timeout(timeout, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Some(format!("ping failed: {e}")),
                    Err(_) => return Some(format!("ping got no reply within {timeout:?}")),
                }
            }
        }
    }
}
