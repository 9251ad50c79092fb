//! What a realisation will do before it does it: Nix's `queryMissing` ([`plan`])
//! and `printMissing` ([`describe`]: `these N derivations will be built:`, `these N
//! paths will be fetched (X MiB download, Y MiB unpacked):`, `don't know how to
//! build these paths:`). Used by `drover realise` and available to every library
//! user (through [`crate::System::plan`] or directly).
//!
//! The walk is breadth-first, one level at a time: every store path of a level whose
//! substitutability must be known is asked of the substituters at once, from up to
//! `http-connections` threads (Nix asks in parallel too), before the level's
//! decisions are taken in order. A narinfo answer (or its absence) is remembered by
//! the substituter, so the goals that run afterwards ask nothing twice. Over HTTP
//! this turns a thousand round trips in a row into a few dozen rounds.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use drover::config::MissingExperimentalFeature;
use drover::derivation::{Derivation, DerivationType};
use drover::derived_path::{DerivedPath, OutputsSpec};
use drover::store::{LocalStore, StoreError};
use drover::store_path::{StoreDir, StorePath, StorePathSet};
use thiserror::Error;

use crate::substituter::{SubstitutablePathInfo, Substituter, SubstituterError};

/// Why no plan could be made.
#[derive(Debug, Error)]
pub enum PlanError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A substituter failed (without `--fallback`).
    #[error(transparent)]
    Substituter(#[from] SubstituterError),
    /// A derivation needs an experimental feature that is not enabled.
    #[error(transparent)]
    MissingFeature(#[from] MissingExperimentalFeature),
}

/// What a run will do, as Nix's `queryMissing` finds it.
#[derive(Default)]
pub struct Plan {
    pub will_build: StorePathSet,
    pub will_substitute: StorePathSet,
    pub unknown: StorePathSet,
    /// Sum of the substitutes' `FileSize`s and `NarSize`s.
    pub download_size: u64,
    pub nar_size: u64,
}

/// What the substituters said of a path: the first one's info, none, or an error.
pub type QueryAnswer = Result<Option<SubstitutablePathInfo>, SubstituterError>;
type Answer = QueryAnswer;

/// Sees each narinfo query the plan makes, around it: for a front end that shows
/// them (the CLI's `--log-format internal-json` reports each as Nix's
/// `actQueryPathInfo` activity). Called from several threads at once.
pub trait QueryObserver: Send + Sync {
    /// Runs `ask` (the query of `path` on the substituter `uri`) and returns its
    /// answer.
    fn query(
        &self,
        path: &StorePath,
        uri: &str,
        ask: &mut dyn FnMut() -> QueryAnswer,
    ) -> QueryAnswer;
}

/// The substituters and what they answered so far.
struct Oracle<'a> {
    subs: &'a [Arc<dyn Substituter>],
    /// Threads asking at once.
    parallel: usize,
    /// `--fallback`: a substituter's error means "no substitute" (else it is fatal).
    fallback: bool,
    known: HashMap<StorePath, Answer>,
    observer: Option<&'a dyn QueryObserver>,
}

impl Oracle<'_> {
    /// Asks the substituters about every path of `paths` not asked yet, in parallel.
    fn prefetch(&mut self, paths: impl IntoIterator<Item = StorePath>) {
        let mut todo: Vec<StorePath> = paths
            .into_iter()
            .filter(|p| !self.known.contains_key(p))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if todo.is_empty() || self.subs.is_empty() {
            for p in todo {
                self.known.insert(p, Ok(None));
            }
            return;
        }
        let (subs, fallback, observer) = (self.subs, self.fallback, self.observer);
        if todo.len() == 1 || self.parallel <= 1 {
            for p in todo {
                let answer = first_substitute(subs, &p, fallback, observer);
                self.known.insert(p, answer);
            }
            return;
        }
        let threads = self.parallel.min(todo.len());
        let queue = Mutex::new(&mut todo);
        let answers = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| loop {
                    let Some(p) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
                        break;
                    };
                    let answer = first_substitute(subs, &p, fallback, observer);
                    answers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((p, answer));
                });
            }
        });
        let answers = answers.into_inner().unwrap_or_else(|e| e.into_inner());
        self.known.extend(answers);
    }

    /// The answer for `path` (asked now if it was not prefetched). An error is
    /// returned only here, for a path whose substitutability decides something.
    fn get(&mut self, path: &StorePath) -> Result<Option<SubstitutablePathInfo>, PlanError> {
        if !self.known.contains_key(path) {
            self.prefetch([path.clone()]);
        }
        match self.known.get(path) {
            Some(Ok(info)) => Ok(info.clone()),
            Some(Err(e)) => Err(e.clone().into()),
            None => Ok(None),
        }
    }
}

/// The first substituter's info for `path`. As Nix's `querySubstitutablePathInfos`,
/// a disabled substituter is skipped, and another error (an unreachable cache) is
/// fatal unless `fallback` (Nix 2.8 then logs it and goes on; it aborts later, in
/// its goal, on the disabled cache).
fn first_substitute(
    subs: &[Arc<dyn Substituter>],
    path: &StorePath,
    fallback: bool,
    observer: Option<&dyn QueryObserver>,
) -> Answer {
    for s in subs {
        let mut ask = || s.query_path_info(path);
        let answer = match observer {
            Some(o) => o.query(path, &s.uri(), &mut ask),
            None => ask(),
        };
        match answer {
            Ok(Some(info)) => return Ok(Some(info)),
            Ok(None) | Err(SubstituterError::Disabled(_)) => {}
            Err(_) if fallback => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

impl Plan {
    /// Nix's `doPath` for each of `paths`: an invalid path is fetched with its
    /// closure when a substituter has it, else it is unknown. Level by level, each
    /// level's narinfos asked at once.
    fn missing_paths(
        &mut self,
        store: &LocalStore,
        oracle: &mut Oracle<'_>,
        paths: Vec<StorePath>,
    ) -> Result<(), PlanError> {
        let mut level = paths;
        while !level.is_empty() {
            let mut todo = Vec::new();
            let mut queued = HashSet::new();
            for p in level {
                if self.will_substitute.contains(&p)
                    || self.unknown.contains(&p)
                    || queued.contains(&p)
                    || store.is_valid_path(&p)?
                {
                    continue;
                }
                queued.insert(p.clone());
                todo.push(p);
            }
            oracle.prefetch(todo.iter().cloned());
            let mut next = Vec::new();
            for p in todo {
                if self.will_substitute.contains(&p) || self.unknown.contains(&p) {
                    continue;
                }
                match oracle.get(&p)? {
                    Some(info) => {
                        self.download_size += info.download_size.unwrap_or(0);
                        self.nar_size += info.nar_size;
                        next.extend(info.references.into_iter().filter(|r| *r != p));
                        self.will_substitute.insert(p);
                    }
                    None => {
                        self.unknown.insert(p);
                    }
                }
            }
            level = next;
        }
        Ok(())
    }
}

/// A derivation of the walk, read and checked, before its fate is decided.
struct Visit {
    drv_path: StorePath,
    drv: Derivation,
    /// Wanted outputs that are invalid and have a known path.
    invalid: Vec<StorePath>,
    /// Whether every wanted invalid output has a known path.
    all_known: bool,
}

/// Walks the derivations from the requests: a derivation is built when a wanted
/// output is not valid, and then its inputs are visited for the outputs it uses,
/// unless every invalid output has a known path and a substitute (then it is
/// fetched); a missing plain path is fetched when a substituter has it, else
/// unknown. As Nix's `queryMissing`, this ignores `--check`/`--repair`:
/// `nix-store --realise --check` of a valid output prints no plan. `parallel`
/// bounds the narinfo queries in flight; without `fallback` a substituter's error is
/// fatal; a derivation needing a disabled experimental feature is an error.
pub fn plan(
    store: &LocalStore,
    subs: &[Arc<dyn Substituter>],
    requests: &[DerivedPath],
    options: &PlanOptions,
) -> Result<Plan, PlanError> {
    plan_observed(store, subs, requests, options, None)
}

/// [`plan`], with every narinfo query seen by `observer`.
pub fn plan_observed(
    store: &LocalStore,
    subs: &[Arc<dyn Substituter>],
    requests: &[DerivedPath],
    options: &PlanOptions,
    observer: Option<&dyn QueryObserver>,
) -> Result<Plan, PlanError> {
    let mut plan = Plan::default();
    let mut oracle = Oracle {
        subs,
        parallel: options.parallel,
        fallback: options.fallback,
        known: HashMap::new(),
        observer,
    };
    let mut level: Vec<(StorePath, Option<BTreeSet<String>>)> = Vec::new();
    let mut opaque = Vec::new();
    for r in requests {
        match r {
            DerivedPath::Opaque(p) => opaque.push(p.clone()),
            DerivedPath::Built { drv_path, outputs } => level.push((
                drv_path.clone(),
                match outputs {
                    OutputsSpec::All => None,
                    OutputsSpec::Names(n) => Some(n.clone()),
                },
            )),
        }
    }
    plan.missing_paths(store, &mut oracle, opaque)?;
    let mut seen = BTreeSet::new();
    let mut hashes = drover::derivation::DrvHashCache::new();
    while !level.is_empty() {
        // Read the level's derivations and find their invalid outputs.
        let mut visits = Vec::new();
        for (drv_path, wanted) in std::mem::take(&mut level) {
            if !seen.insert((drv_path.clone(), wanted.clone()))
                || plan.will_build.contains(&drv_path)
            {
                continue;
            }
            if !store.is_valid_path(&drv_path)? {
                plan.unknown.insert(drv_path);
                continue;
            }
            if let Some(v) = visit(store, &mut hashes, drv_path, wanted.as_ref(), options)? {
                visits.push(v);
            }
        }
        // Ask about every output that might be fetched, at once.
        oracle.prefetch(
            visits
                .iter()
                .filter(|v| v.all_known)
                .flat_map(|v| v.invalid.iter().cloned()),
        );
        let mut fetch = Vec::new();
        for v in visits {
            if plan.will_build.contains(&v.drv_path) {
                continue;
            }
            // Outputs with known paths that all have substitutes are fetched instead.
            let mut all_substitutable = !v.invalid.is_empty();
            for p in &v.invalid {
                all_substitutable = all_substitutable && oracle.get(p)?.is_some();
            }
            if v.all_known && all_substitutable {
                fetch.extend(v.invalid);
                continue;
            }
            plan.will_build.insert(v.drv_path.clone());
            for (input, outputs) in &v.drv.input_drvs {
                level.push((input.clone(), Some(outputs.clone())));
            }
            fetch.extend(v.drv.input_srcs.iter().cloned());
        }
        plan.missing_paths(store, &mut oracle, fetch)?;
    }
    Ok(plan)
}

/// What the plan depends on besides the store and the substituters.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    /// Narinfo queries in flight at most (`http-connections`).
    pub parallel: usize,
    /// `--fallback`: a substituter's error means "no substitute" (else it is fatal).
    pub fallback: bool,
    /// The experimental features a derivation may need.
    pub ca_derivations: bool,
    pub impure_derivations: bool,
}

/// Reads `drv_path` and finds which wanted outputs are invalid; `None` when every
/// wanted output is valid (nothing to do).
fn visit(
    store: &LocalStore,
    hashes: &mut drover::derivation::DrvHashCache,
    drv_path: StorePath,
    wanted: Option<&BTreeSet<String>>,
    options: &PlanOptions,
) -> Result<Option<Visit>, PlanError> {
    let drv: Derivation = store.read_derivation(&drv_path)?;
    // As Nix's `queryMissing`, a derivation needing a disabled experimental feature
    // stops the run before anything is printed.
    match drv.derivation_type() {
        Ok(DerivationType::Impure) if !options.impure_derivations => {
            return Err(MissingExperimentalFeature("impure-derivations".into()).into())
        }
        Ok(t) if !t.has_known_output_paths() && t.is_pure() && !options.ca_derivations => {
            return Err(MissingExperimentalFeature("ca-derivations".into()).into())
        }
        _ => {}
    }
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
            let h = &*hashes;
            drv.static_output_hashes(store_dir, |q| {
                h.get(q)
                    .ok_or_else(|| drover::derivation::DerivationError::MissingInputOutput {
                        drv: store_dir.print(q),
                        output: "*".into(),
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
        if wanted.is_some_and(|w| !w.contains(name)) {
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
    Ok(needs_build.then_some(Visit {
        drv_path,
        drv,
        invalid,
        all_known,
    }))
}

/// Nix's `printMissing`: the lines it prints before a realisation —
/// `this derivation will be built:` / `these N derivations will be built:` with the
/// paths, dependencies first; the paths to fetch with their sizes; the paths
/// nothing can produce.
pub fn describe(store_dir: &StoreDir, plan: &Plan) -> Vec<String> {
    let mut lines = Vec::new();
    if !plan.will_build.is_empty() {
        let n = plan.will_build.len();
        lines.push(if n == 1 {
            "this derivation will be built:".to_owned()
        } else {
            format!("these {n} derivations will be built:")
        });
        for p in topo_order(store_dir, &plan.will_build) {
            lines.push(format!("  {}", store_dir.print(&p)));
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
        lines.push(if n == 1 {
            format!("this path will be fetched {sizes}:")
        } else {
            format!("these {n} paths will be fetched {sizes}:")
        });
        for p in &plan.will_substitute {
            lines.push(format!("  {}", store_dir.print(p)));
        }
    }
    if !plan.unknown.is_empty() {
        // Always plural in Nix 2.8, even for one path.
        lines.push("don't know how to build these paths:".to_owned());
        for p in &plan.unknown {
            lines.push(format!("  {}", store_dir.print(p)));
        }
    }
    lines
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
