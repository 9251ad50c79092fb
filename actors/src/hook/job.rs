//! An accepted hook job: answers [`HookBuild`] by sending the hook its inputs and
//! missing outputs, streaming its output to a fresh log collector until both pipes
//! end, and reporting [`HookFinished`]. A [`LogAlarm`] from the collector, or a
//! [`CancelHookBuild`] for this build (forwarded by the pool), kills the hook's
//! process group and stops the wait for its pipes once nothing more is buffered;
//! the job then ends with that alarm, or, cancelled, with exit code `None` (killed by
//! a signal) and no alarm. The log collector still gets its `LogEof`, so the log file
//! is closed with what the hook wrote, as Nix closes it when it drops the goal.

use actix::prelude::*;

use super::instance::{HookInstance, Killer, StopReading};
use super::JobState;
use crate::messages::{
    CancelHookBuild, HookBuild, HookFinished, LogAlarm, LogEof, StartLogCollector,
};
use drover::build_history::{pname, BuildRecord};
use drover::hook_protocol::encode_accept_follow_up;
use drover::store_path::StoreDir;

/// The job actor; it stops after answering.
pub struct HookJob {
    instance: Option<HookInstance>,
    killer: Killer,
    stop: StopReading,
    store_dir: StoreDir,
    start_log_collector: StartLogCollector,
    state: JobState,
    /// Where the build is recorded, and the record without its times.
    record: Option<(
        std::sync::Arc<crate::local_builder::history::HistoryLog>,
        BuildRecord,
    )>,
}

impl HookJob {
    pub fn new(
        instance: HookInstance,
        store_dir: StoreDir,
        start_log_collector: StartLogCollector,
    ) -> HookJob {
        HookJob {
            killer: instance.killer(),
            stop: StopReading::default(),
            instance: Some(instance),
            store_dir,
            start_log_collector,
            state: JobState::default(),
            record: None,
        }
    }

    /// Records the build in drover's build history when it ends: its wall time
    /// from the inputs sent to the hook's end, on `machine` (CPU time and memory
    /// are the remote machine's, unknown here).
    pub fn recording(
        mut self,
        history: std::sync::Arc<crate::local_builder::history::HistoryLog>,
        drv_path: String,
        drv_name: &str,
        system: String,
        machine: String,
    ) -> HookJob {
        let name = drv_name.strip_suffix(".drv").unwrap_or(drv_name);
        let record = BuildRecord {
            drv_path,
            pname: pname(name).to_owned(),
            system,
            machine,
            wall: Default::default(),
            cpu: None,
            peak_rss: None,
            start_time: 0,
            status: String::new(),
        };
        self.record = Some((history, record));
        self
    }

    /// Kills the hook's process group and stops waiting for its pipes.
    fn kill(&self) {
        self.killer.kill();
        self.stop.stop();
    }
}

impl Actor for HookJob {
    type Context = Context<Self>;
}

impl Handler<HookBuild> for HookJob {
    type Result = ();

    fn handle(&mut self, msg: HookBuild, ctx: &mut Context<Self>) {
        let instance = match (self.state.start(msg.id), self.instance.take()) {
            (true, Some(i)) => i,
            _ => {
                log::warn!("hook job {} was asked to build twice; ignored", msg.id);
                return;
            }
        };
        let inputs: Vec<String> = msg.inputs.iter().map(|p| self.store_dir.print(p)).collect();
        let follow_up = encode_accept_follow_up(&inputs, &msg.missing_outputs);
        let sink = (self.start_log_collector)(msg.log, ctx.address().recipient());
        let HookBuild { id, reply_to, .. } = msg;
        let stop = self.stop.clone();
        let started = (std::time::Instant::now(), std::time::SystemTime::now());
        let work = async move {
            let exit_code = instance
                .run_job(
                    &follow_up,
                    sink.bytes.clone(),
                    sink.hook_stderr.clone(),
                    stop,
                )
                .await;
            let log = sink.eof.send(LogEof).await.unwrap_or_default();
            (exit_code, log)
        };
        ctx.spawn(
            work.into_actor(self)
                .map(move |(exit_code, log), act, ctx| {
                    let alarm = act.state.finish();
                    // A cancelled hook may have exited on its own just before the
                    // signal: it still counts as killed.
                    let exit_code = if act.state.cancelled() {
                        None
                    } else {
                        exit_code
                    };
                    if let Some((h, mut r)) = act.record.take() {
                        r.wall = started.0.elapsed();
                        r.start_time = started
                            .1
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs() as i64)
                            .unwrap_or(0);
                        // As the goal reads it: exit 0 is a build, anything else
                        // (killed, alarmed, failed) is not.
                        r.status = match (exit_code, &alarm) {
                            (Some(0), None) => "Built".into(),
                            _ => "MiscFailure".into(),
                        };
                        tokio::task::spawn_blocking(move || h.record(&r));
                    }
                    reply_to.do_send(HookFinished {
                        id,
                        exit_code,
                        log,
                        alarm,
                    });
                    ctx.stop();
                }),
        );
    }
}

impl Handler<LogAlarm> for HookJob {
    type Result = ();

    fn handle(&mut self, alarm: LogAlarm, _ctx: &mut Context<Self>) {
        if self.state.alarm(alarm) {
            self.kill();
        }
    }
}

impl Handler<CancelHookBuild> for HookJob {
    type Result = ();

    fn handle(&mut self, msg: CancelHookBuild, _ctx: &mut Context<Self>) {
        if self.state.cancel(msg.id) {
            log::debug!("cancelling hook build {}", msg.id);
            self.kill();
        }
    }
}
