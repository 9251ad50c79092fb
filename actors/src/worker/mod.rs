//! The Worker: the supervisor of one realisation run (Nix's `Worker`, spec §1).
//!
//! [`WorkerCore`] is the plain state machine: it owns every goal (one per `.drv`
//! path, store path and `DrvOutput`), the goal graph (waiters and waitees), the build
//! and substitution [`slots::Slots`], the run's failure flags and progress counters.
//! Goals return [`Effect`]s; the core handles those between goals itself and turns
//! the rest into [`Action`]s for its actor ([`actor::Worker`]) to perform: blocking
//! store jobs, local builds, hook requests, timers and progress events. Results come
//! back through [`WorkerCore::deliver`].
//!
//! * Dedup: a request for an existing goal reuses it (derivation goals merge wanted
//!   outputs and restart if they have not started building); a finished goal has left
//!   the maps, so a new request makes a new goal.
//! * Failure propagation: a waiter gets every finished dependency; without
//!   keep-going the first `Failed` dependency ends its wait at once. A failed
//!   top-level goal without keep-going cancels the run (running local builds get
//!   `CancelLocalBuild`, running hook builds `CancelHookBuild`). Goals nobody waits
//!   for any more are cancelled. A goal's `Effect::Fatal` (Nix's errors thrown out of
//!   a goal, e.g. `bad hook reply '…'`) ends the run at once the same way, with exit
//!   status 1 and only that error, keep-going or not.
//! * Build order: goals waiting for a slot are served by the length of the chain of
//!   goals that wait on them (the critical path above them), then in request order.
//! * Progress: the counters go out once per batch of changes; a path substitution's
//!   live byte counts ([`crate::progress::Transfer`]) travel with its
//!   `SubstitutionStarted` event rather than as counter updates.

pub mod actor;
pub mod slots;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use drover::build_result::{BuildResult, BuildStatus, FailureFlags};
use drover::config::Settings;
use drover::derived_path::{DerivedPath, OutputsSpec};
use drover::realisation::DrvOutput;
use drover::store_path::{StoreDir, StorePath, StorePathSet};

use crate::goal::derivation::DerivationGoal;
use crate::goal::drv_output_substitution::DrvOutputSubstitutionGoal;
use crate::goal::path_substitution::PathSubstitutionGoal;
use crate::goal::{
    Effect, Event, ExitCode, GoalCtx, GoalId, GoalOutcome, GoalRequest, Job, WaiteeResult,
};
use crate::messages::{BuildMode, HookBuild, LocalBuildRequest};
use crate::progress::{Counters, ProgressEvent};
use slots::Slots;

/// How far a priority raise travels down the goal graph.
pub const MAX_PRIORITY_PROPAGATION: usize = 64;

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
    /// `build-poll-interval` (default 5 s).
    pub poll_interval: Duration,
    pub system: String,
    pub extra_platforms: BTreeSet<String>,
    pub system_features: BTreeSet<String>,
    pub post_build_hook: Option<String>,
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
}

impl Default for WorkerSettings {
    fn default() -> WorkerSettings {
        WorkerSettings {
            max_jobs: 1,
            max_substitution_jobs: 16,
            keep_going: false,
            fallback: false,
            keep_failed: false,
            poll_interval: Duration::from_secs(5),
            system: drover::config::native_system(),
            extra_platforms: BTreeSet::new(),
            system_features: BTreeSet::new(),
            post_build_hook: None,
            ca_derivations: false,
            impure_derivations: false,
            substitute: true,
            substituter_uris: Vec::new(),
            substituter_trusted: Vec::new(),
            require_sigs: true,
            trusted_public_keys: Default::default(),
            log: LogSettings::default(),
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
            poll_interval: Duration::from_secs(uint("build-poll-interval", 5)),
            system: s.system(),
            extra_platforms: s.extra_platforms(),
            system_features: s.system_features(),
            post_build_hook: s.post_build_hook(),
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
}

/// What the core asks its actor to do.
pub enum Action {
    Blocking {
        goal: GoalId,
        job: Job,
    },
    RunLocalBuild {
        goal: GoalId,
        request: LocalBuildRequest,
    },
    CancelLocalBuild {
        goal: GoalId,
    },
    /// Kill the hook process of the goal's running hook build (`CancelHookBuild`).
    CancelHookBuild {
        goal: GoalId,
    },
    HookTry {
        goal: GoalId,
        am_willing: bool,
        system: String,
        drv_path: StorePath,
        required_features: BTreeSet<String>,
    },
    HookBuild {
        goal: GoalId,
        job: actix::Recipient<HookBuild>,
        drv_path: StorePath,
        inputs: StorePathSet,
        missing_outputs: BTreeSet<String>,
    },
    Timer {
        goal: GoalId,
    },
    Progress(ProgressEvent),
}

enum Goal {
    Drv(DerivationGoal),
    Subst(PathSubstitutionGoal),
    DrvOut(DrvOutputSubstitutionGoal),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Drv(StorePath),
    Subst(StorePath),
    DrvOut(DrvOutput),
}

struct Entry {
    goal: Goal,
    key: Key,
    waiters: HashSet<GoalId>,
    /// Pending dependencies → the request that made them.
    waitees: HashMap<GoalId, GoalRequest>,
    top_level: bool,
    /// Length of the longest chain of goals waiting on this one.
    priority: u64,
    substituting: bool,
    /// (NAR size, download size) counted as expected for this goal.
    sizes: (u64, u64),
}

/// The error of an interrupted run, as Nix words it.
pub const INTERRUPTED: &str = "interrupted by the user";

/// The Worker's state machine.
pub struct WorkerCore {
    settings: Arc<WorkerSettings>,
    store_dir: StoreDir,
    n_substituters: usize,
    hook_enabled: bool,
    goals: HashMap<GoalId, Entry>,
    keys: HashMap<Key, GoalId>,
    queue: VecDeque<(GoalId, Event)>,
    build_slots: Slots,
    subst_slots: Slots,
    actions: Vec<Action>,
    counters: Counters,
    sent_counters: Counters,
    flags: FailureFlags,
    top: Vec<(DerivedPath, GoalId)>,
    pending_top: HashSet<GoalId>,
    top_results: HashMap<GoalId, GoalOutcome>,
    /// Top-level goals in the order they failed.
    failed_top: Vec<GoalId>,
    fatal: Option<String>,
    finished: bool,
    any_failed: bool,
}

impl WorkerCore {
    pub fn new(
        settings: Arc<WorkerSettings>,
        store_dir: StoreDir,
        n_substituters: usize,
        hook: bool,
    ) -> WorkerCore {
        WorkerCore {
            build_slots: Slots::new(settings.max_jobs),
            subst_slots: Slots::new(settings.max_substitution_jobs.max(1)),
            settings,
            store_dir,
            n_substituters,
            hook_enabled: hook,
            goals: HashMap::new(),
            keys: HashMap::new(),
            queue: VecDeque::new(),
            actions: Vec::new(),
            counters: Counters::default(),
            sent_counters: Counters::default(),
            flags: FailureFlags::default(),
            top: Vec::new(),
            pending_top: HashSet::new(),
            top_results: HashMap::new(),
            failed_top: Vec::new(),
            fatal: None,
            finished: false,
            any_failed: false,
        }
    }

    /// Starts the top-level goals of a run.
    pub fn start(&mut self, requests: Vec<DerivedPath>, mode: BuildMode) {
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
            let id = self.make_goal(req);
            if let Some(e) = self.goals.get_mut(&id) {
                e.top_level = true;
            }
            self.pending_top.insert(id);
            self.top.push((r, id));
        }
        self.run();
    }

    /// Hands an event to a goal (ignored when the goal is gone) and runs the queue.
    pub fn deliver(&mut self, goal: GoalId, ev: Event) {
        self.queue.push_back((goal, ev));
        self.run();
    }

    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Number of live goals.
    pub fn goal_count(&self) -> usize {
        self.goals.len()
    }

    /// The user interrupted the run (SIGINT, SIGTERM): every live goal is cancelled
    /// in goal-id order (running local builds get `CancelLocalBuild`, hook builds
    /// `CancelHookBuild`), and the run ends as Nix's does, with exit status 1 and the
    /// one error `interrupted by the user`. Nothing more is started or registered
    /// by this run. Does nothing once the run is finished.
    pub fn interrupt(&mut self) {
        if self.finished {
            return;
        }
        let mut ids: Vec<GoalId> = self.goals.keys().copied().collect();
        ids.sort();
        for id in ids {
            if let Some(e) = self.goals.get_mut(&id) {
                e.top_level = false;
            }
            self.cancel(id);
        }
        self.fatal = Some(INTERRUPTED.to_owned());
        self.finish();
    }

    fn make_goal(&mut self, req: GoalRequest) -> GoalId {
        let key = match &req {
            GoalRequest::Derivation { drv_path, .. } => Key::Drv(drv_path.clone()),
            GoalRequest::Substitution { path, .. } => Key::Subst(path.clone()),
            GoalRequest::DrvOutput { id, .. } => Key::DrvOut(id.clone()),
        };
        if let Some(&id) = self.keys.get(&key) {
            if let Some(e) = self.goals.get_mut(&id) {
                let reusable = match (&mut e.goal, &req) {
                    (Goal::Drv(g), GoalRequest::Derivation { outputs, .. }) => {
                        g.add_wanted_outputs(outputs)
                    }
                    _ => true,
                };
                if reusable {
                    return id;
                }
            }
        }
        // Ids are unique in the process, so late replies addressed to a goal of an
        // earlier run (or another Worker) never reach a goal of this one.
        let id = NEXT_GOAL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let goal = match req {
            GoalRequest::Derivation {
                drv_path,
                outputs,
                mode,
            } => {
                self.counters.expected_builds += 1;
                Goal::Drv(DerivationGoal::new(drv_path, outputs, mode))
            }
            GoalRequest::Substitution { path, repair } => {
                self.counters.expected_substitutions += 1;
                Goal::Subst(PathSubstitutionGoal::new(path, repair))
            }
            GoalRequest::DrvOutput { id, repair } => {
                Goal::DrvOut(DrvOutputSubstitutionGoal::new(id, repair))
            }
        };
        self.goals.insert(
            id,
            Entry {
                goal,
                key: key.clone(),
                waiters: HashSet::new(),
                waitees: HashMap::new(),
                top_level: false,
                priority: 0,
                substituting: false,
                sizes: (0, 0),
            },
        );
        self.keys.insert(key, id);
        self.queue.push_back((id, Event::Start));
        id
    }

    fn run(&mut self) {
        while let Some((id, ev)) = self.queue.pop_front() {
            if self.finished {
                self.queue.clear();
                break;
            }
            let ctx = GoalCtx {
                settings: &self.settings,
                hook_enabled: self.hook_enabled,
                n_substituters: self.n_substituters,
                store_dir: &self.store_dir,
            };
            let Some(e) = self.goals.get_mut(&id) else {
                continue;
            };
            let fx = match &mut e.goal {
                Goal::Drv(g) => g.handle(ev, &ctx),
                Goal::Subst(g) => g.handle(ev, &ctx),
                Goal::DrvOut(g) => g.handle(ev, &ctx),
            };
            for f in fx {
                self.apply(id, f);
            }
        }
        if !self.finished && self.pending_top.is_empty() {
            self.finish();
        }
        if self.counters != self.sent_counters {
            self.sent_counters = self.counters;
            self.actions
                .push(Action::Progress(ProgressEvent::Counters(self.counters)));
        }
    }

    fn apply(&mut self, id: GoalId, f: Effect) {
        if self.finished {
            return;
        }
        match f {
            Effect::Blocking(job) => self.actions.push(Action::Blocking { goal: id, job }),
            Effect::WaitFor(reqs) => self.wait_for(id, reqs),
            Effect::AcquireBuildSlot => {
                let prio = self.goals.get(&id).map(|e| e.priority).unwrap_or(0);
                if self.build_slots.acquire(id, prio) {
                    self.queue.push_back((id, Event::SlotGranted));
                }
            }
            Effect::ReleaseBuildSlot => {
                if let Some(next) = self.build_slots.release(id) {
                    self.queue.push_back((next, Event::SlotGranted));
                }
            }
            Effect::AcquireSubstSlot => {
                if self.subst_slots.acquire(id, 0) {
                    self.queue.push_back((id, Event::SlotGranted));
                }
            }
            Effect::ReleaseSubstSlot => {
                if let Some(next) = self.subst_slots.release(id) {
                    self.queue.push_back((next, Event::SlotGranted));
                }
            }
            Effect::WaitForAWhile => self.actions.push(Action::Timer { goal: id }),
            Effect::HookTry {
                am_willing,
                system,
                drv_path,
                required_features,
            } => {
                if self.hook_enabled {
                    self.actions.push(Action::HookTry {
                        goal: id,
                        am_willing,
                        system,
                        drv_path,
                        required_features,
                    })
                } else {
                    self.queue.push_back((
                        id,
                        Event::HookReply(crate::messages::HookReply::DeclinePermanently),
                    ))
                }
            }
            Effect::DisableHook => self.hook_enabled = false,
            Effect::HookBuild {
                job,
                drv_path,
                inputs,
                missing_outputs,
            } => self.actions.push(Action::HookBuild {
                goal: id,
                job,
                drv_path,
                inputs,
                missing_outputs,
            }),
            Effect::RunLocalBuild(request) => self
                .actions
                .push(Action::RunLocalBuild { goal: id, request }),
            Effect::BuildStarted { machine } => {
                self.counters.running_builds += 1;
                if let Some(Entry {
                    goal: Goal::Drv(g), ..
                }) = self.goals.get(&id)
                {
                    let verb = match g.mode {
                        BuildMode::Normal => "building",
                        BuildMode::Repair => "repairing outputs of",
                        BuildMode::Check => "checking outputs of",
                    };
                    self.actions
                        .push(Action::Progress(ProgressEvent::BuildStarted {
                            drv_path: g.drv_path.clone(),
                            machine,
                            verb,
                        }));
                }
            }
            Effect::SubstitutionStarted { uri, transfer } => {
                if let Some(e) = self.goals.get_mut(&id) {
                    if !e.substituting {
                        e.substituting = true;
                        self.counters.running_substitutions += 1;
                    }
                    if let Goal::Subst(g) = &e.goal {
                        self.actions
                            .push(Action::Progress(ProgressEvent::SubstitutionStarted {
                                path: g.path.clone(),
                                uri,
                                transfer: transfer.unwrap_or_default(),
                            }));
                    }
                }
            }
            Effect::SubstitutionStopped => {
                if let Some(e) = self.goals.get_mut(&id) {
                    if e.substituting {
                        e.substituting = false;
                        self.counters.running_substitutions -= 1;
                    }
                }
            }
            Effect::SubstitutionSizes {
                nar_size,
                download_size,
            } => {
                if let Some(e) = self.goals.get_mut(&id) {
                    let c = &mut self.counters;
                    c.expected_nar_size = c.expected_nar_size - e.sizes.0 + nar_size;
                    c.expected_download_size = c.expected_download_size - e.sizes.1 + download_size;
                    e.sizes = (nar_size, download_size);
                }
            }
            Effect::Message(m) => self
                .actions
                .push(Action::Progress(ProgressEvent::Message(m))),
            Effect::Done(outcome) => self.goal_done(id, outcome),
            Effect::Fatal(msg) => {
                self.fatal = Some(msg);
                self.finish();
            }
        }
    }

    fn wait_for(&mut self, waiter: GoalId, reqs: Vec<GoalRequest>) {
        let mut added = 0;
        for req in reqs {
            let dep = self.make_goal(req.clone());
            if dep == waiter {
                continue;
            }
            let prio = self.goals.get(&waiter).map(|e| e.priority).unwrap_or(0) + 1;
            if let Some(d) = self.goals.get_mut(&dep) {
                d.waiters.insert(waiter);
            }
            self.bump_priority(dep, prio);
            if let Some(w) = self.goals.get_mut(&waiter) {
                if w.waitees.insert(dep, req).is_none() {
                    added += 1;
                }
            }
        }
        if added == 0 {
            self.queue.push_back((waiter, Event::WaiteesDone));
        }
    }

    /// Raises the priority of a goal and its dependencies (the critical path above).
    /// Propagation stops [`MAX_PRIORITY_PROPAGATION`] levels down, so graphs found
    /// bottom-up (every goal requested at top level) cost O(n) rather than O(n²).
    fn bump_priority(&mut self, goal: GoalId, prio: u64) {
        let mut stack = vec![(goal, prio, 0usize)];
        while let Some((g, p, depth)) = stack.pop() {
            let Some(e) = self.goals.get_mut(&g) else {
                continue;
            };
            if e.priority >= p {
                continue;
            }
            e.priority = p;
            if depth < MAX_PRIORITY_PROPAGATION {
                stack.extend(e.waitees.keys().map(|&d| (d, p + 1, depth + 1)));
            }
        }
    }

    fn goal_done(&mut self, id: GoalId, outcome: GoalOutcome) {
        let Some(entry) = self.goals.remove(&id) else {
            return;
        };
        if self.keys.get(&entry.key) == Some(&id) {
            self.keys.remove(&entry.key);
        }
        self.flags.record(&outcome.result, outcome.hash_mismatch);
        if outcome.check_mismatch {
            self.flags.check_mismatch = true;
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
        match &entry.goal {
            Goal::Drv(g) => {
                self.counters.expected_builds -= 1;
                if g.started() {
                    self.counters.running_builds -= 1;
                }
                if status == BuildStatus::Built {
                    self.counters.done_builds += 1;
                }
                if !outcome.result.success() && status != BuildStatus::DependencyFailed {
                    self.counters.failed_builds += 1;
                }
                if g.has_slot() {
                    if let Some(next) = self.build_slots.release(id) {
                        self.queue.push_back((next, Event::SlotGranted));
                    }
                }
                self.actions
                    .push(Action::Progress(ProgressEvent::BuildFinished {
                        drv_path: g.drv_path.clone(),
                        status,
                    }));
            }
            Goal::Subst(g) => {
                self.counters.expected_substitutions -= 1;
                if status == BuildStatus::Substituted {
                    self.counters.done_substitutions += 1;
                }
                if outcome.exit == ExitCode::Failed && g.substituter_failed() {
                    self.counters.failed_substitutions += 1;
                }
                self.actions
                    .push(Action::Progress(ProgressEvent::SubstitutionFinished {
                        path: g.path.clone(),
                        status,
                    }));
            }
            Goal::DrvOut(g) => {
                if outcome.exit == ExitCode::Failed && g.substituter_failed() {
                    self.counters.failed_substitutions += 1;
                }
            }
        }
        if outcome.exit != ExitCode::Success {
            self.any_failed = true;
            // Nix logs the errors of derivation goals other goals wait for
            // (substitution goals only log at debug level).
            let is_drv = matches!(entry.goal, Goal::Drv(_));
            if is_drv && !entry.top_level && !outcome.result.error_msg.is_empty() {
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
        let early_stop = outcome.exit == ExitCode::Failed && !self.settings.keep_going;
        let mut waiters: Vec<GoalId> = entry.waiters.iter().copied().collect();
        waiters.sort_unstable();
        for w in waiters {
            let Some(we) = self.goals.get_mut(&w) else {
                continue;
            };
            let Some(request) = we.waitees.remove(&id) else {
                continue;
            };
            self.queue.push_back((
                w,
                Event::WaiteeDone(WaiteeResult {
                    request,
                    outcome: outcome.clone(),
                }),
            ));
            if we.waitees.is_empty() {
                self.queue.push_back((w, Event::WaiteesDone));
            } else if early_stop {
                let rest: Vec<GoalId> = we.waitees.drain().map(|(d, _)| d).collect();
                self.queue.push_back((w, Event::WaiteesDone));
                for d in rest {
                    self.drop_waiter(d, w);
                }
            }
        }
        if entry.top_level {
            self.pending_top.remove(&id);
            if outcome.exit != ExitCode::Success {
                self.failed_top.push(id);
            }
            self.top_results.insert(id, outcome.clone());
            if outcome.exit == ExitCode::Failed && !self.settings.keep_going {
                self.finish();
            }
        }
    }

    /// `waiter` no longer waits for `goal`; a goal nobody needs is cancelled.
    fn drop_waiter(&mut self, goal: GoalId, waiter: GoalId) {
        let orphan = match self.goals.get_mut(&goal) {
            Some(e) => {
                e.waiters.remove(&waiter);
                e.waiters.is_empty() && !e.top_level
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
        if entry.substituting {
            self.counters.running_substitutions -= 1;
        }
        self.counters.expected_nar_size -= entry.sizes.0;
        self.counters.expected_download_size -= entry.sizes.1;
        if let Some(next) = self.subst_slots.release(id) {
            self.queue.push_back((next, Event::SlotGranted));
        }
        if let Some(next) = self.build_slots.release(id) {
            self.queue.push_back((next, Event::SlotGranted));
        }
        match &entry.goal {
            Goal::Drv(g) => {
                self.counters.expected_builds -= 1;
                if g.started() && !g.is_done() {
                    self.counters.running_builds -= 1;
                }
                if g.is_building_locally() {
                    self.actions.push(Action::CancelLocalBuild { goal: id });
                }
                if g.is_building_remotely() {
                    self.actions.push(Action::CancelHookBuild { goal: id });
                }
            }
            Goal::Subst(g) => {
                self.counters.expected_substitutions -= 1;
                if entry.substituting {
                    // Its copy job may still run, but no longer counts.
                    self.actions
                        .push(Action::Progress(ProgressEvent::SubstitutionCancelled {
                            path: g.path.clone(),
                        }));
                }
            }
            Goal::DrvOut(_) => {}
        }
        for dep in entry.waitees.keys() {
            self.drop_waiter(*dep, id);
        }
    }

    fn finish(&mut self) {
        if self.finished {
            return;
        }
        // Nix's `buildPaths` counts every top-level goal that did not succeed, the
        // ones still running or waiting when the run stopped included, in
        // `build of … failed`.
        let unfinished: Vec<GoalId> = self
            .top
            .iter()
            .map(|(_, id)| *id)
            .filter(|id| self.pending_top.contains(id) && !self.failed_top.contains(id))
            .collect();
        for id in unfinished {
            if !self.failed_top.contains(&id) {
                self.failed_top.push(id);
            }
        }
        let ids: Vec<GoalId> = self.goals.keys().copied().collect();
        for id in ids {
            if let Some(e) = self.goals.get_mut(&id) {
                e.top_level = false;
            }
            self.cancel(id);
        }
        self.finished = true;
        self.queue.clear();
        if self.counters != self.sent_counters {
            self.sent_counters = self.counters;
            self.actions
                .push(Action::Progress(ProgressEvent::Counters(self.counters)));
        }
    }

    /// The results of a finished run.
    pub fn outcome(&self) -> RealiseOutcome {
        let mut results = Vec::new();
        for (path, id) in &self.top {
            let mut result = match self.top_results.get(id) {
                Some(o) => o.result.clone(),
                None => BuildResult::failure(BuildStatus::MiscFailure, "cancelled"),
            };
            match path {
                DerivedPath::Opaque(_) => result.built_outputs.clear(),
                DerivedPath::Built { outputs, .. } => result
                    .built_outputs
                    .retain(|k, _| outputs.contains(&k.output)),
            }
            results.push(KeyedBuildResult {
                path: path.clone(),
                result,
            });
        }
        if let Some(f) = &self.fatal {
            return RealiseOutcome {
                results,
                exit_status: 1,
                errors: vec![f.clone()],
            };
        }
        let mut errors = Vec::new();
        let exit_status = if self.failed_top.is_empty() {
            0
        } else {
            self.flags.failing_exit_status()
        };
        // Nix's `buildPaths` rethrows only derivation goals' errors (`Goal::ex`); a
        // failed substitution goal is merely named in `build of … failed`.
        let is_drv_goal = |id: &GoalId| {
            self.top
                .iter()
                .any(|(p, i)| i == id && matches!(p, DerivedPath::Built { .. }))
        };
        let ex: Vec<&str> = self
            .failed_top
            .iter()
            .filter(|id| is_drv_goal(id))
            .filter_map(|id| self.top_results.get(id))
            .map(|o| o.result.error_msg.as_str())
            .filter(|m| !m.is_empty())
            .collect();
        if self.failed_top.len() == 1 && ex.len() == 1 {
            errors.push(ex[0].to_owned());
        } else if !self.failed_top.is_empty() {
            errors.extend(ex.iter().map(|m| (*m).to_owned()));
            let mut names: Vec<String> = Vec::new();
            for (path, id) in &self.top {
                if self.failed_top.contains(id) {
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
        RealiseOutcome {
            results,
            exit_status,
            errors,
        }
    }
}

/// Convenience: the outputs a request names.
pub fn request_outputs(p: &DerivedPath) -> OutputsSpec {
    match p {
        DerivedPath::Opaque(_) => OutputsSpec::Names(Default::default()),
        DerivedPath::Built { outputs, .. } => outputs.clone(),
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
        c.start(
            vec![built(&blocker), built(&lone), built(&c3)],
            BuildMode::Normal,
        );
        assert!(drv.run(&mut c).is_none());
        assert_eq!(drv.started, ["blocker"]);
        // Both `lone` (asked first) and `c1` (two goals above it) wait for the slot.
        let (gid, _) = drv.running.pop().unwrap();
        crate::testing::write_outputs(
            &ts.store,
            &blocker,
            &[("out".to_string(), ts.output(&blocker, "out"))].into(),
        )
        .unwrap();
        c.deliver(
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
        // c1 first; c2 is not waiting yet when c1's slot frees, so `lone` goes next.
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
        let mut progress = Vec::new();
        let mut copying = false;
        while !c.is_finished() {
            let mut next = Vec::new();
            for a in c.take_actions() {
                match a {
                    Action::Progress(ev) => {
                        copying |= matches!(ev, ProgressEvent::SubstitutionStarted { .. });
                        progress.push(ev);
                    }
                    Action::Blocking { goal, job } => {
                        if std::mem::take(&mut copying) {
                            continue;
                        }
                        next.push((goal, job(&drv.env)));
                    }
                    Action::RunLocalBuild { goal, .. } => next.push((
                        goal,
                        Event::LocalBuildFinished(LocalBuildFinished {
                            id: goal,
                            result: BuildResult::failure(BuildStatus::PermanentFailure, "no"),
                            hash_mismatch: false,
                            outputs: Default::default(),
                        }),
                    )),
                    _ => {}
                }
            }
            assert!(!next.is_empty(), "stuck: {progress:?}");
            for (g, ev) in next {
                c.deliver(g, ev);
            }
        }
        assert_ne!(c.outcome().exit_status, 0);
        for a in c.take_actions() {
            if let Action::Progress(ev) = a {
                progress.push(ev);
            }
        }
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
}
