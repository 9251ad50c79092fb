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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use drover::derived_path::DerivedPath;
use drover::store::LocalStore;

use super::{Action, RealiseOutcome, RunId, ToGoal, WorkerCore, WorkerSettings, INTERRUPTED};
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
/// Several may run at once (see [`Worker`]).
#[derive(Message)]
#[rtype(result = "RealiseOutcome")]
pub struct Realise {
    pub requests: Vec<DerivedPath>,
    pub mode: BuildMode,
}

/// [`Realise`] under a run id the caller chose ([`new_run_id`]), so that it can
/// end this run alone with [`CancelRun`] (e.g. when the client that asked for it
/// disconnects).
#[derive(Message)]
#[rtype(result = "RealiseOutcome")]
pub struct RealiseRun {
    pub run: RunId,
    pub requests: Vec<DerivedPath>,
    pub mode: BuildMode,
    /// `keep-going` for this run (default: the run's settings').
    pub keep_going: Option<bool>,
    /// The run's own settings (a daemon client's `SetOptions`; default: the
    /// Worker's), read by the goals this run makes. What belongs to the Worker
    /// rather than to a run — the substituters' URIs and trust, echoing build
    /// output, goal events — stays the Worker's.
    pub settings: Option<Arc<WorkerSettings>>,
    /// The run's own substituters, in order of priority (a daemon client's
    /// `substituters`; default: the Worker's).
    pub substituters: Option<Vec<Arc<dyn Substituter>>>,
}

/// Ends one run as an interrupt would (`interrupted by the user`): the goals no
/// other run needs are cancelled; the run's [`RealiseRun`] is answered. A queued
/// run is answered at once; an unknown or finished run is left alone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelRun(pub RunId);

static NEXT_RUN_ID: AtomicU64 = AtomicU64::new(1);

/// A run id no other run of this process has.
pub fn new_run_id() -> RunId {
    NEXT_RUN_ID.fetch_add(1, Ordering::Relaxed)
}

/// The address of a live goal actor, of whichever kind.
enum GoalAddr {
    Drv(Addr<GoalActor<DerivationGoal>>),
    Subst(Addr<GoalActor<PathSubstitutionGoal>>),
    DrvOut(Addr<GoalActor<DrvOutputSubstitutionGoal>>),
}

impl GoalAddr {
    fn start(id: GoalId, machine: AnyGoal, sub: bool, services: &Arc<GoalServices>) -> GoalAddr {
        let s = services.clone();
        match machine {
            AnyGoal::Drv(g) => GoalAddr::Drv(GoalActor::new(id, g, s).subgoal(sub).start()),
            AnyGoal::Subst(g) => GoalAddr::Subst(GoalActor::new(id, g, s).subgoal(sub).start()),
            AnyGoal::DrvOut(g) => GoalAddr::DrvOut(GoalActor::new(id, g, s).subgoal(sub).start()),
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

/// The runs going on, sharing one core and its goals.
struct Active {
    core: WorkerCore,
    goals: HashMap<GoalId, GoalAddr>,
    services: Arc<GoalServices>,
    replies: BTreeMap<RunId, tokio::sync::oneshot::Sender<RealiseOutcome>>,
    /// The runs are of a mode other than [`BuildMode::Normal`], which runs alone.
    exclusive: bool,
}

impl Active {
    /// Sends each finished run its outcome.
    fn answer_finished_runs(&mut self) {
        for run in self.core.finished_runs() {
            if let Some(outcome) = self.core.take_outcome(run) {
                if let Some(reply) = self.replies.remove(&run) {
                    let _ = reply.send(outcome);
                }
            }
        }
    }
}

/// A run waiting for the ones going on to end (see [`Worker`]).
struct Queued {
    run: RunId,
    requests: Vec<DerivedPath>,
    mode: BuildMode,
    settings: Arc<WorkerSettings>,
    substituters: Option<Arc<[Arc<dyn Substituter>]>>,
    reply: tokio::sync::oneshot::Sender<RealiseOutcome>,
}

/// The Worker actor. Runs ([`Realise`], [`RealiseRun`]) that arrive while others
/// go on join them in the same core, sharing its goals: two runs asking for the
/// same derivation get one build and both its result. A run that repairs or
/// checks ([`BuildMode::Repair`], [`BuildMode::Check`]) must not share goals
/// with runs of another mode, so it waits for the runs going on to end, and
/// runs that come while it goes on wait for it. When the last run ends, the core
/// goes with it (fresh goals, counters and hook state next time, as Nix makes a
/// new Worker per operation).
pub struct Worker {
    cfg: WorkerConfig,
    executor: StoreExecutor,
    settings: Arc<WorkerSettings>,
    active: Option<Active>,
    queue: VecDeque<Queued>,
    /// Deferred slot grants (see [`GRANT_QUIET`]): the last goal report, since when
    /// grants wait, and whether the check ticks.
    last_report: std::time::Instant,
    deferred_since: Option<std::time::Instant>,
    ticking: bool,
    estimator: Option<Arc<dyn crate::schedule::Estimator>>,
    /// A refresh of the estimator is under way ([`Worker::refresh_estimates`]).
    refreshing: Arc<std::sync::atomic::AtomicBool>,
}

/// Slots wait for every goal to settle (`crate::schedule`), but no longer than
/// this without any goal reporting, nor than [`GRANT_MAX_DELAY`] or the estimate
/// of the build the slot would start, whichever is shorter, in all; then they are
/// forced with a reserve kept for goals still loading (`schedule::Force::Limit`),
/// and after [`GRANT_MAX_DELAY`] without it (`schedule::Force::All`).
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
            registrations: Default::default(),
        });
        Worker {
            executor: StoreExecutor::new(env),
            settings,
            cfg,
            active: None,
            queue: VecDeque::new(),
            last_report: std::time::Instant::now(),
            deferred_since: None,
            ticking: false,
            estimator: None,
            refreshing: Default::default(),
        }
    }

    /// Build-time estimates for the critical-path scheduler (drover's build
    /// history; without them every build gets the default estimate).
    pub fn with_estimator(mut self, e: Arc<dyn crate::schedule::Estimator>) -> Worker {
        self.estimator = Some(e);
        self
    }

    /// Brings the estimator up to date with the build history (on a blocking
    /// thread; one refresh at a time) when a core ends and when one starts, so a
    /// long-running Worker (`drover daemon`) schedules by every build recorded
    /// since it started, by this process or by others.
    fn refresh_estimates(&self) {
        let Some(e) = self.estimator.clone() else {
            return;
        };
        if self
            .refreshing
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let busy = self.refreshing.clone();
        tokio::task::spawn_blocking(move || {
            e.refresh();
            busy.store(false, std::sync::atomic::Ordering::Release);
        });
    }

    /// Hands a goal's report to the core and performs what follows.
    fn report(&mut self, goal: GoalId, r: GoalReport, ctx: &mut Context<Self>) {
        self.last_report = std::time::Instant::now();
        if let Some(active) = self.active.as_mut() {
            if matches!(r, GoalReport::Finished(_) | GoalReport::Fatal(_)) {
                active.goals.remove(&goal);
            }
            active.core.report(goal, r);
        }
        self.drain(ctx);
    }

    /// Forces the deferred grants when goals stay unsettled (quiet for
    /// [`GRANT_QUIET`], or waiting for the estimate of the build the slot would
    /// start: one slot of each kind is kept while goals are still loaded), and
    /// every free slot after [`GRANT_MAX_DELAY`] of waiting. The wait is counted
    /// from when the grant was first deferred until a forced grant gives a slot.
    fn check_deferred_grants(&mut self, ctx: &mut Context<Self>) {
        let Some(active) = self.active.as_mut() else {
            self.deferred_since = None;
            return;
        };
        if !active.core.has_deferred_grants() {
            self.deferred_since = None;
            return;
        }
        let now = std::time::Instant::now();
        let since = *self.deferred_since.get_or_insert(now);
        // Waiting longer than the build it would start costs more than starting
        // it: a wrong choice delays the critical path by at most that build.
        let max = active
            .core
            .deferred_estimate()
            .map_or(GRANT_MAX_DELAY, |e| e.min(GRANT_MAX_DELAY));
        let waited = now.duration_since(since);
        if now.duration_since(self.last_report) >= GRANT_QUIET || waited >= max {
            if active.core.grant_deferred(waited >= GRANT_MAX_DELAY) {
                self.deferred_since = None;
            }
            self.drain(ctx);
        }
    }

    /// Whether a run of `mode` may join the runs going on now.
    fn may_start(&self, mode: BuildMode) -> bool {
        match &self.active {
            None => true,
            Some(a) => !a.exclusive && mode == BuildMode::Normal,
        }
    }

    /// Starts a run in the core (making the core if no run goes on).
    fn start_run(&mut self, q: Queued, ctx: &mut Context<Self>) {
        if !self.ticking {
            self.ticking = true;
            ctx.run_interval(std::time::Duration::from_millis(20), |act, ctx| {
                act.check_deferred_grants(ctx)
            });
        }
        let estimator = self.estimator.clone();
        if self.active.is_none() {
            self.refresh_estimates();
        }
        let active = self.active.get_or_insert_with(|| {
            let mut core = WorkerCore::new(
                self.settings.clone(),
                self.cfg.store.store_dir().clone(),
                self.cfg.substituters.len(),
                self.cfg.hook.is_some(),
            );
            if let Some(e) = estimator {
                core.set_estimator(e);
            }
            let services = Arc::new(GoalServices {
                env: core.goal_env().clone(),
                executor: self.executor.clone(),
                local_builder: self.cfg.local_builder.clone(),
                cancel_local_build: self.cfg.cancel_local_build.clone(),
                hook: self.cfg.hook.clone(),
                cancel_hook_build: self.cfg.cancel_hook_build.clone(),
                worker: WorkerLink::to(&ctx.address()),
            });
            Active {
                core,
                goals: HashMap::new(),
                services,
                replies: BTreeMap::new(),
                exclusive: q.mode != BuildMode::Normal,
            }
        });
        if active
            .core
            .start_run_with(q.run, q.requests, q.mode, q.settings, q.substituters)
        {
            active.replies.insert(q.run, q.reply);
        } else {
            let _ = q.reply.send(RealiseOutcome {
                results: Vec::new(),
                exit_status: 1,
                errors: vec![format!("realisation run {} is already going on", q.run)],
                fatal: true,
            });
        }
    }

    /// Performs the core's actions, answers the runs that ended, drops the core
    /// when none is left, and starts the queued runs that may start.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        loop {
            if let Some(active) = self.active.as_mut() {
                for a in active.core.take_actions() {
                    Self::perform(active, &self.cfg, a);
                }
                active.answer_finished_runs();
                if active.core.live_runs() == 0 {
                    self.active = None;
                    // What this core's builds recorded informs the next one.
                    self.refresh_estimates();
                }
            }
            let Some(next) = self.queue.front() else {
                return;
            };
            if !self.may_start(next.mode) {
                return;
            }
            let next = self.queue.pop_front().expect("a queued run");
            self.start_run(next, ctx);
        }
    }

    fn perform(active: &mut Active, cfg: &WorkerConfig, a: Action) {
        match a {
            Action::Spawn {
                goal,
                machine,
                env,
                subgoal,
            } => {
                // A goal of a run with settings of its own reads them.
                let services = if Arc::ptr_eq(&env, &active.services.env) {
                    active.services.clone()
                } else {
                    Arc::new(GoalServices {
                        env,
                        ..(*active.services).clone()
                    })
                };
                let addr = GoalAddr::start(goal, *machine, subgoal, &services);
                active.goals.insert(goal, addr);
            }
            Action::ToGoal { goal, msg } => {
                let cancel = matches!(msg, ToGoal::Cancel);
                if let Some(addr) = active.goals.get(&goal) {
                    addr.send(msg);
                }
                if cancel {
                    active.goals.remove(&goal);
                }
            }
            Action::Progress(ev) => {
                if let Some(p) = &cfg.progress {
                    p.do_send(ev);
                }
            }
        }
    }

    /// The settings of a run: the Worker's, or the run's own with what belongs
    /// to the Worker kept (see [`RealiseRun::settings`]), and its keep-going;
    /// the URIs and trust of its own substituters if it has them.
    fn run_settings(
        &self,
        own: Option<Arc<WorkerSettings>>,
        keep_going: Option<bool>,
        substituters: Option<&[Arc<dyn Substituter>]>,
    ) -> Arc<WorkerSettings> {
        let w = &self.settings;
        let mut s = match own {
            None if substituters.is_none() => w.clone(),
            own => {
                let mut s = own.map_or_else(|| (**w).clone(), |s| (*s).clone());
                match substituters {
                    None => {
                        s.substituter_uris = w.substituter_uris.clone();
                        s.substituter_trusted = w.substituter_trusted.clone();
                    }
                    Some(subs) => {
                        s.substituter_uris = subs.iter().map(|s| s.uri()).collect();
                        s.substituter_trusted = subs.iter().map(|s| s.is_trusted()).collect();
                    }
                }
                s.log.echo = w.log.echo;
                s.goal_events = w.goal_events;
                Arc::new(s)
            }
        };
        if let Some(k) = keep_going {
            if k != s.keep_going {
                Arc::make_mut(&mut s).keep_going = k;
            }
        }
        s
    }

    /// Queues a run, starting it at once if it may.
    fn submit(&mut self, q: Queued, ctx: &mut Context<Self>) {
        self.queue.push_back(q);
        self.drain(ctx);
    }
}

/// The answer to a run that never started.
fn interrupted() -> RealiseOutcome {
    RealiseOutcome {
        results: Vec::new(),
        exit_status: 1,
        errors: vec![INTERRUPTED.to_owned()],
        fatal: true,
    }
}

fn await_outcome(
    rx: tokio::sync::oneshot::Receiver<RealiseOutcome>,
) -> ResponseFuture<RealiseOutcome> {
    Box::pin(async move {
        rx.await.unwrap_or_else(|_| RealiseOutcome {
            results: Vec::new(),
            exit_status: 1,
            errors: vec!["the worker stopped".into()],
            fatal: true,
        })
    })
}

impl Actor for Worker {
    type Context = Context<Self>;
}

impl Handler<Realise> for Worker {
    type Result = ResponseFuture<RealiseOutcome>;

    fn handle(&mut self, msg: Realise, ctx: &mut Context<Self>) -> Self::Result {
        let run = RealiseRun {
            run: new_run_id(),
            requests: msg.requests,
            mode: msg.mode,
            keep_going: None,
            settings: None,
            substituters: None,
        };
        <Self as Handler<RealiseRun>>::handle(self, run, ctx)
    }
}

impl Handler<RealiseRun> for Worker {
    type Result = ResponseFuture<RealiseOutcome>;

    fn handle(&mut self, msg: RealiseRun, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let substituters = msg.substituters.map(|mut s| {
            s.sort_by_key(|s| s.priority());
            Arc::<[Arc<dyn Substituter>]>::from(s)
        });
        let settings = self.run_settings(msg.settings, msg.keep_going, substituters.as_deref());
        self.submit(
            Queued {
                run: msg.run,
                requests: msg.requests,
                mode: msg.mode,
                settings,
                substituters,
                reply: tx,
            },
            ctx,
        );
        await_outcome(rx)
    }
}

impl Handler<CancelRun> for Worker {
    type Result = ();

    fn handle(&mut self, msg: CancelRun, ctx: &mut Context<Self>) {
        if let Some(i) = self.queue.iter().position(|q| q.run == msg.0) {
            if let Some(q) = self.queue.remove(i) {
                let _ = q.reply.send(interrupted());
            }
            return;
        }
        if let Some(active) = self.active.as_mut() {
            active.core.interrupt_run(msg.0);
        }
        self.drain(ctx);
    }
}

impl Handler<RequestSubGoals> for Worker {
    type Result = ();
    fn handle(&mut self, msg: RequestSubGoals, ctx: &mut Context<Self>) {
        self.report(msg.goal, GoalReport::WaitFor(msg.requests), ctx);
    }
}

impl Handler<AcquireSlot> for Worker {
    type Result = ();
    fn handle(&mut self, msg: AcquireSlot, ctx: &mut Context<Self>) {
        self.report(msg.goal, GoalReport::AcquireSlot(msg.kind), ctx);
    }
}

impl Handler<ReleaseSlot> for Worker {
    type Result = ();
    fn handle(&mut self, msg: ReleaseSlot, ctx: &mut Context<Self>) {
        self.report(msg.goal, GoalReport::ReleaseSlot(msg.kind), ctx);
    }
}

impl Handler<GoalProgress> for Worker {
    type Result = ();
    fn handle(&mut self, msg: GoalProgress, ctx: &mut Context<Self>) {
        self.report(msg.goal, GoalReport::Progress(msg.progress), ctx);
    }
}

impl Handler<GoalFinished> for Worker {
    type Result = ();
    fn handle(&mut self, msg: GoalFinished, ctx: &mut Context<Self>) {
        self.report(msg.goal, GoalReport::Finished(msg.finished), ctx);
    }
}

impl Handler<GoalFatal> for Worker {
    type Result = ();
    fn handle(&mut self, msg: GoalFatal, ctx: &mut Context<Self>) {
        self.report(msg.goal, GoalReport::Fatal(msg.error), ctx);
    }
}

impl Handler<GoalStopped> for Worker {
    type Result = ();
    fn handle(&mut self, msg: GoalStopped, ctx: &mut Context<Self>) {
        if let Some(active) = self.active.as_mut() {
            active.goals.remove(&msg.goal);
            active.core.goal_stopped(msg.goal);
        }
        self.drain(ctx);
    }
}

/// The user interrupted (SIGINT, SIGTERM): every goal is cancelled and every run
/// ends with `interrupted by the user` (exit status 1), queued ones too. Answered
/// — and the runs' outcomes sent — once every goal's builder or hook job has
/// handled its cancellation, so their process groups are killed before the
/// caller goes on to exit. Nothing happens when no run is going on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Interrupt;

impl Handler<Interrupt> for Worker {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Interrupt, _: &mut Context<Self>) -> Self::Result {
        for q in self.queue.drain(..) {
            let _ = q.reply.send(interrupted());
        }
        let Some(mut active) = self.active.take() else {
            return Box::pin(actix::fut::ready(()));
        };
        active.core.interrupt();
        let mut acks = Vec::new();
        for a in active.core.take_actions() {
            match a {
                Action::ToGoal {
                    goal,
                    msg: ToGoal::Cancel,
                } => {
                    if let Some(addr) = active.goals.remove(&goal) {
                        acks.push(addr.cancel_acked());
                    }
                }
                other => Self::perform(&mut active, &self.cfg, other),
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
                active.answer_finished_runs();
            }),
        )
    }
}

/// Starts a Worker on the current arbiter.
pub fn spawn_worker(cfg: WorkerConfig) -> Addr<Worker> {
    Worker::new(cfg).start()
}
