//! `etcd://[user:password@]host:port[,host:port…][/][?params]` and `etcds://…` (TLS).
//!
//! Parameters (unknown ones are errors, so a typo is never ignored):
//!
//! | parameter | default | meaning |
//! |---|---|---|
//! | `prefix` | `fenced` | first part of every key this backend writes |
//! | `session_ttl` | `10s` | the TTL of the client's session lease, in whole seconds (at least 2 s) |
//! | `timeout` | `2s` (at most a third of `session_ttl`) | how long one request (or connecting) may take before it fails as transient |
//! | `endpoints` | none | more `host:port` endpoints of the same cluster, comma-separated |
//! | `tls_ca` | system roots | `etcds://` only: a PEM file of the CA(s) to trust instead of the system's |
//!
//! Several endpoints may also be written in the authority (`etcd://a:2379,b:2379`); the URL
//! parser of [`connect`](crate::connect) moves all but the first into `endpoints`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::Result;
use crate::url::{decode, invalid, redact, server_url};

/// The default key prefix.
pub(crate) const DEFAULT_PREFIX: &str = "fenced";
/// The default session TTL.
pub(crate) const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(10);
/// The shortest session TTL accepted (etcd's own minimum lease TTL is about 2 s).
const MIN_SESSION_TTL: Duration = Duration::from_secs(2);
/// The longest session TTL accepted.
const MAX_SESSION_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The default per-request timeout.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_TIMEOUT: Duration = Duration::from_millis(10);
const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest prefix accepted, in bytes.
const MAX_PREFIX_LEN: usize = 128;
/// The default client port of etcd.
const DEFAULT_PORT: u16 = 2379;

/// A parsed `etcd://` or `etcds://` URL. Its `Debug` output never shows the password.
#[derive(Clone)]
pub(crate) struct EtcdConfig {
    /// `host:port` of every endpoint, the URL's host first.
    pub(crate) endpoints: Vec<String>,
    /// The URL with the password replaced by `***`, for messages.
    pub(crate) redacted: String,
    /// `etcds://`.
    pub(crate) tls: bool,
    /// User name and password. Never print the password.
    pub(crate) user: Option<(String, String)>,
    pub(crate) prefix: String,
    pub(crate) session_ttl: Duration,
    pub(crate) timeout: Duration,
    /// The `tls_ca` file and its contents.
    pub(crate) tls_ca: Option<(PathBuf, Vec<u8>)>,
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("url", &self.redacted)
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("session_ttl", &self.session_ttl)
            .field("timeout", &self.timeout)
            .field("tls_ca", &self.tls_ca.as_ref().map(|(path, _)| path))
            .finish()
    }
}

/// `host:port` checked: a host name or address and a port number (2379 when left out).
fn endpoint(text: &str, redacted: &str) -> Result<String> {
    let text = text.trim();
    let bad = || {
        invalid(format!(
            "endpoint {text:?} in {redacted} is not host:port; write it like etcd://10.0.0.1:2379,10.0.0.2:2379"
        ))
    };
    if text.is_empty() || text.contains(['/', '@', '?', '#', ' ']) {
        return Err(bad());
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        // [v6]:port
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad()),
        };
        (format!("[{host}]"), port)
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (text.to_owned(), None),
        }
    };
    if host.is_empty() || (!host.starts_with('[') && host.contains(':')) {
        return Err(bad());
    }
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        None => DEFAULT_PORT,
    };
    Ok(format!("{host}:{port}"))
}

impl EtcdConfig {
    pub(crate) fn from_url(url: &url::Url) -> Result<Self> {
        let redacted = redact(url.as_str());
        let tls = server_url(
            url,
            &redacted,
            ("an etcd", "etcd", "etcds", 2379),
            "etcd://localhost:2379",
        )?;
        let host = url.host_str().unwrap_or("");
        let path = url.path().trim_start_matches('/');
        if !path.is_empty() {
            return Err(invalid(format!(
                "{redacted} has a path ({path:?}), which etcd URLs do not use; choose the key space with \
                 ?prefix=… instead"
            )));
        }
        let user = match url.password() {
            Some(password) => {
                let name = decode(url.username(), "user name", &redacted)?;
                if name.is_empty() {
                    return Err(invalid(format!(
                        "{redacted} has a password but no user name; etcd authenticates users: write \
                         etcd://user:password@host:2379"
                    )));
                }
                Some((name, decode(password, "password", &redacted)?))
            }
            None if !url.username().is_empty() => {
                return Err(invalid(format!(
                    "{redacted} has a user name but no password; write etcd://user:password@host:2379"
                )));
            }
            None => None,
        };

        let first = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => format!("{host}:{DEFAULT_PORT}"),
        };
        let mut endpoints = vec![endpoint(&first, &redacted)?];
        let mut prefix = None;
        let mut session_ttl = None;
        let mut timeout = None;
        let mut tls_ca = None;
        let mut more = None;
        let known = ["prefix", "session_ttl", "timeout", "endpoints", "tls_ca"];
        for (name, value) in crate::url::query_params(url, &known)? {
            let seen = match name.as_str() {
                "prefix" => prefix.replace(value.clone()).is_some(),
                "session_ttl" => session_ttl
                    .replace(crate::url::duration_param(url, &name, &value)?)
                    .is_some(),
                "timeout" => timeout
                    .replace(crate::url::duration_param(url, &name, &value)?)
                    .is_some(),
                "endpoints" => more.replace(value.clone()).is_some(),
                _ => tls_ca.replace(value.clone()).is_some(),
            };
            if seen {
                return Err(invalid(format!(
                    "parameter {name} is given twice in {redacted}; keep one"
                )));
            }
        }
        if let Some(more) = more {
            for e in more.split(',') {
                let e = endpoint(e, &redacted)?;
                if !endpoints.contains(&e) {
                    endpoints.push(e);
                }
            }
        }
        let prefix = prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        check_prefix(&prefix, &redacted)?;
        let session_ttl = session_ttl.unwrap_or(DEFAULT_SESSION_TTL);
        if !(MIN_SESSION_TTL..=MAX_SESSION_TTL).contains(&session_ttl)
            || session_ttl.subsec_nanos() != 0
        {
            return Err(invalid(format!(
                "session_ttl={session_ttl:?} in {redacted} is not usable; etcd leases count whole seconds: use \
                 between {MIN_SESSION_TTL:?} and {MAX_SESSION_TTL:?} in whole seconds (default {DEFAULT_SESSION_TTL:?})"
            )));
        }
        // By default a request may take a third of the session, at most 2 s.
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT.min(session_ttl / 3));
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
            return Err(invalid(format!(
                "timeout={timeout:?} in {redacted} is out of range; use between {MIN_TIMEOUT:?} and {MAX_TIMEOUT:?} \
                 (default {DEFAULT_TIMEOUT:?})"
            )));
        }
        if timeout * 2 > session_ttl {
            return Err(invalid(format!(
                "timeout={timeout:?} in {redacted} is more than half of session_ttl={session_ttl:?}, so one slow \
                 keep-alive could end the session; shorten the timeout or lengthen the session"
            )));
        }
        let tls_ca = match tls_ca {
            None => None,
            Some(_) if !tls => {
                return Err(invalid(format!(
                    "tls_ca applies to TLS connections only, but {redacted} is not one; use etcds:// to connect \
                     with TLS, or remove tls_ca"
                )));
            }
            Some(path) => Some(crate::url::read_ca(PathBuf::from(path))?),
        };
        Ok(EtcdConfig {
            endpoints,
            redacted,
            tls,
            user,
            prefix,
            session_ttl,
            timeout,
            tls_ca,
        })
    }

    /// The endpoint URLs for the etcd client.
    pub(crate) fn endpoint_urls(&self) -> Vec<String> {
        let scheme = if self.tls { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }
}

fn check_prefix(prefix: &str, redacted: &str) -> Result<()> {
    let problem = if prefix.is_empty() {
        Some("is empty".to_owned())
    } else if prefix.len() > MAX_PREFIX_LEN {
        Some(format!("is longer than {MAX_PREFIX_LEN} bytes"))
    } else if prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Some("contains spaces or control characters".to_owned())
    } else if prefix.ends_with('/') {
        Some("ends with /, which fenced adds itself".to_owned())
    } else {
        None
    };
    match problem {
        Some(problem) => Err(invalid(format!(
            "prefix={prefix:?} in {redacted} {problem}; use a short name such as prefix=myapp or prefix=myapp/locks"
        ))),
        None => Ok(()),
    }
}

/// Rewrites `scheme://[userinfo@]h1:p1,h2:p2[/…]` into `scheme://[userinfo@]h1:p1[/…]?endpoints=h2:p2`
/// so that the standard URL parser accepts several endpoints. Other URLs (and other schemes) are
/// returned unchanged.
pub(crate) fn fold_endpoints(raw: &str) -> std::borrow::Cow<'_, str> {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return raw.into();
    };
    if !matches!(scheme, "etcd" | "etcds") {
        return raw.into();
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let Some((first, others)) = hosts.split_once(',') else {
        return raw.into();
    };
    let (path, query_and_fragment) = match tail.find(['?', '#']) {
        Some(i) => tail.split_at(i),
        None => (tail, ""),
    };
    let (query, fragment) = match query_and_fragment.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query_and_fragment, None),
    };
    let mut out = format!("{scheme}://");
    if let Some(u) = userinfo {
        out.push_str(u);
        out.push('@');
    }
    out.push_str(first);
    out.push_str(if path.is_empty() { "/" } else { path });
    let param = format!(
        "endpoints={}",
        percent_encoding::utf8_percent_encode(others, percent_encoding::NON_ALPHANUMERIC)
    );
    match query.strip_prefix('?') {
        Some(q) if !q.is_empty() => {
            out.push('?');
            out.push_str(q);
            out.push('&');
        }
        _ => out.push('?'),
    }
    out.push_str(&param);
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn parse(s: &str) -> Result<EtcdConfig> {
        EtcdConfig::from_url(&url::Url::parse(&fold_endpoints(s)).unwrap())
    }

    #[test]
    fn defaults_and_parameters() {
        let c = parse("etcd://localhost").unwrap();
        assert_eq!(c.endpoints, ["localhost:2379"]);
        assert_eq!(c.prefix, "fenced");
        assert_eq!(c.session_ttl, DEFAULT_SESSION_TTL);
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert!(!c.tls && c.user.is_none());

        let c = parse("etcds://app:p%40ss@h1:2379,h2:2380,[::1]:2381/?prefix=app/locks&session_ttl=2s&timeout=500ms")
            .unwrap();
        assert_eq!(c.endpoints, ["h1:2379", "h2:2380", "[::1]:2381"]);
        assert_eq!(c.endpoint_urls()[0], "https://h1:2379");
        assert_eq!(c.prefix, "app/locks");
        assert_eq!(c.session_ttl, Duration::from_secs(2));
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!(c.user, Some(("app".to_owned(), "p@ss".to_owned())));
        assert!(!format!("{c:?}").contains("p%40ss") && !format!("{c:?}").contains("p@ss"));
        let c = parse("etcd://h?session_ttl=3s").unwrap();
        assert_eq!(c.timeout, Duration::from_secs(1));

        let c = parse("etcd://h1:1,h2:2").unwrap();
        assert_eq!(c.endpoints, ["h1:1", "h2:2"]);
        let c = parse("etcd://h1:1?endpoints=h2:2,h1:1").unwrap();
        assert_eq!(c.endpoints, ["h1:1", "h2:2"]);
    }

    #[test]
    fn bad_urls_are_clear_and_redacted() {
        for (url, expect) in [
            ("etcd://u:hunter2@h/?prefx=a", "unknown parameter"),
            ("etcd://u:hunter2@h/?prefix=", "is empty"),
            ("etcd://u:hunter2@h/?prefix=a/", "ends with /"),
            ("etcd://u:hunter2@h/?session_ttl=1s", "whole seconds"),
            ("etcd://u:hunter2@h/?session_ttl=2500ms", "whole seconds"),
            ("etcd://u:hunter2@h/?timeout=0s", "out of range"),
            ("etcd://u:hunter2@h/?timeout=2s&session_ttl=3s", "half"),
            ("etcd://u:hunter2@h/?timeout=soon", "not a duration"),
            ("etcd://u:hunter2@h/locks", "path"),
            ("etcd://u:hunter2@h/?tls_ca=/ca.pem", "etcds://"),
            (
                "etcds://u:hunter2@h/?tls_ca=/nonexistent/ca.pem",
                "cannot read",
            ),
            ("etcds://u:hunter2@h/#insecure", "fragment"),
            ("etcd://u:hunter2@h/?prefix=a&prefix=b", "twice"),
            ("etcd://:hunter2@h/", "no user name"),
            ("etcd://u:hunter2@h1:1,h2:x/", "not host:port"),
            ("etcd://u:hunter2@h1:1,/", "not host:port"),
        ] {
            let e = parse(url).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{url}");
            let text = e.to_string();
            assert!(text.contains(expect), "{url}: {text}");
            assert!(!text.contains("hunter2"), "{url}: {text}");
        }
    }

    #[test]
    fn folding_keeps_everything_else() {
        assert_eq!(fold_endpoints("etcd://h:1"), "etcd://h:1");
        assert_eq!(fold_endpoints("zk://a:1,b:2"), "zk://a:1,b:2");
        assert_eq!(
            fold_endpoints("etcd://u:p@a:1,b:2/?x=1#f"),
            "etcd://u:p@a:1/?x=1&endpoints=b%3A2#f"
        );
        assert_eq!(
            fold_endpoints("etcd://a:1,b:2,c:3"),
            "etcd://a:1/?endpoints=b%3A2%2Cc%3A3"
        );
    }
}
