//! What the benchmark programs share: the two tools they time, finding the release
//! `drover` binary, and removing scratch roots (whose store is read-only).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The tool a run times.
#[derive(Clone, Copy, PartialEq)]
pub enum Tool {
    Drover,
    Nix,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::Drover => "drover",
            Tool::Nix => "nix-2.8",
        }
    }
}

/// The `drover` binary to time: `given`, or `target/release/drover` next to the
/// example's own directory (`target/release/examples/<bench>`).
pub fn drover_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let drover = match given {
        Some(p) => p.to_owned(),
        None => {
            let exe = std::env::current_exe()?;
            let dir = exe.parent().and_then(Path::parent).ok_or_else(|| {
                anyhow::anyhow!("cannot locate the target directory from {exe:?}")
            })?;
            dir.join("drover")
        }
    };
    if !drover.is_file() {
        anyhow::bail!(
            "no drover binary at {} (build it with `cargo build --release -p drover-cli --bin drover`, or pass --drover)",
            drover.display()
        );
    }
    Ok(drover)
}

/// Removes a scratch root, making its read-only store writable first.
pub fn remove_tree(dir: &Path) {
    if dir.exists() {
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(dir).status();
        let _ = std::fs::remove_dir_all(dir);
    }
}
