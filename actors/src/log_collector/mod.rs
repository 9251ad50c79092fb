//! The LogCollector: one per build, it receives the builder's raw output and does with
//! it what Nix 2.8's derivation goal does (`handleChildOutput`, `flushLine`,
//! `openLogFile`, the timeouts of `Worker::waitForInput`).
//!
//! * Raw bytes ([`LogBytes`](crate::messages::LogBytes)) are counted against
//!   `max-build-log-size` and written verbatim to the log file
//!   (`<log dir>/drvs/xx/rest[.bz2]`, see [`drover::build_log::file`]); the chunk that
//!   goes over the limit is not logged, and [`LogAlarm::LogLimit`] is raised.
//! * They are assembled into lines (`\r` rewinds, `\n` ends, a partial last line is
//!   flushed at EOF). A line that is an `@nix` JSON message is handled as an event
//!   (`setPhase` → [`BuildLogEvent::Phase`], `msg` → [`BuildLogEvent::Message`] and
//!   printed when its level is at most the verbosity) and left out of the tail; others
//!   go to the tail, become [`BuildLogEvent::Line`]s and, with `echo`, are printed to
//!   stderr followed by `\n` (what `nix-store` without `-Q` prints: the assembled lines,
//!   not the raw bytes). A builder may only start file-transfer activities (untrusted).
//! * Hook stderr lines during a remote build ([`HookStderrLine`](crate::messages::HookStderrLine))
//!   are trusted `@nix` messages (an activity start is printed as `<text>...` when
//!   its level is at most the verbosity); a `type: 101` message (build log line) also appends
//!   its first field and `\n` to the log file. Other lines are dropped, as Nix 2.8 does
//!   once a hook has accepted a build.
//! * `max-silent-time` (no output for that long; hook stderr counts as output) and
//!   `timeout` (since the collector started) raise [`LogAlarm::Silent`] /
//!   [`LogAlarm::Timeout`]. At most one alarm is raised per build: the owner kills the
//!   builder on the first. Nix 2.8 applies neither to hook builds
//!   (`childStarted(…, respectTimeouts = false)`): the hook pool should leave both
//!   unset in a hook build's [`LogConfig`].
//!
//! This module holds the state machine ([`CollectorState`]), free of actix: it turns
//! inputs and the current time into [`Effect`]s. [`actor`] runs it as an actor.

pub mod actor;
pub mod forward;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use drover::build_log::json::{ACT_FILE_TRANSFER, RES_BUILD_LOG_LINE, RES_SET_PHASE};
use drover::build_log::{
    parse_json_message, Field, JsonMessage, JsonMessageError, LineAssembler, LogTail,
};
use drover::store_path::StorePath;

use crate::messages::{BuildLogEvent, LogAlarm, LogConfig};

pub use actor::{
    starter, starter_with, CollectorOptions, GetLogStats, IntoLogSink, LogCollector, LogStats,
    StderrSink,
};

/// Nix's default verbosity (`lvlInfo`): `msg`s up to this level are printed.
pub const DEFAULT_VERBOSITY: u64 = 3;

/// What the state machine asks its runner to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Append to the log file.
    File(Vec<u8>),
    /// Write to the user's stderr.
    Stderr(Vec<u8>),
    /// Tell the event recipient.
    Event(BuildLogEvent),
    /// Tell the owner of the build process.
    Alarm(LogAlarm),
}

/// Where a line came from: builder output is untrusted, the hook is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Builder,
    Hook,
}

/// The log state of one build.
#[derive(Debug)]
pub struct CollectorState {
    drv_path: StorePath,
    echo: bool,
    verbosity: u64,
    want_events: bool,
    max_log_size: u64,
    max_silent_time: Option<Duration>,
    timeout: Option<Duration>,
    started: Instant,
    last_activity: Instant,
    lines: LineAssembler,
    tail: LogTail,
    bytes: u64,
    over_limit: bool,
    alarmed: bool,
    finished: bool,
    builder_activities: HashSet<u64>,
    hook_activities: HashSet<u64>,
}

impl CollectorState {
    /// The state of a build starting at `now`. `want_events`: produce
    /// [`Effect::Event`]s (skipped when nobody listens).
    pub fn new(
        config: &LogConfig,
        verbosity: u64,
        want_events: bool,
        now: Instant,
    ) -> CollectorState {
        CollectorState {
            drv_path: config.drv_path.clone(),
            echo: config.echo,
            verbosity,
            want_events,
            max_log_size: config.max_log_size,
            max_silent_time: config.max_silent_time.filter(|d| !d.is_zero()),
            timeout: config.timeout.filter(|d| !d.is_zero()),
            started: now,
            last_activity: now,
            lines: LineAssembler::new(),
            tail: LogTail::new(config.tail_lines),
            bytes: 0,
            over_limit: false,
            alarmed: false,
            finished: false,
            builder_activities: HashSet::new(),
            hook_activities: HashSet::new(),
        }
    }

    /// Raw builder output.
    pub fn bytes(&mut self, data: Vec<u8>, now: Instant, fx: &mut Vec<Effect>) {
        if self.take(&data, now, fx) {
            fx.push(Effect::File(data));
        }
    }

    /// A batch of raw builder output, counted against the log limit in pieces of
    /// `piece` bytes (read by read, as Nix counts): the pieces before the limit are
    /// logged, as one [`Effect::File`] after the batch's other effects, without
    /// copying the batch.
    pub fn bytes_batch(
        &mut self,
        mut data: Vec<u8>,
        piece: usize,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let mut logged = 0;
        let mut logging = true;
        for p in data.chunks(piece.max(1)) {
            // Once a piece is not logged, no later one is (the limit or the end was
            // reached); every piece is still counted.
            logging &= self.take(p, now, fx);
            if logging {
                logged += p.len();
            }
        }
        if logged > 0 {
            data.truncate(logged);
            fx.push(Effect::File(data));
        }
    }

    /// Counts `data`, and assembles and handles its lines unless the build is over or
    /// over the log limit; true when `data` is to be logged.
    fn take(&mut self, data: &[u8], now: Instant, fx: &mut Vec<Effect>) -> bool {
        self.bytes += data.len() as u64;
        if self.finished || self.over_limit {
            return false;
        }
        self.last_activity = now;
        if self.max_log_size != 0 && self.bytes > self.max_log_size {
            // Nix kills the builder before logging this chunk.
            self.over_limit = true;
            self.alarm(LogAlarm::LogLimit(self.max_log_size), fx);
            return false;
        }
        let mut lines = std::mem::take(&mut self.lines);
        lines.push(data, |l| self.line(l, Source::Builder, fx));
        self.lines = lines;
        true
    }

    /// A line of the hook's stderr (without its `\n`).
    pub fn hook_line(&mut self, line: &str, now: Instant, fx: &mut Vec<Effect>) {
        if self.finished {
            return;
        }
        self.last_activity = now;
        let line = line.strip_suffix('\n').unwrap_or(line);
        match parse_json_message(line.as_bytes()) {
            None => log::debug!("dropping hook output line '{line}'"),
            Some(Err(e)) => self.json_error(&e, fx),
            Some(Ok(m)) => {
                // Nix 2.8: a build log line from the hook (`ssh-ng`) goes to the log
                // file, so that `nix log` has it; it is not counted in the log size.
                let log_line = match &m {
                    JsonMessage::Result {
                        result_type: t,
                        fields,
                        ..
                    }
                    | JsonMessage::Start {
                        activity_type: t,
                        fields,
                        ..
                    } if *t == RES_BUILD_LOG_LINE => Some(first_string(fields)),
                    _ => None,
                };
                self.message(m, Source::Hook, fx);
                if let Some(l) = log_line {
                    let mut bytes = l.into_bytes();
                    bytes.push(b'\n');
                    fx.push(Effect::File(bytes));
                }
            }
        }
    }

    /// Checks the timers at `now`.
    pub fn check_timers(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        if self.finished || self.alarmed {
            return;
        }
        // Nix checks silence first.
        if let Some(s) = self.max_silent_time {
            if now.saturating_duration_since(self.last_activity) >= s {
                return self.alarm(LogAlarm::Silent(s), fx);
            }
        }
        if let Some(t) = self.timeout {
            if now.saturating_duration_since(self.started) >= t {
                self.alarm(LogAlarm::Timeout(t), fx);
            }
        }
    }

    /// When [`check_timers`](Self::check_timers) may next raise an alarm (None: never).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.finished || self.alarmed {
            return None;
        }
        let silent = self.max_silent_time.map(|s| self.last_activity + s);
        let timeout = self.timeout.map(|t| self.started + t);
        match (silent, timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// End of output: flushes the partial line. Returns the tail and the byte count.
    pub fn eof(&mut self, fx: &mut Vec<Effect>) -> (Vec<String>, u64) {
        if !self.finished && !self.over_limit {
            let mut lines = std::mem::take(&mut self.lines);
            lines.finish(|l| self.line(l, Source::Builder, fx));
            self.lines = lines;
        }
        self.finished = true;
        (self.tail.to_vec(), self.bytes)
    }

    /// Bytes of builder output received so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes
    }

    /// The tail so far.
    pub fn tail(&self) -> &LogTail {
        &self.tail
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn alarm(&mut self, a: LogAlarm, fx: &mut Vec<Effect>) {
        if !self.alarmed {
            self.alarmed = true;
            fx.push(Effect::Alarm(a));
        }
    }

    /// `flushLine`: a complete line of builder output.
    fn line(&mut self, line: &[u8], source: Source, fx: &mut Vec<Effect>) {
        match parse_json_message(line) {
            Some(Ok(m)) => return self.message(m, source, fx),
            Some(Err(e)) => self.json_error(&e, fx),
            None => {}
        }
        self.tail.push_bytes(line);
        if self.echo || self.want_events {
            self.log_line(String::from_utf8_lossy(line).into_owned(), fx);
        }
    }

    /// A build log line shown to the user (echo and event), not the tail.
    fn log_line(&mut self, text: String, fx: &mut Vec<Effect>) {
        if self.echo {
            let mut b = Vec::with_capacity(text.len() + 1);
            b.extend_from_slice(text.as_bytes());
            b.push(b'\n');
            fx.push(Effect::Stderr(b));
        }
        if self.want_events {
            fx.push(Effect::Event(BuildLogEvent::Line {
                drv_path: self.drv_path.clone(),
                line: text,
            }));
        }
    }

    fn json_error(&mut self, e: &JsonMessageError, fx: &mut Vec<Effect>) {
        let text = match e {
            JsonMessageError::BadJson { .. } => format!("{e}\n"),
            JsonMessageError::Unhandled { .. } => format!("warning: {e}\n"),
        };
        fx.push(Effect::Stderr(text.into_bytes()));
    }

    /// `handleJSONLogMessage`.
    fn message(&mut self, m: JsonMessage, source: Source, fx: &mut Vec<Effect>) {
        let listener = self.want_events.then(|| self.drv_path.clone());
        let forward = |m: &JsonMessage, fx: &mut Vec<Effect>| {
            if let Some(drv_path) = &listener {
                fx.push(Effect::Event(BuildLogEvent::Activity {
                    drv_path: drv_path.clone(),
                    message: m.clone(),
                }));
            }
        };
        let activities = match source {
            Source::Builder => &mut self.builder_activities,
            Source::Hook => &mut self.hook_activities,
        };
        match m {
            JsonMessage::Start {
                id,
                activity_type,
                level,
                ref text,
                ..
            } => {
                if source == Source::Hook || activity_type == ACT_FILE_TRANSFER {
                    activities.insert(id);
                    // Nix's logger announces an activity as `<text>...`.
                    if level <= self.verbosity && !text.is_empty() {
                        fx.push(Effect::Stderr(format!("{text}...\n").into_bytes()));
                    }
                    forward(&m, fx);
                }
            }
            JsonMessage::Stop { id } => {
                if activities.remove(&id) {
                    forward(&m, fx);
                }
            }
            JsonMessage::Result {
                id,
                result_type,
                ref fields,
            } => {
                if !activities.contains(&id) {
                    return;
                }
                if result_type == RES_BUILD_LOG_LINE {
                    self.log_line(first_string(fields), fx);
                } else if result_type == RES_SET_PHASE {
                    if self.want_events {
                        fx.push(Effect::Event(BuildLogEvent::Phase {
                            drv_path: self.drv_path.clone(),
                            phase: first_string(fields),
                        }));
                    }
                } else {
                    forward(&m, fx);
                }
            }
            JsonMessage::SetPhase { phase } => {
                if self.want_events {
                    fx.push(Effect::Event(BuildLogEvent::Phase {
                        drv_path: self.drv_path.clone(),
                        phase,
                    }));
                }
            }
            JsonMessage::Msg { level, msg } => {
                if level <= self.verbosity {
                    let mut b = msg.clone().into_bytes();
                    b.push(b'\n');
                    fx.push(Effect::Stderr(b));
                }
                if self.want_events {
                    fx.push(Effect::Event(BuildLogEvent::Message {
                        drv_path: self.drv_path.clone(),
                        level,
                        msg,
                    }));
                }
            }
            JsonMessage::Other { .. } => {}
        }
    }
}

fn first_string(fields: &[Field]) -> String {
    match fields.first() {
        Some(Field::String(s)) => s.clone(),
        Some(Field::Int(i)) => i.to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests;
