//! What one edge may hold at the hub across all its tunnels: tunnelled TCP streams, UDP
//! sessions and the flow-control budget. Every tunnel of an edge draws on the same quota, so
//! that an edge keeping several tunnels (or a compromised one opening many) never gets more of
//! any than one tunnel would.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits every edge gets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EdgeLimits {
    /// Tunnels the edge may keep at once.
    pub(crate) tunnels: usize,
    /// Streams across its tunnels.
    pub(crate) streams: usize,
    /// UDP sessions across its tunnels.
    pub(crate) udp_sessions: usize,
    /// Flow-control budget shared out among its tunnels.
    pub(crate) budget: u64,
}

impl EdgeLimits {
    /// Each of `tunnels` tunnels' share of the edge's flow budget.
    pub(crate) fn budget_share(&self, tunnels: usize) -> u64 {
        self.budget / tunnels.max(1) as u64
    }
}

/// One edge's streams and UDP sessions in use, and its budget, shared by its tunnels.
#[derive(Debug)]
pub(crate) struct EdgeQuota {
    streams: Arc<Semaphore>,
    udp_sessions: Arc<Semaphore>,
    limits: EdgeLimits,
}

impl EdgeQuota {
    pub(crate) fn new(limits: EdgeLimits) -> Self {
        let limits = EdgeLimits {
            streams: limits.streams.min(Semaphore::MAX_PERMITS),
            udp_sessions: limits.udp_sessions.min(Semaphore::MAX_PERMITS),
            ..limits
        };
        Self {
            streams: Arc::new(Semaphore::new(limits.streams)),
            udp_sessions: Arc::new(Semaphore::new(limits.udp_sessions)),
            limits,
        }
    }

    /// A stream of the edge, held until it ends; `None` when the edge has all it may.
    pub(crate) fn stream(&self) -> Option<OwnedSemaphorePermit> {
        self.streams.clone().try_acquire_owned().ok()
    }

    /// A UDP session of the edge, held until it ends; `None` when the edge has all it may.
    pub(crate) fn udp_session(&self) -> Option<OwnedSemaphorePermit> {
        self.udp_sessions.clone().try_acquire_owned().ok()
    }

    /// Each of `tunnels` tunnels' share of the edge's flow budget.
    pub(crate) fn budget_share(&self, tunnels: usize) -> u64 {
        self.limits.budget_share(tunnels)
    }

    /// Nothing of the quota is in use: it can be forgotten with the edge's last tunnel.
    pub(crate) fn is_unused(&self) -> bool {
        self.streams.available_permits() == self.limits.streams
            && self.udp_sessions.available_permits() == self.limits.udp_sessions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn streams_and_udp_sessions_are_counted_apart_and_given_back() {
        let quota = EdgeQuota::new(EdgeLimits {
            tunnels: 1,
            streams: 2,
            udp_sessions: 1,
            budget: 1000,
        });
        let first = quota.stream().unwrap();
        let second = quota.stream().unwrap();
        assert!(quota.stream().is_none());
        let udp = quota.udp_session().unwrap();
        assert!(quota.udp_session().is_none());
        drop((first, udp));
        assert!(!quota.is_unused());
        let third = quota.stream().unwrap();
        assert!(quota.udp_session().is_some());
        drop((second, third));
        assert!(quota.is_unused());
    }
}
