//! The tunnel engine shared by hub and edge: TLS and QUIC setup, the sessions that drive the
//! `wire` state machines on tokio (frame multiplexing over TLS, native streams over QUIC), and
//! piping between sockets and tunnelled streams.

pub mod line;
mod listen;
pub mod mux;
pub mod pipe;
pub mod quic;
mod session;
mod stream;
pub mod tls;

pub use listen::{listen_tcp, BACKLOG};
pub use mux::{spawn_session, Role, SessionError, SessionEvent, SessionOptions, SessionStats};
pub use pipe::{pipe, Piped};
pub use quic::spawn_quic_session;
pub use session::SessionHandle;
pub use stream::{StreamReader, StreamWriter};
pub use tls::{HubIdentity, HubTrust};
