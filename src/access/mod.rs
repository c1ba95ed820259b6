//! May this caller make this request? The access stage owns the rules (`access:` in the
//! config) and the reading of the request target as an entity set ([`target`]).

pub mod target;

pub use target::Target;
