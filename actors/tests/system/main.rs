//! Actor-level tests of the drover actor system: actix Systems with fakes for the
//! neighbouring actors and temporary local stores. One module per area.

#[path = "../../../tests/it/nix_env.rs"]
#[macro_use]
mod nix_env;

mod local_builder;
