//! Tunnels on a lossy path: nftables drops a share of the tunnel's packets (TCP and UDP to and
//! from the hub's tunnel port, both ways) at random, as a lossy link would; this kernel has no
//! netem. The bench then runs in a network namespace of its own whose loopback has the MTU of
//! an Ethernet path, so a dropped packet costs what it costs on one.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::processes::{PortMap, Tunnel};
use crate::{connection_rate, latency, throughput, BenchConfig, Row, Targets, Via, TRANSPORTS};

/// Shares of packets dropped, in percent; 0 is the same path without loss, for comparison.
const LOSS_PERCENTS: [u32; 3] = [0, 1, 5];
/// The MTU of the loopback while the loss rows run.
const PATH_MTU: &str = "1500";
/// The longest a measurement may take beyond its own length before it counts as stalled.
const STALL: Duration = Duration::from_secs(60);
/// Request/response rounds for the p99 on a lossy path: each lost packet costs a
/// retransmission timeout, so the full run's rounds would take minutes.
const LOSSY_LATENCY_ROUNDS: usize = 2_000;

/// Moves this process (it must not have started threads yet) into a network namespace of its
/// own, loopback up with an Ethernet MTU, so that its drop rules touch nothing else.
pub fn enter_private_network() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("the loss rows need a network namespace of their own: run as root")?;
    for args in [["link", "set", "lo", "up"], ["link", "set", "lo", "mtu"]] {
        let mut command = Command::new("ip");
        command.args(args);
        if args[3] == "mtu" {
            command.arg(PATH_MTU);
        }
        if !command.status().context("running ip")?.success() {
            bail!("ip {args:?} failed");
        }
    }
    Ok(())
}

/// Random drops of `percent` of the packets to and from one port, while it lives.
struct Drops;

impl Drops {
    fn apply(port: u16, percent: u32) -> Result<Self> {
        let rules = format!(
            "table inet bench_loss {{
               chain input {{ type filter hook input priority -300;
                 meta l4proto {{ tcp, udp }} th dport {port} numgen random mod 100 < {percent} drop;
                 meta l4proto {{ tcp, udp }} th sport {port} numgen random mod 100 < {percent} drop; }}
             }}"
        );
        nft(&["-f", "-"], Some(&rules))?;
        Ok(Self)
    }
}

impl Drop for Drops {
    fn drop(&mut self) {
        let _ = nft(&["delete", "table", "inet", "bench_loss"], None);
    }
}

fn nft(args: &[&str], input: Option<&str>) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running nft")?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input.as_bytes())?;
    }
    if !child.wait()?.success() {
        bail!("nft {args:?} failed");
    }
    Ok(())
}

/// A measurement's figure, or 0 with a note when it failed or stalled.
async fn figure(
    what: &str,
    length: Duration,
    measure: impl std::future::Future<Output = Result<f64>>,
) -> f64 {
    match tokio::time::timeout(length + STALL, measure).await {
        Ok(Ok(figure)) => figure,
        Ok(Err(error)) => {
            eprintln!("note: {what} failed: {error:#}");
            0.0
        }
        Err(_) => {
            eprintln!("note: {what} stalled");
            0.0
        }
    }
}

/// For each transport and loss: goodput of 1 and 8 streams, new connections per second, the
/// p99 of request/response rounds, and the tunnel reconnects the run cost.
pub(crate) async fn lossy_path(config: &BenchConfig, targets: &Targets) -> Result<Vec<Row>> {
    let secs = Duration::from_secs_f64(config.throughput_secs);
    let connect = Duration::from_secs_f64(config.connect_secs);
    let mut rows = Vec::new();
    for transport in TRANSPORTS {
        for percent in LOSS_PERCENTS {
            let via = Via::pick()?;
            let ports: PortMap = via.ports(targets);
            let tunnel = Tunnel::start(&config.binary, &ports, transport).await?;
            let _drops = Drops::apply(tunnel.hub.tunnel_port, percent)?;
            let name = |what: &str| format!("{what}, {percent}% loss [{transport}]");
            for streams in [1usize, 8] {
                let what = name(&format!("goodput, {streams} stream(s)"));
                let gbit = figure(&what, secs, async {
                    Ok(throughput(via.sink, &targets.sink, streams, secs)
                        .await?
                        .gbit_per_sec())
                })
                .await;
                rows.push(Row::new(&what, "Gbit/s", None, gbit));
            }
            let what = name("new connections");
            let rate = figure(&what, connect, connection_rate(via.echo, connect)).await;
            rows.push(Row::new(&what, "conn/s", None, rate));
            let what = name("latency p99");
            let rounds = config.latency_rounds.min(LOSSY_LATENCY_ROUNDS);
            let p99 = figure(&what, secs, async {
                Ok(latency(&[via.echo], rounds).await?[0][1])
            })
            .await;
            rows.push(Row::new(&what, "µs", None, p99));
            let reconnects = tunnel
                .edge_metric("remoteingress_tunnel_reconnects_total")
                .await;
            rows.push(Row::new(
                &name("tunnel reconnects"),
                "count",
                None,
                reconnects.unwrap_or(0.0),
            ));
        }
    }
    Ok(rows)
}
