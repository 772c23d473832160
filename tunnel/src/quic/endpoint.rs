//! QUIC endpoints for hub and edge: the tunnel's certificate and trust, and transport
//! parameters bounded by the session's limits.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{TransportConfig, VarInt};

use crate::datagrams::batch_state;
use crate::options::SessionOptions;
use crate::tls::{client_config as tls_client_config, HubIdentity, HubTrust, TlsError};

/// ALPN of the QUIC tunnel.
pub const QUIC_ALPN: &[u8] = b"remoteingress-quic/1";
/// Per-stream receive window.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// The hub's connection window until the edge has authenticated: room for the handshake line
/// many times over, and all a peer that has not shown its secret can make the hub buffer.
pub const UNAUTHENTICATED_WINDOW: u32 = 64 * 1024;

/// UDP payload size the tunnel starts with: Ethernet's 1,500-byte MTU less IPv6 and UDP headers.
/// Path-MTU discovery confirms it; a path that loses such packets falls back to the minimum.
const INITIAL_MTU: u16 = 1_452;

/// Streams an edge may open at first; the hub raises it as they are used (see
/// [`super::tasks::accept_streams`]). quinn allocates state for every stream the peer may open,
/// so starting at the cap would cost each idle edge megabytes.
pub(crate) const INITIAL_STREAM_LIMIT: usize = 64;

/// The first limit of concurrent edge streams under the session's `cap`.
pub(crate) fn initial_stream_limit(cap: usize) -> usize {
    next_step(INITIAL_STREAM_LIMIT, cap)
}

/// The limit after `limit` when half of it is in use: doubled, or the cap once it is near.
///
/// quinn announces a raised limit only when it grew by more than an eighth of the new one, so
/// the cap is taken in one step from below seven eighths of it, never in a last small step that
/// the edge would not hear of.
pub(crate) fn next_stream_limit(limit: usize, cap: usize) -> usize {
    next_step(limit.saturating_mul(2), cap)
}

fn next_step(wanted: usize, cap: usize) -> usize {
    if wanted.saturating_mul(8) >= cap.saturating_mul(7) {
        cap
    } else {
        wanted
    }
}

/// Transport parameters shared by hub and edge: windows bounded by the flow budget, keep-alive
/// 15 s and idle timeout 45 s (the same liveness as the TLS transport), and packet sizes between
/// the configured minimum and Ethernet's.
///
/// quinn's black-hole detection treats a burst of lost packets all larger than the minimum as
/// proof that the path lost its large packets, and falls back to the minimum for a minute. Under
/// overload every lost packet of a 1,200-byte UDP flood looks like that; with quinn's 1,200-byte
/// default minimum, no such datagram fit any more and delivery stopped for that minute. A
/// minimum they fit makes such a burst harmless.
fn transport_config(options: &SessionOptions) -> TransportConfig {
    let mut transport = TransportConfig::default();
    let min_mtu = options.quic_min_mtu;
    transport
        .min_mtu(min_mtu)
        .initial_mtu(INITIAL_MTU.max(min_mtu));
    transport
        .receive_window(receive_window(options.budget))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .send_window(options.budget)
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(options.ping_interval))
        .datagram_receive_buffer_size(Some(4 * 1024 * 1024));
    if let Ok(idle) = options.idle_timeout.try_into() {
        transport.max_idle_timeout(Some(idle));
    }
    transport
}

/// The connection window of a session whose flow budget is `budget`.
pub(crate) fn receive_window(budget: u64) -> VarInt {
    VarInt::from_u32(u32::try_from(budget).unwrap_or(u32::MAX))
}

/// The QUIC limit of bidirectional streams for `streams` tunnelled connections: one more for
/// the control stream.
pub(crate) fn stream_limit(streams: usize) -> VarInt {
    VarInt::from_u32(u32::try_from(streams.saturating_add(1)).unwrap_or(u32::MAX))
}

/// The hub's QUIC endpoint on the bound UDP `socket`, with the tunnel's certificate.
pub fn server_endpoint(
    identity: &HubIdentity,
    socket: std::net::UdpSocket,
    options: &SessionOptions,
) -> Result<quinn::Endpoint, TlsError> {
    let mut tls = (*identity.server_config()?).clone();
    tls.alpn_protocols = vec![QUIC_ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = transport_config(options);
    // The control stream only, and a small window, until the session's limits are granted.
    transport
        .max_concurrent_bidi_streams(stream_limit(0))
        .receive_window(VarInt::from_u32(UNAUTHENTICATED_WINDOW));
    config.transport_config(Arc::new(transport));
    endpoint_on(socket, Some(config), "udp server socket")
}

/// Raises an authenticated edge's connection from the limits every unauthenticated peer gets
/// to the session's: its flow budget and the first step of its streams.
pub(crate) fn grant_session_limits(connection: &quinn::Connection, options: &SessionOptions) {
    connection.set_receive_window(receive_window(options.budget));
    connection
        .set_max_concurrent_bi_streams(stream_limit(initial_stream_limit(options.max_streams)));
}

fn udp_socket_error(what: &'static str) -> impl FnOnce(std::io::Error) -> TlsError {
    move |source| TlsError::Io {
        path: what.into(),
        source,
    }
}

/// An endpoint on `socket`, whose kernel buffers are sized for bursts first: quinn's defaults
/// leave the system's (about 200 KiB here), which a busy tunnel overflows into loss.
fn endpoint_on(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
    what: &'static str,
) -> Result<quinn::Endpoint, TlsError> {
    batch_state(&socket).map_err(udp_socket_error(what))?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| udp_socket_error(what)(std::io::Error::other("no async runtime")))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
        .map_err(udp_socket_error(what))
}

/// An edge's QUIC client configuration, trusting the hub as `trust` says. An edge keeps one
/// for all its connections: the session tickets it holds let a reconnect resume.
pub fn client_config(
    trust: &HubTrust,
    options: &SessionOptions,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = (*tls_client_config(trust)?).clone();
    tls.alpn_protocols = vec![QUIC_ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = transport_config(options);
    // The hub never opens streams.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(0));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A QUIC endpoint on a UDP socket of its own that connects with `config`.
pub fn client_endpoint_with(config: quinn::ClientConfig) -> Result<quinn::Endpoint, TlsError> {
    let socket = client_socket().map_err(udp_socket_error("udp client socket"))?;
    let mut endpoint = endpoint_on(socket, None, "udp client socket")?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// A UDP socket for an edge's QUIC connections: it reaches IPv6 and IPv4 addresses alike
/// (a hub's name may resolve to either) where the host has IPv6, IPv4 alone where it has not.
fn client_socket() -> std::io::Result<std::net::UdpSocket> {
    let dual_stack = || {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        socket.set_only_v6(false)?;
        socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)).into())?;
        Ok::<_, std::io::Error>(std::net::UdpSocket::from(socket))
    };
    dual_stack().or_else(|_| std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))))
}

/// An endpoint with a configuration of its own (no tickets from earlier connections).
pub fn client_endpoint(
    trust: &HubTrust,
    options: &SessionOptions,
) -> Result<quinn::Endpoint, TlsError> {
    client_endpoint_with(client_config(trust, options)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every step the edge must hear of grows the limit by more than an eighth of the new one.
    #[test]
    fn the_stream_limit_reaches_every_cap_in_announced_steps() {
        for cap in (0..300).chain([1_000, 10_000, 30_000, 65_536]) {
            let mut limit = initial_stream_limit(cap);
            assert!(limit <= cap);
            while limit < cap {
                let next = next_stream_limit(limit, cap);
                assert!(next <= cap, "cap {cap}: {limit} -> {next}");
                assert!(
                    (next - limit) * 8 > next,
                    "cap {cap}: {limit} -> {next} is not announced"
                );
                limit = next;
            }
        }
    }
}
