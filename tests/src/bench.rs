//! Figures the benchmarks print: latency percentiles and durations in milliseconds.

use std::time::Duration;

/// The `p` quantile (0 to 1) of sorted samples; zero for none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub p50: Duration,
    pub p99: Duration,
}

pub fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    Stats { p50: percentile(&samples, 0.5), p99: percentile(&samples, 0.99) }
}
