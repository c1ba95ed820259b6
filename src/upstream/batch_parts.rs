//! The rules every `$batch` part meets on its way to Dataverse, so a part cannot do what a
//! top-level request may not: choose whom it runs as or with which credential
//! ([`caller_only_header`]), carry a control header its grant does not allow
//! ([`decide_control_header`], the top-level rule: the whole batch is refused), or name another host or a path outside
//! `/api/data/` ([`PartRules::target`]). The streaming parser in `odata_links` calls these
//! per line; parts that declare a `Content-Length` are held (bounded) so the length can be
//! fixed after rewriting ([`Hold`]).

use std::fmt;
use std::ops::Range;

use http::HeaderName;

use super::headers::{caller_only_header, CallerOnlyHeader};
use crate::access::{
    decide_control_header, BatchPart, BodyInspector, ControlHeaderDecision, Grant,
};
use crate::request_target::{has_scheme, split_origin, PartTarget, PartTargetError, PathError};

/// Longest `Content-ID` quoted back in an error.
const MAX_SHOWN: usize = 64;

/// What the request's own checks decided for every part of its `$batch` body.
#[derive(Clone, Debug)]
pub struct PartRules {
    /// The request's grant: which control headers may pass, in parts as at top level.
    grant: Grant,
    /// The batch boundary, from the request's `Content-Type`.
    boundary: Vec<u8>,
    /// Most bytes of one part held to fix its `Content-Length` (`server.max_batch_part`).
    max_held: usize,
    /// Each part decided by the access rules as a request of its own.
    access: Option<BatchPart>,
    /// The organisation's other origins (`url_aliases`): parts may name them too.
    aliases: Vec<String>,
}

impl PartRules {
    pub fn new(grant: Grant, boundary: Vec<u8>, max_held: usize) -> Self {
        Self {
            grant,
            boundary,
            max_held,
            access: None,
            aliases: Vec::new(),
        }
    }

    /// Accepts part URLs and `Host` values naming the organisation's other origins; they
    /// reach Dataverse naming its configured origin.
    pub(crate) fn with_aliases(mut self, aliases: &[String]) -> Self {
        self.aliases = aliases.to_vec();
        self
    }

    fn is_alias(&self, origin: &str) -> bool {
        self.aliases.iter().any(|a| a.eq_ignore_ascii_case(origin))
    }

    /// Has every part's method, URL and body decided by the access rules.
    pub fn with_access(mut self, access: Option<BatchPart>) -> Self {
        self.access = access;
        self
    }

    /// Decides a part's request line; returns the access checks of its body, if any.
    pub(super) fn decide(
        &mut self,
        method: &[u8],
        target: &PartTarget<'_>,
        part: &PartName,
    ) -> Result<Option<BodyInspector>, BatchRefusal> {
        let Some(access) = self.access.as_mut() else {
            return Ok(None);
        };
        access
            .decide(method, target, part.content_id.as_deref())
            .map_err(|denied| BatchRefusal::PartAccess {
                part: part.clone(),
                denied,
            })
    }

    pub(super) fn boundary(&self) -> &[u8] {
        &self.boundary
    }

    pub(super) fn max_held(&self) -> usize {
        self.max_held
    }

    /// A part's (MIME or HTTP) header name: refused (a caller-only header, or a control
    /// header the grant does not allow) or sent on.
    pub(super) fn header(&self, name: &[u8], part: &PartName) -> Result<(), BatchRefusal> {
        let text = String::from_utf8_lossy(name);
        if let Some(kind) = caller_only_header(&text) {
            return Err(BatchRefusal::CallerOnlyHeader {
                part: part.clone(),
                header: shown(name),
                kind,
            });
        }
        let Ok(parsed) = HeaderName::from_bytes(name.trim_ascii()) else {
            return Err(BatchRefusal::Malformed {
                part: part.clone(),
                what: "a header name that is not an HTTP token",
            });
        };
        match decide_control_header(&parsed, &self.grant) {
            ControlHeaderDecision::Pass => Ok(()),
            ControlHeaderDecision::Refuse => Err(BatchRefusal::ControlHeader {
                part: part.clone(),
                header: shown(name.trim_ascii()),
                rule: self.grant.rule.to_string(),
            }),
        }
    }

    /// Checks a part's request target; returns the target to send when it changes (the
    /// gateway's own base replaced by the Dataverse origin), and the path and query parsed
    /// for the access rules.
    pub(super) fn target<'t>(
        &self,
        target: &'t [u8],
        gateway_base: &str,
        dataverse_origin: &str,
        part: &PartName,
    ) -> Result<(Option<Vec<u8>>, PartTarget<'t>), BatchRefusal> {
        let refused = |problem: TargetProblem| BatchRefusal::Target {
            part: part.clone(),
            target: shown(target),
            problem,
        };
        let text = std::str::from_utf8(target).map_err(|_| refused(TargetProblem::NotUtf8))?;
        // A request target never has a fragment (RFC 9112 3.2), and readers disagree on
        // where one starts: `http://host#/api/data/...` is the service root to RFC 3986 and
        // a path to a reader that looks for the first `/`.
        if text.contains('#') {
            return Err(refused(TargetProblem::Fragment));
        }
        let (rewritten, path) = if has_scheme(text) {
            let (origin, rest) = split_origin(text).ok_or(refused(TargetProblem::OtherHost))?;
            let (gw_origin, gw_path) = split_origin(gateway_base).unwrap_or((gateway_base, ""));
            if origin.eq_ignore_ascii_case(gw_origin) {
                let after = rest
                    .strip_prefix(gw_path)
                    .filter(|a| a.is_empty() || a.starts_with(['/', '?']))
                    .ok_or(refused(TargetProblem::Path(PathError::NotProxied)))?;
                (
                    Some(format!("{dataverse_origin}{after}").into_bytes()),
                    after,
                )
            } else if origin.eq_ignore_ascii_case(dataverse_origin) {
                (None, rest)
            } else if self.is_alias(origin) {
                (Some(format!("{dataverse_origin}{rest}").into_bytes()), rest)
            } else {
                return Err(refused(TargetProblem::OtherHost));
            }
        } else {
            (None, text)
        };
        let parsed = PartTarget::parse(path).map_err(|e| {
            refused(match e {
                PartTargetError::Path(e) => TargetProblem::Path(e),
                PartTargetError::NestedBatch => TargetProblem::NestedBatch,
            })
        })?;
        Ok((rewritten, parsed))
    }

    /// A part's `Host` value: the gateway's host becomes Dataverse's, Dataverse's stays,
    /// any other is refused.
    pub(super) fn host(
        &self,
        value: &[u8],
        gateway_base: &str,
        dataverse_origin: &str,
        part: &PartName,
    ) -> Result<Option<Vec<u8>>, BatchRefusal> {
        let value = value.trim_ascii();
        let authority = |base: &str| {
            split_origin(base)
                .and_then(|(origin, _)| origin.split_once("://"))
                .map(|(_, a)| a.to_owned())
        };
        let dataverse = authority(dataverse_origin).unwrap_or_default();
        let alias = self
            .aliases
            .iter()
            .any(|a| authority(a).is_some_and(|a| value.eq_ignore_ascii_case(a.as_bytes())));
        if alias
            || authority(gateway_base).is_some_and(|a| value.eq_ignore_ascii_case(a.as_bytes()))
        {
            Ok(Some(dataverse.into_bytes()))
        } else if value.eq_ignore_ascii_case(dataverse.as_bytes()) {
            Ok(None)
        } else {
            Err(BatchRefusal::Target {
                part: part.clone(),
                target: shown(value),
                problem: TargetProblem::OtherHost,
            })
        }
    }
}

/// Caller bytes for an error message: lossy UTF-8, control characters replaced, cut short.
fn shown(bytes: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    match text.char_indices().nth(MAX_SHOWN) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
    }
}

/// The `boundary` of a `multipart/mixed` Content-Type (RFC 2045 parameter syntax, quoted or
/// not), or None when the type is another, the boundary is missing, empty, longer than 200
/// bytes, or given twice (two readers could pick different ones).
pub(crate) fn multipart_mixed_boundary(content_type: &[u8]) -> Option<Vec<u8>> {
    let mut rest = content_type.trim_ascii_start();
    let (mime, params) = match rest.iter().position(|&b| b == b';') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    if !mime.trim_ascii().eq_ignore_ascii_case(b"multipart/mixed") {
        return None;
    }
    rest = params;
    let mut boundary = None;
    loop {
        rest = rest.trim_ascii_start();
        if rest.is_empty() {
            break;
        }
        let eq = rest.iter().position(|&b| b == b'=')?;
        let name = rest[..eq].trim_ascii();
        rest = rest[eq + 1..].trim_ascii_start();
        let value = if let Some(quoted) = rest.strip_prefix(b"\"") {
            let mut value = Vec::new();
            let mut i = 0;
            loop {
                match quoted.get(i)? {
                    b'"' => break,
                    // A boundary never needs a quoted-pair (RFC 2046 5.1.1): one that has
                    // one could be unescaped differently by the next reader.
                    b'\\' => return None,
                    &b => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
            rest = &quoted[i + 1..];
            value
        } else {
            let end = rest
                .iter()
                .position(|&b| b == b';' || b.is_ascii_whitespace())
                .unwrap_or(rest.len());
            let value = rest[..end].to_vec();
            rest = &rest[end..];
            value
        };
        rest = rest.trim_ascii_start();
        if let Some(after) = rest.strip_prefix(b";") {
            rest = after;
        } else if !rest.is_empty() {
            return None;
        }
        // `boundary*` (RFC 2231) is a second way to name the boundary: a reader that
        // prefers it would split the body differently.
        let extended = name.len() > 8 && name[..9].eq_ignore_ascii_case(b"boundary*");
        if extended {
            return None;
        }
        if name.eq_ignore_ascii_case(b"boundary") {
            if boundary.is_some() {
                return None;
            }
            boundary = Some(value);
        }
    }
    boundary.filter(|b| !b.is_empty() && b.len() <= 200)
}

/// A part as the caller can find it in its batch: 1-based position in the body (change
/// set parts counted too) and its `Content-ID`, when it has one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartName {
    pub position: usize,
    pub content_id: Option<String>,
}

impl PartName {
    pub(super) fn set_content_id(&mut self, value: &[u8]) {
        self.content_id = Some(shown(value.trim_ascii()));
    }
}

impl fmt::Display for PartName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "part {}", self.position)?;
        if let Some(id) = &self.content_id {
            write!(f, " (Content-ID {id})")?;
        }
        Ok(())
    }
}

/// What is wrong with a part's request target.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetProblem {
    #[error("it names a host other than this gateway or its Dynamics organisation")]
    OtherHost,
    #[error(transparent)]
    Path(PathError),
    #[error("a $batch cannot contain another $batch")]
    NestedBatch,
    #[error("it is not UTF-8")]
    NotUtf8,
    #[error("it has a fragment (`#`), which a request target never carries; leave it out, or percent-encode a `#` that is data (`%23`)")]
    Fragment,
}

/// Why a `$batch` request is refused before Dataverse runs any of it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchRefusal {
    #[error("$batch {part} carries the header `{header}`; callers may not send {} in a batch part any more than at top level: remove it (the gateway sets who the request runs as)", kind_text(.kind))]
    CallerOnlyHeader {
        part: PartName,
        header: String,
        kind: CallerOnlyHeader,
    },
    #[error("$batch {part} carries the header `{header}`, which changes how Dataverse enforces business logic, and no access rule grants it to this caller (access rule `{rule}`); remove it from the part, or have the rule list it under control_headers")]
    ControlHeader {
        part: PartName,
        header: String,
        rule: String,
    },
    #[error("$batch {part} targets `{target}`, which is refused: {problem}; use this gateway's URLs under /api/data/")]
    Target {
        part: PartName,
        target: String,
        problem: TargetProblem,
    },
    #[error("$batch {part} is larger than {limit} bytes, the most the gateway holds of a part to fix its Content-Length (server.max_batch_part); send smaller parts or leave out their Content-Length")]
    PartTooLarge { part: PartName, limit: usize },
    #[error("$batch {part} has a Content-Length of {declared} bytes but {actual} bytes before the next delimiter; send the part's exact length")]
    LengthMismatch {
        part: PartName,
        declared: u64,
        actual: u64,
    },
    #[error("$batch {part}: {denied}")]
    PartAccess {
        part: PartName,
        denied: crate::access::AccessDenied,
    },
    #[error("the $batch body is malformed at {part}: {what}")]
    Malformed { part: PartName, what: &'static str },
    #[error("the $batch request needs a Content-Type of multipart/mixed with one plain boundary parameter (no boundary*, no backslash) and no Content-Encoding, so the gateway can check its parts")]
    NotMultipart,
}

fn kind_text(kind: &CallerOnlyHeader) -> &'static str {
    match kind {
        CallerOnlyHeader::Impersonation => "an impersonation header",
        CallerOnlyHeader::Credential => "credentials",
        CallerOnlyHeader::Cookie => "cookies",
        CallerOnlyHeader::MethodOverride => "a method override",
        CallerOnlyHeader::PathOverride => "a path override",
        CallerOnlyHeader::Encoding => {
            "a compressed body (Content-Encoding) the gateway cannot check"
        }
    }
}

impl BatchRefusal {
    /// Label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::PartTooLarge { .. } => "batch_part_too_large",
            Self::ControlHeader { .. } => "control_header_refused",
            Self::PartAccess { denied, .. } if denied.metadata_unavailable => {
                "metadata_unavailable"
            }
            Self::PartAccess { .. } => "access_denied",
            _ => "batch_refused",
        }
    }
}

/// A declared `Content-Length` inside a held part: where its digits are in the held
/// output, and what the caller declared.
#[derive(Clone, Debug)]
pub(super) struct LengthField {
    pub at: Range<usize>,
    pub declared: u64,
}

/// Where a length-counted region (a part's MIME content, or its inner HTTP body) starts,
/// in the held output and in the input.
#[derive(Clone, Copy, Debug)]
pub(super) struct Region {
    pub out_start: usize,
    pub in_start: u64,
}

/// One part being held: from its delimiter until its headers are checked, and, when it
/// declares a Content-Length (MIME or inner HTTP), until its end so the length can be fixed.
#[derive(Clone, Debug)]
pub(super) struct Hold {
    /// Index of the boundary whose delimiter opened the part.
    pub level: usize,
    /// Offset in the held output of the part's first byte after its delimiter line.
    pub start: usize,
    pub part: PartName,
    pub mime_length: Option<LengthField>,
    pub content: Option<Region>,
    pub http_length: Option<LengthField>,
    pub body: Option<Region>,
}

impl Hold {
    pub fn new(level: usize, start: usize, part: PartName) -> Self {
        Self {
            level,
            start,
            part,
            mime_length: None,
            content: None,
            http_length: None,
            body: None,
        }
    }

    pub(crate) fn has_length(&self) -> bool {
        self.mime_length.is_some() || self.http_length.is_some()
    }

    /// The held output before `n` was released: move every offset back.
    pub(crate) fn shift_back(&mut self, n: usize) {
        self.start -= n;
        for field in [&mut self.mime_length, &mut self.http_length]
            .into_iter()
            .flatten()
        {
            field.at = field.at.start - n..field.at.end - n;
        }
        for region in [&mut self.content, &mut self.body].into_iter().flatten() {
            region.out_start -= n;
        }
    }

    /// The part ended (its delimiter starts at input offset `end_in`, preceded by a line
    /// break of `eol` bytes that belongs to the delimiter): check each declared length
    /// against the input and write the rewritten one into `held`. Inner body first: its
    /// digits come after the MIME ones, so fixing them moves nothing recorded before.
    pub fn finish(&self, held: &mut Vec<u8>, end_in: u64, eol: usize) -> Result<(), BatchRefusal> {
        for (field, region) in [
            (&self.http_length, self.body),
            (&self.mime_length, self.content),
        ] {
            let Some(field) = field else { continue };
            let Some(region) = region else {
                return Err(BatchRefusal::Malformed {
                    part: self.part.clone(),
                    what: "the part ends inside its headers",
                });
            };
            let actual = end_in
                .saturating_sub(region.in_start)
                .saturating_sub(eol as u64);
            let out_len = held
                .len()
                .saturating_sub(region.out_start)
                .saturating_sub(eol);
            let region_out = &held[region.out_start..region.out_start + out_len];
            let trailing_breaks = region_out
                .iter()
                .rev()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count() as u64;
            // Tolerated: a length that leaves out trailing line breaks (they are unchanged).
            let gap = actual
                .checked_sub(field.declared)
                .filter(|g| *g <= trailing_breaks);
            let Some(gap) = gap else {
                return Err(BatchRefusal::LengthMismatch {
                    part: self.part.clone(),
                    declared: field.declared,
                    actual,
                });
            };
            let new = out_len as u64 - gap;
            if new != field.declared {
                held.splice(field.at.clone(), new.to_string().into_bytes());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::access::ImpersonationPolicy;

    fn rules(allowed: &[&str]) -> PartRules {
        let grant = Grant {
            rule: Arc::from("t"),
            impersonation: ImpersonationPolicy::Required,
            control_headers: allowed
                .iter()
                .map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap())
                .collect(),
        };
        PartRules::new(grant, b"b".to_vec(), 1024)
    }

    const GW: &str = "http://127.0.0.1:8080";
    const DV: &str = "https://contoso.crm.dynamics.com";

    fn target(t: &str) -> Result<Option<String>, BatchRefusal> {
        rules(&[])
            .target(t.as_bytes(), GW, DV, &PartName::default())
            .map(|(o, _)| o.map(|v| String::from_utf8(v).unwrap()))
    }

    #[test]
    fn part_targets_name_the_gateway_or_dataverse_and_stay_under_api_data() {
        assert_eq!(
            target("http://127.0.0.1:8080/api/data/v9.2/accounts?$top=1").unwrap(),
            Some(format!("{DV}/api/data/v9.2/accounts?$top=1"))
        );
        assert_eq!(
            target("HTTP://127.0.0.1:8080/api/data/v9.2/x").unwrap(),
            Some(format!("{DV}/api/data/v9.2/x"))
        );
        assert_eq!(
            target("https://CONTOSO.crm.dynamics.com/api/data/v9.2/x").unwrap(),
            None
        );
        assert_eq!(target("/api/data/v9.2/accounts(1)").unwrap(), None);
        assert_eq!(target("accounts(1)").unwrap(), None);
        assert_eq!(target("$1/contact_customer_accounts").unwrap(), None);
        for (bad, other_host) in [
            ("https://evil.example/api/data/v9.2/accounts", true),
            ("https://127.0.0.1:8080@evil.example/api/data/v9.2/x", true),
            ("http://127.0.0.1:8081/api/data/v9.2/x", true),
            (
                "https://contoso.crm.dynamics.com.evil/api/data/v9.2/x",
                true,
            ),
            ("mailto:x@y", true),
            ("/XRMServices/2011/Organization.svc", false),
            ("/api/data/v9.2/../../XRMServices", false),
            ("/api/data/v9.2/.../accounts", false),
            ("../../XRMServices/2011/Organization.svc", false),
            ("http://127.0.0.1:8080/XRMServices", false),
            ("/api/data/v9.2/$batch", false),
            ("$batch", false),
            ("http://127.0.0.1:8080#/api/data/v9.2/accounts", false),
            ("https://contoso.crm.dynamics.com#/api/data/v9.2/x", false),
            ("/api/data/v9.2/accounts#/../contacts", false),
            ("accounts?$filter=name eq '#'", false),
            (
                "/api/data/v9.2/accounts(1)%2Fcontact_customer_accounts",
                false,
            ),
            ("$1%2fprimarycontactid", false),
        ] {
            let e = target(bad).unwrap_err();
            let BatchRefusal::Target { problem, .. } = e else {
                panic!("{bad}: {e:?}")
            };
            assert_eq!(
                problem == TargetProblem::OtherHost,
                other_host,
                "{bad}: {problem:?}"
            );
        }
    }

    #[test]
    fn a_gateway_base_with_a_path_must_be_followed_by_it() {
        let r = rules(&[]);
        let base = "https://gw.example/dataverse";
        let p = PartName::default();
        assert_eq!(
            r.target(
                b"https://gw.example/dataverse/api/data/v9.2/x",
                base,
                DV,
                &p
            )
            .unwrap()
            .0,
            Some(format!("{DV}/api/data/v9.2/x").into_bytes())
        );
        assert!(r
            .target(b"https://gw.example/other/api/data/v9.2/x", base, DV, &p)
            .is_err());
        assert!(r
            .target(
                b"https://gw.example/dataverseX/api/data/v9.2/x",
                base,
                DV,
                &p
            )
            .is_err());
    }

    #[test]
    fn part_headers_follow_the_top_level_rules() {
        let r = rules(&["MSCRM.SuppressDuplicateDetection"]);
        let p = PartName {
            position: 2,
            content_id: Some("7".into()),
        };
        let e = r.header(b"MSCRM_CallerID", &p).unwrap_err();
        assert!(e.to_string().contains("part 2 (Content-ID 7)"), "{e}");
        assert!(e.to_string().contains("`MSCRM_CallerID`"), "{e}");
        let e = r
            .header(b"MSCRM.BypassCustomPluginExecution", &p)
            .unwrap_err();
        assert!(matches!(e, BatchRefusal::ControlHeader { .. }), "{e}");
        assert!(e.to_string().contains("part 2 (Content-ID 7)"), "{e}");
        assert!(
            e.to_string()
                .contains("`MSCRM.BypassCustomPluginExecution`"),
            "{e}"
        );
        assert_eq!(r.header(b"mscrm.suppressduplicatedetection", &p), Ok(()));
        assert_eq!(r.header(b"MSCRM.SolutionUniqueName", &p), Ok(()));
        assert_eq!(r.header(b"Prefer", &p), Ok(()));
        assert!(r.header(b"Bad Name", &p).is_err());
        assert_eq!(
            r.host(b" 127.0.0.1:8080 ", GW, DV, &p).unwrap(),
            Some(b"contoso.crm.dynamics.com".to_vec())
        );
        assert_eq!(
            r.host(b"contoso.crm.dynamics.com", GW, DV, &p).unwrap(),
            None
        );
        assert!(r.host(b"evil.example", GW, DV, &p).is_err());
    }

    #[test]
    fn boundaries_are_read_as_mime_parameters() {
        let b = |ct: &str| {
            multipart_mixed_boundary(ct.as_bytes()).map(|b| String::from_utf8(b).unwrap())
        };
        assert_eq!(
            b("multipart/mixed;boundary=batch_1").as_deref(),
            Some("batch_1")
        );
        assert_eq!(
            b("Multipart/Mixed; boundary=\"a b;c\"").as_deref(),
            Some("a b;c")
        );
        assert_eq!(
            b("multipart/mixed; charset=x; boundary=z ").as_deref(),
            Some("z")
        );
        // Only the parameter named boundary counts, once.
        assert_eq!(
            b("multipart/mixed; xboundary=a; boundary=b").as_deref(),
            Some("b")
        );
        assert_eq!(b("multipart/mixed; boundary=a; boundary=b"), None);
        assert_eq!(b("multipart/mixed"), None);
        assert_eq!(b("multipart/mixed; boundary="), None);
        assert_eq!(b("multipart/related; boundary=a"), None);
        assert_eq!(b("multipart/mixed; boundary=\"open"), None);
        // Spellings another reader could take for a different boundary.
        assert_eq!(b("multipart/mixed; boundary=X; boundary*=utf-8''Q"), None);
        assert_eq!(b("multipart/mixed; BOUNDARY*0=Q; boundary=X"), None);
        assert_eq!(b("multipart/mixed; boundary=\"batch\\_X\""), None);
    }

    #[test]
    fn error_text_quotes_caller_bytes_safely() {
        let long = vec![b'x'; 500];
        let s = shown(&long);
        assert!(s.len() <= MAX_SHOWN + 3);
        assert_eq!(shown(b"a\r\nb"), "a??b");
    }
}
