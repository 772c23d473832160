//! A compromised edge, hostile clients and floods: the hub and the edge keep their promises.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::*;
use remoteingress_hub::{HubEvent, Protocol};
use remoteingress_wire::frame::FrameType;
use remoteingress_wire::proxy::{ProxyV1, ProxyV2, V2Transport};
use tokio::net::{TcpListener, UdpSocket};

const CLIENT: &str = "203.0.113.7:5000";

/// The first event that `pick` accepts.
async fn wait_event<T>(
    events: &mut tokio::sync::broadcast::Receiver<HubEvent>,
    what: &str,
    mut pick: impl FnMut(HubEvent) -> Option<T>,
) -> T {
    let deadline = std::time::Duration::from_secs(20);
    tokio::time::timeout(deadline, async {
        loop {
            if let Some(found) = pick(events.recv().await.unwrap()) {
                return found;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no event: {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_reaches_only_the_ports_it_is_assigned() {
    let setup = Setup::new().await;
    setup.edge.shutdown().await;
    // Services on the target host that e1 is not assigned: a TCP one (think: the hub's admin
    // API) and a UDP one.
    let tcp_service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_port = tcp_service.local_addr().unwrap().port();
    let udp_service = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_port = udp_service.local_addr().unwrap().port();

    let mut events = setup.hub.subscribe();
    let mut edge = RawEdge::connect(&setup.hub, "e1").await;
    let client: SocketAddr = CLIENT.parse().unwrap();
    let open = ProxyV1::tcp(client, SocketAddr::new(EDGE_IP, tcp_port)).to_line();
    let udp_open = ProxyV2::proxy(
        V2Transport::Datagram,
        client,
        SocketAddr::new(EDGE_IP, udp_port),
    )
    .to_bytes();
    edge.send(&[
        (1, FrameType::Open, open.as_bytes()),
        (1, FrameType::UdpOpen, &udp_open),
        (1, FrameType::UdpData, b"hello"),
    ])
    .await;

    // Both refusals arrive, in either order.
    let mut refusals = Vec::new();
    while refusals.len() < 2 {
        let frame = edge.next_frame().await.expect("the tunnel stays up");
        if frame.stream_id == 1 && matches!(frame.kind, FrameType::CloseBack | FrameType::UdpClose)
        {
            refusals.push(frame.kind);
        }
    }
    let mut refused = Vec::new();
    while refused.len() < 2 {
        let event = wait_event(&mut events, "open refused", |event| match event {
            HubEvent::OpenRefused {
                edge_id,
                protocol,
                port,
            } => Some((edge_id, protocol, port)),
            _ => None,
        })
        .await;
        refused.push(event);
    }
    refused.sort_by_key(|(_, protocol, _)| *protocol == Protocol::Udp);
    assert_eq!(
        refused,
        [
            ("e1".to_owned(), Protocol::Tcp, tcp_port),
            ("e1".to_owned(), Protocol::Udp, udp_port)
        ]
    );
    assert!(
        tokio::time::timeout(std::time::Duration::ZERO, tcp_service.accept())
            .await
            .is_err(),
        "the TCP service was connected"
    );
    let mut buf = [0u8; 64];
    assert!(
        udp_service.try_recv(&mut buf).is_err(),
        "the UDP service got a datagram"
    );

    // The assigned port still works for the same tunnel.
    let allowed = ProxyV1::tcp(client, setup.edge_addr()).to_line();
    edge.send(&[
        (3, FrameType::Open, allowed.as_bytes()),
        (3, FrameType::Data, b"ping"),
    ])
    .await;
    let echoed = edge.next_of(3, FrameType::DataBack).await;
    assert!(b"ping".starts_with(&echoed.payload));
}
