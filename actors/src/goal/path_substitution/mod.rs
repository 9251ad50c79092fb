//! PathSubstitutionGoal: make one store path valid by copying it from a substituter
//! (Nix's `PathSubstitutionGoal`, spec §4.1).
//!
//! States: `init` (already valid → AlreadyValid) → `tryNext` (query the next
//! substituter's narinfo without a slot; none left → NoSubstituters, exit
//! `Failed` if some substituter really failed, else `NoSubstituters`) → wait for the
//! references' substitution goals → `referencesValid` (a failed reference →
//! DependencyFailed, exit `IncompleteClosure` when a reference merely had no
//! substitute) → `tryToRun` (take a substitution slot, copy) → `finished` (release the
//! slot; a gone NAR tries the next substituter without counting as a failure, another
//! error marks the substituter failed and tries the next; success → Substituted).

use drover::build_result::BuildStatus;
use drover::store_path::StorePath;

use super::{Effect, Event, ExitCode, GoalCtx, GoalOutcome, GoalRequest, JobEnv};
use crate::substituter::{SubstitutablePathInfo, SubstituterError};

/// Results of this goal's blocking jobs.
pub enum SubstJobResult {
    Validity(Result<bool, String>),
    Info(Result<Option<SubstitutablePathInfo>, SubstituterError>),
    Copied(Result<(), SubstituterError>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Init,
    CheckingValidity,
    QueryingInfo,
    AwaitReferences,
    AwaitSlot,
    Copying,
    Done,
}

/// The state machine of one path substitution.
pub struct PathSubstitutionGoal {
    pub path: StorePath,
    pub repair: bool,
    state: State,
    /// Index of the substituter being tried (the Worker's list is sorted by priority).
    next_sub: usize,
    current_sub: Option<usize>,
    substituter_failed: bool,
    nr_failed: u32,
    nr_no_substituters: u32,
    nr_incomplete_closure: u32,
}

impl PathSubstitutionGoal {
    pub fn new(path: StorePath, repair: bool) -> PathSubstitutionGoal {
        PathSubstitutionGoal {
            path,
            repair,
            state: State::Init,
            next_sub: 0,
            current_sub: None,
            substituter_failed: false,
            nr_failed: 0,
            nr_no_substituters: 0,
            nr_incomplete_closure: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// A short name of the state, for tests and debugging.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Init => "init",
            State::CheckingValidity => "init (checking validity)",
            State::QueryingInfo => "tryNext",
            State::AwaitReferences => "referencesValid",
            State::AwaitSlot => "tryToRun",
            State::Copying => "finished",
            State::Done => "done",
        }
    }

    pub fn handle(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect> {
        match (self.state, ev) {
            (State::Init, Event::Start) => {
                self.state = State::CheckingValidity;
                let path = self.path.clone();
                vec![Effect::Blocking(Box::new(move |env: &JobEnv| {
                    let _ = env.store.add_temp_root(&path);
                    Event::Subst(SubstJobResult::Validity(
                        env.store.is_valid_path(&path).map_err(|e| e.to_string()),
                    ))
                }))]
            }
            (State::CheckingValidity, Event::Subst(SubstJobResult::Validity(r))) => match r {
                Err(e) => self.fatal(e),
                Ok(true) if !self.repair => {
                    self.finish(GoalOutcome::success(BuildStatus::AlreadyValid))
                }
                Ok(_) => self.try_next(ctx),
            },
            (State::QueryingInfo, Event::Subst(SubstJobResult::Info(r))) => match r {
                Ok(None) => self.try_next(ctx),
                Err(SubstituterError::Disabled(_)) | Err(SubstituterError::Gone { .. })
                    if ctx.settings.fallback =>
                {
                    self.try_next(ctx)
                }
                Err(e) => {
                    if ctx.settings.fallback {
                        let mut fx = vec![Effect::Message(format!("error: {e}"))];
                        fx.extend(self.try_next(ctx));
                        fx
                    } else {
                        self.fatal(e.to_string())
                    }
                }
                Ok(Some(info)) => {
                    if info.path != self.path {
                        let mut fx = vec![Effect::Message(format!(
                            "asked for '{}' but got '{}'",
                            ctx.store_dir.print(&self.path),
                            ctx.store_dir.print(&info.path)
                        ))];
                        fx.extend(self.try_next(ctx));
                        return fx;
                    }
                    self.state = State::AwaitReferences;
                    let refs = info
                        .references
                        .iter()
                        .filter(|r| **r != self.path)
                        .map(|r| GoalRequest::Substitution {
                            path: r.clone(),
                            repair: false,
                        })
                        .collect();
                    vec![Effect::WaitFor(refs)]
                }
            },
            (State::AwaitReferences, Event::WaiteeDone(w)) => {
                match w.outcome.exit {
                    ExitCode::Success => {}
                    ExitCode::Failed => self.nr_failed += 1,
                    ExitCode::NoSubstituters => {
                        self.nr_failed += 1;
                        self.nr_no_substituters += 1
                    }
                    ExitCode::IncompleteClosure => {
                        self.nr_failed += 1;
                        self.nr_incomplete_closure += 1
                    }
                }
                vec![]
            }
            (State::AwaitReferences, Event::WaiteesDone) => {
                if self.nr_failed > 0 {
                    let exit = if self.nr_no_substituters > 0 || self.nr_incomplete_closure > 0 {
                        ExitCode::IncompleteClosure
                    } else {
                        ExitCode::Failed
                    };
                    return self.finish(GoalOutcome::failure(
                        exit,
                        BuildStatus::DependencyFailed,
                        format!(
                            "some references of path '{}' could not be realised",
                            ctx.store_dir.print(&self.path)
                        ),
                    ));
                }
                self.state = State::AwaitSlot;
                vec![Effect::AcquireSubstSlot]
            }
            (State::AwaitSlot, Event::SlotGranted) => {
                self.state = State::Copying;
                let i = self.current_sub.unwrap_or(0);
                let path = self.path.clone();
                let uri = Self::uri(ctx, i);
                vec![
                    Effect::SubstitutionStarted { uri },
                    Effect::Blocking(Box::new(move |env: &JobEnv| {
                        let r = match env.substituters.get(i) {
                            Some(s) => s.copy_into(&path, &env.store),
                            None => Err(SubstituterError::Failed("no such substituter".into())),
                        };
                        Event::Subst(SubstJobResult::Copied(r))
                    })),
                ]
            }
            (State::Copying, Event::Subst(SubstJobResult::Copied(r))) => {
                let mut fx = vec![Effect::ReleaseSubstSlot, Effect::SubstitutionStopped];
                match r {
                    Ok(()) => {
                        fx.extend(self.finish(GoalOutcome::success(BuildStatus::Substituted)))
                    }
                    Err(e) => {
                        if !matches!(e, SubstituterError::Gone { .. }) {
                            self.substituter_failed = true;
                        }
                        fx.push(Effect::Message(format!("error: {e}")));
                        fx.extend(self.try_next(ctx));
                    }
                }
                fx
            }
            _ => vec![],
        }
    }

    fn uri(ctx: &GoalCtx, _i: usize) -> String {
        ctx.settings
            .substituter_uris
            .get(_i)
            .cloned()
            .unwrap_or_default()
    }

    fn try_next(&mut self, ctx: &GoalCtx) -> Vec<Effect> {
        if self.next_sub >= ctx.n_substituters {
            let exit = if self.substituter_failed {
                ExitCode::Failed
            } else {
                ExitCode::NoSubstituters
            };
            return self.finish(GoalOutcome::failure(
                exit,
                BuildStatus::NoSubstituters,
                format!(
                    "path '{}' is required, but there is no substituter that can build it",
                    ctx.store_dir.print(&self.path)
                ),
            ));
        }
        let i = self.next_sub;
        self.next_sub += 1;
        self.current_sub = Some(i);
        self.state = State::QueryingInfo;
        let path = self.path.clone();
        vec![Effect::Blocking(Box::new(move |env: &JobEnv| {
            let r = match env.substituters.get(i) {
                Some(s) => s.query_path_info(&path),
                None => Ok(None),
            };
            Event::Subst(SubstJobResult::Info(r))
        }))]
    }

    fn finish(&mut self, outcome: GoalOutcome) -> Vec<Effect> {
        self.state = State::Done;
        vec![Effect::Done(outcome)]
    }

    fn fatal(&mut self, msg: String) -> Vec<Effect> {
        self.state = State::Done;
        vec![Effect::Fatal(msg)]
    }

    /// Whether a real substituter failure was seen (for the failed-substitutions count).
    pub fn substituter_failed(&self) -> bool {
        self.substituter_failed
    }
}
