//! The benchmark harness in quick mode: every measurement yields a number (speed is not judged
//! here; see bench/ and docs/performance.md).

#![allow(clippy::unwrap_used)]

use remoteingress_bench::{run, BenchConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_measurement_produces_a_number() {
    let config = BenchConfig::quick(env!("CARGO_BIN_EXE_remoteingress").into());
    let rows = run(&config).await.unwrap();
    assert!(rows.len() >= 30, "both transports measured: {rows:?}");
    for row in &rows {
        assert!(row.tunnel.is_finite() && row.tunnel >= 0.0, "{row:?}");
        assert!(
            row.direct.is_none_or(|d| d.is_finite() && d >= 0.0),
            "{row:?}"
        );
    }
    assert!(rows
        .iter()
        .any(|r| r.name.starts_with("throughput") && r.tunnel > 0.0));
}
