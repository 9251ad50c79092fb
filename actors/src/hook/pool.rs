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
use super::{Begin, PoolState, TryOutcome};
use crate::messages::{CancelHookBuild, HookReply, HookStderrLine, HookTry, StartLogCollector};
use drover::config::{Env, Settings};
use drover::hook_protocol::{
    json_message_text, settings_preamble, HookLine, ReplyKind, TryRequest, UNEXPECTED_EOF,
};
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
    /// Where lines the hook prints while answering a `try` go (`@nix` lines and
    /// others); `None` prints them to stderr as Nix does (the `msg` of `@nix` msg
    /// lines, other lines verbatim).
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
}

impl HookPool {
    pub fn new(config: HookPoolConfig) -> HookPool {
        let state = PoolState::new(config.build_hook.is_some());
        HookPool {
            config,
            state,
            jobs: Vec::new(),
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
}

fn echo(stderr: &Option<Recipient<HookStderrLine>>, line: HookLine) {
    let text = match line {
        HookLine::Json(l) | HookLine::Other(l) | HookLine::Reply(l) => l,
    };
    match stderr {
        Some(r) => r.do_send(HookStderrLine(text)),
        None => {
            if text.starts_with("@nix ") {
                if let Some(msg) = json_message_text(&text) {
                    eprintln!("{msg}");
                }
            } else {
                eprintln!("{text}");
            }
        }
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
                match HookInstance::spawn(
                    &program,
                    self.config.verbosity,
                    self.config.preamble.clone(),
                ) {
                    Ok(i) => i,
                    Err(e @ SpawnError::Exec { .. }) => {
                        // Nix's forked child prints this, then the parent reads EOF.
                        echo(&self.config.stderr, HookLine::Other(format!("error: {e}")));
                        return AtomicResponse::new(Box::pin(fut::ready(HookReply::Error(
                            UNEXPECTED_EOF.into(),
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
        let request = TryRequest {
            am_willing: msg.am_willing,
            system: msg.system,
            drv_path: self.config.store_dir.print(&msg.drv_path),
            required_features: msg.required_features,
        }
        .encode();
        let stderr = self.config.stderr.clone();
        let work = async move {
            let mut instance = instance;
            let mut on_line = |l: HookLine| echo(&stderr, l);
            let outcome = instance.try_build(&request, &mut on_line).await;
            (outcome, instance)
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(
            |(outcome, instance), act, _ctx| {
                log::debug!("hook reply is {outcome:?}");
                let accepted = act.state.finish(&outcome, instance);
                match outcome {
                    TryOutcome::Reply(ReplyKind::Decline) => HookReply::Decline,
                    TryOutcome::Reply(ReplyKind::Postpone) => HookReply::Postpone,
                    TryOutcome::Reply(ReplyKind::DeclinePermanently) => {
                        HookReply::DeclinePermanently
                    }
                    TryOutcome::Died(text) => {
                        let msg = format!("error: build hook died unexpectedly: {text}");
                        echo(&act.config.stderr, HookLine::Other(msg));
                        HookReply::Decline
                    }
                    TryOutcome::Error(e) => HookReply::Error(e),
                    TryOutcome::Accept { machine } => match accepted {
                        Some(instance) => {
                            let job = HookJob::new(
                                instance,
                                act.config.store_dir.clone(),
                                act.config.start_log_collector.clone(),
                            )
                            .start();
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
