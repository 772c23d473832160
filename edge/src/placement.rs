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
        match confirmation(
            client,
            &reader,
            &mut writer,
            &mut kept,
            &picked,
            tunnels,
            &tried,
            deadline,
        )
        .await
        {
            Waited::Confirmed => {
                return Some(Placed {
                    picked,
                    reader,
                    writer,
                })
            }
            Waited::ClientGone => {
                writer.reset();
                return None;
            }
            Waited::Unconfirmed => {
                tracing::debug!(hub = %picked.hub, stream = reader.id(), "open not confirmed in time; moving it to another tunnel");
                writer.reset();
            }
        }
    }
    None
}

/// Waits for the hub to confirm the open, forwarding (and keeping) what the client sends
/// meanwhile. Past `deadline` the tunnel is suspect; the stream moves if another tunnel is
/// there to take it, else it keeps waiting here.
#[allow(clippy::too_many_arguments)]
async fn confirmation(
    client: &TcpStream,
    reader: &StreamReader,
    writer: &mut StreamWriter,
    kept: &mut Kept,
    picked: &Picked,
    tunnels: &Tunnels,
    tried: &[TunnelKey],
    deadline: Duration,
) -> Waited {
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
                if tunnels.pick_except(tried).is_some() {
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
    use super::*;

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
