//! The pooled, kept-alive connections to the Dataverse organisation: HTTP/1.1, or HTTP/2
//! when TLS negotiates it, or either one only (`dynamics.upstream_http`). The only place that knows the upstream's address: requests
//! carry a path, never a host. Each request thread has a pool of its own, so a request
//! never waits on a connection driven by another thread; background work shares one more.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use url::Url;

use super::UpstreamError;
use crate::body::GatewayBody;
use crate::config::UpstreamHttp;
use crate::request_threads;

type Pool = Client<HttpsConnector<HttpConnector>, GatewayBody>;

/// A client bound to one Dataverse organisation.
#[derive(Clone)]
pub struct DataverseClient {
    /// One per request thread, then the one for every other thread.
    pools: Arc<[Pool]>,
    origin: String,
}

impl DataverseClient {
    /// A client with a pool for each of `request_threads` and one for other threads,
    /// speaking `version`.
    pub fn new(
        url: &Url,
        request_threads: usize,
        version: UpstreamHttp,
    ) -> Result<Self, UpstreamError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*crate::outbound::tls_config()).clone())
            // http:// is accepted only for loopback organisations (config checks that).
            .https_or_http();
        // ALPN offers what the pool may speak; on http:// HTTP/2 is prior knowledge.
        let https = match version {
            UpstreamHttp::Auto => connector.enable_http1().enable_http2().wrap_connector(http),
            UpstreamHttp::Http1 => connector.enable_http1().wrap_connector(http),
            UpstreamHttp::Http2 => connector.enable_http2().wrap_connector(http),
        };
        let pool = || {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(128)
                // Bounds what one connection buffers while streaming a large body.
                .http1_max_buf_size(64 * 1024)
                // hyper's fixed windows (2 MiB a stream, 5 MiB the connection) bound what
                // one connection buffers; an adaptive window starts at 64 KiB and measured
                // slower for 1 MiB answers.
                .http2_only(version == UpstreamHttp::Http2)
                .build(https.clone())
        };
        let pools = (0..=request_threads).map(|_| pool()).collect();
        let origin = url.origin().ascii_serialization();
        Ok(Self { pools, origin })
    }

    /// `scheme://host[:port]` of the organisation.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The organisation's URI for a path and query taken from a request.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, UpstreamError> {
        format!("{}{}", self.origin, path_and_query)
            .parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamError::Build(Box::new(e)))
    }

    /// The request on its way; the future owns it, so it can outlive the caller's.
    pub fn send(&self, request: Request<GatewayBody>) -> ResponseFuture {
        let shared = self.pools.len() - 1;
        let pool = request_threads::current().map_or(shared, |thread| thread.min(shared));
        self.pools[pool].request(request)
    }
}
