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
                // Messages quote what the caller sent (a part's target, a name in the path).
                error = %redact_credentials(&crate::error::chain(error)),
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
            redact_credentials(r.path_and_query)
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

/// Query parameters whose values are credentials by name (compared case-insensitively,
/// after percent-decoding): a caller that puts one in a URL must not find it in our logs.
const CREDENTIAL_PARAMETERS: &[&str] = &[
    "access_token",
    "id_token",
    "refresh_token",
    "token",
    "code",
    "client_secret",
    "client_assertion",
    "password",
    "api_key",
    "apikey",
    "sig",
    "signature",
];

/// What stands in a log line where a credential was.
const REDACTED: &str = "[redacted]";

/// `text` (a path and query, or a message quoting one) with every JWT and the value of
/// every [`CREDENTIAL_PARAMETERS`] parameter replaced by `[redacted]`; borrowed when there is
/// none, which is every ordinary request. Names are matched anywhere, whatever separates
/// them (`?`, `&`, `;`, an encoded `?`), and with `%20`, `+` or `[]` before an `=` or
/// `%3D`: a log may say `[redacted]` once too often, never a credential.
pub fn redact_credentials(text: &str) -> Cow<'_, str> {
    // Lowered once: ASCII lowering keeps every byte offset, so ranges in it are ranges in `text`.
    let lower = text.to_ascii_lowercase();
    if credential_value_at(&lower, 0).is_none() && jwt_at(text).is_none() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    while let Some(value) = credential_value_at(&lower, from) {
        out.push_str(&without_jwts(&text[from..value.start]));
        out.push_str(REDACTED);
        from = value.end;
    }
    out.push_str(&without_jwts(&text[from..]));
    Cow::Owned(out)
}

/// The first value, at or after `from`, given to a credential parameter in `lower` (the
/// text, ASCII-lowercased).
fn credential_value_at(lower: &str, from: usize) -> Option<std::ops::Range<usize>> {
    let bytes = lower.as_bytes();
    CREDENTIAL_PARAMETERS
        .iter()
        .filter_map(|name| {
            let mut at = from;
            while let Some(found) = lower[at..].find(name) {
                let mut i = at + found + name.len();
                // What a careless or crafty writer puts between a name and its `=`.
                loop {
                    let rest = &lower[i..];
                    if let Some(skip) = ["%20", "%5b", "%5d", " ", "+", "[", "]"]
                        .iter()
                        .find(|junk| rest.starts_with(**junk))
                    {
                        i += skip.len();
                    } else {
                        break;
                    }
                }
                let equals = ["=", "%3d"].iter().find(|e| lower[i..].starts_with(**e));
                if let Some(equals) = equals {
                    let start = i + equals.len();
                    let end = bytes[start..]
                        .iter()
                        .position(|c| b"&;# \t`'\")".contains(c))
                        .map_or(bytes.len(), |n| start + n);
                    return Some(start..end);
                }
                at = at + found + 1;
            }
            None
        })
        .min_by_key(|range| range.start)
}

/// Whether `text` holds something shaped like a JWT (JWS or JWE compact form).
pub fn holds_jwt(text: &[u8]) -> bool {
    std::str::from_utf8(text).is_ok_and(|t| jwt_at(t).is_some())
}

/// The first run that reads as a compact JWT: `eyJ` (base64url of `{"`) and at least two
/// dots among base64url characters.
fn jwt_at(text: &str) -> Option<std::ops::Range<usize>> {
    // `%` too: a JWT whose dots are written `%2E` is still one once Dataverse decodes it.
    let is_part =
        |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.' || c == b'%';
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(found) = text[from..].find("eyJ") {
        let start = from + found;
        let end = bytes[start..]
            .iter()
            .position(|&c| !is_part(c))
            .map_or(bytes.len(), |n| start + n);
        let run = text[start..end].to_ascii_lowercase();
        if run.matches('.').count() + run.matches("%2e").count() >= 2 {
            return Some(start..end);
        }
        from = end.max(start + 3);
    }
    None
}

fn without_jwts(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(jwt) = jwt_at(rest) {
        out.push_str(&rest[..jwt.start]);
        out.push_str(REDACTED);
        rest = &rest[jwt.end..];
    }
    out.push_str(rest);
    out
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
    fn credentials_are_redacted_and_the_rest_of_the_path_kept() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln";
        let plain = "/api/data/v9.2/accounts?$select=name&$top=5";
        assert!(matches!(redact_credentials(plain), Cow::Borrowed(_)));
        for (given, logged) in [
            (
                format!("/api/data/v9.2/accounts?access_token={jwt}&$top=5"),
                "/api/data/v9.2/accounts?access_token=[redacted]&$top=5".to_string(),
            ),
            (
                "/api/data/v9.2/accounts?$top=1&CLIENT_SECRET=s3cr3t&Access%5FToken=x".into(),
                "/api/data/v9.2/accounts?$top=1&CLIENT_SECRET=[redacted]&Access%5FToken=[redacted]"
                    .into(),
            ),
            (
                format!("/api/data/v9.2/accounts?$filter=name%20eq%20'{jwt}'"),
                "/api/data/v9.2/accounts?$filter=name%20eq%20'[redacted]'".into(),
            ),
            (
                format!("/api/data/v9.2/{jwt}/accounts"),
                "/api/data/v9.2/[redacted]/accounts".into(),
            ),
            (
                "/api/data/v9.2/accounts?sig=abc&signature".into(),
                "/api/data/v9.2/accounts?sig=[redacted]&signature".into(),
            ),
            (
                "/api/data/v9.2/accounts?x=1;sig=X&access_token%20=Y&+code=Z&token[]=W&sig%3DV".into(),
                "/api/data/v9.2/accounts?x=1;sig=[redacted]&access_token%20=[redacted]&+code=[redacted]&token[]=[redacted]&sig%3D[redacted]".into(),
            ),
            (
                "/api/data/v9.2/accounts%3Faccess_token=X".into(),
                "/api/data/v9.2/accounts%3Faccess_token=[redacted]".into(),
            ),
            (
                "part 1 targets `$batch?access_token=X`, which is refused".into(),
                "part 1 targets `$batch?access_token=[redacted]`, which is refused".into(),
            ),
            (
                format!("/api/data/v9.2/accounts?x={}", jwt.replace('.', "%2E")),
                "/api/data/v9.2/accounts?x=[redacted]".into(),
            ),
        ] {
            assert_eq!(redact_credentials(&given), logged, "{given}");
        }
        assert!(holds_jwt(jwt.as_bytes()));
        assert!(!holds_jwt(b"eyJ-not.a-token"));
        assert!(!holds_jwt(b"3f2504e0-4f89-11d3-9a0c-0305e82c3301"));
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
