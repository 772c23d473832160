//! The bench's helper processes: two `relay`s in a row (the latency floor) carry bytes both ways
//! and pass on a half-close; `echo` (the target of the idle connections) answers in a process of
//! its own.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;

use remoteingress_bench::processes::spawn_helper;
use remoteingress_bench::relay::RelayChain;
use remoteingress_bench::targets::{self, Mode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BENCH: &str = env!("CARGO_BIN_EXE_remoteingress-bench");

/// Sends `message`, half-closes and returns everything that comes back.
async fn exchange(addr: SocketAddr, message: &[u8]) -> Vec<u8> {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.write_all(message).await.unwrap();
    socket.shutdown().await.unwrap();
    let mut back = Vec::new();
    socket.read_to_end(&mut back).await.unwrap();
    back
}

#[tokio::test]
async fn two_relays_in_a_row_carry_an_exchange_to_the_target_and_back() {
    let echo = targets::start(Mode::Echo).await.unwrap();
    let chain = RelayChain::start(Path::new(BENCH), echo.addr).unwrap();
    let back = exchange(chain.addr, b"through two relays").await;
    assert_eq!(back, b"through two relays");
}

#[tokio::test]
async fn the_echo_helper_answers_from_a_process_of_its_own() {
    let (process, addr) = spawn_helper(Path::new(BENCH), &["echo"]).unwrap();
    assert_ne!(process.pid(), std::process::id());
    assert_eq!(exchange(addr, b"echo").await, b"echo");
}
