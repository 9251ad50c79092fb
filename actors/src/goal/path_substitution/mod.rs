//! PathSubstitutionGoal: make one store path valid by copying it from a substituter
//! (Nix 2.8's `PathSubstitutionGoal`, src/libstore/build/substitution-goal.cc).
//!
//! States: `init` (already valid → AlreadyValid) → `tryNext` (query the next
//! substituter's narinfo without a slot; none left → NoSubstituters, exit
//! `Failed` if some substituter really failed, else `NoSubstituters`) → wait for the
//! references' substitution goals → `referencesValid` (a failed reference →
//! DependencyFailed, exit `IncompleteClosure` when a reference merely had no
//! substitute) → `tryToRun` (take a substitution slot, copy) → `finished` (release the
//! slot; a gone NAR tries the next substituter without counting as a failure, another
//! error marks the substituter failed and tries the next; success → Substituted).
//! `init`'s job also asks the first substituter when the path is invalid, so a goal
//! reaches its narinfo in one store-executor round trip, not two; a narinfo's
//! signatures are checked in the job that fetched it, not on the arbiter.
//!
//! The copy job counts its bytes into a [`Transfer`] that
//! [`Effect::SubstitutionStarted`] hands to the Worker as well, so the progress
//! display reads the bytes of a copy in flight without a message per chunk.
//!
//! Fetching ahead: when the substituter can ([`Substituter::fetches_early`]), a
//! goal that has its narinfo takes a substitution slot *while* its references are
//! substituted, and downloads, checks and unpacks the path into its place (locked,
//! invalid: [`Fetched::Unpacked`]). Only once every reference is valid does it do
//! what Nix does at `tryToRun`: announce the copy (`copying path '…' from '…'`) and
//! register the path (so a path is still valid only after its references). A fetch
//! ahead is one quiet attempt: when it fails, the goal copies again in Nix's order
//! (`tryToRun` as without fetching ahead), so retries, errors and the next
//! substituter are printed and tried as Nix does. A reference that fails drops the fetched
//! copy, which deletes it, and nothing about the copy is printed, as in Nix, where it
//! never started. A closure asked for by its root is so downloaded as fast as its
//! narinfos are found, not one layer at a time. Paths fetched ahead that become
//! registrable at the same time share a transaction ([`registration`]). `--repair`
//! copies as before.
//!
//! [`Substituter::fetches_early`]: crate::substituter::Substituter::fetches_early

pub mod registration;

use std::sync::Arc;

use drover::build_result::BuildStatus;
use drover::store::RepairFlag;
use drover::store_path::StorePath;

use super::error::GoalError;
use super::{
    Effect, Event, ExitCode, GoalCtx, GoalOutcome, GoalRequest, JobEnv, SubstituterRef,
    WaiteeCounts,
};
use crate::progress::Transfer;
use crate::substituter::{Fetched, SubstitutablePathInfo, SubstituterError};

/// Results of this goal's blocking jobs.
pub enum SubstJobResult {
    /// Whether the path is valid, and, when it is not (or is repaired), the first
    /// substituter's answer (as [`SubstJobResult::Info`]): `init` and the first
    /// `tryNext` in one job, one round trip to the store executor fewer per goal.
    /// (Boxed: events stay small.)
    Validity(Result<bool, GoalError>, Option<Box<InfoAnswer>>),
    /// The narinfo, whether the substituter can fetch ahead of the references,
    /// and whether the narinfo is untrusted ([`untrusted`], checked on the job's
    /// thread: verifying signatures is no work for the arbiter).
    Info(
        Result<Option<SubstitutablePathInfo>, SubstituterError>,
        bool,
        bool,
    ),
    Copied(Result<(), SubstituterError>),
    /// A fetch ahead of the references ended.
    Fetched(Result<Fetched, SubstituterError>),
    /// The fetched path was registered.
    Registered(Result<(), SubstituterError>),
}

/// A substituter's narinfo, whether it fetches ahead, and whether the narinfo is
/// untrusted.
pub type InfoAnswer = (
    Result<Option<SubstitutablePathInfo>, SubstituterError>,
    bool,
    bool,
);

/// Where a fetch ahead of the references is.
enum Ahead {
    AwaitSlot,
    Running,
    Done(Result<Fetched, SubstituterError>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Init,
    CheckingValidity,
    QueryingInfo,
    AwaitReferences,
    AwaitSlot,
    Copying,
    /// Fetching ahead while the references are substituted.
    Fetching,
    /// Registering a path fetched ahead.
    Registering,
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
    /// In `Fetching`: whether the references are done, and the fetch.
    refs_done: bool,
    ahead: Option<Ahead>,
    /// The transfer of the fetch ahead, announced once the references are valid.
    transfer: Option<Arc<Transfer>>,
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
            refs_done: false,
            ahead: None,
            transfer: None,
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
            State::Fetching => "referencesValid (fetching ahead)",
            State::Registering => "finished (registering)",
            State::Done => "done",
        }
    }

    pub fn handle(&mut self, ev: Event, ctx: &GoalCtx) -> Vec<Effect> {
        match (self.state, ev) {
            (State::Init, Event::Start) => {
                self.state = State::CheckingValidity;
                let path = self.path.clone();
                let (repair, ask) = (self.repair, ctx.n_substituters > 0);
                let (sub, policy) = (ctx.substituter(0), SigPolicy::of(ctx.settings, 0));
                vec![Effect::Blocking(Box::new(move |env: &JobEnv| {
                    let valid = check_validity(env, &path);
                    let info = match valid {
                        Ok(v) if ask && (!v || repair) => {
                            Some(Box::new(query_info(env, &sub, &policy, &path)))
                        }
                        _ => None,
                    };
                    Event::Subst(SubstJobResult::Validity(valid, info))
                }))]
            }
            (State::CheckingValidity, Event::Subst(SubstJobResult::Validity(r, info))) => {
                match (r, info) {
                    (Err(e), _) => self.fatal(e.to_string()),
                    (Ok(true), _) if !self.repair => {
                        self.finish(GoalOutcome::success(BuildStatus::AlreadyValid))
                    }
                    // `tryNext` for the first substituter, already answered.
                    (Ok(_), Some(answer)) if self.next_sub == 0 => {
                        let (r, early, untrusted) = *answer;
                        self.next_sub = 1;
                        self.current_sub = Some(0);
                        self.state = State::QueryingInfo;
                        self.handle(Event::Subst(SubstJobResult::Info(r, early, untrusted)), ctx)
                    }
                    (Ok(_), _) => self.try_next(ctx),
                }
            }
            (State::QueryingInfo, Event::Subst(SubstJobResult::Info(r, early, bad))) => match r {
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
                    if bad {
                        let mut fx = vec![Effect::Message(format!(
                            "warning: the substitute for '{}' from '{}' is not signed by any of the keys in 'trusted-public-keys'",
                            ctx.store_dir.print(&self.path),
                            Self::uri(ctx, self.current_sub.unwrap_or(0))
                        ))];
                        fx.extend(self.try_next(ctx));
                        return fx;
                    }
                    let ahead = early && !self.repair;
                    self.state = if ahead {
                        State::Fetching
                    } else {
                        State::AwaitReferences
                    };
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
                    if ahead {
                        self.refs_done = false;
                        self.ahead = Some(Ahead::AwaitSlot);
                        return vec![sizes, Effect::WaitFor(refs), Effect::AcquireSubstSlot];
                    }
                    vec![sizes, Effect::WaitFor(refs)]
                }
            },
            (State::Fetching, Event::WaiteeDone(w)) => {
                self.waitees.count(w.outcome.exit);
                vec![]
            }
            (State::Fetching, Event::WaiteesDone) if !self.refs_done => {
                self.refs_done = true;
                self.advance(ctx)
            }
            (State::Fetching, Event::SlotGranted)
                if matches!(self.ahead, Some(Ahead::AwaitSlot)) =>
            {
                self.ahead = Some(Ahead::Running);
                let i = self.current_sub.unwrap_or(0);
                let path = self.path.clone();
                let transfer = Arc::new(Transfer::default());
                let counts = transfer.clone();
                self.transfer = Some(transfer);
                let sub = ctx.substituter(i);
                vec![Effect::Blocking(Box::new(move |env: &JobEnv| {
                    let r = match sub.get(env) {
                        Some(s) => s.fetch_unregistered(&path, &env.store, &counts),
                        None => Err(SubstituterError::Failed("no such substituter".into())),
                    };
                    Event::Subst(SubstJobResult::Fetched(r))
                }))]
            }
            (State::Fetching, Event::Subst(SubstJobResult::Fetched(r)))
                if matches!(self.ahead, Some(Ahead::Running)) =>
            {
                self.ahead = Some(Ahead::Done(r));
                let mut fx = vec![Effect::ReleaseSubstSlot];
                fx.extend(self.advance(ctx));
                fx
            }
            (State::Registering, Event::Subst(SubstJobResult::Registered(r))) => {
                self.copied(r, ctx, vec![Effect::SubstitutionStopped])
            }
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
                let sub = ctx.substituter(i);
                vec![
                    Effect::SubstitutionStarted {
                        uri,
                        transfer: Some(transfer),
                    },
                    Effect::Blocking(Box::new(move |env: &JobEnv| {
                        let r = match sub.get(env) {
                            Some(s) => s.copy_into(&path, &env.store, repair, &counts),
                            None => Err(SubstituterError::Failed("no such substituter".into())),
                        };
                        Event::Subst(SubstJobResult::Copied(r))
                    })),
                ]
            }
            (State::Copying, Event::Subst(SubstJobResult::Copied(r))) => self.copied(
                r,
                ctx,
                vec![Effect::ReleaseSubstSlot, Effect::SubstitutionStopped],
            ),
            (state, ev) => {
                let msg = GoalError::UnexpectedEvent {
                    goal: ctx.store_dir.print(&self.path),
                    state: format!("{} ({state:?})", self.state_name()),
                    what: format!("event {}", ev.kind()),
                }
                .to_string();
                if state == State::Done {
                    log::error!("{msg}; ignored");
                    return vec![];
                }
                let mut fx = match state {
                    State::Copying => vec![Effect::ReleaseSubstSlot, Effect::SubstitutionStopped],
                    // Leave the queue: a slot granted later would be lost.
                    State::AwaitSlot => vec![Effect::ReleaseSubstSlot],
                    State::Fetching
                        if matches!(self.ahead, Some(Ahead::AwaitSlot | Ahead::Running)) =>
                    {
                        vec![Effect::ReleaseSubstSlot]
                    }
                    State::Registering => vec![Effect::SubstitutionStopped],
                    _ => vec![],
                };
                // A path fetched ahead is deleted.
                self.ahead = None;
                fx.extend(self.finish(GoalOutcome::failure(
                    ExitCode::Failed,
                    BuildStatus::MiscFailure,
                    msg,
                )));
                fx
            }
        }
    }

    /// The end of a copy (or of the registration of a path fetched ahead), after
    /// `first`: success, or the error printed and the next substituter tried.
    fn copied(
        &mut self,
        r: Result<(), SubstituterError>,
        ctx: &GoalCtx,
        first: Vec<Effect>,
    ) -> Vec<Effect> {
        let mut fx = first;
        match r {
            Ok(()) => fx.extend(self.finish(GoalOutcome::success(BuildStatus::Substituted))),
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

    /// In `Fetching`, once the references are done and the fetch has ended: Nix's
    /// `referencesValid` and `tryToRun`, with the copy already made.
    fn advance(&mut self, ctx: &GoalCtx) -> Vec<Effect> {
        if !self.refs_done {
            return vec![];
        }
        if self.waitees.failed > 0 {
            let mut fx = match self.ahead {
                // Wait for the fetch to end; its copy is deleted then.
                Some(Ahead::Running) => return vec![],
                // Leave the slot queue.
                Some(Ahead::AwaitSlot) => vec![Effect::ReleaseSubstSlot],
                _ => vec![],
            };
            // Deletes a fetched copy.
            self.ahead = None;
            let exit = self.waitees.substitution_failure();
            fx.extend(self.finish(GoalOutcome::failure(
                exit,
                BuildStatus::DependencyFailed,
                format!(
                    "some references of path '{}' could not be realised",
                    ctx.store_dir.print(&self.path)
                ),
            )));
            return fx;
        }
        let r = match self.ahead.take() {
            Some(Ahead::Done(r)) => r,
            other => {
                self.ahead = other;
                return vec![];
            }
        };
        let i = self.current_sub.unwrap_or(0);
        let started = Effect::SubstitutionStarted {
            uri: Self::uri(ctx, i),
            transfer: self.transfer.take(),
        };
        match r {
            Ok(Fetched::AlreadyValid) => {
                let mut fx = vec![started];
                fx.extend(self.finish(GoalOutcome::success(BuildStatus::Substituted)));
                fx
            }
            Ok(Fetched::Unpacked { object, place }) => {
                self.state = State::Registering;
                vec![
                    started,
                    Effect::Blocking(Box::new(move |env: &JobEnv| {
                        let r = env.registrations.register(&env.store, *object);
                        drop(place);
                        Event::Subst(SubstJobResult::Registered(r))
                    })),
                ]
            }
            // Copy again as Nix does, now that the references are valid: its
            // retries, messages and failure are those of Nix's copy, which never
            // saw this attempt.
            Ok(Fetched::Deferred) | Err(_) => {
                self.state = State::AwaitSlot;
                vec![Effect::AcquireSubstSlot]
            }
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
        let sub = ctx.substituter(i);
        let policy = SigPolicy::of(ctx.settings, i);
        vec![Effect::Blocking(Box::new(move |env: &JobEnv| {
            let (r, early, untrusted) = query_info(env, &sub, &policy, &path);
            Event::Subst(SubstJobResult::Info(r, early, untrusted))
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

/// Substituter `i`'s narinfo of `path` (`tryNext`'s query), whether it fetches
/// ahead, and whether the narinfo is [`untrusted`].
fn query_info(
    env: &JobEnv,
    sub: &SubstituterRef,
    policy: &SigPolicy,
    path: &StorePath,
) -> InfoAnswer {
    let (r, early) = match sub.get(env) {
        Some(s) => (s.query_path_info(path), s.fetches_early()),
        None => (Ok(None), false),
    };
    let untrusted = match &r {
        Ok(Some(info)) => policy.untrusted(env.store.store_dir(), info),
        _ => false,
    };
    (r, early, untrusted)
}

/// What the signature check of one substituter's narinfos needs, from the settings
/// of the goal's run (a daemon client's `require-sigs` and `trusted-public-keys`),
/// taken to the store job that asks for the narinfo.
struct SigPolicy {
    substituter_trusted: bool,
    require_sigs: bool,
    trusted_public_keys: drover::signature::PublicKeys,
}

impl SigPolicy {
    fn of(s: &crate::worker::WorkerSettings, i: usize) -> SigPolicy {
        SigPolicy {
            substituter_trusted: s.substituter_trusted.get(i).copied().unwrap_or(false),
            require_sigs: s.require_sigs,
            trusted_public_keys: if s.require_sigs {
                s.trusted_public_keys.clone()
            } else {
                Default::default()
            },
        }
    }

    /// Nix's `pathInfoIsUntrusted` for the narinfo `info`: the substituter is not
    /// trusted, signatures are required, the path is not content-addressed, and no
    /// signature is valid.
    fn untrusted(
        &self,
        store_dir: &drover::store_path::StoreDir,
        info: &SubstitutablePathInfo,
    ) -> bool {
        if self.substituter_trusted || !self.require_sigs || info.ca.is_some() {
            return false;
        }
        let fp = drover::narinfo::fingerprint_path(
            store_dir,
            &info.path,
            &info.nar_hash,
            info.nar_size,
            &info.references,
        );
        !matches!(
            self.trusted_public_keys.count_valid(fp.as_bytes(), &info.sigs),
            Ok(n) if n > 0
        )
    }
}

/// `init`: the path made a temporary root first (so a concurrent collector cannot
/// delete it once found valid or while it is copied), then whether it is valid.
fn check_validity(env: &JobEnv, path: &StorePath) -> Result<bool, GoalError> {
    env.store
        .add_temp_root(path)
        .map_err(|source| GoalError::TempRoot {
            path: env.store.store_dir().print(path),
            source: Box::new(source),
        })?;
    Ok(env.store.is_valid_path(path)?)
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
    fn a_path_that_cannot_be_made_a_temp_root_ends_the_run() {
        let h = Harness::new(vec![]);
        // `temproots` a file: this process's root file cannot be created.
        let t = h.ts.store.state_dir().join("temproots");
        let _ = std::fs::remove_dir_all(&t);
        std::fs::write(&t, "").unwrap();
        let mut g = PathSubstitutionGoal::new(path(&h, "x"), false);
        let fx = show(&h.drive(|e, c| g.handle(e, c), Event::Start, false));
        assert!(
            fx.starts_with("[Fatal(cannot add temporary root for '"),
            "{fx}"
        );
    }

    #[test]
    fn an_unexpected_event_fails_the_goal_and_leaves_the_slot_queue() {
        let s = sub("mem://a");
        let h = Harness::new(vec![s.clone() as Arc<dyn Substituter>]);
        let p = path(&h, "x");
        s.add_file(p.clone(), b"x", Default::default());
        let mut g = PathSubstitutionGoal::new(p, false);
        let fx = show(&h.drive(|e, c| g.handle(e, c), Event::Start, false));
        assert!(fx.ends_with("WaitFor([])]"), "{fx}");
        let fx = show(&h.drive(|e, c| g.handle(e, c), Event::WaiteesDone, false));
        assert_eq!(fx, "[AcquireSubstSlot]");
        let fx = show(&h.drive(|e, c| g.handle(e, c), Event::Wake, false));
        assert!(
            fx.starts_with(
                "[ReleaseSubstSlot, Done(Failed, MiscFailure : internal error: the goal for '"
            ) && fx.contains("in state tryToRun (AwaitSlot) got an unexpected event Wake"),
            "{fx}"
        );
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

    /// A substituter that fetches ahead, serving `top` (referring to `dep`) and, if
    /// `dep_served`, `dep`.
    fn ahead(
        dep_served: bool,
        fault: Option<FakeFault>,
    ) -> (Harness, Arc<InMemorySubstituter>, StorePath, StorePath) {
        let mut s = InMemorySubstituter::new("mem://a", 40);
        s.fetch_ahead = true;
        let s = Arc::new(s);
        let h = Harness::new(vec![s.clone() as Arc<dyn Substituter>]);
        let dep = path(&h, "dep");
        let top = {
            let sd = h.ts.store.store_dir();
            sd.parse(&format!("{}/{}-top", sd.as_str(), "b".repeat(32)))
                .unwrap()
        };
        if dep_served {
            s.add_file(dep.clone(), b"dep", Default::default());
        }
        s.add_file(top.clone(), b"top", [dep.clone()].into());
        if let Some(f) = fault {
            s.set_fault(top.clone(), f);
        }
        (h, s, dep, top)
    }

    #[test]
    fn fetched_ahead_of_its_references_and_registered_after_them() {
        let (h, s, dep, top) = ahead(true, None);
        let mut g = PathSubstitutionGoal::new(top.clone(), false);
        let fx = h.drive(|e, c| g.handle(e, c), Event::Start, false);
        assert_eq!(
            show(&fx),
            format!("[SubstitutionSizes(120), WaitFor([Substitution {{ path: {dep:?}, repair: false }}]), AcquireSubstSlot]")
        );
        // The slot comes before the reference is valid: the copy is unpacked into
        // place, invalid, and nothing is announced yet.
        let fx = h.drive(|e, c| g.handle(e, c), Event::SlotGranted, false);
        assert_eq!(show(&fx), "[ReleaseSubstSlot]");
        let real = h.ts.store.real_path(&top);
        assert_eq!(std::fs::read(&real).unwrap(), b"top");
        assert!(!h.ts.store.is_valid_path(&top).unwrap());
        assert!(!h.ts.store.is_valid_path(&dep).unwrap());
        // The reference becomes valid; then the copy is announced and registered.
        s.copy_into(
            &dep,
            &h.ts.store,
            RepairFlag::NoRepair,
            &Transfer::default(),
        )
        .unwrap();
        let req = GoalRequest::Substitution {
            path: dep.clone(),
            repair: false,
        };
        assert!(h
            .drive(|e, c| g.handle(e, c), waitee(req, ExitCode::Success), false)
            .is_empty());
        let fx = h.drive(|e, c| g.handle(e, c), Event::WaiteesDone, false);
        assert_eq!(
            show(&fx),
            "[SubstitutionStarted(mem://a), SubstitutionStopped, Done(Success, Substituted)]"
        );
        assert!(h.ts.store.is_valid_path(&top).unwrap());
        let info = h.ts.store.query_path_info(&top).unwrap().unwrap();
        assert_eq!(info.references, [dep].into());
    }

    #[test]
    fn a_failed_reference_deletes_the_path_fetched_ahead_and_announces_nothing() {
        for slot_first in [true, false] {
            let (h, _s, dep, top) = ahead(false, None);
            let mut g = PathSubstitutionGoal::new(top.clone(), false);
            h.drive(|e, c| g.handle(e, c), Event::Start, false);
            if slot_first {
                h.drive(|e, c| g.handle(e, c), Event::SlotGranted, false);
                assert!(h.ts.store.real_path(&top).exists());
            }
            let req = GoalRequest::Substitution {
                path: dep.clone(),
                repair: false,
            };
            h.drive(
                |e, c| g.handle(e, c),
                waitee(req, ExitCode::NoSubstituters),
                false,
            );
            let fx = show(&h.drive(|e, c| g.handle(e, c), Event::WaiteesDone, false));
            let want = if slot_first {
                "[Done(IncompleteClosure, DependencyFailed : some references of path '"
            } else {
                // Still queued for the slot: it leaves the queue.
                "[ReleaseSubstSlot, Done(IncompleteClosure, DependencyFailed : some references of path '"
            };
            assert!(fx.starts_with(want), "{fx}");
            assert!(!fx.contains("SubstitutionStarted"), "{fx}");
            assert!(!h.ts.store.real_path(&top).exists());
            assert!(!h.ts.store.is_valid_path(&top).unwrap());
        }
    }

    #[test]
    fn a_failed_fetch_ahead_is_copied_again_in_nixs_order() {
        let (h, s, dep, top) = ahead(true, Some(FakeFault::CopyFails));
        let mut g = PathSubstitutionGoal::new(top.clone(), false);
        h.drive(|e, c| g.handle(e, c), Event::Start, false);
        let fx = h.drive(|e, c| g.handle(e, c), Event::SlotGranted, false);
        assert_eq!(show(&fx), "[ReleaseSubstSlot]");
        s.copy_into(
            &dep,
            &h.ts.store,
            RepairFlag::NoRepair,
            &Transfer::default(),
        )
        .unwrap();
        let req = GoalRequest::Substitution {
            path: dep,
            repair: false,
        };
        h.drive(|e, c| g.handle(e, c), waitee(req, ExitCode::Success), false);
        // Nothing of the failed attempt is shown: the copy is tried again.
        let fx = show(&h.drive(|e, c| g.handle(e, c), Event::WaiteesDone, false));
        assert_eq!(fx, "[AcquireSubstSlot]");
        let fx = show(&h.drive(|e, c| g.handle(e, c), Event::SlotGranted, false));
        assert!(
            fx.starts_with("[SubstitutionStarted(mem://a), ReleaseSubstSlot, SubstitutionStopped, Message(error: NAR for '")
                && fx.contains("Done(Failed, NoSubstituters"),
            "{fx}"
        );
        assert!(g.substituter_failed());
        assert!(!h.ts.store.real_path(&top).exists());
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
