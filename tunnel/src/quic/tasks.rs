//! The tasks of a QUIC session: the control stream in both directions, incoming datagrams,
//! incoming streams (hub), round-trip reports (hub), and the connection's end.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use remoteingress_wire::extension::Extensions;
use remoteingress_wire::frame::FrameType;
use remoteingress_wire::proxy::V1_MAX_LEN;
use remoteingress_wire::quic::{encode_control, ControlDecoder, Datagram};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::endpoint::{initial_stream_limit, next_stream_limit, stream_limit};
use super::shared::{QuicShared, StreamGuard};
use super::stream::halves;
use crate::error::{CloseReason, ProtocolViolation};
use crate::event::{SessionEvent, RTT_REPORT_INTERVAL};
use crate::lifecycle::TaskEnd;
use crate::line::LineError;
use crate::options::Role;
use crate::stream::{StreamReader, StreamWriter};

/// Time a new stream has to deliver its PROXY line.
const PROXY_LINE_DEADLINE: Duration = Duration::from_secs(10);

fn lost(shared: &QuicShared, error: quinn::ConnectionError) -> CloseReason {
    CloseReason::from_connection(error, shared.options.idle_timeout)
}

/// Ends the session with the connection's own reason once it closes.
pub(crate) async fn watch_connection(shared: Arc<QuicShared>) -> TaskEnd {
    let error = shared.connection.closed().await;
    Err(lost(&shared, error))
}

/// Writes queued control messages to the control stream.
pub(crate) async fn write_control(
    mut send: SendStream,
    mut rx: mpsc::Receiver<(FrameType, Bytes)>,
    shared: Arc<QuicShared>,
) -> TaskEnd {
    let mut buf = BytesMut::new();
    while let Some((kind, payload)) = rx.recv().await {
        encode_control(&mut buf, kind, &payload);
        send.write_all(&buf).await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(e) => lost(&shared, e),
            e => CloseReason::Io(format!("control stream write failed: {e}")),
        })?;
        buf.clear();
    }
    Err(CloseReason::Local("the control queue closed".into()))
}

/// The 4-byte id a control message (UDP_CLOSE, OPENED) carries.
fn u32_id(payload: &[u8]) -> Result<u32, ProtocolViolation> {
    let id: [u8; 4] = payload
        .try_into()
        .map_err(|_| ProtocolViolation::ControlMessageWithoutId)?;
    Ok(u32::from_be_bytes(id))
}

/// Hub: records the extensions the edge confirmed and echoes them, so that the edge knows from
/// when on its opens are confirmed; then sends a drain asked before they arrived.
async fn on_confirmation(shared: &QuicShared, payload: &[u8]) -> Result<(), CloseReason> {
    let confirmed =
        Extensions::parse(payload).map_err(|e| ProtocolViolation::Extensions(e.to_string()))?;
    let drain_due = shared
        .lifecycle
        .confirm(confirmed, shared.options.extensions);
    let agreed = Bytes::from(shared.lifecycle.agreed.get().to_payload());
    let _ = shared.control_tx.try_send((FrameType::Extensions, agreed));
    if drain_due {
        let drain = (FrameType::Drain, Bytes::new());
        shared
            .control_tx
            .send(drain)
            .await
            .map_err(|_| CloseReason::Local("the control queue closed".into()))?;
    }
    Ok(())
}

/// Reads control messages and reports them as events.
pub(crate) async fn read_control(
    mut recv: RecvStream,
    initial: Bytes,
    shared: Arc<QuicShared>,
    events: mpsc::Sender<SessionEvent>,
) -> TaskEnd {
    let mut decoder = ControlDecoder::default();
    decoder.feed(&initial);
    let mut extensions_seen = false;
    loop {
        while let Some((kind, payload)) = decoder.next_message().map_err(ProtocolViolation::from)? {
            let event = match (kind, shared.role) {
                (FrameType::Config, Role::Edge) => SessionEvent::Config(payload),
                (FrameType::Drain, Role::Edge) if shared.lifecycle.agreed.get().drain => {
                    SessionEvent::Drain
                }
                (FrameType::Extensions, Role::Hub) if !extensions_seen => {
                    extensions_seen = true;
                    on_confirmation(&shared, &payload).await?;
                    continue;
                }
                (FrameType::Extensions, Role::Edge) if !extensions_seen => {
                    extensions_seen = true;
                    let echoed = Extensions::parse(&payload)
                        .map_err(|e| ProtocolViolation::Extensions(e.to_string()))?;
                    if echoed.liveness && shared.lifecycle.agreed.get().liveness {
                        shared.hub_confirms_opens();
                    }
                    continue;
                }
                (FrameType::Opened, Role::Edge) if shared.lifecycle.agreed.get().liveness => {
                    shared.stream_confirmed(u32_id(&payload)?);
                    continue;
                }
                (FrameType::ConfigAck, Role::Hub) => SessionEvent::ConfigAck(payload),
                (FrameType::UdpClose, _) => {
                    let id = u32_id(&payload)?;
                    shared.unconfirmed().remove(&id);
                    SessionEvent::UdpClose { id }
                }
                (kind, role) => {
                    let from = role.peer();
                    return Err(ProtocolViolation::UnexpectedFrame { kind, from }.into());
                }
            };
            events
                .send(event)
                .await
                .map_err(|_| CloseReason::OwnerGone)?;
        }
        // Chunks as quinn holds them: no buffer of our own for a stream that is mostly quiet.
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => decoder.feed(&chunk.bytes),
            Ok(None) => return Err(CloseReason::PeerClosed),
            Err(quinn::ReadError::ConnectionLost(e)) => return Err(lost(&shared, e)),
            Err(e) => return Err(CloseReason::Io(format!("control stream read failed: {e}"))),
        }
    }
}

/// Reads UDP datagrams and reports them as events; a full event queue drops (and counts) them.
pub(crate) async fn read_datagrams(
    shared: Arc<QuicShared>,
    events: mpsc::Sender<SessionEvent>,
) -> TaskEnd {
    let mut last_open = 0u32;
    loop {
        let bytes = shared
            .connection
            .read_datagram()
            .await
            .map_err(|e| lost(&shared, e))?;
        let Some(datagram) = Datagram::parse(bytes) else {
            continue;
        };
        let event = match (datagram, shared.role) {
            (Datagram::Open { id, header }, Role::Hub) if id > last_open => {
                last_open = id;
                SessionEvent::UdpOpen { id, header }
            }
            // A repeated open of a known session; its data follows separately.
            (Datagram::Open { .. }, _) => continue,
            // Data whose open was lost: the edge repeats the open with the next datagram.
            (Datagram::Data { id, .. }, Role::Hub) if id > last_open => {
                shared.lifecycle.stats.udp_drop();
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
            shared.lifecycle.stats.udp_drop();
        }
    }
}

/// Reads a stream's PROXY v1 line byte by byte, so no byte after it is consumed.
async fn read_proxy_line(recv: &mut RecvStream) -> Result<Bytes, LineError> {
    let mut line = Vec::with_capacity(V1_MAX_LEN);
    while line.len() < V1_MAX_LEN {
        let byte = recv.read_u8().await.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => LineError::Eof,
            _ => LineError::Io(e),
        })?;
        line.push(byte);
        if byte == b'\n' {
            return Ok(Bytes::from(line));
        }
    }
    Err(LineError::TooLong(V1_MAX_LEN))
}

/// Accepts the edge's streams and reports each once its PROXY line has arrived (hub). The edge
/// may open as many streams at once as the limit says; it starts small and grows, up to the
/// session's cap, whenever half of it is in use.
pub(crate) async fn accept_streams(
    shared: Arc<QuicShared>,
    events: mpsc::Sender<SessionEvent>,
) -> TaskEnd {
    let cap = shared.options.max_streams;
    let mut limit = initial_stream_limit(cap);
    loop {
        let (send, mut recv) = shared
            .connection
            .accept_bi()
            .await
            .map_err(|e| lost(&shared, e))?;
        // Counted from now on, so that streams still sending their PROXY line raise the limit too.
        let guard = StreamGuard::new(&shared);
        if shared.lifecycle.active() * 2 >= limit && limit < cap {
            limit = next_stream_limit(limit, cap);
            shared
                .connection
                .set_max_concurrent_bi_streams(stream_limit(limit));
        }
        let events = events.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            if shared.lifecycle.agreed.get().liveness {
                let index = recv.id().index() as u32;
                let opened = (
                    FrameType::Opened,
                    Bytes::copy_from_slice(&index.to_be_bytes()),
                );
                let _ = shared.control_tx.send(opened).await;
            }
            let header =
                match tokio::time::timeout(PROXY_LINE_DEADLINE, read_proxy_line(&mut recv)).await {
                    Ok(Ok(header)) => header,
                    Ok(Err(error)) => return tracing::debug!(%error, "stream refused: PROXY line"),
                    Err(_) => return tracing::debug!("stream refused: no PROXY line in time"),
                };
            let (reader, writer) = halves(send, recv, guard);
            let event = SessionEvent::Opened {
                reader: StreamReader::quic(reader),
                writer: StreamWriter::quic(writer),
                header,
            };
            let _ = events.send(event).await;
        });
    }
}

/// Reports QUIC's round-trip estimate every few seconds (hub).
pub(crate) async fn report_rtt(
    shared: Arc<QuicShared>,
    events: mpsc::Sender<SessionEvent>,
) -> TaskEnd {
    let mut interval = tokio::time::interval(RTT_REPORT_INTERVAL);
    loop {
        interval.tick().await;
        let _ = events.try_send(SessionEvent::RoundTrip(shared.connection.rtt()));
    }
}
