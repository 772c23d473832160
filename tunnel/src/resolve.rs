//! Resolving a host name to the address a tunnel or a target is reached at, and connecting to
//! the first of a name's addresses that answers.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::task::JoinSet;

/// How long an attempt to one of a host's addresses has to itself before the next address is
/// tried beside it (RFC 8305's connection attempt delay).
pub(crate) const NEXT_ADDRESS_AFTER: Duration = Duration::from_millis(250);

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

/// Connects to `host` on `port` with `attempt`, to whichever of its addresses answers first,
/// as "happy eyeballs" does: the addresses are tried in the resolver's order, each with a head
/// start of [`NEXT_ADDRESS_AFTER`] (or until it fails) before the next one is tried beside it.
/// A name whose first address does not answer (an IPv6 address on an IPv4-only path) costs a
/// quarter of a second, not a connect timeout. Attempts still under way when one succeeds are
/// dropped; when all fail, the last one's error is returned.
pub(crate) async fn connect_first<T, E, F, Fut>(host: &str, port: u16, attempt: F) -> Result<T, E>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: From<ResolveError> + Send + 'static,
{
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ResolveError::Lookup {
            host: host.to_owned(),
            source,
        })?
        .collect();
    race(addresses, attempt)
        .await
        .unwrap_or_else(|| Err(ResolveError::NoAddress(host.to_owned()).into()))
}

/// The first success of `attempt` over `addresses`, started in turn as [`connect_first`] says;
/// `None` only when there is no address.
async fn race<T, E, F, Fut>(addresses: Vec<SocketAddr>, attempt: F) -> Option<Result<T, E>>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    let mut waiting = addresses.into_iter();
    let mut attempts = JoinSet::new();
    let mut failed = None;
    loop {
        if let Some(address) = waiting.next() {
            attempts.spawn(attempt(address));
        }
        let more = waiting.len() > 0;
        tokio::select! {
            done = attempts.join_next() => match done {
                None => return failed,
                Some(Ok(Ok(connected))) => return Some(Ok(connected)),
                Some(Ok(Err(error))) => failed = Some(Err(error)),
                Some(Err(join)) => {
                    if let Ok(panic) = join.try_into_panic() {
                        std::panic::resume_unwind(panic);
                    }
                }
            },
            () = tokio::time::sleep(NEXT_ADDRESS_AFTER), if more => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(count: u16) -> Vec<SocketAddr> {
        (1..=count)
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_that_never_answers_only_delays_the_next() {
        let started = tokio::time::Instant::now();
        let connected = race(addresses(3), |address| async move {
            match address.port() {
                1 => std::future::pending().await,
                port => Ok::<_, String>(port),
            }
        })
        .await;
        assert_eq!(connected, Some(Ok(2)));
        assert_eq!(started.elapsed(), NEXT_ADDRESS_AFTER);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_attempt_starts_the_next_at_once_and_the_last_error_is_kept() {
        let started = tokio::time::Instant::now();
        let connected = race(addresses(3), |address| async move {
            Err::<(), _>(format!("refused on {}", address.port()))
        })
        .await;
        assert_eq!(connected, Some(Err("refused on 3".to_owned())));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_first_address_still_wins_if_it_answers_first() {
        let connected = race(addresses(2), |address| async move {
            let after = match address.port() {
                1 => NEXT_ADDRESS_AFTER * 2,
                _ => NEXT_ADDRESS_AFTER * 4,
            };
            tokio::time::sleep(after).await;
            Ok::<_, String>(address.port())
        })
        .await;
        assert_eq!(connected, Some(Ok(1)));
    }

    #[tokio::test]
    async fn no_address_is_no_result() {
        let connected = race(Vec::new(), |_| async { Ok::<(), String>(()) }).await;
        assert_eq!(connected, None);
    }
}
