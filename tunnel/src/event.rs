//! What a session reports to its owner.

use std::time::Duration;

use bytes::Bytes;

use crate::stream::{StreamReader, StreamWriter};

/// How often a hub session tells its owner the round trip at most: probes come every
/// second, the owner's bookkeeping (metric, status) need not.
pub(crate) const RTT_REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Events a session queues for its owner before it stops reading the tunnel.
pub(crate) const EVENT_QUEUE: usize = 1024;

/// Something the session reports to its owner.
#[derive(Debug)]
pub enum SessionEvent {
    /// Hub: the edge opened a stream; `header` is its PROXY v1 line.
    Opened {
        /// Incoming half.
        reader: StreamReader,
        /// Outgoing half.
        writer: StreamWriter,
        /// OPEN payload.
        header: Bytes,
    },
    /// Edge: the hub sent a new configuration (JSON).
    Config(Bytes),
    /// Edge: the hub asks for no new streams on this tunnel (it is shutting down).
    Drain,
    /// Edge: the hub went silent past two probe intervals, or left an open unconfirmed; new
    /// streams should go elsewhere and a replacement tunnel be dialled. Reported once.
    Suspect {
        /// How long nothing had arrived from the hub (short when an open went unconfirmed).
        silent: Duration,
    },
    /// Hub: the edge acknowledged a configuration (JSON).
    ConfigAck(Bytes),
    /// Hub: the tunnel's round trip was measured.
    RoundTrip(Duration),
    /// Hub: the edge opened a UDP session; `header` is its PROXY v2 header.
    UdpOpen {
        /// Session id.
        id: u32,
        /// UDP_OPEN payload.
        header: Bytes,
    },
    /// A datagram of a UDP session (UDP_DATA on the hub, UDP_DATA_BACK on the edge).
    UdpDatagram {
        /// Session id.
        id: u32,
        /// The datagram.
        payload: Bytes,
    },
    /// The peer ended a UDP session.
    UdpClose {
        /// Session id.
        id: u32,
    },
}
