//! Latency samples and their percentiles.

use std::time::Duration;

use serde_json::{Value, json};

/// Latency samples of one measurement.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    values: Vec<Duration>,
}

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.values.push(d);
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Nearest-rank percentile (`q` in 0..=100); `None` without samples.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        if self.values.is_empty() {
            return None;
        }
        let mut sorted = self.values.clone();
        sorted.sort();
        let rank = ((q / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
        Some(sorted[rank.min(sorted.len()) - 1])
    }

    pub fn p50(&self) -> Option<Duration> {
        self.percentile(50.0)
    }

    pub fn mean(&self) -> Option<Duration> {
        (!self.values.is_empty()).then(|| self.values.iter().sum::<Duration>() / self.values.len() as u32)
    }

    /// `{n, p50_ms, p90_ms, p99_ms, mean_ms, max_ms}`.
    pub fn to_json(&self) -> Value {
        let ms = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e5).round() / 100.0);
        json!({
            "n": self.len(),
            "p50_ms": ms(self.p50()),
            "p90_ms": ms(self.percentile(90.0)),
            "p99_ms": ms(self.percentile(99.0)),
            "mean_ms": ms(self.mean()),
            "max_ms": ms(self.percentile(100.0)),
        })
    }
}

/// A duration for the table: `3.21 ms`, `1.23 s`.
pub fn fmt_dur(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d >= Duration::from_secs(1) => format!("{:.2} s", d.as_secs_f64()),
        Some(d) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
    }
}

/// `a / b` of two p50s, if both exist.
pub fn ratio(a: Option<Duration>, b: Option<Duration>) -> Option<f64> {
    let (a, b) = (a?.as_secs_f64(), b?.as_secs_f64());
    (b > 0.0).then(|| a / b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut s = Samples::default();
        for i in 1..=100 {
            s.push(Duration::from_millis(i));
        }
        assert_eq!(s.p50(), Some(Duration::from_millis(50)));
        assert_eq!(s.percentile(99.0), Some(Duration::from_millis(99)));
        assert_eq!(s.percentile(100.0), Some(Duration::from_millis(100)));
    }
}
