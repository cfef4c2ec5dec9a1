//! Waiting on the memory backend: each key has a [`tokio::sync::watch`] channel whose value is
//! bumped on every release. A waiter's receiver is created before its retry, so a release in
//! between is seen (no lost wake-up).

use async_trait::async_trait;
use tokio::sync::watch;

use crate::backend::Watch;
use crate::error::Result;

/// A subscription to one key's release counter.
#[derive(Debug)]
pub(crate) struct MemoryWatch {
    pub(crate) rx: watch::Receiver<u64>,
}

#[async_trait]
impl Watch for MemoryWatch {
    async fn changed(&mut self) -> Result<()> {
        // The sender lives in the key's entry, which is not removed while receivers exist.
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}
