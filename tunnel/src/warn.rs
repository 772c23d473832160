//! Warnings that an attacker can trigger at will, logged rate-limited: a few lines per cause and
//! window, then one line with the count of what was suppressed. The counts are kept per cause
//! for metrics ([`suppressed_totals`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, Opts};

/// Lines logged per cause and window before the rest are suppressed.
const LINES_PER_WINDOW: u64 = 5;
/// The window, in milliseconds.
const WINDOW_MS: u64 = 10_000;

/// The rate limiter of one warning site; made by [`warn_limited!`](crate::warn_limited).
#[derive(Debug)]
pub struct WarnLimiter {
    cause: &'static str,
    /// Start of the current window, in ms since the process's first limited warning.
    window_start: AtomicU64,
    /// Lines logged in the current window.
    logged: AtomicU64,
    /// Suppressed since the last line that was logged.
    pending: AtomicU64,
    /// Suppressed in all.
    total: AtomicU64,
    registered: AtomicBool,
}

fn elapsed_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

fn sites() -> &'static Mutex<Vec<&'static WarnLimiter>> {
    static SITES: OnceLock<Mutex<Vec<&'static WarnLimiter>>> = OnceLock::new();
    SITES.get_or_init(|| Mutex::new(Vec::new()))
}

impl WarnLimiter {
    /// A limiter for warnings of `cause` (a stable snake_case label).
    pub const fn new(cause: &'static str) -> Self {
        Self {
            cause,
            window_start: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            total: AtomicU64::new(0),
            registered: AtomicBool::new(false),
        }
    }

    /// Whether this occurrence is logged; if so, how many were suppressed since the last one.
    pub fn admit(&'static self) -> Option<u64> {
        if !self.registered.swap(true, Ordering::Relaxed) {
            sites().lock().unwrap_or_else(|p| p.into_inner()).push(self);
        }
        let now = elapsed_ms();
        let start = self.window_start.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= WINDOW_MS
            && self
                .window_start
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.logged.store(0, Ordering::Relaxed);
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < LINES_PER_WINDOW {
            Some(self.pending.swap(0, Ordering::Relaxed))
        } else {
            self.pending.fetch_add(1, Ordering::Relaxed);
            self.total.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Warnings suppressed so far in this process, per cause.
pub fn suppressed_totals() -> Vec<(&'static str, u64)> {
    let mut totals: Vec<(&'static str, u64)> = Vec::new();
    for site in sites().lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let count = site.total.load(Ordering::Relaxed);
        match totals.iter_mut().find(|(cause, _)| *cause == site.cause) {
            Some((_, total)) => *total += count,
            None => totals.push((site.cause, count)),
        }
    }
    totals.sort();
    totals
}

/// Exports [`suppressed_totals`] as `remoteingress_log_warnings_suppressed_total{cause}`.
#[derive(Debug)]
pub struct SuppressedWarnings {
    desc: Desc,
}

const SUPPRESSED: (&str, &str) = (
    "remoteingress_log_warnings_suppressed_total",
    "Rate-limited warnings left out of the log, by cause",
);

impl SuppressedWarnings {
    /// A collector to register with a Prometheus registry.
    pub fn new() -> prometheus::Result<Self> {
        Ok(Self {
            desc: Desc::new(
                SUPPRESSED.0.into(),
                SUPPRESSED.1.into(),
                vec!["cause".into()],
                HashMap::new(),
            )?,
        })
    }
}

impl Collector for SuppressedWarnings {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let build = || -> prometheus::Result<Vec<MetricFamily>> {
            let counter = IntCounterVec::new(Opts::new(SUPPRESSED.0, SUPPRESSED.1), &["cause"])?;
            for (cause, count) in suppressed_totals() {
                counter.with_label_values(&[cause]).inc_by(count);
            }
            Ok(counter.collect())
        };
        build().unwrap_or_default()
    }
}

/// `tracing::warn!` limited per call site: the first lines of each window are logged (with
/// `suppressed`, the count left out since the previous line), the rest only counted under
/// `cause`.
#[macro_export]
macro_rules! warn_limited {
    ($cause:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::warn::WarnLimiter = $crate::warn::WarnLimiter::new($cause);
        if let Some(suppressed) = LIMITER.admit() {
            ::tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_lines_of_a_window_and_counts_the_rest() {
        static SITE: WarnLimiter = WarnLimiter::new("test_cause");
        let admitted: Vec<Option<u64>> = (0..20).map(|_| SITE.admit()).collect();
        let logged = admitted.iter().filter(|a| a.is_some()).count() as u64;
        assert_eq!(logged, LINES_PER_WINDOW);
        assert!(suppressed_totals().contains(&("test_cause", 20 - LINES_PER_WINDOW)));
        let registry = prometheus::Registry::new();
        registry
            .register(Box::new(SuppressedWarnings::new().unwrap()))
            .unwrap();
        let exported = registry.gather();
        let family = exported
            .iter()
            .find(|f| f.name() == SUPPRESSED.0)
            .expect("exported");
        assert!(family.get_metric().iter().any(|m| {
            m.get_label()[0].value() == "test_cause"
                && m.get_counter().value() == (20 - LINES_PER_WINDOW) as f64
        }));
    }
}
