//! A tunnel connection between its transport's setup and its session: TLS over TCP, or a QUIC
//! connection with its control stream. Hub and edge run the one-line handshake over either in
//! the same way, then turn the link into a session.

use std::sync::Arc;

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream};
use remoteingress_wire::extension::Extensions;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::server::Acceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector, TlsStream};

use crate::event::SessionEvent;
use crate::line::{read_line, LineError};
use crate::options::{Role, SessionOptions};
use crate::resolve::{connect_first, ResolveError};
use crate::session::{spawn_quic_session, spawn_session, SessionHandle};

/// Time a refused peer has to take our reply before the connection is closed.
const REFUSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a link could not be set up or used for the handshake.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The hub's address could not be resolved.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The TCP connection failed.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// The peer closed the connection before sending anything of a handshake.
    #[error("closed before its handshake began")]
    Abandoned,
    /// The QUIC connection could not be started.
    #[error("QUIC: {0}")]
    QuicConnect(#[from] quinn::ConnectError),
    /// The QUIC connection failed.
    #[error("QUIC: {0}")]
    Quic(#[from] quinn::ConnectionError),
    /// The handshake line could not be read.
    #[error("handshake: {0}")]
    Line(#[from] LineError),
    /// The handshake line could not be written.
    #[error("handshake: {0}")]
    Write(std::io::Error),
}

impl LinkError {
    /// Whether the hub's certificate was refused (not trusted, expired, for another name), as
    /// opposed to the connection failing.
    pub fn is_untrusted_certificate(&self) -> bool {
        /// TLS alerts for a refused certificate: bad, unsupported, revoked, expired, unknown,
        /// unknown CA, and decrypt error (rustls's alert for a certificate whose signature does
        /// not verify, e.g. one issued under a trusted CA's name by someone else).
        const CERTIFICATE_ALERTS: [u8; 7] = [42, 43, 44, 45, 46, 48, 51];
        match self {
            LinkError::Tls(error) => error
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<tokio_rustls::rustls::Error>())
                .is_some_and(|error| {
                    matches!(error, tokio_rustls::rustls::Error::InvalidCertificate(_))
                }),
            LinkError::Quic(quinn::ConnectionError::TransportError(error)) => CERTIFICATE_ALERTS
                .iter()
                .any(|alert| error.code == quinn::TransportErrorCode::crypto(*alert)),
            _ => false,
        }
    }
}

/// A connected, encrypted tunnel connection before its session starts.
#[derive(Debug)]
pub enum Link {
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
    /// A QUIC connection and its control stream.
    Quic {
        /// The connection.
        connection: Connection,
        /// Our side of the control stream.
        send: SendStream,
        /// The peer's side of the control stream.
        recv: RecvStream,
    },
}

impl Link {
    /// Hub: completes the TLS handshake of an accepted TCP connection; `hello` is told when
    /// the peer's ClientHello has arrived, the point from which the handshake costs the hub.
    pub async fn accept_tls(
        tcp: TcpStream,
        config: Arc<ServerConfig>,
        hello: impl FnOnce(),
    ) -> Result<Self, LinkError> {
        let _ = tcp.set_nodelay(true);
        let start = LazyConfigAcceptor::new(Acceptor::default(), tcp)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted => LinkError::Abandoned,
                _ => LinkError::Tls(e),
            })?;
        hello();
        let tls = start.into_stream(config).await.map_err(LinkError::Tls)?;
        Ok(Link::Tls(Box::new(TlsStream::Server(tls))))
    }

    /// Hub: completes an incoming QUIC connection and accepts its control stream.
    pub async fn accept_quic(incoming: quinn::Incoming) -> Result<Self, LinkError> {
        let connection = incoming.accept()?.await?;
        let (send, recv) = dropping_datagrams(&connection, connection.accept_bi()).await?;
        Ok(Link::Quic {
            connection,
            send,
            recv,
        })
    }

    /// Edge: connects over TCP and TLS, verifying the hub as `connector` is configured to.
    pub async fn connect_tls(
        connector: &TlsConnector,
        server_name: ServerName<'static>,
        host: &str,
        port: u16,
    ) -> Result<Self, LinkError> {
        let tcp = connect_first(host, port, |address| async move {
            TcpStream::connect(address)
                .await
                .map_err(LinkError::Connect)
        })
        .await?;
        let _ = tcp.set_nodelay(true);
        let tls = connector
            .connect(server_name, tcp)
            .await
            .map_err(LinkError::Tls)?;
        Ok(Link::Tls(Box::new(TlsStream::Client(tls))))
    }

    /// Edge: connects over QUIC from `endpoint` and opens the control stream.
    pub async fn connect_quic(
        endpoint: &quinn::Endpoint,
        host: &str,
        port: u16,
        server_name: &str,
    ) -> Result<Self, LinkError> {
        let (connection, (send, recv)) = connect_first(host, port, |address| {
            let connecting = endpoint.connect(address, server_name);
            async move {
                let connection = connecting?.await?;
                let control = connection.open_bi().await?;
                Ok::<_, LinkError>((connection, control))
            }
        })
        .await?;
        Ok(Link::Quic {
            connection,
            send,
            recv,
        })
    }

    /// Reads one handshake line of at most `limit` bytes; returns it and the bytes after it.
    pub async fn read_line(&mut self, limit: usize) -> Result<(Bytes, Bytes), LinkError> {
        let line = match self {
            Link::Tls(tls) => read_line(tls, limit).await?,
            Link::Quic {
                connection, recv, ..
            } => dropping_datagrams(connection, read_line(recv, limit)).await?,
        };
        Ok(line)
    }

    /// Writes a handshake line (or reply) whole.
    pub async fn write_line(&mut self, line: &str) -> Result<(), LinkError> {
        match self {
            Link::Tls(tls) => tls.write_all(line.as_bytes()).await,
            Link::Quic { send, .. } => send.write_all(line.as_bytes()).await.map_err(Into::into),
        }
        .map_err(LinkError::Write)
    }

    /// Sends a refusal `reply` and closes the connection, giving the peer a moment to read it.
    pub async fn refuse(mut self, reply: &str) {
        let _ = self.write_line(reply).await;
        match self {
            Link::Tls(mut tls) => {
                let _ = tokio::time::timeout(REFUSE_GRACE, tls.shutdown()).await;
            }
            Link::Quic {
                connection,
                mut send,
                ..
            } => {
                let _ = send.finish();
                let stopped = tokio::time::timeout(REFUSE_GRACE, send.stopped());
                let _ = dropping_datagrams(&connection, stopped).await;
                connection.close(quinn::VarInt::from_u32(1), reply.trim_end().as_bytes());
            }
        }
    }

    /// Starts the session over the link once the handshake is done; `initial` holds the bytes
    /// that arrived after the handshake line, `agreed` the extensions the edge confirms.
    pub fn into_session(
        self,
        initial: Bytes,
        role: Role,
        options: SessionOptions,
        agreed: Extensions,
    ) -> (SessionHandle, mpsc::Receiver<SessionEvent>) {
        match self {
            Link::Tls(tls) => {
                if let Err(error) = fail_unacknowledged_after(tls.get_ref().0, options.idle_timeout)
                {
                    tracing::warn!(%error, "TCP_USER_TIMEOUT not set on the tunnel");
                }
                spawn_session(*tls, initial, role, options, agreed)
            }
            Link::Quic {
                connection,
                send,
                recv,
            } => spawn_quic_session(connection, (send, recv), initial, role, options, agreed),
        }
    }
}

/// Runs `work` while dropping every datagram that arrives meanwhile: before its session starts,
/// a connection has no use for them, and a peer that has not authenticated gets no buffer.
async fn dropping_datagrams<T>(
    connection: &Connection,
    work: impl std::future::Future<Output = T>,
) -> T {
    let drop_all = async {
        while connection.read_datagram().await.is_ok() {}
        std::future::pending().await
    };
    tokio::select! {
        done = work => done,
        never = drop_all => never,
    }
}

/// Makes data the peer never acknowledges fail the connection after `deadline`
/// (`TCP_USER_TIMEOUT`), as silence does: without it a peer that vanished mid-write is noticed
/// only after the kernel's retransmissions, about 15 minutes.
fn fail_unacknowledged_after(
    tcp: &TcpStream,
    deadline: std::time::Duration,
) -> std::io::Result<()> {
    socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(deadline))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unacknowledged_data_fails_within_the_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let deadline = std::time::Duration::from_secs(3);
        fail_unacknowledged_after(&tcp, deadline).unwrap();
        let set = socket2::SockRef::from(&tcp).tcp_user_timeout().unwrap();
        assert_eq!(set, Some(deadline));
    }
}
