//! Public-IP discovery against a real STUN server: Debian's coturn in `--stun-only` mode on
//! loopback (installed by scripts/test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::process::{Command, Stdio};

use common::*;
use remoteingress_edge::Edge;

fn coturn(port: u16) -> Process {
    let binary = ["/usr/bin/turnserver", "/usr/sbin/turnserver"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("coturn is not installed: ./scripts/test installs it (apt-get install coturn)");
    Process(
        Command::new(binary)
            .args([
                "--stun-only",
                "--listening-ip=127.0.0.1",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
            ])
            .arg(format!("--listening-port={port}"))
            .args(["--log-file=stdout", "--no-software-attribute"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_learns_its_address_from_coturn_and_reports_it_to_the_hub() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _coturn = coturn(port);
    let server = format!("127.0.0.1:{port}");
    let quick = remoteingress_edge::stun::StunTiming {
        rto: std::time::Duration::from_millis(50),
        requests: 2,
        final_wait: 2,
    };
    eventually("coturn to answer", || async {
        remoteingress_edge::stun::discover(&server, quick)
            .await
            .ok()
    })
    .await;
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
    eventually("the hub to show it", || async {
        let status = setup.hub.status();
        (status.connected_edges.first()?.public_ip == Some(loopback)).then_some(())
    })
    .await;
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
