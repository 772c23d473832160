//! `remoteingress.v1.EdgeStatus` over an [`EdgeHandle`].

use remoteingress_edge::{EdgeHandle, FirewallState};
use tonic::{Request, Response, Status};

use crate::convert::{disagreement, edge_event, edge_events_missed, tunnel};
use crate::events::{forward_events, EventStream};
use crate::pb;
use crate::pb::edge_status_server::EdgeStatus;

/// The edge status service.
pub(crate) struct EdgeStatusService {
    pub(crate) edge: EdgeHandle,
    /// Ends event streams when the server stops.
    pub(crate) shutdown: tokio_util::sync::CancellationToken,
}

#[tonic::async_trait]
impl EdgeStatus for EdgeStatusService {
    async fn get_status(
        &self,
        _request: Request<pb::EdgeStatusGetStatusRequest>,
    ) -> Result<Response<pb::EdgeStatusGetStatusResponse>, Status> {
        let status = self.edge.status();
        let (firewall_state, firewall_message) = match status.firewall.clone() {
            Some(FirewallState::Applied(rules)) => (
                pb::FirewallState::Applied,
                format!("{rules} rules in force"),
            ),
            Some(FirewallState::Off) => (
                pb::FirewallState::Unavailable,
                "disabled (--firewall off)".to_owned(),
            ),
            Some(FirewallState::Unavailable(why)) => (pb::FirewallState::Unavailable, why),
            Some(FirewallState::Error(why)) => (pb::FirewallState::Error, why),
            None => (pb::FirewallState::Unspecified, String::new()),
        };
        Ok(Response::new(pb::EdgeStatusGetStatusResponse {
            running: status.running,
            connected: status.connected,
            transport: crate::convert::transport(status.transport),
            public_ip: status
                .public_ip
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            active_streams: u32::try_from(status.active_streams).unwrap_or(u32::MAX),
            active_udp_sessions: u32::try_from(status.active_udp_sessions).unwrap_or(u32::MAX),
            listen_ports: status.listen_ports.into_iter().map(u32::from).collect(),
            listen_ports_udp: status.listen_ports_udp.into_iter().map(u32::from).collect(),
            firewall: firewall_state as i32,
            firewall_message,
            last_error: status.last_error.unwrap_or_default(),
            tunnels: status.tunnels.into_iter().map(tunnel).collect(),
            generation: status.generation.unwrap_or_default(),
            config_disagreement: status.config_disagreement.map(disagreement),
        }))
    }

    type WatchEventsStream = EventStream<pb::EdgeStatusWatchEventsResponse>;

    async fn watch_events(
        &self,
        _request: Request<pb::EdgeStatusWatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let stream = forward_events(
            self.edge.subscribe(),
            self.shutdown.clone(),
            |event| Some(edge_event(event)),
            edge_events_missed,
            None,
        );
        Ok(Response::new(stream))
    }
}
