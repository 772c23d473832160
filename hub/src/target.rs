//! Why a tunnelled connection or UDP session could not reach its target.

use std::net::{IpAddr, SocketAddr};

use remoteingress_tunnel::ResolveError;
use remoteingress_wire::address::believable_client;
use remoteingress_wire::config::Protocol;
use remoteingress_wire::proxy::{ProxyError, ProxyV1, ProxyV2, V2Transport, V2_TLV_EDGE_ID};
use thiserror::Error;

use crate::{HubEvent, HubInner, RefusalReason};

/// Where one stream or UDP session goes, as its open's PROXY header and the edge's
/// assignment say.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// TCP stream or UDP session.
    pub(crate) protocol: Protocol,
    /// The client, as the edge saw it.
    pub(crate) client: SocketAddr,
    /// The edge's address the client reached.
    pub(crate) destination: SocketAddr,
    /// The edge's own target host for this port, if not the hub's.
    pub(crate) target_host: Option<String>,
    /// The target port.
    pub(crate) target_port: u16,
}

impl Route {
    /// The route of a client and the edge address it reached, if the port is assigned to the
    /// edge and the client address is believable from a tunnel that comes from `tunnel_from`.
    pub(crate) fn of(
        inner: &HubInner,
        edge_id: &str,
        protocol: Protocol,
        client: SocketAddr,
        destination: SocketAddr,
        tunnel_from: IpAddr,
    ) -> Result<Self, TargetError> {
        let believable = believable_client(
            client.ip(),
            tunnel_from,
            !inner.options.refuse_private_clients,
        );
        if !believable {
            return Err(TargetError::ClientAddress {
                protocol,
                port: destination.port(),
                client: client.ip(),
            });
        }
        let (target_host, target_port) =
            inner
                .registry()
                .target(edge_id, protocol, destination.port())?;
        Ok(Self {
            protocol,
            client,
            destination,
            target_host,
            target_port,
        })
    }

    /// The edge port the client reached.
    pub(crate) fn edge_port(&self) -> u16 {
        self.destination.port()
    }

    /// The PROXY header the target gets, written from the parsed addresses (never the edge's
    /// bytes): a v1 line for a stream, a v2 header naming the edge in a TLV for a UDP session.
    pub(crate) fn proxy_header(&self, edge_id: &str) -> Vec<u8> {
        match self.protocol {
            Protocol::Tcp => ProxyV1::tcp(self.client, self.destination)
                .to_line()
                .into_bytes(),
            Protocol::Udp => {
                let mut header = Vec::new();
                ProxyV2::proxy(V2Transport::Datagram, self.client, self.destination)
                    .encode_with(&[(V2_TLV_EDGE_ID, edge_id.as_bytes())], &mut header);
                header
            }
        }
    }

    /// The target host: the edge's own for this port, else the hub's.
    pub(crate) fn host<'a>(&'a self, inner: &'a HubInner) -> &'a str {
        self.target_host
            .as_deref()
            .unwrap_or(&inner.options.target_host)
    }

    /// `host:port` of the target.
    pub(crate) fn target(&self, inner: &HubInner) -> String {
        remoteingress_wire::token::join_host_port(self.host(inner), self.target_port)
    }
}

/// Why a stream or UDP session was refused on its way to the target.
#[derive(Debug, Error)]
pub(crate) enum TargetError {
    /// The open's PROXY header is malformed.
    #[error("PROXY header: {0}")]
    Header(#[from] ProxyError),
    /// The open ends before its PROXY header does.
    #[error("incomplete PROXY header")]
    Incomplete,
    /// The open is not exactly one PROXY header of its protocol (TCP or UDP).
    #[error("the open must carry exactly one PROXY header for its protocol")]
    NotJustHeader,
    /// The header names no destination port (PROXY UNKNOWN).
    #[error("the PROXY header names no destination port")]
    NoPort,
    /// The edge was removed meanwhile.
    #[error("edge no longer configured")]
    EdgeGone,
    /// The edge named a port it is not assigned: it is never connected.
    #[error("{protocol} port {port} is not assigned to this edge")]
    NotAssigned {
        /// TCP stream or UDP session.
        protocol: Protocol,
        /// The port the edge's PROXY header named.
        port: u16,
    },
    /// The edge claimed a client address no client can have (unspecified, multicast, or
    /// loopback from an edge on another host), or a private one the hub is told to refuse.
    #[error("{protocol} client address {client} is not believable")]
    ClientAddress {
        /// TCP stream or UDP session.
        protocol: Protocol,
        /// The edge port the client reached.
        port: u16,
        /// The address the edge's PROXY header named.
        client: IpAddr,
    },
    /// The edge, or the hub, has as many streams or UDP sessions as it may.
    #[error("{protocol} port {port}: {}", reason.describe())]
    Limit {
        /// TCP stream or UDP session.
        protocol: Protocol,
        /// The edge port the client reached.
        port: u16,
        /// Which limit: [`RefusalReason::EdgeLimit`] or [`RefusalReason::HubLimit`].
        reason: RefusalReason,
    },
    /// The target host could not be resolved.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The target did not accept the connection in time.
    #[error("connecting to {0} timed out")]
    Timeout(String),
    /// A socket operation towards the target failed.
    #[error("{step} {target}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// `host:port`.
        target: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl TargetError {
    /// The error of `step` towards `target`, from its cause.
    pub(crate) fn io(
        step: &'static str,
        target: impl std::fmt::Display,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let target = target.to_string();
        move |source| TargetError::Io {
            step,
            target,
            source,
        }
    }
}

/// Counts and reports a refused stream or UDP session: an open the edge should never have sent
/// (a port it is not assigned, a client address no client has) is a warning and an event (a
/// buggy or compromised edge), anything else a target problem.
pub(crate) fn report_refusal(inner: &HubInner, edge_id: &str, id: u32, error: &TargetError) {
    let (protocol, port, reason) = match error {
        TargetError::NotAssigned { protocol, port } => {
            (*protocol, *port, RefusalReason::NotAssigned)
        }
        TargetError::ClientAddress { protocol, port, .. } => {
            (*protocol, *port, RefusalReason::ClientAddress)
        }
        TargetError::Limit {
            protocol,
            port,
            reason,
        } => (*protocol, *port, *reason),
        _ => {
            tracing::debug!(edge = %edge_id, id, %error, "target not reached");
            inner
                .metrics
                .target_connect_errors
                .with_label_values(&[edge_id])
                .inc();
            return;
        }
    };
    remoteingress_tunnel::warn_limited!("open_refused", edge = %edge_id, id, %error, "open refused");
    inner
        .metrics
        .opens_refused
        .with_label_values(&[edge_id, protocol.as_str(), reason.as_str()])
        .inc();
    inner.emit(HubEvent::OpenRefused {
        edge_id: edge_id.to_owned(),
        protocol,
        port,
        reason,
    });
}
