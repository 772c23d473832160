//! Public-IP discovery with a STUN Binding request (RFC 5389/8489), using the `stun_codec`
//! crate for the messages and the RFC's retransmission schedule.

use std::net::SocketAddr;
use std::time::Duration;

use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::rfc5389::attributes::{MappedAddress, XorMappedAddress};
use stun_codec::rfc5389::methods::BINDING;
use stun_codec::rfc5389::Attribute;
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};
use thiserror::Error;
use tokio::net::UdpSocket;

/// Default STUN server.
pub const DEFAULT_SERVER: &str = "stun.cloudflare.com:3478";

/// Retransmission schedule (RFC 5389 §7.2.1): `requests` sends, the wait doubling from `rto`,
/// and `final_wait` × `rto` after the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunTiming {
    /// First retransmission timeout.
    pub rto: Duration,
    /// Requests sent in all (Rc).
    pub requests: u32,
    /// Multiple of `rto` waited after the last request (Rm).
    pub final_wait: u32,
}

impl Default for StunTiming {
    fn default() -> Self {
        Self {
            rto: Duration::from_millis(500),
            requests: 7,
            final_wait: 16,
        }
    }
}

/// Why no address was learned.
#[derive(Debug, Error)]
pub enum StunError {
    /// The server name did not resolve.
    #[error("cannot resolve STUN server {0}")]
    Resolve(String),
    /// The socket failed.
    #[error("STUN socket: {0}")]
    Io(#[from] std::io::Error),
    /// The request could not be encoded (a bug).
    #[error("encoding the STUN request: {0}")]
    Encode(String),
    /// No valid answer after every retransmission.
    #[error("no valid answer from {server} after {requests} requests")]
    Timeout {
        /// The server.
        server: String,
        /// Requests sent.
        requests: u32,
    },
}

/// Asks `server` for the address it sees us coming from.
pub async fn discover(server: &str, timing: StunTiming) -> Result<SocketAddr, StunError> {
    let target = tokio::net::lookup_host(server)
        .await
        .map_err(|_| StunError::Resolve(server.to_owned()))?
        .next()
        .ok_or_else(|| StunError::Resolve(server.to_owned()))?;
    let local: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(target).await?;
    let id: [u8; 12] = rand::random();
    let request = MessageEncoder::new()
        .encode_into_bytes(Message::<Attribute>::new(
            MessageClass::Request,
            BINDING,
            TransactionId::new(id),
        ))
        .map_err(|e| StunError::Encode(e.to_string()))?;
    let mut buf = vec![0u8; 2048];
    let mut rto = timing.rto;
    for attempt in 1..=timing.requests {
        socket.send(&request).await?;
        let wait = if attempt == timing.requests {
            timing.rto * timing.final_wait
        } else {
            rto
        };
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(received) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            // Errors (an ICMP "unreachable") and invalid answers wait for a valid one.
            if let Some(address) = received.ok().and_then(|n| mapped_address(&buf[..n], id)) {
                return Ok(address);
            }
        }
        rto *= 2;
    }
    Err(StunError::Timeout {
        server: server.to_owned(),
        requests: timing.requests,
    })
}

/// The address in a Binding success response to transaction `id`; `None` for anything else.
pub fn mapped_address(bytes: &[u8], id: [u8; 12]) -> Option<SocketAddr> {
    let message = MessageDecoder::<Attribute>::new()
        .decode_from_bytes(bytes)
        .ok()?
        .ok()?;
    if message.class() != MessageClass::SuccessResponse
        || message.method() != BINDING
        || message.transaction_id() != TransactionId::new(id)
    {
        return None;
    }
    message
        .get_attribute::<XorMappedAddress>()
        .map(XorMappedAddress::address)
        .or_else(|| {
            message
                .get_attribute::<MappedAddress>()
                .map(MappedAddress::address)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(id: [u8; 12], class: MessageClass, address: SocketAddr, xor: bool) -> Vec<u8> {
        let mut message = Message::<Attribute>::new(class, BINDING, TransactionId::new(id));
        if xor {
            message.add_attribute(XorMappedAddress::new(address));
        } else {
            message.add_attribute(MappedAddress::new(address));
        }
        MessageEncoder::new().encode_into_bytes(message).unwrap()
    }

    #[test]
    fn reads_xor_mapped_and_mapped_addresses_v4_and_v6() {
        let id = [7u8; 12];
        for address in ["203.0.113.9:4242", "[2001:db8::9]:4242"] {
            let address: SocketAddr = address.parse().unwrap();
            for xor in [true, false] {
                let bytes = response(id, MessageClass::SuccessResponse, address, xor);
                assert_eq!(mapped_address(&bytes, id), Some(address));
            }
        }
    }

    #[test]
    fn ignores_wrong_transactions_classes_and_garbage() {
        let id = [7u8; 12];
        let address: SocketAddr = "203.0.113.9:4242".parse().unwrap();
        let other = response([8u8; 12], MessageClass::SuccessResponse, address, true);
        assert_eq!(mapped_address(&other, id), None);
        let error = response(id, MessageClass::ErrorResponse, address, true);
        assert_eq!(mapped_address(&error, id), None);
        assert_eq!(mapped_address(b"not stun at all", id), None);
        assert_eq!(mapped_address(&[], id), None);
    }

    /// A fake server that answers each request through `answer`.
    async fn fake_server(
        answer: fn(&[u8]) -> Option<Vec<u8>>,
    ) -> (String, tokio::task::JoinHandle<usize>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let mut requests = 0;
            let mut buf = vec![0u8; 2048];
            while let Ok(Ok((n, from))) =
                tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf)).await
            {
                requests += 1;
                if let Some(reply) = answer(&buf[..n]) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
            requests
        });
        (addr, task)
    }

    fn fast() -> StunTiming {
        StunTiming {
            rto: Duration::from_millis(20),
            requests: 3,
            final_wait: 2,
        }
    }

    fn transaction(request: &[u8]) -> [u8; 12] {
        request[8..20].try_into().unwrap()
    }

    #[tokio::test]
    async fn retransmits_then_times_out_on_garbage_and_wrong_ids() {
        let (garbage, task) = fake_server(|_| Some(b"\x01\x01garbage".to_vec())).await;
        assert!(matches!(
            discover(&garbage, fast()).await,
            Err(StunError::Timeout { requests: 3, .. })
        ));
        assert_eq!(
            task.await.unwrap(),
            3,
            "every retransmission reached the server"
        );

        let (wrong, _) = fake_server(|request| {
            let mut id = transaction(request);
            id[0] ^= 0xff;
            Some(response(
                id,
                MessageClass::SuccessResponse,
                "198.51.100.1:1".parse().unwrap(),
                true,
            ))
        })
        .await;
        assert!(matches!(
            discover(&wrong, fast()).await,
            Err(StunError::Timeout { .. })
        ));

        let (silent, _) = fake_server(|_| None).await;
        assert!(matches!(
            discover(&silent, fast()).await,
            Err(StunError::Timeout { .. })
        ));
    }

    #[tokio::test]
    async fn learns_the_address_from_a_valid_answer() {
        let (server, _) = fake_server(|request| {
            Some(response(
                transaction(request),
                MessageClass::SuccessResponse,
                "198.51.100.7:5555".parse().unwrap(),
                true,
            ))
        })
        .await;
        assert_eq!(
            discover(&server, fast()).await.unwrap(),
            "198.51.100.7:5555".parse().unwrap()
        );
    }
}
