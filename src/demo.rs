//! `remoteingress demo`: a hub, an edge and a small HTTP target on loopback, in one process,
//! with one request sent through the tunnel to show the client's address arriving intact.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::distr::{Alphanumeric, SampleString};
use remoteingress_edge::{Edge, EdgeOptions, FirewallMode};
use remoteingress_hub::{AllowedEdge, Hub, HubOptions};
use remoteingress_tunnel::{HubIdentity, HubTrust};
use remoteingress_wire::proxy::ProxyV1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Options of the demo.
#[derive(Args)]
pub struct DemoArgs {
    /// Address the demo edge listens on (another loopback address than the target's).
    #[arg(
        long,
        env = "REMOTEINGRESS_DEMO_BIND_ADDRESS",
        default_value = "127.0.0.2"
    )]
    bind_address: IpAddr,
    /// Exit after the sample request instead of waiting for Ctrl-C.
    #[arg(long)]
    once: bool,
}

const EDGE_ID: &str = "demo-edge";

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<()> {
    let state = tempfile::tempdir().context("creating a temporary state directory")?;
    let identity = HubIdentity::load_or_generate(state.path())?;

    let target = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;
    tokio::spawn(serve_target(target));

    let hub = Hub::start(
        HubOptions {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..HubOptions::default()
        },
        &identity,
    )
    .await?;

    let edge_port = free_port(args.bind_address)
        .with_context(|| format!("no free port on {}", args.bind_address))?;
    let secret = Alphanumeric.sample_string(&mut rand::rng(), 32);
    let mut allowed = AllowedEdge::new(EDGE_ID, &secret, vec![edge_port]);
    allowed.targets.ports = BTreeMap::from([(edge_port, target_addr.port())]);
    hub.update_allowed_edges(vec![allowed]).await?;

    let hub_addr = hub.local_addr();
    let mut options = EdgeOptions::new(
        &hub_addr.ip().to_string(),
        hub_addr.port(),
        EDGE_ID,
        &secret,
        HubTrust::Pin(hub.pin().to_owned()),
    );
    options.bind_address = args.bind_address;
    options.firewall = FirewallMode::Off;
    options.stun_servers.clear();
    let edge = Edge::start(options).await?;
    // The ports may be assigned before the subscription starts: the status is the truth, each
    // event (or a short tick) is the cue to look at it again.
    let mut events = edge.subscribe();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !edge.status().listen_ports.contains(&edge_port) {
            let _ = tokio::time::timeout(Duration::from_millis(100), events.recv()).await;
        }
    })
    .await
    .context("the edge did not come up within 10 s")?;

    let edge_addr = SocketAddr::new(args.bind_address, edge_port);
    println!("hub     {hub_addr} (certificate pin {})", hub.pin());
    println!(
        "target  http://{target_addr}/ (answers with the client address from the PROXY header)"
    );
    println!("edge    {edge_addr} -> tunnel -> hub -> target");
    println!();
    let (client_addr, answer) = request(edge_addr).await?;
    println!("request from {client_addr} through the tunnel; the target answered:");
    println!("  {}", answer.trim());
    if !answer.contains(&client_addr.to_string()) {
        bail!("the target did not see the client's address {client_addr}");
    }
    println!("the client's address survived the tunnel.");
    if !args.once {
        println!();
        println!("try it yourself:  curl http://{edge_addr}/");
        println!("Ctrl-C stops the demo.");
        tokio::signal::ctrl_c().await?;
    }
    edge.shutdown().await;
    hub.shutdown().await;
    Ok(())
}

fn free_port(address: IpAddr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((address, 0))?
        .local_addr()?
        .port())
}

/// Sends one HTTP request; returns the client's own address and the response body.
async fn request(addr: SocketAddr) -> Result<(SocketAddr, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let local = stream.local_addr()?;
    stream
        .write_all(
            format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .context("no answer within 10 s")??;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or(response);
    Ok((local, body))
}

async fn serve_target(listener: TcpListener) {
    while let Ok((socket, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Err(e) = answer(socket).await {
                tracing::debug!(error = %e, "demo target: request failed");
            }
        });
    }
}

/// Reads the PROXY line and the request head, and answers with the client address.
async fn answer(mut socket: TcpStream) -> Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let (header, used) = loop {
        if let Some(parsed) = ProxyV1::parse(&buf)? {
            break parsed;
        }
        if socket.read_buf(&mut buf).await? == 0 {
            bail!("connection closed before the PROXY line");
        }
    };
    while !buf[used..].windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > 64 * 1024 || socket.read_buf(&mut buf).await? == 0 {
            bail!("incomplete HTTP request");
        }
    }
    let client = match header {
        ProxyV1::Tcp { source, .. } => source.to_string(),
        ProxyV1::Unknown => "unknown".to_owned(),
    };
    let body = format!("Hello from behind the tunnel. Your address: {client}\n");
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await?;
    Ok(())
}
