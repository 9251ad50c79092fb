//! `drover realise PATH...`: `nix-store --realise` on drover's actor system.
//!
//! Arguments are `.drv` paths (all outputs, or `drv!out,dev` / `drv^out`) and other
//! store paths (made valid, by substitution once caches exist). The command prints
//! what will be built (`these N derivations will be built:`), the build messages and
//! builder output on stderr, the output paths on stdout one per line, and exits with
//! Nix's status: 0, 1, or `0x60 | bits` for failed builds.

use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use drover::derived_path::{DerivedPath, OutputsSpec};
use drover::store_path::StoreDir;
use drover_actors::binary_cache_substituter::substituters_from_settings;
use drover_actors::hook::{HookPool, HookPoolConfig};
use drover_actors::local_builder::{LocalBuilder, LocalBuilderConfig};
use drover_actors::log_collector::{starter_with, CollectorOptions};
use drover_actors::messages::BuildMode;
use drover_actors::progress::ProgressEvent;
use drover_actors::{Realise, RealiseOutcome, Worker, WorkerConfig, WorkerSettings};

use crate::display::Display;
use crate::plan::{plan, print_plan, PlanOptions};
use crate::Context;

#[derive(clap::Args)]
pub struct Args {
    /// Run at most N local builds at once (`auto`: one per CPU).
    #[arg(short = 'j', long = "max-jobs", value_name = "N")]
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
    /// Print plain messages even on a terminal (no status line).
    #[arg(long)]
    plain: bool,
    #[command(flatten)]
    roots: crate::roots::RootArgs,
    /// Derivations (`X.drv`, `X.drv!out,dev`, `X.drv^*`) and store paths.
    #[arg(required = true, value_name = "PATH")]
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
    let store = Arc::new(ctx.open_store()?);
    let display = Arc::new(Mutex::new(Display::new(args.plain)));
    crate::display::share(&display);

    let (substituters, warnings) = substituters_from_settings(settings);
    for w in warnings {
        display.lock().unwrap().line(&format!("warning: {w}"));
    }
    let options = PlanOptions {
        parallel: settings
            .get("http-connections")
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(25),
        fallback: settings.fallback(),
        ca_derivations: settings.is_experimental_feature_enabled("ca-derivations"),
        impure_derivations: settings.is_experimental_feature_enabled("impure-derivations"),
    };
    let plan = plan(&store, &substituters, &requests, &options)?;
    print_plan(&store_dir, &plan, &display);
    if args.dry_run {
        return Ok(ExitCode::SUCCESS);
    }

    let echo = !args.no_build_output;
    let mut builder_config = LocalBuilderConfig::from_settings(settings);
    builder_config.echo = echo;
    let mut worker_settings = WorkerSettings::from_settings(settings);
    worker_settings.log.echo = echo;
    let env = ctx.env.clone();
    let settings = settings.clone();
    let stderr: drover_actors::log_collector::StderrSink = display.clone();

    let roots_store = store.clone();
    let outcome: RealiseOutcome = actix::System::new().block_on(async move {
        let mut options = CollectorOptions::new(None);
        options.stderr = stderr;
        let start_log = starter_with(options);
        let builder = LocalBuilder::new(store.clone(), builder_config, start_log.clone()).start();
        let hook_pool = settings.build_hook().map(|_| {
            HookPool::new(HookPoolConfig::from_settings(&settings, &env, 3, start_log)).start()
        });
        let hook = hook_pool.clone().map(|p| p.recipient());
        // Cancelled hook builds are killed through the pool, which knows its jobs.
        let cancel_hook_build = hook_pool.map(|p| p.recipient());
        let progress = ProgressPrinter {
            display: display.clone(),
            store_dir: store.store_dir().clone(),
        }
        .start();
        let worker = Worker::new(WorkerConfig {
            store: store.clone(),
            local_builder: builder.clone().recipient(),
            cancel_local_build: builder.recipient(),
            hook,
            cancel_hook_build,
            substituters,
            settings: worker_settings,
            progress: Some(progress.recipient()),
        })
        .start();
        // Queued first: an Interrupt always finds the run started.
        let request = worker.send(Realise { requests, mode });
        let w = worker.clone();
        crate::interrupt::while_running(move || w.do_send(drover_actors::Interrupt));
        let outcome = request.await;
        crate::interrupt::after_run();
        let outcome = outcome.unwrap_or_else(|e| RealiseOutcome {
            results: Vec::new(),
            exit_status: 1,
            errors: vec![format!("the worker stopped unexpectedly: {e}")],
        });
        let mut d = display.lock().unwrap();
        d.finish();
        for e in &outcome.errors {
            d.line(&error_message(e));
        }
        outcome
    });

    if outcome.exit_status != 0 {
        return Ok(ExitCode::from(outcome.exit_status.clamp(1, 255) as u8));
    }
    let done: Vec<_> = outcome
        .results
        .iter()
        .map(|r| (&r.path, &r.result))
        .collect();
    let lines = crate::roots::realised_lines(&roots_store, &args.roots, &done)?;
    let mut out = std::io::stdout().lock();
    for l in lines {
        writeln!(out, "{l}")?;
    }
    out.flush()?;
    if args.roots.add_root.is_none() {
        eprintln!("{}", crate::roots::NO_ROOT_WARNING);
    }
    Ok(ExitCode::SUCCESS)
}

/// An error as Nix logs it: `error: ` and the message, whose further lines (a log
/// tail, the two hashes of a mismatch) are indented to line up after `error: `.
fn error_message(msg: &str) -> String {
    format!("error: {}", msg.replace('\n', "\n       "))
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
    let path = crate::args::store_path(store_dir, arg)?;
    Ok(if path.is_derivation() {
        DerivedPath::Built {
            drv_path: path,
            outputs: OutputsSpec::All,
        }
    } else {
        DerivedPath::Opaque(path)
    })
}

/// Prints the Worker's progress events as Nix prints them, through the display,
/// and keeps its status line current (counters, running builds, live transfers).
struct ProgressPrinter {
    display: Arc<Mutex<Display>>,
    store_dir: StoreDir,
}

impl Actor for ProgressPrinter {
    type Context = actix::Context<Self>;

    /// The status line shows elapsed times and the bytes of copies in flight, so it
    /// is redrawn on a timer even when no event comes (events only redraw when the
    /// last draw is old enough: see `display`).
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(crate::display::TICK_INTERVAL, |act, _| {
            act.display.lock().unwrap().tick();
        });
    }
}

impl Handler<ProgressEvent> for ProgressPrinter {
    type Result = ();
    fn handle(&mut self, event: ProgressEvent, _: &mut Self::Context) {
        let mut d = self.display.lock().unwrap();
        match event {
            ProgressEvent::Counters(c) => d.counters(c),
            ProgressEvent::BuildStarted {
                drv_path,
                machine,
                verb,
            } => {
                let on = machine.map(|m| format!(" on '{m}'")).unwrap_or_default();
                d.line(&format!(
                    "{verb} '{}'{on}...",
                    self.store_dir.print(&drv_path)
                ));
                d.build_started(drv_path);
            }
            ProgressEvent::SubstitutionStarted {
                path,
                uri,
                transfer,
            } => {
                // Nix 2.8 words a copy out of another local store as one *to* it.
                let dir = if uri == "local" { "to" } else { "from" };
                d.line(&format!(
                    "copying path '{}' {dir} '{uri}'...",
                    self.store_dir.print(&path)
                ));
                d.substitution_started(path, transfer);
            }
            ProgressEvent::BuildFinished { drv_path, .. } => d.build_finished(&drv_path),
            ProgressEvent::SubstitutionFinished { path, .. }
            | ProgressEvent::SubstitutionCancelled { path } => d.substitution_finished(&path),
            ProgressEvent::Message(m) => match m.strip_prefix("error: ") {
                Some(e) => d.line(&error_message(e)),
                None => d.line(&m),
            },
        }
    }
}
