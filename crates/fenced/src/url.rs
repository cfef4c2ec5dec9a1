//! Building clients from URLs, the embedded default, and redaction of secrets.

use std::path::PathBuf;

use crate::client::Client;
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::observe::MetricNames;
use crate::options::LockOptions;

/// Connects to the lock store named by `url`.
///
/// | URL | Backend | Cargo feature |
/// |---|---|---|
/// | `memory://` or `memory://name` | in-process store shared by clients of that name | `memory` (default) |
/// | `sqlite:///path/to/locks.db` | embedded, shared by the processes of one machine | `sqlite` (default) |
/// | `redis://[user:pass@]host:port/db`, `rediss://…` | one Redis or Valkey server (TLS with `rediss`) | `redis` |
/// | `redlock://[user:pass@]host:port,host:port,host:port[,…]`, `redlocks://…` | Redlock over 3 or more independent Redis / Valkey nodes (a majority grants) | `redlock` |
/// | `redis+cluster://[user:pass@]host:port[,host:port…]`, `rediss+cluster://…` | a Redis / Valkey Cluster (7.0 or later; the hosts are seed nodes) | `redis-cluster` |
/// | `redis+sentinel://[user:pass@]host:port[,host:port…]/name[/db]`, `rediss+sentinel://…` | the primary that Redis Sentinels monitor under `name` (the hosts are the Sentinels), followed across failovers | `redis-sentinel` |
/// | `zk://[user:pass@]host:port[,host:port…][/chroot]` | a ZooKeeper ensemble (session-bound locks) | `zookeeper` |
/// | `etcd://[user:pass@]host:port[,host:port…]`, `etcds://…` | an etcd cluster (session-bound locks; TLS with `etcds`) | `etcd` |
/// | `postgres://user:pass@host:port/db[?mode=session]` | PostgreSQL (lease rows, or advisory locks in session mode) | `postgres` |
/// | `mysql://user:pass@host:port/db[?mode=session]` | MySQL or MariaDB (lease rows, or `GET_LOCK` in session mode) | `mysql` |
///
/// An unknown scheme fails with [`ErrorKind::InvalidConfig`]; a known scheme whose cargo feature
/// is off fails with [`ErrorKind::Unsupported`] naming the feature. Passwords never appear in
/// errors or logs.
///
/// # Cancel safety
/// Cancel safe: dropping the future closes whatever it opened; no lock is taken by connecting.
///
/// ```
/// # async fn demo() -> fenced::Result<()> {
/// let client = fenced::connect("memory://").await?;
/// let err = fenced::connect("carrier-pigeon://loft").await.unwrap_err();
/// assert_eq!(err.kind(), fenced::ErrorKind::InvalidConfig);
/// # Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<Client> {
    Client::builder().url(url).build().await
}

/// Builds a [`Client`]: an optional URL (default: the embedded SQLite file, see
/// [`default_url`]), default [`LockOptions`] and the [`MetricNames`] rule.
#[derive(Debug, Default, Clone)]
pub struct ClientBuilder {
    url: Option<String>,
    options: LockOptions,
    metric_names: MetricNames,
}

impl ClientBuilder {
    /// The lock store's URL (see [`connect`]).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Default options for [`Client::lock`] and [`Client::try_lock`].
    pub fn options(mut self, options: LockOptions) -> Self {
        self.options = options;
        self
    }

    /// How locks are named in the `lock` label of metrics, when an acquisition does not set
    /// [`LockOptions::metric_name`]. Default: [`MetricNames::key_prefix`] (`order:42` →
    /// `order`, keys without `:` or `/` → `other`).
    ///
    /// ```
    /// # async fn demo() -> fenced::Result<()> {
    /// let client = fenced::Client::builder()
    ///     .url("memory://")
    ///     .metric_names(fenced::MetricNames::full_key())
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn metric_names(mut self, names: MetricNames) -> Self {
        self.metric_names = names;
        self
    }

    /// Validates the options and connects.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future closes whatever it opened; no lock is taken by connecting.
    pub async fn build(self) -> Result<Client> {
        self.options.validate()?;
        let url = match self.url {
            Some(url) => url,
            None => default_url()?,
        };
        let backend = open(&url).await?;
        Ok(Client::from_arc(backend, self.options).with_metric_names(self.metric_names))
    }
}

async fn open(raw: &str) -> Result<std::sync::Arc<dyn crate::Backend>> {
    // A list of ZooKeeper hosts (`zk://h1:2181,h2:2181/chroot`) is not a URL the `url` crate
    // parses; the backend reads the text itself.
    #[cfg(feature = "zookeeper")]
    if raw
        .get(..5)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("zk://"))
    {
        return crate::backends::zookeeper::open_str(raw).await;
    }
    // A list of Redlock nodes is read by the backend too.
    if raw
        .get(..10)
        .is_some_and(|s| s.eq_ignore_ascii_case("redlock://"))
        || raw
            .get(..11)
            .is_some_and(|s| s.eq_ignore_ascii_case("redlocks://"))
    {
        #[cfg(feature = "redlock")]
        return crate::backends::redlock::open_str(raw).await;
        #[cfg(not(feature = "redlock"))]
        return Err(feature_off("redlock", "redlock"));
    }
    // So is a list of Redis Cluster seed nodes (`redis+cluster://h1:6379,h2:6379`).
    if let Some(scheme) = raw.split_once("://").map(|(s, _)| s.to_ascii_lowercase()) {
        if scheme == "redis+cluster" || scheme == "rediss+cluster" {
            #[cfg(feature = "redis-cluster")]
            return Ok(std::sync::Arc::new(
                crate::backends::redis::RedisBackend::from_cluster_str(raw).await?,
            ));
            #[cfg(not(feature = "redis-cluster"))]
            return Err(feature_off(&scheme, "redis-cluster"));
        }
        // And a list of Sentinels (`redis+sentinel://s1:26379,s2:26379/mymaster`).
        if scheme == "redis+sentinel" || scheme == "rediss+sentinel" {
            #[cfg(feature = "redis-sentinel")]
            return Ok(std::sync::Arc::new(
                crate::backends::redis::RedisBackend::from_sentinel_str(raw).await?,
            ));
            #[cfg(not(feature = "redis-sentinel"))]
            return Err(feature_off(&scheme, "redis-sentinel"));
        }
    }
    // Several etcd endpoints in the authority (`etcd://a:2379,b:2379`) become a parameter.
    #[cfg(feature = "etcd")]
    let raw = &*crate::backends::etcd::fold_endpoints(raw);
    let url = parse(raw)?;
    let scheme = url.scheme().to_owned();
    match scheme.as_str() {
        "memory" => {
            #[cfg(feature = "memory")]
            return Ok(std::sync::Arc::new(
                crate::backends::memory::MemoryBackend::from_url(&url)?,
            ));
            #[cfg(not(feature = "memory"))]
            return Err(feature_off("memory", "memory"));
        }
        "sqlite" => {
            #[cfg(feature = "sqlite")]
            return Ok(std::sync::Arc::new(
                crate::backends::sqlite::SqliteBackend::from_url(&url).await?,
            ));
            #[cfg(not(feature = "sqlite"))]
            return Err(feature_off("sqlite", "sqlite"));
        }
        "redis" | "rediss" => {
            #[cfg(feature = "redis")]
            return Ok(std::sync::Arc::new(
                crate::backends::redis::RedisBackend::from_url(&url).await?,
            ));
            #[cfg(not(feature = "redis"))]
            return Err(feature_off(&scheme, "redis"));
        }
        "etcd" | "etcds" => {
            #[cfg(feature = "etcd")]
            return crate::backends::etcd::open(&url).await;
            #[cfg(not(feature = "etcd"))]
            return Err(feature_off(&scheme, "etcd"));
        }
        "zk" => {
            #[cfg(feature = "zookeeper")]
            return crate::backends::zookeeper::open(&url).await;
            #[cfg(not(feature = "zookeeper"))]
            return Err(feature_off(&scheme, "zookeeper"));
        }
        "postgres" | "postgresql" => {
            #[cfg(feature = "postgres")]
            return crate::backends::postgres::open(&url).await;
            #[cfg(not(feature = "postgres"))]
            return Err(feature_off(&scheme, "postgres"));
        }
        "mysql" | "mariadb" => {
            #[cfg(feature = "mysql")]
            return crate::backends::mysql::open(&url).await;
            #[cfg(not(feature = "mysql"))]
            return Err(feature_off(&scheme, "mysql"));
        }
        _ => Err(Error::new(
            ErrorKind::InvalidConfig,
            Operation::Connect,
            format!(
                "unknown URL scheme {scheme:?} in {}; use memory://, sqlite:///path/to/locks.db, \
                 redis://host:port, rediss://host:port, redis+cluster://host:port,host:port, \
                 redis+sentinel://host:26379,host:26379/name, etcd://host:port, zk://host:port, \
                 postgres://user@host/db or mysql://user@host/db",
                redact(raw)
            ),
        )),
    }
}

#[allow(dead_code)]
fn feature_off(scheme: &str, feature: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        Operation::Connect,
        format!(
            "{scheme}:// needs the cargo feature `{feature}` of the fenced crate, which is off in this build; \
             enable it: fenced = {{ version = \"{}\", features = [\"{feature}\"] }}",
            env!("CARGO_PKG_VERSION")
        ),
    )
}

/// Parses `raw`, failing with a redacted, actionable message.
pub(crate) fn parse(raw: &str) -> Result<url::Url> {
    url::Url::parse(raw).map_err(|e| {
        Error::new(
            ErrorKind::InvalidConfig,
            Operation::Connect,
            format!(
                "{} is not a valid URL ({e}); write it like redis://host:6379 or sqlite:///var/lib/app/locks.db",
                redact(raw)
            ),
        )
    })
}

/// The URL used when none is given: an SQLite file in the user's state directory,
/// `$XDG_STATE_HOME/fenced/locks.db` or `$HOME/.local/state/fenced/locks.db`. The directory is
/// created on first use.
///
/// ```
/// # if std::env::var_os("HOME").is_some() {
/// let url = fenced::default_url()?;
/// assert!(url.starts_with("sqlite://") && url.ends_with("fenced/locks.db"));
/// # }
/// # Ok::<(), fenced::Error>(())
/// ```
pub fn default_url() -> Result<String> {
    let dir = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidConfig,
                Operation::Connect,
                "no URL given and neither XDG_STATE_HOME nor HOME is set, so there is no place for the \
                 embedded lock file; pass a URL such as sqlite:///var/lib/app/locks.db",
            )
        })?;
    let path = dir.join("fenced").join("locks.db");
    let encoded: String = path
        .to_string_lossy()
        .split('/')
        .map(|part| percent_encoding::utf8_percent_encode(part, PATH_SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/");
    Ok(format!("sqlite://{encoded}"))
}

const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// `url` with any password (and query values named like secrets) replaced by `***`, for
/// messages and logs. Works on malformed URLs too.
///
/// ```
/// assert_eq!(fenced::redact("redis://app:hunter2@cache:6379/0"), "redis://app:***@cache:6379/0");
/// assert_eq!(fenced::redact("rediss://:s3cret@cache/0?password=x&prefix=p"), "rediss://:***@cache/0?password=***&prefix=p");
/// assert_eq!(fenced::redact("memory://"), "memory://");
/// assert_eq!(
///     fenced::redact("redlock://:a@h1:1,:b@h2:2,h3:3"),
///     "redlock://:***@h1:1,:***@h2:2,h3:3"
/// );
/// ```
pub fn redact(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    match head.split_once("://") {
        Some((scheme, rest)) => {
            out.push_str(scheme);
            out.push_str("://");
            let auth_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(auth_end);
            let entries: Vec<&str> = authority.split(',').collect();
            // A list of nodes with their own credentials (`redlock://`): each entry on its own,
            // but only when every entry reads as `[userinfo@]host[:port]`; otherwise (a comma in
            // a password, say) everything up to the last `@` is hidden.
            if authority.matches('@').count() > 1
                && entries
                    .iter()
                    .all(|e| is_host_port(e.rsplit_once('@').map_or(*e, |(_, h)| h)))
            {
                let redacted: Vec<String> = entries.iter().map(|e| redact_userinfo(e)).collect();
                out.push_str(&redacted.join(","));
            } else {
                out.push_str(&redact_userinfo(authority));
            }
            out.push_str(path);
        }
        None => out.push_str(head),
    }
    if let Some(query) = query {
        out.push('?');
        let parts: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if is_secret_name(k) => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push_str(&parts.join("&"));
    }
    out
}

/// `user:password@host` → `user:***@host`; text without `@` is returned as it is.
fn redact_userinfo(authority: &str) -> String {
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    }
}

/// Whether `text` is `host` or `host:port` (a name, an IPv4 address or a bracketed IPv6 one).
fn is_host_port(text: &str) -> bool {
    let (host_ok, port) = match text.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) => (
                !v6.is_empty()
                    && v6
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.')),
                port,
            ),
            None => return false,
        },
        None => {
            let host = text.split_once(':').map_or(text, |(host, _)| host);
            let ok = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
            (ok, &text[host.len()..])
        }
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    host_ok && port_ok
}

fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "secret", "token", "auth", "key"]
        .iter()
        .any(|s| name.contains(s))
}

/// The query parameters of `url`, failing on any name not in `known` (typos must not be ignored).
#[allow(dead_code)]
pub(crate) fn query_params(url: &url::Url, known: &[&str]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (k, v) in url.query_pairs() {
        if !known.contains(&k.as_ref()) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                Operation::Connect,
                format!(
                    "unknown parameter {k:?} in {}; known parameters for {}://: {}",
                    redact(url.as_str()),
                    url.scheme(),
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

/// Parses a human duration (`500ms`, `30s`, `5m`) from a URL parameter.
#[allow(dead_code)]
pub(crate) fn duration_param(
    url: &url::Url,
    name: &str,
    value: &str,
) -> Result<std::time::Duration> {
    parse_duration(value).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidConfig,
            Operation::Connect,
            format!(
                "parameter {name}={value:?} in {} is not a duration; write e.g. 500ms, 2s or 1m",
                redact(url.as_str())
            ),
        )
    })
}

/// `123ms`, `2s`, `1.5s`, `5m`, `1h`; `None` when malformed.
pub(crate) fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return None,
    };
    std::time::Duration::try_from_secs_f64(secs).ok()
}

/// A bad-configuration error from a backend's URL.
#[cfg(any(
    feature = "redis",
    feature = "etcd",
    feature = "zookeeper",
    feature = "postgres",
    feature = "mysql"
))]
pub(crate) fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidConfig, Operation::Connect, message)
}

/// The checks every server URL with a TLS variant shares: the scheme (`plain` or `secure`, the
/// latter meaning TLS), a host, and no `#fragment`. Returns whether TLS is on. `name` names the
/// store with its article ("a Redis"), `port` its usual port, `example` a complete URL.
#[cfg(any(feature = "redis", feature = "etcd"))]
pub(crate) fn server_url(
    url: &url::Url,
    redacted: &str,
    (name, plain, secure, port): (&str, &str, &str, u16),
    example: &str,
) -> Result<bool> {
    let tls = match url.scheme() {
        s if s == plain => false,
        s if s == secure => true,
        other => {
            return Err(invalid(format!(
                "{redacted} is not {name} URL (scheme {other:?}); write {plain}://host:{port} or {secure}://host:{port}"
            )));
        }
    };
    if url.host_str().unwrap_or("").is_empty() {
        return Err(invalid(format!(
            "{redacted} names no host; write it like {example}"
        )));
    }
    if url.fragment().is_some() {
        return Err(invalid(format!(
            "{redacted} has a #fragment, which fenced does not use (certificate checks cannot be turned \
             off); remove it, and trust a private CA with ?tls_ca=/path/ca.pem instead"
        )));
    }
    Ok(tls)
}

/// Percent-decodes one part of a URL (user name, database, path) into UTF-8, or says which part
/// of which (redacted) URL is not valid.
#[cfg(any(
    feature = "etcd",
    feature = "zookeeper",
    feature = "postgres",
    feature = "mysql"
))]
pub(crate) fn decode(part: &str, what: &str, redacted: &str) -> Result<String> {
    percent_encoding::percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            invalid(format!(
                "the {what} in {redacted} is not valid UTF-8 once percent-decoded; percent-encode it correctly"
            ))
        })
}

/// Installs rustls's default crypto provider unless one is installed already (TLS backends).
#[cfg(any(
    feature = "redis",
    feature = "etcd",
    feature = "postgres",
    feature = "mysql"
))]
pub(crate) fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race against another installer is fine: some provider is installed.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

/// Reads a PEM CA certificate named by a `tls_ca=` URL parameter (TLS backends).
#[cfg(any(
    feature = "redis",
    feature = "etcd",
    feature = "postgres",
    feature = "mysql"
))]
pub(crate) fn read_ca(path: std::path::PathBuf) -> Result<(std::path::PathBuf, Vec<u8>)> {
    let pem = std::fs::read(&path).map_err(|e| {
        invalid(format!(
            "cannot read the CA file tls_ca={} ({e}); check the path and its permissions",
            path.display()
        ))
    })?;
    if !pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(invalid(format!(
            "the CA file tls_ca={} holds no PEM certificate (-----BEGIN CERTIFICATE-----); point it at the CA \
             certificate in PEM format",
            path.display()
        )));
    }
    Ok((path, pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists_are_redacted_per_node_and_never_leak() {
        assert_eq!(
            redact("redlock://u:a@h1:1,:b@[::1]:2,h3/0?node_timeout=1s"),
            "redlock://u:***@h1:1,:***@[::1]:2,h3/0?node_timeout=1s"
        );
        // An unencoded comma in a password: the entries do not read as hosts, so everything up
        // to the last `@` is hidden.
        let shown = redact("redlock://:pa,ss@h1:1,:x@h2:2");
        assert!(
            !shown.contains("pa") && !shown.contains("ss@") && !shown.contains(":x@"),
            "{shown}"
        );
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("redis://u:p@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://u@h"), "redis://u@h");
        assert_eq!(redact("not a url :: p@ss"), "not a url :: p@ss");
        assert_eq!(redact("redis://h/0?token=abc"), "redis://h/0?token=***");
        assert_eq!(redact("redis://a:b:c@h"), "redis://a:***@h");
        assert_eq!(redact("redis://a:p@ss@h/0"), "redis://a:***@h/0");
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("500ms"),
            Some(std::time::Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("2s"),
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(
            parse_duration("1m"),
            Some(std::time::Duration::from_secs(60))
        );
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("5"), None);
    }

    #[tokio::test]
    async fn schemes() {
        let e = connect("ftp://x").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        #[cfg(not(feature = "etcd"))]
        {
            let e = connect("etcd://localhost:2379").await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
        }
        let e = connect("::not a url").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        #[cfg(not(feature = "redis"))]
        {
            let e = connect("redis://u:secret@localhost").await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            assert!(e.to_string().contains("feature `redis`"), "{e}");
            assert!(!e.to_string().contains("secret"));
        }
    }
}
