//! May this caller make this request? The access stage owns the rules (`access:` in the
//! config), the reading of the request target as an entity set ([`target`]), and the
//! Dataverse control headers a grant lets through ([`check_control_headers`]). It runs after
//! the caller is authenticated and before anything goes upstream, and hands the next stages
//! a [`Grant`]: which rule allowed the request, whether to impersonate, which control
//! headers may pass.
//!
//! Rules are tried in order; the first whose `when` matches the caller and whose `allow`
//! covers the request grants it. A rule that matches the caller but not the request does
//! not stop the search. If no rule grants, `default` decides (`deny` unless set).
//!
//! Decisions worth knowing when writing rules:
//! - A rule grants a request only if it grants every (operation, table) pair the request
//!   touches ([`touches`]): navigation segments, `$expand` at any depth, navigation paths
//!   in `$filter`/`$orderby`/`$select`/`$apply`, fetchXml entities, function parameters.
//!   `methods` + `entity_sets` grant a pair when the method and the table are listed;
//!   `tables` grants operations per table, `functions` the functions and actions by name.
//!   Navigation targets come from the environment's CSDL ([`metadata`]): fetched from
//!   Dataverse per environment ([`metadata_fetch`]) or read from `access.metadata_file`;
//!   until it is in hand such requests are refused 503 unless a rule grants every table
//!   (`"*"`), while requests that need no metadata are decided as ever.
//! - Stored queries (`savedQuery`, `userQuery`) read a table the request does not name:
//!   the pipeline looks it up ([`StoredQueryLookup`]) and passes it in
//!   [`AccessRequest::stored_query_table`]; without it only a grant on every table covers them.
//!   Inside `$batch` parts they are never looked up (the parts are decided synchronously
//!   as the body streams), so there they always need a grant on every table.
//! - Request bodies ([`body`]): deep inserts, `@odata.bind` and `@odata.id` values are
//!   pairs too, found as the body streams through the link rewriter; the rule that grants
//!   must grant them as well (a later rule for the caller acting the same way may).
//! - `$batch` is allowed only by a rule with `batch: true`, which permits the envelope only.
//!   Each part, change sets included, is decided as a request of its own (its method, URL
//!   and body) by the rules for the caller that act as the envelope's grant does; one
//!   refused part refuses the batch, naming the part. Parts are also checked for identity,
//!   credential, cookie and method-override headers, other hosts and paths outside
//!   `/api/data/`, and their control headers are decided by the envelope's grant. Long GETs
//!   from some clients (dynamics-web-api) arrive as batches.
//! - An empty `when: {}` is allowed and matches every authenticated caller; `when` itself
//!   must be written, so "everyone" is always a visible choice.
//! - `impersonation: app_only` rules match only callers the inbound stage found to be
//!   applications ([`CallerKind::App`], on the issuer's positive evidence), never a user.

pub(crate) mod body;
mod control_headers;
pub(crate) mod metadata;
pub(crate) mod metadata_fetch;
pub mod odata;
mod raw;
mod rule;
mod stored_query;
pub mod target;
pub(crate) mod touches;

use std::sync::Arc;

use http::header::HeaderName;
use http::Method;
use serde_json::{Map, Value};

use crate::inbound::CallerKind;

pub(crate) use body::{BatchPart, BodyAccess, BodyInspector};
pub(crate) use control_headers::names_impersonation;
#[cfg(test)]
pub(crate) use control_headers::strip_control_headers;
pub(crate) use control_headers::{
    check_control_headers, decide_control_header, ControlHeaderDecision, ControlHeaderRefused,
};
pub use metadata::Metadata;
pub(crate) use metadata_fetch::{EnvironmentMetadata, MetadataSettings};
pub use raw::RawAccess;
pub(crate) use stored_query::StoredQueryLookup;
pub use target::Target;
pub(crate) use touches::{Resource, Touch};

use rule::Rule;

/// The rule name reported when the default decided.
const DEFAULT_RULE: &str = "default";

/// The validated access policy.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// Shared with the body checks of the requests in flight.
    rules: Arc<[Rule]>,
    default: DefaultDecision,
    /// What `default: allow` hands out, built once.
    default_grant: Grant,
    /// From `access.metadata_file`: used for every environment.
    metadata: Option<Arc<Metadata>>,
    /// How each environment's `$metadata` is fetched when there is no file.
    metadata_settings: MetadataSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DefaultDecision {
    Allow,
    Deny,
}

/// What the access stage needs to know about a request.
#[derive(Debug, Clone, Copy)]
pub struct AccessRequest<'a> {
    pub method: &'a Method,
    /// The URL path, starting `/api/data/` (after any environment prefix is removed).
    pub path: &'a str,
    /// The raw query string, without `?` (empty when there is none).
    pub query: &'a str,
    /// What `path` addresses, read once by [`crate::request_target`].
    pub target: &'a Target,
    /// The environment's metadata, when in hand; `access.metadata_file` otherwise.
    pub metadata: Option<&'a Arc<Metadata>>,
    /// The caller's verified token claims.
    pub claims: &'a Map<String, Value>,
    /// The caller's verified issuer.
    pub issuer: &'a str,
    /// The caller's tenant (`tid`), as the inbound stage read it.
    pub tenant: Option<&'a str>,
    /// User or application, as the inbound stage decided.
    pub kind: CallerKind,
    /// The logical name of the table the request's `savedQuery` / `userQuery` reads, when
    /// it was looked up ([`StoredQueryLookup`]); without it a stored query needs a grant on
    /// every table.
    pub stored_query_table: Option<&'a str>,
}

/// Permission for one request.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The rule that granted; `"default"` when the default did.
    pub rule: Arc<str>,
    pub impersonation: ImpersonationPolicy,
    /// `MSCRM.*` headers that may pass (lowercase, as `HeaderName`s are).
    pub control_headers: Arc<[HeaderName]>,
}

/// Whom Dataverse acts as for a granted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImpersonationPolicy {
    /// The identity stage maps the caller to a Dynamics user, who is impersonated.
    #[default]
    Required,
    /// The application user itself, no impersonation header: for service callers whose
    /// token names no user.
    AppOnly,
}

/// A refused request: answered 403 with `message`, counted under `rule`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AccessDenied {
    /// For the metric label: the first rule that matched the caller but did not cover the
    /// request, or `"default"` when none matched.
    pub rule: Arc<str>,
    /// Names the method and target, never the policy.
    pub message: String,
    /// Refused because the pair's table is only known from metadata not yet in hand
    /// (answered 503: retrying later may succeed).
    pub metadata_unavailable: bool,
}

impl AccessPolicy {
    /// Validates the `access` section; `key` is its dotted config prefix (`"access"`).
    /// Errors are (dotted key, message).
    pub fn from_raw(raw: RawAccess, key: &str) -> Result<Self, crate::config::ConfigError> {
        let files = crate::config::LoadedFiles::read(crate::config::files::access_paths(&raw));
        Self::from_raw_loaded(raw, key, &files)
    }

    /// [`AccessPolicy::from_raw`] with `metadata_file` already read into `files`.
    pub(crate) fn from_raw_loaded(
        raw: RawAccess,
        key: &str,
        files: &crate::config::LoadedFiles,
    ) -> Result<Self, crate::config::ConfigError> {
        raw::validate(raw, key, files)
    }

    /// The policy used when the config has no `access` section: everything is allowed,
    /// `$batch` included, impersonating as the identity mode says; only the harmless
    /// control headers pass, any other is refused.
    pub fn allow_all() -> Self {
        Self::new(Vec::new(), DefaultDecision::Allow)
    }

    fn new(rules: Vec<Rule>, default: DefaultDecision) -> Self {
        Self {
            rules: rules.into(),
            default,
            default_grant: Grant {
                rule: Arc::from(DEFAULT_RULE),
                impersonation: ImpersonationPolicy::Required,
                control_headers: Arc::from([]),
            },
            metadata: None,
            metadata_settings: MetadataSettings::default(),
        }
    }

    /// How the policy is read, one line each, for `dynamics-gateway check`.
    pub fn describe(&self) -> Vec<String> {
        let default = match self.default {
            DefaultDecision::Allow => "allow",
            DefaultDecision::Deny => "deny",
        };
        let metadata = match &self.metadata {
            Some(m) => format!("navigation and table names from access.metadata_file ({} entity sets)", m.set_count()),
            None => format!(
                "navigation and table names from each environment's $metadata, fetched with the S2S token every {} (at most {} bytes); until it is in hand, requests that need it are refused 503",
                humantime::format_duration(self.metadata_settings.refresh_interval),
                self.metadata_settings.max_bytes
            ),
        };
        if self.rules.is_empty() {
            return vec![format!(
                "access:        no rules: every verified caller {} any Web API request",
                if default == "allow" {
                    "may make"
                } else {
                    "is refused"
                }
            )];
        }
        let mut lines = vec![
            format!("access:        {} rules, first that grants every pair a request touches wins; else {default}", self.rules.len()),
            format!("  {metadata}"),
        ];
        lines.extend(
            self.rules
                .iter()
                .flat_map(|rule| rule.describe())
                .map(|l| format!("  {l}")),
        );
        lines
    }

    /// Whether a stored query's table is worth looking up: only rules can refuse it.
    pub fn reads_stored_queries(&self) -> bool {
        !self.rules.is_empty()
    }

    /// Whether each environment's `$metadata` is fetched from Dataverse: when rules need
    /// it (there are rules) and `access.metadata_file` does not give it.
    pub(crate) fn fetches_metadata(&self) -> bool {
        !self.rules.is_empty() && self.metadata.is_none()
    }

    /// How `$metadata` is fetched (`access.metadata_*`).
    pub(crate) fn metadata_settings(&self) -> MetadataSettings {
        self.metadata_settings
    }

    /// The metadata from `access.metadata_file`, if one was given.
    pub fn metadata(&self) -> Option<&Arc<Metadata>> {
        self.metadata.as_ref()
    }

    /// Grants or refuses one request: a rule must grant every pair it touches.
    pub fn decide(&self, request: &AccessRequest<'_>) -> Result<Grant, AccessDenied> {
        let target = request.target;
        let metadata = request.metadata.or(self.metadata.as_ref()).map(|m| &**m);
        let touches = match target {
            Target::Batch => Vec::new(),
            _ => {
                touches::request_pairs(
                    request.method,
                    target,
                    request.path,
                    request.query,
                    metadata,
                    request.stored_query_table,
                )
                .0
            }
        };
        let for_caller = self.rules_for(request, None);
        let granted = for_caller.iter().find(|&&i| {
            self.rules[i]
                .allow
                .covers(request.method, target, &touches)
                .is_ok()
        });
        match granted {
            Some(&i) => Ok(self.rules[i].grant.clone()),
            None if self.default == DefaultDecision::Allow => Ok(self.default_grant.clone()),
            None => Err(refusal(
                &self.rules,
                &for_caller,
                request.method,
                target,
                &touches,
                metadata.is_some(),
            )),
        }
    }

    /// What the body of a request `grant` allowed is checked against as it streams: its
    /// deep inserts, `@odata.bind` and `@odata.id` values, and each `$batch` part. `None`
    /// for requests without a body the rules read.
    pub fn body_access(&self, request: &AccessRequest<'_>, grant: &Grant) -> Option<BodyAccess> {
        // Without rules the default decides everything: there is nothing to read for.
        if self.rules.is_empty()
            || !matches!(*request.method, Method::POST | Method::PATCH | Method::PUT)
        {
            return None;
        }
        let for_caller = self.rules_for(request, Some(grant.impersonation));
        let shared = Arc::new(body::Shared {
            rules: self.rules.clone(),
            for_caller,
            default_allows: self.default == DefaultDecision::Allow,
            metadata: request.metadata.or(self.metadata.as_ref()).cloned(),
            grant_rule: grant.rule.clone(),
        });
        Some(BodyAccess::new(shared, request))
    }

    /// The rules for this caller, in order; with `impersonation`, only those acting as it.
    fn rules_for(
        &self,
        request: &AccessRequest<'_>,
        impersonation: Option<ImpersonationPolicy>,
    ) -> Vec<usize> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| {
                rule.is_for(request) && impersonation.is_none_or(|i| rule.grant.impersonation == i)
            })
            .map(|(i, _)| i)
            .collect()
    }
}

/// Why no rule among `for_caller` grants a request, counted under the first of them: the
/// first pair none of them grants, else the first pair the first of them does not grant;
/// when none is for this caller, the first pair that is not the addressed table's, so the
/// message says what was reached.
fn refusal(
    rules: &[Rule],
    for_caller: &[usize],
    method: &Method,
    target: &Target,
    touches: &[Touch],
    has_metadata: bool,
) -> AccessDenied {
    let (rule, missing) = match for_caller.first() {
        Some(&i) => {
            let rule = &rules[i];
            let ungranted = touches.iter().find(|touch| {
                !for_caller.iter().any(|&j| {
                    let one = std::slice::from_ref(*touch);
                    rules[j].allow.covers(method, target, one).is_ok()
                })
            });
            let missing = ungranted.or_else(|| {
                let missing = rule.allow.covers(method, target, touches).err();
                missing.and_then(|m| touches.get(m))
            });
            (rule.grant.rule.clone(), missing)
        }
        None => (
            Arc::from(DEFAULT_RULE),
            touches.iter().find(|t| t.via.is_some()),
        ),
    };
    match missing {
        Some(touch)
            if touch.via.is_some() || (!has_metadata && touch.resource == Resource::Unresolved) =>
        {
            denied_pair(rule, touch, has_metadata)
        }
        _ => AccessDenied {
            rule,
            message: format!(
                "no rule allows {method} on {} for this caller",
                truncated(&target.to_string())
            ),
            metadata_unavailable: false,
        },
    }
}

/// The refusal naming one pair no rule grants.
fn denied_pair(rule: Arc<str>, touch: &Touch, has_metadata: bool) -> AccessDenied {
    let metadata_unavailable = !has_metadata && touch.resource == Resource::Unresolved;
    let message = if metadata_unavailable {
        format!(
            "the {} needs this environment's $metadata, which the gateway does not have yet; retry shortly",
            touch.via.as_deref().unwrap_or("request")
        )
    } else {
        format!(
            "no rule allows {} for this caller",
            truncated(&touch.to_string())
        )
    };
    AccessDenied {
        rule,
        message,
        metadata_unavailable,
    }
}

/// Keeps a message readable when a path carries a very long name.
fn truncated(text: &str) -> String {
    const MAX: usize = 100;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests;
