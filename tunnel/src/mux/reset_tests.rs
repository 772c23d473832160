//! The RESET extension over the multiplexer: announced, confirmed, never sent to a peer that did
//! not confirm it; stale frames of a reset stream; and bursts of opens that the session serves
//! with backpressure instead of closing the tunnel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use remoteingress_wire::extension::Extensions;
use remoteingress_wire::frame::{Frame, FrameType};

use crate::error::ProtocolViolation;
use crate::event::SessionEvent;
use crate::harness::{checks, eventually, within, Pair, RawPeer};
use crate::options::{Role, SessionOptions};
use crate::stream::StreamWriter;

const OPEN_LINE: &[u8] = b"PROXY TCP4 192.0.2.1 198.51.100.1 40000 80\r\n";

/// Frames a raw peer sends: stream id, type, payload.
type Frames<'a> = &'a [(u32, FrameType, &'a [u8])];

/// The writer of the next stream the hub session hands its owner.
async fn next_opened(peer: &mut RawPeer) -> StreamWriter {
    loop {
        match within("the hub takes the stream", peer.events.recv()).await {
            Some(SessionEvent::Opened { writer, .. }) => return writer,
            Some(_) => {}
            None => panic!("the session ended"),
        }
    }
}

/// Frames the session writes up to and including the first of `kind`.
async fn frames_until(peer: &mut RawPeer, kind: FrameType) -> Vec<Frame> {
    let mut seen = Vec::new();
    loop {
        let frame = peer.next_frame().await.expect("session still writing");
        let done = frame.kind == kind;
        seen.push(frame);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn a_reset_aborts_the_stream_on_both_sides() {
    checks::a_reset_aborts_the_stream_on_both_sides(Pair::mux(SessionOptions::default())).await;
}

#[tokio::test]
async fn an_original_edge_never_sees_a_reset() {
    let mut peer = RawPeer::new(Role::Hub, SessionOptions::default(), 1024 * 1024);
    peer.send(1, FrameType::Open, OPEN_LINE).await;
    next_opened(&mut peer).await.reset();
    let frames = frames_until(&mut peer, FrameType::CloseBack).await;
    assert!(
        frames.iter().all(|f| f.kind != FrameType::Reset),
        "{frames:?}"
    );
}

#[tokio::test]
async fn an_edge_that_confirmed_reset_gets_it_and_may_send_stale_frames() {
    let mut peer = RawPeer::new(Role::Hub, SessionOptions::default(), 1024 * 1024);
    peer.send(0, FrameType::Extensions, b"[\"reset\",\"future\"]")
        .await;
    peer.send(1, FrameType::Open, OPEN_LINE).await;
    next_opened(&mut peer).await.reset();
    let reset = frames_until(&mut peer, FrameType::Reset).await;
    assert_eq!(reset.last().map(|f| f.stream_id), Some(1));
    eventually("the hub releases the stream", || {
        peer.session.active_streams() == 0
    })
    .await;
    // Frames the edge sent before it saw the RESET are dropped, not violations.
    peer.send(1, FrameType::Data, b"late").await;
    peer.send(1, FrameType::Close, b"").await;
    peer.send(1, FrameType::Reset, b"").await;
    peer.send(3, FrameType::Open, OPEN_LINE).await;
    let _still_served = next_opened(&mut peer).await;
    assert!(!peer.session.is_closed());
}

#[tokio::test]
async fn the_edge_confirms_only_what_the_hub_offered() {
    for (agreed, first) in [
        (Extensions::ALL, FrameType::Extensions),
        (Extensions::NONE, FrameType::Open),
    ] {
        let mut peer = RawPeer::agreeing(Role::Edge, SessionOptions::default(), 1 << 20, agreed);
        let session = peer.session.clone();
        let _stream = within("open", session.open(OPEN_LINE.into())).await;
        let frame = peer.next_frame().await.expect("a frame");
        assert_eq!(frame.kind, first);
        if first == FrameType::Extensions {
            assert_eq!(Extensions::parse(&frame.payload), Ok(Extensions::ALL));
        }
    }
}

#[tokio::test]
async fn reset_and_extensions_out_of_turn_close_the_tunnel() {
    use FrameType::*;
    let cases: [(Frames, ProtocolViolation); 3] = [
        (
            &[(1, Open, OPEN_LINE), (1, Reset, b"")],
            ProtocolViolation::UnexpectedFrame {
                kind: Reset,
                from: Role::Edge,
            },
        ),
        (
            &[(0, Extensions, b"[]"), (0, Extensions, b"[]")],
            ProtocolViolation::Extensions("second EXTENSIONS frame".into()),
        ),
        (
            &[(0, Extensions, b"{}")],
            ProtocolViolation::Extensions(
                "EXTENSIONS payload is not a JSON list of names: invalid type: map, expected a sequence at line 1 column 0"
                    .into(),
            ),
        ),
    ];
    for (frames, expected) in cases {
        let mut peer = RawPeer::new(Role::Hub, SessionOptions::default(), 1024 * 1024);
        for (id, kind, payload) in frames {
            peer.send(*id, *kind, payload).await;
        }
        match peer.close_reason().await {
            crate::CloseReason::Protocol(violation) => assert_eq!(violation, expected),
            other => panic!("closed for {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_opens_within_the_cap_is_served() {
    const OPENS: u32 = 10_000;
    let mut peer = RawPeer::new(Role::Hub, SessionOptions::default(), 4 << 20);
    let mut burst = bytes::BytesMut::new();
    for id in 1..=OPENS {
        remoteingress_wire::frame::encode_frame(&mut burst, id, FrameType::Open, OPEN_LINE);
    }
    // One write: the hub reads them all in a few reads.
    peer.send_bytes(&burst).await;
    let mut events = std::mem::replace(&mut peer.events, tokio::sync::mpsc::channel(1).1);
    let owner = tokio::spawn(async move {
        let mut streams = Vec::new();
        while streams.len() < OPENS as usize {
            match events.recv().await {
                Some(SessionEvent::Opened { reader, writer, .. }) => streams.push((reader, writer)),
                Some(_) => {}
                None => break,
            }
        }
        (streams, events)
    });
    // The hub's answers (window updates) fit the connection's buffer: nobody needs to read them.
    let (streams, _events) = within("the owner takes every stream", owner).await.unwrap();
    assert_eq!(streams.len(), OPENS as usize);
    assert_eq!(peer.session.active_streams(), OPENS as usize);
    assert!(
        !peer.session.is_closed(),
        "{:?}",
        peer.session.close_reason()
    );
}
