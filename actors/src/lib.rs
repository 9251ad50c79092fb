//! drover-actors: the actor system (Worker, goals, hook instance, log collector) and
//! the `drover` command line on top of the `drover` library.
//!
//! [`messages`] defines the boundaries between the actors; see `docs/ARCHITECTURE.md`.
//!
//! # Realising paths
//!
//! A [`Worker`] is spawned with a [`WorkerConfig`] that injects every effect: the
//! local store, the LocalBuilder (`Recipient<RunLocalBuild>` and
//! `Recipient<CancelLocalBuild>`), an optional hook pool (`Recipient<HookTry>`), the
//! substituters and an optional progress recipient. [`Realise`] runs one realisation
//! and answers a [`RealiseOutcome`]: one [`KeyedBuildResult`] per request (built
//! outputs restricted to the request's outputs), `nix-store --realise`'s exit status
//! and the error messages Nix would print.
//!
//! Wiring the real actors: the LocalBuilder's address gives both `local_builder`
//! (`addr.clone().recipient()`) and `cancel_local_build` (`addr.recipient()`); the hook
//! pool's address gives `hook` (leave it `None` when `build-hook` is empty); the
//! LogCollector is not the Worker's business (the LocalBuilder and the hook pool get a
//! [`messages::StartLogCollector`]; the Worker only fills the [`messages::LogConfig`] of
//! hook jobs from [`WorkerSettings::log`]). Substituters are
//! `Arc<dyn `[`substituter::Substituter`]`>`s, tried in order of priority.
//! [`progress::ProgressEvent`]s (counters, `building '…'`, messages such as dependency
//! errors and `resolved derivation: …`) go to the optional `progress` recipient.
//!
//! Goals are plain state machines ([`goal`]) driven by the Worker's state machine
//! ([`WorkerCore`]); [`Worker`] is the thin actor around both, running blocking store
//! work on the blocking pool ([`store_executor`]). [`testing`] has fakes for every
//! injected actor and a synchronous driver for deterministic scheduler tests.
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
pub mod store_executor;
pub mod substituter;
pub mod system;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod worker;

pub use system::{Events, System, SystemBuilder, SystemError, SystemEvent};
pub use worker::actor::{spawn_worker, Interrupt, Realise, Worker, WorkerConfig};
pub use worker::{KeyedBuildResult, RealiseOutcome, WorkerCore, WorkerSettings};
