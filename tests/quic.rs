//! What only the QUIC transport has: falling back to TLS, and surviving a lost UDP open.
//! (Every other end-to-end test runs for both transports.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use remoteingress_edge::{Edge, TransportMode};
use remoteingress_hub::{AllowedEdge, Hub};
use remoteingress_tunnel::HubIdentity;
use tokio::net::UdpSocket;

async fn fallback_lands_on(quic_enabled: bool) -> &'static str {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let identity = HubIdentity::load_or_generate(state.path()).unwrap();
    let mut options = hub_options(0);
    options.quic = quic_enabled;
    let hub = Hub::start(options, &identity).await.unwrap();
    let target = echo_target().await;
    let port = free_port(EDGE_IP);
    hub.update_allowed_edges(vec![allowed("e1", &[(port, target.addr.port())])])
        .await
        .unwrap();
    let mut edge_options = edge_options(&hub, "e1", SECRET);
    edge_options.transport = TransportMode::QuicWithFallback;
    edge_options.quic_fallback_after = Duration::from_millis(500);
    let edge = Edge::start(edge_options).await.unwrap();
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
    assert_eq!(fallback_lands_on(true).await, "quic");
    assert_eq!(fallback_lands_on(false).await, "tcpTls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_udp_open_does_not_black_hole_the_session() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let identity = HubIdentity::load_or_generate(state.path()).unwrap();
    let mut options = hub_options(0);
    // The edge announces a new session twice (at open, and again with its first datagram):
    // losing both loses the first datagram.
    options.session.drop_first_udp_opens = 2;
    let hub = Hub::start(options, &identity).await.unwrap();
    let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let port = std::net::UdpSocket::bind((EDGE_IP, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut entry = AllowedEdge::new("e1", SECRET, Vec::new());
    entry.config.listen_ports_udp = vec![port];
    entry.target_ports = BTreeMap::from([(port, target_addr.port())]);
    hub.update_allowed_edges(vec![entry]).await.unwrap();
    let mut edge_options = edge_options(&hub, "e1", SECRET);
    edge_options.transport = TransportMode::Quic;
    let edge = Edge::start(edge_options).await.unwrap();
    eventually("the UDP port", || async {
        edge.status().listen_ports_udp.contains(&port).then_some(())
    })
    .await;

    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let edge_addr = SocketAddr::new(EDGE_IP, port);
    // The first datagram's open is lost, and its data with it.
    client.send_to(b"first", edge_addr).await.unwrap();
    // The next datagram repeats the open: the session starts and the data arrives.
    client.send_to(b"second", edge_addr).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let mut received = Vec::new();
    while received.len() < 2 {
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), target.recv_from(&mut buf))
            .await
            .expect("the session reaches the target")
            .unwrap();
        received.push(buf[..n].to_vec());
    }
    let (header, _) = remoteingress_wire::proxy::ProxyV2::parse(&received[0])
        .unwrap()
        .unwrap();
    assert_eq!(
        header.addresses.unwrap().source,
        client.local_addr().unwrap()
    );
    assert_eq!(received[1], b"second");
    edge.shutdown().await;
}
