//! Path locks: Nix 2.8's `<path>.lock` protocol.
//!
//! Nix 2.8 locks with `flock(2)` (not `fcntl` record locks): the lock file is opened
//! (created, mode 0600, `O_CLOEXEC`) and locked exclusively. A holder that is done
//! with a lock for good may *delete* it: it unlinks the file and then writes one byte
//! (`d`) into it while still holding the lock. A waiter that then gets the lock sees a
//! non-empty file (`st_size != 0`), knows the file is stale (unlinked) and starts over
//! with a fresh file. Several paths are locked in sorted order, so two processes
//! locking overlapping sets cannot deadlock.
//!
//! The same `flock` calls ([`lock_fd`]) serve the database's `big-lock` (shared while
//! the store is open) and the temporary-roots files.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// A lock failure.
#[derive(Debug, Error)]
pub enum LockError {
    #[error("opening lock file '{path}': {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("acquiring/releasing lock on '{path}': {source}")]
    Lock { path: PathBuf, source: io::Error },
}

/// Kinds of `flock` lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockType {
    /// Shared (`LOCK_SH`).
    Read,
    /// Exclusive (`LOCK_EX`).
    Write,
    /// Unlock (`LOCK_UN`).
    None,
}

/// Opens (and with `create`, creates with mode 0600) a lock file, as Nix's
/// `openLockFile`. Without `create`, a missing file gives `Ok(None)`.
pub fn open_lock_file(path: &Path, create: bool) -> Result<Option<File>, LockError> {
    let r = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(0o600)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(path);
    match r {
        Ok(f) => Ok(Some(f)),
        Err(e) if !create && e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LockError::Open {
            path: path.to_owned(),
            source,
        }),
    }
}

/// `flock`s `file`; with `wait` false, returns `Ok(false)` when another holder has it.
/// A blocking wait interrupted by a signal also returns `Ok(false)`.
pub fn lock_fd(file: &File, ty: LockType, wait: bool) -> io::Result<bool> {
    let mut op = match ty {
        LockType::Read => nix::libc::LOCK_SH,
        LockType::Write => nix::libc::LOCK_EX,
        LockType::None => nix::libc::LOCK_UN,
    };
    if !wait {
        op |= nix::libc::LOCK_NB;
    }
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let r = unsafe { nix::libc::flock(file.as_raw_fd(), op) };
        if r == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(nix::libc::EWOULDBLOCK) if !wait => return Ok(false),
            Some(nix::libc::EINTR) if wait => return Ok(false),
            Some(nix::libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
}

/// Marks a held lock file as stale for other waiters and removes it (`deleteLockFile`).
pub fn delete_lock_file(path: &Path, file: &mut File) {
    // Removing the file is an optimisation; errors are ignored as Nix does.
    let _ = std::fs::remove_file(path);
    let _ = file.write_all(b"d");
}

/// The lock file of a path: `<path>.lock`.
pub fn lock_path_of(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// Exclusive locks on a set of paths (`PathLocks`), released on drop.
#[derive(Debug, Default)]
pub struct PathLocks {
    fds: Vec<(File, PathBuf)>,
    delete_paths: bool,
}

impl PathLocks {
    /// Locks every path in `paths` (sorted), waiting for each.
    pub fn lock(paths: &BTreeSet<PathBuf>) -> Result<PathLocks, LockError> {
        let mut l = PathLocks::default();
        l.lock_paths(paths, true)?;
        Ok(l)
    }

    /// Locks every path without waiting. When one is held elsewhere, releases what it
    /// took and returns `Err(path)` naming the busy path.
    pub fn try_lock(paths: &BTreeSet<PathBuf>) -> Result<Result<PathLocks, PathBuf>, LockError> {
        let mut l = PathLocks::default();
        match l.lock_paths(paths, false)? {
            None => Ok(Ok(l)),
            Some(busy) => Ok(Err(busy)),
        }
    }

    /// Returns the busy path when `wait` is false and a lock is held elsewhere.
    fn lock_paths(
        &mut self,
        paths: &BTreeSet<PathBuf>,
        wait: bool,
    ) -> Result<Option<PathBuf>, LockError> {
        for path in paths {
            let lock_path = lock_path_of(path);
            log::debug!("locking path '{}'", path.display());
            let file = loop {
                let file = open_lock_file(&lock_path, true)?.ok_or_else(|| LockError::Open {
                    path: lock_path.clone(),
                    source: io::ErrorKind::NotFound.into(),
                })?;
                let lock_err = |source| LockError::Lock {
                    path: lock_path.clone(),
                    source,
                };
                if !lock_fd(&file, LockType::Write, false).map_err(lock_err)? {
                    if !wait {
                        self.unlock();
                        return Ok(Some(path.clone()));
                    }
                    while !lock_fd(&file, LockType::Write, true).map_err(lock_err)? {}
                }
                let size = file
                    .metadata()
                    .map_err(|source| LockError::Lock {
                        path: lock_path.clone(),
                        source,
                    })?
                    .size();
                if size == 0 {
                    break file;
                }
                log::debug!("open lock file '{}' has become stale", lock_path.display());
            };
            self.fds.push((file, lock_path));
        }
        Ok(None)
    }

    /// Whether to delete the lock files when releasing (after a successful build).
    pub fn set_deletion(&mut self, delete: bool) {
        self.delete_paths = delete;
    }

    /// Releases all locks (deleting the files if asked to).
    pub fn unlock(&mut self) {
        for (mut file, path) in self.fds.drain(..) {
            if self.delete_paths {
                delete_lock_file(&path, &mut file);
            }
            log::debug!("lock released on '{}'", path.display());
        }
    }
}

impl Drop for PathLocks {
    fn drop(&mut self) {
        self.unlock();
    }
}

/// The process holding an exclusive `flock` on `path`, as `/proc/locks` lists it
/// (`N: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> …`, device numbers in
/// hex). `flock` locks are invisible to `fcntl(F_GETLK)`, so this is the way to
/// say who holds a lock file. `None` when nobody holds it, the file is gone or
/// `/proc` is not mounted.
pub fn holder_pid(path: &Path) -> Option<u32> {
    let st = std::fs::metadata(path).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    flock_holder(&locks, st.dev(), st.ino())
}

/// The pid of the first writer `flock` on the file `(dev, ino)` in the text of
/// `/proc/locks` (waiters, marked `->`, are skipped).
pub fn flock_holder(proc_locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let (major, minor) = (nix::libc::major(dev) as u64, nix::libc::minor(dev) as u64);
    proc_locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[1] == "->" || f[1] != "FLOCK" || f[3] != "WRITE" {
            return None;
        }
        let mut id = f[5].split(':');
        let hex = |s: Option<&str>| u64::from_str_radix(s?, 16).ok();
        let (ma, mi) = (hex(id.next())?, hex(id.next())?);
        let i: u64 = id.next()?.parse().ok()?;
        (ma == major && mi == minor && i == ino)
            .then(|| f[4].parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(paths: &[&Path]) -> BTreeSet<PathBuf> {
        paths.iter().map(|p| p.to_path_buf()).collect()
    }

    #[test]
    fn second_holder_is_refused_then_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let l1 = PathLocks::lock(&set(&[&b])).unwrap();
        // separate open file descriptions conflict even within one process
        let busy = PathLocks::try_lock(&set(&[&a, &b])).unwrap().unwrap_err();
        assert_eq!(busy, b);
        // `a` was released again after `b` failed
        let la = PathLocks::lock(&set(&[&a])).unwrap();
        drop(la);
        drop(l1);
        // (blocking: a child forked by a concurrent test may briefly share the fds)
        let both = PathLocks::lock(&set(&[&a, &b])).unwrap();
        drop(both);
        assert!(lock_path_of(&a).exists());
    }

    #[test]
    fn deleted_lock_is_stale_for_a_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let mut l1 = PathLocks::lock(&set(&[&a])).unwrap();
        let lp = lock_path_of(&a);
        // a waiter that opened the old file before deletion
        let old = open_lock_file(&lp, false).unwrap().unwrap();
        l1.set_deletion(true);
        drop(l1);
        assert!(!lp.exists());
        // blocking: a child forked concurrently by another test may hold the fd briefly
        assert!(lock_fd(&old, LockType::Write, true).unwrap());
        assert_eq!(old.metadata().unwrap().size(), 1, "stale marker written");
        // a fresh lock creates a new, empty file
        let l2 = PathLocks::lock(&set(&[&a])).unwrap();
        assert!(lp.exists());
        drop(l2);
    }

    #[test]
    fn blocks_across_processes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let l1 = PathLocks::lock(&set(&[&a])).unwrap();
        // `flock` from another process: fails while held, succeeds after release
        let lp = lock_path_of(&a);
        let try_other = || {
            std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("exec 9<>'{}' && flock -n 9", lp.display()))
                .status()
                .map(|s| s.success())
        };
        if std::process::Command::new("flock")
            .arg("--version")
            .output()
            .is_err()
        {
            return; // flock(1) is not installed
        }
        assert!(
            !try_other().unwrap(),
            "held lock must refuse another process"
        );
        drop(l1);
        assert!(try_other().unwrap());
    }

    #[test]
    fn the_holder_of_a_lock_is_found_in_proc_locks() {
        let text = "1: FLOCK  ADVISORY  WRITE 4242 00:2a:977 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 77 00:2a:978 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 55 00:2a:979 0 EOF\n";
        let dev = nix::libc::makedev(0, 0x2a);
        assert_eq!(flock_holder(text, dev, 977), Some(4242));
        assert_eq!(flock_holder(text, dev, 978), None, "a waiter holds nothing");
        assert_eq!(flock_holder(text, dev, 979), None, "not a flock");
        assert_eq!(flock_holder(text, dev, 1), None);
        assert_eq!(flock_holder("garbage\n1: FLOCK x", dev, 977), None);
        // A real lock of this process.
        if !Path::new("/proc/locks").exists() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let l = PathLocks::lock(&set(&[&a])).unwrap();
        assert_eq!(holder_pid(&lock_path_of(&a)), Some(std::process::id()));
        drop(l);
        assert_eq!(holder_pid(&lock_path_of(&a)), None);
    }
}
