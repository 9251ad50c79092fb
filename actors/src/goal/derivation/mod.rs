//! DerivationGoal: make the wanted outputs of one derivation valid, as Nix 2.8's
//! `DerivationGoal` (src/libstore/build/derivation-goal.cc) does.
//!
//! The goal is a state machine (`State`) whose states are grouped by Nix's phases,
//! each in a module of its own that handles the events of its states:
//!
//! * `get.rs` — getting the derivation (`getDerivation`, `loadDerivation`);
//! * `substitute.rs` — substituting the outputs (`haveDerivation`,
//!   `outputsSubstitutionTried`, `repairClosure`);
//! * `inputs.rs` — realising the inputs and resolving (`gaveUpOnSubstitution`,
//!   `inputsRealised`, `resolvedFinished`);
//! * `try_build.rs` — trying to build: locks, the hook or a local build
//!   (`tryToBuild`, `tryBuildHook`, `tryLocalBuild`);
//! * `finish.rs` — finishing (`buildDone`, the post-build hook, `done`).
//!
//! The blocking store work of every phase is in `jobs.rs`. An event a state has no
//! transition for fails the goal with a message naming the state and the event.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use drover::build_result::{BuildResult, BuildStatus};
use drover::config::MissingExperimentalFeature;
use drover::derivation::{name_from_drv_path, Derivation, DerivationType};
use drover::derived_path::OutputsSpec;
use drover::hash::Hash;
use drover::realisation::{DrvOutput, Realisation};
use drover::store::{LocalStore, PathLocks};
use drover::store_path::{StorePath, StorePathSet};

use super::error::GoalError;
use super::{Effect, Event, ExitCode, GoalCtx, GoalOutcome, GoalRequest, JobEnv, WaiteeCounts};
use crate::messages::{BuildMode, HookReply, LocalBuildRequest};

mod finish;
mod get;
mod inputs;
mod jobs;
mod substitute;
#[cfg(test)]
mod test_util;
mod try_build;

use jobs::*;
pub use try_build::{local_system_features, required_features, NO_BUILD_SLOTS};

/// One output's state after a validity check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputState {
    /// Known path (static, or from a realisation / the DerivationOutputs table).
    pub path: Option<StorePath>,
    pub valid: bool,
}

/// Why a validity check was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    HaveDerivation,
    AfterHook,
}

/// The derivation as loaded, with its per-output hashes (realisation ids).
pub struct Loaded {
    pub drv: Arc<Derivation>,
    pub output_hashes: BTreeMap<String, Hash>,
    /// `haveDerivation`'s validity check, made by the loading job when the goal
    /// goes on to it (`None`: the goal asks for it itself, if at all).
    pub validity: Option<ValidityResult>,
}

/// The outputs' states after a validity check.
pub type ValidityResult = Result<BTreeMap<String, OutputState>, GoalError>;

/// Whether every wanted output is valid (and its path known).
fn all_wanted_valid(outputs: &BTreeMap<String, OutputState>, wanted: &OutputsSpec) -> bool {
    outputs
        .iter()
        .filter(|(n, _)| wanted.contains(n))
        .all(|(_, o)| o.valid && o.path.is_some())
}

/// Outcome of the locking step of `tryToBuild`.
pub enum LockOutcome {
    /// Some lock is held elsewhere: all the lock files, for the message.
    Busy(BTreeSet<PathBuf>),
    Locked {
        locks: PathLocks,
        outputs: BTreeMap<String, OutputState>,
    },
}

/// The input sources that are not valid.
pub type InvalidSrcsResult = Result<Vec<StorePath>, GoalError>;

/// Results of this goal's blocking jobs.
pub enum DrvJobResult {
    /// `getDerivation`'s check, and the loading when the `.drv` is valid (`None`:
    /// not valid).
    DrvValid(Result<Option<Loaded>, GoalError>),
    Loaded(Result<Loaded, GoalError>),
    Validity(Purpose, ValidityResult),
    /// `outputsSubstitutionTried`'s validity check, and when the goal gives up on
    /// substitution, `gaveUpOnSubstitution`'s query of the input sources too.
    SubstitutionTried(ValidityResult, Option<InvalidSrcsResult>),
    InvalidSrcs(InvalidSrcsResult),
    Resolved(Result<Option<StorePath>, GoalError>),
    Inputs(Result<(StorePathSet, StorePathSet), GoalError>),
    Locked(Result<LockOutcome, GoalError>),
    PostBuildHook(Result<(), GoalError>),
    RealisationsRegistered(Result<(), GoalError>),
    /// `repairClosure`: goals for the corrupt or missing paths of the closure.
    /// Each corrupt or missing path of the closure and the goal that repairs it.
    ClosureToRepair(Result<Vec<(StorePath, GoalRequest)>, GoalError>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NeedRestart {
    DontNeed,
    AddedDoNeed,
    BuildInProgress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RetrySubstitution {
    NoNeed,
    YesNeed,
    AlreadyRetried,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Init,
    CheckingDrv,
    AwaitDrvSubstitution,
    Loading,
    HaveDerivation,
    AwaitOutputsSubstitution,
    SubstitutionTried,
    CheckingInputSrcs,
    AwaitInputs,
    Resolving,
    AwaitResolved,
    RegisteringResolved,
    CheckingClosure,
    AwaitClosureRepaired,
    ComputingInputs,
    Locking,
    WaitingForLock,
    AwaitHookReply,
    Postponed,
    /// A slot was free when asked for; its grant comes next.
    TakingBuildSlot,
    /// Waiting for a slot to free up.
    AwaitBuildSlot,
    BuildingLocally,
    BuildingRemotely,
    CheckingHookOutputs,
    PostBuildHook,
    Done,
}

/// Nix's phases of a derivation goal, each handled by a module of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `get.rs`: `getDerivation`, `loadDerivation`.
    GetDerivation,
    /// `substitute.rs`: `haveDerivation`, `outputsSubstitutionTried`, `repairClosure`.
    Substitute,
    /// `inputs.rs`: `gaveUpOnSubstitution`, `inputsRealised`, `resolvedFinished`.
    Inputs,
    /// `try_build.rs`: `tryToBuild`, `tryBuildHook`, `tryLocalBuild`.
    TryToBuild,
    /// `finish.rs`: `buildDone`, the post-build hook.
    Finish,
    Done,
}

impl State {
    fn phase(self) -> Phase {
        match self {
            State::Init | State::CheckingDrv | State::AwaitDrvSubstitution | State::Loading => {
                Phase::GetDerivation
            }
            State::HaveDerivation
            | State::AwaitOutputsSubstitution
            | State::SubstitutionTried
            | State::CheckingClosure
            | State::AwaitClosureRepaired => Phase::Substitute,
            State::CheckingInputSrcs
            | State::AwaitInputs
            | State::Resolving
            | State::AwaitResolved
            | State::RegisteringResolved
            | State::ComputingInputs => Phase::Inputs,
            State::Locking
            | State::WaitingForLock
            | State::AwaitHookReply
            | State::Postponed
            | State::TakingBuildSlot
            | State::AwaitBuildSlot => Phase::TryToBuild,
            State::BuildingLocally
            | State::BuildingRemotely
            | State::CheckingHookOutputs
            | State::PostBuildHook => Phase::Finish,
            State::Done => Phase::Done,
        }
    }
}

impl DrvJobResult {
    /// The variant's name, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            DrvJobResult::DrvValid(_) => "DrvValid",
            DrvJobResult::Loaded(_) => "Loaded",
            DrvJobResult::Validity(..) => "Validity",
            DrvJobResult::SubstitutionTried(..) => "SubstitutionTried",
            DrvJobResult::InvalidSrcs(_) => "InvalidSrcs",
            DrvJobResult::Resolved(_) => "Resolved",
            DrvJobResult::Inputs(_) => "Inputs",
            DrvJobResult::Locked(_) => "Locked",
            DrvJobResult::PostBuildHook(_) => "PostBuildHook",
            DrvJobResult::RealisationsRegistered(_) => "RealisationsRegistered",
            DrvJobResult::ClosureToRepair(_) => "ClosureToRepair",
        }
    }
}

/// The state machine of one derivation goal.
pub struct DerivationGoal {
    pub drv_path: StorePath,
    pub wanted: OutputsSpec,
    pub mode: BuildMode,
    /// The outputs wanted at creation, which name the goal in messages (Nix fixes
    /// the name in the constructor; outputs added later do not change it).
    initial_wanted: OutputsSpec,
    state: State,
    drv: Option<Arc<Derivation>>,
    drv_type: Option<DerivationType>,
    output_hashes: BTreeMap<String, Hash>,
    outputs: BTreeMap<String, OutputState>,
    need_restart: NeedRestart,
    retry_substitution: RetrySubstitution,
    waitees: WaiteeCounts,
    input_drv_outputs: BTreeMap<(StorePath, String), StorePath>,
    input_closure: StorePathSet,
    hook_inputs: StorePathSet,
    locks: Option<PathLocks>,
    have_slot: bool,
    resolved: Option<StorePath>,
    /// The outputs a build produced, and its result.
    built: BTreeMap<String, StorePath>,
    build_result: Option<BuildResult>,
    hash_mismatch: bool,
    check_mismatch: bool,
    waiting_message_shown: bool,
    started: bool,
    /// When the build started (Unix seconds), for the result.
    start_time: i64,
    /// The round of a repeated build (`repeat`), 1-based, and how many there are
    /// (0 until the first build starts).
    cur_round: u32,
    nr_rounds: u32,
}

impl DerivationGoal {
    pub fn new(drv_path: StorePath, wanted: OutputsSpec, mode: BuildMode) -> DerivationGoal {
        DerivationGoal {
            drv_path,
            initial_wanted: wanted.clone(),
            wanted,
            mode,
            state: State::Init,
            drv: None,
            drv_type: None,
            output_hashes: BTreeMap::new(),
            outputs: BTreeMap::new(),
            need_restart: NeedRestart::DontNeed,
            retry_substitution: RetrySubstitution::NoNeed,
            waitees: WaiteeCounts::default(),
            input_drv_outputs: BTreeMap::new(),
            input_closure: StorePathSet::new(),
            hook_inputs: StorePathSet::new(),
            locks: None,
            have_slot: false,
            resolved: None,
            built: BTreeMap::new(),
            build_result: None,
            hash_mismatch: false,
            check_mismatch: false,
            waiting_message_shown: false,
            started: false,
            start_time: 0,
            cur_round: 1,
            nr_rounds: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether a local build of this goal is running (to cancel it).
    pub fn is_building_locally(&self) -> bool {
        self.state == State::BuildingLocally
    }

    /// Whether a hook build of this goal is running (to cancel it).
    pub fn is_building_remotely(&self) -> bool {
        self.state == State::BuildingRemotely
    }

    /// Whether it holds a build slot.
    pub fn has_slot(&self) -> bool {
        self.have_slot
    }

    /// The state's name, for tests and debugging (Nix's names where it has one).
    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Init | State::CheckingDrv | State::AwaitDrvSubstitution => "getDerivation",
            State::Loading => "loadDerivation",
            State::HaveDerivation => "haveDerivation",
            State::AwaitOutputsSubstitution | State::SubstitutionTried => {
                "outputsSubstitutionTried"
            }
            State::CheckingInputSrcs | State::AwaitInputs => "gaveUpOnSubstitution",
            State::Resolving | State::ComputingInputs => "inputsRealised",
            State::AwaitResolved | State::RegisteringResolved => "resolvedFinished",
            State::CheckingClosure => "repairClosure",
            State::AwaitClosureRepaired => "closureRepaired",
            State::Locking | State::WaitingForLock | State::AwaitHookReply | State::Postponed => {
                "tryToBuild"
            }
            State::TakingBuildSlot | State::AwaitBuildSlot => "tryLocalBuild",
            State::BuildingLocally
            | State::BuildingRemotely
            | State::CheckingHookOutputs
            | State::PostBuildHook => "buildDone",
            State::Done => "done",
        }
    }

    /// Nix's `addWantedOutputs`: false when the goal is done (the Worker then makes a
    /// new one). New outputs before the build restart `haveDerivation`.
    pub fn add_wanted_outputs(&mut self, outputs: &OutputsSpec) -> bool {
        if self.is_done() {
            return false;
        }
        if !outputs.is_subset_of(&self.wanted) {
            self.wanted = self.wanted.union(outputs);
            if self.need_restart == NeedRestart::DontNeed {
                self.need_restart = NeedRestart::AddedDoNeed;
            }
        }
        true
    }

    /// `building of '<drv>!<outputs>' from .drv file`, for timeout and log messages
    /// (the outputs wanted when the goal was made).
    pub fn name(&self, ctx: &GoalCtx) -> String {
        drover::build::done::goal_name(
            &ctx.store_dir.print(&self.drv_path),
            &self.initial_wanted.to_string(),
        )
    }

    fn p(&self, ctx: &GoalCtx) -> String {
        ctx.store_dir.print(&self.drv_path)
    }

    /// One step: the event goes to the phase the goal is in. An event the state does
    /// not expect fails the goal, naming both (never silently dropped).
    pub fn handle(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect> {
        match self.state.phase() {
            Phase::GetDerivation => self.step_get(ev, ctx),
            Phase::Substitute => self.step_substitute(ev, ctx),
            Phase::Inputs => self.step_inputs(ev, ctx),
            Phase::TryToBuild => self.step_try_build(ev, ctx),
            Phase::Finish => self.step_finish(ev, ctx),
            Phase::Done => self.unexpected(&ev, ctx),
        }
    }

    /// An event the current state has no transition for: the goal fails with a
    /// message naming the state and the event (a bug, or a blocking job that died).
    fn unexpected(&mut self, ev: &Event, ctx: &GoalCtx) -> Vec<Effect> {
        let what = match ev {
            Event::Drv(r) => format!("job result {}", r.kind()),
            ev => format!("event {}", ev.kind()),
        };
        self.unexpected_what(what, ctx)
    }

    /// [`Self::unexpected`] for a blocking job's result of the wrong kind.
    fn unexpected_job(&mut self, r: DrvJobResult, ctx: &GoalCtx) -> Vec<Effect> {
        self.unexpected_what(format!("job result {}", r.kind()), ctx)
    }

    fn unexpected_what(&mut self, what: String, ctx: &GoalCtx) -> Vec<Effect> {
        let state = self.state;
        if state == State::Done {
            // A finished goal has reported; the Worker drops it, so nothing reaches
            // it normally. Say so loudly rather than reporting twice.
            log::error!(
                "derivation goal '{}' is done but got {what}; ignored",
                self.p(ctx)
            );
            return vec![];
        }
        let msg = GoalError::UnexpectedEvent {
            goal: self.p(ctx),
            state: format!("{} ({state:?})", self.state_name()),
            what,
        }
        .to_string();
        let mut fx = Vec::new();
        if matches!(state, State::AwaitBuildSlot | State::TakingBuildSlot) && !self.have_slot {
            // Leave the queue: a slot granted later would be lost.
            fx.push(Effect::ReleaseBuildSlot);
        }
        fx.extend(self.done_failure(BuildStatus::MiscFailure, msg));
        fx
    }

    fn reset_counts(&mut self) {
        self.waitees = WaiteeCounts::default();
    }

    fn all_valid(&self) -> bool {
        all_wanted_valid(&self.outputs, &self.wanted)
    }

    fn missing_outputs(&self) -> BTreeSet<String> {
        self.outputs
            .iter()
            .filter(|(_, o)| self.mode == BuildMode::Check || !o.valid)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn release_slot(&mut self) -> Vec<Effect> {
        if self.have_slot {
            self.have_slot = false;
            vec![Effect::ReleaseBuildSlot]
        } else {
            vec![]
        }
    }

    /// The realisations of the built outputs, under their static output hashes.
    fn built_realisations(&self) -> Vec<Realisation> {
        self.built
            .iter()
            .filter_map(|(name, p)| {
                Some(Realisation {
                    id: DrvOutput {
                        drv_hash: self.output_hashes.get(name)?.clone(),
                        output: name.clone(),
                    },
                    out_path: p.clone(),
                    signatures: BTreeSet::new(),
                    dependent_realisations: BTreeMap::new(),
                })
            })
            .collect()
    }

    /// After a successful build: record realisations of the built outputs (with
    /// `ca-derivations`), then run the post-build hook.
    fn done_success(&mut self, status: BuildStatus, _ctx: &GoalCtx) -> Vec<Effect> {
        self.state = State::Done;
        self.locks = None;
        let mut o = GoalOutcome::success(status);
        let mut paths: BTreeMap<String, StorePath> = self
            .outputs
            .iter()
            .filter_map(|(n, s)| Some((n.clone(), s.path.clone().filter(|_| s.valid)?)))
            .collect();
        paths.extend(self.built.clone());
        paths.retain(|n, _| self.wanted.contains(n));
        for (name, p) in &paths {
            if let Some(h) = self.output_hashes.get(name) {
                let id = DrvOutput {
                    drv_hash: h.clone(),
                    output: name.clone(),
                };
                o.result.built_outputs.insert(Realisation {
                    id,
                    out_path: p.clone(),
                    signatures: BTreeSet::new(),
                    dependent_realisations: BTreeMap::new(),
                });
            }
        }
        o.outputs = paths.into();
        o.hash_mismatch = self.hash_mismatch;
        self.stamp(&mut o.result);
        o.check_mismatch = self.check_mismatch;
        vec![Effect::Done(o)]
    }

    fn done_failure(&mut self, status: BuildStatus, msg: String) -> Vec<Effect> {
        self.state = State::Done;
        self.locks = None;
        let mut fx = self.release_slot();
        let mut o = GoalOutcome::failure(ExitCode::Failed, status, msg);
        o.hash_mismatch = self.hash_mismatch;
        self.stamp(&mut o.result);
        o.check_mismatch = self.check_mismatch;
        fx.push(Effect::Done(o));
        fx
    }

    fn not_loaded(&mut self) -> Vec<Effect> {
        self.fatal(GoalError::NotLoaded(self.drv_path.to_string()).to_string())
    }

    fn fatal(&mut self, msg: String) -> Vec<Effect> {
        self.state = State::Done;
        self.locks = None;
        let mut fx = self.release_slot();
        fx.push(Effect::Fatal(msg));
        fx
    }

    /// Start and stop times (and one build) on the result of a goal that built.
    fn stamp(&self, r: &mut BuildResult) {
        if self.started {
            if r.start_time == 0 {
                r.start_time = self.start_time;
            }
            if r.stop_time == 0 {
                r.stop_time = now();
            }
            r.times_built = r.times_built.max(1);
        }
    }

    /// Whether the build really started (for the running-builds counter).
    pub fn started(&self) -> bool {
        self.started
    }

    /// `(round, rounds)` while a repeated build (`repeat`) runs its rounds, for
    /// `building '…' (round N/M)`.
    pub fn round(&self) -> Option<(u32, u32)> {
        (self.nr_rounds > 1).then_some((self.cur_round, self.nr_rounds))
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn job(f: impl FnOnce(&JobEnv) -> DrvJobResult + Send + 'static) -> Effect {
    Effect::Blocking(Box::new(move |env: &JobEnv| Event::Drv(Box::new(f(env)))))
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    #[test]
    fn an_unexpected_event_fails_the_goal_naming_state_and_event() {
        let h = Harness::new(vec![]);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let mut g = all(&d);
        let fx = step(&h, &mut g, Event::Wake);
        assert!(
            fx.contains("Done(Failed, MiscFailure : internal error: the goal for '")
                && fx.contains("in state getDerivation (Init) got an unexpected event Wake"),
            "{fx}"
        );
        assert!(g.is_done());
        // A job result of the wrong kind (what a died job would look like).
        let mut g = all(&d);
        step(&h, &mut g, Event::Start);
        assert_eq!(g.state_name(), "outputsSubstitutionTried");
        let fx = step(
            &h,
            &mut g,
            Event::Drv(Box::new(DrvJobResult::PostBuildHook(Ok(())))),
        );
        assert!(
            fx.contains("(AwaitOutputsSubstitution) got an unexpected job result PostBuildHook"),
            "{fx}"
        );
        // A goal that is done reports nothing more.
        assert_eq!(step(&h, &mut g, Event::Wake), "[]");
    }

    #[test]
    fn a_build_costs_one_job_per_phase_up_to_its_inputs() {
        // Each job is a trip through the blocking pool: `getDerivation`,
        // `loadDerivation` and `haveDerivation`'s check are one, as are
        // `outputsSubstitutionTried`'s check and `gaveUpOnSubstitution`'s query.
        let h = Harness::new(vec![]);
        let a = h.ts.add_drv("a", &["out"], &[], &[]);
        let b = h.ts.add_drv("b", &["out"], &[&a], &[]);
        let mut g = all(&b);
        assert_eq!(
            step_counting_jobs(&h, &mut g, Event::Start),
            ("[WaitFor([])]".to_owned(), 1)
        );
        let (fx, jobs) = step_counting_jobs(&h, &mut g, Event::WaiteesDone);
        assert!(fx.starts_with("[WaitFor([Derivation"), "{fx}");
        assert_eq!((g.state_name(), jobs), ("gaveUpOnSubstitution", 1));
        // Valid outputs end the goal after the first job.
        h.ts.make_valid(&a);
        let mut g = all(&a);
        assert_eq!(
            step_counting_jobs(&h, &mut g, Event::Start),
            ("[Done(Success, AlreadyValid)]".to_owned(), 1)
        );
    }

    #[test]
    fn outputs_valid_when_substitution_was_tried_are_substituted_without_the_sources_query() {
        let h = Harness::new(vec![]);
        let a = h.ts.add_drv("a", &["out"], &[], &[]);
        let mut g = all(&a);
        assert_eq!(step(&h, &mut g, Event::Start), "[WaitFor([])]");
        // Valid by the time the substitutions are over (another process, say).
        h.ts.make_valid(&a);
        assert_eq!(
            step_counting_jobs(&h, &mut g, Event::WaiteesDone),
            ("[Done(Success, Substituted)]".to_owned(), 1)
        );
    }
}
