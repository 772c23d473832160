//! A tunnel session, whatever its transport: what hub and edge code holds and drives.

use bytes::Bytes;
use remoteingress_wire::frame::FrameType;
use tokio_util::sync::CancellationToken;

use crate::mux::{MuxSession, SessionError, SessionStats};
use crate::quic::QuicSession;
use crate::stream::{StreamReader, StreamWriter};

/// A cheap, cloneable handle to a running tunnel session.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    transport: Transport,
}

#[derive(Clone, Debug)]
enum Transport {
    Mux(MuxSession),
    Quic(QuicSession),
}

/// Calls the same method on whichever transport the session uses.
macro_rules! dispatch {
    ($self:ident, $session:ident => $call:expr) => {
        match &$self.transport {
            Transport::Mux($session) => $call,
            Transport::Quic($session) => $call,
        }
    };
}

impl SessionHandle {
    pub(crate) fn mux(session: MuxSession) -> Self {
        Self {
            transport: Transport::Mux(session),
        }
    }

    pub(crate) fn quic(session: QuicSession) -> Self {
        Self {
            transport: Transport::Quic(session),
        }
    }

    /// `tcpTls` or `quic`.
    pub fn transport(&self) -> &'static str {
        match self.transport {
            Transport::Mux(_) => "tcpTls",
            Transport::Quic(_) => "quic",
        }
    }

    /// Opens a stream (edge) whose first bytes are `header` (the client's PROXY v1 line).
    pub async fn open(&self, header: Bytes) -> Result<(StreamReader, StreamWriter), SessionError> {
        dispatch!(self, s => s.open(header).await)
    }

    /// Sends a tunnel-level message (CONFIG, CONFIG_ACK).
    pub async fn send_control(&self, kind: FrameType, payload: Bytes) -> Result<(), SessionError> {
        dispatch!(self, s => s.send_control(kind, payload).await)
    }

    /// Opens a UDP session (edge) with its PROXY v2 header; returns its id.
    pub async fn open_udp(&self, header: Bytes) -> Result<u32, SessionError> {
        dispatch!(self, s => s.open_udp(header).await)
    }

    /// Sends one datagram of a UDP session, or drops it (counted); true if sent.
    pub fn send_udp(&self, id: u32, payload: Bytes) -> bool {
        dispatch!(self, s => s.send_udp(id, payload))
    }

    /// Tells the peer that a UDP session ended.
    pub fn close_udp(&self, id: u32) {
        dispatch!(self, s => s.close_udp(id))
    }

    /// Ends the session with `reason`.
    pub fn close(&self, reason: impl Into<String>) {
        let reason = reason.into();
        dispatch!(self, s => s.close(reason))
    }

    /// Resolves once the session has ended.
    pub async fn closed(&self) {
        dispatch!(self, s => s.closed().await)
    }

    /// A token cancelled when the session ends, for work that must stop with it.
    pub fn cancellation(&self) -> CancellationToken {
        dispatch!(self, s => s.cancellation())
    }

    /// True once the session has ended.
    pub fn is_closed(&self) -> bool {
        dispatch!(self, s => s.is_closed())
    }

    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<String> {
        dispatch!(self, s => s.close_reason())
    }

    /// Streams open now.
    pub fn active_streams(&self) -> usize {
        dispatch!(self, s => s.active_streams())
    }

    /// Last round trip of the tunnel, once known (on the TLS transport the edge learns it from
    /// the hub's PINGs).
    pub fn rtt(&self) -> Option<std::time::Duration> {
        dispatch!(self, s => s.rtt())
    }

    /// Traffic counters.
    pub fn stats(&self) -> &SessionStats {
        dispatch!(self, s => s.stats())
    }
}
