//! `memory://[name]`: the store name (default `default`). No parameters.

use crate::error::{Error, ErrorKind, Operation, Result};

/// Parsed `memory://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MemoryConfig {
    pub(crate) name: String,
}

impl MemoryConfig {
    pub(crate) fn from_url(url: &url::Url) -> Result<Self> {
        crate::url::query_params(url, &[])?;
        let host = url.host_str().unwrap_or("");
        let path = url.path().trim_matches('/');
        if !path.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                Operation::Connect,
                format!("memory:// takes only a store name, as in memory://jobs; remove {path:?}"),
            ));
        }
        let name = if host.is_empty() { "default" } else { host };
        Ok(MemoryConfig {
            name: name.to_owned(),
        })
    }
}
