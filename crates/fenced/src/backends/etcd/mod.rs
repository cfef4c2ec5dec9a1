#![doc = include_str!("README.md")]

mod config;
mod session;
mod wait;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget,
    Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use tokio::time::Instant;

use crate::Backend;
use crate::backend::{
    AcquireRequest, Acquired, Binding, Capabilities, Confirm, Grant, HolderInfo, LockRef, Mode,
    Safety, SessionState, Watch,
};
use crate::error::{Cause, Error, ErrorKind, Operation, Result};
use crate::key::Key;
use crate::token::{FencingToken, OwnerId};
use crate::url::ensure_crypto_provider;

use config::EtcdConfig;
pub(crate) use config::fold_endpoints;
use session::Session;
use wait::{EtcdWatch, Predecessor, Waits};

/// Opens the backend named by `url` (called by [`connect`](crate::connect)).
pub(crate) async fn open(url: &url::Url) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(EtcdBackend::from_url(url).await?))
}

/// The etcd backend (`etcd://`, `etcds://`). Cheap to clone; clones share one connection and
/// one session.
///
/// Usually built through [`connect`](crate::connect); see the [module docs](self) for the URL
/// parameters and for what this backend does and does not guarantee.
///
/// ```no_run
/// # async fn demo() -> fenced::Result<()> {
/// use fenced::backends::etcd::EtcdBackend;
/// let backend = EtcdBackend::connect("etcd://10.0.0.1:2379,10.0.0.2:2379?prefix=billing").await?;
/// let client = fenced::Client::new(backend);
/// let guard = client.lock("invoice:17").await?;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EtcdBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: etcd_client::Client,
    config: EtcdConfig,
    session: Session,
    waits: Arc<Waits>,
}

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("config", &self.inner.config)
            .field("session", &self.inner.session)
            .finish()
    }
}

/// What a caller's own etcd transaction needs to check that a lock is still held: the holder's
/// key and its create revision (which is also the lock's fencing token). Build the compare with
/// [`compare`](OwnerCheck::compare), or from the two fields with any etcd client.
///
/// ```no_run
/// # async fn demo(backend: fenced::backends::etcd::EtcdBackend, guard: &fenced::LockGuard) -> fenced::Result<()> {
/// use etcd_client::{Txn, TxnOp};
/// let check = backend.owner_check(guard);
/// // Write only while this guard still holds the lock:
/// let txn = Txn::new()
///     .when([check.compare()])
///     .and_then([TxnOp::put("orders/42/state", "refunded", None)]);
/// // let answer = my_etcd_client.txn(txn).await?; answer.succeeded() says whether it applied.
/// # let _ = txn;
/// # Ok(()) }
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerCheck {
    /// The etcd key of the holder's queue entry.
    pub key: Vec<u8>,
    /// Its create revision: the lock's fencing token.
    pub create_revision: i64,
}

impl OwnerCheck {
    /// `create_revision(key) == create_revision`: true exactly while this grant holds the lock
    /// (a released, expired or broken lock's key is gone, and a new grant has another key).
    pub fn compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.create_revision)
    }
}

impl EtcdBackend {
    /// Connects to the cluster named by `url` (`etcd://…` or `etcds://…`, see the
    /// [module docs](self) for the parameters) and starts the session.
    ///
    /// Connecting is eager: unreachable endpoints, a TLS problem or wrong credentials fail here
    /// with a message that says what to check (and never shows the password).
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future closes whatever it opened; a session lease granted just
    /// before ends with its TTL. No lock is taken by connecting.
    pub async fn connect(url: &str) -> Result<EtcdBackend> {
        let parsed = crate::url::parse(&fold_endpoints(url))?;
        EtcdBackend::from_url(&parsed).await
    }

    pub(crate) async fn from_url(url: &url::Url) -> Result<EtcdBackend> {
        let config = EtcdConfig::from_url(url)?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_keep_alive(config.timeout, config.timeout)
            .with_require_leader(true);
        if let Some((user, password)) = &config.user {
            options = options.with_user(user.clone(), password.clone());
        }
        if config.tls {
            ensure_crypto_provider();
            let mut tls = etcd_client::TlsOptions::new();
            tls = match &config.tls_ca {
                Some((_, pem)) => tls.ca_certificate(etcd_client::Certificate::from_pem(pem)),
                None => tls.with_native_roots(),
            };
            options = options.with_tls(tls);
        }
        let context = Context { config: &config };
        let connecting = etcd_client::Client::connect(config.endpoint_urls(), Some(options));
        let client = match tokio::time::timeout(config.timeout * 2, connecting).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(context.error(Operation::Connect, &e)),
            Err(_) => return Err(context.timed_out(Operation::Connect)),
        };
        // The session lease: also the first request, so it checks reachability and credentials.
        let mut lease_client = client.lease_client();
        let ttl = config.session_ttl.as_secs() as i64;
        let deadline = Instant::now() + config.timeout * 2;
        let mut attempt = 1;
        let (sent, granted) = loop {
            let sent = Instant::now();
            match tokio::time::timeout_at(deadline, lease_client.grant(ttl, None)).await {
                Ok(Ok(granted)) => break (sent, granted),
                // Another endpoint may answer: the balancer picks again.
                Ok(Err(e)) if attempt < 2 * config.endpoints.len() && is_unreachable(&e) => {
                    attempt += 1;
                }
                Ok(Err(e)) => return Err(context.error(Operation::Connect, &e)),
                Err(_) => return Err(context.timed_out(Operation::Connect)),
            }
        };
        let session = Session::start(
            lease_client,
            granted.id(),
            sent,
            config.session_ttl,
            config.timeout,
        );
        Ok(EtcdBackend {
            inner: Arc::new(Inner {
                client,
                config,
                session,
                waits: Arc::default(),
            }),
        })
    }

    /// The key prefix (the `prefix` URL parameter, default `fenced`).
    pub fn prefix(&self) -> &str {
        &self.inner.config.prefix
    }

    /// The TTL of the session lease (the `session_ttl` URL parameter, default 10 s): how long a
    /// crashed or cut-off client's locks outlive its last keep-alive.
    pub fn session_ttl(&self) -> Duration {
        self.inner.session.ttl()
    }

    /// The id of the session's current etcd lease (it changes when a session ended and a new one
    /// began). For operators and tests, e.g. `etcdctl lease timetolive <id in hex>`.
    pub fn session_lease_id(&self) -> i64 {
        self.inner.session.lease().id
    }

    /// The etcd key prefix under which `key`'s queue lives (`<prefix>/<escaped key>/`; `%` and
    /// `/` in the key are escaped as `%25` and `%2F`). Each queued owner's entry is this prefix
    /// followed by the owner id.
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::etcd::EtcdBackend::connect("etcd://localhost:2379?prefix=app").await?;
    /// assert_eq!(backend.queue_prefix(&fenced::Key::new("orders/42")?), "app/orders%2F42/");
    /// # Ok(()) }
    /// ```
    pub fn queue_prefix(&self, key: &Key) -> String {
        format!("{}/{}/", self.prefix(), escape(key.as_str()))
    }

    /// What to put in your own etcd transaction so that it applies only while `guard` still
    /// holds its lock — etcd's `IsOwner` compare. The create revision is the guard's fencing
    /// token. See [`OwnerCheck`].
    pub fn owner_check(&self, guard: &crate::LockGuard) -> OwnerCheck {
        self.owner_check_of(guard.key(), &guard.owner(), guard.token())
    }

    /// [`owner_check`](EtcdBackend::owner_check) from the key, owner id and token of a grant
    /// (for example a lock taken by `fenced lock` in another process).
    pub fn owner_check_of(&self, key: &Key, owner: &OwnerId, token: FencingToken) -> OwnerCheck {
        OwnerCheck {
            key: self.entry_key(key, owner).into_bytes(),
            create_revision: token.get() as i64,
        }
    }

    /// How many delete events this backend's watches have received so far: a release or expiry
    /// wakes exactly the next waiter in line, so this grows by one per hand-off, not by the
    /// number of waiters.
    pub fn watch_events(&self) -> u64 {
        self.inner.waits.events()
    }

    fn entry_key(&self, key: &Key, owner: &OwnerId) -> String {
        format!("{}{owner}", self.queue_prefix(key))
    }

    fn context(&self) -> Context<'_> {
        Context {
            config: &self.inner.config,
        }
    }

    /// A request with the backend's timeout and error mapping. A request that could not reach
    /// an endpoint (refused, reset, unavailable) is sent again within the timeout, so that the
    /// client's balancer tries the other endpoints: every request of this backend is safe to
    /// repeat (puts are conditional, deletes and reads idempotent).
    async fn timed<T, F, Fut>(&self, operation: Operation, mut request: F) -> Result<T>
    where
        F: FnMut(etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.inner.config.timeout;
        let attempts = 2 * self.inner.config.endpoints.len();
        let mut attempt = 1;
        loop {
            match tokio::time::timeout_at(deadline, request(self.inner.client.clone())).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) if attempt < attempts && is_unreachable(&e) => attempt += 1,
                Ok(Err(e)) => {
                    if is_lease_not_found(&e) {
                        self.inner.session.suspect();
                    }
                    return Err(self.context().error(operation, &e));
                }
                Err(_) => return Err(self.context().timed_out(operation)),
            }
        }
    }

    async fn txn(&self, operation: Operation, txn: Txn) -> Result<TxnResponse> {
        self.timed(operation, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    async fn get(
        &self,
        operation: Operation,
        key: String,
        options: GetOptions,
    ) -> Result<Vec<KeyValue>> {
        let mut answer = self
            .timed(operation, |mut c| {
                let (key, options) = (key.clone(), options.clone());
                async move { c.get(key, Some(options)).await }
            })
            .await?;
        Ok(answer.take_kvs())
    }

    /// The first entry of a queue (by create revision) as a read inside a transaction.
    fn first_of(queue: &str) -> TxnOp {
        TxnOp::get(
            queue,
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_limit(1),
            ),
        )
    }

    /// The holder described by its queue entry.
    fn holder_info(&self, kv: &KeyValue) -> HolderInfo {
        let mut info = HolderInfo::new();
        let key = kv.key();
        info.owner = key
            .iter()
            .rposition(|b| *b == b'/')
            .and_then(|i| std::str::from_utf8(&key[i + 1..]).ok())
            .and_then(|s| s.parse().ok());
        info.token = u64::try_from(kv.create_revision())
            .ok()
            .map(FencingToken::new);
        info.label = Some(String::from_utf8_lossy(kv.value()).into_owned());
        info
    }

    /// The remaining TTL of `lease` as the server sees it (whole seconds, rounded down).
    async fn lease_remaining(&self, lease: i64) -> Result<Option<Duration>> {
        if lease == 0 {
            return Ok(None);
        }
        let answer = self
            .timed(Operation::Admin, |mut c| async move {
                c.lease_time_to_live(lease, None).await
            })
            .await?;
        Ok(u64::try_from(answer.ttl()).ok().map(Duration::from_secs))
    }

    /// Reads a queue: every entry, sorted by create revision.
    async fn queue(&self, key: &Key) -> Result<Vec<KeyValue>> {
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        self.get(Operation::Admin, self.queue_prefix(key), options)
            .await
    }

    /// Holder information from a queue read: the first entry, the others counted as waiters.
    async fn describe(&self, queue: &[KeyValue]) -> Result<Option<HolderInfo>> {
        let Some(first) = queue.first() else {
            return Ok(None);
        };
        let mut info = self.holder_info(first);
        info.waiters = Some(queue.len() as u64 - 1);
        info.remaining = self.lease_remaining(first.lease()).await?;
        Ok(Some(info))
    }
}

/// `%` → `%25`, `/` → `%2F`: every key gets its own queue prefix, and the escaped form of a key
/// prefix is a prefix of the escaped forms of exactly the keys that start with it.
fn escape(key: &str) -> Cow<'_, str> {
    if !key.contains(['%', '/']) {
        return Cow::Borrowed(key);
    }
    let mut out = String::with_capacity(key.len() + 8);
    for c in key.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn unescape(escaped: &str) -> Option<String> {
    let mut out = String::with_capacity(escaped.len());
    let mut rest = escaped;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i..i + 3)?;
        out.push(match code {
            "%25" => '%',
            "%2F" => '/',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// A request that did not reach a working endpoint (so another endpoint may answer).
fn is_unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("lease not found"))
}

/// The responses of a transaction's operations.
fn gets(answer: &TxnResponse) -> Vec<Vec<KeyValue>> {
    answer
        .op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(mut g) => Some(g.take_kvs()),
            _ => None,
        })
        .collect()
}

fn revision(answer: &TxnResponse) -> i64 {
    answer.header().map_or(0, |h| h.revision())
}

/// What error messages need to know about the connection.
struct Context<'a> {
    config: &'a EtcdConfig,
}

impl Context<'_> {
    fn scrub(&self, text: &str) -> String {
        match &self.config.user {
            Some((_, password)) if !password.is_empty() => text.replace(password.as_str(), "***"),
            _ => text.to_owned(),
        }
    }

    fn timed_out(&self, operation: Operation) -> Error {
        Error::new(
            ErrorKind::Backend,
            operation,
            format!(
                "etcd at {} did not answer within {:?}; check that the endpoints are reachable and the cluster \
                 has a leader (or raise ?timeout=)",
                self.config.redacted, self.config.timeout
            ),
        )
        .transient(true)
    }

    fn error(&self, operation: Operation, e: &etcd_client::Error) -> Error {
        use tonic::Code;
        let detail = self.scrub(&e.to_string());
        let at = &self.config.redacted;
        let (message, transient) = match e {
            etcd_client::Error::GRpcStatus(status) => match status.code() {
                Code::Unauthenticated => (
                    format!(
                        "etcd at {at} refused the credentials ({}); check the user name and password in the URL",
                        self.scrub(status.message())
                    ),
                    false,
                ),
                Code::PermissionDenied => (
                    format!(
                        "etcd at {at} denied the request ({}); the user needs read and write permission on the \
                         keys under {}/",
                        self.scrub(status.message()),
                        self.config.prefix
                    ),
                    false,
                ),
                Code::InvalidArgument if status.message().contains("authentication failed") => (
                    format!(
                        "etcd at {at} refused the credentials ({}); check the user name and password in the URL",
                        self.scrub(status.message())
                    ),
                    false,
                ),
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => (
                    format!(
                        "etcd at {at} rejected the request: {}",
                        self.scrub(status.message())
                    ),
                    status.message().contains("lease not found"),
                ),
                Code::NotFound if status.message().contains("lease not found") => (
                    format!("the etcd session lease at {at} ended; a new session is starting"),
                    true,
                ),
                _ => (
                    format!(
                        "etcd at {at} failed ({}); check that the endpoints are reachable and the cluster has a leader",
                        self.scrub(status.message())
                    ),
                    true,
                ),
            },
            etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => (
                format!("{at} cannot be used: {detail}; check the URL"),
                false,
            ),
            _ => (
                format!(
                    "cannot reach etcd at {at} ({detail}); check that the endpoints are reachable (and the TLS \
                     settings: etcds:// and tls_ca)"
                ),
                true,
            ),
        };
        Error::new(ErrorKind::Backend, operation, message)
            .with_source(Cause(detail))
            .transient(transient)
    }
}

#[async_trait]
impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Safety::Consensus, Binding::Session)
            .with_native_wait(true)
            .with_max_lease(Some(self.inner.session.ttl()))
            .with_queue(true)
    }

    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Acquired> {
        if request.mode != Mode::Exclusive {
            return Err(Error::new(
                ErrorKind::Unsupported,
                Operation::Acquire,
                "the etcd backend supports exclusive locks only",
            ));
        }
        let key = request.key;
        let owner = *request.owner;
        let queue = self.queue_prefix(key);
        let me = self.entry_key(key, &owner);
        let sent = Instant::now();
        let lease = self.inner.session.lease();
        if lease.valid_until <= sent || *self.inner.session.state().borrow() == SessionState::Ended
        {
            self.inner.session.suspect();
            return Err(Error::new(
                ErrorKind::Backend,
                Operation::Acquire,
                format!(
                    "the etcd session at {} is not confirmed alive (keep-alives are not answered); retry shortly",
                    self.inner.config.redacted
                ),
            )
            .transient(true));
        }
        // Put the entry if absent (with the session lease), then read it and the queue's head.
        let put = TxnOp::put(
            me.clone(),
            request.label,
            Some(PutOptions::new().with_lease(lease.id)),
        );
        // An owner that already waits keeps its place only if its entry is still the one it
        // created: an entry that vanished went with its session's lease, and must not be
        // silently replaced by a new one (nor be reported as a grant).
        let place = self.inner.waits.place(key, &owner);
        let reads = [TxnOp::get(me.clone(), None), Self::first_of(&queue)];
        let txn = match place {
            None => Txn::new()
                .when([Compare::create_revision(me.clone(), CompareOp::Equal, 0)])
                .and_then([put, reads[0].clone(), reads[1].clone()])
                .or_else(reads),
            Some(mine) => Txn::new()
                .when([Compare::create_revision(me.clone(), CompareOp::Equal, mine)])
                .and_then(reads),
        };
        // While the transaction runs, make sure the session lease outlives the requested lease
        // (one keep-alive, shared with every other lock of this client, when the last one is too
        // old), so that a grant can promise all of it.
        let timeout = self.inner.config.timeout;
        let (answer, alive) = tokio::join!(
            self.txn(Operation::Acquire, txn),
            tokio::time::timeout(
                timeout,
                self.inner.session.alive_until(sent + request.lease)
            )
        );
        let alive = alive.ok().flatten();
        let answer = answer?;
        if place.is_some() && !answer.succeeded() {
            self.inner.waits.clear(key, &owner);
            return Err(Error::new(
                ErrorKind::Backend,
                Operation::Acquire,
                format!(
                    "this waiter's place in the queue of {key:?} is gone: its etcd session lease ended (expired or                      was revoked) while it waited, so it was not granted the lock; acquire again"
                ),
            ));
        }
        let at = revision(&answer);
        let reads = gets(&answer);
        let (Some(mine), Some(head)) = (
            reads.first().and_then(|r| r.first()).cloned(),
            reads.get(1).and_then(|r| r.first()).cloned(),
        ) else {
            // The entry vanished between the put and the read: its lease just ended.
            self.inner.session.suspect();
            return Err(Error::new(
                ErrorKind::Backend,
                Operation::Acquire,
                "the etcd session ended during the acquisition; retry",
            )
            .transient(true));
        };
        let my_revision = mine.create_revision();
        if head.key() == me.as_bytes() {
            self.inner.waits.clear(key, &owner);
            let lease = alive.unwrap_or_else(|| self.inner.session.lease());
            let applied = if mine.lease() == lease.id {
                request
                    .lease
                    .min(lease.valid_until.saturating_duration_since(sent))
            } else {
                Duration::ZERO
            };
            if applied.is_zero() {
                // Held by an entry whose session is not the current one (or about to end):
                // give it back rather than report a grant that may already be gone.
                let _ = self.release(&LockRef::new(key, &owner)).await;
                return Err(Error::new(
                    ErrorKind::Backend,
                    Operation::Acquire,
                    "the etcd session is ending; retry",
                )
                .transient(true));
            }
            return Ok(Acquired::Granted(Grant::new(
                FencingToken::new(my_revision as u64),
                applied,
            )));
        }
        let holder = self.holder_info(&head);
        if !request.queue {
            // A single try: leave nothing behind (owner-checked by the entry's create revision).
            let undo = Txn::new()
                .when([Compare::create_revision(
                    me.clone(),
                    CompareOp::Equal,
                    my_revision,
                )])
                .and_then([TxnOp::delete(me, None)]);
            self.txn(Operation::Acquire, undo).await?;
            self.inner.waits.clear(key, &owner);
            return Ok(Acquired::Held(holder));
        }
        // Queued: find the predecessor (the highest create revision below ours) in the same
        // snapshot, and wait for its deletion from there on.
        let options = GetOptions::new()
            .with_prefix()
            .with_max_create_revision(my_revision - 1)
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(1)
            .with_keys_only()
            .with_revision(at);
        let predecessor = self
            .get(Operation::Acquire, queue.clone(), options)
            .await?
            .into_iter()
            .next()
            .map_or_else(|| head.key().to_vec(), |kv| kv.key().to_vec());
        self.inner.waits.set(
            key,
            owner,
            Predecessor {
                key: predecessor,
                queue: queue.into_bytes(),
                seen_at: at,
                mine: my_revision,
            },
        );
        Ok(Acquired::Held(holder))
    }

    async fn extend(&self, lock: &LockRef<'_>, lease: Duration) -> Result<Confirm> {
        let ttl = self.inner.session.ttl();
        if lease > ttl {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                Operation::Extend,
                format!(
                    "an etcd lock lives in its client's session, which the server keeps for session_ttl={ttl:?} \
                     past the last keep-alive; extend by at most that, or raise session_ttl in the URL"
                ),
            ));
        }
        let sent = Instant::now();
        // The session lease must certainly outlive the extension.
        let Some(session) = self.inner.session.alive_until(sent + lease).await else {
            return Err(Error::new(
                ErrorKind::Backend,
                Operation::Extend,
                format!(
                    "the etcd session at {} could not be confirmed alive for the next {lease:?} (keep-alives are \
                     not answered); the lock is at risk",
                    self.inner.config.redacted
                ),
            )
            .transient(true));
        };
        let me = self.entry_key(lock.key, lock.owner);
        let queue = self.queue_prefix(lock.key);
        let txn = Txn::new()
            .when([
                Compare::create_revision(me.clone(), CompareOp::Greater, 0),
                Compare::lease(me.clone(), CompareOp::Equal, session.id),
            ])
            .and_then([Self::first_of(&queue)])
            .or_else([Self::first_of(&queue)]);
        let answer = self.txn(Operation::Extend, txn).await?;
        let head = gets(&answer)
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next());
        match head {
            Some(head) if answer.succeeded() && head.key() == me.as_bytes() => Ok(Confirm::Done),
            head => Ok(Confirm::NotHeld(head.map(|h| self.holder_info(&h)))),
        }
    }

    async fn release(&self, lock: &LockRef<'_>) -> Result<Confirm> {
        let me = self.entry_key(lock.key, lock.owner);
        let queue = self.queue_prefix(lock.key);
        // Read the head first, then delete the entry: whether it held the lock or only waited,
        // its place is given back.
        let txn = Txn::new()
            .when([Compare::create_revision(me.clone(), CompareOp::Greater, 0)])
            .and_then([Self::first_of(&queue), TxnOp::delete(me.clone(), None)])
            .or_else([Self::first_of(&queue)]);
        let answer = self.txn(Operation::Release, txn).await?;
        self.inner.waits.clear(lock.key, lock.owner);
        let head = gets(&answer)
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next());
        match head {
            Some(head) if answer.succeeded() && head.key() == me.as_bytes() => Ok(Confirm::Done),
            head => Ok(Confirm::NotHeld(head.map(|h| self.holder_info(&h)))),
        }
    }

    async fn watch(&self, key: &Key) -> Result<Box<dyn Watch>> {
        Ok(Box::new(EtcdWatch::new(
            self.inner.client.watch_client(),
            self.inner.waits.clone(),
            key.clone(),
        )))
    }

    async fn holder(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let queue = self.queue(key).await?;
        self.describe(&queue).await
    }

    async fn force_release(&self, key: &Key) -> Result<Option<HolderInfo>> {
        for _ in 0..10 {
            let queue = self.queue(key).await?;
            let Some(head) = queue.first() else {
                return Ok(None);
            };
            let info = self.describe(&queue).await?;
            let txn = Txn::new()
                .when([Compare::create_revision(
                    head.key().to_vec(),
                    CompareOp::Equal,
                    head.create_revision(),
                )])
                .and_then([TxnOp::delete(head.key().to_vec(), None)]);
            if self.txn(Operation::Admin, txn).await?.succeeded() {
                return Ok(info);
            }
        }
        Err(Error::new(
            ErrorKind::Backend,
            Operation::Admin,
            "the lock changed hands ten times while it was being broken; try again",
        )
        .transient(true))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<HolderInfo>> {
        let range = format!("{}/{}", self.prefix(), escape(prefix));
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let entries = self.get(Operation::Admin, range, options).await?;
        let base = format!("{}/", self.prefix());
        let mut queues: HashMap<Key, Vec<KeyValue>> = HashMap::new();
        for entry in entries {
            let Some(rest) = entry.key().strip_prefix(base.as_bytes()) else {
                continue;
            };
            let Some(slash) = rest.iter().position(|b| *b == b'/') else {
                continue;
            };
            let Some(key) = std::str::from_utf8(&rest[..slash])
                .ok()
                .and_then(unescape)
                .and_then(|k| Key::new(k).ok())
            else {
                continue;
            };
            if !key.as_str().starts_with(prefix) {
                continue;
            }
            queues.entry(key).or_default().push(entry);
        }
        let mut remaining: HashMap<i64, Option<Duration>> = HashMap::new();
        let mut out = Vec::with_capacity(queues.len());
        for (key, mut entries) in queues {
            entries.sort_by_key(KeyValue::create_revision);
            let head = &entries[0];
            let mut info = self.holder_info(head);
            info.waiters = Some(entries.len() as u64 - 1);
            info.remaining = match remaining.get(&head.lease()) {
                Some(r) => *r,
                None => {
                    let r = self.lease_remaining(head.lease()).await?;
                    remaining.insert(head.lease(), r);
                    r
                }
            };
            info.key = Some(key);
            out.push(info);
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn session_state(&self) -> Option<tokio::sync::watch::Receiver<SessionState>> {
        Some(self.inner.session.state())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_and_keeps_prefixes() {
        for key in ["plain", "a/b", "50%", "%2F", "/", "a%/b"] {
            let escaped = escape(key);
            assert!(!escaped.contains('/'), "{key}");
            assert_eq!(unescape(&escaped).as_deref(), Some(key));
        }
        assert!(escape("a/b/c").starts_with(&*escape("a/")));
        assert!(!escape("a%2Fb").starts_with(&*escape("a/")));
        assert_eq!(unescape("bad%"), None);
        assert_eq!(unescape("%41"), None);
    }

    #[tokio::test]
    async fn unreachable_endpoints_fail_clearly_and_redacted() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let e = EtcdBackend::connect(&format!(
            "etcd://user:hunter2@127.0.0.1:{port}?timeout=200ms"
        ))
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
        assert!(e.is_transient());
        let text = e.to_string();
        assert!(text.contains("etcd at etcd://user:***@127.0.0.1"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
