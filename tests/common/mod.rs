//! Helpers for the end-to-end tests: a hub and edges on loopback, targets, and polling.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use remoteingress_edge::{BackoffPolicy, Edge, EdgeHandle, EdgeOptions};
use remoteingress_hub::{AllowedEdge, Hub, HubError, HubHandle, HubOptions};
use remoteingress_tunnel::{HubIdentity, HubTrust, SessionOptions};
use remoteingress_wire::proxy::ProxyV1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Edge listeners live here so they never collide with targets on 127.0.0.1.
pub const EDGE_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
pub const SECRET: &str = "s3cr3t-for-tests";

/// Shows the crates' logs in failing tests (filter with RUST_LOG).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// Polls `check` until it yields a value; fails the test after 20 s.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(Duration::from_secs(20), what, check).await
}

/// Like `eventually`, with its own deadline (for steps that wait on a Kubernetes API server).
pub async fn eventually_within<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn hub_options(port: u16) -> HubOptions {
    HubOptions {
        listen_addr: SocketAddr::from(([127, 0, 0, 1], port)),
        handshake_timeout: Duration::from_secs(2),
        session: SessionOptions {
            ping_interval: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(5),
            ..SessionOptions::default()
        },
        ..HubOptions::default()
    }
}

/// Starts a hub on `port` (0: any).
pub async fn start_hub(state_dir: &Path, port: u16) -> HubHandle {
    start_hub_with(state_dir, hub_options(port)).await
}

/// Starts a hub with `options` and the identity kept in `state_dir`. A fixed port may still be
/// held for a moment by a hub that just shut down (its QUIC socket is released by a background
/// task), so a bind that finds the port in use is retried until the deadline.
pub async fn start_hub_with(state_dir: &Path, options: HubOptions) -> HubHandle {
    let identity = HubIdentity::load_or_generate(state_dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Hub::start(options.clone(), &identity).await {
            Ok(hub) => return hub,
            Err(HubError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("hub did not start: {e}"),
        }
    }
}

pub fn edge_options(hub: &HubHandle, id: &str, secret: &str) -> EdgeOptions {
    let mut options = EdgeOptions::new(
        "127.0.0.1",
        hub.local_addr().port(),
        id,
        secret,
        HubTrust::Pin(hub.pin().to_owned()),
    );
    options.bind_address = EDGE_IP;
    options.backoff = BackoffPolicy {
        min: Duration::from_millis(50),
        max: Duration::from_millis(500),
        stable_after: Duration::from_secs(60),
    };
    options.session.idle_timeout = Duration::from_secs(5);
    // Tests never touch the host's nftables; firewall tests use their own namespace.
    options.firewall = remoteingress_edge::FirewallMode::Off;
    // Nor do they reach the internet: STUN tests run their own server.
    options.stun_servers.clear();
    options
}

pub async fn start_edge(hub: &HubHandle, id: &str) -> EdgeHandle {
    Edge::start(edge_options(hub, id, SECRET)).await.unwrap()
}

/// An edge entry whose edge ports map to the given target ports.
pub fn allowed(id: &str, ports: &[(u16, u16)]) -> AllowedEdge {
    let mut edge = AllowedEdge::new(id, SECRET, ports.iter().map(|(edge, _)| *edge).collect());
    edge.targets.ports = ports.iter().copied().collect::<BTreeMap<_, _>>();
    edge
}

/// A port free on `ip` for TCP and UDP right now, below the kernel's ephemeral range.
///
/// The kernel never gives such a port to an outgoing connection, so a test may stop what
/// listens on it and listen there again (a hub restarted on its port): from the ephemeral
/// range, a client's source port (or a connection made to itself while nothing listened)
/// could take it in between. Ports are handed out in turn from a start that differs per
/// process, so tests running side by side do not pick the same one.
pub fn free_port(ip: IpAddr) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static HANDED_OUT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_from.saturating_sub(LOWEST).max(1);
    let start = std::process::id().wrapping_mul(7_919) % span;
    loop {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        assert!(n < span, "no free port left below {ephemeral_from}");
        let port = u16::try_from(LOWEST + (start + n) % span).unwrap();
        let tcp = std::net::TcpListener::bind((ip, port));
        let udp = std::net::UdpSocket::bind((ip, port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
}

/// Waits until the edge listens on `port`.
pub async fn wait_listening(edge: &EdgeHandle, port: u16) {
    eventually(&format!("edge listening on {port}"), || async {
        edge.status().listen_ports.contains(&port).then_some(())
    })
    .await;
}

/// A target that records each connection's PROXY header and echoes its bytes until EOF.
pub struct EchoTarget {
    pub addr: SocketAddr,
    pub headers: Arc<Mutex<Vec<ProxyV1>>>,
}

pub async fn echo_target() -> EchoTarget {
    echo_target_on(IpAddr::from([127, 0, 0, 1])).await
}

/// An echo target listening on `ip`.
pub async fn echo_target_on(ip: IpAddr) -> EchoTarget {
    // Hundreds of streams connect at once in some tests: the default backlog of 128 would
    // overflow into SYN cookies, which can reset a connection.
    let listener = remoteingress_tunnel::listen_tcp(SocketAddr::new(ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let headers = Arc::new(Mutex::new(Vec::new()));
    let seen = headers.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move { echo(socket, seen).await });
        }
    });
    EchoTarget { addr, headers }
}

async fn echo(mut socket: TcpStream, seen: Arc<Mutex<Vec<ProxyV1>>>) {
    let mut buf = Vec::new();
    let (header, used) = loop {
        if let Some(parsed) = ProxyV1::parse(&buf).expect("valid PROXY line") {
            break parsed;
        }
        if socket.read_buf(&mut buf).await.unwrap_or(0) == 0 {
            return;
        }
    };
    seen.lock().unwrap().push(header);
    if socket.write_all(&buf[used..]).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = socket.split();
    let _ = tokio::io::copy(&mut rd, &mut wr).await;
    let _ = wr.shutdown().await;
}

/// Connects, sends `data` and reads until the connection ends: what arrived, or the error that
/// ended it (a reset, for an aborted stream — possibly already at connect).
pub async fn exchange_until_end(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    let _ = stream.write_all(data).await;
    let mut received = Vec::new();
    stream.read_to_end(&mut received).await?;
    Ok(received)
}

/// Sends `data`, half-closes, and returns everything received until EOF.
pub async fn round_trip(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        wr.write_all(&data).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let mut received = Vec::new();
    rd.read_to_end(&mut received).await.unwrap();
    writer.await.unwrap();
    received
}

/// Runs each named `async fn(TransportMode)` as a test once per transport (modules `tls` and
/// `quic`), so every end-to-end check covers both without copies.
#[macro_export]
macro_rules! for_each_transport {
    ($($test:ident),* $(,)?) => {
        mod tls {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(remoteingress_edge::TransportMode::TcpTls).await;
                }
            )*
        }
        mod quic {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(remoteingress_edge::TransportMode::Quic).await;
                }
            )*
        }
    };
}

/// A standard setup: a hub, one echo target, one edge "e1" forwarding `edge_port` to it.
pub struct Setup {
    pub state: tempfile::TempDir,
    pub hub: HubHandle,
    /// The hub's tunnel port, free for a restarted hub.
    pub hub_port: u16,
    pub edge: EdgeHandle,
    pub target: EchoTarget,
    pub edge_port: u16,
}

impl Setup {
    pub async fn new() -> Self {
        Self::with_transport(remoteingress_edge::TransportMode::TcpTls).await
    }

    pub async fn with_transport(transport: remoteingress_edge::TransportMode) -> Self {
        init_logs();
        let state = tempfile::tempdir().unwrap();
        // Below the ephemeral range, so that a test may restart the hub on it: a port from that
        // range could meanwhile be the source port of a connection (the edge's own reconnects
        // to it among them).
        let hub_port = free_port(IpAddr::from([127, 0, 0, 1]));
        let hub = start_hub(state.path(), hub_port).await;
        let target = echo_target().await;
        let edge_port = free_port(EDGE_IP);
        hub.update_allowed_edges(vec![allowed("e1", &[(edge_port, target.addr.port())])])
            .await
            .unwrap();
        let mut options = edge_options(&hub, "e1", SECRET);
        options.transport = transport;
        let edge = Edge::start(options).await.unwrap();
        wait_listening(&edge, edge_port).await;
        assert_eq!(edge.status().transport, Some(transport_name(transport)));
        Self {
            state,
            hub,
            hub_port,
            edge,
            target,
            edge_port,
        }
    }

    pub fn edge_addr(&self) -> SocketAddr {
        SocketAddr::new(EDGE_IP, self.edge_port)
    }
}

/// The transport a session runs over when the edge is set to `mode`.
pub fn transport_name(mode: remoteingress_edge::TransportMode) -> remoteingress_edge::Transport {
    match mode {
        remoteingress_edge::TransportMode::Quic => remoteingress_edge::Transport::Quic,
        _ => remoteingress_edge::Transport::TcpTls,
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A child process killed when dropped.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the remoteingress binary with `args` and extra environment.
pub fn spawn_binary(args: &[String], env: &[(&str, &str)]) -> Process {
    spawn_binary_under(&[], args, env)
}

/// Starts the remoteingress binary under `wrapper` (a command and its arguments that run the
/// rest, such as `nsenter … --`), with `args` and extra environment.
pub fn spawn_binary_under(wrapper: &[String], args: &[String], env: &[(&str, &str)]) -> Process {
    let binary = env!("CARGO_BIN_EXE_remoteingress").to_owned();
    let mut command = wrapper.iter().chain(std::iter::once(&binary));
    let program = command.next().expect("a program");
    Process(
        std::process::Command::new(program)
            .args(command)
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Whether something listens on `addr`. A connection the listener's owner resets at once (an
/// edge whose tunnel refused the stream) may fail its connect with a reset: that still counts;
/// any other failure does not.
pub async fn listens(addr: impl tokio::net::ToSocketAddrs) -> bool {
    match TcpStream::connect(addr).await {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Waits until something accepts TCP on 127.0.0.1:`port`.
pub async fn wait_port(port: u16) {
    eventually(&format!("port {port} to accept"), || async {
        TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

/// A plain HTTP/1.1 GET: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// A hand-driven edge over TLS: authenticates, then sends and reads raw frames.
pub struct RawEdge {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    decoder: remoteingress_wire::frame::FrameDecoder,
    /// The hub's handshake reply.
    pub reply: Vec<u8>,
}

impl RawEdge {
    /// Authenticates as `id` (with [`SECRET`]); the reply must accept it.
    pub async fn connect(hub: &HubHandle, id: &str) -> Self {
        Self::authenticate(Self::dial(hub).await, id).await
    }

    /// A TLS connection to `hub` that has not sent its handshake line yet.
    pub async fn dial(hub: &HubHandle) -> tokio_rustls::client::TlsStream<TcpStream> {
        let config =
            remoteingress_tunnel::tls::client_config(&HubTrust::Pin(hub.pin().to_owned())).unwrap();
        let tcp = TcpStream::connect(hub.local_addr()).await.unwrap();
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// Sends the handshake line for `id` on a dialled connection; the reply must accept it.
    pub async fn authenticate(
        mut tls: tokio_rustls::client::TlsStream<TcpStream>,
        id: &str,
    ) -> Self {
        let hello = remoteingress_wire::handshake::EdgeHello::new(id, SECRET).unwrap();
        tls.write_all(hello.to_line().as_bytes()).await.unwrap();
        let (reply, rest) = remoteingress_tunnel::line::read_line(&mut tls, 1 << 20)
            .await
            .unwrap();
        remoteingress_wire::handshake::parse_reply(&reply).expect("accepted");
        let mut decoder = remoteingress_wire::frame::FrameDecoder::new();
        decoder.feed(&rest);
        Self {
            tls,
            decoder,
            reply: reply.to_vec(),
        }
    }

    /// Writes bytes as they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.unwrap();
    }

    /// Writes frames.
    pub async fn send(&mut self, list: &[(u32, remoteingress_wire::frame::FrameType, &[u8])]) {
        self.send_bytes(&frames(list)).await;
    }

    /// The next frame from the hub that is not a PING (answered) nor a CONFIG; `None` once the
    /// hub has closed the tunnel.
    pub async fn next_frame(&mut self) -> Option<remoteingress_wire::frame::Frame> {
        self.next_frame_keeping_configs(false).await
    }

    /// The next CONFIG from the hub, parsed; `None` once the hub has closed the tunnel.
    pub async fn next_config(&mut self) -> Option<remoteingress_wire::EdgeConfig> {
        loop {
            let frame = self.next_frame_keeping_configs(true).await?;
            if frame.kind == remoteingress_wire::frame::FrameType::Config {
                return Some(serde_json::from_slice(&frame.payload).expect("a config"));
            }
        }
    }

    /// Confirms every extension the hub offers (so the hub lets this edge keep several
    /// tunnels), and waits until the hub has read the confirmation: an open of a port nobody
    /// is assigned is answered after it.
    pub async fn confirm_extensions(&mut self) {
        use remoteingress_wire::frame::FrameType;
        let all = remoteingress_wire::extension::Extensions::ALL.to_payload();
        let nowhere = ProxyV1::tcp(
            "192.0.2.1:1000".parse().unwrap(),
            SocketAddr::new(EDGE_IP, 1),
        )
        .to_line();
        self.send(&[
            (0, FrameType::Extensions, &all),
            (1, FrameType::Open, nowhere.as_bytes()),
        ])
        .await;
        loop {
            let frame = self.next_frame().await.expect("the tunnel stays up");
            if frame.stream_id == 1 {
                return;
            }
        }
    }

    async fn next_frame_keeping_configs(
        &mut self,
        configs: bool,
    ) -> Option<remoteingress_wire::frame::Frame> {
        use remoteingress_wire::frame::FrameType;
        loop {
            while let Some(frame) = self.decoder.next_frame().unwrap() {
                match frame.kind {
                    FrameType::Ping => {
                        let pong = [(0, FrameType::Pong, &frame.payload[..])];
                        self.send(&pong).await;
                    }
                    FrameType::Config if !configs => {}
                    _ => return Some(frame),
                }
            }
            let mut buf = vec![0u8; 64 * 1024];
            let read = tokio::time::timeout(Duration::from_secs(20), self.tls.read(&mut buf))
                .await
                .expect("the hub stays silent");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.decoder.feed(&buf[..n]),
            }
        }
    }

    /// The next frame of `kind` on stream `id`, skipping others.
    pub async fn next_of(
        &mut self,
        id: u32,
        kind: remoteingress_wire::frame::FrameType,
    ) -> remoteingress_wire::frame::Frame {
        loop {
            let frame = self.next_frame().await.expect("tunnel closed");
            if frame.stream_id == id && frame.kind == kind {
                return frame;
            }
        }
    }
}

/// Frames encoded back to back.
pub fn frames(list: &[(u32, remoteingress_wire::frame::FrameType, &[u8])]) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    for (id, kind, payload) in list {
        remoteingress_wire::frame::encode_frame(&mut buf, *id, *kind, payload);
    }
    buf.to_vec()
}

/// The value of a metric with the given labels, if it exists.
pub fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let family = registry.gather().into_iter().find(|f| f.name() == name)?;
    family
        .get_metric()
        .iter()
        .find(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| {
            if m.get_counter().value() != 0.0 {
                m.get_counter().value()
            } else {
                m.get_gauge().value()
            }
        })
}

/// A CA and a certificate it signed for some names, as PEM files `ca.crt`, `tls.crt` and
/// `tls.key` in a temporary directory.
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
        Self { dir }
    }

    /// One of the files.
    pub fn file(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// A process sleeping in a new network namespace (`unshare` with `flags`, e.g. `--net`, or
/// `-rn` to map the user too), once the namespace exists: it holds the namespace open.
pub async fn namespace_holder(flags: &str) -> Process {
    let holder = Process(
        std::process::Command::new("unshare")
            .args([flags, "sleep", "3600"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("unshare (util-linux) runs"),
    );
    let own = std::fs::read_link("/proc/self/ns/net").unwrap();
    let pid = holder.0.id();
    eventually("the namespace to exist", || {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
        let apart = theirs.is_some_and(|ns| ns != own);
        async move { apart.then_some(()) }
    })
    .await;
    holder
}
