//! The relay floor: two `remoteingress-bench relay` processes in a row carry bytes both ways and
//! pass on a half-close.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use remoteingress_bench::relay::RelayChain;
use remoteingress_bench::targets::{self, Mode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn two_relays_in_a_row_carry_an_exchange_to_the_target_and_back() {
    let echo = targets::start(Mode::Echo).await.unwrap();
    let chain = RelayChain::start(
        Path::new(env!("CARGO_BIN_EXE_remoteingress-bench")),
        echo.addr,
    )
    .unwrap();
    let mut socket = TcpStream::connect(chain.addr).await.unwrap();
    socket.write_all(b"through two relays").await.unwrap();
    socket.shutdown().await.unwrap();
    let mut back = Vec::new();
    socket.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"through two relays");
}
