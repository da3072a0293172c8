//! Summaries of repeated measurements: percentiles of one run's latency samples, and the
//! median with its range over repetitions. Pure, so the arithmetic is unit-tested.

use serde::{Deserialize, Serialize};

/// The median of repeated measurements of one quantity, with the smallest and largest seen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// How many repetitions it summarises.
    pub n: usize,
}

impl Spread {
    /// Summarises `values` (in any order); `None` when there are none. With an even count the
    /// median is the mean of the two middle values.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            n,
        })
    }

    /// The same spread with every value multiplied by `factor` (unit changes).
    pub fn scaled(self, factor: f64) -> Spread {
        Spread {
            median: self.median * factor,
            min: self.min * factor,
            max: self.max * factor,
            n: self.n,
        }
    }
}

/// Latency percentiles of one run, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// The `q`-quantile (0..=1) of sorted samples, nearest-rank: the smallest sample with at
/// least `q` of all samples at or below it. Exact, no interpolation or bucketing, so that a
/// p99 is a latency that really happened.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// p50/p90/p99 in microseconds of latency samples in nanoseconds (sorted in place).
pub fn percentiles_us(samples_ns: &mut [u64]) -> Option<Percentiles> {
    samples_ns.sort_unstable();
    let us = |q| quantile(samples_ns, q).map(|ns| ns as f64 / 1_000.0);
    Some(Percentiles {
        p50: us(0.50)?,
        p90: us(0.90)?,
        p99: us(0.99)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(values: &[f64], expected: Option<(f64, f64, f64)>) {
        let got = Spread::of(values).map(|s| (s.median, s.min, s.max));
        assert_eq!(got, expected, "{values:?}");
    }

    #[test]
    fn repetitions_are_summarised_by_median_and_range() {
        check(&[], None);
        check(&[f64::NAN], None);
        check(&[3.0], Some((3.0, 3.0, 3.0)));
        check(&[5.0, 1.0, 3.0], Some((3.0, 1.0, 5.0)));
        check(&[4.0, 1.0, 3.0, 2.0], Some((2.5, 1.0, 4.0)));
        check(&[2.0, f64::INFINITY, 1.0, 3.0], Some((2.0, 1.0, 3.0)));
    }

    #[test]
    fn quantiles_are_nearest_rank_over_real_samples() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&samples, 0.50), Some(50));
        assert_eq!(quantile(&samples, 0.90), Some(90));
        assert_eq!(quantile(&samples, 0.99), Some(99));
        assert_eq!(quantile(&samples, 1.0), Some(100));
        assert_eq!(quantile(&samples, 0.0), Some(1));
        assert_eq!(quantile(&[7], 0.99), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn percentiles_are_reported_in_microseconds() {
        let mut ns: Vec<u64> = (1..=1000).rev().map(|i| i * 1_000).collect();
        let p = percentiles_us(&mut ns).expect("samples");
        assert_eq!((p.p50, p.p90, p.p99), (500.0, 900.0, 990.0));
        assert!(percentiles_us(&mut []).is_none());
    }
}
