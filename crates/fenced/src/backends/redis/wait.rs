//! Waiting on Redis: release notifications over one pub/sub connection per backend.
//!
//! A background task owns the connection. [`Notifier::watch`] registers interest in a channel
//! (reference-counted: however many local waiters watch a key, the backend subscribes to its
//! channel once) and returns only after the server confirmed the `SUBSCRIBE`, so a release
//! published after `watch` returned is never missed. Every message bumps the key's
//! [`tokio::sync::watch`] counter, which wakes all of this backend's waiters for that key. When
//! the last watch of a key is dropped, the task sends `UNSUBSCRIBE`.
//!
//! When the connection drops, the task reconnects with backoff, subscribes to every channel
//! still watched, and then bumps every counter: releases published while it was away were
//! missed, so every waiter re-checks. A half-open connection is found by a `PING` every
//! [`PING_EVERY`] while anything is watched.
//!
//! On a Redis Cluster ([`Notifier::start_cluster`]) the release scripts announce with `SPUBLISH`
//! and the task `SSUBSCRIBE`s each watched channel through the cluster connection (RESP3 push),
//! which routes it to the primary that owns the channel's slot, the lock's slot (one hash tag):
//! a release reaches only the waiters of that shard instead of being broadcast to every node.
//! The client library re-subscribes after a reconnect or a slot move; on top of that, when it
//! reports a lost connection (a `Disconnection` push) the task subscribes every watched channel
//! again itself and, once confirmed, wakes every waiter (releases may have been missed in
//! between), and when a node drops a subscription (`sunsubscribe` after its slot moved) the task
//! subscribes that channel again (the cluster routes it to the new owner) and wakes its waiters.
//! A re-subscription that the library made on its own (an `ssubscribe` confirmation for a
//! channel already subscribed) wakes that channel's waiters too. The library can also drop a
//! node connection, and the subscriptions on it, without any push (while it refreshes the slot
//! map after a failover, a connection it opened for a redirection replaces the one it had just
//! re-subscribed), so every [`PING_EVERY`] while anything is subscribed the task checks them:
//! `CLIENT INFO` through the connection each channel is routed to counts that connection's
//! shard subscriptions (`ssub`), and the channels of a connection that counts fewer than it
//! should are subscribed again, and their waiters woken once that is confirmed. Such wake-ups
//! wait until the channel's slot is served (a `PTTL` of the channel's name answers): while a
//! primary is down, the library confirms subscriptions from its replica, and a waiter woken
//! before that replica is promoted would only meet errors and could use up its retries.
//!
//! If a subscription cannot be confirmed within the command timeout (server unreachable,
//! or the Redis user may not subscribe), the watch still works in a degraded way: it also wakes
//! after a backoff (10 ms doubling to 1 s), so waiters keep re-checking instead of failing.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{PubSub, PubSubSink, PubSubStream};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::backend::Watch;
use crate::error::Result;

/// How often an idle pub/sub connection is checked while anything is watched.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(5);
/// Reconnect backoff bounds.
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Opens a pub/sub connection (with the backend's timeout and error mapping).
pub(crate) type Connect = Box<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = std::result::Result<PubSub, String>> + Send>,
        > + Send
        + Sync,
>;

/// The notification side of one backend: the shared subscription table and its task.
pub(crate) struct Notifier {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state();
        f.debug_struct("Notifier")
            .field("watched_channels", &state.channels.len())
            .field("subscribed_channels", &state.subscribed.len())
            .finish()
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    state: Mutex<State>,
    /// Tells the task that the set of watched channels changed.
    wake: Notify,
    /// Tells the task to drop its connection and open another (Sentinel: the primary moved).
    reconnect: Notify,
    timeout: Duration,
}

#[derive(Default)]
struct State {
    /// Every channel some live watch is interested in.
    channels: HashMap<Arc<str>, Channel>,
    /// The channels whose subscription the server confirmed on the current connection.
    subscribed: HashSet<Arc<str>>,
    /// Why the last connection attempt or subscription failed, for log messages.
    problem: Option<String>,
    /// Whether a degraded watch was already reported since the last confirmed subscription.
    warned: bool,
    /// Cluster: channels whose subscription was lost; their waiters are woken once it is back.
    #[cfg(feature = "redis-cluster")]
    rebump: HashSet<Arc<str>>,
}

struct Channel {
    refs: usize,
    /// Bumped on every message on the channel and after every reconnect.
    bumps: watch::Sender<u64>,
    /// Watches waiting for the subscription to be confirmed.
    waiters: Vec<oneshot::Sender<()>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Notifier {
    /// Starts the task on an already connected pub/sub connection; `connect` opens the next one
    /// after a disconnect.
    pub(crate) fn start(first: PubSub, connect: Connect, timeout: Duration) -> Notifier {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            reconnect: Notify::new(),
            timeout,
        });
        let task = tokio::spawn(run(shared.clone(), first, connect));
        Notifier { shared, task }
    }

    /// A watch of `channel` that resolves on every message published to it. Returns once the
    /// subscription is confirmed (or, after the timeout, a degraded watch that also backs off).
    pub(crate) async fn watch(&self, channel: String) -> RedisWatch {
        let channel: Arc<str> = channel.into();
        let (rx, confirmed) = {
            let mut state = self.shared.state();
            let subscribed = state.subscribed.contains(&channel);
            let entry = state
                .channels
                .entry(channel.clone())
                .or_insert_with(|| Channel {
                    refs: 0,
                    bumps: watch::channel(0).0,
                    waiters: Vec::new(),
                });
            entry.refs += 1;
            let rx = entry.bumps.subscribe();
            if subscribed {
                (rx, None)
            } else {
                let (tx, confirmed) = oneshot::channel();
                entry.waiters.push(tx);
                (rx, Some(confirmed))
            }
        };
        // Built before waiting, so that cancelling this future still drops the reference.
        let mut watch = RedisWatch {
            shared: self.shared.clone(),
            channel,
            rx,
            backoff: None,
        };
        if let Some(confirmed) = confirmed {
            self.shared.wake.notify_one();
            if !matches!(
                tokio::time::timeout(self.shared.timeout, confirmed).await,
                Ok(Ok(()))
            ) {
                let (problem, first) = {
                    let mut state = self.shared.state();
                    (
                        state.problem.clone(),
                        !std::mem::replace(&mut state.warned, true),
                    )
                };
                let problem = problem.as_deref().unwrap_or("no confirmation in time");
                if first {
                    warn!(
                        channel = %watch.channel,
                        problem,
                        "fenced: redis subscription not confirmed; waiters re-check with backoff until it is"
                    );
                } else {
                    debug!(channel = %watch.channel, problem, "fenced: redis subscription not confirmed");
                }
                watch.backoff = Some(0);
            }
        }
        watch
    }

    /// Starts the task of a Redis Cluster backend: sharded subscriptions (`SSUBSCRIBE`) through
    /// `conn`, whose push messages arrive on `pushes`.
    #[cfg(feature = "redis-cluster")]
    pub(crate) fn start_cluster(
        conn: redis::cluster_async::ClusterConnection,
        pushes: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
        timeout: Duration,
    ) -> Notifier {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            reconnect: Notify::new(),
            timeout,
        });
        let task = tokio::spawn(cluster::run(shared.clone(), conn, pushes));
        Notifier { shared, task }
    }

    /// A handle that makes the task drop its pub/sub connection and open the next one through
    /// its `connect` (Sentinel: the primary moved); once every watched channel is subscribed
    /// there, every waiter is woken, as after any reconnect.
    #[cfg(feature = "redis-sentinel")]
    pub(crate) fn reconnector(&self) -> Reconnector {
        Reconnector(Arc::downgrade(&self.shared))
    }

    /// How many channels are subscribed on the current connection (for diagnostics and tests).
    pub(crate) fn subscribed_channels(&self) -> usize {
        self.shared.state().subscribed.len()
    }
}

/// See [`Notifier::reconnector`].
#[cfg(feature = "redis-sentinel")]
pub(crate) struct Reconnector(std::sync::Weak<Shared>);

#[cfg(feature = "redis-sentinel")]
impl Reconnector {
    /// Reconnects now (or, while a connection is being opened, right after it).
    pub(crate) fn reconnect(&self) {
        if let Some(shared) = self.0.upgrade() {
            shared.reconnect.notify_one();
        }
    }
}

/// One waiter's subscription to a key's release channel.
pub(crate) struct RedisWatch {
    shared: Arc<Shared>,
    channel: Arc<str>,
    rx: watch::Receiver<u64>,
    /// `Some(attempt)` when the subscription was not confirmed: also wake after a backoff.
    backoff: Option<u32>,
}

impl fmt::Debug for RedisWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisWatch")
            .field("channel", &self.channel)
            .field("degraded", &self.backoff.is_some())
            .finish()
    }
}

#[async_trait]
impl Watch for RedisWatch {
    async fn changed(&mut self) -> Result<()> {
        let Some(attempt) = self.backoff else {
            // The sender lives in the channel entry, which stays while this watch exists.
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            return Ok(());
        };
        let cap = Duration::from_millis(10)
            .saturating_mul(1 << attempt.min(7))
            .min(Duration::from_secs(1));
        self.backoff = Some(attempt + 1);
        tokio::select! {
            _ = self.rx.changed() => {}
            _ = tokio::time::sleep(cap / 2 + crate::options::jitter(cap / 2)) => {}
        }
        Ok(())
    }
}

impl Drop for RedisWatch {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        let Some(entry) = state.channels.get_mut(&self.channel) else {
            return;
        };
        entry.refs -= 1;
        if entry.refs == 0 {
            state.channels.remove(&self.channel);
            drop(state);
            self.shared.wake.notify_one();
        }
    }
}

/// The task: keeps the subscriptions of the current connection equal to the watched channels,
/// delivers messages, and reconnects.
async fn run(shared: Arc<Shared>, first: PubSub, connect: Connect) {
    let mut next = Some(first);
    let mut reconnected = false;
    let mut failures: u32 = 0;
    loop {
        let pubsub = match next.take() {
            Some(pubsub) => pubsub,
            None => match connect().await {
                Ok(pubsub) => pubsub,
                Err(problem) => {
                    debug!(%problem, "fenced: redis pub/sub reconnect failed");
                    shared.state().problem = Some(problem);
                    backoff(&mut failures).await;
                    continue;
                }
            },
        };
        let started = tokio::time::Instant::now();
        let (mut sink, mut stream) = pubsub.split();
        let problem = session(&shared, &mut sink, &mut stream, reconnected).await;
        {
            let mut state = shared.state();
            state.subscribed.clear();
            state.problem = Some(problem.clone());
        }
        debug!(%problem, "fenced: redis pub/sub connection lost; reconnecting");
        reconnected = true;
        // A connection that failed at once (a refused SUBSCRIBE, say) must not make a hot loop.
        if started.elapsed() > STABLE {
            failures = 0;
        }
        backoff(&mut failures).await;
    }
}

/// A connection that lived this long resets the reconnect backoff.
const STABLE: Duration = Duration::from_secs(30);

/// Sleeps before reconnect attempt number `failures` (jittered exponential backoff).
async fn backoff(failures: &mut u32) {
    tokio::time::sleep(backoff_delay(failures)).await;
}

/// The jittered delay before attempt number `failures`, which it counts.
fn backoff_delay(failures: &mut u32) -> Duration {
    let delay = RECONNECT_MIN
        .saturating_mul(1 << (*failures).min(10))
        .min(RECONNECT_MAX);
    *failures += 1;
    delay / 2 + crate::options::jitter(delay / 2)
}

/// Serves one connection until it fails; returns why.
async fn session(
    shared: &Shared,
    sink: &mut PubSubSink,
    stream: &mut PubSubStream,
    reconnected: bool,
) -> String {
    let mut bump_all = reconnected;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.reset();
    loop {
        if let Err(problem) = reconcile(shared, sink).await {
            return problem;
        }
        if bump_all {
            // Resubscribed: anything published while disconnected was missed, so wake everyone.
            bump_all = false;
            let state = shared.state();
            state.channels.values().for_each(bump);
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = shared.reconnect.notified() => return "asked to reconnect (the primary moved)".to_owned(),
            message = next_message(stream) => match message {
                Some(message) => {
                    let state = shared.state();
                    if let Some(entry) = state.channels.get(message.get_channel_name()) {
                        bump(entry);
                    }
                }
                None => return "the server closed the pub/sub connection".to_owned(),
            },
            _ = ping.tick() => {
                if shared.state().channels.is_empty() {
                    continue;
                }
                match tokio::time::timeout(shared.timeout, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("pub/sub ping failed: {e}"),
                    Err(_) => return format!("pub/sub ping got no reply within {:?}", shared.timeout),
                }
            }
        }
    }
}

/// The next message of the connection; `None` once it is closed.
pub(super) async fn next_message(stream: &mut PubSubStream) -> Option<redis::Msg> {
    use futures_core::Stream as _;
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *stream).poll_next(cx)).await
}

/// The channels to subscribe (watched, not subscribed) and to unsubscribe (subscribed, no longer
/// watched; forgotten at once).
fn plan(shared: &Shared) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
    let mut state = shared.state();
    let state = &mut *state;
    let unsubscribe: Vec<Arc<str>> = state
        .subscribed
        .iter()
        .filter(|c| !state.channels.contains_key(*c))
        .cloned()
        .collect();
    // Forget them before the command is sent: a new watch of such a channel must wait for
    // the next SUBSCRIBE rather than trust one that is being undone.
    for channel in &unsubscribe {
        state.subscribed.remove(channel);
    }
    let subscribe: Vec<Arc<str>> = state
        .channels
        .keys()
        .filter(|c| !state.subscribed.contains(*c))
        .cloned()
        .collect();
    (subscribe, unsubscribe)
}

/// Records subscriptions the server confirmed and tells the watches waiting for them.
fn confirmed(shared: &Shared, subscribe: Vec<Arc<str>>) {
    let mut state = shared.state();
    let state = &mut *state;
    if !subscribe.is_empty() {
        state.warned = false;
    }
    state.subscribed.extend(subscribe);
    for (name, entry) in &mut state.channels {
        if !entry.waiters.is_empty() && state.subscribed.contains(name) {
            for waiter in entry.waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

/// Wakes every watch of a channel.
fn bump(entry: &Channel) {
    entry.bumps.send_modify(|n| *n = n.wrapping_add(1));
}

/// Unsubscribes channels nobody watches, subscribes new ones, and tells waiting watches.
async fn reconcile(shared: &Shared, sink: &mut PubSubSink) -> std::result::Result<(), String> {
    let (subscribe, unsubscribe) = plan(shared);
    if !unsubscribe.is_empty() {
        let names: Vec<&str> = unsubscribe.iter().map(|c| &**c).collect();
        match tokio::time::timeout(shared.timeout, sink.unsubscribe(&names)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("UNSUBSCRIBE failed: {e}")),
            Err(_) => {
                return Err(format!(
                    "UNSUBSCRIBE got no reply within {:?}",
                    shared.timeout
                ));
            }
        }
    }
    if !subscribe.is_empty() {
        let names: Vec<&str> = subscribe.iter().map(|c| &**c).collect();
        match tokio::time::timeout(shared.timeout, sink.subscribe(&names)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let problem = format!("SUBSCRIBE failed: {e}");
                shared.state().problem = Some(problem.clone());
                return Err(problem);
            }
            Err(_) => {
                return Err(format!(
                    "SUBSCRIBE got no reply within {:?}",
                    shared.timeout
                ));
            }
        }
    }
    confirmed(shared, subscribe);
    Ok(())
}

/// The task of a Redis Cluster backend (see the module docs).
#[cfg(feature = "redis-cluster")]
mod cluster {
    use std::collections::HashMap;
    use std::sync::Arc;

    use redis::cluster_async::ClusterConnection;
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
    use redis::{PushInfo, PushKind, Value};
    use tokio::sync::mpsc::UnboundedReceiver;
    use tracing::debug;

    use super::{PING_EVERY, Shared, backoff_delay, bump, confirmed, plan};

    pub(super) async fn run(
        shared: Arc<Shared>,
        mut conn: ClusterConnection,
        mut pushes: UnboundedReceiver<PushInfo>,
    ) {
        let mut failures: u32 = 0;
        let mut check = tokio::time::interval(PING_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.reset();
        loop {
            let wait = match reconcile(&shared, &mut conn).await {
                Ok(()) => {
                    failures = 0;
                    None
                }
                Err(problem) => {
                    debug!(%problem, "fenced: redis cluster subscription failed; retrying");
                    shared.state().problem = Some(problem);
                    Some(tokio::time::sleep(backoff_delay(&mut failures)))
                }
            };
            // Pushes keep flowing while a failed subscription waits for its retry.
            let retry = async {
                match wait {
                    Some(sleep) => sleep.await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(retry);
            loop {
                tokio::select! {
                    _ = &mut retry => break,
                    _ = shared.wake.notified() => break,
                    push = pushes.recv() => match push {
                        Some(push) => on_push(&shared, push),
                        // The cluster connection is gone (the backend was dropped).
                        None => return,
                    },
                    _ = check.tick() => {
                        if lost_subscriptions(&shared, &mut conn).await {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// `SUNSUBSCRIBE`s channels nobody watches and `SSUBSCRIBE`s new ones, one command per
    /// channel (each is routed to its own slot's primary), then wakes the watches of channels
    /// whose lost subscription is back.
    async fn reconcile(
        shared: &Shared,
        conn: &mut ClusterConnection,
    ) -> std::result::Result<(), String> {
        let (subscribe, unsubscribe) = plan(shared);
        let timeout = shared.timeout;
        for channel in &unsubscribe {
            // A subscription left behind costs only messages that nobody waits for.
            match tokio::time::timeout(timeout, conn.sunsubscribe(&**channel)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%channel, error = %e, "fenced: SUNSUBSCRIBE failed"),
                Err(_) => debug!(%channel, "fenced: SUNSUBSCRIBE got no reply in time"),
            }
        }
        let mut done = Vec::with_capacity(subscribe.len());
        let mut problem = None;
        for channel in subscribe {
            match tokio::time::timeout(timeout, conn.ssubscribe(&*channel)).await {
                Ok(Ok(())) => done.push(channel),
                Ok(Err(e)) => problem = Some(format!("SSUBSCRIBE {channel} failed: {e}")),
                Err(_) => {
                    problem = Some(format!(
                        "SSUBSCRIBE {channel} got no reply within {timeout:?}"
                    ));
                }
            }
        }
        confirmed(shared, done);
        let back: Vec<Arc<str>> = {
            let state = shared.state();
            state
                .rebump
                .iter()
                .filter(|c| state.subscribed.contains(*c) || !state.channels.contains_key(*c))
                .cloned()
                .collect()
        };
        for channel in back {
            if shared.state().channels.contains_key(&channel)
                && let Err(e) = slot_served(conn, &channel, timeout).await
            {
                problem.get_or_insert(e);
                continue;
            }
            let mut state = shared.state();
            state.rebump.remove(&channel);
            if let Some(entry) = state.channels.get(&channel) {
                bump(entry);
            }
        }
        problem.map_or(Ok(()), Err)
    }

    /// Whether `channel`'s slot is served, asked with a read of the channel's own name as a key
    /// (`PTTL`: no such key, but the same slot), routed like the lock's commands: waiters are
    /// woken after a lost subscription only once it is. While a primary is down and before its
    /// replica is promoted, the library can confirm a subscription from that replica (its
    /// fallback for commands that replicas serve), and waiters woken then would only meet
    /// errors, and could use up their retries on them.
    async fn slot_served(
        conn: &mut ClusterConnection,
        channel: &str,
        timeout: std::time::Duration,
    ) -> std::result::Result<(), String> {
        let mut probe = redis::cmd("PTTL");
        probe.arg(channel);
        match tokio::time::timeout(timeout, probe.query_async::<Value>(conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("the slot of {channel} is not served: {e}")),
            Err(_) => Err(format!(
                "the slot of {channel} gave no answer within {timeout:?}"
            )),
        }
    }

    /// Whether subscriptions the task counts as confirmed are gone from the connections their
    /// channels are routed to (see the module docs); those channels are then marked for
    /// subscribing again and for waking their waiters once that is confirmed. A connection that
    /// cannot answer is left to the reconnect handling.
    async fn lost_subscriptions(shared: &Shared, conn: &mut ClusterConnection) -> bool {
        let channels: Vec<Arc<str>> = shared.state().subscribed.iter().cloned().collect();
        // "node address, connection id" → (its shard subscriptions, our channels routed there)
        let mut connections: HashMap<String, (u64, Vec<Arc<str>>)> = HashMap::new();
        for channel in channels {
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                Route::with_key(channel.as_bytes(), SlotAddr::Master),
            ));
            let info = redis::cmd("CLIENT").arg("INFO").clone();
            let text = match tokio::time::timeout(shared.timeout, conn.route_command(info, route))
                .await
            {
                Ok(Ok(Value::BulkString(bytes))) => String::from_utf8_lossy(&bytes).into_owned(),
                Ok(Ok(Value::VerbatimString { text, .. } | Value::SimpleString(text))) => text,
                other => {
                    debug!(%channel, reply = ?other, "fenced: CLIENT INFO gave no answer to check subscriptions with");
                    continue;
                }
            };
            let field = |name: &str| {
                text.split_whitespace()
                    .find_map(|f| f.strip_prefix(name))
                    .map(str::to_owned)
            };
            let (Some(id), Some(laddr), Some(ssub)) = (
                field("id="),
                field("laddr="),
                field("ssub=").and_then(|n| n.parse::<u64>().ok()),
            ) else {
                continue;
            };
            connections
                .entry(format!("{laddr}, id {id}"))
                .or_insert_with(|| (ssub, Vec::new()))
                .1
                .push(channel);
        }
        let mut state = shared.state();
        let state = &mut *state;
        let mut lost = false;
        for (connection, (ssub, channels)) in connections {
            if ssub >= channels.len() as u64 {
                continue;
            }
            debug!(%connection, ssub, expected = channels.len(), "fenced: redis cluster subscriptions lost; subscribing again");
            for channel in channels {
                if state.subscribed.remove(&channel) {
                    state.rebump.insert(channel);
                    lost = true;
                }
            }
        }
        lost
    }

    /// One push message of the cluster connection.
    fn on_push(shared: &Shared, push: PushInfo) {
        let channel = match push.data.first() {
            Some(Value::BulkString(bytes)) => std::str::from_utf8(bytes).ok(),
            Some(Value::SimpleString(text)) => Some(text.as_str()),
            _ => None,
        };
        let mut state = shared.state();
        let state = &mut *state;
        match (push.kind, channel) {
            (PushKind::SMessage, Some(channel)) => {
                if let Some(entry) = state.channels.get(channel) {
                    bump(entry);
                }
            }
            // The library subscribed again on its own (a reconnect, a slot move): releases may
            // have been missed meanwhile, so the waiters are woken (once the slot is served).
            (PushKind::SSubscribe, Some(channel)) if state.subscribed.contains(channel) => {
                if let Some((name, _)) = state.channels.get_key_value(channel) {
                    state.rebump.insert(name.clone());
                    shared.wake.notify_one();
                }
            }
            // A node dropped a subscription (its slot moved away): subscribe again, through the
            // cluster, which routes it to the slot's new owner; wake the waiters once it is back.
            (PushKind::SUnsubscribe, Some(channel)) if state.channels.contains_key(channel) => {
                if let Some(channel) = state.subscribed.take(channel) {
                    state.rebump.insert(channel);
                    shared.wake.notify_one();
                }
            }
            // A node connection was lost: subscribe every channel again (the library would too,
            // once it reconnects; doing it here does not depend on when), and wake the waiters
            // once that is confirmed. Not before: while the node is down (a primary that died,
            // until its replica is promoted) a waiter woken now would only meet errors, and could
            // use up its retries on them.
            (PushKind::Disconnection, _) => {
                state.subscribed.clear();
                for name in state.channels.keys() {
                    state.rebump.insert(name.clone());
                }
                shared.wake.notify_one();
            }
            _ => {}
        }
    }
}
