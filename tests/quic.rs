//! What only the QUIC transport has: falling back to TLS. (Every other end-to-end test runs for
//! both transports; a lost UDP open is tested against a raw QUIC peer in the tunnel crate.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use common::*;
use remoteingress_bench::ready_now;
use remoteingress_edge::{Edge, EdgeOptions, HubAddress, Transport, TransportMode};
use remoteingress_hub::{Hub, HubHandle};
use remoteingress_tunnel::{quic, HubIdentity, HubTrust, Link, SessionOptions};

async fn fallback_lands_on(quic_enabled: bool) -> Transport {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let mut options = hub_options(0);
    options.quic = quic_enabled;
    let hub = start_hub_with(state.path(), options).await;
    let mut edge_options = edge_options(&hub, "e1", SECRET);
    edge_options.transport = TransportMode::QuicWithFallback;
    edge_options.quic_fallback_after = Duration::from_millis(500);
    transport_carrying_a_round_trip(hub, edge_options).await
}

/// Starts an edge `e1` with `options` towards `hub`, sends a round trip through it, and
/// returns the transport its tunnel uses (the hub agreeing); stops both.
async fn transport_carrying_a_round_trip(hub: HubHandle, options: EdgeOptions) -> Transport {
    let port = allow_e1_to_an_echo(&hub).await;
    let edge = Edge::start(options).await.unwrap();
    wait_listening(&edge, port).await;
    let data = pattern(20_000, 3);
    assert_eq!(
        round_trip(SocketAddr::new(EDGE_IP, port), &data).await,
        data
    );
    let transport = edge.status().transport.unwrap();
    assert_eq!(hub.status().connected_edges[0].transport, transport);
    edge.shutdown().await;
    hub.shutdown().await;
    transport
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fallback_an_edge_uses_quic_when_it_can_and_tls_when_it_cannot() {
    assert_eq!(fallback_lands_on(true).await, Transport::Quic);
    assert_eq!(fallback_lands_on(false).await, Transport::TcpTls);
}

/// A hub at an IPv6 address is reached over QUIC as over TLS (the edge's QUIC socket was
/// IPv4-only, so QUIC refused every IPv6 address, such as a `localhost` that resolves to ::1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_reaches_a_hub_at_an_ipv6_address_over_quic() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let mut options = hub_options(0);
    options.listen_addr = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0));
    let hub = start_hub_with(state.path(), options).await;
    let mut edge_options = edge_options(&hub, "e1", SECRET);
    edge_options.hubs = vec![HubAddress::new("::1", hub.local_addr().port())];
    edge_options.transport = TransportMode::Quic;
    assert_eq!(
        transport_carrying_a_round_trip(hub, edge_options).await,
        Transport::Quic
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_quic_share_one_unauthenticated_cap_that_evicts_the_oldest() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let identity = HubIdentity::load_or_generate(state.path()).unwrap();
    let mut options = hub_options(0);
    options.max_unauthenticated = 1;
    options.handshake_timeout = Duration::from_secs(120);
    let hub = Hub::start(options, &identity).await.unwrap();
    let port = hub.local_addr().port();
    let trust = HubTrust::Pin(hub.pin().to_owned());
    let quic_link = || async {
        let endpoint = quic::client_endpoint(&trust, &SessionOptions::default()).unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            Link::connect_quic(&endpoint, "127.0.0.1", port, "localhost"),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())
    };

    // A TCP connection that never starts TLS holds the only unauthenticated slot; QUIC gets in
    // by evicting it (with a cap per listener, both would simply be admitted).
    let mut silent = tokio::net::TcpStream::connect(hub.local_addr())
        .await
        .unwrap();
    eventually("QUIC gets in", || async {
        quic_link().await.ok().map(|_| ())
    })
    .await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf))
        .await
        .expect("the silent connection was evicted");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    hub.shutdown().await;
}

/// Initial packets sent from an address by someone who never answers (as a spoofer of that
/// address cannot) are answered with a Retry and charged to nobody: no slot is taken, no
/// refusal counted, and a real edge connecting from that address gets in at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_initials_from_an_edges_address_never_lock_it_out() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let options = hub_options(0);
    let registry = options.registry.clone();
    let hub = start_hub_with(state.path(), options).await;
    let hub_addr = SocketAddr::from(([127, 0, 0, 1], hub.local_addr().port()));

    // Real Initials, each of a new connection attempt, caught on a socket of ours.
    let catcher = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let trust = HubTrust::Pin(hub.pin().to_owned());
    let client = quic::client_endpoint(&trust, &SessionOptions::default()).unwrap();
    let mut initials = Vec::new();
    let mut attempts = Vec::new();
    while initials.len() < 40 {
        attempts.push(
            client
                .connect(catcher.local_addr().unwrap(), "localhost")
                .unwrap(),
        );
        let mut buf = vec![0u8; 2048];
        let len = tokio::time::timeout(Duration::from_secs(10), catcher.recv(&mut buf))
            .await
            .expect("an Initial")
            .unwrap();
        buf.truncate(len);
        initials.push(buf);
    }
    // Replayed to the hub from the address edges connect from, never answering.
    let spoofer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for initial in &initials {
        spoofer.send_to(initial, hub_addr).await.unwrap();
    }

    let edge_port = free_port(EDGE_IP);
    let target = echo_target().await;
    hub.update_allowed_edges(vec![allowed("e1", &[(edge_port, target.addr.port())])])
        .await
        .unwrap();
    let mut options = edge_options(&hub, "e1", SECRET);
    options.transport = TransportMode::Quic;
    let edge = Edge::start(options).await.unwrap();
    wait_listening(&edge, edge_port).await;
    for reason in ["limit", "rate_limited", "timeout", "evicted"] {
        let charged = metric(
            &registry,
            "remoteingress_auth_failures_total",
            &[("reason", reason)],
        );
        assert_eq!(charged.unwrap_or(0.0), 0.0, "{reason}");
    }
    drop(attempts);
    edge.shutdown().await;
}

/// Until it has authenticated, a QUIC peer may open only the control stream, and the hub takes
/// no more than a small window of its data. (The limits it gets once authenticated are the
/// session's, which every QUIC test uses.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_quic_peer_gets_one_stream_and_a_small_window() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let hub = start_hub_with(state.path(), hub_options(0)).await;
    let trust = HubTrust::Pin(hub.pin().to_owned());
    let endpoint = quic::client_endpoint(&trust, &SessionOptions::default()).unwrap();
    let link = Link::connect_quic(&endpoint, "127.0.0.1", hub.local_addr().port(), "localhost")
        .await
        .unwrap();
    let Link::Quic {
        connection,
        mut send,
        ..
    } = link
    else {
        panic!("not a QUIC link")
    };
    assert!(
        ready_now(connection.open_bi()).is_none(),
        "a second stream was allowed before authentication"
    );
    // The hub has read nothing yet: what it lets us send is the window it gave in the handshake.
    let offered = vec![b'x'; 1024 * 1024];
    let taken = ready_now(send.write(&offered))
        .expect("some credit at once")
        .unwrap();
    assert!(
        taken <= quic::UNAUTHENTICATED_WINDOW as usize,
        "{taken} bytes sent before authentication"
    );
    hub.shutdown().await;
}

/// Allows edge `e1` on a free edge port that leads to an echo target; that port.
async fn allow_e1_to_an_echo(hub: &HubHandle) -> u16 {
    let port = free_port(EDGE_IP);
    hub.update_allowed_edges(vec![allowed(
        "e1",
        &[(port, echo_target().await.addr.port())],
    )])
    .await
    .unwrap();
    port
}

/// Datagrams waiting on `socket` now.
fn drain(socket: &std::net::UdpSocket) -> usize {
    let mut buf = [0u8; 2048];
    std::iter::from_fn(|| socket.recv(&mut buf).ok()).count()
}

/// On a path where QUIC does not get through, an edge that fell back to TLS reconnects over TLS
/// at once, without another QUIC attempt (and its fallback delay), until QUIC is worth a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_fallback_reconnects_go_straight_to_tls() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let hub_port = free_port([127, 0, 0, 1].into());
    // What QUIC sends to the hub's port lands here, unanswered: UDP is blocked.
    let udp = std::net::UdpSocket::bind(("127.0.0.1", hub_port)).unwrap();
    udp.set_nonblocking(true).unwrap();
    let mut options = hub_options(hub_port);
    options.quic = false;
    let hub = start_hub_with(state.path(), options).await;
    let port = allow_e1_to_an_echo(&hub).await;
    let mut options = edge_options(&hub, "e1", SECRET);
    options.transport = TransportMode::QuicWithFallback;
    options.quic_fallback_after = Duration::from_millis(500);
    let edge = Edge::start(options).await.unwrap();
    wait_listening(&edge, port).await;
    assert!(drain(&udp) > 0, "the first attempt tried QUIC");

    let mut events = hub.subscribe();
    assert!(hub.disconnect_edge("e1"));
    let reconnected = async {
        while !matches!(
            events.recv().await,
            Ok(remoteingress_hub::HubEvent::EdgeConnected { .. })
        ) {}
    };
    tokio::time::timeout(Duration::from_secs(20), reconnected)
        .await
        .expect("the edge reconnects");
    eventually("the edge is back over TLS", || async {
        (edge.status().transport == Some(Transport::TcpTls)).then_some(())
    })
    .await;
    assert_eq!(drain(&udp), 0, "the reconnect tried QUIC again");
    edge.shutdown().await;
    hub.shutdown().await;
}

/// A relay on one port for TCP and UDP in front of the hub's tunnel port; its UDP can be
/// blocked (datagrams dropped both ways) and opened again. It serves one edge.
struct PathToHub {
    port: u16,
    udp_blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl PathToHub {
    async fn start(hub: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let port = free_port([127, 0, 0, 1].into());
        let tcp = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        tokio::spawn(async move {
            while let Ok((mut edge, _)) = tcp.accept().await {
                tokio::spawn(async move {
                    let mut hub = tokio::net::TcpStream::connect(hub).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut edge, &mut hub).await;
                });
            }
        });
        let udp_blocked = Arc::new(AtomicBool::new(true));
        let outside = Arc::new(
            tokio::net::UdpSocket::bind(("127.0.0.1", port))
                .await
                .unwrap(),
        );
        let inside = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        inside.connect(hub).await.unwrap();
        let edge: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (blocked, from_edge, to_hub, last) = (
            udp_blocked.clone(),
            outside.clone(),
            inside.clone(),
            edge.clone(),
        );
        tokio::spawn(async move {
            let mut buf = vec![0; 65_536];
            while let Ok((n, from)) = from_edge.recv_from(&mut buf).await {
                *last.lock().unwrap() = Some(from);
                if !blocked.load(Ordering::Relaxed) {
                    let _ = to_hub.send(&buf[..n]).await;
                }
            }
        });
        let blocked = udp_blocked.clone();
        tokio::spawn(async move {
            let mut buf = vec![0; 65_536];
            while let Ok(n) = inside.recv(&mut buf).await {
                let to = *edge.lock().unwrap();
                if let (Some(to), false) = (to, blocked.load(Ordering::Relaxed)) {
                    let _ = outside.send_to(&buf[..n], to).await;
                }
            }
        });
        Self { port, udp_blocked }
    }

    fn open_udp(&self) {
        self.udp_blocked
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_fallback_the_edge_returns_to_quic_once_the_path_carries_udp_again() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let hub = start_hub_with(state.path(), hub_options(0)).await;
    let port = allow_e1_to_an_echo(&hub).await;
    let path = PathToHub::start(hub.local_addr()).await;
    let mut options = edge_options(&hub, "e1", SECRET);
    options.hubs = vec![remoteingress_edge::HubAddress::new("127.0.0.1", path.port)];
    options.transport = TransportMode::QuicWithFallback;
    options.quic_fallback_after = Duration::from_millis(500);
    options.quic_retry_after = Duration::from_millis(300);
    let edge = Edge::start(options).await.unwrap();
    wait_listening(&edge, port).await;
    assert_eq!(edge.status().transport, Some(Transport::TcpTls));

    path.open_udp();
    eventually("the edge to be back on QUIC", || async {
        (edge.status().transport == Some(Transport::Quic)).then_some(())
    })
    .await;
    let data = pattern(20_000, 5);
    assert_eq!(
        round_trip(SocketAddr::new(EDGE_IP, port), &data).await,
        data
    );
    edge.shutdown().await;
    hub.shutdown().await;
}
