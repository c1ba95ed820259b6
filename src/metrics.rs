//! Every metric the gateway exports, named once, in its own registry. Labels are
//! low-cardinality by construction: no caller id, path or token ever becomes a label.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::supervisor::Refresher;

const PREFIX: &str = "dynamics_gateway";

/// The `environment` label of a request refused before it was routed (bad path, no valid
/// token, unknown environment, overload): the caller's path never names a label value.
/// Config refuses an environment of this name.
pub(crate) const NO_ENVIRONMENT: &str = "none";

/// Handles to every metric; cheap to clone (each is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub upstream_duration_seconds: HistogramVec,
    pub token_requests_total: IntCounterVec,
    pub jwks_refresh_total: IntCounterVec,
    pub refresher_restarts_total: IntCounterVec,
    pub auth_failures_total: IntCounterVec,
    pub identity_cache_requests_total: IntCounterVec,
    pub access_denied_total: IntCounterVec,
    /// 1 once an environment's fetched `$metadata` is in hand (a refresh failure keeps
    /// it), else 0; only environments whose metadata is fetched have a series.
    pub access_metadata_loaded: IntGaugeVec,
    /// Fetches of `$metadata`, by environment and outcome (updated, not_modified, failure).
    pub access_metadata_refresh_total: IntCounterVec,
    pub in_flight_requests: IntGauge,
    /// 1 when `/readyz` would answer 200, else 0; set at each scrape, so alerts need not
    /// probe `/readyz` themselves.
    pub ready: IntGauge,
    /// Open connections, by listener (`app`, `admin`).
    pub open_connections: IntGaugeVec,
    pub build_info: IntGaugeVec,
    /// The service-protection budget (src/upstream/budget.rs); `bucket` is `application`
    /// or `users` (all per-user buckets summed, never a user id).
    pub budget_in_flight: IntGaugeVec,
    pub budget_limit: IntGaugeVec,
    pub budget_queue_depth: IntGaugeVec,
    pub budget_wait_seconds: HistogramVec,
    pub budget_refused_total: IntCounterVec,
    pub upstream_throttled_total: IntCounterVec,
    pub dataverse_burst_remaining_requests: IntGaugeVec,
    pub dataverse_time_remaining_ms: GaugeVec,
    /// The budget store shared by replicas (src/upstream/budget/store.rs): 1 while a
    /// configured store has not answered (yet, or since a failure) and each replica keeps
    /// its local share, else 0 (also without a store, so the alert needs no "is one
    /// configured" clause).
    pub budget_store_degraded: IntGauge,
    /// Store commands that failed or timed out.
    pub budget_store_errors_total: IntCounter,
    /// Switches from the shared budget to the local shares.
    pub budget_store_fallbacks_total: IntCounter,
    /// Lines the log writer dropped (src/log_writer.rs); brought up to date at each scrape.
    log_lines_dropped_total: IntCounter,
}

fn gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, prometheus::Error> {
    let g = IntGaugeVec::new(Opts::new(name, help).namespace(PREFIX), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn single_counter(
    registry: &Registry,
    name: &str,
    help: &str,
) -> Result<IntCounter, prometheus::Error> {
    let c = IntCounter::with_opts(Opts::new(name, help).namespace(PREFIX))?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help).namespace(PREFIX), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<HistogramVec, prometheus::Error> {
    let buckets = vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 120.0,
    ];
    let h = HistogramVec::new(
        HistogramOpts::new(name, help)
            .namespace(PREFIX)
            .buckets(buckets),
        labels,
    )?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let in_flight_requests = IntGauge::with_opts(
            Opts::new("in_flight_requests", "Requests being handled now").namespace(PREFIX),
        )?;
        registry.register(Box::new(in_flight_requests.clone()))?;
        let ready = IntGauge::with_opts(
            Opts::new(
                "ready",
                "1 when /readyz answers 200 (keys and an S2S token in hand, not draining), else 0",
            )
            .namespace(PREFIX),
        )?;
        registry.register(Box::new(ready.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Always 1; labels carry the version").namespace(PREFIX),
            &["version"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        let open_connections = IntGaugeVec::new(
            Opts::new("open_connections", "Connections open now, by listener").namespace(PREFIX),
            &["listener"],
        )?;
        registry.register(Box::new(open_connections.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let budget_store_degraded = IntGauge::with_opts(
            Opts::new(
                "budget_store_degraded",
                "1 while the configured budget store does not answer and each replica keeps limit / replicas, else 0",
            )
            .namespace(PREFIX),
        )?;
        registry.register(Box::new(budget_store_degraded.clone()))?;
        let budget_store_errors_total = single_counter(
            &registry,
            "budget_store_errors_total",
            "Budget store commands that failed or timed out",
        )?;
        let budget_store_fallbacks_total = single_counter(
            &registry,
            "budget_store_fallbacks_total",
            "Switches from the budget shared in the store to each replica's local share",
        )?;
        let log_lines_dropped_total = single_counter(
            &registry,
            "log_lines_dropped_total",
            "Log and audit lines dropped: the writer's buffer was full (stderr too slow) or writing to stderr failed",
        )?;
        let metrics = Self {
            log_lines_dropped_total,
            budget_store_degraded,
            budget_store_errors_total,
            budget_store_fallbacks_total,
            requests_total: counter(
                &registry,
                "requests_total",
                "Requests answered, by environment (none before routing), method and status",
                &["environment", "method", "status"],
            )?,
            request_duration_seconds: histogram(
                &registry,
                "request_duration_seconds",
                "Time from request to response headers, by environment (none before routing) and method",
                &["environment", "method"],
            )?,
            upstream_duration_seconds: histogram(
                &registry,
                "upstream_duration_seconds",
                "Time Dataverse took to answer with headers, by environment and method",
                &["environment", "method"],
            )?,
            token_requests_total: counter(
                &registry,
                "token_requests_total",
                "S2S token requests, by environment (a token shared by environments counts in each) and result",
                &["environment", "result"],
            )?,
            jwks_refresh_total: counter(
                &registry,
                "jwks_refresh_total",
                "JWKS fetches, by result",
                &["result"],
            )?,
            refresher_restarts_total: counter(
                &registry,
                "refresher_restarts_total",
                "Background refreshers restarted after a panic, by refresher (jwks, token or metadata)",
                &["refresher"],
            )?,
            auth_failures_total: counter(
                &registry,
                "auth_failures_total",
                "Refused caller tokens, by reason",
                &["reason"],
            )?,
            identity_cache_requests_total: counter(
                &registry,
                "identity_cache_requests_total",
                "Identity lookups, by cache hit or miss",
                &["result"],
            )?,
            access_denied_total: counter(
                &registry,
                "access_denied_total",
                "Requests refused by the access rules, by the rule that decided",
                &["rule"],
            )?,
            access_metadata_loaded: gauge(
                &registry,
                "access_metadata_loaded",
                "1 once the environment's fetched $metadata is in hand, else 0",
                &["environment"],
            )?,
            access_metadata_refresh_total: counter(
                &registry,
                "access_metadata_refresh_total",
                "Fetches of $metadata, by environment and outcome (updated, not_modified, failure)",
                &["environment", "outcome"],
            )?,
            budget_in_flight: gauge(
                &registry,
                "budget_in_flight",
                "Requests in flight to Dataverse, by environment and bucket (application or users)",
                &["environment", "bucket"],
            )?,
            budget_limit: gauge(
                &registry,
                "budget_limit",
                "Concurrent requests allowed now, by environment and bucket (users: the ceiling each user bucket gets)",
                &["environment", "bucket"],
            )?,
            budget_queue_depth: gauge(
                &registry,
                "budget_queue_depth",
                "Requests waiting for a slot to Dataverse, by environment",
                &["environment"],
            )?,
            budget_wait_seconds: histogram(
                &registry,
                "budget_wait_seconds",
                "Time requests waited in the queue for a slot to Dataverse",
                &["environment"],
            )?,
            budget_refused_total: counter(
                &registry,
                "budget_refused_total",
                "Requests answered by the gateway without being sent, by reason (throttled, queue_timeout, queue_full)",
                &["environment", "reason"],
            )?,
            upstream_throttled_total: counter(
                &registry,
                "upstream_throttled_total",
                "429s from Dataverse, by its error code (0x80072322, 0x80072321, 0x80072326 or other)",
                &["environment", "code"],
            )?,
            dataverse_burst_remaining_requests: gauge(
                &registry,
                "dataverse_burst_remaining_requests",
                "Last x-ms-ratelimit-burst-remaining-xrm-requests Dataverse sent",
                &["environment"],
            )?,
            dataverse_time_remaining_ms: {
                let g = GaugeVec::new(
                    Opts::new(
                        "dataverse_time_remaining_ms",
                        "Last x-ms-ratelimit-time-remaining-xrm-requests Dataverse sent (milliseconds)",
                    )
                    .namespace(PREFIX),
                    &["environment"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            in_flight_requests,
            ready,
            open_connections,
            build_info,
            registry,
        };
        // Failure counters exist at 0 from the start: a series first seen at 1 gives
        // `increase()` nothing, so the first failure would escape the alerts.
        for result in ["success", "failure"] {
            metrics.jwks_refresh_total.with_label_values(&[result]);
        }
        for refresher in [Refresher::Jwks, Refresher::Token, Refresher::Metadata] {
            metrics
                .refresher_restarts_total
                .with_label_values(&[refresher.label()]);
        }
        Ok(metrics)
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let dropped = crate::log_writer::dropped_lines();
        self.log_lines_dropped_total
            .inc_by(dropped.saturating_sub(self.log_lines_dropped_total.get()));
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
