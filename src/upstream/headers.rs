//! Header rules for the hop to Dataverse, as plain functions over a `HeaderMap`: what a
//! caller may not send on (its token, any impersonation header, hop-by-hop headers), and
//! what the gateway sets in their place.

use std::net::SocketAddr;

use http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, COOKIE, FORWARDED, HOST,
    PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, SET_COOKIE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::HeaderMap;

use crate::identity::Impersonation;

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const CALLER_OBJECT_ID: HeaderName = HeaderName::from_static("callerobjectid");
pub(crate) const MSCRM_CALLER_ID: HeaderName = HeaderName::from_static("mscrmcallerid");

/// Header names (lowercase, `_` read as `-`) that choose whom Dataverse acts as.
const IMPERSONATION_HEADERS: [&str; 3] = ["callerobjectid", "mscrmcallerid", "mscrmcallerobjectid"];

/// Hop-by-hop headers (RFC 9110 7.6.1) are for one connection only.
const HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHORIZATION,
    PROXY_AUTHENTICATE,
];

/// Headers that name the client's address to whoever reads them, beside the
/// `X-Forwarded-For` and `Forwarded` the gateway sets or drops itself (compared without
/// dashes and underscores, like the impersonation headers).
const CLIENT_ADDRESS_HEADERS: [&str; 10] = [
    "xrealip",
    "trueclientip",
    "xclientip",
    "cfconnectingip",
    "xclusterclientip",
    "fastlyclientip",
    "xoriginalforwardedfor",
    "xproxyuserip",
    "forwardedfor",
    "xforwardedfor",
];

/// Whether `name` is `squashed` written with any dashes and underscores: `MSCRM-CallerID`
/// and `MSCRM_CallerID` are both `mscrmcallerid` (header names are lowercase already).
fn is_spelling_of(name: &HeaderName, squashed: &str) -> bool {
    name.as_str()
        .bytes()
        .filter(|b| !matches!(b, b'-' | b'_'))
        .eq(squashed.bytes())
}

/// True for every spelling of an impersonation header.
pub(crate) fn is_impersonation_header(name: &HeaderName) -> bool {
    IMPERSONATION_HEADERS
        .iter()
        .any(|h| is_spelling_of(name, h))
}

/// Removes the caller's credential and every impersonation header it sent; returns how
/// many impersonation headers were dropped (worth a log line: someone tried).
pub(crate) fn strip_caller_identity_headers(headers: &mut HeaderMap) -> usize {
    headers.remove(AUTHORIZATION);
    remove_matching(headers, is_impersonation_header)
}

/// Removes every header whose name `matches`; returns how many values went.
fn remove_matching(headers: &mut HeaderMap, matches: impl Fn(&HeaderName) -> bool) -> usize {
    let names: Vec<HeaderName> = headers.keys().filter(|n| matches(n)).cloned().collect();
    let mut dropped = 0;
    for name in names {
        dropped += headers.get_all(&name).iter().count();
        headers.remove(&name);
    }
    dropped
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    // Connection-specific as well: an h2c upgrade's settings, and the 100-continue the
    // gateway itself has already answered.
    headers.remove("http2-settings");
    headers.remove(http::header::EXPECT);
}

/// A `Retry-After` (RFC 9110 10.2.3): delay-seconds, or an HTTP-date as the time left until
/// it. Seconds too many for a number read as the longest wait: callers clamp it.
pub fn retry_after(headers: &HeaderMap) -> Option<std::time::Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(
            value
                .parse::<u64>()
                .map_or(std::time::Duration::MAX, std::time::Duration::from_secs),
        );
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// Headers some front ends (IIS URL Rewrite among them) read as a replacement request
/// path; the path the gateway checked must be the only one.
const PATH_OVERRIDE_HEADERS: [&str; 2] = ["x-original-url", "x-rewrite-url"];

/// Headers frameworks (ASP.NET's `HttpMethodOverride`, OData clients tunnelling PATCH
/// through POST) read as a replacement method; the method the gateway checked must be the
/// only one. Compared lowercase with `_` read as `-`, as CGI-style servers do.
const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method",
    "x-http-method-override",
    "x-method-override",
];

/// Removes headers that could make a server behind the gateway use a different path.
pub(crate) fn strip_path_overrides(headers: &mut HeaderMap) {
    for name in PATH_OVERRIDE_HEADERS {
        headers.remove(name);
    }
}

/// `name` lowercased with `_` read as `-`: the spelling CGI-style servers compare.
fn dashed_lowercase(name: &str) -> String {
    name.trim()
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// True for every spelling of a method-override header.
pub(crate) fn is_method_override_header(name: &str) -> bool {
    METHOD_OVERRIDE_HEADERS.contains(&dashed_lowercase(name).as_str())
}

/// Removes every method-override header; returns how many names were dropped.
pub(crate) fn strip_method_overrides(headers: &mut HeaderMap) -> usize {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_method_override_header(n.as_str()))
        .cloned()
        .collect();
    for name in &names {
        headers.remove(name);
    }
    names.len()
}

/// Why a header line inside a `$batch` part is never sent on: it would choose, in that
/// part, what the gateway decides for the whole request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerOnlyHeader {
    /// `CallerObjectId`, `MSCRMCallerID`, `MSCRMCallerObjectID` in any spelling.
    Impersonation,
    /// `Authorization`, `Proxy-Authorization`.
    Credential,
    /// `Cookie`.
    Cookie,
    /// `X-HTTP-Method`, `X-HTTP-Method-Override`, `X-Method-Override`.
    MethodOverride,
    /// `X-Original-URL`, `X-Rewrite-URL`.
    PathOverride,
    /// `Content-Encoding`: a part's body is read for its access pairs and links, so it
    /// must arrive as written.
    Encoding,
}

/// The rule a header name inside a `$batch` part falls under, if any: the same names the
/// top-level stripping removes, in the same spellings (any case, `_` read as `-`), plus
/// `Cookie`, which at top level is removed unless the environment sets `forward_cookies`
/// and inside a part is refused either way (no client needs a cookie per part).
pub(crate) fn caller_only_header(name: &str) -> Option<CallerOnlyHeader> {
    let dashed = dashed_lowercase(name);
    let squeezed: String = dashed.chars().filter(|c| *c != '-').collect();
    if IMPERSONATION_HEADERS.contains(&squeezed.as_str())
        || crate::access::names_impersonation(&dashed)
    {
        Some(CallerOnlyHeader::Impersonation)
    } else if matches!(dashed.as_str(), "authorization" | "proxy-authorization") {
        Some(CallerOnlyHeader::Credential)
    } else if dashed == "cookie" {
        Some(CallerOnlyHeader::Cookie)
    } else if METHOD_OVERRIDE_HEADERS.contains(&dashed.as_str()) {
        Some(CallerOnlyHeader::MethodOverride)
    } else if PATH_OVERRIDE_HEADERS.contains(&dashed.as_str()) {
        Some(CallerOnlyHeader::PathOverride)
    } else if dashed == "content-encoding" {
        Some(CallerOnlyHeader::Encoding)
    } else {
        None
    }
}

/// Removes the caller's `Cookie` headers: one gateway serves many apps, and their cookies
/// (sessions with the app itself, or an affinity cookie another app received) are not
/// Dataverse's to read.
pub(crate) fn strip_cookies(headers: &mut HeaderMap) {
    headers.remove(COOKIE);
}

/// Removes Dataverse's `Set-Cookie` headers (its server-affinity cookies `ARRAffinity`,
/// `ReqClientId`, ...): they would pin whichever app made the call to one Dataverse web
/// server, which Microsoft advises against for throughput, and the gateway keeps no jar.
pub(crate) fn strip_set_cookies(headers: &mut HeaderMap) {
    headers.remove(SET_COOKIE);
}

/// Sets `X-Forwarded-For` to the caller's address (appended to the caller's own value
/// only when forwarded headers are trusted) and drops untrusted `X-Forwarded-Host/Proto`
/// and `Forwarded` (RFC 7239 says the same things, so it is trusted no more than they are).
pub(crate) fn set_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr, trust_forwarded: bool) {
    if !trust_forwarded {
        // Other spellings and other proxies' client-address headers: the caller's word only.
        remove_matching(headers, |n| {
            *n != X_FORWARDED_FOR && CLIENT_ADDRESS_HEADERS.iter().any(|h| is_spelling_of(n, h))
        });
    }
    let peer_ip = peer.ip().to_string();
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if trust_forwarded => format!("{prior}, {peer_ip}"),
        _ => peer_ip,
    };
    if !trust_forwarded {
        headers.remove(X_FORWARDED_HOST);
        headers.remove(X_FORWARDED_PROTO);
        headers.remove(FORWARDED);
    }
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// Sets the one impersonation header the identity stage decided on.
pub(crate) fn set_impersonation(headers: &mut HeaderMap, impersonation: &Impersonation) {
    let (name, id) = match impersonation {
        Impersonation::CallerObjectId(id) => (CALLER_OBJECT_ID, id),
        Impersonation::SystemUserId(id) => (MSCRM_CALLER_ID, id),
        Impersonation::ApplicationUser => return,
    };
    let mut buf = uuid::Uuid::encode_buffer();
    let text = id.hyphenated().encode_lower(&mut buf);
    headers.insert(
        name,
        HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("")),
    );
}

/// Rewrites the request headers for the hop to Dataverse.
pub fn prepare_upstream_request(
    headers: &mut HeaderMap,
    token: &HeaderValue,
    impersonation: &Impersonation,
    peer: SocketAddr,
    trust_forwarded: bool,
    request_id: &HeaderValue,
) -> usize {
    strip_hop_by_hop(headers);
    let dropped = strip_caller_identity_headers(headers);
    strip_path_overrides(headers);
    strip_method_overrides(headers);
    set_forwarded_for(headers, peer, trust_forwarded);
    // The client writes the organisation's own Host (HTTP/1.1) or :authority (HTTP/2) from
    // its URI; a Host beside :authority is a duplicate that servers such as nginx refuse.
    headers.remove(HOST);
    headers.insert(AUTHORIZATION, token.clone());
    headers.insert(X_REQUEST_ID, request_id.clone());
    set_impersonation(headers, impersonation);
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header map with `pairs` appended in order (a name may repeat; any case).
    fn map(pairs: &[(&str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static(value),
            );
        }
        h
    }

    #[test]
    fn retry_after_reads_seconds_dates_and_absurd_numbers() {
        let of = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            retry_after(&h)
        };
        assert_eq!(of("120"), Some(std::time::Duration::from_secs(120)));
        assert_eq!(
            of("999999999999999999999999"),
            Some(std::time::Duration::MAX)
        );
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(600);
        let wait = of(&httpdate::fmt_http_date(later)).unwrap();
        assert!(
            wait > std::time::Duration::from_secs(590)
                && wait <= std::time::Duration::from_secs(600)
        );
        assert_eq!(
            of("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(std::time::Duration::ZERO)
        );
        assert_eq!(of("-1"), None);
        assert_eq!(of("soon"), None);
    }

    #[test]
    fn every_spelling_of_impersonation_headers_is_stripped() {
        let mut h = map(&[
            ("MSCRMCallerID", "x"),
            ("mscrmcallerid", "x"),
            ("CallerObjectId", "x"),
            ("callerobjectid", "x"),
            ("MSCRM-CallerID", "x"),
            ("mscrm_callerid", "x"),
            ("MSCRMCallerObjectID", "x"),
            ("caller_object_id", "x"),
            ("authorization", "Bearer caller"),
            ("prefer", "return=representation"),
        ]);
        let dropped = strip_caller_identity_headers(&mut h);
        assert_eq!(dropped, 8);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("prefer"));
    }

    #[test]
    fn path_override_headers_are_removed() {
        let mut h = map(&[
            ("X-Original-URL", "/XRMServices/2011/Organization.svc"),
            ("x-rewrite-url", "/admin"),
            ("prefer", "return=representation"),
        ]);
        strip_path_overrides(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn method_override_headers_are_removed_in_any_spelling() {
        let mut h = map(&[
            ("X-HTTP-Method", "DELETE"),
            ("x-http-method-override", "DELETE"),
            ("X-Method-Override", "DELETE"),
            ("x_http_method_override", "DELETE"),
            ("X_HTTP_METHOD", "DELETE"),
            ("x-http-methods", "kept"),
        ]);
        assert_eq!(strip_method_overrides(&mut h), 5);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-http-methods"));
    }

    #[test]
    fn caller_only_headers_in_parts_are_recognised_in_every_spelling() {
        use CallerOnlyHeader as C;
        for (name, want) in [
            ("CallerObjectId", C::Impersonation),
            ("caller_object_id", C::Impersonation),
            ("MSCRMCallerID", C::Impersonation),
            ("MSCRM-CallerID", C::Impersonation),
            ("mscrm_callerid", C::Impersonation),
            ("MSCRMCallerObjectID", C::Impersonation),
            ("MSCRM.CallerID", C::Impersonation),
            (" CallerObjectId\t", C::Impersonation),
            ("Authorization", C::Credential),
            ("proxy_authorization", C::Credential),
            ("COOKIE", C::Cookie),
            ("X-HTTP-Method", C::MethodOverride),
            ("X_HTTP_Method_Override", C::MethodOverride),
            ("x-method-override", C::MethodOverride),
            ("X-Original-URL", C::PathOverride),
            ("x_rewrite_url", C::PathOverride),
        ] {
            assert_eq!(caller_only_header(name), Some(want), "{name}");
        }
        for name in [
            "Prefer",
            "MSCRM.BypassCustomPluginExecution",
            "If-Match",
            "Cookies",
        ] {
            assert_eq!(caller_only_header(name), None, "{name}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ("expect", "100-continue"),
            ("odata-version", "4.0"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("odata-version"));
    }

    #[test]
    fn cookies_are_removed_in_both_directions() {
        let mut h = map(&[
            ("cookie", "session=app"),
            ("cookie", "ARRAffinity=abc"),
            ("prefer", "return=representation"),
        ]);
        strip_cookies(&mut h);
        assert_eq!(h.len(), 1);
        let mut h = map(&[
            ("set-cookie", "ARRAffinity=a; path=/"),
            ("set-cookie", "ReqClientId=b; path=/"),
            ("odata-version", "4.0"),
        ]);
        strip_set_cookies(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("odata-version"));
    }

    /// Client-address headers a caller might send to pass for another address.
    const SPOOFED_ADDRESSES: [&str; 5] = [
        "x-real-ip",
        "x-real_ip",
        "true-client-ip",
        "cf-connecting-ip",
        "x_forwarded_for",
    ];

    #[test]
    fn forwarded_for_ignores_caller_value_unless_trusted() {
        let peer: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.insert(X_FORWARDED_HOST, HeaderValue::from_static("evil"));
        h.insert(FORWARDED, HeaderValue::from_static("for=6.6.6.6;host=evil"));
        for name in SPOOFED_ADDRESSES {
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static("6.6.6.6"),
            );
        }
        set_forwarded_for(&mut h, peer, false);
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.2.3");
        assert!(!h.contains_key(X_FORWARDED_HOST));
        assert!(!h.contains_key(FORWARDED));
        for name in SPOOFED_ADDRESSES {
            assert!(!h.contains_key(name), "{name}");
        }
        assert_eq!(h.len(), 1, "only the gateway's own X-Forwarded-For: {h:?}");
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        set_forwarded_for(&mut h, peer, true);
        assert_eq!(h[&X_FORWARDED_FOR], "6.6.6.6, 10.1.2.3");
    }
}
