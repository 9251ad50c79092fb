//! `drover realise PATH...`: `nix-store --realise` on drover's actor system.
//!
//! Arguments are `.drv` paths (all outputs, or `drv!out,dev` / `drv^out`) and other
//! store paths (made valid, by substitution once caches exist). The command prints
//! what will be built (`these N derivations will be built:`), the build messages and
//! builder output on stderr, the output paths on stdout one per line, and exits with
//! Nix's status: 0, 1, or `0x60 | bits` for failed builds.
//!
//! On a terminal (without `--plain` or `--log-format`) the live build tree
//! ([`crate::tree`]) is drawn below those lines. Every run is recorded
//! ([`crate::report::Recorder`]) and its report saved for `drover report`;
//! `--report` prints it on stderr after everything Nix prints.

use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use drover::derived_path::{DerivedPath, OutputsSpec};
use drover::store_path::StoreDir;
use drover::store_path::StorePath as Path;
use drover_actors::messages::{BuildLogEvent, BuildMode};
use drover_actors::plan::{QueryAnswer, QueryObserver};
use drover_actors::progress::ProgressEvent;
use drover_actors::SystemBuilder;

use crate::display::Display;
use crate::log_format::{act, lvl, JsonLogger, LogFormat};
use crate::Context;

#[derive(clap::Args)]
pub struct Args {
    /// Run at most N local builds at once (`auto`: one per CPU).
    #[arg(short = 'j', long = "max-jobs", value_name = "N", value_parser = crate::args::max_jobs, allow_hyphen_values = true)]
    max_jobs: Option<String>,
    /// Tell builders to use at most N cores (NIX_BUILD_CORES; 0 = all).
    #[arg(long, value_name = "N")]
    cores: Option<u64>,
    /// Keep going after a build fails, building what does not depend on it.
    #[arg(short = 'k', long)]
    keep_going: bool,
    /// Build locally when substitution fails.
    #[arg(long)]
    fallback: bool,
    /// Rebuild valid outputs and compare them with the existing ones.
    #[arg(long, conflicts_with = "repair")]
    check: bool,
    /// Rebuild or re-substitute outputs that are missing or corrupt.
    #[arg(long)]
    repair: bool,
    /// Keep the build directory of failed builds.
    #[arg(short = 'K', long)]
    keep_failed: bool,
    /// Build each derivation N more times and fail if the outputs differ
    /// (the `repeat` setting).
    #[arg(long, value_name = "N")]
    repeat: Option<u64>,
    /// Fail builds that run longer than N seconds.
    #[arg(long, value_name = "N")]
    timeout: Option<u64>,
    /// Fail builds that print nothing for N seconds.
    #[arg(long, value_name = "N")]
    max_silent_time: Option<u64>,
    /// Do not echo builder output (failure messages then carry the log tail).
    #[arg(short = 'Q', long = "no-build-output")]
    no_build_output: bool,
    /// Only print what would be built.
    #[arg(long)]
    dry_run: bool,
    /// Print plain messages even on a terminal (no build tree, no status line).
    #[arg(long)]
    plain: bool,
    /// Print a report of the run after it (also saved for `drover report`).
    #[arg(long)]
    report: bool,
    /// How to log, as Nix's `--log-format`: `raw`, `raw-with-logs`, `bar`,
    /// `bar-with-logs` or `internal-json`.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    #[command(flatten)]
    roots: crate::roots::RootArgs,
    /// Derivations (`X.drv`, `X.drv!out,dev`, `X.drv^*`) and store paths.
    /// (None: nothing to do, as `nix-store --realise` without arguments.)
    #[arg(value_name = "PATH")]
    paths: Vec<String>,
}

impl Args {
    /// The flags that are settings in Nix, as `--option`s.
    fn as_options(&self) -> Vec<(String, String)> {
        let mut o = Vec::new();
        let mut set = |k: &str, v: String| o.push((k.to_owned(), v));
        if let Some(j) = &self.max_jobs {
            set("max-jobs", j.clone());
        }
        if let Some(c) = self.cores {
            set("cores", c.to_string());
        }
        if self.keep_going {
            set("keep-going", "true".into());
        }
        if self.fallback {
            set("fallback", "true".into());
        }
        if self.keep_failed {
            set("keep-failed", "true".into());
        }
        if let Some(n) = self.repeat {
            set("repeat", n.to_string());
        }
        if let Some(t) = self.timeout {
            set("timeout", t.to_string());
        }
        if let Some(t) = self.max_silent_time {
            set("max-silent-time", t.to_string());
        }
        o
    }
}

pub fn run(ctx: &mut Context, args: Args) -> anyhow::Result<ExitCode> {
    let log_format: Option<LogFormat> = args.log_format.as_deref().map(str::parse).transpose()?;
    for (k, v) in args.as_options() {
        ctx.settings.apply_option(&k, &v);
    }
    let settings = &ctx.settings;
    let store_dir = settings.store_dir().clone();
    let requests: Vec<DerivedPath> = args
        .paths
        .iter()
        .map(|p| parse_request(&store_dir, p))
        .collect::<anyhow::Result<_>>()?;
    let mode = if args.check {
        BuildMode::Check
    } else if args.repair {
        BuildMode::Repair
    } else {
        BuildMode::Normal
    };
    let plain = args.plain || log_format.is_some_and(|f| !f.bar());
    let display = Arc::new(Mutex::new(Display::new(plain)));
    // Nix's own log formats keep their looks; by default a terminal gets the tree.
    if log_format.is_none() {
        display.lock().unwrap().use_tree();
    }
    let recorder = Arc::new(Mutex::new(crate::report::Recorder::new(
        store_dir.clone(),
        std::time::Instant::now(),
    )));
    let recording = recorder.clone();
    if log_format == Some(LogFormat::InternalJson) {
        display
            .lock()
            .unwrap()
            .set_json(JsonLogger::new(store_dir.clone()));
    }
    crate::display::share(&display);

    // `echo`: the log is shown whole (no tail in failures); `print_lines`: the
    // collector prints it itself (else the log format shows it from the events).
    let (echo, print_lines) = match log_format {
        None => (!args.no_build_output, true),
        // The logger decides, whatever `-Q` says (Nix's `isVerbose()`).
        Some(f) => (f.shows_logs(), f.echo()),
    };
    let log_events = echo && !print_lines;
    // Nix prints the plan, `building …` and `copying path …` at `lvlInfo`, warnings
    // at `lvlWarn`: `--quiet` hides them.
    let verbosity = ctx.verbosity;
    let stderr: drover_actors::log_collector::StderrSink = display.clone();
    let builder = SystemBuilder::new(settings)
        .env(ctx.env.clone())
        .echo(echo)
        .stderr(stderr)
        .print_build_lines(print_lines)
        .verbosity(verbosity)
        .goal_events(false)
        .log_events(false);

    let shown = display.clone();
    let printer_store_dir = store_dir.clone();
    let outcome = actix::System::new().block_on(async move {
        // An actor on the system's arbiter, so that `building '…'` comes before the
        // builder output the log collectors echo.
        let progress = ProgressPrinter {
            verbosity,
            display: display.clone(),
            store_dir: printer_store_dir,
            name_lines: log_format == Some(LogFormat::BarWithLogs),
            recorder: recording,
        }
        .start();
        let mut builder = builder.progress(progress.clone().recipient());
        if log_events {
            builder = builder.log_events_to(progress.recipient());
        }
        let (system, _events) = builder.start()?;
        for w in system.warnings() {
            display.lock().unwrap().line(&format!("warning: {w}"));
        }
        let plan = crate::display::json_activity(
            lvl::DEBUG,
            act::UNKNOWN,
            |_| "querying info about missing paths".into(),
            |_| Vec::new(),
            || system.plan_observed(&requests, Some(&QueryActivities)),
        )?;
        if verbosity >= crate::LVL_INFO {
            let mut d = display.lock().unwrap();
            for line in drover_actors::plan::describe(system.store().store_dir(), &plan) {
                d.line(&line);
            }
        }
        if args.dry_run {
            return Ok::<_, anyhow::Error>(None);
        }
        // The status line shows elapsed times and the bytes of copies in flight, so
        // it is redrawn on a timer even when no event comes (events only redraw when
        // the last draw is old enough: see `display`).
        let ticking = display.clone();
        let ticker = actix::spawn(async move {
            let mut interval = tokio::time::interval(crate::display::TICK_INTERVAL);
            loop {
                interval.tick().await;
                ticking.lock().unwrap().tick();
            }
        });
        display.lock().unwrap().emit_json(|j| j.worker_started());
        // Queued first: an Interrupt always finds the run started.
        let run = system.realise(requests, mode);
        let interrupter = system.interrupter();
        crate::interrupt::while_running(move || interrupter.do_send(drover_actors::Interrupt));
        let outcome = run.await;
        crate::interrupt::after_run();
        ticker.abort();
        let mut d = display.lock().unwrap();
        d.finish();
        for e in &outcome.errors {
            d.line(&error_message(e));
        }
        Ok(Some((outcome, system.store().clone())))
    })?;
    let Some((outcome, store)) = outcome else {
        return Ok(ExitCode::SUCCESS);
    };
    if outcome.exit_status != 0 {
        finish_report(ctx, &shown, &recorder, args.report, verbosity);
        return Ok(ExitCode::from(outcome.exit_status.clamp(1, 255) as u8));
    }
    let done: Vec<_> = outcome
        .results
        .iter()
        .map(|r| (&r.path, &r.result))
        .collect();
    let lines = crate::roots::realised_lines(&store, &args.roots, &done)?;
    // Nix warns once, before the first output path it prints (none: no warning).
    if !outcome.results.is_empty() && args.roots.add_root.is_none() && verbosity >= crate::LVL_WARN
    {
        shown.lock().unwrap().line(crate::roots::NO_ROOT_WARNING);
    }
    let mut out = std::io::stdout().lock();
    for l in lines {
        writeln!(out, "{l}")?;
    }
    out.flush()?;
    // After everything Nix prints: the report comes last.
    finish_report(ctx, &shown, &recorder, args.report, verbosity);
    Ok(ExitCode::SUCCESS)
}

/// An error as Nix logs it: `error: ` and the message, whose further lines (a log
/// tail, the two hashes of a mismatch) are indented to line up after `error: `.
fn error_message(msg: &str) -> String {
    // Nix prints the `--show-trace` hint of an error with a trace on its own line.
    let hint = format!("\n{}", drover::hook_protocol::SHOW_TRACE_HINT);
    let (msg, hint) = match msg.strip_suffix(hint.as_str()) {
        Some(m) => (m, hint.as_str()),
        None => (msg, ""),
    };
    format!("error: {}{hint}", msg.replace('\n', "\n       "))
}

/// `X.drv` means all its outputs; `X.drv!out` / `X.drv^out,dev` some; others are
/// plain store paths (resolving symlinks into the store, as Nix does).
fn parse_request(store_dir: &StoreDir, arg: &str) -> anyhow::Result<DerivedPath> {
    if let Ok(p) = DerivedPath::parse(store_dir, arg) {
        return Ok(match p {
            DerivedPath::Opaque(path) if path.is_derivation() => DerivedPath::Built {
                drv_path: path,
                outputs: OutputsSpec::All,
            },
            p => p,
        });
    }
    crate::args::derived_path(store_dir, arg)
}

/// Prints the Worker's progress events as Nix prints them, through the display,
/// and keeps its status line current (counters, running builds, live transfers).
struct ProgressPrinter {
    verbosity: u32,
    display: Arc<Mutex<Display>>,
    store_dir: StoreDir,
    /// `bar-with-logs`: builder lines are printed as `<name>> <line>`.
    name_lines: bool,
    /// Records the run for the report.
    recorder: Arc<Mutex<crate::report::Recorder>>,
}

/// Saves the run's report in the state directory (a warning when it cannot be)
/// and with `--report` prints it on stderr, after the run's own messages.
fn finish_report(
    ctx: &Context,
    display: &Arc<Mutex<Display>>,
    recorder: &Arc<Mutex<crate::report::Recorder>>,
    print: bool,
    verbosity: u32,
) {
    let empty =
        crate::report::Recorder::new(ctx.settings.store_dir().clone(), std::time::Instant::now());
    let recorder = std::mem::replace(&mut *recorder.lock().unwrap(), empty);
    let report = recorder.finish(std::time::Instant::now());
    let mut d = display.lock().unwrap();
    if let Err(e) = report.save(ctx.settings.state_dir()) {
        if verbosity >= crate::LVL_WARN {
            d.line(&format!("warning: {e}"));
        }
    }
    if print {
        for l in report.render() {
            d.line(&l);
        }
    }
}

impl Actor for ProgressPrinter {
    type Context = actix::Context<Self>;
}

/// Each narinfo query of the plan as Nix's `actQueryPathInfo` activity
/// (`BinaryCacheStore::queryPathInfoUncached`), for `--log-format internal-json`.
struct QueryActivities;

impl QueryObserver for QueryActivities {
    fn query(&self, path: &Path, uri: &str, ask: &mut dyn FnMut() -> QueryAnswer) -> QueryAnswer {
        crate::display::json_activity(
            lvl::TALKATIVE,
            act::QUERY_PATH_INFO,
            |sd| format!("querying info about '{}' on '{uri}'", sd.print(path)),
            |sd| vec![sd.print(path).into(), uri.into()],
            ask,
        )
    }
}

impl Handler<ProgressEvent> for ProgressPrinter {
    type Result = ();
    fn handle(&mut self, event: ProgressEvent, _: &mut Self::Context) {
        self.recorder
            .lock()
            .unwrap()
            .event(&event, std::time::Instant::now());
        let mut d = self.display.lock().unwrap();
        d.event(&event);
        match event {
            ProgressEvent::Counters(c) => d.counters(c),
            ProgressEvent::BuildStarted {
                drv_path,
                machine,
                verb,
                round,
            } => {
                let on = machine
                    .as_ref()
                    .map(|m| format!(" on '{m}'"))
                    .unwrap_or_default();
                let round = round
                    .map(|(n, m)| format!(" (round {n}/{m})"))
                    .unwrap_or_default();
                let text = format!("{verb} '{}'{round}{on}", self.store_dir.print(&drv_path));
                if d.json().is_some() {
                    let machine = machine.unwrap_or_default();
                    d.emit_json(|j| j.build_started(&drv_path, &text, &machine));
                } else if self.verbosity >= crate::LVL_INFO {
                    d.line(&format!("{text}..."));
                }
                d.build_started(drv_path);
            }
            ProgressEvent::SubstitutionStarted {
                path,
                uri,
                transfer,
            } => {
                // Nix 2.8 words a copy out of another local store as one *to* it.
                let dir = if uri == "local" { "to" } else { "from" };
                let text = format!(
                    "copying path '{}' {dir} '{uri}'",
                    self.store_dir.print(&path)
                );
                if d.json().is_some() {
                    d.emit_json(|j| j.substitution_started(&path, &uri, &text));
                } else if self.verbosity >= crate::LVL_INFO {
                    d.line(&format!("{text}..."));
                }
                d.substitution_started(path, transfer);
            }
            ProgressEvent::BuildFinished { drv_path, .. } => {
                d.emit_json(|j| j.build_finished(&drv_path));
                d.build_finished(&drv_path)
            }
            ProgressEvent::SubstitutionFinished { path, .. }
            | ProgressEvent::SubstitutionCancelled { path } => {
                d.emit_json(|j| j.substitution_finished(&path));
                d.substitution_finished(&path)
            }
            ProgressEvent::Message(m) => match m.strip_prefix("error: ") {
                Some(e) => d.line(&error_message(e)),
                None => d.line(&m),
            },
            ProgressEvent::GoalStarted { .. }
            | ProgressEvent::GoalFinished { .. }
            | ProgressEvent::Waiting { .. }
            | ProgressEvent::SubstitutionSizes { .. }
            | ProgressEvent::Scheduled { .. }
            | ProgressEvent::Estimates(_) => {}
        }
    }
}

/// Builder lines and phases, when the log format shows them itself (JSON results,
/// `bar-with-logs`' `<name>> <line>`).
impl Handler<BuildLogEvent> for ProgressPrinter {
    type Result = ();
    fn handle(&mut self, event: BuildLogEvent, _: &mut Self::Context) {
        let mut d = self.display.lock().unwrap();
        match event {
            BuildLogEvent::Line { drv_path, line } => {
                if d.json().is_some() {
                    d.emit_json(|j| j.build_log_line(&drv_path, &line));
                } else if self.name_lines {
                    let name = drv_path.name().trim_end_matches(".drv");
                    d.line(&format!("{name}> {line}"));
                }
            }
            BuildLogEvent::Phase { drv_path, phase } => {
                d.emit_json(|j| j.build_phase(&drv_path, &phase));
            }
            BuildLogEvent::Activity { drv_path, message } => {
                d.emit_json(|j| j.forwarded_activity(&drv_path, &message));
            }
            // Printed by the collector already, at their level.
            BuildLogEvent::Message { .. } => {}
        }
    }
}
