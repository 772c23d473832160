//! The two halves of one multiplexed stream, with per-stream credit both ways.

use std::sync::Arc;

use bytes::Bytes;
use remoteingress_wire::frame::{Frame, FrameType, MAX_DATA_CHUNK};
use remoteingress_wire::qos::{Lane, StreamRate};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::shared::{close_out, data_out, send_soon, Outgoing, Shared, StreamSlot};
use crate::clock::now;
use crate::error::{SessionError, StreamAborted};

/// Both halves of a stream that has just been registered.
pub(crate) fn halves(shared: &Arc<Shared>, slot: Arc<StreamSlot>) -> (MuxReader, MuxWriter) {
    let reader = MuxReader {
        slot: slot.clone(),
        shared: shared.clone(),
    };
    let writer = MuxWriter {
        slot,
        shared: shared.clone(),
        lane: Lane::Data,
        rate: StreamRate::new(now()),
        finished: false,
    };
    (reader, writer)
}

/// The incoming half of a multiplexed stream.
#[derive(Debug)]
pub(crate) struct MuxReader {
    slot: Arc<StreamSlot>,
    shared: Arc<Shared>,
}

impl MuxReader {
    /// The stream id.
    pub(crate) fn id(&self) -> u32 {
        self.slot.id
    }

    /// The next chunk of the peer's bytes; `None` once the peer has closed.
    pub(crate) async fn recv(&self) -> Result<Option<Bytes>, StreamAborted> {
        loop {
            {
                let mut state = self.slot.lock();
                if state.aborted {
                    return Err(StreamAborted);
                }
                if let Some(chunk) = state.inbox.pop_front() {
                    return Ok(Some(chunk));
                }
                if state.peer_closed {
                    return Ok(None);
                }
            }
            self.slot.readable.notified().await;
        }
    }

    /// Cancelled when the stream is aborted (reset either way, or the tunnel lost).
    pub(crate) fn abort_signal(&self) -> CancellationToken {
        self.slot.abort.clone()
    }

    /// Cancelled once the hub has answered the stream's open (edge).
    pub(crate) fn confirmed(&self) -> CancellationToken {
        self.slot.confirmed.clone()
    }

    /// Reports `len` bytes written onward, returning credit to the peer when due.
    pub(crate) async fn consumed(&self, len: usize) {
        let increment = {
            let mut state = self.slot.lock();
            let window = self.shared.window(&state);
            state.recv.on_consumed(len as u32, window)
        };
        if let Some(increment) = increment {
            let _ = self
                .shared
                .lanes
                .control
                .send(self.shared.window_update(self.slot.id, increment))
                .await;
        }
    }
}

impl Drop for MuxReader {
    /// Nobody reads any more: consume what is buffered and whatever still arrives, so the peer
    /// is never left waiting for credit.
    fn drop(&mut self) {
        let increment = {
            let mut state = self.slot.lock();
            if state.aborted {
                return;
            }
            state.discard = true;
            let pending: usize = state.inbox.drain(..).map(|chunk| chunk.len()).sum();
            let window = self.shared.window(&state);
            state.recv.on_consumed(pending as u32, window)
        };
        if let Some(increment) = increment {
            send_soon(
                &self.shared.lanes.control,
                self.shared.window_update(self.slot.id, increment),
            );
        }
    }
}

/// The outgoing half of a multiplexed stream.
#[derive(Debug)]
pub(crate) struct MuxWriter {
    slot: Arc<StreamSlot>,
    shared: Arc<Shared>,
    lane: Lane,
    rate: StreamRate,
    finished: bool,
}

impl MuxWriter {
    /// Waits until the peer has granted credit and returns how many bytes may be sent now
    /// (at most one DATA chunk).
    pub(crate) async fn reserve(&self) -> Result<usize, SessionError> {
        loop {
            {
                let state = self.slot.lock();
                if state.aborted {
                    return Err(SessionError::Closed);
                }
                let available = state.send.available() as usize;
                if available > 0 {
                    return Ok(available.min(MAX_DATA_CHUNK));
                }
            }
            self.shared.lifecycle.stats.stalled();
            self.slot.writable.notified().await;
        }
    }

    /// Sends bytes for which credit was reserved (at most [`MuxWriter::reserve`]'s answer).
    pub(crate) async fn send(&mut self, data: Bytes) -> Result<(), SessionError> {
        let len = data.len();
        if len == 0 {
            return Ok(());
        }
        let taken = self.slot.lock().send.take(len);
        debug_assert_eq!(taken, len, "send without reserved credit");
        if self.rate.record(now(), len) && self.lane == Lane::Data {
            self.move_to_sustained_lane().await?;
        }
        let frame = Frame::new(self.slot.id, data_out(self.shared.role), data);
        self.lane_tx()
            .send(Outgoing::Frame(frame))
            .await
            .map_err(|_| SessionError::Closed)?;
        self.shared.lifecycle.stats.sent(len);
        Ok(())
    }

    /// Keeps the stream's byte order when it changes lanes: waits until its data-lane frames
    /// are written.
    async fn move_to_sustained_lane(&mut self) -> Result<(), SessionError> {
        let (flushed_tx, flushed_rx) = oneshot::channel();
        self.lane_tx()
            .send(Outgoing::Flushed(flushed_tx))
            .await
            .map_err(|_| SessionError::Closed)?;
        flushed_rx.await.map_err(|_| SessionError::Closed)?;
        self.lane = Lane::Sustained;
        Ok(())
    }

    fn lane_tx(&self) -> &mpsc::Sender<Outgoing> {
        match self.lane {
            Lane::Sustained => &self.shared.lanes.sustained,
            _ => &self.shared.lanes.data,
        }
    }

    /// Sends our CLOSE (half-close: we will send nothing more). Idempotent.
    pub(crate) async fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let _ = self.lane_tx().send(self.close_frame()).await;
    }

    /// Aborts the stream both ways: RESET when the peer confirmed the extension, otherwise
    /// the CLOSE that is all an original peer understands (unless it was sent already).
    pub(crate) fn reset(&mut self) {
        if !self.shared.reset_agreed() {
            return self.close_soon();
        }
        self.finished = true;
        if self.shared.abort_stream(&self.slot) {
            send_soon(
                &self.shared.lanes.control,
                Outgoing::Frame(Frame::empty(self.slot.id, FrameType::Reset)),
            );
        }
    }

    /// Queues our CLOSE without waiting, unless it was sent or the stream is aborted.
    fn close_soon(&mut self) {
        if !self.finished && !self.slot.lock().aborted {
            self.finished = true;
            let close = self.close_frame();
            send_soon(self.lane_tx(), close);
        }
    }

    fn close_frame(&self) -> Outgoing {
        let mut state = self.slot.lock();
        state.local_closed = true;
        self.shared.release_if_done(&self.slot, &state);
        Outgoing::Frame(Frame::empty(self.slot.id, close_out(self.shared.role)))
    }
}

impl Drop for MuxWriter {
    fn drop(&mut self) {
        self.close_soon();
    }
}
