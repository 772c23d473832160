//! State that every task and stream of a multiplexed session shares: the stream table, the
//! writer's lanes, the ping in flight, and the lifecycle.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use remoteingress_wire::extension::Extensions;
use remoteingress_wire::flow::{window_for, RecvWindow, SendCredit, SUSTAINED_WINDOW};
use remoteingress_wire::frame::{Frame, FrameType};
use remoteingress_wire::qos::StreamRate;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::clock::now;
use crate::error::{CloseReason, ProtocolViolation};
use crate::lifecycle::{Lifecycle, SessionCore};
use crate::options::{Role, SessionOptions, ORIGINAL_HUB_SILENCE};

/// The frame types a role sends for its streams and UDP sessions.
pub(crate) fn data_out(role: Role) -> FrameType {
    match role {
        Role::Edge => FrameType::Data,
        Role::Hub => FrameType::DataBack,
    }
}

/// CLOSE or CLOSE_BACK.
pub(crate) fn close_out(role: Role) -> FrameType {
    match role {
        Role::Edge => FrameType::Close,
        Role::Hub => FrameType::CloseBack,
    }
}

/// WINDOW_UPDATE or WINDOW_UPDATE_BACK.
pub(crate) fn window_out(role: Role) -> FrameType {
    match role {
        Role::Edge => FrameType::WindowUpdate,
        Role::Hub => FrameType::WindowUpdateBack,
    }
}

/// UDP_DATA or UDP_DATA_BACK.
pub(crate) fn udp_data_out(role: Role) -> FrameType {
    match role {
        Role::Edge => FrameType::UdpData,
        Role::Hub => FrameType::UdpDataBack,
    }
}

/// What the writer is given to do.
pub(crate) enum Outgoing {
    /// Write this frame.
    Frame(Frame),
    /// Fires once every frame queued before it on the same lane has been written.
    Flushed(oneshot::Sender<()>),
}

/// The sending ends of the writer's three lanes.
pub(crate) struct LaneSenders {
    pub(crate) control: mpsc::Sender<Outgoing>,
    pub(crate) data: mpsc::Sender<Outgoing>,
    pub(crate) sustained: mpsc::Sender<Outgoing>,
}

/// The receiving ends of the writer's three lanes.
pub(crate) struct Lanes {
    pub(crate) control: mpsc::Receiver<Outgoing>,
    pub(crate) data: mpsc::Receiver<Outgoing>,
    pub(crate) sustained: mpsc::Receiver<Outgoing>,
}

/// Frames of ordinary data queued on the data lane.
const DATA_LANE_FRAMES: usize = 256;
/// Frames of sustained streams queued on their lane.
const SUSTAINED_LANE_FRAMES: usize = 64;

/// A connected pair of lane ends.
pub(crate) fn lanes(control_frames: usize) -> (LaneSenders, Lanes) {
    let (control_tx, control) = mpsc::channel(control_frames);
    let (data_tx, data) = mpsc::channel(DATA_LANE_FRAMES);
    let (sustained_tx, sustained) = mpsc::channel(SUSTAINED_LANE_FRAMES);
    (
        LaneSenders {
            control: control_tx,
            data: data_tx,
            sustained: sustained_tx,
        },
        Lanes {
            control,
            data,
            sustained,
        },
    )
}

/// Queues `outgoing` without waiting, or from a spawned task when the lane is momentarily full.
pub(crate) fn send_soon(lane: &mpsc::Sender<Outgoing>, outgoing: Outgoing) {
    if let Err(mpsc::error::TrySendError::Full(outgoing)) = lane.try_send(outgoing) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let lane = lane.clone();
            runtime.spawn(async move {
                let _ = lane.send(outgoing).await;
            });
        }
    }
}

/// One stream's state, behind its slot's lock.
#[derive(Debug)]
pub(crate) struct StreamState {
    pub(crate) inbox: VecDeque<Bytes>,
    pub(crate) recv: RecvWindow,
    pub(crate) send: SendCredit,
    pub(crate) inbound_rate: StreamRate,
    pub(crate) peer_closed: bool,
    pub(crate) local_closed: bool,
    /// Nobody reads any more: arriving data is consumed at once.
    pub(crate) discard: bool,
    /// The session ended under the stream, or either side reset it.
    pub(crate) aborted: bool,
}

/// A stream as the session's table holds it.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    pub(crate) id: u32,
    state: Mutex<StreamState>,
    pub(crate) readable: Notify,
    pub(crate) writable: Notify,
    /// Cancelled when the stream is aborted: reset by either side, or the session ended.
    pub(crate) abort: CancellationToken,
    /// Cancelled once the hub has answered the open (edge), at once where it never will.
    pub(crate) confirmed: CancellationToken,
}

impl StreamSlot {
    /// A stream's slot; `awaits_confirmation` for an edge's stream whose hub confirms opens.
    pub(crate) fn new(id: u32, lifecycle: &Lifecycle, awaits_confirmation: bool) -> Arc<Self> {
        let confirmed = CancellationToken::new();
        if !awaits_confirmation {
            confirmed.cancel();
        }
        Arc::new(Self {
            id,
            confirmed,
            abort: lifecycle.cancellation(),
            state: Mutex::new(StreamState {
                inbox: VecDeque::new(),
                recv: RecvWindow::default(),
                send: SendCredit::default(),
                inbound_rate: StreamRate::new(now()),
                peer_closed: false,
                local_closed: false,
                discard: false,
                aborted: false,
            }),
            readable: Notify::new(),
            writable: Notify::new(),
        })
    }

    /// Records that the hub answered the open: any frame of the stream from it does.
    pub(crate) fn confirm(&self) {
        if !self.confirmed.is_cancelled() {
            self.confirmed.cancel();
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The state of one multiplexed session.
///
/// Lock order: a slot's lock may be held while the stream table's lock is taken
/// ([`Shared::release_if_done`]), never the other way round.
pub(crate) struct Shared {
    pub(crate) role: Role,
    pub(crate) options: SessionOptions,
    streams: Mutex<HashMap<u32, Arc<StreamSlot>>>,
    /// Next stream id to open; held while the OPEN is queued so ids reach the peer in order.
    pub(crate) next_id: tokio::sync::Mutex<u32>,
    /// Highest stream id opened so far (for telling stale frames from bogus ones).
    pub(crate) last_opened: AtomicU32,
    /// Next UDP session id to open (edge); held while UDP_OPEN is queued, as for streams.
    pub(crate) next_udp_id: tokio::sync::Mutex<u32>,
    /// Highest UDP session id opened so far (edge).
    pub(crate) last_udp_opened: AtomicU32,
    pub(crate) lanes: LaneSenders,
    pub(crate) lifecycle: Lifecycle,
    /// The PING in flight (the hub's, or the edge's with extension `liveness`): its token and
    /// when it was sent.
    pub(crate) ping_sent: Mutex<Option<([u8; 8], Instant)>>,
    /// Last round trip in µs: measured by our PING, or as the hub reported it in its PING.
    pub(crate) rtt_us: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("role", &self.role)
            .field("active_streams", &self.lifecycle.active())
            .finish()
    }
}

impl SessionCore for Shared {
    fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    fn options(&self) -> &SessionOptions {
        &self.options
    }

    fn probes_answered(&self) -> bool {
        self.liveness_agreed()
    }

    fn close(&self, reason: CloseReason) {
        if !self.lifecycle.close(reason) {
            return;
        }
        // Slots are locked after the table lock is released (see the lock order above).
        let slots: Vec<Arc<StreamSlot>> = self.streams().values().cloned().collect();
        for slot in slots {
            slot.lock().aborted = true;
            slot.readable.notify_one();
            slot.writable.notify_one();
        }
    }
}

impl Shared {
    pub(crate) fn new(
        role: Role,
        options: SessionOptions,
        lanes: LaneSenders,
        agreed: Extensions,
    ) -> Self {
        Self {
            lifecycle: Lifecycle::new(&options, agreed),
            role,
            options,
            streams: Mutex::new(HashMap::new()),
            next_id: tokio::sync::Mutex::new(1),
            last_opened: AtomicU32::new(0),
            next_udp_id: tokio::sync::Mutex::new(1),
            last_udp_opened: AtomicU32::new(0),
            lanes,
            ping_sent: Mutex::new(None),
            rtt_us: AtomicU64::new(0),
        }
    }

    pub(crate) fn streams(&self) -> MutexGuard<'_, HashMap<u32, Arc<StreamSlot>>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The stream with this id, while it is open.
    pub(crate) fn slot(&self, id: u32) -> Option<Arc<StreamSlot>> {
        self.streams().get(&id).cloned()
    }

    /// The receive window a stream is granted now.
    pub(crate) fn window(&self, state: &StreamState) -> u32 {
        let window = window_for(self.lifecycle.budget(), self.lifecycle.active());
        if state.inbound_rate.is_sustained() {
            window.min(SUSTAINED_WINDOW)
        } else {
            window
        }
    }

    /// Adds a new stream to the table and returns the credit to grant it, if any.
    pub(crate) fn register(&self, slot: &Arc<StreamSlot>) -> Option<u32> {
        self.streams().insert(slot.id, slot.clone());
        self.lifecycle.stream_opened();
        let mut state = slot.lock();
        let window = self.window(&state);
        state.recv.top_up(window)
    }

    /// Forgets a stream once both directions are closed.
    pub(crate) fn release_if_done(&self, slot: &StreamSlot, state: &StreamState) {
        if state.peer_closed && state.local_closed {
            self.release(slot);
        }
    }

    fn release(&self, slot: &StreamSlot) {
        if self.streams().remove(&slot.id).is_some() {
            self.lifecycle.stream_released();
        }
    }

    /// Aborts a stream (a RESET either way): both halves fail at once, what it buffered is
    /// dropped, and it leaves the table. False if it had ended already.
    pub(crate) fn abort_stream(&self, slot: &StreamSlot) -> bool {
        {
            let mut state = slot.lock();
            if state.aborted || (state.peer_closed && state.local_closed) {
                return false;
            }
            state.aborted = true;
            state.peer_closed = true;
            state.local_closed = true;
            state.inbox.clear();
        }
        self.release(slot);
        slot.abort.cancel();
        slot.readable.notify_one();
        slot.writable.notify_one();
        true
    }

    /// Whether both sides confirmed the `reset` extension: streams abort with RESET.
    pub(crate) fn reset_agreed(&self) -> bool {
        self.lifecycle.agreed.get().reset
    }

    /// Whether both sides confirmed the `drain` extension.
    pub(crate) fn drain_agreed(&self) -> bool {
        self.lifecycle.agreed.get().drain
    }

    /// Whether both sides confirmed the `liveness` extension: the edge probes the hub too,
    /// and the hub confirms every open.
    pub(crate) fn liveness_agreed(&self) -> bool {
        self.lifecycle.agreed.get().liveness
    }

    /// How long the peer may be silent before the tunnel is dead: the deadline, except on an
    /// edge whose hub cannot be probed (an original hub PINGs only every 15 s).
    pub(crate) fn silence_limit(&self) -> Duration {
        let deadline = self.options.idle_timeout;
        match self.role {
            Role::Edge if !self.liveness_agreed() => deadline.max(ORIGINAL_HUB_SILENCE),
            _ => deadline,
        }
    }

    /// A WINDOW_UPDATE(_BACK) returning `increment` bytes of credit on stream `id`.
    pub(crate) fn window_update(&self, id: u32, increment: u32) -> Outgoing {
        Outgoing::Frame(Frame::window_update(id, window_out(self.role), increment))
    }

    /// Queues a control frame that the peer caused; a full queue means the peer floods us.
    pub(crate) fn send_control_now(&self, outgoing: Outgoing) -> Result<(), CloseReason> {
        self.lanes
            .control
            .try_send(outgoing)
            .map_err(|_| ProtocolViolation::ControlFlood.into())
    }

    /// Last tunnel round trip in µs (0: not known yet).
    pub(crate) fn rtt_micros(&self) -> u64 {
        self.rtt_us.load(Ordering::Relaxed)
    }
}
