//! Test doubles of the gateway's two upstreams, served on loopback: a local identity
//! provider ([`idp`]), a stand-in Dataverse Web API ([`dataverse`]), a stand-in Azure
//! instance metadata service for managed identity ([`imds`]), plus the signing
//! material they and hostile-token tests use ([`keys`]). Used by the `demo` subcommand,
//! the integration tests and the benchmarks.

pub mod dataverse;
pub mod gateway_config;
pub mod idp;
pub mod imds;
pub mod keys;
mod odata_filter;
pub mod scratch;
mod server;

pub use dataverse::{
    Dataverse, DataverseHandle, DirectoryUser, MetadataAnswers, RecordedRequest, Throttling,
    CSDL_FIXTURE,
};
pub use gateway_config::{gateway_config_yaml, ConfigParts};
pub use idp::{Idp, IdpHandle, JwksDocument, S2sRegistry, TokenEndpointMode, ENDLESS_BODY_BYTES};
pub use imds::{Imds, ImdsHandle, ImdsRequest};
pub use scratch::Scratch;

#[cfg(test)]
mod tests;
