//! The multiplexer pinned down with the in-process harness: credit, lane order, every protocol
//! violation, half-close, and shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;

use bytes::Bytes;
use remoteingress_wire::flow::{window_for, FlowError, MAX_WINDOW};
use remoteingress_wire::frame::{
    FrameError, FrameType, HEADER_LEN, MAX_DATA_CHUNK, MAX_PAYLOAD_LEN,
};

use crate::error::{CloseReason, ProtocolViolation};
use crate::harness::{
    checks, eventually, pattern, read_exactly, read_to_end, send_all, within, Pair, RawPeer,
};
use crate::options::{Role, SessionOptions};

const OPEN_LINE: &[u8] = b"PROXY TCP4 192.0.2.1 198.51.100.1 40000 80\r\n";

#[tokio::test]
async fn bytes_travel_both_ways_with_the_open_header() {
    let mut pair = Pair::mux(SessionOptions::default());
    let mut stream = pair.open().await;
    assert_eq!(&stream.header[..], OPEN_LINE);
    let up = pattern(300_000);
    send_all(&mut stream.edge_writer, up.clone()).await;
    assert_eq!(read_exactly(&mut stream.hub_reader, up.len()).await, up);
    let down = pattern(200_000);
    send_all(&mut stream.hub_writer, down.clone()).await;
    assert_eq!(
        read_exactly(&mut stream.edge_reader, down.len()).await,
        down
    );
    let stats = pair.hub.session.stats();
    assert_eq!(stats.bytes_in.load(Ordering::Relaxed), up.len() as u64);
    assert_eq!(stats.bytes_out.load(Ordering::Relaxed), down.len() as u64);
    assert_eq!(stats.streams_opened.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_stalled_stream_holds_at_most_its_window_and_others_keep_flowing() {
    let options = SessionOptions {
        budget: 1024 * 1024,
        ..SessionOptions::default()
    };
    let largest_window = u64::from(window_for(options.budget, 1));
    let mut pair = Pair::mux(options);
    let mut stalled = pair.open().await;
    let mut pusher = stalled.edge_writer;
    let pushed = tokio::spawn(async move {
        send_all(&mut pusher, pattern(8 * 1024 * 1024)).await;
    });
    // The hub never reads the stalled stream; the edge runs out of credit and waits.
    let edge_stats = &pair.edge.session.stats().flow_stalls;
    eventually("the stalled writer waits for credit", || {
        edge_stats.load(Ordering::Relaxed) > 0
    })
    .await;

    let mut other = pair.open().await;
    let data = pattern(3 * 1024 * 1024);
    let mut writer = other.edge_writer;
    let sent = data.clone();
    tokio::spawn(async move { send_all(&mut writer, sent).await });
    assert_eq!(read_exactly(&mut other.hub_reader, data.len()).await, data);

    let peak = pair
        .hub
        .session
        .stats()
        .peak_stream_buffer
        .load(Ordering::Relaxed);
    assert!(peak <= largest_window, "{peak} > {largest_window}");
    assert!(!pushed.is_finished(), "the stalled stream cannot finish");
    // Reading the stalled stream releases the writer.
    let drained = read_exactly(&mut stalled.hub_reader, 8 * 1024 * 1024).await;
    assert_eq!(drained.len(), 8 * 1024 * 1024);
    within("the stalled writer finishes", pushed).await.unwrap();
}

/// A budget lowered while the session runs (the hub sharing an edge's budget among its
/// tunnels) bounds what a stream opened afterwards may make the receiver hold.
#[tokio::test]
async fn a_lowered_budget_bounds_the_streams_opened_after() {
    let mut pair = Pair::mux(SessionOptions::default());
    let lowered = u64::from(remoteingress_wire::flow::MIN_WINDOW);
    pair.hub.session.set_budget(lowered);
    assert_eq!(pair.hub.session.budget(), lowered);
    let stalled = pair.open().await;
    let mut pusher = stalled.edge_writer;
    let pushed = tokio::spawn(async move {
        send_all(&mut pusher, pattern(8 * 1024 * 1024)).await;
    });
    let edge_stats = &pair.edge.session.stats().flow_stalls;
    eventually("the writer waits for credit", || {
        edge_stats.load(Ordering::Relaxed) > 0
    })
    .await;
    let hub_stats = pair.hub.session.stats();
    let peak = hub_stats.peak_stream_buffer.load(Ordering::Relaxed);
    assert!(peak <= lowered, "{peak} > {lowered}");
    pushed.abort();
}

#[tokio::test]
async fn control_frames_overtake_queued_data() {
    // The peer reads nothing at first, so the session's writer is blocked with data queued.
    let mut peer = RawPeer::new(Role::Edge, SessionOptions::default(), 16 * 1024);
    let session = peer.session.clone();
    let (_reader, mut writer) = session.open(Bytes::from_static(OPEN_LINE)).await.unwrap();
    let total = MAX_WINDOW as usize;
    let grant = MAX_WINDOW - remoteingress_wire::flow::INITIAL_WINDOW;
    peer.send(1, FrameType::WindowUpdateBack, &grant.to_be_bytes())
        .await;
    tokio::spawn(async move { send_all(&mut writer, pattern(total)).await });
    let bytes_out = &session.stats().bytes_out;
    eventually("all data queued", || {
        bytes_out.load(Ordering::Relaxed) == total as u64
    })
    .await;
    session
        .send_control(FrameType::ConfigAck, Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let mut data_before = 0;
    loop {
        let frame = peer.next_frame().await.expect("session writing");
        match frame.kind {
            FrameType::ConfigAck => break,
            FrameType::Data => data_before += frame.payload.len(),
            _ => {}
        }
    }
    assert!(
        data_before < total,
        "the control frame waited for all {total} bytes of data"
    );
}

/// Sends frames to a hub session as a misbehaving edge and returns why the hub closed.
async fn hub_closes_on(frames: &[(u32, FrameType, &[u8])]) -> CloseReason {
    hub_with_options_closes_on(SessionOptions::default(), frames).await
}

async fn hub_with_options_closes_on(
    options: SessionOptions,
    frames: &[(u32, FrameType, &[u8])],
) -> CloseReason {
    let mut peer = RawPeer::new(Role::Hub, options, 1024 * 1024);
    for (id, kind, payload) in frames {
        peer.send(*id, *kind, payload).await;
    }
    peer.close_reason().await
}

fn violation(reason: CloseReason) -> ProtocolViolation {
    match reason {
        CloseReason::Protocol(violation) => violation,
        other => panic!("closed for {other:?}, not a protocol violation"),
    }
}

#[tokio::test]
async fn malformed_headers_close_before_any_payload() {
    let mut peer = RawPeer::new(Role::Hub, SessionOptions::default(), 1024);
    let mut header = [0u8; HEADER_LEN];
    header[4] = 0x7F;
    peer.send_bytes(&header).await;
    assert_eq!(
        violation(peer.close_reason().await),
        ProtocolViolation::Frame(FrameError::UnknownType(0x7F))
    );

    let mut peer = RawPeer::new(Role::Hub, SessionOptions::default(), 1024);
    let mut header = [0u8; HEADER_LEN];
    header[3] = 1;
    header[4] = FrameType::Data as u8;
    header[5..9].copy_from_slice(&(MAX_PAYLOAD_LEN + 1).to_be_bytes());
    peer.send_bytes(&header).await;
    assert_eq!(
        violation(peer.close_reason().await),
        ProtocolViolation::Frame(FrameError::TooLong {
            len: MAX_PAYLOAD_LEN + 1,
            max: MAX_PAYLOAD_LEN
        })
    );

    assert_eq!(
        violation(hub_closes_on(&[(1, FrameType::WindowUpdate, &[0, 0, 1])]).await),
        ProtocolViolation::Frame(FrameError::BadLength {
            kind: FrameType::WindowUpdate,
            expected: 4,
            len: 3
        })
    );
}

#[tokio::test]
async fn stream_violations_close_the_tunnel_with_their_kind() {
    use FrameType::*;
    assert_eq!(
        violation(hub_closes_on(&[(7, Data, b"x")]).await),
        ProtocolViolation::UnknownStream { kind: Data, id: 7 }
    );
    assert_eq!(
        violation(hub_closes_on(&[(1, Open, OPEN_LINE), (1, Open, OPEN_LINE)]).await),
        ProtocolViolation::StreamIdReused(1)
    );
    assert_eq!(
        violation(hub_closes_on(&[(2, Open, OPEN_LINE), (1, Open, OPEN_LINE)]).await),
        ProtocolViolation::StreamIdReused(1)
    );
    assert_eq!(
        violation(hub_closes_on(&[(1, Open, OPEN_LINE), (1, Close, b""), (1, Close, b"")]).await),
        ProtocolViolation::ClosedTwice(1)
    );
    assert_eq!(
        violation(hub_closes_on(&[(1, Open, OPEN_LINE), (1, Close, b""), (1, Data, b"x")]).await),
        ProtocolViolation::DataAfterClose(1)
    );
    assert_eq!(
        violation(hub_closes_on(&[(1, Close, b"")]).await),
        ProtocolViolation::UnknownStream { kind: Close, id: 1 }
    );
}

#[tokio::test]
async fn credit_violations_close_the_tunnel() {
    use FrameType::*;
    let beyond = vec![0u8; MAX_WINDOW as usize + 1];
    assert_eq!(
        violation(hub_closes_on(&[(1, Open, OPEN_LINE), (1, Data, &beyond)]).await),
        ProtocolViolation::Flow {
            id: 1,
            error: FlowError::WindowExceeded {
                len: MAX_WINDOW + 1,
                credit: MAX_WINDOW
            }
        }
    );
    let zero = 0u32.to_be_bytes();
    assert_eq!(
        violation(hub_closes_on(&[(1, Open, OPEN_LINE), (1, WindowUpdate, &zero)]).await),
        ProtocolViolation::Flow {
            id: 1,
            error: FlowError::ZeroIncrement
        }
    );
    let overflow = MAX_WINDOW.to_be_bytes();
    assert_eq!(
        violation(hub_closes_on(&[(1, Open, OPEN_LINE), (1, WindowUpdate, &overflow)]).await),
        ProtocolViolation::Flow {
            id: 1,
            error: FlowError::CreditOverflow
        }
    );
    assert_eq!(
        violation(hub_closes_on(&[(9, WindowUpdate, &1u32.to_be_bytes())]).await),
        ProtocolViolation::UnknownStream {
            kind: WindowUpdate,
            id: 9
        }
    );
}

#[tokio::test]
async fn floods_and_stray_frames_close_the_tunnel() {
    use FrameType::*;
    let empties: Vec<(u32, FrameType, &[u8])> = vec![(1, Data, b""); 101];
    let mut frames = vec![(1, Open, OPEN_LINE)];
    frames.extend(empties);
    assert_eq!(
        violation(hub_closes_on(&frames).await),
        ProtocolViolation::EmptyDataFlood
    );
    assert_eq!(
        violation(hub_closes_on(&[(0, Pong, &[0; 8])]).await),
        ProtocolViolation::UnmatchedPong
    );
    assert_eq!(
        violation(hub_closes_on(&[(1, Open, OPEN_LINE), (1, DataBack, b"x")]).await),
        ProtocolViolation::UnexpectedFrame {
            kind: DataBack,
            from: Role::Edge
        }
    );
    assert_eq!(
        violation(hub_closes_on(&[(0, Config, b"{}")]).await),
        ProtocolViolation::UnexpectedFrame {
            kind: Config,
            from: Role::Edge
        }
    );
}

#[tokio::test]
async fn udp_violations_close_the_tunnel() {
    use FrameType::*;
    assert_eq!(
        violation(hub_closes_on(&[(1, UdpOpen, b"h"), (1, UdpOpen, b"h")]).await),
        ProtocolViolation::UdpIdReused(1)
    );
    assert_eq!(
        violation(hub_closes_on(&[(5, UdpData, b"x")]).await),
        ProtocolViolation::UnknownUdpSession(5)
    );
}

#[tokio::test]
async fn opens_past_the_cap_are_refused_and_a_peer_that_ignores_it_is_closed() {
    let options = SessionOptions {
        max_streams: 1,
        ..SessionOptions::default()
    };
    let mut peer = RawPeer::new(Role::Hub, options.clone(), 1024 * 1024);
    peer.send(1, FrameType::Open, OPEN_LINE).await;
    peer.send(2, FrameType::Open, OPEN_LINE).await;
    let refused = peer.next_of(FrameType::CloseBack).await;
    assert_eq!(
        refused.stream_id, 2,
        "the stream past the cap is refused at once"
    );

    use FrameType::*;
    let opens: Vec<(u32, FrameType, &[u8])> = (1..=3).map(|id| (id, Open, OPEN_LINE)).collect();
    assert_eq!(
        violation(hub_with_options_closes_on(options, &opens).await),
        ProtocolViolation::RefusedStreamsIgnored
    );
}

#[tokio::test]
async fn a_peer_that_floods_pings_without_reading_is_closed() {
    // A tiny buffer: the session's PONGs pile up in its control lane.
    let mut peer = RawPeer::new(Role::Edge, SessionOptions::default(), 1024);
    for _ in 0..3_000 {
        peer.send(0, FrameType::Ping, &[1; 8]).await;
        if peer.session.is_closed() {
            break;
        }
    }
    assert_eq!(
        violation(peer.close_reason().await),
        ProtocolViolation::ControlFlood
    );
}

#[tokio::test]
async fn a_silent_edge_is_gone_after_the_deadline() {
    let options = SessionOptions {
        idle_timeout: std::time::Duration::from_millis(100),
        ..SessionOptions::default()
    };
    let peer = RawPeer::new(Role::Hub, options, 1024);
    assert_eq!(
        peer.close_reason().await,
        CloseReason::Idle(std::time::Duration::from_millis(100))
    );
}

#[tokio::test]
async fn pings_are_answered_and_give_the_hub_its_round_trip() {
    let options = SessionOptions {
        ping_interval: std::time::Duration::from_millis(20),
        ..SessionOptions::default()
    };
    let mut pair = Pair::mux(options);
    loop {
        let event = within("a round trip", pair.hub.events.recv())
            .await
            .unwrap();
        if let crate::event::SessionEvent::RoundTrip(_) = event {
            break;
        }
    }
    assert!(pair.hub.session.rtt().is_some());
    let edge = &pair.edge.session;
    eventually("the edge learns the round trip from the next PING", || {
        edge.rtt().is_some()
    })
    .await;
}

#[tokio::test]
async fn dropping_both_halves_closes_the_stream_on_both_sides() {
    let mut pair = Pair::mux(SessionOptions::default());
    let stream = pair.open().await;
    drop(stream.hub_reader);
    drop(stream.hub_writer);
    let mut edge_reader = stream.edge_reader;
    assert_eq!(read_to_end(&mut edge_reader).await, b"");
    drop(stream.edge_writer);
    let (edge, hub) = (&pair.edge.session, &pair.hub.session);
    eventually("both sides forget the stream", || {
        edge.active_streams() == 0 && hub.active_streams() == 0
    })
    .await;
}

#[tokio::test]
async fn half_close_works_in_both_directions() {
    checks::half_close_works_in_both_directions(Pair::mux(SessionOptions::default())).await;
}

#[tokio::test]
async fn a_drain_asked_before_the_confirmation_is_sent_once_it_arrives() {
    let pair = Pair::mux(SessionOptions::default());
    checks::a_drain_asked_before_the_confirmation_is_sent_once_it_arrives(pair).await;
}

#[tokio::test]
async fn shutdown_releases_every_stream_on_both_sides() {
    checks::shutdown_releases_every_stream_on_both_sides(Pair::mux(SessionOptions::default()))
        .await;
}

#[tokio::test]
async fn udp_datagrams_and_closes_travel_both_ways() {
    checks::udp_datagrams_and_closes_travel_both_ways(Pair::mux(SessionOptions::default())).await;
}

/// Reads frames until `stream` has delivered `len` more DATA bytes, granting back what it reads
/// so the stream keeps its credit; returns the DATA bytes of each stream id seen meanwhile.
async fn read_data_of(
    peer: &mut RawPeer,
    stream: u32,
    len: usize,
    grant: bool,
) -> std::collections::BTreeMap<u32, usize> {
    let mut seen = std::collections::BTreeMap::new();
    while seen.get(&stream).copied().unwrap_or(0) < len {
        let frame = peer.next_frame().await.expect("session writing");
        if frame.kind == FrameType::Data {
            *seen.entry(frame.stream_id).or_default() += frame.payload.len();
            if grant {
                let back = u32::try_from(frame.payload.len()).unwrap();
                peer.send(
                    frame.stream_id,
                    FrameType::WindowUpdateBack,
                    &back.to_be_bytes(),
                )
                .await;
            }
        }
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn an_elephant_moves_to_the_sustained_lane_and_still_gets_its_share() {
    use remoteingress_wire::flow::INITIAL_WINDOW;
    use remoteingress_wire::qos::{SUSTAINED_AFTER, SUSTAINED_RATE};
    let hour = std::time::Duration::from_secs(3600);
    let options = SessionOptions {
        idle_timeout: hour,
        ping_interval: hour,
        ..SessionOptions::default()
    };
    let mut peer = RawPeer::new(Role::Edge, options, 64 * 1024);
    let session = peer.session.clone();
    let (_elephant_reader, mut elephant) =
        session.open(Bytes::from_static(OPEN_LINE)).await.unwrap();
    let (_mouse_reader, mut mouse) = session.open(Bytes::from_static(OPEN_LINE)).await.unwrap();
    let full = (MAX_WINDOW - INITIAL_WINDOW).to_be_bytes();
    peer.send(1, FrameType::WindowUpdateBack, &full).await;
    peer.send(2, FrameType::WindowUpdateBack, &full).await;

    // Old enough, then fast enough: the elephant becomes sustained.
    tokio::time::advance(SUSTAINED_AFTER + std::time::Duration::from_secs(1)).await;
    let enough = (SUSTAINED_RATE * 12.0) as usize;
    let pushed = tokio::spawn(async move {
        send_all(&mut elephant, pattern(enough)).await;
        elephant
    });
    read_data_of(&mut peer, 1, enough, true).await;
    let mut elephant = within("the elephant's push", pushed).await.unwrap();

    // The peer stops reading; the mouse queues its window of data, then the elephant its own.
    let chunk = MAX_WINDOW as usize;
    let out = &session.stats().bytes_out;
    let before = out.load(Ordering::Relaxed);
    tokio::spawn(async move { send_all(&mut mouse, pattern(chunk)).await });
    eventually("the mouse's data queued", || {
        out.load(Ordering::Relaxed) == before + chunk as u64
    })
    .await;
    tokio::spawn(async move { send_all(&mut elephant, pattern(chunk)).await });
    eventually("the elephant's data queued", || {
        out.load(Ordering::Relaxed) == before + 2 * chunk as u64
    })
    .await;

    // Ordinary data goes first while no time passes: the elephant gets at most the one frame
    // of allowance it saved up while the data lane was idle...
    let first = read_data_of(&mut peer, 2, chunk / 2, false).await;
    let saved = first.get(&1).copied().unwrap_or(0);
    assert!(
        saved <= MAX_DATA_CHUNK,
        "the sustained lane waited: {first:?}"
    );
    // ...but once time passes, the sustained lane gets its guaranteed share before the mouse
    // has finished.
    tokio::time::advance(std::time::Duration::from_secs(1)).await;
    let mut later = std::collections::BTreeMap::new();
    while later.get(&1).copied().unwrap_or(0) == 0 {
        let frame = peer.next_frame().await.expect("session writing");
        if frame.kind == FrameType::Data {
            *later.entry(frame.stream_id).or_default() += frame.payload.len();
        }
    }
    let mouse_total = first[&2] + later.get(&2).copied().unwrap_or(0);
    assert!(
        mouse_total < chunk,
        "the elephant waited for all of the mouse's data: {later:?}"
    );
}
