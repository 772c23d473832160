//! What a session is: its role, its transport, and its limits and timers.

use std::time::Duration;

use remoteingress_wire::extension::Extensions;
use remoteingress_wire::flow::DEFAULT_BUDGET;
use remoteingress_wire::qos::LaneLimits;

/// Which end of the tunnel a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opens streams, sends DATA, answers PINGs.
    Edge,
    /// Accepts streams, sends DATA_BACK and PINGs.
    Hub,
}

impl Role {
    /// The other end.
    pub fn peer(self) -> Role {
        match self {
            Role::Edge => Role::Hub,
            Role::Hub => Role::Edge,
        }
    }
}

/// The transport a session runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// One TLS connection over TCP with our frame multiplexing.
    TcpTls,
    /// One QUIC connection with native streams and datagrams.
    Quic,
}

impl Transport {
    /// The name used in configuration, logs and the API (`tcpTls`, `quic`).
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::TcpTls => "tcpTls",
            Transport::Quic => "quic",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits and timers of a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Bytes of unconsumed data all streams may hold together.
    pub budget: u64,
    /// Most concurrent streams; an OPEN past it is refused at once.
    pub max_streams: usize,
    /// A peer silent for this long is dead: the liveness deadline. It also bounds how long sent
    /// data may stay unacknowledged (TLS: `TCP_USER_TIMEOUT`; QUIC: the idle timeout).
    pub idle_timeout: Duration,
    /// Interval of liveness probes: the hub PINGs every interval; the edge PINGs a hub that
    /// answers them (extension `liveness`) when it has heard nothing for an interval; QUIC
    /// sends keep-alives. A tunnel silent for two intervals is suspect.
    pub ping_interval: Duration,
    /// Bounds of the writer's lanes.
    pub lanes: LaneLimits,
    /// Protocol extensions this side offers (hub) or accepts (edge) on the TLS transport;
    /// [`Extensions::NONE`] speaks the original protocol only.
    pub extensions: Extensions,
    /// QUIC: the UDP payload size the path is assumed to carry always. Packet loss never shrinks
    /// the tunnel's packets below it, so datagrams that fit it keep flowing under overload.
    pub quic_min_mtu: u16,
}

/// How long an edge waits on a silent hub that cannot be probed: an original hub PINGs only
/// every 15 s, so a shorter deadline would end healthy tunnels.
pub const ORIGINAL_HUB_SILENCE: Duration = Duration::from_secs(45);

/// Default of [`SessionOptions::quic_min_mtu`]: room for a 1,200-byte datagram (a QUIC client's
/// packet, say) with the tunnel's headers, on any path whose MTU is 1,328 bytes or more.
pub const DEFAULT_QUIC_MIN_MTU: u16 = 1_280;

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            budget: DEFAULT_BUDGET,
            max_streams: 10_000,
            idle_timeout: Duration::from_secs(3),
            ping_interval: Duration::from_secs(1),
            lanes: LaneLimits::default(),
            extensions: Extensions::ALL,
            quic_min_mtu: DEFAULT_QUIC_MIN_MTU,
        }
    }
}
