#![doc = include_str!("README.md")]

mod config;
mod wait;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use zookeeper_client as zk;

use crate::backend::{
    AcquireRequest, Acquired, Backend, Binding, Capabilities, Confirm, Grant, HolderInfo, LockRef,
    Safety, SessionState, Watch,
};
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::key::Key;
use crate::token::{FencingToken, OwnerId};

use config::ZkConfig;

/// Opens the backend named by `url` (called by [`connect`](crate::connect)).
pub(crate) async fn open(url: &url::Url) -> Result<Arc<dyn Backend>> {
    open_str(url.as_str()).await
}

/// Opens the backend named by the raw URL text (a list of hosts is not a valid [`url::Url`]).
pub(crate) async fn open_str(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(ZooKeeperBackend::connect(url).await?))
}

/// The ZooKeeper backend (`zk://`). Cheap to clone; clones share one session, which serves all
/// their locks.
///
/// Usually built through [`connect`](crate::connect); see the [module docs](self) for the URL
/// parameters and for what this backend does and does not guarantee.
///
/// ```no_run
/// # async fn demo() -> fenced::Result<()> {
/// use fenced::backends::zookeeper::ZooKeeperBackend;
/// let backend = ZooKeeperBackend::connect("zk://zk1:2181,zk2:2181,zk3:2181/apps?prefix=billing").await?;
/// let client = fenced::Client::new(backend);
/// let guard = client.lock("invoice:17").await?;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ZooKeeperBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for ZooKeeperBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let session = self.inner.session();
        f.debug_struct("ZooKeeperBackend")
            .field("url", &self.inner.config.redacted)
            .field("prefix", &self.inner.config.prefix)
            .field("session", &format_args!("{:#x}", session.id))
            .field("session_timeout", &self.inner.session_timeout)
            .finish()
    }
}

/// What one lock node's name says: `lock-<owner>-<sequence>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Child {
    name: String,
    owner: OwnerId,
    sequence: i64,
}

impl Child {
    fn parse(name: &str) -> Option<Child> {
        let rest = name.strip_prefix("lock-")?;
        let (owner, sequence) = rest.rsplit_once('-')?;
        Some(Child {
            name: name.to_owned(),
            owner: owner.parse().ok()?,
            sequence: sequence.parse().ok()?,
        })
    }
}

/// One of this backend's own lock nodes.
#[derive(Debug, Clone)]
struct Mine {
    name: String,
    czxid: i64,
    session: i64,
    /// The node ahead of this one when it was last checked (`None` once granted).
    predecessor: Option<String>,
    granted: bool,
}

/// One ZooKeeper session and its state as guards see it.
struct Session {
    zk: zk::Client,
    id: i64,
    state: watch::Sender<SessionState>,
}

pub(crate) struct Inner {
    config: ZkConfig,
    acls: zk::Acls<'static>,
    /// The negotiated session timeout of the first session: the longest lease promised.
    session_timeout: Duration,
    session: Mutex<Arc<Session>>,
    /// This backend's own nodes, by key and owner.
    mine: Mutex<HashMap<(Key, OwnerId), Mine>>,
    /// Owners whose node creation was sent without a reply (cut short or connection lost): the
    /// node may exist under a name this backend never learned.
    uncertain: Mutex<HashSet<(Key, OwnerId)>>,
    /// Watch events delivered to this backend's waiters.
    watch_events: AtomicU64,
    monitor: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.monitor).take() {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Characters ZooKeeper does not accept in node names (the server checks UTF-16 code units, so
/// characters beyond U+FFFF, stored as surrogate pairs, are refused too).
pub(crate) fn forbidden_in_name(c: char) -> bool {
    matches!(u32::from(c), 0x0000..=0x001f | 0x007f..=0x009f | 0xd800..=0xf8ff | 0xfff0..)
}

/// A key as one node name: `%`, `/` and the characters ZooKeeper refuses are percent-encoded
/// (UTF-8 bytes), and the names `.` and `..` become `%2E` and `%2E%2E`. Injective, so every key
/// has its own node, and reversed by [`unescape`].
///
/// ```
/// # #[cfg(feature = "zookeeper")] {
/// use fenced::backends::zookeeper::{escape, unescape};
/// assert_eq!(escape("order/42 50%"), "order%2F42 50%25");
/// assert_eq!(escape(".."), "%2E%2E");
/// assert_eq!(unescape(&escape("a/\u{e000}/%")).as_deref(), Some("a/\u{e000}/%"));
/// # }
/// ```
pub fn escape(key: &str) -> String {
    if key == "." || key == ".." {
        return key.replace('.', "%2E");
    }
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        if c == '%' || c == '/' || forbidden_in_name(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The key a node name produced by [`escape`] stands for; `None` for names it cannot produce.
pub fn unescape(name: &str) -> Option<String> {
    let bytes = percent_encoding::percent_decode_str(name).collect::<Vec<u8>>();
    let key = String::from_utf8(bytes).ok()?;
    (escape(&key) == name).then_some(key)
}

/// Milliseconds since the Unix epoch, as ZooKeeper stamps nodes.
fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Node data: `<lease in ms>\n<label>`.
fn node_data(lease: Duration, label: &str) -> Vec<u8> {
    format!("{}\n{label}", lease.as_millis()).into_bytes()
}

fn parse_data(data: &[u8]) -> (Option<Duration>, Option<String>) {
    let text = String::from_utf8_lossy(data);
    match text.split_once('\n') {
        Some((lease, label)) => (
            lease.parse::<u64>().ok().map(Duration::from_millis),
            Some(label.to_owned()),
        ),
        None => (None, None),
    }
}

impl ZooKeeperBackend {
    /// Connects to the ensemble named by `url` (`zk://…`, see the [module docs](self) for the
    /// parameters) and opens the one session this backend uses for all its locks.
    ///
    /// Connecting is eager: unreachable servers, a chroot that does not exist and credentials
    /// that cannot read the prefix node fail here, with a message that says what to check (and
    /// never shows the password).
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future closes whatever it opened; no lock is taken by connecting.
    pub async fn connect(url: &str) -> Result<ZooKeeperBackend> {
        let config = ZkConfig::parse(url)?;
        let acls = if config.digest.is_some() {
            zk::Acls::creator_all()
        } else {
            zk::Acls::anyone_all()
        };
        let session = open_session(&config, &acls).await?;
        let session_timeout = session.zk.session_timeout();
        let watcher = session.zk.state_watcher();
        let inner = Arc::new(Inner {
            config,
            acls,
            session_timeout,
            session: Mutex::new(Arc::new(session)),
            mine: Mutex::default(),
            uncertain: Mutex::default(),
            watch_events: AtomicU64::new(0),
            monitor: Mutex::new(None),
        });
        let task = tokio::spawn(monitor(Arc::downgrade(&inner), watcher));
        *lock(&inner.monitor) = Some(task);
        Ok(ZooKeeperBackend { inner })
    }

    /// The session timeout the server granted (the longest lease this backend promises).
    pub fn session_timeout(&self) -> Duration {
        self.inner.session_timeout
    }

    /// The path (under the chroot) of the node that holds `key`'s queue.
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::zookeeper::ZooKeeperBackend::connect("zk://localhost:2181").await?;
    /// assert_eq!(backend.key_path(&fenced::Key::new("job/nightly")?), "/fenced/job%2Fnightly");
    /// # Ok(()) }
    /// ```
    pub fn key_path(&self, key: &Key) -> String {
        self.inner.dir(key)
    }

    /// How many watch events this backend's waiters have been woken by so far (each waiter
    /// watches only its predecessor, so one release delivers one event).
    pub fn watch_events(&self) -> u64 {
        self.inner.watch_events.load(Ordering::Relaxed)
    }

    /// The nodes in `key`'s queue, lowest sequence (the holder) first, as `(node name, owner)`.
    /// For diagnostics and tests.
    pub async fn queue(&self, key: &Key) -> Result<Vec<(String, OwnerId)>> {
        let session = self.inner.session();
        let children = self.inner.children(&session, &self.inner.dir(key)).await?;
        Ok(children.into_iter().map(|c| (c.name, c.owner)).collect())
    }
}

/// Connects one session and checks the chroot, the prefix node and the credentials.
async fn open_session(config: &ZkConfig, acls: &zk::Acls<'static>) -> Result<Session> {
    let mut connector = zk::Client::connector()
        .with_session_timeout(config.session_timeout)
        .with_fail_eagerly();
    if let Some(digest) = &config.digest {
        connector = connector.with_auth("digest", digest.as_bytes());
    }
    let url = &config.redacted;
    let client = match tokio::time::timeout(
        config.timeout,
        connector.connect(&config.connect_string()),
    )
    .await
    {
        Ok(Ok(client)) => client,
        Ok(Err(zk::Error::AuthFailed)) => {
            return Err(Error::new(
                ErrorKind::Backend,
                Operation::Connect,
                format!(
                    "ZooKeeper at {url} refused the credentials; check the user and password in the URL"
                ),
            ));
        }
        Ok(Err(e)) => {
            return Err(Error::new(
                ErrorKind::Backend,
                Operation::Connect,
                format!(
                    "cannot reach ZooKeeper at {url} ({}); check that the servers are running and the host:port \
                     list is right",
                    config.scrub(&e.to_string())
                ),
            )
            .transient(true));
        }
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Backend,
                Operation::Connect,
                format!(
                    "no session with ZooKeeper at {url} within {:?}; check that the servers are running and \
                     reachable, or raise ?timeout=",
                    config.timeout
                ),
            )
            .transient(true));
        }
    };
    let id = client.session_id().0;
    let (state, _) = watch::channel(SessionState::Connected);
    let session = Session {
        zk: client,
        id,
        state,
    };
    let context = Context { config };
    if let Some(chroot) = &config.chroot {
        match context
            .call(Operation::Connect, session.zk.check_stat("/"))
            .await?
        {
            Some(_) => {}
            None => {
                return Err(Error::new(
                    ErrorKind::InvalidConfig,
                    Operation::Connect,
                    format!(
                        "the chroot {chroot} of {url} does not exist; create it (zkCli.sh create {chroot}) or fix \
                         the path in the URL"
                    ),
                ));
            }
        }
    }
    let prefix = format!("/{}", config.prefix);
    let options = zk::CreateMode::Persistent.with_acls(*acls);
    match context.raw(session.zk.create(&prefix, b"", &options)).await {
        Ok(Ok(_)) | Ok(Err(zk::Error::NodeExists)) => {}
        Ok(Err(e)) => return Err(context.prefix_error(&prefix, e)),
        Err(e) => return Err(e),
    }
    // Reading the prefix node's children needs READ on it: wrong credentials fail here.
    match context.raw(session.zk.list_children(&prefix)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(context.prefix_error(&prefix, e)),
        Err(e) => return Err(e),
    }
    Ok(session)
}

/// Follows the session's state for guards; when the session expires, opens a new one.
async fn monitor(inner: Weak<Inner>, mut watcher: zk::StateWatcher) {
    loop {
        let state = watcher.changed().await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let session = strong.session();
        let mapped = match state {
            zk::SessionState::Disconnected => SessionState::Suspended,
            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                SessionState::Connected
            }
            _ => SessionState::Ended,
        };
        session.state.send_replace(mapped);
        if mapped != SessionState::Ended {
            continue;
        }
        warn!(url = %strong.config.redacted, session = format_args!("{:#x}", session.id), ?state, "fenced: zookeeper session ended; its locks are gone; opening a new session");
        drop(strong);
        let mut failures = 0u32;
        loop {
            let Some(strong) = inner.upgrade() else {
                return;
            };
            match open_session(&strong.config, &strong.acls).await {
                Ok(next) => {
                    watcher = next.zk.state_watcher();
                    let old = std::mem::replace(&mut *lock(&strong.session), Arc::new(next));
                    lock(&strong.mine).retain(|_, m| m.session != old.id);
                    lock(&strong.uncertain).clear();
                    break;
                }
                Err(e) => {
                    debug!(error = %e, "fenced: zookeeper reconnect failed");
                    drop(strong);
                    let delay = Duration::from_millis(100)
                        .saturating_mul(1 << failures.min(6))
                        .min(Duration::from_secs(5));
                    failures += 1;
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Error mapping with the URL (never the password) in messages.
struct Context<'a> {
    config: &'a ZkConfig,
}

impl Context<'_> {
    /// Runs a request with the timeout; the inner result is the server's answer.
    async fn raw<T>(
        &self,
        fut: impl std::future::Future<Output = std::result::Result<T, zk::Error>>,
    ) -> Result<std::result::Result<T, zk::Error>> {
        match tokio::time::timeout(self.config.timeout, fut).await {
            Ok(reply) => Ok(reply),
            Err(_) => Err(Error::new(
                ErrorKind::Backend,
                Operation::Acquire,
                format!(
                    "no reply from ZooKeeper at {} within {:?}; check that the servers are running and reachable, \
                     or raise ?timeout=",
                    self.config.redacted, self.config.timeout
                ),
            )
            .transient(true)),
        }
    }

    /// Runs a request with the timeout, mapping every failure.
    async fn call<T>(
        &self,
        operation: Operation,
        fut: impl std::future::Future<Output = std::result::Result<T, zk::Error>>,
    ) -> Result<T> {
        match self.raw(fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.error(operation, &e)),
            Err(e) => Err(e.with_operation(operation)),
        }
    }

    fn error(&self, operation: Operation, e: &zk::Error) -> Error {
        let url = &self.config.redacted;
        let cause = self.config.scrub(&e.to_string());
        let (transient, message) = match e {
            zk::Error::ConnectionLoss
            | zk::Error::Timeout
            | zk::Error::NoHosts
            | zk::Error::Throttled
            | zk::Error::SessionMoved => (
                true,
                format!("lost the connection to ZooKeeper at {url} ({cause}); it is retried"),
            ),
            zk::Error::SessionExpired => (
                true,
                format!("the ZooKeeper session with {url} expired; a new one is being opened"),
            ),
            zk::Error::ClientClosed => (false, format!("the ZooKeeper client for {url} is closed")),
            zk::Error::NoAuth | zk::Error::AuthFailed => (
                false,
                format!(
                    "ZooKeeper at {url} denied access ({cause}); check the user and password in the URL and the ACL \
                     of the prefix node /{}",
                    self.config.prefix
                ),
            ),
            zk::Error::NotReadOnly => (
                true,
                format!("ZooKeeper at {url} is read-only right now (no quorum); it is retried"),
            ),
            _ => (false, format!("ZooKeeper at {url} failed: {cause}")),
        };
        Error::new(ErrorKind::Backend, operation, message).transient(transient)
    }

    fn prefix_error(&self, prefix: &str, e: zk::Error) -> Error {
        let url = &self.config.redacted;
        match e {
            zk::Error::NoAuth => Error::new(
                ErrorKind::Backend,
                Operation::Connect,
                format!(
                    "ZooKeeper at {url} denied access to {prefix}: the user and password in the URL are wrong, or \
                     lack permission; use the credentials that created it, or another ?prefix="
                ),
            ),
            zk::Error::NoNode => Error::new(
                ErrorKind::InvalidConfig,
                Operation::Connect,
                format!("the chroot of {url} does not exist; create it or fix the path in the URL"),
            ),
            other => self.error(Operation::Connect, &other),
        }
    }
}

impl Inner {
    fn session(&self) -> Arc<Session> {
        lock(&self.session).clone()
    }

    fn context(&self) -> Context<'_> {
        Context {
            config: &self.config,
        }
    }

    fn dir(&self, key: &Key) -> String {
        format!("/{}/{}", self.config.prefix, escape(key.as_str()))
    }

    /// The lock nodes under `dir`, lowest sequence first (none when `dir` does not exist).
    async fn children(&self, session: &Session, dir: &str) -> Result<Vec<Child>> {
        match self.context().raw(session.zk.list_children(dir)).await? {
            Ok(names) => {
                let mut children: Vec<Child> =
                    names.iter().filter_map(|n| Child::parse(n)).collect();
                children.sort_by_key(|c| c.sequence);
                Ok(children)
            }
            Err(zk::Error::NoNode) => Ok(Vec::new()),
            Err(e) => Err(self.context().error(Operation::Acquire, &e)),
        }
    }

    /// Arms an exists-watch on `path`; `None` when the node is already gone.
    async fn exists_and_watch(
        &self,
        session: &Session,
        path: &str,
    ) -> Result<Option<zk::OneshotWatcher>> {
        let (stat, watcher) = self
            .context()
            .call(Operation::Wait, session.zk.check_and_watch_stat(path))
            .await?;
        Ok(stat.map(|_| watcher))
    }

    /// The predecessors of this backend's queued nodes for `key` in the current session.
    fn predecessors(&self, key: &Key, session: i64) -> Vec<String> {
        lock(&self.mine)
            .iter()
            .filter(|((k, _), m)| k == key && m.session == session && !m.granted)
            .filter_map(|(_, m)| m.predecessor.clone())
            .collect()
    }

    /// What is known about the holder of `dir`'s queue, given its sorted children (re-read if
    /// the lowest node goes away meanwhile).
    async fn holder_of(
        &self,
        session: &Session,
        dir: &str,
        mut children: Vec<Child>,
    ) -> Result<Option<HolderInfo>> {
        for _ in 0..8 {
            let Some(first) = children.first() else {
                return Ok(None);
            };
            let path = format!("{dir}/{}", first.name);
            match self.context().raw(session.zk.get_data(&path)).await? {
                Ok((data, stat)) => {
                    let (lease, label) = parse_data(&data);
                    let mut info = HolderInfo::new();
                    info.owner = Some(first.owner);
                    info.token = u64::try_from(stat.czxid).ok().map(FencingToken::new);
                    info.label = label;
                    info.remaining = lease;
                    // ZooKeeper stamps nodes in whole milliseconds: count the age down.
                    info.age = Some(Duration::from_millis(
                        u64::try_from(now_millis() - stat.ctime - 1).unwrap_or(0),
                    ));
                    info.waiters = Some(children.len() as u64 - 1);
                    return Ok(Some(info));
                }
                Err(zk::Error::NoNode) => children = self.children(session, dir).await?,
                Err(e) => return Err(self.context().error(Operation::Admin, &e)),
            }
        }
        Err(Error::new(
            ErrorKind::Backend,
            Operation::Admin,
            format!("the holder of {dir} kept changing while it was read; try again"),
        )
        .transient(true))
    }

    /// Who holds `dir` now, for an owner that found its lock gone; `None` also when that cannot
    /// be read (the session just ended, say): the answer "not held" is certain either way.
    async fn holder_after_loss(
        &self,
        session: &Session,
        dir: &str,
        children: Option<Vec<Child>>,
    ) -> Option<HolderInfo> {
        let children = match children {
            Some(c) => c,
            None => self.children(session, dir).await.ok()?,
        };
        self.holder_of(session, dir, children).await.ok().flatten()
    }

    /// Creates the parent nodes of a key's queue: the prefix (persistent) and the key's node (a
    /// container, which the server removes once it is empty).
    async fn create_parents(&self, session: &Session, dir: &str) -> Result<()> {
        let prefix = format!("/{}", self.config.prefix);
        for (path, mode) in [
            (prefix.as_str(), zk::CreateMode::Persistent),
            (dir, zk::CreateMode::Container),
        ] {
            let options = mode.with_acls(self.acls);
            match self
                .context()
                .raw(session.zk.create(path, b"", &options))
                .await?
            {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(zk::Error::NoNode) => {
                    return Err(Error::new(
                        ErrorKind::Backend,
                        Operation::Acquire,
                        format!(
                            "the chroot of {} no longer exists; recreate it",
                            self.config.redacted
                        ),
                    ));
                }
                Err(e) => return Err(self.context().error(Operation::Acquire, &e)),
            }
        }
        Ok(())
    }

    /// Creates this owner's node in the queue. The owner is marked uncertain while the request
    /// is out, so that a node created without a reply is found later.
    async fn create(&self, session: &Session, request: &AcquireRequest<'_>) -> Result<Mine> {
        let dir = self.dir(request.key);
        let path = format!("{dir}/lock-{}-", request.owner);
        let data = node_data(request.lease, request.label);
        let options = zk::CreateMode::EphemeralSequential.with_acls(self.acls);
        let slot = (request.key.clone(), *request.owner);
        // An earlier request of this owner may still be applied later (the client library can
        // send it after a reconnect): that uncertainty stays until the owner releases.
        let earlier = lock(&self.uncertain).contains(&slot);
        for _ in 0..8 {
            lock(&self.uncertain).insert(slot.clone());
            let reply = self
                .context()
                .raw(session.zk.create(&path, &data, &options))
                .await?;
            match reply {
                Ok((stat, sequence)) => {
                    if !earlier {
                        lock(&self.uncertain).remove(&slot);
                    }
                    return Ok(Mine {
                        name: format!("lock-{}-{sequence}", request.owner),
                        czxid: stat.czxid,
                        session: session.id,
                        predecessor: None,
                        granted: false,
                    });
                }
                Err(zk::Error::NoNode) => {
                    if !earlier {
                        lock(&self.uncertain).remove(&slot);
                    }
                    self.create_parents(session, &dir).await?;
                }
                // The request may or may not have been applied: stays uncertain.
                Err(e) => return Err(self.context().error(Operation::Acquire, &e)),
            }
        }
        Err(Error::new(
            ErrorKind::Backend,
            Operation::Acquire,
            format!("the node {dir} kept disappearing while a lock was created in it; try again"),
        )
        .transient(true))
    }

    /// Finds `owner`'s node among `children` (a node created without a reply), reading its
    /// creation zxid.
    async fn adopt(
        &self,
        session: &Session,
        dir: &str,
        children: &[Child],
        owner: &OwnerId,
    ) -> Result<Option<Mine>> {
        let Some(child) = children.iter().find(|c| c.owner == *owner) else {
            return Ok(None);
        };
        let path = format!("{dir}/{}", child.name);
        match self.context().raw(session.zk.check_stat(&path)).await? {
            Ok(Some(stat)) if stat.ephemeral_owner == session.id => Ok(Some(Mine {
                name: child.name.clone(),
                czxid: stat.czxid,
                session: session.id,
                predecessor: None,
                granted: false,
            })),
            Ok(_) => Ok(None),
            Err(e) => Err(self.context().error(Operation::Acquire, &e)),
        }
    }

    /// This owner's node: known, or found in the queue.
    async fn find(
        &self,
        session: &Session,
        key: &Key,
        owner: &OwnerId,
    ) -> Result<(Option<Mine>, Option<Vec<Child>>)> {
        let slot = (key.clone(), *owner);
        if let Some(m) = lock(&self.mine)
            .get(&slot)
            .filter(|m| m.session == session.id)
        {
            return Ok((Some(m.clone()), None));
        }
        let dir = self.dir(key);
        let children = self.children(session, &dir).await?;
        let found = self.adopt(session, &dir, &children, owner).await?;
        Ok((found, Some(children)))
    }

    /// Deletes one of this session's nodes; `false` when it is already gone (an ended session
    /// took its ephemeral nodes with it).
    async fn delete(&self, session: &Session, path: &str) -> Result<bool> {
        match self.context().raw(session.zk.delete(path, None)).await? {
            Ok(()) => Ok(true),
            Err(zk::Error::NoNode | zk::Error::SessionExpired) => Ok(false),
            Err(e) => Err(self.context().error(Operation::Release, &e)),
        }
    }
}

#[async_trait]
impl Backend for ZooKeeperBackend {
    fn name(&self) -> &'static str {
        "zookeeper"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Safety::Consensus, Binding::Session)
            .with_native_wait(true)
            .with_queue(true)
            .with_max_lease(Some(self.inner.session_timeout))
    }

    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Acquired> {
        let inner = &self.inner;
        let session = inner.session();
        let dir = inner.dir(request.key);
        let slot = (request.key.clone(), *request.owner);
        let mut mine = lock(&inner.mine)
            .get(&slot)
            .filter(|m| m.session == session.id)
            .cloned();
        for _ in 0..8 {
            if mine.is_none() {
                let uncertain = lock(&inner.uncertain).contains(&slot);
                if uncertain || !request.queue {
                    let children = inner.children(&session, &dir).await?;
                    mine = inner
                        .adopt(&session, &dir, &children, request.owner)
                        .await?;
                    if mine.is_none() && !request.queue && !children.is_empty() {
                        // A single try leaves nothing behind when the lock is taken.
                        let holder = inner.holder_of(&session, &dir, children).await?;
                        if let Some(holder) = holder {
                            return Ok(Acquired::Held(holder));
                        }
                    }
                }
            }
            let mut node = match mine.take() {
                Some(node) => node,
                None => inner.create(&session, request).await?,
            };
            let children = inner.children(&session, &dir).await?;
            // Another node of this owner is one whose creation was thought failed but was
            // applied later: an orphan that would block the queue. Remove it and look again.
            let orphans: Vec<&Child> = children
                .iter()
                .filter(|c| c.owner == *request.owner && c.name != node.name)
                .collect();
            if !orphans.is_empty() {
                for orphan in orphans {
                    inner
                        .delete(&session, &format!("{dir}/{}", orphan.name))
                        .await?;
                }
                mine = Some(node);
                continue;
            }
            let Some(position) = children.iter().position(|c| c.name == node.name) else {
                // The node is gone (broken by an administrator, or its session ended):
                // queue again.
                lock(&inner.mine).remove(&slot);
                continue;
            };
            if position == 0 {
                node.granted = true;
                node.predecessor = None;
                let token = FencingToken::new(u64::try_from(node.czxid).unwrap_or(0));
                lock(&inner.mine).insert(slot, node);
                return Ok(Acquired::Granted(Grant::new(token, request.lease)));
            }
            if !request.queue {
                let path = format!("{dir}/{}", node.name);
                inner.delete(&session, &path).await?;
                lock(&inner.mine).remove(&slot);
                let holder = inner.holder_of(&session, &dir, children).await?;
                return Ok(match holder {
                    Some(holder) => Acquired::Held(holder),
                    // Freed meanwhile: report it held by nobody known; the caller may retry.
                    None => Acquired::Held(HolderInfo::new()),
                });
            }
            node.predecessor = Some(children[position - 1].name.clone());
            lock(&inner.mine).insert(slot.clone(), node.clone());
            match inner.holder_of(&session, &dir, children).await? {
                Some(holder) if holder.owner != Some(*request.owner) => {
                    return Ok(Acquired::Held(holder));
                }
                // The queue moved on meanwhile: check again.
                _ => mine = Some(node),
            }
        }
        Err(Error::new(
            ErrorKind::Backend,
            Operation::Acquire,
            format!("the queue of {dir} kept changing during the acquisition; try again"),
        )
        .transient(true))
    }

    async fn extend(&self, lock_ref: &LockRef<'_>, _lease: Duration) -> Result<Confirm> {
        let inner = &self.inner;
        let session = inner.session();
        let dir = inner.dir(lock_ref.key);
        let (mine, children) = inner.find(&session, lock_ref.key, lock_ref.owner).await?;
        if let Some(mine) = mine {
            let path = format!("{dir}/{}", mine.name);
            let stat = match inner.context().raw(session.zk.check_stat(&path)).await? {
                Ok(stat) => stat,
                // The session ended: its nodes are gone.
                Err(zk::Error::SessionExpired) => None,
                Err(e) => return Err(inner.context().error(Operation::Extend, &e)),
            };
            if stat.is_some_and(|s| s.ephemeral_owner == session.id) {
                return Ok(Confirm::Done);
            }
            lock(&inner.mine).remove(&(lock_ref.key.clone(), *lock_ref.owner));
        }
        Ok(Confirm::NotHeld(
            inner.holder_after_loss(&session, &dir, children).await,
        ))
    }

    async fn release(&self, lock_ref: &LockRef<'_>) -> Result<Confirm> {
        let inner = &self.inner;
        let session = inner.session();
        let dir = inner.dir(lock_ref.key);
        let slot = (lock_ref.key.clone(), *lock_ref.owner);
        let known = lock(&inner.mine)
            .get(&slot)
            .filter(|m| m.session == session.id)
            .cloned();
        let uncertain = lock(&inner.uncertain).contains(&slot);
        let (node, was_holder) = match known {
            Some(m) if !uncertain => {
                let granted = m.granted;
                (Some(m.name), granted)
            }
            _ => {
                let children = inner.children(&session, &dir).await?;
                // Every node of this owner goes, not just the first: a request thought failed
                // may have been applied after a later one.
                for extra in children
                    .iter()
                    .filter(|c| c.owner == *lock_ref.owner)
                    .skip(1)
                {
                    inner
                        .delete(&session, &format!("{dir}/{}", extra.name))
                        .await?;
                }
                match children.iter().position(|c| c.owner == *lock_ref.owner) {
                    Some(i) => (Some(children[i].name.clone()), i == 0),
                    None => (None, false),
                }
            }
        };
        let deleted = match &node {
            Some(name) => inner.delete(&session, &format!("{dir}/{name}")).await?,
            None => false,
        };
        // Only now that the server answered is the local record dropped.
        lock(&inner.mine).remove(&slot);
        lock(&inner.uncertain).remove(&slot);
        if deleted && was_holder {
            return Ok(Confirm::Done);
        }
        Ok(Confirm::NotHeld(
            inner.holder_after_loss(&session, &dir, None).await,
        ))
    }

    async fn watch(&self, key: &Key) -> Result<Box<dyn Watch>> {
        Ok(Box::new(wait::ZkWatch {
            inner: self.inner.clone(),
            key: key.clone(),
            failures: 0,
        }))
    }

    async fn holder(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let inner = &self.inner;
        let session = inner.session();
        let dir = inner.dir(key);
        let children = inner.children(&session, &dir).await?;
        inner.holder_of(&session, &dir, children).await
    }

    async fn force_release(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let inner = &self.inner;
        let session = inner.session();
        let dir = inner.dir(key);
        for _ in 0..8 {
            let children = inner.children(&session, &dir).await?;
            let Some(first) = children.first().cloned() else {
                return Ok(None);
            };
            let Some(info) = inner.holder_of(&session, &dir, children).await? else {
                return Ok(None);
            };
            if info.owner != Some(first.owner) {
                continue;
            }
            if inner
                .delete(&session, &format!("{dir}/{}", first.name))
                .await?
            {
                let mut info = info;
                info.waiters = None;
                return Ok(Some(info));
            }
        }
        Err(Error::new(
            ErrorKind::Backend,
            Operation::Admin,
            format!("the holder of {dir} kept changing; try again"),
        )
        .transient(true))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<HolderInfo>> {
        let inner = &self.inner;
        let session = inner.session();
        let root = format!("/{}", inner.config.prefix);
        let names = match inner.context().raw(session.zk.list_children(&root)).await? {
            Ok(names) => names,
            Err(zk::Error::NoNode) => Vec::new(),
            Err(e) => return Err(inner.context().error(Operation::Admin, &e)),
        };
        let mut keys: Vec<Key> = names
            .iter()
            .filter_map(|n| unescape(n))
            .filter(|k| k.starts_with(prefix))
            .filter_map(|k| Key::new(k).ok())
            .collect();
        keys.sort();
        let mut out = Vec::new();
        for key in keys {
            let dir = inner.dir(&key);
            let children = inner.children(&session, &dir).await?;
            if let Some(mut info) = inner.holder_of(&session, &dir, children).await? {
                info.key = Some(key);
                out.push(info);
            }
        }
        Ok(out)
    }

    fn session_state(&self) -> Option<watch::Receiver<SessionState>> {
        Some(self.inner.session().state.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips() {
        for key in [
            "order:42",
            "a/b/c",
            "/",
            "%",
            "%2F",
            ".",
            "..",
            "...",
            "a.b",
            "\u{e000}\u{f8ff}\u{fff0}\u{ffff}",
            "ü ñ 漢字 🔒",
            "{tag}*?[x]\\",
        ] {
            let name = escape(key);
            assert!(!name.contains('/'), "{key:?} -> {name:?}");
            assert!(!name.chars().any(forbidden_in_name), "{key:?} -> {name:?}");
            assert!(name != "." && name != "..", "{key:?} -> {name:?}");
            assert_eq!(unescape(&name).as_deref(), Some(key), "{key:?} -> {name:?}");
        }
        assert_eq!(unescape("%2f"), None, "not produced by escape");
        assert_eq!(unescape("%FF"), None);
    }

    #[test]
    fn node_names() {
        let owner = OwnerId::random();
        let child = Child::parse(&format!("lock-{owner}-0000000042")).unwrap();
        assert_eq!(child.owner, owner);
        assert_eq!(child.sequence, 42);
        assert!(Child::parse("lock-nothex-0000000001").is_none());
        assert!(Child::parse("other").is_none());
        assert_eq!(
            parse_data(&node_data(Duration::from_secs(3), "host pid 1\nx")),
            (
                Some(Duration::from_secs(3)),
                Some("host pid 1\nx".to_owned())
            )
        );
    }
}
