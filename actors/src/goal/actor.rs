//! The goal actor: one actix actor per live goal, a thin shell around a
//! [`GoalHost`] (the state machine and the shared effect performer).
//!
//! `GoalActor<DerivationGoal>`, `GoalActor<PathSubstitutionGoal>` and
//! `GoalActor<DrvOutputSubstitutionGoal>` are the three goal actors. Each takes the
//! Worker's messages ([`StartGoal`], [`SubGoalDone`], [`AllSubGoalsDone`],
//! [`SlotGranted`], [`AddWantedOutputs`], [`CancelGoal`]) and the replies of the
//! actors it uses itself — the LocalBuilder ([`LocalBuildFinished`]), the hook pool
//! (the answer to [`HookTry`]) and the hook job ([`HookFinished`]) — and reports to
//! the Worker through the injected [`WorkerLink`]. Blocking store jobs run on the
//! store executor and their futures live in the goal's own context, so the Worker's
//! context never holds one future per waiting goal.
//!
//! A goal actor that stops without having reported an end (dropped, its arbiter
//! stopped) sends [`GoalStopped`]; a panicking step or store job becomes a failed
//! goal ([`GoalHost`]).

use std::sync::Arc;

use actix::prelude::*;

use super::host::{EffectSink, GoalEnv, GoalHost, GoalMachine, GoalReport, HookBuildWork};
use super::{Event, GoalId, Job};
use crate::messages::{
    AcquireSlot, AddWantedOutputs, AllSubGoalsDone, CancelGoal, CancelHookBuild, CancelLocalBuild,
    GoalFatal, GoalFinished, GoalProgress, GoalStopped, HookBuild, HookFinished, HookReply,
    HookTry, LocalBuildFinished, LocalBuildRequest, ReleaseSlot, RequestSubGoals, RunLocalBuild,
    SlotGranted, StartGoal, SubGoalDone, WorkerLink,
};
use crate::store_executor::{JobPriority, StoreExecutor};

/// What every goal actor of a run is given: the actors it reaches and the run's
/// shared goal environment. Injected at construction; tests pass fakes.
#[derive(Clone)]
pub struct GoalServices {
    pub env: Arc<GoalEnv>,
    pub executor: StoreExecutor,
    pub local_builder: Recipient<RunLocalBuild>,
    pub cancel_local_build: Recipient<CancelLocalBuild>,
    /// The hook pool, when a build hook is configured.
    pub hook: Option<Recipient<HookTry>>,
    pub cancel_hook_build: Option<Recipient<CancelHookBuild>>,
    pub worker: WorkerLink,
}

/// One live goal.
pub struct GoalActor<G: GoalMachine> {
    host: GoalHost<G>,
    services: Arc<GoalServices>,
    /// The goal has asked for a store job before (its later jobs go first: see
    /// [`JobPriority`]).
    ran_a_job: bool,
    /// Another goal waits for this one: its first job is a
    /// [`JobPriority::StartSubGoal`].
    subgoal: bool,
}

impl<G: GoalMachine + Unpin> GoalActor<G> {
    pub fn new(id: GoalId, goal: G, services: Arc<GoalServices>) -> GoalActor<G> {
        GoalActor {
            host: GoalHost::new(id, goal, services.env.clone()),
            services,
            ran_a_job: false,
            subgoal: false,
        }
    }

    /// `subgoal`: another goal waits for this one (its first job goes before
    /// the first jobs of requested goals).
    pub fn subgoal(mut self, subgoal: bool) -> GoalActor<G> {
        self.subgoal = subgoal;
        self
    }

    /// The goal's state and the sink that performs its effects from this actor
    /// (`acks`: collect the answers to cancellations, see [`ActorSink::acks`]).
    fn split<'a>(
        &'a mut self,
        ctx: &'a mut Context<Self>,
        acks: Option<Vec<Ack>>,
    ) -> (&'a mut GoalHost<G>, ActorSink<'a, G>) {
        let GoalActor {
            host,
            services,
            ran_a_job,
            subgoal,
        } = self;
        let sink = ActorSink {
            id: host.id,
            services,
            ctx,
            acks,
            ran_a_job,
            subgoal: *subgoal,
        };
        (host, sink)
    }

    fn step(&mut self, ev: Event, ctx: &mut Context<Self>) {
        let (host, mut sink) = self.split(ctx, None);
        host.step(ev, &mut sink);
        if self.host.is_finished() {
            ctx.stop();
        }
    }

    fn on_job(&mut self, ev: Result<Event, String>, ctx: &mut Context<Self>) {
        // What the job had to say comes before what its result causes.
        for m in self.services.executor.env().contents.take_notices() {
            self.services.worker.progress.do_send(GoalProgress {
                goal: self.host.id,
                progress: super::host::GoalProgressKind::Message(m),
            });
        }
        match ev {
            Ok(ev) => self.step(ev, ctx),
            Err(panic) => {
                let (host, mut sink) = self.split(ctx, None);
                host.job_panicked(&panic, &mut sink);
                ctx.stop();
            }
        }
    }
}

/// Performs a goal's own effects from inside its actor.
struct ActorSink<'a, G: GoalMachine + Unpin> {
    id: GoalId,
    services: &'a GoalServices,
    ctx: &'a mut Context<GoalActor<G>>,
    /// When set, cancellations are sent with `send` and their answers collected,
    /// so that whoever cancelled the goal can wait for them.
    acks: Option<Vec<Ack>>,
    ran_a_job: &'a mut bool,
    subgoal: bool,
}

/// The answer to a cancellation a goal passed on to its builder or hook job.
type Ack = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

impl<G: GoalMachine + Unpin> EffectSink for ActorSink<'_, G> {
    fn blocking(&mut self, job: Job) {
        let priority = if std::mem::replace(self.ran_a_job, true) {
            JobPriority::Continue
        } else if self.subgoal {
            JobPriority::StartSubGoal
        } else {
            JobPriority::Start
        };
        let fut = self.services.executor.run(job, priority);
        self.ctx.spawn(
            actix::fut::wrap_future::<_, GoalActor<G>>(fut).map(|ev, act, ctx| act.on_job(ev, ctx)),
        );
    }

    fn run_local_build(&mut self, request: LocalBuildRequest) {
        self.services.local_builder.do_send(RunLocalBuild {
            id: self.id,
            request,
            reply_to: self.ctx.address().recipient(),
        });
    }

    fn cancel_local_build(&mut self) {
        let msg = CancelLocalBuild { id: self.id };
        match &mut self.acks {
            Some(acks) => {
                let r = self.services.cancel_local_build.send(msg);
                acks.push(Box::pin(async move {
                    let _ = r.await;
                }));
            }
            None => self.services.cancel_local_build.do_send(msg),
        }
    }

    fn hook_try(&mut self, request: HookTry) {
        let Some(hook) = &self.services.hook else {
            self.later(Event::HookReply(HookReply::DeclinePermanently));
            return;
        };
        let fut = hook.send(request);
        self.ctx.spawn(
            actix::fut::wrap_future::<_, GoalActor<G>>(fut).map(|r, act, ctx| {
                // A hook pool that went away counts as declining permanently.
                let reply = r.unwrap_or(HookReply::DeclinePermanently);
                act.step(Event::HookReply(reply), ctx);
            }),
        );
    }

    fn hook_build(&mut self, job: Recipient<HookBuild>, w: HookBuildWork) {
        job.do_send(HookBuild {
            id: w.id,
            inputs: w.inputs,
            missing_outputs: w.missing_outputs,
            log: w.log,
            reply_to: self.ctx.address().recipient(),
        });
    }

    fn cancel_hook_build(&mut self) {
        let Some(c) = &self.services.cancel_hook_build else {
            return;
        };
        let msg = CancelHookBuild { id: self.id };
        match &mut self.acks {
            Some(acks) => {
                let r = c.send(msg);
                acks.push(Box::pin(async move {
                    let _ = r.await;
                }));
            }
            None => c.do_send(msg),
        }
    }

    fn wake_later(&mut self) {
        let interval = self.services.env.settings.poll_interval;
        self.ctx
            .run_later(interval, |act, ctx| act.step(Event::Wake, ctx));
    }

    fn later(&mut self, ev: Event) {
        self.ctx.notify(Later(ev));
    }

    fn report(&mut self, report: GoalReport) {
        let w = &self.services.worker;
        let goal = self.id;
        match report {
            GoalReport::WaitFor(requests) => w
                .request_sub_goals
                .do_send(RequestSubGoals { goal, requests }),
            GoalReport::AcquireSlot(kind) => w.acquire_slot.do_send(AcquireSlot { goal, kind }),
            GoalReport::ReleaseSlot(kind) => w.release_slot.do_send(ReleaseSlot { goal, kind }),
            GoalReport::Progress(progress) => w.progress.do_send(GoalProgress { goal, progress }),
            GoalReport::Finished(finished) => w.finished.do_send(GoalFinished { goal, finished }),
            GoalReport::Fatal(error) => w.fatal.do_send(GoalFatal { goal, error }),
        }
    }
}

/// An event for the goal on a later turn.
struct Later(Event);

impl Message for Later {
    type Result = ();
}

impl<G: GoalMachine + Unpin> Actor for GoalActor<G> {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        if !self.host.is_finished() {
            self.services
                .worker
                .stopped
                .do_send(GoalStopped { goal: self.host.id });
        }
    }
}

impl<G: GoalMachine + Unpin> Handler<Later> for GoalActor<G> {
    type Result = ();
    fn handle(&mut self, msg: Later, ctx: &mut Context<Self>) {
        self.step(msg.0, ctx);
    }
}

impl<G: GoalMachine + Unpin> Handler<StartGoal> for GoalActor<G> {
    type Result = ();
    fn handle(&mut self, _: StartGoal, ctx: &mut Context<Self>) {
        self.step(Event::Start, ctx);
    }
}

impl<G: GoalMachine + Unpin> Handler<SubGoalDone> for GoalActor<G> {
    type Result = ();
    fn handle(&mut self, msg: SubGoalDone, ctx: &mut Context<Self>) {
        self.step(Event::WaiteeDone(msg.0), ctx);
    }
}

impl<G: GoalMachine + Unpin> Handler<AllSubGoalsDone> for GoalActor<G> {
    type Result = ();
    fn handle(&mut self, _: AllSubGoalsDone, ctx: &mut Context<Self>) {
        self.step(Event::WaiteesDone, ctx);
    }
}

impl<G: GoalMachine + Unpin> Handler<SlotGranted> for GoalActor<G> {
    type Result = ();
    fn handle(&mut self, _: SlotGranted, ctx: &mut Context<Self>) {
        self.step(Event::SlotGranted, ctx);
    }
}

impl<G: GoalMachine + Unpin> Handler<AddWantedOutputs> for GoalActor<G> {
    type Result = ();
    fn handle(&mut self, msg: AddWantedOutputs, _: &mut Context<Self>) {
        self.host.add_wanted_outputs(&msg.0);
    }
}

/// Answered once the builder or hook job has handled the cancellation of a running
/// build (an interrupted run waits for that before the process exits).
impl<G: GoalMachine + Unpin> Handler<CancelGoal> for GoalActor<G> {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: CancelGoal, ctx: &mut Context<Self>) -> Self::Result {
        let (host, mut sink) = self.split(ctx, Some(Vec::new()));
        host.cancel(&mut sink);
        let acks = sink.acks.take().unwrap_or_default();
        ctx.stop();
        Box::pin(async move {
            for a in acks {
                a.await;
            }
        })
    }
}

impl<G: GoalMachine + Unpin> Handler<LocalBuildFinished> for GoalActor<G> {
    type Result = ();
    fn handle(&mut self, msg: LocalBuildFinished, ctx: &mut Context<Self>) {
        self.step(Event::LocalBuildFinished(msg), ctx);
    }
}

impl<G: GoalMachine + Unpin> Handler<HookFinished> for GoalActor<G> {
    type Result = ();
    fn handle(&mut self, msg: HookFinished, ctx: &mut Context<Self>) {
        self.step(Event::HookFinished(msg), ctx);
    }
}
