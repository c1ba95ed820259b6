//! Which request targets may go to Dataverse: paths under `/api/data/` only, and none
//! that could be normalised, by Dataverse or anything in front of it, into a different
//! path than the one checked here. The query string is passed on byte for byte.

use http::Uri;

use crate::access::Target;

/// Why a path is not forwarded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("only paths under /api/data/ are proxied")]
    NotProxied,
    #[error("the path contains a dot segment (`.`, `..`, `...`), backslash, encoded slash (`%2F`), empty segment, control character or malformed escape (in any encoding); send a plain normalised path")]
    Ambiguous,
    #[error("the Host header is missing or not a plain host[:port]")]
    BadHost,
    #[error("a $batch is sent to the service root, /api/data/<version>/$batch, and nowhere else")]
    MisplacedBatch,
}

/// The prefix every proxied path starts with.
pub const API_PREFIX: &str = "/api/data/";

/// The path and query to send upstream, taken from the request target. An absolute-form
/// target (`GET https://elsewhere/api/data/...`) contributes only its path: the host is
/// never the caller's to choose.
pub fn proxied_path_and_query(uri: &Uri) -> Result<&str, PathError> {
    let path = uri.path();
    // Ambiguity first: `/x/../api/data/...` is refused as ambiguous wherever it would
    // normalise to, rather than answered differently depending on where that is.
    check_unambiguous(path)?;
    if !path.starts_with(API_PREFIX) {
        return Err(PathError::NotProxied);
    }
    Ok(uri.path_and_query().map(|pq| pq.as_str()).unwrap_or(path))
}

/// Why a `$batch` part's path and query are not forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PartTargetError {
    Path(PathError),
    /// The part is itself a `$batch`.
    NestedBatch,
}

/// A `$batch` part's path and query (what follows the origin of an absolute URL), parsed
/// and checked once: the part rules (`upstream::batch_parts`) check it, the access rules
/// (`access::body`) read what it addresses from it ([`PartTarget::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartTarget<'a> {
    pub path: PartPath<'a>,
    /// The raw query string, without `?`; empty when there is none.
    pub query: &'a str,
}

/// The three forms of a part's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PartPath<'a> {
    /// `/api/data/...`, as a top-level request's path.
    Absolute(&'a str),
    /// `accounts(1)`: resolved by Dataverse against the batch's `/api/data/v9.x/`.
    Relative(&'a str),
    /// `$1/...`: the record an earlier part's `Content-ID` names, and what follows it.
    Reference { id: &'a str, rest: &'a str },
}

impl<'a> PartTarget<'a> {
    /// Absolute paths meet the rules of a top-level path; relative ones (`$n/...` too) are
    /// unambiguous, so they cannot climb out of the batch's base; neither is a `$batch`.
    pub(crate) fn parse(path_and_query: &'a str) -> Result<Self, PartTargetError> {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let path = if path.starts_with('/') {
            check_unambiguous(path).map_err(PartTargetError::Path)?;
            if !path.starts_with(API_PREFIX) {
                return Err(PartTargetError::Path(PathError::NotProxied));
            }
            PartPath::Absolute(path)
        } else {
            check_unambiguous(&format!("/{path}")).map_err(PartTargetError::Path)?;
            match path.strip_prefix('$') {
                Some(reference) => {
                    let (id, rest) = reference.split_once('/').unwrap_or((reference, ""));
                    PartPath::Reference { id, rest }
                }
                None => PartPath::Relative(path),
            }
        };
        let written = match &path {
            PartPath::Absolute(p) | PartPath::Relative(p) => p,
            PartPath::Reference { .. } => path_and_query.split('?').next().unwrap_or_default(),
        };
        if written.split('/').any(names_batch) {
            return Err(PartTargetError::NestedBatch);
        }
        Ok(Self { path, query })
    }

    /// The `/api/data/` path the part addresses and what that is for the access rules, read
    /// as a top-level request's. `base` is the batch's `/api/data/v9.x/`; `reference_set`
    /// the entity set of the earlier part a `$n` names, when known. The key of `$n` is
    /// opaque to the rules: the table is what counts.
    pub(crate) fn resolve(&self, base: &str, reference_set: Option<&str>) -> (String, Target) {
        let path = match (&self.path, reference_set) {
            (PartPath::Absolute(path), _) => (*path).to_string(),
            (PartPath::Relative(path), _) => format!("{base}{path}"),
            (PartPath::Reference { id, rest }, Some(set)) => format!("{base}{set}(${id})/{rest}")
                .trim_end_matches('/')
                .to_string(),
            (PartPath::Reference { .. }, None) => format!("{base}$unknown-reference"),
        };
        let resource = Target::from_path(&path);
        (path, resource)
    }
}

/// `scheme:` at the start (RFC 3986 3.1), which makes a URL absolute.
pub(crate) fn has_scheme(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars
            .take_while(|c| *c != ':')
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && text.contains(':')
}

/// `scheme://authority` and the rest (path, query, fragment), or None without `://`. The
/// authority ends at the first `/`, `?` or `#` (RFC 3986 3.2).
pub(crate) fn split_origin(url: &str) -> Option<(&str, &str)> {
    let scheme_end = url.find("://")?;
    let after = scheme_end + 3;
    let end = url[after..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| after + i);
    Some((&url[..end], &url[end..]))
}

/// A checked request target, parsed once for every stage: routing reads the environment
/// prefix, access what the path addresses, forwarding the path and query to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTarget<'a> {
    /// The environment named by the path prefix, in path-prefix routing.
    pub environment: Option<&'a str>,
    /// What goes upstream: the path without the environment prefix, and the query.
    pub path_and_query: &'a str,
    /// `path_and_query` up to the `?`: it starts `/api/data/`.
    pub path: &'a str,
    /// The raw query string, without `?`; empty when there is none.
    pub query: &'a str,
    /// What the path addresses, for the access rules.
    pub resource: Target,
}

impl<'a> RequestTarget<'a> {
    fn new(environment: Option<&'a str>, path_and_query: &'a str) -> Self {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        Self {
            environment,
            path_and_query,
            path,
            query,
            resource: Target::from_path(path),
        }
    }
}

/// The one parser of a request's target. As [`proxied_path_and_query`]; with `prefixed`,
/// the path must be `/<environment>/api/data/...` and the prefix is split off.
pub fn request_target(uri: &Uri, prefixed: bool) -> Result<RequestTarget<'_>, PathError> {
    let target = split_target(uri, prefixed)?;
    // Relative part URLs are resolved against the envelope's path: a `$batch` below a
    // table (`accounts/$batch`) would have its parts decided against one base and served
    // against another.
    if target.resource == Target::Batch && !is_service_root_batch(target.path) {
        return Err(PathError::MisplacedBatch);
    }
    Ok(target)
}

/// Whether a part's path segment is, or could be read by Dataverse as, `$batch`: in any
/// case and under any depth of percent-encoding (`%24batch`, `%2524BATCH`), and with
/// anything around it, since a nested batch would carry requests no rule has seen.
fn names_batch(segment: &str) -> bool {
    let mut text = std::borrow::Cow::Borrowed(segment);
    for _ in 0..4 {
        if text.to_ascii_lowercase().contains("$batch") {
            return true;
        }
        let decoded = percent_encoding::percent_decode_str(&text)
            .decode_utf8_lossy()
            .into_owned();
        if decoded == text {
            return false;
        }
        text = std::borrow::Cow::Owned(decoded);
    }
    // Still encoded after four rounds: nobody writes that for a real table.
    true
}

/// `/api/data/<version>/$batch`, exactly.
fn is_service_root_batch(path: &str) -> bool {
    let mut segments = path.strip_prefix(API_PREFIX).unwrap_or_default().split('/');
    matches!(
        (segments.next(), segments.next(), segments.next()),
        (Some(version), Some(batch), None)
            if !version.is_empty() && batch.eq_ignore_ascii_case("$batch")
    )
}

fn split_target(uri: &Uri, prefixed: bool) -> Result<RequestTarget<'_>, PathError> {
    if !prefixed {
        return proxied_path_and_query(uri).map(|pq| RequestTarget::new(None, pq));
    }
    let path = uri.path();
    check_unambiguous(path)?;
    let name = path
        .strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .map(|(name, _)| name)
        .filter(|name| !name.is_empty())
        .ok_or(PathError::NotProxied)?;
    if !path[1 + name.len()..].starts_with(API_PREFIX) {
        return Err(PathError::NotProxied);
    }
    let path_and_query = uri.path_and_query().map(|pq| pq.as_str()).unwrap_or(path);
    Ok(RequestTarget::new(
        Some(name),
        &path_and_query[1 + name.len()..],
    ))
}

/// Refuses dot segments, backslashes, encoded slashes, empty segments and control
/// characters in the path as written and after each of up to three rounds of
/// percent-decoding (double encoding). An encoded slash (`%2F`) is one segment here but two
/// to a front end that decodes it before routing (IIS can), so `accounts(1)%2Fcontacts`
/// would be checked as `accounts` and answered as a navigation to contacts.
/// A `%` not followed by two hex digits as written (`%u002e` is a dot to IIS's http.sys) and
/// escapes that decode to invalid UTF-8 (overlong `%c0%ae` dots) are refused too: other
/// decoders read them differently from the one here.
fn check_unambiguous(path: &str) -> Result<(), PathError> {
    if !escapes_are_well_formed(path) {
        return Err(PathError::Ambiguous);
    }
    let mut current = path.to_string();
    for _ in 0..4 {
        if current.contains('\\')
            || contains_encoded_slash(&current)
            || current.contains("//")
            || current.chars().any(|c| c.is_control())
        {
            return Err(PathError::Ambiguous);
        }
        if current.split('/').any(is_dot_segment) {
            return Err(PathError::Ambiguous);
        }
        let decoded = percent_encoding::percent_decode_str(&current)
            .decode_utf8()
            .map_err(|_| PathError::Ambiguous)?
            .into_owned();
        if decoded == current {
            return Ok(());
        }
        current = decoded;
    }
    // Still changing after four decodings: nobody writes paths like that on purpose.
    Err(PathError::Ambiguous)
}

/// `%2F` in either case.
fn contains_encoded_slash(text: &str) -> bool {
    text.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f'))
}

/// `.`, `..`, and any other segment made only of dots: `...` means `..` to some
/// Windows path handling, and no Web API segment is all dots.
fn is_dot_segment(segment: &str) -> bool {
    !segment.is_empty() && segment.bytes().all(|b| b == b'.')
}

/// Every `%` starts a `%XX` escape with two hex digits (RFC 3986 section 2.1).
fn escapes_are_well_formed(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || (bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_accepted_at_the_service_root_only() {
        let target = |path: &str| {
            let uri: Uri = path.parse().unwrap();
            request_target(&uri, false).map(|t| t.path.to_string())
        };
        assert_eq!(
            target("/api/data/v9.2/$batch").as_deref(),
            Ok("/api/data/v9.2/$batch")
        );
        assert_eq!(
            target("/api/data/v9.2/$BATCH").as_deref(),
            Ok("/api/data/v9.2/$BATCH")
        );
        for misplaced in [
            "/api/data/v9.2/accounts/$batch",
            "/api/data/v9.2/accounts(1)/$batch",
            "/api/data/v9.2/%24batch/x",
            "/api/data/$batch",
            "/api/data/v9.2/$batch/",
        ] {
            assert_eq!(
                target(misplaced),
                Err(PathError::MisplacedBatch),
                "{misplaced}"
            );
        }
    }

    fn check(target: &str) -> Result<String, PathError> {
        let uri: Uri = target.parse().unwrap();
        proxied_path_and_query(&uri).map(str::to_string)
    }

    #[test]
    fn plain_paths_and_queries_pass_unchanged() {
        let q = "/api/data/v9.2/accounts?$filter=name%20eq%20'O''Neil'&$select=name";
        assert_eq!(check(q).unwrap(), q);
        assert_eq!(
            check("/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)").unwrap(),
            "/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)"
        );
        // A literal `%` in a key value is `%25`; unicode is valid UTF-8 once decoded.
        assert!(check("/api/data/v9.2/accounts(name='100%25')").is_ok());
        assert!(check("/api/data/v9.2/accounts(name='M%C3%BCller')").is_ok());
        // An encoded slash inside a query value is data, not a path separator.
        assert!(check("/api/data/v9.2/accounts?$skiptoken=%253Ccookie%2F").is_ok());
    }

    #[test]
    fn environment_prefix_is_split_off() {
        let uri: Uri = "/contoso/api/data/v9.2/accounts?$top=1".parse().unwrap();
        let t = request_target(&uri, true).unwrap();
        assert_eq!(t.environment, Some("contoso"));
        assert_eq!(t.path_and_query, "/api/data/v9.2/accounts?$top=1");
        assert_eq!((t.path, t.query), ("/api/data/v9.2/accounts", "$top=1"));
        assert_eq!(t.resource, Target::EntitySet("accounts".into()));
        for bad in [
            "/api/data/v9.2/accounts",
            "/contoso/x/api/data/",
            "//api/data/",
            "/contoso/../fabrikam/api/data/v9.2/x",
        ] {
            let uri: Uri = bad.parse().unwrap();
            assert!(request_target(&uri, true).is_err(), "{bad}");
        }
        let uri: Uri = "/api/data/v9.2/accounts".parse().unwrap();
        assert_eq!(request_target(&uri, false).unwrap().environment, None);
    }

    #[test]
    fn part_targets_are_parsed_once_into_the_path_access_reads() {
        let base = "/api/data/v9.2/";
        let parse = |t| PartTarget::parse(t).unwrap();
        let p = parse("/api/data/v9.1/accounts(1)?$select=name");
        assert_eq!(p.path, PartPath::Absolute("/api/data/v9.1/accounts(1)"));
        assert_eq!(p.query, "$select=name");
        assert_eq!(
            p.resolve(base, None),
            (
                "/api/data/v9.1/accounts(1)".to_string(),
                Target::EntitySet("accounts".into())
            )
        );
        let p = parse("contacts?$top=1");
        assert_eq!(p.path, PartPath::Relative("contacts"));
        assert_eq!(
            p.resolve(base, None).1,
            Target::EntitySet("contacts".into())
        );
        assert_eq!(parse("").resolve(base, None).1, Target::ServiceRoot);
        let p = parse("$1/primarycontactid");
        assert_eq!(
            p.path,
            PartPath::Reference {
                id: "1",
                rest: "primarycontactid"
            }
        );
        assert_eq!(
            p.resolve(base, Some("accounts")).0,
            "/api/data/v9.2/accounts($1)/primarycontactid"
        );
        assert_eq!(p.resolve(base, None).1, Target::Unknown);
        for (bad, expected) in [
            ("/api/data/v9.2/$batch", PartTargetError::NestedBatch),
            ("$BATCH", PartTargetError::NestedBatch),
            ("$1/$batch", PartTargetError::NestedBatch),
            ("contacts/%24batch", PartTargetError::NestedBatch),
            ("%24BATCH", PartTargetError::NestedBatch),
            ("%2524batch/x", PartTargetError::NestedBatch),
            ("%24batchx", PartTargetError::NestedBatch),
            ("/api/data/v9.2/%24batch", PartTargetError::NestedBatch),
            ("$1/%24batch", PartTargetError::NestedBatch),
            (
                "/XRMServices/2011",
                PartTargetError::Path(PathError::NotProxied),
            ),
            ("../x", PartTargetError::Path(PathError::Ambiguous)),
            ("$1%2Fx", PartTargetError::Path(PathError::Ambiguous)),
        ] {
            assert_eq!(PartTarget::parse(bad), Err(expected), "{bad}");
        }
    }

    #[test]
    fn origins_end_at_the_first_slash_question_mark_or_fragment() {
        assert_eq!(
            split_origin("https://h:1/api?x"),
            Some(("https://h:1", "/api?x"))
        );
        assert_eq!(split_origin("http://h#/api"), Some(("http://h", "#/api")));
        assert_eq!(split_origin("http://h?a/b"), Some(("http://h", "?a/b")));
        assert_eq!(split_origin("accounts(1)"), None);
        assert!(has_scheme("HTTP://h") && !has_scheme("/a:b") && !has_scheme("accounts"));
    }

    #[test]
    fn absolute_form_contributes_only_its_path() {
        assert_eq!(
            check("https://evil.example/api/data/v9.2/accounts").unwrap(),
            "/api/data/v9.2/accounts"
        );
    }

    #[test]
    fn other_paths_are_not_proxied() {
        assert!(matches!(check("/"), Err(PathError::NotProxied)));
        assert!(matches!(check("/api/datax/"), Err(PathError::NotProxied)));
        assert!(matches!(
            check("/API/DATA/v9.2/accounts"),
            Err(PathError::NotProxied)
        ));
    }

    #[test]
    fn traversal_in_any_encoding_is_refused() {
        for p in [
            "/api/data/../../admin",
            "/api/data/v9.2/%2e%2e/%2e%2e/x",
            "/api/data/v9.2/%2E%2e%2fx",
            "/api/data/v9.2/%252e%252e/x",
            "/api/data/v9.2/a%5c..%5cb",
            "/api/data//v9.2/accounts",
            "/api/data/v9.2/./accounts",
            "/api/data/v9.2/.../accounts",
            "/api/data/v9.2/..../accounts",
            "/api/data/v9.2/%2e%2e%2e/accounts",
            "/api/data/v9.2/.%2e./accounts",
            "/api/data/v9.2/%252e%252e%252e/accounts",
            "/api/data/v9.2/accounts/...",
            "/api/data/v9.2/%00",
            "/api/data/v9.2/%u002e%u002e/%u002e%u002e/%u002e%u002e/XRMServices",
            "/api/data/v9.2/%c0%ae%c0%ae/x",
            "/api/data/v9.2/accounts%",
            "/api/data/v9.2/accounts%2",
            "/x/../api/data/v9.2/accounts",
            "/%2e%2e/api/data/v9.2/accounts",
            "/api/data/v9.2/accounts(1)%2Fcontact_customer_accounts",
            "/api/data/v9.2/accounts%281%29%2fprimarycontactid",
            "/api/data/v9.2/accounts%2Fcontacts",
            "/api/data/v9.2/accounts(1)%252Fcontact_customer_accounts",
            "/api/data/v9.2/accounts(1)%25252fx",
            "/alpha%2Fapi/data/v9.2/accounts",
        ] {
            assert!(matches!(check(p), Err(PathError::Ambiguous)), "{p}");
        }
    }
}
