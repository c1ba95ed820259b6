//! Routing: which Dataverse environment serves this request. By path prefix
//! (`/<environment>/api/data/...`) or by the caller's tenant (`tid`); either way a caller
//! only reaches an environment that serves its tenant.

use std::collections::HashMap;
use std::sync::Arc;

use crate::access::{EnvironmentMetadata, StoredQueryLookup};
use crate::config::{EnvironmentConfig, Routing};
use crate::identity::IdentityResolver;
use crate::inbound::Caller;
use crate::upstream::Forwarder;

/// One Dataverse organisation at run time: where it is, how callers map to its users,
/// and the forwarder holding its client and S2S token.
pub struct Environment {
    pub config: EnvironmentConfig,
    pub identity: IdentityResolver,
    pub upstream: Forwarder,
    /// The tables of its stored queries, for the access rules.
    pub stored_queries: StoredQueryLookup,
    /// Its `$metadata`, fetched from Dataverse, when the rules need it and
    /// `access.metadata_file` does not give it.
    pub metadata: Option<Arc<EnvironmentMetadata>>,
}

impl Environment {
    pub fn name(&self) -> &str {
        &self.config.name
    }
}

/// Why no environment serves a request.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("there is no environment named {0}")]
    UnknownEnvironment(String),
    #[error("environment {environment} does not serve callers of this tenant")]
    TenantNotServed { environment: String },
    #[error("no environment serves callers of this tenant")]
    NoEnvironmentForTenant,
}

impl RouteError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownEnvironment(_) => "unknown_environment",
            Self::TenantNotServed { .. } => "tenant_not_served",
            Self::NoEnvironmentForTenant => "no_environment_for_tenant",
        }
    }
}

/// The routing stage.
pub struct Router {
    routing: Routing,
    environments: Vec<Arc<Environment>>,
    by_name: HashMap<String, Arc<Environment>>,
    by_tenant: HashMap<String, Arc<Environment>>,
}

impl Router {
    pub fn new(routing: Routing, environments: Vec<Arc<Environment>>) -> Self {
        let by_name = environments
            .iter()
            .map(|e| (e.config.name.clone(), e.clone()))
            .collect();
        let by_tenant = environments
            .iter()
            .flat_map(|e| {
                e.config
                    .tenants
                    .iter()
                    .flatten()
                    .map(move |t| (t.to_ascii_lowercase(), e.clone()))
            })
            .collect();
        Self {
            routing,
            environments,
            by_name,
            by_tenant,
        }
    }

    /// True when request paths start with the environment's name.
    pub fn uses_path_prefix(&self) -> bool {
        self.routing == Routing::PathPrefix
    }

    pub fn environments(&self) -> &[Arc<Environment>] {
        &self.environments
    }

    /// The environment for a verified caller; `prefix` is the path's environment name in
    /// path-prefix routing.
    pub fn route(
        &self,
        prefix: Option<&str>,
        caller: &Caller,
    ) -> Result<&Arc<Environment>, RouteError> {
        let tid = caller.tenant();
        let environment = match self.routing {
            Routing::PathPrefix => {
                let name = prefix.unwrap_or_default();
                self.by_name
                    .get(name)
                    .ok_or_else(|| RouteError::UnknownEnvironment(sanitize(name)))?
            }
            Routing::Tenant => tid
                .and_then(|t| self.by_tenant.get(&t.to_ascii_lowercase()))
                .ok_or(RouteError::NoEnvironmentForTenant)?,
            Routing::Single => self
                .environments
                .first()
                .ok_or(RouteError::NoEnvironmentForTenant)?,
        };
        if !environment.config.serves_tenant(tid) {
            return Err(RouteError::TenantNotServed {
                environment: environment.config.name.clone(),
            });
        }
        Ok(environment)
    }
}

/// A caller-written name that ends up in a message: short and plain only.
fn sanitize(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .take(64)
        .collect()
}
