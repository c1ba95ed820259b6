//! What the access rules need from an environment's CSDL (`$metadata`): for each entity
//! type its navigation properties and the type each leads to, which entity set holds each
//! type (Dataverse names a type by its table's logical name, so this also maps
//! `link-entity name="contact"` to `contacts`), and the parameter types of functions and
//! actions. A real organisation's CSDL is 10-50 MB: it is parsed as it streams (`quick-xml`),
//! keeping only these maps, with names lowercased (comparisons ignore ASCII case).

use std::collections::HashMap;
use std::io::BufRead;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// Why a CSDL document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("the CSDL is not well-formed XML at byte {position}")]
    Xml {
        position: u64,
        #[source]
        source: quick_xml::Error,
    },
    #[error("the CSDL declares no entity sets; is this an OData $metadata document?")]
    NoEntitySets,
    #[error("the CSDL ends inside an element: the document is cut short")]
    Truncated,
}

/// The compact map read from a CSDL document.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    /// Entity type (logical name) -> its base type and navigation properties.
    types: HashMap<String, EntityType>,
    /// Entity set -> the type it holds.
    set_type: HashMap<String, String>,
    /// Entity type -> the entity set holding it.
    type_set: HashMap<String, String>,
    /// Function or action name -> its parameters (name, type without namespace).
    operations: HashMap<String, Vec<(String, String)>>,
}

#[derive(Debug, Clone, Default)]
struct EntityType {
    base: Option<String>,
    /// Navigation property -> target entity type.
    navigation: HashMap<String, String>,
}

/// The parameter type Dataverse uses for "a record of any table".
const ANY_ENTITY: &str = "crmbaseentity";

impl Metadata {
    /// Reads a CSDL document as it streams.
    pub fn from_reader(input: impl BufRead) -> Result<Self, MetadataError> {
        let mut reader = Reader::from_reader(input);
        let mut buf = Vec::new();
        let mut metadata = Metadata::default();
        // The element being filled: an entity type or an operation.
        let mut in_type: Option<String> = None;
        let mut in_operation: Option<String> = None;
        // Open elements: a document cut short (a clean end of input inside an element,
        // which the reader itself accepts) must not pass for a whole, smaller schema.
        let mut depth = 0usize;
        loop {
            let event = reader
                .read_event_into(&mut buf)
                .map_err(|source| MetadataError::Xml {
                    position: reader.buffer_position(),
                    source,
                })?;
            match event {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    let is_start = matches!(event, Event::Start(_));
                    depth += usize::from(is_start);
                    match e.local_name().as_ref() {
                        b"EntityType" => {
                            if let Some(name) = attribute(e, b"Name") {
                                let name = name.to_ascii_lowercase();
                                let entry = metadata.types.entry(name.clone()).or_default();
                                entry.base = attribute(e, b"BaseType").map(|b| type_name(&b));
                                if is_start {
                                    in_type = Some(name);
                                }
                            }
                        }
                        b"NavigationProperty" => {
                            if let (Some(owner), Some(name), Some(target)) =
                                (&in_type, attribute(e, b"Name"), attribute(e, b"Type"))
                            {
                                if let Some(ty) = metadata.types.get_mut(owner) {
                                    ty.navigation
                                        .insert(name.to_ascii_lowercase(), type_name(&target));
                                }
                            }
                        }
                        b"EntitySet" => {
                            if let (Some(name), Some(ty)) =
                                (attribute(e, b"Name"), attribute(e, b"EntityType"))
                            {
                                let (name, ty) = (name.to_ascii_lowercase(), type_name(&ty));
                                metadata.type_set.insert(ty.clone(), name.clone());
                                metadata.set_type.insert(name, ty);
                            }
                        }
                        b"Function" | b"Action" => {
                            if let Some(name) = attribute(e, b"Name") {
                                let name = name.to_ascii_lowercase();
                                metadata.operations.entry(name.clone()).or_default();
                                if is_start {
                                    in_operation = Some(name);
                                }
                            }
                        }
                        b"Parameter" => {
                            if let (Some(op), Some(name), Some(ty)) =
                                (&in_operation, attribute(e, b"Name"), attribute(e, b"Type"))
                            {
                                if let Some(params) = metadata.operations.get_mut(op) {
                                    params.push((name, type_name(&ty)));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                Event::End(ref e) => {
                    depth = depth.saturating_sub(1);
                    match e.local_name().as_ref() {
                        b"EntityType" => in_type = None,
                        b"Function" | b"Action" => in_operation = None,
                        _ => {}
                    }
                }
                Event::Eof if depth > 0 => return Err(MetadataError::Truncated),
                Event::Eof => break,
                _ => {}
            }
            buf.clear();
        }
        if metadata.set_type.is_empty() {
            return Err(MetadataError::NoEntitySets);
        }
        Ok(metadata)
    }

    /// The heap bytes the map holds: string and table capacities, entries included (not
    /// the allocator's own overhead), for `/readyz` and the benchmark.
    pub fn heap_bytes(&self) -> usize {
        fn string(s: &String) -> usize {
            s.capacity()
        }
        fn table<K, V>(map: &HashMap<K, V>) -> usize {
            if map.capacity() == 0 {
                return 0;
            }
            // hashbrown: one control byte per bucket; buckets are a power of two over the
            // capacity, estimated here from it.
            let buckets = (map.capacity() * 8 / 7).next_power_of_two();
            buckets * (std::mem::size_of::<(K, V)>() + 1)
        }
        let types: usize = self
            .types
            .iter()
            .map(|(name, ty)| {
                string(name)
                    + ty.base.as_ref().map_or(0, string)
                    + table(&ty.navigation)
                    + ty.navigation
                        .iter()
                        .map(|(k, v)| string(k) + string(v))
                        .sum::<usize>()
            })
            .sum();
        let names = |map: &HashMap<String, String>| {
            table(map)
                + map
                    .iter()
                    .map(|(k, v)| string(k) + string(v))
                    .sum::<usize>()
        };
        let operations: usize = self
            .operations
            .iter()
            .map(|(name, params)| {
                string(name)
                    + params.capacity() * std::mem::size_of::<(String, String)>()
                    + params
                        .iter()
                        .map(|(n, t)| string(n) + string(t))
                        .sum::<usize>()
            })
            .sum();
        table(&self.types)
            + types
            + names(&self.set_type)
            + names(&self.type_set)
            + table(&self.operations)
            + operations
    }

    /// How many entity sets the metadata names.
    pub fn set_count(&self) -> usize {
        self.set_type.len()
    }

    /// The entity set a navigation property of `set` leads to; `None` when `name` is no
    /// navigation property of its type (a column, or unknown).
    pub fn navigation_target(&self, set: &str, name: &str) -> Option<&str> {
        let ty = self.set_type.get(&set.to_ascii_lowercase())?;
        let target = self.navigation_of(ty, &name.to_ascii_lowercase())?;
        self.type_set.get(target).map(String::as_str)
    }

    /// Every entity set the navigation properties of `set` lead to (`$expand=*`).
    pub(crate) fn all_navigation_targets(&self, set: &str) -> Vec<(&str, &str)> {
        let mut out = Vec::new();
        let mut ty = self.set_type.get(&set.to_ascii_lowercase());
        let mut hops = 0;
        while let Some(name) = ty {
            let Some(info) = self.types.get(name) else {
                break;
            };
            for (nav, target) in &info.navigation {
                if let Some(set) = self.type_set.get(target) {
                    out.push((nav.as_str(), set.as_str()));
                }
            }
            ty = info.base.as_ref();
            hops += 1;
            if hops > 8 {
                break;
            }
        }
        out
    }

    /// The entity set of a table's logical name (`contact` -> `contacts`).
    pub(crate) fn set_of_logical_name(&self, logical_name: &str) -> Option<&str> {
        self.type_set
            .get(&logical_name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// Whether the CSDL declares a function or action of this name.
    pub(crate) fn has_operation(&self, name: &str) -> bool {
        self.operations.contains_key(&name.to_ascii_lowercase())
    }

    /// The entity sets a function's or action's parameters are typed as (other than "any
    /// record", whose table the caller names with `@odata.id`).
    pub(crate) fn parameter_sets(&self, operation: &str) -> Vec<(&str, &str)> {
        self.operations
            .get(&operation.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .filter(|(_, ty)| ty != ANY_ENTITY)
            .filter_map(|(name, ty)| Some((name.as_str(), self.type_set.get(ty)?.as_str())))
            .collect()
    }

    /// Follows the base types for an inherited navigation property.
    fn navigation_of(&self, ty: &str, name: &str) -> Option<&String> {
        let mut current = Some(ty);
        // Dataverse's hierarchies are shallow; a cycle in a hostile file must not hang.
        for _ in 0..8 {
            let info = self.types.get(current?)?;
            if let Some(target) = info.navigation.get(name) {
                return Some(target);
            }
            current = info.base.as_deref();
        }
        None
    }
}

fn attribute(element: &BytesStart<'_>, name: &[u8]) -> Option<String> {
    element
        .attributes()
        .flatten()
        .find(|a| a.key.local_name().as_ref() == name)
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
}

/// `Collection(mscrm.contact)` / `Microsoft.Dynamics.CRM.contact` -> `contact`.
fn type_name(written: &str) -> String {
    let inner = written
        .strip_prefix("Collection(")
        .and_then(|t| t.strip_suffix(')'))
        .unwrap_or(written);
    inner
        .rsplit('.')
        .next()
        .unwrap_or(inner)
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/csdl.xml");

    fn fixture() -> Metadata {
        Metadata::from_reader(FIXTURE.as_bytes()).unwrap()
    }

    #[test]
    fn navigation_properties_lead_to_entity_sets() {
        let m = fixture();
        assert_eq!(
            m.navigation_target("accounts", "contact_customer_accounts"),
            Some("contacts")
        );
        assert_eq!(
            m.navigation_target("accounts", "primarycontactid"),
            Some("contacts")
        );
        assert_eq!(
            m.navigation_target("contacts", "parentcustomerid_account"),
            Some("accounts")
        );
        assert_eq!(m.navigation_target("accounts", "name"), None);
        // Inherited from the base type.
        assert_eq!(
            m.navigation_target("accounts", "owninguser"),
            Some("systemusers")
        );
        assert_eq!(
            m.navigation_target("new_projects", "new_accountid"),
            Some("accounts")
        );
    }

    #[test]
    fn logical_names_and_parameters() {
        let m = fixture();
        assert_eq!(m.set_of_logical_name("contact"), Some("contacts"));
        assert_eq!(m.set_of_logical_name("new_project"), Some("new_projects"));
        assert_eq!(
            m.parameter_sets("new_ProjectSummary"),
            vec![("Project", "new_projects")]
        );
        assert!(m
            .parameter_sets("RetrievePrincipalAccess")
            .iter()
            .all(|(_, s)| *s == "systemusers"));
    }

    #[test]
    fn not_csdl_is_refused() {
        assert!(matches!(
            Metadata::from_reader("<a><b/></a>".as_bytes()),
            Err(MetadataError::NoEntitySets)
        ));
        assert!(matches!(
            Metadata::from_reader("<a><b></a>".as_bytes()),
            Err(MetadataError::Xml { .. })
        ));
        // Cut short: every element read so far is whole, yet the document is not.
        let cut = &FIXTURE[..FIXTURE.find("</Schema>").unwrap()];
        assert!(matches!(
            Metadata::from_reader(cut.as_bytes()),
            Err(MetadataError::Truncated)
        ));
    }
}
