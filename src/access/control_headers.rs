//! Dataverse control headers as policy: every `MSCRM.*` request header changes how
//! Dataverse runs the operation (`MSCRM.BypassCustomPluginExecution`,
//! `MSCRM.BypassBusinessLogicExecution`, `MSCRM.BypassBusinessLogicExecutionStepIds`,
//! `MSCRM.SuppressCallbackRegistrationExpanderJob`, `MSCRM.SuppressDuplicateDetection`,
//! `MSCRM.SolutionUniqueName`, `MSCRM.MergeLabels`, `MSCRM.tag`, and whatever Microsoft adds
//! next), so each is dropped unless the grant names it.
//!
//! Matching is by prefix rather than a list of known names so that a header Dataverse
//! introduces later is held back until someone decides to allow it. The `MSCRM_` and
//! `MSCRM-` spellings are dropped too: no legitimate header uses them and some servers
//! treat `_`, `-` and `.` alike. Impersonation headers (`MSCRMCallerID`, `CallerObjectId`)
//! are not control headers: `upstream::headers` always removes those, whatever the grant.
//!
//! Headers inside `$batch` parts are decided by the same [`decide_control_header`], called
//! by the `$batch` part checks in `upstream::odata_links`.

use http::header::HeaderName;
use http::HeaderMap;

use super::Grant;

/// True for a header whose name makes it a Dataverse control header (`mscrm.` and its
/// `_`/`-` spellings, any case). `HeaderName`s are already lowercase.
pub fn is_control_header(name: &HeaderName) -> bool {
    let name = name.as_str().as_bytes();
    name.len() > 6 && name.starts_with(b"mscrm") && matches!(name[5], b'.' | b'_' | b'-')
}

/// What becomes of one request header under a grant, at top level and in `$batch` parts alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlHeaderDecision {
    /// Not a control header, or one the grant allows: sent on.
    Pass,
    /// A control header the grant does not allow: not sent.
    Drop,
}

/// The one rule for control headers: those the grant names pass, all others are dropped.
pub fn decide_control_header(name: &HeaderName, grant: &Grant) -> ControlHeaderDecision {
    if is_control_header(name) && !grant.control_headers.contains(name) {
        ControlHeaderDecision::Drop
    } else {
        ControlHeaderDecision::Pass
    }
}

/// Removes every control header the grant does not allow; returns how many distinct header
/// names were dropped (worth a log line: the caller asked for something it may not have).
/// Other headers are untouched.
pub fn strip_control_headers(headers: &mut HeaderMap, grant: &Grant) -> usize {
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|name| decide_control_header(name, grant) == ControlHeaderDecision::Drop)
        .cloned()
        .collect();
    for name in &dropped {
        headers.remove(name);
    }
    dropped.len()
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
    fn control_headers_are_dropped_unless_allowed() {
        let mut map = headers(&[
            "MSCRM.BypassCustomPluginExecution",
            "MSCRM.BypassBusinessLogicExecution",
            "MSCRM.SuppressCallbackRegistrationExpanderJob",
            "MSCRM.SuppressDuplicateDetection",
            "mscrm.somethingnew",
            "MSCRM_BypassCustomPluginExecution",
            "MSCRM-BypassCustomPluginExecution",
        ]);
        assert_eq!(strip_control_headers(&mut map, &grant(&[])), 7);
        assert!(map.is_empty());
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
        assert_eq!(strip_control_headers(&mut map, &grant), 1);
        assert!(map.contains_key("MSCRM.BypassCustomPluginExecution"));
        assert!(map.contains_key("MSCRM.SuppressDuplicateDetection"));
        assert!(!map.contains_key("MSCRM.BypassBusinessLogicExecution"));
    }

    #[test]
    fn allowing_the_dotted_name_does_not_allow_other_spellings() {
        let mut map = headers(&["MSCRM_BypassCustomPluginExecution"]);
        let grant = grant(&["MSCRM.BypassCustomPluginExecution"]);
        assert_eq!(strip_control_headers(&mut map, &grant), 1);
        assert!(map.is_empty());
    }

    #[test]
    fn repeated_values_go_with_their_name() {
        let mut map = headers(&["MSCRM.tag", "MSCRM.tag"]);
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
