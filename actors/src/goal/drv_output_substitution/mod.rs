//! DrvOutputSubstitutionGoal: find the realisation of a content-addressed derivation
//! output in a substituter and make it valid locally (Nix 2.8's
//! `DrvOutputSubstitutionGoal`, src/libstore/build/drv-output-substitution-goal.cc).
//!
//! States: `init` (known locally → success) → `tryNext` (take a substitution slot and
//! query the next substituter; none left → exit `Failed` if one really failed, else
//! `NoSubstituters`) → `realisationFetched` (release the slot; an error marks the
//! substituter failed; a dependent realisation that conflicts with a local one is
//! ignored with a warning; otherwise wait for the dependencies' realisations and the
//! output path) → `outPathValid` (a failed dependency → IncompleteClosure/Failed,
//! without trying another substituter; else register the realisation → success).

use drover::build_result::BuildStatus;
use drover::realisation::{DrvOutput, Realisation};

use super::error::GoalError;
use super::{Effect, Event, ExitCode, GoalCtx, GoalOutcome, GoalRequest, JobEnv, WaiteeCounts};
use crate::substituter::SubstituterError;

/// Results of this goal's blocking jobs.
pub enum DrvOutJobResult {
    Known(Result<bool, GoalError>),
    /// The realisation found (if any), and a warning when it conflicts locally.
    Fetched(Result<Option<(Realisation, Option<String>)>, SubstituterError>),
    Registered(Result<(), GoalError>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Init,
    CheckingLocal,
    AwaitSlot,
    Querying,
    AwaitDependencies,
    Registering,
    Done,
}

pub struct DrvOutputSubstitutionGoal {
    pub id: DrvOutput,
    pub repair: bool,
    state: State,
    next_sub: usize,
    substituter_failed: bool,
    realisation: Option<Realisation>,
    waitees: WaiteeCounts,
}

impl DrvOutputSubstitutionGoal {
    pub fn new(id: DrvOutput, repair: bool) -> DrvOutputSubstitutionGoal {
        DrvOutputSubstitutionGoal {
            id,
            repair,
            state: State::Init,
            next_sub: 0,
            substituter_failed: false,
            realisation: None,
            waitees: WaiteeCounts::default(),
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Init | State::CheckingLocal => "init",
            State::AwaitSlot | State::Querying => "tryNext",
            State::AwaitDependencies => "outPathValid",
            State::Registering => "finished",
            State::Done => "done",
        }
    }

    pub fn substituter_failed(&self) -> bool {
        self.substituter_failed
    }

    pub fn handle(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect> {
        match (self.state, ev) {
            (State::Init, Event::Start) => {
                self.state = State::CheckingLocal;
                let id = self.id.clone();
                vec![Effect::Blocking(Box::new(move |env: &JobEnv| {
                    let r = env
                        .store
                        .query_realisation(&id)
                        .map(|r| r.is_some())
                        .map_err(GoalError::from);
                    Event::DrvOut(DrvOutJobResult::Known(r))
                }))]
            }
            (State::CheckingLocal, Event::DrvOut(DrvOutJobResult::Known(r))) => match r {
                Err(e) => self.finish_fatal(e.to_string()),
                Ok(true) => self.finish(GoalOutcome::success(BuildStatus::AlreadyValid)),
                Ok(false) => self.try_next(),
            },
            (State::AwaitSlot, Event::SlotGranted) => {
                if self.next_sub >= ctx.n_substituters {
                    let exit = if self.substituter_failed {
                        ExitCode::Failed
                    } else {
                        ExitCode::NoSubstituters
                    };
                    let mut fx = vec![Effect::ReleaseSubstSlot];
                    fx.extend(self.finish(GoalOutcome::failure(
                        exit,
                        BuildStatus::NoSubstituters,
                        format!("no substituter has a realisation for '{}'", self.id),
                    )));
                    return fx;
                }
                let i = self.next_sub;
                self.next_sub += 1;
                self.state = State::Querying;
                let id = self.id.clone();
                let sub = ctx.substituter(i);
                vec![
                    Effect::SubstitutionStarted {
                        uri: ctx
                            .settings
                            .substituter_uris
                            .get(i)
                            .cloned()
                            .unwrap_or_default(),
                        transfer: None,
                    },
                    Effect::Blocking(Box::new(move |env: &JobEnv| {
                        let Some(sub) = sub.get(env) else {
                            return Event::DrvOut(DrvOutJobResult::Fetched(Ok(None)));
                        };
                        let r = sub.query_realisation(&id).map(|r| {
                            r.map(|r| {
                                let warning = r
                                    .dependent_realisations
                                    .iter()
                                    .filter(|(dep, _)| **dep != id)
                                    .find_map(|(dep, remote)| {
                                        match env.store.query_realisation(dep) {
                                            Ok(Some(local)) if local.out_path != *remote => {
                                                Some(format!(
                                                "substituter '{}' has an incompatible realisation for '{}', ignoring.\nLocal:  {}\nRemote: {}",
                                                sub.uri(),
                                                dep,
                                                env.store.store_dir().print(&local.out_path),
                                                env.store.store_dir().print(remote)
                                            ))
                                            }
                                            _ => None,
                                        }
                                    });
                                (r, warning)
                            })
                        });
                        Event::DrvOut(DrvOutJobResult::Fetched(r))
                    })),
                ]
            }
            (State::Querying, Event::DrvOut(DrvOutJobResult::Fetched(r))) => {
                let mut fx = vec![Effect::ReleaseSubstSlot, Effect::SubstitutionStopped];
                match r {
                    Err(e) => {
                        self.substituter_failed = true;
                        fx.push(Effect::Message(format!("error: {e}")));
                        fx.extend(self.try_next());
                    }
                    Ok(None) => fx.extend(self.try_next()),
                    Ok(Some((_, Some(warning)))) => {
                        fx.push(Effect::Message(format!("warning: {warning}")));
                        fx.extend(self.try_next());
                    }
                    Ok(Some((r, None))) => {
                        let mut deps: Vec<GoalRequest> = r
                            .dependent_realisations
                            .keys()
                            .filter(|d| **d != self.id)
                            .map(|d| GoalRequest::DrvOutput {
                                id: d.clone(),
                                repair: self.repair,
                            })
                            .collect();
                        deps.push(GoalRequest::Substitution {
                            path: r.out_path.clone(),
                            repair: self.repair,
                        });
                        self.realisation = Some(r);
                        self.state = State::AwaitDependencies;
                        fx.push(Effect::WaitFor(deps));
                    }
                }
                fx
            }
            (State::AwaitDependencies, Event::WaiteeDone(w)) => {
                self.waitees.count(w.outcome.exit);
                vec![]
            }
            (State::AwaitDependencies, Event::WaiteesDone) => {
                if self.waitees.failed > 0 {
                    let exit = self.waitees.substitution_failure();
                    return self.finish(GoalOutcome::failure(
                        exit,
                        BuildStatus::DependencyFailed,
                        format!("some dependencies of '{}' could not be realised", self.id),
                    ));
                }
                self.state = State::Registering;
                let Some(r) = self.realisation.clone() else {
                    return self.finish_fatal("realisation vanished".into());
                };
                vec![Effect::Blocking(Box::new(move |env: &JobEnv| {
                    Event::DrvOut(DrvOutJobResult::Registered(
                        env.store.register_realisation(&r).map_err(GoalError::from),
                    ))
                }))]
            }
            (State::Registering, Event::DrvOut(DrvOutJobResult::Registered(r))) => match r {
                Ok(()) => {
                    let mut o = GoalOutcome::success(BuildStatus::Substituted);
                    if let Some(r) = &self.realisation {
                        o.outputs.insert(self.id.output.clone(), r.out_path.clone());
                    }
                    self.finish(o)
                }
                Err(e) => self.finish_fatal(e.to_string()),
            },
            (state, ev) => {
                let msg = GoalError::UnexpectedEvent {
                    goal: self.id.to_string(),
                    state: format!("{} ({state:?})", self.state_name()),
                    what: format!("event {}", ev.kind()),
                }
                .to_string();
                if state == State::Done {
                    log::error!("{msg}; ignored");
                    return vec![];
                }
                let mut fx = match state {
                    State::Querying => vec![Effect::ReleaseSubstSlot, Effect::SubstitutionStopped],
                    // Leave the queue: a slot granted later would be lost.
                    State::AwaitSlot => vec![Effect::ReleaseSubstSlot],
                    _ => vec![],
                };
                fx.extend(self.finish(GoalOutcome::failure(
                    ExitCode::Failed,
                    BuildStatus::MiscFailure,
                    msg,
                )));
                fx
            }
        }
    }

    fn try_next(&mut self) -> Vec<Effect> {
        self.state = State::AwaitSlot;
        vec![Effect::AcquireSubstSlot]
    }

    fn finish(&mut self, o: GoalOutcome) -> Vec<Effect> {
        self.state = State::Done;
        vec![Effect::Done(o)]
    }

    fn finish_fatal(&mut self, e: String) -> Vec<Effect> {
        self.state = State::Done;
        vec![Effect::Fatal(e)]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use drover::hash::HashAlgo;
    use drover::store_path::StorePath;

    use super::*;
    use crate::goal::test_support::*;
    use crate::substituter::{InMemorySubstituter, Substituter};

    fn id(n: &str) -> DrvOutput {
        DrvOutput {
            drv_hash: HashAlgo::Sha256.digest(n),
            output: "out".into(),
        }
    }

    fn path(h: &Harness, c: char, name: &str) -> StorePath {
        let sd = h.ts.store.store_dir();
        sd.parse(&format!(
            "{}/{}-{name}",
            sd.as_str(),
            c.to_string().repeat(32)
        ))
        .unwrap()
    }

    fn real(
        id: DrvOutput,
        out_path: StorePath,
        deps: BTreeMap<DrvOutput, StorePath>,
    ) -> Realisation {
        Realisation {
            id,
            out_path,
            signatures: BTreeSet::new(),
            dependent_realisations: deps,
        }
    }

    #[test]
    fn no_substituter_has_it() {
        let h = Harness::new(vec![Arc::new(InMemorySubstituter::new("mem://a", 1))]);
        let mut g = DrvOutputSubstitutionGoal::new(id("x"), false);
        let fx = h.drive(|e, c| g.handle(e, c), Event::Start, false);
        assert_eq!(show(&fx), "[AcquireSubstSlot]");
        let fx = h.drive(|e, c| g.handle(e, c), Event::SlotGranted, false);
        assert_eq!(
            show(&fx),
            "[SubstitutionStarted(mem://a), ReleaseSubstSlot, SubstitutionStopped, AcquireSubstSlot]"
        );
        let fx = h.drive(|e, c| g.handle(e, c), Event::SlotGranted, false);
        assert!(
            show(&fx).contains("ReleaseSubstSlot, Done(NoSubstituters"),
            "{fx:?}"
        );
    }

    #[test]
    fn fetch_wait_register_and_known_locally() {
        let s = Arc::new(InMemorySubstituter::new("mem://a", 1));
        let h = Harness::new(vec![s.clone() as Arc<dyn Substituter>]);
        let out = path(&h, 'c', "out");
        let dep_out = path(&h, 'd', "dep");
        let r = real(id("x"), out.clone(), [(id("dep"), dep_out.clone())].into());
        s.add_realisation(r);
        let mut g = DrvOutputSubstitutionGoal::new(id("x"), false);
        h.drive(|e, c| g.handle(e, c), Event::Start, false);
        let fx = h.drive(|e, c| g.handle(e, c), Event::SlotGranted, false);
        let shown = show(&fx);
        assert!(shown.contains("WaitFor([DrvOutput"), "{shown}");
        assert!(shown.contains("Substitution {"), "{shown}");
        assert_eq!(g.state_name(), "outPathValid");
        // Make the dependency and output valid, as the waitees would.
        s.add_file(out.clone(), b"o", Default::default());
        s.add_file(dep_out.clone(), b"d", Default::default());
        s.copy_into(&out, &h.ts.store, Default::default(), &Default::default())
            .unwrap();
        s.copy_into(
            &dep_out,
            &h.ts.store,
            Default::default(),
            &Default::default(),
        )
        .unwrap();
        h.ts.store
            .register_realisation(&real(id("dep"), dep_out, BTreeMap::new()))
            .unwrap();
        let fx = h.drive(|e, c| g.handle(e, c), Event::WaiteesDone, false);
        assert_eq!(show(&fx), "[Done(Success, Substituted)]");
        assert!(h.ts.store.query_realisation(&id("x")).unwrap().is_some());
        // Now known locally.
        let mut g = DrvOutputSubstitutionGoal::new(id("x"), false);
        let fx = h.drive(|e, c| g.handle(e, c), Event::Start, false);
        assert_eq!(show(&fx), "[Done(Success, AlreadyValid)]");
    }

    #[test]
    fn failed_dependency_does_not_try_the_next_substituter() {
        let s = Arc::new(InMemorySubstituter::new("mem://a", 1));
        let h = Harness::new(vec![s.clone() as Arc<dyn Substituter>]);
        let out = path(&h, 'c', "out");
        s.add_realisation(real(id("x"), out.clone(), BTreeMap::new()));
        let mut g = DrvOutputSubstitutionGoal::new(id("x"), false);
        h.drive(|e, c| g.handle(e, c), Event::Start, false);
        h.drive(|e, c| g.handle(e, c), Event::SlotGranted, false);
        let req = GoalRequest::Substitution {
            path: out,
            repair: false,
        };
        h.drive(
            |e, c| g.handle(e, c),
            waitee(req, ExitCode::NoSubstituters),
            false,
        );
        let fx = h.drive(|e, c| g.handle(e, c), Event::WaiteesDone, false);
        assert!(
            show(&fx).contains("Done(IncompleteClosure, DependencyFailed"),
            "{fx:?}"
        );
    }

    #[test]
    fn incompatible_dependent_realisation_is_ignored() {
        let s = Arc::new(InMemorySubstituter::new("mem://a", 1));
        let h = Harness::new(vec![s.clone() as Arc<dyn Substituter>]);
        let local = path(&h, 'g', "local");
        let remote = path(&h, 'f', "remote");
        s.add_file(local.clone(), b"l", Default::default());
        s.copy_into(&local, &h.ts.store, Default::default(), &Default::default())
            .unwrap();
        h.ts.store
            .register_realisation(&real(id("dep"), local, BTreeMap::new()))
            .unwrap();
        s.add_realisation(real(
            id("x"),
            path(&h, 'c', "out"),
            [(id("dep"), remote)].into(),
        ));
        let mut g = DrvOutputSubstitutionGoal::new(id("x"), false);
        h.drive(|e, c| g.handle(e, c), Event::Start, false);
        let fx = h.drive(|e, c| g.handle(e, c), Event::SlotGranted, false);
        let shown = show(&fx);
        assert!(
            shown.contains("has an incompatible realisation for"),
            "{shown}"
        );
        assert!(shown.ends_with("AcquireSubstSlot]"), "{shown}");
    }
}
