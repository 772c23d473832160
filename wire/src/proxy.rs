//! PROXY protocol v1 (text) and v2 (binary) headers, per the HAProxy specification.
//!
//! The edge writes a v1 line in front of every TCP stream and a v2 header in front of every UDP
//! session; the hub reads the destination port from it. Parsers take a prefix of a byte stream
//! and answer `Ok(None)` while the header is incomplete.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// Longest v1 line, CRLF included.
pub const V1_MAX_LEN: usize = 107;
/// The 12-byte v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Length of the fixed part of a v2 header (signature, version/command, family, length).
pub const V2_FIXED_LEN: usize = 16;
/// The v2 TLV type (of the range kept for custom use, 0xE0–0xEF) carrying the id of the edge a
/// flow came through, as the hub writes it.
pub const V2_TLV_EDGE_ID: u8 = 0xE0;

/// Why bytes are not a valid PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProxyError {
    /// No CRLF within the first 107 bytes.
    #[error("PROXY v1 line is longer than {V1_MAX_LEN} bytes")]
    TooLong,
    /// The v1 line does not follow the specification.
    #[error("malformed PROXY v1 line: {0}")]
    MalformedV1(&'static str),
    /// The bytes do not start with the v2 signature.
    #[error("missing PROXY v2 signature")]
    BadSignature,
    /// Version nibble other than 2, or command other than LOCAL/PROXY.
    #[error("unsupported PROXY v2 version/command byte 0x{0:02x}")]
    BadVersionCommand(u8),
    /// Unknown address family or transport.
    #[error("unsupported PROXY v2 family byte 0x{0:02x}")]
    BadFamily(u8),
    /// The length field is too small for the family's addresses, or the TLVs do not fit it.
    #[error("PROXY v2 length {0} does not fit its contents")]
    BadLength(u16),
}

/// A PROXY v1 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyV1 {
    /// `TCP4` or `TCP6`: the client (`source`) and the address it connected to (`destination`).
    Tcp {
        /// Client address.
        source: SocketAddr,
        /// Address the client connected to.
        destination: SocketAddr,
    },
    /// `UNKNOWN`: addresses are not known.
    Unknown,
}

/// Puts both addresses in the same family (IPv4 addresses become IPv4-mapped IPv6 if needed).
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let to_v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (to_v6(source), to_v6(destination))
    }
}

impl ProxyV1 {
    /// A TCP header; mixed families are expressed as TCP6 with IPv4-mapped addresses.
    pub fn tcp(source: SocketAddr, destination: SocketAddr) -> Self {
        let (source, destination) = same_family(source, destination);
        Self::Tcp {
            source,
            destination,
        }
    }

    /// The destination port, if known.
    pub fn destination_port(&self) -> Option<u16> {
        match self {
            Self::Tcp { destination, .. } => Some(destination.port()),
            Self::Unknown => None,
        }
    }

    /// The line, CRLF included.
    pub fn to_line(&self) -> String {
        match self {
            Self::Tcp {
                source,
                destination,
            } => format!(
                "PROXY {} {} {} {} {}\r\n",
                if source.is_ipv4() { "TCP4" } else { "TCP6" },
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            ),
            Self::Unknown => "PROXY UNKNOWN\r\n".to_owned(),
        }
    }

    /// Parses a v1 header at the start of `buf`: the header and its length, `None` if the line
    /// is not complete yet.
    pub fn parse(buf: &[u8]) -> Result<Option<(Self, usize)>, ProxyError> {
        const MALFORMED: fn(&'static str) -> ProxyError = ProxyError::MalformedV1;
        let prefix = &b"PROXY "[..buf.len().min(6)];
        if !buf.starts_with(prefix) {
            return Err(MALFORMED("does not start with \"PROXY \""));
        }
        let Some(end) = buf.iter().take(V1_MAX_LEN).position(|&b| b == b'\n') else {
            return if buf.len() >= V1_MAX_LEN {
                Err(ProxyError::TooLong)
            } else {
                Ok(None)
            };
        };
        let line = buf[..end]
            .strip_suffix(b"\r")
            .ok_or(MALFORMED("line does not end with CRLF"))?;
        let text = std::str::from_utf8(line).map_err(|_| MALFORMED("not ASCII"))?;
        let mut fields = text.split(' ').skip(1);
        let header = match fields.next() {
            Some("UNKNOWN") => Self::Unknown,
            Some(proto @ ("TCP4" | "TCP6")) => {
                let mut next = || fields.next().ok_or(MALFORMED("missing field"));
                let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
                if fields.next().is_some() {
                    return Err(MALFORMED("too many fields"));
                }
                let ip = |s: &str| -> Result<IpAddr, ProxyError> {
                    if proto == "TCP4" {
                        s.parse::<Ipv4Addr>().map(IpAddr::V4)
                    } else {
                        s.parse::<Ipv6Addr>().map(IpAddr::V6)
                    }
                    .map_err(|_| MALFORMED("bad address for the protocol"))
                };
                let port = |s: &str| -> Result<u16, ProxyError> {
                    let canonical = !s.is_empty()
                        && s.bytes().all(|b| b.is_ascii_digit())
                        && (s == "0" || !s.starts_with('0'));
                    canonical
                        .then(|| s.parse().ok())
                        .flatten()
                        .ok_or(MALFORMED("bad port"))
                };
                Self::Tcp {
                    source: SocketAddr::new(ip(src)?, port(sport)?),
                    destination: SocketAddr::new(ip(dst)?, port(dport)?),
                }
            }
            _ => return Err(MALFORMED("unknown protocol")),
        };
        Ok(Some((header, end + 1)))
    }
}

/// Appends a v2 header's family byte, a length placeholder the caller fills in, and the
/// addresses and ports.
fn encode_addresses(addresses: &V2Addresses, out: &mut Vec<u8>) {
    let transport = match addresses.transport {
        V2Transport::Stream => 0x01,
        V2Transport::Datagram => 0x02,
    };
    let (source, destination) = same_family(addresses.source, addresses.destination);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.extend_from_slice(&[0x10 | transport, 0, 0]);
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend_from_slice(&[0x20 | transport, 0, 0]);
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
}

/// The v2 command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V2Command {
    /// A connection made by the proxy itself (health check); addresses are to be ignored.
    Local,
    /// A relayed connection.
    Proxy,
}

/// The v2 transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V2Transport {
    /// TCP.
    Stream,
    /// UDP.
    Datagram,
}

/// A PROXY v2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyV2 {
    /// LOCAL or PROXY.
    pub command: V2Command,
    /// The relayed addresses; `None` for the UNSPEC family (and AF_UNIX, which we do not use).
    pub addresses: Option<V2Addresses>,
}

/// Addresses carried by a v2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V2Addresses {
    /// TCP or UDP.
    pub transport: V2Transport,
    /// Client address.
    pub source: SocketAddr,
    /// Address the client sent to.
    pub destination: SocketAddr,
}

impl ProxyV2 {
    /// A PROXY header for a relayed flow; mixed families become IPv4-mapped IPv6.
    pub fn proxy(transport: V2Transport, source: SocketAddr, destination: SocketAddr) -> Self {
        let (source, destination) = same_family(source, destination);
        Self {
            command: V2Command::Proxy,
            addresses: Some(V2Addresses {
                transport,
                source,
                destination,
            }),
        }
    }

    /// A LOCAL header without addresses.
    pub fn local() -> Self {
        Self {
            command: V2Command::Local,
            addresses: None,
        }
    }

    /// Appends the header's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_with(&[], out);
    }

    /// Appends the header's bytes to `out`, with `tlvs` (type and value) after the addresses.
    /// A TLV that would not fit the header's 16-bit length is left out.
    pub fn encode_with(&self, tlvs: &[(u8, &[u8])], out: &mut Vec<u8>) {
        out.extend_from_slice(&V2_SIGNATURE);
        out.push(match self.command {
            V2Command::Local => 0x20,
            V2Command::Proxy => 0x21,
        });
        let family_at = out.len();
        match self.addresses {
            None => out.extend_from_slice(&[0x00, 0x00, 0x00]),
            Some(addresses) => encode_addresses(&addresses, out),
        }
        for (kind, value) in tlvs {
            let Ok(len) = u16::try_from(value.len()) else {
                continue;
            };
            let body = out.len() - (family_at + 3);
            if body + 3 + value.len() > usize::from(u16::MAX) {
                continue;
            }
            out.push(*kind);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(value);
        }
        let body = u16::try_from(out.len() - (family_at + 3)).unwrap_or(u16::MAX);
        out[family_at + 1..family_at + 3].copy_from_slice(&body.to_be_bytes());
    }

    /// The header's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(V2_FIXED_LEN + 36);
        self.encode(&mut out);
        out
    }

    /// Parses a v2 header at the start of `buf`: the header and its total length (TLVs
    /// included and skipped), `None` if more bytes are needed.
    pub fn parse(buf: &[u8]) -> Result<Option<(Self, usize)>, ProxyError> {
        let signature_part = buf.len().min(V2_SIGNATURE.len());
        if buf[..signature_part] != V2_SIGNATURE[..signature_part] {
            return Err(ProxyError::BadSignature);
        }
        let Some(fixed) = buf.get(..V2_FIXED_LEN) else {
            return Ok(None);
        };
        let command = match fixed[12] {
            0x20 => V2Command::Local,
            0x21 => V2Command::Proxy,
            other => return Err(ProxyError::BadVersionCommand(other)),
        };
        let family = fixed[13];
        let len = u16::from_be_bytes([fixed[14], fixed[15]]);
        let total = V2_FIXED_LEN + usize::from(len);
        let transport = match family & 0x0f {
            0x0 => None,
            0x1 => Some(V2Transport::Stream),
            0x2 => Some(V2Transport::Datagram),
            _ => return Err(ProxyError::BadFamily(family)),
        };
        let address_len: usize = match family >> 4 {
            0x0 => 0,
            0x1 => 12,
            0x2 => 36,
            0x3 => 216,
            _ => return Err(ProxyError::BadFamily(family)),
        };
        if (family >> 4 == 0) != transport.is_none() {
            return Err(ProxyError::BadFamily(family));
        }
        if usize::from(len) < address_len {
            return Err(ProxyError::BadLength(len));
        }
        let Some(body) = buf.get(V2_FIXED_LEN..total) else {
            return Ok(None);
        };
        let (address_block, mut tlvs) = body.split_at(address_len);
        while !tlvs.is_empty() {
            let tlv_len = match tlvs {
                [_, hi, lo, ..] => usize::from(u16::from_be_bytes([*hi, *lo])),
                _ => return Err(ProxyError::BadLength(len)),
            };
            tlvs = tlvs.get(3 + tlv_len..).ok_or(ProxyError::BadLength(len))?;
        }
        let addresses = match (transport, address_block.len()) {
            (Some(transport), 12) => {
                let ip = |at: usize| {
                    IpAddr::V4(Ipv4Addr::new(
                        address_block[at],
                        address_block[at + 1],
                        address_block[at + 2],
                        address_block[at + 3],
                    ))
                };
                Some(V2Addresses {
                    transport,
                    source: SocketAddr::new(ip(0), port_at(address_block, 8)),
                    destination: SocketAddr::new(ip(4), port_at(address_block, 10)),
                })
            }
            (Some(transport), 36) => {
                let ip = |at: usize| {
                    let mut octets = [0u8; 16];
                    octets.copy_from_slice(&address_block[at..at + 16]);
                    IpAddr::V6(Ipv6Addr::from(octets))
                };
                Some(V2Addresses {
                    transport,
                    source: SocketAddr::new(ip(0), port_at(address_block, 32)),
                    destination: SocketAddr::new(ip(16), port_at(address_block, 34)),
                })
            }
            _ => None,
        };
        let addresses = if command == V2Command::Local {
            None
        } else {
            addresses
        };
        Ok(Some((Self { command, addresses }, total)))
    }
}

fn port_at(block: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([block[at], block[at + 1]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn v1_golden_lines_from_the_specification() {
        let cases = [
            (
                ProxyV1::tcp(addr("192.168.0.1:56324"), addr("192.168.0.11:443")),
                "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            ),
            (
                ProxyV1::tcp(addr("255.255.255.255:65535"), addr("255.255.255.255:65535")),
                "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            ),
            (
                ProxyV1::tcp(addr("[2001:db8::1]:1234"), addr("[2001:db8::2]:80")),
                "PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n",
            ),
            (ProxyV1::Unknown, "PROXY UNKNOWN\r\n"),
        ];
        for (header, line) in cases {
            assert_eq!(header.to_line(), line);
            assert_eq!(
                ProxyV1::parse(line.as_bytes()),
                Ok(Some((header, line.len())))
            );
        }
        let worst = format!(
            "PROXY TCP6 {0} {0} 65535 65535\r\n",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(worst.len(), 104);
        assert!(ProxyV1::parse(worst.as_bytes()).unwrap().is_some());
    }

    #[test]
    fn v1_mixed_families_become_tcp6() {
        let header = ProxyV1::tcp(addr("10.0.0.1:5000"), addr("[::1]:80"));
        assert_eq!(
            header.to_line(),
            "PROXY TCP6 ::ffff:10.0.0.1 ::1 5000 80\r\n"
        );
        assert_eq!(header.destination_port(), Some(80));
    }

    #[test]
    fn v1_unknown_ignores_the_rest_and_streams() {
        let data = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nGET /";
        assert_eq!(ProxyV1::parse(data), Ok(Some((ProxyV1::Unknown, 35))));
        assert_eq!(ProxyV1::parse(b"PROXY TCP4 1.2.3.4"), Ok(None));
        assert_eq!(ProxyV1::parse(b"PRO"), Ok(None));
    }

    #[test]
    fn v1_rejects_bad_lines() {
        let bad: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        ];
        for line in bad {
            assert!(
                matches!(ProxyV1::parse(line), Err(ProxyError::MalformedV1(_))),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(100));
        assert_eq!(ProxyV1::parse(long.as_bytes()), Err(ProxyError::TooLong));
    }

    #[test]
    fn v2_golden_bytes() {
        let udp4 = ProxyV2::proxy(
            V2Transport::Datagram,
            addr("192.168.0.1:56324"),
            addr("192.168.0.11:53"),
        );
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x12, 0x00, 0x0c]);
        expected.extend_from_slice(&[192, 168, 0, 1, 192, 168, 0, 11]);
        expected.extend_from_slice(&[0xdc, 0x04, 0x00, 0x35]);
        assert_eq!(udp4.to_bytes(), expected);
        assert_eq!(ProxyV2::parse(&expected), Ok(Some((udp4, expected.len()))));

        let tcp6 = ProxyV2::proxy(V2Transport::Stream, addr("[::1]:1"), addr("[::2]:2"));
        let bytes = tcp6.to_bytes();
        assert_eq!(&bytes[12..16], &[0x21, 0x21, 0x00, 0x24]);
        assert_eq!(bytes.len(), 16 + 36);
        assert_eq!(bytes[16 + 15], 1);
        assert_eq!(bytes[16 + 31], 2);
        assert_eq!(&bytes[48..], &[0, 1, 0, 2]);

        let local = ProxyV2::local();
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(local.to_bytes(), expected);
        assert_eq!(ProxyV2::parse(&expected), Ok(Some((local, 16))));
    }

    #[test]
    fn v2_golden_bytes_with_the_edge_id_tlv() {
        let udp4 = ProxyV2::proxy(
            V2Transport::Datagram,
            addr("192.168.0.1:56324"),
            addr("192.168.0.11:53"),
        );
        let mut bytes = Vec::new();
        udp4.encode_with(&[(V2_TLV_EDGE_ID, b"edge-1")], &mut bytes);
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x12, 0x00, 12 + 3 + 6]);
        expected.extend_from_slice(&[192, 168, 0, 1, 192, 168, 0, 11]);
        expected.extend_from_slice(&[0xdc, 0x04, 0x00, 0x35]);
        expected.extend_from_slice(&[0xe0, 0x00, 0x06]);
        expected.extend_from_slice(b"edge-1");
        assert_eq!(bytes, expected);
        assert_eq!(ProxyV2::parse(&bytes), Ok(Some((udp4, bytes.len()))));

        let mut local = Vec::new();
        ProxyV2::local().encode_with(&[(V2_TLV_EDGE_ID, &[0u8; 70_000])], &mut local);
        assert_eq!(
            local,
            ProxyV2::local().to_bytes(),
            "a TLV too long is left out"
        );
    }

    #[test]
    fn v2_skips_tlvs_and_streams() {
        let mut bytes =
            ProxyV2::proxy(V2Transport::Stream, addr("1.2.3.4:5"), addr("6.7.8.9:10")).to_bytes();
        bytes[15] = 12 + 3 + 2;
        bytes.extend_from_slice(&[0x04, 0x00, 0x02, 0xaa, 0xbb]);
        let (header, len) = ProxyV2::parse(&bytes).unwrap().unwrap();
        assert_eq!(len, bytes.len());
        assert_eq!(header.addresses.unwrap().source, addr("1.2.3.4:5"));
        for cut in 0..bytes.len() {
            assert_eq!(ProxyV2::parse(&bytes[..cut]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn v2_rejects_bad_headers() {
        let good =
            ProxyV2::proxy(V2Transport::Stream, addr("1.2.3.4:5"), addr("6.7.8.9:10")).to_bytes();
        let mutate = |at: usize, value: u8| {
            let mut bytes = good.clone();
            bytes[at] = value;
            ProxyV2::parse(&bytes)
        };
        assert_eq!(mutate(0, b'X'), Err(ProxyError::BadSignature));
        assert_eq!(mutate(12, 0x11), Err(ProxyError::BadVersionCommand(0x11)));
        assert_eq!(mutate(12, 0x22), Err(ProxyError::BadVersionCommand(0x22)));
        assert_eq!(mutate(13, 0x13), Err(ProxyError::BadFamily(0x13)));
        assert_eq!(mutate(13, 0x41), Err(ProxyError::BadFamily(0x41)));
        assert_eq!(mutate(13, 0x10), Err(ProxyError::BadFamily(0x10)));
        assert_eq!(mutate(15, 11), Err(ProxyError::BadLength(11)));
        let mut bad_tlv = good.clone();
        bad_tlv[15] = 14;
        bad_tlv.extend_from_slice(&[0x04, 0x00]);
        assert_eq!(ProxyV2::parse(&bad_tlv), Err(ProxyError::BadLength(14)));
    }

    fn arb_socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
        ]
    }

    proptest! {
        #[test]
        fn v1_round_trip(src in arb_socket_addr(), dst in arb_socket_addr()) {
            let header = ProxyV1::tcp(src, dst);
            let line = header.to_line();
            prop_assert!(line.len() <= V1_MAX_LEN);
            prop_assert_eq!(ProxyV1::parse(line.as_bytes()).unwrap(), Some((header, line.len())));
        }

        #[test]
        fn v2_round_trip(src in arb_socket_addr(), dst in arb_socket_addr(), udp in any::<bool>()) {
            let transport = if udp { V2Transport::Datagram } else { V2Transport::Stream };
            let header = ProxyV2::proxy(transport, src, dst);
            let bytes = header.to_bytes();
            prop_assert_eq!(ProxyV2::parse(&bytes).unwrap(), Some((header, bytes.len())));
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = ProxyV1::parse(&bytes);
            let _ = ProxyV2::parse(&bytes);
            let mut prefixed = V2_SIGNATURE.to_vec();
            prefixed.extend_from_slice(&bytes);
            let _ = ProxyV2::parse(&prefixed);
            let mut line = b"PROXY ".to_vec();
            line.extend_from_slice(&bytes);
            let _ = ProxyV1::parse(&line);
        }
    }
}
