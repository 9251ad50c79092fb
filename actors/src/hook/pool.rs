//! The hook pool actor: answers [`HookTry`] by asking a build-hook process (see the
//! [module docs](super) for the rules), one request at a time, and forwards
//! [`CancelHookBuild`] to the jobs it started that are still alive (it holds them
//! weakly: a job nobody holds stops and kills its hook, as before).

use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;
use actix::WeakAddr;

use super::instance::{HookInstance, SpawnError};
use super::job::HookJob;
use super::{try_line_output, Begin, PoolState, TryOutcome, LVL_DEBUG};
use crate::messages::{CancelHookBuild, HookReply, HookStderrLine, HookTry, StartLogCollector};
use drover::build_log::ansi::filter_ansi_text;
use drover::config::{Env, Settings};
use drover::hook_protocol::{settings_preamble, unexpected_eof, HookLine, ReplyKind, TryRequest};
use drover::store_path::StoreDir;

/// How the pool starts hooks and where their output goes.
#[derive(Clone)]
pub struct HookPoolConfig {
    /// The `build-hook` program; `None` (empty setting) = never consult a hook.
    pub build_hook: Option<PathBuf>,
    /// The hook's one argument (3 = info; `-v` adds 1 each).
    pub verbosity: u32,
    /// The settings preamble (`drover::hook_protocol::settings_preamble`).
    pub preamble: Arc<Vec<u8>>,
    /// To print `.drv` and input paths in full.
    pub store_dir: StoreDir,
    /// Starts the log collector of an accepted job.
    pub start_log_collector: StartLogCollector,
    /// Where what Nix prints while a hook answers a `try` goes (see
    /// [`try_line_output`]; and, from verbosity [`LVL_DEBUG`] on, Nix's debug lines
    /// about the hook); `None`: the process's stderr.
    pub stderr: Option<Recipient<HookStderrLine>>,
}

impl HookPoolConfig {
    /// The configuration for `settings` (loaded from `env`).
    pub fn from_settings(
        settings: &Settings,
        env: &Env,
        verbosity: u32,
        start_log_collector: StartLogCollector,
    ) -> HookPoolConfig {
        HookPoolConfig {
            build_hook: settings.build_hook().map(PathBuf::from),
            verbosity,
            preamble: Arc::new(settings_preamble(settings, env)),
            store_dir: settings.store_dir().clone(),
            start_log_collector,
            stderr: None,
        }
    }
}

/// The pool actor.
pub struct HookPool {
    config: HookPoolConfig,
    state: PoolState<HookInstance>,
    /// The jobs started for accepted builds (pruned when they are gone). Their build
    /// ids are only known to them, so a cancellation goes to each.
    jobs: Vec<WeakAddr<HookJob>>,
    /// Whether printed messages keep their colours (stderr is a terminal).
    ansi: bool,
    /// drover's build history, where accepted jobs record their builds.
    history: Option<Arc<crate::local_builder::history::HistoryLog>>,
}

impl HookPool {
    pub fn new(config: HookPoolConfig) -> HookPool {
        let state = PoolState::new(config.build_hook.is_some());
        HookPool {
            config,
            state,
            jobs: Vec::new(),
            ansi: drover::build_log::ansi::should_ansi(),
            history: None,
        }
    }

    /// Records every accepted job's build (its wall time, on the hook's machine)
    /// in drover's build history.
    pub fn with_history(mut self, h: Arc<crate::local_builder::history::HistoryLog>) -> HookPool {
        self.history = Some(h);
        self
    }

    /// Prints one of Nix's debug lines about the hook, at verbosity [`LVL_DEBUG`].
    fn debug(&self, text: String) {
        if self.config.verbosity >= LVL_DEBUG {
            echo(&self.config.stderr, text);
        }
    }

    fn prune_jobs(&mut self) {
        self.jobs
            .retain(|j| j.upgrade().is_some_and(|a| a.connected()));
    }
}

impl Handler<CancelHookBuild> for HookPool {
    type Result = ();

    fn handle(&mut self, msg: CancelHookBuild, _ctx: &mut Context<Self>) {
        self.prune_jobs();
        for job in self.jobs.iter().filter_map(|j| j.upgrade()) {
            job.do_send(msg);
        }
    }
}

impl Actor for HookPool {
    type Context = Context<Self>;

    /// The idle hook kept for later requests is killed with the pool (also when the
    /// pool is dropped without stopping: dropping a [`HookInstance`] kills its
    /// process group).
    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.state.clear_idle();
    }
}

/// Prints one line as Nix prints it (already filtered): to the `stderr` recipient,
/// or to the process's stderr.
fn echo(stderr: &Option<Recipient<HookStderrLine>>, text: String) {
    match stderr {
        Some(r) => r.do_send(HookStderrLine(text)),
        None => eprintln!("{text}"),
    }
}

impl Handler<HookTry> for HookPool {
    type Result = AtomicResponse<Self, HookReply>;

    fn handle(&mut self, msg: HookTry, _ctx: &mut Context<Self>) -> Self::Result {
        let instance = match self.state.begin() {
            Begin::DeclinePermanently => {
                return AtomicResponse::new(Box::pin(fut::ready(HookReply::DeclinePermanently)))
            }
            Begin::Use(i) => i,
            Begin::Spawn => {
                let program = self.config.build_hook.clone().unwrap_or_default();
                self.debug(format!("starting build hook '{}'", program.display()));
                match HookInstance::spawn(
                    &program,
                    self.config.verbosity,
                    self.config.preamble.clone(),
                ) {
                    Ok(i) => i,
                    Err(e @ SpawnError::Exec { .. }) => {
                        // Nix's forked child prints this, then the parent reads EOF.
                        echo(&self.config.stderr, format!("error: {e}"));
                        return AtomicResponse::new(Box::pin(fut::ready(HookReply::Error(
                            unexpected_eof(),
                        ))));
                    }
                    Err(e) => {
                        return AtomicResponse::new(Box::pin(fut::ready(HookReply::Error(
                            e.to_string(),
                        ))))
                    }
                }
            }
        };
        let what = (
            self.config.store_dir.print(&msg.drv_path),
            msg.drv_path.name().to_owned(),
            msg.system.clone(),
        );
        let request = TryRequest {
            am_willing: msg.am_willing,
            system: msg.system,
            drv_path: self.config.store_dir.print(&msg.drv_path),
            required_features: msg.required_features,
        }
        .encode();
        let stderr = self.config.stderr.clone();
        let (verbosity, ansi) = (self.config.verbosity, self.ansi);
        let work = async move {
            let mut instance = instance;
            let mut on_line = |l: HookLine| {
                for text in try_line_output(&l, verbosity, ansi) {
                    echo(&stderr, text);
                }
            };
            let outcome = instance.try_build(&request, &mut on_line).await;
            (outcome, instance)
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(
            move |(outcome, instance), act, _ctx| {
                match &outcome {
                    TryOutcome::Reply(kind) => act.debug(format!("hook reply is '{kind}'")),
                    TryOutcome::Accept { .. } => act.debug("hook reply is 'accept'".into()),
                    TryOutcome::Died(_) | TryOutcome::Error(_) => {}
                }
                if let TryOutcome::Died(text) = &outcome {
                    // `printError`: at error level, without an `error:` prefix.
                    let msg = format!("build hook died unexpectedly: {text}");
                    echo(&act.config.stderr, filter_ansi_text(&msg, !act.ansi));
                }
                let pid = instance.pid();
                let accepted = act.state.finish(&outcome, instance);
                // Nix drops the hook after these (`worker.hook = 0`): `killing process`.
                if matches!(
                    outcome,
                    TryOutcome::Reply(ReplyKind::DeclinePermanently) | TryOutcome::Died(_)
                ) {
                    act.debug(format!("killing process {pid}"));
                }
                match outcome {
                    TryOutcome::Reply(ReplyKind::Decline) => HookReply::Decline,
                    TryOutcome::Reply(ReplyKind::Postpone) => HookReply::Postpone,
                    TryOutcome::Reply(ReplyKind::DeclinePermanently) => {
                        HookReply::DeclinePermanently
                    }
                    TryOutcome::Died(_) => HookReply::Decline,
                    TryOutcome::Error(e) => HookReply::Error(e),
                    TryOutcome::Accept { machine } => match accepted {
                        Some(instance) => {
                            let mut job = HookJob::new(
                                instance,
                                act.config.store_dir.clone(),
                                act.config.start_log_collector.clone(),
                            );
                            if let Some(h) = &act.history {
                                let (drv, name, system) = what;
                                job = job.recording(h.clone(), drv, &name, system, machine.clone());
                            }
                            let job = job.start();
                            act.prune_jobs();
                            act.jobs.push(job.downgrade());
                            HookReply::Accept {
                                machine,
                                job: job.recipient(),
                            }
                        }
                        None => HookReply::Error("the accepted hook was lost".into()),
                    },
                    TryOutcome::Reply(ReplyKind::Accept) => {
                        HookReply::Error("accept without a machine".into())
                    }
                }
            },
        )))
    }
}
