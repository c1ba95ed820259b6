//! Every (operation, table) pair a request touches, for the rules to grant one by one:
//! the path's entity set and each navigation segment (resolved through the environment's
//! [`Metadata`]), `$ref`, bound and unbound functions and actions and the tables their
//! parameters name, every `$expand` at any depth, navigation paths in `$filter`,
//! `$orderby`, `$select` and `$apply`, fetchXml `entity` / `link-entity`, and stored
//! queries. Where the metadata would be needed but is not in hand the pair is
//! [`Resource::Unresolved`]: only a rule granting every table covers it, and otherwise the
//! request is refused as "metadata unavailable" (fail closed).

use std::fmt;

use http::Method;
use percent_encoding::percent_decode_str;
use quick_xml::events::Event;
use quick_xml::Reader;

use super::metadata::Metadata;
use super::odata::{self, QueryOptions};
use super::target::{strip_prefix_ignore_case, Target};
use crate::request_target::API_PREFIX;

/// What a request does to a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Read,
    Create,
    Update,
    Delete,
    /// Writes a relationship (`$ref`, `@odata.bind`, create through a navigation property).
    Associate,
    /// Calls a function or action, by name.
    Execute,
}

impl Operation {
    pub const ALL: [Operation; 6] = [
        Self::Read,
        Self::Create,
        Self::Update,
        Self::Delete,
        Self::Associate,
        Self::Execute,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Associate => "associate",
            Self::Execute => "execute",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|op| op.as_str().eq_ignore_ascii_case(text))
    }

    /// What the method does to the table a path ends at.
    fn of_method(method: &Method) -> Self {
        match *method {
            Method::POST => Self::Create,
            Method::PATCH | Method::PUT => Self::Update,
            Method::DELETE => Self::Delete,
            _ => Self::Read,
        }
    }
}

/// What an operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// An entity set (`contacts`), as named in the request or resolved from metadata.
    Set(String),
    /// A function or action, by its name without namespace.
    Function(String),
    /// `$metadata` and the service document.
    Metadata,
    /// A table the gateway cannot name (an unknown navigation property, a stored query,
    /// an unrecognised path): only a rule granting every table covers it.
    Unknown,
    /// A table only the environment's metadata could name, which is not in hand.
    Unresolved,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Set(name) | Self::Function(name) => f.write_str(name),
            Self::Metadata => f.write_str("$metadata"),
            Self::Unknown => f.write_str("a table the gateway cannot name"),
            Self::Unresolved => f.write_str("a table only the environment's $metadata names"),
        }
    }
}

/// One pair, with what in the request touched it (for the refusal message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touch {
    pub operation: Operation,
    pub resource: Resource,
    /// `None` for the table the path addresses.
    pub via: Option<String>,
}

impl fmt::Display for Touch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.operation.as_str(), self.resource)?;
        if let Some(via) = &self.via {
            write!(f, " (via {via})")?;
        }
        Ok(())
    }
}

/// What a request's JSON body is read as, from where its path ends: the body's own pairs
/// (deep inserts, `@odata.bind`, `@odata.id`) depend on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRoot {
    /// A record of this table (`POST accounts`, `PATCH accounts(id)`, a create through a
    /// navigation property): nested records are deep inserts, binds associate.
    Record(Resource),
    /// A `$ref` body: its `@odata.id` associates.
    Reference,
    /// A function's or action's parameters: the records they name are read.
    Parameters,
    /// Nothing the rules need to see: a column's value, or a request without a body.
    Opaque,
}

/// The pairs of a request other than `$batch` (whose envelope the rules decide alone), for
/// the tests: [`request_pairs`] without the body root or a stored query.
#[cfg(test)]
pub(crate) fn touches(
    method: &Method,
    path: &str,
    query: &str,
    metadata: Option<&Metadata>,
) -> Vec<Touch> {
    request_pairs(
        method,
        &Target::from_path(path),
        path,
        query,
        metadata,
        None,
    )
    .0
}

/// The pairs of a request other than `$batch` (whose envelope the rules decide alone), and
/// what the request's body is read as. `target` is what `path` addresses, read once by
/// the caller (`Target::from_path`). `path` starts `/api/data/`; `query` is the raw
/// query string without `?`. `stored_table`: the logical name of the table the request's
/// `savedQuery` / `userQuery` reads (its `returnedtypecode`), when it was looked up.
pub fn request_pairs(
    method: &Method,
    target: &Target,
    path: &str,
    query: &str,
    metadata: Option<&Metadata>,
    stored_table: Option<&str>,
) -> (Vec<Touch>, BodyRoot) {
    let mut out = Touches {
        metadata,
        stored_table,
        list: Vec::new(),
    };
    let options = odata::parse_query(query);
    let root = match target {
        Target::EntitySet(set) => match out.walk_path(method, set, path, &options) {
            PathEnd::Set(set) => {
                out.options(&set, &options, None);
                BodyRoot::Record(Resource::Set(set))
            }
            PathEnd::Unnamed(resource) => BodyRoot::Record(resource),
            PathEnd::Reference => BodyRoot::Reference,
            PathEnd::Operation => BodyRoot::Parameters,
            PathEnd::Property => BodyRoot::Opaque,
        },
        Target::Function(name) => {
            out.push(Operation::Execute, Resource::Function(name.clone()), None);
            out.parameters(name, path, &options);
            BodyRoot::Parameters
        }
        Target::Metadata | Target::ServiceRoot => {
            out.push(Operation::Read, Resource::Metadata, None);
            BodyRoot::Opaque
        }
        Target::Unknown | Target::Batch => {
            out.push(Operation::of_method(method), Resource::Unknown, None);
            BodyRoot::Record(Resource::Unknown)
        }
    };
    let root = if matches!(*method, Method::POST | Method::PATCH | Method::PUT) {
        root
    } else {
        BodyRoot::Opaque
    };
    (out.list, root)
}

/// Where a path after its entity set ends.
enum PathEnd {
    /// At a table (a record or a collection of it).
    Set(String),
    /// At a table the gateway cannot name.
    Unnamed(Resource),
    /// At `$ref`.
    Reference,
    /// At a bound function or action.
    Operation,
    /// At a column of a record.
    Property,
}

struct Touches<'m> {
    metadata: Option<&'m Metadata>,
    stored_table: Option<&'m str>,
    list: Vec<Touch>,
}

impl Touches<'_> {
    fn push(&mut self, operation: Operation, resource: Resource, via: Option<String>) {
        let touch = Touch {
            operation,
            resource,
            via,
        };
        if !self.list.contains(&touch) {
            self.list.push(touch);
        }
    }

    /// Walks the segments after the entity set; returns where the path ends (a set's
    /// query options are read from it).
    fn walk_path(
        &mut self,
        method: &Method,
        first: &str,
        path: &str,
        options: &QueryOptions,
    ) -> PathEnd {
        let segments = segments_after_first(path);
        // The sets along the path, each with the segment that led to it.
        let mut chain: Vec<(Resource, Option<String>)> = vec![(Resource::Set(first.into()), None)];
        let mut is_ref = false;
        let mut operation: Option<String> = None;
        let mut at_property = false;
        for segment in &segments {
            let name = segment.split('(').next().unwrap_or_default();
            if name.starts_with('$') {
                if name.eq_ignore_ascii_case("$ref") {
                    is_ref = true;
                } else if !(name.eq_ignore_ascii_case("$value")
                    || name.eq_ignore_ascii_case("$count"))
                {
                    chain.push((Resource::Unknown, Some(via_text("path segment", name))));
                }
                continue;
            }
            if name.contains('.') {
                // `Microsoft.Dynamics.CRM.Name`: a bound operation, or a type cast.
                match strip_prefix_ignore_case(name, "Microsoft.Dynamics.CRM.")
                    .or_else(|| strip_prefix_ignore_case(name, "mscrm."))
                {
                    Some(bare) if is_operation(bare, segment, self.metadata) => {
                        operation = Some(bare.to_string());
                    }
                    Some(_) => {}
                    None => chain.push((Resource::Unknown, Some(via_text("path segment", name)))),
                }
                continue;
            }
            if at_property || operation.is_some() {
                chain.push((Resource::Unknown, Some(via_text("path segment", name))));
                continue;
            }
            let from = match chain.last() {
                Some((Resource::Set(set), _)) => set.clone(),
                _ => continue,
            };
            match self.metadata {
                None => chain.push((Resource::Unresolved, Some(via_text("path segment", name)))),
                Some(metadata) => match metadata.navigation_target(&from, name) {
                    Some(target) => chain.push((
                        Resource::Set(target.into()),
                        Some(via_text("path segment", name)),
                    )),
                    // A column: the request addresses the record's property.
                    None => at_property = true,
                },
            }
        }
        let last = chain.len() - 1;
        if let Some(name) = operation {
            for (resource, via) in chain {
                self.push(Operation::Read, resource, via);
            }
            let via = via_text("bound to", first);
            self.push(
                Operation::Execute,
                Resource::Function(name.clone()),
                Some(via),
            );
            self.parameters(&name, path, options);
            return PathEnd::Operation;
        }
        for (i, (resource, via)) in chain.iter().enumerate() {
            let op = if is_ref && i + 1 >= last {
                Operation::Associate
            } else if i == last {
                Operation::of_method(method)
            } else if i + 1 == last && *method == Method::POST {
                // Creating through a navigation property writes the relationship too.
                Operation::Associate
            } else {
                Operation::Read
            };
            if is_ref && i + 1 == last && chain.len() == 1 {
                continue;
            }
            self.push(op, resource.clone(), via.clone());
        }
        match chain.pop() {
            _ if is_ref => PathEnd::Reference,
            _ if at_property => PathEnd::Property,
            Some((Resource::Set(set), _)) => PathEnd::Set(set),
            Some((resource, _)) => PathEnd::Unnamed(resource),
            None => PathEnd::Unnamed(Resource::Unknown),
        }
    }

    /// Tables named by a function's parameters: `@odata.id` references in the path and
    /// aliases, and parameters the metadata types as a table.
    fn parameters(&mut self, name: &str, path: &str, options: &QueryOptions) {
        let mut references = options.references.clone();
        odata::collect_references(&decode(path), &mut references);
        for set in references {
            let via = via_text("parameter", &set);
            self.push(Operation::Read, Resource::Set(set), Some(via));
        }
        if let Some(metadata) = self.metadata {
            for (parameter, set) in metadata.parameter_sets(name) {
                let via = via_text("parameter", parameter);
                self.push(Operation::Read, Resource::Set(set.to_string()), Some(via));
            }
        }
    }

    /// The tables the query options reach from `set`.
    fn options(&mut self, set: &str, options: &QueryOptions, prefix: Option<&str>) {
        if options.unreadable {
            self.push(
                Operation::Read,
                Resource::Unknown,
                Some("a query option the gateway cannot follow".into()),
            );
        }
        for expand in &options.expand {
            let label = if expand.path.is_empty() {
                "*".to_string()
            } else {
                expand.path.join("/")
            };
            let label = match prefix {
                Some(p) => format!("{p}/{label}"),
                None => label,
            };
            let via = via_text("$expand=", &label);
            if expand.path.is_empty() {
                match self.metadata {
                    None => self.push(Operation::Read, Resource::Unresolved, Some(via)),
                    Some(metadata) => {
                        for (_, target) in metadata.all_navigation_targets(set) {
                            self.push(
                                Operation::Read,
                                Resource::Set(target.into()),
                                Some(via.clone()),
                            );
                        }
                    }
                }
                continue;
            }
            if let Some(end) = self.follow(set, &expand.path, &via, true) {
                self.options(&end, &expand.options, Some(&label));
            } else {
                // Options under an unnamed table cannot reach further than it already does.
                self.options_unresolved(&expand.options, &via);
            }
        }
        for (option, path) in &options.paths {
            let via = via_text(&format!("{}=", option.as_str()), &path.join("/"));
            self.follow(set, path, &via, false);
        }
        if let Some(xml) = &options.fetch_xml {
            self.fetch_xml(xml);
        }
        if let Some(stored) = options.stored_query {
            // The table a stored query reads is in the query record, not in the request:
            // named only when it was looked up (for the request's own options).
            let resource = match (
                self.stored_table.filter(|_| prefix.is_none()),
                self.metadata,
            ) {
                (None, _) => Resource::Unknown,
                (Some(_), None) => Resource::Unresolved,
                (Some(logical), Some(metadata)) => metadata
                    .set_of_logical_name(logical)
                    .map_or(Resource::Unknown, |set| Resource::Set(set.to_string())),
            };
            self.push(Operation::Read, resource, Some(stored.as_str().to_string()));
        }
        for reference in &options.references {
            let via = via_text("parameter", reference);
            self.push(Operation::Read, Resource::Set(reference.clone()), Some(via));
        }
    }

    /// Nested options of an expand whose table is not named: they need the same grant.
    fn options_unresolved(&mut self, options: &QueryOptions, via: &str) {
        if !options.expand.is_empty() || !options.paths.is_empty() {
            let resource = if self.metadata.is_some() {
                Resource::Unknown
            } else {
                Resource::Unresolved
            };
            self.push(Operation::Read, resource, Some(via.to_string()));
        }
    }

    /// Reads along a path from `set`; each navigation property is a read of its target.
    /// `all_navigation`: every segment must be a navigation property (`$expand`), else
    /// the path may end in a column. Returns the set the path ends at.
    fn follow(
        &mut self,
        set: &str,
        path: &[String],
        via: &str,
        all_navigation: bool,
    ) -> Option<String> {
        let Some(metadata) = self.metadata else {
            self.push(Operation::Read, Resource::Unresolved, Some(via.to_string()));
            return None;
        };
        let mut current = set.to_string();
        for (i, segment) in path.iter().enumerate() {
            match metadata.navigation_target(&current, segment) {
                Some(target) => {
                    current = target.to_string();
                    self.push(
                        Operation::Read,
                        Resource::Set(current.clone()),
                        Some(via.to_string()),
                    );
                }
                None if !all_navigation && i + 1 == path.len() => return Some(current),
                None if !all_navigation && i > 0 => return Some(current),
                None => {
                    self.push(Operation::Read, Resource::Unknown, Some(via.to_string()));
                    return None;
                }
            }
        }
        Some(current)
    }

    /// `<entity name="account">` and every `<link-entity name="contact">`.
    fn fetch_xml(&mut self, xml: &str) {
        let mut reader = Reader::from_str(xml);
        let mut names = Vec::new();
        loop {
            match reader.read_event() {
                Ok(Event::Start(e) | Event::Empty(e)) => {
                    let local = e.local_name();
                    if matches!(local.as_ref(), b"entity" | b"link-entity") {
                        let name = e
                            .attributes()
                            .flatten()
                            .find(|a| a.key.local_name().as_ref() == b"name")
                            .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()));
                        let element = String::from_utf8_lossy(local.as_ref()).into_owned();
                        names.push((element, name));
                    }
                }
                Ok(Event::Eof) => break,
                Ok(_) => {}
                Err(_) => {
                    self.push(
                        Operation::Read,
                        Resource::Unknown,
                        Some("fetchXml that is not well-formed".into()),
                    );
                    return;
                }
            }
        }
        if names.is_empty() {
            self.push(
                Operation::Read,
                Resource::Unknown,
                Some("fetchXml without entity".into()),
            );
        }
        for (element, name) in names {
            let name = name.unwrap_or_default();
            let via = via_text(&format!("fetchXml {element} "), &name);
            let resource = match self.metadata {
                None => Resource::Unresolved,
                Some(metadata) => metadata
                    .set_of_logical_name(&name)
                    .map_or(Resource::Unknown, |set| Resource::Set(set.to_string())),
            };
            self.push(Operation::Read, resource, Some(via));
        }
    }
}

/// `Name(...)` or a name the metadata lists as an operation: a bound function or action;
/// a table's logical name (`Microsoft.Dynamics.CRM.account`) is a type cast. Without
/// metadata a bare qualified name counts as an operation (it then needs a grant).
fn is_operation(bare: &str, segment: &str, metadata: Option<&Metadata>) -> bool {
    segment.contains('(')
        || metadata.is_none_or(|m| m.has_operation(bare) || m.set_of_logical_name(bare).is_none())
}

/// The path segments after `/api/data/<version>/<first>`, each decoded once, split at `/`
/// outside parentheses and quotes (a key value may hold a `/`).
fn segments_after_first(path: &str) -> Vec<String> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let rest = path.strip_prefix(API_PREFIX).unwrap_or_default();
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut start = 0;
    for (i, b) in rest.bytes().enumerate() {
        match b {
            b'\'' => in_string = !in_string,
            _ if in_string => {}
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            b'/' if depth == 0 => {
                parts.push(&rest[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&rest[start..]);
    parts.into_iter().skip(2).map(decode).collect()
}

fn decode(text: &str) -> String {
    percent_decode_str(text).decode_utf8_lossy().into_owned()
}

/// What touched a table, safe to echo: names from the request are kept only as far as
/// they are identifiers and path separators, and short.
pub(super) fn via_text(what: &str, name: &str) -> String {
    const MAX: usize = 80;
    let cleaned: String = name
        .chars()
        .take(MAX)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '/' | '*' | '.' | '$' | '@') {
                c
            } else {
                '?'
            }
        })
        .collect();
    let ellipsis = if name.chars().count() > MAX {
        "..."
    } else {
        ""
    };
    if what.is_empty() || what.ends_with('=') || what.ends_with(' ') {
        format!("{what}{cleaned}{ellipsis}")
    } else {
        format!("{what} {cleaned}{ellipsis}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "00000000-0000-0000-0000-000000000001";

    fn metadata() -> Metadata {
        Metadata::from_reader(include_str!("../../tests/fixtures/csdl.xml").as_bytes()).unwrap()
    }

    fn pairs(method: Method, target: &str) -> Vec<String> {
        let m = metadata();
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        touches(&method, &format!("/api/data/v9.2/{path}"), query, Some(&m))
            .iter()
            .map(|t| format!("{} {}", t.operation.as_str(), t.resource))
            .fold(Vec::new(), |mut seen, pair| {
                if !seen.contains(&pair) {
                    seen.push(pair);
                }
                seen
            })
    }

    #[test]
    fn navigation_segments_and_expand() {
        assert_eq!(
            pairs(
                Method::GET,
                &format!("accounts({ID})/contact_customer_accounts")
            ),
            ["read accounts", "read contacts"]
        );
        assert_eq!(
            pairs(
                Method::GET,
                "accounts?$expand=contact_customer_accounts($expand=owninguser),new_account_new_project"
            ),
            ["read accounts", "read contacts", "read systemusers", "read new_projects"]
        );
        // A name that is no navigation property of the table it is expanded from.
        assert_eq!(
            pairs(
                Method::GET,
                "accounts?$expand=contact_customer_accounts($expand=new_account_new_project)"
            ),
            [
                "read accounts",
                "read contacts",
                "read a table the gateway cannot name"
            ]
        );
        assert_eq!(
            pairs(Method::GET, "accounts?$expand=new_account_new_project"),
            ["read accounts", "read new_projects"]
        );
        assert_eq!(
            pairs(Method::GET, "accounts?$select=name"),
            ["read accounts"]
        );
    }

    #[test]
    fn writes_through_navigation_and_ref() {
        assert_eq!(
            pairs(
                Method::POST,
                &format!("accounts({ID})/contact_customer_accounts")
            ),
            ["associate accounts", "create contacts"]
        );
        assert_eq!(
            pairs(
                Method::POST,
                &format!("accounts({ID})/contact_customer_accounts/$ref")
            ),
            ["associate accounts", "associate contacts"]
        );
        assert_eq!(
            pairs(
                Method::DELETE,
                &format!("accounts({ID})/primarycontactid/$ref")
            ),
            ["associate accounts", "associate contacts"]
        );
        assert_eq!(
            pairs(Method::PATCH, &format!("accounts({ID})")),
            ["update accounts"]
        );
        assert_eq!(
            pairs(Method::PUT, &format!("accounts({ID})/name")),
            ["update accounts"]
        );
    }

    #[test]
    fn operations_and_their_parameters() {
        assert_eq!(
            pairs(
                Method::POST,
                &format!("accounts({ID})/Microsoft.Dynamics.CRM.Merge")
            ),
            ["read accounts", "execute Merge"]
        );
        assert_eq!(
            pairs(
                Method::GET,
                &format!("systemusers({ID})/Microsoft.Dynamics.CRM.RetrievePrincipalAccess(Target=@t)?@t={{'@odata.id':'contacts({ID})'}}")
            ),
            [
                "read systemusers",
                "execute RetrievePrincipalAccess",
                "read contacts",
            ]
        );
        assert_eq!(
            pairs(
                Method::GET,
                "new_ProjectSummary(Project=@p)?@p={'@odata.id':'new_projects(1)'}"
            ),
            ["execute new_ProjectSummary", "read new_projects"]
        );
    }

    #[test]
    fn fetch_xml_and_stored_queries() {
        let xml = "<fetch><entity name='account'><link-entity name='contact' from='contactid' to='primarycontactid'/></entity></fetch>";
        assert_eq!(
            pairs(Method::GET, &format!("accounts?fetchXml={xml}")),
            ["read accounts", "read contacts"]
        );
        assert_eq!(
            pairs(Method::GET, &format!("accounts?savedQuery={ID}")),
            ["read accounts", "read a table the gateway cannot name"]
        );
    }

    #[test]
    fn without_metadata_navigation_is_unresolved_and_plain_requests_are_not() {
        let t = touches(
            &Method::GET,
            &format!("/api/data/v9.2/accounts({ID})"),
            "$select=name,revenue",
            None,
        );
        assert_eq!(t.len(), 1);
        let t = touches(
            &Method::GET,
            "/api/data/v9.2/accounts",
            "$expand=primarycontactid",
            None,
        );
        assert!(t.iter().any(|t| t.resource == Resource::Unresolved));
    }

    #[test]
    fn messages_name_the_pair_and_what_touched_it() {
        let m = metadata();
        let t = touches(
            &Method::GET,
            "/api/data/v9.2/accounts",
            "$expand=contact_customer_accounts($select=fullname)",
            Some(&m),
        );
        assert_eq!(
            t[1].to_string(),
            "read on contacts (via $expand=contact_customer_accounts)"
        );
    }
}
