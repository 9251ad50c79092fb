//! drover-actors: the actor system (Worker, goals, hook instance, log collector) and
//! the `drover` command line on top of the `drover` library.
//!
//! [`messages`] defines the boundaries between the actors; see `docs/ARCHITECTURE.md`.

pub mod local_builder;
pub mod messages;
