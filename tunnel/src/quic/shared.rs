//! State that every task and stream of a QUIC session shares.

use std::collections::{HashMap, HashSet};
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
    /// Streams whose open the hub has not confirmed yet (edge).
    open_confirmations: Mutex<OpenConfirmations>,
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
            open_confirmations: Mutex::default(),
            confirms_opens: AtomicBool::new(false),
        }
    }

    /// UDP sessions whose open the hub has not confirmed yet, with their headers.
    pub(crate) fn unconfirmed(&self) -> MutexGuard<'_, HashMap<u32, Unconfirmed>> {
        self.unconfirmed_udp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn open_confirmations(&self) -> MutexGuard<'_, OpenConfirmations> {
        self.open_confirmations
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
        self.open_confirmations().confirm(index);
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

/// The hub's confirmations of the edge's opens, by stream index. A confirmation may come
/// before its stream is expected: QUIC opens every lower-numbered stream implicitly, so the hub
/// can see (and confirm) stream n once stream n+1 has data, while the task that opened n has not
/// yet recorded it. Such early confirmations are kept, a bounded number of them.
#[derive(Debug, Default)]
struct OpenConfirmations {
    awaited: HashMap<u32, CancellationToken>,
    early: HashSet<u32>,
}

impl OpenConfirmations {
    /// Most early confirmations kept; past it they are forgotten (an open then waits in vain
    /// and moves to another tunnel, as if unconfirmed).
    const MAX_EARLY: usize = 1024;

    /// Records that stream `index` waits for `confirmed`, cancelling it if it came already.
    fn expect(&mut self, index: u32, confirmed: &CancellationToken) {
        if self.early.remove(&index) {
            confirmed.cancel();
        } else {
            self.awaited.insert(index, confirmed.clone());
        }
    }

    /// The hub confirmed stream `index`.
    fn confirm(&mut self, index: u32) {
        match self.awaited.remove(&index) {
            Some(confirmed) => confirmed.cancel(),
            None => {
                if self.early.len() >= Self::MAX_EARLY {
                    self.early.clear();
                }
                self.early.insert(index);
            }
        }
    }

    /// Stream `index` is gone.
    fn forget(&mut self, index: u32) {
        self.awaited.remove(&index);
        self.early.remove(&index);
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
            Some(index) => shared.open_confirmations().expect(index, &confirmed),
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
            self.shared.open_confirmations().forget(index);
        }
        self.shared.lifecycle.stream_released();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmation_may_come_before_its_stream_is_expected() {
        let mut confirmations = OpenConfirmations::default();
        let (early, late) = (CancellationToken::new(), CancellationToken::new());
        confirmations.confirm(8);
        confirmations.expect(8, &early);
        assert!(early.is_cancelled(), "kept until its stream is expected");
        confirmations.expect(9, &late);
        assert!(!late.is_cancelled());
        confirmations.confirm(9);
        assert!(late.is_cancelled());
        for index in 0..=OpenConfirmations::MAX_EARLY as u32 * 2 {
            confirmations.confirm(1000 + index);
        }
        assert!(confirmations.early.len() <= OpenConfirmations::MAX_EARLY);
        confirmations.forget(1000 + OpenConfirmations::MAX_EARLY as u32 * 2);
        assert!(confirmations.awaited.is_empty());
    }
}
