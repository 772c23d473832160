//! The pinger: an edge whose hub answers (extension `liveness`) PINGs every interval, and its
//! hub PINGs only when it heard nothing from the edge for an interval; a hub PINGs an original
//! edge every interval. At most one PING is unanswered, and its PONG measures the round trip.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use remoteingress_wire::frame::{Frame, FrameType};

use super::shared::{Outgoing, Shared};
use crate::clock::now;
use crate::error::{CloseReason, ProtocolViolation};
use crate::lifecycle::TaskEnd;
use crate::options::Role;

/// Sends a PING every interval unless the last one is still unanswered or, on the hub of an
/// edge that probes (it agreed `liveness`), the edge was heard from during the interval: an
/// idle pair exchanges about one PING a second, and the edge hears from its hub at least every
/// interval. (When the edge skipped its probe too after hearing the hub's, the two took turns
/// and the edge could wait two intervals, its suspect threshold, for a word.)
pub(crate) async fn ping_loop(shared: Arc<Shared>) -> TaskEnd {
    let mut interval = tokio::time::interval(shared.options.ping_interval);
    interval.tick().await;
    let mut heard = shared.lifecycle.heard();
    loop {
        interval.tick().await;
        let heard_before = std::mem::replace(&mut heard, shared.lifecycle.heard());
        let edge_probes = shared.role == Role::Hub && shared.liveness_agreed();
        if edge_probes && heard != heard_before {
            continue;
        }
        // The payload is opaque to the protocol; ours carries the last round trip for the peer.
        let token = shared.rtt_micros().to_be_bytes();
        let due = {
            let mut sent = shared.ping_sent.lock().unwrap_or_else(|p| p.into_inner());
            let due = sent.is_none();
            if due {
                *sent = Some((token, now()));
            }
            due
        };
        if due {
            shared
                .lanes
                .control
                .send(Outgoing::Frame(Frame::ping(FrameType::Ping, token)))
                .await
                .map_err(|_| CloseReason::Local("the writer is gone".into()))?;
        }
    }
}

/// Records the round trip a PONG answers; a PONG without its PING breaks the protocol.
pub(crate) fn pong_received(
    shared: &Shared,
    token: Option<[u8; 8]>,
) -> Result<Duration, ProtocolViolation> {
    let mut sent = shared.ping_sent.lock().unwrap_or_else(|p| p.into_inner());
    match sent.take() {
        Some((sent_token, at)) if Some(sent_token) == token => {
            let rtt = now().saturating_duration_since(at);
            let micros = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
            shared.rtt_us.store(micros, Ordering::Relaxed);
            Ok(rtt)
        }
        _ => Err(ProtocolViolation::UnmatchedPong),
    }
}
