//! The QUIC transport (quinn): the first bidirectional stream is the control channel (handshake
//! line, JSON reply, then `[type][length][payload]` messages); every tunnelled TCP connection is
//! its own stream starting with its PROXY v1 line; UDP travels as QUIC datagrams.

mod endpoint;
mod shared;
pub(crate) mod stream;
mod tasks;
#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream};
use remoteingress_wire::extension::Extensions;
use remoteingress_wire::frame::FrameType;
use remoteingress_wire::quic::Datagram;
use tokio::sync::mpsc;

use crate::error::SessionError;
use crate::event::{SessionEvent, EVENT_QUEUE};
use crate::lifecycle::spawn_task;
use crate::liveness;
use crate::options::{Role, SessionOptions};
use crate::stream::{StreamReader, StreamWriter};
use shared::{QuicShared, StreamGuard, Unconfirmed};

pub use endpoint::{
    client_config, client_endpoint, client_endpoint_with, server_endpoint, QUIC_ALPN,
    UNAUTHENTICATED_WINDOW,
};

/// A running QUIC session.
#[derive(Clone, Debug)]
pub(crate) struct QuicSession {
    pub(crate) shared: Arc<QuicShared>,
}

/// Starts the session's tasks over an authenticated connection whose control stream is
/// `control`; `initial` holds control bytes already read past the handshake.
pub(crate) fn start(
    connection: Connection,
    control: (SendStream, RecvStream),
    initial: Bytes,
    role: Role,
    options: SessionOptions,
    agreed: Extensions,
) -> (QuicSession, mpsc::Receiver<SessionEvent>) {
    let (control_tx, control_rx) = mpsc::channel(options.lanes.control_frames);
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    if role == Role::Edge && !agreed.is_empty() {
        let _ = control_tx.try_send((FrameType::Extensions, Bytes::from(agreed.to_payload())));
    }
    if role == Role::Hub {
        endpoint::grant_session_limits(&connection, &options);
    }
    let shared = Arc::new(QuicShared::new(
        role, options, connection, control_tx, agreed,
    ));
    let (send, recv) = control;
    spawn_task(
        &shared,
        tasks::write_control(send, control_rx, shared.clone()),
    );
    spawn_task(
        &shared,
        tasks::read_control(recv, initial, shared.clone(), events_tx.clone()),
    );
    spawn_task(
        &shared,
        tasks::read_datagrams(shared.clone(), events_tx.clone()),
    );
    match role {
        Role::Hub => {
            spawn_task(
                &shared,
                tasks::accept_streams(shared.clone(), events_tx.clone()),
            );
            spawn_task(&shared, tasks::report_rtt(shared.clone(), events_tx));
        }
        Role::Edge => spawn_task(&shared, liveness::watch_silence(shared.clone(), events_tx)),
    }
    spawn_task(&shared, tasks::watch_connection(shared.clone()));
    (QuicSession { shared }, events_rx)
}

impl QuicSession {
    /// Opens a stream (edge) and writes its PROXY v1 line. The caller has checked that the
    /// session may open one.
    pub(crate) async fn open(
        &self,
        header: Bytes,
    ) -> Result<(StreamReader, StreamWriter), SessionError> {
        let shared = &self.shared;
        let (mut send, recv) = shared
            .connection
            .open_bi()
            .await
            .map_err(|_| SessionError::Closed)?;
        let guard = StreamGuard::opened(shared, send.id().index() as u32);
        send.write_all(&header)
            .await
            .map_err(|_| SessionError::Closed)?;
        let (reader, writer) = stream::halves(send, recv, guard);
        Ok((StreamReader::quic(reader), StreamWriter::quic(writer)))
    }

    /// Sends a control message (CONFIG, CONFIG_ACK).
    pub(crate) async fn send_control(
        &self,
        kind: FrameType,
        payload: Bytes,
    ) -> Result<(), SessionError> {
        self.shared
            .control_tx
            .send((kind, payload))
            .await
            .map_err(|_| SessionError::Closed)
    }

    /// Opens a UDP session (edge); its open is repeated until the hub answers.
    pub(crate) fn open_udp(&self, header: Bytes) -> Result<u32, SessionError> {
        if self.shared.lifecycle.is_closed() {
            return Err(SessionError::Closed);
        }
        let id = self.shared.next_udp_id.fetch_add(1, Ordering::Relaxed);
        self.shared
            .unconfirmed()
            .insert(id, Unconfirmed::new(header.clone()));
        self.shared.send_datagram(&Datagram::Open { id, header });
        Ok(id)
    }

    /// Sends one datagram, preceded now and then by its session's open while that is unconfirmed.
    pub(crate) fn send_udp(&self, id: u32, payload: Bytes) -> bool {
        let reopen = self
            .shared
            .unconfirmed()
            .get_mut(&id)
            .and_then(Unconfirmed::next_datagram);
        if let Some(header) = reopen {
            self.shared.send_datagram(&Datagram::Open { id, header });
        }
        self.shared.send_datagram(&Datagram::Data { id, payload })
    }

    /// Tells the peer that a UDP session ended.
    pub(crate) fn close_udp(&self, id: u32) {
        self.shared.unconfirmed().remove(&id);
        let _ = self.shared.control_tx.try_send((
            FrameType::UdpClose,
            Bytes::copy_from_slice(&id.to_be_bytes()),
        ));
    }

    /// Follows a new flow budget: the connection's receive window.
    pub(crate) fn set_budget(&self, bytes: u64) {
        self.shared
            .connection
            .set_receive_window(endpoint::receive_window(bytes));
    }

    /// QUIC's round-trip estimate.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        Some(self.shared.connection.rtt())
    }
}
