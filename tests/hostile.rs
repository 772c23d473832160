//! A compromised edge, hostile clients and floods: the hub and the edge keep their promises.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::*;
use remoteingress_hub::{HubEvent, Protocol, RefusalReason};
use remoteingress_wire::frame::FrameType;
use remoteingress_wire::proxy::{ProxyV1, ProxyV2, V2Transport, V2_TLV_EDGE_ID};
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
                reason: RefusalReason::NotAssigned,
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

    // The assigned port still works for the same tunnel.
    let allowed = ProxyV1::tcp(client, setup.edge_addr()).to_line();
    edge.send(&[
        (3, FrameType::Open, allowed.as_bytes()),
        (3, FrameType::Data, b"ping"),
    ])
    .await;
    let mut echoed = Vec::new();
    while echoed.len() < 4 {
        let frame = edge.next_of(3, FrameType::DataBack).await;
        assert!(!frame.payload.is_empty(), "an empty DATA_BACK");
        echoed.extend_from_slice(&frame.payload);
    }
    assert_eq!(echoed, b"ping");

    // The hub handles a tunnel's frames in order: had it connected the refused streams, those
    // connections would be waiting by now. Asked of the kernel directly, without a reactor's
    // readiness in between.
    let tcp_service = tcp_service.into_std().unwrap();
    tcp_service.set_nonblocking(true).unwrap();
    assert_eq!(
        tcp_service.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the TCP service was connected"
    );
    let mut buf = [0u8; 64];
    assert_eq!(
        udp_service
            .into_std()
            .unwrap()
            .recv(&mut buf)
            .unwrap_err()
            .kind(),
        std::io::ErrorKind::WouldBlock,
        "the UDP service got a datagram"
    );
}

/// An edge cannot make a target believe in a client that does not exist: opens claiming an
/// unspecified or multicast client are refused (counted, evented) and never connected (a
/// loopback one only from an edge on another host, as `wire::address` tests);
/// the PROXY headers targets get are written by the hub from the parsed addresses, and a UDP
/// one names the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_cannot_claim_an_impossible_client_address() {
    use tokio::io::AsyncReadExt;
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let options = hub_options(0);
    let registry = options.registry.clone();
    let hub = start_hub_with(state.path(), options).await;
    let tcp_target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let udp_target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (tcp_port, udp_port) = (free_port(EDGE_IP), free_port(EDGE_IP));
    let mut entry = allowed(
        "e1",
        &[
            (tcp_port, tcp_target.local_addr().unwrap().port()),
            (udp_port, udp_target.local_addr().unwrap().port()),
        ],
    );
    entry.config.listen_ports = vec![tcp_port];
    entry.config.listen_ports_udp = vec![udp_port];
    hub.update_allowed_edges(vec![entry]).await.unwrap();
    let mut events = hub.subscribe();
    let mut edge = RawEdge::connect(&hub, "e1").await;

    let impossible = ["0.0.0.0:5000", "[::]:5000", "[ff02::1]:5000"];
    let mut frames = Vec::new();
    let lines: Vec<String> = impossible
        .iter()
        .map(|client| {
            ProxyV1::tcp(client.parse().unwrap(), SocketAddr::new(EDGE_IP, tcp_port)).to_line()
        })
        .collect();
    for (i, line) in lines.iter().enumerate() {
        frames.push((1 + 2 * i as u32, FrameType::Open, line.as_bytes()));
    }
    let udp_multicast = ProxyV2::proxy(
        V2Transport::Datagram,
        "224.0.0.1:5000".parse().unwrap(),
        SocketAddr::new(EDGE_IP, udp_port),
    )
    .to_bytes();
    frames.push((7, FrameType::UdpOpen, &udp_multicast));
    edge.send(&frames).await;
    let mut refused = Vec::new();
    while refused.len() < 4 {
        let event = wait_event(&mut events, "open refused", |event| match event {
            HubEvent::OpenRefused {
                protocol,
                port,
                reason,
                ..
            } => Some((protocol, port, reason)),
            _ => None,
        })
        .await;
        refused.push(event);
    }
    refused.sort_by_key(|(protocol, _, _)| *protocol == Protocol::Udp);
    let tcp = (Protocol::Tcp, tcp_port, RefusalReason::ClientAddress);
    let udp = (Protocol::Udp, udp_port, RefusalReason::ClientAddress);
    assert_eq!(refused, [tcp, tcp, tcp, udp]);
    let labels = [
        ("edge", "e1"),
        ("protocol", "tcp"),
        ("reason", "client_address"),
    ];
    assert_eq!(
        metric(&registry, "remoteingress_opens_refused_total", &labels),
        Some(3.0)
    );

    // A believable client, written in a non-canonical form: the target gets the hub's own
    // rendering of the parsed addresses, not the edge's bytes.
    let odd = format!(
        "PROXY TCP6 2001:0db8:0000:0000:0000:0000:0000:0001 ::ffff:127.0.0.2 5000 {tcp_port}\r\n"
    );
    let udp_open = ProxyV2::proxy(
        V2Transport::Datagram,
        CLIENT.parse().unwrap(),
        SocketAddr::new(EDGE_IP, udp_port),
    )
    .to_bytes();
    edge.send(&[
        (9, FrameType::Open, odd.as_bytes()),
        (9, FrameType::UdpOpen, &udp_open),
    ])
    .await;
    let (mut socket, _) =
        tokio::time::timeout(std::time::Duration::from_secs(20), tcp_target.accept())
            .await
            .expect("the believable stream is connected")
            .unwrap();
    let expected = format!("PROXY TCP6 2001:db8::1 ::ffff:127.0.0.2 5000 {tcp_port}\r\n");
    let mut line = vec![0u8; expected.len()];
    socket.read_exact(&mut line).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&line), expected);
    let mut datagram = [0u8; 512];
    let (len, _) = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        udp_target.recv_from(&mut datagram),
    )
    .await
    .expect("the UDP session is connected")
    .unwrap();
    let mut expected = Vec::new();
    ProxyV2::proxy(
        V2Transport::Datagram,
        CLIENT.parse().unwrap(),
        SocketAddr::new(EDGE_IP, udp_port),
    )
    .encode_with(&[(V2_TLV_EDGE_ID, b"e1")], &mut expected);
    assert_eq!(
        &datagram[..len],
        &expected[..],
        "the v2 header names the edge"
    );

    // Nothing was connected for the refused opens.
    let tcp_target = tcp_target.into_std().unwrap();
    tcp_target.set_nonblocking(true).unwrap();
    assert_eq!(
        tcp_target.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "a refused stream was connected"
    );
}

/// A target that accepts connections, reads their PROXY line and then holds them without
/// reading or writing: the worst case for releasing hub-side sockets.
struct SilentTarget {
    address: SocketAddr,
    held: tokio::sync::mpsc::Receiver<tokio::net::TcpStream>,
}

async fn silent_target() -> SilentTarget {
    let listener = remoteingress_tunnel::listen_tcp(([127, 0, 0, 1], 0).into()).unwrap();
    let address = listener.local_addr().unwrap();
    let (tx, held) = tokio::sync::mpsc::channel(100_000);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            if tx.send(socket).await.is_err() {
                return;
            }
        }
    });
    SilentTarget { address, held }
}

/// Streams and UDP sessions are counted per edge across all its tunnels: a second tunnel of
/// the same edge gets nothing the first has used up. Connections to targets are capped for
/// the whole hub too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_per_edge_across_its_tunnels_and_for_the_hub() {
    const STREAMS: usize = 4;
    const UDP_SESSIONS: usize = 2;
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let mut options = hub_options(0);
    options.session.max_streams = STREAMS;
    options.udp_max_sessions = UDP_SESSIONS;
    options.max_target_connections = STREAMS + 1;
    let registry = options.registry.clone();
    let hub = start_hub_with(state.path(), options).await;
    let mut target = silent_target().await;
    let udp_target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (tcp_port, udp_port) = (free_port(EDGE_IP), free_port(EDGE_IP));
    let mut entry = allowed(
        "e1",
        &[
            (tcp_port, target.address.port()),
            (udp_port, udp_target.local_addr().unwrap().port()),
        ],
    );
    entry.config.listen_ports = vec![tcp_port];
    entry.config.listen_ports_udp = vec![udp_port];
    let other_port = free_port(EDGE_IP);
    let other = allowed("e2", &[(other_port, target.address.port())]);
    hub.update_allowed_edges(vec![entry, other]).await.unwrap();

    let edge_port = SocketAddr::new(EDGE_IP, tcp_port);
    let open = ProxyV1::tcp("192.0.2.7:5000".parse().unwrap(), edge_port).to_line();
    let udp_open = ProxyV2::proxy(
        V2Transport::Datagram,
        "192.0.2.7:5000".parse().unwrap(),
        SocketAddr::new(EDGE_IP, udp_port),
    )
    .to_bytes();
    // Each tunnel asks for less than one tunnel may have (its confirmation's stream may still
    // count), together for more than the edge may.
    const PER_TUNNEL: usize = STREAMS - 1;
    let mut tunnels = Vec::new();
    for _ in 0..2 {
        let mut edge = RawEdge::connect(&hub, "e1").await;
        edge.confirm_extensions().await;
        let mut frames: Vec<_> = (0..PER_TUNNEL as u32)
            .map(|n| (3 + 2 * n, FrameType::Open, open.as_bytes()))
            .collect();
        frames.extend(
            (0..UDP_SESSIONS as u32).map(|n| (101 + 2 * n, FrameType::UdpOpen, &udp_open[..])),
        );
        edge.send(&frames).await;
        tunnels.push(edge);
    }

    let refused = |edge, reason| {
        let labels = [("edge", edge), ("protocol", "tcp"), ("reason", reason)];
        metric(&registry, "remoteingress_opens_refused_total", &labels).unwrap_or(0.0)
    };
    eventually("the streams past the edge's limit are refused", || async {
        (refused("e1", "edge_limit") == (2 * PER_TUNNEL - STREAMS) as f64).then_some(())
    })
    .await;
    // Held open, as a target that never answers would.
    let mut connected = Vec::new();
    for _ in 0..STREAMS {
        connected.push(target.held.recv().await.unwrap());
    }
    assert!(
        target.held.try_recv().is_err(),
        "more streams than the edge may have"
    );

    // Another edge gets what is left of the hub's connections to targets, and no more.
    let mut other = RawEdge::connect(&hub, "e2").await;
    let open = ProxyV1::tcp(
        "192.0.2.8:5000".parse().unwrap(),
        SocketAddr::new(EDGE_IP, other_port),
    )
    .to_line();
    other
        .send(&[
            (1, FrameType::Open, open.as_bytes()),
            (3, FrameType::Open, open.as_bytes()),
        ])
        .await;
    eventually("the stream past the hub's limit is refused", || async {
        (refused("e2", "hub_limit") == 1.0).then_some(())
    })
    .await;
    connected.push(target.held.recv().await.unwrap());
    assert_eq!(refused("e2", "edge_limit"), 0.0);
    eventually(
        "the UDP sessions past the edge's limit are refused",
        || async {
            let labels = [("edge", "e1"), ("reason", "edge_session_limit")];
            let dropped = metric(&registry, "remoteingress_udp_dropped_total", &labels);
            (dropped == Some(UDP_SESSIONS as f64)).then_some(())
        },
    )
    .await;
    drop((tunnels, other, connected));
    hub.shutdown().await;
}

/// A hub and edge "e1" whose one port leads to a silent target.
async fn silent_setup(
    transport: remoteingress_edge::TransportMode,
) -> (
    tempfile::TempDir,
    remoteingress_hub::HubHandle,
    remoteingress_edge::EdgeHandle,
    SilentTarget,
    SocketAddr,
) {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let hub = start_hub(state.path(), 0).await;
    let target = silent_target().await;
    let edge_port = free_port(EDGE_IP);
    hub.update_allowed_edges(vec![allowed("e1", &[(edge_port, target.address.port())])])
        .await
        .unwrap();
    let mut options = edge_options(&hub, "e1", SECRET);
    options.transport = transport;
    let edge = remoteingress_edge::Edge::start(options).await.unwrap();
    wait_listening(&edge, edge_port).await;
    (
        state,
        hub,
        edge,
        target,
        SocketAddr::new(EDGE_IP, edge_port),
    )
}

/// TCP sockets on this host connected to `target` (the hub's side of target connections), from
/// `/proc/net/tcp`; TIME_WAIT leftovers hold nothing and don't count. The whole address is
/// compared: a listener of a test running beside this one may share the port on another address.
fn sockets_towards(target: SocketAddr) -> usize {
    const TIME_WAIT: &str = "06";
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            proc_net_address(fields[2]) == Some(target) && fields[3] != TIME_WAIT
        })
        .count()
}

/// An address as `/proc/net/tcp` prints it: the IPv4 address as a native-endian hex word of
/// network-order bytes, a colon, the port in hex.
fn proc_net_address(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let ip = std::net::Ipv4Addr::from(u32::from_be(u32::from_str_radix(ip, 16).ok()?));
    Some(SocketAddr::new(
        ip.into(),
        u16::from_str_radix(port, 16).ok()?,
    ))
}

/// Whether the peer of `socket` has let go of it: a read ends (EOF or reset).
async fn released(socket: &mut tokio::net::TcpStream) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    loop {
        match socket.read(&mut buf).await {
            Ok(0) => return Ok(0),
            Ok(_) => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn a_client_reset_reaches_the_target_and_frees_the_stream(
    transport: remoteingress_edge::TransportMode,
) {
    use tokio::io::AsyncWriteExt;
    let (_state, hub, _edge, mut target, edge_addr) = silent_setup(transport).await;
    let mut client = tokio::net::TcpStream::connect(edge_addr).await.unwrap();
    client.write_all(b"request").await.unwrap();
    let mut held = target.held.recv().await.unwrap();
    eventually("the hub counts the stream", || async {
        (hub.active_streams() == 1).then_some(())
    })
    .await;
    client.set_zero_linger().unwrap();
    drop(client);
    let read = tokio::time::timeout(std::time::Duration::from_secs(20), released(&mut held))
        .await
        .expect("the target connection is let go");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the client's reset reaches the target as a reset"
    );
    eventually("the hub frees the stream", || async {
        (hub.active_streams() == 0).then_some(())
    })
    .await;
}

/// The bytes waiting in the receive queue of the socket at `local` connected to `remote`, from
/// `/proc/net/tcp`.
fn receive_queue(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let matches = proc_net_address(fields[1]) == Some(local)
            && proc_net_address(fields[2]) == Some(remote);
        let (_, rx) = fields[4].split_once(':')?;
        matches.then(|| u64::from_str_radix(rx, 16).ok()).flatten()
    })
}

/// A client pushes into a target that never reads until nothing moves any more, then resets:
/// the stream and the target socket are released all the same. (Through a whole tunnel this
/// does not reliably leave the edge's pipe without credit; the case where it has none is
/// pinned by `pipe::tests::a_reset_while_the_peer_grants_no_credit_ends_the_pipe`.)
async fn a_client_reset_frees_a_stalled_stream(transport: remoteingress_edge::TransportMode) {
    use tokio::io::AsyncWriteExt;
    let (_state, hub, _edge, mut target, edge_addr) = silent_setup(transport).await;
    let mut client = tokio::net::TcpStream::connect(edge_addr).await.unwrap();
    client.write_all(b"request").await.unwrap();
    let mut held = target.held.recv().await.unwrap();
    let held_remote = held.peer_addr().unwrap();
    let chunk = vec![0x5a; 256 * 1024];
    // Stalled: nothing moves for five checks in a row (the client cannot write, the target's
    // queue stays as it is): every buffer and all credit between them are used up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (mut last, mut still) = (None, 0);
    while still < 5 {
        let mut moved = false;
        loop {
            match client.try_write(&chunk) {
                Ok(_) => moved = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("the client's writes fail: {e}"),
            }
            tokio::task::yield_now().await;
        }
        let queued = receive_queue(target.address, held_remote);
        still = if moved || queued != last {
            0
        } else {
            still + 1
        };
        last = queued;
        assert!(
            std::time::Instant::now() < deadline,
            "the stream never stalled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(hub.active_streams(), 1);
    client.set_zero_linger().unwrap();
    drop(client);
    let read = tokio::time::timeout(std::time::Duration::from_secs(20), released(&mut held))
        .await
        .expect("the target connection is let go");
    assert!(
        read.is_err(),
        "the client's reset reaches the target as a reset"
    );
    eventually("the hub frees the stream", || async {
        (hub.active_streams() == 0).then_some(())
    })
    .await;
}

async fn a_lost_tunnel_releases_every_target_socket(transport: remoteingress_edge::TransportMode) {
    use tokio::io::AsyncWriteExt;
    const STREAMS: usize = 200;
    let (_state, hub, edge, mut target, edge_addr) = silent_setup(transport).await;
    let mut clients = Vec::new();
    for _ in 0..STREAMS {
        let mut client = tokio::net::TcpStream::connect(edge_addr).await.unwrap();
        client.write_all(b"request").await.unwrap();
        clients.push(client);
    }
    let mut held = Vec::new();
    while held.len() < STREAMS {
        held.push(target.held.recv().await.unwrap());
    }
    assert_eq!(sockets_towards(target.address), STREAMS);
    edge.shutdown().await;
    for socket in &mut held {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(20), released(socket))
            .await
            .expect("the hub lets go of the target connection");
    }
    eventually("the hub closes its sockets", || async {
        (sockets_towards(target.address) == 0).then_some(())
    })
    .await;
    assert_eq!(hub.active_streams(), 0);
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sustained_flood_of_pending_handshakes_never_locks_edges_out() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let identity = remoteingress_tunnel::HubIdentity::load_or_generate(state.path()).unwrap();
    let mut options = hub_options(0);
    options.max_unauthenticated = 16;
    options.max_unauthenticated_per_source = 64;
    // Flood slots never expire during the test: only eviction can make room.
    options.handshake_timeout = std::time::Duration::from_secs(300);
    let hub = remoteingress_hub::Hub::start(options, &identity)
        .await
        .unwrap();
    let target = echo_target().await;
    let (old_port, new_port) = (free_port(EDGE_IP), free_port(EDGE_IP));
    hub.update_allowed_edges(vec![
        allowed("connected", &[(old_port, target.addr.port())]),
        allowed("newcomer", &[(new_port, target.addr.port())]),
    ])
    .await
    .unwrap();
    let connected = start_edge(&hub, "connected").await;
    wait_listening(&connected, old_port).await;
    let tunnel_since = |hub: &remoteingress_hub::HubHandle| {
        hub.status()
            .connected_edges
            .iter()
            .find(|e| e.id == "connected")
            .map(|e| e.connected_since)
    };
    let before = tunnel_since(&hub).expect("the edge is connected");
    let mut events = hub.subscribe();

    // Many sources keep every slot taken, replacing each connection the hub drops.
    let tunnel = hub.local_addr();
    let flood = tokio::spawn(async move {
        let mut held = std::collections::VecDeque::new();
        loop {
            for last in 10..=40u8 {
                let source = std::net::SocketAddr::from(([127, 0, 1, last], 0));
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind(source).unwrap();
                if let Ok(stream) = socket.connect(tunnel).await {
                    held.push_back(stream);
                }
                if held.len() > 200 {
                    held.pop_front();
                }
            }
            tokio::task::yield_now().await;
        }
    });
    // The hub drops the flood's connections: idle ones for newer connections, abandoned ones
    // as it reaches them in its backlog.
    wait_event(&mut events, "the flood reaches the hub", |event| {
        matches!(
            &event,
            HubEvent::AuthFailed {
                kind: "evicted" | "abandoned",
                ..
            }
        )
        .then_some(())
    })
    .await;

    let newcomer = start_edge(&hub, "newcomer").await;
    wait_listening(&newcomer, new_port).await;
    for port in [old_port, new_port] {
        let data = pattern(1000, 7);
        assert_eq!(
            round_trip(SocketAddr::new(EDGE_IP, port), &data).await,
            data
        );
    }
    flood.abort();
    assert_eq!(
        tunnel_since(&hub),
        Some(before),
        "the connected edge kept its tunnel through the flood"
    );
}

for_each_transport!(
    a_client_reset_reaches_the_target_and_frees_the_stream,
    a_client_reset_frees_a_stalled_stream,
    a_lost_tunnel_releases_every_target_socket
);
