//! Finishing (Nix's `buildDone`, the post-build hook, `done`): a local build's
//! result or a hook build's exit is classified; a hook that exits 0 without the
//! outputs valid is the run error `some outputs are unexpectedly invalid`; after a
//! success realisations are recorded (with `ca-derivations`) and the post-build hook
//! runs (its failure is a run error); `done` reports the outcome.

use super::*;
use drover::build::done::{self, Builder, BuilderExit};

impl DerivationGoal {
    /// `buildDone`, the post-build hook and `done`.
    pub(super) fn step_finish(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect> {
        match (self.state, ev) {
            // buildDone (local)
            (State::BuildingLocally, Event::LocalBuildFinished(f)) => {
                let mut fx = self.release_slot();
                self.hash_mismatch |= f.hash_mismatch;
                // Only `--check` makes a difference a check mismatch (exit bit 8); a
                // round of `repeat` that differs is a plain failure (exit 1).
                if f.result.status == BuildStatus::NotDeterministic && self.mode == BuildMode::Check
                {
                    self.check_mismatch = true;
                }
                // (a round that differed without `enforce-determinism` was the last)
                if f.result.success()
                    && self.cur_round < self.nr_rounds
                    && !f.result.is_non_deterministic
                {
                    // The next round: unlock, and build again from tryToBuild.
                    self.cur_round += 1;
                    self.locks = None;
                    fx.extend(self.try_to_build());
                    return fx;
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
                // Classified as every build is (`drover::build::done`).
                let drv = self.p(ctx);
                let exit = BuilderExit::from_code(f.exit_code);
                let failure = match f.alarm {
                    Some(alarm) => Some(done::killed(
                        crate::local_builder::kill_reason(alarm),
                        &self.name(ctx),
                        &drv,
                    )),
                    None if exit.success() => None,
                    None => {
                        let sandboxed = self.drv_type.is_some_and(|t| t.is_sandboxed());
                        let tail = (!ctx.settings.log.echo).then_some(&f.log.tail[..]);
                        Some(done::failed_exit(
                            &drv,
                            exit,
                            Builder::Hook { sandboxed },
                            tail,
                        ))
                    }
                };
                match failure {
                    Some((status, msg)) => {
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
                DrvJobResult::Validity(_, Err(e)) => self.fatal(e.to_string()),
                other => self.unexpected_job(other, ctx),
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
                DrvJobResult::PostBuildHook(Err(e)) => self.fatal(e.to_string()),
                other => self.unexpected_job(other, ctx),
            },
            (_, ev) => self.unexpected(&ev, ctx),
        }
    }

    pub(super) fn post_build(&mut self, ctx: &GoalCtx) -> Vec<Effect> {
        self.state = State::PostBuildHook;
        let hook = ctx.settings.post_build_hook.clone();
        let print_logs = ctx.settings.log.echo;
        let drv_path = ctx.store_dir.print(&self.drv_path);
        // Nix 2.8's `buildDone` fills `OUT_PATHS` from `buildResult.builtOutputs`,
        // which only `done` sets, after the hook: a build's hook always sees it
        // empty (CLI and daemon alike), and scripts written against 2.8 see that.
        let outs = String::new();
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
            DrvJobResult::PostBuildHook(register_realisations(env, &realisations).and_then(|()| {
                match hook {
                    Some(hook) => run_post_build_hook(&hook, &drv_path, &outs, print_logs),
                    None => Ok(()),
                }
            }))
        })]
    }

    /// `done` with the builder's result (its times and build count win when set).
    pub(super) fn finish_with(&mut self, mut r: BuildResult, ctx: &GoalCtx) -> Vec<Effect> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::goal::derivation::test_util::*;

    #[test]
    fn post_build_hook_gets_drv_path_and_empty_out_paths_and_its_failure_aborts() {
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
        // `OUT_PATHS` empty, as Nix 2.8 passes it for a build.
        assert_eq!(
            std::fs::read_to_string(&rec).unwrap(),
            format!("{} \n", sd.print(&d))
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
    fn the_goal_is_named_by_the_outputs_it_was_made_for() {
        let h = Harness::new(vec![]);
        let d = h.ts.add_drv("x", &["out", "dev"], &[], &[]);
        let mut g = DerivationGoal::new(d.clone(), OutputsSpec::name("out"), BuildMode::Normal);
        assert!(g.add_wanted_outputs(&OutputsSpec::name("dev")));
        let ctx = h.ctx(false);
        let printed = h.ts.store.store_dir().print(&d);
        assert_eq!(
            g.name(&ctx),
            format!("building of '{printed}!out' from .drv file")
        );
        g.state = State::BuildingRemotely;
        let fx = step(
            &h,
            &mut g,
            Event::HookFinished(crate::messages::HookFinished {
                id: 1,
                exit_code: None,
                log: Default::default(),
                alarm: Some(crate::messages::LogAlarm::Silent(
                    std::time::Duration::from_secs(3),
                )),
            }),
        );
        assert!(
            fx.contains(&format!(
                "TimedOut : building of '{printed}!out' from .drv file timed out after 3 seconds of silence"
            )),
            "{fx}"
        );
    }

    #[test]
    fn a_failed_hook_build_shows_the_log_tail_when_the_log_was_not_echoed() {
        use crate::messages::{HookFinished, LogSummary};
        let h = Harness::with(vec![], |s| s.log.echo = false);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let mut g = all(&d);
        g.state = State::BuildingRemotely;
        let log = LogSummary {
            tail: vec!["last words".into()],
            ..Default::default()
        };
        let fx = step(
            &h,
            &mut g,
            Event::HookFinished(HookFinished {
                id: 1,
                exit_code: Some(1),
                log,
                alarm: None,
            }),
        );
        let printed = h.ts.store.store_dir().print(&d);
        assert!(
            fx.contains(&format!(
                "MiscFailure : builder for '{printed}' failed with exit code 1;\nlast 1 log lines:\n> last words\nFor full logs, run 'nix log {printed}'."
            )),
            "{fx}"
        );
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
