//! The tunnel engine shared by hub and edge: TLS setup, the multiplexed session that drives the
//! `wire` state machines on tokio, and piping between sockets and tunnelled streams.

pub mod line;
pub mod mux;
pub mod pipe;
pub mod tls;

pub use mux::{
    spawn_session, MuxReader, MuxWriter, Role, SessionEvent, SessionHandle, SessionOptions,
};
pub use pipe::{pipe, Piped};
pub use tls::{HubIdentity, HubTrust};
