//! The gateway configuration that points at a local IdP and stand-in Dataverse, shared by
//! `demo`, the tests and the benchmarks so they all run the same wiring.

use super::IdpHandle;

/// Extra YAML for the generated config; each field is inserted as given.
#[derive(Debug, Clone, Default)]
pub struct ConfigParts {
    /// The whole `identity:` section (default: `caller_object_id`).
    pub identity: String,
    /// Lines under `server:`, two-space indented.
    pub server: String,
    /// Lines under `inbound:`, two-space indented.
    pub inbound: String,
    /// Lines under `dynamics:`, two-space indented.
    pub dynamics: String,
}

/// A complete config: `listen`/`admin_listen` are placeholders (callers pass listeners).
/// The stand-in IdP mints Entra-shaped tokens, so its issuer takes Entra's app-only evidence.
pub fn gateway_config_yaml(idp: &IdpHandle, dataverse_url: &str, parts: &ConfigParts) -> String {
    format!(
        "server:\n  listen: 127.0.0.1:1\n  admin_listen: 127.0.0.1:2\n{server}\
inbound:\n  issuers:\n    - issuer: {issuer}\n      audiences: [{aud}]\n      app_only_evidence: entra\n{inbound}\
{identity}\
dynamics:\n  url: {dataverse_url}\n  tenant_id: {tenant}\n  client_id: {client_id}\n  client_secret: {secret}\n  token_url: {token_url}\n{dynamics}",
        server = parts.server,
        inbound = parts.inbound,
        identity = parts.identity,
        issuer = idp.issuer(),
        aud = idp.audience(),
        tenant = idp.tenant_id(),
        client_id = idp.client_id(),
        secret = idp.client_secret(),
        token_url = idp.token_url(),
        dynamics = parts.dynamics,
    )
}
