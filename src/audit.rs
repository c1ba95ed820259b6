//! The audit trail: one line per request (who, acting as whom, did what, with what
//! outcome), and warnings for refused requests, rate-limited so a flood of bad tokens
//! cannot fill the disk. Tokens never appear; query values can be left out.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use http::Method;
use tokio::time::Instant;

use crate::error::GatewayError;
use crate::identity::Impersonation;

/// Most refused requests logged per second; the rest are counted and summarised.
const REFUSALS_PER_SECOND: u32 = 20;
/// Longest path (with query) written to a line; past it the line says how much was cut.
pub const MAX_LOGGED_PATH: usize = 2048;
/// Longest method written to a line (methods outside the Web API's are the caller's text).
const MAX_LOGGED_METHOD: usize = 16;

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
    /// Subject of the client certificate the connection was verified with (mutual TLS).
    pub client_certificate: Option<&'a str>,
    /// The W3C trace the request belongs to (32 hex digits).
    pub trace_id: Option<&'a str>,
}

/// A per-second budget of lines, counting what it turns away.
struct LineBudget {
    per_second: u32,
    window: Mutex<Window>,
}

struct Window {
    started: Instant,
    written: u32,
    suppressed: u64,
}

impl LineBudget {
    fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: Mutex::new(Window {
                started: Instant::now(),
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(suppressed in the previous window)` when a line may be written, `None` when
    /// this one is over budget (and counted).
    fn admit(&self) -> Option<u64> {
        let Ok(mut w) = self.window.lock() else {
            return None;
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
        if w.written >= self.per_second {
            w.suppressed += 1;
            return None;
        }
        w.written += 1;
        Some(suppressed)
    }
}

/// Writes audit lines.
pub struct Audit {
    redact_query: bool,
    refusals: LineBudget,
}

impl Audit {
    pub fn new(redact_query: bool) -> Self {
        Self {
            redact_query,
            refusals: LineBudget::new(REFUSALS_PER_SECOND),
        }
    }

    /// Logs one request: its audit line and, when it was refused, a warning with the reason.
    /// Requests refused before the caller was authenticated can come from anyone, so their
    /// lines share the refusal budget; an authenticated caller's request is always audited.
    pub fn request(&self, r: &AuditRecord<'_>, refusal: Option<&GatewayError>) {
        let Some(error) = refusal else {
            return self.audit_line(r);
        };
        let admitted = self.refusals.admit();
        if let Some(suppressed) = admitted {
            if suppressed > 0 {
                tracing::warn!(target: "dynamics_gateway::audit", suppressed, "refused requests not logged in the last second (over 20 a second)");
            }
            tracing::warn!(
                target: "dynamics_gateway::audit",
                request_id = r.request_id,
                peer = %r.peer,
                reason = error.reason(),
                error = %crate::error::chain(error),
                "request refused"
            );
        }
        if admitted.is_some() || r.issuer.is_some() {
            self.audit_line(r);
        }
    }

    /// One line per request, at info level under target `dynamics_gateway::audit`.
    fn audit_line(&self, r: &AuditRecord<'_>) {
        let path = if self.redact_query {
            Cow::Owned(redact_query(r.path_and_query))
        } else {
            Cow::Borrowed(r.path_and_query)
        };
        tracing::info!(
            target: "dynamics_gateway::audit",
            request_id = r.request_id,
            peer = %r.peer,
            method = %bounded(r.method.as_str(), MAX_LOGGED_METHOD),
            path = %bounded(&path, MAX_LOGGED_PATH),
            status = r.status,
            duration_ms = r.duration.as_secs_f64() * 1000.0,
            issuer = r.issuer.unwrap_or("-"),
            subject = r.subject.unwrap_or("-"),
            caller = r.caller.unwrap_or("-"),
            impersonated = %r.impersonated.map(|i| i.describe()).unwrap_or_else(|| "-".into()),
            client_certificate = r.client_certificate.map(|c| bounded(c, MAX_LOGGED_PATH)).as_deref(),
            trace_id = r.trace_id,
            "request"
        );
    }
}

/// `text` cut to at most `max` bytes (at a character boundary), marked with how much
/// was left out, so one request cannot write an unbounded line.
fn bounded(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!(
        "{}...[cut {} bytes]",
        &text[..end],
        text.len() - end
    ))
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
    fn long_text_is_cut_at_a_character_boundary_and_says_how_much() {
        assert_eq!(bounded("short", 16), "short");
        let long = format!("/api/data/v9.2/accounts?$filter={}", "é".repeat(3000));
        let cut = bounded(&long, MAX_LOGGED_PATH);
        assert!(cut.len() < MAX_LOGGED_PATH + 32, "{}", cut.len());
        let kept = cut.split("...[cut ").next().unwrap();
        assert!(long.starts_with(kept) && kept.len() <= MAX_LOGGED_PATH);
        assert!(cut.ends_with(&format!("[cut {} bytes]", long.len() - kept.len())));
    }

    #[test]
    fn the_line_budget_admits_its_share_and_counts_the_rest() {
        let budget = LineBudget::new(3);
        assert_eq!(
            (0..10).filter(|_| budget.admit().is_some()).count(),
            3,
            "three lines in one window"
        );
    }

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
