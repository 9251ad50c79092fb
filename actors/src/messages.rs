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
use drover::build::BuildSettings;

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
    /// The goal's name in timeout and log-limit messages (`building of
    /// '<drv>!<outputs>' from .drv file`, `drover::build::done::goal_name`).
    pub goal_name: String,
    /// (round, rounds) of a repeated build (`repeat`); (1, 1) for a single build.
    pub round: (u32, u32),
    /// The settings of the run this build is for, when they are its own (a daemon
    /// client's `SetOptions`); `None`: the LocalBuilder's configuration.
    pub run_settings: Option<Arc<RunBuildSettings>>,
}

/// A run's own settings for its local builds, in place of the LocalBuilder's
/// configuration: what a daemon client's `SetOptions` changes in how a build runs
/// and registers its outputs (`cores`, `sandbox`, `secret-key-files`,
/// `auto-optimise-store`, … in [`BuildSettings`]) and the time limits of its log.
#[derive(Debug, Clone)]
pub struct RunBuildSettings {
    pub build: Arc<BuildSettings>,
    /// `max-silent-time` (None = unlimited).
    pub max_silent_time: Option<Duration>,
    /// `timeout` (None = unlimited).
    pub timeout: Option<Duration>,
    /// `compress-build-log`.
    pub compress_build_log: bool,
    /// `log-lines`.
    pub log_lines: usize,
    /// `max-build-log-size` (0 = unlimited).
    pub max_build_log_size: u64,
}

impl RunBuildSettings {
    /// The local-build settings of `settings` (the caller's environment is this
    /// process's, as the LocalBuilder's own).
    pub fn from_settings(settings: &drover::config::Settings) -> RunBuildSettings {
        let secs = |n: i64| (n > 0).then(|| Duration::from_secs(n as u64));
        RunBuildSettings {
            build: Arc::new(BuildSettings::from_settings(settings)),
            max_silent_time: secs(settings.max_silent_time()),
            timeout: secs(settings.timeout()),
            compress_build_log: settings.compress_build_log(),
            log_lines: settings.log_lines() as usize,
            max_build_log_size: settings.max_build_log_size(),
        }
    }
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
    /// An activity of the builder (a file transfer) or of the hook that Nix
    /// accepts: its `start`, its `stop`, or a `result` other than a log line or a
    /// phase (those are [`Line`](Self::Line)s and [`Phase`](Self::Phase)s). Ids are
    /// the sender's.
    Activity {
        drv_path: StorePath,
        message: drover::build_log::JsonMessage,
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

// ---------------------------------------------------------------------------------------
// The Worker and its goals: Worker → goal
// ---------------------------------------------------------------------------------------
//
// ```text
//   Worker ──StartGoal / SubGoalDone / AllSubGoalsDone / SlotGranted──▶ GoalActor
//   Worker ──AddWantedOutputs / CancelGoal──────────────────────────────▶ GoalActor
//   GoalActor ──RequestSubGoals / AcquireSlot / ReleaseSlot──────────────▶ Worker
//   GoalActor ──GoalProgress / GoalFinished / GoalFatal / GoalStopped────▶ Worker
//   GoalActor ──RunLocalBuild──▶ LocalBuilder ──LocalBuildFinished──▶ GoalActor
//   GoalActor ──HookTry──▶ HookPool;  GoalActor ──HookBuild──▶ HookJob ──HookFinished──▶ GoalActor
// ```
//
// Every goal message to the Worker names the goal (its `GoalId`); a goal's messages
// reach the Worker in the order it sent them.

pub use crate::goal::host::{Finished, GoalProgressKind, SlotKind};
pub use crate::goal::{GoalId, GoalRequest, WaiteeResult};

/// Worker → goal: start working (sent once, right after the goal actor is started).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StartGoal;

/// Worker → goal: one sub-goal it waits for finished. The outcome is shared by all
/// waiters of that sub-goal.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SubGoalDone(pub WaiteeResult);

/// Worker → goal: every sub-goal it waited for finished (or one failed and
/// keep-going is off, and the others were abandoned).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct AllSubGoalsDone;

/// Worker → goal: the slot asked for with [`AcquireSlot`] is now the goal's.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SlotGranted;

/// Worker → derivation goal: another goal wants these outputs too (Nix's
/// `addWantedOutputs`). A goal that has already finished ignores it; the Worker
/// compares [`Finished::wanted`] with what was asked.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct AddWantedOutputs(pub drover::derived_path::OutputsSpec);

/// Worker → goal: nobody needs the goal any more (or the run ended). A running
/// build is cancelled and the actor stops without reporting.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct CancelGoal;

// ---------------------------------------------------------------------------------------
// The Worker and its goals: goal → Worker
// ---------------------------------------------------------------------------------------

/// Goal → Worker: create (or reuse) these goals and report each as it finishes,
/// then [`AllSubGoalsDone`]. An empty list is answered with [`AllSubGoalsDone`].
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RequestSubGoals {
    pub goal: GoalId,
    pub requests: Vec<GoalRequest>,
}

/// Goal → Worker: asks for a build or substitution slot; answered with
/// [`SlotGranted`] when one is free (at once, or when another goal releases one).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct AcquireSlot {
    pub goal: GoalId,
    pub kind: SlotKind,
}

/// Goal → Worker: gives a slot back (a finished goal's slots are released anyway).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ReleaseSlot {
    pub goal: GoalId,
    pub kind: SlotKind,
}

/// Goal → Worker: progress to count and show.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct GoalProgress {
    pub goal: GoalId,
    pub progress: GoalProgressKind,
}

/// Goal → Worker: the goal is done, with its outcome (the `BuildResult` in it); the
/// actor stops.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct GoalFinished {
    pub goal: GoalId,
    pub finished: Finished,
}

/// Goal → Worker: an error that ends the whole run with exit status 1, as an error
/// Nix throws out of a goal (`bad hook reply '…'`).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct GoalFatal {
    pub goal: GoalId,
    pub error: String,
}

/// Goal → Worker: the goal actor stopped without reporting an end (its actor was
/// dropped or stopped): the Worker fails the goal, so a run never hangs.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct GoalStopped {
    pub goal: GoalId,
}

/// Where goals send what they report: the Worker's recipients, shared by all goals
/// of a run.
#[derive(Clone)]
pub struct WorkerLink {
    pub request_sub_goals: Recipient<RequestSubGoals>,
    pub acquire_slot: Recipient<AcquireSlot>,
    pub release_slot: Recipient<ReleaseSlot>,
    pub progress: Recipient<GoalProgress>,
    pub finished: Recipient<GoalFinished>,
    pub fatal: Recipient<GoalFatal>,
    pub stopped: Recipient<GoalStopped>,
}

impl WorkerLink {
    /// The link to an actor that handles every goal → Worker message.
    pub fn to<A>(addr: &Addr<A>) -> WorkerLink
    where
        A: Actor<Context = Context<A>>
            + Handler<RequestSubGoals>
            + Handler<AcquireSlot>
            + Handler<ReleaseSlot>
            + Handler<GoalProgress>
            + Handler<GoalFinished>
            + Handler<GoalFatal>
            + Handler<GoalStopped>,
    {
        WorkerLink {
            request_sub_goals: addr.clone().recipient(),
            acquire_slot: addr.clone().recipient(),
            release_slot: addr.clone().recipient(),
            progress: addr.clone().recipient(),
            finished: addr.clone().recipient(),
            fatal: addr.clone().recipient(),
            stopped: addr.clone().recipient(),
        }
    }
}
