//! The raw floors: the bare operations fenced needs, written directly with the same client
//! library and no fenced code, measured by the same loops as fenced.
//!
//! They are floors, not lock libraries: no fencing tokens on Redis, no renewal, no retries, no
//! lost-lock signal, no cancel safety. Each floor states in its `settings` exactly what it
//! sends and how it waits.

mod etcd;
mod memory;
mod mysql;
mod postgres;
mod redis;
mod sqlite;
mod zookeeper;

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use crate::{Mode, Plan};

/// Runs `plan` on the floor for the store named by `url`.
pub(crate) async fn measure(url: &str, plan: &Plan) -> Result<Value, String> {
    let handoff = plan.mode == Mode::Handoff;
    if url.starts_with("memory:") {
        crate::run::measure(memory::MemoryFloor::new(plan.lease), plan).await
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or(path).to_owned();
        let floor = sqlite::SqliteFloor::open(&path, plan.lease, handoff)?;
        crate::run::measure(floor, plan).await
    } else if url.starts_with("redis://") {
        let channel_key = handoff.then(|| format!("{}:handoff", plan.prefix));
        let floor = redis::RedisFloor::connect(url, plan.lease, channel_key).await?;
        crate::run::measure(floor, plan).await
    } else if url.starts_with("redis+cluster://") {
        if handoff {
            return Err(
                "the Redis Cluster floor measures latency and throughput, not handoff".to_owned(),
            );
        }
        let floor = redis::RedisFloor::connect_cluster(url, plan.lease).await?;
        crate::run::measure(floor, plan).await
    } else if url.starts_with("etcd://") {
        let floor = etcd::EtcdFloor::connect(url, plan.lease, handoff).await?;
        crate::run::measure(floor, plan).await
    } else if url.starts_with("zk://") {
        let floor = zookeeper::ZkFloor::connect(url, plan.lease, handoff).await?;
        crate::run::measure(floor, plan).await
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let channel = format!("floor_{}", plan.prefix);
        let floor = postgres::PgFloor::connect(url, plan.lease, handoff, channel).await?;
        crate::run::measure(floor, plan).await
    } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        let floor = mysql::MysqlFloor::connect(url, plan.lease, handoff).await?;
        crate::run::measure(floor, plan).await
    } else {
        Err(format!(
            "no floor for {url}; use memory://, sqlite:///path, redis://host:port, \
             redis+cluster://host:port[,host:port…], etcd://host:port, zk://host:port, \
             postgres://user@host:port/db[?mode=session] or mysql://user@host:port/db[?mode=session]"
        ))
    }
}

/// 64-bit FNV-1a of a key: the SQL floors' lock id (PostgreSQL's advisory lock id, MySQL's
/// named lock).
fn fnv1a(key: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Owner values unique on this machine while the process lives: the pid and a counter.
#[derive(Debug)]
struct Owners {
    pid: u32,
    next: AtomicU64,
}

impl Owners {
    fn new() -> Owners {
        Owners {
            pid: std::process::id(),
            next: AtomicU64::new(0),
        }
    }

    /// A fresh owner value.
    fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}:{n}", self.pid)
    }
}
