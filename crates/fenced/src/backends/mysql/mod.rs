//! Work in progress.
#![allow(missing_docs)]
use crate::backend::Backend;
use crate::error::{Error, ErrorKind, Operation, Result};
use std::sync::Arc;
pub(crate) async fn open(_url: &url::Url) -> Result<Arc<dyn Backend>> {
    Err(Error::new(
        ErrorKind::Unsupported,
        Operation::Connect,
        "not yet",
    ))
}
