//! Resolving a host name to the address a tunnel or a target is reached at.

use std::net::SocketAddr;

use thiserror::Error;

/// Why a host could not be resolved.
#[derive(Debug, Error)]
pub enum ResolveError {
    /// The lookup failed.
    #[error("resolving {host}: {source}")]
    Lookup {
        /// The host name.
        host: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The name resolved to no address.
    #[error("{0} has no address")]
    NoAddress(String),
}

/// The first address of `host` (a name or an address) on `port`.
pub async fn resolve(host: &str, port: u16) -> Result<SocketAddr, ResolveError> {
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ResolveError::Lookup {
            host: host.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| ResolveError::NoAddress(host.to_owned()))
}
