//! The latency floor: two plain TCP relays chained as separate processes (the bench binary's
//! hidden `relay` command). No TLS, no multiplexing, no event loop, a blocked thread per
//! direction: whatever they add to a round trip is the cost of two extra processes on the path,
//! which any two-process tunnel (ours, rathole) pays before doing any work of its own.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;

use anyhow::{Context, Result};

use crate::processes::{spawn_helper, Process};

/// Relays every connection accepted on a free port of 127.0.0.1 to `target`, forever; prints the
/// port it listens on as the first line of stdout.
pub fn serve(target: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    for client in listener.incoming() {
        let client = client?;
        let upstream =
            TcpStream::connect(target).with_context(|| format!("relay: connecting to {target}"))?;
        for socket in [&client, &upstream] {
            socket.set_nodelay(true)?;
        }
        copy_on_thread(client.try_clone()?, upstream.try_clone()?);
        copy_on_thread(upstream, client);
    }
    Ok(())
}

/// Copies `from` into `to` on a thread of its own, then half-closes `to`.
fn copy_on_thread(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Two relay processes in a row in front of a target.
#[derive(Debug)]
pub struct RelayChain {
    /// Where clients connect (the first relay).
    pub addr: SocketAddr,
    _processes: [Process; 2],
}

impl RelayChain {
    /// Starts `bench_binary relay` twice: the second forwards to `target`, the first to it.
    pub fn start(bench_binary: &Path, target: SocketAddr) -> Result<Self> {
        let relay = |target: SocketAddr| {
            spawn_helper(bench_binary, &["relay", "--target", &target.to_string()])
        };
        let (second, second_addr) = relay(target)?;
        let (first, addr) = relay(second_addr)?;
        Ok(Self {
            addr,
            _processes: [first, second],
        })
    }
}
