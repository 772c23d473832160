//! An edge given no pin and no CA file verifies the hub by its host name against the system's
//! trust store (`SSL_CERT_FILE` names it here), and refuses a hub that store does not trust
//! before sending its secret, saying what to add.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{allowed, eventually, free_port, start_hub, Process, TestCa, EDGE_IP, SECRET};
use remoteingress_hub::HubHandle;

/// What an edge process without a pin writes to its log.
struct PinlessEdge {
    _process: Process,
    log: tempfile::NamedTempFile,
}

impl PinlessEdge {
    /// An edge of `hub`, dialled as `host`, with no pin and no CA file, and `extra` flags;
    /// `trusted` is the CA file its `SSL_CERT_FILE` names.
    fn start(hub: &HubHandle, host: &str, trusted: &Path, extra: &[&str]) -> Self {
        let log = tempfile::NamedTempFile::new().unwrap();
        let no_cert_dir = tempfile::tempdir().unwrap();
        let localhost = "127.0.0.1".parse().unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_remoteingress"))
            .args([
                "edge".to_owned(),
                format!("--hub-host={host}"),
                format!("--hub-port={}", hub.local_addr().port()),
                "--edge-id=e1".into(),
                format!("--secret={SECRET}"),
                format!("--bind-address={EDGE_IP}"),
                format!("--status-addr=127.0.0.1:{}", free_port(localhost)),
                format!("--metrics-addr=127.0.0.1:{}", free_port(localhost)),
                "--firewall=off".into(),
                "--no-stun".into(),
                "--reconnect-min-ms=50".into(),
                "--reconnect-max-secs=1".into(),
            ])
            .args(extra)
            .env("SSL_CERT_FILE", trusted)
            .env("SSL_CERT_DIR", no_cert_dir.path())
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        Self {
            _process: Process(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

fn connected(hub: &HubHandle) -> bool {
    hub.status().connected_edges.iter().any(|e| e.id == "e1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinless_edge_trusts_a_hub_signed_by_a_ca_of_its_trust_store() {
    let ca = TestCa::new(&["localhost"]);
    let state = tempfile::tempdir().unwrap();
    std::fs::copy(ca.file("tls.crt"), state.path().join("hub-cert.pem")).unwrap();
    std::fs::copy(ca.file("tls.key"), state.path().join("hub-key.pem")).unwrap();
    let hub = start_hub(state.path(), 0).await;
    hub.update_allowed_edges(vec![allowed("e1", &[])])
        .await
        .unwrap();

    let edge = PinlessEdge::start(&hub, "localhost", &ca.file("ca.crt"), &[]);
    eventually("the pinless edge connected", || async {
        connected(&hub).then_some(())
    })
    .await;
    assert!(!edge.log().contains("not trusted"), "{}", edge.log());
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinless_edge_refuses_a_self_signed_hub_and_says_what_to_add() {
    refuses_a_self_signed_hub("localhost", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinless_quic_edge_refuses_a_self_signed_hub_and_says_what_to_add() {
    // By address: the edge dials QUIC to the first address a name resolves to, and `localhost`
    // may resolve to ::1 first, where this hub does not listen.
    refuses_a_self_signed_hub("127.0.0.1", &["--transport-mode=quic"]).await;
}

async fn refuses_a_self_signed_hub(host: &str, extra: &[&str]) {
    let other_ca = TestCa::new(&["localhost"]);
    let state = tempfile::tempdir().unwrap();
    let hub = start_hub(state.path(), 0).await;
    hub.update_allowed_edges(vec![allowed("e1", &[])])
        .await
        .unwrap();

    let edge = PinlessEdge::start(&hub, host, &other_ca.file("ca.crt"), extra);
    let log = eventually("the edge's refusal", || async {
        let log = edge.log();
        log.contains("not trusted by this machine's trust store")
            .then_some(log)
    })
    .await;
    for hint in ["pin", "--hub-pin", "--ca-file"] {
        assert!(log.contains(hint), "the refusal names {hint}: {log}");
    }
    assert!(!connected(&hub), "the edge never got in");
    hub.shutdown().await;
}
