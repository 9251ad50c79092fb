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

use actix::prelude::*;
use drover::build_result::BuildStatus;
use drover::store_path::StorePath;

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
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum ProgressEvent {
    /// The counters changed (sent once per batch of changes).
    Counters(Counters),
    /// A build really started: `building '<drv>'` (`on '<machine>'` for hook builds).
    BuildStarted {
        drv_path: StorePath,
        machine: Option<String>,
        /// `building`, `repairing outputs of` or `checking outputs of`.
        verb: &'static str,
    },
    /// A substitution started downloading: `copying path '<path>' from '<uri>'`.
    SubstitutionStarted { path: StorePath, uri: String },
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
    /// A message Nix would print (warnings, dependency errors, resolution notes).
    Message(String),
}
