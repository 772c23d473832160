//! Public-IP discovery against a real STUN server: Debian's coturn in `--stun-only` mode on
//! loopback (installed by scripts/test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::process::{Command, Stdio};

use common::*;
use remoteingress_edge::Edge;

/// Starts coturn in STUN-only mode on 127.0.0.1:`port` (UDP only, no RFC 5780 alternate
/// port, its own pid file) with its log in `log`.
fn coturn(port: u16, log: &std::path::Path) -> Process {
    let binary = ["/usr/bin/turnserver", "/usr/sbin/turnserver"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("coturn is not installed: ./scripts/test installs it (apt-get install coturn)");
    let pidfile = log.with_extension("pid");
    Process(
        Command::new(binary)
            .args([
                "--stun-only",
                "--listening-ip=127.0.0.1",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
            ])
            .args([
                "--no-tcp",
                "--no-rfc5780",
                "--no-software-attribute",
                "--log-file=stdout",
            ])
            .arg(format!("--listening-port={port}"))
            .arg(format!("--pidfile={}", pidfile.display()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_learns_its_address_from_coturn_and_the_hub_ignores_a_loopback_one() {
    let logs = tempfile::tempdir().unwrap();
    let quick = remoteingress_edge::stun::StunTiming {
        rto: std::time::Duration::from_millis(50),
        requests: 2,
        final_wait: 2,
    };
    // A coturn that does not answer within a few seconds is replaced by one on another port;
    // what the last one logged is shown if none answers.
    let mut started = None;
    let mut last_log = String::new();
    for attempt in 0..3 {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = logs.path().join(format!("coturn-{attempt}.log"));
        let process = coturn(port, &log);
        let server = format!("127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while started.is_none() && std::time::Instant::now() < deadline {
            if remoteingress_edge::stun::discover(&server, quick)
                .await
                .is_ok()
            {
                started = Some(port);
            }
        }
        if let Some(port) = started {
            return run_with_coturn(port, process, logs).await;
        }
        last_log = std::fs::read_to_string(&log).unwrap_or_default();
    }
    panic!("coturn never answered; its log:\n{last_log}");
}

/// The test proper, with a coturn that answers on `port` (kept running, with its log, until
/// the end).
async fn run_with_coturn(port: u16, _coturn: Process, _logs: tempfile::TempDir) {
    let setup = Setup::new().await;
    setup.edge.shutdown().await;
    let mut options = edge_options(&setup.hub, "e1", SECRET);
    // An unreachable first server shows the fallback to the next one.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    options.stun_servers = vec![dead.to_string(), format!("127.0.0.1:{port}")];
    options.stun_timing.rto = std::time::Duration::from_millis(50);
    options.stun_timing.requests = 3;
    let registry = options.registry.clone();
    let edge = Edge::start(options).await.unwrap();
    let loopback: IpAddr = "127.0.0.1".parse().unwrap();
    eventually("the edge to learn its address", || async {
        (edge.status().public_ip == Some(loopback)).then_some(())
    })
    .await;
    // The hub ignores an address that is not global unicast (an edge could report anything):
    // once the hub has had the edge's acknowledgement of a later configuration, it has read
    // the report too, and shows nothing.
    let mut events = setup.hub.subscribe();
    let extra = free_port(EDGE_IP);
    let ports = [
        (setup.edge_port, setup.target.addr.port()),
        (extra, setup.target.addr.port()),
    ];
    setup
        .hub
        .update_allowed_edges(vec![allowed("e1", &ports)])
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        use remoteingress_hub::HubEvent;
        let mut pushed = None;
        loop {
            match events.recv().await.unwrap() {
                HubEvent::ConfigPushed { version, .. } => pushed = Some(version),
                HubEvent::ConfigApplied { version, .. } if Some(version) == pushed => return,
                _ => {}
            }
        }
    })
    .await
    .expect("the edge applies the new configuration");
    assert_eq!(setup.hub.status().connected_edges[0].public_ip, None);
    let exposition = {
        use prometheus::Encoder;
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        String::from_utf8(text).unwrap()
    };
    assert!(
        exposition.contains("remoteingress_public_ip_info{ip=\"127.0.0.1\"} 1"),
        "{exposition}"
    );
    edge.shutdown().await;
}
