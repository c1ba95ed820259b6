//! dynamics-gateway: an authenticating sidecar in front of the Dynamics 365 / Dataverse
//! Web API. A caller's OIDC token comes in; the request goes on to Dataverse with the
//! gateway's own S2S token and an impersonation header naming the caller's Dynamics user.
//!
//! [`run`] wires the configuration into the request stages (`inbound` -> `identity` ->
//! `upstream`, in `pipeline`), spawns the background refreshers, serves the app and admin
//! listeners, and drains on shutdown.

pub mod access;
pub(crate) mod admin;
pub(crate) mod audit;
pub(crate) mod backoff;
pub(crate) mod body;
pub mod config;
pub mod error;
pub mod identity;
pub mod inbound;
pub mod log_writer;
pub(crate) mod method;
pub mod metrics;
pub(crate) mod outbound;
pub(crate) mod pipeline;
pub mod request_target;
pub(crate) mod request_threads;
pub(crate) mod routing;
pub mod secret;
pub(crate) mod server;
pub(crate) mod supervisor;
pub mod telemetry;
pub(crate) mod tls;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tower::limit::GlobalConcurrencyLimitLayer;

use crate::access::{EnvironmentMetadata, StoredQueryLookup};
use crate::admin::{Admin, Readiness};
use crate::audit::Audit;
use crate::config::{Config, EnvironmentConfig, IdentityMode};
use crate::identity::{IdentityResolver, UserLookup};
use crate::inbound::Authenticator;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::routing::{Environment, Router};
use crate::server::ConnectionLimits;
use crate::upstream::budget::store::Store;
use crate::upstream::budget::Gate;
use crate::upstream::{DataverseClient, Forwarder, TokenPolicy, TokenSource};

/// Longest any one request to the identity provider (discovery, JWKS) may take.
const DEPENDENCY_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("metrics registry")]
    Metrics(#[from] prometheus::Error),
    #[error("HTTP client for the identity provider")]
    HttpClient(#[from] reqwest::Error),
    #[error("Dataverse client")]
    Upstream(#[from] upstream::UpstreamError),
    #[error("identity: {0}")]
    Identity(&'static str),
    #[error("TLS on the app port")]
    Tls(#[from] tls::TlsError),
    #[error("dynamics.budget.store")]
    BudgetStore(#[from] upstream::budget::store::StoreError),
    #[error("starting the request threads (server.worker_threads)")]
    RequestThreads(#[source] std::io::Error),
}

/// The assembled gateway for one configuration: the request pipeline, what readiness
/// depends on, and the switch that stops its background refreshers. A reload builds a new
/// one and swaps it in whole; requests in flight finish on the one they started with.
pub struct Gateway {
    pub pipeline: Arc<Pipeline>,
    pub readiness: Readiness,
    refreshers: CancellationToken,
    /// The budget store the replicas share, probed while this gateway serves.
    budget_store: Option<Store>,
}

impl Gateway {
    pub fn new(
        config: &Config,
        metrics: Metrics,
        draining: Arc<AtomicBool>,
    ) -> Result<Self, StartError> {
        // Identity provider and token endpoint URLs come from config; a redirect must not
        // send the client secret or key fetches somewhere else.
        let dependency_client = |timeout: Duration| {
            crate::outbound::http_client()
                .connect_timeout(Duration::from_secs(5).min(timeout))
                .timeout(timeout)
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("dynamics-gateway/", env!("CARGO_PKG_VERSION")))
                .build()
        };
        let http = dependency_client(DEPENDENCY_TIMEOUT)?;
        // Its own timeout (`dynamics.token_timeout`), hence its own client.
        let token_http = dependency_client(config.dynamics.token_timeout)?;
        let inbound = Authenticator::new(&config.inbound, http, metrics.clone());
        // One token per (token endpoint, client, resource): environments that share an app
        // registration and organisation share the token and its refresher.
        let mut groups: Vec<Vec<&EnvironmentConfig>> = Vec::new();
        for env in &config.dynamics.environments {
            let same = |other: &&EnvironmentConfig| {
                other.token_url == env.token_url
                    && other.client_id == env.client_id
                    && other.scope == env.scope
            };
            match groups.iter_mut().find(|g| g.first().is_some_and(same)) {
                Some(group) => group.push(env),
                None => groups.push(vec![env]),
            }
        }
        let budget_store = config
            .dynamics
            .budget_store
            .as_ref()
            .map(|store| Store::new(store, &metrics))
            .transpose()?;
        let mut tokens = Vec::with_capacity(groups.len());
        let mut fetched_metadata = Vec::new();
        let mut environments = Vec::with_capacity(config.dynamics.environments.len());
        for group in groups {
            let Some(first) = group.first() else {
                continue;
            };
            let env_tokens = Arc::new(TokenSource::new(
                first,
                group.iter().map(|e| e.name.clone()).collect(),
                token_http.clone(),
                TokenPolicy {
                    replace_interval: config.dynamics.token_replace_interval,
                    retry_max_wait: config.dynamics.token_retry_max_wait,
                    first_fetch_wait: config.dynamics.token_timeout,
                },
                metrics.clone(),
            ));
            tokens.push(env_tokens.clone());
            for env in group {
                let client = DataverseClient::new(
                    &env.url,
                    config.server.request_threads(),
                    config.dynamics.upstream_http,
                )?;
                let lookup = match &config.identity.mode {
                    IdentityMode::Lookup(attribute) => Some(UserLookup::new(
                        &config.identity,
                        *attribute,
                        client.clone(),
                        env_tokens.clone(),
                        config.server.request_timeout,
                        metrics.clone(),
                    )),
                    _ => None,
                };
                let identity = IdentityResolver::new(
                    &config.identity,
                    lookup,
                    &env.tenant_id,
                    env.allow_guest_tenants,
                )
                .map_err(StartError::Identity)?;
                let stored_queries = StoredQueryLookup::new(
                    client.clone(),
                    env_tokens.clone(),
                    config.server.request_timeout,
                );
                let metadata = config.access.fetches_metadata().then(|| {
                    Arc::new(EnvironmentMetadata::new(
                        &env.name,
                        client.clone(),
                        env_tokens.clone(),
                        config.access.metadata_settings(),
                        metrics.clone(),
                    ))
                });
                fetched_metadata.extend(metadata.clone());
                let upstream = Forwarder::new(
                    client,
                    env_tokens.clone(),
                    &config.server,
                    &config.dynamics,
                    env,
                    match &budget_store {
                        Some(store) => {
                            Gate::shared(&env.budget, &env.name, &metrics, store.clone())
                        }
                        None => Gate::new(&env.budget, &env.name, &metrics),
                    },
                    metrics.clone(),
                );
                environments.push(Arc::new(Environment {
                    config: env.clone(),
                    identity,
                    upstream,
                    stored_queries,
                    metadata,
                }));
            }
        }
        let readiness = Readiness {
            issuers: inbound.caches().cloned().collect(),
            tokens,
            metadata: fetched_metadata,
            draining,
        };
        let pipeline = Arc::new(Pipeline {
            inbound,
            router: Router::new(config.dynamics.routing, environments),
            access: config.access.clone(),
            metrics,
            audit: Audit::new(config.audit.redact_query),
            public_url: config.server.public_url.clone(),
            trust_forwarded_headers: config.server.trust_forwarded_headers,
            serves_tls: config.server.tls.is_some(),
        });
        Ok(Self {
            pipeline,
            readiness,
            refreshers: CancellationToken::new(),
            budget_store,
        })
    }

    /// Starts the key and token refreshers on `tracker`, each supervised (restarted after
    /// a panic); they stop when this gateway is retired or the process shuts down.
    fn spawn_refreshers(&self, tracker: &TaskTracker) {
        for cache in &self.readiness.issuers {
            let run = cache.clone();
            self.spawn_supervised(
                tracker,
                supervisor::Refresher::Jwks,
                cache.issuer(),
                cache.refresher_restarts(),
                move |stop| run.clone().run(stop),
            );
        }
        for tokens in &self.readiness.tokens {
            let run = tokens.clone();
            self.spawn_supervised(
                tracker,
                supervisor::Refresher::Token,
                tokens.label(),
                tokens.refresher_restarts(),
                move |stop| run.clone().run(stop),
            );
        }
        for metadata in &self.readiness.metadata {
            let run = metadata.clone();
            self.spawn_supervised(
                tracker,
                supervisor::Refresher::Metadata,
                metadata.environment(),
                metadata.refresher_restarts(),
                move |stop| run.clone().run(stop),
            );
        }
        if let Some(store) = &self.budget_store {
            tracker.spawn(store.clone().probe(self.refreshers.clone()));
        }
    }

    /// Spawns one refresher on `tracker` under a supervisor (restarted after a panic,
    /// counted in `restarts`); `start` is given the token that stops it with the others.
    fn spawn_supervised<F, Fut>(
        &self,
        tracker: &TaskTracker,
        kind: supervisor::Refresher,
        name: &str,
        restarts: &Arc<AtomicU64>,
        start: F,
    ) where
        F: Fn(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = self.refreshers.clone();
        tracker.spawn(supervisor::supervise(
            kind,
            name.to_string(),
            restarts.clone(),
            self.pipeline.metrics.clone(),
            self.refreshers.clone(),
            move || start(stop.clone()),
        ));
    }

    /// Takes over the `$metadata` maps `running` holds for the same environments (same
    /// name and URL), so a reload neither refuses requests until its own fetch nor waits
    /// for one: its refresher revalidates them with their ETags.
    fn adopt_metadata(&self, running: &Gateway) {
        for new in &self.readiness.metadata {
            let url_of = |gateway: &Gateway, name: &str| {
                let environments = gateway.pipeline.router.environments();
                let found = environments.iter().find(|e| e.name() == name);
                found.map(|e| e.config.url.clone())
            };
            let same = |old: &&Arc<EnvironmentMetadata>| {
                old.environment() == new.environment()
                    && url_of(running, old.environment()) == url_of(self, new.environment())
            };
            if let Some(old) = running.readiness.metadata.iter().find(same) {
                new.adopt(old);
            }
        }
    }

    fn retire(&self) {
        self.refreshers.cancel();
    }
}

impl Drop for Gateway {
    /// A gateway that is dropped without being retired (a reload abandoned at shutdown)
    /// still stops its refreshers, so the shutdown that waits for them is not held up.
    fn drop(&mut self) {
        self.refreshers.cancel();
    }
}

/// New configurations for a running gateway (SIGHUP in the binary).
pub type Reloads = tokio::sync::mpsc::Receiver<Config>;

/// Runs the gateway on the given listeners until `shutdown` completes, then stops
/// accepting, reports not-ready, drains in-flight requests and stops the refreshers.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let (_no_reloads, reloads) = tokio::sync::mpsc::channel(1);
    run_with_reloads(config, listener, admin_listener, shutdown, reloads).await
}

/// As [`run`], also applying each configuration received on `reloads`: the new one is
/// built and must become ready (keys and token) before it replaces the old; a config that
/// cannot be built or does not become ready is rejected and the old one stays in force.
pub async fn run_with_reloads(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut reloads: Reloads,
) -> Result<(), StartError> {
    let metrics = Metrics::new()?;
    let draining = Arc::new(AtomicBool::new(false));
    let refreshers = TaskTracker::new();
    let first = Gateway::new(&config, metrics.clone(), draining.clone())?;
    first.spawn_refreshers(&refreshers);
    let current = Arc::new(ArcSwap::from_pointee(first));
    let limits = ConnectionLimits::from_config(&config.server);
    // Shared by every connection: the in-flight cap is for the whole process.
    let in_flight = Arc::new(Semaphore::new(config.server.max_in_flight));
    let max_in_flight = config.server.max_in_flight;

    let app_state = current.clone();
    let overload_metrics = metrics.clone();
    let stop_app = CancellationToken::new();
    let tls = match &config.server.tls {
        None => None,
        Some(tls) => Some(tls::TlsAcceptor::start(
            tls,
            config.server.header_read_timeout,
            stop_app.clone(),
        )?),
    };
    let request_threads = Arc::new(
        request_threads::RequestThreads::start(config.server.request_threads())
            .map_err(StartError::RequestThreads)?,
    );
    let app = tokio::spawn(server::serve(
        listener,
        move |peer| {
            let state = app_state.clone();
            let metrics = overload_metrics.clone();
            TowerToHyperService::new(
                ServiceBuilder::new()
                    // Back to the one body type the server speaks.
                    .layer(MapResponseBodyLayer::new(body::boxed))
                    // A panic answers 500 for that request instead of dropping the connection.
                    .layer(CatchPanicLayer::custom(panic_response))
                    // Over the in-flight cap the answer is an immediate 503 + Retry-After,
                    // not a queue that grows until the pod falls over.
                    .map_result(move |result: Result<_, tower::BoxError>| {
                        // Every error here is load shedding: the pipeline itself never fails.
                        Ok::<_, tower::BoxError>(
                            result.unwrap_or_else(|_| overloaded(&metrics, max_in_flight)),
                        )
                    })
                    .load_shed()
                    .layer(GlobalConcurrencyLimitLayer::with_semaphore(
                        in_flight.clone(),
                    ))
                    // Marks the caller's token sensitive before anything below can log it.
                    .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
                    .service_fn(move |request| {
                        // Each request runs on the configuration current when it arrived.
                        let pipeline = state.load().pipeline.clone();
                        async move { Ok::<_, Infallible>(pipeline.handle(request, peer).await) }
                    }),
            )
        },
        stop_app.clone(),
        limits,
        server::Port {
            name: "app",
            open: metrics.open_connections.with_label_values(&["app"]),
            tls,
            threads: Some(request_threads.clone()),
        },
    ));
    let admin_connections = metrics.open_connections.with_label_values(&["admin"]);
    let admin_state = current.clone();
    let stop_admin = CancellationToken::new();
    let admin_server = tokio::spawn(server::serve(
        admin_listener,
        move |_peer| {
            let state = admin_state.clone();
            let metrics = metrics.clone();
            hyper::service::service_fn(move |request| {
                let admin = Admin {
                    readiness: state.load().readiness.clone(),
                    metrics: metrics.clone(),
                };
                let response = admin.handle(&request);
                async move { Ok::<_, Infallible>(response) }
            })
        },
        stop_admin.clone(),
        limits,
        server::Port {
            name: "admin",
            open: admin_connections,
            tls: None,
            threads: None,
        },
    ));

    tokio::pin!(shutdown);
    let mut reloads_open = true;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            next = reloads.recv(), if reloads_open => match next {
                // A reload waits up to 30 s for its keys and token; SIGTERM meanwhile
                // abandons it (the candidate is dropped, its refreshers stop) and shuts down.
                Some(new_config) => tokio::select! {
                    _ = &mut shutdown => break,
                    _ = reload(&current, &config, new_config, &refreshers, &draining) => {}
                },
                None => reloads_open = false,
            },
        }
    }

    tracing::info!("shutting down: not ready, draining in-flight requests");
    draining.store(true, Ordering::Relaxed);
    stop_app.cancel();
    if let Err(e) = app.await {
        tracing::error!(error = %e, "app listener task failed");
    }
    // The connections are done with (drained, or closed at the end of the grace): the
    // threads stop, and joining them blocks, so not on this runtime's thread.
    let _ = tokio::task::spawn_blocking(move || drop(request_threads)).await;
    // The admin listener outlives the drain so probes see "not ready" rather than nothing.
    stop_admin.cancel();
    if let Err(e) = admin_server.await {
        tracing::error!(error = %e, "admin listener task failed");
    }
    current.load().retire();
    refreshers.close();
    refreshers.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// Longest wait for a reloaded configuration's keys and token.
const RELOAD_READY_TIMEOUT: Duration = Duration::from_secs(30);

async fn reload(
    current: &ArcSwap<Gateway>,
    running: &Config,
    new: Config,
    tracker: &TaskTracker,
    draining: &Arc<AtomicBool>,
) {
    let not_applied = running.server.restart_only_changes(&new.server);
    if !not_applied.is_empty() {
        tracing::warn!(
            not_applied = %not_applied.join(", "),
            "reload: these keys change only on restart and keep their running values; the rest is applied"
        );
    }
    let metrics = current.load().pipeline.metrics.clone();
    let candidate = match Gateway::new(&new, metrics, draining.clone()) {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %error::chain(&e), "reload rejected; the previous configuration stays in force");
            return;
        }
    };
    candidate.adopt_metadata(&current.load());
    candidate.spawn_refreshers(tracker);
    let deadline = tokio::time::Instant::now() + RELOAD_READY_TIMEOUT;
    loop {
        let missing = candidate.readiness.dependencies_missing();
        if missing.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::error!(waiting_for = %missing.join(", "), "reload rejected: the new configuration did not become ready; the previous one stays in force");
            candidate.retire();
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old = current.swap(Arc::new(candidate));
    old.retire();
    tracing::info!("configuration reloaded");
}

fn overloaded(metrics: &Metrics, limit: usize) -> http::Response<body::GatewayBody> {
    metrics
        .requests_total
        .with_label_values(&[crate::metrics::NO_ENVIRONMENT, "-", "503"])
        .inc();
    let id = http::HeaderValue::from_static("-");
    let mut response = error::GatewayError::Overloaded(limit).into_response(&id);
    response.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    response
}

fn panic_response(
    _panic: Box<dyn std::any::Any + Send + 'static>,
) -> http::Response<body::GatewayBody> {
    tracing::error!("request handler panicked");
    let id = http::HeaderValue::from_static("-");
    error::GatewayError::Internal.into_response(&id)
}
