//! Tunnel frames of the TLS transport: `[stream_id u32 BE][type u8][length u32 BE][payload]`.
//!
//! [`FrameDecoder`] accepts bytes in chunks of any size and yields whole frames. Everything that
//! can be decided from the 9-byte header (unknown type, oversized or wrongly sized payload) is
//! rejected before room for the payload is reserved.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 9;
/// Largest payload a frame may carry.
pub const MAX_PAYLOAD_LEN: u32 = 16 * 1024 * 1024;
/// Largest DATA / DATA_BACK payload a sender writes; bigger writes are split into chunks.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;
/// Stream id used by frames that belong to the tunnel rather than a stream (CONFIG, PING, ...).
pub const CONTROL_STREAM: u32 = 0;

/// The kind of a frame, with its value on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Edge → hub: a new TCP stream; payload is the client's PROXY v1 line.
    Open = 0x01,
    /// Edge → hub: client bytes.
    Data = 0x02,
    /// Edge → hub: the client finished sending or is gone.
    Close = 0x03,
    /// Hub → edge: target bytes.
    DataBack = 0x04,
    /// Hub → edge: the target finished sending, or could not be reached.
    CloseBack = 0x05,
    /// Hub → edge: JSON edge configuration.
    Config = 0x06,
    /// Hub → edge (either way with extension `liveness`): liveness probe with 8 opaque bytes.
    Ping = 0x07,
    /// Edge → hub (either way with extension `liveness`): the probe's 8 bytes echoed.
    Pong = 0x08,
    /// Edge → hub: credit for DATA_BACK (u32 BE bytes).
    WindowUpdate = 0x09,
    /// Hub → edge: credit for DATA (u32 BE bytes).
    WindowUpdateBack = 0x0A,
    /// Edge → hub: a new UDP session; payload is a PROXY v2 header.
    UdpOpen = 0x0B,
    /// Edge → hub: one client datagram.
    UdpData = 0x0C,
    /// Hub → edge: one target datagram.
    UdpDataBack = 0x0D,
    /// Either way: the UDP session ended.
    UdpClose = 0x0E,
    /// Edge → hub: JSON acknowledgement of an applied (or rejected) CONFIG.
    ConfigAck = 0x0F,
    /// Either way, extension `reset`: abort the stream at once (both directions).
    Reset = 0x10,
    /// Hub → edge, stream 0, extension `drain`: open no new streams on this tunnel, let open
    /// ones finish, and connect elsewhere.
    Drain = 0x11,
    /// Edge → hub, stream 0: the JSON list of the hub's announced extensions the edge uses.
    Extensions = 0x12,
    /// Hub → edge, extension `liveness`: the hub has the stream (sent at once for every OPEN),
    /// so the edge may stop keeping the client's first bytes for another tunnel.
    Opened = 0x13,
}

impl FrameType {
    /// Every frame type, in wire order.
    pub const ALL: [FrameType; 19] = [
        FrameType::Open,
        FrameType::Data,
        FrameType::Close,
        FrameType::DataBack,
        FrameType::CloseBack,
        FrameType::Config,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::WindowUpdate,
        FrameType::WindowUpdateBack,
        FrameType::UdpOpen,
        FrameType::UdpData,
        FrameType::UdpDataBack,
        FrameType::UdpClose,
        FrameType::ConfigAck,
        FrameType::Reset,
        FrameType::Drain,
        FrameType::Extensions,
        FrameType::Opened,
    ];

    /// The frame type for a wire value, if it is one.
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| *kind as u8 == value)
    }

    /// True for frames that carry payload bytes of a stream or session rather than control.
    pub fn is_data(self) -> bool {
        matches!(
            self,
            FrameType::Data | FrameType::DataBack | FrameType::UdpData | FrameType::UdpDataBack
        )
    }

    /// The exact payload length this type requires, if it is fixed.
    fn fixed_len(self) -> Option<u32> {
        match self {
            FrameType::Close
            | FrameType::CloseBack
            | FrameType::UdpClose
            | FrameType::Reset
            | FrameType::Drain
            | FrameType::Opened => Some(0),
            FrameType::WindowUpdate | FrameType::WindowUpdateBack => Some(4),
            FrameType::Ping | FrameType::Pong => Some(8),
            _ => None,
        }
    }
}

/// Why bytes could not be decoded into a frame. Any of these ends the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The type byte is not a known frame type.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The announced payload is larger than the limit.
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// Announced length.
        len: u32,
        /// Limit in force.
        max: u32,
    },
    /// A fixed-size frame announced a different length.
    #[error("{kind:?} frame must carry {expected} payload bytes, not {len}")]
    BadLength {
        /// The frame type.
        kind: FrameType,
        /// Its required length.
        expected: u32,
        /// The announced length.
        len: u32,
    },
}

/// A frame's 9-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Stream (or UDP session) the frame belongs to; 0 for tunnel-level frames.
    pub stream_id: u32,
    /// Frame type.
    pub kind: FrameType,
    /// Payload length in bytes.
    pub len: u32,
}

impl FrameHeader {
    /// Parses and checks a header against the payload limit `max_payload`.
    pub fn parse(bytes: [u8; HEADER_LEN], max_payload: u32) -> Result<Self, FrameError> {
        let stream_id = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let kind = FrameType::from_u8(bytes[4]).ok_or(FrameError::UnknownType(bytes[4]))?;
        let len = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
        match kind.fixed_len() {
            Some(expected) if expected != len => {
                return Err(FrameError::BadLength {
                    kind,
                    expected,
                    len,
                })
            }
            _ if len > max_payload => {
                return Err(FrameError::TooLong {
                    len,
                    max: max_payload,
                })
            }
            _ => {}
        }
        Ok(Self {
            stream_id,
            kind,
            len,
        })
    }

    /// The header's wire bytes.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&self.stream_id.to_be_bytes());
        out[4] = self.kind as u8;
        out[5..].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// One decoded frame. The payload shares the decoder's buffer; no copy is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Stream (or UDP session) id; 0 for tunnel-level frames.
    pub stream_id: u32,
    /// Frame type.
    pub kind: FrameType,
    /// Payload bytes.
    pub payload: Bytes,
}

impl Frame {
    /// A frame with the given parts.
    pub fn new(stream_id: u32, kind: FrameType, payload: impl Into<Bytes>) -> Self {
        Self {
            stream_id,
            kind,
            payload: payload.into(),
        }
    }

    /// A payload-less frame (CLOSE, CLOSE_BACK, UDP_CLOSE).
    pub fn empty(stream_id: u32, kind: FrameType) -> Self {
        Self::new(stream_id, kind, Bytes::new())
    }

    /// A WINDOW_UPDATE or WINDOW_UPDATE_BACK granting `increment` bytes.
    pub fn window_update(stream_id: u32, kind: FrameType, increment: u32) -> Self {
        Self::new(
            stream_id,
            kind,
            Bytes::copy_from_slice(&increment.to_be_bytes()),
        )
    }

    /// A PING or PONG carrying `token`.
    pub fn ping(kind: FrameType, token: [u8; 8]) -> Self {
        Self::new(CONTROL_STREAM, kind, Bytes::copy_from_slice(&token))
    }

    /// The u32 carried by a WINDOW_UPDATE(_BACK) frame (its length was checked on decode).
    pub fn u32_payload(&self) -> Option<u32> {
        let bytes: [u8; 4] = self.payload.as_ref().try_into().ok()?;
        Some(u32::from_be_bytes(bytes))
    }

    /// The 8 bytes of a PING or PONG.
    pub fn ping_token(&self) -> Option<[u8; 8]> {
        self.payload.as_ref().try_into().ok()
    }

    /// Appends the frame's wire bytes to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        encode_frame(dst, self.stream_id, self.kind, &self.payload);
    }

    /// The frame's header on the wire, for a writer that sends the payload from where it is.
    pub fn header(&self) -> [u8; HEADER_LEN] {
        header_bytes(self.stream_id, self.kind, &self.payload)
    }
}

/// The header of a frame carrying `payload`, which must not exceed [`MAX_PAYLOAD_LEN`].
fn header_bytes(stream_id: u32, kind: FrameType, payload: &[u8]) -> [u8; HEADER_LEN] {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    debug_assert!(len <= MAX_PAYLOAD_LEN, "caller must chunk payloads");
    FrameHeader {
        stream_id,
        kind,
        len,
    }
    .to_bytes()
}

/// Appends one frame to `dst` without allocating anything but room in `dst`.
///
/// The payload must not exceed [`MAX_PAYLOAD_LEN`]; callers split data into chunks first.
pub fn encode_frame(dst: &mut BytesMut, stream_id: u32, kind: FrameType, payload: &[u8]) {
    dst.reserve(HEADER_LEN + payload.len());
    dst.put_slice(&header_bytes(stream_id, kind, payload));
    dst.put_slice(payload);
}

/// Streaming decoder: feed bytes in any chunking, take whole frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    header: Option<FrameHeader>,
    max_payload: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder with the protocol's payload limit.
    pub fn new() -> Self {
        Self::with_max_payload(MAX_PAYLOAD_LEN)
    }

    /// A decoder with a custom payload limit (at most [`MAX_PAYLOAD_LEN`]).
    pub fn with_max_payload(max_payload: u32) -> Self {
        Self {
            buf: BytesMut::new(),
            header: None,
            max_payload: max_payload.min(MAX_PAYLOAD_LEN),
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The receive buffer, for reading socket bytes straight into it.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed, or the reason the stream of
    /// bytes is not a valid frame sequence (the tunnel must then be closed).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let header = match self.header {
            Some(header) => header,
            None => {
                let Some(raw) = self.buf.get(..HEADER_LEN) else {
                    return Ok(None);
                };
                let mut bytes = [0u8; HEADER_LEN];
                bytes.copy_from_slice(raw);
                let header = FrameHeader::parse(bytes, self.max_payload)?;
                self.buf.advance(HEADER_LEN);
                self.header = Some(header);
                header
            }
        };
        let len = header.len as usize;
        if self.buf.len() < len {
            self.buf.reserve(len - self.buf.len());
            return Ok(None);
        }
        self.header = None;
        Ok(Some(Frame {
            stream_id: header.stream_id,
            kind: header.kind,
            payload: self.buf.split_to(len).freeze(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(frame: &Frame) -> Vec<u8> {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        buf.to_vec()
    }

    #[test]
    fn golden_bytes_for_every_frame_type() {
        let cases: Vec<(Frame, &[u8])> = vec![
            (
                Frame::new(1, FrameType::Open, &b"PROXY UNKNOWN\r\n"[..]),
                b"\x00\x00\x00\x01\x01\x00\x00\x00\x0fPROXY UNKNOWN\r\n",
            ),
            (
                Frame::new(2, FrameType::Data, &b"hi"[..]),
                b"\x00\x00\x00\x02\x02\x00\x00\x00\x02hi",
            ),
            (
                Frame::empty(3, FrameType::Close),
                b"\x00\x00\x00\x03\x03\x00\x00\x00\x00",
            ),
            (
                Frame::new(0x0102_0304, FrameType::DataBack, &b"ok"[..]),
                b"\x01\x02\x03\x04\x04\x00\x00\x00\x02ok",
            ),
            (
                Frame::empty(5, FrameType::CloseBack),
                b"\x00\x00\x00\x05\x05\x00\x00\x00\x00",
            ),
            (
                Frame::new(0, FrameType::Config, &b"{}"[..]),
                b"\x00\x00\x00\x00\x06\x00\x00\x00\x02{}",
            ),
            (
                Frame::ping(FrameType::Ping, *b"abcdefgh"),
                b"\x00\x00\x00\x00\x07\x00\x00\x00\x08abcdefgh",
            ),
            (
                Frame::ping(FrameType::Pong, *b"abcdefgh"),
                b"\x00\x00\x00\x00\x08\x00\x00\x00\x08abcdefgh",
            ),
            (
                Frame::window_update(7, FrameType::WindowUpdate, 65536),
                b"\x00\x00\x00\x07\x09\x00\x00\x00\x04\x00\x01\x00\x00",
            ),
            (
                Frame::window_update(7, FrameType::WindowUpdateBack, 1),
                b"\x00\x00\x00\x07\x0a\x00\x00\x00\x04\x00\x00\x00\x01",
            ),
            (
                Frame::new(9, FrameType::UdpOpen, &b"\r\n"[..]),
                b"\x00\x00\x00\x09\x0b\x00\x00\x00\x02\r\n",
            ),
            (
                Frame::new(9, FrameType::UdpData, &b"q"[..]),
                b"\x00\x00\x00\x09\x0c\x00\x00\x00\x01q",
            ),
            (
                Frame::new(9, FrameType::UdpDataBack, &b"a"[..]),
                b"\x00\x00\x00\x09\x0d\x00\x00\x00\x01a",
            ),
            (
                Frame::empty(9, FrameType::UdpClose),
                b"\x00\x00\x00\x09\x0e\x00\x00\x00\x00",
            ),
            (
                Frame::new(0, FrameType::ConfigAck, &b"{\"version\":1}"[..]),
                b"\x00\x00\x00\x00\x0f\x00\x00\x00\x0d{\"version\":1}",
            ),
            (
                Frame::empty(3, FrameType::Reset),
                b"\x00\x00\x00\x03\x10\x00\x00\x00\x00",
            ),
            (
                Frame::empty(0, FrameType::Drain),
                b"\x00\x00\x00\x00\x11\x00\x00\x00\x00",
            ),
            (
                Frame::new(0, FrameType::Extensions, &b"[\"reset\"]"[..]),
                b"\x00\x00\x00\x00\x12\x00\x00\x00\x09[\"reset\"]",
            ),
            (
                Frame::empty(5, FrameType::Opened),
                b"\x00\x00\x00\x05\x13\x00\x00\x00\x00",
            ),
        ];
        assert_eq!(cases.len(), FrameType::ALL.len());
        for (frame, bytes) in cases {
            assert_eq!(encoded(&frame), bytes, "{:?}", frame.kind);
            let mut decoder = FrameDecoder::new();
            decoder.feed(bytes);
            assert_eq!(decoder.next_frame(), Ok(Some(frame)));
            assert_eq!(decoder.next_frame(), Ok(None));
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let mut bytes = Vec::new();
        bytes.extend(encoded(&Frame::new(1, FrameType::Data, &b"hello"[..])));
        bytes.extend(encoded(&Frame::empty(1, FrameType::Close)));
        let mut decoder = FrameDecoder::new();
        let mut frames = Vec::new();
        for byte in bytes {
            decoder.feed(&[byte]);
            while let Some(frame) = decoder.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(
            frames,
            vec![
                Frame::new(1, FrameType::Data, &b"hello"[..]),
                Frame::empty(1, FrameType::Close)
            ]
        );
    }

    #[test]
    fn rejects_from_the_header_alone() {
        let mut decoder = FrameDecoder::new();
        decoder.feed(b"\x00\x00\x00\x01\x14\x00\x00\x00\x00");
        assert_eq!(decoder.next_frame(), Err(FrameError::UnknownType(0x14)));

        let mut decoder = FrameDecoder::new();
        decoder.feed(b"\x00\x00\x00\x01\x02\x01\x00\x00\x01");
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::TooLong {
                len: 0x0100_0001,
                max: MAX_PAYLOAD_LEN
            })
        );
        assert!(
            decoder.buffer_mut().capacity() < 1024,
            "no room reserved for a rejected payload"
        );

        let mut decoder = FrameDecoder::new();
        decoder.feed(b"\x00\x00\x00\x00\x07\x00\x00\x00\x04");
        assert!(matches!(
            decoder.next_frame(),
            Err(FrameError::BadLength { expected: 8, .. })
        ));

        let mut decoder = FrameDecoder::new();
        decoder.feed(b"\x00\x00\x00\x01\x00\x00\x00\x00\x00");
        assert_eq!(decoder.next_frame(), Err(FrameError::UnknownType(0)));
    }

    #[test]
    fn accepts_the_largest_payload_header() {
        let mut decoder = FrameDecoder::with_max_payload(16);
        decoder.feed(&FrameHeader::to_bytes(FrameHeader {
            stream_id: 1,
            kind: FrameType::Data,
            len: 16,
        }));
        assert_eq!(decoder.next_frame(), Ok(None));
        decoder.feed(&[7u8; 16]);
        assert_eq!(decoder.next_frame().unwrap().unwrap().payload.len(), 16);
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (
            any::<u32>(),
            proptest::sample::select(FrameType::ALL.to_vec()),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(id, kind, mut payload)| {
                if let Some(len) = kind.fixed_len() {
                    payload.resize(len as usize, 0);
                }
                Frame::new(id, kind, payload)
            })
    }

    proptest! {
        #[test]
        fn round_trip_whatever_the_chunking(
            frames in proptest::collection::vec(arb_frame(), 0..20),
            cuts in proptest::collection::vec(1usize..64, 1..50),
        ) {
            let mut bytes = BytesMut::new();
            for frame in &frames {
                frame.encode(&mut bytes);
            }
            let mut decoder = FrameDecoder::new();
            let mut decoded = Vec::new();
            let mut rest = &bytes[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, tail) = rest.split_at((*cut).min(rest.len()));
                decoder.feed(chunk);
                rest = tail;
                while let Some(frame) = decoder.next_frame().unwrap() {
                    decoded.push(frame);
                }
            }
            prop_assert_eq!(decoded, frames);
            prop_assert_eq!(decoder.buffered_len(), 0);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut decoder = FrameDecoder::with_max_payload(1024);
            decoder.feed(&bytes);
            while let Ok(Some(_)) = decoder.next_frame() {}
        }
    }
}
