//! The released binaries driven by `buf curl` (npm @bufbuild/buf, installed by scripts/test),
//! with no .proto at hand: everything comes from server reflection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::*;

fn buf() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node_modules/.bin/buf");
    assert!(
        path.exists(),
        "buf is missing: run `npm ci` (./scripts/test does)"
    );
    path
}

/// Runs `buf curl` over plaintext HTTP/2 from a directory without buf.yaml, so that the schema
/// comes from reflection.
fn buf_curl(args: &[&str]) -> Output {
    Command::new(buf())
        .current_dir(std::env::temp_dir())
        .args(["curl", "--protocol", "grpc", "--http2-prior-knowledge"])
        .args(args)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buf_curl_lists_and_calls_both_apis_through_reflection() {
    let state = tempfile::tempdir().unwrap();
    let localhost = "127.0.0.1".parse().unwrap();
    let (tunnel, admin, status) = (
        free_port(localhost),
        free_port(localhost),
        free_port(localhost),
    );
    let state_dir = state.path().display().to_string();
    let _hub = spawn_binary(
        &[
            "hub".into(),
            "--listen-address=127.0.0.1".into(),
            format!("--tunnel-port={tunnel}"),
            format!("--admin-addr=127.0.0.1:{admin}"),
            format!("--metrics-addr=127.0.0.1:{}", free_port(localhost)),
            format!("--state-dir={state_dir}"),
        ],
        &[("REMOTEINGRESS_ADMIN_TOKEN", "t0ken")],
    );
    let _edge = spawn_binary(
        &[
            "edge".into(),
            "--hub-host=127.0.0.1".into(),
            format!("--hub-port={tunnel}"),
            "--edge-id=e1".into(),
            "--secret=s".into(),
            "--insecure".into(),
            "--firewall=off".into(),
            "--no-stun".into(),
            format!("--status-addr=127.0.0.1:{status}"),
            format!("--metrics-addr=127.0.0.1:{}", free_port(localhost)),
        ],
        &[],
    );
    wait_port(admin).await;
    wait_port(status).await;
    let hub_url = format!("http://127.0.0.1:{admin}");
    let auth = "Authorization: Bearer t0ken";

    let services = buf_curl(&["--reflect-header", auth, "--list-services", &hub_url]);
    assert!(services.status.success(), "{}", text(&services));
    assert!(
        text(&services).contains("remoteingress.v1.HubAdmin"),
        "{}",
        text(&services)
    );

    let method = format!("{hub_url}/remoteingress.v1.HubAdmin/GetStatus");
    let status_call = buf_curl(&["--reflect-header", auth, "-H", auth, "-d", "{}", &method]);
    assert!(status_call.status.success(), "{}", text(&status_call));
    let json: serde_json::Value = serde_json::from_slice(&status_call.stdout).unwrap();
    assert_eq!(json["running"], true);
    assert_eq!(json["tunnelPort"], tunnel);

    let refused = buf_curl(&["--reflect-header", auth, "-d", "{}", &method]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("unauthenticated"),
        "{}",
        text(&refused)
    );

    let edge_url = format!("http://127.0.0.1:{status}");
    let services = buf_curl(&["--list-services", &edge_url]);
    assert!(
        text(&services).contains("remoteingress.v1.EdgeStatus"),
        "{}",
        text(&services)
    );
    assert!(!text(&services).contains("HubAdmin"), "{}", text(&services));
    let edge_method = format!("{edge_url}/remoteingress.v1.EdgeStatus/GetStatus");
    // The edge is not allowed on the hub: its status says why it is not connected.
    eventually("the edge status to show the refusal", || async {
        let output = buf_curl(&["-d", "{}", &edge_method]);
        assert!(output.status.success(), "{}", text(&output));
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(json["running"], true);
        json["lastError"]
            .as_str()
            .is_some_and(|error| error.contains("unauthorized"))
            .then_some(())
    })
    .await;
}
