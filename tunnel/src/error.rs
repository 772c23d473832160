//! Why a session operation failed, and why a session ended.

use std::time::Duration;

use remoteingress_wire::flow::FlowError;
use remoteingress_wire::frame::{FrameError, FrameType};
use thiserror::Error;

use crate::options::Role;

/// Why a session operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    /// The session has ended.
    #[error("tunnel closed")]
    Closed,
    /// Too many streams are open.
    #[error("stream limit of {0} reached")]
    TooManyStreams(usize),
    /// Every stream id of this tunnel has been used; a new tunnel is needed.
    #[error("stream ids of this tunnel are used up")]
    StreamIdsExhausted,
}

/// A stream ended without its orderly finish: the peer reset it, or the tunnel is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("stream aborted")]
pub struct StreamAborted;

/// Why a session ended. The first reason recorded wins.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CloseReason {
    /// The peer ended the tunnel in an orderly way.
    #[error("peer closed the tunnel")]
    PeerClosed,
    /// Nothing arrived from the peer for this long.
    #[error("peer silent for {} s", .0.as_secs())]
    Idle(Duration),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolViolation),
    /// Reading or writing the tunnel failed.
    #[error("tunnel {0}")]
    Io(String),
    /// The QUIC connection was lost for a reason QUIC reports.
    #[error("QUIC connection lost: {0}")]
    Connection(quinn::ConnectionError),
    /// Our side ended the session (shutdown, edge removed, replaced, …).
    #[error("{0}")]
    Local(String),
    /// Whoever received the session's events stopped listening.
    #[error("session owner gone")]
    OwnerGone,
}

impl CloseReason {
    /// The reason for a QUIC connection that ended: an application close by the peer is an
    /// orderly end, a timeout is silence.
    pub(crate) fn from_connection(error: quinn::ConnectionError, idle: Duration) -> Self {
        match error {
            quinn::ConnectionError::ApplicationClosed(_) => CloseReason::PeerClosed,
            quinn::ConnectionError::TimedOut => CloseReason::Idle(idle),
            error => CloseReason::Connection(error),
        }
    }
}

/// A peer's breach of the protocol (`docs/protocol.md`); each one ends the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolViolation {
    /// Bytes that do not decode into a frame (unknown type, oversized or malformed length).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A frame for a stream that was never opened.
    #[error("{kind:?} for unknown stream {id}")]
    UnknownStream {
        /// The frame type.
        kind: FrameType,
        /// The stream id.
        id: u32,
    },
    /// An OPEN whose id is not above every id opened before.
    #[error("stream id {0} reused or decreasing")]
    StreamIdReused(u32),
    /// A second CLOSE for the same stream.
    #[error("stream {0} closed twice")]
    ClosedTwice(u32),
    /// DATA after the peer's own CLOSE.
    #[error("data after close on stream {0}")]
    DataAfterClose(u32),
    /// Data beyond the window, or a zero or overflowing WINDOW_UPDATE.
    #[error("stream {id}: {error}")]
    Flow {
        /// The stream id.
        id: u32,
        /// What the peer did wrong.
        error: FlowError,
    },
    /// More consecutive empty DATA frames than allowed.
    #[error("too many empty DATA frames")]
    EmptyDataFlood,
    /// The peer made us queue more control frames than the control lane holds.
    #[error("peer caused more than the control queue holds")]
    ControlFlood,
    /// A PONG that answers no outstanding PING.
    #[error("PONG without a matching PING")]
    UnmatchedPong,
    /// A frame type this peer never sends (e.g. DATA_BACK from an edge).
    #[error("unexpected {kind:?} frame from the {from:?}")]
    UnexpectedFrame {
        /// The frame type.
        kind: FrameType,
        /// Who sent it.
        from: Role,
    },
    /// A UDP_OPEN whose id is not above every id opened before.
    #[error("UDP session id {0} reused or decreasing")]
    UdpIdReused(u32),
    /// A datagram for a UDP session that was never opened.
    #[error("datagram for unknown UDP session {0}")]
    UnknownUdpSession(u32),
    /// The peer keeps opening streams while we refuse them.
    #[error("peer ignores refused streams")]
    RefusedStreamsIgnored,
    /// An EXTENSIONS frame that is not a JSON list of names, or a second one.
    #[error("{0}")]
    Extensions(String),
    /// A QUIC control message (UDP_CLOSE, OPENED) without its 4-byte session or stream id.
    #[error("control message without its 4-byte id")]
    ControlMessageWithoutId,
}
