//! `postgres://[user[:password]@]host[:port]/database[?params]` (also `postgresql://`).
//!
//! Parameters (unknown ones are errors, so a typo is never ignored):
//!
//! | parameter | default | meaning |
//! |---|---|---|
//! | `mode` | `lease` | `lease` (a row with a database-clock expiry) or `session` (advisory lock on a dedicated connection) |
//! | `table` | `fenced_locks` | the lock table (its token sequence is `<table>_tokens`) |
//! | `timeout` | `2s` | how long one statement (or connecting) may take before it fails as transient |
//! | `session_timeout` | `10s` | session mode: the server ends a connection silent this long (`idle_session_timeout`) |
//! | `sslmode` | `disable` | `disable`, or `require` / `verify-ca` / `verify-full`, which all verify the server certificate |
//! | `tls_ca` | system roots | a PEM file of the CA(s) to trust for TLS |
//! | `application_name` | `fenced` | shown in `pg_stat_activity` |
//! | `prepared_statements` | `true` | `false` sends every statement unnamed (for poolers that cannot keep prepared statements) |

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::backends::sql::{COMMON_PARAMS, SqlParams};
use crate::error::Result;
use crate::url::{decode, invalid, redact};

/// The default port of PostgreSQL.
const DEFAULT_PORT: u16 = 5432;

/// A parsed `postgres://` URL. Its `Debug` output never shows the password.
#[derive(Clone)]
pub(crate) struct PgConfig {
    /// The URL with the password replaced by `***`, for messages.
    pub(crate) redacted: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    /// Never print it.
    pub(crate) password: Option<String>,
    pub(crate) database: String,
    pub(crate) application_name: String,
    /// Prepare statements once per connection (`prepared_statements`, default true).
    pub(crate) prepared_statements: bool,
    /// TLS on (`sslmode=require|verify-ca|verify-full`).
    pub(crate) tls: bool,
    /// The `tls_ca` file and its contents.
    pub(crate) tls_ca: Option<(PathBuf, Vec<u8>)>,
    pub(crate) params: SqlParams,
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &self.redacted)
            .field("mode", &self.params.mode)
            .field("table", &self.params.table)
            .field("timeout", &self.params.timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

impl PgConfig {
    pub(crate) fn from_url(url: &url::Url) -> Result<Self> {
        let redacted = redact(url.as_str());
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(invalid(format!(
                "{redacted} is not a PostgreSQL URL; write postgres://user:password@host:5432/database"
            )));
        }
        let host = url.host_str().unwrap_or("").to_owned();
        if host.is_empty() {
            return Err(invalid(format!(
                "{redacted} names no host; write it like postgres://user:password@db.internal:5432/app"
            )));
        }
        if url.fragment().is_some() {
            return Err(invalid(format!(
                "{redacted} has a #fragment, which fenced does not use; remove it"
            )));
        }
        let database = decode(
            url.path().trim_start_matches('/'),
            "database name",
            &redacted,
        )?;
        if database.is_empty() || database.contains('/') {
            return Err(invalid(format!(
                "{redacted} names no database (or more than one path segment); write \
                 postgres://user:password@host:5432/database"
            )));
        }
        let user = decode(url.username(), "user name", &redacted)?;
        if user.is_empty() {
            return Err(invalid(format!(
                "{redacted} names no user; write postgres://user:password@host:5432/database"
            )));
        }
        let password = url
            .password()
            .map(|p| decode(p, "password", &redacted))
            .transpose()?;

        let mut known: Vec<&str> = COMMON_PARAMS.to_vec();
        known.extend([
            "sslmode",
            "tls_ca",
            "application_name",
            "prepared_statements",
        ]);
        let mut pairs = crate::url::query_params(url, &known)?;
        for (i, (name, _)) in pairs.iter().enumerate() {
            if pairs[..i].iter().any(|(n, _)| n == name) {
                return Err(invalid(format!(
                    "parameter {name} is given twice in {redacted}; keep one"
                )));
            }
        }
        let params = SqlParams::take(url, &mut pairs)?;
        let mut tls = false;
        let mut tls_ca = None;
        let mut application_name = "fenced".to_owned();
        let mut prepared_statements = true;
        for (name, value) in pairs {
            match name.as_str() {
                "sslmode" => {
                    tls = match value.as_str() {
                        "disable" => false,
                        "require" | "verify-ca" | "verify-full" => true,
                        _ => {
                            return Err(invalid(format!(
                                "sslmode={value:?} in {redacted} is not supported; use sslmode=disable, or \
                                 sslmode=require / verify-ca / verify-full (fenced always checks the server \
                                 certificate; trust a private CA with tls_ca=/path/ca.pem)"
                            )));
                        }
                    }
                }
                "tls_ca" => tls_ca = Some(crate::url::read_ca(PathBuf::from(value))?),
                "prepared_statements" => {
                    prepared_statements = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(invalid(format!(
                                "prepared_statements={value:?} in {redacted} is not true or false"
                            )));
                        }
                    }
                }
                _ => {
                    if value.is_empty() || value.len() > 63 || value.chars().any(|c| c.is_control())
                    {
                        return Err(invalid(format!(
                            "application_name={value:?} in {redacted} must be 1 to 63 printable characters"
                        )));
                    }
                    application_name = value;
                }
            }
        }
        if tls_ca.is_some() && !tls {
            return Err(invalid(format!(
                "tls_ca applies to TLS connections only, but {redacted} does not turn TLS on; add \
                 sslmode=verify-full, or remove tls_ca"
            )));
        }
        Ok(PgConfig {
            redacted,
            host,
            port: url.port().unwrap_or(DEFAULT_PORT),
            user,
            password,
            database,
            application_name,
            prepared_statements,
            tls,
            tls_ca,
            params,
        })
    }

    /// The tokio-postgres configuration for one connection.
    pub(crate) fn connection(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host.trim_start_matches('[').trim_end_matches(']'))
            .port(self.port)
            .user(&self.user)
            .dbname(&self.database)
            .application_name(&self.application_name)
            .connect_timeout(self.params.timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .ssl_mode(if self.tls {
                tokio_postgres::config::SslMode::Require
            } else {
                tokio_postgres::config::SslMode::Disable
            });
        if let Some(password) = &self.password {
            config.password(password.as_bytes());
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::sql::SqlMode;

    fn parse(url: &str) -> Result<PgConfig> {
        PgConfig::from_url(&url::Url::parse(url).expect("url"))
    }

    #[test]
    fn good_urls() {
        let c =
            parse("postgres://app:s%40cret@db:6543/locks?mode=session&table=app_locks").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("db", 6543));
        assert_eq!(c.password.as_deref(), Some("s@cret"));
        assert_eq!(c.database, "locks");
        assert_eq!(c.params.mode, SqlMode::Session);
        assert_eq!(c.params.table, "app_locks");
        assert!(!format!("{c:?}").contains("cret"));
        let c = parse("postgresql://app@db/locks?sslmode=verify-full").unwrap();
        assert!(c.tls);
        assert_eq!(c.port, 5432);
    }

    #[test]
    fn bad_urls() {
        for bad in [
            "postgres://app:pw@db/",
            "postgres://app:pw@db",
            "postgres://:pw@db/locks",
            "postgres://app:pw@db/locks?sslmode=prefer",
            "postgres://app:pw@db/locks?tls_ca=/nonexistent",
            "postgres://app:pw@db/locks?mode=lease&mode=session",
            "postgres://app:pw@db/locks?password=x",
            "postgres://app:pw@db/locks#frag",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidConfig, "{bad}");
            assert!(!e.to_string().contains("pw"), "{e}");
        }
    }
}
