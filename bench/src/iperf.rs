//! iperf3 beside the built-in generator: a server as a target, and clients through the tunnel
//! and directly (when `iperf3` is on PATH).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::processes::{free_port, wait_accepting, Process};
use crate::targets::start_proxy_stripper;

/// A running iperf3 server on 127.0.0.1, behind a relay that drops the PROXY line our hub sends
/// (iperf3 does not speak PROXY; every system and the direct path go through the same relay).
#[derive(Debug)]
pub struct Server {
    /// The relay's port.
    pub port: u16,
    _process: Process,
}

impl Server {
    /// Starts `iperf3 -s` on a free port and its relay; `None` when iperf3 is not on PATH.
    pub async fn start() -> Result<Option<Self>> {
        let port = free_port("127.0.0.1")?;
        let child = Command::new("iperf3")
            .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!("note: no iperf3 on PATH (apt install iperf3): no iperf3 rows");
            return Ok(None);
        };
        let process = Process::new(child);
        let server = SocketAddr::from(([127, 0, 0, 1], port));
        wait_accepting(server).await?;
        Ok(Some(Self {
            port: start_proxy_stripper(server).await?.port(),
            _process: process,
        }))
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Gbit/s an iperf3 client with `streams` parallel streams sends through `addr` for
    /// `duration` (whole seconds, at least one), as the server received it. A client that has
    /// not finished 30 s after its time is killed.
    pub async fn measure(
        &self,
        addr: SocketAddr,
        streams: usize,
        duration: Duration,
    ) -> Result<f64> {
        let secs = duration.as_secs().max(1);
        let client = tokio::process::Command::new("iperf3")
            .args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-t", &secs.to_string(), "-P", &streams.to_string(), "-J"])
            .args(["--connect-timeout", "5000"])
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(secs + 30), client)
            .await
            .with_context(|| format!("iperf3 through {addr} did not finish"))?
            .context("running iperf3")?;
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("iperf3's JSON report")?;
        let bits = report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| {
                format!(
                    "iperf3 through {addr} reported no rate: {}",
                    report["error"]
                )
            })?;
        Ok(bits / 1e9)
    }
}
