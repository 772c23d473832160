//! The tunnel listener: admission limits, TLS, the handshake, the session of each edge, and
//! forwarding of each stream to its target.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use remoteingress_tunnel::{pipe, Role, SessionEvent, SessionHandle, StreamReader, StreamWriter};
use remoteingress_wire::address::is_global_unicast;
use remoteingress_wire::config::Protocol;
use remoteingress_wire::extension::Extensions;
use remoteingress_wire::proxy::ProxyV1;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::rustls::ServerConfig;

use crate::admission::Refusal;
use crate::handshake::{auth_failed, authenticate, AuthFailure, Authenticated, Incoming};
use crate::quota::EdgeQuota;
use crate::registry::Attached;
use crate::target::{report_refusal, Route, TargetError};
use crate::udp::UdpSessions;
use crate::{HubEvent, HubInner, RefusalReason};

pub(crate) async fn accept_loop(
    inner: Arc<HubInner>,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
) {
    loop {
        // While every slot holds a handshake worth finishing, new connections wait in the
        // kernel's backlog rather than being accepted only to be reset. Once a drain has
        // begun, nothing more is accepted, even what waits in the backlog.
        let accepted = tokio::select! {
            biased;
            () = inner.accepting.cancelled() => return,
            accepted = async {
                inner.admissions.room().await;
                listener.accept().await
            } => accepted,
        };
        match accepted {
            Ok((tcp, remote_addr)) => {
                admit(&inner, Incoming::Tls(tcp, tls.clone()), remote_addr);
            }
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                remoteingress_tunnel::warn_limited!("tunnel_accept_failed", error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

pub(crate) async fn quic_accept_loop(inner: Arc<HubInner>, endpoint: quinn::Endpoint) {
    loop {
        let incoming = tokio::select! {
            biased;
            () = inner.accepting.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        // Nothing is charged to an address, nor a slot taken, before the peer has shown that
        // it receives at that address: a Retry (one round trip) makes it echo a token first,
        // which a sender of forged Initials never sees.
        if !incoming.remote_address_validated() {
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        let remote_addr = incoming.remote_address();
        tokio::select! {
            biased;
            () = inner.accepting.cancelled() => break,
            () = inner.admissions.room() => {}
        }
        admit(&inner, Incoming::Quic(Box::new(incoming)), remote_addr);
    }
    // No new tunnels (a drain); the open ones carry on until shutdown.
    endpoint.set_server_config(None);
    inner.shutdown.cancelled().await;
    endpoint.close(quinn::VarInt::from_u32(0), b"hub shutting down");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// Takes an unauthenticated slot for a new tunnel connection and serves it, or refuses it
/// before any handshake when its address is over its limits (the same limits for both
/// transports). A QUIC connection's handshake has begun already: its Initial carries it.
fn admit(inner: &Arc<HubInner>, incoming: Incoming, remote_addr: SocketAddr) {
    let started = matches!(incoming, Incoming::Quic(_));
    let admitted = inner
        .admissions
        .admit(remote_addr.ip(), started, std::time::Instant::now());
    let admission = match admitted {
        Ok(admission) => admission,
        Err(refusal) => {
            let failure = match refusal {
                Refusal::SourceLimit => AuthFailure::Limit,
                Refusal::FailureBudget => AuthFailure::RateLimited,
                Refusal::Full => AuthFailure::Full,
            };
            auth_failed(inner, remote_addr, &failure);
            if let Incoming::Quic(incoming) = incoming {
                incoming.refuse();
            }
            return;
        }
    };
    let inner = inner.clone();
    tokio::spawn(async move {
        let authenticated = authenticate(&inner, incoming, remote_addr, &admission).await;
        drop(admission);
        if let Some(authenticated) = authenticated {
            run_session(&inner, authenticated, remote_addr).await;
        }
    });
}

/// Registers an authenticated tunnel, serves it until it ends, and forgets it.
async fn run_session(inner: &Arc<HubInner>, authenticated: Authenticated, remote_addr: SocketAddr) {
    let Authenticated {
        link,
        hello,
        config,
        rest,
    } = authenticated;
    // From its first credit on, a new tunnel gets no more than its share of the edge's budget;
    // attaching it shares the budget anew among all the edge's tunnels.
    let limits = inner.options.edge_limits();
    let mut options = inner.options.session.clone();
    options.budget = inner
        .registry()
        .budget_for_new_tunnel(&hello.edge_id, limits);
    let (session, events) = link.into_session(rest, Role::Hub, options, Extensions::NONE);
    let edge_id = hello.edge_id.clone();
    let attached = inner.registry().attach(
        &edge_id,
        &hello.secret,
        session.clone(),
        remote_addr,
        config.version.unwrap_or_default(),
        limits,
    );
    let Ok(Attached {
        connection_id,
        owed,
        quota,
    }) = attached
    else {
        session.close("edge removed or its secret changed during the handshake");
        return;
    };
    // A handshake that was under way when a drain began ends in a tunnel the drain's list of
    // tunnels did not hold: it is asked at once (or once the edge confirms DRAIN).
    if inner.accepting.is_cancelled() {
        session.drain().await;
    }
    let transport = session.transport();
    tracing::info!(edge = %edge_id, %remote_addr, %transport, "edge connected");
    inner
        .metrics
        .edge_connections
        .with_label_values(&[&edge_id, "ok"])
        .inc();
    inner.emit(HubEvent::EdgeConnected {
        edge_id: edge_id.clone(),
        remote_addr,
        transport,
    });
    let pusher = (inner.clone(), edge_id.clone(), session.clone());
    tokio::spawn(async move {
        let (inner, edge_id, session) = pusher;
        crate::push::push_configs(&inner, &edge_id, &session, owed).await;
    });
    let tunnel = Tunnel {
        edge_id: edge_id.clone(),
        connection_id,
        from: remote_addr.ip(),
        quota,
    };
    serve_session(inner, &tunnel, &session, events).await;
    inner.registry().detach(&edge_id, connection_id);
    session.close("tunnel closed");
    let reason = session
        .close_reason()
        .map_or_else(|| "tunnel closed".to_owned(), |reason| reason.to_string());
    tracing::info!(edge = %edge_id, %reason, "edge disconnected");
    inner.emit(HubEvent::EdgeDisconnected { edge_id, reason });
}

/// CONFIG_ACK: the version applied (or the error that stopped it), and/or the edge's public
/// IP when STUN learned it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigAck {
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    public_ip: Option<std::net::IpAddr>,
}

/// One authenticated tunnel of an edge.
#[derive(Debug, Clone)]
struct Tunnel {
    edge_id: String,
    /// Tells the edge's tunnels apart in the registry.
    connection_id: u64,
    /// The address the tunnel comes from.
    from: IpAddr,
    /// What the edge may hold across its tunnels.
    quota: Arc<EdgeQuota>,
}

async fn serve_session(
    inner: &Arc<HubInner>,
    tunnel: &Tunnel,
    session: &SessionHandle,
    mut events: tokio::sync::mpsc::Receiver<SessionEvent>,
) {
    let mut udp = UdpSessions::new(
        inner,
        &tunnel.edge_id,
        tunnel.from,
        tunnel.quota.clone(),
        session.clone(),
    );
    let mut sweep = tokio::time::interval(UdpSessions::sweep_interval(inner));
    loop {
        let first = tokio::select! {
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
            _ = sweep.tick() => {
                udp.expire(inner);
                continue;
            }
        };
        dispatch(inner, tunnel, &mut udp, first).await;
        // Whatever else is already waiting, up to a bound, before the datagrams queued so far
        // leave in batches.
        for _ in 1..EVENT_BATCH {
            let Ok(event) = events.try_recv() else { break };
            dispatch(inner, tunnel, &mut udp, event).await;
        }
        udp.flush();
    }
}

/// Events handled in a row before queued UDP datagrams are written.
const EVENT_BATCH: usize = 64;

/// Acts on one event of an edge's session.
async fn dispatch(
    inner: &Arc<HubInner>,
    tunnel: &Tunnel,
    udp: &mut UdpSessions,
    event: SessionEvent,
) {
    let (edge_id, connection_id) = (tunnel.edge_id.as_str(), tunnel.connection_id);
    match event {
        SessionEvent::Opened {
            reader,
            writer,
            header,
        } => {
            let inner = inner.clone();
            let tunnel = tunnel.clone();
            tokio::spawn(async move { forward(inner, tunnel, reader, writer, header).await });
        }
        SessionEvent::ConfigAck(json) => record_ack(inner, edge_id, connection_id, &json),
        SessionEvent::RoundTrip(rtt) => {
            if inner.registry().record_rtt(edge_id, connection_id, rtt) {
                inner
                    .metrics
                    .tunnel_rtt
                    .with_label_values(&[edge_id])
                    .set(rtt.as_secs_f64());
            }
        }
        SessionEvent::UdpOpen { id, header } => udp.open(inner, id, header).await,
        SessionEvent::UdpDatagram { id, payload } => udp.datagram(id, payload),
        SessionEvent::UdpClose { id } => udp.close(inner, id),
        // Only an edge receives these.
        SessionEvent::Config(_) | SessionEvent::Drain | SessionEvent::Suspect { .. } => {}
    }
}

fn record_ack(inner: &HubInner, edge_id: &str, connection_id: u64, json: &[u8]) {
    let ack = match serde_json::from_slice::<ConfigAck>(json) {
        Ok(ack) => ack,
        Err(e) => {
            return remoteingress_tunnel::warn_limited!("bad_config_ack", edge = %edge_id, error = %e, "unreadable CONFIG_ACK ignored")
        }
    };
    match ack.public_ip {
        Some(ip) if is_global_unicast(ip) => {
            tracing::info!(edge = %edge_id, %ip, "edge reported its public IP");
            inner
                .registry()
                .record_public_ip(edge_id, connection_id, ip);
        }
        Some(ip) => {
            remoteingress_tunnel::warn_limited!("bad_public_ip", edge = %edge_id, %ip, "public IP ignored: not a global unicast address");
        }
        None => {}
    }
    let Some(version) = ack.version else { return };
    match &ack.error {
        None => tracing::info!(edge = %edge_id, version, "configuration applied"),
        Some(error) => {
            remoteingress_tunnel::warn_limited!("config_rejected", edge = %edge_id, version, %error, "edge rejected its configuration")
        }
    }
    inner
        .registry()
        .record_ack(edge_id, version, ack.error.clone());
    inner.emit(HubEvent::ConfigApplied {
        edge_id: edge_id.to_owned(),
        version,
        error: ack.error,
    });
}

/// Connects a stream to its target: PROXY line first, then bytes both ways.
async fn forward(
    inner: Arc<HubInner>,
    tunnel: Tunnel,
    reader: StreamReader,
    mut writer: StreamWriter,
    header: Bytes,
) {
    let edge_id = tunnel.edge_id;
    let stream_id = reader.id();
    inner
        .metrics
        .streams_opened
        .with_label_values(&[&edge_id])
        .inc();
    let admitted = route_of(&inner, &edge_id, tunnel.from, &header)
        .and_then(|route| Ok((stream_slots(&inner, &tunnel.quota, &route)?, route)));
    let (_slots, route) = match admitted {
        Ok(admitted) => admitted,
        Err(error) => {
            report_refusal(&inner, &edge_id, stream_id, &error);
            writer.reset();
            return;
        }
    };
    inner.emit(HubEvent::StreamOpened {
        edge_id: edge_id.clone(),
        stream_id,
        client_addr: route.client,
        edge_port: route.edge_port(),
        target: route.target(&inner),
    });
    // A RESET from the edge or the tunnel's loss cancels the connect at once.
    let abort = reader.abort_signal();
    let proxy_header = route.proxy_header(&edge_id);
    let connected = tokio::select! {
        connected = connect_target(&inner, &route, &proxy_header) => Some(connected),
        () = abort.cancelled() => None,
    };
    match connected {
        Some(Ok(socket)) => {
            let cancel = inner.shutdown.child_token();
            pipe(socket, reader, writer, cancel).await;
        }
        Some(Err(error)) => {
            report_refusal(&inner, &edge_id, stream_id, &error);
            writer.reset();
        }
        None => {}
    }
    inner.emit(HubEvent::StreamClosed { edge_id, stream_id });
}

/// A stream's places in its edge's quota and among the hub's connections to targets, held
/// until it ends.
fn stream_slots(
    inner: &HubInner,
    quota: &EdgeQuota,
    route: &Route,
) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), TargetError> {
    let refused = |reason| TargetError::Limit {
        protocol: Protocol::Tcp,
        port: route.edge_port(),
        reason,
    };
    let edge = quota
        .stream()
        .ok_or_else(|| refused(RefusalReason::EdgeLimit))?;
    let hub = inner
        .target_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| refused(RefusalReason::HubLimit))?;
    Ok((edge, hub))
}

/// Where a stream goes, from its OPEN's PROXY v1 line.
fn route_of(
    inner: &HubInner,
    edge_id: &str,
    tunnel_from: IpAddr,
    header: &[u8],
) -> Result<Route, TargetError> {
    let (proxy, len) = ProxyV1::parse(header)?.ok_or(TargetError::Incomplete)?;
    if len != header.len() {
        return Err(TargetError::NotJustHeader);
    }
    match proxy {
        ProxyV1::Tcp {
            source,
            destination,
        } => Route::of(
            inner,
            edge_id,
            Protocol::Tcp,
            source,
            destination,
            tunnel_from,
        ),
        ProxyV1::Unknown => Err(TargetError::NoPort),
    }
}

async fn connect_target(
    inner: &HubInner,
    route: &Route,
    header: &[u8],
) -> Result<TcpStream, TargetError> {
    let port = route.target_port;
    let host = route.host(inner);
    let target = route.target(inner);
    let started = std::time::Instant::now();
    let mut socket =
        tokio::time::timeout(inner.options.connect_timeout, connect_resetting(host, port))
            .await
            .map_err(|_| TargetError::Timeout(target.clone()))?
            .map_err(TargetError::io("connecting to", &target))?;
    inner
        .metrics
        .target_connect_duration
        .observe(started.elapsed().as_secs_f64());
    let _ = socket.set_nodelay(true);
    socket
        .write_all(header)
        .await
        .map_err(TargetError::io("writing the PROXY line to", &target))?;
    // From here the pipe decides how the connection ends: in order when both sides finish.
    #[allow(deprecated)] // deprecated for lingering closes that block; `None` restores the default
    socket
        .set_linger(None)
        .map_err(TargetError::io("configuring the connection to", &target))?;
    Ok(socket)
}

/// A connection to `host:port` (each resolved address in turn) that, until told otherwise,
/// closes with a TCP reset: one given up half-way because its stream was reset meanwhile must
/// reach the target as a reset, as the client's did, not as an orderly end.
async fn connect_resetting(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = remoteingress_tunnel::tcp_socket_for(addr)?;
        socket.set_zero_linger()?;
        match socket.connect(addr).await {
            Ok(connected) => return Ok(connected),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the name resolved to no address",
        )
    }))
}
