//! DerivationGoal: make the wanted outputs of one derivation valid (spec §2).
//!
//! The states follow Nix 2.8's `DerivationGoal`:
//!
//! * `getDerivation` — the `.drv` valid (normal mode) or substituted first;
//! * `loadDerivation` — read it (a missing drv → MiscFailure
//!   `cannot build missing derivation '…'`);
//! * `haveDerivation` — check output validity; all wanted valid → AlreadyValid; else
//!   substitution goals for the wanted outputs (path goals for known paths,
//!   drv-output goals for floating ones);
//! * `outputsSubstitutionTried` — a real substituter failure without `--fallback` →
//!   TransientFailure; an incomplete closure arms `retrySubstitution`; outputs added
//!   meanwhile restart `haveDerivation`; all valid → Substituted; check mode with
//!   invalid outputs is a run error; repair mode → `repairClosure`;
//! * `gaveUpOnSubstitution` — goals for the input derivations and input sources;
//! * `inputsRealised` — failed inputs → DependencyFailed
//!   `N dependencies of derivation '…' failed to build`; a retry of substitution;
//!   resolution of floating-CA/deferred derivations into a resolved goal
//!   (`resolvedFinished` maps AlreadyValid to ResolvesToAlreadyValid and registers
//!   realisations for the original derivation); otherwise the input closure;
//! * `tryToBuild` — non-blocking output locks (retry after the poll interval), the
//!   re-check ("someone beat us to it"), removal of invalid leftovers, then the hook
//!   (first without a slot, `amWilling=false`; again with a slot, `amWilling=true`)
//!   or a local build (`RunLocalBuild`), postponing with the poll interval; a hook
//!   error (`bad hook reply '…'`, `unexpected EOF reading a line`) is a run error
//!   (`Effect::Fatal`), as Nix 2.8 throws it out of the goal;
//! * `buildDone` — classification of local and hook results (a hook that exits 0
//!   without the outputs valid: the run error `some outputs are unexpectedly
//!   invalid`), the post-build hook, `done`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use drover::build_result::{BuildResult, BuildStatus};
use drover::config::MissingExperimentalFeature;
use drover::derivation::{name_from_drv_path, Derivation, DerivationOutput, DerivationType};
use drover::derived_path::OutputsSpec;
use drover::hash::Hash;
use drover::realisation::{DrvOutput, Realisation};
use drover::store::{LocalStore, PathLocks};
use drover::store_path::{StorePath, StorePathSet};

use super::{Effect, Event, ExitCode, GoalCtx, GoalOutcome, GoalRequest, JobEnv, WaiteeCounts};
use crate::messages::{BuildMode, HookReply, LocalBuildRequest};

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
    SubstitutionTried,
    AfterHook,
}

/// The derivation as loaded, with its per-output hashes (realisation ids).
pub struct Loaded {
    pub drv: Arc<Derivation>,
    pub output_hashes: BTreeMap<String, Hash>,
}

/// Outcome of the locking step of `tryToBuild`.
pub enum LockOutcome {
    Busy(PathBuf),
    Locked {
        locks: PathLocks,
        outputs: BTreeMap<String, OutputState>,
    },
}

/// Results of this goal's blocking jobs.
pub enum DrvJobResult {
    DrvValid(Result<bool, String>),
    Loaded(Result<Loaded, String>),
    Validity(Purpose, Result<BTreeMap<String, OutputState>, String>),
    InvalidSrcs(Result<Vec<StorePath>, String>),
    Resolved(Result<Option<StorePath>, String>),
    Inputs(Result<(StorePathSet, StorePathSet), String>),
    Locked(Result<LockOutcome, String>),
    PostBuildHook(Result<(), String>),
    RealisationsRegistered(Result<(), String>),
    /// `repairClosure`: goals for the corrupt or missing paths of the closure.
    /// Each corrupt or missing path of the closure and the goal that repairs it.
    ClosureToRepair(Result<Vec<(StorePath, GoalRequest)>, String>),
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
    AwaitBuildSlot,
    BuildingLocally,
    BuildingRemotely,
    CheckingHookOutputs,
    PostBuildHook,
    Done,
}

/// The state machine of one derivation goal.
pub struct DerivationGoal {
    pub drv_path: StorePath,
    pub wanted: OutputsSpec,
    pub mode: BuildMode,
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
}

impl DerivationGoal {
    pub fn new(drv_path: StorePath, wanted: OutputsSpec, mode: BuildMode) -> DerivationGoal {
        DerivationGoal {
            drv_path,
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
            State::AwaitBuildSlot => "tryLocalBuild",
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

    /// `building of '<drv>!<outputs>' from .drv file`, for timeout and log messages.
    pub fn name(&self, ctx: &GoalCtx) -> String {
        format!(
            "building of '{}!{}' from .drv file",
            ctx.store_dir.print(&self.drv_path),
            self.wanted
        )
    }

    fn p(&self, ctx: &GoalCtx) -> String {
        ctx.store_dir.print(&self.drv_path)
    }

    pub fn handle(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect> {
        match (self.state, ev) {
            // getDerivation
            (State::Init, Event::Start) => {
                if self.mode == BuildMode::Normal {
                    self.state = State::CheckingDrv;
                    let p = self.drv_path.clone();
                    vec![job(move |env| {
                        // The root first: the collector must not take the .drv
                        // between our check and our reading it.
                        DrvJobResult::DrvValid(
                            env.store
                                .add_temp_root(&p)
                                .and_then(|()| env.store.is_valid_path(&p))
                                .map_err(|e| e.to_string()),
                        )
                    })]
                } else {
                    self.wait_for_drv()
                }
            }
            (State::CheckingDrv, Event::Drv(r)) => match *r {
                DrvJobResult::DrvValid(Ok(true)) => self.load(),
                DrvJobResult::DrvValid(Ok(false)) => self.wait_for_drv(),
                DrvJobResult::DrvValid(Err(e)) => self.fatal(e),
                _ => vec![],
            },
            (State::AwaitDrvSubstitution, Event::WaiteeDone(w)) => {
                self.waitees.count(w.outcome.exit);
                vec![]
            }
            (State::AwaitDrvSubstitution, Event::WaiteesDone) => {
                if self.waitees.failed > 0 {
                    let msg = format!("cannot build missing derivation '{}'", self.p(ctx));
                    return self.done_failure(BuildStatus::MiscFailure, msg);
                }
                self.load()
            }
            // loadDerivation
            (State::Loading, Event::Drv(r)) => match *r {
                DrvJobResult::Loaded(Ok(l)) => {
                    match l.drv.derivation_type() {
                        Ok(t) => self.drv_type = Some(t),
                        Err(e) => return self.fatal(e.to_string()),
                    }
                    if self.drv_type == Some(DerivationType::Impure) {
                        if !ctx.settings.impure_derivations {
                            return self.fatal(
                                MissingExperimentalFeature("impure-derivations".into()).to_string(),
                            );
                        }
                    } else if !self.drv_type.is_some_and(|t| t.has_known_output_paths())
                        && !ctx.settings.ca_derivations
                    {
                        return self.fatal(
                            MissingExperimentalFeature("ca-derivations".into()).to_string(),
                        );
                    }
                    self.drv = Some(l.drv);
                    self.output_hashes = l.output_hashes;
                    self.have_derivation()
                }
                DrvJobResult::Loaded(Err(e)) => self.fatal(e),
                _ => vec![],
            },
            // haveDerivation
            (State::HaveDerivation, Event::Drv(r)) => match *r {
                DrvJobResult::Validity(Purpose::HaveDerivation, Ok(outs)) => {
                    self.outputs = outs;
                    if let Some(fx) = self.check_wanted_exist(ctx) {
                        return fx;
                    }
                    if self.all_valid() && self.mode == BuildMode::Normal {
                        return self.done_success(BuildStatus::AlreadyValid, ctx);
                    }
                    let allow = self
                        .drv
                        .as_ref()
                        .and_then(|d| d.env.get("allowSubstitutes"))
                        .map(|v| v == "1")
                        .unwrap_or(true);
                    let mut reqs = Vec::new();
                    if ctx.settings.substitute && allow && ctx.n_substituters > 0 {
                        let repair = self.mode == BuildMode::Repair;
                        for (name, o) in &self.outputs {
                            if !self.wanted.contains(name) {
                                continue;
                            }
                            match &o.path {
                                Some(p)
                                    if self
                                        .drv_type
                                        .is_some_and(|t| t.has_known_output_paths()) =>
                                {
                                    reqs.push(GoalRequest::Substitution {
                                        path: p.clone(),
                                        repair,
                                    })
                                }
                                _ => {
                                    if let Some(h) = self.output_hashes.get(name) {
                                        reqs.push(GoalRequest::DrvOutput {
                                            id: DrvOutput {
                                                drv_hash: h.clone(),
                                                output: name.clone(),
                                            },
                                            repair,
                                        })
                                    }
                                }
                            }
                        }
                    }
                    self.state = State::AwaitOutputsSubstitution;
                    vec![Effect::WaitFor(reqs)]
                }
                DrvJobResult::Validity(_, Err(e)) => self.fatal(e),
                _ => vec![],
            },
            (State::AwaitOutputsSubstitution, Event::WaiteeDone(w)) => {
                self.waitees.count(w.outcome.exit);
                vec![]
            }
            // outputsSubstitutionTried
            (State::AwaitOutputsSubstitution, Event::WaiteesDone) => {
                if self.waitees.failed > 0
                    && self.waitees.failed
                        > self.waitees.no_substituters + self.waitees.incomplete_closure
                    && !ctx.settings.fallback
                {
                    let msg = format!("some substitutes for the outputs of derivation '{}' failed (usually happens due to networking issues); try '--fallback' to build derivation from source", self.p(ctx));
                    return self.done_failure(BuildStatus::TransientFailure, msg);
                }
                if self.waitees.incomplete_closure > 0
                    && self.waitees.incomplete_closure == self.waitees.failed
                    && self.retry_substitution == RetrySubstitution::NoNeed
                {
                    self.retry_substitution = RetrySubstitution::YesNeed;
                }
                self.reset_counts();
                if self.need_restart == NeedRestart::AddedDoNeed {
                    self.need_restart = NeedRestart::DontNeed;
                    return self.have_derivation();
                }
                self.state = State::SubstitutionTried;
                self.validity_job(Purpose::SubstitutionTried)
            }
            (State::SubstitutionTried, Event::Drv(r)) => match *r {
                DrvJobResult::Validity(Purpose::SubstitutionTried, Ok(outs)) => {
                    self.outputs = outs;
                    let all = self.all_valid();
                    match self.mode {
                        BuildMode::Normal if all => {
                            self.done_success(BuildStatus::Substituted, ctx)
                        }
                        BuildMode::Repair if all => self.repair_closure(),
                        BuildMode::Check if !all => self.fatal(format!(
                            "some outputs of '{}' are not valid, so checking is not possible",
                            self.p(ctx)
                        )),
                        _ => self.gave_up_on_substitution(),
                    }
                }
                DrvJobResult::Validity(_, Err(e)) => self.fatal(e),
                _ => vec![],
            },
            // gaveUpOnSubstitution
            (State::CheckingInputSrcs, Event::Drv(r)) => match *r {
                DrvJobResult::InvalidSrcs(Ok(srcs)) => {
                    let Some(drv) = self.drv.clone() else {
                        return self.fatal("derivation not loaded".into());
                    };
                    let input_mode = if self.mode == BuildMode::Repair {
                        BuildMode::Repair
                    } else {
                        BuildMode::Normal
                    };
                    let mut reqs: Vec<GoalRequest> = drv
                        .input_drvs
                        .iter()
                        .map(|(d, outs)| GoalRequest::Derivation {
                            drv_path: d.clone(),
                            outputs: OutputsSpec::Names(outs.clone()),
                            mode: input_mode,
                        })
                        .collect();
                    if !srcs.is_empty() && !ctx.settings.substitute {
                        return self.fatal(format!(
                            "dependency '{}' of '{}' does not exist, and substitution is disabled",
                            ctx.store_dir.print(&srcs[0]),
                            self.p(ctx)
                        ));
                    }
                    reqs.extend(srcs.into_iter().map(|path| GoalRequest::Substitution {
                        path,
                        repair: false,
                    }));
                    self.state = State::AwaitInputs;
                    vec![Effect::WaitFor(reqs)]
                }
                DrvJobResult::InvalidSrcs(Err(e)) => self.fatal(e),
                _ => vec![],
            },
            (State::AwaitInputs, Event::WaiteeDone(w)) => {
                self.waitees.count(w.outcome.exit);
                if let (GoalRequest::Derivation { drv_path, .. }, ExitCode::Success) =
                    (&w.request, w.outcome.exit)
                {
                    if let Some(needed) = self.drv.as_ref().and_then(|d| d.input_drvs.get(drv_path))
                    {
                        for o in needed {
                            if let Some(p) = w.outcome.outputs.get(o) {
                                self.input_drv_outputs
                                    .insert((drv_path.clone(), o.clone()), p.clone());
                            }
                        }
                    }
                }
                vec![]
            }
            // inputsRealised
            (State::AwaitInputs, Event::WaiteesDone) => {
                if self.waitees.failed > 0 {
                    let msg = format!(
                        "{} dependencies of derivation '{}' failed to build",
                        self.waitees.failed,
                        self.p(ctx)
                    );
                    return self.done_failure(BuildStatus::DependencyFailed, msg);
                }
                if self.retry_substitution == RetrySubstitution::YesNeed {
                    self.retry_substitution = RetrySubstitution::AlreadyRetried;
                    return self.have_derivation();
                }
                let Some(drv) = self.drv.clone() else {
                    return self.fatal("derivation not loaded".into());
                };
                let resolve = match self.drv_type {
                    Some(DerivationType::InputAddressed { deferred }) => deferred,
                    Some(DerivationType::ContentAddressed { fixed: false }) => true,
                    Some(DerivationType::ContentAddressed { fixed: true }) => {
                        ctx.settings.ca_derivations
                    }
                    Some(DerivationType::Impure) => true,
                    None => false,
                };
                if resolve && !drv.input_drvs.is_empty() {
                    if !ctx.settings.ca_derivations {
                        return self.fatal(
                            MissingExperimentalFeature("ca-derivations".into()).to_string(),
                        );
                    }
                    self.state = State::Resolving;
                    let known = self.input_drv_outputs.clone();
                    let drv_path = self.drv_path.clone();
                    return vec![job(move |env| {
                        DrvJobResult::Resolved(resolve_and_write(env, &drv_path, &drv, &known))
                    })];
                }
                self.state = State::ComputingInputs;
                let known = self.input_drv_outputs.clone();
                let drv_path = self.drv_path.clone();
                vec![job(move |env| {
                    DrvJobResult::Inputs(input_paths(&env.store, &drv_path, &drv, &known))
                })]
            }
            (State::Resolving, Event::Drv(r)) => match *r {
                DrvJobResult::Resolved(Ok(Some(resolved))) => {
                    let msg = format!(
                        "resolved derivation: '{}' -> '{}'...",
                        self.p(ctx),
                        ctx.store_dir.print(&resolved)
                    );
                    self.resolved = Some(resolved.clone());
                    self.state = State::AwaitResolved;
                    vec![
                        Effect::Message(msg),
                        Effect::WaitFor(vec![GoalRequest::Derivation {
                            drv_path: resolved,
                            outputs: self.wanted.clone(),
                            mode: self.mode,
                        }]),
                    ]
                }
                DrvJobResult::Resolved(Ok(None)) => self.fatal(format!(
                    "derivation '{}' could not be resolved",
                    self.p(ctx)
                )),
                DrvJobResult::Resolved(Err(e)) => self.fatal(e),
                _ => vec![],
            },
            (State::AwaitResolved, Event::WaiteeDone(w)) => {
                self.waitees.count(w.outcome.exit);
                self.build_result = Some(w.outcome.result.clone());
                self.built = w.outcome.outputs.clone();
                self.hash_mismatch |= w.outcome.hash_mismatch;
                self.check_mismatch |= w.outcome.check_mismatch;
                vec![]
            }
            // resolvedFinished
            (State::AwaitResolved, Event::WaiteesDone) => {
                let r = self.build_result.clone().unwrap_or_default();
                if !r.success() {
                    return self.done_failure(r.status, String::new());
                }
                let pure = self.drv_type.is_some_and(|t| t.is_pure());
                let realisations = self.built_realisations();
                self.state = State::RegisteringResolved;
                vec![job(move |env| {
                    let mut res = Ok(());
                    if pure {
                        for r in &realisations {
                            if let Err(e) = env.store.register_realisation(r) {
                                res = Err(e.to_string());
                                break;
                            }
                        }
                    }
                    DrvJobResult::RealisationsRegistered(res)
                })]
            }
            (State::RegisteringResolved, Event::Drv(r)) => match *r {
                DrvJobResult::RealisationsRegistered(Ok(())) => {
                    let status = match self.build_result.as_ref().map(|r| r.status) {
                        Some(BuildStatus::AlreadyValid) | None => {
                            BuildStatus::ResolvesToAlreadyValid
                        }
                        Some(s) => s,
                    };
                    self.done_success(status, ctx)
                }
                DrvJobResult::RealisationsRegistered(Err(e)) => self.fatal(e),
                _ => vec![],
            },
            (State::CheckingClosure, Event::Drv(r)) => match *r {
                DrvJobResult::ClosureToRepair(Ok(reqs)) if reqs.is_empty() => {
                    self.done_success(BuildStatus::AlreadyValid, ctx)
                }
                DrvJobResult::ClosureToRepair(Ok(reqs)) => {
                    self.reset_counts();
                    self.state = State::AwaitClosureRepaired;
                    let mut fx: Vec<Effect> = reqs
                        .iter()
                        .map(|(p, _)| {
                            Effect::Message(format!(
                                "found corrupted or missing path '{}' in the output closure of '{}'",
                                ctx.store_dir.print(p),
                                self.p(ctx)
                            ))
                        })
                        .collect();
                    fx.push(Effect::WaitFor(reqs.into_iter().map(|(_, r)| r).collect()));
                    fx
                }
                DrvJobResult::ClosureToRepair(Err(e)) => self.fatal(e),
                _ => vec![],
            },
            (State::AwaitClosureRepaired, Event::WaiteeDone(w)) => {
                self.waitees.count(w.outcome.exit);
                vec![]
            }
            // closureRepaired
            (State::AwaitClosureRepaired, Event::WaiteesDone) => {
                if self.waitees.failed > 0 {
                    return self.fatal(format!(
                        "some paths in the output closure of derivation '{}' could not be repaired",
                        self.p(ctx)
                    ));
                }
                self.done_success(BuildStatus::AlreadyValid, ctx)
            }
            (State::ComputingInputs, Event::Drv(r)) => match *r {
                DrvJobResult::Inputs(Ok((closure, direct))) => {
                    self.input_closure = closure;
                    self.hook_inputs = direct;
                    self.try_to_build()
                }
                DrvJobResult::Inputs(Err(e)) => self.fatal(e),
                _ => vec![],
            },
            // tryToBuild
            (State::Locking, Event::Drv(r)) => match *r {
                DrvJobResult::Locked(Ok(LockOutcome::Busy(p))) => {
                    self.state = State::WaitingForLock;
                    let mut fx = Vec::new();
                    if !self.waiting_message_shown {
                        self.waiting_message_shown = true;
                        fx.push(Effect::Message(format!(
                            "waiting for lock on '{}'",
                            p.display()
                        )));
                    }
                    fx.push(Effect::WaitForAWhile);
                    fx
                }
                DrvJobResult::Locked(Ok(LockOutcome::Locked { mut locks, outputs })) => {
                    self.waiting_message_shown = false;
                    self.outputs = outputs;
                    if self.mode != BuildMode::Check && self.all_valid() {
                        locks.set_deletion(true);
                        drop(locks);
                        let mut fx = self.release_slot();
                        fx.extend(self.done_success(BuildStatus::AlreadyValid, ctx));
                        return fx;
                    }
                    self.locks = Some(locks);
                    self.after_locked(ctx)
                }
                DrvJobResult::Locked(Err(e)) => self.fatal(e),
                _ => vec![],
            },
            (State::WaitingForLock | State::Postponed, Event::Wake) => self.try_to_build(),
            (State::AwaitHookReply, Event::HookReply(reply)) => match reply {
                HookReply::Accept { machine, job } => {
                    self.state = State::BuildingRemotely;
                    self.started = true;
                    self.start_time = now();
                    let missing = self.missing_outputs();
                    vec![
                        Effect::BuildStarted {
                            machine: Some(machine),
                        },
                        Effect::HookBuild {
                            job,
                            drv_path: self.drv_path.clone(),
                            inputs: self.hook_inputs.clone(),
                            missing_outputs: missing,
                        },
                    ]
                }
                HookReply::Decline => self.try_local_build(ctx),
                HookReply::DeclinePermanently => {
                    let mut fx = vec![Effect::DisableHook];
                    fx.extend(self.try_local_build(ctx));
                    fx
                }
                HookReply::Postpone => {
                    self.locks = None;
                    self.state = State::Postponed;
                    let mut fx = self.release_slot();
                    if !self.waiting_message_shown {
                        self.waiting_message_shown = true;
                        fx.push(Effect::Message(format!(
                            "waiting for a machine to build '{}'",
                            self.p(ctx)
                        )));
                    }
                    fx.push(Effect::WaitForAWhile);
                    fx
                }
                // Nix 2.8 throws these (`bad hook reply '…'`, `unexpected EOF reading a
                // line`, …) out of the goal: the whole run ends with exit 1.
                HookReply::Error(msg) => self.fatal(msg),
            },
            (State::AwaitBuildSlot, Event::SlotGranted) => {
                self.have_slot = true;
                self.try_to_build()
            }
            // buildDone (local)
            (State::BuildingLocally, Event::LocalBuildFinished(f)) => {
                let mut fx = self.release_slot();
                self.hash_mismatch |= f.hash_mismatch;
                if f.result.status == BuildStatus::NotDeterministic {
                    self.check_mismatch = true;
                }
                if f.result.success() {
                    self.built = f.outputs;
                    self.build_result = Some(f.result);
                    fx.extend(self.post_build(ctx));
                } else {
                    self.locks = None;
                    self.build_result = Some(f.result.clone());
                    fx.extend(self.finish_with(f.result, ctx));
                }
                fx
            }
            // buildDone (hook)
            (State::BuildingRemotely, Event::HookFinished(f)) => {
                let mut fx = self.release_slot();
                let p = self.p(ctx);
                let name = self.name(ctx);
                let failure = match (f.alarm, f.exit_code) {
                    (Some(crate::messages::LogAlarm::Timeout(d)), _) => Some((
                        BuildStatus::TimedOut,
                        format!("{name} timed out after {} seconds", d.as_secs()),
                    )),
                    (Some(crate::messages::LogAlarm::Silent(d)), _) => Some((
                        BuildStatus::TimedOut,
                        format!("{name} timed out after {} seconds of silence", d.as_secs()),
                    )),
                    (Some(crate::messages::LogAlarm::LogLimit(n)), _) => Some((
                        BuildStatus::LogLimitExceeded,
                        format!("{name} killed after writing more than {n} bytes of log output"),
                    )),
                    (None, Some(0)) => None,
                    (None, Some(101)) => Some((
                        BuildStatus::TimedOut,
                        format!("builder for '{p}' failed with exit code 101"),
                    )),
                    (None, Some(100)) => {
                        let sandboxed = self.drv_type.is_some_and(|t| t.is_sandboxed());
                        Some((
                            if sandboxed {
                                BuildStatus::PermanentFailure
                            } else {
                                BuildStatus::TransientFailure
                            },
                            format!("builder for '{p}' failed with exit code 100"),
                        ))
                    }
                    (None, Some(n)) => Some((
                        BuildStatus::MiscFailure,
                        format!("builder for '{p}' failed with exit code {n}"),
                    )),
                    (None, None) => Some((
                        BuildStatus::MiscFailure,
                        format!("builder for '{p}' failed due to signal"),
                    )),
                };
                match failure {
                    Some((status, mut msg)) => {
                        if f.alarm.is_none() && !ctx.settings.log.echo && !f.log.tail.is_empty() {
                            msg.push_str(&log_tail_suffix(&p, &f.log.tail));
                        }
                        self.locks = None;
                        fx.extend(self.done_failure(status, msg));
                    }
                    None => {
                        self.state = State::CheckingHookOutputs;
                        fx.extend(self.validity_job(Purpose::AfterHook));
                    }
                }
                fx
            }
            (State::CheckingHookOutputs, Event::Drv(r)) => match *r {
                DrvJobResult::Validity(Purpose::AfterHook, Ok(outs)) => {
                    self.outputs = outs;
                    if !self.all_valid() {
                        // Thrown by Nix 2.8's `assertPathValidity`: ends the whole run.
                        return self.fatal("some outputs are unexpectedly invalid".into());
                    }
                    self.built = self
                        .outputs
                        .iter()
                        .filter_map(|(n, o)| Some((n.clone(), o.path.clone()?)))
                        .collect();
                    let mut r = BuildResult::new(BuildStatus::Built);
                    r.times_built = 1;
                    self.build_result = Some(r);
                    self.post_build(ctx)
                }
                DrvJobResult::Validity(_, Err(e)) => self.fatal(e),
                _ => vec![],
            },
            (State::PostBuildHook, Event::Drv(r)) => match *r {
                DrvJobResult::PostBuildHook(Ok(())) => {
                    if let Some(l) = self.locks.as_mut() {
                        l.set_deletion(true);
                    }
                    self.locks = None;
                    let r = self
                        .build_result
                        .clone()
                        .unwrap_or_else(|| BuildResult::new(BuildStatus::Built));
                    self.finish_with(r, ctx)
                }
                DrvJobResult::PostBuildHook(Err(e)) => self.fatal(e),
                _ => vec![],
            },
            _ => vec![],
        }
    }

    fn reset_counts(&mut self) {
        self.waitees = WaiteeCounts::default();
    }

    fn wait_for_drv(&mut self) -> Vec<Effect> {
        self.state = State::AwaitDrvSubstitution;
        // Nix substitutes the `.drv` itself without repair, in every mode.
        vec![Effect::WaitFor(vec![GoalRequest::Substitution {
            path: self.drv_path.clone(),
            repair: false,
        }])]
    }

    fn load(&mut self) -> Vec<Effect> {
        self.reset_counts();
        self.state = State::Loading;
        let p = self.drv_path.clone();
        vec![job(move |env| {
            let r = (|| {
                env.store.add_temp_root(&p).map_err(|e| e.to_string())?;
                let drv = Arc::new(env.store.read_derivation(&p).map_err(|e| e.to_string())?);
                let store_dir = env.store.store_dir().clone();
                let mut cache = env.drv_hashes.lock().map_err(|e| e.to_string())?;
                let read = |q: &StorePath| env.store.read_derivation(q).map(Arc::new);
                let mut hashes = BTreeMap::new();
                // Hashes of the inputs first (memoised), then this derivation's own.
                let mut inputs_ok = true;
                for i in drv.input_drvs.keys() {
                    if cache
                        .hash_of::<_, drover::store::StoreError>(&store_dir, i, read)
                        .is_err()
                    {
                        inputs_ok = false;
                    }
                }
                if inputs_ok {
                    let c = &*cache;
                    if let Ok(h) = drv.static_output_hashes(&store_dir, |q| {
                        c.get(q).cloned().ok_or_else(|| {
                            drover::derivation::DerivationError::MissingInputOutput {
                                drv: store_dir.print(q),
                                output: "*".into(),
                            }
                        })
                    }) {
                        hashes = h;
                    }
                }
                Ok(Loaded {
                    drv,
                    output_hashes: hashes,
                })
            })();
            DrvJobResult::Loaded(r)
        })]
    }

    fn have_derivation(&mut self) -> Vec<Effect> {
        self.reset_counts();
        if self.drv_type == Some(DerivationType::Impure) {
            return self.gave_up_on_substitution();
        }
        self.state = State::HaveDerivation;
        self.validity_job(Purpose::HaveDerivation)
    }

    fn validity_job(&self, purpose: Purpose) -> Vec<Effect> {
        let Some(drv) = self.drv.clone() else {
            return vec![Effect::Fatal("derivation not loaded".into())];
        };
        let p = self.drv_path.clone();
        let hashes = self.output_hashes.clone();
        let repair = self.mode == BuildMode::Repair;
        vec![job(move |env| {
            DrvJobResult::Validity(purpose, check_validity(env, &p, &drv, &hashes, repair))
        })]
    }

    fn check_wanted_exist(&mut self, ctx: &GoalCtx) -> Option<Vec<Effect>> {
        if let OutputsSpec::Names(names) = &self.wanted {
            let missing: Vec<&String> = names
                .iter()
                .filter(|n| !self.outputs.contains_key(*n))
                .collect();
            if !missing.is_empty() {
                let list = missing
                    .iter()
                    .map(|m| format!("'{m}'"))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Some(self.fatal(format!(
                    "derivation '{}' does not have wanted outputs {list}",
                    self.p(ctx)
                )));
            }
        }
        None
    }

    fn all_valid(&self) -> bool {
        self.outputs
            .iter()
            .filter(|(n, _)| self.wanted.contains(n))
            .all(|(_, o)| o.valid && o.path.is_some())
    }

    fn missing_outputs(&self) -> BTreeSet<String> {
        self.outputs
            .iter()
            .filter(|(_, o)| self.mode == BuildMode::Check || !o.valid)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// `repairClosure`: the closure of the wanted outputs (without themselves) is
    /// checked; corrupt or missing paths are rebuilt from their deriver (repair mode)
    /// or substituted again.
    fn repair_closure(&mut self) -> Vec<Effect> {
        self.state = State::CheckingClosure;
        let own: Vec<StorePath> = self
            .outputs
            .iter()
            .filter(|(n, _)| self.wanted.contains(n))
            .filter_map(|(_, o)| o.path.clone())
            .collect();
        vec![job(move |env| {
            let r = (|| {
                let store = &env.store;
                let closure = store.compute_closure(&own).map_err(|e| e.to_string())?;
                let mut reqs = Vec::new();
                for p in closure.iter().filter(|p| !own.contains(p)) {
                    if env.contents.good(store, p)? {
                        continue;
                    }
                    let derivers = store.query_valid_derivers(p).map_err(|e| e.to_string())?;
                    let req = match derivers.into_iter().next() {
                        Some(d) => GoalRequest::Derivation {
                            drv_path: d,
                            outputs: OutputsSpec::All,
                            mode: BuildMode::Repair,
                        },
                        None => GoalRequest::Substitution {
                            path: p.clone(),
                            repair: true,
                        },
                    };
                    reqs.push((p.clone(), req));
                }
                Ok(reqs)
            })();
            DrvJobResult::ClosureToRepair(r)
        })]
    }

    fn gave_up_on_substitution(&mut self) -> Vec<Effect> {
        self.need_restart = NeedRestart::BuildInProgress;
        self.input_drv_outputs.clear();
        self.reset_counts();
        self.state = State::CheckingInputSrcs;
        let Some(drv) = self.drv.clone() else {
            return self.fatal("derivation not loaded".into());
        };
        // With impure derivations enabled, a pure derivation (fixed-output ones
        // aside) must not depend on an impure one.
        let check_impure_inputs = self.drv_type.is_some_and(|t| t.is_pure() && !t.is_fixed());
        let drv_path = self.drv_path.clone();
        vec![job(move |env| {
            if check_impure_inputs && env.settings.impure_derivations {
                let sd = env.store.store_dir();
                for input in drv.input_drvs.keys() {
                    let impure = env
                        .store
                        .read_derivation(input)
                        .ok()
                        .and_then(|d| d.derivation_type().ok())
                        == Some(DerivationType::Impure);
                    if impure {
                        return DrvJobResult::InvalidSrcs(Err(format!(
                            "pure derivation '{}' depends on impure derivation '{}'",
                            sd.print(&drv_path),
                            sd.print(input)
                        )));
                    }
                }
            }
            let srcs: Vec<StorePath> = drv.input_srcs.iter().cloned().collect();
            DrvJobResult::InvalidSrcs(
                env.store
                    .query_valid_paths(&srcs)
                    .map(|valid| srcs.into_iter().filter(|s| !valid.contains(s)).collect())
                    .map_err(|e| e.to_string()),
            )
        })]
    }

    fn try_to_build(&mut self) -> Vec<Effect> {
        self.state = State::Locking;
        let Some(drv) = self.drv.clone() else {
            return self.fatal("derivation not loaded".into());
        };
        let p = self.drv_path.clone();
        let hashes = self.output_hashes.clone();
        let repair = self.mode == BuildMode::Repair;
        vec![job(move |env| {
            DrvJobResult::Locked(lock_outputs(env, &p, &drv, &hashes, repair))
        })]
    }

    fn can_build_locally(&self, ctx: &GoalCtx) -> bool {
        let Some(drv) = &self.drv else { return false };
        let s = ctx.settings;
        (drv.system == s.system || s.extra_platforms.contains(&drv.system) || drv.is_builtin())
            && required_features(drv).is_subset(&s.system_features)
    }

    fn after_locked(&mut self, ctx: &GoalCtx) -> Vec<Effect> {
        let Some(drv) = self.drv.clone() else {
            return self.fatal("derivation not loaded".into());
        };
        let prefer_local = drv.env.get("preferLocalBuild").is_some_and(|v| v == "1");
        let build_locally = (self.mode != BuildMode::Normal
            || (prefer_local && self.can_build_locally(ctx)))
            && ctx.settings.max_jobs != 0;
        if !build_locally && ctx.hook_enabled && !drv.is_builtin() {
            self.state = State::AwaitHookReply;
            let mut features = required_features(&drv);
            if !self.drv_type.is_some_and(|t| t.has_known_output_paths()) {
                features.insert("ca-derivations".into());
            }
            return vec![Effect::HookTry {
                am_willing: self.have_slot,
                system: drv.system.clone(),
                drv_path: self.drv_path.clone(),
                required_features: features,
            }];
        }
        self.try_local_build(ctx)
    }

    fn try_local_build(&mut self, ctx: &GoalCtx) -> Vec<Effect> {
        let Some(drv) = self.drv.clone() else {
            return self.fatal("derivation not loaded".into());
        };
        if !self.have_slot {
            if ctx.settings.max_jobs == 0 {
                return self.fatal(NO_BUILD_SLOTS.into());
            }
            self.locks = None;
            self.state = State::AwaitBuildSlot;
            return vec![Effect::AcquireBuildSlot];
        }
        if !self.can_build_locally(ctx) {
            let fmt_set =
                |s: &BTreeSet<String>| s.iter().map(String::as_str).collect::<Vec<_>>().join(", ");
            let msg = format!(
                "a '{}' with features {{{}}} is required to build '{}', but I am a '{}' with features {{{}}}",
                drv.system,
                fmt_set(&required_features(&drv)),
                self.p(ctx),
                ctx.settings.system,
                fmt_set(&ctx.settings.system_features)
            );
            return self.fatal(msg);
        }
        self.state = State::BuildingLocally;
        self.started = true;
        self.start_time = now();
        let output_paths = drv
            .outputs
            .iter()
            .filter_map(|(n, o)| Some((n.clone(), o.path()?.clone())))
            .collect();
        // A local build produces every output (Nix builds them all and `done`
        // restricts the result to the wanted ones).
        let wanted_outputs = drv.output_names();
        vec![
            Effect::BuildStarted { machine: None },
            Effect::RunLocalBuild(LocalBuildRequest {
                drv_path: self.drv_path.clone(),
                drv,
                output_paths,
                wanted_outputs,
                input_closure: self.input_closure.clone(),
                mode: self.mode,
                keep_failed: ctx.settings.keep_failed,
            }),
        ]
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
    fn post_build(&mut self, ctx: &GoalCtx) -> Vec<Effect> {
        self.state = State::PostBuildHook;
        let hook = ctx.settings.post_build_hook.clone();
        let drv_path = ctx.store_dir.print(&self.drv_path);
        let mut outs: Vec<String> = self
            .built
            .values()
            .map(|p| ctx.store_dir.print(p))
            .collect();
        outs.sort();
        // Impure outputs get no realisation: every impure output's hash modulo is
        // `sha256("impure")`, so one would stand for all of them (Nix 2.8 registers
        // none either).
        let realisations: Vec<Realisation> =
            if ctx.settings.ca_derivations && self.drv_type != Some(DerivationType::Impure) {
                self.built_realisations()
            } else {
                Vec::new()
            };
        vec![job(move |env| {
            for r in &realisations {
                if let Err(e) = env.store.register_realisation(r) {
                    return DrvJobResult::PostBuildHook(Err(e.to_string()));
                }
            }
            DrvJobResult::PostBuildHook(match hook {
                Some(hook) => run_post_build_hook(&hook, &drv_path, &outs.join(" ")),
                None => Ok(()),
            })
        })]
    }

    /// `done` with the builder's result (its times and build count win when set).
    fn finish_with(&mut self, mut r: BuildResult, ctx: &GoalCtx) -> Vec<Effect> {
        let mut fx = if r.success() {
            self.done_success(r.status, ctx)
        } else {
            let msg = std::mem::take(&mut r.error_msg);
            self.done_failure(r.status, msg)
        };
        if let Some(Effect::Done(o)) = fx.last_mut() {
            if r.times_built > 0 {
                o.result.times_built = r.times_built;
            }
            if r.start_time != 0 {
                o.result.start_time = r.start_time;
            }
            if r.stop_time != 0 {
                o.result.stop_time = r.stop_time;
            }
            o.result.is_non_deterministic = r.is_non_deterministic;
        }
        fx
    }

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
                o.result.built_outputs.insert(
                    id.clone(),
                    Realisation {
                        id,
                        out_path: p.clone(),
                        signatures: BTreeSet::new(),
                        dependent_realisations: BTreeMap::new(),
                    },
                );
            }
        }
        o.outputs = paths;
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
}

/// What Nix 2.8 appends to `builder for '…' failed …` when the log is not echoed
/// (`-Q`/`--no-build-output`): the last lines of the log.
pub fn log_tail_suffix(drv: &str, tail: &[String]) -> String {
    let mut s = format!(";\nlast {} log lines:\n", tail.len());
    for l in tail {
        s.push_str("> ");
        s.push_str(l);
        s.push('\n');
    }
    s.push_str(&format!("For full logs, run 'nix log {drv}'."));
    s
}

/// Nix 2.8's error when max-jobs is 0 and no hook builds.
pub const NO_BUILD_SLOTS: &str = "unable to start any build; either increase '--max-jobs' or enable remote builds.\nhttps://nixos.org/manual/nix/stable/advanced-topics/distributed-builds.html";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn job(f: impl FnOnce(&JobEnv) -> DrvJobResult + Send + 'static) -> Effect {
    Effect::Blocking(Box::new(move |env: &JobEnv| Event::Drv(Box::new(f(env)))))
}

/// `requiredSystemFeatures`, split on whitespace.
pub fn required_features(drv: &Derivation) -> BTreeSet<String> {
    drv.env
        .get("requiredSystemFeatures")
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Nix's `checkPathValidity`: each output's known path and whether it is valid (in
/// repair mode: whether its contents match the registered NAR hash).
pub fn check_validity(
    env: &JobEnv,
    drv_path: &StorePath,
    drv: &Derivation,
    hashes: &BTreeMap<String, Hash>,
    repair: bool,
) -> Result<BTreeMap<String, OutputState>, String> {
    let (store, ca) = (&*env.store, env.settings.ca_derivations);
    // An impure derivation has no valid outputs, ever: it is built every time, and
    // the hash its outputs share (`sha256("impure")`) names no realisation.
    if matches!(drv.derivation_type(), Ok(DerivationType::Impure)) {
        return Ok(drv
            .outputs
            .keys()
            .map(|name| {
                (
                    name.clone(),
                    OutputState {
                        path: None,
                        valid: false,
                    },
                )
            })
            .collect());
    }
    let e = |e: drover::store::StoreError| e.to_string();
    // Nix's `haveDerivation`: the outputs whose paths are known are temporary roots
    // before anything checks, builds or substitutes them.
    let known: Vec<StorePath> = drv
        .outputs
        .values()
        .filter_map(|o| o.path().cloned())
        .collect();
    store.add_temp_roots(&known).map_err(e)?;
    let mut db_outputs: Option<BTreeMap<String, StorePath>> = None;
    let mut res = BTreeMap::new();
    for (name, out) in &drv.outputs {
        let mut path = out.path().cloned();
        if path.is_none() {
            if ca {
                if let Some(h) = hashes.get(name) {
                    let id = DrvOutput {
                        drv_hash: h.clone(),
                        output: name.clone(),
                    };
                    if let Some(r) = store.query_realisation(&id).map_err(e)? {
                        path = Some(r.out_path);
                    }
                }
            }
            if path.is_none() && store.is_valid_path(drv_path).map_err(e)? {
                if db_outputs.is_none() {
                    db_outputs = Some(store.query_derivation_outputs(drv_path).map_err(e)?);
                }
                path = db_outputs.as_ref().and_then(|m| m.get(name).cloned());
            }
        }
        let valid = match &path {
            Some(p) => {
                store.add_temp_root(p).map_err(e)?;
                let v = store.is_valid_path(p).map_err(e)?;
                if v && repair {
                    env.contents.good(store, p)?
                } else {
                    v
                }
            }
            None => false,
        };
        if let (Some(p), true, true, DerivationOutput::InputAddressed { .. }) =
            (&path, valid, ca, out)
        {
            // A valid output without a realisation gets one for its static path.
            if let Some(h) = hashes.get(name) {
                let id = DrvOutput {
                    drv_hash: h.clone(),
                    output: name.clone(),
                };
                if store.query_realisation(&id).ok().flatten().is_none() {
                    let _ = store.register_realisation(&Realisation {
                        id,
                        out_path: p.clone(),
                        signatures: BTreeSet::new(),
                        dependent_realisations: BTreeMap::new(),
                    });
                }
            }
        }
        res.insert(name.clone(), OutputState { path, valid });
    }
    Ok(res)
}

/// The lock files of the outputs: real paths of outputs whose path the derivation
/// fixes, `<drv>.<output>` for the others (floating CA, deferred) — even when a
/// realisation already names their path, as Nix's `outputsAndOptPaths` does: the
/// registration of a CA output locks its final path itself, so holding that lock
/// here would deadlock when one output of a multi-output CA derivation is valid.
/// Locks without waiting; re-checks validity under the lock and removes invalid
/// leftovers of known outputs.
fn lock_outputs(
    env: &JobEnv,
    drv_path: &StorePath,
    drv: &Derivation,
    hashes: &BTreeMap<String, Hash>,
    repair: bool,
) -> Result<LockOutcome, String> {
    let store = &env.store;
    let mut lock_paths = BTreeSet::new();
    for (name, o) in &drv.outputs {
        match o.path() {
            Some(p) => lock_paths.insert(store.real_path(p)),
            None => {
                let mut s = store.real_path(drv_path).into_os_string();
                s.push(format!(".{name}"));
                lock_paths.insert(PathBuf::from(s))
            }
        };
    }
    let locks = match PathLocks::try_lock(&lock_paths).map_err(|e| e.to_string())? {
        Ok(l) => l,
        Err(busy) => return Ok(LockOutcome::Busy(busy)),
    };
    let outputs = check_validity(env, drv_path, drv, hashes, repair)?;
    for o in outputs.values() {
        if let (Some(p), false) = (&o.path, o.valid) {
            if !store.is_valid_path(p).map_err(|e| e.to_string())? {
                let real = store.real_path(p);
                if let Ok(m) = std::fs::symlink_metadata(&real) {
                    let r = if m.is_dir() {
                        std::fs::remove_dir_all(&real)
                    } else {
                        std::fs::remove_file(&real)
                    };
                    r.map_err(|e| format!("deleting '{}': {e}", real.display()))?;
                }
            }
        }
    }
    Ok(LockOutcome::Locked { locks, outputs })
}

/// Resolves a derivation against the built input outputs and writes it to the store.
fn resolve_and_write(
    env: &JobEnv,
    drv_path: &StorePath,
    drv: &Derivation,
    known: &BTreeMap<(StorePath, String), StorePath>,
) -> Result<Option<StorePath>, String> {
    let store = &env.store;
    let name = name_from_drv_path(drv_path).map_err(|e| e.to_string())?;
    let resolved = drv
        .try_resolve(store.store_dir(), name, |d, o| {
            known.get(&(d.clone(), o.to_owned())).cloned().or_else(|| {
                store
                    .query_derivation_outputs(d)
                    .ok()
                    .and_then(|m| m.get(o).cloned())
            })
        })
        .map_err(|e| e.to_string())?;
    let Some(resolved) = resolved else {
        return Ok(None);
    };
    let bytes = resolved.to_aterm_bytes(store.store_dir());
    let p = store
        .add_text_to_store(&format!("{name}.drv"), &bytes, &resolved.drv_references())
        .map_err(|e| e.to_string())?;
    Ok(Some(p))
}

/// The closure of the inputs (for reference scanning) and the direct inputs (for the
/// hook: input sources and used outputs of input derivations).
fn input_paths(
    store: &LocalStore,
    drv_path: &StorePath,
    drv: &Derivation,
    known: &BTreeMap<(StorePath, String), StorePath>,
) -> Result<(StorePathSet, StorePathSet), String> {
    let sd = store.store_dir();
    let mut direct: StorePathSet = drv.input_srcs.clone();
    for (d, outs) in &drv.input_drvs {
        let mut map: Option<BTreeMap<String, StorePath>> = None;
        for o in outs {
            let p = match known.get(&(d.clone(), o.clone())) {
                Some(p) => p.clone(),
                None => {
                    if map.is_none() {
                        map = Some(store.query_derivation_outputs(d).unwrap_or_default());
                    }
                    map.as_ref().and_then(|m| m.get(o).cloned()).ok_or_else(|| {
                        format!(
                            "derivation '{}' requires non-existent output '{o}' from input derivation '{}'",
                            sd.print(drv_path),
                            sd.print(d)
                        )
                    })?
                }
            };
            direct.insert(p);
        }
    }
    let v: Vec<StorePath> = direct.iter().cloned().collect();
    // The inputs are in use from now on: roots before their closure is read (the
    // collector keeps the closure of a root), and the closure itself too.
    store.add_temp_roots(&v).map_err(|e| e.to_string())?;
    let closure = store.compute_closure(&v).map_err(|e| e.to_string())?;
    let c: Vec<StorePath> = closure.iter().cloned().collect();
    store.add_temp_roots(&c).map_err(|e| e.to_string())?;
    Ok((closure, direct))
}

/// Runs `post-build-hook` with `DRV_PATH` and `OUT_PATHS`; a failure is an error that
/// aborts the run (Nix's `ExecError`), the outputs staying registered.
fn run_post_build_hook(hook: &str, drv_path: &str, out_paths: &str) -> Result<(), String> {
    let status = std::process::Command::new(hook)
        .env("DRV_PATH", drv_path)
        .env("OUT_PATHS", out_paths)
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("executing '{hook}': {e}"))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(n) => Err(format!("program '{hook}' failed with exit code {n}")),
        None => Err(format!("program '{hook}' failed due to signal")),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use super::*;
    use crate::goal::test_support::*;
    use crate::goal::WaiteeResult;
    use crate::messages::LocalBuildFinished;
    use crate::substituter::{FakeFault, InMemorySubstituter, Substituter};

    fn all(p: &StorePath) -> DerivationGoal {
        DerivationGoal::new(p.clone(), OutputsSpec::All, BuildMode::Normal)
    }

    fn step(h: &Harness, g: &mut DerivationGoal, ev: Event) -> String {
        show(&h.drive(|e, c| g.handle(e, c), ev, false))
    }

    fn step_hook(h: &Harness, g: &mut DerivationGoal, ev: Event) -> String {
        show(&h.drive(|e, c| g.handle(e, c), ev, true))
    }

    fn built(g: &DerivationGoal, ok: bool) -> Event {
        Event::LocalBuildFinished(LocalBuildFinished {
            id: 1,
            result: if ok {
                BuildResult::new(BuildStatus::Built)
            } else {
                BuildResult::failure(BuildStatus::PermanentFailure, "builder failed")
            },
            hash_mismatch: false,
            outputs: g
                .drv
                .as_ref()
                .map(|d| {
                    d.outputs
                        .iter()
                        .filter_map(|(n, o)| Some((n.clone(), o.path()?.clone())))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    #[test]
    fn already_valid() {
        let h = Harness::new(vec![]);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        h.ts.make_valid(&d);
        let mut g = all(&d);
        let fx = step(&h, &mut g, Event::Start);
        assert_eq!(fx, "[Done(Success, AlreadyValid)]");
    }

    #[test]
    fn missing_drv_is_substituted_first_and_fails_as_missing() {
        let h = Harness::new(vec![]);
        let sd = h.ts.store.store_dir();
        let d = sd
            .parse(&format!("{}/{}-nope.drv", sd.as_str(), "a".repeat(32)))
            .unwrap();
        let mut g = all(&d);
        let fx = step(&h, &mut g, Event::Start);
        assert!(fx.starts_with("[WaitFor([Substitution"), "{fx}");
        assert_eq!(g.state_name(), "getDerivation");
        let req = GoalRequest::Substitution {
            path: d.clone(),
            repair: false,
        };
        step(&h, &mut g, waitee(req, ExitCode::NoSubstituters));
        let fx = step(&h, &mut g, Event::WaiteesDone);
        assert!(
            fx.contains("Done(Failed, MiscFailure : cannot build missing derivation"),
            "{fx}"
        );
    }

    #[test]
    fn check_and_repair_always_substitute_the_drv_first() {
        let h = Harness::new(vec![]);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        for mode in [BuildMode::Check, BuildMode::Repair] {
            let mut g = DerivationGoal::new(d.clone(), OutputsSpec::All, mode);
            let fx = step(&h, &mut g, Event::Start);
            assert!(fx.starts_with("[WaitFor([Substitution"), "{fx}");
        }
    }

    #[test]
    fn check_mode_needs_valid_outputs() {
        let h = Harness::new(vec![]);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let mut g = DerivationGoal::new(d, OutputsSpec::All, BuildMode::Check);
        step(&h, &mut g, Event::Start);
        let fx = step(&h, &mut g, Event::WaiteesDone);
        assert_eq!(fx, "[WaitFor([])]");
        let fx = step(&h, &mut g, Event::WaiteesDone);
        assert!(
            fx.contains("are not valid, so checking is not possible"),
            "{fx}"
        );
    }

    #[test]
    fn wanted_output_must_exist() {
        let h = Harness::new(vec![]);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let mut g = DerivationGoal::new(d, OutputsSpec::name("dev"), BuildMode::Normal);
        let fx = step(&h, &mut g, Event::Start);
        assert!(fx.contains("does not have wanted outputs 'dev'"), "{fx}");
    }

    #[test]
    fn full_local_build_path() {
        let h = Harness::new(vec![]);
        let a = h.ts.add_drv("a", &["out"], &[], &[]);
        let b = h.ts.add_drv("b", &["out"], &[&a], &[]);
        let mut g = all(&b);
        // haveDerivation: no substituters → nothing to wait for.
        assert_eq!(step(&h, &mut g, Event::Start), "[WaitFor([])]");
        assert_eq!(g.state_name(), "outputsSubstitutionTried");
        // gaveUpOnSubstitution: the input derivation.
        let fx = step(&h, &mut g, Event::WaiteesDone);
        assert!(fx.starts_with("[WaitFor([Derivation"), "{fx}");
        assert_eq!(g.state_name(), "gaveUpOnSubstitution");
        h.ts.make_valid(&a);
        let mut o = outcome(ExitCode::Success);
        o.outputs.insert("out".into(), h.ts.output(&a, "out"));
        let req = GoalRequest::Derivation {
            drv_path: a.clone(),
            outputs: OutputsSpec::name("out"),
            mode: BuildMode::Normal,
        };
        step(
            &h,
            &mut g,
            Event::WaiteeDone(WaiteeResult {
                request: req,
                outcome: o,
            }),
        );
        // inputsRealised → tryToBuild → no hook → tryLocalBuild wants a slot.
        assert_eq!(step(&h, &mut g, Event::WaiteesDone), "[AcquireBuildSlot]");
        assert_eq!(g.state_name(), "tryLocalBuild");
        assert!(g.input_closure.contains(&h.ts.output(&a, "out")));
        let fx = step(&h, &mut g, Event::SlotGranted);
        assert!(
            fx.starts_with("[BuildStarted(None), RunLocalBuild("),
            "{fx}"
        );
        assert!(g.is_building_locally());
        crate::testing::write_outputs(
            &h.ts.store,
            &b,
            &[("out".to_string(), h.ts.output(&b, "out"))].into(),
        )
        .unwrap();
        let ev = built(&g, true);
        let fx = step(&h, &mut g, ev);
        assert_eq!(fx, "[ReleaseBuildSlot, Done(Success, Built)]");
        // Lock files are deleted after a successful build.
        let mut lock =
            h.ts.store
                .real_path(&h.ts.output(&b, "out"))
                .into_os_string();
        lock.push(".lock");
        assert!(!std::path::Path::new(&lock).exists());
    }

    #[test]
    fn failed_inputs_give_dependency_failed() {
        let h = Harness::new(vec![]);
        let a = h.ts.add_drv("a", &["out"], &[], &[]);
        let a2 = h.ts.add_drv("a2", &["out"], &[], &[]);
        let b = h.ts.add_drv("b", &["out"], &[&a, &a2], &[]);
        let mut g = all(&b);
        step(&h, &mut g, Event::Start);
        step(&h, &mut g, Event::WaiteesDone);
        for d in [&a, &a2] {
            let req = GoalRequest::Derivation {
                drv_path: d.clone(),
                outputs: OutputsSpec::name("out"),
                mode: BuildMode::Normal,
            };
            step(&h, &mut g, waitee(req, ExitCode::Failed));
        }
        let fx = step(&h, &mut g, Event::WaiteesDone);
        assert!(
            fx.contains(&format!(
                "DependencyFailed : 2 dependencies of derivation '{}' failed to build",
                h.ts.store.store_dir().print(&b)
            )),
            "{fx}"
        );
    }

    fn subst_harness(fault: Option<FakeFault>, fallback: bool) -> (Harness, StorePath) {
        let s = Arc::new(InMemorySubstituter::new("mem://a", 1));
        let h = Harness::with(vec![s.clone() as Arc<dyn Substituter>], |st| {
            st.fallback = fallback
        });
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let out = h.ts.output(&d, "out");
        s.add_file(out.clone(), b"x", Default::default());
        if let Some(f) = fault {
            s.set_fault(out, f);
        }
        (h, d)
    }

    #[test]
    fn outputs_substituted() {
        let (h, d) = subst_harness(None, false);
        let mut g = all(&d);
        let fx = step(&h, &mut g, Event::Start);
        assert!(fx.starts_with("[WaitFor([Substitution"), "{fx}");
        let out = h.ts.output(&d, "out");
        let s = h.env.substituters[0].clone();
        s.copy_into(&out, &h.ts.store, Default::default(), &Default::default())
            .unwrap();
        let req = GoalRequest::Substitution {
            path: out,
            repair: false,
        };
        step(&h, &mut g, waitee(req, ExitCode::Success));
        assert_eq!(
            step(&h, &mut g, Event::WaiteesDone),
            "[Done(Success, Substituted)]"
        );
    }

    #[test]
    fn real_substitution_failure_without_fallback() {
        let (h, d) = subst_harness(Some(FakeFault::CopyFails), false);
        let mut g = all(&d);
        step(&h, &mut g, Event::Start);
        let req = GoalRequest::Substitution {
            path: h.ts.output(&d, "out"),
            repair: false,
        };
        step(&h, &mut g, waitee(req.clone(), ExitCode::Failed));
        let fx = step(&h, &mut g, Event::WaiteesDone);
        assert!(
            fx.contains("TransientFailure : some substitutes for the outputs of derivation"),
            "{fx}"
        );
        // Nix's error printer chomps the trailing space its format string has.
        assert!(
            fx.contains("try '--fallback' to build derivation from source)"),
            "{fx}"
        );
        // With --fallback: build instead.
        let (h, d) = subst_harness(Some(FakeFault::CopyFails), true);
        let mut g = all(&d);
        step(&h, &mut g, Event::Start);
        step(&h, &mut g, waitee(req, ExitCode::Failed));
        let fx = step(&h, &mut g, Event::WaiteesDone);
        assert_eq!(fx, "[WaitFor([])]");
        assert_eq!(g.state_name(), "gaveUpOnSubstitution");
    }

    #[test]
    fn incomplete_closure_retries_substitution_after_inputs() {
        let (h, d) = subst_harness(None, false);
        let mut g = all(&d);
        step(&h, &mut g, Event::Start);
        let req = GoalRequest::Substitution {
            path: h.ts.output(&d, "out"),
            repair: false,
        };
        step(&h, &mut g, waitee(req, ExitCode::IncompleteClosure));
        assert_eq!(step(&h, &mut g, Event::WaiteesDone), "[WaitFor([])]");
        // Inputs realised: substitution is tried once more (haveDerivation).
        let fx = step(&h, &mut g, Event::WaiteesDone);
        assert!(fx.starts_with("[WaitFor([Substitution"), "{fx}");
        assert_eq!(g.state_name(), "outputsSubstitutionTried");
    }

    #[test]
    fn added_outputs_restart_have_derivation() {
        let s = Arc::new(InMemorySubstituter::new("mem://a", 1));
        let h = Harness::new(vec![s as Arc<dyn Substituter>]);
        let d = h.ts.add_drv("m", &["out", "dev"], &[], &[]);
        let mut g = DerivationGoal::new(d.clone(), OutputsSpec::name("out"), BuildMode::Normal);
        let fx = step(&h, &mut g, Event::Start);
        assert_eq!(fx.matches("Substitution {").count(), 1, "{fx}");
        assert!(g.add_wanted_outputs(&OutputsSpec::name("dev")));
        step(
            &h,
            &mut g,
            waitee(
                GoalRequest::Substitution {
                    path: h.ts.output(&d, "out"),
                    repair: false,
                },
                ExitCode::NoSubstituters,
            ),
        );
        let fx = step(&h, &mut g, Event::WaiteesDone);
        assert_eq!(
            fx.matches("Substitution {").count(),
            2,
            "restarted for both: {fx}"
        );
        // Once building, added outputs do not restart; a done goal refuses.
        step(&h, &mut g, Event::WaiteesDone);
        assert_eq!(g.state_name(), "gaveUpOnSubstitution");
        assert!(g.add_wanted_outputs(&OutputsSpec::All));
        assert_eq!(g.need_restart, NeedRestart::BuildInProgress);
    }

    #[test]
    fn hook_is_asked_without_then_with_a_slot() {
        let h = Harness::new(vec![]);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let mut g = all(&d);
        step_hook(&h, &mut g, Event::Start);
        assert_eq!(step_hook(&h, &mut g, Event::WaiteesDone), "[WaitFor([])]");
        assert_eq!(
            step_hook(&h, &mut g, Event::WaiteesDone),
            "[HookTry(false)]"
        );
        assert_eq!(
            step_hook(&h, &mut g, Event::HookReply(HookReply::Decline)),
            "[AcquireBuildSlot]"
        );
        assert_eq!(step_hook(&h, &mut g, Event::SlotGranted), "[HookTry(true)]");
        let fx = step_hook(&h, &mut g, Event::HookReply(HookReply::DeclinePermanently));
        assert!(
            fx.starts_with("[DisableHook, BuildStarted(None), RunLocalBuild("),
            "{fx}"
        );
        let ev = built(&g, false);
        let fx = step_hook(&h, &mut g, ev);
        assert_eq!(
            fx,
            "[ReleaseBuildSlot, Done(Failed, PermanentFailure : builder failed)]"
        );
    }

    #[test]
    fn hook_postpone_and_garbage() {
        let h = Harness::with(vec![], |s| s.max_jobs = 0);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let mut g = all(&d);
        step_hook(&h, &mut g, Event::Start);
        step_hook(&h, &mut g, Event::WaiteesDone);
        assert_eq!(
            step_hook(&h, &mut g, Event::WaiteesDone),
            "[HookTry(false)]"
        );
        let fx = step_hook(&h, &mut g, Event::HookReply(HookReply::Postpone));
        assert!(
            fx.contains("Message(waiting for a machine to build"),
            "{fx}"
        );
        assert!(fx.ends_with("WaitForAWhile]"), "{fx}");
        assert_eq!(step_hook(&h, &mut g, Event::Wake), "[HookTry(false)]");
        // max-jobs = 0 and the hook declines: Nix 2.8's run error.
        let fx = step_hook(&h, &mut g, Event::HookReply(HookReply::Decline));
        assert!(fx.starts_with("[Fatal(unable to start any build;"), "{fx}");
        let mut g = all(&d);
        step_hook(&h, &mut g, Event::Start);
        step_hook(&h, &mut g, Event::WaiteesDone);
        step_hook(&h, &mut g, Event::WaiteesDone);
        let fx = step_hook(
            &h,
            &mut g,
            Event::HookReply(HookReply::Error("bad hook reply 'x'".into())),
        );
        // Thrown out of the goal in Nix 2.8: the run ends.
        assert_eq!(fx, "[Fatal(bad hook reply 'x')]");
    }

    #[test]
    fn prefer_local_build_skips_the_hook() {
        let h = Harness::new(vec![]);
        let d =
            h.ts.add_drv("x", &["out"], &[], &[("preferLocalBuild", "1")]);
        let mut g = all(&d);
        step_hook(&h, &mut g, Event::Start);
        step_hook(&h, &mut g, Event::WaiteesDone);
        assert_eq!(
            step_hook(&h, &mut g, Event::WaiteesDone),
            "[AcquireBuildSlot]"
        );
    }

    #[test]
    fn lock_contention_waits_and_someone_beats_us() {
        let h = Harness::new(vec![]);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let out = h.ts.output(&d, "out");
        let lock = PathLocks::lock(&[h.ts.store.real_path(&out)].into()).unwrap();
        let mut g = all(&d);
        step(&h, &mut g, Event::Start);
        step(&h, &mut g, Event::WaiteesDone);
        let fx = step(&h, &mut g, Event::WaiteesDone);
        assert!(fx.starts_with("[Message(waiting for lock on"), "{fx}");
        assert!(fx.ends_with("WaitForAWhile]"), "{fx}");
        assert_eq!(g.state_name(), "tryToBuild");
        // Meanwhile the other process builds it.
        h.ts.make_valid(&d);
        drop(lock);
        assert_eq!(
            step(&h, &mut g, Event::Wake),
            "[Done(Success, AlreadyValid)]"
        );
    }

    #[test]
    fn invalid_leftovers_are_removed_before_building() {
        let h = Harness::new(vec![]);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let real = h.ts.store.real_path(&h.ts.output(&d, "out"));
        std::fs::write(&real, "junk").unwrap();
        let mut g = all(&d);
        step(&h, &mut g, Event::Start);
        step(&h, &mut g, Event::WaiteesDone);
        assert_eq!(step(&h, &mut g, Event::WaiteesDone), "[AcquireBuildSlot]");
        step(&h, &mut g, Event::SlotGranted);
        assert!(!real.exists());
    }

    #[test]
    fn post_build_hook_gets_drv_and_out_paths_and_its_failure_aborts() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("rec");
        let hook = dir.path().join("hook.sh");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$DRV_PATH $OUT_PATHS\" > {}\nexit ${{HOOK_EXIT:-0}}\n",
                rec.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        let hs = hook.display().to_string();
        let h = Harness::with(vec![], |s| s.post_build_hook = Some(hs.clone()));
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let mut g = all(&d);
        step(&h, &mut g, Event::Start);
        step(&h, &mut g, Event::WaiteesDone);
        step(&h, &mut g, Event::WaiteesDone);
        step(&h, &mut g, Event::SlotGranted);
        crate::testing::write_outputs(
            &h.ts.store,
            &d,
            &[("out".into(), h.ts.output(&d, "out"))].into(),
        )
        .unwrap();
        let ev = built(&g, true);
        assert_eq!(
            step(&h, &mut g, ev),
            "[ReleaseBuildSlot, Done(Success, Built)]"
        );
        let sd = h.ts.store.store_dir();
        assert_eq!(
            std::fs::read_to_string(&rec).unwrap().trim(),
            format!("{} {}", sd.print(&d), sd.print(&h.ts.output(&d, "out")))
        );
        // A failing hook is a run error.
        let bad = dir.path().join("bad.sh");
        std::fs::write(&bad, "#!/bin/sh\nexit 3\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bs = bad.display().to_string();
        let h = Harness::with(vec![], |s| s.post_build_hook = Some(bs.clone()));
        let d = h.ts.add_drv("y", &["out"], &[], &[]);
        let mut g = all(&d);
        step(&h, &mut g, Event::Start);
        step(&h, &mut g, Event::WaiteesDone);
        step(&h, &mut g, Event::WaiteesDone);
        step(&h, &mut g, Event::SlotGranted);
        h.ts.make_valid(&d);
        let ev = built(&g, true);
        let fx = step(&h, &mut g, ev);
        assert_eq!(
            fx,
            format!("[ReleaseBuildSlot, Fatal(program '{bs}' failed with exit code 3)]")
        );
    }

    #[test]
    fn repair_closure_rebuilds_corrupt_dependencies() {
        use drover::store::ValidPathInfo;
        let h = Harness::new(vec![]);
        let a = h.ts.add_drv("a", &["out"], &[], &[]);
        let b = h.ts.add_drv("b", &["out"], &[&a], &[]);
        let (ao, bo) = (h.ts.output(&a, "out"), h.ts.output(&b, "out"));
        let mut infos = Vec::new();
        for (p, d, refs) in [(&ao, &a, vec![]), (&bo, &b, vec![ao.clone()])] {
            let real = h.ts.store.real_path(p);
            std::fs::write(&real, p.to_string()).unwrap();
            let (hash, n) = drover::nar::nar_hash_of_path(&real).unwrap();
            let mut i = ValidPathInfo::new(p.clone(), hash, n);
            i.deriver = Some(d.clone());
            i.references = refs.into_iter().collect();
            infos.push(i);
        }
        h.ts.store.register_valid_paths(&infos).unwrap();
        let mut g = DerivationGoal::new(b.clone(), OutputsSpec::All, BuildMode::Repair);
        step(&h, &mut g, Event::Start);
        assert_eq!(step(&h, &mut g, Event::WaiteesDone), "[WaitFor([])]");
        // Everything intact: nothing to repair.
        assert_eq!(
            step(&h, &mut g, Event::WaiteesDone),
            "[Done(Success, AlreadyValid)]"
        );
        // Corrupt a's output: it is rebuilt in repair mode.
        std::fs::write(h.ts.store.real_path(&ao), "corrupt").unwrap();
        let mut g = DerivationGoal::new(b.clone(), OutputsSpec::All, BuildMode::Repair);
        step(&h, &mut g, Event::Start);
        step(&h, &mut g, Event::WaiteesDone);
        let fx = step(&h, &mut g, Event::WaiteesDone);
        assert!(fx.contains("found corrupted or missing path"), "{fx}");
        assert!(fx.contains("mode: Repair"), "{fx}");
        assert_eq!(g.state_name(), "closureRepaired");
        let req = GoalRequest::Derivation {
            drv_path: a.clone(),
            outputs: OutputsSpec::All,
            mode: BuildMode::Repair,
        };
        step(&h, &mut g, waitee(req, ExitCode::Failed));
        let fx = step(&h, &mut g, Event::WaiteesDone);
        assert!(fx.contains("could not be repaired"), "{fx}");
        // A corrupt own output is not valid in repair mode: it is rebuilt.
        std::fs::write(h.ts.store.real_path(&bo), "corrupt").unwrap();
        let mut g = DerivationGoal::new(b, OutputsSpec::All, BuildMode::Repair);
        step(&h, &mut g, Event::Start);
        step(&h, &mut g, Event::WaiteesDone);
        let fx = step(&h, &mut g, Event::WaiteesDone);
        assert!(fx.starts_with("[WaitFor([Derivation"), "{fx}");
        assert_eq!(g.state_name(), "gaveUpOnSubstitution");
    }

    #[test]
    fn hook_alarms_and_timeouts() {
        use crate::messages::{HookFinished, LogAlarm, LogSummary};
        let h = Harness::new(vec![]);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let cases = [
            (
                Some(LogAlarm::Timeout(std::time::Duration::from_secs(2))),
                None,
                "TimedOut : building of '",
                "!*' from .drv file timed out after 2 seconds",
            ),
            (
                Some(LogAlarm::Silent(std::time::Duration::from_secs(2))),
                None,
                "TimedOut : building of '",
                "timed out after 2 seconds of silence",
            ),
            (
                Some(LogAlarm::LogLimit(1000)),
                None,
                "LogLimitExceeded : building of",
                "killed after writing more than 1000 bytes of log output",
            ),
            (
                None,
                Some(101),
                "TimedOut : builder for",
                "failed with exit code 101",
            ),
        ];
        for (alarm, exit_code, a, b) in cases {
            let mut g = all(&d);
            g.state = State::BuildingRemotely;
            let fx = step(
                &h,
                &mut g,
                Event::HookFinished(HookFinished {
                    id: 1,
                    exit_code,
                    log: LogSummary::default(),
                    alarm,
                }),
            );
            assert!(fx.contains(a) && fx.contains(b), "{fx}");
        }
    }
}
