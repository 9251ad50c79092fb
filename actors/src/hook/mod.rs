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
//!   locally (`Decline`); the next request starts a new process. If the write succeeds
//!   but the reply pipe ends before a line (the usual case for a hook that exits at
//!   once), the answer is the error `unexpected EOF reading a line`, as in Nix 2.8.
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
use drover::hook_protocol::ReplyKind;

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
