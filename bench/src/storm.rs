//! Reconnect storms: many light edges connect at once to a fresh hub, then again to the same
//! hub restarted (as after a hub restart, holding the session tickets of their first
//! connection), each retrying with the edge's backoff (full jitter). Also the hub's CPU per full
//! and per resumed handshake, over both transports.
//!
//! Each edge connects from an address of its own (127.x.y.z), as a fleet does, so the hub's
//! per-address limits do not stand in for its admission.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use remoteingress_tunnel::quic::{client_config as quic_client_config, client_endpoint_with};
use remoteingress_tunnel::tls::client_config;
use remoteingress_tunnel::{HubTrust, Link, SessionOptions};
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use tokio::net::TcpSocket;
use tokio_rustls::{TlsConnector, TlsStream};

pub use crate::edges::{edge_id, IdleEdge, SECRET};
use crate::edges::{handshake, settled_rss};
use crate::processes::{cpu_seconds, Hub};
use crate::Row;

/// How long a storm may take before the edges not connected yet are counted as such.
const STORM_LIMIT: Duration = Duration::from_secs(120);
/// The edge's connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The edge's backoff: first and largest nominal delay.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The address light edge `n` connects from.
fn source(n: usize) -> SocketAddr {
    let octet = |value: usize| u8::try_from(value).unwrap_or(u8::MAX);
    let address = Ipv4Addr::new(
        127,
        octet(1 + n / 62_500),
        octet((n / 250) % 250 + 1),
        octet(n % 250 + 1),
    );
    SocketAddr::from((address, 0))
}

/// What one edge went through in a storm.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Since the storm began, once connected.
    pub connected_after: Option<Duration>,
    /// Connection attempts made.
    pub attempts: u32,
    /// Attempts refused or reset after the TLS handshake had completed: work the hub wasted.
    pub wasted: u32,
}

/// One TLS connector per light edge `0..count` trusting the hub pinned as `pin`, each keeping
/// its own session tickets, as separate edges do.
pub fn connectors(pin: &str, count: usize) -> Result<Vec<TlsConnector>> {
    let base = client_config(&HubTrust::Pin(pin.to_owned()))?;
    Ok((0..count)
        .map(|_| {
            let mut config = (*base).clone();
            config.resumption = Resumption::in_memory_sessions(4);
            TlsConnector::from(Arc::new(config))
        })
        .collect())
}

/// Light edge `n` of `connectors` connects (as `edge-n` of [`edge_id`], with [`SECRET`]) to
/// the hub at `tunnel`, all at once, each retrying until connected or two minutes are over.
/// The sessions of the connected edges are returned with the outcomes.
pub async fn connect_all(
    tunnel: SocketAddr,
    connectors: &[TlsConnector],
) -> Result<(Vec<Outcome>, Vec<IdleEdge>)> {
    let began = Instant::now();
    let tasks: Vec<_> = connectors
        .iter()
        .enumerate()
        .map(|(n, connector)| tokio::spawn(storm_edge(n, tunnel, connector.clone(), began)))
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    let mut held = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (outcome, session) = task.await.context("storm edge task")?;
        outcomes.push(outcome);
        held.extend(session);
    }
    Ok((outcomes, held))
}

/// Rows for storms of each of `counts` edges over TLS: to a fresh hub, and to it restarted.
pub async fn reconnect_storms(binary: &Path, counts: &[usize]) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &count in counts {
        let edges: Vec<_> = (0..count)
            .map(|n| serde_json::json!({"id": edge_id(n), "secret": SECRET}))
            .collect();
        let edges = serde_json::Value::Array(edges);
        let hub = Hub::start(binary, &edges).await?;
        let configs = connectors(&hub.pin, count)?;
        let fresh = storm(&hub, &configs).await?;
        rows.extend(storm_rows(
            &format!("storm of {count} edges, fresh hub"),
            count,
            &fresh,
        ));
        drop(fresh);
        let hub = hub.restart(binary).await?;
        let restarted = storm(&hub, &configs).await?;
        rows.extend(storm_rows(
            &format!("storm of {count} edges, restarted hub"),
            count,
            &restarted,
        ));
    }
    Ok(rows)
}

/// A storm's results: each edge's outcome, the hub's CPU and RSS with all edges connected.
struct Storm {
    outcomes: Vec<Outcome>,
    hub_cpu: f64,
    hub_rss: u64,
    _held: Vec<IdleEdge>,
}

/// Every edge of `configs` connects to `hub` at once, retrying until connected.
async fn storm(hub: &Hub, configs: &[TlsConnector]) -> Result<Storm> {
    let tunnel = SocketAddr::from(([127, 0, 0, 1], hub.tunnel_port));
    let pid = hub.process.pid();
    let cpu_before = cpu_seconds(&[pid])?;
    let (outcomes, held) = connect_all(tunnel, configs).await?;
    let hub_cpu = cpu_seconds(&[pid])? - cpu_before;
    let hub_rss = settled_rss(pid).await?;
    Ok(Storm {
        outcomes,
        hub_cpu,
        hub_rss,
        _held: held,
    })
}

/// One edge's attempts until it is connected or the storm's limit has passed.
async fn storm_edge(
    n: usize,
    tunnel: SocketAddr,
    connector: TlsConnector,
    began: Instant,
) -> (Outcome, Option<IdleEdge>) {
    let mut outcome = Outcome::default();
    let mut nominal = BACKOFF_MIN;
    while began.elapsed() < STORM_LIMIT {
        outcome.attempts += 1;
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt(n, tunnel, &connector)).await {
            Ok(Ok(session)) => {
                outcome.connected_after = Some(began.elapsed());
                return (outcome, Some(session));
            }
            Ok(Err(Attempt::AfterTls)) => outcome.wasted += 1,
            Ok(Err(Attempt::BeforeTls)) | Err(_) => {}
        }
        tokio::time::sleep(nominal.mul_f64(rand::random::<f64>())).await;
        nominal = (nominal * 2).min(BACKOFF_MAX);
    }
    (outcome, None)
}

/// How far a failed attempt got.
enum Attempt {
    BeforeTls,
    AfterTls,
}

async fn attempt(
    n: usize,
    tunnel: SocketAddr,
    connector: &TlsConnector,
) -> Result<IdleEdge, Attempt> {
    let socket = TcpSocket::new_v4().map_err(|_| Attempt::BeforeTls)?;
    socket.bind(source(n)).map_err(|_| Attempt::BeforeTls)?;
    let tcp = socket
        .connect(tunnel)
        .await
        .map_err(|_| Attempt::BeforeTls)?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("127.0.0.1").map_err(|_| Attempt::BeforeTls)?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|_| Attempt::BeforeTls)?;
    let link = Link::Tls(Box::new(TlsStream::Client(tls)));
    handshake(link, &edge_id(n))
        .await
        .map_err(|_| Attempt::AfterTls)
}

fn storm_rows(name: &str, count: usize, storm: &Storm) -> Vec<Row> {
    let mut times: Vec<f64> = storm
        .outcomes
        .iter()
        .filter_map(|o| o.connected_after.map(|t| t.as_secs_f64()))
        .collect();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| -> f64 {
        if times.is_empty() {
            return f64::NAN;
        }
        times[((times.len() - 1) as f64 * q).round() as usize]
    };
    let retries: u32 = storm.outcomes.iter().map(|o| o.attempts - 1).sum();
    let wasted: u32 = storm.outcomes.iter().map(|o| o.wasted).sum();
    let per_edge = |total: f64| total / count as f64;
    vec![
        Row::new(
            &format!("{name}: connected"),
            "edges",
            None,
            times.len() as f64,
        ),
        Row::new(&format!("{name}: time to connect, p50"), "s", None, at(0.5)),
        Row::new(
            &format!("{name}: time to connect, p99"),
            "s",
            None,
            at(0.99),
        ),
        Row::new(&format!("{name}: time to connect, max"), "s", None, at(1.0)),
        Row::new(
            &format!("{name}: retries"),
            "per edge",
            None,
            per_edge(f64::from(retries)),
        ),
        Row::new(
            &format!("{name}: handshakes wasted (reset or refused after TLS)"),
            "% of edges",
            None,
            per_edge(f64::from(wasted)) * 100.0,
        ),
        Row::new(
            &format!("{name}: hub CPU per edge"),
            "ms",
            None,
            per_edge(storm.hub_cpu) * 1000.0,
        ),
        Row::new(
            &format!("{name}: hub RSS, all connected"),
            "MiB",
            None,
            storm.hub_rss as f64 / 1048576.0,
        ),
    ]
}

/// Hub CPU per full and per resumed handshake (with the handshake line and the session's
/// start and end, the same for both), over `transport`, from `count` handshakes of each.
pub async fn handshake_cost(binary: &Path, transport: &str, count: usize) -> Result<Vec<Row>> {
    let edges = serde_json::json!([{"id": edge_id(0), "secret": SECRET}]);
    let hub = Hub::start(binary, &edges).await?;
    let trust = HubTrust::Pin(hub.pin.clone());
    let pid = hub.process.pid();
    let mut rows = Vec::new();
    for resumed in [false, true] {
        let shared_tls = TlsConnector::from(client_config(&trust)?);
        let shared_quic = quic_client_config(&trust, &SessionOptions::default())?;
        // One connection first, so the shared configurations hold a ticket.
        let connect = |fresh: bool| {
            let (tls, quic) = (shared_tls.clone(), shared_quic.clone());
            let trust = trust.clone();
            let port = hub.tunnel_port;
            async move {
                let link = if transport == "quic" {
                    let config = match fresh {
                        true => quic_client_config(&trust, &SessionOptions::default())?,
                        false => quic,
                    };
                    let endpoint = client_endpoint_with(config)?;
                    Link::connect_quic(&endpoint, "127.0.0.1", port, "localhost").await?
                } else {
                    let connector = match fresh {
                        true => TlsConnector::from(client_config(&trust)?),
                        false => tls,
                    };
                    let name = ServerName::try_from("127.0.0.1").context("server name")?;
                    Link::connect_tls(&connector, name, "127.0.0.1", port).await?
                };
                let (session, _events) = handshake(link, &edge_id(0)).await?;
                session.close("measured");
                anyhow::Ok(())
            }
        };
        connect(false).await?;
        let before = cpu_seconds(&[pid])?;
        for _ in 0..count {
            connect(!resumed).await?;
        }
        let cpu = cpu_seconds(&[pid])? - before;
        let kind = if resumed { "resumed" } else { "full" };
        rows.push(Row::new(
            &format!("hub CPU per {kind} handshake"),
            "ms",
            None,
            cpu / count.max(1) as f64 * 1000.0,
        ));
    }
    Ok(rows)
}
