//! rathole: its server (the public side, like our edge) and client (the private side, like our
//! hub) with its TLS transport or over plain TCP (no encryption at all), configured here.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};

use crate::peers::{PeerProcess, PeerRun};
use crate::processes::{free_port, PortMap, EDGE_IP};

/// Starts server and client over TLS (or plain TCP when `tls` is false), forwarding each public
/// port (on [`EDGE_IP`]) to `127.0.0.1:<target>`, and waits until every public TCP port accepts.
pub async fn start(binary: &Path, tls: bool, ports: &PortMap) -> Result<PeerRun> {
    let dir = tempfile::tempdir()?;
    let control_port = free_port("127.0.0.1")?;
    let mut server = format!("[server]\nbind_addr = \"127.0.0.1:{control_port}\"\n");
    let mut client = format!("[client]\nremote_addr = \"localhost:{control_port}\"\n");
    if tls {
        make_identity(dir.path())?;
        server.push_str(&format!(
            "[server.transport]\ntype = \"tls\"\n\
             [server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"bench\"\n",
            dir.path().join("identity.pfx").display()
        ));
        client.push_str(&format!(
            "[client.transport]\ntype = \"tls\"\n\
             [client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n",
            dir.path().join("cert.pem").display()
        ));
    }
    for (kind, public, target) in ports.services() {
        server.push_str(&format!(
            "[server.services.s{public}]\ntype = \"{kind}\"\ntoken = \"bench\"\nbind_addr = \"{EDGE_IP}:{public}\"\nnodelay = true\n"
        ));
        client.push_str(&format!(
            "[client.services.s{public}]\ntype = \"{kind}\"\ntoken = \"bench\"\nlocal_addr = \"127.0.0.1:{target}\"\nnodelay = true\n"
        ));
    }
    let process = |file, config| PeerProcess {
        binary,
        file,
        config,
        args: &[],
    };
    PeerRun::start(
        dir,
        [
            process("server.toml", server),
            process("client.toml", client),
        ],
        ports,
    )
    .await
}

/// A self-signed certificate for `localhost` (cert.pem, key.pem) and the PKCS#12 identity
/// rathole's server wants (identity.pfx, password "bench"), made with the openssl command.
fn make_identity(dir: &Path) -> Result<()> {
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
