//! Output registration after a successful builder (Nix 2.8's `registerOutputs`, no
//! sandbox), and the scratch paths builders write to.
//!
//! **Scratch paths** ([`scratch_outputs`]): an output whose path is unknown (floating
//! CA) is built at `makeStorePath("rewrite:<drv base name>:name:<out>", sha256 of
//! zeros, <output path name>)`. A known path that is valid (check mode) or being
//! repaired is built at `makeStorePath("rewrite:<drv base name>:<path base name>", …)`
//! and its hash part is rewritten to the scratch one in the builder's inputs. Any
//! other known path is built in place. Every output's hash placeholder maps to its
//! scratch path.
//!
//! **Registration** ([`register_outputs`]): each output must exist (`builder for '…'
//! failed to produce output path for output '…' at '…'`) and not be group/world
//! writable; it is canonicalised and its NAR scanned for the hash parts of the input
//! closure and all scratch outputs (NAR hash and size in the same pass). Outputs are
//! processed in dependency order (a cycle is an error); references to other outputs'
//! scratch paths are rewritten to their final paths. Input-addressed outputs keep
//! their path. Content-addressed outputs are hashed modulo their scratch hash part
//! (flat: the file's contents; recursive: the NAR), get the path of that content
//! address, have self-references rewritten, and are moved there. Fixed outputs are
//! compared with the declared hash: a mismatch is reported *after* the output is
//! registered at the path of what it really contains. In check mode nothing new is
//! registered: the NAR hash is compared with the registered one (`derivation '…' may
//! not be deterministic: output '…' differs[ from '….check']`). Everything else is
//! registered in one transaction with `ultimate = 1` and the deriver; with
//! `ca-derivations` every built output also gets a realisation.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::{drv_output_ids, realisations_for, BuildMode, BuildSettings, BuildSpec};
use crate::build_result::BuildStatus;
use crate::content_address::{ContentAddress, ContentAddressMethod, FileIngestionMethod};
use crate::derivation::{hash_placeholder, DerivationOutput};
use crate::hash::{Hash, HashAlgo};
use crate::nar::NarWriteError;
use crate::realisation::{DrvOutput, Realisation};
use crate::references::{hash_path_modulo, rewrite_path, scan_path, ReferencesError};
use crate::store::{canonicalise_path_meta_data, CanonicaliseError, LocalStore, PathLocks};
use crate::store::{RepairFlag, StoreError, ValidPathInfo};
use crate::store_path::{output_path_name, StoreDir, StorePath, StorePathSet};

/// Why outputs were rejected or could not be registered.
#[derive(Debug, Error)]
pub enum OutputsError {
    #[error("builder for '{drv}' failed to produce output path for output '{output}' at '{path}'")]
    NotProduced {
        drv: String,
        output: String,
        path: String,
    },
    #[error("suspicious ownership or permission on '{path}' for output '{output}'; rejecting this build output")]
    Suspicious { path: String, output: String },
    #[error("output path '{0}' should be a non-executable regular file since recursive hashing is not enabled (outputHashMode=flat)")]
    NotFlatFile(String),
    #[error("cycle detected in build of '{drv}' in the references of output '{output}' from output '{from}'")]
    Cycle {
        drv: String,
        output: String,
        from: String,
    },
    #[error("hash mismatch in fixed-output derivation '{drv}':\n  specified: {specified}\n     got:    {got}")]
    HashMismatch {
        drv: String,
        specified: String,
        got: String,
        /// Where the output was registered (the path of what it contains).
        registered: StorePath,
    },
    #[error("illegal path references in fixed-output derivation '{drv}'")]
    IllegalReferences {
        drv: String,
        /// The hash did not match either (the flag is set all the same).
        hash_mismatch: bool,
    },
    #[error("text output '{0}' refers to itself")]
    TextSelfReference(String),
    #[error("{}", not_deterministic_msg(.drv, .output, .check))]
    NotDeterministic {
        drv: String,
        output: String,
        check: Option<String>,
    },
    /// A round of a repeated build (`repeat`) gave another output than the one before.
    #[error("{}", differs_msg(.drv, .output, .previous))]
    DiffersFromPreviousRound {
        drv: String,
        output: String,
        /// The previous round's copy, when kept (`--keep-failed`): `<output>.check`.
        previous: Option<String>,
    },
    #[error("output '{output}' of '{drv}' is deferred: resolve the derivation before building it")]
    Deferred { drv: String, output: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Canonicalise(#[from] CanonicaliseError),
    #[error(transparent)]
    Nar(#[from] NarWriteError),
    #[error(transparent)]
    References(#[from] ReferencesError),
    #[error("{context} '{path}': {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("computing realisation ids: {0}")]
    RealisationIds(String),
    #[error("output '{output}' is not allowed to refer to the following paths:{}", .paths.iter().map(|p| format!("\n  {p}")).collect::<String>())]
    NotAllowed { output: String, paths: Vec<String> },
    #[error("path '{path}' is too large at {size} bytes; limit is {limit} bytes")]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("closure of path '{path}' is too large at {size} bytes; limit is {limit} bytes")]
    ClosureTooLarge { path: String, size: u64, limit: u64 },
    #[error("derivation contains an illegal reference specifier '{0}'")]
    IllegalSpecifier(String),
}

fn not_deterministic_msg(drv: &str, output: &str, check: &Option<String>) -> String {
    match check {
        Some(c) => format!(
            "derivation '{drv}' may not be deterministic: output '{output}' differs from '{c}'"
        ),
        None => format!("derivation '{drv}' may not be deterministic: output '{output}' differs"),
    }
}

fn differs_msg(drv: &str, output: &str, previous: &Option<String>) -> String {
    match previous {
        Some(p) => format!("output '{output}' of '{drv}' differs from '{p}' from previous round"),
        None => format!("output '{output}' of '{drv}' differs from previous round"),
    }
}

impl OutputsError {
    /// The build status Nix 2.8's `buildDone` gives this error (the builder succeeded).
    pub fn status(&self) -> BuildStatus {
        match self {
            OutputsError::NotDeterministic { .. }
            | OutputsError::DiffersFromPreviousRound { .. } => BuildStatus::NotDeterministic,
            OutputsError::NotProduced { .. }
            | OutputsError::Suspicious { .. }
            | OutputsError::NotFlatFile(_)
            | OutputsError::Cycle { .. }
            | OutputsError::HashMismatch { .. }
            | OutputsError::IllegalReferences { .. }
            | OutputsError::TextSelfReference(_)
            | OutputsError::NotAllowed { .. }
            | OutputsError::TooLarge { .. }
            | OutputsError::ClosureTooLarge { .. }
            | OutputsError::IllegalSpecifier(_) => BuildStatus::OutputRejected,
            _ => BuildStatus::MiscFailure,
        }
    }

    /// A fixed-output hash mismatch (exit-status bit 2).
    pub fn is_hash_mismatch(&self) -> bool {
        matches!(
            self,
            OutputsError::HashMismatch { .. }
                | OutputsError::IllegalReferences {
                    hash_mismatch: true,
                    ..
                }
        )
    }
}

fn io_err(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OutputsError {
    let path = path.to_owned();
    move |source| OutputsError::Io {
        context,
        path,
        source,
    }
}

/// Where each output is built and the rewrites that send the builder there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScratchOutputs {
    /// Output name → the path the builder writes.
    pub scratch: BTreeMap<String, StorePath>,
    /// Output name → its final path, for outputs built elsewhere (valid or repaired).
    pub redirected: BTreeMap<String, StorePath>,
    /// `inputRewrites`: hash placeholders → scratch paths, redirected hash parts →
    /// scratch hash parts.
    pub input_rewrites: BTreeMap<String, String>,
    /// The scratch paths that are not final paths (`rewrite:` fallback paths).
    pub fallback: StorePathSet,
    /// A sandboxed build's chroot directory: outputs are built in its fake store
    /// (`<chroot><store dir>/…`) and moved to the real store when registered.
    pub chroot: Option<PathBuf>,
}

impl ScratchOutputs {
    /// Deletes the fallback scratch paths (after a failure or a check).
    pub fn remove_redirected(&self, store: &LocalStore) {
        for p in &self.fallback {
            let _ = remove_tree(&self.actual_path(store, p));
        }
    }

    /// Where the builder wrote scratch path `p` (Nix's `toRealPathChroot`): inside
    /// the chroot for sandboxed builds, else the real store path.
    pub fn actual_path(&self, store: &LocalStore, p: &StorePath) -> PathBuf {
        match &self.chroot {
            Some(root) => {
                let mut s = root.as_os_str().to_owned();
                s.push(store.store_dir().print(p));
                PathBuf::from(s)
            }
            None => store.real_path(p),
        }
    }
}

/// `makeFallbackPath`: a scratch path from `rewrite:<drv base name>:<what>`.
fn fallback_path(
    sd: &StoreDir,
    drv_path: &StorePath,
    what: &str,
    name: &str,
) -> Result<StorePath, StoreError> {
    let zero = Hash::new(HashAlgo::Sha256, &[0u8; 32])
        .map_err(|_| StoreError::InvalidPath(what.into()))?;
    Ok(sd.make_store_path(&format!("rewrite:{drv_path}:{what}"), &zero, name)?)
}

/// Chooses the scratch path of every output (see the module docs). A sandboxed
/// build (`chroot`) writes known outputs in place inside its chroot: no rewriting.
pub fn scratch_outputs(
    store: &LocalStore,
    spec: &BuildSpec,
    chroot: Option<&Path>,
) -> Result<ScratchOutputs, StoreError> {
    let sd = store.store_dir();
    let drv_name = crate::derivation::name_from_drv_path(&spec.drv_path)?;
    let mut s = ScratchOutputs {
        chroot: chroot.map(Path::to_owned),
        ..ScratchOutputs::default()
    };
    for name in spec.drv.outputs.keys() {
        let known = spec
            .output_paths
            .get(name)
            .or_else(|| spec.drv.outputs[name].path());
        let scratch = match known {
            None => {
                let p = fallback_path(
                    sd,
                    &spec.drv_path,
                    &format!("name:{name}"),
                    &output_path_name(drv_name, name),
                )?;
                s.fallback.insert(p.clone());
                p
            }
            Some(p) if chroot.is_some() => p.clone(),
            Some(p) => {
                let present = std::fs::symlink_metadata(store.real_path(p)).is_ok();
                let valid = present && store.is_valid_path(p)?;
                if !present || (spec.mode != BuildMode::Repair && !valid) {
                    p.clone()
                } else {
                    let f = fallback_path(sd, &spec.drv_path, p.base_name(), p.name())?;
                    s.input_rewrites
                        .insert(p.hash_part().to_owned(), f.hash_part().to_owned());
                    s.redirected.insert(name.clone(), p.clone());
                    s.fallback.insert(f.clone());
                    f
                }
            }
        };
        s.input_rewrites
            .insert(hash_placeholder(name), sd.print(&scratch));
        s.scratch.insert(name.clone(), scratch);
    }
    Ok(s)
}

/// What [`register_outputs`] registered.
#[derive(Debug, Clone, Default)]
pub struct Registered {
    /// Output name → final path (all outputs of the derivation).
    pub outputs: BTreeMap<String, StorePath>,
    /// Realisations of the built outputs (for the build result).
    pub realisations: BTreeMap<DrvOutput, Realisation>,
    /// The path infos registered (empty in check mode).
    pub infos: Vec<ValidPathInfo>,
    /// After a round of a repeated build that is not the last: the outputs' infos,
    /// for the next round to compare with (nothing was registered).
    pub round_infos: BTreeMap<String, ValidPathInfo>,
    /// A round differed from the previous one but `enforce-determinism` is off:
    /// the outputs were registered and no more rounds are wanted.
    pub non_deterministic: bool,
}

/// Which round of a repeated build (`repeat`) this is: Nix builds a derivation
/// `repeat + 1` times (fixed-output ones once) and fails when a round's outputs
/// differ from the previous round's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRound {
    /// 1-based.
    pub current: u32,
    pub total: u32,
    /// The previous round's output infos (empty in the first round).
    pub previous: BTreeMap<String, ValidPathInfo>,
}

impl Default for BuildRound {
    fn default() -> BuildRound {
        BuildRound {
            current: 1,
            total: 1,
            previous: BTreeMap::new(),
        }
    }
}

impl BuildRound {
    pub fn is_last(&self) -> bool {
        self.current >= self.total
    }
}

/// What Nix compares between rounds (`ValidPathInfo::operator==`): path, NAR hash
/// and references.
fn same_output(a: &ValidPathInfo, b: &ValidPathInfo) -> bool {
    a.path == b.path && a.nar_hash == b.nar_hash && a.references == b.references
}

/// Deletes a tree, making directories writable first; a missing path is fine.
pub(crate) fn remove_tree(p: &Path) -> Result<(), StoreError> {
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(StoreError::Io {
                context: "getting attributes of",
                path: p.to_owned(),
                source: e,
            })
        }
    };
    let io = |context, source| StoreError::Io {
        context,
        path: p.to_owned(),
        source,
    };
    if meta.is_dir() {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io("changing permissions of", e))?;
        for e in std::fs::read_dir(p).map_err(|e| io("reading directory", e))? {
            let e = e.map_err(|e| io("reading directory", e))?;
            remove_tree(&e.path())?;
        }
        std::fs::remove_dir(p).map_err(|e| io("removing", e))
    } else {
        std::fs::remove_file(p).map_err(|e| io("removing", e))
    }
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Rewrites hash parts in the tree at `real` in place (dump, rewrite, restore to a
/// temporary sibling, swap); returns the NAR hash and size of the result.
fn rewrite_in_place(
    real: &Path,
    rewrites: &BTreeMap<String, String>,
) -> Result<(Hash, u64), OutputsError> {
    let tmp = with_suffix(real, ".tmp");
    remove_tree(&tmp)?;
    let (summary, _) = rewrite_path(real, &tmp, rewrites.iter())?;
    remove_tree(real)?;
    std::fs::rename(&tmp, real).map_err(io_err("renaming", &tmp))?;
    canonicalise_path_meta_data(real, None)?;
    Ok((summary.nar_hash, summary.nar_size))
}

struct Scanned {
    scratch: StorePath,
    real: PathBuf,
    refs: StorePathSet,
    nar: (Hash, u64),
}

/// Registers the outputs of a successful build (see the module docs).
pub fn register_outputs(
    store: &LocalStore,
    settings: &BuildSettings,
    spec: &BuildSpec,
    drv_name: &str,
    scratch: &ScratchOutputs,
    build_uid: Option<u32>,
) -> Result<Registered, OutputsError> {
    let sd = store.store_dir().clone();
    let drv = &spec.drv;
    let drv_printed = sd.print(&spec.drv_path);
    let mode = spec.mode;
    let mut referenceable = spec.input_closure.clone();
    referenceable.extend(scratch.scratch.values().cloned());
    let owner: BTreeMap<&StorePath, &String> =
        scratch.scratch.iter().map(|(n, p)| (p, n)).collect();

    let mut finals: BTreeMap<String, StorePath> = BTreeMap::new();
    let mut output_rewrites: BTreeMap<String, String> = BTreeMap::new();
    let mut scanned: BTreeMap<String, Scanned> = BTreeMap::new();
    for (name, out) in &drv.outputs {
        let scratch_path = scratch.scratch[name].clone();
        let static_path = spec.output_paths.get(name).or_else(|| out.path()).cloned();
        let real = scratch.actual_path(store, &scratch_path);
        if matches!(mode, BuildMode::Normal) {
            if let Some(sp) = &static_path {
                if (scratch.redirected.contains_key(name) || scratch.chroot.is_some())
                    && store.is_valid_path(sp)?
                {
                    // Valid before the build: already registered, used as a leaf.
                    remove_tree(&real)?;
                    if sp != &scratch_path {
                        output_rewrites.insert(
                            scratch_path.hash_part().to_owned(),
                            sp.hash_part().to_owned(),
                        );
                    }
                    finals.insert(name.clone(), sp.clone());
                    continue;
                }
            }
        }
        let meta = match std::fs::symlink_metadata(&real) {
            Ok(m) => m,
            Err(_) => {
                return Err(OutputsError::NotProduced {
                    drv: drv_printed,
                    output: name.clone(),
                    path: real.display().to_string(),
                })
            }
        };
        let wrong_owner = build_uid.is_some_and(|u| {
            use std::os::unix::fs::MetadataExt;
            meta.uid() != u
        });
        if (!meta.file_type().is_symlink() && meta.permissions().mode() & 0o022 != 0) || wrong_owner
        {
            return Err(OutputsError::Suspicious {
                path: real.display().to_string(),
                output: name.clone(),
            });
        }
        canonicalise_path_meta_data(&real, build_uid)?;
        let r = scan_path(&real, &referenceable)?;
        scanned.insert(
            name.clone(),
            Scanned {
                scratch: scratch_path,
                real,
                refs: r.references,
                nar: (r.nar_hash, r.nar_size),
            },
        );
    }

    // Dependency order among the outputs being registered.
    let mut order: Vec<String> = Vec::new();
    {
        let mut state: BTreeMap<&str, u8> = BTreeMap::new();
        fn visit<'a>(
            n: &'a str,
            scanned: &'a BTreeMap<String, Scanned>,
            owner: &BTreeMap<&StorePath, &'a String>,
            state: &mut BTreeMap<&'a str, u8>,
            order: &mut Vec<String>,
            drv: &str,
        ) -> Result<(), OutputsError> {
            match state.get(n) {
                Some(2) => return Ok(()),
                Some(1) => unreachable!("checked by the caller"),
                _ => {}
            }
            state.insert(n, 1);
            for r in &scanned[n].refs {
                let Some(o) = owner.get(r) else { continue };
                if o.as_str() == n || !scanned.contains_key(o.as_str()) {
                    continue;
                }
                match state.get(o.as_str()) {
                    Some(1) => {
                        return Err(OutputsError::Cycle {
                            drv: drv.to_owned(),
                            output: o.to_string(),
                            from: n.to_owned(),
                        })
                    }
                    Some(2) => {}
                    _ => visit(o, scanned, owner, state, order, drv)?,
                }
            }
            state.insert(n, 2);
            order.push(n.to_owned());
            Ok(())
        }
        for n in scanned.keys() {
            visit(n, &scanned, &owner, &mut state, &mut order, &drv_printed)?;
        }
    }

    let mut infos: Vec<ValidPathInfo> = Vec::new();
    let mut non_det = false;
    let mut delayed: Option<OutputsError> = None;
    let mut locks: Vec<PathLocks> = Vec::new();
    let mut to_clean: Vec<PathBuf> = Vec::new();
    for name in &order {
        let s = &scanned[name];
        let mut self_ref = false;
        let mut refs = StorePathSet::new();
        for r in &s.refs {
            if *r == s.scratch {
                self_ref = true;
            } else if let Some(o) = owner.get(r) {
                refs.insert(finals.get(*o).cloned().unwrap_or_else(|| r.clone()));
            } else {
                refs.insert(r.clone());
            }
        }
        let (final_path, nar, ca) = match &drv.outputs[name] {
            DerivationOutput::InputAddressed { path } => {
                let fin = spec.output_paths.get(name).unwrap_or(path).clone();
                if fin != s.scratch {
                    output_rewrites
                        .insert(s.scratch.hash_part().to_owned(), fin.hash_part().to_owned());
                }
                let nar = if output_rewrites.is_empty() {
                    s.nar.clone()
                } else {
                    rewrite_in_place(&s.real, &output_rewrites)?
                };
                (fin, nar, None)
            }
            DerivationOutput::CAFixed { ca, .. } => {
                let (fin, nar, got) = content_addressed(
                    &sd,
                    drv_name,
                    name,
                    s,
                    &refs,
                    self_ref,
                    ca.method(),
                    ca.hash().algo(),
                    &mut output_rewrites,
                )?;
                if got.hash() != ca.hash() {
                    delayed = Some(OutputsError::HashMismatch {
                        drv: drv_printed.clone(),
                        specified: ca.hash().to_sri(),
                        got: got.hash().to_sri(),
                        registered: fin.clone(),
                    });
                }
                // Self-references are allowed (Nix 2.8 checks the others only).
                if !refs.is_empty() {
                    delayed = Some(OutputsError::IllegalReferences {
                        drv: drv_printed.clone(),
                        hash_mismatch: delayed.is_some(),
                    });
                }
                (fin, nar, Some(got))
            }
            DerivationOutput::CAFloating { method, algo }
            | DerivationOutput::Impure { method, algo } => {
                let (fin, nar, got) = content_addressed(
                    &sd,
                    drv_name,
                    name,
                    s,
                    &refs,
                    self_ref,
                    *method,
                    *algo,
                    &mut output_rewrites,
                )?;
                (fin, nar, Some(got))
            }
            DerivationOutput::Deferred => {
                return Err(OutputsError::Deferred {
                    drv: drv_printed,
                    output: name.clone(),
                })
            }
        };
        // A content-addressed final path is new here: a root before it is created.
        store.add_temp_root(&final_path)?;
        let final_real = store.real_path(&final_path);
        let static_path = spec
            .output_paths
            .get(name)
            .or_else(|| drv.outputs[name].path());
        if static_path != Some(&final_path) {
            let mut l =
                PathLocks::lock(&BTreeSet::from([final_real.clone()])).map_err(StoreError::from)?;
            l.set_deletion(true);
            locks.push(l);
        }
        let mut actual = s.real.clone();
        if final_real != actual {
            match mode {
                BuildMode::Check => {}
                _ if mode == BuildMode::Normal && store.is_valid_path(&final_path)? => {
                    // A content-addressed path someone else produced: nothing to move.
                    to_clean.push(actual.clone());
                }
                _ => {
                    // Repair replaces a valid path: move the old one aside first, so
                    // the final path is never missing (`replaceValidPath`).
                    let old = with_suffix(&final_real, ".old-drover");
                    remove_tree(&old)?;
                    if std::fs::symlink_metadata(&final_real).is_ok() {
                        std::fs::rename(&final_real, &old)
                            .map_err(io_err("moving", &final_real))?;
                    }
                    std::fs::rename(&actual, &final_real).map_err(io_err("moving", &actual))?;
                    remove_tree(&old)?;
                    actual = final_real.clone();
                }
            }
        }
        finals.insert(name.clone(), final_path.clone());
        let mut info = ValidPathInfo::new(final_path.clone(), nar.0, nar.1);
        info.references = refs;
        if self_ref {
            info.references.insert(final_path.clone());
        }
        info.ca = ca;
        info.deriver = Some(spec.drv_path.clone());
        info.ultimate = true;

        if mode == BuildMode::Check {
            let old = store.query_path_info(&final_path)?;
            let Some(mut old) = old else {
                to_clean.push(actual);
                continue;
            };
            if old.nar_hash != info.nar_hash {
                let printed = final_real.display().to_string();
                if spec.keep_failed {
                    let dst = with_suffix(&final_real, ".check");
                    remove_tree(&dst)?;
                    std::fs::rename(&actual, &dst).map_err(io_err("moving", &actual))?;
                    return Err(OutputsError::NotDeterministic {
                        drv: drv_printed,
                        output: printed,
                        check: Some(dst.display().to_string()),
                    });
                }
                let _ = remove_tree(&actual);
                return Err(OutputsError::NotDeterministic {
                    drv: drv_printed,
                    output: printed,
                    check: None,
                });
            }
            if !old.ultimate {
                old.ultimate = true;
                store.sign_path_info_with(&settings.secret_key_files, &mut old)?;
                store.register_valid_paths(&[old])?;
            }
            if actual != final_real {
                to_clean.push(actual);
            }
            continue;
        }
        if spec.round.is_last() {
            store.optimise_path_if(settings.auto_optimise_store, &actual, RepairFlag::NoRepair)?;
        }
        store.sign_path_info_with(&settings.secret_key_files, &mut info)?;
        infos.push(info);
    }
    for p in to_clean {
        remove_tree(&p)?;
    }
    if mode != BuildMode::Check {
        check_outputs(store, spec, &infos, &finals)?;
        if spec.round.total > 1 {
            match compare_rounds(store, settings, spec, &drv_printed, &infos, &finals)? {
                RoundEnd::More(round_infos) => {
                    drop(locks);
                    return Ok(Registered {
                        outputs: finals,
                        round_infos,
                        ..Registered::default()
                    });
                }
                RoundEnd::Last { non_deterministic } => non_det = non_deterministic,
            }
        }
        store.register_valid_paths(&infos)?;
    }
    drop(locks);
    // A fixed-output hash mismatch fails the build only now that the output is
    // registered under its actual content's path, and before any realisation: the
    // derivation is not linked to an output it did not promise (as in Nix 2.8).
    if let Some(e) = delayed {
        return Err(e);
    }
    let built: BTreeSet<String> = order.iter().cloned().collect();
    let pure = drv.derivation_type().map(|t| t.is_pure()).unwrap_or(false);
    let ids = match drv_output_ids(store, drv) {
        Ok(ids) => ids,
        Err(e) if settings.ca_derivations && pure => {
            return Err(OutputsError::RealisationIds(e.to_string()))
        }
        Err(_) => BTreeMap::new(),
    };
    if settings.ca_derivations && pure && mode != BuildMode::Check {
        for r in realisations_for(&ids, &finals, &built).values_mut() {
            LocalStore::sign_realisation_with(&settings.secret_key_files, r)?;
            store.register_realisation(r)?;
        }
    }
    let all: BTreeSet<String> = finals.keys().cloned().collect();
    Ok(Registered {
        realisations: realisations_for(&ids, &finals, &all),
        outputs: finals,
        infos,
        round_infos: BTreeMap::new(),
        non_deterministic: non_det,
    })
}

/// How a round of a repeated build ended.
enum RoundEnd {
    /// More rounds follow: the infos to compare them with.
    More(BTreeMap<String, ValidPathInfo>),
    /// Register the outputs; `non_deterministic`: a round differed (reported, not
    /// enforced).
    Last { non_deterministic: bool },
}

/// The round logic of `registerOutputs` for a repeated build: compares this
/// round's outputs with the previous round's (failing as Nix does when they
/// differ), moves the first round's outputs aside to `<path>.check` with
/// `--keep-failed`, and returns the infos when more rounds follow (nothing is then
/// registered). After the last round the `.check` copies are removed and `None`
/// says: register.
fn compare_rounds(
    store: &LocalStore,
    settings: &BuildSettings,
    spec: &BuildSpec,
    drv_printed: &str,
    infos: &[ValidPathInfo],
    finals: &BTreeMap<String, StorePath>,
) -> Result<RoundEnd, OutputsError> {
    let round = &spec.round;
    let by_path: BTreeMap<&StorePath, &ValidPathInfo> =
        infos.iter().map(|i| (&i.path, i)).collect();
    let this: BTreeMap<String, ValidPathInfo> = finals
        .iter()
        .filter_map(|(n, p)| Some((n.clone(), (*by_path.get(p)?).clone())))
        .collect();
    let real = |p: &StorePath| store.real_path(p);
    let mut differed = false;
    if round.current > 1 {
        for (name, prev) in &round.previous {
            if this.get(name).is_some_and(|i| same_output(i, prev)) {
                continue;
            }
            let out = this.get(name).map(|i| &i.path).unwrap_or(&prev.path);
            let check = with_suffix(&real(out), ".check");
            let previous = (spec.keep_failed && check.symlink_metadata().is_ok())
                .then(|| check.display().to_string());
            let e = OutputsError::DiffersFromPreviousRound {
                drv: drv_printed.to_owned(),
                output: store.store_dir().print(out),
                previous,
            };
            if settings.enforce_determinism {
                return Err(e);
            }
            // printed as Nix prints it (no `error:` prefix), and the build ends with
            // this round (Nix: "we know enough")
            log::warn!(target: crate::binary_cache::NOTICE, "{e}");
            differed = true;
        }
    }
    if !round.is_last() && !differed {
        if round.current == 1 && spec.keep_failed {
            for i in infos {
                let path = real(&i.path);
                let dst = with_suffix(&path, ".check");
                remove_tree(&dst)?;
                std::fs::rename(&path, &dst).map_err(io_err("renaming", &path))?;
            }
        }
        return Ok(RoundEnd::More(this));
    }
    for i in infos {
        remove_tree(&with_suffix(&real(&i.path), ".check"))?;
    }
    Ok(RoundEnd::Last {
        non_deterministic: differed,
    })
}

/// The output checks of one output (`allowedReferences`, `outputChecks.<out>`, …).
#[derive(Debug, Default)]
struct Checks {
    ignore_self_refs: bool,
    max_size: Option<u64>,
    max_closure_size: Option<u64>,
    allowed_references: Option<Vec<String>>,
    allowed_requisites: Option<Vec<String>>,
    disallowed_references: Option<Vec<String>>,
    disallowed_requisites: Option<Vec<String>>,
}

fn checks_of(spec: &BuildSpec, output: &str) -> Result<Checks, OutputsError> {
    let drv = &spec.drv;
    let structured = super::env::structured_attrs(drv)
        .map_err(|e| OutputsError::IllegalSpecifier(format!("__json: {e}")))?;
    let strings = |v: &serde_json::Value| -> Option<Vec<String>> {
        v.as_array().map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
    };
    match structured {
        Some(json) => {
            let Some(c) = json
                .get("outputChecks")
                .and_then(|c| c.get(output))
                .and_then(|c| c.as_object())
            else {
                return Ok(Checks::default());
            };
            Ok(Checks {
                ignore_self_refs: c
                    .get("ignoreSelfRefs")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
                max_size: c.get("maxSize").and_then(|v| v.as_u64()),
                max_closure_size: c.get("maxClosureSize").and_then(|v| v.as_u64()),
                allowed_references: c.get("allowedReferences").and_then(strings),
                allowed_requisites: c.get("allowedRequisites").and_then(strings),
                disallowed_references: c.get("disallowedReferences").and_then(strings),
                disallowed_requisites: c.get("disallowedRequisites").and_then(strings),
            })
        }
        None => {
            let words = |k: &str| {
                drv.env.get(k).map(|v| {
                    v.split([' ', '\t', '\n', '\r'])
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
            };
            Ok(Checks {
                ignore_self_refs: true,
                allowed_references: words("allowedReferences"),
                allowed_requisites: words("allowedRequisites"),
                disallowed_references: words("disallowedReferences"),
                disallowed_requisites: words("disallowedRequisites"),
                ..Checks::default()
            })
        }
    }
}

/// Nix's `checkOutputs` on the outputs about to be registered.
fn check_outputs(
    store: &LocalStore,
    spec: &BuildSpec,
    infos: &[ValidPathInfo],
    finals: &BTreeMap<String, StorePath>,
) -> Result<(), OutputsError> {
    let sd = store.store_dir();
    let by_path: BTreeMap<&StorePath, &ValidPathInfo> =
        infos.iter().map(|i| (&i.path, i)).collect();
    let closure = |start: &StorePath| -> Result<(StorePathSet, u64), OutputsError> {
        let mut done = StorePathSet::new();
        let mut size = 0u64;
        let mut todo = vec![start.clone()];
        while let Some(p) = todo.pop() {
            if !done.insert(p.clone()) {
                continue;
            }
            let (refs, n) = match by_path.get(&p) {
                Some(i) => (i.references.clone(), i.nar_size),
                None => {
                    let i = store
                        .query_path_info(&p)?
                        .ok_or_else(|| StoreError::InvalidPath(sd.print(&p)))?;
                    (i.references, i.nar_size)
                }
            };
            size += n;
            todo.extend(refs);
        }
        Ok((done, size))
    };
    let specifiers = |v: &[String]| -> Result<StorePathSet, OutputsError> {
        let mut set = StorePathSet::new();
        for s in v {
            if let Ok(p) = sd.parse(s) {
                set.insert(p);
            } else if let Some(p) = finals.get(s) {
                set.insert(p.clone());
            } else {
                return Err(OutputsError::IllegalSpecifier(s.clone()));
            }
        }
        Ok(set)
    };
    for (name, path) in finals {
        let Some(info) = by_path.get(path) else {
            continue;
        };
        let c = checks_of(spec, name)?;
        let printed = sd.print(path);
        if let Some(limit) = c.max_size {
            if info.nar_size > limit {
                return Err(OutputsError::TooLarge {
                    path: printed,
                    size: info.nar_size,
                    limit,
                });
            }
        }
        if let Some(limit) = c.max_closure_size {
            let (_, size) = closure(path)?;
            if size > limit {
                return Err(OutputsError::ClosureTooLarge {
                    path: printed,
                    size,
                    limit,
                });
            }
        }
        let lists = [
            (&c.allowed_references, true, false),
            (&c.allowed_requisites, true, true),
            (&c.disallowed_references, false, false),
            (&c.disallowed_requisites, false, true),
        ];
        for (value, allowed, recursive) in lists {
            let Some(value) = value else { continue };
            let spec_set = specifiers(value)?;
            let mut used = if recursive {
                closure(path)?.0
            } else {
                info.references.clone()
            };
            if recursive && c.ignore_self_refs {
                used.remove(path);
            }
            let bad: Vec<String> = used
                .iter()
                .filter(|p| spec_set.contains(*p) != allowed)
                .map(|p| sd.print(p))
                .collect();
            if !bad.is_empty() {
                return Err(OutputsError::NotAllowed {
                    output: printed,
                    paths: bad,
                });
            }
        }
    }
    Ok(())
}

/// Hashes a content-addressed output modulo its scratch hash part, computes its final
/// path and rewrites self-references in place. Returns the final path, the NAR hash
/// and size of the rewritten output, and its content address.
#[allow(clippy::too_many_arguments)]
fn content_addressed(
    sd: &StoreDir,
    drv_name: &str,
    name: &str,
    s: &Scanned,
    refs: &StorePathSet,
    self_ref: bool,
    method: ContentAddressMethod,
    algo: HashAlgo,
    output_rewrites: &mut BTreeMap<String, String>,
) -> Result<(StorePath, (Hash, u64), ContentAddress), OutputsError> {
    let flat = !matches!(
        method,
        ContentAddressMethod::Fixed(FileIngestionMethod::Recursive)
    );
    if flat {
        let m =
            std::fs::symlink_metadata(&s.real).map_err(io_err("getting attributes of", &s.real))?;
        if !m.file_type().is_file() || m.permissions().mode() & 0o100 != 0 {
            return Err(OutputsError::NotFlatFile(s.real.display().to_string()));
        }
    }
    let mut nar = s.nar.clone();
    if !output_rewrites.is_empty() {
        nar = rewrite_in_place(&s.real, output_rewrites)?;
    }
    let old_hash = s.scratch.hash_part().to_owned();
    let ingestion = if flat {
        FileIngestionMethod::Flat
    } else {
        FileIngestionMethod::Recursive
    };
    let got = hash_path_modulo(&s.real, ingestion, algo, &old_hash)?;
    let ca = match method {
        ContentAddressMethod::Text => {
            if self_ref {
                return Err(OutputsError::TextSelfReference(
                    s.real.display().to_string(),
                ));
            }
            ContentAddress::Text(got)
        }
        ContentAddressMethod::Fixed(m) => ContentAddress::Fixed(m, got),
    };
    let fin = sd
        .make_path_from_ca(&output_path_name(drv_name, name), &ca, refs, self_ref)
        .map_err(StoreError::from)?;
    if fin != s.scratch {
        let self_rw: BTreeMap<String, String> =
            [(old_hash.clone(), fin.hash_part().to_owned())].into();
        if self_ref {
            nar = rewrite_in_place(&s.real, &self_rw)?;
        }
        output_rewrites.insert(old_hash, fin.hash_part().to_owned());
    }
    Ok((fin, nar, ca))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::build::{build_blocking, BuildOutcome};
    use crate::config::{Env, Settings};
    use crate::derivation::{json, DerivationError, DrvHash};

    struct T {
        _dir: tempfile::TempDir,
        store: LocalStore,
        bs: BuildSettings,
    }

    fn setup() -> T {
        let dir = tempfile::tempdir().unwrap();
        let d = |p: &str| dir.path().join(p).display().to_string();
        let mut env = Env::new();
        env.insert("NIX_STORE_DIR".into(), d("store"));
        env.insert("NIX_STATE_DIR".into(), d("var/nix"));
        env.insert("NIX_CONF_DIR".into(), d("etc"));
        env.insert("TMPDIR".into(), d("tmp"));
        env.insert("NIX_USER_CONF_FILES".into(), String::new());
        env.insert(
            "NIX_CONFIG".into(),
            "sandbox = false\nexperimental-features = ca-derivations\nbuild-users-group =\n".into(),
        );
        let s = Settings::load(&env, &[]).unwrap();
        let mut bs = BuildSettings::from_settings(&s);
        bs.caller_env = Env::new();
        T {
            store: LocalStore::open(&s).unwrap(),
            bs,
            _dir: dir,
        }
    }

    impl T {
        /// Writes a `/bin/sh -c script` derivation with these outputs (JSON values).
        fn drv(&self, name: &str, outputs: serde_json::Value, script: &str) -> BuildSpec {
            let sd = self.store.store_dir().clone();
            let mut env = serde_json::json!({"name": name, "PATH": "/usr/bin:/bin"});
            for o in outputs.as_object().unwrap().keys() {
                env[o] = "".into();
            }
            let v = serde_json::json!({
                "name": name, "outputs": outputs, "inputSrcs": [], "inputDrvs": {},
                "system": "x86_64-linux", "builder": "/bin/sh", "args": ["-c", script],
                "env": env,
            });
            let none = |_: &StorePath| -> Result<DrvHash, DerivationError> {
                Err(DerivationError::Cycle("none".into()))
            };
            let (drv_path, drv) = json::from_json_with_paths(&v, &sd, none).unwrap();
            self.store
                .add_text_to_store(
                    drv_path.name(),
                    &drv.to_aterm_bytes(&sd),
                    &drv.drv_references(),
                )
                .unwrap();
            BuildSpec {
                drv_path,
                output_paths: drv
                    .outputs
                    .iter()
                    .filter_map(|(n, o)| Some((n.clone(), o.path()?.clone())))
                    .collect(),
                drv: Arc::new(drv),
                input_closure: StorePathSet::new(),
                mode: BuildMode::Normal,
                keep_failed: false,
                round: Default::default(),
            }
        }

        fn build(&self, spec: &BuildSpec) -> BuildOutcome {
            build_blocking(&self.store, &self.bs, spec, |_| {}).unwrap()
        }

        fn info(&self, p: &StorePath) -> ValidPathInfo {
            self.store.query_path_info(p).unwrap().unwrap()
        }

        fn read(&self, p: &StorePath) -> String {
            std::fs::read_to_string(self.store.real_path(p)).unwrap()
        }
    }

    fn refs(ps: &[&StorePath]) -> StorePathSet {
        ps.iter().map(|p| (*p).clone()).collect()
    }

    #[test]
    fn input_addressed_outputs_refer_to_each_other() {
        let t = setup();
        let spec = t.drv(
            "multi",
            serde_json::json!({"out": {}, "dev": {}}),
            "echo $dev > $out; echo dev > $dev",
        );
        let o = t.build(&spec);
        assert_eq!(
            o.result.status,
            BuildStatus::Built,
            "{}",
            o.result.error_msg
        );
        let (out, dev) = (&o.outputs["out"], &o.outputs["dev"]);
        assert_eq!(out, &spec.output_paths["out"]);
        let i = t.info(out);
        assert_eq!(i.references, refs(&[dev]));
        assert_eq!(i.deriver.as_ref(), Some(&spec.drv_path));
        assert!(i.ultimate && i.ca.is_none());
        assert_eq!(
            (i.nar_hash, i.nar_size),
            crate::nar::nar_hash_of_path(&t.store.real_path(out)).unwrap()
        );
        // with ca-derivations, every output gets a realisation
        assert_eq!(o.result.built_outputs.len(), 2);
        for r in o.result.built_outputs.values() {
            assert_eq!(
                t.store.query_realisation(&r.id).unwrap().unwrap().out_path,
                r.out_path
            );
        }
    }

    #[test]
    fn floating_outputs_move_to_their_content_address() {
        let t = setup();
        let spec = t.drv(
            "ca",
            serde_json::json!({"out": {"hashAlgo": "r:sha256"}, "lib": {"hashAlgo": "r:sha256"}}),
            "echo \"I am $out, using $lib\" > $out; echo lib > $lib",
        );
        let o = t.build(&spec);
        assert_eq!(
            o.result.status,
            BuildStatus::Built,
            "{}",
            o.result.error_msg
        );
        let (out, lib) = (&o.outputs["out"], &o.outputs["lib"]);
        let sd = t.store.store_dir();
        assert_eq!(
            t.read(out),
            format!("I am {}, using {}\n", sd.print(out), sd.print(lib))
        );
        let i = t.info(out);
        assert_eq!(i.references, refs(&[out, lib]));
        assert!(matches!(
            i.ca,
            Some(ContentAddress::Fixed(FileIngestionMethod::Recursive, _))
        ));
        assert_eq!(
            (i.nar_hash.clone(), i.nar_size),
            crate::nar::nar_hash_of_path(&t.store.real_path(out)).unwrap()
        );
        // the lib output is independent: its address is the plain NAR hash
        let li = t.info(lib);
        assert_eq!(
            lib,
            &sd.make_fixed_output_path(
                FileIngestionMethod::Recursive,
                &li.nar_hash,
                "ca-lib",
                &StorePathSet::new(),
                false
            )
            .unwrap()
        );
        // no scratch paths remain
        for p in o.outputs.values() {
            assert!(t.store.real_path(p).exists());
        }
        let names: Vec<String> = std::fs::read_dir(sd.as_path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".drv") && !n.starts_with('.'))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn rejected_outputs() {
        let t = setup();
        // not produced
        let spec = t.drv("none", serde_json::json!({"out": {}}), "true");
        let o = t.build(&spec);
        assert_eq!(o.result.status, BuildStatus::OutputRejected);
        assert!(o
            .result
            .error_msg
            .contains("failed to produce output path for output 'out'"));
        // a cycle between outputs
        let spec = t.drv(
            "cycle",
            serde_json::json!({"out": {}, "dev": {}}),
            "echo $dev > $out; echo $out > $dev",
        );
        let o = t.build(&spec);
        assert_eq!(o.result.status, BuildStatus::OutputRejected);
        assert!(
            o.result.error_msg.starts_with("cycle detected in build of"),
            "{}",
            o.result.error_msg
        );
        assert!(!t.store.is_valid_path(&spec.output_paths["out"]).unwrap());
        // a flat fixed output that is a directory
        let h = HashAlgo::Sha256.digest(b"hello");
        let spec = t.drv(
            "flatdir",
            serde_json::json!({"out": {"hashAlgo": "sha256", "hash": h.encode(crate::hash::Encoding::Base16)}}),
            "mkdir $out",
        );
        let o = t.build(&spec);
        assert_eq!(o.result.status, BuildStatus::OutputRejected);
        assert!(o
            .result
            .error_msg
            .contains("should be a non-executable regular file"));
        // a flat fixed output with the wrong contents: registered where it belongs
        let spec = t.drv(
            "wrong",
            serde_json::json!({"out": {"hashAlgo": "sha256", "hash": h.encode(crate::hash::Encoding::Base16)}}),
            "printf bye > $out",
        );
        let o = t.build(&spec);
        assert_eq!(o.result.status, BuildStatus::OutputRejected);
        assert!(o.hash_mismatch);
        let got = HashAlgo::Sha256.digest(b"bye");
        assert_eq!(
            o.result.error_msg,
            format!(
                "hash mismatch in fixed-output derivation '{}':\n  specified: {}\n     got:    {}",
                t.store.store_dir().print(&spec.drv_path),
                h.to_sri(),
                got.to_sri()
            )
        );
        let actual = t
            .store
            .store_dir()
            .make_fixed_output_path(
                FileIngestionMethod::Flat,
                &got,
                "wrong",
                &StorePathSet::new(),
                false,
            )
            .unwrap();
        assert!(t.store.is_valid_path(&actual).unwrap());
        assert!(!t.store.is_valid_path(&spec.output_paths["out"]).unwrap());
        // ... and the derivation gets no realisation for it
        let ids = drv_output_ids(&t.store, &spec.drv).unwrap();
        assert_eq!(t.store.query_realisation(&ids["out"]).unwrap(), None);
    }

    #[test]
    fn builds_run_as_a_build_user_when_root() {
        let group = "nixbld";
        if !super::super::users::use_build_users(Some(group))
            || nix::unistd::Group::from_name(group)
                .ok()
                .flatten()
                .is_none()
        {
            eprintln!("SKIPPED: not root or no '{group}' group");
            return;
        }
        let mut t = setup();
        t.bs.build_users_group = Some(group.into());
        // the store dir must be writable by the group, as LocalStore::open makes it
        let sd = t.store.store_dir().as_path().to_owned();
        let gid = nix::unistd::Group::from_name(group).unwrap().unwrap().gid;
        nix::unistd::chown(&sd, Some(nix::unistd::Uid::from_raw(0)), Some(gid)).unwrap();
        std::fs::set_permissions(&sd, std::fs::Permissions::from_mode(0o1775)).unwrap();
        std::fs::set_permissions(t._dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let spec = t.drv(
            "as-user",
            serde_json::json!({"out": {}}),
            "id -u > $out; id -g >> $out",
        );
        let o = t.build(&spec);
        assert_eq!(
            o.result.status,
            BuildStatus::Built,
            "{}",
            o.result.error_msg
        );
        let out = &o.outputs["out"];
        let text = t.read(out);
        let mut ids = text.lines();
        let uid: u32 = ids.next().unwrap().parse().unwrap();
        assert_ne!(uid, 0);
        assert_eq!(ids.next().unwrap(), gid.as_raw().to_string());
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(t.store.real_path(out)).unwrap().uid(), 0);
    }

    #[test]
    fn repair_replaces_a_corrupt_output() {
        let t = setup();
        let mut spec = t.drv(
            "fix",
            serde_json::json!({"out": {}}),
            "echo \"me: $out\" > $out",
        );
        assert_eq!(t.build(&spec).result.status, BuildStatus::Built);
        let out = spec.output_paths["out"].clone();
        let real = t.store.real_path(&out);
        let good = t.read(&out);
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&real, b"corrupt").unwrap();
        spec.mode = BuildMode::Repair;
        let o = t.build(&spec);
        assert_eq!(
            o.result.status,
            BuildStatus::Built,
            "{}",
            o.result.error_msg
        );
        assert_eq!(t.read(&out), good);
        assert!(good.contains(&t.store.store_dir().print(&out)));
        let i = t.info(&out);
        assert_eq!(i.references, refs(&[&out]));
        assert_eq!(
            (i.nar_hash, i.nar_size),
            crate::nar::nar_hash_of_path(&real).unwrap()
        );
    }

    #[test]
    fn check_mode_compares_and_marks_ultimate() {
        let t = setup();
        let mut spec = t.drv("det", serde_json::json!({"out": {}}), "echo same > $out");
        let o = t.build(&spec);
        assert_eq!(o.result.status, BuildStatus::Built);
        let out = spec.output_paths["out"].clone();
        // pretend it was substituted: not ultimate
        let mut i = t.info(&out);
        i.ultimate = false;
        t.store.register_valid_paths(&[i]).unwrap();
        spec.mode = BuildMode::Check;
        let o = t.build(&spec);
        assert_eq!(
            o.result.status,
            BuildStatus::Built,
            "{}",
            o.result.error_msg
        );
        assert!(t.info(&out).ultimate);
        // the scratch path is gone, the output untouched
        let scratch = scratch_outputs(&t.store, &spec, None).unwrap();
        assert!(!t.store.real_path(&scratch.scratch["out"]).exists());
        assert_eq!(t.read(&out), "same\n");
    }
}
