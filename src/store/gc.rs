//! The garbage collector, as Nix 2.8's `LocalStore::collectGarbage` and
//! `findRoots` work (`nix-store --gc`, `--delete`, `--print-roots`, and the worker
//! protocol's `CollectGarbage` and `FindRoots`).
//!
//! **Roots** ([`find_roots`]): every symlink under `<state>/gcroots` (recursively)
//! into the store, or to a symlink elsewhere that points into the store (an
//! indirect root: the root is that other symlink; a dangling one under
//! `gcroots/auto` is removed as stale); regular files under `gcroots` named like
//! store paths; the same under `<state>/profiles`; runtime roots: what
//! `/proc/<pid>/{exe,cwd,fd/*}` point to, the files `/proc/<pid>/maps` maps, store
//! paths in `/proc/<pid>/environ`, and `/proc/sys/kernel/{modprobe,fbsplash,
//! poweroff_cmd}`; and the temporary roots in `<state>/temproots/<pid>` of live
//! processes (a file whose lock can be taken belongs to a dead process and is
//! removed). Only valid paths are roots, except temporary roots, which keep any
//! store entry with their hash part (`.lock`, `.chroot`, drover's temporaries).
//!
//! **The collection** ([`collect_garbage`]): `db/reserved` is removed (when
//! deleting), `gc.lock` is taken exclusively and `gc-socket/socket` served, so a
//! process adding a temporary root meanwhile tells the collector first (see
//! [`super::gc_roots`]); the answer to a root whose path is being deleted waits
//! until that deletion is done. The roots are read once; then, for every entry of
//! the store directory, its closure under referrers (and, with `keep-derivations`,
//! a derivation's outputs; with `keep-outputs`, a path's derivers) is visited: if
//! it reaches a root or temporary root, what it visited stays unknown and the
//! root's closure (references, outputs, derivers as the settings say) is live;
//! otherwise every visited path is dead and, referrers before referents, each is
//! invalidated in the database and then deleted from the disk. Entries that are not
//! store paths are deleted directly. Unlike Nix 2.8, which decides once per
//! closure, a temporary root that arrives while a closure is being deleted stops
//! the deletion of that path and of the rest of the closure (what it refers to).
//! `max_freed` stops the deletion once more bytes
//! were freed. Last, `.links` entries left with one link are removed and the
//! saving of hard linking reported.
//!
//! Bytes freed are counted as Nix counts them: the size of every non-directory with
//! one or two links (a file with two is taken for an optimised one).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use thiserror::Error;

use super::gc_roots::canon_path;
use super::local::LocalStore;
use super::locks::{lock_fd, open_lock_file, LockType};
use super::StoreError;
use crate::derivation::DrvHashCache;
use crate::realisation::DrvOutput;
use crate::store_path::{StorePath, StorePathSet};

/// The roots of the collector: each store path with the places that root it
/// (symlinks, `/proc/…` files, `{temp:<pid>}`, or `{censored}`).
pub type Roots = BTreeMap<StorePath, BTreeSet<String>>;

/// What [`collect_garbage`] does (Nix's `GCOptions::GCAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GcAction {
    /// Return the live paths (those reachable from the roots).
    ReturnLive,
    /// Return the dead paths (those not reachable from the roots).
    ReturnDead,
    /// Delete the dead paths.
    #[default]
    DeleteDead,
    /// Delete [`GcOptions::paths_to_delete`], insofar as they are dead.
    DeleteSpecific,
}

/// The options of a collection (Nix's `GCOptions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcOptions {
    pub action: GcAction,
    /// Ignore the roots (dangerous): paths are still only deleted once nothing
    /// valid in the store refers to them. With [`GcAction::DeleteSpecific`] this
    /// also turns `keep-outputs` and `keep-derivations` off.
    pub ignore_liveness: bool,
    /// For [`GcAction::DeleteSpecific`], the paths to delete.
    pub paths_to_delete: StorePathSet,
    /// Stop deleting once more than this many bytes were freed.
    pub max_freed: u64,
}

impl Default for GcOptions {
    fn default() -> GcOptions {
        GcOptions {
            action: GcAction::DeleteDead,
            ignore_liveness: false,
            paths_to_delete: StorePathSet::new(),
            max_freed: u64::MAX,
        }
    }
}

/// What a collection found or did (Nix's `GCResults`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcResults {
    /// Depending on the action: the live paths, the dead paths, or the store
    /// entries deleted (printed full paths).
    pub paths: BTreeSet<String>,
    /// The bytes freed by deleting (0 unless deleting).
    pub bytes_freed: u64,
}

/// The level of a message of the collector, as Nix's verbosity levels: `Info` is
/// shown by default, `Talkative` with `-v`, `Debug` with `--debug`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GcLevel {
    Error,
    Info,
    Talkative,
    Debug,
}

/// Where the collector's messages go (from its root server's threads too).
pub type GcLog<'a> = &'a (dyn Fn(GcLevel, &str) + Sync);

/// A collection failed.
#[derive(Debug, Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{context} '{path}': {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("Cannot delete path '{0}' since it is still alive. To find out why, use: nix-store --query --roots")]
    StillAlive(String),
    #[error("temporary roots file '{path}' holds '{root}', which is not a store path")]
    BadTempRoot { path: PathBuf, root: String },
}

fn io_err(context: &'static str, path: &Path) -> impl FnOnce(io::Error) -> GcError {
    let path = path.to_owned();
    move |source| GcError::Io {
        context,
        path,
        source,
    }
}

/// The censored name of a root (`FindRoots` for clients without trust).
const CENSORED: &str = "{censored}";

/// Nix's `findRoots(censor)`: the permanent, runtime and temporary roots.
pub fn find_roots(store: &LocalStore, censor: bool, log: GcLog) -> Result<Roots, GcError> {
    let mut roots = find_roots_no_temp(store, censor, log)?;
    find_temp_roots(store, censor, &mut roots, log)?;
    Ok(roots)
}

/// The roots under `gcroots` and `profiles`, and the runtime roots.
fn find_roots_no_temp(store: &LocalStore, censor: bool, log: GcLog) -> Result<Roots, GcError> {
    let mut found: Vec<(String, String)> = Vec::new();
    let state = store.state_dir();
    let auto = state.join("gcroots/auto");
    for dir in [state.join("gcroots"), state.join("profiles")] {
        scan_roots(store, &dir, &auto, &mut found, log)?;
    }
    let mut roots = Roots::new();
    add_valid_roots(store, found, &mut roots, |link, target| {
        log(
            GcLevel::Info,
            &format!("skipping invalid root from '{link}' to '{target}'"),
        )
    })?;
    find_runtime_roots(store, censor, &mut roots)?;
    Ok(roots)
}

/// Adds the (link, target) pairs whose target lies in a valid store path;
/// `invalid` hears of the others in the store (outside it they are ignored).
fn add_valid_roots(
    store: &LocalStore,
    found: Vec<(String, String)>,
    roots: &mut Roots,
    mut invalid: impl FnMut(&str, &str),
) -> Result<(), GcError> {
    let sd = store.store_dir();
    let parsed: Vec<(String, String, StorePath)> = found
        .into_iter()
        .filter_map(|(l, t)| sd.parse_prefix(&t).ok().map(|p| (l, t, p)))
        .collect();
    let candidates: Vec<StorePath> = parsed.iter().map(|(_, _, p)| p.clone()).collect();
    let valid = store.query_valid_paths(&candidates)?;
    for (link, target, p) in parsed {
        if valid.contains(&p) {
            roots.entry(p).or_default().insert(link);
        } else {
            invalid(&link, &target);
        }
    }
    Ok(())
}

fn is_permanent_failure(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EACCES) | Some(nix::libc::ENOENT) | Some(nix::libc::ENOTDIR)
    )
}

/// Nix's recursive `findRoots(path, type, roots)`, collecting (link, target) pairs.
fn scan_roots(
    store: &LocalStore,
    path: &Path,
    auto: &Path,
    found: &mut Vec<(String, String)>,
    log: GcLog,
) -> Result<(), GcError> {
    match scan_roots_inner(store, path, auto, found, log) {
        Err(GcError::Io { source, .. }) if is_permanent_failure(&source) => {
            log(
                GcLevel::Info,
                &format!("cannot read potential root '{}'", path.display()),
            );
            Ok(())
        }
        r => r,
    }
}

fn scan_roots_inner(
    store: &LocalStore,
    path: &Path,
    auto: &Path,
    found: &mut Vec<(String, String)>,
    log: GcLog,
) -> Result<(), GcError> {
    let sd = store.store_dir();
    let meta = std::fs::symlink_metadata(path).map_err(io_err("getting status of", path))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        let mut names = Vec::new();
        for e in std::fs::read_dir(path).map_err(io_err("opening directory", path))? {
            names.push(e.map_err(io_err("reading directory", path))?.file_name());
        }
        for n in names {
            scan_roots(store, &path.join(n), auto, found, log)?;
        }
    } else if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(io_err("reading symlink", path))?;
        let t = target.to_string_lossy().into_owned();
        if sd.is_in_store(&t) {
            found.push((path.display().to_string(), t));
        } else {
            // an indirect root: a link to a link elsewhere
            let dir = path.parent().unwrap_or(Path::new("/"));
            let target = canon_path(&dir.join(&target));
            match std::fs::symlink_metadata(&target) {
                Err(_) => {
                    if path.starts_with(auto) && path != auto {
                        log(
                            GcLevel::Info,
                            &format!(
                                "removing stale link from '{}' to '{}'",
                                path.display(),
                                target.display()
                            ),
                        );
                        std::fs::remove_file(path).map_err(io_err("removing", path))?;
                    }
                }
                Ok(m) if m.file_type().is_symlink() => {
                    let t2 =
                        std::fs::read_link(&target).map_err(io_err("reading symlink", &target))?;
                    let t2 = t2.to_string_lossy().into_owned();
                    if sd.is_in_store(&t2) {
                        found.push((target.display().to_string(), t2));
                    }
                }
                Ok(_) => {}
            }
        }
    } else if ft.is_file() {
        if let Some(name) = path.file_name() {
            let candidate = format!("{}/{}", sd.as_str(), name.to_string_lossy());
            if sd.parse(&candidate).is_ok() {
                found.push((path.display().to_string(), candidate));
            }
        }
    }
    Ok(())
}

fn proc_error_is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::ENOENT) | Some(nix::libc::EACCES) | Some(nix::libc::ESRCH)
    )
}

/// What a `/proc/<pid>/…` symlink points to, when absolute.
fn read_proc_link(
    file: &Path,
    unchecked: &mut HashMap<String, BTreeSet<String>>,
) -> Result<(), GcError> {
    match std::fs::read_link(file) {
        Ok(t) => {
            let t = t.to_string_lossy().into_owned();
            if t.starts_with('/') {
                unchecked
                    .entry(t)
                    .or_default()
                    .insert(file.display().to_string());
            }
            Ok(())
        }
        Err(e) if proc_error_is_transient(&e) => Ok(()),
        Err(e) => Err(io_err("reading symlink", file)(e)),
    }
}

/// The file of a `/proc/<pid>/maps` line that maps one (`^\s*\S+ ×5 (/\S+)\s*$`).
fn mapped_file(line: &str) -> Option<&str> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    (fields.len() == 6 && fields[5].starts_with('/')).then(|| fields[5])
}

/// The store paths named in `bytes` as Nix's regex
/// `<store dir>/[0-9a-z]+[0-9a-zA-Z+\-._?=]*` finds them.
fn store_paths_in(store_dir: &str, bytes: &[u8]) -> Vec<String> {
    let prefix = format!("{store_dir}/");
    let prefix = prefix.as_bytes();
    let first = |b: u8| b.is_ascii_digit() || b.is_ascii_lowercase();
    let rest = |b: u8| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b);
    let mut out = Vec::new();
    let mut i = 0;
    while i + prefix.len() < bytes.len() {
        if &bytes[i..i + prefix.len()] == prefix && first(bytes[i + prefix.len()]) {
            let mut j = i + prefix.len() + 1;
            while j < bytes.len() && rest(bytes[j]) {
                j += 1;
            }
            out.push(String::from_utf8_lossy(&bytes[i..j]).into_owned());
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// Nix 2.8's `findRuntimeRoots` on Linux.
fn find_runtime_roots(store: &LocalStore, censor: bool, roots: &mut Roots) -> Result<(), GcError> {
    let mut unchecked: HashMap<String, BTreeSet<String>> = HashMap::new();
    let sd = store.store_dir();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for ent in procs {
            let ent = ent.map_err(io_err("iterating", Path::new("/proc")))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let pid_dir = Path::new("/proc").join(&name);
            read_proc_link(&pid_dir.join("exe"), &mut unchecked)?;
            read_proc_link(&pid_dir.join("cwd"), &mut unchecked)?;
            let fd_dir = pid_dir.join("fd");
            let fds = match std::fs::read_dir(&fd_dir) {
                Ok(d) => d,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(nix::libc::ENOENT) | Some(nix::libc::EACCES)
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(io_err("opening", &fd_dir)(e)),
            };
            let mut gone = false;
            for fd in fds {
                match fd {
                    Ok(fd) => {
                        if !fd.file_name().to_string_lossy().starts_with('.') {
                            read_proc_link(&fd.path(), &mut unchecked)?;
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => {
                        gone = true;
                        break;
                    }
                    Err(e) => return Err(io_err("iterating", &fd_dir)(e)),
                }
            }
            if gone {
                continue;
            }
            let maps = pid_dir.join("maps");
            match std::fs::read(&maps) {
                Ok(bytes) => {
                    for line in String::from_utf8_lossy(&bytes).split('\n') {
                        if let Some(f) = mapped_file(line) {
                            unchecked
                                .entry(f.to_owned())
                                .or_default()
                                .insert(maps.display().to_string());
                        }
                    }
                }
                Err(e) if proc_error_is_transient(&e) => continue,
                Err(e) => return Err(io_err("reading", &maps)(e)),
            }
            let environ = pid_dir.join("environ");
            match std::fs::read(&environ) {
                Ok(bytes) => {
                    for p in store_paths_in(sd.as_str(), &bytes) {
                        unchecked
                            .entry(p)
                            .or_default()
                            .insert(environ.display().to_string());
                    }
                }
                Err(e) if proc_error_is_transient(&e) => continue,
                Err(e) => return Err(io_err("reading", &environ)(e)),
            }
        }
    }
    for f in [
        "/proc/sys/kernel/modprobe",
        "/proc/sys/kernel/fbsplash",
        "/proc/sys/kernel/poweroff_cmd",
    ] {
        match std::fs::read(f) {
            Ok(b) => {
                unchecked
                    .entry(String::from_utf8_lossy(&b).into_owned())
                    .or_default()
                    .insert(f.to_owned());
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::ENOENT) | Some(nix::libc::EACCES)
                ) => {}
            Err(e) => return Err(io_err("reading", Path::new(f))(e)),
        }
    }
    let mut found = Vec::new();
    for (target, links) in unchecked {
        if !sd.is_in_store(&target) {
            continue;
        }
        if censor {
            found.push((CENSORED.to_owned(), target));
        } else {
            found.extend(links.into_iter().map(|l| (l, target.clone())));
        }
    }
    add_valid_roots(store, found, roots, |_, _| {})
}

/// Nix's `findTempRoots`: the roots in the files of live processes; the files of
/// dead ones are removed (and marked `d` for a process still about to lock them).
fn find_temp_roots(
    store: &LocalStore,
    censor: bool,
    roots: &mut Roots,
    log: GcLog,
) -> Result<(), GcError> {
    let dir = store.state_dir().join("temproots");
    let entries = match std::fs::read_dir(&dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("opening directory", &dir)(e)),
    };
    let mut names = Vec::new();
    for e in entries {
        names.push(e.map_err(io_err("reading directory", &dir))?.file_name());
    }
    names.sort();
    for name in names {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let digits: String = name.chars().take_while(char::is_ascii_digit).collect();
        let path = dir.join(&name);
        let mut file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("opening temporary roots file", &path)(e)),
        };
        // Only a dead owner's file can be locked.
        if lock_fd(&file, LockType::Write, false).map_err(io_err("locking", &path))? {
            log(
                GcLevel::Info,
                &format!("removing stale temporary roots file '{}'", path.display()),
            );
            let _ = std::fs::remove_file(&path);
            file.write_all(b"d").map_err(io_err("writing", &path))?;
            continue;
        }
        let mut contents = Vec::new();
        file.read_to_end(&mut contents)
            .map_err(io_err("reading", &path))?;
        let label = if censor {
            CENSORED.to_owned()
        } else {
            format!("{{temp:{digits}}}")
        };
        let mut rest = &contents[..];
        while let Some(end) = rest.iter().position(|b| *b == 0) {
            let root = String::from_utf8_lossy(&rest[..end]).into_owned();
            rest = &rest[end + 1..];
            let p = store
                .store_dir()
                .parse(&root)
                .map_err(|_| GcError::BadTempRoot {
                    path: path.clone(),
                    root: root.clone(),
                })?;
            log(GcLevel::Debug, &format!("got temporary root '{root}'"));
            roots.entry(p).or_default().insert(label.clone());
        }
    }
    Ok(())
}

/// What the root server shares with the collector.
#[derive(Default)]
struct Shared {
    /// Hash parts of the temporary roots (so `<path>.lock` etc. are kept too).
    temp_roots: HashSet<String>,
    /// Hash part of the path being deleted, if any.
    pending: Option<String>,
    stopping: bool,
}

struct Server {
    shared: Mutex<Shared>,
    wakeup: Condvar,
    stop: AtomicBool,
    clients: Mutex<Vec<UnixStream>>,
}

impl Server {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One client: each line a root, answered `1` once it is recorded (and not
    /// being deleted).
    fn serve(&self, store: &LocalStore, conn: UnixStream, log: GcLog) {
        let mut out = match conn.try_clone() {
            Ok(c) => c,
            Err(_) => return,
        };
        let mut reader = BufReader::new(conn);
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let Some(line) = line.strip_suffix('\n') else {
                break;
            };
            match store.store_dir().parse(line) {
                Ok(p) => {
                    log(GcLevel::Debug, &format!("got new GC root '{line}'"));
                    let hash = p.hash_part().to_owned();
                    let mut shared = self.lock();
                    shared.temp_roots.insert(hash.clone());
                    while shared.pending.as_deref() == Some(hash.as_str()) && !shared.stopping {
                        log(
                            GcLevel::Debug,
                            &format!("synchronising with deletion of path '{line}'"),
                        );
                        shared = self.wakeup.wait(shared).unwrap_or_else(|e| e.into_inner());
                    }
                }
                Err(_) => log(
                    GcLevel::Error,
                    "received garbage instead of a root from client",
                ),
            }
            if out.write_all(b"1").is_err() {
                break;
            }
        }
    }
}

/// Why the deletion stopped early.
enum Stop {
    Limit,
    Failed(GcError),
}

impl<E: Into<GcError>> From<E> for Stop {
    fn from(e: E) -> Stop {
        Stop::Failed(e.into())
    }
}

/// Nix's `deletePath` with the bytes freed counted (see the module doc).
fn delete_path(path: &Path, bytes_freed: &mut u64) -> Result<(), GcError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("getting status of", path)(e)),
    };
    let is_dir = meta.file_type().is_dir();
    if !is_dir && matches!(meta.nlink(), 1 | 2) {
        *bytes_freed += meta.size();
    }
    if is_dir {
        let mode = meta.mode();
        if mode & 0o700 != 0o700 {
            std::fs::set_permissions(
                path,
                std::fs::Permissions::from_mode((mode | 0o700) & 0o7777),
            )
            .map_err(io_err("chmod", path))?;
        }
        let mut names = Vec::new();
        for e in std::fs::read_dir(path).map_err(io_err("opening directory", path))? {
            names.push(e.map_err(io_err("reading directory", path))?.file_name());
        }
        for n in names {
            delete_path(&path.join(n), bytes_freed)?;
        }
    }
    let r = if is_dir {
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("cannot unlink", path)(e)),
        _ => Ok(()),
    }
}

/// Nix's `topoSortPaths`: referrers before their references.
fn topo_sort(store: &LocalStore, items: &StorePathSet) -> Result<Vec<StorePath>, GcError> {
    fn visit(
        store: &LocalStore,
        items: &StorePathSet,
        path: &StorePath,
        parent: Option<&StorePath>,
        visited: &mut StorePathSet,
        parents: &mut StorePathSet,
        sorted: &mut Vec<StorePath>,
    ) -> Result<(), GcError> {
        if parents.contains(path) {
            let sd = store.store_dir();
            return Err(StoreError::Cycle {
                path: sd.print(path),
                parent: parent.map(|p| sd.print(p)).unwrap_or_default(),
            }
            .into());
        }
        if !visited.insert(path.clone()) {
            return Ok(());
        }
        parents.insert(path.clone());
        let refs = store
            .query_path_info(path)?
            .map(|i| i.references)
            .unwrap_or_default();
        for r in &refs {
            if r != path && items.contains(r) {
                visit(store, items, r, Some(path), visited, parents, sorted)?;
            }
        }
        sorted.push(path.clone());
        parents.remove(path);
        Ok(())
    }
    if items.len() == 1 {
        // nothing to order (self-references are ignored)
        return Ok(items.iter().cloned().collect());
    }
    let (mut visited, mut parents, mut sorted) = (StorePathSet::new(), StorePathSet::new(), vec![]);
    for i in items {
        visit(
            store,
            items,
            i,
            None,
            &mut visited,
            &mut parents,
            &mut sorted,
        )?;
    }
    sorted.reverse();
    Ok(sorted)
}

/// The state of one collection.
struct Collector<'a> {
    store: &'a LocalStore,
    options: &'a GcOptions,
    server: &'a Server,
    log: GcLog<'a>,
    should_delete: bool,
    keep_outputs: bool,
    keep_derivations: bool,
    roots: StorePathSet,
    alive: StorePathSet,
    dead: StorePathSet,
    referrers_cache: HashMap<StorePath, StorePathSet>,
    drv_hashes: DrvHashCache,
    results: &'a mut GcResults,
}

impl Collector<'_> {
    /// Nix's `LocalStore::queryPartialDerivationOutputMap` of a valid derivation:
    /// its `DerivationOutputs` rows, and with `ca-derivations` its outputs'
    /// realisations, which take precedence.
    fn output_paths(&mut self, drv: &StorePath) -> Result<Vec<StorePath>, GcError> {
        let mut outputs = self.store.query_derivation_outputs(drv)?;
        if self.store.ca_derivations_enabled() {
            let store = self.store;
            let sd = store.store_dir().clone();
            let d = store.read_derivation(drv)?;
            let cache = &mut self.drv_hashes;
            let hashes = d.static_output_hashes(&sd, |p: &StorePath| {
                cache.hash_of(&sd, p, |q: &StorePath| {
                    store.read_derivation(q).map(Arc::new)
                })
            })?;
            for (output, drv_hash) in hashes {
                let id = DrvOutput { drv_hash, output };
                if let Some(r) = store.query_realisation(&id)? {
                    outputs.insert(id.output, r.out_path);
                }
            }
        }
        Ok(outputs.into_values().collect())
    }

    /// Deletes a store entry (by base name) and counts it; stops past `max_freed`.
    fn delete_from_store(&mut self, base_name: &str) -> Result<(), Stop> {
        let sd = self.store.store_dir();
        let printed = format!("{}/{base_name}", sd.as_str());
        let real = sd.as_path().join(base_name);
        (self.log)(GcLevel::Info, &format!("deleting '{printed}'"));
        self.results.paths.insert(printed);
        delete_path(&real, &mut self.results.bytes_freed)?;
        if self.results.bytes_freed > self.options.max_freed {
            (self.log)(
                GcLevel::Info,
                &format!(
                    "deleted more than {} bytes; stopping",
                    self.options.max_freed
                ),
            );
            return Err(Stop::Limit);
        }
        Ok(())
    }

    /// `path` is live, and so is the closure of it the settings keep.
    fn mark_alive(&mut self, path: &StorePath, start: &StorePath) -> Result<(), Stop> {
        self.alive.insert(path.clone());
        self.alive.insert(start.clone());
        if !self.store.is_valid_path(path)? {
            return Ok(());
        }
        let mut todo = vec![path.clone()];
        let mut seen: StorePathSet = [path.clone()].into();
        while let Some(p) = todo.pop() {
            let Some(info) = self.store.query_path_info(&p)? else {
                continue;
            };
            let mut next: Vec<StorePath> = info.references.into_iter().collect();
            if self.keep_outputs && p.is_derivation() {
                let outs = self.output_paths(&p)?;
                next.extend(self.store.query_valid_paths(&outs)?);
            }
            if self.keep_derivations {
                if let Some(d) = info.deriver {
                    if self.store.is_valid_path(&d)? {
                        next.push(d);
                    }
                }
            }
            for n in next {
                if seen.insert(n.clone()) {
                    todo.push(n);
                }
            }
        }
        self.alive.extend(seen);
        Ok(())
    }

    /// Nix's `deleteReferrersClosure`.
    fn delete_referrers_closure(&mut self, start: &StorePath) -> Result<(), Stop> {
        let r = self.referrers_closure(start);
        let mut shared = self.server.lock();
        shared.pending = None;
        self.server.wakeup.notify_all();
        drop(shared);
        r
    }

    fn referrers_closure(&mut self, start: &StorePath) -> Result<(), Stop> {
        let mut visited = StorePathSet::new();
        let mut todo = VecDeque::new();
        visited.insert(start.clone());
        todo.push_back(start.clone());
        let sd = self.store.store_dir().clone();
        while let Some(path) = todo.pop_front() {
            if self.alive.contains(&path) {
                self.alive.insert(start.clone());
                return Ok(());
            }
            if self.dead.contains(&path) {
                continue;
            }
            if self.roots.contains(&path) {
                (self.log)(
                    GcLevel::Debug,
                    &format!("cannot delete '{}' because it's a root", sd.print(&path)),
                );
                return self.mark_alive(&path, start);
            }
            if self.options.action == GcAction::DeleteSpecific
                && !self.options.paths_to_delete.contains(&path)
            {
                return Ok(());
            }
            {
                let hash = path.hash_part().to_owned();
                let mut shared = self.server.lock();
                if shared.temp_roots.contains(&hash) {
                    drop(shared);
                    (self.log)(
                        GcLevel::Debug,
                        &format!(
                            "cannot delete '{}' because it's a temporary root",
                            sd.print(&path)
                        ),
                    );
                    return self.mark_alive(&path, start);
                }
                shared.pending = Some(hash);
            }
            if self.store.is_valid_path(&path)? {
                if !self.referrers_cache.contains_key(&path) {
                    let r = self.store.query_referrers(&path)?;
                    self.referrers_cache.insert(path.clone(), r);
                }
                let mut next: Vec<StorePath> =
                    self.referrers_cache[&path].iter().cloned().collect();
                if self.keep_derivations && path.is_derivation() {
                    for out in self.output_paths(&path)? {
                        let built_by_it = self
                            .store
                            .query_path_info(&out)?
                            .is_some_and(|i| i.deriver.as_ref() == Some(&path));
                        if built_by_it {
                            next.push(out);
                        }
                    }
                }
                if self.keep_outputs {
                    next.extend(self.store.query_valid_derivers(&path)?);
                }
                for n in next {
                    if visited.insert(n.clone()) {
                        todo.push_back(n);
                    }
                }
            }
        }
        for path in topo_sort(self.store, &visited)? {
            if self.dead.contains(&path) {
                continue;
            }
            if self.should_delete {
                // A root that arrived since the closure was visited keeps this
                // path and what it refers to, which come after it (Nix 2.8 does
                // not look again and would delete it). The path is `pending`
                // from here until it is gone, so a root for it waits for that.
                let mut shared = self.server.lock();
                if shared.temp_roots.contains(path.hash_part()) {
                    drop(shared);
                    (self.log)(
                        GcLevel::Debug,
                        &format!(
                            "not deleting '{}': it became a temporary root",
                            sd.print(&path)
                        ),
                    );
                    return Ok(());
                }
                shared.pending = Some(path.hash_part().to_owned());
                self.server.wakeup.notify_all();
            }
            self.dead.insert(path.clone());
            if self.should_delete {
                self.store.invalidate_path_checked(&path)?;
                self.delete_from_store(path.base_name())?;
                self.referrers_cache.remove(&path);
            }
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), GcError> {
        let sd = self.store.store_dir().clone();
        (self.log)(GcLevel::Info, "finding garbage collector roots...");
        if !self.options.ignore_liveness {
            let roots = find_roots_no_temp(self.store, true, self.log)?;
            self.roots.extend(roots.into_keys());
        }
        let mut temp = Roots::new();
        find_temp_roots(self.store, true, &mut temp, self.log)?;
        {
            let mut shared = self.server.lock();
            for p in temp.keys() {
                shared.temp_roots.insert(p.hash_part().to_owned());
            }
        }
        self.roots.extend(temp.into_keys());

        // Nix's synchronisation point for tests (tests/gc-concurrent.sh).
        if let Some(p) = std::env::var_os("_NIX_TEST_GC_SYNC") {
            let p = PathBuf::from(p);
            std::fs::read(&p).map_err(io_err("reading", &p))?;
        }

        if self.options.action == GcAction::DeleteSpecific {
            for p in self.options.paths_to_delete.clone() {
                match self.delete_referrers_closure(&p) {
                    Ok(()) | Err(Stop::Limit) => {}
                    Err(Stop::Failed(e)) => return Err(e),
                }
                if !self.dead.contains(&p) {
                    return Err(GcError::StillAlive(sd.print(&p)));
                }
            }
        } else if self.options.max_freed > 0 {
            (self.log)(
                GcLevel::Info,
                if self.should_delete {
                    "deleting garbage..."
                } else {
                    "determining live/dead paths..."
                },
            );
            let real = sd.as_path();
            let dir = std::fs::read_dir(real).map_err(io_err("opening directory", real))?;
            for e in dir {
                let name = e
                    .map_err(io_err("reading directory", real))?
                    .file_name()
                    .to_string_lossy()
                    .into_owned();
                if name == ".links" {
                    continue;
                }
                let r = match StorePath::from_base_name(&name) {
                    Ok(p) => self.delete_referrers_closure(&p),
                    Err(_) if self.should_delete => self.delete_from_store(&name),
                    // Nix 2.8 deletes such an entry even when only asked to
                    // report: drover reports it without deleting it.
                    Err(_) => {
                        self.results.paths.insert(format!("{}/{name}", sd.as_str()));
                        Ok(())
                    }
                };
                match r {
                    Ok(()) => {}
                    Err(Stop::Limit) => break,
                    Err(Stop::Failed(e)) => return Err(e),
                }
            }
        }

        match self.options.action {
            GcAction::ReturnLive => {
                let live: Vec<String> = self.alive.iter().map(|p| sd.print(p)).collect();
                self.results.paths.extend(live);
                return Ok(());
            }
            GcAction::ReturnDead => {
                let dead: Vec<String> = self.dead.iter().map(|p| sd.print(p)).collect();
                self.results.paths.extend(dead);
                return Ok(());
            }
            GcAction::DeleteDead | GcAction::DeleteSpecific => {}
        }
        delete_unused_links(self.store, self.log)
    }
}

/// Removes `.links` entries no store file links to any more, and reports what
/// hard linking saves (Nix's figures: sizes of the shared files, less the
/// directory's own blocks).
fn delete_unused_links(store: &LocalStore, log: GcLog) -> Result<(), GcError> {
    log(GcLevel::Info, "deleting unused links...");
    let links = store.store_dir().as_path().join(".links");
    let (mut actual, mut unshared): (i64, i64) = (0, 0);
    for e in std::fs::read_dir(&links).map_err(io_err("opening directory", &links))? {
        let path = e.map_err(io_err("reading directory", &links))?.path();
        let st = std::fs::symlink_metadata(&path).map_err(io_err("getting status of", &path))?;
        if st.nlink() != 1 {
            actual += st.size() as i64;
            unshared += (st.nlink() as i64 - 1) * st.size() as i64;
            continue;
        }
        log(
            GcLevel::Talkative,
            &format!("deleting unused link '{}'", path.display()),
        );
        std::fs::remove_file(&path).map_err(io_err("deleting", &path))?;
    }
    let st = std::fs::metadata(&links).map_err(io_err("statting", &links))?;
    let overhead = st.blocks() as i64 * 512;
    log(
        GcLevel::Info,
        &format!(
            "note: currently hard linking saves {:.2} MiB",
            (unshared - actual - overhead) as f64 / (1024.0 * 1024.0)
        ),
    );
    Ok(())
}

/// Serves `gc-socket/socket` while `body` runs (Nix's roots server), then stops it:
/// every client connection is shut down (a client then finds `gc.lock` free).
fn with_root_server<T>(
    store: &LocalStore,
    server: &Server,
    log: GcLog,
    body: impl FnOnce() -> T,
) -> Result<T, GcError> {
    let socket = store.state_dir().join("gc-socket/socket");
    if let Some(d) = socket.parent() {
        std::fs::create_dir_all(d).map_err(io_err("creating directory", d))?;
    }
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err("removing", &socket)(e))
        }
        _ => {}
    }
    let listener =
        super::unix_socket::bind(&socket).map_err(io_err("binding to socket", &socket))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("making socket non-blocking", &socket))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
        .map_err(io_err("changing permissions of", &socket))?;
    Ok(std::thread::scope(|s| {
        let acceptor = s.spawn(|| {
            let mut workers = Vec::new();
            while !server.stop.load(Ordering::SeqCst) {
                // Wait for a client, looking at the stop flag every 100 ms.
                let mut fds = [nix::libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: nix::libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: poll(2) on one valid pollfd we own, for its length.
                let n = unsafe { nix::libc::poll(fds.as_mut_ptr(), 1, 100) };
                if n <= 0 {
                    continue;
                }
                let Ok((conn, _)) = listener.accept() else {
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                log(GcLevel::Debug, "GC roots server accepted new client");
                if let Ok(c) = conn.try_clone() {
                    server
                        .clients
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(c);
                }
                workers.push(s.spawn(move || server.serve(store, conn, log)));
            }
            workers
        });
        let r = body();
        log(GcLevel::Debug, "GC roots server shutting down");
        server.stop.store(true, Ordering::SeqCst);
        let workers = acceptor.join().unwrap_or_default();
        {
            let mut shared = server.lock();
            shared.stopping = true;
            shared.pending = None;
            server.wakeup.notify_all();
        }
        for c in server
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        for w in workers {
            let _ = w.join();
        }
        r
    }))
}

/// Nix's `collectGarbage` (see the module doc). Messages go to `log` as Nix
/// prints them.
pub fn collect_garbage(
    store: &LocalStore,
    options: &GcOptions,
    log: GcLog,
) -> Result<GcResults, GcError> {
    let mut results = GcResults::default();
    collect_garbage_into(store, options, &mut results, log)?;
    Ok(results)
}

/// [`collect_garbage`] filling `results` as it goes, so that what was deleted
/// before a failure is known (`nix-store --delete` reports it even then).
pub fn collect_garbage_into(
    store: &LocalStore,
    options: &GcOptions,
    results: &mut GcResults,
    log: GcLog,
) -> Result<(), GcError> {
    let should_delete = matches!(
        options.action,
        GcAction::DeleteDead | GcAction::DeleteSpecific
    );
    let mut keep_outputs = store.gc_keep_outputs();
    let mut keep_derivations = store.gc_keep_derivations();
    // `--ignore-liveness` with `--delete` would follow outputs and derivers.
    if options.action == GcAction::DeleteSpecific && options.ignore_liveness {
        keep_outputs = false;
        keep_derivations = false;
    }
    if should_delete {
        let reserved = store.state_dir().join("db/reserved");
        delete_path(&reserved, &mut 0)?;
    }
    let lock_path = store.state_dir().join("gc.lock");
    let gc_lock: File = open_lock_file(&lock_path, true)
        .map_err(StoreError::from)?
        .ok_or_else(|| io_err("opening", &lock_path)(io::ErrorKind::NotFound.into()))?;
    if !lock_fd(&gc_lock, LockType::Write, false).map_err(io_err("locking", &lock_path))? {
        log(
            GcLevel::Info,
            "waiting for the big garbage collector lock...",
        );
        while !lock_fd(&gc_lock, LockType::Write, true).map_err(io_err("locking", &lock_path))? {}
    }
    let server = Server {
        shared: Mutex::new(Shared::default()),
        wakeup: Condvar::new(),
        stop: AtomicBool::new(false),
        clients: Mutex::new(Vec::new()),
    };
    let mut collector = Collector {
        store,
        options,
        server: &server,
        log,
        should_delete,
        keep_outputs,
        keep_derivations,
        roots: StorePathSet::new(),
        alive: StorePathSet::new(),
        dead: StorePathSet::new(),
        referrers_cache: HashMap::new(),
        drv_hashes: DrvHashCache::new(),
        results,
    };
    let r = with_root_server(store, &server, log, || collector.run())?;
    drop(gc_lock);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use std::os::unix::fs::symlink;

    fn store(dir: &Path) -> LocalStore {
        LocalStore::open(&Settings::for_root(dir, "").unwrap()).unwrap()
    }

    fn text(s: &LocalStore, name: &str, refs: &[&StorePath]) -> StorePath {
        let refs: StorePathSet = refs.iter().map(|p| (*p).clone()).collect();
        s.add_text_to_store(name, name.as_bytes(), &refs).unwrap()
    }

    /// Collects the messages of a run.
    struct Messages(Mutex<Vec<(GcLevel, String)>>);

    impl Messages {
        fn new() -> Messages {
            Messages(Mutex::new(Vec::new()))
        }
        fn log(&self) -> impl Fn(GcLevel, &str) + Sync + '_ {
            |l, m| self.0.lock().unwrap().push((l, m.to_owned()))
        }
        fn info(&self) -> Vec<String> {
            let v = self.0.lock().unwrap();
            v.iter()
                .filter(|(l, _)| *l <= GcLevel::Info)
                .map(|(_, m)| m.clone())
                .collect()
        }
    }

    #[test]
    fn roots_are_found_as_nix_finds_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let [direct, indirect, profile, file, other] =
            ["direct", "indirect", "profile", "file", "other"].map(|n| text(&s, n, &[]));
        s.release_temp_roots();
        let sd = s.store_dir().clone();
        let gcroots = s.state_dir().join("gcroots");
        std::fs::create_dir_all(gcroots.join("auto")).unwrap();
        std::fs::create_dir_all(gcroots.join("deep/er")).unwrap();
        symlink(sd.print(&direct), gcroots.join("deep/er/d")).unwrap();
        // an indirect root: auto/x -> elsewhere -> store
        let elsewhere = dir.path().join("result");
        symlink(format!("{}/file-inside", sd.print(&indirect)), &elsewhere).unwrap();
        symlink(&elsewhere, gcroots.join("auto/x")).unwrap();
        // stale indirect roots go, other dangling links stay
        symlink(dir.path().join("gone"), gcroots.join("auto/stale")).unwrap();
        symlink(dir.path().join("gone"), gcroots.join("dangling")).unwrap();
        symlink(
            s.state_dir().join("profiles/p-1-link"),
            gcroots.join("auto/prof"),
        )
        .unwrap();
        symlink(sd.print(&profile), s.state_dir().join("profiles/p-1-link")).unwrap();
        std::fs::write(gcroots.join(file.base_name()), "").unwrap();
        let invalid = format!("{}/00000000000000000000000000000000-gone", sd.as_str());
        symlink(&invalid, gcroots.join("invalid")).unwrap();
        let msgs = Messages::new();
        let roots = find_roots(&s, false, &msgs.log()).unwrap();
        let links = |p: &StorePath| roots.get(p).cloned().unwrap_or_default();
        let show = |p: &Path| p.display().to_string();
        assert_eq!(links(&direct), [show(&gcroots.join("deep/er/d"))].into());
        assert_eq!(links(&indirect), [show(&elsewhere)].into());
        assert_eq!(
            links(&profile),
            [show(&s.state_dir().join("profiles/p-1-link"))].into()
        );
        assert_eq!(links(&file), [show(&gcroots.join(file.base_name()))].into());
        assert!(!roots.contains_key(&other));
        assert!(!gcroots.join("auto/stale").exists());
        assert!(std::fs::symlink_metadata(gcroots.join("dangling")).is_ok());
        let info = msgs.info();
        assert!(info.contains(&format!(
            "removing stale link from '{}' to '{}'",
            show(&gcroots.join("auto/stale")),
            show(&dir.path().join("gone"))
        )));
        assert!(info.contains(&format!(
            "skipping invalid root from '{}' to '{invalid}'",
            show(&gcroots.join("invalid"))
        )));
        // censored: the same paths, no names
        let censored = find_roots(&s, true, &msgs.log()).unwrap();
        assert_eq!(
            censored.keys().collect::<Vec<_>>(),
            roots.keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn temp_roots_of_live_processes_count_and_dead_ones_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mine = text(&s, "mine", &[]);
        let theirs = text(&s, "theirs", &[]);
        s.release_temp_roots();
        s.add_temp_root(&mine).unwrap();
        // a file nobody holds locked: its process is dead
        let stale = s.state_dir().join("temproots/999999999");
        std::fs::write(&stale, format!("{}\0", s.store_dir().print(&theirs))).unwrap();
        let msgs = Messages::new();
        let roots = find_roots(&s, false, &msgs.log()).unwrap();
        assert_eq!(
            roots.get(&mine).unwrap(),
            &[format!("{{temp:{}}}", std::process::id())].into()
        );
        assert!(!roots.contains_key(&theirs));
        assert!(!stale.exists());
        // so the collection keeps ours (and what shares its hash part) only
        std::fs::write(format!("{}.lock", s.real_path(&mine).display()), "").unwrap();
        let r = collect_garbage(&s, &GcOptions::default(), &msgs.log()).unwrap();
        assert_eq!(r.paths, [s.store_dir().print(&theirs)].into());
        assert!(s.real_path(&mine).exists());
        assert!(Path::new(&format!("{}.lock", s.real_path(&mine).display())).exists());
        assert!(s.is_valid_path(&mine).unwrap());
        assert!(!s.is_valid_path(&theirs).unwrap());
        s.release_temp_roots();
    }

    #[test]
    fn dead_paths_go_referrers_first_and_live_closures_stay() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let bottom = text(&s, "bottom", &[]);
        let middle = text(&s, "middle", &[&bottom]);
        let top = text(&s, "top", &[&middle, &bottom]);
        let shared = text(&s, "shared", &[]);
        let rooted = text(&s, "rooted", &[&shared]);
        let user = text(&s, "user", &[&shared]);
        s.release_temp_roots();
        let sd = s.store_dir().clone();
        symlink(sd.print(&rooted), s.state_dir().join("gcroots/r")).unwrap();
        std::fs::write(sd.as_path().join("junk"), "x").unwrap();
        // --delete of a live path, or of one a valid path refers to, is refused
        let msgs = Messages::new();
        for p in [&rooted, &shared] {
            let o = GcOptions {
                action: GcAction::DeleteSpecific,
                paths_to_delete: [p.clone()].into(),
                ..GcOptions::default()
            };
            let e = collect_garbage(&s, &o, &msgs.log()).unwrap_err();
            assert!(
                matches!(&e, GcError::StillAlive(x) if *x == sd.print(p)),
                "{e}"
            );
        }
        // --print-dead deletes nothing
        let o = GcOptions {
            action: GcAction::ReturnDead,
            ..GcOptions::default()
        };
        let dead = collect_garbage(&s, &o, &msgs.log()).unwrap();
        let want: BTreeSet<String> = [&bottom, &middle, &top, &user]
            .iter()
            .map(|p| sd.print(p))
            .chain([format!("{}/junk", sd.as_str())])
            .collect();
        assert_eq!(dead.paths, want);
        assert!(sd.as_path().join("junk").exists());
        let o = GcOptions {
            action: GcAction::ReturnLive,
            ..GcOptions::default()
        };
        let live = collect_garbage(&s, &o, &msgs.log()).unwrap();
        assert!(live.paths.contains(&sd.print(&shared)));
        assert!(live.paths.contains(&sd.print(&rooted)));
        let msgs = Messages::new();
        let r = collect_garbage(&s, &GcOptions::default(), &msgs.log()).unwrap();
        assert_eq!(r.paths, want);
        // `text` files of 3 to 6 bytes: each counted once
        assert_eq!(r.bytes_freed, (6 + 6 + 3 + 4 + 1) as u64);
        let order: Vec<String> = msgs
            .info()
            .into_iter()
            .filter_map(|m| m.strip_prefix("deleting '").map(str::to_owned))
            .collect();
        let pos = |p: &StorePath| {
            order
                .iter()
                .position(|m| m.starts_with(&sd.print(p)))
                .unwrap()
        };
        assert!(
            pos(&top) < pos(&middle) && pos(&middle) < pos(&bottom),
            "{order:?}"
        );
        for p in [&bottom, &middle, &top, &user] {
            assert!(!s.is_valid_path(p).unwrap());
            assert!(!s.real_path(p).exists());
        }
        for p in [&shared, &rooted] {
            assert!(s.is_valid_path(p).unwrap());
        }
        assert!(!s.state_dir().join("db/reserved").exists());
        let info = msgs.info();
        assert_eq!(info[0], "finding garbage collector roots...");
        assert_eq!(info[1], "deleting garbage...");
        assert_eq!(info[info.len() - 2], "deleting unused links...");
        assert!(info[info.len() - 1].starts_with("note: currently hard linking saves "));
    }

    #[test]
    fn a_referenced_path_is_not_invalidated() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = text(&s, "a", &[]);
        let b = text(&s, "b", &[&a]);
        let e = s.invalidate_path_checked(&a).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot delete path '{}' because it is in use by '{}'",
                s.store_dir().print(&a),
                s.store_dir().print(&b)
            )
        );
        s.invalidate_path_checked(&b).unwrap();
        s.invalidate_path_checked(&a).unwrap();
        assert!(!s.is_valid_path(&a).unwrap());
        // invalid already: nothing to do
        s.invalidate_path_checked(&a).unwrap();
        s.release_temp_roots();
    }

    #[test]
    fn max_freed_stops_after_enough_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        for n in ["aaaa", "bbbb", "cccc"] {
            text(&s, n, &[]);
        }
        s.release_temp_roots();
        let msgs = Messages::new();
        let o = GcOptions {
            max_freed: 5,
            ..GcOptions::default()
        };
        let r = collect_garbage(&s, &o, &msgs.log()).unwrap();
        assert_eq!(r.paths.len(), 2);
        assert_eq!(r.bytes_freed, 8);
        assert!(msgs
            .info()
            .contains(&"deleted more than 5 bytes; stopping".to_owned()));
        let o = GcOptions {
            max_freed: 0,
            ..GcOptions::default()
        };
        assert_eq!(collect_garbage(&s, &o, &msgs.log()).unwrap().paths.len(), 0);
    }

    #[test]
    fn a_root_sent_during_the_collection_is_kept() {
        // The collector's own process adds a root while it runs: it reaches the
        // collector over its socket (the shared gc.lock cannot be had).
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let late = text(&s, "late", &[]);
        let early = text(&s, "early", &[]);
        s.release_temp_roots();
        let msgs = Messages::new();
        let added = AtomicBool::new(false);
        let log = |l: GcLevel, m: &str| {
            if m == "deleting garbage..." && !added.swap(true, Ordering::SeqCst) {
                s.add_temp_root(&late).unwrap();
            }
            msgs.log()(l, m)
        };
        let r = collect_garbage(&s, &GcOptions::default(), &log).unwrap();
        assert_eq!(r.paths, [s.store_dir().print(&early)].into());
        assert!(s.is_valid_path(&late).unwrap());
        s.release_temp_roots();
    }

    #[test]
    fn a_root_arriving_during_a_closure_deletion_keeps_the_rest() {
        // top -> bottom, both dead; while top is being deleted a client roots
        // bottom: it is not deleted (Nix 2.8 would).
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let bottom = text(&s, "bottom", &[]);
        let top = text(&s, "top", &[&bottom]);
        s.release_temp_roots();
        let deleting_top = format!("deleting '{}'", s.store_dir().print(&top));
        let log = |_: GcLevel, m: &str| {
            if m == deleting_top {
                s.add_temp_root(&bottom).unwrap();
            }
        };
        let r = collect_garbage(&s, &GcOptions::default(), &log).unwrap();
        assert_eq!(r.paths, [s.store_dir().print(&top)].into());
        assert!(!s.is_valid_path(&top).unwrap());
        assert!(s.is_valid_path(&bottom).unwrap());
        assert!(s.real_path(&bottom).exists());
        s.release_temp_roots();
    }

    #[test]
    fn maps_lines_and_environ_paths_are_read_as_nix_reads_them() {
        assert_eq!(
            mapped_file("7f00-7f01 r-xp 00000000 08:01 123 /s/abc-foo/lib/x.so"),
            Some("/s/abc-foo/lib/x.so")
        );
        assert_eq!(mapped_file("7f00-7f01 rw-p 00000000 00:00 0"), None);
        assert_eq!(
            mapped_file("7f00-7f01 r-xp 00000000 08:01 123 /s/x (deleted)"),
            None
        );
        let env = b"A=1\0PATH=/s/abc-foo/bin:/s/0x-b_a.r=?+/x\0B=/s/\0C=/s/Zed";
        assert_eq!(
            store_paths_in("/s", env),
            vec!["/s/abc-foo", "/s/0x-b_a.r=?+"]
        );
    }
}
