//! Event streaming to gRPC watchers that never blocks the data plane.

use std::pin::Pin;

use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// A server stream of events.
pub(crate) type EventStream<T> = Pin<Box<ReceiverStream<Result<T, Status>>>>;

/// Streams broadcast events to one watcher through a small bounded queue. A watcher that falls
/// behind loses events (and is told how many) instead of slowing whoever emits them. The stream
/// ends with UNAVAILABLE at `shutdown`, so that an open watch never holds up a graceful stop.
/// `slot` (a watcher's place under a limit) is held until the watcher is gone.
pub(crate) fn forward_events<E, T>(
    mut events: broadcast::Receiver<E>,
    shutdown: CancellationToken,
    convert: impl Fn(E) -> Option<T> + Send + 'static,
    missed: fn(u64) -> T,
    slot: Option<OwnedSemaphorePermit>,
) -> EventStream<T>
where
    E: Clone + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let _slot = slot;
        loop {
            let message = tokio::select! {
                received = events.recv() => match received {
                    Ok(event) => match convert(event) {
                        Some(message) => message,
                        None => continue,
                    },
                    Err(broadcast::error::RecvError::Lagged(count)) => missed(count),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = tx.closed() => return,
                () = shutdown.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("shutting down"))).await;
                    return;
                }
            };
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}
