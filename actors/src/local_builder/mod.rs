//! The LocalBuilder: runs local builds (`RunLocalBuild`) with the `drover::build`
//! primitives and answers `LocalBuildFinished`.
//!
//! Per build: prepare (scratch outputs, build directory, environment) on a blocking
//! thread; spawn the builder attached to a fresh pty; the build's future reads the
//! pty on the arbiter ([`pty::pump`]) and hands the raw bytes to the build's LogCollector (`LogBytes`, then `LogEof`
//! → `LogSummary`); wait for the exit; kill the builder's process group; classify
//! and register the outputs on a blocking thread (Nix's `buildDone`). A `LogAlarm`
//! from the collector (silence, timeout, log limit) or a `CancelLocalBuild` kills the
//! process group; the build then ends as TimedOut, LogLimitExceeded or cancelled.
//!
//! [`LocalBuilderState`] is the bookkeeping (which process belongs to which build,
//! why it was killed), a plain state machine; [`actor::LocalBuilder`] is the thin
//! actor around it.

pub mod actor;
pub mod history;
pub mod post_build_hook;
pub mod pty;
pub mod reap;
pub mod recursive;

use std::collections::HashMap;

use drover::build::KillReason;

use crate::messages::LogAlarm;

pub use actor::{LocalBuilder, LocalBuilderConfig};

/// What the LocalBuilder knows about one running build.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BuildState {
    /// The builder's pid (= its process group) once spawned.
    pub pid: Option<u32>,
    /// Why it was (or is to be) killed; the first reason wins.
    pub kill: Option<KillReason>,
}

/// The LocalBuilder's bookkeeping, by build id.
#[derive(Debug, Default)]
pub struct LocalBuilderState {
    builds: HashMap<u64, BuildState>,
}

/// The kill reason of a log alarm.
pub fn kill_reason(alarm: LogAlarm) -> KillReason {
    match alarm {
        LogAlarm::Silent(d) => KillReason::Silence(d.as_secs()),
        LogAlarm::Timeout(d) => KillReason::Timeout(d.as_secs()),
        LogAlarm::LogLimit(n) => KillReason::LogLimit(n),
    }
}

impl LocalBuilderState {
    pub fn new() -> LocalBuilderState {
        LocalBuilderState::default()
    }

    /// A build was accepted.
    pub fn start(&mut self, id: u64) {
        self.builds.insert(id, BuildState::default());
    }

    pub fn get(&self, id: u64) -> Option<&BuildState> {
        self.builds.get(&id)
    }

    pub fn running(&self) -> usize {
        self.builds.len()
    }

    /// The builder was spawned; returns true when it must be killed right away (it
    /// was cancelled or alarmed while being prepared).
    pub fn spawned(&mut self, id: u64, pid: u32) -> bool {
        match self.builds.get_mut(&id) {
            Some(b) => {
                b.pid = Some(pid);
                b.kill.is_some()
            }
            None => true,
        }
    }

    fn kill(&mut self, id: u64, reason: KillReason) -> Option<u32> {
        let b = self.builds.get_mut(&id)?;
        if b.kill.is_none() {
            b.kill = Some(reason);
        }
        b.pid
    }

    /// A log alarm: returns the process group to kill (if spawned).
    pub fn alarm(&mut self, id: u64, alarm: LogAlarm) -> Option<u32> {
        self.kill(id, kill_reason(alarm))
    }

    /// A cancellation: returns the process group to kill (if spawned).
    pub fn cancel(&mut self, id: u64) -> Option<u32> {
        self.kill(id, KillReason::Cancelled)
    }

    /// The build is over: forget it, returning why it was killed, if it was.
    pub fn finished(&mut self, id: u64) -> Option<KillReason> {
        self.builds.remove(&id).and_then(|b| b.kill)
    }
}

/// What Nix appends to a builder's failure when the disk is (nearly) full.
pub const DISK_FULL_NOTE: &str =
    "\nnote: build failure may have been caused by lack of free disk space";

/// Free space below which Nix suspects a full disk (8 MiB, not configurable).
pub const DISK_FULL_THRESHOLD: u64 = 8 << 20;

/// Nix's `cleanupDecideWhetherDiskFull`: whether any of `dirs` is on a file system
/// with less than [`DISK_FULL_THRESHOLD`] available (to unprivileged users).
/// A directory that cannot be examined counts as not full.
pub fn disk_nearly_full(dirs: &[std::path::PathBuf]) -> bool {
    dirs.iter().any(|d| {
        nix::sys::statvfs::statvfs(d.as_path()).is_ok_and(|st| {
            st.blocks_available().saturating_mul(st.block_size()) < DISK_FULL_THRESHOLD
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn alarms_and_cancel_before_and_after_spawn() {
        let mut s = LocalBuilderState::new();
        s.start(1);
        s.start(2);
        assert_eq!(s.running(), 2);
        // before the spawn: nothing to kill yet, but the spawn is told to kill
        assert_eq!(s.cancel(1), None);
        assert!(s.spawned(1, 100));
        assert!(!s.spawned(2, 200));
        assert_eq!(
            s.alarm(2, LogAlarm::Silent(Duration::from_secs(2))),
            Some(200)
        );
        // the first reason wins
        assert_eq!(s.alarm(2, LogAlarm::LogLimit(5)), Some(200));
        assert_eq!(s.finished(2), Some(KillReason::Silence(2)));
        assert_eq!(s.finished(1), Some(KillReason::Cancelled));
        assert_eq!(s.running(), 0);
        // unknown builds
        assert_eq!(s.cancel(3), None);
        assert!(s.spawned(3, 1));
    }

    #[test]
    fn disk_full_heuristic() {
        // The root file system of a test machine has more than 8 MiB free; a
        // missing directory counts as not full.
        assert!(!disk_nearly_full(&[std::env::temp_dir()]));
        assert!(!disk_nearly_full(&["/nonexistent/dir".into()]));
        assert!(!disk_nearly_full(&[]));
    }

    #[test]
    fn kill_reasons() {
        assert_eq!(
            kill_reason(LogAlarm::Timeout(Duration::from_secs(7))),
            KillReason::Timeout(7)
        );
    }
}
