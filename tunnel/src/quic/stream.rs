//! The two halves of a native QUIC stream, counted in the session's statistics like the
//! multiplexed ones.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use quinn::VarInt;
use remoteingress_wire::frame::MAX_DATA_CHUNK;
use remoteingress_wire::qos::StreamRate;
use tokio_util::sync::CancellationToken;

use super::shared::StreamGuard;
use crate::clock::now;
use crate::error::{SessionError, StreamAborted};

/// Send priority of sustained (elephant) QUIC streams: below every other stream.
const SUSTAINED_PRIORITY: i32 = -1;

/// Both halves of a stream; the stream counts as active until both are gone.
pub(crate) fn halves(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    guard: Arc<StreamGuard>,
) -> (QuicReader, QuicWriter) {
    let reader = QuicReader {
        id: recv.id().index() as u32,
        recv,
        unconsumed: 0,
        guard: guard.clone(),
    };
    let writer = QuicWriter {
        send,
        rate: StreamRate::new(now()),
        guard,
    };
    (reader, writer)
}

/// Most pieces of received data taken from quinn at once.
const CHUNKS_PER_READ: usize = 32;

/// `chunks` as one piece: copied together when there are several.
fn joined(chunks: &mut [Bytes]) -> Bytes {
    if let [only] = chunks {
        return std::mem::take(only);
    }
    let mut data = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
    for chunk in chunks.iter() {
        data.extend_from_slice(chunk);
    }
    data.freeze()
}

/// The incoming half of a QUIC stream.
#[derive(Debug)]
pub(crate) struct QuicReader {
    id: u32,
    recv: quinn::RecvStream,
    /// Bytes handed out and not yet reported consumed.
    unconsumed: u64,
    guard: Arc<StreamGuard>,
}

impl QuicReader {
    /// The stream's index among the connection's bidirectional streams.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    /// The peer's next bytes: all that has arrived (up to [`CHUNKS_PER_READ`] packets' worth),
    /// so that a burst goes onward in one write; `None` once the peer has finished.
    pub(crate) async fn recv(&mut self) -> Result<Option<Bytes>, StreamAborted> {
        let mut chunks: [Bytes; CHUNKS_PER_READ] = Default::default();
        let count = match self.recv.read_chunks(&mut chunks).await {
            Ok(Some(count)) => count,
            Ok(None) => return Ok(None),
            Err(_) => {
                self.guard.abort.cancel();
                return Err(StreamAborted);
            }
        };
        let data = joined(&mut chunks[..count]);
        let stats = &self.guard.shared.lifecycle.stats;
        stats.received(data.len());
        self.unconsumed += data.len() as u64;
        stats.stream_buffered(self.unconsumed);
        Ok(Some(data))
    }

    /// Cancelled when the stream is aborted (reset either way, or the connection lost).
    pub(crate) fn abort_signal(&self) -> CancellationToken {
        self.guard.abort.clone()
    }

    /// Cancelled once the hub has confirmed the stream's open (edge).
    pub(crate) fn confirmed(&self) -> CancellationToken {
        self.guard.confirmed.clone()
    }

    /// Reports `len` bytes written onward (QUIC returns credit by itself).
    pub(crate) fn consumed(&mut self, len: usize) {
        self.unconsumed = self.unconsumed.saturating_sub(len as u64);
    }
}

/// The outgoing half of a QUIC stream.
#[derive(Debug)]
pub(crate) struct QuicWriter {
    send: quinn::SendStream,
    rate: StreamRate,
    guard: Arc<StreamGuard>,
}

impl QuicWriter {
    /// How many bytes may be sent now: QUIC's own flow control applies in [`QuicWriter::send`].
    pub(crate) fn reserve(&self) -> Result<usize, SessionError> {
        if self.guard.shared.lifecycle.is_closed() {
            return Err(SessionError::Closed);
        }
        Ok(MAX_DATA_CHUNK)
    }

    /// Sends bytes, waiting for QUIC's flow control (a wait is counted as a stall).
    pub(crate) async fn send(&mut self, data: Bytes) -> Result<(), SessionError> {
        let len = data.len();
        let was_sustained = self.rate.is_sustained();
        if self.rate.record(now(), len) && !was_sustained {
            let _ = self.send.set_priority(SUSTAINED_PRIORITY);
        }
        let stats = &self.guard.shared.lifecycle.stats;
        let mut write = pin!(self.send.write_chunk(data));
        let ready = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
        let written = match ready {
            Poll::Ready(written) => written,
            Poll::Pending => {
                stats.stalled();
                write.await
            }
        };
        written.map_err(|_| SessionError::Closed)?;
        stats.sent(len);
        Ok(())
    }

    /// Half-closes: we send nothing more. Idempotent.
    pub(crate) fn finish(&mut self) {
        let _ = self.send.finish();
    }

    /// Aborts our direction with RESET_STREAM (the reader's drop stops the other).
    pub(crate) fn reset(&mut self) {
        let _ = self.send.reset(VarInt::from_u32(0));
        self.guard.abort.cancel();
    }
}
