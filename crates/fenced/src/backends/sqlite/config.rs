//! `sqlite:///absolute/path/locks.db` or `sqlite:relative/path/locks.db`, percent-decoded.
//!
//! Parameters:
//!
//! - `busy_timeout` (default `5s`, at most `10m`): how long one operation waits for another
//!   connection's write transaction before failing with a transient error;
//! - `release_on_exit` (`true` or `false`, default `true`): whether locks taken through this URL
//!   end as soon as the holding process exits (see the backend's README).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, ErrorKind, Operation, Result};

/// The default `busy_timeout`.
pub(crate) const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest accepted `busy_timeout`.
const MAX_BUSY_TIMEOUT: Duration = Duration::from_secs(600);

/// Parsed `sqlite:` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SqliteConfig {
    /// The database file, as written (relative paths are relative to the working directory).
    pub(crate) path: PathBuf,
    pub(crate) busy_timeout: Duration,
    pub(crate) release_on_exit: bool,
}

impl SqliteConfig {
    /// Defaults for `path`.
    pub(crate) fn new(path: PathBuf) -> Self {
        SqliteConfig {
            path,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            release_on_exit: true,
        }
    }

    pub(crate) fn from_url(url: &url::Url) -> Result<Self> {
        let shown = crate::url::redact(url.as_str());
        let invalid = |why: String| {
            Err(Error::new(
                ErrorKind::InvalidConfig,
                Operation::Connect,
                why,
            ))
        };
        if url.scheme() != "sqlite" {
            return invalid(format!(
                "{shown} is not an sqlite: URL; write it like sqlite:///var/lib/app/locks.db"
            ));
        }
        let params = crate::url::query_params(url, &["busy_timeout", "release_on_exit"])?;
        if !url.username().is_empty() || url.password().is_some() {
            return invalid(format!(
                "{shown} carries a user name or password, which an sqlite: URL has no use for; \
                 remove it and write only the file path, like sqlite:///var/lib/app/locks.db"
            ));
        }
        if let Some(host) = url.host_str().filter(|h| !h.is_empty()) {
            return invalid(format!(
                "{shown} names the host {host:?}, but sqlite: URLs take a local file path; write \
                 sqlite:///{host}{} for an absolute path or sqlite:{host}{} for a relative one",
                url.path(),
                url.path()
            ));
        }
        if url.port().is_some() {
            return invalid(format!(
                "{shown} has a port, but sqlite: URLs take a local file path; remove it"
            ));
        }
        if url.fragment().is_some() {
            return invalid(format!(
                "{shown} contains '#'; percent-encode a '#' in the file name as %23"
            ));
        }
        let path = decode_path(url.path(), &shown)?;

        let mut config = SqliteConfig::new(path);
        for (name, value) in params {
            match name.as_str() {
                "busy_timeout" => {
                    let timeout = crate::url::duration_param(url, &name, &value)?;
                    if timeout > MAX_BUSY_TIMEOUT {
                        return invalid(format!(
                            "busy_timeout={value} in {shown} is too long; use at most 10m (operations \
                             hold the file for milliseconds, a longer wait means something is stuck)"
                        ));
                    }
                    config.busy_timeout = timeout;
                }
                // The only other name query_params lets through.
                _ => {
                    config.release_on_exit = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return invalid(format!(
                                "release_on_exit={value:?} in {shown} is not a boolean; write \
                                 release_on_exit=true or release_on_exit=false"
                            ));
                        }
                    }
                }
            }
        }
        Ok(config)
    }
}

/// The percent-decoded file path of an sqlite: URL.
fn decode_path(raw: &str, shown: &str) -> Result<PathBuf> {
    let invalid = |why: String| {
        Err(Error::new(
            ErrorKind::InvalidConfig,
            Operation::Connect,
            why,
        ))
    };
    if raw.is_empty() || raw == "/" {
        return invalid(format!(
            "{shown} names no file; write the path of the lock file, like sqlite:///var/lib/app/locks.db \
             or sqlite:locks.db"
        ));
    }
    if raw.ends_with('/') {
        return invalid(format!(
            "{shown} names a directory; name a file inside it, like {}locks.db",
            shown.split('?').next().unwrap_or(shown)
        ));
    }
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    if bytes.contains(&0) {
        return invalid(format!(
            "{shown} contains a NUL byte (%00) in its path; no file can have that name"
        ));
    }
    if bytes == b":memory:" || bytes.starts_with(b"file:") {
        return invalid(format!(
            "{shown} is an SQLite special name; fenced needs a real file shared by processes \
             (use memory:// for locks inside one process)"
        ));
    }
    bytes_to_path(bytes, shown)
}

#[cfg(unix)]
fn bytes_to_path(bytes: Vec<u8>, _shown: &str) -> Result<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    Ok(PathBuf::from(OsString::from_vec(bytes)))
}

#[cfg(not(unix))]
fn bytes_to_path(bytes: Vec<u8>, shown: &str) -> Result<PathBuf> {
    let mut text = String::from_utf8(bytes).map_err(|_| {
        Error::new(
            ErrorKind::InvalidConfig,
            Operation::Connect,
            format!("{shown} has a path that is not valid UTF-8 once decoded; fix its %-escapes"),
        )
    })?;
    // sqlite:///C:/dir/locks.db
    let b = text.as_bytes();
    if b.len() >= 3 && b[0] == b'/' && b[1].is_ascii_alphabetic() && b[2] == b':' {
        text.remove(0);
    }
    Ok(PathBuf::from(OsString::from(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SqliteConfig> {
        SqliteConfig::from_url(&url::Url::parse(s).unwrap())
    }

    fn err(s: &str) -> String {
        let e = parse(s).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
        e.to_string()
    }

    #[test]
    fn paths() {
        let c = parse("sqlite:///var/lib/app/locks.db").unwrap();
        assert_eq!(c.path, PathBuf::from("/var/lib/app/locks.db"));
        assert_eq!(c.busy_timeout, DEFAULT_BUSY_TIMEOUT);
        assert!(c.release_on_exit);
        assert_eq!(
            parse("sqlite:relative/dir/locks.db").unwrap().path,
            PathBuf::from("relative/dir/locks.db")
        );
        assert_eq!(
            parse("sqlite:locks.db").unwrap().path,
            PathBuf::from("locks.db")
        );
        assert_eq!(
            parse("sqlite:/abs/locks.db").unwrap().path,
            PathBuf::from("/abs/locks.db")
        );
        #[cfg(unix)]
        assert_eq!(
            parse("sqlite:///tmp/with%20space/%23hash%3F.db")
                .unwrap()
                .path,
            PathBuf::from("/tmp/with space/#hash?.db")
        );
    }

    #[test]
    fn parameters() {
        let c = parse("sqlite:///x/locks.db?busy_timeout=250ms&release_on_exit=false").unwrap();
        assert_eq!(c.busy_timeout, Duration::from_millis(250));
        assert!(!c.release_on_exit);
        assert!(err("sqlite:///x/l.db?busy_timout=1s").contains("busy_timeout"));
        assert!(err("sqlite:///x/l.db?busy_timeout=soon").contains("not a duration"));
        assert!(err("sqlite:///x/l.db?busy_timeout=1h").contains("at most 10m"));
        assert!(err("sqlite:///x/l.db?release_on_exit=maybe").contains("release_on_exit=false"));
    }

    #[test]
    fn mistakes() {
        assert!(err("sqlite://relative/locks.db").contains("sqlite:///relative/locks.db"));
        assert!(err("sqlite://").contains("names no file"));
        assert!(err("sqlite:///").contains("names no file"));
        assert!(err("sqlite:///var/lib/").contains("directory"));
        assert!(err("sqlite::memory:").contains("memory://"));
        assert!(err("sqlite:///a/b.db#frag").contains("%23"));
        assert!(err("sqlite:///a/b%00c.db").contains("NUL"));
        let e = err("sqlite://user:hunter2@host/a/b.db");
        assert!(!e.contains("hunter2"), "{e}");
    }
}
