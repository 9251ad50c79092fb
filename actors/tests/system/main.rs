//! Integration tests of the actor system: one binary, one module per area.

#[path = "../../../tests/it/nix_env.rs"]
#[macro_use]
mod nix_env;

mod hook;
mod log_collector;
