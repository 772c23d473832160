//! What one client of an API can take: separate call pools for probes (health, reflection) and
//! for everything else, and a cap on open connections.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tower::{Layer, Service};

/// Paths of the calls anyone may make (health) or that load balancers and tools make
/// (reflection): they are served from a pool of their own, so that a client stalling them
/// takes nothing from the calls of authenticated clients.
fn is_probe(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

/// A layer serving calls from two pools of concurrent calls: probes and the rest.
#[derive(Clone)]
pub(crate) struct CallPools {
    calls: Arc<Semaphore>,
    probes: Arc<Semaphore>,
}

impl CallPools {
    /// At most `calls` API calls and `probes` health or reflection calls at once; more wait.
    pub(crate) fn new(calls: usize, probes: usize) -> Self {
        Self {
            calls: Arc::new(Semaphore::new(calls)),
            probes: Arc::new(Semaphore::new(probes)),
        }
    }
}

impl<S> Layer<S> for CallPools {
    type Service = Pooled<S>;

    fn layer(&self, inner: S) -> Pooled<S> {
        Pooled {
            inner,
            pools: self.clone(),
        }
    }
}

/// A service whose calls each hold a permit of their pool until they have answered.
#[derive(Clone)]
pub(crate) struct Pooled<S> {
    inner: S,
    pools: CallPools,
}

impl<S, B> Service<http::Request<B>> for Pooled<S>
where
    S: Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let pool = if is_probe(request.uri().path()) {
            self.pools.probes.clone()
        } else {
            self.pools.calls.clone()
        };
        // The clone takes the place of the service made ready by `poll_ready`.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(async move {
            // The semaphores are never closed, so the permit always comes.
            let _permit = pool.acquire_owned().await;
            inner.call(request).await
        })
    }
}

/// Connections of `listener`, at most `max` open at once: past it, new ones wait in the
/// listen backlog until one closes. Accepting stops at `shutdown`.
pub(crate) fn limited_incoming(
    listener: TcpListener,
    max: usize,
    shutdown: CancellationToken,
) -> ReceiverStream<std::io::Result<LimitedConnection>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let slots = Arc::new(Semaphore::new(max.max(1)));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = async {
                    let permit = slots.clone().acquire_owned().await.ok()?;
                    Some(listener.accept().await.map(|(stream, _)| LimitedConnection {
                        stream,
                        _permit: permit,
                    }))
                } => accepted,
            };
            let Some(accepted) = accepted else { return };
            if let Err(e) = &accepted {
                tracing::warn!(error = %e, "API accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
            if tx.send(accepted).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// An accepted connection holding one of the listener's slots until it closes.
pub(crate) struct LimitedConnection {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for LimitedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
