//! End-to-end tests of TCP tunnelling over TLS: real sockets on loopback, hub and edge in-process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

for_each_transport!(
    echoes_small_and_medium_payloads_with_half_close,
    carries_256_mib_both_ways_intact,
    target_sees_the_real_client_address,
    five_hundred_concurrent_connections,
    a_stalled_target_is_bounded_by_its_window_and_stalls_nothing_else,
    ports_change_live_without_touching_open_connections,
    edge_reconnects_after_a_hub_restart_with_the_same_pin,
    a_failed_target_connect_resets_the_client_at_once,
    a_port_with_its_own_target_host_reaches_that_host,
);

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use remoteingress_edge::{Edge, TransportMode};
use remoteingress_hub::HubEvent;
use remoteingress_wire::flow::MAX_WINDOW;
use remoteingress_wire::proxy::ProxyV1;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echoes_small_and_medium_payloads_with_half_close(transport: TransportMode) {
    let setup = Setup::with_transport(transport).await;
    for len in [1usize, 64 * 1024] {
        let data = pattern(len, len as u64);
        assert_eq!(
            round_trip(setup.edge_addr(), &data).await,
            data,
            "{len} bytes"
        );
    }
}

async fn carries_256_mib_both_ways_intact(transport: TransportMode) {
    const TOTAL: usize = 256 * 1024 * 1024;
    const CHUNK: usize = 1024 * 1024;
    let setup = Setup::with_transport(transport).await;
    let stream = TcpStream::connect(setup.edge_addr()).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let sender = tokio::spawn(async move {
        let mut hash = Sha256::new();
        for i in 0..TOTAL / CHUNK {
            let chunk = pattern(CHUNK, i as u64);
            hash.update(&chunk);
            wr.write_all(&chunk).await.unwrap();
        }
        wr.shutdown().await.unwrap();
        hash.finalize()
    });
    let mut hash = Sha256::new();
    let mut received = 0usize;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = rd.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        received += n;
    }
    assert_eq!(received, TOTAL);
    assert_eq!(hash.finalize(), sender.await.unwrap());
}

async fn target_sees_the_real_client_address(transport: TransportMode) {
    let setup = Setup::with_transport(transport).await;
    let mut client = TcpStream::connect(setup.edge_addr()).await.unwrap();
    let client_addr = client.local_addr().unwrap();
    client.write_all(b"hello").await.unwrap();
    let mut echoed = [0u8; 5];
    client.read_exact(&mut echoed).await.unwrap();
    let headers = setup.target.headers.lock().unwrap().clone();
    assert_eq!(
        headers,
        vec![ProxyV1::Tcp {
            source: client_addr,
            destination: setup.edge_addr(),
        }]
    );
}

async fn five_hundred_concurrent_connections(transport: TransportMode) {
    let setup = Setup::with_transport(transport).await;
    let addr = setup.edge_addr();
    let clients: Vec<_> = (0..500u64)
        .map(|i| {
            tokio::spawn(async move {
                let data = pattern(1000 + i as usize * 37, i);
                let got = round_trip(addr, &data).await;
                assert!(
                    got == data,
                    "connection {i}: sent {} got {}",
                    data.len(),
                    got.len()
                );
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(setup.target.headers.lock().unwrap().len(), 500);
}

async fn a_stalled_target_is_bounded_by_its_window_and_stalls_nothing_else(
    transport: TransportMode,
) {
    let setup = Setup::with_transport(transport).await;
    // A target that accepts and never reads.
    let stalled = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled_port = stalled.local_addr().unwrap().port();
    let (hold_tx, mut hold_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let (socket, _) = stalled.accept().await.unwrap();
        hold_tx.send(socket).await.unwrap();
        std::future::pending::<()>().await;
    });
    let stalled_edge_port = free_port(EDGE_IP);
    setup
        .hub
        .upsert_edge(allowed(
            "e1",
            &[
                (setup.edge_port, setup.target.addr.port()),
                (stalled_edge_port, stalled_port),
            ],
        ))
        .await
        .unwrap();
    wait_listening(&setup.edge, stalled_edge_port).await;

    let mut elephant = TcpStream::connect(SocketAddr::new(EDGE_IP, stalled_edge_port))
        .await
        .unwrap();
    let flood = tokio::spawn(async move {
        let chunk = vec![7u8; 1024 * 1024];
        for _ in 0..200 {
            if elephant.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let _held = hold_rx.recv().await.unwrap();
    // Wait until the target's socket buffers are full and the hub holds a whole window.
    let hub = setup.hub.clone();
    eventually("the stalled stream to fill its window", || async {
        let edge = hub.status().connected_edges.pop()?;
        let filled = match transport {
            TransportMode::Quic => edge.bytes_in >= 1024 * 1024,
            _ => edge.peak_stream_buffer >= u64::from(MAX_WINDOW) / 2,
        };
        filled.then_some(())
    })
    .await;

    let data = pattern(1024 * 1024, 99);
    assert_eq!(round_trip(setup.edge_addr(), &data).await, data);

    let edge = setup.hub.status().connected_edges.pop().unwrap();
    // Only the TLS transport buffers per stream in our code; QUIC's own windows bound QUIC.
    assert!(
        transport == TransportMode::Quic || edge.peak_stream_buffer <= u64::from(MAX_WINDOW),
        "hub buffered {} bytes for one stream, window is {MAX_WINDOW}",
        edge.peak_stream_buffer
    );
    assert!(
        !flood.is_finished(),
        "the flood cannot finish while the target reads nothing"
    );
    flood.abort();
}

async fn ports_change_live_without_touching_open_connections(transport: TransportMode) {
    let setup = Setup::with_transport(transport).await;
    let target_port = setup.target.addr.port();
    let mut kept = TcpStream::connect(setup.edge_addr()).await.unwrap();
    let ping = async |stream: &mut TcpStream, byte: u8| {
        stream.write_all(&[byte]).await.unwrap();
        let mut back = [0u8];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back[0], byte);
    };
    ping(&mut kept, 1).await;

    let extra = free_port(EDGE_IP);
    setup
        .hub
        .upsert_edge(allowed(
            "e1",
            &[(setup.edge_port, target_port), (extra, target_port)],
        ))
        .await
        .unwrap();
    wait_listening(&setup.edge, extra).await;
    let data = pattern(4096, 1);
    assert_eq!(
        round_trip(SocketAddr::new(EDGE_IP, extra), &data).await,
        data
    );
    ping(&mut kept, 2).await;

    setup
        .hub
        .upsert_edge(allowed("e1", &[(setup.edge_port, target_port)]))
        .await
        .unwrap();
    eventually("the removed port to refuse connections", || async {
        TcpStream::connect(SocketAddr::new(EDGE_IP, extra))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    ping(&mut kept, 3).await;
}

/// A port with its own target host (a Kubernetes Service's cluster IP, say) goes there; the
/// others still go to the hub's target host.
async fn a_port_with_its_own_target_host_reaches_that_host(transport: TransportMode) {
    let setup = Setup::with_transport(transport).await;
    let elsewhere = echo_target_on(std::net::IpAddr::from([127, 0, 0, 3])).await;
    let own_host = free_port(EDGE_IP);
    let mut edge = allowed(
        "e1",
        &[
            (setup.edge_port, setup.target.addr.port()),
            (own_host, elsewhere.addr.port()),
        ],
    );
    edge.targets.hosts.insert(own_host, "127.0.0.3".into());
    setup.hub.upsert_edge(edge).await.unwrap();
    wait_listening(&setup.edge, own_host).await;

    let data = pattern(1000, 7);
    assert_eq!(
        round_trip(SocketAddr::new(EDGE_IP, own_host), &data).await,
        data
    );
    assert_eq!(round_trip(setup.edge_addr(), &data).await, data);
    assert_eq!(elsewhere.headers.lock().unwrap().len(), 1);
    assert_eq!(setup.target.headers.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_bad_credentials_and_junk_and_keeps_serving() {
    let setup = Setup::new().await;
    let mut events = setup.hub.subscribe();

    let wrong_secret = Edge::start(edge_options(&setup.hub, "e1", "not-the-secret"))
        .await
        .unwrap();
    let unknown_id = Edge::start(edge_options(&setup.hub, "nobody", SECRET))
        .await
        .unwrap();
    let hub_addr = setup.hub.local_addr();
    let mut junk = TcpStream::connect(hub_addr).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let _silent = TcpStream::connect(hub_addr).await.unwrap();

    let expected = ["\"e1\"", "\"nobody\"", "TLS", "not finished in time"];
    let expected_kinds = ["bad_credentials", "tls", "timeout"];
    let mut reasons = String::new();
    let mut kinds = std::collections::BTreeSet::new();
    while !expected.iter().all(|e| reasons.contains(e))
        || !expected_kinds.iter().all(|k| kinds.contains(k))
    {
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .unwrap_or_else(|_| panic!("auth failures not all reported: {reasons}"))
            .unwrap();
        if let HubEvent::AuthFailed { reason, kind, .. } = event {
            reasons.push_str(&reason);
            reasons.push_str(" | ");
            kinds.insert(kind);
        }
    }
    for edge in [&wrong_secret, &unknown_id] {
        let status = edge.status();
        assert!(!status.connected);
        assert!(status
            .last_error
            .unwrap_or_default()
            .contains("unauthorized"));
    }
    let data = pattern(10_000, 5);
    assert_eq!(round_trip(setup.edge_addr(), &data).await, data);
    wrong_secret.shutdown().await;
    unknown_id.shutdown().await;
}

async fn edge_reconnects_after_a_hub_restart_with_the_same_pin(transport: TransportMode) {
    let setup = Setup::with_transport(transport).await;
    let pin = setup.hub.pin().to_owned();
    let edges = vec![allowed(
        "e1",
        &[(setup.edge_port, setup.target.addr.port())],
    )];
    setup.hub.shutdown().await;
    eventually("the edge to notice", || async {
        (!setup.edge.status().connected).then_some(())
    })
    .await;
    // The edge stops listening once it knows the tunnel is down (just after its status says so).
    eventually(
        "client connections to be refused while the tunnel is down",
        || async { (!listens(setup.edge_addr()).await).then_some(()) },
    )
    .await;

    let hub = start_hub(setup.state.path(), setup.hub_port).await;
    assert_eq!(hub.pin(), pin);
    hub.update_allowed_edges(edges).await.unwrap();
    eventually("the edge to reconnect", || async {
        let status = setup.edge.status();
        (status.connected
            && status.connections >= 2
            && status.listen_ports.contains(&setup.edge_port))
        .then_some(())
    })
    .await;
    let data = pattern(50_000, 8);
    assert_eq!(round_trip(setup.edge_addr(), &data).await, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_edge_is_disconnected_and_secret_change_forces_reauthentication() {
    let setup = Setup::new().await;
    let mut events = setup.hub.subscribe();
    let mut changed = allowed("e1", &[(setup.edge_port, setup.target.addr.port())]);
    changed.secret = "a-new-secret".into();
    setup.hub.upsert_edge(changed).await.unwrap();
    assert_eq!(disconnect_reason(&mut events).await, "edge secret changed");
    eventually("the old secret to be refused", || async {
        setup
            .edge
            .status()
            .last_error
            .filter(|e| e.contains("unauthorized"))
    })
    .await;
    assert!(setup.hub.delete_edge("e1").await.unwrap());
    assert!(setup.hub.status().connected_edges.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_of_an_original_edge_replaces_the_first() {
    let setup = Setup::new().await;
    setup.edge.shutdown().await;
    eventually("the edge's tunnel to be gone", || async {
        setup.hub.status().connected_edges.is_empty().then_some(())
    })
    .await;
    let mut events = setup.hub.subscribe();
    let mut first = RawEdge::connect(&setup.hub, "e1").await;
    let _second = RawEdge::connect(&setup.hub, "e1").await;
    assert!(disconnect_reason(&mut events).await.contains("replaced"));
    assert!(
        first.next_frame().await.is_none(),
        "the first tunnel is closed"
    );
    assert_eq!(setup.hub.status().connected_edges.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_keeps_several_tunnels_is_never_replaced() {
    let setup = Setup::new().await;
    let mut second_options = edge_options(&setup.hub, "e1", SECRET);
    second_options.bind_address = "127.0.0.3".parse().unwrap();
    let second = Edge::start(second_options).await.unwrap();
    wait_listening(&second, setup.edge_port).await;
    wait_listening(&setup.edge, setup.edge_port).await;
    // An edge listens with the ports of the handshake's reply, possibly before the hub lists it.
    eventually("the hub to list both tunnels", || async {
        (setup.hub.status().connected_edges.len() == 2).then_some(())
    })
    .await;
    let data = pattern(1000, 3);
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let addr = SocketAddr::new(ip.parse().unwrap(), setup.edge_port);
        assert_eq!(round_trip(addr, &data).await, data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_file_changes_are_applied_live() {
    let setup = Setup::new().await;
    let file = setup.state.path().join("edges.json");
    let target_port = setup.target.addr.port();
    let write = |ports: &[(u16, u16)]| {
        let json = serde_json::to_string(&vec![allowed("e1", ports)]).unwrap();
        std::fs::write(&file, json).unwrap();
    };
    write(&[(setup.edge_port, target_port)]);
    setup
        .hub
        .watch_edges_file(file.clone(), Duration::from_millis(50))
        .await
        .unwrap();
    let extra = free_port(EDGE_IP);
    // A different length guarantees a visible change even within one mtime tick.
    write(&[(setup.edge_port, target_port), (extra, target_port)]);
    wait_listening(&setup.edge, extra).await;
    std::fs::write(&file, "[{\"id\":\"e1\"").unwrap();
    let data = pattern(100, 1);
    assert_eq!(
        round_trip(SocketAddr::new(EDGE_IP, extra), &data).await,
        data
    );
    let listed = setup.hub.list_edges();
    assert_eq!(
        listed[0].config.listen_ports.len(),
        2,
        "a broken file keeps the previous edges"
    );
}

async fn a_failed_target_connect_resets_the_client_at_once(transport: TransportMode) {
    let setup = Setup::with_transport(transport).await;
    let closed_port = free_port("127.0.0.1".parse().unwrap());
    let extra = free_port(EDGE_IP);
    setup
        .hub
        .upsert_edge(allowed(
            "e1",
            &[
                (setup.edge_port, setup.target.addr.port()),
                (extra, closed_port),
            ],
        ))
        .await
        .unwrap();
    wait_listening(&setup.edge, extra).await;
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        exchange_until_end(SocketAddr::new(EDGE_IP, extra), b"anyone there?"),
    )
    .await
    .expect("the client is told promptly");
    assert_eq!(
        ended.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the aborted stream resets the client"
    );
}

/// The reason of the next EdgeDisconnected event.
async fn disconnect_reason(events: &mut tokio::sync::broadcast::Receiver<HubEvent>) -> String {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .expect("a disconnect")
            .unwrap();
        if let HubEvent::EdgeDisconnected { reason, .. } = event {
            return reason;
        }
    }
}

#[test]
fn the_demo_command_shows_a_request_going_through() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_remoteingress"))
        .args(["demo", "--once"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("the client's address survived the tunnel"),
        "{stdout}"
    );
}
