//! Unauthenticated QUIC peers: connections that complete QUIC from the edges' address but never
//! send their handshake line, offering the hub all they can meanwhile (streams, data on them,
//! datagrams), for what the hub holds for them.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use remoteingress_tunnel::quic::client_endpoint;
use remoteingress_tunnel::{HubTrust, Link, SessionOptions};

use crate::edges::settled_rss;
use crate::processes::Hub;
use crate::{ready_now, Row};

/// Unauthenticated connections from one address: the hub's default cap per address.
pub const CONNECTIONS: usize = 16;
/// Bytes each connection offers on its streams, and again as datagrams.
const OFFERED: usize = 16 * 1024 * 1024;
/// Streams each connection tries to open besides its control stream.
const STREAMS: usize = 64;

/// Hub RSS before and while [`CONNECTIONS`] unauthenticated QUIC peers flood it, and per peer.
pub async fn hub_memory_under_unauthenticated_quic(binary: &Path) -> Result<Vec<Row>> {
    // Nothing is freed by a handshake deadline while the flood is measured.
    let options = ["--handshake-timeout-secs", "600"];
    let hub = Hub::start_with(binary, &serde_json::json!([]), &options).await?;
    let trust = HubTrust::Pin(hub.pin.clone());
    let endpoint = client_endpoint(&trust, &SessionOptions::default())?;
    let rss_before = settled_rss(hub.process.pid()).await?;
    let mut peers = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let link = Link::connect_quic(&endpoint, "127.0.0.1", hub.tunnel_port, "localhost").await?;
        peers.push(flood(link).await?);
    }
    let rss_flooded = settled_rss(hub.process.pid()).await?;
    drop(peers);
    let mib = |bytes: u64| bytes as f64 / 1048576.0;
    let per_peer = rss_flooded.saturating_sub(rss_before) as f64 / CONNECTIONS as f64 / 1024.0;
    Ok(vec![
        Row::new(
            "unauthenticated QUIC peers flooding",
            "peers",
            None,
            CONNECTIONS as f64,
        ),
        Row::new("hub RSS, no peer", "MiB", None, mib(rss_before)),
        Row::new("hub RSS, peers flooding", "MiB", None, mib(rss_flooded)),
        Row::new(
            "hub RSS per unauthenticated QUIC peer",
            "KiB",
            None,
            per_peer,
        ),
    ])
}

/// A flooding peer: its connection, and the tasks still pushing on it.
struct Flood {
    _control: quinn::SendStream,
    _connection: quinn::Connection,
    pushing: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.pushing.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

/// Begins a handshake line it never ends, opens every other stream `link`'s connection is
/// allowed, starts writing [`OFFERED`] bytes across them, and sends [`OFFERED`] bytes of datagrams.
async fn flood(link: Link) -> Result<Flood> {
    let Link::Quic {
        connection,
        send: control,
        ..
    } = link
    else {
        anyhow::bail!("not a QUIC link");
    };
    let mut control = control;
    // A line begun, never ended: longer, it would be refused at once.
    control
        .write_all(b"EDGE ")
        .await
        .context("writing on the control stream")?;
    let mut streams = Vec::new();
    while streams.len() < STREAMS {
        match ready_now(connection.open_bi()) {
            Some(opened) => streams.push(opened.context("opening a stream")?.0),
            None => break,
        }
    }
    let share = OFFERED / streams.len().max(1);
    let pushing: Vec<_> = streams
        .into_iter()
        .map(|mut send| {
            tokio::spawn(async move {
                let _ = send.write_all(&vec![b'x'; share]).await;
            })
        })
        .collect();
    let datagrams = connection.clone();
    let size = connection
        .max_datagram_size()
        .context("the hub takes no datagrams")?;
    let sending = tokio::spawn(async move {
        let datagram = Bytes::from(vec![0u8; size]);
        for _ in 0..OFFERED / size {
            if datagrams
                .send_datagram_wait(datagram.clone())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // Sent as fast as congestion control lets them, whatever the hub does with them.
    let _ = tokio::time::timeout(Duration::from_secs(30), sending).await;
    Ok(Flood {
        _control: control,
        _connection: connection,
        pushing,
    })
}
