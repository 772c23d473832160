//! The hub: accepts edge tunnels, authenticates edges, pushes their configuration, and forwards
//! every tunnelled connection to its target with a PROXY v1 header in front.
//!
//! [`Hub::start`] returns a [`HubHandle`]: the Rust API over allowed edges, status and events
//! that the CLI and the gRPC control plane drive.

mod admission;
mod edges;
mod edges_file;
mod fleet;
mod handshake;
mod metrics;
mod push;
mod quota;
mod registry;
mod secret;
mod server;
mod store;
mod target;
mod udp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use remoteingress_tunnel::{HubIdentity, SessionOptions};
use remoteingress_wire::EdgeConfig;
use thiserror::Error;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use edges::{validate_all, AllowedEdge};
pub use edges_file::{load_edges_file, EdgesFileContent};
pub use handshake::AuthFailure;
pub use registry::GenerationConflict;
use registry::{AllowedSet, Registry};
pub use remoteingress_tunnel::Transport;
pub use remoteingress_wire::config::PortTargets;
pub use remoteingress_wire::config::Protocol;

/// Why a hub operation failed.
#[derive(Debug, Error)]
pub enum HubError {
    /// The tunnel listener could not be bound.
    #[error("cannot listen on {addr} ({protocol}): {source}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// `tcp` (TLS transport) or `udp` (QUIC transport).
        protocol: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] remoteingress_tunnel::tls::TlsError),
    /// An edge entry is invalid; nothing was changed.
    #[error("edge {edge:?}: {message}")]
    InvalidEdge {
        /// Edge id.
        edge: String,
        /// Field and problem.
        message: String,
    },
    /// The state file could not be read or written.
    #[error("state file {path}: {message}")]
    State {
        /// File.
        path: PathBuf,
        /// Problem.
        message: String,
    },
    /// A connection token could not be made.
    #[error(transparent)]
    TokenSecret(#[from] TokenSecretError),
    /// Metrics could not be registered (a name registered twice in one registry).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A write whose generation does not order it after the configuration in force (or, in
    /// replica mode, that names none).
    #[error(transparent)]
    Generation(#[from] GenerationConflict),
    /// The edges file could not be read or parsed.
    #[error("edges file {path}: {message}")]
    EdgesFile {
        /// File.
        path: PathBuf,
        /// Problem.
        message: String,
    },
}

/// Why the hub cannot put an edge's secret into a connection token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TokenSecretError {
    /// No such edge.
    #[error("no such edge")]
    UnknownEdge,
    /// The secret given is not the edge's.
    #[error("the secret given is not this edge's secret")]
    Mismatch,
    /// Only the secret's hash survived a restart.
    #[error("the hub keeps only a hash of this edge's secret; pass the secret to embed it")]
    OnlyHashKnown,
}

/// How the hub listens and forwards.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Address of the tunnel listener.
    pub listen_addr: SocketAddr,
    /// Host that tunnelled connections are forwarded to.
    pub target_host: String,
    /// Time allowed for TLS plus the handshake line (a quarter of it while more than half the
    /// unauthenticated slots are taken).
    pub handshake_timeout: Duration,
    /// Time allowed to connect to a target.
    pub connect_timeout: Duration,
    /// Unauthenticated tunnel connections allowed at once; a new one past it evicts the oldest.
    pub max_unauthenticated: usize,
    /// Unauthenticated tunnel connections allowed at once from one address.
    pub max_unauthenticated_per_source: usize,
    /// Failed authentications one address may have per minute (and in a burst) before its
    /// connections are refused unread.
    pub failed_auths_per_minute: u32,
    /// Limits and timers of each edge session.
    pub session: SessionOptions,
    /// Also accept QUIC tunnels on the same port number (UDP).
    pub quic: bool,
    /// Where the allowed-edge set is persisted; `None` keeps it in memory only.
    pub state_file: Option<PathBuf>,
    /// A UDP session without traffic either way for this long ends.
    pub udp_idle_timeout: Duration,
    /// Most UDP sessions per edge, across its tunnels; sessions past it are refused (and
    /// counted).
    pub udp_max_sessions: usize,
    /// Most UDP sessions of all edges together (also at most half the file descriptor limit);
    /// sessions past it are refused (and counted).
    pub udp_max_sessions_total: usize,
    /// Where the hub registers its metrics.
    pub registry: prometheus::Registry,
    /// This hub instance's id, sent to edges so that they tell hubs behind one address apart.
    pub hub_id: String,
    /// One of several hubs serving the same edges: every write must carry a generation that
    /// orders it (see [`GenerationConflict`]).
    pub replica: bool,
    /// Refuse streams and UDP sessions whose client address is private, shared, link-local or
    /// unique-local (unspecified and multicast ones are always refused, loopback ones unless
    /// the tunnel comes from loopback too).
    pub refuse_private_clients: bool,
    /// Tunnels one edge may keep to this hub at once; a newer one past it replaces the oldest.
    pub max_tunnels_per_edge: usize,
    /// Connections to targets of all edges together; streams past it are refused (and counted).
    pub max_target_connections: usize,
    /// Edges this hub serves at once (0: no limit); a new edge past it is refused as busy and
    /// told when to come back (it dials its next hub address then).
    pub max_edges: usize,
    /// Where the hub records the edges it holds when it begins to drain, and reads them back
    /// at start (see `fleet_wait`); `None`: no record, readiness never waits for edges.
    pub fleet_record: Option<PathBuf>,
    /// After a restart, readiness waits at most this long for the recorded edges to come back.
    pub fleet_wait: Duration,
}

impl HubOptions {
    /// The limits of each edge, across all its tunnels.
    fn edge_limits(&self) -> quota::EdgeLimits {
        quota::EdgeLimits {
            tunnels: self.max_tunnels_per_edge,
            streams: self.session.max_streams,
            udp_sessions: self.udp_max_sessions,
            budget: self.session.budget,
        }
    }
}

/// The tunnel's TCP listener on `addr` and, with `quic`, a UDP socket on the same port, and the
/// address bound. With port 0, a port free for both is searched: the UDP port of the one the
/// kernel picked for TCP may be taken.
fn bind_tunnel(
    addr: SocketAddr,
    quic: bool,
) -> Result<
    (
        tokio::net::TcpListener,
        Option<std::net::UdpSocket>,
        SocketAddr,
    ),
    HubError,
> {
    let failed = |addr, protocol| {
        move |source| HubError::Bind {
            addr,
            protocol,
            source,
        }
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        let listener = remoteingress_tunnel::listen_tcp(addr).map_err(failed(addr, "tcp"))?;
        let local_addr = listener.local_addr().map_err(failed(addr, "tcp"))?;
        if !quic {
            return Ok((listener, None, local_addr));
        }
        let udp = std::net::UdpSocket::bind(local_addr)
            .and_then(|socket| socket.set_nonblocking(true).map(|()| socket));
        match udp {
            Ok(socket) => return Ok((listener, Some(socket), local_addr)),
            Err(e) if addr.port() == 0 && attempts < 32 => {
                tracing::debug!(%local_addr, error = %e, "UDP port taken; trying another port");
            }
            Err(e) => return Err(failed(local_addr, "udp")(e)),
        }
    }
}

/// A fresh hub instance id: `hub-` and 12 random hex digits.
pub fn random_hub_id() -> String {
    format!("hub-{:012x}", rand::random::<u64>() >> 16)
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            hub_id: random_hub_id(),
            replica: false,
            refuse_private_clients: false,
            max_tunnels_per_edge: 8,
            max_target_connections: 65_536,
            max_edges: 0,
            fleet_record: None,
            fleet_wait: Duration::from_secs(60),
            listen_addr: SocketAddr::from(([0, 0, 0, 0], 8443)),
            target_host: "127.0.0.1".to_owned(),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_unauthenticated: 256,
            max_unauthenticated_per_source: 16,
            failed_auths_per_minute: 30,
            session: SessionOptions::default(),
            quic: true,
            state_file: None,
            udp_idle_timeout: Duration::from_secs(60),
            udp_max_sessions: 4_096,
            udp_max_sessions_total: 16_384,
            registry: prometheus::Registry::new(),
        }
    }
}

/// Why the hub refused a stream or UDP session an edge asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// The port is not assigned to the edge.
    NotAssigned,
    /// The client address is one no client has (unspecified, multicast, or loopback from an
    /// edge on another host), or a private one while the hub refuses those.
    ClientAddress,
    /// The edge has as many streams (or UDP sessions) across its tunnels as it may.
    EdgeLimit,
    /// The hub has as many connections to targets (or UDP sessions) as it may.
    HubLimit,
}

impl RefusalReason {
    /// The name used in metrics and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAssigned => "not_assigned",
            Self::ClientAddress => "client_address",
            Self::EdgeLimit => "edge_limit",
            Self::HubLimit => "hub_limit",
        }
    }

    /// What the reason means, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NotAssigned => "not assigned to the edge",
            Self::ClientAddress => "client address not believable",
            Self::EdgeLimit => "the edge's limit is reached",
            Self::HubLimit => "the hub's limit is reached",
        }
    }
}

/// Something that happened on the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
    /// An edge authenticated and its tunnel is up.
    EdgeConnected {
        /// Edge id.
        edge_id: String,
        /// Address it connected from.
        remote_addr: SocketAddr,
        /// The transport of its tunnel.
        transport: Transport,
    },
    /// An edge's tunnel ended.
    EdgeDisconnected {
        /// Edge id.
        edge_id: String,
        /// Why.
        reason: String,
    },
    /// A tunnel connection failed to authenticate.
    AuthFailed {
        /// Address it came from.
        remote_addr: SocketAddr,
        /// The failure's label ([`AuthFailure::label`]).
        kind: &'static str,
        /// What was wrong (never the secret).
        reason: String,
    },
    /// A tunnelled connection started.
    StreamOpened {
        /// Edge id.
        edge_id: String,
        /// Stream id.
        stream_id: u32,
        /// The client, as the edge saw it.
        client_addr: SocketAddr,
        /// The edge port the client connected to.
        edge_port: u16,
        /// Where it is forwarded, `host:port`.
        target: String,
    },
    /// A tunnelled connection ended.
    StreamClosed {
        /// Edge id.
        edge_id: String,
        /// Stream id.
        stream_id: u32,
    },
    /// A UDP session started.
    UdpSessionOpened {
        /// Edge id.
        edge_id: String,
        /// Session id.
        session_id: u32,
        /// The client, as the edge saw it.
        client_addr: SocketAddr,
        /// The edge port the client wrote to.
        edge_port: u16,
        /// Where it is forwarded, `host:port`.
        target: String,
    },
    /// A UDP session ended.
    UdpSessionClosed {
        /// Edge id.
        edge_id: String,
        /// Session id.
        session_id: u32,
    },
    /// An edge asked for a stream or UDP session it should not have: refused, nothing was
    /// connected.
    OpenRefused {
        /// Edge id.
        edge_id: String,
        /// TCP stream or UDP session.
        protocol: Protocol,
        /// The port it named.
        port: u16,
        /// What was wrong with it.
        reason: RefusalReason,
    },
    /// A configuration was sent to a connected edge.
    ConfigPushed {
        /// Edge id.
        edge_id: String,
        /// Its version.
        version: u64,
    },
    /// The edges file changed: its new content was applied, or rejected (the previous edges
    /// stay).
    ConfigReloaded {
        /// The file.
        path: String,
        /// SHA-256 of its content, in hex (empty if it could not be read).
        digest: String,
        /// The file's generation, if it has one.
        generation: Option<u64>,
        /// Edges it lists.
        edges: usize,
        /// Why it was rejected.
        error: Option<String>,
    },
    /// An edge acknowledged a configuration, or reported why it could not apply it.
    ConfigApplied {
        /// Edge id.
        edge_id: String,
        /// The version acknowledged.
        version: u64,
        /// The edge's error, if it kept its previous configuration.
        error: Option<String>,
    },
}

/// A configured edge as the hub sees it (no secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeInfo {
    /// Edge id.
    pub id: String,
    /// Configuration sent to it.
    pub config: EdgeConfig,
    /// Where its connections go, where not to the same port of the target host.
    pub targets: PortTargets,
    /// Whether its tunnel is up.
    pub connected: bool,
    /// Version of the configuration the hub wants it to run.
    pub desired_version: u64,
    /// Generation of that configuration.
    pub generation: u64,
    /// Version it last acknowledged.
    pub applied_version: Option<u64>,
    /// Error of its last rejected configuration.
    pub last_error: Option<String>,
}

/// A connected edge's tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectedEdge {
    /// Edge id.
    pub id: String,
    /// When the tunnel came up.
    pub connected_since: SystemTime,
    /// Address it connected from.
    pub remote_addr: SocketAddr,
    /// The transport of its tunnel.
    pub transport: Transport,
    /// Streams open now.
    pub active_streams: usize,
    /// Payload bytes received from the edge.
    pub bytes_in: u64,
    /// Payload bytes sent to the edge.
    pub bytes_out: u64,
    /// Largest number of unconsumed bytes one stream held on the hub.
    pub peak_stream_buffer: u64,
    /// UDP sessions open now.
    pub active_udp_sessions: u64,
    /// UDP datagrams or sessions dropped at a limit or a full queue.
    pub udp_dropped: u64,
    /// Last PING round trip.
    pub rtt: Option<Duration>,
    /// Public address the edge learned by STUN and reported.
    pub public_ip: Option<std::net::IpAddr>,
}

/// The hub's state at a glance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubStatus {
    /// True until shutdown.
    pub running: bool,
    /// Port of the tunnel listener.
    pub tunnel_port: u16,
    /// This hub instance's id.
    pub hub_id: String,
    /// True once the hub has begun draining: it accepts no new tunnels and has asked its edges
    /// to open new streams elsewhere.
    pub draining: bool,
    /// Edges whose tunnel is up.
    pub connected_edges: Vec<ConnectedEdge>,
}

pub(crate) struct HubInner {
    options: HubOptions,
    local_addr: SocketAddr,
    pin: String,
    registry: Mutex<Registry>,
    /// Serialises changes to the allowed set with their write to the state file (never held
    /// while waiting for an edge).
    changes: tokio::sync::Mutex<()>,
    events: broadcast::Sender<HubEvent>,
    metrics: metrics::HubMetrics,
    /// Slots for unauthenticated tunnel connections, over both transports.
    admissions: Arc<admission::Admissions>,
    /// Handshakes that resumed a session (counted by the identity's ticketer).
    resumed: Arc<std::sync::atomic::AtomicU64>,
    /// The edges readiness waits for after a restart.
    fleet: fleet::FleetWait,
    /// The hub-wide UDP session cap: one permit per session.
    udp_slots: Arc<tokio::sync::Semaphore>,
    /// The hub-wide cap on connections to targets: one permit per stream.
    target_slots: Arc<tokio::sync::Semaphore>,
    shutdown: CancellationToken,
    /// Cancelled to stop accepting tunnels (a child of `shutdown`).
    accepting: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl HubInner {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: HubEvent) {
        let _ = self.events.send(event);
    }

    /// Keeps a task that must end before shutdown completes.
    fn track(&self, task: JoinHandle<()>) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }
}

/// Entry point: [`Hub::start`].
#[derive(Debug)]
pub struct Hub;

impl Hub {
    /// Binds the tunnel listener and starts accepting edges.
    pub async fn start(options: HubOptions, identity: &HubIdentity) -> Result<HubHandle, HubError> {
        let tls = identity.server_config()?;
        let stored = match &options.state_file {
            Some(path) => store::load(path)?,
            None => Vec::new(),
        };
        let allowed =
            AllowedSet::restore(stored, options.replica).map_err(|message| HubError::State {
                path: options.state_file.clone().unwrap_or_default(),
                message,
            })?;
        let registry = Registry::new(allowed);
        let expected = options.fleet_record.as_deref().and_then(fleet::take);
        let fleet = fleet::FleetWait::new(expected, options.fleet_wait, std::time::Instant::now());
        let (listener, quic_socket, local_addr) = bind_tunnel(options.listen_addr, options.quic)?;
        let (events, _) = broadcast::channel(4096);
        let hub_metrics = metrics::HubMetrics::register(&options.registry)?;
        let shutdown = CancellationToken::new();
        let inner = Arc::new(HubInner {
            accepting: shutdown.child_token(),
            admissions: admission::Admissions::new(admission::AdmissionLimits {
                max: options.max_unauthenticated,
                max_per_source: options.max_unauthenticated_per_source,
                deadline: options.handshake_timeout,
                failures_per_minute: options.failed_auths_per_minute,
            }),
            udp_slots: Arc::new(tokio::sync::Semaphore::new(udp::session_budget(
                options.udp_max_sessions_total,
            ))),
            target_slots: Arc::new(tokio::sync::Semaphore::new(
                options
                    .max_target_connections
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            metrics: hub_metrics,
            resumed: identity.resumed_handshakes(),
            fleet,
            options,
            local_addr,
            pin: identity.pin(),
            registry: Mutex::new(registry),
            changes: tokio::sync::Mutex::new(()),
            events,
            shutdown,
            tasks: Mutex::new(Vec::new()),
        });
        inner
            .options
            .registry
            .register(Box::new(metrics::LiveCollector::new(Arc::downgrade(
                &inner,
            ))))?;
        inner.options.registry.register(Box::new(
            remoteingress_tunnel::warn::SuppressedWarnings::new()?,
        ))?;
        inner.track(tokio::spawn(server::accept_loop(
            inner.clone(),
            listener,
            tls,
        )));
        if let Some(socket) = quic_socket {
            let endpoint = remoteingress_tunnel::quic::server_endpoint(
                identity,
                socket,
                &inner.options.session,
            )?;
            inner.track(tokio::spawn(server::quic_accept_loop(
                inner.clone(),
                endpoint,
            )));
        }
        tracing::info!(addr = %local_addr, pin = %inner.pin, "hub listening for edges");
        if let Some(expected) = inner.fleet.expected() {
            tracing::info!(
                expected,
                wait_secs = inner.options.fleet_wait.as_secs(),
                "ready once the edges held at the last drain are back"
            );
        }
        Ok(HubHandle { inner })
    }
}

/// Sends DRAIN on every session whose edge knows it, all at once so that an edge slow to read
/// holds up no other; how many were asked.
async fn ask_to_drain(sessions: Vec<remoteingress_tunnel::SessionHandle>) -> usize {
    let mut asking: tokio::task::JoinSet<bool> = sessions
        .into_iter()
        .map(|session| async move { session.drain().await })
        .collect();
    let mut asked = 0;
    while let Some(done) = asking.join_next().await {
        asked += usize::from(done.unwrap_or(false));
    }
    asked
}

/// Control over a running hub; cheap to clone.
#[derive(Clone)]
pub struct HubHandle {
    inner: Arc<HubInner>,
}

impl std::fmt::Debug for HubHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubHandle")
            .field("local_addr", &self.inner.local_addr)
            .finish()
    }
}

impl HubHandle {
    /// Address of the tunnel listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// SHA-256 pin of the hub certificate.
    pub fn pin(&self) -> &str {
        &self.inner.pin
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.inner.events.subscribe()
    }

    /// Replaces the whole allowed-edge set (validated first; on error nothing changes).
    /// Connected edges get their new configuration; removed edges and edges whose secret
    /// changed are disconnected.
    pub async fn update_allowed_edges(&self, edges: Vec<AllowedEdge>) -> Result<(), HubError> {
        validate_all(&edges)?;
        self.change(|allowed| Ok(allowed.replace_all(edges)?)).await
    }

    /// Adds or replaces one edge.
    pub async fn upsert_edge(&self, edge: AllowedEdge) -> Result<(), HubError> {
        edge.validate()?;
        self.change(|allowed| Ok(allowed.upsert(edge)?)).await
    }

    /// Removes an edge (disconnecting it); false if it was not configured.
    pub async fn delete_edge(&self, id: &str) -> Result<bool, HubError> {
        self.change(|allowed| Ok(allowed.delete(id))).await
    }

    /// Applies a change to a draft of the allowed set (or refuses it whole), persists the draft,
    /// and only then makes it live. Edges are owed their new configurations, which their
    /// tunnels' pushers send: no write waits for an edge. A failed write to the state file
    /// changes nothing.
    async fn change<R>(
        &self,
        apply: impl FnOnce(&mut AllowedSet) -> Result<R, HubError>,
    ) -> Result<R, HubError> {
        let _serial = self.inner.changes.lock().await;
        let mut draft = self.inner.registry().draft();
        let result = apply(&mut draft)?;
        if let Some(path) = &self.inner.options.state_file {
            let (path, snapshot) = (path.clone(), draft.snapshot());
            let saving = tokio::task::spawn_blocking(move || store::save(&path, snapshot));
            saving.await.map_err(|e| HubError::State {
                path: self.inner.options.state_file.clone().unwrap_or_default(),
                message: format!("writing the state file did not finish: {e}"),
            })??;
        }
        self.inner.registry().install(draft);
        Ok(result)
    }

    /// The secret to embed in `edge_id`'s connection token: `given` if it is the edge's, or
    /// the one this process was last told.
    pub fn connection_token_secret(
        &self,
        edge_id: &str,
        given: Option<&str>,
    ) -> Result<String, HubError> {
        Ok(self.inner.registry().token_secret(edge_id, given)?)
    }

    /// Drops an edge's tunnel (it may reconnect); false if it was not connected.
    pub fn disconnect_edge(&self, id: &str) -> bool {
        self.inner
            .registry()
            .disconnect(id, "disconnected by the operator")
    }

    /// The configured edges.
    pub fn list_edges(&self) -> Vec<EdgeInfo> {
        self.inner.registry().list()
    }

    /// Running state and connected edges.
    pub fn status(&self) -> HubStatus {
        HubStatus {
            running: !self.inner.shutdown.is_cancelled(),
            tunnel_port: self.inner.local_addr.port(),
            hub_id: self.inner.options.hub_id.clone(),
            draining: self.inner.accepting.is_cancelled() && !self.inner.shutdown.is_cancelled(),
            connected_edges: self.inner.registry().connected(),
        }
    }

    /// True while the hub accepts tunnels and, after a restart, once the edges it held when it
    /// drained are back (or `fleet_wait` is over): what a rolling restart waits for.
    pub fn is_ready(&self) -> bool {
        let connected = self.inner.registry().connected_edge_count();
        !self.inner.accepting.is_cancelled()
            && self
                .inner
                .fleet
                .is_back(connected, std::time::Instant::now())
    }

    /// Stops accepting new tunnels (releasing the listener); open tunnels carry on.
    pub fn stop_accepting(&self) {
        self.inner.accepting.cancel();
    }

    /// Begins a drain (SIGTERM, or the Drain admin call): accepts no new tunnels (so readiness
    /// turns false) and asks every edge to open new streams on its other tunnels. Open streams
    /// carry on; edges close a drained tunnel once its streams have finished.
    /// Returns how many tunnels were asked.
    pub async fn drain(&self) -> usize {
        self.stop_accepting();
        if let Some(path) = &self.inner.options.fleet_record {
            let held = self.inner.registry().connected_edge_count();
            fleet::record(path, held);
        }
        let sessions = self.inner.registry().sessions();
        tracing::info!(
            tunnels = sessions.len(),
            "draining: edges asked to move new streams elsewhere"
        );
        ask_to_drain(sessions).await
    }

    /// Asks one edge to open new streams on its other tunnels; false if it has no tunnel here
    /// that knows DRAIN.
    pub async fn drain_edge(&self, id: &str) -> bool {
        let sessions = self.inner.registry().sessions_of(id);
        ask_to_drain(sessions).await > 0
    }

    /// What a drain waits for: tunnels of edges that close them once drained, and the streams
    /// on tunnels of edges that do not know DRAIN.
    pub fn drain_pending(&self) -> usize {
        self.inner
            .registry()
            .sessions()
            .iter()
            .map(|session| {
                if session.agreed().drain {
                    1
                } else {
                    session.active_streams()
                }
            })
            .sum()
    }

    /// Tunnelled TCP connections open now, over all edges.
    pub fn active_streams(&self) -> usize {
        self.status()
            .connected_edges
            .iter()
            .map(|edge| edge.active_streams)
            .sum()
    }

    /// Stops accepting, closes every tunnel and releases the listener.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.registry().disconnect_all("hub shutting down");
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
    }
}
