//! What every session has whatever its transport: whether and why it ended, its counters, and
//! the tasks that end it when they stop.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use remoteingress_wire::extension::Extensions;
use tokio_util::sync::CancellationToken;

use crate::error::{CloseReason, SessionError};
use crate::options::SessionOptions;

/// Traffic counters of a session.
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Payload bytes received (DATA or DATA_BACK).
    pub bytes_in: AtomicU64,
    /// Payload bytes sent.
    pub bytes_out: AtomicU64,
    /// Largest number of received bytes any one stream held before they were written onward.
    pub peak_stream_buffer: AtomicU64,
    /// Streams opened in this session.
    pub streams_opened: AtomicU64,
    /// UDP datagrams dropped because a queue was full or a limit was reached.
    pub udp_dropped: AtomicU64,
    /// UDP sessions open now (kept up to date by the session's owner, which manages them).
    pub udp_sessions: AtomicU64,
    /// Times a stream had data to send but had to wait: for the peer's credit (TLS transport)
    /// or for QUIC's flow or congestion control.
    pub flow_stalls: AtomicU64,
}

impl SessionStats {
    /// Counts `len` bytes received.
    pub(crate) fn received(&self, len: usize) {
        self.bytes_in.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Counts `len` bytes sent.
    pub(crate) fn sent(&self, len: usize) {
        self.bytes_out.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Records how much one stream holds unconsumed now.
    pub(crate) fn stream_buffered(&self, unconsumed: u64) {
        self.peak_stream_buffer
            .fetch_max(unconsumed, Ordering::Relaxed);
    }

    /// Counts a stream that waited for flow control.
    pub(crate) fn stalled(&self) {
        self.flow_stalls.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a dropped datagram.
    pub(crate) fn udp_drop(&self) {
        self.udp_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// The extensions both sides use; the hub learns them after the session has started.
#[derive(Debug)]
pub(crate) struct Agreed {
    reset: AtomicBool,
    drain: AtomicBool,
    liveness: AtomicBool,
}

impl Agreed {
    fn new(agreed: Extensions) -> Self {
        Self {
            reset: AtomicBool::new(agreed.reset),
            drain: AtomicBool::new(agreed.drain),
            liveness: AtomicBool::new(agreed.liveness),
        }
    }

    /// The extensions agreed so far.
    pub(crate) fn get(&self) -> Extensions {
        Extensions {
            reset: self.reset.load(Ordering::Relaxed),
            drain: self.drain.load(Ordering::Relaxed),
            liveness: self.liveness.load(Ordering::Relaxed),
        }
    }

    /// Records the extensions both sides confirmed.
    pub(crate) fn set(&self, agreed: Extensions) {
        self.reset.store(agreed.reset, Ordering::Relaxed);
        // Ordered against `DrainRequest::wanted`: a drain asked while the confirmation arrives
        // is seen by one side or the other.
        self.drain.store(agreed.drain, Ordering::SeqCst);
        self.liveness.store(agreed.liveness, Ordering::Relaxed);
    }

    fn drain(&self) -> bool {
        self.drain.load(Ordering::SeqCst)
    }
}

/// A drain asked of the session (hub): DRAIN goes out once the edge has confirmed the
/// extension, which the hub learns only after the session started, and goes out once.
#[derive(Debug, Default)]
struct DrainRequest {
    wanted: AtomicBool,
    sent: AtomicBool,
}

/// The lifecycle of one session: open until the first close reason is recorded.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    closed: CancellationToken,
    reason: Mutex<Option<CloseReason>>,
    active: AtomicUsize,
    max_streams: usize,
    /// Bytes of unconsumed data all streams may hold together.
    budget: AtomicU64,
    pub(crate) stats: SessionStats,
    pub(crate) agreed: Agreed,
    /// Reads from the peer so far (TLS transport): their count changing means it is alive.
    heard: AtomicU64,
    /// The peer went silent or left an open unconfirmed: new streams should go elsewhere.
    suspect: AtomicBool,
    drain: DrainRequest,
}

impl Lifecycle {
    /// An open session with `options`' stream cap and flow budget, using the `agreed`
    /// extensions until told otherwise.
    pub(crate) fn new(options: &SessionOptions, agreed: Extensions) -> Self {
        Self {
            closed: CancellationToken::new(),
            reason: Mutex::new(None),
            active: AtomicUsize::new(0),
            max_streams: options.max_streams,
            budget: AtomicU64::new(options.budget),
            stats: SessionStats::default(),
            agreed: Agreed::new(agreed),
            heard: AtomicU64::new(0),
            suspect: AtomicBool::new(false),
            drain: DrainRequest::default(),
        }
    }

    /// Records `reason` unless one is recorded already and marks the session closed; true for
    /// the call that closed it.
    pub(crate) fn close(&self, reason: CloseReason) -> bool {
        {
            let mut current = self.reason.lock().unwrap_or_else(|p| p.into_inner());
            if current.is_some() {
                return false;
            }
            *current = Some(reason);
        }
        self.closed.cancel();
        true
    }

    /// Why the session ended, if it has.
    pub(crate) fn reason(&self) -> Option<CloseReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// True once the session has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves once the session has ended.
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// A token cancelled when the session ends.
    pub(crate) fn cancellation(&self) -> CancellationToken {
        self.closed.child_token()
    }

    /// Bytes of unconsumed data all streams may hold together now.
    pub(crate) fn budget(&self) -> u64 {
        self.budget.load(Ordering::Relaxed)
    }

    /// Changes the budget; windows granted from now on follow it.
    pub(crate) fn set_budget(&self, bytes: u64) {
        self.budget.store(bytes, Ordering::Relaxed);
    }

    /// Counts a read from the peer.
    pub(crate) fn heard_from_peer(&self) {
        self.heard.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads from the peer so far.
    pub(crate) fn heard(&self) -> u64 {
        self.heard.load(Ordering::Relaxed)
    }

    /// Marks the session suspect.
    pub(crate) fn mark_suspect(&self) {
        self.suspect.store(true, Ordering::Relaxed);
    }

    /// True once the session is suspect.
    pub(crate) fn is_suspect(&self) -> bool {
        self.suspect.load(Ordering::Relaxed)
    }

    /// Streams open now.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether a stream may be opened now: the session is open and below its stream cap.
    pub(crate) fn may_open(&self) -> Result<(), SessionError> {
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        if self.active() >= self.max_streams {
            return Err(SessionError::TooManyStreams(self.max_streams));
        }
        Ok(())
    }

    /// Records the extensions the edge confirmed (hub), within what this side `offered`; true
    /// if a drain asked before the confirmation is now due (the caller sends DRAIN).
    #[must_use]
    pub(crate) fn confirm(&self, confirmed: Extensions, offered: Extensions) -> bool {
        self.agreed.set(confirmed.intersect(offered));
        self.drain_due()
    }

    /// Records that the hub wants the edge to drain this session; true if DRAIN is due now
    /// (the caller sends it). Otherwise it is sent on the edge's confirmation, or never for an
    /// edge without the extension, or was sent already.
    #[must_use]
    pub(crate) fn want_drain(&self) -> bool {
        self.drain.wanted.store(true, Ordering::SeqCst);
        self.drain_due()
    }

    /// True once, when a drain is wanted and agreed and DRAIN was not sent yet.
    fn drain_due(&self) -> bool {
        self.drain.wanted.load(Ordering::SeqCst)
            && self.agreed.drain()
            && !self.drain.sent.swap(true, Ordering::SeqCst)
    }

    /// Counts a newly opened stream.
    pub(crate) fn stream_opened(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a stream that is gone.
    pub(crate) fn stream_released(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A transport's session state: its lifecycle, and what closing means for the transport.
pub(crate) trait SessionCore: Send + Sync + 'static {
    /// The shared lifecycle.
    fn lifecycle(&self) -> &Lifecycle;

    /// The session's limits and timers.
    fn options(&self) -> &SessionOptions;

    /// A count that changes whenever something arrives from the peer.
    fn heard(&self) -> u64 {
        self.lifecycle().heard()
    }

    /// Whether a live peer is sure to be heard from every probe interval, so that silence
    /// means something (on the edge; the hub always probes).
    fn probes_answered(&self) -> bool;

    /// Ends the session with `reason` (the first reason wins) and releases what the transport
    /// holds: waiting streams are woken, the connection is closed.
    fn close(&self, reason: CloseReason);
}

/// What a session's task returns: it runs until it must end the session, and says why.
pub(crate) type TaskEnd = Result<Infallible, CloseReason>;

/// Runs one of a session's tasks until the session ends; a task that stops first ends the
/// session with its reason.
pub(crate) fn spawn_task<S: SessionCore>(
    core: &Arc<S>,
    task: impl Future<Output = TaskEnd> + Send + 'static,
) {
    let core = core.clone();
    tokio::spawn(async move {
        let ended = tokio::select! {
            ended = task => ended,
            () = core.lifecycle().closed() => return,
        };
        match ended {
            Err(reason) => core.close(reason),
            Ok(never) => match never {},
        }
    });
}
