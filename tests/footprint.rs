//! What an idle connected edge costs the hub, measured as the bench measures it: light edges
//! that did the handshake and only answer PINGs. Before round 2 of the performance work an idle
//! edge held ≈ 400 KiB of the hub's memory; since, 45–97 KiB (docs/performance.md). The bound
//! here is loose, for a shared machine, and catches a return to per-edge buffers sized for
//! traffic; the figure itself is the bench's to record.

#![allow(clippy::unwrap_used)]

use remoteingress_bench::edges::hub_memory_per_idle_edge;

/// Edges connected: enough that their cost stands out from the allocator's noise.
const EDGES: usize = 300;
/// Half of what an idle edge cost before the buffers were allocated on demand.
const MAX_KIB_PER_EDGE: f64 = 200.0;

async fn an_idle_edge_costs_the_hub_little(transport: &str) {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_remoteingress"));
    let rows = hub_memory_per_idle_edge(binary, transport, EDGES)
        .await
        .unwrap();
    let per_edge = rows
        .iter()
        .find(|row| row.name == "hub RSS per idle edge")
        .unwrap()
        .tunnel;
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
