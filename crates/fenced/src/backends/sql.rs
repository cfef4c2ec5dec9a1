//! What the PostgreSQL and MySQL/MariaDB backends share: their two modes, the lock table's
//! name, the documented key hash and the URL parameters both read.
//!
//! Both databases keep one row per key in a lock table (default `fenced_locks`) holding the real
//! key, the owner, the fencing token, the label and the expiry computed with the **database's**
//! clock. The row is kept after a release (its owner is cleared), so the key's fencing token
//! keeps increasing; [`Client::force_release`](crate::Client::force_release) keeps it too.
//!
//! | mode | URL | a lock lives | server-side primitive |
//! |---|---|---|---|
//! | lease (default) | `?mode=lease` | until its lease ends unless renewed | the row and its expiry |
//! | session | `?mode=session` | while the client's dedicated connection lives (and is renewed) | the row, plus an advisory lock (`pg_try_advisory_lock`) or a named lock (`GET_LOCK`) on that connection |
//!
//! In session mode the server also ends a connection that stays silent for `session_timeout`
//! (PostgreSQL `idle_session_timeout`, MySQL `wait_timeout`), so a lock whose holder vanished
//! without closing its connection is freed by the server itself.
//!
//! Clients in both modes may lock the same key: they all go through the same row, so they
//! exclude each other.
//!
//! # The key hash
//! Advisory locks take a 64-bit number and `GET_LOCK` a name of at most 64 characters, so both
//! derive it from the key with [`key_hash`]: 64-bit FNV-1a over the bytes of a scope (the table
//! name, and for MySQL the database name, which a server-wide lock name must include), a zero
//! byte, and the key. Two keys whose hashes collide only exclude each other (one waits for the
//! other); they are never granted to two holders at once as the same lock, because ownership is
//! decided by the row of the real key, which the status commands show.

use std::time::Duration;

use crate::error::Result;
use crate::key::Key;
use crate::url::{duration_param, invalid, redact};

/// How an SQL backend holds its locks (the `mode` URL parameter).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SqlMode {
    /// A row with an expiry set by the database's clock; renewed by the watchdog. Works through
    /// connection poolers: every operation is one statement.
    #[default]
    Lease,
    /// The row plus an advisory (PostgreSQL) or named (MySQL) lock on the client's dedicated
    /// connection: the lock ends when that connection ends.
    Session,
}

/// 64-bit FNV-1a over `scope`, a zero byte and `key`: the documented hash behind advisory lock
/// ids and `GET_LOCK` names.
///
/// ```
/// use fenced::backends::sql::key_hash;
/// assert_eq!(key_hash("", ""), 0xaf63_bd4c_8601_b7df);
/// assert_ne!(key_hash("fenced_locks", "a"), key_hash("fenced_locks", "b"));
/// ```
pub fn key_hash(scope: &str, key: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in scope.bytes().chain([0u8]).chain(key.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The PostgreSQL advisory lock id of `key` in lock table `table` (session mode):
/// [`key_hash`]`(table, key)` as a signed 64-bit number.
///
/// ```
/// use fenced::backends::sql::{advisory_id, key_hash};
/// let key = fenced::Key::new("order:42")?;
/// assert_eq!(advisory_id("fenced_locks", &key), key_hash("fenced_locks", "order:42") as i64);
/// # Ok::<(), fenced::Error>(())
/// ```
pub fn advisory_id(table: &str, key: &Key) -> i64 {
    key_hash(table, key.as_str()) as i64
}

/// The MySQL `GET_LOCK` name of `key` in lock table `table` of database `database` (session
/// mode): `fenced:` and [`key_hash`]`("database.table", key)` in 16 hex digits, 23 characters
/// whatever the key's length.
///
/// ```
/// use fenced::backends::sql::lock_name;
/// let key = fenced::Key::new(&"x".repeat(500))?;
/// let name = lock_name("app", "fenced_locks", &key);
/// assert!(name.starts_with("fenced:") && name.len() == 23);
/// # Ok::<(), fenced::Error>(())
/// ```
pub fn lock_name(database: &str, table: &str, key: &Key) -> String {
    format!(
        "fenced:{:016x}",
        key_hash(&format!("{database}.{table}"), key.as_str())
    )
}

/// The default lock table.
pub(crate) const DEFAULT_TABLE: &str = "fenced_locks";
/// The default per-statement timeout.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The default session timeout (session mode).
pub(crate) const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The URL parameters both SQL backends read. Anything else is left to the backend.
#[derive(Debug, Clone)]
pub(crate) struct SqlParams {
    pub(crate) mode: SqlMode,
    /// A plain identifier (`[a-z_][a-z0-9_]*`, at most 48 bytes), safe to put into SQL text.
    pub(crate) table: String,
    /// How long one statement (or connecting) may take before it fails as transient.
    pub(crate) timeout: Duration,
    /// Session mode: how long the server keeps a silent connection (and its locks).
    pub(crate) session_timeout: Duration,
}

/// The parameter names [`SqlParams::take`] reads.
pub(crate) const COMMON_PARAMS: [&str; 4] = ["mode", "table", "timeout", "session_timeout"];

impl SqlParams {
    /// Reads the common parameters from `pairs` (as returned by
    /// [`query_params`](crate::url::query_params)) and removes them, leaving the backend's own.
    pub(crate) fn take(url: &url::Url, pairs: &mut Vec<(String, String)>) -> Result<SqlParams> {
        let redacted = redact(url.as_str());
        let mut params = SqlParams {
            mode: SqlMode::Lease,
            table: DEFAULT_TABLE.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            session_timeout: DEFAULT_SESSION_TIMEOUT,
        };
        let mut rest = Vec::new();
        for (name, value) in pairs.drain(..) {
            match name.as_str() {
                "mode" => {
                    params.mode = match value.as_str() {
                        "lease" => SqlMode::Lease,
                        "session" => SqlMode::Session,
                        _ => {
                            return Err(invalid(format!(
                                "mode={value:?} in {redacted} is not a mode; write mode=lease (the default) or \
                                 mode=session"
                            )));
                        }
                    }
                }
                "table" => {
                    let ok = value.len() <= 48
                        && value.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                        && value
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                    if !ok {
                        return Err(invalid(format!(
                            "table={value:?} in {redacted} is not a plain table name; use lower-case letters, \
                             digits and _ (at most 48), starting with a letter or _"
                        )));
                    }
                    params.table = value;
                }
                "timeout" => {
                    params.timeout = bounded(url, &name, &value, (10, 300_000))?;
                }
                "session_timeout" => {
                    params.session_timeout = bounded(url, &name, &value, (1_000, 86_400_000))?;
                }
                _ => rest.push((name, value)),
            }
        }
        *pairs = rest;
        if params.mode == SqlMode::Session && params.timeout * 3 > params.session_timeout {
            return Err(invalid(format!(
                "timeout={:?} in {redacted} is more than a third of session_timeout={:?}; a lock could be lost \
                 before a renewal fails; lower timeout or raise session_timeout",
                params.timeout, params.session_timeout
            )));
        }
        Ok(params)
    }

    /// The longest lease a session-mode guard may count on: nine tenths of the session timeout,
    /// so the guard's deadline passes before the server can end a silent connection.
    pub(crate) fn session_lease(&self) -> Duration {
        self.session_timeout * 9 / 10
    }
}

/// A duration parameter between `min_ms` and `max_ms` milliseconds.
fn bounded(
    url: &url::Url,
    name: &str,
    value: &str,
    (min_ms, max_ms): (u64, u64),
) -> Result<Duration> {
    let d = duration_param(url, name, value)?;
    let (min, max) = (Duration::from_millis(min_ms), Duration::from_millis(max_ms));
    if d < min || d > max {
        return Err(invalid(format!(
            "{name}={value} in {} is out of range; use between {min:?} and {max:?}",
            redact(url.as_str())
        )));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(url: &str) -> Result<(SqlParams, Vec<(String, String)>)> {
        let url = url::Url::parse(url).expect("url");
        let mut pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let params = SqlParams::take(&url, &mut pairs)?;
        Ok((params, pairs))
    }

    #[test]
    fn params() {
        let (p, rest) = take("postgres://h/db?mode=session&table=locks_2&sslmode=require").unwrap();
        assert_eq!(p.mode, SqlMode::Session);
        assert_eq!(p.table, "locks_2");
        assert_eq!(rest, vec![("sslmode".to_owned(), "require".to_owned())]);
        assert_eq!(p.session_lease(), Duration::from_secs(9));
        for bad in [
            "postgres://h/db?mode=sessions",
            "postgres://h/db?table=x;drop",
            "postgres://h/db?table=Locks",
            "postgres://h/db?timeout=0ms",
            "postgres://u:pw@h/db?mode=session&timeout=5s&session_timeout=10s",
        ] {
            let e = take(bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidConfig, "{bad}");
            assert!(!e.to_string().contains("pw"), "{e}");
        }
    }

    #[test]
    fn hash_is_fnv1a() {
        // The published FNV-1a 64 test vector for "a", with an empty scope and its zero byte.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in [0u8, b'a'] {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        assert_eq!(key_hash("", "a"), h);
    }
}
