//! Conversions between protobuf messages and the hub/edge types, and the one place where
//! library errors become gRPC statuses.

use std::collections::HashMap;
use std::time::SystemTime;

use remoteingress_edge::{Disagreement, EdgeEvent, TunnelState, TunnelStatus};
use remoteingress_hub::Transport;
use remoteingress_hub::{
    AllowedEdge, ConnectedEdge, EdgeInfo, HubError, HubEvent, PortTargets, TokenSecretError,
};
use remoteingress_wire::config::{
    Action, Direction, FirewallConfig, FirewallRule, Protocol, RateLimit,
    DEFAULT_STUN_INTERVAL_SECS,
};
use remoteingress_wire::EdgeConfig;
use tonic::Status;

use crate::pb;
use crate::pb::watch_events_response::Event as HubPbEvent;

/// The gRPC status for a hub error.
pub(crate) fn hub_status(error: HubError) -> Status {
    match &error {
        HubError::InvalidEdge { .. } | HubError::EdgesFile { .. } => {
            Status::invalid_argument(error.to_string())
        }
        HubError::Generation(_) => Status::failed_precondition(error.to_string()),
        HubError::TokenSecret(TokenSecretError::UnknownEdge) => {
            Status::not_found(error.to_string())
        }
        HubError::TokenSecret(TokenSecretError::Mismatch) => {
            Status::invalid_argument(error.to_string())
        }
        HubError::TokenSecret(TokenSecretError::OnlyHashKnown) => {
            Status::failed_precondition(error.to_string())
        }
        HubError::State { .. } => Status::internal(format!(
            "the change is live but could not be persisted: {error}"
        )),
        HubError::Bind { .. } | HubError::Tls(_) | HubError::Metrics(_) => {
            Status::internal(error.to_string())
        }
    }
}

fn invalid(
    edge_id: &str,
    field: impl std::fmt::Display,
    message: impl std::fmt::Display,
) -> Status {
    Status::invalid_argument(format!("edge {edge_id:?}: {field}: {message}"))
}

fn port(edge_id: &str, field: impl std::fmt::Display, value: u32) -> Result<u16, Status> {
    u16::try_from(value).map_err(|_| invalid(edge_id, field, format!("{value} is not a port")))
}

fn ports(edge_id: &str, field: &str, values: &[u32]) -> Result<Vec<u16>, Status> {
    values
        .iter()
        .enumerate()
        .map(|(i, value)| port(edge_id, format_args!("{field}[{i}]"), *value))
        .collect()
}

fn protocol_from(value: i32) -> Option<Protocol> {
    match pb::Protocol::try_from(value) {
        Ok(pb::Protocol::Tcp) => Some(Protocol::Tcp),
        Ok(pb::Protocol::Udp) => Some(Protocol::Udp),
        _ => None,
    }
}

fn protocol_to(protocol: Option<Protocol>) -> i32 {
    match protocol {
        Some(Protocol::Tcp) => pb::Protocol::Tcp as i32,
        Some(Protocol::Udp) => pb::Protocol::Udp as i32,
        None => pb::Protocol::Unspecified as i32,
    }
}

fn firewall_from(edge_id: &str, firewall: pb::FirewallConfig) -> Result<FirewallConfig, Status> {
    let rate_limits = firewall
        .rate_limits
        .into_iter()
        .enumerate()
        .map(|(i, limit)| {
            Ok(RateLimit {
                port: port(
                    edge_id,
                    format_args!("firewallConfig.rateLimits[{i}].port"),
                    limit.port,
                )?,
                id: limit.id,
                protocol: protocol_from(limit.protocol),
                rate: limit.rate,
                burst: limit.burst,
                per_source_ip: limit.per_source_ip,
            })
        })
        .collect::<Result<_, Status>>()?;
    let rules = firewall
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, rule)| {
            let field = |name: &str| format!("firewallConfig.rules[{i}].{name}");
            let direction = match pb::Direction::try_from(rule.direction) {
                Ok(pb::Direction::Input) => Direction::Input,
                Ok(pb::Direction::Output) => Direction::Output,
                Ok(pb::Direction::Forward) => Direction::Forward,
                _ => {
                    return Err(invalid(
                        edge_id,
                        field("direction"),
                        "must be input, output or forward",
                    ))
                }
            };
            let action = match pb::Action::try_from(rule.action) {
                Ok(pb::Action::Accept) => Action::Accept,
                Ok(pb::Action::Drop) => Action::Drop,
                Ok(pb::Action::Reject) => Action::Reject,
                _ => {
                    return Err(invalid(
                        edge_id,
                        field("action"),
                        "must be accept, drop or reject",
                    ))
                }
            };
            Ok(FirewallRule {
                dest_port: rule
                    .dest_port
                    .map(|p| port(edge_id, field("destPort"), p))
                    .transpose()?,
                id: rule.id,
                direction,
                action,
                source_ip: Some(rule.source_ip).filter(|s| !s.is_empty()),
                protocol: protocol_from(rule.protocol),
                comment: Some(rule.comment).filter(|s| !s.is_empty()),
            })
        })
        .collect::<Result<_, Status>>()?;
    Ok(FirewallConfig {
        blocked_ips: firewall.blocked_ips,
        rate_limits,
        rules,
    })
}

fn firewall_to(firewall: FirewallConfig) -> pb::FirewallConfig {
    pb::FirewallConfig {
        blocked_ips: firewall.blocked_ips,
        rate_limits: firewall
            .rate_limits
            .into_iter()
            .map(|limit| pb::RateLimit {
                id: limit.id,
                port: u32::from(limit.port),
                protocol: protocol_to(limit.protocol),
                rate: limit.rate,
                burst: limit.burst,
                per_source_ip: limit.per_source_ip,
            })
            .collect(),
        rules: firewall
            .rules
            .into_iter()
            .map(|rule| pb::FirewallRule {
                id: rule.id,
                direction: match rule.direction {
                    Direction::Input => pb::Direction::Input,
                    Direction::Output => pb::Direction::Output,
                    Direction::Forward => pb::Direction::Forward,
                } as i32,
                action: match rule.action {
                    Action::Accept => pb::Action::Accept,
                    Action::Drop => pb::Action::Drop,
                    Action::Reject => pb::Action::Reject,
                } as i32,
                source_ip: rule.source_ip.unwrap_or_default(),
                dest_port: rule.dest_port.map(u32::from),
                protocol: protocol_to(rule.protocol),
                comment: rule.comment.unwrap_or_default(),
            })
            .collect(),
    }
}

/// An edge from the API, with every field range-checked (the hub validates the rest).
pub(crate) fn edge_from_proto(edge: pb::Edge) -> Result<AllowedEdge, Status> {
    let id = edge.id;
    let target_ports = edge
        .target_ports
        .into_iter()
        .map(|(from, to)| {
            Ok((
                port(&id, "targetPorts (key)", from)?,
                port(&id, format_args!("targetPorts[{from}]"), to)?,
            ))
        })
        .collect::<Result<_, Status>>()?;
    let target_hosts = edge
        .target_hosts
        .into_iter()
        .map(|(from, host)| Ok((port(&id, "targetHosts (key)", from)?, host)))
        .collect::<Result<_, Status>>()?;
    let config = EdgeConfig {
        listen_ports: ports(&id, "listenPorts", &edge.listen_ports)?,
        listen_ports_udp: ports(&id, "listenPortsUdp", &edge.listen_ports_udp)?,
        stun_interval_secs: match edge.stun_interval_secs {
            0 => DEFAULT_STUN_INTERVAL_SECS,
            secs => secs,
        },
        firewall_config: edge
            .firewall_config
            .map(|fw| firewall_from(&id, fw))
            .transpose()?,
        version: None,
        generation: edge.generation,
    };
    Ok(AllowedEdge {
        id,
        secret: edge.secret,
        config,
        targets: PortTargets {
            ports: target_ports,
            hosts: target_hosts,
        },
    })
}

/// The API message of an edge (the inverse of the admin API's reading of one).
pub fn edge_to_proto(edge: AllowedEdge) -> pb::Edge {
    let AllowedEdge {
        id,
        secret,
        config,
        targets,
    } = edge;
    let (target_ports, target_hosts) = targets_to(targets);
    pb::Edge {
        id,
        secret,
        listen_ports: ports_to(&config.listen_ports),
        listen_ports_udp: ports_to(&config.listen_ports_udp),
        target_ports,
        target_hosts,
        stun_interval_secs: config.stun_interval_secs,
        firewall_config: config.firewall_config.map(firewall_to),
        generation: config.generation,
    }
}

fn ports_to(ports: &[u16]) -> Vec<u32> {
    ports.iter().map(|p| u32::from(*p)).collect()
}

/// The API maps of per-port targets: target ports and target hosts.
fn targets_to(targets: PortTargets) -> (HashMap<u32, u32>, HashMap<u32, String>) {
    let ports = targets
        .ports
        .into_iter()
        .map(|(from, to)| (u32::from(from), u32::from(to)))
        .collect();
    let hosts = targets
        .hosts
        .into_iter()
        .map(|(from, host)| (u32::from(from), host))
        .collect();
    (ports, hosts)
}

pub(crate) fn edge_info(info: EdgeInfo) -> pb::EdgeInfo {
    let (target_ports, target_hosts) = targets_to(info.targets);
    pb::EdgeInfo {
        id: info.id,
        listen_ports: ports_to(&info.config.listen_ports),
        listen_ports_udp: ports_to(&info.config.listen_ports_udp),
        target_ports,
        target_hosts,
        stun_interval_secs: info.config.stun_interval_secs,
        firewall_config: info.config.firewall_config.map(firewall_to),
        connected: info.connected,
        desired_config_version: info.desired_version,
        applied_config_version: info.applied_version.unwrap_or_default(),
        last_config_error: info.last_error.unwrap_or_default(),
        generation: info.generation,
    }
}

/// The proto enum of a tunnel's transport (unspecified when there is no tunnel).
pub(crate) fn transport(transport: Option<Transport>) -> i32 {
    let transport = match transport {
        Some(Transport::TcpTls) => pb::Transport::TcpTls,
        Some(Transport::Quic) => pb::Transport::Quic,
        None => pb::Transport::Unspecified,
    };
    transport as i32
}

pub(crate) fn connected_edge(edge: ConnectedEdge) -> pb::ConnectedEdge {
    pb::ConnectedEdge {
        id: edge.id,
        connected_since: Some(edge.connected_since.into()),
        remote_addr: edge.remote_addr.to_string(),
        transport: transport(Some(edge.transport)),
        active_streams: u32::try_from(edge.active_streams).unwrap_or(u32::MAX),
        active_udp_sessions: u32::try_from(edge.active_udp_sessions).unwrap_or(u32::MAX),
        bytes_in: edge.bytes_in,
        bytes_out: edge.bytes_out,
        public_ip: edge.public_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        rtt: edge.rtt.and_then(|rtt| rtt.try_into().ok()),
    }
}

/// A hub event as sent to watchers, with its kind for filtering.
pub(crate) fn hub_event(event: HubEvent) -> (pb::EventKind, pb::WatchEventsResponse) {
    use pb::EventKind as Kind;
    let (kind, edge_id, event) = match event {
        HubEvent::EdgeConnected {
            edge_id,
            remote_addr,
            transport: name,
        } => (
            Kind::EdgeConnected,
            edge_id,
            HubPbEvent::EdgeConnected(pb::EdgeConnected {
                remote_addr: remote_addr.to_string(),
                transport: transport(Some(name)),
            }),
        ),
        HubEvent::EdgeDisconnected { edge_id, reason } => (
            Kind::EdgeDisconnected,
            edge_id,
            HubPbEvent::EdgeDisconnected(pb::EdgeDisconnected { reason }),
        ),
        HubEvent::AuthFailed {
            remote_addr,
            reason,
            kind,
        } => (
            Kind::AuthFailed,
            String::new(),
            HubPbEvent::AuthFailed(pb::AuthFailed {
                remote_addr: remote_addr.to_string(),
                reason,
                kind: kind.to_owned(),
            }),
        ),
        HubEvent::StreamOpened {
            edge_id,
            stream_id,
            client_addr,
            edge_port,
            target,
        } => (
            Kind::StreamOpened,
            edge_id,
            HubPbEvent::StreamOpened(pb::StreamOpened {
                stream_id,
                client_addr: client_addr.to_string(),
                edge_port: u32::from(edge_port),
                target,
            }),
        ),
        HubEvent::StreamClosed { edge_id, stream_id } => (
            Kind::StreamClosed,
            edge_id,
            HubPbEvent::StreamClosed(pb::StreamClosed { stream_id }),
        ),
        HubEvent::UdpSessionOpened {
            edge_id,
            session_id,
            client_addr,
            edge_port,
            target,
        } => (
            Kind::UdpSessionOpened,
            edge_id,
            HubPbEvent::UdpSessionOpened(pb::UdpSessionOpened {
                session_id,
                client_addr: client_addr.to_string(),
                edge_port: u32::from(edge_port),
                target,
            }),
        ),
        HubEvent::UdpSessionClosed {
            edge_id,
            session_id,
        } => (
            Kind::UdpSessionClosed,
            edge_id,
            HubPbEvent::UdpSessionClosed(pb::UdpSessionClosed { session_id }),
        ),
        HubEvent::OpenRefused {
            edge_id,
            protocol,
            port,
            reason,
        } => (
            Kind::OpenRefused,
            edge_id,
            HubPbEvent::OpenRefused(pb::OpenRefused {
                protocol: protocol.as_str().to_owned(),
                port: u32::from(port),
                reason: reason.as_str().to_owned(),
            }),
        ),
        HubEvent::ConfigPushed { edge_id, version } => (
            Kind::ConfigPushed,
            edge_id,
            HubPbEvent::ConfigPushed(pb::ConfigPushed { version }),
        ),
        HubEvent::ConfigReloaded {
            path,
            digest,
            generation,
            edges,
            error,
        } => (
            Kind::ConfigReloaded,
            String::new(),
            HubPbEvent::ConfigReloaded(pb::ConfigReloaded {
                path,
                digest,
                generation,
                edges: u32::try_from(edges).unwrap_or(u32::MAX),
                error: error.unwrap_or_default(),
            }),
        ),
        HubEvent::ConfigApplied {
            edge_id,
            version,
            error,
        } => (
            Kind::ConfigApplied,
            edge_id,
            HubPbEvent::ConfigApplied(pb::ConfigApplied {
                version,
                error: error.unwrap_or_default(),
            }),
        ),
    };
    (
        kind,
        pb::WatchEventsResponse {
            time: Some(SystemTime::now().into()),
            edge_id,
            event: Some(event),
        },
    )
}

/// The notice a slow hub watcher gets.
pub(crate) fn hub_events_missed(count: u64) -> pb::WatchEventsResponse {
    pb::WatchEventsResponse {
        time: Some(SystemTime::now().into()),
        edge_id: String::new(),
        event: Some(HubPbEvent::EventsMissed(pb::EventsMissed { count })),
    }
}

/// An edge event as sent to watchers.
pub(crate) fn edge_event(event: EdgeEvent) -> pb::EdgeStatusWatchEventsResponse {
    use pb::edge_status_watch_events_response::Event;
    let ports = |tcp: Vec<u16>, udp: Vec<u16>, update| {
        Event::PortsChanged(pb::PortsChanged {
            listen_ports: tcp.into_iter().map(u32::from).collect(),
            listen_ports_udp: udp.into_iter().map(u32::from).collect(),
            update,
        })
    };
    let event = match event {
        EdgeEvent::TunnelConnected {
            transport: name,
            hub_id,
            address,
        } => Event::TunnelConnected(pb::TunnelConnected {
            transport: transport(Some(name)),
            hub_id: hub_id.unwrap_or_default(),
            address,
        }),
        EdgeEvent::TunnelDisconnected {
            reason,
            hub_id,
            address,
        } => Event::TunnelDisconnected(pb::TunnelDisconnected {
            reason,
            hub_id: hub_id.unwrap_or_default(),
            address,
        }),
        EdgeEvent::TunnelDraining { hub_id, address } => {
            Event::TunnelDraining(pb::TunnelDraining {
                hub_id: hub_id.unwrap_or_default(),
                address,
            })
        }
        EdgeEvent::ClientOpened {
            protocol,
            client_addr,
            edge_port,
            hub,
        } => Event::ClientOpened(pb::ClientOpened {
            protocol: protocol.as_str().to_owned(),
            client_addr: client_addr.to_string(),
            edge_port: u32::from(edge_port),
            hub,
        }),
        EdgeEvent::ConfigDisagreement { generation, hubs } => {
            Event::ConfigDisagreement(disagreement(Disagreement { generation, hubs }))
        }
        EdgeEvent::PortsAssigned {
            listen_ports,
            listen_ports_udp,
        } => ports(listen_ports, listen_ports_udp, false),
        EdgeEvent::PortsUpdated {
            listen_ports,
            listen_ports_udp,
        } => ports(listen_ports, listen_ports_udp, true),
        EdgeEvent::PublicIpDiscovered { ip } => {
            Event::PublicIpDiscovered(pb::PublicIpDiscovered { ip: ip.to_string() })
        }
        EdgeEvent::FirewallApplied { rules, error } => {
            Event::FirewallApplied(pb::FirewallApplied {
                rules: u32::try_from(rules).unwrap_or(u32::MAX),
                error: error.unwrap_or_default(),
            })
        }
        EdgeEvent::ConfigRejected { version, error } => Event::ConfigRejected(pb::ConfigRejected {
            version: version.unwrap_or_default(),
            error,
        }),
    };
    pb::EdgeStatusWatchEventsResponse {
        time: Some(SystemTime::now().into()),
        event: Some(event),
    }
}

/// A disagreement between hubs as the edge API shows it.
pub(crate) fn disagreement(disagreement: Disagreement) -> pb::ConfigDisagreement {
    pb::ConfigDisagreement {
        generation: disagreement.generation,
        hubs: disagreement.hubs,
    }
}

/// One of the edge's tunnels as the edge API shows it.
pub(crate) fn tunnel(tunnel: TunnelStatus) -> pb::Tunnel {
    pb::Tunnel {
        hub_id: tunnel.hub_id.unwrap_or_default(),
        address: tunnel.address,
        transport: transport(Some(tunnel.transport)),
        state: match tunnel.state {
            TunnelState::Active => pb::TunnelState::Active,
            TunnelState::Draining => pb::TunnelState::Draining,
            TunnelState::Suspect => pb::TunnelState::Suspect,
        } as i32,
        active_streams: u32::try_from(tunnel.active_streams).unwrap_or(u32::MAX),
        active_udp_sessions: u32::try_from(tunnel.active_udp_sessions).unwrap_or(u32::MAX),
        rtt: tunnel.rtt.and_then(|rtt| rtt.try_into().ok()),
        connected_since: Some(tunnel.connected_since.into()),
    }
}

/// The notice a slow edge watcher gets.
pub(crate) fn edge_events_missed(count: u64) -> pb::EdgeStatusWatchEventsResponse {
    use pb::edge_status_watch_events_response::Event;
    pb::EdgeStatusWatchEventsResponse {
        time: Some(SystemTime::now().into()),
        event: Some(Event::EventsMissed(pb::EdgeEventsMissed { count })),
    }
}
