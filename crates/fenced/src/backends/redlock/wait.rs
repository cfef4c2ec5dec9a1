//! Waiting on Redlock: each node's release notifications (the single-node backend's pub/sub
//! watch, one per node), counted so that one release wakes a waiter about once, not once per
//! node.
//!
//! A release publishes on every node that held the lock, and a holder that kept others out held
//! at least a majority, so a release reaches at least a majority of the nodes. The watch
//! therefore resolves once `threshold` different nodes (the node count minus the quorum, plus
//! one, which is at most a majority) notified since it last resolved. A release that reaches
//! fewer nodes (a contender giving back a minority after a split vote) does not wake waiters:
//! the holder information of a split vote carries a short random delay instead, after which the
//! waiter tries again (see `holder_of`). A node that was not connected when the watch was made
//! is left out; a lease that ends without a release wakes waiters by their timer, as everywhere.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use async_trait::async_trait;

use crate::backend::Watch;
use crate::error::Result;

/// The watch over all nodes.
pub(crate) struct RedlockWatch {
    nodes: Vec<Box<dyn Watch>>,
    /// Which nodes notified since the watch last resolved.
    fired: Vec<bool>,
    threshold: usize,
}

impl fmt::Debug for RedlockWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedlockWatch")
            .field("nodes", &self.nodes.len())
            .field("threshold", &self.threshold)
            .finish()
    }
}

impl RedlockWatch {
    pub(crate) fn new(nodes: Vec<Box<dyn Watch>>, threshold: usize) -> RedlockWatch {
        let fired = vec![false; nodes.len()];
        RedlockWatch {
            threshold: threshold.clamp(1, nodes.len().max(1)),
            nodes,
            fired,
        }
    }
}

#[async_trait]
impl Watch for RedlockWatch {
    /// Cancel safe: each node's watch is, and the nodes already counted stay counted.
    async fn changed(&mut self) -> Result<()> {
        if self.nodes.is_empty() {
            // No node could be watched: the waiter's timer does the work.
            return std::future::pending().await;
        }
        loop {
            let count = self.fired.iter().filter(|f| **f).count();
            if count >= self.threshold {
                self.fired.iter_mut().for_each(|f| *f = false);
                return Ok(());
            }
            let fired = &self.fired;
            let mut waiting: Vec<(usize, Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>)> =
                self.nodes
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| !fired[*i])
                    .map(|(i, node)| (i, node.changed()))
                    .collect();
            let (i, result) = std::future::poll_fn(|cx| {
                for (i, fut) in waiting.iter_mut() {
                    if let Poll::Ready(result) = fut.as_mut().poll(cx) {
                        return Poll::Ready((*i, result));
                    }
                }
                Poll::Pending
            })
            .await;
            drop(waiting);
            result?;
            self.fired[i] = true;
        }
    }
}
