//! `inbound`: the issuers whose tokens are accepted.

use std::time::Duration;

use url::Url;

use super::raw::{RawAppOnlyEvidence, RawInbound};
use super::{invalid, parse_secure_url, ConfigError};

/// The placeholder of a multi-tenant issuer template.
pub(crate) const TENANT_PLACEHOLDER: &str = "{tenantid}";

#[derive(Debug, Clone)]
pub struct InboundConfig {
    pub issuers: Vec<IssuerConfig>,
    pub leeway: Duration,
    pub jwks_refetch_interval: Duration,
    pub jwks_refresh_interval: Duration,
    pub token_cache_max_entries: u64,
}

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// Exact `iss`, or a template containing `{tenantid}`.
    pub issuer: String,
    /// Accepted `tid` values; `None`: any (only for non-template issuers).
    pub tenants: Option<Vec<String>>,
    pub audiences: Vec<String>,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub discovery_url: Url,
    pub jwks_uri: Option<Url>,
    /// Accepted `typ` header values (lowercase, without `application/`); `None`: any.
    pub token_types: Option<Vec<String>>,
    pub app_only_evidence: AppOnlyEvidence,
}

/// What proves that a token of an issuer is app-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppOnlyEvidence {
    /// No token of this issuer is app-only.
    Never,
    /// Microsoft's test: `idtyp: app`; without `idtyp`, `oid` equal to `sub` and no `scp`.
    Entra,
    /// This claim has this value (or, as an array, contains it).
    Claim { name: String, value: String },
}

/// Hosts of Microsoft Entra ID token issuers (public and sovereign clouds, External ID).
const ENTRA_HOSTS: [&str; 7] = [
    "login.microsoftonline.com",
    "login.windows.net",
    "sts.windows.net",
    "login.microsoftonline.us",
    "login.partner.microsoftonline.cn",
    "login.chinacloudapi.cn",
    "sts.chinacloudapi.cn",
];

pub(super) fn is_entra_issuer(issuer: &str) -> bool {
    Url::parse(issuer.trim()).is_ok_and(|u| {
        u.host_str().is_some_and(|h| {
            ENTRA_HOSTS.iter().any(|e| h.eq_ignore_ascii_case(e))
                || h.to_ascii_lowercase().ends_with(".ciamlogin.com")
        })
    })
}

/// The validated `inbound` section.
pub(super) fn inbound_config(i: RawInbound) -> Result<InboundConfig, ConfigError> {
    if i.issuers.is_empty() {
        return Err(invalid(
            "inbound.issuers",
            "at least one issuer is required",
        ));
    }
    let mut issuers = Vec::with_capacity(i.issuers.len());
    for (n, ri) in i.issuers.into_iter().enumerate() {
        let key = format!("inbound.issuers[{n}]");
        parse_secure_url(&format!("{key}.issuer"), &ri.issuer)?;
        if ri.audiences.is_empty() || ri.audiences.iter().any(|a| a.trim().is_empty()) {
            return Err(invalid(
                format!("{key}.audiences"),
                "at least one non-empty audience is required",
            ));
        }
        let algorithms = match ri.algorithms {
            None => vec![jsonwebtoken::Algorithm::RS256],
            Some(list) if list.is_empty() => {
                return Err(invalid(
                    format!("{key}.algorithms"),
                    "must list at least one algorithm",
                ))
            }
            Some(list) => list.into_iter().map(|a| a.0).collect(),
        };
        let template = ri.issuer.contains(TENANT_PLACEHOLDER);
        let tenants = match ri.tenants {
            Some(list) if list.is_empty() || list.iter().any(|t| t.trim().is_empty() || t == "*") => {
                return Err(invalid(
                    format!("{key}.tenants"),
                    "must list tenant ids; an empty list or \"*\" is refused, not read as \"any tenant\"",
                ))
            }
            Some(list) => Some(list),
            None if template => {
                return Err(invalid(
                    format!("{key}.tenants"),
                    "an issuer with {tenantid} needs the list of accepted tenant ids",
                ))
            }
            None => None,
        };
        let discovery_url = match ri.discovery_url {
            Some(d) => parse_secure_url(&format!("{key}.discovery_url"), &d)?,
            None => {
                // Azure AD's multi-tenant discovery document lives under "organizations"
                // and names the issuer as the {tenantid} template.
                let issuer = ri.issuer.replace(TENANT_PLACEHOLDER, "organizations");
                let base = issuer.trim().trim_end_matches('/');
                parse_secure_url(
                    &format!("{key}.issuer"),
                    &format!("{base}/.well-known/openid-configuration"),
                )?
            }
        };
        let jwks_uri = ri
            .jwks_uri
            .map(|j| parse_secure_url(&format!("{key}.jwks_uri"), &j))
            .transpose()?;
        if issuers.iter().any(|x: &IssuerConfig| x.issuer == ri.issuer) {
            return Err(invalid(
                format!("{key}.issuer"),
                format!("issuer \"{}\" is listed twice", ri.issuer),
            ));
        }
        let token_types = match ri.token_types {
            None => None,
            Some(list) if list.is_empty() || list.iter().any(|t| t.trim().is_empty()) => {
                return Err(invalid(
                    format!("{key}.token_types"),
                    "must list token types, e.g. [at+jwt]; leave it out to accept any typ",
                ))
            }
            Some(list) => Some(list.iter().map(|t| token_type(t)).collect()),
        };
        let app_only_evidence = app_only_evidence(
            &format!("{key}.app_only_evidence"),
            &ri.issuer,
            ri.app_only_evidence,
        )?;
        issuers.push(IssuerConfig {
            issuer: ri.issuer,
            tenants,
            audiences: ri.audiences,
            algorithms,
            discovery_url,
            jwks_uri,
            token_types,
            app_only_evidence,
        });
    }
    let inbound = InboundConfig {
        issuers,
        leeway: i.leeway.0,
        jwks_refetch_interval: i.jwks_refetch_interval.0,
        jwks_refresh_interval: i.jwks_refresh_interval.0,
        token_cache_max_entries: i.token_cache_max_entries,
    };
    if inbound.jwks_refresh_interval < Duration::from_secs(1) {
        return Err(invalid(
            "inbound.jwks_refresh_interval",
            "must be at least 1s",
        ));
    }
    Ok(inbound)
}

/// A `typ` as compared: lowercase, without the optional `application/` (RFC 7515 4.1.9).
pub fn token_type(text: &str) -> String {
    let t = text.trim().to_ascii_lowercase();
    t.strip_prefix("application/")
        .map(str::to_string)
        .unwrap_or(t)
}

fn app_only_evidence(
    key: &str,
    issuer: &str,
    raw: Option<RawAppOnlyEvidence>,
) -> Result<AppOnlyEvidence, ConfigError> {
    Ok(match raw {
        None if is_entra_issuer(issuer) => AppOnlyEvidence::Entra,
        None => AppOnlyEvidence::Never,
        Some(RawAppOnlyEvidence::Named(name)) => match name.trim() {
            "entra" => AppOnlyEvidence::Entra,
            "never" => AppOnlyEvidence::Never,
            other => {
                return Err(invalid(
                    key,
                    format!("\"{other}\" is not app-only evidence; use entra, never or {{ claim: <name>, value: <value> }}"),
                ))
            }
        },
        Some(RawAppOnlyEvidence::Claim(c)) => {
            if c.claim.trim().is_empty() || c.value.trim().is_empty() {
                return Err(invalid(key, "claim and value must both be written"));
            }
            AppOnlyEvidence::Claim {
                name: c.claim,
                value: c.value,
            }
        }
    })
}
