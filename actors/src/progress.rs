//! Progress of a run: the Worker's counters (Nix's `expectedBuilds`, `runningBuilds`,
//! `doneBuilds`, `failedBuilds` and the same for substitutions) and goal events, sent
//! as [`ProgressEvent`]s to an optional recipient so a CLI can print
//! `building '…'...` and a progress bar.
//!
//! Counting follows Nix: a derivation goal is *expected* from its creation until it is
//! done; it is *running* from the real build start (local or hook) until done; *done*
//! counts only `Built`; *failed* counts failures except `DependencyFailed`. A path
//! substitution is expected from creation until done, running while it downloads,
//! done on success and failed only when some substituter really failed.
//!
//! Bytes of a copy in flight are not counted in [`Counters`] (that would take a
//! message per chunk): each copy has a [`Transfer`] of atomics, shared through an
//! `Arc` between the job that copies (it adds the bytes downloaded and unpacked as
//! they pass) and [`ProgressEvent::SubstitutionStarted`], so a display reads the live
//! counts whenever it redraws. When the substitution finishes its sizes move into
//! `done_nar_size`/`done_download_size` and the display drops the transfer (also
//! on [`ProgressEvent::SubstitutionCancelled`], for a copy cancelled in flight).

use std::sync::Arc;

use actix::prelude::*;
use drover::binary_cache::TransferProgress;
use drover::build_result::{BuildResult, BuildStatus};
use drover::realisation::DrvOutput;
use drover::store_path::StorePath;

/// What a goal is for: the key the Worker deduplicates goals by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GoalKey {
    /// A derivation goal: the `.drv` path.
    Derivation(StorePath),
    /// A path substitution goal: the store path.
    Substitution(StorePath),
    /// A drv-output substitution goal: the realisation's id.
    DrvOutput(DrvOutput),
}

/// The counters of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub expected_builds: u64,
    pub running_builds: u64,
    pub done_builds: u64,
    pub failed_builds: u64,
    pub expected_substitutions: u64,
    pub running_substitutions: u64,
    pub done_substitutions: u64,
    pub failed_substitutions: u64,
    /// NAR bytes of the substitutions being tried / done (`expectedNarSize`).
    pub expected_nar_size: u64,
    pub done_nar_size: u64,
    /// Download bytes (narinfo `FileSize`) of the substitutions being tried / done.
    pub expected_download_size: u64,
    pub done_download_size: u64,
}

/// What happens during a run.
#[derive(Message, Debug, Clone, PartialEq)]
#[rtype(result = "()")]
pub enum ProgressEvent {
    /// The scheduler gave a waiting goal a slot (`crate::schedule`): why it was
    /// chosen — its estimated remaining path to a requested goal (its own estimate
    /// plus the longest chain waiting on it) and its own estimate — and how many
    /// goals were still waiting for a slot of that kind after it.
    Scheduled {
        goal: GoalKey,
        path: std::time::Duration,
        estimate: std::time::Duration,
        still_waiting: usize,
    },
    /// The counters changed (sent once per batch of changes).
    Counters(Counters),
    /// A build really started: `building '<drv>'` (`on '<machine>'` for hook builds).
    BuildStarted {
        drv_path: StorePath,
        machine: Option<String>,
        /// `building`, `repairing outputs of` or `checking outputs of`.
        verb: &'static str,
        /// `(round, rounds)` of a repeated build (`repeat`): ` (round N/M)`.
        round: Option<(u32, u32)>,
    },
    /// A substitution started downloading: `copying path '<path>' from '<uri>'`.
    /// `transfer` counts its bytes while it runs (a new one for each attempt).
    SubstitutionStarted {
        path: StorePath,
        uri: String,
        transfer: Arc<Transfer>,
    },
    /// A derivation goal finished.
    BuildFinished {
        drv_path: StorePath,
        status: BuildStatus,
    },
    /// A path substitution goal finished.
    SubstitutionFinished {
        path: StorePath,
        status: BuildStatus,
    },
    /// A path substitution goal was cancelled while copying (the run ended, or
    /// nobody waits for it any more): its transfer no longer counts.
    SubstitutionCancelled { path: StorePath },
    /// A message Nix would print (warnings, dependency errors, resolution notes).
    Message(String),
    /// A goal was created (only with `WorkerSettings::goal_events`).
    GoalStarted { goal: GoalKey },
    /// A goal finished, with its result (only with `WorkerSettings::goal_events`;
    /// cancelled goals do not finish).
    GoalFinished { goal: GoalKey, result: BuildResult },
    /// A goal started waiting: `path` is the `.drv` of a derivation goal or the
    /// store path of a substitution. It waits until its next event (another
    /// `Waiting`, a start or its end).
    Waiting { path: StorePath, reason: WaitReason },
    /// The substituter a path is copied from has it with these sizes (NAR bytes,
    /// download bytes: 0 when unknown): what its copy's transfer counts up to.
    SubstitutionSizes {
        path: StorePath,
        nar_size: u64,
        download_size: u64,
    },

    /// The scheduler's estimates changed: the run's remaining time and the
    /// expected wall time of derivations that became ready or started since the
    /// last such event (only sent when something changed).
    Estimates(std::sync::Arc<Estimates>),
}

/// What the critical-path scheduler expects of the run (see `ProgressEvent::Estimates`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Estimates {
    /// Remaining wall time: the larger of the remaining critical path and the
    /// remaining work divided by the slots; `None` until the graph is known.
    pub eta: Option<std::time::Duration>,
    /// Expected wall time per derivation (new or changed entries only).
    pub expected: Vec<(drover::store_path::StorePath, std::time::Duration)>,
    /// The current critical path, first step first (drv paths).
    pub critical_path: Vec<drover::store_path::StorePath>,
}

/// Every field compares exactly, so [`ProgressEvent`] keeps its `Eq`.
impl Eq for Estimates {}

/// Why a goal waits (Nix says it only for locks and machines, as messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// For these goals to finish: input derivations (`.drv` paths) and paths to
    /// substitute.
    Inputs(Vec<StorePath>),
    /// For a local build slot (`max-jobs` builds run).
    BuildSlot,
    /// For a substitution slot (`max-substitution-jobs` copies run).
    SubstitutionSlot,
    /// For an output lock another process holds (`pid`, when `/proc/locks` says).
    Lock {
        path: std::path::PathBuf,
        pid: Option<u32>,
    },
    /// For a remote machine (the build hook postponed it).
    Machine,
}

impl WaitReason {
    /// Waiting for the locks of these outputs (paths without `.lock`): the first
    /// lock another process holds, with its pid from `/proc/locks`, or the first
    /// lock when none says who.
    pub fn lock(outputs: &std::collections::BTreeSet<std::path::PathBuf>) -> WaitReason {
        use drover::store::locks::{holder_pid, lock_path_of};
        let held = outputs.iter().find_map(|p| {
            let lock = lock_path_of(p);
            holder_pid(&lock).map(|pid| (lock, pid))
        });
        match held {
            Some((path, pid)) => WaitReason::Lock {
                path,
                pid: Some(pid),
            },
            None => WaitReason::Lock {
                path: outputs
                    .iter()
                    .next()
                    .map(|p| lock_path_of(p))
                    .unwrap_or_default(),
                pid: None,
            },
        }
    }
}

/// Live byte counts of one copy from a substituter: bumped by the copying thread,
/// read by any other at any time (relaxed atomics: the counts are for display).
///
/// The counters are a [`TransferProgress`]: what
/// [`drover::binary_cache::BinaryCache::copy_into_observed`] counts into (see
/// [`Transfer::binary_cache`]); other substituters count with
/// [`Transfer::add_downloaded`]/[`Transfer::add_unpacked`]. It wraps them only to
/// compare by identity.
#[derive(Debug, Default)]
pub struct Transfer(TransferProgress);

impl Transfer {
    /// Bytes of the (compressed) file read from the substituter so far: the
    /// narinfo's `FileSize` once a binary cache copy is complete; substituters
    /// without a file to download (another local store) leave it at 0.
    pub fn downloaded(&self) -> u64 {
        self.0.downloaded()
    }

    /// Bytes of the NAR unpacked so far (`NarSize` once complete).
    pub fn unpacked(&self) -> u64 {
        self.0.unpacked()
    }

    pub fn add_downloaded(&self, n: u64) {
        self.0.add_downloaded(n);
    }

    pub fn add_unpacked(&self, n: u64) {
        self.0.add_unpacked(n);
    }

    /// The counters a binary cache copy writes into.
    pub fn binary_cache(&self) -> &TransferProgress {
        &self.0
    }
}

/// A transfer is equal only to itself: its counts change while it runs, so two
/// [`ProgressEvent`]s are equal when they share the same live transfer.
impl PartialEq for Transfer {
    fn eq(&self, other: &Transfer) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for Transfer {}

/// A reader that counts the bytes passing through it into a [`Transfer`], as
/// downloaded and/or unpacked bytes.
pub struct CountingReader<'a, R> {
    pub inner: R,
    pub transfer: &'a Transfer,
    pub downloaded: bool,
    pub unpacked: bool,
}

impl<R: std::io::Read> std::io::Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.downloaded {
            self.transfer.add_downloaded(n as u64);
        }
        if self.unpacked {
            self.transfer.add_unpacked(n as u64);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_counts_and_equals_only_itself() {
        let t = Transfer::default();
        t.add_downloaded(3);
        t.add_unpacked(5);
        t.add_unpacked(1);
        assert_eq!((t.downloaded(), t.unpacked()), (3, 6));
        let mut r = CountingReader {
            inner: &b"hello"[..],
            transfer: &t,
            downloaded: false,
            unpacked: true,
        };
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut out).unwrap();
        assert_eq!((t.downloaded(), t.unpacked()), (3, 11));
        assert_eq!(t, t);
        assert_ne!(t, Transfer::default());
        let a = Arc::new(Transfer::default());
        assert_eq!(a, a.clone());
    }
}
