//! `static` mode: a fixed map from claim value to systemuserid, from the config.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use super::{IdentityError, Impersonation};

pub struct StaticMap(HashMap<String, Uuid>);

impl StaticMap {
    /// Config validation has already checked every value is a GUID.
    pub fn new(map: &BTreeMap<String, String>) -> Self {
        Self(
            map.iter()
                .filter_map(|(k, v)| Uuid::try_parse(v).ok().map(|id| (k.clone(), id)))
                .collect(),
        )
    }

    pub fn resolve(&self, value: &str) -> Result<Impersonation, IdentityError> {
        self.0
            .get(value)
            .map(|id| Impersonation::SystemUserId(*id))
            .ok_or(IdentityError::NotMapped)
    }
}
