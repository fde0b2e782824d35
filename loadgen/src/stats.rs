//! What one thread records (HdrHistograms of nanoseconds, counters), how
//! the threads' records merge, and the two output formats for a histogram:
//! percentiles for the summary and JSON, and HdrHistogram's percentile
//! distribution (`.hgrm`) for plotting tools.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Values from 1 ns to 1 hour at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// What one thread saw.
#[derive(Clone, Debug)]
pub struct Recorder {
    /// Request latency from the due time (open loop) or the send (closed loop).
    pub latency: Histogram<u64>,
    /// How late each send was against its due time.
    pub lag: Histogram<u64>,
    /// Stream and channel items: from credit to arrival.
    pub item_latency: Histogram<u64>,
    /// Requests sent.
    pub sent: u64,
    /// Requests completed in the measurement window.
    pub ok: u64,
    /// Requests that failed (in the window or not).
    pub errors: u64,
    /// Requests still unanswered when the run ended.
    pub unanswered: u64,
    /// The first failure, for the message.
    pub first_error: Option<String>,
    /// Stream or channel items received in the window.
    pub items: u64,
    /// Stream or channel items received in all (warm-up and drain too).
    pub items_total: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            latency: histogram(),
            lag: histogram(),
            item_latency: histogram(),
            sent: 0,
            ok: 0,
            errors: 0,
            unanswered: 0,
            first_error: None,
            items: 0,
            items_total: 0,
        }
    }
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

impl Recorder {
    /// A completed request's latency.
    pub fn record_latency(&mut self, d: Duration) {
        self.latency.saturating_record(ns(d));
    }

    /// A send's lateness.
    pub fn record_lag(&mut self, d: Duration) {
        self.lag.saturating_record(ns(d));
    }

    /// An open-loop request due at `due` went out at `sent`; its lag counts
    /// when it is `measured` (due inside the window).
    pub fn record_send(&mut self, due: Instant, sent: Instant, measured: bool) {
        self.sent += 1;
        if measured {
            self.record_lag(sent.saturating_duration_since(due));
        }
    }

    /// An item's latency.
    pub fn record_item(&mut self, d: Duration) {
        self.item_latency.saturating_record(ns(d));
    }

    /// A failed request.
    pub fn error(&mut self, message: impl FnOnce() -> String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(message());
        }
    }

    /// Adds another thread's record to this one.
    pub fn merge(&mut self, other: &Recorder) {
        // Same bounds everywhere, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.lag.add(&other.lag);
        let _ = self.item_latency.add(&other.item_latency);
        self.sent += other.sent;
        self.ok += other.ok;
        self.errors += other.errors;
        self.unanswered += other.unanswered;
        self.items += other.items;
        self.items_total += other.items_total;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }
}

/// Percentiles of a histogram, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// 50th percentile.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
    /// 99.99th.
    pub p9999: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of `h` (nanoseconds) in microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |v: u64| v as f64 / 1000.0;
        Self {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            p9999: us(h.value_at_quantile(0.9999)),
            max: us(h.max()),
        }
    }

    /// `p50 35.1 p90 40.2 ...` in microseconds.
    pub fn line(&self) -> String {
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} p99.99 {} max {} (µs)",
            short(self.p50),
            short(self.p90),
            short(self.p99),
            short(self.p999),
            short(self.p9999),
            short(self.max)
        )
    }
}

/// A number of microseconds, short: 3 significant digits, at least whole.
pub fn short(us: f64) -> String {
    if us >= 100.0 {
        format!("{us:.0}")
    } else if us >= 10.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.2}")
    }
}

/// HdrHistogram's percentile distribution format (what
/// `outputPercentileDistribution` writes, and HdrHistogram's plotters read),
/// with values divided by `scale` (1000.0: nanoseconds shown as µs).
pub fn hgrm(h: &Histogram<u64>, scale: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if !h.is_empty() {
        let mut total = 0u64;
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let value = v.value_iterated_to() as f64 / scale;
            if q < 1.0 {
                let _ = writeln!(
                    out,
                    "{value:12.3} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(out, "{value:12.3} {q:2.12} {total:10}");
            }
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / scale,
        h.stdev() / scale
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / scale,
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        // As HdrHistogram sizes them: 2^ceil(log2(2 * 10^significant digits)).
        (2.0 * 10f64.powi(i32::from(h.sigfig())))
            .log2()
            .ceil()
            .exp2() as u64
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled() -> Histogram<u64> {
        let mut h = histogram();
        // 1..=1000 µs, once each.
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        h
    }

    #[test]
    fn percentiles_in_microseconds() {
        let p = Percentiles::of(&filled());
        assert_eq!(p.count, 1000);
        // Within the histogram's 3 significant digits.
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(near(p.p50, 500.0), "{p:?}");
        assert!(near(p.p90, 900.0), "{p:?}");
        assert!(near(p.p99, 990.0), "{p:?}");
        assert!(near(p.p999, 999.0), "{p:?}");
        assert!(near(p.max, 1000.0), "{p:?}");
        assert!(near(p.mean, 500.5), "{p:?}");
        assert_eq!(Percentiles::of(&histogram()), Percentiles::default());
    }

    #[test]
    fn merged_threads_are_one_histogram() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for us in 1..=500u64 {
            a.record_latency(Duration::from_micros(us));
        }
        for us in 501..=1000u64 {
            b.record_latency(Duration::from_micros(us));
        }
        a.ok = 500;
        b.ok = 500;
        b.error(|| "first".into());
        b.error(|| "second".into());
        a.merge(&b);
        assert_eq!(a.ok, 1000);
        assert_eq!(a.errors, 2);
        assert_eq!(a.first_error.as_deref(), Some("first"));
        assert_eq!(Percentiles::of(&a.latency), Percentiles::of(&filled()));
    }

    #[test]
    fn hgrm_has_the_percentile_distribution_layout() {
        let text = hgrm(&filled(), 1000.0);
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
        );
        assert_eq!(lines.next(), Some(""));
        let rows: Vec<Vec<f64>> = lines
            .by_ref()
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().map(|f| f.parse().unwrap()).collect())
            .collect();
        // Starts at the smallest value, 1 µs, percentile 0 ...
        assert_eq!(rows[0][0], 1.0);
        assert_eq!(rows[0][1], 0.0);
        assert_eq!(rows[0][2], 1.0);
        // ... climbs monotonically ...
        for w in rows.windows(2) {
            assert!(w[1][0] >= w[0][0] && w[1][1] >= w[0][1] && w[1][2] >= w[0][2]);
        }
        // ... and ends at the max with every value counted, without the last column.
        let last = rows.last().unwrap();
        assert_eq!(last.len(), 3);
        assert_eq!(last[1], 1.0);
        assert_eq!(last[2], 1000.0);
        assert!((last[0] - 1000.0).abs() < 1.0, "{last:?}");
        // The middle row at 50% says 500 µs, and 1/(1-p) = 2.
        let half = rows.iter().find(|r| r[1] == 0.5).unwrap();
        assert!((half[0] - 500.0).abs() <= 0.5, "{half:?}");
        assert_eq!(half[3], 2.0);
        let footer: Vec<&str> = text.lines().filter(|l| l.starts_with("#[")).collect();
        assert_eq!(footer.len(), 3, "{text}");
        let mean: f64 = footer[0]
            .split('=')
            .nth(1)
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        assert!((mean - 500.5).abs() < 0.5, "{mean}");
        assert!(
            footer[1].contains("Total count    =         1000]"),
            "{text}"
        );
        assert!(
            footer[2].contains("SubBuckets     =         2048]"),
            "{text}"
        );
    }
}
