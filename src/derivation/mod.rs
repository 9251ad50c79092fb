//! Nix derivations: the `.drv` store objects that say how to build outputs.
//!
//! A [`Derivation`] is what `nix-instantiate` writes to `<store>/<hash>-<name>.drv`:
//! its outputs, the outputs of other derivations it uses (`inputDrvs`), plain store
//! paths it uses (`inputSrcs`), and the builder to run with its arguments and
//! environment. Every output has one of the five kinds Nix 2.8 knows
//! ([`DerivationOutput`]): input-addressed (path fixed by the derivation's hash
//! modulo), fixed-output content-addressed (path fixed by the declared hash),
//! floating content-addressed (path known after the build), deferred
//! (input-addressed but depending on a floating derivation, so its path is known
//! only once the inputs are built) and impure.
//!
//! The derivation's *name* is not stored in it: it is the `.drv` file name without
//! `.drv` ([`name_from_drv_path`]), and usually also `env.name` ([`Derivation::env_name`]).
//! Functions that need it (output paths, the `.drv` path) take it as a parameter.
//! Output paths are stored in the outputs as the file states them; the name-dependent
//! ones are computed and checked by [`Derivation::with_output_paths`].
//!
//! Formats and computations, all pure (no I/O; the store directory is a value):
//! * [`aterm`]: the `.drv` file format, `Derive([…],[…],[…],"system","builder",[…],[…])`,
//!   parsed strictly and printed byte-identically to Nix 2.8.
//! * [`json`]: the JSON of `nix show-derivation` (Nix 2.8), both ways.
//! * [`hash_modulo`]: `hashDerivationModulo`, the hash output paths of input-addressed
//!   derivations come from, and the output placeholders.
//! * [`resolve`]: `tryResolve`, the derivation Nix builds instead of one that depends
//!   on floating outputs, once those are built.
//!
//! Derivations are shared as `Arc<Derivation>`: every method takes `&self` except the
//! builder-style [`Derivation::with_output_paths`], which consumes and returns a value.

pub mod aterm;
pub mod hash_modulo;
pub mod json;
pub mod resolve;

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::content_address::{ContentAddress, ContentAddressMethod};
use crate::hash::HashAlgo;
use crate::store_path::{output_path_name, StoreDir, StorePath, StorePathError, StorePathSet};

pub use hash_modulo::{
    downstream_placeholder, hash_placeholder, impure_output_hash, DrvHash, DrvHashCache,
    DrvHashKind,
};

/// The file name extension of derivations.
pub const DRV_EXTENSION: &str = ".drv";

/// Why a derivation could not be read, checked or hashed.
///
/// ATerm errors carry the byte offset into the input where the problem was found;
/// JSON errors carry the path of the offending field (`outputs.out.hashAlgo`).
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum DerivationError {
    #[error("derivation ATerm, byte {offset}: expected {expected}, found {found}")]
    Expected {
        offset: usize,
        expected: String,
        found: String,
    },
    #[error("derivation ATerm is truncated at byte {offset}: expected {expected}")]
    Truncated { offset: usize, expected: String },
    #[error("derivation ATerm, byte {offset}: invalid escape sequence '\\{found}' (Nix writes only \\\" \\\\ \\n \\r \\t)")]
    BadEscape { offset: usize, found: String },
    #[error("derivation ATerm, byte {offset}: string is not valid UTF-8")]
    NotUtf8 { offset: usize },
    #[error(
        "derivation ATerm, byte {offset}: {len} bytes of trailing garbage after the derivation"
    )]
    TrailingGarbage { offset: usize, len: usize },
    #[error("derivation {at}: invalid store path '{path}': {source}")]
    InvalidStorePath {
        at: String,
        path: String,
        source: StorePathError,
    },
    #[error("derivation {at}: duplicate {what} '{key}'")]
    DuplicateKey {
        at: String,
        what: &'static str,
        key: String,
    },
    #[error("derivation {at}: {what} are not sorted: '{key}' comes after '{previous}'")]
    Unsorted {
        at: String,
        what: &'static str,
        key: String,
        previous: String,
    },
    #[error("derivation {at}: output '{output}' is invalid: {reason}")]
    InvalidOutput {
        at: String,
        output: String,
        reason: String,
    },
    #[error("derivation JSON, field '{field}': {reason}")]
    Json { field: String, reason: String },
    #[error("derivation has no outputs")]
    NoOutputs,
    #[error("derivation mixes output types ({0})")]
    MixedOutputTypes(String),
    #[error("fixed-output derivation has {0} outputs, but only one is allowed")]
    MultipleFixedOutputs(usize),
    #[error("the single fixed output must be named \"out\", not '{0}'")]
    FixedOutputNotOut(String),
    #[error("all floating outputs must use the same hash algorithm ('{first}' and '{other}')")]
    FloatingAlgoMismatch { first: HashAlgo, other: HashAlgo },
    #[error("input derivation '{drv}' has no output '{output}'")]
    MissingInputOutput { drv: String, output: String },
    #[error("cycle in the input derivations at '{0}'")]
    Cycle(String),
    #[error("derivation name is unknown: neither given nor in env.name")]
    MissingName,
    #[error("'{0}' is not a derivation path (it does not end in .drv)")]
    NotADrvPath(String),
    #[error("derivation name '{name}' is invalid: {source}")]
    InvalidName {
        name: String,
        source: StorePathError,
    },
    #[error("output '{output}' has path '{given}', but it should be '{expected}'")]
    OutputPathMismatch {
        output: String,
        expected: String,
        given: String,
    },
    #[error(
        "environment variable of output '{output}' is '{given}', but it should be '{expected}'"
    )]
    OutputEnvMismatch {
        output: String,
        expected: String,
        given: String,
    },
}

/// One output of a derivation, as Nix 2.8 distinguishes them.
///
/// In the ATerm each output is `("<name>","<path>","<hashAlgo>","<hash>")`; the
/// variants below document what each kind writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DerivationOutput {
    /// `("out","/store/…-name","","")`: the path follows from the derivation's hash
    /// modulo ([`hash_modulo`]).
    InputAddressed { path: StorePath },
    /// `("out","/store/…","r:sha256","<base16>")`: a fixed-output derivation; the path
    /// follows from the content address and the derivation name. Nix 2.8 knows only
    /// the flat and recursive methods here; [`ContentAddress::Text`] (`text:sha256`,
    /// a later Nix extension) is accepted and handled the same way.
    CAFixed { ca: ContentAddress, path: StorePath },
    /// `("out","","r:sha256","")`: content-addressed, path known after the build.
    CAFloating {
        method: ContentAddressMethod,
        algo: HashAlgo,
    },
    /// `("out","","","")`: input-addressed, but its path depends on floating outputs
    /// of inputs and is known only once they are built.
    Deferred,
    /// `("out","","r:sha256","impure")`: an impure derivation's output.
    Impure {
        method: ContentAddressMethod,
        algo: HashAlgo,
    },
}

impl DerivationOutput {
    /// The output path when it is known statically (input-addressed, fixed-output).
    pub fn path(&self) -> Option<&StorePath> {
        match self {
            DerivationOutput::InputAddressed { path } | DerivationOutput::CAFixed { path, .. } => {
                Some(path)
            }
            _ => None,
        }
    }

    /// A short name of the kind, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            DerivationOutput::InputAddressed { .. } => "input-addressed",
            DerivationOutput::CAFixed { .. } => "fixed-output",
            DerivationOutput::CAFloating { .. } => "floating content-addressed",
            DerivationOutput::Deferred => "deferred",
            DerivationOutput::Impure { .. } => "impure",
        }
    }

    /// The `hashAlgo` field (`r:sha256`, `text:sha256`, `sha1`; empty for
    /// input-addressed and deferred outputs).
    pub fn hash_algo_field(&self) -> String {
        match self {
            DerivationOutput::InputAddressed { .. } | DerivationOutput::Deferred => String::new(),
            DerivationOutput::CAFixed { ca, .. } => ca.method().print_with_algo(ca.hash().algo()),
            DerivationOutput::CAFloating { method, algo }
            | DerivationOutput::Impure { method, algo } => method.print_with_algo(*algo),
        }
    }
}

/// What kind of derivation this is, from its outputs (Nix's `DerivationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DerivationType {
    /// All outputs input-addressed (`deferred: false`) or all deferred.
    InputAddressed { deferred: bool },
    /// One fixed output `out` (`fixed: true`) or only floating outputs.
    ContentAddressed { fixed: bool },
    /// Only impure outputs.
    Impure,
}

impl DerivationType {
    /// Fixed-output or floating content-addressed, or impure.
    pub fn is_ca(self) -> bool {
        !matches!(self, DerivationType::InputAddressed { .. })
    }

    /// A fixed-output derivation.
    pub fn is_fixed(self) -> bool {
        matches!(self, DerivationType::ContentAddressed { fixed: true })
    }

    /// Whether all output paths are known before building.
    pub fn has_known_output_paths(self) -> bool {
        matches!(
            self,
            DerivationType::InputAddressed { deferred: false }
                | DerivationType::ContentAddressed { fixed: true }
        )
    }

    /// Whether the build runs in the sandbox (all but fixed-output and impure).
    pub fn is_sandboxed(self) -> bool {
        matches!(
            self,
            DerivationType::InputAddressed { .. }
                | DerivationType::ContentAddressed { fixed: false }
        )
    }

    /// Everything but impure derivations.
    pub fn is_pure(self) -> bool {
        self != DerivationType::Impure
    }
}

/// A derivation (Nix's `Derivation`), without its name (see the module docs).
///
/// All maps and sets are sorted, as in the ATerm.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    /// Output name → output.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// `.drv` path of each input derivation → the names of the outputs used.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    /// Plain store paths used (sources, `builtins.toFile` texts).
    pub input_srcs: StorePathSet,
    /// The platform (`x86_64-linux`); Nix calls it `platform` in code, `system` in files.
    pub system: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// The derivation name a `.drv` path implies: its name without `.drv`.
pub fn name_from_drv_path(drv_path: &StorePath) -> Result<&str, DerivationError> {
    drv_path
        .name()
        .strip_suffix(DRV_EXTENSION)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| DerivationError::NotADrvPath(drv_path.to_string()))
}

impl Derivation {
    /// `env.name`, which `derivation` sets to the derivation name.
    pub fn env_name(&self) -> Option<&str> {
        self.env.get("name").map(String::as_str)
    }

    /// Whether the builder is one built into Nix (`builtin:fetchurl`).
    pub fn is_builtin(&self) -> bool {
        self.builder.starts_with("builtin:")
    }

    /// The output names.
    pub fn output_names(&self) -> BTreeSet<String> {
        self.outputs.keys().cloned().collect()
    }

    /// Output name → its path when statically known (as stored in the derivation).
    pub fn output_paths(&self) -> BTreeMap<String, Option<StorePath>> {
        self.outputs
            .iter()
            .map(|(n, o)| (n.clone(), o.path().cloned()))
            .collect()
    }

    /// Classifies the derivation by its outputs, with Nix 2.8's errors for mixtures.
    pub fn derivation_type(&self) -> Result<DerivationType, DerivationError> {
        let (mut ia, mut fixed, mut floating, mut deferred, mut impure) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut floating_algo: Option<HashAlgo> = None;
        for (name, out) in &self.outputs {
            match out {
                DerivationOutput::InputAddressed { .. } => ia.push(name),
                DerivationOutput::CAFixed { .. } => fixed.push(name),
                DerivationOutput::CAFloating { algo, .. } => {
                    floating.push(name);
                    match floating_algo {
                        None => floating_algo = Some(*algo),
                        Some(first) if first != *algo => {
                            return Err(DerivationError::FloatingAlgoMismatch {
                                first,
                                other: *algo,
                            })
                        }
                        Some(_) => {}
                    }
                }
                DerivationOutput::Deferred => deferred.push(name),
                DerivationOutput::Impure { .. } => impure.push(name),
            }
        }
        let kinds = [
            ("input-addressed", &ia),
            ("fixed-output", &fixed),
            ("floating", &floating),
            ("deferred", &deferred),
            ("impure", &impure),
        ];
        let present: Vec<&str> = kinds
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, _)| *k)
            .collect();
        match present.as_slice() {
            [] => Err(DerivationError::NoOutputs),
            ["input-addressed"] => Ok(DerivationType::InputAddressed { deferred: false }),
            ["fixed-output"] => {
                if fixed.len() > 1 {
                    return Err(DerivationError::MultipleFixedOutputs(fixed.len()));
                }
                if fixed[0] != "out" {
                    return Err(DerivationError::FixedOutputNotOut(fixed[0].clone()));
                }
                Ok(DerivationType::ContentAddressed { fixed: true })
            }
            ["floating"] => Ok(DerivationType::ContentAddressed { fixed: false }),
            ["deferred"] => Ok(DerivationType::InputAddressed { deferred: true }),
            ["impure"] => Ok(DerivationType::Impure),
            _ => Err(DerivationError::MixedOutputTypes(present.join(", "))),
        }
    }

    /// The references of the `.drv` file: input sources and input derivations.
    pub fn drv_references(&self) -> StorePathSet {
        let mut refs = self.input_srcs.clone();
        refs.extend(self.input_drvs.keys().cloned());
        refs
    }

    /// The store path of this derivation's `.drv` file: a text object named
    /// `<name>.drv` holding the ATerm, referring to the input sources and input
    /// derivations (Nix's `writeDerivation`).
    pub fn drv_path(&self, store_dir: &StoreDir, name: &str) -> Result<StorePath, DerivationError> {
        let file_name = format!("{name}{DRV_EXTENSION}");
        store_dir
            .text_path_of(
                &file_name,
                &self.to_aterm_bytes(store_dir),
                &self.drv_references(),
            )
            .map_err(|source| DerivationError::InvalidName {
                name: name.to_owned(),
                source,
            })
    }

    /// Computes every output path and output environment variable and checks the
    /// given ones, as `derivationStrict` of Nix 2.8 sets them:
    ///
    /// * fixed-output: `makeFixedOutputPath` of the content address and `name`;
    /// * input-addressed and deferred outputs (a missing path is read as deferred):
    ///   from the masked hash modulo ([`Derivation::hash_derivation_modulo`] with
    ///   `mask_outputs`); when that is [`DrvHashKind::Deferred`] (an input is
    ///   floating), all outputs stay [`DerivationOutput::Deferred`] with an empty
    ///   variable, otherwise they become input-addressed with
    ///   `makeOutputPath(output, hash, name)`;
    /// * floating and impure: no path; the variable is [`hash_placeholder`].
    ///
    /// A missing or empty path/variable is filled in; a given one that differs is an
    /// error naming the output, the expected and the given value
    /// ([`DerivationError::OutputPathMismatch`], [`DerivationError::OutputEnvMismatch`]).
    /// `input_hash` gives the (unmasked) [`DrvHash`] of an input derivation, e.g.
    /// through a [`DrvHashCache`].
    pub fn with_output_paths<F, E>(
        mut self,
        store_dir: &StoreDir,
        name: &str,
        input_hash: F,
    ) -> Result<Derivation, E>
    where
        F: FnMut(&StorePath) -> Result<DrvHash, E>,
        E: From<DerivationError>,
    {
        let all_input_addressed = self.outputs.values().all(|o| {
            matches!(
                o,
                DerivationOutput::InputAddressed { .. } | DerivationOutput::Deferred
            )
        });
        let mut expected: BTreeMap<String, (Option<StorePath>, String)> = BTreeMap::new();
        if all_input_addressed && !self.outputs.is_empty() {
            // Hash as `derivationStrict` does: all outputs deferred, every output
            // variable present (masking prints paths and variables empty).
            let mut probe = Derivation {
                outputs: self
                    .outputs
                    .keys()
                    .map(|k| (k.clone(), DerivationOutput::Deferred))
                    .collect(),
                ..self.clone()
            };
            for o in self.outputs.keys() {
                probe.env.entry(o.clone()).or_default();
            }
            let h = probe.hash_derivation_modulo(store_dir, true, input_hash)?;
            for o in self.outputs.keys() {
                let path = match h.kind {
                    DrvHashKind::Deferred => None,
                    DrvHashKind::Regular => {
                        let hash =
                            h.hashes
                                .get(o)
                                .ok_or_else(|| DerivationError::MissingInputOutput {
                                    drv: name.to_owned(),
                                    output: o.clone(),
                                })?;
                        Some(
                            store_dir
                                .make_output_path(o, hash, name)
                                .map_err(|source| DerivationError::InvalidName {
                                    name: name.to_owned(),
                                    source,
                                })?,
                        )
                    }
                };
                let var = path
                    .as_ref()
                    .map(|p| store_dir.print(p))
                    .unwrap_or_default();
                expected.insert(o.clone(), (path, var));
            }
        } else {
            // Checks the mixture rules (one fixed output named out, …).
            self.derivation_type()?;
            for (o, out) in &self.outputs {
                let entry = match out {
                    DerivationOutput::CAFixed { ca, .. } => {
                        let p = fixed_output_path(store_dir, name, o, ca)?;
                        let var = store_dir.print(&p);
                        (Some(p), var)
                    }
                    _ => (None, hash_placeholder(o)),
                };
                expected.insert(o.clone(), entry);
            }
        }
        for (o, (path, var)) in expected {
            let out = self.outputs.get_mut(&o).expect("output from the same map");
            let given_path = out.path().cloned();
            match (&path, &given_path) {
                (Some(p), Some(g)) if p != g => {
                    return Err(DerivationError::OutputPathMismatch {
                        output: o,
                        expected: store_dir.print(p),
                        given: store_dir.print(g),
                    }
                    .into())
                }
                (None, Some(g)) => {
                    return Err(DerivationError::OutputPathMismatch {
                        output: o,
                        expected: "no static path (the derivation is deferred)".into(),
                        given: store_dir.print(g),
                    }
                    .into())
                }
                _ => {}
            }
            match out {
                DerivationOutput::CAFixed { path: fixed, .. } => {
                    *fixed = path.clone().expect("fixed outputs have a path")
                }
                DerivationOutput::InputAddressed { .. } | DerivationOutput::Deferred => {
                    *out = match &path {
                        Some(p) => DerivationOutput::InputAddressed { path: p.clone() },
                        None => DerivationOutput::Deferred,
                    }
                }
                _ => {}
            }
            match self.env.get(&o) {
                Some(given) if !given.is_empty() && *given != var => {
                    return Err(DerivationError::OutputEnvMismatch {
                        output: o,
                        expected: var,
                        given: given.clone(),
                    }
                    .into())
                }
                _ => {
                    self.env.insert(o, var);
                }
            }
        }
        Ok(self)
    }

    /// Checks that the stored output paths and output variables are the ones
    /// [`Derivation::with_output_paths`] computes, for the outputs Nix's
    /// `checkDerivationOutputs` checks: input-addressed and fixed ones.
    /// Floating, deferred and impure outputs are not checked (their variable
    /// may be anything, as in the `-env` derivations `nix-shell` writes), and a
    /// derivation with only those is not hashed at all.
    pub fn verify_output_paths<F, E>(
        &self,
        store_dir: &StoreDir,
        name: &str,
        input_hash: F,
    ) -> Result<(), E>
    where
        F: FnMut(&StorePath) -> Result<DrvHash, E>,
        E: From<DerivationError>,
    {
        let checked = |o: &DerivationOutput| {
            matches!(
                o,
                DerivationOutput::InputAddressed { .. } | DerivationOutput::CAFixed { .. }
            )
        };
        if !self.outputs.values().any(checked) {
            return Ok(());
        }
        let filled = self
            .clone()
            .with_output_paths(store_dir, name, input_hash)?;
        // Filling can only add variables or turn deferred outputs input-addressed.
        for (o, out) in &filled.outputs {
            if !self.outputs.get(o).is_some_and(checked) {
                continue;
            }
            if self.outputs.get(o) != Some(out) {
                return Err(DerivationError::OutputPathMismatch {
                    output: o.clone(),
                    expected: out
                        .path()
                        .map(|p| store_dir.print(p))
                        .unwrap_or_else(|| "no static path".into()),
                    given: self.outputs[o]
                        .path()
                        .map(|p| store_dir.print(p))
                        .unwrap_or_else(|| "none".into()),
                }
                .into());
            }
            if self.env.get(o) != filled.env.get(o) {
                return Err(DerivationError::OutputEnvMismatch {
                    output: o.clone(),
                    expected: filled.env[o].clone(),
                    given: self.env.get(o).cloned().unwrap_or_default(),
                }
                .into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// The path of fixed output `output` of derivation `name` with content address `ca`.
pub(crate) fn fixed_output_path(
    store_dir: &StoreDir,
    name: &str,
    output: &str,
    ca: &ContentAddress,
) -> Result<StorePath, DerivationError> {
    store_dir
        .make_path_from_ca(
            &output_path_name(name, output),
            ca,
            &StorePathSet::new(),
            false,
        )
        .map_err(|source| DerivationError::InvalidName {
            name: name.to_owned(),
            source,
        })
}
