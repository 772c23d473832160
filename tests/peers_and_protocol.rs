//! A real reverse proxy (nginx with `proxy_protocol`) as the target, and a hand-written edge
//! that breaks the protocol in each way the hub must survive.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use common::*;
use remoteingress_hub::HubEvent;
use remoteingress_wire::frame::FrameType;
use remoteingress_wire::proxy::ProxyV1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nginx_binary() -> String {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .expect("nginx is not installed: ./scripts/test installs it (apt-get install nginx)")
        .to_owned()
}

/// Starts nginx answering with the client address it read from the PROXY header.
fn start_nginx(dir: &std::path::Path, port: u16) -> Nginx {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
               fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n\
               server {{\n    listen 127.0.0.1:{port} proxy_protocol;\n\
                 location / {{ return 200 \"$proxy_protocol_addr:$proxy_protocol_port\"; }}\n  }}\n}}\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(nginx_binary())
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nginx starts");
    Nginx(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_reads_the_real_client_address_from_the_proxy_header() {
    let setup = Setup::new().await;
    let nginx_port = free_port("127.0.0.1".parse().unwrap());
    let _nginx = start_nginx(setup.state.path(), nginx_port);
    eventually("nginx to listen", || async {
        TcpStream::connect(("127.0.0.1", nginx_port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let edge_port = free_port(EDGE_IP);
    setup
        .hub
        .upsert_edge(allowed("e1", &[(edge_port, nginx_port)]))
        .await
        .unwrap();
    wait_listening(&setup.edge, edge_port).await;

    let mut client = TcpStream::connect((EDGE_IP, edge_port)).await.unwrap();
    let client_addr = client.local_addr().unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    client.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.ends_with(&format!("{}:{}", client_addr.ip(), client_addr.port())),
        "nginx saw another address: {response}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_end_only_the_offending_tunnel() {
    let setup = Setup::new().await;
    setup.edge.shutdown().await;
    eventually("the hub to see the edge go", || async {
        setup.hub.status().connected_edges.is_empty().then_some(())
    })
    .await;
    let open = ProxyV1::tcp(
        "203.0.113.7:5000".parse().unwrap(),
        std::net::SocketAddr::new(EDGE_IP, setup.edge_port),
    )
    .to_line();
    let open = open.as_bytes();
    let oversized = {
        let mut bytes = frames(&[(1, FrameType::Data, b"")]);
        bytes[5..9].copy_from_slice(&(17u32 << 20).to_be_bytes());
        bytes
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown frame type", vec![0, 0, 0, 1, 0x42, 0, 0, 0, 0]),
        ("exceeds the limit", oversized),
        (
            "reused or decreasing",
            frames(&[(5, FrameType::Open, open), (5, FrameType::Open, open)]),
        ),
        ("unknown stream", frames(&[(9, FrameType::Data, b"x")])),
        (
            "credit",
            // The hub granted a full window at OPEN; 5 MiB is more than any window.
            frames(&[
                (1, FrameType::Open, open),
                (1, FrameType::Data, &vec![0u8; 5 << 20]),
            ]),
        ),
        (
            "zero bytes",
            frames(&[
                (1, FrameType::Open, open),
                (1, FrameType::WindowUpdate, &[0, 0, 0, 0]),
            ]),
        ),
        (
            "data after close",
            frames(&[
                (1, FrameType::Open, open),
                (1, FrameType::Close, b""),
                (1, FrameType::Data, b"late"),
            ]),
        ),
        (
            "too many empty DATA frames",
            frames(&vec![(1, FrameType::Data, &b""[..]); 101]),
        ),
        (
            "PONG without a matching PING",
            frames(&[(0, FrameType::Pong, b"12345678")]),
        ),
        (
            "unexpected DataBack",
            frames(&[(1, FrameType::DataBack, b"x")]),
        ),
    ];
    for (expected, bytes) in cases {
        let mut events = setup.hub.subscribe();
        let mut edge = RawEdge::connect(&setup.hub, "e1").await;
        edge.send_bytes(&bytes).await;
        let reason = loop {
            let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .unwrap_or_else(|_| panic!("no disconnect for {expected}"))
                .unwrap();
            if let HubEvent::EdgeDisconnected { reason, .. } = event {
                break reason;
            }
        };
        assert!(
            reason.contains(expected),
            "expected {expected:?}, got {reason:?}"
        );
        eventually("the hub to forget the tunnel", || async {
            setup.hub.status().connected_edges.is_empty().then_some(())
        })
        .await;
    }
    let edge = start_edge(&setup.hub, "e1").await;
    wait_listening(&edge, setup.edge_port).await;
    let data = pattern(5000, 2);
    assert_eq!(round_trip(setup.edge_addr(), &data).await, data);
}
