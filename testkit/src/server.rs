//! Shared plumbing of the testkit's servers: serving a request handler with hyper (HTTP/1.1
//! and h2c) on a bound `TcpListener` in a spawned task that ends, with all of its
//! connections, when the owning [`ServerTask`] is dropped or stopped.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Error type of response bodies (streamed request bodies fail with hyper errors).
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body every testkit handler returns: buffered or streamed.
pub(crate) type RespBody = BoxBody<Bytes, BoxError>;

/// A buffered response body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Locks a mutex, carrying on with the data if a panicking test thread poisoned it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `http://host:port` for a bound address; an unspecified bind address (0.0.0.0) is
/// reached through loopback.
pub(crate) fn base_url(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        addr.ip()
    };
    match ip {
        IpAddr::V4(v4) => format!("http://{v4}:{}", addr.port()),
        IpAddr::V6(v6) => format!("http://[{v6}]:{}", addr.port()),
    }
}

/// The accept loop of one server. Dropping it aborts the loop, and the loop's `JoinSet`
/// owns every connection task, so open (even hanging) connections end with it.
#[derive(Debug)]
pub(crate) struct ServerTask {
    task: JoinHandle<()>,
}

impl ServerTask {
    pub(crate) fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `handler` on `listener` until the returned task is dropped.
pub(crate) fn spawn<H, Fut>(listener: TcpListener, handler: H) -> ServerTask
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<RespBody>> + Send + 'static,
{
    let task = tokio::spawn(async move {
        let builder = auto::Builder::new(TokioExecutor::new());
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Small request/response exchanges dominate; Nagle only adds latency.
                        let _ = stream.set_nodelay(true);
                        let handler = handler.clone();
                        let builder = builder.clone();
                        connections.spawn(async move {
                            let service = service_fn(move |req| {
                                let handler = handler.clone();
                                async move { Ok::<_, Infallible>(handler(req).await) }
                            });
                            if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                                tracing::debug!(%peer, error = %e, "testkit connection ended with an error");
                            }
                        });
                    }
                    Err(e) => {
                        // E.g. EMFILE under a benchmark: back off instead of spinning.
                        tracing::warn!(error = %e, "testkit accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    ServerTask { task }
}
