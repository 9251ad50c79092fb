//! What a realisation will do before it does it: Nix's `queryMissing` ([`plan`])
//! and `printMissing` ([`describe`]: `these N derivations will be built:`, `these N
//! paths will be fetched (X MiB download, Y MiB unpacked):`, `don't know how to
//! build these paths:`). Used by `drover realise` and available to every library
//! user (through [`crate::System::plan`] or directly).
//!
//! The derivations are walked breadth-first, one level at a time: the outputs of a
//! level that might be fetched are asked of the substituters at once, from up to
//! `http-connections` threads (Nix asks in parallel too). The closures of the paths
//! to fetch are walked as their narinfos arrive, with no level barrier: a path's
//! references are asked for as soon as its narinfo is in, by the same bounded set of
//! threads. A narinfo answer (or its absence) is remembered by the substituter, so
//! the goals that run afterwards ask nothing twice. Over HTTP this turns a thousand
//! round trips in a row into a stream that keeps `http-connections` of them busy.

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
    /// closure when a substituter has it, else it is unknown. The closure is walked
    /// as the narinfos arrive: a path's references are asked for as soon as its own
    /// narinfo is in, from up to `parallel` threads, without waiting for the rest of
    /// its level. Validity is checked here, on the calling thread, so the store is
    /// only ever used from it. The first error stops the walk (after the queries in
    /// flight end) and is returned.
    fn missing_paths(
        &mut self,
        store: &LocalStore,
        oracle: &mut Oracle<'_>,
        paths: Vec<StorePath>,
    ) -> Result<(), PlanError> {
        let mut queued: HashSet<StorePath> = HashSet::new();
        // Paths whose answer is known (asked earlier), decided without a thread.
        let mut ready: Vec<StorePath> = Vec::new();
        // Paths to ask the substituters about.
        let mut ask: Vec<StorePath> = Vec::new();
        let mut enqueue = |plan: &Plan,
                           oracle: &Oracle<'_>,
                           p: StorePath,
                           ready: &mut Vec<StorePath>,
                           ask: &mut Vec<StorePath>|
         -> Result<(), PlanError> {
            if plan.will_substitute.contains(&p)
                || plan.unknown.contains(&p)
                || queued.contains(&p)
                || store.is_valid_path(&p)?
            {
                return Ok(());
            }
            queued.insert(p.clone());
            if oracle.known.contains_key(&p) || oracle.subs.is_empty() {
                ready.push(p);
            } else {
                ask.push(p);
            }
            Ok(())
        };
        for p in paths {
            enqueue(self, oracle, p, &mut ready, &mut ask)?;
        }
        let (subs, fallback, observer) = (oracle.subs, oracle.fallback, oracle.observer);
        let parallel = oracle.parallel.max(1);
        let (to_workers, from_plan) = std::sync::mpsc::channel::<StorePath>();
        let from_plan = Mutex::new(from_plan);
        let (to_plan, answers) = std::sync::mpsc::channel::<(StorePath, Answer)>();
        std::thread::scope(|scope| -> Result<(), PlanError> {
            let mut threads = 0;
            let mut in_flight = 0usize;
            let mut error: Option<PlanError> = None;
            loop {
                // Decide every path whose answer is in; queue their references.
                while let Some(p) = ready.pop() {
                    if error.is_some() {
                        continue;
                    }
                    match oracle.get(&p) {
                        Ok(Some(info)) => {
                            self.download_size += info.download_size.unwrap_or(0);
                            self.nar_size += info.nar_size;
                            self.will_substitute.insert(p.clone());
                            for r in info.references.into_iter().filter(|r| *r != p) {
                                if let Err(e) = enqueue(self, oracle, r, &mut ready, &mut ask) {
                                    error = Some(e);
                                    break;
                                }
                            }
                        }
                        Ok(None) => {
                            self.unknown.insert(p);
                        }
                        Err(e) => error = Some(e),
                    }
                }
                if error.is_some() {
                    ask.clear();
                }
                // One query alone is asked here, as is any when one thread is all
                // there may be: no thread for nothing.
                if in_flight == 0 && ask.len() == 1 || parallel == 1 {
                    for p in ask.drain(..) {
                        let answer = first_substitute(subs, &p, fallback, observer);
                        oracle.known.insert(p.clone(), answer);
                        ready.push(p);
                    }
                    if !ready.is_empty() {
                        continue;
                    }
                }
                for p in ask.drain(..) {
                    in_flight += 1;
                    if threads < parallel.min(in_flight) {
                        threads += 1;
                        let (from_plan, to_plan) = (&from_plan, to_plan.clone());
                        scope.spawn(move || loop {
                            let next = from_plan.lock().unwrap_or_else(|e| e.into_inner()).recv();
                            let Ok(p) = next else { break };
                            let answer = first_substitute(subs, &p, fallback, observer);
                            if to_plan.send((p, answer)).is_err() {
                                break;
                            }
                        });
                    }
                    // The workers live as long as `from_plan`: this cannot fail.
                    let _ = to_workers.send(p);
                }
                if in_flight == 0 {
                    break;
                }
                // Wait for one answer, then take every other that is in.
                let Ok((p, answer)) = answers.recv() else {
                    break;
                };
                in_flight -= 1;
                oracle.known.insert(p.clone(), answer);
                ready.push(p);
                while let Ok((p, answer)) = answers.try_recv() {
                    in_flight -= 1;
                    oracle.known.insert(p.clone(), answer);
                    ready.push(p);
                }
            }
            // The workers stop once nothing more can come.
            drop(to_workers);
            error.map_or(Ok(()), Err)
        })
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

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::progress::Transfer;
    use crate::substituter::{FakeFault, InMemorySubstituter};
    use crate::testing::TestStore;
    use drover::realisation::{DrvOutput, Realisation};
    use drover::store::RepairFlag;

    fn path(store: &LocalStore, name: &str) -> StorePath {
        let sd = store.store_dir();
        let digest = drover::hash::HashAlgo::Sha256.digest(name.as_bytes());
        let hash = drover::nixbase32::encode(&digest.digest()[..20]);
        sd.parse(&format!("{}/{hash}-{name}", sd.as_str()))
            .expect("a store path")
    }

    fn options(parallel: usize, fallback: bool) -> PlanOptions {
        PlanOptions {
            parallel,
            fallback,
            ..Default::default()
        }
    }

    fn opaque(paths: &[&StorePath]) -> Vec<DerivedPath> {
        paths
            .iter()
            .map(|p| DerivedPath::Opaque((*p).clone()))
            .collect()
    }

    /// `layers` layers of `width` paths, each referring to three of the layer below,
    /// and a root referring to the top layer; returns the root and every path.
    fn closure(
        store: &LocalStore,
        sub: &InMemorySubstituter,
        layers: usize,
        width: usize,
    ) -> (StorePath, Vec<StorePath>) {
        let mut all = Vec::new();
        let mut below: Vec<StorePath> = Vec::new();
        for l in 0..layers {
            let mut this = Vec::new();
            for i in 0..width {
                let p = path(store, &format!("l{l}-{i}"));
                let refs: StorePathSet = if below.is_empty() {
                    StorePathSet::new()
                } else {
                    [i, i + 1, i + 7]
                        .iter()
                        .map(|j| below[j % width].clone())
                        .collect()
                };
                sub.add_file(p.clone(), format!("{l} {i}").as_bytes(), refs);
                this.push(p);
            }
            all.extend(this.iter().cloned());
            below = this;
        }
        let root = path(store, "root");
        sub.add_file(root.clone(), b"root", below.into_iter().collect());
        all.push(root.clone());
        (root, all)
    }

    #[test]
    fn a_closure_asked_for_by_its_root_is_fetched_whole_and_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestStore::open(dir.path());
        let sub = InMemorySubstituter::new("mem://", 40);
        let (root, all) = closure(&t.store, &sub, 5, 12);
        let subs: Vec<Arc<dyn Substituter>> = vec![Arc::new(sub)];
        for parallel in [1, 4, 25] {
            let p = plan(
                &t.store,
                &subs,
                &opaque(&[&root]),
                &options(parallel, false),
            )
            .unwrap();
            assert_eq!(
                p.will_substitute,
                all.iter().cloned().collect(),
                "{parallel}"
            );
            assert!(p.unknown.is_empty() && p.will_build.is_empty());
            let mut nar = 0;
            for q in &all {
                nar += subs[0].query_path_info(q).unwrap().unwrap().nar_size;
            }
            assert_eq!(p.nar_size, nar, "each path counted once ({parallel})");
        }
    }

    #[test]
    fn valid_paths_are_not_asked_for_and_missing_ones_are_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestStore::open(dir.path());
        let sub = InMemorySubstituter::new("mem://", 40);
        let (dep, gone, top) = (
            path(&t.store, "dep"),
            path(&t.store, "gone"),
            path(&t.store, "top"),
        );
        sub.add_file(dep.clone(), b"dep", StorePathSet::new());
        sub.add_file(top.clone(), b"top", [dep.clone(), gone.clone()].into());
        // `dep` is made valid first: it is neither fetched nor unknown.
        sub.copy_into(&dep, &t.store, RepairFlag::NoRepair, &Transfer::default())
            .unwrap();
        let subs: Vec<Arc<dyn Substituter>> = vec![Arc::new(sub)];
        let p = plan(&t.store, &subs, &opaque(&[&top]), &options(8, false)).unwrap();
        assert_eq!(p.will_substitute, [top].into());
        assert_eq!(p.unknown, [gone].into());
    }

    #[test]
    fn a_failing_query_is_fatal_without_fallback_and_unknown_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestStore::open(dir.path());
        let sub = InMemorySubstituter::new("mem://", 40);
        let (root, all) = closure(&t.store, &sub, 3, 10);
        let bad = all[4].clone();
        sub.set_fault(bad.clone(), FakeFault::QueryFails);
        let subs: Vec<Arc<dyn Substituter>> = vec![Arc::new(sub)];
        let e = plan(&t.store, &subs, &opaque(&[&root]), &options(8, false))
            .err()
            .expect("an error");
        assert!(e.to_string().contains("unable to download narinfo"), "{e}");
        let p = plan(&t.store, &subs, &opaque(&[&root]), &options(8, true)).unwrap();
        assert_eq!(p.unknown, [bad.clone()].into());
        assert_eq!(p.will_substitute.len(), all.len() - 1);
    }

    /// A substituter whose answer for `slow` waits (up to a few seconds) until
    /// `deep` has been asked for.
    struct Gate {
        inner: InMemorySubstituter,
        slow: StorePath,
        deep: StorePath,
        deep_asked: Mutex<bool>,
        changed: Condvar,
        /// Whether `deep` had been asked for when `slow` answered.
        slow_saw_deep: Mutex<Option<bool>>,
    }

    impl Substituter for Gate {
        fn uri(&self) -> String {
            self.inner.uri()
        }
        fn priority(&self) -> u64 {
            self.inner.priority()
        }
        fn query_path_info(
            &self,
            path: &StorePath,
        ) -> Result<Option<SubstitutablePathInfo>, SubstituterError> {
            if *path == self.deep {
                *self.deep_asked.lock().unwrap() = true;
                self.changed.notify_all();
            }
            if *path == self.slow {
                let asked = self.deep_asked.lock().unwrap();
                let (asked, _) = self
                    .changed
                    .wait_timeout_while(asked, Duration::from_secs(5), |a| !*a)
                    .unwrap();
                *self.slow_saw_deep.lock().unwrap() = Some(*asked);
            }
            self.inner.query_path_info(path)
        }
        fn copy_into(
            &self,
            path: &StorePath,
            store: &LocalStore,
            repair: RepairFlag,
            progress: &Transfer,
        ) -> Result<(), SubstituterError> {
            self.inner.copy_into(path, store, repair, progress)
        }
        fn query_realisation(
            &self,
            id: &DrvOutput,
        ) -> Result<Option<Realisation>, SubstituterError> {
            self.inner.query_realisation(id)
        }
    }

    /// Records the order of the queries.
    struct Order(Mutex<Vec<StorePath>>);

    impl QueryObserver for Order {
        fn query(
            &self,
            path: &StorePath,
            _uri: &str,
            ask: &mut dyn FnMut() -> QueryAnswer,
        ) -> QueryAnswer {
            let answer = ask();
            self.0.lock().unwrap().push(path.clone());
            answer
        }
    }

    #[test]
    fn references_are_asked_for_before_the_rest_of_their_level_answers() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestStore::open(dir.path());
        let inner = InMemorySubstituter::new("mem://", 40);
        // root → {fast, slow}; fast → mid → deep. Level by level, `deep` (two levels
        // below `fast`) would be asked only after `slow` answered.
        let [root, fast, slow, mid, deep] =
            ["root", "fast", "slow", "mid", "deep"].map(|n| path(&t.store, n));
        inner.add_file(deep.clone(), b"deep", StorePathSet::new());
        inner.add_file(mid.clone(), b"mid", [deep.clone()].into());
        inner.add_file(fast.clone(), b"fast", [mid.clone()].into());
        inner.add_file(slow.clone(), b"slow", StorePathSet::new());
        inner.add_file(root.clone(), b"root", [fast.clone(), slow.clone()].into());
        let gate = Gate {
            inner,
            slow: slow.clone(),
            deep: deep.clone(),
            deep_asked: Mutex::new(false),
            changed: Condvar::new(),
            slow_saw_deep: Mutex::new(None),
        };
        let gate = Arc::new(gate);
        let subs: Vec<Arc<dyn Substituter>> = vec![gate.clone()];
        let order = Order(Mutex::new(Vec::new()));
        let p = plan_observed(
            &t.store,
            &subs,
            &opaque(&[&root]),
            &options(4, false),
            Some(&order),
        )
        .unwrap();
        assert_eq!(p.will_substitute.len(), 5);
        // (The observer records answers, which may come in either order once
        // `slow` is let go: what matters is that `deep` was asked meanwhile.)
        let order = order.0.into_inner().unwrap();
        assert_eq!(
            *gate.slow_saw_deep.lock().unwrap(),
            Some(true),
            "`deep` was asked for only after `slow` answered: {order:?}"
        );
    }
}
