#![doc = include_str!("README.md")]

mod config;
mod round;
mod wait;

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::OnceCell;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::backend::{
    AcquireRequest, Acquired, Backend, Binding, Capabilities, Confirm, Grant, HolderInfo, LockRef,
    Mode, Safety, Watch,
};
use crate::backends::redis::{NodeGrant, RedisBackend};
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::key::Key;
use crate::lease::drift;
use crate::token::{FencingToken, OwnerId};

use config::RedlockConfig;
use round::Round;

/// How long a node that could not be reached waits before the next connection attempt.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Opens the backend named by the raw URL text (a list of nodes is not a valid [`url::Url`]).
pub(crate) async fn open_str(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(RedlockBackend::connect(url).await?))
}

/// The Redlock backend (`redlock://`, `redlocks://`): one lock over several independent Redis /
/// Valkey nodes, held when a majority granted it. Cheap to clone.
///
/// Usually built through [`connect`](crate::connect); see the [module docs](self) for the URL,
/// the fencing-token scheme and what this backend does and does not guarantee.
///
/// ```no_run
/// # async fn demo() -> fenced::Result<()> {
/// use fenced::backends::redlock::RedlockBackend;
/// let backend =
///     RedlockBackend::connect("redlock://:secret@10.0.0.1:6379,10.0.0.2:6379,10.0.0.3:6379").await?;
/// let client = fenced::Client::new(backend);
/// let guard = client.lock("invoice:17").await?;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedlockBackend {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedlockConfig,
    nodes: Vec<Arc<Node>>,
}

impl fmt::Debug for RedlockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedlockBackend")
            .field("url", &self.inner.config.redacted)
            .field("nodes", &self.inner.nodes.len())
            .field("quorum", &self.quorum())
            .field("node_timeout", &self.inner.config.node_timeout)
            .finish()
    }
}

/// One node: connected once, then kept (its connection reconnects by itself).
struct Node {
    /// The node's `redis://` URL. Contains the password: never print.
    url: String,
    /// `host:port`, for messages.
    address: String,
    backend: OnceCell<RedisBackend>,
    /// When the last connection attempt started, while the node is not connected.
    last_attempt: Mutex<Option<Instant>>,
}

impl Node {
    /// The node's backend, or `None` while it is not connected (then a connection attempt
    /// starts in the background, at most every [`RECONNECT_EVERY`]).
    fn get(self: &Arc<Self>) -> Option<RedisBackend> {
        if let Some(backend) = self.backend.get() {
            return Some(backend.clone());
        }
        let mut last = self
            .last_attempt
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= RECONNECT_EVERY) {
            *last = Some(Instant::now());
            let node = self.clone();
            tokio::spawn(async move {
                if let Err(e) = node.connect().await {
                    debug!(error = %e, "fenced: a Redlock node is still unreachable");
                }
            });
        }
        None
    }

    async fn connect(&self) -> Result<RedisBackend> {
        let backend = self
            .backend
            .get_or_try_init(|| async {
                let url = crate::url::parse(&self.url)?;
                RedisBackend::from_url(&url).await
            })
            .await?;
        Ok(backend.clone())
    }
}

/// What one node answered to one step.
type Answers<T> = Vec<(usize, Result<T>)>;

impl RedlockBackend {
    /// Connects to the nodes named by `url` (see the [module docs](self)). Succeeds when a
    /// majority answered; the others are retried in the background. Fails at once, with the
    /// node's message, when a node rejects the password or the TLS handshake.
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// let backend = fenced::backends::redlock::RedlockBackend::connect(
    ///     "redlocks://:secret@a.internal:6380,b.internal:6380,c.internal:6380?tls_ca=/etc/ssl/ca.pem",
    /// )
    /// .await?;
    /// assert_eq!(backend.quorum(), 2);
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future closes whatever it opened; no lock is taken by connecting.
    pub async fn connect(url: &str) -> Result<RedlockBackend> {
        let config = RedlockConfig::parse(url)?;
        let nodes: Vec<Arc<Node>> = config
            .nodes
            .iter()
            .map(|url| {
                Arc::new(Node {
                    address: url::Url::parse(url).map_or_else(
                        |_| crate::url::redact(url),
                        |u| {
                            format!(
                                "{}:{}",
                                u.host_str().unwrap_or(""),
                                u.port().unwrap_or(6379)
                            )
                        },
                    ),
                    url: url.clone(),
                    backend: OnceCell::new(),
                    last_attempt: Mutex::new(Some(Instant::now())),
                })
            })
            .collect();
        let mut set = JoinSet::new();
        for (i, node) in nodes.iter().enumerate() {
            let node = node.clone();
            set.spawn(async move { (i, node.connect().await) });
        }
        let mut failures = Vec::new();
        let mut connected = 0;
        while let Some(joined) = set.join_next().await {
            let (i, result) = joined.map_err(|e| internal(Operation::Connect, &e))?;
            match result {
                Ok(_) => connected += 1,
                // A wrong password or a TLS problem is wrong for every node: say so now.
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => failures.push((i, e)),
            }
        }
        let backend = RedlockBackend {
            inner: Arc::new(Inner { config, nodes }),
        };
        if connected < backend.quorum() {
            let (i, first) = failures.swap_remove(0);
            return Err(Error::new(
                ErrorKind::Backend,
                Operation::Connect,
                format!(
                    "only {connected} of the {} Redlock nodes of {} answered, and {} must; node {} said: {first}",
                    backend.inner.nodes.len(),
                    backend.inner.config.redacted,
                    backend.quorum(),
                    i + 1
                ),
            )
            .transient(true));
        }
        for (i, e) in &failures {
            warn!(node = i + 1, error = %e, "fenced: a Redlock node is unreachable; continuing with a majority");
        }
        Ok(backend)
    }

    /// How many nodes must grant a lock (a majority).
    pub fn quorum(&self) -> usize {
        self.inner.config.quorum()
    }

    /// The nodes whose server has been up for less than `max_lease` (numbered from 1 in URL
    /// order), with their uptime. A node that restarted empty within the longest lease may have
    /// forgotten a lock that is still held; wait that long before letting a restarted node
    /// rejoin (see the [module docs](self)). Unreachable nodes are left out.
    ///
    /// ```no_run
    /// # async fn demo() -> fenced::Result<()> {
    /// use std::time::Duration;
    /// let backend = fenced::backends::redlock::RedlockBackend::connect("redlock://a:6379,b:6379,c:6379").await?;
    /// for (node, uptime) in backend.young_nodes(Duration::from_secs(60)).await {
    ///     eprintln!("node {node} restarted {uptime:?} ago");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn young_nodes(&self, max_lease: Duration) -> Vec<(usize, Duration)> {
        let mut young: Vec<(usize, Duration)> = self
            .uptimes()
            .await
            .into_iter()
            .filter_map(|(i, uptime)| uptime.ok().map(|u| (i + 1, u)))
            .filter(|(_, uptime)| *uptime < max_lease)
            .collect();
        young.sort_unstable();
        young
    }

    /// Each node's uptime (`INFO server`), in the order the answers came.
    async fn uptimes(&self) -> Answers<Duration> {
        self.each(|node| async move { node.uptime().await }, Operation::Admin)
            .await
    }

    /// Runs `step` on every connected node at once, within the node timeout; returns the
    /// answers in the order they came (nodes not connected answer an error).
    async fn each<T, F, Fut>(&self, step: F, operation: Operation) -> Answers<T>
    where
        T: Send + 'static,
        F: Fn(RedisBackend) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let mut round = self.round(step, operation);
        let mut answers = Vec::with_capacity(self.inner.nodes.len());
        while let Some(answer) = round.next().await {
            answers.push(answer);
        }
        answers
    }

    /// A [`Round`] of `step` on every node (a node not connected answers an error at once).
    fn round<T, F, Fut>(&self, step: F, operation: Operation) -> Round<T>
    where
        T: Send + 'static,
        F: Fn(RedisBackend) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let nodes = &self.inner.nodes;
        let mut round = Round::new(self.inner.config.node_timeout, operation, nodes.len());
        for (i, node) in nodes.iter().enumerate() {
            match node.get() {
                Some(backend) => round.push(i, node.address.clone(), step(backend)),
                None => {
                    let shown = node.address.clone();
                    let e = Error::new(
                        ErrorKind::Backend,
                        operation,
                        format!(
                            "the node {shown} is not connected (reconnecting in the background)"
                        ),
                    )
                    .transient(true);
                    round.push(i, shown, std::future::ready(Err(e)));
                }
            }
        }
        round
    }

    /// An error saying that too few nodes answered.
    fn too_few(&self, operation: Operation, answered: usize, errors: &[(usize, Error)]) -> Error {
        let detail = errors
            .first()
            .map(|(i, e)| format!("; node {} said: {e}", i.wrapping_add(1)))
            .unwrap_or_default();
        Error::new(
            ErrorKind::Backend,
            operation,
            format!(
                "only {answered} of the {} Redlock nodes of {} answered in time, and {} must{detail}",
                self.inner.nodes.len(),
                self.inner.config.redacted,
                self.quorum()
            ),
        )
        .transient(true)
    }

    /// The answers of a read-only step, when a majority of nodes gave one; otherwise an error
    /// saying how many answered.
    fn majority_answered<T>(&self, answers: Answers<T>) -> Result<Vec<T>> {
        let mut values = Vec::new();
        let mut errors = Vec::new();
        for (i, answer) in answers {
            match answer {
                Ok(value) => values.push(value),
                Err(e) => errors.push((i, e)),
            }
        }
        if values.len() < self.quorum() {
            return Err(self.too_few(Operation::Admin, values.len(), &errors));
        }
        Ok(values)
    }

    /// Releases `owner`'s grants of `key` on every node (after a failed acquisition).
    async fn release_everywhere(&self, key: &Key, owner: OwnerId) {
        let answers = self
            .each(
                |node| {
                    let key = key.clone();
                    async move { node.release(&LockRef::new(&key, &owner)).await }
                },
                Operation::Release,
            )
            .await;
        for (i, answer) in answers {
            if let Err(e) = answer {
                debug!(node = i.wrapping_add(1), error = %e, "fenced: Redlock clean-up release failed; the node's lease ends it");
            }
        }
    }

    /// What waiters should know about the holders seen on the nodes: the owner holding the
    /// most nodes, its highest token, and when enough of its nodes expire for a majority to be
    /// free. When no owner holds enough nodes to keep others out (a split vote), `remaining` is
    /// a short random delay, so contenders retry apart.
    fn holder_of(&self, held: &[HolderInfo]) -> HolderInfo {
        let n = self.inner.nodes.len();
        let quorum = self.quorum();
        let mut best: Option<(usize, &HolderInfo)> = None;
        for info in held {
            let count = held.iter().filter(|h| h.owner == info.owner).count();
            if best.is_none_or(|(c, _)| count > c) {
                best = Some((count, info));
            }
        }
        let Some((count, info)) = best else {
            return HolderInfo::new();
        };
        let mut out = info.clone();
        let mine: Vec<&HolderInfo> = held.iter().filter(|h| h.owner == info.owner).collect();
        out.token = agreed_token(&mine);
        if count + quorum > n {
            // `count + quorum - n` of its nodes must expire before a majority is free.
            let mut remaining: Vec<Duration> = mine.iter().filter_map(|h| h.remaining).collect();
            remaining.sort_unstable();
            out.remaining = remaining.get(count + quorum - n - 1).copied();
        } else {
            out.remaining = Some(crate::options::jitter(self.inner.config.node_timeout * 3));
        }
        out
    }

    /// The owner holding a majority in `held` (one holder info per node), if any.
    fn majority_holder(&self, held: Vec<HolderInfo>) -> Option<HolderInfo> {
        let quorum = self.quorum();
        let owner = held
            .iter()
            .find(|h| held.iter().filter(|o| o.owner == h.owner).count() >= quorum)?
            .owner;
        let mine: Vec<HolderInfo> = held.into_iter().filter(|h| h.owner == owner).collect();
        let mut out = mine[0].clone();
        out.token = agreed_token(&mine.iter().collect::<Vec<_>>());
        // Held while a majority of its nodes still hold it.
        let mut remaining: Vec<Duration> = mine.iter().filter_map(|h| h.remaining).collect();
        remaining.sort_unstable_by(|a, b| b.cmp(a));
        out.remaining = remaining.get(quorum - 1).copied();
        out.waiters = mine.iter().filter_map(|h| h.waiters).max();
        out.age = mine.iter().filter_map(|h| h.age).max();
        Some(out)
    }

    async fn grant(&self, request: &AcquireRequest<'_>) -> Result<Acquired> {
        let started = Instant::now();
        let quorum = self.quorum();
        let key = request.key.clone();
        let owner = *request.owner;
        let (lease, label) = (request.lease, request.label.to_owned());
        let mut round = self.round(
            |node| {
                let (key, label) = (key.clone(), label.clone());
                async move {
                    let request = AcquireRequest::new(&key, &owner, lease, &label);
                    node.redlock_grant(&request).await
                }
            },
            Operation::Acquire,
        );
        let mut granted: Vec<(usize, u64)> = Vec::new();
        let mut held: Vec<HolderInfo> = Vec::new();
        let mut errors: Vec<(usize, Error)> = Vec::new();
        while let Some((i, answer)) = round.next().await {
            match answer {
                Ok(NodeGrant::Granted(token)) => granted.push((i, token)),
                Ok(NodeGrant::Held(info)) => held.push(info),
                Err(e) => errors.push((i, e)),
            }
            // Too many refusals: the nodes still out cannot make a majority. Otherwise every
            // node's answer is awaited (each within the node timeout), so that every node that
            // grants also gets the grant's token in the second round.
            if granted.len() + round.len() < quorum {
                break;
            }
        }
        // Nodes that did not answer may still grant: the release of this owner covers them.
        drop(round);

        if granted.len() >= quorum {
            match self.settle_token(&key, owner, &granted).await {
                Ok(token) => {
                    let elapsed = started.elapsed();
                    if elapsed + drift(lease) < lease {
                        return Ok(Acquired::Granted(Grant::new(
                            FencingToken::new(token),
                            lease,
                        )));
                    }
                    self.release_everywhere(&key, owner).await;
                    return Err(Error::new(
                        ErrorKind::Backend,
                        Operation::Acquire,
                        format!(
                            "the Redlock nodes of {} took {elapsed:?} to grant a lease of {lease:?}, which leaves \
                             no validity; use a longer lease or faster nodes",
                            self.inner.config.redacted
                        ),
                    )
                    .transient(true));
                }
                Err(e) => {
                    self.release_everywhere(&key, owner).await;
                    return Err(e);
                }
            }
        }
        self.release_everywhere(&key, owner).await;
        if granted.len() + held.len() < quorum {
            return Err(self.too_few(Operation::Acquire, granted.len() + held.len(), &errors));
        }
        Ok(Acquired::Held(self.holder_of(&held)))
    }

    /// The second round of a grant: the token is the highest of the granting nodes' tokens, and
    /// a majority must keep a counter at least that high before the grant counts (any two
    /// majorities share a node, so the next grant's first round sees it). Nodes already there
    /// need nothing; all the others are raised (not only enough for a majority), so that every
    /// node holding the lock stores the token the holder was given.
    async fn settle_token(
        &self,
        key: &Key,
        owner: OwnerId,
        granted: &[(usize, u64)],
    ) -> Result<u64> {
        let quorum = self.quorum();
        let token = granted.iter().map(|(_, t)| *t).max().unwrap_or(0);
        let there = granted.iter().filter(|(_, t)| *t == token).count();
        if there >= quorum {
            return Ok(token);
        }
        let behind: Vec<usize> = granted
            .iter()
            .filter(|(_, t)| *t < token)
            .map(|(i, _)| *i)
            .collect();
        let mut round = Round::new(
            self.inner.config.node_timeout,
            Operation::Acquire,
            behind.len(),
        );
        for i in behind {
            if let Some(node) = self.inner.nodes[i].get() {
                let (key, shown) = (key.clone(), self.inner.nodes[i].address.clone());
                round.push(i, shown, async move {
                    node.redlock_raise(&key, &owner, token).await
                });
            }
        }
        let mut raised = 0;
        while let Some((_, answer)) = round.next().await {
            if matches!(answer, Ok(true)) {
                raised += 1;
            }
        }
        if there + raised >= quorum {
            return Ok(token);
        }
        Err(Error::new(
            ErrorKind::Backend,
            Operation::Acquire,
            format!(
                "the Redlock nodes of {} granted the lock but too few took its fencing token in time ({} of {}); \
                 retrying",
                self.inner.config.redacted,
                there + raised,
                quorum
            ),
        )
        .transient(true))
    }

    /// Counts an owner-checked step's answers: `Done` with a majority, `NotHeld` when a majority
    /// can no longer confirm, otherwise an error (too few answered).
    fn tally(&self, operation: Operation, answers: Answers<Confirm>) -> Result<Confirm> {
        let quorum = self.quorum();
        let mut done = 0;
        let mut not_held = Vec::new();
        let mut errors = Vec::new();
        for (i, answer) in answers {
            match answer {
                Ok(Confirm::Done) => done += 1,
                Ok(Confirm::NotHeld(info)) => not_held.push(info),
                Err(e) => errors.push((i, e)),
            }
        }
        if done >= quorum {
            return Ok(Confirm::Done);
        }
        if done + errors.len() < quorum {
            let holders: Vec<HolderInfo> = not_held.into_iter().flatten().collect();
            let holder = (!holders.is_empty()).then(|| self.holder_of(&holders));
            return Ok(Confirm::NotHeld(holder));
        }
        Err(self.too_few(operation, done + not_held.len(), &errors))
    }
}

/// The grant's token as the nodes of one owner store it: the value most of them store (a
/// granted lock's token is stored by a majority: the nodes that answered it and the nodes raised
/// to it; a node that granted after the answer was decided may store another). Ties go to the
/// higher value.
fn agreed_token(infos: &[&HolderInfo]) -> Option<FencingToken> {
    let tokens: Vec<FencingToken> = infos.iter().filter_map(|h| h.token).collect();
    tokens
        .iter()
        .map(|t| (tokens.iter().filter(|o| *o == t).count(), *t))
        .max()
        .map(|(_, t)| t)
}

fn internal(operation: Operation, e: &tokio::task::JoinError) -> Error {
    Error::new(
        ErrorKind::Backend,
        operation,
        format!("a Redlock node task failed: {e}"),
    )
}

#[async_trait]
impl Backend for RedlockBackend {
    fn name(&self) -> &'static str {
        "redlock"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Safety::Quorum, Binding::Lease).with_native_wait(true)
    }

    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Acquired> {
        if request.mode != Mode::Exclusive {
            return Err(Error::new(
                ErrorKind::Unsupported,
                Operation::Acquire,
                "the redlock backend supports exclusive locks only",
            ));
        }
        self.grant(request).await
    }

    async fn extend(&self, lock: &LockRef<'_>, lease: Duration) -> Result<Confirm> {
        let (key, owner) = (lock.key.clone(), *lock.owner);
        let answers = self
            .each(
                |node| {
                    let key = key.clone();
                    async move { node.extend(&LockRef::new(&key, &owner), lease).await }
                },
                Operation::Extend,
            )
            .await;
        self.tally(Operation::Extend, answers)
    }

    async fn release(&self, lock: &LockRef<'_>) -> Result<Confirm> {
        let (key, owner) = (lock.key.clone(), *lock.owner);
        let answers = self
            .each(
                |node| {
                    let key = key.clone();
                    async move { node.release(&LockRef::new(&key, &owner)).await }
                },
                Operation::Release,
            )
            .await;
        self.tally(Operation::Release, answers)
    }

    async fn watch(&self, key: &Key) -> Result<Box<dyn Watch>> {
        let mut set = JoinSet::new();
        for (i, node) in self.inner.nodes.iter().enumerate() {
            if let Some(node) = node.get() {
                let key = key.clone();
                set.spawn(async move { (i, node.watch(&key).await) });
            }
        }
        let mut watches = Vec::new();
        while let Some(joined) = set.join_next().await {
            if let Ok((_, Ok(watch))) = joined {
                watches.push(watch);
            }
        }
        let n = self.inner.nodes.len();
        Ok(Box::new(wait::RedlockWatch::new(
            watches,
            n - self.quorum() + 1,
        )))
    }

    async fn holder(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let answers = self
            .each(
                |node| {
                    let key = key.clone();
                    async move { node.holder(&key).await }
                },
                Operation::Admin,
            )
            .await;
        let held = self
            .majority_answered(answers)?
            .into_iter()
            .flatten()
            .collect();
        Ok(self.majority_holder(held))
    }

    async fn force_release(&self, key: &Key) -> Result<Option<HolderInfo>> {
        let answers = self
            .each(
                |node| {
                    let key = key.clone();
                    async move { node.force_release(&key).await }
                },
                Operation::Admin,
            )
            .await;
        let mut broken = Vec::new();
        let mut errors = Vec::new();
        for (i, answer) in answers {
            match answer {
                Ok(info) => broken.extend(info),
                Err(e) => errors.push((i, e)),
            }
        }
        if !errors.is_empty() && broken.len() < self.quorum() {
            return Err(self.too_few(
                Operation::Admin,
                self.inner.nodes.len() - errors.len(),
                &errors,
            ));
        }
        Ok((!broken.is_empty()).then(|| self.holder_of(&broken)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<HolderInfo>> {
        let answers = self
            .each(
                |node| {
                    let prefix = prefix.to_owned();
                    async move { node.list(&prefix).await }
                },
                Operation::Admin,
            )
            .await;
        let mut all: Vec<HolderInfo> = self
            .majority_answered(answers)?
            .into_iter()
            .flatten()
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        let mut out = Vec::new();
        let mut rest = all.as_slice();
        while let Some(first) = rest.first() {
            let same = rest.iter().take_while(|h| h.key == first.key).count();
            let (group, tail) = rest.split_at(same);
            if let Some(mut info) = self.majority_holder(group.to_vec()) {
                info.key = first.key.clone();
                out.push(info);
            }
            rest = tail;
        }
        Ok(out)
    }

    /// Nodes restarted within `max_lease` (the delayed-restart rule is broken while they are
    /// that young) and nodes that do not answer (one fewer failure away from no majority).
    async fn warnings(&self, max_lease: Duration) -> Result<Vec<String>> {
        let mut notes: Vec<(usize, String)> = self
            .uptimes()
            .await
            .into_iter()
            .filter_map(|(i, uptime)| {
                let shown = &self.inner.nodes.get(i)?.address;
                let note = match uptime {
                    Ok(up) if up < max_lease => format!(
                        "Redlock node {} ({shown}) started {:.1}s ago, less than the longest lease \
                         ({max_lease:?}): if it restarted empty, a lock it held may be granted a second time \
                         until {:.1}s from now (the delayed-restart rule); fencing tokens still refuse the \
                         earlier holder's writes",
                        i + 1,
                        up.as_secs_f64(),
                        (max_lease - up).as_secs_f64()
                    ),
                    Ok(_) => return None,
                    Err(e) => format!(
                        "Redlock node {} ({shown}) does not answer ({e}); {} of {} nodes must grant each lock",
                        i + 1,
                        self.quorum(),
                        self.inner.nodes.len()
                    ),
                };
                Some((i, note))
            })
            .collect();
        notes.sort_unstable();
        Ok(notes.into_iter().map(|(_, note)| note).collect())
    }
}
