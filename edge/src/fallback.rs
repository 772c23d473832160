//! Which hubs QUIC recently failed to reach (`quicWithFallback`): reconnects to such a hub go
//! straight to TLS, instead of paying the QUIC fallback delay each time on a path that blocks
//! UDP, until QUIC is worth another try.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The hubs an edge fell back to TLS for, and when.
#[derive(Debug)]
pub(crate) struct QuicFallbacks {
    retry_after: Duration,
    fell_back: Mutex<HashMap<String, Instant>>,
}

impl QuicFallbacks {
    /// QUIC is tried again `retry_after` after a fallback.
    pub(crate) fn new(retry_after: Duration) -> Self {
        Self {
            retry_after,
            fell_back: Mutex::default(),
        }
    }

    fn hubs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.fell_back.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a connection to `hub` should skip QUIC at `now`.
    pub(crate) fn skip_quic(&self, hub: &str, now: Instant) -> bool {
        self.hubs()
            .get(hub)
            .is_some_and(|at| now.saturating_duration_since(*at) < self.retry_after)
    }

    /// QUIC did not reach `hub` at `now` and TLS did.
    pub(crate) fn fell_back(&self, hub: &str, now: Instant) {
        self.hubs().insert(hub.to_owned(), now);
    }

    /// QUIC reached `hub`.
    pub(crate) fn quic_worked(&self, hub: &str) {
        self.hubs().remove(hub);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quic_is_skipped_after_a_fallback_until_it_is_worth_another_try() {
        let fallbacks = QuicFallbacks::new(Duration::from_secs(300));
        let start = Instant::now();
        assert!(!fallbacks.skip_quic("hub-a:8443", start));
        fallbacks.fell_back("hub-a:8443", start);
        assert!(fallbacks.skip_quic("hub-a:8443", start + Duration::from_secs(299)));
        assert!(!fallbacks.skip_quic("hub-b:8443", start), "per hub");
        assert!(!fallbacks.skip_quic("hub-a:8443", start + Duration::from_secs(300)));
        fallbacks.fell_back("hub-a:8443", start);
        fallbacks.quic_worked("hub-a:8443");
        assert!(!fallbacks.skip_quic("hub-a:8443", start));
    }
}
