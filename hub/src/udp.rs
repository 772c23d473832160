//! The UDP sessions of one edge tunnel on the hub: one socket per session connected to the
//! target, the edge's PROXY v2 header as its first datagram, replies sent back through the
//! tunnel, and idle expiry. Sessions are capped per edge and for the whole hub (which also
//! bounds their file descriptors); an idle session holds its socket and no buffer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use remoteingress_tunnel::{BatchSender, SessionHandle};
use remoteingress_wire::config::Protocol;
use remoteingress_wire::proxy::{ProxyV2, V2Transport};
use tokio::net::UdpSocket;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;

use crate::quota::EdgeQuota;
use crate::target::{report_refusal, Route, TargetError};
use crate::{HubEvent, HubInner};

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

thread_local! {
    /// The receive buffer of every session relayed on this thread.
    static RECEIVE_BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// UDP sessions the hub allows in all: `configured`, and at most half of the process's file
/// descriptor limit, so that UDP can never starve TCP and the tunnels of its fds.
pub(crate) fn session_budget(configured: usize) -> usize {
    let half_of_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<usize>().ok()
        })
        .map_or(usize::MAX, |soft| soft / 2);
    configured.min(half_of_fds)
}

struct UdpSession {
    socket: Arc<UdpSocket>,
    /// The target the socket is connected to.
    target: SocketAddr,
    sender: BatchSender,
    /// Datagrams from the edge not yet written to the target (see [`UdpSessions::flush`]).
    pending: Vec<Bytes>,
    /// Its places in the edge's quota and under the hub-wide cap.
    _slots: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    /// Milliseconds since `UdpSessions::epoch` of the last datagram either way.
    last_active: Arc<AtomicU64>,
    replies: JoinHandle<()>,
}

impl Drop for UdpSession {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// UDP sessions of one tunnel; owned by the task that serves the tunnel.
pub(crate) struct UdpSessions {
    edge_id: String,
    /// The address the tunnel comes from (which client addresses are believable depends on it).
    tunnel_from: IpAddr,
    /// What the edge may hold across its tunnels.
    quota: Arc<EdgeQuota>,
    session: SessionHandle,
    sessions: HashMap<u32, UdpSession>,
    /// Sessions with pending datagrams.
    dirty: Vec<u32>,
    /// Datagrams written to targets.
    written: prometheus::IntCounter,
    /// Datagrams the targets' sockets could not take.
    busy: prometheus::IntCounter,
    epoch: Instant,
}

impl UdpSessions {
    pub(crate) fn new(
        inner: &HubInner,
        edge_id: &str,
        tunnel_from: IpAddr,
        quota: Arc<EdgeQuota>,
        session: SessionHandle,
    ) -> Self {
        let metrics = &inner.metrics;
        Self {
            edge_id: edge_id.to_owned(),
            tunnel_from,
            quota,
            session,
            sessions: HashMap::new(),
            dirty: Vec::new(),
            written: metrics.udp_datagrams.with_label_values(&[edge_id, "in"]),
            busy: metrics
                .udp_dropped
                .with_label_values(&[edge_id, "socket_busy"]),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn publish_count(&self) {
        self.session
            .stats()
            .udp_sessions
            .store(self.sessions.len() as u64, Ordering::Relaxed);
    }

    /// Opens a session for UDP_OPEN, or refuses it with UDP_CLOSE.
    pub(crate) async fn open(&mut self, inner: &HubInner, id: u32, header: Bytes) {
        let Some(edge_slot) = self.quota.udp_session() else {
            remoteingress_tunnel::warn_limited!(
                "udp_edge_session_limit",
                edge = %self.edge_id,
                "UDP session limit of the edge reached; session refused"
            );
            return self.refuse(inner, id, "edge_session_limit");
        };
        let Ok(slot) = inner.udp_slots.clone().try_acquire_owned() else {
            remoteingress_tunnel::warn_limited!(
                "udp_hub_session_limit",
                edge = %self.edge_id,
                "UDP session limit of the hub reached; session refused"
            );
            return self.refuse(inner, id, "hub_session_limit");
        };
        match self.connect(inner, &header).await {
            Ok((socket, route, target)) => {
                let sender = match BatchSender::new(&socket) {
                    Ok(sender) => sender,
                    Err(error) => {
                        let error = TargetError::io("setting up the UDP socket to", target)(error);
                        report_refusal(inner, &self.edge_id, id, &error);
                        return self.session.close_udp(id);
                    }
                };
                let socket = Arc::new(socket);
                let last_active = Arc::new(AtomicU64::new(self.now_ms()));
                let metrics = &inner.metrics;
                let replies = tokio::spawn(relay_replies(
                    socket.clone(),
                    self.session.clone(),
                    id,
                    last_active.clone(),
                    self.epoch,
                    ReplyCounters {
                        sent: metrics
                            .udp_datagrams
                            .with_label_values(&[&self.edge_id, "out"]),
                        dropped: metrics
                            .udp_dropped
                            .with_label_values(&[&self.edge_id, "queue_full"]),
                    },
                ));
                self.sessions.insert(
                    id,
                    UdpSession {
                        socket,
                        target,
                        sender,
                        pending: Vec::new(),
                        _slots: (edge_slot, slot),
                        last_active,
                        replies,
                    },
                );
                self.publish_count();
                inner.emit(HubEvent::UdpSessionOpened {
                    edge_id: self.edge_id.clone(),
                    session_id: id,
                    client_addr: route.client,
                    edge_port: route.edge_port(),
                    target: route.target(inner),
                });
            }
            Err(error) => {
                report_refusal(inner, &self.edge_id, id, &error);
                self.session.close_udp(id);
            }
        }
    }

    /// A socket connected to the session's target, with the PROXY v2 header already sent, and
    /// the session's route.
    async fn connect(
        &self,
        inner: &HubInner,
        header: &[u8],
    ) -> Result<(UdpSocket, Route, SocketAddr), TargetError> {
        let (proxy, len) = ProxyV2::parse(header)?.ok_or(TargetError::Incomplete)?;
        let addresses = proxy
            .addresses
            .filter(|a| a.transport == V2Transport::Datagram && len == header.len())
            .ok_or(TargetError::NotJustHeader)?;
        let route = Route::of(
            inner,
            &self.edge_id,
            Protocol::Udp,
            addresses.source,
            addresses.destination,
            self.tunnel_from,
        )?;
        let target = remoteingress_tunnel::resolve(route.host(inner), route.target_port).await?;
        let local: SocketAddr = if target.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = UdpSocket::bind(local)
            .await
            .map_err(TargetError::io("binding a UDP socket for", target))?;
        socket
            .connect(target)
            .await
            .map_err(TargetError::io("connecting to", target))?;
        socket
            .send(&route.proxy_header(&self.edge_id))
            .await
            .map_err(TargetError::io("sending the PROXY header to", target))?;
        Ok((socket, route, target))
    }

    /// Forwards one client datagram; dropped (and counted) if the socket cannot take it now.
    pub(crate) fn datagram(&mut self, id: u32, payload: Bytes) {
        let now = self.now_ms();
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        session.last_active.store(now, Ordering::Relaxed);
        if session.pending.is_empty() {
            self.dirty.push(id);
        }
        session.pending.push(payload);
    }

    /// Writes every pending datagram to its target, runs of equal size in one system call;
    /// what a full socket cannot take is dropped and counted. The tunnel's task calls it after
    /// each run of waiting events, so that a burst from the edge leaves in batches.
    pub(crate) fn flush(&mut self) {
        for id in self.dirty.drain(..) {
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            let sent = session.pending.len();
            let unsent = session
                .sender
                .send(&session.socket, session.target, &session.pending);
            session.pending.clear();
            self.written.inc_by((sent - unsent) as u64);
            if unsent > 0 {
                self.busy.inc_by(unsent as u64);
                self.session
                    .stats()
                    .udp_dropped
                    .fetch_add(unsent as u64, Ordering::Relaxed);
            }
        }
    }

    fn refuse(&self, inner: &HubInner, id: u32, reason: &str) {
        self.dropped(inner, reason);
        self.session.close_udp(id);
    }

    /// Counts a drop in the tunnel's total and by cause.
    fn dropped(&self, inner: &HubInner, reason: &str) {
        self.session
            .stats()
            .udp_dropped
            .fetch_add(1, Ordering::Relaxed);
        inner
            .metrics
            .udp_dropped
            .with_label_values(&[&self.edge_id, reason])
            .inc();
    }

    /// Ends a session the edge closed, after the datagrams it sent before the close.
    pub(crate) fn close(&mut self, inner: &HubInner, id: u32) {
        self.flush();
        if self.sessions.remove(&id).is_some() {
            self.closed(inner, id);
        }
    }

    fn closed(&self, inner: &HubInner, id: u32) {
        self.publish_count();
        inner.emit(HubEvent::UdpSessionClosed {
            edge_id: self.edge_id.clone(),
            session_id: id,
        });
    }

    /// Ends sessions idle for the timeout, telling the edge.
    pub(crate) fn expire(&mut self, inner: &HubInner) {
        let limit = inner.options.udp_idle_timeout.as_millis() as u64;
        let now = self.now_ms();
        let idle: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_sub(s.last_active.load(Ordering::Relaxed)) >= limit)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.sessions.remove(&id);
            self.session.close_udp(id);
            self.closed(inner, id);
        }
        // A spray's table shrinks back once its sessions are gone.
        if self.sessions.capacity() > 64 && self.sessions.len() < self.sessions.capacity() / 4 {
            self.sessions.shrink_to_fit();
        }
    }

    /// How often `expire` should run.
    pub(crate) fn sweep_interval(inner: &HubInner) -> Duration {
        (inner.options.udp_idle_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}

/// Counters a reply relay moves.
struct ReplyCounters {
    sent: prometheus::IntCounter,
    dropped: prometheus::IntCounter,
}

async fn relay_replies(
    socket: Arc<UdpSocket>,
    session: SessionHandle,
    id: u32,
    last_active: Arc<AtomicU64>,
    epoch: Instant,
    counters: ReplyCounters,
) {
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        // Read into the worker thread's buffer, shared by every session: a session holds no
        // buffer of its own, only the bytes of a datagram in flight.
        let received = RECEIVE_BUFFER.with_borrow_mut(|buf| {
            socket
                .try_recv(buf)
                .map(|n| Bytes::copy_from_slice(&buf[..n]))
        });
        match received {
            Ok(datagram) => {
                last_active.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                if session.send_udp(id, datagram) {
                    counters.sent.inc();
                } else {
                    counters.dropped.inc();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            // An ICMP "port unreachable" for an earlier datagram; the target may come back.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(_) => return,
        }
    }
}
