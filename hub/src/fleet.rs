//! The fleet a restarted hub waits for before it calls itself ready: the edges it held when it
//! last began to drain, recorded in a file of its state directory and read (and removed) at
//! start. So a rolling restart does not drain the next hub while edges still depend on it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Record {
    edges: usize,
}

/// Records that the hub held `edges` as it began to drain. A failure is logged: the restarted
/// hub then does not wait for its fleet.
pub(crate) fn record(path: &Path, edges: usize) {
    let written = serde_json::to_vec(&Record { edges })
        .map_err(std::io::Error::other)
        .and_then(|json| std::fs::write(path, json));
    if let Err(error) = written {
        tracing::warn!(path = %path.display(), %error, "cannot record the fleet for the restart; the next start will not wait for it");
    }
}

/// The edges recorded at the last drain, if any; the record is removed, so that a later crash
/// does not reuse it.
pub(crate) fn take(path: &Path) -> Option<usize> {
    let text = std::fs::read(path).ok()?;
    if let Err(error) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), %error, "cannot remove the fleet record");
    }
    serde_json::from_slice::<Record>(&text)
        .map(|record| record.edges)
        .ok()
}

/// Whether the expected fleet is back.
#[derive(Debug)]
pub(crate) struct FleetWait {
    expected: Option<usize>,
    until: Instant,
    back: AtomicBool,
}

impl FleetWait {
    /// Waits for `expected` edges (none: nothing to wait for), at most `wait` from `now`.
    pub(crate) fn new(expected: Option<usize>, wait: Duration, now: Instant) -> Self {
        Self {
            expected,
            until: now + wait,
            back: AtomicBool::new(false),
        }
    }

    /// The edges waited for, if any.
    pub(crate) fn expected(&self) -> Option<usize> {
        self.expected
    }

    /// True once `connected` edges reached the expectation or the wait is over; it stays true.
    pub(crate) fn is_back(&self, connected: usize, now: Instant) -> bool {
        if self.back.load(Ordering::Relaxed) {
            return true;
        }
        let back = self.expected.is_none_or(|expected| connected >= expected) || now >= self.until;
        if back {
            self.back.store(true, Ordering::Relaxed);
        }
        back
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_fleet_is_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("fleet.json");
        assert_eq!(take(&state), None);
        record(&state, 2_000);
        assert_eq!(take(&state), Some(2_000));
        assert_eq!(take(&state), None, "removed once read");
    }

    #[test]
    fn ready_once_the_fleet_is_back_or_the_wait_is_over_and_then_for_good() {
        let now = Instant::now();
        let wait = Duration::from_secs(60);
        let fleet = FleetWait::new(Some(3), wait, now);
        assert!(!fleet.is_back(2, now));
        assert!(fleet.is_back(3, now));
        assert!(fleet.is_back(0, now), "edges leaving later change nothing");
        let gone = FleetWait::new(Some(3), wait, now);
        assert!(!gone.is_back(1, now + wait / 2));
        assert!(gone.is_back(1, now + wait), "the wait is over");
        assert!(FleetWait::new(None, wait, now).is_back(0, now));
    }
}
