//! Why a tunnelled connection or UDP session could not reach its target.

use remoteingress_tunnel::ResolveError;
use remoteingress_wire::config::Protocol;
use remoteingress_wire::proxy::ProxyError;
use thiserror::Error;

use crate::{HubEvent, HubInner};

/// Where one stream or UDP session goes, as its open's PROXY header and the edge's
/// assignment say.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// The client, as the edge saw it.
    pub(crate) client: std::net::SocketAddr,
    /// The edge port the client reached.
    pub(crate) edge_port: u16,
    /// The edge's own target host for this port, if not the hub's.
    pub(crate) target_host: Option<String>,
    /// The target port.
    pub(crate) target_port: u16,
}

impl Route {
    /// The route of a client and edge port, if the port is assigned to the edge.
    pub(crate) fn of(
        inner: &HubInner,
        edge_id: &str,
        protocol: Protocol,
        client: std::net::SocketAddr,
        edge_port: u16,
    ) -> Result<Self, TargetError> {
        let (target_host, target_port) = inner.registry().target(edge_id, protocol, edge_port)?;
        Ok(Self {
            client,
            edge_port,
            target_host,
            target_port,
        })
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

/// Counts and reports a refused stream or UDP session: a port the edge is not assigned is a
/// warning and an event (a buggy or compromised edge), anything else a target problem.
pub(crate) fn report_refusal(inner: &HubInner, edge_id: &str, id: u32, error: &TargetError) {
    match error {
        TargetError::NotAssigned { protocol, port } => {
            remoteingress_tunnel::warn_limited!("open_refused", edge = %edge_id, id, %error, "open refused");
            inner
                .metrics
                .opens_refused
                .with_label_values(&[edge_id, protocol.as_str()])
                .inc();
            inner.emit(HubEvent::OpenRefused {
                edge_id: edge_id.to_owned(),
                protocol: *protocol,
                port: *port,
            });
        }
        _ => {
            tracing::debug!(edge = %edge_id, id, %error, "target not reached");
            inner
                .metrics
                .target_connect_errors
                .with_label_values(&[edge_id])
                .inc();
        }
    }
}
