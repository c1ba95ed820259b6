//! dynamics-gateway: an authenticating sidecar in front of the Dynamics 365 / Dataverse
//! Web API. A caller's OIDC token comes in; the request goes on to Dataverse with the
//! gateway's own S2S token and an impersonation header naming the caller's Dynamics user.
//!
//! [`run`] wires the configuration into the request stages (`inbound` -> `identity` ->
//! `upstream`, in `pipeline`), spawns the background refreshers, serves the app and admin
//! listeners, and drains on shutdown.

pub mod admin;
pub mod backoff;
pub mod body;
pub mod config;
pub mod demo;
pub mod error;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod pipeline;
pub mod secret;
pub mod server;
pub mod testkit;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::map_response_body::MapResponseBodyLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::admin::{Admin, Readiness};
use crate::config::{Config, IdentityMode};
use crate::identity::{IdentityResolver, UserLookup};
use crate::inbound::Authenticator;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::server::ConnectionLimits;
use crate::upstream::{DataverseClient, Forwarder, TokenSource};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("HTTP client for the identity provider: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("Dataverse client: {0}")]
    Upstream(#[from] upstream::UpstreamError),
    #[error("identity: {0}")]
    Identity(&'static str),
}

/// The assembled gateway: the request pipeline and what the admin listener reports.
pub struct Gateway {
    pub pipeline: Arc<Pipeline>,
    pub admin: Admin,
    pub limits: ConnectionLimits,
}

impl Gateway {
    pub fn new(config: &Config) -> Result<Self, StartError> {
        let metrics = Metrics::new()?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            // Identity provider and token endpoint URLs come from config; a redirect
            // must not send the client secret or key fetches somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("dynamics-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let inbound = Authenticator::new(&config.inbound, http.clone(), metrics.clone());
        let tokens = Arc::new(TokenSource::new(
            config.dynamics.clone(),
            http,
            metrics.clone(),
        ));
        let client = DataverseClient::new(&config.dynamics.url)?;
        let lookup = match &config.identity.mode {
            IdentityMode::Lookup(attribute) => Some(UserLookup::new(
                &config.identity,
                *attribute,
                client.clone(),
                tokens.clone(),
                config.server.request_timeout,
                metrics.clone(),
            )),
            _ => None,
        };
        let identity =
            IdentityResolver::new(&config.identity, lookup).map_err(StartError::Identity)?;
        let readiness = Readiness {
            issuers: inbound.caches().cloned().collect(),
            tokens: tokens.clone(),
            draining: Arc::new(AtomicBool::new(false)),
        };
        let upstream = Forwarder::new(
            client,
            tokens,
            config.server.request_timeout,
            config.server.max_request_body,
            config.server.trust_forwarded_headers,
            metrics.clone(),
        );
        let pipeline = Arc::new(Pipeline {
            inbound,
            identity,
            upstream,
            metrics: metrics.clone(),
            public_url: config.server.public_url.clone(),
            trust_forwarded_headers: config.server.trust_forwarded_headers,
        });
        Ok(Self {
            pipeline,
            admin: Admin { readiness, metrics },
            limits: ConnectionLimits::default(),
        })
    }
}

/// Runs the gateway on the given listeners until `shutdown` completes, then stops
/// accepting, reports not-ready, drains in-flight requests and stops the refreshers.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let gateway = Gateway::new(&config)?;
    let refreshers = TaskTracker::new();
    let stop_refreshers = CancellationToken::new();
    for cache in &gateway.admin.readiness.issuers {
        refreshers.spawn(cache.clone().run(stop_refreshers.clone()));
    }
    refreshers.spawn(
        gateway
            .admin
            .readiness
            .tokens
            .clone()
            .run(stop_refreshers.clone()),
    );

    let pipeline = gateway.pipeline.clone();
    let stop_app = CancellationToken::new();
    let app = tokio::spawn(server::serve(
        listener,
        move |peer| {
            let pipeline = pipeline.clone();
            TowerToHyperService::new(
                ServiceBuilder::new()
                    // Back to the one body type the server speaks.
                    .layer(MapResponseBodyLayer::new(body::boxed))
                    // A panic answers 500 for that request instead of dropping the connection.
                    .layer(CatchPanicLayer::custom(panic_response))
                    // Marks the caller's token sensitive before anything below can log it.
                    .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
                    .service_fn(move |request| {
                        let pipeline = pipeline.clone();
                        async move { Ok::<_, Infallible>(pipeline.handle(request, peer).await) }
                    }),
            )
        },
        stop_app.clone(),
        gateway.limits,
        "app",
    ));
    let admin = gateway.admin.clone();
    let stop_admin = CancellationToken::new();
    let admin_server = tokio::spawn(server::serve(
        admin_listener,
        move |_peer| {
            let admin = admin.clone();
            hyper::service::service_fn(move |request| {
                let response = admin.handle(&request);
                async move { Ok::<_, Infallible>(response) }
            })
        },
        stop_admin.clone(),
        gateway.limits,
        "admin",
    ));

    shutdown.await;
    tracing::info!("shutting down: not ready, draining in-flight requests");
    gateway
        .admin
        .readiness
        .draining
        .store(true, Ordering::Relaxed);
    stop_app.cancel();
    if let Err(e) = app.await {
        tracing::error!(error = %e, "app listener task failed");
    }
    // The admin listener outlives the drain so probes see "not ready" rather than nothing.
    stop_admin.cancel();
    if let Err(e) = admin_server.await {
        tracing::error!(error = %e, "admin listener task failed");
    }
    stop_refreshers.cancel();
    refreshers.close();
    refreshers.wait().await;
    tracing::info!("stopped");
    Ok(())
}

fn panic_response(
    _panic: Box<dyn std::any::Any + Send + 'static>,
) -> http::Response<body::GatewayBody> {
    tracing::error!("request handler panicked");
    let id = http::HeaderValue::from_static("-");
    error::GatewayError::Upstream(upstream::UpstreamError::Build("internal error".into()))
        .into_response(&id)
}
