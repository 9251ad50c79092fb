//! `hashDerivationModulo`: the hash input-addressed output paths come from.
//!
//! Nix 2.8 (`derivations.cc`) computes, per output, a sha256 ([`DrvHash`]):
//!
//! * fixed-output derivation: for its output `out`,
//!   `sha256("fixed:out:<method><algo>:<base16 digest>:<output path>")`, e.g.
//!   `fixed:out:r:sha256:0a43…:/nix/store/…-src`. Derivations using a fixed output
//!   hence do not depend on how it was fetched.
//! * impure derivation: `sha256("impure")` for every output, kind
//!   [`DrvHashKind::Deferred`].
//! * otherwise: the sha256 of the derivation's ATerm in which every input derivation
//!   path is replaced by the base-16 hash of the used output of that input (inputs
//!   with the same hash merge their output names), the same hash for every output.
//!   With `mask_outputs` the output paths and the environment variables named like
//!   outputs are printed empty: that is how output paths are computed
//!   ([`Derivation::with_output_paths`], Nix's `staticOutputHashes`, and the hash in
//!   realisation ids). Inputs are always hashed unmasked. The kind is
//!   [`DrvHashKind::Deferred`] when the derivation is floating content-addressed or
//!   any input is deferred; such input-addressed derivations get no output paths.
//!
//! The input hashes come from the caller (no I/O here); [`DrvHashCache`] memoises
//! them over a derivation lookup.
//!
//! Placeholders: [`hash_placeholder`] (`/<base32 sha256("nix-output:<out>")>`) is the
//! env value of floating and impure outputs and what `builtins.placeholder` returns;
//! [`downstream_placeholder`] stands for an output of a floating input derivation in
//! the strings of its dependents until it is built.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::{name_from_drv_path, Derivation, DerivationError, DerivationOutput};
use crate::hash::{Encoding, Hash, HashAlgo};
use crate::store_path::{output_path_name, StoreDir, StorePath};

/// Whether the hash is final or depends on floating/impure outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DrvHashKind {
    /// Statically known: output paths can be computed from it.
    Regular,
    /// Depends on something only known after building (floating CA or impure).
    Deferred,
}

/// The hash modulo of a derivation: one sha256 per output, and its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrvHash {
    pub hashes: BTreeMap<String, Hash>,
    pub kind: DrvHashKind,
}

/// `sha256("impure")`, the hash modulo of every impure output.
pub fn impure_output_hash() -> Hash {
    HashAlgo::Sha256.digest(b"impure")
}

/// Nix's `hashPlaceholder`: `/` + base-32 sha256 of `nix-output:<output>`.
pub fn hash_placeholder(output: &str) -> String {
    let h = HashAlgo::Sha256.digest(format!("nix-output:{output}"));
    format!("/{}", h.encode(Encoding::Base32))
}

/// Nix's `downstreamPlaceholder`: `/` + base-32 sha256 of
/// `nix-upstream-output:<drv hash part>:<output path name>`.
pub fn downstream_placeholder(
    drv_path: &StorePath,
    output: &str,
) -> Result<String, DerivationError> {
    let name = name_from_drv_path(drv_path)?;
    let clear = format!(
        "nix-upstream-output:{}:{}",
        drv_path.hash_part(),
        output_path_name(name, output)
    );
    Ok(format!(
        "/{}",
        HashAlgo::Sha256.digest(clear).encode(Encoding::Base32)
    ))
}

impl Derivation {
    /// Nix's `hashDerivationModulo(store, drv, maskOutputs)`; `input_hash` gives the
    /// unmasked [`DrvHash`] of each input derivation path.
    pub fn hash_derivation_modulo<F, E>(
        &self,
        store_dir: &StoreDir,
        mask_outputs: bool,
        mut input_hash: F,
    ) -> Result<DrvHash, E>
    where
        F: FnMut(&StorePath) -> Result<DrvHash, E>,
        E: From<DerivationError>,
    {
        let ty = self.derivation_type()?;
        if ty.is_fixed() {
            let mut hashes = BTreeMap::new();
            for (name, out) in &self.outputs {
                if let DerivationOutput::CAFixed { ca, path } = out {
                    let s = format!(
                        "fixed:out:{}:{}:{}",
                        ca.method().print_with_algo(ca.hash().algo()),
                        ca.hash().encode(Encoding::Base16),
                        store_dir.print(path)
                    );
                    hashes.insert(name.clone(), HashAlgo::Sha256.digest(s));
                }
            }
            return Ok(DrvHash {
                hashes,
                kind: DrvHashKind::Regular,
            });
        }
        if !ty.is_pure() {
            return Ok(DrvHash {
                hashes: self
                    .outputs
                    .keys()
                    .map(|k| (k.clone(), impure_output_hash()))
                    .collect(),
                kind: DrvHashKind::Deferred,
            });
        }
        let mut kind = if ty.is_ca() {
            DrvHashKind::Deferred
        } else {
            DrvHashKind::Regular
        };
        let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (drv_path, outputs) in &self.input_drvs {
            let res = input_hash(drv_path)?;
            if res.kind == DrvHashKind::Deferred {
                kind = DrvHashKind::Deferred;
            }
            for o in outputs {
                let h = res
                    .hashes
                    .get(o)
                    .ok_or_else(|| DerivationError::MissingInputOutput {
                        drv: store_dir.print(drv_path),
                        output: o.clone(),
                    })?;
                inputs
                    .entry(h.encode(Encoding::Base16))
                    .or_default()
                    .insert(o.clone());
            }
        }
        let h =
            HashAlgo::Sha256.digest(self.to_aterm_bytes_modulo(store_dir, &inputs, mask_outputs));
        Ok(DrvHash {
            hashes: self
                .outputs
                .keys()
                .map(|k| (k.clone(), h.clone()))
                .collect(),
            kind,
        })
    }

    /// Nix's `staticOutputHashes`: the masked hash modulo per output (the hash in
    /// realisation ids, [`crate::realisation::DrvOutput`]).
    pub fn static_output_hashes<F, E>(
        &self,
        store_dir: &StoreDir,
        input_hash: F,
    ) -> Result<BTreeMap<String, Hash>, E>
    where
        F: FnMut(&StorePath) -> Result<DrvHash, E>,
        E: From<DerivationError>,
    {
        Ok(self
            .hash_derivation_modulo(store_dir, true, input_hash)?
            .hashes)
    }
}

/// Memoised unmasked hashes modulo of derivations by `.drv` path (Nix's `drvHashes`).
///
/// [`DrvHashCache::hash_of`] computes missing ones from derivations the caller's
/// `read` closure supplies, walking the input graph iteratively (deep chains do not
/// grow the call stack).
#[derive(Debug, Default, Clone)]
pub struct DrvHashCache {
    hashes: HashMap<StorePath, CachedHash>,
}

/// A [`DrvHash`] as the cache keeps it: a sorted slice rather than a `BTreeMap`,
/// which allocates a whole node even for one output (the cache holds an entry for
/// every derivation of a closure: about 0.5 KB each as maps, 0.1 KB as slices).
#[derive(Debug, Clone)]
struct CachedHash {
    kind: DrvHashKind,
    hashes: Box<[(Box<str>, Hash)]>,
}

impl CachedHash {
    fn new(h: &DrvHash) -> CachedHash {
        CachedHash {
            kind: h.kind,
            hashes: h
                .hashes
                .iter()
                .map(|(o, h)| (o.as_str().into(), h.clone()))
                .collect(),
        }
    }

    fn drv_hash(&self) -> DrvHash {
        DrvHash {
            hashes: self
                .hashes
                .iter()
                .map(|(o, h)| (o.to_string(), h.clone()))
                .collect(),
            kind: self.kind,
        }
    }
}

impl DrvHashCache {
    pub fn new() -> DrvHashCache {
        DrvHashCache::default()
    }

    pub fn get(&self, drv_path: &StorePath) -> Option<DrvHash> {
        self.hashes.get(drv_path).map(CachedHash::drv_hash)
    }

    /// Records a known hash (e.g. computed right after writing a derivation).
    pub fn insert(&mut self, drv_path: StorePath, hash: DrvHash) {
        self.hashes.insert(drv_path, CachedHash::new(&hash));
    }

    /// The unmasked hash modulo of the derivation at `drv_path`, reading it and its
    /// not yet hashed input closure with `read`.
    pub fn hash_of<F, E>(
        &mut self,
        store_dir: &StoreDir,
        drv_path: &StorePath,
        mut read: F,
    ) -> Result<DrvHash, E>
    where
        F: FnMut(&StorePath) -> Result<Arc<Derivation>, E>,
        E: From<DerivationError>,
    {
        if let Some(h) = self.hashes.get(drv_path) {
            return Ok(h.drv_hash());
        }
        let mut stack: Vec<(StorePath, Arc<Derivation>)> =
            vec![(drv_path.clone(), read(drv_path)?)];
        let mut on_stack: HashSet<StorePath> = HashSet::from([drv_path.clone()]);
        while let Some((_, drv)) = stack.last() {
            let missing = drv
                .input_drvs
                .keys()
                .find(|i| !self.hashes.contains_key(*i))
                .cloned();
            match missing {
                Some(input) => {
                    if on_stack.contains(&input) {
                        return Err(DerivationError::Cycle(store_dir.print(&input)).into());
                    }
                    let d = read(&input)?;
                    on_stack.insert(input.clone());
                    stack.push((input, d));
                }
                None => {
                    let (path, drv) = stack.pop().expect("stack is not empty");
                    on_stack.remove(&path);
                    let hashes = &self.hashes;
                    let h = drv.hash_derivation_modulo(store_dir, false, |p| {
                        hashes.get(p).map(CachedHash::drv_hash).ok_or_else(|| {
                            E::from(DerivationError::MissingInputOutput {
                                drv: store_dir.print(p),
                                output: "*".into(),
                            })
                        })
                    })?;
                    self.hashes.insert(path, CachedHash::new(&h));
                }
            }
        }
        Ok(self.hashes[drv_path].drv_hash())
    }
}
