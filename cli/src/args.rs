//! Turning command-line arguments into store paths, as Nix does: a path inside the
//! store dir names the store object that contains it, and any other path (a
//! `result` symlink, say) is followed link by link until it is inside the store
//! (Nix's `followLinksToStore`), with Nix's messages when that fails. An argument
//! `PATH!out,dev` has its outputs split off first, so `PATH` may be such a link too
//! (Nix's `followLinksToStorePathWithOutputs`). Also the checks of option values
//! that `nix-store` makes before it does anything (`-j`).

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use anyhow::bail;
use drover::derived_path::{DerivedPath, OutputsSpec};
use drover::store_path::{StoreDir, StorePath};

/// What an argument of `nix-store --realise` asks for: `PATH` or `PATH!out,dev`,
/// `PATH` followed to the store. Nix splits at the first `!` and drops empty
/// output names, so `drv!` means every output; a derivation without outputs named
/// means all of them, any other path itself.
pub fn derived_path(store_dir: &StoreDir, arg: &str) -> anyhow::Result<DerivedPath> {
    let (path, outputs) = match arg.find('!') {
        Some(i) => (&arg[..i], Some(&arg[i + 1..])),
        None => (arg, None),
    };
    let path = store_path(store_dir, path)?;
    let names: BTreeSet<String> = outputs
        .unwrap_or_default()
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        return Ok(if path.is_derivation() {
            DerivedPath::Built {
                drv_path: path,
                outputs: OutputsSpec::All,
            }
        } else {
            DerivedPath::Opaque(path)
        });
    }
    if !path.is_derivation() {
        bail!("invalid derived path '{arg}': only derivations ('.drv') have outputs",);
    }
    Ok(DerivedPath::Built {
        drv_path: path,
        outputs: OutputsSpec::Names(names),
    })
}

/// The value of `-j`/`--max-jobs`, checked as Nix checks `max-jobs`: `auto` or an
/// unsigned integer, else Nix's usage error.
pub fn max_jobs(value: &str) -> Result<String, String> {
    if value == "auto" || value.parse::<u64>().is_ok() {
        Ok(value.to_owned())
    } else {
        Err("configuration setting 'max-jobs' should be 'auto' or an integer".to_owned())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_split_off_before_links_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let sd = StoreDir::new(store.to_str().unwrap()).unwrap();
        let drv = format!("{}/{}-x.drv", store.display(), "a".repeat(32));
        let link = dir.path().join("drvlink");
        std::os::unix::fs::symlink(&drv, &link).unwrap();
        let l = link.to_str().unwrap();
        let p = sd.parse(&drv).unwrap();
        let built = |o: OutputsSpec| DerivedPath::Built {
            drv_path: p.clone(),
            outputs: o,
        };
        assert_eq!(derived_path(&sd, l).unwrap(), built(OutputsSpec::All));
        assert_eq!(
            derived_path(&sd, &format!("{l}!")).unwrap(),
            built(OutputsSpec::All)
        );
        assert_eq!(
            derived_path(&sd, &format!("{l}!dev")).unwrap(),
            built(OutputsSpec::name("dev"))
        );
        assert_eq!(
            derived_path(&sd, &format!("{l}!out,,dev")).unwrap(),
            built(OutputsSpec::Names(["dev", "out"].map(String::from).into()))
        );
        // A link to a non-derivation is the path itself; outputs of it are an error.
        let out = format!("{}/{}-x", store.display(), "b".repeat(32));
        let link2 = dir.path().join("outlink");
        std::os::unix::fs::symlink(&out, &link2).unwrap();
        let l2 = link2.to_str().unwrap();
        assert_eq!(
            derived_path(&sd, l2).unwrap(),
            DerivedPath::Opaque(sd.parse(&out).unwrap())
        );
        assert!(derived_path(&sd, &format!("{l2}!out")).is_err());
        // The `!` is not part of the file name looked up.
        let e = derived_path(&sd, &format!("{}/nope!out", dir.path().display())).unwrap_err();
        assert!(e.to_string().contains("/nope'"), "{e}");
    }

    #[test]
    fn max_jobs_values() {
        assert_eq!(max_jobs("auto").unwrap(), "auto");
        assert_eq!(max_jobs("0").unwrap(), "0");
        assert_eq!(
            max_jobs("abc").unwrap_err(),
            "configuration setting 'max-jobs' should be 'auto' or an integer"
        );
        assert!(max_jobs("-1").is_err());
    }
}
