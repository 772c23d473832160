//! Admitting a tunnel connection: TLS or QUIC, the edge's handshake line checked against the
//! allowed edges, and the reply. One path for both transports.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use remoteingress_tunnel::{Link, LinkError};
use remoteingress_wire::handshake::{
    accept_reply, error_reply, retry_reply, EdgeHello, HandshakeError, BUSY, MAX_LINE_LEN,
    UNAUTHORIZED,
};
use remoteingress_wire::EdgeConfig;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::rustls::ServerConfig;

use crate::admission::Admission;
use crate::{HubEvent, HubInner};

/// Why a tunnel connection was refused before its session started.
#[derive(Debug, Error)]
pub enum AuthFailure {
    /// Too many connections from this address are authenticating already.
    #[error("too many unauthenticated tunnel connections from this address")]
    Limit,
    /// This address failed to authenticate too often lately.
    #[error("too many failed authentications from this address")]
    RateLimited,
    /// The hub was full and a newer connection took the slot of this one, which had not begun
    /// its handshake.
    #[error("evicted while idle: the hub was full and had not received its ClientHello")]
    Evicted,
    /// The peer closed the connection before it began a handshake: it cost the hub nothing and
    /// spends no failure budget.
    #[error("closed before its handshake began")]
    Abandoned,
    /// Every slot held a handshake in progress (the other transport's listener took the last).
    #[error("every unauthenticated slot holds a handshake in progress")]
    Full,
    /// TLS or QUIC failed, or the handshake line could not be read or answered.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The handshake line is not a valid `EDGE <edgeId> <secret>`.
    #[error("handshake: {0}")]
    Malformed(#[from] HandshakeError),
    /// Unknown edge or wrong secret (which of the two is never told).
    #[error("bad credentials for edge {0:?}")]
    BadCredentials(String),
    /// The hub serves as many edges as it may (`max_edges`); the edge was told when to come
    /// back.
    #[error("the hub serves as many edges as it may")]
    Busy,
    /// The handshake did not finish within the deadline.
    #[error("handshake not finished in time")]
    Timeout,
}

impl AuthFailure {
    /// A stable, bounded label for metrics and events.
    pub fn label(&self) -> &'static str {
        match self {
            AuthFailure::Limit => "limit",
            AuthFailure::RateLimited => "rate_limited",
            AuthFailure::Evicted => "evicted",
            AuthFailure::Full => "full",
            AuthFailure::Abandoned => "abandoned",
            AuthFailure::Busy => "busy",
            AuthFailure::Link(LinkError::Line(_)) | AuthFailure::Malformed(_) => "malformed",
            AuthFailure::Link(_) => "tls",
            AuthFailure::BadCredentials(_) => "bad_credentials",
            AuthFailure::Timeout => "timeout",
        }
    }
}

/// A tunnel connection on its way in, before TLS or QUIC has completed.
pub(crate) enum Incoming {
    /// A TCP connection for the TLS transport.
    Tls(TcpStream, Arc<ServerConfig>),
    /// A QUIC connection attempt.
    Quic(Box<quinn::Incoming>),
}

/// An edge that passed the handshake, with its link ready for the session.
pub(crate) struct Authenticated {
    pub(crate) link: Link,
    pub(crate) hello: EdgeHello,
    pub(crate) config: EdgeConfig,
    /// Bytes that arrived after the handshake line.
    pub(crate) rest: Bytes,
}

/// Records a refused connection in logs, metrics and events; a failure the peer caused spends
/// its address's failure budget.
pub(crate) fn auth_failed(inner: &HubInner, remote_addr: SocketAddr, failure: &AuthFailure) {
    remoteingress_tunnel::warn_limited!(
        "auth_failed",
        %remote_addr,
        reason = %failure,
        "edge authentication failed"
    );
    if !matches!(
        failure,
        AuthFailure::Limit
            | AuthFailure::RateLimited
            | AuthFailure::Evicted
            | AuthFailure::Full
            | AuthFailure::Busy
            | AuthFailure::Abandoned
    ) {
        inner
            .admissions
            .failed(remote_addr.ip(), std::time::Instant::now());
    }
    let kind = failure.label();
    inner.metrics.auth_failures.with_label_values(&[kind]).inc();
    inner.emit(HubEvent::AuthFailed {
        remote_addr,
        kind,
        reason: failure.to_string(),
    });
}

/// Completes the transport and the handshake within the admission's deadline, unless it is
/// evicted first; answers the edge with its configuration, or refuses it. A failure is
/// recorded and gives `None`.
pub(crate) async fn authenticate(
    inner: &Arc<HubInner>,
    incoming: Incoming,
    remote_addr: SocketAddr,
    admission: &Admission,
) -> Option<Authenticated> {
    let begun = || {
        admission.started();
        inner.metrics.handshakes.inc();
    };
    let handshake = async {
        let mut link = match incoming {
            Incoming::Tls(tcp, config) => Link::accept_tls(tcp, config, begun).await?,
            Incoming::Quic(incoming) => {
                begun();
                Link::accept_quic(*incoming).await?
            }
        };
        let (line, rest) = link.read_line(MAX_LINE_LEN).await?;
        Ok::<_, AuthFailure>((link, line, rest))
    };
    let handshake = tokio::time::timeout(admission.deadline, handshake);
    let result = tokio::select! {
        finished = handshake => match finished {
            Ok(Ok((link, line, rest))) => check_hello(inner, link, &line, rest).await,
            Ok(Err(AuthFailure::Link(LinkError::Abandoned))) => Err(AuthFailure::Abandoned),
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(AuthFailure::Timeout),
        },
        () = admission.evicted.cancelled() => Err(AuthFailure::Evicted),
    };
    match result {
        Ok(authenticated) => Some(authenticated),
        Err(failure) => {
            auth_failed(inner, remote_addr, &failure);
            None
        }
    }
}

/// How long a hub at its edge limit tells a new edge to stay away (the edge adds up to as much
/// again at random, then dials its next hub address).
const BUSY_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Checks a handshake line against the allowed edges and answers it.
async fn check_hello(
    inner: &HubInner,
    mut link: Link,
    line: &[u8],
    rest: Bytes,
) -> Result<Authenticated, AuthFailure> {
    let hello = match EdgeHello::parse(line) {
        Ok(hello) => hello,
        Err(error) => {
            link.refuse(&error_reply(UNAUTHORIZED)).await;
            return Err(error.into());
        }
    };
    // Bound first: a guard in the match scrutinee would live through the arms below.
    let config = inner.registry().authenticate(&hello.edge_id, &hello.secret);
    let Some(config) = config else {
        if inner.registry().is_configured(&hello.edge_id) {
            inner
                .metrics
                .edge_connections
                .with_label_values(&[&hello.edge_id, "rejected"])
                .inc();
        }
        link.refuse(&error_reply(UNAUTHORIZED)).await;
        return Err(AuthFailure::BadCredentials(hello.edge_id));
    };
    // The place is taken before the accept line, so that edges accepted at once never take
    // the hub past its limit.
    let placed = inner
        .registry()
        .take_place(&hello.edge_id, inner.options.max_edges);
    if !placed {
        link.refuse(&retry_reply(BUSY, BUSY_RETRY_AFTER)).await;
        return Err(AuthFailure::Busy);
    }
    let accepted = link
        .write_line(&accept_reply(
            &config,
            inner.options.session.extensions,
            &inner.options.hub_id,
        ))
        .await;
    if let Err(error) = accepted {
        inner.registry().give_place_back(&hello.edge_id);
        return Err(error.into());
    }
    Ok(Authenticated {
        link,
        hello,
        config,
        rest,
    })
}
