//! High availability with real processes on loopback: an edge with tunnels to two hubs keeps
//! serving new connections when one hub is killed and through a rolling restart of both; it
//! finds two distinct hubs behind one load-balanced address; it runs only the newest
//! configuration generation and reports hubs that disagree; and an edge of the original
//! protocol is never sent a DRAIN.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

for_each_transport!(
    a_drained_tunnel_finishes_its_streams_while_new_ones_go_elsewhere,
    killing_one_hub_costs_only_its_own_streams,
);

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use remoteingress_edge::{Edge, EdgeEvent, EdgeOptions, HubAddress, TransportMode, TunnelState};
use remoteingress_hub::HubEvent;
use remoteingress_tunnel::HubTrust;
use remoteingress_wire::extension::Extensions;
use remoteingress_wire::frame::FrameType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LOCALHOST: [u8; 4] = [127, 0, 0, 1];

/// How a hub is started: a restart reuses its id, ports and edges file.
#[derive(Clone)]
struct HubSpec {
    id: String,
    tunnel_port: u16,
    metrics_port: u16,
    admin_port: u16,
    edges_file: PathBuf,
    /// The network namespace it runs in; the test's own when `None`.
    network: Option<Arc<HubNetwork>>,
}

impl HubSpec {
    /// The address it listens on, as the edge and the test reach it.
    fn host(&self) -> IpAddr {
        self.network
            .as_ref()
            .map_or(LOCALHOST.into(), |network| network.address)
    }

    /// Its metrics endpoint.
    fn metrics(&self) -> SocketAddr {
        SocketAddr::new(self.host(), self.metrics_port)
    }
}

/// A running hub process.
struct HubProcess {
    spec: HubSpec,
    process: Process,
}

/// Hubs sharing one certificate (one pin) and a target they forward to.
struct Tier {
    dir: tempfile::TempDir,
    pin: String,
    target: EchoTarget,
    /// Where the edge listens for clients.
    edge_ip: IpAddr,
    edge_port: u16,
}

impl Tier {
    async fn new() -> Self {
        Self::with(LOCALHOST.into(), EDGE_IP).await
    }

    /// A tier whose target listens on `target_ip` and whose edge on `edge_ip`.
    async fn with(target_ip: IpAddr, edge_ip: IpAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pin = remoteingress_tunnel::HubIdentity::load_or_generate(dir.path())
            .unwrap()
            .pin();
        Self {
            dir,
            pin,
            target: echo_target_on(target_ip).await,
            edge_ip,
            edge_port: free_port(edge_ip),
        }
    }

    /// Writes an edges file for edge `e1` with `generation`, listening on `port`.
    fn edges_file(&self, name: &str, generation: u64, port: u16) -> PathBuf {
        let path = self.dir.path().join(name);
        let edges = serde_json::json!({
            "generation": generation,
            "edges": [allowed("e1", &[(port, self.target.addr.port())])],
        });
        std::fs::write(&path, edges.to_string()).unwrap();
        path
    }

    async fn hub(&self, id: &str, edges_file: PathBuf) -> HubProcess {
        self.hub_in(id, edges_file, None).await
    }

    /// A hub in `network` (the test's own when `None`).
    async fn hub_in(
        &self,
        id: &str,
        edges_file: PathBuf,
        network: Option<Arc<HubNetwork>>,
    ) -> HubProcess {
        let localhost = LOCALHOST.into();
        self.start(HubSpec {
            id: id.to_owned(),
            tunnel_port: free_port(localhost),
            metrics_port: free_port(localhost),
            admin_port: free_port(localhost),
            edges_file,
            network,
        })
        .await
    }

    /// Starts (or starts again) a hub process and waits until it is ready.
    async fn start(&self, hub: HubSpec) -> HubProcess {
        let host = hub.host();
        let wrapper = hub
            .network
            .as_ref()
            .map(|network| network.wrapper())
            .unwrap_or_default();
        let process = spawn_binary_under(
            &wrapper,
            &[
                "hub".into(),
                format!("--listen-address={host}"),
                format!("--tunnel-port={}", hub.tunnel_port),
                format!("--admin-addr=127.0.0.1:{}", hub.admin_port),
                format!("--metrics-addr={}", hub.metrics()),
                format!("--state-dir={}", self.dir.path().display()),
                format!("--edges-file={}", hub.edges_file.display()),
                format!("--hub-id={}", hub.id),
                format!("--target-host={}", self.target.addr.ip()),
                "--shutdown-grace-secs=20".into(),
            ],
            &[],
        );
        let metrics = hub.metrics();
        eventually(&format!("{} to be ready", hub.id), || async {
            match TcpStream::connect(metrics).await {
                Ok(_) => (http_get(metrics, "/readyz").await.0 == 200).then_some(()),
                Err(_) => None,
            }
        })
        .await;
        HubProcess { spec: hub, process }
    }

    /// An edge process with `hub_args` (its `--hub` list and connection count).
    async fn edge(&self, hub_args: &[String]) -> EdgeProcess {
        let localhost = LOCALHOST.into();
        let metrics = SocketAddr::from((LOCALHOST, free_port(localhost)));
        let mut args: Vec<String> = vec![
            "edge".into(),
            "--edge-id=e1".into(),
            format!("--secret={SECRET}"),
            format!("--hub-pin={}", self.pin),
            format!("--bind-address={}", self.edge_ip),
            format!("--status-addr=127.0.0.1:{}", free_port(localhost)),
            format!("--metrics-addr={metrics}"),
            "--firewall=off".into(),
            "--no-stun".into(),
            "--reconnect-min-ms=50".into(),
            "--reconnect-max-secs=1".into(),
        ];
        args.extend(hub_args.iter().cloned());
        EdgeProcess {
            _process: spawn_binary(&args, &[]),
            metrics,
        }
    }
}

struct EdgeProcess {
    _process: Process,
    metrics: SocketAddr,
}

impl EdgeProcess {
    /// The value of one sample (name with labels, as Prometheus prints it), if present.
    async fn metric(&self, sample: &str) -> Option<f64> {
        TcpStream::connect(self.metrics).await.ok()?;
        let (_, body) = http_get(self.metrics, "/metrics").await;
        body.lines()
            .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
    }

    /// Waits until `count` tunnels are active, to the hubs named.
    async fn wait_tunnels(&self, hubs: &[&str]) {
        eventually(&format!("active tunnels to {hubs:?}"), || async {
            let active = self
                .metric("remoteingress_tunnels{state=\"active\"}")
                .await?;
            let mut all = active == hubs.len() as f64;
            for hub in hubs {
                let sample = format!("remoteingress_tunnel_streams_active{{hub=\"{hub}\"}}");
                all &= self.metric(&sample).await.is_some();
            }
            all.then_some(())
        })
        .await;
    }
}

fn hub_flags(hubs: &[&HubProcess], connections: usize) -> Vec<String> {
    let mut flags: Vec<String> = hubs
        .iter()
        .map(|hub| format!("--hub={}:{}", hub.spec.host(), hub.spec.tunnel_port))
        .collect();
    flags.push(format!("--hub-connections={connections}"));
    flags
}

/// Sends SIGTERM to `hub` and waits until it has drained and exited; its spec, to start it
/// again.
async fn stop_gracefully(mut hub: HubProcess) -> HubSpec {
    signal(&hub, "-TERM");
    let id = hub.spec.id.clone();
    let began = Instant::now();
    eventually(&format!("{id} to exit after draining"), || {
        let exited = hub.process.0.try_wait().unwrap().map(|_| ());
        async move { exited }
    })
    .await;
    println!(
        "{id} drained and exited {:?} after SIGTERM",
        began.elapsed()
    );
    hub.spec
}

fn signal(hub: &HubProcess, signal: &str) {
    let pid = hub.process.0.id().to_string();
    assert!(Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap()
        .success());
}

/// Connect, send a few bytes, half-close, read the echo: true if it all came back.
async fn short_exchange(addr: SocketAddr, n: usize) -> bool {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let data = format!("connection {n}");
        stream.write_all(data.as_bytes()).await?;
        stream.shutdown().await?;
        let mut received = Vec::new();
        stream.read_to_end(&mut received).await?;
        Ok::<_, std::io::Error>(received == data.as_bytes())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), exchange).await,
        Ok(Ok(true))
    )
}

/// A transfer that lasts about a second: 20 chunks, 50 ms apart, then the whole echo.
async fn long_transfer(addr: SocketAddr) -> bool {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let data = pattern(20 * 16 * 1024, 7);
    let (mut rd, mut wr) = stream.split();
    let write = async {
        for chunk in data.chunks(16 * 1024) {
            wr.write_all(chunk).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        wr.shutdown().await
    };
    let mut received = Vec::new();
    let (written, read) = tokio::join!(write, rd.read_to_end(&mut received));
    written.is_ok() && read.is_ok() && received == data
}

/// The edge's `--transport-mode` value for `transport`.
fn mode_name(transport: TransportMode) -> &'static str {
    match transport {
        TransportMode::TcpTls => "tcpTls",
        TransportMode::Quic => "quic",
        TransportMode::QuicWithFallback => "quicWithFallback",
    }
}

/// One connection of a [`Load`].
struct Outcome {
    /// When it started.
    at: Instant,
    /// How long its exchange took.
    took: Duration,
    /// Whether all its bytes came back.
    ok: bool,
}

/// New connections at about 200 per second (4 workers, each every 20 ms), until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    /// While set, workers start no connection.
    paused: Arc<AtomicBool>,
    started: Arc<AtomicUsize>,
    workers: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

const WORKERS: usize = 4;

impl Load {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicUsize::new(0));
        let workers = (0..WORKERS)
            .map(|_| {
                let (stop, paused, started) = (stop.clone(), paused.clone(), started.clone());
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    let mut pace = tokio::time::interval(Duration::from_millis(20));
                    while !stop.load(Ordering::Relaxed) {
                        pace.tick().await;
                        if paused.load(Ordering::Relaxed) {
                            continue;
                        }
                        let n = started.fetch_add(1, Ordering::Relaxed);
                        let at = Instant::now();
                        let ok = short_exchange(addr, n).await;
                        outcomes.push(Outcome {
                            at,
                            took: at.elapsed(),
                            ok,
                        });
                    }
                    outcomes
                })
            })
            .collect();
        Self {
            stop,
            paused,
            started,
            workers,
        }
    }

    /// Starts no new connection until [`Load::resume`] (those open finish).
    fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    /// Waits until `more` connections beyond those started so far have started.
    async fn run_for(&self, more: usize) {
        let target = self.started.load(Ordering::Relaxed) + more;
        eventually("the load to go on", || async {
            (self.started.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await;
    }

    /// Stops and returns every connection's outcome.
    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for worker in self.workers {
            all.extend(worker.await.unwrap());
        }
        all
    }
}

/// A hub process killed: over TLS the kernel resets its connections at once; over QUIC
/// nothing is sent, and the edge notices the silence at the liveness deadline.
async fn killing_one_hub_costs_only_its_own_streams(transport: TransportMode) {
    let tier = Tier::new().await;
    let file = tier.edges_file("edges.json", 1, tier.edge_port);
    let a = tier.hub("hub-a", file.clone()).await;
    let b = tier.hub("hub-b", file).await;
    let mut flags = hub_flags(&[&a, &b], 2);
    flags.push(format!("--transport-mode={}", mode_name(transport)));
    let edge = tier.edge(&flags).await;
    edge.wait_tunnels(&["hub-a", "hub-b"]).await;
    let addr = SocketAddr::new(EDGE_IP, tier.edge_port);

    let load = Load::start(addr);
    load.run_for(100).await;
    let mut a = a;
    let killed = Instant::now();
    a.process.0.kill().unwrap();
    edge.wait_tunnels(&["hub-b"]).await;
    let noticed = Instant::now();
    load.run_for(200).await;
    let outcomes = load.finish().await;

    let failed: Vec<&Outcome> = outcomes.iter().filter(|outcome| !outcome.ok).collect();
    let failed_after = failed
        .iter()
        .filter(|outcome| outcome.at >= noticed)
        .count();
    println!(
        "kill -9 of one hub, {}: {} connections, {} failed (at most the {WORKERS} in flight), \
         edge routed around it within {:?}",
        mode_name(transport),
        outcomes.len(),
        failed.len(),
        noticed - killed
    );
    assert_eq!(
        failed_after, 0,
        "connections after the loss was noticed all succeed"
    );
    assert!(
        failed.len() <= WORKERS,
        "only connections in flight on the killed hub may fail: {} did",
        failed.len()
    );
    assert!(
        outcomes
            .iter()
            .filter(|outcome| outcome.at >= noticed)
            .count()
            >= 150
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_every_hub_loses_no_connection() {
    let tier = Tier::new().await;
    let file = tier.edges_file("edges.json", 1, tier.edge_port);
    let mut hubs = vec![
        tier.hub("hub-a", file.clone()).await,
        tier.hub("hub-b", file).await,
    ];
    let edge = tier.edge(&hub_flags(&[&hubs[0], &hubs[1]], 2)).await;
    edge.wait_tunnels(&["hub-a", "hub-b"]).await;
    let addr = SocketAddr::new(EDGE_IP, tier.edge_port);

    let load = Load::start(addr);
    load.run_for(50).await;
    for i in 0..hubs.len() {
        // One long transfer on each tunnel, placed while the load is paused: with no other
        // stream open, new streams go to the least loaded tunnel, so the second goes to the
        // tunnel the first did not take.
        load.pause();
        let open = |sample: &'static str| {
            let edge = &edge;
            async move { edge.metric(sample).await }
        };
        eventually("the load's connections to finish", || async {
            (open("remoteingress_streams_active").await? == 0.0).then_some(())
        })
        .await;
        let first = tokio::spawn(long_transfer(addr));
        eventually("the first transfer to be open", || async {
            (open("remoteingress_streams_active").await? == 1.0).then_some(())
        })
        .await;
        let second = tokio::spawn(long_transfer(addr));
        eventually("a long transfer on each hub's tunnel", || async {
            let a = open("remoteingress_tunnel_streams_active{hub=\"hub-a\"}").await?;
            let b = open("remoteingress_tunnel_streams_active{hub=\"hub-b\"}").await?;
            (a == 1.0 && b == 1.0).then_some(())
        })
        .await;
        load.resume();
        let hub = stop_gracefully(hubs.remove(i)).await;
        assert!(
            first.await.unwrap(),
            "a transfer in flight survives the drain"
        );
        assert!(
            second.await.unwrap(),
            "a transfer in flight survives the drain"
        );
        hubs.insert(i, tier.start(hub).await);
        edge.wait_tunnels(&["hub-a", "hub-b"]).await;
        load.run_for(50).await;
    }
    let outcomes = load.finish().await;
    let failed = outcomes.iter().filter(|outcome| !outcome.ok).count();
    println!(
        "rolling restart of 2 hubs: {} connections, {failed} failed",
        outcomes.len()
    );
    assert_eq!(failed, 0, "no connection fails during a rolling restart");
}

/// Edges beside the measured one in the fleet test.
const FLEET: usize = 1_999;

/// A rolling restart as an orchestrator does it, trusting readiness alone: each restarted hub
/// reports ready only once the whole fleet (2,000 edges) is back on it, so the next hub is never
/// drained while an edge has no other tunnel; the measured edge's clients lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_waits_for_2000_edges_to_come_back_and_loses_no_connection() {
    let tier = Tier::new().await;
    let path = tier.dir.path().join("fleet-edges.json");
    let mut edges = vec![allowed("e1", &[(tier.edge_port, tier.target.addr.port())])];
    edges.extend((0..FLEET).map(|n| allowed(&format!("fleet-{n}"), &[])));
    let file = serde_json::json!({"generation": 1, "edges": edges});
    std::fs::write(&path, file.to_string()).unwrap();
    let mut hubs = vec![
        tier.hub("hub-a", path.clone()).await,
        tier.hub("hub-b", path).await,
    ];
    let edge = tier.edge(&hub_flags(&[&hubs[0], &hubs[1]], 2)).await;
    let mut fleet = Vec::with_capacity(FLEET);
    for n in 0..FLEET {
        let mut options = EdgeOptions::new(
            "127.0.0.1",
            hubs[0].spec.tunnel_port,
            &format!("fleet-{n}"),
            SECRET,
            HubTrust::Pin(tier.pin.clone()),
        );
        options.hubs = hubs
            .iter()
            .map(|hub| HubAddress::new("127.0.0.1", hub.spec.tunnel_port))
            .collect();
        options.hub_connections = 2;
        options.backoff.max = Duration::from_secs(2);
        options.firewall = remoteingress_edge::FirewallMode::Off;
        options.stun_servers.clear();
        fleet.push(Edge::start(options).await.unwrap());
    }
    let all = (FLEET + 1) as f64;
    for hub in &hubs {
        eventually_within(
            Duration::from_secs(60),
            &format!("the fleet on {}", hub.spec.id),
            || async {
                let connected = sample(hub.spec.metrics(), "remoteingress_edges_connected").await?;
                (connected == all).then_some(())
            },
        )
        .await;
    }
    edge.wait_tunnels(&["hub-a", "hub-b"]).await;
    let addr = SocketAddr::new(EDGE_IP, tier.edge_port);

    let load = Load::start(addr);
    load.run_for(50).await;
    for i in 0..hubs.len() {
        let hub = stop_gracefully(hubs.remove(i)).await;
        let id = hub.id.clone();
        // `start` returns once /readyz says ready: by then the fleet must be back.
        let restarted = tier.start(hub).await;
        let connected = sample(restarted.spec.metrics(), "remoteingress_edges_connected").await;
        assert_eq!(
            connected,
            Some(all),
            "{id} is ready only with every edge back"
        );
        hubs.insert(i, restarted);
        load.run_for(50).await;
    }
    let outcomes = load.finish().await;
    let failed = outcomes.iter().filter(|outcome| !outcome.ok).count();
    println!(
        "rolling restart of 2 hubs with {} edges: {} connections, {failed} failed",
        FLEET + 1,
        outcomes.len()
    );
    assert_eq!(failed, 0, "no connection fails during a rolling restart");
    for edge in fleet {
        edge.shutdown().await;
    }
}

/// A TCP relay that sends connection `n` to `backends[(n / 2) % len]`: the edge's first two
/// dials reach the same hub, so it must tell hubs apart by their id.
async fn pairwise_relay(backends: Vec<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::from((LOCALHOST, 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let backend = backends[(n / 2) % backends.len()];
            tokio::spawn(async move {
                if let Ok(mut upstream) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_load_balanced_address_leads_to_two_distinct_hubs() {
    let tier = Tier::new().await;
    let file = tier.edges_file("edges.json", 1, tier.edge_port);
    let a = tier.hub("hub-a", file.clone()).await;
    let b = tier.hub("hub-b", file).await;
    let relay = pairwise_relay(
        [&a, &b]
            .iter()
            .map(|hub| SocketAddr::from((LOCALHOST, hub.spec.tunnel_port)))
            .collect(),
    )
    .await;
    let edge = tier
        .edge(&[
            format!("--hub=127.0.0.1:{}", relay.port()),
            "--hub-connections=2".into(),
        ])
        .await;
    edge.wait_tunnels(&["hub-a", "hub-b"]).await;
    let data = pattern(10_000, 1);
    assert_eq!(
        round_trip(SocketAddr::new(EDGE_IP, tier.edge_port), &data).await,
        data
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hubs_that_disagree_are_reported_and_the_newest_generation_wins() {
    let tier = Tier::new().await;
    let (port_a, port_b) = (tier.edge_port, free_port(EDGE_IP));
    let a = tier
        .hub("hub-a", tier.edges_file("a.json", 5, port_a))
        .await;
    let edge = tier.edge(&hub_flags(&[&a], 1)).await;
    edge.wait_tunnels(&["hub-a"]).await;
    let b = tier
        .hub("hub-b", tier.edges_file("b.json", 5, port_b))
        .await;
    drop(edge);
    let edge = tier.edge(&hub_flags(&[&a, &b], 2)).await;
    edge.wait_tunnels(&["hub-a", "hub-b"]).await;
    eventually("the disagreement to be reported", || async {
        let disagreement = edge.metric("remoteingress_config_disagreement").await?;
        (disagreement == 1.0).then_some(())
    })
    .await;
    // Whichever came first stays; the other is not applied.
    let listening = |port: u16| listens((EDGE_IP, port));
    let (first, other) = eventually("one of the two configurations to run", || async {
        match (listening(port_a).await, listening(port_b).await) {
            (true, false) => Some((port_a, port_b)),
            (false, true) => Some((port_b, port_a)),
            (true, true) => panic!("both configurations run"),
            (false, false) => None,
        }
    })
    .await;
    assert!(listening(first).await && !listening(other).await);
    assert_eq!(
        edge.metric("remoteingress_config_generation").await,
        Some(5.0)
    );

    // Hub B's source moves on to generation 6: the edge follows it and the quarrel is over.
    tier.edges_file("b.json", 6, port_b);
    eventually("generation 6 to be applied", || async {
        let generation = edge.metric("remoteingress_config_generation").await?;
        (generation == 6.0 && listening(port_b).await).then_some(())
    })
    .await;
    eventually("the disagreement to clear", || async {
        let disagreement = edge.metric("remoteingress_config_disagreement").await?;
        (disagreement == 0.0).then_some(())
    })
    .await;
    assert!(
        !listening(port_a).await,
        "hub A's older configuration is not applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_of_the_original_protocol_is_never_sent_a_drain() {
    let state = tempfile::tempdir().unwrap();
    let hub = start_hub(state.path(), 0).await;
    let target = echo_target().await;
    hub.update_allowed_edges(vec![allowed("e1", &[(8080, target.addr.port())])])
        .await
        .unwrap();
    let mut edge = RawEdge::connect(&hub, "e1").await;
    let header = remoteingress_wire::proxy::ProxyV1::tcp(
        "203.0.113.9:5000".parse().unwrap(),
        "198.51.100.1:8080".parse().unwrap(),
    )
    .to_line();
    edge.send(&[
        (1, FrameType::Open, header.as_bytes()),
        (1, FrameType::Data, b"hello"),
    ])
    .await;
    edge.next_of(1, FrameType::DataBack).await;
    assert_eq!(
        hub.drain().await,
        0,
        "nothing is sent to an edge without DRAIN"
    );
    assert_eq!(
        hub.drain_pending(),
        1,
        "the drain waits for its open stream"
    );
    assert!(!hub.is_ready() && hub.status().draining);
    edge.send(&[(1, FrameType::Close, b"")]).await;
    loop {
        let frame = edge.next_frame().await.expect("the tunnel stays up");
        assert_ne!(
            frame.kind,
            FrameType::Drain,
            "an original edge never sees DRAIN"
        );
        if frame.kind == FrameType::CloseBack {
            break;
        }
    }
    eventually("the stream to end", || async {
        (hub.drain_pending() == 0).then_some(())
    })
    .await;
    hub.shutdown().await;
}

/// A drain also reaches the tunnels it could not ask when it began: one whose edge had not
/// confirmed its extensions yet, and one whose handshake was still under way. Neither holds the
/// drain up until its grace period ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_reaches_tunnels_that_could_not_be_asked_when_it_began() {
    let state = tempfile::tempdir().unwrap();
    let hub = start_hub(state.path(), 0).await;
    hub.update_allowed_edges(vec![allowed("e1", &[]), allowed("e2", &[])])
        .await
        .unwrap();
    let unconfirmed = RawEdge::connect(&hub, "e1").await;
    eventually("e1's tunnel to be registered", || async {
        (hub.status().connected_edges.len() == 1).then_some(())
    })
    .await;
    let handshaking = RawEdge::dial(&hub).await;
    assert_eq!(
        hub.drain().await,
        0,
        "no tunnel knew DRAIN when the drain began"
    );
    let late = RawEdge::authenticate(handshaking, "e2").await;
    let all = Extensions::ALL.to_payload();
    for mut edge in [unconfirmed, late] {
        edge.send(&[(0, FrameType::Extensions, &all)]).await;
        let frame = tokio::time::timeout(Duration::from_secs(20), edge.next_frame())
            .await
            .expect("DRAIN once the edge confirmed it")
            .expect("the tunnel stays up");
        assert_eq!(
            frame.kind,
            FrameType::Drain,
            "asked once it confirmed DRAIN"
        );
    }
    eventually("the drain to have nothing left to wait for", || async {
        (hub.drain_pending() == 0).then_some(())
    })
    .await;
    hub.shutdown().await;
}

/// A tunnel the edge retired as suspect, whose hub then drains it, closes once its streams
/// are done instead of waiting for a replacement that a draining hub does not give (which held
/// the hub's drain up until the edge's drain grace was over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspect_tunnel_that_its_hub_drains_closes_without_waiting_for_a_replacement() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let identity = remoteingress_tunnel::HubIdentity::load_or_generate(state.path()).unwrap();
    let listener = TcpListener::bind(SocketAddr::from((LOCALHOST, 0)))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config().unwrap());
    let (wake, woken) = tokio::sync::oneshot::channel::<()>();
    // A hub with one tunnel (it takes no other, as while draining) that stays silent until told,
    // then sends DRAIN and answers every PING until the edge closes the tunnel.
    let hub = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        drop(listener);
        let mut tls = acceptor.accept(tcp).await.unwrap();
        remoteingress_tunnel::line::read_line(&mut tls, 4096)
            .await
            .unwrap();
        let names = serde_json::to_string(&Extensions::ALL.names()).unwrap();
        let reply = format!("{{\"listenPorts\":[],\"hubId\":\"quiet\",\"extensions\":{names}}}\n");
        tls.write_all(reply.as_bytes()).await.unwrap();
        woken.await.unwrap();
        tls.write_all(&frames(&[(0, FrameType::Drain, b"")]))
            .await
            .unwrap();
        let mut decoder = remoteingress_wire::frame::FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => decoder.feed(&buf[..n]),
            }
            while let Some(frame) = decoder.next_frame().unwrap() {
                if frame.kind == FrameType::Ping {
                    let pong = frames(&[(0, FrameType::Pong, &frame.payload[..])]);
                    tls.write_all(&pong).await.unwrap();
                }
            }
        }
    });
    let mut options = EdgeOptions::new(
        "127.0.0.1",
        port,
        "e1",
        SECRET,
        HubTrust::Pin(identity.pin()),
    );
    options.bind_address = EDGE_IP;
    options.firewall = remoteingress_edge::FirewallMode::Off;
    options.stun_servers.clear();
    options.session.ping_interval = Duration::from_millis(200);
    options.session.idle_timeout = Duration::from_secs(5);
    options.drain_grace = Duration::from_secs(120);
    let edge = Edge::start(options).await.unwrap();
    eventually("the silent hub's tunnel to turn suspect", || async {
        let tunnels = edge.status().tunnels;
        tunnels
            .iter()
            .any(|tunnel| tunnel.state == TunnelState::Suspect)
            .then_some(())
    })
    .await;
    wake.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), hub)
        .await
        .expect("the edge closes the drained tunnel (its grace is two minutes)")
        .unwrap();
    edge.shutdown().await;
}

/// Two in-process hubs with one certificate, one edge with a tunnel to each (library level:
/// here the test can see which hub each stream reaches).
async fn a_drained_tunnel_finishes_its_streams_while_new_ones_go_elsewhere(
    transport: TransportMode,
) {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let target = echo_target().await;
    let edge_port = free_port(EDGE_IP);
    let hubs = [
        start_hub(state.path(), 0).await,
        start_hub(state.path(), 0).await,
    ];
    for hub in &hubs {
        hub.update_allowed_edges(vec![allowed("e1", &[(edge_port, target.addr.port())])])
            .await
            .unwrap();
    }
    let mut options = edge_options(&hubs[0], "e1", SECRET);
    options.hubs = hubs
        .iter()
        .map(|hub| HubAddress::new("127.0.0.1", hub.local_addr().port()))
        .collect();
    options.hub_connections = 2;
    options.transport = transport;
    let edge = Edge::start(options).await.unwrap();
    eventually("a tunnel to each hub", || async {
        (edge.status().tunnels.len() == 2).then_some(())
    })
    .await;
    wait_listening(&edge, edge_port).await;
    let addr = SocketAddr::new(EDGE_IP, edge_port);

    let mut open = TcpStream::connect(addr).await.unwrap();
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();
    let (drained, other) = if hubs[0].active_streams() == 1 {
        (&hubs[0], &hubs[1])
    } else {
        (&hubs[1], &hubs[0])
    };
    let drained_id = drained.status().hub_id;
    assert_eq!(
        drained.drain().await,
        1,
        "the edge's tunnel is asked to drain"
    );
    eventually("the edge to see the drain", || async {
        edge.status()
            .tunnels
            .iter()
            .any(|t| {
                t.hub_id.as_deref() == Some(drained_id.as_str()) && t.state == TunnelState::Draining
            })
            .then_some(())
    })
    .await;

    let mut events = other.subscribe();
    let mut edge_events = edge.subscribe();
    let data = pattern(5000, 2);
    assert_eq!(
        round_trip(addr, &data).await,
        data,
        "a new connection works"
    );
    let went_to = loop {
        if let EdgeEvent::ClientOpened {
            hub,
            edge_port: port,
            ..
        } = edge_events.recv().await.unwrap()
        {
            assert_eq!(port, edge_port);
            break hub;
        }
    };
    assert_eq!(
        went_to,
        other.status().hub_id,
        "the edge says which hub it chose"
    );
    let opened = loop {
        if let HubEvent::StreamOpened {
            client_addr,
            edge_port,
            target,
            ..
        } = events.recv().await.unwrap()
        {
            break (client_addr, edge_port, target);
        }
    };
    assert_eq!(
        opened.0.ip(),
        std::net::IpAddr::from(LOCALHOST),
        "the event names the client"
    );
    assert_eq!(opened.1, edge_port);
    assert_eq!(opened.2, format!("127.0.0.1:{}", target.addr.port()));
    assert_eq!(
        drained.active_streams(),
        1,
        "nothing new reached the draining hub"
    );

    open.write_all(b"after!").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!", "the open stream still flows");
    drop(open);
    eventually("the edge to close the drained tunnel", || async {
        drained.status().connected_edges.is_empty().then_some(())
    })
    .await;
    assert_eq!(drained.drain_pending(), 0);
    assert_eq!(round_trip(addr, &data).await, data);
    edge.shutdown().await;
}

/// The address the target listens on in the test's namespace; each hub namespace routes it
/// through its veth pair.
const TARGET_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 0, 1));
/// The address the edge listens on in the test's namespace: not loopback, since the edge's
/// tunnels no longer come from loopback and the hubs refuse loopback clients from elsewhere.
const PUBLIC_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 8, 0, 1));

/// Runs `test` on a runtime whose threads live in a new network namespace (loopback up, the
/// target's address on it): the edge, its clients and the target run there. The operator
/// tests do the same; creating namespaces needs root, as CI has.
fn in_private_network<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let thread = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("a private network namespace (these tests run as root, as CI does)");
        run(&[], "ip", &["link", "set", "lo", "up"]);
        for address in [TARGET_IP, PUBLIC_IP] {
            run(
                &[],
                "ip",
                &["addr", "add", &format!("{address}/32"), "dev", "lo"],
            );
        }
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap()
            .block_on(test());
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `program` with `args` under `wrapper` (a namespace's `nsenter`, or nothing).
fn run(wrapper: &[String], program: &str, args: &[&str]) {
    let mut command = Command::new(wrapper.first().map_or(program, String::as_str));
    if !wrapper.is_empty() {
        command.args(&wrapper[1..]).arg(program);
    }
    let status = command.args(args).status().unwrap();
    assert!(status.success(), "{program} {args:?}");
}

/// A hub's own network namespace, joined to the test's by a veth pair: the hub is 10.`n`.0.2,
/// the test's end 10.`n`.0.1. Its path can be blackholed with nftables: every packet on the
/// veth dropped both ways, so neither side ever sees a FIN or RST.
struct HubNetwork {
    /// Holds the namespace open.
    holder: Process,
    link: String,
    address: IpAddr,
}

impl HubNetwork {
    fn new(n: u8) -> Arc<Self> {
        let holder = Process(
            Command::new("unshare")
                .args(["-n", "sleep", "infinity"])
                .spawn()
                .expect("unshare (util-linux) runs"),
        );
        let pid = holder.0.id();
        let ours = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        while std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .as_ref()
            == Some(&ours)
        {
            std::thread::yield_now();
        }
        let network = Self {
            holder,
            link: format!("ri-hub{n}"),
            address: IpAddr::from([10, n, 0, 2]),
        };
        let ours = format!("ri-edge{n}");
        let theirs = &network.link;
        run(
            &[],
            "ip",
            &[
                "link",
                "add",
                &ours,
                "type",
                "veth",
                "peer",
                "name",
                theirs,
                "netns",
                &pid.to_string(),
            ],
        );
        run(
            &[],
            "ip",
            &["addr", "add", &format!("10.{n}.0.1/24"), "dev", &ours],
        );
        run(&[], "ip", &["link", "set", &ours, "up"]);
        let inside = network.wrapper();
        run(&inside, "ip", &["link", "set", "lo", "up"]);
        run(
            &inside,
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", network.address),
                "dev",
                theirs,
            ],
        );
        run(&inside, "ip", &["link", "set", theirs, "up"]);
        run(
            &inside,
            "ip",
            &[
                "route",
                "add",
                &format!("{TARGET_IP}/32"),
                "via",
                &format!("10.{n}.0.1"),
            ],
        );
        Arc::new(network)
    }

    /// The command prefix that runs a program inside.
    fn wrapper(&self) -> Vec<String> {
        ["nsenter", "-t", &self.holder.0.id().to_string(), "-n", "--"]
            .map(String::from)
            .to_vec()
    }

    /// Drops every packet on the path both ways, except the hub's metrics (`keep`), which the
    /// test reads.
    fn blackhole(&self, keep: u16) {
        let link = &self.link;
        let rules = format!(
            "table inet blackhole {{
               chain input {{ type filter hook input priority -300; iifname \"{link}\" tcp dport {keep} accept; iifname \"{link}\" drop; }}
               chain output {{ type filter hook output priority -300; oifname \"{link}\" tcp sport {keep} accept; oifname \"{link}\" drop; }}
             }}"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), rules).unwrap();
        run(
            &self.wrapper(),
            "nft",
            &["-f", &file.path().display().to_string()],
        );
    }

    /// Lets the path carry packets again.
    fn restore(&self) {
        run(
            &self.wrapper(),
            "nft",
            &["delete", "table", "inet", "blackhole"],
        );
    }
}

/// The value of one sample at a metrics endpoint, if it is there.
async fn sample(metrics: SocketAddr, name: &str) -> Option<f64> {
    TcpStream::connect(metrics).await.ok()?;
    let (_, body) = http_get(metrics, "/metrics").await;
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
}

/// Connects to `addr` and holds the connection open, echoing once first: a stream the hub
/// holds when its path goes dark.
async fn held_connection(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"held").await.unwrap();
    let mut echo = [0; 4];
    stream.read_exact(&mut echo).await.unwrap();
    stream
}

/// One hub of two loses its path without a word (real processes; each hub in a network
/// namespace of its own) while about 200 new connections per second go through the edge: no
/// new connection fails, the blackholed hub releases its side within the deadline, and the
/// edge is back on both hubs once the path returns.
async fn a_blackholed_hub_costs_no_connection(transport: &'static str) {
    let tier = Tier::with(TARGET_IP, PUBLIC_IP).await;
    let file = tier.edges_file("edges.json", 1, tier.edge_port);
    let dark = HubNetwork::new(1);
    let a = tier.hub_in("hub-a", file.clone(), Some(dark.clone())).await;
    let b = tier.hub_in("hub-b", file, Some(HubNetwork::new(2))).await;
    let mut flags = hub_flags(&[&a, &b], 2);
    flags.push(format!("--transport-mode={transport}"));
    let edge = tier.edge(&flags).await;
    edge.wait_tunnels(&["hub-a", "hub-b"]).await;
    let addr = SocketAddr::new(tier.edge_ip, tier.edge_port);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(held_connection(addr).await);
    }
    let streams_on_a = "remoteingress_streams_active{edge=\"e1\"}";
    eventually("hub-a to hold streams", || async {
        (sample(a.spec.metrics(), streams_on_a).await? > 0.0).then_some(())
    })
    .await;

    let load = Load::start(addr);
    load.run_for(100).await;
    let dark_since = Instant::now();
    dark.blackhole(a.spec.metrics_port);
    load.run_for(600).await;
    eventually("hub-a to release the silent edge", || async {
        let connected = sample(a.spec.metrics(), "remoteingress_edges_connected").await?;
        let streams = sample(a.spec.metrics(), streams_on_a).await.unwrap_or(0.0);
        (connected == 0.0 && streams == 0.0).then_some(())
    })
    .await;
    let released = dark_since.elapsed();
    dark.restore();
    edge.wait_tunnels(&["hub-a", "hub-b"]).await;
    let back = dark_since.elapsed();
    load.run_for(100).await;
    let outcomes = load.finish().await;

    let after: Vec<&Outcome> = outcomes
        .iter()
        .filter(|outcome| outcome.at >= dark_since)
        .collect();
    let failed = outcomes.iter().filter(|outcome| !outcome.ok).count();
    let slowest = after.iter().map(|outcome| outcome.took).max();
    let retried = edge.metric("remoteingress_opens_retried_total").await;
    println!(
        "{transport}, one of two hubs blackholed: {} connections ({} after), {failed} failed, \
         slowest after {slowest:?}, {retried:?} opens moved; hub released the edge after \
         {released:?}; edge on both hubs again {back:?} after the blackhole began",
        outcomes.len(),
        after.len(),
    );
    assert_eq!(failed, 0, "no new connection is lost to the silent hub");
}

#[test]
fn a_blackholed_hub_costs_no_connection_over_tls() {
    in_private_network(|| a_blackholed_hub_costs_no_connection("tcpTls"));
}

#[test]
fn a_blackholed_hub_costs_no_connection_over_quic() {
    in_private_network(|| a_blackholed_hub_costs_no_connection("quic"));
}
