//! Allowed edges and their live tunnels, and the reconciliation between the two when the
//! allowed set changes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use remoteingress_tunnel::SessionHandle;
use remoteingress_wire::config::Protocol;
use remoteingress_wire::frame::FrameType;
use remoteingress_wire::EdgeConfig;
use std::sync::LazyLock;

use crate::metrics::{Live, Totals};
use crate::secret::StoredSecret;
use crate::store::StoredEdge;
use crate::target::TargetError;
use crate::{
    AllowedEdge, ConnectedEdge, EdgeInfo, HubEvent, HubInner, PortTargets, TokenSecretError,
};

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
    applied_version: Option<u64>,
    last_error: Option<String>,
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

/// Why a write was refused in replica mode, where every hub of the tier must end up with the
/// same configuration at the same generation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaConflict {
    /// The write has no generation, so edges could not order it against other hubs' configs.
    #[error("edge {0:?}: a hub running as one of several replicas needs a `generation` on every edge write")]
    GenerationRequired(String),
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
    /// Same generation as what this hub has, different content: hubs would disagree.
    #[error("edge {edge:?}: generation {generation} already names a different configuration")]
    Conflicting {
        /// Edge id.
        edge: String,
        /// The generation both name.
        generation: u64,
    },
}

/// Compared against for unknown ids, so that timing does not tell whether an id exists.
static UNKNOWN_EDGE_SECRET: LazyLock<StoredSecret> = LazyLock::new(|| StoredSecret::new(""));

/// A live tunnel of an edge.
pub(crate) struct Connection {
    pub(crate) id: u64,
    pub(crate) session: SessionHandle,
    pub(crate) since: SystemTime,
    pub(crate) remote_addr: SocketAddr,
    pub(crate) sent_version: u64,
    pub(crate) rtt: Option<Duration>,
    pub(crate) public_ip: Option<std::net::IpAddr>,
}

/// A configuration to send to a connected edge.
pub(crate) struct Push {
    session: SessionHandle,
    edge_id: String,
    config: EdgeConfig,
}

#[derive(Default)]
pub(crate) struct Registry {
    edges: BTreeMap<String, EdgeRecord>,
    /// Live tunnels per edge: one, or several from an edge that keeps tunnels to several hubs
    /// (and may reach this one twice through a load balancer before it knows).
    connections: HashMap<String, Vec<Connection>>,
    next_connection_id: u64,
    /// Traffic of ended tunnels per edge, so that metrics never go backwards.
    ended: HashMap<String, Totals>,
}

impl Registry {
    pub(crate) fn replace_all(&mut self, edges: Vec<AllowedEdge>) -> Vec<Push> {
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
        edges
            .into_iter()
            .filter_map(|edge| self.upsert(edge).pop())
            .collect()
    }

    pub(crate) fn upsert(&mut self, edge: AllowedEdge) -> Vec<Push> {
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
                    applied_version: None,
                    last_error: None,
                },
            );
            return Vec::new();
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
            self.disconnect(&id, "edge secret changed");
            return Vec::new();
        }
        if !config_changed {
            return Vec::new();
        }
        let record = &self.edges[&id];
        let mut pushes = Vec::new();
        for connection in self.connections.get_mut(&id).into_iter().flatten() {
            connection.sent_version = record.version;
            pushes.push(Push {
                session: connection.session.clone(),
                edge_id: id.clone(),
                config: record.versioned_config(),
            });
        }
        pushes
    }

    /// Checks a write in replica mode: it names a generation, not older than this hub's, and
    /// not the same generation for different content.
    pub(crate) fn check_replica_write(&self, edge: &AllowedEdge) -> Result<(), ReplicaConflict> {
        let given = edge
            .config
            .generation
            .ok_or_else(|| ReplicaConflict::GenerationRequired(edge.id.clone()))?;
        let Some(record) = self.edges.get(&edge.id) else {
            return Ok(());
        };
        if given < record.generation {
            return Err(ReplicaConflict::Stale {
                edge: edge.id.clone(),
                given,
                current: record.generation,
            });
        }
        if given == record.generation && !record.config.same_content(&edge.config) {
            return Err(ReplicaConflict::Conflicting {
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

    /// Loads persisted edges into an empty registry.
    pub(crate) fn restore(&mut self, edges: Vec<StoredEdge>) -> Result<(), String> {
        for edge in edges {
            let secret = StoredSecret::decode(&edge.secret_hash)
                .ok_or_else(|| format!("edge {:?}: unreadable secret hash", edge.id))?;
            self.edges.insert(
                edge.id,
                EdgeRecord {
                    secret,
                    plaintext: None,
                    config: edge.config,
                    targets: edge.targets,
                    generation: edge.generation.max(1),
                    version: 1,
                    applied_version: None,
                    last_error: None,
                },
            );
        }
        Ok(())
    }

    /// The secret of an edge if `given` matches it, or the one this process was last told.
    pub(crate) fn token_secret(
        &self,
        id: &str,
        given: Option<&str>,
    ) -> Result<String, TokenSecretError> {
        let record = self.edges.get(id).ok_or(TokenSecretError::UnknownEdge)?;
        match (given, &record.plaintext) {
            (Some(given), _) if record.secret.matches(given) => Ok(given.to_owned()),
            (Some(_), _) => Err(TokenSecretError::Mismatch),
            (None, Some(plaintext)) => Ok(plaintext.clone()),
            (None, None) => Err(TokenSecretError::OnlyHashKnown),
        }
    }

    pub(crate) fn delete(&mut self, id: &str) -> (bool, Vec<Push>) {
        let found = self.edges.remove(id).is_some();
        self.disconnect(id, "edge removed");
        (found, Vec::new())
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
        } else {
            *all = kept;
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
        match self.edges.get(id) {
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
    /// tunnels. Fails if the edge
    /// was removed or its secret changed since it authenticated. May return a newer config.
    pub(crate) fn attach(
        &mut self,
        edge_id: &str,
        secret: &str,
        session: SessionHandle,
        remote_addr: SocketAddr,
        sent_version: u64,
    ) -> Result<(u64, Option<Push>), ()> {
        let record = self.edges.get(edge_id).ok_or(())?;
        if !record.secret.matches(secret) {
            return Err(());
        }
        let newer = (record.version != sent_version).then(|| Push {
            session: session.clone(),
            edge_id: edge_id.to_owned(),
            config: record.versioned_config(),
        });
        let version = record.version;
        self.next_connection_id += 1;
        let id = self.next_connection_id;
        // An edge that keeps several tunnels (it confirmed DRAIN) manages them itself; any
        // other edge connecting again has lost its previous tunnel.
        let replaced = self.take_connections(edge_id, |c| !c.session.agreed().drain);
        self.connections
            .entry(edge_id.to_owned())
            .or_default()
            .push(Connection {
                id,
                session,
                since: SystemTime::now(),
                remote_addr,
                sent_version: version,
                rtt: None,
                public_ip: None,
            });
        for previous in replaced {
            previous
                .session
                .close("replaced by a newer connection of the same edge");
        }
        Ok((id, newer))
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
        if let Some(record) = self.edges.get_mut(edge_id) {
            match error {
                None => {
                    record.applied_version = Some(version);
                    record.last_error = None;
                }
                Some(error) => record.last_error = Some(error),
            }
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
        self.edges.contains_key(edge_id)
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
        let record = self.edges.get(edge_id).ok_or(TargetError::EdgeGone)?;
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
        self.edges
            .iter()
            .map(|(id, record)| EdgeInfo {
                id: id.clone(),
                config: record.config.clone(),
                targets: record.targets.clone(),
                connected: self.connections.contains_key(id),
                desired_version: record.version,
                generation: record.generation,
                applied_version: record.applied_version,
                last_error: record.last_error.clone(),
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

/// Sends the configurations to their edges.
pub(crate) async fn perform(inner: &HubInner, pushes: Vec<Push>) {
    for push in pushes {
        let version = push.config.version.unwrap_or_default();
        let json = serde_json::to_vec(&push.config).unwrap_or_default();
        if push
            .session
            .send_control(FrameType::Config, Bytes::from(json))
            .await
            .is_ok()
        {
            tracing::info!(edge = %push.edge_id, version, "configuration pushed");
            inner
                .metrics
                .config_pushes
                .with_label_values(&[&push.edge_id])
                .inc();
            inner.emit(HubEvent::ConfigPushed {
                edge_id: push.edge_id,
                version,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use remoteingress_tunnel::{spawn_session, CloseReason, Role, SessionOptions};

    const ADDR: &str = "192.0.2.7:40000";

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

    fn attach(registry: &mut Registry, id: &str, session: &SessionHandle) -> (u64, Option<Push>) {
        let version = registry.authenticate(id, "s").unwrap().version.unwrap();
        registry
            .attach(id, "s", session.clone(), ADDR.parse().unwrap(), version)
            .unwrap()
    }

    #[test]
    fn only_allowed_edges_with_their_secret_authenticate() {
        let mut registry = Registry::default();
        assert!(registry.replace_all(vec![edge("a", "s", &[80])]).is_empty());
        let config = registry.authenticate("a", "s").expect("allowed");
        assert_eq!(config.listen_ports, [80]);
        assert_eq!(config.version, Some(1));
        assert!(registry.authenticate("a", "wrong").is_none());
        assert!(registry.authenticate("b", "s").is_none());
        assert!(registry.is_configured("a"));
        assert!(!registry.is_configured("b"));

        registry.replace_all(vec![edge("b", "s", &[])]);
        assert!(registry.authenticate("a", "s").is_none(), "a was replaced");
        assert!(registry.authenticate("b", "s").is_some());
    }

    #[test]
    fn targets_default_to_the_edge_port_unless_mapped() {
        let mut registry = Registry::default();
        let mut entry = edge("a", "s", &[80, 443]);
        entry.targets.ports.insert(443, 8443);
        entry.targets.hosts.insert(80, "10.96.0.7".into());
        entry.config.listen_ports_udp = vec![53];
        registry.upsert(entry);
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
        registry.upsert(entry);
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
        registry.upsert(edge("a", "s", &[80]));
        let (session, _peer) = live_session();
        let (_, newer) = attach(&mut registry, "a", &session);
        assert!(
            newer.is_none(),
            "the edge got the current version at connect"
        );

        assert!(
            registry.upsert(edge("a", "s", &[80])).is_empty(),
            "an unchanged config is not pushed"
        );
        assert_eq!(registry.list()[0].desired_version, 1);

        let pushes = registry.upsert(edge("a", "s", &[80, 443]));
        assert_eq!(pushes.len(), 1);
        assert_eq!(pushes[0].edge_id, "a");
        assert_eq!(pushes[0].config.version, Some(2));
        assert_eq!(pushes[0].config.listen_ports, [80, 443]);
        assert_eq!(registry.list()[0].desired_version, 2);
    }

    #[tokio::test]
    async fn a_change_made_during_the_handshake_is_sent_after_attach() {
        let mut registry = Registry::default();
        registry.upsert(edge("a", "s", &[80]));
        let sent = registry.authenticate("a", "s").unwrap().version.unwrap();
        registry.upsert(edge("a", "s", &[81]));
        let (session, _peer) = live_session();
        let (_, newer) = registry
            .attach("a", "s", session, ADDR.parse().unwrap(), sent)
            .unwrap();
        let newer = newer.expect("the newer config follows");
        assert_eq!(newer.config.version, Some(2));
        assert_eq!(newer.config.listen_ports, [81]);
    }

    #[test]
    fn acks_record_the_applied_version_and_errors_keep_it() {
        let mut registry = Registry::default();
        registry.upsert(edge("a", "s", &[80]));
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
        registry.record_ack("a", 3, None);
        assert_eq!(registry.list()[0].last_error, None);
        registry.record_ack("unknown", 1, None);
    }

    #[tokio::test]
    async fn a_second_tunnel_of_the_same_edge_takes_over() {
        let mut registry = Registry::default();
        registry.upsert(edge("a", "s", &[80]));
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

    #[tokio::test]
    async fn an_edge_that_keeps_several_tunnels_keeps_them_all_and_gets_every_push() {
        let mut registry = Registry::default();
        registry.upsert(edge("a", "s", &[80]));
        let all = remoteingress_wire::extension::Extensions::ALL;
        let (first, _first_peer) = session_agreeing(all);
        let (second, _second_peer) = session_agreeing(all);
        let (first_id, _) = attach(&mut registry, "a", &first);
        attach(&mut registry, "a", &second);
        assert_eq!(
            registry.connected_edge_count(),
            1,
            "one edge, whatever its tunnels"
        );
        assert_eq!(registry.sessions_of("a").len(), 2);
        assert!(!first.is_closed() && !second.is_closed());
        assert_eq!(registry.connected().len(), 2);
        let pushes = registry.upsert(edge("a", "s", &[80, 443]));
        assert_eq!(pushes.len(), 2, "every tunnel gets the new configuration");
        registry.detach("a", first_id);
        assert_eq!(registry.sessions_of("a").len(), 1);
        assert!(registry.disconnect("a", "bye"));
        assert!(second.is_closed());
    }

    #[test]
    fn generations_are_the_sources_or_counted_on_change() {
        let mut registry = Registry::default();
        registry.upsert(edge("a", "s", &[80]));
        let generation = |registry: &Registry| registry.list()[0].generation;
        assert_eq!(generation(&registry), 1);
        registry.upsert(edge("a", "s", &[80]));
        assert_eq!(generation(&registry), 1, "no change, same generation");
        registry.upsert(edge("a", "s", &[81]));
        assert_eq!(generation(&registry), 2);
        let mut explicit = edge("a", "s", &[81]);
        explicit.config.generation = Some(40);
        registry.upsert(explicit);
        assert_eq!(generation(&registry), 40);
        assert_eq!(
            registry.authenticate("a", "s").unwrap().generation,
            Some(40)
        );
    }

    #[test]
    fn replica_writes_need_a_generation_that_orders_them() {
        let mut registry = Registry::default();
        let mut current = edge("a", "s", &[80]);
        assert_eq!(
            registry.check_replica_write(&current),
            Err(ReplicaConflict::GenerationRequired("a".into()))
        );
        current.config.generation = Some(5);
        assert_eq!(registry.check_replica_write(&current), Ok(()));
        registry.upsert(current.clone());
        assert_eq!(registry.check_replica_write(&current), Ok(()), "idempotent");
        let mut other = edge("a", "s", &[443]);
        other.config.generation = Some(5);
        assert!(matches!(
            registry.check_replica_write(&other),
            Err(ReplicaConflict::Conflicting { generation: 5, .. })
        ));
        other.config.generation = Some(4);
        assert!(matches!(
            registry.check_replica_write(&other),
            Err(ReplicaConflict::Stale {
                given: 4,
                current: 5,
                ..
            })
        ));
        other.config.generation = Some(6);
        assert_eq!(registry.check_replica_write(&other), Ok(()));
    }

    #[tokio::test]
    async fn a_changed_secret_or_a_removal_disconnects_and_refuses_attach() {
        let mut registry = Registry::default();
        registry.upsert(edge("a", "s", &[80]));
        let (session, _peer) = live_session();
        attach(&mut registry, "a", &session);
        assert!(registry.upsert(edge("a", "new", &[80])).is_empty());
        assert_eq!(
            session.close_reason(),
            Some(CloseReason::Local("edge secret changed".into()))
        );
        let (late, _late_peer) = live_session();
        assert!(
            registry
                .attach("a", "s", late, ADDR.parse().unwrap(), 1)
                .is_err(),
            "the old secret no longer attaches"
        );

        let (current, _current_peer) = live_session();
        registry
            .attach("a", "new", current.clone(), ADDR.parse().unwrap(), 1)
            .unwrap();
        let (found, _) = registry.delete("a");
        assert!(found);
        assert!(current.is_closed());
        assert_eq!(registry.connected_edge_count(), 0);
        assert!(!registry.delete("a").0);
    }
}
