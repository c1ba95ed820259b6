//! The admin listener: `/healthz` (the process is alive), `/readyz` (keys and S2S token in
//! hand, not draining; each environment's `$metadata` state is reported but not waited
//! for), `/metrics` (Prometheus text). Never on the app port.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};

use crate::access::EnvironmentMetadata;
use crate::body::{self, GatewayBody};
use crate::inbound::JwksCache;
use crate::metrics::Metrics;
use crate::upstream::TokenSource;

/// What readiness depends on.
#[derive(Clone)]
pub struct Readiness {
    pub issuers: Vec<Arc<JwksCache>>,
    /// One per (tenant, client, resource); environments may share one.
    pub tokens: Vec<Arc<TokenSource>>,
    /// The environments whose `$metadata` is fetched. Reported, never waited for: until
    /// it is in hand only the requests that need it are refused (503), and the gateway
    /// serves the rest.
    pub metadata: Vec<Arc<EnvironmentMetadata>>,
    /// Set when shutdown begins, so load balancers stop sending before the drain.
    pub draining: Arc<AtomicBool>,
}

impl Readiness {
    /// Everything that is not ready yet, by name; empty when ready.
    pub fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if self.draining.load(Ordering::Relaxed) {
            missing.push("shutting down".to_string());
        }
        missing.extend(self.dependencies_missing());
        missing
    }

    /// The keys and tokens not in hand yet, by name: what a reloaded configuration waits
    /// for (draining is the process's state, not the configuration's).
    pub fn dependencies_missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for cache in &self.issuers {
            if !cache.is_ready() {
                missing.push(format!("signing keys of {}", cache.issuer()));
            }
        }
        // One environment without a token is unready on its own; the gateway still
        // serves the others, so it stays ready while any environment can be served.
        if !self.tokens.iter().any(|t| t.is_ready()) {
            missing.push("Dynamics S2S token".to_string());
        }
        missing
    }

    /// One line per environment group: whether its S2S token is in hand, and how often
    /// its refresher was restarted after a panic (when it was).
    pub fn environments(&self) -> Vec<String> {
        self.tokens
            .iter()
            .map(|t| {
                format!(
                    "{}: {}{}",
                    t.label(),
                    if t.is_ready() {
                        "ready"
                    } else {
                        "no S2S token"
                    },
                    restarted(t.refresher_restarts())
                )
            })
            .collect()
    }

    /// One line per environment whose `$metadata` is fetched: loaded, or why not.
    pub fn metadata_states(&self) -> Vec<String> {
        self.metadata
            .iter()
            .map(|m| {
                format!(
                    "{}: {}{}",
                    m.environment(),
                    m.state(),
                    restarted(m.refresher_restarts())
                )
            })
            .collect()
    }

    /// One line per issuer whose key refresher was restarted after a panic.
    pub fn restarted_key_refreshers(&self) -> Vec<String> {
        self.issuers
            .iter()
            .filter(|c| c.refresher_restarts().load(Ordering::Relaxed) > 0)
            .map(|c| {
                format!(
                    "signing keys of {}:{}",
                    c.issuer(),
                    restarted(c.refresher_restarts())
                )
            })
            .collect()
    }
}

/// The admin service's state.
#[derive(Clone)]
pub struct Admin {
    pub readiness: Readiness,
    pub metrics: Metrics,
}

impl Admin {
    pub fn handle<B>(&self, request: &Request<B>) -> Response<GatewayBody> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
            (&Method::GET, "/readyz") => {
                let missing = self.readiness.missing();
                let mut lines = self.readiness.environments();
                lines.extend(self.readiness.metadata_states());
                lines.extend(self.readiness.restarted_key_refreshers());
                let environments = lines.join("\n");
                if missing.is_empty() {
                    text(
                        StatusCode::OK,
                        "text/plain",
                        format!("ready\n{environments}\n"),
                    )
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!(
                            "not ready: waiting for {}\n{environments}\n",
                            missing.join(", ")
                        ),
                    )
                }
            }
            (&Method::GET, "/metrics") => {
                let ready = self.readiness.missing().is_empty();
                self.metrics.ready.set(i64::from(ready));
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.metrics.render(),
                )
            }
            (_, "/healthz" | "/readyz" | "/metrics") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "use GET\n".into(),
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /healthz, /readyz or /metrics\n".into(),
            ),
        }
    }
}

/// ` (refresher restarted N times after a panic)`, or nothing when it never was.
fn restarted(restarts: &AtomicU64) -> String {
    match restarts.load(Ordering::Relaxed) {
        0 => String::new(),
        n => format!(" (refresher restarted {n} times after a panic)"),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<GatewayBody> {
    let mut response = Response::new(body::full(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_shows_refresher_restarts() {
        let metrics = Metrics::new().unwrap();
        let tokens = crate::upstream::token::source_with(Box::new(|| Ok((3600, None))));
        let admin = Admin {
            readiness: Readiness {
                issuers: Vec::new(),
                tokens: vec![tokens.clone()],
                metadata: Vec::new(),
                draining: Arc::new(AtomicBool::new(false)),
            },
            metrics,
        };
        let readyz = |admin: &Admin| {
            let request = Request::get("/readyz").body(()).unwrap();
            let response = admin.handle(&request);
            let bytes = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(http_body_util::BodyExt::collect(response.into_body()))
                .unwrap()
                .to_bytes();
            String::from_utf8(bytes.to_vec()).unwrap()
        };
        assert!(!readyz(&admin).contains("restarted"));
        tokens.refresher_restarts().store(2, Ordering::Relaxed);
        let body = readyz(&admin);
        assert!(
            body.contains("contoso: no S2S token (refresher restarted 2 times after a panic)"),
            "{body}"
        );
    }
}
