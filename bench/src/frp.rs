//! frp: its server `frps` (the public side, like our edge) and client `frpc` (the private side,
//! like our hub), over TLS with its stream multiplexing (tcpMux, both frp's defaults) or over its
//! QUIC transport, configured here.

use std::path::Path;

use anyhow::Result;

use crate::peers::{PeerProcess, PeerRun};
use crate::processes::{free_port, free_udp_port, PortMap, EDGE_IP};

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
    for (kind, public, target) in ports.services() {
        client.push_str(&format!(
            "[[proxies]]\nname = \"{kind}{public}\"\ntype = \"{kind}\"\nlocalIP = \"127.0.0.1\"\n\
             localPort = {target}\nremotePort = {public}\n"
        ));
    }
    let process = |binary, file, config| PeerProcess {
        binary,
        file,
        config,
        args: &["-c"],
    };
    PeerRun::start(
        dir,
        [
            process(binaries[0], "frps.toml", server),
            process(binaries[1], "frpc.toml", client),
        ],
        ports,
    )
    .await
}
