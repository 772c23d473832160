//! Keeping `hub_connections` tunnels up, each to a distinct hub instance: one slot per tunnel
//! connects (rotating through the hub addresses), serves the tunnel's events, and reconnects
//! after a loss (with backoff) or at once after a DRAIN or once the tunnel is suspect, while the
//! retired tunnel's open streams finish in the background.

use std::sync::Arc;
use std::time::{Duration, Instant};

use remoteingress_tunnel::{SessionEvent, SessionHandle};
use remoteingress_wire::EdgeConfig;
use tokio::sync::{mpsc, oneshot};

use crate::apply::{offer, reject, report_disagreement, Ack, ApplyError, Serving};
use crate::backoff::Backoff;
use crate::connect::{connect, quic_reaches, ConnectError, HubAddress};
use crate::ports::PortSet;
use crate::tunnels::{hub_name, TunnelKey, TunnelState};
use crate::udp::UdpPorts;
use crate::{metrics, report_public_ip, EdgeEvent, EdgeInner, Transport, TransportMode};

/// How often a drained tunnel is checked for open streams.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// One tunnel as its slot knows it.
struct Tunnel {
    key: TunnelKey,
    session: SessionHandle,
    hub_id: Option<String>,
    address: String,
}

impl Tunnel {
    /// The hub the tunnel reaches: its instance id, or the address for an original hub.
    fn hub(&self) -> &str {
        hub_name(self.hub_id.as_deref(), &self.address)
    }
}

/// How one attempt ended.
enum Ended {
    /// No tunnel: the hub could not be reached, refused (saying when to come back, if it
    /// did), or is one the edge already has.
    Failed(Option<Duration>),
    /// The tunnel was up for this long and is gone.
    Lost(Duration),
    /// The hub drained the tunnel, or it became suspect: it finishes its streams in the
    /// background.
    Retired,
    /// The edge is shutting down.
    Shutdown,
}

/// Starts the slots one after another (each after the previous one's first attempt, so that
/// edges behind a load balancer tell hubs apart before the next tunnel is dialled).
pub(crate) async fn supervise(inner: Arc<EdgeInner>) {
    let mut slots = Vec::new();
    for slot in 0..inner.options.hub_connections.max(1) {
        let (first_attempt, attempted) = oneshot::channel();
        slots.push(tokio::spawn(keep_tunnel(
            inner.clone(),
            slot,
            first_attempt,
        )));
        tokio::select! {
            _ = attempted => {}
            () = inner.shutdown.cancelled() => break,
        }
    }
    for slot in slots {
        let _ = slot.await;
    }
}

/// The address slot `slot` dials on its `attempt`-th try: its own turn in the list, skipping
/// addresses an active tunnel already holds.
fn address_for(inner: &EdgeInner, slot: usize, attempt: usize) -> HubAddress {
    let hubs = &inner.options.hubs;
    let start = slot + attempt;
    (0..hubs.len())
        .map(|offset| &hubs[(start + offset) % hubs.len()])
        .find(|hub| hubs.len() == 1 || !inner.tunnels.holds_address(&hub.to_string()))
        .unwrap_or(&hubs[start % hubs.len()])
        .clone()
}

/// Connects, serves, and reconnects one tunnel until shutdown.
async fn keep_tunnel(inner: Arc<EdgeInner>, slot: usize, first_attempt: oneshot::Sender<()>) {
    let mut first_attempt = Some(first_attempt);
    let mut backoff = Backoff::new(inner.options.backoff);
    for attempt in 0.. {
        let hub = address_for(&inner, slot, attempt);
        let ended = attempt_tunnel(&inner, &hub, slot, &mut first_attempt).await;
        if let Some(first) = first_attempt.take() {
            let _ = first.send(());
        }
        let hint = match ended {
            Ended::Shutdown => return,
            Ended::Retired => continue,
            Ended::Lost(lasted) => {
                backoff.connection_ended(lasted);
                None
            }
            Ended::Failed(hint) => hint,
        };
        let delay = backoff.next_delay(rand::random::<f64>(), hint);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = inner.shutdown.cancelled() => return,
        }
    }
}

/// One connection attempt to `hub` and, if it gives a tunnel to a hub instance the edge has
/// no tunnel to yet, that tunnel's service.
async fn attempt_tunnel(
    inner: &Arc<EdgeInner>,
    hub: &HubAddress,
    slot: usize,
    first_attempt: &mut Option<oneshot::Sender<()>>,
) -> Ended {
    let connected = tokio::select! {
        connected = connect(inner, hub) => connected,
        () = inner.shutdown.cancelled() => return Ended::Shutdown,
    };
    let (session, events, reply) = match connected {
        Ok(connected) => connected,
        Err(error) => {
            let retry_after = match &error {
                ConnectError::Refused(refusal) => refusal.retry_after(),
                _ => None,
            };
            tracing::warn!(%hub, %error, ?retry_after, "cannot reach the hub");
            inner.update(|s| s.last_error = Some(error.to_string()));
            return Ended::Failed(retry_after);
        }
    };
    let address = hub.to_string();
    let Some(key) = inner
        .tunnels
        .add(&session, reply.hub_id.as_deref(), &address)
    else {
        tracing::debug!(%hub, hub_id = ?reply.hub_id, slot, "reached a hub this edge already has a tunnel to");
        session.close("already connected to this hub");
        return Ended::Failed(None);
    };
    if let Some(first) = first_attempt.take() {
        let _ = first.send(());
    }
    let tunnel = Tunnel {
        key,
        session,
        hub_id: reply.hub_id,
        address,
    };
    serve_tunnel(inner, hub, tunnel, events, reply.config).await
}

/// Serves one tunnel's events until it ends or is retired: its hub drains it, it turns
/// suspect, or QUIC reaches its hub again after a fallback to TLS.
async fn serve_tunnel(
    inner: &Arc<EdgeInner>,
    hub: &HubAddress,
    tunnel: Tunnel,
    mut events: mpsc::Receiver<SessionEvent>,
    config: EdgeConfig,
) -> Ended {
    let started = Instant::now();
    tunnel_up(inner, &tunnel, &config).await;
    let quic_back = quic_returns(inner, hub, tunnel.session.transport());
    tokio::pin!(quic_back);
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = &mut quic_back => {
                inner.quic_fallbacks.quic_worked(&tunnel.address);
                retire(inner, tunnel, events, Retirement::BackToQuic);
                return Ended::Retired;
            }
            () = inner.shutdown.cancelled() => {
                tunnel.session.close("edge shutting down");
                tunnel_down(inner, &tunnel, "edge shutting down".into()).await;
                return Ended::Shutdown;
            }
        };
        match event {
            Some(SessionEvent::Config(json)) => configure(inner, &tunnel, &json).await,
            Some(SessionEvent::UdpDatagram { id, payload }) => {
                inner.udp.reply(tunnel.key, id, &payload);
            }
            Some(SessionEvent::UdpClose { id }) => inner.udp.closed_by_hub(tunnel.key, id),
            Some(SessionEvent::Drain) => {
                retire(inner, tunnel, events, Retirement::Drain);
                return Ended::Retired;
            }
            Some(SessionEvent::Suspect { silent }) => {
                let silent_ms = silent.as_millis() as u64;
                tracing::warn!(address = %tunnel.address, hub_id = ?tunnel.hub_id, silent_ms, "tunnel suspect: its hub was silent for two probe intervals, or left an open unconfirmed (silent briefly); new streams go elsewhere and a replacement is dialled");
                retire(inner, tunnel, events, Retirement::Suspect);
                return Ended::Retired;
            }
            Some(_) => {}
            None => break,
        }
    }
    let reason = tunnel
        .session
        .close_reason()
        .map_or_else(|| "tunnel closed".to_owned(), |reason| reason.to_string());
    tracing::warn!(address = %tunnel.address, %reason, "tunnel disconnected");
    tunnel_down(inner, &tunnel, reason).await;
    Ended::Lost(started.elapsed())
}

/// A configuration pushed over a tunnel.
async fn configure(inner: &EdgeInner, tunnel: &Tunnel, json: &[u8]) {
    let ack = {
        let mut serving = inner.serving.lock().await;
        let Some(serving) = serving.as_mut() else {
            return;
        };
        match serde_json::from_slice::<EdgeConfig>(json) {
            Ok(config) => {
                let from = (tunnel.key, tunnel.hub(), &tunnel.session);
                offer(inner, serving, from, &config).await
            }
            Err(e) => reject(inner, &tunnel.session, None, &ApplyError::from(e)),
        }
    };
    ack.send().await;
}

/// Why a tunnel takes no new streams while its open ones finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retirement {
    /// Its hub is shutting down (DRAIN).
    Drain,
    /// Its hub went silent or left an open unconfirmed.
    Suspect,
    /// It fell back to TLS and QUIC reaches its hub again: a QUIC tunnel replaces it.
    BackToQuic,
}

impl Retirement {
    /// Whether the tunnel stays until another one is up, so that the edge's listeners never
    /// close in between: only its hub's drain ends it regardless.
    fn waits_for_replacement(self) -> bool {
        self != Retirement::Drain
    }
}

/// Resolves once QUIC reaches `hub` again, for a tunnel that fell back to TLS
/// (`quicWithFallback`): a QUIC handshake is tried every `--quic-retry-after-secs` while the TLS
/// tunnel serves. Never resolves for other tunnels.
async fn quic_returns(inner: &EdgeInner, hub: &HubAddress, transport: Transport) {
    if inner.options.transport != TransportMode::QuicWithFallback || transport != Transport::TcpTls
    {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(inner.options.quic_retry_after).await;
        if quic_reaches(inner, hub).await {
            return;
        }
        tracing::debug!(%hub, "QUIC still does not reach the hub; staying on TLS");
    }
}

/// Takes a drained or suspect tunnel out of the choice for new streams, ends its UDP sessions
/// (their clients' next datagrams open sessions elsewhere), and lets its open streams finish in
/// the background, within the drain grace, before closing it (unless drained by its hub, not
/// before another tunnel is up). A suspect tunnel whose hub is gone ends sooner, at the
/// liveness deadline.
fn retire(
    inner: &Arc<EdgeInner>,
    tunnel: Tunnel,
    mut events: mpsc::Receiver<SessionEvent>,
    why: Retirement,
) {
    let (address, hub_id) = (&tunnel.address, &tunnel.hub_id);
    let state = match why {
        Retirement::Drain => {
            tracing::info!(%address, ?hub_id, "hub is draining this tunnel; new streams go elsewhere");
            inner.emit(EdgeEvent::TunnelDraining {
                hub_id: hub_id.clone(),
                address: address.clone(),
            });
            TunnelState::Draining
        }
        Retirement::Suspect => {
            inner.metrics.tunnels_suspect.inc();
            TunnelState::Suspect
        }
        Retirement::BackToQuic => {
            tracing::info!(%address, ?hub_id, "QUIC reaches the hub again; a QUIC tunnel replaces this TLS one");
            TunnelState::Draining
        }
    };
    inner.tunnels.retire(tunnel.key, state);
    inner.udp.end_tunnel(tunnel.key);
    let state = state.as_str();
    let inner = inner.clone();
    tokio::spawn(async move {
        let mut why = why;
        let deadline = tokio::time::sleep(inner.options.drain_grace);
        tokio::pin!(deadline);
        let mut poll = tokio::time::interval(DRAIN_POLL);
        let reason = loop {
            let replaced = !why.waits_for_replacement() || inner.tunnels.has_other(tunnel.key);
            if tunnel.session.active_streams() == 0 && replaced {
                break "drained".to_owned();
            }
            tokio::select! {
                event = events.recv() => match event {
                    // Its hub is going away too: waiting for a replacement would only hold
                    // up the hub's drain.
                    Some(SessionEvent::Drain) => why = Retirement::Drain,
                    Some(_) => {}
                    None => break format!("tunnel closed while {state}"),
                },
                _ = poll.tick() => {}
                () = &mut deadline => break "drain grace period over".to_owned(),
                () = inner.shutdown.cancelled() => break "edge shutting down".to_owned(),
            }
        };
        tunnel.session.close(reason.clone());
        tunnel_down(&inner, &tunnel, reason).await;
    });
}

/// A tunnel came up: the listeners start if it is the first, and its hub's configuration is
/// judged against the running one.
async fn tunnel_up(inner: &EdgeInner, tunnel: &Tunnel, config: &EdgeConfig) {
    tracing::info!(address = %tunnel.address, hub_id = ?tunnel.hub_id, "tunnel connected");
    let (ack, public_ip) = serve_first_config(inner, tunnel, config).await;
    if let Some(ip) = public_ip {
        report_public_ip(&tunnel.session, ip).await;
    }
    ack.send().await;
}

/// Under the serving lock: starts the listeners if this is the first tunnel, and judges its
/// hub's configuration. Returns the acknowledgement owed and the public IP to report.
async fn serve_first_config(
    inner: &EdgeInner,
    tunnel: &Tunnel,
    config: &EdgeConfig,
) -> (Ack, Option<std::net::IpAddr>) {
    let mut serving = inner.serving.lock().await;
    let serving = serving.get_or_insert_with(|| Serving {
        tcp: PortSet::new(
            inner.options.bind_address,
            inner.tunnels.clone(),
            inner.connections.clone(),
            inner.metrics.client_connections.clone(),
            inner.accepting.clone(),
        ),
        udp: UdpPorts::new(
            inner.options.bind_address,
            inner.tunnels.clone(),
            inner.udp.clone(),
        ),
        running: None,
        offers: Default::default(),
        disagreement: None,
    });
    inner.metrics.tunnel_connected.set(1);
    let (reconnect, public_ip) = {
        let mut status = inner.status.lock().unwrap_or_else(|p| p.into_inner());
        status.connections += 1;
        status.last_error = None;
        (status.connections > 1, status.public_ip)
    };
    if reconnect {
        inner.metrics.tunnel_reconnects.inc();
    }
    inner.emit(EdgeEvent::TunnelConnected {
        transport: tunnel.session.transport(),
        hub_id: tunnel.hub_id.clone(),
        address: tunnel.address.clone(),
    });
    let from = (tunnel.key, tunnel.hub(), &tunnel.session);
    (offer(inner, serving, from, config).await, public_ip)
}

/// A tunnel ended: its streams and UDP sessions are gone; the listeners close if it was the
/// last.
async fn tunnel_down(inner: &EdgeInner, tunnel: &Tunnel, reason: String) {
    let mut serving = inner.serving.lock().await;
    let remaining = inner.tunnels.remove(tunnel.key);
    inner.udp.forget_tunnel(tunnel.key);
    inner
        .ended
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .add(metrics::Totals::of(tunnel.session.stats()));
    if remaining == 0 {
        *serving = None;
        inner.metrics.tunnel_connected.set(0);
        inner.update(|s| {
            s.listen_ports.clear();
            s.listen_ports_udp.clear();
            s.generation = None;
            s.config_disagreement = None;
        });
        inner.metrics.config_disagreement.set(0);
        inner.metrics.config_generation.set(0);
    } else if let Some(serving) = serving.as_mut() {
        serving.offers.remove(tunnel.key);
        report_disagreement(inner, serving);
    }
    inner.update(|s| s.last_error = Some(reason.clone()));
    inner.emit(EdgeEvent::TunnelDisconnected {
        reason,
        hub_id: tunnel.hub_id.clone(),
        address: tunnel.address.clone(),
    });
}
