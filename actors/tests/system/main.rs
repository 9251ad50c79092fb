//! Actor-level tests of the drover actor system: actix Systems with fakes for the
//! neighbouring actors and temporary local stores. One module per area.

mod local_builder;
