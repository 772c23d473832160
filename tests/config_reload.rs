//! Configuration is never silently stale: every write to the edges file is applied (or
//! rejected loudly), generations order every change, every tunnel of an edge gets its pushes,
//! and an edge that stops reading delays nobody else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use remoteingress_hub::{AllowedEdge, HubEvent, HubHandle, HubOptions};
use remoteingress_tunnel::SessionOptions;
use sha2::{Digest, Sha256};

/// Longer than any test: only the kernel's notification can make the hub look at the file.
const NO_POLL: Duration = Duration::from_secs(3600);

/// A hub whose metrics registry the test keeps.
async fn hub_with_registry(
    state: &Path,
    change: impl FnOnce(&mut HubOptions),
) -> (HubHandle, prometheus::Registry) {
    init_logs();
    let mut options = hub_options(0);
    change(&mut options);
    let registry = options.registry.clone();
    (start_hub_with(state, options).await, registry)
}

/// Edge e1's entry in an edges file, padded to `width` bytes so that two contents can have
/// the same size.
fn edges_json(ports: &[(u16, u16)], width: usize) -> String {
    let json = serde_json::to_string(&vec![allowed("e1", ports)]).unwrap();
    format!("{json:width$}")
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the hub said of `content` in the edges file: `None` if it applied it, else its error.
/// Other reloads are skipped: a hub that reads an in-place write half done reports that too.
async fn reload_of(
    events: &mut tokio::sync::broadcast::Receiver<HubEvent>,
    content: &str,
) -> Option<String> {
    let wanted = sha256_hex(content.as_bytes());
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .expect("a reload event")
            .unwrap();
        if let HubEvent::ConfigReloaded { digest, error, .. } = event {
            if digest == wanted {
                return error;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_to_the_edges_file_is_applied_even_within_one_timestamp_tick() {
    let state = tempfile::tempdir().unwrap();
    let (hub, registry) = hub_with_registry(state.path(), |_| {}).await;
    let target = echo_target().await.addr.port();
    let file = state.path().join("edges.json");
    let (first, second, third) = (free_port(EDGE_IP), free_port(EDGE_IP), free_port(EDGE_IP));
    let width = 200;
    std::fs::write(&file, edges_json(&[(first, target)], width)).unwrap();
    hub.watch_edges_file(file.clone(), NO_POLL).await.unwrap();
    let edge = start_edge(&hub, "e1").await;
    wait_listening(&edge, first).await;
    let mut events = hub.subscribe();

    // A second write of the same size, with the modification time of the first: a hub that
    // looked at the time (or the size) would never see it.
    let stamp = std::fs::metadata(&file).unwrap().modified().unwrap();
    let content = edges_json(&[(second, target)], width);
    std::fs::write(&file, &content).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(stamp)
        .unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), stamp);
    wait_listening(&edge, second).await;
    assert_eq!(reload_of(&mut events, &content).await, None);

    // Atomic replacement: a temporary file renamed over it.
    let tmp = state.path().join(".edges.json.new");
    let content = edges_json(&[(third, target)], width);
    std::fs::write(&tmp, &content).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    wait_listening(&edge, third).await;
    assert_eq!(reload_of(&mut events, &content).await, None);
    let applied = metric(
        &registry,
        "remoteingress_config_reloads_total",
        &[("result", "applied")],
    );
    assert_eq!(applied, Some(3.0), "the first load and two changes");

    // A broken write is rejected loudly and changes nothing.
    let broken = "[{\"id\":\"e1\"";
    std::fs::write(&file, broken).unwrap();
    let error = reload_of(&mut events, broken).await;
    assert!(error.is_some_and(|e| e.contains("edges.json")));
    assert_eq!(
        metric(
            &registry,
            "remoteingress_config_last_reload_successful",
            &[]
        ),
        Some(0.0)
    );
    // (At least: a read that caught an in-place write half done was rejected too.)
    let rejected = metric(
        &registry,
        "remoteingress_config_reloads_total",
        &[("result", "rejected")],
    );
    assert!(rejected >= Some(1.0), "{rejected:?}");
    assert_eq!(hub.list_edges()[0].config.listen_ports, [third]);
    // And the next good write recovers.
    std::fs::write(&file, edges_json(&[(first, target)], width)).unwrap();
    wait_listening(&edge, first).await;
    assert_eq!(
        metric(
            &registry,
            "remoteingress_config_last_reload_successful",
            &[]
        ),
        Some(1.0)
    );
    edge.shutdown().await;
    hub.shutdown().await;
}

/// Points `dir/..data` at a new directory holding `content`, the way the kubelet updates a
/// mounted ConfigMap or Secret.
fn swap_configmap(dir: &Path, version: u32, content: &str) {
    let versioned = dir.join(format!("..2026_12_05_{version}"));
    std::fs::create_dir(&versioned).unwrap();
    std::fs::write(versioned.join("edges.json"), content).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(versioned.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_update_is_applied() {
    let state = tempfile::tempdir().unwrap();
    let (hub, _) = hub_with_registry(state.path(), |_| {}).await;
    let mount = state.path().join("mount");
    std::fs::create_dir(&mount).unwrap();
    swap_configmap(&mount, 1, &edges_json(&[(8080, 8080)], 0));
    let file: PathBuf = mount.join("edges.json");
    std::os::unix::fs::symlink("..data/edges.json", &file).unwrap();
    hub.watch_edges_file(file, NO_POLL).await.unwrap();
    assert_eq!(hub.list_edges()[0].config.listen_ports, [8080]);
    swap_configmap(&mount, 2, &edges_json(&[(8081, 8081)], 0));
    eventually("the ConfigMap's new content", || async {
        (hub.list_edges()[0].config.listen_ports == [8081]).then_some(())
    })
    .await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_rise_with_every_change_and_never_name_two_contents() {
    let state = tempfile::tempdir().unwrap();
    let (hub, _) = hub_with_registry(state.path(), |_| {}).await;
    let file = state.path().join("edges.json");
    let listed = |hub: &HubHandle| {
        let edge = hub.list_edges().remove(0);
        (edge.config.listen_ports, edge.generation)
    };
    let wait_for = |ports: Vec<u16>, generation: u64| {
        let hub = hub.clone();
        async move {
            eventually(&format!("{ports:?} at generation {generation}"), || async {
                (listed(&hub) == (ports.clone(), generation)).then_some(())
            })
            .await;
        }
    };

    // Without a generation in the file, the hub counts changes: back to an earlier content is
    // a change too.
    std::fs::write(&file, edges_json(&[(80, 80)], 0)).unwrap();
    hub.watch_edges_file(file.clone(), NO_POLL).await.unwrap();
    assert_eq!(listed(&hub), (vec![80], 1));
    std::fs::write(&file, edges_json(&[(81, 81)], 0)).unwrap();
    wait_for(vec![81], 2).await;
    std::fs::write(&file, edges_json(&[(80, 80)], 0)).unwrap();
    wait_for(vec![80], 3).await;

    // With one, a different content under the same generation is refused, with the remedy.
    let mut events = hub.subscribe();
    let with_generation = |generation: u64, port: u16| {
        serde_json::json!({"generation": generation, "edges": [allowed("e1", &[(port, port)])]})
            .to_string()
    };
    let write = |content: String| {
        std::fs::write(&file, &content).unwrap();
        content
    };
    let content = write(with_generation(10, 80));
    wait_for(vec![80], 10).await;
    assert_eq!(reload_of(&mut events, &content).await, None);
    let content = write(with_generation(10, 82));
    let error = reload_of(&mut events, &content).await;
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("raise the generation")),
        "{error:?}"
    );
    assert_eq!(listed(&hub), (vec![80], 10));
    let content = write(with_generation(9, 82));
    let error = reload_of(&mut events, &content).await;
    assert!(error.is_some_and(|e| e.contains("older")));
    write(with_generation(11, 82));
    wait_for(vec![82], 11).await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_need_a_generation_in_the_edges_file_and_give_one_content_the_same() {
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("edges.json");
    std::fs::write(&file, edges_json(&[(80, 80)], 0)).unwrap();
    let (a, _) = hub_with_registry(state.path(), |o| o.replica = true).await;
    let refused = a
        .watch_edges_file(file.clone(), NO_POLL)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("\"generation\": N") && refused.contains("edges.json"),
        "{refused}"
    );
    assert!(a.list_edges().is_empty());

    let content =
        serde_json::json!({"generation": 4, "edges": [allowed("e1", &[(80, 80)])]}).to_string();
    std::fs::write(&file, content).unwrap();
    let (b, _) = hub_with_registry(state.path(), |o| o.replica = true).await;
    for hub in [&a, &b] {
        hub.watch_edges_file(file.clone(), NO_POLL).await.unwrap();
        assert_eq!(hub.list_edges()[0].generation, 4);
    }
    a.shutdown().await;
    b.shutdown().await;

    // The binary says so and does not start.
    std::fs::write(state.path().join("plain.json"), edges_json(&[(80, 80)], 0)).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_remoteingress"))
        .args(["hub", "--replica", "--listen-address", "127.0.0.1"])
        .args(["--tunnel-port", &free_port(localhost()).to_string()])
        .args([
            "--admin-addr",
            &format!("127.0.0.1:{}", free_port(localhost())),
        ])
        .args([
            "--metrics-addr",
            &format!("127.0.0.1:{}", free_port(localhost())),
        ])
        .arg("--state-dir")
        .arg(state.path())
        .arg("--edges-file")
        .arg(state.path().join("plain.json"))
        .env("REMOTEINGRESS_ADMIN_TOKEN", "t")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let output = wait_exit(output).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("generation"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "no colour codes into a pipe: {stderr}"
    );
}

fn localhost() -> std::net::IpAddr {
    "127.0.0.1".parse().unwrap()
}

/// Waits (without blocking the runtime) for a child to exit; fails the test after 20 s.
async fn wait_exit(mut child: std::process::Child) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tunnel_of_an_edge_gets_the_replaced_set() {
    let state = tempfile::tempdir().unwrap();
    let (hub, _) = hub_with_registry(state.path(), |_| {}).await;
    hub.update_allowed_edges(vec![allowed("e1", &[(80, 80)])])
        .await
        .unwrap();
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        let mut tunnel = RawEdge::connect(&hub, "e1").await;
        tunnel.confirm_extensions().await;
        tunnels.push(tunnel);
    }
    // The last tunnel's confirmation may be read before the hub has registered it.
    eventually("the hub to list three tunnels", || async {
        (hub.status().connected_edges.len() == 3).then_some(())
    })
    .await;
    hub.update_allowed_edges(vec![allowed("e1", &[(80, 80), (443, 443)])])
        .await
        .unwrap();
    for tunnel in &mut tunnels {
        let config = tunnel.next_config().await.expect("a push on every tunnel");
        assert_eq!(config.listen_ports, [80, 443]);
    }
    hub.shutdown().await;
}

/// Edge e1's entry with `count` blocked addresses numbered from `first`: a large config.
fn large(id: &str, first: u32, count: u32) -> AllowedEdge {
    let mut edge = allowed(id, &[(80, 80)]);
    let blocked = (first..first + count)
        .map(|n| std::net::Ipv4Addr::from(0x0a00_0000 + n).to_string())
        .collect();
    edge.config.firewall_config = Some(remoteingress_wire::config::FirewallConfig {
        blocked_ips: blocked,
        ..Default::default()
    });
    edge
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_stops_reading_delays_no_admin_write() {
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("edges.json");
    let hour = Duration::from_secs(3600);
    let (hub, _) = hub_with_registry(state.path(), |options| {
        options.state_file = Some(state_file.clone());
        // Nothing but the stall may end the stalled tunnel during the test, and a short
        // control queue makes it stall soon.
        options.session = SessionOptions {
            ping_interval: hour,
            idle_timeout: hour,
            ..options.session.clone()
        };
        options.session.lanes.control_frames = 8;
    })
    .await;
    hub.update_allowed_edges(vec![
        large("stalled", 0, 10),
        allowed("reader", &[(80, 80)]),
    ])
    .await
    .unwrap();
    let _stalled = RawEdge::connect(&hub, "stalled").await;
    let mut reader = RawEdge::connect(&hub, "reader").await;

    // 400 configurations of ≈ 70 KB each: far more than the socket buffers and the control
    // queue hold, so the stalled tunnel's writer is blocked well before the end.
    let writes = async {
        for round in 0..400 {
            hub.upsert_edge(large("stalled", round, 5_000))
                .await
                .unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(120), writes)
        .await
        .expect("writes to a stalled edge's configuration were held up by it");
    let write = hub.upsert_edge(allowed("reader", &[(80, 80), (443, 443)]));
    tokio::time::timeout(Duration::from_secs(20), write)
        .await
        .expect("a write to another edge was held up by the stalled one")
        .unwrap();
    let config = reader.next_config().await.expect("the reader's push");
    assert_eq!(config.listen_ports, [80, 443]);

    // What is live is on disk.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    let stalled = saved["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "stalled")
        .unwrap();
    let blocked = &stalled["config"]["firewallConfig"]["blockedIps"];
    assert_eq!(
        blocked[0],
        std::net::Ipv4Addr::from(0x0a00_0000 + 399).to_string()
    );
    hub.shutdown().await;
}
