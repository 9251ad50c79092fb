//! The blocking job bodies of the derivation goal: store work run off the arbiter by
//! the store executor, each returning a [`DrvJobResult`].

use super::*;

/// Nix's `checkPathValidity`: each output's known path and whether it is valid (in
/// repair mode: whether its contents match the registered NAR hash).
pub fn check_validity(
    env: &JobEnv,
    drv_path: &StorePath,
    drv: &Derivation,
    hashes: &BTreeMap<String, Hash>,
    repair: bool,
) -> Result<BTreeMap<String, OutputState>, GoalError> {
    let (store, ca) = (&*env.store, env.settings.ca_derivations);
    // An impure derivation has no valid outputs, ever: it is built every time, and
    // the hash its outputs share (`sha256("impure")`) names no realisation.
    if matches!(drv.derivation_type(), Ok(DerivationType::Impure)) {
        return Ok(drv
            .outputs
            .keys()
            .map(|name| {
                (
                    name.clone(),
                    OutputState {
                        path: None,
                        valid: false,
                    },
                )
            })
            .collect());
    }
    // Nix's `haveDerivation`: the outputs whose paths are known are temporary roots
    // before anything checks, builds or substitutes them.
    let known: Vec<StorePath> = drv
        .outputs
        .values()
        .filter_map(|o| o.path().cloned())
        .collect();
    add_temp_roots(store, &known)?;
    let mut db_outputs: Option<BTreeMap<String, StorePath>> = None;
    let mut res = BTreeMap::new();
    for (name, out) in &drv.outputs {
        let mut path = out.path().cloned();
        if path.is_none() {
            if ca {
                if let Some(h) = hashes.get(name) {
                    let id = DrvOutput {
                        drv_hash: h.clone(),
                        output: name.clone(),
                    };
                    if let Some(r) = store.query_realisation(&id)? {
                        path = Some(r.out_path);
                    }
                }
            }
            if path.is_none() && store.is_valid_path(drv_path)? {
                if db_outputs.is_none() {
                    db_outputs = Some(store.query_derivation_outputs(drv_path)?);
                }
                path = db_outputs.as_ref().and_then(|m| m.get(name).cloned());
            }
        }
        let valid = match &path {
            Some(p) => {
                add_temp_root(store, p)?;
                let v = store.is_valid_path(p)?;
                if v && repair {
                    env.contents.good(store, p)?
                } else {
                    v
                }
            }
            None => false,
        };
        if let (Some(p), true, true) = (&path, valid, ca) {
            if let Some(h) = hashes.get(name) {
                register_known_output(store, h, name, p)?;
            }
        }
        res.insert(name.clone(), OutputState { path, valid });
    }
    Ok(res)
}

/// The lock files of the outputs: real paths of outputs whose path the derivation
/// fixes, `<drv>.<output>` for the others (floating CA, deferred) — even when a
/// realisation already names their path, as Nix's `outputsAndOptPaths` does: the
/// registration of a CA output locks its final path itself, so holding that lock
/// here would deadlock when one output of a multi-output CA derivation is valid.
/// Locks without waiting; re-checks validity under the lock and removes invalid
/// leftovers of known outputs.
pub(super) fn lock_outputs(
    env: &JobEnv,
    drv_path: &StorePath,
    drv: &Derivation,
    hashes: &BTreeMap<String, Hash>,
    repair: bool,
) -> Result<LockOutcome, GoalError> {
    let store = &env.store;
    let mut lock_paths = BTreeSet::new();
    for (name, o) in &drv.outputs {
        match o.path() {
            Some(p) => lock_paths.insert(store.real_path(p)),
            None => {
                let mut s = store.real_path(drv_path).into_os_string();
                s.push(format!(".{name}"));
                lock_paths.insert(PathBuf::from(s))
            }
        };
    }
    let locks = match PathLocks::try_lock(&lock_paths)? {
        Ok(l) => l,
        Err(_) => return Ok(LockOutcome::Busy(lock_paths)),
    };
    let outputs = check_validity(env, drv_path, drv, hashes, repair)?;
    for o in outputs.values() {
        if let (Some(p), false) = (&o.path, o.valid) {
            if !store.is_valid_path(p)? {
                // A leftover (an output the checks rejected, say) is read-only:
                // delete it as Nix does, making its directories writable first.
                drover::build::delete_path(&store.real_path(p))?;
            }
        }
    }
    Ok(LockOutcome::Locked { locks, outputs })
}

/// Resolves a derivation against the built input outputs and writes it to the store.
pub(super) fn resolve_and_write(
    env: &JobEnv,
    drv_path: &StorePath,
    drv: &Derivation,
    known: &BTreeMap<(StorePath, String), StorePath>,
) -> Result<Option<StorePath>, GoalError> {
    let store = &env.store;
    let name = name_from_drv_path(drv_path)?;
    let resolved = drv.try_resolve(store.store_dir(), name, |d, o| {
        known.get(&(d.clone(), o.to_owned())).cloned().or_else(|| {
            store
                .query_derivation_outputs(d)
                .ok()
                .and_then(|m| m.get(o).cloned())
        })
    })?;
    let Some(resolved) = resolved else {
        return Ok(None);
    };
    let bytes = resolved.to_aterm_bytes(store.store_dir());
    let p = store.add_text_to_store(&format!("{name}.drv"), &bytes, &resolved.drv_references())?;
    Ok(Some(p))
}

/// The closure of the inputs (for reference scanning) and the direct inputs (for the
/// hook: input sources and used outputs of input derivations).
pub(super) fn input_paths(
    store: &LocalStore,
    drv_path: &StorePath,
    drv: &Derivation,
    known: &BTreeMap<(StorePath, String), StorePath>,
) -> Result<(StorePathSet, StorePathSet), GoalError> {
    let sd = store.store_dir();
    let mut direct: StorePathSet = drv.input_srcs.clone();
    for (d, outs) in &drv.input_drvs {
        let mut map: Option<BTreeMap<String, StorePath>> = None;
        for o in outs {
            let p = match known.get(&(d.clone(), o.clone())) {
                Some(p) => p.clone(),
                None => {
                    if map.is_none() {
                        map = Some(store.query_derivation_outputs(d)?);
                    }
                    map.as_ref()
                        .and_then(|m| m.get(o).cloned())
                        .ok_or_else(|| GoalError::MissingInputOutput {
                            drv: sd.print(drv_path),
                            output: o.clone(),
                            input: sd.print(d),
                        })?
                }
            };
            direct.insert(p);
        }
    }
    let v: Vec<StorePath> = direct.iter().cloned().collect();
    // The inputs are in use from now on: roots before their closure is read (the
    // collector keeps the closure of a root), and the closure itself too.
    add_temp_roots(store, &v)?;
    let closure = store.compute_closure(&v)?;
    let c: Vec<StorePath> = closure.iter().cloned().collect();
    add_temp_roots(store, &c)?;
    Ok((closure, direct))
}

/// Runs `post-build-hook` with `DRV_PATH` and `OUT_PATHS`, its output shown as Nix
/// shows it (`print_logs`: every line, else the first); a failure is an error that
/// aborts the run (Nix's `ExecError`), the outputs staying registered.
pub(super) fn run_post_build_hook(
    hook: &str,
    drv_path: &str,
    out_paths: &str,
    print_logs: bool,
) -> Result<(), GoalError> {
    Ok(crate::local_builder::post_build_hook::run(
        hook, drv_path, out_paths, print_logs,
    )?)
}

/// Registers `path` as a temporary GC root of this process, before the goal looks
/// at it: without it a concurrent collector could delete it under the goal.
pub(super) fn add_temp_root(store: &LocalStore, path: &StorePath) -> Result<(), GoalError> {
    store
        .add_temp_root(path)
        .map_err(|source| GoalError::TempRoot {
            path: store.store_dir().print(path),
            source: Box::new(source),
        })
}

/// [`add_temp_root`] for many paths at once.
pub(super) fn add_temp_roots(store: &LocalStore, paths: &[StorePath]) -> Result<(), GoalError> {
    store
        .add_temp_roots(paths)
        .map_err(|source| GoalError::TempRoot {
            path: paths
                .first()
                .map(|p| store.store_dir().print(p))
                .unwrap_or_default(),
            source: Box::new(source),
        })
}

/// `getDerivation`: the `.drv` made a temporary root, then whether it is valid;
/// when it is, [`load_derivation`] in the same job (`None`: not valid).
pub(super) fn drv_valid_then_load(
    env: &JobEnv,
    drv_path: &StorePath,
    mode: BuildMode,
) -> Result<Option<Loaded>, GoalError> {
    add_temp_root(&env.store, drv_path)?;
    if !env.store.is_valid_path(drv_path)? {
        return Ok(None);
    }
    load_derivation(env, drv_path, mode).map(Some)
}

/// `loadDerivation`: reads the `.drv` and computes its outputs' hashes modulo (the
/// realisation ids), memoising input derivations' hashes in the shared cache. When
/// the goal goes on to `haveDerivation`'s validity check (a derivation that is not
/// impure, whose type's experimental feature is on), the check is made here too, so
/// that it costs no job of its own.
pub(super) fn load_derivation(
    env: &JobEnv,
    drv_path: &StorePath,
    mode: BuildMode,
) -> Result<Loaded, GoalError> {
    add_temp_root(&env.store, drv_path)?;
    let drv = Arc::new(env.store.read_derivation(drv_path)?);
    let store_dir = env.store.store_dir().clone();
    let hashes_error = |source: GoalError| GoalError::OutputHashes {
        drv: store_dir.print(drv_path),
        source: Box::new(source),
    };
    let output_hashes = {
        let mut cache = env.drv_hashes.lock().unwrap_or_else(|e| e.into_inner());
        let read = |q: &StorePath| env.store.read_derivation(q).map(Arc::new);
        // Hashes of the inputs first (memoised), then this derivation's own.
        for i in drv.input_drvs.keys() {
            cache
                .hash_of::<_, drover::store::StoreError>(&store_dir, i, read)
                .map_err(|e| hashes_error(e.into()))?;
        }
        let c = &*cache;
        drv.static_output_hashes(&store_dir, |q| {
            c.get(q)
                .ok_or_else(|| drover::derivation::DerivationError::MissingInputOutput {
                    drv: store_dir.print(q),
                    output: "*".into(),
                })
        })
        .map_err(|e| hashes_error(e.into()))?
    };
    let checks_validity = drv.derivation_type().is_ok_and(|t| {
        t != DerivationType::Impure && (t.has_known_output_paths() || env.settings.ca_derivations)
    });
    let validity = checks_validity.then(|| {
        check_validity(
            env,
            drv_path,
            &drv,
            &output_hashes,
            mode == BuildMode::Repair,
        )
    });
    Ok(Loaded {
        drv,
        output_hashes,
        validity,
    })
}

/// `repairClosure`: each corrupt or missing path of the closure of `own` (without
/// `own` itself) and the goal that repairs it: a rebuild in repair mode from its
/// deriver, else a repairing substitution.
pub(super) fn closure_to_repair(
    env: &JobEnv,
    own: &[StorePath],
) -> Result<Vec<(StorePath, GoalRequest)>, GoalError> {
    let store = &env.store;
    let closure = store.compute_closure(own)?;
    let mut reqs = Vec::new();
    for p in closure.iter().filter(|p| !own.contains(p)) {
        if env.contents.good(store, p)? {
            continue;
        }
        let req = match store.query_valid_derivers(p)?.into_iter().next() {
            Some(d) => GoalRequest::Derivation {
                drv_path: d,
                outputs: OutputsSpec::All,
                mode: BuildMode::Repair,
            },
            None => GoalRequest::Substitution {
                path: p.clone(),
                repair: true,
            },
        };
        reqs.push((p.clone(), req));
    }
    Ok(reqs)
}

/// `gaveUpOnSubstitution`: the input sources that are not valid (to substitute),
/// after checking that a pure derivation has no impure input derivation (when
/// `check_impure_inputs`).
pub(super) fn invalid_srcs(
    env: &JobEnv,
    drv_path: &StorePath,
    drv: &Derivation,
    check_impure_inputs: bool,
) -> Result<Vec<StorePath>, GoalError> {
    if check_impure_inputs && env.settings.impure_derivations {
        let sd = env.store.store_dir();
        for input in drv.input_drvs.keys() {
            let impure =
                env.store.read_derivation(input)?.derivation_type()? == DerivationType::Impure;
            if impure {
                return Err(GoalError::ImpureInput {
                    drv: sd.print(drv_path),
                    input: sd.print(input),
                });
            }
        }
    }
    let srcs: Vec<StorePath> = drv.input_srcs.iter().cloned().collect();
    let valid = env.store.query_valid_paths(&srcs)?;
    Ok(srcs.into_iter().filter(|s| !valid.contains(s)).collect())
}

/// Registers realisations (of a resolved derivation's outputs for the original one,
/// or of built outputs).
pub(super) fn register_realisations(
    env: &JobEnv,
    realisations: &[Realisation],
) -> Result<(), GoalError> {
    for r in realisations {
        env.store.register_realisation(r)?;
    }
    Ok(())
}

/// `checkPathValidity` with `ca-derivations`: a valid output whose path is known
/// (statically, as for input-addressed and fixed outputs, or from the
/// `DerivationOutputs` table) but that has no realisation gets one, as Nix 2.8
/// registers it — so outputs built without `ca-derivations`, substituted or added
/// by hand are recorded too.
fn register_known_output(
    store: &LocalStore,
    drv_hash: &Hash,
    name: &str,
    path: &StorePath,
) -> Result<(), drover::store::StoreError> {
    let id = DrvOutput {
        drv_hash: drv_hash.clone(),
        output: name.to_owned(),
    };
    if store.query_realisation(&id)?.is_none() {
        store.register_realisation(&Realisation {
            id,
            out_path: path.clone(),
            signatures: BTreeSet::new(),
            dependent_realisations: BTreeMap::new(),
        })?;
    }
    Ok(())
}

/// Nix's `nrRounds`: fixed-output derivations (already verified by their hash) and
/// `--check` builds run once, other builds `repeat + 1` times.
pub(super) fn repeat_rounds(mode: BuildMode, drv_type: Option<DerivationType>, repeat: u64) -> u32 {
    if mode == BuildMode::Check || drv_type.is_some_and(|t| t.is_fixed()) {
        1
    } else {
        u32::try_from(repeat)
            .unwrap_or(u32::MAX - 1)
            .saturating_add(1)
    }
}

/// `resolvedFinished`: the realisations of the original derivation's outputs, with
/// their dependent realisations unless it is fixed-output (`drvOutputReferences`),
/// signed with `secret-key-files` (`keys`: the run's own, else the store's).
pub(super) fn register_resolved_realisations(
    store: &LocalStore,
    drv: &Derivation,
    fixed: bool,
    realisations: Vec<Realisation>,
    keys: Option<&[std::path::PathBuf]>,
) -> Result<(), GoalError> {
    for mut r in realisations {
        if !fixed {
            r.dependent_realisations = store.drv_output_references(drv, &r.out_path)?;
        }
        match keys {
            Some(keys) => LocalStore::sign_realisation_with(keys, &mut r)?,
            None => store.sign_realisation(&mut r)?,
        }
        store.register_realisation(&r)?;
    }
    Ok(())
}
