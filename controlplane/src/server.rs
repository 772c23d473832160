//! Serving the gRPC APIs: listener, optional TLS, bearer-token authorization, health, reflection
//! (v1 and v1alpha), and event streaming that never blocks the data plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use remoteingress_edge::EdgeHandle;
use remoteingress_hub::HubHandle;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::net::TcpListener;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::server::Router;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};
use tonic_health::ServingStatus;
use tower::layer::util::{Identity as NoLayer, Stack};

use crate::edge_status::EdgeStatusService;
use crate::hub_admin::HubAdminService;
use crate::limits::{limited_incoming, CallPools};
use crate::pb;

/// Why an API could not be started.
#[derive(Debug, Error)]
pub enum ControlPlaneError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// No admin token and a non-loopback address.
    #[error("refusing to serve the admin API on {0} without an admin token; set --admin-token-file or REMOTEINGRESS_ADMIN_TOKEN, or bind to 127.0.0.1")]
    NoTokenOffLoopback(SocketAddr),
    /// TLS files unusable.
    #[error("admin TLS: {0}")]
    Tls(String),
    /// Process metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(prometheus::Error),
    /// Reflection descriptors unusable (a build problem).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// How the admin API is served.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    /// Listen address.
    pub addr: SocketAddr,
    /// Bearer token required on every call but health; `None` allows loopback only.
    pub token: Option<String>,
    /// PEM certificate and key for TLS; plaintext without.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Hub host that connection tokens name.
    pub public_host: Option<String>,
    /// Hub port that connection tokens name.
    pub public_port: u16,
    /// The other hubs' public tunnel addresses (`host:port`), which connection tokens name too.
    pub peers: Vec<String>,
    /// True when an edges file is the source of truth (write calls are refused).
    pub edges_file_mode: bool,
    /// Timeouts and concurrency limits.
    pub limits: ApiLimits,
    /// Where failed bearer-token attempts are counted.
    pub registry: prometheus::Registry,
}

/// What one client can take from the admin API.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// A call that has not answered by then fails with DEADLINE_EXCEEDED (streams: until
    /// their first message).
    pub call_timeout: Duration,
    /// API calls served at once, over all connections; more wait.
    pub max_concurrent_calls: usize,
    /// Health and reflection calls served at once, from a pool of their own; more wait.
    pub max_probe_calls: usize,
    /// WatchEvents streams open at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_watchers: usize,
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(30),
            max_concurrent_calls: 64,
            max_probe_calls: 16,
            max_watchers: 32,
            max_connections: 256,
        }
    }
}

/// Largest gRPC message either API decodes: room for the largest allowed set we support
/// (10,000 edges, each with 100 TCP and 100 UDP ports, per-port targets and a few firewall
/// rules; docs/security.md).
pub const MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;
/// Concurrent HTTP/2 streams (calls) on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// Largest header block of a call.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// A running API server.
#[derive(Debug)]
pub struct Served {
    /// The address it listens on.
    pub local_addr: SocketAddr,
    /// Ends when the server has stopped.
    pub task: JoinHandle<()>,
}

/// Checks `authorization: Bearer <token>` in constant time, counting failures.
#[derive(Clone)]
struct BearerAuth {
    /// The SHA-256 digest of the token: digests of equal length are compared, so the time
    /// taken tells nothing of the token, its length included.
    token: Option<Arc<[u8; 32]>>,
    failures: Option<prometheus::IntCounter>,
}

impl BearerAuth {
    fn new(token: Option<&str>, failures: Option<prometheus::IntCounter>) -> Self {
        Self {
            token: token.map(|token| Arc::new(digest(token))),
            failures,
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        if bool::from(digest(given).ct_eq(&expected[..])) {
            Ok(request)
        } else {
            if let Some(failures) = &self.failures {
                failures.inc();
            }
            Err(Status::unauthenticated("missing or wrong bearer token"))
        }
    }
}

/// Health and reflection (v1 and v1alpha) for a server, the latter behind `auth`, with every
/// call under `limits` and the HTTP/2 limits.
async fn base_router(
    tls: Option<&(PathBuf, PathBuf)>,
    service_name: &str,
    auth: BearerAuth,
    limits: ApiLimits,
) -> Result<Router<Stack<CallPools, NoLayer>>, ControlPlaneError> {
    let mut builder = Server::builder()
        .timeout(limits.call_timeout)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(CallPools::new(
            limits.max_concurrent_calls,
            limits.max_probe_calls,
        ));
    if let Some((cert, key)) = tls {
        let read = |path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| ControlPlaneError::Tls(format!("{}: {e}", path.display())))
        };
        builder = builder
            .tls_config(
                ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?)),
            )
            .map_err(|e| ControlPlaneError::Tls(e.to_string()))?;
    }
    let (mut reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(service_name, ServingStatus::Serving)
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(service_name)
            .with_service_name("grpc.health.v1.Health")
    };
    Ok(builder
        .add_service(health)
        .add_service(InterceptedService::new(
            reflection().build_v1()?,
            auth.clone(),
        ))
        .add_service(InterceptedService::new(reflection().build_v1alpha()?, auth)))
}

/// Binds `addr` and tells which address was bound (port 0 picks one).
pub(crate) async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ControlPlaneError> {
    let bind_error = |source| ControlPlaneError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local_addr))
}

async fn serve(
    router: Router<Stack<CallPools, NoLayer>>,
    addr: SocketAddr,
    max_connections: usize,
    shutdown: CancellationToken,
) -> Result<Served, ControlPlaneError> {
    let (listener, local_addr) = bind(addr).await?;
    let task = tokio::spawn(async move {
        let incoming = limited_incoming(listener, max_connections, shutdown.clone());
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    Ok(Served { local_addr, task })
}

/// Serves `remoteingress.v1.HubAdmin` (plus health and reflection) until `shutdown`.
pub async fn serve_hub_admin(
    hub: HubHandle,
    options: AdminOptions,
    shutdown: CancellationToken,
) -> Result<Served, ControlPlaneError> {
    if options.token.is_none() {
        if !options.addr.ip().is_loopback() {
            return Err(ControlPlaneError::NoTokenOffLoopback(options.addr));
        }
        tracing::warn!(addr = %options.addr, "admin API has no token: anyone on this host can use it");
    }
    let failures = prometheus::IntCounter::new(
        "remoteingress_admin_auth_failures_total",
        "Admin API calls refused for a missing or wrong bearer token",
    )
    .map_err(ControlPlaneError::Metrics)?;
    options
        .registry
        .register(Box::new(failures.clone()))
        .map_err(ControlPlaneError::Metrics)?;
    let auth = BearerAuth::new(options.token.as_deref(), Some(failures));
    let service = HubAdminService {
        hub,
        shutdown: shutdown.clone(),
        public_host: options.public_host,
        public_port: options.public_port,
        peers: options.peers,
        edges_file_mode: options.edges_file_mode,
        watchers: Arc::new(tokio::sync::Semaphore::new(options.limits.max_watchers)),
    };
    let router = base_router(
        options.tls.as_ref(),
        "remoteingress.v1.HubAdmin",
        auth.clone(),
        options.limits,
    )
    .await?
    .add_service(InterceptedService::new(
        pb::hub_admin_server::HubAdminServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_LEN),
        auth,
    ));
    let served = serve(
        router,
        options.addr,
        options.limits.max_connections,
        shutdown,
    )
    .await?;
    tracing::info!(addr = %served.local_addr, tls = options.tls.is_some(), "admin API listening");
    Ok(served)
}

/// Serves `remoteingress.v1.EdgeStatus` (plus health and reflection) until `shutdown`.
/// It is read-only and meant for loopback.
pub async fn serve_edge_status(
    edge: EdgeHandle,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<Served, ControlPlaneError> {
    let auth = BearerAuth::new(None, None);
    let router = base_router(
        None,
        "remoteingress.v1.EdgeStatus",
        auth,
        ApiLimits::default(),
    )
    .await?
    .add_service(pb::edge_status_server::EdgeStatusServer::new(
        EdgeStatusService {
            edge,
            shutdown: shutdown.clone(),
        },
    ));
    let served = serve(router, addr, ApiLimits::default().max_connections, shutdown).await?;
    tracing::info!(addr = %served.local_addr, "edge status API listening");
    Ok(served)
}
