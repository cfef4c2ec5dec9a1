//! Latency summaries and the JSON line of a run.

use serde_json::{Value, json};

/// p50, p99, max and mean of a set of latencies in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Summary {
    pub(crate) p50: u64,
    pub(crate) p99: u64,
    pub(crate) max: u64,
    pub(crate) mean: u64,
}

impl Summary {
    /// The summary of `samples` (sorted in place); `None` when there are none.
    pub(crate) fn of(samples: &mut [u64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        let len = samples.len();
        Some(Summary {
            p50: percentile(samples, 50),
            p99: percentile(samples, 99),
            max: samples[len - 1],
            mean: u64::try_from(sum / len as u128).unwrap_or(u64::MAX),
        })
    }

    /// As the protocol's `lat_ns` object.
    pub(crate) fn to_json(self) -> Value {
        json!({"p50": self.p50, "p99": self.p99, "max": self.max, "mean": self.mean})
    }
}

/// The nearest-rank `p`th percentile of sorted, non-empty `samples`.
fn percentile(samples: &[u64], p: usize) -> u64 {
    let rank = (samples.len() * p).div_ceil(100).max(1);
    samples[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut samples: Vec<u64> = (1..=100).rev().collect();
        let s = Summary::of(&mut samples).unwrap();
        assert_eq!((s.p50, s.p99, s.max, s.mean), (50, 99, 100, 50));
        assert_eq!(Summary::of(&mut [7]).unwrap().p99, 7);
        assert!(Summary::of(&mut []).is_none());
    }
}
