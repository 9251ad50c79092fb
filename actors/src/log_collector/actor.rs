//! The LogCollector actor: runs a [`CollectorState`] for one build, owns its log file
//! writer (a [`LogFileWriter`] thread from the first chunk on: compression never runs
//! on the arbiter; a build that logs nothing has no thread), fires
//! the silence/timeout timers with `run_later`, and answers [`LogEof`] with the
//! [`LogSummary`] once the file is complete.
//!
//! Back-pressure: when the writer's queue is full, the chunk is handed to a blocking
//! task and the actor stops reading its mailbox (`ctx.wait`) until it is queued, so no
//! byte is dropped and memory stays bounded. Senders that use `send(..).await` (not
//! `do_send`, which bypasses the mailbox capacity) are thereby slowed down too.
//!
//! A `LogConfig` whose `log_dir` is empty writes no log file (`keep-build-log = false`).
//! A log file that cannot be created or written is reported on stderr (as a Nix
//! `error:` line) at once and in `LogSummary::log_error` (`log_file` is None): the
//! owner fails the build, as Nix does (its `openLogFile` and log sink throw).

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::prelude::*;
use drover::build_log::file::{TryWriteError, DEFAULT_QUEUE_CHUNKS};
use drover::build_log::{LogFile, LogFileWriter};

use super::forward::READ_CHUNK;
use super::{CollectorState, Effect, DEFAULT_VERBOSITY};
use crate::messages::{
    BuildLogEvent, HookStderrLine, LogAlarm, LogBytes, LogConfig, LogEof, LogSink, LogSummary,
    StartLogCollector,
};

/// Where echoed output and messages go (the process's stderr by default).
pub type StderrSink = Arc<Mutex<dyn Write + Send>>;

/// How collectors made by [`starter_with`] behave.
#[derive(Clone)]
pub struct CollectorOptions {
    /// Receives every build's [`BuildLogEvent`]s.
    pub events: Option<Recipient<BuildLogEvent>>,
    /// `msg`s up to this level are printed (Nix's `-v` count + 3).
    pub verbosity: u64,
    /// Where to print.
    pub stderr: StderrSink,
    /// Chunks queued for the writer thread before the collector waits.
    pub queue_chunks: usize,
    /// Echo builder lines to `stderr` when a build's [`LogConfig::echo`] asks for it.
    /// `false` when the front end shows them itself from the [`BuildLogEvent`]s
    /// (`--log-format internal-json`, `bar-with-logs`), so `echo` then only means
    /// that failures leave out the log tail.
    pub print_build_lines: bool,
    /// Keep colour sequences in what is printed (Nix's `shouldANSI`: stderr is a
    /// terminal); otherwise every escape sequence is removed. Either way, printed
    /// text passes Nix's `filterANSIEscapes` (`drover::build_log::ansi`).
    pub ansi: bool,
}

impl CollectorOptions {
    pub fn new(events: Option<Recipient<BuildLogEvent>>) -> CollectorOptions {
        CollectorOptions {
            events,
            verbosity: DEFAULT_VERBOSITY,
            stderr: Arc::new(Mutex::new(std::io::stderr())),
            queue_chunks: DEFAULT_QUEUE_CHUNKS,
            print_build_lines: true,
            ansi: drover::build_log::ansi::should_ansi(),
        }
    }
}

/// The factory given to the LocalBuilder and the hook pool: each call starts a
/// [`LogCollector`] on the current arbiter and returns its [`LogSink`]. Messages are
/// printed at Nix's default verbosity.
pub fn starter(events: Option<Recipient<BuildLogEvent>>) -> StartLogCollector {
    starter_with(CollectorOptions::new(events))
}

/// [`starter`] with explicit options.
pub fn starter_with(options: CollectorOptions) -> StartLogCollector {
    Arc::new(move |config: LogConfig, alarm: Recipient<LogAlarm>| {
        LogCollector::new(config, alarm, options.clone())
            .start()
            .sink()
    })
}

/// Asks a collector how much of its output is queued for the writer thread.
#[derive(Message)]
#[rtype(result = "LogStats")]
pub struct GetLogStats;

/// Memory-relevant counters of a collector.
#[derive(Debug, Clone, Default, MessageResponse)]
pub struct LogStats {
    /// Bytes received so far.
    pub bytes: u64,
    /// Bytes queued for the writer thread now.
    pub queued_bytes: u64,
    /// The most bytes queued at once.
    pub peak_queued_bytes: u64,
}

/// The log collector of one build.
pub struct LogCollector {
    state: CollectorState,
    config: LogConfig,
    alarm: Recipient<LogAlarm>,
    options: CollectorOptions,
    writer: Option<LogFileWriter>,
    /// Set once the log file failed: no more writing, no file in the summary,
    /// the error in it.
    file_failed: Option<String>,
    timer: Option<SpawnHandle>,
    /// What is printed passes Nix's filter, as one stream (tab columns carry over
    /// between chunks of output).
    ansi: drover::build_log::ansi::AnsiFilter,
}

impl LogCollector {
    pub fn new(
        config: LogConfig,
        alarm: Recipient<LogAlarm>,
        options: CollectorOptions,
    ) -> LogCollector {
        let mut state_config = config.clone();
        state_config.echo &= options.print_build_lines;
        let state = CollectorState::new(
            &state_config,
            options.verbosity,
            options.events.is_some(),
            Instant::now(),
        );
        LogCollector {
            state,
            config,
            alarm,
            ansi: drover::build_log::ansi::AnsiFilter::new(!options.ansi),
            options,
            writer: None,
            file_failed: None,
            timer: None,
        }
    }

    fn print(&mut self, bytes: &[u8]) {
        let bytes = self.ansi.filter(bytes);
        if let Ok(mut w) = self.options.stderr.lock() {
            let _ = w.write_all(&bytes);
            let _ = w.flush();
        }
    }

    fn fail_file(&mut self, e: impl std::fmt::Display) {
        if self.file_failed.is_none() {
            let msg = e.to_string();
            self.print(format!("error: {msg}\n").as_bytes());
            self.file_failed = Some(msg);
        }
        self.writer = None;
    }

    fn apply(&mut self, fx: Vec<Effect>, ctx: &mut Context<Self>) {
        for e in fx {
            match e {
                Effect::File(chunk) => self.write(chunk, ctx),
                Effect::Stderr(b) => self.print(&b),
                Effect::Event(ev) => {
                    if let Some(r) = &self.options.events {
                        r.do_send(ev);
                    }
                }
                Effect::Alarm(a) => self.alarm.do_send(a),
            }
        }
    }

    fn write(&mut self, chunk: Vec<u8>, ctx: &mut Context<Self>) {
        let Some(w) = &mut self.writer else { return };
        match w.try_write(chunk) {
            Ok(()) => {}
            Err(TryWriteError::Full(chunk)) => {
                let tx = w.sender();
                let queued =
                    async move { tokio::task::spawn_blocking(move || tx.send(chunk)).await };
                ctx.wait(
                    fut::wrap_future(queued).map(|r, act: &mut Self, _| match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => act.writer_stopped(e.to_string()),
                        Err(e) => act.fail_file(format!("queueing build log: {e}")),
                    }),
                );
            }
            Err(TryWriteError::Closed(_)) => self.writer_stopped("writer stopped".into()),
        }
    }

    /// The writer thread ended early: join it for the real error.
    fn writer_stopped(&mut self, fallback: String) {
        if let Some(w) = self.writer.take() {
            // The thread has exited already: joining does not block.
            match w.finish() {
                Err(e) => self.fail_file(e),
                Ok(_) => self.fail_file(fallback),
            }
        }
    }

    fn schedule_timer(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.timer.take() {
            ctx.cancel_future(h);
        }
        if let Some(deadline) = self.state.next_deadline() {
            let delay = deadline.saturating_duration_since(Instant::now());
            self.timer = Some(ctx.run_later(delay, |act, ctx| {
                act.timer = None;
                let mut fx = Vec::new();
                act.state.check_timers(Instant::now(), &mut fx);
                act.apply(fx, ctx);
                act.schedule_timer(ctx);
            }));
        }
    }

    fn sink(addr: &Addr<Self>) -> LogSink {
        LogSink {
            bytes: addr.clone().recipient(),
            hook_stderr: addr.clone().recipient(),
            eof: addr.clone().recipient(),
        }
    }
}

/// Turns a collector's address into the sink its producers use.
pub trait IntoLogSink {
    fn sink(&self) -> LogSink;
}

impl IntoLogSink for Addr<LogCollector> {
    fn sink(&self) -> LogSink {
        LogCollector::sink(self)
    }
}

impl Actor for LogCollector {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Opening the file is a few syscalls, as in Nix's `openLogFile`; the writing
        // and compressing happen on the writer thread.
        if !self.config.log_dir.as_os_str().is_empty() {
            match LogFile::create(
                &self.config.log_dir,
                &self.config.drv_path,
                self.config.compress,
            )
            .and_then(|f| LogFileWriter::spawn(f, self.options.queue_chunks))
            {
                Ok(w) => self.writer = Some(w),
                Err(e) => self.fail_file(e),
            }
        }
        self.schedule_timer(ctx);
    }
}

impl Handler<LogBytes> for LogCollector {
    type Result = ();

    fn handle(&mut self, LogBytes(data): LogBytes, ctx: &mut Context<Self>) {
        let mut fx = Vec::new();
        let now = Instant::now();
        // A batch of reads (`pty::pump`) is counted against the log limit read by
        // read, as Nix does, so the cut falls where it would. What is logged goes to
        // the writer as one chunk: a handler queues at most one chunk, so a chunk
        // waiting for room is never overtaken.
        self.state.bytes_batch(data, READ_CHUNK, now, &mut fx);
        self.apply(fx, ctx);
    }
}

impl Handler<HookStderrLine> for LogCollector {
    type Result = ();

    fn handle(&mut self, HookStderrLine(line): HookStderrLine, ctx: &mut Context<Self>) {
        let mut fx = Vec::new();
        self.state.hook_line(&line, Instant::now(), &mut fx);
        self.apply(fx, ctx);
    }
}

impl Handler<LogEof> for LogCollector {
    type Result = ResponseActFuture<Self, LogSummary>;

    fn handle(&mut self, _: LogEof, ctx: &mut Context<Self>) -> Self::Result {
        let mut fx = Vec::new();
        let (tail, bytes) = self.state.eof(&mut fx);
        self.apply(fx, ctx);
        if let Some(h) = self.timer.take() {
            ctx.cancel_future(h);
        }
        let writer = self.writer.take();
        let finished = async move {
            match writer {
                // Nothing was logged: no thread to wait for, nothing to compress.
                Some(w) if w.is_idle() => Some(Ok(w.finish())),
                Some(w) => Some(tokio::task::spawn_blocking(move || w.finish()).await),
                None => None,
            }
        };
        Box::pin(fut::wrap_future(finished).map(move |r, act: &mut Self, _| {
            let log_file: Option<PathBuf> = match r {
                None => None,
                Some(Ok(Ok(path))) => Some(path),
                Some(Ok(Err(e))) => {
                    act.fail_file(e);
                    None
                }
                Some(Err(e)) => {
                    act.fail_file(format!("finishing build log: {e}"));
                    None
                }
            };
            LogSummary {
                tail,
                bytes,
                log_file: if act.file_failed.is_some() {
                    None
                } else {
                    log_file
                },
                log_error: act.file_failed.clone(),
            }
        }))
    }
}

impl Handler<GetLogStats> for LogCollector {
    type Result = LogStats;

    fn handle(&mut self, _: GetLogStats, _: &mut Context<Self>) -> LogStats {
        LogStats {
            bytes: self.state.bytes_received(),
            queued_bytes: self.writer.as_ref().map_or(0, |w| w.queued_bytes()),
            peak_queued_bytes: self.writer.as_ref().map_or(0, |w| w.peak_queued_bytes()),
        }
    }
}
