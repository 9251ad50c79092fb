//! The build hook: a pool that offers derivations to hook processes ([`HookPool`],
//! answering [`HookTry`](crate::messages::HookTry)) and the accepted jobs ([`HookJob`],
//! answering [`HookBuild`](crate::messages::HookBuild)).
//!
//! Behaviour follows Nix 2.8.0 (see `drover::hook_protocol` for the wire format):
//!
//! * One hook process is started lazily at the first request and reused for every
//!   later request while it declines or postpones; one `try` is in flight at a time.
//! * `# accept` hands the process to the job; the next request starts a new process.
//! * `# decline-permanently` kills the process and every later request is answered
//!   `DeclinePermanently` without asking. drover also answers `DeclinePermanently`
//!   when no hook is configured (`build-hook =` empty). *Nix 2.8 differs here*: it
//!   still tries to `execv("")`; the first build that consults the hook prints
//!   `error: executing '': No such file or directory` and the run ends with
//!   `error: unexpected EOF reading a line` (exit 1).
//! * Writing the request fails with a broken pipe (the hook is gone): Nix prints
//!   `build hook died unexpectedly: <what the hook printed>` and the goal builds
//!   locally (`Decline`); the next request starts a new process. That only happens
//!   to a hook that answered before: Nix writes a new hook's preamble and first
//!   request before the hook can have exited, so a hook that exits at once gives
//!   the error `unexpected EOF reading a line` (with Nix's `--show-trace` hint),
//!   exit 1. drover writes a little later, and reads a broken pipe on a *new* hook
//!   the same way: the hook's lines, then the end of its reply pipe.
//! * The hook's argument is the run's verbosity (3 = info, `-v` adds one). Lines it
//!   writes while answering are printed as Nix prints them ([`try_line_output`]);
//!   from verbosity 6 (`-vvv`) on, Nix's own `starting build hook '…'`, `hook reply
//!   is '…'` and `killing process N` (when the hook is dropped) are printed too.
//! * Any reply other than the four words: `bad hook reply '<text>'`. drover then drops
//!   that process (Nix 2.8 would keep it), so the next request gets a fresh one.
//! * Errors (`HookReply::Error`) are not a failed goal: Nix 2.8 throws them out of
//!   the goal, which ends the whole `nix-store --realise` (exit 1, `error: <text>`
//!   only, other builds killed), `--keep-going` or not; so does the goal's
//!   `Effect::Fatal`. (For `unexpected EOF reading a line` Nix 2.8 also prints the
//!   line `(use '--show-trace' to show detailed location information)`: the error
//!   carries the trace `while reading the response from the build hook`.)
//! * Cancellation (keep-going off and another goal failed, or the run ended):
//!   the Worker sends [`CancelHookBuild`](crate::messages::CancelHookBuild) to the pool,
//!   which forwards it to its live jobs; the job running that build SIGKILLs the hook's
//!   process group (as Nix 2.8's `HookInstance` destructor does when the goal is
//!   dropped), stops waiting for its pipes once nothing more is buffered (a process
//!   that left the group may hold them open) and answers `HookFinished` with exit
//!   code `None`. Nix 2.8 prints nothing for it; like any cancelled top-level goal,
//!   the request is named in `build of … failed`.
//!
//! The decisions are plain state machines ([`PoolState`], [`JobState`]) so they can be
//! tested without an actor system; the actors in [`pool`] and [`job`] forward to them
//! and to the process handling in [`instance`].

pub mod instance;
pub mod job;
pub mod pool;

pub use instance::{HookInstance, SpawnError};
pub use job::HookJob;
pub use pool::{HookPool, HookPoolConfig};

use crate::messages::LogAlarm;
use drover::build_log::ansi::filter_ansi_text;
use drover::build_log::{parse_json_message, JsonMessage, JsonMessageError};
use drover::hook_protocol::{HookLine, ReplyKind};

/// Nix's verbosity `lvlDebug`: from here on (`-vvv`), Nix prints its debug lines
/// about the hook (`starting build hook '…'`, `hook reply is '…'`, `killing process
/// N`) and the hook's own debug messages.
pub const LVL_DEBUG: u32 = 6;

/// What Nix 2.8 prints for a line the hook writes while answering a `try`
/// (`tryBuildHook`): a line that is not an `@nix` message, verbatim; an `@nix` `msg`
/// at most as verbose as `verbosity`, and an activity's `text...`, through Nix's
/// logger (escape sequences filtered, colours kept only when `ansi`); other `@nix`
/// messages nothing. `@nix` text that is not JSON gives Nix's complaint and then the
/// line itself; JSON of the wrong shape a warning (Nix 2.8 aborts the run there;
/// later versions warn, as drover's log collector does). Replies print nothing.
pub fn try_line_output(line: &HookLine, verbosity: u32, ansi: bool) -> Vec<String> {
    let filter = |s: &str| filter_ansi_text(s, !ansi);
    match line {
        HookLine::Reply(_) => Vec::new(),
        HookLine::Other(l) => vec![l.clone()],
        HookLine::Json(l) => match parse_json_message(l.as_bytes()) {
            None => vec![l.clone()],
            Some(Err(e @ JsonMessageError::BadJson { .. })) => {
                vec![filter(&e.to_string()), l.clone()]
            }
            Some(Err(e @ JsonMessageError::Unhandled { .. })) => {
                vec![filter(&format!("warning: {e}"))]
            }
            Some(Ok(JsonMessage::Msg { level, msg })) if level <= u64::from(verbosity) => {
                vec![filter(&msg)]
            }
            Some(Ok(JsonMessage::Start { level, text, .. }))
                if level <= u64::from(verbosity) && !text.is_empty() =>
            {
                vec![filter(&format!("{text}..."))]
            }
            Some(Ok(_)) => Vec::new(),
        },
    }
}

/// What one `try` exchange with a hook process ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryOutcome {
    /// `decline`, `decline-permanently` or `postpone`.
    Reply(ReplyKind),
    /// `accept` and the machine name line.
    Accept { machine: String },
    /// Writing the request failed with a broken pipe; carries what the hook printed.
    Died(String),
    /// A protocol error (`bad hook reply '…'`, `unexpected EOF reading a line`, …).
    Error(String),
}

/// What the pool does with a new request.
#[derive(Debug, PartialEq, Eq)]
pub enum Begin<I> {
    /// Answer at once without asking a hook: the hook declined permanently, or none
    /// is configured.
    DeclinePermanently,
    /// Ask this idle instance.
    Use(I),
    /// Start a new instance and ask it.
    Spawn,
}

/// The pool's decisions, over any instance type (the real one is [`HookInstance`]).
#[derive(Debug)]
pub struct PoolState<I> {
    /// Cleared by `decline-permanently` (Nix's `worker.tryBuildHook`).
    available: bool,
    idle: Option<I>,
}

impl<I> PoolState<I> {
    /// `configured`: whether a `build-hook` is set at all.
    pub fn new(configured: bool) -> PoolState<I> {
        PoolState {
            available: configured,
            idle: None,
        }
    }

    /// Whether hooks are still consulted.
    pub fn available(&self) -> bool {
        self.available
    }

    /// Whether an idle instance is kept for the next request.
    pub fn has_idle(&self) -> bool {
        self.idle.is_some()
    }

    /// Drops the idle instance (which kills its process group).
    pub fn clear_idle(&mut self) {
        self.idle = None;
    }

    /// Starts a request.
    pub fn begin(&mut self) -> Begin<I> {
        if !self.available {
            return Begin::DeclinePermanently;
        }
        match self.idle.take() {
            Some(i) => Begin::Use(i),
            None => Begin::Spawn,
        }
    }

    /// Ends a request with the instance that answered it. Returns the instance when
    /// it accepted (it now belongs to the job); otherwise keeps it for later requests
    /// (decline, postpone) or drops it (decline-permanently, died, error).
    pub fn finish(&mut self, outcome: &TryOutcome, instance: I) -> Option<I> {
        match outcome {
            TryOutcome::Reply(ReplyKind::Decline | ReplyKind::Postpone) => {
                self.idle = Some(instance);
                None
            }
            TryOutcome::Reply(ReplyKind::DeclinePermanently) => {
                self.available = false;
                None
            }
            TryOutcome::Reply(ReplyKind::Accept) | TryOutcome::Accept { .. } => Some(instance),
            TryOutcome::Died(_) | TryOutcome::Error(_) => None,
        }
    }
}

/// The accepted job's decisions: it runs once (as build `id`); the first alarm or
/// cancellation while it runs kills the hook, later ones are ignored.
#[derive(Debug, Default)]
pub struct JobState {
    /// The build id, once a `HookBuild` arrived.
    id: Option<u64>,
    finished: bool,
    alarm: Option<LogAlarm>,
    cancelled: bool,
}

impl JobState {
    /// A `HookBuild` for build `id` arrived; `false` if the job already ran (the
    /// message is ignored).
    pub fn start(&mut self, id: u64) -> bool {
        if self.id.is_some() {
            return false;
        }
        self.id = Some(id);
        true
    }

    fn running(&self) -> bool {
        self.id.is_some() && !self.finished && self.alarm.is_none() && !self.cancelled
    }

    /// An alarm from the log collector; `true` if the hook must be killed now.
    pub fn alarm(&mut self, alarm: LogAlarm) -> bool {
        if !self.running() {
            return false;
        }
        self.alarm = Some(alarm);
        true
    }

    /// A `CancelHookBuild` for build `id` (the pool forwards every cancellation to
    /// every job); `true` if this job runs that build and its hook must be killed now.
    pub fn cancel(&mut self, id: u64) -> bool {
        if self.id != Some(id) || !self.running() {
            return false;
        }
        self.cancelled = true;
        true
    }

    /// Whether the job was cancelled.
    pub fn cancelled(&self) -> bool {
        self.cancelled
    }

    /// The hook exited; the alarm that ended it, if any.
    pub fn finish(&mut self) -> Option<LogAlarm> {
        self.finished = true;
        self.alarm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn json(s: &str) -> HookLine {
        HookLine::Json(s.to_owned())
    }

    /// What build-remote writes while it answers, and what Nix 2.8 prints of it.
    #[test]
    fn try_lines_are_printed_as_nix_prints_them() {
        let debug = json(r#"@nix {"action":"msg","level":6,"msg":"got 0 remote builders"}"#);
        assert!(try_line_output(&debug, 3, false).is_empty());
        assert!(try_line_output(&debug, 5, false).is_empty());
        assert_eq!(
            try_line_output(&debug, LVL_DEBUG, false),
            ["got 0 remote builders"]
        );
        let coloured = json(
            r#"@nix {"action":"msg","level":0,"msg":"\u001b[31;1merror:\u001b[0m cannot build on 'ssh://m1'"}"#,
        );
        assert_eq!(
            try_line_output(&coloured, 3, false),
            ["error: cannot build on 'ssh://m1'"]
        );
        assert_eq!(
            try_line_output(&coloured, 3, true),
            ["\u{1b}[31;1merror:\u{1b}[0m cannot build on 'ssh://m1'"]
        );
        let start =
            json(r#"@nix {"action":"start","id":1,"level":3,"type":103,"text":"copying 0 paths"}"#);
        assert_eq!(try_line_output(&start, 3, false), ["copying 0 paths..."]);
        assert!(try_line_output(&start, 2, false).is_empty());
        let plain = HookLine::Other("\u{1b}[1mplain\tline".into());
        assert_eq!(try_line_output(&plain, 0, false), ["\u{1b}[1mplain\tline"]);
        assert!(try_line_output(&HookLine::Reply("decline".into()), 7, false).is_empty());
        let bad = json("@nix {oops");
        let out = try_line_output(&bad, 3, false);
        assert_eq!(out.len(), 2);
        assert!(out[0].starts_with("bad JSON log message from builder: "));
        assert_eq!(out[1], "@nix {oops");
        let stop = json(r#"@nix {"action":"stop","id":1}"#);
        assert!(try_line_output(&stop, 7, false).is_empty());
    }

    #[test]
    fn pool_reuses_until_accept() {
        let mut p = PoolState::new(true);
        assert_eq!(p.begin(), Begin::Spawn);
        assert_eq!(p.finish(&TryOutcome::Reply(ReplyKind::Decline), 1), None);
        assert_eq!(p.begin(), Begin::Use(1));
        assert_eq!(p.finish(&TryOutcome::Reply(ReplyKind::Postpone), 1), None);
        assert_eq!(p.begin(), Begin::Use(1));
        let acc = TryOutcome::Accept {
            machine: "m".into(),
        };
        assert_eq!(p.finish(&acc, 1), Some(1));
        assert!(!p.has_idle());
        assert_eq!(p.begin(), Begin::Spawn);
    }

    #[test]
    fn pool_declines_permanently() {
        let mut p = PoolState::new(true);
        assert_eq!(p.begin(), Begin::Spawn);
        p.finish(&TryOutcome::Reply(ReplyKind::DeclinePermanently), 7);
        assert!(!p.available());
        assert_eq!(p.begin(), Begin::DeclinePermanently);
        let mut q: PoolState<u8> = PoolState::new(false);
        assert_eq!(q.begin(), Begin::DeclinePermanently);
    }

    #[test]
    fn pool_drops_dead_and_broken_instances() {
        let mut p = PoolState::new(true);
        p.begin();
        assert_eq!(p.finish(&TryOutcome::Died(String::new()), 1), None);
        assert!(p.available());
        assert_eq!(p.begin(), Begin::Spawn);
        assert_eq!(p.finish(&TryOutcome::Error("x".into()), 2), None);
        assert_eq!(p.begin(), Begin::Spawn);
    }

    #[test]
    fn job_first_alarm_wins() {
        let mut j = JobState::default();
        assert!(!j.alarm(LogAlarm::LogLimit(1)), "not running yet");
        assert!(j.start(1));
        assert!(!j.start(1));
        let t = LogAlarm::Timeout(Duration::from_secs(1));
        assert!(j.alarm(t));
        assert!(!j.alarm(LogAlarm::LogLimit(1)));
        assert_eq!(j.finish(), Some(t));
        assert!(!j.alarm(t));
    }

    #[test]
    fn job_cancel_kills_its_own_build_once() {
        let mut j = JobState::default();
        assert!(!j.cancel(5), "not running yet");
        assert!(j.start(5));
        assert!(!j.cancel(6), "another build's cancellation");
        assert!(j.cancel(5));
        assert!(!j.cancel(5), "already killed");
        assert!(j.cancelled());
        assert!(
            !j.alarm(LogAlarm::LogLimit(1)),
            "no alarm after a cancellation"
        );
        assert_eq!(j.finish(), None);
    }

    #[test]
    fn job_no_cancel_after_alarm_or_end() {
        let mut j = JobState::default();
        j.start(5);
        assert!(j.alarm(LogAlarm::LogLimit(1)));
        assert!(!j.cancel(5), "already killed by the alarm");
        let mut k = JobState::default();
        k.start(5);
        k.finish();
        assert!(!k.cancel(5));
        assert!(!k.cancelled());
    }
}
