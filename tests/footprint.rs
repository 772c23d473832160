//! What an idle connected edge costs the hub, measured as the bench measures it: light edges
//! that did the handshake and only answer PINGs. Before round 2 of the performance work an idle
//! edge held ≈ 400 KiB of the hub's memory; since, 45–97 KiB (docs/performance.md). The bound
//! here is loose, for a shared machine, and catches a return to per-edge buffers sized for
//! traffic; the figure itself is the bench's to record.

#![allow(clippy::unwrap_used)]

use remoteingress_bench::edges::hub_memory_per_idle_edge;
use remoteingress_bench::preauth::hub_memory_under_unauthenticated_quic;

/// Edges connected: enough that their cost stands out from the allocator's noise.
const EDGES: usize = 300;
/// Half of what an idle edge cost before the buffers were allocated on demand.
const MAX_KIB_PER_EDGE: f64 = 200.0;
/// What a flooding unauthenticated QUIC peer may cost. Before its limits were lowered, one
/// held ≈ 25 MiB (a 4 MiB datagram buffer, 4 MiB on each of its streams); since, ≈ 0.2 MiB
/// plus what the allocator keeps of the datagrams it dropped (≈ 0.5 MiB, still held once the
/// peers are gone).
const MAX_KIB_PER_UNAUTHENTICATED_PEER: f64 = 4096.0;

/// The measured figure of the row named `name`.
fn figure(rows: &[remoteingress_bench::Row], name: &str) -> f64 {
    rows.iter().find(|row| row.name == name).unwrap().tunnel
}

async fn an_idle_edge_costs_the_hub_little(transport: &str) {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_remoteingress"));
    let rows = hub_memory_per_idle_edge(binary, transport, EDGES)
        .await
        .unwrap();
    let per_edge = figure(&rows, "hub RSS per idle edge");
    assert!(
        per_edge <= MAX_KIB_PER_EDGE,
        "{transport}: {per_edge:.1} KiB of hub RSS per idle edge, more than {MAX_KIB_PER_EDGE}: {rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tls_edge_costs_the_hub_little() {
    an_idle_edge_costs_the_hub_little("tcpTls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_quic_edge_costs_the_hub_little() {
    an_idle_edge_costs_the_hub_little("quic").await;
}

/// Unauthenticated QUIC peers offering the hub all they can (every stream they may open, data
/// on each, datagrams) make it hold little: one stream, a small window, datagrams dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_quic_peers_cost_the_hub_little() {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_remoteingress"));
    let rows = hub_memory_under_unauthenticated_quic(binary).await.unwrap();
    let per_peer = figure(&rows, "hub RSS per unauthenticated QUIC peer");
    assert!(
        per_peer <= MAX_KIB_PER_UNAUTHENTICATED_PEER,
        "{per_peer:.1} KiB of hub RSS per unauthenticated QUIC peer, more than {MAX_KIB_PER_UNAUTHENTICATED_PEER}: {rows:?}"
    );
}
