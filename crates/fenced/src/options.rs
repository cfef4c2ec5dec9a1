//! Options of one lock acquisition, validated before any I/O.

use std::time::Duration;

use crate::error::{Error, Result};

/// The shortest lease accepted. Shorter leases would expire within a few network round trips.
pub const MIN_LEASE: Duration = Duration::from_millis(100);
/// The longest lease accepted (7 days). Use renewal for longer holds.
pub const MAX_LEASE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The longest wait timeout or maximum hold time accepted (365 days); use "forever" instead.
pub const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);
/// The longest owner label accepted, in bytes.
pub const MAX_LABEL_LEN: usize = 256;

/// How long [`lock_with`](crate::Client::lock_with) waits for a held lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Wait until the lock is granted (or a non-transient error happens).
    Forever,
    /// Wait at most this long; `Duration::ZERO` means one attempt.
    Timeout(Duration),
}

/// How transient backend errors (connection reset, timeout, failover) are retried during acquire
/// and release: exponential backoff with full jitter.
///
/// ```
/// use std::time::Duration;
/// use fenced::RetryPolicy;
/// let retry = RetryPolicy::new().max_retries(5).backoff(Duration::from_millis(20), Duration::from_secs(1));
/// assert_eq!(retry.get_max_retries(), 5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_retries: u32,
    initial: Duration,
    max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            initial: Duration::from_millis(50),
            max: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// 3 retries, backoff from 50 ms up to 2 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// No retries: the first transient error is returned.
    pub fn none() -> Self {
        RetryPolicy {
            max_retries: 0,
            ..Self::default()
        }
    }

    /// How many times a transient error is retried before it is returned.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// The first and the largest backoff delay (before jitter).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial = initial;
        self.max = max;
        self
    }

    /// The configured number of retries.
    pub fn get_max_retries(&self) -> u32 {
        self.max_retries
    }

    /// The delay before retry number `attempt` (0-based): uniformly random in
    /// `[0, min(max, initial * 2^attempt)]` ("full jitter").
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = self
            .initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        jitter(cap)
    }

    fn validate(&self) -> Result<()> {
        if self.initial.is_zero() || self.max < self.initial || self.max > Duration::from_secs(60) {
            return Err(Error::invalid_config(format!(
                "retry backoff must satisfy 0 < initial <= max <= 60s, got initial {:?} and max {:?}",
                self.initial, self.max
            )));
        }
        if self.max_retries > 1000 {
            return Err(Error::invalid_config(format!(
                "{} retries is absurd; use at most 1000 (or wait with a timeout instead)",
                self.max_retries
            )));
        }
        Ok(())
    }
}

/// A uniformly random duration in `[0, cap]`.
pub(crate) fn jitter(cap: Duration) -> Duration {
    let nanos = cap.as_nanos().min(u64::MAX as u128) as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rand::random_range(0..=nanos))
}

/// Options for [`Client::lock_with`](crate::Client::lock_with) and
/// [`Client::with_lock`](crate::Client::with_lock).
///
/// Defaults: wait forever, 30 s lease, automatic renewal every lease/3, no maximum hold time,
/// [`RetryPolicy::default`], and the label `"<hostname> pid <pid>"`.
///
/// ```
/// use std::time::Duration;
/// use fenced::LockOptions;
/// let options = LockOptions::new()
///     .wait(Duration::from_secs(5))
///     .lease(Duration::from_secs(10))
///     .max_hold(Duration::from_secs(60))
///     .label("refund-worker");
/// assert!(options.validate().is_ok());
/// assert!(LockOptions::new().lease(Duration::ZERO).validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockOptions {
    wait: Wait,
    lease: Duration,
    renew: bool,
    renew_every: Option<Duration>,
    max_hold: Option<Duration>,
    retry: RetryPolicy,
    label: Option<String>,
    metric_name: Option<String>,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            wait: Wait::Forever,
            lease: Duration::from_secs(30),
            renew: true,
            renew_every: None,
            max_hold: None,
            retry: RetryPolicy::default(),
            label: None,
            metric_name: None,
        }
    }
}

impl LockOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wait at most `timeout` for a held lock; `Duration::ZERO` tries once.
    pub fn wait(mut self, timeout: Duration) -> Self {
        self.wait = Wait::Timeout(timeout);
        self
    }

    /// Wait until the lock is granted (the default).
    pub fn wait_forever(mut self) -> Self {
        self.wait = Wait::Forever;
        self
    }

    /// The lease (time to live) the backend keeps the lock for without renewal.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Automatic renewal on (default) or off. Off: the lock expires at the end of its lease unless
    /// you call [`LockGuard::extend`](crate::LockGuard::extend).
    pub fn renew(mut self, on: bool) -> Self {
        self.renew = on;
        self
    }

    /// How often the watchdog renews (default lease/3). Must be shorter than the lease.
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = Some(every);
        self
    }

    /// A hard cap on the total hold time: when it passes, `lost()` fires, renewal stops and the
    /// lock is released. The backend's lease is never extended past it, so the cap holds even if
    /// this process hangs.
    pub fn max_hold(mut self, max: Duration) -> Self {
        self.max_hold = Some(max);
        self
    }

    /// How transient backend errors are retried.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// A label for humans (shown by `fenced status` and in "held by" messages). Not secret, not
    /// used for ownership.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// The lock name in the `lock` label of this acquisition's metrics, instead of the client's
    /// [`MetricNames`](crate::MetricNames) rule (by default, the key's prefix before the first `:`
    /// or `/`). 1 to [`MAX_METRIC_NAME_LEN`](crate::observe::MAX_METRIC_NAME_LEN) characters of
    /// `A-Z a-z 0-9 _ . : -`, checked by [`validate`](LockOptions::validate). Name a family of
    /// keys, never one id: every distinct name is a new series.
    ///
    /// ```
    /// use fenced::LockOptions;
    /// assert!(LockOptions::new().metric_name("nightly-report").validate().is_ok());
    /// assert!(LockOptions::new().metric_name("order 42").validate().is_err());
    /// ```
    pub fn metric_name(mut self, name: impl Into<String>) -> Self {
        self.metric_name = Some(name.into());
        self
    }

    /// The wait setting.
    pub fn get_wait(&self) -> Wait {
        self.wait
    }
    /// The lease.
    pub fn get_lease(&self) -> Duration {
        self.lease
    }
    /// Whether automatic renewal is on.
    pub fn get_renew(&self) -> bool {
        self.renew
    }
    /// The renewal interval (lease/3 unless set).
    pub fn get_renew_every(&self) -> Duration {
        self.renew_every.unwrap_or(self.lease / 3)
    }
    pub(crate) fn renew_every_setting(&self) -> Option<Duration> {
        self.renew_every
    }
    /// The maximum hold time, if any.
    pub fn get_max_hold(&self) -> Option<Duration> {
        self.max_hold
    }
    /// The retry policy.
    pub fn get_retry(&self) -> RetryPolicy {
        self.retry
    }
    /// The label, if set.
    pub fn get_label(&self) -> Option<&str> {
        self.label.as_deref()
    }
    /// The lock name for metrics, if set.
    pub fn get_metric_name(&self) -> Option<&str> {
        self.metric_name.as_deref()
    }

    /// Checks every option; fails with [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig)
    /// and a message naming the option and its allowed range.
    ///
    /// Rules: `MIN_LEASE <= lease <= MAX_LEASE`; `wait <= MAX_WAIT`; `renew_every` in
    /// `[lease/100, lease/2]`; `MIN_LEASE <= max_hold <= MAX_WAIT`; with renewal off, a maximum
    /// hold time longer than the lease is contradictory (the lock cannot outlive its lease);
    /// labels at most [`MAX_LABEL_LEN`] bytes without control characters; metric names as
    /// described at [`metric_name`](LockOptions::metric_name).
    pub fn validate(&self) -> Result<()> {
        if self.lease < MIN_LEASE || self.lease > MAX_LEASE {
            return Err(Error::invalid_config(format!(
                "lease {:?} is out of range; use between {MIN_LEASE:?} and {MAX_LEASE:?} (renewal keeps longer holds alive)",
                self.lease
            )));
        }
        if let Wait::Timeout(w) = self.wait {
            if w > MAX_WAIT {
                return Err(Error::invalid_config(format!(
                    "wait timeout {w:?} is absurd (limit {MAX_WAIT:?}); use wait_forever() to wait without limit"
                )));
            }
        }
        if let Some(every) = self.renew_every {
            if every < self.lease / 100 || every > self.lease / 2 || every.is_zero() {
                return Err(Error::invalid_config(format!(
                    "renew_every {every:?} must be between lease/100 and lease/2 (lease is {:?}); the default lease/3 is usually right",
                    self.lease
                )));
            }
        }
        if let Some(max) = self.max_hold {
            if max < MIN_LEASE || max > MAX_WAIT {
                return Err(Error::invalid_config(format!(
                    "max_hold {max:?} is out of range; use between {MIN_LEASE:?} and {MAX_WAIT:?}"
                )));
            }
            if !self.renew && max > self.lease {
                return Err(Error::invalid_config(format!(
                    "max_hold {max:?} is longer than the lease {:?} but renewal is off, so the lock expires at the \
                     end of its lease anyway; turn renewal on or drop max_hold",
                    self.lease
                )));
            }
        }
        if let Some(label) = &self.label {
            if label.len() > MAX_LABEL_LEN || label.chars().any(char::is_control) {
                return Err(Error::invalid_config(format!(
                    "label must be at most {MAX_LABEL_LEN} bytes without control characters (got {} bytes)",
                    label.len()
                )));
            }
        }
        if let Some(name) = &self.metric_name {
            crate::observe::validate_metric_name(name, "metric_name")?;
        }
        self.retry.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn rejects_bad_values() {
        let bad = [
            LockOptions::new().lease(Duration::ZERO),
            LockOptions::new().lease(Duration::from_secs(8 * 24 * 3600)),
            LockOptions::new().wait(Duration::from_secs(400 * 24 * 3600)),
            LockOptions::new().renew_every(Duration::from_secs(20)),
            LockOptions::new().max_hold(Duration::ZERO),
            LockOptions::new()
                .renew(false)
                .max_hold(Duration::from_secs(60)),
            LockOptions::new().label("a\nb"),
            LockOptions::new().label("x".repeat(MAX_LABEL_LEN + 1)),
            LockOptions::new().retry(RetryPolicy::new().backoff(Duration::ZERO, Duration::ZERO)),
            LockOptions::new().metric_name(""),
            LockOptions::new().metric_name("order 42"),
            LockOptions::new().metric_name("x".repeat(65)),
        ];
        for options in bad {
            let e = options.validate().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{options:?}");
        }
        assert!(LockOptions::new().validate().is_ok());
        assert!(LockOptions::new().wait(Duration::ZERO).validate().is_ok());
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let policy = RetryPolicy::new();
        for attempt in 0..40 {
            assert!(policy.delay(attempt) <= Duration::from_secs(2));
        }
    }
}
