//! The edge's live tunnels, one per hub instance, and the choice of tunnel for each new client
//! connection or UDP session: the open tunnel with the fewest streams, a draining one only when
//! no active one is open, a suspect one only when nothing else is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use std::net::SocketAddr;

use remoteingress_tunnel::{SessionHandle, Transport};
use remoteingress_wire::config::Protocol;
use tokio::sync::broadcast;

use crate::EdgeEvent;

/// Identifies one tunnel for as long as the edge runs.
pub(crate) type TunnelKey = u64;

/// Whether a tunnel takes new streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelState {
    /// Takes new streams.
    Active,
    /// Its hub is shutting down: open streams finish, new ones go elsewhere.
    Draining,
    /// Its hub went silent or left an open unconfirmed: new streams go elsewhere.
    Suspect,
}

impl TunnelState {
    /// The state's name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelState::Active => "active",
            TunnelState::Draining => "draining",
            TunnelState::Suspect => "suspect",
        }
    }
}

/// How the edge names a hub: its instance id, or the address dialled for an original hub.
pub(crate) fn hub_name<'a>(hub_id: Option<&'a str>, address: &'a str) -> &'a str {
    hub_id.unwrap_or(address)
}

/// One tunnel as the status API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelStatus {
    /// The hub instance's id (none from an original hub).
    pub hub_id: Option<String>,
    /// The address dialled, `host:port`.
    pub address: String,
    /// The tunnel's transport.
    pub transport: Transport,
    /// Whether it takes new streams.
    pub state: TunnelState,
    /// TCP streams open on it now.
    pub active_streams: usize,
    /// UDP sessions open on it now.
    pub active_udp_sessions: u64,
    /// UDP datagrams dropped on it.
    pub udp_dropped: u64,
    /// Last round trip, once known.
    pub rtt: Option<Duration>,
    /// When it came up.
    pub connected_since: SystemTime,
}

struct Entry {
    key: TunnelKey,
    session: SessionHandle,
    hub_id: Option<String>,
    address: String,
    state: TunnelState,
    since: SystemTime,
}

impl Entry {
    /// Streams and UDP sessions open on the tunnel: the load the choice balances.
    fn load(&self) -> u64 {
        self.session.active_streams() as u64
            + self.session.stats().udp_sessions.load(Ordering::Relaxed)
    }

    /// The hub this tunnel reaches: its instance id, or the address for an original hub.
    fn hub(&self) -> &str {
        hub_name(self.hub_id.as_deref(), &self.address)
    }

    /// Its state, suspect as soon as the session says so (before its slot has heard).
    fn state(&self) -> TunnelState {
        match self.state {
            TunnelState::Active if self.session.is_suspect() => TunnelState::Suspect,
            state => state,
        }
    }
}

/// The tunnel chosen for a new stream or UDP session.
pub(crate) struct Picked {
    pub(crate) key: TunnelKey,
    pub(crate) session: SessionHandle,
    /// Its hub: instance id, or address of an original hub.
    pub(crate) hub: String,
}

/// The live tunnels.
pub(crate) struct Tunnels {
    entries: Mutex<Vec<Entry>>,
    next_key: AtomicU64,
    /// Where the choice of a tunnel for each client is announced.
    events: broadcast::Sender<EdgeEvent>,
    /// How long an open may stay unconfirmed before it moves to another tunnel (at least).
    confirm_within: Duration,
    /// Opens moved to another tunnel.
    opens_retried: prometheus::IntCounter,
}

impl Tunnels {
    /// No tunnels yet; opens move after `confirm_within` without confirmation, counted in
    /// `opens_retried`.
    pub(crate) fn new(
        events: broadcast::Sender<EdgeEvent>,
        confirm_within: Duration,
        opens_retried: prometheus::IntCounter,
    ) -> Self {
        Self {
            entries: Mutex::default(),
            next_key: AtomicU64::new(0),
            events,
            confirm_within,
            opens_retried,
        }
    }

    /// How long an open may stay unconfirmed before it moves (at least).
    pub(crate) fn confirm_within(&self) -> Duration {
        self.confirm_within
    }

    /// Counts an open moved to another tunnel.
    pub(crate) fn open_retried(&self) {
        self.opens_retried.inc();
    }

    /// Announces a client's stream (TCP) or session (UDP) opened on the `picked` tunnel.
    pub(crate) fn announce(
        &self,
        picked: &Picked,
        protocol: Protocol,
        client: SocketAddr,
        edge_port: u16,
    ) {
        let _ = self.events.send(EdgeEvent::ClientOpened {
            protocol,
            client_addr: client,
            edge_port,
            hub: picked.hub.clone(),
        });
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an active tunnel to the hub `hub_id` (`None`: an original hub, known by its
    /// address); its key, or `None` if the edge already has an active tunnel to that hub (a
    /// draining one may be replaced by a tunnel to the same hub).
    pub(crate) fn add(
        &self,
        session: &SessionHandle,
        hub_id: Option<&str>,
        address: &str,
    ) -> Option<TunnelKey> {
        let mut entries = self.entries();
        let hub = hub_name(hub_id, address);
        if entries
            .iter()
            .any(|entry| entry.hub() == hub && entry.state() == TunnelState::Active)
        {
            return None;
        }
        let key = self.next_key.fetch_add(1, Ordering::Relaxed) + 1;
        entries.push(Entry {
            key,
            session: session.clone(),
            hub_id: hub_id.map(str::to_owned),
            address: address.to_owned(),
            state: TunnelState::Active,
            since: SystemTime::now(),
        });
        Some(key)
    }

    /// Forgets a tunnel; how many remain.
    pub(crate) fn remove(&self, key: TunnelKey) -> usize {
        let mut entries = self.entries();
        entries.retain(|entry| entry.key != key);
        entries.len()
    }

    /// Takes a tunnel out of the choice for new streams, as `state` says why.
    pub(crate) fn retire(&self, key: TunnelKey, state: TunnelState) {
        if let Some(entry) = self.entries().iter_mut().find(|entry| entry.key == key) {
            entry.state = state;
        }
    }

    /// The tunnel for a new stream or UDP session: the open active one with the least load,
    /// else an open draining one (its hub still serves streams for its grace period), else a
    /// suspect one.
    pub(crate) fn pick(&self) -> Option<Picked> {
        self.pick_except(&[])
    }

    /// As [`Self::pick`], among the tunnels not in `tried`.
    pub(crate) fn pick_except(&self, tried: &[TunnelKey]) -> Option<Picked> {
        let entries = self.entries();
        let open = entries
            .iter()
            .filter(|entry| !entry.session.is_closed() && !tried.contains(&entry.key));
        let best = |state| {
            open.clone()
                .filter(|entry| entry.state() == state)
                .min_by_key(|entry| entry.load())
        };
        best(TunnelState::Active)
            .or_else(|| best(TunnelState::Draining))
            .or_else(|| best(TunnelState::Suspect))
            .map(|entry| Picked {
                key: entry.key,
                session: entry.session.clone(),
                hub: entry.hub().to_owned(),
            })
    }

    /// True if an open tunnel other than `key` is up.
    pub(crate) fn has_other(&self, key: TunnelKey) -> bool {
        self.entries()
            .iter()
            .any(|entry| entry.key != key && !entry.session.is_closed())
    }

    /// True if an active tunnel dialled this address.
    pub(crate) fn holds_address(&self, address: &str) -> bool {
        self.entries()
            .iter()
            .any(|entry| entry.address == address && entry.state() == TunnelState::Active)
    }

    /// The sessions of all tunnels.
    pub(crate) fn sessions(&self) -> Vec<SessionHandle> {
        self.entries()
            .iter()
            .map(|entry| entry.session.clone())
            .collect()
    }

    /// The tunnels as the status API shows them, oldest first.
    pub(crate) fn statuses(&self) -> Vec<TunnelStatus> {
        self.entries()
            .iter()
            .map(|entry| TunnelStatus {
                hub_id: entry.hub_id.clone(),
                address: entry.address.clone(),
                transport: entry.session.transport(),
                state: entry.state(),
                active_streams: entry.session.active_streams(),
                active_udp_sessions: entry.session.stats().udp_sessions.load(Ordering::Relaxed),
                udp_dropped: entry.session.stats().udp_dropped.load(Ordering::Relaxed),
                rtt: entry.session.rtt(),
                connected_since: entry.since,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use bytes::Bytes;
    use remoteingress_tunnel::{spawn_session, Role, SessionOptions};
    use remoteingress_wire::extension::Extensions;

    fn session() -> (SessionHandle, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let (session, _events) = spawn_session(
            ours,
            Bytes::new(),
            Role::Edge,
            SessionOptions::default(),
            Extensions::NONE,
        );
        (session, theirs)
    }

    #[tokio::test]
    async fn new_streams_go_to_the_least_loaded_active_tunnel() {
        let retried = prometheus::IntCounter::new("retried", "retried").unwrap();
        let tunnels = Tunnels::new(broadcast::channel(1).0, Duration::from_secs(1), retried);
        assert!(tunnels.pick().is_none());
        let (a, _peer_a) = session();
        let (b, _peer_b) = session();
        let key_a = tunnels.add(&a, Some("hub-a"), "h:1").unwrap();
        let key_b = tunnels.add(&b, Some("hub-b"), "h:1").unwrap();
        assert_eq!(
            tunnels.add(&b, Some("hub-a"), "h:2"),
            None,
            "one tunnel per hub"
        );
        let (original, _peer) = session();
        let key_original = tunnels.add(&original, None, "h:9").unwrap();
        assert_eq!(tunnels.add(&original, None, "h:9"), None);
        assert!(tunnels.holds_address("h:9"));
        assert!(tunnels.has_other(key_original));
        tunnels.remove(key_original);

        a.stats().udp_sessions.store(3, Ordering::Relaxed);
        assert_eq!(tunnels.pick().map(|picked| picked.key), Some(key_b));
        tunnels.retire(key_b, TunnelState::Draining);
        assert_eq!(tunnels.pick().map(|picked| picked.key), Some(key_a));
        a.close("gone");
        assert_eq!(
            tunnels.pick().map(|picked| picked.key),
            Some(key_b),
            "a draining tunnel rather than none"
        );
        assert_eq!(tunnels.remove(key_a), 1);
        assert_eq!(tunnels.statuses()[0].state, TunnelState::Draining);
        let (replacement, _peer_c) = session();
        assert!(
            tunnels.add(&replacement, Some("hub-b"), "h:1").is_some(),
            "a draining tunnel's hub may be dialled again"
        );
    }
}
