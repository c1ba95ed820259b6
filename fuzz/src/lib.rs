//! Fuzz targets for dynamics-gateway. Each target's body is a plain function in
//! [`properties`], shared (by `#[path]`) with the main crate's `tests/e2e/fuzz_corpus.rs`,
//! which replays the committed corpora under `cargo test`.

pub mod properties;
