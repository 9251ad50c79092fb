//! The library entry point: the whole actor system wired from [`Settings`] in one
//! call, as the `drover` CLI uses it.
//!
//! [`System::start`] (or [`SystemBuilder`], to replace any injected actor) opens the
//! store and starts, on the current actix arbiter: the LocalBuilder, the log
//! collectors' factory, the hook pool (when `build-hook` is set), the substituters
//! of `substituters`/`extra-substituters`, and the Worker. It returns a [`System`],
//! the handle to realise derived paths ([`System::realise`]) and to ask what a
//! realisation would do ([`System::plan`]), and [`Events`], the typed stream of
//! what happens ([`SystemEvent`]: goals started and finished with their
//! `BuildResult`, builds started and finished, each line of their logs,
//! substitutions started — with their live byte counts — and finished, messages).
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use drover::config::Settings;
//! use drover::derived_path::{DerivedPath, OutputsSpec};
//! use drover_actors::messages::BuildMode;
//! use drover_actors::{System, SystemEvent};
//!
//! let env = std::env::vars().collect();
//! let settings = Settings::load(&env, &[])?;
//! let (system, mut events) = System::start(&settings)?;
//! let drv = system.store().store_dir().parse("/nix/store/…-hello.drv")?;
//! actix::spawn(async move {
//!     while let Some(ev) = events.recv().await {
//!         if let SystemEvent::Log(line) = ev {
//!             println!("{line:?}");
//!         }
//!     }
//! });
//! let outcome = system
//!     .realise(
//!         vec![DerivedPath::Built { drv_path: drv, outputs: OutputsSpec::All }],
//!         BuildMode::Normal,
//!     )
//!     .await;
//! for e in &outcome.errors {
//!     eprintln!("error: {e}");
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Everything must run inside an actix `System` (`actix::System::new().block_on`,
//! `#[actix::main]` or `#[actix::test]`).

use std::sync::Arc;

use actix::prelude::*;
use drover::config::{Env, Settings};
use drover::derived_path::DerivedPath;
use drover::store::{LocalStore, StoreError};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::binary_cache_substituter::substituters_from_settings;
use crate::hook::{HookPool, HookPoolConfig};
use crate::local_builder::{LocalBuilder, LocalBuilderConfig};
use crate::log_collector::{starter_with, CollectorOptions, StderrSink};
use crate::messages::{
    BuildLogEvent, BuildMode, CancelHookBuild, CancelLocalBuild, HookTry, RunLocalBuild,
};
use crate::plan::{Plan, PlanError, PlanOptions, QueryObserver};
use crate::progress::ProgressEvent;
use crate::substituter::Substituter;
use crate::{
    new_run_id, CancelRun, Interrupt, Realise, RealiseOutcome, RealiseRun, RunId, Worker,
    WorkerConfig, WorkerSettings,
};

/// Why the system could not start.
#[derive(Debug, Error)]
pub enum SystemError {
    /// The store the settings name could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Something that happened in a run, in the order it happened.
#[derive(Debug, Clone)]
pub enum SystemEvent {
    /// The Worker's progress: counters, goals started and finished (with their
    /// `BuildResult`), builds and substitutions started and finished (a
    /// substitution's `Transfer` counts its bytes live), messages Nix would print.
    Progress(ProgressEvent),
    /// What a build's log says: each line, phases, `@nix` messages.
    Log(BuildLogEvent),
}

/// The receiving end of a system's events. Dropping it is fine: events are then
/// discarded.
pub struct Events {
    rx: mpsc::UnboundedReceiver<SystemEvent>,
}

impl Events {
    /// The next event; `None` once the system is gone.
    pub async fn recv(&mut self) -> Option<SystemEvent> {
        self.rx.recv().await
    }

    /// An event already sent, without waiting.
    pub fn try_recv(&mut self) -> Option<SystemEvent> {
        self.rx.try_recv().ok()
    }
}

/// Turns the Worker's and the log collectors' messages into [`SystemEvent`]s.
struct EventForwarder {
    tx: mpsc::UnboundedSender<SystemEvent>,
}

impl Actor for EventForwarder {
    type Context = Context<Self>;
}

impl Handler<ProgressEvent> for EventForwarder {
    type Result = ();
    fn handle(&mut self, ev: ProgressEvent, _: &mut Context<Self>) {
        let _ = self.tx.send(SystemEvent::Progress(ev));
    }
}

impl Handler<BuildLogEvent> for EventForwarder {
    type Result = ();
    fn handle(&mut self, ev: BuildLogEvent, _: &mut Context<Self>) {
        let _ = self.tx.send(SystemEvent::Log(ev));
    }
}

/// [`System::start`] with overrides: any injected actor can be replaced (tests,
/// embedders with their own builder or hook), and the CLI's choices set.
pub struct SystemBuilder {
    settings: Settings,
    env: Env,
    echo: bool,
    stderr: Option<StderrSink>,
    verbosity: u32,
    goal_events: bool,
    log_events: bool,
    progress: Option<Recipient<ProgressEvent>>,
    log_events_to: Option<Recipient<BuildLogEvent>>,
    print_build_lines: bool,
    store: Option<Arc<LocalStore>>,
    substituters: Option<Vec<Arc<dyn Substituter>>>,
    local_builder: Option<(Recipient<RunLocalBuild>, Recipient<CancelLocalBuild>)>,
    hook: Option<Option<(Recipient<HookTry>, Recipient<CancelHookBuild>)>>,
}

impl SystemBuilder {
    /// The real system for these settings, with no overrides; builder output is
    /// not echoed (it is in the events and the log files).
    pub fn new(settings: &Settings) -> SystemBuilder {
        SystemBuilder {
            settings: settings.clone(),
            env: Env::new(),
            echo: false,
            stderr: None,
            verbosity: 3,
            goal_events: true,
            log_events: true,
            progress: None,
            log_events_to: None,
            print_build_lines: true,
            store: None,
            substituters: None,
            local_builder: None,
            hook: None,
        }
    }

    /// The environment the settings were read from (the hook inherits it).
    pub fn env(mut self, env: Env) -> SystemBuilder {
        self.env = env;
        self
    }

    /// Echo builder output and hook messages to stderr as `nix-store` does
    /// (without `-Q`).
    pub fn echo(mut self, echo: bool) -> SystemBuilder {
        self.echo = echo;
        self
    }

    /// Where echoed output goes (default: the process's stderr).
    pub fn stderr(mut self, sink: StderrSink) -> SystemBuilder {
        self.stderr = Some(sink);
        self
    }

    /// Nix's verbosity (3 = info, the default; `-v` adds one, `--quiet` takes one):
    /// what the log collectors print of `@nix` messages and what the build hook is
    /// given.
    pub fn verbosity(mut self, v: u32) -> SystemBuilder {
        self.verbosity = v;
        self
    }

    /// Whether the events include every goal's start and end (default: yes).
    pub fn goal_events(mut self, on: bool) -> SystemBuilder {
        self.goal_events = on;
        self
    }

    /// Whether the events include the builds' log lines (default: yes).
    pub fn log_events(mut self, on: bool) -> SystemBuilder {
        self.log_events = on;
        self
    }

    /// Send the Worker's progress to this actor instead of the event stream: for a
    /// display that prints `building '…'` lines in order with the builder output
    /// the log collectors echo (an actor on the same arbiter is served in order; a
    /// reader of the stream may be polled late).
    pub fn progress(mut self, to: Recipient<ProgressEvent>) -> SystemBuilder {
        self.progress = Some(to);
        self
    }

    /// Send the builds' log events to this actor instead of the event stream.
    pub fn log_events_to(mut self, to: Recipient<BuildLogEvent>) -> SystemBuilder {
        self.log_events_to = Some(to);
        self
    }

    /// Whether echoed builder lines are printed by the log collectors themselves
    /// (default), or left to whoever receives the log events (a front end with its
    /// own format for them).
    pub fn print_build_lines(mut self, on: bool) -> SystemBuilder {
        self.print_build_lines = on;
        self
    }

    /// Use this store instead of opening the one the settings name.
    pub fn store(mut self, store: Arc<LocalStore>) -> SystemBuilder {
        self.store = Some(store);
        self
    }

    /// Use these substituters instead of the settings' `substituters`.
    pub fn substituters(mut self, subs: Vec<Arc<dyn Substituter>>) -> SystemBuilder {
        self.substituters = Some(subs);
        self
    }

    /// Use this builder instead of a [`LocalBuilder`].
    pub fn local_builder(
        mut self,
        run: Recipient<RunLocalBuild>,
        cancel: Recipient<CancelLocalBuild>,
    ) -> SystemBuilder {
        self.local_builder = Some((run, cancel));
        self
    }

    /// Use this hook pool (or none) instead of the settings' `build-hook`.
    pub fn hook(
        mut self,
        hook: Option<(Recipient<HookTry>, Recipient<CancelHookBuild>)>,
    ) -> SystemBuilder {
        self.hook = Some(hook);
        self
    }

    /// Starts the actors on the current arbiter.
    pub fn start(self) -> Result<(System, Events), SystemError> {
        let settings = self.settings;
        let store = match self.store {
            Some(s) => s,
            None => Arc::new(LocalStore::open(&settings)?),
        };
        let mut warnings = Vec::new();
        let substituters = match self.substituters {
            Some(s) => s,
            None => {
                let (s, w) = substituters_from_settings(&settings);
                warnings = w;
                s
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let events = EventForwarder { tx }.start();
        let log_events = match self.log_events_to {
            Some(to) => Some(to),
            None => self.log_events.then(|| events.clone().recipient()),
        };
        let mut options = CollectorOptions::new(log_events);
        options.print_build_lines = self.print_build_lines;
        options.verbosity = u64::from(self.verbosity);
        if let Some(s) = self.stderr {
            options.stderr = s;
        }
        let start_log = starter_with(options);
        // drover's build history: written by the local builder and the hook
        // pool, read here for the scheduler's estimates (and brought up to date
        // by the Worker before and after its runs).
        let history = Arc::new(crate::local_builder::history::HistoryLog::new(
            settings.state_dir(),
        ));
        let estimator = Arc::new(crate::schedule::HistoryEstimator::new(
            history.clone(),
            store.store_dir().clone(),
            settings.system(),
        ));
        let (local_builder, cancel_local_build) = match self.local_builder {
            Some(b) => b,
            None => {
                let mut config = LocalBuilderConfig::from_settings(&settings);
                config.echo = self.echo;
                config.history = Some(history.clone());
                config.substituters = Some(crate::local_builder::actor::SharedSubstituters(
                    substituters.clone(),
                ));
                let b = LocalBuilder::new(store.clone(), config, start_log.clone()).start();
                (b.clone().recipient(), b.recipient())
            }
        };
        let hook = match self.hook {
            Some(h) => h,
            None => settings.build_hook().map(|_| {
                let pool = HookPool::new(HookPoolConfig::from_settings(
                    &settings,
                    &self.env,
                    self.verbosity,
                    start_log,
                ))
                .with_history(history.clone())
                .start();
                // Cancelled hook builds are killed through the pool, which knows
                // its jobs.
                (pool.clone().recipient(), pool.recipient())
            }),
        };
        let (hook, cancel_hook_build) = match hook {
            Some((h, c)) => (Some(h), Some(c)),
            None => (None, None),
        };
        let mut worker_settings = WorkerSettings::from_settings(&settings);
        worker_settings.log.echo = self.echo;
        worker_settings.goal_events = self.goal_events;
        let worker = Worker::new(WorkerConfig {
            store: store.clone(),
            local_builder,
            cancel_local_build,
            hook,
            cancel_hook_build,
            substituters: substituters.clone(),
            settings: worker_settings,
            progress: Some(self.progress.unwrap_or_else(|| events.recipient())),
        })
        .with_estimator(estimator)
        .start();
        Ok((
            System {
                worker,
                store,
                substituters,
                settings,
                warnings,
                substituter_cache: Default::default(),
            },
            Events { rx },
        ))
    }
}

/// A running actor system: realise derived paths through it.
pub struct System {
    worker: Addr<Worker>,
    store: Arc<LocalStore>,
    substituters: Vec<Arc<dyn Substituter>>,
    settings: Settings,
    warnings: Vec<String>,
    /// The substituters of runs with other substitution settings than the
    /// system's, by [`substituters_key`].
    substituter_cache:
        std::sync::Mutex<std::collections::HashMap<String, Vec<Arc<dyn Substituter>>>>,
}

/// What the substituters opened for `settings` depend on.
fn substituters_key(s: &Settings) -> String {
    [
        "substitute",
        "substituters",
        "extra-substituters",
        "trusted-public-keys",
        "require-sigs",
        "fallback",
        "connect-timeout",
        "stalled-download-timeout",
        "download-attempts",
        "netrc-file",
        "narinfo-cache-positive-ttl",
        "narinfo-cache-negative-ttl",
    ]
    .iter()
    .map(|n| format!("{n}={}", s.get(n).unwrap_or_default()))
    .collect::<Vec<_>>()
    .join("\n")
}

impl System {
    /// The real system for `settings` (see [`SystemBuilder`] for overrides).
    pub fn start(settings: &Settings) -> Result<(System, Events), SystemError> {
        SystemBuilder::new(settings).start()
    }

    /// The store it works on.
    pub fn store(&self) -> &Arc<LocalStore> {
        &self.store
    }

    /// The substituters, in the settings' order.
    pub fn substituters(&self) -> &[Arc<dyn Substituter>] {
        &self.substituters
    }

    /// What the settings asked for that the system does not do (e.g. substituters
    /// of an unsupported kind), as Nix's `warning:` texts.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Nix's `queryMissing` for these requests: what will be built, fetched, or
    /// cannot be made. Blocking (store queries and narinfo requests): call it off
    /// an arbiter or before starting work.
    pub fn plan(&self, requests: &[DerivedPath]) -> Result<Plan, PlanError> {
        self.plan_observed(requests, None)
    }

    /// [`System::plan`], with every narinfo query seen by `observer`.
    pub fn plan_observed(
        &self,
        requests: &[DerivedPath],
        observer: Option<&dyn QueryObserver>,
    ) -> Result<Plan, PlanError> {
        let s = &self.settings;
        let options = PlanOptions {
            parallel: s
                .get("http-connections")
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(25),
            fallback: s.fallback(),
            ca_derivations: s.is_experimental_feature_enabled("ca-derivations"),
            impure_derivations: s.is_experimental_feature_enabled("impure-derivations"),
        };
        crate::plan::plan_observed(
            &self.store,
            &self.substituters,
            requests,
            &options,
            observer,
        )
    }

    /// Realises the requests: one result per request, `nix-store --realise`'s exit
    /// status and the errors Nix would print. The run is queued at once (an
    /// [`System::interrupter`] message sent after this call finds it). Calls may
    /// overlap: concurrent runs share the Worker and its goals (one build of a
    /// derivation however many runs want it), each ending on its own; a repair
    /// or check run waits for the others, and they for it.
    pub fn realise(
        &self,
        requests: Vec<DerivedPath>,
        mode: BuildMode,
    ) -> impl std::future::Future<Output = RealiseOutcome> {
        let request = self.worker.send(Realise { requests, mode });
        async move { request.await.unwrap_or_else(worker_gone) }
    }

    /// [`System::realise`] as a run of its own that [`System::cancel_run`] can end
    /// alone (cancelling only what no other run needs), with `keep_going` for it
    /// (`None`: the settings').
    pub fn realise_run(
        &self,
        requests: Vec<DerivedPath>,
        mode: BuildMode,
        keep_going: Option<bool>,
    ) -> (RunId, impl std::future::Future<Output = RealiseOutcome>) {
        self.send_run(requests, mode, keep_going, None, None)
    }

    /// [`System::realise_run`] with settings of the run's own (a daemon client's
    /// `SetOptions` over the daemon's): its goals read them — keep-going,
    /// keep-failed, fallback, the post-build hook, `repeat`, signature checks of
    /// substitutions, and for its local builds `cores`, `sandbox`, the time
    /// limits, `secret-key-files`, `auto-optimise-store`. Its substitutions use
    /// the substituters of its settings when they differ from the system's
    /// (`substituters`, `trusted-public-keys`, …: opened once per such list and
    /// kept, see [`System::substituters_for`]). A goal it shares with another
    /// run keeps the settings of the run that made it; the slots (`max-jobs`)
    /// stay the system's.
    pub fn realise_run_with(
        &self,
        requests: Vec<DerivedPath>,
        mode: BuildMode,
        settings: &Settings,
    ) -> (RunId, impl std::future::Future<Output = RealiseOutcome>) {
        let mut s = WorkerSettings::from_settings(settings);
        s.local_build = Some(Arc::new(crate::messages::RunBuildSettings::from_settings(
            settings,
        )));
        let subs = self.substituters_for(settings);
        self.send_run(requests, mode, None, Some(Arc::new(s)), subs)
    }

    /// The substituters of `settings` when they are not the system's (another
    /// `substituters` list, other keys to trust, …): opened the first time such
    /// settings come, then kept for the next run with the same ones (a
    /// daemon's clients mostly repeat theirs). Warnings of substituters that
    /// could not be opened are logged. `None`: the system's.
    pub fn substituters_for(&self, settings: &Settings) -> Option<Vec<Arc<dyn Substituter>>> {
        let key = substituters_key(settings);
        if key == substituters_key(&self.settings) {
            return None;
        }
        let mut cache = self
            .substituter_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(subs) = cache.get(&key) {
            return Some(subs.clone());
        }
        let (subs, warnings) = substituters_from_settings(settings);
        for w in warnings {
            log::warn!("{w}");
        }
        cache.insert(key, subs.clone());
        Some(subs)
    }

    fn send_run(
        &self,
        requests: Vec<DerivedPath>,
        mode: BuildMode,
        keep_going: Option<bool>,
        settings: Option<Arc<WorkerSettings>>,
        substituters: Option<Vec<Arc<dyn Substituter>>>,
    ) -> (RunId, impl std::future::Future<Output = RealiseOutcome>) {
        let run = new_run_id();
        let request = self.worker.send(RealiseRun {
            run,
            requests,
            mode,
            keep_going,
            settings,
            substituters,
        });
        (
            run,
            async move { request.await.unwrap_or_else(worker_gone) },
        )
    }

    /// Ends a run of [`System::realise_run`] as an interrupt would, e.g. when the
    /// client that asked for it went away; its future answers
    /// `interrupted by the user`.
    pub fn cancel_run(&self, run: RunId) {
        self.worker.do_send(CancelRun(run));
    }

    /// Where to send [`Interrupt`] to stop the running realisation as Nix stops on
    /// SIGINT (every build cancelled, `interrupted by the user`, exit status 1).
    pub fn interrupter(&self) -> Recipient<Interrupt> {
        self.worker.clone().recipient()
    }
}

fn worker_gone(e: actix::MailboxError) -> RealiseOutcome {
    RealiseOutcome {
        results: Vec::new(),
        exit_status: 1,
        errors: vec![format!("the worker stopped unexpectedly: {e}")],
        fatal: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix::test]
    async fn other_substitution_settings_get_substituters_of_their_own_once() {
        let d = tempfile::tempdir().unwrap();
        let settings = Settings::for_root(d.path(), "substituters =\n").unwrap();
        let (system, _events) = System::start(&settings).unwrap();
        assert!(system.substituters_for(&settings).is_none());
        let cache = d.path().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(
            cache.join("nix-cache-info"),
            format!("StoreDir: {}\n", settings.store_dir().as_str()),
        )
        .unwrap();
        let url = format!("file://{}", cache.display());
        let mut client = settings.clone();
        client.set("substituters", &url).unwrap();
        let subs = system.substituters_for(&client).expect("its own");
        assert_eq!(subs.iter().map(|s| s.uri()).collect::<Vec<_>>(), [url]);
        let again = system.substituters_for(&client).expect("its own");
        assert!(Arc::ptr_eq(&subs[0], &again[0]), "opened once");
        client.set("trusted-public-keys", "k:AAAA").unwrap();
        let keyed = system.substituters_for(&client).expect("its own");
        assert!(!Arc::ptr_eq(&subs[0], &keyed[0]), "other keys, other ones");
    }
}
