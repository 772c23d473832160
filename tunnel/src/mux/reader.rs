//! The tunnel reader: decodes frames and dispatches each to its stream, to the owner as an
//! event, or to the writer as an answer. Every protocol violation ends the session here.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use remoteingress_wire::extension::Extensions;
use remoteingress_wire::frame::{Frame, FrameDecoder, FrameType, CONTROL_STREAM};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use super::ping::pong_received;
use super::shared::{close_out, data_out, udp_data_out, window_out, Outgoing, Shared, StreamSlot};
use super::stream::halves;
use crate::clock::now;
use crate::error::{CloseReason, ProtocolViolation};
use crate::event::{SessionEvent, RTT_REPORT_INTERVAL};
use crate::lifecycle::TaskEnd;
use crate::options::Role;
use crate::stream::{StreamReader, StreamWriter};

/// Largest read from the tunnel in one call.
const READ_CHUNK: usize = 64 * 1024;
/// The read buffer of a quiet tunnel: enough for PINGs and small frames.
const QUIET_READ_CHUNK: usize = 2 * 1024;
/// A tunnel that has read nothing for this long gives its large read buffer back, so that idle
/// edges cost the hub little.
pub(crate) const RELEASE_IDLE_BUFFERS: Duration = Duration::from_secs(1);
/// Consecutive empty DATA frames tolerated.
const MAX_EMPTY_DATA_RUN: u32 = 100;
/// DATA payloads smaller than this are copied out of the read buffer so that a few stalled
/// bytes never pin a whole 64 KiB read buffer.
const COPY_BELOW: usize = 8 * 1024;

/// What the reader needs to dispatch frames.
pub(crate) struct Reader {
    shared: Arc<Shared>,
    events: mpsc::Sender<SessionEvent>,
    last_peer_id: u32,
    last_udp_id: u32,
    empty_data_run: u32,
    extensions_seen: bool,
    /// When the owner was last told the round trip.
    rtt_reported: Option<Instant>,
}

type Dispatched = Result<(), CloseReason>;

/// The reader's buffer: small while the tunnel is quiet, doubled up to [`READ_CHUNK`] by reads
/// that fill it, small again after [`RELEASE_IDLE_BUFFERS`] without a read.
///
/// It stays initialised: handing TLS uninitialised capacity would make it zero the whole
/// capacity on each read, however little it returns.
struct ReadBuffer(Vec<u8>);

impl Default for ReadBuffer {
    fn default() -> Self {
        Self(vec![0; QUIET_READ_CHUNK])
    }
}

impl ReadBuffer {
    fn space(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// The first `n` bytes, just read; a read that filled the buffer doubles it.
    fn filled(&mut self, n: usize) -> &[u8] {
        if n == self.0.len() && n < READ_CHUNK {
            let mut larger = vec![0; (n * 2).min(READ_CHUNK)];
            larger[..n].copy_from_slice(&self.0);
            self.0 = larger;
        }
        &self.0[..n]
    }

    fn is_quiet(&self) -> bool {
        self.0.len() <= QUIET_READ_CHUNK
    }

    fn quieten(&mut self) {
        *self = Self::default();
    }
}

impl Reader {
    pub(crate) fn new(shared: Arc<Shared>, events: mpsc::Sender<SessionEvent>) -> Self {
        Self {
            shared,
            events,
            last_peer_id: 0,
            last_udp_id: 0,
            empty_data_run: 0,
            extensions_seen: false,
            rtt_reported: None,
        }
    }

    /// Reads and dispatches frames until the tunnel ends; `initial` holds bytes read past the
    /// handshake.
    pub(crate) async fn run<R: AsyncRead>(mut self, io: R, initial: Bytes) -> TaskEnd {
        tokio::pin!(io);
        let mut decoder = FrameDecoder::new();
        decoder.feed(&initial);
        let idle = self.shared.silence_limit();
        let mut scratch = ReadBuffer::default();
        let mut last_read = tokio::time::Instant::now();
        loop {
            while let Some(frame) = decoder.next_frame().map_err(ProtocolViolation::from)? {
                self.dispatch(frame).await?;
            }
            let silent_until = last_read + idle;
            let wait_until = match scratch.is_quiet() {
                true => silent_until,
                false => silent_until.min(tokio::time::Instant::now() + RELEASE_IDLE_BUFFERS),
            };
            match tokio::time::timeout_at(wait_until, io.read(scratch.space())).await {
                Err(_) if wait_until < silent_until => scratch.quieten(),
                Err(_) => return Err(CloseReason::Idle(idle)),
                Ok(Err(e)) => return Err(CloseReason::Io(format!("read failed: {e}"))),
                Ok(Ok(0)) => return Err(CloseReason::PeerClosed),
                Ok(Ok(n)) => {
                    last_read = tokio::time::Instant::now();
                    self.shared.lifecycle.heard_from_peer();
                    decoder.feed(scratch.filled(n));
                }
            }
        }
    }

    fn known_slot(&self, frame: &Frame) -> Result<Arc<StreamSlot>, ProtocolViolation> {
        self.shared
            .slot(frame.stream_id)
            .ok_or(ProtocolViolation::UnknownStream {
                kind: frame.kind,
                id: frame.stream_id,
            })
    }

    async fn dispatch(&mut self, frame: Frame) -> Dispatched {
        let role = self.shared.role;
        let peer = role.peer();
        match frame.kind {
            kind if kind == data_out(peer) => self.on_data(frame).await,
            kind if kind == close_out(peer) => self.on_close(&frame),
            kind if kind == window_out(peer) => self.on_window_update(&frame),
            FrameType::Open if role == Role::Hub => self.on_open(frame).await,
            FrameType::Reset if self.shared.reset_agreed() => self.on_reset(&frame),
            FrameType::Extensions if role == Role::Hub => self.on_extensions(&frame).await,
            FrameType::Ping if role == Role::Edge || self.shared.liveness_agreed() => {
                // Our PINGs carry the round trip their sender measured last: the edge learns
                // the hub's, and the hub of an edge that probes (it PINGs that edge only when
                // it heard nothing) learns the edge's.
                let token = frame.ping_token().unwrap_or_default();
                let reported = u64::from_be_bytes(token);
                if reported > 0 {
                    self.shared.rtt_us.store(reported, Ordering::Relaxed);
                    self.report_round_trip(Duration::from_micros(reported));
                }
                self.shared
                    .send_control_now(Outgoing::Frame(Frame::ping(FrameType::Pong, token)))
            }
            FrameType::Pong if role == Role::Hub || self.shared.liveness_agreed() => {
                let rtt = pong_received(&self.shared, frame.ping_token())?;
                self.report_round_trip(rtt);
                Ok(())
            }
            FrameType::Opened if role == Role::Edge && self.shared.liveness_agreed() => {
                if let Some(slot) = self.live_slot(&frame)? {
                    slot.confirm();
                }
                Ok(())
            }
            FrameType::Config if role == Role::Edge => self
                .events
                .send(SessionEvent::Config(frame.payload))
                .await
                .map_err(|_| CloseReason::OwnerGone),
            FrameType::Drain if role == Role::Edge && self.shared.drain_agreed() => self
                .events
                .send(SessionEvent::Drain)
                .await
                .map_err(|_| CloseReason::OwnerGone),
            FrameType::ConfigAck if role == Role::Hub => {
                let _ = self.events.try_send(SessionEvent::ConfigAck(frame.payload));
                Ok(())
            }
            FrameType::UdpOpen if role == Role::Hub => {
                if frame.stream_id <= self.last_udp_id {
                    return Err(ProtocolViolation::UdpIdReused(frame.stream_id).into());
                }
                self.last_udp_id = frame.stream_id;
                self.udp_event(SessionEvent::UdpOpen {
                    id: frame.stream_id,
                    header: frame.payload,
                })
            }
            kind if kind == udp_data_out(peer) => {
                if !self.is_known_udp(frame.stream_id) {
                    return Err(ProtocolViolation::UnknownUdpSession(frame.stream_id).into());
                }
                self.udp_event(SessionEvent::UdpDatagram {
                    id: frame.stream_id,
                    payload: frame.payload,
                })
            }
            FrameType::UdpClose => self.udp_event(SessionEvent::UdpClose {
                id: frame.stream_id,
            }),
            kind => Err(ProtocolViolation::UnexpectedFrame { kind, from: peer }.into()),
        }
    }

    /// The stream a frame is for; `None` for a stream this side has reset, whose frames may
    /// still be on their way.
    fn live_slot(&self, frame: &Frame) -> Result<Option<Arc<StreamSlot>>, ProtocolViolation> {
        match self.known_slot(frame) {
            Ok(slot) => Ok(Some(slot)),
            Err(_) if self.shared.reset_agreed() && self.is_past_stream(frame.stream_id) => {
                Ok(None)
            }
            Err(unknown) => Err(unknown),
        }
    }

    fn on_reset(&self, frame: &Frame) -> Dispatched {
        if let Some(slot) = self.live_slot(frame)? {
            slot.confirm();
            self.shared.abort_stream(&slot);
        }
        Ok(())
    }

    /// Hub: tells the session's owner the tunnel's round trip, at most every
    /// [`RTT_REPORT_INTERVAL`].
    fn report_round_trip(&mut self, rtt: Duration) {
        let due = self
            .rtt_reported
            .is_none_or(|at| now().saturating_duration_since(at) >= RTT_REPORT_INTERVAL);
        if self.shared.role == Role::Hub && due {
            self.rtt_reported = Some(now());
            let _ = self.events.try_send(SessionEvent::RoundTrip(rtt));
        }
    }

    async fn on_extensions(&mut self, frame: &Frame) -> Dispatched {
        if std::mem::replace(&mut self.extensions_seen, true) {
            return Err(ProtocolViolation::Extensions("second EXTENSIONS frame".into()).into());
        }
        let confirmed = Extensions::parse(&frame.payload)
            .map_err(|e| ProtocolViolation::Extensions(e.to_string()))?;
        let drain_due = self
            .shared
            .lifecycle
            .confirm(confirmed, self.shared.options.extensions);
        if drain_due {
            let drain = Frame::new(CONTROL_STREAM, FrameType::Drain, Bytes::new());
            self.answer(Outgoing::Frame(drain)).await?;
        }
        Ok(())
    }

    /// Queues a frame that answers the peer's legitimate traffic, waiting while the control
    /// lane is full: we stop reading the tunnel rather than count it as abuse. A peer that
    /// reads nothing for the idle timeout is gone.
    async fn answer(&self, outgoing: Outgoing) -> Dispatched {
        let idle = self.shared.silence_limit();
        match tokio::time::timeout(idle, self.shared.lanes.control.send(outgoing)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CloseReason::Local("tunnel writer stopped".into())),
            Err(_) => Err(CloseReason::Io(format!(
                "peer read none of our frames for {} s",
                idle.as_secs()
            ))),
        }
    }

    fn on_close(&self, frame: &Frame) -> Dispatched {
        let Some(slot) = self.live_slot(frame)? else {
            return Ok(());
        };
        slot.confirm();
        let mut state = slot.lock();
        if state.aborted {
            return Ok(());
        }
        if state.peer_closed {
            return Err(ProtocolViolation::ClosedTwice(slot.id).into());
        }
        state.peer_closed = true;
        self.shared.release_if_done(&slot, &state);
        drop(state);
        slot.readable.notify_one();
        Ok(())
    }

    fn on_window_update(&self, frame: &Frame) -> Dispatched {
        let increment = frame.u32_payload().unwrap_or(0);
        let Some(slot) = self.shared.slot(frame.stream_id) else {
            // Credit for a stream that has just been fully closed is harmless.
            return if self.is_past_stream(frame.stream_id) {
                Ok(())
            } else {
                Err(ProtocolViolation::UnknownStream {
                    kind: frame.kind,
                    id: frame.stream_id,
                }
                .into())
            };
        };
        slot.confirm();
        slot.lock()
            .send
            .grant(increment)
            .map_err(|error| ProtocolViolation::Flow { id: slot.id, error })?;
        slot.writable.notify_one();
        Ok(())
    }

    /// UDP events never wait for the owner: when it lags, datagrams are dropped and counted.
    fn udp_event(&self, event: SessionEvent) -> Dispatched {
        if self.events.try_send(event).is_err() {
            self.shared.lifecycle.stats.udp_drop();
        }
        Ok(())
    }

    fn is_known_udp(&self, id: u32) -> bool {
        match self.shared.role {
            Role::Hub => id != 0 && id <= self.last_udp_id,
            Role::Edge => id != 0 && id <= self.shared.last_udp_opened.load(Ordering::Relaxed),
        }
    }

    fn is_past_stream(&self, id: u32) -> bool {
        match self.shared.role {
            Role::Hub => id != 0 && id <= self.last_peer_id,
            Role::Edge => id != 0 && id <= self.shared.last_opened.load(Ordering::Relaxed),
        }
    }

    async fn on_data(&mut self, frame: Frame) -> Dispatched {
        let len = frame.payload.len();
        if len == 0 {
            self.empty_data_run += 1;
            if self.empty_data_run > MAX_EMPTY_DATA_RUN {
                return Err(ProtocolViolation::EmptyDataFlood.into());
            }
            return Ok(());
        }
        self.empty_data_run = 0;
        let Some(slot) = self.live_slot(&frame)? else {
            return Ok(());
        };
        slot.confirm();
        let stats = &self.shared.lifecycle.stats;
        stats.received(len);
        let discarded = {
            let mut state = slot.lock();
            if state.aborted {
                // Reset here while the frame was on its way.
                return Ok(());
            }
            if state.peer_closed {
                return Err(ProtocolViolation::DataAfterClose(slot.id).into());
            }
            state
                .recv
                .on_data(len as u32)
                .map_err(|error| ProtocolViolation::Flow { id: slot.id, error })?;
            state.inbound_rate.record(now(), len);
            if state.discard {
                let window = self.shared.window(&state);
                Some(state.recv.on_consumed(len as u32, window))
            } else {
                let payload = if len < COPY_BELOW {
                    Bytes::copy_from_slice(&frame.payload)
                } else {
                    frame.payload
                };
                state.inbox.push_back(payload);
                stats.stream_buffered(u64::from(state.recv.unconsumed()));
                None
            }
        };
        match discarded {
            Some(Some(increment)) => {
                self.answer(self.shared.window_update(slot.id, increment))
                    .await
            }
            Some(None) => Ok(()),
            None => {
                slot.readable.notify_one();
                Ok(())
            }
        }
    }

    async fn on_open(&mut self, frame: Frame) -> Dispatched {
        let id = frame.stream_id;
        if id <= self.last_peer_id {
            return Err(ProtocolViolation::StreamIdReused(id).into());
        }
        self.last_peer_id = id;
        let shared = &self.shared;
        let over_limit = shared.lifecycle.active() >= shared.options.max_streams;
        if shared.streams().len() >= shared.options.max_streams * 2 {
            return Err(ProtocolViolation::RefusedStreamsIgnored.into());
        }
        let slot = StreamSlot::new(id, &shared.lifecycle, false);
        if shared.liveness_agreed() {
            let opened = Frame::empty(id, FrameType::Opened);
            self.answer(Outgoing::Frame(opened)).await?;
        }
        if let Some(increment) = shared.register(&slot) {
            self.answer(shared.window_update(id, increment)).await?;
        }
        let (reader, writer) = halves(shared, slot);
        if over_limit {
            crate::warn_limited!(
                "stream_limit",
                stream = id,
                "stream limit reached; stream refused"
            );
            return Ok(());
        }
        let event = SessionEvent::Opened {
            reader: StreamReader::mux(reader),
            writer: StreamWriter::mux(writer),
            header: frame.payload,
        };
        // The owner takes streams as fast as it can; while it lags we stop reading the tunnel.
        self.events
            .send(event)
            .await
            .map_err(|_| CloseReason::OwnerGone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_buffer_grows_with_full_reads_and_shrinks_when_quiet() {
        let mut buffer = ReadBuffer::default();
        assert!(buffer.is_quiet());
        let mut size = buffer.space().len();
        while size < READ_CHUNK {
            buffer.space()[..size].fill(7);
            assert!(buffer.filled(size).iter().all(|&b| b == 7));
            assert_eq!(buffer.space().len(), (size * 2).min(READ_CHUNK));
            size = buffer.space().len();
        }
        assert!(!buffer.is_quiet());
        buffer.filled(READ_CHUNK);
        assert_eq!(
            buffer.space().len(),
            READ_CHUNK,
            "never past the largest read"
        );
        buffer.filled(10);
        assert_eq!(buffer.space().len(), READ_CHUNK, "a short read keeps it");
        buffer.quieten();
        assert_eq!(buffer.space().len(), QUIET_READ_CHUNK);
    }
}
