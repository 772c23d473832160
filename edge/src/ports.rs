//! The public TCP listeners of an edge, reconciled to the ports the hub assigns: new ports open,
//! removed ports close (ending their connections), unchanged ports are left alone.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use remoteingress_tunnel::{listen_tcp, pipe};
use remoteingress_wire::config::Protocol;
use remoteingress_wire::proxy::ProxyV1;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::placement::{place, Placed};
use crate::tunnels::Tunnels;

/// Listeners bound for new ports, not yet serving.
pub(crate) type BoundTcp = Vec<(u16, TcpListener)>;

/// A public port that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {protocol} {addr}: {source}")]
pub struct BindError {
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// The address asked for.
    pub addr: SocketAddr,
    /// The cause.
    pub source: std::io::Error,
}

impl BindError {
    /// The error for a TCP listener on `addr`, from its cause.
    pub(crate) fn tcp(addr: SocketAddr) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self {
            protocol: "tcp",
            addr,
            source,
        }
    }

    /// The error for a UDP socket on `addr`, from its cause.
    pub(crate) fn udp(addr: SocketAddr) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self {
            protocol: "udp",
            addr,
            source,
        }
    }
}

/// The public TCP listeners, serving clients over whichever tunnels are up.
pub(crate) struct PortSet {
    bind_address: IpAddr,
    tunnels: Arc<Tunnels>,
    connections: Arc<Semaphore>,
    accepted: prometheus::IntCounterVec,
    accepting: CancellationToken,
    listeners: BTreeMap<u16, CancellationToken>,
}

impl PortSet {
    pub(crate) fn new(
        bind_address: IpAddr,
        tunnels: Arc<Tunnels>,
        connections: Arc<Semaphore>,
        accepted: prometheus::IntCounterVec,
        accepting: CancellationToken,
    ) -> Self {
        Self {
            bind_address,
            tunnels,
            connections,
            accepted,
            accepting,
            listeners: BTreeMap::new(),
        }
    }

    /// The ports listened on.
    pub(crate) fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }

    /// Binds the ports of `ports` not yet listened on; nothing changes until [`Self::commit`].
    pub(crate) fn bind_new(&self, ports: &[u16]) -> Result<BoundTcp, BindError> {
        let mut fresh: BoundTcp = Vec::new();
        for &port in ports {
            if self.listeners.contains_key(&port) || fresh.iter().any(|(p, _)| *p == port) {
                continue;
            }
            let addr = SocketAddr::new(self.bind_address, port);
            let listener = listen_tcp(addr).map_err(BindError::tcp(addr))?;
            fresh.push((port, listener));
        }
        Ok(fresh)
    }

    /// Makes the listeners match `ports`, using listeners from [`Self::bind_new`]. Removed
    /// ports close, ending their connections; unchanged ports are untouched.
    pub(crate) fn commit(&mut self, ports: &[u16], fresh: BoundTcp) {
        close_removed(&mut self.listeners, ports);
        for (port, listener) in fresh {
            let cancel = CancellationToken::new();
            self.listeners.insert(port, cancel.clone());
            let tunnels = self.tunnels.clone();
            let connections = self.connections.clone();
            let accepted = self.accepted.with_label_values(&[&port.to_string(), "tcp"]);
            let accepting = self.accepting.clone();
            tokio::spawn(accept_loop(
                listener,
                tunnels,
                connections,
                accepted,
                accepting,
                cancel,
            ));
        }
    }
}

/// Stops the listeners whose port is not in `wanted`; returns their ports.
pub(crate) fn close_removed(
    listeners: &mut BTreeMap<u16, CancellationToken>,
    wanted: &[u16],
) -> Vec<u16> {
    let removed: Vec<u16> = listeners
        .keys()
        .filter(|port| !wanted.contains(port))
        .copied()
        .collect();
    for port in &removed {
        if let Some(cancel) = listeners.remove(port) {
            cancel.cancel();
        }
    }
    removed
}

impl Drop for PortSet {
    fn drop(&mut self) {
        for cancel in self.listeners.values() {
            cancel.cancel();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tunnels: Arc<Tunnels>,
    connections: Arc<Semaphore>,
    accepted_total: prometheus::IntCounter,
    accepting: CancellationToken,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = cancel.cancelled() => return,
            () = accepting.cancelled() => return,
        };
        match accepted {
            Ok((client, peer)) => match connections.clone().try_acquire_owned() {
                Ok(permit) => {
                    accepted_total.inc();
                    let tunnels = tunnels.clone();
                    let cancel = cancel.clone();
                    tokio::spawn(serve_client(client, peer, tunnels, cancel, permit));
                }
                Err(_) => remoteingress_tunnel::warn_limited!(
                    "client_connection_limit",
                    "client connection limit reached; connection dropped"
                ),
            },
            Err(e) => {
                // Usually out of file descriptors: pause accepting instead of spinning.
                remoteingress_tunnel::warn_limited!("client_accept_failed", error = %e, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                    () = cancel.cancelled() => return,
                }
            }
        }
    }
}

/// Carries one client connection through the least loaded tunnel whose hub confirms it.
async fn serve_client(
    client: TcpStream,
    peer: SocketAddr,
    tunnels: Arc<Tunnels>,
    cancel: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let _ = client.set_nodelay(true);
    let Ok(local) = client.local_addr() else {
        return;
    };
    let header = Bytes::from(ProxyV1::tcp(peer, local).to_line());
    let placed = tokio::select! {
        placed = place(&client, &header, &tunnels) => placed,
        () = cancel.cancelled() => return,
    };
    match placed {
        Some(Placed {
            picked,
            reader,
            writer,
        }) => {
            tunnels.announce(&picked, Protocol::Tcp, peer, local.port());
            pipe(client, reader, writer, cancel).await;
        }
        None => tracing::debug!(%peer, "client refused: no tunnel took the stream"),
    }
}
