//! A tunnel session, whatever its transport: what hub and edge code holds and drives.

use std::time::Duration;

use bytes::Bytes;
use remoteingress_wire::extension::Extensions;
use remoteingress_wire::frame::FrameType;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{CloseReason, SessionError};
use crate::event::SessionEvent;
use crate::lifecycle::{Lifecycle, SessionCore, SessionStats};
use crate::mux::{self, MuxSession};
use crate::options::{Role, SessionOptions, Transport};
use crate::quic::{self, QuicSession};
use crate::stream::{StreamReader, StreamWriter};

/// A cheap, cloneable handle to a running tunnel session.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    session: Session,
}

#[derive(Clone, Debug)]
enum Session {
    Mux(MuxSession),
    Quic(QuicSession),
}

/// Calls the same method on whichever transport the session uses.
macro_rules! dispatch {
    ($self:ident, $session:ident => $call:expr) => {
        match &$self.session {
            Session::Mux($session) => $call,
            Session::Quic($session) => $call,
        }
    };
}

/// Starts a multiplexed (TLS transport) session over an established, authenticated byte
/// stream. `initial` holds bytes already read past the handshake; `agreed` the extensions the
/// edge confirms (the hub passes none and learns them from the edge). Events arrive on the
/// returned receiver until the session ends.
pub fn spawn_session<IO>(
    io: IO,
    initial: Bytes,
    role: Role,
    options: SessionOptions,
    agreed: Extensions,
) -> (SessionHandle, mpsc::Receiver<SessionEvent>)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (session, events) = mux::start(io, initial, role, options, agreed);
    let handle = SessionHandle {
        session: Session::Mux(session),
    };
    (handle, events)
}

/// Starts a QUIC session over an authenticated connection whose control stream is `control`
/// (`agreed` as for [`spawn_session`]).
pub(crate) fn spawn_quic_session(
    connection: quinn::Connection,
    control: (quinn::SendStream, quinn::RecvStream),
    initial: Bytes,
    role: Role,
    options: SessionOptions,
    agreed: Extensions,
) -> (SessionHandle, mpsc::Receiver<SessionEvent>) {
    let (session, events) = quic::start(connection, control, initial, role, options, agreed);
    let handle = SessionHandle {
        session: Session::Quic(session),
    };
    (handle, events)
}

impl SessionHandle {
    fn core(&self) -> &dyn SessionCore {
        match &self.session {
            Session::Mux(s) => &*s.shared,
            Session::Quic(s) => &*s.shared,
        }
    }

    fn lifecycle(&self) -> &Lifecycle {
        self.core().lifecycle()
    }

    /// The transport the session runs over.
    pub fn transport(&self) -> Transport {
        match self.session {
            Session::Mux(_) => Transport::TcpTls,
            Session::Quic(_) => Transport::Quic,
        }
    }

    /// Opens a stream (edge) whose first bytes are `header` (the client's PROXY v1 line).
    pub async fn open(&self, header: Bytes) -> Result<(StreamReader, StreamWriter), SessionError> {
        self.lifecycle().may_open()?;
        dispatch!(self, s => s.open(header).await)
    }

    /// Sends a tunnel-level message (CONFIG, CONFIG_ACK).
    pub async fn send_control(&self, kind: FrameType, payload: Bytes) -> Result<(), SessionError> {
        dispatch!(self, s => s.send_control(kind, payload).await)
    }

    /// Opens a UDP session (edge) with its PROXY v2 header; returns its id.
    pub async fn open_udp(&self, header: Bytes) -> Result<u32, SessionError> {
        match &self.session {
            Session::Mux(s) => s.open_udp(header).await,
            Session::Quic(s) => s.open_udp(header),
        }
    }

    /// Sends one datagram of a UDP session, or drops it (counted); true if sent.
    pub fn send_udp(&self, id: u32, payload: Bytes) -> bool {
        dispatch!(self, s => s.send_udp(id, payload))
    }

    /// Tells the peer that a UDP session ended.
    pub fn close_udp(&self, id: u32) {
        dispatch!(self, s => s.close_udp(id))
    }

    /// The extensions both sides confirmed (on the hub: once the edge's confirmation arrived).
    pub fn agreed(&self) -> Extensions {
        self.lifecycle().agreed.get()
    }

    /// Asks the edge (hub) to open no new streams on this tunnel and to connect elsewhere: now,
    /// or as soon as the edge confirms DRAIN if it has not confirmed its extensions yet. True if
    /// the edge has been asked; false if it does not know DRAIN (yet) or the tunnel is gone.
    pub async fn drain(&self) -> bool {
        if self.lifecycle().want_drain() {
            return self
                .send_control(FrameType::Drain, Bytes::new())
                .await
                .is_ok();
        }
        self.agreed().drain && !self.is_closed()
    }

    /// Ends the session from our side, with `reason`.
    pub fn close(&self, reason: impl Into<String>) {
        self.core().close(CloseReason::Local(reason.into()));
    }

    /// Resolves once the session has ended.
    pub async fn closed(&self) {
        self.lifecycle().closed().await;
    }

    /// A token cancelled when the session ends, for work that must stop with it.
    pub fn cancellation(&self) -> CancellationToken {
        self.lifecycle().cancellation()
    }

    /// True once the session has ended.
    pub fn is_closed(&self) -> bool {
        self.lifecycle().is_closed()
    }

    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.lifecycle().reason()
    }

    /// Bytes of unconsumed data the session's streams may hold together now.
    pub fn budget(&self) -> u64 {
        self.lifecycle().budget()
    }

    /// Changes that budget (the hub shares one edge's budget among its tunnels); credit
    /// granted from now on follows it.
    pub fn set_budget(&self, bytes: u64) {
        self.lifecycle().set_budget(bytes);
        if let Session::Quic(session) = &self.session {
            session.set_budget(bytes);
        }
    }

    /// Marks the tunnel suspect (an open it carried was not confirmed in time): it reports
    /// [`SessionEvent::Suspect`](crate::SessionEvent::Suspect) if it has not yet.
    pub fn mark_suspect(&self) {
        self.lifecycle().mark_suspect();
    }

    /// True once the tunnel is suspect: its hub went silent or left an open unconfirmed.
    pub fn is_suspect(&self) -> bool {
        self.lifecycle().is_suspect()
    }

    /// Whether the hub has said it confirms opens from now on (QUIC edge).
    #[cfg(test)]
    pub(crate) fn hub_confirms_opens(&self) -> bool {
        match &self.session {
            Session::Quic(session) => session.shared.confirms_opens(),
            Session::Mux(_) => false,
        }
    }

    /// Streams open now.
    pub fn active_streams(&self) -> usize {
        self.lifecycle().active()
    }

    /// Last round trip of the tunnel, once known (on the TLS transport the edge learns it from
    /// the hub's PINGs).
    pub fn rtt(&self) -> Option<Duration> {
        dispatch!(self, s => s.rtt())
    }

    /// Traffic counters.
    pub fn stats(&self) -> &SessionStats {
        &self.lifecycle().stats
    }
}
