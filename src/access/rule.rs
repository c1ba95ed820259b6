//! One validated rule: whom it is for (`When`), what it lets them do (`Allow`), and the
//! [`Grant`] it hands out. Built only by `raw.rs`, which has checked every value.

use http::Method;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::target::Target;
use super::{AccessRequest, Grant, ImpersonationPolicy};
use crate::inbound::CallerKind;

#[derive(Debug, Clone)]
pub(super) struct Rule {
    pub(super) when: When,
    pub(super) allow: Allow,
    /// Handed out as is: its `Arc`s make a grant cheap to clone per request.
    pub(super) grant: Grant,
}

impl Rule {
    /// Whether this rule is for this caller. An `app_only` rule is only for a caller the
    /// inbound stage proved to be an application, whatever its `when` says: otherwise a
    /// user holding the same role would act as the application user, with its rights and
    /// without an audit trail naming them.
    pub(super) fn is_for(&self, request: &AccessRequest<'_>) -> bool {
        if self.grant.impersonation == ImpersonationPolicy::AppOnly
            && request.kind != CallerKind::App
        {
            return false;
        }
        self.when.matches(request)
    }
}

/// Conditions on the caller: all present ones must hold (AND across kinds), each holds if
/// any listed value matches (OR within a list). No conditions: every authenticated caller.
#[derive(Debug, Clone, Default)]
pub(super) struct When {
    pub(super) roles: Option<Vec<String>>,
    pub(super) scopes: Option<Vec<String>>,
    pub(super) issuers: Option<Vec<String>>,
    pub(super) tenants: Option<Vec<Id>>,
    pub(super) app_ids: Option<Vec<Id>>,
    /// Claim name -> accepted values (one of them must equal the claim, or be in it).
    pub(super) claims: Vec<(String, Vec<Value>)>,
}

impl When {
    fn matches(&self, request: &AccessRequest<'_>) -> bool {
        let claims = request.claims;
        check(&self.roles, |roles| {
            string_items(claims.get("roles")).any(|r| roles.iter().any(|want| want == r))
        }) && check(&self.scopes, |scopes| {
            // Azure AD writes `scp` as one space-separated string; some issuers use an array.
            let granted: Vec<&str> = match claims.get("scp") {
                Some(Value::String(s)) => s.split_whitespace().collect(),
                other => string_items(other).collect(),
            };
            granted.iter().any(|g| scopes.iter().any(|want| want == g))
        }) && check(&self.issuers, |issuers| {
            issuers.iter().any(|want| want == request.issuer)
        }) && check(&self.tenants, |tenants| {
            claim_str(claims, "tid").is_some_and(|tid| tenants.iter().any(|want| want.is(tid)))
        }) && check(&self.app_ids, |app_ids| {
            // v2 tokens name the client in `azp`, v1 tokens in `appid`.
            ["azp", "appid"]
                .iter()
                .filter_map(|claim| claim_str(claims, claim))
                .any(|id| app_ids.iter().any(|want| want.is(id)))
        }) && self
            .claims
            .iter()
            .all(|(name, wanted)| match claims.get(name) {
                Some(Value::Array(items)) => items.iter().any(|item| wanted.contains(item)),
                Some(value) => wanted.contains(value),
                None => false,
            })
    }
}

/// An absent condition holds; a present one must.
fn check<T>(condition: &Option<T>, holds: impl FnOnce(&T) -> bool) -> bool {
    condition.as_ref().is_none_or(holds)
}

fn claim_str<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    claims.get(name).and_then(Value::as_str)
}

/// The strings of a claim that is a string or an array of strings.
fn string_items(value: Option<&Value>) -> impl Iterator<Item = &str> {
    let items: &[Value] = match value {
        Some(Value::Array(items)) => items,
        Some(single @ Value::String(_)) => std::slice::from_ref(single),
        _ => &[],
    };
    items.iter().filter_map(Value::as_str)
}

/// A tenant or application id: GUIDs compare as GUIDs (any case, braces or not), other
/// identifiers (non-Azure issuers) as exact strings.
#[derive(Debug, Clone)]
pub(super) enum Id {
    Guid(Uuid),
    Text(String),
}

impl Id {
    pub(super) fn parse(text: &str) -> Self {
        Uuid::parse_str(text).map_or_else(|_| Id::Text(text.to_string()), Id::Guid)
    }

    fn is(&self, claim: &str) -> bool {
        match self {
            Id::Guid(want) => Uuid::parse_str(claim).is_ok_and(|got| got == *want),
            Id::Text(want) => want == claim,
        }
    }
}

/// What a rule lets its callers do.
#[derive(Debug, Clone)]
pub(super) struct Allow {
    /// `None`: every method.
    pub(super) methods: Option<Vec<Method>>,
    /// `None`: every target but `$batch`, including unknown ones.
    pub(super) entity_sets: Option<Vec<String>>,
    pub(super) batch: bool,
}

impl Allow {
    pub(super) fn covers(&self, method: &Method, target: &Target) -> bool {
        match target {
            // The parts are not inspected, so neither `methods` nor `entity_sets` can limit
            // them: `batch: true` alone decides. A batch is always a POST.
            Target::Batch => self.batch && method == Method::POST,
            _ => self.covers_method(method) && self.covers_target(target),
        }
    }

    fn covers_method(&self, method: &Method) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|methods| methods.contains(method))
    }

    fn covers_target(&self, target: &Target) -> bool {
        match (&self.entity_sets, target.rule_name()) {
            (None, _) => true,
            (Some(sets), Some(name)) => sets.iter().any(|set| set.eq_ignore_ascii_case(name)),
            (Some(_), None) => false,
        }
    }
}
