//! The hub and edge as separate processes of the release binary, so that their memory can be
//! measured on their own; and readings of a process's RSS and open descriptors.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
}

impl Process {
    /// Takes ownership of a spawned child.
    pub fn new(child: Child) -> Self {
        Self { child }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts one of the bench binary's helper commands (`args`), which prints the port it listens
/// on (on 127.0.0.1) as its first line, and returns it with that address.
pub fn spawn_helper(bench_binary: &Path, args: &[&str]) -> Result<(Process, SocketAddr)> {
    let mut child = Command::new(bench_binary)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {} {}", bench_binary.display(), args.join(" ")))?;
    let stdout = child.stdout.take().context("helper stdout")?;
    let process = Process::new(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let port: u16 = line
        .trim()
        .parse()
        .with_context(|| format!("{} printed {line:?}, not its port", args.join(" ")))?;
    Ok((process, SocketAddr::from(([127, 0, 0, 1], port))))
}

/// A port free on `ip` right now.
pub fn free_port(ip: &str) -> Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// Edge port → target port, per protocol.
#[derive(Debug, Clone, Default)]
pub struct PortMap {
    /// TCP ports.
    pub tcp: BTreeMap<u16, u16>,
    /// UDP ports (edge ports must differ from the TCP ones).
    pub udp: BTreeMap<u16, u16>,
}

impl PortMap {
    /// Every mapping with its protocol name (`tcp`, `udp`): public port, target port.
    pub fn services(&self) -> impl Iterator<Item = (&'static str, u16, u16)> + '_ {
        let of = |kind| move |(public, target): (&u16, &u16)| (kind, *public, *target);
        self.tcp
            .iter()
            .map(of("tcp"))
            .chain(self.udp.iter().map(of("udp")))
    }
}

/// A UDP port free on `ip` right now that is none of `taken`.
pub fn free_udp_port(ip: &str, taken: &[u16]) -> Result<u16> {
    loop {
        let port = std::net::UdpSocket::bind((ip, 0))?.local_addr()?.port();
        if !taken.contains(&port) {
            return Ok(port);
        }
    }
}

/// A running hub process with its allowed edges from a file.
#[derive(Debug)]
pub struct Hub {
    /// The process.
    pub process: Process,
    /// Its tunnel port on 127.0.0.1 (TCP for TLS, UDP for QUIC).
    pub tunnel_port: u16,
    /// Its certificate pin.
    pub pin: String,
    _state: tempfile::TempDir,
}

impl Hub {
    /// Starts a hub allowing `edges` (the edges file's JSON) and waits for its certificate pin.
    pub async fn start(binary: &Path, edges: &serde_json::Value) -> Result<Self> {
        Self::start_with(binary, edges, &[]).await
    }

    /// As [`Hub::start`], with more of the hub's options.
    pub async fn start_with(
        binary: &Path,
        edges: &serde_json::Value,
        options: &[&str],
    ) -> Result<Self> {
        let state = tempfile::tempdir()?;
        std::fs::write(state.path().join("edges.json"), edges.to_string())?;
        Self::start_in(binary, state, free_port("127.0.0.1")?, options).await
    }

    /// Kills the hub and starts it again on the same port with the same state (identity,
    /// edges), as a restart does.
    pub async fn restart(self, binary: &Path) -> Result<Self> {
        let Self {
            process,
            tunnel_port,
            _state: state,
            ..
        } = self;
        drop(process);
        Self::start_in(binary, state, tunnel_port, &[]).await
    }

    async fn start_in(
        binary: &Path,
        state: tempfile::TempDir,
        tunnel_port: u16,
        options: &[&str],
    ) -> Result<Self> {
        let edges_file = state.path().join("edges.json");
        let mut hub = Command::new(binary)
            .args([
                "--log-level",
                "warn",
                "hub",
                "--listen-address",
                "127.0.0.1",
            ])
            .args(["--tunnel-port", &tunnel_port.to_string()])
            .args([
                "--admin-addr",
                &format!("127.0.0.1:{}", free_port("127.0.0.1")?),
            ])
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{}", free_port("127.0.0.1")?),
            ])
            .arg("--state-dir")
            .arg(state.path())
            .arg("--edges-file")
            .arg(&edges_file)
            .args(["--max-streams", "30000"])
            .args(options)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the hub")?;
        let stdout = hub.stdout.take().context("hub stdout")?;
        let process = Process::new(hub);
        // Keep draining the hub's stdout after the pin, so its later lines never hit a closed pipe.
        let (pin_tx, pin_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(pin) = line.strip_prefix("certificate pin (sha256): ") {
                    let _ = pin_tx.send(pin.to_owned());
                }
            }
        });
        let pin = pin_rx
            .recv_timeout(Duration::from_secs(20))
            .context("the hub did not print its pin")?;
        Ok(Self {
            process,
            tunnel_port,
            pin,
            _state: state,
        })
    }
}

/// A running hub and edge with the given edge-port → target mapping.
#[derive(Debug)]
pub struct Tunnel {
    /// Hub process.
    pub hub: Hub,
    /// Edge process.
    pub edge: Process,
    /// The edge's metrics endpoint.
    pub edge_metrics: SocketAddr,
}

/// Address the edge's public listeners bind to.
pub const EDGE_IP: &str = "127.0.0.2";

impl Tunnel {
    /// Starts both processes (the edge using `transport`) and waits until every port accepts.
    /// UDP ports are not waited for: see [`crate::wait_udp_path`].
    pub async fn start(binary: &Path, ports: &PortMap, transport: &str) -> Result<Self> {
        let secret = "bench-secret";
        let edges = serde_json::json!([{
            "id": "bench",
            "secret": secret,
            "listenPorts": ports.tcp.keys().collect::<Vec<_>>(),
            "listenPortsUdp": ports.udp.keys().collect::<Vec<_>>(),
            "targetPorts": ports.tcp.iter().chain(&ports.udp)
                .map(|(k, v)| (k.to_string(), v)).collect::<BTreeMap<_, _>>(),
        }]);
        let hub = Hub::start(binary, &edges).await?;
        let edge_metrics = SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1")?));
        let edge = Command::new(binary)
            .args(["--log-level", "warn", "edge", "--hub-host", "127.0.0.1"])
            .args(["--hub-port", &hub.tunnel_port.to_string()])
            .args([
                "--edge-id",
                "bench",
                "--secret",
                secret,
                "--hub-pin",
                &hub.pin,
            ])
            .args(["--bind-address", EDGE_IP])
            .args([
                "--status-addr",
                &format!("127.0.0.1:{}", free_port("127.0.0.1")?),
            ])
            .args(["--metrics-addr", &edge_metrics.to_string()])
            .args(["--max-connections", "30000", "--max-streams", "30000"])
            .args([
                "--firewall",
                "off",
                "--no-stun",
                "--transport-mode",
                transport,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the edge")?;
        let edge = Process::new(edge);
        for port in ports.tcp.keys() {
            wait_accepting(SocketAddr::new(EDGE_IP.parse()?, *port)).await?;
        }
        Ok(Self {
            hub,
            edge,
            edge_metrics,
        })
    }

    /// The value of one sample (name with labels, as Prometheus prints it) the edge reports.
    pub async fn edge_metric(&self, sample: &str) -> Option<f64> {
        let mut socket = tokio::net::TcpStream::connect(self.edge_metrics)
            .await
            .ok()?;
        let request = "GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n";
        socket.write_all(request.as_bytes()).await.ok()?;
        let mut body = String::new();
        socket.read_to_string(&mut body).await.ok()?;
        body.lines()
            .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
    }
}

/// Waits until `addr` accepts TCP connections (20 s at most).
pub async fn wait_accepting(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{addr} did not start accepting")
}

/// CPU seconds (user and system) the processes `pids` have used so far.
pub fn cpu_seconds(pids: &[u32]) -> Result<f64> {
    // clock ticks per second: 100 on Linux for every architecture this runs on.
    const TICKS: f64 = 100.0;
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces), from field 3 on.
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .context("stat")?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        for index in [11, 12] {
            ticks += fields
                .get(index)
                .and_then(|f| f.parse::<u64>().ok())
                .context("utime/stime in stat")?;
        }
    }
    Ok(ticks as f64 / TICKS)
}

/// Resident memory of a process in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}
