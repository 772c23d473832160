//! Reaching the hub: the transport chosen (QUIC first with fallback, if asked), the handshake
//! line and the hub's reply, and the session that follows.

use remoteingress_tunnel::tls::TlsError;
use remoteingress_tunnel::{quic, HubTrust, Link, LinkError, Role, SessionEvent, SessionHandle};
use remoteingress_wire::handshake::{parse_reply, HandshakeError};
use remoteingress_wire::EdgeConfig;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::{EdgeInner, Transport, TransportMode};

/// Longest handshake reply (the edge's configuration) accepted from the hub.
const MAX_REPLY_LEN: usize = 1024 * 1024;

/// A session that has just started, its events, and the configuration the hub sent.
pub(crate) type Connected = (SessionHandle, mpsc::Receiver<SessionEvent>, EdgeConfig);

/// Why one attempt to reach the hub failed.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// TCP, TLS, QUIC or the handshake line failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The hub refused the edge, or its reply was not valid.
    #[error(transparent)]
    Refused(#[from] HandshakeError),
    /// The QUIC endpoint could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The attempt took longer than allowed.
    #[error("connecting to the hub timed out")]
    Timeout,
}

/// One attempt: the transport (verifying the hub), the handshake, and the session.
pub(crate) async fn connect(inner: &EdgeInner) -> Result<Connected, ConnectError> {
    let options = &inner.options;
    if options.trust == HubTrust::Insecure {
        tracing::warn!(
            "--insecure: the hub's certificate is NOT verified; the secret may reach an impostor"
        );
    }
    let within = |budget, transport| async move {
        tokio::time::timeout(budget, connect_over(inner, transport))
            .await
            .map_err(|_| ConnectError::Timeout)?
    };
    match options.transport {
        TransportMode::TcpTls => within(options.connect_timeout, Transport::TcpTls).await,
        TransportMode::Quic => within(options.connect_timeout, Transport::Quic).await,
        TransportMode::QuicWithFallback => {
            match within(options.quic_fallback_after, Transport::Quic).await {
                Ok(connected) => {
                    tracing::info!("connected over QUIC");
                    Ok(connected)
                }
                Err(error) => {
                    tracing::warn!(%error, "QUIC did not connect; falling back to TLS");
                    within(options.connect_timeout, Transport::TcpTls).await
                }
            }
        }
    }
}

/// Connects over `transport`, sends the handshake line and starts the session.
async fn connect_over(inner: &EdgeInner, transport: Transport) -> Result<Connected, ConnectError> {
    let options = &inner.options;
    let (host, port) = (options.hub_host.as_str(), options.hub_port);
    let mut link = match transport {
        Transport::TcpTls => {
            Link::connect_tls(&inner.tls, inner.server_name.clone(), host, port).await?
        }
        Transport::Quic => {
            let endpoint = quic::client_endpoint(&options.trust, &options.session)?;
            let server_name = match &inner.server_name {
                ServerName::DnsName(name) => name.as_ref().to_owned(),
                _ => "remoteingress-hub".to_owned(),
            };
            Link::connect_quic(&endpoint, host, port, &server_name).await?
        }
    };
    link.write_line(&inner.hello.to_line()).await?;
    let (line, rest) = link.read_line(MAX_REPLY_LEN).await?;
    let reply = parse_reply(&line)?;
    let agreed = reply.offered.intersect(options.session.extensions);
    let (session, events) = link.into_session(rest, Role::Edge, options.session.clone(), agreed);
    Ok((session, events, reply.config))
}
