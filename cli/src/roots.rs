//! `--add-root PATH` / `--indirect` of `drover realise`, as `nix-store --realise`
//! 2.8 makes roots: after the builds, before the command exits, every printed
//! output becomes a symlink named after PATH (`PATH`, `PATH-dev` for output `dev`,
//! `PATH-2`, `PATH-2-dev` for the second argument, …) and an indirect GC root
//! (`<state dir>/gcroots/auto/<hash>` → the symlink). The symlinks' paths are then
//! printed in place of the store paths. Without `--add-root`, Nix's warning that
//! the result may be collected. `--indirect` is accepted and changes nothing, as in
//! Nix 2.8 (every root `nix-store` makes is indirect).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use drover::build_result::BuildResult;
use drover::derived_path::DerivedPath;
use drover::store::LocalStore;

/// The root options of `drover realise`.
#[derive(clap::Args, Debug, Default)]
pub struct RootArgs {
    /// Make each output a GC root: a symlink PATH (PATH-N for the Nth argument,
    /// -OUTPUT for outputs other than `out`) registered as an indirect root.
    #[arg(long = "add-root", value_name = "PATH")]
    pub add_root: Option<PathBuf>,
    /// Accepted for `nix-store` compatibility: roots are always indirect.
    #[arg(long)]
    pub indirect: bool,
}

impl RootArgs {
    /// The root as Nix's `absPath` makes it: relative to the working directory.
    fn root(&self) -> anyhow::Result<Option<PathBuf>> {
        Ok(match &self.add_root {
            None => None,
            Some(p) if p.is_absolute() => Some(p.clone()),
            Some(p) => Some(std::env::current_dir()?.join(p)),
        })
    }
}

/// The lines `nix-store --realise` prints on stdout for the finished `requests`
/// (`results` in the same order), making the roots first when asked to. Without a
/// root, the caller prints Nix's warning (see [`NO_ROOT_WARNING`]).
pub fn realised_lines(
    store: &LocalStore,
    args: &RootArgs,
    results: &[(&DerivedPath, &BuildResult)],
) -> anyhow::Result<Vec<String>> {
    let root = args.root()?;
    let sd = store.store_dir();
    let mut lines = Vec::new();
    for (i, (request, result)) in results.iter().enumerate() {
        let nr = i + 1;
        let base = root.as_ref().map(|r| numbered(r, nr));
        let mut printed = BTreeSet::new();
        match request {
            DerivedPath::Opaque(p) => printed.insert(match &base {
                Some(b) => show(&store.add_perm_root(p, b)?),
                None => sd.print(p),
            }),
            DerivedPath::Built { .. } => {
                for (id, r) in &result.built_outputs {
                    printed.insert(match &base {
                        Some(b) => {
                            let name = if id.output == "out" {
                                b.clone()
                            } else {
                                suffixed(b, &id.output)
                            };
                            show(&store.add_perm_root(&r.out_path, &name)?)
                        }
                        None => sd.print(&r.out_path),
                    });
                }
                false
            }
        };
        lines.extend(printed);
    }
    Ok(lines)
}

/// Nix's warning when `--add-root` is not given.
pub const NO_ROOT_WARNING: &str =
    "warning: you did not specify '--add-root'; the result might be removed by the garbage collector";

fn numbered(root: &Path, nr: usize) -> PathBuf {
    if nr > 1 {
        suffixed(root, &nr.to_string())
    } else {
        root.to_owned()
    }
}

fn suffixed(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push("-");
    s.push(suffix);
    PathBuf::from(s)
}

fn show(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_names_follow_nix() {
        let r = Path::new("/tmp/result");
        assert_eq!(numbered(r, 1), Path::new("/tmp/result"));
        assert_eq!(numbered(r, 3), Path::new("/tmp/result-3"));
        assert_eq!(
            suffixed(&numbered(r, 2), "dev"),
            Path::new("/tmp/result-2-dev")
        );
    }
}
