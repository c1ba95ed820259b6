//! `caller_object_id` mode: the claim (by default `oid`) already is the Azure AD object id
//! Dataverse resolves from `CallerObjectId`; it only has to be a GUID.

use uuid::Uuid;

use super::{IdentityError, Impersonation};

pub fn resolve(claim: &str, value: &str) -> Result<Impersonation, IdentityError> {
    Uuid::try_parse(value)
        .map(Impersonation::CallerObjectId)
        .map_err(|_| IdentityError::NotAGuid(claim.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_guids_become_caller_object_ids() {
        let id = "9f2c4c1e-5d7a-4b8e-a6c3-0d1e2f3a4b5c";
        assert_eq!(
            resolve("oid", id).unwrap(),
            Impersonation::CallerObjectId(Uuid::parse_str(id).unwrap())
        );
        assert!(matches!(
            resolve("oid", "alice@contoso.com"),
            Err(IdentityError::NotAGuid(_))
        ));
    }
}
