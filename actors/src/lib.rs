//! drover-actors: drover's actor system — a supervising Worker, one actor per goal,
//! the hook pool and its jobs, a log collector per build, the local builder — as a
//! library on top of the `drover` library. The `drover` command (crate
//! `drover-cli`) is one user of it.
//!
//! # Starting it
//!
//! [`System::start`] wires the real actors from `Settings` in one call and returns
//! the handle to plan and realise derived paths and [`Events`], the typed stream of
//! what happens; [`SystemBuilder`] replaces any injected actor (see [`system`]).
//!
//! # Its shape
//!
//! [`messages`] defines the boundaries between the actors; see
//! `docs/ARCHITECTURE.md` for the picture. The [`Worker`] actor hosts
//! [`WorkerCore`], the plain state machine of the goal graph, slots, keep-going and
//! the outcome; every live goal is a [`goal::actor::GoalActor`] around one of the
//! plain goal state machines of [`goal`], exchanging typed messages with the Worker
//! and reaching the store executor ([`store_executor`]), the LocalBuilder
//! ([`local_builder`]) and the hook pool ([`hook`]) through recipients injected at
//! construction. Fakes of every injected actor and a synchronous driver for
//! deterministic scheduler tests are in the `testing` module (feature `testing`).
//!
//! # Driving a Worker directly
//!
//! A [`Worker`] can also be spawned alone with a [`WorkerConfig`] that injects every
//! effect: the local store, the LocalBuilder (`Recipient<RunLocalBuild>` and
//! `Recipient<CancelLocalBuild>`), an optional hook pool (`Recipient<HookTry>`), the
//! substituters and an optional progress recipient. [`Realise`] runs one realisation
//! and answers a [`RealiseOutcome`]: one [`KeyedBuildResult`] per request (built
//! outputs restricted to the request's outputs), `nix-store --realise`'s exit status
//! and the error messages Nix would print.
//!
//! ```no_run
//! use std::sync::Arc;
//! use drover::derived_path::DerivedPath;
//! use drover_actors::messages::BuildMode;
//! use drover_actors::{spawn_worker, Realise, WorkerConfig, WorkerSettings};
//!
//! # async fn example(
//! #     store: Arc<drover::store::LocalStore>,
//! #     builder: actix::Recipient<drover_actors::messages::RunLocalBuild>,
//! #     cancel: actix::Recipient<drover_actors::messages::CancelLocalBuild>,
//! #     settings: &drover::config::Settings,
//! # ) {
//! let drv = store.store_dir().parse("/nix/store/…-hello.drv").unwrap();
//! let worker = spawn_worker(WorkerConfig {
//!     store: store.clone(),
//!     local_builder: builder,
//!     cancel_local_build: cancel,
//!     hook: None,
//!     cancel_hook_build: None,
//!     substituters: vec![],
//!     settings: WorkerSettings::from_settings(settings),
//!     progress: None,
//! });
//! let outcome = worker
//!     .send(Realise {
//!         requests: vec![DerivedPath::Built {
//!             drv_path: drv,
//!             outputs: drover::derived_path::OutputsSpec::All,
//!         }],
//!         mode: BuildMode::Normal,
//!     })
//!     .await
//!     .unwrap();
//! for e in &outcome.errors {
//!     eprintln!("error: {e}");
//! }
//! std::process::exit(outcome.exit_status);
//! # }
//! ```

pub mod binary_cache_substituter;
pub mod goal;
pub mod hook;
pub mod local_builder;
pub mod log_collector;
pub mod messages;
pub mod plan;
pub mod progress;
pub mod schedule;
pub mod store_executor;
pub mod substituter;
pub mod system;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod worker;

pub use system::{Events, System, SystemBuilder, SystemError, SystemEvent};
pub use worker::actor::{
    new_run_id, spawn_worker, CancelRun, Interrupt, Realise, RealiseRun, Worker, WorkerConfig,
};
pub use worker::{KeyedBuildResult, RealiseOutcome, RunId, WorkerCore, WorkerSettings};
pub mod daemon;
