//! The tunnel listener: admission limits, TLS, the handshake, the session of each edge, and
//! forwarding of each stream to its target.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use remoteingress_tunnel::line::read_line;
use remoteingress_tunnel::{
    pipe, spawn_session, Role, SessionEvent, SessionHandle, StreamReader, StreamWriter,
};
use remoteingress_wire::handshake::{
    accept_reply, error_reply, EdgeHello, MAX_LINE_LEN, UNAUTHORIZED,
};
use remoteingress_wire::proxy::ProxyV1;
use remoteingress_wire::EdgeConfig;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::udp::UdpSessions;
use crate::{HubEvent, HubInner};

/// Counts unauthenticated connections per source address.
#[derive(Default)]
struct PerSource(Mutex<HashMap<IpAddr, usize>>);

/// Holds one unauthenticated slot (global and per source) until dropped.
struct Admission {
    _global: OwnedSemaphorePermit,
    source: IpAddr,
    per_source: Arc<PerSource>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut counts = self.per_source.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

pub(crate) async fn accept_loop(
    inner: Arc<HubInner>,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let global = Arc::new(Semaphore::new(inner.options.max_unauthenticated));
    let per_source = Arc::new(PerSource::default());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = inner.accepting.cancelled() => return,
        };
        let (tcp, remote_addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(admission) = admit(&inner, &global, &per_source, remote_addr.ip()) else {
            tracing::warn!(%remote_addr, "too many unauthenticated tunnel connections; dropped");
            inner
                .metrics
                .auth_failures
                .with_label_values(&["limit"])
                .inc();
            continue;
        };
        let inner = inner.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            handle_connection(inner, acceptor, tcp, remote_addr, admission).await;
        });
    }
}

fn admit(
    inner: &HubInner,
    global: &Arc<Semaphore>,
    per_source: &Arc<PerSource>,
    source: IpAddr,
) -> Option<Admission> {
    let permit = global.clone().try_acquire_owned().ok()?;
    let mut counts = per_source.0.lock().unwrap_or_else(|p| p.into_inner());
    let count = counts.entry(source).or_default();
    if *count >= inner.options.max_unauthenticated_per_source {
        return None;
    }
    *count += 1;
    Some(Admission {
        _global: permit,
        source,
        per_source: per_source.clone(),
    })
}

fn auth_failed(inner: &HubInner, remote_addr: SocketAddr, kind: &str, reason: String) {
    tracing::warn!(%remote_addr, %reason, "edge authentication failed");
    inner.metrics.auth_failures.with_label_values(&[kind]).inc();
    inner.emit(HubEvent::AuthFailed {
        remote_addr,
        reason,
    });
}

/// Runs a handshake within the deadline; a failure or timeout is reported and gives `None`.
async fn within_deadline<T>(
    inner: &HubInner,
    remote_addr: SocketAddr,
    handshake: impl std::future::Future<Output = Result<T, (&'static str, String)>>,
) -> Option<T> {
    match tokio::time::timeout(inner.options.handshake_timeout, handshake).await {
        Ok(Ok(done)) => Some(done),
        Ok(Err((kind, reason))) => {
            auth_failed(inner, remote_addr, kind, reason);
            None
        }
        Err(_) => {
            let reason = "handshake not finished in time".into();
            auth_failed(inner, remote_addr, "timeout", reason);
            None
        }
    }
}

/// Checks a handshake line: the edge and its configuration, or the failure kind and reason.
fn check_hello(
    inner: &HubInner,
    line: &[u8],
) -> Result<(EdgeHello, EdgeConfig), (&'static str, String)> {
    let hello = EdgeHello::parse(line).map_err(|e| ("malformed", e.to_string()))?;
    // Bound first: a guard in the match scrutinee would live through the arms below.
    let config = inner.registry().authenticate(&hello.edge_id, &hello.secret);
    match config {
        Some(config) => Ok((hello, config)),
        None => {
            if inner.registry().is_configured(&hello.edge_id) {
                inner
                    .metrics
                    .edge_connections
                    .with_label_values(&[&hello.edge_id, "rejected"])
                    .inc();
            }
            Err((
                "bad_credentials",
                format!("bad credentials for edge {:?}", hello.edge_id),
            ))
        }
    }
}

async fn handle_connection(
    inner: Arc<HubInner>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote_addr: SocketAddr,
    admission: Admission,
) {
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        let mut tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| ("tls", format!("TLS: {e}")))?;
        let (line, rest) = read_line(&mut tls, MAX_LINE_LEN)
            .await
            .map_err(|e| ("malformed", format!("handshake: {e}")))?;
        Ok::<_, (&str, String)>((tls, line, rest))
    };
    let Some((mut tls, line, rest)) = within_deadline(&inner, remote_addr, handshake).await else {
        return;
    };
    let (hello, config) = match check_hello(&inner, &line) {
        Ok(accepted) => accepted,
        Err((kind, reason)) => {
            let _ = tls.write_all(error_reply(UNAUTHORIZED).as_bytes()).await;
            let _ = tls.shutdown().await;
            return auth_failed(&inner, remote_addr, kind, reason);
        }
    };
    if let Err(e) = tls.write_all(accept_reply(&config).as_bytes()).await {
        let reason = format!("writing the reply failed: {e}");
        return auth_failed(&inner, remote_addr, "tls", reason);
    }
    drop(admission);
    let (session, events) = spawn_session(tls, rest, Role::Hub, inner.options.session.clone());
    run_session(&inner, hello, config, session, events, remote_addr).await;
}

pub(crate) async fn quic_accept_loop(inner: Arc<HubInner>, endpoint: quinn::Endpoint) {
    let global = Arc::new(Semaphore::new(inner.options.max_unauthenticated));
    let per_source = Arc::new(PerSource::default());
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            () = inner.accepting.cancelled() => break,
        };
        let remote_addr = incoming.remote_address();
        let Some(admission) = admit(&inner, &global, &per_source, remote_addr.ip()) else {
            inner
                .metrics
                .auth_failures
                .with_label_values(&["limit"])
                .inc();
            incoming.refuse();
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move { handle_quic(inner, incoming, remote_addr, admission).await });
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"hub shutting down");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
}

async fn handle_quic(
    inner: Arc<HubInner>,
    incoming: quinn::Incoming,
    remote_addr: SocketAddr,
    admission: Admission,
) {
    let handshake = async {
        let connection = incoming
            .accept()
            .map_err(|e| ("tls", format!("QUIC: {e}")))?
            .await
            .map_err(|e| ("tls", format!("QUIC: {e}")))?;
        let (send, mut recv) = connection
            .accept_bi()
            .await
            .map_err(|e| ("malformed", format!("no control stream: {e}")))?;
        let (line, rest) = read_line(&mut recv, MAX_LINE_LEN)
            .await
            .map_err(|e| ("malformed", format!("handshake: {e}")))?;
        Ok::<_, (&str, String)>((connection, send, recv, line, rest))
    };
    let Some((connection, mut send, recv, line, rest)) =
        within_deadline(&inner, remote_addr, handshake).await
    else {
        return;
    };
    let (hello, config) = match check_hello(&inner, &line) {
        Ok(accepted) => accepted,
        Err((kind, reason)) => {
            let _ = send.write_all(error_reply(UNAUTHORIZED).as_bytes()).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
            connection.close(quinn::VarInt::from_u32(1), UNAUTHORIZED.as_bytes());
            return auth_failed(&inner, remote_addr, kind, reason);
        }
    };
    if let Err(e) = send.write_all(accept_reply(&config).as_bytes()).await {
        let reason = format!("writing the reply failed: {e}");
        return auth_failed(&inner, remote_addr, "tls", reason);
    }
    drop(admission);
    let (session, events) = remoteingress_tunnel::spawn_quic_session(
        connection,
        (send, recv),
        rest,
        Role::Hub,
        inner.options.session.clone(),
    );
    run_session(&inner, hello, config, session, events, remote_addr).await;
}

/// Registers an authenticated tunnel, serves it until it ends, and forgets it.
async fn run_session(
    inner: &Arc<HubInner>,
    hello: EdgeHello,
    config: EdgeConfig,
    session: SessionHandle,
    events: tokio::sync::mpsc::Receiver<SessionEvent>,
    remote_addr: SocketAddr,
) {
    let edge_id = hello.edge_id.clone();
    let attached = inner.registry().attach(
        &edge_id,
        &hello.secret,
        session.clone(),
        remote_addr,
        config.version.unwrap_or_default(),
    );
    let Ok((connection_id, newer)) = attached else {
        session.close("edge removed or its secret changed during the handshake");
        return;
    };
    let transport = session.transport();
    tracing::info!(edge = %edge_id, %remote_addr, transport, "edge connected");
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
    crate::registry::perform(inner, newer.into_iter().collect()).await;
    serve_session(inner, &edge_id, connection_id, &session, events).await;
    inner.registry().detach(&edge_id, connection_id);
    let reason = session
        .close_reason()
        .unwrap_or_else(|| "tunnel closed".into());
    session.close(reason.clone());
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

async fn serve_session(
    inner: &Arc<HubInner>,
    edge_id: &str,
    connection_id: u64,
    session: &SessionHandle,
    mut events: tokio::sync::mpsc::Receiver<SessionEvent>,
) {
    let mut udp = UdpSessions::new(edge_id, session.clone());
    let mut sweep = tokio::time::interval(UdpSessions::sweep_interval(inner));
    loop {
        let event = tokio::select! {
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
            _ = sweep.tick() => {
                udp.expire(inner);
                continue;
            }
        };
        match event {
            SessionEvent::Opened {
                reader,
                writer,
                header,
            } => {
                let inner = inner.clone();
                let edge_id = edge_id.to_owned();
                tokio::spawn(async move { forward(inner, edge_id, reader, writer, header).await });
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
            SessionEvent::UdpDatagram { id, payload } => udp.datagram(inner, id, &payload),
            SessionEvent::UdpClose { id } => udp.close(inner, id),
            SessionEvent::Config(_) => {}
        }
    }
}

fn record_ack(inner: &HubInner, edge_id: &str, connection_id: u64, json: &[u8]) {
    let ack = match serde_json::from_slice::<ConfigAck>(json) {
        Ok(ack) => ack,
        Err(e) => {
            return tracing::warn!(edge = %edge_id, error = %e, "unreadable CONFIG_ACK ignored")
        }
    };
    if let Some(ip) = ack.public_ip {
        tracing::info!(edge = %edge_id, %ip, "edge reported its public IP");
        inner
            .registry()
            .record_public_ip(edge_id, connection_id, ip);
    }
    let Some(version) = ack.version else { return };
    match &ack.error {
        None => tracing::info!(edge = %edge_id, version, "configuration applied"),
        Some(error) => {
            tracing::warn!(edge = %edge_id, version, %error, "edge rejected its configuration")
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
    edge_id: String,
    reader: StreamReader,
    mut writer: StreamWriter,
    header: Bytes,
) {
    let stream_id = reader.id();
    inner
        .metrics
        .streams_opened
        .with_label_values(&[&edge_id])
        .inc();
    inner.emit(HubEvent::StreamOpened {
        edge_id: edge_id.clone(),
        stream_id,
    });
    match connect_target(&inner, &edge_id, &header).await {
        Ok(socket) => {
            let cancel = inner.shutdown.child_token();
            pipe(socket, reader, writer, cancel).await;
        }
        Err(reason) => {
            tracing::debug!(edge = %edge_id, stream = stream_id, %reason, "stream refused");
            inner
                .metrics
                .target_connect_errors
                .with_label_values(&[&edge_id])
                .inc();
            writer.finish().await;
        }
    }
    inner.emit(HubEvent::StreamClosed { edge_id, stream_id });
}

async fn connect_target(
    inner: &HubInner,
    edge_id: &str,
    header: &[u8],
) -> Result<TcpStream, String> {
    let (proxy, len) = ProxyV1::parse(header)
        .map_err(|e| e.to_string())?
        .ok_or("incomplete PROXY line")?;
    if len != header.len() {
        return Err("bytes after the PROXY line in OPEN".into());
    }
    let edge_port = proxy
        .destination_port()
        .ok_or("PROXY UNKNOWN has no destination port")?;
    let port = inner
        .registry()
        .target_port(edge_id, edge_port)
        .ok_or("edge no longer configured")?;
    let host = inner.options.target_host.as_str();
    let started = std::time::Instant::now();
    let mut socket = tokio::time::timeout(
        inner.options.connect_timeout,
        TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| format!("connecting to {host}:{port} timed out"))?
    .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    inner
        .metrics
        .target_connect_duration
        .observe(started.elapsed().as_secs_f64());
    let _ = socket.set_nodelay(true);
    socket
        .write_all(header)
        .await
        .map_err(|e| format!("writing the PROXY line to {host}:{port}: {e}"))?;
    Ok(socket)
}
