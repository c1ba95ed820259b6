//! The end-to-end suite, one test binary (it links once): a module per stage or concern,
//! each driving the real gateway over 127.0.0.1 against the testkit's stand-ins.
//! `cargo test --test e2e <module>::` runs one of them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod access;
mod access_odata;
mod budget;
mod budget_shared;
mod cancellation;
mod cli;
mod credentials;
mod dynamics_web_api;
mod fuzz_corpus;
mod hostile;
mod hostile_batch;
mod hostile_claims;
mod hostile_connections;
mod hostile_dependencies;
mod identity;
mod inbound;
mod lifecycle;
mod monitoring;
mod python_sdk;
mod real_headers;
mod real_traffic;
mod resilience;
mod tenants;
mod tls;
mod tracing;
mod transparency;
mod upstream;
