//! The `access` section as written in the config file, and its validation into an
//! [`AccessPolicy`]. Every error names the dotted key that was wrong.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::Method;
use serde::Deserialize;
use serde_json::Value;

use super::control_headers::{is_control_header, names_impersonation};
use super::metadata::Metadata;
use super::metadata_fetch::MetadataSettings;
use super::rule::{Allow, Id, Rule, TableGrant, When};
use super::target::{is_identifier, strip_prefix_ignore_case};
use super::touches::Operation;
use super::{AccessPolicy, DefaultDecision, Grant, ImpersonationPolicy, DEFAULT_RULE};
use crate::config::{invalid, ConfigError, LoadedFiles};

/// Who may make which Web API requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    /// `allow` or `deny`: what happens to a request no rule grants. Optional when there are
    /// rules (then `deny`); with no rules it must be given.
    pub default: Option<String>,
    /// Tried in order; the first whose `when` matches the caller and whose `allow` covers
    /// the request grants it.
    #[serde(default)]
    pub rules: Vec<RawRule>,
    /// A CSDL file (the environment's `$metadata`) naming navigation properties, tables
    /// and operation parameters, used for every environment instead of fetching it: for
    /// air-gapped use and tests. Without it each environment's `$metadata` is fetched; until
    /// it is in hand, requests whose tables only it names (`$expand`, navigation, fetchXml)
    /// are refused 503 unless a rule grants every table.
    #[serde(default)]
    pub metadata_file: Option<std::path::PathBuf>,
    /// Without `metadata_file`, how often each environment's `$metadata` is fetched again
    /// (revalidated with its ETag). Default `1h`.
    #[serde(default)]
    pub metadata_refresh_interval: Option<crate::config::units::Duration>,
    /// The largest `$metadata` document accepted; a larger one fails the fetch and the
    /// last good map stays in force. Default `64MiB`.
    #[serde(default)]
    pub metadata_max_bytes: Option<crate::config::units::ByteSize>,
    /// The longest one fetch of `$metadata` may take, body included. Default `120s`.
    #[serde(default)]
    pub metadata_timeout: Option<crate::config::units::Duration>,
}

/// One access rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Unique; names the rule in logs and in the `rule` label of the denial metric.
    pub name: String,
    /// Which callers the rule is for. Required; `{}` means every authenticated caller.
    pub when: RawWhen,
    /// What the rule lets them do.
    pub allow: RawAllow,
    /// `required` (default): the identity stage must map the caller to a Dynamics user.
    /// `app_only`: act as the application user, no impersonation; only ever matches
    /// callers proven app-only by their issuer's `app_only_evidence`.
    #[serde(default)]
    pub impersonation: Option<String>,
}

/// Conditions on the caller's token: every key given must hold; within a list, any value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWhen {
    /// App roles: the `roles` claim (an array) contains one of these.
    pub roles: Option<Vec<String>>,
    /// Delegated scopes: the space-separated `scp` claim contains one of these.
    pub scp: Option<Vec<String>>,
    /// The token's issuer (`iss`, exactly as the inbound stage accepted it) is one of these.
    pub issuer: Option<Vec<String>>,
    /// The caller's tenant (`tid`) is one of these (GUIDs compare in any case).
    pub tenant: Option<Vec<String>>,
    /// The calling application (`azp`, or `appid` in v1 tokens) is one of these.
    pub app_id: Option<Vec<String>>,
    /// Any claim: name -> a value or a list of values; the claim equals one of them or, if
    /// it is an array, contains one of them. Values compare as JSON (`"1"` is not `1`).
    pub claims: Option<BTreeMap<String, Value>>,
}

/// What a rule lets its callers do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAllow {
    /// HTTP methods (GET, POST, PATCH, PUT, DELETE, HEAD), or `["*"]` for all.
    /// Each is listed on its own: GET does not imply HEAD.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Entity set names (`accounts`), unbound function/action names (`WhoAmI`), `$metadata`
    /// (also the service root), or `["*"]` for every target including unrecognised paths.
    #[serde(default)]
    pub entity_sets: Vec<String>,
    /// Allow `POST $batch`: the envelope only. Each part is decided as a request of its
    /// own, by any rule for the caller that acts as this one does (same `impersonation`).
    #[serde(default)]
    pub batch: bool,
    /// Operations per table: `{contacts: [read], accounts: [read, create, associate]}`,
    /// from read, create, update, delete, associate, execute, or `"*"` for all. The table
    /// `"*"` is every table, including those the gateway cannot name.
    #[serde(default)]
    pub tables: BTreeMap<String, Vec<String>>,
    /// Functions and actions that may be executed (`[WhoAmI, RetrievePrincipalAccess]`),
    /// bound or unbound, or `["*"]`. The tables their parameters name need their own grant.
    #[serde(default)]
    pub functions: Vec<String>,
    /// `MSCRM.*` control headers passed on (e.g. `MSCRM.BypassCustomPluginExecution`);
    /// every other one is removed.
    #[serde(default)]
    pub control_headers: Vec<String>,
}

type Invalid = ConfigError;

/// Methods a rule may name: those the gateway forwards (`method.rs`).
const METHODS: [Method; 6] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PATCH,
    Method::PUT,
    Method::DELETE,
];

pub(super) fn validate(
    raw: RawAccess,
    key: &str,
    files: &LoadedFiles,
) -> Result<AccessPolicy, Invalid> {
    let metadata = match &raw.metadata_file {
        None => None,
        Some(path) => {
            let unusable = |problem: String| {
                invalid(
                    format!("{key}.metadata_file"),
                    format!("{problem}; give the environment's $metadata saved as a file"),
                )
            };
            let csdl = files.contents(path).map_err(unusable)?;
            let metadata =
                Metadata::from_reader(csdl).map_err(|e| unusable(crate::error::chain(&e)))?;
            Some(std::sync::Arc::new(metadata))
        }
    };
    let settings = metadata_settings(&raw, key)?;
    let default =
        match raw.default.as_deref() {
            Some("allow") => DefaultDecision::Allow,
            Some("deny") => DefaultDecision::Deny,
            Some(other) => {
                return Err(invalid(
                    format!("{key}.default"),
                    format!("{other:?} is neither allow nor deny"),
                ))
            }
            None if raw.rules.is_empty() => return Err(invalid(
                key,
                "no rules and no default: add rules, or say `default: allow` or `default: deny`",
            )),
            // Rules without a default: what they do not grant is refused.
            None => DefaultDecision::Deny,
        };
    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(raw.rules.len());
    for (i, raw_rule) in raw.rules.into_iter().enumerate() {
        let key = format!("{key}.rules[{i}]");
        let rule = validate_rule(raw_rule, &key)?;
        if !names.insert(rule.grant.rule.clone()) {
            return Err(invalid(
                format!("{key}.name"),
                format!("{:?} is the name of an earlier rule too", &*rule.grant.rule),
            ));
        }
        rules.push(rule);
    }
    let mut policy = AccessPolicy::new(rules, default);
    policy.metadata = metadata;
    policy.metadata_settings = settings;
    Ok(policy)
}

/// `metadata_refresh_interval`, `metadata_max_bytes` and `metadata_timeout`.
fn metadata_settings(raw: &RawAccess, key: &str) -> Result<MetadataSettings, Invalid> {
    let mut settings = MetadataSettings::default();
    let duration = |field: &str,
                    value: Option<crate::config::units::Duration>,
                    default: Duration| match value {
        None => Ok(default),
        Some(d) if d.0.is_zero() => {
            Err(invalid(format!("{key}.{field}"), "must be more than zero"))
        }
        Some(d) => Ok(d.0),
    };
    settings.refresh_interval = duration(
        "metadata_refresh_interval",
        raw.metadata_refresh_interval,
        settings.refresh_interval,
    )?;
    settings.timeout = duration("metadata_timeout", raw.metadata_timeout, settings.timeout)?;
    if let Some(size) = raw.metadata_max_bytes {
        if size.0 == 0 {
            return Err(invalid(
                format!("{key}.metadata_max_bytes"),
                "must be more than zero",
            ));
        }
        settings.max_bytes = size.0;
    }
    Ok(settings)
}

fn validate_rule(raw: RawRule, key: &str) -> Result<Rule, Invalid> {
    let name = raw.name.trim();
    if name.is_empty() {
        return Err(invalid(format!("{key}.name"), "must not be empty"));
    }
    // The name becomes a metric label value and a log field: keep it plain.
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(
            format!("{key}.name"),
            format!("{name:?} may contain only letters, digits, '-', '_' and '.'"),
        ));
    }
    if name == DEFAULT_RULE {
        return Err(invalid(
            format!("{key}.name"),
            "\"default\" names the default decision in logs and metrics; choose another name",
        ));
    }
    let impersonation = match raw.impersonation.as_deref() {
        None | Some("required") => ImpersonationPolicy::Required,
        Some("app_only") => ImpersonationPolicy::AppOnly,
        Some(other) => {
            return Err(invalid(
                format!("{key}.impersonation"),
                format!("{other:?} is neither required nor app_only"),
            ))
        }
    };
    let when = validate_when(raw.when, &format!("{key}.when"))?;
    let key = format!("{key}.allow");
    let control_headers = validate_control_headers(raw.allow.control_headers, &key)?;
    let tables = validate_tables(raw.allow.tables, &key)?;
    let functions = validate_functions(raw.allow.functions, &key)?;
    let grants_by_table = !tables.is_empty() || functions.as_ref().is_none_or(|f| !f.is_empty());
    let mut allow = validate_allow(
        raw.allow.methods,
        raw.allow.entity_sets,
        raw.allow.batch || grants_by_table,
        &key,
    )?;
    allow.batch = raw.allow.batch;
    allow.tables = tables;
    allow.functions = functions;
    Ok(Rule {
        when,
        allow,
        grant: Grant {
            rule: Arc::from(name),
            impersonation,
            control_headers: control_headers.into(),
        },
    })
}

fn validate_when(raw: RawWhen, key: &str) -> Result<When, Invalid> {
    let list = |values: Option<Vec<String>>, field: &str| -> Result<Option<Vec<String>>, Invalid> {
        let Some(values) = values else {
            return Ok(None);
        };
        let key = format!("{key}.{field}");
        if values.is_empty() {
            return Err(invalid(
                key,
                "an empty list matches nobody; remove the key to not test it",
            ));
        }
        for value in &values {
            if value.trim().is_empty() || value.trim() != value {
                return Err(invalid(
                    key,
                    format!("{value:?}: values must be non-empty, without surrounding spaces"),
                ));
            }
        }
        Ok(Some(values))
    };
    let scopes = list(raw.scp, "scp")?;
    if let Some(scope) = scopes
        .iter()
        .flatten()
        .find(|s| s.contains(char::is_whitespace))
    {
        return Err(invalid(
            format!("{key}.scp"),
            format!("{scope:?}: one scope per entry (the claim is split at spaces)"),
        ));
    }
    let ids =
        |values: Option<Vec<String>>| values.map(|v| v.iter().map(|s| Id::parse(s)).collect());
    Ok(When {
        roles: list(raw.roles, "roles")?,
        scopes,
        issuers: list(raw.issuer, "issuer")?,
        tenants: ids(list(raw.tenant, "tenant")?),
        app_ids: ids(list(raw.app_id, "app_id")?),
        claims: validate_claims(raw.claims.unwrap_or_default(), key)?,
    })
}

fn validate_claims(
    raw: BTreeMap<String, Value>,
    key: &str,
) -> Result<Vec<(String, Vec<Value>)>, Invalid> {
    let is_scalar = |v: &Value| matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_));
    raw.into_iter()
        .map(|(name, value)| {
            let key = format!("{key}.claims.{name}");
            if name.trim().is_empty() {
                return Err(invalid(key, "claim names must not be empty"));
            }
            let values = match value {
                Value::Array(items) if items.is_empty() => {
                    return Err(invalid(key, "an empty list matches nobody"))
                }
                Value::Array(items) => items,
                single => vec![single],
            };
            if !values.iter().all(is_scalar) {
                return Err(invalid(
                    key,
                    "expected a string, number or boolean, or a list of them",
                ));
            }
            Ok((name, values))
        })
        .collect()
}

fn validate_allow(
    methods: Vec<String>,
    entity_sets: Vec<String>,
    batch: bool,
    key: &str,
) -> Result<Allow, Invalid> {
    if methods.is_empty() != entity_sets.is_empty() {
        let (empty, other) = if methods.is_empty() {
            ("methods", "entity_sets")
        } else {
            ("entity_sets", "methods")
        };
        return Err(invalid(
            format!("{key}.{empty}"),
            format!("missing or empty while {other} is given; a rule needs both"),
        ));
    }
    if methods.is_empty() && !batch {
        return Err(invalid(
            key,
            "allows nothing: give methods and entity_sets, tables, functions, or batch: true",
        ));
    }
    let methods = star_or(methods, &format!("{key}.methods"), |m| {
        METHODS
            .iter()
            .find(|known| known.as_str().eq_ignore_ascii_case(m))
            .cloned()
            .ok_or_else(|| {
                format!("{m:?} is not a method a rule may name; use GET, POST, PATCH, PUT, DELETE, HEAD or \"*\"")
            })
    })?;
    let entity_sets = star_or(entity_sets, &format!("{key}.entity_sets"), |name| {
        if name.eq_ignore_ascii_case("$batch") {
            return Err("$batch is allowed by `batch: true`, not by name".to_string());
        }
        if name.eq_ignore_ascii_case("$metadata") {
            return Ok("$metadata".to_string());
        }
        // `Microsoft.Dynamics.CRM.WhoAmI` and `WhoAmI` name the same operation.
        let bare = strip_prefix_ignore_case(name, "Microsoft.Dynamics.CRM.").unwrap_or(name);
        if is_identifier(bare) {
            Ok(bare.to_string())
        } else {
            Err(format!(
                "{name:?} is not an entity set or operation name (letters, digits, '_'; no parentheses), $metadata, or \"*\""
            ))
        }
    })?;
    Ok(Allow {
        methods,
        entity_sets,
        tables: Vec::new(),
        functions: Some(Vec::new()),
        batch,
    })
}

fn validate_tables(
    raw: BTreeMap<String, Vec<String>>,
    key: &str,
) -> Result<Vec<TableGrant>, Invalid> {
    raw.into_iter()
        .map(|(table, operations)| {
            let key = format!("{key}.tables.{table}");
            let name = match table.trim() {
                "*" => None,
                name if is_identifier(name) => Some(name.to_string()),
                name => {
                    return Err(invalid(
                        key,
                        format!("{name:?} is not an entity set name (letters, digits, '_') or \"*\""),
                    ))
                }
            };
            if operations.is_empty() {
                return Err(invalid(key, "an empty list grants nothing; remove the table"));
            }
            let operations = star_or(operations, &key, |op| {
                Operation::parse(op).ok_or_else(|| {
                    format!("{op:?} is not an operation; use read, create, update, delete, associate, execute or \"*\"")
                })
            })?
            .unwrap_or_else(|| Operation::ALL.to_vec());
            Ok((name, operations))
        })
        .collect()
}

fn validate_functions(raw: Vec<String>, key: &str) -> Result<Option<Vec<String>>, Invalid> {
    star_or(raw, &format!("{key}.functions"), |name| {
        let bare = strip_prefix_ignore_case(name, "Microsoft.Dynamics.CRM.").unwrap_or(name);
        if is_identifier(bare) {
            Ok(bare.to_string())
        } else {
            Err(format!(
                "{name:?} is not a function or action name (letters, digits, '_'; no parentheses)"
            ))
        }
    })
}

/// `["*"]` -> `None` (everything); otherwise each entry parsed. `"*"` with other entries
/// is refused: the list would read narrower than it is.
fn star_or<T>(
    values: Vec<String>,
    key: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<Vec<T>>, Invalid> {
    if values.iter().any(|v| v == "*") {
        return if values.len() == 1 {
            Ok(None)
        } else {
            Err(invalid(key, "\"*\" must be the only entry"))
        };
    }
    values
        .iter()
        .map(|v| parse(v.trim()).map_err(|message| invalid(key, message)))
        .collect::<Result<Vec<T>, Invalid>>()
        .map(Some)
}

fn validate_control_headers(names: Vec<String>, key: &str) -> Result<Vec<HeaderName>, Invalid> {
    let key = format!("{key}.control_headers");
    let mut headers: Vec<HeaderName> = Vec::with_capacity(names.len());
    for name in names {
        let header = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| invalid(&key, format!("{name:?} is not a header name")))?;
        if names_impersonation(&name) {
            return Err(invalid(
                &key,
                format!(
                    "{name:?} chooses whom Dataverse acts as; only the identity stage sets that"
                ),
            ));
        }
        if !is_control_header(&header) || !header.as_str().starts_with("mscrm.") {
            return Err(invalid(
                &key,
                format!("{name:?} is not an MSCRM.* control header; other headers need no rule"),
            ));
        }
        if !headers.contains(&header) {
            headers.push(header);
        }
    }
    Ok(headers)
}
