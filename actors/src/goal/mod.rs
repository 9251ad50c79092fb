//! Goals: the plain state machines the Worker drives.
//!
//! A goal never performs an effect itself. Each step takes an [`Event`] and returns
//! [`Effect`]s: blocking store work as a [`Job`] (run by the store executor off the
//! arbiter), requests for dependency goals ([`Effect::WaitFor`], which only the Worker
//! creates and deduplicates), slot requests, timers, hook and builder messages, and
//! finally [`Effect::Done`] with a [`GoalOutcome`]. So every state is unit-testable by
//! feeding events, and goals talk to each other only through the Worker.
//!
//! * [`derivation::DerivationGoal`]: key = `.drv` path;
//! * [`path_substitution::PathSubstitutionGoal`]: key = store path;
//! * [`drv_output_substitution::DrvOutputSubstitutionGoal`]: key = `DrvOutput`.

pub mod actor;
pub mod derivation;
pub mod drv_output_substitution;
pub mod error;
pub mod host;
pub mod output_paths;
pub mod path_substitution;

pub use output_paths::OutputPaths;

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use drover::build_result::{BuildResult, BuildStatus};
use drover::derivation::DrvHashCache;
use drover::derived_path::OutputsSpec;
use drover::realisation::DrvOutput;
use drover::store::LocalStore;
use drover::store_path::{StorePath, StorePathSet};

use crate::messages::{
    BuildMode, HookBuild, HookFinished, HookReply, LocalBuildFinished, LocalBuildRequest,
};
use crate::substituter::Substituter;
use crate::worker::WorkerSettings;

/// The Worker's handle of a goal (also the id of its local build and hook job).
pub type GoalId = u64;

/// How a goal ended, for its waiters (Nix's `ExitCode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitCode {
    Success,
    Failed,
    /// No substituter had the path (not a real failure).
    NoSubstituters,
    /// Some reference could not be substituted.
    IncompleteClosure,
}

/// How the dependencies a goal waited for ended (Nix's `nrFailed`,
/// `nrNoSubstituters`, `nrIncompleteClosure`, counted in `waitForGoals`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaiteeCounts {
    /// Dependencies that did not succeed, for whatever reason.
    pub failed: u32,
    /// Of those, paths no substituter had.
    pub no_substituters: u32,
    /// Of those, paths whose closure could not be completed.
    pub incomplete_closure: u32,
}

impl WaiteeCounts {
    /// Counts one finished dependency.
    pub fn count(&mut self, exit: ExitCode) {
        match exit {
            ExitCode::Success => {}
            ExitCode::Failed => self.failed += 1,
            ExitCode::NoSubstituters => {
                self.failed += 1;
                self.no_substituters += 1;
            }
            ExitCode::IncompleteClosure => {
                self.failed += 1;
                self.incomplete_closure += 1;
            }
        }
    }

    /// How a substitution goal whose dependencies failed ends: with an incomplete
    /// closure when some of them were merely unavailable, else failed.
    pub fn substitution_failure(&self) -> ExitCode {
        if self.no_substituters > 0 || self.incomplete_closure > 0 {
            ExitCode::IncompleteClosure
        } else {
            ExitCode::Failed
        }
    }
}

/// What a finished goal reports.
#[derive(Debug, Clone)]
pub struct GoalOutcome {
    pub exit: ExitCode,
    pub result: BuildResult,
    /// Output name → path (derivation goals, on success).
    pub outputs: OutputPaths,
    /// A fixed-output hash mismatch was seen (exit bit 0x02).
    pub hash_mismatch: bool,
    /// `--check` found a difference (exit bit 0x08).
    pub check_mismatch: bool,
}

impl GoalOutcome {
    pub fn success(status: BuildStatus) -> GoalOutcome {
        GoalOutcome {
            exit: ExitCode::Success,
            result: BuildResult::new(status),
            outputs: OutputPaths::new(),
            hash_mismatch: false,
            check_mismatch: false,
        }
    }

    pub fn failure(exit: ExitCode, status: BuildStatus, msg: impl Into<String>) -> GoalOutcome {
        GoalOutcome {
            exit,
            result: BuildResult::failure(status, msg),
            outputs: OutputPaths::new(),
            hash_mismatch: false,
            check_mismatch: false,
        }
    }
}

/// A dependency a goal asks the Worker for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GoalRequest {
    Derivation {
        drv_path: StorePath,
        outputs: OutputsSpec,
        mode: BuildMode,
    },
    Substitution {
        path: StorePath,
        repair: bool,
    },
    DrvOutput {
        id: DrvOutput,
        repair: bool,
    },
}

/// A finished dependency, as its waiter sees it. The outcome is shared by every
/// waiter of the dependency, not copied for each.
#[derive(Debug, Clone)]
pub struct WaiteeResult {
    /// What this waiter asked for.
    pub request: GoalRequest,
    pub outcome: Arc<GoalOutcome>,
}

/// Contents checks of `--repair` (Nix's `pathContentsGood`): whether a path's
/// contents still match its registered NAR hash. Nix reports a check once per path
/// and run (`checking path '…'...`, then `path '…' is corrupted or missing!` when
/// bad); so does this. Unlike Nix's cache, the answer itself is not remembered: a
/// path rebuilt or fetched again in the run is hashed again rather than trusted.
#[derive(Debug, Default)]
pub struct PathContents {
    reported: Mutex<HashSet<StorePath>>,
    notices: Mutex<Vec<String>>,
}

impl PathContents {
    /// Whether `p` exists and its contents match its registered NAR hash.
    pub fn good(
        &self,
        store: &LocalStore,
        p: &StorePath,
    ) -> Result<bool, drover::store::StoreError> {
        let first = lock(&self.reported).insert(p.clone());
        let printed = store.store_dir().print(p);
        if first {
            self.notice(format!("checking path '{printed}'..."));
        }
        let good = match store.query_path_info(p)? {
            None => false,
            Some(info) => {
                let real = store.real_path(p);
                std::fs::symlink_metadata(&real).is_ok()
                    && drover::nar::nar_hash_of_path(&real).is_ok_and(|(h, _)| h == info.nar_hash)
            }
        };
        if first && !good {
            self.notice(format!("path '{printed}' is corrupted or missing!"));
        }
        Ok(good)
    }

    /// The messages of the checks since the last call, for the progress display.
    pub fn take_notices(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.notices))
    }

    fn notice(&self, m: String) {
        lock(&self.notices).push(m);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What blocking jobs get: the store, the substituters, shared caches.
pub struct JobEnv {
    pub store: Arc<LocalStore>,
    pub substituters: Vec<Arc<dyn Substituter>>,
    pub drv_hashes: Mutex<DrvHashCache>,
    pub settings: Arc<WorkerSettings>,
    /// Contents checks of `--repair`.
    pub contents: PathContents,
    /// Group commit of the paths substitution goals fetched ahead.
    pub registrations: path_substitution::registration::Registrations,
}

/// The substituter a store job uses: the `i`th of the Worker's, or one of the
/// run's own ([`GoalCtx::substituter`]).
pub enum SubstituterRef {
    Worker(usize),
    Own(Option<Arc<dyn Substituter>>),
}

impl SubstituterRef {
    pub fn get<'a>(&'a self, env: &'a JobEnv) -> Option<&'a Arc<dyn Substituter>> {
        match self {
            SubstituterRef::Worker(i) => env.substituters.get(*i),
            SubstituterRef::Own(s) => s.as_ref(),
        }
    }
}

impl GoalCtx<'_> {
    /// The `i`th substituter of the goal's run, for a store job.
    pub fn substituter(&self, i: usize) -> SubstituterRef {
        match self.substituters {
            None => SubstituterRef::Worker(i),
            Some(own) => SubstituterRef::Own(own.get(i).cloned()),
        }
    }
}

/// Blocking work returning the event it produces.
pub type Job = Box<dyn FnOnce(&JobEnv) -> Event + Send>;

/// An input to a goal.
pub enum Event {
    /// First work (the Worker delivers it on a later turn, never inline).
    Start,
    /// One dependency finished.
    WaiteeDone(WaiteeResult),
    /// All dependencies finished, or one failed and keep-going is off.
    WaiteesDone,
    /// A slot asked for with [`Effect::AcquireBuildSlot`]/[`Effect::AcquireSubstSlot`].
    SlotGranted,
    /// The poll interval has passed ([`Effect::WaitForAWhile`]).
    Wake,
    /// The result of a derivation goal's blocking job.
    Drv(Box<derivation::DrvJobResult>),
    /// The result of a path substitution goal's blocking job.
    Subst(path_substitution::SubstJobResult),
    /// The result of a drv-output substitution goal's blocking job.
    DrvOut(drv_output_substitution::DrvOutJobResult),
    HookReply(HookReply),
    LocalBuildFinished(LocalBuildFinished),
    HookFinished(HookFinished),
}

impl Event {
    /// The variant's name, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Start => "Start",
            Event::WaiteeDone(_) => "WaiteeDone",
            Event::WaiteesDone => "WaiteesDone",
            Event::SlotGranted => "SlotGranted",
            Event::Wake => "Wake",
            Event::Drv(_) => "Drv",
            Event::Subst(_) => "Subst",
            Event::DrvOut(_) => "DrvOut",
            Event::HookReply(_) => "HookReply",
            Event::LocalBuildFinished(_) => "LocalBuildFinished",
            Event::HookFinished(_) => "HookFinished",
        }
    }
}

/// What a goal asks the Worker to do.
pub enum Effect {
    Blocking(Job),
    /// Create (or reuse) these goals and report when they finish. An empty list
    /// answers [`Event::WaiteesDone`] at once.
    WaitFor(Vec<GoalRequest>),
    AcquireBuildSlot,
    ReleaseBuildSlot,
    AcquireSubstSlot,
    ReleaseSubstSlot,
    /// Wake me after the poll interval.
    WaitForAWhile,
    /// Ask the hook; the answer comes as [`Event::HookReply`].
    HookTry {
        am_willing: bool,
        system: String,
        drv_path: StorePath,
        required_features: BTreeSet<String>,
    },
    /// The hook declined permanently: never ask again in this run.
    DisableHook,
    /// Send the accepted hook job its work.
    HookBuild {
        job: actix::Recipient<HookBuild>,
        drv_path: StorePath,
        inputs: StorePathSet,
        missing_outputs: BTreeSet<String>,
    },
    RunLocalBuild(LocalBuildRequest),
    /// The build really started (progress: running builds).
    BuildStarted {
        machine: Option<String>,
    },
    /// A download started/finished (progress: running substitutions). A path
    /// substitution hands over the [`Transfer`](crate::progress::Transfer) its copy
    /// job counts bytes into, for the progress display.
    SubstitutionStarted {
        uri: String,
        transfer: Option<std::sync::Arc<crate::progress::Transfer>>,
    },
    SubstitutionStopped,
    /// The substituter being tried has the path with these sizes (replaces the sizes
    /// of an earlier attempt in the expected-size counters).
    SubstitutionSizes {
        nar_size: u64,
        download_size: u64,
    },
    /// A message to show the user.
    Message(String),
    /// The goal starts waiting (for the progress display and the report).
    Waiting(crate::progress::WaitReason),
    Done(GoalOutcome),
    /// An error that aborts the whole run (exit 1), as a thrown non-build `Error` in Nix.
    Fatal(String),
}

/// What a goal may read from the Worker when it steps.
pub struct GoalCtx<'a> {
    pub settings: &'a WorkerSettings,
    /// Whether a hook is configured and has not declined permanently.
    pub hook_enabled: bool,
    pub n_substituters: usize,
    /// The run's own substituters (a daemon client's `substituters`); `None`:
    /// the Worker's ([`JobEnv::substituters`]).
    pub substituters: Option<&'a Arc<[Arc<dyn Substituter>]>>,
    pub store_dir: &'a drover::store_path::StoreDir,
    /// Whether fewer local builds run than `max-jobs` allows, so that a build slot
    /// asked for now is granted at once (Nix's `getNrLocalBuilds() < maxBuildJobs`:
    /// the hook's `amWilling`, and whether a declined build starts locally).
    pub build_slot_free: bool,
}

impl std::fmt::Debug for Effect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Effect::Blocking(_) => write!(f, "Blocking"),
            Effect::WaitFor(r) => write!(f, "WaitFor({r:?})"),
            Effect::AcquireBuildSlot => write!(f, "AcquireBuildSlot"),
            Effect::ReleaseBuildSlot => write!(f, "ReleaseBuildSlot"),
            Effect::AcquireSubstSlot => write!(f, "AcquireSubstSlot"),
            Effect::ReleaseSubstSlot => write!(f, "ReleaseSubstSlot"),
            Effect::WaitForAWhile => write!(f, "WaitForAWhile"),
            Effect::HookTry { am_willing, .. } => write!(f, "HookTry({am_willing})"),
            Effect::DisableHook => write!(f, "DisableHook"),
            Effect::HookBuild { .. } => write!(f, "HookBuild"),
            Effect::RunLocalBuild(r) => write!(f, "RunLocalBuild({})", r.drv_path),
            Effect::BuildStarted { machine } => write!(f, "BuildStarted({machine:?})"),
            Effect::SubstitutionStarted { uri, .. } => write!(f, "SubstitutionStarted({uri})"),
            Effect::SubstitutionStopped => write!(f, "SubstitutionStopped"),
            Effect::SubstitutionSizes { nar_size, .. } => {
                write!(f, "SubstitutionSizes({nar_size})")
            }
            Effect::Message(m) => write!(f, "Message({m})"),
            Effect::Waiting(r) => write!(f, "Waiting({r:?})"),
            Effect::Done(o) => write!(f, "Done({:?}, {})", o.exit, o.result),
            Effect::Fatal(m) => write!(f, "Fatal({m})"),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Drives one goal by hand: blocking jobs run inline against a scratch store.
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::testing::TestStore;

    pub struct Harness {
        _dir: tempfile::TempDir,
        pub ts: TestStore,
        pub env: JobEnv,
        /// Every local build slot taken (`GoalCtx::build_slot_free` false).
        pub slots_busy: std::cell::Cell<bool>,
    }

    impl Harness {
        pub fn new(subs: Vec<Arc<dyn Substituter>>) -> Harness {
            Self::with(subs, |_| {})
        }

        pub fn with(
            subs: Vec<Arc<dyn Substituter>>,
            tweak: impl FnOnce(&mut WorkerSettings),
        ) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let ts = TestStore::open(dir.path());
            let mut settings = WorkerSettings::from_settings(&ts.settings);
            settings.substituter_uris = subs.iter().map(|s| s.uri()).collect();
            settings.substituter_trusted = subs.iter().map(|s| s.is_trusted()).collect();
            tweak(&mut settings);
            let env = JobEnv {
                store: ts.store.clone(),
                substituters: subs,
                drv_hashes: Mutex::new(DrvHashCache::new()),
                settings: Arc::new(settings),
                contents: Default::default(),
                registrations: Default::default(),
            };
            Harness {
                _dir: dir,
                ts,
                env,
                slots_busy: Default::default(),
            }
        }

        pub fn ctx(&self, hook: bool) -> GoalCtx<'_> {
            GoalCtx {
                settings: &self.env.settings,
                hook_enabled: hook,
                n_substituters: self.env.substituters.len(),
                substituters: None,
                store_dir: self.ts.store.store_dir(),
                build_slot_free: self.env.settings.max_jobs > 0 && !self.slots_busy.get(),
            }
        }

        /// Feeds `ev`, running blocking jobs inline until the goal asks for something
        /// else; returns those other effects.
        pub fn drive(
            &self,
            mut step: impl FnMut(Event, &GoalCtx) -> Vec<Effect>,
            ev: Event,
            hook: bool,
        ) -> Vec<Effect> {
            let ctx = self.ctx(hook);
            let mut out = Vec::new();
            let mut queue = vec![ev];
            while let Some(ev) = queue.pop() {
                for f in step(ev, &ctx) {
                    match f {
                        Effect::Blocking(job) => queue.push(job(&self.env)),
                        other => out.push(other),
                    }
                }
            }
            out
        }
    }

    pub fn outcome(exit: ExitCode) -> GoalOutcome {
        match exit {
            ExitCode::Success => GoalOutcome::success(BuildStatus::Built),
            e => GoalOutcome::failure(e, BuildStatus::NoSubstituters, "x"),
        }
    }

    pub fn waitee(request: GoalRequest, exit: ExitCode) -> Event {
        Event::WaiteeDone(WaiteeResult {
            request,
            outcome: Arc::new(outcome(exit)),
        })
    }

    pub fn show(fx: &[Effect]) -> String {
        format!("{fx:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestStore;

    #[test]
    fn contents_checks_are_reported_once_and_always_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let ts = TestStore::open(dir.path());
        let p = ts
            .store
            .add_text_to_store("checked", b"contents", &Default::default())
            .unwrap();
        let printed = ts.store.store_dir().print(&p);
        let real = ts.store.real_path(&p);
        let c = PathContents::default();
        assert!(c.good(&ts.store, &p).unwrap());
        assert_eq!(c.take_notices(), [format!("checking path '{printed}'...")]);
        // Corrupted later in the run: found bad, but not reported again.
        std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        std::fs::write(&real, b"other").unwrap();
        assert!(!c.good(&ts.store, &p).unwrap());
        assert!(c.take_notices().is_empty());
        // A fresh checker reports both lines.
        let fresh = PathContents::default();
        assert!(!fresh.good(&ts.store, &p).unwrap());
        assert_eq!(
            fresh.take_notices(),
            [
                format!("checking path '{printed}'..."),
                format!("path '{printed}' is corrupted or missing!")
            ]
        );
        // Repaired: good again, rehashed rather than remembered.
        std::fs::write(&real, b"contents").unwrap();
        assert!(fresh.good(&ts.store, &p).unwrap());
    }
}
