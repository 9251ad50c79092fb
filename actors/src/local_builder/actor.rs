//! The LocalBuilder actor: thin handlers over [`super::LocalBuilderState`]; the build
//! itself runs in a future per build, with blocking steps on tokio's blocking pool
//! and the pty read on a thread of its own, so the arbiter never blocks.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use drover::build::{
    self, exec_failure_log, exec_failure_status, kill_process_group, BuildSettings, BuildSpec,
};
use drover::build_result::{BuildResult, BuildStatus};
use drover::config::Settings;
use drover::store::{LocalStore, ValidPathInfo};
use drover::store_path::StorePath;

use super::history::Usage;
use super::LocalBuilderState;
use crate::messages::{
    CancelLocalBuild, LocalBuildFinished, LogAlarm, LogBytes, LogConfig, LogEof, LogSummary,
    RunLocalBuild, StartLogCollector,
};
use drover::build_history::{pname, BuildRecord, LOCAL_MACHINE};

/// What the LocalBuilder needs besides the store: build settings and the log
/// settings every build's collector gets.
#[derive(Debug, Clone)]
pub struct LocalBuilderConfig {
    pub build: BuildSettings,
    /// `NIX_LOG_DIR`.
    pub log_dir: PathBuf,
    pub compress_build_log: bool,
    /// `log-lines`.
    pub log_lines: usize,
    /// `max-build-log-size` (0 = unlimited).
    pub max_build_log_size: u64,
    pub max_silent_time: Option<Duration>,
    pub timeout: Option<Duration>,
    /// Echo builder output (nix-store without `-Q`); without it failure messages
    /// carry the log tail.
    pub echo: bool,
    /// drover's build history, where every finished build is recorded.
    pub history: Option<Arc<super::history::HistoryLog>>,
    /// All the settings: a recursive-Nix build's daemon runs its builds in a
    /// system of its own ([`super::recursive`]).
    pub settings: Arc<Settings>,
    /// The system's substituters, shared with that inner system (`None`: it
    /// makes its own from the settings).
    pub substituters: Option<SharedSubstituters>,
}

/// The substituters of a system, for [`LocalBuilderConfig::substituters`].
#[derive(Clone)]
pub struct SharedSubstituters(pub Vec<Arc<dyn crate::substituter::Substituter>>);

impl std::fmt::Debug for SharedSubstituters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|s| s.uri()))
            .finish()
    }
}

impl LocalBuilderConfig {
    /// The configuration from settings (echo on; the CLI turns it off for `-Q`).
    pub fn from_settings(settings: &Settings) -> LocalBuilderConfig {
        let secs = |n: i64| (n > 0).then(|| Duration::from_secs(n as u64));
        LocalBuilderConfig {
            build: BuildSettings::from_settings(settings),
            log_dir: settings.log_dir().to_owned(),
            compress_build_log: settings.compress_build_log(),
            log_lines: settings.log_lines() as usize,
            max_build_log_size: settings.max_build_log_size(),
            max_silent_time: secs(settings.max_silent_time()),
            timeout: secs(settings.timeout()),
            echo: true,
            history: Some(Arc::new(super::history::HistoryLog::new(
                settings.state_dir(),
            ))),
            settings: Arc::new(settings.clone()),
            substituters: None,
        }
    }
}

/// Runs local builds.
pub struct LocalBuilder {
    store: Arc<LocalStore>,
    config: Arc<LocalBuilderConfig>,
    start_log: StartLogCollector,
    state: LocalBuilderState,
    /// The output infos of a repeated build's last round, per `.drv`, until the
    /// next round compares with them.
    previous_rounds: HashMap<StorePath, BTreeMap<String, ValidPathInfo>>,
}

impl LocalBuilder {
    pub fn new(
        store: Arc<LocalStore>,
        config: LocalBuilderConfig,
        start_log: StartLogCollector,
    ) -> LocalBuilder {
        LocalBuilder {
            store,
            config: Arc::new(config),
            start_log,
            state: LocalBuilderState::new(),
            previous_rounds: HashMap::new(),
        }
    }
}

impl Actor for LocalBuilder {
    type Context = Context<Self>;
}

/// A log alarm of build `id` (relayed from that build's collector).
#[derive(Message)]
#[rtype(result = "()")]
struct BuildAlarm {
    id: u64,
    alarm: LogAlarm,
}

/// The builder of `id` was spawned; answers whether to kill it at once.
#[derive(Message)]
#[rtype(result = "bool")]
struct Spawned {
    id: u64,
    pid: u32,
}

/// The builder of `id` is gone; answers why it was killed, if it was.
#[derive(Message)]
#[rtype(result = "Option<build::KillReason>")]
struct Exited {
    id: u64,
}

/// Whether build `id` was cancelled or alarmed (while waiting for a build user).
#[derive(Message)]
#[rtype(result = "bool")]
struct IsKilled {
    id: u64,
}

/// Gives one build's collector a `Recipient<LogAlarm>` that names the build.
struct AlarmRelay {
    id: u64,
    to: Recipient<BuildAlarm>,
}

impl Actor for AlarmRelay {
    type Context = Context<Self>;
}

impl Handler<LogAlarm> for AlarmRelay {
    type Result = ();
    fn handle(&mut self, alarm: LogAlarm, _: &mut Context<Self>) {
        self.to.do_send(BuildAlarm { id: self.id, alarm });
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn failed(id: u64, status: BuildStatus, msg: String) -> LocalBuildFinished {
    LocalBuildFinished {
        id,
        result: BuildResult::failure(status, msg),
        hash_mismatch: false,
        outputs: Default::default(),
    }
}

impl Handler<RunLocalBuild> for LocalBuilder {
    type Result = ();

    fn handle(&mut self, msg: RunLocalBuild, ctx: &mut Context<Self>) {
        let RunLocalBuild {
            id,
            request,
            reply_to,
        } = msg;
        self.state.start(id);
        // The slot is held from here to the registration: that is what a build
        // costs the schedule, so that is the wall time recorded.
        let requested = std::time::Instant::now();
        let me = ctx.address();
        let store = self.store.clone();
        // The run's own settings (a daemon client's), where it has them.
        let config = match &request.run_settings {
            None => self.config.clone(),
            Some(r) => Arc::new(LocalBuilderConfig {
                build: (*r.build).clone(),
                max_silent_time: r.max_silent_time,
                timeout: r.timeout,
                compress_build_log: r.compress_build_log,
                log_lines: r.log_lines,
                max_build_log_size: r.max_build_log_size,
                history: self.config.history.clone(),
                log_dir: self.config.log_dir.clone(),
                echo: self.config.echo,
                // A recursive-Nix build's inner system: the daemon's settings
                // and substituters (the run's build settings above still say
                // whether the feature is on).
                settings: self.config.settings.clone(),
                substituters: self.config.substituters.clone(),
            }),
        };
        let relay = AlarmRelay {
            id,
            to: me.clone().recipient(),
        }
        .start();
        let log = (self.start_log)(
            LogConfig {
                drv_path: request.drv_path.clone(),
                log_dir: config.log_dir.clone(),
                compress: config.compress_build_log,
                tail_lines: config.log_lines,
                max_log_size: config.max_build_log_size,
                max_silent_time: config.max_silent_time,
                timeout: config.timeout,
                echo: config.echo,
            },
            relay.recipient(),
        );
        let spec = Arc::new(BuildSpec {
            drv_path: request.drv_path.clone(),
            drv: request.drv.clone(),
            output_paths: request.output_paths.clone(),
            input_closure: request.input_closure.clone(),
            mode: request.mode,
            keep_failed: request.keep_failed,
            round: build::BuildRound {
                current: request.round.0,
                total: request.round.1,
                previous: self
                    .previous_rounds
                    .remove(&request.drv_path)
                    .filter(|_| request.round.0 > 1)
                    .unwrap_or_default(),
            },
        });
        let round_drv = request.drv_path.clone();
        let fut = async move {
            let drv_printed = store.store_dir().print(&spec.drv_path);
            let prep = loop {
                let (store, config, spec) = (store.clone(), config.clone(), spec.clone());
                let r = tokio::task::spawn_blocking(move || {
                    build::prepare(&store, &config.build, &spec).and_then(
                        |(mut prepared, process)| {
                            let daemon =
                                start_recursive_daemon(&store, &config, &spec, &mut prepared)?;
                            Ok((prepared, process, daemon))
                        },
                    )
                })
                .await;
                // All build users busy: wait a while and try again, unless cancelled.
                if let Ok(Err(build::BuildError::AllBuildUsersBusy(_))) = &r {
                    if !me.send(IsKilled { id }).await.unwrap_or(true) {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
                break r;
            };
            let (prepared, process, recursive) = match prep {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    let _ = log.eof.send(LogEof).await;
                    me.do_send(Exited { id });
                    // startBuilder's errors are InputRejected-class or misc failures.
                    return (failed(id, e.status(), e.to_string()), BTreeMap::new());
                }
                Err(e) => {
                    let _ = log.eof.send(LogEof).await;
                    me.do_send(Exited { id });
                    return (
                        failed(id, BuildStatus::MiscFailure, e.to_string()),
                        BTreeMap::new(),
                    );
                }
            };
            let build::BuilderProcess {
                command,
                pty_master,
                builder,
                fast,
            } = process;
            let start_time = unix_now();
            let (status, usage) = if spec.drv.is_builtin() {
                // Run in-process, as Nix runs builtins in its forked child.
                drop((command, pty_master, fast));
                let env = build::builtins::builtin_env(&spec.drv, &prepared.scratch);
                let (bytes, spec, config) = (log.bytes.clone(), spec.clone(), config.clone());
                tokio::task::spawn_blocking(move || {
                    build::builtins::run_builtin(
                        &spec.drv.builder,
                        &env,
                        &config.build.builtins,
                        &mut |b: &[u8]| bytes.do_send(LogBytes(b.to_vec())),
                    )
                })
                .await
                .map(|s| (s, None))
                .unwrap_or_else(|_| (exec_failure_status(), None))
            } else {
                // The builder: posix_spawn when it applies (no copy of this process's
                // page tables), else the forking Command. Either way the command is
                // dropped once the builder runs, closing our copy of the pty slave.
                type Waited = std::io::Result<(std::process::ExitStatus, Option<Usage>)>;
                type Wait = std::pin::Pin<Box<dyn std::future::Future<Output = Waited>>>;
                let spawned: std::io::Result<(u32, Wait)> = match fast {
                    Some(fast) => {
                        let r = fast.spawn();
                        drop(command);
                        r.map(|pid| {
                            let wait: Wait = Box::pin(async move {
                                super::reap::wait(pid).await.map(|(s, u)| (s, Some(u)))
                            });
                            (pid, wait)
                        })
                    }
                    None => {
                        let mut command = tokio::process::Command::from(command);
                        let r = command.spawn();
                        drop(command);
                        r.map(|mut child| {
                            let pid = child.id().unwrap_or(0);
                            // The child is reaped by wait4 here, never polled by
                            // tokio (which forgets it when dropped after).
                            let wait: Wait = Box::pin(async move {
                                let r = match pid {
                                    0 => child.wait().await.map(|s| (s, None)),
                                    pid => super::reap::wait(pid).await.map(|(s, u)| (s, Some(u))),
                                };
                                drop(child);
                                r
                            });
                            (pid, wait)
                        })
                    }
                };
                match spawned {
                    Ok((pid, wait)) => {
                        if me.send(Spawned { id, pid }).await.unwrap_or(true) {
                            kill_process_group(pid);
                        }
                        // The pty is read on the arbiter (`pty::pump`): batches reach
                        // the collector with back-pressure, so a flooding builder
                        // blocks on its pty instead of filling our memory. As Nix:
                        // the build is over at EOF on the pty, i.e. once every
                        // process holding it (background children included) has
                        // closed it; then what is left of the process group is
                        // killed and the builder reaped.
                        if let Err(e) = super::pty::pump(pty_master, log.bytes.clone()).await {
                            log::warn!("build of '{drv_printed}': {e}");
                        }
                        kill_process_group(pid);
                        let status = wait.await;
                        status.unwrap_or_else(|_| (exec_failure_status(), None))
                    }
                    Err(e) => {
                        log.bytes.do_send(LogBytes(exec_failure_log(&builder, &e)));
                        (exec_failure_status(), None)
                    }
                }
            };
            let stop_time = unix_now();
            let summary: LogSummary = log.eof.send(LogEof).await.unwrap_or_default();
            let killed = me.send(Exited { id }).await.unwrap_or(None);
            if summary.log_error.is_some() {
                // Nix fails a build whose log cannot be written (a full disk):
                // nothing is registered; the scratch outputs stay invalid. The
                // collector printed the cause when it happened.
                drop(prepared);
                if let Some(d) = recursive {
                    // Joining its threads blocks: not on the arbiter.
                    let _ = tokio::task::spawn_blocking(move || d.stop()).await;
                }
                return (
                    failed(
                        id,
                        BuildStatus::MiscFailure,
                        format!("the build log of '{drv_printed}' could not be written"),
                    ),
                    BTreeMap::new(),
                );
            }
            // Nix's heuristic when a builder fails: with less than 8 MiB free on the
            // store's or the build directory's file system, the failure may be
            // the full disk's, so it is not a permanent one.
            let disk_full = !status.success()
                && killed.is_none()
                && super::disk_nearly_full(&[
                    std::path::PathBuf::from(store.store_dir().as_str()),
                    config.build.build_dir_root.clone(),
                ]);
            let outcome = {
                let (store, config, spec) = (store.clone(), config.clone(), spec.clone());
                tokio::task::spawn_blocking(move || {
                    // The builder is gone: so is its daemon, and what it added
                    // may be referred to by the outputs (Nix's `addedPaths`).
                    let spec = match recursive {
                        Some(d) => {
                            let mut s = (*spec).clone();
                            s.input_closure.extend(d.stop());
                            Arc::new(s)
                        }
                        None => spec,
                    };
                    build::finish(&store, &config.build, &spec, prepared, status, killed)
                })
                .await
            };
            match outcome {
                Ok(o) => {
                    if let Some(dir) = &o.kept_build_dir {
                        eprintln!("note: keeping build directory '{}'", dir.display());
                    }
                    let mut result = o.result;
                    let disk_full = disk_full && result.status == BuildStatus::PermanentFailure;
                    if disk_full {
                        result.status = BuildStatus::TransientFailure;
                    }
                    // `finish` names the goal for all outputs and leaves the log
                    // tail out: completed here, with `done` as everywhere.
                    match killed {
                        Some(k) if k != build::KillReason::Cancelled => {
                            (result.status, result.error_msg) =
                                build::done::killed(k, &request.goal_name, &drv_printed);
                        }
                        None if !status.success() && !config.echo && !summary.tail.is_empty() => {
                            result
                                .error_msg
                                .push_str(&build::done::log_tail(&drv_printed, &summary.tail));
                        }
                        _ => {}
                    }
                    if disk_full {
                        // After the log tail, as Nix appends it.
                        result.error_msg.push_str(super::DISK_FULL_NOTE);
                    }
                    result.times_built = 1;
                    result.start_time = start_time;
                    result.stop_time = stop_time;
                    if let Some(h) = &config.history {
                        let name = spec.drv_path.name();
                        let name = name.strip_suffix(".drv").unwrap_or(name);
                        let record = BuildRecord {
                            drv_path: drv_printed.clone(),
                            pname: pname(name).to_owned(),
                            system: spec.drv.system.clone(),
                            machine: LOCAL_MACHINE.to_owned(),
                            wall: requested.elapsed(),
                            cpu: usage.map(|u| u.cpu),
                            peak_rss: usage.map(|u| u.peak_rss),
                            start_time,
                            status: format!("{:?}", result.status),
                        };
                        // Not awaited: the history never delays a build's end.
                        h.record_soon(record);
                    }
                    let finished = LocalBuildFinished {
                        id,
                        result,
                        hash_mismatch: o.hash_mismatch,
                        outputs: o.outputs,
                    };
                    (finished, o.round_infos)
                }
                Err(e) => (
                    failed(id, BuildStatus::MiscFailure, e.to_string()),
                    BTreeMap::new(),
                ),
            }
        };
        ctx.spawn(fut.into_actor(self).map(
            move |(finished, round_infos), act: &mut LocalBuilder, _ctx| {
                if !round_infos.is_empty() {
                    act.previous_rounds.insert(round_drv, round_infos);
                }
                reply_to.do_send(finished)
            },
        ));
    }
}

/// The daemon of a `recursive-nix` build, serving the socket `prepare` made.
fn start_recursive_daemon(
    store: &Arc<LocalStore>,
    config: &LocalBuilderConfig,
    spec: &BuildSpec,
    prepared: &mut build::PreparedBuild,
) -> Result<Option<super::recursive::RecursiveDaemon>, build::BuildError> {
    let Some(listener) = prepared.recursive_socket.take() else {
        return Ok(None);
    };
    let materialise = prepared
        .chroot
        .as_ref()
        .map(|c| super::recursive::sandbox_materialiser(store, c));
    super::recursive::RecursiveDaemon::start(
        listener,
        store.clone(),
        &config.settings,
        config.substituters.as_ref().map(|s| s.0.clone()),
        spec.input_closure.clone(),
        materialise,
    )
    .map(Some)
    .map_err(|e| build::BuildError::RecursiveDaemon(e.to_string()))
}

impl Handler<BuildAlarm> for LocalBuilder {
    type Result = ();
    fn handle(&mut self, msg: BuildAlarm, _: &mut Context<Self>) {
        if let Some(pid) = self.state.alarm(msg.id, msg.alarm) {
            kill_process_group(pid);
        }
    }
}

impl Handler<CancelLocalBuild> for LocalBuilder {
    type Result = ();
    fn handle(&mut self, msg: CancelLocalBuild, _: &mut Context<Self>) {
        if let Some(pid) = self.state.cancel(msg.id) {
            kill_process_group(pid);
        }
    }
}

impl Handler<Spawned> for LocalBuilder {
    type Result = bool;
    fn handle(&mut self, msg: Spawned, _: &mut Context<Self>) -> bool {
        self.state.spawned(msg.id, msg.pid)
    }
}

impl Handler<IsKilled> for LocalBuilder {
    type Result = bool;
    fn handle(&mut self, msg: IsKilled, _: &mut Context<Self>) -> bool {
        self.state.get(msg.id).is_none_or(|b| b.kill.is_some())
    }
}

impl Handler<Exited> for LocalBuilder {
    type Result = Option<build::KillReason>;
    fn handle(&mut self, msg: Exited, _: &mut Context<Self>) -> Option<build::KillReason> {
        self.state.finished(msg.id)
    }
}
