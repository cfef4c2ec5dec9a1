//! Waking waiters on the SQLite backend.
//!
//! Each process keeps one [`SharedFile`] per database file (keyed by its canonical path). While
//! at least one [`SqliteWatch`] exists for that file, a thread polls `PRAGMA data_version` on a
//! read connection of its own: the value changes whenever another connection (in this process or
//! any other) committed a write. In WAL mode this reads the WAL index in shared memory and takes
//! no disk I/O. The interval adapts: 2 ms right after a change, doubling to 50 ms while nothing
//! happens. When the version changed, the thread reads the fencing token currently stored for
//! each watched key, and the store-wide count of deleted locks, and wakes the watchers of the
//! keys that may have become free.
//!
//! Releases made through backends of this process poke the thread, so their waiters are woken at
//! once instead of at the next poll.
//!
//! No lost wake-ups: a watch reads the key's state when it is created, under the same mutex as
//! the poller. A key that was taken and released between two polls looks free at both, but the
//! count of deleted locks has grown, which wakes its watchers.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use tokio::sync::watch;
use tracing::debug;

use crate::backend::Watch;
use crate::error::Result;
use crate::key::Key;

/// The shortest poll interval, used right after a change.
const MIN_POLL: Duration = Duration::from_millis(2);
/// The longest poll interval, reached after a quiet period.
pub(crate) const MAX_POLL: Duration = Duration::from_millis(50);
/// The poll interval after a failed poll.
const ERROR_POLL: Duration = Duration::from_secs(1);

/// What the poller last saw of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Seen {
    /// The token of the stored lock, if any.
    token: Option<i64>,
    /// While no lock is stored: the store-wide count of deleted locks (0 otherwise, so that
    /// deletions of other keys do not disturb watchers of a held key).
    releases: i64,
    /// Bumped to force a wake-up after a polling error.
    nudges: u64,
}

impl Seen {
    fn new(token: Option<i64>, releases: i64, nudges: u64) -> Self {
        Seen {
            token,
            releases: if token.is_none() { releases } else { 0 },
            nudges,
        }
    }

    /// Whether a watcher that last saw `self` must wake on seeing `now`: the key may have been
    /// free in between and nobody is known to hold it since.
    fn wakes(&self, now: &Seen) -> bool {
        if now.nudges != self.nudges {
            return true;
        }
        match (self.token, now.token) {
            // Released or broken (possibly after other holders in between).
            (Some(_), None) => true,
            (None, None) => now.releases != self.releases,
            // Another grant: the holder seen before is gone (it may have been free meanwhile).
            (Some(before), Some(after)) => before != after,
            // Taken since the watcher last looked: wait for that holder's release.
            (None, Some(_)) => false,
        }
    }
}

/// The process-wide waiting state of one database file.
pub(crate) struct SharedFile {
    path: PathBuf,
    busy_timeout: Duration,
    poll: Mutex<Poll>,
    wake: Condvar,
}

#[derive(Default)]
struct Poll {
    /// The poller's own connection (`PRAGMA data_version` ignores a connection's own writes,
    /// and this one never writes).
    conn: Option<Connection>,
    keys: HashMap<Key, watch::Sender<Seen>>,
    running: bool,
    poked: bool,
    version: Option<i64>,
}

impl fmt::Debug for SharedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The [`SharedFile`] of `path` (a canonical path), created on first use.
pub(crate) fn shared_file(path: &Path, busy_timeout: Duration) -> Arc<SharedFile> {
    static FILES: OnceLock<Mutex<HashMap<PathBuf, Weak<SharedFile>>>> = OnceLock::new();
    let mut files = FILES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(file) = files.get(path).and_then(Weak::upgrade) {
        return file;
    }
    files.retain(|_, f| f.strong_count() > 0);
    let file = Arc::new(SharedFile {
        path: path.to_owned(),
        busy_timeout,
        poll: Mutex::new(Poll::default()),
        wake: Condvar::new(),
    });
    files.insert(path.to_owned(), Arc::downgrade(&file));
    file
}

impl SharedFile {
    fn poll(&self) -> MutexGuard<'_, Poll> {
        self.poll.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the poller that a key was freed through this process, so it looks at once.
    pub(crate) fn poke(&self) {
        let mut poll = self.poll();
        if poll.running {
            poll.poked = true;
            self.wake.notify_one();
        }
    }

    /// A watch on `key`, holding the token stored for it now. Blocking (one read).
    pub(crate) fn subscribe(self: &Arc<Self>, key: &Key) -> rusqlite::Result<SqliteWatch> {
        let mut poll = self.poll();
        let conn = match &mut poll.conn {
            Some(conn) => conn,
            slot => slot.insert(self.open()?),
        };
        let (token, releases) = {
            // One snapshot for both reads.
            let read = conn.unchecked_transaction()?;
            (current_token(&read, key)?, releases(&read)?)
        };
        let tx = poll
            .keys
            .entry(key.clone())
            .or_insert_with(|| watch::channel(Seen::default()).0);
        tx.send_if_modified(|seen| replace(seen, Seen::new(token, releases, seen.nudges)));
        let mut rx = tx.subscribe();
        let seen = *rx.borrow_and_update();
        if !poll.running {
            let file = self.clone();
            let spawned = std::thread::Builder::new()
                .name("fenced-sqlite-wait".to_owned())
                .spawn(move || file.run());
            match spawned {
                Ok(_) => poll.running = true,
                Err(e) => {
                    // Without the thread, waiters still wake when the holder's lease ends.
                    debug!(error = %e, "fenced: could not start the sqlite wait thread");
                }
            }
        }
        Ok(SqliteWatch {
            _file: self.clone(),
            rx,
            seen,
        })
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(self.busy_timeout)?;
        conn.pragma_update(None, "query_only", true)?;
        Ok(conn)
    }

    /// The poller thread: runs while the file has watchers.
    fn run(self: Arc<Self>) {
        debug!(path = %self.path.display(), "fenced: sqlite wait thread started");
        let mut interval = MIN_POLL;
        let mut poll = self.poll();
        loop {
            poll.keys.retain(|_, tx| tx.receiver_count() > 0);
            if poll.keys.is_empty() {
                poll.running = false;
                poll.version = None;
                debug!(path = %self.path.display(), "fenced: sqlite wait thread stopped");
                return;
            }
            let poked = std::mem::take(&mut poll.poked);
            interval = match self.check(&mut poll, poked) {
                Ok(true) => MIN_POLL,
                Ok(false) => (interval * 2).min(MAX_POLL),
                Err(e) => {
                    debug!(path = %self.path.display(), error = %e, "fenced: sqlite wait poll failed; waking waiters to retry");
                    poll.conn = None;
                    poll.version = None;
                    for tx in poll.keys.values() {
                        tx.send_modify(|seen| seen.nudges = seen.nudges.wrapping_add(1));
                    }
                    ERROR_POLL
                }
            };
            poll = self
                .wake
                .wait_timeout_while(poll, interval, |p| !p.poked)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// One poll: `Ok(true)` when the file changed since the last one.
    fn check(&self, poll: &mut Poll, poked: bool) -> rusqlite::Result<bool> {
        let Poll {
            conn,
            keys,
            version,
            ..
        } = poll;
        let conn = match conn {
            Some(conn) => conn,
            slot => slot.insert(self.open()?),
        };
        let now: i64 = conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        if !poked && *version == Some(now) {
            return Ok(false);
        }
        *version = Some(now);
        // One snapshot for all reads (a later change moves data_version again).
        let read = conn.unchecked_transaction()?;
        let releases = releases(&read)?;
        for (key, tx) in keys.iter() {
            let token = current_token(&read, key)?;
            tx.send_if_modified(|seen| replace(seen, Seen::new(token, releases, seen.nudges)));
        }
        Ok(true)
    }
}

/// Sets `slot` to `value`; whether it changed.
fn replace(slot: &mut Seen, value: Seen) -> bool {
    let changed = *slot != value;
    *slot = value;
    changed
}

fn releases(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT releases FROM fenced_meta WHERE id = 1")?
        .query_row([], |r| r.get(0))
}

fn current_token(conn: &Connection, key: &Key) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT token FROM fenced_locks WHERE key = ?1")?
        .query_row([key.as_str()], |r| r.get(0))
        .optional()
}

/// A subscription to changes of one key's holder.
pub(crate) struct SqliteWatch {
    /// Keeps the poller's file state alive.
    _file: Arc<SharedFile>,
    rx: watch::Receiver<Seen>,
    seen: Seen,
}

impl fmt::Debug for SqliteWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteWatch")
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Watch for SqliteWatch {
    async fn changed(&mut self) -> Result<()> {
        loop {
            let now = *self.rx.borrow_and_update();
            let wake = self.seen.wakes(&now);
            self.seen = now;
            if wake {
                return Ok(());
            }
            // The sender is kept in the file's key map while receivers exist.
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_rules() {
        let held = |t| Seen::new(Some(t), 7, 0);
        let free = |r| Seen::new(None, r, 0);
        assert!(held(1).wakes(&free(7)), "released");
        assert!(held(1).wakes(&held(2)), "another holder since");
        assert!(!held(1).wakes(&held(1)));
        assert!(
            free(3).wakes(&free(4)),
            "taken and released between two polls"
        );
        assert!(!free(3).wakes(&free(3)));
        assert!(!free(3).wakes(&held(9)), "taken: wait for its release");
        assert!(held(1).wakes(&Seen::new(Some(1), 7, 1)), "nudged");
        assert_eq!(
            held(1),
            Seen::new(Some(1), 8, 0),
            "held keys ignore other releases"
        );
    }
}
