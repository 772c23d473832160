//! TCP sockets: listeners that take a burst of connections.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Connections the kernel queues per listener before they are accepted (capped by
/// `net.core.somaxconn`). The usual 128 overflows when hundreds of clients connect at once, and
/// an overflowing queue falls back to SYN cookies, which can reset a connection after its
/// client has already sent data.
pub const BACKLOG: u32 = 4096;

/// Listens on `addr` with [`BACKLOG`], reusing the address so that a restart binds at once.
pub fn listen_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = tcp_socket_for(addr)?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// A TCP socket of `addr`'s family, to bind or connect to it.
pub fn tcp_socket_for(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}
