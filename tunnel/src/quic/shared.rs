//! State that every task and stream of a QUIC session shares.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use quinn::{Connection, VarInt};
use remoteingress_wire::extension::Extensions;
use remoteingress_wire::frame::FrameType;
use remoteingress_wire::quic::Datagram;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::CloseReason;
use crate::lifecycle::{Lifecycle, SessionCore};
use crate::options::{Role, SessionOptions};

/// The state of one QUIC session.
#[derive(Debug)]
pub(crate) struct QuicShared {
    pub(crate) role: Role,
    pub(crate) options: SessionOptions,
    pub(crate) connection: Connection,
    pub(crate) control_tx: mpsc::Sender<(FrameType, Bytes)>,
    pub(crate) lifecycle: Lifecycle,
    pub(crate) next_udp_id: AtomicU32,
    /// UDP sessions the hub has not answered yet (edge): their opens are repeated, spaced out,
    /// until it has, so a lost open never black-holes a session.
    unconfirmed_udp: Mutex<HashMap<u32, Unconfirmed>>,
    /// Streams whose open the hub has not confirmed yet (edge), by stream index.
    unconfirmed_streams: Mutex<HashMap<u32, CancellationToken>>,
    /// The hub confirms opens (edge): it echoed EXTENSIONS with `liveness`. Streams can
    /// overtake the control stream, so the agreement alone does not tell when this starts.
    confirms_opens: AtomicBool,
}

/// A UDP session whose open the hub has not confirmed by a reply.
#[derive(Debug)]
pub(crate) struct Unconfirmed {
    header: Bytes,
    /// Data datagrams sent since the open.
    sent: u32,
}

impl Unconfirmed {
    /// Most data datagrams between two repeats of the open.
    const MAX_SPACING: u32 = 1024;

    pub(crate) fn new(header: Bytes) -> Self {
        Self { header, sent: 0 }
    }

    /// Counts a data datagram; the header to send before it when the open is due again: before
    /// the 2nd, 4th, 8th… datagram and then every [`Self::MAX_SPACING`]th, so a target that never
    /// answers costs a few opens, not one per datagram.
    pub(crate) fn next_datagram(&mut self) -> Option<Bytes> {
        self.sent = self.sent.wrapping_add(1);
        let due =
            self.sent > 1 && (self.sent.is_power_of_two() || self.sent % Self::MAX_SPACING == 0);
        due.then(|| self.header.clone())
    }
}

impl SessionCore for QuicShared {
    fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    fn options(&self) -> &SessionOptions {
        &self.options
    }

    /// Keep-alives make a live peer acknowledge something every interval.
    fn heard(&self) -> u64 {
        self.connection.stats().udp_rx.datagrams
    }

    fn probes_answered(&self) -> bool {
        true
    }

    fn close(&self, reason: CloseReason) {
        let message = reason.to_string();
        if self.lifecycle.close(reason) {
            self.connection
                .close(VarInt::from_u32(0), message.as_bytes());
        }
    }
}

impl QuicShared {
    pub(crate) fn new(
        role: Role,
        options: SessionOptions,
        connection: Connection,
        control_tx: mpsc::Sender<(FrameType, Bytes)>,
        agreed: Extensions,
    ) -> Self {
        Self {
            lifecycle: Lifecycle::new(&options, agreed),
            role,
            options,
            connection,
            control_tx,
            next_udp_id: AtomicU32::new(1),
            unconfirmed_udp: Mutex::new(HashMap::new()),
            unconfirmed_streams: Mutex::new(HashMap::new()),
            confirms_opens: AtomicBool::new(false),
        }
    }

    /// UDP sessions whose open the hub has not confirmed yet, with their headers.
    pub(crate) fn unconfirmed(&self) -> MutexGuard<'_, HashMap<u32, Unconfirmed>> {
        self.unconfirmed_udp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn unconfirmed_streams(&self) -> MutexGuard<'_, HashMap<u32, CancellationToken>> {
        self.unconfirmed_streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// From now on the hub confirms every open (edge).
    pub(crate) fn hub_confirms_opens(&self) {
        self.confirms_opens.store(true, Ordering::Relaxed);
    }

    /// Whether the hub confirms opens from now on (edge).
    #[cfg(test)]
    pub(crate) fn confirms_opens(&self) -> bool {
        self.confirms_opens.load(Ordering::Relaxed)
    }

    /// The hub confirmed the open of stream `index` (edge).
    pub(crate) fn stream_confirmed(&self, index: u32) {
        if let Some(confirmed) = self.unconfirmed_streams().remove(&index) {
            confirmed.cancel();
        }
    }

    /// Sends a datagram if it fits the connection and its send queue now; a datagram that does
    /// not is dropped and counted. Under overload that drops the newest datagram at once,
    /// before any copy, where quinn would queue it and drop the oldest, uncounted.
    pub(crate) fn send_datagram(&self, datagram: &Datagram) -> bool {
        let len = datagram.encoded_len();
        let fits = self
            .connection
            .max_datagram_size()
            .is_some_and(|max| len <= max)
            && len <= self.connection.datagram_send_buffer_space();
        let sent = fits && self.connection.send_datagram(datagram.encode()).is_ok();
        if !sent {
            self.lifecycle.stats.udp_drop();
        }
        sent
    }
}

/// Counts a stream as active until both of its halves are gone, and signals its abort and the
/// hub's confirmation of its open.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    pub(crate) shared: Arc<QuicShared>,
    /// Cancelled when the stream is aborted: reset either way, or the connection lost.
    pub(crate) abort: CancellationToken,
    /// Cancelled once the hub has confirmed the open; at once where it never will.
    pub(crate) confirmed: CancellationToken,
    /// The stream's index while its confirmation is awaited.
    awaiting: Option<u32>,
}

impl StreamGuard {
    /// The guard of a stream the peer opened (hub).
    pub(crate) fn new(shared: &Arc<QuicShared>) -> Arc<Self> {
        Self::with(shared, None)
    }

    /// The guard of stream `index`, just opened here (edge).
    pub(crate) fn opened(shared: &Arc<QuicShared>, index: u32) -> Arc<Self> {
        Self::with(shared, Some(index))
    }

    fn with(shared: &Arc<QuicShared>, index: Option<u32>) -> Arc<Self> {
        shared.lifecycle.stream_opened();
        let confirmed = CancellationToken::new();
        let awaiting = index.filter(|_| shared.confirms_opens.load(Ordering::Relaxed));
        match awaiting {
            Some(index) => {
                shared
                    .unconfirmed_streams()
                    .insert(index, confirmed.clone());
            }
            None => confirmed.cancel(),
        }
        Arc::new(Self {
            shared: shared.clone(),
            abort: shared.lifecycle.cancellation(),
            confirmed,
            awaiting,
        })
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(index) = self.awaiting {
            self.shared.unconfirmed_streams().remove(&index);
        }
        self.shared.lifecycle.stream_released();
    }
}
