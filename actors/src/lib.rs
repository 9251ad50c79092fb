//! drover-actors: the actor system (Worker, goals, hook instance, log collector) and
//! the `drover` command line on top of the `drover` library.
