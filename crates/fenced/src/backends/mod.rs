//! The lock stores. Each backend lives in its own folder with the same files:
//!
//! - `mod.rs` — the [`Backend`](crate::Backend) implementation;
//! - `config.rs` — URL parameters and configuration;
//! - `wait.rs` — how waiters are woken;
//! - `README.md` — what the backend guarantees and what it does not (included as its docs).

#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "memory")]
pub mod memory;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "redlock")]
pub mod redlock;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "zookeeper")]
pub mod zookeeper;
