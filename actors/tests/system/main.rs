//! Actor-level scenarios of the Worker and its goals, with fake builders, hooks and
//! substituters against temporary stores.

mod worker;

#[path = "../../../tests/it/nix_env.rs"]
#[macro_use]
mod nix_env;

mod interop;
