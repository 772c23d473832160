//! Liveness on the TLS transport: an edge probes a hub that answers (extension `liveness`),
//! reports a silent one suspect before the deadline ends it, gives an original hub the old
//! silence, and learns from the hub that each open arrived.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use remoteingress_wire::extension::Extensions;
use remoteingress_wire::frame::FrameType;

use crate::error::{CloseReason, ProtocolViolation};
use crate::event::SessionEvent;
use crate::harness::{within, Pair, RawPeer};
use crate::options::{Role, SessionOptions, ORIGINAL_HUB_SILENCE};

const OPEN_LINE: &[u8] = b"PROXY TCP4 192.0.2.1 198.51.100.1 40000 80\r\n";

fn quick() -> SessionOptions {
    SessionOptions {
        ping_interval: Duration::from_millis(20),
        idle_timeout: Duration::from_millis(300),
        ..SessionOptions::default()
    }
}

#[tokio::test]
async fn an_edge_probes_a_silent_hub_reports_it_suspect_and_ends_it_at_the_deadline() {
    let mut hub = RawPeer::agreeing(Role::Edge, quick(), 1 << 16, Extensions::ALL);
    assert_eq!(hub.next_frame().await.unwrap().kind, FrameType::Extensions);
    hub.next_of(FrameType::Ping).await;
    loop {
        let event = within("the edge's report", hub.events.recv()).await;
        if let Some(SessionEvent::Suspect { silent }) = event {
            assert!(
                silent >= Duration::from_millis(40),
                "two intervals: {silent:?}"
            );
            break;
        }
    }
    assert!(hub.session.is_suspect());
    assert!(
        !hub.session.is_closed(),
        "suspect comes before the deadline"
    );
    assert_eq!(
        hub.close_reason().await,
        CloseReason::Idle(Duration::from_millis(300))
    );
}

#[tokio::test(start_paused = true)]
async fn an_original_hub_gets_the_silence_it_was_always_given() {
    let hub = RawPeer::new(Role::Edge, SessionOptions::default(), 1 << 16);
    tokio::time::sleep(ORIGINAL_HUB_SILENCE - Duration::from_secs(1)).await;
    assert!(
        !hub.session.is_closed(),
        "an original hub PINGs only every 15 s"
    );
    assert!(!hub.session.is_suspect());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        hub.session.close_reason(),
        Some(CloseReason::Idle(ORIGINAL_HUB_SILENCE))
    );
}

#[tokio::test]
async fn a_hub_answers_the_pings_and_confirms_the_opens_of_an_edge_that_agreed() {
    let mut edge = RawPeer::new(Role::Hub, SessionOptions::default(), 1 << 16);
    edge.send(0, FrameType::Extensions, b"[\"liveness\"]").await;
    edge.send(0, FrameType::Ping, &[7; 8]).await;
    assert_eq!(&edge.next_of(FrameType::Pong).await.payload[..], &[7; 8]);
    edge.send(1, FrameType::Open, OPEN_LINE).await;
    assert_eq!(edge.next_of(FrameType::Opened).await.stream_id, 1);

    let edge = RawPeer::new(Role::Hub, SessionOptions::default(), 1 << 16);
    let mut edge = edge;
    edge.send(0, FrameType::Ping, &[7; 8]).await;
    assert_eq!(
        edge.close_reason().await,
        CloseReason::Protocol(ProtocolViolation::UnexpectedFrame {
            kind: FrameType::Ping,
            from: Role::Edge
        }),
        "an edge that did not agree may not probe"
    );
}

#[tokio::test]
async fn a_hub_learns_the_round_trip_an_edge_that_probes_measured() {
    let mut edge = RawPeer::new(Role::Hub, SessionOptions::default(), 1 << 16);
    edge.send(0, FrameType::Extensions, b"[\"liveness\"]").await;
    edge.send(0, FrameType::Ping, &1234u64.to_be_bytes()).await;
    edge.next_of(FrameType::Pong).await;
    loop {
        match within("the round trip", edge.events.recv()).await {
            Some(SessionEvent::RoundTrip(rtt)) => {
                assert_eq!(rtt, Duration::from_micros(1234));
                break;
            }
            Some(_) => {}
            None => panic!("the session ended"),
        }
    }
}

#[tokio::test]
async fn any_answer_of_the_hub_confirms_an_open() {
    let mut pair = Pair::mux(SessionOptions::default());
    let stream = pair.open().await;
    within(
        "the hub's confirmation",
        stream.edge_reader.open_confirmed().cancelled(),
    )
    .await;

    let mut hub = RawPeer::agreeing(
        Role::Edge,
        SessionOptions::default(),
        1 << 16,
        Extensions::ALL,
    );
    let session = hub.session.clone();
    let (first, _first_writer) = session.open(OPEN_LINE.into()).await.unwrap();
    let (second, _second_writer) = session.open(OPEN_LINE.into()).await.unwrap();
    let confirmed = [first.open_confirmed(), second.open_confirmed()];
    hub.next_of(FrameType::Open).await;
    assert!(!confirmed[0].is_cancelled(), "not before the hub answers");
    hub.send(1, FrameType::WindowUpdateBack, &1000u32.to_be_bytes())
        .await;
    within("credit confirms", confirmed[0].cancelled()).await;
    assert!(!confirmed[1].is_cancelled());
    hub.send(2, FrameType::Opened, b"").await;
    within("OPENED confirms", confirmed[1].cancelled()).await;

    let hub = RawPeer::new(Role::Edge, SessionOptions::default(), 1 << 16);
    let (original, _writer) = hub.session.open(OPEN_LINE.into()).await.unwrap();
    assert!(
        original.open_confirmed().is_cancelled(),
        "an original hub never confirms: nothing to wait for"
    );
}

/// When the edge received something from the hub, over a path that delays every write by
/// `delay` each way; the ends of that path, the edge's first.
type Arrivals = std::sync::Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>;

fn slow_path(delay: Duration) -> (tokio::io::DuplexStream, tokio::io::DuplexStream, Arrivals) {
    let (edge_io, edge_end) = tokio::io::duplex(1 << 16);
    let (hub_end, hub_io) = tokio::io::duplex(1 << 16);
    let (edge_read, edge_write) = tokio::io::split(edge_end);
    let (hub_read, hub_write) = tokio::io::split(hub_end);
    let arrivals = Arrivals::default();
    let paths = [
        (edge_read, hub_write, None),
        (hub_read, edge_write, Some(arrivals.clone())),
    ];
    for (mut from, mut to, record) in paths {
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n @ 1..) = from.read(&mut buf).await {
                tokio::time::sleep(delay).await;
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                if let Some(record) = &record {
                    record.lock().unwrap().push(tokio::time::Instant::now());
                }
            }
        });
    }
    (edge_io, hub_io, arrivals)
}

/// An idle edge hears from its hub at least every interval and a half, whatever the phase
/// between their probe timers, so an idle tunnel never comes near the suspect threshold (two
/// intervals). When both sides skipped their probe after hearing from the other, the gap
/// reached two intervals plus a round trip, and idle tunnels were replaced every few minutes.
#[tokio::test(start_paused = true)]
async fn an_idle_edge_hears_from_its_hub_every_interval_and_a_half_whatever_the_phase() {
    let options = SessionOptions::default();
    let longest_allowed = options.ping_interval * 3 / 2;
    for offset in (0..1_000).step_by(50).map(Duration::from_millis) {
        let (edge_io, hub_io, arrivals) = slow_path(Duration::from_millis(20));
        let agreed = options.extensions;
        let (edge, _edge_events) = crate::session::spawn_session(
            edge_io,
            bytes::Bytes::new(),
            Role::Edge,
            options.clone(),
            agreed,
        );
        tokio::time::sleep(offset).await;
        let (hub, _hub_events) = crate::session::spawn_session(
            hub_io,
            bytes::Bytes::new(),
            Role::Hub,
            options.clone(),
            Extensions::NONE,
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        let arrivals = arrivals.lock().unwrap().clone();
        let longest = arrivals
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .max()
            .unwrap();
        assert!(
            longest <= longest_allowed,
            "{longest:?} without a word from the hub, which started {offset:?} after the edge"
        );
        assert!(!edge.is_suspect() && !edge.is_closed());
        edge.close("done");
        hub.close("done");
    }
}
