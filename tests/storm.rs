//! Reconnect storms against a real hub: a fleet connecting at once is served without a
//! handshake thrown away, and a restarted hub resumes the sessions of edges that were
//! connected before, over both transports.

mod common;

use std::time::Duration;

use common::{hub_options, init_logs, metric, start_hub_with};
use remoteingress_bench::storm::{connect_all, connectors, edge_id, SECRET};
use remoteingress_hub::{AllowedEdge, HubHandle, HubOptions};
use remoteingress_tunnel::{quic, HubTrust, Link, SessionOptions};

const STORM_EDGES: usize = 2_000;

fn storm_options(registry: &prometheus::Registry) -> HubOptions {
    let mut options = hub_options(0);
    options.handshake_timeout = Duration::from_secs(10);
    options.registry = registry.clone();
    options
}

async fn allow_fleet(hub: &HubHandle, count: usize) {
    let edges = (0..count)
        .map(|n| AllowedEdge::new(&edge_id(n), SECRET, Vec::new()))
        .collect();
    hub.update_allowed_edges(edges)
        .await
        .expect("the fleet is allowed");
}

fn counter(registry: &prometheus::Registry, name: &str) -> f64 {
    metric(registry, name, &[]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_2000_edges_all_connect_with_no_handshake_thrown_away_and_resume_after_a_restart(
) {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let hub = start_hub_with(state.path(), storm_options(&registry)).await;
    allow_fleet(&hub, STORM_EDGES).await;
    let fleet = connectors(hub.pin(), STORM_EDGES).unwrap();
    let tunnel = hub.local_addr();

    let (outcomes, held) = connect_all(tunnel, &fleet).await.unwrap();
    assert_eq!(held.len(), STORM_EDGES, "every edge connected");
    let wasted: u32 = outcomes.iter().map(|o| o.wasted).sum();
    assert_eq!(
        wasted, 0,
        "no edge was reset or refused after its TLS handshake"
    );
    assert_eq!(
        counter(&registry, "remoteingress_tunnel_handshakes_total"),
        STORM_EDGES as f64,
        "every handshake the hub began became a tunnel"
    );
    for reason in ["evicted", "full", "timeout", "tls"] {
        assert_eq!(
            metric(
                &registry,
                "remoteingress_auth_failures_total",
                &[("reason", reason)]
            ),
            None,
            "{reason}"
        );
    }

    // The hub restarts with its identity; the edges come back with their tickets.
    drop(held);
    hub.shutdown().await;
    let registry = prometheus::Registry::new();
    let mut options = storm_options(&registry);
    options.listen_addr = tunnel;
    let hub = start_hub_with(state.path(), options).await;
    allow_fleet(&hub, STORM_EDGES).await;
    let (_, held) = connect_all(tunnel, &fleet).await.unwrap();
    assert_eq!(held.len(), STORM_EDGES);
    assert_eq!(
        counter(&registry, "remoteingress_tunnel_handshakes_resumed_total"),
        STORM_EDGES as f64,
        "every edge resumed its session"
    );
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_reconnect_resumes_its_session_even_on_a_restarted_hub() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let hub = start_hub_with(state.path(), storm_options(&registry)).await;
    let tunnel = hub.local_addr();
    let config = quic::client_config(
        &HubTrust::Pin(hub.pin().to_owned()),
        &SessionOptions::default(),
    )
    .unwrap();
    let connect = || async {
        let endpoint = quic::client_endpoint_with(config.clone()).unwrap();
        let link = Link::connect_quic(&endpoint, "127.0.0.1", tunnel.port(), "localhost")
            .await
            .unwrap();
        // The hub refuses the unknown edge; the session ticket came with the handshake.
        let mut link = link;
        link.write_line(&format!("EDGE {} {SECRET}\n", edge_id(0)))
            .await
            .unwrap();
        let _ = link.read_line(4096).await;
    };
    connect().await;
    connect().await;
    let resumed = "remoteingress_tunnel_handshakes_resumed_total";
    assert_eq!(counter(&registry, resumed), 1.0, "the second one resumed");

    hub.shutdown().await;
    let registry = prometheus::Registry::new();
    let mut options = storm_options(&registry);
    options.listen_addr = tunnel;
    let _hub = start_hub_with(state.path(), options).await;
    connect().await;
    assert_eq!(
        counter(&registry, resumed),
        1.0,
        "resumed on the restarted hub"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_at_its_edge_limit_refuses_a_new_edge_as_busy_and_says_when_to_come_back() {
    init_logs();
    let state = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let mut options = storm_options(&registry);
    options.max_edges = 1;
    let hub = start_hub_with(state.path(), options).await;
    allow_fleet(&hub, 2).await;
    let fleet = connectors(hub.pin(), 2).unwrap();
    let (_, first) = connect_all(hub.local_addr(), &fleet[..1]).await.unwrap();
    assert_eq!(first.len(), 1);
    // No waiting for the first edge's session: it holds its place from its accept line on.

    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let port = hub.local_addr().port();
    let mut link = Link::connect_tls(&fleet[1], name, "127.0.0.1", port)
        .await
        .unwrap();
    link.write_line(&format!("EDGE {} {SECRET}\n", edge_id(1)))
        .await
        .unwrap();
    let (reply, _) = link.read_line(4096).await.unwrap();
    let refusal = remoteingress_wire::handshake::parse_reply(&reply).unwrap_err();
    assert_eq!(
        refusal.retry_after(),
        Some(Duration::from_secs(5)),
        "{refusal}"
    );
    assert_eq!(
        metric(
            &registry,
            "remoteingress_auth_failures_total",
            &[("reason", "busy")]
        ),
        Some(1.0)
    );
    hub.shutdown().await;
}
