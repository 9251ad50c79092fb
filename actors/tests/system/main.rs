//! Integration tests of the actor system: one binary, one module per area.

mod log_collector;
