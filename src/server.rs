//! The accept loop shared by the app listener and the admin listener: HTTP/1.1 and h2c
//! on each connection, and a graceful drain on shutdown (stop accepting, let in-flight
//! requests finish within the grace period, then close what is left).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::body::GatewayBody;

/// Limits applied to every inbound connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time a client has to send the request head (slowloris).
    pub header_read_timeout: Duration,
    /// Longest wait for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
    /// Open connections beyond this are answered 503 and closed.
    pub max_connections: usize,
}

impl ConnectionLimits {
    pub fn from_config(server: &crate::config::ServerConfig) -> Self {
        Self {
            header_read_timeout: server.header_read_timeout,
            shutdown_grace: server.shutdown_grace,
            max_connections: server.max_connections,
        }
    }
}

/// Largest request head accepted (a 16 KiB token plus ordinary headers fits easily).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in one request head.
const MAX_HEADERS: usize = 100;

/// What a connection over the limit gets before it is closed.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{\"error\":{\"code\":\"DynamicsGateway.TooManyConnections\",\"message\":\"too many open connections; retry\"}}";

/// Serves connections from `listener` until `shutdown` is cancelled, then drains.
/// `make_service` builds the per-connection service from the peer address.
pub async fn serve<M, S, F, E>(
    listener: TcpListener,
    make_service: M,
    shutdown: CancellationToken,
    limits: ConnectionLimits,
    tls: Option<crate::tls::TlsAcceptor>,
    name: &'static str,
) where
    M: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<GatewayBody>, Error = E, Future = F>
        + Send
        + 'static,
    F: Future<Output = Result<Response<GatewayBody>, E>> + Send + 'static,
    E: Into<crate::body::BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(listener = name, %peer, max = limits.max_connections, "connection limit reached; refusing");
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (stream, client_certificate) = crate::tls::accept(tls.as_ref(), stream);
        let service = client_certificate.attach(make_service(peer));
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection.await {
                tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!(listener = name, "all connections drained"),
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(listener = name, grace = ?limits.shutdown_grace, "shutdown grace elapsed; closing remaining connections");
        }
    }
}

/// Tells a connection over the limit why it is closed, without reading its request.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(OVER_CAPACITY)).await;
    let _ = stream.shutdown().await;
}
