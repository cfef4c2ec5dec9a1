//! Observability: metrics through the [`metrics`](https://docs.rs/metrics) facade, and the rule
//! that turns a key into a low-cardinality **lock name** for their labels.
//!
//! The library only *emits* metrics; it installs no exporter. Install any `metrics` recorder
//! (Prometheus, StatsD, OpenTelemetry, ...) in your binary and the series appear. Without the
//! cargo feature `metrics` (on by default) every hook here compiles to nothing; the lock-name
//! settings still exist and are still validated, so code builds the same either way.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | [`ACQUIRE_DURATION`] `fenced_acquire_duration_seconds` | histogram | `backend`, `lock`, `outcome` |
//! | [`HOLD_DURATION`] `fenced_hold_duration_seconds` | histogram | `backend`, `lock` |
//! | [`HOLDERS`] `fenced_holders` | gauge | `backend`, `lock` |
//! | [`WAITERS`] `fenced_waiters` | gauge | `backend`, `lock` |
//! | [`RENEWALS`] `fenced_renewals_total` | counter | `backend`, `lock` |
//! | [`RENEWAL_FAILURES`] `fenced_renewal_failures_total` | counter | `backend`, `lock` |
//! | [`LOST`] `fenced_lost_total` | counter | `backend`, `lock`, `reason` |
//! | [`FORCED_RELEASES`] `fenced_forced_releases_total` | counter | `backend`, `lock` |
//! | [`BACKEND_ERRORS`] `fenced_backend_errors_total` | counter | `backend`, `operation`, `kind`, `transient` |
//!
//! The meaning of every series, the label values and example alert rules are in the project's
//! `docs/metrics.md`.
//!
//! # Lock names
//! The raw key is never a label by default: keys usually contain ids (`order:42`), and one
//! series per id would overwhelm a metrics store. The `lock` label is, in order of precedence:
//!
//! 1. the name set for one acquisition with
//!    [`LockOptions::metric_name`](crate::LockOptions::metric_name);
//! 2. otherwise the client's [`MetricNames`] rule, set with
//!    [`ClientBuilder::metric_names`](crate::ClientBuilder::metric_names) or
//!    [`Client::with_metric_names`](crate::Client::with_metric_names). The default rule,
//!    [`MetricNames::key_prefix`], takes the part of the key before the first `:` or `/`
//!    (`order:42` → `order`, `job/nightly` → `job`) and uses [`OTHER`] for keys without a
//!    separator or whose prefix is not a valid lock name.
//!
//! ```
//! use fenced::MetricNames;
//! let rule = MetricNames::key_prefix();
//! assert_eq!(rule.lock_name("order:42"), "order");
//! assert_eq!(rule.lock_name("nightly-report"), "other");
//! assert_eq!(MetricNames::fixed("billing")?.lock_name("order:42"), "billing");
//! # Ok::<(), fenced::Error>(())
//! ```

use std::sync::Arc;

use crate::error::{Error, Result};

/// Acquisition latency in seconds, from the call to its outcome (`outcome` = `acquired`,
/// `not_acquired`, `error` or `cancelled`).
pub const ACQUIRE_DURATION: &str = "fenced_acquire_duration_seconds";
/// How long locks were held, in seconds, from the grant to the release, loss or drop.
pub const HOLD_DURATION: &str = "fenced_hold_duration_seconds";
/// Locks currently held through guards of this process.
pub const HOLDERS: &str = "fenced_holders";
/// Acquisitions of this process currently waiting for a held lock.
pub const WAITERS: &str = "fenced_waiters";
/// Successful automatic renewals (by the watchdog).
pub const RENEWALS: &str = "fenced_renewals_total";
/// Automatic renewals that did not extend the lease (error, timeout, or lock gone).
pub const RENEWAL_FAILURES: &str = "fenced_renewal_failures_total";
/// Locks lost while held, by `reason`.
pub const LOST: &str = "fenced_lost_total";
/// Locks broken with [`Client::force_release`](crate::Client::force_release).
pub const FORCED_RELEASES: &str = "fenced_forced_releases_total";
/// Failed backend calls, by `operation`, error `kind` and `transient`.
pub const BACKEND_ERRORS: &str = "fenced_backend_errors_total";

/// The longest lock name accepted, in bytes.
pub const MAX_METRIC_NAME_LEN: usize = 64;

/// The lock name of keys the [`MetricNames::key_prefix`] rule cannot name.
pub const OTHER: &str = "other";

/// How a client names locks in the `lock` label of its metrics, unless an acquisition sets
/// [`LockOptions::metric_name`](crate::LockOptions::metric_name). See the
/// [module docs](crate::observe) for the precedence.
///
/// ```
/// # async fn demo() -> fenced::Result<()> {
/// use fenced::MetricNames;
/// // Every lock of this client is counted as `lock="jobs"`.
/// let client = fenced::Client::builder()
///     .url("memory://")
///     .metric_names(MetricNames::fixed("jobs")?)
///     .build()
///     .await?;
/// assert_eq!(client.metric_names().lock_name("report:2024-05-01"), "jobs");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetricNames(Rule);

#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Rule {
    #[default]
    KeyPrefix,
    Fixed(Arc<str>),
    FullKey,
}

impl MetricNames {
    /// The default: the part of the key before the first `:` or `/`, if it is a valid lock name
    /// (1 to [`MAX_METRIC_NAME_LEN`] bytes of `A-Z a-z 0-9 _ . -`), else [`OTHER`]. Keys without
    /// a separator are [`OTHER`].
    ///
    /// Keys that *start* with an id (`42:order`) get one series per id under this rule; use
    /// [`fixed`](MetricNames::fixed) or [`LockOptions::metric_name`](crate::LockOptions::metric_name)
    /// for them.
    ///
    /// ```
    /// use fenced::MetricNames;
    /// let rule = MetricNames::key_prefix();
    /// assert_eq!(rule.lock_name("order:42"), "order");
    /// assert_eq!(rule.lock_name("job/nightly:2024"), "job");
    /// assert_eq!(rule.lock_name("deploy"), "other");
    /// assert_eq!(rule.lock_name("with space:1"), "other");
    /// ```
    pub fn key_prefix() -> Self {
        MetricNames(Rule::KeyPrefix)
    }

    /// The same lock name for every key. Fails with
    /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) unless `name` is 1 to
    /// [`MAX_METRIC_NAME_LEN`] bytes of `A-Z a-z 0-9 _ . : -`.
    ///
    /// ```
    /// use fenced::MetricNames;
    /// assert_eq!(MetricNames::fixed("payments")?.lock_name("refund:42"), "payments");
    /// assert!(MetricNames::fixed("no spaces").is_err());
    /// # Ok::<(), fenced::Error>(())
    /// ```
    pub fn fixed(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        validate_metric_name(&name, "MetricNames::fixed")?;
        Ok(MetricNames(Rule::Fixed(Arc::from(name))))
    }

    /// The whole key as the lock name. Only for applications with a small, fixed set of keys
    /// (`nightly-report`, `schema-migration`): every distinct key becomes its own series.
    ///
    /// ```
    /// use fenced::MetricNames;
    /// assert_eq!(MetricNames::full_key().lock_name("nightly-report"), "nightly-report");
    /// ```
    pub fn full_key() -> Self {
        MetricNames(Rule::FullKey)
    }

    /// The lock name this rule gives `key`.
    pub fn lock_name<'a>(&'a self, key: &'a str) -> &'a str {
        match &self.0 {
            Rule::KeyPrefix => match key.find([':', '/']) {
                Some(end) if is_metric_name(&key[..end]) => &key[..end],
                _ => OTHER,
            },
            Rule::Fixed(name) => name,
            Rule::FullKey => key,
        }
    }
}

fn is_metric_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_METRIC_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Checks a user-given lock name; `setting` names the option in the error message.
pub(crate) fn validate_metric_name(name: &str, setting: &str) -> Result<()> {
    if is_metric_name(name) {
        return Ok(());
    }
    let shown = if name.len() > MAX_METRIC_NAME_LEN {
        format!("a name of {} bytes", name.len())
    } else {
        format!("{name:?}")
    };
    Err(Error::invalid_config(format!(
        "{setting}: {shown} is not a valid lock name for metrics; use 1 to {MAX_METRIC_NAME_LEN} \
         characters of A-Z a-z 0-9 _ . : - (a short name for a family of keys, such as \"order\", \
         never an id)"
    )))
}

/// Registers the units and descriptions of every fenced metric with the current recorder.
///
/// Every [`Client`](crate::Client) calls this when it is created; call it yourself after
/// installing a recorder if clients already exist by then. Does nothing without the `metrics`
/// cargo feature.
///
/// ```
/// fenced::observe::describe();
/// ```
pub fn describe() {
    #[cfg(feature = "metrics")]
    hooks::describe();
}

pub(crate) use hooks::{Holding, Scope, Waiting, backend_error};

/// The hooks the core calls, with metrics.
#[cfg(feature = "metrics")]
mod hooks {
    use std::sync::atomic::{AtomicBool, Ordering};

    use metrics::{
        Gauge, Label, SharedString, Unit, counter, describe_counter, describe_gauge,
        describe_histogram, gauge, histogram,
    };
    use tokio::time::Instant;

    use super::*;
    use crate::error::ErrorKind;
    use crate::guard::LostReason;
    use crate::key::Key;

    pub(super) fn describe() {
        describe_histogram!(
            ACQUIRE_DURATION,
            Unit::Seconds,
            "Time from the acquire call to its outcome (acquired, not_acquired, error, cancelled)."
        );
        describe_histogram!(
            HOLD_DURATION,
            Unit::Seconds,
            "How long locks were held, from the grant to the release, loss or drop of the guard."
        );
        describe_gauge!(
            HOLDERS,
            Unit::Count,
            "Locks currently held through guards of this process."
        );
        describe_gauge!(
            WAITERS,
            Unit::Count,
            "Acquisitions of this process currently waiting for a held lock."
        );
        describe_counter!(
            RENEWALS,
            Unit::Count,
            "Successful automatic lease renewals."
        );
        describe_counter!(
            RENEWAL_FAILURES,
            Unit::Count,
            "Automatic lease renewals that failed (error, timeout, or the lock was gone)."
        );
        describe_counter!(
            LOST,
            Unit::Count,
            "Locks lost while held, by reason (expired, not_held, taken_over, max_hold_exceeded, session_ended)."
        );
        describe_counter!(
            FORCED_RELEASES,
            Unit::Count,
            "Locks broken administratively with force_release."
        );
        describe_counter!(
            BACKEND_ERRORS,
            Unit::Count,
            "Failed backend calls, by operation, error kind and whether the error was transient."
        );
    }

    /// The labels of one lock: the backend and the lock name.
    #[derive(Debug, Clone)]
    pub(crate) struct Scope {
        backend: &'static str,
        lock: SharedString,
    }

    impl Scope {
        /// The scope of `key`: `fixed` (from the options) if set, else the client's rule.
        pub(crate) fn new(
            backend: &'static str,
            names: &MetricNames,
            fixed: Option<&str>,
            key: &Key,
        ) -> Scope {
            let lock = fixed.unwrap_or_else(|| names.lock_name(key.as_str()));
            let lock = if lock == OTHER {
                SharedString::const_str(OTHER)
            } else {
                SharedString::from_owned(lock.to_owned())
            };
            Scope { backend, lock }
        }

        fn labels(&self) -> Vec<Label> {
            vec![
                Label::from_static_parts("backend", self.backend),
                Label::new("lock", self.lock.clone()),
            ]
        }

        fn labels_with(&self, name: &'static str, value: &'static str) -> Vec<Label> {
            let mut labels = self.labels();
            labels.push(Label::from_static_parts(name, value));
            labels
        }

        /// An acquisition started; finish it with [`Acquiring::finish`], or it counts as
        /// cancelled when dropped.
        pub(crate) fn acquiring(&self) -> Acquiring {
            Acquiring {
                scope: self.clone(),
                started: Instant::now(),
                done: false,
            }
        }

        /// An acquisition starts waiting; it stops when the returned value is dropped.
        pub(crate) fn waiting(&self) -> Waiting {
            let gauge = gauge!(WAITERS, self.labels());
            gauge.increment(1.0);
            Waiting(gauge)
        }

        /// A lock was granted at `since`; it stops counting as held at [`Holding::end`] or when
        /// the returned value is dropped, whichever comes first.
        pub(crate) fn holding(&self, since: Instant) -> Holding {
            let gauge = gauge!(HOLDERS, self.labels());
            gauge.increment(1.0);
            Holding {
                scope: self.clone(),
                gauge,
                since,
                ended: AtomicBool::new(false),
            }
        }

        pub(crate) fn renewed(&self) {
            counter!(RENEWALS, self.labels()).increment(1);
        }

        pub(crate) fn renewal_failed(&self) {
            counter!(RENEWAL_FAILURES, self.labels()).increment(1);
        }

        pub(crate) fn forced_release(&self) {
            counter!(FORCED_RELEASES, self.labels()).increment(1);
        }
    }

    /// A running acquisition (see [`Scope::acquiring`]).
    #[derive(Debug)]
    pub(crate) struct Acquiring {
        scope: Scope,
        started: Instant,
        done: bool,
    }

    impl Acquiring {
        /// Records the outcome of the acquisition.
        pub(crate) fn finish<T>(mut self, result: &Result<T>) {
            self.done = true;
            self.record(match result {
                Ok(_) => "acquired",
                Err(e) if e.kind() == ErrorKind::NotAcquired => "not_acquired",
                Err(_) => "error",
            });
        }

        fn record(&self, outcome: &'static str) {
            let labels = self.scope.labels_with("outcome", outcome);
            histogram!(ACQUIRE_DURATION, labels).record(self.started.elapsed().as_secs_f64());
        }
    }

    impl Drop for Acquiring {
        fn drop(&mut self) {
            if !self.done {
                self.record("cancelled");
            }
        }
    }

    /// A waiting acquisition (see [`Scope::waiting`]).
    #[derive(Debug)]
    pub(crate) struct Waiting(Gauge);

    impl Drop for Waiting {
        fn drop(&mut self) {
            self.0.decrement(1.0);
        }
    }

    /// A held lock (see [`Scope::holding`]).
    #[derive(Debug)]
    pub(crate) struct Holding {
        scope: Scope,
        gauge: Gauge,
        since: Instant,
        ended: AtomicBool,
    }

    impl Holding {
        /// The hold ended for `reason`: the holders gauge goes down, the hold duration is
        /// recorded (not for a detached guard, whose lock lives on) and losses are counted.
        /// Only the first call counts.
        pub(crate) fn end(&self, reason: LostReason) {
            if self.ended.swap(true, Ordering::AcqRel) {
                return;
            }
            self.gauge.decrement(1.0);
            if reason != LostReason::Detached {
                histogram!(HOLD_DURATION, self.scope.labels())
                    .record(self.since.elapsed().as_secs_f64());
            }
            if let Some(reason) = lost_label(reason) {
                counter!(LOST, self.scope.labels_with("reason", reason)).increment(1);
            }
        }
    }

    impl Drop for Holding {
        fn drop(&mut self) {
            if !*self.ended.get_mut() {
                self.gauge.decrement(1.0);
            }
        }
    }

    fn lost_label(reason: LostReason) -> Option<&'static str> {
        Some(match reason {
            LostReason::Released | LostReason::Detached => return None,
            LostReason::Expired => "expired",
            LostReason::NotHeld => "not_held",
            LostReason::TakenOver => "taken_over",
            LostReason::MaxHoldExceeded => "max_hold_exceeded",
            LostReason::SessionEnded => "session_ended",
        })
    }

    fn kind_label(kind: ErrorKind) -> &'static str {
        match kind {
            ErrorKind::NotAcquired => "not_acquired",
            ErrorKind::Lost => "lost",
            ErrorKind::NotOwner => "not_owner",
            ErrorKind::InvalidKey => "invalid_key",
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Backend => "backend",
        }
    }

    /// Counts a failed backend call and hands the error back.
    pub(crate) fn backend_error(backend: &'static str, e: Error) -> Error {
        let labels = vec![
            Label::from_static_parts("backend", backend),
            Label::new("operation", e.operation().to_string()),
            Label::from_static_parts("kind", kind_label(e.kind())),
            Label::from_static_parts("transient", if e.is_transient() { "true" } else { "false" }),
        ];
        counter!(BACKEND_ERRORS, labels).increment(1);
        e
    }
}

/// The hooks the core calls, without metrics: all empty.
#[cfg(not(feature = "metrics"))]
mod hooks {
    use super::*;
    use crate::guard::LostReason;
    use crate::key::Key;
    use tokio::time::Instant;

    #[derive(Debug, Clone)]
    pub(crate) struct Scope;

    #[derive(Debug)]
    pub(crate) struct Acquiring;

    #[derive(Debug)]
    pub(crate) struct Waiting;

    #[derive(Debug)]
    pub(crate) struct Holding;

    impl Scope {
        #[inline(always)]
        pub(crate) fn new(
            _backend: &'static str,
            _names: &MetricNames,
            _fixed: Option<&str>,
            _key: &Key,
        ) -> Scope {
            Scope
        }
        #[inline(always)]
        pub(crate) fn acquiring(&self) -> Acquiring {
            Acquiring
        }
        #[inline(always)]
        pub(crate) fn waiting(&self) -> Waiting {
            Waiting
        }
        #[inline(always)]
        pub(crate) fn holding(&self, _since: Instant) -> Holding {
            Holding
        }
        #[inline(always)]
        pub(crate) fn renewed(&self) {}
        #[inline(always)]
        pub(crate) fn renewal_failed(&self) {}
        #[inline(always)]
        pub(crate) fn forced_release(&self) {}
    }

    impl Acquiring {
        #[inline(always)]
        pub(crate) fn finish<T>(self, _result: &Result<T>) {}
    }

    impl Holding {
        #[inline(always)]
        pub(crate) fn end(&self, _reason: LostReason) {}
    }

    #[inline(always)]
    pub(crate) fn backend_error(_backend: &'static str, e: Error) -> Error {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn key_prefix_rule() {
        let rule = MetricNames::key_prefix();
        assert_eq!(rule.lock_name("order:42"), "order");
        assert_eq!(rule.lock_name("order/42:x"), "order");
        assert_eq!(rule.lock_name("a.b-c_d:1"), "a.b-c_d");
        assert_eq!(rule.lock_name("nightly-report"), OTHER);
        assert_eq!(rule.lock_name(":42"), OTHER);
        assert_eq!(rule.lock_name("/tmp/x"), OTHER);
        assert_eq!(rule.lock_name("ordre\u{e9}:42"), OTHER);
        assert_eq!(rule.lock_name(&format!("{}:1", "a".repeat(65))), OTHER);
        assert_eq!(rule, MetricNames::default());
    }

    #[test]
    fn fixed_names_are_validated() {
        for bad in ["", "a b", "x\n", "caf\u{e9}", &"a".repeat(65)] {
            let e = MetricNames::fixed(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad:?}");
            assert!(e.to_string().contains("MetricNames::fixed"), "{e}");
        }
        let long = MetricNames::fixed("a".repeat(200)).unwrap_err().to_string();
        assert!(
            long.contains("200 bytes") && !long.contains(&"a".repeat(65)),
            "{long}"
        );
        for good in ["jobs", "svc:orders", "a.b-c_D9", &"a".repeat(64)] {
            assert_eq!(MetricNames::fixed(good).unwrap().lock_name("x:1"), good);
        }
    }
}
