//! The benchmark harness: throughput, latency, connection rate and idle-connection memory through
//! a hub and an edge (separate processes of the release binary), each next to the same
//! measurement made directly against the target in the same run.

pub mod edges;
pub mod frp;
pub mod iperf;
pub mod loss;
pub mod peers;
pub mod preauth;
pub mod processes;
pub mod rathole;
pub mod relay;
pub mod storm;
pub mod targets;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use peers::Peer;
use processes::{cpu_seconds, open_fds, rss_bytes, PortMap, Tunnel, EDGE_IP};
use targets::Mode;

/// A group of measurements that can be run on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Section {
    /// Bulk transfer, 1 and 8 streams.
    Throughput,
    /// Request/response round trips on one connection.
    Latency,
    /// New connections per second.
    Connections,
    /// Idle connections held open: memory and descriptors.
    Memory,
    /// UDP round trips, and datagrams delivered and lost.
    Udp,
    /// Hub memory per idle connected edge, and under unauthenticated QUIC peers (QUIC only).
    Edges,
    /// Reconnect storms: light edges all connecting at once to a fresh hub and to it restarted;
    /// the hub's CPU per full and per resumed handshake.
    Storm,
    /// Goodput, new connections and p99 with 0, 1 and 5 % of the tunnel's packets dropped.
    /// Only when asked for: it needs root (a network namespace of its own, nftables).
    Loss,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The remoteingress binary (use a release build for real figures).
    pub binary: PathBuf,
    /// A binary with the bench's helper commands `relay` and `echo` (the bench itself). With it
    /// the latency rows get the floor of two plain relays, and idle connections go to an echo
    /// target in a process of its own, so that this process's descriptors suffice for all of
    /// them. Without it there is no floor and the idle connections are capped by this process's
    /// descriptor limit.
    pub helpers: Option<PathBuf>,
    /// The measurements to make.
    pub sections: BTreeSet<Section>,
    /// Seconds per throughput run.
    pub throughput_secs: f64,
    /// Rounds of the latency run.
    pub latency_rounds: usize,
    /// Seconds of the connection-rate run.
    pub connect_secs: f64,
    /// Idle connections held open for the memory run.
    pub idle_connections: usize,
    /// Idle edges connected for the edges run.
    pub idle_edges: usize,
    /// Edges of each reconnect storm.
    pub storm_edges: Vec<usize>,
    /// Handshakes of each kind for the hub's CPU per full and per resumed handshake.
    pub cost_handshakes: usize,
    /// Offered rates of the UDP loss curve, datagrams per second.
    pub udp_rates: Vec<u64>,
    /// Whether the throughput rows include iperf3's (when it is on PATH).
    pub iperf3: bool,
}

impl BenchConfig {
    /// The full run of the issue: 10 s throughput, 20,000 rounds, 10,000 idle connections.
    pub fn full(binary: PathBuf) -> Self {
        Self {
            binary,
            helpers: None,
            sections: Section::all(),
            throughput_secs: 10.0,
            latency_rounds: 20_000,
            connect_secs: 5.0,
            idle_connections: 10_000,
            idle_edges: 1_000,
            storm_edges: vec![1_000, 5_000, 10_000],
            cost_handshakes: 500,
            udp_rates: vec![50_000, 100_000, 200_000],
            iperf3: true,
        }
    }

    /// A run of a few seconds that only shows every measurement works.
    pub fn quick(binary: PathBuf) -> Self {
        Self {
            binary,
            helpers: None,
            sections: Section::all(),
            throughput_secs: 0.5,
            latency_rounds: 500,
            connect_secs: 0.5,
            idle_connections: 200,
            idle_edges: 20,
            storm_edges: vec![50],
            cost_handshakes: 20,
            udp_rates: vec![5_000],
            iperf3: false,
        }
    }
}

impl Section {
    /// Every section but [`Section::Loss`], which runs only when asked for.
    pub fn all() -> BTreeSet<Section> {
        <Section as clap::ValueEnum>::value_variants()
            .iter()
            .copied()
            .filter(|section| *section != Section::Loss)
            .collect()
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
    /// The same measurement through each peer found on PATH (by [`Peer::label`]) in the same
    /// run, on rows of the transport it is compared with.
    pub peers: BTreeMap<String, f64>,
    /// The same measurement through two plain relay processes (latency rows, when
    /// [`BenchConfig::helpers`] is set): the least any two-process tunnel can add.
    pub relay_floor: Option<f64>,
}

impl Row {
    pub(crate) fn new(name: &str, unit: &str, direct: Option<f64>, tunnel: f64) -> Self {
        Self {
            name: name.to_owned(),
            unit: unit.to_owned(),
            direct,
            tunnel,
            peers: BTreeMap::new(),
            relay_floor: None,
        }
    }

    /// tunnel ÷ direct.
    pub fn ratio(&self) -> Option<f64> {
        self.ratio_to(self.direct)
    }

    /// tunnel ÷ `other`, when there is a non-zero `other`.
    pub fn ratio_to(&self, other: Option<f64>) -> Option<f64> {
        other.filter(|o| *o != 0.0).map(|o| self.tunnel / o)
    }
}

/// Runs every measurement and returns the rows.
pub async fn run(config: &BenchConfig) -> Result<Vec<Row>> {
    // The client side of each idle connection, and its target side unless the echo target has a
    // process of its own.
    let descriptors = descriptors_for_connections();
    let descriptors_per_connection = if config.helpers.is_some() { 1 } else { 2 };
    let idle_connections = config
        .idle_connections
        .min(descriptors / descriptors_per_connection);
    // A peer's processes (which share our limit) hold two descriptors per connection each: the
    // public or target socket and a data channel.
    let peer_idle_connections = idle_connections.min(descriptors / 2);
    if config.sections.contains(&Section::Memory) {
        for (count, whose) in [
            (idle_connections, ""),
            (peer_idle_connections, " for peers"),
        ] {
            if count < config.idle_connections {
                eprintln!(
                    "note: the descriptor limit allows only {count} idle connections{whose}, not {}",
                    config.idle_connections
                );
            }
        }
    }
    let echo = targets::start(Mode::Echo).await?;
    let helpers_for = |section| {
        config
            .helpers
            .as_ref()
            .filter(|_| config.sections.contains(&section))
    };
    let relays = match helpers_for(Section::Latency) {
        Some(binary) => {
            let chain = relay::RelayChain::start(binary, echo.addr)?;
            wait_round_trip(chain.addr).await?;
            Some(chain)
        }
        None => None,
    };
    let idle_echo = match helpers_for(Section::Memory) {
        Some(binary) => {
            let (process, addr) = processes::spawn_helper(binary, &["echo"])?;
            (addr, Some(process))
        }
        None => (echo.addr, None),
    };
    let targets = Targets {
        sink: targets::start(Mode::Sink).await?,
        echo,
        udp: targets::start_udp_sink().await?,
        udp_echo: targets::start_udp_echo().await?,
        relays,
        idle_echo,
        iperf: match config.iperf3 && config.sections.contains(&Section::Throughput) {
            true => iperf::Server::start().await?,
            false => None,
        },
    };
    let mut peer_rows: Vec<(Peer, BTreeMap<String, f64>)> = Vec::new();
    for peer in Peer::ALL {
        match peer.find() {
            Ok(binaries) => {
                let rows =
                    measure_peer(peer, &binaries, config, &targets, peer_idle_connections).await?;
                peer_rows.push((peer, rows));
            }
            Err(note) => eprintln!("note: {note}"),
        }
    }
    let mut rows = Vec::new();
    for transport in TRANSPORTS {
        let mut measured = run_transport(config, transport, &targets, idle_connections).await?;
        for row in &mut measured {
            for (peer, figures) in &peer_rows {
                if let Some(figure) = figures.get(&row.name) {
                    if peer.compares_with() == transport {
                        row.peers.insert(peer.label().to_owned(), *figure);
                    }
                }
            }
            row.name = format!("{} [{transport}]", row.name);
        }
        rows.extend(measured);
    }
    if config.sections.contains(&Section::Storm) {
        rows.extend(storm::reconnect_storms(&config.binary, &config.storm_edges).await?);
        for transport in TRANSPORTS {
            let cost = storm::handshake_cost(&config.binary, transport, config.cost_handshakes);
            for mut row in cost.await? {
                row.name = format!("{} [{transport}]", row.name);
                rows.push(row);
            }
        }
    }
    if config.sections.contains(&Section::Loss) {
        rows.extend(loss::lossy_path(config, &targets).await?);
    }
    Ok(rows)
}

/// Every measurement through `peer`, by row name.
async fn measure_peer(
    peer: Peer,
    binaries: &[std::path::PathBuf],
    config: &BenchConfig,
    targets: &Targets,
    idle_connections: usize,
) -> Result<BTreeMap<String, f64>> {
    let via = Via::pick()?;
    let ports = via.ports(targets);
    let run = peer.start(binaries, &ports).await?;
    // Peers listen before their private side has connected: wait for a real round trip.
    wait_round_trip(via.echo).await?;
    let pids = run.pids();
    let mut rows = measure_tcp(config, targets, via, pids, idle_connections).await?;
    rows.extend(measure_udp(config, targets, via, pids).await?);
    Ok(rows.into_iter().map(|row| (row.name, row.tunnel)).collect())
}

/// The in-process targets every run measures against.
struct Targets {
    sink: targets::Target,
    echo: targets::Target,
    udp: targets::UdpSink,
    /// A UDP echo, for UDP round trips.
    udp_echo: SocketAddr,
    /// Two plain relays in front of the echo target, for the latency floor.
    relays: Option<relay::RelayChain>,
    /// The echo target idle connections go to, and its process when it has one of its own.
    idle_echo: (SocketAddr, Option<processes::Process>),
    /// An iperf3 server, when the throughput rows include iperf3's.
    iperf: Option<iperf::Server>,
}

/// Where clients reach the targets through a tunnel: a public port (on [`EDGE_IP`]) per target.
#[derive(Debug, Clone, Copy)]
struct Via {
    sink: SocketAddr,
    echo: SocketAddr,
    idle: SocketAddr,
    iperf: SocketAddr,
    udp_sink: SocketAddr,
    udp_echo: SocketAddr,
}

impl Via {
    /// Free public ports; the UDP ones differ from the TCP ones (peers name services by port).
    fn pick() -> Result<Self> {
        let ip = EDGE_IP.parse()?;
        let free =
            || -> Result<SocketAddr> { Ok(SocketAddr::new(ip, processes::free_port(EDGE_IP)?)) };
        let (sink, echo, idle, iperf) = (free()?, free()?, free()?, free()?);
        let tcp = [sink, echo, idle, iperf].map(|addr| addr.port());
        let udp_sink = processes::free_udp_port(EDGE_IP, &tcp)?;
        let udp_echo = processes::free_udp_port(EDGE_IP, &[&tcp[..], &[udp_sink]].concat())?;
        Ok(Self {
            sink,
            echo,
            idle,
            iperf,
            udp_sink: SocketAddr::new(ip, udp_sink),
            udp_echo: SocketAddr::new(ip, udp_echo),
        })
    }

    /// Public port → target port, for every target.
    fn ports(&self, targets: &Targets) -> PortMap {
        let mut tcp = BTreeMap::from([
            (self.sink.port(), targets.sink.addr.port()),
            (self.echo.port(), targets.echo.addr.port()),
            (self.idle.port(), targets.idle_echo.0.port()),
        ]);
        if let Some(iperf) = &targets.iperf {
            tcp.insert(self.iperf.port(), iperf.port);
        }
        PortMap {
            tcp,
            udp: BTreeMap::from([
                (self.udp_sink.port(), targets.udp.addr.port()),
                (self.udp_echo.port(), targets.udp_echo.port()),
            ]),
        }
    }
}

/// Transports measured, by their `--transport-mode` name.
const TRANSPORTS: [&str; 2] = ["tcpTls", "quic"];

/// Every measurement through one transport, each next to the direct baseline.
async fn run_transport(
    config: &BenchConfig,
    transport: &str,
    targets: &Targets,
    idle_connections: usize,
) -> Result<Vec<Row>> {
    let via = Via::pick()?;
    let ports = via.ports(targets);
    let mut rows = Vec::new();
    if config.sections.contains(&Section::Edges) {
        rows.extend(
            edges::hub_memory_per_idle_edge(&config.binary, transport, config.idle_edges).await?,
        );
        if transport == "quic" {
            rows.extend(preauth::hub_memory_under_unauthenticated_quic(&config.binary).await?);
        }
    }
    let tunnel = Tunnel::start(&config.binary, &ports, transport).await?;
    let pids = [tunnel.hub.process.pid(), tunnel.edge.pid()];
    rows.extend(measure_tcp(config, targets, via, pids, idle_connections).await?);
    rows.extend(measure_udp(config, targets, via, pids).await?);
    Ok(rows)
}

/// The UDP rows through the public addresses of `via`: round trips to an echo, the loss curve
/// at each offered rate and the rate one socket sending as fast as it can gets through, each
/// next to the direct path, and the tunnel's CPU seconds per GB delivered flat out.
async fn measure_udp(
    config: &BenchConfig,
    targets: &Targets,
    via: Via,
    pids: [u32; 2],
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    if !config.sections.contains(&Section::Udp) {
        return Ok(rows);
    }
    let udp = via.udp_sink;
    let duration = Duration::from_secs_f64(config.connect_secs);
    wait_udp_path(udp, &targets.udp).await?;
    let rounds = config.latency_rounds;
    let direct = udp_latency(targets.udp_echo, rounds).await?;
    let tunnelled = udp_latency(via.udp_echo, rounds).await?;
    for (i, name) in LATENCY_ROWS.iter().enumerate() {
        rows.push(Row::new(
            &format!("UDP echo {name}"),
            "µs",
            Some(direct[i]),
            tunnelled[i],
        ));
    }
    for &rate in &config.udp_rates {
        let direct = udp_rate(targets.udp.addr, &targets.udp, duration, Some(rate)).await?;
        let tunnelled = udp_rate(udp, &targets.udp, duration, Some(rate)).await?;
        let offered = format!("{}k/s offered", rate / 1000);
        rows.push(Row::new(
            &format!("UDP 1,200 B delivered, {offered}"),
            "dgram/s",
            Some(direct.delivered_per_sec),
            tunnelled.delivered_per_sec,
        ));
        rows.push(Row::new(
            &format!("UDP loss, {offered}"),
            "%",
            Some(direct.loss_percent),
            tunnelled.loss_percent,
        ));
    }
    let direct = udp_rate(targets.udp.addr, &targets.udp, duration, None).await?;
    let cpu_before = cpu_seconds(&pids)?;
    let tunnelled = udp_rate(udp, &targets.udp, duration, None).await?;
    let cpu = cpu_seconds(&pids)? - cpu_before;
    rows.push(Row::new(
        "UDP 1,200 B delivered, one socket flat out",
        "dgram/s",
        Some(direct.delivered_per_sec),
        tunnelled.delivered_per_sec,
    ));
    rows.push(Row::new(
        "UDP loss, one socket flat out",
        "%",
        Some(direct.loss_percent),
        tunnelled.loss_percent,
    ));
    let delivered_gb = tunnelled.delivered as f64 * UDP_PAYLOAD as f64 / 1e9;
    rows.push(Row::new(
        "UDP tunnel CPU per GB delivered, flat out",
        "s/GB",
        None,
        cpu / delivered_gb.max(1e-9),
    ));
    Ok(rows)
}

/// The TCP measurements through a tunnel whose public side forwards `via` to the targets, each
/// next to the same measurement made directly; memory is that of `pids`.
async fn measure_tcp(
    config: &BenchConfig,
    targets: &Targets,
    via: Via,
    pids: [u32; 2],
    idle_connections: usize,
) -> Result<Vec<Row>> {
    let Via {
        sink,
        echo,
        idle,
        iperf,
        ..
    } = via;
    let mut rows = Vec::new();
    let wanted = |section| config.sections.contains(&section);
    let secs = Duration::from_secs_f64(config.throughput_secs);
    for streams in [1usize, 8] {
        if !wanted(Section::Throughput) {
            break;
        }
        let direct = throughput(targets.sink.addr, &targets.sink, streams, secs).await?;
        let cpu_before = cpu_seconds(&pids)?;
        let tunnelled = throughput(sink, &targets.sink, streams, secs).await?;
        let cpu = cpu_seconds(&pids)? - cpu_before;
        let plural = if streams > 1 { "s" } else { "" };
        let name = format!("throughput, {streams} stream{plural}");
        rows.push(Row::new(
            &name,
            "Gbit/s",
            Some(direct.gbit_per_sec()),
            tunnelled.gbit_per_sec(),
        ));
        rows.push(Row::new(
            &format!("tunnel CPU per GB, {streams} stream{plural}"),
            "s/GB",
            None,
            cpu / (tunnelled.bytes as f64 / 1e9).max(1e-9),
        ));
        if let Some(server) = &targets.iperf {
            let direct = server.measure(server.addr(), streams, secs).await?;
            let tunnelled = server.measure(iperf, streams, secs).await?;
            rows.push(Row::new(
                &format!("iperf3, {streams} stream{plural}"),
                "Gbit/s",
                Some(direct),
                tunnelled,
            ));
        }
    }

    if wanted(Section::Latency) {
        // Alone: a direct round trip right after a relayed one is much faster than one on its
        // own on a VM (the CPUs have not gone idle yet), so taking turns would flatter it. The
        // tunnel and the floor are paths of the same shape and take turns, for a fair ratio.
        let direct = latency(&[targets.echo.addr], config.latency_rounds).await?[0];
        let mut relayed = vec![echo];
        relayed.extend(targets.relays.as_ref().map(|chain| chain.addr));
        let figures = latency(&relayed, config.latency_rounds).await?;
        let (tunnelled, floor) = (figures[0], figures.get(1));
        for (i, name) in LATENCY_ROWS.iter().enumerate() {
            let mut row = Row::new(name, "µs", Some(direct[i]), tunnelled[i]);
            row.relay_floor = floor.map(|floor| floor[i]);
            rows.push(row);
        }
    }

    if wanted(Section::Connections) {
        let connect = Duration::from_secs_f64(config.connect_secs);
        let direct = connection_rate(targets.echo.addr, connect).await?;
        let tunnelled = connection_rate(echo, connect).await?;
        rows.push(Row::new(
            "new connections",
            "conn/s",
            Some(direct),
            tunnelled,
        ));
    }

    if wanted(Section::Memory) {
        rows.extend(idle_memory(pids, idle, idle_connections).await?);
    }
    Ok(rows)
}

/// Raises the descriptor limit (children inherit it) and returns how many descriptors this
/// process can spend on idle connections.
fn descriptors_for_connections() -> usize {
    use rlimit::Resource;
    const WANTED: u64 = 65_536;
    if Resource::NOFILE.set(WANTED, WANTED).is_err() {
        let _ = rlimit::increase_nofile_limit(WANTED);
    }
    let soft = Resource::NOFILE.get().map(|(soft, _)| soft).unwrap_or(1024);
    soft.saturating_sub(512) as usize
}

/// Bytes moved and the time it took.
struct Transfer {
    bytes: u64,
    elapsed: Duration,
}

impl Transfer {
    fn gbit_per_sec(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e9
    }
}

/// What `streams` connections push into the sink together.
async fn throughput(
    addr: SocketAddr,
    sink: &targets::Target,
    streams: usize,
    duration: Duration,
) -> Result<Transfer> {
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
    Ok(Transfer {
        bytes: sent,
        elapsed: start.elapsed(),
    })
}

/// The rows of [`latency`]'s figures, in its order.
const LATENCY_ROWS: [&str; 3] = ["latency p50", "latency p99", "latency p99.9"];

/// p50, p99 and p99.9 in µs of 64-byte request/response rounds on one connection to each of
/// `addrs`, in its order. The connections take turns round by round, so that all of them meet the
/// same moments of a shared machine and their figures can be compared.
async fn latency(addrs: &[SocketAddr], rounds: usize) -> Result<Vec<[f64; 3]>> {
    const WARM_UP: usize = 100;
    let mut sockets = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let socket = TcpStream::connect(addr).await?;
        socket.set_nodelay(true)?;
        sockets.push(socket);
    }
    let request = [7u8; 64];
    let mut response = [0u8; 64];
    let mut samples = vec![Vec::with_capacity(rounds); addrs.len()];
    for round in 0..WARM_UP + rounds {
        for (socket, samples) in sockets.iter_mut().zip(&mut samples) {
            let start = Instant::now();
            socket.write_all(&request).await?;
            socket.read_exact(&mut response).await?;
            if round >= WARM_UP {
                samples.push(start.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    Ok(samples.into_iter().map(percentiles).collect())
}

/// p50, p99 and p99.9 of `samples` (not empty).
fn percentiles(mut samples: Vec<f64>) -> [f64; 3] {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    [at(0.50), at(0.99), at(0.999)]
}

/// p50, p99 and p99.9 in µs of 64-byte datagram round trips to the UDP echo at `addr`, one at a
/// time. A datagram with no answer within a second is sent again (the first ones may arrive
/// before the path is up) and its round is not counted; a late answer is told apart by the
/// round's number in the datagram.
async fn udp_latency(addr: SocketAddr, rounds: usize) -> Result<[f64; 3]> {
    const WARM_UP: usize = 100;
    const MAX_UNANSWERED: usize = 100;
    tokio::task::spawn_blocking(move || {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut request = [7u8; 64];
        let mut response = [0u8; 64];
        let mut samples = Vec::with_capacity(WARM_UP + rounds);
        let (mut round, mut unanswered) = (0u64, 0);
        while samples.len() < WARM_UP + rounds {
            round += 1;
            request[..8].copy_from_slice(&round.to_le_bytes());
            let start = Instant::now();
            socket.send(&request)?;
            match await_answer(&socket, &request[..8], &mut response) {
                Ok(()) => samples.push(start.elapsed().as_secs_f64() * 1e6),
                Err(_) if unanswered < MAX_UNANSWERED => unanswered += 1,
                Err(error) => {
                    return Err(error).context(format!("{unanswered} round trips to {addr} lost"))
                }
            }
        }
        Ok(percentiles(samples.split_off(WARM_UP)))
    })
    .await?
}

/// Reads answers into `buf` until the one that starts with `tag` arrives, skipping late answers
/// to earlier rounds.
fn await_answer(socket: &std::net::UdpSocket, tag: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
    loop {
        socket.recv(buf)?;
        if buf.starts_with(tag) {
            return Ok(());
        }
    }
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

/// Waits until a one-byte exchange through `addr` (an echo) succeeds, 20 s at most.
async fn wait_round_trip(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let exchange = async {
            let mut socket = TcpStream::connect(addr).await?;
            socket.write_all(&[1]).await?;
            socket.read_exact(&mut [0u8; 1]).await?;
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(2), exchange).await {
            Ok(Ok(())) => return Ok(()),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            _ => anyhow::bail!("no round trip through {addr}"),
        }
    }
}

/// Datagrams delivered per second, and the share lost, when one client sends 1,200-byte
/// datagrams at an offered rate or as fast as it can.
struct UdpRate {
    delivered: u64,
    delivered_per_sec: f64,
    loss_percent: f64,
}

const UDP_PAYLOAD: usize = 1_200;

/// Sends probes until one arrives: the edge binds its UDP ports after connecting, and a UDP
/// sender cannot tell otherwise.
pub async fn wait_udp_path(addr: SocketAddr, sink: &targets::UdpSink) -> Result<()> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(addr).await?;
    let before = sink.datagrams.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while sink.datagrams.load(Ordering::Relaxed) == before {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no UDP datagram got through {addr}"
        );
        // Refused while the edge is not listening yet: ignore and retry.
        let _ = socket.send(b"probe").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Sends 1,200-byte datagrams to `addr` for `duration`, `rate` per second (paced every
/// millisecond) or as fast as one socket can, and counts what reaches the sink.
async fn udp_rate(
    addr: SocketAddr,
    sink: &targets::UdpSink,
    duration: Duration,
    rate: Option<u64>,
) -> Result<UdpRate> {
    let before = sink.datagrams.load(Ordering::Relaxed);
    let (sent, elapsed) =
        tokio::task::spawn_blocking(move || send_udp(addr, duration, rate)).await??;
    // Datagrams in flight arrive within moments; stop counting once the count holds still.
    let mut last = u64::MAX;
    let settle = Instant::now() + Duration::from_secs(5);
    while Instant::now() < settle {
        let now = sink.datagrams.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let delivered = sink.datagrams.load(Ordering::Relaxed) - before;
    Ok(UdpRate {
        delivered,
        delivered_per_sec: delivered as f64 / elapsed,
        loss_percent: 100.0 * (1.0 - delivered as f64 / sent.max(1) as f64),
    })
}

/// The sending side of [`udp_rate`], on a thread of its own: datagrams sent and seconds taken.
fn send_udp(addr: SocketAddr, duration: Duration, rate: Option<u64>) -> Result<(u64, f64)> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(addr)?;
    let datagram = [0x42u8; UDP_PAYLOAD];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        let due = rate.map_or(sent + 64, |rate| {
            (start.elapsed().as_secs_f64() * rate as f64) as u64
        });
        while sent < due {
            // A refused or full socket still counts as offered: the datagram is lost.
            let _ = socket.send(&datagram);
            sent += 1;
        }
        if rate.is_some() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok((sent, start.elapsed().as_secs_f64()))
}

/// Memory of the two tunnel processes `pids` (hub and edge) before, with `count` idle tunnelled connections, and after closing.
async fn idle_memory(pids: [u32; 2], addr: SocketAddr, count: usize) -> Result<Vec<Row>> {
    let rss = || -> Result<u64> { pids.iter().map(|pid| rss_bytes(*pid)).sum() };
    let fds = || -> Result<u64> { pids.iter().map(|pid| open_fds(*pid)).sum() };
    let (rss_before, fds_before) = (rss()?, fds()?);
    // Two cycles: the second shows whether anything grows, past the first's high-water mark.
    let mut cycles = Vec::new();
    for _ in 0..2 {
        let mut held = Vec::with_capacity(count);
        for opened in 0..count {
            let socket = open_idle_connection(addr).await.with_context(|| {
                format!("idle connection {} of {count} through {addr}", opened + 1)
            })?;
            held.push(socket);
        }
        let rss_held = rss()?;
        drop(held);
        // Closing is asynchronous on the far side: give it a bounded moment to settle.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fds()? > fds_before + 8 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cycles.push((rss_held, rss()?, fds()?));
    }
    let (rss_held, rss_after, _) = cycles[0];
    let (_, rss_after_second, fds_after) = cycles[1];
    let per_connection = rss_held.saturating_sub(rss_before) as f64 / count as f64 / 1024.0;
    let mib = |bytes: u64| bytes as f64 / 1048576.0;
    Ok(vec![
        Row::new("idle connections held", "conns", None, count as f64),
        Row::new("hub+edge RSS, idle", "MiB", None, mib(rss_before)),
        Row::new(
            "hub+edge RSS, all idle connections open",
            "MiB",
            None,
            mib(rss_held),
        ),
        Row::new("RSS per idle connection", "KiB", None, per_connection),
        Row::new("hub+edge RSS, all closed", "MiB", None, mib(rss_after)),
        Row::new(
            "hub+edge RSS, all closed after a second cycle",
            "MiB",
            None,
            mib(rss_after_second),
        ),
        Row::new("hub+edge open fds, before", "fds", None, fds_before as f64),
        Row::new(
            "hub+edge open fds, all closed after two cycles",
            "fds",
            None,
            fds_after as f64,
        ),
    ])
}

/// A figure measured through something other than our tunnel: a pair of table columns, shown
/// when any row has the figure.
enum Comparison {
    /// A peer's figure, by its label.
    Peer(&'static str),
    /// Two plain relays.
    RelayFloor,
}

impl Comparison {
    /// Every comparison, in column order.
    fn all() -> impl Iterator<Item = Comparison> {
        Peer::ALL
            .into_iter()
            .map(|peer| Comparison::Peer(peer.label()))
            .chain([Comparison::RelayFloor])
    }

    /// Header of the figure's column.
    fn header(&self) -> &'static str {
        match self {
            Comparison::Peer(label) => label,
            Comparison::RelayFloor => "2 plain relays",
        }
    }

    /// Header of the column of ours ÷ the figure.
    fn ratio_header(&self) -> String {
        match self {
            Comparison::Peer(label) => format!("ours/{}", label.replace(' ', "-")),
            Comparison::RelayFloor => "ours/floor".into(),
        }
    }

    /// The row's figure.
    fn figure(&self, row: &Row) -> Option<f64> {
        match self {
            Comparison::Peer(label) => row.peers.get(*label).copied(),
            Comparison::RelayFloor => row.relay_floor,
        }
    }
}

/// Opens a connection through `addr` and makes one exchange, so that it is known to reach the
/// target; 10 s at most.
async fn open_idle_connection(addr: SocketAddr) -> Result<TcpStream> {
    let open = async {
        let mut socket = TcpStream::connect(addr).await?;
        socket.write_all(&[1]).await?;
        socket.read_exact(&mut [0u8; 1]).await?;
        Ok::<_, std::io::Error>(socket)
    };
    Ok(tokio::time::timeout(Duration::from_secs(10), open)
        .await
        .context("no answer within 10 s")??)
}

/// The rows as an aligned table, with the columns of each comparison that has figures.
pub fn table(rows: &[Row]) -> String {
    let shown: Vec<_> = Comparison::all()
        .filter(|comparison| rows.iter().any(|row| comparison.figure(row).is_some()))
        .collect();
    let ratio = |r: Option<f64>| r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into());
    let mut out = format!(
        "{:<54} {:>16} {:>16} {:>8}",
        "measurement", "direct", "tunnel", "ratio"
    );
    for comparison in &shown {
        out.push_str(&format!(
            " {:>16} {:>16}",
            comparison.header(),
            comparison.ratio_header()
        ));
    }
    out.push('\n');
    for row in rows {
        let value = |v: Option<f64>| {
            v.map(|v| format!("{v:.2} {}", row.unit))
                .unwrap_or_else(|| "-".into())
        };
        out.push_str(&format!(
            "{:<54} {:>16} {:>16} {:>8}",
            row.name,
            value(row.direct),
            value(Some(row.tunnel)),
            ratio(row.ratio()),
        ));
        for comparison in &shown {
            let other = comparison.figure(row);
            out.push_str(&format!(
                " {:>16} {:>16}",
                value(other),
                ratio(row.ratio_to(other))
            ));
        }
        out.push('\n');
    }
    out
}

/// Polls `future` once: its output if it is ready at once.
pub fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}
