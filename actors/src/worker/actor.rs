//! The thin Worker actor: hosts [`WorkerCore`] and one [`GoalActor`] per live goal.
//!
//! The core decides; this actor starts goal actors ([`Action::Spawn`]), delivers the
//! core's messages to them ([`Action::ToGoal`]), forwards progress to the optional
//! `Recipient<ProgressEvent>`, and hands every goal → Worker message
//! ([`RequestSubGoals`], [`AcquireSlot`], [`ReleaseSlot`], [`GoalProgress`],
//! [`GoalFinished`], [`GoalFatal`], [`GoalStopped`]) to the core. Goals reach the
//! store executor, the LocalBuilder and the hook pool themselves, through the
//! [`GoalServices`] injected into each of them, so no goal's future lives in the
//! Worker's context.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use drover::derived_path::DerivedPath;
use drover::store::LocalStore;

use super::{Action, RealiseOutcome, ToGoal, WorkerCore, WorkerSettings};
use crate::goal::actor::{GoalActor, GoalServices};
use crate::goal::derivation::DerivationGoal;
use crate::goal::drv_output_substitution::DrvOutputSubstitutionGoal;
use crate::goal::host::{AnyGoal, GoalMachine, GoalReport};
use crate::goal::path_substitution::PathSubstitutionGoal;
use crate::goal::{GoalId, JobEnv};
use crate::messages::{
    AcquireSlot, AddWantedOutputs, AllSubGoalsDone, BuildMode, CancelGoal, CancelHookBuild,
    CancelLocalBuild, GoalFatal, GoalFinished, GoalProgress, GoalStopped, HookTry, ReleaseSlot,
    RequestSubGoals, RunLocalBuild, SlotGranted, StartGoal, SubGoalDone, WorkerLink,
};
use crate::progress::ProgressEvent;
use crate::store_executor::StoreExecutor;
use crate::substituter::Substituter;

/// Everything a Worker needs; every effect is injected.
pub struct WorkerConfig {
    pub store: Arc<LocalStore>,
    /// The LocalBuilder (answers [`RunLocalBuild`] with `LocalBuildFinished`).
    pub local_builder: Recipient<RunLocalBuild>,
    /// Usually the same LocalBuilder's address.
    pub cancel_local_build: Recipient<CancelLocalBuild>,
    /// The hook pool, when a build hook is configured.
    pub hook: Option<Recipient<HookTry>>,
    /// Usually the same hook pool's address (it forwards the cancel to its job).
    pub cancel_hook_build: Option<Recipient<CancelHookBuild>>,
    /// Tried in order of priority (stable).
    pub substituters: Vec<Arc<dyn Substituter>>,
    pub settings: WorkerSettings,
    pub progress: Option<Recipient<ProgressEvent>>,
}

/// Realise these paths: one result per request, the exit status and the errors.
#[derive(Message)]
#[rtype(result = "RealiseOutcome")]
pub struct Realise {
    pub requests: Vec<DerivedPath>,
    pub mode: BuildMode,
}

/// The address of a live goal actor, of whichever kind.
enum GoalAddr {
    Drv(Addr<GoalActor<DerivationGoal>>),
    Subst(Addr<GoalActor<PathSubstitutionGoal>>),
    DrvOut(Addr<GoalActor<DrvOutputSubstitutionGoal>>),
}

impl GoalAddr {
    fn start(id: GoalId, machine: AnyGoal, services: &Arc<GoalServices>) -> GoalAddr {
        let s = services.clone();
        match machine {
            AnyGoal::Drv(g) => GoalAddr::Drv(GoalActor::new(id, g, s).start()),
            AnyGoal::Subst(g) => GoalAddr::Subst(GoalActor::new(id, g, s).start()),
            AnyGoal::DrvOut(g) => GoalAddr::DrvOut(GoalActor::new(id, g, s).start()),
        }
    }

    fn send(&self, msg: ToGoal) {
        match self {
            GoalAddr::Drv(a) => send_to(a, msg),
            GoalAddr::Subst(a) => send_to(a, msg),
            GoalAddr::DrvOut(a) => send_to(a, msg),
        }
    }

    /// Cancels the goal; resolves once its builder or hook job handled it.
    fn cancel_acked(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> {
        fn acked<G: GoalMachine + Unpin>(
            a: &Addr<GoalActor<G>>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> {
            let r = a.send(CancelGoal);
            Box::pin(async move {
                let _ = r.await;
            })
        }
        match self {
            GoalAddr::Drv(a) => acked(a),
            GoalAddr::Subst(a) => acked(a),
            GoalAddr::DrvOut(a) => acked(a),
        }
    }
}

/// Delivers one of the core's messages as the typed message it stands for.
fn send_to<G: GoalMachine + Unpin>(a: &Addr<GoalActor<G>>, msg: ToGoal) {
    match msg {
        ToGoal::Start => a.do_send(StartGoal),
        ToGoal::SubGoalDone(r) => a.do_send(SubGoalDone(r)),
        ToGoal::AllSubGoalsDone => a.do_send(AllSubGoalsDone),
        ToGoal::SlotGranted => a.do_send(SlotGranted),
        ToGoal::AddWantedOutputs(o) => a.do_send(AddWantedOutputs(o)),
        ToGoal::Cancel => a.do_send(CancelGoal),
    }
}

/// One realisation in progress.
struct Run {
    core: WorkerCore,
    goals: HashMap<GoalId, GoalAddr>,
    services: Arc<GoalServices>,
    reply: tokio::sync::oneshot::Sender<RealiseOutcome>,
}

/// The Worker actor. One run at a time; each [`Realise`] starts a fresh run (fresh
/// goals, counters and flags), as Nix makes a new Worker per operation.
pub struct Worker {
    cfg: WorkerConfig,
    executor: StoreExecutor,
    settings: Arc<WorkerSettings>,
    run: Option<Run>,
    /// Deferred slot grants (see [`GRANT_QUIET`]): the last goal report, since when
    /// grants wait, and whether the check ticks.
    last_report: std::time::Instant,
    deferred_since: Option<std::time::Instant>,
    ticking: bool,
    estimator: Option<Arc<dyn crate::schedule::Estimator>>,
}

/// Slots wait for every goal to settle (`crate::schedule`), but no longer than
/// this without any goal reporting, nor than [`GRANT_MAX_DELAY`] or the estimate
/// of the build the slot would start, whichever is shorter, in all.
pub const GRANT_QUIET: std::time::Duration = std::time::Duration::from_millis(100);
pub const GRANT_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

impl Worker {
    pub fn new(mut cfg: WorkerConfig) -> Worker {
        cfg.substituters.sort_by_key(|s| s.priority());
        let mut settings = cfg.settings.clone();
        settings.substituter_uris = cfg.substituters.iter().map(|s| s.uri()).collect();
        settings.substituter_trusted = cfg.substituters.iter().map(|s| s.is_trusted()).collect();
        let settings = Arc::new(settings);
        let env = Arc::new(JobEnv {
            store: cfg.store.clone(),
            substituters: cfg.substituters.clone(),
            drv_hashes: Mutex::new(Default::default()),
            settings: settings.clone(),
            contents: Default::default(),
        });
        Worker {
            executor: StoreExecutor::new(env),
            settings,
            cfg,
            run: None,
            last_report: std::time::Instant::now(),
            deferred_since: None,
            ticking: false,
            estimator: None,
        }
    }

    /// Build-time estimates for the critical-path scheduler (drover's build
    /// history; without them every build gets the default estimate).
    pub fn with_estimator(mut self, e: Arc<dyn crate::schedule::Estimator>) -> Worker {
        self.estimator = Some(e);
        self
    }

    /// Hands a goal's report to the core and performs what follows.
    fn report(&mut self, goal: GoalId, r: GoalReport) {
        self.last_report = std::time::Instant::now();
        if let Some(run) = self.run.as_mut() {
            if matches!(r, GoalReport::Finished(_) | GoalReport::Fatal(_)) {
                run.goals.remove(&goal);
            }
            run.core.report(goal, r);
        }
        self.drain();
    }

    /// Forces the deferred grants when goals stay unsettled (quiet for
    /// [`GRANT_QUIET`], or waiting for [`GRANT_MAX_DELAY`]).
    fn check_deferred_grants(&mut self) {
        let Some(run) = self.run.as_mut() else {
            self.deferred_since = None;
            return;
        };
        if !run.core.has_deferred_grants() {
            self.deferred_since = None;
            return;
        }
        let now = std::time::Instant::now();
        let since = *self.deferred_since.get_or_insert(now);
        // Waiting longer than the build it would start costs more than starting
        // it: a wrong choice delays the critical path by at most that build.
        let max = run
            .core
            .deferred_estimate()
            .map_or(GRANT_MAX_DELAY, |e| e.min(GRANT_MAX_DELAY));
        if now.duration_since(self.last_report) >= GRANT_QUIET || now.duration_since(since) >= max {
            self.deferred_since = None;
            run.core.grant_deferred();
            self.drain();
        }
    }

    fn drain(&mut self) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        for a in run.core.take_actions() {
            Self::perform(run, &self.cfg, a);
        }
        if run.core.is_finished() {
            if let Some(run) = self.run.take() {
                let _ = run.reply.send(run.core.outcome());
            }
        }
    }

    fn perform(run: &mut Run, cfg: &WorkerConfig, a: Action) {
        match a {
            Action::Spawn { goal, machine } => {
                let addr = GoalAddr::start(goal, *machine, &run.services);
                run.goals.insert(goal, addr);
            }
            Action::ToGoal { goal, msg } => {
                let cancel = matches!(msg, ToGoal::Cancel);
                if let Some(addr) = run.goals.get(&goal) {
                    addr.send(msg);
                }
                if cancel {
                    run.goals.remove(&goal);
                }
            }
            Action::Progress(ev) => {
                if let Some(p) = &cfg.progress {
                    p.do_send(ev);
                }
            }
        }
    }
}

impl Actor for Worker {
    type Context = Context<Self>;
}

impl Handler<Realise> for Worker {
    type Result = ResponseFuture<RealiseOutcome>;

    fn handle(&mut self, msg: Realise, ctx: &mut Context<Self>) -> Self::Result {
        if self.run.is_some() {
            return Box::pin(async {
                RealiseOutcome {
                    results: Vec::new(),
                    exit_status: 1,
                    errors: vec!["a realisation is already running in this worker".into()],
                }
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut core = WorkerCore::new(
            self.settings.clone(),
            self.cfg.store.store_dir().clone(),
            self.cfg.substituters.len(),
            self.cfg.hook.is_some(),
        );
        let services = Arc::new(GoalServices {
            env: core.goal_env().clone(),
            executor: self.executor.clone(),
            local_builder: self.cfg.local_builder.clone(),
            cancel_local_build: self.cfg.cancel_local_build.clone(),
            hook: self.cfg.hook.clone(),
            cancel_hook_build: self.cfg.cancel_hook_build.clone(),
            worker: WorkerLink::to(&ctx.address()),
        });
        if let Some(e) = &self.estimator {
            core.set_estimator(e.clone());
        }
        core.start(msg.requests, msg.mode);
        if !self.ticking {
            self.ticking = true;
            ctx.run_interval(std::time::Duration::from_millis(20), |act, _| {
                act.check_deferred_grants()
            });
        }
        self.run = Some(Run {
            core,
            goals: HashMap::new(),
            services,
            reply: tx,
        });
        self.drain();
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| RealiseOutcome {
                results: Vec::new(),
                exit_status: 1,
                errors: vec!["the worker stopped".into()],
            })
        })
    }
}

impl Handler<RequestSubGoals> for Worker {
    type Result = ();
    fn handle(&mut self, msg: RequestSubGoals, _: &mut Context<Self>) {
        self.report(msg.goal, GoalReport::WaitFor(msg.requests));
    }
}

impl Handler<AcquireSlot> for Worker {
    type Result = ();
    fn handle(&mut self, msg: AcquireSlot, _: &mut Context<Self>) {
        self.report(msg.goal, GoalReport::AcquireSlot(msg.kind));
    }
}

impl Handler<ReleaseSlot> for Worker {
    type Result = ();
    fn handle(&mut self, msg: ReleaseSlot, _: &mut Context<Self>) {
        self.report(msg.goal, GoalReport::ReleaseSlot(msg.kind));
    }
}

impl Handler<GoalProgress> for Worker {
    type Result = ();
    fn handle(&mut self, msg: GoalProgress, _: &mut Context<Self>) {
        self.report(msg.goal, GoalReport::Progress(msg.progress));
    }
}

impl Handler<GoalFinished> for Worker {
    type Result = ();
    fn handle(&mut self, msg: GoalFinished, _: &mut Context<Self>) {
        self.report(msg.goal, GoalReport::Finished(msg.finished));
    }
}

impl Handler<GoalFatal> for Worker {
    type Result = ();
    fn handle(&mut self, msg: GoalFatal, _: &mut Context<Self>) {
        self.report(msg.goal, GoalReport::Fatal(msg.error));
    }
}

impl Handler<GoalStopped> for Worker {
    type Result = ();
    fn handle(&mut self, msg: GoalStopped, _: &mut Context<Self>) {
        if let Some(run) = self.run.as_mut() {
            run.goals.remove(&msg.goal);
            run.core.goal_stopped(msg.goal);
        }
        self.drain();
    }
}

/// The user interrupted the run (SIGINT, SIGTERM): every goal is cancelled and the
/// run ends with `interrupted by the user` (exit status 1). Answered — and the
/// run's outcome sent — once every goal's builder or hook job has handled its
/// cancellation, so their process groups are killed before the caller goes on to
/// exit. Nothing happens when no run is going on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Interrupt;

impl Handler<Interrupt> for Worker {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Interrupt, _: &mut Context<Self>) -> Self::Result {
        let Some(mut run) = self.run.take() else {
            return Box::pin(actix::fut::ready(()));
        };
        run.core.interrupt();
        let mut acks = Vec::new();
        for a in run.core.take_actions() {
            match a {
                Action::ToGoal {
                    goal,
                    msg: ToGoal::Cancel,
                } => {
                    if let Some(addr) = run.goals.remove(&goal) {
                        acks.push(addr.cancel_acked());
                    }
                }
                other => Self::perform(&mut run, &self.cfg, other),
            }
        }
        Box::pin(
            async move {
                for a in acks {
                    a.await;
                }
            }
            .into_actor(self)
            .map(move |(), _, _| {
                let _ = run.reply.send(run.core.outcome());
            }),
        )
    }
}

/// Starts a Worker on the current arbiter.
pub fn spawn_worker(cfg: WorkerConfig) -> Addr<Worker> {
    Worker::new(cfg).start()
}
