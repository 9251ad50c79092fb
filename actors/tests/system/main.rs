//! Actor-level scenarios of the Worker and its goals, with fake builders, hooks and
//! substituters against temporary stores.

mod worker;
