//! `--mode memory`: what one held lock costs the process.
//!
//! Connects one client, takes and releases one lock (so connections, scripts and caches are in
//! place), reads `VmRSS`, then acquires `count` locks on distinct keys (16 acquisitions in
//! flight) with renewal on, waits until every lock was renewed once (or lost), and reads
//! `VmRSS` again. The growth per held lock includes the application's side of it: the
//! [`LockGuard`] itself, kept in a `Vec`. The locks are not released at the end: the process
//! exits and they expire with their lease (on SQLite, they are freed because the process is
//! gone).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fenced::{LockGuard, LockOptions};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Acquisitions in flight while filling.
const IN_FLIGHT: usize = 16;

/// `VmRSS` of this process in KiB.
fn vm_rss_kib() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS line in /proc/self/status".to_owned())
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Holds `count` locks on `url` (keys `PREFIX:mem:i`) with `lease` and reports the memory.
/// Acquiring, and waiting for the renewal round, may each take at most `limit`.
pub(crate) async fn run(
    url: &str,
    prefix: &str,
    count: usize,
    lease: Duration,
    limit: Duration,
) -> Result<Value, String> {
    let client = fenced::connect(url)
        .await
        .map_err(|e| format!("fenced::connect({url}): {e}"))?;
    let options = LockOptions::new()
        .lease(lease)
        .wait(Duration::from_secs(60));
    options.validate().map_err(|e| e.to_string())?;
    client
        .lock_with(format!("{prefix}:mem:warm"), &options)
        .await
        .map_err(|e| e.to_string())?
        .release()
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = vm_rss_kib()?;
    let tasks_before = alive_tasks();

    let started = Instant::now();
    let fill_deadline = started + limit;
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::with_capacity(IN_FLIGHT);
    for _ in 0..IN_FLIGHT {
        let client = client.clone();
        let options = options.clone();
        let next = next.clone();
        let errors = errors.clone();
        let prefix = prefix.to_owned();
        workers.push(tokio::spawn(async move {
            let mut held: Vec<(LockGuard, Instant)> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || Instant::now() >= fill_deadline {
                    return held;
                }
                match client
                    .lock_with(format!("{prefix}:mem:{i}"), &options)
                    .await
                {
                    Ok(guard) => {
                        let deadline = guard.deadline();
                        held.push((guard, deadline));
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("fenced-bench: acquire failed: {e}");
                        }
                    }
                }
            }
        }));
    }
    let mut held: Vec<(LockGuard, Instant)> = Vec::with_capacity(count);
    for worker in workers {
        held.extend(worker.await.map_err(|e| format!("a task failed: {e}"))?);
    }
    let acquire_s = started.elapsed().as_secs_f64();
    let filled = Instant::now();

    // Wait until every lock was renewed once (its deadline moved) or was lost.
    let renew_every = options.get_renew_every();
    let round_deadline = filled + renew_every + limit;
    let (mut renewed, mut lost);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        renewed = 0usize;
        lost = 0usize;
        for (guard, first) in &held {
            if guard.is_lost() {
                lost += 1;
            } else if guard.deadline() > *first {
                renewed += 1;
            }
        }
        if renewed + lost == held.len() || Instant::now() >= round_deadline {
            break;
        }
    }
    let round_s = filled.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_after = vm_rss_kib()?;
    let tasks_after = alive_tasks();
    let grown = rss_after.saturating_sub(rss_before) * 1024;
    let per_lock = if held.is_empty() {
        0
    } else {
        grown / held.len() as u64
    };
    let line = json!({
        "impl": "fenced",
        "version": env!("CARGO_PKG_VERSION"),
        "mode": "memory",
        "backend": client.backend().name(),
        "count": count,
        "held": held.len(),
        "errors": errors.load(Ordering::Relaxed),
        "acquire_s": acquire_s,
        "renewed": renewed,
        "lost": lost,
        "renewal_wait_s": round_s,
        "lease_ms": lease.as_millis() as u64,
        "renew_every_ms": renew_every.as_millis() as u64,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "bytes_per_lock": per_lock,
        "tokio_tasks_before": tasks_before,
        "tokio_tasks_after": tasks_after,
        "settings": format!(
            "one fenced::Client; {count} locks on distinct keys, {IN_FLIGHT} acquisitions in flight, \
             lease {} ms, renewal every {} ms by one watchdog task per lock; RSS after every lock \
             was renewed once (or lost, or the wait ran out); includes the LockGuards kept in a Vec",
            lease.as_millis(),
            renew_every.as_millis()
        ),
    });
    // The guards are dropped with the runtime shut down in the background: nothing is sent.
    std::mem::forget(held);
    Ok(line)
}
