//! Turning command-line arguments into store paths, as Nix does: a path inside the
//! store dir names the store object that contains it, and any other path (a
//! `result` symlink, say) is followed link by link until it is inside the store
//! (Nix's `followLinksToStore`), with Nix's messages when that fails.

use std::path::{Component, Path, PathBuf};

use anyhow::bail;
use drover::store_path::{StoreDir, StorePath};

/// The store path an argument names.
pub fn store_path(store_dir: &StoreDir, arg: &str) -> anyhow::Result<StorePath> {
    if let Ok(p) = store_dir.parse_prefix(arg) {
        return Ok(p);
    }
    let mut path = canon(&std::env::current_dir()?.join(arg));
    // Bounded, so a symlink loop ends in an error rather than a hang.
    for _ in 0..1024 {
        if store_dir
            .parse_prefix(path.to_str().unwrap_or_default())
            .is_ok()
        {
            break;
        }
        match std::fs::symlink_metadata(&path) {
            Err(e) => bail!("getting status of '{}': {}", path.display(), os_message(&e)),
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&path)?;
                let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                path = canon(&dir.join(target));
            }
            Ok(_) => break,
        }
    }
    let Some(real) = path.to_str() else {
        bail!("path '{}' is not valid UTF-8", path.display());
    };
    match store_dir.parse_prefix(real) {
        Ok(p) => Ok(p),
        Err(_) => bail!("path '{real}' is not in the Nix store"),
    }
}

/// Removes `.` and `..` components lexically (Nix's `canonPath`).
fn canon(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// An I/O error as `strerror` words it (without Rust's ` (os error N)`).
fn os_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}
