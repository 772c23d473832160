//! QUIC endpoints for hub and edge: the tunnel's certificate and trust, and transport
//! parameters bounded by the session's limits.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{TransportConfig, VarInt};

use crate::options::SessionOptions;
use crate::tls::{client_config, HubIdentity, HubTrust, TlsError};

/// ALPN of the QUIC tunnel.
pub const QUIC_ALPN: &[u8] = b"remoteingress-quic/1";
/// Per-stream receive window.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// Transport parameters shared by hub and edge: windows bounded by the flow budget, the stream
/// cap, keep-alive 15 s and idle timeout 45 s (the same liveness as the TLS transport).
fn transport_config(options: &SessionOptions) -> TransportConfig {
    let mut transport = TransportConfig::default();
    let budget = u32::try_from(options.budget).unwrap_or(u32::MAX);
    transport
        .receive_window(VarInt::from_u32(budget))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .send_window(options.budget)
        .max_concurrent_bidi_streams(VarInt::from_u32(
            u32::try_from(options.max_streams).unwrap_or(u32::MAX),
        ))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(options.ping_interval))
        .datagram_receive_buffer_size(Some(4 * 1024 * 1024));
    if let Ok(idle) = options.idle_timeout.try_into() {
        transport.max_idle_timeout(Some(idle));
    }
    transport
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
    config.transport_config(Arc::new(transport_config(options)));
    let runtime = quinn::default_runtime().ok_or_else(|| TlsError::Io {
        path: "udp server socket".into(),
        source: std::io::Error::other("no async runtime"),
    })?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        runtime,
    )
    .map_err(|source| TlsError::Io {
        path: "udp server socket".into(),
        source,
    })
}

/// An edge's QUIC endpoint trusting the hub as `trust` says.
pub fn client_endpoint(
    trust: &HubTrust,
    options: &SessionOptions,
) -> Result<quinn::Endpoint, TlsError> {
    let mut tls = (*client_config(trust)?).clone();
    tls.alpn_protocols = vec![QUIC_ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(options)));
    let mut endpoint =
        quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0))).map_err(|source| {
            TlsError::Io {
                path: "udp client socket".into(),
                source,
            }
        })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}
