//! The two halves of a tunnelled TCP connection, whatever the transport: a multiplexed stream of
//! the TLS session (with our credit), or a native QUIC stream (with QUIC's flow control).

use bytes::Bytes;

use tokio_util::sync::CancellationToken;

use crate::error::{SessionError, StreamAborted};
use crate::mux::stream::{MuxReader, MuxWriter};
use crate::quic::stream::{QuicReader, QuicWriter};

/// The incoming half of a tunnelled connection.
#[derive(Debug)]
pub struct StreamReader {
    id: u32,
    kind: ReaderKind,
}

#[derive(Debug)]
enum ReaderKind {
    Mux(MuxReader),
    Quic(QuicReader),
}

impl StreamReader {
    pub(crate) fn mux(reader: MuxReader) -> Self {
        Self {
            id: reader.id(),
            kind: ReaderKind::Mux(reader),
        }
    }

    pub(crate) fn quic(reader: QuicReader) -> Self {
        Self {
            id: reader.id(),
            kind: ReaderKind::Quic(reader),
        }
    }

    /// The stream id within its tunnel.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The next chunk of the peer's bytes; `None` once the peer has finished, an error once
    /// the stream is aborted (reset by the peer, or the tunnel lost).
    pub async fn recv(&mut self) -> Result<Option<Bytes>, StreamAborted> {
        match &mut self.kind {
            ReaderKind::Mux(reader) => reader.recv().await,
            ReaderKind::Quic(reader) => reader.recv().await,
        }
    }

    /// A token cancelled when the stream is aborted: reset either way, or the tunnel lost.
    pub fn abort_signal(&self) -> CancellationToken {
        match &self.kind {
            ReaderKind::Mux(reader) => reader.abort_signal(),
            ReaderKind::Quic(reader) => reader.abort_signal(),
        }
    }

    /// A token cancelled once the hub has confirmed the stream's open (extension `liveness`):
    /// until then the edge may retry the open on another tunnel. Cancelled from the start
    /// where no confirmation will come (a hub without the extension; the hub's own halves).
    pub fn open_confirmed(&self) -> CancellationToken {
        match &self.kind {
            ReaderKind::Mux(reader) => reader.confirmed(),
            ReaderKind::Quic(reader) => reader.confirmed(),
        }
    }

    /// Reports `len` bytes written onward (returns credit on the TLS transport).
    pub async fn consumed(&mut self, len: usize) {
        match &mut self.kind {
            ReaderKind::Mux(reader) => reader.consumed(len).await,
            ReaderKind::Quic(reader) => reader.consumed(len),
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
    Quic(QuicWriter),
}

impl StreamWriter {
    pub(crate) fn mux(writer: MuxWriter) -> Self {
        Self {
            kind: WriterKind::Mux(writer),
        }
    }

    pub(crate) fn quic(writer: QuicWriter) -> Self {
        Self {
            kind: WriterKind::Quic(writer),
        }
    }

    /// Waits until bytes may be sent and returns how many (at most one chunk).
    pub async fn reserve(&self) -> Result<usize, SessionError> {
        match &self.kind {
            WriterKind::Mux(writer) => writer.reserve().await,
            WriterKind::Quic(writer) => writer.reserve(),
        }
    }

    /// Sends bytes (at most what [`StreamWriter::reserve`] allowed).
    pub async fn send(&mut self, data: Bytes) -> Result<(), SessionError> {
        match &mut self.kind {
            WriterKind::Mux(writer) => writer.send(data).await,
            WriterKind::Quic(writer) => writer.send(data).await,
        }
    }

    /// Half-closes: we send nothing more. Idempotent.
    pub async fn finish(&mut self) {
        match &mut self.kind {
            WriterKind::Mux(writer) => writer.finish().await,
            WriterKind::Quic(writer) => writer.finish(),
        }
    }

    /// Aborts the stream both ways (a client or target reset, a failed connect). A TLS peer
    /// without the `reset` extension gets the CLOSE it understands instead.
    pub fn reset(&mut self) {
        match &mut self.kind {
            WriterKind::Mux(writer) => writer.reset(),
            WriterKind::Quic(writer) => writer.reset(),
        }
    }
}
