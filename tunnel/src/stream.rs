//! The two halves of a tunnelled TCP connection, whatever the transport: a multiplexed stream of
//! the TLS session (with our credit), or a native QUIC stream (with QUIC's flow control).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use remoteingress_wire::frame::MAX_DATA_CHUNK;
use remoteingress_wire::qos::StreamRate;
use std::time::Instant;

use crate::mux::{MuxReader, MuxWriter, SessionError};
use crate::quic::{QuicShared, StreamGuard};

/// The incoming half of a tunnelled connection.
#[derive(Debug)]
pub struct StreamReader {
    id: u32,
    kind: ReaderKind,
}

#[derive(Debug)]
enum ReaderKind {
    Mux(MuxReader),
    Quic {
        recv: quinn::RecvStream,
        shared: Arc<QuicShared>,
        _guard: Arc<StreamGuard>,
    },
}

impl StreamReader {
    pub(crate) fn mux(reader: MuxReader) -> Self {
        Self {
            id: reader.id(),
            kind: ReaderKind::Mux(reader),
        }
    }

    pub(crate) fn quic(
        id: u32,
        recv: quinn::RecvStream,
        shared: Arc<QuicShared>,
        guard: Arc<StreamGuard>,
    ) -> Self {
        Self {
            id,
            kind: ReaderKind::Quic {
                recv,
                shared,
                _guard: guard,
            },
        }
    }

    /// The stream id within its tunnel.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The next chunk of the peer's bytes; `None` once the peer has finished (or is gone).
    pub async fn recv(&mut self) -> Option<Bytes> {
        match &mut self.kind {
            ReaderKind::Mux(reader) => reader.recv().await,
            ReaderKind::Quic { recv, shared, .. } => {
                let chunk = recv.read_chunk(MAX_DATA_CHUNK, true).await.ok()??;
                shared
                    .stats
                    .bytes_in
                    .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                Some(chunk.bytes)
            }
        }
    }

    /// Reports `len` bytes written onward (returns credit on the TLS transport).
    pub async fn consumed(&self, len: usize) {
        if let ReaderKind::Mux(reader) = &self.kind {
            reader.consumed(len).await;
        }
    }
}

/// The outgoing half of a tunnelled connection.
#[derive(Debug)]
pub struct StreamWriter {
    kind: WriterKind,
}

#[derive(Debug)]
enum WriterKind {
    Mux(MuxWriter),
    Quic {
        send: quinn::SendStream,
        shared: Arc<QuicShared>,
        rate: StreamRate,
        _guard: Arc<StreamGuard>,
    },
}

/// Send priority of sustained (elephant) QUIC streams: below every other stream.
const SUSTAINED_PRIORITY: i32 = -1;

impl StreamWriter {
    pub(crate) fn mux(writer: MuxWriter) -> Self {
        Self {
            kind: WriterKind::Mux(writer),
        }
    }

    pub(crate) fn quic(
        send: quinn::SendStream,
        shared: Arc<QuicShared>,
        guard: Arc<StreamGuard>,
    ) -> Self {
        Self {
            kind: WriterKind::Quic {
                send,
                shared,
                rate: StreamRate::new(Instant::now()),
                _guard: guard,
            },
        }
    }

    /// Waits until bytes may be sent and returns how many (at most one chunk).
    pub async fn reserve(&self) -> Result<usize, SessionError> {
        match &self.kind {
            WriterKind::Mux(writer) => writer.reserve().await,
            WriterKind::Quic { .. } => Ok(MAX_DATA_CHUNK),
        }
    }

    /// Sends bytes (at most what [`StreamWriter::reserve`] allowed).
    pub async fn send(&mut self, data: Bytes) -> Result<(), SessionError> {
        match &mut self.kind {
            WriterKind::Mux(writer) => writer.send(data).await,
            WriterKind::Quic {
                send, shared, rate, ..
            } => {
                let len = data.len() as u64;
                let was_sustained = rate.is_sustained();
                if rate.record(Instant::now(), data.len()) && !was_sustained {
                    let _ = send.set_priority(SUSTAINED_PRIORITY);
                }
                send.write_chunk(data)
                    .await
                    .map_err(|_| SessionError::Closed)?;
                shared.stats.bytes_out.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Half-closes: we send nothing more. Idempotent.
    pub async fn finish(&mut self) {
        match &mut self.kind {
            WriterKind::Mux(writer) => writer.finish().await,
            WriterKind::Quic { send, .. } => {
                let _ = send.finish();
            }
        }
    }
}
