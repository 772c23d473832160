//! Reconnect delays: exponential with full jitter, reset after a stable connection, and never
//! shorter than a hub's retry hint.

use std::time::Duration;

/// Reconnect delay policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// First delay.
    pub min: Duration,
    /// Largest delay.
    pub max: Duration,
    /// A connection that lasted this long resets the delay to `min`.
    pub stable_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            min: Duration::from_secs(1),
            max: Duration::from_secs(30),
            stable_after: Duration::from_secs(60),
        }
    }
}

/// The delay sequence of one edge.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    policy: BackoffPolicy,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            next: policy.min,
        }
    }

    /// The delay before the next attempt given a random factor in [0, 1): anywhere between
    /// zero and the nominal delay (full jitter: a fleet that lost its hub at once does not come
    /// back at once); after a hub's `hint`, between the hint and twice it. The nominal delay
    /// then doubles.
    pub(crate) fn next_delay(&mut self, jitter: f64, hint: Option<Duration>) -> Duration {
        let nominal = self.next;
        self.next = (self.next * 2).min(self.policy.max);
        let jitter = jitter.clamp(0.0, 1.0);
        match hint {
            Some(hint) => hint + hint.mul_f64(jitter),
            None => nominal.mul_f64(jitter),
        }
    }

    /// Called when a connection ends after lasting `lasted`.
    pub(crate) fn connection_ended(&mut self, lasted: Duration) {
        if lasted >= self.policy.stable_after {
            self.next = self.policy.min;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets_after_a_stable_minute() {
        let mut backoff = Backoff::new(BackoffPolicy::default());
        let nominal: Vec<u64> = (0..7)
            .map(|_| backoff.next_delay(1.0, None).as_secs())
            .collect();
        assert_eq!(nominal, vec![1, 2, 4, 8, 16, 30, 30]);
        backoff.connection_ended(Duration::from_secs(5));
        assert_eq!(backoff.next_delay(1.0, None), Duration::from_secs(30));
        backoff.connection_ended(Duration::from_secs(60));
        assert_eq!(backoff.next_delay(1.0, None), Duration::from_secs(1));
    }

    #[test]
    fn full_jitter_spreads_from_zero_to_the_nominal_delay() {
        let mut low = Backoff::new(BackoffPolicy::default());
        let mut high = low.clone();
        assert_eq!(low.next_delay(0.0, None), Duration::ZERO);
        assert_eq!(high.next_delay(0.5, None), Duration::from_millis(500));
    }

    #[test]
    fn a_hubs_hint_is_the_least_delay() {
        let mut backoff = Backoff::new(BackoffPolicy::default());
        let hint = Some(Duration::from_secs(5));
        assert_eq!(backoff.next_delay(0.0, hint), Duration::from_secs(5));
        assert_eq!(backoff.next_delay(0.5, hint), Duration::from_millis(7500));
    }
}
