//! Substituting the outputs (Nix's `haveDerivation`, `outputsSubstitutionTried`,
//! `repairClosure`, `closureRepaired`): all wanted outputs valid → AlreadyValid;
//! else substitution goals for the wanted outputs (path goals for known paths,
//! drv-output goals for floating ones). Afterwards: a real substituter failure
//! without `--fallback` → TransientFailure; an incomplete closure arms
//! `retrySubstitution`; outputs added meanwhile restart `haveDerivation`; all valid
//! → Substituted; check mode with invalid outputs is a run error; repair mode checks
//! the outputs' closure and repairs what is corrupt or missing.

use super::*;

impl DerivationGoal {
    /// `haveDerivation`, `outputsSubstitutionTried` and the repair of the closure.
    pub(super) fn step_substitute(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect> {
        match (self.state, ev) {
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
                DrvJobResult::Validity(_, Err(e)) => self.fatal(e.to_string()),
                other => self.unexpected_job(other, ctx),
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
                self.substitution_tried_job()
            }
            (State::SubstitutionTried, Event::Drv(r)) => match *r {
                DrvJobResult::SubstitutionTried(Ok(outs), srcs) => {
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
                        _ => self.gave_up_on_substitution_with(srcs, ctx),
                    }
                }
                DrvJobResult::SubstitutionTried(Err(e), _) => self.fatal(e.to_string()),
                other => self.unexpected_job(other, ctx),
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
                DrvJobResult::ClosureToRepair(Err(e)) => self.fatal(e.to_string()),
                other => self.unexpected_job(other, ctx),
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
            (_, ev) => self.unexpected(&ev, ctx),
        }
    }

    pub(super) fn have_derivation(&mut self) -> Vec<Effect> {
        self.reset_counts();
        if self.drv_type == Some(DerivationType::Impure) {
            return self.gave_up_on_substitution();
        }
        self.state = State::HaveDerivation;
        self.validity_job(Purpose::HaveDerivation)
    }

    /// `haveDerivation` with the validity check already made by the job that
    /// loaded the derivation, if it made it.
    pub(super) fn have_derivation_with(
        &mut self,
        validity: Option<ValidityResult>,
        ctx: &GoalCtx,
    ) -> Vec<Effect> {
        match validity {
            Some(r) if self.drv_type != Some(DerivationType::Impure) => {
                self.reset_counts();
                self.state = State::HaveDerivation;
                let ev = Event::Drv(Box::new(DrvJobResult::Validity(Purpose::HaveDerivation, r)));
                self.step_substitute(ev, ctx)
            }
            _ => self.have_derivation(),
        }
    }

    /// `outputsSubstitutionTried`'s validity check; when its outcome is to give up
    /// on substitution, the query of `gaveUpOnSubstitution` in the same job.
    fn substitution_tried_job(&self) -> Vec<Effect> {
        let Some(drv) = self.drv.clone() else {
            return vec![Effect::Fatal(
                GoalError::NotLoaded(self.drv_path.to_string()).to_string(),
            )];
        };
        let p = self.drv_path.clone();
        let hashes = self.output_hashes.clone();
        let (mode, wanted) = (self.mode, self.wanted.clone());
        let check_impure_inputs = self.check_impure_inputs();
        vec![job(move |env| {
            let validity = check_validity(env, &p, &drv, &hashes, mode == BuildMode::Repair);
            // The decision of the step that reads the result: check mode gives up
            // when every output is valid, the other modes when one is not.
            let gives_up = validity
                .as_ref()
                .is_ok_and(|outs| all_wanted_valid(outs, &wanted) == (mode == BuildMode::Check));
            let srcs = gives_up.then(|| invalid_srcs(env, &p, &drv, check_impure_inputs));
            DrvJobResult::SubstitutionTried(validity, srcs)
        })]
    }

    pub(super) fn validity_job(&self, purpose: Purpose) -> Vec<Effect> {
        let Some(drv) = self.drv.clone() else {
            return vec![Effect::Fatal(
                GoalError::NotLoaded(self.drv_path.to_string()).to_string(),
            )];
        };
        let p = self.drv_path.clone();
        let hashes = self.output_hashes.clone();
        let repair = self.mode == BuildMode::Repair;
        vec![job(move |env| {
            DrvJobResult::Validity(purpose, check_validity(env, &p, &drv, &hashes, repair))
        })]
    }

    pub(super) fn check_wanted_exist(&mut self, ctx: &GoalCtx) -> Option<Vec<Effect>> {
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

    pub(super) fn repair_closure(&mut self) -> Vec<Effect> {
        self.state = State::CheckingClosure;
        let own: Vec<StorePath> = self
            .outputs
            .iter()
            .filter(|(n, _)| self.wanted.contains(n))
            .filter_map(|(_, o)| o.path.clone())
            .collect();
        vec![job(move |env| {
            DrvJobResult::ClosureToRepair(closure_to_repair(env, &own))
        })]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::goal::derivation::test_util::*;

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
}
