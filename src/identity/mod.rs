//! Identity: as which Dynamics user does this caller act? Turns a verified [`Caller`] into
//! the one [`Impersonation`] the upstream stage sends. One file per mode.

pub(crate) mod caller_object_id;
pub mod lookup;
pub(crate) mod static_map;

use uuid::Uuid;

use crate::config::{IdentityConfig, IdentityMode};
use crate::inbound::Caller;

pub(crate) use lookup::{LookupError, UserLookup};

/// Whom Dataverse should act as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impersonation {
    /// `CallerObjectId`: an Azure AD object id; Dataverse finds the user itself.
    CallerObjectId(Uuid),
    /// `MSCRMCallerID`: a systemuserid the gateway resolved.
    SystemUserId(Uuid),
    /// No impersonation header: the request runs as the application user (an access rule
    /// with `impersonation: app_only`, for service callers that have no user).
    ApplicationUser,
}

impl Impersonation {
    /// The id, for logs.
    pub fn describe(&self) -> String {
        match self {
            Self::CallerObjectId(id) | Self::SystemUserId(id) => id.to_string(),
            Self::ApplicationUser => "application-user".to_string(),
        }
    }
}

/// Why a verified caller cannot be mapped to a Dynamics user.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the token has no {0} claim to identify the caller")]
    MissingClaim(String),
    #[error("the token's {0} claim is not an Azure AD object id (a GUID)")]
    NotAGuid(String),
    #[error("the caller is not mapped to a Dynamics user")]
    NotMapped,
    #[error("the caller's tenant is not the organisation's: an object id from another tenant names nobody there")]
    ForeignTenant,
    #[error("the caller's tenant (tid) is not the organisation's, and this environment does not allow_guest_tenants")]
    GuestTenant,
    #[error("no Dynamics user matches the caller")]
    UserNotFound,
    #[error("the caller's Dynamics user is disabled")]
    UserDisabled,
    #[error("more than one Dynamics user matches the caller")]
    Ambiguous,
    #[error("looking up the caller's Dynamics user failed")]
    Lookup(#[source] LookupError),
}

impl IdentityError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingClaim(_) => "identity_claim_missing",
            Self::NotAGuid(_) => "identity_claim_not_guid",
            Self::NotMapped => "identity_not_mapped",
            Self::ForeignTenant => "identity_foreign_tenant",
            Self::GuestTenant => "identity_guest_tenant",
            Self::UserNotFound => "identity_user_not_found",
            Self::UserDisabled => "identity_user_disabled",
            Self::Ambiguous => "identity_ambiguous",
            Self::Lookup(_) => "identity_lookup_failed",
        }
    }
}

enum Mode {
    CallerObjectId,
    Static(static_map::StaticMap),
    Lookup(Box<UserLookup>),
}

/// The identity stage.
pub struct IdentityResolver {
    claim: String,
    mode: Mode,
    /// The organisation's tenant: `CallerObjectId` only means something for its callers,
    /// and only its users become users here unless `allow_guest_tenants`.
    tenant_id: String,
    allow_guest_tenants: bool,
}

impl IdentityResolver {
    /// `lookup` is required for `IdentityMode::Lookup` and ignored otherwise.
    pub fn new(
        config: &IdentityConfig,
        lookup: Option<UserLookup>,
        tenant_id: &str,
        allow_guest_tenants: bool,
    ) -> Result<Self, &'static str> {
        let mode = match &config.mode {
            IdentityMode::CallerObjectId => Mode::CallerObjectId,
            IdentityMode::Static(map) => Mode::Static(static_map::StaticMap::new(map)),
            IdentityMode::Lookup(_) => {
                Mode::Lookup(Box::new(lookup.ok_or("lookup mode needs a UserLookup")?))
            }
        };
        Ok(Self {
            claim: config.claim.clone(),
            mode,
            tenant_id: tenant_id.trim().to_string(),
            allow_guest_tenants,
        })
    }

    /// The caller's identifying claim value, for logs.
    pub fn caller_key<'a>(&self, caller: &'a Caller) -> &'a str {
        caller.claim_str(&self.claim).unwrap_or("-")
    }

    pub async fn resolve(&self, caller: &Caller) -> Result<Impersonation, IdentityError> {
        let value = caller
            .claim_str(&self.claim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| IdentityError::MissingClaim(self.claim.clone()))?;
        let tid = caller.tenant().unwrap_or_default();
        let own_tenant = tid.eq_ignore_ascii_case(&self.tenant_id);
        match &self.mode {
            Mode::CallerObjectId => {
                // Guests have a different oid in each tenant: an oid issued by another
                // tenant would impersonate nobody, or the wrong person.
                if !own_tenant {
                    return Err(IdentityError::ForeignTenant);
                }
                caller_object_id::resolve(&self.claim, value)
            }
            // Another tenant's token may carry any email or name it likes: it names one of
            // this organisation's users only if the environment says it trusts such guests.
            _ if !own_tenant && !self.allow_guest_tenants => Err(IdentityError::GuestTenant),
            Mode::Static(map) => map.resolve(&caller.configured_issuer, value),
            Mode::Lookup(lookup) => lookup.resolve(&caller.issuer, tid, value).await,
        }
    }
}
