//! `dynamics`: the Dataverse environments, their credentials, routing, the budget.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use url::Url;

use super::files::LoadedFiles;
pub use super::raw::UpstreamHttp;
use super::raw::{RawBudget, RawBudgetStore, RawDynamics, RoutingRule};
use super::{invalid, parse_secure_url, process_env, ConfigError, MAX_CONNECTION_TIMEOUT};
use crate::secret::Secret;
use crate::upstream::credential::{
    Credential, RawCertificate, RawManagedIdentity, RawWorkloadIdentity,
};

/// Where requests go.
#[derive(Debug, Clone)]
pub struct DynamicsConfig {
    pub environments: Vec<EnvironmentConfig>,
    pub routing: Routing,
    /// `Some(max_wait)` when 429s of idempotent requests are retried.
    pub retry_throttled: Option<Duration>,
    /// Least time between two 401-caused token replacements of one token source.
    pub token_replace_interval: Duration,
    /// Longest wait before retrying a failed token request.
    pub token_retry_max_wait: Duration,
    /// Longest one token request may take.
    pub token_timeout: Duration,
    /// The HTTP version spoken to Dataverse.
    pub upstream_http: UpstreamHttp,
    /// The budget store shared by the replicas; `None`: each process keeps its own.
    pub budget_store: Option<BudgetStoreConfig>,
}

/// The validated `dynamics.budget.store.valkey`.
#[derive(Debug, Clone)]
pub struct BudgetStoreConfig {
    pub url: Secret,
    pub replicas: usize,
    pub lease_ttl: Duration,
    pub command_timeout: Duration,
    pub key_prefix: String,
}

/// How a request chooses its environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// One environment serves every request.
    Single,
    /// `/<environment>/api/data/...`
    PathPrefix,
    /// The caller's `tid` picks the environment whose `tenants` list it.
    Tenant,
}

/// One Dataverse organisation.
#[derive(Debug, Clone)]
pub struct EnvironmentConfig {
    pub name: String,
    /// Origin of the organisation.
    pub url: Url,
    pub tenant_id: String,
    /// Empty for a managed identity without a configured client id (the system identity).
    pub client_id: String,
    pub credential: Credential,
    pub token_url: Url,
    pub scope: String,
    /// Caller tenants served; `None`: any.
    pub tenants: Option<Vec<String>>,
    /// Callers of other tenants (or without `tid`) may be mapped to users here.
    pub allow_guest_tenants: bool,
    /// The organisation's other origins (`scheme://host[:port]`, lowercase host): links
    /// naming them are rewritten to the gateway like links naming `url`.
    pub url_aliases: Vec<String>,
    /// The caller's `Cookie` and Dataverse's `Set-Cookie` pass (off: both are removed).
    pub forward_cookies: bool,
    /// The service-protection budget the gateway keeps for this environment.
    pub budget: BudgetConfig,
}

/// Whose service-protection budget a request spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetBucket {
    /// One bucket per environment: every request counts against the application user.
    Application,
    /// One bucket per impersonated Dynamics user (app-only requests share the application's).
    ImpersonatedUser,
}

impl FromStr for BudgetBucket {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "application" => Ok(Self::Application),
            "impersonated_user" => Ok(Self::ImpersonatedUser),
            other => Err(format!(
                "\"{other}\" is not a bucket; use application or impersonated_user"
            )),
        }
    }
}

/// The validated `dynamics.budget`.
#[derive(Debug, Clone)]
pub struct BudgetConfig {
    pub max_concurrency: usize,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub max_retry_after: Duration,
    pub bucket: BudgetBucket,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            max_concurrency: 52,
            max_queue: 1024,
            queue_timeout: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(300),
            bucket: BudgetBucket::Application,
        }
    }
}

fn budget(key: &str, raw: RawBudget) -> Result<BudgetConfig, ConfigError> {
    if raw.store.is_some() && key != "dynamics.budget" {
        return Err(invalid(
            format!("{key}.store"),
            "the replicas share one store for every environment: set it under dynamics.budget.store",
        ));
    }
    if !(1..=MAX_BUDGET_CONCURRENCY).contains(&raw.max_concurrency) {
        return Err(invalid(
            format!("{key}.max_concurrency"),
            format!("must be 1 to {MAX_BUDGET_CONCURRENCY} (Dataverse allows 52 concurrent requests per user and web server)"),
        ));
    }
    if raw.max_queue > MAX_BUDGET_QUEUE {
        return Err(invalid(
            format!("{key}.max_queue"),
            format!("must be at most {MAX_BUDGET_QUEUE}: every queued request holds a connection and its memory"),
        ));
    }
    let queue_timeout = raw.queue_timeout.0;
    let max_retry_after = raw.max_retry_after.0;
    // Deadlines are computed as now + value.
    for (name, value) in [
        ("queue_timeout", queue_timeout),
        ("max_retry_after", max_retry_after),
    ] {
        if value > MAX_CONNECTION_TIMEOUT {
            return Err(invalid(format!("{key}.{name}"), "must be at most 24h"));
        }
    }
    if max_retry_after < Duration::from_secs(1) {
        return Err(invalid(
            format!("{key}.max_retry_after"),
            "must be at least 1s, or a 429 would never close the bucket",
        ));
    }
    Ok(BudgetConfig {
        max_concurrency: raw.max_concurrency,
        max_queue: raw.max_queue,
        queue_timeout,
        max_retry_after,
        bucket: raw.bucket,
    })
}

impl EnvironmentConfig {
    /// `scheme://host[:port]` of the organisation, no trailing slash.
    pub fn origin(&self) -> String {
        self.url.origin().ascii_serialization()
    }

    /// The URL a customer's administrator opens to grant the app admin consent in this
    /// environment's tenant (multi-tenant onboarding). Same authority as the token endpoint,
    /// so sovereign clouds work too.
    pub fn admin_consent_url(&self, redirect_uri: Option<&str>) -> String {
        let mut url = self.token_url.clone();
        url.set_path(&format!("/{}/adminconsent", self.tenant_id.trim()));
        url.set_query(None);
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("client_id", &self.client_id);
            if let Some(r) = redirect_uri {
                query.append_pair("redirect_uri", r);
            }
        }
        url.to_string()
    }

    /// Whether a caller of tenant `tid` may use this environment.
    pub(crate) fn serves_tenant(&self, tid: Option<&str>) -> bool {
        match (&self.tenants, tid) {
            (None, _) => true,
            (Some(list), Some(tid)) => list.iter().any(|t| t.eq_ignore_ascii_case(tid)),
            (Some(_), None) => false,
        }
    }
}

super::units::deserialize_from_str!(BudgetBucket);

impl BudgetStoreConfig {
    /// `host:port` of the store, without the URL's credentials, database or anything else.
    pub fn address(&self) -> String {
        match Url::parse(self.url.expose()) {
            Ok(url) => format!(
                "{}:{}",
                url.host_str().unwrap_or_default(),
                url.port().unwrap_or(6379)
            ),
            Err(_) => "(unreadable URL)".into(),
        }
    }
}

/// Far above Dataverse's 52 concurrent requests per user and web server.
const MAX_BUDGET_CONCURRENCY: usize = 10_000;
/// Longest `dynamics.token_timeout`.
const MAX_TOKEN_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Requests waiting for a slot, per environment.
const MAX_BUDGET_QUEUE: usize = 1_000_000;

/// The validated `url_aliases` of an environment: each an origin only (`https://`, or
/// `http://` for loopback), none equal to `url` or to another alias.
fn url_aliases(key: &str, url: &Url, raw: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut aliases: Vec<String> = Vec::with_capacity(raw.len());
    let primary = url.origin().ascii_serialization();
    for (i, text) in raw.iter().enumerate() {
        let alias_key = format!("{key}.url_aliases[{i}]");
        let alias = parse_secure_url(&alias_key, text)?;
        if alias.path() != "/" || alias.query().is_some() || alias.fragment().is_some() {
            return Err(invalid(
                alias_key,
                format!(
                    "\"{text}\" must be an origin only, e.g. https://contoso.api.crm.dynamics.com"
                ),
            ));
        }
        let origin = alias.origin().ascii_serialization();
        if origin == primary || aliases.contains(&origin) {
            return Err(invalid(
                alias_key,
                format!("\"{text}\" is already the environment's url or listed before"),
            ));
        }
        aliases.push(origin);
    }
    Ok(aliases)
}

/// Exactly one credential kind per environment.
fn credential(
    key: &str,
    secret: Option<String>,
    certificate: Option<RawCertificate>,
    workload_identity: Option<RawWorkloadIdentity>,
    managed_identity: Option<RawManagedIdentity>,
    files: &LoadedFiles,
) -> Result<Credential, ConfigError> {
    let given = [
        secret.is_some(),
        certificate.is_some(),
        workload_identity.is_some(),
        managed_identity.is_some(),
    ]
    .iter()
    .filter(|g| **g)
    .count();
    if given != 1 {
        return Err(invalid(
            key,
            "needs exactly one credential: client_secret, certificate, workload_identity or managed_identity",
        ));
    }
    if let Some(secret) = secret {
        if secret.trim().is_empty() {
            return Err(invalid(
                format!("{key}.client_secret"),
                "is empty; set it, e.g. client_secret: ${DYNAMICS_CLIENT_SECRET}",
            ));
        }
        return Credential::client_secret(Secret::new(secret), &format!("{key}.client_secret"));
    }
    if let Some(raw) = certificate {
        return Credential::certificate_loaded(
            raw,
            &format!("{key}.certificate"),
            &process_env,
            files,
        );
    }
    if let Some(raw) = workload_identity {
        return Credential::workload_identity_loaded(
            raw,
            &format!("{key}.workload_identity"),
            &process_env,
            files,
        );
    }
    match managed_identity {
        Some(raw) => Credential::managed_identity(raw, &format!("{key}.managed_identity")),
        None => Err(invalid(key, "needs a credential")),
    }
}

/// Environment names appear in URLs and metric labels: keep them plain, and clear of the
/// label value of requests refused before routing.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name != "api"
        && name != crate::metrics::NO_ENVIRONMENT
}

pub(super) fn dynamics_config(
    mut d: RawDynamics,
    files: &LoadedFiles,
) -> Result<DynamicsConfig, ConfigError> {
    let single = d.url.is_some() || d.tenant_id.is_some() || d.writes_organisation_keys();
    let (raw_envs, in_list) = match d.environments.take() {
        Some(_) if single => {
            return Err(invalid(
                "dynamics",
                "write either url/tenant_id/client_id/client_secret for one organisation, or environments: [...], not both",
            ))
        }
        Some(list) if list.is_empty() => return Err(invalid("dynamics.environments", "lists no environment")),
        Some(list) => (list, true),
        None => {
            let required = |v: Option<String>, key: &str| v.ok_or_else(|| invalid(format!("dynamics.{key}"), "is required"));
            let url = required(d.url.take(), "url")?;
            let tenant_id = required(d.tenant_id.take(), "tenant_id")?;
            (vec![d.take_environment("default".into(), url, tenant_id)], false)
        }
    };
    let mut environments: Vec<EnvironmentConfig> = Vec::with_capacity(raw_envs.len());
    for (i, e) in raw_envs.into_iter().enumerate() {
        let key = if in_list {
            format!("dynamics.environments[{i}]")
        } else {
            "dynamics".to_string()
        };
        if !is_plain_name(&e.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("\"{}\" is not a valid name; use lowercase letters, digits, - and _ (not \"api\" or \"none\")", e.name),
            ));
        }
        if environments.iter().any(|x| x.name == e.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("environment \"{}\" is listed twice", e.name),
            ));
        }
        let url = parse_secure_url(&format!("{key}.url"), &e.url)?;
        if url.path() != "/" || url.query().is_some() {
            return Err(invalid(
                format!("{key}.url"),
                format!("\"{}\" must be the organisation's origin only, e.g. https://contoso.crm.dynamics.com", e.url),
            ));
        }
        if e.tenant_id.trim().is_empty() {
            return Err(invalid(format!("{key}.tenant_id"), "is required"));
        }
        let url_aliases = url_aliases(&key, &url, e.url_aliases.unwrap_or_default())?;
        let credential = credential(
            &key,
            e.client_secret,
            e.certificate,
            e.workload_identity,
            e.managed_identity,
            files,
        )?;
        let client_id = match e
            .client_id
            .or_else(|| credential.default_client_id().map(str::to_string))
        {
            Some(id) if !id.trim().is_empty() => id,
            _ if matches!(credential, Credential::ManagedIdentity(_)) => String::new(),
            _ => return Err(invalid(format!("{key}.client_id"), "is required")),
        };
        let token_url = match e.token_url {
            Some(t) => parse_secure_url(&format!("{key}.token_url"), &t)?,
            None => match credential.default_token_url(Some(e.tenant_id.trim())) {
                Some(url) => url,
                None => parse_secure_url(
                    &format!("{key}.tenant_id"),
                    &format!(
                        "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
                        e.tenant_id.trim()
                    ),
                )?,
            },
        };
        let origin = url.origin().ascii_serialization();
        let tenants = match e.tenants {
            None => Some(vec![e.tenant_id.trim().to_string()]),
            Some(list) if list.is_empty() => {
                return Err(invalid(
                    format!("{key}.tenants"),
                    "is empty; list caller tenant ids, or [\"*\"] for any",
                ))
            }
            Some(list) if list.iter().any(|t| t == "*") => None,
            Some(list) => Some(list),
        };
        let budget = match e.budget {
            Some(raw) => budget(&format!("{key}.budget"), raw)?,
            None => budget("dynamics.budget", d.budget.clone())?,
        };
        environments.push(EnvironmentConfig {
            budget,
            name: e.name,
            scope: e.scope.unwrap_or_else(|| format!("{origin}/.default")),
            url,
            tenant_id: e.tenant_id,
            client_id,
            credential,
            token_url,
            tenants,
            allow_guest_tenants: e.allow_guest_tenants,
            url_aliases,
            forward_cookies: e.forward_cookies,
        });
    }
    let routing = match (d.routing, environments.len()) {
        (None, 1) => Routing::Single,
        (None, _) => {
            return Err(invalid(
                "dynamics.routing",
                "several environments need a routing rule: routing: { by: path_prefix } or { by: tenant }",
            ))
        }
        (Some(r), _) => match r.by {
            RoutingRule::PathPrefix => Routing::PathPrefix,
            RoutingRule::Tenant => Routing::Tenant,
        },
    };
    if routing == Routing::Tenant {
        // Each caller tenant must lead to exactly one environment.
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for env in &environments {
            let Some(tenants) = &env.tenants else {
                return Err(invalid(
                    format!("dynamics.environments[{}].tenants", env.name),
                    "routing by tenant needs explicit tenant ids, not \"*\"",
                ));
            };
            for t in tenants {
                if let Some(other) = seen.insert(t.to_ascii_lowercase(), &env.name) {
                    return Err(invalid(
                        "dynamics.environments",
                        format!("tenant {t} is served by both {other} and {}; routing by tenant needs one", env.name),
                    ));
                }
            }
        }
    }
    let retry_throttled = match d.retry_throttled {
        Some(r) if r.enabled => Some(r.max_wait.0),
        _ => None,
    };
    let token_replace_interval = d.token_replace_interval.0;
    let token_retry_max_wait = d.token_retry_max_wait.0;
    if token_retry_max_wait < Duration::from_secs(1) {
        // Shorter caps the backoff near zero: a failing endpoint would be asked in a loop.
        return Err(invalid(
            "dynamics.token_retry_max_wait",
            "must be at least 1s",
        ));
    }
    let token_timeout = d.token_timeout.0;
    if token_timeout < Duration::from_millis(100) {
        // Shorter fails every request before an answer could arrive.
        return Err(invalid("dynamics.token_timeout", "must be at least 100ms"));
    }
    if token_timeout > MAX_TOKEN_TIMEOUT {
        // A hung endpoint would hold the refresher this long before it retries.
        return Err(invalid(
            "dynamics.token_timeout",
            "must be at most 5m (a token endpoint that has not answered by then is retried)",
        ));
    }
    let budget_store = d.budget.store.map(budget_store).transpose()?;
    if let Some(store) = &budget_store {
        // Away from the store each replica keeps at least one slot: more replicas than the
        // limit would together send more than it.
        if let Some(env) = environments
            .iter()
            .find(|e| e.budget.max_concurrency < store.replicas)
        {
            return Err(invalid(
                "dynamics.budget.store.valkey.replicas",
                format!(
                    "{} replicas is more than max_concurrency ({}) of environment {}: each replica keeps at least 1 slot while the store is away",
                    store.replicas, env.budget.max_concurrency, env.name
                ),
            ));
        }
    }
    Ok(DynamicsConfig {
        environments,
        routing,
        retry_throttled,
        token_replace_interval,
        token_retry_max_wait,
        token_timeout,
        upstream_http: d.upstream_http,
        budget_store,
    })
}

/// Whether every `%` in `text` starts an escape and the escapes decode to UTF-8.
fn is_strictly_percent_encoded(text: &str) -> bool {
    let bytes = text.as_bytes();
    let escapes_well_formed = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    escapes_well_formed
        && percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .is_ok()
}

fn budget_store(raw: RawBudgetStore) -> Result<BudgetStoreConfig, ConfigError> {
    const KEY: &str = "dynamics.budget.store.valkey";
    let v = raw.valkey;
    // Messages never quote the URL: it may hold the store's password.
    let url = Url::parse(v.url.expose())
        .map_err(|e| invalid(format!("{KEY}.url"), format!("is not a URL ({e})")))?;
    match url.scheme() {
        "redis" | "valkey" => {}
        "rediss" | "valkeys" => {
            return Err(invalid(
                format!("{KEY}.url"),
                "TLS to the store is not built in; use redis:// or valkey:// on a private network",
            ))
        }
        _ => {
            return Err(invalid(
                format!("{KEY}.url"),
                "must start with redis:// or valkey://",
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!("{KEY}.url"), "names no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            format!("{KEY}.url"),
            "must not have a query or fragment: redis://[user:password@]host[:port][/db]",
        ));
    }
    // Read strictly: a lone `%` would be taken literally by the client, or a `%41` meant
    // literally decoded, and the store would refuse a password that looks right.
    for part in [url.username(), url.password().unwrap_or_default()] {
        if !is_strictly_percent_encoded(part) {
            return Err(invalid(
                format!("{KEY}.url"),
                "has a user name or password with a `%` that does not start an escape (%XX of UTF-8); percent-encode `%` as %25 and other reserved characters likewise",
            ));
        }
    }
    // The client's own reading, now rather than at the first command.
    redis::IntoConnectionInfo::into_connection_info(v.url.expose()).map_err(|_| {
        invalid(
            format!("{KEY}.url"),
            "is not a usable store URL (the database, if given, is a number: redis://host:6379/0)",
        )
    })?;
    if v.replicas == 0 {
        return Err(invalid(
            format!("{KEY}.replicas"),
            "must be at least 1 (each replica keeps limit / replicas when the store is away)",
        ));
    }
    let lease_ttl = v.lease_ttl.0;
    if lease_ttl > Duration::from_secs(3600) {
        return Err(invalid(
            format!("{KEY}.lease_ttl"),
            "must be at most 1h: a dead replica's slots stay taken that long",
        ));
    }
    if lease_ttl < Duration::from_secs(1) {
        // Renewal runs every third of it: shorter would renew faster than a slow store answers.
        return Err(invalid(format!("{KEY}.lease_ttl"), "must be at least 1s"));
    }
    let command_timeout = v.command_timeout.0;
    if command_timeout.is_zero() || command_timeout >= lease_ttl / 3 {
        return Err(invalid(
            format!("{KEY}.command_timeout"),
            "must be above 0 and below a third of lease_ttl",
        ));
    }
    if v.key_prefix.is_empty() || v.key_prefix.chars().any(|c| c.is_whitespace()) {
        return Err(invalid(
            format!("{KEY}.key_prefix"),
            "must be non-empty, without spaces",
        ));
    }
    Ok(BudgetStoreConfig {
        url: v.url,
        replicas: v.replicas,
        lease_ttl,
        command_timeout,
        key_prefix: v.key_prefix,
    })
}
