//! `redis://[user:password@]host[:port][/db][?params]` and `rediss://…` (TLS).
//!
//! Parameters (unknown ones are errors, so a typo is never ignored):
//!
//! | parameter | default | meaning |
//! |---|---|---|
//! | `prefix` | `fenced` | first part of every key and channel name; no `{` or `}` |
//! | `timeout` | `2s` | how long one command may take (connect, reply) before it fails as transient |
//! | `tls_ca` | system roots | `rediss://` only: a PEM file of the CA(s) to trust instead of the system's |
//! | `min_replicas` | `0` (off) | after each grant, `WAIT` until this many replicas have it; fewer in time: the grant is given back and the attempt fails as "not acquired (replication)" |
//! | `replica_timeout` | `1s` | how long one `WAIT` for replicas may take |
//!
//! Our parameters are removed before the rest of the URL is handed to the `redis` crate.
//!
//! `redis+cluster://[user:password@]host:port[,host:port…][?params]` and `rediss+cluster://…`
//! (TLS) take the same parameters. The hosts are seed nodes of one Redis Cluster (any of them
//! will do; the client learns the others from the cluster); the credentials, given once before
//! the first host, apply to every node. A cluster has only database 0, so there is no path.
//!
//! `redis+sentinel://[user:password@]host[:port][,host[:port]…]/<primary name>[/db][?params]`
//! and `rediss+sentinel://…` (TLS to the Sentinels and the data nodes) name the Sentinels (port
//! 26379 by default) and the name under which they monitor the primary. The user and password
//! before the hosts are the data nodes' (the primary's); the Sentinels' own are the parameters
//! `sentinel_user` and `sentinel_password` (Sentinels often have none). The other parameters are
//! those of a single server.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::Result;
use crate::url::{invalid, redact, server_url};

/// The default key prefix.
pub(crate) const DEFAULT_PREFIX: &str = "fenced";
/// The default per-command timeout.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The shortest per-command timeout accepted.
const MIN_TIMEOUT: Duration = Duration::from_millis(10);
/// The longest per-command timeout accepted.
const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest prefix accepted, in bytes.
const MAX_PREFIX_LEN: usize = 128;
/// The default time a grant waits for its replicas (`WAIT`).
pub(crate) const DEFAULT_REPLICA_TIMEOUT: Duration = Duration::from_secs(1);
/// The most replicas `min_replicas` may ask for.
const MAX_MIN_REPLICAS: u32 = 64;
/// The default Redis port.
const DEFAULT_PORT: u16 = 6379;
/// The default Sentinel port.
#[cfg(feature = "redis-sentinel")]
const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// A parsed `redis://` or `rediss://` URL. Its `Debug` output never shows the password.
#[derive(Clone)]
pub(crate) struct RedisConfig {
    /// The URL for the `redis` crate: our parameters removed. Contains the password: never print.
    pub(crate) target: String,
    /// The URL with the password replaced by `***`, for messages.
    pub(crate) redacted: String,
    /// `rediss://`.
    pub(crate) tls: bool,
    /// The password, to scrub it from any text that reaches a message.
    pub(crate) password: Option<String>,
    pub(crate) prefix: String,
    pub(crate) timeout: Duration,
    /// The `tls_ca` file and its contents.
    pub(crate) tls_ca: Option<(PathBuf, Vec<u8>)>,
    /// Replicas that must acknowledge a grant (0: do not wait).
    pub(crate) min_replicas: u32,
    /// How long to wait for them.
    pub(crate) replica_timeout: Duration,
    /// `redis+cluster://`: one `redis://` (or `rediss://`) URL per seed node, with the
    /// credentials. Contain the password: never print.
    pub(crate) cluster: Option<Vec<String>>,
    /// `redis+sentinel://`: the Sentinels and the primary's name.
    #[cfg(feature = "redis-sentinel")]
    pub(crate) sentinel: Option<SentinelConfig>,
}

/// The Sentinel part of a `redis+sentinel://` URL. Its `Debug` output never shows the password.
#[cfg(feature = "redis-sentinel")]
#[derive(Clone)]
pub(crate) struct SentinelConfig {
    /// Host and port of each Sentinel, in the URL's order.
    pub(crate) sentinels: Vec<(String, u16)>,
    /// The name under which the Sentinels monitor the primary.
    pub(crate) master: String,
    /// `sentinel_user`.
    pub(crate) user: Option<String>,
    /// `sentinel_password`: never print.
    pub(crate) password: Option<String>,
}

#[cfg(feature = "redis-sentinel")]
impl fmt::Debug for SentinelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelConfig")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("RedisConfig");
        out.field("url", &self.redacted)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("tls_ca", &self.tls_ca.as_ref().map(|(path, _)| path))
            .field("min_replicas", &self.min_replicas)
            .field("replica_timeout", &self.replica_timeout)
            .field("cluster_seeds", &self.cluster.as_ref().map(Vec::len));
        #[cfg(feature = "redis-sentinel")]
        out.field("sentinel", &self.sentinel);
        out.finish()
    }
}

impl RedisConfig {
    pub(crate) fn from_url(url: &url::Url) -> Result<Self> {
        RedisConfig::parse(url, redact(url.as_str()))
    }

    /// Parses a `redis+cluster://` or `rediss+cluster://` URL (a list of seed nodes, which the
    /// `url` crate cannot parse).
    #[cfg(feature = "redis-cluster")]
    pub(crate) fn from_cluster_str(raw: &str) -> Result<Self> {
        let redacted = redact(raw);
        let example = "redis+cluster://:password@10.0.0.1:6379,10.0.0.2:6379,10.0.0.3:6379";
        let (scheme, rest) = match raw.split_once("://") {
            Some((s, rest)) if s.eq_ignore_ascii_case("redis+cluster") => ("redis", rest),
            Some((s, rest)) if s.eq_ignore_ascii_case("rediss+cluster") => ("rediss", rest),
            _ => {
                return Err(invalid(format!(
                    "{redacted} is not a Redis Cluster URL; write {example} (rediss+cluster:// for TLS)"
                )));
            }
        };
        if rest.contains('#') {
            return Err(invalid(format!(
                "{redacted} has a #fragment, which fenced does not use (certificate checks cannot be turned \
                 off); remove it, and trust a private CA with ?tls_ca=/path/ca.pem instead"
            )));
        }
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if !path.trim_matches('/').is_empty() {
            return Err(invalid(format!(
                "{redacted} has a path, but a Redis Cluster has only database 0; remove it, as in {example}"
            )));
        }
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((credentials, hosts)) => (Some(credentials), hosts),
            None => (None, authority),
        };
        if credentials.is_some_and(|c| c.contains(['@', ','])) {
            return Err(invalid(format!(
                "{redacted} gives credentials more than once or has an unencoded @ or , in them; give \
                 user:password once, before the first host (percent-encoded), as in {example}"
            )));
        }
        let nodes: Vec<String> =
            host_list(scheme, hosts, DEFAULT_PORT, "seed node", &redacted, example)?
                .into_iter()
                .map(|(host, port)| {
                    let host = if host.contains(':') {
                        format!("[{host}]")
                    } else {
                        host
                    };
                    match credentials {
                        Some(credentials) => format!("{scheme}://{credentials}@{host}:{port}"),
                        None => format!("{scheme}://{host}:{port}"),
                    }
                })
                .collect();
        // The parameters are those of the single-node URL, checked by the same code.
        let mut first = url::Url::parse(&nodes[0]).map_err(|_| {
            invalid(format!(
                "{redacted} is not a valid Redis Cluster URL; write {example}"
            ))
        })?;
        first.set_query(Some(query).filter(|q| !q.is_empty()));
        let mut config = RedisConfig::parse(&first, redacted)?;
        config.cluster = Some(nodes);
        Ok(config)
    }

    /// Parses a `redis+sentinel://` or `rediss+sentinel://` URL (a list of Sentinels, which the
    /// `url` crate cannot parse, then the primary's name and the database).
    #[cfg(feature = "redis-sentinel")]
    pub(crate) fn from_sentinel_str(raw: &str) -> Result<Self> {
        let redacted = redact(raw);
        let example =
            "redis+sentinel://:password@10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/mymaster";
        let (scheme, rest) = match raw.split_once("://") {
            Some((s, rest)) if s.eq_ignore_ascii_case("redis+sentinel") => ("redis", rest),
            Some((s, rest)) if s.eq_ignore_ascii_case("rediss+sentinel") => ("rediss", rest),
            _ => {
                return Err(invalid(format!(
                    "{redacted} is not a Redis Sentinel URL; write {example} (rediss+sentinel:// for TLS)"
                )));
            }
        };
        if rest.contains('#') {
            return Err(invalid(format!(
                "{redacted} has a #fragment, which fenced does not use (certificate checks cannot be turned \
                 off); remove it, and trust a private CA with ?tls_ca=/path/ca.pem instead"
            )));
        }
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((credentials, hosts)) => (Some(credentials), hosts),
            None => (None, authority),
        };
        if credentials.is_some_and(|c| c.contains(['@', ','])) {
            return Err(invalid(format!(
                "{redacted} gives credentials more than once or has an unencoded @ or , in them; give the data \
                 nodes' user:password once, before the first Sentinel (percent-encoded), and the Sentinels' own \
                 as ?sentinel_user=&sentinel_password=, as in {example}"
            )));
        }
        let sentinels = host_list(
            scheme,
            hosts,
            DEFAULT_SENTINEL_PORT,
            "Sentinel",
            &redacted,
            example,
        )?
        .into_iter()
        .map(|(host, port)| (host.to_ascii_lowercase(), port))
        .collect::<Vec<_>>();

        // `/<primary name>[/<db>]`
        let mut segments = path.strip_prefix('/').unwrap_or(path).split('/');
        let name = segments.next().unwrap_or("");
        let db = segments.next().filter(|db| !db.is_empty());
        if segments.next().is_some_and(|s| !s.is_empty()) {
            return Err(invalid(format!(
                "the path of {redacted} has more than a primary name and a database number; write {example}/0"
            )));
        }
        let master = percent_encoding::percent_decode_str(name)
            .decode_utf8()
            .map_err(|_| {
                invalid(format!(
                    "the primary name in {redacted} is not valid UTF-8 once percent-decoded; percent-encode it \
                     correctly"
                ))
            })?
            .into_owned();
        if master.is_empty() || master.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid(format!(
                "{redacted} names no primary: the path must be the name under which the Sentinels monitor it \
                 (sentinel monitor <name> …; SENTINEL MASTERS lists them), as in {example}"
            )));
        }
        if db.is_some_and(|db| db.parse::<u32>().is_err()) {
            return Err(invalid(format!(
                "the database in {redacted} must be a number, as in {example}/0; remove {:?} or replace it \
                 with a number",
                db.unwrap_or("")
            )));
        }

        // The Sentinels' credentials are ours; the rest goes to the single-node parser.
        let mut user = None;
        let mut password = None;
        let mut others = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let Some((name, value)) = url::form_urlencoded::parse(pair.as_bytes()).next() else {
                continue;
            };
            let slot = match name.as_ref() {
                "sentinel_user" => &mut user,
                "sentinel_password" => &mut password,
                "prefix" | "timeout" | "tls_ca" | "min_replicas" | "replica_timeout" => {
                    others.push(pair);
                    continue;
                }
                _ => {
                    return Err(invalid(format!(
                        "unknown parameter {name:?} in {redacted}; known parameters for {scheme}+sentinel://: \
                         prefix, timeout, tls_ca, min_replicas, replica_timeout, sentinel_user, sentinel_password"
                    )));
                }
            };
            if slot.replace(value.into_owned()).is_some() {
                return Err(invalid(format!(
                    "parameter {name} is given twice in {redacted}; keep one"
                )));
            }
        }

        // The data nodes' URL as a single server's, on the first Sentinel's address (which only
        // the checks see: the primary's address comes from the Sentinels).
        let (host, port) = &sentinels[0];
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let node = format!(
            "{scheme}://{}{host}:{port}/{}{}{}",
            credentials.map(|c| format!("{c}@")).unwrap_or_default(),
            db.unwrap_or("0"),
            if others.is_empty() { "" } else { "?" },
            others.join("&")
        );
        let node = url::Url::parse(&node).map_err(|_| {
            invalid(format!(
                "{redacted} is not a valid Redis Sentinel URL; write {example}"
            ))
        })?;
        let mut config = RedisConfig::parse(&node, redacted)?;
        config.sentinel = Some(SentinelConfig {
            sentinels,
            master,
            user: user.filter(|u| !u.is_empty()),
            password: password.filter(|p| !p.is_empty()),
        });
        Ok(config)
    }

    fn parse(url: &url::Url, redacted: String) -> Result<Self> {
        let tls = server_url(
            url,
            &redacted,
            ("a Redis", "redis", "rediss", 6379),
            "redis://localhost:6379/0",
        )?;
        let path = url.path().trim_start_matches('/');
        if !path.is_empty() && path.parse::<u32>().is_err() {
            return Err(invalid(format!(
                "the path of {redacted} must be a database number, as in redis://host:6379/0; remove {path:?} or \
                 replace it with a number"
            )));
        }
        let password = match url.password() {
            Some(encoded) => Some(
                percent_encoding::percent_decode_str(encoded)
                    .decode_utf8()
                    .map_err(|_| {
                        invalid(format!(
                            "the password in {redacted} is not valid UTF-8 once percent-decoded; percent-encode it \
                             correctly"
                        ))
                    })?
                    .into_owned(),
            ),
            None => None,
        };
        if percent_encoding::percent_decode_str(url.username())
            .decode_utf8()
            .is_err()
        {
            return Err(invalid(format!(
                "the user name in {redacted} is not valid UTF-8 once percent-decoded; percent-encode it correctly"
            )));
        }

        let mut prefix = None;
        let mut timeout = None;
        let mut tls_ca = None;
        let mut min_replicas = None;
        let mut replica_timeout = None;
        for (name, value) in crate::url::query_params(
            url,
            &[
                "prefix",
                "timeout",
                "tls_ca",
                "min_replicas",
                "replica_timeout",
            ],
        )? {
            let seen = match name.as_str() {
                "prefix" => prefix.replace(value.clone()).is_some(),
                "timeout" => timeout
                    .replace(crate::url::duration_param(url, &name, &value)?)
                    .is_some(),
                "replica_timeout" => replica_timeout
                    .replace(crate::url::duration_param(url, &name, &value)?)
                    .is_some(),
                "min_replicas" => {
                    let n = value
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n <= MAX_MIN_REPLICAS)
                        .ok_or_else(|| {
                            invalid(format!(
                                "min_replicas={value:?} in {redacted} is not a number of replicas from 0 to \
                                 {MAX_MIN_REPLICAS}; write e.g. min_replicas=1"
                            ))
                        })?;
                    min_replicas.replace(n).is_some()
                }
                _ => tls_ca.replace(value.clone()).is_some(),
            };
            if seen {
                return Err(invalid(format!(
                    "parameter {name} is given twice in {redacted}; keep one"
                )));
            }
        }
        let prefix = prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        check_prefix(&prefix, &redacted)?;
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
            return Err(invalid(format!(
                "timeout={timeout:?} in {redacted} is out of range; use between {MIN_TIMEOUT:?} and {MAX_TIMEOUT:?} \
                 (default {DEFAULT_TIMEOUT:?})"
            )));
        }
        let replica_timeout = replica_timeout.unwrap_or(DEFAULT_REPLICA_TIMEOUT);
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&replica_timeout) {
            return Err(invalid(format!(
                "replica_timeout={replica_timeout:?} in {redacted} is out of range; use between {MIN_TIMEOUT:?} and \
                 {MAX_TIMEOUT:?} (default {DEFAULT_REPLICA_TIMEOUT:?})"
            )));
        }
        let tls_ca = match tls_ca {
            None => None,
            Some(_) if !tls => {
                return Err(invalid(format!(
                    "tls_ca applies to TLS connections only, but {redacted} is not one; use rediss:// (or \
                     rediss+cluster://, rediss+sentinel://) to connect with TLS, or remove tls_ca"
                )));
            }
            Some(path) => Some(crate::url::read_ca(PathBuf::from(path))?),
        };

        let mut target = url.clone();
        target.set_query(None);
        target.set_fragment(None);
        if url.port().is_none() && target.set_port(Some(DEFAULT_PORT)).is_err() {
            return Err(invalid(format!(
                "{redacted} cannot carry a port; write it like redis://host:6379"
            )));
        }
        Ok(RedisConfig {
            target: target.into(),
            redacted,
            tls,
            password,
            prefix,
            timeout,
            tls_ca,
            min_replicas: min_replicas.unwrap_or(0),
            replica_timeout,
            cluster: None,
            #[cfg(feature = "redis-sentinel")]
            sentinel: None,
        })
    }
}

/// The `host[:port]` entries of a comma-separated list (Cluster seed nodes, Sentinels), each
/// once (hosts compared without case, returned as written), with `port` as the default port;
/// `role` names an entry in messages.
#[cfg(any(feature = "redis-cluster", feature = "redis-sentinel"))]
fn host_list(
    scheme: &str,
    hosts: &str,
    port: u16,
    role: &str,
    redacted: &str,
    example: &str,
) -> Result<Vec<(String, u16)>> {
    let mut out: Vec<(String, u16)> = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err(invalid(format!(
                "{redacted} has an empty host entry; write {example}"
            )));
        }
        let parsed = url::Url::parse(&format!("{scheme}://{host}"))
            .ok()
            .filter(|u| {
                u.host_str().is_some_and(|h| !h.is_empty())
                    && u.path().trim_matches('/').is_empty()
                    && u.username().is_empty()
            })
            .ok_or_else(|| {
                invalid(format!(
                    "the {role} {host:?} in {redacted} is not host:port; write {example}"
                ))
            })?;
        let host = parsed.host_str().unwrap_or("");
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_owned();
        let address = (host, parsed.port().unwrap_or(port));
        if out
            .iter()
            .any(|(h, p)| h.eq_ignore_ascii_case(&address.0) && *p == address.1)
        {
            return Err(invalid(format!(
                "{redacted} names the {role} {}:{} twice; name each {role} once",
                address.0, address.1
            )));
        }
        out.push(address);
    }
    Ok(out)
}

fn check_prefix(prefix: &str, redacted: &str) -> Result<()> {
    let problem = if prefix.is_empty() {
        Some("is empty".to_owned())
    } else if prefix.len() > MAX_PREFIX_LEN {
        Some(format!("is longer than {MAX_PREFIX_LEN} bytes"))
    } else if prefix.contains(['{', '}']) {
        Some(
            "contains { or }, which would break the hash tag that keeps one lock's keys together"
                .to_owned(),
        )
    } else if prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Some("contains spaces or control characters".to_owned())
    } else {
        None
    };
    match problem {
        Some(problem) => Err(invalid(format!(
            "prefix={prefix:?} in {redacted} {problem}; use a short name such as prefix=myapp"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn parse(s: &str) -> Result<RedisConfig> {
        RedisConfig::from_url(&url::Url::parse(s).unwrap())
    }

    #[test]
    fn defaults_and_parameters() {
        let c = parse("redis://localhost").unwrap();
        assert_eq!(c.prefix, "fenced");
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.target, "redis://localhost:6379");
        assert!(!c.tls);

        assert_eq!(c.min_replicas, 0);
        let c = parse("redis://h/0?min_replicas=2&replica_timeout=250ms").unwrap();
        assert_eq!(
            (c.min_replicas, c.replica_timeout),
            (2, Duration::from_millis(250))
        );

        let c = parse("rediss://u:p%40ss@h:7000/3?prefix=app&timeout=500ms").unwrap();
        assert_eq!(c.prefix, "app");
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!(c.target, "rediss://u:p%40ss@h:7000/3");
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert!(c.tls);
        assert!(!format!("{c:?}").contains("p%40ss"));
    }

    #[test]
    fn bad_urls_are_clear_and_redacted() {
        for (url, expect) in [
            ("redis://:hunter2@h/0?prefx=a", "unknown parameter"),
            ("redis://:hunter2@h/0?prefix=a{b}", "hash tag"),
            ("redis://:hunter2@h/0?prefix=", "is empty"),
            ("redis://:hunter2@h/0?timeout=0s", "out of range"),
            ("redis://:hunter2@h/0?timeout=soon", "not a duration"),
            ("redis://:hunter2@h/zero", "database number"),
            ("redis://:hunter2@h/0?tls_ca=/ca.pem", "rediss://"),
            (
                "rediss://:hunter2@h/0?tls_ca=/nonexistent/ca.pem",
                "cannot read",
            ),
            ("rediss://:hunter2@h/0#insecure", "fragment"),
            ("redis://:hunter2@h/0?prefix=a&prefix=b", "twice"),
            ("redis://:hunter2@h/0?min_replicas=-1", "number of replicas"),
            (
                "redis://:hunter2@h/0?min_replicas=1000",
                "number of replicas",
            ),
            ("redis://:hunter2@h/0?replica_timeout=0s", "out of range"),
        ] {
            let e = parse(url).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{url}");
            let text = e.to_string();
            assert!(text.contains(expect), "{url}: {text}");
            assert!(!text.contains("hunter2"), "{url}: {text}");
        }
    }

    #[test]
    #[cfg(feature = "redis-cluster")]
    fn cluster_urls() {
        let c = RedisConfig::from_cluster_str(
            "redis+cluster://:p%40ss@10.0.0.1:7000,10.0.0.2,Node-3:7002?prefix=app&min_replicas=1",
        )
        .unwrap();
        assert_eq!(
            c.cluster.as_deref().unwrap(),
            [
                "redis://:p%40ss@10.0.0.1:7000",
                "redis://:p%40ss@10.0.0.2:6379",
                "redis://:p%40ss@Node-3:7002"
            ]
        );
        assert_eq!((c.prefix.as_str(), c.min_replicas), ("app", 1));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert_eq!(
            c.redacted,
            "redis+cluster://:***@10.0.0.1:7000,10.0.0.2,Node-3:7002?prefix=app&min_replicas=1"
        );
        assert!(!format!("{c:?}").contains("p%40ss"));
        let c = RedisConfig::from_cluster_str("REDISS+CLUSTER://h:1/").unwrap();
        assert!(c.tls);
        assert_eq!(c.cluster.unwrap(), ["rediss://h:1"]);

        for (url, expect) in [
            ("redis+cluster://:hunter2@h:1,h:1", "twice"),
            ("redis+cluster://:hunter2@h:1,,h:2", "empty host"),
            ("redis+cluster://:hunter2@h:1,h:x", "not host:port"),
            ("redis+cluster://:hunter2@h:1/0", "only database 0"),
            ("redis+cluster://:hunter2@h:1,:other@h:2", "more than once"),
            ("redis+cluster://:hunter2@h:1?prefx=a", "unknown parameter"),
            ("redis+cluster://:hunter2@h:1?timeout=0s", "out of range"),
            ("redis+cluster://:hunter2@h:1?tls_ca=/ca.pem", "rediss://"),
            ("redis+cluster://:hunter2@h:1#x", "fragment"),
            ("redis+clusterx://:hunter2@h:1", "not a Redis Cluster URL"),
        ] {
            let e = RedisConfig::from_cluster_str(url).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{url}");
            let text = e.to_string();
            assert!(text.contains(expect), "{url}: {text}");
            assert!(!text.contains("hunter2"), "{url}: {text}");
        }
    }

    #[test]
    #[cfg(feature = "redis-sentinel")]
    fn sentinel_urls() {
        let c = RedisConfig::from_sentinel_str(
            "redis+sentinel://app:p%40ss@10.0.0.1,Sentinel-2:26380,[::1]:5/my%2Dprimary/3?prefix=app&min_replicas=1&sentinel_password=s%26cret&sentinel_user=watch",
        )
        .unwrap();
        let s = c.sentinel.as_ref().unwrap();
        assert_eq!(
            s.sentinels,
            [
                ("10.0.0.1".to_owned(), 26379),
                ("sentinel-2".to_owned(), 26380),
                ("::1".to_owned(), 5)
            ]
        );
        assert_eq!(s.master, "my-primary");
        assert_eq!(
            (s.user.as_deref(), s.password.as_deref()),
            (Some("watch"), Some("s&cret"))
        );
        assert_eq!((c.prefix.as_str(), c.min_replicas), ("app", 1));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert!(c.target.ends_with("/3"), "{}", c.target);
        assert!(!c.tls);
        let shown = format!("{c:?} {}", c.redacted);
        assert!(
            !shown.contains("p%40ss") && !shown.contains("s%26cret") && !shown.contains("s&cret"),
            "{shown}"
        );

        let c = RedisConfig::from_sentinel_str("REDISS+SENTINEL://h/primary").unwrap();
        assert!(c.tls);
        assert!(c.target.ends_with("/0"), "{}", c.target);
        assert_eq!(c.sentinel.unwrap().sentinels, [("h".to_owned(), 26379)]);

        for (url, expect) in [
            ("redis+sentinel://:hunter2@h:1,h:1/m", "twice"),
            ("redis+sentinel://:hunter2@h:1,,h:2/m", "empty host"),
            ("redis+sentinel://:hunter2@h:1,h:x/m", "not host:port"),
            ("redis+sentinel://:hunter2@h:1,h:2", "names no primary"),
            ("redis+sentinel://:hunter2@h:1,h:2/", "names no primary"),
            ("redis+sentinel://:hunter2@h:1/m/zero", "must be a number"),
            ("redis+sentinel://:hunter2@h:1/m/0/x", "more than"),
            (
                "redis+sentinel://:hunter2@h:1,:other@h:2/m",
                "more than once",
            ),
            (
                "redis+sentinel://:hunter2@h:1/m?prefx=a",
                "unknown parameter",
            ),
            (
                "redis+sentinel://:hunter2@h:1/m?sentinel_password=hunter2&sentinel_password=hunter2",
                "twice",
            ),
            ("redis+sentinel://:hunter2@h:1/m?timeout=0s", "out of range"),
            (
                "redis+sentinel://:hunter2@h:1/m?tls_ca=/ca.pem",
                "rediss+sentinel://",
            ),
            ("redis+sentinel://:hunter2@h:1/m#x", "fragment"),
            (
                "redis+sentinelx://:hunter2@h:1/m",
                "not a Redis Sentinel URL",
            ),
        ] {
            let e = RedisConfig::from_sentinel_str(url).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{url}");
            let text = e.to_string();
            assert!(text.contains(expect), "{url}: {text}");
            assert!(!text.contains("hunter2"), "{url}: {text}");
        }
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let e = parse(&format!("rediss://h/0?tls_ca={}", path.display())).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }
}
