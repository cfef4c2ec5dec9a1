//! `zk://[user:password@]host:port[,host:port…][/chroot][?params]`.
//!
//! Parameters (unknown ones are errors, so a typo is never ignored):
//!
//! | parameter | default | meaning |
//! |---|---|---|
//! | `prefix` | `fenced` | the node under the chroot that holds every lock (`/<prefix>/<escaped key>/…`) |
//! | `session_timeout` | `10s` | the session timeout asked of the server (it may clamp it to its own bounds); locks of a crashed or partitioned client are freed this long after the server last heard from it |
//! | `timeout` | `5s` | how long connecting and each request may take before failing as transient |
//!
//! `user:password` turns on digest authentication; nodes fenced creates are then readable and
//! writable by that identity only.

use std::fmt;
use std::time::Duration;

use crate::error::Result;
use crate::url::{decode, invalid, redact};

/// The default prefix node.
pub(crate) const DEFAULT_PREFIX: &str = "fenced";
/// The default session timeout asked of the server.
pub(crate) const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// The default per-request timeout.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const MIN_SESSION_TIMEOUT: Duration = Duration::from_millis(500);
const MAX_SESSION_TIMEOUT: Duration = Duration::from_secs(600);
const MIN_TIMEOUT: Duration = Duration::from_millis(10);
const MAX_TIMEOUT: Duration = Duration::from_secs(300);
const MAX_PREFIX_LEN: usize = 128;
const DEFAULT_PORT: u16 = 2181;

/// A parsed `zk://` URL. Its `Debug` output never shows the password.
#[derive(Clone)]
pub(crate) struct ZkConfig {
    /// `host:port,host:port` for the client.
    pub(crate) hosts: String,
    /// The chroot (`/a/b`), if any.
    pub(crate) chroot: Option<String>,
    /// Digest credentials `user:password`. Never print.
    pub(crate) digest: Option<String>,
    /// The password alone, to scrub it from any text that reaches a message.
    pub(crate) password: Option<String>,
    /// The URL with the password replaced by `***`, for messages.
    pub(crate) redacted: String,
    pub(crate) prefix: String,
    pub(crate) session_timeout: Duration,
    pub(crate) timeout: Duration,
}

impl fmt::Debug for ZkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkConfig")
            .field("url", &self.redacted)
            .field("prefix", &self.prefix)
            .field("session_timeout", &self.session_timeout)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ZkConfig {
    /// Parses the raw URL text (the `url` crate cannot parse a list of hosts).
    pub(crate) fn parse(raw: &str) -> Result<Self> {
        let redacted = redact(raw);
        let Some(rest) = raw
            .split_once("://")
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("zk"))
            .map(|(_, rest)| rest)
        else {
            return Err(invalid(format!(
                "{redacted} is not a ZooKeeper URL; write zk://host:2181[,host:2181…][/chroot]"
            )));
        };
        if rest.contains('#') {
            return Err(invalid(format!(
                "{redacted} has a #fragment, which fenced does not use; remove it"
            )));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };

        let mut digest = None;
        let mut password = None;
        if let Some(userinfo) = userinfo {
            let Some((user, pass)) = userinfo.split_once(':') else {
                return Err(invalid(format!(
                    "{redacted} names a user without a password; digest authentication needs both, as in \
                     zk://user:password@host:2181"
                )));
            };
            let user = decode(user, "user name", &redacted)?;
            let pass = decode(pass, "password", &redacted)?;
            if user.is_empty() || user.contains(':') {
                return Err(invalid(format!(
                    "the user name in {redacted} is empty or contains ':'; write zk://user:password@host:2181"
                )));
            }
            digest = Some(format!("{user}:{pass}"));
            password = Some(pass);
        }

        let mut list = Vec::new();
        for host in hosts.split(',') {
            list.push(parse_host(host, &redacted)?);
        }
        let hosts = list.join(",");

        let chroot = match path.trim_end_matches('/') {
            "" => None,
            path => {
                let path = decode(path, "chroot", &redacted)?;
                let bad = path.split('/').skip(1).any(|part| {
                    part.is_empty()
                        || part == "."
                        || part == ".."
                        || part.chars().any(super::forbidden_in_name)
                });
                if bad {
                    return Err(invalid(format!(
                        "the chroot {path:?} in {redacted} is not a valid ZooKeeper path; write it like \
                         zk://host:2181/apps/locks (no empty, \".\" or \"..\" parts)"
                    )));
                }
                Some(path)
            }
        };

        let mut prefix = None;
        let mut session_timeout = None;
        let mut timeout = None;
        for (name, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let duration = || {
                crate::url::parse_duration(&value).ok_or_else(|| {
                    invalid(format!(
                        "parameter {name}={value:?} in {redacted} is not a duration; write e.g. 500ms, 2s or 1m"
                    ))
                })
            };
            let seen = match name.as_ref() {
                "prefix" => prefix.replace(value.clone().into_owned()).is_some(),
                "session_timeout" => session_timeout.replace(duration()?).is_some(),
                "timeout" => timeout.replace(duration()?).is_some(),
                _ => {
                    return Err(invalid(format!(
                        "unknown parameter {name:?} in {redacted}; known parameters for zk://: prefix, \
                         session_timeout, timeout"
                    )));
                }
            };
            if seen {
                return Err(invalid(format!(
                    "parameter {name} is given twice in {redacted}; keep one"
                )));
            }
        }
        let prefix = prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        if prefix.is_empty()
            || prefix.len() > MAX_PREFIX_LEN
            || prefix == "."
            || prefix == ".."
            || prefix.contains('/')
            || prefix
                .chars()
                .any(|c| c.is_whitespace() || super::forbidden_in_name(c))
        {
            return Err(invalid(format!(
                "prefix={prefix:?} in {redacted} is not a usable node name (1 to {MAX_PREFIX_LEN} bytes, no '/', \
                 spaces or control characters); use a short name such as prefix=myapp"
            )));
        }
        let session_timeout = session_timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT);
        if !(MIN_SESSION_TIMEOUT..=MAX_SESSION_TIMEOUT).contains(&session_timeout) {
            return Err(invalid(format!(
                "session_timeout={session_timeout:?} in {redacted} is out of range; use between \
                 {MIN_SESSION_TIMEOUT:?} and {MAX_SESSION_TIMEOUT:?} (default {DEFAULT_SESSION_TIMEOUT:?})"
            )));
        }
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
            return Err(invalid(format!(
                "timeout={timeout:?} in {redacted} is out of range; use between {MIN_TIMEOUT:?} and \
                 {MAX_TIMEOUT:?} (default {DEFAULT_TIMEOUT:?})"
            )));
        }
        Ok(ZkConfig {
            hosts,
            chroot,
            digest,
            password,
            redacted,
            prefix,
            session_timeout,
            timeout,
        })
    }

    /// The connect string for the client: hosts and chroot.
    pub(crate) fn connect_string(&self) -> String {
        match &self.chroot {
            Some(chroot) => format!("{}{chroot}", self.hosts),
            None => self.hosts.clone(),
        }
    }

    /// `text` with the password replaced by `***`.
    pub(crate) fn scrub(&self, text: &str) -> String {
        match self.password.as_deref() {
            Some(password) if !password.is_empty() => text.replace(password, "***"),
            _ => text.to_owned(),
        }
    }
}

/// One `host[:port]` (IPv6 in brackets), with the default port added.
fn parse_host(host: &str, redacted: &str) -> Result<String> {
    let bad = || {
        invalid(format!(
            "{redacted} has an empty or malformed host {host:?}; write zk://host:2181 or zk://h1:2181,h2:2181,h3:2181"
        ))
    };
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (name, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(bad)?),
        };
        (format!("[{name}]"), port)
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name.to_owned(), Some(port)),
            None => (host.to_owned(), None),
        }
    };
    if name.is_empty() || name == "[]" || name.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
    };
    Ok(format!("{name}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn defaults_and_parameters() {
        let c = ZkConfig::parse("zk://localhost").unwrap();
        assert_eq!(c.hosts, "localhost:2181");
        assert_eq!(c.chroot, None);
        assert_eq!(c.prefix, "fenced");
        assert_eq!(c.session_timeout, DEFAULT_SESSION_TIMEOUT);
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);

        let c = ZkConfig::parse(
            "zk://app:p%40ss@h1:2182,[::1]:2183,h3/apps/locks/?prefix=billing&session_timeout=2s&timeout=500ms",
        )
        .unwrap();
        assert_eq!(c.hosts, "h1:2182,[::1]:2183,h3:2181");
        assert_eq!(c.chroot.as_deref(), Some("/apps/locks"));
        assert_eq!(c.connect_string(), "h1:2182,[::1]:2183,h3:2181/apps/locks");
        assert_eq!(c.digest.as_deref(), Some("app:p@ss"));
        assert_eq!(c.prefix, "billing");
        assert_eq!(c.session_timeout, Duration::from_secs(2));
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert!(!format!("{c:?}").contains("p%40ss"));
        assert!(!format!("{c:?}").contains("p@ss"));
    }

    #[test]
    fn bad_urls_are_clear_and_redacted() {
        for (url, expect) in [
            ("zk://u:hunter2@h?prefx=a", "unknown parameter"),
            ("zk://u:hunter2@h?prefix=", "not a usable node name"),
            ("zk://u:hunter2@h?prefix=a/b", "not a usable node name"),
            ("zk://u:hunter2@h?session_timeout=10ms", "out of range"),
            ("zk://u:hunter2@h?timeout=soon", "not a duration"),
            ("zk://u:hunter2@h?timeout=1s&timeout=2s", "twice"),
            ("zk://u:hunter2@h:99999", "malformed host"),
            ("zk://u:hunter2@h1,,h2", "malformed host"),
            ("zk://u:hunter2@:2181", "malformed host"),
            ("zk://u:hunter2@h/a//b", "not a valid ZooKeeper path"),
            ("zk://u:hunter2@h/a/../b", "not a valid ZooKeeper path"),
            ("zk://u:hunter2@h#x", "fragment"),
            ("zk://hunter2@h", "without a password"),
            ("zk://:hunter2@h", "user name"),
        ] {
            let e = ZkConfig::parse(url).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{url}");
            let text = e.to_string();
            assert!(text.contains(expect), "{url}: {text}");
            assert!(
                !text.contains("hunter2") || expect == "without a password",
                "{url}: {text}"
            );
        }
    }
}
