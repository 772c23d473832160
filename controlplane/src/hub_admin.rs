//! `remoteingress.v1.HubAdmin` over a [`HubHandle`].

use std::sync::Arc;

use remoteingress_hub::HubHandle;
use remoteingress_wire::token::ConnectionToken;
use tonic::{Request, Response, Status};

use crate::convert::{
    connected_edge, edge_from_proto, edge_info, hub_event, hub_events_missed, hub_status,
};
use crate::events::{forward_events, EventStream};
use crate::pb;
use crate::pb::hub_admin_server::HubAdmin;

/// The admin service.
pub(crate) struct HubAdminService {
    pub(crate) hub: HubHandle,
    /// Ends event streams when the server stops.
    pub(crate) shutdown: tokio_util::sync::CancellationToken,
    pub(crate) public_host: Option<String>,
    pub(crate) public_port: u16,
    /// The other hubs' public tunnel addresses, named in connection tokens too.
    pub(crate) peers: Vec<String>,
    /// The edges file is the source of truth: the API must not change the allowed set.
    pub(crate) edges_file_mode: bool,
    /// One permit per open WatchEvents stream.
    pub(crate) watchers: Arc<tokio::sync::Semaphore>,
}

impl HubAdminService {
    fn writable(&self) -> Result<(), Status> {
        if self.edges_file_mode {
            Err(Status::failed_precondition(
                "the hub runs with --edges-file, which is the source of truth: edit that file instead",
            ))
        } else {
            Ok(())
        }
    }
}

#[tonic::async_trait]
impl HubAdmin for HubAdminService {
    async fn update_allowed_edges(
        &self,
        request: Request<pb::UpdateAllowedEdgesRequest>,
    ) -> Result<Response<pb::UpdateAllowedEdgesResponse>, Status> {
        self.writable()?;
        let edges = request
            .into_inner()
            .edges
            .into_iter()
            .map(edge_from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        self.hub
            .update_allowed_edges(edges)
            .await
            .map_err(hub_status)?;
        Ok(Response::new(pb::UpdateAllowedEdgesResponse {}))
    }

    async fn upsert_edge(
        &self,
        request: Request<pb::UpsertEdgeRequest>,
    ) -> Result<Response<pb::UpsertEdgeResponse>, Status> {
        self.writable()?;
        let edge = request
            .into_inner()
            .edge
            .ok_or_else(|| Status::invalid_argument("edge: required"))?;
        self.hub
            .upsert_edge(edge_from_proto(edge)?)
            .await
            .map_err(hub_status)?;
        Ok(Response::new(pb::UpsertEdgeResponse {}))
    }

    async fn delete_edge(
        &self,
        request: Request<pb::DeleteEdgeRequest>,
    ) -> Result<Response<pb::DeleteEdgeResponse>, Status> {
        self.writable()?;
        let deleted = self
            .hub
            .delete_edge(&request.into_inner().id)
            .await
            .map_err(hub_status)?;
        Ok(Response::new(pb::DeleteEdgeResponse { deleted }))
    }

    async fn list_edges(
        &self,
        _request: Request<pb::ListEdgesRequest>,
    ) -> Result<Response<pb::ListEdgesResponse>, Status> {
        let edges = self.hub.list_edges().into_iter().map(edge_info).collect();
        Ok(Response::new(pb::ListEdgesResponse { edges }))
    }

    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let status = self.hub.status();
        Ok(Response::new(pb::GetStatusResponse {
            running: status.running,
            tunnel_port: u32::from(status.tunnel_port),
            connected_edges: status
                .connected_edges
                .into_iter()
                .map(connected_edge)
                .collect(),
            hub_id: status.hub_id,
            draining: status.draining,
            pin: self.hub.pin().to_owned(),
        }))
    }

    type WatchEventsStream = EventStream<pb::WatchEventsResponse>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let slot = self
            .watchers
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many open WatchEvents streams"))?;
        let filter = request.into_inner();
        let kinds: Vec<pb::EventKind> = filter
            .kinds
            .iter()
            .filter_map(|kind| pb::EventKind::try_from(*kind).ok())
            .collect();
        let stream = forward_events(
            self.hub.subscribe(),
            self.shutdown.clone(),
            move |event| {
                let (kind, message) = hub_event(event);
                let edge_matches = filter.edge_id.is_empty() || message.edge_id == filter.edge_id;
                let kind_matches = kinds.is_empty() || kinds.contains(&kind);
                (edge_matches && kind_matches).then_some(message)
            },
            hub_events_missed,
            Some(slot),
        );
        Ok(Response::new(stream))
    }

    async fn create_connection_token(
        &self,
        request: Request<pb::CreateConnectionTokenRequest>,
    ) -> Result<Response<pb::CreateConnectionTokenResponse>, Status> {
        let request = request.into_inner();
        let hub_host = Some(request.hub_host.clone())
            .filter(|host| !host.is_empty())
            .or_else(|| self.public_host.clone())
            .ok_or_else(|| {
                Status::failed_precondition(
                    "name the hub's host: give hubHost in the request, or start the hub with \
                     --public-host",
                )
            })?;
        let hub_port = match request.hub_port {
            0 => self.public_port,
            port => u16::try_from(port)
                .map_err(|_| Status::invalid_argument(format!("hubPort {port} is not a port")))?,
        };
        let given = Some(request.secret.as_str()).filter(|s| !s.is_empty());
        let secret = self
            .hub
            .connection_token_secret(&request.edge_id, given)
            .map_err(hub_status)?;
        let pin = self.hub.pin().to_owned();
        let token = ConnectionToken {
            hub_host: hub_host.clone(),
            hub_port,
            edge_id: request.edge_id,
            secret,
            pin: Some(pin.clone()),
            hubs: self.peers.clone(),
        };
        Ok(Response::new(pb::CreateConnectionTokenResponse {
            token: token.encode(),
            hub_host,
            hub_port: u32::from(hub_port),
            pin,
        }))
    }

    async fn disconnect_edge(
        &self,
        request: Request<pb::DisconnectEdgeRequest>,
    ) -> Result<Response<pb::DisconnectEdgeResponse>, Status> {
        let disconnected = self.hub.disconnect_edge(&request.into_inner().id);
        Ok(Response::new(pb::DisconnectEdgeResponse { disconnected }))
    }

    async fn drain(
        &self,
        _request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let tunnels = self.hub.drain().await;
        Ok(Response::new(pb::DrainResponse {
            tunnels: u32::try_from(tunnels).unwrap_or(u32::MAX),
        }))
    }

    async fn drain_edge(
        &self,
        request: Request<pb::DrainEdgeRequest>,
    ) -> Result<Response<pb::DrainEdgeResponse>, Status> {
        let drained = self.hub.drain_edge(&request.into_inner().id).await;
        Ok(Response::new(pb::DrainEdgeResponse { drained }))
    }
}
