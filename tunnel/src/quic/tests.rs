//! The QUIC session pinned down with the in-process harness: streams, statistics that match the
//! multiplexer's, half-close, shutdown, and UDP opens that survive loss.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;

use bytes::Bytes;
use remoteingress_wire::extension::Extensions;
use remoteingress_wire::quic::Datagram;

use crate::harness::{
    checks, eventually, pattern, read_exactly, read_to_end, send_all, udp_header, within, Pair,
    DEADLINE,
};
use crate::link::Link;
use crate::options::{Role, SessionOptions};
use crate::quic::endpoint::INITIAL_STREAM_LIMIT;
use crate::quic::{client_endpoint, server_endpoint};
use crate::tls::{HubIdentity, HubTrust};

#[tokio::test]
async fn streams_carry_bytes_and_fill_the_same_statistics() {
    let mut pair = Pair::quic(SessionOptions::default()).await;
    let mut stream = pair.open().await;
    assert!(stream.header.starts_with(b"PROXY TCP4 "));
    // The hub does not read yet: the edge's writer must wait for QUIC's flow control.
    let up = pattern(12 * 1024 * 1024);
    let mut writer = stream.edge_writer;
    let sent = up.clone();
    let pushed = tokio::spawn(async move {
        send_all(&mut writer, sent).await;
        writer
    });
    let edge_stats = pair.edge.session.stats();
    eventually("the edge's writer waits", || {
        edge_stats.flow_stalls.load(Ordering::Relaxed) > 0
    })
    .await;
    assert_eq!(read_exactly(&mut stream.hub_reader, up.len()).await, up);
    let mut edge_writer = within("the push ends", pushed).await.unwrap();
    edge_writer.finish().await;
    assert_eq!(read_to_end(&mut stream.hub_reader).await, b"");

    let hub_stats = pair.hub.session.stats();
    assert_eq!(hub_stats.bytes_in.load(Ordering::Relaxed), up.len() as u64);
    assert_eq!(
        edge_stats.bytes_out.load(Ordering::Relaxed),
        up.len() as u64
    );
    assert_eq!(hub_stats.streams_opened.load(Ordering::Relaxed), 1);
    assert!(hub_stats.peak_stream_buffer.load(Ordering::Relaxed) > 0);
}

#[tokio::test]
async fn half_close_works_in_both_directions() {
    let pair = Pair::quic(SessionOptions::default()).await;
    checks::half_close_works_in_both_directions(pair).await;
}

#[tokio::test]
async fn a_drain_asked_before_the_confirmation_is_sent_once_it_arrives() {
    let pair = Pair::quic(SessionOptions::default()).await;
    checks::a_drain_asked_before_the_confirmation_is_sent_once_it_arrives(pair).await;
}

#[tokio::test]
async fn shutdown_releases_every_stream_on_both_sides() {
    let pair = Pair::quic(SessionOptions::default()).await;
    checks::shutdown_releases_every_stream_on_both_sides(pair).await;
}

#[tokio::test]
async fn udp_datagrams_and_closes_travel_both_ways() {
    let pair = Pair::quic(SessionOptions::default()).await;
    checks::udp_datagrams_and_closes_travel_both_ways(pair).await;
}

/// The next datagram the raw hub receives.
async fn next_datagram(connection: &quinn::Connection) -> Datagram {
    let bytes = within("a datagram", connection.read_datagram())
        .await
        .unwrap();
    Datagram::parse(bytes).expect("a well-formed datagram")
}

/// An edge session over QUIC to a raw hub connection, so that a test decides which datagrams
/// are "lost"; the rest keeps the endpoints alive.
async fn edge_to_raw_hub(
    options: SessionOptions,
) -> (crate::SessionHandle, quinn::Connection, impl Sized) {
    let dir = tempfile::tempdir().unwrap();
    let identity = HubIdentity::load_or_generate(dir.path()).unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let server = server_endpoint(&identity, socket, &options).unwrap();
    let port = server.local_addr().unwrap().port();
    let client = client_endpoint(&HubTrust::Pin(identity.pin()), &options).unwrap();
    let connect = async {
        let mut link = Link::connect_quic(&client, "127.0.0.1", port, "localhost")
            .await
            .unwrap();
        link.write_line("hello\n").await.unwrap();
        link
    };
    let accept = async {
        let connecting = server.accept().await.unwrap().accept().unwrap();
        let connection = connecting.await.unwrap();
        // As the hub does once the edge has authenticated.
        super::endpoint::grant_session_limits(&connection, &options);
        connection
    };
    let (link, hub) = within("QUIC setup", async { tokio::join!(connect, accept) }).await;
    let (edge, events) = link.into_session(Bytes::new(), Role::Edge, options, Extensions::NONE);
    (edge, hub, (server, client, events, dir))
}

#[tokio::test]
async fn a_1200_byte_datagram_fits_from_the_first_packet() {
    let (edge, hub, _endpoints) = edge_to_raw_hub(SessionOptions::default()).await;
    let id = edge.open_udp(udp_header()).await.unwrap();
    assert!(matches!(next_datagram(&hub).await, Datagram::Open { id: of, .. } if of == id));
    let payload = Bytes::from(vec![7u8; 1200]);
    assert!(
        edge.send_udp(id, payload.clone()),
        "the datagram was dropped"
    );
    assert!(
        matches!(next_datagram(&hub).await, Datagram::Data { id: of, payload: got } if of == id && got == payload)
    );
    let floor = hub.max_datagram_size().unwrap();
    assert!(floor >= 1204, "only {floor} bytes fit a datagram");
}

#[tokio::test]
async fn a_lost_udp_open_is_repeated_until_the_hub_answers() {
    let (edge, hub, _endpoints) = edge_to_raw_hub(SessionOptions::default()).await;

    let header = udp_header();
    let id = edge.open_udp(header.clone()).await.unwrap();
    // The first open is "lost": the raw hub ignores it.
    assert!(matches!(next_datagram(&hub).await, Datagram::Open { id: of, .. } if of == id));
    // The open is repeated before the 2nd, 4th and 8th datagram, not before every one.
    let mut opens_before = Vec::new();
    for n in 1..=8u32 {
        assert!(edge.send_udp(id, Bytes::from(n.to_string())));
        let mut first = next_datagram(&hub).await;
        if let Datagram::Open {
            id: of,
            header: repeated,
        } = first
        {
            assert_eq!((of, &repeated[..]), (id, &header[..]));
            opens_before.push(n);
            first = next_datagram(&hub).await;
        }
        assert!(
            matches!(&first, Datagram::Data { id: of, payload } if *of == id && payload[..] == *n.to_string().as_bytes()),
            "datagram {n} did not follow: {first:?}"
        );
    }
    assert_eq!(opens_before, [2, 4, 8]);
    // A reply confirms the session: later datagrams go without the open.
    hub.send_datagram(
        Datagram::Data {
            id,
            payload: Bytes::from_static(b"reply"),
        }
        .encode(),
    )
    .unwrap();
    let confirmed = tokio::time::Instant::now() + DEADLINE;
    loop {
        // Datagrams 16, 32… would repeat the open while the session is unconfirmed.
        for _ in 0..16 {
            assert!(edge.send_udp(id, Bytes::from_static(b"later")));
        }
        let mut opens = 0;
        for _ in 0..16 {
            if matches!(next_datagram(&hub).await, Datagram::Open { .. }) {
                opens += 1;
                assert!(matches!(next_datagram(&hub).await, Datagram::Data { .. }));
            }
        }
        if opens == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < confirmed,
            "the reply never confirmed the session"
        );
    }
}

#[tokio::test]
async fn a_reset_aborts_the_stream_on_both_sides() {
    let pair = Pair::quic(SessionOptions::default()).await;
    checks::a_reset_aborts_the_stream_on_both_sides(pair).await;
}

#[tokio::test]
async fn the_hub_raises_the_stream_limit_as_streams_are_used() {
    let mut pair = Pair::quic(SessionOptions::default()).await;
    // Held open together: past the initial limit only if the hub raises it.
    let mut held = Vec::new();
    for _ in 0..INITIAL_STREAM_LIMIT * 4 {
        held.push(pair.open().await);
    }
    assert_eq!(pair.hub.session.active_streams(), INITIAL_STREAM_LIMIT * 4);
}

#[tokio::test]
async fn the_stream_limit_stops_at_the_cap() {
    let cap = INITIAL_STREAM_LIMIT * 2 + 3;
    let mut pair = Pair::quic(SessionOptions {
        max_streams: cap,
        ..SessionOptions::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(pair.open().await);
    }
    let one_more = pair
        .edge
        .session
        .open(Bytes::from_static(b"PROXY UNKNOWN\r\n"));
    assert!(within("the open past the cap", one_more).await.is_err());
}

#[tokio::test]
async fn a_read_takes_every_packet_that_has_arrived_at_once() {
    const WRITES: usize = 64;
    let (edge, hub, _endpoints) = edge_to_raw_hub(SessionOptions::default()).await;
    let _control = within("the control stream", hub.accept_bi()).await.unwrap();
    let (mut reader, _writer) = edge
        .open(Bytes::from_static(b"PROXY UNKNOWN\r\n"))
        .await
        .unwrap();
    let (mut send, _recv) = within("the stream", hub.accept_bi()).await.unwrap();
    let data = pattern(WRITES * 1024);
    for piece in data.chunks(1024) {
        send.write_all(piece).await.unwrap();
    }
    send.finish().unwrap();
    // Acknowledged means received: all of it waits in the edge's QUIC stream now.
    within("the edge's acknowledgement", send.stopped())
        .await
        .unwrap();
    let first = within("the read", reader.recv()).await.unwrap().unwrap();
    // Each packet carries at most one MTU's worth; one piece per packet would mean one
    // system call per packet onward to the socket.
    assert!(
        first.len() > 8 * 1452,
        "one read took only {} bytes of {}",
        first.len(),
        data.len()
    );
    let mut received = first.to_vec();
    while let Some(chunk) = within("the rest", reader.recv()).await.unwrap() {
        received.extend_from_slice(&chunk);
    }
    assert_eq!(Bytes::from(received), data);
}

#[tokio::test]
async fn the_hub_confirms_each_open_once_it_has_echoed_the_extensions() {
    let mut pair = Pair::quic(SessionOptions::default()).await;
    let edge = pair.edge.session.clone();
    eventually("the hub's echo of the extensions", || {
        edge.hub_confirms_opens()
    })
    .await;
    let stream = pair.open().await;
    within(
        "the hub's OPENED",
        stream.edge_reader.open_confirmed().cancelled(),
    )
    .await;
}

#[tokio::test]
async fn an_edge_that_confirmed_no_extension_waits_for_no_confirmation() {
    let options = SessionOptions {
        extensions: Extensions::NONE,
        ..SessionOptions::default()
    };
    let mut pair = Pair::quic(options).await;
    let stream = pair.open().await;
    assert!(stream.edge_reader.open_confirmed().is_cancelled());
    assert!(!pair.edge.session.hub_confirms_opens());
}
