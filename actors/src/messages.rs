//! The messages that cross actor boundaries, and the values they carry.
//!
//! Goals talk only to the Worker; the Worker and goals reach the effectful actors
//! (store executor, local builder, hook pool, log collector, substituters) through
//! `Recipient`s injected at construction, so tests swap any of them for a fake.
//! Messages inside one component (Worker ↔ goals) live with that component; this module
//! holds the *boundaries* between components, which several teams build against:
//!
//! ```text
//!   Worker ──RunLocalBuild──▶ LocalBuilder ──LogBytes/LogEof──▶ LogCollector
//!     ▲                           │  ▲                               │
//!     └──────LocalBuildFinished───┘  └────────LogAlarm───────────────┘
//!   Worker ──HookTry──▶ HookPool ──(HookReply::Accept{job})──▶ Worker
//!   Worker ──HookBuild──▶ HookJob ──LogBytes──▶ LogCollector;  HookJob ──HookFinished──▶ Worker
//!   Worker ──CancelHookBuild──▶ HookPool ──(forwards)──▶ HookJob
//! ```
//!
//! Every message is a documented struct with `#[rtype]`; none is sent with a hidden
//! global address.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use drover::build_result::BuildResult;
use drover::derivation::Derivation;
use drover::store_path::{StorePath, StorePathSet};

/// How a derivation goal builds (Nix's `BuildMode`): the library's definition, which
/// the local build primitives take too.
pub use drover::build::BuildMode;

// ---------------------------------------------------------------------------------------
// Local builds: Worker/DerivationGoal → LocalBuilder
// ---------------------------------------------------------------------------------------

/// Everything a local build needs, decided by the DerivationGoal: the (possibly
/// resolved) derivation, which outputs to build, and the inputs it may refer to.
/// The goal holds the output locks and a build slot for the whole build.
#[derive(Debug, Clone)]
pub struct LocalBuildRequest {
    /// The `.drv` path (for a resolved CA derivation: the resolved one).
    pub drv_path: StorePath,
    pub drv: Arc<Derivation>,
    /// Output name → the path it must end up at, where known statically (input-addressed
    /// and fixed outputs); floating outputs are absent and get their content address.
    pub output_paths: BTreeMap<String, StorePath>,
    /// Outputs to build (in check mode: all of them).
    pub wanted_outputs: BTreeSet<String>,
    /// The closure of all inputs (input sources and used outputs of input derivations):
    /// the candidates for reference scanning besides the outputs themselves.
    pub input_closure: StorePathSet,
    pub mode: BuildMode,
    /// Keep the build directory (and `.check` outputs) on failure: `--keep-failed`.
    pub keep_failed: bool,
}

/// Asks the LocalBuilder to run one build; the answer comes later as
/// [`LocalBuildFinished`] to `reply_to`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RunLocalBuild {
    /// Identifies the build in the reply and in log events (the Worker's goal id).
    pub id: u64,
    pub request: LocalBuildRequest,
    pub reply_to: Recipient<LocalBuildFinished>,
}

/// The outcome of a local build: status Built with `built_outputs`, or a failure
/// status (PermanentFailure, TimedOut, HashMismatch-as-OutputRejected,
/// NotDeterministic, LogLimitExceeded, MiscFailure, …) with Nix's error message.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct LocalBuildFinished {
    pub id: u64,
    pub result: BuildResult,
    /// A fixed-output hash mismatch (exit-status bit 2).
    pub hash_mismatch: bool,
    /// Output name → the path it was registered at (content-addressed outputs included).
    pub outputs: BTreeMap<String, StorePath>,
}

/// Cancels a running local build (keep-going off and another goal failed): the
/// builder's process group is killed and the build directory removed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelLocalBuild {
    pub id: u64,
}

// ---------------------------------------------------------------------------------------
// Build logs: LocalBuilder / HookJob → LogCollector
// ---------------------------------------------------------------------------------------

/// Limits and destination of one build's log, as the settings give them.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// The `.drv` whose log this is (names the file `drvs/xx/rest[.bz2]`).
    pub drv_path: StorePath,
    /// `NIX_LOG_DIR`.
    pub log_dir: PathBuf,
    /// `compress-build-log`.
    pub compress: bool,
    /// `log-lines`: how many lines to keep for the failure message.
    pub tail_lines: usize,
    /// `max-build-log-size` (0 = unlimited).
    pub max_log_size: u64,
    /// `max-silent-time` (None = unlimited).
    pub max_silent_time: Option<Duration>,
    /// `timeout` (None = unlimited).
    pub timeout: Option<Duration>,
    /// Echo the builder's output to stderr as it comes (nix-store without `-Q`).
    pub echo: bool,
}

/// Where one build's output goes: the addresses of that build's LogCollector.
#[derive(Clone)]
pub struct LogSink {
    pub bytes: Recipient<LogBytes>,
    pub hook_stderr: Recipient<HookStderrLine>,
    pub eof: Recipient<LogEof>,
}

/// Starts the LogCollector of one build; its alarms go to the given recipient (the
/// owner of the builder or hook process). Injected into the LocalBuilder and the hook
/// pool, so tests can replace collectors with fakes.
pub type StartLogCollector = Arc<dyn Fn(LogConfig, Recipient<LogAlarm>) -> LogSink + Send + Sync>;

/// Raw builder output, in order, as read from the pty or the hook's fd 4.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LogBytes(pub Vec<u8>);

/// A line the hook printed on its stderr (fd 1/2) that is not a reply: `@nix` JSON
/// messages are handled as log events, other lines echoed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct HookStderrLine(pub String);

/// The output has ended; flush and close the log file and answer with the summary.
#[derive(Message)]
#[rtype(result = "LogSummary")]
pub struct LogEof;

/// What the log collector knows at the end of a build.
#[derive(Debug, Clone, Default, MessageResponse)]
pub struct LogSummary {
    /// The last `log-lines` lines, for the failure message.
    pub tail: Vec<String>,
    /// Bytes of builder output received.
    pub bytes: u64,
    /// Where the log was written, if it was.
    pub log_file: Option<PathBuf>,
    /// Why the log file could not be created or written (a full disk, say): Nix
    /// fails the build then.
    pub log_error: Option<String>,
}

/// Something the log collector noticed that ends the build: the owner of the
/// builder process kills it and reports the matching status.
#[derive(Message, Debug, Clone, Copy, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum LogAlarm {
    /// No output for `max-silent-time`: TimedOut, "timed out after N seconds of silence".
    Silent(Duration),
    /// Running longer than `timeout`: TimedOut, "timed out after N seconds".
    Timeout(Duration),
    /// More than `max-build-log-size` bytes: LogLimitExceeded.
    LogLimit(u64),
}

/// What a build's log says as it runs, for progress displays and `-v` output.
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum BuildLogEvent {
    /// A complete line of builder output (`\r` handled as Nix does).
    Line { drv_path: StorePath, line: String },
    /// `@nix {"action":"setPhase",…}`.
    Phase { drv_path: StorePath, phase: String },
    /// `@nix {"action":"msg",…}` from a builder or hook.
    Message {
        drv_path: StorePath,
        level: u64,
        msg: String,
    },
}

// ---------------------------------------------------------------------------------------
// The build hook: DerivationGoal (via Worker) → HookPool → HookJob
// ---------------------------------------------------------------------------------------

/// Offers a derivation to the build hook (`try`). The pool starts a hook process
/// lazily and reuses it until it accepts a job or declines permanently.
#[derive(Message)]
#[rtype(result = "HookReply")]
pub struct HookTry {
    /// Whether drover would build it locally now (a free build slot): `amWilling`.
    pub am_willing: bool,
    pub system: String,
    pub drv_path: StorePath,
    /// `requiredSystemFeatures` (plus `ca-derivations` for floating outputs).
    pub required_features: BTreeSet<String>,
}

/// The hook's answer to [`HookTry`].
#[derive(MessageResponse)]
pub enum HookReply {
    /// `# decline`: build locally; the hook process is kept for the next request.
    Decline,
    /// `# decline-permanently` (or no hook configured, or the hook died): build locally
    /// and never ask again in this run.
    DeclinePermanently,
    /// `# postpone`: wait a while and offer it again.
    Postpone,
    /// `# accept` + machine name: the hook process now belongs to this build.
    Accept {
        machine: String,
        job: Recipient<HookBuild>,
    },
    /// The hook answered something else (`bad hook reply '…'`) or broke the protocol:
    /// an error that ends the whole run (exit 1), as Nix 2.8 throws it out of the goal.
    Error(String),
}

/// Sends the accepted job its inputs and the outputs to produce, then streams the
/// builder log to `log` until the hook exits; answers [`HookFinished`] to `reply_to`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct HookBuild {
    pub id: u64,
    /// Input closure paths, sent as a sorted store path set.
    pub inputs: StorePathSet,
    /// Names of the outputs not yet valid (all of them in check mode).
    pub missing_outputs: BTreeSet<String>,
    pub log: LogConfig,
    pub reply_to: Recipient<HookFinished>,
}

/// The hook process of an accepted job exited.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct HookFinished {
    pub id: u64,
    /// The exit code, or None when killed by a signal.
    pub exit_code: Option<i32>,
    /// What the log collector recorded (tail for the failure message).
    pub log: LogSummary,
    /// Set when a [`LogAlarm`] ended the job.
    pub alarm: Option<LogAlarm>,
}

/// Cancels a running hook build (keep-going off and another goal failed, or the run
/// was aborted): Nix 2.8 drops the goal, and its `HookInstance` destructor SIGKILLs the
/// hook's process group. Sent by the Worker to the hook pool, which forwards it to its
/// jobs; the job of build `id` kills the hook's process group, stops waiting for its
/// pipes and still answers [`HookFinished`] (exit code `None`, as killed by a signal),
/// which the Worker ignores for a goal it cancelled. Unknown or finished ids are
/// ignored.
#[derive(Message, Debug, Clone, Copy, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct CancelHookBuild {
    /// The id the build was started with ([`HookBuild::id`]).
    pub id: u64,
}
