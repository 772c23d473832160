//! The tunnel engine shared by hub and edge: TLS and QUIC setup, the sessions that drive the
//! `wire` state machines on tokio (frame multiplexing over TLS, native streams over QUIC), and
//! piping between sockets and tunnelled streams.
//!
//! Layers, each using only those above it (file by file, no import circles):
//! [`options`], [`error`] and `clock` (what a session is, why it ends, its time); `lifecycle`
//! (what every session shares); each transport's shared state and stream halves (`mux::shared`,
//! `mux::stream`, `quic::shared`, `quic::stream`); `stream` and `event` (transport-neutral
//! halves and events); `liveness` (the edge's watch on silence); each transport's tasks and session (`mux`, [`quic`]); `session`
//! ([`SessionHandle`]); [`link`] (the handshake's connection); [`pipe`].

mod clock;
mod datagrams;
pub mod error;
mod event;
#[cfg(test)]
mod harness;
mod lifecycle;
pub mod line;
pub mod link;
mod listen;
mod liveness;
mod mux;
pub mod options;
pub mod pipe;
pub mod quic;
mod resolve;
mod session;
mod stream;
mod tickets;
pub mod tls;
pub mod warn;

pub use datagrams::{BatchReceiver, BatchSender};
pub use error::{CloseReason, ProtocolViolation, SessionError, StreamAborted};
pub use event::SessionEvent;
pub use lifecycle::SessionStats;
pub use link::{Link, LinkError};
pub use listen::{listen_tcp, tcp_socket_for, BACKLOG};
pub use options::{Role, SessionOptions, Transport, DEFAULT_QUIC_MIN_MTU, ORIGINAL_HUB_SILENCE};
pub use pipe::{pipe, Piped};
pub use resolve::{resolve, ResolveError};
pub use session::{spawn_session, SessionHandle};
pub use stream::{StreamReader, StreamWriter};
pub use tls::{HubIdentity, HubTrust};
