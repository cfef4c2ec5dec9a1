//! The PostgreSQL floor: the statements fenced sends, on bare tokio-postgres connections.
//!
//! Lease mode (the default): one connection per process, shared by its tasks (tokio-postgres
//! pipelines their statements). Acquire = one upsert that takes the key's row when it has no
//! owner or its expiry (the database's clock) has passed, with a fencing token from a sequence;
//! release = one owner-checked `UPDATE`. In handoff mode the release also `pg_notify`s, and one
//! `LISTEN`ing connection per process wakes one local waiter per notification.
//!
//! Session mode (`?mode=session`): `pg_try_advisory_lock` + `pg_advisory_unlock` on a session of
//! the acquiring task's own (advisory locks are re-entrant within a session, so tasks must not
//! share one): idle sessions are kept in a per-process pool. In handoff mode the acquire is the
//! blocking `pg_advisory_lock`, so waiters queue in the server. No row, no token.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};

use super::Owners;
use crate::locker::{Locker, WAIT};

const SCHEMA: &str = "BEGIN; SELECT pg_advisory_xact_lock(7241); \
    CREATE TABLE IF NOT EXISTS floor_locks (lock_key text PRIMARY KEY, owner text, \
    token bigint NOT NULL, expires_at timestamptz NOT NULL); \
    CREATE SEQUENCE IF NOT EXISTS floor_tokens; COMMIT;";

/// Takes the row when it is free or expired; returns the fencing token when granted.
const TAKE: &str = "INSERT INTO floor_locks AS l (lock_key, owner, token, expires_at) \
    VALUES ($1, $2, nextval('floor_tokens'), now() + $3::float8 * interval '1 millisecond') \
    ON CONFLICT (lock_key) DO UPDATE SET owner = EXCLUDED.owner, token = EXCLUDED.token, \
    expires_at = EXCLUDED.expires_at WHERE l.owner IS NULL OR l.expires_at <= now() \
    RETURNING token";
/// Clears the row's owner if it is still ours.
const GIVE_BACK: &str = "UPDATE floor_locks SET owner = NULL, expires_at = now() \
    WHERE lock_key = $1 AND owner = $2";
/// The same, announced on the channel `$3`.
const GIVE_BACK_NOTIFY: &str = "WITH r AS (UPDATE floor_locks SET owner = NULL, \
    expires_at = now() WHERE lock_key = $1 AND owner = $2 RETURNING 1) \
    SELECT pg_notify($3, '') FROM r";

/// A held floor lock.
#[derive(Debug)]
pub(crate) enum PgHeld {
    /// Lease mode: the row's key and owner.
    Lease { key: String, owner: String },
    /// Session mode: the advisory lock id and the session holding it.
    Session { id: i64, session: Session },
}

/// A session-mode connection with its statements.
#[derive(Debug)]
pub(crate) struct Session {
    client: Client,
    try_lock: Statement,
    lock: Statement,
    unlock: Statement,
}

#[derive(Debug)]
enum Kind {
    Lease {
        client: Client,
        take: Statement,
        give_back: Statement,
        /// Handoff mode: the channel, its waiters, and the listening connection (kept open).
        notify: Option<(String, Arc<Notify>, Client)>,
    },
    Session {
        config: tokio_postgres::Config,
        idle: Mutex<Vec<Session>>,
    },
}

/// The bare PostgreSQL operations.
#[derive(Debug)]
pub(crate) struct PgFloor {
    kind: Kind,
    handoff: bool,
    lease_ms: f64,
    owners: Owners,
}

/// `postgres://…[?mode=session]` → the connection settings without fenced's parameters, and
/// whether the URL asks for session mode.
fn parse(url: &str) -> Result<(tokio_postgres::Config, bool), String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let session = query.split('&').any(|p| p == "mode=session");
    let config = base
        .parse()
        .map_err(|e| format!("{base} is not a PostgreSQL URL: {e}"))?;
    Ok((config, session))
}

/// Opens a connection and drives it on its own task.
async fn open(config: &tokio_postgres::Config) -> Result<Client, String> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| format!("connecting to PostgreSQL: {e}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// 64-bit FNV-1a of the key: its advisory lock id.
fn lock_id(key: &str) -> i64 {
    super::fnv1a(key) as i64
}

fn sql_error(what: &str, e: &tokio_postgres::Error) -> String {
    format!("{what}: {e}")
}

impl PgFloor {
    /// Connects; in handoff mode also listens on `channel` (lease mode).
    pub(crate) async fn connect(
        url: &str,
        lease: Duration,
        handoff: bool,
        channel: String,
    ) -> Result<PgFloor, String> {
        let (config, session) = parse(url)?;
        let kind = if session {
            Kind::Session {
                config,
                idle: Mutex::new(Vec::new()),
            }
        } else {
            let client = open(&config).await?;
            client
                .batch_execute(SCHEMA)
                .await
                .map_err(|e| sql_error("creating floor_locks", &e))?;
            let take = client
                .prepare(TAKE)
                .await
                .map_err(|e| sql_error("PREPARE", &e))?;
            let give_back = client
                .prepare(if handoff { GIVE_BACK_NOTIFY } else { GIVE_BACK })
                .await
                .map_err(|e| sql_error("PREPARE", &e))?;
            let notify = if handoff {
                Some(listen(&config, channel).await?)
            } else {
                None
            };
            Kind::Lease {
                client,
                take,
                give_back,
                notify,
            }
        };
        Ok(PgFloor {
            kind,
            handoff,
            lease_ms: lease.as_secs_f64() * 1000.0,
            owners: Owners::new(),
        })
    }

    /// An idle session of the pool, or a new one.
    async fn session(&self) -> Result<Session, String> {
        let Kind::Session { config, idle } = &self.kind else {
            return Err("not in session mode".to_owned());
        };
        if let Some(s) = idle.lock().unwrap_or_else(PoisonError::into_inner).pop() {
            return Ok(s);
        }
        let client = open(config).await?;
        let prepare = |sql: &'static str| {
            let client = &client;
            async move {
                client
                    .prepare(sql)
                    .await
                    .map_err(|e| sql_error("PREPARE", &e))
            }
        };
        let try_lock = prepare("SELECT pg_try_advisory_lock($1)").await?;
        let lock = prepare("SELECT pg_advisory_lock($1)").await?;
        let unlock = prepare("SELECT pg_advisory_unlock($1)").await?;
        Ok(Session {
            client,
            try_lock,
            lock,
            unlock,
        })
    }

    fn put_back(&self, session: Session) {
        if let Kind::Session { idle, .. } = &self.kind {
            idle.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(session);
        }
    }
}

/// A connection that `LISTEN`s on `channel` and wakes one waiter per notification.
async fn listen(
    config: &tokio_postgres::Config,
    channel: String,
) -> Result<(String, Arc<Notify>, Client), String> {
    let (client, mut connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| format!("connecting to PostgreSQL: {e}"))?;
    let notify = Arc::new(Notify::new());
    let wake = notify.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(_) = message {
                wake.notify_one();
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await
        .map_err(|e| sql_error("LISTEN", &e))?;
    Ok((channel, notify, client))
}

impl Locker for PgFloor {
    type Held = PgHeld;

    async fn acquire(&self, key: &str) -> Result<PgHeld, String> {
        match &self.kind {
            Kind::Session { .. } => {
                let session = self.session().await?;
                let id = lock_id(key);
                let granted = if self.handoff {
                    // The server queues the waiters; the wait limit is the client's.
                    tokio::time::timeout(WAIT, session.client.query_one(&session.lock, &[&id]))
                        .await
                        .map_err(|_| format!("still held after waiting {WAIT:?}"))?
                        .map_err(|e| sql_error("pg_advisory_lock", &e))?;
                    true
                } else {
                    session
                        .client
                        .query_one(&session.try_lock, &[&id])
                        .await
                        .map_err(|e| sql_error("pg_try_advisory_lock", &e))?
                        .get::<_, bool>(0)
                };
                if granted {
                    Ok(PgHeld::Session { id, session })
                } else {
                    self.put_back(session);
                    Err(format!("{key} is held (unexpected outside handoff mode)"))
                }
            }
            Kind::Lease {
                client,
                take,
                notify,
                ..
            } => {
                let owner = self.owners.next();
                let deadline = Instant::now() + WAIT;
                loop {
                    let notified = notify.as_ref().map(|(_, n, _)| n.notified());
                    tokio::pin!(notified);
                    // Registered before the attempt, so a notification in between is not missed.
                    if let Some(n) = notified.as_mut().as_pin_mut() {
                        n.enable();
                    }
                    let rows = client
                        .query(take, &[&key, &owner, &self.lease_ms])
                        .await
                        .map_err(|e| sql_error("acquire upsert", &e))?;
                    if !rows.is_empty() {
                        return Ok(PgHeld::Lease {
                            key: key.to_owned(),
                            owner,
                        });
                    }
                    let Some(n) = notified.as_pin_mut() else {
                        return Err(format!("{key} is held (unexpected outside handoff mode)"));
                    };
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(format!("still held after waiting {WAIT:?}"));
                    }
                    // Without a notification, try again when a lease could have run out.
                    let fallback = now + Duration::from_secs_f64(self.lease_ms / 1000.0);
                    tokio::select! {
                        _ = n => {}
                        _ = tokio::time::sleep_until(fallback.min(deadline)) => {}
                    }
                }
            }
        }
    }

    async fn release(&self, held: PgHeld) -> Result<(), String> {
        match (held, &self.kind) {
            (PgHeld::Session { id, session }, _) => {
                let unlocked: bool = session
                    .client
                    .query_one(&session.unlock, &[&id])
                    .await
                    .map_err(|e| sql_error("pg_advisory_unlock", &e))?
                    .get(0);
                self.put_back(session);
                if unlocked {
                    Ok(())
                } else {
                    Err("the session did not hold the advisory lock".to_owned())
                }
            }
            (
                PgHeld::Lease { key, owner },
                Kind::Lease {
                    client,
                    give_back,
                    notify,
                    ..
                },
            ) => {
                let done = match notify {
                    Some((channel, _, _)) => client
                        .query(give_back, &[&key, &owner, channel])
                        .await
                        .map(|rows| rows.len() as u64),
                    None => client.execute(give_back, &[&key, &owner]).await,
                }
                .map_err(|e| sql_error("release update", &e))?;
                if done == 1 {
                    Ok(())
                } else {
                    Err("not held by this owner".to_owned())
                }
            }
            (PgHeld::Lease { .. }, Kind::Session { .. }) => {
                Err("a lease-mode lock on a session-mode floor".to_owned())
            }
        }
    }

    fn name(&self) -> &'static str {
        "floor"
    }

    fn version(&self) -> String {
        "tokio-postgres 0.7".to_owned()
    }

    fn settings(&self) -> String {
        let lease = self.lease_ms;
        match (&self.kind, self.handoff) {
            (Kind::Lease { .. }, false) => format!(
                "postgres floor, lease mode: one connection per process (statements pipelined); \
                 acquire = INSERT … ON CONFLICT DO UPDATE … WHERE the row has no owner or \
                 expired (expiry now() + {lease} ms, token from a sequence) RETURNING token; \
                 release = UPDATE … SET owner = NULL WHERE key and owner match; no renewal, no \
                 lost-lock signal"
            ),
            (Kind::Lease { .. }, true) => format!(
                "postgres floor, lease mode: one connection per process (statements pipelined); \
                 acquire = the expiry upsert ({lease} ms, token from a sequence); release = the \
                 owner-checked UPDATE + pg_notify in one statement; waiting: one LISTEN \
                 connection per process, each notification wakes one local waiter \
                 (Notify::notify_one), which retries the upsert; fallback retry after the lease; \
                 no FIFO (a releasing task may take the lock again at once); no renewal"
            ),
            (Kind::Session { .. }, false) => "postgres floor, session mode: one connection per \
                 concurrently held lock (a per-process pool; advisory locks are re-entrant \
                 within a session); acquire = SELECT pg_try_advisory_lock(id), release = SELECT \
                 pg_advisory_unlock(id), id = FNV-1a of the key; no row, no fencing token"
                .to_owned(),
            (Kind::Session { .. }, true) => "postgres floor, session mode: one connection per \
                 waiting or holding task (a per-process pool); acquire = SELECT \
                 pg_advisory_lock(id), which blocks in the server until granted (the server's \
                 own queue), release = SELECT pg_advisory_unlock(id); no row, no fencing token"
                .to_owned(),
        }
    }
}
