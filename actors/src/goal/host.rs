//! The one place that performs a goal's [`Effect`]s, shared by the goal actor
//! ([`super::actor::GoalActor`]) and the synchronous test driver
//! (`testing::SyncDriver`), so the two cannot drift.
//!
//! A [`GoalHost`] owns one goal state machine ([`GoalMachine`]). Each event goes
//! through [`GoalHost::step`]: the machine returns effects, and the host sorts them
//! into
//!
//! * what the goal does itself, through an [`EffectSink`]: blocking store jobs,
//!   local builds, hook requests and hook builds, timers, events for a later turn;
//! * what only the supervisor can do, as a [`GoalReport`] for the Worker: sub-goals,
//!   slots, progress, the final outcome, a run-ending error.
//!
//! The host also remembers what it must undo when cancelled (a running local or
//! hook build), turns a panicking step into a failed goal, and refuses events after
//! the goal has finished.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use drover::build_result::BuildStatus;
use drover::derived_path::OutputsSpec;
use drover::store_path::{StoreDir, StorePathSet};

use super::derivation::DerivationGoal;
use super::drv_output_substitution::DrvOutputSubstitutionGoal;
use super::path_substitution::PathSubstitutionGoal;
use super::{Effect, Event, ExitCode, GoalCtx, GoalId, GoalOutcome, GoalRequest, Job};
use crate::messages::{HookBuild, HookReply, HookTry, LocalBuildRequest, LogConfig};
use crate::progress::Transfer;
use crate::worker::WorkerSettings;

/// A goal's state machine, as a host drives it.
pub trait GoalMachine: Send + 'static {
    /// What kind of goal this is (for messages).
    const KIND: &'static str;

    /// One step: an event in, effects out. Never performs I/O.
    fn handle(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect>;

    /// Nix's `addWantedOutputs` (derivation goals only).
    fn add_wanted_outputs(&mut self, _outputs: &OutputsSpec) {}

    /// The outputs the goal serves (derivation goals only): reported with its
    /// outcome, so the Worker sees whether outputs it asked for later were included.
    fn wanted(&self) -> Option<OutputsSpec> {
        None
    }

    /// Whether a substituter failed (rather than merely lacked the path).
    fn substituter_failed(&self) -> bool {
        false
    }

    /// The round of a repeated build and how many there are (`repeat`).
    fn round(&self) -> Option<(u32, u32)> {
        None
    }
}

impl GoalMachine for DerivationGoal {
    const KIND: &'static str = "derivation";
    fn handle(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect> {
        DerivationGoal::handle(self, ev, ctx)
    }
    fn add_wanted_outputs(&mut self, outputs: &OutputsSpec) {
        DerivationGoal::add_wanted_outputs(self, outputs);
    }
    fn wanted(&self) -> Option<OutputsSpec> {
        Some(self.wanted.clone())
    }
    fn round(&self) -> Option<(u32, u32)> {
        DerivationGoal::round(self)
    }
}

impl GoalMachine for PathSubstitutionGoal {
    const KIND: &'static str = "path substitution";
    fn handle(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect> {
        PathSubstitutionGoal::handle(self, ev, ctx)
    }
    fn substituter_failed(&self) -> bool {
        PathSubstitutionGoal::substituter_failed(self)
    }
}

impl GoalMachine for DrvOutputSubstitutionGoal {
    const KIND: &'static str = "drv-output substitution";
    fn handle(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect> {
        DrvOutputSubstitutionGoal::handle(self, ev, ctx)
    }
    fn substituter_failed(&self) -> bool {
        DrvOutputSubstitutionGoal::substituter_failed(self)
    }
}

/// A new goal's state machine, of the kind a request asks for.
pub enum AnyGoal {
    Drv(DerivationGoal),
    Subst(PathSubstitutionGoal),
    DrvOut(DrvOutputSubstitutionGoal),
}

impl AnyGoal {
    pub fn for_request(req: GoalRequest) -> AnyGoal {
        match req {
            GoalRequest::Derivation {
                drv_path,
                outputs,
                mode,
            } => AnyGoal::Drv(DerivationGoal::new(drv_path, outputs, mode)),
            GoalRequest::Substitution { path, repair } => {
                AnyGoal::Subst(PathSubstitutionGoal::new(path, repair))
            }
            GoalRequest::DrvOutput { id, repair } => {
                AnyGoal::DrvOut(DrvOutputSubstitutionGoal::new(id, repair))
            }
        }
    }
}

/// What every goal of one run reads: the run's settings and the Worker state goals
/// may see (whether the hook is still enabled, whether a build slot is free).
/// Shared by all goals of a run; the runs of one core share that Worker state
/// ([`GoalEnv::for_run`]) and differ only in their settings.
pub struct GoalEnv {
    pub settings: Arc<WorkerSettings>,
    pub store_dir: StoreDir,
    pub n_substituters: usize,
    /// The run's own substituters (`None`: the Worker's).
    pub substituters: Option<Arc<[Arc<dyn crate::substituter::Substituter>]>>,
    /// A hook is configured and has not declined permanently. Any goal may clear it
    /// ([`Effect::DisableHook`]); every goal then stops asking.
    hook_enabled: Arc<AtomicBool>,
    /// Fewer local builds hold a slot than `max-jobs` allows (kept current by the
    /// Worker's core; [`GoalCtx::build_slot_free`]).
    build_slot_free: Arc<AtomicBool>,
}

impl std::fmt::Debug for GoalEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoalEnv")
            .field("settings", &self.settings)
            .field("store_dir", &self.store_dir)
            .field("n_substituters", &self.n_substituters)
            .field("own_substituters", &self.substituters.is_some())
            .field("hook_enabled", &self.hook_enabled)
            .field("build_slot_free", &self.build_slot_free)
            .finish()
    }
}

impl GoalEnv {
    pub fn new(
        settings: Arc<WorkerSettings>,
        store_dir: StoreDir,
        n_substituters: usize,
        hook: bool,
    ) -> GoalEnv {
        GoalEnv {
            settings,
            store_dir,
            n_substituters,
            substituters: None,
            hook_enabled: Arc::new(AtomicBool::new(hook)),
            build_slot_free: Arc::new(AtomicBool::new(true)),
        }
    }

    /// The environment of a run with settings of its own (a daemon client's):
    /// the same Worker state as this one, so a hook that declined for one run
    /// declined for all, and the slots are the same. `substituters`: the run's
    /// own, in place of the Worker's.
    pub fn for_run(
        &self,
        settings: Arc<WorkerSettings>,
        substituters: Option<Arc<[Arc<dyn crate::substituter::Substituter>]>>,
    ) -> GoalEnv {
        GoalEnv {
            settings,
            store_dir: self.store_dir.clone(),
            n_substituters: substituters
                .as_ref()
                .map_or(self.n_substituters, |s| s.len()),
            substituters,
            hook_enabled: self.hook_enabled.clone(),
            build_slot_free: self.build_slot_free.clone(),
        }
    }

    /// Set by the Worker's core whenever its build slots change.
    pub fn set_build_slot_free(&self, free: bool) {
        self.build_slot_free.store(free, Ordering::Relaxed);
    }

    pub fn hook_enabled(&self) -> bool {
        self.hook_enabled.load(Ordering::Relaxed)
    }

    fn ctx(&self) -> GoalCtx<'_> {
        GoalCtx {
            settings: &self.settings,
            hook_enabled: self.hook_enabled(),
            n_substituters: self.n_substituters,
            substituters: self.substituters.as_ref(),
            store_dir: &self.store_dir,
            build_slot_free: self.build_slot_free.load(Ordering::Relaxed),
        }
    }

    /// The log settings of a hook build of `drv_path`.
    fn hook_log(&self, drv_path: drover::store_path::StorePath) -> LogConfig {
        let l = &self.settings.log;
        LogConfig {
            drv_path,
            log_dir: l.log_dir.clone(),
            compress: l.compress,
            tail_lines: l.tail_lines,
            max_log_size: l.max_log_size,
            // Nix 2.8 does not time hook builds out itself (the hook passes both
            // limits to the remote); the log limit applies.
            max_silent_time: None,
            timeout: None,
            echo: l.echo,
        }
    }
}

/// Which slot a goal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// A local build slot (`max-jobs`).
    Build,
    /// A substitution slot (`max-substitution-jobs`).
    Substitution,
}

/// Progress a goal reports; the Worker counts it and forwards it to the display.
#[derive(Debug, Clone)]
pub enum GoalProgressKind {
    /// The build really started (locally, or on `machine`).
    BuildStarted {
        machine: Option<String>,
        /// `(round, rounds)` of a repeated build (`repeat`).
        round: Option<(u32, u32)>,
    },
    /// A download started; its bytes are counted into `transfer`.
    SubstitutionStarted {
        uri: String,
        transfer: Option<Arc<Transfer>>,
    },
    SubstitutionStopped,
    /// The substituter being tried has the path with these sizes.
    SubstitutionSizes {
        nar_size: u64,
        download_size: u64,
    },
    /// A message for the user.
    Message(String),
    /// The goal starts waiting.
    Waiting(crate::progress::WaitReason),
}

/// What a goal tells the Worker, in the order it happened.
#[derive(Debug)]
pub enum GoalReport {
    /// Create or reuse these goals and report when they finish; an empty list is
    /// answered with "all sub-goals done" at once.
    WaitFor(Vec<GoalRequest>),
    AcquireSlot(SlotKind),
    ReleaseSlot(SlotKind),
    Progress(GoalProgressKind),
    /// The goal is done; the host stops it.
    Finished(Finished),
    /// An error that ends the whole run (exit 1).
    Fatal(String),
}

/// A finished goal's report.
#[derive(Debug)]
pub struct Finished {
    pub outcome: GoalOutcome,
    /// The outputs a derivation goal served (see [`GoalMachine::wanted`]).
    pub wanted: Option<OutputsSpec>,
    pub substituter_failed: bool,
}

/// How a host performs the effects a goal does itself. Implemented by the goal
/// actor (messages, spawned futures, timers) and by the synchronous test driver
/// (inline calls and a queue).
pub trait EffectSink {
    /// Runs a blocking job off the arbiter; its event comes back to the goal (a job
    /// that panics: [`GoalHost::job_panicked`]).
    fn blocking(&mut self, job: Job);
    /// Starts a local build; the LocalBuilder answers the goal.
    fn run_local_build(&mut self, request: LocalBuildRequest);
    fn cancel_local_build(&mut self);
    /// Asks the hook; the reply comes back as [`Event::HookReply`].
    fn hook_try(&mut self, request: HookTry);
    /// Sends an accepted hook job its work (`reply_to` is the host's to fill).
    fn hook_build(&mut self, job: actix::Recipient<HookBuild>, build: HookBuildWork);
    fn cancel_hook_build(&mut self);
    /// [`Event::Wake`] after the poll interval.
    fn wake_later(&mut self);
    /// `ev` for this goal on a later turn, never inline.
    fn later(&mut self, ev: Event);
    /// Something for the Worker.
    fn report(&mut self, report: GoalReport);
}

/// A hook build's work, without the reply address.
#[derive(Debug)]
pub struct HookBuildWork {
    pub id: GoalId,
    pub inputs: StorePathSet,
    pub missing_outputs: std::collections::BTreeSet<String>,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Running {
    Nothing,
    LocalBuild,
    HookBuild,
}

/// One goal and what its host must remember about it.
pub struct GoalHost<G> {
    pub id: GoalId,
    pub goal: G,
    env: Arc<GoalEnv>,
    running: Running,
    finished: bool,
    /// The shared temporary roots stay while the goal lives (its roots are in
    /// them; `drover::store::gc_roots`).
    _roots: drover::store::gc_roots::RootsHold,
}

impl<G: GoalMachine> GoalHost<G> {
    pub fn new(id: GoalId, goal: G, env: Arc<GoalEnv>) -> GoalHost<G> {
        GoalHost {
            id,
            goal,
            env,
            running: Running::Nothing,
            finished: false,
            _roots: drover::store::gc_roots::RootsHold::new(),
        }
    }

    /// Whether the goal has reported its end (finished, fatal or cancelled).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Feeds one event to the goal and performs what it asks for.
    pub fn step(&mut self, ev: Event, sink: &mut impl EffectSink) {
        if self.finished {
            return;
        }
        if matches!(ev, Event::LocalBuildFinished(_) | Event::HookFinished(_)) {
            self.running = Running::Nothing;
        }
        let env = self.env.clone();
        let goal = &mut self.goal;
        let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| goal.handle(ev, &env.ctx())));
        match stepped {
            Ok(mut effects) => {
                // A goal's end stops its substitution too (the Worker counts both at
                // once): reported separately, the two would show a moment where the
                // copy is neither running nor done.
                if effects.iter().any(|f| matches!(f, Effect::Done(_))) {
                    effects.retain(|f| !matches!(f, Effect::SubstitutionStopped));
                }
                for f in effects {
                    if self.finished {
                        break;
                    }
                    self.perform(f, sink);
                }
            }
            Err(panic) => self.fail(
                format!(
                    "internal error: the {} goal panicked: {}",
                    G::KIND,
                    panic_message(&*panic)
                ),
                sink,
            ),
        }
    }

    /// A blocking job of the goal panicked: the goal fails with that message.
    pub fn job_panicked(&mut self, message: &str, sink: &mut impl EffectSink) {
        if !self.finished {
            self.fail(
                format!(
                    "internal error: a store job of the {} goal panicked: {message}",
                    G::KIND
                ),
                sink,
            );
        }
    }

    /// Nix's `addWantedOutputs`: merged while the goal runs. A goal that already
    /// finished ignores it; the Worker sees from [`Finished::wanted`] what it served.
    pub fn add_wanted_outputs(&mut self, outputs: &OutputsSpec) {
        if !self.finished {
            self.goal.add_wanted_outputs(outputs);
        }
    }

    /// The Worker cancelled the goal: a running build is stopped, and the goal
    /// takes no more events. Nothing is reported back.
    pub fn cancel(&mut self, sink: &mut impl EffectSink) {
        match self.running {
            Running::LocalBuild => sink.cancel_local_build(),
            Running::HookBuild => sink.cancel_hook_build(),
            Running::Nothing => {}
        }
        self.running = Running::Nothing;
        self.finished = true;
    }

    fn fail(&mut self, msg: String, sink: &mut impl EffectSink) {
        log::error!("{msg}");
        self.cancel(sink);
        sink.report(GoalReport::Finished(Finished {
            outcome: GoalOutcome::failure(ExitCode::Failed, BuildStatus::MiscFailure, msg),
            wanted: self.goal.wanted(),
            substituter_failed: false,
        }));
    }

    fn perform(&mut self, f: Effect, sink: &mut impl EffectSink) {
        fn progress(sink: &mut impl EffectSink, p: GoalProgressKind) {
            sink.report(GoalReport::Progress(p));
        }
        match f {
            Effect::Blocking(job) => sink.blocking(job),
            Effect::WaitFor(reqs) => sink.report(GoalReport::WaitFor(reqs)),
            Effect::AcquireBuildSlot => sink.report(GoalReport::AcquireSlot(SlotKind::Build)),
            Effect::ReleaseBuildSlot => sink.report(GoalReport::ReleaseSlot(SlotKind::Build)),
            Effect::AcquireSubstSlot => {
                sink.report(GoalReport::AcquireSlot(SlotKind::Substitution))
            }
            Effect::ReleaseSubstSlot => {
                sink.report(GoalReport::ReleaseSlot(SlotKind::Substitution))
            }
            Effect::WaitForAWhile => sink.wake_later(),
            Effect::HookTry {
                am_willing,
                system,
                drv_path,
                required_features,
            } => {
                if self.env.hook_enabled() {
                    sink.hook_try(HookTry {
                        am_willing,
                        system,
                        drv_path,
                        required_features,
                    });
                } else {
                    sink.later(Event::HookReply(HookReply::DeclinePermanently));
                }
            }
            Effect::DisableHook => self.env.hook_enabled.store(false, Ordering::Relaxed),
            Effect::HookBuild {
                job,
                drv_path,
                inputs,
                missing_outputs,
            } => {
                self.running = Running::HookBuild;
                let log = self.env.hook_log(drv_path);
                sink.hook_build(
                    job,
                    HookBuildWork {
                        id: self.id,
                        inputs,
                        missing_outputs,
                        log,
                    },
                );
            }
            Effect::RunLocalBuild(request) => {
                self.running = Running::LocalBuild;
                sink.run_local_build(request);
            }
            Effect::BuildStarted { machine } => progress(
                sink,
                GoalProgressKind::BuildStarted {
                    machine,
                    round: self.goal.round(),
                },
            ),
            Effect::SubstitutionStarted { uri, transfer } => progress(
                sink,
                GoalProgressKind::SubstitutionStarted { uri, transfer },
            ),
            Effect::SubstitutionStopped => progress(sink, GoalProgressKind::SubstitutionStopped),
            Effect::SubstitutionSizes {
                nar_size,
                download_size,
            } => progress(
                sink,
                GoalProgressKind::SubstitutionSizes {
                    nar_size,
                    download_size,
                },
            ),
            Effect::Message(m) => progress(sink, GoalProgressKind::Message(m)),
            Effect::Waiting(r) => progress(sink, GoalProgressKind::Waiting(r)),
            Effect::Done(outcome) => {
                self.finished = true;
                self.running = Running::Nothing;
                sink.report(GoalReport::Finished(Finished {
                    outcome,
                    wanted: self.goal.wanted(),
                    substituter_failed: self.goal.substituter_failed(),
                }));
            }
            Effect::Fatal(msg) => {
                self.finished = true;
                sink.report(GoalReport::Fatal(msg));
            }
        }
    }
}

/// The text of a panic's payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}
