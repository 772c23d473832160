//! Messages of the QUIC transport: the control stream's `[type u8][length u32 BE][payload]`
//! messages (type values are the frame types), and UDP datagrams `[session_id u32 BE][payload]`,
//! a session opening with `[session_id][0xFF][PROXY v2 header]`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::frame::{FrameError, FrameType};
use crate::proxy::V2_SIGNATURE;

/// Length of a control message header.
pub const CONTROL_HEADER_LEN: usize = 5;
/// Largest control message payload (a CONFIG with a big firewall).
pub const MAX_CONTROL_LEN: u32 = 1024 * 1024;
/// Marker byte of a session-opening datagram.
pub const OPEN_MARKER: u8 = 0xFF;

/// Appends one control message.
pub fn encode_control(dst: &mut BytesMut, kind: FrameType, payload: &[u8]) {
    dst.reserve(CONTROL_HEADER_LEN + payload.len());
    dst.put_u8(kind as u8);
    dst.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    dst.put_slice(payload);
}

/// Streaming decoder of control messages.
#[derive(Debug, Default)]
pub struct ControlDecoder {
    buf: BytesMut,
}

impl ControlDecoder {
    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed, or why the stream is bad.
    pub fn next_message(&mut self) -> Result<Option<(FrameType, Bytes)>, FrameError> {
        let Some(header) = self.buf.get(..CONTROL_HEADER_LEN) else {
            return Ok(None);
        };
        let kind = FrameType::from_u8(header[0]).ok_or(FrameError::UnknownType(header[0]))?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if len > MAX_CONTROL_LEN {
            return Err(FrameError::TooLong {
                len,
                max: MAX_CONTROL_LEN,
            });
        }
        let total = CONTROL_HEADER_LEN + len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        self.buf.advance(CONTROL_HEADER_LEN);
        Ok(Some((kind, self.buf.split_to(len as usize).freeze())))
    }
}

/// A UDP datagram of the QUIC transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram {
    /// Opens (or re-announces) a session with its PROXY v2 header.
    Open {
        /// Session id.
        id: u32,
        /// PROXY v2 header.
        header: Bytes,
    },
    /// One datagram of a session.
    Data {
        /// Session id.
        id: u32,
        /// Payload.
        payload: Bytes,
    },
}

impl Datagram {
    /// How many bytes [`Self::encode`] gives.
    pub fn encoded_len(&self) -> usize {
        match self {
            Datagram::Open { header, .. } => 5 + header.len(),
            Datagram::Data { payload, .. } => 4 + payload.len(),
        }
    }

    /// The wire bytes.
    pub fn encode(&self) -> Bytes {
        let (id, marker, body) = match self {
            Datagram::Open { id, header } => (*id, Some(OPEN_MARKER), header),
            Datagram::Data { id, payload } => (*id, None, payload),
        };
        let mut out = BytesMut::with_capacity(5 + body.len());
        out.put_u32(id);
        if let Some(marker) = marker {
            out.put_u8(marker);
        }
        out.put_slice(body);
        out.freeze()
    }

    /// Reads a datagram; `None` if it is shorter than a session id. An open is recognised by the
    /// marker followed by the PROXY v2 signature, so a payload that happens to start with 0xFF
    /// stays data.
    pub fn parse(mut bytes: Bytes) -> Option<Self> {
        if bytes.len() < 4 {
            return None;
        }
        let id = bytes.get_u32();
        let is_open = bytes.first() == Some(&OPEN_MARKER)
            && bytes.get(1..1 + V2_SIGNATURE.len()) == Some(&V2_SIGNATURE[..]);
        Some(if is_open {
            bytes.advance(1);
            Datagram::Open { id, header: bytes }
        } else {
            Datagram::Data { id, payload: bytes }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{ProxyV2, V2Transport};
    use proptest::prelude::*;

    #[test]
    fn control_messages_round_trip_in_any_chunking() {
        let mut bytes = BytesMut::new();
        encode_control(&mut bytes, FrameType::Config, b"{\"listenPorts\":[80]}");
        encode_control(&mut bytes, FrameType::UdpClose, &7u32.to_be_bytes());
        assert_eq!(&bytes[..5], &[0x06, 0, 0, 0, 20]);
        let mut decoder = ControlDecoder::default();
        let mut out = Vec::new();
        for byte in bytes.iter() {
            decoder.feed(&[*byte]);
            while let Some(message) = decoder.next_message().unwrap() {
                out.push(message);
            }
        }
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[1],
            (FrameType::UdpClose, Bytes::from_static(&[0, 0, 0, 7]))
        );
        let mut bad = ControlDecoder::default();
        bad.feed(&[0x42, 0, 0, 0, 0]);
        assert_eq!(bad.next_message(), Err(FrameError::UnknownType(0x42)));
        let mut huge = ControlDecoder::default();
        huge.feed(&[0x06, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            huge.next_message(),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn datagrams_golden_and_unambiguous() {
        let header = Bytes::from(
            ProxyV2::proxy(
                V2Transport::Datagram,
                "1.2.3.4:5".parse().unwrap(),
                "6.7.8.9:53".parse().unwrap(),
            )
            .to_bytes(),
        );
        let open = Datagram::Open {
            id: 1,
            header: header.clone(),
        };
        let bytes = open.encode();
        assert_eq!(&bytes[..5], &[0, 0, 0, 1, 0xFF]);
        assert_eq!(open.encoded_len(), bytes.len());
        assert_eq!(Datagram::parse(bytes), Some(open));
        let data = Datagram::Data {
            id: 2,
            payload: Bytes::from_static(&[0xFF, 1, 2]),
        };
        assert_eq!(data.encoded_len(), data.encode().len());
        assert_eq!(
            Datagram::parse(data.encode()),
            Some(data),
            "0xFF payloads stay data"
        );
        assert_eq!(Datagram::parse(Bytes::from_static(&[1, 2, 3])), None);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Datagram::parse(Bytes::from(bytes.clone()));
            let mut decoder = ControlDecoder::default();
            decoder.feed(&bytes);
            while let Ok(Some(_)) = decoder.next_message() {}
        }
    }
}
