//! Idle edges: many light edges connected to one hub, for the hub's memory and CPU (its
//! liveness probes) per connected edge.
//! Each is a session of the tunnel crate that has done the edge's handshake and then only
//! answers the hub's PINGs, so the edge side costs the bench little.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use remoteingress_tunnel::quic::client_endpoint;
use remoteingress_tunnel::tls::client_config;
use remoteingress_tunnel::{HubTrust, Link, Role, SessionEvent, SessionHandle, SessionOptions};
use remoteingress_wire::extension::Extensions;
use remoteingress_wire::handshake::{parse_reply, EdgeHello};
use rustls::pki_types::ServerName;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use crate::processes::{cpu_seconds, rss_bytes, Hub};
use crate::Row;

/// Secret every idle edge shares.
pub const SECRET: &str = "bench-idle-edge";
/// How long the hub's CPU is measured with every idle edge connected.
const CPU_WINDOW: Duration = Duration::from_secs(5);
/// Longest hub reply read.
const MAX_REPLY: usize = 1024 * 1024;

/// The idle edge `n`'s id.
pub fn edge_id(n: usize) -> String {
    format!("idle-{n:05}")
}

/// A connected light edge: its session and the events nobody reads (an idle edge gets few).
pub type IdleEdge = (SessionHandle, mpsc::Receiver<SessionEvent>);

/// Hub RSS before and with `count` idle edges connected over `transport`, and per edge.
pub async fn hub_memory_per_idle_edge(
    binary: &Path,
    transport: &str,
    count: usize,
) -> Result<Vec<Row>> {
    let edges: Vec<_> = (0..count)
        .map(|n| serde_json::json!({"id": edge_id(n), "secret": SECRET}))
        .collect();
    let hub = Hub::start(binary, &serde_json::Value::Array(edges)).await?;
    let trust = HubTrust::Pin(hub.pin.clone());
    let connector = TlsConnector::from(client_config(&trust)?);
    let endpoint = client_endpoint(&trust, &SessionOptions::default())?;
    let rss_before = settled_rss(hub.process.pid()).await?;
    let mut held: Vec<IdleEdge> = Vec::with_capacity(count);
    for n in 0..count {
        let link = if transport == "quic" {
            Link::connect_quic(&endpoint, "127.0.0.1", hub.tunnel_port, "localhost").await?
        } else {
            let name = ServerName::try_from("127.0.0.1").context("server name")?;
            Link::connect_tls(&connector, name, "127.0.0.1", hub.tunnel_port).await?
        };
        held.push(
            handshake(link, &edge_id(n))
                .await
                .with_context(|| format!("idle edge {} of {count}", n + 1))?,
        );
    }
    let rss_held = settled_rss(hub.process.pid()).await?;
    let cpu_before = cpu_seconds(&[hub.process.pid()])?;
    tokio::time::sleep(CPU_WINDOW).await;
    let cpu = cpu_seconds(&[hub.process.pid()])? - cpu_before;
    drop(held);
    let per_edge = rss_held.saturating_sub(rss_before) as f64 / count as f64 / 1024.0;
    let mib = |bytes: u64| bytes as f64 / 1048576.0;
    Ok(vec![
        Row::new("idle edges connected", "edges", None, count as f64),
        Row::new("hub RSS, no edge", "MiB", None, mib(rss_before)),
        Row::new("hub RSS, idle edges connected", "MiB", None, mib(rss_held)),
        Row::new("hub RSS per idle edge", "KiB", None, per_edge),
        Row::new(
            "hub CPU per 1,000 idle edges (liveness probes)",
            "% of a core",
            None,
            cpu / CPU_WINDOW.as_secs_f64() * 100.0 * 1000.0 / count as f64,
        ),
    ])
}

/// The edge's handshake on `link` as `id`, and the session that follows.
pub(crate) async fn handshake(mut link: Link, id: &str) -> Result<IdleEdge> {
    link.write_line(&EdgeHello::new(id, SECRET)?.to_line())
        .await?;
    let (line, rest) = link.read_line(MAX_REPLY).await?;
    let reply = parse_reply(&line)?;
    let agreed = reply.offered.intersect(Extensions::ALL);
    Ok(link.into_session(rest, Role::Edge, SessionOptions::default(), agreed))
}

/// The RSS of `pid` once it has held still for a moment (connections finish setting up on the
/// far side after the handshake), 10 s at most.
pub(crate) async fn settled_rss(pid: u32) -> Result<u64> {
    let mut last = rss_bytes(pid)?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_bytes(pid)?;
        if now.abs_diff(last) < 256 * 1024 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}
