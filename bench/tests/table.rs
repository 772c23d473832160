//! The printed table: comparison columns appear only when some row has their figure.

use std::collections::BTreeMap;

use remoteingress_bench::{table, Row};

fn row(relay_floor: Option<f64>) -> Row {
    Row {
        name: "latency p50 [tcpTls]".into(),
        unit: "µs".into(),
        direct: Some(50.0),
        tunnel: 100.0,
        peers: BTreeMap::new(),
        relay_floor,
    }
}

#[test]
fn the_relay_floor_columns_appear_with_a_floor_figure_and_its_ratio() {
    let printed = table(&[row(Some(80.0))]);
    assert!(printed.contains("2 plain relays"), "{printed}");
    assert!(
        printed.contains("80.00 µs") && printed.contains("1.25"),
        "{printed}"
    );
    assert!(!printed.contains("rathole"), "{printed}");
}

#[test]
fn without_comparison_figures_only_direct_and_tunnel_are_shown() {
    let printed = table(&[row(None)]);
    assert!(
        !printed.contains("2 plain relays") && !printed.contains("rathole"),
        "{printed}"
    );
    assert!(
        printed.contains("100.00 µs") && printed.contains("2.00"),
        "{printed}"
    );
}

#[test]
fn each_peer_with_figures_gets_its_columns() {
    let mut with_peers = row(None);
    with_peers.peers.insert("frp TLS".into(), 200.0);
    let printed = table(&[with_peers, row(None)]);
    assert!(
        printed.contains("frp TLS") && printed.contains("ours/frp-TLS"),
        "{printed}"
    );
    assert!(
        printed.contains("200.00 µs") && printed.contains("0.50"),
        "{printed}"
    );
    assert!(!printed.contains("rathole"), "{printed}");
}
