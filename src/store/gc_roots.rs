//! Temporary GC roots, recorded as Nix 2.8 records them so that Nix's garbage
//! collector keeps what drover is working on.
//!
//! Each process has `<state dir>/temproots/<pid>`: created fresh (a leftover file
//! with our pid is stale and removed), `flock`ed exclusively for the life of the
//! process (the collector treats a file it *can* lock as belonging to a dead process
//! and deletes it, writing `d` into it; so after locking we check the file is still
//! empty, else start over), holding full store paths each followed by a NUL byte.
//!
//! Before appending a root, a shared lock on `<state dir>/gc.lock` is tried. The
//! collector holds it exclusively from before it reads the temporary roots until it
//! is done; then the root is sent to it over `<state dir>/gc-socket/socket`
//! (`<path>\n`) and only used once the collector acknowledged it (`1`): it answers
//! after it finished deleting that very path, if it was deleting it. A refused or
//! broken connection means the collector went away: start over. The connection is
//! kept for later roots, as Nix keeps it.
//!
//! A root must be added *before* the path is created or first relied on: the
//! collector keeps every store entry whose hash part is a root (so `<path>.lock`,
//! `<path>.check` and drover's `<path>` temporaries with the same hash part too).
//! Roots already recorded are not written twice.
//!
//! How long roots stay: in a process that serves one run (the CLI), until it exits
//! or calls [`release_temp_roots`]. A process serving many clients at once (the
//! daemon) keeps them apart as Nix's one-process-per-connection daemon does:
//!
//! * **A connection's roots** (its `AddTempRoot`s, the paths it adds, the outputs it
//!   got built) go to a file of its own, `temproots/<pid>-<n>`, while the
//!   connection's thread is inside a [`ConnectionRoots`] scope; the file goes when
//!   the connection ends. Nix's collector reads the pid with `stoi`, which stops at
//!   the `-`, and locks each file as it locks `<pid>`.
//! * **The shared roots** (those the Worker's goals add, on any thread) go to the
//!   process file `temproots/<pid>`. Everything that relies on them — a run a
//!   client waits for, a goal actor, a store job — takes a [`RootsHold`] for its
//!   life; with [`release_temp_roots_when_idle`] the file is removed when the last
//!   hold goes, and the next root starts a fresh one. Goals are shared between
//!   runs, so no finer rule is safe without knowing who still needs what: under
//!   load that never pauses, goal roots are kept until it does (more than needed,
//!   never less). A run's client copies what the run produced into its
//!   connection's file before its hold goes.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use super::locks::{lock_fd, open_lock_file, LockType};
use super::StoreError;
use crate::store_path::{StoreDir, StorePath};

/// The temporary-roots file of this process for one state directory.
#[derive(Debug)]
pub struct TempRoots {
    state_dir: PathBuf,
    /// `<state dir>/temproots/<name>`.
    path: PathBuf,
    file: File,
    /// `<state dir>/gc.lock`, opened once (Nix's `fdGCLock`).
    gc_lock: File,
    /// The connection to a running collector, while one runs.
    socket: Option<UnixStream>,
    /// Printed paths already in the file.
    recorded: HashSet<String>,
    /// The file was removed ([`release_temp_roots`]): no more roots in it.
    released: bool,
}

/// The process's shared files, the holds on them, and the connections' files.
#[derive(Default)]
struct Registry {
    /// The shared file of each state directory (`temproots/<pid>`).
    files: HashMap<PathBuf, Arc<Mutex<TempRoots>>>,
    /// Live [`RootsHold`]s.
    holds: usize,
    /// State directories whose shared file goes when the last hold goes.
    idle_release: HashSet<PathBuf>,
    /// The connections' files, for [`release_temp_roots`] at exit.
    scoped: Vec<Weak<Mutex<TempRoots>>>,
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn not_found(path: &Path) -> StoreError {
    StoreError::io("opening", path)(io::ErrorKind::NotFound.into())
}

impl TempRoots {
    /// The shared temporary-roots file of this process for `state_dir` (one file per
    /// process, as Nix keys it by pid), created on first use.
    pub fn for_state_dir(state_dir: &Path) -> Result<Arc<Mutex<TempRoots>>, StoreError> {
        let mut reg = registry();
        if let Some(t) = reg.files.get(state_dir) {
            return Ok(t.clone());
        }
        let t = Arc::new(Mutex::new(TempRoots::create(state_dir)?));
        reg.files.insert(state_dir.to_owned(), t.clone());
        Ok(t)
    }

    /// The file roots of this thread go to: its connection's while it is inside
    /// a [`ConnectionRoots`] scope for `state_dir`, else the shared one.
    pub fn current(state_dir: &Path) -> Result<Arc<Mutex<TempRoots>>, StoreError> {
        let scope = SCOPE.with(|s| s.borrow().clone());
        match scope {
            Some(c) if c.state_dir == state_dir => c.file(),
            _ => TempRoots::for_state_dir(state_dir),
        }
    }

    fn create(state_dir: &Path) -> Result<TempRoots, StoreError> {
        TempRoots::create_named(state_dir, &std::process::id().to_string())
    }

    /// A fresh, locked, empty `temproots/<name>`.
    fn create_named(state_dir: &Path, name: &str) -> Result<TempRoots, StoreError> {
        let dir = state_dir.join("temproots");
        std::fs::create_dir_all(&dir).map_err(StoreError::io("creating", &dir))?;
        let path = dir.join(name);
        let file = loop {
            // It must be stale: no two live processes share a pid.
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("removing stale", &path)(e)),
            }
            let file = open_lock_file(&path, true)?.ok_or_else(|| not_found(&path))?;
            while !lock_fd(&file, LockType::Write, true)
                .map_err(|e| StoreError::io("locking", &path)(e))?
            {}
            let size = file
                .metadata()
                .map_err(StoreError::io("statting", &path))?
                .size();
            // A collector deleted the file between our open and our lock: retry.
            if size == 0 {
                break file;
            }
        };
        let gc_lock_path = state_dir.join("gc.lock");
        let gc_lock =
            open_lock_file(&gc_lock_path, true)?.ok_or_else(|| not_found(&gc_lock_path))?;
        Ok(TempRoots {
            state_dir: state_dir.to_owned(),
            path,
            file,
            gc_lock,
            socket: None,
            recorded: HashSet::new(),
            released: false,
        })
    }

    /// Records `path` as a temporary root.
    pub fn add(&mut self, store_dir: &StoreDir, path: &StorePath) -> Result<(), StoreError> {
        self.add_all(store_dir, std::slice::from_ref(path))
    }

    /// Records every path of `paths` as a temporary root: when this returns `Ok`, a
    /// collector, running or not, keeps them.
    pub fn add_all(&mut self, store_dir: &StoreDir, paths: &[StorePath]) -> Result<(), StoreError> {
        self.add_inner(store_dir, paths, false)
    }

    /// With `again`, a root already in the file is still sent to a running
    /// collector: one that read the permanent roots before a new one was made, and
    /// finds this file stale because the process exited meanwhile, must know.
    fn add_inner(
        &mut self,
        store_dir: &StoreDir,
        paths: &[StorePath],
        again: bool,
    ) -> Result<(), StoreError> {
        let new: Vec<String> = paths
            .iter()
            .map(|p| store_dir.print(p))
            .filter(|p| again || !self.recorded.contains(p))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        if self.released {
            return Err(StoreError::TempRootsReleased(new[0].clone()));
        }
        let gc_lock_path = self.state_dir.join("gc.lock");
        loop {
            if lock_fd(&self.gc_lock, LockType::Read, false)
                .map_err(StoreError::io("locking", &gc_lock_path))?
            {
                break;
            }
            // The collector is running: it must know before we go on.
            if self.send_to_collector(&new)? {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut bytes = Vec::new();
        for p in new.iter().filter(|p| !self.recorded.contains(*p)) {
            bytes.extend_from_slice(p.as_bytes());
            bytes.push(0);
        }
        let r = self.file.write_all(&bytes);
        // Release the shared GC lock (held only if we got it; unlocking is harmless).
        let unlocked = lock_fd(&self.gc_lock, LockType::None, false);
        r.map_err(StoreError::io("writing temporary roots", &self.state_dir))?;
        unlocked.map_err(StoreError::io("unlocking", &gc_lock_path))?;
        self.recorded.extend(new);
        Ok(())
    }

    /// Sends roots to the running collector and waits for each acknowledgement.
    /// `Ok(false)`: the collector is not (or no longer) listening; try again.
    fn send_to_collector(&mut self, roots: &[String]) -> Result<bool, StoreError> {
        let socket_path = self.state_dir.join("gc-socket/socket");
        if self.socket.is_none() {
            match super::unix_socket::connect(&socket_path) {
                Ok(s) => self.socket = Some(s),
                // Not listening yet (it creates the socket after taking the lock) or
                // any more.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                    ) =>
                {
                    log::debug!("GC socket '{}': {e}", socket_path.display());
                    return Ok(false);
                }
                Err(e) => return Err(StoreError::io("connecting to", &socket_path)(e)),
            }
        }
        let Some(s) = self.socket.as_mut() else {
            return Ok(false);
        };
        for root in roots {
            log::debug!("sending GC root '{root}'");
            let sent = s.write_all(format!("{root}\n").as_bytes()).and_then(|_| {
                let mut c = [0u8; 1];
                s.read_exact(&mut c).map(|_| c[0])
            });
            match sent {
                Ok(b'1') => {}
                Ok(c) => {
                    return Err(StoreError::io(
                        "talking to the garbage collector at",
                        &socket_path,
                    )(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected reply byte {c:#04x}"),
                    )))
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::BrokenPipe
                            | io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    log::debug!("GC socket disconnected");
                    self.socket = None;
                    return Ok(false);
                }
                Err(e) => {
                    self.socket = None;
                    return Err(StoreError::io(
                        "talking to the garbage collector at",
                        &socket_path,
                    )(e));
                }
            }
        }
        Ok(true)
    }
}

/// Removes this process's temporary-roots files, as Nix does when it closes its
/// store at exit: what the process still uses is no longer protected from the
/// collector. Roots added afterwards go to a fresh file.
pub fn release_temp_roots() {
    let (files, scoped) = {
        let mut reg = registry();
        let files: Vec<_> = reg.files.drain().map(|(_, t)| t).collect();
        (files, std::mem::take(&mut reg.scoped))
    };
    for t in files {
        release(&t);
    }
    for t in scoped.iter().filter_map(Weak::upgrade) {
        release(&t);
    }
}

/// [`release_temp_roots`] for one state directory only (its shared file).
pub fn release_temp_roots_of(state_dir: &Path) {
    let t = registry().files.remove(state_dir);
    if let Some(t) = t {
        release(&t);
    }
}

/// From now on the shared file of `state_dir` is removed whenever the last
/// [`RootsHold`] of the process goes (see the module doc): for a process that
/// serves many runs and keeps everything that relies on shared roots under a hold.
pub fn release_temp_roots_when_idle(state_dir: &Path) {
    registry().idle_release.insert(state_dir.to_owned());
}

/// Keeps the shared roots of the process (every state directory's) while it
/// lives: taken by whatever relies on roots others add for it (a run, a goal, a
/// store job). Cheap: a counter.
#[derive(Debug)]
pub struct RootsHold(());

impl RootsHold {
    pub fn new() -> RootsHold {
        registry().holds += 1;
        RootsHold(())
    }

    /// How many holds the process has (for tests and diagnostics).
    pub fn count() -> usize {
        registry().holds
    }
}

impl Default for RootsHold {
    fn default() -> Self {
        RootsHold::new()
    }
}

impl Clone for RootsHold {
    fn clone(&self) -> Self {
        RootsHold::new()
    }
}

impl Drop for RootsHold {
    fn drop(&mut self) {
        let idle: Vec<Arc<Mutex<TempRoots>>> = {
            let mut reg = registry();
            reg.holds = reg.holds.saturating_sub(1);
            if reg.holds > 0 {
                return;
            }
            let dirs: Vec<PathBuf> = reg.idle_release.iter().cloned().collect();
            // Taken out under the registry lock: a root added from now on (by a
            // thread that holds nothing, or under a new hold) goes to a new file.
            dirs.iter().filter_map(|d| reg.files.remove(d)).collect()
        };
        for t in idle {
            release(&t);
        }
    }
}

thread_local! {
    static SCOPE: RefCell<Option<Arc<ConnectionRoots>>> = const { RefCell::new(None) };
}

/// The temporary roots of one client connection: `temproots/<pid>-<n>`, made on
/// the first root, removed when the last reference goes. Roots reach it from the
/// thread inside its scope ([`ConnectionRoots::enter`]).
#[derive(Debug)]
pub struct ConnectionRoots {
    state_dir: PathBuf,
    file: Mutex<Option<Arc<Mutex<TempRoots>>>>,
}

/// Inside a [`ConnectionRoots`] scope until dropped.
#[derive(Debug)]
pub struct ConnectionScope {
    previous: Option<Arc<ConnectionRoots>>,
    // Not `Send`: the scope belongs to the thread that entered it.
    _thread: std::marker::PhantomData<*const ()>,
}

impl ConnectionRoots {
    pub fn new(state_dir: &Path) -> Arc<ConnectionRoots> {
        Arc::new(ConnectionRoots {
            state_dir: state_dir.to_owned(),
            file: Mutex::new(None),
        })
    }

    /// Until the guard is dropped, this thread's roots in this state directory
    /// go to the connection's file.
    pub fn enter(self: &Arc<Self>) -> ConnectionScope {
        let previous = SCOPE.with(|s| s.borrow_mut().replace(self.clone()));
        ConnectionScope {
            previous,
            _thread: std::marker::PhantomData,
        }
    }

    /// The connection's file, made on first use.
    pub fn file(&self) -> Result<Arc<Mutex<TempRoots>>, StoreError> {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = &*f {
            return Ok(t.clone());
        }
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let name = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let t = Arc::new(Mutex::new(TempRoots::create_named(&self.state_dir, &name)?));
        let mut reg = registry();
        reg.scoped.retain(|w| w.strong_count() > 0);
        reg.scoped.push(Arc::downgrade(&t));
        *f = Some(t.clone());
        Ok(t)
    }

    /// The path of the connection's file, once it has one.
    pub fn path(&self) -> Option<PathBuf> {
        let f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        f.as_ref()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).path.clone())
    }
}

impl Drop for ConnectionRoots {
    fn drop(&mut self) {
        let f = self.file.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = f.take() {
            release(&t);
        }
    }
}

impl Drop for ConnectionScope {
    fn drop(&mut self) {
        let previous = self.previous.take();
        SCOPE.with(|s| *s.borrow_mut() = previous);
    }
}

fn release(t: &Mutex<TempRoots>) {
    let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
    if t.released {
        return;
    }
    // Unlinked while still locked: a collector never sees it unlocked.
    if let Err(e) = std::fs::remove_file(&t.path) {
        log::debug!("removing '{}': {e}", t.path.display());
    }
    t.released = true;
    t.socket = None;
}

/// Nix's `canonPath` for an absolute path: `.`, `..` and repeated slashes removed
/// lexically, symlinks not followed.
pub fn canon_path(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// Replaces (or creates) the symlink `link` → `target` atomically: written under
/// `<link>.tmp-<pid>-<random>` and renamed over `link`, parents created first.
fn make_symlink(link: &Path, target: &Path) -> Result<(), StoreError> {
    if let Some(dir) = link.parent() {
        std::fs::create_dir_all(dir).map_err(StoreError::io("creating directory", dir))?;
    }
    let nonce = {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        t.subsec_nanos() ^ (t.as_secs() as u32)
    };
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}-{nonce}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(StoreError::io("creating symlink", &tmp))?;
    std::fs::rename(&tmp, link).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        StoreError::io("renaming a symlink onto", link)(e)
    })
}

/// The indirect root of `link`: `<state dir>/gcroots/auto/<sha1 of the link's path,
/// nix base 32>` → `link`, so the collector follows `link` wherever it lives.
pub fn add_indirect_root(state_dir: &Path, link: &Path) -> Result<PathBuf, StoreError> {
    let printed = link.as_os_str().as_encoded_bytes();
    let hash = crate::hash::HashAlgo::Sha1
        .digest(printed)
        .encode(crate::hash::Encoding::Base32);
    let real = canon_path(&state_dir.join("gcroots/auto").join(hash));
    make_symlink(&real, link)?;
    Ok(real)
}

/// Nix's `addPermRoot`: makes `gc_root` (absolute, outside the store) a symlink to
/// `path` and registers it as an indirect root. `path` becomes a temporary root of
/// `temp_roots` first, and is sent again to a collector that is running once the
/// links exist (Nix 2.8 only sends it before, which leaves a window: a collector
/// that reads the permanent roots before the links are made and the temporary roots
/// after this process exited deletes the path). An existing `gc_root` is only
/// replaced when it is a symlink into the store. Returns the canonical root path.
pub fn add_perm_root(
    temp_roots: &mut TempRoots,
    store_dir: &StoreDir,
    path: &StorePath,
    gc_root: &Path,
) -> Result<PathBuf, StoreError> {
    let gc_root = canon_path(gc_root);
    let printed_root = gc_root.to_string_lossy().into_owned();
    if store_dir.is_in_store(&printed_root) {
        return Err(StoreError::RootInStore(printed_root));
    }
    temp_roots.add_inner(store_dir, std::slice::from_ref(path), true)?;
    if let Ok(m) = std::fs::symlink_metadata(&gc_root) {
        let into_store = m.file_type().is_symlink()
            && std::fs::read_link(&gc_root)
                .is_ok_and(|t| store_dir.is_in_store(&t.to_string_lossy()));
        if !into_store {
            return Err(StoreError::RootExists(printed_root));
        }
    }
    make_symlink(&gc_root, Path::new(&store_dir.print(path)))?;
    add_indirect_root(&temp_roots.state_dir, &gc_root)?;
    // Once more, now that the links exist. A collector that took `gc.lock` between
    // the first add and the links may have read the permanent roots without them,
    // and reads this process's temporary roots only later, perhaps after the
    // process exited and its file went away: so it must hear of the path from us.
    // With the shared lock had instead, no collector is running, and the next one
    // finds the links.
    temp_roots.add_inner(store_dir, std::slice::from_ref(path), true)?;
    Ok(gc_root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_nul_terminated_and_file_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StoreDir::new("/nix/store").unwrap();
        let p = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello").unwrap();
        let t = TempRoots::for_state_dir(dir.path()).unwrap();
        t.lock().unwrap().add(&sd, &p).unwrap();
        t.lock().unwrap().add(&sd, &p).unwrap();
        let file = dir.path().join(format!("temproots/{}", std::process::id()));
        let contents = std::fs::read(&file).unwrap();
        let one = b"/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello\0";
        // recorded once: the second add finds it already there
        assert_eq!(contents, &one[..]);
        // the collector's non-blocking exclusive lock must fail while we live
        let other = open_lock_file(&file, false).unwrap().unwrap();
        assert!(!lock_fd(&other, LockType::Write, false).unwrap());
    }

    /// A collector that holds `gc.lock` while a permanent root is made hears of the
    /// path once the link exists (its scan of the roots may have missed the link).
    #[test]
    fn a_perm_root_reaches_a_running_collector_after_its_links_exist() {
        use std::os::unix::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let sd = StoreDir::new("/nix/store").unwrap();
        let p = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-out").unwrap();
        let mut t = TempRoots::create(dir.path()).unwrap();
        let gc_lock = open_lock_file(&dir.path().join("gc.lock"), true)
            .unwrap()
            .unwrap();
        assert!(lock_fd(&gc_lock, LockType::Write, false).unwrap());
        std::fs::create_dir_all(dir.path().join("gc-socket")).unwrap();
        let listener = UnixListener::bind(dir.path().join("gc-socket/socket")).unwrap();
        let link = dir.path().join("result");
        let seen = link.clone();
        // The collector: for every root it hears of, whether the link existed then.
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut heard = Vec::new();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while c.read_exact(&mut b).is_ok() {
                if b[0] != b'\n' {
                    line.push(b[0]);
                    continue;
                }
                heard.push((String::from_utf8(std::mem::take(&mut line)).unwrap(), {
                    std::fs::symlink_metadata(&seen).is_ok()
                }));
                c.write_all(b"1").unwrap();
            }
            heard
        });
        add_perm_root(&mut t, &sd, &p, &link).unwrap();
        t.socket = None;
        let heard = server.join().unwrap();
        drop(gc_lock);
        let printed = "/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-out".to_owned();
        assert_eq!(heard.last(), Some(&(printed, true)), "{heard:?}");
    }

    /// With the collector holding `gc.lock`, a root reaches it over the socket, and
    /// `add` returns only after the acknowledgement; a collector that went away
    /// (connection refused) is retried until the lock can be had.
    #[test]
    fn roots_go_to_a_running_collector_first() {
        use std::os::unix::net::UnixListener;
        use std::sync::mpsc;
        let dir = tempfile::tempdir().unwrap();
        let sd = StoreDir::new("/nix/store").unwrap();
        let p = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-busy").unwrap();
        // `TempRoots::create`, not the registry: another test may share the pid file.
        let mut t = TempRoots::create(dir.path()).unwrap();
        let gc_lock = open_lock_file(&dir.path().join("gc.lock"), true)
            .unwrap()
            .unwrap();
        assert!(lock_fd(&gc_lock, LockType::Write, false).unwrap());
        std::fs::create_dir_all(dir.path().join("gc-socket")).unwrap();
        let listener = UnixListener::bind(dir.path().join("gc-socket/socket")).unwrap();
        let (tx, rx) = mpsc::channel();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while c.read_exact(&mut b).is_ok() && b[0] != b'\n' {
                line.push(b[0]);
            }
            tx.send(String::from_utf8(line).unwrap()).unwrap();
            // acknowledge only once the test has seen the root arrive
            std::thread::sleep(Duration::from_millis(100));
            c.write_all(b"1").unwrap();
            (c, gc_lock)
        });
        t.add(&sd, &p).unwrap();
        assert_eq!(
            rx.try_recv().unwrap(),
            "/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-busy"
        );
        let (conn, gc_lock) = server.join().unwrap();
        let file = dir.path().join(format!("temproots/{}", std::process::id()));
        assert_eq!(
            std::fs::read(&file).unwrap(),
            b"/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-busy\0"
        );
        // The collector exits (socket closed, lock kept a moment): a new root waits
        // for the lock instead of failing.
        drop(conn);
        let q = StorePath::from_base_name("8h7qgvs4kgzsn8a6rb274saxyqh4jxlz-next").unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(gc_lock);
        });
        t.add(&sd, &q).unwrap();
        releaser.join().unwrap();
        assert!(std::fs::read(&file).unwrap().ends_with(b"-next\0"));
        // already recorded: nothing written again
        t.add(&sd, &q).unwrap();
        assert_eq!(
            std::fs::read(&file)
                .unwrap()
                .iter()
                .filter(|b| **b == 0)
                .count(),
            2
        );
    }

    fn names(state_dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(state_dir.join("temproots"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// With idle release, the shared file lives while any hold does, however the
    /// holds overlap; a root added after the last hold went starts a fresh file.
    /// (The only test taking holds: they count for the whole process.)
    #[test]
    fn shared_roots_live_as_long_as_some_hold() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StoreDir::new("/nix/store").unwrap();
        let p = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-goal").unwrap();
        let pid = std::process::id().to_string();
        release_temp_roots_when_idle(dir.path());
        let run_a = RootsHold::new();
        TempRoots::current(dir.path())
            .unwrap()
            .lock()
            .unwrap()
            .add(&sd, &p)
            .unwrap();
        assert_eq!(names(dir.path()), std::slice::from_ref(&pid));
        // A second run starts, sharing the goal; the first ends.
        let run_b = run_a.clone();
        drop(run_a);
        assert_eq!(
            names(dir.path()),
            std::slice::from_ref(&pid),
            "run B still relies on it"
        );
        let job = RootsHold::new();
        drop(run_b);
        assert_eq!(
            names(dir.path()),
            std::slice::from_ref(&pid),
            "a job still runs"
        );
        drop(job);
        assert!(names(dir.path()).is_empty(), "idle: the roots are gone");
        // The next root goes to a new file, which has the root again.
        let run_c = RootsHold::new();
        let t = TempRoots::current(dir.path()).unwrap();
        t.lock().unwrap().add(&sd, &p).unwrap();
        let file = dir.path().join(format!("temproots/{pid}"));
        assert_eq!(
            std::fs::read(&file).unwrap(),
            b"/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-goal\0"
        );
        drop(run_c);
        assert!(names(dir.path()).is_empty());
        // The released file refuses new roots: its holder must take the next file.
        let q = StorePath::from_base_name("8h7qgvs4kgzsn8a6rb274saxyqh4jxlz-late").unwrap();
        assert!(matches!(
            t.lock().unwrap().add(&sd, &q),
            Err(StoreError::TempRootsReleased(_))
        ));
        // Without idle release (the CLI), the file stays when holds go.
        let cli = tempfile::tempdir().unwrap();
        let h = RootsHold::new();
        TempRoots::current(cli.path())
            .unwrap()
            .lock()
            .unwrap()
            .add(&sd, &p)
            .unwrap();
        drop(h);
        assert_eq!(names(cli.path()), [pid]);
        release_temp_roots_of(cli.path());
    }

    /// A connection's roots go to its own `<pid>-<n>` file, locked like the
    /// shared one, only from the thread inside its scope; the file goes with the
    /// connection.
    #[test]
    fn connection_roots_are_a_file_of_their_own_for_the_connections_life() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StoreDir::new("/nix/store").unwrap();
        let p = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-conn").unwrap();
        let conn = ConnectionRoots::new(dir.path());
        let other = ConnectionRoots::new(dir.path());
        {
            let _in = conn.enter();
            {
                let _nested = other.enter();
                let t = TempRoots::current(dir.path()).unwrap();
                t.lock().unwrap().add(&sd, &p).unwrap();
            }
            // Back in the outer scope.
            let t = TempRoots::current(dir.path()).unwrap();
            t.lock().unwrap().add(&sd, &p).unwrap();
            // Another thread is in no scope: it gets the shared file.
            let shared = std::thread::scope(|s| {
                s.spawn(|| TempRoots::current(dir.path()).unwrap())
                    .join()
                    .unwrap()
            });
            assert!(!Arc::ptr_eq(&shared, &t));
        }
        let path = conn.path().unwrap();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let (pid, n) = name.split_once('-').unwrap();
        assert_eq!(pid, std::process::id().to_string());
        assert!(n.parse::<u64>().is_ok(), "{name}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-conn\0"
        );
        let f = open_lock_file(&path, false).unwrap().unwrap();
        assert!(!lock_fd(&f, LockType::Write, false).unwrap());
        assert_ne!(other.path().unwrap(), path);
        drop(conn);
        assert!(!path.exists(), "the connection's roots went with it");
        assert!(other.path().unwrap().exists());
        drop(other);
        release_temp_roots_of(dir.path());
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }
}
