//! The configuration file: `RawConfig` is what serde reads (unknown keys refused),
//! `Config` is the validated form the rest of the gateway sees. Every error names the
//! dotted key that was wrong and never a secret's value.

use std::path::Path;
use std::time::Duration;

use url::Url;

use crate::access::AccessPolicy;

mod dynamics;
mod env_vars;
pub(crate) mod files;
mod identity;
mod inbound;
mod raw;
mod server;
pub(crate) mod units;

pub use dynamics::{
    BudgetBucket, BudgetConfig, BudgetStoreConfig, DynamicsConfig, EnvironmentConfig, Routing,
    UpstreamHttp,
};
pub(crate) use files::LoadedFiles;
pub use identity::{IdentityConfig, IdentityMode, LookupAttribute, StaticUser};
pub(crate) use inbound::TENANT_PLACEHOLDER;
pub use inbound::{token_type, AppOnlyEvidence, InboundConfig, IssuerConfig};
use raw::RawConfig;
pub use server::{ServerConfig, TlsConfig};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid YAML")]
    Yaml(#[source] serde_norway::Error),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

#[cfg(test)]
impl ConfigError {
    /// The key and message of a validation error, for tests that check them apart.
    pub(crate) fn into_parts(self) -> (String, String) {
        match self {
            ConfigError::Invalid { key, message } => (key, message),
            other => panic!("not a key's error: {other}"),
        }
    }
}

/// Longest connection or body timeout accepted.
pub(super) const MAX_CONNECTION_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// The process environment, which credentials fall back on (`$AZURE_CLIENT_ID`, …) and
/// `*_pem_env` names; `${VAR}` substitution takes its own resolver.
pub(crate) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------- validated form

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub inbound: InboundConfig,
    pub identity: IdentityConfig,
    pub dynamics: DynamicsConfig,
    pub audit: AuditConfig,
    pub access: AccessPolicy,
}

#[derive(Debug, Clone, Default)]
pub struct AuditConfig {
    pub redact_query: bool,
}

// ---------------------------------------------------------------- loading

impl Config {
    /// Reads, substitutes `${VAR}` from the environment, reads the files it names, and
    /// validates. All of the gateway's file reads at load happen here (blocking: a reload
    /// runs it off the runtime).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &process_env)
    }

    /// Parses YAML text, reads the files it names and validates; `env` resolves `${VAR}`
    /// references.
    pub fn from_yaml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw = Self::parse(text, env)?;
        let files = LoadedFiles::of_config(&raw, &process_env);
        Config::validate(raw, &files)
    }

    /// YAML text to the file as written, `${VAR}` substituted.
    fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<RawConfig, ConfigError> {
        let mut value: serde_norway::Value =
            serde_norway::from_str(text).map_err(ConfigError::Yaml)?;
        env_vars::substitute_env(&mut value, "", env)?;
        serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            invalid(
                if key == "." { "config".into() } else { key },
                e.into_inner().to_string(),
            )
        })
    }
}

/// Parses a URL; `http://` is only allowed for loopback hosts (tests and the demo).
pub(super) fn parse_secure_url(key: &str, text: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(text.trim())
        .map_err(|e| invalid(key, format!("\"{text}\" is not an absolute URL ({e})")))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => {
            return Err(invalid(
                key,
                format!("\"{text}\" uses http://; only https:// is allowed (http:// only for loopback hosts)"),
            ))
        }
        other => return Err(invalid(key, format!("unsupported URL scheme \"{other}\"; use https://"))),
    }
    if url.host().is_none() {
        return Err(invalid(key, format!("\"{text}\" has no host")));
    }
    Ok(url)
}

/// True for 127.0.0.0/8, ::1 and `localhost`.
pub(crate) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

impl Config {
    /// Validates the file as written; what the files it names held comes from `files`
    /// (validation reads nothing from disk).
    fn validate(raw: RawConfig, files: &LoadedFiles) -> Result<Self, ConfigError> {
        let server = server::server_config(raw.server)?;
        let inbound = inbound::inbound_config(raw.inbound)?;
        let identity = identity::identity_config(raw.identity, &inbound.issuers)?;
        let dynamics = dynamics::dynamics_config(raw.dynamics, files)?;
        issuers_bound_to_tenants(&inbound, &dynamics)?;
        if identity.mode == IdentityMode::CallerObjectId {
            if let Some(n) = dynamics
                .environments
                .iter()
                .position(|e| e.allow_guest_tenants)
            {
                let key = match dynamics.environments.as_slice() {
                    [only] if only.name == "default" => "dynamics.allow_guest_tenants".to_string(),
                    _ => format!("dynamics.environments[{n}].allow_guest_tenants"),
                };
                return Err(invalid(
                    key,
                    "has no effect in identity.mode caller_object_id: an object id issued by another tenant names nobody in this organisation; remove it, or use lookup or static mode",
                ));
            }
        }

        Ok(Config {
            server,
            inbound,
            identity,
            dynamics,
            audit: AuditConfig {
                redact_query: raw.audit.redact_query,
            },
            access: match raw.access {
                Some(a) => AccessPolicy::from_raw_loaded(a, "access", files)?,
                None => AccessPolicy::allow_all(),
            },
        })
    }
}

/// With several environments or caller tenants, an issuer without a `tenants` list could
/// assert any `tid` and so reach any of them: each must say which tenants it speaks for.
fn issuers_bound_to_tenants(
    inbound: &InboundConfig,
    dynamics: &DynamicsConfig,
) -> Result<(), ConfigError> {
    let mut tenants: Vec<String> = Vec::new();
    let mut any_tenant = false;
    for env in &dynamics.environments {
        tenants.push(env.tenant_id.trim().to_ascii_lowercase());
        match &env.tenants {
            Some(list) => tenants.extend(list.iter().map(|t| t.trim().to_ascii_lowercase())),
            None => any_tenant = true,
        }
    }
    tenants.sort();
    tenants.dedup();
    // One issuer for one environment that serves any tenant has no other issuer to be
    // confused with (and may be one that sends no `tid`, such as Keycloak).
    let several = dynamics.environments.len() > 1
        || tenants.len() > 1
        || (any_tenant && inbound.issuers.len() > 1);
    if !several {
        return Ok(());
    }
    match inbound.issuers.iter().position(|i| i.tenants.is_none()) {
        Some(n) => Err(invalid(
            format!("inbound.issuers[{n}].tenants"),
            format!(
                "issuer \"{}\" must list the tenant ids (tid) it may assert: the gateway serves several environments or tenants, and an issuer without the list could name any of them",
                inbound.issuers[n].issuer
            ),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
