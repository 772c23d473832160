//! The sessions' clock for rates, lanes and round trips: tokio's, so that tests can pause and
//! advance it; outside such tests it is the system's monotonic clock.

use std::time::Instant;

/// Now, on the sessions' clock.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
