//! Placing a client connection on a tunnel. While the hub has not confirmed the open
//! (extension `liveness`), the client's first bytes are kept; an open not confirmed in time is
//! moved, with those bytes, to another tunnel, and its tunnel marked suspect. So a tunnel to a
//! hub that vanished without a word costs no client connection. With a hub that does not
//! confirm opens, the first tunnel that takes the stream keeps it, as before.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use remoteingress_tunnel::{SessionError, StreamReader, StreamWriter};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::tunnels::{Picked, TunnelKey, Tunnels};

/// Client bytes kept for a retry: one initial stream window. Past it, the client's further
/// bytes wait for the confirmation.
const KEPT_BYTES: usize = 64 * 1024;

/// Tunnels tried for one client connection before it is refused (a tunnel may end between
/// being chosen and opening the stream, or leave the open unconfirmed).
const OPEN_ATTEMPTS: usize = 4;

/// How long an open may stay unconfirmed before it moves: `floor`, or four round trips of the
/// tunnel if that is longer.
pub(crate) fn confirmation_deadline(floor: Duration, rtt: Option<Duration>) -> Duration {
    floor.max(rtt.unwrap_or_default() * 4)
}

/// A stream its hub confirmed (or will never confirm: a hub without the extension), with the
/// tunnel it is on.
pub(crate) struct Placed {
    pub(crate) picked: Picked,
    pub(crate) reader: StreamReader,
    pub(crate) writer: StreamWriter,
}

/// The client's bytes sent before the open was confirmed, and whether it finished sending.
#[derive(Default)]
struct Kept {
    chunks: Vec<Bytes>,
    len: usize,
    finished: bool,
}

impl Kept {
    /// Whether more of the client's bytes may be read before the confirmation.
    fn may_read(&self) -> bool {
        !self.finished && self.len < KEPT_BYTES
    }

    /// Sends everything kept on a new stream, as the client sent it.
    async fn replay(&self, writer: &mut StreamWriter) -> Result<(), SessionError> {
        for chunk in &self.chunks {
            let mut rest = chunk.clone();
            while !rest.is_empty() {
                let credit = writer.reserve().await?;
                writer.send(rest.split_to(credit.min(rest.len()))).await?;
            }
        }
        if self.finished {
            writer.finish().await;
        }
        Ok(())
    }

    /// Reads what the client has ready (at most `credit` bytes), sends it and keeps a copy.
    /// False if the client is gone.
    async fn forward(
        &mut self,
        client: &TcpStream,
        writer: &mut StreamWriter,
        credit: usize,
    ) -> bool {
        let mut buf = BytesMut::with_capacity(credit.min(KEPT_BYTES - self.len));
        match client.try_read_buf(&mut buf) {
            Ok(0) => {
                self.finished = true;
                writer.finish().await;
                true
            }
            Ok(n) => {
                let chunk = buf.freeze();
                self.len += n;
                self.chunks.push(chunk.clone());
                // A failed send shows as the stream's abort, which the caller watches.
                let _ = writer.send(chunk).await;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Err(_) => false,
        }
    }
}

/// How waiting for one open's confirmation ended.
enum Waited {
    /// Confirmed: the stream stays where it is.
    Confirmed,
    /// Not confirmed in time, or its tunnel was lost: try another tunnel.
    Unconfirmed,
    /// The client went away.
    ClientGone,
}

/// Opens a stream for `client` (whose PROXY v1 line is `header`) on the best tunnel, moving it
/// to another while the hub does not confirm it; `None` if no tunnel took it or the client
/// went away.
pub(crate) async fn place(client: &TcpStream, header: &Bytes, tunnels: &Tunnels) -> Option<Placed> {
    let mut kept = Kept::default();
    let mut tried: Vec<TunnelKey> = Vec::new();
    for attempt in 0..OPEN_ATTEMPTS {
        let picked = tunnels.pick_except(&tried)?;
        tried.push(picked.key);
        let (reader, mut writer) = match picked.session.open(header.clone()).await {
            Ok(halves) => halves,
            Err(error) => {
                tracing::debug!(%error, hub = %picked.hub, "tunnel refused a stream; trying another");
                continue;
            }
        };
        if attempt > 0 {
            tunnels.open_retried();
            if kept.replay(&mut writer).await.is_err() {
                continue;
            }
        }
        let deadline = confirmation_deadline(tunnels.confirm_within(), picked.session.rtt());
        let mut attempt = Placed {
            picked,
            reader,
            writer,
        };
        let elsewhere = || tunnels.pick_except(&tried).is_some();
        match confirmation(client, &mut attempt, &mut kept, deadline, elsewhere).await {
            Waited::Confirmed => return Some(attempt),
            Waited::ClientGone => {
                attempt.writer.reset();
                return None;
            }
            Waited::Unconfirmed => {
                let (hub, stream) = (&attempt.picked.hub, attempt.reader.id());
                tracing::debug!(%hub, stream, "open not confirmed in time; moving it to another tunnel");
                attempt.writer.reset();
            }
        }
    }
    None
}

/// Waits for the hub to confirm `attempt`'s open, forwarding (and keeping) what the client
/// sends meanwhile. Past `deadline` the tunnel is suspect; the stream moves if another tunnel
/// is there to take it (`elsewhere`), else it keeps waiting here.
async fn confirmation(
    client: &TcpStream,
    attempt: &mut Placed,
    kept: &mut Kept,
    deadline: Duration,
    elsewhere: impl Fn() -> bool,
) -> Waited {
    let Placed {
        picked,
        reader,
        writer,
    } = attempt;
    let confirmed = reader.open_confirmed();
    let aborted = reader.abort_signal();
    let mut due = Instant::now() + deadline;
    loop {
        // Only waiting is raced here; reading and sending happen below, never cut short.
        let credit = tokio::select! {
            biased;
            () = confirmed.cancelled() => return Waited::Confirmed,
            () = aborted.cancelled() => {
                // A refusal or reset from the hub answers the open; a lost tunnel does not.
                return match picked.session.is_closed() {
                    true => Waited::Unconfirmed,
                    false => Waited::Confirmed,
                };
            }
            () = tokio::time::sleep_until(due) => {
                picked.session.mark_suspect();
                if elsewhere() {
                    return Waited::Unconfirmed;
                }
                due += deadline;
                continue;
            }
            credit = ready_to_read(client, writer), if kept.may_read() => credit,
        };
        match credit {
            Some(credit) => {
                if !kept.forward(client, writer, credit).await {
                    return Waited::ClientGone;
                }
            }
            None => return Waited::Unconfirmed,
        }
    }
}

/// Resolves when the stream may take bytes and the client has some (or its EOF) ready: the
/// credit, or `None` if the stream failed.
async fn ready_to_read(client: &TcpStream, writer: &StreamWriter) -> Option<usize> {
    let credit = writer.reserve().await.ok()?;
    client.readable().await.ok()?;
    Some(credit)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use remoteingress_tunnel::{spawn_session, Role, SessionEvent, SessionOptions};
    use remoteingress_wire::extension::Extensions;
    use tokio::io::AsyncWriteExt;
    use tokio::sync::broadcast;

    /// An edge session that agreed every extension, and the raw other end of its connection.
    fn edge_session() -> (remoteingress_tunnel::SessionHandle, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let options = SessionOptions::default();
        let (session, events) =
            spawn_session(ours, Bytes::new(), Role::Edge, options, Extensions::ALL);
        std::mem::forget(events);
        (session, theirs)
    }

    #[tokio::test]
    async fn an_unconfirmed_open_moves_to_another_tunnel_with_the_clients_first_bytes() {
        let retried = prometheus::IntCounter::new("retried", "retried").unwrap();
        let tunnels = Tunnels::new(
            broadcast::channel(1).0,
            Duration::from_millis(50),
            retried.clone(),
        );
        // The first tunnel's hub never answers; the second is a hub session that confirms.
        let (silent, mut silent_io) = edge_session();
        let (live, hub_io) = edge_session();
        let (_hub, mut hub_events) = spawn_session(
            hub_io,
            Bytes::new(),
            Role::Hub,
            SessionOptions::default(),
            Extensions::NONE,
        );
        let silent_key = tunnels.add(&silent, Some("silent"), "h:1").unwrap();
        tunnels.add(&live, Some("live"), "h:2").unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        client.write_all(b"first bytes").await.unwrap();
        let header = Bytes::from_static(b"PROXY TCP4 192.0.2.1 198.51.100.1 40000 80\r\n");
        let placed = place(&accepted, &header, &tunnels).await.unwrap();

        assert_eq!(placed.picked.hub, "live");
        assert!(silent.is_suspect(), "the tunnel that left it unconfirmed");
        assert_eq!(retried.get(), 1);
        let Some(SessionEvent::Opened { mut reader, .. }) = hub_events.recv().await else {
            panic!("the live hub gets the stream");
        };
        let mut received = Vec::new();
        let receive = async {
            while received.len() < b"first bytes".len() {
                received.extend_from_slice(&reader.recv().await.unwrap().unwrap());
            }
        };
        tokio::time::timeout(Duration::from_secs(10), receive)
            .await
            .expect("the first bytes reach the live hub");
        assert_eq!(received, b"first bytes", "replayed on the new tunnel");
        assert_ne!(tunnels.pick().map(|picked| picked.key), Some(silent_key));
        assert!(
            sent_data(&mut silent_io)
                .await
                .windows(11)
                .any(|w| w == b"first bytes"),
            "the bytes went to the silent hub first, so the live one got them replayed"
        );
    }

    /// The payloads of the DATA frames a session wrote so far.
    async fn sent_data(io: &mut tokio::io::DuplexStream) -> Vec<u8> {
        use remoteingress_wire::frame::{FrameDecoder, FrameType};
        use tokio::io::AsyncReadExt;
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0; 1 << 16];
        let n = io.read(&mut buf).await.unwrap();
        decoder.feed(&buf[..n]);
        let mut data = Vec::new();
        while let Ok(Some(frame)) = decoder.next_frame() {
            if frame.kind == FrameType::Data {
                data.extend_from_slice(&frame.payload);
            }
        }
        data
    }

    #[test]
    fn the_deadline_grows_with_a_long_round_trip() {
        let second = Duration::from_secs(1);
        assert_eq!(confirmation_deadline(second, None), second);
        assert_eq!(
            confirmation_deadline(second, Some(Duration::from_millis(100))),
            second
        );
        assert_eq!(
            confirmation_deadline(second, Some(Duration::from_millis(400))),
            Duration::from_millis(1600)
        );
    }
}
