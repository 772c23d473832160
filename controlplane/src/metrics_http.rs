//! `/metrics` (Prometheus text), `/healthz` and `/readyz` over plain HTTP.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::server::{ControlPlaneError, Served};

/// Whether the process is ready for traffic.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
struct AppState {
    registry: Registry,
    ready: Readiness,
}

/// Adds `remoteingress_build_info` and process metrics (RSS, fds, CPU) to `registry`.
fn register_process_metrics(registry: &Registry) -> prometheus::Result<()> {
    let build = IntGaugeVec::new(
        Opts::new(
            "remoteingress_build_info",
            "Always 1; labelled with the version",
        ),
        &["version"],
    )?;
    build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    registry.register(Box::new(build))?;
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(())
}

/// Serves the metrics endpoints until `shutdown`. `ready` decides `/readyz`.
pub async fn serve_metrics(
    registry: Registry,
    addr: SocketAddr,
    ready: Readiness,
    shutdown: CancellationToken,
) -> Result<Served, ControlPlaneError> {
    register_process_metrics(&registry).map_err(ControlPlaneError::Metrics)?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { registry, ready });
    let (listener, local_addr) = crate::server::bind(addr).await?;
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    tracing::info!(addr = %local_addr, "metrics on /metrics, /healthz, /readyz");
    Ok(Served { local_addr, task })
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                TextEncoder::new().format_type().to_owned(),
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_owned())],
            e.to_string().into_bytes(),
        ),
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if (state.ready)() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
