//! The TLS transport's session: frames multiplexed over one connection. A reader task decodes
//! and dispatches frames ([`reader`]), a writer task drains the three QoS lanes into large
//! writes ([`writer`]), the hub pings ([`ping`]); tunnelled connections are stream halves with
//! per-stream credit ([`stream`]) over the state they share ([`shared`]).

mod batch;
#[cfg(test)]
mod liveness_tests;
mod ping;
mod reader;
#[cfg(test)]
mod reset_tests;
mod shared;
pub(crate) mod stream;
#[cfg(test)]
mod tests;
mod writer;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use remoteingress_wire::extension::Extensions;
use remoteingress_wire::frame::{Frame, FrameType, CONTROL_STREAM};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::error::SessionError;
use crate::event::{SessionEvent, EVENT_QUEUE};
use crate::lifecycle::spawn_task;
use crate::liveness;
use crate::options::{Role, SessionOptions};
use crate::stream::{StreamReader, StreamWriter};
use shared::{send_soon, udp_data_out, Outgoing, Shared, StreamSlot};

/// A running multiplexed session.
#[derive(Clone, Debug)]
pub(crate) struct MuxSession {
    pub(crate) shared: Arc<Shared>,
}

/// Starts the session's tasks over an established, authenticated connection. `initial` holds
/// bytes already read past the handshake. `agreed`: the extensions the edge confirms to the
/// hub with its first frame; the hub passes none and learns them from that frame.
pub(crate) fn start<IO>(
    io: IO,
    initial: Bytes,
    role: Role,
    options: SessionOptions,
    agreed: Extensions,
) -> (MuxSession, mpsc::Receiver<SessionEvent>)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (senders, lanes) = shared::lanes(options.lanes.control_frames);
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    if role == Role::Edge && !agreed.is_empty() {
        let confirm = Frame::new(CONTROL_STREAM, FrameType::Extensions, agreed.to_payload());
        send_soon(&senders.control, Outgoing::Frame(confirm));
    }
    let shared = Arc::new(Shared::new(role, options, senders, agreed));
    let (read_half, write_half) = tokio::io::split(io);
    tokio::spawn(writer::write_task(write_half, lanes, shared.clone()));
    if role == Role::Edge && agreed.liveness {
        spawn_task(
            &shared,
            liveness::watch_silence(shared.clone(), events_tx.clone()),
        );
    }
    let reader = reader::Reader::new(shared.clone(), events_tx);
    spawn_task(&shared, reader.run(read_half, initial));
    if role == Role::Hub || agreed.liveness {
        spawn_task(&shared, ping::ping_loop(shared.clone()));
    }
    (MuxSession { shared }, events_rx)
}

impl MuxSession {
    /// Opens a stream (edge): sends OPEN with `header` and raises the stream's window. The
    /// caller has checked that the session may open one.
    pub(crate) async fn open(
        &self,
        header: Bytes,
    ) -> Result<(StreamReader, StreamWriter), SessionError> {
        let shared = &self.shared;
        let send = |frame| shared.lanes.control.send(Outgoing::Frame(frame));
        let mut next_id = shared.next_id.lock().await;
        let id = *next_id;
        *next_id = id.checked_add(1).ok_or(SessionError::StreamIdsExhausted)?;
        let slot = StreamSlot::new(id, &shared.lifecycle, shared.liveness_agreed());
        let raise = shared.register(&slot);
        shared.last_opened.store(id, Ordering::Relaxed);
        send(Frame::new(id, FrameType::Open, header))
            .await
            .map_err(|_| SessionError::Closed)?;
        drop(next_id);
        if let Some(increment) = raise {
            send(Frame::window_update(
                id,
                shared::window_out(shared.role),
                increment,
            ))
            .await
            .map_err(|_| SessionError::Closed)?;
        }
        let (reader, writer) = stream::halves(shared, slot);
        Ok((StreamReader::mux(reader), StreamWriter::mux(writer)))
    }

    /// Sends a tunnel-level frame (CONFIG, CONFIG_ACK) on the control lane.
    pub(crate) async fn send_control(
        &self,
        kind: FrameType,
        payload: Bytes,
    ) -> Result<(), SessionError> {
        self.shared
            .lanes
            .control
            .send(Outgoing::Frame(Frame::new(CONTROL_STREAM, kind, payload)))
            .await
            .map_err(|_| SessionError::Closed)
    }

    /// Opens a UDP session (edge): queues UDP_OPEN with its PROXY v2 header; returns its id.
    pub(crate) async fn open_udp(&self, header: Bytes) -> Result<u32, SessionError> {
        let mut next_id = self.shared.next_udp_id.lock().await;
        let id = *next_id;
        *next_id = id.checked_add(1).ok_or(SessionError::StreamIdsExhausted)?;
        self.shared.last_udp_opened.store(id, Ordering::Relaxed);
        self.shared
            .lanes
            .control
            .send(Outgoing::Frame(Frame::new(id, FrameType::UdpOpen, header)))
            .await
            .map_err(|_| SessionError::Closed)?;
        Ok(id)
    }

    /// Queues one datagram of a UDP session, or drops it (counted) when the data lane is
    /// full: UDP is never queued without bound and never waits.
    pub(crate) fn send_udp(&self, id: u32, payload: Bytes) -> bool {
        let kind = udp_data_out(self.shared.role);
        let queued = self
            .shared
            .lanes
            .data
            .try_send(Outgoing::Frame(Frame::new(id, kind, payload)))
            .is_ok();
        if !queued {
            self.shared.lifecycle.stats.udp_drop();
        }
        queued
    }

    /// Tells the peer that a UDP session ended.
    pub(crate) fn close_udp(&self, id: u32) {
        send_soon(
            &self.shared.lanes.control,
            Outgoing::Frame(Frame::empty(id, FrameType::UdpClose)),
        );
    }

    /// Last tunnel round trip, once known.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        match self.shared.rtt_micros() {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }
}
