//! One step on every node, polled together in the caller's task.
//!
//! A Redlock step (grant, raise, extend, release) sends one request to each node and takes the
//! answers as they come. The node requests are polled side by side in the task that runs the
//! step — no task per node — and one timer bounds them all: when the node timeout passes, every
//! node still out answers a timeout error. Dropping a round drops its requests; each node's
//! connection keeps the order of what was sent, so a release that follows reaches a node after
//! any request the round had sent it.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::error::{Error, ErrorKind, Operation, Result};

type NodeCall<T> = Pin<Box<dyn Future<Output = Result<T>> + Send>>;

/// The requests of one step still out, by node index.
pub(super) struct Round<T> {
    pending: Vec<(usize, String, NodeCall<T>)>,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    operation: Operation,
}

impl<T: Send + 'static> Round<T> {
    /// An empty round whose requests must answer within `timeout` from now.
    pub(super) fn new(timeout: Duration, operation: Operation, nodes: usize) -> Self {
        Round {
            pending: Vec::with_capacity(nodes),
            deadline: Box::pin(tokio::time::sleep_until(Instant::now() + timeout)),
            timeout,
            operation,
        }
    }

    /// Adds node `index`'s request; `shown` names the node in a timeout error (no password).
    pub(super) fn push(
        &mut self,
        index: usize,
        shown: String,
        call: impl Future<Output = Result<T>> + Send + 'static,
    ) {
        self.pending.push((index, shown, Box::pin(call)));
    }

    /// How many requests are still out.
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    /// The next answer, in the order they come; `None` once every node answered.
    pub(super) async fn next(&mut self) -> Option<(usize, Result<T>)> {
        if self.pending.is_empty() {
            return None;
        }
        poll_fn(|cx| {
            for at in 0..self.pending.len() {
                if let Poll::Ready(answer) = self.pending[at].2.as_mut().poll(cx) {
                    let (index, _, _) = self.pending.swap_remove(at);
                    return Poll::Ready(Some((index, answer)));
                }
            }
            if self.deadline.as_mut().poll(cx).is_ready() {
                let (index, shown, _) = self.pending.swap_remove(0);
                let e = Error::new(
                    ErrorKind::Backend,
                    self.operation,
                    format!(
                        "the node {shown} did not answer within node_timeout={:?}",
                        self.timeout
                    ),
                )
                .transient(true);
                return Poll::Ready(Some((index, Err(e))));
            }
            Poll::Pending
        })
        .await
    }
}
