//! The pairs a request's body touches, decided as the body streams: deep-insert records
//! (create on the table their navigation property leads to), `x@odata.bind` values
//! (associate with the table the bound URL names), `@odata.id` in `$ref` bodies
//! (associate) and in operation parameters (read), and every `$batch` part as a request
//! of its own. The bytes are scanned once, by the link rewriter the body passes through
//! anyway (`upstream::odata_links`): it hands this module the JSON structure (brackets,
//! commas, colons) and each string, and this module keeps a stack of what each open
//! object or array is, bounded in depth, and strings bounded in length.
//!
//! A body pair must be granted by a rule that also grants the request line: the rules
//! still in the running ([`PairCheck`]) are those for the caller, acting as the grant
//! does, that grant every pair seen so far; when the last one drops out the request is
//! refused, naming the pair. So a request is allowed exactly when one rule grants all of
//! it, as without a body.

use std::sync::Arc;

use http::Method;
use percent_encoding::percent_decode_str;

use super::metadata::Metadata;
use super::rule::Rule;
use super::target::{after_api_version, is_identifier, strip_prefix_ignore_case, Target};
use super::touches::{self, via_text, BodyRoot, Operation, Resource, Touch};
use super::{denied_pair, refusal, AccessDenied, AccessRequest};
use crate::request_target::{split_origin, PartPath, PartTarget, API_PREFIX};

/// Deepest nesting of a body followed; deeper structure needs a grant on every table.
const MAX_DEPTH: usize = 64;
/// Longest property name or bound URL read; longer ones name no table the gateway can read.
const MAX_STRING: usize = 4096;

/// What every body check of one request shares.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) rules: Arc<[Rule]>,
    /// The rules for this caller that act as the request's grant does, in order.
    pub(super) for_caller: Vec<usize>,
    pub(super) default_allows: bool,
    pub(super) metadata: Option<Arc<Metadata>>,
    /// The rule that granted the request line, for the denial metric.
    pub(super) grant_rule: Arc<str>,
}

/// The rules still granting every pair of a request seen so far.
#[derive(Debug, Clone)]
struct PairCheck {
    shared: Arc<Shared>,
    method: Method,
    candidates: Vec<usize>,
}

impl PairCheck {
    fn check(&mut self, touch: &Touch) -> Result<(), AccessDenied> {
        if self.candidates.is_empty() && self.shared.default_allows {
            return Ok(());
        }
        let rules = &self.shared.rules;
        let before = self.candidates.first().copied();
        self.candidates
            .retain(|&i| rules[i].allow.covers_touch(&self.method, touch));
        if !self.candidates.is_empty() || self.shared.default_allows {
            return Ok(());
        }
        let rule = before.map_or_else(
            || self.shared.grant_rule.clone(),
            |i| rules[i].grant.rule.clone(),
        );
        Err(denied_pair(rule, touch, self.shared.metadata.is_some()))
    }
}

/// What the body of one granted request is checked against.
#[derive(Debug, Clone)]
pub struct BodyAccess {
    check: PairCheck,
    root: BodyRoot,
    batch: bool,
    /// `/api/data/v9.2/`: relative `$batch` part URLs are resolved against it.
    api_base: String,
}

impl BodyAccess {
    pub(super) fn new(shared: Arc<Shared>, request: &AccessRequest<'_>) -> Self {
        let (method, path) = (request.method, request.path);
        let batch = *request.target == Target::Batch;
        let (touches, root) = if batch {
            (Vec::new(), BodyRoot::Opaque)
        } else {
            let metadata = shared.metadata.as_deref();
            let stored = request.stored_query_table;
            touches::request_pairs(
                method,
                request.target,
                path,
                request.query,
                metadata,
                stored,
            )
        };
        let candidates = shared
            .for_caller
            .iter()
            .copied()
            .filter(|&i| {
                shared.rules[i]
                    .allow
                    .covers(method, request.target, &touches)
                    .is_ok()
            })
            .collect();
        let api_base = path
            .rfind('/')
            .map_or_else(|| "/api/data/v9.2/".to_string(), |i| path[..=i].to_string());
        Self {
            check: PairCheck {
                shared,
                method: method.clone(),
                candidates,
            },
            root,
            batch,
            api_base,
        }
    }

    /// Whether the body must be read as JSON whatever its declared type: Dataverse reads
    /// a record or parameters as JSON however the caller labels them.
    pub fn reads_json(&self) -> bool {
        self.root != BodyRoot::Opaque
    }

    /// The scanner for a top-level body, or `None` when there is nothing to read in it
    /// (`$batch` bodies are read part by part: [`BodyAccess::batch`]).
    pub fn inspector(&self) -> Option<BodyInspector> {
        (!self.batch && self.reads_json())
            .then(|| BodyInspector::new(self.check.clone(), self.root.clone(), Arc::default()))
    }

    /// The part decisions of a `$batch` body.
    pub fn batch(&self) -> Option<BatchPart> {
        self.batch.then(|| BatchPart {
            shared: self.check.shared.clone(),
            api_base: self.api_base.clone(),
            content_ids: Arc::default(),
        })
    }
}

/// Decides each `$batch` part as a request of its own: its method, URL and body.
#[derive(Debug, Clone)]
pub struct BatchPart {
    shared: Arc<Shared>,
    api_base: String,
    /// Content-IDs of earlier parts and the table each addresses, for `$1/...` URLs and
    /// `"$1"` binds. Shared with the part being read; by the next part's request line that
    /// part's reader is gone, so adding to it copies nothing.
    content_ids: ContentIds,
}

impl BatchPart {
    /// Decides a part's request line (its path and query as `request_target` parsed and
    /// checked them: on this gateway or Dataverse, under `/api/data/`); returns the scanner
    /// for its body, if it has one the rules read.
    pub(crate) fn decide(
        &mut self,
        method: &[u8],
        target: &PartTarget<'_>,
        content_id: Option<&str>,
    ) -> Result<Option<BodyInspector>, AccessDenied> {
        let method = Method::from_bytes(method).unwrap_or(Method::POST);
        let reference_set = match target.path {
            PartPath::Reference { id, .. } => self.reference_set(id),
            _ => None,
        };
        let query = target.query;
        let (path, target) = target.resolve(&self.api_base, reference_set);
        let metadata = self.shared.metadata.as_deref();
        // A part's stored query is not looked up: the part check runs synchronously as the
        // body streams, and a lookup (a Dataverse round trip) cannot be awaited there
        // without holding the whole batch. So it needs a grant on every table.
        let (touches, root) =
            touches::request_pairs(&method, &target, &path, query, metadata, None);
        let rules = &self.shared.rules;
        let candidates: Vec<usize> = self
            .shared
            .for_caller
            .iter()
            .copied()
            .filter(|&i| rules[i].allow.covers(&method, &target, &touches).is_ok())
            .collect();
        if candidates.is_empty() && !self.shared.default_allows {
            let mut denied = refusal(
                rules,
                &self.shared.for_caller,
                &method,
                &target,
                &touches,
                metadata.is_some(),
            );
            let stored = touches.iter().find(|t| {
                matches!(t.via.as_deref(), Some("savedQuery" | "userQuery"))
                    && !self.shared.for_caller.iter().any(|&i| {
                        let one = std::slice::from_ref(*t);
                        rules[i].allow.covers(&method, &target, one).is_ok()
                    })
            });
            if let Some(stored) = stored.and_then(|t| t.via.as_deref()) {
                denied.message = format!(
                    "a stored query ({stored}) is not looked up inside $batch, so it needs a rule granting read on every table; send it as a request of its own"
                );
                denied.metadata_unavailable = false;
            }
            return Err(denied);
        }
        if let Some(id) = content_id {
            let table = match &root {
                BodyRoot::Record(resource) => resource.clone(),
                _ => Resource::Unknown,
            };
            Arc::make_mut(&mut self.content_ids).push((id.to_string(), table));
        }
        if root == BodyRoot::Opaque {
            return Ok(None);
        }
        let check = PairCheck {
            shared: self.shared.clone(),
            method,
            candidates,
        };
        Ok(Some(BodyInspector::new(
            check,
            root,
            self.content_ids.clone(),
        )))
    }

    /// The entity set of the record the part with Content-ID `id` addressed, if known.
    fn reference_set(&self, id: &str) -> Option<&str> {
        self.content_ids
            .iter()
            .rev()
            .find(|(known, _)| known == id)
            .and_then(|(_, table)| match table {
                Resource::Set(set) => Some(set.as_str()),
                _ => None,
            })
    }
}

/// The path after `scheme://authority`, when the URL has one.
fn path_after_origin(url: &str) -> Option<&str> {
    split_origin(url).map(|(_, rest)| rest)
}

/// `$batch` Content-IDs and the tables of their parts.
type ContentIds = Arc<Vec<(String, Resource)>>;

/// What an open object or array of the body is.
#[derive(Debug, Clone)]
enum Frame {
    Object {
        kind: ObjectKind,
        key: Option<Key>,
        expect_key: bool,
    },
    Array(ArrayKind),
}

#[derive(Debug, Clone)]
enum ObjectKind {
    /// A record of this table.
    Record(Resource),
    /// A `$ref` body.
    Reference,
    /// Anything else: an operation's parameters and their values. `@odata.id` there is
    /// a use of the named record with this operation.
    Other(Operation),
}

#[derive(Debug, Clone)]
enum ArrayKind {
    /// A collection-valued navigation property: each object in it is a deep insert.
    Records(Resource, String),
    /// `x@odata.bind: [urls]`.
    Binds(String),
    Other(Operation),
}

/// A property name, decoded; `None` when it has escapes that do not decode or is too long.
type Key = Option<String>;

/// Reads the JSON structure of a body and checks each pair it finds.
#[derive(Debug, Clone)]
pub struct BodyInspector {
    check: PairCheck,
    /// The rules in the running before the body: restored by [`BodyInspector::reset`].
    initial: Vec<usize>,
    root: BodyRoot,
    content_ids: ContentIds,
    stack: Vec<Frame>,
    /// Levels opened beyond [`MAX_DEPTH`].
    too_deep: usize,
    string: Vec<u8>,
    string_too_long: bool,
    /// The current string is kept in `string`.
    capturing: bool,
    failed: Option<AccessDenied>,
}

impl BodyInspector {
    fn new(check: PairCheck, root: BodyRoot, content_ids: ContentIds) -> Self {
        Self {
            initial: check.candidates.clone(),
            check,
            root,
            content_ids,
            stack: Vec::new(),
            too_deep: 0,
            string: Vec::new(),
            string_too_long: false,
            capturing: false,
            failed: None,
        }
    }

    /// Back to before the body, for another body of the same request line.
    pub fn reset(&mut self) {
        self.check.candidates.clone_from(&self.initial);
        self.stack.clear();
        self.too_deep = 0;
        self.string.clear();
        self.string_too_long = false;
        self.capturing = false;
        self.failed = None;
    }

    /// The first refusal, once a pair no remaining rule grants was seen.
    pub fn refusal(&self) -> Option<&AccessDenied> {
        self.failed.as_ref()
    }

    /// A string begins: only keys and the values the checks read are kept.
    pub fn string_start(&mut self) {
        self.capturing = self.failed.is_none() && self.too_deep == 0 && self.wants_string();
    }

    fn wants_string(&self) -> bool {
        match self.stack.last() {
            Some(Frame::Object {
                expect_key: true, ..
            }) => true,
            Some(Frame::Object {
                key: Some(Some(name)),
                ..
            }) => is_bind_key(name) || is_id_key(name) || is_type_key(name),
            Some(Frame::Array(ArrayKind::Binds(_))) => true,
            _ => false,
        }
    }

    /// Bytes of the current string's content, as written (escapes undecoded).
    pub fn string_bytes(&mut self, bytes: &[u8]) {
        if !self.capturing {
            return;
        }
        let room = MAX_STRING.saturating_sub(self.string.len());
        if bytes.len() > room {
            self.string_too_long = true;
        }
        self.string
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// The current string ended.
    pub fn string_end(&mut self) {
        // A string not kept is a value no check reads: `None` is never looked at.
        let text = if self.string_too_long || !self.capturing {
            None
        } else {
            decode_json_string(&self.string)
        };
        self.capturing = false;
        self.string.clear();
        self.string_too_long = false;
        if self.failed.is_none() && self.too_deep == 0 {
            self.on_string(text);
        }
    }

    /// One of `{ } [ ] , :` outside a string.
    pub fn structural(&mut self, byte: u8) {
        if self.failed.is_some() {
            return;
        }
        match byte {
            b'{' | b'[' if self.stack.len() >= MAX_DEPTH => {
                self.too_deep += 1;
                if self.too_deep == 1 {
                    // What is deeper is not read: it may create or bind anything.
                    let via = format!("a body nested deeper than {MAX_DEPTH} levels");
                    self.touch(Operation::Create, Resource::Unknown, via.clone());
                    self.touch(Operation::Associate, Resource::Unknown, via);
                }
            }
            b'}' | b']' if self.too_deep > 0 => self.too_deep -= 1,
            b'{' => {
                let kind = self.object_kind();
                self.stack.push(Frame::Object {
                    kind,
                    key: None,
                    expect_key: true,
                });
            }
            b'[' => {
                let kind = self.array_kind();
                self.stack.push(Frame::Array(kind));
            }
            b'}' | b']' => {
                self.stack.pop();
                self.value_done();
            }
            b',' => {
                if let Some(Frame::Object {
                    key, expect_key, ..
                }) = self.stack.last_mut()
                {
                    *key = None;
                    *expect_key = true;
                }
            }
            b':' => {
                if let Some(Frame::Object { expect_key, .. }) = self.stack.last_mut() {
                    *expect_key = false;
                }
            }
            _ => {}
        }
    }

    /// A value ended: the key it was under is spent.
    fn value_done(&mut self) {
        if let Some(Frame::Object { key, .. }) = self.stack.last_mut() {
            *key = None;
        }
    }

    fn touch(&mut self, operation: Operation, resource: Resource, via: String) {
        if self.failed.is_some() {
            return;
        }
        let touch = Touch {
            operation,
            resource,
            via: Some(via),
        };
        if let Err(denied) = self.check.check(&touch) {
            self.failed = Some(denied);
        }
    }

    /// What an object opened here is; a deep insert is checked as it opens.
    fn object_kind(&mut self) -> ObjectKind {
        match self.stack.last().cloned() {
            None => match &self.root {
                BodyRoot::Record(table) => ObjectKind::Record(table.clone()),
                BodyRoot::Reference => ObjectKind::Reference,
                BodyRoot::Parameters | BodyRoot::Opaque => ObjectKind::Other(Operation::Read),
            },
            Some(Frame::Object {
                kind: ObjectKind::Record(table),
                key,
                ..
            }) => match key {
                Some(Some(name)) if name.contains('@') => ObjectKind::Other(Operation::Associate),
                Some(Some(name)) => {
                    let target = self.navigation(&table, &name);
                    let via = via_text("deep insert", &name);
                    self.touch(Operation::Create, target.clone(), via);
                    ObjectKind::Record(target)
                }
                _ => {
                    let via = "deep insert under a property name the gateway cannot read";
                    self.touch(Operation::Create, Resource::Unknown, via.into());
                    ObjectKind::Record(Resource::Unknown)
                }
            },
            Some(Frame::Array(ArrayKind::Records(table, via))) => {
                self.touch(Operation::Create, table.clone(), via);
                ObjectKind::Record(table)
            }
            Some(Frame::Object {
                kind: ObjectKind::Reference,
                ..
            }) => ObjectKind::Other(Operation::Associate),
            Some(Frame::Object {
                kind: ObjectKind::Other(op),
                ..
            })
            | Some(Frame::Array(ArrayKind::Other(op))) => ObjectKind::Other(op),
            Some(Frame::Array(ArrayKind::Binds(_))) => ObjectKind::Other(Operation::Associate),
        }
    }

    fn array_kind(&mut self) -> ArrayKind {
        match self.stack.last().cloned() {
            // A list where a record is expected: each object in it is read as one.
            None => match &self.root {
                BodyRoot::Record(table) => {
                    ArrayKind::Records(table.clone(), "a body that is a list".into())
                }
                _ => ArrayKind::Other(Operation::Read),
            },
            Some(Frame::Object {
                kind: ObjectKind::Record(table),
                key,
                ..
            }) => match key {
                Some(Some(name)) if is_delta_key(&name) => {
                    // Records nested in a delta are created, updated or removed: not read
                    // here, so only a grant on every table covers them.
                    let via = via_text("nested delta payload", &name);
                    self.touch(Operation::Create, Resource::Unknown, via);
                    ArrayKind::Other(Operation::Associate)
                }
                Some(Some(name)) if is_bind_key(&name) => ArrayKind::Binds(via_text("", &name)),
                Some(Some(name)) if name.contains('@') => ArrayKind::Other(Operation::Associate),
                Some(Some(name)) => {
                    let target = self.navigation(&table, &name);
                    ArrayKind::Records(target, via_text("deep insert", &name))
                }
                _ => ArrayKind::Records(
                    Resource::Unknown,
                    "deep insert under a property name the gateway cannot read".into(),
                ),
            },
            Some(Frame::Object {
                kind: ObjectKind::Other(op),
                ..
            })
            | Some(Frame::Array(ArrayKind::Other(op))) => ArrayKind::Other(op),
            Some(Frame::Object {
                kind: ObjectKind::Reference,
                ..
            })
            | Some(Frame::Array(ArrayKind::Binds(_) | ArrayKind::Records(..))) => {
                ArrayKind::Other(Operation::Associate)
            }
        }
    }

    /// The table a navigation property of `table` leads to.
    fn navigation(&self, table: &Resource, name: &str) -> Resource {
        match (table, self.check.shared.metadata.as_deref()) {
            (_, None) => Resource::Unresolved,
            (Resource::Set(set), Some(metadata)) => metadata
                .navigation_target(set, name)
                .map_or(Resource::Unknown, |t| Resource::Set(t.to_string())),
            _ => Resource::Unknown,
        }
    }

    fn on_string(&mut self, text: Option<String>) {
        let (kind, key) = match self.stack.last_mut() {
            Some(Frame::Object {
                expect_key: true,
                key,
                ..
            }) => {
                *key = Some(text);
                return;
            }
            Some(Frame::Object { kind, key, .. }) => (kind.clone(), key.take()),
            Some(Frame::Array(ArrayKind::Binds(via))) => {
                let via = via.clone();
                let table = self.bound_table(text.as_deref());
                self.touch(Operation::Associate, table, via);
                return;
            }
            _ => return,
        };
        let Some(key) = key else { return };
        let Some(name) = key else {
            // A name the gateway cannot read could be a bind Dataverse reads.
            let via = "a property name the gateway cannot read".to_string();
            self.touch(Operation::Associate, Resource::Unknown, via);
            return;
        };
        let is_bind = is_bind_key(&name);
        let is_id = is_id_key(&name);
        let operation = match kind {
            _ if is_bind => Operation::Associate,
            ObjectKind::Record(_) | ObjectKind::Reference if is_id => Operation::Associate,
            ObjectKind::Other(op) if is_id => op,
            // A record typed again (a second `@odata.type`, or one naming another table than
            // the record's): readers differ on which one counts, so the other table counts too.
            ObjectKind::Record(ref record) if is_type_key(&name) => {
                let table = self.typed_table(text.as_deref());
                if &table != record {
                    let via = via_text("record also typed", text.as_deref().unwrap_or("?"));
                    self.touch(Operation::Read, table, via);
                }
                return;
            }
            ObjectKind::Other(Operation::Read) if is_type_key(&name) => {
                let table = self.typed_table(text.as_deref());
                let via = via_text("parameter of type", text.as_deref().unwrap_or("?"));
                self.touch(Operation::Read, table.clone(), via);
                // A typed record: what is nested in it from here on is read as in a record.
                if let Some(Frame::Object { kind, .. }) = self.stack.last_mut() {
                    *kind = ObjectKind::Record(table);
                }
                return;
            }
            _ => return,
        };
        let table = self.bound_table(text.as_deref());
        self.touch(operation, table, via_text("", &name));
    }

    /// The table a bound URL names: `contacts(<id>)`, `/contacts(<id>)`, an absolute URL
    /// under `/api/data/v9.x/`, or `$n`, an earlier `$batch` part's record.
    fn bound_table(&self, url: Option<&str>) -> Resource {
        let Some(url) = url else {
            return Resource::Unknown;
        };
        let path = path_after_origin(url).unwrap_or(url);
        // Under the Web API's prefix and version as a request path is read, or relative to
        // the service root (`/contacts(1)`, `contacts(1)`); anything else names no table
        // the gateway can read.
        let path = match after_api_version(path) {
            Some(rest) => rest,
            None if path.starts_with(API_PREFIX) => return Resource::Unknown,
            None => path.strip_prefix('/').unwrap_or(path),
        };
        let first = path.split(['(', '/', '?']).next().unwrap_or_default();
        // Only `set(key)` (or `$n`) names one record; `set(key)/nav` and `$n/nav` name a
        // record of the table `nav` leads to, which is not followed here.
        let after_first = &path[first.len()..];
        let past_key = match after_first.strip_prefix('(') {
            Some(key) => key.split_once(')').map_or("", |(_, rest)| rest),
            None => after_first,
        };
        if !past_key.is_empty() && !past_key.starts_with('?') {
            return Resource::Unknown;
        }
        let first = percent_decode_str(first).decode_utf8_lossy();
        if let Some(id) = first.strip_prefix('$') {
            return self
                .content_ids
                .iter()
                .rev()
                .find(|(known, _)| known == id)
                .map_or(Resource::Unknown, |(_, table)| table.clone());
        }
        if is_identifier(&first) {
            Resource::Set(first.into_owned())
        } else {
            Resource::Unknown
        }
    }

    /// The table of `@odata.type` (`Microsoft.Dynamics.CRM.contact`, `#...` too).
    fn typed_table(&self, name: Option<&str>) -> Resource {
        let Some(name) = name else {
            return Resource::Unknown;
        };
        let name = name.trim_start_matches('#');
        let logical = strip_prefix_ignore_case(name, "Microsoft.Dynamics.CRM.")
            .or_else(|| strip_prefix_ignore_case(name, "mscrm."))
            .unwrap_or(name);
        match self.check.shared.metadata.as_deref() {
            None => Resource::Unresolved,
            Some(metadata) => metadata
                .set_of_logical_name(logical)
                .map_or(Resource::Unknown, |set| Resource::Set(set.to_string())),
        }
    }
}

/// `x@odata.bind`, or OData 4.01's `x@bind`.
fn is_bind_key(name: &str) -> bool {
    ends_with_ignore_case(name, "@odata.bind") || ends_with_ignore_case(name, "@bind")
}

/// `@odata.id`, or OData 4.01's `@id`.
fn is_id_key(name: &str) -> bool {
    name.eq_ignore_ascii_case("@odata.id") || name.eq_ignore_ascii_case("@id")
}

/// `@odata.type`, or OData 4.01's `@type`.
fn is_type_key(name: &str) -> bool {
    name.eq_ignore_ascii_case("@odata.type") || name.eq_ignore_ascii_case("@type")
}

/// `x@odata.delta`, or OData 4.01's `x@delta`.
fn is_delta_key(name: &str) -> bool {
    ends_with_ignore_case(name, "@odata.delta") || ends_with_ignore_case(name, "@delta")
}

fn ends_with_ignore_case(text: &str, suffix: &str) -> bool {
    text.len() >= suffix.len()
        && text.as_bytes()[text.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// A JSON string's content as written between its quotes, decoded.
fn decode_json_string(raw: &[u8]) -> Option<String> {
    if !raw.contains(&b'\\') {
        return std::str::from_utf8(raw).ok().map(str::to_string);
    }
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    serde_json::from_slice(&quoted).ok()
}
