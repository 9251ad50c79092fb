//! How a build ended, as Nix 2.8's `DerivationGoal::buildDone`, `timedOut` and
//! `handleChildOutput` classify it (src/libstore/build/derivation-goal.cc): the one
//! place that turns a builder's or a build hook's end into a [`BuildStatus`] and its
//! message, used by local builds (`drover::build::finish`) and hook builds (the
//! derivation goal) alike.
//!
//! * killed for `max-silent-time` / `timeout` → TimedOut, `<goal> timed out after N
//!   seconds of silence` / `… after N seconds`; for `max-build-log-size` →
//!   LogLimitExceeded, `<goal> killed after writing more than N bytes of log output`,
//!   where `<goal>` is `building of '<drv>!<wanted outputs>' from .drv file`;
//! * a failed exit → `builder for '<drv>' failed with exit code N` (or `failed due to
//!   signal N (<name>)`); a hook build that exits 101 is TimedOut, one that exits
//!   otherwise than 100 (or by a signal) MiscFailure; a local build (or a hook's 100)
//!   PermanentFailure, or TransientFailure for unsandboxed (fixed-output, impure)
//!   derivations;
//! * with the log not shown (`-Q`), the failed-exit message gets the last log lines
//!   and `For full logs, run 'nix log <drv>'.` (Nix 2.8 names `nix log` whether or not
//!   `nix-command` is enabled).

use std::process::ExitStatus;

use crate::build_result::BuildStatus;

use super::KillReason;

/// How the builder process (or the hook process) exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuilderExit {
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Killed by a signal whose number is not known.
    SomeSignal,
}

impl From<ExitStatus> for BuilderExit {
    fn from(s: ExitStatus) -> BuilderExit {
        use std::os::unix::process::ExitStatusExt;
        match (s.code(), s.signal()) {
            (Some(c), _) => BuilderExit::Code(c),
            (None, Some(sig)) => BuilderExit::Signal(sig),
            (None, None) => BuilderExit::SomeSignal,
        }
    }
}

impl BuilderExit {
    /// A hook's exit as the hook job reports it (`None`: killed by a signal).
    pub fn from_code(code: Option<i32>) -> BuilderExit {
        code.map_or(BuilderExit::SomeSignal, BuilderExit::Code)
    }

    pub fn success(self) -> bool {
        self == BuilderExit::Code(0)
    }

    /// Nix's `statusToString`: `failed with exit code N`, `failed due to signal N
    /// (<name>)`.
    pub fn describe(self) -> String {
        match self {
            BuilderExit::Code(c) => format!("failed with exit code {c}"),
            BuilderExit::Signal(sig) => {
                // SAFETY: strsignal returns a pointer to a static or thread-local string.
                let name = unsafe {
                    let p = nix::libc::strsignal(sig);
                    if p.is_null() {
                        String::from("unknown signal")
                    } else {
                        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
                    }
                };
                format!("failed due to signal {sig} ({name})")
            }
            BuilderExit::SomeSignal => "failed due to signal".into(),
        }
    }
}

/// Who ran the builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builder {
    /// A local build; `sandboxed` is the derivation type's (`isSandboxed`).
    Local { sandboxed: bool },
    /// The build hook (a remote build).
    Hook { sandboxed: bool },
}

/// The name of a derivation goal in Nix's messages: `building of
/// '<drv>!<outputs>' from .drv file`, `outputs` being the outputs the goal was
/// created for (`*` for all).
pub fn goal_name(drv: &str, outputs: &str) -> String {
    format!("building of '{drv}!{outputs}' from .drv file")
}

/// A build killed for `reason` (`goal`: [`goal_name`]; `drv`: the printed `.drv`).
pub fn killed(reason: KillReason, goal: &str, drv: &str) -> (BuildStatus, String) {
    match reason {
        KillReason::Silence(n) => (
            BuildStatus::TimedOut,
            format!("{goal} timed out after {n} seconds of silence"),
        ),
        KillReason::Timeout(n) => (
            BuildStatus::TimedOut,
            format!("{goal} timed out after {n} seconds"),
        ),
        KillReason::LogLimit(n) => (
            BuildStatus::LogLimitExceeded,
            format!("{goal} killed after writing more than {n} bytes of log output"),
        ),
        KillReason::Cancelled => (
            BuildStatus::MiscFailure,
            format!("build of '{drv}' was cancelled"),
        ),
    }
}

/// A builder (or hook) that exited unsuccessfully, `tail` being the last log lines
/// when they are to be shown (the log was not echoed).
pub fn failed_exit(
    drv: &str,
    exit: BuilderExit,
    builder: Builder,
    tail: Option<&[String]>,
) -> (BuildStatus, String) {
    let status = match (builder, exit) {
        (Builder::Hook { .. }, BuilderExit::Code(101)) => BuildStatus::TimedOut,
        (Builder::Hook { sandboxed }, BuilderExit::Code(100))
        | (Builder::Local { sandboxed }, _) => {
            if sandboxed {
                BuildStatus::PermanentFailure
            } else {
                BuildStatus::TransientFailure
            }
        }
        (Builder::Hook { .. }, _) => BuildStatus::MiscFailure,
    };
    let mut msg = format!("builder for '{drv}' {}", exit.describe());
    if let Some(tail) = tail.filter(|t| !t.is_empty()) {
        msg.push_str(&log_tail(drv, tail));
    }
    (status, msg)
}

/// What Nix 2.8 appends to `builder for '…' failed …` when the log was not shown:
/// the last log lines and where the full log is.
pub fn log_tail(drv: &str, tail: &[String]) -> String {
    let mut s = format!(";\nlast {} log lines:\n", tail.len());
    for l in tail {
        s.push_str("> ");
        s.push_str(l);
        s.push('\n');
    }
    s.push_str(&format!("For full logs, run 'nix log {drv}'."));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: Builder = Builder::Local { sandboxed: true };
    const HOOK: Builder = Builder::Hook { sandboxed: true };

    #[test]
    fn kills_name_the_goal_with_its_outputs() {
        let g = goal_name("/s/d.drv", "out");
        assert_eq!(g, "building of '/s/d.drv!out' from .drv file");
        assert_eq!(
            killed(KillReason::Silence(2), &g, "/s/d.drv"),
            (
                BuildStatus::TimedOut,
                format!("{g} timed out after 2 seconds of silence")
            )
        );
        assert_eq!(
            killed(KillReason::Timeout(3), &g, "/s/d.drv").1,
            format!("{g} timed out after 3 seconds")
        );
        assert_eq!(
            killed(KillReason::LogLimit(1000), &g, "/s/d.drv"),
            (
                BuildStatus::LogLimitExceeded,
                format!("{g} killed after writing more than 1000 bytes of log output")
            )
        );
        assert_eq!(
            killed(KillReason::Cancelled, &g, "/s/d.drv").1,
            "build of '/s/d.drv' was cancelled"
        );
    }

    #[test]
    fn exits_are_classified_as_nix_2_8_does() {
        let st = |b, e| failed_exit("/s/d.drv", e, b, None).0;
        use BuilderExit::*;
        assert_eq!(st(LOCAL, Code(1)), BuildStatus::PermanentFailure);
        assert_eq!(st(LOCAL, Code(101)), BuildStatus::PermanentFailure);
        assert_eq!(
            st(Builder::Local { sandboxed: false }, Code(1)),
            BuildStatus::TransientFailure
        );
        assert_eq!(st(HOOK, Code(101)), BuildStatus::TimedOut);
        assert_eq!(st(HOOK, Code(100)), BuildStatus::PermanentFailure);
        assert_eq!(
            st(Builder::Hook { sandboxed: false }, Code(100)),
            BuildStatus::TransientFailure
        );
        assert_eq!(st(HOOK, Code(1)), BuildStatus::MiscFailure);
        assert_eq!(st(HOOK, SomeSignal), BuildStatus::MiscFailure);
        assert_eq!(
            failed_exit("/s/d.drv", Code(3), LOCAL, None).1,
            "builder for '/s/d.drv' failed with exit code 3"
        );
        assert_eq!(
            failed_exit("/s/d.drv", Signal(9), HOOK, None).1,
            "builder for '/s/d.drv' failed due to signal 9 (Killed)"
        );
    }

    #[test]
    fn the_log_tail_names_nix_log() {
        let tail = vec!["one".to_string(), "two".to_string()];
        assert_eq!(
            failed_exit("/s/d.drv", BuilderExit::Code(1), HOOK, Some(&tail)).1,
            "builder for '/s/d.drv' failed with exit code 1;\nlast 2 log lines:\n> one\n> two\nFor full logs, run 'nix log /s/d.drv'."
        );
        // No lines: nothing appended.
        assert_eq!(
            failed_exit("/s/d.drv", BuilderExit::Code(1), HOOK, Some(&[])).1,
            "builder for '/s/d.drv' failed with exit code 1"
        );
    }
}
