//! The thin Worker actor: runs [`WorkerCore`] and performs its actions.
//!
//! Blocking jobs go to the store executor (`spawn_blocking`), local builds to the
//! injected `Recipient<RunLocalBuild>`, hook requests to the injected
//! `Recipient<HookTry>`, timers through `run_later`, progress to the optional
//! `Recipient<ProgressEvent>`. Replies (`LocalBuildFinished`, `HookFinished`) are
//! routed to the goal by id. Cancelled hook builds get `CancelHookBuild` through the
//! injected recipient (usually the hook pool's address); without one, a cancelled
//! hook build runs on until its job ends.

use std::sync::{Arc, Mutex};

use actix::prelude::*;
use drover::derived_path::DerivedPath;
use drover::store::LocalStore;

use super::{Action, RealiseOutcome, WorkerCore, WorkerSettings};
use crate::goal::{Event, GoalId, JobEnv};
use crate::messages::{
    BuildMode, CancelHookBuild, CancelLocalBuild, HookBuild, HookFinished, HookReply, HookTry,
    LocalBuildFinished, LogConfig, RunLocalBuild,
};
use crate::progress::ProgressEvent;
use crate::store_executor::StoreExecutor;
use crate::substituter::Substituter;

/// Everything a Worker needs; every effect is injected.
pub struct WorkerConfig {
    pub store: Arc<LocalStore>,
    /// The LocalBuilder (answers [`RunLocalBuild`] with [`LocalBuildFinished`]).
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

/// The Worker actor. One run at a time; each [`Realise`] starts a fresh run (fresh
/// goals, counters and flags), as Nix makes a new Worker per operation.
pub struct Worker {
    cfg: WorkerConfig,
    executor: StoreExecutor,
    settings: Arc<WorkerSettings>,
    core: Option<WorkerCore>,
    reply: Option<tokio::sync::oneshot::Sender<RealiseOutcome>>,
}

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
            core: None,
            reply: None,
        }
    }

    fn deliver(&mut self, goal: GoalId, ev: Event, ctx: &mut Context<Self>) {
        if let Some(core) = self.core.as_mut() {
            core.deliver(goal, ev);
        }
        self.drain(ctx);
    }

    fn drain(&mut self, ctx: &mut Context<Self>) {
        let Some(core) = self.core.as_mut() else {
            return;
        };
        let actions = core.take_actions();
        let finished = core.is_finished();
        for a in actions {
            self.perform(a, ctx);
        }
        if finished {
            if let Some(core) = self.core.take() {
                let outcome = core.outcome();
                if let Some(tx) = self.reply.take() {
                    let _ = tx.send(outcome);
                }
            }
        }
    }

    fn perform(&mut self, a: Action, ctx: &mut Context<Self>) {
        match a {
            Action::Blocking { goal, job } => {
                let fut = self.executor.run(job);
                ctx.spawn(fut.into_actor(self).map(move |ev, act, ctx| {
                    // What the job had to say comes before what its result causes.
                    if let Some(p) = &act.cfg.progress {
                        for m in act.executor.env().contents.take_notices() {
                            p.do_send(ProgressEvent::Message(m));
                        }
                    }
                    act.deliver(goal, ev, ctx);
                }));
            }
            Action::RunLocalBuild { goal, request } => {
                self.cfg.local_builder.do_send(RunLocalBuild {
                    id: goal,
                    request,
                    reply_to: ctx.address().recipient(),
                });
            }
            Action::CancelLocalBuild { goal } => {
                self.cfg
                    .cancel_local_build
                    .do_send(CancelLocalBuild { id: goal });
            }
            Action::CancelHookBuild { goal } => {
                if let Some(c) = &self.cfg.cancel_hook_build {
                    c.do_send(CancelHookBuild { id: goal });
                }
            }
            Action::HookTry {
                goal,
                am_willing,
                system,
                drv_path,
                required_features,
            } => {
                let Some(hook) = self.cfg.hook.clone() else {
                    ctx.notify(Deliver(goal, Some(HookReply::DeclinePermanently)));
                    return;
                };
                let fut = hook.send(HookTry {
                    am_willing,
                    system,
                    drv_path,
                    required_features,
                });
                ctx.spawn(fut.into_actor(self).map(move |r, act, ctx| {
                    // A hook pool that went away counts as declining permanently.
                    let reply = r.unwrap_or(HookReply::DeclinePermanently);
                    act.deliver(goal, Event::HookReply(reply), ctx);
                }));
            }
            Action::HookBuild {
                goal,
                job,
                drv_path,
                inputs,
                missing_outputs,
            } => {
                let l = &self.settings.log;
                job.do_send(HookBuild {
                    id: goal,
                    inputs,
                    missing_outputs,
                    log: LogConfig {
                        drv_path,
                        log_dir: l.log_dir.clone(),
                        compress: l.compress,
                        tail_lines: l.tail_lines,
                        max_log_size: l.max_log_size,
                        max_silent_time: l.max_silent_time,
                        timeout: l.timeout,
                        echo: l.echo,
                    },
                    reply_to: ctx.address().recipient(),
                });
            }
            Action::Timer { goal } => {
                ctx.run_later(self.settings.poll_interval, move |act, ctx| {
                    act.deliver(goal, Event::Wake, ctx);
                });
            }
            Action::Progress(ev) => {
                if let Some(p) = &self.cfg.progress {
                    p.do_send(ev);
                }
            }
        }
    }
}

/// Internal: deliver a hook reply on the next turn.
#[derive(Message)]
#[rtype(result = "()")]
struct Deliver(GoalId, Option<HookReply>);

impl Handler<Deliver> for Worker {
    type Result = ();
    fn handle(&mut self, msg: Deliver, ctx: &mut Context<Self>) {
        if let Some(r) = msg.1 {
            self.deliver(msg.0, Event::HookReply(r), ctx);
        }
    }
}

impl Actor for Worker {
    type Context = Context<Self>;
}

impl Handler<Realise> for Worker {
    type Result = ResponseFuture<RealiseOutcome>;

    fn handle(&mut self, msg: Realise, ctx: &mut Context<Self>) -> Self::Result {
        if self.core.is_some() {
            return Box::pin(async {
                RealiseOutcome {
                    results: Vec::new(),
                    exit_status: 1,
                    errors: vec!["a realisation is already running in this worker".into()],
                }
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.reply = Some(tx);
        let mut core = WorkerCore::new(
            self.settings.clone(),
            self.cfg.store.store_dir().clone(),
            self.cfg.substituters.len(),
            self.cfg.hook.is_some(),
        );
        core.start(msg.requests, msg.mode);
        self.core = Some(core);
        self.drain(ctx);
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| RealiseOutcome {
                results: Vec::new(),
                exit_status: 1,
                errors: vec!["the worker stopped".into()],
            })
        })
    }
}

impl Handler<LocalBuildFinished> for Worker {
    type Result = ();
    fn handle(&mut self, msg: LocalBuildFinished, ctx: &mut Context<Self>) {
        let id = msg.id;
        self.deliver(id, Event::LocalBuildFinished(msg), ctx);
    }
}

impl Handler<HookFinished> for Worker {
    type Result = ();
    fn handle(&mut self, msg: HookFinished, ctx: &mut Context<Self>) {
        let id = msg.id;
        self.deliver(id, Event::HookFinished(msg), ctx);
    }
}

/// The user interrupted the run (SIGINT, SIGTERM): cancel every goal and end the
/// run with `interrupted by the user` (exit status 1). Answered once the local
/// builder and the hook pool have handled the cancellations, so their process
/// groups are killed before the caller goes on to exit.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Interrupt;

impl Handler<Interrupt> for Worker {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Interrupt, ctx: &mut Context<Self>) -> Self::Result {
        let Some(core) = self.core.as_mut() else {
            return Box::pin(actix::fut::ready(()));
        };
        core.interrupt();
        let mut cancels = Vec::new();
        for a in core.take_actions() {
            match a {
                Action::CancelLocalBuild { goal } => {
                    let r = self
                        .cfg
                        .cancel_local_build
                        .send(CancelLocalBuild { id: goal });
                    cancels.push(Box::pin(async move {
                        let _ = r.await;
                    })
                        as std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>);
                }
                Action::CancelHookBuild { goal } => {
                    if let Some(c) = &self.cfg.cancel_hook_build {
                        let r = c.send(CancelHookBuild { id: goal });
                        cancels.push(Box::pin(async move {
                            let _ = r.await;
                        }));
                    }
                }
                other => self.perform(other, ctx),
            }
        }
        Box::pin(
            async move {
                for c in cancels {
                    c.await;
                }
            }
            .into_actor(self)
            .map(|(), act, ctx| act.drain(ctx)),
        )
    }
}

/// Starts a Worker on the current arbiter.
pub fn spawn_worker(cfg: WorkerConfig) -> Addr<Worker> {
    Worker::new(cfg).start()
}
