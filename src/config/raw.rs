//! The file as written: what serde reads, unknown keys refused. Durations, sizes and
//! keywords are typed (`units`), so a wrong one is reported under its own key.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::Deserialize;

use super::units;
use super::{BudgetBucket, LookupAttribute};
use crate::access::RawAccess;
use crate::secret::Secret;
use crate::upstream::credential::{RawCertificate, RawManagedIdentity, RawWorkloadIdentity};

/// The file as written. Durations and sizes are human strings with a unit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// Listeners and request limits.
    #[serde(default)]
    pub server: RawServer,
    /// Who may call: the OIDC issuers whose tokens are accepted.
    pub inbound: RawInbound,
    /// How a caller becomes a Dynamics user.
    #[serde(default)]
    pub identity: RawIdentity,
    /// The Dataverse organisation and the S2S credential.
    pub dynamics: RawDynamics,
    /// The audit log of forwarded requests.
    #[serde(default)]
    pub audit: RawAudit,
    /// Which caller may make which request; without it every verified caller may make any.
    #[serde(default)]
    pub access: Option<RawAccess>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawAudit {
    /// Log paths without query values (OData filters can hold personal data).
    pub redact_query: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetryThrottled {
    /// Retry idempotent requests that Dataverse answered 429.
    #[serde(default)]
    pub enabled: bool,
    /// Longest `Retry-After` the gateway waits out; longer ones go back to the caller.
    #[serde(default = "default_retry_max_wait")]
    pub max_wait: units::Duration,
}

fn default_retry_max_wait() -> units::Duration {
    units::Duration::secs(10)
}

/// Dataverse's service-protection budget as the gateway keeps it: how many requests may be
/// in flight to one environment at once, and what waits when they are.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawBudget {
    /// Most requests in flight to Dataverse per bucket (Dataverse allows 52 per user);
    /// `x-ms-dop-hint` may lower it, never raise it.
    pub max_concurrency: usize,
    /// Most requests waiting for a slot per environment; more are answered 503 at once.
    pub max_queue: usize,
    /// Longest a request waits for a slot before it is answered 503 with `Retry-After`.
    pub queue_timeout: units::Duration,
    /// Longest a Dataverse 429's `Retry-After` closes a bucket (larger values are clamped).
    pub max_retry_after: units::Duration,
    /// Whose budget a request spends: `application` (the application user, default) or
    /// `impersonated_user` (one bucket per impersonated Dynamics user).
    pub bucket: BudgetBucket,
    /// The budget shared by every replica of the gateway; only under `dynamics.budget`.
    pub store: Option<RawBudgetStore>,
}

/// Where replicas keep the budget they share.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBudgetStore {
    pub valkey: RawValkey,
}

/// A Valkey (or Redis) server holding the concurrency leases and closed buckets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawValkey {
    /// `redis://[user:password@]host:port[/db]` (or `valkey://`); may carry a password,
    /// so it is a secret.
    pub url: Secret,
    /// How many replicas share the budget: without the store each keeps `limit / replicas`.
    pub replicas: usize,
    /// How long a lease outlives a replica that stopped renewing it (killed, cut off).
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: units::Duration,
    /// Longest wait for one store command; past it the gate falls back to the local share.
    #[serde(default = "default_store_timeout")]
    pub command_timeout: units::Duration,
    /// Prefix of every key, so several gateways (or other tenants) can share one server.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

fn default_lease_ttl() -> units::Duration {
    units::Duration::secs(30)
}

fn default_store_timeout() -> units::Duration {
    units::Duration::millis(250)
}

fn default_key_prefix() -> String {
    "dynamics-gateway".into()
}

impl Default for RawBudget {
    fn default() -> Self {
        Self {
            max_concurrency: 52,
            max_queue: 1024,
            queue_timeout: units::Duration::secs(10),
            max_retry_after: units::Duration::secs(300),
            bucket: BudgetBucket::Application,
            store: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawServer {
    /// Address apps call.
    pub listen: String,
    /// Address of /metrics /healthz /readyz; never the app port.
    pub admin_listen: String,
    /// Base URL apps use to reach the gateway; default `http://<Host header>`.
    pub public_url: Option<String>,
    /// Take X-Forwarded-For/-Host/-Proto from the caller (only behind a trusted proxy).
    pub trust_forwarded_headers: bool,
    /// Time allowed for Dataverse to answer, counted from the end of the request body
    /// (its own limit is 2 minutes).
    pub request_timeout: units::Duration,
    /// Largest request body accepted.
    pub max_request_body: units::ByteSize,
    /// Largest decompressed Dataverse response body the gateway rewrites links in; past it
    /// the answer is cut off rather than held.
    pub max_decoded_response_body: units::ByteSize,
    /// Largest `$batch` part held to rewrite it and fix its `Content-Length` (parts that
    /// declare one; .NET clients do); a larger one is refused with 413.
    pub max_batch_part: units::ByteSize,
    /// Time a client has to send a request's headers (slowloris); also the deadline from
    /// accepting a connection to its first complete request head, HTTP/1 or HTTP/2.
    pub header_read_timeout: units::Duration,
    /// A connection with no request in progress is closed after this long; a request
    /// head begun meanwhile has `header_read_timeout` from its first byte.
    pub idle_timeout: units::Duration,
    /// An HTTP/2 connection that sends nothing for this long is pinged.
    pub http2_keep_alive_interval: units::Duration,
    /// An HTTP/2 ping not answered within this closes the connection.
    pub http2_keep_alive_timeout: units::Duration,
    /// A request body that sends no bytes for this long is answered 408 and not forwarded.
    pub body_read_timeout: units::Duration,
    /// Slowest average a request body may arrive at, in bytes a second over each
    /// `min_body_rate_window` of waiting for it; 0 for none.
    pub min_body_rate: u64,
    pub min_body_rate_window: units::Duration,
    /// Longest one request may take from its head to Dataverse's answer, upload included.
    pub exchange_timeout: units::Duration,
    /// Open connections beyond this are refused with 503.
    pub max_connections: usize,
    /// Open connections from one peer address beyond this are refused with 503; default a
    /// tenth of `max_connections` (at least 1); 0 turns the per-address cap off.
    pub max_connections_per_peer: Option<usize>,
    /// Requests in flight beyond this are answered 503 + Retry-After at once.
    pub max_in_flight: usize,
    /// Longest wait for in-flight requests after SIGTERM.
    pub shutdown_grace: units::Duration,
    /// Threads serving requests; default: one per core. A sidecar limited to one CPU is
    /// fastest with 1 (no hand-offs between threads).
    pub worker_threads: Option<usize>,
    /// Serve the app port over TLS (HTTPS, HTTP/2 by ALPN); default plain HTTP.
    pub tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    /// PEM file: the server certificate, then its intermediates.
    pub certificate: String,
    /// PEM file: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: String,
    /// PEM file of CA certificates; when set, clients must present a certificate they issued.
    pub client_ca: Option<String>,
    /// How often the files are checked for a new pair.
    #[serde(default = "default_tls_reload_interval")]
    pub reload_interval: units::Duration,
}

fn default_tls_reload_interval() -> units::Duration {
    units::Duration::secs(5)
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            public_url: None,
            trust_forwarded_headers: false,
            request_timeout: units::Duration::secs(120),
            max_request_body: units::ByteSize::mib(128),
            max_decoded_response_body: units::ByteSize::gib(1),
            max_batch_part: units::ByteSize::mib(4),
            header_read_timeout: units::Duration::secs(10),
            idle_timeout: units::Duration::secs(60),
            http2_keep_alive_interval: units::Duration::secs(30),
            http2_keep_alive_timeout: units::Duration::secs(10),
            body_read_timeout: units::Duration::secs(30),
            min_body_rate: 240,
            min_body_rate_window: units::Duration::secs(5),
            exchange_timeout: units::Duration::secs(600),
            max_connections: 10_000,
            max_connections_per_peer: None,
            max_in_flight: 1024,
            shutdown_grace: units::Duration::secs(30),
            worker_threads: None,
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInbound {
    /// Accepted token issuers; at least one.
    pub issuers: Vec<RawIssuer>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway: units::Duration,
    /// Least time between JWKS refetches caused by unknown `kid`s, per issuer.
    #[serde(default = "default_refetch")]
    pub jwks_refetch_interval: units::Duration,
    /// Period of the background JWKS refresh.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_interval: units::Duration,
    /// Verified tokens remembered so a repeated token skips the signature check; 0 turns it off.
    #[serde(default = "default_token_cache")]
    pub token_cache_max_entries: u64,
}

fn default_token_cache() -> u64 {
    10_000
}

fn default_leeway() -> units::Duration {
    units::Duration::secs(60)
}
fn default_refetch() -> units::Duration {
    units::Duration::secs(30)
}
fn default_jwks_refresh() -> units::Duration {
    units::Duration::secs(3600)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIssuer {
    /// Exact `iss` value.
    pub issuer: String,
    /// Accepted `aud` values; at least one.
    pub audiences: Vec<String>,
    /// Allowed signature algorithms; default RS256.
    #[serde(default)]
    pub algorithms: Option<Vec<units::Algorithm>>,
    /// Default `<issuer>/.well-known/openid-configuration`.
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// Set to skip discovery.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Tenants (`tid`) accepted from this issuer. Required, and non-empty, when the issuer
    /// is a `{tenantid}` template (Azure AD multi-tenant), and for every issuer when the
    /// gateway serves more than one environment or tenant.
    #[serde(default)]
    pub tenants: Option<Vec<String>>,
    /// Accepted `typ` header values, e.g. `[at+jwt]` (RFC 9068); a token whose `typ` is not
    /// listed (or absent) is refused. Default: any `typ`.
    #[serde(default)]
    pub token_types: Option<Vec<String>>,
    /// What proves a token is app-only (a service calling as itself), which
    /// `impersonation: app_only` rules need: `entra` (`idtyp: app`, or without `idtyp`:
    /// `oid` equal to `sub` and no `scp`), `never`, or `{ claim: <name>, value: <value> }`.
    /// Default: `entra` for Microsoft Entra hosts (login.microsoftonline.com, sts.windows.net, ...), else `never`.
    #[serde(default)]
    pub app_only_evidence: Option<RawAppOnlyEvidence>,
}

/// `entra` / `never`, or the claim whose value proves an app-only token.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawAppOnlyEvidence {
    Named(String),
    Claim(RawAppOnlyClaim),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAppOnlyClaim {
    /// The claim the issuer sets only in app-only tokens.
    pub claim: String,
    /// Its value in app-only tokens (a string, or one item of an array claim).
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawIdentity {
    /// caller_object_id | lookup | static
    pub mode: ModeName,
    /// The claim that identifies the caller.
    pub claim: String,
    /// For `lookup`: which systemuser attribute the claim value is compared with.
    pub lookup: Option<RawLookup>,
    /// For `static`: claim value -> systemuserid, or -> `{ systemuserid, issuer }` naming the
    /// issuer whose tokens this entry trusts (required when there are several issuers).
    #[serde(rename = "static")]
    pub static_map: Option<BTreeMap<String, RawStaticUser>>,
    /// How long a lookup answer that found a user (enabled or disabled) is remembered.
    pub cache_ttl: units::Duration,
    /// How long a lookup answer "no such user" is remembered: short, so a user Dataverse
    /// provisions later (group teams) is not locked out for `cache_ttl`.
    pub unknown_user_cache_ttl: units::Duration,
    /// Most lookup answers remembered.
    pub cache_max_entries: u64,
}

impl Default for RawIdentity {
    fn default() -> Self {
        Self {
            mode: ModeName::CallerObjectId,
            claim: "oid".into(),
            lookup: None,
            static_map: None,
            cache_ttl: units::Duration::secs(15 * 60),
            unknown_user_cache_ttl: units::Duration::secs(60),
            cache_max_entries: 100_000,
        }
    }
}

/// One `static` entry: a systemuserid, or a systemuserid and the issuer it trusts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawStaticUser {
    SystemUserId(String),
    Trusted(RawTrustedStaticUser),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTrustedStaticUser {
    /// The Dynamics user the caller acts as.
    pub systemuserid: String,
    /// The issuer (as written in `inbound.issuers`) whose tokens may carry this claim value.
    pub issuer: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLookup {
    /// azureactivedirectoryobjectid | internalemailaddress | domainname
    pub attribute: LookupAttribute,
}

/// Declares `RawDynamics` and `RawEnvironment` with the keys of one organisation written
/// once: they are the keys of an inline `dynamics` (one environment) and of each
/// `dynamics.environments[]`. `#[serde(flatten)]` of a shared struct would need no macro,
/// but serde then reads the flattened keys from a buffer: an unknown key is no longer
/// refused with the list of known ones, and a wrong value is reported under `dynamics`
/// instead of its own key.
macro_rules! with_organisation_keys {
    (
        shared { $($(#[$sattr:meta])* $sfield:ident : $sty:ty,)* }
        $(#[$dattr:meta])*
        struct RawDynamics {
            $($(#[$d1attr:meta])* $d1field:ident : $d1ty:ty,)*
            ..
            $($(#[$d2attr:meta])* $d2field:ident : $d2ty:ty,)*
        }
        $(#[$eattr:meta])*
        struct RawEnvironment {
            $($(#[$e1attr:meta])* $e1field:ident : $e1ty:ty,)*
            ..
            $($(#[$e2attr:meta])* $e2field:ident : $e2ty:ty,)*
        }
    ) => {
        // The shared keys where `..` stands: serde lists known keys in this order.
        $(#[$dattr])*
        pub(crate) struct RawDynamics {
            $($(#[$d1attr])* pub $d1field: $d1ty,)*
            $($(#[$sattr])* pub $sfield: $sty,)*
            $($(#[$d2attr])* pub $d2field: $d2ty,)*
        }

        $(#[$eattr])*
        pub(crate) struct RawEnvironment {
            $($(#[$e1attr])* pub $e1field: $e1ty,)*
            $($(#[$sattr])* pub $sfield: $sty,)*
            $($(#[$e2attr])* pub $e2field: $e2ty,)*
        }

        impl RawDynamics {
            /// Whether any key of an inline organisation is written (beside `url` and
            /// `tenant_id`, which the caller checks).
            pub(crate) fn writes_organisation_keys(&self) -> bool {
                false $(|| IsWritten::is_written(&self.$sfield))*
            }

            /// The inline organisation as the one environment, its keys moved out.
            pub(crate) fn take_environment(
                &mut self,
                name: String,
                url: String,
                tenant_id: String,
            ) -> RawEnvironment {
                RawEnvironment {
                    name,
                    url,
                    tenant_id,
                    budget: None,
                    $($sfield: std::mem::take(&mut self.$sfield),)*
                }
            }
        }
    };
}

/// A key left out reads as its default: `None`, or `false` for switches.
trait IsWritten {
    fn is_written(&self) -> bool;
}

impl<T> IsWritten for Option<T> {
    fn is_written(&self) -> bool {
        self.is_some()
    }
}

impl IsWritten for bool {
    fn is_written(&self) -> bool {
        *self
    }
}

with_organisation_keys! {
    shared {
        /// The app registration's client id (several environments may share one); workload
        /// and managed identity may leave it to `$AZURE_CLIENT_ID` / the system identity.
        #[serde(default)]
        client_id: Option<String>,
        /// The app registration's secret (`${VAR}` from the environment). Exactly one of
        /// `client_secret`, `certificate`, `workload_identity`, `managed_identity`.
        #[serde(default)]
        client_secret: Option<String>,
        /// A certificate: the token request carries a signed client assertion.
        #[serde(default)]
        certificate: Option<RawCertificate>,
        /// Kubernetes workload identity: the projected service-account token is the assertion.
        #[serde(default)]
        workload_identity: Option<RawWorkloadIdentity>,
        /// The instance metadata service's managed identity.
        #[serde(default)]
        managed_identity: Option<RawManagedIdentity>,
        /// Default https://login.microsoftonline.com/<tenant_id>/oauth2/v2.0/token
        #[serde(default)]
        token_url: Option<String>,
        /// Default `<url>/.default`.
        #[serde(default)]
        scope: Option<String>,
        /// Caller tenants (`tid`) this environment serves; default `[tenant_id]`; `"*"`: any.
        #[serde(default)]
        tenants: Option<Vec<String>>,
        /// Lets callers whose `tid` is not `tenant_id` (users of other tenants, or tokens
        /// without `tid`) act as a Dynamics user here in `lookup` or `static` mode. Off: only
        /// the organisation's own tenant's users are mapped to users.
        #[serde(default)]
        allow_guest_tenants: bool,
        /// Other origins the organisation answers on, e.g. `https://contoso.api.crm.dynamics.com`
        /// next to `url` `https://contoso.crm.dynamics.com`: absolute links Dataverse writes
        /// with any of them (scheme and host in any case) are pointed at the gateway like
        /// links naming `url`. Requests still go to `url` only. Default: none.
        #[serde(default)]
        url_aliases: Option<Vec<String>>,
        /// Pass the caller's `Cookie` to Dataverse and Dataverse's `Set-Cookie` (its
        /// server-affinity cookies) to the caller. Off by default: one gateway serves many
        /// apps, and Microsoft advises against affinity for throughput. Turn on only for an
        /// environment whose one app relies on affinity.
        #[serde(default)]
        forward_cookies: bool,
    }

    /// Where requests go: one organisation written inline (`url`, `tenant_id`, and the
    /// keys of an environment but `name` and `budget`), or a list of named `environments`
    /// and a `routing` rule.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawDynamics {
        /// Single-environment form: organisation URL, e.g. https://contoso.crm.dynamics.com
        #[serde(default)]
        url: Option<String>,
        /// Single-environment form: tenant that owns the organisation.
        #[serde(default)]
        tenant_id: Option<String>,
        ..
        /// Several organisations or customer tenants, each with a name.
        #[serde(default)]
        environments: Option<Vec<RawEnvironment>>,
        /// How a request chooses its environment when there are several.
        #[serde(default)]
        routing: Option<RawRouting>,
        /// Waiting out Dataverse's 429 `Retry-After` for idempotent requests; off by default.
        #[serde(default)]
        retry_throttled: Option<RawRetryThrottled>,
        /// The service-protection budget of each environment (`environments[].budget` overrides it).
        #[serde(default)]
        budget: RawBudget,
        /// Least time between two S2S token replacements caused by Dataverse answering 401
        /// (per token); 401s within it are passed on instead of requesting another token.
        #[serde(default = "default_token_replace_interval")]
        token_replace_interval: units::Duration,
        /// Longest wait before retrying a failed S2S token request, whatever the token
        /// endpoint's `Retry-After` asks for.
        #[serde(default = "default_token_retry_max_wait")]
        token_retry_max_wait: units::Duration,
        /// Longest one S2S token request (token endpoint or IMDS) may take before it is
        /// abandoned and retried.
        #[serde(default = "default_token_timeout")]
        token_timeout: units::Duration,
        /// The HTTP version spoken to Dataverse: `auto`, `http1` or `http2`.
        #[serde(default)]
        upstream_http: UpstreamHttp,
    }

    /// One Dataverse organisation and the credential used for it.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawEnvironment {
        /// Used in path-prefix routing (`/<name>/api/data/...`), logs, metrics and `/readyz`.
        name: String,
        /// Organisation URL, e.g. https://contoso.crm.dynamics.com
        url: String,
        /// Tenant that owns the organisation (in multi-tenant use: the customer's tenant).
        tenant_id: String,
        ..
        /// This environment's budget, instead of `dynamics.budget`.
        #[serde(default)]
        budget: Option<RawBudget>,
    }
}

fn default_token_replace_interval() -> units::Duration {
    units::Duration::secs(5)
}

fn default_token_retry_max_wait() -> units::Duration {
    units::Duration::secs(300)
}

fn default_token_timeout() -> units::Duration {
    units::Duration::secs(15)
}

/// How a request chooses its environment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouting {
    /// `path_prefix`: `/<environment>/api/data/...`; `tenant`: the caller's `tid` picks the
    /// environment whose `tenants` list it.
    pub by: RoutingRule,
}

/// `routing.by` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RoutingRule {
    PathPrefix,
    Tenant,
}

impl FromStr for RoutingRule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "path_prefix" => Ok(Self::PathPrefix),
            "tenant" => Ok(Self::Tenant),
            other => Err(format!(
                "\"{other}\" is not a routing rule; use path_prefix or tenant"
            )),
        }
    }
}

/// `dynamics.upstream_http`: which HTTP version the gateway speaks to Dataverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamHttp {
    /// HTTP/2 when TLS negotiates it (ALPN), else HTTP/1.1; plain `http://` is HTTP/1.1.
    Auto,
    /// HTTP/1.1 only: a pool of kept-alive connections. The default: each request has a
    /// connection of its own, so a caller that stops reading its answer holds up only its
    /// own (over HTTP/2 every request of a request thread shares one connection's window).
    #[default]
    Http1,
    /// HTTP/2 only: one multiplexed connection per request thread (prior knowledge on a
    /// plain `http://` loopback organisation).
    Http2,
}

impl FromStr for UpstreamHttp {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "http1" => Ok(Self::Http1),
            "http2" => Ok(Self::Http2),
            other => Err(format!(
                "\"{other}\" is not an HTTP version; use auto, http1 or http2"
            )),
        }
    }
}

/// `identity.mode` as written; the validated [`IdentityMode`] carries each mode's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModeName {
    CallerObjectId,
    Lookup,
    Static,
}

impl FromStr for ModeName {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "caller_object_id" => Ok(Self::CallerObjectId),
            "lookup" => Ok(Self::Lookup),
            "static" => Ok(Self::Static),
            other => Err(format!(
                "\"{other}\" is not a mode; use caller_object_id, lookup or static"
            )),
        }
    }
}

units::deserialize_from_str!(RoutingRule, ModeName, UpstreamHttp);
