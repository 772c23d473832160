//! Allowed edges and their live tunnels, and the reconciliation between the two when the
//! allowed set changes: a change is made to a draft of the allowed set, which goes live whole.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use remoteingress_tunnel::SessionHandle;
use remoteingress_wire::config::Protocol;
use remoteingress_wire::EdgeConfig;
use std::sync::LazyLock;
use tokio::sync::watch;

use crate::metrics::{Live, Totals};
use crate::quota::{EdgeLimits, EdgeQuota};
use crate::secret::StoredSecret;
use crate::store::StoredEdge;
use crate::target::TargetError;
use crate::{AllowedEdge, ConnectedEdge, EdgeInfo, PortTargets, TokenSecretError};

#[derive(Clone)]
struct EdgeRecord {
    secret: StoredSecret,
    /// The secret as last given to this process (never persisted), for connection tokens.
    plaintext: Option<String>,
    config: EdgeConfig,
    targets: PortTargets,
    /// Counts the pushes of this process, for acknowledgements.
    version: u64,
    /// How new the configuration is: the source's, or counted here when it gives none.
    generation: u64,
}

impl EdgeRecord {
    fn versioned_config(&self) -> EdgeConfig {
        EdgeConfig {
            version: Some(self.version),
            generation: Some(self.generation),
            ..self.config.clone()
        }
    }
}

/// Why a write was refused: its generation would not order it against what the hub has, so
/// an edge (or the other replicas) could not tell which configuration is current.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerationConflict {
    /// The write has no generation, so edges could not order it against other hubs' configs.
    #[error("edge {0:?}: a hub running as one of several replicas needs a `generation` on every edge write")]
    Required(String),
    /// The write is older than what this hub has.
    #[error("edge {edge:?}: generation {given} is older than the current generation {current}")]
    Stale {
        /// Edge id.
        edge: String,
        /// The write's generation.
        given: u64,
        /// The hub's.
        current: u64,
    },
    /// Same generation as what this hub has, different content: edges would refuse it.
    #[error("edge {edge:?}: generation {generation} already names a different configuration; raise the generation to change it")]
    Conflicting {
        /// Edge id.
        edge: String,
        /// The generation both name.
        generation: u64,
    },
}

/// Compared against for unknown ids, so that timing does not tell whether an id exists.
static UNKNOWN_EDGE_SECRET: LazyLock<StoredSecret> = LazyLock::new(|| StoredSecret::new(""));

/// What the configuration of a tunnel should be; its pusher sends each new value.
pub(crate) type OwedConfig = watch::Receiver<Option<EdgeConfig>>;

/// A live tunnel of an edge.
pub(crate) struct Connection {
    pub(crate) id: u64,
    pub(crate) session: SessionHandle,
    pub(crate) since: SystemTime,
    pub(crate) remote_addr: SocketAddr,
    /// The newest configuration owed to this tunnel, for its pusher.
    owed: watch::Sender<Option<EdgeConfig>>,
    pub(crate) rtt: Option<Duration>,
    pub(crate) public_ip: Option<std::net::IpAddr>,
}

/// What a change of the allowed set means for live tunnels, carried out when it goes live.
#[derive(Clone)]
enum Effect {
    /// Send the edge its configuration on every tunnel.
    Push(String),
    /// Close the edge's tunnels.
    Disconnect(String, &'static str),
}

/// What an edge last acknowledged.
#[derive(Default)]
struct Acks {
    applied_version: Option<u64>,
    last_error: Option<String>,
}

/// The allowed edges and their configurations. A change is made to a copy (a draft), which is
/// persisted before it replaces the live set, so that the state file never lags behind.
#[derive(Clone, Default)]
pub(crate) struct AllowedSet {
    edges: BTreeMap<String, EdgeRecord>,
    /// What the changes made to this draft mean for live tunnels, in order.
    effects: Vec<Effect>,
    /// Every write must name a generation (several hubs serve the same edges).
    replica: bool,
}

impl AllowedSet {
    /// Replaces the whole set; refused whole if any write is refused.
    pub(crate) fn replace_all(
        &mut self,
        edges: Vec<AllowedEdge>,
    ) -> Result<(), GenerationConflict> {
        let keep: std::collections::HashSet<&str> = edges.iter().map(|e| e.id.as_str()).collect();
        let removed: Vec<String> = self
            .edges
            .keys()
            .filter(|id| !keep.contains(id.as_str()))
            .cloned()
            .collect();
        for id in removed {
            self.delete(&id);
        }
        edges.into_iter().try_for_each(|edge| self.upsert(edge))
    }

    /// Adds or replaces one edge.
    pub(crate) fn upsert(&mut self, edge: AllowedEdge) -> Result<(), GenerationConflict> {
        self.check_generation(&edge)?;
        let AllowedEdge {
            id,
            secret,
            config,
            targets,
        } = edge;
        let Some(record) = self.edges.get_mut(&id) else {
            self.edges.insert(
                id,
                EdgeRecord {
                    secret: StoredSecret::new(&secret),
                    plaintext: Some(secret),
                    generation: config.generation.unwrap_or(1),
                    config,
                    targets,
                    version: 1,
                },
            );
            return Ok(());
        };
        let secret_changed = !record.secret.matches(&secret);
        let content_changed = !record.config.same_content(&config);
        let generation = config.generation.unwrap_or(if content_changed {
            record.generation + 1
        } else {
            record.generation
        });
        let config_changed = content_changed || generation != record.generation;
        if secret_changed {
            record.secret = StoredSecret::new(&secret);
        }
        record.plaintext = Some(secret);
        record.config = config;
        record.targets = targets;
        record.generation = generation;
        if config_changed {
            record.version += 1;
        }
        if secret_changed {
            self.effects
                .push(Effect::Disconnect(id, "edge secret changed"));
        } else if config_changed {
            self.effects.push(Effect::Push(id));
        }
        Ok(())
    }

    /// Removes an edge; false if it was not configured.
    pub(crate) fn delete(&mut self, id: &str) -> bool {
        let found = self.edges.remove(id).is_some();
        if found {
            self.effects
                .push(Effect::Disconnect(id.to_owned(), "edge removed"));
        }
        found
    }

    /// Checks that a write's generation orders it: not older than this hub's, not the same
    /// generation for different content, and present at all in replica mode.
    fn check_generation(&self, edge: &AllowedEdge) -> Result<(), GenerationConflict> {
        let Some(given) = edge.config.generation else {
            return match self.replica {
                true => Err(GenerationConflict::Required(edge.id.clone())),
                false => Ok(()),
            };
        };
        let Some(record) = self.edges.get(&edge.id) else {
            return Ok(());
        };
        if given < record.generation {
            return Err(GenerationConflict::Stale {
                edge: edge.id.clone(),
                given,
                current: record.generation,
            });
        }
        if given == record.generation && !record.config.same_content(&edge.config) {
            return Err(GenerationConflict::Conflicting {
                edge: edge.id.clone(),
                generation: given,
            });
        }
        Ok(())
    }

    /// The allowed edges as persisted.
    pub(crate) fn snapshot(&self) -> Vec<StoredEdge> {
        self.edges
            .iter()
            .map(|(id, record)| StoredEdge {
                id: id.clone(),
                secret_hash: record.secret.encode(),
                config: record.config.clone(),
                targets: record.targets.clone(),
                generation: record.generation,
            })
            .collect()
    }

    /// Persisted edges, in a set that requires generations if `replica`.
    pub(crate) fn restore(edges: Vec<StoredEdge>, replica: bool) -> Result<Self, String> {
        let mut set = Self {
            replica,
            ..Self::default()
        };
        for edge in edges {
            let secret = StoredSecret::decode(&edge.secret_hash)
                .ok_or_else(|| format!("edge {:?}: unreadable secret hash", edge.id))?;
            set.edges.insert(
                edge.id,
                EdgeRecord {
                    secret,
                    plaintext: None,
                    config: edge.config,
                    targets: edge.targets,
                    generation: edge.generation.max(1),
                    version: 1,
                },
            );
        }
        Ok(set)
    }
}

/// Allowed edges and their live tunnels.
#[derive(Default)]
pub(crate) struct Registry {
    allowed: AllowedSet,
    /// What each allowed edge last acknowledged.
    acks: HashMap<String, Acks>,
    /// Live tunnels per edge: one, or several from an edge that keeps tunnels to several hubs
    /// (and may reach this one twice through a load balancer before it knows).
    connections: HashMap<String, Vec<Connection>>,
    next_connection_id: u64,
    /// Traffic of ended tunnels per edge, so that metrics never go backwards.
    ended: HashMap<String, Totals>,
    /// What each edge with tunnels (or with streams still ending) holds across them.
    quotas: HashMap<String, Arc<EdgeQuota>>,
    /// Tunnels accepted by their handshake and not attached yet, per edge: they count
    /// towards the hub's edge limit from the accept line on.
    arriving: HashMap<String, usize>,
}

/// A tunnel the registry took in.
pub(crate) struct Attached {
    /// Tells the edge's tunnels apart.
    pub(crate) connection_id: u64,
    /// The configurations the tunnel is owed.
    pub(crate) owed: OwedConfig,
    /// The edge's quota, shared by all its tunnels.
    pub(crate) quota: Arc<EdgeQuota>,
}

impl Registry {
    /// A registry serving `allowed`.
    pub(crate) fn new(allowed: AllowedSet) -> Self {
        Self {
            allowed,
            ..Self::default()
        }
    }

    /// A copy of the allowed set to change.
    pub(crate) fn draft(&self) -> AllowedSet {
        self.allowed.clone()
    }

    /// Makes a changed copy of the allowed set live: removed edges and edges whose secret
    /// changed are disconnected, the others are owed their new configuration on every tunnel.
    pub(crate) fn install(&mut self, mut allowed: AllowedSet) {
        let effects = std::mem::take(&mut allowed.effects);
        self.allowed = allowed;
        let edges = &self.allowed.edges;
        self.acks.retain(|id, _| edges.contains_key(id));
        for effect in effects {
            match effect {
                Effect::Push(id) => self.owe_current_config(&id),
                Effect::Disconnect(id, reason) => {
                    self.disconnect(&id, reason);
                }
            }
        }
    }

    /// Owes every tunnel of `id` the edge's current configuration.
    fn owe_current_config(&mut self, id: &str) {
        let Some(record) = self.allowed.edges.get(id) else {
            return;
        };
        for connection in self.connections.get(id).into_iter().flatten() {
            connection
                .owed
                .send_replace(Some(record.versioned_config()));
        }
    }

    /// The secret of an edge if `given` matches it, or the one this process was last told.
    pub(crate) fn token_secret(
        &self,
        id: &str,
        given: Option<&str>,
    ) -> Result<String, TokenSecretError> {
        let record = self
            .allowed
            .edges
            .get(id)
            .ok_or(TokenSecretError::UnknownEdge)?;
        match (given, &record.plaintext) {
            (Some(given), _) if record.secret.matches(given) => Ok(given.to_owned()),
            (Some(_), _) => Err(TokenSecretError::Mismatch),
            (None, Some(plaintext)) => Ok(plaintext.clone()),
            (None, None) => Err(TokenSecretError::OnlyHashKnown),
        }
    }

    /// Forgets an edge's tunnels that match `which`, keeping their traffic in the totals.
    fn take_connections(
        &mut self,
        id: &str,
        which: impl Fn(&Connection) -> bool,
    ) -> Vec<Connection> {
        let Some(all) = self.connections.get_mut(id) else {
            return Vec::new();
        };
        let (taken, kept): (Vec<Connection>, Vec<Connection>) =
            std::mem::take(all).into_iter().partition(which);
        if kept.is_empty() {
            self.connections.remove(id);
            // Kept while streams of its last tunnels still end, so that they count on.
            if self.quotas.get(id).is_some_and(|quota| quota.is_unused()) {
                self.quotas.remove(id);
            }
        } else {
            *all = kept;
            self.share_budget(id);
        }
        let totals = self.ended.entry(id.to_owned()).or_default();
        for connection in &taken {
            totals.add(Totals::of(connection.session.stats()));
        }
        taken
    }

    /// The sessions of one edge's live tunnels.
    pub(crate) fn sessions_of(&self, id: &str) -> Vec<SessionHandle> {
        self.connections
            .get(id)
            .into_iter()
            .flatten()
            .map(|c| c.session.clone())
            .collect()
    }

    /// Every live tunnel's session.
    pub(crate) fn sessions(&self) -> Vec<SessionHandle> {
        self.connections
            .values()
            .flatten()
            .map(|c| c.session.clone())
            .collect()
    }

    pub(crate) fn disconnect(&mut self, id: &str, reason: &str) -> bool {
        let taken = self.take_connections(id, |_| true);
        for connection in &taken {
            connection.session.close(reason);
        }
        !taken.is_empty()
    }

    pub(crate) fn disconnect_all(&mut self, reason: &str) {
        let ids: Vec<String> = self.connections.keys().cloned().collect();
        for id in ids {
            self.disconnect(&id, reason);
        }
    }

    /// Edges with at least one live tunnel.
    pub(crate) fn connected_edge_count(&self) -> usize {
        self.connections.len()
    }

    /// Takes a place for a tunnel of `edge_id` whose handshake is about to be accepted; false
    /// if that would make the hub serve more than `max_edges` edges (0: no limit). An edge
    /// already here, or arriving, may always add a tunnel. The place is given back by
    /// [`Registry::attach`] or [`Registry::give_place_back`].
    pub(crate) fn take_place(&mut self, edge_id: &str, max_edges: usize) -> bool {
        let known = self.connections.contains_key(edge_id) || self.arriving.contains_key(edge_id);
        if max_edges > 0 && !known {
            let new_arrivals = self
                .arriving
                .keys()
                .filter(|id| !self.connections.contains_key(*id))
                .count();
            if self.connections.len() + new_arrivals >= max_edges {
                return false;
            }
        }
        *self.arriving.entry(edge_id.to_owned()).or_default() += 1;
        true
    }

    /// Gives back the place of a tunnel of `edge_id` that will not be attached.
    pub(crate) fn give_place_back(&mut self, edge_id: &str) {
        if let Some(count) = self.arriving.get_mut(edge_id) {
            *count -= 1;
            if *count == 0 {
                self.arriving.remove(edge_id);
            }
        }
    }

    /// Per edge with traffic: what is open now, and all traffic so far.
    pub(crate) fn traffic(&self) -> Vec<(String, Option<Live>, Totals)> {
        let mut ids: Vec<&String> = self.ended.keys().chain(self.connections.keys()).collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .map(|id| {
                let mut totals = self.ended.get(id).copied().unwrap_or_default();
                let live = self.connections.get(id).map(|connections| {
                    let mut live = Live::default();
                    for c in connections {
                        let stats = c.session.stats();
                        totals.add(Totals::of(stats));
                        live.streams += c.session.active_streams();
                        live.udp_sessions += stats.udp_sessions.load(Ordering::Relaxed);
                    }
                    live
                });
                (id.clone(), live, totals)
            })
            .collect()
    }

    /// Checks credentials in constant time; the versioned config to send on success.
    pub(crate) fn authenticate(&self, id: &str, secret: &str) -> Option<EdgeConfig> {
        match self.allowed.edges.get(id) {
            Some(record) => record
                .secret
                .matches(secret)
                .then(|| record.versioned_config()),
            None => {
                let _ = UNKNOWN_EDGE_SECRET.matches(secret);
                None
            }
        }
    }

    /// Registers a new tunnel, replacing any previous one of an edge that does not keep several
    /// tunnels. Fails if the edge was removed or its secret changed since it authenticated.
    /// Returns the tunnel's id, the configurations it is owed from now on (already the current
    /// one if it changed since `sent_version` was sent), and the edge's quota.
    pub(crate) fn attach(
        &mut self,
        edge_id: &str,
        secret: &str,
        session: SessionHandle,
        remote_addr: SocketAddr,
        sent_version: u64,
        limits: EdgeLimits,
    ) -> Result<Attached, ()> {
        self.give_place_back(edge_id);
        let record = self.allowed.edges.get(edge_id).ok_or(())?;
        if !record.secret.matches(secret) {
            return Err(());
        }
        let (owed, owed_receiver) = watch::channel(None);
        if record.version != sent_version {
            owed.send_replace(Some(record.versioned_config()));
        }
        self.next_connection_id += 1;
        let id = self.next_connection_id;
        // An edge that keeps several tunnels (it confirmed DRAIN) manages them itself; any
        // other edge connecting again has lost its previous tunnel.
        let replaced = self.take_connections(edge_id, |c| !c.session.agreed().drain);
        // An edge keeps at most `limits.tunnels`: each costs the hub a session of its own and
        // thins the edge's budget. The oldest go, as a newer tunnel is the likelier to be alive.
        let oldest: Vec<u64> = self.connections.get(edge_id).map_or_else(Vec::new, |kept| {
            let excess = (kept.len() + 1).saturating_sub(limits.tunnels.max(1));
            kept.iter().take(excess).map(|c| c.id).collect()
        });
        let evicted = self.take_connections(edge_id, |c| oldest.contains(&c.id));
        for tunnel in evicted {
            tunnel
                .session
                .close("replaced: the edge keeps too many tunnels to this hub");
        }
        self.connections
            .entry(edge_id.to_owned())
            .or_default()
            .push(Connection {
                id,
                session,
                since: SystemTime::now(),
                remote_addr,
                owed,
                rtt: None,
                public_ip: None,
            });
        for previous in replaced {
            previous
                .session
                .close("replaced by a newer connection of the same edge");
        }
        let quota = self
            .quotas
            .entry(edge_id.to_owned())
            .or_insert_with(|| Arc::new(EdgeQuota::new(limits)))
            .clone();
        self.share_budget(edge_id);
        Ok(Attached {
            connection_id: id,
            owed: owed_receiver,
            quota,
        })
    }

    /// The flow budget a new tunnel of `edge_id` starts with: its share once it is attached.
    pub(crate) fn budget_for_new_tunnel(&self, edge_id: &str, limits: EdgeLimits) -> u64 {
        limits.budget_share(self.connections.get(edge_id).map_or(0, Vec::len) + 1)
    }

    /// Shares the edge's flow budget out equally among the tunnels it has now.
    fn share_budget(&self, edge_id: &str) {
        let (Some(quota), Some(tunnels)) =
            (self.quotas.get(edge_id), self.connections.get(edge_id))
        else {
            return;
        };
        let share = quota.budget_share(tunnels.len());
        for tunnel in tunnels {
            tunnel.session.set_budget(share);
        }
    }

    /// Forgets a tunnel if the edge still has it.
    pub(crate) fn detach(&mut self, edge_id: &str, connection_id: u64) {
        self.take_connections(edge_id, |c| c.id == connection_id);
    }

    fn connection_mut(&mut self, edge_id: &str, connection_id: u64) -> Option<&mut Connection> {
        self.connections
            .get_mut(edge_id)?
            .iter_mut()
            .find(|c| c.id == connection_id)
    }

    pub(crate) fn record_ack(&mut self, edge_id: &str, version: u64, error: Option<String>) {
        if !self.allowed.edges.contains_key(edge_id) {
            return;
        }
        let acks = self.acks.entry(edge_id.to_owned()).or_default();
        match error {
            None => {
                acks.applied_version = Some(version);
                acks.last_error = None;
            }
            Some(error) => acks.last_error = Some(error),
        }
    }

    pub(crate) fn record_rtt(&mut self, edge_id: &str, connection_id: u64, rtt: Duration) -> bool {
        match self.connection_mut(edge_id, connection_id) {
            Some(connection) => {
                connection.rtt = Some(rtt);
                true
            }
            None => false,
        }
    }

    pub(crate) fn is_configured(&self, edge_id: &str) -> bool {
        self.allowed.edges.contains_key(edge_id)
    }

    pub(crate) fn record_public_ip(
        &mut self,
        edge_id: &str,
        connection_id: u64,
        ip: std::net::IpAddr,
    ) {
        if let Some(connection) = self.connection_mut(edge_id, connection_id) {
            connection.public_ip = Some(ip);
        }
    }

    /// Where a connection the edge accepted on `edge_port` goes: its own target host, if it has
    /// one, and the target port. Only ports assigned to the edge for that protocol lead anywhere.
    pub(crate) fn target(
        &self,
        edge_id: &str,
        protocol: Protocol,
        edge_port: u16,
    ) -> Result<(Option<String>, u16), TargetError> {
        let record = self
            .allowed
            .edges
            .get(edge_id)
            .ok_or(TargetError::EdgeGone)?;
        let assigned = match protocol {
            Protocol::Tcp => &record.config.listen_ports,
            Protocol::Udp => &record.config.listen_ports_udp,
        };
        if !assigned.contains(&edge_port) {
            return Err(TargetError::NotAssigned {
                protocol,
                port: edge_port,
            });
        }
        let targets = &record.targets;
        Ok((
            targets.host(edge_port).map(str::to_owned),
            targets.port(edge_port),
        ))
    }

    pub(crate) fn list(&self) -> Vec<EdgeInfo> {
        self.allowed
            .edges
            .iter()
            .map(|(id, record)| {
                let acks = self.acks.get(id);
                EdgeInfo {
                    id: id.clone(),
                    config: record.config.clone(),
                    targets: record.targets.clone(),
                    connected: self.connections.contains_key(id),
                    desired_version: record.version,
                    generation: record.generation,
                    applied_version: acks.and_then(|a| a.applied_version),
                    last_error: acks.and_then(|a| a.last_error.clone()),
                }
            })
            .collect()
    }

    pub(crate) fn connected(&self) -> Vec<ConnectedEdge> {
        let mut edges: Vec<ConnectedEdge> = self
            .connections
            .iter()
            .flat_map(|(id, connections)| connections.iter().map(move |c| (id, c)))
            .map(|(id, c)| {
                let stats = c.session.stats();
                ConnectedEdge {
                    id: id.clone(),
                    connected_since: c.since,
                    remote_addr: c.remote_addr,
                    transport: c.session.transport(),
                    active_streams: c.session.active_streams(),
                    bytes_in: stats.bytes_in.load(Ordering::Relaxed),
                    bytes_out: stats.bytes_out.load(Ordering::Relaxed),
                    peak_stream_buffer: stats.peak_stream_buffer.load(Ordering::Relaxed),
                    active_udp_sessions: stats.udp_sessions.load(Ordering::Relaxed),
                    udp_dropped: stats.udp_dropped.load(Ordering::Relaxed),
                    rtt: c.rtt,
                    public_ip: c.public_ip,
                }
            })
            .collect();
        edges.sort_by(|a, b| (&a.id, a.connected_since).cmp(&(&b.id, b.connected_since)));
        edges
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use bytes::Bytes;
    use remoteingress_tunnel::{spawn_session, CloseReason, Role, SessionOptions};

    const ADDR: &str = "192.0.2.7:40000";
    const LIMITS: EdgeLimits = EdgeLimits {
        tunnels: 8,
        streams: 100,
        udp_sessions: 10,
        budget: 8 * 1024 * 1024,
    };

    /// A live hub session whose peer end is kept open by the returned stream.
    fn live_session() -> (SessionHandle, tokio::io::DuplexStream) {
        session_agreeing(remoteingress_wire::extension::Extensions::NONE)
    }

    fn session_agreeing(
        agreed: remoteingress_wire::extension::Extensions,
    ) -> (SessionHandle, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (session, _events) = spawn_session(
            ours,
            Bytes::new(),
            Role::Hub,
            SessionOptions::default(),
            agreed,
        );
        (session, theirs)
    }

    fn edge(id: &str, secret: &str, ports: &[u16]) -> AllowedEdge {
        AllowedEdge::new(id, secret, ports.to_vec())
    }

    /// Makes one change live, as the hub does once it is persisted.
    fn change(
        registry: &mut Registry,
        apply: impl FnOnce(&mut AllowedSet) -> Result<(), GenerationConflict>,
    ) -> Result<(), GenerationConflict> {
        let mut draft = registry.draft();
        apply(&mut draft)?;
        registry.install(draft);
        Ok(())
    }

    fn upsert(registry: &mut Registry, edge: AllowedEdge) {
        change(registry, |allowed| allowed.upsert(edge)).unwrap();
    }

    fn replace_all(registry: &mut Registry, edges: Vec<AllowedEdge>) {
        change(registry, |allowed| allowed.replace_all(edges)).unwrap();
    }

    fn attached(registry: &mut Registry, id: &str, session: &SessionHandle) -> Attached {
        let version = registry.authenticate(id, "s").unwrap().version.unwrap();
        registry
            .attach(
                id,
                "s",
                session.clone(),
                ADDR.parse().unwrap(),
                version,
                LIMITS,
            )
            .unwrap()
    }

    fn attach(registry: &mut Registry, id: &str, session: &SessionHandle) -> (u64, OwedConfig) {
        let attached = attached(registry, id, session);
        (attached.connection_id, attached.owed)
    }

    /// The configuration a tunnel is owed and not yet sent, marking it sent.
    fn take_owed(owed: &mut OwedConfig) -> Option<EdgeConfig> {
        if !owed.has_changed().unwrap_or(false) {
            return None;
        }
        owed.borrow_and_update().clone()
    }

    #[test]
    fn only_allowed_edges_with_their_secret_authenticate() {
        let mut registry = Registry::default();
        replace_all(&mut registry, vec![edge("a", "s", &[80])]);
        let config = registry.authenticate("a", "s").expect("allowed");
        assert_eq!(config.listen_ports, [80]);
        assert_eq!(config.version, Some(1));
        assert!(registry.authenticate("a", "wrong").is_none());
        assert!(registry.authenticate("b", "s").is_none());
        assert!(registry.is_configured("a"));
        assert!(!registry.is_configured("b"));

        replace_all(&mut registry, vec![edge("b", "s", &[])]);
        assert!(registry.authenticate("a", "s").is_none(), "a was replaced");
        assert!(registry.authenticate("b", "s").is_some());
    }

    #[tokio::test]
    async fn edges_count_towards_the_edge_limit_from_their_accept_line_on() {
        let mut registry = Registry::default();
        for id in ["a", "b"] {
            upsert(&mut registry, edge(id, "s", &[]));
        }
        assert!(registry.take_place("a", 1));
        assert!(
            !registry.take_place("b", 1),
            "a, not attached yet, holds the only place"
        );
        assert!(
            registry.take_place("a", 1),
            "an edge arriving may add a tunnel"
        );
        registry.give_place_back("a");
        let (session, _peer) = live_session();
        attached(&mut registry, "a", &session);
        assert!(!registry.take_place("b", 1), "a, attached, still holds it");
        registry.disconnect("a", "gone");
        assert!(
            registry.take_place("b", 1),
            "a's place is free once it is gone"
        );
        assert!(registry.take_place("c", 0), "no limit");
    }

    #[test]
    fn a_draft_changes_nothing_until_it_is_installed() {
        let mut registry = Registry::default();
        upsert(&mut registry, edge("a", "s", &[80]));
        let mut draft = registry.draft();
        draft.upsert(edge("a", "s", &[81])).unwrap();
        draft.delete("a");
        draft.upsert(edge("b", "s", &[82])).unwrap();
        assert_eq!(registry.list()[0].config.listen_ports, [80]);
        assert!(registry.authenticate("b", "s").is_none());
        drop(draft);
        assert_eq!(registry.list().len(), 1, "a dropped draft is forgotten");
    }

    #[test]
    fn targets_default_to_the_edge_port_unless_mapped() {
        let mut registry = Registry::default();
        let mut entry = edge("a", "s", &[80, 443]);
        entry.targets.ports.insert(443, 8443);
        entry.targets.hosts.insert(80, "10.96.0.7".into());
        entry.config.listen_ports_udp = vec![53];
        upsert(&mut registry, entry);
        let route = |edge: &str, protocol, port| registry.target(edge, protocol, port);
        let host = Some("10.96.0.7".to_owned());
        assert_eq!(route("a", Protocol::Tcp, 80).ok(), Some((host, 80)));
        assert_eq!(route("a", Protocol::Tcp, 443).ok(), Some((None, 8443)));
        assert_eq!(route("a", Protocol::Udp, 53).ok(), Some((None, 53)));
        assert!(matches!(
            route("b", Protocol::Tcp, 80),
            Err(TargetError::EdgeGone)
        ));
    }

    #[test]
    fn only_ports_assigned_to_the_edge_lead_anywhere() {
        let mut registry = Registry::default();
        let mut entry = edge("a", "s", &[80]);
        entry.config.listen_ports_udp = vec![53];
        upsert(&mut registry, entry);
        for (protocol, port) in [
            (Protocol::Tcp, 22),
            (Protocol::Tcp, 53),
            (Protocol::Udp, 80),
            (Protocol::Udp, 54),
        ] {
            assert!(
                matches!(
                    registry.target("a", protocol, port),
                    Err(TargetError::NotAssigned { protocol: p, port: n }) if p == protocol && n == port
                ),
                "{protocol} {port} must be refused"
            );
        }
    }

    #[tokio::test]
    async fn versions_rise_only_when_the_config_changes_and_reach_the_connected_edge() {
        let mut registry = Registry::default();
        upsert(&mut registry, edge("a", "s", &[80]));
        let (session, _peer) = live_session();
        let (_, mut owed) = attach(&mut registry, "a", &session);
        assert_eq!(
            take_owed(&mut owed),
            None,
            "the edge got the current version at connect"
        );

        upsert(&mut registry, edge("a", "s", &[80]));
        assert_eq!(
            take_owed(&mut owed),
            None,
            "an unchanged config is not pushed"
        );
        assert_eq!(registry.list()[0].desired_version, 1);

        upsert(&mut registry, edge("a", "s", &[80, 443]));
        let pushed = take_owed(&mut owed).expect("the change is owed");
        assert_eq!(pushed.version, Some(2));
        assert_eq!(pushed.listen_ports, [80, 443]);
        assert_eq!(registry.list()[0].desired_version, 2);
    }

    #[tokio::test]
    async fn a_change_made_during_the_handshake_is_sent_after_attach() {
        let mut registry = Registry::default();
        upsert(&mut registry, edge("a", "s", &[80]));
        let sent = registry.authenticate("a", "s").unwrap().version.unwrap();
        upsert(&mut registry, edge("a", "s", &[81]));
        let (session, _peer) = live_session();
        let mut owed = registry
            .attach("a", "s", session, ADDR.parse().unwrap(), sent, LIMITS)
            .unwrap()
            .owed;
        let newer = take_owed(&mut owed).expect("the newer config follows");
        assert_eq!(newer.version, Some(2));
        assert_eq!(newer.listen_ports, [81]);
    }

    #[tokio::test]
    async fn a_tunnel_that_attaches_between_draft_and_install_gets_the_change() {
        let mut registry = Registry::default();
        upsert(&mut registry, edge("a", "s", &[80]));
        let mut draft = registry.draft();
        draft.upsert(edge("a", "s", &[81])).unwrap();
        let (session, _peer) = live_session();
        let (_, mut owed) = attach(&mut registry, "a", &session);
        registry.install(draft);
        let owed = take_owed(&mut owed).expect("the change reaches the new tunnel");
        assert_eq!(owed.listen_ports, [81]);
    }

    #[test]
    fn acks_record_the_applied_version_and_errors_keep_it() {
        let mut registry = Registry::default();
        upsert(&mut registry, edge("a", "s", &[80]));
        registry.record_ack("a", 1, None);
        let info = &registry.list()[0];
        assert_eq!(
            (info.applied_version, info.last_error.clone()),
            (Some(1), None)
        );
        registry.record_ack("a", 2, Some("port 80 in use".into()));
        let info = &registry.list()[0];
        assert_eq!(
            info.applied_version,
            Some(1),
            "a failed version is not applied"
        );
        assert_eq!(info.last_error.as_deref(), Some("port 80 in use"));
        upsert(&mut registry, edge("a", "s", &[81]));
        assert_eq!(
            registry.list()[0].applied_version,
            Some(1),
            "a change keeps what the edge acknowledged"
        );
        registry.record_ack("a", 3, None);
        assert_eq!(registry.list()[0].last_error, None);
        registry.record_ack("unknown", 1, None);
        change(&mut registry, |allowed| {
            allowed.delete("a");
            Ok(())
        })
        .unwrap();
        upsert(&mut registry, edge("a", "s", &[80]));
        assert_eq!(
            registry.list()[0].applied_version,
            None,
            "a removed edge's acknowledgements go with it"
        );
    }

    #[tokio::test]
    async fn a_second_tunnel_of_the_same_edge_takes_over() {
        let mut registry = Registry::default();
        upsert(&mut registry, edge("a", "s", &[80]));
        let (first, _first_peer) = live_session();
        let (second, _second_peer) = live_session();
        let (first_id, _) = attach(&mut registry, "a", &first);
        let (second_id, _) = attach(&mut registry, "a", &second);
        assert_ne!(first_id, second_id);
        assert_eq!(registry.connected_edge_count(), 1);
        assert_eq!(
            first.close_reason(),
            Some(CloseReason::Local(
                "replaced by a newer connection of the same edge".into()
            ))
        );
        assert!(!second.is_closed());
        // The old tunnel ending later must not forget the new one.
        registry.detach("a", first_id);
        assert_eq!(registry.connected_edge_count(), 1);
        registry.detach("a", second_id);
        assert_eq!(registry.connected_edge_count(), 0);
    }

    /// The tunnels of one edge draw on one quota (streams, UDP sessions, the flow budget shared
    /// out as tunnels come and go), which outlives its last tunnel only while streams of it
    /// still end.
    #[tokio::test]
    async fn the_tunnels_of_one_edge_share_one_quota() {
        let mut registry = Registry::default();
        upsert(&mut registry, edge("a", "s", &[80]));
        let all = remoteingress_wire::extension::Extensions::ALL;
        let (first_session, _first_peer) = session_agreeing(all);
        let (second_session, _second_peer) = session_agreeing(all);
        let first = attached(&mut registry, "a", &first_session);
        let second = attached(&mut registry, "a", &second_session);
        let (first_quota, second_quota) = (&first.quota, &second.quota);
        assert!(Arc::ptr_eq(first_quota, second_quota));
        let budgets = |sessions: &[&SessionHandle]| -> Vec<u64> {
            sessions.iter().map(|s| s.budget()).collect()
        };
        let half = LIMITS.budget / 2;
        assert_eq!(budgets(&[&first_session, &second_session]), [half, half]);
        let held: Vec<_> = (0..LIMITS.streams)
            .map(|_| first_quota.stream().unwrap())
            .collect();
        assert!(
            second_quota.stream().is_none(),
            "a second tunnel doubled the streams"
        );

        registry.detach("a", first.connection_id);
        assert_eq!(
            second_session.budget(),
            LIMITS.budget,
            "the budget follows the tunnels"
        );
        registry.detach("a", second.connection_id);
        let (third_session, _third_peer) = session_agreeing(all);
        let third = attached(&mut registry, "a", &third_session);
        assert!(
            Arc::ptr_eq(&third.quota, first_quota),
            "streams still ending were forgotten"
        );
        drop(held);
        registry.detach("a", third.connection_id);
        let fourth = attached(&mut registry, "a", &third_session);
        assert!(!Arc::ptr_eq(&fourth.quota, first_quota));
    }

    /// An edge that may keep several tunnels keeps at most the cap; the oldest go first.
    #[tokio::test]
    async fn the_tunnels_of_one_edge_are_capped_and_the_oldest_go() {
        let mut registry = Registry::default();
        upsert(&mut registry, edge("a", "s", &[80]));
        let all = remoteingress_wire::extension::Extensions::ALL;
        let sessions: Vec<_> = (0..LIMITS.tunnels + 2)
            .map(|_| session_agreeing(all))
            .collect();
        for (session, _) in &sessions {
            attach(&mut registry, "a", session);
        }
        assert_eq!(registry.sessions_of("a").len(), LIMITS.tunnels);
        let closed: Vec<bool> = sessions.iter().map(|(s, _)| s.is_closed()).collect();
        let mut expected = vec![true, true];
        expected.extend(std::iter::repeat_n(false, LIMITS.tunnels));
        assert_eq!(closed, expected);
    }

    #[tokio::test]
    async fn an_edge_that_keeps_several_tunnels_keeps_them_all_and_gets_every_push() {
        let mut registry = Registry::default();
        upsert(&mut registry, edge("a", "s", &[80]));
        upsert(&mut registry, edge("b", "s", &[90]));
        let all = remoteingress_wire::extension::Extensions::ALL;
        let (first, _first_peer) = session_agreeing(all);
        let (second, _second_peer) = session_agreeing(all);
        let (third, _third_peer) = session_agreeing(all);
        let (first_id, mut first_owed) = attach(&mut registry, "a", &first);
        let (_, mut second_owed) = attach(&mut registry, "a", &second);
        let (_, mut third_owed) = attach(&mut registry, "a", &third);
        assert_eq!(
            registry.connected_edge_count(),
            1,
            "one edge, whatever its tunnels"
        );
        assert_eq!(registry.sessions_of("a").len(), 3);
        assert!(!first.is_closed() && !second.is_closed() && !third.is_closed());
        assert_eq!(registry.connected().len(), 3);
        upsert(&mut registry, edge("a", "s", &[80, 443]));
        for owed in [&mut first_owed, &mut second_owed, &mut third_owed] {
            let config = take_owed(owed).expect("every tunnel gets the new configuration");
            assert_eq!(config.listen_ports, [80, 443]);
        }
        // The path of UpdateAllowedEdges, which the operator uses, too.
        replace_all(
            &mut registry,
            vec![edge("a", "s", &[80, 444]), edge("b", "s", &[90])],
        );
        for owed in [&mut first_owed, &mut second_owed, &mut third_owed] {
            let config = take_owed(owed).expect("every tunnel gets the replaced set");
            assert_eq!(config.listen_ports, [80, 444]);
        }
        registry.detach("a", first_id);
        assert_eq!(registry.sessions_of("a").len(), 2);
        assert!(first_owed.changed().await.is_err(), "its pusher stops");
        assert!(registry.disconnect("a", "bye"));
        assert!(second.is_closed() && third.is_closed());
    }

    #[tokio::test]
    async fn changes_made_while_a_push_is_pending_leave_only_the_newest_owed() {
        let mut registry = Registry::default();
        upsert(&mut registry, edge("a", "s", &[80]));
        let (session, _peer) = live_session();
        let (_, mut owed) = attach(&mut registry, "a", &session);
        for port in 81..90 {
            upsert(&mut registry, edge("a", "s", &[port]));
        }
        let newest = take_owed(&mut owed).unwrap();
        assert_eq!(newest.listen_ports, [89]);
        assert_eq!(take_owed(&mut owed), None);
    }

    #[test]
    fn generations_are_the_sources_or_counted_on_change() {
        let mut registry = Registry::default();
        upsert(&mut registry, edge("a", "s", &[80]));
        let generation = |registry: &Registry| registry.list()[0].generation;
        assert_eq!(generation(&registry), 1);
        upsert(&mut registry, edge("a", "s", &[80]));
        assert_eq!(generation(&registry), 1, "no change, same generation");
        upsert(&mut registry, edge("a", "s", &[81]));
        assert_eq!(generation(&registry), 2);
        let mut explicit = edge("a", "s", &[81]);
        explicit.config.generation = Some(40);
        upsert(&mut registry, explicit);
        assert_eq!(generation(&registry), 40);
        assert_eq!(
            registry.authenticate("a", "s").unwrap().generation,
            Some(40)
        );
        upsert(&mut registry, edge("a", "s", &[82]));
        assert_eq!(
            generation(&registry),
            41,
            "counting goes on from the source's"
        );
    }

    #[test]
    fn a_given_generation_must_order_the_write() {
        for replica in [false, true] {
            let mut registry = Registry::new(AllowedSet {
                replica,
                ..AllowedSet::default()
            });
            let mut current = edge("a", "s", &[80]);
            let required = change(&mut registry, |a| a.upsert(current.clone()));
            match replica {
                true => assert_eq!(required, Err(GenerationConflict::Required("a".into()))),
                false => assert_eq!(required, Ok(())),
            }
            current.config.generation = Some(5);
            assert_eq!(change(&mut registry, |a| a.upsert(current.clone())), Ok(()));
            assert_eq!(
                change(&mut registry, |a| a.upsert(current.clone())),
                Ok(()),
                "idempotent"
            );
            let mut other = edge("a", "s", &[443]);
            other.config.generation = Some(5);
            assert!(matches!(
                change(&mut registry, |a| a.upsert(other.clone())),
                Err(GenerationConflict::Conflicting { generation: 5, .. })
            ));
            other.config.generation = Some(4);
            assert!(matches!(
                change(&mut registry, |a| a.upsert(other.clone())),
                Err(GenerationConflict::Stale {
                    given: 4,
                    current: 5,
                    ..
                })
            ));
            assert_eq!(
                registry.list()[0].config.listen_ports,
                [80],
                "nothing changed"
            );
            other.config.generation = Some(6);
            assert_eq!(change(&mut registry, |a| a.upsert(other.clone())), Ok(()));
            assert_eq!(registry.list()[0].generation, 6);
        }
    }

    #[tokio::test]
    async fn a_changed_secret_or_a_removal_disconnects_and_refuses_attach() {
        let mut registry = Registry::default();
        upsert(&mut registry, edge("a", "s", &[80]));
        let (session, _peer) = live_session();
        attach(&mut registry, "a", &session);
        upsert(&mut registry, edge("a", "new", &[80]));
        assert_eq!(
            session.close_reason(),
            Some(CloseReason::Local("edge secret changed".into()))
        );
        let (late, _late_peer) = live_session();
        assert!(
            registry
                .attach("a", "s", late, ADDR.parse().unwrap(), 1, LIMITS)
                .is_err(),
            "the old secret no longer attaches"
        );

        let (current, _current_peer) = live_session();
        registry
            .attach(
                "a",
                "new",
                current.clone(),
                ADDR.parse().unwrap(),
                1,
                LIMITS,
            )
            .unwrap();
        let mut found = false;
        change(&mut registry, |allowed| {
            found = allowed.delete("a");
            Ok(())
        })
        .unwrap();
        assert!(found);
        assert!(current.is_closed());
        assert_eq!(registry.connected_edge_count(), 0);
        assert!(!registry.draft().delete("a"));
    }
}
