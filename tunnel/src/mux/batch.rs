//! The frames of one tunnel write, gathered without copying large payloads: headers and small
//! payloads are packed together, and a large payload is written from the buffer it arrived in.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use remoteingress_wire::frame::Frame;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Payloads at least this long are written in place rather than packed.
const IN_PLACE: usize = 1024;
/// Most pieces handed to one vectored write.
const SLICES_PER_WRITE: usize = 64;

/// Encoded frames waiting for one vectored write.
#[derive(Debug, Default)]
pub(crate) struct WriteBatch {
    /// Headers and small payloads not yet cut into `parts`.
    packed: BytesMut,
    /// The pieces to write, in order.
    parts: VecDeque<Bytes>,
    /// Bytes in `parts` and `packed` together.
    len: usize,
}

impl WriteBatch {
    /// Bytes gathered.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is gathered.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether memory is held for the next batch.
    pub(crate) fn holds_memory(&self) -> bool {
        self.packed.capacity() > 0 || self.parts.capacity() > 0
    }

    /// Appends `frame`.
    pub(crate) fn push(&mut self, frame: Frame) {
        let payload = frame.payload.len();
        self.len += remoteingress_wire::frame::HEADER_LEN + payload;
        if payload < IN_PLACE {
            frame.encode(&mut self.packed);
            return;
        }
        self.packed.extend_from_slice(&frame.header());
        self.parts.push_back(self.packed.split().freeze());
        self.parts.push_back(frame.payload);
    }

    /// Writes everything gathered to `io`, leaving the batch empty.
    pub(crate) async fn write_to<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
    ) -> std::io::Result<()> {
        if !self.packed.is_empty() {
            self.parts.push_back(self.packed.split().freeze());
        }
        while !self.parts.is_empty() {
            let mut slices = [IoSlice::new(&[]); SLICES_PER_WRITE];
            for (slice, part) in slices.iter_mut().zip(&self.parts) {
                *slice = IoSlice::new(part);
            }
            let count = self.parts.len().min(SLICES_PER_WRITE);
            let written = io.write_vectored(&slices[..count]).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.consume(written);
        }
        Ok(())
    }

    /// Drops the first `written` bytes of the parts.
    fn consume(&mut self, mut written: usize) {
        self.len -= written;
        while written > 0 {
            let Some(front) = self.parts.front_mut() else {
                return;
            };
            if written < front.len() {
                front.advance(written);
                return;
            }
            written -= front.len();
            self.parts.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use remoteingress_wire::frame::FrameType;

    use super::*;

    /// A sink that takes at most `step` bytes per write, from the first slices only.
    struct Trickle {
        written: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut room = self.step;
            for buf in bufs {
                let taken = buf.len().min(room);
                self.written.extend_from_slice(&buf[..taken]);
                room -= taken;
            }
            Poll::Ready(Ok(self.step - room))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Small and in-place payloads mixed, more pieces than one write takes.
    fn frames() -> Vec<Frame> {
        (0..200u32)
            .map(|i| {
                let len = [0, 10, IN_PLACE - 1, IN_PLACE, 70_000][i as usize % 5];
                Frame::new(i, FrameType::Data, vec![i as u8; len])
            })
            .collect()
    }

    #[tokio::test]
    async fn writes_the_same_bytes_as_encoding_in_any_write_size() {
        let mut expected = BytesMut::new();
        for frame in frames() {
            frame.encode(&mut expected);
        }
        for step in [1, 7, 4096, usize::MAX] {
            let mut batch = WriteBatch::default();
            for frame in frames() {
                batch.push(frame);
            }
            assert_eq!(batch.len(), expected.len());
            let mut sink = Trickle {
                written: Vec::new(),
                step: step.min(expected.len()),
            };
            batch.write_to(&mut sink).await.expect("write");
            assert!(batch.is_empty());
            assert_eq!(sink.written, expected, "step {step}");
        }
    }

    #[tokio::test]
    async fn a_sink_that_takes_nothing_is_an_error() {
        let mut batch = WriteBatch::default();
        batch.push(Frame::new(1, FrameType::Data, vec![1u8; 10]));
        let mut sink = Trickle {
            written: Vec::new(),
            step: 0,
        };
        let error = batch
            .write_to(&mut sink)
            .await
            .expect_err("nothing written");
        assert_eq!(error.kind(), std::io::ErrorKind::WriteZero);
    }
}
