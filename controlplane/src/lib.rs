//! The gRPC control plane: the hub's admin API (`remoteingress.v1.HubAdmin`) and the edge's
//! status API (`remoteingress.v1.EdgeStatus`), each with health and server reflection, adapted
//! from the hub and edge handles. Proto files: `proto/remoteingress/v1/`.

// tonic::Status is large by design and is what every handler returns.
#![allow(clippy::result_large_err)]

mod convert;
mod edge_status;
mod events;
mod hub_admin;
mod limits;
mod metrics_http;
mod server;

pub use convert::edge_to_proto;
pub use metrics_http::{serve_metrics, Readiness};
pub use server::{
    serve_edge_status, serve_hub_admin, AdminOptions, ApiLimits, ControlPlaneError, Served,
    MAX_MESSAGE_LEN,
};

/// Generated protobuf types and gRPC stubs.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("remoteingress.v1");

    /// Encoded descriptors of the remoteingress protos, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/remoteingress_descriptor.bin"));
}
