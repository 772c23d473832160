//! End-to-end tests of UDP tunnelling over TLS: real UDP sockets on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

for_each_transport!(
    each_client_gets_its_own_replies_and_the_target_sees_its_address,
    datagrams_of_every_size_arrive_whole,
    a_dns_query_is_answered_through_the_tunnel,
    idle_sessions_end_on_both_sides_and_a_new_datagram_starts_afresh,
    udp_ports_change_live_without_touching_others,
    sessions_past_the_cap_are_dropped_and_counted,
    a_spray_is_capped_per_edge_and_for_the_hub_and_tcp_keeps_working,
);

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use remoteingress_edge::{Edge, EdgeHandle, TransportMode};
use remoteingress_hub::{AllowedEdge, Hub, HubHandle};
use remoteingress_tunnel::HubIdentity;
use remoteingress_wire::proxy::{ProxyV2, V2Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A UDP target behind the hub: the first datagram from each hub socket is a PROXY v2 header
/// (recorded raw), every later one is answered by `answer`.
struct UdpTarget {
    addr: SocketAddr,
    headers: Arc<Mutex<Vec<Vec<u8>>>>,
}

async fn udp_target(answer: fn(&[u8]) -> Vec<u8>) -> UdpTarget {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let headers = Arc::new(Mutex::new(Vec::new()));
    let seen = headers.clone();
    tokio::spawn(async move {
        let mut known = std::collections::HashSet::new();
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if known.insert(from) {
                seen.lock().unwrap().push(buf[..n].to_vec());
            } else {
                let _ = socket.send_to(&answer(&buf[..n]), from).await;
            }
        }
    });
    UdpTarget { addr, headers }
}

fn echo(datagram: &[u8]) -> Vec<u8> {
    datagram.to_vec()
}

struct UdpSetup {
    _state: tempfile::TempDir,
    hub: HubHandle,
    edge: EdgeHandle,
    edge_metrics: prometheus::Registry,
    target: UdpTarget,
    port: u16,
}

impl UdpSetup {
    async fn new(
        transport: TransportMode,
        answer: fn(&[u8]) -> Vec<u8>,
        idle: Duration,
        max_sessions: usize,
    ) -> Self {
        init_logs();
        let state = tempfile::tempdir().unwrap();
        let identity = HubIdentity::load_or_generate(state.path()).unwrap();
        let mut options = hub_options(0);
        options.udp_idle_timeout = idle;
        let hub = Hub::start(options, &identity).await.unwrap();
        let target = udp_target(answer).await;
        let port = free_udp_port();
        hub.update_allowed_edges(vec![udp_edge(&[(port, target.addr.port())])])
            .await
            .unwrap();
        let mut edge_options = edge_options(&hub, "e1", SECRET);
        edge_options.udp_idle_timeout = idle;
        edge_options.udp_max_sessions = max_sessions;
        edge_options.transport = transport;
        let edge_metrics = edge_options.registry.clone();
        let edge = Edge::start(edge_options).await.unwrap();
        eventually("the UDP port", || async {
            edge.status().listen_ports_udp.contains(&port).then_some(())
        })
        .await;
        Self {
            _state: state,
            hub,
            edge,
            edge_metrics,
            target,
            port,
        }
    }

    fn edge_addr(&self) -> SocketAddr {
        SocketAddr::new(EDGE_IP, self.port)
    }
}

fn udp_edge(ports: &[(u16, u16)]) -> AllowedEdge {
    udp_edge_named("e1", ports)
}

fn udp_edge_named(id: &str, ports: &[(u16, u16)]) -> AllowedEdge {
    let mut edge = AllowedEdge::new(id, SECRET, Vec::new());
    edge.config.listen_ports_udp = ports.iter().map(|(p, _)| *p).collect();
    edge.targets.ports = ports.iter().copied().collect::<BTreeMap<_, _>>();
    edge
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind((EDGE_IP, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends `data` from `socket` to `to` and returns the reply.
async fn exchange(socket: &UdpSocket, to: SocketAddr, data: &[u8]) -> Vec<u8> {
    socket.send_to(data, to).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let (n, from) = tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buf))
        .await
        .expect("a reply")
        .unwrap();
    assert_eq!(
        from, to,
        "the reply comes from the address the client wrote to"
    );
    buf.truncate(n);
    buf
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

async fn each_client_gets_its_own_replies_and_the_target_sees_its_address(
    transport: TransportMode,
) {
    let setup = UdpSetup::new(transport, echo, Duration::from_secs(60), 1000).await;
    let clients = [client().await, client().await, client().await];
    for round in 0..3 {
        for (i, socket) in clients.iter().enumerate() {
            let message = format!("client {i} round {round}");
            assert_eq!(
                exchange(socket, setup.edge_addr(), message.as_bytes()).await,
                message.as_bytes()
            );
        }
    }
    let headers = setup.target.headers.lock().unwrap().clone();
    assert_eq!(headers.len(), 3, "one session per client");
    for (socket, raw) in clients.iter().zip(&headers) {
        let (ours, _) = ProxyV2::parse(raw).unwrap().unwrap();
        let addresses = ours.addresses.unwrap();
        assert_eq!(addresses.transport, V2Transport::Datagram);
        assert_eq!(addresses.source, socket.local_addr().unwrap());
        assert_eq!(addresses.destination, setup.edge_addr());
        // An independent parser agrees.
        let theirs = ppp::v2::Header::try_from(&raw[..]).unwrap();
        assert_eq!(theirs.protocol, ppp::v2::Protocol::Datagram);
        let ppp::v2::Addresses::IPv4(ip) = theirs.addresses else {
            panic!("expected IPv4 addresses");
        };
        assert_eq!(
            SocketAddr::from((ip.source_address, ip.source_port)),
            addresses.source
        );
        assert_eq!(
            SocketAddr::from((ip.destination_address, ip.destination_port)),
            setup.edge_addr()
        );
    }
    let status = setup.hub.status();
    assert_eq!(status.connected_edges[0].active_udp_sessions, 3);
}

async fn datagrams_of_every_size_arrive_whole(transport: TransportMode) {
    let setup = UdpSetup::new(transport, echo, Duration::from_secs(60), 1000).await;
    let socket = client().await;
    // QUIC datagrams must fit the path (about 1,200 bytes, more once MTU discovery has
    // probed): a larger one is dropped and counted, never truncated or split. TLS carries all.
    for len in [1usize, 1_000, 1400, 9000, 65_507] {
        let data = pattern(len, len as u64);
        if transport == TransportMode::Quic && len > 1_000 {
            let dropped = setup.edge.status().udp_dropped;
            socket.send_to(&data, setup.edge_addr()).await.unwrap();
            let mut buf = vec![0u8; 65_535];
            eventually(
                "the datagram to come back whole or be counted as dropped",
                || {
                    let reply = socket
                        .try_recv_from(&mut buf)
                        .ok()
                        .map(|(n, _)| buf[..n].to_vec());
                    let counted = setup.edge.status().udp_dropped > dropped;
                    if let Some(reply) = &reply {
                        assert!(reply == &data, "{len} bytes came back altered");
                    }
                    async move { (reply.is_some() || counted).then_some(()) }
                },
            )
            .await;
            continue;
        }
        assert_eq!(
            exchange(&socket, setup.edge_addr(), &data).await,
            data,
            "{len} bytes"
        );
    }
}

/// Answers an A query with 192.0.2.1.
fn dns_answer(query: &[u8]) -> Vec<u8> {
    let mut response = query.to_vec();
    response[2] = 0x81; // QR, RD
    response[3] = 0x80; // RA, NOERROR
    response[6..8].copy_from_slice(&1u16.to_be_bytes()); // ANCOUNT
    response.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
    response
}

async fn a_dns_query_is_answered_through_the_tunnel(transport: TransportMode) {
    let setup = UdpSetup::new(transport, dns_answer, Duration::from_secs(60), 1000).await;
    let mut query = vec![0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["example", "test"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let socket = client().await;
    let response = exchange(&socket, setup.edge_addr(), &query).await;
    assert_eq!(&response[..2], &[0xbe, 0xef], "same transaction id");
    assert_eq!(response[3] & 0x0f, 0, "NOERROR");
    assert_eq!(
        u16::from_be_bytes([response[6], response[7]]),
        1,
        "one answer"
    );
    assert_eq!(&response[response.len() - 4..], &[192, 0, 2, 1]);
}

async fn idle_sessions_end_on_both_sides_and_a_new_datagram_starts_afresh(
    transport: TransportMode,
) {
    let setup = UdpSetup::new(transport, echo, Duration::from_secs(1), 1000).await;
    let socket = client().await;
    assert_eq!(exchange(&socket, setup.edge_addr(), b"one").await, b"one");
    assert_eq!(setup.edge.status().active_udp_sessions, 1);
    eventually("the session to expire on hub and edge", || async {
        let hub_sessions = setup.hub.status().connected_edges[0].active_udp_sessions;
        (hub_sessions == 0 && setup.edge.status().active_udp_sessions == 0).then_some(())
    })
    .await;
    assert_eq!(exchange(&socket, setup.edge_addr(), b"two").await, b"two");
    let headers = setup.target.headers.lock().unwrap().clone();
    assert_eq!(
        headers.len(),
        2,
        "a fresh session sends a fresh PROXY header"
    );
    assert_eq!(headers[0], headers[1], "for the same client and port");
}

async fn udp_ports_change_live_without_touching_others(transport: TransportMode) {
    let setup = UdpSetup::new(transport, echo, Duration::from_secs(60), 1000).await;
    let tcp_target = echo_target().await;
    let tcp_port = free_port(EDGE_IP);
    let target_port = setup.target.addr.port();
    let mut edge = udp_edge(&[(setup.port, target_port)]);
    edge.config.listen_ports = vec![tcp_port];
    edge.targets.ports.insert(tcp_port, tcp_target.addr.port());
    setup.hub.upsert_edge(edge.clone()).await.unwrap();
    wait_listening(&setup.edge, tcp_port).await;
    let mut tcp = TcpStream::connect((EDGE_IP, tcp_port)).await.unwrap();
    let socket = client().await;
    assert_eq!(
        exchange(&socket, setup.edge_addr(), b"before").await,
        b"before"
    );

    let extra = free_udp_port();
    edge.config.listen_ports_udp.push(extra);
    edge.targets.ports.insert(extra, target_port);
    setup.hub.upsert_edge(edge.clone()).await.unwrap();
    eventually("the new UDP port", || async {
        setup
            .edge
            .status()
            .listen_ports_udp
            .contains(&extra)
            .then_some(())
    })
    .await;
    let other = client().await;
    assert_eq!(
        exchange(&other, SocketAddr::new(EDGE_IP, extra), b"new").await,
        b"new"
    );

    edge.config.listen_ports_udp.retain(|p| *p != extra);
    setup.hub.upsert_edge(edge).await.unwrap();
    eventually("the UDP port to close", || async {
        (!setup.edge.status().listen_ports_udp.contains(&extra)).then_some(())
    })
    .await;
    assert!(
        std::net::UdpSocket::bind((EDGE_IP, extra)).is_ok(),
        "the removed port is released"
    );
    assert_eq!(
        exchange(&socket, setup.edge_addr(), b"after").await,
        b"after"
    );
    tcp.write_all(b"x").await.unwrap();
    let mut back = [0u8; 1];
    tcp.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"x");
}

async fn sessions_past_the_cap_are_dropped_and_counted(transport: TransportMode) {
    let setup = UdpSetup::new(transport, echo, Duration::from_secs(60), 100).await;
    let mut clients = Vec::new();
    for i in 0..100u32 {
        let socket = client().await;
        let message = i.to_be_bytes();
        assert_eq!(
            exchange(&socket, setup.edge_addr(), &message).await,
            message
        );
        clients.push(socket);
    }
    let late = client().await;
    late.send_to(b"one too many", setup.edge_addr())
        .await
        .unwrap();
    eventually("the drop to be counted", || async {
        (setup.edge.status().udp_dropped >= 1).then_some(())
    })
    .await;
    let by_cause = setup
        .edge_metrics
        .gather()
        .into_iter()
        .find(|family| family.name() == "remoteingress_udp_dropped_total")
        .and_then(|family| {
            family
                .get_metric()
                .iter()
                .find(|m| m.get_label()[0].value() == "session_limit")
                .map(|m| m.get_counter().value())
        });
    assert_eq!(by_cause, Some(1.0), "counted under its cause");
    assert_eq!(setup.edge.status().active_udp_sessions, 100);
    for (i, socket) in clients.iter().enumerate() {
        let message = format!("still here {i}");
        assert_eq!(
            exchange(socket, setup.edge_addr(), message.as_bytes()).await,
            message.as_bytes()
        );
    }
    let mut buf = [0u8; 64];
    assert!(
        late.try_recv_from(&mut buf).is_err(),
        "the 101st client got no answer"
    );
    assert_eq!(setup.target.headers.lock().unwrap().len(), 100);
}

async fn a_spray_is_capped_per_edge_and_for_the_hub_and_tcp_keeps_working(
    transport: TransportMode,
) {
    const PER_EDGE: usize = 60;
    const TOTAL: usize = 100;
    const SOURCES: usize = 80;
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let identity = HubIdentity::load_or_generate(state.path()).unwrap();
    let mut options = hub_options(0);
    options.udp_max_sessions = PER_EDGE;
    options.udp_max_sessions_total = TOTAL;
    let hub = Hub::start(options, &identity).await.unwrap();
    let target = udp_target(echo).await;
    let tcp_target = echo_target().await;
    let (spray_a, spray_b, tcp_port) = (free_udp_port(), free_udp_port(), free_port(EDGE_IP));
    hub.update_allowed_edges(vec![
        udp_edge_named("spray-a", &[(spray_a, target.addr.port())]),
        udp_edge_named("spray-b", &[(spray_b, target.addr.port())]),
        allowed("tcp-only", &[(tcp_port, tcp_target.addr.port())]),
    ])
    .await
    .unwrap();
    let mut edges = Vec::new();
    for (id, port) in [("spray-a", spray_a), ("spray-b", spray_b)] {
        let mut options = edge_options(&hub, id, SECRET);
        options.transport = transport;
        let edge = Edge::start(options).await.unwrap();
        eventually("the UDP port", || async {
            edge.status().listen_ports_udp.contains(&port).then_some(())
        })
        .await;
        edges.push(edge);
    }
    let tcp_edge = start_edge(&hub, "tcp-only").await;
    wait_listening(&tcp_edge, tcp_port).await;

    let mut sprayers = Vec::new();
    for port in [spray_a, spray_b] {
        for _ in 0..SOURCES {
            let socket = client().await;
            socket
                .send_to(b"spray", SocketAddr::new(EDGE_IP, port))
                .await
                .unwrap();
            sprayers.push(socket);
        }
    }
    let refused = 2 * SOURCES - TOTAL;
    let status = eventually("every session opened or refused", || async {
        let status = hub.status();
        let dropped: u64 = status.connected_edges.iter().map(|e| e.udp_dropped).sum();
        (dropped >= refused as u64).then_some(status)
    })
    .await;
    let sessions: Vec<u64> = status
        .connected_edges
        .iter()
        .map(|e| e.active_udp_sessions)
        .collect();
    assert!(
        sessions.iter().all(|n| *n <= PER_EDGE as u64),
        "{sessions:?}"
    );
    assert_eq!(sessions.iter().sum::<u64>(), TOTAL as u64, "{sessions:?}");
    let data = pattern(2000, 3);
    assert_eq!(
        round_trip(SocketAddr::new(EDGE_IP, tcp_port), &data).await,
        data
    );
}
