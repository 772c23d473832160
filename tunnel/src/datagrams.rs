//! UDP sockets read and written in batches: many datagrams per system call (`recvmmsg` and GRO
//! when reading, GSO when writing, through quinn's `quinn-udp`), with socket buffers sized for
//! bursts. The public UDP ports of an edge and the hub's sockets to UDP targets use them.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Receive buffers read by one system call.
const RECV_BATCH: usize = 8;
/// Size of one receive buffer: the largest UDP payload, or several GRO-coalesced datagrams.
const RECV_BUFFER: usize = 64 * 1024;
/// A socket that has received nothing for this long gives its receive buffers back.
const RELEASE_QUIET: Duration = Duration::from_secs(1);
/// Kernel buffer asked for on each side of a socket, so bursts wait rather than drop (the
/// kernel caps it at `net.core.rmem_max` / `wmem_max`).
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Most bytes in one GSO write.
const MAX_GSO_BYTES: usize = 64 * 1024;

/// Sets up `socket` (non-blocking) for batched reads and writes, with burst-sized kernel
/// buffers.
pub fn batch_state(socket: &impl AsFd) -> io::Result<UdpSocketState> {
    let state = UdpSocketState::new(socket.into())?;
    // Best effort: a smaller buffer only means earlier drops.
    let _ = state.set_recv_buffer_size(socket.into(), SOCKET_BUFFER);
    let _ = state.set_send_buffer_size(socket.into(), SOCKET_BUFFER);
    Ok(state)
}

/// Reads a UDP socket many datagrams at a time.
pub struct BatchReceiver {
    state: UdpSocketState,
    /// [`RECV_BATCH`] buffers of [`RECV_BUFFER`] bytes end to end; empty while the socket is
    /// quiet.
    buffers: Vec<u8>,
    meta: [RecvMeta; RECV_BATCH],
    received: usize,
}

impl BatchReceiver {
    /// A receiver for `socket`.
    pub fn new(socket: &UdpSocket) -> io::Result<Self> {
        Ok(Self {
            state: batch_state(socket)?,
            buffers: Vec::new(),
            meta: [RecvMeta::default(); RECV_BATCH],
            received: 0,
        })
    }

    /// Waits until datagrams arrive on `socket` and reads as many as one system call gives;
    /// [`Self::datagrams`] then lists them.
    pub async fn receive(&mut self, socket: &UdpSocket) -> io::Result<()> {
        self.received = 0;
        if self.buffers.is_empty() {
            socket.readable().await?;
        } else if tokio::time::timeout(RELEASE_QUIET, socket.readable())
            .await
            .is_err()
        {
            self.buffers = Vec::new();
            socket.readable().await?;
        }
        if self.buffers.is_empty() {
            self.buffers = vec![0; RECV_BUFFER * RECV_BATCH];
        }
        let mut chunks = self.buffers.chunks_mut(RECV_BUFFER);
        let mut slices: [IoSliceMut<'_>; RECV_BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
        let (state, meta) = (&self.state, &mut self.meta);
        match socket.try_io(Interest::READABLE, || {
            state.recv(socket.into(), &mut slices, meta)
        }) {
            Ok(count) => {
                self.received = count;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The datagrams of the last [`Self::receive`], each with its sender.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.meta[..self.received]
            .iter()
            .zip(self.buffers.chunks(RECV_BUFFER))
            .flat_map(|(meta, buffer)| {
                let stride = meta.stride.max(1);
                buffer[..meta.len]
                    .chunks(stride)
                    .map(move |datagram| (meta.addr, datagram))
            })
    }
}

/// Writes datagrams to a connected UDP socket, runs of equal size as one GSO write.
pub struct BatchSender {
    state: UdpSocketState,
    scratch: Vec<u8>,
}

impl BatchSender {
    /// A sender for `socket`.
    pub fn new(socket: &UdpSocket) -> io::Result<Self> {
        Ok(Self {
            state: batch_state(socket)?,
            scratch: Vec::new(),
        })
    }

    /// Sends `datagrams` to `peer` (the socket's connected peer) without waiting; returns how
    /// many could not be sent now (the socket's buffer was full).
    pub fn send(&mut self, socket: &UdpSocket, peer: SocketAddr, datagrams: &[Bytes]) -> usize {
        let max_segments = self.state.max_gso_segments().max(1);
        let mut unsent = 0;
        let mut rest = datagrams;
        while let Some(first) = rest.first() {
            let size = first.len();
            let fit = (MAX_GSO_BYTES / size.max(1)).clamp(1, max_segments);
            let run = rest
                .iter()
                .take(fit)
                .take_while(|d| d.len() == size)
                .count();
            let (batch, after) = rest.split_at(run);
            let contents: &[u8] = if run == 1 {
                first
            } else {
                self.scratch.clear();
                batch.iter().for_each(|d| self.scratch.extend_from_slice(d));
                &self.scratch
            };
            let transmit = Transmit {
                destination: peer,
                ecn: None,
                contents,
                segment_size: (run > 1).then_some(size),
                src_ip: None,
            };
            // Straight to the non-blocking socket: a full buffer fails the write, which drops.
            if self.state.try_send(socket.into(), &transmit).is_err() {
                unsent += run;
            }
            rest = after;
        }
        unsent
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        a.connect(b.local_addr().unwrap()).await.unwrap();
        (a, b)
    }

    /// Everything `receiver` gets until `count` datagrams have arrived.
    async fn receive(
        receiver: &mut BatchReceiver,
        socket: &UdpSocket,
        count: usize,
    ) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while got.len() < count {
            tokio::time::timeout(Duration::from_secs(10), receiver.receive(socket))
                .await
                .expect("datagrams in time")
                .unwrap();
            got.extend(receiver.datagrams().map(|(_, d)| d.to_vec()));
        }
        got
    }

    #[tokio::test]
    async fn datagrams_of_mixed_sizes_arrive_whole_and_in_order() {
        let (a, b) = pair().await;
        let mut sender = BatchSender::new(&a).unwrap();
        let mut receiver = BatchReceiver::new(&b).unwrap();
        // Runs of equal sizes (one GSO write each) between odd ones, and a run longer than one
        // write may carry.
        let mut sent: Vec<Bytes> = Vec::new();
        for (size, count) in [(1200, 5), (7, 1), (1200, 70), (65_000, 1), (1, 3)] {
            for n in 0..count {
                sent.push(Bytes::from(vec![(sent.len() % 251) as u8 ^ n as u8; size]));
            }
        }
        let peer = b.local_addr().unwrap();
        for chunk in sent.chunks(20) {
            assert_eq!(sender.send(&a, peer, chunk), 0);
            let got = receive(&mut receiver, &b, chunk.len()).await;
            assert_eq!(got, chunk.iter().map(|d| d.to_vec()).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn the_receiver_reports_each_sender() {
        let (a, b) = pair().await;
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut receiver = BatchReceiver::new(&b).unwrap();
        a.send(b"from a").await.unwrap();
        c.send_to(b"from c", b.local_addr().unwrap()).await.unwrap();
        let mut senders = Vec::new();
        while senders.len() < 2 {
            receiver.receive(&b).await.unwrap();
            senders.extend(receiver.datagrams().map(|(from, d)| (from, d.to_vec())));
        }
        assert_eq!(
            senders,
            [
                (a.local_addr().unwrap(), b"from a".to_vec()),
                (c.local_addr().unwrap(), b"from c".to_vec())
            ]
        );
    }
}
