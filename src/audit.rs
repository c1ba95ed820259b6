//! The audit trail: one line per request (who, acting as whom, did what, with what
//! outcome), and warnings for refused requests, rate-limited so a flood of bad tokens
//! cannot fill the disk. Tokens never appear; query values can be left out.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use http::Method;
use tokio::time::Instant;

use crate::error::GatewayError;
use crate::identity::Impersonation;

/// Most refusal warnings written per second; the rest are counted and summarised.
const REFUSALS_PER_SECOND: u32 = 20;

/// Everything one audit line says.
pub struct AuditRecord<'a> {
    pub request_id: &'a str,
    pub peer: SocketAddr,
    pub method: &'a Method,
    pub path_and_query: &'a str,
    pub status: u16,
    pub duration: Duration,
    /// `iss` of the verified token.
    pub issuer: Option<&'a str>,
    /// `sub` of the verified token.
    pub subject: Option<&'a str>,
    /// The identity claim's value (e.g. `oid`).
    pub caller: Option<&'a str>,
    pub impersonated: Option<Impersonation>,
}

struct Window {
    started: Instant,
    written: u32,
    suppressed: u64,
}

/// Writes audit lines.
pub struct Audit {
    redact_query: bool,
    refusals: Mutex<Window>,
}

impl Audit {
    pub fn new(redact_query: bool) -> Self {
        Self {
            redact_query,
            refusals: Mutex::new(Window {
                started: Instant::now(),
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// One line per request, at info level under target `dynamics_gateway::audit`.
    pub fn request(&self, r: &AuditRecord<'_>) {
        let path = if self.redact_query {
            redact_query(r.path_and_query)
        } else {
            r.path_and_query.to_string()
        };
        tracing::info!(
            target: "dynamics_gateway::audit",
            request_id = r.request_id,
            peer = %r.peer,
            method = %r.method,
            path = %path,
            status = r.status,
            duration_ms = r.duration.as_secs_f64() * 1000.0,
            issuer = r.issuer.unwrap_or("-"),
            subject = r.subject.unwrap_or("-"),
            caller = r.caller.unwrap_or("-"),
            impersonated = %r.impersonated.map(|i| i.describe()).unwrap_or_else(|| "-".into()),
            "request"
        );
    }

    /// A refused request, with its reason and the caller's address; rate-limited.
    pub fn refusal(&self, request_id: &str, peer: SocketAddr, error: &GatewayError) {
        let suppressed = {
            let Ok(mut w) = self.refusals.lock() else {
                return;
            };
            let mut suppressed = 0;
            if w.started.elapsed() >= Duration::from_secs(1) {
                suppressed = w.suppressed;
                *w = Window {
                    started: Instant::now(),
                    written: 0,
                    suppressed: 0,
                };
            }
            if w.written >= REFUSALS_PER_SECOND {
                w.suppressed += 1;
                return;
            }
            w.written += 1;
            suppressed
        };
        if suppressed > 0 {
            tracing::warn!(target: "dynamics_gateway::audit", suppressed, "refused-request warnings suppressed in the last second");
        }
        tracing::warn!(
            target: "dynamics_gateway::audit",
            request_id,
            %peer,
            reason = error.reason(),
            error = %crate::error::chain(error),
            "request refused"
        );
    }
}

/// `path?a=1&b=x` -> `path?a=&b=`: the shape of the query without its values.
pub fn redact_query(path_and_query: &str) -> String {
    match path_and_query.split_once('?') {
        None => path_and_query.to_string(),
        Some((path, query)) => {
            let keys: Vec<&str> = query
                .split('&')
                .map(|pair| pair.split('=').next().unwrap_or_default())
                .collect();
            format!(
                "{path}?{}",
                keys.iter()
                    .map(|k| format!("{k}="))
                    .collect::<Vec<_>>()
                    .join("&")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_keeps_keys_and_drops_values() {
        assert_eq!(
            redact_query("/api/data/v9.2/contacts?$filter=emailaddress1%20eq%20'a@b.c'&$top=5"),
            "/api/data/v9.2/contacts?$filter=&$top="
        );
        assert_eq!(
            redact_query("/api/data/v9.2/WhoAmI"),
            "/api/data/v9.2/WhoAmI"
        );
    }
}
