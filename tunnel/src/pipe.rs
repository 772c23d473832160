//! Moves bytes between a TCP socket and a tunnelled stream, both ways, with half-close and
//! abort.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::tcp::ReadHalf;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::error::StreamAborted;
use crate::stream::{StreamReader, StreamWriter};

/// Bytes moved by one [`pipe`], and how it ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Piped {
    /// Socket → tunnel.
    pub to_tunnel: u64,
    /// Tunnel → socket.
    pub from_tunnel: u64,
    /// The pipe was aborted (reset on either side, tunnel lost, cancelled) rather than finished.
    pub aborted: bool,
}

/// Pipes `socket` and the stream until both directions have finished, or either is aborted.
///
/// The socket's EOF becomes our CLOSE; the peer's CLOSE becomes a write shutdown on the socket.
/// A socket that stops reading stops returning credit, so the peer stops sending. A socket
/// error (a reset), the peer's RESET, the tunnel's loss or `cancel` abort both sides at once:
/// the stream is reset and the socket closed with a TCP reset, so nothing outlives the other.
pub async fn pipe(
    mut socket: TcpStream,
    mut reader: StreamReader,
    mut writer: StreamWriter,
    cancel: CancellationToken,
) -> Piped {
    let aborted = reader.abort_signal();
    // Counted outside the two directions so that an aborted pipe still reports its totals.
    let to_tunnel = AtomicU64::new(0);
    let from_tunnel = AtomicU64::new(0);
    let finished = {
        let (mut socket_rd, mut socket_wr) = socket.split();
        let upload = async {
            loop {
                // A socket that fails while the peer grants no credit is noticed all the same:
                // a client's reset must not wait for a target that stopped reading.
                let credit = tokio::select! {
                    credit = writer.reserve() => credit.map_err(|_| StreamAborted)?,
                    () = failed(&socket_rd) => return Err(StreamAborted),
                };
                socket_rd.readable().await.map_err(|_| StreamAborted)?;
                // The buffer exists only while bytes are ready, so idle streams hold none. A
                // read (unlike `try_read`) that returns less than asked marks the socket
                // drained, which saves the system call that would only find it empty.
                let mut buf = BytesMut::with_capacity(credit);
                match socket_rd.read_buf(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        to_tunnel.fetch_add(n as u64, Ordering::Relaxed);
                        writer.send(buf.freeze()).await.map_err(|_| StreamAborted)?;
                    }
                    Err(_) => return Err(StreamAborted),
                }
            }
            writer.finish().await;
            Ok(())
        };
        let download = async {
            while let Some(chunk) = reader.recv().await? {
                socket_wr
                    .write_all(&chunk)
                    .await
                    .map_err(|_| StreamAborted)?;
                from_tunnel.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                reader.consumed(chunk.len()).await;
            }
            let _ = socket_wr.shutdown().await;
            Ok::<(), StreamAborted>(())
        };
        tokio::select! {
            biased;
            () = cancel.cancelled() => false,
            () = aborted.cancelled() => false,
            both = async { tokio::try_join!(upload, download) } => both.is_ok(),
        }
    };
    if !finished {
        writer.reset();
        let _ = socket.set_zero_linger();
    }
    Piped {
        to_tunnel: to_tunnel.into_inner(),
        from_tunnel: from_tunnel.into_inner(),
        aborted: !finished,
    }
}

/// Resolves once `socket` has failed (a reset arrived), without reading the data it holds.
async fn failed(socket: &ReadHalf<'_>) {
    loop {
        match socket.ready(Interest::ERROR).await {
            Ok(ready) if !ready.is_error() => continue,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    use super::{pipe, Piped};
    use crate::harness::{pattern, read_to_end, send_all, within, Pair};
    use crate::options::SessionOptions;

    /// A connected pair of loopback sockets: (the client's end, the end the pipe takes).
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn carries_both_directions_with_half_close_and_counts_them() {
        for mut pair in [
            Pair::mux(SessionOptions::default()),
            Pair::quic(SessionOptions::default()).await,
        ] {
            let stream = pair.open().await;
            let (mut client, socket) = socket_pair().await;
            let cancel = CancellationToken::new();
            let piped = tokio::spawn(pipe(socket, stream.hub_reader, stream.hub_writer, cancel));
            let (mut edge_reader, mut edge_writer) = (stream.edge_reader, stream.edge_writer);

            // The client's bytes and its EOF reach the peer's reader.
            let up = pattern(200_000);
            client.write_all(&up).await.unwrap();
            client.shutdown().await.unwrap();
            assert_eq!(within("upload", read_to_end(&mut edge_reader)).await, up);

            // The peer still sends; its finish becomes the client's EOF.
            let down = pattern(300_000);
            send_all(&mut edge_writer, down.clone()).await;
            edge_writer.finish().await;
            let mut received = Vec::new();
            within("download", client.read_to_end(&mut received))
                .await
                .unwrap();
            assert_eq!(Bytes::from(received), down);

            let totals = within("the pipe ends", piped).await.unwrap();
            assert_eq!(
                totals,
                Piped {
                    to_tunnel: up.len() as u64,
                    from_tunnel: down.len() as u64,
                    aborted: false,
                }
            );
        }
    }

    #[tokio::test]
    async fn cancelling_ends_the_pipe_and_closes_the_socket() {
        let mut pair = Pair::mux(SessionOptions::default());
        let stream = pair.open().await;
        let (mut client, socket) = socket_pair().await;
        let cancel = CancellationToken::new();
        let piped = tokio::spawn(pipe(
            socket,
            stream.hub_reader,
            stream.hub_writer,
            cancel.clone(),
        ));
        cancel.cancel();
        assert_eq!(
            within("the pipe ends", piped).await.unwrap(),
            Piped {
                aborted: true,
                ..Piped::default()
            }
        );
        // The read ends (EOF or reset) only once the pipe has let go of the socket.
        let mut rest = Vec::new();
        let read = within("the socket closes", client.read_to_end(&mut rest)).await;
        assert_eq!(read.unwrap_or(0), 0, "nothing was sent through the pipe");
        let mut edge_reader = stream.edge_reader;
        assert_eq!(
            within("the stream ends", edge_reader.recv()).await,
            Err(crate::StreamAborted),
            "the cancelled pipe resets the stream"
        );
    }

    /// A client that resets while the peer grants no more credit (a target that stopped
    /// reading) still ends the pipe at once, and the peer's stream with it.
    #[tokio::test]
    async fn a_reset_while_the_peer_grants_no_credit_ends_the_pipe() {
        // A budget that allows each stream no more than its first window.
        let window = remoteingress_wire::flow::INITIAL_WINDOW as usize;
        let mut pair = Pair::mux(SessionOptions {
            budget: window as u64,
            ..SessionOptions::default()
        });
        let stream = pair.open().await;
        let (mut client, socket) = socket_pair().await;
        let piped = tokio::spawn(pipe(
            socket,
            stream.hub_reader,
            stream.hub_writer,
            CancellationToken::new(),
        ));
        let (_, mut client_wr) = client.split();
        let mut edge_reader = stream.edge_reader;
        let mut received = 0;
        let stall = async {
            // Received but never reported consumed: the pipe's credit runs out.
            while received < window {
                received += edge_reader.recv().await.unwrap().unwrap().len();
            }
        };
        // More than the socket buffers between the client and the pipe can hold.
        let upload = pattern(64 << 20);
        tokio::select! {
            () = within("the pipe uses up its credit", stall) => {}
            _ = client_wr.write_all(&upload) => panic!("the pipe kept reading"),
        }
        client.set_zero_linger().unwrap();
        drop(client);
        let totals = within("the pipe ends", piped).await.unwrap();
        assert!(totals.aborted);
        assert_eq!(
            within("the stream ends", async {
                loop {
                    match edge_reader.recv().await {
                        Ok(Some(_)) => continue,
                        other => return other,
                    }
                }
            })
            .await,
            Err(crate::StreamAborted),
            "the client's reset resets the stream"
        );
    }
}
