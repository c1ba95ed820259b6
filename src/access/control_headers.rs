//! Dataverse control headers as policy. Some `MSCRM.*` request headers only say how an
//! operation should behave and change no security property: `MSCRM.SolutionUniqueName`
//! (which solution new components land in), `MSCRM.SuppressDuplicateDetection` (`false`
//! turns detection on), `MSCRM.MergeLabels` (labels merged rather than replaced) and
//! `MSCRM.tag` (a value handed to plug-ins as a shared variable); Microsoft documents each
//! as an optional parameter of the operation. Those pass by default: dropping them would
//! make the call succeed while doing something else than asked. Every other control header
//! (the bypass family `MSCRM.BypassCustomPluginExecution`, `MSCRM.BypassBusinessLogicExecution`,
//! `MSCRM.BypassBusinessLogicExecutionStepIds`, `MSCRM.SuppressCallbackRegistrationExpanderJob`,
//! and whatever Microsoft adds next) is refused unless the grant names it: the caller learns
//! which header to remove instead of getting a call that silently ran differently.
//!
//! Matching is by prefix rather than a list of known names so that a header Dataverse
//! introduces later is refused until someone decides to allow it. The `MSCRM_` and
//! `MSCRM-` spellings are control headers too (no legitimate header uses them and some
//! servers treat `_`, `-` and `.` alike), never harmless: only the dotted names are.
//! Impersonation headers (`MSCRMCallerID`, `CallerObjectId`) are not control headers:
//! `upstream::headers` always removes those, whatever the grant.
//!
//! Headers inside `$batch` parts are decided by the same [`decide_control_header`], called
//! by the `$batch` part checks in `upstream::batch_parts`.

use http::header::HeaderName;
use http::HeaderMap;

use super::Grant;

/// Control headers that change how an operation behaves but grant nothing (lowercase,
/// dotted spelling only): they pass without a grant.
pub const HARMLESS_CONTROL_HEADERS: [&str; 4] = [
    "mscrm.solutionuniquename",
    "mscrm.suppressduplicatedetection",
    "mscrm.mergelabels",
    "mscrm.tag",
];

/// True for a header whose name makes it a Dataverse control header (`mscrm.` and its
/// `_`/`-` spellings, any case). `HeaderName`s are already lowercase.
pub fn is_control_header(name: &HeaderName) -> bool {
    // `MSCRM-CallerID` and the like are impersonation headers, not control headers: the
    // identity stage removes them and puts its own in their place.
    let text = name.as_str();
    let bytes = text.as_bytes();
    bytes.len() > 6
        && bytes.starts_with(b"mscrm")
        && matches!(bytes[5], b'.' | b'_' | b'-')
        && !names_impersonation(text)
}

/// What becomes of one request header under a grant, at top level and in `$batch` parts alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlHeaderDecision {
    /// Not a control header, a harmless one, or one the grant allows: sent on.
    Pass,
    /// A control header that is not harmless and that the grant does not allow: the
    /// request is refused.
    Refuse,
}

/// The one rule for control headers: harmless ones and those the grant names pass, all
/// others are refused.
pub fn decide_control_header(name: &HeaderName, grant: &Grant) -> ControlHeaderDecision {
    if is_control_header(name)
        && !HARMLESS_CONTROL_HEADERS.contains(&name.as_str())
        && !grant.control_headers.contains(name)
    {
        ControlHeaderDecision::Refuse
    } else {
        ControlHeaderDecision::Pass
    }
}

/// A request carried a control header its grant does not allow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the header `{header}` changes how Dataverse enforces business logic and no access rule grants it to this caller (access rule `{rule}`); remove the header, or have the rule list it under control_headers")]
pub struct ControlHeaderRefused {
    /// The header's name as the gateway read it (lowercase).
    pub header: String,
    /// The rule whose grant was applied.
    pub rule: String,
}

/// Refuses the request when any header is a control header the grant does not allow;
/// names the first such header.
pub fn check_control_headers(
    headers: &HeaderMap,
    grant: &Grant,
) -> Result<(), ControlHeaderRefused> {
    match headers
        .keys()
        .find(|name| decide_control_header(name, grant) == ControlHeaderDecision::Refuse)
    {
        Some(name) => Err(ControlHeaderRefused {
            header: name.as_str().to_owned(),
            rule: grant.rule.to_string(),
        }),
        None => Ok(()),
    }
}

/// Removes every control header the grant refuses; returns how many distinct header
/// names were removed. The gateway refuses such requests ([`check_control_headers`]);
/// this is the same decision, which the tests read as the headers left.
#[cfg(test)]
pub(crate) fn strip_control_headers(headers: &mut HeaderMap, grant: &Grant) -> usize {
    let refused: Vec<HeaderName> = headers
        .keys()
        .filter(|name| decide_control_header(name, grant) == ControlHeaderDecision::Refuse)
        .cloned()
        .collect();
    for name in &refused {
        headers.remove(name);
    }
    refused.len()
}

/// True when a name, read without punctuation and case, is one of Dataverse's
/// impersonation headers: those are never a rule's to allow.
pub(crate) fn names_impersonation(name: &str) -> bool {
    let squeezed: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    matches!(
        squeezed.as_str(),
        "mscrmcallerid" | "mscrmcallerobjectid" | "callerobjectid"
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::HeaderValue;

    use super::*;
    use crate::access::ImpersonationPolicy;

    fn grant(allowed: &[&str]) -> Grant {
        Grant {
            rule: Arc::from("test"),
            impersonation: ImpersonationPolicy::Required,
            control_headers: allowed
                .iter()
                .map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap())
                .collect(),
        }
    }

    fn headers(names: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for name in names {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("true"),
            );
        }
        map
    }

    #[test]
    fn bypass_and_unknown_control_headers_are_refused_unless_allowed() {
        for name in [
            "MSCRM.BypassCustomPluginExecution",
            "MSCRM.BypassBusinessLogicExecution",
            "MSCRM.BypassBusinessLogicExecutionStepIds",
            "MSCRM.SuppressCallbackRegistrationExpanderJob",
            "mscrm.somethingnew",
            "MSCRM_BypassCustomPluginExecution",
            "MSCRM-BypassCustomPluginExecution",
            "MSCRM_SolutionUniqueName",
            "MSCRM-tag",
        ] {
            let map = headers(&["Prefer", "MSCRM.SolutionUniqueName", name]);
            let refused = check_control_headers(&map, &grant(&[])).unwrap_err();
            assert_eq!(refused.header, name.to_ascii_lowercase());
            assert!(refused.to_string().contains(&name.to_ascii_lowercase()));
        }
        let mut map = headers(&["MSCRM.BypassBusinessLogicExecution", "MSCRM.MergeLabels"]);
        assert_eq!(strip_control_headers(&mut map, &grant(&[])), 1);
        assert!(map.contains_key("mscrm.mergelabels"));
    }

    #[test]
    fn harmless_control_headers_pass_without_a_grant() {
        let map = headers(&[
            "MSCRM.SolutionUniqueName",
            "MSCRM.SuppressDuplicateDetection",
            "mscrm.mergelabels",
            "MSCRM.tag",
        ]);
        assert_eq!(check_control_headers(&map, &grant(&[])), Ok(()));
    }

    #[test]
    fn allowed_control_headers_pass_in_any_case() {
        let mut map = headers(&[
            "mscrm.bypasscustompluginexecution",
            "MSCRM.SuppressDuplicateDetection",
            "MSCRM.BypassBusinessLogicExecution",
        ]);
        let grant = grant(&[
            "MSCRM.BypassCustomPluginExecution",
            "mscrm.suppressduplicatedetection",
        ]);
        assert_eq!(
            check_control_headers(&map, &grant).unwrap_err().header,
            "mscrm.bypassbusinesslogicexecution"
        );
        assert_eq!(strip_control_headers(&mut map, &grant), 1);
        assert!(map.contains_key("MSCRM.BypassCustomPluginExecution"));
        assert!(map.contains_key("MSCRM.SuppressDuplicateDetection"));
        assert!(!map.contains_key("MSCRM.BypassBusinessLogicExecution"));
    }

    #[test]
    fn allowing_the_dotted_name_does_not_allow_other_spellings() {
        let map = headers(&["MSCRM_BypassCustomPluginExecution"]);
        let grant = grant(&["MSCRM.BypassCustomPluginExecution"]);
        assert!(check_control_headers(&map, &grant).is_err());
    }

    #[test]
    fn repeated_values_go_with_their_name() {
        let mut map = headers(&["MSCRM.Bypassnew", "MSCRM.Bypassnew"]);
        assert_eq!(strip_control_headers(&mut map, &grant(&[])), 1);
        assert!(map.is_empty());
    }

    #[test]
    fn other_headers_are_untouched() {
        let names = [
            "accept",
            "prefer",
            "if-match",
            "odata-version",
            "mscrmcallerid",
            "mscrm",
            "mscrm.",
            "x-mscrm.bypasscustompluginexecution",
            "content-type",
        ];
        let mut map = headers(&names);
        let before = map.clone();
        assert_eq!(check_control_headers(&map, &grant(&[])), Ok(()));
        assert_eq!(strip_control_headers(&mut map, &grant(&[])), 0);
        assert_eq!(map, before);
    }

    #[test]
    fn impersonation_names_are_recognised_in_any_spelling() {
        for name in [
            "MSCRMCallerID",
            "MSCRM.CallerID",
            "mscrm_callerid",
            "MSCRM.CallerObjectId",
            "CallerObjectId",
        ] {
            assert!(names_impersonation(name), "{name}");
        }
        assert!(!names_impersonation("MSCRM.BypassCustomPluginExecution"));
    }
}
