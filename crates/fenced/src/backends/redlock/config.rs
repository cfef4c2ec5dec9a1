//! `redlock://[user:password@]host[:port],[user:password@]host[:port],…[/db][?params]` and
//! `redlocks://…` (TLS on every node).
//!
//! Each comma-separated entry is one independent Redis / Valkey node (at least three). An entry
//! without `user:password@` uses the credentials of the first entry. The `url` crate cannot parse
//! a list of hosts, so the text is read here and one `redis://` URL is built per node.
//!
//! Parameters (unknown ones are errors, so a typo is never ignored):
//!
//! | parameter | default | meaning |
//! |---|---|---|
//! | `prefix` | `fenced-redlock` | first part of every key and channel name; no `{` or `}` |
//! | `node_timeout` | `100ms` | how long one node may take to answer a lock step; a slower node counts as failed for that step |
//! | `timeout` | `2s` | how long connecting to a node may take |
//! | `tls_ca` | system roots | `redlocks://` only: a PEM file of the CA(s) to trust |

use std::fmt;
use std::time::Duration;

use crate::error::Result;
use crate::url::{invalid, parse_duration, redact};

/// The default key prefix: not the single-node backend's, so that a `redis://` client and a
/// `redlock://` client on the same server never share a lock key with different rules.
pub(crate) const DEFAULT_PREFIX: &str = "fenced-redlock";
/// The default time one node may take for one step.
pub(crate) const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(100);
/// The default connect timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The fewest nodes accepted.
pub(crate) const MIN_NODES: usize = 3;
/// The most nodes accepted.
const MAX_NODES: usize = 15;

/// A parsed `redlock://` URL. Its `Debug` output never shows a password.
#[derive(Clone)]
pub(crate) struct RedlockConfig {
    /// The URL with passwords replaced by `***`, for messages.
    pub(crate) redacted: String,
    /// One `redis://` (or `rediss://`) URL per node, with our parameters. Contain passwords:
    /// never print.
    pub(crate) nodes: Vec<String>,
    pub(crate) node_timeout: Duration,
}

impl fmt::Debug for RedlockConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedlockConfig")
            .field("url", &self.redacted)
            .field("nodes", &self.nodes.len())
            .field("node_timeout", &self.node_timeout)
            .finish()
    }
}

impl RedlockConfig {
    /// Parses the raw URL text.
    pub(crate) fn parse(raw: &str) -> Result<Self> {
        let redacted = redact(raw);
        let example = "redlock://:password@10.0.0.1:6379,10.0.0.2:6379,10.0.0.3:6379";
        let (scheme, rest) = match raw.split_once("://") {
            Some((s, rest)) if s.eq_ignore_ascii_case("redlock") => ("redis", rest),
            Some((s, rest)) if s.eq_ignore_ascii_case("redlocks") => ("rediss", rest),
            _ => {
                return Err(invalid(format!(
                    "{redacted} is not a Redlock URL; write {example}"
                )));
            }
        };
        if rest.contains('#') {
            return Err(invalid(format!(
                "{redacted} has a #fragment, which fenced does not use; remove it"
            )));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, query),
            None => (rest, ""),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let db = path.trim_matches('/');
        if !db.is_empty() && db.parse::<u32>().is_err() {
            return Err(invalid(format!(
                "the path of {redacted} must be a database number, as in {example}/0"
            )));
        }

        let mut prefix = None;
        let mut node_timeout = None;
        let mut timeout = None;
        let mut tls_ca = None;
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let duration = || {
                parse_duration(&value).ok_or_else(|| {
                    invalid(format!(
                        "parameter {name}={value:?} in {redacted} is not a duration; write e.g. 50ms or 2s"
                    ))
                })
            };
            let seen = match name.as_ref() {
                "prefix" => prefix.replace(value.clone().into_owned()).is_some(),
                "node_timeout" => node_timeout.replace(duration()?).is_some(),
                "timeout" => timeout.replace(duration()?).is_some(),
                "tls_ca" if scheme == "rediss" => {
                    tls_ca.replace(value.clone().into_owned()).is_some()
                }
                "tls_ca" => {
                    return Err(invalid(format!(
                        "tls_ca in {redacted} needs TLS; use redlocks:// to talk TLS to every node"
                    )));
                }
                _ => {
                    return Err(invalid(format!(
                        "unknown parameter {name:?} in {redacted}; known parameters for redlock://: prefix, \
                         node_timeout, timeout, tls_ca"
                    )));
                }
            };
            if seen {
                return Err(invalid(format!(
                    "parameter {name} is given twice in {redacted}; keep one"
                )));
            }
        }
        let node_timeout = node_timeout.unwrap_or(DEFAULT_NODE_TIMEOUT);
        if !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&node_timeout) {
            return Err(invalid(format!(
                "node_timeout={node_timeout:?} in {redacted} is out of range; use between 1ms and 10s (default \
                 {DEFAULT_NODE_TIMEOUT:?}), well below the lease"
            )));
        }
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);

        let mut params = url::form_urlencoded::Serializer::new(String::new());
        params.append_pair("prefix", prefix.as_deref().unwrap_or(DEFAULT_PREFIX));
        params.append_pair("timeout", &format!("{}ms", timeout.as_millis()));
        if let Some(ca) = &tls_ca {
            params.append_pair("tls_ca", ca);
        }
        let params = params.finish();

        let entries: Vec<&str> = authority.split(',').collect();
        if entries.len() < MIN_NODES || entries.len() > MAX_NODES {
            return Err(invalid(format!(
                "{redacted} names {} node(s); Redlock needs {MIN_NODES} to {MAX_NODES} independent nodes (5 is \
                 usual), as in {example}; for one server use redis://",
                entries.len()
            )));
        }
        let first_credentials = entries[0].rsplit_once('@').map(|(user, _)| user);
        let mut nodes = Vec::with_capacity(entries.len());
        let mut seen = Vec::with_capacity(entries.len());
        for entry in entries {
            let (credentials, host) = match entry.rsplit_once('@') {
                Some((user, host)) => (Some(user), host),
                None => (first_credentials, entry),
            };
            if host.is_empty() {
                return Err(invalid(format!(
                    "{redacted} has an empty node entry; write {example}"
                )));
            }
            let node = match credentials {
                Some(user) => format!("{scheme}://{user}@{host}/{db}?{params}"),
                None => format!("{scheme}://{host}/{db}?{params}"),
            };
            let parsed = url::Url::parse(&node).map_err(|e| {
                invalid(format!(
                    "the node {host:?} in {redacted} is not host:port ({e}); write {example}"
                ))
            })?;
            let address = (
                parsed.host_str().unwrap_or("").to_ascii_lowercase(),
                parsed.port().unwrap_or(6379),
            );
            if seen.contains(&address) {
                return Err(invalid(format!(
                    "{redacted} names the node {}:{} twice; Redlock needs independent nodes",
                    address.0, address.1
                )));
            }
            seen.push(address);
            nodes.push(node);
        }
        Ok(RedlockConfig {
            redacted,
            nodes,
            node_timeout,
        })
    }

    /// How many nodes must agree.
    pub(crate) fn quorum(&self) -> usize {
        self.nodes.len() / 2 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nodes_credentials_and_parameters() {
        let c = RedlockConfig::parse(
            "redlock://:s3cret@127.0.0.1:7001,127.0.0.1:7002,u:p@127.0.0.1:7003/2?node_timeout=20ms",
        )
        .unwrap();
        assert_eq!(c.nodes.len(), 3);
        assert_eq!(c.quorum(), 2);
        assert_eq!(c.node_timeout, Duration::from_millis(20));
        assert_eq!(
            c.nodes[1],
            "redis://:s3cret@127.0.0.1:7002/2?prefix=fenced-redlock&timeout=2000ms"
        );
        assert!(c.nodes[2].starts_with("redis://u:p@127.0.0.1:7003/2?"));
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(
            RedlockConfig::parse("redlocks://a:1,b:2,c:3,d:4,e:5")
                .unwrap()
                .quorum(),
            3
        );
    }

    #[test]
    fn rejects_bad_urls_without_the_password() {
        for (url, says) in [
            ("redlock://:pw@a:1,b:2", "names 2 node(s)"),
            ("redlock://:pw@a:1,a:1,b:2", "twice"),
            ("redlock://:pw@a:1,,b:2", "empty node"),
            ("redlock://:pw@a:1,b:2,c:3?node_timeout=1h", "out of range"),
            ("redlock://:pw@a:1,b:2,c:3?colour=red", "unknown parameter"),
            ("redlock://:pw@a:1,b:2,c:3?tls_ca=/x", "redlocks://"),
            ("redlock://:pw@a:1,b:2,c:3/x", "database number"),
            ("redlock://:pw@a:1,b:2,c:3#f", "fragment"),
            ("redlock://:pw@a:1,b:x,c:3", "not host:port"),
        ] {
            let e = RedlockConfig::parse(url).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains(":pw@"), "{e}");
        }
    }
}
