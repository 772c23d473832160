//! The edge: keeps tunnels to one or several hub instances up (reconnecting with backoff),
//! listens on the ports the hubs assign, and carries every client connection through the least
//! loaded tunnel with a PROXY v1 header that names the real client.

mod apply;
mod backoff;
mod connect;
mod fallback;
pub mod firewall;
mod metrics;
mod offers;
mod placement;
mod ports;
mod slots;
pub mod stun;
mod tunnels;
mod udp;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remoteingress_tunnel::tls::{client_config, TlsError};
use remoteingress_tunnel::{HubTrust, SessionHandle, SessionOptions};
use remoteingress_wire::handshake::{EdgeHello, HandshakeError};
use thiserror::Error;
use tokio::sync::{broadcast, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

pub use apply::ApplyError;
use apply::{acknowledge, Serving};
pub use backoff::BackoffPolicy;
pub use connect::{ConnectError, HubAddress, HubAddressError};
pub use firewall::{Firewall, FirewallError, FirewallMode, FirewallState};
pub use offers::Disagreement;
pub use ports::BindError;
pub use remoteingress_tunnel::Transport;
use tunnels::Tunnels;
pub use tunnels::{TunnelState, TunnelStatus};
use udp::{UdpCounters, UdpLimits, UdpSessions};

/// Why the edge cannot start.
#[derive(Debug, Error)]
pub enum EdgeError {
    /// Edge id or secret unusable.
    #[error("invalid credentials: {0}")]
    Credentials(#[from] HandshakeError),
    /// TLS trust material unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Metrics could not be registered (a name registered twice in one registry).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// `--firewall required` but nftables does not work here.
    #[error("the firewall is required but nftables cannot be used: {0}")]
    FirewallUnavailable(FirewallError),
    /// The hub host is not a valid TLS server name.
    #[error("hub host {0:?} is not a valid host name or address")]
    HubHost(String),
    /// No hub address was given.
    #[error("no hub address given")]
    NoHub,
}

/// How the edge reaches its hubs and serves clients.
#[derive(Debug, Clone)]
pub struct EdgeOptions {
    /// The hubs' addresses: one per hub instance, or one load-balanced address for all.
    pub hubs: Vec<HubAddress>,
    /// Tunnels kept up, each to a distinct hub instance (told apart by the id in the hub's
    /// reply).
    pub hub_connections: usize,
    /// How long a drained tunnel's open streams may take to finish before it is closed.
    pub drain_grace: Duration,
    /// Edge id.
    pub edge_id: String,
    /// Edge secret.
    pub secret: String,
    /// How the hub's certificate is verified.
    pub trust: HubTrust,
    /// Address the public listeners bind to.
    pub bind_address: IpAddr,
    /// Reconnect delays.
    pub backoff: BackoffPolicy,
    /// Time allowed for TCP connect, TLS and the handshake.
    pub connect_timeout: Duration,
    /// Client connections allowed at once.
    pub max_connections: usize,
    /// Limits and timers of the tunnel session.
    pub session: SessionOptions,
    /// Which transport to use.
    pub transport: TransportMode,
    /// With `QuicWithFallback`: how long QUIC may take before TLS is tried.
    pub quic_fallback_after: Duration,
    /// With `QuicWithFallback`: after falling back to TLS for a hub, how long its reconnects
    /// use TLS alone; as often, a QUIC handshake is tried in the background, and once it
    /// succeeds a QUIC tunnel replaces the TLS one.
    pub quic_retry_after: Duration,
    /// A new client connection's open that its hub has not confirmed within this long (or four
    /// round trips, if longer) moves to another tunnel with the client's first bytes, and its
    /// tunnel is suspect. Only with hubs that confirm opens (extension `liveness`).
    pub open_confirm_timeout: Duration,
    /// A UDP session without traffic either way for this long ends.
    pub udp_idle_timeout: Duration,
    /// Most UDP sessions; datagrams of new clients past it are dropped (and counted).
    pub udp_max_sessions: usize,
    /// Where the edge registers its metrics.
    pub registry: prometheus::Registry,
    /// Whether firewall configs are applied with nftables.
    pub firewall: FirewallMode,
    /// The command that runs nft (program and leading arguments).
    pub nft_command: Vec<String>,
    /// STUN servers (`host:port`) asked in order; empty disables public-IP discovery.
    pub stun_servers: Vec<String>,
    /// STUN retransmission schedule.
    pub stun_timing: stun::StunTiming,
}

impl EdgeOptions {
    /// Options with defaults for everything but the hub and credentials.
    pub fn new(
        hub_host: &str,
        hub_port: u16,
        edge_id: &str,
        secret: &str,
        trust: HubTrust,
    ) -> Self {
        Self {
            hubs: vec![HubAddress::new(hub_host, hub_port)],
            hub_connections: 1,
            drain_grace: Duration::from_secs(30),
            edge_id: edge_id.to_owned(),
            secret: secret.to_owned(),
            trust,
            bind_address: IpAddr::from([0, 0, 0, 0]),
            backoff: BackoffPolicy::default(),
            connect_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            session: SessionOptions::default(),
            transport: TransportMode::TcpTls,
            quic_fallback_after: Duration::from_secs(5),
            quic_retry_after: Duration::from_secs(300),
            open_confirm_timeout: Duration::from_secs(1),
            udp_idle_timeout: Duration::from_secs(60),
            udp_max_sessions: 4_096,
            registry: prometheus::Registry::new(),
            firewall: FirewallMode::Auto,
            nft_command: vec!["nft".to_owned()],
            stun_servers: vec![stun::DEFAULT_SERVER.to_owned()],
            stun_timing: stun::StunTiming::default(),
        }
    }
}

/// Which transport an edge uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportMode {
    /// One TLS connection with frame multiplexing (the default).
    #[default]
    TcpTls,
    /// QUIC: native streams, datagrams for UDP.
    Quic,
    /// QUIC, or TLS when QUIC has not connected within `quic_fallback_after`.
    QuicWithFallback,
}

/// Something that happened on the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeEvent {
    /// A tunnel is up.
    TunnelConnected {
        /// The transport of the tunnel.
        transport: Transport,
        /// The hub instance's id (none from an original hub).
        hub_id: Option<String>,
        /// The address dialled.
        address: String,
    },
    /// A tunnel went down (the edge reconnects).
    TunnelDisconnected {
        /// Why.
        reason: String,
        /// The hub instance's id (none from an original hub).
        hub_id: Option<String>,
        /// The address dialled.
        address: String,
    },
    /// A hub asked the edge to move new streams off its tunnel (it is shutting down).
    TunnelDraining {
        /// The hub instance's id.
        hub_id: Option<String>,
        /// The address dialled.
        address: String,
    },
    /// A client's TCP stream or UDP session went into a tunnel.
    ClientOpened {
        /// TCP stream or UDP session.
        protocol: remoteingress_wire::config::Protocol,
        /// The client.
        client_addr: std::net::SocketAddr,
        /// The edge port it reached.
        edge_port: u16,
        /// The hub of the tunnel it went to (instance id, or address of an original hub).
        hub: String,
    },
    /// Hubs offer different configurations under the same generation; the running one stays.
    ConfigDisagreement {
        /// The generation they share.
        generation: u64,
        /// The hubs that disagree.
        hubs: Vec<String>,
    },
    /// Listening on these ports after connecting.
    PortsAssigned {
        /// TCP ports.
        listen_ports: Vec<u16>,
        /// UDP ports.
        listen_ports_udp: Vec<u16>,
    },
    /// Listening on these ports after a configuration change.
    PortsUpdated {
        /// TCP ports.
        listen_ports: Vec<u16>,
        /// UDP ports.
        listen_ports_udp: Vec<u16>,
    },
    /// A firewall configuration was applied (or failed, keeping the previous rules).
    FirewallApplied {
        /// Rules in force.
        rules: usize,
        /// Why it failed, if it did.
        error: Option<String>,
    },
    /// STUN found the edge's public address (or it changed).
    PublicIpDiscovered {
        /// The address.
        ip: std::net::IpAddr,
    },
    /// A configuration could not be applied; the previous one stays.
    ConfigRejected {
        /// Its version, if it had one.
        version: Option<u64>,
        /// Why.
        error: String,
    },
}

/// The edge's state at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EdgeStatus {
    /// True until shutdown.
    pub running: bool,
    /// Whether at least one tunnel is up.
    pub connected: bool,
    /// The oldest tunnel's transport while connected.
    pub transport: Option<Transport>,
    /// Streams open now, over all tunnels.
    pub active_streams: usize,
    /// Every tunnel, oldest first.
    pub tunnels: Vec<TunnelStatus>,
    /// Generation of the configuration in force.
    pub generation: Option<u64>,
    /// Hubs that offer different configurations under one generation, if any do.
    pub config_disagreement: Option<Disagreement>,
    /// TCP ports listened on.
    pub listen_ports: Vec<u16>,
    /// UDP ports listened on.
    pub listen_ports_udp: Vec<u16>,
    /// UDP sessions open now.
    pub active_udp_sessions: u64,
    /// UDP datagrams dropped at a limit or a full queue: before a tunnel was chosen, and on
    /// the tunnels up now.
    pub udp_dropped: u64,
    /// Last connection or configuration error.
    pub last_error: Option<String>,
    /// Tunnels established since start.
    pub connections: u64,
    /// What the firewall is doing.
    pub firewall: Option<FirewallState>,
    /// Public address learned by STUN.
    pub public_ip: Option<std::net::IpAddr>,
}

struct EdgeInner {
    options: EdgeOptions,
    hello: EdgeHello,
    /// The TLS and QUIC client configurations, kept for every connection: the session tickets
    /// they hold let reconnects resume.
    tls: TlsConnector,
    quic: quinn::ClientConfig,
    events: broadcast::Sender<EdgeEvent>,
    status: Mutex<EdgeStatus>,
    tunnels: Arc<Tunnels>,
    /// Listeners and configuration while a tunnel is up; one change at a time.
    serving: tokio::sync::Mutex<Option<Serving>>,
    udp: Arc<UdpSessions>,
    /// The STUN refresh interval of the configuration in force.
    stun_interval: tokio::sync::watch::Sender<u64>,
    /// Traffic of ended tunnels.
    ended: Mutex<metrics::Totals>,
    metrics: metrics::EdgeMetrics,
    connections: Arc<Semaphore>,
    shutdown: CancellationToken,
    /// Cancelled to stop accepting clients while open connections finish.
    accepting: CancellationToken,
    /// nftables, when it works here and is wanted.
    firewall: Option<Firewall>,
    /// Hubs QUIC recently failed to reach.
    quic_fallbacks: fallback::QuicFallbacks,
}

impl EdgeInner {
    fn update(&self, change: impl FnOnce(&mut EdgeStatus)) {
        change(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn emit(&self, event: EdgeEvent) {
        let _ = self.events.send(event);
    }
}

/// Entry point: [`Edge::start`].
#[derive(Debug)]
pub struct Edge;

impl Edge {
    /// Checks the options and starts connecting (in the background, with retries).
    pub async fn start(options: EdgeOptions) -> Result<EdgeHandle, EdgeError> {
        let hello = EdgeHello::new(&options.edge_id, &options.secret)?;
        let (firewall, firewall_state) = match options.firewall {
            FirewallMode::Off => (None, FirewallState::Off),
            mode => {
                let firewall = Firewall::new(options.nft_command.clone());
                match firewall.probe().await {
                    Ok(()) => (Some(firewall), FirewallState::Applied(0)),
                    Err(why) if mode == FirewallMode::Required => {
                        return Err(EdgeError::FirewallUnavailable(why))
                    }
                    Err(why) => {
                        tracing::warn!(%why, "nftables cannot be used here: firewall configs will not be applied; tunnelling continues");
                        (None, FirewallState::Unavailable(why.to_string()))
                    }
                }
            }
        };
        let tls = TlsConnector::from(client_config(&options.trust)?);
        let quic = remoteingress_tunnel::quic::client_config(&options.trust, &options.session)?;
        if options.hubs.is_empty() {
            return Err(EdgeError::NoHub);
        }
        if let Some(hub) = options.hubs.iter().find(|hub| hub.server_name().is_none()) {
            return Err(EdgeError::HubHost(hub.host.clone()));
        }
        let (events, _) = broadcast::channel(1024);
        let edge_metrics = metrics::EdgeMetrics::register(&options.registry)?;
        let udp = Arc::new(UdpSessions::new(
            UdpLimits {
                idle_timeout: options.udp_idle_timeout,
                max_sessions: options.udp_max_sessions,
            },
            UdpCounters {
                opened: edge_metrics.client_connections.clone(),
                dropped: edge_metrics.udp_dropped.clone(),
            },
        ));
        let tunnels = Arc::new(Tunnels::new(
            events.clone(),
            options.open_confirm_timeout,
            edge_metrics.opens_retried.clone(),
        ));
        let inner = Arc::new(EdgeInner {
            ended: Mutex::default(),
            metrics: edge_metrics,
            connections: Arc::new(Semaphore::new(options.max_connections)),
            tunnels,
            serving: tokio::sync::Mutex::new(None),
            udp,
            quic_fallbacks: fallback::QuicFallbacks::new(options.quic_retry_after),
            stun_interval: tokio::sync::watch::Sender::new(
                remoteingress_wire::config::DEFAULT_STUN_INTERVAL_SECS,
            ),
            options,
            hello,
            tls,
            quic,
            events,
            status: Mutex::new(EdgeStatus {
                running: true,
                firewall: Some(firewall_state),
                ..EdgeStatus::default()
            }),
            firewall,
            shutdown: CancellationToken::new(),
            accepting: CancellationToken::new(),
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
        if !inner.options.stun_servers.is_empty() {
            let stun = inner.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = stun_loop(&stun) => {}
                    () = stun.shutdown.cancelled() => {}
                }
            });
        }
        let sweeper = inner.clone();
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(sweeper.udp.sweep_interval());
            loop {
                tokio::select! {
                    _ = sweep.tick() => sweeper.udp.expire(),
                    () = sweeper.shutdown.cancelled() => return,
                }
            }
        });
        let task = tokio::spawn(slots::supervise(inner.clone()));
        Ok(EdgeHandle {
            inner,
            task: Arc::new(Mutex::new(Some(task))),
        })
    }
}

/// Control over a running edge; cheap to clone.
#[derive(Clone)]
pub struct EdgeHandle {
    inner: Arc<EdgeInner>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for EdgeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeHandle")
            .field("edge_id", &self.inner.options.edge_id)
            .finish()
    }
}

impl EdgeHandle {
    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<EdgeEvent> {
        self.inner.events.subscribe()
    }

    /// Current state.
    pub fn status(&self) -> EdgeStatus {
        let mut status = self
            .inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        status.tunnels = self.inner.tunnels.statuses();
        status.connected = !status.tunnels.is_empty();
        status.transport = status.tunnels.first().map(|tunnel| tunnel.transport);
        status.active_streams = status.tunnels.iter().map(|t| t.active_streams).sum();
        status.active_udp_sessions = status.tunnels.iter().map(|t| t.active_udp_sessions).sum();
        status.udp_dropped = status.tunnels.iter().map(|t| t.udp_dropped).sum::<u64>()
            + self.inner.udp.dropped_untunnelled();
        status
    }

    /// True while at least one tunnel is up.
    pub fn is_ready(&self) -> bool {
        self.status().connected
    }

    /// Stops accepting client connections; open ones carry on.
    pub fn stop_accepting(&self) {
        self.inner.accepting.cancel();
    }

    /// Closes the tunnel and all listeners, and stops reconnecting.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
            // Draining tunnels end with the shutdown too; the listeners close with the last.
            for session in self.inner.tunnels.sessions() {
                session.close("edge shutting down");
            }
            *self.inner.serving.lock().await = None;
            if let Some(firewall) = &self.inner.firewall {
                if let Err(error) = firewall.remove().await {
                    tracing::warn!(%error, "could not remove the firewall table");
                }
            }
        }
        self.inner.update(|s| s.running = false);
    }
}

/// Learns the public IP at start and every `stunIntervalSecs` (0: only at start), trying the
/// servers in order; reports changes in status, events, metrics and to the hubs.
async fn stun_loop(inner: &EdgeInner) {
    let mut interval = inner.stun_interval.subscribe();
    loop {
        let mut learned = None;
        for server in &inner.options.stun_servers {
            match stun::discover(server, inner.options.stun_timing).await {
                Ok(address) => {
                    learned = Some(address.ip());
                    break;
                }
                Err(error) => tracing::warn!(%server, %error, "STUN failed"),
            }
        }
        match learned {
            Some(ip) => public_ip_learned(inner, ip).await,
            None => tracing::warn!("no STUN server answered; will retry"),
        }
        let secs = *interval.borrow_and_update();
        // After a failure, retry sooner than a long refresh interval.
        let wait = match (secs, learned) {
            (0, Some(_)) => None,
            (0, None) => Some(Duration::from_secs(30)),
            (secs, Some(_)) => Some(Duration::from_secs(secs)),
            (secs, None) => Some(Duration::from_secs(secs.min(30))),
        };
        match wait {
            Some(wait) => tokio::select! {
                () = tokio::time::sleep(wait) => {}
                changed = interval.changed() => if changed.is_err() { return },
            },
            None => {
                if interval.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn public_ip_learned(inner: &EdgeInner, ip: std::net::IpAddr) {
    let previous = inner
        .status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .public_ip;
    if previous == Some(ip) {
        return;
    }
    tracing::info!(%ip, "public IP discovered");
    if let Some(previous) = previous {
        let _ = inner
            .metrics
            .public_ip
            .remove_label_values(&[&previous.to_string()]);
    }
    inner
        .metrics
        .public_ip
        .with_label_values(&[&ip.to_string()])
        .set(1);
    inner.update(|s| s.public_ip = Some(ip));
    inner.emit(EdgeEvent::PublicIpDiscovered { ip });
    for session in inner.tunnels.sessions() {
        report_public_ip(&session, ip).await;
    }
}

/// Tells a hub the edge's public IP.
async fn report_public_ip(session: &SessionHandle, ip: std::net::IpAddr) {
    acknowledge(session, serde_json::json!({ "publicIp": ip.to_string() })).await;
}
