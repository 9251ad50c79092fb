//! drover: Nix's formats and a Nix-compatible local store.
//!
//! This crate is the library under the drover build orchestrator. It has no actor
//! system and no async runtime: format modules take bytes and return values, and only
//! [`store`] touches the file system, the database and processes. The store directory
//! is always a value ([`store_path::StoreDir`]).
//!
//! See `docs/ARCHITECTURE.md` for the map of the code.

pub mod binary_cache;
pub mod build;
pub mod build_history;
pub mod build_log;
pub mod build_result;
pub mod config;
pub mod content_address;
pub mod derivation;
pub mod derived_path;
pub mod hash;
pub mod hook_protocol;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod realisation;
pub mod references;
pub mod signature;
pub mod store;
pub mod store_path;
pub mod worker_protocol;
