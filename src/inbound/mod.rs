//! Inbound: who is calling? Takes the caller's `Authorization: Bearer` JWT, checks it
//! against the configured issuers' keys, and hands the next stage a verified [`Caller`].

pub(crate) mod discovery;
pub(crate) mod jwks;
pub mod jwt;
pub(crate) mod verified;

use std::collections::HashMap;
use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use serde_json::{Map, Value};

pub(crate) use jwks::JwksCache;

use crate::config::{AppOnlyEvidence, InboundConfig};

/// A caller whose token has been verified.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's `iss` (for a `{tenantid}` template: with the token's own `tid` put in).
    pub issuer: Arc<str>,
    /// The issuer as written in `inbound.issuers` (a template stays a template): what
    /// config entries that trust an issuer name.
    pub configured_issuer: Arc<str>,
    /// The token's `sub` when it is a string.
    pub subject: Option<Arc<str>>,
    /// The token's `tid` (the caller's tenant) when it is a string: what routing, access
    /// and identity decide on, read once here.
    pub tenant: Option<Arc<str>>,
    /// User or application, decided once here from the issuer's evidence.
    pub kind: CallerKind,
    /// Every claim of the verified token, for the claims config names (identity's
    /// `claim`, access rules' `roles`, `scp`, `claims`).
    pub claims: Arc<Map<String, Value>>,
}

/// Whether a token speaks for a user (delegated) or for an application calling as itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerKind {
    User,
    /// Only on positive evidence (see [`CallerKind::from_claims`]): an app-only token acts
    /// as the application user, so no missing claim may make a user's token one.
    App,
}

impl CallerKind {
    /// The kind the issuer's `app_only_evidence` proves; `User` whenever it proves nothing.
    pub(crate) fn from_claims(evidence: &AppOnlyEvidence, claims: &Map<String, Value>) -> Self {
        let app = match evidence {
            AppOnlyEvidence::Never => false,
            // Microsoft's claims-validation guidance: the optional `idtyp` claim says `app`;
            // where it is not issued, an app-only token has `oid` equal to `sub`. A token
            // with `scp` was delegated by a user, whatever else it says.
            AppOnlyEvidence::Entra => {
                !claims.contains_key("scp")
                    && match claims.get("idtyp") {
                        Some(idtyp) => idtyp
                            .as_str()
                            .is_some_and(|t| t.eq_ignore_ascii_case("app")),
                        None => match (claim(claims, "oid"), claim(claims, "sub")) {
                            (Some(oid), Some(sub)) => !oid.is_empty() && oid == sub,
                            _ => false,
                        },
                    }
            }
            AppOnlyEvidence::Claim { name, value } => match claims.get(name) {
                Some(Value::String(s)) => s == value,
                Some(Value::Array(items)) => items.iter().any(|i| i.as_str() == Some(value)),
                _ => false,
            },
        };
        if app {
            Self::App
        } else {
            Self::User
        }
    }
}

fn claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    claims.get(name).and_then(Value::as_str)
}

impl Caller {
    /// The caller of verified claims: the typed fields are read from them here, once.
    pub(crate) fn new(
        issuer: Arc<str>,
        configured_issuer: Arc<str>,
        kind: CallerKind,
        claims: Map<String, Value>,
    ) -> Self {
        let string = |name| claim(&claims, name).map(Arc::from);
        Self {
            issuer,
            configured_issuer,
            subject: string("sub"),
            tenant: string("tid"),
            kind,
            claims: Arc::new(claims),
        }
    }

    /// The tenant, when the token names one.
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// A claim's value when it is a string.
    pub(crate) fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// `sub`, for logs.
    pub fn subject(&self) -> &str {
        self.subject.as_deref().unwrap_or("-")
    }
}

/// Why a caller's token was refused. The messages are ours: they never quote the token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token; send Authorization: Bearer <token>")]
    MissingToken,
    #[error("the Authorization header is not a single Bearer token")]
    MalformedHeader,
    #[error("the token is not a well-formed JWT ({0})")]
    Malformed(&'static str),
    #[error("the token is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("the token's algorithm {0} is not allowed for its issuer")]
    DisallowedAlgorithm(String),
    #[error("the token's header has critical extensions the gateway does not understand")]
    UnsupportedCritical,
    #[error("the token's issuer is not accepted")]
    UnknownIssuer,
    #[error("the token has no kid header")]
    MissingKid,
    #[error("the token's signing key (kid) is not known to its issuer")]
    UnknownKid,
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's audience is not accepted")]
    AudienceMismatch,
    #[error("the token's tenant is not accepted")]
    TenantNotAllowed,
    /// Also for a required claim of the wrong type (`"exp": "123"`), which jsonwebtoken
    /// reports as missing.
    #[error("the token has no valid {0} claim")]
    MissingClaim(String),
    #[error("the token's {0} claim has the wrong type")]
    InvalidClaim(String),
    #[error("the keys of issuer {issuer} are not available yet")]
    KeysUnavailable { issuer: String },
    #[error(
        "the token is not an access token ({0}); call with an access token issued for this API"
    )]
    NotAnAccessToken(&'static str),
    #[error("the token's typ header is not one its issuer's token_types accepts")]
    TokenTypeNotAllowed,
    #[error("the token's iat lies in the future; check the issuer's clock")]
    IssuedInFuture,
}

impl AuthError {
    /// Label for `auth_failures_total{reason}` and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::MalformedHeader => "malformed_header",
            Self::Malformed(_) => "malformed_token",
            Self::TooLarge { .. } => "token_too_large",
            Self::DisallowedAlgorithm(_) => "disallowed_algorithm",
            Self::UnsupportedCritical => "unsupported_critical_header",
            Self::UnknownIssuer => "unknown_issuer",
            Self::MissingKid => "missing_kid",
            Self::UnknownKid => "unknown_kid",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::AudienceMismatch => "wrong_audience",
            Self::TenantNotAllowed => "tenant_not_allowed",
            Self::MissingClaim(_) => "missing_claim",
            Self::InvalidClaim(_) => "invalid_claim",
            Self::KeysUnavailable { .. } => "keys_unavailable",
            Self::NotAnAccessToken(_) => "not_access_token",
            Self::TokenTypeNotAllowed => "token_type_not_allowed",
            Self::IssuedInFuture => "issued_in_future",
        }
    }
}

/// The inbound stage: one [`JwksCache`] per configured issuer.
pub struct Authenticator {
    /// Issuers written exactly, by `iss`.
    issuers: HashMap<String, Arc<JwksCache>>,
    /// Issuers written as `{tenantid}` templates, tried in order when no exact one matches.
    templates: Vec<Arc<JwksCache>>,
    verified: verified::VerifiedTokens,
}

impl Authenticator {
    pub fn new(
        config: &InboundConfig,
        http: reqwest::Client,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        let mut issuers = HashMap::new();
        let mut templates = Vec::new();
        for issuer in &config.issuers {
            let cache = Arc::new(JwksCache::new(
                issuer.clone(),
                config,
                http.clone(),
                metrics.clone(),
            ));
            if cache.is_template() {
                templates.push(cache);
            } else {
                issuers.insert(issuer.issuer.clone(), cache);
            }
        }
        Self {
            issuers,
            templates,
            verified: verified::VerifiedTokens::new(config.token_cache_max_entries),
        }
    }

    /// The key caches, for their refreshers and for readiness.
    pub fn caches(&self) -> impl Iterator<Item = &Arc<JwksCache>> {
        self.issuers.values().chain(self.templates.iter())
    }

    /// The issuer whose keys verify this token: exact `iss` first, else a template that
    /// gives exactly this `iss` when the token's own `tid` is put in.
    fn issuer_for(&self, token: &jwt::UnverifiedToken<'_>) -> Result<&Arc<JwksCache>, AuthError> {
        if let Some(cache) = self.issuers.get(token.issuer()) {
            return Ok(cache);
        }
        let tid = token.tenant().ok_or(AuthError::UnknownIssuer)?;
        self.templates
            .iter()
            .find(|t| t.issuer_for_tenant(tid) == token.issuer())
            .ok_or(AuthError::UnknownIssuer)
    }

    /// Verifies the request's bearer token and returns who is calling.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let token = bearer_token(headers)?;
        let hash = verified::TokenHash::of(token);
        if let Some(caller) = self.verified.get(hash) {
            return Ok(caller);
        }
        let unverified = jwt::UnverifiedToken::parse(token)?;
        let caller = self.issuer_for(&unverified)?.verify(unverified).await?;
        self.verified.insert(hash, &caller);
        Ok(caller)
    }
}

/// Exactly one `Authorization: Bearer <token>` header; two are refused rather than guessed.
fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::MissingToken)?;
    if values.next().is_some() {
        return Err(AuthError::MalformedHeader);
    }
    let value = value.to_str().map_err(|_| AuthError::MalformedHeader)?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(AuthError::MalformedHeader)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedHeader);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::MissingToken);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn kind(evidence: &AppOnlyEvidence, claims: serde_json::Value) -> CallerKind {
        CallerKind::from_claims(evidence, claims.as_object().unwrap())
    }

    #[test]
    fn app_only_needs_the_issuers_positive_evidence() {
        use serde_json::json;
        let entra = AppOnlyEvidence::Entra;
        assert_eq!(kind(&entra, json!({ "idtyp": "app" })), CallerKind::App);
        assert_eq!(
            kind(&entra, json!({ "oid": "x", "sub": "x" })),
            CallerKind::App
        );
        for user in [
            json!({}),
            json!({ "oid": "x", "sub": "y" }),
            json!({ "oid": "", "sub": "" }),
            json!({ "sub": "x", "scope": "openid" }),
            json!({ "idtyp": "app", "scp": "a" }),
            json!({ "idtyp": "user", "oid": "x", "sub": "x" }),
            json!({ "idtyp": 1, "oid": "x", "sub": "x" }),
        ] {
            assert_eq!(kind(&entra, user.clone()), CallerKind::User, "{user}");
        }
        let never = AppOnlyEvidence::Never;
        assert_eq!(kind(&never, json!({ "idtyp": "app" })), CallerKind::User);
        let claim = AppOnlyEvidence::Claim {
            name: "kind".into(),
            value: "service".into(),
        };
        assert_eq!(kind(&claim, json!({ "kind": "service" })), CallerKind::App);
        assert_eq!(
            kind(&claim, json!({ "kind": ["a", "service"] })),
            CallerKind::App
        );
        assert_eq!(kind(&claim, json!({ "kind": "Service" })), CallerKind::User);
        assert_eq!(kind(&claim, json!({ "idtyp": "app" })), CallerKind::User);
    }

    #[test]
    fn bearer_token_requires_one_bearer_header() {
        let mut h = HeaderMap::new();
        assert!(matches!(bearer_token(&h), Err(AuthError::MissingToken)));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(matches!(bearer_token(&h), Err(AuthError::MalformedHeader)));
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer a.b.c"));
        assert_eq!(bearer_token(&h).unwrap(), "a.b.c");
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer d.e.f"));
        assert!(matches!(bearer_token(&h), Err(AuthError::MalformedHeader)));
    }
}
