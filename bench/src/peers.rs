//! The peers we compare against, found on PATH: rathole over TLS and over plain TCP (`cargo
//! install rathole`), and
//! frp over TLS and over QUIC (`frps` and `frpc`, built from frp's source; see
//! docs/performance.md).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::frp::{self, FrpTransport};
use crate::processes::{wait_accepting, PortMap, Process, EDGE_IP};
use crate::rathole;

/// A peer tunnel and the transport it runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// rathole with its TLS transport.
    RatholeTls,
    /// rathole over plain TCP: no encryption at all, the cheapest tunnel there is.
    RatholeTcp,
    /// frp over TLS with tcpMux.
    FrpTls,
    /// frp over QUIC.
    FrpQuic,
}

/// A running peer: its public side and its private side.
#[derive(Debug)]
pub struct PeerRun {
    /// The public side's process (rathole server, frps).
    pub server: Process,
    /// The private side's process (rathole client, frpc).
    pub client: Process,
    pub(crate) _dir: tempfile::TempDir,
}

impl PeerRun {
    /// Starts the server and then the client, each with its configuration written to `dir`
    /// under its name, and waits until every public TCP port of `ports` accepts.
    pub(crate) async fn start(
        dir: tempfile::TempDir,
        [server, client]: [PeerProcess<'_>; 2],
        ports: &PortMap,
    ) -> Result<Self> {
        let server = server.spawn(dir.path())?;
        let client = client.spawn(dir.path())?;
        for port in ports.tcp.keys() {
            wait_accepting(SocketAddr::new(EDGE_IP.parse()?, *port)).await?;
        }
        Ok(Self {
            server,
            client,
            _dir: dir,
        })
    }

    /// Both processes' pids.
    pub fn pids(&self) -> [u32; 2] {
        [self.server.pid(), self.client.pid()]
    }
}

/// One process of a peer: its binary, the file name of its configuration, the configuration,
/// and the arguments that come before the configuration's path.
pub(crate) struct PeerProcess<'a> {
    pub(crate) binary: &'a Path,
    pub(crate) file: &'static str,
    pub(crate) config: String,
    pub(crate) args: &'static [&'static str],
}

impl PeerProcess<'_> {
    fn spawn(self, dir: &Path) -> Result<Process> {
        let file = dir.join(self.file);
        std::fs::write(&file, self.config)?;
        let child = Command::new(self.binary)
            .args(self.args)
            .arg(&file)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        Ok(Process::new(child))
    }
}

impl Peer {
    /// Every peer, in the order of the table's columns.
    pub const ALL: [Peer; 4] = [
        Peer::RatholeTls,
        Peer::RatholeTcp,
        Peer::FrpTls,
        Peer::FrpQuic,
    ];

    /// Its column in the table and key in the results.
    pub fn label(self) -> &'static str {
        match self {
            Peer::RatholeTls => "rathole TLS",
            Peer::RatholeTcp => "rathole TCP",
            Peer::FrpTls => "frp TLS",
            Peer::FrpQuic => "frp QUIC",
        }
    }

    /// Our transport it is compared with.
    pub fn compares_with(self) -> &'static str {
        match self {
            Peer::RatholeTls | Peer::RatholeTcp | Peer::FrpTls => "tcpTls",
            Peer::FrpQuic => "quic",
        }
    }

    fn binary_names(self) -> &'static [&'static str] {
        match self {
            Peer::RatholeTls | Peer::RatholeTcp => &["rathole"],
            Peer::FrpTls | Peer::FrpQuic => &["frps", "frpc"],
        }
    }

    /// Its binaries on PATH, or the note that says how to get them.
    pub fn find(self) -> Result<Vec<PathBuf>, String> {
        self.binary_names()
            .iter()
            .map(|name| {
                on_path(name)
                    .ok_or_else(|| format!("no {name} on PATH: no {} column", self.label()))
            })
            .collect()
    }

    /// Starts it forwarding `ports`, with the binaries from [`Self::find`].
    pub async fn start(self, binaries: &[PathBuf], ports: &PortMap) -> Result<PeerRun> {
        let path = |i: usize| -> Result<&Path> {
            binaries
                .get(i)
                .map(PathBuf::as_path)
                .ok_or_else(|| anyhow::anyhow!("{} needs {} binaries", self.label(), i + 1))
        };
        match self {
            Peer::RatholeTls => rathole::start(path(0)?, true, ports).await,
            Peer::RatholeTcp => rathole::start(path(0)?, false, ports).await,
            Peer::FrpTls => frp::start(&[path(0)?, path(1)?], FrpTransport::Tls, ports).await,
            Peer::FrpQuic => frp::start(&[path(0)?, path(1)?], FrpTransport::Quic, ports).await,
        }
    }
}

/// `name` in a directory of PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
