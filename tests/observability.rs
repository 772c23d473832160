//! Metrics, health endpoints and graceful shutdown: the metrics move when things happen, a real
//! Prometheus scrapes them, promtool accepts them, and SIGTERM lets open connections finish.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use prometheus::Registry;
use remoteingress_controlplane::serve_metrics;
use remoteingress_edge::Edge;
use remoteingress_hub::Hub;
use remoteingress_tunnel::HubIdentity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The value of the first sample of `name` carrying all `labels` (0 if absent), read from the
/// text exposition as a scraper would. Histograms answer with their sample count.
fn sample(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus::Encoder;
    let mut text = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .unwrap();
    let text = String::from_utf8(text).unwrap();
    let count = format!("{name}_count");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name || metric == count).then_some((series, value))
        })
        .find(|(series, _)| {
            labels
                .iter()
                .all(|(key, value)| series.contains(&format!("{key}=\"{value}\"")))
        })
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_metric_moves_when_its_event_happens() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let identity = HubIdentity::load_or_generate(state.path()).unwrap();
    let hub_registry = Registry::new();
    let mut options = hub_options(0);
    options.registry = hub_registry.clone();
    options.udp_max_sessions = 0;
    let hub = Hub::start(options, &identity).await.unwrap();
    let target = echo_target().await;
    let port = free_port(EDGE_IP);
    let udp_port = std::net::UdpSocket::bind((EDGE_IP, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut edge_entry = allowed("e1", &[(port, target.addr.port())]);
    edge_entry.config.listen_ports_udp = vec![udp_port];
    hub.update_allowed_edges(vec![edge_entry.clone()])
        .await
        .unwrap();

    let edge_registry = Registry::new();
    let mut options = edge_options(&hub, "e1", SECRET);
    options.registry = edge_registry.clone();
    let edge = Edge::start(options).await.unwrap();
    wait_listening(&edge, port).await;
    let h = |name, labels: &[(&str, &str)]| sample(&hub_registry, name, labels);
    let e = |name, labels: &[(&str, &str)]| sample(&edge_registry, name, labels);
    // The edge has its ports from the handshake's reply, possibly before the hub has counted it.
    eventually("the hub to count the edge", || async {
        let connected = h("remoteingress_edges_connected", &[]);
        let accepted = h(
            "remoteingress_edge_connections_total",
            &[("edge", "e1"), ("result", "ok")],
        );
        (connected == 1.0 && accepted == 1.0).then_some(())
    })
    .await;
    assert_eq!(e("remoteingress_tunnel_connected", &[]), 1.0);

    // A stream: opened, bytes counted both ways, closed.
    let data = pattern(100_000, 1);
    assert_eq!(
        round_trip(SocketAddr::new(EDGE_IP, port), &data).await,
        data
    );
    eventually("the stream to close", || async {
        (h("remoteingress_streams_active", &[("edge", "e1")]) == 0.0).then_some(())
    })
    .await;
    assert_eq!(
        h("remoteingress_streams_opened_total", &[("edge", "e1")]),
        1.0
    );
    assert!(
        h(
            "remoteingress_tunnel_bytes_total",
            &[("edge", "e1"), ("direction", "in")]
        ) >= 100_000.0
    );
    assert!(
        h(
            "remoteingress_tunnel_bytes_total",
            &[("edge", "e1"), ("direction", "out")]
        ) >= 100_000.0
    );
    assert_eq!(h("remoteingress_target_connect_duration_seconds", &[]), 1.0);
    assert!(e("remoteingress_bytes_total", &[("direction", "out")]) >= 100_000.0);
    let port_label = port.to_string();
    assert_eq!(
        e(
            "remoteingress_client_connections_total",
            &[("port", &port_label), ("protocol", "tcp")]
        ),
        1.0
    );

    // A target that refuses.
    let closed = free_port("127.0.0.1".parse().unwrap());
    let refused_port = free_port(EDGE_IP);
    let mut with_refused = edge_entry.clone();
    with_refused.config.listen_ports.push(refused_port);
    with_refused.targets.ports.insert(refused_port, closed);
    hub.upsert_edge(with_refused).await.unwrap();
    // The write returns once it is live and persisted; the tunnel's pusher sends it.
    eventually("the push to be counted", || async {
        (h("remoteingress_config_pushes_total", &[("edge", "e1")]) == 1.0).then_some(())
    })
    .await;
    wait_listening(&edge, refused_port).await;
    // The refused connect aborts the stream: the client's connection is reset.
    let ended = exchange_until_end(SocketAddr::new(EDGE_IP, refused_port), b"x").await;
    assert_eq!(
        ended.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    eventually("the connect error to be counted", || async {
        (h(
            "remoteingress_target_connect_errors_total",
            &[("edge", "e1")],
        ) == 1.0)
            .then_some(())
    })
    .await;

    // A UDP session past the hub's cap of zero.
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(b"hello", (EDGE_IP, udp_port)).await.unwrap();
    eventually("the UDP drop to be counted", || async {
        let labels = [("edge", "e1"), ("reason", "edge_session_limit")];
        (h("remoteingress_udp_dropped_total", &labels) == 1.0).then_some(())
    })
    .await;

    // An authentication failure.
    let intruder = Edge::start(edge_options(&hub, "e1", "wrong-secret"))
        .await
        .unwrap();
    eventually("the auth failure to be counted", || async {
        (h(
            "remoteingress_auth_failures_total",
            &[("reason", "bad_credentials")],
        ) >= 1.0)
            .then_some(())
    })
    .await;
    intruder.shutdown().await;

    // Round trips: measured by the hub, and passed to the edge in the next PING.
    eventually("both sides to know the round trip", || async {
        let hub_rtt = h("remoteingress_tunnel_rtt_seconds", &[("edge", "e1")]);
        let edge_rtt = e("remoteingress_tunnel_rtt_seconds", &[]);
        (hub_rtt > 0.0 && edge_rtt > 0.0).then_some(())
    })
    .await;

    // A reconnect.
    assert!(hub.disconnect_edge("e1"));
    eventually("the edge to reconnect", || async {
        (e("remoteingress_tunnel_reconnects_total", &[]) == 1.0 && edge.status().connected)
            .then_some(())
    })
    .await;
    assert!(
        h(
            "remoteingress_tunnel_bytes_total",
            &[("edge", "e1"), ("direction", "in")]
        ) >= 100_000.0,
        "counters keep the traffic of ended tunnels"
    );
    edge.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_tunnel() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let hub_port = free_port("127.0.0.1".parse().unwrap());
    // The edge starts before its hub exists.
    let edge_registry = Registry::new();
    let mut options = remoteingress_edge::EdgeOptions::new(
        "127.0.0.1",
        hub_port,
        "e1",
        SECRET,
        remoteingress_tunnel::HubTrust::Pin(
            HubIdentity::load_or_generate(state.path()).unwrap().pin(),
        ),
    );
    options.bind_address = EDGE_IP;
    options.backoff.min = Duration::from_millis(50);
    options.backoff.max = Duration::from_millis(200);
    options.registry = edge_registry.clone();
    options.firewall = remoteingress_edge::FirewallMode::Off;
    options.stun_servers.clear();
    let edge = Edge::start(options).await.unwrap();
    let stop = CancellationToken::new();
    let ready_edge = edge.clone();
    let served = serve_metrics(
        edge_registry,
        "127.0.0.1:0".parse().unwrap(),
        std::sync::Arc::new(move || ready_edge.is_ready()),
        stop.clone(),
    )
    .await
    .unwrap();
    let addr = served.local_addr;
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    assert_eq!(http_get(addr, "/readyz").await.0, 503);

    let hub = start_hub(state.path(), hub_port).await;
    hub.update_allowed_edges(vec![allowed("e1", &[])])
        .await
        .unwrap();
    eventually("/readyz to turn ready", || async {
        (http_get(addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("remoteingress_build_info{version=\""),
        "{body}"
    );
    assert!(body.contains("process_resident_memory_bytes"), "{body}");
    stop.cancel();
    edge.shutdown().await;
}

fn binary(name: &str) -> String {
    which(name).unwrap_or_else(|| panic!("{name} is not installed: ./scripts/test installs it"))
}

fn which(name: &str) -> Option<String> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
        .iter()
        .map(|dir| format!("{dir}/{name}"))
        .find(|path| std::path::Path::new(path).exists())
}

/// A hub and an edge as processes, with an echo target; returns their metrics addresses.
struct Deployment {
    _state: tempfile::TempDir,
    hub: Process,
    edge: Process,
    hub_metrics: SocketAddr,
    edge_metrics: SocketAddr,
    edge_port: u16,
    _target: EchoTarget,
}

async fn deploy(edge_extra: &[&str]) -> Deployment {
    let state = tempfile::tempdir().unwrap();
    let localhost = "127.0.0.1".parse().unwrap();
    let target = echo_target().await;
    let edge_port = free_port(EDGE_IP);
    let edges =
        serde_json::to_string(&vec![allowed("e1", &[(edge_port, target.addr.port())])]).unwrap();
    let edges_file = state.path().join("edges.json");
    std::fs::write(&edges_file, edges).unwrap();
    let tunnel = free_port(localhost);
    let (hub_metrics, edge_metrics) = (free_port(localhost), free_port(localhost));
    let dir = state.path().display();
    let hub = spawn_binary(
        &[
            "hub".into(),
            "--listen-address=127.0.0.1".into(),
            format!("--tunnel-port={tunnel}"),
            format!("--admin-addr=127.0.0.1:{}", free_port(localhost)),
            format!("--metrics-addr=127.0.0.1:{hub_metrics}"),
            format!("--state-dir={dir}"),
            format!("--edges-file={}", edges_file.display()),
        ],
        &[],
    );
    wait_port(hub_metrics).await;
    let mut args: Vec<String> = vec![
        "edge".into(),
        "--hub-host=127.0.0.1".into(),
        format!("--hub-port={tunnel}"),
        "--edge-id=e1".into(),
        format!("--secret={SECRET}"),
        "--insecure".into(),
        format!("--bind-address={EDGE_IP}"),
        format!("--status-addr=127.0.0.1:{}", free_port(localhost)),
        format!("--metrics-addr=127.0.0.1:{edge_metrics}"),
        "--firewall=off".into(),
        "--no-stun".into(),
    ];
    args.extend(edge_extra.iter().map(|a| a.to_string()));
    let edge = spawn_binary(&args, &[]);
    let edge_metrics = SocketAddr::from(([127, 0, 0, 1], edge_metrics));
    eventually("the edge to be ready", || async {
        match TcpStream::connect(edge_metrics).await {
            Ok(_) => (http_get(edge_metrics, "/readyz").await.0 == 200).then_some(()),
            Err(_) => None,
        }
    })
    .await;
    eventually("the edge port", || async {
        TcpStream::connect((EDGE_IP, edge_port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    Deployment {
        _state: state,
        hub,
        edge,
        hub_metrics: SocketAddr::from(([127, 0, 0, 1], hub_metrics)),
        edge_metrics,
        edge_port,
        _target: target,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_hub_and_edge_and_promtool_agrees() {
    let deployment = deploy(&[]).await;
    for addr in [deployment.hub_metrics, deployment.edge_metrics] {
        let (_, body) = http_get(addr, "/metrics").await;
        let check = Command::new(binary("promtool"))
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .output_with_stdin(body.as_bytes());
        assert!(
            check.status.success(),
            "promtool on {addr}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }

    let sent = 3_000_000usize;
    let data = pattern(sent, 7);
    assert_eq!(
        round_trip(SocketAddr::new(EDGE_IP, deployment.edge_port), &data).await,
        data
    );

    let dir = tempfile::tempdir().unwrap();
    let prometheus_port = free_port("127.0.0.1".parse().unwrap());
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: remoteingress\n    static_configs:\n      - targets: ['{}', '{}']\n",
            deployment.hub_metrics, deployment.edge_metrics
        ),
    )
    .unwrap();
    let _prometheus = Process(
        Command::new(binary("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let api = SocketAddr::from(([127, 0, 0, 1], prometheus_port));
    let query = |q: &str| format!("/api/v1/query?query={q}");
    let value = |body: &str| -> Vec<f64> {
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        json["data"]["result"]
            .as_array()
            .map(|results| {
                results
                    .iter()
                    .filter_map(|r| r["value"][1].as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    eventually("both targets to be up in Prometheus", || async {
        if TcpStream::connect(api).await.is_err() {
            return None;
        }
        let (_, body) = http_get(api, &query("up")).await;
        let up = value(&body);
        (up.len() == 2 && up.iter().all(|v| *v == 1.0)).then_some(())
    })
    .await;
    eventually("the tunnelled bytes in Prometheus", || async {
        let q = query("remoteingress_tunnel_bytes_total%7Bdirection%3D%22in%22%7D");
        let (_, body) = http_get(api, &q).await;
        value(&body)
            .first()
            .is_some_and(|v| *v >= sent as f64)
            .then_some(())
    })
    .await;
}

/// Feeds `input` to a child's stdin and collects its output.
trait OutputWithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output;
}

impl OutputWithStdin for Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output {
        use std::io::Write;
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_open_connection_finish() {
    let mut deployment = deploy(&["--shutdown-grace-secs=20"]).await;
    let mut open = TcpStream::connect((EDGE_IP, deployment.edge_port))
        .await
        .unwrap();
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();

    let pid = deployment.edge.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    eventually("new connections to be refused", || async {
        TcpStream::connect((EDGE_IP, deployment.edge_port))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    open.write_all(b"after!").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(
        &buf, b"after!",
        "the open connection still works while draining"
    );
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.unwrap();
    drop(open);

    let status = eventually("the edge to exit", || {
        let status = deployment.edge.0.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(status.success(), "{status:?}");
    drop(deployment.hub);
}

/// A supervisor (the npm package) keeps the binary's standard input open to stop it when the
/// supervisor dies; SIGTERM must still end it, not leave it waiting on that input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_a_hub_whose_standard_input_stays_open() {
    let state = tempfile::tempdir().unwrap();
    let localhost = "127.0.0.1".parse().unwrap();
    let metrics = free_port(localhost);
    let mut hub = Command::new(env!("CARGO_BIN_EXE_remoteingress"))
        .args([
            "hub".to_owned(),
            "--tunnel-port=0".into(),
            "--admin-addr=127.0.0.1:0".into(),
            format!("--metrics-addr=127.0.0.1:{metrics}"),
            format!("--state-dir={}", state.path().display()),
            "--exit-on-stdin-close".into(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _input = hub.stdin.take();
    wait_port(metrics).await;
    assert!(Command::new("kill")
        .args(["-TERM", &hub.id().to_string()])
        .status()
        .unwrap()
        .success());
    let exited = eventually("the hub to exit", || {
        let status = hub.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(exited.success(), "{exited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_json_and_never_carry_secrets() {
    let state = tempfile::tempdir().unwrap();
    let localhost = "127.0.0.1".parse().unwrap();
    let secret = "sup3r-s3cret-value";
    let edges_file = state.path().join("edges.json");
    let mut entry = allowed("e1", &[]);
    entry.secret = secret.into();
    std::fs::write(&edges_file, serde_json::to_string(&vec![entry]).unwrap()).unwrap();
    let (tunnel, metrics) = (free_port(localhost), free_port(localhost));
    let log = state.path().join("hub.log");
    let hub = Process(
        Command::new(env!("CARGO_BIN_EXE_remoteingress"))
            .args(["--log-format", "json", "--log-level", "debug", "hub"])
            .arg("--listen-address=127.0.0.1")
            .arg(format!("--tunnel-port={tunnel}"))
            .arg(format!("--admin-addr=127.0.0.1:{}", free_port(localhost)))
            .arg(format!("--metrics-addr=127.0.0.1:{metrics}"))
            .arg(format!("--state-dir={}", state.path().display()))
            .arg(format!("--edges-file={}", edges_file.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_port(metrics).await;
    let pin = HubIdentity::load_or_generate(state.path()).unwrap().pin();
    // One edge with the right secret, one with a wrong one.
    for given in [secret, "wr0ng-s3cret-value"] {
        let mut options = remoteingress_edge::EdgeOptions::new(
            "127.0.0.1",
            tunnel,
            "e1",
            given,
            remoteingress_tunnel::HubTrust::Pin(pin.clone()),
        );
        options.firewall = remoteingress_edge::FirewallMode::Off;
        options.stun_servers.clear();
        let edge = Edge::start(options).await.unwrap();
        eventually("the hub to log the attempt", || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let wanted = if given == secret {
                "edge connected"
            } else {
                "authentication failed"
            };
            text.contains(wanted).then_some(())
        })
        .await;
        edge.shutdown().await;
    }
    drop(hub);
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            parsed["level"].is_string() && parsed["fields"].is_object(),
            "{line}"
        );
    }
    assert!(
        !text.contains(secret) && !text.contains("wr0ng-s3cret-value"),
        "a secret was logged"
    );
}
