//! Integration tests of the drover library, including interop with real Nix 2.8.
//!
//! One test binary (`cargo test --test it`), one module per area. Interop tests get a
//! scratch Nix "test root" from [`nix_env`]; they run whenever `nix-store` is on PATH,
//! are skipped with a printed reason otherwise, and fail instead when
//! `DROVER_REQUIRE_NIX=1` (set by `.ci/run`).

mod binary_cache;
mod build;
mod build_log;
mod derivation;
mod gc;
mod gc_collect;
mod hook_protocol;
mod http_server;
mod https_cache;
mod nar;
mod narinfo;
mod narinfo_disk_cache;
mod nix_env;
mod sandbox;
mod store;
