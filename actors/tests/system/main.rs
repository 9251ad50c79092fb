//! Integration tests of the actor system: one binary, one module per area. Actor-level
//! scenarios of the Worker and its goals run with fake builders, hooks and
//! substituters against temporary stores; the other modules test the real hook pool,
//! log collector and local builder, some of them against real Nix 2.8.

#[path = "../../../tests/it/nix_env.rs"]
#[macro_use]
mod nix_env;

mod goal_actor;
mod hook;
mod interop;
mod local_builder;
mod log_collector;
mod schedule;
mod worker;
