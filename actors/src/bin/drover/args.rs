//! Turning command-line arguments into store paths, as Nix does: a path inside the
//! store dir names the store object that contains it, and any other path (a
//! `result` symlink, say) is resolved through symlinks first.

use anyhow::Context as _;
use drover::store_path::{StoreDir, StorePath};

/// The store path an argument names.
pub fn store_path(store_dir: &StoreDir, arg: &str) -> anyhow::Result<StorePath> {
    if let Ok(p) = store_dir.parse_prefix(arg) {
        return Ok(p);
    }
    let real = std::fs::canonicalize(arg).with_context(|| format!("resolving path '{arg}'"))?;
    let real = real
        .to_str()
        .with_context(|| format!("path '{arg}' is not valid UTF-8"))?;
    store_dir
        .parse_prefix(real)
        .with_context(|| format!("path '{arg}' is not in the Nix store"))
}
