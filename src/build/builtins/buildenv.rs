//! `builtin:buildenv`: the user environment (profile) that `nix-env` builds, a
//! tree of symlinks into the installed packages.
//!
//! The derivation (Nix's `buildenv.nix`) has `derivations`, a flat list of groups
//! `<active> <priority> <number of outputs> <output path>…`, and `manifest`, the
//! path that becomes `out/manifest.nix`. As Nix 2.8's `buildProfile`:
//!
//! * packages are linked in order of priority (lower first), then path; inactive
//!   ones (`active = "false"`) are left out; then, in rounds, the packages named in
//!   each linked package's `nix-support/propagated-user-env-packages`, with
//!   priorities 1000, 1001, … in path order;
//! * a package's top-level entries are linked into `out` (names starting with `.`
//!   and Nix's special files — `propagated-build-inputs`, `nix-support`,
//!   `perllocal.pod`, `info/dir`, `log`, `manifest.nix`, `manifest.json` — are not);
//!   where two packages both have a directory, the directory is made real and both
//!   are linked inside it;
//! * two files at the same place: the lower priority number wins; equal priorities
//!   are a collision (`packages '…' and '…' have the same priority N; use 'nix-env
//!   --set-flag priority NUMBER INSTALLED_PKGNAME' …`), as are a file against a
//!   directory, either way round;
//! * dangling symlinks are skipped with a warning, and so is a package that is not
//!   a directory.
//!
//! Directories are read in the order the file system returns them, as Nix reads
//! them: which of two colliding files is named first follows that order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{attr, hl, strerror, BuiltinError, BuiltinLog};

/// Links made so far: destination → the priority of the package it came from.
#[derive(Default)]
struct State {
    priorities: HashMap<PathBuf, i64>,
    symlinks: u64,
}

/// Files of packages that never appear in a profile.
const SKIPPED_SUFFIXES: &[&str] = &[
    "/propagated-build-inputs",
    "/nix-support",
    "/perllocal.pod",
    "/info/dir",
    "/log",
    "/manifest.nix",
    "/manifest.json",
];

fn is_dir_mode(mode: u32) -> bool {
    mode & libc_s_ifmt() == 0o040000
}

fn is_link_mode(mode: u32) -> bool {
    mode & libc_s_ifmt() == 0o120000
}

const fn libc_s_ifmt() -> u32 {
    0o170000
}

fn sys(context: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BuiltinError {
    BuiltinError::io(context, path.to_path_buf())
}

fn create_symlink(target: &Path, link: &Path) -> Result<(), BuiltinError> {
    std::os::unix::fs::symlink(target, link).map_err(|e| {
        BuiltinError::Other(format!(
            "creating symlink from '{}' to '{}': {}",
            hl(link.display()),
            hl(target.display()),
            strerror(&e)
        ))
    })
}

fn create_links(
    state: &mut State,
    src_dir: &Path,
    dst_dir: &Path,
    priority: i64,
    log: &mut BuiltinLog<'_>,
) -> Result<(), BuiltinError> {
    let entries = match std::fs::read_dir(src_dir) {
        Ok(e) => e,
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => {
            log.warn(&format!(
                "not including '{}' in the user environment because it's not a directory",
                hl(src_dir.display())
            ));
            return Ok(());
        }
        Err(e) => return Err(sys("opening directory", src_dir)(e)),
    };
    let mut names = Vec::new();
    for ent in entries {
        names.push(ent.map_err(sys("reading directory", src_dir))?.file_name());
    }
    for name in names {
        if name.as_encoded_bytes().first() == Some(&b'.') {
            continue;
        }
        let src_file = src_dir.join(&name);
        let dst_file = dst_dir.join(&name);
        let src_st = match std::fs::metadata(&src_file) {
            Ok(m) => m,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::ENOENT) | Some(nix::libc::ENOTDIR)
                ) =>
            {
                log.warn(&format!(
                    "skipping dangling symlink '{}'",
                    hl(dst_file.display())
                ));
                continue;
            }
            Err(e) => return Err(sys("getting status of", &src_file)(e)),
        };
        let src_str = src_file.to_string_lossy();
        if SKIPPED_SUFFIXES.iter().any(|s| src_str.ends_with(s)) {
            continue;
        }
        let dst_st = match std::fs::symlink_metadata(&dst_file) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(sys("getting status of", &dst_file)(e)),
        };
        if src_st.is_dir() {
            if let Some(d) = &dst_st {
                if is_dir_mode(d.mode()) {
                    create_links(state, &src_file, &dst_file, priority, log)?;
                    continue;
                } else if is_link_mode(d.mode()) {
                    let target = std::fs::canonicalize(&dst_file)
                        .map_err(sys("getting canonical path of", &dst_file))?;
                    let target_is_dir = std::fs::symlink_metadata(&target)
                        .map_err(sys("getting status of", &target))?
                        .is_dir();
                    if !target_is_dir {
                        return Err(BuiltinError::Other(format!(
                            "collision between '{}' and non-directory '{}'",
                            hl(src_file.display()),
                            hl(target.display())
                        )));
                    }
                    std::fs::remove_file(&dst_file).map_err(sys("unlinking", &dst_file))?;
                    std::fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&dst_file)
                        .map_err(sys("creating directory", &dst_file))?;
                    let prev = *state.priorities.entry(dst_file.clone()).or_insert(0);
                    create_links(state, &target, &dst_file, prev, log)?;
                    create_links(state, &src_file, &dst_file, priority, log)?;
                    continue;
                }
            }
        } else if let Some(d) = &dst_st {
            if is_link_mode(d.mode()) {
                let prev = *state.priorities.entry(dst_file.clone()).or_insert(0);
                if prev == priority {
                    let other = std::fs::read_link(&dst_file)
                        .map_err(sys("reading symbolic link", &dst_file))?;
                    return Err(BuiltinError::Other(format!(
                        "packages '{}' and '{}' have the same priority {}; use 'nix-env --set-flag priority NUMBER INSTALLED_PKGNAME' to change the priority of one of the conflicting packages (0 being the highest priority)",
                        hl(src_file.display()),
                        hl(other.display()),
                        hl(priority)
                    )));
                }
                if prev < priority {
                    continue;
                }
                std::fs::remove_file(&dst_file).map_err(sys("unlinking", &dst_file))?;
            } else if is_dir_mode(d.mode()) {
                return Err(BuiltinError::Other(format!(
                    "collision between non-directory '{}' and directory '{}'",
                    hl(src_file.display()),
                    hl(dst_file.display())
                )));
            }
        }
        create_symlink(&src_file, &dst_file)?;
        state.priorities.insert(dst_file, priority);
        state.symlinks += 1;
    }
    Ok(())
}

use std::os::unix::fs::DirBuilderExt;

/// A package of the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub path: PathBuf,
    pub active: bool,
    pub priority: i64,
}

/// Parses the `derivations` attribute: groups `active priority count path…`.
pub fn parse_derivations(s: &str) -> Result<Vec<Package>, BuiltinError> {
    let bad = |why: &str| {
        BuiltinError::Other(format!(
            "invalid 'derivations' attribute of builtin:buildenv ({why}): '{s}'"
        ))
    };
    let mut tokens = s.split([' ', '\t', '\n', '\r']).filter(|t| !t.is_empty());
    let mut pkgs = Vec::new();
    while let Some(active) = tokens.next() {
        let int = |t: Option<&str>, what: &str| -> Result<i64, BuiltinError> {
            t.ok_or_else(|| bad(&format!("no {what}")))?
                .parse::<i64>()
                .map_err(|_| bad(&format!("{what} is not a number")))
        };
        let priority = int(tokens.next(), "priority")?;
        let outputs = int(tokens.next(), "output count")?;
        for _ in 0..outputs.max(0) {
            let path = tokens.next().ok_or_else(|| bad("too few output paths"))?;
            pkgs.push(Package {
                path: PathBuf::from(path),
                active: active != "false",
                priority,
            });
        }
    }
    Ok(pkgs)
}

/// Nix's `buildProfile`: links `pkgs` (and what they propagate) into `out`.
pub fn build_profile(
    out: &Path,
    mut pkgs: Vec<Package>,
    log: &mut BuiltinLog<'_>,
) -> Result<(), BuiltinError> {
    let mut state = State::default();
    let mut done: BTreeSet<PathBuf> = BTreeSet::new();
    let mut postponed: BTreeSet<PathBuf> = BTreeSet::new();
    let add_pkg = |state: &mut State,
                   done: &mut BTreeSet<PathBuf>,
                   postponed: &mut BTreeSet<PathBuf>,
                   dir: &Path,
                   priority: i64,
                   log: &mut BuiltinLog<'_>|
     -> Result<(), BuiltinError> {
        if !done.insert(dir.to_owned()) {
            return Ok(());
        }
        create_links(state, dir, out, priority, log)?;
        let f = dir.join("nix-support/propagated-user-env-packages");
        match std::fs::read_to_string(&f) {
            Ok(text) => {
                for p in text.split([' ', '\n']).filter(|t| !t.is_empty()) {
                    if !done.contains(Path::new(p)) {
                        postponed.insert(PathBuf::from(p));
                    }
                }
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::ENOENT) | Some(nix::libc::ENOTDIR)
                ) => {}
            Err(e) => return Err(sys("reading file", &f)(e)),
        }
        Ok(())
    };
    pkgs.sort_by(|a, b| (a.priority, &a.path).cmp(&(b.priority, &b.path)));
    for p in pkgs.iter().filter(|p| p.active) {
        add_pkg(
            &mut state,
            &mut done,
            &mut postponed,
            &p.path,
            p.priority,
            log,
        )?;
    }
    let mut counter = 1000;
    while !postponed.is_empty() {
        let round = std::mem::take(&mut postponed);
        for dir in round {
            add_pkg(&mut state, &mut done, &mut postponed, &dir, counter, log)?;
            counter += 1;
        }
    }
    log::debug!("created {} symlinks in user environment", state.symlinks);
    Ok(())
}

/// Runs `builtin:buildenv` with the derivation's environment.
pub fn buildenv(
    env: &BTreeMap<String, String>,
    log: &mut BuiltinLog<'_>,
) -> Result<(), BuiltinError> {
    let out = PathBuf::from(attr(env, "out")?);
    std::fs::create_dir_all(&out).map_err(sys("creating directory", &out))?;
    let pkgs = parse_derivations(attr(env, "derivations")?)?;
    build_profile(&out, pkgs, log)?;
    create_symlink(Path::new(attr(env, "manifest")?), &out.join("manifest.nix"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk(root: &Path, files: &[&str]) -> PathBuf {
        for f in files {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, f).unwrap();
        }
        std::fs::create_dir_all(root).unwrap();
        root.to_owned()
    }

    fn run(out: &Path, derivations: &str) -> (i32, String) {
        let e: BTreeMap<String, String> = [
            ("out", out.to_str().unwrap()),
            ("derivations", derivations),
            ("manifest", "/nix/store/x-manifest.nix"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut log = Vec::new();
        let st = super::super::run_builtin("builtin:buildenv", &e, &Default::default(), &mut |b| {
            log.extend_from_slice(b)
        });
        (st.code().unwrap(), String::from_utf8(log).unwrap())
    }

    #[test]
    fn merges_directories_and_lets_the_lower_priority_number_win() {
        let d = tempfile::tempdir().unwrap();
        let a = mk(
            &d.path().join("a"),
            &[
                "bin/a",
                "bin/same",
                "share/doc/a",
                ".hidden",
                "nix-support/x",
            ],
        );
        let b = mk(&d.path().join("b"), &["bin/b", "bin/same", "lib/b"]);
        let out = d.path().join("out");
        let derivations = format!("true 5 1 {} true 4 1 {}", a.display(), b.display());
        let (code, log) = run(&out, &derivations);
        assert_eq!(code, 0, "{log}");
        // `bin` exists in both: a real directory with links into each.
        assert!(std::fs::symlink_metadata(out.join("bin")).unwrap().is_dir());
        assert_eq!(
            std::fs::read_link(out.join("bin/a")).unwrap(),
            a.join("bin/a")
        );
        assert_eq!(
            std::fs::read_link(out.join("bin/b")).unwrap(),
            b.join("bin/b")
        );
        assert_eq!(
            std::fs::read_link(out.join("bin/same")).unwrap(),
            b.join("bin/same")
        );
        assert_eq!(
            std::fs::read_link(out.join("share")).unwrap(),
            a.join("share")
        );
        assert_eq!(std::fs::read_link(out.join("lib")).unwrap(), b.join("lib"));
        assert!(!out.join(".hidden").exists() && !out.join("nix-support").exists());
        assert_eq!(
            std::fs::read_link(out.join("manifest.nix")).unwrap(),
            Path::new("/nix/store/x-manifest.nix")
        );
    }

    #[test]
    fn equal_priorities_collide_and_inactive_packages_are_left_out() {
        let d = tempfile::tempdir().unwrap();
        let a = mk(&d.path().join("a"), &["bin/same"]);
        let b = mk(&d.path().join("b"), &["bin/same"]);
        let (code, log) = run(
            &d.path().join("out"),
            &format!("true 5 1 {} true 5 1 {}", a.display(), b.display()),
        );
        assert_eq!(code, 1);
        assert!(log.contains(&format!(
            "packages '\x1b[35;1m{}\x1b[0m' and '\x1b[35;1m{}\x1b[0m' have the same priority \x1b[35;1m5\x1b[0m; use 'nix-env --set-flag priority NUMBER INSTALLED_PKGNAME' to change the priority of one of the conflicting packages (0 being the highest priority)",
            b.join("bin/same").display(),
            a.join("bin/same").display()
        )), "{log}");
        let (code, log) = run(
            &d.path().join("out2"),
            &format!("true 5 1 {} false 5 1 {}", a.display(), b.display()),
        );
        assert_eq!(code, 0, "{log}");
        let (code, log) = run(&d.path().join("out3"), "true 5 2 /x");
        assert_eq!(code, 1);
        assert!(log.contains("too few output paths"), "{log}");
    }

    #[test]
    fn propagated_packages_and_non_directories() {
        let d = tempfile::tempdir().unwrap();
        let c = mk(&d.path().join("c"), &["bin/c"]);
        let a = mk(&d.path().join("a"), &["bin/a"]);
        std::fs::create_dir_all(a.join("nix-support")).unwrap();
        std::fs::write(
            a.join("nix-support/propagated-user-env-packages"),
            format!("{}\n", c.display()),
        )
        .unwrap();
        let file = d.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let out = d.path().join("out");
        let (code, log) = run(
            &out,
            &format!("true 5 2 {} {}", a.display(), file.display()),
        );
        assert_eq!(code, 0, "{log}");
        assert_eq!(
            std::fs::read_link(out.join("bin/c")).unwrap(),
            c.join("bin/c")
        );
        assert!(log.contains("because it's not a directory"), "{log}");
    }
}
