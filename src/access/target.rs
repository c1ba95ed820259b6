//! What a Web API request path names, for the access rules: an entity set, an unbound
//! function or action, `$batch`, `$metadata`, the service root, or something the gateway
//! does not recognise. Pure and total: every string maps to a [`Target`], never an error.
//!
//! How each shape counts (the rules list names; comparison ignores ASCII case):
//! - `accounts`, `accounts(<guid>)`, `accounts(name='x')` (alternate key), `accounts/$count`,
//!   `accounts(<id>)/name/$value`, `accounts(<id>)/primarycontactid/$ref` → `accounts`.
//! - Navigation `accounts(<id>)/contact_customer_accounts` → `accounts`: the target is the
//!   first segment. The tables the later segments lead to are pairs of their own, resolved
//!   from `$metadata` by [`super::touches`], and each needs its own grant.
//! - Bound functions and actions `accounts(<id>)/Microsoft.Dynamics.CRM.Foo` → `accounts`.
//! - Unbound functions and actions `WhoAmI()`, `WhoAmI`, `RetrieveVersion()`,
//!   `Microsoft.Dynamics.CRM.WinOpportunity` → a pseudo entity set named by the operation
//!   without namespace (`WhoAmI`, `WinOpportunity`), so rules list them like entity sets.
//! - `$batch` (anywhere in the path, in any case, however often percent-encoded) → [`Target::Batch`].
//! - `$metadata` → [`Target::Metadata`]; `/api/data/v9.2` and `/api/data/v9.2/` →
//!   [`Target::ServiceRoot`]. Rules name both `$metadata`: each only describes the service.
//! - Anything else (another API version, `$`-segments such as `$entity`, names that are not
//!   OData identifiers, double encoding, empty or dot segments) → [`Target::Unknown`], which
//!   only an `entity_sets: ["*"]` grant covers.
//!
//! Telling an entity set from an unbound operation needs `$metadata` too. Both share one
//! namespace in the rules and are matched by name, so the variant is only a label for logs
//! and messages: `Function` for `Name()`, namespace-qualified names, and names with capitals
//! (Dataverse entity set names are lowercase logical collection names; operation names are
//! PascalCase), except the PascalCase metadata entity sets such as `EntityDefinitions`.

use std::borrow::Cow;
use std::fmt;

use percent_encoding::percent_decode_str;

use crate::request_target::API_PREFIX;

/// Web API versions Dataverse answers; anything else is [`Target::Unknown`].
const VERSIONS: [&str; 3] = ["v9.0", "v9.1", "v9.2"];

/// The namespace of Dataverse's functions and actions, as written before a qualified name.
const CRM_NAMESPACE: &str = "Microsoft.Dynamics.CRM.";

/// Metadata entity sets whose names are PascalCase (they would otherwise read as operations).
const PASCAL_CASE_ENTITY_SETS: [&str; 4] = [
    "EntityDefinitions",
    "RelationshipDefinitions",
    "GlobalOptionSetDefinitions",
    "ManagedPropertyDefinitions",
];

/// Rounds of percent-decoding applied when looking for a hidden `$batch`, as in
/// `request_target` (which refuses paths still changing after that many).
const DECODE_ROUNDS: usize = 4;

/// What a request path addresses, as far as the access rules are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An entity set (`accounts`), with any key, navigation or bound operation after it.
    EntitySet(String),
    /// `$batch`: the envelope; its parts are decided one by one as the body streams.
    Batch,
    /// An unbound function or action, by its name without namespace (`WhoAmI`).
    Function(String),
    /// `$metadata`.
    Metadata,
    /// The service document at `/api/data/v9.x/`.
    ServiceRoot,
    /// Not a recognised Web API target.
    Unknown,
}

impl Target {
    /// Reads the target from a URL path starting `/api/data/` (a query or fragment, if
    /// present, is ignored).
    pub fn from_path(path: &str) -> Target {
        // `split` always yields a first item; the fallback is never taken.
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let Some(rest) = path.strip_prefix(API_PREFIX) else {
            return Target::Unknown;
        };
        // Checked before anything else: a batch hidden in a path that is otherwise
        // unrecognised must still need a batch grant, not just `"*"`.
        if rest.split('/').any(names_batch) {
            return Target::Batch;
        }
        let mut segments = rest.split('/');
        if !is_version(segments.next().unwrap_or_default()) {
            return Target::Unknown;
        }
        let segments: Vec<&str> = segments.collect();
        let (first, after) = match segments.as_slice() {
            [] | [""] => return Target::ServiceRoot,
            [first, after @ ..] => (*first, after),
        };
        // Something downstream could normalise these into a different target than the one
        // checked here (`request_target` refuses them too; this keeps the module safe alone).
        if after
            .iter()
            .any(|s| matches!(decode(s).as_deref(), None | Some("" | "." | "..")))
        {
            return Target::Unknown;
        }
        let Some(first) = decode(first) else {
            return Target::Unknown;
        };
        // Still encoded after one decoding: Dataverse would see the `%`, not the name.
        if first.contains('%') {
            return Target::Unknown;
        }
        if first.starts_with('$') {
            return if first.eq_ignore_ascii_case("$metadata") && after.is_empty() {
                Target::Metadata
            } else {
                Target::Unknown
            };
        }
        classify_resource(&first)
    }
}

/// A Web API version segment Dataverse answers (`v9.2`, `V9.1`, `v9%2E0`).
fn is_version(segment: &str) -> bool {
    decode(segment).is_some_and(|v| VERSIONS.iter().any(|k| k.eq_ignore_ascii_case(&v)))
}

/// What follows `/api/data/<version>/` in `path`, read as [`Target::from_path`] reads the
/// prefix and version; `None` when `path` does not start so.
pub(crate) fn after_api_version(path: &str) -> Option<&str> {
    let (version, rest) = path.strip_prefix(API_PREFIX)?.split_once('/')?;
    is_version(version).then_some(rest)
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Names are OData identifiers (checked in `classify_resource`), so safe to echo.
            Target::EntitySet(name) | Target::Function(name) => f.write_str(name),
            Target::Batch => f.write_str("$batch"),
            Target::Metadata => f.write_str("$metadata"),
            Target::ServiceRoot => f.write_str("the service root"),
            Target::Unknown => f.write_str("an unrecognised path"),
        }
    }
}

/// The first resource segment: `name`, `name(...)`, or `Microsoft.Dynamics.CRM.name(...)`.
fn classify_resource(segment: &str) -> Target {
    let (name, parameters) = match segment.split_once('(') {
        Some((name, rest)) => (name, Some(rest)),
        None => (segment, None),
    };
    let (qualified, name) = match strip_prefix_ignore_case(name, CRM_NAMESPACE) {
        Some(unqualified) => (true, unqualified),
        None => (false, name),
    };
    if !is_identifier(name) {
        return Target::Unknown;
    }
    let empty_call = parameters == Some(")");
    let pascal_case = name.bytes().any(|b| b.is_ascii_uppercase())
        && !PASCAL_CASE_ENTITY_SETS
            .iter()
            .any(|set| set.eq_ignore_ascii_case(name));
    if qualified || empty_call || pascal_case {
        Target::Function(name.to_string())
    } else {
        Target::EntitySet(name.to_string())
    }
}

/// An OData simple identifier, restricted to ASCII (Dataverse's names are).
pub(crate) fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `Some(rest)` when `text` starts with `prefix`, ignoring ASCII case.
pub(crate) fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        text.get(prefix.len()..)
    } else {
        None
    }
}

/// One round of percent-decoding; `None` when the result is not UTF-8.
fn decode(segment: &str) -> Option<Cow<'_, str>> {
    percent_decode_str(segment).decode_utf8().ok()
}

/// True when the segment starts with `$batch` as written or after any of the first few
/// rounds of percent-decoding, in any case.
fn names_batch(segment: &str) -> bool {
    let mut current: Cow<'_, str> = Cow::Borrowed(segment);
    for _ in 0..DECODE_ROUNDS {
        if strip_prefix_ignore_case(&current, "$batch").is_some() {
            return true;
        }
        let decoded = percent_decode_str(&current)
            .decode_utf8_lossy()
            .into_owned();
        if decoded == current {
            return false;
        }
        current = Cow::Owned(decoded);
    }
    strip_prefix_ignore_case(&current, "$batch").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(path: &str) -> Target {
        Target::from_path(path)
    }

    fn set(name: &str) -> Target {
        Target::EntitySet(name.into())
    }

    fn function(name: &str) -> Target {
        Target::Function(name.into())
    }

    const ID: &str = "00000000-0000-0000-0000-000000000001";

    #[test]
    fn entity_set_collection_and_single_record() {
        assert_eq!(target("/api/data/v9.2/accounts"), set("accounts"));
        assert_eq!(
            target(&format!("/api/data/v9.2/accounts({ID})")),
            set("accounts")
        );
        assert_eq!(target("/api/data/v9.2/accounts/$count"), set("accounts"));
        assert_eq!(
            target("/api/data/v9.2/accounts?$select=name&$filter=name eq 'x'"),
            set("accounts")
        );
    }

    #[test]
    fn alternate_keys_count_as_the_entity_set() {
        assert_eq!(
            target("/api/data/v9.2/accounts(accountnumber='ABC')"),
            set("accounts")
        );
        assert_eq!(
            target("/api/data/v9.2/contacts(firstname='Jo',lastname='O''Neil')"),
            set("contacts")
        );
        // A slash inside a key value splits the path; the entity set is still the first.
        assert_eq!(
            target("/api/data/v9.2/accounts(name='a/b')"),
            set("accounts")
        );
    }

    #[test]
    fn navigation_counts_only_the_first_segment() {
        assert_eq!(
            target(&format!(
                "/api/data/v9.2/accounts({ID})/contact_customer_accounts"
            )),
            set("accounts")
        );
        assert_eq!(
            target(&format!(
                "/api/data/v9.2/accounts({ID})/primarycontactid/$ref"
            )),
            set("accounts")
        );
        assert_eq!(
            target(&format!("/api/data/v9.2/accounts({ID})/name/$value")),
            set("accounts")
        );
    }

    #[test]
    fn bound_operations_count_as_their_entity_set() {
        assert_eq!(
            target(&format!(
                "/api/data/v9.2/accounts({ID})/Microsoft.Dynamics.CRM.Foo"
            )),
            set("accounts")
        );
        assert_eq!(
            target("/api/data/v9.2/accounts/Microsoft.Dynamics.CRM.Bar()"),
            set("accounts")
        );
    }

    #[test]
    fn unbound_functions_and_actions_are_named_pseudo_entity_sets() {
        assert_eq!(target("/api/data/v9.2/WhoAmI()"), function("WhoAmI"));
        assert_eq!(target("/api/data/v9.2/WhoAmI"), function("WhoAmI"));
        assert_eq!(
            target("/api/data/v9.2/RetrieveVersion()"),
            function("RetrieveVersion")
        );
        assert_eq!(
            target("/api/data/v9.2/Microsoft.Dynamics.CRM.WinOpportunity"),
            function("WinOpportunity")
        );
        assert_eq!(
            target("/api/data/v9.2/microsoft.dynamics.crm.whoami()"),
            function("whoami")
        );
        assert_eq!(
            target("/api/data/v9.2/RetrieveTotalRecordCount(EntityNames=@p1)?@p1=['account']"),
            function("RetrieveTotalRecordCount")
        );
        // A custom API: publisher prefix, PascalCase name.
        assert_eq!(
            target("/api/data/v9.2/sample_CustomUnboundFunction()"),
            function("sample_CustomUnboundFunction")
        );
        // Another namespace is not Dataverse's: unrecognised.
        assert_eq!(
            target("/api/data/v9.2/Other.Namespace.Foo()"),
            Target::Unknown
        );
    }

    #[test]
    fn pascal_case_metadata_entity_sets_are_entity_sets() {
        assert_eq!(
            target("/api/data/v9.2/EntityDefinitions(LogicalName='account')/Attributes"),
            set("EntityDefinitions")
        );
    }

    #[test]
    fn batch_in_any_spelling_is_batch() {
        assert_eq!(target("/api/data/v9.2/$batch"), Target::Batch);
        assert_eq!(target("/api/data/v9.1/$BATCH"), Target::Batch);
        assert_eq!(target("/api/data/v9.2/%24batch"), Target::Batch);
        assert_eq!(target("/api/data/v9.2/%2524batch"), Target::Batch);
        assert_eq!(target("/api/data/v9.2/$batch/"), Target::Batch);
        // Even where Dataverse would not answer it: a batch grant is what it takes.
        assert_eq!(target("/api/data/$batch"), Target::Batch);
        assert_eq!(target("/api/data/v9.2/accounts/$batch"), Target::Batch);
    }

    #[test]
    fn metadata_and_service_root() {
        assert_eq!(target("/api/data/v9.2/$metadata"), Target::Metadata);
        assert_eq!(target("/api/data/v9.2/$METADATA"), Target::Metadata);
        assert_eq!(target("/api/data/v9.2/$metadata/x"), Target::Unknown);
        assert_eq!(target("/api/data/v9.2/"), Target::ServiceRoot);
        assert_eq!(target("/api/data/v9.2"), Target::ServiceRoot);
        assert_eq!(target("/api/data/v9.0/"), Target::ServiceRoot);
    }

    #[test]
    fn versions_other_than_nine_are_unknown() {
        assert_eq!(target("/api/data/v9.0/accounts"), set("accounts"));
        assert_eq!(target("/api/data/v9.1/accounts"), set("accounts"));
        assert_eq!(target("/api/data/V9.2/accounts"), set("accounts"));
        assert_eq!(target("/api/data/v8.2/accounts"), Target::Unknown);
        assert_eq!(target("/api/data/accounts"), Target::Unknown);
        assert_eq!(target("/api/data/"), Target::Unknown);
        assert_eq!(target("/api/data"), Target::Unknown);
        assert_eq!(
            target("/XRMServices/2011/Organization.svc"),
            Target::Unknown
        );
        assert_eq!(target(""), Target::Unknown);
    }

    #[test]
    fn percent_encoded_names_are_decoded_once() {
        assert_eq!(target("/api/data/v9.2/account%73"), set("accounts"));
        assert_eq!(target("/api/data/v9%2E2/accounts"), set("accounts"));
        // Double encoding is not what Dataverse would read as a name.
        assert_eq!(target("/api/data/v9.2/account%2573"), Target::Unknown);
        // Not UTF-8 after decoding.
        assert_eq!(target("/api/data/v9.2/%FFaccounts"), Target::Unknown);
        // An encoded slash does not split the segment, and is no identifier character.
        assert_eq!(
            target("/api/data/v9.2/accounts%2Fcontacts"),
            Target::Unknown
        );
    }

    #[test]
    fn odd_shapes_are_unknown() {
        for path in [
            "/api/data/v9.2/$entity",
            "/api/data/v9.2/$crossjoin(accounts,contacts)",
            "/api/data/v9.2/accounts;x=1",
            "/api/data/v9.2/accounts)",
            "/api/data/v9.2/(accounts)",
            "/api/data/v9.2/9accounts",
            "/api/data/v9.2//accounts",
            "/api/data/v9.2/accounts//x",
            "/api/data/v9.2/accounts/../contacts",
            "/api/data/v9.2/accounts/./x",
            "/api/data/v9.2/accounts/%2E%2E/contacts",
            "/api/data/v9.2/accounts/",
            "/api/data/v9.2/accoünts",
        ] {
            assert_eq!(target(path), Target::Unknown, "{path}");
        }
    }

    #[test]
    fn display_names_the_target_without_echoing_unknown_paths() {
        assert_eq!(set("contacts").to_string(), "contacts");
        assert_eq!(Target::Batch.to_string(), "$batch");
        assert_eq!(Target::Unknown.to_string(), "an unrecognised path");
    }

    #[test]
    fn any_input_is_total() {
        // A cheap stand-in for a fuzzer: odd bytes never panic and never produce a name
        // that is not an identifier.
        let pieces = [
            "/api/data/",
            "v9.2",
            "/",
            "$batch",
            "%",
            "%2",
            "%24",
            "(",
            ")",
            "'",
            "accounts",
            "Microsoft.Dynamics.CRM.",
            "é",
            "?",
            "#",
            "..",
            "%FF",
            "",
        ];
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    let path = format!("{a}{b}{c}");
                    if let Target::EntitySet(n) | Target::Function(n) = Target::from_path(&path) {
                        assert!(is_identifier(&n), "{path} -> {n}");
                    }
                }
            }
        }
    }
}
