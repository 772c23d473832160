//! frp: its server `frps` (the public side, like our edge) and client `frpc` (the private side,
//! like our hub), over TLS with its stream multiplexing (tcpMux, both frp's defaults) or over its
//! QUIC transport, configured here.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::peers::PeerRun;
use crate::processes::{free_port, free_udp_port, wait_accepting, PortMap, Process, EDGE_IP};

/// frp's transport between frpc and frps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrpTransport {
    /// TCP with TLS and tcpMux.
    Tls,
    /// QUIC.
    Quic,
}

/// Starts frps and frpc (`binaries` in that order), forwarding each public port (on
/// [`EDGE_IP`]) to `127.0.0.1:<target>`, and waits until every public TCP port accepts.
pub async fn start(
    binaries: &[&Path; 2],
    transport: FrpTransport,
    ports: &PortMap,
) -> Result<PeerRun> {
    let dir = tempfile::tempdir()?;
    let bind_port = free_port("127.0.0.1")?;
    let quic_port = free_udp_port("127.0.0.1", &[])?;
    let server = format!(
        "bindAddr = \"127.0.0.1\"\nbindPort = {bind_port}\nquicBindPort = {quic_port}\n\
         proxyBindAddr = \"{EDGE_IP}\"\nauth.token = \"bench\"\nlog.level = \"warn\"\n"
    );
    let (protocol, server_port) = match transport {
        FrpTransport::Tls => ("tcp", bind_port),
        FrpTransport::Quic => ("quic", quic_port),
    };
    let mut client = format!(
        "serverAddr = \"127.0.0.1\"\nserverPort = {server_port}\nauth.token = \"bench\"\n\
         log.level = \"warn\"\ntransport.protocol = \"{protocol}\"\ntransport.tls.enable = true\n\
         transport.tcpMux = true\nloginFailExit = false\n"
    );
    let proxies = ports
        .tcp
        .iter()
        .map(|p| ("tcp", p))
        .chain(ports.udp.iter().map(|p| ("udp", p)));
    for (kind, (public, target)) in proxies {
        client.push_str(&format!(
            "[[proxies]]\nname = \"{kind}{public}\"\ntype = \"{kind}\"\nlocalIP = \"127.0.0.1\"\n\
             localPort = {target}\nremotePort = {public}\n"
        ));
    }
    let spawn = |binary: &Path, name: &str, config: String| -> Result<Process> {
        let file = dir.path().join(name);
        std::fs::write(&file, config)?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Process::new(child))
    };
    let server = spawn(binaries[0], "frps.toml", server)?;
    let client = spawn(binaries[1], "frpc.toml", client)?;
    for port in ports.tcp.keys() {
        wait_accepting(std::net::SocketAddr::new(EDGE_IP.parse()?, *port)).await?;
    }
    Ok(PeerRun {
        server,
        client,
        _dir: dir,
    })
}
