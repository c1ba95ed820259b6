//! `identity`: how a verified caller becomes a Dynamics user.

use std::str::FromStr;
use std::time::Duration;

use super::raw::{ModeName, RawIdentity, RawStaticUser};
use super::{invalid, ConfigError, IssuerConfig};

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub mode: IdentityMode,
    pub claim: String,
    pub cache_ttl: Duration,
    pub unknown_user_cache_ttl: Duration,
    pub cache_max_entries: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityMode {
    CallerObjectId,
    Lookup(LookupAttribute),
    Static(Vec<StaticUser>),
}

/// One `static` entry: a claim value, from one issuer, acts as one Dynamics user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticUser {
    /// The issuer as written in `inbound.issuers` (a `{tenantid}` template included).
    pub issuer: String,
    pub claim_value: String,
    pub systemuserid: uuid::Uuid,
}

/// The systemuser attributes a lookup may compare with, and how their literal is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupAttribute {
    AzureActiveDirectoryObjectId,
    InternalEmailAddress,
    DomainName,
}

impl FromStr for LookupAttribute {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "azureactivedirectoryobjectid" => Ok(Self::AzureActiveDirectoryObjectId),
            "internalemailaddress" => Ok(Self::InternalEmailAddress),
            "domainname" => Ok(Self::DomainName),
            other => Err(format!("\"{other}\" is not supported; use azureactivedirectoryobjectid, internalemailaddress or domainname")),
        }
    }
}

impl LookupAttribute {
    pub fn name(self) -> &'static str {
        match self {
            Self::AzureActiveDirectoryObjectId => "azureactivedirectoryobjectid",
            Self::InternalEmailAddress => "internalemailaddress",
            Self::DomainName => "domainname",
        }
    }
}

super::units::deserialize_from_str!(LookupAttribute);

/// The validated `identity` section; `issuers` are those of `inbound`, which static
/// entries name.
pub(super) fn identity_config(
    id: RawIdentity,
    issuers: &[IssuerConfig],
) -> Result<IdentityConfig, ConfigError> {
    if id.claim.trim().is_empty() {
        return Err(invalid("identity.claim", "must name a claim, e.g. \"oid\""));
    }
    let mode = match id.mode {
        ModeName::CallerObjectId => {
            reject_extra(id.lookup.is_some(), "identity.lookup", "caller_object_id")?;
            reject_extra(
                id.static_map.is_some(),
                "identity.static",
                "caller_object_id",
            )?;
            IdentityMode::CallerObjectId
        }
        ModeName::Lookup => {
            reject_extra(id.static_map.is_some(), "identity.static", "lookup")?;
            if id.claim.trim().eq_ignore_ascii_case("email") {
                return Err(invalid(
                    "identity.claim",
                    "email cannot identify a caller: in Microsoft Entra ID it is mutable and unverified, so anyone able to set it could act as that user; use oid with attribute azureactivedirectoryobjectid",
                ));
            }
            IdentityMode::Lookup(
                id.lookup
                    .as_ref()
                    .map_or(LookupAttribute::AzureActiveDirectoryObjectId, |l| {
                        l.attribute
                    }),
            )
        }
        ModeName::Static => {
            reject_extra(id.lookup.is_some(), "identity.lookup", "static")?;
            let map = id.static_map.unwrap_or_default();
            if map.is_empty() {
                return Err(invalid(
                    "identity.static",
                    "static mode needs a map of claim value -> systemuserid",
                ));
            }
            let mut users = Vec::with_capacity(map.len());
            for (k, v) in map {
                users.push(static_user(issuers, k, v)?);
            }
            IdentityMode::Static(users)
        }
    };
    let identity = IdentityConfig {
        mode,
        claim: id.claim,
        cache_ttl: id.cache_ttl.0,
        unknown_user_cache_ttl: id.unknown_user_cache_ttl.0,
        cache_max_entries: id.cache_max_entries,
    };
    if identity.cache_max_entries == 0 {
        return Err(invalid("identity.cache_max_entries", "must be at least 1"));
    }
    Ok(identity)
}

/// A validated `static` entry; without a named issuer it trusts the only issuer there is.
fn static_user(
    issuers: &[IssuerConfig],
    claim_value: String,
    raw: RawStaticUser,
) -> Result<StaticUser, ConfigError> {
    let key = format!("identity.static.{claim_value}");
    let (systemuserid, issuer) = match raw {
        RawStaticUser::SystemUserId(id) => match issuers {
            [only] => (id, only.issuer.clone()),
            _ => {
                return Err(invalid(
                    key,
                    "several issuers are configured, so each static entry must name the one it trusts: { systemuserid: <guid>, issuer: <issuer as in inbound.issuers> }",
                ))
            }
        },
        RawStaticUser::Trusted(t) => {
            if !issuers.iter().any(|i| i.issuer == t.issuer) {
                return Err(invalid(
                    format!("{key}.issuer"),
                    format!("\"{}\" is not one of inbound.issuers", t.issuer),
                ));
            }
            (t.systemuserid, t.issuer)
        }
    };
    let systemuserid = uuid::Uuid::try_parse(systemuserid.trim()).map_err(|_| {
        invalid(
            &key,
            format!("\"{systemuserid}\" is not a systemuserid (a GUID)"),
        )
    })?;
    Ok(StaticUser {
        issuer,
        claim_value,
        systemuserid,
    })
}

fn reject_extra(present: bool, key: &str, mode: &str) -> Result<(), ConfigError> {
    if present {
        Err(invalid(
            key,
            format!("is not used in identity.mode {mode}; remove it or change the mode"),
        ))
    } else {
        Ok(())
    }
}
