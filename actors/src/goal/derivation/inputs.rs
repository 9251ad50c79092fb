//! Realising the inputs and resolving (Nix's `gaveUpOnSubstitution`,
//! `inputsRealised`, `resolvedFinished`): goals for the input derivations and the
//! invalid input sources; failed inputs → DependencyFailed `N dependencies of
//! derivation '…' failed to build`; the retry of substitution; floating-CA and
//! deferred derivations are resolved into a resolved goal whose outcome is this
//! goal's (AlreadyValid becoming ResolvesToAlreadyValid, realisations registered for
//! the original derivation); otherwise the input closure, then `tryToBuild`.

use super::*;

impl DerivationGoal {
    /// `gaveUpOnSubstitution`, `inputsRealised`, resolution and `resolvedFinished`.
    pub(super) fn step_inputs(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect> {
        match (self.state, ev) {
            // gaveUpOnSubstitution
            (State::CheckingInputSrcs, Event::Drv(r)) => match *r {
                DrvJobResult::InvalidSrcs(Ok(srcs)) => {
                    let Some(drv) = self.drv.clone() else {
                        return self.not_loaded();
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
                DrvJobResult::InvalidSrcs(Err(e)) => self.fatal(e.to_string()),
                other => self.unexpected_job(other, ctx),
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
                    return self.not_loaded();
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
                DrvJobResult::Resolved(Err(e)) => self.fatal(e.to_string()),
                other => self.unexpected_job(other, ctx),
            },
            (State::AwaitResolved, Event::WaiteeDone(w)) => {
                self.waitees.count(w.outcome.exit);
                self.build_result = Some(w.outcome.result.clone());
                self.built = w.outcome.outputs.to_map();
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
                // Impure derivations get no realisations (see `post_build`).
                let realisations = if self.drv_type.is_some_and(|t| t.is_pure()) {
                    self.built_realisations()
                } else {
                    Vec::new()
                };
                let fixed = self.drv_type.is_some_and(|t| t.is_fixed());
                let drv = self.drv.clone();
                // The run's own `secret-key-files` (a daemon client's), if any.
                let keys = ctx
                    .settings
                    .local_build
                    .as_ref()
                    .map(|r| r.build.secret_key_files.clone());
                self.state = State::RegisteringResolved;
                vec![job(move |env| {
                    DrvJobResult::RealisationsRegistered(match drv {
                        Some(drv) => register_resolved_realisations(
                            &env.store,
                            &drv,
                            fixed,
                            realisations,
                            keys.as_deref(),
                        ),
                        None => Ok(()),
                    })
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
                DrvJobResult::RealisationsRegistered(Err(e)) => self.fatal(e.to_string()),
                other => self.unexpected_job(other, ctx),
            },
            (State::ComputingInputs, Event::Drv(r)) => match *r {
                DrvJobResult::Inputs(Ok((closure, direct))) => {
                    self.input_closure = closure;
                    self.hook_inputs = direct;
                    self.try_to_build()
                }
                DrvJobResult::Inputs(Err(e)) => self.fatal(e.to_string()),
                other => self.unexpected_job(other, ctx),
            },
            (_, ev) => self.unexpected(&ev, ctx),
        }
    }

    /// With impure derivations enabled, a pure derivation (fixed-output ones
    /// aside) must not depend on an impure one.
    pub(super) fn check_impure_inputs(&self) -> bool {
        self.drv_type.is_some_and(|t| t.is_pure() && !t.is_fixed())
    }

    /// [`gave_up_on_substitution`](Self::gave_up_on_substitution) with the input
    /// sources already queried by the job that checked the outputs, if it did.
    pub(super) fn gave_up_on_substitution_with(
        &mut self,
        srcs: Option<InvalidSrcsResult>,
        ctx: &GoalCtx,
    ) -> Vec<Effect> {
        let Some(srcs) = srcs else {
            return self.gave_up_on_substitution();
        };
        self.need_restart = NeedRestart::BuildInProgress;
        self.input_drv_outputs.clear();
        self.reset_counts();
        self.state = State::CheckingInputSrcs;
        self.step_inputs(Event::Drv(Box::new(DrvJobResult::InvalidSrcs(srcs))), ctx)
    }

    pub(super) fn gave_up_on_substitution(&mut self) -> Vec<Effect> {
        self.need_restart = NeedRestart::BuildInProgress;
        self.input_drv_outputs.clear();
        self.reset_counts();
        self.state = State::CheckingInputSrcs;
        let Some(drv) = self.drv.clone() else {
            return self.not_loaded();
        };
        let check_impure_inputs = self.check_impure_inputs();
        let drv_path = self.drv_path.clone();
        vec![job(move |env| {
            DrvJobResult::InvalidSrcs(invalid_srcs(env, &drv_path, &drv, check_impure_inputs))
        })]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::goal::derivation::test_util::*;

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
                outcome: Arc::new(o),
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
}
