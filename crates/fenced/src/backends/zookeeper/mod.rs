//! The ZooKeeper backend (being written: connecting fails with `Unsupported` until it lands).

use std::sync::Arc;

use crate::Backend;
use crate::error::{Error, ErrorKind, Operation, Result};

/// Opens the backend named by `url` (called by [`connect`](crate::connect)).
pub(crate) async fn open(_url: &url::Url) -> Result<Arc<dyn Backend>> {
    Err(Error::new(
        ErrorKind::Unsupported,
        Operation::Connect,
        "the ZooKeeper backend is not finished in this build of fenced",
    ))
}
