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
//!
//! The copy job counts its bytes into a [`Transfer`] that
//! [`Effect::SubstitutionStarted`] hands to the Worker as well, so the progress
//! display reads the bytes of a copy in flight without a message per chunk.

use std::sync::Arc;

use drover::build_result::BuildStatus;
use drover::store::RepairFlag;
use drover::store_path::StorePath;

use super::{Effect, Event, ExitCode, GoalCtx, GoalOutcome, GoalRequest, JobEnv, WaiteeCounts};
use crate::progress::Transfer;
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
    waitees: WaiteeCounts,
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
            waitees: WaiteeCounts::default(),
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
                    Event::Subst(SubstJobResult::Validity(
                        env.store
                            .add_temp_root(&path)
                            .and_then(|()| env.store.is_valid_path(&path))
                            .map_err(|e| e.to_string()),
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
                    if self.untrusted(&info, ctx) {
                        let mut fx = vec![Effect::Message(format!(
                            "warning: the substitute for '{}' from '{}' is not signed by any of the keys in 'trusted-public-keys'",
                            ctx.store_dir.print(&self.path),
                            Self::uri(ctx, self.current_sub.unwrap_or(0))
                        ))];
                        fx.extend(self.try_next(ctx));
                        return fx;
                    }
                    self.state = State::AwaitReferences;
                    let sizes = Effect::SubstitutionSizes {
                        nar_size: info.nar_size,
                        download_size: info.download_size.unwrap_or(0),
                    };
                    let refs = info
                        .references
                        .iter()
                        .filter(|r| **r != self.path)
                        .map(|r| GoalRequest::Substitution {
                            path: r.clone(),
                            repair: false,
                        })
                        .collect();
                    vec![sizes, Effect::WaitFor(refs)]
                }
            },
            (State::AwaitReferences, Event::WaiteeDone(w)) => {
                self.waitees.count(w.outcome.exit);
                vec![]
            }
            (State::AwaitReferences, Event::WaiteesDone) => {
                if self.waitees.failed > 0 {
                    let exit = self.waitees.substitution_failure();
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
                // Shared by the copy job (it counts bytes in) and the progress
                // display (it reads them); a new one for each attempt.
                let transfer = Arc::new(Transfer::default());
                let counts = transfer.clone();
                let repair = if self.repair {
                    RepairFlag::Repair
                } else {
                    RepairFlag::NoRepair
                };
                vec![
                    Effect::SubstitutionStarted {
                        uri,
                        transfer: Some(transfer),
                    },
                    Effect::Blocking(Box::new(move |env: &JobEnv| {
                        let r = match env.substituters.get(i) {
                            Some(s) => s.copy_into(&path, &env.store, repair, &counts),
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

    /// Nix's `pathInfoIsUntrusted` for an untrusted substituter: signatures are
    /// required, the path is not content-addressed, and no signature is valid.
    fn untrusted(&self, info: &SubstitutablePathInfo, ctx: &GoalCtx) -> bool {
        let i = self.current_sub.unwrap_or(0);
        let s = ctx.settings;
        if s.substituter_trusted.get(i).copied().unwrap_or(false)
            || !s.require_sigs
            || info.ca.is_some()
        {
            return false;
        }
        let fp = drover::narinfo::fingerprint_path(
            ctx.store_dir,
            &info.path,
            &info.nar_hash,
            info.nar_size,
            &info.references,
        );
        !matches!(
            s.trusted_public_keys.count_valid(fp.as_bytes(), &info.sigs),
            Ok(n) if n > 0
        )
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::goal::test_support::*;
    use crate::substituter::{FakeFault, InMemorySubstituter, Substituter};

    fn path(h: &Harness, name: &str) -> StorePath {
        let sd = h.ts.store.store_dir();
        sd.parse(&format!("{}/{}-{name}", sd.as_str(), "a".repeat(32)))
            .unwrap()
    }

    fn sub(uri: &str) -> Arc<InMemorySubstituter> {
        Arc::new(InMemorySubstituter::new(uri, 40))
    }

    #[test]
    fn already_valid() {
        let h = Harness::new(vec![]);
        let d = h.ts.add_drv("v", &["out"], &[], &[]);
        let mut g = PathSubstitutionGoal::new(d, false);
        let fx = h.drive(|e, c| g.handle(e, c), Event::Start, false);
        assert!(show(&fx).contains("Done(Success, AlreadyValid)"), "{fx:?}");
        assert!(g.is_done());
    }

    #[test]
    fn no_substituters() {
        let h = Harness::new(vec![]);
        let p = path(&h, "missing");
        let mut g = PathSubstitutionGoal::new(p, false);
        let fx = h.drive(|e, c| g.handle(e, c), Event::Start, false);
        assert!(
            show(&fx).contains("Done(NoSubstituters, NoSubstituters : path '"),
            "{fx:?}"
        );
        assert!(show(&fx).contains("is required, but there is no substituter that can build it"));
    }

    #[test]
    fn references_first_then_slot_then_copy() {
        let s = sub("mem://a");
        let h = Harness::new(vec![s.clone() as Arc<dyn Substituter>]);
        let dep = path(&h, "dep");
        let p = {
            let sd = h.ts.store.store_dir();
            sd.parse(&format!("{}/{}-top", sd.as_str(), "b".repeat(32)))
                .unwrap()
        };
        s.add_file(dep.clone(), b"dep", Default::default());
        s.add_file(p.clone(), b"top", [dep.clone(), p.clone()].into());
        let mut g = PathSubstitutionGoal::new(p.clone(), false);
        let fx = h.drive(|e, c| g.handle(e, c), Event::Start, false);
        // Self-references are not waited for.
        assert_eq!(
            show(&fx),
            format!("[SubstitutionSizes(120), WaitFor([Substitution {{ path: {dep:?}, repair: false }}])]")
        );
        assert_eq!(g.state_name(), "referencesValid");
        let req = GoalRequest::Substitution {
            path: dep.clone(),
            repair: false,
        };
        s.copy_into(
            &dep,
            &h.ts.store,
            RepairFlag::NoRepair,
            &Transfer::default(),
        )
        .unwrap();
        let fx = h.drive(|e, c| g.handle(e, c), waitee(req, ExitCode::Success), false);
        assert!(fx.is_empty());
        let fx = h.drive(|e, c| g.handle(e, c), Event::WaiteesDone, false);
        assert_eq!(show(&fx), "[AcquireSubstSlot]");
        let fx = h.drive(|e, c| g.handle(e, c), Event::SlotGranted, false);
        assert_eq!(
            show(&fx),
            "[SubstitutionStarted(mem://a), ReleaseSubstSlot, SubstitutionStopped, Done(Success, Substituted)]"
        );
        assert!(h.ts.store.is_valid_path(&p).unwrap());
    }

    #[test]
    fn the_copy_counts_into_the_transfer_it_announces() {
        let s = sub("mem://a");
        let h = Harness::new(vec![s.clone() as Arc<dyn Substituter>]);
        let p = path(&h, "x");
        let contents = vec![7u8; 5000];
        s.add_file(p.clone(), &contents, Default::default());
        let info = s.query_path_info(&p).unwrap().unwrap();
        let mut g = PathSubstitutionGoal::new(p.clone(), false);
        h.drive(|e, c| g.handle(e, c), Event::Start, false);
        h.drive(|e, c| g.handle(e, c), Event::WaiteesDone, false);
        let ctx = h.ctx(false);
        let mut fx = g.handle(Event::SlotGranted, &ctx).into_iter();
        let Some(Effect::SubstitutionStarted {
            uri,
            transfer: Some(transfer),
        }) = fx.next()
        else {
            panic!("no transfer announced");
        };
        assert_eq!(uri, "mem://a");
        let Some(Effect::Blocking(job)) = fx.next() else {
            panic!("no copy job");
        };
        // Nothing copied before the job runs; the job counts into the same Arc.
        assert_eq!((transfer.downloaded(), transfer.unpacked()), (0, 0));
        let ev = job(&h.env);
        assert_eq!(transfer.downloaded(), info.download_size.unwrap());
        assert_eq!(transfer.unpacked(), info.nar_size);
        let fx = g.handle(ev, &ctx);
        assert!(show(&fx).contains("Done(Success, Substituted)"), "{fx:?}");
        // A second attempt (another goal, a retry) gets a fresh transfer.
        let mut g2 = PathSubstitutionGoal::new(p, true);
        h.drive(|e, c| g2.handle(e, c), Event::Start, false);
        h.drive(|e, c| g2.handle(e, c), Event::WaiteesDone, false);
        match g2.handle(Event::SlotGranted, &ctx).into_iter().next() {
            Some(Effect::SubstitutionStarted {
                transfer: Some(t), ..
            }) => assert!(!Arc::ptr_eq(&t, &transfer)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failed_reference_gives_incomplete_closure_or_failed() {
        for (exit, expected) in [
            (ExitCode::NoSubstituters, "IncompleteClosure"),
            (ExitCode::IncompleteClosure, "IncompleteClosure"),
            (ExitCode::Failed, "Failed"),
        ] {
            let s = sub("mem://a");
            let h = Harness::new(vec![s.clone() as Arc<dyn Substituter>]);
            let dep = path(&h, "dep");
            let p = path(&h, "top");
            s.add_file(p.clone(), b"top", [dep.clone()].into());
            let mut g = PathSubstitutionGoal::new(p, false);
            h.drive(|e, c| g.handle(e, c), Event::Start, false);
            let req = GoalRequest::Substitution {
                path: dep,
                repair: false,
            };
            h.drive(|e, c| g.handle(e, c), waitee(req, exit), false);
            let fx = h.drive(|e, c| g.handle(e, c), Event::WaiteesDone, false);
            assert!(
                show(&fx).contains(&format!(
                    "Done({expected}, DependencyFailed : some references of path"
                )),
                "{fx:?}"
            );
        }
    }

    fn copy_with_fault(fault: FakeFault, fallback: bool) -> (String, bool) {
        let a = sub("mem://a");
        let b = sub("mem://b");
        let h = Harness::with(
            vec![
                a.clone() as Arc<dyn Substituter>,
                b.clone() as Arc<dyn Substituter>,
            ],
            |s| s.fallback = fallback,
        );
        let p = path(&h, "x");
        a.add_file(p.clone(), b"x", Default::default());
        a.set_fault(p.clone(), fault);
        let mut g = PathSubstitutionGoal::new(p, false);
        let mut fx = h.drive(|e, c| g.handle(e, c), Event::Start, false);
        if show(&fx).contains("WaitFor") {
            fx = h.drive(|e, c| g.handle(e, c), Event::WaiteesDone, false);
            assert_eq!(show(&fx), "[AcquireSubstSlot]");
            fx = h.drive(|e, c| g.handle(e, c), Event::SlotGranted, false);
        }
        (show(&fx), g.substituter_failed())
    }

    #[test]
    fn gone_nar_is_not_a_failure() {
        let (fx, failed) = copy_with_fault(FakeFault::Gone, false);
        assert!(fx.contains("Done(NoSubstituters, NoSubstituters"), "{fx}");
        assert!(!failed);
    }

    #[test]
    fn corrupt_nar_is_a_real_failure() {
        let (fx, failed) = copy_with_fault(FakeFault::CopyFails, false);
        assert!(fx.contains("is incomplete"), "{fx}");
        assert!(fx.contains("Done(Failed, NoSubstituters"), "{fx}");
        assert!(failed);
    }

    #[test]
    fn narinfo_error_aborts_without_fallback_and_is_skipped_with_it() {
        let (fx, _) = copy_with_fault(FakeFault::QueryFails, false);
        assert!(fx.starts_with("[Fatal(unable to download narinfo"), "{fx}");
        let (fx, failed) = copy_with_fault(FakeFault::QueryFails, true);
        assert!(fx.contains("Done(NoSubstituters, NoSubstituters"), "{fx}");
        assert!(!failed);
    }

    #[test]
    fn repair_substitutes_a_valid_path_again() {
        let s = sub("mem://a");
        let h = Harness::new(vec![s.clone() as Arc<dyn Substituter>]);
        let d = h.ts.add_drv("v", &["out"], &[], &[]);
        let mut g = PathSubstitutionGoal::new(d, true);
        let fx = h.drive(|e, c| g.handle(e, c), Event::Start, false);
        assert!(show(&fx).contains("Done(NoSubstituters"), "{fx:?}");
    }

    #[test]
    fn unsigned_substitutes_from_untrusted_caches_are_ignored() {
        use drover::signature::SecretKey;
        let key = SecretKey::generate("test-1").unwrap();
        let pk = key.to_public_key();
        let run = |sign: bool| {
            let mut s = InMemorySubstituter::new("mem://untrusted", 40);
            s.trusted = false;
            let s = Arc::new(s);
            let h = Harness::with(vec![s.clone() as Arc<dyn Substituter>], |st| {
                st.require_sigs = true;
                st.trusted_public_keys.insert(pk.clone());
            });
            let p = path(&h, "x");
            s.add_file(p.clone(), b"x", Default::default());
            if sign {
                let info = s.query_path_info(&p).unwrap().unwrap();
                let fp = drover::narinfo::fingerprint_path(
                    h.ts.store.store_dir(),
                    &p,
                    &info.nar_hash,
                    info.nar_size,
                    &info.references,
                );
                s.add_signature(&p, key.sign(fp.as_bytes()));
            }
            let mut g = PathSubstitutionGoal::new(p, false);
            let fx = h.drive(|e, c| g.handle(e, c), Event::Start, false);
            (show(&fx), g.substituter_failed())
        };
        let (fx, failed) = run(false);
        assert!(
            fx.contains("' is not signed by any of the keys in 'trusted-public-keys'"),
            "{fx}"
        );
        assert!(fx.contains("Done(NoSubstituters"), "{fx}");
        assert!(!failed);
        let (fx, _) = run(true);
        assert_eq!(fx, "[SubstitutionSizes(120), WaitFor([])]");
    }
}
