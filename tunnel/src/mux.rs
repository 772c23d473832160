//! The multiplexed session over one TLS connection: a reader task that decodes and dispatches
//! frames, a writer task that drains the three QoS lanes into large writes, and (on the hub) a
//! pinger. Tunnelled connections are [`MuxReader`]/[`MuxWriter`] pairs with per-stream credit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use remoteingress_wire::flow::{
    window_for, RecvWindow, SendCredit, DEFAULT_BUDGET, SUSTAINED_WINDOW,
};
use remoteingress_wire::frame::{Frame, FrameDecoder, FrameType, CONTROL_STREAM, MAX_DATA_CHUNK};
use remoteingress_wire::qos::{Lane, LaneLimits, Scheduler, StreamRate};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::session::SessionHandle;
use crate::stream::{StreamReader, StreamWriter};

/// Which end of the tunnel this session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opens streams, sends DATA, answers PINGs.
    Edge,
    /// Accepts streams, sends DATA_BACK and PINGs.
    Hub,
}

impl Role {
    fn data_out(self) -> FrameType {
        match self {
            Role::Edge => FrameType::Data,
            Role::Hub => FrameType::DataBack,
        }
    }

    fn close_out(self) -> FrameType {
        match self {
            Role::Edge => FrameType::Close,
            Role::Hub => FrameType::CloseBack,
        }
    }

    fn window_out(self) -> FrameType {
        match self {
            Role::Edge => FrameType::WindowUpdate,
            Role::Hub => FrameType::WindowUpdateBack,
        }
    }

    fn udp_data_out(self) -> FrameType {
        match self {
            Role::Edge => FrameType::UdpData,
            Role::Hub => FrameType::UdpDataBack,
        }
    }

    fn peer(self) -> Role {
        match self {
            Role::Edge => Role::Hub,
            Role::Hub => Role::Edge,
        }
    }
}

/// Limits and timers of a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Bytes of unconsumed data all streams may hold together.
    pub budget: u64,
    /// Most concurrent streams; an OPEN past it is refused at once.
    pub max_streams: usize,
    /// A peer silent for this long is gone.
    pub idle_timeout: Duration,
    /// Interval between PINGs (sent by the hub only).
    pub ping_interval: Duration,
    /// Bounds of the writer's lanes.
    pub lanes: LaneLimits,
    /// Test hook: this many incoming QUIC UDP opens are ignored, as if lost on the way.
    pub drop_first_udp_opens: u32,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            budget: DEFAULT_BUDGET,
            max_streams: 10_000,
            idle_timeout: Duration::from_secs(45),
            ping_interval: Duration::from_secs(15),
            lanes: LaneLimits::default(),
            drop_first_udp_opens: 0,
        }
    }
}

/// Something the session reports to its owner.
#[derive(Debug)]
pub enum SessionEvent {
    /// Hub: the edge opened a stream; `header` is its PROXY v1 line.
    Opened {
        /// Incoming half.
        reader: StreamReader,
        /// Outgoing half.
        writer: StreamWriter,
        /// OPEN payload.
        header: Bytes,
    },
    /// Edge: the hub sent a new configuration (JSON).
    Config(Bytes),
    /// Hub: the edge acknowledged a configuration (JSON).
    ConfigAck(Bytes),
    /// Hub: a PING was answered after this long.
    RoundTrip(Duration),
    /// Hub: the edge opened a UDP session; `header` is its PROXY v2 header.
    UdpOpen {
        /// Session id.
        id: u32,
        /// UDP_OPEN payload.
        header: Bytes,
    },
    /// A datagram of a UDP session (UDP_DATA on the hub, UDP_DATA_BACK on the edge).
    UdpDatagram {
        /// Session id.
        id: u32,
        /// The datagram.
        payload: Bytes,
    },
    /// The peer ended a UDP session.
    UdpClose {
        /// Session id.
        id: u32,
    },
}

/// Why a session operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    /// The session has ended.
    #[error("tunnel closed")]
    Closed,
    /// Too many streams are open.
    #[error("stream limit of {0} reached")]
    TooManyStreams(usize),
}

/// Traffic counters of a session.
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Payload bytes received (DATA or DATA_BACK).
    pub bytes_in: AtomicU64,
    /// Payload bytes sent.
    pub bytes_out: AtomicU64,
    /// Largest number of unconsumed bytes any one stream held at once.
    pub peak_stream_buffer: AtomicU64,
    /// Streams opened in this session.
    pub streams_opened: AtomicU64,
    /// UDP datagrams dropped because a queue was full or a limit was reached.
    pub udp_dropped: AtomicU64,
    /// UDP sessions open now (kept up to date by the session's owner, which manages them).
    pub udp_sessions: AtomicU64,
    /// Times a stream had data to send but no credit, and waited for the peer.
    pub flow_stalls: AtomicU64,
}

enum Outgoing {
    Frame(Frame),
    /// Fires once every frame queued before it on the same lane has been written.
    Flushed(oneshot::Sender<()>),
}

#[derive(Debug)]
struct StreamState {
    inbox: std::collections::VecDeque<Bytes>,
    recv: RecvWindow,
    send: SendCredit,
    inbound_rate: StreamRate,
    peer_closed: bool,
    local_closed: bool,
    discard: bool,
    aborted: bool,
}

#[derive(Debug)]
struct StreamSlot {
    id: u32,
    state: Mutex<StreamState>,
    readable: Notify,
    writable: Notify,
}

impl StreamSlot {
    fn new(id: u32) -> Arc<Self> {
        Arc::new(Self {
            id,
            state: Mutex::new(StreamState {
                inbox: Default::default(),
                recv: RecvWindow::default(),
                send: SendCredit::default(),
                inbound_rate: StreamRate::new(Instant::now()),
                peer_closed: false,
                local_closed: false,
                discard: false,
                aborted: false,
            }),
            readable: Notify::new(),
            writable: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct Shared {
    role: Role,
    options: SessionOptions,
    streams: Mutex<HashMap<u32, Arc<StreamSlot>>>,
    active: AtomicUsize,
    /// Next stream id to open; held while the OPEN is queued so ids reach the peer in order.
    next_id: tokio::sync::Mutex<u32>,
    /// Highest stream id opened so far (for telling stale frames from bogus ones).
    last_opened: AtomicU32,
    /// Next UDP session id to open (edge); held while UDP_OPEN is queued, as for streams.
    next_udp_id: tokio::sync::Mutex<u32>,
    /// Highest UDP session id opened so far (edge).
    last_udp_opened: AtomicU32,
    control_tx: mpsc::Sender<Outgoing>,
    data_tx: mpsc::Sender<Outgoing>,
    sustained_tx: mpsc::Sender<Outgoing>,
    closed: CancellationToken,
    close_reason: Mutex<Option<String>>,
    stats: SessionStats,
    ping_sent: Mutex<Option<([u8; 8], Instant)>>,
    /// Last round trip in µs: measured (hub) or as the hub reported it in its PING (edge).
    rtt_us: AtomicU64,
}

impl Shared {
    fn streams(&self) -> MutexGuard<'_, HashMap<u32, Arc<StreamSlot>>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Ends the session (first reason wins) and wakes every stream.
    fn shutdown(&self, reason: String) {
        {
            let mut current = self.close_reason.lock().unwrap_or_else(|p| p.into_inner());
            if current.is_none() {
                *current = Some(reason);
            }
        }
        self.closed.cancel();
        // Slots are locked after the map lock is released: elsewhere a slot lock is held while
        // the map lock is taken (release_if_done), so holding both here could deadlock.
        let slots: Vec<Arc<StreamSlot>> = self.streams().values().cloned().collect();
        for slot in slots {
            slot.lock().aborted = true;
            slot.readable.notify_one();
            slot.writable.notify_one();
        }
    }

    fn window(&self, state: &StreamState) -> u32 {
        let window = window_for(self.options.budget, self.active.load(Ordering::Relaxed));
        if state.inbound_rate.is_sustained() {
            window.min(SUSTAINED_WINDOW)
        } else {
            window
        }
    }

    fn register(&self, slot: Arc<StreamSlot>) {
        self.streams().insert(slot.id, slot);
        self.active.fetch_add(1, Ordering::Relaxed);
        self.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets a stream once both directions are closed.
    fn release_if_done(&self, slot: &StreamSlot, state: &StreamState) {
        if state.peer_closed && state.local_closed && self.streams().remove(&slot.id).is_some() {
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn window_update(&self, id: u32, increment: u32) -> Outgoing {
        Outgoing::Frame(Frame::window_update(id, self.role.window_out(), increment))
    }

    /// Queues a control frame that the peer caused; a full queue means the peer floods us.
    fn send_control_now(&self, outgoing: Outgoing) -> Result<(), String> {
        self.control_tx
            .try_send(outgoing)
            .map_err(|_| "peer caused more than the control queue holds".to_owned())
    }
}

/// The TLS transport's session: frames multiplexed over one connection.
#[derive(Clone)]
pub(crate) struct MuxSession {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MuxSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxSession")
            .field("role", &self.shared.role)
            .field("active_streams", &self.active_streams())
            .finish()
    }
}

/// Starts a session over an established, authenticated connection. `initial` holds bytes
/// already read past the handshake. Events arrive on the returned receiver until it ends.
pub fn spawn_session<IO>(
    io: IO,
    initial: Bytes,
    role: Role,
    options: SessionOptions,
) -> (SessionHandle, mpsc::Receiver<SessionEvent>)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (control_tx, control_rx) = mpsc::channel(options.lanes.control_frames);
    let (data_tx, data_rx) = mpsc::channel(256);
    let (sustained_tx, sustained_rx) = mpsc::channel(64);
    let (events_tx, events_rx) = mpsc::channel(1024);
    let shared = Arc::new(Shared {
        role,
        streams: Mutex::new(HashMap::new()),
        active: AtomicUsize::new(0),
        next_id: tokio::sync::Mutex::new(1),
        last_opened: AtomicU32::new(0),
        next_udp_id: tokio::sync::Mutex::new(1),
        last_udp_opened: AtomicU32::new(0),
        control_tx,
        data_tx,
        sustained_tx,
        closed: CancellationToken::new(),
        close_reason: Mutex::new(None),
        stats: SessionStats::default(),
        ping_sent: Mutex::new(None),
        rtt_us: AtomicU64::new(0),
        options,
    });
    let (read_half, write_half) = tokio::io::split(io);
    let lanes = Lanes {
        control: control_rx,
        data: data_rx,
        sustained: sustained_rx,
    };
    tokio::spawn(write_task(write_half, lanes, shared.clone()));
    let reader = Reader {
        shared: shared.clone(),
        events: events_tx,
        last_peer_id: 0,
        last_udp_id: 0,
        empty_data_run: 0,
    };
    tokio::spawn(run_task(
        shared.clone(),
        "reader",
        reader.run(read_half, initial),
    ));
    if role == Role::Hub {
        tokio::spawn(run_task(
            shared.clone(),
            "pinger",
            ping_loop(shared.clone()),
        ));
    }
    (SessionHandle::mux(MuxSession { shared }), events_rx)
}

async fn run_task(
    shared: Arc<Shared>,
    name: &'static str,
    task: impl std::future::Future<Output = Result<(), String>>,
) {
    let reason = tokio::select! {
        result = task => match result {
            Ok(()) => format!("{name} finished"),
            Err(reason) => reason,
        },
        () = shared.closed.cancelled() => return,
    };
    shared.shutdown(reason);
}

impl MuxSession {
    /// Opens a stream (edge): sends OPEN with `header` and raises the stream's window.
    pub async fn open(&self, header: Bytes) -> Result<(StreamReader, StreamWriter), SessionError> {
        let shared = &self.shared;
        if shared.closed.is_cancelled() {
            return Err(SessionError::Closed);
        }
        if shared.active.load(Ordering::Relaxed) >= shared.options.max_streams {
            return Err(SessionError::TooManyStreams(shared.options.max_streams));
        }
        let send = |frame| shared.control_tx.send(Outgoing::Frame(frame));
        let mut next_id = shared.next_id.lock().await;
        let id = *next_id;
        *next_id = id.checked_add(1).ok_or(SessionError::Closed)?;
        let slot = StreamSlot::new(id);
        shared.register(slot.clone());
        shared.last_opened.store(id, Ordering::Relaxed);
        let raise = {
            let mut state = slot.lock();
            let window = shared.window(&state);
            state.recv.top_up(window)
        };
        send(Frame::new(id, FrameType::Open, header))
            .await
            .map_err(|_| SessionError::Closed)?;
        drop(next_id);
        if let Some(increment) = raise {
            send(Frame::window_update(
                id,
                shared.role.window_out(),
                increment,
            ))
            .await
            .map_err(|_| SessionError::Closed)?;
        }
        let (reader, writer) = stream_halves(shared, slot);
        Ok((StreamReader::mux(reader), StreamWriter::mux(writer)))
    }

    /// Sends a tunnel-level frame (CONFIG, CONFIG_ACK) on the control lane.
    pub async fn send_control(&self, kind: FrameType, payload: Bytes) -> Result<(), SessionError> {
        self.shared
            .control_tx
            .send(Outgoing::Frame(Frame::new(CONTROL_STREAM, kind, payload)))
            .await
            .map_err(|_| SessionError::Closed)
    }

    /// Opens a UDP session (edge): queues UDP_OPEN with its PROXY v2 header; returns its id.
    pub async fn open_udp(&self, header: Bytes) -> Result<u32, SessionError> {
        let mut next_id = self.shared.next_udp_id.lock().await;
        let id = *next_id;
        *next_id = id.checked_add(1).ok_or(SessionError::Closed)?;
        self.shared.last_udp_opened.store(id, Ordering::Relaxed);
        self.shared
            .control_tx
            .send(Outgoing::Frame(Frame::new(id, FrameType::UdpOpen, header)))
            .await
            .map_err(|_| SessionError::Closed)?;
        Ok(id)
    }

    /// Queues one datagram of a UDP session, or drops it (counted) when the data lane is
    /// full: UDP is never queued without bound and never waits.
    pub fn send_udp(&self, id: u32, payload: Bytes) -> bool {
        let kind = self.shared.role.udp_data_out();
        let queued = self
            .shared
            .data_tx
            .try_send(Outgoing::Frame(Frame::new(id, kind, payload)))
            .is_ok();
        if !queued {
            self.shared
                .stats
                .udp_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        queued
    }

    /// Tells the peer that a UDP session ended.
    pub fn close_udp(&self, id: u32) {
        send_soon(
            &self.shared.control_tx,
            Outgoing::Frame(Frame::empty(id, FrameType::UdpClose)),
        );
    }

    /// Ends the session with `reason`.
    pub fn close(&self, reason: impl Into<String>) {
        self.shared.shutdown(reason.into());
    }

    /// Resolves once the session has ended.
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await;
    }

    /// A token cancelled when the session ends, for work that must stop with it.
    pub fn cancellation(&self) -> CancellationToken {
        self.shared.closed.child_token()
    }

    /// True once the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<String> {
        self.shared
            .close_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Streams currently open.
    pub fn active_streams(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Traffic counters.
    pub fn stats(&self) -> &SessionStats {
        &self.shared.stats
    }

    /// Last tunnel round trip, once known.
    pub fn rtt(&self) -> Option<Duration> {
        match self.shared.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }
}

fn stream_halves(shared: &Arc<Shared>, slot: Arc<StreamSlot>) -> (MuxReader, MuxWriter) {
    let reader = MuxReader {
        slot: slot.clone(),
        shared: shared.clone(),
    };
    let writer = MuxWriter {
        slot,
        shared: shared.clone(),
        lane: Lane::Data,
        rate: StreamRate::new(Instant::now()),
        finished: false,
    };
    (reader, writer)
}

/// The incoming half of a multiplexed stream.
#[derive(Debug)]
pub(crate) struct MuxReader {
    slot: Arc<StreamSlot>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("role", &self.role).finish()
    }
}

impl MuxReader {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.slot.id
    }

    /// The next chunk of the peer's bytes; `None` once the peer has closed (or the tunnel died).
    pub async fn recv(&self) -> Option<Bytes> {
        loop {
            {
                let mut state = self.slot.lock();
                if let Some(chunk) = state.inbox.pop_front() {
                    return Some(chunk);
                }
                if state.peer_closed || state.aborted {
                    return None;
                }
            }
            self.slot.readable.notified().await;
        }
    }

    /// Reports `len` bytes written onward, returning credit to the peer when due.
    pub async fn consumed(&self, len: usize) {
        let increment = {
            let mut state = self.slot.lock();
            let window = self.shared.window(&state);
            state.recv.on_consumed(len as u32, window)
        };
        if let Some(increment) = increment {
            let _ = self
                .shared
                .control_tx
                .send(self.shared.window_update(self.slot.id, increment))
                .await;
        }
    }
}

impl Drop for MuxReader {
    /// Nobody reads any more: consume what is buffered and whatever still arrives, so the peer
    /// is never left waiting for credit.
    fn drop(&mut self) {
        let increment = {
            let mut state = self.slot.lock();
            state.discard = true;
            let pending: usize = state.inbox.drain(..).map(|chunk| chunk.len()).sum();
            let window = self.shared.window(&state);
            state.recv.on_consumed(pending as u32, window)
        };
        if let Some(increment) = increment {
            send_soon(
                &self.shared.control_tx,
                self.shared.window_update(self.slot.id, increment),
            );
        }
    }
}

/// Queues `outgoing` without waiting, or from a spawned task when the lane is momentarily full.
fn send_soon(lane: &mpsc::Sender<Outgoing>, outgoing: Outgoing) {
    if let Err(mpsc::error::TrySendError::Full(outgoing)) = lane.try_send(outgoing) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let lane = lane.clone();
            runtime.spawn(async move {
                let _ = lane.send(outgoing).await;
            });
        }
    }
}

/// The outgoing half of a multiplexed stream.
#[derive(Debug)]
pub(crate) struct MuxWriter {
    slot: Arc<StreamSlot>,
    shared: Arc<Shared>,
    lane: Lane,
    rate: StreamRate,
    finished: bool,
}

impl MuxWriter {
    /// Waits until the peer has granted credit and returns how many bytes may be sent now
    /// (at most one DATA chunk).
    pub async fn reserve(&self) -> Result<usize, SessionError> {
        loop {
            {
                let state = self.slot.lock();
                if state.aborted {
                    return Err(SessionError::Closed);
                }
                let available = state.send.available() as usize;
                if available > 0 {
                    return Ok(available.min(MAX_DATA_CHUNK));
                }
            }
            self.shared
                .stats
                .flow_stalls
                .fetch_add(1, Ordering::Relaxed);
            self.slot.writable.notified().await;
        }
    }

    /// Sends bytes for which credit was reserved (at most [`MuxWriter::reserve`]'s answer).
    pub async fn send(&mut self, data: Bytes) -> Result<(), SessionError> {
        let len = data.len();
        if len == 0 {
            return Ok(());
        }
        let taken = self.slot.lock().send.take(len);
        debug_assert_eq!(taken, len, "send without reserved credit");
        if self.rate.record(Instant::now(), len) && self.lane == Lane::Data {
            self.move_to_sustained_lane().await?;
        }
        let frame = Frame::new(self.slot.id, self.shared.role.data_out(), data);
        self.lane_tx()
            .send(Outgoing::Frame(frame))
            .await
            .map_err(|_| SessionError::Closed)?;
        self.shared
            .stats
            .bytes_out
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Keeps the stream's byte order when it changes lanes: waits until its data-lane frames
    /// are written.
    async fn move_to_sustained_lane(&mut self) -> Result<(), SessionError> {
        let (flushed_tx, flushed_rx) = oneshot::channel();
        self.lane_tx()
            .send(Outgoing::Flushed(flushed_tx))
            .await
            .map_err(|_| SessionError::Closed)?;
        flushed_rx.await.map_err(|_| SessionError::Closed)?;
        self.lane = Lane::Sustained;
        Ok(())
    }

    fn lane_tx(&self) -> &mpsc::Sender<Outgoing> {
        match self.lane {
            Lane::Sustained => &self.shared.sustained_tx,
            _ => &self.shared.data_tx,
        }
    }

    /// Sends our CLOSE (half-close: we will send nothing more). Idempotent.
    pub async fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let _ = self.lane_tx().send(self.close_frame()).await;
    }

    fn close_frame(&self) -> Outgoing {
        let mut state = self.slot.lock();
        state.local_closed = true;
        self.shared.release_if_done(&self.slot, &state);
        Outgoing::Frame(Frame::empty(self.slot.id, self.shared.role.close_out()))
    }
}

impl Drop for MuxWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.finished = true;
            let close = self.close_frame();
            send_soon(self.lane_tx(), close);
        }
    }
}

struct Lanes {
    control: mpsc::Receiver<Outgoing>,
    data: mpsc::Receiver<Outgoing>,
    sustained: mpsc::Receiver<Outgoing>,
}

/// Bytes gathered before one write to the TLS stream.
const WRITE_BATCH: usize = 256 * 1024;
/// Time allowed for a clean TLS close when the session ends.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Runs the writer until the session ends, then closes the connection cleanly (TLS
/// close_notify) so the peer sees an orderly end rather than a broken connection.
async fn write_task<W: AsyncWrite>(io: W, lanes: Lanes, shared: Arc<Shared>) {
    tokio::pin!(io);
    let result = tokio::select! {
        result = write_loop(&mut io, lanes, &shared) => result,
        () = shared.closed.cancelled() => Ok(()),
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, io.shutdown()).await;
    shared.shutdown(result.err().unwrap_or_else(|| "writer finished".to_owned()));
}

async fn write_loop<W: AsyncWrite>(
    io: &mut std::pin::Pin<&mut W>,
    mut lanes: Lanes,
    shared: &Shared,
) -> Result<(), String> {
    let mut scheduler: Scheduler<Outgoing> = Scheduler::new(shared.options.lanes);
    let mut buf = BytesMut::with_capacity(WRITE_BATCH);
    let mut flushed = Vec::new();
    let queue = |scheduler: &mut Scheduler<Outgoing>, lane: Lane, item: Outgoing| {
        let len = match &item {
            Outgoing::Frame(frame) => frame.payload.len(),
            Outgoing::Flushed(_) => 0,
        };
        scheduler
            .push(lane, item, len)
            .map_err(|_| "more than the control queue holds is waiting".to_owned())
    };
    loop {
        if scheduler.is_empty() {
            let (lane, item) = tokio::select! {
                biased;
                Some(item) = lanes.control.recv() => (Lane::Control, item),
                Some(item) = lanes.data.recv() => (Lane::Data, item),
                Some(item) = lanes.sustained.recv() => (Lane::Sustained, item),
                else => return Ok(()),
            };
            queue(&mut scheduler, lane, item)?;
        }
        // Data lanes first, control last: a stream's OPEN is always queued before its DATA.
        for (lane, rx) in [
            (Lane::Data, &mut lanes.data),
            (Lane::Sustained, &mut lanes.sustained),
        ] {
            while !scheduler.is_full(lane) {
                match rx.try_recv() {
                    Ok(item) => queue(&mut scheduler, lane, item)?,
                    Err(_) => break,
                }
            }
        }
        while let Ok(item) = lanes.control.try_recv() {
            queue(&mut scheduler, Lane::Control, item)?;
        }
        let now = Instant::now();
        while buf.len() < WRITE_BATCH {
            match scheduler.pop(now) {
                Some((_, Outgoing::Frame(frame))) => frame.encode(&mut buf),
                Some((_, Outgoing::Flushed(done))) => flushed.push(done),
                None => break,
            }
        }
        if !buf.is_empty() {
            io.write_all(&buf)
                .await
                .map_err(|e| format!("tunnel write failed: {e}"))?;
            io.flush()
                .await
                .map_err(|e| format!("tunnel write failed: {e}"))?;
            buf.clear();
        }
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}

async fn ping_loop(shared: Arc<Shared>) -> Result<(), String> {
    let mut interval = tokio::time::interval(shared.options.ping_interval);
    interval.tick().await;
    loop {
        interval.tick().await;
        // The payload is opaque to the protocol; ours carries the last round trip for the edge.
        let token = shared.rtt_us.load(Ordering::Relaxed).to_be_bytes();
        let due = {
            let mut sent = shared.ping_sent.lock().unwrap_or_else(|p| p.into_inner());
            let due = sent.is_none();
            if due {
                *sent = Some((token, Instant::now()));
            }
            due
        };
        if due {
            shared
                .control_tx
                .send(Outgoing::Frame(Frame::ping(FrameType::Ping, token)))
                .await
                .map_err(|_| "writer gone".to_owned())?;
        }
    }
}

/// Largest read from the tunnel in one call.
const READ_CHUNK: usize = 64 * 1024;
/// Consecutive empty DATA frames tolerated.
const MAX_EMPTY_DATA_RUN: u32 = 100;
/// DATA payloads smaller than this are copied out of the read buffer so that a few stalled
/// bytes never pin a whole 64 KiB read buffer.
const COPY_BELOW: usize = 8 * 1024;

struct Reader {
    shared: Arc<Shared>,
    events: mpsc::Sender<SessionEvent>,
    last_peer_id: u32,
    last_udp_id: u32,
    empty_data_run: u32,
}

impl Reader {
    async fn run<R: AsyncRead>(mut self, io: R, initial: Bytes) -> Result<(), String> {
        tokio::pin!(io);
        let mut decoder = FrameDecoder::new();
        decoder.feed(&initial);
        let idle = self.shared.options.idle_timeout;
        // An initialised buffer reused for every read: handing TLS uninitialised capacity would
        // make it zero the whole capacity on each read, however little it returns.
        let mut scratch = vec![0u8; READ_CHUNK];
        loop {
            while let Some(frame) = decoder
                .next_frame()
                .map_err(|e| format!("protocol error: {e}"))?
            {
                self.dispatch(frame).await?;
            }
            let read = tokio::time::timeout(idle, io.read(&mut scratch)).await;
            match read {
                Err(_) => return Err(format!("peer silent for {} s", idle.as_secs())),
                Ok(Err(e)) => return Err(format!("tunnel read failed: {e}")),
                Ok(Ok(0)) => return Err("peer closed the tunnel".to_owned()),
                Ok(Ok(n)) => decoder.feed(&scratch[..n]),
            }
        }
    }

    fn slot(&self, id: u32) -> Option<Arc<StreamSlot>> {
        self.shared.streams().get(&id).cloned()
    }

    fn known_slot(&self, frame: &Frame) -> Result<Arc<StreamSlot>, String> {
        self.slot(frame.stream_id).ok_or_else(|| {
            format!(
                "protocol error: {:?} for unknown stream {}",
                frame.kind, frame.stream_id
            )
        })
    }

    async fn dispatch(&mut self, frame: Frame) -> Result<(), String> {
        let role = self.shared.role;
        let peer = role.peer();
        match frame.kind {
            kind if kind == peer.data_out() => self.on_data(frame),
            kind if kind == peer.close_out() => {
                let slot = self.known_slot(&frame)?;
                let mut state = slot.lock();
                if state.peer_closed {
                    return Err(format!("protocol error: stream {} closed twice", slot.id));
                }
                state.peer_closed = true;
                self.shared.release_if_done(&slot, &state);
                drop(state);
                slot.readable.notify_one();
                Ok(())
            }
            kind if kind == peer.window_out() => {
                let increment = frame.u32_payload().unwrap_or(0);
                let Some(slot) = self.slot(frame.stream_id) else {
                    // Credit for a stream that has just been fully closed is harmless.
                    return if self.is_past_stream(frame.stream_id) {
                        Ok(())
                    } else {
                        Err(format!(
                            "protocol error: window update for unknown stream {}",
                            frame.stream_id
                        ))
                    };
                };
                slot.lock()
                    .send
                    .grant(increment)
                    .map_err(|e| format!("protocol error on stream {}: {e}", slot.id))?;
                slot.writable.notify_one();
                Ok(())
            }
            FrameType::Open if role == Role::Hub => self.on_open(frame),
            FrameType::Ping if role == Role::Edge => {
                let token = frame.ping_token().unwrap_or_default();
                let reported = u64::from_be_bytes(token);
                if reported > 0 {
                    self.shared.rtt_us.store(reported, Ordering::Relaxed);
                }
                self.shared
                    .send_control_now(Outgoing::Frame(Frame::ping(FrameType::Pong, token)))
            }
            FrameType::Pong if role == Role::Hub => {
                let mut sent = self
                    .shared
                    .ping_sent
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                match sent.take() {
                    Some((token, at)) if Some(token) == frame.ping_token() => {
                        let rtt = at.elapsed();
                        let micros = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
                        self.shared.rtt_us.store(micros, Ordering::Relaxed);
                        let _ = self.events.try_send(SessionEvent::RoundTrip(rtt));
                        Ok(())
                    }
                    _ => Err("protocol error: PONG without a matching PING".to_owned()),
                }
            }
            FrameType::Config if role == Role::Edge => self
                .events
                .send(SessionEvent::Config(frame.payload))
                .await
                .map_err(|_| "session owner gone".to_owned()),
            FrameType::ConfigAck if role == Role::Hub => {
                let _ = self.events.try_send(SessionEvent::ConfigAck(frame.payload));
                Ok(())
            }
            FrameType::UdpOpen if role == Role::Hub => {
                if frame.stream_id <= self.last_udp_id {
                    return Err(format!(
                        "protocol error: UDP session id {} reused or decreasing",
                        frame.stream_id
                    ));
                }
                self.last_udp_id = frame.stream_id;
                self.udp_event(SessionEvent::UdpOpen {
                    id: frame.stream_id,
                    header: frame.payload,
                })
            }
            FrameType::UdpData | FrameType::UdpDataBack if frame.kind != role.udp_data_out() => {
                if !self.is_known_udp(frame.stream_id) {
                    return Err(format!(
                        "protocol error: datagram for unknown UDP session {}",
                        frame.stream_id
                    ));
                }
                self.udp_event(SessionEvent::UdpDatagram {
                    id: frame.stream_id,
                    payload: frame.payload,
                })
            }
            FrameType::UdpClose => self.udp_event(SessionEvent::UdpClose {
                id: frame.stream_id,
            }),
            kind => Err(format!(
                "protocol error: unexpected {kind:?} frame from the {peer:?}"
            )),
        }
    }

    /// UDP events never wait for the owner: when it lags, datagrams are dropped and counted.
    fn udp_event(&self, event: SessionEvent) -> Result<(), String> {
        if self.events.try_send(event).is_err() {
            self.shared
                .stats
                .udp_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn is_known_udp(&self, id: u32) -> bool {
        match self.shared.role {
            Role::Hub => id != 0 && id <= self.last_udp_id,
            Role::Edge => id != 0 && id <= self.shared.last_udp_opened.load(Ordering::Relaxed),
        }
    }

    fn is_past_stream(&self, id: u32) -> bool {
        match self.shared.role {
            Role::Hub => id != 0 && id <= self.last_peer_id,
            Role::Edge => id != 0 && id <= self.shared.last_opened.load(Ordering::Relaxed),
        }
    }

    fn on_data(&mut self, frame: Frame) -> Result<(), String> {
        let len = frame.payload.len();
        if len == 0 {
            self.empty_data_run += 1;
            if self.empty_data_run > MAX_EMPTY_DATA_RUN {
                return Err("protocol error: too many empty DATA frames".to_owned());
            }
            return Ok(());
        }
        self.empty_data_run = 0;
        let slot = self.known_slot(&frame)?;
        let stats = &self.shared.stats;
        stats.bytes_in.fetch_add(len as u64, Ordering::Relaxed);
        let mut state = slot.lock();
        if state.peer_closed {
            return Err(format!(
                "protocol error: data after close on stream {}",
                slot.id
            ));
        }
        state
            .recv
            .on_data(len as u32)
            .map_err(|e| format!("protocol error on stream {}: {e}", slot.id))?;
        state.inbound_rate.record(Instant::now(), len);
        if state.discard {
            let window = self.shared.window(&state);
            let increment = state.recv.on_consumed(len as u32, window);
            drop(state);
            if let Some(increment) = increment {
                self.shared
                    .send_control_now(self.shared.window_update(slot.id, increment))?;
            }
            return Ok(());
        }
        let payload = if len < COPY_BELOW {
            Bytes::copy_from_slice(&frame.payload)
        } else {
            frame.payload
        };
        state.inbox.push_back(payload);
        stats
            .peak_stream_buffer
            .fetch_max(u64::from(state.recv.unconsumed()), Ordering::Relaxed);
        drop(state);
        slot.readable.notify_one();
        Ok(())
    }

    fn on_open(&mut self, frame: Frame) -> Result<(), String> {
        let id = frame.stream_id;
        if id <= self.last_peer_id {
            return Err(format!(
                "protocol error: stream id {id} reused or decreasing"
            ));
        }
        self.last_peer_id = id;
        let shared = &self.shared;
        let slot = StreamSlot::new(id);
        let over_limit = shared.active.load(Ordering::Relaxed) >= shared.options.max_streams;
        if shared.streams().len() >= shared.options.max_streams * 2 {
            return Err("protocol error: peer ignores refused streams".to_owned());
        }
        shared.register(slot.clone());
        let raise = {
            let mut state = slot.lock();
            let window = shared.window(&state);
            state.recv.top_up(window)
        };
        if let Some(increment) = raise {
            shared.send_control_now(shared.window_update(id, increment))?;
        }
        let (reader, writer) = stream_halves(shared, slot);
        if over_limit {
            tracing::warn!(stream = id, "stream limit reached; refusing stream");
            return Ok(());
        }
        let event = SessionEvent::Opened {
            reader: StreamReader::mux(reader),
            writer: StreamWriter::mux(writer),
            header: frame.payload,
        };
        if let Err(mpsc::error::TrySendError::Full(event)) = self.events.try_send(event) {
            tracing::warn!(
                stream = id,
                "too many streams waiting to be handled; refusing stream"
            );
            drop(event);
        }
        Ok(())
    }
}
