//! The Worker: the supervisor of realisation runs (Nix's `Worker`).
//!
//! One core may serve several runs at once ([`WorkerCore::start_run`]; the daemon's
//! clients, or a library user's overlapping calls): they share its goals, so a
//! derivation two runs want is built once and both get its result. Each run has its
//! own requests, keep-going, failure flags (exit status) and outcome; when a run
//! ends (done, failed without keep-going, a fatal error of a goal it needs, or
//! [`WorkerCore::interrupt_run`]), only the goals no other live run needs are
//! cancelled. The single-run calls ([`WorkerCore::start`], [`WorkerCore::outcome`])
//! use [`DEFAULT_RUN`].
//!
//! [`WorkerCore`] is the plain state machine, with no actix types in it: the goal
//! graph (one goal per `.drv` path, store path and `DrvOutput`; waiters and
//! waitees), the build and substitution slots ([`crate::schedule::Scheduler`]), keep-going and
//! cancellation, the run's failure flags, progress counters and the outcome. The
//! goals themselves live in their own actors ([`crate::goal::actor::GoalActor`]);
//! the core hears from them as [`GoalReport`]s ([`WorkerCore::report`]) and answers
//! with [`Action`]s its host performs: start a goal, send a goal a message
//! ([`ToGoal`]), show progress. The host is the Worker actor ([`actor::Worker`]) or,
//! in scheduler tests, `testing::SyncDriver` (feature `testing`).
//!
//! * Dedup: a request for a live goal reuses it; a derivation goal is told of new
//!   wanted outputs ([`ToGoal::AddWantedOutputs`]). If it finished before it heard of
//!   them (its report says which outputs it served), the requests it does not cover
//!   move to a new goal. A finished goal has left the maps, so a new request makes a
//!   new goal.
//! * Failure propagation: a waiter gets every finished dependency; without
//!   keep-going the first `Failed` dependency ends its wait at once. A failed
//!   top-level goal without keep-going cancels the run ([`ToGoal::Cancel`] to every
//!   goal, in id order; a goal cancels its own running build). Goals nobody waits
//!   for any more are cancelled. A goal's fatal error (Nix's errors thrown out of a
//!   goal, e.g. `bad hook reply '…'`) ends the run at once the same way, with exit
//!   status 1 and only that error, keep-going or not. A goal whose actor stopped
//!   without a result fails ([`WorkerCore::goal_stopped`]).
//! * Build order: slots are granted by the critical-path [`crate::schedule::Scheduler`]
//!   once the batch of changes settled (every live goal waits for a slot, holds
//!   one, waits for inputs or runs); [`WorkerCore::grant_deferred`] forces it.
//! * Progress: the counters go out once per batch of changes; a path substitution's
//!   live byte counts ([`crate::progress::Transfer`]) travel with its
//!   `SubstitutionStarted` event rather than as counter updates.
//! * Determinism: every map whose order matters (goals, waiters, waitees) is
//!   ordered, so cancellation and `finish` happen in the same order every run.

pub mod actor;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover::build_result::{BuildResult, BuildStatus, FailureFlags};
use drover::config::Settings;
use drover::derived_path::{DerivedPath, OutputsSpec};
use drover::store_path::{StoreDir, StorePath};

use crate::goal::host::{AnyGoal, Finished, GoalEnv, GoalProgressKind, GoalReport, SlotKind};
use crate::goal::{ExitCode, GoalId, GoalOutcome, GoalRequest, WaiteeResult};
use crate::messages::BuildMode;
use crate::progress::{Counters, GoalKey, ProgressEvent, WaitReason};
use crate::schedule::{Estimator, Force, NodeKind, Scheduler};

static NEXT_GOAL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Log settings the Worker passes to hook jobs (`LogConfig`).
#[derive(Debug, Clone, Default)]
pub struct LogSettings {
    pub log_dir: PathBuf,
    pub compress: bool,
    pub tail_lines: usize,
    pub max_log_size: u64,
    pub max_silent_time: Option<Duration>,
    pub timeout: Option<Duration>,
    pub echo: bool,
}

/// The settings a run depends on.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// `max-jobs` (0: no local builds).
    pub max_jobs: u64,
    /// `max-substitution-jobs` (default 16; below 1 means 1).
    pub max_substitution_jobs: u64,
    pub keep_going: bool,
    pub fallback: bool,
    pub keep_failed: bool,
    /// `repeat`: how many more times each build runs, to compare its outputs.
    pub repeat: u64,
    /// `build-poll-interval` (default 5 s).
    pub poll_interval: Duration,
    pub system: String,
    pub extra_platforms: BTreeSet<String>,
    pub system_features: BTreeSet<String>,
    pub post_build_hook: Option<String>,
    /// `builders` names machines (Nix's `getMachines()` is not empty): chooses the
    /// error when `max-jobs = 0` leaves nothing to run.
    pub remote_builders: bool,
    /// `experimental-features` contains `ca-derivations`.
    pub ca_derivations: bool,
    /// `experimental-features` contains `impure-derivations`.
    pub impure_derivations: bool,
    /// `substitute` (use substituters at all).
    pub substitute: bool,
    /// The URIs of the substituters, in the order tried (filled by the Worker).
    pub substituter_uris: Vec<String>,
    /// Which of them are trusted without signatures (filled by the Worker).
    pub substituter_trusted: Vec<bool>,
    /// `require-sigs`.
    pub require_sigs: bool,
    /// `trusted-public-keys`.
    pub trusted_public_keys: drover::signature::PublicKeys,
    pub log: LogSettings,
    /// Send [`ProgressEvent::GoalStarted`]/[`ProgressEvent::GoalFinished`] for every
    /// goal (library users' event streams; the CLI does without).
    pub goal_events: bool,
    /// The run's own settings for its local builds (a daemon client's); `None`:
    /// the LocalBuilder's configuration.
    pub local_build: Option<Arc<crate::messages::RunBuildSettings>>,
}

impl Default for WorkerSettings {
    fn default() -> WorkerSettings {
        WorkerSettings {
            max_jobs: 1,
            max_substitution_jobs: 16,
            keep_going: false,
            fallback: false,
            keep_failed: false,
            repeat: 0,
            poll_interval: Duration::from_secs(5),
            system: drover::config::native_system(),
            extra_platforms: BTreeSet::new(),
            system_features: BTreeSet::new(),
            post_build_hook: None,
            remote_builders: false,
            ca_derivations: false,
            impure_derivations: false,
            substitute: true,
            substituter_uris: Vec::new(),
            substituter_trusted: Vec::new(),
            require_sigs: true,
            trusted_public_keys: Default::default(),
            log: LogSettings::default(),
            goal_events: false,
            local_build: None,
        }
    }
}

impl WorkerSettings {
    /// The run settings from `nix.conf`-style settings.
    pub fn from_settings(s: &Settings) -> WorkerSettings {
        let secs = |v: i64| (v > 0).then(|| Duration::from_secs(v as u64));
        let uint = |name: &str, default: u64| {
            s.get(name)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(default)
        };
        WorkerSettings {
            max_jobs: s.max_jobs(),
            max_substitution_jobs: uint("max-substitution-jobs", 16),
            keep_going: s.keep_going(),
            fallback: s.fallback(),
            keep_failed: s.keep_failed(),
            repeat: s.repeat(),
            poll_interval: Duration::from_secs(uint("build-poll-interval", 5)),
            system: s.system(),
            extra_platforms: s.extra_platforms(),
            system_features: crate::goal::derivation::local_system_features(s),
            post_build_hook: s.post_build_hook(),
            remote_builders: !s.builder_lines().is_empty(),
            ca_derivations: s.is_experimental_feature_enabled("ca-derivations"),
            impure_derivations: s.is_experimental_feature_enabled("impure-derivations"),
            substitute: s.get("substitute").map(|v| v != "false").unwrap_or(true),
            substituter_uris: Vec::new(),
            substituter_trusted: Vec::new(),
            require_sigs: s.require_sigs(),
            trusted_public_keys: {
                let mut keys = drover::signature::PublicKeys::new();
                for k in s.trusted_public_keys() {
                    match drover::signature::PublicKey::parse(&k) {
                        Ok(k) => keys.insert(k),
                        Err(e) => log::warn!("ignoring trusted public key '{k}': {e}"),
                    }
                }
                keys
            },
            log: LogSettings {
                log_dir: s.log_dir().to_owned(),
                compress: s.compress_build_log(),
                tail_lines: s.log_lines() as usize,
                max_log_size: s.max_build_log_size(),
                max_silent_time: secs(s.max_silent_time()),
                timeout: secs(s.timeout()),
                echo: true,
            },
            goal_events: false,
            local_build: None,
        }
    }
}

/// One request's result: the `BuildResult` restricted to the requested outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyedBuildResult {
    pub path: DerivedPath,
    pub result: BuildResult,
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RealiseOutcome {
    /// One per request, in request order.
    pub results: Vec<KeyedBuildResult>,
    /// `nix-store --realise`'s exit status: 0, 1, or `0x60 | bits`.
    pub exit_status: i32,
    /// The errors Nix would print, in order (without the `error: ` prefix).
    pub errors: Vec<String>,
    /// The run ended with an error of its own rather than its goals' results
    /// (Nix's exception out of `Worker::run`: a goal's fatal error, an interrupt,
    /// a run that could not start): `errors` holds only that error, and the
    /// results are not the goals'. Nix's `buildPathsWithResults` throws it.
    pub fatal: bool,
}

/// A message for one goal (the Worker → goal messages of [`crate::messages`]).
#[derive(Debug)]
pub enum ToGoal {
    Start,
    SubGoalDone(WaiteeResult),
    AllSubGoalsDone,
    SlotGranted,
    AddWantedOutputs(OutputsSpec),
    /// The goal is no longer needed: its build is cancelled and it stops.
    Cancel,
}

/// What the core asks its host (the Worker actor, or the synchronous test driver)
/// to do.
pub enum Action {
    /// Start a goal with this state machine (a [`ToGoal::Start`] follows);
    /// `subgoal`: made for a goal that waits for it (its first store job goes
    /// before those of requested goals: `store_executor::JobPriority`).
    Spawn {
        goal: GoalId,
        machine: Box<AnyGoal>,
        /// What the goal reads: the settings of the run that made it
        /// ([`WorkerCore::start_run_with`]).
        env: Arc<GoalEnv>,
        /// A goal waits for it (its first job runs before requested goals').
        subgoal: bool,
    },
    /// Deliver a message to a live goal.
    ToGoal {
        goal: GoalId,
        msg: ToGoal,
    },
    Progress(ProgressEvent),
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Spawn { goal, .. } => write!(f, "Spawn({goal})"),
            Action::ToGoal { goal, msg } => write!(f, "ToGoal({goal}, {msg:?})"),
            Action::Progress(p) => write!(f, "Progress({p:?})"),
        }
    }
}

/// What the core knows of a goal's kind (the goal itself lives in its actor).
enum Info {
    Drv {
        drv_path: StorePath,
        mode: BuildMode,
        /// The union of the outputs every request asked for.
        wanted: OutputsSpec,
        /// The goal reported that its build started.
        started: bool,
    },
    Subst {
        path: StorePath,
    },
    DrvOut,
}

struct Entry {
    info: Info,
    key: GoalKey,
    waiters: BTreeSet<GoalId>,
    /// Pending dependencies → the request that made them.
    waitees: BTreeMap<GoalId, GoalRequest>,
    /// The runs that asked for this goal at top level.
    top_of: BTreeSet<RunId>,
    substituting: bool,
    /// (NAR size, download size) counted as expected for this goal.
    sizes: (u64, u64),
    /// The settings it was made with: its run's, or its first waiter's. A goal
    /// another run asks for later keeps them.
    env: Arc<GoalEnv>,
}

/// The error of an interrupted run, as Nix words it.
pub const INTERRUPTED: &str = "interrupted by the user";

/// One realisation run in a core that several runs may share
/// ([`WorkerCore::start_run`]).
pub type RunId = u64;

/// The run of the single-run API ([`WorkerCore::start`], [`WorkerCore::outcome`]).
pub const DEFAULT_RUN: RunId = 0;

/// What the core keeps of one run: its requests, their results and how it ended.
struct Run {
    /// The requests, in order, with the goal serving each.
    top: Vec<(DerivedPath, GoalId)>,
    /// Top-level goals not finished yet.
    pending_top: BTreeSet<GoalId>,
    top_results: HashMap<GoalId, Arc<GoalOutcome>>,
    /// Top-level goals in the order they failed.
    failed_top: Vec<GoalId>,
    /// The failures of the goals this run needed (its exit status bits).
    flags: FailureFlags,
    fatal: Option<String>,
    keep_going: bool,
    finished: bool,
}

/// The Worker's state machine.
pub struct WorkerCore {
    settings: Arc<WorkerSettings>,
    store_dir: StoreDir,
    goal_env: Arc<GoalEnv>,
    /// Boxed: a B-tree leaf holds 11 slots and ascending ids leave leaves about
    /// half full, so an inline `Entry` (about 250 bytes) cost twice its size per
    /// goal; a box costs its own size and 16 bytes of slot.
    goals: BTreeMap<GoalId, Box<Entry>>,
    keys: HashMap<GoalKey, GoalId>,
    sched: Scheduler,
    /// Goals that asked for a slot in this batch: those still waiting when it
    /// settles are reported as waiting for one (most are granted at once).
    asked_slot: Vec<(GoalId, SlotKind)>,
    actions: Vec<Action>,
    counters: Counters,
    sent_counters: Counters,
    /// Every run started and not yet taken ([`WorkerCore::take_outcome`]).
    runs: BTreeMap<RunId, Run>,
}

impl WorkerCore {
    /// A core for one run; `n_substituters` and `hook` (a hook is configured) are
    /// what its goals may read ([`WorkerCore::goal_env`]).
    pub fn new(
        settings: Arc<WorkerSettings>,
        store_dir: StoreDir,
        n_substituters: usize,
        hook: bool,
    ) -> WorkerCore {
        WorkerCore {
            asked_slot: Vec::new(),
            sched: Scheduler::new(
                Arc::new(crate::schedule::NoHistory),
                settings.max_jobs,
                settings.max_substitution_jobs.max(1),
            ),
            goal_env: Arc::new(GoalEnv::new(
                settings.clone(),
                store_dir.clone(),
                n_substituters,
                hook,
            )),
            settings,
            store_dir,
            goals: BTreeMap::new(),
            keys: HashMap::new(),
            actions: Vec::new(),
            counters: Counters::default(),
            sent_counters: Counters::default(),
            runs: BTreeMap::new(),
        }
    }

    /// Where the scheduler's build-time estimates come from (call before
    /// [`WorkerCore::start`]; without one every build gets the default estimate).
    pub fn set_estimator(&mut self, estimator: Arc<dyn Estimator>) {
        self.sched.set_estimator(estimator);
    }

    /// Whether slots are free and goals wait for them while some goal is not yet
    /// settled: the host calls [`WorkerCore::grant_deferred`] if this stays so.
    pub fn has_deferred_grants(&self) -> bool {
        self.live_runs() > 0 && self.sched.has_deferred()
    }

    /// The key of a live goal.
    pub fn goal_key(&self, id: GoalId) -> Option<&GoalKey> {
        self.goals.get(&id).map(|e| &e.key)
    }

    /// How long a deferred grant is worth waiting for at most: the own estimate of
    /// the goal it would go to now.
    pub fn deferred_estimate(&mut self) -> Option<Duration> {
        self.sched.deferred_estimate()
    }

    /// Grants the free slots now, without waiting for every goal to settle (a goal
    /// waiting for another process's lock or for a slow hook must not hold back
    /// the others for ever): with `all` false (the host's forced-grant limit
    /// passed) one slot of each kind stays free for a goal still being loaded
    /// that turns out to have a longer path ([`Force::Limit`]); with `all` (the
    /// host's longest wait passed) every free slot goes. Whether any was granted.
    pub fn grant_deferred(&mut self, all: bool) -> bool {
        let granted = self.grant(if all { Force::All } else { Force::Limit });
        self.settle();
        granted
    }

    fn grant(&mut self, force: Force) -> bool {
        if self.live_runs() == 0 {
            return false;
        }
        let grants = self.sched.grant(force);
        let granted = !grants.is_empty();
        for g in grants {
            self.asked_slot.retain(|(id, _)| *id != g.goal);
            self.send(g.goal, ToGoal::SlotGranted);
            if let Some(e) = self.goals.get(&g.goal) {
                self.actions
                    .push(Action::Progress(ProgressEvent::Scheduled {
                        goal: e.key.clone(),
                        path: g.path,
                        estimate: g.estimate,
                        still_waiting: g.still_waiting,
                    }));
            }
        }
        granted
    }

    /// What the goals of this run share: settings and the hook's state.
    pub fn goal_env(&self) -> &Arc<GoalEnv> {
        &self.goal_env
    }

    /// Starts the top-level goals of the single run ([`DEFAULT_RUN`]), with the
    /// settings' keep-going.
    pub fn start(&mut self, requests: Vec<DerivedPath>, mode: BuildMode) {
        let keep_going = self.settings.keep_going;
        self.start_run(DEFAULT_RUN, requests, mode, keep_going);
    }

    /// Starts a run beside any others going on: its requests share the goals of
    /// the other runs (one goal per `.drv`, store path and drv output, whoever
    /// asked), and it ends on its own — when its top-level goals are done, at its
    /// first failure without `keep_going`, or by [`WorkerCore::interrupt_run`] —
    /// cancelling only the goals no other live run needs. A run id already in use
    /// is refused (nothing happens, and `false` is returned).
    pub fn start_run(
        &mut self,
        run: RunId,
        requests: Vec<DerivedPath>,
        mode: BuildMode,
        keep_going: bool,
    ) -> bool {
        let env = self.goal_env.clone();
        self.start_run_in(run, requests, mode, keep_going, env)
    }

    /// [`WorkerCore::start_run`] with settings of the run's own (a daemon
    /// client's `SetOptions`): its keep-going, and what the goals it makes read —
    /// keep-failed, fallback, the post-build hook, the settings of its local
    /// builds, … A goal the run shares with another run keeps the settings of
    /// the run that made it (and so do the goals that goal waits for, made for
    /// it); the scheduling (slots, `max-jobs`) stays the core's. `substituters`:
    /// the run's own, in place of the core's (the settings' `substituter_uris`
    /// and `substituter_trusted` must describe them).
    pub fn start_run_with(
        &mut self,
        run: RunId,
        requests: Vec<DerivedPath>,
        mode: BuildMode,
        settings: Arc<WorkerSettings>,
        substituters: Option<Arc<[Arc<dyn crate::substituter::Substituter>]>>,
    ) -> bool {
        let keep_going = settings.keep_going;
        let env = if Arc::ptr_eq(&settings, &self.settings) && substituters.is_none() {
            self.goal_env.clone()
        } else {
            Arc::new(self.goal_env.for_run(settings, substituters))
        };
        self.start_run_in(run, requests, mode, keep_going, env)
    }

    fn start_run_in(
        &mut self,
        run: RunId,
        requests: Vec<DerivedPath>,
        mode: BuildMode,
        keep_going: bool,
        env: Arc<GoalEnv>,
    ) -> bool {
        if self.runs.contains_key(&run) {
            return false;
        }
        self.runs.insert(
            run,
            Run {
                top: Vec::new(),
                pending_top: BTreeSet::new(),
                top_results: HashMap::new(),
                failed_top: Vec::new(),
                flags: FailureFlags::default(),
                fatal: None,
                keep_going,
                finished: false,
            },
        );
        for r in requests {
            let req = match &r {
                DerivedPath::Opaque(p) => GoalRequest::Substitution {
                    path: p.clone(),
                    repair: mode == BuildMode::Repair,
                },
                DerivedPath::Built { drv_path, outputs } => GoalRequest::Derivation {
                    drv_path: drv_path.clone(),
                    outputs: outputs.clone(),
                    mode,
                },
            };
            let id = self.make_goal(req, &env, false);
            if let Some(e) = self.goals.get_mut(&id) {
                e.top_of.insert(run);
            }
            if let Some(state) = self.runs.get_mut(&run) {
                state.pending_top.insert(id);
                state.top.push((r, id));
            }
        }
        self.settle();
        true
    }

    /// Takes what a goal reported (ignored when the goal is gone: cancelled, or of
    /// another run).
    pub fn report(&mut self, goal: GoalId, report: GoalReport) {
        if self.goals.contains_key(&goal) {
            self.apply(goal, report);
        }
        self.settle();
    }

    /// A goal's actor stopped without reporting an end: the goal fails, so the run
    /// goes on (or ends) rather than waiting for it for ever.
    pub fn goal_stopped(&mut self, goal: GoalId) {
        let msg = "internal error: the goal stopped without a result".to_owned();
        self.report(
            goal,
            GoalReport::Finished(Finished {
                outcome: GoalOutcome::failure(ExitCode::Failed, BuildStatus::MiscFailure, msg),
                wanted: None,
                substituter_failed: false,
            }),
        );
    }

    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Every run started has finished (its outcome may not be taken yet).
    pub fn is_finished(&self) -> bool {
        self.runs.values().all(|r| r.finished)
    }

    /// Whether this run has finished (an unknown run has).
    pub fn run_finished(&self, run: RunId) -> bool {
        self.runs.get(&run).is_none_or(|r| r.finished)
    }

    /// The runs that finished and whose outcome is not yet taken, in id order.
    pub fn finished_runs(&self) -> Vec<RunId> {
        self.runs
            .iter()
            .filter(|(_, r)| r.finished)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Runs started and not finished.
    pub fn live_runs(&self) -> usize {
        self.runs.values().filter(|r| !r.finished).count()
    }

    /// The ids of the runs started and not finished, in id order.
    fn live_run_ids(&self) -> Vec<RunId> {
        self.runs
            .iter()
            .filter(|(_, r)| !r.finished)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The outcome of a finished run, which the core then forgets.
    pub fn take_outcome(&mut self, run: RunId) -> Option<RealiseOutcome> {
        if !self.runs.get(&run)?.finished {
            return None;
        }
        let mut r = self.runs.remove(&run)?;
        let (exit_status, errors) = self.status_of(&r);
        let fatal = r.fatal.is_some();
        // The results move out (a request's result is cloned only when the same
        // goal serves a later request too, or a goal still holds it): a large run
        // does not hold its results twice at its end.
        let mut results = Vec::with_capacity(r.top.len());
        for (i, (path, id)) in r.top.iter().enumerate() {
            let again = r.top[i + 1..].iter().any(|(_, later)| later == id);
            let result = match (again, r.top_results.remove(id)) {
                (_, None) => BuildResult::failure(BuildStatus::MiscFailure, "cancelled"),
                (true, Some(o)) => {
                    let result = o.result.clone();
                    r.top_results.insert(*id, o);
                    result
                }
                (false, Some(o)) => Arc::try_unwrap(o)
                    .map(|o| o.result)
                    .unwrap_or_else(|o| o.result.clone()),
            };
            results.push(request_result(path, result));
        }
        Some(RealiseOutcome {
            results,
            exit_status,
            errors,
            fatal,
        })
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Number of live goals.
    pub fn goal_count(&self) -> usize {
        self.goals.len()
    }

    fn send(&mut self, goal: GoalId, msg: ToGoal) {
        self.actions.push(Action::ToGoal { goal, msg });
    }

    /// The user interrupted the run (SIGINT, SIGTERM): every live goal is cancelled
    /// in goal-id order (running local builds get `CancelLocalBuild`, hook builds
    /// `CancelHookBuild`), and the run ends as Nix's does, with exit status 1 and the
    /// one error `interrupted by the user`. Nothing more is started or registered
    /// by this run. Does nothing once the run is finished.
    pub fn interrupt(&mut self) {
        let live = self.live_run_ids();
        if live.is_empty() {
            return;
        }
        // Every goal goes, in id order, before the runs record how they ended.
        let ids: Vec<GoalId> = self.goals.keys().copied().collect();
        for id in ids {
            if let Some(e) = self.goals.get_mut(&id) {
                e.top_of.clear();
            }
            self.cancel(id);
        }
        for run in live {
            self.end_run(run, Some(INTERRUPTED.to_owned()));
        }
    }

    /// Ends one run as [`WorkerCore::interrupt`] ends them all (`interrupted by
    /// the user`, exit status 1), cancelling the goals no other live run needs:
    /// e.g. the client that asked for it went away. Does nothing for a finished
    /// or unknown run.
    pub fn interrupt_run(&mut self, run: RunId) {
        self.end_run(run, Some(INTERRUPTED.to_owned()));
        self.settle();
    }

    /// The live goal of `req`, or a new one (`subgoal`: a goal waits for it).
    fn make_goal(&mut self, req: GoalRequest, env: &Arc<GoalEnv>, subgoal: bool) -> GoalId {
        let key = match &req {
            GoalRequest::Derivation { drv_path, .. } => GoalKey::Derivation(drv_path.clone()),
            GoalRequest::Substitution { path, .. } => GoalKey::Substitution(path.clone()),
            GoalRequest::DrvOutput { id, .. } => GoalKey::DrvOutput(id.clone()),
        };
        if let Some(&id) = self.keys.get(&key) {
            if let Some(e) = self.goals.get_mut(&id) {
                // A live goal is reused; a derivation goal is told of new outputs
                // (if it finishes before it hears of them, `goal_done` sees it).
                if let (Info::Drv { wanted, .. }, GoalRequest::Derivation { outputs, .. }) =
                    (&mut e.info, &req)
                {
                    if !outputs.is_subset_of(wanted) {
                        *wanted = wanted.union(outputs);
                        let outputs = outputs.clone();
                        self.send(id, ToGoal::AddWantedOutputs(outputs));
                    }
                }
                return id;
            }
        }
        // Ids are unique in the process, so late replies addressed to a goal of an
        // earlier run (or another Worker) never reach a goal of this one.
        let id = NEXT_GOAL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let info = match &req {
            GoalRequest::Derivation {
                drv_path,
                outputs,
                mode,
            } => {
                self.counters.expected_builds += 1;
                Info::Drv {
                    drv_path: drv_path.clone(),
                    mode: *mode,
                    wanted: outputs.clone(),
                    started: false,
                }
            }
            GoalRequest::Substitution { path, .. } => {
                self.counters.expected_substitutions += 1;
                Info::Subst { path: path.clone() }
            }
            GoalRequest::DrvOutput { .. } => Info::DrvOut,
        };
        self.sched.add_goal(
            id,
            match &info {
                Info::Drv { drv_path, .. } => NodeKind::Derivation(drv_path.clone()),
                Info::Subst { path } => NodeKind::Substitution(path.clone()),
                Info::DrvOut => NodeKind::DrvOutput,
            },
        );
        self.goals.insert(
            id,
            Box::new(Entry {
                info,
                key: key.clone(),
                waiters: BTreeSet::new(),
                waitees: BTreeMap::new(),
                top_of: BTreeSet::new(),
                substituting: false,
                sizes: (0, 0),
                env: env.clone(),
            }),
        );
        if self.settings.goal_events {
            self.actions
                .push(Action::Progress(ProgressEvent::GoalStarted {
                    goal: key.clone(),
                }));
        }
        self.keys.insert(key, id);
        self.actions.push(Action::Spawn {
            goal: id,
            machine: Box::new(AnyGoal::for_request(req)),
            env: env.clone(),
            subgoal,
        });
        self.send(id, ToGoal::Start);
        id
    }

    /// After a batch of changes: ends the run when nothing is left, and sends the
    /// counters once.
    fn settle(&mut self) {
        let done: Vec<RunId> = self
            .runs
            .iter()
            .filter(|(_, r)| !r.finished && r.pending_top.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for run in done {
            self.end_run(run, None);
        }
        self.grant(Force::No);
        for (id, kind) in std::mem::take(&mut self.asked_slot) {
            self.waiting(id, WaitReason::slot(kind));
        }
        let (used, cap) = (
            self.sched.in_use(SlotKind::Build),
            self.sched.capacity(SlotKind::Build),
        );
        self.goal_env.set_build_slot_free(used < cap);
        if self.live_runs() > 0 {
            if let Some(e) = self.sched.estimates(Instant::now()) {
                self.actions
                    .push(Action::Progress(ProgressEvent::Estimates(Arc::new(e))));
            }
        }
        if self.counters != self.sent_counters {
            self.sent_counters = self.counters;
            self.actions
                .push(Action::Progress(ProgressEvent::Counters(self.counters)));
        }
    }

    fn apply(&mut self, id: GoalId, report: GoalReport) {
        match report {
            GoalReport::WaitFor(reqs) => {
                self.waiting(
                    id,
                    WaitReason::Inputs(reqs.iter().filter_map(request_path).collect()),
                );
                self.wait_for(id, reqs)
            }
            // Granted by `settle` once the batch settled (critical path first);
            // until then the goal waits for its slot.
            GoalReport::AcquireSlot(kind) => {
                self.sched.acquire(id, kind);
                self.asked_slot.push((id, kind));
            }
            GoalReport::ReleaseSlot(kind) => self.sched.release(id, kind),
            GoalReport::Progress(p) => self.progress(id, p),
            GoalReport::Finished(f) => self.goal_done(id, f),
            GoalReport::Fatal(msg) => {
                for run in self.runs_needing(id) {
                    self.end_run(run, Some(msg.clone()));
                }
            }
        }
    }

    fn progress(&mut self, id: GoalId, p: GoalProgressKind) {
        let Some(e) = self.goals.get_mut(&id) else {
            return;
        };
        match p {
            GoalProgressKind::BuildStarted { machine, round } => {
                if let Info::Drv {
                    drv_path,
                    mode,
                    started,
                    ..
                } = &mut e.info
                {
                    // A hook build runs on another machine: no local slot.
                    self.sched.started(id, Instant::now(), machine.is_some());
                    // A repeated build counts as running once, whatever its round.
                    if !*started {
                        *started = true;
                        self.counters.running_builds += 1;
                    }
                    let verb = match mode {
                        BuildMode::Normal => "building",
                        BuildMode::Repair => "repairing outputs of",
                        BuildMode::Check => "checking outputs of",
                    };
                    self.actions
                        .push(Action::Progress(ProgressEvent::BuildStarted {
                            drv_path: drv_path.clone(),
                            machine,
                            verb,
                            round: round.filter(|_| *mode == BuildMode::Normal),
                        }));
                }
            }
            GoalProgressKind::SubstitutionStarted { uri, transfer } => {
                self.sched.started(id, Instant::now(), false);
                if !e.substituting {
                    e.substituting = true;
                    self.counters.running_substitutions += 1;
                }
                if let Info::Subst { path } = &e.info {
                    self.actions
                        .push(Action::Progress(ProgressEvent::SubstitutionStarted {
                            path: path.clone(),
                            uri,
                            transfer: transfer.unwrap_or_default(),
                        }));
                }
            }
            GoalProgressKind::SubstitutionStopped => {
                if e.substituting {
                    e.substituting = false;
                    self.counters.running_substitutions -= 1;
                }
            }
            GoalProgressKind::SubstitutionSizes {
                nar_size,
                download_size,
            } => {
                self.sched.set_nar_size(id, nar_size);
                let c = &mut self.counters;
                c.expected_nar_size = c.expected_nar_size - e.sizes.0 + nar_size;
                c.expected_download_size = c.expected_download_size - e.sizes.1 + download_size;
                e.sizes = (nar_size, download_size);
                if let Info::Subst { path } = &e.info {
                    self.actions
                        .push(Action::Progress(ProgressEvent::SubstitutionSizes {
                            path: path.clone(),
                            nar_size,
                            download_size,
                        }));
                }
            }
            GoalProgressKind::Message(m) => self
                .actions
                .push(Action::Progress(ProgressEvent::Message(m))),
            GoalProgressKind::Waiting(reason) => self.waiting(id, reason),
        }
    }

    /// Tells the display that a derivation or path substitution goal waits (a goal
    /// waiting for nothing, say an empty list of inputs, says nothing).
    fn waiting(&mut self, id: GoalId, reason: WaitReason) {
        if matches!(&reason, WaitReason::Inputs(i) if i.is_empty()) {
            return;
        }
        let path = match self.goals.get(&id).map(|e| &e.info) {
            Some(Info::Drv { drv_path, .. }) => drv_path.clone(),
            Some(Info::Subst { path }) => path.clone(),
            _ => return,
        };
        self.actions
            .push(Action::Progress(ProgressEvent::Waiting { path, reason }));
    }

    fn wait_for(&mut self, waiter: GoalId, reqs: Vec<GoalRequest>) {
        let mut added = 0;
        let env = match self.goals.get(&waiter) {
            Some(w) => w.env.clone(),
            None => self.goal_env.clone(),
        };
        for req in reqs {
            let dep = self.make_goal(req.clone(), &env, true);
            if dep == waiter {
                continue;
            }
            if let Some(d) = self.goals.get_mut(&dep) {
                d.waiters.insert(waiter);
            }
            self.sched.add_edge(dep, waiter);
            if let Some(w) = self.goals.get_mut(&waiter) {
                if w.waitees.insert(dep, req).is_none() {
                    added += 1;
                }
            }
        }
        self.sched.set_waiting_for_inputs(waiter, added > 0);
        if added == 0 {
            self.send(waiter, ToGoal::AllSubGoalsDone);
        }
    }

    /// A derivation goal finished before it heard of outputs asked for later (the
    /// race between "goal finished" and "more outputs wanted"): the requests its
    /// result does not cover move to a new goal for their outputs, as Nix makes a
    /// new goal when the old one is gone.
    fn move_uncovered_requests(&mut self, id: GoalId, served: &OutputsSpec) {
        let Some(entry) = self.goals.get(&id) else {
            return;
        };
        let Info::Drv {
            drv_path,
            mode,
            wanted,
            ..
        } = &entry.info
        else {
            return;
        };
        if wanted.is_subset_of(served) {
            return;
        }
        let (drv_path, mode) = (drv_path.clone(), *mode);
        let env = entry.env.clone();
        let covered = |outputs: &OutputsSpec| outputs.is_subset_of(served);
        let moved_waiters: Vec<GoalId> = entry
            .waiters
            .iter()
            .copied()
            .filter(|w| {
                self.goals.get(w).and_then(|we| we.waitees.get(&id)).is_some_and(|r| {
                    matches!(r, GoalRequest::Derivation { outputs, .. } if !covered(outputs))
                })
            })
            .collect();
        // (run, index in its requests) of the top-level requests it does not cover.
        let moved_top: Vec<(RunId, usize)> = entry
            .top_of
            .iter()
            .filter_map(|run| self.runs.get(run).map(|r| (*run, r)))
            .flat_map(|(run, r)| {
                r.top
                    .iter()
                    .enumerate()
                    .filter_map(move |(i, (path, goal))| {
                        (*goal == id
                        && matches!(path, DerivedPath::Built { outputs, .. } if !covered(outputs)))
                    .then_some((run, i))
                    })
            })
            .collect();
        if moved_waiters.is_empty() && moved_top.is_empty() {
            return;
        }
        let mut outputs = OutputsSpec::Names(Default::default());
        for w in &moved_waiters {
            if let Some(GoalRequest::Derivation { outputs: o, .. }) =
                self.goals.get(w).and_then(|we| we.waitees.get(&id))
            {
                outputs = outputs.union(o);
            }
        }
        for &(run, i) in &moved_top {
            if let Some(r) = self.runs.get(&run) {
                outputs = outputs.union(&request_outputs(&r.top[i].0));
            }
        }
        // The finished goal no longer answers for its key: a new goal takes it.
        let key = entry.key.clone();
        if self.keys.get(&key) == Some(&id) {
            self.keys.remove(&key);
        }
        let subgoal = !moved_waiters.is_empty();
        let new = self.make_goal(
            GoalRequest::Derivation {
                drv_path,
                outputs,
                mode,
            },
            &env,
            subgoal,
        );
        for w in moved_waiters {
            let req = self.goals.get_mut(&w).and_then(|we| we.waitees.remove(&id));
            if let Some(e) = self.goals.get_mut(&id) {
                e.waiters.remove(&w);
            }
            if let Some(req) = req {
                if let Some(we) = self.goals.get_mut(&w) {
                    we.waitees.insert(new, req);
                }
                if let Some(ne) = self.goals.get_mut(&new) {
                    ne.waiters.insert(w);
                }
                self.sched.add_edge(new, w);
            }
        }
        for (run, i) in moved_top {
            let Some(r) = self.runs.get_mut(&run) else {
                continue;
            };
            r.top[i].1 = new;
            r.pending_top.insert(new);
            let still_top = r.top.iter().any(|(_, t)| *t == id);
            if !still_top {
                r.pending_top.remove(&id);
            }
            if let Some(ne) = self.goals.get_mut(&new) {
                ne.top_of.insert(run);
            }
            if !still_top {
                if let Some(e) = self.goals.get_mut(&id) {
                    e.top_of.remove(&run);
                }
            }
        }
    }

    fn goal_done(&mut self, id: GoalId, f: Finished) {
        // The runs a failure counts for (found only for failures: it walks the
        // waiters up to the top-level goals).
        let failed = f.outcome.exit != ExitCode::Success
            || f.outcome.hash_mismatch
            || f.outcome.check_mismatch;
        let failed_runs = if failed {
            self.runs_needing(id)
        } else {
            BTreeSet::new()
        };
        if let Some(served) = &f.wanted {
            self.move_uncovered_requests(id, served);
        }
        let Some(entry) = self.goals.remove(&id) else {
            return;
        };
        if self.keys.get(&entry.key) == Some(&id) {
            self.keys.remove(&entry.key);
        }
        let outcome = Arc::new(f.outcome);
        if self.settings.goal_events {
            self.actions
                .push(Action::Progress(ProgressEvent::GoalFinished {
                    goal: entry.key.clone(),
                    result: outcome.result.clone(),
                }));
        }
        for run in &failed_runs {
            if let Some(r) = self.runs.get_mut(run) {
                r.flags.record(&outcome.result, outcome.hash_mismatch);
                if outcome.check_mismatch {
                    r.flags.check_mismatch = true;
                }
            }
        }
        let status = outcome.result.status;
        if entry.substituting {
            self.counters.running_substitutions -= 1;
        }
        self.counters.expected_nar_size -= entry.sizes.0;
        self.counters.expected_download_size -= entry.sizes.1;
        if outcome.exit == ExitCode::Success {
            self.counters.done_nar_size += entry.sizes.0;
            self.counters.done_download_size += entry.sizes.1;
        }
        // A finished goal's slots are free (it may hold one if it failed early).
        self.sched.remove(id);
        match &entry.info {
            Info::Drv {
                drv_path, started, ..
            } => {
                self.counters.expected_builds -= 1;
                if *started {
                    self.counters.running_builds -= 1;
                }
                if status == BuildStatus::Built {
                    self.counters.done_builds += 1;
                }
                if !outcome.result.success() && status != BuildStatus::DependencyFailed {
                    self.counters.failed_builds += 1;
                }
                self.actions
                    .push(Action::Progress(ProgressEvent::BuildFinished {
                        drv_path: drv_path.clone(),
                        status,
                    }));
            }
            Info::Subst { path } => {
                self.counters.expected_substitutions -= 1;
                if status == BuildStatus::Substituted {
                    self.counters.done_substitutions += 1;
                }
                if outcome.exit == ExitCode::Failed && f.substituter_failed {
                    self.counters.failed_substitutions += 1;
                }
                self.actions
                    .push(Action::Progress(ProgressEvent::SubstitutionFinished {
                        path: path.clone(),
                        status,
                    }));
            }
            Info::DrvOut => {
                if outcome.exit == ExitCode::Failed && f.substituter_failed {
                    self.counters.failed_substitutions += 1;
                }
            }
        }
        if outcome.exit != ExitCode::Success {
            // Nix logs the errors of derivation goals other goals wait for
            // (substitution goals only log at debug level).
            let is_drv = matches!(entry.info, Info::Drv { .. });
            if is_drv && entry.top_of.is_empty() && !outcome.result.error_msg.is_empty() {
                self.actions
                    .push(Action::Progress(ProgressEvent::Message(format!(
                        "error: {}",
                        outcome.result.error_msg
                    ))));
            }
        }
        // Abandoned dependencies (a finished goal no longer waits).
        for dep in entry.waitees.keys() {
            self.drop_waiter(*dep, id);
        }
        let failed = outcome.exit == ExitCode::Failed;
        for w in entry.waiters.iter().copied() {
            let Some(we) = self.goals.get_mut(&w) else {
                continue;
            };
            // The waiter's own keep-going (its run's settings) decides.
            let early_stop = failed && !we.env.settings.keep_going;
            let Some(request) = we.waitees.remove(&id) else {
                continue;
            };
            let rest: Vec<GoalId> = if we.waitees.is_empty() || !early_stop {
                Vec::new()
            } else {
                std::mem::take(&mut we.waitees).into_keys().collect()
            };
            let all_done = we.waitees.is_empty();
            self.send(
                w,
                ToGoal::SubGoalDone(WaiteeResult {
                    request,
                    outcome: outcome.clone(),
                }),
            );
            if all_done {
                self.sched.set_waiting_for_inputs(w, false);
                self.send(w, ToGoal::AllSubGoalsDone);
            }
            for d in rest {
                self.drop_waiter(d, w);
            }
        }
        for run in entry.top_of.iter().copied() {
            let Some(r) = self.runs.get_mut(&run) else {
                continue;
            };
            r.pending_top.remove(&id);
            if outcome.exit != ExitCode::Success {
                r.failed_top.push(id);
            }
            r.top_results.insert(id, outcome.clone());
            if outcome.exit == ExitCode::Failed && !r.keep_going {
                self.end_run(run, None);
            }
        }
    }

    /// The live runs that need `goal`: those that asked for it or for a goal that
    /// (transitively) waits for it. Found by walking the waiters upwards; when one
    /// run is live, it is that one.
    fn runs_needing(&self, goal: GoalId) -> BTreeSet<RunId> {
        let live = self.live_run_ids();
        if live.len() <= 1 {
            return live.into_iter().collect();
        }
        let mut runs = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let mut stack = vec![goal];
        while let Some(g) = stack.pop() {
            if !seen.insert(g) {
                continue;
            }
            if let Some(e) = self.goals.get(&g) {
                runs.extend(e.top_of.iter().copied());
                stack.extend(e.waiters.iter().copied());
            }
        }
        runs.retain(|r| live.contains(r));
        runs
    }

    /// The goals some live run still needs: its top-level goals and everything
    /// they (transitively) wait for.
    fn needed_by_live_runs(&self) -> BTreeSet<GoalId> {
        let mut needed = BTreeSet::new();
        let mut stack: Vec<GoalId> = self
            .runs
            .values()
            .filter(|r| !r.finished)
            .flat_map(|r| r.pending_top.iter().copied())
            .collect();
        while let Some(g) = stack.pop() {
            if !needed.insert(g) {
                continue;
            }
            if let Some(e) = self.goals.get(&g) {
                stack.extend(e.waitees.keys().copied());
            }
        }
        needed
    }

    /// `waiter` no longer waits for `goal`; a goal nobody needs is cancelled.
    fn drop_waiter(&mut self, goal: GoalId, waiter: GoalId) {
        let orphan = match self.goals.get_mut(&goal) {
            Some(e) => {
                e.waiters.remove(&waiter);
                e.waiters.is_empty() && e.top_of.is_empty()
            }
            None => false,
        };
        if orphan {
            self.cancel(goal);
        }
    }

    fn cancel(&mut self, id: GoalId) {
        let Some(entry) = self.goals.remove(&id) else {
            return;
        };
        if self.keys.get(&entry.key) == Some(&id) {
            self.keys.remove(&entry.key);
        }
        self.send(id, ToGoal::Cancel);
        if entry.substituting {
            self.counters.running_substitutions -= 1;
        }
        self.counters.expected_nar_size -= entry.sizes.0;
        self.counters.expected_download_size -= entry.sizes.1;
        self.sched.remove(id);
        match &entry.info {
            Info::Drv { started, .. } => {
                self.counters.expected_builds -= 1;
                if *started {
                    self.counters.running_builds -= 1;
                }
            }
            Info::Subst { path } => {
                self.counters.expected_substitutions -= 1;
                if entry.substituting {
                    // Its copy job may still run, but no longer counts.
                    self.actions
                        .push(Action::Progress(ProgressEvent::SubstitutionCancelled {
                            path: path.clone(),
                        }));
                }
            }
            Info::DrvOut => {}
        }
        for dep in entry.waitees.keys() {
            self.drop_waiter(*dep, id);
        }
    }

    /// Ends a run: its unfinished top-level goals count as failed, `fatal` (if
    /// any, and the first one) becomes its one error, and every goal no other live
    /// run needs is cancelled in id order, with nothing else undelivered reaching
    /// it. Does nothing for a finished or unknown run.
    fn end_run(&mut self, run: RunId, fatal: Option<String>) {
        let Some(r) = self.runs.get_mut(&run) else {
            return;
        };
        if r.finished {
            return;
        }
        if r.fatal.is_none() {
            r.fatal = fatal;
        }
        // Nix's `buildPaths` counts every top-level goal that did not succeed, the
        // ones still running or waiting when the run stopped included, in
        // `build of … failed`.
        let unfinished: Vec<GoalId> = r
            .top
            .iter()
            .map(|(_, id)| *id)
            .filter(|id| r.pending_top.contains(id))
            .collect();
        for id in unfinished {
            if !r.failed_top.contains(&id) {
                r.failed_top.push(id);
            }
        }
        r.finished = true;
        let tops: Vec<GoalId> = r.top.iter().map(|(_, id)| *id).collect();
        for id in tops {
            if let Some(e) = self.goals.get_mut(&id) {
                e.top_of.remove(&run);
            }
        }
        let needed = self.needed_by_live_runs();
        let doomed: BTreeSet<GoalId> = self
            .goals
            .keys()
            .copied()
            .filter(|g| !needed.contains(g))
            .collect();
        // Nothing undelivered reaches a goal that goes: only its cancel.
        self.actions.retain(|a| {
            !matches!(a, Action::ToGoal { goal, msg }
                if doomed.contains(goal) && !matches!(msg, ToGoal::Cancel))
        });
        for id in doomed {
            if let Some(e) = self.goals.get_mut(&id) {
                e.top_of.clear();
            }
            self.cancel(id);
        }
        if self.counters != self.sent_counters {
            self.sent_counters = self.counters;
            self.actions
                .push(Action::Progress(ProgressEvent::Counters(self.counters)));
        }
    }

    /// The results of the single run ([`DEFAULT_RUN`]) once finished.
    pub fn outcome(&self) -> RealiseOutcome {
        self.run_outcome(DEFAULT_RUN)
    }

    /// The results of a run (of its requests so far, if it has not finished).
    pub fn run_outcome(&self, run: RunId) -> RealiseOutcome {
        let Some(r) = self.runs.get(&run) else {
            return RealiseOutcome {
                results: Vec::new(),
                exit_status: 1,
                errors: vec![format!("no realisation run {run} in this worker")],
                fatal: true,
            };
        };
        let (exit_status, errors) = self.status_of(r);
        let results = r
            .top
            .iter()
            .map(|(path, id)| {
                let result = match r.top_results.get(id) {
                    Some(o) => o.result.clone(),
                    None => BuildResult::failure(BuildStatus::MiscFailure, "cancelled"),
                };
                request_result(path, result)
            })
            .collect();
        RealiseOutcome {
            results,
            exit_status,
            errors,
            fatal: r.fatal.is_some(),
        }
    }

    /// The exit status and errors of a run, as `nix-store --realise` ends.
    fn status_of(&self, r: &Run) -> (i32, Vec<String>) {
        if let Some(f) = &r.fatal {
            return (1, vec![f.clone()]);
        }
        let mut errors = Vec::new();
        let exit_status = if r.failed_top.is_empty() {
            0
        } else {
            r.flags.failing_exit_status()
        };
        // Nix's `buildPaths` rethrows only derivation goals' errors (`Goal::ex`); a
        // failed substitution goal is merely named in `build of … failed`.
        let is_drv_goal = |id: &GoalId| {
            r.top
                .iter()
                .any(|(p, i)| i == id && matches!(p, DerivedPath::Built { .. }))
        };
        // Nix walks its goals in key order (`b$<name>$<drv path>` for derivation
        // goals): it keeps the first error and logs each later one at once.
        let drv_key = |id: &GoalId| {
            r.top.iter().find(|(_, i)| i == id).map(|(p, _)| {
                let drv = p.base_path();
                (drv.name().to_owned(), self.store_dir.print(drv))
            })
        };
        let mut ex: Vec<(Option<(String, String)>, &str)> = r
            .failed_top
            .iter()
            .filter(|id| is_drv_goal(id))
            .filter_map(|id| r.top_results.get(id).map(|o| (drv_key(id), o)))
            .map(|(k, o)| (k, o.result.error_msg.as_str()))
            .filter(|(_, m)| !m.is_empty())
            .collect();
        ex.sort_by(|a, b| a.0.cmp(&b.0));
        if r.failed_top.len() == 1 && ex.len() == 1 {
            errors.push(ex[0].1.to_owned());
        } else if !r.failed_top.is_empty() {
            // The later ones as they were logged, then the kept one.
            if let Some(((_, first), later)) = ex.split_first() {
                errors.extend(later.iter().map(|(_, m)| (*m).to_owned()));
                errors.push((*first).to_owned());
            }
            let mut names: Vec<String> = Vec::new();
            for (path, id) in &r.top {
                if r.failed_top.contains(id) {
                    let n = format!("'{}'", self.store_dir.print(path.base_path()));
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
            }
            // Nix names them from a string set: sorted.
            names.sort();
            errors.push(format!("build of {} failed", names.join(", ")));
        }
        (exit_status, errors)
    }
}

/// A request's result: the goal's, with only the outputs the request names.
fn request_result(path: &DerivedPath, mut result: BuildResult) -> KeyedBuildResult {
    match path {
        DerivedPath::Opaque(_) => result.built_outputs.clear(),
        DerivedPath::Built { outputs, .. } => result
            .built_outputs
            .retain(|k, _| outputs.contains(&k.output)),
    }
    KeyedBuildResult {
        path: path.clone(),
        result,
    }
}

/// Convenience: the outputs a request names.
pub fn request_outputs(p: &DerivedPath) -> OutputsSpec {
    match p {
        DerivedPath::Opaque(_) => OutputsSpec::Names(Default::default()),
        DerivedPath::Built { outputs, .. } => outputs.clone(),
    }
}

/// The store path a request waits for: a `.drv` or a path to substitute.
fn request_path(r: &GoalRequest) -> Option<StorePath> {
    match r {
        GoalRequest::Derivation { drv_path, .. } => Some(drv_path.clone()),
        GoalRequest::Substitution { path, .. } => Some(path.clone()),
        GoalRequest::DrvOutput { .. } => None,
    }
}

impl WaitReason {
    /// Waiting for a slot of this kind.
    fn slot(kind: SlotKind) -> WaitReason {
        match kind {
            SlotKind::Build => WaitReason::BuildSlot,
            SlotKind::Substitution => WaitReason::SubstitutionSlot,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use drover::build_result::{BuildResult, BuildStatus};
    use drover::derived_path::{DerivedPath, OutputsSpec};
    use drover::store_path::StorePath;

    use super::*;
    use crate::goal::Event;
    use crate::messages::{BuildMode, LocalBuildFinished};
    use crate::testing::{SyncDriver, TestStore};

    fn built(p: &StorePath) -> DerivedPath {
        DerivedPath::Built {
            drv_path: p.clone(),
            outputs: OutputsSpec::All,
        }
    }

    fn setup(
        tweak: impl FnOnce(&mut WorkerSettings),
    ) -> (tempfile::TempDir, TestStore, Arc<WorkerSettings>) {
        let dir = tempfile::tempdir().unwrap();
        let ts = TestStore::open(dir.path());
        let mut s = WorkerSettings::from_settings(&ts.settings);
        s.max_jobs = 1;
        tweak(&mut s);
        (dir, ts, Arc::new(s))
    }

    fn core(ts: &TestStore, s: &Arc<WorkerSettings>) -> WorkerCore {
        WorkerCore::new(s.clone(), ts.store.store_dir().clone(), 0, false)
    }

    #[test]
    fn critical_path_gets_the_freed_slot() {
        let (_d, ts, s) = setup(|_| {});
        let blocker = ts.add_drv("blocker", &["out"], &[], &[]);
        let lone = ts.add_drv("lone", &["out"], &[], &[]);
        let c1 = ts.add_drv("c1", &["out"], &[], &[]);
        let c2 = ts.add_drv("c2", &["out"], &[&c1], &[]);
        let c3 = ts.add_drv("c3", &["out"], &[&c2], &[]);
        let st = ts.store.clone();
        let mut drv = SyncDriver::new(ts.store.clone(), s.clone(), vec![]);
        drv.build = Box::new(move |req| {
            if req.drv_path.name().starts_with("blocker") {
                return None;
            }
            crate::testing::write_outputs(&st, &req.drv_path, &req.output_paths).unwrap();
            Some(LocalBuildFinished {
                id: 0,
                result: BuildResult::new(BuildStatus::Built),
                hash_mismatch: false,
                outputs: req.output_paths.clone(),
            })
        });
        let mut c = core(&ts, &s);
        let secs = |n: &str, v: u64| (n.to_string(), Duration::from_secs(v));
        c.set_estimator(Arc::new(crate::schedule::FixedEstimates(
            [
                secs("blocker", 50),
                secs("lone", 5),
                secs("c1", 2),
                secs("c2", 2),
                secs("c3", 2),
            ]
            .into(),
        )));
        c.start(
            vec![built(&blocker), built(&lone), built(&c3)],
            BuildMode::Normal,
        );
        assert!(drv.run(&mut c).is_none());
        // The first grant waits for every goal to settle: `blocker` has the longest
        // path (50 s) of the ready `blocker`, `lone` (5 s) and `c1` (2 + 2 + 2 s).
        assert_eq!(drv.started, ["blocker"]);
        assert!(drv.progress.contains(&ProgressEvent::Scheduled {
            goal: crate::progress::GoalKey::Derivation(blocker.clone()),
            path: Duration::from_secs(50),
            estimate: Duration::from_secs(50),
            still_waiting: 2,
        }));
        let (gid, _) = drv.running.pop().unwrap();
        crate::testing::write_outputs(
            &ts.store,
            &blocker,
            &[("out".to_string(), ts.output(&blocker, "out"))].into(),
        )
        .unwrap();
        drv.deliver(
            gid,
            Event::LocalBuildFinished(LocalBuildFinished {
                id: gid,
                result: BuildResult::new(BuildStatus::Built),
                hash_mismatch: false,
                outputs: [("out".to_string(), ts.output(&blocker, "out"))].into(),
            }),
        );
        let out = drv.run(&mut c).expect("finished");
        assert_eq!(out.exit_status, 0, "{:?}", out.errors);
        // c1 (6 s) before lone (5 s); then lone (5 s) before c2 (4 s): c2 asks for
        // the slot as soon as c1 is done, and the choice waits for it.
        assert_eq!(drv.started, ["blocker", "c1", "lone", "c2", "c3"]);
        assert_eq!(
            c.counters(),
            crate::progress::Counters {
                done_builds: 5,
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_chain_loaded_after_the_forced_grant_limit_finds_a_slot_kept_for_it() {
        let (_d, ts, s) = setup(|s| s.max_jobs = 2);
        let c0 = ts.add_drv("c0", &["out"], &[], &[]);
        let c1 = ts.add_drv("c1", &["out"], &[&c0], &[]);
        let c2 = ts.add_drv("c2", &["out"], &[&c1], &[]);
        let ind: Vec<StorePath> = (0..4)
            .map(|i| ts.add_drv(&format!("i{i}"), &["out"], &[], &[]))
            .collect();
        let mut drv = SyncDriver::new(ts.store.clone(), s.clone(), vec![]);
        drv.build = Box::new(|_| None);
        // Each chain goal's first job (loading its `.drv`) ends only after the
        // forced-grant limit: the chain is found one link per limit, as in
        // `bench_schedule` (a) where 110 `.drv`s load in longer than 0.3 s.
        let mut slowed = std::collections::HashSet::new();
        drv.slow_job = Box::new(move |key, _| match key {
            crate::progress::GoalKey::Derivation(p) if p.name().starts_with('c') => {
                slowed.insert(p.clone())
            }
            _ => false,
        });
        let mut c = core(&ts, &s);
        let ms = |n: &str, v: u64| (n.to_string(), Duration::from_millis(v));
        c.set_estimator(Arc::new(crate::schedule::FixedEstimates(
            [
                ms("c0", 1000),
                ms("c1", 1000),
                ms("c2", 1000),
                ms("i0", 300),
                ms("i1", 300),
                ms("i2", 300),
                ms("i3", 300),
            ]
            .into(),
        )));
        let mut requests = vec![built(&c2)];
        requests.extend(ind.iter().map(built));
        c.start(requests, BuildMode::Normal);
        assert!(drv.run(&mut c).is_none());
        // The forced grant started one independent build and kept the other slot:
        // c0 (path 3 s), found last, starts at once.
        assert_eq!(drv.started, ["i0", "c0"]);
        // The chain's inputs are subgoals: their first store jobs go before those
        // of requested goals (`store_executor::JobPriority::StartSubGoal`).
        assert_eq!(
            drv.subgoals,
            [&c1, &c0].map(|d| crate::progress::GoalKey::Derivation(d.clone()))
        );
        assert!(drv.progress.contains(&ProgressEvent::Scheduled {
            goal: crate::progress::GoalKey::Derivation(c0.clone()),
            path: Duration::from_secs(3),
            estimate: Duration::from_secs(1),
            still_waiting: 3,
        }));
        // From here the chain keeps its slot: each link (2 s, 1 s) beats 0.3 s.
        for d in [&c0, &ind[0], &c1, &ind[1], &c2, &ind[2]] {
            finish_slow(&mut drv, &ts, d);
            assert!(drv.run(&mut c).is_none());
        }
        assert_eq!(drv.started, ["i0", "c0", "c1", "i1", "c2", "i2", "i3"]);
        finish_slow(&mut drv, &ts, &ind[3]);
        let out = drv.run(&mut c).expect("finished");
        assert_eq!(out.exit_status, 0, "{:?}", out.errors);
    }

    /// A driver whose builds of derivations named `slow…` stay running (until
    /// [`finish_slow`]) and of `fail…` fail; the others succeed.
    fn runs_driver<'a>(ts: &TestStore, s: &Arc<WorkerSettings>) -> SyncDriver<'a> {
        let st = ts.store.clone();
        let mut drv = SyncDriver::new(ts.store.clone(), s.clone(), vec![]);
        drv.build = Box::new(move |req| {
            let name = req.drv_path.name();
            if name.starts_with("slow") {
                return None;
            }
            if name.starts_with("fail") {
                return Some(LocalBuildFinished {
                    id: 0,
                    result: BuildResult::failure(BuildStatus::PermanentFailure, "it failed"),
                    hash_mismatch: false,
                    outputs: Default::default(),
                });
            }
            crate::testing::write_outputs(&st, &req.drv_path, &req.output_paths).unwrap();
            Some(LocalBuildFinished {
                id: 0,
                result: BuildResult::new(BuildStatus::Built),
                hash_mismatch: false,
                outputs: req.output_paths.clone(),
            })
        });
        drv
    }

    /// Ends the running build of `drv` (a `slow…` one) successfully.
    fn finish_slow(drv: &mut SyncDriver, ts: &TestStore, d: &StorePath) {
        let i = drv
            .running
            .iter()
            .position(|(_, n)| Some(n.as_str()) == d.name().strip_suffix(".drv"))
            .expect("the build is running");
        let (gid, _) = drv.running.remove(i);
        let outputs: BTreeMap<String, StorePath> =
            [("out".to_string(), ts.output(d, "out"))].into();
        crate::testing::write_outputs(&ts.store, d, &outputs).unwrap();
        drv.deliver(
            gid,
            Event::LocalBuildFinished(LocalBuildFinished {
                id: gid,
                result: BuildResult::new(BuildStatus::Built),
                hash_mismatch: false,
                outputs,
            }),
        );
    }

    #[test]
    fn concurrent_runs_share_one_build_and_both_get_its_result() {
        let (_d, ts, s) = setup(|s| s.max_jobs = 2);
        let dep = ts.add_drv("dep", &["out"], &[], &[]);
        let x = ts.add_drv("x", &["out"], &[&dep], &[]);
        let other = ts.add_drv("other", &["out"], &[], &[]);
        let mut drv = runs_driver(&ts, &s);
        let mut c = core(&ts, &s);
        assert!(c.start_run(1, vec![built(&x)], BuildMode::Normal, false));
        assert!(c.start_run(2, vec![built(&x), built(&other)], BuildMode::Normal, false));
        assert!(!c.start_run(2, vec![built(&other)], BuildMode::Normal, false));
        drv.run(&mut c).expect("both runs finished");
        let mut started = drv.started.clone();
        started.sort();
        assert_eq!(started, ["dep", "other", "x"], "one build each");
        let (a, b) = (c.take_outcome(1).unwrap(), c.take_outcome(2).unwrap());
        assert_eq!((a.exit_status, b.exit_status), (0, 0), "{a:?} {b:?}");
        assert_eq!(a.results.len(), 1);
        assert_eq!(b.results.len(), 2);
        assert_eq!(a.results[0].result, b.results[0].result);
        assert!(a.results[0].result.built_outputs.len() == 1);
        assert!(c.take_outcome(1).is_none(), "an outcome is taken once");
    }

    #[test]
    fn a_failed_run_cancels_only_what_no_other_run_needs() {
        let (_d, ts, s) = setup(|s| s.max_jobs = 3);
        let shared = ts.add_drv("slow-shared", &["out"], &[], &[]);
        let mine = ts.add_drv("slow-mine", &["out"], &[], &[]);
        let bad = ts.add_drv("fail-bad", &["out"], &[], &[]);
        let mut drv = runs_driver(&ts, &s);
        let mut c = core(&ts, &s);
        c.start_run(
            1,
            vec![built(&shared), built(&mine), built(&bad)],
            BuildMode::Normal,
            false,
        );
        c.start_run(2, vec![built(&shared)], BuildMode::Normal, false);
        assert!(drv.run(&mut c).is_none(), "run 2 goes on");
        assert!(c.run_finished(1) && !c.run_finished(2));
        let a = c.take_outcome(1).unwrap();
        assert_eq!(a.exit_status, 100, "{a:?}");
        // Only `slow-mine` (no other run needs it) was cancelled.
        assert_eq!(drv.cancelled.len(), 1);
        let names: Vec<&str> = drv.running.iter().map(|(_, n)| n.as_str()).collect();
        assert!(names.contains(&"slow-shared"), "{names:?}");
        finish_slow(&mut drv, &ts, &shared);
        drv.run(&mut c).expect("run 2 finished");
        let b = c.take_outcome(2).unwrap();
        assert_eq!(b.exit_status, 0, "{b:?}");
        assert_eq!(
            drv.started.iter().filter(|n| *n == "slow-shared").count(),
            1
        );
    }

    #[test]
    fn interrupting_one_run_leaves_the_others_goals() {
        let (_d, ts, s) = setup(|s| s.max_jobs = 2);
        let shared = ts.add_drv("slow-shared", &["out"], &[], &[]);
        let mine = ts.add_drv("slow-mine", &["out"], &[], &[]);
        let mut drv = runs_driver(&ts, &s);
        let mut c = core(&ts, &s);
        c.start_run(
            1,
            vec![built(&shared), built(&mine)],
            BuildMode::Normal,
            true,
        );
        c.start_run(2, vec![built(&shared)], BuildMode::Normal, true);
        assert!(drv.run(&mut c).is_none());
        c.interrupt_run(1);
        assert!(drv.run(&mut c).is_none());
        let a = c.take_outcome(1).unwrap();
        assert_eq!(
            (a.exit_status, a.errors.clone()),
            (1, vec![INTERRUPTED.to_owned()])
        );
        assert_eq!(drv.cancelled.len(), 1, "only the build run 1 alone needed");
        assert_eq!(c.live_runs(), 1);
        finish_slow(&mut drv, &ts, &shared);
        let b = drv.run(&mut c).expect("run 2 finished");
        assert_eq!(b.exit_status, 1, "the default run's outcome: there is none");
        assert_eq!(c.take_outcome(2).unwrap().exit_status, 0);
    }

    #[test]
    fn substitutions_forward_their_live_transfers() {
        use crate::progress::ProgressEvent;
        use crate::substituter::{InMemorySubstituter, Substituter};
        let (_d, ts, s) = setup(|s| {
            s.substituter_uris = vec!["mem://a".into()];
            s.substituter_trusted = vec![true];
        });
        let sub = Arc::new(InMemorySubstituter::new("mem://a", 40));
        let sd = ts.store.store_dir().clone();
        let dep = sd
            .parse(&format!("{}/{}-dep", sd.as_str(), "a".repeat(32)))
            .unwrap();
        let top = sd
            .parse(&format!("{}/{}-top", sd.as_str(), "b".repeat(32)))
            .unwrap();
        sub.add_file(dep.clone(), &[1u8; 3000], Default::default());
        sub.add_file(top.clone(), &[2u8; 7000], [dep.clone()].into());
        let mut drv = SyncDriver::new(
            ts.store.clone(),
            s.clone(),
            vec![sub.clone() as Arc<dyn Substituter>],
        );
        let mut c = WorkerCore::new(s.clone(), sd.clone(), 1, false);
        c.start(vec![DerivedPath::Opaque(top.clone())], BuildMode::Normal);
        let out = drv.run(&mut c).expect("finished");
        assert_eq!(out.exit_status, 0, "{:?}", out.errors);
        let mut started = Vec::new();
        let mut finished = Vec::new();
        for ev in &drv.progress {
            match ev {
                ProgressEvent::SubstitutionStarted {
                    path,
                    uri,
                    transfer,
                } => {
                    assert_eq!(uri, "mem://a");
                    started.push((path.clone(), transfer.clone()));
                }
                ProgressEvent::SubstitutionFinished { path, .. } => finished.push(path.clone()),
                _ => {}
            }
        }
        assert_eq!(finished, [dep.clone(), top.clone()]);
        let mut nar = 0;
        let mut download = 0;
        for (path, transfer) in &started {
            let info = sub.query_path_info(path).unwrap().unwrap();
            // The job the goal ran counted into the very Arc the event carries.
            assert_eq!(transfer.unpacked(), info.nar_size);
            assert_eq!(Some(transfer.downloaded()), info.download_size);
            nar += info.nar_size;
            download += info.download_size.unwrap();
        }
        assert_eq!(started.len(), 2);
        let counters = c.counters();
        assert_eq!(counters.done_substitutions, 2);
        assert_eq!(
            (counters.done_nar_size, counters.done_download_size),
            (nar, download)
        );
        assert_eq!(
            (counters.expected_nar_size, counters.expected_download_size),
            (0, 0)
        );
    }

    #[test]
    fn a_cancelled_copy_is_announced() {
        use crate::progress::ProgressEvent;
        use crate::substituter::{InMemorySubstituter, Substituter};
        let (_d, ts, s) = setup(|s| {
            s.substituter_uris = vec!["mem://a".into()];
            s.substituter_trusted = vec![true];
        });
        let sub = Arc::new(InMemorySubstituter::new("mem://a", 40));
        let sd = ts.store.store_dir().clone();
        let ok = sd
            .parse(&format!("{}/{}-ok", sd.as_str(), "a".repeat(32)))
            .unwrap();
        sub.add_file(ok.clone(), b"ok", Default::default());
        let fails = ts.add_drv("fails", &["out"], &[], &[]);
        let drv = SyncDriver::new(
            ts.store.clone(),
            s.clone(),
            vec![sub.clone() as Arc<dyn Substituter>],
        );
        let mut c = WorkerCore::new(s.clone(), sd.clone(), 1, false);
        c.start(
            vec![DerivedPath::Opaque(ok.clone()), built(&fails)],
            BuildMode::Normal,
        );
        // Runs every job but the copy, which stays in flight until the failed
        // build ends the run (no keep-going).
        let mut drv = drv;
        drv.build = Box::new(|_| {
            Some(LocalBuildFinished {
                id: 0,
                result: BuildResult::failure(BuildStatus::PermanentFailure, "no"),
                hash_mismatch: false,
                outputs: Default::default(),
            })
        });
        // The first substitution job after the copy started is the copy.
        let mut held = false;
        drv.hold_job = Box::new(move |kind, progress| {
            let hold = !held
                && kind == "path substitution"
                && progress
                    .iter()
                    .any(|e| matches!(e, ProgressEvent::SubstitutionStarted { .. }));
            held |= hold;
            hold
        });
        let out = drv.run(&mut c).expect("finished");
        assert_ne!(out.exit_status, 0);
        let progress = std::mem::take(&mut drv.progress);
        let names: Vec<String> = progress
            .iter()
            .filter_map(|e| match e {
                ProgressEvent::SubstitutionFinished { path, .. } if *path != ok => None,
                ProgressEvent::SubstitutionStarted { path, .. } => Some(format!("started {path}")),
                ProgressEvent::SubstitutionFinished { path, .. } => {
                    Some(format!("finished {path}"))
                }
                ProgressEvent::SubstitutionCancelled { path } => Some(format!("cancelled {path}")),
                _ => None,
            })
            .collect();
        assert_eq!(
            names,
            [format!("started {ok}"), format!("cancelled {ok}")],
            "{progress:?}"
        );
        assert_eq!(c.counters().running_substitutions, 0);
    }

    #[test]
    fn finished_goals_are_replaced_and_not_rebuilt() {
        let (_d, ts, s) = setup(|_| {});
        let a = ts.add_drv("a", &["out"], &[], &[]);
        let b = ts.add_drv("b", &["out"], &[&a], &[]);
        let mut drv = SyncDriver::new(ts.store.clone(), s.clone(), vec![]);
        let mut c = core(&ts, &s);
        c.start(vec![built(&a), built(&b)], BuildMode::Normal);
        let out = drv.run(&mut c).expect("finished");
        assert_eq!(out.exit_status, 0);
        assert_eq!(drv.started, ["a", "b"]);
        assert_eq!(out.results[0].result.status, BuildStatus::Built);
        assert_eq!(c.goal_count(), 0);
    }

    #[test]
    fn keep_going_lets_independent_goals_finish_and_reports_all() {
        let (_d, ts, s) = setup(|s| s.keep_going = true);
        let f = ts.add_drv("f", &["out"], &[], &[]);
        let ok = ts.add_drv("ok", &["out"], &[], &[]);
        let st = ts.store.clone();
        let mut drv = SyncDriver::new(ts.store.clone(), s.clone(), vec![]);
        drv.build = Box::new(move |req| {
            let fail = req.drv_path.name().starts_with("f");
            if !fail {
                crate::testing::write_outputs(&st, &req.drv_path, &req.output_paths).unwrap();
            }
            Some(LocalBuildFinished {
                id: 0,
                result: if fail {
                    BuildResult::failure(
                        BuildStatus::PermanentFailure,
                        "builder for 'f' failed with exit code 1",
                    )
                } else {
                    BuildResult::new(BuildStatus::Built)
                },
                hash_mismatch: false,
                outputs: if fail {
                    Default::default()
                } else {
                    req.output_paths.clone()
                },
            })
        });
        let mut c = core(&ts, &s);
        c.start(vec![built(&f), built(&ok)], BuildMode::Normal);
        let out = drv.run(&mut c).expect("finished");
        assert_eq!(out.exit_status, 100);
        assert_eq!(drv.started, ["f", "ok"]);
        assert_eq!(out.errors, ["builder for 'f' failed with exit code 1"]);
        // Without keep-going the first failure ends the run before `ok` builds.
        let (_d, ts, s) = setup(|_| {});
        let f = ts.add_drv("f", &["out"], &[], &[]);
        let ok = ts.add_drv("ok", &["out"], &[], &[]);
        let mut drv = SyncDriver::new(ts.store.clone(), s.clone(), vec![]);
        drv.build = Box::new(|_| {
            Some(LocalBuildFinished {
                id: 0,
                result: BuildResult::failure(BuildStatus::TimedOut, "timed out"),
                hash_mismatch: false,
                outputs: Default::default(),
            })
        });
        let mut c = core(&ts, &s);
        c.start(vec![built(&f), built(&ok)], BuildMode::Normal);
        let out = drv.run(&mut c).expect("finished");
        assert_eq!(out.exit_status, 101);
        assert_eq!(drv.started, ["f"]);
        assert_eq!(out.results[1].result.status, BuildStatus::MiscFailure);
        assert_eq!(c.counters().expected_builds, 0);
    }

    /// Nix 2.8's `buildPaths` rethrows only derivation goals' errors: a failed path
    /// request is named in `build of … failed`, its own message stays in the result;
    /// beside a failed derivation, only the derivation's message is printed.
    #[test]
    fn failed_path_requests_are_only_named() {
        let (_d, ts, s) = setup(|s| s.keep_going = true);
        let sd = ts.store.store_dir().clone();
        let missing = sd
            .parse(&format!(
                "{}/cccccccccccccccccccccccccccccccc-missing",
                sd.as_str()
            ))
            .unwrap();
        let mut drv = SyncDriver::new(ts.store.clone(), s.clone(), vec![]);
        let mut c = core(&ts, &s);
        c.start(
            vec![DerivedPath::Opaque(missing.clone())],
            BuildMode::Normal,
        );
        let out = drv.run(&mut c).expect("finished");
        assert_eq!(out.exit_status, 1);
        assert_eq!(
            out.errors,
            [format!("build of '{}' failed", sd.print(&missing))]
        );
        assert!(out.results[0]
            .result
            .error_msg
            .ends_with("is required, but there is no substituter that can build it"));

        let f = ts.add_drv("f", &["out"], &[], &[]);
        drv.build = Box::new(|req| {
            Some(LocalBuildFinished {
                id: 0,
                result: BuildResult::failure(
                    BuildStatus::PermanentFailure,
                    format!("builder for '{}' failed", req.drv_path),
                ),
                hash_mismatch: false,
                outputs: Default::default(),
            })
        });
        let mut c = core(&ts, &s);
        c.start(
            vec![DerivedPath::Opaque(missing.clone()), built(&f)],
            BuildMode::Normal,
        );
        let out = drv.run(&mut c).expect("finished");
        assert_eq!(out.errors.len(), 2, "{:?}", out.errors);
        assert!(
            out.errors[0].starts_with("builder for '"),
            "{:?}",
            out.errors
        );
        assert!(out.errors[1].starts_with("build of '"), "{:?}", out.errors);
    }

    #[test]
    fn several_failed_requests_name_them_all() {
        let (_d, ts, s) = setup(|s| s.keep_going = true);
        let f = ts.add_drv("f", &["out"], &[], &[]);
        let g = ts.add_drv("g", &["out"], &[], &[]);
        let mut drv = SyncDriver::new(ts.store.clone(), s.clone(), vec![]);
        drv.build = Box::new(|req| {
            Some(LocalBuildFinished {
                id: 0,
                result: BuildResult::failure(
                    BuildStatus::PermanentFailure,
                    format!("builder for '{}' failed", req.drv_path),
                ),
                hash_mismatch: false,
                outputs: Default::default(),
            })
        });
        let mut c = core(&ts, &s);
        c.start(vec![built(&f), built(&g)], BuildMode::Normal);
        let out = drv.run(&mut c).expect("finished");
        let sd = ts.store.store_dir();
        assert_eq!(out.errors.len(), 3);
        // In path order, whatever the order of the requests.
        let mut names = [sd.print(&f), sd.print(&g)];
        names.sort();
        assert_eq!(
            out.errors[2],
            format!("build of '{}', '{}' failed", names[0], names[1])
        );
    }

    use actix::AsyncContext as _;

    /// A hook job that is never run: enough for a goal to be building remotely.
    struct NoJob;
    impl actix::Actor for NoJob {
        type Context = actix::Context<Self>;
    }
    impl actix::Handler<crate::messages::HookBuild> for NoJob {
        type Result = ();
        fn handle(&mut self, _: crate::messages::HookBuild, _: &mut actix::Context<Self>) {}
    }

    /// A driver whose hook accepts derivations named `remote*` (their builds never
    /// end) and declines the others, and whose local builds of `bad*` fail
    /// permanently (the others succeed).
    fn hook_driver<'a>(ts: &TestStore, s: &Arc<WorkerSettings>) -> SyncDriver<'a> {
        let st = ts.store.clone();
        let mut drv = SyncDriver::new(ts.store.clone(), s.clone(), vec![]);
        drv.hook = Box::new(|args| {
            if args.drv_name.starts_with("remote") {
                let job = actix::Context::<NoJob>::new().address().recipient();
                crate::messages::HookReply::Accept {
                    machine: "m".into(),
                    job,
                }
            } else {
                crate::messages::HookReply::Decline
            }
        });
        drv.build = Box::new(move |req| {
            if req.drv_path.name().starts_with("bad") {
                return Some(LocalBuildFinished {
                    id: 0,
                    result: BuildResult::failure(
                        BuildStatus::PermanentFailure,
                        "builder for 'bad' failed with exit code 1",
                    ),
                    hash_mismatch: false,
                    outputs: Default::default(),
                });
            }
            crate::testing::write_outputs(&st, &req.drv_path, &req.output_paths).unwrap();
            Some(LocalBuildFinished {
                id: 0,
                result: BuildResult::new(BuildStatus::Built),
                hash_mismatch: false,
                outputs: req.output_paths.clone(),
            })
        });
        drv
    }

    fn hook_core(ts: &TestStore, s: &Arc<WorkerSettings>) -> WorkerCore {
        WorkerCore::new(s.clone(), ts.store.store_dir().clone(), 0, true)
    }

    #[test]
    fn a_failure_without_keep_going_cancels_a_running_hook_build() {
        let (_d, ts, s) = setup(|s| s.max_jobs = 2);
        let remote = ts.add_drv("remote", &["out"], &[], &[]);
        // `bad` waits for `pre`, so the hook build is running when `bad` fails.
        let pre = ts.add_drv("pre", &["out"], &[], &[]);
        let bad = ts.add_drv("bad", &["out"], &[&pre], &[]);
        let mut drv = hook_driver(&ts, &s);
        let mut c = hook_core(&ts, &s);
        c.start(vec![built(&remote), built(&bad)], BuildMode::Normal);
        let out = drv.run(&mut c).expect("finished");
        assert_eq!(drv.started, ["pre", "bad"]);
        assert_eq!(drv.cancelled_hooks.len(), 1, "the hook build is cancelled");
        assert!(drv.cancelled.is_empty(), "no local build was running");
        assert_eq!(out.exit_status, 100);
        // As Nix 2.8: the failure, then every top-level goal that did not succeed.
        let sd = ts.store.store_dir();
        let mut names = [
            format!("'{}'", sd.print(&remote)),
            format!("'{}'", sd.print(&bad)),
        ];
        names.sort();
        assert_eq!(
            out.errors,
            [
                "builder for 'bad' failed with exit code 1".to_string(),
                format!("build of {} failed", names.join(", "))
            ]
        );
        assert_eq!(c.counters().running_builds, 0);
        assert_eq!(c.goal_count(), 0);
    }

    #[test]
    fn with_keep_going_the_hook_build_runs_on() {
        let (_d, ts, s) = setup(|s| {
            s.max_jobs = 2;
            s.keep_going = true;
        });
        let remote = ts.add_drv("remote", &["out"], &[], &[]);
        let bad = ts.add_drv("bad", &["out"], &[], &[]);
        let mut drv = hook_driver(&ts, &s);
        let mut c = hook_core(&ts, &s);
        c.start(vec![built(&remote), built(&bad)], BuildMode::Normal);
        assert!(
            drv.run(&mut c).is_none(),
            "still waiting for the hook build"
        );
        assert!(drv.cancelled_hooks.is_empty());
        assert_eq!(c.goal_count(), 1);
    }

    #[test]
    fn a_bad_hook_reply_ends_the_run_and_cancels_the_hook_build() {
        // Even with keep-going: Nix 2.8 throws it out of the goal.
        let (_d, ts, s) = setup(|s| {
            s.max_jobs = 2;
            s.keep_going = true;
        });
        let remote = ts.add_drv("remote", &["out"], &[], &[]);
        let pre = ts.add_drv("pre", &["out"], &[], &[]);
        let other = ts.add_drv("other", &["out"], &[&pre], &[]);
        let mut drv = hook_driver(&ts, &s);
        drv.hook = Box::new(|args| {
            if args.drv_name.starts_with("remote") {
                let job = actix::Context::<NoJob>::new().address().recipient();
                crate::messages::HookReply::Accept {
                    machine: "m".into(),
                    job,
                }
            } else if args.drv_name.starts_with("other") {
                crate::messages::HookReply::Error("bad hook reply 'nonsense'".into())
            } else {
                crate::messages::HookReply::Decline
            }
        });
        let mut c = hook_core(&ts, &s);
        c.start(vec![built(&remote), built(&other)], BuildMode::Normal);
        let out = drv.run(&mut c).expect("finished");
        assert_eq!(drv.started, ["pre"]);
        assert_eq!(drv.cancelled_hooks.len(), 1);
        assert_eq!(out.exit_status, 1);
        assert_eq!(out.errors, ["bad hook reply 'nonsense'"]);
        assert_eq!(c.goal_count(), 0);
        assert_eq!(c.counters().running_builds, 0);
    }

    #[test]
    fn interrupt_cancels_every_running_build_and_fails_the_run() {
        let (_d, ts, s) = setup(|s| s.max_jobs = 2);
        let a = ts.add_drv("a", &["out"], &[], &[]);
        let b = ts.add_drv("b", &["out"], &[], &[]);
        // `c` waits for `a`: not started when the interrupt comes
        let c = ts.add_drv("c", &["out"], &[&a], &[]);
        let mut drv = SyncDriver::new(ts.store.clone(), s.clone(), vec![]);
        drv.build = Box::new(|_| None);
        let mut core = core(&ts, &s);
        core.start(vec![built(&b), built(&c)], BuildMode::Normal);
        assert!(drv.run(&mut core).is_none());
        let mut running: Vec<u64> = drv.running.iter().map(|(g, _)| *g).collect();
        running.sort();
        assert_eq!(running.len(), 2, "{:?}", drv.running);
        core.interrupt();
        let out = drv.run(&mut core).expect("an interrupted run is finished");
        assert_eq!(drv.cancelled, running, "each running build, in goal order");
        assert_eq!(out.exit_status, 1);
        assert_eq!(out.errors, [INTERRUPTED]);
        assert_eq!(drv.started.len(), 2, "nothing new started");
        assert_eq!(core.goal_count(), 0);
        assert_eq!(core.counters().running_builds, 0);
        // a second interrupt changes nothing
        core.interrupt();
        assert!(core.take_actions().is_empty());
    }

    /// The ETA of the latest `Estimates` event.
    fn last_eta(progress: &[ProgressEvent]) -> Option<Duration> {
        progress.iter().rev().find_map(|p| match p {
            ProgressEvent::Estimates(e) => e.eta,
            _ => None,
        })
    }

    #[test]
    fn the_eta_does_not_count_hook_builds_against_the_local_slots() {
        let (_d, ts, s) = setup(|s| s.max_jobs = 1);
        let r1 = ts.add_drv("remote1", &["out"], &[], &[]);
        let r2 = ts.add_drv("remote2", &["out"], &[], &[]);
        let l1 = ts.add_drv("l1", &["out"], &[], &[]);
        let l2 = ts.add_drv("l2", &["out"], &[], &[]);
        let mut drv = hook_driver(&ts, &s);
        // Local builds keep running: the ETA is read while everything runs.
        drv.build = Box::new(|_| None);
        let mut c = hook_core(&ts, &s);
        let secs = |n: &str, v: u64| (n.to_string(), Duration::from_secs(v));
        c.set_estimator(Arc::new(crate::schedule::FixedEstimates(
            [
                secs("remote1", 20),
                secs("remote2", 20),
                secs("l1", 4),
                secs("l2", 4),
            ]
            .into(),
        )));
        c.start(
            vec![built(&r1), built(&r2), built(&l1), built(&l2)],
            BuildMode::Normal,
        );
        assert!(drv.run(&mut c).is_none());
        assert_eq!(drv.started, ["l1"]);
        assert_eq!(c.counters().running_builds, 3);
        // Two remote builds of 20 s run elsewhere; the one local slot has 8 s of
        // work: the ETA is the critical path (20 s), not 48 s ÷ 1 slot.
        let eta = last_eta(&drv.progress).expect("an ETA");
        assert!(
            eta <= Duration::from_secs(20) && eta > Duration::from_millis(19_900),
            "{eta:?}"
        );
    }

    #[test]
    fn a_long_running_worker_schedules_by_history_recorded_after_it_started() {
        use drover::build_history::{BuildRecord, LOCAL_MACHINE};
        let (d, ts, s) = setup(|_| {});
        let a = ts.add_drv("a", &["out"], &[], &[]);
        let log = Arc::new(crate::local_builder::history::HistoryLog::new(
            &d.path().join("history-state"),
        ));
        let est: Arc<dyn crate::schedule::Estimator> =
            Arc::new(crate::schedule::HistoryEstimator::new(
                log.clone(),
                ts.store.store_dir().clone(),
                s.system.clone(),
            ));
        let estimate_of = |progress: &[ProgressEvent]| {
            progress.iter().find_map(|p| match p {
                ProgressEvent::Scheduled { estimate, .. } => Some(*estimate),
                _ => None,
            })
        };
        let run = |ts: &TestStore| {
            let mut drv = SyncDriver::new(ts.store.clone(), s.clone(), vec![]);
            let mut c = core(ts, &s);
            c.set_estimator(est.clone());
            c.start(vec![built(&a)], BuildMode::Normal);
            let out = drv.run(&mut c).expect("finished");
            assert_eq!(out.exit_status, 0);
            (drv.started, estimate_of(&drv.progress))
        };
        // Nothing recorded yet: the default estimate.
        let (started, e) = run(&ts);
        assert_eq!(started, ["a"]);
        assert_eq!(e, Some(crate::schedule::DEFAULT_BUILD_TIME));
        // Another process (or this one's local builder) records a build of `a`.
        log.record(&BuildRecord {
            drv_path: ts.store.store_dir().print(&a),
            pname: "a".into(),
            system: s.system.clone(),
            machine: LOCAL_MACHINE.into(),
            wall: Duration::from_millis(2500),
            cpu: None,
            peak_rss: None,
            start_time: 0,
            status: "Built".into(),
        });
        let out = ts.output(&a, "out");
        ts.store.invalidate_path_checked(&out).unwrap();
        // Once refreshed (the Worker does it when a core ends or starts), the next
        // run's estimate is the recorded wall time.
        est.refresh();
        let (started, e) = run(&ts);
        assert_eq!(started, ["a"]);
        assert_eq!(e, Some(Duration::from_millis(2500)));
    }
}
