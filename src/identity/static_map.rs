//! `static` mode: a fixed map from (issuer, claim value) to systemuserid, from the config.
//! The issuer is part of the key: the same claim value signed by another issuer may be
//! someone else.

use std::collections::HashMap;

use uuid::Uuid;

use super::{IdentityError, Impersonation};
use crate::config::StaticUser;

pub struct StaticMap(HashMap<(String, String), Uuid>);

impl StaticMap {
    pub fn new(users: &[StaticUser]) -> Self {
        Self(
            users
                .iter()
                .map(|u| ((u.issuer.clone(), u.claim_value.clone()), u.systemuserid))
                .collect(),
        )
    }

    /// `issuer` is the configured issuer that verified the token.
    pub fn resolve(&self, issuer: &str, value: &str) -> Result<Impersonation, IdentityError> {
        self.0
            .get(&(issuer.to_string(), value.to_string()))
            .map(|id| Impersonation::SystemUserId(*id))
            .ok_or(IdentityError::NotMapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_matches_only_tokens_of_the_issuer_it_names() {
        let id = Uuid::new_v4();
        let map = StaticMap::new(&[StaticUser {
            issuer: "https://a".into(),
            claim_value: "alice".into(),
            systemuserid: id,
        }]);
        assert_eq!(
            map.resolve("https://a", "alice").unwrap(),
            Impersonation::SystemUserId(id)
        );
        assert!(matches!(
            map.resolve("https://b", "alice"),
            Err(IdentityError::NotMapped)
        ));
    }
}
