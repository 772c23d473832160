//! The QUIC transport (quinn): the first bidirectional stream is the control channel (handshake
//! line, JSON reply, then `[type][length][payload]` messages); every tunnelled TCP connection is
//! its own stream starting with its PROXY v1 line; UDP travels as QUIC datagrams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, RecvStream, SendStream, TransportConfig, VarInt};
use remoteingress_wire::frame::FrameType;
use remoteingress_wire::proxy::V1_MAX_LEN;
use remoteingress_wire::quic::{encode_control, ControlDecoder, Datagram};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::mux::{Role, SessionError, SessionEvent, SessionOptions, SessionStats};
use crate::session::SessionHandle;
use crate::stream::{StreamReader, StreamWriter};
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

/// Counts a stream as active until both of its halves are gone.
#[derive(Debug)]
pub(crate) struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    fn new(active: &Arc<AtomicUsize>) -> Arc<Self> {
        active.fetch_add(1, Ordering::Relaxed);
        Arc::new(Self(active.clone()))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// State of one QUIC session.
#[derive(Debug)]
pub(crate) struct QuicShared {
    role: Role,
    options: SessionOptions,
    connection: Connection,
    control_tx: mpsc::Sender<(FrameType, Bytes)>,
    closed: CancellationToken,
    close_reason: Mutex<Option<String>>,
    pub(crate) stats: SessionStats,
    active: Arc<AtomicUsize>,
    next_udp_id: AtomicU32,
    /// Opening headers of UDP sessions the hub has not answered yet (edge): the open is repeated
    /// before each datagram until it has, so a lost open never black-holes a session.
    unconfirmed_udp: Mutex<HashMap<u32, Bytes>>,
}

impl QuicShared {
    fn shutdown(&self, reason: String) {
        {
            let mut current = self.close_reason.lock().unwrap_or_else(|p| p.into_inner());
            if current.is_none() {
                *current = Some(reason.clone());
            }
        }
        self.connection
            .close(VarInt::from_u32(0), reason.as_bytes());
        self.closed.cancel();
    }

    fn unconfirmed(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Bytes>> {
        self.unconfirmed_udp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn send_datagram(&self, datagram: &Datagram) -> bool {
        let bytes = datagram.encode();
        let fits = self
            .connection
            .max_datagram_size()
            .is_some_and(|max| bytes.len() <= max);
        let sent = fits && self.connection.send_datagram(bytes).is_ok();
        if !sent {
            self.stats.udp_dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }
}

/// The QUIC transport's session.
#[derive(Clone, Debug)]
pub(crate) struct QuicSession {
    shared: Arc<QuicShared>,
}

/// Starts a session over an authenticated connection whose control stream is `control`.
pub fn spawn_quic_session(
    connection: Connection,
    control: (SendStream, RecvStream),
    initial: Bytes,
    role: Role,
    options: SessionOptions,
) -> (SessionHandle, mpsc::Receiver<SessionEvent>) {
    let (control_tx, control_rx) = mpsc::channel(options.lanes.control_frames);
    let (events_tx, events_rx) = mpsc::channel(1024);
    let shared = Arc::new(QuicShared {
        role,
        connection,
        control_tx,
        closed: CancellationToken::new(),
        close_reason: Mutex::new(None),
        stats: SessionStats::default(),
        active: Arc::new(AtomicUsize::new(0)),
        next_udp_id: AtomicU32::new(1),
        unconfirmed_udp: Mutex::new(HashMap::new()),
        options,
    });
    let (send, recv) = control;
    spawn_task(&shared, write_control(send, control_rx));
    spawn_task(
        &shared,
        read_control(recv, initial, shared.clone(), events_tx.clone()),
    );
    spawn_task(&shared, read_datagrams(shared.clone(), events_tx.clone()));
    if role == Role::Hub {
        spawn_task(&shared, accept_streams(shared.clone(), events_tx.clone()));
        spawn_task(&shared, report_rtt(shared.clone(), events_tx));
    }
    let watched = shared.clone();
    tokio::spawn(async move {
        let error = watched.connection.closed().await;
        watched.shutdown(format!("QUIC connection closed: {error}"));
    });
    (SessionHandle::quic(QuicSession { shared }), events_rx)
}

fn spawn_task(
    shared: &Arc<QuicShared>,
    task: impl std::future::Future<Output = Result<(), String>> + Send + 'static,
) {
    let shared = shared.clone();
    tokio::spawn(async move {
        let result = tokio::select! {
            result = task => result,
            () = shared.closed.cancelled() => return,
        };
        if let Err(reason) = result {
            shared.shutdown(reason);
        }
    });
}

async fn write_control(
    mut send: SendStream,
    mut rx: mpsc::Receiver<(FrameType, Bytes)>,
) -> Result<(), String> {
    let mut buf = BytesMut::new();
    while let Some((kind, payload)) = rx.recv().await {
        encode_control(&mut buf, kind, &payload);
        send.write_all(&buf)
            .await
            .map_err(|e| format!("control stream write failed: {e}"))?;
        buf.clear();
    }
    Ok(())
}

async fn read_control(
    mut recv: RecvStream,
    initial: Bytes,
    shared: Arc<QuicShared>,
    events: mpsc::Sender<SessionEvent>,
) -> Result<(), String> {
    let mut decoder = ControlDecoder::default();
    decoder.feed(&initial);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while let Some((kind, payload)) = decoder
            .next_message()
            .map_err(|e| format!("protocol error on the control stream: {e}"))?
        {
            let event = match (kind, shared.role) {
                (FrameType::Config, Role::Edge) => SessionEvent::Config(payload),
                (FrameType::ConfigAck, Role::Hub) => SessionEvent::ConfigAck(payload),
                (FrameType::UdpClose, _) => {
                    let id: [u8; 4] = payload
                        .as_ref()
                        .try_into()
                        .map_err(|_| "protocol error: UDP_CLOSE without a session id".to_owned())?;
                    let id = u32::from_be_bytes(id);
                    shared.unconfirmed().remove(&id);
                    SessionEvent::UdpClose { id }
                }
                (kind, _) => {
                    return Err(format!(
                        "protocol error: unexpected {kind:?} on the control stream"
                    ))
                }
            };
            events
                .send(event)
                .await
                .map_err(|_| "session owner gone".to_owned())?;
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.feed(&buf[..n]),
            Ok(None) => return Err("peer closed the control stream".into()),
            Err(e) => return Err(format!("control stream read failed: {e}")),
        }
    }
}

async fn read_datagrams(
    shared: Arc<QuicShared>,
    events: mpsc::Sender<SessionEvent>,
) -> Result<(), String> {
    let mut last_open = 0u32;
    let mut to_lose = shared.options.drop_first_udp_opens;
    loop {
        let bytes = shared
            .connection
            .read_datagram()
            .await
            .map_err(|e| format!("QUIC connection lost: {e}"))?;
        let Some(datagram) = Datagram::parse(bytes) else {
            continue;
        };
        if to_lose > 0 && matches!(datagram, Datagram::Open { .. }) {
            to_lose -= 1;
            continue;
        }
        let event = match (datagram, shared.role) {
            (Datagram::Open { id, header }, Role::Hub) if id > last_open => {
                last_open = id;
                SessionEvent::UdpOpen { id, header }
            }
            // A repeated open of a known session; its data follows separately.
            (Datagram::Open { .. }, _) => continue,
            // Data whose open was lost: the edge repeats the open with the next datagram.
            (Datagram::Data { id, .. }, Role::Hub) if id > last_open => {
                shared.stats.udp_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            (Datagram::Data { id, payload }, Role::Edge) => {
                shared.unconfirmed().remove(&id);
                SessionEvent::UdpDatagram { id, payload }
            }
            (Datagram::Data { id, payload }, Role::Hub) => {
                SessionEvent::UdpDatagram { id, payload }
            }
        };
        if events.try_send(event).is_err() {
            shared.stats.udp_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reads a stream's PROXY v1 line byte by byte, so no byte after it is consumed.
async fn read_proxy_line(recv: &mut RecvStream) -> Result<Bytes, String> {
    let mut line = Vec::with_capacity(V1_MAX_LEN);
    while line.len() < V1_MAX_LEN {
        let byte = recv
            .read_u8()
            .await
            .map_err(|e| format!("stream ended before its PROXY line: {e}"))?;
        line.push(byte);
        if byte == b'\n' {
            return Ok(Bytes::from(line));
        }
    }
    Err("PROXY line longer than 107 bytes".into())
}

async fn accept_streams(
    shared: Arc<QuicShared>,
    events: mpsc::Sender<SessionEvent>,
) -> Result<(), String> {
    loop {
        let (send, mut recv) = shared
            .connection
            .accept_bi()
            .await
            .map_err(|e| format!("QUIC connection lost: {e}"))?;
        let shared = shared.clone();
        let events = events.clone();
        tokio::spawn(async move {
            let header =
                match tokio::time::timeout(Duration::from_secs(10), read_proxy_line(&mut recv))
                    .await
                {
                    Ok(Ok(header)) => header,
                    Ok(Err(reason)) => return tracing::debug!(%reason, "stream refused"),
                    Err(_) => return tracing::debug!("stream refused: no PROXY line in time"),
                };
            let id = recv.id().index() as u32;
            let guard = StreamGuard::new(&shared.active);
            shared.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
            let event = SessionEvent::Opened {
                reader: StreamReader::quic(id, recv, shared.clone(), guard.clone()),
                writer: StreamWriter::quic(send, shared, guard),
                header,
            };
            let _ = events.send(event).await;
        });
    }
}

async fn report_rtt(
    shared: Arc<QuicShared>,
    events: mpsc::Sender<SessionEvent>,
) -> Result<(), String> {
    let mut interval = tokio::time::interval(shared.options.ping_interval);
    loop {
        interval.tick().await;
        let _ = events.try_send(SessionEvent::RoundTrip(shared.connection.rtt()));
    }
}

impl QuicSession {
    pub(crate) async fn open(
        &self,
        header: Bytes,
    ) -> Result<(StreamReader, StreamWriter), SessionError> {
        let shared = &self.shared;
        if shared.active.load(Ordering::Relaxed) >= shared.options.max_streams {
            return Err(SessionError::TooManyStreams(shared.options.max_streams));
        }
        let (mut send, recv) = shared
            .connection
            .open_bi()
            .await
            .map_err(|_| SessionError::Closed)?;
        send.write_all(&header)
            .await
            .map_err(|_| SessionError::Closed)?;
        let guard = StreamGuard::new(&shared.active);
        shared.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        let id = recv.id().index() as u32;
        Ok((
            StreamReader::quic(id, recv, shared.clone(), guard.clone()),
            StreamWriter::quic(send, shared.clone(), guard),
        ))
    }

    pub(crate) async fn send_control(
        &self,
        kind: FrameType,
        payload: Bytes,
    ) -> Result<(), SessionError> {
        self.shared
            .control_tx
            .send((kind, payload))
            .await
            .map_err(|_| SessionError::Closed)
    }

    pub(crate) async fn open_udp(&self, header: Bytes) -> Result<u32, SessionError> {
        if self.shared.closed.is_cancelled() {
            return Err(SessionError::Closed);
        }
        let id = self.shared.next_udp_id.fetch_add(1, Ordering::Relaxed);
        self.shared.unconfirmed().insert(id, header.clone());
        self.shared.send_datagram(&Datagram::Open { id, header });
        Ok(id)
    }

    pub(crate) fn send_udp(&self, id: u32, payload: Bytes) -> bool {
        let reopen = self.shared.unconfirmed().get(&id).cloned();
        if let Some(header) = reopen {
            self.shared.send_datagram(&Datagram::Open { id, header });
        }
        self.shared.send_datagram(&Datagram::Data { id, payload })
    }

    pub(crate) fn close_udp(&self, id: u32) {
        self.shared.unconfirmed().remove(&id);
        let _ = self.shared.control_tx.try_send((
            FrameType::UdpClose,
            Bytes::copy_from_slice(&id.to_be_bytes()),
        ));
    }

    pub(crate) fn close(&self, reason: String) {
        self.shared.shutdown(reason);
    }

    pub(crate) async fn closed(&self) {
        self.shared.closed.cancelled().await;
    }

    pub(crate) fn cancellation(&self) -> CancellationToken {
        self.shared.closed.child_token()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    pub(crate) fn close_reason(&self) -> Option<String> {
        self.shared
            .close_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn active_streams(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    pub(crate) fn stats(&self) -> &SessionStats {
        &self.shared.stats
    }

    pub(crate) fn rtt(&self) -> Option<Duration> {
        Some(self.shared.connection.rtt())
    }
}

/// Writes a handshake line or reply on a stream.
pub async fn write_line(send: &mut SendStream, line: &str) -> Result<(), String> {
    send.write_all(line.as_bytes())
        .await
        .map_err(|e| e.to_string())
}
