//! rathole: its server (the public side, like our edge) and client (the private side, like our
//! hub) with its TLS transport, configured here.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};

use crate::peers::PeerRun;
use crate::processes::{free_port, wait_accepting, PortMap, Process, EDGE_IP};

/// Starts server and client over TLS, forwarding each public port (on [`EDGE_IP`]) to
/// `127.0.0.1:<target>`, and waits until every public TCP port accepts.
pub async fn start(binary: &Path, ports: &PortMap) -> Result<PeerRun> {
    let dir = tempfile::tempdir()?;
    make_identity(dir.path())?;
    let control_port = free_port("127.0.0.1")?;
    let mut server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control_port}\"\n\
             [server.transport]\ntype = \"tls\"\n\
             [server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"bench\"\n",
        dir.path().join("identity.pfx").display()
    );
    let mut client = format!(
        "[client]\nremote_addr = \"localhost:{control_port}\"\n\
             [client.transport]\ntype = \"tls\"\n\
             [client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n",
        dir.path().join("cert.pem").display()
    );
    let services = ports
        .tcp
        .iter()
        .map(|p| ("tcp", p))
        .chain(ports.udp.iter().map(|p| ("udp", p)));
    for (kind, (public, target)) in services {
        server.push_str(&format!(
                "[server.services.s{public}]\ntype = \"{kind}\"\ntoken = \"bench\"\nbind_addr = \"{EDGE_IP}:{public}\"\nnodelay = true\n"
            ));
        client.push_str(&format!(
                "[client.services.s{public}]\ntype = \"{kind}\"\ntoken = \"bench\"\nlocal_addr = \"127.0.0.1:{target}\"\nnodelay = true\n"
            ));
    }
    let spawn = |name: &str, config: String| -> Result<Process> {
        let file = dir.path().join(name);
        std::fs::write(&file, config)?;
        let child = Command::new(binary)
            .arg(&file)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Process::new(child))
    };
    let server = spawn("server.toml", server)?;
    let client = spawn("client.toml", client)?;
    for port in ports.tcp.keys() {
        wait_accepting(std::net::SocketAddr::new(EDGE_IP.parse()?, *port)).await?;
    }
    Ok(PeerRun {
        server,
        client,
        _dir: dir,
    })
}

/// A self-signed certificate for `localhost` (cert.pem, key.pem) and the PKCS#12 identity
/// rathole's server wants (identity.pfx, password "bench"), made with the openssl command.
pub(crate) fn make_identity(dir: &Path) -> Result<()> {
    let openssl = |args: &[&str]| -> Result<()> {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running openssl (apt install openssl)")?;
        ensure!(status.success(), "openssl {} failed", args.join(" "));
        Ok(())
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
    ])?;
    openssl(&[
        "pkcs12",
        "-export",
        "-out",
        "identity.pfx",
        "-inkey",
        "key.pem",
        "-in",
        "cert.pem",
        "-passout",
        "pass:bench",
    ])
}
