//! Rewrites absolute URLs between the Dataverse organisation origin and the gateway's public
//! base — in header values, JSON `@odata.*` link annotations and `$batch` multipart bodies —
//! streaming chunk by chunk with bounded carry-over state, so apps keep talking to the gateway
//! and Dataverse only ever sees its own origin.
//!
//! A URL is rewritten only when it starts with one of the `from` prefixes followed by `/`,
//! `?`, `(` or its end. The origin part of a prefix (`scheme://host[:port]`) is compared
//! without ASCII case, as RFC 3986 makes scheme and host case-insensitive; a path after it
//! (a gateway base with an environment prefix) is compared byte for byte. Nothing is
//! percent-decoded. An organisation answers on several host names (`org.crm.dynamics.com`,
//! `org.api.crm.dynamics.com`): each configured alias is one more `from`. JSON property
//! names containing escapes (e.g. `"@odata\u002enextLink"`) are treated as non-matching.

use std::sync::Arc;

use memchr::{memchr, memchr2, memrchr};

use crate::access::{AccessDenied, BodyInspector};

use super::batch_parts::{
    multipart_mixed_boundary, BatchRefusal, Hold, LengthField, PartName, PartRules, Region,
};

/// URL prefixes: any of the `from` prefixes is replaced by `to` at the start of selected URL
/// values. Cheap to clone: the prefixes are shared, so one value serves every request to a base.
#[derive(Clone, Debug)]
pub struct LinkRewrite(Arc<LinkPrefixes>);

/// The prefixes of a [`LinkRewrite`] in each form they are matched in.
#[derive(Debug)]
pub struct LinkPrefixes {
    /// The first `from`: the one `reversed` swaps with `to`.
    from: String,
    /// Every `from` (the first included); empty ones are left out.
    froms: Vec<FromPrefix>,
    to: String,
    /// `to` as it appears inside a JSON string literal.
    to_json: Vec<u8>,
    /// The same with every `/` written as `\/` (some serializers escape slashes).
    to_json_slash: Vec<u8>,
}

/// One prefix that is replaced, in the forms it is matched in, each with the length of its
/// origin part (compared without case).
#[derive(Debug)]
struct FromPrefix {
    raw: Cased,
    json: Cased,
    json_slash: Cased,
}

/// A prefix whose first `origin_len` bytes are compared without ASCII case.
#[derive(Debug)]
struct Cased {
    bytes: Vec<u8>,
    origin_len: usize,
}

impl Cased {
    fn new(prefix: &str, escape: impl Fn(&str) -> Vec<u8>) -> Self {
        let origin = origin_part(prefix);
        Self {
            bytes: escape(prefix),
            origin_len: escape(origin).len(),
        }
    }

    fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when `candidate` (no longer than the prefix) agrees with the prefix's start.
    fn agrees(&self, candidate: &[u8]) -> bool {
        let n = candidate.len().min(self.bytes.len());
        let cased = n.min(self.origin_len);
        candidate[..cased].eq_ignore_ascii_case(&self.bytes[..cased])
            && candidate[cased..n] == self.bytes[cased..n]
    }

    /// What follows the prefix in `value`, if `value` starts with it.
    fn strip<'v>(&self, value: &'v [u8]) -> Option<&'v [u8]> {
        (value.len() >= self.bytes.len() && self.agrees(&value[..self.bytes.len()]))
            .then(|| &value[self.bytes.len()..])
    }
}

/// `scheme://authority` at the start of `url` (all of it when there is no path).
fn origin_part(url: &str) -> &str {
    crate::request_target::split_origin(url).map_or("", |(origin, _)| origin)
}

/// Outcome of matching the (raw, still escaped) start of a JSON string against `from`.
enum Decision {
    NeedMore,
    NoMatch,
    Match { prefix_len: usize, slash: bool },
}

impl std::ops::Deref for LinkRewrite {
    type Target = LinkPrefixes;

    fn deref(&self) -> &LinkPrefixes {
        &self.0
    }
}

impl LinkRewrite {
    /// `from` and `to` are absolute URL prefixes without trailing slash, e.g.
    /// "https://org.crm.dynamics.com" and "http://127.0.0.1:8080". An empty `from`
    /// disables rewriting (it would otherwise match every value).
    pub fn new(from: impl Into<String>, to: impl Into<String>) -> Self {
        Self::with_aliases(from, std::iter::empty::<String>(), to)
    }

    /// As [`LinkRewrite::new`], with more prefixes that name the same place as `from` (the
    /// organisation's other host names): each of them is replaced by `to` too.
    pub(crate) fn with_aliases(
        from: impl Into<String>,
        aliases: impl IntoIterator<Item = impl Into<String>>,
        to: impl Into<String>,
    ) -> Self {
        let from = from.into();
        let to = to.into();
        let froms = std::iter::once(from.clone())
            .chain(aliases.into_iter().map(Into::into))
            .filter(|f| !f.is_empty())
            .map(|f| FromPrefix {
                raw: Cased::new(&f, |s| s.as_bytes().to_vec()),
                json: Cased::new(&f, |s| json_escape(s, false)),
                json_slash: Cased::new(&f, |s| json_escape(s, true)),
            })
            .collect();
        Self(Arc::new(LinkPrefixes {
            to_json: json_escape(&to, false),
            to_json_slash: json_escape(&to, true),
            from,
            froms,
            to,
        }))
    }

    /// The (first) prefix that is replaced.
    pub fn from(&self) -> &str {
        &self.from
    }

    /// The replacement prefix.
    pub fn to(&self) -> &str {
        &self.to
    }

    /// The first pair with `from` and `to` swapped (gateway -> Dataverse for requests).
    pub fn reversed(&self) -> Self {
        Self::new(self.to.clone(), self.from.clone())
    }

    /// For a header value (Location, OData-EntityId): if it starts with a `from` followed
    /// by '/', '?', '(' or end, return the rewritten value; else None.
    pub(crate) fn header_value(&self, value: &[u8]) -> Option<Vec<u8>> {
        let rest = self.froms.iter().find_map(|f| {
            f.raw
                .strip(value)
                .filter(|rest| matches!(rest.first(), None | Some(b'/' | b'?' | b'(')))
        })?;
        let mut v = Vec::with_capacity(self.to.len() + rest.len());
        v.extend_from_slice(self.to.as_bytes());
        v.extend_from_slice(rest);
        Some(v)
    }

    /// Longest candidate prefix a JSON rewriter has to hold before deciding.
    fn max_hold(&self) -> usize {
        self.froms
            .iter()
            .map(|f| f.json.len().max(f.json_slash.len()))
            .max()
            .unwrap_or(0)
            + 2
    }

    /// Decide whether the raw content `buf` of a JSON string starts with a `from`
    /// (plain or slash-escaped) followed by a URL delimiter or the string's end.
    /// Never returns `NeedMore` once `buf.len() >= max_hold()`.
    fn decide(&self, buf: &[u8], ended: bool) -> Decision {
        let mut need_more = false;
        let forms = self
            .froms
            .iter()
            .flat_map(|f| [(&f.json, false), (&f.json_slash, true)]);
        for (prefix, slash) in forms {
            if buf.len() < prefix.len() {
                need_more |= !ended && prefix.agrees(buf);
                continue;
            }
            let Some(rest) = prefix.strip(buf) else {
                continue;
            };
            let delimited = match rest {
                [] if ended => true,
                [] => {
                    need_more = true;
                    false
                }
                [b'/' | b'?' | b'(', ..] | [b'\\', b'/', ..] => true,
                [b'\\'] => {
                    need_more |= !ended;
                    false
                }
                _ => false,
            };
            if delimited {
                return Decision::Match {
                    prefix_len: prefix.len(),
                    slash,
                };
            }
        }
        if need_more {
            Decision::NeedMore
        } else {
            Decision::NoMatch
        }
    }
}

/// Escape `s` for the inside of a JSON string literal, optionally writing `/` as `\/`.
fn json_escape(s: &str, escape_slash: bool) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut v = Vec::with_capacity(s.len());
    for &b in s.as_bytes() {
        match b {
            b'"' | b'\\' => v.extend_from_slice(&[b'\\', b]),
            b'/' if escape_slash => v.extend_from_slice(b"\\/"),
            0..=0x1f => v.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
            _ => v.push(b),
        }
    }
    v
}

/// Which JSON keys' string values are rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonKeys {
    /// Response annotations: keys equal to or ending with `@odata.context`,
    /// `@odata.nextLink`, `@odata.deltaLink` or `@odata.id`.
    ResponseLinks,
    /// Request payloads: keys ending with `@odata.bind`, or exactly `@odata.id` (`$ref` bodies).
    RequestBinds,
}

const RESPONSE_LINK_SUFFIXES: [&[u8]; 4] = [
    b"@odata.context",
    b"@odata.nextLink",
    b"@odata.deltaLink",
    b"@odata.id",
];
const BIND_SUFFIX: &[u8] = b"@odata.bind";
const ODATA_ID: &[u8] = b"@odata.id";
/// The bytes outside strings that shape a JSON document.
const STRUCTURAL: [u8; 7] = [b'"', b'{', b'}', b'[', b']', b',', b':'];
/// Longest key suffix we match (`@odata.deltaLink`); only this many key bytes are kept.
const KEY_TAIL: usize = 16;

impl JsonKeys {
    fn matches(self, tail: &[u8], key_len: usize) -> bool {
        match self {
            JsonKeys::ResponseLinks => RESPONSE_LINK_SUFFIXES.iter().any(|s| tail.ends_with(s)),
            JsonKeys::RequestBinds => {
                tail.ends_with(BIND_SUFFIX) || (key_len == ODATA_ID.len() && tail == ODATA_ID)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StrKind {
    /// Any string that is not a candidate value; it may turn out to be a key.
    Plain,
    /// Value of a matching key whose prefix is still being buffered.
    Candidate,
    /// Value of a matching key after the prefix decision; streams through.
    Decided,
}

/// Streaming JSON rewriter: a tokenizer-level scanner that only touches the prefix of
/// string values under selected keys; every other byte passes through unchanged, and
/// invalid JSON passes through unchanged too.
#[derive(Clone, Debug)]
pub struct JsonLinkRewriter {
    rewrite: LinkRewrite,
    keys: JsonKeys,
    in_string: bool,
    escaped: bool,
    kind: StrKind,
    /// Held start of a candidate value; at most `rewrite.max_hold()` bytes.
    cand: Vec<u8>,
    /// Last `KEY_TAIL` bytes of the current plain string, plus its length and escape flag.
    key_tail: Vec<u8>,
    key_len: usize,
    key_has_escape: bool,
    /// Set right after a string closed: whether it would be a matching key if a ':' follows.
    after_string: Option<bool>,
    /// Set after `<matching key>:`; the next token, if a string, is a candidate value.
    value_pending: bool,
    /// The access checks of a request body, fed the structure and strings this scan sees.
    inspector: Option<Box<BodyInspector>>,
}

impl JsonLinkRewriter {
    pub fn new(rewrite: LinkRewrite, keys: JsonKeys) -> Self {
        Self {
            rewrite,
            keys,
            in_string: false,
            escaped: false,
            kind: StrKind::Plain,
            cand: Vec::new(),
            key_tail: Vec::with_capacity(2 * KEY_TAIL),
            key_len: 0,
            key_has_escape: false,
            after_string: None,
            value_pending: false,
            inspector: None,
        }
    }

    /// A request body's rewriter that also has its pairs checked by `inspector`.
    pub fn inspected(rewrite: LinkRewrite, inspector: BodyInspector) -> Self {
        Self {
            inspector: Some(Box::new(inspector)),
            ..Self::new(rewrite, JsonKeys::RequestBinds)
        }
    }

    /// Why the access checks refused the body, once they have.
    pub fn refusal(&self) -> Option<&AccessDenied> {
        self.inspector.as_ref().and_then(|i| i.refusal())
    }

    /// Feed the next chunk; rewritten output is appended to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < chunk.len() {
            let rest = &chunk[i..];
            if !self.in_string {
                i += self.push_outside(rest, out);
            } else if self.kind == StrKind::Candidate {
                i += self.push_candidate(rest, out);
            } else {
                i += self.push_string(rest, out);
            }
        }
    }

    /// End of body: flush whatever is held and reset for reuse.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        // An unterminated candidate was never proven to be a complete URL: leave it alone.
        out.extend_from_slice(&self.cand);
        let mut inspector = self.inspector.take();
        if let Some(inspector) = &mut inspector {
            inspector.reset();
        }
        *self = Self::new(self.rewrite.clone(), self.keys);
        self.inspector = inspector;
    }

    /// Structural bytes outside strings; returns how many bytes of `rest` were consumed.
    fn push_outside(&mut self, rest: &[u8], out: &mut Vec<u8>) -> usize {
        if self.after_string.is_none() && !self.value_pending {
            // Nothing pending: skip straight to the next string (or, when the structure
            // is inspected, the next structural byte).
            let next = match &self.inspector {
                None => memchr(b'"', rest),
                Some(_) => rest.iter().position(|b| STRUCTURAL.contains(b)),
            };
            return match next {
                None => {
                    out.extend_from_slice(rest);
                    rest.len()
                }
                Some(pos) if rest[pos] == b'"' => {
                    out.extend_from_slice(&rest[..=pos]);
                    self.open_string(false);
                    pos + 1
                }
                Some(pos) => {
                    out.extend_from_slice(&rest[..=pos]);
                    if let Some(inspector) = &mut self.inspector {
                        inspector.structural(rest[pos]);
                    }
                    pos + 1
                }
            };
        }
        let Some(&b) = rest.first() else {
            return 0;
        };
        out.push(b);
        if let Some(inspector) = &mut self.inspector {
            inspector.structural(b);
        }
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b':' => {
                self.value_pending = self.after_string == Some(true);
                self.after_string = None;
            }
            b'"' => {
                let candidate = self.value_pending;
                self.open_string(candidate);
            }
            _ => {
                self.after_string = None;
                self.value_pending = false;
            }
        }
        1
    }

    /// Inside a plain or decided string: stream up to the next quote or backslash.
    fn push_string(&mut self, rest: &[u8], out: &mut Vec<u8>) -> usize {
        let plain = self.kind == StrKind::Plain;
        if self.escaped {
            self.escaped = false;
            let n = rest.len().min(1);
            out.extend_from_slice(&rest[..n]);
            self.inspect_string(&rest[..n]);
            return n;
        }
        match memchr2(b'"', b'\\', rest) {
            None => {
                if plain {
                    self.note_key(rest);
                }
                out.extend_from_slice(rest);
                self.inspect_string(rest);
                rest.len()
            }
            Some(pos) => {
                let span = &rest[..pos];
                if plain {
                    self.note_key(span);
                }
                out.extend_from_slice(span);
                self.inspect_string(span);
                if rest[pos] == b'\\' {
                    self.escaped = true;
                    self.key_has_escape = true;
                    out.push(b'\\');
                    self.inspect_string(b"\\");
                } else {
                    self.close_string(out);
                }
                pos + 1
            }
        }
    }

    /// Inside a candidate value: hold bytes until the prefix decision can be made.
    fn push_candidate(&mut self, rest: &[u8], out: &mut Vec<u8>) -> usize {
        let Some(&b) = rest.first() else {
            return 0;
        };
        if self.escaped {
            self.escaped = false;
            self.cand.push(b);
        } else if b == b'\\' {
            self.escaped = true;
            self.cand.push(b);
        } else if b == b'"' {
            self.resolve_candidate(true, out);
            self.close_string(out);
            return 1;
        } else {
            self.cand.push(b);
        }
        self.inspect_string(&[b]);
        self.resolve_candidate(false, out);
        1
    }

    fn resolve_candidate(&mut self, ended: bool, out: &mut Vec<u8>) {
        let decision = self.rewrite.decide(&self.cand, ended);
        match decision {
            Decision::NeedMore if !ended && self.cand.len() < self.rewrite.max_hold() => return,
            Decision::Match { prefix_len, slash } => {
                let to = if slash {
                    &self.rewrite.to_json_slash
                } else {
                    &self.rewrite.to_json
                };
                out.extend_from_slice(to);
                out.extend_from_slice(self.cand.get(prefix_len..).unwrap_or_default());
            }
            _ => out.extend_from_slice(&self.cand),
        }
        self.cand.clear();
        self.kind = StrKind::Decided;
    }

    fn open_string(&mut self, candidate: bool) {
        self.in_string = true;
        self.escaped = false;
        self.kind = if candidate {
            StrKind::Candidate
        } else {
            StrKind::Plain
        };
        self.key_tail.clear();
        self.key_len = 0;
        self.key_has_escape = false;
        self.after_string = None;
        self.value_pending = false;
        if let Some(inspector) = &mut self.inspector {
            inspector.string_start();
        }
    }

    fn inspect_string(&mut self, bytes: &[u8]) {
        if let Some(inspector) = &mut self.inspector {
            inspector.string_bytes(bytes);
        }
    }

    fn close_string(&mut self, out: &mut Vec<u8>) {
        out.push(b'"');
        if let Some(inspector) = &mut self.inspector {
            inspector.string_end();
        }
        let is_key = self.kind == StrKind::Plain
            && !self.key_has_escape
            && self.keys.matches(&self.key_tail, self.key_len);
        self.after_string = Some(is_key);
        self.in_string = false;
        self.kind = StrKind::Plain;
    }

    fn note_key(&mut self, bytes: &[u8]) {
        self.key_len = self.key_len.saturating_add(bytes.len());
        let keep = &bytes[bytes.len().saturating_sub(KEY_TAIL)..];
        self.key_tail.extend_from_slice(keep);
        let excess = self.key_tail.len().saturating_sub(KEY_TAIL);
        if excess > 0 {
            self.key_tail.drain(..excess);
        }
    }
}

/// Which way a `$batch` body travels, which decides what gets rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BatchDirection {
    /// App -> Dataverse: inner request lines and `@odata.bind`/`@odata.id` JSON values.
    Request,
    /// Dataverse -> app: inner `Location`/`OData-EntityId` headers and `@odata.*` links.
    Response,
}

/// Longest line held for inspection: a request line with a URL at Dataverse's 64 KB limit
/// fits. Longer lines pass through unchanged in responses and are refused in requests.
const MAX_LINE: usize = 65 * 1024;
/// RFC 2046 caps boundaries at 70 chars; allow some slack, refuse anything absurd.
const MAX_BOUNDARY: usize = 200;
/// Batch nests one changeset level; anything deeper than this is passed through opaquely
/// (responses) or refused (requests).
const MAX_DEPTH: usize = 8;
/// Methods a part may use: the Web API's.
const PART_METHODS: [&[u8]; 5] = [b"GET", b"POST", b"PATCH", b"PUT", b"DELETE"];

#[derive(Clone, Debug)]
enum MimeKind {
    Http,
    Multipart(Vec<u8>),
    Other,
}

#[derive(Clone, Debug)]
enum PartState {
    /// Before the first delimiter of the innermost multipart; learns the outer boundary
    /// (responses).
    Preamble,
    /// After a close delimiter, until the enclosing multipart's next delimiter.
    Epilogue,
    /// MIME headers of a part. `frozen`: the part declares a Content-Length, so nothing
    /// inside may change length (responses; requests hold the part and fix the length).
    MimeHeaders { kind: MimeKind, frozen: bool },
    /// Before the inner HTTP request line / status line.
    HttpStart { frozen: bool },
    /// Inner HTTP headers.
    HttpHeaders {
        frozen: bool,
        has_length: bool,
        json: bool,
    },
    /// Part body up to the next delimiter; JSON-rewritten when `json` is set.
    Body { json: Option<Box<JsonLinkRewriter>> },
}

/// The request direction's state beyond rewriting: the rules every part meets and the
/// part being held.
#[derive(Clone, Debug)]
struct PartChecks {
    rules: PartRules,
    /// Parts seen so far; the current part's name.
    position: usize,
    part: PartName,
    /// Parts held, outermost first; their bytes are the tail of `held`.
    holds: Vec<Hold>,
    held: Vec<u8>,
    /// The current header block already had a Content-Type / Content-Length.
    seen_type: bool,
    seen_length: bool,
    /// The outer close delimiter was seen.
    closed: bool,
    /// The access checks of the current part's body, from its request line.
    part_body: Option<BodyInspector>,
    /// Input bytes consumed; where the current line started and the line break before it.
    consumed: u64,
    line_start: u64,
    eol_before_line: usize,
    last_eol: usize,
    at_line_start: bool,
    last_cr: bool,
}

impl PartChecks {
    fn new(rules: PartRules) -> Self {
        Self {
            rules,
            position: 0,
            part: PartName::default(),
            holds: Vec::new(),
            held: Vec::new(),
            seen_type: false,
            seen_length: false,
            closed: false,
            part_body: None,
            consumed: 0,
            line_start: 0,
            eol_before_line: 0,
            last_eol: 0,
            at_line_start: true,
            last_cr: false,
        }
    }

    fn malformed(&self, what: &'static str) -> BatchRefusal {
        BatchRefusal::Malformed {
            part: self.part.clone(),
            what,
        }
    }

    /// Counts input bytes, notes line starts and ends, and refuses a carriage return that
    /// does not end a line: some MIME readers take it as a line break, so a delimiter after
    /// it would be seen by Dataverse and not here.
    fn consume(&mut self, bytes: &[u8]) -> Result<(), BatchRefusal> {
        let Some(&last) = bytes.last() else {
            return Ok(());
        };
        let lone = |i: usize| bytes.get(i + 1).is_some_and(|&n| n != b'\n');
        if (self.last_cr && bytes[0] != b'\n') || memchr::memchr_iter(b'\r', bytes).any(lone) {
            return Err(self.malformed("a carriage return that does not end a line"));
        }
        if self.at_line_start {
            self.line_start = self.consumed;
            self.eol_before_line = self.last_eol;
            self.at_line_start = false;
        }
        if last == b'\n' {
            let cr = match bytes.len() {
                1 => self.last_cr,
                n => bytes[n - 2] == b'\r',
            };
            self.last_eol = if cr { 2 } else { 1 };
            self.at_line_start = true;
        }
        self.last_cr = last == b'\r';
        self.consumed += bytes.len() as u64;
        Ok(())
    }

    fn top(&mut self) -> Option<&mut Hold> {
        self.holds.last_mut()
    }
}

/// Streaming rewriter for `$batch` multipart/mixed bodies (request or response).
///
/// Line-oriented: changeset boundaries come from nested `Content-Type: multipart/mixed;
/// boundary=...` headers; the outer one from the request's Content-Type (requests) or the
/// first `--` line (responses). Body lines are streamed (only a possible delimiter line start
/// is held); other lines are held up to 65 KiB. Inner bodies are JSON-scanned unless their
/// Content-Type names something other than JSON.
///
/// Requests are also checked ([`PartRules`]): every part's headers are held until they have
/// passed, so a refused header never leaves; a part that declares a Content-Length (MIME or
/// inner HTTP) is held whole, bounded, rewritten, and sent with its lengths fixed. Anything
/// the parser could read differently from Dataverse's (a bare CR, a line that looks like a
/// delimiter but is not one, an unknown part type, content after the close delimiter) is
/// refused rather than passed on unread. In responses, parts with a Content-Length are left
/// unchanged, since their length cannot be fixed up while streaming.
#[derive(Clone, Debug)]
pub struct BatchLinkRewriter {
    rewrite: LinkRewrite,
    direction: BatchDirection,
    boundaries: Vec<Vec<u8>>,
    state: PartState,
    line: Vec<u8>,
    /// The rest of the current line bypasses `line` (long line or non-delimiter body line).
    streaming: bool,
    checks: Option<Box<PartChecks>>,
    /// Set by the first refusal; every later call repeats it.
    failed: Option<BatchRefusal>,
}

impl BatchLinkRewriter {
    /// Rewrites Dataverse's `$batch` responses for the caller.
    pub fn response(rewrite: LinkRewrite) -> Self {
        Self::build(rewrite, BatchDirection::Response, None)
    }

    /// Rewrites and checks a caller's `$batch` request: `rewrite` maps the gateway's
    /// public base to the Dataverse origin.
    pub fn request(rewrite: LinkRewrite, rules: PartRules) -> Self {
        Self::build(
            rewrite,
            BatchDirection::Request,
            Some(Box::new(PartChecks::new(rules))),
        )
    }

    fn build(
        rewrite: LinkRewrite,
        direction: BatchDirection,
        checks: Option<Box<PartChecks>>,
    ) -> Self {
        let boundaries = checks
            .as_ref()
            .map(|c| vec![c.rules.boundary().to_vec()])
            .unwrap_or_default();
        Self {
            rewrite,
            direction,
            boundaries,
            state: PartState::Preamble,
            line: Vec::new(),
            streaming: false,
            checks,
            failed: None,
        }
    }

    /// Feed the next chunk; rewritten output is appended to `out`. In requests, held parts
    /// are appended once they are complete, and a refusal stops everything.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), BatchRefusal> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = match self.checks.as_mut().map(|c| std::mem::take(&mut c.held)) {
            None => self.push_lines(chunk, out),
            Some(mut held) => {
                let result = self.push_lines(chunk, &mut held);
                self.release(held, out);
                result
            }
        };
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// End of body: flush whatever is held and reset for reuse.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), BatchRefusal> {
        let result = match self.failed.take() {
            Some(e) => Err(e),
            None => match self.checks.as_mut().map(|c| std::mem::take(&mut c.held)) {
                None => self.finish_lines(out),
                Some(mut held) => {
                    let result = self.finish_lines(&mut held);
                    if result.is_ok() {
                        out.append(&mut held);
                    }
                    result
                }
            },
        };
        let checks = self
            .checks
            .take()
            .map(|c| Box::new(PartChecks::new(c.rules)));
        *self = Self::build(self.rewrite.clone(), self.direction, checks);
        result
    }

    fn finish_lines(&mut self, out: &mut Vec<u8>) -> Result<(), BatchRefusal> {
        if !self.line.is_empty() {
            self.complete_line(out)?;
        }
        if let PartState::Body { json: Some(j) } = &mut self.state {
            j.finish(out);
        }
        match &self.checks {
            Some(c) if c.last_cr => Err(c.malformed("a carriage return that does not end a line")),
            Some(c) if !c.closed => {
                Err(c.malformed("the body ends before the batch's close delimiter"))
            }
            _ => Ok(()),
        }
    }

    /// Moves the held output no part needs any more to `out`.
    fn release(&mut self, mut held: Vec<u8>, out: &mut Vec<u8>) {
        let Some(checks) = self.checks.as_mut() else {
            return;
        };
        let keep_from = checks.holds.first().map_or(held.len(), |h| h.start);
        if keep_from > 0 {
            out.extend_from_slice(&held[..keep_from]);
            held.drain(..keep_from);
            for hold in &mut checks.holds {
                hold.shift_back(keep_from);
            }
        }
        checks.held = held;
    }

    fn push_lines(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), BatchRefusal> {
        let mut rest = chunk;
        while let Some(&first) = rest.first() {
            let (seg, eol) = match memchr(b'\n', rest) {
                Some(pos) => (&rest[..=pos], true),
                None => (rest, false),
            };
            if self.streaming {
                self.consume(seg)?;
                self.emit(seg, out)?;
                rest = &rest[seg.len()..];
                if eol {
                    self.streaming = false;
                    self.end_unread_line();
                }
                self.check_held(out)?;
                continue;
            }
            let in_body = matches!(self.state, PartState::Body { .. });
            if in_body && self.line.is_empty() && first != b'-' {
                self.streaming = true;
                continue;
            }
            let take = seg.len().min(MAX_LINE - self.line.len());
            self.consume(&seg[..take])?;
            self.line.extend_from_slice(&seg[..take]);
            rest = &rest[take..];
            if take == seg.len() && eol {
                self.complete_line(out)?;
            } else if self.line.len() >= MAX_LINE || (in_body && !self.could_be_delimiter()) {
                if self.line.len() >= MAX_LINE {
                    self.long_line()?;
                }
                let line = std::mem::take(&mut self.line);
                self.emit(&line, out)?;
                self.line = line;
                self.line.clear();
                self.streaming = true;
            }
            self.check_held(out)?;
        }
        Ok(())
    }

    fn consume(&mut self, bytes: &[u8]) -> Result<(), BatchRefusal> {
        match self.checks.as_mut() {
            Some(c) => c.consume(bytes),
            None => Ok(()),
        }
    }

    /// A line too long to inspect: fine in a body or preamble, unless it could be a
    /// delimiter; never in headers or a request line (requests only).
    fn long_line(&self) -> Result<(), BatchRefusal> {
        let Some(c) = &self.checks else {
            return Ok(());
        };
        let inspected = matches!(
            self.state,
            PartState::MimeHeaders { .. }
                | PartState::HttpStart { .. }
                | PartState::HttpHeaders { .. }
                | PartState::Epilogue
        );
        if inspected || self.line.starts_with(b"--") {
            Err(c.malformed(
                "a header, request or delimiter line longer than 65 KiB (Dataverse's URL limit is 64 KB)",
            ))
        } else {
            Ok(())
        }
    }

    /// The part being held must stay within `server.max_batch_part`.
    fn check_held(&self, held: &[u8]) -> Result<(), BatchRefusal> {
        let Some(c) = &self.checks else {
            return Ok(());
        };
        match c.holds.first() {
            Some(h) if held.len() - h.start > c.rules.max_held() => {
                Err(BatchRefusal::PartTooLarge {
                    part: h.part.clone(),
                    limit: c.rules.max_held(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Body bytes go through the part's JSON rewriter, everything else straight out.
    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), BatchRefusal> {
        match &mut self.state {
            PartState::Body { json: Some(j) } => {
                j.push(bytes, out);
                part_refusal(j, self.checks.as_deref())
            }
            _ => {
                out.extend_from_slice(bytes);
                Ok(())
            }
        }
    }

    /// A line that streamed past uninspected counts as a non-blank, non-delimiter line.
    fn end_unread_line(&mut self) {
        if let PartState::HttpStart { frozen } = self.state {
            self.state = PartState::HttpHeaders {
                frozen,
                has_length: false,
                json: true,
            };
        }
    }

    /// Whether the held start of a body line may still become a delimiter line. Requests
    /// compare without case and hold any line that starts like a delimiter to its end, so
    /// a near miss is seen (and refused) whole.
    fn could_be_delimiter(&self) -> bool {
        let line = self.line.as_slice();
        let Some(after) = line.strip_prefix(b"--") else {
            return line.iter().all(|&c| c == b'-');
        };
        if self.checks.is_some() {
            return self.boundaries.iter().any(|b| {
                let n = after.len().min(b.len());
                after[..n].eq_ignore_ascii_case(&b[..n])
            });
        }
        self.boundaries.iter().any(|b| {
            if after.len() <= b.len() {
                return b.starts_with(after);
            }
            let Some(tail) = after.strip_prefix(b.as_slice()) else {
                return false;
            };
            let tail = match tail {
                [b'-'] => &[][..],
                [b'-', b'-', t @ ..] => t,
                t => t,
            };
            tail.iter().all(|&c| matches!(c, b' ' | b'\t' | b'\r'))
        })
    }

    fn complete_line(&mut self, out: &mut Vec<u8>) -> Result<(), BatchRefusal> {
        let line = std::mem::take(&mut self.line);
        let result = match self.delimiter(&line, out) {
            Ok(true) => Ok(()),
            Ok(false) if self.checks.is_some() => self.checked_line(&line, out),
            Ok(false) => {
                self.content_line(&line, out);
                Ok(())
            }
            Err(e) => Err(e),
        };
        self.line = line;
        self.line.clear();
        result
    }

    /// Handle `line` if it is a delimiter or close delimiter of an open multipart.
    fn delimiter(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<bool, BatchRefusal> {
        let Some(after) = trim_line_end(line).strip_prefix(b"--") else {
            return Ok(false);
        };
        let mut hit = None;
        for (level, b) in self.boundaries.iter().enumerate().rev() {
            if after == b.as_slice() {
                hit = Some((level, false));
                break;
            }
            if after.strip_suffix(b"--") == Some(b.as_slice()) {
                hit = Some((level, true));
                break;
            }
        }
        if hit.is_none()
            && self.checks.is_none()
            && self.boundaries.is_empty()
            && matches!(self.state, PartState::Preamble)
            && !after.is_empty()
            && after.len() <= MAX_BOUNDARY
        {
            self.boundaries.push(after.to_vec());
            hit = Some((0, false));
        }
        let Some((level, close)) = hit else {
            if let Some(c) = &self.checks {
                let near_miss = self.boundaries.iter().any(|b| {
                    after
                        .get(..b.len())
                        .is_some_and(|p| p.eq_ignore_ascii_case(b))
                });
                if near_miss {
                    return Err(c.malformed("a line that starts like a delimiter but is not one"));
                }
            }
            return Ok(false);
        };
        if let Some(c) = self.checks.as_mut() {
            if matches!(
                self.state,
                PartState::MimeHeaders { .. }
                    | PartState::HttpStart { .. }
                    | PartState::HttpHeaders { .. }
            ) {
                return Err(c.malformed("the part ends inside its headers"));
            }
        }
        if let PartState::Body { json: Some(j) } = &mut self.state {
            j.finish(out);
        }
        if let Some(c) = self.checks.as_mut() {
            while c.holds.last().is_some_and(|h| h.level >= level) {
                if let Some(hold) = c.holds.pop() {
                    hold.finish(out, c.line_start, c.eol_before_line)?;
                }
            }
        }
        out.extend_from_slice(line);
        if close {
            self.boundaries.truncate(level);
            self.state = PartState::Epilogue;
            if let Some(c) = self.checks.as_mut() {
                c.closed |= level == 0;
            }
        } else {
            self.boundaries.truncate(level + 1);
            self.state = PartState::MimeHeaders {
                kind: MimeKind::Other,
                frozen: false,
            };
            if let Some(c) = self.checks.as_mut() {
                c.position += 1;
                c.part = PartName {
                    position: c.position,
                    content_id: None,
                };
                c.seen_type = false;
                c.seen_length = false;
                c.holds.push(Hold::new(level, out.len(), c.part.clone()));
            }
        }
        Ok(true)
    }

    fn content_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let blank = trim_eol(line).is_empty();
        match &mut self.state {
            PartState::Preamble | PartState::Epilogue => out.extend_from_slice(line),
            PartState::Body { json } => match json {
                Some(j) => j.push(line, out),
                None => out.extend_from_slice(line),
            },
            PartState::MimeHeaders { kind, frozen } => {
                out.extend_from_slice(line);
                if blank {
                    let frozen = *frozen;
                    self.state = match std::mem::replace(kind, MimeKind::Other) {
                        MimeKind::Http => PartState::HttpStart { frozen },
                        MimeKind::Multipart(b) if self.boundaries.len() < MAX_DEPTH => {
                            self.boundaries.push(b);
                            PartState::Preamble
                        }
                        MimeKind::Multipart(_) | MimeKind::Other => PartState::Body { json: None },
                    };
                } else if let Some((name, value)) = split_header(line) {
                    if name.eq_ignore_ascii_case(b"content-type") {
                        *kind = mime_kind(trim_line_end(value));
                    } else if name.eq_ignore_ascii_case(b"content-length") {
                        *frozen = true;
                    }
                }
            }
            PartState::HttpStart { frozen } => {
                let frozen = *frozen;
                out.extend_from_slice(line);
                if !blank {
                    self.state = PartState::HttpHeaders {
                        frozen,
                        has_length: false,
                        json: true,
                    };
                }
            }
            PartState::HttpHeaders {
                frozen,
                has_length,
                json,
            } => {
                if blank {
                    out.extend_from_slice(line);
                    let rewrite = !*frozen && !*has_length && *json;
                    self.state = PartState::Body {
                        json: rewrite.then(|| {
                            Box::new(JsonLinkRewriter::new(
                                self.rewrite.clone(),
                                JsonKeys::ResponseLinks,
                            ))
                        }),
                    };
                    return;
                }
                let Some((name, value)) = split_header(line) else {
                    out.extend_from_slice(line);
                    return;
                };
                if name.eq_ignore_ascii_case(b"content-length") {
                    *has_length = true;
                } else if name.eq_ignore_ascii_case(b"content-type") {
                    *json = contains_ignore_case(value, b"json");
                }
                let link_header = name.eq_ignore_ascii_case(b"location")
                    || name.eq_ignore_ascii_case(b"odata-entityid");
                if link_header && !*frozen {
                    header_line(&self.rewrite, line, out);
                } else {
                    out.extend_from_slice(line);
                }
            }
        }
    }

    /// A non-delimiter line of a request: checked, rewritten, and noted in the part's hold.
    fn checked_line(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<(), BatchRefusal> {
        let Some(c) = self.checks.as_mut() else {
            return Ok(());
        };
        let blank = trim_eol(line).is_empty();
        match &mut self.state {
            PartState::Preamble => out.extend_from_slice(line),
            PartState::Epilogue if blank => out.extend_from_slice(line),
            PartState::Epilogue => {
                return Err(c.malformed("content after a close delimiter"));
            }
            PartState::Body { json } => match json {
                Some(j) => {
                    j.push(line, out);
                    part_refusal(j, Some(c))?;
                }
                None => out.extend_from_slice(line),
            },
            PartState::MimeHeaders { kind, .. } => {
                if blank {
                    out.extend_from_slice(line);
                    let region = Region {
                        out_start: out.len(),
                        in_start: c.consumed,
                    };
                    let kind = std::mem::replace(kind, MimeKind::Other);
                    let depth = self.boundaries.len();
                    let hold = c.holds.last_mut();
                    if let Some(h) = hold {
                        h.content = Some(region);
                    }
                    self.state = match kind {
                        MimeKind::Http => PartState::HttpStart { frozen: false },
                        MimeKind::Multipart(b) if depth < MAX_DEPTH => {
                            self.boundaries.push(b);
                            if c.holds.last().is_some_and(|h| !h.has_length()) {
                                c.holds.pop();
                            }
                            PartState::Preamble
                        }
                        MimeKind::Multipart(_) | MimeKind::Other => {
                            return Err(c.malformed(
                                "a part that is neither application/http nor multipart/mixed with a boundary",
                            ));
                        }
                    };
                    c.seen_type = false;
                    c.seen_length = false;
                    return Ok(());
                }
                let Some((name, value)) = split_header(line) else {
                    return Err(c.malformed("a header line without a colon"));
                };
                if name.eq_ignore_ascii_case(b"content-type") {
                    if std::mem::replace(&mut c.seen_type, true) {
                        return Err(c.malformed("two Content-Type headers"));
                    }
                    *kind = checked_mime_kind(trim_line_end(value));
                } else if name.eq_ignore_ascii_case(b"content-id") {
                    c.part.set_content_id(trim_line_end(value));
                    let part = c.part.clone();
                    if let Some(h) = c.top() {
                        h.part = part;
                    }
                } else if name.eq_ignore_ascii_case(b"content-transfer-encoding") {
                    let encoding = trim_line_end(value).trim_ascii();
                    if ![&b"binary"[..], b"8bit", b"7bit"]
                        .iter()
                        .any(|e| encoding.eq_ignore_ascii_case(e))
                    {
                        return Err(c.malformed(
                            "a Content-Transfer-Encoding other than binary (the part would be read unseen)",
                        ));
                    }
                } else if name.eq_ignore_ascii_case(b"content-length") {
                    let field = length_field(c, line, out.len())?;
                    if let Some(h) = c.top() {
                        h.mime_length = Some(field);
                    }
                } else {
                    c.rules.header(name, &c.part)?;
                }
                out.extend_from_slice(line);
            }
            PartState::HttpStart { .. } => {
                if blank {
                    out.extend_from_slice(line);
                    return Ok(());
                }
                let content = trim_eol(line);
                let (first, last) = match (memchr(b' ', content), memrchr(b' ', content)) {
                    (Some(first), Some(last)) if first < last => (first, last),
                    _ => return Err(c.malformed("a part without a request line")),
                };
                let method = &content[..first];
                if !PART_METHODS.contains(&method) {
                    return Err(
                        c.malformed("a part method other than GET, POST, PATCH, PUT or DELETE")
                    );
                }
                if !content[last + 1..].starts_with(b"HTTP/") {
                    return Err(c.malformed("a request line without an HTTP version"));
                }
                let target = &content[first + 1..last];
                let (rewritten, parsed) =
                    c.rules
                        .target(target, self.rewrite.from(), self.rewrite.to(), &c.part)?;
                c.part_body = c.rules.decide(method, &parsed, &c.part)?;
                match rewritten {
                    Some(url) => {
                        out.extend_from_slice(&content[..=first]);
                        out.extend_from_slice(&url);
                        out.extend_from_slice(&line[last..]);
                    }
                    None => out.extend_from_slice(line),
                }
                self.state = PartState::HttpHeaders {
                    frozen: false,
                    has_length: false,
                    json: true,
                };
            }
            PartState::HttpHeaders { json, .. } => {
                if blank {
                    out.extend_from_slice(line);
                    let region = Region {
                        out_start: out.len(),
                        in_start: c.consumed,
                    };
                    if let Some(h) = c.top() {
                        h.body = Some(region);
                    }
                    if c.holds.last().is_some_and(|h| !h.has_length()) {
                        c.holds.pop();
                    }
                    let json = *json;
                    // A body the access rules read is read as JSON whatever its type says.
                    let rewriter = match c.part_body.take() {
                        Some(inspector) => {
                            Some(JsonLinkRewriter::inspected(self.rewrite.clone(), inspector))
                        }
                        None => json.then(|| {
                            JsonLinkRewriter::new(self.rewrite.clone(), JsonKeys::RequestBinds)
                        }),
                    };
                    self.state = PartState::Body {
                        json: rewriter.map(Box::new),
                    };
                    return Ok(());
                }
                let Some((name, value)) = split_header(line) else {
                    return Err(c.malformed("a header line without a colon"));
                };
                if name.eq_ignore_ascii_case(b"content-length") {
                    if c.holds.last().is_some_and(|h| h.http_length.is_some()) {
                        return Err(c.malformed("two Content-Length headers"));
                    }
                    let field = length_field(c, line, out.len())?;
                    if let Some(h) = c.top() {
                        h.http_length = Some(field);
                    }
                } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                    return Err(c.malformed("a Transfer-Encoding inside a part"));
                } else if name.eq_ignore_ascii_case(b"host") {
                    let value = trim_line_end(value);
                    if let Some(host) =
                        c.rules
                            .host(value, self.rewrite.from(), self.rewrite.to(), &c.part)?
                    {
                        out.extend_from_slice(&line[..line.len() - trim_start(line).len()]);
                        out.extend_from_slice(b"Host: ");
                        out.extend_from_slice(&host);
                        out.extend_from_slice(&line[trim_line_end(line).len()..]);
                        return Ok(());
                    }
                } else if name.eq_ignore_ascii_case(b"content-type") {
                    *json = contains_ignore_case(value, b"json");
                } else {
                    c.rules.header(name, &c.part)?;
                }
                out.extend_from_slice(line);
            }
        }
        Ok(())
    }
}

/// A part body's pair the access rules refused, named by its part.
fn part_refusal(json: &JsonLinkRewriter, checks: Option<&PartChecks>) -> Result<(), BatchRefusal> {
    match (json.refusal(), checks) {
        (Some(denied), Some(c)) => Err(BatchRefusal::PartAccess {
            part: c.part.clone(),
            denied: denied.clone(),
        }),
        _ => Ok(()),
    }
}

/// A `Content-Length: <digits>` line about to be written at `at` in the held output: where
/// its digits will be and what they say. One per header block, digits only.
fn length_field(
    checks: &mut PartChecks,
    line: &[u8],
    at: usize,
) -> Result<LengthField, BatchRefusal> {
    if std::mem::replace(&mut checks.seen_length, true) {
        return Err(checks.malformed("two Content-Length headers"));
    }
    let colon = memchr(b':', line).unwrap_or(0);
    let after = &line[colon + 1..];
    let lead = after.len() - trim_start(after).len();
    let start = colon + 1 + lead;
    let digits = trim_line_end(&line[start..]);
    let declared = std::str::from_utf8(digits)
        .ok()
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse::<u64>().ok())
        .ok_or_else(|| checks.malformed("a Content-Length that is not a number"))?;
    Ok(LengthField {
        at: at + start..at + start + digits.len(),
        declared,
    })
}

/// A part's Content-Type in a request, read strictly: `application/http` exactly, or
/// `multipart/mixed` with one boundary.
fn checked_mime_kind(value: &[u8]) -> MimeKind {
    let value = trim_start(value);
    let mime = value.split(|&b| b == b';').next().unwrap_or_default();
    if mime.trim_ascii().eq_ignore_ascii_case(b"application/http") {
        MimeKind::Http
    } else {
        multipart_mixed_boundary(value).map_or(MimeKind::Other, MimeKind::Multipart)
    }
}

/// Rewrite the value of a `Name: value` line, keeping name, spacing and line end as they are.
fn header_line(rewrite: &LinkRewrite, line: &[u8], out: &mut Vec<u8>) {
    if let Some(colon) = memchr(b':', line) {
        let after = &line[colon + 1..];
        let lead = after
            .iter()
            .take_while(|&&c| c == b' ' || c == b'\t')
            .count();
        let start = colon + 1 + lead;
        let end = start + trim_line_end(&line[start..]).len();
        if let Some(v) = rewrite.header_value(&line[start..end]) {
            out.extend_from_slice(&line[..start]);
            out.extend_from_slice(&v);
            out.extend_from_slice(&line[end..]);
            return;
        }
    }
    out.extend_from_slice(line);
}

/// `Name: value` -> (trimmed name, raw value after the colon).
fn split_header(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = memchr(b':', line)?;
    let name = &line[..colon];
    let name_len = name.len()
        - name
            .iter()
            .rev()
            .take_while(|&&c| c == b' ' || c == b'\t')
            .count();
    Some((&name[..name_len], &line[colon + 1..]))
}

fn mime_kind(value: &[u8]) -> MimeKind {
    let value = trim_start(value);
    if starts_with_ignore_case(value, b"application/http") {
        MimeKind::Http
    } else if starts_with_ignore_case(value, b"multipart/") {
        parse_boundary(value).map_or(MimeKind::Other, MimeKind::Multipart)
    } else {
        MimeKind::Other
    }
}

/// The `boundary=` parameter of a multipart Content-Type value, quoted or not.
fn parse_boundary(value: &[u8]) -> Option<Vec<u8>> {
    const KEY: &[u8] = b"boundary=";
    let pos = value
        .windows(KEY.len())
        .position(|w| w.eq_ignore_ascii_case(KEY))?;
    let rest = &value[pos + KEY.len()..];
    let b = if let Some(quoted) = rest.strip_prefix(b"\"") {
        &quoted[..memchr(b'"', quoted)?]
    } else {
        let end = rest
            .iter()
            .position(|&c| matches!(c, b';' | b' ' | b'\t' | b'\r' | b'\n'))
            .unwrap_or(rest.len());
        &rest[..end]
    };
    (!b.is_empty() && b.len() <= MAX_BOUNDARY).then(|| b.to_vec())
}

fn starts_with_ignore_case(s: &[u8], prefix: &[u8]) -> bool {
    s.get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
}

fn contains_ignore_case(s: &[u8], needle: &[u8]) -> bool {
    s.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

fn trim_start(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
    &s[n..]
}

/// Strip a trailing LF or CRLF.
fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Strip the line ending and any trailing spaces/tabs (MIME transport padding).
fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = trim_eol(line);
    let n = line
        .iter()
        .rev()
        .take_while(|&&c| matches!(c, b' ' | b'\t' | b'\r'))
        .count();
    &line[..line.len() - n]
}

/// Whole-buffer version of [`JsonLinkRewriter`].
pub fn rewrite_json(rewrite: &LinkRewrite, keys: JsonKeys, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut rw = JsonLinkRewriter::new(rewrite.clone(), keys);
    rw.push(body, &mut out);
    rw.finish(&mut out);
    out
}

/// Whole-buffer version of [`BatchLinkRewriter::response`].
pub fn rewrite_batch_response(rewrite: &LinkRewrite, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut rw = BatchLinkRewriter::response(rewrite.clone());
    // Responses are never refused.
    let _ = rw.push(body, &mut out).and_then(|()| rw.finish(&mut out));
    out
}

/// Whole-buffer version of [`BatchLinkRewriter::request`].
pub fn rewrite_batch_request(
    rewrite: &LinkRewrite,
    rules: &PartRules,
    body: &[u8],
) -> Result<Vec<u8>, BatchRefusal> {
    let mut out = Vec::with_capacity(body.len());
    let mut rw = BatchLinkRewriter::request(rewrite.clone(), rules.clone());
    rw.push(body, &mut out)?;
    rw.finish(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORG: &str = "https://contoso.crm.dynamics.com";
    const GW: &str = "http://localhost:8080";

    fn resp() -> LinkRewrite {
        LinkRewrite::new(ORG, GW)
    }

    fn req() -> LinkRewrite {
        LinkRewrite::new(GW, ORG)
    }

    fn json(rw: &LinkRewrite, keys: JsonKeys, s: &str) -> String {
        String::from_utf8(rewrite_json(rw, keys, s.as_bytes())).unwrap()
    }

    /// Feed `body` split at every position, and one byte at a time; all must equal `whole`.
    fn assert_split_invariant(whole: &[u8], run: &mut dyn FnMut(&[&[u8]]) -> Vec<u8>) {
        for k in 0..=whole.len() {
            let (a, b) = whole.split_at(k);
            assert_eq!(run(&[a, b]), run(&[whole]), "split at {k}");
        }
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(run(&bytes), run(&[whole]), "byte at a time");
    }

    fn json_chunks(rw: &LinkRewrite, keys: JsonKeys, chunks: &[&[u8]]) -> Vec<u8> {
        let mut r = JsonLinkRewriter::new(rw.clone(), keys);
        let mut out = Vec::new();
        for c in chunks {
            r.push(c, &mut out);
        }
        r.finish(&mut out);
        out
    }

    fn batch_chunks(rw: &LinkRewrite, dir: BatchDirection, chunks: &[&[u8]]) -> Vec<u8> {
        match dir {
            BatchDirection::Response => resp_chunks(rw, chunks),
            BatchDirection::Request => req_chunks(rw, &rules(BATCH), chunks).unwrap(),
        }
    }

    fn resp_chunks(rw: &LinkRewrite, chunks: &[&[u8]]) -> Vec<u8> {
        let mut r = BatchLinkRewriter::response(rw.clone());
        let mut out = Vec::new();
        for c in chunks {
            r.push(c, &mut out).unwrap();
        }
        r.finish(&mut out).unwrap();
        out
    }

    fn req_chunks(
        rw: &LinkRewrite,
        rules: &PartRules,
        chunks: &[&[u8]],
    ) -> Result<Vec<u8>, BatchRefusal> {
        let mut r = BatchLinkRewriter::request(rw.clone(), rules.clone());
        let mut out = Vec::new();
        for c in chunks {
            r.push(c, &mut out)?;
        }
        r.finish(&mut out)?;
        Ok(out)
    }

    const BATCH: &str = "dwa_batch_0e5f2c3a";

    fn grant(allowed: &[&str]) -> crate::access::Grant {
        crate::access::Grant {
            rule: std::sync::Arc::from("test"),
            impersonation: crate::access::ImpersonationPolicy::Required,
            control_headers: allowed
                .iter()
                .map(|n| http::HeaderName::from_bytes(n.as_bytes()).unwrap())
                .collect(),
        }
    }

    fn rules(boundary: &str) -> PartRules {
        PartRules::new(grant(&[]), boundary.as_bytes().to_vec(), 1 << 20)
    }

    const SKIPTOKEN: &str = "$skiptoken=%3Ccookie%20pagenumber=%222%22%20pagingcookie=%22%253ccookie%2520page%253d%25221%2522%253e%253caccountid%2520last%253d%2522%257bB1D4B6E1%257d%2522%2520first%253d%2522%257b7A4814F9%257d%2522%2520%252f%253e%253c%252fcookie%253e%22%20istracking=%22False%22%20/%3E";

    fn sample_response() -> String {
        format!(
            concat!(
                "{{\"@odata.context\":\"{o}/api/data/v9.2/$metadata#accounts(name,contact_customer_accounts())\",\n",
                "  \"value\" : [ {{\"@odata.etag\":\"W/\\\"123\\\"\",\"name\":\"A \\\"q\\\" \\u00e9\",\"revenue\":1.50e3,",
                "\"websiteurl\":\"{o}/x\",\"contact_customer_accounts\":[{{\"@odata.id\":\"{o}/api/data/v9.2/contacts(1)\"}}],",
                "\"contact_customer_accounts@odata.nextLink\":\"{o}/api/data/v9.2/accounts(1)/contact_customer_accounts?{s}\"}},",
                "\t{{\"nested\":{{\"deep\":[[{{\"Microsoft.Dynamics.CRM.x@odata.context\":\"{o}\"}}]]}},\"x\":null,\"y\":true}} ],\n",
                "\"@odata.nextLink\":\"{o}/api/data/v9.2/accounts?{s}\",\"@odata.deltaLink\":\"{o}(x)\"}}"
            ),
            o = ORG,
            s = SKIPTOKEN
        )
    }

    #[test]
    fn response_links_rewritten_at_any_depth_data_fields_untouched() {
        let input = sample_response();
        let expected = format!(
            concat!(
                "{{\"@odata.context\":\"{g}/api/data/v9.2/$metadata#accounts(name,contact_customer_accounts())\",\n",
                "  \"value\" : [ {{\"@odata.etag\":\"W/\\\"123\\\"\",\"name\":\"A \\\"q\\\" \\u00e9\",\"revenue\":1.50e3,",
                "\"websiteurl\":\"{o}/x\",\"contact_customer_accounts\":[{{\"@odata.id\":\"{g}/api/data/v9.2/contacts(1)\"}}],",
                "\"contact_customer_accounts@odata.nextLink\":\"{g}/api/data/v9.2/accounts(1)/contact_customer_accounts?{s}\"}},",
                "\t{{\"nested\":{{\"deep\":[[{{\"Microsoft.Dynamics.CRM.x@odata.context\":\"{g}\"}}]]}},\"x\":null,\"y\":true}} ],\n",
                "\"@odata.nextLink\":\"{g}/api/data/v9.2/accounts?{s}\",\"@odata.deltaLink\":\"{g}(x)\"}}"
            ),
            o = ORG,
            g = GW,
            s = SKIPTOKEN
        );
        assert_eq!(json(&resp(), JsonKeys::ResponseLinks, &input), expected);
    }

    #[test]
    fn skiptoken_preserved_byte_for_byte() {
        let input = format!("{{\"@odata.nextLink\":\"{ORG}/api/data/v9.2/accounts?{SKIPTOKEN}\"}}");
        let out = json(&resp(), JsonKeys::ResponseLinks, &input);
        assert_eq!(
            out,
            format!("{{\"@odata.nextLink\":\"{GW}/api/data/v9.2/accounts?{SKIPTOKEN}\"}}")
        );
        assert!(out.contains("%253Ccookie") || out.contains("%253ccookie"));
    }

    #[test]
    fn escaped_slash_form_rewritten_with_escaped_to() {
        let rw = LinkRewrite::new(ORG, "https://gw.example.com/prefix");
        let input = r#"{"@odata.nextLink":"https:\/\/contoso.crm.dynamics.com\/api\/data?$x=1","@odata.id":"https://contoso.crm.dynamics.com\/a"}"#;
        let expected = r#"{"@odata.nextLink":"https:\/\/gw.example.com\/prefix\/api\/data?$x=1","@odata.id":"https://gw.example.com/prefix\/a"}"#;
        assert_eq!(json(&rw, JsonKeys::ResponseLinks, input), expected);
    }

    #[test]
    fn prefix_must_end_at_url_delimiter() {
        let keep = [
            "https://contoso.crm.dynamics.com.evil.com/api",
            "https://contoso.crm.dynamics.com:444/api",
            "https://contoso.crm.dynamics.co",
            "http://contoso.crm.dynamics.com/api",
            " https://contoso.crm.dynamics.com/api",
            "https://contoso.crm.dynamics.com\\u002fapi",
        ];
        for v in keep {
            let input = format!("{{\"@odata.nextLink\":\"{v}\"}}");
            assert_eq!(json(&resp(), JsonKeys::ResponseLinks, &input), input, "{v}");
        }
        for (v, want) in [
            (ORG.to_string(), GW.to_string()),
            (format!("{ORG}?a=b"), format!("{GW}?a=b")),
            (format!("{ORG}(1)"), format!("{GW}(1)")),
            (format!("{ORG}/"), format!("{GW}/")),
        ] {
            let input = format!("{{\"@odata.id\":\"{v}\"}}");
            let expected = format!("{{\"@odata.id\":\"{want}\"}}");
            assert_eq!(json(&resp(), JsonKeys::ResponseLinks, &input), expected);
        }
    }

    #[test]
    fn only_selected_keys_and_only_values() {
        let input = format!(
            "{{\"{ORG}/k\":\"{ORG}/v\",\"a@odata.context\":[\"{ORG}/arr\"],\"@odata.editLink\":\"{ORG}/e\",\
             \"@odata.id\" : 5, \"n\":\"{ORG}/after-number\",\"@odata.id\"\n:\n\"{ORG}/ws\"}}"
        );
        let expected = input.replace(&format!("\n\"{ORG}/ws"), &format!("\n\"{GW}/ws"));
        assert_ne!(input, expected);
        assert_eq!(json(&resp(), JsonKeys::ResponseLinks, &input), expected);
    }

    #[test]
    fn escaped_property_names_are_not_matched() {
        let input =
            format!("{{\"@odata\\u002enextLink\":\"{ORG}/a\",\"x\\\"@odata.id\":\"{ORG}/b\"}}");
        assert_eq!(json(&resp(), JsonKeys::ResponseLinks, &input), input);
    }

    #[test]
    fn request_binds_and_ref_id() {
        let input = format!(
            "{{\"name\":\"x\",\"parentcustomerid_account@odata.bind\":\"{GW}/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)\",\
             \"primarycontactid@odata.bind\":\"/contacts(2)\",\"@odata.id\":\"{GW}/api/data/v9.2/contacts(3)\",\
             \"websiteurl\":\"{GW}/w\",\"@odata.nextLink\":\"{GW}/n\",\"x@odata.id\":\"{GW}/xid\",\
             \"list@odata.bind\":[\"{GW}/accounts(4)\"]}}"
        );
        let expected = input
            .replace(
                &format!("bind\":\"{GW}/api"),
                &format!("bind\":\"{ORG}/api"),
            )
            .replace(
                &format!("\"@odata.id\":\"{GW}"),
                &format!("\"@odata.id\":\"{ORG}"),
            );
        assert_eq!(expected.matches(ORG).count(), 2);
        assert_eq!(json(&req(), JsonKeys::RequestBinds, &input), expected);
        // The response key set does not touch binds.
        let bind = format!("{{\"a@odata.bind\":\"{GW}/x\"}}");
        assert_eq!(json(&req(), JsonKeys::ResponseLinks, &bind), bind);
    }

    #[test]
    fn json_every_split_point_matches_whole_buffer() {
        let doc = sample_response();
        let rw = resp();
        let whole = rewrite_json(&rw, JsonKeys::ResponseLinks, doc.as_bytes());
        assert_ne!(whole, doc.as_bytes());
        assert_split_invariant(doc.as_bytes(), &mut |c| {
            json_chunks(&rw, JsonKeys::ResponseLinks, c)
        });
        let escaped = r#"{"@odata.nextLink":"https:\/\/contoso.crm.dynamics.com\/a","b@odata.id":"https://contoso.crm.dynamics.com\/b"}"#;
        assert_split_invariant(escaped.as_bytes(), &mut |c| {
            json_chunks(&rw, JsonKeys::ResponseLinks, c)
        });
        let binds = format!("{{\"a@odata.bind\":\"{GW}(1)\",\"@odata.id\":\"{GW}\"}}");
        assert_split_invariant(binds.as_bytes(), &mut |c| {
            json_chunks(&req(), JsonKeys::RequestBinds, c)
        });
    }

    #[test]
    fn candidate_hold_is_bounded_and_other_strings_stream() {
        let rw = resp();
        let mut r = JsonLinkRewriter::new(rw.clone(), JsonKeys::ResponseLinks);
        let mut out = Vec::new();
        let head = b"{\"@odata.nextLink\":\"https://contoso.crm.dynamics.com";
        r.push(head, &mut out);
        assert!(r.cand.len() <= rw.from().len() + 1);
        r.push(b".evil", &mut out);
        assert!(r.cand.is_empty());
        let big = vec![b'a'; 1 << 20];
        r.push(&big, &mut out);
        assert_eq!(out.len(), head.len() + 5 + big.len());
        // A huge non-candidate string is never held either.
        let mut r = JsonLinkRewriter::new(rw, JsonKeys::ResponseLinks);
        let mut out = Vec::new();
        r.push(b"{\"k\":\"", &mut out);
        r.push(&big, &mut out);
        assert_eq!(out.len(), 6 + big.len());
        assert!(r.cand.is_empty() && r.key_tail.len() <= KEY_TAIL);
    }

    #[test]
    fn header_values() {
        let rw = resp();
        let h = |v: &str| {
            rw.header_value(v.as_bytes())
                .map(|v| String::from_utf8(v).unwrap())
        };
        assert_eq!(
            h("https://contoso.crm.dynamics.com/api/data/v9.2/accounts(1)").as_deref(),
            Some("http://localhost:8080/api/data/v9.2/accounts(1)")
        );
        assert_eq!(h(ORG).as_deref(), Some(GW));
        assert_eq!(h("https://contoso.crm.dynamics.com.evil.com/x"), None);
        assert_eq!(h("/api/data/v9.2/accounts(1)"), None);
        assert_eq!(LinkRewrite::new("", GW).header_value(b"/x"), None);
        assert_eq!(rw.reversed().from(), GW);
    }

    #[test]
    fn aliases_and_any_case_of_the_origin_are_rewritten_but_paths_stay_exact() {
        let rw = LinkRewrite::with_aliases(ORG, ["https://contoso.api.crm.dynamics.com"], GW);
        let h = |v: &str| {
            rw.header_value(v.as_bytes())
                .map(|v| String::from_utf8(v).unwrap())
        };
        for link in [
            "https://contoso.crm.dynamics.com/api/data/v9.2/accounts(1)",
            "HTTPS://CONTOSO.CRM.DYNAMICS.COM/api/data/v9.2/accounts(1)",
            "https://contoso.api.crm.dynamics.com/api/data/v9.2/accounts(1)",
            "https://Contoso.API.Crm.Dynamics.com/api/data/v9.2/accounts(1)",
        ] {
            assert_eq!(
                h(link).as_deref(),
                Some("http://localhost:8080/api/data/v9.2/accounts(1)"),
                "{link}"
            );
        }
        assert_eq!(h("https://contoso.api.crm.dynamics.com.evil.com/x"), None);
        assert_eq!(h("https://other.api.crm.dynamics.com/x"), None);
        let body = br#"{"@odata.context":"HTTPS:\/\/CONTOSO.API.crm.dynamics.com\/api\/data\/v9.2\/$metadata","@odata.id":"https://contoso.API.crm.dynamics.com/api/data/v9.2/a(1)","name":"https://contoso.api.crm.dynamics.com/x"}"#;
        let out = String::from_utf8(rewrite_json(&rw, JsonKeys::ResponseLinks, body)).unwrap();
        assert_eq!(
            out,
            r#"{"@odata.context":"http:\/\/localhost:8080\/api\/data\/v9.2\/$metadata","@odata.id":"http://localhost:8080/api/data/v9.2/a(1)","name":"https://contoso.api.crm.dynamics.com/x"}"#
        );
        // A gateway base with a path: the origin in any case, the path byte for byte.
        let up = LinkRewrite::new("http://gw.example/Env1", ORG);
        assert!(up
            .header_value(b"HTTP://GW.EXAMPLE/Env1/api/data/v9.2/x")
            .is_some());
        assert!(up
            .header_value(b"http://gw.example/env1/api/data/v9.2/x")
            .is_none());
    }

    /// Small deterministic PRNG so garbage tests need no extra dependency.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, n: usize, alphabet: &[u8]) -> Vec<u8> {
            (0..n)
                .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize])
                .collect()
        }
    }

    #[test]
    fn garbage_never_panics_and_passes_through() {
        let all: Vec<u8> = (0..=255).collect();
        let jsonish = b"{}[]:,\"\\ \r\n-@odata.nextLink/bind:id".to_vec();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..300 {
            let alphabet = if round % 2 == 0 { &all } else { &jsonish };
            let len = (rng.next() % 3000) as usize;
            let mut input = rng.bytes(len, alphabet);
            if round % 3 == 0 {
                let mut b = b"--x\r\nContent-Type: application/http\r\n\r\nGET ".to_vec();
                b.append(&mut input);
                input = b;
            }
            let mut chunks = Vec::new();
            let mut rest = input.as_slice();
            while !rest.is_empty() {
                let n = ((rng.next() % 64) as usize + 1).min(rest.len());
                let (a, b) = rest.split_at(n);
                chunks.push(a);
                rest = b;
            }
            for keys in [JsonKeys::ResponseLinks, JsonKeys::RequestBinds] {
                assert_eq!(json_chunks(&resp(), keys, &chunks), input);
            }
            assert_eq!(resp_chunks(&resp(), &chunks), input);
            // Requests: garbage is refused or rewritten, the same way in every chunking.
            let whole = req_chunks(&req(), &rules("x"), &[&input]);
            assert_eq!(
                req_chunks(&req(), &rules("x"), &chunks).is_ok(),
                whole.is_ok()
            );
        }
        let odd: [&[u8]; 7] = [
            b"\"",
            b"{\"@odata.nextLink\":\"https://contoso.crm.dynamics.co",
            b"{\"@odata.nextLink\":\"https:\\/\\/contoso.crm.dynamics.com\\",
            b"{\"@odata.id\":\"\\",
            b"\"@odata.id\"::\"https://contoso.crm.dynamics.com.x\"",
            b"}}}]]]\"\"\"\\\\\\",
            b"",
        ];
        for input in odd {
            assert_eq!(rewrite_json(&resp(), JsonKeys::ResponseLinks, input), input);
            assert_eq!(rewrite_batch_response(&resp(), input), input);
        }
        let huge = [b"{\"@odata.id\":\"".as_slice(), &vec![b'x'; 3 << 20]].concat();
        assert_eq!(rewrite_json(&resp(), JsonKeys::ResponseLinks, &huge), huge);
        let huge_line = [
            b"--b\r\nX-Long: ".as_slice(),
            &vec![b'y'; 200_000],
            b"\r\n--b--\r\n",
        ]
        .concat();
        assert_eq!(rewrite_batch_response(&resp(), &huge_line), huge_line);
    }

    fn batch_request() -> String {
        [
            "\r\n",
            "--dwa_batch_0e5f2c3a\r\n",
            "Content-Type: multipart/mixed;boundary=dwa_changeset_77c1\r\n",
            "\r\n",
            "--dwa_changeset_77c1\r\n",
            "Content-Type: application/http\r\n",
            "Content-Transfer-Encoding: binary\r\n",
            "Content-ID: 100001\r\n",
            "\r\n",
            "POST http://localhost:8080/api/data/v9.2/contacts HTTP/1.1\r\n",
            "Content-Type: application/json\r\n",
            "Referer: http://localhost:8080/app\r\n",
            "\r\n",
            "{\"firstname\":\"A\",\"parentcustomerid_account@odata.bind\":\"http://localhost:8080/api/data/v9.2/accounts(1)\",\"websiteurl\":\"http://localhost:8080/w\"}\r\n",
            "--dwa_changeset_77c1\r\n",
            "Content-Type: application/http\r\n",
            "Content-Transfer-Encoding: binary\r\n",
            "Content-ID: 100002\r\n",
            "\r\n",
            "PUT http://localhost:8080/api/data/v9.2/accounts(1)/primarycontactid/$ref HTTP/1.1\r\n",
            "Content-Type: application/json\r\n",
            "\r\n",
            "{\"@odata.id\":\"http://localhost:8080/api/data/v9.2/contacts(2)\"}\r\n",
            "--dwa_changeset_77c1--\r\n",
            "--dwa_batch_0e5f2c3a\r\n",
            "Content-Type: application/http\r\n",
            "Content-Transfer-Encoding: binary\r\n",
            "\r\n",
            "GET http://localhost:8080/api/data/v9.2/contacts?$select=fullname&$orderby=fullname asc&$filter=contains(fullname,'a b') HTTP/1.1\r\n",
            "Accept: application/json\r\n",
            "\r\n",
            "--dwa_batch_0e5f2c3a\r\n",
            "Content-Type: application/http\r\n",
            "\r\n",
            "GET /api/data/v9.2/accounts?$top=1 HTTP/1.1\r\n",
            "\r\n",
            "--dwa_batch_0e5f2c3a\r\n",
            "Content-Type: application/http\r\n",
            "\r\n",
            "PATCH http://localhost:8080/api/data/v9.2/accounts(5) HTTP/1.1\r\n",
            "Content-Type: application/json\r\n",
            "Content-Length: 56\r\n",
            "\r\n",
            "{\"a@odata.bind\":\"http://localhost:8080/api/data/v9.2/x\"}\r\n",
            "--dwa_batch_0e5f2c3a--\r\n",
        ]
        .concat()
    }

    fn expected_batch_request(input: &str) -> String {
        input
            .replace(
                "POST http://localhost:8080/api",
                "POST https://contoso.crm.dynamics.com/api",
            )
            .replace(
                "bind\":\"http://localhost:8080/api/data/v9.2/accounts(1)",
                "bind\":\"https://contoso.crm.dynamics.com/api/data/v9.2/accounts(1)",
            )
            .replace(
                "PUT http://localhost:8080/api",
                "PUT https://contoso.crm.dynamics.com/api",
            )
            .replace(
                "\"@odata.id\":\"http://localhost:8080/api",
                "\"@odata.id\":\"https://contoso.crm.dynamics.com/api",
            )
            .replace(
                "GET http://localhost:8080/api",
                "GET https://contoso.crm.dynamics.com/api",
            )
            .replace(
                "PATCH http://localhost:8080/api",
                "PATCH https://contoso.crm.dynamics.com/api",
            )
            // A part with Content-Length is rewritten too, its length fixed.
            .replace("Content-Length: 56", "Content-Length: 67")
            .replace(
                "{\"a@odata.bind\":\"http://localhost:8080/api",
                "{\"a@odata.bind\":\"https://contoso.crm.dynamics.com/api",
            )
    }

    #[test]
    fn batch_request_rewrites_request_lines_and_binds() {
        let input = batch_request();
        let expected = expected_batch_request(&input);
        assert_eq!(expected.matches(ORG).count(), 7);
        let out = rewrite_batch_request(&req(), &rules(BATCH), input.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        // Untouched: inner headers, data fields, relative URLs.
        assert!(expected.contains("Referer: http://localhost:8080/app\r\n"));
        assert!(expected.contains("\"websiteurl\":\"http://localhost:8080/w\""));
        let patched = format!("{{\"a@odata.bind\":\"{ORG}/api/data/v9.2/x\"}}");
        assert_eq!(patched.len(), 67);
        assert!(expected
            .contains("&$orderby=fullname asc&$filter=contains(fullname,'a b') HTTP/1.1\r\n"));

        let lf = input.replace("\r\n", "\n");
        let out = rewrite_batch_request(&req(), &rules(BATCH), lf.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), expected_batch_request(&lf));
    }

    /// A .NET `MultipartContent` batch: MIME Content-Length on every part (the change set
    /// too), inner Content-Length on the body.
    fn dotnet_batch(bind_to: &str) -> String {
        let body = format!("{{\"name\":\"n\",\"primarycontactid@odata.bind\":\"{bind_to}/api/data/v9.2/contacts(1)\"}}");
        let inner = format!(
            "POST {bind_to}/api/data/v9.2/accounts HTTP/1.1\r\nContent-Type: application/json; type=entry\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let part = format!(
            "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        );
        let cs_content = format!("--cs\r\n{part}\r\n--cs--");
        let get = format!("GET {bind_to}/api/data/v9.2/accounts?$top=1 HTTP/1.1\r\n\r\n");
        let get_part = format!(
            "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-Length: {}\r\n\r\n{get}",
            get.len()
        );
        format!(
            "--{BATCH}\r\nContent-Type: multipart/mixed; boundary=cs\r\nContent-Length: {}\r\n\r\n{cs_content}\r\n--{BATCH}\r\n{get_part}\r\n--{BATCH}--\r\n",
            cs_content.len()
        )
    }

    #[test]
    fn parts_with_content_length_are_rewritten_and_their_lengths_fixed() {
        let input = dotnet_batch(GW);
        let out = String::from_utf8(
            rewrite_batch_request(&req(), &rules(BATCH), input.as_bytes()).unwrap(),
        )
        .unwrap();
        // Exactly what the same client writes when it talks to Dataverse directly.
        assert_eq!(out, dotnet_batch(ORG));
        assert!(!out.contains(GW), "{out}");
        assert_split_invariant(input.as_bytes(), &mut |c| {
            req_chunks(&req(), &rules(BATCH), c).unwrap()
        });
        // Unchanged content keeps its bytes, lengths included.
        let direct = dotnet_batch(ORG);
        let same = rewrite_batch_request(&req(), &rules(BATCH), direct.as_bytes()).unwrap();
        assert_eq!(same, direct.as_bytes());
    }

    #[test]
    fn a_held_part_over_the_bound_is_refused_naming_the_limit() {
        let input = dotnet_batch(GW);
        let tight = PartRules::new(grant(&[]), BATCH.as_bytes().to_vec(), 200);
        let e = rewrite_batch_request(&req(), &tight, input.as_bytes()).unwrap_err();
        assert!(
            matches!(e, BatchRefusal::PartTooLarge { limit: 200, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("200 bytes"), "{e}");
        // Without Content-Length nothing is held beyond the headers: the same bound passes.
        let streamed = format!(
            "--{BATCH}\r\nContent-Type: application/http\r\n\r\nPOST /api/data/v9.2/accounts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{{\"name\":\"{}\"}}\r\n--{BATCH}--\r\n",
            "x".repeat(5000)
        );
        assert!(rewrite_batch_request(&req(), &tight, streamed.as_bytes()).is_ok());
    }

    #[test]
    fn a_wrong_content_length_is_refused() {
        let input = dotnet_batch(GW).replacen("Content-Length: 9", "Content-Length: 8", 1);
        let e = rewrite_batch_request(&req(), &rules(BATCH), input.as_bytes()).unwrap_err();
        assert!(matches!(e, BatchRefusal::LengthMismatch { .. }), "{e:?}");
    }

    fn one_part(headers: &str, request_line: &str) -> String {
        format!(
            "--{BATCH}\r\nContent-Type: application/http\r\nContent-ID: 42\r\n\r\n{request_line}\r\n{headers}\r\n--{BATCH}--\r\n"
        )
    }

    fn refused(body: &str) -> BatchRefusal {
        let whole = rewrite_batch_request(&req(), &rules(BATCH), body.as_bytes()).unwrap_err();
        let bytes: Vec<&[u8]> = body.as_bytes().chunks(1).collect();
        assert!(req_chunks(&req(), &rules(BATCH), &bytes).is_err());
        whole
    }

    #[test]
    fn parts_carrying_identity_credentials_or_overrides_are_refused() {
        let get = "GET /api/data/v9.2/WhoAmI HTTP/1.1";
        for header in [
            "CallerObjectId: 11111111-1111-1111-1111-111111111111",
            "MSCRMCallerID: x",
            "mscrm_callerid: x",
            "Caller_Object_Id : x",
            "Authorization: Bearer x",
            "Proxy-Authorization: Basic x",
            "Cookie: ARRAffinity=1",
            "X-HTTP-Method-Override: DELETE",
            "X-HTTP-Method: DELETE",
            "X_Method_Override: DELETE",
        ] {
            let e = refused(&one_part(&format!("{header}\r\n"), get));
            let name = header.split(':').next().unwrap().trim();
            let text = e.to_string();
            assert!(text.contains(&format!("`{name}`")), "{text}");
            assert!(text.contains("part 1 (Content-ID 42)"), "{text}");
        }
        // Inside a change set, and in the part's MIME headers.
        let cs = format!(
            "--{BATCH}\r\nContent-Type: multipart/mixed; boundary=cs\r\n\r\n--cs\r\nContent-Type: application/http\r\n\r\nPOST /api/data/v9.2/accounts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--cs\r\nContent-Type: application/http\r\nCallerObjectId: x\r\n\r\n{get}\r\n\r\n--cs--\r\n--{BATCH}--\r\n"
        );
        let e = refused(&cs);
        assert!(e.to_string().contains("part 3"), "{e}");
    }

    #[test]
    fn control_headers_in_parts_follow_the_grant() {
        let body = one_part(
            "MSCRM.BypassCustomPluginExecution: true\r\nMSCRM.SuppressDuplicateDetection: false\r\nPrefer: return=representation\r\n",
            "POST /api/data/v9.2/accounts HTTP/1.1",
        );
        let refusing = PartRules::new(grant(&[]), BATCH.as_bytes().to_vec(), 1 << 20);
        let e = rewrite_batch_request(&req(), &refusing, body.as_bytes()).unwrap_err();
        assert!(
            matches!(&e, BatchRefusal::ControlHeader { header, .. } if header == "MSCRM.BypassCustomPluginExecution"),
            "{e}"
        );
        let allowing = PartRules::new(
            grant(&["MSCRM.BypassCustomPluginExecution"]),
            BATCH.as_bytes().to_vec(),
            1 << 20,
        );
        let out =
            String::from_utf8(rewrite_batch_request(&req(), &allowing, body.as_bytes()).unwrap())
                .unwrap();
        assert!(
            out.contains("MSCRM.BypassCustomPluginExecution: true\r\n"),
            "{out}"
        );
        assert!(
            out.contains("MSCRM.SuppressDuplicateDetection: false\r\n"),
            "{out}"
        );
        assert!(out.contains("Prefer: return=representation\r\n"), "{out}");
    }

    #[test]
    fn part_targets_elsewhere_are_refused() {
        for line in [
            "GET https://evil.example/api/data/v9.2/accounts HTTP/1.1",
            "GET /XRMServices/2011/Organization.svc HTTP/1.1",
            "GET /api/data/v9.2/.../accounts HTTP/1.1",
            "POST /api/data/v9.2/$batch HTTP/1.1",
            "TRACE /api/data/v9.2/accounts HTTP/1.1",
            "GET /api/data/v9.2/accounts",
        ] {
            refused(&one_part("", line));
        }
        let e = refused(&one_part(
            "Host: evil.example\r\n",
            "GET /api/data/v9.2/accounts HTTP/1.1",
        ));
        assert!(e.to_string().contains("evil.example"), "{e}");
        let long = format!(
            "GET /api/data/v9.2/accounts?$filter={} HTTP/1.1",
            "a".repeat(70_000)
        );
        refused(&one_part("", &long));
        // A request line at Dataverse's 64 KB URL limit is rewritten.
        let at_limit = format!(
            "GET {GW}/api/data/v9.2/accounts?$filter={} HTTP/1.1",
            "a".repeat(64 * 1024 - 60)
        );
        let out = rewrite_batch_request(&req(), &rules(BATCH), one_part("", &at_limit).as_bytes())
            .unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .contains(&format!("GET {ORG}/api/data/v9.2/accounts?$filter=aaa")));
    }

    #[test]
    fn anything_another_reader_could_split_differently_is_refused() {
        let get = "GET /api/data/v9.2/accounts HTTP/1.1";
        for body in [
            // A bare CR: some readers end a line there, so a delimiter would hide behind it.
            format!("--{BATCH}\r\nContent-Type: application/http\r\n\r\n{get}\r\n\r\n{{}}\r--{BATCH}\rContent-Type: application/http\r\r{get}\rCallerObjectId: x\r\r\r\n--{BATCH}--\r\n"),
            // Lines that start like a delimiter in another case or with a tail.
            format!("--{BATCH}\r\nContent-Type: application/http\r\n\r\n{get}\r\n\r\n--{}\r\n--{BATCH}--\r\n", BATCH.to_uppercase()),
            format!("--{BATCH}\r\nContent-Type: application/http\r\n\r\n{get}\r\n\r\n--{BATCH}junk\r\n--{BATCH}--\r\n"),
            // Content after the close delimiter.
            format!("--{BATCH}\r\nContent-Type: application/http\r\n\r\n{get}\r\n\r\n--{BATCH}--\r\n--{BATCH}\r\nContent-Type: application/http\r\n\r\n{get}\r\nCallerObjectId: x\r\n\r\n"),
            // A part of unknown type, or without Content-Type, or encoded.
            format!("--{BATCH}\r\nContent-Type: text/plain\r\n\r\n{get}\r\nCallerObjectId: x\r\n\r\n--{BATCH}--\r\n"),
            format!("--{BATCH}\r\n\r\n{get}\r\nCallerObjectId: x\r\n\r\n--{BATCH}--\r\n"),
            format!("--{BATCH}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: base64\r\n\r\nR0VU\r\n--{BATCH}--\r\n"),
            // Ends before the close delimiter, or inside headers.
            format!("--{BATCH}\r\nContent-Type: application/http\r\n\r\n{get}\r\n\r\n"),
            format!("--{BATCH}\r\nContent-Type: application/http\r\n\r\n{get}\r\n--{BATCH}--\r\n"),
            // A boundary learnt from the body is not the one Dataverse uses.
            format!("--other\r\nContent-Type: application/http\r\n\r\n{get}\r\n\r\n--other--\r\n"),
        ] {
            refused(&body);
        }
    }

    fn batch_response() -> String {
        [
            "--batchresponse_c1b2\r\n",
            "Content-Type: multipart/mixed; boundary=\"changesetresponse_9f\"\r\n",
            "\r\n",
            "--changesetresponse_9f\r\n",
            "Content-Type: application/http\r\n",
            "Content-Transfer-Encoding: binary\r\n",
            "Content-ID: 1\r\n",
            "\r\n",
            "HTTP/1.1 204 No Content\r\n",
            "OData-Version: 4.0\r\n",
            "Location: https://contoso.crm.dynamics.com/api/data/v9.2/contacts(1)\r\n",
            "odata-entityid:https://contoso.crm.dynamics.com/api/data/v9.2/contacts(1)  \r\n",
            "X-Other: https://contoso.crm.dynamics.com/api/data/v9.2/contacts(1)\r\n",
            "\r\n",
            "\r\n",
            "--changesetresponse_9f--\r\n",
            "--batchresponse_c1b2\r\n",
            "Content-Type: application/http\r\n",
            "Content-Transfer-Encoding: binary\r\n",
            "\r\n",
            "HTTP/1.1 200 OK\r\n",
            "Content-Type: application/json; odata.metadata=minimal\r\n",
            "OData-Version: 4.0\r\n",
            "\r\n",
            "{\"@odata.context\":\"https://contoso.crm.dynamics.com/api/data/v9.2/$metadata#contacts\",\r\n",
            "\"value\":[{\"websiteurl\":\"https://contoso.crm.dynamics.com/w\",\r\n",
            "\"--batchresponse_c1b2\":\"-- not a boundary\"}],\r\n",
            "\"@odata.nextLink\":\"https://contoso.crm.dynamics.com/api/data/v9.2/contacts?$skiptoken=%253Ccookie\"}\r\n",
            "--batchresponse_c1b2\r\n",
            "Content-Type: application/http\r\n",
            "\r\n",
            "HTTP/1.1 200 OK\r\n",
            "Content-Type: application/json\r\n",
            "Content-Length: 90\r\n",
            "\r\n",
            "{\"@odata.context\":\"https://contoso.crm.dynamics.com/api/data/v9.2/$metadata#x\"}\r\n",
            "--batchresponse_c1b2--\r\n",
        ]
        .concat()
    }

    fn expected_batch_response(input: &str) -> String {
        input
            .replace(
                "Location: https://contoso.crm.dynamics.com/",
                "Location: http://localhost:8080/",
            )
            .replace(
                "odata-entityid:https://contoso.crm.dynamics.com/",
                "odata-entityid:http://localhost:8080/",
            )
            .replace(
                "context\":\"https://contoso.crm.dynamics.com/api/data/v9.2/$metadata#contacts",
                "context\":\"http://localhost:8080/api/data/v9.2/$metadata#contacts",
            )
            .replace(
                "nextLink\":\"https://contoso.crm.dynamics.com/",
                "nextLink\":\"http://localhost:8080/",
            )
    }

    #[test]
    fn batch_response_rewrites_link_headers_and_json_bodies() {
        let input = batch_response();
        let expected = expected_batch_response(&input);
        assert_eq!(expected.matches(GW).count(), 4);
        let out = rewrite_batch_response(&resp(), input.as_bytes());
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert!(expected.contains("X-Other: https://contoso.crm.dynamics.com/"));
        assert!(expected
            .contains("$metadata#contacts\",\r\n\"value\":[{\"websiteurl\":\"https://contoso"));

        let lf = input.replace("\r\n", "\n");
        let out = rewrite_batch_response(&resp(), lf.as_bytes());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            expected_batch_response(&lf)
        );
    }

    #[test]
    fn batch_every_split_point_matches_whole_buffer() {
        let req_doc = batch_request();
        assert_split_invariant(req_doc.as_bytes(), &mut |c| {
            batch_chunks(&req(), BatchDirection::Request, c)
        });
        let resp_doc = batch_response();
        assert_split_invariant(resp_doc.as_bytes(), &mut |c| {
            batch_chunks(&resp(), BatchDirection::Response, c)
        });
    }

    #[test]
    fn batch_long_body_line_streams_without_holding() {
        let mut r = BatchLinkRewriter::response(resp());
        let mut out = Vec::new();
        let head = b"--b\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 200 OK\r\n\r\n{\"@odata.context\":\"";
        r.push(head, &mut out).unwrap();
        r.push(ORG.as_bytes(), &mut out).unwrap();
        r.push(b"/x\",\"v\":\"", &mut out).unwrap();
        let big = vec![b'z'; 1 << 20];
        r.push(&big, &mut out).unwrap();
        assert!(r.line.is_empty());
        let expected_len = head.len() + GW.len() + 9 + big.len();
        assert_eq!(out.len(), expected_len);
        // A body line that starts like a delimiter is released as soon as it cannot be one.
        r.push(b"\"}\r\n--bx", &mut out).unwrap();
        assert!(r.line.is_empty());
        r.push(&big, &mut out).unwrap();
        assert!(r.line.is_empty());
        assert_eq!(out.len(), expected_len + 8 + big.len());
        r.push(b"\r\n--b-", &mut out).unwrap();
        assert_eq!(r.line, b"--b-");
        r.push(b"-\r\n", &mut out).unwrap();
        assert!(r.boundaries.is_empty() && matches!(r.state, PartState::Epilogue));
    }

    /// The access checks of a body, under a policy with the CSDL fixture.
    mod inspected {
        use super::*;
        use crate::access::{AccessPolicy, AccessRequest, RawAccess, Target};
        use crate::inbound::CallerKind;
        use http::Method;
        use serde_json::json;

        const POLICY: &str = "
default: deny
rules:
  - name: creators
    when: {}
    allow: { methods: [POST], entity_sets: [accounts] }
  - name: deep
    when: { roles: [Deep] }
    allow: { tables: { accounts: [create], contacts: [create] } }
  - name: merge
    when: { roles: [Merge] }
    allow: { tables: { accounts: [read] }, functions: [Merge] }
  - name: multi
    when: { roles: [Multi] }
    allow: { tables: { accounts: [read, create] }, functions: [CreateMultiple] }
";

        /// Feeds `body` in chunks of `size` bytes; the output and the refusal, if any.
        fn run(role: &str, path: &str, body: &str, size: usize) -> (String, Option<String>) {
            let mut raw: RawAccess = serde_norway::from_str(POLICY).unwrap();
            raw.metadata_file =
                Some(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/csdl.xml").into());
            let policy = AccessPolicy::from_raw(raw, "access").unwrap();
            let claims = match json!({ "roles": [role] }) {
                serde_json::Value::Object(map) => map,
                _ => unreachable!(),
            };
            let target = Target::from_path(path);
            let request = AccessRequest {
                method: &Method::POST,
                path,
                query: "",
                target: &target,
                metadata: None,
                claims: &claims,
                issuer: "i",
                tenant: None,
                kind: CallerKind::User,
                stored_query_table: None,
            };
            let grant = policy.decide(&request).unwrap();
            let access = policy.body_access(&request, &grant).unwrap();
            let mut r = JsonLinkRewriter::inspected(req(), access.inspector().unwrap());
            let mut out = Vec::new();
            let mut refused = None;
            for chunk in body.as_bytes().chunks(size) {
                r.push(chunk, &mut out);
                if let Some(denied) = r.refusal() {
                    refused = Some(denied.message.clone());
                    break;
                }
            }
            r.finish(&mut out);
            (String::from_utf8(out).unwrap(), refused)
        }

        #[test]
        fn pairs_are_found_at_any_chunking_and_the_body_passes_unchanged() {
            let body = r#"{"name":"a\"{[","parentaccountid":{"name":"p","primarycontactid":{"lastname":"y"}}}"#;
            for size in [1, 2, 7, body.len()] {
                let (_, refused) = run("x", "/api/data/v9.2/accounts", body, size);
                let refused = refused.unwrap_or_else(|| panic!("chunks of {size}"));
                assert!(
                    refused.contains("create on contacts (via deep insert primarycontactid)"),
                    "{refused}"
                );
            }
            let bind =
                format!(r#"{{"parentaccountid@odata.bind":"{GW}/api/data/v9.2/accounts(1)"}}"#);
            let (out, refused) = run("x", "/api/data/v9.2/accounts", &bind, 3);
            assert_eq!(refused, None);
            assert_eq!(out, bind.replace(GW, ORG));
        }

        #[test]
        fn bind_urls_name_a_table_only_as_a_request_path_would() {
            let bind = |url: &str| format!(r#"{{"parentaccountid@odata.bind":"{url}"}}"#);
            for url in [
                format!("{GW}/api/data/v9.2/accounts(1)"),
                format!("{GW}/api/data/V9.1/accounts(1)?x=1"),
                "/accounts(1)".to_string(),
                "accounts(1)".to_string(),
            ] {
                let refused = run("x", "/api/data/v9.2/accounts", &bind(&url), 4).1;
                assert_eq!(refused, None, "{url}");
            }
            // Another version, past `set(key)`, an encoded slash, a fragment, a second
            // prefix: no table the gateway can read, so only a grant on every table.
            for url in [
                format!("{GW}/api/data/v8.2/accounts(1)"),
                format!("{GW}/api/data/v9.2/accounts(1)/primarycontactid"),
                format!("{GW}/api/data/v9.2/accounts(1)%2Fprimarycontactid"),
                format!("{GW}#/api/data/v9.2/accounts(1)"),
                "api/data/v9.2/accounts(1)".to_string(),
                "$1/primarycontactid".to_string(),
            ] {
                let refused = run("x", "/api/data/v9.2/accounts", &bind(&url), 4).1;
                assert!(refused.is_some(), "{url}");
            }
        }

        #[test]
        fn a_list_where_a_record_is_expected_is_read_as_records() {
            let body = r#"[{"name":"x"},{"primarycontactid":{"lastname":"y"}}]"#;
            let refused = run("x", "/api/data/v9.2/accounts", body, 4).1.unwrap();
            assert!(
                refused.contains("create on contacts (via deep insert primarycontactid)"),
                "{refused}"
            );
        }

        #[test]
        fn a_later_rule_that_grants_the_whole_request_allows_it() {
            // `creators` grants the request line but not the contact; `deep` grants both.
            let body = r#"{"name":"x","contact_customer_accounts":[{"lastname":"y"}]}"#;
            assert_eq!(run("Deep", "/api/data/v9.2/accounts", body, 5).1, None);
            let bind = r#"{"name":"x","primarycontactid@odata.bind":"contacts(1)"}"#;
            let refused = run("Deep", "/api/data/v9.2/accounts", bind, 5).1.unwrap();
            assert!(refused.contains("associate on contacts"), "{refused}");
        }

        #[test]
        fn operation_parameters_name_the_tables_they_read() {
            let merge = "/api/data/v9.2/accounts(1)/Microsoft.Dynamics.CRM.Merge";
            let body = r#"{"Target":{"@odata.type":"Microsoft.Dynamics.CRM.account","accountid":"1"},"Subordinate":{"@odata.type":"Microsoft.Dynamics.CRM.contact","contactid":"2"},"PerformParentingChecks":false}"#;
            let refused = run("Merge", merge, body, 4).1.unwrap();
            assert!(
                refused.contains(
                    "read on contacts (via parameter of type Microsoft.Dynamics.CRM.contact)"
                ),
                "{refused}"
            );
            let accounts_only = body.replace(".contact\"", ".account\"");
            assert_eq!(run("Merge", merge, &accounts_only, 4).1, None);
            // Records typed by `@odata.type` are read as records from there on.
            let multi = "/api/data/v9.2/accounts/Microsoft.Dynamics.CRM.CreateMultiple";
            let body = r#"{"Targets":[{"@odata.type":"Microsoft.Dynamics.CRM.account","name":"x","primarycontactid":{"lastname":"y"}}]}"#;
            let refused = run("Multi", multi, body, 3).1.unwrap();
            assert!(
                refused.contains("create on contacts (via deep insert primarycontactid)"),
                "{refused}"
            );
            let plain =
                r#"{"Targets":[{"@odata.type":"Microsoft.Dynamics.CRM.account","name":"x"}]}"#;
            assert_eq!(run("Multi", multi, plain, 3).1, None);
            let reference = r#"{"Subordinate":{"@odata.id":"contacts(2)"}}"#;
            let refused = run("Merge", merge, reference, 4).1.unwrap();
            assert!(
                refused.contains("read on contacts (via @odata.id)"),
                "{refused}"
            );
        }
    }
}
