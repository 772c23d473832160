//! The public UDP listeners of an edge and their sessions: one session per (listen port, client
//! address), opened with a PROXY v2 header, answered from the same socket, ended when idle.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use remoteingress_tunnel::SessionHandle;
use remoteingress_wire::proxy::{ProxyV2, V2Transport};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::ports::BindError;

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

struct Session {
    port: u16,
    client: SocketAddr,
    socket: Arc<UdpSocket>,
    last_active: Instant,
}

#[derive(Default)]
struct Table {
    by_client: HashMap<(u16, SocketAddr), u32>,
    sessions: HashMap<u32, Session>,
}

impl Table {
    fn remove(&mut self, id: u32) -> Option<Session> {
        let session = self.sessions.remove(&id)?;
        self.by_client.remove(&(session.port, session.client));
        Some(session)
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

impl UdpCounters {
    /// Counts a drop by cause, and in the session's total unless the tunnel counted it.
    fn dropped(&self, session: &SessionHandle, cause: DropCause) {
        self.dropped.with_label_values(&[cause.label()]).inc();
        if !matches!(cause, DropCause::QueueFull) {
            session.stats().udp_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// UDP listeners and sessions of one tunnel session.
pub(crate) struct UdpPorts {
    bind_address: IpAddr,
    session: SessionHandle,
    limits: UdpLimits,
    counters: UdpCounters,
    listeners: BTreeMap<u16, CancellationToken>,
    table: Arc<Mutex<Table>>,
}

/// Sockets bound for new ports, not yet serving.
pub(crate) type BoundUdp = Vec<(u16, UdpSocket)>;

impl UdpPorts {
    pub(crate) fn new(
        bind_address: IpAddr,
        session: SessionHandle,
        limits: UdpLimits,
        counters: UdpCounters,
    ) -> Self {
        Self {
            bind_address,
            session,
            limits,
            counters,
            listeners: BTreeMap::new(),
            table: Arc::default(),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
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
            let ids: Vec<u32> = self
                .table()
                .sessions
                .iter()
                .filter(|(_, s)| s.port == port)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                self.end(id);
            }
        }
        for (port, socket) in fresh {
            let cancel = self.session.cancellation();
            self.listeners.insert(port, cancel.clone());
            let receiver = Receiver {
                port,
                socket: Arc::new(socket),
                session: self.session.clone(),
                table: self.table.clone(),
                limits: self.limits,
                opened: self
                    .counters
                    .opened
                    .with_label_values(&[&port.to_string(), "udp"]),
                counters: self.counters.clone(),
            };
            tokio::spawn(receiver.run(cancel));
        }
    }

    /// Ends a session on our side and tells the hub.
    fn end(&self, id: u32) {
        if self.table().remove(id).is_some() {
            self.session.close_udp(id);
        }
        self.publish_count();
    }

    fn publish_count(&self) {
        let count = self.table().sessions.len() as u64;
        self.session
            .stats()
            .udp_sessions
            .store(count, Ordering::Relaxed);
    }

    /// Sends a reply datagram to the session's client, from the port it wrote to.
    pub(crate) fn reply(&self, id: u32, payload: &[u8]) {
        let mut table = self.table();
        let Some(session) = table.sessions.get_mut(&id) else {
            return;
        };
        session.last_active = Instant::now();
        if session.socket.try_send_to(payload, session.client).is_err() {
            self.counters.dropped(&self.session, DropCause::SocketBusy);
        }
    }

    /// The hub ended a session.
    pub(crate) fn closed_by_hub(&self, id: u32) {
        self.table().remove(id);
        self.publish_count();
    }

    /// Ends sessions idle for the timeout.
    pub(crate) fn expire(&self) {
        let idle: Vec<u32> = self
            .table()
            .sessions
            .iter()
            .filter(|(_, s)| s.last_active.elapsed() >= self.limits.idle_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.end(id);
        }
    }

    /// How often `expire` should run.
    pub(crate) fn sweep_interval(&self) -> Duration {
        (self.limits.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
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
    session: SessionHandle,
    table: Arc<Mutex<Table>>,
    limits: UdpLimits,
    opened: prometheus::IntCounter,
    counters: UdpCounters,
}

impl Receiver {
    async fn run(self, cancel: CancellationToken) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let Ok(local) = self.socket.local_addr() else {
            return;
        };
        loop {
            let (len, client) = tokio::select! {
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok(pair) => pair,
                    Err(_) => continue,
                },
                () = cancel.cancelled() => return,
            };
            let id = match self.session_for(client, local).await {
                Ok(id) => id,
                Err(cause) => {
                    self.counters.dropped(&self.session, cause);
                    continue;
                }
            };
            if !self
                .session
                .send_udp(id, Bytes::copy_from_slice(&buf[..len]))
            {
                self.counters.dropped(&self.session, DropCause::QueueFull);
            }
        }
    }

    /// The client's session, opened (with its PROXY v2 header) if it has none; why not when
    /// the session limit is reached or the tunnel is gone.
    async fn session_for(&self, client: SocketAddr, local: SocketAddr) -> Result<u32, DropCause> {
        {
            let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(&id) = table.by_client.get(&(self.port, client)) {
                if let Some(session) = table.sessions.get_mut(&id) {
                    session.last_active = Instant::now();
                }
                return Ok(id);
            }
            if table.sessions.len() >= self.limits.max_sessions {
                return Err(DropCause::SessionLimit);
            }
        }
        let header = ProxyV2::proxy(V2Transport::Datagram, client, local).to_bytes();
        let id = self
            .session
            .open_udp(Bytes::from(header))
            .await
            .map_err(|_| DropCause::TunnelDown)?;
        self.opened.inc();
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.by_client.insert((self.port, client), id);
        table.sessions.insert(
            id,
            Session {
                port: self.port,
                client,
                socket: self.socket.clone(),
                last_active: Instant::now(),
            },
        );
        let count = table.sessions.len() as u64;
        self.session
            .stats()
            .udp_sessions
            .store(count, Ordering::Relaxed);
        Ok(id)
    }
}
