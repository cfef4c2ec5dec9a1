//! The fenced proof suite: fault injection against real lock stores, a fenced resource, workers
//! that record histories, a checker, and the report behind `SAFETY.md`.
//!
//! Run everything with `scripts/proof`; one scenario with
//! `fenced-proof run --backend redis --scenario pause`.

pub mod checker;
pub mod history;
pub mod proxy;
pub mod report;
pub mod resource;
pub mod scenario;
pub mod server;
pub mod worker;
