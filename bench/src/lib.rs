//! The benchmark harness: throughput, latency, connection rate and idle-connection memory through
//! a hub and an edge (separate processes of the release binary), each next to the same
//! measurement made directly against the target in the same run.

pub mod processes;
pub mod targets;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use processes::{open_fds, rss_bytes, Tunnel, EDGE_IP};
use targets::Mode;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The remoteingress binary (use a release build for real figures).
    pub binary: PathBuf,
    /// Seconds per throughput run.
    pub throughput_secs: f64,
    /// Rounds of the latency run.
    pub latency_rounds: usize,
    /// Seconds of the connection-rate run.
    pub connect_secs: f64,
    /// Idle connections held open for the memory run.
    pub idle_connections: usize,
}

impl BenchConfig {
    /// The full run of the issue: 10 s throughput, 20,000 rounds, 10,000 idle connections.
    pub fn full(binary: PathBuf) -> Self {
        Self {
            binary,
            throughput_secs: 10.0,
            latency_rounds: 20_000,
            connect_secs: 5.0,
            idle_connections: 10_000,
        }
    }

    /// A run of a few seconds that only shows every measurement works.
    pub fn quick(binary: PathBuf) -> Self {
        Self {
            binary,
            throughput_secs: 0.5,
            latency_rounds: 500,
            connect_secs: 0.5,
            idle_connections: 200,
        }
    }
}

/// One measured figure, direct and through the tunnel.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Unit of the values.
    pub unit: String,
    /// Without a tunnel, when that makes sense.
    pub direct: Option<f64>,
    /// Through the tunnel (the transport is in the name).
    pub tunnel: f64,
}

impl Row {
    fn new(name: &str, unit: &str, direct: Option<f64>, tunnel: f64) -> Self {
        Self {
            name: name.to_owned(),
            unit: unit.to_owned(),
            direct,
            tunnel,
        }
    }

    /// tunnel ÷ direct.
    pub fn ratio(&self) -> Option<f64> {
        self.direct.filter(|d| *d != 0.0).map(|d| self.tunnel / d)
    }
}

/// Runs every measurement and returns the rows.
pub async fn run(config: &BenchConfig) -> Result<Vec<Row>> {
    let idle_connections = config.idle_connections.min(idle_capacity());
    if idle_connections < config.idle_connections {
        eprintln!(
            "note: the descriptor limit allows only {idle_connections} idle connections, not {}",
            config.idle_connections
        );
    }
    let sink = targets::start(Mode::Sink).await?;
    let echo = targets::start(Mode::Echo).await?;
    let mut rows = Vec::new();
    for transport in TRANSPORTS {
        rows.extend(run_transport(config, transport, &sink, &echo, idle_connections).await?);
    }
    Ok(rows)
}

/// Transports measured, by their `--transport-mode` name.
const TRANSPORTS: [&str; 2] = ["tcpTls", "quic"];

/// Every measurement through one transport, each next to the direct baseline.
async fn run_transport(
    config: &BenchConfig,
    transport: &str,
    sink: &targets::Target,
    echo: &targets::Target,
    idle_connections: usize,
) -> Result<Vec<Row>> {
    let sink_port = processes::free_port(EDGE_IP)?;
    let echo_port = processes::free_port(EDGE_IP)?;
    let tunnel = Tunnel::start(
        &config.binary,
        &BTreeMap::from([(sink_port, sink.addr.port()), (echo_port, echo.addr.port())]),
        transport,
    )
    .await?;
    let edge_ip = EDGE_IP.parse()?;
    let via_tunnel = |port| SocketAddr::new(edge_ip, port);
    let named = |what: &str| format!("{what} [{transport}]");

    let mut rows = Vec::new();
    let secs = Duration::from_secs_f64(config.throughput_secs);
    for streams in [1usize, 8] {
        let direct = throughput(sink.addr, sink, streams, secs).await?;
        let tunnelled = throughput(via_tunnel(sink_port), sink, streams, secs).await?;
        let plural = if streams > 1 { "s" } else { "" };
        let name = named(&format!("throughput, {streams} stream{plural}"));
        rows.push(Row::new(&name, "Gbit/s", Some(direct), tunnelled));
    }

    let direct = latency(echo.addr, config.latency_rounds).await?;
    let tunnelled = latency(via_tunnel(echo_port), config.latency_rounds).await?;
    for (i, name) in ["latency p50", "latency p99", "latency p99.9"]
        .iter()
        .enumerate()
    {
        rows.push(Row::new(&named(name), "µs", Some(direct[i]), tunnelled[i]));
    }

    let connect = Duration::from_secs_f64(config.connect_secs);
    let direct = connection_rate(echo.addr, connect).await?;
    let tunnelled = connection_rate(via_tunnel(echo_port), connect).await?;
    rows.push(Row::new(
        &named("new connections"),
        "conn/s",
        Some(direct),
        tunnelled,
    ));

    for mut row in idle_memory(&tunnel, via_tunnel(echo_port), idle_connections).await? {
        row.name = named(&row.name);
        rows.push(row);
    }
    Ok(rows)
}

/// Raises the descriptor limit (children inherit it) and returns how many idle connections this
/// process can hold: each needs two descriptors here, client side and target side.
fn idle_capacity() -> usize {
    use rlimit::Resource;
    const WANTED: u64 = 65_536;
    if Resource::NOFILE.set(WANTED, WANTED).is_err() {
        let _ = rlimit::increase_nofile_limit(WANTED);
    }
    let soft = Resource::NOFILE.get().map(|(soft, _)| soft).unwrap_or(1024);
    (soft.saturating_sub(512) / 2) as usize
}

/// Gbit/s that `streams` connections push into the sink together.
async fn throughput(
    addr: SocketAddr,
    sink: &targets::Target,
    streams: usize,
    duration: Duration,
) -> Result<f64> {
    let before = sink.received.load(Ordering::Relaxed);
    let start = Instant::now();
    let writers: Vec<_> = (0..streams)
        .map(|_| {
            tokio::spawn(async move {
                let mut socket = TcpStream::connect(addr).await?;
                socket.set_nodelay(true)?;
                let chunk = vec![0x5au8; 256 * 1024];
                let mut sent = 0u64;
                while start.elapsed() < duration {
                    socket.write_all(&chunk).await?;
                    sent += chunk.len() as u64;
                }
                socket.shutdown().await?;
                Ok::<_, std::io::Error>(sent)
            })
        })
        .collect();
    let mut sent = 0;
    for writer in writers {
        sent += writer.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.received.load(Ordering::Relaxed) - before < sent {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the sink did not receive everything"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(sent as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
}

/// p50, p99 and p99.9 in µs of 64-byte request/response rounds on one connection.
async fn latency(addr: SocketAddr, rounds: usize) -> Result<[f64; 3]> {
    let mut socket = TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let request = [7u8; 64];
    let mut response = [0u8; 64];
    for _ in 0..rounds.min(100) {
        socket.write_all(&request).await?;
        socket.read_exact(&mut response).await?;
    }
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        socket.write_all(&request).await?;
        socket.read_exact(&mut response).await?;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Ok([at(0.50), at(0.99), at(0.999)])
}

/// Connections per second, each doing one 16-byte exchange, from 8 concurrent clients.
async fn connection_rate(addr: SocketAddr, duration: Duration) -> Result<f64> {
    let start = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut done = 0u64;
                while start.elapsed() < duration {
                    let mut socket = TcpStream::connect(addr).await?;
                    socket.set_nodelay(true)?;
                    socket.write_all(&[1u8; 16]).await?;
                    let mut back = [0u8; 16];
                    socket.read_exact(&mut back).await?;
                    done += 1;
                }
                Ok::<_, std::io::Error>(done)
            })
        })
        .collect();
    let mut done = 0;
    for worker in workers {
        done += worker.await??;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// Memory of hub and edge before, with `count` idle tunnelled connections, and after closing.
async fn idle_memory(tunnel: &Tunnel, addr: SocketAddr, count: usize) -> Result<Vec<Row>> {
    let pids = [tunnel.hub.pid(), tunnel.edge.pid()];
    let rss = || -> Result<u64> { pids.iter().map(|pid| rss_bytes(*pid)).sum() };
    let fds = || -> Result<u64> { pids.iter().map(|pid| open_fds(*pid)).sum() };
    let (rss_before, fds_before) = (rss()?, fds()?);
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let mut socket = TcpStream::connect(addr)
            .await
            .context("opening idle connections")?;
        socket.write_all(&[1]).await?;
        let mut back = [0u8; 1];
        socket.read_exact(&mut back).await?;
        held.push(socket);
    }
    let rss_held = rss()?;
    drop(held);
    // Closing is asynchronous on the far side: give it a bounded moment to settle.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds()? > fds_before + 8 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (rss_after, fds_after) = (rss()?, fds()?);
    let per_connection = rss_held.saturating_sub(rss_before) as f64 / count as f64 / 1024.0;
    Ok(vec![
        Row::new(
            "hub+edge RSS, idle",
            "MiB",
            None,
            rss_before as f64 / 1048576.0,
        ),
        Row::new(
            &format!("hub+edge RSS, {count} idle connections"),
            "MiB",
            None,
            rss_held as f64 / 1048576.0,
        ),
        Row::new("RSS per idle connection", "KiB", None, per_connection),
        Row::new(
            "hub+edge RSS, all closed",
            "MiB",
            None,
            rss_after as f64 / 1048576.0,
        ),
        Row::new("hub+edge open fds, before", "fds", None, fds_before as f64),
        Row::new(
            "hub+edge open fds, all closed",
            "fds",
            None,
            fds_after as f64,
        ),
    ])
}

/// The rows as an aligned table.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<54} {:>14} {:>14} {:>8}\n",
        "measurement", "direct", "tunnel", "ratio"
    );
    for row in rows {
        let value = |v: f64| format!("{v:.2} {}", row.unit);
        out.push_str(&format!(
            "{:<54} {:>14} {:>14} {:>8}\n",
            row.name,
            row.direct.map(value).unwrap_or_else(|| "-".into()),
            value(row.tunnel),
            row.ratio()
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    out
}
