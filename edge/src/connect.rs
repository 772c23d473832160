//! Reaching the hub: the transport chosen (QUIC first with fallback, if asked), the handshake
//! line and the hub's reply, and the session that follows.

use remoteingress_tunnel::tls::TlsError;
use remoteingress_tunnel::{quic, HubTrust, Link, LinkError, Role, SessionEvent, SessionHandle};
use remoteingress_wire::handshake::{parse_reply, HandshakeError, HubReply, MAX_REPLY_LEN};
use remoteingress_wire::token::join_host_port;
use std::time::Instant;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::{EdgeInner, Transport, TransportMode};

/// A session that has just started, its events, and the hub's reply (configuration, hub id).
pub(crate) type Connected = (SessionHandle, mpsc::Receiver<SessionEvent>, HubReply);

/// Where a hub listens: `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubAddress {
    /// Host name or address.
    pub host: String,
    /// Tunnel port.
    pub port: u16,
}

/// Why a hub address could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("hub address {0:?} is not HOST:PORT")]
pub struct HubAddressError(String);

impl HubAddress {
    /// A hub at `host` and `port`.
    pub fn new(host: &str, port: u16) -> Self {
        Self {
            host: host.to_owned(),
            port,
        }
    }

    /// Reads `host:port` (an IPv6 address in brackets).
    pub fn parse(text: &str) -> Result<Self, HubAddressError> {
        let bad = || HubAddressError(text.to_owned());
        let (host, port) = text.trim().rsplit_once(':').ok_or_else(bad)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = port.parse::<u16>().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Self::new(host, port))
    }

    /// The name the hub's certificate is checked against.
    pub(crate) fn server_name(&self) -> Option<ServerName<'static>> {
        ServerName::try_from(self.host.clone()).ok()
    }
}

impl std::fmt::Display for HubAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&join_host_port(&self.host, self.port))
    }
}

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
    /// The hub's certificate does not verify against the system's trust store, and the edge
    /// was given nothing else to verify it with.
    #[error(
        "{0}: the hub's certificate is not trusted by this machine's trust store, and no pin or \
         CA file was given. Add the hub's certificate pin (a token with a pin, made by \
         `remoteingress token encode --pin` or a hub's createConnectionToken, or --hub-pin), or \
         give --ca-file with the CA that signed the hub's certificate"
    )]
    Untrusted(LinkError),
    /// The hub's host is not a valid TLS server name.
    #[error("the hub host is not a valid host name or address")]
    HubHost,
}

/// One attempt to reach the hub at `hub`: the transport (verifying the hub), the handshake,
/// and the session.
pub(crate) async fn connect(
    inner: &EdgeInner,
    hub: &HubAddress,
) -> Result<Connected, ConnectError> {
    let options = &inner.options;
    if options.trust == HubTrust::Insecure {
        tracing::warn!(
            "--insecure: the hub's certificate is NOT verified; the secret may reach an impostor"
        );
    }
    let within = |budget, transport| async move {
        tokio::time::timeout(budget, connect_over(inner, hub, transport))
            .await
            .map_err(|_| ConnectError::Timeout)?
    };
    match options.transport {
        TransportMode::TcpTls => within(options.connect_timeout, Transport::TcpTls).await,
        TransportMode::Quic => within(options.connect_timeout, Transport::Quic).await,
        TransportMode::QuicWithFallback => {
            let key = hub.to_string();
            let fallbacks = &inner.quic_fallbacks;
            if fallbacks.skip_quic(&key, Instant::now()) {
                return within(options.connect_timeout, Transport::TcpTls).await;
            }
            match within(options.quic_fallback_after, Transport::Quic).await {
                Ok(connected) => {
                    tracing::info!("connected over QUIC");
                    fallbacks.quic_worked(&key);
                    Ok(connected)
                }
                Err(error) => {
                    tracing::warn!(%error, retry_after = ?options.quic_retry_after,
                        "QUIC did not connect; falling back to TLS, and to it alone for a while");
                    let connected = within(options.connect_timeout, Transport::TcpTls).await?;
                    fallbacks.fell_back(&key, Instant::now());
                    Ok(connected)
                }
            }
        }
    }
}

/// Connects over `transport`, sends the handshake line and starts the session.
async fn connect_over(
    inner: &EdgeInner,
    hub: &HubAddress,
    transport: Transport,
) -> Result<Connected, ConnectError> {
    let options = &inner.options;
    let (host, port) = (hub.host.as_str(), hub.port);
    let server_name = hub.server_name().ok_or(ConnectError::HubHost)?;
    let link = match transport {
        Transport::TcpTls => Link::connect_tls(&inner.tls, server_name, host, port)
            .await
            .map_err(ConnectError::Link),
        Transport::Quic => connect_quic(inner, hub, &server_name).await,
    };
    let mut link = link.map_err(|error| match error {
        ConnectError::Link(link)
            if options.trust == HubTrust::System && link.is_untrusted_certificate() =>
        {
            ConnectError::Untrusted(link)
        }
        other => other,
    })?;
    link.write_line(&inner.hello.to_line()).await?;
    let (line, rest) = link.read_line(MAX_REPLY_LEN).await?;
    let reply = parse_reply(&line)?;
    let agreed = reply.offered.intersect(options.session.extensions);
    let (session, events) = link.into_session(rest, Role::Edge, options.session.clone(), agreed);
    Ok((session, events, reply))
}

/// A QUIC connection to `hub` (verified as `server_name`), before any handshake line.
async fn connect_quic(
    inner: &EdgeInner,
    hub: &HubAddress,
    server_name: &ServerName<'static>,
) -> Result<Link, ConnectError> {
    let endpoint = quic::client_endpoint_with(inner.quic.clone())?;
    let server_name = match server_name {
        ServerName::DnsName(name) => name.as_ref().to_owned(),
        _ => "remoteingress-hub".to_owned(),
    };
    Ok(Link::connect_quic(&endpoint, &hub.host, hub.port, &server_name).await?)
}

/// Whether QUIC reaches `hub` now: a QUIC handshake within the fallback delay, closed at once
/// (the hub sees a connection that never authenticates, which costs it nothing lasting).
pub(crate) async fn quic_reaches(inner: &EdgeInner, hub: &HubAddress) -> bool {
    let Some(server_name) = hub.server_name() else {
        return false;
    };
    let attempt = connect_quic(inner, hub, &server_name);
    matches!(
        tokio::time::timeout(inner.options.quic_fallback_after, attempt).await,
        Ok(Ok(_))
    )
}
