//! The clock of handoff events: `CLOCK_MONOTONIC` in nanoseconds, the same clock the Python
//! (`time.monotonic_ns()`) and Node (`process.hrtime.bigint()`) peers read, so event files of
//! different processes merge on one time line.

use rustix::time::{ClockId, clock_gettime};

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub(crate) fn monotonic_ns() -> u64 {
    let t = clock_gettime(ClockId::Monotonic);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(t.tv_nsec).unwrap_or(0);
    secs * 1_000_000_000 + nanos
}
