//! `drover realise PATH...`: `nix-store --realise` on drover's actor system.
//!
//! Arguments are `.drv` paths (all outputs, or `drv!out,dev` / `drv^out`) and other
//! store paths (made valid, by substitution once caches exist). The command prints
//! what will be built (`these N derivations will be built:`), the build messages and
//! builder output on stderr, the output paths on stdout one per line, and exits with
//! Nix's status: 0, 1, or `0x60 | bits` for failed builds.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use drover::derivation::Derivation;
use drover::derived_path::{DerivedPath, OutputsSpec};
use drover::store::LocalStore;
use drover::store_path::{StoreDir, StorePath, StorePathSet};
use drover_actors::binary_cache_substituter::substituters_from_settings;
use drover_actors::hook::{HookPool, HookPoolConfig};
use drover_actors::local_builder::{LocalBuilder, LocalBuilderConfig};
use drover_actors::log_collector::{starter_with, CollectorOptions};
use drover_actors::messages::BuildMode;
use drover_actors::progress::ProgressEvent;
use drover_actors::substituter::{Substituter, SubstituterError};
use drover_actors::{spawn_worker, Realise, RealiseOutcome, WorkerConfig, WorkerSettings};

use crate::display::Display;
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

    let (substituters, warnings) = substituters_from_settings(settings);
    for w in warnings {
        display.lock().unwrap().line(&format!("warning: {w}"));
    }
    let fallback = settings.fallback();
    let plan = plan(&store, &substituters, &requests, fallback)?;
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

    let outcome: RealiseOutcome = actix::System::new().block_on(async move {
        let mut options = CollectorOptions::new(None);
        options.stderr = stderr;
        let start_log = starter_with(options);
        let builder = LocalBuilder::new(store.clone(), builder_config, start_log.clone()).start();
        let hook = settings.build_hook().map(|_| {
            HookPool::new(HookPoolConfig::from_settings(&settings, &env, 3, start_log))
                .start()
                .recipient()
        });
        let progress = ProgressPrinter {
            display: display.clone(),
            store_dir: store.store_dir().clone(),
        }
        .start();
        let worker = spawn_worker(WorkerConfig {
            store: store.clone(),
            local_builder: builder.clone().recipient(),
            cancel_local_build: builder.recipient(),
            hook,
            substituters,
            settings: worker_settings,
            progress: Some(progress.recipient()),
        });
        let outcome = worker.send(Realise { requests, mode }).await;
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
    let mut out = std::io::stdout().lock();
    for r in &outcome.results {
        for p in output_paths(&store_dir, &r.path, &r.result) {
            writeln!(out, "{p}")?;
        }
    }
    out.flush()?;
    eprintln!("warning: you did not specify '--add-root'; the result might be removed by the garbage collector");
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

/// The output paths a finished request prints, in store-path order (Nix prints the
/// path set `realisePath` returns, so a CA derivation's `out` can precede its `lib`).
fn output_paths(
    store_dir: &StoreDir,
    request: &DerivedPath,
    result: &drover::build_result::BuildResult,
) -> Vec<String> {
    match request {
        DerivedPath::Opaque(p) => vec![store_dir.print(p)],
        DerivedPath::Built { .. } => {
            let paths: BTreeSet<&StorePath> =
                result.built_outputs.values().map(|r| &r.out_path).collect();
            paths.into_iter().map(|p| store_dir.print(p)).collect()
        }
    }
}

/// What a run will do, as Nix's `queryMissing` finds it.
#[derive(Default)]
struct Plan {
    will_build: StorePathSet,
    will_substitute: StorePathSet,
    unknown: StorePathSet,
    /// Sum of the substitutes' `FileSize`s and `NarSize`s.
    download_size: u64,
    nar_size: u64,
    /// `--fallback`: a substituter's error means "no substitute" (else it is fatal).
    fallback: bool,
}

impl Plan {
    /// Nix's `doPath`: an invalid path is fetched with its closure when a
    /// substituter has it, else it is unknown.
    fn missing_path(
        &mut self,
        store: &LocalStore,
        subs: &[Arc<dyn Substituter>],
        path: &StorePath,
    ) -> anyhow::Result<()> {
        let mut todo = vec![path.clone()];
        while let Some(p) = todo.pop() {
            if self.will_substitute.contains(&p)
                || self.unknown.contains(&p)
                || store.is_valid_path(&p)?
            {
                continue;
            }
            match substitutable(subs, &p, self.fallback)? {
                Some(info) => {
                    self.will_substitute.insert(p.clone());
                    self.download_size += info.download_size.unwrap_or(0);
                    self.nar_size += info.nar_size;
                    todo.extend(info.references.into_iter().filter(|r| *r != p));
                }
                None => {
                    self.unknown.insert(p);
                }
            }
        }
        Ok(())
    }
}

/// The first substituter's info for `path`. As Nix's `querySubstitutablePathInfos`,
/// a disabled substituter is skipped, and another error (an unreachable cache) is
/// fatal unless `fallback` (Nix 2.8 then logs it and goes on; it aborts later, in
/// its goal, on the disabled cache).
fn substitutable(
    subs: &[Arc<dyn Substituter>],
    path: &StorePath,
    fallback: bool,
) -> anyhow::Result<Option<drover_actors::substituter::SubstitutablePathInfo>> {
    for s in subs {
        match s.query_path_info(path) {
            Ok(Some(info)) => return Ok(Some(info)),
            Ok(None) | Err(SubstituterError::Disabled(_)) => {}
            Err(_) if fallback => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Walks the derivations from the requests: a derivation is built when a wanted
/// output is not valid, and then its inputs are visited for the outputs it uses,
/// unless every invalid output has a known path and a substitute (then it is
/// fetched); a missing plain path is fetched when a substituter has it, else
/// unknown. As Nix's `queryMissing`, this ignores `--check`/`--repair`:
/// `nix-store --realise --check` of a valid output prints no plan.
fn plan(
    store: &LocalStore,
    subs: &[Arc<dyn Substituter>],
    requests: &[DerivedPath],
    fallback: bool,
) -> anyhow::Result<Plan> {
    let mut plan = Plan {
        fallback,
        ..Plan::default()
    };
    let mut todo: Vec<(StorePath, Option<BTreeSet<String>>)> = Vec::new();
    for r in requests {
        match r {
            DerivedPath::Opaque(p) => plan.missing_path(store, subs, p)?,
            DerivedPath::Built { drv_path, outputs } => todo.push((
                drv_path.clone(),
                match outputs {
                    OutputsSpec::All => None,
                    OutputsSpec::Names(n) => Some(n.clone()),
                },
            )),
        }
    }
    let mut seen = BTreeSet::new();
    let mut hashes = drover::derivation::DrvHashCache::new();
    while let Some((drv_path, wanted)) = todo.pop() {
        if !seen.insert((drv_path.clone(), wanted.clone())) || plan.will_build.contains(&drv_path) {
            continue;
        }
        if !store.is_valid_path(&drv_path)? {
            plan.unknown.insert(drv_path);
            continue;
        }
        let drv: Derivation = store.read_derivation(&drv_path)?;
        let known = store.query_derivation_outputs(&drv_path)?;
        // Floating CA outputs are known by their realisations (the unresolved
        // derivation has no DerivationOutputs rows).
        let mut realised: BTreeMap<String, StorePath> = BTreeMap::new();
        if drv.outputs.values().any(|o| o.path().is_none()) {
            let store_dir = store.store_dir();
            let read = |q: &StorePath| store.read_derivation(q).map(Arc::new);
            let inputs_ok = drv.input_drvs.keys().all(|i| {
                hashes
                    .hash_of::<_, drover::store::StoreError>(store_dir, i, read)
                    .is_ok()
            });
            let static_hashes = if inputs_ok {
                let h = &hashes;
                drv.static_output_hashes(store_dir, |q| {
                    h.get(q).cloned().ok_or_else(|| {
                        drover::derivation::DerivationError::MissingInputOutput {
                            drv: store_dir.print(q),
                            output: "*".into(),
                        }
                    })
                })
                .unwrap_or_default()
            } else {
                BTreeMap::new()
            };
            for (name, h) in static_hashes {
                let id = drover::realisation::DrvOutput {
                    drv_hash: h,
                    output: name.clone(),
                };
                if let Some(r) = store.query_realisation(&id)? {
                    realised.insert(name, r.out_path);
                }
            }
        }
        let mut needs_build = false;
        let mut invalid = Vec::new();
        let mut all_known = true;
        for (name, out) in &drv.outputs {
            if wanted.as_ref().is_some_and(|w| !w.contains(name)) {
                continue;
            }
            let path = out
                .path()
                .or_else(|| realised.get(name))
                .or_else(|| known.get(name));
            match path {
                Some(p) if store.is_valid_path(p)? => {}
                Some(p) => {
                    needs_build = true;
                    invalid.push(p.clone());
                }
                None => {
                    needs_build = true;
                    all_known = false;
                }
            }
        }
        if !needs_build {
            continue;
        }
        // Outputs with known paths that all have substitutes are fetched instead.
        let mut all_substitutable = !invalid.is_empty();
        for p in &invalid {
            all_substitutable = all_substitutable && substitutable(subs, p, fallback)?.is_some();
        }
        if all_known && all_substitutable {
            for p in &invalid {
                plan.missing_path(store, subs, p)?;
            }
            continue;
        }
        plan.will_build.insert(drv_path.clone());
        for (input, outputs) in &drv.input_drvs {
            todo.push((input.clone(), Some(outputs.clone())));
        }
        for src in &drv.input_srcs {
            plan.missing_path(store, subs, src)?;
        }
    }
    Ok(plan)
}

/// Nix's `printMissing` for builds: `this derivation will be built:` /
/// `these N derivations will be built:`, then the paths, dependencies first.
fn print_plan(store_dir: &StoreDir, plan: &Plan, display: &Mutex<Display>) {
    let mut d = display.lock().unwrap();
    if !plan.will_build.is_empty() {
        let n = plan.will_build.len();
        d.line(&if n == 1 {
            "this derivation will be built:".to_owned()
        } else {
            format!("these {n} derivations will be built:")
        });
        for p in topo_order(store_dir, &plan.will_build) {
            d.line(&format!("  {}", store_dir.print(&p)));
        }
    }
    if !plan.will_substitute.is_empty() {
        let n = plan.will_substitute.len();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let sizes = format!(
            "({:.2} MiB download, {:.2} MiB unpacked)",
            mib(plan.download_size),
            mib(plan.nar_size)
        );
        d.line(&if n == 1 {
            format!("this path will be fetched {sizes}:")
        } else {
            format!("these {n} paths will be fetched {sizes}:")
        });
        for p in &plan.will_substitute {
            d.line(&format!("  {}", store_dir.print(p)));
        }
    }
    if !plan.unknown.is_empty() {
        // Always plural in Nix 2.8, even for one path.
        d.line("don't know how to build these paths:");
        for p in &plan.unknown {
            d.line(&format!("  {}", store_dir.print(p)));
        }
    }
}

/// The order Nix prints derivations in: a depth-first post-order over the
/// derivations' references (their input derivations), starting from each in path
/// order, so every derivation comes after the ones it depends on.
fn topo_order(store_dir: &StoreDir, items: &StorePathSet) -> Vec<StorePath> {
    fn visit(
        p: &StorePath,
        items: &StorePathSet,
        inputs: &dyn Fn(&StorePath) -> StorePathSet,
        done: &mut BTreeSet<StorePath>,
        out: &mut Vec<StorePath>,
    ) {
        if !done.insert(p.clone()) {
            return;
        }
        for i in inputs(p) {
            if &i != p && items.contains(&i) {
                visit(&i, items, inputs, done, out);
            }
        }
        out.push(p.clone());
    }
    let inputs = |p: &StorePath| -> StorePathSet {
        std::fs::read(store_dir.print(p))
            .ok()
            .and_then(|b| Derivation::from_aterm_bytes(&b, store_dir).ok())
            .map(|d| d.input_drvs.keys().cloned().collect())
            .unwrap_or_default()
    };
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for p in items {
        visit(p, items, &inputs, &mut done, &mut out);
    }
    out
}

/// Prints the Worker's progress events as Nix prints them, through the display.
struct ProgressPrinter {
    display: Arc<Mutex<Display>>,
    store_dir: StoreDir,
}

impl Actor for ProgressPrinter {
    type Context = actix::Context<Self>;

    /// The status line shows elapsed times, so it is redrawn every second even when
    /// nothing happens.
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(std::time::Duration::from_secs(1), |act, _| {
            act.display.lock().unwrap().redraw();
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
            ProgressEvent::SubstitutionStarted { path, uri } => {
                // Nix 2.8 words a copy out of another local store as one *to* it.
                let dir = if uri == "local" { "to" } else { "from" };
                d.line(&format!(
                    "copying path '{}' {dir} '{uri}'...",
                    self.store_dir.print(&path)
                ));
            }
            ProgressEvent::BuildFinished { drv_path, .. } => d.build_finished(&drv_path),
            ProgressEvent::SubstitutionFinished { .. } => {}
            ProgressEvent::Message(m) => match m.strip_prefix("error: ") {
                Some(e) => d.line(&error_message(e)),
                None => d.line(&m),
            },
        }
    }
}
