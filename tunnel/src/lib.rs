//! The tunnel engine shared by hub and edge: TLS and QUIC setup, the sessions that drive the
//! `wire` state machines on tokio (frame multiplexing over TLS, native streams over QUIC), and
//! piping between sockets and tunnelled streams.
//!
//! Module order, each using only those before it: [`options`] and [`error`] (what a session is
//! and why it ends), `lifecycle` (what every session shares), the transports `mux` and [`quic`]
//! with their stream halves, [`stream`] and `event` (transport-neutral halves and events),
//! `session` ([`SessionHandle`]), [`link`] (the handshake's connection), [`pipe`].

mod clock;
pub mod error;
mod event;
#[cfg(test)]
mod harness;
mod lifecycle;
pub mod line;
pub mod link;
mod listen;
mod mux;
pub mod options;
pub mod pipe;
pub mod quic;
mod session;
mod stream;
pub mod tls;

pub use error::{CloseReason, ProtocolViolation, SessionError};
pub use event::SessionEvent;
pub use lifecycle::SessionStats;
pub use link::{Link, LinkError};
pub use listen::{listen_tcp, BACKLOG};
pub use options::{Role, SessionOptions, Transport};
pub use pipe::{pipe, Piped};
pub use session::{spawn_session, SessionHandle};
pub use stream::{StreamReader, StreamWriter};
pub use tls::{HubIdentity, HubTrust};
