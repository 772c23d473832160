//! In-process targets: each accepts connections with or without a PROXY v1 line in front.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use remoteingress_tunnel::BatchReceiver;
use remoteingress_wire::proxy::ProxyV1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a target does with a connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sends every byte back.
    Echo,
    /// Reads and counts every byte.
    Sink,
}

/// A running target.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Bytes a sink has read (after any PROXY line).
    pub received: Arc<AtomicU64>,
}

/// Starts a target on 127.0.0.1. Connections may or may not start with a PROXY v1 line.
pub async fn start(mode: Mode) -> std::io::Result<Target> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let target = Target {
        addr: listener.local_addr()?,
        received: Arc::new(AtomicU64::new(0)),
    };
    let received = target.received.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let received = received.clone();
            tokio::spawn(async move {
                let _ = serve(socket, mode, &received).await;
            });
        }
    });
    Ok(target)
}

async fn serve(mut socket: TcpStream, mode: Mode, received: &AtomicU64) -> std::io::Result<()> {
    let _ = socket.set_nodelay(true);
    let mut buf = vec![0u8; 256 * 1024];
    let mut first = true;
    loop {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            return socket.shutdown().await;
        }
        let mut data = &buf[..n];
        if std::mem::take(&mut first) && data.starts_with(b"PROXY ") {
            // The line fits one read in practice; a split line would only skew a counter.
            if let Ok(Some((_, len))) = ProxyV1::parse(data) {
                data = &data[len..];
            }
        }
        match mode {
            Mode::Echo => socket.write_all(data).await?,
            Mode::Sink => {
                received.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

/// A UDP target that counts the datagrams it receives, leaving out PROXY v2 headers.
#[derive(Debug, Clone)]
pub struct UdpSink {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Datagrams received (PROXY v2 headers excluded).
    pub datagrams: Arc<AtomicU64>,
}

/// The 12-byte signature a PROXY v2 header starts with.
const PROXY_V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// Starts a UDP sink on 127.0.0.1.
pub async fn start_udp_sink() -> std::io::Result<UdpSink> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let sink = UdpSink {
        addr: socket.local_addr()?,
        datagrams: Arc::new(AtomicU64::new(0)),
    };
    let datagrams = sink.datagrams.clone();
    // Batched reads and a burst-sized buffer, so that the sink is never what drops.
    let mut receiver = BatchReceiver::new(&socket)?;
    tokio::spawn(async move {
        while receiver.receive(&socket).await.is_ok() {
            let counted = receiver
                .datagrams()
                .filter(|(_, d)| !d.starts_with(PROXY_V2_SIGNATURE))
                .count();
            datagrams.fetch_add(counted as u64, Ordering::Relaxed);
        }
    });
    Ok(sink)
}

/// Starts a UDP target on 127.0.0.1 that sends every datagram back to where it came from,
/// leaving out PROXY v2 headers. Returns where it listens.
pub async fn start_udp_echo() -> std::io::Result<SocketAddr> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if !buf[..n].starts_with(PROXY_V2_SIGNATURE) {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        }
    });
    Ok(addr)
}

/// Starts a relay on 127.0.0.1 to `target` that drops a PROXY v1 line in front of a
/// connection, for targets that do not speak PROXY (iperf3): every system's connections go
/// through it, with a line or without.
pub async fn start_proxy_stripper(target: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = strip_and_relay(socket, target).await;
            });
        }
    });
    Ok(addr)
}

async fn strip_and_relay(mut socket: TcpStream, target: SocketAddr) -> std::io::Result<()> {
    let mut upstream = TcpStream::connect(target).await?;
    for side in [&socket, &upstream] {
        side.set_nodelay(true)?;
    }
    let mut first = vec![0u8; 4096];
    let n = socket.read(&mut first).await?;
    let mut data = &first[..n];
    if data.starts_with(b"PROXY ") {
        // The line fits the first read in practice, as for the other targets.
        if let Ok(Some((_, len))) = ProxyV1::parse(data) {
            data = &data[len..];
        }
    }
    upstream.write_all(data).await?;
    tokio::io::copy_bidirectional(&mut socket, &mut upstream).await?;
    Ok(())
}
