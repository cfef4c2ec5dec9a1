//! The conformance checks. Each is a public async function taking a [`Harness`]; every backend's
//! tests run all of them through [`conformance_tests!`](crate::conformance_tests).
//!
//! No check asserts on wall-clock durations. Waits are bounded by generous guards
//! ([`within`]) so a hang fails loudly; assertions are on counts, tokens and ordering.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use fenced::layers::{CallCounts, Counting};
use fenced::{Client, ErrorKind, LockOptions, LostReason, OwnerId, RetryPolicy, Safety};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

use crate::critical::Section;
use crate::{Harness, connect, unique_key, within};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

fn cross_process(client: &Client) -> bool {
    client.capabilities().safety != Safety::InProcess
}

/// A client whose backend calls are counted.
fn counted(client: &Client) -> (Client, Arc<CallCounts>) {
    let counting = Counting::new(client.backend().clone());
    let counts = counting.counts();
    (
        Client::from_arc(Arc::new(counting), LockOptions::new()),
        counts,
    )
}

/// Lock, contention with holder information, release, re-acquire with a higher token.
pub async fn basics(h: &Harness) {
    let a = h.client().await;
    let b = h.client().await;
    let key = unique_key("basics");
    let options = LockOptions::new().label("conformance holder a");
    let guard = within(10, "first acquire", a.lock_with(&key, &options))
        .await
        .expect("acquire");
    assert_eq!(guard.key().as_str(), key);
    assert!(!guard.is_lost());
    assert!(guard.remaining() > Duration::ZERO);

    assert!(
        b.try_lock(&key).await.expect("try_lock").is_none(),
        "a held lock was granted twice"
    );
    let err = b
        .lock_with(&key, &LockOptions::new().wait(ms(200)))
        .await
        .expect_err("a held lock was granted to a waiter");
    assert_eq!(err.kind(), ErrorKind::NotAcquired, "{err}");
    let holder = err.holder().expect("the error names the holder");
    if let Some(label) = &holder.label {
        assert_eq!(label, "conformance holder a");
    }
    if let Some(token) = holder.token {
        assert_eq!(token, guard.token());
    }
    let info = b
        .holder(&key)
        .await
        .expect("holder")
        .expect("someone holds it");
    if let Some(owner) = info.owner {
        assert_eq!(owner, guard.owner());
    }

    let first = guard.token();
    guard.release().await.expect("release");
    assert!(
        b.holder(&key).await.expect("holder").is_none(),
        "released lock still has a holder"
    );
    let again = b
        .try_lock(&key)
        .await
        .expect("try_lock")
        .expect("free lock not granted");
    assert!(
        again.token() > first,
        "token did not increase: {} then {}",
        first,
        again.token()
    );
    again.release().await.expect("release");
}

/// Many tasks — in this process and, for shared stores, in two worker processes — increment a
/// shared counter through a read-sleep-write critical section: the count is exact, nobody met
/// inside, and tokens increase in the order holders entered.
pub async fn mutual_exclusion(h: &Harness) {
    let dir = tempfile::tempdir().expect("tempdir");
    let section = Section::new(dir.path());
    section.init().expect("init section");
    let key = unique_key("mutex");
    let client = h.client().await;
    let (tasks, iterations) = (4u64, 25u64);
    let mut expected = tasks * iterations;

    let mut workers = Vec::new();
    if cross_process(&client) {
        for _ in 0..2 {
            let child = Command::new(h.worker())
                .args(["count", h.url(), &key])
                .arg(dir.path())
                .args(["2", &iterations.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn worker");
            workers.push(child);
            expected += 2 * iterations;
        }
    }
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (client, key, section) = (client.clone(), key.clone(), section.clone());
        handles.push(tokio::spawn(async move {
            let options = LockOptions::new().wait(secs(120)).lease(secs(10));
            for _ in 0..iterations {
                let guard = client.lock_with(&key, &options).await.expect("acquire");
                section
                    .enter(guard.token().get(), ms(1))
                    .await
                    .expect("critical section");
                guard.release().await.expect("release");
            }
        }));
    }
    within(240, "all in-process tasks finishing", async {
        for h in handles {
            h.await.expect("task panicked");
        }
    })
    .await;
    for child in workers {
        let out = within(240, "worker process finishing", child.wait_with_output())
            .await
            .expect("worker");
        assert!(
            out.status.success(),
            "worker failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        section.overlaps(),
        Vec::<String>::new(),
        "holders overlapped"
    );
    assert_eq!(section.count(), expected, "increments were lost");
    let tokens = section.tokens();
    assert_eq!(tokens.len() as u64, expected);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens did not strictly increase in grant order: {tokens:?}"
    );
}

/// Tokens strictly increase across grants, across clients dropped and re-created, and across
/// processes.
pub async fn fencing_tokens_increase(h: &Harness) {
    let key = unique_key("tokens");
    let mut last = 0u64;
    let mut check = |token: u64, what: &str| {
        assert!(
            token > last,
            "{what}: token {token} is not above the previous {last}"
        );
        last = token;
    };
    for _ in 0..3 {
        let client = h.client().await;
        let guard = client.lock(&key).await.expect("acquire");
        check(guard.token().get(), "new client");
        guard.release().await.expect("release");
        drop(client);
    }
    let client = h.client().await;
    if cross_process(&client) {
        for _ in 0..2 {
            let out = within(
                60,
                "token worker",
                Command::new(h.worker())
                    .args(["token", h.url(), &key])
                    .output(),
            )
            .await
            .expect("worker");
            assert!(
                out.status.success(),
                "worker failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            let token: u64 = stdout
                .trim()
                .strip_prefix("token ")
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("worker printed {stdout:?}"));
            check(token, "other process");
        }
    }
    // A lock that expires (instead of being released) also never gives its token again.
    let short = LockOptions::new().lease(ms(200)).renew(false);
    let guard = client.lock_with(&key, &short).await.expect("acquire");
    check(guard.token().get(), "short lease");
    within(10, "short lease expiring", guard.lost()).await;
    std::mem::forget(guard);
    let guard = within(
        10,
        "acquire after expiry",
        client.lock_with(&key, &LockOptions::new().wait(secs(10))),
    )
    .await
    .expect("acquire after expiry");
    check(guard.token().get(), "after expiry");
    guard.release().await.expect("release");
}

/// A holder that dies without releasing (kill -9 of its process, or its runtime gone in-process)
/// stops renewing; its lease runs out and a waiter gets the lock with a higher token.
pub async fn crashed_holder_expires(h: &Harness) {
    let key = unique_key("crash");
    let client = h.client().await;
    let lease_ms = 1000u64;
    let crashed_token = if cross_process(&client) {
        let mut child = Command::new(h.worker())
            .args(["hold", h.url(), &key, &lease_ms.to_string()])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn holder");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = within(30, "holder process acquiring", lines.next_line())
            .await
            .expect("read")
            .expect("holder exited early");
        let token: u64 = line
            .strip_prefix("granted ")
            .and_then(|t| t.parse().ok())
            .expect("token line");
        assert!(
            client.try_lock(&key).await.expect("try_lock").is_none(),
            "lock not held by the worker"
        );
        child.start_kill().expect("kill -9");
        child.wait().await.expect("reap");
        token
    } else {
        let url = h.url().to_owned();
        let key2 = key.clone();
        let token = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            let token = runtime.block_on(async {
                let client = connect(&url).await;
                let guard = client
                    .lock_with(&key2, &LockOptions::new().lease(ms(lease_ms)))
                    .await
                    .expect("acquire");
                let token = guard.token().get();
                std::mem::forget(guard);
                token
            });
            drop(runtime); // the watchdog dies with the runtime, like a crashed process
            token
        })
        .join()
        .expect("holder thread");
        assert!(
            client.try_lock(&key).await.expect("try_lock").is_none(),
            "lock not held by the crashed holder"
        );
        token
    };
    let guard = within(
        30,
        "waiter acquiring after the holder crashed",
        client.lock_with(&key, &LockOptions::new().wait(secs(30))),
    )
    .await
    .expect("acquire after crash");
    assert!(guard.token().get() > crashed_token);
    guard.release().await.expect("release");
}

/// With renewal on, a holder keeps its lock across several leases; nobody else gets it.
pub async fn renewal_keeps_lock(h: &Harness) {
    let key = unique_key("renew");
    let a = h.client().await;
    let b = h.client().await;
    let lease = secs(1);
    let guard = a
        .lock_with(&key, &LockOptions::new().lease(lease))
        .await
        .expect("acquire");
    let until = Instant::now() + lease * 4;
    let mut checks = 0;
    while Instant::now() < until {
        assert!(
            b.try_lock(&key).await.expect("try_lock").is_none(),
            "renewed lock was granted to another owner"
        );
        assert!(
            !guard.is_lost(),
            "renewed lock reported lost: {:?}",
            guard.lost_signal().reason()
        );
        checks += 1;
        tokio::time::sleep(lease / 4).await;
    }
    assert!(checks >= 5);
    guard
        .release()
        .await
        .expect("release after renewals: still the owner");
}

/// Deleting the key behind the holder's back fires `lost()`, and `with_lock` cancels the work and
/// returns a `Lost` error.
pub async fn lost_on_delete_cancels_work(h: &Harness) {
    let key = unique_key("lost-delete");
    let a = h.client().await;
    let admin = h.client().await;
    let options = LockOptions::new().lease(ms(1500));
    let guard = a.lock_with(&key, &options).await.expect("acquire");
    let broken = admin
        .force_release(&key)
        .await
        .expect("force release")
        .expect("it was held");
    if let Some(token) = broken.token {
        assert_eq!(token, guard.token());
    }
    let reason = within(10, "lost() after the key was deleted", guard.lost()).await;
    assert!(
        matches!(reason, LostReason::NotHeld | LostReason::TakenOver),
        "{reason:?}"
    );
    let err = guard
        .release()
        .await
        .expect_err("release of a deleted lock succeeded");
    assert_eq!(err.kind(), ErrorKind::Lost);

    let dropped = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let work = {
        let (a, key, dropped) = (a.clone(), key.clone(), dropped.clone());
        tokio::spawn(async move {
            a.with_lock(&key, &options, |_lock| async move {
                struct SetOnDrop(Arc<AtomicBool>);
                impl Drop for SetOnDrop {
                    fn drop(&mut self) {
                        self.0.store(true, Ordering::SeqCst);
                    }
                }
                let _flag = SetOnDrop(dropped);
                let _ = started_tx.send(());
                std::future::pending::<()>().await;
            })
            .await
        })
    };
    within(10, "work starting", started_rx)
        .await
        .expect("work started");
    admin
        .force_release(&key)
        .await
        .expect("force release")
        .expect("it was held");
    let result = within(10, "with_lock returning after the lock was lost", work)
        .await
        .expect("task");
    let err = result.expect_err("with_lock returned Ok although the lock was lost");
    assert_eq!(err.kind(), ErrorKind::Lost, "{err}");
    assert!(err.lost_reason().is_some());
    assert!(dropped.load(Ordering::SeqCst), "the work was not cancelled");
}

/// When another owner takes the lock, the former holder's `lost()` fires and its release is
/// rejected without touching the new holder.
pub async fn lost_on_takeover(h: &Harness) {
    let key = unique_key("takeover");
    let a = h.client().await;
    let b = h.client().await;
    let guard = a
        .lock_with(&key, &LockOptions::new().lease(ms(1500)))
        .await
        .expect("acquire");
    b.force_release(&key).await.expect("force release");
    let thief = within(
        10,
        "taking over",
        b.lock_with(&key, &LockOptions::new().wait(secs(10))),
    )
    .await
    .expect("acquire after break");
    assert!(thief.token() > guard.token());
    let reason = within(10, "lost() after takeover", guard.lost()).await;
    assert!(
        matches!(reason, LostReason::TakenOver | LostReason::NotHeld),
        "{reason:?}"
    );
    let err = guard
        .release()
        .await
        .expect_err("former holder released a lock it lost");
    assert_eq!(err.kind(), ErrorKind::Lost);
    assert!(
        a.try_lock(&key).await.expect("try_lock").is_none(),
        "the new holder's lock was touched"
    );
    thief
        .release()
        .await
        .expect("new holder still owns the lock");
}

/// The maximum hold time fires `lost()` even while renewal works, and frees the lock.
pub async fn max_hold_is_a_hard_cap(h: &Harness) {
    let key = unique_key("max-hold");
    let a = h.client().await;
    let b = h.client().await;
    let options = LockOptions::new().lease(secs(5)).max_hold(ms(500));
    let guard = a.lock_with(&key, &options).await.expect("acquire");
    let reason = within(10, "lost() at the maximum hold time", guard.lost()).await;
    assert_eq!(reason, LostReason::MaxHoldExceeded);
    let next = within(
        10,
        "acquire after max hold",
        b.lock_with(&key, &LockOptions::new().wait(secs(10))),
    )
    .await
    .expect("acquire");
    assert!(next.token() > guard.token());
    next.release().await.expect("release");
    drop(guard);
}

/// Release by a non-owner, or by a former holder after expiry and re-grant, is rejected and
/// leaves the current holder untouched.
pub async fn non_owner_release_rejected(h: &Harness) {
    let a = h.client().await;
    let b = h.client().await;
    let key = unique_key("non-owner");
    let guard = a.lock(&key).await.expect("acquire");
    let err = b
        .unlock(&key, &OwnerId::random())
        .await
        .expect_err("stranger released the lock");
    assert_eq!(err.kind(), ErrorKind::NotOwner, "{err}");
    assert!(
        b.try_lock(&key).await.expect("try_lock").is_none(),
        "holder's lock was touched"
    );
    b.unlock(&key, &guard.owner())
        .await
        .expect("the owner id releases");
    assert!(
        guard.release().await.is_err(),
        "double release reported success"
    );

    let key = unique_key("expired-owner");
    let stale = a
        .lock_with(&key, &LockOptions::new().lease(ms(300)).renew(false))
        .await
        .expect("acquire");
    assert_eq!(
        within(10, "lease expiring", stale.lost()).await,
        LostReason::Expired
    );
    let fresh = within(
        10,
        "re-grant",
        b.lock_with(&key, &LockOptions::new().wait(secs(10))),
    )
    .await
    .expect("re-grant");
    assert!(fresh.token() > stale.token());
    let err = stale
        .release()
        .await
        .expect_err("expired holder released the new holder's lock");
    assert_eq!(err.kind(), ErrorKind::Lost);
    assert!(
        a.try_lock(&key).await.expect("try_lock").is_none(),
        "new holder's lock was touched"
    );
    fresh.release().await.expect("new holder releases");
}

/// The guard's deadline counts from the grant, not from the start of a long wait.
pub async fn deadline_counts_from_grant(h: &Harness) {
    let key = unique_key("deadline");
    let a = h.client().await;
    let b = h.client().await;
    let holder = a.lock(&key).await.expect("acquire");
    let lease = secs(10);
    let started = Instant::now();
    let waiter = {
        let (b, key) = (b.clone(), key.clone());
        tokio::spawn(async move {
            b.lock_with(&key, &LockOptions::new().lease(lease).wait(secs(30)))
                .await
        })
    };
    tokio::time::sleep(ms(400)).await;
    let released_at = Instant::now();
    holder.release().await.expect("release");
    let guard = within(30, "waiter acquiring", waiter)
        .await
        .expect("task")
        .expect("acquire");
    assert!(
        guard.granted_at() >= released_at,
        "grant instant taken before the lock was free"
    );
    assert!(guard.granted_at() > started);
    // A backend that cannot promise long leases (session-bound) grants at most its maximum.
    let lease = b
        .capabilities()
        .max_lease
        .map_or(lease, |max| lease.min(max));
    let drift = lease / 100 + ms(2);
    assert_eq!(guard.deadline(), guard.granted_at() + lease - drift);
    guard.release().await.expect("release");
}

/// Dropping acquire and release futures at random points — while another client contends for
/// the key, so acquisitions are cut mid-wait too — never leaves a lock held beyond its lease
/// (and never leaves a watchdog renewing it).
pub async fn cancel_safety(h: &Harness) {
    let key = unique_key("cancel");
    let client = h.client().await;
    let lease = secs(1);
    let options = LockOptions::new().lease(lease).wait(secs(10));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let contender = {
        let (other, key, options) = (h.client().await, key.clone(), options.clone());
        tokio::spawn(async move {
            let mut started = Some(started_tx);
            loop {
                if let Ok(guard) = other.lock_with(&key, &options).await {
                    if let Some(tx) = started.take() {
                        let _ = tx.send(());
                    }
                    tokio::time::sleep(Duration::from_micros(rand::random_range(0..3000))).await;
                    let _ = guard.release().await;
                }
                tokio::time::sleep(Duration::from_micros(rand::random_range(0..1000))).await;
            }
        })
    };
    within(10, "contender acquiring", started_rx)
        .await
        .expect("contender started");
    let (mut granted, mut cut) = (0, 0);
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_micros(rand::random_range(0..1000))).await;
        let limit = Duration::from_micros(rand::random_range(0..4000));
        match tokio::time::timeout(limit, client.lock_with(&key, &options)).await {
            Ok(result) => {
                let guard = result.expect("acquire");
                granted += 1;
                let limit = Duration::from_micros(rand::random_range(0..2000));
                let _ = tokio::time::timeout(limit, guard.release()).await;
            }
            Err(_) => cut += 1,
        }
    }
    eprintln!("cancel_safety: {granted} acquisitions completed, {cut} cut short");
    // Cut the contender short as well, wherever it is.
    contender.abort();
    let _ = contender.await;
    // Whatever was cut short, the lock must become free within one lease.
    let other = h.client().await;
    let guard = within(
        30,
        "acquire after cancelled operations",
        other.lock_with(&key, &LockOptions::new().wait(lease * 5)),
    )
    .await
    .unwrap_or_else(|e| {
        panic!("a cancelled operation left the lock stuck ({granted} grants, {cut} cut): {e}")
    });
    guard.release().await.expect("release");
}

/// Acquisitions dropped while their request is on the wire leave nothing behind. The request
/// and the client's background clean-up may travel on different streams or pooled connections,
/// which the server may apply in either order; a grant applied after its clean-up would stay
/// until its lease ends (for ever on a session-bound backend whose session lives on). The lease
/// here is longer than the check waits, so a grant left behind is seen.
pub async fn cancelled_acquisitions_leave_nothing(h: &Harness) {
    let prefix = unique_key("dropped");
    let client = h.client().await;
    let options = LockOptions::new().lease(secs(120)).wait(secs(5));
    let (mut granted, mut cut) = (0, 0);
    for i in 0..400 {
        let key = format!("{prefix}:{i}");
        let acquiring = client.lock_with(&key, &options);
        // Every fourth is dropped right after its first poll (however fast the backend), the
        // others at a random point within the first 1.5 ms.
        let outcome = if i % 4 == 0 {
            tokio::select! {
                biased;
                guard = acquiring => Some(guard),
                () = std::future::ready(()) => None,
            }
        } else {
            let limit = Duration::from_micros(rand::random_range(0..1500));
            tokio::time::timeout(limit, acquiring).await.ok()
        };
        match outcome {
            Some(guard) => {
                granted += 1;
                guard.expect("acquire").release().await.expect("release");
            }
            None => cut += 1,
        }
    }
    eprintln!("cancelled_acquisitions_leave_nothing: {granted} completed, {cut} cut short");
    // The in-memory store answers within the first poll: nothing of it can be cut mid-request.
    let in_process = client.capabilities().safety == Safety::InProcess;
    assert!(
        cut > 0 || in_process,
        "no acquisition was cut short: the check proved nothing"
    );
    // The clean-ups run in the background; each ends within a request timeout or two.
    let mut left = Vec::new();
    for _ in 0..600 {
        left = client.list(&prefix).await.expect("list");
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(ms(50)).await;
    }
    let keys: Vec<_> = left.iter().filter_map(|h| h.key.as_ref()).collect();
    assert!(
        left.is_empty(),
        "{} cancelled acquisitions left a grant behind: {keys:?}",
        left.len()
    );
}

/// While waiters wait on a held key, the backend sees no traffic that grows with time or with
/// the number of waiters; each release wakes one waiter per client, not all of them.
pub async fn waiting_is_notification_driven(h: &Harness) {
    let url = h
        .counting()
        .map_or(h.url(), |(url, _)| url.as_str())
        .to_owned();
    let server = h.counting().map(|(_, counter)| counter.clone());
    let key = unique_key("herd");
    let holder_client = connect(&url).await;
    let holder = holder_client
        .lock_with(&key, &LockOptions::new().lease(secs(30)))
        .await
        .expect("acquire");

    let per_client = 16u64;
    let clients = 2u64;
    let granted = Arc::new(AtomicU64::new(0));
    let mut all_counts = Vec::new();
    let mut handles = Vec::new();
    let server_before = match &server {
        Some(c) => Some(c().await),
        None => None,
    };
    for _ in 0..clients {
        let (client, counts) = counted(&connect(&url).await);
        all_counts.push(counts);
        for _ in 0..per_client {
            let (client, key, granted) = (client.clone(), key.clone(), granted.clone());
            handles.push(tokio::spawn(async move {
                let options = LockOptions::new().wait(secs(120)).lease(secs(30));
                let guard = client
                    .lock_with(&key, &options)
                    .await
                    .expect("waiter acquire");
                granted.fetch_add(1, Ordering::SeqCst);
                guard.release().await.expect("waiter release");
            }));
        }
    }
    let total = |f: fn(&CallCounts) -> u64| all_counts.iter().map(|c| f(c)).sum::<u64>();
    // Wait until every client has its remote waiter subscribed.
    within(30, "waiters subscribing", async {
        while total(|c| c.watch.load(Ordering::SeqCst)) < clients {
            tokio::time::sleep(ms(20)).await;
        }
    })
    .await;
    tokio::time::sleep(ms(500)).await;
    let settled = total(CallCounts::total);
    let server_settled = match &server {
        Some(c) => Some(c().await),
        None => None,
    };
    assert!(
        settled <= 4 * clients,
        "{settled} backend calls for {} waiters on {clients} clients: waiting costs more than a constant per client",
        clients * per_client
    );
    tokio::time::sleep(secs(3)).await;
    let later = total(CallCounts::total);
    assert!(
        later <= settled + clients,
        "backend calls grew from {settled} to {later} while nothing changed: waiting polls"
    );
    if let (Some(counter), Some(before), Some(settled_at)) =
        (&server, server_before, server_settled)
    {
        let now = counter().await;
        assert!(
            settled_at - before <= 8 * clients + 4,
            "the server ran {} commands while {} waiters settled",
            settled_at - before,
            clients * per_client
        );
        assert!(
            now - settled_at <= 3,
            "the server ran {} commands in 3 s while waiters waited: waiting polls",
            now - settled_at
        );
    }
    assert_eq!(granted.load(Ordering::SeqCst), 0);
    holder.release().await.expect("release");
    within(120, "all waiters acquiring in turn", async {
        for h in handles {
            h.await.expect("waiter panicked");
        }
    })
    .await;
    let releases = clients * per_client + 1;
    let wakeups = total(|c| c.wakeups.load(Ordering::SeqCst));
    assert!(
        wakeups <= 4 * releases + 4,
        "{wakeups} wake-ups for {releases} releases: releases wake many waiters (thundering herd)"
    );
}

/// Every bad input yields the documented error before any I/O.
pub async fn bad_input_no_io(h: &Harness) {
    let url = h
        .counting()
        .map_or(h.url(), |(url, _)| url.as_str())
        .to_owned();
    let server = h.counting().map(|(_, counter)| counter.clone());
    let (client, counts) = counted(&connect(&url).await);
    let guard = client.lock(unique_key("bad-input")).await.expect("acquire");
    tokio::time::sleep(ms(50)).await;
    let calls_before = counts.total();
    let server_before = match &server {
        Some(c) => Some(c().await),
        None => None,
    };

    let long_key = "k".repeat(fenced::MAX_KEY_LEN + 1);
    let bad_keys = ["", "line\nbreak", "nul\0", long_key.as_str()];
    for key in bad_keys {
        let e = client.lock(key).await.expect_err("bad key accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidKey, "{e}");
        let e = client.try_lock(key).await.expect_err("bad key accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidKey, "{e}");
        let e = client.holder(key).await.expect_err("bad key accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidKey, "{e}");
        let e = client
            .force_release(key)
            .await
            .expect_err("bad key accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidKey, "{e}");
        let e = client
            .unlock(key, &OwnerId::random())
            .await
            .expect_err("bad key accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidKey, "{e}");
        let e = client
            .with_lock(key, &LockOptions::new(), |_| async {})
            .await
            .expect_err("bad key accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidKey, "{e}");
    }
    let bad_options = [
        LockOptions::new().lease(Duration::ZERO),
        LockOptions::new().lease(ms(5)),
        LockOptions::new().lease(secs(30 * 24 * 3600)),
        LockOptions::new().wait(secs(10 * 365 * 24 * 3600)),
        LockOptions::new().max_hold(Duration::ZERO),
        LockOptions::new()
            .renew(false)
            .lease(secs(1))
            .max_hold(secs(60)),
        LockOptions::new().renew_every(secs(29)),
        LockOptions::new().label("two\nlines"),
        LockOptions::new().retry(RetryPolicy::new().backoff(Duration::ZERO, Duration::ZERO)),
    ];
    for options in &bad_options {
        let e = client
            .lock_with("fine-key", options)
            .await
            .expect_err("bad options accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{options:?}: {e}");
        let e = client
            .with_lock("fine-key", options, |_| async {})
            .await
            .expect_err("bad options accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    }
    for lease in [Duration::ZERO, ms(1), secs(365 * 24 * 3600)] {
        let e = guard
            .extend(lease)
            .await
            .expect_err("bad extension accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    }
    let e = "not-an-owner"
        .parse::<OwnerId>()
        .expect_err("bad owner id accepted");
    assert_eq!(e.kind(), ErrorKind::InvalidConfig);

    assert_eq!(
        counts.total(),
        calls_before,
        "bad input reached the backend"
    );
    if let (Some(counter), Some(before)) = (&server, server_before) {
        assert_eq!(counter().await, before, "bad input reached the server");
    }
    assert!(!guard.is_lost());
    guard.release().await.expect("release");
}

/// `list(prefix)` shows exactly the locks held under `prefix` — keys with characters that
/// backends escape or treat as patterns included — sorted by key, with their tokens, labels,
/// owners, remaining lease and age; released locks disappear and other prefixes never show.
///
/// The age is checked by ordering only: it is at most the time since just before the grant was
/// asked for, and at least the time from the grant's reply to the listing, less 2 ms (backends
/// may read both ends in whole milliseconds, rounded down).
pub async fn list_shows_holders(h: &Harness) {
    const ROUNDING: Duration = Duration::from_millis(2);
    let a = h.client().await;
    let b = h.client().await;
    let base = unique_key("list");
    let prefix = format!("{base}/k*?[x] {{%\\");
    // The prefix itself is a key too, and "1" is a prefix of "1 2".
    let suffixes = [
        "", "1", "1 2", "{tag}", "}{", "50%", "%7B", "*", "?", "[ab]", "\\", " ", "_",
    ];
    // Held, never listed under `prefix`: a key one character short of it, keys that `prefix`
    // would match as a glob (SCAN MATCH) or LIKE pattern, one that differs in case only.
    let decoys = [
        format!("{base}/k*?[x] {{%"),
        format!("{base}/kZZx {{%\\"),
        format!("{base}/k*?[x] {{A\\"),
        format!("{base}/K*?[x] {{%\\"),
        format!("{base}/other"),
    ];
    let lease = secs(30);
    let options = |label: &str| LockOptions::new().lease(lease).label(label);

    struct Held {
        guard: fenced::LockGuard,
        label: String,
        before: Instant,
        after: Instant,
    }
    let mut held = Vec::new();
    for (i, suffix) in suffixes.iter().enumerate() {
        let key = format!("{prefix}{suffix}");
        let label = format!("list holder {i}");
        let client = if i % 2 == 0 { &a } else { &b };
        let before = Instant::now();
        let guard = within(10, "acquire", client.lock_with(&key, &options(&label)))
            .await
            .unwrap_or_else(|e| panic!("acquire {key:?}: {e}"));
        held.push(Held {
            guard,
            label,
            before,
            after: Instant::now(),
        });
    }
    let mut decoy_guards = Vec::new();
    for key in &decoys {
        decoy_guards.push(a.lock_with(key, &options("decoy")).await.expect("acquire"));
    }
    // Let the locks age a little, so that an age that is not measured shows.
    tokio::time::sleep(ms(50)).await;

    let admin = h.client().await;
    let check = |listed: &[fenced::HolderInfo],
                 held: &[Held],
                 sent: Instant,
                 done: Instant,
                 what: &str| {
        let mut expected: Vec<&Held> = held.iter().collect();
        expected.sort_by(|x, y| x.guard.key().cmp(y.guard.key()));
        let keys: Vec<&str> = listed
            .iter()
            .map(|i| i.key.as_ref().map_or("<no key>", |k| k.as_str()))
            .collect();
        let want: Vec<&str> = expected.iter().map(|e| e.guard.key().as_str()).collect();
        assert_eq!(keys, want, "{what}: listed keys");
        for (info, e) in listed.iter().zip(&expected) {
            let key = e.guard.key().as_str();
            assert_eq!(
                info.token,
                Some(e.guard.token()),
                "{what}: token of {key:?}"
            );
            assert_eq!(
                info.owner,
                Some(e.guard.owner()),
                "{what}: owner of {key:?}"
            );
            assert_eq!(
                info.label.as_deref(),
                Some(e.label.as_str()),
                "{what}: label of {key:?}"
            );
            let remaining = info.remaining.expect("list reports the remaining lease");
            assert!(
                remaining > Duration::ZERO && remaining <= lease,
                "{what}: {key:?} has {remaining:?} left of a {lease:?} lease"
            );
            if let Some(age) = info.age {
                assert!(
                    age <= done - e.before,
                    "{what}: {key:?} is {age:?} old, but was asked for {:?} before the listing ended",
                    done - e.before
                );
                assert!(
                    age + ROUNDING >= sent - e.after,
                    "{what}: {key:?} is {age:?} old, but was granted {:?} before the listing began",
                    sent - e.after
                );
            }
        }
    };

    let sent = Instant::now();
    let first = within(30, "list", admin.list(&prefix)).await.expect("list");
    let done = Instant::now();
    check(&first, &held, sent, done, "first listing");
    let age_of = |listed: &[fenced::HolderInfo], key: &fenced::Key| {
        listed
            .iter()
            .find(|i| i.key.as_ref() == Some(key))
            .and_then(|i| i.age)
    };

    // A renewal keeps the grant: the age goes on. Released locks disappear.
    held[1].guard.extend(lease).await.expect("extend");
    let gone: Vec<Held> = vec![held.remove(0), held.remove(2)];
    for g in gone {
        g.guard.release().await.expect("release");
    }
    let sent = Instant::now();
    let second = within(30, "list", admin.list(&prefix)).await.expect("list");
    let done = Instant::now();
    check(
        &second,
        &held,
        sent,
        done,
        "after renewing one lock and releasing two",
    );
    for e in &held {
        if let (Some(before), Some(now)) = (
            age_of(&first, e.guard.key()),
            age_of(&second, e.guard.key()),
        ) {
            assert!(
                now >= before,
                "{:?}: the age went from {before:?} back to {now:?}",
                e.guard.key()
            );
        }
    }

    // Nothing under a prefix nobody uses.
    assert_eq!(
        admin.list(&format!("{base}/nothing")).await.expect("list"),
        Vec::new()
    );
    // Under the common prefix: the remaining keys and the decoys, sorted; "" lists them too.
    let mut expected: Vec<String> = held
        .iter()
        .map(|e| e.guard.key().as_str().to_owned())
        .chain(decoys.iter().cloned())
        .collect();
    expected.sort_unstable();
    let listed: Vec<String> = admin
        .list(&format!("{base}/"))
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.key.expect("key").as_str().to_owned())
        .collect();
    assert_eq!(listed, expected);
    let everything = within(60, "list everything", admin.list(""))
        .await
        .expect("list");
    assert!(
        everything.windows(2).all(|w| w[0].key < w[1].key),
        "list(\"\") is not sorted by key, or repeats a key"
    );
    for key in &expected {
        assert!(
            everything
                .iter()
                .any(|i| i.key.as_ref().map(|k| k.as_str()) == Some(key.as_str())),
            "list(\"\") misses {key:?}"
        );
    }

    for e in held {
        e.guard.release().await.expect("release");
    }
    for guard in decoy_guards {
        guard.release().await.expect("release");
    }
    assert!(
        admin
            .list(&format!("{base}/"))
            .await
            .expect("list")
            .is_empty()
    );
}

/// A backend that reports waiters (`HolderInfo::waiters` is `Some`) reports none while nobody
/// waits, counts a client waiting on the key, and forgets it once it stopped waiting.
pub async fn waiters_show_while_clients_wait(h: &Harness) {
    let key = unique_key("waiters");
    let holder = h.client().await;
    let admin = h.client().await;
    let guard = holder
        .lock_with(&key, &LockOptions::new().lease(secs(30)))
        .await
        .expect("acquire");
    let waiters = || {
        let (admin, key) = (admin.clone(), key.clone());
        async move {
            admin
                .holder(&key)
                .await
                .expect("holder")
                .expect("the lock is held")
                .waiters
        }
    };
    let counted = waiters().await;
    if let Some(n) = counted {
        assert_eq!(n, 0, "waiters reported while nobody waits");
    }

    let (granted_tx, granted_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let waiter = {
        let (client, key) = (h.client().await, key.clone());
        tokio::spawn(async move {
            let guard = client
                .lock_with(&key, &LockOptions::new().wait(secs(60)))
                .await
                .expect("waiter acquire");
            let _ = granted_tx.send(());
            let _ = release_rx.await;
            guard.release().await.expect("waiter release");
        })
    };
    match counted {
        Some(_) => {
            let seen = within(30, "the waiting client being counted", async {
                loop {
                    match waiters().await {
                        Some(0) => tokio::time::sleep(ms(10)).await,
                        Some(n) => return n,
                        None => panic!("waiters went from Some to None"),
                    }
                }
            })
            .await;
            assert_eq!(seen, 1, "one client with one task waits");
            let listed = admin.list(&key).await.expect("list");
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0].waiters, Some(1), "list and holder disagree");
        }
        None => {
            tokio::time::sleep(ms(200)).await;
            assert_eq!(waiters().await, None, "waiters went from None to Some");
        }
    }
    guard.release().await.expect("release");
    within(30, "the waiter acquiring", granted_rx)
        .await
        .expect("waiter granted");
    // The former waiter holds the lock now and nobody waits any more.
    if counted.is_some() {
        within(30, "the former waiter no longer counted", async {
            while waiters().await != Some(0) {
                tokio::time::sleep(ms(10)).await;
            }
        })
        .await;
    }
    let _ = release_tx.send(());
    within(30, "the waiter finishing", waiter)
        .await
        .expect("waiter task");
}
