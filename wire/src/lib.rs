//! The remoteingress protocol without I/O: bytes go in, frames and events come out.
//!
//! Nothing here touches a socket, a runtime or a clock; time is passed in by the caller. The
//! `hub` and `edge` crates drive these state machines on tokio. `docs/protocol.md` is the
//! normative description of the formats implemented here.

pub mod address;
pub mod config;
pub mod extension;
pub mod flow;
pub mod frame;
pub mod handshake;
pub mod proxy;
pub mod qos;
pub mod quic;
pub mod token;

pub use config::{EdgeConfig, FirewallConfig};
pub use frame::{Frame, FrameDecoder, FrameError, FrameType};
