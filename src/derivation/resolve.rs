//! Resolving a derivation: replacing its input derivations by their built outputs.
//!
//! A derivation that depends on floating content-addressed outputs cannot know their
//! paths when it is instantiated; its strings refer to them by
//! [`downstream_placeholder`]. Once the inputs are built, Nix 2.8 (`tryResolve`)
//! makes the *resolved* derivation, which it writes to the store and builds instead:
//!
//! * every used output's path joins the input sources, and the input derivations
//!   are dropped;
//! * each downstream placeholder is replaced by the output's path in the builder,
//!   the arguments, and the environment keys and values (replacements in order of
//!   the placeholder strings; when two keys become equal the first is kept);
//! * deferred outputs become input-addressed: their path is
//!   `makeOutputPath(output, masked hash modulo of the resolved derivation, name)`,
//!   also set as the output's variable. Floating outputs stay floating.

use std::collections::BTreeMap;

use super::{downstream_placeholder, Derivation, DerivationError, DerivationOutput, DrvHash};
use crate::store_path::{StoreDir, StorePath};

impl Derivation {
    /// The resolved derivation, or `None` when `input_output(drv path, output)`
    /// does not know the path of some used output (Nix then does not resolve).
    pub fn try_resolve<F>(
        &self,
        store_dir: &StoreDir,
        name: &str,
        mut input_output: F,
    ) -> Result<Option<Derivation>, DerivationError>
    where
        F: FnMut(&StorePath, &str) -> Option<StorePath>,
    {
        let mut resolved = Derivation {
            input_drvs: BTreeMap::new(),
            ..self.clone()
        };
        let mut rewrites: BTreeMap<String, String> = BTreeMap::new();
        for (drv_path, outputs) in &self.input_drvs {
            for o in outputs {
                let Some(actual) = input_output(drv_path, o) else {
                    return Ok(None);
                };
                rewrites.insert(
                    downstream_placeholder(drv_path, o)?,
                    store_dir.print(&actual),
                );
                resolved.input_srcs.insert(actual);
            }
        }
        let rewrite = |s: &str| {
            let mut s = s.to_owned();
            for (from, to) in &rewrites {
                s = s.replace(from.as_str(), to);
            }
            s
        };
        resolved.builder = rewrite(&resolved.builder);
        resolved.args = resolved.args.iter().map(|a| rewrite(a)).collect();
        let mut env = BTreeMap::new();
        for (k, v) in &self.env {
            env.entry(rewrite(k)).or_insert_with(|| rewrite(v));
        }
        resolved.env = env;

        let h = resolved.hash_derivation_modulo(store_dir, true, |p| {
            Err::<DrvHash, _>(DerivationError::MissingInputOutput {
                drv: store_dir.print(p),
                output: "*".into(),
            })
        })?;
        for (o, out) in resolved.outputs.iter_mut() {
            if let DerivationOutput::Deferred = out {
                let hash = h
                    .hashes
                    .get(o)
                    .ok_or_else(|| DerivationError::MissingInputOutput {
                        drv: name.to_owned(),
                        output: o.clone(),
                    })?;
                let path = store_dir
                    .make_output_path(o, hash, name)
                    .map_err(|source| DerivationError::InvalidName {
                        name: name.to_owned(),
                        source,
                    })?;
                resolved.env.insert(o.clone(), store_dir.print(&path));
                *out = DerivationOutput::InputAddressed { path };
            }
        }
        Ok(Some(resolved))
    }
}
