//! The health of a served model: each request's [`Outcome`] is counted in the model's
//! [`HealthWindow`]; every report interval the actor takes the window's [`WindowStats`]
//! and [`window_status`] judges them against the plan's runtime limit.

use pollen_protocol::rollout::ErrorClass;

/// How one inference ended, for the health window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered.
    Ok,
    /// The request did not fit the model: the client's fault, not counted as an error.
    BadInput,
    /// The model failed.
    Error,
    /// The runtime panicked.
    Panic,
}

/// Latency buckets of the health window: bucket `i` holds latencies up to `1.25^i` µs
/// (about 25% resolution from 1 µs to over 100 s).
const LATENCY_BUCKETS: usize = 84;

/// What a model did over one report window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Requests that reached the model (bad input included).
    pub requests: u64,
    /// Requests the model failed (panics included).
    pub errors: u64,
    /// Runtime panics.
    pub panics: u64,
    /// Median latency of answered requests, µs (bucket upper bound; 0 when none).
    pub p50_us: u32,
    /// 99th percentile, µs.
    pub p99_us: u32,
    /// Language-model generations that ran (their latencies above are times to first
    /// token).
    pub generations: u64,
    /// Their tokens after the first (decode steps).
    pub decode_tokens: u64,
    /// Time those decode steps took, µs.
    pub decode_us: u64,
}

/// The health a serving window amounts to: a crash loop when the runtime panicked
/// `crash_loop_panics` times, runtime errors when the window broke the plan's `limit`,
/// else healthy.
pub fn window_status(
    w: &WindowStats,
    limit: Option<pollen_protocol::rollout::RuntimeLimit>,
    crash_loop_panics: u64,
) -> pollen_protocol::rollout::HealthStatus {
    use pollen_protocol::rollout::HealthStatus;
    if w.panics >= crash_loop_panics.max(1) {
        HealthStatus::Failed {
            class: ErrorClass::CrashLoop,
            detail: format!(
                "the runtime panicked {} times in {} requests over the last window",
                w.panics, w.requests
            ),
        }
    } else if limit.is_some_and(|l| l.broken(w.requests, w.errors)) {
        HealthStatus::Failed {
            class: ErrorClass::RuntimeErrors,
            detail: format!(
                "{} of {} inferences failed over the last window",
                w.errors, w.requests
            ),
        }
    } else {
        HealthStatus::Ok
    }
}

/// Counters of the current report window of a served model: fixed size, lock held for a
/// few increments only.
#[derive(Debug, Default)]
pub struct HealthWindow {
    inner: std::sync::Mutex<Counts>,
}

/// The counters of one window.
#[derive(Debug)]
struct Counts {
    /// Answered requests by latency bucket (see [`LATENCY_BUCKETS`]).
    buckets: [u64; LATENCY_BUCKETS],
    /// Requests that reached the model, bad input included.
    requests: u64,
    /// Requests the model failed, panics included.
    errors: u64,
    /// Runtime panics.
    panics: u64,
    generations: u64,
    decode_tokens: u64,
    decode_us: u64,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            buckets: [0; LATENCY_BUCKETS],
            requests: 0,
            errors: 0,
            panics: 0,
            generations: 0,
            decode_tokens: 0,
            decode_us: 0,
        }
    }
}

fn bucket_of(us: f64) -> usize {
    if us <= 1.0 {
        return 0;
    }
    ((us.ln() / 1.25f64.ln()).ceil() as usize).min(LATENCY_BUCKETS - 1)
}

fn bucket_upper_us(i: usize) -> u32 {
    1.25f64.powi(i as i32).ceil().min(f64::from(u32::MAX)) as u32
}

impl HealthWindow {
    /// Count one request that took `elapsed`.
    pub fn record(&self, elapsed: std::time::Duration, outcome: Outcome) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.requests += 1;
        match outcome {
            Outcome::Ok => g.buckets[bucket_of(elapsed.as_secs_f64() * 1e6)] += 1,
            Outcome::BadInput => {}
            Outcome::Error => g.errors += 1,
            Outcome::Panic => {
                g.errors += 1;
                g.panics += 1;
            }
        }
    }

    /// Count a language-model generation that ran: its tokens after the first and the
    /// time they took (its request is counted by [`HealthWindow::record`]).
    pub fn record_generation(&self, decode_tokens: u64, decode: std::time::Duration) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.generations += 1;
        g.decode_tokens += decode_tokens;
        g.decode_us += u64::try_from(decode.as_micros()).unwrap_or(u64::MAX);
    }

    /// The window's figures; the window starts again empty.
    pub fn take(&self) -> WindowStats {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Counts {
            buckets,
            requests,
            errors,
            panics,
            generations,
            decode_tokens,
            decode_us,
        } = std::mem::take(&mut *g);
        drop(g);
        let answered: u64 = buckets.iter().sum();
        let pct = |q: f64| -> u32 {
            if answered == 0 {
                return 0;
            }
            let rank = ((answered as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, n) in buckets.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return bucket_upper_us(i);
                }
            }
            bucket_upper_us(LATENCY_BUCKETS - 1)
        };
        WindowStats {
            requests,
            errors,
            panics,
            p50_us: pct(0.5),
            p99_us: pct(0.99),
            generations,
            decode_tokens,
            decode_us,
        }
    }
}

impl WindowStats {
    /// The language-model part of a health report: `None` without generations.
    pub fn lm_health(&self) -> Option<pollen_protocol::rollout::LmHealth> {
        (self.generations > 0).then(|| pollen_protocol::rollout::LmHealth {
            generations: self.generations,
            decode_tokens: self.decode_tokens,
            decode_millitokens_per_s: (self.decode_tokens as u128 * 1_000_000_000)
                .checked_div(u128::from(self.decode_us))
                .map_or(0, |v| u64::try_from(v).unwrap_or(u64::MAX)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_window_counts_and_percentiles() {
        let w = HealthWindow::default();
        for i in 0..98u64 {
            w.record(std::time::Duration::from_micros(100 + i), Outcome::Ok);
        }
        w.record(std::time::Duration::from_millis(50), Outcome::Ok);
        w.record(std::time::Duration::from_millis(50), Outcome::Ok);
        w.record(std::time::Duration::from_micros(10), Outcome::BadInput);
        w.record(std::time::Duration::from_micros(10), Outcome::Error);
        w.record(std::time::Duration::from_micros(10), Outcome::Panic);
        let s = w.take();
        assert_eq!((s.requests, s.errors, s.panics), (103, 2, 1));
        // Bucket bounds are within 25% above the true value.
        assert!((100..=186).contains(&s.p50_us), "p50 {}", s.p50_us);
        assert!((50_000..=62_500).contains(&s.p99_us), "p99 {}", s.p99_us);
        assert_eq!(
            w.take(),
            WindowStats::default(),
            "taking empties the window"
        );
    }

    #[test]
    fn windows_become_runtime_and_crash_loop_failures() {
        use pollen_protocol::rollout::{HealthStatus, RuntimeLimit};
        let limit = Some(RuntimeLimit {
            max_error_ppm: 50_000,
            min_requests: 20,
        });
        let w = |requests, errors, panics| WindowStats {
            requests,
            errors,
            panics,
            ..WindowStats::default()
        };
        let class = |s: HealthStatus| match s {
            HealthStatus::Failed { class, .. } => Some(class),
            _ => None,
        };
        // 5% of 100 is within the limit, 6% is not; 19 requests prove nothing.
        assert_eq!(class(window_status(&w(100, 5, 0), limit, 3)), None);
        assert_eq!(
            class(window_status(&w(100, 6, 0), limit, 3)),
            Some(ErrorClass::RuntimeErrors)
        );
        assert_eq!(class(window_status(&w(19, 19, 0), limit, 3)), None);
        // Without a limit in the plan errors alone never fail; panics still do.
        assert_eq!(class(window_status(&w(100, 90, 0), None, 3)), None);
        assert_eq!(
            class(window_status(&w(10, 3, 3), None, 3)),
            Some(ErrorClass::CrashLoop)
        );
        assert_eq!(class(window_status(&w(10, 2, 2), None, 3)), None);
    }
}
