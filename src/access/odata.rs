//! The OData query options that can reach other tables, read once into types: `$expand`
//! (nested, with its own options), the property paths in `$filter`, `$orderby`, `$select`
//! and `$apply`, `fetchXml`, `savedQuery` / `userQuery`, and parameter aliases (`@p1=`)
//! that carry entity references. Pure and total: any string maps to [`QueryOptions`], so
//! it is fuzzed as is (`fuzz/fuzz_targets/query_options.rs`).
//!
//! Expressions are not evaluated, only scanned for paths: a path is identifiers joined by
//! `/` (`primarycontactid/fullname`); a lambda `nav/any(c: c/x/y ...)` makes the paths
//! starting with its variable continue `nav`. String literals are skipped, so a `/` inside
//! quotes is no path. Over-reading is safe (the rules see one table too many and refuse);
//! under-reading is the bypass this module exists to close, so when in doubt it keeps.

use percent_encoding::percent_decode_str;

/// Nesting deeper than this (`$expand` in `$expand`, parentheses in expressions) is not
/// followed; the options record it so the request is refused rather than half-read.
pub const MAX_DEPTH: usize = 16;

/// A property path: the segments as written, without type casts.
pub type Path = Vec<String>;

/// What a request's query string asks for, as far as tables go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryOptions {
    /// `$expand` items, each with the options written inside its parentheses.
    pub expand: Vec<Expand>,
    /// Multi-segment or lambda paths in `$filter`, `$orderby`, `$select` and `$apply`,
    /// each with the option it came from.
    pub paths: Vec<(OptionName, Path)>,
    /// `fetchXml=`, decoded.
    pub fetch_xml: Option<String>,
    /// `savedQuery=` or `userQuery=` was given (the table is the stored query's).
    pub stored_query: Option<OptionName>,
    /// The values of every `savedQuery=` and `userQuery=`, decoded, in order.
    pub stored_query_ids: Vec<String>,
    /// Entity sets named by `@odata.id` references in parameter aliases (`@p1=...`).
    pub references: Vec<String>,
    /// Nesting beyond [`MAX_DEPTH`], or unbalanced parentheses: not fully read.
    pub unreadable: bool,
    /// An `$expand`'s options (at any depth) name a parameter alias (`@p`).
    pub alias_in_expand: bool,
}

/// The option a path was found in, for the message naming what touched a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionName {
    Expand,
    Filter,
    OrderBy,
    Select,
    Apply,
    Compute,
    SavedQuery,
    UserQuery,
}

impl OptionName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expand => "$expand",
            Self::Filter => "$filter",
            Self::OrderBy => "$orderby",
            Self::Select => "$select",
            Self::Apply => "$apply",
            Self::Compute => "$compute",
            Self::SavedQuery => "savedQuery",
            Self::UserQuery => "userQuery",
        }
    }
}

/// One `$expand` item: `path($select=...;$expand=...)`, or `*` (every navigation property).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expand {
    /// Empty for `*`.
    pub path: Path,
    pub options: QueryOptions,
}

impl QueryOptions {
    /// True when nothing here reaches beyond the addressed table's own columns.
    #[cfg(test)]
    pub(crate) fn is_plain(&self) -> bool {
        self.expand.is_empty()
            && self.paths.is_empty()
            && self.fetch_xml.is_none()
            && self.stored_query.is_none()
            && self.references.is_empty()
            && !self.unreadable
    }
}

/// Reads a raw query string (without the `?`). Option names compare ignoring case and the
/// `$` is optional, as OData 4.01 allows; repeated options are all read.
pub fn parse_query(query: &str) -> QueryOptions {
    let mut options = QueryOptions::default();
    let mut aliases = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name);
        let value = decode(value);
        let name = name.trim();
        if name.starts_with('@') {
            collect_references(&value, &mut options.references);
            aliases.push(value);
            continue;
        }
        let bare = name.strip_prefix('$').unwrap_or(name).to_ascii_lowercase();
        read_option(&bare, &value, &mut options, 0);
    }
    // An alias's value stands where the alias is used (`$filter=@f&@f=nav/x`): every alias
    // that is not a plain literal is read as an expression too. Where it is used is not
    // followed, so its paths count from the addressed table (over-reading is safe).
    let mut expressions = aliases.iter().filter(|v| !is_literal(v)).peekable();
    // Inside an `$expand`'s options an alias counts from the expanded table, which is not
    // followed here: refused rather than read against the wrong table.
    if expressions.peek().is_some() && options.alias_in_expand {
        options.unreadable = true;
    }
    for value in expressions {
        match expression_paths(value) {
            Some(paths) => options
                .paths
                .extend(paths.into_iter().map(|path| (OptionName::Filter, path))),
            None => options.unreadable = true,
        }
    }
    options
}

/// A literal an alias may stand for without reaching any table: a string, a number, a
/// GUID, `true`/`false`/`null`, or a JSON object or list (entity references in those are
/// read by [`collect_references`]).
fn is_literal(value: &str) -> bool {
    let v = value.trim();
    let quoted = v.len() >= 2
        && v.starts_with('\'')
        && v.ends_with('\'')
        && !v[1..v.len() - 1].replace("''", "").contains('\'');
    quoted
        || v.starts_with('{')
        || v.starts_with('[')
        || ["true", "false", "null"]
            .iter()
            .any(|k| v.eq_ignore_ascii_case(k))
        || uuid::Uuid::try_parse(v).is_ok()
        || (!v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')))
}

/// The one stored query a query string names (`savedQuery=<id>` or `userQuery=<id>`),
/// `None` when it names none, several, or one whose id is no GUID.
pub(crate) fn stored_query(query: &str) -> Option<(OptionName, uuid::Uuid)> {
    let options = parse_query(query);
    match (options.stored_query, options.stored_query_ids.as_slice()) {
        (Some(kind), [id]) => uuid::Uuid::try_parse(id.trim()).ok().map(|id| (kind, id)),
        _ => None,
    }
}

/// Percent-decoding as a query string is read (`+` is a space).
fn decode(text: &str) -> String {
    let spaced = text.replace('+', " ");
    percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
}

fn read_option(name: &str, value: &str, options: &mut QueryOptions, depth: usize) {
    let option = match name {
        "expand" => {
            read_expand(value, options, depth);
            return;
        }
        "fetchxml" => {
            options.fetch_xml = Some(value.to_string());
            return;
        }
        "savedquery" => {
            options.stored_query = Some(OptionName::SavedQuery);
            options.stored_query_ids.push(value.to_string());
            return;
        }
        "userquery" => {
            options.stored_query = Some(OptionName::UserQuery);
            options.stored_query_ids.push(value.to_string());
            return;
        }
        "filter" => OptionName::Filter,
        "orderby" => OptionName::OrderBy,
        "select" => OptionName::Select,
        "apply" => OptionName::Apply,
        "compute" => OptionName::Compute,
        _ => return,
    };
    match expression_paths(value) {
        Some(paths) => options
            .paths
            .extend(paths.into_iter().map(|path| (option, path))),
        None => options.unreadable = true,
    }
}

/// `a($select=x;$expand=b($expand=c)),d/$ref,*`
fn read_expand(value: &str, options: &mut QueryOptions, depth: usize) {
    if depth >= MAX_DEPTH {
        options.unreadable = true;
        return;
    }
    let Some(items) = split_top_level(value, b',') else {
        options.unreadable = true;
        return;
    };
    for item in items {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (path_text, inner) = match item.find('(') {
            Some(open) => {
                let Some(inner) = item[open + 1..].strip_suffix(')') else {
                    options.unreadable = true;
                    continue;
                };
                (&item[..open], Some(inner))
            }
            None => (item, None),
        };
        let mut nested = QueryOptions::default();
        if let Some(inner) = inner {
            options.alias_in_expand |= inner.contains('@');
            let Some(parts) = split_top_level(inner, b';') else {
                options.unreadable = true;
                continue;
            };
            for part in parts {
                let (name, value) = part.split_once('=').unwrap_or((part, ""));
                let name = name.trim();
                let bare = name.strip_prefix('$').unwrap_or(name).to_ascii_lowercase();
                read_option(&bare, value, &mut nested, depth + 1);
            }
        }
        let path = if path_text.trim() == "*" {
            Vec::new()
        } else {
            segments(path_text)
        };
        options.unreadable |= nested.unreadable;
        options.alias_in_expand |= nested.alias_in_expand;
        options.expand.push(Expand {
            path,
            options: nested,
        });
    }
}

/// Path segments, without `$ref`/`$count` and type casts (`Microsoft.Dynamics.CRM.x`).
fn segments(text: &str) -> Path {
    text.split('/')
        .map(str::trim)
        .filter(|s| !s.is_empty() && !s.starts_with('$') && !s.contains('.'))
        .map(str::to_string)
        .collect()
}

/// Splits at `separator` outside parentheses and quotes; `None` when they do not balance.
fn split_top_level(text: &str, separator: u8) -> Option<Vec<&str>> {
    let bytes = text.as_bytes();
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\'' => in_string = !in_string,
            _ if in_string => {}
            b'(' => depth += 1,
            b')' => depth = depth.checked_sub(1)?,
            _ if b == separator && depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 || in_string {
        return None;
    }
    parts.push(&text[start..]);
    Some(parts)
}

/// Functions and `$apply` transformations an expression may call: the OData canonical
/// functions, lambdas, and the transformations Dataverse documents. Any other unqualified
/// name before `(` (`aggregate(nav(...))`, `$apply=expand(...)`) could reach a table the
/// scanner cannot see, so the expression is unreadable. Namespaced names
/// (`Microsoft.Dynamics.CRM.Under(...)`) are Dataverse's query functions.
const KNOWN_CALLS: &[&str] = &[
    "any",
    "all",
    "contains",
    "endswith",
    "startswith",
    "length",
    "indexof",
    "substring",
    "tolower",
    "toupper",
    "trim",
    "concat",
    "matchespattern",
    "year",
    "month",
    "day",
    "hour",
    "minute",
    "second",
    "fractionalseconds",
    "totalseconds",
    "date",
    "time",
    "totaloffsetminutes",
    "mindatetime",
    "maxdatetime",
    "now",
    "round",
    "floor",
    "ceiling",
    "cast",
    "isof",
    "hassubset",
    "hassubsequence",
    "case",
    "aggregate",
    "groupby",
    "filter",
    "topcount",
    "topsum",
    "toppercent",
    "bottomcount",
    "bottomsum",
    "bottompercent",
    "identity",
    "and",
    "or",
    "not",
    "eq",
    "ne",
    "gt",
    "ge",
    "lt",
    "le",
    "has",
    "in",
    "add",
    "sub",
    "mul",
    "div",
    "divby",
    "mod",
];

/// The index of the first byte at or after `i` that does not start whitespace, Unicode's
/// included (vertical tab, no-break space, ...): the OData lexer skips every character
/// .NET counts as white space.
fn skip_space(text: &str, mut i: usize) -> usize {
    while let Some(c) = text.get(i..).and_then(|rest| rest.chars().next()) {
        if !c.is_whitespace() {
            break;
        }
        i += c.len_utf8();
    }
    i
}

/// The paths in an expression that can reach another table: those of two or more
/// segments, a navigation followed by `/$count`, and any path inside a lambda. `None` when
/// parentheses do not balance or nest deeper than [`MAX_DEPTH`], or for what the scanner
/// cannot follow (`$root`, a path after `(...)`, an unknown call).
pub fn expression_paths(text: &str) -> Option<Vec<Path>> {
    let bytes = text.as_bytes();
    let mut paths = Vec::new();
    // Lambda variables in scope: (name, the path they range over, paren depth they close at).
    let mut lambdas: Vec<(String, Path, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\'' {
            // A string literal; `''` is an escaped quote inside it.
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return None,
                    Some(b'\'') if bytes.get(i + 1) == Some(&b'\'') => i += 2,
                    Some(b'\'') => break,
                    Some(_) => i += 1,
                }
            }
            i += 1;
            continue;
        }
        if b == b'(' {
            depth += 1;
            if depth > MAX_DEPTH {
                return None;
            }
            i += 1;
            continue;
        }
        if b == b')' {
            depth = depth.checked_sub(1)?;
            while lambdas.last().is_some_and(|(_, _, at)| *at > depth) {
                lambdas.pop();
            }
            i += 1;
            // `(nav)/x`: a path continuing a parenthesised expression is not followed; only
            // the next `$apply` transformation may follow one (`filter(...)/groupby(...)`).
            let slash = skip_space(text, i);
            if bytes.get(slash) == Some(&b'/') {
                let name_start = skip_space(text, slash + 1);
                let name_end = name_start
                    + bytes[name_start..]
                        .iter()
                        .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
                        .count();
                let name = &text[name_start..name_end];
                let transformation = bytes.get(name_end) == Some(&b'(')
                    && KNOWN_CALLS
                        .iter()
                        .any(|known| name.eq_ignore_ascii_case(known));
                if !transformation {
                    return None;
                }
                i = name_start;
            }
            continue;
        }
        if b == b'$' {
            // `$it/` and `$this/` name the current record: the path goes on from it.
            // `$root/` reaches any table; other `$` names (`$count` after a path) add no table.
            let name_end = i
                + 1
                + bytes[i + 1..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .count();
            let name = &text[i + 1..name_end];
            if name.eq_ignore_ascii_case("root") {
                return None;
            }
            let after = skip_space(text, name_end);
            if (name.eq_ignore_ascii_case("it") || name.eq_ignore_ascii_case("this"))
                && bytes.get(after) == Some(&b'/')
            {
                i = skip_space(text, after + 1);
            } else {
                i = name_end;
            }
            continue;
        }
        if !(b.is_ascii_alphabetic() || b == b'_' || b == b'@') {
            i += 1;
            continue;
        }
        // A path: identifiers (possibly namespace-qualified) joined by '/', with or
        // without spaces around each '/' (the OData lexer skips them).
        let mut word = String::new();
        loop {
            let run = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b'.' | b'@'))
            {
                i += 1;
            }
            word.push_str(&text[run..i]);
            let next = skip_space(text, i);
            if bytes.get(next) == Some(&b'/') {
                word.push('/');
                i = skip_space(text, next + 1);
                continue;
            }
            break;
        }
        // `@a/x`: an alias standing for the start of a path is not followed.
        if word.starts_with('@') && word.contains('/') {
            return None;
        }
        // `nav/$count`, `nav/` then anything the scanner does not read: still `nav`.
        let continues = word.ends_with('/');
        // Digits then letters (`3f2504e0-...`) were skipped as one token by the loop above
        // only if they started with a letter; a GUID starting with a letter reads as a
        // one-segment path, which reaches nothing.
        let mut path: Path = word
            .split('/')
            .filter(|s| !s.is_empty() && !s.contains('.') && !s.starts_with('@'))
            .map(str::to_string)
            .collect();
        let opens_call = bytes.get(i) == Some(&b'(');
        if opens_call {
            let last = word.rsplit('/').next().unwrap_or_default();
            let is_lambda = last.eq_ignore_ascii_case("any") || last.eq_ignore_ascii_case("all");
            if is_lambda {
                path.pop();
                let path = continue_lambda(path, &lambdas);
                // `nav/any(v: ...)`: the variable name runs to the ':'.
                let inner = &text[i + 1..];
                if let Some((var, _)) = inner.split_once(':') {
                    let var = var.trim();
                    if !var.is_empty()
                        && var.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
                    {
                        lambdas.push((var.to_string(), path.clone(), depth + 1));
                    }
                }
                paths.push(path);
                continue;
            }
            let known = last.contains('.')
                || KNOWN_CALLS
                    .iter()
                    .any(|known| last.eq_ignore_ascii_case(known));
            if !known {
                return None;
            }
            // A function call (`contains(...)`, `Microsoft.Dynamics.CRM.Under(...)`):
            // the name is no path (a namespaced one was never in it); a path before it
            // (`nav/fn(`, `a/b/fn(`) is a call on what the path reaches.
            if !last.contains('.') {
                path.pop();
            }
            let called_on_a_path = word.contains('/');
            if (called_on_a_path && !path.is_empty()) || path.len() >= 2 || !lambdas.is_empty() {
                paths.push(continue_lambda(path, &lambdas));
            }
            continue;
        }
        let in_lambda = path
            .first()
            .is_some_and(|first| lambdas.iter().any(|(var, _, _)| var == first));
        if in_lambda {
            // The variable alone (`c: ...`) adds nothing beyond the lambda's own path.
            if path.len() >= 2 || continues {
                paths.push(continue_lambda(path, &lambdas));
            }
        } else if path.len() >= 2 || (continues && !path.is_empty()) {
            paths.push(path);
        }
    }
    if depth != 0 {
        return None;
    }
    paths.retain(|p| !p.is_empty());
    Some(paths)
}

/// A path starting with a lambda variable continues the path the variable ranges over.
fn continue_lambda(path: Path, lambdas: &[(String, Path, usize)]) -> Path {
    let Some(first) = path.first() else {
        return path;
    };
    match lambdas.iter().rev().find(|(var, _, _)| var == first) {
        Some((_, over, _)) => over
            .iter()
            .cloned()
            .chain(path.into_iter().skip(1))
            .collect(),
        None => path,
    }
}

/// Entity sets named by `@odata.id` values in `text`: `{'@odata.id':'contacts(<id>)'}`,
/// absolute or relative, single or double quoted.
pub(crate) fn collect_references(text: &str, into: &mut Vec<String>) {
    let lower = text.to_ascii_lowercase();
    let mut from = 0;
    while let Some(found) = lower[from..].find("@odata.id") {
        let after = from + found + "@odata.id".len();
        from = after;
        let rest = text[after..].trim_start_matches(['\'', '"', ' ', ':']);
        let Some(end) = rest.find(['\'', '"']) else {
            continue;
        };
        if let Some(set) = reference_set(&rest[..end]) {
            into.push(set);
        }
    }
}

/// `contacts(<id>)`, `/contacts(<id>)`, `https://org/api/data/v9.2/contacts(<id>)` ->
/// `contacts`.
pub(crate) fn reference_set(reference: &str) -> Option<String> {
    let before_key = reference.split('(').next().unwrap_or_default();
    let name = before_key.rsplit('/').next().unwrap_or_default().trim();
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> Path {
        text.split('/').map(str::to_string).collect()
    }

    #[test]
    fn nested_expand_keeps_its_options() {
        let q = parse_query(
            "$select=name&$expand=contact_customer_accounts($select=fullname;$expand=owninguser($select=fullname)),primarycontactid",
        );
        assert_eq!(q.expand.len(), 2);
        assert_eq!(q.expand[0].path, path("contact_customer_accounts"));
        assert_eq!(q.expand[0].options.expand[0].path, path("owninguser"));
        assert_eq!(q.expand[1].path, path("primarycontactid"));
        assert!(q.paths.is_empty());
        assert!(!q.is_plain());
    }

    #[test]
    fn expand_spellings() {
        let q = parse_query(
            "expand=primarycontactid/$ref,*&%24EXPAND=a%28%24filter%3Db%2Fc%20eq%201%29",
        );
        assert_eq!(q.expand[0].path, path("primarycontactid"));
        assert!(q.expand[1].path.is_empty());
        assert_eq!(q.expand[2].path, path("a"));
        assert_eq!(
            q.expand[2].options.paths,
            vec![(OptionName::Filter, path("b/c"))]
        );
    }

    #[test]
    fn filter_paths_lambdas_and_literals() {
        let q = parse_query(
            "$filter=primarycontactid/fullname eq 'a/b' and contact_customer_accounts/any(c: c/parentcustomerid_account/name eq 'x') and contains(name,'y')",
        );
        assert_eq!(
            q.paths,
            vec![
                (OptionName::Filter, path("primarycontactid/fullname")),
                (OptionName::Filter, path("contact_customer_accounts")),
                (
                    OptionName::Filter,
                    path("contact_customer_accounts/parentcustomerid_account/name")
                ),
            ]
        );
    }

    #[test]
    fn apply_orderby_select() {
        let q = parse_query(
            "$apply=groupby((primarycontactid/fullname))&$orderby=parentaccountid/name desc&$select=name,accountid",
        );
        assert_eq!(
            q.paths,
            vec![
                (OptionName::Apply, path("primarycontactid/fullname")),
                (OptionName::OrderBy, path("parentaccountid/name")),
            ]
        );
    }

    #[test]
    fn plain_select_and_simple_filter_are_plain() {
        let q = parse_query("$select=name,revenue&$filter=name eq 'x/y' and revenue gt 5&$top=3");
        assert!(q.is_plain(), "{q:?}");
    }

    #[test]
    fn stored_queries_fetch_xml_and_references() {
        let q = parse_query("savedQuery=00000000-0000-0000-0000-000000000001");
        assert_eq!(q.stored_query, Some(OptionName::SavedQuery));
        let q = parse_query("userQuery=x");
        assert_eq!(q.stored_query, Some(OptionName::UserQuery));
        let q = parse_query("fetchXml=%3Cfetch%3E%3C%2Ffetch%3E");
        assert_eq!(q.fetch_xml.as_deref(), Some("<fetch></fetch>"));
        let q = parse_query("@tid={'@odata.id':'contacts(00000000-0000-0000-0000-000000000001)'}");
        assert_eq!(q.references, vec!["contacts".to_string()]);
    }

    #[test]
    fn spaced_aliased_counted_and_computed_paths_are_read() {
        for query in [
            "$filter=primarycontactid%20/fullname%20eq%20'x'",
            "$filter=primarycontactid/%20fullname eq 'x'",
            "$filter=primarycontactid%09/%0Afullname eq 'x'",
            "$filter=primarycontactid+/fullname+eq+'x'",
            "$orderby=name,primarycontactid /fullname",
            "$apply=groupby((primarycontactid /fullname))",
            "$filter=@f eq 'x'&@f=primarycontactid/fullname",
            "$orderby=@o&@o=primarycontactid/fullname",
            "$filter=$it/primarycontactid/fullname eq 'x'",
            "$compute=primarycontactid/fullname as x",
        ] {
            let q = parse_query(query);
            assert!(
                q.paths
                    .iter()
                    .any(|(_, p)| p.first().map(String::as_str) == Some("primarycontactid")),
                "{query}: {q:?}"
            );
        }
        for space in [
            "%0B",
            "%C2%A0",
            "%E2%80%83",
            "%E3%80%80",
            "%C2%85",
            "%E2%80%A8",
        ] {
            let q = parse_query(&format!("$filter=primarycontactid{space}/fullname eq 'x'"));
            assert_eq!(q.paths[0].1, path("primarycontactid/fullname"), "{space}");
        }
        let q = parse_query("$filter=primarycontactid/Microsoft.Dynamics.CRM.Foo() eq 1");
        assert_eq!(q.paths[0].1, path("primarycontactid"), "{q:?}");
        let q = parse_query("$filter=contact_customer_accounts/$count gt 0");
        assert_eq!(q.paths[0].1, path("contact_customer_accounts"));
        let q = parse_query("$filter=contact_customer_accounts %20/any(c:c/fullname eq 'x')");
        assert!(
            q.paths
                .iter()
                .any(|(_, p)| p == &path("contact_customer_accounts/fullname")),
            "{q:?}"
        );
    }

    #[test]
    fn what_the_scanner_cannot_follow_is_unreadable_and_chained_transformations_are_not() {
        for query in [
            "$filter=(primarycontactid)/fullname eq 'x'",
            "$filter=$root/contacts(1)/fullname eq 'x'",
            "$apply=expand(primarycontactid)",
            "$apply=aggregate(contact_customer_accounts(fullname with max as m))",
            "$expand=parentaccountid($filter=@f)&@f=primarycontactid/fullname eq 'x'",
            "$filter=@a/fullname eq 'x'&@a=primarycontactid",
        ] {
            assert!(parse_query(query).unreadable, "{query}");
        }
        let q = parse_query("$apply=filter(statecode eq 0)/groupby((primarycontactid/fullname),aggregate($count as n))");
        assert!(!q.unreadable, "{q:?}");
        assert_eq!(
            q.paths,
            vec![(OptionName::Apply, path("primarycontactid/fullname"))]
        );
        let q = parse_query("$filter=name eq @n and revenue gt @r&@n='a/b'&@r=5&@g=3f2504e0-4f89-11d3-9a0c-0305e82c3301");
        assert!(q.paths.is_empty() && !q.unreadable, "{q:?}");
        let q = parse_query("$filter=Microsoft.Dynamics.CRM.Today(PropertyName='createdon') and not(contains(name,'x'))");
        assert!(!q.unreadable, "{q:?}");
    }

    #[test]
    fn unbalanced_or_too_deep_is_unreadable() {
        assert!(parse_query("$filter=(a/b").unreadable);
        assert!(parse_query("$expand=a($select=x").unreadable);
        let deep = format!("$expand={}", "a($expand=".repeat(40) + &")".repeat(40));
        assert!(parse_query(&deep).unreadable);
        assert!(parse_query("$filter=name eq 'open").unreadable);
    }
}
