//! The metrics hooks over real runs on the memory and SQLite backends, recorded by a counting
//! `metrics::Recorder` installed for the test's thread only.
//!
//! Each run causes a known set of events — grants and releases, waiters that are cancelled, time
//! out or succeed, a forced release and the loss it causes, a dropped guard, a detached guard, a
//! maximum hold time, watchdog renewals, and (on SQLite) a backend error — and then checks that
//! every counter and histogram count matches the events, and that the holders and waiters gauges
//! are back to exactly 0 and never went below it.
//!
//! The runtime is single-threaded so that the thread-local recorder sees every task.
#![cfg(all(feature = "metrics", feature = "memory"))]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fenced::layers::Counting;
use fenced::observe::{
    ACQUIRE_DURATION, BACKEND_ERRORS, FORCED_RELEASES, HOLD_DURATION, HOLDERS, LOST,
    RENEWAL_FAILURES, RENEWALS, WAITERS,
};
use fenced::{Client, ErrorKind, LockGuard, LockOptions, LostReason, MetricNames, RetryPolicy};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

// ---------------------------------------------------------------------------------------------
// A recorder that keeps every value, keyed by `name{label=value,...}` (labels sorted).

#[derive(Debug, Default, Clone, Copy)]
struct GaugeState {
    value: f64,
    min: f64,
    max: f64,
}

#[derive(Debug, Default)]
struct State {
    counters: BTreeMap<String, u64>,
    gauges: BTreeMap<String, GaugeState>,
    histograms: BTreeMap<String, Vec<f64>>,
    described: BTreeSet<String>,
}

#[derive(Debug, Default, Clone)]
struct Recording {
    state: Arc<Mutex<State>>,
}

struct Handle {
    state: Arc<Mutex<State>>,
    id: String,
}

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

impl Recording {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn handle(&self, key: &Key) -> Arc<Handle> {
        let labels: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
        Arc::new(Handle {
            state: self.state.clone(),
            id: series(key.name(), &labels),
        })
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.state()
            .counters
            .get(&series(name, labels))
            .copied()
            .unwrap_or(0)
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> GaugeState {
        self.state()
            .gauges
            .get(&series(name, labels))
            .copied()
            .unwrap_or_default()
    }

    fn count(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.state()
            .histograms
            .get(&series(name, labels))
            .map_or(0, Vec::len)
    }

    fn ids(&self) -> Vec<String> {
        let s = self.state();
        s.counters
            .keys()
            .chain(s.gauges.keys())
            .chain(s.histograms.keys())
            .cloned()
            .collect()
    }
}

impl CounterFn for Handle {
    fn increment(&self, value: u64) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        *s.counters.entry(self.id.clone()).or_default() += value;
    }
    fn absolute(&self, value: u64) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.counters.insert(self.id.clone(), value);
    }
}

impl GaugeFn for Handle {
    fn increment(&self, value: f64) {
        self.set_with(|v| v + value);
    }
    fn decrement(&self, value: f64) {
        self.set_with(|v| v - value);
    }
    fn set(&self, value: f64) {
        self.set_with(|_| value);
    }
}

impl Handle {
    fn set_with(&self, f: impl FnOnce(f64) -> f64) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let g = s.gauges.entry(self.id.clone()).or_default();
        g.value = f(g.value);
        g.min = g.min.min(g.value);
        g.max = g.max.max(g.value);
    }
}

impl HistogramFn for Handle {
    fn record(&self, value: f64) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.histograms.entry(self.id.clone()).or_default().push(value);
    }
}

impl Recorder for Recording {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.state().described.insert(key.as_str().to_owned());
    }
    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.state().described.insert(key.as_str().to_owned());
    }
    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.state().described.insert(key.as_str().to_owned());
    }
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.handle(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.handle(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.handle(key))
    }
}

// ---------------------------------------------------------------------------------------------

/// Runs `scenario` on a fresh single-threaded runtime with `recording` as this thread's recorder.
fn recorded<F: Future<Output = ()>>(recording: &Recording, scenario: impl FnOnce() -> F) {
    metrics::with_local_recorder(recording, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(scenario());
        // Tasks still pending are dropped here, still under the recorder.
        drop(runtime);
    });
}

/// Polls `cond` until it holds; panics (with `what`) if it never does. Asserts nothing about time.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..6000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{what}: never happened");
}

fn labels<'a>(backend: &'a str, lock: &'a str) -> [(&'a str, &'a str); 2] {
    [("backend", backend), ("lock", lock)]
}

fn outcome<'a>(backend: &'a str, lock: &'a str, outcome: &'a str) -> [(&'a str, &'a str); 3] {
    [("backend", backend), ("lock", lock), ("outcome", outcome)]
}

/// Every holders and waiters gauge is back to 0 and never went below it.
fn gauges_settled(m: &Recording) {
    let s = m.state();
    for (id, g) in &s.gauges {
        assert!(
            id.starts_with(HOLDERS) || id.starts_with(WAITERS),
            "unexpected gauge {id}"
        );
        assert_eq!(g.value, 0.0, "{id} is {} at the end", g.value);
        assert!(g.min >= 0.0, "{id} went down to {}", g.min);
    }
}

/// The events every backend gets; `a` and `b` are two clients of the same store.
async fn scenario(m: &Recording, a: &Client, b: &Client) {
    let be = a.backend().name();

    // 1. Five grants and releases, one at a time: lock name "order" from the key prefix.
    for i in 0..5 {
        let guard = a.lock(format!("order:{i}")).await.unwrap();
        assert_eq!(m.gauge(HOLDERS, &labels(be, "order")).value, 1.0);
        guard.release().await.unwrap();
    }
    assert_eq!(
        m.count(ACQUIRE_DURATION, &outcome(be, "order", "acquired")),
        5
    );
    assert_eq!(m.count(HOLD_DURATION, &labels(be, "order")), 5);
    let holders = m.gauge(HOLDERS, &labels(be, "order"));
    assert_eq!((holders.value, holders.max), (0.0, 1.0));

    // 2. Waiters: three in client `a` (one at the backend, two in the local queue) and one in
    //    client `b`, all cancelled while waiting.
    let holder = a.lock("job:a").await.unwrap();
    let mut waiters = Vec::new();
    for client in [a, a, a, b] {
        let client = client.clone();
        waiters.push(tokio::spawn(async move { client.lock("job:a").await }));
    }
    eventually("four waiters counted", || {
        m.gauge(WAITERS, &labels(be, "job")).value == 4.0
    })
    .await;
    for w in &waiters {
        w.abort();
    }
    for w in waiters {
        assert!(w.await.unwrap_err().is_cancelled());
    }
    assert_eq!(m.gauge(WAITERS, &labels(be, "job")).value, 0.0);
    assert_eq!(
        m.count(ACQUIRE_DURATION, &outcome(be, "job", "cancelled")),
        4
    );

    // A wait that times out and a try_lock that finds the lock taken: "not_acquired".
    let short = LockOptions::new().wait(Duration::from_millis(30));
    let e = a.lock_with("job:a", &short).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAcquired);
    assert!(b.try_lock("job:a").await.unwrap().is_none());
    assert_eq!(
        m.count(ACQUIRE_DURATION, &outcome(be, "job", "not_acquired")),
        2
    );

    // A waiter that gets the lock when the holder releases.
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.lock("job:a").await })
    };
    eventually("the waiter waits", || {
        m.gauge(WAITERS, &labels(be, "job")).value == 1.0
    })
    .await;
    holder.release().await.unwrap();
    let next = waiter.await.unwrap().unwrap();
    assert_eq!(m.gauge(WAITERS, &labels(be, "job")).value, 0.0);
    assert_eq!(m.gauge(HOLDERS, &labels(be, "job")).value, 1.0);
    next.release().await.unwrap();
    assert_eq!(
        m.count(ACQUIRE_DURATION, &outcome(be, "job", "acquired")),
        2
    );
    assert_eq!(m.count(HOLD_DURATION, &labels(be, "job")), 2);
    assert_eq!(m.gauge(WAITERS, &labels(be, "job")).max, 4.0);

    // 3. A forced release, and the loss it causes, seen by an explicit extend.
    let long = LockOptions::new().lease(Duration::from_secs(30));
    let guard = a.lock_with("lease:x", &long).await.unwrap();
    assert!(b.force_release("lease:x").await.unwrap().is_some());
    assert!(b.force_release("lease:x").await.unwrap().is_none()); // nothing broken: not counted
    assert_eq!(m.counter(FORCED_RELEASES, &labels(be, "lease")), 1);
    let e = guard.extend(Duration::from_secs(30)).await.unwrap_err();
    assert_eq!(e.lost_reason(), Some(LostReason::NotHeld));
    let reason = [("backend", be), ("lock", "lease"), ("reason", "not_held")];
    assert_eq!(m.counter(LOST, &reason), 1);
    assert_eq!(m.gauge(HOLDERS, &labels(be, "lease")).value, 0.0);
    assert_eq!(guard.release().await.unwrap_err().kind(), ErrorKind::Lost);
    assert_eq!(m.counter(LOST, &reason), 1, "a loss is counted once");
    assert_eq!(m.count(HOLD_DURATION, &labels(be, "lease")), 1);

    // 4. A dropped guard: the gauge goes down at once, the release happens in the background.
    let guard = a.lock("drop:1").await.unwrap();
    drop(guard);
    assert_eq!(m.gauge(HOLDERS, &labels(be, "drop")).value, 0.0);
    assert_eq!(m.count(HOLD_DURATION, &labels(be, "drop")), 1);
    let again = b
        .lock_with("drop:1", &LockOptions::new().wait(Duration::from_secs(30)))
        .await
        .unwrap();
    again.release().await.unwrap();
    assert_eq!(m.count(HOLD_DURATION, &labels(be, "drop")), 2);

    // 5. A detached guard stops counting as held; its hold time is not recorded (it goes on).
    let guard = a.lock("detach:1").await.unwrap();
    let detached = LockGuard::detach(guard);
    assert_eq!(m.gauge(HOLDERS, &labels(be, "detach")).value, 0.0);
    assert_eq!(m.count(HOLD_DURATION, &labels(be, "detach")), 0);
    a.unlock("detach:1", &detached.owner).await.unwrap();

    // 6. The maximum hold time passes while the guard is held.
    // (No renewals, so that no slow renewal can turn the loss into an expiry.)
    let capped = LockOptions::new()
        .renew(false)
        .max_hold(Duration::from_millis(150));
    let guard = a.lock_with("max:1", &capped).await.unwrap();
    assert_eq!(guard.lost().await, LostReason::MaxHoldExceeded);
    let reason = [
        ("backend", be),
        ("lock", "max"),
        ("reason", "max_hold_exceeded"),
    ];
    assert_eq!(m.counter(LOST, &reason), 1);
    assert_eq!(m.gauge(HOLDERS, &labels(be, "max")).value, 0.0);
    drop(guard);
    assert_eq!(m.count(HOLD_DURATION, &labels(be, "max")), 1);

    // 7. Watchdog renewals, matched against the extend calls the backend actually received.
    let counting = Counting::new(a.backend().clone());
    let calls = counting.counts();
    let c = Client::new(counting);
    let short_lease = LockOptions::new()
        .lease(Duration::from_secs(1))
        .renew_every(Duration::from_millis(100));
    let guard = c.lock_with("renew:1", &short_lease).await.unwrap();
    let renew = labels(be, "renew");
    eventually("three renewals, none in flight", || {
        let done = m.counter(RENEWALS, &renew) + m.counter(RENEWAL_FAILURES, &renew);
        m.counter(RENEWALS, &renew) >= 3 && calls.extend.load(Ordering::SeqCst) == done
    })
    .await;
    // Nothing runs between the check above and the abort inside release (one thread).
    guard.release().await.unwrap();
    assert_eq!(m.counter(RENEWAL_FAILURES, &renew), 0);
    assert_eq!(
        m.counter(RENEWALS, &renew),
        calls.extend.load(Ordering::SeqCst)
    );

    // 8. Naming: an option beats the client's rule; the rule can be fixed or the full key.
    let named = a
        .lock_with("order:77", &LockOptions::new().metric_name("refunds"))
        .await
        .unwrap();
    named.release().await.unwrap();
    assert_eq!(
        m.count(ACQUIRE_DURATION, &outcome(be, "refunds", "acquired")),
        1
    );
    let fixed = a
        .clone()
        .with_metric_names(MetricNames::fixed("jobs").unwrap());
    fixed
        .lock("order:78")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    assert_eq!(
        m.count(ACQUIRE_DURATION, &outcome(be, "jobs", "acquired")),
        1
    );
    let full = a.clone().with_metric_names(MetricNames::full_key());
    full.lock("nightly-report")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    a.lock("nightly-report")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    assert_eq!(m.count(HOLD_DURATION, &labels(be, "nightly-report")), 1);
    assert_eq!(m.count(HOLD_DURATION, &labels(be, "other")), 1);
    let e = a
        .lock_with("order:1", &LockOptions::new().metric_name("order 1"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig);
    assert!(e.to_string().contains("metric_name"), "{e}");
}

/// What every run ends with: gauges at 0, the full set of descriptions, no raw keys as labels.
fn common_checks(m: &Recording, be: &str) {
    gauges_settled(m);
    let described = m.state().described.clone();
    for name in [
        ACQUIRE_DURATION,
        HOLD_DURATION,
        HOLDERS,
        WAITERS,
        RENEWALS,
        RENEWAL_FAILURES,
        LOST,
        FORCED_RELEASES,
        BACKEND_ERRORS,
    ] {
        assert!(described.contains(name), "{name} was not described");
    }
    for id in m.ids() {
        assert!(
            !id.contains("lock=order:"),
            "a raw key became a label: {id}"
        );
        assert!(id.contains(&format!("backend={be}")), "{id}");
    }
    // Every grant of the default-named locks ended in exactly one hold-duration sample.
    for lock in ["order", "job", "lease", "max", "renew"] {
        assert_eq!(
            m.count(ACQUIRE_DURATION, &outcome(be, lock, "acquired")),
            m.count(HOLD_DURATION, &labels(be, lock)),
            "{lock}"
        );
    }
}

#[test]
fn memory_backend_metrics() {
    let m = Recording::default();
    let store = format!("memory://metrics-{}", rand::random::<u32>());
    recorded(&m, || async {
        let a = fenced::connect(&store).await.unwrap();
        let b = fenced::connect(&store).await.unwrap();
        scenario(&m, &a, &b).await;
    });
    common_checks(&m, "memory");
    let errors = m
        .ids()
        .into_iter()
        .filter(|id| id.starts_with(BACKEND_ERRORS));
    assert_eq!(errors.count(), 0, "the memory backend does not fail");
}

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_backend_metrics() {
    let m = Recording::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locks.db");
    let url = format!("sqlite://{}?busy_timeout=100ms", path.display());
    recorded(&m, || async {
        let a = fenced::connect(&url).await.unwrap();
        let b = fenced::connect(&url).await.unwrap();
        scenario(&m, &a, &b).await;

        // A backend error: another connection keeps the file's write lock longer than
        // busy_timeout, so one acquire attempt (no retries) fails with a transient error.
        let blocker = rusqlite::Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let once = LockOptions::new()
            .wait(Duration::ZERO)
            .retry(RetryPolicy::none());
        let e = a.lock_with("busy:1", &once).await.unwrap_err();
        // Let go before anything else runs, so the background clean-up release succeeds.
        blocker.execute_batch("ROLLBACK").unwrap();
        assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
        assert!(e.is_transient(), "{e}");
        let failed = [
            ("backend", "sqlite"),
            ("kind", "backend"),
            ("operation", "acquire"),
            ("transient", "true"),
        ];
        assert_eq!(m.counter(BACKEND_ERRORS, &failed), 1);
        assert_eq!(
            m.count(ACQUIRE_DURATION, &outcome("sqlite", "busy", "error")),
            1
        );
        // The lock is free again (nothing was left behind by the failed attempt).
        let guard = a
            .lock_with("busy:1", &LockOptions::new().wait(Duration::from_secs(30)))
            .await
            .unwrap();
        guard.release().await.unwrap();
    });
    common_checks(&m, "sqlite");
    let errors: Vec<String> = m
        .ids()
        .into_iter()
        .filter(|id| id.starts_with(BACKEND_ERRORS))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
}
