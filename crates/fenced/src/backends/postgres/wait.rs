//! How waiters are woken: `LISTEN`/`NOTIFY` on one listening connection per backend.
//!
//! Every release (and forced release) runs `pg_notify(channel, '')` in the same statement, so
//! the notification is sent exactly when the release commits. The channel of a key is
//! `fenced_<16 hex digits>` ([`channel`]), so a client listens only to the keys it waits for,
//! once per key however many of its tasks wait (the client lets one task per key talk to the
//! backend). A holder that vanishes sends nothing: waiters then wake when its lease ends, on the
//! client's timer.
//!
//! A watch is registered before the acquisition attempt it guards, and [`Notifier::watch`]
//! returns only once the listening connection has executed every `LISTEN` asked for so far, so
//! a release between the attempt and the wait is not missed. If the listening connection drops,
//! it is reopened, every channel is listened to again, and every watch is woken once (a release
//! in between would otherwise be missed).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::AsyncMessage;
use tracing::{debug, warn};

use crate::backend::Watch;
use crate::backends::sql::key_hash;
use crate::error::{Error, ErrorKind, Operation, Result};

use super::Connector;

/// The notification channel of `key` in lock table `table`: `fenced_` and
/// [`key_hash`](crate::backends::sql::key_hash)`(table, key)` in 16 hex digits.
pub(crate) fn channel(table: &str, key: &str) -> String {
    format!("fenced_{:016x}", key_hash(table, key))
}

enum Command {
    Listen(String),
    Unlisten(String),
    /// Answered once every command sent before it was executed.
    Sync(oneshot::Sender<bool>),
}

#[derive(Default)]
struct Registry {
    /// Channel → (number of watches, their wake-up counter).
    channels: HashMap<String, (usize, watch::Sender<u64>)>,
}

/// The listening connection and the watches on it.
pub(crate) struct Notifier {
    registry: Arc<Mutex<Registry>>,
    commands: mpsc::UnboundedSender<Command>,
    timeout: Duration,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("channels", &self.listening())
            .finish()
    }
}

impl Notifier {
    /// Starts the listening task; it connects when the first watch is created.
    pub(crate) fn start(connector: Arc<Connector>) -> Notifier {
        let registry = Arc::new(Mutex::new(Registry::default()));
        let (commands, rx) = mpsc::unbounded_channel();
        let timeout = connector.config.params.timeout;
        tokio::spawn(listen(connector, registry.clone(), rx));
        Notifier {
            registry,
            commands,
            timeout,
        }
    }

    /// How many channels are listened to now.
    pub(crate) fn listening(&self) -> usize {
        lock(&self.registry).channels.len()
    }

    /// A watch of `channel`, active when this returns.
    pub(crate) async fn watch(&self, channel: String) -> Result<Box<dyn Watch>> {
        let rx = {
            let mut registry = lock(&self.registry);
            let entry = registry.channels.entry(channel.clone()).or_insert_with(|| {
                let _ = self.commands.send(Command::Listen(channel.clone()));
                (0, watch::channel(0).0)
            });
            entry.0 += 1;
            entry.1.subscribe()
        };
        let watch = PgWatch {
            rx,
            channel,
            registry: self.registry.clone(),
            commands: self.commands.clone(),
        };
        let (ack, done) = oneshot::channel();
        let _ = self.commands.send(Command::Sync(ack));
        match tokio::time::timeout(self.timeout * 2, done).await {
            Ok(Ok(true)) => Ok(Box::new(watch)),
            _ => Err(Error::new(
                ErrorKind::Backend,
                Operation::Wait,
                "the connection that listens for PostgreSQL release notifications is not up; retrying",
            )
            .transient(true)),
        }
    }
}

fn lock(registry: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    registry.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One waiter's subscription; dropping the last one of a channel stops listening to it.
struct PgWatch {
    rx: watch::Receiver<u64>,
    channel: String,
    registry: Arc<Mutex<Registry>>,
    commands: mpsc::UnboundedSender<Command>,
}

impl fmt::Debug for PgWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgWatch")
            .field("channel", &self.channel)
            .finish()
    }
}

impl Drop for PgWatch {
    fn drop(&mut self) {
        let mut registry = lock(&self.registry);
        if let Some(entry) = registry.channels.get_mut(&self.channel) {
            entry.0 -= 1;
            if entry.0 == 0 {
                registry.channels.remove(&self.channel);
                let _ = self.commands.send(Command::Unlisten(self.channel.clone()));
            }
        }
    }
}

#[async_trait]
impl Watch for PgWatch {
    async fn changed(&mut self) -> Result<()> {
        // The sender lives in the registry as long as this watch does.
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

/// The listening task: keeps one connection, executes the commands in order, and turns
/// notifications into wake-ups. Ends when the backend is dropped.
async fn listen(
    connector: Arc<Connector>,
    registry: Arc<Mutex<Registry>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut backoff = Duration::from_millis(50);
    // Commands that arrived while the connection was down and still need an answer.
    let mut pending_syncs: Vec<oneshot::Sender<bool>> = Vec::new();
    loop {
        // Connect only when someone listens.
        if lock(&registry).channels.is_empty() && pending_syncs.is_empty() {
            match commands.recv().await {
                None => return,
                Some(Command::Sync(ack)) => {
                    let _ = ack.send(true);
                    continue;
                }
                Some(_) => {}
            }
        }
        let (client, mut connection) = match connector.raw_connect().await {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "fenced: cannot open the PostgreSQL listening connection; retrying");
                for ack in pending_syncs.drain(..) {
                    let _ = ack.send(false);
                }
                // Answer syncs that arrive meanwhile with "not up", then retry.
                let sleep = tokio::time::sleep(backoff);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        command = commands.recv() => match command {
                            None => return,
                            Some(Command::Sync(ack)) => { let _ = ack.send(false); }
                            Some(_) => {}
                        }
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let (notes, mut notified) = mpsc::unbounded_channel::<String>();
        let pump = tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if notes.send(n.channel().to_owned()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        debug!(error = %e, "fenced: PostgreSQL listening connection closed");
                        return;
                    }
                }
            }
        });
        // Listen to everything registered now, then wake every watch once: a release while
        // the connection was down would otherwise be missed.
        let channels: Vec<String> = lock(&registry).channels.keys().cloned().collect();
        let mut ok = true;
        for channel in &channels {
            if client
                .batch_execute(&format!("LISTEN \"{channel}\""))
                .await
                .is_err()
            {
                ok = false;
                break;
            }
        }
        if ok {
            backoff = Duration::from_millis(50);
            for (_, sender) in lock(&registry).channels.values() {
                sender.send_modify(|n| *n += 1);
            }
            for ack in pending_syncs.drain(..) {
                let _ = ack.send(true);
            }
            // Serve until the connection breaks or the backend goes away.
            loop {
                tokio::select! {
                    note = notified.recv() => match note {
                        Some(channel) => {
                            if let Some((_, sender)) = lock(&registry).channels.get(&channel) {
                                sender.send_modify(|n| *n += 1);
                            }
                        }
                        None => break,
                    },
                    command = commands.recv() => {
                        let result = match command {
                            None => {
                                pump.abort();
                                return;
                            }
                            Some(Command::Listen(channel)) => {
                                client.batch_execute(&format!("LISTEN \"{channel}\"")).await
                            }
                            Some(Command::Unlisten(channel)) => {
                                client.batch_execute(&format!("UNLISTEN \"{channel}\"")).await
                            }
                            Some(Command::Sync(ack)) => {
                                if client.is_closed() {
                                    pending_syncs.push(ack);
                                    break;
                                }
                                let _ = ack.send(true);
                                Ok(())
                            }
                        };
                        if result.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        pump.abort();
        drop(client);
        tokio::time::sleep(backoff).await;
    }
}

/// Session mode: a waiter also learns at once when the holder's session ends without a release
/// (its process killed, its connection cut, its session ended by the server): a second
/// connection waits in `pg_advisory_lock_shared(id)`, which the server grants the moment the
/// holder's exclusive advisory lock goes, and gives it back in the same round trip. It only
/// waits while some session holds the id exclusively (checked in `pg_locks` in the same
/// statement), so a key held by a lease-mode client (no advisory lock) never makes it spin.
pub(crate) struct SessionWatch {
    notify: Box<dyn Watch>,
    connector: Arc<Connector>,
    id: i64,
    arm: Option<tokio::task::JoinHandle<bool>>,
    /// The last wait found no session holding the presence lock.
    idle: bool,
}

impl SessionWatch {
    pub(crate) fn new(notify: Box<dyn Watch>, connector: Arc<Connector>, id: i64) -> Self {
        SessionWatch {
            notify,
            connector,
            id,
            arm: None,
            idle: false,
        }
    }
}

impl fmt::Debug for SessionWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionWatch")
            .field("id", &self.id)
            .field("armed", &self.arm.is_some())
            .finish()
    }
}

impl Drop for SessionWatch {
    fn drop(&mut self) {
        // Dropping the waiting connection makes the server drop its lock request.
        if let Some(arm) = self.arm.take() {
            arm.abort();
        }
    }
}

/// Waits on a new connection until the holder's exclusive advisory lock on `id` goes; `true`
/// when it went, `false` when nobody held it (or the connection failed).
async fn session_gone(connector: Arc<Connector>, id: i64) -> bool {
    let Ok((client, connection)) = connector.raw_connect().await else {
        return false;
    };
    let task = tokio::spawn(connection);
    let (high, low) = super::presence(id);
    let (class, object) = (high as u32, low as u32);
    let (id_class, id_object) = ((id as u64 >> 32) as u32, id as u32);
    // 1. Make the server drop this wait soon after the connection is dropped (the watch gave
    //    up). 2. Wait while a session holds the presence lock, and give it back at once.
    // 3. A session's locks go one by one when it ends: wait (a bounded 200 ms, without taking
    //    anything) until the lock itself is gone too, so the wake-up finds the key free.
    let sql = format!(
        "SET client_connection_check_interval = 100; \
         SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_locks p WHERE p.locktype = 'advisory' AND p.granted \
         AND p.mode = 'ExclusiveLock' AND p.database = (SELECT oid FROM pg_database WHERE datname = \
         current_database()) AND p.classid::text::int8 = {class} AND p.objid::text::int8 = {object} \
         AND p.objsubid = 2) THEN pg_advisory_lock_shared({high}, {low})::text = '' ELSE false END; \
         SELECT pg_advisory_unlock_shared({high}, {low}) FROM pg_locks p WHERE p.locktype = 'advisory' \
         AND p.pid = pg_backend_pid() AND p.mode = 'ShareLock' AND p.classid::text::int8 = {class} \
         AND p.objid::text::int8 = {object} AND p.objsubid = 2; \
         DO $$ BEGIN FOR i IN 1..200 LOOP EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_locks p \
         WHERE p.locktype = 'advisory' AND p.granted AND p.mode = 'ExclusiveLock' \
         AND p.classid::text::int8 = {id_class} AND p.objid::text::int8 = {id_object} AND p.objsubid = 1 \
         AND NOT EXISTS (SELECT 1 FROM pg_locks q WHERE q.locktype = 'advisory' AND q.granted \
         AND q.pid = p.pid AND q.objsubid = 2 AND q.classid = p.classid AND q.objid = p.objid)); \
         PERFORM pg_sleep(0.001); END LOOP; END $$"
    );
    let went = match client.simple_query(&sql).await {
        Ok(messages) => messages.iter().any(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0) == Some("t"),
            _ => false,
        }),
        Err(e) => {
            debug!(error = %e, "fenced: PostgreSQL session watch failed");
            false
        }
    };
    drop(client);
    task.abort();
    went
}

#[async_trait]
impl Watch for SessionWatch {
    async fn changed(&mut self) -> Result<()> {
        let arm = self
            .arm
            .get_or_insert_with(|| tokio::spawn(session_gone(self.connector.clone(), self.id)));
        tokio::select! {
            changed = self.notify.changed() => changed,
            went = arm => {
                self.arm = None;
                if went.unwrap_or(false) {
                    self.idle = false;
                    return Ok(());
                }
                // Nobody holds the presence lock: the holder may have ended between the
                // caller's attempt and this wait, so report a change once; if it is still so
                // at the next wait (a lease-mode holder, which has none), only a notification
                // (or the client's timer) can tell of a change.
                if !std::mem::replace(&mut self.idle, true) {
                    return Ok(());
                }
                self.notify.changed().await
            }
        }
    }
}
