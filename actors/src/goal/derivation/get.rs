//! Getting the derivation (Nix's `getDerivation`, `loadDerivation`): in normal mode
//! the `.drv` is used when valid, else (and always in check and repair mode) it is
//! substituted first; a `.drv` no substituter had fails the goal with MiscFailure
//! `cannot build missing derivation '…'`. Loading reads it, computes its outputs'
//! hashes modulo (realisation ids) and refuses derivation types whose experimental
//! feature is off.

use super::*;

impl DerivationGoal {
    /// `getDerivation` and `loadDerivation`.
    pub(super) fn step_get(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect> {
        match (self.state, ev) {
            // getDerivation
            (State::Init, Event::Start) => {
                if self.mode == BuildMode::Normal {
                    self.state = State::CheckingDrv;
                    let p = self.drv_path.clone();
                    // One job: whether the `.drv` is valid, and if it is, its
                    // loading and the first validity check of its outputs.
                    vec![job(move |env| {
                        DrvJobResult::DrvValid(drv_valid_then_load(env, &p, BuildMode::Normal))
                    })]
                } else {
                    self.wait_for_drv()
                }
            }
            (State::CheckingDrv, Event::Drv(r)) => match *r {
                DrvJobResult::DrvValid(Ok(Some(l))) => self.loaded(l, ctx),
                DrvJobResult::DrvValid(Ok(None)) => self.wait_for_drv(),
                DrvJobResult::DrvValid(Err(e)) => self.fatal(e.to_string()),
                other => self.unexpected_job(other, ctx),
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
                DrvJobResult::Loaded(Ok(l)) => self.loaded(l, ctx),
                DrvJobResult::Loaded(Err(e)) => self.fatal(e.to_string()),
                other => self.unexpected_job(other, ctx),
            },
            (_, ev) => self.unexpected(&ev, ctx),
        }
    }

    /// The derivation is loaded: refuse types whose experimental feature is off,
    /// then `haveDerivation` (with the validity check the job made, if it did).
    fn loaded(&mut self, l: Loaded, ctx: &GoalCtx) -> Vec<Effect> {
        match l.drv.derivation_type() {
            Ok(t) => self.drv_type = Some(t),
            Err(e) => return self.fatal(e.to_string()),
        }
        if self.drv_type == Some(DerivationType::Impure) {
            if !ctx.settings.impure_derivations {
                return self
                    .fatal(MissingExperimentalFeature("impure-derivations".into()).to_string());
            }
        } else if !self.drv_type.is_some_and(|t| t.has_known_output_paths())
            && !ctx.settings.ca_derivations
        {
            return self.fatal(MissingExperimentalFeature("ca-derivations".into()).to_string());
        }
        self.drv = Some(l.drv);
        self.output_hashes = l.output_hashes;
        self.have_derivation_with(l.validity, ctx)
    }

    pub(super) fn wait_for_drv(&mut self) -> Vec<Effect> {
        self.state = State::AwaitDrvSubstitution;
        // Nix substitutes the `.drv` itself without repair, in every mode.
        vec![Effect::WaitFor(vec![GoalRequest::Substitution {
            path: self.drv_path.clone(),
            repair: false,
        }])]
    }

    pub(super) fn load(&mut self) -> Vec<Effect> {
        self.reset_counts();
        self.state = State::Loading;
        let (p, mode) = (self.drv_path.clone(), self.mode);
        vec![job(move |env| {
            DrvJobResult::Loaded(load_derivation(env, &p, mode))
        })]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::goal::derivation::test_util::*;

    #[test]
    fn output_hashes_that_cannot_be_computed_end_the_run() {
        let h = Harness::new(vec![]);
        let a = h.ts.add_drv("a", &["out"], &[], &[]);
        let b = h.ts.add_drv("b", &["out"], &[&a], &[]);
        std::fs::remove_file(h.ts.store.real_path(&a)).unwrap();
        let mut g = all(&b);
        let fx = step(&h, &mut g, Event::Start);
        let sd = h.ts.store.store_dir();
        assert!(
            fx.starts_with(&format!(
                "[Fatal(computing the output hashes of '{}': ",
                sd.print(&b)
            )),
            "{fx}"
        );
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
}
