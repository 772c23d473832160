//! Moves bytes between a TCP socket and a tunnelled stream, both ways, with half-close.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::stream::{StreamReader, StreamWriter};

/// Bytes moved by one [`pipe`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Piped {
    /// Socket → tunnel.
    pub to_tunnel: u64,
    /// Tunnel → socket.
    pub from_tunnel: u64,
}

/// Pipes `socket` and the stream until both directions have finished, or `cancel` fires.
///
/// The socket's EOF becomes our CLOSE; the peer's CLOSE becomes a write shutdown on the socket.
/// A socket that stops reading stops returning credit, so the peer stops sending.
pub async fn pipe(
    socket: TcpStream,
    mut reader: StreamReader,
    mut writer: StreamWriter,
    cancel: CancellationToken,
) -> Piped {
    let (mut socket_rd, mut socket_wr) = socket.into_split();
    let upload = async {
        let mut total = 0u64;
        loop {
            let Ok(credit) = writer.reserve().await else {
                break;
            };
            if socket_rd.readable().await.is_err() {
                break;
            }
            // The buffer exists only while bytes are ready, so idle streams hold none. A read
            // (unlike `try_read`) that returns less than asked marks the socket drained, which
            // saves the system call that would only find it empty.
            let mut buf = BytesMut::with_capacity(credit);
            match socket_rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n as u64;
                    if writer.send(buf.freeze()).await.is_err() {
                        break;
                    }
                }
            }
        }
        writer.finish().await;
        total
    };
    let download = async {
        let mut total = 0u64;
        while let Some(chunk) = reader.recv().await {
            if socket_wr.write_all(&chunk).await.is_err() {
                break;
            }
            total += chunk.len() as u64;
            reader.consumed(chunk.len()).await;
        }
        let _ = socket_wr.shutdown().await;
        total
    };
    let both = async { tokio::join!(upload, download) };
    tokio::select! {
        (to_tunnel, from_tunnel) = both => Piped { to_tunnel, from_tunnel },
        () = cancel.cancelled() => Piped::default(),
    }
}
