//! One validated rule: whom it is for (`When`), what it lets them do (`Allow`), and the
//! [`Grant`] it hands out. Built only by `raw.rs`, which has checked every value.

use http::Method;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::target::Target;
use super::touches::{Operation, Resource, Touch};
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
            request
                .tenant
                .is_some_and(|tid| tenants.iter().any(|want| want.is(tid)))
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

/// Operations on one table; a `None` name is `"*"`: every table, named or not.
pub(super) type TableGrant = (Option<String>, Vec<Operation>);

/// What a rule lets its callers do. A request is covered only if every (operation,
/// table) pair it touches is: by `methods` + `entity_sets` (the request's method is listed
/// and so is the table or function, whatever the operation), or by `tables` (the
/// operation is listed for that table) or `functions` (execute).
#[derive(Debug, Clone)]
pub(super) struct Allow {
    /// `None`: every method.
    pub(super) methods: Option<Vec<Method>>,
    /// `None`: every target but `$batch`, including unknown ones.
    pub(super) entity_sets: Option<Vec<String>>,
    pub(super) tables: Vec<TableGrant>,
    /// Functions and actions that may be executed; `None`: all.
    pub(super) functions: Option<Vec<String>>,
    pub(super) batch: bool,
}

impl Allow {
    /// `Err(i)`: `touches[i]` is the first pair this rule does not grant.
    pub(super) fn covers(
        &self,
        method: &Method,
        target: &Target,
        touches: &[Touch],
    ) -> Result<(), usize> {
        if let Target::Batch = target {
            // The envelope: `batch: true` alone decides; each part is decided on its own
            // as the body streams (`body::BatchPart`). A batch is always a POST.
            return if self.batch && method == Method::POST {
                Ok(())
            } else {
                Err(0)
            };
        }
        match touches.iter().position(|t| !self.covers_touch(method, t)) {
            Some(i) => Err(i),
            None => Ok(()),
        }
    }

    pub(super) fn covers_touch(&self, method: &Method, touch: &Touch) -> bool {
        (self.has_method_grant() && self.covers_method(method) && self.covers_name(&touch.resource))
            || self.covers_by_table(touch)
    }

    /// A rule written with `batch: true` or `tables` alone grants nothing by method.
    fn has_method_grant(&self) -> bool {
        self.methods.as_ref().is_none_or(|m| !m.is_empty())
    }

    fn covers_method(&self, method: &Method) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|methods| methods.contains(method))
    }

    fn covers_name(&self, resource: &Resource) -> bool {
        let Some(sets) = &self.entity_sets else {
            return true;
        };
        let name = match resource {
            Resource::Set(name) | Resource::Function(name) => name.as_str(),
            Resource::Metadata => "$metadata",
            Resource::Unknown | Resource::Unresolved => return false,
        };
        sets.iter().any(|set| set.eq_ignore_ascii_case(name))
    }

    fn covers_by_table(&self, touch: &Touch) -> bool {
        match &touch.resource {
            Resource::Function(name) if touch.operation == Operation::Execute => self
                .functions
                .as_ref()
                .is_none_or(|listed| listed.iter().any(|f| f.eq_ignore_ascii_case(name))),
            Resource::Set(name) => self.tables.iter().any(|(table, ops)| {
                table
                    .as_ref()
                    .is_none_or(|table| table.eq_ignore_ascii_case(name))
                    && ops.contains(&touch.operation)
            }),
            Resource::Unknown | Resource::Unresolved => self
                .tables
                .iter()
                .any(|(table, ops)| table.is_none() && ops.contains(&touch.operation)),
            Resource::Function(_) | Resource::Metadata => false,
        }
    }
}

impl Rule {
    /// How this rule is read, for `dynamics-gateway check`: whom it is for and each pair
    /// it grants, one line each.
    pub(super) fn describe(&self) -> Vec<String> {
        let acts_as = match self.grant.impersonation {
            ImpersonationPolicy::Required => "as the caller's Dynamics user",
            ImpersonationPolicy::AppOnly => "as the application user, for app-only callers",
        };
        let mut lines = vec![format!(
            "rule {}: for {}; {acts_as}",
            self.grant.rule,
            self.when.describe()
        )];
        lines.extend(self.allow.describe());
        if !self.grant.control_headers.is_empty() {
            let names: Vec<&str> = self
                .grant
                .control_headers
                .iter()
                .map(|h| h.as_str())
                .collect();
            lines.push(format!("  control headers passed: {}", names.join(", ")));
        }
        lines
    }
}

impl When {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut list = |what: &str, values: &Option<Vec<String>>| {
            if let Some(values) = values {
                parts.push(format!("{what} {}", values.join(" or ")));
            }
        };
        list("roles", &self.roles);
        list("scp", &self.scopes);
        list("issuer", &self.issuers);
        let ids = |values: &Option<Vec<Id>>| {
            values.as_ref().map(|v| {
                v.iter()
                    .map(|id| match id {
                        Id::Guid(g) => g.to_string(),
                        Id::Text(t) => t.clone(),
                    })
                    .collect::<Vec<_>>()
            })
        };
        list("tenant", &ids(&self.tenants));
        list("app_id", &ids(&self.app_ids));
        for (name, values) in &self.claims {
            let values: Vec<String> = values.iter().map(Value::to_string).collect();
            parts.push(format!("claim {name} {}", values.join(" or ")));
        }
        if parts.is_empty() {
            "every authenticated caller".to_string()
        } else {
            format!("callers with {}", parts.join(" and "))
        }
    }
}

impl Allow {
    fn describe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if self.has_method_grant() {
            let methods = match &self.methods {
                None => "requests of any method".to_string(),
                Some(m) => {
                    let names: Vec<&str> = m.iter().map(Method::as_str).collect();
                    format!("{} requests", names.join(", "))
                }
            };
            let names = match &self.entity_sets {
                None => "every table, function and unrecognised path".to_string(),
                Some(sets) => sets.join(", "),
            };
            lines.push(format!(
                "  {methods}: any operation on {names} (other tables they touch need their own grant)"
            ));
        }
        for (table, operations) in &self.tables {
            let ops: Vec<&str> = operations.iter().map(|o| o.as_str()).collect();
            let table = table.as_deref().unwrap_or("every table, named or not");
            lines.push(format!("  {}: {table}", ops.join(", ")));
        }
        match &self.functions {
            None => lines.push("  execute: every function and action".to_string()),
            Some(f) if !f.is_empty() => lines.push(format!("  execute: {}", f.join(", "))),
            Some(_) => {}
        }
        if self.batch {
            lines.push(
                "  $batch: the envelope only; each part is decided as a request of its own"
                    .to_string(),
            );
        }
        lines
    }
}
