//! `mysql://user:password@host[:port]/database[?params]` (also `mariadb://…`).
//!
//! Parameters (unknown ones are errors, so a typo is never ignored): the SQL parameters shared
//! with PostgreSQL (`mode`, `table`, `timeout`, `session_timeout`, see
//! [`sql`](crate::backends::sql)), and:
//!
//! | parameter | default | meaning |
//! |---|---|---|
//! | `tls_ca` | — | connect with TLS and trust the CA certificate(s) in this PEM file |
//! | `ssl` (or `require_ssl`) | `false` | `true`: connect with TLS, checking the server against the system's roots (or `tls_ca`) |

use std::fmt;
use std::path::PathBuf;

use mysql_async::{Opts, OptsBuilder, SslOpts};

use crate::backends::sql::{COMMON_PARAMS, SqlParams};
use crate::error::Result;
use crate::url::{decode, invalid, redact};

/// The default MySQL port.
const DEFAULT_PORT: u16 = 3306;

/// A parsed `mysql://` URL. Its `Debug` output never shows the password.
#[derive(Clone)]
pub(crate) struct MysqlConfig {
    /// The URL with the password replaced by `***`, for messages.
    pub(crate) redacted: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    /// Never print.
    pub(crate) password: Option<String>,
    pub(crate) database: String,
    pub(crate) params: SqlParams,
    /// TLS on (`tls_ca` or `ssl=true`).
    pub(crate) tls: bool,
    /// The `tls_ca` file and its contents.
    pub(crate) tls_ca: Option<(PathBuf, Vec<u8>)>,
}

impl fmt::Debug for MysqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlConfig")
            .field("url", &self.redacted)
            .field("database", &self.database)
            .field("params", &self.params)
            .field("tls", &self.tls)
            .field("tls_ca", &self.tls_ca.as_ref().map(|(path, _)| path))
            .finish()
    }
}

impl MysqlConfig {
    pub(crate) fn from_url(url: &url::Url) -> Result<Self> {
        let redacted = redact(url.as_str());
        if !matches!(url.scheme(), "mysql" | "mariadb") {
            return Err(invalid(format!(
                "{redacted} is not a MySQL URL; write mysql://user:password@host:3306/database"
            )));
        }
        let host = url.host_str().unwrap_or("").to_owned();
        if host.is_empty() {
            return Err(invalid(format!(
                "{redacted} names no host; write mysql://user:password@host:3306/database"
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
        if database.is_empty() || database.contains('/') || database.len() > 64 {
            return Err(invalid(format!(
                "{redacted} names no database (or more than one path segment); write \
                 mysql://user:password@host:3306/database"
            )));
        }
        let user = decode(url.username(), "user name", &redacted)?;
        if user.is_empty() {
            return Err(invalid(format!(
                "{redacted} names no user; write mysql://user:password@host:3306/database"
            )));
        }
        let password = url
            .password()
            .map(|p| decode(p, "password", &redacted))
            .transpose()?;

        let mut known: Vec<&str> = COMMON_PARAMS.to_vec();
        known.extend(["tls_ca", "ssl", "require_ssl"]);
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
        for (name, value) in pairs {
            match name.as_str() {
                "tls_ca" => {
                    tls = true;
                    tls_ca = Some(crate::url::read_ca(PathBuf::from(value))?);
                }
                _ => match value.as_str() {
                    "true" | "1" => tls = true,
                    "false" | "0" => {}
                    _ => {
                        return Err(invalid(format!(
                            "{name}={value:?} in {redacted} is not true or false; write {name}=true to \
                             connect with TLS"
                        )));
                    }
                },
            }
        }
        Ok(MysqlConfig {
            redacted,
            host,
            port: url.port().unwrap_or(DEFAULT_PORT),
            user,
            password,
            database,
            params,
            tls,
            tls_ca,
        })
    }

    /// The driver's options. Contains the password: never print.
    pub(crate) fn opts(&self) -> Opts {
        let mut builder = OptsBuilder::default()
            .ip_or_hostname(self.host.clone())
            .tcp_port(self.port)
            .user(Some(self.user.clone()))
            .pass(self.password.clone())
            .db_name(Some(self.database.clone()))
            // Extend and release count matched rows, not changed ones.
            .client_found_rows(true)
            .prefer_socket(false)
            .stmt_cache_size(64)
            .tcp_keepalive(Some(
                self.params.timeout.max(std::time::Duration::from_secs(1)),
            ))
            .wait_timeout(None);
        if self.tls {
            let mut ssl = SslOpts::default();
            if let Some((_, pem)) = &self.tls_ca {
                ssl = ssl.with_root_certs(vec![pem.clone().into()]);
            }
            builder = builder.ssl_opts(Some(ssl));
        }
        builder.into()
    }

    /// `text` with the password replaced by `***`.
    pub(crate) fn scrub(&self, text: &str) -> String {
        match self.password.as_deref() {
            Some(password) if !password.is_empty() => text.replace(password, "***"),
            _ => text.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::sql::SqlMode;
    use crate::error::ErrorKind;

    fn parse(s: &str) -> Result<MysqlConfig> {
        MysqlConfig::from_url(&url::Url::parse(s).unwrap())
    }

    #[test]
    fn defaults_and_parameters() {
        let c = parse("mysql://app:p%40ss@db.internal/locks").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("db.internal", 3306));
        assert_eq!(c.user, "app");
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert_eq!(c.database, "locks");
        assert_eq!(c.params.mode, SqlMode::Lease);
        assert_eq!(c.params.table, "fenced_locks");
        assert!(!c.tls);
        assert!(!format!("{c:?}").contains("p@ss"));

        let c = parse("mariadb://app:pw@h:3307/db?mode=session&table=locks_2&ssl=true").unwrap();
        assert_eq!(c.port, 3307);
        assert_eq!(c.params.mode, SqlMode::Session);
        assert_eq!(c.params.table, "locks_2");
        assert!(c.tls);
    }

    #[test]
    fn bad_urls_are_clear_and_redacted() {
        for (url, expect) in [
            ("mysql://u:hunter2@h/db?tabel=x", "unknown parameter"),
            ("mysql://u:hunter2@h/", "names no database"),
            ("mysql://:hunter2@h/db", "names no user"),
            ("mysql://u:hunter2@h/db?ssl=maybe", "not true or false"),
            (
                "mysql://u:hunter2@h/db?tls_ca=/nonexistent/ca.pem",
                "cannot read",
            ),
            ("mysql://u:hunter2@h/db?table=x;drop", "plain table name"),
            ("mysql://u:hunter2@h/db?ssl=true&ssl=true", "twice"),
            ("mysql://u:hunter2@h/db#x", "fragment"),
        ] {
            let e = parse(url).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{url}");
            let text = e.to_string();
            assert!(text.contains(expect), "{url}: {text}");
            assert!(!text.contains("hunter2"), "{url}: {text}");
        }
    }
}
