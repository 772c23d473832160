//! The edge's watch on a tunnel's silence: a tunnel not heard from for two probe intervals is
//! suspect (reported once, so that its owner stops placing streams on it and dials a
//! replacement) before the liveness deadline declares it dead.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::clock::now;
use crate::event::SessionEvent;
use crate::lifecycle::{SessionCore, TaskEnd};

/// Silence after which a tunnel is suspect: two probe intervals, or the deadline if shorter.
pub(crate) fn suspect_after(ping_interval: Duration, deadline: Duration) -> Duration {
    (ping_interval * 2).min(deadline)
}

/// Reports [`SessionEvent::Suspect`] once the peer has been silent past [`suspect_after`] or
/// the session was marked suspect (an open left unconfirmed), then idles until the session ends.
pub(crate) async fn watch_silence<S: SessionCore>(
    core: Arc<S>,
    events: mpsc::Sender<SessionEvent>,
) -> TaskEnd {
    let options = core.options();
    let threshold = suspect_after(options.ping_interval, options.idle_timeout);
    let mut ticks =
        tokio::time::interval((options.ping_interval / 4).max(Duration::from_millis(5)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = core.heard();
    let mut heard_at = now();
    loop {
        ticks.tick().await;
        let heard = core.heard();
        if heard != last {
            last = heard;
            heard_at = now();
        }
        let silent = now().saturating_duration_since(heard_at);
        let lifecycle = core.lifecycle();
        if lifecycle.is_suspect() || (core.probes_answered() && silent >= threshold) {
            lifecycle.mark_suspect();
            let _ = events.send(SessionEvent::Suspect { silent }).await;
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspicion_comes_before_the_deadline() {
        let second = Duration::from_secs(1);
        assert_eq!(suspect_after(second, 3 * second), 2 * second);
        assert_eq!(suspect_after(second, second), second);
    }
}
