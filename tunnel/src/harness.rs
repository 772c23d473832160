//! An in-process test harness in the manner of quinn's `Pair`: an edge session and a hub
//! session connected in memory (TLS transport's multiplexer over `tokio::io::duplex`) or over
//! QUIC on loopback, and a raw peer that injects and reads frames one by one.

use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use remoteingress_wire::extension::Extensions;
use remoteingress_wire::frame::{encode_frame, Frame, FrameDecoder, FrameType};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use crate::error::CloseReason;
use crate::event::SessionEvent;
use crate::link::Link;
use crate::options::{Role, SessionOptions};
use crate::quic::{client_endpoint, server_endpoint};
use crate::session::{spawn_session, SessionHandle};
use crate::stream::{StreamReader, StreamWriter};
use crate::tls::{HubIdentity, HubTrust};

/// How long a test waits for something that must happen before it fails.
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

/// `future`, or a test failure naming `what` once the deadline has passed.
pub(crate) async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {DEADLINE:?}"))
}

/// Polls `condition` until it holds, failing the test at the deadline.
pub(crate) async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// One side's session and its events.
pub(crate) struct Side {
    pub(crate) session: SessionHandle,
    pub(crate) events: mpsc::Receiver<SessionEvent>,
}

/// Both halves of one stream as each side sees it.
pub(crate) struct StreamPair {
    pub(crate) edge_reader: StreamReader,
    pub(crate) edge_writer: StreamWriter,
    pub(crate) hub_reader: StreamReader,
    pub(crate) hub_writer: StreamWriter,
    /// The OPEN header as the hub received it.
    pub(crate) header: Bytes,
}

/// An edge session and a hub session talking to each other.
pub(crate) struct Pair {
    pub(crate) edge: Side,
    pub(crate) hub: Side,
    /// Keeps the hub's QUIC endpoint (and its certificate directory) alive.
    _keep: Option<(quinn::Endpoint, tempfile::TempDir)>,
}

type Started = (SessionHandle, mpsc::Receiver<SessionEvent>);

impl Pair {
    fn new(
        edge: Started,
        hub: Started,
        keep: Option<(quinn::Endpoint, tempfile::TempDir)>,
    ) -> Self {
        Self {
            edge: Side {
                session: edge.0,
                events: edge.1,
            },
            hub: Side {
                session: hub.0,
                events: hub.1,
            },
            _keep: keep,
        }
    }

    /// Over the TLS transport's multiplexer, in memory.
    pub(crate) fn mux(options: SessionOptions) -> Self {
        let (edge_io, hub_io) = tokio::io::duplex(256 * 1024);
        let agreed = options.extensions;
        Self::new(
            spawn_session(edge_io, Bytes::new(), Role::Edge, options.clone(), agreed),
            spawn_session(hub_io, Bytes::new(), Role::Hub, options, Extensions::NONE),
            None,
        )
    }

    /// Over QUIC on loopback, after the same one-line exchange the real handshake makes.
    pub(crate) async fn quic(options: SessionOptions) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let identity = HubIdentity::load_or_generate(dir.path()).expect("hub identity");
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("UDP socket");
        socket.set_nonblocking(true).expect("non-blocking socket");
        let server = server_endpoint(&identity, socket, &options).expect("server endpoint");
        let addr = server.local_addr().expect("server address");
        let client =
            client_endpoint(&HubTrust::Pin(identity.pin()), &options).expect("client endpoint");
        let connect = async {
            let mut link = Link::connect_quic(&client, "127.0.0.1", addr.port(), "localhost")
                .await
                .expect("edge connects");
            link.write_line("hello\n").await.expect("edge line");
            link
        };
        let accept = async {
            let incoming = server.accept().await.expect("incoming connection");
            let mut link = Link::accept_quic(incoming).await.expect("hub accepts");
            let (line, rest) = link.read_line(64).await.expect("hub reads the line");
            assert_eq!(&line[..], b"hello");
            (link, rest)
        };
        let (edge_link, (hub_link, rest)) =
            within("QUIC setup", async { tokio::join!(connect, accept) }).await;
        let agreed = options.extensions;
        Self::new(
            edge_link.into_session(Bytes::new(), Role::Edge, options.clone(), agreed),
            hub_link.into_session(rest, Role::Hub, options, Extensions::NONE),
            Some((server, dir)),
        )
    }

    /// Opens a stream from the edge and takes it on the hub.
    pub(crate) async fn open(&mut self) -> StreamPair {
        let header = Bytes::from_static(b"PROXY TCP4 192.0.2.1 198.51.100.1 40000 80\r\n");
        let (edge_reader, edge_writer) =
            within("edge opens a stream", self.edge.session.open(header))
                .await
                .expect("stream opened");
        loop {
            let event = within("the hub sees the stream", self.hub.events.recv())
                .await
                .expect("hub session alive");
            if let SessionEvent::Opened {
                reader,
                writer,
                header,
            } = event
            {
                return StreamPair {
                    edge_reader,
                    edge_writer,
                    hub_reader: reader,
                    hub_writer: writer,
                    header,
                };
            }
        }
    }
}

/// Sends `data` whole, in chunks as credit allows.
pub(crate) async fn send_all(writer: &mut StreamWriter, mut data: Bytes) {
    while !data.is_empty() {
        let credit = writer.reserve().await.expect("credit");
        let chunk = data.split_to(credit.min(data.len()));
        writer.send(chunk).await.expect("sent");
    }
}

/// Reads until the peer finishes; returns everything, reporting it consumed as it goes.
pub(crate) async fn read_to_end(reader: &mut StreamReader) -> Vec<u8> {
    let mut all = Vec::new();
    while let Some(chunk) = reader.recv().await.expect("not aborted") {
        reader.consumed(chunk.len()).await;
        all.extend_from_slice(&chunk);
    }
    all
}

/// Reads exactly `len` bytes (reporting them consumed).
pub(crate) async fn read_exactly(reader: &mut StreamReader, len: usize) -> Vec<u8> {
    let mut all = Vec::new();
    while all.len() < len {
        let chunk = reader
            .recv()
            .await
            .expect("not aborted")
            .expect("more bytes");
        reader.consumed(chunk.len()).await;
        all.extend_from_slice(&chunk);
    }
    all
}

/// The PROXY v2 header of a UDP client, as an edge sends it to open a UDP session.
pub(crate) fn udp_header() -> Bytes {
    use remoteingress_wire::proxy::{ProxyV2, V2Transport};
    let client = "192.0.2.1:40000".parse().expect("address");
    let edge = "198.51.100.1:53".parse().expect("address");
    ProxyV2::proxy(V2Transport::Datagram, client, edge)
        .to_bytes()
        .into()
}

/// Deterministic bytes.
pub(crate) fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// A session whose peer is the test itself, writing and reading raw frames.
pub(crate) struct RawPeer {
    io: DuplexStream,
    decoder: FrameDecoder,
    scratch: Vec<u8>,
    pub(crate) session: SessionHandle,
    /// The session's events (kept open so that it never finds its owner gone).
    pub(crate) events: mpsc::Receiver<SessionEvent>,
}

impl RawPeer {
    /// A session in `role` whose peer is raw and speaks the original protocol; `buffer` bounds
    /// the bytes in flight each way.
    pub(crate) fn new(role: Role, options: SessionOptions, buffer: usize) -> Self {
        Self::agreeing(role, options, buffer, Extensions::NONE)
    }

    /// As [`RawPeer::new`], for an edge session that confirms `agreed` to its raw hub.
    pub(crate) fn agreeing(
        role: Role,
        options: SessionOptions,
        buffer: usize,
        agreed: Extensions,
    ) -> Self {
        let (io, session_io) = tokio::io::duplex(buffer);
        let (session, events) = spawn_session(session_io, Bytes::new(), role, options, agreed);
        Self {
            io,
            decoder: FrameDecoder::new(),
            scratch: vec![0; 64 * 1024],
            session,
            events,
        }
    }

    /// Writes raw bytes to the session.
    pub(crate) async fn send_bytes(&mut self, bytes: &[u8]) {
        // A session that has closed stops reading: what is left unwritten no longer matters.
        let _ = within("raw write", self.io.write_all(bytes)).await;
    }

    /// Writes one frame to the session.
    pub(crate) async fn send(&mut self, stream_id: u32, kind: FrameType, payload: &[u8]) {
        let mut buf = BytesMut::new();
        encode_frame(&mut buf, stream_id, kind, payload);
        self.send_bytes(&buf).await;
    }

    /// The next frame the session wrote, or `None` once it has closed the connection.
    pub(crate) async fn next_frame(&mut self) -> Option<Frame> {
        within("a frame from the session", async {
            loop {
                if let Some(frame) = self
                    .decoder
                    .next_frame()
                    .expect("session writes valid frames")
                {
                    return Some(frame);
                }
                match self.io.read(&mut self.scratch).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.decoder.feed(&self.scratch[..n]),
                }
            }
        })
        .await
    }

    /// The next frame of `kind`, skipping others.
    pub(crate) async fn next_of(&mut self, kind: FrameType) -> Frame {
        loop {
            let frame = self.next_frame().await.expect("session still writing");
            if frame.kind == kind {
                return frame;
            }
        }
    }

    /// Waits for the session to end and returns why.
    pub(crate) async fn close_reason(&self) -> CloseReason {
        within("the session closes", self.session.closed()).await;
        self.session
            .close_reason()
            .expect("a closed session has a reason")
    }
}

/// Checks for behaviour both transports share: each takes a fresh pair.
pub(crate) mod checks {
    use bytes::Bytes;

    use super::{
        eventually, pattern, read_exactly, read_to_end, send_all, udp_header, within, Pair,
    };
    use crate::error::{CloseReason, SessionError, StreamAborted};
    use crate::event::SessionEvent;

    /// Each direction finishes on its own; the stream is forgotten once both have.
    pub(crate) async fn half_close_works_in_both_directions(mut pair: Pair) {
        let mut stream = pair.open().await;
        send_all(&mut stream.edge_writer, Bytes::from_static(b"request")).await;
        stream.edge_writer.finish().await;
        assert_eq!(read_to_end(&mut stream.hub_reader).await, b"request");
        // The edge has finished sending, yet still receives.
        send_all(&mut stream.hub_writer, Bytes::from_static(b"response")).await;
        assert_eq!(read_exactly(&mut stream.edge_reader, 8).await, b"response");
        assert_eq!(
            pair.hub.session.active_streams(),
            1,
            "half-closed, still open"
        );
        stream.hub_writer.finish().await;
        assert_eq!(read_to_end(&mut stream.edge_reader).await, b"");
        drop(stream);
        let (edge, hub) = (&pair.edge.session, &pair.hub.session);
        eventually("both sides forget the stream", || {
            edge.active_streams() == 0 && hub.active_streams() == 0
        })
        .await;
    }

    /// A drain asked before the edge's confirmation of its extensions has arrived is sent once
    /// it arrives (the hub learns the agreement only after the session started), and once only.
    pub(crate) async fn a_drain_asked_before_the_confirmation_is_sent_once_it_arrives(
        mut pair: Pair,
    ) {
        assert!(
            !pair.hub.session.drain().await,
            "the edge has not confirmed DRAIN yet"
        );
        within("the edge to be asked to drain", async {
            loop {
                match pair.edge.events.recv().await {
                    Some(SessionEvent::Drain) => return,
                    Some(_) => {}
                    None => panic!("the session ended"),
                }
            }
        })
        .await;
        assert!(pair.hub.session.drain().await, "asked already");
    }

    /// Closing one side ends every stream on both sides and the peer's session, which learns
    /// that its peer closed.
    pub(crate) async fn shutdown_releases_every_stream_on_both_sides(mut pair: Pair) {
        let mut streams = Vec::new();
        for _ in 0..3 {
            streams.push(pair.open().await);
        }
        pair.hub.session.close("test over");
        for stream in &mut streams {
            let edge_read = within("edge reader ends", stream.edge_reader.recv()).await;
            assert_eq!(edge_read, Err(StreamAborted));
            let hub_read = within("hub reader ends", stream.hub_reader.recv()).await;
            assert_eq!(hub_read, Err(StreamAborted));
            let reserved = within("hub writer fails", stream.hub_writer.reserve()).await;
            assert_eq!(reserved, Err(SessionError::Closed));
        }
        within("the edge session ends", pair.edge.session.closed()).await;
        let hub_reason = pair.hub.session.close_reason();
        assert_eq!(hub_reason, Some(CloseReason::Local("test over".into())));
        assert_eq!(
            pair.edge.session.close_reason(),
            Some(CloseReason::PeerClosed)
        );
        let opened = pair.edge.session.open(Bytes::from_static(b"x")).await;
        assert_eq!(opened.err(), Some(SessionError::Closed));
    }

    /// A reset on either side aborts the stream on both sides at once, whatever is in flight,
    /// and releases it; the session and its other streams go on.
    pub(crate) async fn a_reset_aborts_the_stream_on_both_sides(mut pair: Pair) {
        let mut bystander = pair.open().await;
        for edge_resets in [true, false] {
            let mut stream = pair.open().await;
            send_all(&mut stream.edge_writer, pattern(10_000)).await;
            send_all(&mut stream.hub_writer, pattern(10_000)).await;
            let far = if edge_resets {
                stream.edge_writer.reset();
                &mut stream.hub_reader
            } else {
                stream.hub_writer.reset();
                &mut stream.edge_reader
            };
            loop {
                match within("the far side sees the abort", far.recv()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("a reset stream finished in order"),
                    Err(StreamAborted) => break,
                }
            }
            within("the abort signal fires", far.abort_signal().cancelled()).await;
            drop(stream);
            let (edge, hub) = (&pair.edge.session, &pair.hub.session);
            eventually("both sides release the stream", || {
                edge.active_streams() == 1 && hub.active_streams() == 1
            })
            .await;
        }
        send_all(&mut bystander.edge_writer, pattern(1000)).await;
        bystander.edge_writer.finish().await;
        assert_eq!(read_to_end(&mut bystander.hub_reader).await, pattern(1000));
        assert!(!pair.edge.session.is_closed() && !pair.hub.session.is_closed());
    }

    /// A UDP session opens, carries a datagram each way, and is closed by the hub.
    pub(crate) async fn udp_datagrams_and_closes_travel_both_ways(mut pair: Pair) {
        let id = pair.edge.session.open_udp(udp_header()).await.unwrap_or(0);
        assert!(pair.edge.session.send_udp(id, Bytes::from_static(b"ping")));
        let mut opened = false;
        loop {
            match within("hub UDP events", pair.hub.events.recv()).await {
                Some(SessionEvent::UdpOpen { id: of, header }) => {
                    assert_eq!((of, header), (id, udp_header()));
                    opened = true;
                }
                Some(SessionEvent::UdpDatagram { id: of, payload }) => {
                    assert!(opened, "the open comes first");
                    assert_eq!((of, &payload[..]), (id, &b"ping"[..]));
                    break;
                }
                Some(_) => {}
                None => panic!("the hub session ended"),
            }
        }
        assert!(pair.hub.session.send_udp(id, Bytes::from_static(b"pong")));
        pair.hub.session.close_udp(id);
        // UDP_CLOSE travels on the control lane (stream), so it may overtake the datagram.
        let mut back = Vec::new();
        while back.len() < 2 {
            match within("edge UDP events", pair.edge.events.recv()).await {
                Some(SessionEvent::UdpDatagram { id: of, payload }) => {
                    assert_eq!((of, &payload[..]), (id, &b"pong"[..]));
                    back.push("datagram");
                }
                Some(SessionEvent::UdpClose { id: closed }) => {
                    assert_eq!(closed, id);
                    back.push("close");
                }
                Some(_) => {}
                None => panic!("the edge session ended"),
            }
        }
        back.sort_unstable();
        assert_eq!(back, ["close", "datagram"]);
    }
}
