//! The public UDP listeners of an edge and their sessions: one session per (listen port, client
//! address), opened with a PROXY v2 header on the least loaded tunnel, answered from the same
//! socket, ended when idle or when its tunnel drains.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use remoteingress_tunnel::{BatchReceiver, SessionHandle};
use remoteingress_wire::config::Protocol;
use remoteingress_wire::proxy::{ProxyV2, V2Transport};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::ports::BindError;
use crate::tunnels::{TunnelKey, Tunnels};

struct Session {
    port: u16,
    client: SocketAddr,
    socket: Arc<UdpSocket>,
    last_active: Instant,
    tunnel: SessionHandle,
}

/// A UDP session: the tunnel it runs over and its id there.
type SessionKey = (TunnelKey, u32);

#[derive(Default)]
struct Table {
    by_client: HashMap<(u16, SocketAddr), SessionKey>,
    sessions: HashMap<SessionKey, Session>,
}

impl Table {
    fn remove(&mut self, key: SessionKey) -> Option<Session> {
        let session = self.sessions.remove(&key)?;
        self.by_client.remove(&(session.port, session.client));
        Some(session)
    }

    /// Sessions matching `which`, removed.
    fn remove_where(
        &mut self,
        which: impl Fn(&SessionKey, &Session) -> bool,
    ) -> Vec<(SessionKey, Session)> {
        let keys: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(key, session)| which(key, session))
            .map(|(key, _)| *key)
            .collect();
        keys.into_iter()
            .filter_map(|key| self.remove(key).map(|session| (key, session)))
            .collect()
    }

    /// Publishes the number of sessions on tunnel `tunnel` in its counters.
    fn publish_count(&self, tunnel: TunnelKey, session: &SessionHandle) {
        let count = self.sessions.keys().filter(|(t, _)| *t == tunnel).count() as u64;
        session.stats().udp_sessions.store(count, Ordering::Relaxed);
    }
}

/// Limits of the UDP side.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UdpLimits {
    pub(crate) idle_timeout: Duration,
    pub(crate) max_sessions: usize,
}

/// Counters the UDP side moves.
#[derive(Clone)]
pub(crate) struct UdpCounters {
    /// Sessions opened, by port and protocol.
    pub(crate) opened: prometheus::IntCounterVec,
    /// Datagrams or sessions dropped, by reason.
    pub(crate) dropped: prometheus::IntCounterVec,
}

/// Why a datagram was dropped on the edge.
#[derive(Debug, Clone, Copy)]
enum DropCause {
    /// The edge has as many sessions as it may.
    SessionLimit,
    /// No tunnel to open a session over.
    TunnelDown,
    /// The tunnel's queue was full.
    QueueFull,
    /// The client's socket could not take a reply now.
    SocketBusy,
}

impl DropCause {
    fn label(self) -> &'static str {
        match self {
            DropCause::SessionLimit => "session_limit",
            DropCause::TunnelDown => "tunnel_down",
            DropCause::QueueFull => "queue_full",
            DropCause::SocketBusy => "socket_busy",
        }
    }
}

/// The edge's UDP sessions over all its tunnels: opened by the listeners, answered from the
/// tunnels' events, ended when idle or when their tunnel goes.
pub(crate) struct UdpSessions {
    limits: UdpLimits,
    counters: UdpCounters,
    table: Mutex<Table>,
    /// Drops before a tunnel was chosen (session limit, no tunnel up).
    dropped_untunnelled: AtomicU64,
}

impl UdpSessions {
    pub(crate) fn new(limits: UdpLimits, counters: UdpCounters) -> Self {
        Self {
            limits,
            counters,
            table: Mutex::default(),
            dropped_untunnelled: AtomicU64::new(0),
        }
    }

    /// Counts a drop by cause, and in the tunnel's total (unless the tunnel counted it) or in
    /// the edge's when no tunnel was chosen yet.
    fn dropped(&self, tunnel: Option<&SessionHandle>, cause: DropCause) {
        self.counters
            .dropped
            .with_label_values(&[cause.label()])
            .inc();
        match tunnel {
            None => {
                self.dropped_untunnelled.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) if matches!(cause, DropCause::QueueFull) => {}
            Some(tunnel) => {
                tunnel.stats().udp_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Datagrams dropped before a tunnel was chosen.
    pub(crate) fn dropped_untunnelled(&self) -> u64 {
        self.dropped_untunnelled.load(Ordering::Relaxed)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends sessions on our side and tells the hub.
    fn end(&self, which: impl Fn(&SessionKey, &Session) -> bool) {
        let mut table = self.table();
        for ((tunnel, id), session) in table.remove_where(which) {
            session.tunnel.close_udp(id);
            table.publish_count(tunnel, &session.tunnel);
        }
    }

    /// Sends a reply datagram of session `id` on `tunnel` to its client, from the port the
    /// client wrote to.
    pub(crate) fn reply(&self, tunnel: TunnelKey, id: u32, payload: &[u8]) {
        let mut table = self.table();
        let Some(session) = table.sessions.get_mut(&(tunnel, id)) else {
            return;
        };
        session.last_active = Instant::now();
        if session.socket.try_send_to(payload, session.client).is_err() {
            let tunnel = session.tunnel.clone();
            drop(table);
            self.dropped(Some(&tunnel), DropCause::SocketBusy);
        }
    }

    /// The hub ended a session.
    pub(crate) fn closed_by_hub(&self, tunnel: TunnelKey, id: u32) {
        let mut table = self.table();
        if let Some(session) = table.remove((tunnel, id)) {
            table.publish_count(tunnel, &session.tunnel);
        }
    }

    /// A tunnel is draining: its sessions end now, so that their clients' next datagrams open
    /// new sessions on another tunnel.
    pub(crate) fn end_tunnel(&self, tunnel: TunnelKey) {
        self.end(|(t, _), _| *t == tunnel);
    }

    /// A tunnel is gone, and its sessions with it.
    pub(crate) fn forget_tunnel(&self, tunnel: TunnelKey) {
        self.table().remove_where(|(t, _), _| *t == tunnel);
    }

    /// Ends sessions idle for the timeout.
    pub(crate) fn expire(&self) {
        let idle_timeout = self.limits.idle_timeout;
        self.end(|_, session| session.last_active.elapsed() >= idle_timeout);
    }

    /// How often `expire` should run.
    pub(crate) fn sweep_interval(&self) -> Duration {
        (self.limits.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}

/// The public UDP listeners.
pub(crate) struct UdpPorts {
    bind_address: IpAddr,
    tunnels: Arc<Tunnels>,
    sessions: Arc<UdpSessions>,
    listeners: BTreeMap<u16, CancellationToken>,
}

/// Sockets bound for new ports, not yet serving.
pub(crate) type BoundUdp = Vec<(u16, UdpSocket)>;

impl UdpPorts {
    pub(crate) fn new(
        bind_address: IpAddr,
        tunnels: Arc<Tunnels>,
        sessions: Arc<UdpSessions>,
    ) -> Self {
        Self {
            bind_address,
            tunnels,
            sessions,
            listeners: BTreeMap::new(),
        }
    }

    /// The ports listened on.
    pub(crate) fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }

    /// Binds the ports of `ports` not yet listened on; nothing changes until [`Self::commit`].
    pub(crate) fn bind_new(&self, ports: &[u16]) -> Result<BoundUdp, BindError> {
        let mut fresh: BoundUdp = Vec::new();
        for &port in ports {
            if self.listeners.contains_key(&port) || fresh.iter().any(|(p, _)| *p == port) {
                continue;
            }
            let addr = SocketAddr::new(self.bind_address, port);
            let socket = std::net::UdpSocket::bind(addr)
                .and_then(|s| {
                    s.set_nonblocking(true)?;
                    UdpSocket::from_std(s)
                })
                .map_err(BindError::udp(addr))?;
            fresh.push((port, socket));
        }
        Ok(fresh)
    }

    /// Makes the listeners match `ports`, using sockets from [`Self::bind_new`]. Removed ports
    /// end their sessions.
    pub(crate) fn commit(&mut self, ports: &[u16], fresh: BoundUdp) {
        for port in crate::ports::close_removed(&mut self.listeners, ports) {
            self.sessions.end(|_, session| session.port == port);
        }
        for (port, socket) in fresh {
            let cancel = CancellationToken::new();
            self.listeners.insert(port, cancel.clone());
            let receiver = Receiver {
                port,
                socket: Arc::new(socket),
                tunnels: self.tunnels.clone(),
                sessions: self.sessions.clone(),
                opened: self
                    .sessions
                    .counters
                    .opened
                    .with_label_values(&[&port.to_string(), "udp"]),
            };
            tokio::spawn(receiver.run(cancel));
        }
    }
}

impl Drop for UdpPorts {
    fn drop(&mut self) {
        for cancel in self.listeners.values() {
            cancel.cancel();
        }
    }
}

/// Reads one public UDP port and feeds its datagrams into sessions.
struct Receiver {
    port: u16,
    socket: Arc<UdpSocket>,
    tunnels: Arc<Tunnels>,
    sessions: Arc<UdpSessions>,
    opened: prometheus::IntCounter,
}

impl Receiver {
    async fn run(self, cancel: CancellationToken) {
        let (Ok(local), Ok(mut receiver)) =
            (self.socket.local_addr(), BatchReceiver::new(&self.socket))
        else {
            return;
        };
        loop {
            tokio::select! {
                received = receiver.receive(&self.socket) => if received.is_err() {
                    continue;
                },
                () = cancel.cancelled() => return,
            }
            // One allocation per batch: each datagram's frame payload is a slice of it.
            let mut payloads =
                BytesMut::with_capacity(receiver.datagrams().map(|(_, d)| d.len()).sum());
            for (client, payload) in receiver.datagrams() {
                payloads.extend_from_slice(payload);
                self.forward(client, local, payloads.split().freeze()).await;
            }
        }
    }

    /// Sends one datagram from `client` into its session, or counts why it was dropped.
    async fn forward(&self, client: SocketAddr, local: SocketAddr, payload: Bytes) {
        let (id, tunnel) = match self.session_for(client, local).await {
            Ok(found) => found,
            Err((cause, tunnel)) => return self.sessions.dropped(tunnel.as_ref(), cause),
        };
        if !tunnel.send_udp(id, payload) {
            self.sessions.dropped(Some(&tunnel), DropCause::QueueFull);
        }
    }

    /// The client's session and its tunnel, opened (with its PROXY v2 header, on the least
    /// loaded tunnel) if it has none; why not when the session limit is reached or no tunnel
    /// is up.
    async fn session_for(
        &self,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<(u32, SessionHandle), (DropCause, Option<SessionHandle>)> {
        {
            let mut table = self.sessions.table();
            if let Some(&key) = table.by_client.get(&(self.port, client)) {
                if let Some(session) = table.sessions.get_mut(&key) {
                    session.last_active = Instant::now();
                    return Ok((key.1, session.tunnel.clone()));
                }
            }
            if table.sessions.len() >= self.sessions.limits.max_sessions {
                return Err((DropCause::SessionLimit, None));
            }
        }
        let picked = self.tunnels.pick().ok_or((DropCause::TunnelDown, None))?;
        let (tunnel_key, tunnel) = (picked.key, picked.session.clone());
        let header = ProxyV2::proxy(V2Transport::Datagram, client, local).to_bytes();
        let id = tunnel
            .open_udp(Bytes::from(header))
            .await
            .map_err(|_| (DropCause::TunnelDown, Some(tunnel.clone())))?;
        self.opened.inc();
        self.tunnels
            .announce(&picked, Protocol::Udp, client, self.port);
        let mut table = self.sessions.table();
        table
            .by_client
            .insert((self.port, client), (tunnel_key, id));
        table.sessions.insert(
            (tunnel_key, id),
            Session {
                port: self.port,
                client,
                socket: self.socket.clone(),
                last_active: Instant::now(),
                tunnel: tunnel.clone(),
            },
        );
        table.publish_count(tunnel_key, &tunnel);
        Ok((id, tunnel))
    }
}
