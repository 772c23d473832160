//! One task per hub replica: pushes the desired edge set whenever it changes and whenever the
//! hub (re)appears, follows the hub's events, and keeps a report of what the hub sees.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remoteingress_controlplane::pb;
use remoteingress_controlplane::pb::hub_admin_client::HubAdminClient;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// The edge set every hub must hold (generations set).
pub type DesiredEdges = Arc<Vec<pb::Edge>>;

/// What one hub last told us.
#[derive(Debug, Clone, Default)]
pub struct HubReport {
    /// The hub instance id.
    pub hub_id: String,
    /// Its edges with their config state.
    pub edges: Vec<pb::EdgeInfo>,
    /// Its tunnels.
    pub connected: Vec<pb::ConnectedEdge>,
    /// Why it cannot be reached now (its edges and tunnels are then unknown).
    pub unreachable: Option<String>,
    /// Why it refused the last push.
    pub refused: Option<String>,
}

/// Reports by hub admin address, shared with the status writer.
pub type Reports = Arc<Mutex<BTreeMap<SocketAddr, HubReport>>>;

/// The admin client with the bearer token on every call.
pub type Admin = HubAdminClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer …` to every call.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    /// The interceptor for `token` (none: calls go without).
    pub fn new(token: Option<&str>) -> Result<Self, crate::OperatorError> {
        token
            .map(|t| {
                format!("Bearer {t}").parse().map_err(|_| {
                    crate::OperatorError::Config(
                        "the hub admin token is not valid header text".into(),
                    )
                })
            })
            .transpose()
            .map(Self)
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// How the hubs' admin API is reached.
#[derive(Debug, Clone)]
pub enum HubTransport {
    /// TLS, verifying the hub's certificate against `ca` (PEM) for `server_name`: hubs are
    /// dialled by pod address, so the name checked is their Service's.
    Tls {
        /// The CA certificate(s), PEM.
        ca: Vec<u8>,
        /// The name the hubs' certificate must carry.
        server_name: String,
    },
    /// Plain HTTP/2 (explicitly allowed): the token and every edge secret cross the network in
    /// clear.
    Plaintext,
}

/// What a call to a hub needs: its transport and the bearer token.
#[derive(Clone)]
pub struct HubAccess {
    /// How to reach it.
    pub transport: HubTransport,
    /// The admin token.
    pub token: BearerToken,
}

/// Connects to a hub's admin API.
pub async fn connect(
    addr: SocketAddr,
    access: &HubAccess,
) -> Result<Admin, tonic::transport::Error> {
    let endpoint = match &access.transport {
        HubTransport::Tls { ca, server_name } => {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(server_name);
            Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?
        }
        HubTransport::Plaintext => Endpoint::from_shared(format!("http://{addr}"))?,
    };
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .connect()
        .await?;
    // The hub's answers (ListEdges, GetStatus) and our pushes grow with the edge set: allow
    // what the hub's API allows for the largest set we support, not tonic's 4 MiB.
    Ok(
        HubAdminClient::with_interceptor(channel, access.token.clone())
            .max_decoding_message_size(remoteingress_controlplane::MAX_MESSAGE_LEN)
            .max_encoding_message_size(remoteingress_controlplane::MAX_MESSAGE_LEN),
    )
}

/// Everything a hub task needs.
#[derive(Clone)]
pub struct HubSync {
    /// The desired set.
    pub desired: watch::Receiver<DesiredEdges>,
    /// Where reports go.
    pub reports: Reports,
    /// Woken when a report changes.
    pub changed: Arc<Notify>,
    /// How the hubs are reached.
    pub access: HubAccess,
    /// How often the report is refreshed without an event.
    pub refresh: Duration,
}

impl HubSync {
    /// Serves one hub until `stop`: reconnects with backoff, and re-syncs at once each time.
    pub async fn run(mut self, addr: SocketAddr, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let outcome = tokio::select! {
                outcome = self.session(addr) => outcome,
                () = stop.cancelled() => break,
            };
            if let Err(error) = outcome {
                tracing::warn!(hub = %addr, %error, "hub admin API");
                self.report(addr, |report| {
                    *report = HubReport {
                        unreachable: Some(error.clone()),
                        ..HubReport::default()
                    };
                });
                backoff = (backoff * 2).min(Duration::from_secs(10));
            } else {
                backoff = Duration::from_millis(200);
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => break,
            }
        }
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
        self.changed.notify_one();
    }

    /// One connection: push, then follow events and changes until the hub goes away.
    async fn session(&mut self, addr: SocketAddr) -> Result<(), String> {
        let mut admin = connect(addr, &self.access)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let kinds = [
            pb::EventKind::EdgeConnected,
            pb::EventKind::EdgeDisconnected,
            pb::EventKind::ConfigApplied,
        ];
        let mut events = admin
            .watch_events(pb::WatchEventsRequest {
                edge_id: String::new(),
                kinds: kinds.iter().map(|k| *k as i32).collect(),
            })
            .await
            .map_err(|e| format!("watching events: {}", e.message()))?
            .into_inner();
        let hub_id = admin
            .get_status(pb::GetStatusRequest {})
            .await
            .map_err(|e| format!("status: {}", e.message()))?
            .into_inner()
            .hub_id;
        tracing::info!(hub = %addr, %hub_id, "hub connected; pushing the edge set");
        self.desired.mark_changed();
        let mut refresh = tokio::time::interval(self.refresh);
        let mut push_error = None;
        loop {
            tokio::select! {
                changed = self.desired.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let edges = self.desired.borrow_and_update().clone();
                    let pushed = admin
                        .update_allowed_edges(pb::UpdateAllowedEdgesRequest { edges: edges.to_vec() })
                        .await;
                    push_error = pushed.err().map(|e| format!("the hub refused the edge set: {}", e.message()));
                    if let Some(error) = &push_error {
                        tracing::warn!(hub = %addr, %error, "push");
                    }
                    self.refresh_report(addr, &mut admin, &hub_id, push_error.clone()).await?;
                }
                event = events.message() => match event {
                    Ok(Some(_)) => self.refresh_report(addr, &mut admin, &hub_id, push_error.clone()).await?,
                    Ok(None) => return Err("the hub ended its event stream".into()),
                    Err(e) => return Err(format!("event stream: {}", e.message())),
                },
                _ = refresh.tick() => self.refresh_report(addr, &mut admin, &hub_id, push_error.clone()).await?,
            }
        }
    }

    /// Reads the hub's edges and tunnels into its report, with the last push's error.
    async fn refresh_report(
        &self,
        addr: SocketAddr,
        admin: &mut Admin,
        hub_id: &str,
        push_error: Option<String>,
    ) -> Result<(), String> {
        let edges = admin
            .list_edges(pb::ListEdgesRequest {})
            .await
            .map_err(|e| format!("listing edges: {}", e.message()))?
            .into_inner()
            .edges;
        let connected = admin
            .get_status(pb::GetStatusRequest {})
            .await
            .map_err(|e| format!("status: {}", e.message()))?
            .into_inner()
            .connected_edges;
        self.report(addr, |report| {
            report.hub_id = hub_id.to_owned();
            report.edges = edges;
            report.connected = connected;
            report.unreachable = None;
            report.refused = push_error;
        });
        Ok(())
    }

    fn report(&self, addr: SocketAddr, update: impl FnOnce(&mut HubReport)) {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        let report = reports.entry(addr).or_default();
        update(report);
        drop(reports);
        self.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use remoteingress_controlplane::{serve_hub_admin, AdminOptions, ApiLimits};
    use remoteingress_hub::{Hub, HubOptions};
    use remoteingress_tunnel::HubIdentity;

    const TOKEN: &str = "admin-token";
    /// The largest set we support (docs/security.md): 10,000 edges.
    const EDGES: u32 = 10_000;

    /// An edge as large as we support: 100 TCP and 100 UDP ports, each with its own target,
    /// and a few firewall entries.
    fn largest_edge(n: u32) -> pb::Edge {
        let ports: Vec<u32> = (20_000..20_100).collect();
        pb::Edge {
            id: format!("edge-{n:05}"),
            secret: format!("{n:064x}"),
            listen_ports: ports.clone(),
            listen_ports_udp: ports.clone(),
            target_ports: ports.iter().map(|p| (*p, p - 12_000)).collect(),
            target_hosts: ports
                .iter()
                .map(|p| (*p, format!("svc-{p}.team-{n}.svc")))
                .collect(),
            stun_interval_secs: 300,
            firewall_config: Some(pb::FirewallConfig {
                blocked_ips: (0..5).map(|i| format!("198.51.100.{i}/32")).collect(),
                ..pb::FirewallConfig::default()
            }),
            generation: Some(1_800_000_000_000 + u64::from(n)),
        }
    }

    /// The operator's admin client pushes the largest set to a hub and reads it back: both
    /// messages are larger than gRPC's usual 4 MiB and within both sides' limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_largest_supported_edge_set_passes_both_ways() {
        let state = tempfile::tempdir().unwrap();
        let identity = HubIdentity::load_or_generate(state.path()).unwrap();
        let options = HubOptions {
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            ..HubOptions::default()
        };
        let hub = Hub::start(options, &identity).await.unwrap();
        let stop = CancellationToken::new();
        let admin = AdminOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            token: Some(TOKEN.into()),
            tls: None,
            public_host: None,
            public_port: 443,
            peers: Vec::new(),
            edges_file_mode: false,
            limits: ApiLimits::default(),
            registry: prometheus::Registry::new(),
        };
        let served = serve_hub_admin(hub.clone(), admin, stop.clone())
            .await
            .unwrap();
        let access = HubAccess {
            transport: HubTransport::Plaintext,
            token: BearerToken::new(Some(TOKEN)).unwrap(),
        };
        let mut client = connect(served.local_addr, &access).await.unwrap();

        let request = pb::UpdateAllowedEdgesRequest {
            edges: (0..EDGES).map(largest_edge).collect(),
        };
        let pushed = request.encoded_len();
        assert!(pushed > 4 << 20 && pushed < remoteingress_controlplane::MAX_MESSAGE_LEN);
        client.update_allowed_edges(request).await.unwrap();
        let listed = client
            .list_edges(pb::ListEdgesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.edges.len(), EDGES as usize);
        assert!(
            listed.encoded_len() > 4 << 20,
            "{} bytes",
            listed.encoded_len()
        );
        println!(
            "{EDGES} edges: pushed {pushed} bytes, listed {} bytes (limit {})",
            listed.encoded_len(),
            remoteingress_controlplane::MAX_MESSAGE_LEN
        );
        stop.cancel();
        hub.shutdown().await;
    }
}
