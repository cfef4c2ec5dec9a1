//! Wrappers that are themselves [`Backend`](crate::Backend)s and add one cross-cutting concern.

mod counting;

pub use counting::{CallCounts, Counting};
