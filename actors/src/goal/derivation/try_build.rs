//! Trying to build (Nix's `tryToBuild`, `tryBuildHook`, `tryLocalBuild`):
//! non-blocking output locks (retry after the poll interval), the re-check
//! ("someone beat us to it"), removal of invalid leftovers, then the hook or a local
//! build slot. A hook error (`bad hook reply '…'`, `unexpected EOF reading a line`)
//! is a run error (`Effect::Fatal`), as Nix 2.8 throws it out of the goal.
//!
//! As Nix 2.8 does, each attempt asks the hook once, *before* taking a local build
//! slot: `amWilling` says whether a slot is free ([`GoalCtx::build_slot_free`]) or
//! already held. After `# decline` a free slot is taken and the build starts; with
//! none free the goal unlocks, waits for one and starts over from the locks (asking
//! the hook again). After `# postpone` it unlocks, prints `waiting for a machine to
//! build '…'...` and asks again after the poll interval.
//!
//! How a `try` reaches the hook: [`DerivationGoal::build_locally_or_try_hook`]
//! returns [`Effect::HookTry`]; the Worker sends it as `messages::HookTry` to the
//! hook pool (`hook/pool.rs`), which encodes it with
//! `drover::hook_protocol::TryRequest` and answers the hook's reply as
//! [`Event::HookReply`], handled below (`AwaitHookReply`).

use super::*;

impl DerivationGoal {
    /// `tryToBuild`: locks, the hook or a local build slot.
    pub(super) fn step_try_build(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect> {
        match (self.state, ev) {
            // tryToBuild
            (State::Locking, Event::Drv(r)) => match *r {
                DrvJobResult::Locked(Ok(LockOutcome::Busy(lock_files))) => {
                    self.state = State::WaitingForLock;
                    let mut fx = Vec::new();
                    if !self.waiting_message_shown {
                        self.waiting_message_shown = true;
                        // Nix's activity text, which its logger ends with `...`.
                        let paths: Vec<String> = lock_files
                            .iter()
                            .map(|p| format!("'{}'", p.display()))
                            .collect();
                        fx.push(Effect::Message(format!(
                            "waiting for lock on {}...",
                            paths.join(", ")
                        )));
                        fx.push(Effect::Waiting(crate::progress::WaitReason::lock(
                            &lock_files,
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
                    self.build_locally_or_try_hook(ctx)
                }
                DrvJobResult::Locked(Err(e)) => self.fatal(e.to_string()),
                other => self.unexpected_job(other, ctx),
            },
            (State::WaitingForLock | State::Postponed, Event::Wake) => self.try_to_build(),
            // The answer to this attempt's one `try` (Nix's `tryBuildHook`).
            (State::AwaitHookReply, Event::HookReply(reply)) => match reply {
                HookReply::Accept { machine, job } => {
                    // A hook build takes no local build slot.
                    let mut fx = self.release_slot();
                    self.state = State::BuildingRemotely;
                    self.started = true;
                    self.start_time = now();
                    let missing = self.missing_outputs();
                    fx.extend([
                        Effect::BuildStarted {
                            machine: Some(machine),
                        },
                        Effect::HookBuild {
                            job,
                            drv_path: self.drv_path.clone(),
                            inputs: self.hook_inputs.clone(),
                            missing_outputs: missing,
                        },
                    ]);
                    fx
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
                            "waiting for a machine to build '{}'...",
                            self.p(ctx)
                        )));
                        fx.push(Effect::Waiting(crate::progress::WaitReason::Machine));
                    }
                    fx.push(Effect::WaitForAWhile);
                    fx
                }
                // Nix 2.8 throws these (`bad hook reply '…'`, `unexpected EOF reading a
                // line`, …) out of the goal: the whole run ends with exit 1.
                HookReply::Error(msg) => self.fatal(msg),
            },
            // The slot was free when asked for: build now (`tryLocalBuild`).
            (State::TakingBuildSlot, Event::SlotGranted) => {
                self.have_slot = true;
                self.try_local_build(ctx)
            }
            // Woken up after waiting for a slot: a new attempt from `tryToBuild`
            // (locks, validity, then the hook again, as Nix does).
            (State::AwaitBuildSlot, Event::SlotGranted) => {
                self.have_slot = true;
                self.try_to_build()
            }
            (_, ev) => self.unexpected(&ev, ctx),
        }
    }

    pub(super) fn try_to_build(&mut self) -> Vec<Effect> {
        self.state = State::Locking;
        let Some(drv) = self.drv.clone() else {
            return self.not_loaded();
        };
        let p = self.drv_path.clone();
        let hashes = self.output_hashes.clone();
        let repair = self.mode == BuildMode::Repair;
        vec![job(move |env| {
            DrvJobResult::Locked(lock_outputs(env, &p, &drv, &hashes, repair))
        })]
    }

    pub(super) fn can_build_locally(&self, ctx: &GoalCtx) -> bool {
        let Some(drv) = &self.drv else { return false };
        let s = ctx.settings;
        (drv.system == s.system || s.extra_platforms.contains(&drv.system) || drv.is_builtin())
            && self
                .required_system_features(drv)
                .is_subset(&s.system_features)
    }

    /// After the locks (`tryToBuild`): check and repair modes and `preferLocalBuild`
    /// build locally; otherwise the hook is asked once (`tryBuildHook`: `try`,
    /// `amWilling` = whether a local build slot is free or already held).
    pub(super) fn build_locally_or_try_hook(&mut self, ctx: &GoalCtx) -> Vec<Effect> {
        let Some(drv) = self.drv.clone() else {
            return self.not_loaded();
        };
        let prefer_local = drv.env.get("preferLocalBuild").is_some_and(|v| v == "1");
        let build_locally = (self.mode != BuildMode::Normal
            || (prefer_local && self.can_build_locally(ctx)))
            && ctx.settings.max_jobs != 0;
        if !build_locally && ctx.hook_enabled && !drv.is_builtin() {
            self.state = State::AwaitHookReply;
            let features = self.required_system_features(&drv);
            return vec![Effect::HookTry {
                am_willing: self.have_slot || ctx.build_slot_free,
                system: drv.system.clone(),
                drv_path: self.drv_path.clone(),
                required_features: features,
            }];
        }
        self.try_local_build(ctx)
    }

    /// `tryLocalBuild`: with a slot, start the build; when a slot is free, take it;
    /// else wait for one (and start over from `tryToBuild` when woken).
    pub(super) fn try_local_build(&mut self, ctx: &GoalCtx) -> Vec<Effect> {
        let Some(drv) = self.drv.clone() else {
            return self.not_loaded();
        };
        if !self.have_slot {
            if ctx.settings.max_jobs == 0 {
                let msg = if ctx.settings.remote_builders {
                    NO_MATCHING_MACHINES
                } else {
                    NO_BUILD_SLOTS
                };
                return self.fatal(msg.into());
            }
            if ctx.build_slot_free {
                // Granted at once: the locks are kept.
                self.state = State::TakingBuildSlot;
            } else {
                // Nix's `waitForBuildSlot`, unlocking the outputs meanwhile.
                self.locks = None;
                self.state = State::AwaitBuildSlot;
            }
            return vec![Effect::AcquireBuildSlot];
        }
        if !self.can_build_locally(ctx) {
            let fmt_set =
                |s: &BTreeSet<String>| s.iter().map(String::as_str).collect::<Vec<_>>().join(", ");
            let msg = format!(
                "a '{}' with features {{{}}} is required to build '{}', but I am a '{}' with features {{{}}}",
                drv.system,
                fmt_set(&self.required_system_features(&drv)),
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
        self.nr_rounds = repeat_rounds(self.mode, self.drv_type, ctx.settings.repeat);
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
                round: (self.cur_round, self.nr_rounds),
                goal_name: self.name(ctx),
                run_settings: ctx.settings.local_build.clone(),
            }),
        ]
    }
}

/// Nix 2.8's error when max-jobs is 0 and no hook builds.
pub const NO_BUILD_SLOTS: &str = "unable to start any build; either increase '--max-jobs' or enable remote builds.\nhttps://nixos.org/manual/nix/stable/advanced-topics/distributed-builds.html";
/// Nix 2.8's error instead of [`NO_BUILD_SLOTS`] when `builders` names machines.
pub const NO_MATCHING_MACHINES: &str = "unable to start any build; remote machines may not have all required system features.\nhttps://nixos.org/manual/nix/stable/advanced-topics/distributed-builds.html";

impl DerivationGoal {
    /// Nix's `getRequiredSystemFeatures`: [`required_features`], plus
    /// `ca-derivations` when the output paths are not known in advance.
    fn required_system_features(&self, drv: &Derivation) -> BTreeSet<String> {
        let mut features = required_features(drv);
        if !self.drv_type.is_some_and(|t| t.has_known_output_paths()) {
            features.insert("ca-derivations".into());
        }
        features
    }
}

/// The features of the local machine (the store's `system-features` in Nix 2.8):
/// `system-features`, plus `ca-derivations` and `recursive-nix` when those
/// experimental features are enabled.
pub fn local_system_features(s: &drover::config::Settings) -> BTreeSet<String> {
    let mut features = s.system_features();
    for xp in ["ca-derivations", "recursive-nix"] {
        if s.is_experimental_feature_enabled(xp) {
            features.insert(xp.to_owned());
        }
    }
    features
}

/// `requiredSystemFeatures` (Nix's `getStringsAttr`): with `__structuredAttrs`, the
/// list of strings in the `__json` object, else the variable split on whitespace.
pub fn required_features(drv: &Derivation) -> BTreeSet<String> {
    drover::build::env::required_system_features(drv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::goal::derivation::test_util::*;

    #[test]
    fn one_try_per_attempt_willing_when_a_slot_is_free() {
        let h = Harness::new(vec![]);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let mut g = all(&d);
        step_hook(&h, &mut g, Event::Start);
        assert_eq!(step_hook(&h, &mut g, Event::WaiteesDone), "[WaitFor([])]");
        assert_eq!(step_hook(&h, &mut g, Event::WaiteesDone), "[HookTry(true)]");
        // Declined with a slot free: the slot is taken and the build starts, without
        // asking the hook again.
        assert_eq!(
            step_hook(&h, &mut g, Event::HookReply(HookReply::Decline)),
            "[AcquireBuildSlot]"
        );
        assert_eq!(g.state_name(), "tryLocalBuild");
        assert!(g.locks.is_some(), "the locks are kept for the build");
        let fx = step_hook(&h, &mut g, Event::SlotGranted);
        assert!(
            fx.starts_with("[BuildStarted(None), RunLocalBuild("),
            "{fx}"
        );
    }

    #[test]
    fn declined_without_a_free_slot_waits_and_asks_again_when_woken() {
        let h = Harness::new(vec![]);
        h.slots_busy.set(true);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let mut g = all(&d);
        step_hook(&h, &mut g, Event::Start);
        step_hook(&h, &mut g, Event::WaiteesDone);
        assert_eq!(
            step_hook(&h, &mut g, Event::WaiteesDone),
            "[HookTry(false)]"
        );
        assert_eq!(
            step_hook(&h, &mut g, Event::HookReply(HookReply::Decline)),
            "[AcquireBuildSlot]"
        );
        assert!(g.locks.is_none(), "unlocked while waiting for a slot");
        // Woken with a slot: a new attempt, the hook asked again (willing).
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
    fn enabled_experimental_features_are_local_system_features() {
        let dir = tempfile::tempdir().unwrap();
        let conf = "experimental-features = ca-derivations\nsystem-features = foo\n";
        let s = drover::config::Settings::for_root(dir.path(), conf).unwrap();
        let want: BTreeSet<String> = ["ca-derivations", "foo"].map(String::from).into();
        assert_eq!(local_system_features(&s), want);
        let s = drover::config::Settings::for_root(dir.path(), "system-features = foo\n").unwrap();
        assert_eq!(local_system_features(&s), ["foo".to_string()].into());
    }

    #[test]
    fn postponed_waits_and_asks_once_per_wake_up() {
        let h = Harness::new(vec![]);
        h.slots_busy.set(true);
        let d = h.ts.add_drv("x", &["out"], &[], &[]);
        let mut g = all(&d);
        step_hook(&h, &mut g, Event::Start);
        step_hook(&h, &mut g, Event::WaiteesDone);
        step_hook(&h, &mut g, Event::WaiteesDone);
        let fx = step_hook(&h, &mut g, Event::HookReply(HookReply::Postpone));
        assert_eq!(
            fx,
            format!(
                "[Message(waiting for a machine to build '{}'...), Waiting(Machine), WaitForAWhile]",
                h.ts.store.store_dir().print(&d)
            )
        );
        assert_eq!(step_hook(&h, &mut g, Event::Wake), "[HookTry(false)]");
        // Shown again for each postponed attempt (Nix's activity ends once locked).
        assert!(step_hook(&h, &mut g, Event::HookReply(HookReply::Postpone))
            .starts_with("[Message(waiting for a machine to build"));
        h.slots_busy.set(false);
        assert_eq!(step_hook(&h, &mut g, Event::Wake), "[HookTry(true)]");
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
        assert!(
            fx.starts_with(&format!(
                "[Message(waiting for lock on '{}'...)",
                h.ts.store.real_path(&out).display()
            )),
            "{fx}"
        );
        assert!(fx.ends_with("WaitForAWhile]"), "{fx}");
        // Who holds it: this process (the pid `/proc/locks` gives).
        let lock_file = format!("{}.lock", h.ts.store.real_path(&out).display());
        let pid = std::process::id();
        assert!(
            fx.contains(&format!(
                "Waiting(Lock {{ path: {lock_file:?}, pid: Some({pid}) }})"
            )),
            "{fx}"
        );
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
}
